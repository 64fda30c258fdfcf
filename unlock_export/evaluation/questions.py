"""The questions an eval asks: gold-answer items read from a JSONL file or a packaged set, and the
prompts they become under a template (optionally wrapped by the model's chat template)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import prompts as prompt_mod
from ..errors import UserError
from .tasks import task_for


@dataclasses.dataclass
class Item:
    index: int
    question: str
    gold: object  # what the task's read_gold gives: a Fraction (gsm8k) or a LaTeX string (math)
    groups: dict = dataclasses.field(default_factory=dict)  # the task's group_fields: MATH's level, subject


def parse_where(where: str | None) -> tuple[str, set[str]] | None:
    """`FIELD=V1,V2` -> (FIELD, {V1, V2}); None for None."""
    if where is None:
        return None
    name, eq, values = where.partition("=")
    chosen = {v.strip() for v in values.split(",") if v.strip()}
    if not eq or not name.strip() or not chosen:
        raise UserError(f"--where '{where}' is not FIELD=VALUE[,VALUE...] (such as level=1,2)")
    return name.strip(), chosen


def load_items(source: str | Path, count: int | None = None, offset: int = 0, field: str | None = None,
               answer_field: str | None = None, task: str | None = None, where: str | None = None) -> list[Item]:
    """Questions with gold answers from a JSONL file (plain or gzip) or a packaged set (builtin:gsm8k-dev,
    builtin:math500, ...), read as `task` says (evaluation.tasks; default: the data set's own, else gsm8k);
    `offset` skips that many lines, `where` ("level=1,2") keeps only the rows whose field has one of the
    values (`count` counts the rows kept), and an item's index is its line number from 0."""
    kind = task_for(source, task)
    selection = parse_where(where)
    field, answer_field = field or kind.question_field, answer_field or kind.answer_field
    items = []
    for lineno, line in prompt_mod.jsonl_lines(source, "eval data"):
        n = lineno - 1
        if not line.strip() or n < offset:
            continue
        try:
            row = json.loads(line)
            question, answer = row[field], row[answer_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{source}:{lineno}: expected a JSON object with '{field}' and '{answer_field}' "
                            f"(task {kind.name}; --task chooses another)")
        if selection is not None and str(row.get(selection[0])) not in selection[1]:
            continue
        gold = kind.read_gold(answer)
        if gold is None:
            raise UserError(f"{source}:{lineno}: answer {str(answer)[-40:]!r} is not {kind.gold_hint} "
                            f"(task {kind.name}; --task chooses another)")
        items.append(Item(n, str(question), gold, {g: row[g] for g in kind.group_fields if g in row}))
        if count is not None and len(items) >= count:
            break
    if not items:
        raise UserError(f"eval data '{source}' holds no questions after offset {offset}"
                        + (f" where {where}" if where else ""))
    return items


def render_prompts(items: list[Item], template: str, tokenizer=None, chat: bool = False) -> list[str]:
    texts = prompt_mod.apply_template(template, [it.question for it in items])
    if not chat:
        return texts
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat needs a model whose tokenizer has a chat template")
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True) for t in texts]
