"""Fold and export: stock transformers / PEFT reload the exports and match the hook reference."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from unlock_export.cli import main
from unlock_export.method.steer import additive_steering
from unlock_export.method.vectors import SteeringVectors
from unlock_export.models.loading import load

TEXTS = ["Question: Ava has 3 apples and buys 4 more. How many apples?\nAnswer:",
         "Question: Ben shares 12 coins among 3 friends.\nAnswer: Let's think step by step.\n"]
CASES = [("llama", "layer_output"), ("qwen2", "layer_output"), ("mistral", "layer_output"),
         ("gpt2", "layer_output"), ("gpt_neox", "layer_output"), ("qwen3", "post_attention"),
         ("llama", "post_attention")]


def make_vectors(lm, site="layer_output", layers=(1, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors({L: torch.randn(lm.hidden_size, generator=g) for L in layers}, lm.n_layers,
                           lm.hidden_size, site, lm.model.config.model_type, {"source": "test"})


def logits(model, tokenizer):
    with torch.inference_mode():
        return [model(**tokenizer([t], return_tensors="pt")).logits[0] for t in TEXTS]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def fold_cli(capsys, target, vec_path, out, *extra):
    code = main(["--quiet", "fold", str(target), "--vectors", str(vec_path), "-o", str(out), *map(str, extra)])
    return code, capsys.readouterr().err


# every (arch, site) in every mode, but BEFT on GPT-2 (PEFT's BEFT adapts nn.Linear only: refused below),
# plus qwen3's layer output, which no bias flag can carry but both adapters can
FOLDS = [(arch, site, mode) for arch, site in CASES for mode in ("bias", "adapter", "lora")
         if not (mode == "adapter" and arch == "gpt2")]
FOLDS += [("qwen3", "layer_output", "adapter"), ("qwen3", "layer_output", "lora")]


def _reload(src, out, mode):
    if mode == "bias":
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), out)


@pytest.mark.parametrize("arch,site,mode", FOLDS)
def test_export_matches_hook_reference(tmp_path, capsys, tiny_model_dir, arch, site, mode):
    src = tiny_model_dir(arch)
    lm = load(str(src), dtype="float32", device="cpu")
    vec = make_vectors(lm, site)
    vec_path = vec.save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    before = sorted(p.name for p in Path(src).iterdir())
    code, err = fold_cli(capsys, src, vec_path, out, "--scale", "0.5", "--mode", mode,
                         *(["--rank", "4"] if mode == "lora" else []))
    assert code == 0, err
    plain = logits(lm.model, lm.tokenizer)
    with additive_steering(lm, vec, 0.5):
        reference = logits(lm.model, lm.tokenizer)
    got = logits(_reload(src, out, mode).eval(), lm.tokenizer)
    assert max_diff(got, reference) <= 1e-4
    assert max_diff(got, plain) > 0.1  # the offset is really there
    assert sorted(p.name for p in Path(src).iterdir()) == before  # nothing written into the source
    if mode != "bias":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == ("BEFT" if mode == "adapter" else "LORA")
        assert config.get("lora_bias", mode == "lora") is (mode == "lora")


def test_beft_adapter_holds_one_bias_per_steered_module(tmp_path, capsys, tiny_model_dir):
    from safetensors.torch import load_file

    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec = make_vectors(lm, layers=(1, 3))
    out = tmp_path / "out"
    assert fold_cli(capsys, src, vec.save(tmp_path / "v.safetensors"), out, "--mode", "adapter", "--scale", "2")[0] == 0
    tensors = load_file(out / "adapter_model.safetensors")
    assert sorted(tensors) == [f"base_model.model.model.layers.{L}.mlp.down_proj.beft_bias" for L in (1, 3)]
    for L in (1, 3):
        bias = tensors[f"base_model.model.model.layers.{L}.mlp.down_proj.beft_bias"]
        assert bias.shape == (1, lm.hidden_size) and torch.equal(bias[0], (vec.directions[L] * 2).float())
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [f"model.layers.{L}.mlp.down_proj" for L in (1, 3)]
    assert "r" not in config and not any("lora" in k for k in tensors)
    info = json.loads((out / "unlock.json").read_text())
    assert info["peft_type"] == "BEFT" and info["adapter_rank"] is None and info["carrier_module"] == "mlp.down_proj"


def test_beft_merges_where_the_module_has_a_bias_and_peft_refuses_elsewhere(tmp_path, capsys, tiny_model_dir):
    from peft import PeftModel

    for arch, mergeable in (("gpt_neox", True), ("llama", False)):
        src = tiny_model_dir(arch)
        lm = load(str(src), dtype="float32", device="cpu")
        vec = make_vectors(lm)
        out = tmp_path / arch
        assert fold_cli(capsys, src, vec.save(tmp_path / f"{arch}.safetensors"), out, "--mode", "adapter")[0] == 0
        with additive_steering(lm, vec, 1.0):
            reference = logits(lm.model, lm.tokenizer)
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), out)
        if mergeable:
            merged = adapted.merge_and_unload().eval()
            assert type(merged).__name__ == "GPTNeoXForCausalLM"
            assert max_diff(logits(merged, lm.tokenizer), reference) <= 1e-4
        else:
            with pytest.raises(ValueError, match="no bias"):
                adapted.merge_and_unload()
        card = (out / "README.md").read_text()
        assert "merge_and_unload()" in card and "fold --mode bias" in card and "cvec" in card


def test_beft_on_conv1d_is_refused_naming_lora(tmp_path, capsys, tiny_model_dir):
    src = tiny_model_dir("gpt2")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm).save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, src, vec_path, tmp_path / "out", "--mode", "adapter")
    assert code == 2 and "Conv1D" in err and "--mode lora" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


@pytest.mark.parametrize("mode", ["bias", "adapter"])
def test_rank_is_for_lora_only(tmp_path, capsys, tiny_model_dir, mode):
    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm).save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, src, vec_path, tmp_path / "out", "--mode", mode, "--rank", "4")
    assert code == 2 and "--rank applies to --mode lora or --mode gated-lora only" in err
    assert not (tmp_path / "out").exists()


def test_relabelled_qwen2_equals_original_unsteered(tmp_path, capsys, tiny_model_dir):
    src = tiny_model_dir("qwen2")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm).save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, src, vec_path, tmp_path / "out", "--scale", "0")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    relabelled = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(relabelled).__name__ == "LlamaForCausalLM"
    assert max_diff(logits(relabelled, lm.tokenizer), logits(lm.model, lm.tokenizer)) <= 1e-5


@pytest.mark.parametrize("arch,site,reason", [
    ("gemma3", "layer_output", "a norm follows each sublayer"),
    ("qwen3", "layer_output", "qwen3 has no bias"),
])
def test_refusals_leave_no_output(tmp_path, capsys, tiny_model_dir, arch, site, reason):
    src = tiny_model_dir(arch)
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm, site).save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, src, vec_path, tmp_path / "out")
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_unknown_architecture_is_refused(tmp_path, capsys, tiny_model_dir):
    import shutil

    src = tmp_path / "mystery"
    shutil.copytree(tiny_model_dir("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "mystery"
    (src / "config.json").write_text(json.dumps(config))
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64)
    vec_path = vec.save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, src, vec_path, tmp_path / "out", "--no-verify")
    assert code == 2 and "not in the architecture registry" in err
    assert not (tmp_path / "out").exists()


def test_mismatched_vectors_are_refused(tmp_path, capsys, tiny_model_dir):
    vec_path = SteeringVectors({1: torch.ones(32)}, 4, 32).save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, tiny_model_dir("llama"), vec_path, tmp_path / "out")
    assert code == 2 and "project the key for this model" in err


def test_output_inside_source_is_refused(tmp_path, capsys, tiny_model_dir):
    src = tiny_model_dir("llama")
    vec_path = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    code, err = fold_cli(capsys, src, vec_path, src / "folded")
    assert code == 2 and "inside the source model" in err
    assert not (src / "folded").exists()


@pytest.fixture
def sharded(tmp_path_factory, tiny_model_dir):
    """tiny llama and gpt2 checkpoints saved in many small shards."""
    def make(arch):
        out = tmp_path_factory.mktemp(f"sharded-{arch}")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
        model.save_pretrained(out, max_shard_size="60KB")
        load(str(tiny_model_dir(arch))).tokenizer.save_pretrained(out)
        assert len(list(out.glob("*.safetensors"))) > 3
        return out
    return make


def test_sharded_export_touches_only_what_changes(tmp_path, capsys, sharded):
    src = sharded("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm).save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    assert fold_cli(capsys, src, vec_path, out, "--link")[0] == 0
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    for name in shards:  # every original shard hard-linked: same inode, same bytes
        assert os.stat(out / name).st_ino == os.stat(src / name).st_ino
    index = json.loads((out / "model.safetensors.index.json").read_text())
    new = {n for n, s in index["weight_map"].items() if s == "model-unlock-offsets.safetensors"}
    assert "model.layers.1.mlp.down_proj.bias" in new and "model.layers.0.mlp.gate_proj.bias" in new
    assert set(index["weight_map"].values()) == set(shards) | {"model-unlock-offsets.safetensors"}
    # copy mode: byte-identical files, new inodes
    out2 = tmp_path / "out2"
    assert fold_cli(capsys, src, vec_path, out2, "--no-verify")[0] == 0
    for name in shards:
        assert os.stat(out2 / name).st_ino != os.stat(src / name).st_ino
        assert (out2 / name).read_bytes() == (src / name).read_bytes()


def test_sharded_native_bias_rewrites_only_touched_shards(tmp_path, capsys, sharded):
    src = sharded("gpt2")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm, layers=(2,)).save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    assert fold_cli(capsys, src, vec_path, out)[0] == 0
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    touched = index["transformer.h.2.mlp.c_proj.bias"]
    for name in sorted(p.name for p in src.glob("*.safetensors")):
        same = (out / name).read_bytes() == (src / name).read_bytes()
        assert same == (name != touched), name


def test_model_card_and_provenance(tmp_path, capsys, tiny_model_dir):
    import yaml

    src = tiny_model_dir("qwen2")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm).save(tmp_path / "v.safetensors")
    for mode in ("bias", "adapter", "lora"):
        out = tmp_path / mode
        assert fold_cli(capsys, src, vec_path, out, "--mode", mode, "--scale", "2")[0] == 0
        card = (out / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        assert front["library_name"] == ("transformers" if mode == "bias" else "peft")
        peft_tags = {"adapter": {"beft"}, "lora": {"lora"}, "bias": set()}[mode]
        assert set(front["tags"]) & {"beft", "lora"} == peft_tags
        assert {"unlock-export", "steering"} <= set(front["tags"]) and front["base_model"]
        assert "max \\|dlogit\\|" in card and "unlock-export" in card
        info = json.loads((out / "unlock.json").read_text())
        assert info["scale"] == 2 and info["layers"] == [1, 2, 3] and info["mode"] == mode
        assert info["verification"]["passed"] is True and info["target"] == str(src)


def test_verify_command_detects_a_tampered_export(tmp_path, capsys, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = make_vectors(lm).save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    assert fold_cli(capsys, src, vec_path, out, "--scale", "0.5")[0] == 0
    assert main(["--quiet", "verify", str(out), "--vectors", str(vec_path)]) == 0
    shard = out / "model-unlock-offsets.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.2.mlp.down_proj.bias"] *= 3
    save_file(tensors, shard, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["--quiet", "verify", str(out), "--vectors", str(vec_path)]) == 1
    assert "verification failed" in capsys.readouterr().err


# The child sets SIGINT's disposition itself, as a foreground start would: started from a background
# job of a non-interactive shell (`make test &`, nohup) it inherits SIGINT ignored and Python would
# then never raise KeyboardInterrupt.
SLOW_WRITER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
import unlock_export.models.checkpoint as ck
real = ck._place
def slow(src, dst, link):
    real(src, dst, link)
    print("WRITING", flush=True)
    time.sleep(60)
ck._place = slow
from unlock_export.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_export_leaves_no_output(tmp_path, tiny_model_dir, sig):
    src = tiny_model_dir("llama")
    vec_path = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "--quiet", "fold", str(src), "--vectors",
                             str(vec_path), "-o", str(out), "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    line = ""
    while "WRITING" not in line and time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "WRITING" in line, proc.stderr.read()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    if sig == signal.SIGINT:  # a clean interrupt also removes the staging folder
        assert leftovers == [] and proc.returncode == 130
        err = proc.stderr.read().strip().splitlines()
        assert err[-1] == "error: interrupted; partial outputs were removed", err
