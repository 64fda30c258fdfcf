"""scripts/render_report.py: reports rendered from results JSON, checked against the JSON with figures
computed here independently (Wilson bounds, exact McNemar p), and its --check mode."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "render_report.py"
REPORTS = REPO / "reports"


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("render_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


# -- independent statistics -----------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def mcnemar(won: int, lost: int) -> float:
    n = won + lost
    if n == 0:
        return 1.0
    k = min(won, lost)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


# -- a small results folder with the real files' structure -------------------------------------------

PROVENANCE = {"command": "scripts/eval_table.py --count 10", "commit": "0123456789abcdef0123456789abcdef01234567",
              "dirty": True, "versions": {"python": "3.12.1", "torch": "2.13.0", "transformers": "5.24.0", "peft": None,
                                          "gguf": "0.19.0", "unlock-export": "0.1.0"},
              "machine": {"platform": "Linux-x86_64", "processor": None, "machine": "x86_64", "cpu_count": 16,
                          "memory_gib": 125.7, "gpu": "NVIDIA H200"},
              "date": "2026-12-02T10:00:00+00:00"}


def run(indices: list[int], n: int, **extra) -> dict:
    return {"engine": "llamacpp", "n": n, "correct": len(indices), "accuracy": len(indices) / n,
            "ci95": [round(b, 4) for b in wilson(len(indices), n)], "correct_indices": indices,
            "mean_output_tokens": 200.25, "cut_rate": 0.3, "states_answer_rate": 0.4, "says_the_answer_is": 0.15,
            "wall_s": 90.0, **extra}


UNSTEERED = [0, 3, 7, 8, 12, 19]
PAPER = [0, 1, 2, 3, 5, 7, 11, 12, 13, 17, 19]
FOLDED = [1, 2, 3, 4, 6, 9, 10, 14, 15, 16, 18, 19, 21, 23]   # over 24 questions; 20 in the table


def forward_fixture() -> dict:
    table = {"unsteered": run(UNSTEERED, 20),
             "paper-form": run(PAPER, 20, engine="transformers", paired={"n": 20, "won": 6, "lost": 1,
                                                                            "p_mcnemar_exact": mcnemar(6, 1)}),
             "cot-prompt": run([0, 1, 2, 3, 4, 5, 7, 8], 20)}
    return {"target": "zoo:tiny", "vectors": "recipe tiny", "data": "builtin:gsm8k-dev", "template": "direct",
            "max_new_tokens": 256, "machine": "2 CPU cores, no GPU", "provenance": PROVENANCE,
            "calibration": {"scale": 0.25, "kl_to_reference": 1.5, "kl_unsteered_to_reference": 2.0,
                            "reference": {"form": "paper", "strength": 0.1}, "ppl_margin": 0.1, "prompts": 8,
                            "table": [{"scale": 0.0, "kl_to_reference": 2.0, "perplexity_ratio": 1.0, "allowed": True},
                                      {"scale": 0.25, "kl_to_reference": 1.5, "perplexity_ratio": 1.08, "allowed": True}]},
            "configs": {"unsteered": run(UNSTEERED, 20), "folded": run(FOLDED, 24)},
            "paired_against_unsteered": {"folded": {"n": 20, "won": 10, "lost": 4, "p_mcnemar_exact": mcnemar(10, 4)}},
            "table_200_questions": {"note": "a fixture", "configs": table}}


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "reports" / "results"
    folder.mkdir(parents=True)
    (folder / "eval_qwen0.5b_to_1.5b.json").write_text(json.dumps(forward_fixture(), indent=1))
    (folder / "capture.json").write_text(json.dumps({"provenance": PROVENANCE, "results": [
        {"method": m, "model": "zoo:tiny", "device": "cpu", "layers": 4, "prompts": 8, "tokens_per_prompt": 16,
         "batch": 4, "seconds": s, "tokens_per_s": round(128 / s, 1), "peak_activation_mib": mib,
         "memory_measure": "peak RSS delta"} for m, s, mib in (("ours", 2.0, 10.0), ("reference", 3.0, 90.0))]}))
    (folder / "serve.json").write_text(json.dumps({"model": "zoo:tiny", "repeats": 3, "configs": {
        "unsteered": {"prompt_tok_s": 50.0, "gen_tok_s": 10.0, "prompt_vs_unsteered": 1.0, "gen_vs_unsteered": 1.0},
        "folded": {"prompt_tok_s": 55.0, "gen_tok_s": 9.5, "prompt_vs_unsteered": 1.1, "gen_vs_unsteered": 0.95}}}))
    return folder


def tables(text: str) -> list[tuple[list[str], list[dict]]]:
    """Every markdown table of `text`: (headers, rows as {header: cell})."""
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            headers = split(block[0])
            found.append((headers, [dict(zip(headers, split(line))) for line in block[2:]]))
            block = []
    return found


def row(text: str, first_cell: str) -> dict:
    hits = [r for _, rows in tables(text) for r in rows if next(iter(r.values())).startswith(first_cell)]
    assert len(hits) == 1, f"{len(hits)} rows start with {first_cell!r}"
    return hits[0]


def section(text: str, heading: str) -> str:
    """The part of `text` under `heading`, up to the next heading of any level."""
    start = text.index(f"\n{heading}\n")
    rest = text[start + len(heading) + 2:]
    return rest[:rest.index("\n#")] if "\n#" in rest else rest


def assert_interval(cell_text: str, k: int, n: int) -> None:
    lo, hi = (float(x) for x in re.fullmatch(r"([\d.]+)-([\d.]+)%", cell_text).groups())
    want_lo, want_hi = wilson(k, n)
    assert abs(lo - 100 * want_lo) <= 0.05 + 1e-9 and abs(hi - 100 * want_hi) <= 0.05 + 1e-9


def assert_p(cell_text: str, p: float) -> None:
    shown = 1.0 if cell_text == "1" else float(cell_text)
    assert shown == pytest.approx(p, rel=0.05), (cell_text, p)


def gsm8k(rr, results) -> str:
    return rr.render(results, results.parent)[rr.GSM8K_REPORT]


# -- the tables against the JSON ----------------------------------------------------------------------

def test_200_question_rows_are_the_jsons_counts_with_independent_intervals_and_p(rr, results):
    text = section(gsm8k(rr, results), "### 20 questions (dev 0-19)")
    data = json.loads((results / "eval_qwen0.5b_to_1.5b.json").read_text())["table_200_questions"]["configs"]
    base = set(data["unsteered"]["correct_indices"])
    for name, r in data.items():
        cells = row(text, f"`{name}`")
        k, n = r["correct"], r["n"]
        assert cells["correct"] == f"{k}/{n}"
        assert cells["accuracy"] == f"{100 * k / n:.1f}%"
        assert_interval(cells["95% CI (Wilson)"], k, n)
        assert f"table_200_questions.configs.{name}" in cells["source"]
        assert cells["mean output tokens"] == "200" and cells["cut at the token limit"] == "30%"
        if name == "unsteered":
            assert cells["won / lost vs baseline"] == "-" and cells["McNemar p (exact)"] == "-"
            continue
        mine = set(r["correct_indices"])
        won, lost = len(mine - base), len(base - mine)  # over the same 20 questions
        assert cells["won / lost vs baseline"] == f"{won} / {lost}"
        assert_p(cells["McNemar p (exact)"], mcnemar(won, lost))
    assert row(text, "`paper-form`")["scale (the paper form: alpha)"] == "0.1"  # calibration.reference.strength


def test_a_bisected_calibration_grid_shows_every_row_and_what_it_did_not_measure(rr, results):
    """A search that bisects the guard leaves rows without a perplexity (inferred allowed) or without the
    objective (over the guard): each still gets its row, saying what was not measured."""
    path = results / "eval_qwen0.5b_to_1.5b.json"
    data = json.loads(path.read_text())
    data["calibration"]["table"] = [
        {"scale": 0.0, "kl_to_reference": 2.0, "perplexity": 5.0, "perplexity_ratio": 1.0, "allowed": True},
        {"scale": 0.125, "kl_to_reference": 1.75, "allowed": True, "guard": "inferred"},
        {"scale": 0.25, "kl_to_reference": 1.5, "perplexity": 5.4, "perplexity_ratio": 1.08, "allowed": True},
        {"scale": 0.5, "perplexity": 6.0, "perplexity_ratio": 1.2, "allowed": False}]
    path.write_text(json.dumps(data))
    grid = next(rows for headers, rows in tables(gsm8k(rr, results)) if "within the guard" in headers
                and rows[0]["scale"] == "0")
    assert [(r["scale"], r["KL to the paper form"], r["perplexity ratio"], r["within the guard"]) for r in grid] == [
        ("0", "2.000", "x1.000", "yes"), ("0.125", "1.750", "not measured (below an allowed scale)", "yes"),
        ("0.25", "1.500", "x1.080", "yes"), ("0.5", "not measured (over the guard)", "x1.200", "no")]


def test_a_run_recorded_over_more_questions_gets_a_row_for_the_tables_questions(rr, results):
    text = gsm8k(rr, results)
    rows = [r for _, rs in tables(text) for r in rs if next(iter(r.values())).startswith("`folded`")]
    assert [r["correct"] for r in rows] == [f"{len(FOLDED)}/24", f"{sum(i < 20 for i in FOLDED)}/20"]
    first = rows[1]
    k = sum(i < 20 for i in FOLDED)
    assert_interval(first["95% CI (Wilson)"], k, 20)
    won = len({i for i in FOLDED if i < 20} - set(UNSTEERED))
    lost = len(set(UNSTEERED) - set(FOLDED))
    assert (won, lost) == (10, 4)  # the fixture's recorded paired_against_unsteered.folded
    assert first["won / lost vs baseline"] == "10 / 4"
    assert_p(first["McNemar p (exact)"], mcnemar(10, 4))
    assert "correct_indices` in 0-19" in first["source"] and first["mean output tokens"] == "-"


def test_a_recorded_figure_that_disagrees_with_its_counts_stops_the_render(rr, results):
    path = results / "eval_qwen0.5b_to_1.5b.json"
    data = json.loads(path.read_text())
    data["table_200_questions"]["configs"]["paper-form"]["paired"]["won"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(rr.Inconsistent, match="paper-form"):
        rr.render(results, results.parent)
    assert rr.main(["--results", str(results), "--out", str(results.parent)]) == 2
    data["table_200_questions"]["configs"]["paper-form"]["paired"]["won"] = 6
    data["table_200_questions"]["configs"]["cot-prompt"]["ci95"] = [0.2, 0.6]  # not the Wilson interval of 8/20
    path.write_text(json.dumps(data))
    with pytest.raises(rr.Inconsistent, match="ci95"):
        rr.render(results, results.parent)


def test_the_header_says_what_provenance_each_input_has(rr, results):
    text = gsm8k(rr, results)
    assert text.startswith("_Generated by `python scripts/render_report.py`")
    inputs = row(text, "[`results/eval_qwen0.5b_to_1.5b.json`]")
    assert "commit `0123456789ab` with uncommitted changes" in inputs["provenance"]
    assert "2026-12-02T10:00:00+00:00" in inputs["provenance"] and "NVIDIA H200" in inputs["provenance"]
    assert "command `scripts/eval_table.py --count 10`" in inputs["provenance"]
    assert "absent" in row(text, "`eval_qwen1.5b_to_0.5b.json`")["provenance"]  # not in the fixture
    data = json.loads((results / "eval_qwen0.5b_to_1.5b.json").read_text())
    del data["provenance"]
    (results / "eval_qwen0.5b_to_1.5b.json").write_text(json.dumps(data))
    again = row(gsm8k(rr, results), "[`results/eval_qwen0.5b_to_1.5b.json`]")["provenance"]
    assert again.startswith("provenance not recorded") and "commit" not in again


def test_every_table_names_its_source(rr, results):
    checked_in = [(REPORTS / name).read_text() for name in (rr.GSM8K_REPORT, rr.PERFORMANCE_REPORT)]
    for text in [*rr.render(results, results.parent).values(), *checked_in]:
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
        assert len(starts) > 3
        for i in starts:
            end = next(j for j in range(i, len(lines) + 1) if j == len(lines) or not lines[j].startswith("|"))
            after = next((line for line in lines[end:] if line.strip()), "")
            if lines[i].startswith("| results file | provenance |"):
                continue  # the inputs table itself
            assert after.startswith("Source: [`") and ".json`](" in after, lines[i]
            if "| source |" in lines[i] or lines[i].rstrip().endswith("| source |"):
                keys = [row.rsplit("|", 2)[-2].strip() for row in lines[i + 2:end]]
                assert all(k.startswith("`") or k.startswith("sum of") for k in keys), keys


def test_performance_from_the_new_file_layout(rr, results):
    text = rr.render(results, results.parent)[rr.PERFORMANCE_REPORT]
    assert text.startswith("_Generated by `python scripts/render_report.py`")
    ours = row(text, "`ours`")
    assert ours["tokens/s"] == "64.0" and ours["peak activation memory"] == "10.0 MiB" and ours["source"] == "`results[0]`"
    assert row(text, "peak activation memory, `reference`")["value"] == "9.0x"
    assert row(text, "`folded`")["vs unsteered (prompt / generation)"] == "1.10 / 0.95"
    assert "absent" in row(text, "`export.json`")["provenance"]


def test_rendering_is_deterministic(rr, results):
    assert rr.render(results, results.parent) == rr.render(results, results.parent)


@pytest.mark.parametrize("p, shown", [(0.10478948, "0.10"), (0.0037937, "0.0038"), (1.0, "1"), (0.99971, "1"),
                                      (1.9698e-06, "2.0e-06"), (0.0999, "0.10"), (0.5257, "0.53")])
def test_p_values_are_written_with_two_significant_digits(rr, p, shown):
    assert rr.pvalue(p) == shown


def test_percentages_round_half_up(rr):
    assert rr.pct(0.345, 0) == "35%" and rr.pct(0.665, 0) == "67%" and rr.pct(0.3125) == "31.3%"


# -- --check -----------------------------------------------------------------------------------------

def test_check_passes_on_the_checked_in_reports(rr, capsys):
    assert rr.main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_naming_a_modified_or_missing_report(rr, tmp_path, capsys):
    copy = tmp_path / "reports"
    shutil.copytree(REPORTS, copy)
    args = ["--check", "--results", str(copy / "results"), "--out", str(copy)]
    assert rr.main(args) == 0  # an unchanged copy is current
    report = copy / rr.GSM8K_REPORT
    report.write_text(report.read_text().replace("41.0%", "42.0%", 1))
    capsys.readouterr()
    assert rr.main(args) == 1
    err = capsys.readouterr().err
    assert rr.GSM8K_REPORT in err and rr.PERFORMANCE_REPORT not in err
    (copy / rr.PERFORMANCE_REPORT).unlink()
    assert rr.main(args) == 1
    assert rr.PERFORMANCE_REPORT in capsys.readouterr().err
    assert rr.main(["--results", str(copy / "results"), "--out", str(copy)]) == 0  # rewrite
    assert rr.main(args) == 0
    assert report.read_text() == (REPORTS / rr.GSM8K_REPORT).read_text()


def test_the_checked_in_reports_cover_the_published_tables(rr):
    text = (REPORTS / rr.GSM8K_REPORT).read_text()
    data = json.loads((REPORTS / "results" / "eval_qwen0.5b_to_1.5b.json").read_text())
    fold = data["table_200_questions"]["configs"]["folded-answer-key"]
    forward = text.split("## 1.5B -> 0.5B", 1)[0]
    cells = row(forward, "`folded-answer-key`: UNLOCK folded")
    assert cells["correct"] == f"{fold['correct']}/{fold['n']}" == "82/200"
    assert_interval(cells["95% CI (Wilson)"], 82, 200)
    assert cells["won / lost vs baseline"] == "41 / 18"
    assert_p(cells["McNemar p (exact)"], mcnemar(41, 18))
    assert "## Not traceable to a results file" in text


# -- the README's results block ----------------------------------------------------------------------

def test_the_readme_demo_sentence_is_rendered_from_demo_json(rr, tmp_path):
    """benchmarks/demo.py's file gives every figure of the README's demo sentence; the README's is current."""
    doc = json.loads((REPO / "reports" / "results" / "demo.json").read_text())
    doc.update(run_wall_s=600.0, peak_rss_gib=7.25, scale=0.3333, written_bytes=2_500_000_000)
    doc["timings_s"]["calibrate_s"] = 90.0
    results = tmp_path / "results"
    results.mkdir()
    (results / rr.DEMO).write_text(json.dumps(doc))
    block = " ".join(rr.readme_demo(results).split())
    assert block.startswith(rr.DEMO_START) and block.endswith(rr.DEMO_END)
    for figure in ("10.0 min", "label-free calibration 1.5", "peak memory 7.2 GiB", "2.50 GB written",
                   "the scale 0.3333"):
        assert figure in block, figure
    current = (REPO / "README.md").read_text()
    assert rr.readme_with_results(current, rr.readme_demo(), rr.DEMO_START, rr.DEMO_END) == current


