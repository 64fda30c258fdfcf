"""Evaluation end to end on tiny models, and label-free calibration on a case with a known answer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors


@pytest.fixture
def math_set(tmp_path):
    rows = [{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 10 minus 4?", "answer": "#### 6"},
            {"question": "What is 7 times 3?", "answer": 21},
            {"question": "What is 9 plus 9?", "answer": "18"}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vectors(layers=4, hidden=64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors({i: torch.randn(hidden, generator=g) * scale for i in range(1, layers)}, layers, hidden,
                           model_hint="llama")


@pytest.mark.parametrize("steer", [None, "paper", "additive"])
def test_eval_transformers_writes_predictions_and_summary(steer, tiny_model_dir, math_set, tmp_path, capsys):
    model = tiny_model_dir("llama")
    out = tmp_path / "ev"
    args = ["--json", "eval", str(model), "--data", str(math_set), "--max-new-tokens", "6", "--batch-size", "3",
            "-o", str(out)]
    if steer:
        args += ["--vectors", str(_vectors().save(tmp_path / "v.safetensors")), "--form", steer,
                 *(["--alpha", "0.5"] if steer == "paper" else ["--scale", "2"])]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n"] == 4
    assert [r["gold"] for r in rows] == ["5", "6", "21", "18"]
    assert summary["correct"] == sum(r["correct"] for r in rows)
    assert 0 <= summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1] <= 1
    # tokens before the answer's end (an answer whose first token ends it is empty: 0)
    assert all(0 <= r["output_tokens"] <= 6 for r in rows)
    assert all(r["cut"] == (r["output_tokens"] == 6) for r in rows)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (summary["steering"] or {}).get("form") == steer
    # results are never overwritten silently
    assert main(args) == 2


def test_eval_steering_changes_outputs(tiny_model_dir, math_set, tmp_path, capsys):
    model = tiny_model_dir("llama")
    outputs = {}
    for name, extra in [("plain", []), ("steered", ["--vectors", str(_vectors(scale=3).save(tmp_path / "v.safetensors")),
                                                    "--form", "additive", "--scale", "1"])]:
        assert main(["--quiet", "eval", str(model), "--data", str(math_set), "--max-new-tokens", "6",
                     "-o", str(tmp_path / name), *extra]) == 0
        outputs[name] = [json.loads(x)["output"] for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    assert outputs["plain"] != outputs["steered"]


def test_each_form_takes_its_own_word_and_the_old_strength_is_gone(tiny_model_dir, math_set, tmp_path, capsys):
    """--scale is the additive form's strength, --alpha the paper form's; --strength (never released) is gone."""
    model = tiny_model_dir("llama")
    vec = str(_vectors(scale=3).save(tmp_path / "v.safetensors"))
    common = ["eval", str(model), "--data", str(math_set), "--max-new-tokens", "6", "--vectors", vec]
    for form, word in (("additive", "--scale"), ("paper", "--alpha")):
        assert main(["--quiet", *common, "--form", form, word, "0.7", "-o", str(tmp_path / f"{form}-new")]) == 0
        steering = json.loads((tmp_path / f"{form}-new" / "summary.json").read_text())["steering"]
        assert steering[word[2:]] == 0.7 and "strength" not in steering
    capsys.readouterr()
    assert main(["--quiet", *common, "--strength", "0.7", "-o", str(tmp_path / "old")]) == 2
    assert "No such option '--strength'" in capsys.readouterr().err and not (tmp_path / "old").exists()


def test_paired_comparison_exact_mcnemar():
    from unlock_export.errors import UserError
    from unlock_export.evaluation.run import paired_comparison

    def rows(correct):
        return [{"index": i, "correct": c} for i, c in enumerate(correct)]

    # 15 questions won, 3 lost, 46 tied: two-sided exact p = 2 * P(X <= 3 | n=18, 1/2) = 2 * 988 / 2**18
    base = rows([False] * 15 + [True] * 3 + [True] * 10 + [False] * 36)
    ours = rows([True] * 15 + [False] * 3 + [True] * 10 + [False] * 36)
    paired = paired_comparison(ours, base)
    assert (paired["n"], paired["won"], paired["lost"]) == (64, 15, 3)
    assert paired["p_mcnemar_exact"] == pytest.approx(2 * 988 / 2 ** 18)
    assert paired["baseline_accuracy"] == pytest.approx(13 / 64)
    assert paired_comparison(base, base)["p_mcnemar_exact"] == 1.0          # no discordant pair
    assert paired_comparison(ours, base)["p_mcnemar_exact"] == paired_comparison(base, ours)["p_mcnemar_exact"]
    assert paired_comparison(rows([True] * 6), rows([False] * 6))["p_mcnemar_exact"] == pytest.approx(2 / 64)
    with pytest.raises(UserError, match="lacks 1 of these questions"):
        paired_comparison(rows([True] * 3), rows([True] * 2))


def test_eval_against_a_baseline(tiny_model_dir, math_set, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    common = ["eval", model, "--data", str(math_set), "--max-new-tokens", "6"]
    assert main(["--quiet", *common, "-o", str(tmp_path / "plain")]) == 0
    steer = ["--vectors", str(_vectors(scale=3).save(tmp_path / "v.safetensors")), "--form", "additive",
             "--scale", "1"]
    assert main(["--json", *common, *steer, "--baseline", str(tmp_path / "plain"), "-o", str(tmp_path / "s")]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in (tmp_path / "s" / "predictions.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    won = sum(r["correct"] and not b["correct"] for r, b in zip(rows, base))
    lost = sum(b["correct"] and not r["correct"] for r, b in zip(rows, base))
    assert (summary["paired"]["won"], summary["paired"]["lost"], summary["paired"]["n"]) == (won, lost, 4)
    assert summary["cut_rate"] == sum(r["output_tokens"] >= 6 for r in rows) / 4 == sum(r["cut"] for r in rows) / 4
    assert summary["states_answer_rate"] == sum(r["states_answer"] for r in rows) / 4
    # a baseline over other questions, or no run at all, is refused before anything runs
    assert main(["--quiet", *common, "--count", "4", "--baseline", str(tmp_path / "nothing"),
                 "-o", str(tmp_path / "x")]) == 2
    assert "holds no predictions.jsonl" in capsys.readouterr().err
    assert main(["--quiet", "eval", model, "--data", str(math_set), "--count", "2", "-o", str(tmp_path / "two")]) == 0
    assert main(["--quiet", *common, "--baseline", str(tmp_path / "two"), "-o", str(tmp_path / "y")]) == 2
    assert "lacks 2 of these questions" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_eval_bad_input(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no number"}) + "\n")
    model = str(tiny_model_dir("llama"))
    assert main(["eval", model, "--data", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "is not a number" in capsys.readouterr().err
    assert main(["eval", model, "--data", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert main(["eval", model, "--data", str(good), "--engine", "llamacpp", "-o", str(tmp_path / "o")]) == 2
    assert "GGUF" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_recovers_a_known_scale(load_tiny, questions):
    """Reference = the additive form itself at scale 3: the KL minimum must be exactly there."""
    from unlock_export.evaluation.calibrate import search_scale
    from unlock_export.prompts import apply_template

    loaded = load_tiny("llama")
    vectors = _vectors()
    result = search_scale(loaded, vectors, apply_template("direct", questions[:8]), questions[:8],
                             reference_form="additive", reference_strength=3.0,
                             scales=(0.5, 1.0, 2.0, 3.0, 4.0, 8.0), ppl_margin=100.0)
    assert result.scale == 3.0 and result.kl_to_reference < 1e-9
    kls = {r["scale"]: r["kl_to_reference"] for r in result.table}
    assert kls[2.0] > 0 and kls[4.0] > 0 and result.kl_unsteered_to_reference > kls[2.0]
    # a zero perplexity margin rules out every scale that raises perplexity
    strict = search_scale(loaded, vectors, apply_template("direct", questions[:8]), questions[:8],
                             reference_form="additive", reference_strength=3.0, scales=(1.0, 3.0, 8.0),
                             ppl_margin=0.0, refine=False)
    assert all(r["allowed"] == (r["perplexity_ratio"] <= 1.0) for r in strict.table)
    allowed = [r for r in strict.table if r["allowed"]]
    # the chosen scale is the allowed one closest to the reference (none allowed: the unsteered model)
    assert strict.scale == (min(allowed, key=lambda r: r["kl_to_reference"])["scale"] if allowed else 0.0)


def test_calibration_bisects_the_guard_or_measures_in_ascending_order(load_tiny, questions):
    """Scales run in ascending order whatever order they are given in: stop_after_rejected=0 measures every
    scale, 2 stops once two in a row fail the perplexity guard. The default (1: perplexity grows with the
    scale) finds the guard's boundary by bisection: perplexity measured at about log2(scales) of them (and
    at the chosen one), the objective at every allowed scale and nowhere else, measured rows equal to the
    full search's, and the same choice."""
    import math

    from unlock_export.evaluation.calibrate import search_scale
    from unlock_export.prompts import apply_template

    loaded = load_tiny("llama")
    texts = apply_template("direct", questions[:6])
    scales = (64.0, 0.5, 16.0, 2.0, 32.0, 1.0, 8.0, 4.0)
    kwargs = dict(reference_form="additive", reference_strength=3.0, scales=scales, refine=False)
    every = search_scale(loaded, _vectors(), texts, questions[:6], ppl_margin=0.0, stop_after_rejected=0, **kwargs)
    assert [r["scale"] for r in every.table] == sorted(scales)
    allowed = [r["allowed"] for r in every.table]
    two = next(i for i in range(1, len(allowed)) if not allowed[i - 1] and not allowed[i])
    patient = search_scale(loaded, _vectors(), texts, questions[:6], ppl_margin=0.0, stop_after_rejected=2, **kwargs)
    assert two < len(scales) - 1 and patient.table == every.table[:two + 1]  # the case stops early

    ratios = [r["perplexity_ratio"] for r in every.table]
    assert ratios == sorted(ratios)  # the premise: perplexity grows with the scale here
    margin = (ratios[4] + ratios[5]) / 2 - 1  # the guard's boundary between the 5th and 6th scale
    full = search_scale(loaded, _vectors(), texts, questions[:6], ppl_margin=margin, stop_after_rejected=0, **kwargs)
    bisected = search_scale(loaded, _vectors(), texts, questions[:6], ppl_margin=margin, **kwargs)
    assert bisected.scale == full.scale and bisected.kl_to_reference == full.kl_to_reference
    rows = {r["scale"]: r for r in full.table}
    guarded = [r for r in bisected.table if "perplexity" in r]
    assert len(guarded) <= math.ceil(math.log2(len(scales) + 1)) + 1
    for row in bisected.table:
        assert all(row[k] == rows[row["scale"]][k] for k in row if k != "guard")
        assert ("kl_to_reference" in row) == row["allowed"]  # the objective only where allowed
        assert row["allowed"] == rows[row["scale"]]["allowed"]
        if row.get("guard") == "inferred":
            assert "perplexity" not in row and any(r["allowed"] and r["scale"] > row["scale"] for r in guarded)
    assert "perplexity" in next(r for r in bisected.table if r["scale"] == bisected.scale)


