"""scripts/eval_table.py (`make eval-table`): its controls, resume and per-row commands, without models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unlock_export.evaluate import PROGRESS
from unlock_export.vectors import SteeringVectors

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_table.py"


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
            "answer_random": tmp_path / "r16.safetensors"}


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
    ("paper-form", "target", ["--vectors", "vectors", "--form", "paper", "--strength", "alpha"]),
    ("folded", "folded_gguf", None),
    ("folded-answer-key", "answer_gguf", None),
    ("self-key", "target_gguf", ["--vectors", "self_key", "--form", "additive", "--strength", "self_scale"]),
    ("self-answer-key", "target_gguf",
     ["--vectors", "self_answer_key", "--form", "additive", "--strength", "self_answer_scale"]),
    ("random", "target_gguf", ["--vectors", "random", "--form", "additive", "--strength", "scale"]),
    ("random-answer-key", "target_gguf", ["--vectors", "answer_random", "--form", "additive", "--strength", "answer_scale"]),
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