def test_the_gated_lora_section_pairs_each_row_from_its_indices(rr, tmp_path):
    """experiments/gated_lora_table.py's file: each 512-token row's won / lost against unsteered, the gated
    LoRA against the paper form, the 256-token rows against the recorded runs, and the rows it lacks."""
    gated, answer = [0, 1, 3, 7, 8, 9, 12, 15], [2, 3, 4, 7, 12]
    fit = {"multiplier": 0.59, "fit_prompts": 32, "rank": 1, "ridge": 0.01, "alpha": 0.1,
           "closeness": {"prompts": 8, "unsteered": 9.2, "gated": {"kl": 2.7, "multiplier": 0.59},
                         "bias": {"scale": 0.088, "kl": 7.7}}}
    doc = {"count": 20, "target": "zoo:t", "alpha": 0.1, "answer_key_scale": 0.42, "gate_fit": fit,
           "tokens_512": {"configs": {"unsteered": run(UNSTEERED, 20), "gated-lora": run(gated, 20),
                                      "paper-form": run(PAPER, 20, engine="transformers")}},
           "tokens_256": {"configs": {"gated-lora": run(answer, 20)},
                          "recorded": {"unsteered": run(UNSTEERED, 20), "paper-form": run(PAPER, 20)}},
           "missing": ["folded-answer-key at 512 tokens"]}
    results = tmp_path / "results"
    results.mkdir()
    (results / rr.specs.GATED_LORA).write_text(json.dumps(doc))
    text = rr.render(results, tmp_path)[rr.GSM8K_REPORT]
    long = section(text, "### 512 new tokens")
    cells = row(long, "`gated-lora`")
    won, lost = len(set(gated) - set(UNSTEERED)), len(set(UNSTEERED) - set(gated))
    assert cells["correct"] == "8/20" and cells["won / lost vs baseline"] == f"{won} / {lost}"
    assert_p(cells["McNemar p (exact)"], mcnemar(won, lost))
    versus = [r for _, rows in tables(long) for r in rows if r.get("A") == "gated-lora" and r.get("B") == "paper-form"]
    assert versus and versus[0]["A only (won)"] == str(len(set(gated) - set(PAPER)))
    short = section(text, "### 256 new tokens")
    assert row(short, "`gated-lora`")["won / lost vs baseline"] == \
        f"{len(set(answer) - set(UNSTEERED))} / {len(set(UNSTEERED) - set(answer))}"
    assert "folded-answer-key at 512 tokens" in text and "2.700" in text


