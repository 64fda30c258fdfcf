"""experiments/eval_table.py (`make eval-table`): its controls, resume and per-row commands, without models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unlock_export.evaluation.run import PROGRESS
from unlock_export.method.vectors import SteeringVectors

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "eval_table.py"


@pytest.fixture(scope="module")
def eval_table():
    spec = importlib.util.spec_from_file_location("eval_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_control_keeps_each_layers_norm_and_is_reproducible(eval_table, tmp_path):
    g = torch.Generator().manual_seed(3)
    vectors = SteeringVectors({layer: torch.randn(32, generator=g) * layer for layer in (1, 2, 5)}, 6, 32,
                              model_hint="qwen2")
    first = SteeringVectors.load(eval_table.random_like(vectors, tmp_path / "a.safetensors"))
    again = SteeringVectors.load(eval_table.random_like(vectors, tmp_path / "b.safetensors"))
    assert first.layers == [1, 2, 5]
    for layer in first.layers:
        assert first.directions[layer].norm().item() == pytest.approx(vectors.directions[layer].norm().item(), rel=1e-5)
        assert torch.equal(first.directions[layer], again.directions[layer])  # seeded
        cosine = torch.nn.functional.cosine_similarity(first.directions[layer], vectors.directions[layer], dim=0)
        assert abs(cosine.item()) < 0.7  # a direction of its own, not the steering vector's


def test_steerable_drops_layer_zero(eval_table):
    vectors = SteeringVectors({layer: torch.ones(4) for layer in (0, 1, 2)}, 3, 4)
    assert eval_table.steerable(vectors).layers == [1, 2]


@pytest.mark.parametrize("header, expected", [({"n": 200}, True), ({"n": 64}, False), (None, False), ("junk", False)])
def test_interrupted_reads_the_progress_files_question_count(eval_table, tmp_path, header, expected):
    if header is not None:
        (tmp_path / PROGRESS).write_text((json.dumps(header) if isinstance(header, dict) else header) + "\n")
    assert eval_table.interrupted(tmp_path, 200) is expected


@pytest.fixture
def prep(tmp_path):
    return {"target": "zoo:t", "target_gguf": tmp_path / "t.gguf", "folded_gguf": tmp_path / "f.gguf",
            "vectors": tmp_path / "v.safetensors", "scale": 0.25, "alpha": 0.1,
            "self_key": tmp_path / "self.safetensors", "self_scale": 0.02,
            "self_answer_key": tmp_path / "self16.safetensors", "self_answer_scale": 0.3,
            "random": tmp_path / "r.safetensors", "answer_gguf": tmp_path / "f16.gguf", "answer_scale": 0.42,
            "answer_random": tmp_path / "r16.safetensors", "answer_vectors": tmp_path / "v16.safetensors",
            "tuned_answer_scale": 0.59, "gated_gguf": tmp_path / "gated-lora.gguf"}


def _run(eval_table, monkeypatch, name, prep, out, count=200):
    calls = []

    def fake_cli(*args):
        calls.append([str(a) for a in args])
        out_dir = Path(args[args.index("-o") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps({"n": count, "max_new_tokens": 256, "accuracy": 0.5}))

    monkeypatch.setattr(eval_table, "cli", fake_cli)
    eval_table.run_config(name, prep, out, count, 256)
    return calls


@pytest.mark.parametrize("name, model, steering", [
    ("unsteered", "target_gguf", None),
    ("cot-prompt", "target_gguf", ["--template", "cot"]),
    ("paper-form", "target", ["--vectors", "vectors", "--form", "paper", "--alpha", "alpha"]),
    ("folded", "folded_gguf", None),
    ("folded-answer-key", "answer_gguf", None),
    ("self-key", "target_gguf", ["--vectors", "self_key", "--form", "additive", "--scale", "self_scale"]),
    ("self-answer-key", "target_gguf",
     ["--vectors", "self_answer_key", "--form", "additive", "--scale", "self_answer_scale"]),
    ("random", "target_gguf", ["--vectors", "random", "--form", "additive", "--scale", "scale"]),
    ("random-answer-key", "target_gguf", ["--vectors", "answer_random", "--form", "additive", "--scale", "answer_scale"]),
    ("tuned-answer-key", "target_gguf",
     ["--vectors", "answer_vectors", "--form", "additive", "--scale", "tuned_answer_scale"]),
    ("gated-lora", "target_gguf", ["--lora", "gated_gguf"]),
])
def test_each_row_evaluates_its_own_model_and_steering(eval_table, monkeypatch, tmp_path, prep, name, model, steering):
    assert name in eval_table.CONFIGS
    [args] = _run(eval_table, monkeypatch, name, prep, tmp_path / "out")
    assert args[:3] == ["--quiet", "eval", str(prep[model])]
    if steering:
        expected = [str(prep[s]) if s in prep else s for s in steering]
        start = args.index(steering[0])
        assert args[start:start + len(expected)] == expected
    else:
        assert "--vectors" not in args
    assert ("--engine" in args) is (name != "paper-form")  # the paper form needs hooks: transformers
    assert args[args.index("--count") + 1] == "200" and "--resume" not in args
    assert args[args.index("--data") + 1] == "builtin:gsm8k-dev"  # the packaged dev split, no file beside the clone


def test_a_finished_row_is_reused_and_a_stopped_one_resumes(eval_table, monkeypatch, tmp_path, prep):
    out = tmp_path / "out"
    assert len(_run(eval_table, monkeypatch, "folded", prep, out)) == 1
    assert _run(eval_table, monkeypatch, "folded", prep, out) == []  # same count and tokens: reused
    (out / "random").mkdir(parents=True)
    (out / "random" / PROGRESS).write_text(json.dumps({"n": 200}) + "\n")
    [args] = _run(eval_table, monkeypatch, "random", prep, out)
    assert "--resume" in args
    (out / "unsteered").mkdir()
    (out / "unsteered" / "summary.json").write_text("{}")
    [args] = _run(eval_table, monkeypatch, "cot-prompt", prep, out)
    assert args[args.index("--baseline") + 1] == str(out / "unsteered")  # paired comparison


def test_a_self_key_the_calibration_cannot_place_runs_at_the_largest_allowed_scale(eval_table):
    table = [{"scale": 0.0, "allowed": True}, {"scale": 0.02, "allowed": True}, {"scale": 0.04, "allowed": True},
             {"scale": 0.06, "allowed": False}]
    assert eval_table.own_scale({"scale": 0.02, "table": table}) == 0.02  # the label-free scale when there is one
    assert eval_table.own_scale({"scale": 0.0, "table": table}) == 0.04


def _fake_eval_by_scale(eval_table, monkeypatch, accuracy_at):
    """A fake `eval` whose accuracy is accuracy_at(scale) (scale 0 when unsteered); records its calls."""
    calls = []

    def fake_cli(*args):
        args = [str(a) for a in args]
        calls.append(args)
        scale = float(args[args.index("--scale") + 1]) if "--vectors" in args else 0.0
        out_dir = Path(args[args.index("-o") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        offset = int(args[args.index("--offset") + 1]) if "--offset" in args else 0
        acc = accuracy_at(scale)
        (out_dir / "summary.json").write_text(json.dumps({
            "n": int(args[args.index("--count") + 1]), "max_new_tokens": 256, "offset": offset,
            "accuracy": acc, "ci95": [max(acc - 0.1, 0), min(acc + 0.1, 1)]}))

    monkeypatch.setattr(eval_table, "cli", fake_cli)
    return calls


def test_tuning_scores_held_out_questions_and_picks_the_most_accurate_scale(eval_table, monkeypatch, tmp_path, prep):
    by_scale = {0.0: 0.25, 0.21: 0.30, 0.297: 0.45, 0.42: 0.40, 0.594: 0.45, 0.84: 0.10}
    calls = _fake_eval_by_scale(eval_table, monkeypatch, lambda s: by_scale[round(s, 4)])
    tuned = eval_table.tune_answer_scale(prep, tmp_path, 200, 64, 256)
    assert len(calls) == 1 + len(eval_table.TUNE_FACTORS)
    for args in calls:  # every tuning run: the held-out questions after the table's 200, never the table's own
        assert args[args.index("--offset") + 1] == "200" and args[args.index("--count") + 1] == "64"
        assert Path(args[args.index("-o") + 1]).parent == tmp_path / "tune-answer-key"
        assert args[2] == str(prep["target_gguf"])
        if "--vectors" in args:
            assert args[args.index("--vectors") + 1] == str(prep["answer_vectors"])
    assert sorted(p["scale"] for p in tuned["points"]) == sorted(by_scale)  # 0 and each factor x 0.42
    assert tuned["scale"] == 0.297  # the best accuracy; on the tie with 0.594 the smaller scale
    assert tuned["accuracy"] == 0.45 and tuned["label_free_scale"] == 0.42 and tuned["questions"] == [200, 264]
    again = eval_table.tune_answer_scale(prep, tmp_path, 200, 64, 256)
    assert again == tuned and len(calls) == 1 + len(eval_table.TUNE_FACTORS)  # finished runs reused, none rerun


def test_tuning_reruns_a_row_finished_over_other_questions(eval_table, monkeypatch, tmp_path, prep):
    calls = _fake_eval_by_scale(eval_table, monkeypatch, lambda s: 0.5)
    eval_table.run_config("unsteered", prep, tmp_path, 64, 256)  # the first 64 questions
    assert len(calls) == 1 and "--offset" not in calls[0]
    eval_table.run_config("unsteered", prep, tmp_path, 64, 256, offset=200)  # same count, other questions
    assert len(calls) == 2 and calls[1][calls[1].index("--offset") + 1] == "200"


def test_tuning_that_prefers_no_steering_picks_zero(eval_table, monkeypatch, tmp_path, prep):
    _fake_eval_by_scale(eval_table, monkeypatch, lambda s: 0.3 if s == 0 else 0.2)
    assert eval_table.tune_answer_scale(prep, tmp_path, 200, 64, 256)["scale"] == 0.0


def test_tuning_tries_the_factors_it_is_given(eval_table, monkeypatch, tmp_path, prep):
    calls = _fake_eval_by_scale(eval_table, monkeypatch, lambda s: 0.5 - abs(s - 0.42))
    tuned = eval_table.tune_answer_scale(prep, tmp_path, 200, 64, 256, factors=(1.0, 1.4142, 0.7071))
    assert [p["scale"] for p in tuned["points"]] == [0.0, 0.297, 0.42, 0.594] and len(calls) == 4
    assert tuned["scale"] == 0.42


def test_a_tuned_scale_equal_to_the_label_free_one_reuses_the_folded_answer_key_run(eval_table, prep):
    assert eval_table.same_run("tuned-answer-key", {**prep, "tuned_answer_scale": prep["answer_scale"]}) == "folded-answer-key"
    assert eval_table.same_run("tuned-answer-key", prep) == "tuned-answer-key"  # another scale: its own run
    assert eval_table.same_run("random", prep) == "random"


def test_a_rows_result_carries_the_indices_it_got_right(eval_table, monkeypatch, tmp_path, prep):
    """The table keeps each row's correct_indices (from its predictions.jsonl) for paired comparisons."""
    out = tmp_path / "out"
    _run(eval_table, monkeypatch, "unsteered", prep, out)
    rows = [{"index": i, "correct": i % 3 == 0} for i in range(200)]
    (out / "unsteered" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = eval_table.run_config("unsteered", prep, out, 200, 256)
    assert summary["correct_indices"] == [i for i in range(200) if i % 3 == 0]


def test_the_gated_row_folds_with_a_label_free_multiplier_then_converts(eval_table, monkeypatch, tmp_path):
    calls = []

    def fake_cli(*args):
        calls.append([str(a) for a in args])
        if "fold" in calls[-1]:
            out = Path(args[args.index("-o") + 1])
            out.mkdir(parents=True)
            (out / "unlock.json").write_text(json.dumps({"gate_fit": {"multiplier": 1.41}}))

    monkeypatch.setattr(eval_table, "cli", fake_cli)
    prep = eval_table.gated_lora("zoo:t", tmp_path / "v.safetensors", tmp_path, 0.1, 32, 1000)
    fold, gguf = calls
    assert fold[fold.index("--mode") + 1] == "gated-lora" and fold[fold.index("--multiplier") + 1] == "auto"
    assert fold[fold.index("--gate-offset") + 1] == "1000"
    assert gguf[:3] == ["--quiet", "gguf", str(tmp_path / "gated-lora-adapter")]
    assert prep["gate_fit"] == {"multiplier": 1.41} and prep["gated_gguf"] == tmp_path / "gated-lora.gguf"
    assert prep["gated_adapter"] != tmp_path / "gated-lora"  # the row's own eval folder: never the adapter
