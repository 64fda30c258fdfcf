"""fold --mode gated-lora: a plain rank-1 PEFT LoRA (no biases) whose stock reload, merge_and_unload and
--merge checkpoint all equal the hook form of the same gated edit; its gates separate the last prompt
token on held-out prompts; the card and unlock.json record the fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from unlock_export.cli import main
from unlock_export.method.gate import fit_gates, gated_edit
from unlock_export.method.vectors import SteeringVectors
from unlock_export.models.loading import load
from unlock_export.prompts import apply_template, load_questions

TEXTS = ["Question: Ava has 3 apples and buys 4 more. How many apples?\nAnswer:",
         "Question: Ben shares 12 coins among 3 friends.\nAnswer: Let's think step by step.\n"]
GATE = ["--gate-prompts", "builtin:arithmetic", "--gate-count", "16"]


def _logits(model, tokenizer):
    with torch.inference_mode():
        return [model(**tokenizer([t], return_tensors="pt")).logits[0] for t in TEXTS]


def _diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _vectors(lm, layers=(1, 2, 3)):
    g = torch.Generator().manual_seed(0)
    return SteeringVectors({L: torch.randn(lm.hidden_size, generator=g) for L in layers}, lm.n_layers,
                           lm.hidden_size, "layer_output", lm.model.config.model_type)


def _reference_fit(lm, vectors, multiplier):
    """The same gates, fitted here from the same prompts (direct template, arithmetic 0..16, next 8 held out)."""
    texts = apply_template("direct", load_questions("builtin:arithmetic", count=24))
    return fit_gates(lm, vectors, texts[:16], texts[16:], alpha=0.1, multiplier=multiplier)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gated_lora_equals_its_hook_form_loaded_merged_and_as_a_checkpoint(arch, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    src = tiny_model_dir(arch)
    lm = load(str(src), dtype="float32", device="cpu")
    vectors = _vectors(lm)
    vec_path = vectors.save(tmp_path / "v.safetensors")
    capsys.readouterr()
    out, merged_out = tmp_path / "gated", tmp_path / "merged"
    for extra, folder in (([], out), (["--merge"], merged_out)):
        code = main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "--mode", "gated-lora",
                     "--multiplier", "3", *GATE, *extra, "-o", str(folder)])
        assert code == 0, capsys.readouterr().err
    plain = _logits(lm.model, lm.tokenizer)
    with gated_edit(lm, _reference_fit(lm, vectors, 3.0)):
        reference = _logits(lm.model, lm.tokenizer)
    assert _diff(plain, reference) > 0.05  # the edit is really there

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 1 and config["lora_alpha"] == 1
    assert config["lora_bias"] is False
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and not any(k.endswith(".bias") or "lora_bias" in k for k in tensors)
    assert sorted({k.split(".lora_")[0] for k in tensors}) == sorted(
        f"base_model.model.model.layers.{L}.mlp.down_proj" for L in (1, 2, 3))

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), out).eval()
    assert _diff(_logits(adapted, lm.tokenizer), reference) <= 1e-4
    merged = adapted.merge_and_unload().eval()
    assert _diff(_logits(merged, lm.tokenizer), reference) <= 1e-4
    checkpoint = AutoModelForCausalLM.from_pretrained(merged_out, dtype=torch.float32).eval()
    assert _diff(_logits(checkpoint, lm.tokenizer), reference) <= 1e-4
    assert json.loads((merged_out / "config.json").read_text())["model_type"] == arch  # no relabel

    info = json.loads((out / "unlock.json").read_text())
    fit = info["gate_fit"]
    assert info["mode"] == "gated-lora" and info["adapter_rank"] == 1 and info["scale"] == 3
    assert fit["fit_prompts"] == 16 and fit["alpha"] == 0.1 and fit["multiplier"] == 3
    assert sorted(fit["heldout"]) == ["1", "2", "3"]
    for row in fit["heldout"].values():  # the gate opens at the last prompt token, far less elsewhere
        assert row["at_last_token"] > 0.5
    assert "gate fit" in (out / "README.md").read_text()


def test_the_gate_reads_one_at_the_last_token_and_little_elsewhere(load_tiny):
    lm = load_tiny("llama")
    fit = _reference_fit(lm, _vectors(lm, layers=(2,)), 1.0)
    held = fit.heldout[2]
    assert 0.7 < held["at_last_token"] < 1.3
    assert held["max_abs_elsewhere"] < held["at_last_token"]
    # the write points along the steering direction
    unit = fit.writes[2] / fit.writes[2].norm()
    direction = _vectors(lm, layers=(2,)).directions[2]
    assert torch.allclose(unit, direction / direction.norm(), atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--mode", "gated-lora", "--scale", "2"], "not --scale or --rank"),
    (["--mode", "bias", "--merge"], "--merge applies to --mode gated-lora only"),
    (["--mode", "gated-lora", "--gate-count", "0"], "--gate-count >= 1"),
])
def test_gated_lora_refusals_write_nothing(extra, message, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    capsys.readouterr()
    code = main(["--quiet", "fold", str(src), "--vectors", str(vec), *extra, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