def _confirmation(arms: dict[str, list[int]], n: int, budget: int = 256) -> dict:
    """A compare results file of a confirmation: each arm's correct indices over n questions at one
    budget, paired against unsteered with this file's own McNemar p and Holm's adjustment by hand."""
    base = set(arms["unsteered"])
    table = []
    for name, indices in arms.items():
        entry = {"arm": name, "budget": budget, "n": n, "correct": len(indices), "accuracy": len(indices) / n,
                 "ci95": [round(b, 4) for b in wilson(len(indices), n)], "mean_output_tokens": 300.0, "cut_rate": 0.25}
        if name != "unsteered":
            entry.update(won=len(set(indices) - base), lost=len(base - set(indices)))
            entry["p_mcnemar_exact"] = mcnemar(entry["won"], entry["lost"])
        table.append(entry)
    paired = sorted((e for e in table if "won" in e), key=lambda e: e["p_mcnemar_exact"])
    running = 0.0
    for i, e in enumerate(paired):  # Holm's step-down: (m - i) p, kept monotone, capped at 1
        running = max(running, min(1.0, (len(paired) - i) * e["p_mcnemar_exact"]))
        e["p_holm"] = running
    return {"title": "Confirmation of arm fold", "confirmation": True, "request": {"budgets": [budget]},
            "table": table, "arms_added": [{"arms": ["gated"], "date": "2026-12-07T18:30:00+00:00"}],
            "preregistration": {"arm": {"name": "fold"}, "recorded": "2026-12-06T22:54:05+00:00",
                                "provenance": {"commit": "d7d180160e8d2986"}}}