def test_the_search_finds_the_closest_scale_past_a_plateau():
    """The objective need not have one minimum: the gated LoRA's multiplier search on the zoo 1.5B
    (reports/results/confirm_gsm8k_gated/unlock.json) met a plateau (KL 4.49, 4.49, 4.46 at 1, 1.41, 2)
    above its minimum (2.69 at 0.5946). Every allowed grid scale is measured, so a plateau does not hide
    the minimum (a search that stopped where the objective first rose, coming down from the largest
    scale, chose 2.0)."""
    from unlock_export.evaluation.calibrate import _Grid, _search

    kl = {0.0: 9.08, 0.25: 7.27, 0.353553: 6.48, 0.5: 4.73, 0.5946: 2.69, 0.707107: 2.75, 0.8409: 3.55, 1.0: 4.49,
          1.414214: 4.486, 2.0: 4.464, 2.828427: 7.96, 4.0: 9.75}
    grid = _Grid(lambda s: {"kl_to_reference": kl.get(s, 5.0)}, lambda s: 1.0, 1.0, 0.10, "kl_to_reference",
                 False)  # 5.0: a refinement point the table does not hold
    grid.rows[0.0] = {"scale": 0.0, "kl_to_reference": kl[0.0], "perplexity": 1.0, "perplexity_ratio": 1.0,
                      "allowed": True}
    _search(grid, (0.0, 0.25, 0.353553, 0.5, 0.707107, 1.0, 1.414214, 2.0, 2.828427, 4.0), True, 1)
    assert min(grid.allowed(), key=grid.closeness) == 0.5946


