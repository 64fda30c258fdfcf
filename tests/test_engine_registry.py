"""Engines are plug-ins: a toy engine registered with one line of ENGINES runs `eval` and `compare`, is
a choice of the CLI and of a recipe's evaluate stage, and what it does not declare is refused in the
registry's one wording, as for the real engines."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from unlock_export.cli import main
from unlock_export.errors import UserError
from unlock_export.evaluation import engines
from unlock_export.evaluation.engines import Capabilities, Session
from unlock_export.method.vectors import SteeringVectors


def toy_answer(text: str) -> str:
    """The toy's greedy answer: the sum of the numbers in the question (so some answers are right)."""
    question = text.split("Question:")[-1]
    return f" The answer is {sum(int(n) for n in re.findall(r'[0-9]+', question))}."


class ToyEngine:
    gives_prefixes = False

    def __init__(self):
        self.calls = 0

    def generate(self, texts, max_new_tokens, progress=None):
        self.calls += 1
        return [(toy_answer(t), 5) for t in texts]


class ToyPlugin:
    name = "toy"
    summary = "answers every question with the sum of its numbers"
    capabilities = Capabilities(models=("folder",))

    def __init__(self):
        self.opened = []

    @contextlib.contextmanager
    def open(self, model, request, items, vectors, label, options, progress):
        from unlock_export.evaluation.questions import render_prompts

        self.opened.append(str(model))
        yield Session(ToyEngine(), render_prompts(items, request.template), {**label, "toy": True})


@pytest.fixture
def toy(monkeypatch):
    plugin = ToyPlugin()
    monkeypatch.setitem(engines.ENGINES, "toy", plugin)  # the one registry line
    return plugin


def _data(path):
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6)]]
    rows.append({"question": "What is 2 times 3?", "answer": "#### 6"})  # the toy's sum (5) is wrong here
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_registered_engine_runs_eval_and_is_a_cli_choice(toy, tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl")
    model = tmp_path / "model"
    model.mkdir()
    assert main(["--quiet", "eval", str(model), "--engine", "toy", "--data", str(data), "-o", str(tmp_path / "ev")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [toy_answer(f"Question: {r['question']}") for r in rows]
    assert [r["correct"] for r in rows] == [True, True, True, False]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["engine"] == "toy" and summary["toy"] is True and summary["correct"] == 3
    assert toy.opened == [str(model)]
    capsys.readouterr()
    assert main(["eval", "--help"]) == 0
    assert "toy" in capsys.readouterr().out.split("--engine [", 1)[1].split("]", 1)[0]


def test_a_registered_engine_serves_compare_and_a_recipe_stage(toy, tmp_path):
    from unlock_export.recipe.spec import EvaluateSpec

    data = _data(tmp_path / "d.jsonl")
    model = tmp_path / "model"
    model.mkdir()
    assert main(["--quiet", "compare", str(model), "--engine", "toy", "--data", str(data), "--arm", "plain=template:plain",
                 "-o", str(tmp_path / "cmp")]) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {a["name"]: a["engine"] for a in results["arms"]} == {"unsteered": "toy", "plain": "toy"}
    assert EvaluateSpec(engine="toy").engine == "toy"
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        EvaluateSpec(engine="nope")


def test_what_an_engine_does_not_declare_is_refused_in_one_wording(toy, tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl")
    model = tmp_path / "model"
    model.mkdir()
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    cvec = tmp_path / "c.gguf"
    cvec.write_bytes(b"GGUF")
    cases = [(["--vectors", str(vec), "--form", "additive"],
              "the toy engine runs no additive steering hooks: fold the vectors"),
             (["--control-vector", str(cvec)], "the toy engine takes no control vector: use --engine llamacpp"),
             (["--lora", f"{model}:0.5"], "the toy engine serves no LoRA adapter: use --engine transformers or "
                                          "--engine llamacpp or --engine vllm"),
             (["--tensor-parallel-size", "2"], "the toy engine runs on one device: --tensor-parallel-size applies")]
    for extra, message in cases:
        capsys.readouterr()
        code = main(["--quiet", "eval", str(model), "--engine", "toy", "--data", str(data), *extra,
                     "-o", str(tmp_path / "ev")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "ev").exists()
    assert toy.opened == []  # refused before the engine opened


@pytest.mark.parametrize("name,capability,value,fix", [
    ("vllm", "control_vector", None, "--engine llamacpp"),
    ("llamacpp", "forms", "paper", "--engine transformers"),
    ("vllm", "lora_scale", "0.5", "--multiplier 0.5"),
    ("transformers", "parallel_devices", "--tensor-parallel-size", "--engine vllm"),
])
def test_refusals_name_the_engines_that_have_the_capability(name, capability, value, fix):
    err = engines.refusal(name, capability, value)
    assert isinstance(err, UserError) and str(err).startswith(f"the {name} engine ") and fix in str(err)
    declared = getattr(engines.plugin(name).capabilities, capability)
    assert value not in declared if capability == "forms" else not declared  # it lacks what it is refused


def test_the_registry_declares_what_each_engine_serves():
    assert engines.engine_names()[:3] == ("transformers", "llamacpp", "vllm")
    assert engines.engines_with("control_vector") == ["llamacpp"]
    assert engines.engines_with("forms", "gated-lora") == ["transformers"]
    assert engines.engines_with("prefixes") == ["transformers", "llamacpp"]
    with pytest.raises(UserError, match="unknown engine 'nope': use transformers or llamacpp or vllm"):
        engines.plugin("nope")
