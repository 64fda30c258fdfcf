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
from unlock_export.method.gate import fit_gates_on_texts, gated_edit
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
    return fit_gates_on_texts(lm, vectors, texts[:16], texts[16:], alpha=0.1, multiplier=multiplier)


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

    capsys.readouterr()  # `verify` rebuilds the hook form from the adapter's own gates and checks the reload
    assert main(["--json", "verify", str(out), "--vectors", str(vec_path)]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_abs_dlogit"] <= 1e-4 and report["steering_effect_max_abs_dlogit"] > 0.05
    assert main(["verify", str(merged_out), "--vectors", str(vec_path)]) == 2
    assert "verify its LoRA form instead" in capsys.readouterr().err

    info = json.loads((out / "unlock.json").read_text())
    fit = info["gate_fit"]
    assert info["mode"] == "gated-lora" and info["adapter_rank"] == 1 and info["scale"] == 3
    assert fit["fit_prompts"] == 16 and fit["alpha"] == 0.1 and fit["multiplier"] == 3
    assert sorted(fit["heldout"]) == ["1", "2", "3"]
    # held out, the gate opens at the last prompt token (mean above 0.5); its largest reading at any other
    # prompt token is recorded, not bounded: on these tiny random models it can exceed the last token's mean
    # (qwen2: up to 1.07 against 0.82-0.88)
    for row in fit["heldout"].values():
        assert row["at_last_token"] > 0.5 and isinstance(row["max_abs_elsewhere"], float)
    card = (out / "README.md").read_text()
    assert "gate fit" in card and "--enable-lora --lora-modules steer=PATH_TO_THIS_FOLDER" in card
    assert "llama-server -m BASE.gguf --lora steer.gguf" in card and '"lora": [{"id": 0, "scale": 1}]' in card


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
    (["--mode", "gated-lora", "--scale", "2"], "not --scale"),
    (["--mode", "bias", "--merge"], "--merge applies to --mode gated-lora only"),
    (["--mode", "bias", "--multiplier", "auto"], "--multiplier applies to --mode gated-lora only"),
    (["--mode", "gated-lora", "--gate-count", "0"], "count >= 1 (--gate-count)"),
    (["--mode", "gated-lora", "--rank", "0"], "rank (--rank) runs from 1"),
    (["--mode", "gated-lora", "--multiplier", "strong"], "--multiplier takes a positive number or 'auto'"),
    (["--mode", "gated-lora", "--multiplier", "-1"], "must be a positive number or 'auto'"),
    (["--mode", "gated-lora", "--multiplier", "auto", "--gate-heldout", "0"], "keep at least one"),
])
def test_gated_lora_refusals_write_nothing(extra, message, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    capsys.readouterr()
    code = main(["--quiet", "fold", str(src), "--vectors", str(vec), *extra, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rank_two_adapter_holds_two_gates_and_equals_their_hook_form(arch, tiny_model_dir, tmp_path, capsys):
    """--rank 2: lora_A holds two gates, lora_B the write twice (lora_alpha = r); PeftModel and
    merge_and_unload equal the hook form of the same two gates; the held-out figures cover both gates."""
    from peft import PeftModel

    src = tiny_model_dir(arch)
    lm = load(str(src), dtype="float32", device="cpu")
    vectors = _vectors(lm)
    vec_path = vectors.save(tmp_path / "v.safetensors")
    out = tmp_path / "gated"
    capsys.readouterr()
    code = main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "--mode", "gated-lora", "--rank", "2",
                 "--multiplier", "3", *GATE, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["lora_bias"] is False
    tensors = load_file(out / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    assert a.shape == (2, lm.model.config.intermediate_size) and b.shape == (lm.hidden_size, 2)
    assert torch.equal(b[:, 0], b[:, 1]) and not torch.allclose(a[0], a[1])

    texts = apply_template("direct", load_questions("builtin:arithmetic", count=24))
    fit = fit_gates_on_texts(lm, vectors, texts[:16], texts[16:], alpha=0.1, multiplier=3.0, rank=2)
    for layer in (1, 2, 3):
        assert torch.allclose(fit.gates[layer], tensors[f"base_model.model.model.layers.{layer}.mlp.down_proj"
                                                        ".lora_A.weight"], atol=1e-6)
        held = fit.heldout[layer]
        # the held-out figures cover both gates; the second's is recorded without a bound: on a tiny random
        # model the first answer token's gate generalises poorly (about 0.1-0.4 held out)
        assert held["at_last_token"] > 0.5 and len(held["at_answer_tokens"]) == 1
        assert isinstance(held["at_answer_tokens"][0], float)
    with gated_edit(lm, fit):
        reference = _logits(lm.model, lm.tokenizer)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), out).eval()
    assert _diff(_logits(adapted, lm.tokenizer), reference) <= 1e-4
    assert _diff(_logits(adapted.merge_and_unload().eval(), lm.tokenizer), reference) <= 1e-4
    info = json.loads((out / "unlock.json").read_text())
    assert info["adapter_rank"] == 2 and info["gate_fit"]["rank"] == 2
    assert "answer tokens 1-1" in info["gate_fit"]["gates"]


def test_auto_multiplier_is_the_closest_to_the_paper_form_and_closeness_is_reported(tiny_model_dir, tmp_path, capsys):
    """--multiplier auto: the calibration's table holds the multipliers tried; the chosen one is the allowed row
    with the least KL to the paper form; the closeness report gives the gated edit's KL at it, the bias fold's at
    its own label-free scale and the unsteered model's, all recomputed here from the hooks."""
    from unlock_export.evaluation.calibrate import answer_start_logprobs, kl
    from unlock_export.method.steer import additive_steering, paper_steering

    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vectors = _vectors(lm)
    vec_path = vectors.save(tmp_path / "v.safetensors")
    out = tmp_path / "gated"
    capsys.readouterr()
    code = main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "--mode", "gated-lora",
                 "--multiplier", "auto", *GATE, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    fit_info = json.loads((out / "unlock.json").read_text())["gate_fit"]
    table = fit_info["multiplier_calibration"]["table"]
    allowed = [row for row in table if row["allowed"]]
    best = min(allowed, key=lambda row: row["kl_to_reference"])
    assert fit_info["multiplier"] == best["scale"] > 0
    close = fit_info["closeness"]
    assert close["gated"]["kl"] == best["kl_to_reference"] < close["unsteered"]

    questions = load_questions("builtin:arithmetic", count=24)[16:]
    held = apply_template("direct", questions)
    with paper_steering(lm, vectors, 0.1):
        paper = answer_start_logprobs(lm, held)
    plain = answer_start_logprobs(lm, held)
    assert abs(kl(paper, plain) - close["unsteered"]) < 1e-5
    fit = _reference_fit(lm, vectors, best["scale"])
    with gated_edit(lm, fit):
        assert abs(kl(paper, answer_start_logprobs(lm, held)) - close["gated"]["kl"]) < 1e-4
    with additive_steering(lm, vectors, close["bias"]["scale"]):
        assert abs(kl(paper, answer_start_logprobs(lm, held)) - close["bias"]["kl"]) < 1e-5
    card = (out / "README.md").read_text()
    assert "closeness to the paper form" in card and "multiplier choice" in card


def _answers(folder):
    return [json.loads(line)["output"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_eval_with_the_lora_equals_the_gated_form_and_scale_zero_equals_unsteered(tiny_model_dir, tmp_path, capsys):
    """eval --lora DIR (stock PEFT) answers as eval --form gated-lora (hooks, gates fitted on the same
    prompts) does; --lora DIR:0 as the unsteered model; the steering really changes the answers."""
    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = _vectors(lm).save(tmp_path / "v.safetensors")
    adapter = tmp_path / "gated"
    capsys.readouterr()
    assert main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "--mode", "gated-lora", "--multiplier", "8",
                 *GATE, "-o", str(adapter)]) == 0, capsys.readouterr().err
    common = ["--quiet", "eval", str(src), "--data", "builtin:gsm8k-dev", "--count", "3", "--max-new-tokens", "8", "--dtype", "float32"]
    runs = {"lora": ["--lora", str(adapter)], "zero": ["--lora", f"{adapter}:0"], "plain": [],
            "hooks": ["--vectors", str(vec_path), "--form", "gated-lora", "--multiplier", "8",
                      "--gate-prompts", "builtin:arithmetic", "--gate-count", "16"]}
    for name, extra in runs.items():
        assert main([*common, *extra, "-o", str(tmp_path / name)]) == 0, capsys.readouterr().err
    answers = {name: _answers(tmp_path / name) for name in runs}
    assert answers["lora"] == answers["hooks"]
    assert answers["zero"] == answers["plain"]
    assert answers["lora"] != answers["plain"]
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["lora"] == {"path": str(adapter), "scale": 1.0}
    hooks = json.loads((tmp_path / "hooks" / "summary.json").read_text())["steering"]
    assert hooks["form"] == "gated-lora" and hooks["multiplier"] == 8.0 and hooks["gate"]["rank"] == 1


def test_the_lora_leaves_a_loaded_model_as_it_was(tiny_model_dir, tmp_path, capsys):
    from unlock_export.models.loading import applied_lora

    src = tiny_model_dir("qwen2")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = _vectors(lm).save(tmp_path / "v.safetensors")
    capsys.readouterr()
    assert main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "--mode", "gated-lora", "--multiplier", "3",
                 *GATE, "-o", str(tmp_path / "gated")]) == 0
    before = _logits(lm.model, lm.tokenizer)
    with applied_lora(lm, tmp_path / "gated", 2.0):
        doubled = _logits(lm.model, lm.tokenizer)
    assert _diff(_logits(lm.model, lm.tokenizer), before) == 0.0
    assert not any("lora" in name for name, _ in lm.model.named_modules())
    fit = _reference_fit(lm, _vectors(lm), 6.0)  # scale 2 on multiplier 3 is multiplier 6
    with gated_edit(lm, fit):
        assert _diff(_logits(lm.model, lm.tokenizer), doubled) <= 1e-4