def _count_forwards(monkeypatch, loaded) -> list:
    calls = []
    forward = loaded.model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", counted)
    return calls


def test_what_does_not_depend_on_the_scale_is_measured_once(load_tiny, questions, monkeypatch):
    """A search given its baseline runs two passes per scale it measures (answer start, perplexity) and
    none for scale 0 (the unsteered model is the baseline's); without one it measures the baseline first:
    the reference, the unsteered answer start and the unsteered perplexity, one pass each."""
    from unlock_export.evaluation import calibrate
    from unlock_export.evaluation.calibrate import measure_baseline, search_scale
    from unlock_export.prompts import apply_template

    monkeypatch.setattr(calibrate, "CPU_BATCH_TOKENS", 10**6)  # one batch per pass: a pass is one forward
    loaded = load_tiny("llama")
    texts = apply_template("direct", questions[:6])
    kwargs = dict(reference_form="paper", reference_strength=0.1, scales=(0.0, 0.5, 1.0, 2.0), ppl_margin=100.0,
                  refine=False, batch_size=8, stop_after_rejected=0)
    calls = _count_forwards(monkeypatch, loaded)
    alone = search_scale(loaded, _vectors(), texts, questions[:6], **kwargs)
    assert len(calls) == 3 + 2 * 3
    baseline = measure_baseline(loaded, _vectors(), texts, questions[:6], "paper", 0.1, batch_size=8)
    calls.clear()
    shared = search_scale(loaded, _vectors(), texts, questions[:6], baseline=baseline, **kwargs)
    assert len(calls) == 2 * 3
    assert shared.table == alone.table and shared.scale == alone.scale
    assert alone.table[0]["perplexity_ratio"] == 1.0 and alone.table[0]["kl_to_reference"] == \
        alone.kl_unsteered_to_reference
    with pytest.raises(ValueError):
        search_scale(loaded, _vectors(), texts[:3], questions[:3], baseline=baseline, **kwargs)


