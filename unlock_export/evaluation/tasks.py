"""What a data set's answers are and how an output is scored against them: one entry per kind of
answer (named in choices.TASKS), and which packaged data set is which (DATASET_TASKS).

  gsm8k   a number (GSM8K's '... #### N', or a plain number); the number an output commits to
          (evaluation.answers), compared as exact fractions
  math    a LaTeX expression (MATH-500, AGIEval-Math: what \\boxed{} holds in the solution); the
          output's final answer (its last \\boxed{}, else a stated or last expression), compared with
          math-verify's equivalence check (\\frac{1}{2} = 0.5, \\left( 3, \\frac{\\pi}{2} \\right) =
          (3,\\pi/2)). An output it cannot read scores 0; scoring never fails on an output.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

from ..choices import TASKS
from ..errors import UserError
from .answers import extract_prediction, gold_answer


@dataclasses.dataclass(frozen=True)
class Task:
    """A kind of answer: the fields it is read from, the prompt eval uses unless told, how the gold
    answer is read (None: the row has none) and how an output is scored (-> prediction shown, correct),
    and the per-question fields a report groups by."""

    name: str
    question_field: str
    answer_field: str
    template: str
    read_gold: Callable[[object], object | None]
    score: Callable[[str, object], tuple[str | None, bool]]
    gold_hint: str
    group_fields: tuple[str, ...] = ()


def _score_number(output: str, gold) -> tuple[str | None, bool]:
    predicted = extract_prediction(output)
    return (None if predicted is None else str(predicted)), predicted is not None and predicted == gold


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise UserError("scoring MATH answers needs math-verify: pip install 'unlock-export[math]'") from None
    return math_verify


def _read_latex(answer) -> str | None:
    text = str(answer).strip() if answer is not None else ""
    return text or None


def _score_latex(output: str, gold: str) -> tuple[str | None, bool]:
    mv = _math_verify()
    # math-verify bounds its parsing with SIGALRM, which only the main thread may use
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        target = mv.parse(f"${gold}$", parsing_timeout=timeout)
        predicted = mv.parse(output, parsing_timeout=timeout)
        if not predicted:
            return None, False
        shown = str(predicted[-1]) if isinstance(predicted[-1], str) else str(predicted[0])
        return shown, bool(mv.verify(target, predicted, timeout_seconds=timeout))
    except Exception:  # a malformed expression is a wrong answer, never a failed run
        return None, False


_TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "question", "answer", "direct", gold_answer, _score_number,
                  "a number (GSM8K: '... #### N')"),
    "math": Task("math", "problem", "answer", "math", _read_latex, _score_latex,
                 "the final answer's LaTeX (what \\boxed{} holds)", group_fields=("level", "subject")),
}
assert tuple(_TASKS) == TASKS

# the packaged data sets that are not GSM8K-style (every other data set, and any JSONL file, is gsm8k
# unless --task says otherwise)
DATASET_TASKS = {"builtin:math500": "math", "builtin:agieval-math": "math"}


def task_for(data: str | Path, name: str | None = None) -> Task:
    """The task `name`, else the one the data set is (DATASET_TASKS), else gsm8k."""
    name = name or DATASET_TASKS.get(str(data), "gsm8k")
    if name not in _TASKS:
        raise UserError(f"unknown task '{name}': use {' or '.join(TASKS)}")
    return _TASKS[name]
