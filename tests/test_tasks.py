"""Answer scoring by task: MATH's LaTeX answers through math-verify, the packaged data sets, and a
MATH run end to end on a tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from unlock_export.cli import main
from unlock_export.evaluation.run import load_items
from unlock_export.evaluation.tasks import task_for
from unlock_export.prompts import BUILTIN_FILES, builtin_file

MATH = task_for("builtin:math500")


def _math500() -> list[dict]:
    with gzip.open(builtin_file("math500"), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# equivalent forms of MATH-500 answers (gold as the data set holds it, an output a model might write)
EQUIVALENT = [
    (r"\left( 3, \frac{\pi}{2} \right)", r"So the point is \boxed{(3,\pi/2)}."),
    (r"\frac{14}{3}", r"The answer is \boxed{\dfrac{14}{3}}"),
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    (r"6", r"Therefore, the final answer is $\boxed{6}$."),
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}"),
    (r"\sqrt{2}", r"we get $x = \boxed{\sqrt 2}$"),
]
NOT_EQUIVALENT = [
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi)}"),
    (r"\frac{14}{3}", r"\boxed{\frac{3}{14}}"),
    (r"6", r"\boxed{7}"),
    (r"\sqrt{2}", r"\boxed{2}"),
]
WRONG_FORMAT = ["", "I do not know.", r"\boxed{", r"$\frac{1}{$ \boxed{\left(}", "}}}{{{", "\\" * 50, "\x00\x01"]


def test_math500_answers_are_in_the_package_and_appear_in_the_examples():
    golds = {row["answer"] for row in _math500()}
    assert len(_math500()) == 500
    assert {g for g, _ in EQUIVALENT + NOT_EQUIVALENT} - {r"\sqrt{2}", r"6"} <= golds


@pytest.mark.parametrize("gold,output", EQUIVALENT)
def test_equivalent_answers_score_1(gold, output):
    predicted, correct = MATH.score(output, gold)
    assert correct and predicted


@pytest.mark.parametrize("gold,output", NOT_EQUIVALENT)
def test_other_answers_score_0(gold, output):
    assert MATH.score(output, gold)[1] is False


@pytest.mark.parametrize("output", WRONG_FORMAT)
def test_a_wrong_format_scores_0_and_never_fails(output):
    predicted, correct = MATH.score(output, r"\frac{1}{2}")
    assert correct is False


def test_every_math500_solution_scores_1_against_its_own_answer():
    rows = _math500()[:60]
    assert all(MATH.score(row["solution"], row["answer"])[1] for row in rows)
    # and a neighbour's solution mostly does not (different problems' answers rarely coincide)
    wrong = sum(MATH.score(a["solution"], b["answer"])[1] for a, b in zip(rows, rows[1:]))
    assert wrong <= 3


@pytest.mark.parametrize("name", sorted(BUILTIN_FILES))
def test_packaged_data_sets_load_with_their_task(name):
    source = f"builtin:{name}"
    if name == "gsm8k-train":  # questions only
        return
    items = load_items(source)
    expected = {"gsm8k-dev": 400, "gsm8k-confirm": 400, "math500": 500, "agieval-math": 1000}[name]
    assert len(items) == expected
    if task_for(source).name == "math":
        assert {"level", "subject"} <= set(items[0].groups)
    licence = {"gsm8k": "LICENSE-GSM8K", "math500": "LICENSE-MATH500", "agieval-math": "LICENSE-AGIEVAL-MATH"}
    folder = Path(builtin_file(name)).parent
    assert "MIT" in (folder / licence[name.split("-")[0] if name.startswith("gsm8k") else name]).read_text()


def test_confirmation_split_shares_no_question_with_dev():
    dev = {it.question for it in load_items("builtin:gsm8k-dev")}
    assert not dev & {it.question for it in load_items("builtin:gsm8k-confirm")}


def test_agieval_solutions_score_1_against_their_answers():
    rows = [it for it in load_items("builtin:agieval-math", count=40)]
    with gzip.open(builtin_file("agieval-math"), "rt", encoding="utf-8") as fh:
        solutions = [json.loads(line)["solution"] for line, _ in zip(fh, range(40))]
    scored = sum(MATH.score(s, it.gold)[1] for s, it in zip(solutions, rows))
    assert scored >= 38  # math-verify's own reading of AGIEval's solutions: nearly all


def test_eval_on_math_reports_by_level_and_subject(tiny_model_dir, tmp_path, capsys):
    rows = [{"problem": "What is $1+1$?", "answer": "2", "level": 1, "subject": "Algebra"},
            {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "level": 2, "subject": "Algebra"},
            {"problem": "What is $3 \\cdot 3$?", "answer": "9", "level": 1, "subject": "Prealgebra"}]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ev"
    assert main(["--json", "eval", str(tiny_model_dir("llama")), "--data", str(data), "--task", "math",
                 "--max-new-tokens", "4", "-o", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "math" and summary["template"] == "math"
    assert summary["by_group"]["level"] == {"1": {"n": 2, "correct": summary["by_group"]["level"]["1"]["correct"]},
                                            "2": {"n": 1, "correct": summary["by_group"]["level"]["2"]["correct"]}}
    assert {k: v["n"] for k, v in summary["by_group"]["subject"].items()} == {"Algebra": 2, "Prealgebra": 1}
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["gold"] for p in predictions] == ["2", "\\frac{1}{2}", "9"]
    assert predictions[0]["question"] == "What is $1+1$?" and predictions[0]["level"] == 1


def test_a_math_file_read_as_gsm8k_is_refused_in_one_line(tmp_path, capsys):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"problem": "x", "answer": "\\frac{1}{2}"}) + "\n")
    assert main(["eval", "nothing", "--data", str(data), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--task" in err