def test_the_alpha_checks_generations_give_the_calibrations_baseline(load_tiny, questions, monkeypatch):
    """check_alphas' greedy generations compute the unsteered and the paper form's answer-start
    distributions in their prefill: the baseline built from them equals the one measured directly, and
    the calibration is the same."""
    from unlock_export.evaluation import calibrate
    from unlock_export.evaluation.calibrate import check_alphas, measure_baseline, search_scale
    from unlock_export.prompts import apply_template

    monkeypatch.setattr(calibrate, "CPU_BATCH_TOKENS", 10**6)  # one batch per pass: a pass is one forward
    loaded = load_tiny("llama")
    texts = apply_template("direct", questions[:8])
    vectors = _vectors()
    answer_start: dict = {}
    check_alphas(loaded, vectors, texts, (0.1,), tokens=8, batch_size=8, answer_start=answer_start)
    assert sorted(map(str, answer_start)) == ["0.1", "texts", "unsteered"]
    direct = measure_baseline(loaded, vectors, texts, questions[:8], "paper", 0.1, batch_size=8)
    calls = _count_forwards(monkeypatch, loaded)
    reused = measure_baseline(loaded, vectors, texts, questions[:8], "paper", 0.1, batch_size=8, known=answer_start)
    assert len(calls) == 1  # the perplexity only
    assert torch.allclose(reused.reference, direct.reference, atol=1e-4)
    assert torch.allclose(reused.plain, direct.plain, atol=1e-4)
    assert (reused.reference - reused.plain).abs().max() > 1e-3  # the paper form changes the answer start
    calls.clear()  # recorded on other prompts: measured again, not reused
    measure_baseline(loaded, vectors, texts[:4], questions[:4], "paper", 0.1, batch_size=8, known=answer_start)
    assert len(calls) == 3
    kwargs = dict(reference_form="paper", reference_strength=0.1, ppl_margin=0.5, batch_size=8)
    a = search_scale(loaded, vectors, texts, questions[:8], baseline=direct, **kwargs)
    b = search_scale(loaded, vectors, texts, questions[:8], baseline=reused, **kwargs)
    assert a.scale == b.scale and abs(a.kl_to_reference - b.kl_to_reference) < 1e-4


def test_calibration_of_a_band_keeps_the_full_reference(load_tiny, questions):
    """additive_layers restricts only the additive form: with the other layers' vectors zero the band
    recovers the known scale exactly; with another layer non-zero the reference still holds it."""
    from unlock_export.evaluation.calibrate import search_scale
    from unlock_export.prompts import apply_template

    loaded = load_tiny("llama")
    texts = apply_template("direct", questions[:6])
    full = _vectors()
    zero = torch.zeros(full.hidden_size)
    only_two = SteeringVectors({1: zero, 2: full.directions[2], 3: zero}, 4, full.hidden_size)
    kwargs = dict(reference_form="additive", reference_strength=3.0, scales=(1.0, 2.0, 3.0, 4.0), ppl_margin=100.0,
                  refine=False, additive_layers=[2])
    exact = search_scale(loaded, only_two, texts, questions[:6], **kwargs)
    assert exact.scale == 3.0 and exact.kl_to_reference < 1e-9
    assert exact.layers == [2] and exact.reference["layers"] == [1, 2, 3]
    kept = search_scale(loaded, SteeringVectors({**only_two.directions, 1: full.directions[1]}, 4, full.hidden_size),
                           texts, questions[:6], **kwargs)
    assert min(r["kl_to_reference"] for r in kept.table) > 1e-6