@pytest.mark.parametrize("extra,message", [
    (["--lora", "missing-adapter"], "LoRA adapter 'missing-adapter' not found"),
    (["--lora", "ADAPTER:x"], "PATH or PATH:SCALE"),
    (["--lora", "ADAPTER", "--vectors", "VECTORS"], "either vectors or a LoRA adapter"),
    (["--vectors", "VECTORS", "--form", "gated-lora", "--engine", "llamacpp"], "the llamacpp engine runs no gated-lora steering hooks"),
    (["--vectors", "VECTORS", "--multiplier", "2"], "--multiplier applies to --form gated-lora only"),
    (["--vectors", "VECTORS", "--form", "gated-lora", "--dtype", "bfloat16"], "pass --dtype float32"),
])
def test_eval_lora_and_gated_form_refusals(extra, message, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    (tmp_path / "adapter").mkdir()
    extra = [str(tmp_path / "adapter") + a[7:] if a.startswith("ADAPTER") else str(vec) if a == "VECTORS" else a
             for a in extra]
    capsys.readouterr()
    code = main(["--quiet", "eval", str(src), "--data", "builtin:gsm8k-dev", "--count", "3", "--max-new-tokens", "4", *extra,
                 "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_recipe_folds_gated_lora_and_writes_its_lora_gguf(tiny_recipe, tmp_path, capsys):
    """fold.mode gated-lora in a recipe: the plan names the gate fit, the run writes the verified LoRA
    (multiplier auto, its closeness recorded), gguf.lora its llama.cpp LoRA GGUF, and both serve lines."""
    import yaml

    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "gated-lora", "rank": 2, "gate_prompts": "builtin:arithmetic", "gate_count": 16,
                      "multiplier": "auto"}
    recipe["gguf"] = {"lora": True}
    recipe["diagnostics"] = {"enabled": False}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", "--dry-run", str(path), str(out)]) == 0, capsys.readouterr().err
    plan = capsys.readouterr().out
    assert "gated-lora, rank 2: gates fitted on 16 prompts" in plan and "lora.gguf" in plan
    assert main(["--quiet", "run", str(path), str(out)]) == 0, capsys.readouterr().err
    info = json.loads((out / "model" / "unlock.json").read_text())
    assert info["mode"] == "gated-lora" and info["adapter_rank"] == 2
    closeness = info["gate_fit"]["closeness"]
    assert info["gate_fit"]["multiplier_calibration"]
    # each form at its label-free strength is at least as close to the paper form as the unsteered model
    # (strength 0 is among those each search may choose)
    assert closeness["gated"]["kl"] <= closeness["unsteered"] and closeness["bias"]["kl"] <= closeness["unsteered"]
    assert info["verification"]["passed"]
    assert (out / "lora.gguf").is_file()
    summary = json.loads((out / "summary.json").read_text())
    engines = {row["engine"]: row["command"] for row in summary["serve"]}
    assert "--lora" in engines["llama.cpp"] and "--enable-lora" in engines["vllm"]


@pytest.mark.parametrize("fold,gguf,message", [
    ({"mode": "gated-lora", "scale": 2}, None, "not the bias fold's scale"),
    ({"mode": "bias", "multiplier": 2}, None, "fold.multiplier apply to fold.mode gated-lora only"),
    ({"mode": "gated-lora"}, {"model": True}, "a gated-lora fold takes gguf.lora"),
    ({"mode": "gated-lora", "merge": True}, {"lora": True}, "without merge"),
    ({"mode": "bias"}, {"lora": True}, "gguf.lora writes a gated-lora fold's LoRA GGUF"),
    ({"mode": "gated-lora"}, {"control_vector": True}, "needs gguf.scale"),
])
def test_recipe_gated_lora_keys_are_checked_in_one_line(fold, gguf, message, tiny_recipe, tmp_path, capsys):
    import yaml

    path, recipe = tiny_recipe
    recipe["fold"] = fold
    if gguf:
        recipe["gguf"] = gguf
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["run", "--dry-run", str(path), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_eval_never_writes_into_the_lora_adapter(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    adapter = tmp_path / "adapter"
    (adapter / "results").mkdir(parents=True)
    before = sorted(p.name for p in adapter.rglob("*"))
    for output in (adapter, adapter / "results"):
        capsys.readouterr()
        code = main(["--quiet", "eval", str(src), "--data", "builtin:gsm8k-dev", "--count", "2", "--lora", str(adapter),
                     "-o", str(output)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "is inside the LoRA adapter" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in adapter.rglob("*")) == before
