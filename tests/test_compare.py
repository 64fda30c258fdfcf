"""`compare` and `choose` on tiny models: arms equal separate evals, budgets from one generation equal
separate runs, Holm by hand, confirmation refused on seen questions, the report rendered from results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unlock_export.cli import main
from unlock_export.evaluation.compare import Arm, holm, render_report
from unlock_export.evaluation.run import mcnemar_exact
from unlock_export.method.vectors import SteeringVectors


@pytest.fixture
def math_set(tmp_path):
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a, b in
            [(2, 3), (10, 4), (7, 3), (9, 9), (1, 1), (6, 2)]]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def vectors_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({i: torch.randn(64, generator=g) * 3 for i in range(1, 4)}, 4, 64, model_hint="llama")
    return vectors.save(tmp_path / "v.safetensors")


def _rows(folder):
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]


def _key(rows):
    return [(r["index"], r["output"], r["output_tokens"], r["predicted"], r["correct"], r["cut"]) for r in rows]


def test_arms_and_budgets_equal_separate_evals(tiny_model_dir, math_set, vectors_file, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "cmp"
    common = ["--data", str(math_set), "--batch-size", "3"]
    assert main(["--json", "compare", model, "--arm", f"steered=additive:{vectors_file}@1.5",
                 "--arm", "cot=template:cot", "--max-new-tokens", "3,12", *common, "-o", str(out)]) == 0, \
        capsys.readouterr().err
    results = json.loads(capsys.readouterr().out)
    assert json.loads((out / "results.json").read_text()) == results
    separate = {
        "unsteered": [],
        "steered": ["--vectors", str(vectors_file), "--form", "additive", "--scale", "1.5"],
        "cot": ["--template", "cot"],
    }
    outputs = {}
    for arm, extra in separate.items():
        for budget in (3, 12):
            folder = tmp_path / f"ev-{arm}-{budget}"
            assert main(["--quiet", "eval", model, *common, "--max-new-tokens", str(budget), *extra,
                         "-o", str(folder)]) == 0
            rows = _rows(folder)
            outputs[arm, budget] = rows
            entry = next(e for e in results["table"] if e["arm"] == arm and e["budget"] == budget)
            assert entry["correct"] == sum(r["correct"] for r in rows) and entry["n"] == 6
            assert entry["mean_output_tokens"] == sum(r["output_tokens"] for r in rows) / 6
            assert entry["cut_rate"] == sum(r["cut"] for r in rows) / 6
        assert _key(outputs[arm, 12]) == _key(_rows(out / "arms" / arm))
    # the 3-token budget came from the 12-token answers' prefixes, and equals separate 3-token runs
    assert not any((out / "arms" / f"{arm}@3").exists() for arm in separate)
    assert any(r["cut"] for r in outputs["unsteered", 3]) and any(r["output_tokens"] > 3 for r in outputs["unsteered", 12])
    from unlock_export.evaluation.compare import budget_rows
    from unlock_export.evaluation.run import load_items
    from unlock_export.evaluation.tasks import task_for

    items = load_items(str(math_set))
    for arm in separate:
        assert _key(budget_rows(task_for(""), items, _rows(out / "arms" / arm), 3)) == _key(outputs[arm, 3])
    # the arms differ (else the comparison tests nothing)
    assert _key(outputs["steered", 12]) != _key(outputs["unsteered", 12]) != _key(outputs["cot", 12])
    # pairing against the baseline, Holm across the two arms at each budget
    for budget in (3, 12):
        base = {r["index"]: r["correct"] for r in outputs["unsteered", budget]}
        entries = [e for e in results["table"] if e["budget"] == budget and e["arm"] != "unsteered"]
        for e in entries:
            rows = outputs[e["arm"], budget]
            assert e["won"] == sum(r["correct"] and not base[r["index"]] for r in rows)
            assert e["lost"] == sum(base[r["index"]] and not r["correct"] for r in rows)
            assert e["p_mcnemar_exact"] == mcnemar_exact(e["won"], e["lost"])
        assert [e["p_holm"] for e in entries] == holm([e["p_mcnemar_exact"] for e in entries])
    assert results["title"].startswith("Development comparison")
    assert (out / "report.md").read_text() == render_report(results)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(that, 2 x 0.03), max(that, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == [0.2]
    assert holm([]) == []


def test_report_is_rendered_from_the_results(tmp_path):
    results = {"title": "Development comparison (x)", "model": "m", "baseline": "a", "task": "gsm8k",
               "request": {"data": "d", "offset": 0, "budgets": [8]},
               "questions": {"n": 4}, "multiple_comparisons": "Holm", "provenance": {"commit": None},
               "arms": [{"name": "a", "kind": "model", "value": None, "model": "m", "engine": "transformers",
                         "template": "direct", "wall_s": 1.0, "resumed_from": 2, "generation_s": 3.5},
                        {"name": "b", "kind": "template", "value": "cot", "model": "m", "engine": "transformers",
                         "template": "cot", "wall_s": 2.0, "resumed_from": 3}],
               "table": [{"arm": "a", "budget": 8, "n": 4, "correct": 1, "accuracy": 0.25, "ci95": [0.05, 0.7],
                          "mean_output_tokens": 7.0, "cut_rate": 0.5},
                         {"arm": "b", "budget": 8, "n": 4, "correct": 3, "accuracy": 0.75, "ci95": [0.3, 0.95],
                          "mean_output_tokens": 8.0, "cut_rate": 1.0, "won": 2, "lost": 0,
                          "p_mcnemar_exact": 0.5, "p_holm": 0.5}]}
    report = render_report(results)
    assert "| 8 | b | 3/4 = 75.0% | 30.0%-95.0% | 2 / 0 | 0.5 | 0.5 | 8 | 100% |" in report
    # a wall time is the last run's: an arm resumed from an earlier run's answers says over how many it ran
    # (or, where every chunk recorded it, the generation time of every answer, across runs)
    assert "| a | model | m | transformers | direct | 3.5 generating all 4 (1.0 in the last run, 2 resumed) |" in report
    assert "| b | template | cot | transformers | cot | 2.0 for the last 1 (3 resumed) |" in report
    results["arms"][0].update(resumed_from=0)
    assert "| a | model | m | transformers | direct | 1.0 |" in render_report(results)
    results["table"][1]["correct"] = 2
    assert "| 8 | b | 2/4" in render_report(results)


def test_confirmation_refuses_questions_the_choice_saw(tiny_model_dir, math_set, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    dev = tmp_path / "dev"
    base = ["--quiet", "compare", model, "--arm", "cot=template:cot", "--data", str(math_set), "--max-new-tokens", "2"]
    assert main([*base, "--count", "4", "-o", str(dev)]) == 0
    choice = tmp_path / "choice.json"
    assert main(["--quiet", "choose", str(dev), "cot", "-o", str(choice), "--note", "best on dev"]) == 0
    record = json.loads(choice.read_text())
    assert record["arm"]["name"] == "cot" and len(record["seen"]) == 4 and record["note"] == "best on dev"
    assert main(["choose", str(dev), "cot", "-o", str(choice)]) == 2  # recorded once, never replaced
    capsys.readouterr()
    # questions 3-5 overlap the choice's 0-3: refused in one line, nothing written
    refused = tmp_path / "refused"
    assert main([*base[1:], "--offset", "3", "--confirm", str(choice), "-o", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seen by the choice" in err and "index 3" in err
    assert not refused.exists()
    # questions 4-5 were never seen: a confirmation, with the pre-registration record in the results
    confirmed = tmp_path / "confirmed"
    assert main([*base, "--offset", "4", "--confirm", str(choice), "-o", str(confirmed)]) == 0
    results = json.loads((confirmed / "results.json").read_text())
    assert results["confirmation"] is True and results["title"].startswith("Confirmation of arm cot")
    assert results["preregistration"]["arm"]["name"] == "cot"
    # --allow-overlap runs, and its title says it is no confirmation
    overlap = tmp_path / "overlap"
    assert main([*base, "--offset", "3", "--confirm", str(choice), "--allow-overlap", "-o", str(overlap)]) == 0
    results = json.loads((overlap / "results.json").read_text())
    assert results["confirmation"] is False and results["title"].startswith("NOT A CONFIRMATION")
    assert results["overlap_with_choice"] == 1


def _interrupted_on_the_second_arm(args: list[str], monkeypatch) -> None:
    """Run `compare` with `args`, Ctrl-C arriving as its second arm starts; then undo the interruption."""
    import unlock_export.evaluation.run as run_mod

    real, calls = run_mod.run_eval, []

    def dies_on_the_second_arm(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as patched:
        patched.setattr(run_mod, "run_eval", dies_on_the_second_arm)
        assert main(args) != 0


def test_an_interrupted_comparison_resumes(tiny_model_dir, math_set, tmp_path, monkeypatch, capsys):
    model = str(tiny_model_dir("llama"))
    args = ["--quiet", "compare", model, "--arm", "cot=template:cot", "--data", str(math_set),
            "--max-new-tokens", "4", "--batch-size", "2"]
    whole = tmp_path / "whole"
    assert main([*args, "-o", str(whole)]) == 0
    cut = tmp_path / "cut"
    _interrupted_on_the_second_arm([*args, "-o", str(cut)], monkeypatch)
    first = (cut / "arms" / "unsteered" / "predictions.jsonl").stat().st_mtime_ns
    assert main([*args, "--arm", "x=template:plain", "-o", str(cut)]) == 2  # other arms: refused, not mixed
    assert "other arms or settings" in capsys.readouterr().err
    assert main([*args, "--where", "level=1", "-o", str(cut)]) == 2  # another selection: refused too
    plan = json.loads((cut / "compare.json").read_text())
    del plan["request"]["where"]  # a plan written before a setting existed resumes under its default
    (cut / "compare.json").write_text(json.dumps(plan))
    assert main([*args, "-o", str(cut)]) == 0
    assert (cut / "arms" / "unsteered" / "predictions.jsonl").stat().st_mtime_ns == first  # kept, not rerun
    for arm in ("unsteered", "cot"):
        assert _key(_rows(cut / "arms" / arm)) == _key(_rows(whole / "arms" / arm))
    a, b = (json.loads((d / "results.json").read_text())["table"] for d in (whole, cut))
    assert a == b


def test_arms_added_to_an_interrupted_comparison(tiny_model_dir, math_set, tmp_path, monkeypatch, capsys):
    """--add-arms continues an interrupted comparison with more arms: the arms it holds keep their answers
    (not rerun), the new arm equals a comparison that had it from the start, and results.json and the
    report say which arm joined. Without the flag, or with other settings, it is refused; with nothing to
    add to, too."""
    model = str(tiny_model_dir("llama"))
    args = ["--quiet", "compare", model, "--arm", "cot=template:cot", "--data", str(math_set),
            "--max-new-tokens", "4", "--batch-size", "2"]
    whole = tmp_path / "whole"
    assert main([*args, "--arm", "x=template:plain", "-o", str(whole)]) == 0
    cut = tmp_path / "cut"
    _interrupted_on_the_second_arm([*args, "-o", str(cut)], monkeypatch)
    first = (cut / "arms" / "unsteered" / "predictions.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--arm", "x=template:plain", "-o", str(cut)]) == 2
    assert "pass --add-arms to add these arms" in capsys.readouterr().err
    assert main([*args, "--arm", "x=template:plain", "--count", "3", "--add-arms", "-o", str(cut)]) == 2
    assert "other arms or settings" in capsys.readouterr().err  # another setting: no addition
    assert main([*args, "--arm", "x=template:plain", "--add-arms", "-o", str(cut)]) == 0
    assert (cut / "arms" / "unsteered" / "predictions.jsonl").stat().st_mtime_ns == first  # kept, not rerun
    for arm in ("unsteered", "cot", "x"):
        assert _key(_rows(cut / "arms" / arm)) == _key(_rows(whole / "arms" / arm))
    results = json.loads((cut / "results.json").read_text())
    assert results["table"] == json.loads((whole / "results.json").read_text())["table"]
    assert [a["arms"] for a in results["arms_added"]] == [["x"]]
    assert "Added to the comparison after it began" in (cut / "report.md").read_text()
    capsys.readouterr()
    assert main([*args, "--add-arms", "-o", str(tmp_path / "none")]) == 2
    assert "holds none" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--no-unsteered", "--arm", "a=template:cot"], "at least two arms"),
    (["--arm", "unsteered=template:cot"], "two arms are named 'unsteered'"),
    (["--arm", "bad name=template:cot"], "must be letters"),
    (["--arm", "p=paper:missing.safetensors"], "not found"),
    (["--arm", "p=paper:v.safetensors@x"], "is not a number"),
    (["--arm", "c=template:cot", "--allow-overlap"], "--confirm only"),
    (["--arm", "c=template:cot", "--max-new-tokens", "0,8"], "whole numbers"),
    (["--arm", "c=template:cot", "--baseline", "nope"], "is none of the arms"),
    (["--arm", "c=template:cot", "--confirm", "nothing.json"], "cannot read the choice record"),
])
def test_bad_arms_are_refused_in_one_line(tiny_model_dir, math_set, tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert main(["compare", str(tiny_model_dir("llama")), "--data", str(math_set), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (out / "results.json").exists()


def test_arm_specs_parse():
    assert Arm.parse("fold=out/model.gguf") == Arm("fold", "model", "out/model.gguf")
    assert Arm.parse("z=zoo:qwen2.5-coder-0.5b-instruct") == Arm("z", "model", "zoo:qwen2.5-coder-0.5b-instruct")
    assert Arm.parse("g=lora:adapter:0.5") == Arm("g", "lora", "adapter:0.5")
    assert Arm.parse("p=paper:v.safetensors@0.2") == Arm("p", "paper", "v.safetensors", 0.2)
    assert Arm.parse("cot=template:cot") == Arm("cot", "template", "cot")


def test_checked_in_compare_reports_are_their_results_rendered():
    from pathlib import Path

    reports = Path(__file__).resolve().parents[1] / "reports"
    results = sorted((reports / "results").glob("compare_*.json"))
    assert results, "reports/results holds a compare results file"
    for path in results:
        report = reports / (path.stem.replace("_", "-") + ".md")
        assert report.read_text() == render_report(json.loads(path.read_text())), report


def test_compare_a_run_takes_every_artifact_it_wrote(tiny_recipe, math_set, tmp_path, capsys):
    import yaml

    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "scale": 0.5, "alpha": 0.2}
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["--quiet", "run", str(path), str(run)]) == 0, capsys.readouterr().err
    out = tmp_path / "cmp"
    assert main(["--json", "compare", "--run", str(run), "--paper", "--arm", "cot=template:cot", "--data",
                 str(math_set), "--count", "3", "--max-new-tokens", "4", "-o", str(out)]) == 0, capsys.readouterr().err
    results = json.loads(capsys.readouterr().out)
    assert results["model"] == recipe["target"]["model"]  # the run's target, recorded in its summary
    arms = {a["name"]: a for a in results["arms"]}
    assert list(arms) == ["unsteered", "fold", "paper", "cot"]
    assert arms["fold"]["model"] == str(run / "model") and arms["fold"]["engine"] == "transformers"
    assert arms["paper"]["kind"] == "paper" and arms["paper"]["strength"] == 0.2  # the fold's alpha
    # the fold arm is the folded checkpoint as eval scores it
    assert main(["--quiet", "eval", str(run / "model"), "--data", str(math_set), "--count", "3",
                 "--max-new-tokens", "4", "-o", str(tmp_path / "ev")]) == 0
    assert _key(_rows(tmp_path / "ev")) == _key(_rows(out / "arms" / "fold"))


def test_compare_run_refusals(tmp_path, capsys):
    assert main(["compare", "--run", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "holds no run summary.json" in capsys.readouterr().err
    assert main(["compare", "m", "--paper", "--arm", "c=template:cot", "-o", str(tmp_path / "o")]) == 2
    assert "--paper adds the hooks" in capsys.readouterr().err
    assert main(["compare", "--arm", "c=template:cot", "-o", str(tmp_path / "o")]) == 2
    assert "pass MODEL" in capsys.readouterr().err


def test_a_recipe_evaluate_stage_compares_the_runs_outputs(tiny_recipe, math_set, tmp_path, capsys, monkeypatch):
    import yaml

    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "scale": 0.5, "alpha": 0.2}
    recipe["evaluate"] = {"data": str(math_set), "count": 3, "budgets": [2, 5], "arms": {"cot": "template:cot"}}
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", "--dry-run", str(path), str(tmp_path / "planned")]) == 0
    plan = capsys.readouterr().out
    assert "evaluate" in plan and "compare unsteered, model/, cot on 3 questions" in plan and "budgets 2, 5" in plan
    run = tmp_path / "run"
    import unlock_export.evaluation.run as run_mod

    real, calls = run_mod.run_eval, []

    def dies_on_the_third_arm(*a, **k):
        calls.append(a[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "run_eval", dies_on_the_third_arm)
    assert main(["--quiet", "run", str(path), str(run)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted") and f"'{run / 'compare'}'" in err and "--resume" in err
    assert (run / "summary.json").is_file() and not (run / "compare" / "results.json").exists()
    monkeypatch.setattr(run_mod, "run_eval", real)
    assert main(["--json", "run", "--resume", str(path), str(run)]) == 0  # the comparison only, resumed
    summary = json.loads(capsys.readouterr().out)
    results = json.loads((run / "compare" / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["unsteered", "fold", "cot"]
    assert summary["evaluate"]["title"] == results["title"] and len(summary["evaluate"]["table"]) == 6
    assert json.loads((run / "summary.json").read_text())["evaluate"] == summary["evaluate"]
    # the same as compare --run on the finished run
    assert main(["--quiet", "compare", "--run", str(run), "--arm", "cot=template:cot", "--data", str(math_set),
                 "--count", "3", "--max-new-tokens", "2,5", "-o", str(tmp_path / "cmp")]) == 0
    again = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert again["table"] == results["table"]


@pytest.mark.parametrize("evaluate,message", [
    ({"arms": {"bad name": "template:cot"}}, "must be letters"),
    ({"budgets": [256, 256]}, "distinct whole numbers"),
    ({"paper": True}, "add a fold step"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_evaluate_section_is_refused_before_anything_runs(tiny_recipe, tmp_path, capsys, evaluate, message):
    import yaml

    path, recipe = tiny_recipe
    recipe["evaluate"] = evaluate
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("report,results", [
    ("compare-dev-qwen1.5b-cot-prompt.md", "compare_dev_qwen1.5b_cot_prompt.json"),
    ("compare-dev-qwen1.5b-fold.md", "compare_dev_qwen1.5b_fold.json"),
    ("confirm-gsm8k.md", "confirm_gsm8k.json"),
    ("confirm-math500.md", "confirm_math500.json"),
])
def test_the_checked_in_comparison_reports_are_rendered_from_their_results(report, results):
    """reports/'s comparison reports are compare's own rendering of the results files beside them."""
    from unlock_export.evaluation.compare import render_report

    reports = Path(__file__).resolve().parents[1] / "reports"
    rendered = render_report(json.loads((reports / "results" / results).read_text()))
    assert (reports / report).read_text() == rendered