def test_continuation_objective(load_tiny, questions):
    """Teacher-forced scoring is independent of padding and batch size and agrees with the
    answer-start pass; the paper form's own continuations are likelier under the additive form at
    the reference's scale than unsteered."""
    from unlock_export.evaluation.calibrate import (
        answer_start_logprobs,
        continuation_logprobs,
        greedy_continuations,
        search_scale,
    )
    from unlock_export.method.steer import steering
    from unlock_export.prompts import apply_template

    loaded = load_tiny("llama")
    texts = apply_template("direct", [questions[0], questions[1] + " and more words here", questions[2]])
    vectors = _vectors()
    with steering(loaded, vectors, "additive", 3.0):
        conts = greedy_continuations(loaded, texts, 5, batch_size=3)
        assert [len(c) for c in conts] == [5, 5, 5]
        first_1, ce_1 = continuation_logprobs(loaded, texts, conts, batch_size=1)
        first_3, ce_3 = continuation_logprobs(loaded, texts, conts, batch_size=3)
        start = answer_start_logprobs(loaded, texts, batch_size=3)
    assert abs(ce_1 - ce_3) < 1e-4 and torch.allclose(first_1, first_3, atol=1e-4)
    assert torch.allclose(first_1, start, atol=1e-4)
    assert [int(i) for i in start.argmax(-1)] == [c[0] for c in conts]  # greedy: the first token is the argmax
    result = search_scale(loaded, vectors, texts, questions[:4], reference_form="additive", reference_strength=3.0,
                             scales=(0.0, 3.0), ppl_margin=100.0, refine=False, objective="continuation",
                             continuation_tokens=5)
    ce = {r["scale"]: r["continuation_ce"] for r in result.table}
    assert result.scale == 3.0 and ce[3.0] < ce[0.0] == result.details["continuation_ce_unsteered"]
    assert result.objective == "continuation" and result.details["continuation_tokens"] == 5