def test_the_readme_confirmation_is_rendered_from_the_confirmations_results(rr, tmp_path):
    """Every arm's row: its counts, Wilson interval, won / lost, McNemar p and Holm p computed here; the
    pre-registration and the arm added later are named. A Holm p that disagrees with the counts stops the
    render; a comparison that is no confirmation is refused; without the file the block says the
    confirmation is not finished. The README's block is current."""
    arms = {"unsteered": [0, 3, 7, 8, 12, 19], "fold": [0, 1, 2, 3, 5, 7, 9, 11, 12, 13, 17],
            "cot": [0, 3, 7, 8, 12, 19, 4], "gated": [3, 8]}
    results = tmp_path / "results"
    results.mkdir()
    gsm8k, math500 = rr.specs.CONFIRMATIONS
    pending = " ".join(rr.readme_confirmation(results).split())
    assert pending.count("is not finished") == 2 and rr.CONFIRM_START in pending and rr.CONFIRM_END in pending
    assert f"reports/results/{gsm8k.kept}/" in pending and f"reports/results/{math500.kept}/" in pending
    doc = _confirmation(arms, 20)
    (results / gsm8k.results).write_text(json.dumps(doc))
    block = rr.readme_confirmation(results)
    assert block.count("is not finished") == 1  # MATH-500's, which has no results here
    assert block.index("**GSM8K**") < block.index("| 256 ") < block.index("**MATH-500")
    rows = [line for line in block.splitlines() if line.startswith("| 256 ")]
    assert len(rows) == 4
    holm_by_arm = {e["arm"]: e.get("p_holm") for e in doc["table"]}
    for (name, indices), row in zip(arms.items(), rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        lo, hi = wilson(len(indices), 20)
        assert cells[2] == f"{len(indices)}/20" and cells[3] == f"{len(indices) / 20:.1%} ({lo:.1%}-{hi:.1%})"
        if name == "unsteered":
            assert cells[4] == "-"
            continue
        won, lost = len(set(indices) - set(arms["unsteered"])), len(set(arms["unsteered"]) - set(indices))
        m = re.fullmatch(r"(\d+) / (\d+), p = (\S+), Holm (\S+)", cells[4])
        assert m and (int(m[1]), int(m[2])) == (won, lost), cells[4]
        assert math.isclose(float(m[3]), mcnemar(won, lost), rel_tol=0.05)
        assert math.isclose(float(m[4]), holm_by_arm[name], rel_tol=0.05)
    flat = " ".join(block.split())
    assert "Pre-registered arm: fold, recorded 2026-12-06 at commit d7d180160e8d" in flat
    assert "Added after the comparison began (2026-12-07): gated." in flat
    doc["table"][1]["p_holm"] = doc["table"][1]["p_mcnemar_exact"]  # unadjusted, where three arms were paired
    (results / gsm8k.results).write_text(json.dumps(doc))
    with pytest.raises(rr.Inconsistent, match="Holm"):
        rr.readme_confirmation(results)
    (results / gsm8k.results).write_text(json.dumps(_confirmation(arms, 20)))
    (results / math500.results).write_text(json.dumps({**_confirmation(arms, 20), "confirmation": False}))
    with pytest.raises(SystemExit, match="not a confirmation"):
        rr.readme_confirmation(results)
    # the block replaces what stands between the markers, and nothing else
    text = f"# title\n\n{rr.CONFIRM_START}\nold\n{rr.CONFIRM_END}\n\ntail\n"
    assert rr.readme_with_results(text, block, rr.CONFIRM_START, rr.CONFIRM_END) == f"# title\n\n{block}\n\ntail\n"
    current = (REPO / "README.md").read_text()
    assert rr.readme_with_results(current, rr.readme_confirmation(), rr.CONFIRM_START, rr.CONFIRM_END) == current