def test_alpha_check_scores_the_paper_forms_text_under_the_unsteered_model(load_tiny, questions):
    """The fluency ratio is the unsteered model's perplexity of the paper form's continuations (after
    their first token) over that of its own: checked against a forward pass per prompt without
    padding; a negligible alpha changes nothing (ratio 1); the search stops at the first failure and
    the largest passing alpha is chosen."""
    from unlock_export.evaluation.calibrate import check_alphas, greedy_continuations
    from unlock_export.method.steer import steering
    from unlock_export.prompts import apply_template

    loaded = load_tiny("llama")
    texts = apply_template("direct", [questions[0], questions[1] + " and a longer tail here", questions[2]])
    vectors = _vectors()
    result = check_alphas(loaded, vectors, texts, alphas=(100.0, 1e-9), margin=1e6, tokens=6, batch_size=3)
    tiny, huge = result["table"]
    assert (tiny["alpha"], huge["alpha"]) == (1e-9, 100.0) and result["alpha"] == 100.0
    assert abs(tiny["fluency_ratio"] - 1.0) < 1e-6 and tiny["first_token_changed"] == 0.0

    def nll_by_hand(conts):  # unpadded forward passes, one prompt at a time, first token left out
        total, count = 0.0, 0
        for text, cont in zip(texts, conts):
            prompt = loaded.tokenizer(text)["input_ids"]
            logits = loaded.model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            total -= float(lp[1:].gather(1, torch.tensor(cont[1:])[:, None]).sum())
            count += len(cont) - 1
        return total / count

    with torch.inference_mode():
        plain = greedy_continuations(loaded, texts, 6, batch_size=1)
        with steering(loaded, vectors, "paper", 100.0):
            steered = greedy_continuations(loaded, texts, 6, batch_size=1)
        expected = torch.tensor(nll_by_hand(steered) - nll_by_hand(plain)).exp().item()
    assert steered != plain and huge["fluency_ratio"] > 1.0
    assert abs(huge["fluency_ratio"] - expected) < 1e-3 * expected
    auto = check_alphas(loaded, vectors, texts, alphas=(100.0, 1e-9), margin=1e6, tokens=6, batch_size="auto")
    assert [r["fluency_ratio"] for r in auto["table"]] == pytest.approx([tiny["fluency_ratio"], huge["fluency_ratio"]],
                                                                         rel=1e-4)  # the same, batched by memory
    strict = check_alphas(loaded, vectors, texts, alphas=(1e-9, 100.0, 200.0), margin=0.01, tokens=6, batch_size=3)
    assert [r["alpha"] for r in strict["table"]] == [1e-9, 100.0]  # stopped at the first failure
    assert [r["allowed"] for r in strict["table"]] == [True, False] and strict["alpha"] == 1e-9


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_pairs_equal_separate_generations_and_teacher_forcing(arch, load_tiny, questions):
    """paper_pairs prefills each prompt but its last token once and runs the unsteered, the steered and the
    forced rows in lockstep: every output equals its reference computed alone, one prompt at a time without
    padding (greedy generation unsteered and under the paper form, the prefill's answer-start distribution,
    and the steered continuation teacher-forced through the unsteered model), for prompts of unequal length."""
    from unlock_export.errors import UserError
    from unlock_export.evaluation.calibrate import answer_start_logprobs, greedy_continuations, paper_pairs
    from unlock_export.method.steer import paper_steering
    from unlock_export.prompts import apply_template

    loaded = load_tiny(arch)
    g = torch.Generator().manual_seed(1)
    layers = int(loaded.n_layers)
    vectors = SteeringVectors({i: 3.0 * torch.randn(loaded.hidden_size, generator=g) for i in range(1, layers)},
                              layers, loaded.hidden_size, model_hint=loaded.model.config.model_type)
    texts = apply_template("direct", [questions[0], questions[1] + " and a much longer tail than the others", "7?"])
    got = paper_pairs(loaded, vectors, texts, 2.0, 6, batch_size=3)
    alone = paper_pairs(loaded, vectors, texts, 2.0, 6, batch_size=2, plain=False)
    with torch.inference_mode():
        plain = greedy_continuations(loaded, texts, 6, batch_size=1)
        plain_first = [answer_start_logprobs(loaded, [text])[0] for text in texts]
        with paper_steering(loaded, vectors, 2.0):
            steered = greedy_continuations(loaded, texts, 6, batch_size=1)
            steered_first = [answer_start_logprobs(loaded, [text])[0] for text in texts]
        forced = []
        for text, cont in zip(texts, steered):
            prompt = loaded.tokenizer(text)["input_ids"]
            logits = loaded.model(input_ids=torch.tensor([prompt + cont])).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            forced.append(lp.gather(1, torch.tensor(cont)[:, None])[:, 0])
    assert got["plain"] == plain and got["steered"] == steered and alone["steered"] == steered
    assert steered != plain  # the edit matters here
    for name, reference in [("plain_first", plain_first), ("steered_first", steered_first)]:
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got[name], reference)), name
    for scores in (got["scores"], alone["scores"]):
        assert all(torch.allclose(torch.tensor(s[:len(c)]), f, atol=1e-4) for s, c, f in zip(scores, steered, forced))
    short = [t for t in ("7", "a", "x") if len(loaded.tokenizer(t)["input_ids"]) == 1]
    if short:  # a prompt of one token has nothing to share
        with pytest.raises(UserError, match="at least two tokens"):
            paper_pairs(loaded, vectors, [texts[0], short[0]], 2.0, 6, batch_size=2)


def test_check_alpha_command(tiny_model_dir, tmp_path, capsys):
    model, vec_path = str(tiny_model_dir("llama")), str(_vectors().save(tmp_path / "v.safetensors"))
    out = tmp_path / "alpha.json"
    assert main(["check-alpha", model, "--vectors", vec_path, "--alphas", "0.1,50", "--count", "4",
                 "--tokens", "4", "--margin", "1e6", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["alpha"] == 50.0 and [r["alpha"] for r in result["table"]] == [0.1, 50.0]
    assert "largest alpha that keeps the text: 50" in capsys.readouterr().out
    for bad, message in [(["--alphas", "0.1,x"], "--alphas '0.1,x' is not a comma list of numbers"),
                         (["--alphas", "0,0.1"], "alphas must be finite and > 0"),
                         (["--tokens", "1"], "continuation tokens must exceed the 1 skipped")]:
        assert main(["check-alpha", model, "--vectors", vec_path, "--count", "2", *bad,
                     "-o", str(tmp_path / "bad.json")]) == 2
        assert message in capsys.readouterr().err
    other_site = SteeringVectors(_vectors().directions, 4, 64, "post_attention").save(tmp_path / "pa.safetensors")
    assert main(["check-alpha", model, "--vectors", str(other_site), "--count", "2", "-o", str(tmp_path / "bad.json")]) == 2
    assert "use vectors with site layer_output" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_eval_and_calibrate_select_layers(tiny_model_dir, math_set, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    vec_path = str(_vectors(scale=3).save(tmp_path / "v.safetensors"))
    base = ["eval", model, "--data", str(math_set), "--max-new-tokens", "4"]
    assert main(["--json", *base, "--vectors", vec_path, "--form", "additive", "--layers", "2-3",
                 "-o", str(tmp_path / "band")]) == 0
    assert json.loads(capsys.readouterr().out)["steering"]["layers"] == [2, 3]
    assert main([*base, "--layers", "2", "-o", str(tmp_path / "x")]) == 2
    assert "pass --vectors too" in capsys.readouterr().err
    assert main([*base, "--vectors", vec_path, "--layers", "0", "-o", str(tmp_path / "x")]) == 2
    assert "holds no vector for layers 0 (it holds layers 1-3)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "cal.json"
    assert main(["--quiet", "calibrate", model, "--vectors", vec_path, "--layers", "1,3", "--count", "4",
                 "--scales", "0.5,1", "--ppl-margin", "10", "--objective", "continuation",
                 "--continuation-tokens", "3", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers"] == [1, 3] and result["objective"] == "continuation"
    assert all("continuation_ce" in r for r in result["table"])


def test_calibrate_command_paper_reference(tiny_model_dir, tmp_path, capsys):
    vec_path = _vectors().save(tmp_path / "v.safetensors")
    out = tmp_path / "cal.json"
    assert main(["--quiet", "calibrate", str(tiny_model_dir("llama")), "--vectors", str(vec_path), "--alpha", "0.5",
                 "--count", "6", "--scales", "0.5,1,2,4", "--ppl-margin", "10", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["reference"] == {"form": "paper", "alpha": 0.5, "layers": [1, 2, 3]}
    assert result["layers"] == [1, 2, 3]
    assert result["scale"] in [r["scale"] for r in result["table"]]
    assert result["kl_to_reference"] <= result["kl_unsteered_to_reference"]


def test_eval_resume_after_interrupt_gives_identical_results(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import unlock_export.evaluation.run as ev
    from unlock_export.evaluation.engines.transformers_engine import TransformersEngine

    rows = [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a in range(1, 6) for b in range(2)]
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(ev, "CHUNK", 3)
    model = tiny_model_dir("llama")

    def args(out, *extra):
        return ["--quiet", "eval", str(model), "--data", str(data), "--max-new-tokens", "5", "--batch-size", "2",
                "-o", str(out), *extra]

    assert main(args(tmp_path / "whole")) == 0
    # Ctrl-C during the third chunk
    real, calls = TransformersEngine.generate, []

    def interrupted(self, texts, max_new_tokens, progress=None):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, texts, max_new_tokens, progress)

    monkeypatch.setattr(TransformersEngine, "generate", interrupted)
    assert main(args(tmp_path / "cut")) == 130
    assert not (tmp_path / "cut" / "summary.json").exists()
    capsys.readouterr()
    assert main(args(tmp_path / "cut")) == 2  # neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(TransformersEngine, "generate", real)
    seen = []
    monkeypatch.setattr(TransformersEngine, "generate",
                        lambda self, texts, n, progress=None: seen.append(len(texts)) or real(self, texts, n, progress))
    assert main(args(tmp_path / "cut", "--resume")) == 0
    assert seen == [3, 1]  # chunks 3 and 4 (of 3, 3, 3, 1) only: the first two were kept
    whole = (tmp_path / "whole" / "predictions.jsonl").read_text()
    assert (tmp_path / "cut" / "predictions.jsonl").read_text() == whole
    assert not (tmp_path / "cut" / "progress.jsonl").exists()
    # a resume with other settings is refused rather than mixed
    (tmp_path / "cut" / "summary.json").unlink()
    (tmp_path / "cut" / "progress.jsonl").write_text(json.dumps({"fingerprint": "other"}) + "\n")
    capsys.readouterr()
    assert main(args(tmp_path / "cut", "--resume")) == 2
    assert "other prompts or settings" in capsys.readouterr().err


def test_answer_ends_at_its_first_end_of_text_token(load_tiny):
    """A token that ends a text but is not the generation config's EOS (Qwen's `<|endoftext|>`
    from a GGUF, which is also its pad token) ends the answer: nothing after it is kept or counted."""
    from unlock_export.evaluation.engines.transformers_engine import TransformersEngine
    from unlock_export.models.loading import end_of_text_ids

    lm = load_tiny("llama")
    tok = lm.tokenizer
    text = "Question: What is 2 plus 3?\nAnswer:"
    ids = tok(text, return_tensors="pt")["input_ids"]
    reference = []
    with torch.inference_mode():  # cacheless greedy, no stopping rule
        for _ in range(12):
            nxt = int(lm.model(input_ids=ids).logits[0, -1].argmax())
            reference.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    ends = set(end_of_text_ids(lm.model, tok))
    k = next(k for k in range(2, 12) if reference[k] not in reference[:k])
    assert not ends & set(reference[:k + 1])  # precondition: nothing ends the text before position k
    tok.pad_token = tok.convert_ids_to_tokens(reference[k])  # stands for `<|endoftext|>`: pad, and not EOS
    assert reference[k] in end_of_text_ids(lm.model, tok)
    [(output, count)] = TransformersEngine(lm).generate([text], 12)
    assert count == k
    assert output == tok.decode(reference[:k], skip_special_tokens=True)


def test_end_of_text_ids_read_special_tokens_only(load_tiny):
    from unlock_export.models.loading import end_of_text_ids

    lm = load_tiny("llama")
    tok = lm.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.add_tokens(["<|endoftext|>"])  # an ordinary token that happens to have the name: not an end
    ids = end_of_text_ids(lm.model, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.convert_tokens_to_ids("<|endoftext|>") not in ids
    assert {tok.eos_token_id, tok.pad_token_id, lm.model.generation_config.eos_token_id} <= set(ids)


def test_generation_config_names_every_end_of_text_token(load_tiny):
    """A GGUF's rebuilt generation config names one EOS; the loader names every special
    end-of-text token, as llama.cpp stops at each (an ordinary token of the same name is left out)."""
    from unlock_export.models.loading import complete_generation_eos

    lm = load_tiny("llama")
    tok = lm.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.add_tokens(["<|endoftext|>"])
    lm.model.resize_token_embeddings(len(tok))
    before = lm.model.generation_config.eos_token_id
    complete_generation_eos(lm.model, tok)
    assert lm.model.generation_config.eos_token_id == sorted({before, tok.convert_tokens_to_ids("<|im_end|>")})
    complete_generation_eos(lm.model, tok)  # idempotent
    assert lm.model.generation_config.eos_token_id == sorted({before, tok.convert_tokens_to_ids("<|im_end|>")})


def test_calibration_batches_are_length_sorted_within_the_cpu_token_budget(load_tiny, questions):
    """Every text once, shortest first, at most batch_size texts and (on the CPU) CPU_BATCH_TOKENS padded
    tokens a batch unless alone; the answer-start rows come back in the texts' order, equal to one
    unpadded pass per text."""
    from unlock_export.evaluation.calibrate import CPU_BATCH_TOKENS, _batches, _ids, answer_start_logprobs
    from unlock_export.prompts import apply_template

    loaded = load_tiny("llama")
    texts = apply_template("direct", [q + " and more" * (k * 7 % 30) for k, q in enumerate(questions[:9])])
    rows = _ids(loaded, texts)
    batches = list(_batches(loaded, rows, 4))
    seen = [i for idx, _, _ in batches for i in idx]
    assert sorted(seen) == list(range(len(texts))) and [len(rows[i]) for i in seen] == sorted(map(len, rows))
    assert all(len(idx) <= 4 and (len(idx) == 1 or ids.numel() <= CPU_BATCH_TOKENS) for idx, ids, _ in batches)
    assert any(len(idx) > 1 for idx, _, _ in batches)
    assert any(len(idx) < 4 for idx, _, _ in batches[:-1])  # the token budget closed a batch early
    got = answer_start_logprobs(loaded, texts, batch_size=4)
    with torch.inference_mode():
        alone = torch.stack([torch.log_softmax(loaded.model(input_ids=torch.tensor([r])).logits[0, -1].float(), -1)
                             for r in rows])
    assert torch.allclose(got, alone, atol=1e-4)
