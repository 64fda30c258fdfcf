"""Exports in the target's own precision: bfloat16 and float16 checkpoints fold, verify and reload in stock
transformers; the verification compares like with like and states its tolerance; every file written
follows the umask."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from unlock_export.cli import main
from unlock_export.errors import ExportFailure
from unlock_export.export.verify import verify_export
from unlock_export.method.steer import additive_steering
from unlock_export.method.vectors import SteeringVectors
from unlock_export.models.loading import load

TEXTS = ["Question: Ava has 3 apples and buys 4 more. How many apples?\nAnswer:",
         "Question: Ben shares 12 coins among 3 friends.\nAnswer: Let's think step by step.\n"]
# every family a bias can carry, each at a site it folds at (as in test_fold.CASES)
FAMILIES = [("llama", "layer_output"), ("qwen2", "layer_output"), ("mistral", "layer_output"),
            ("gpt2", "layer_output"), ("gpt_neox", "layer_output"), ("qwen3", "post_attention")]
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _logits(model, tokenizer):
    with torch.inference_mode():
        return [model(**tokenizer([t], return_tensors="pt")).logits[0].float() for t in TEXTS]


def _diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _half_checkpoint(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """`src` saved the way Hub releases are: `save_pretrained` after `.to(dtype)`."""
    if not out.exists():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.to(dtype).save_pretrained(out)
        for path in Path(src).iterdir():
            if path.name.startswith(("tokenizer", "special_tokens")):
                (out / path.name).write_bytes(path.read_bytes())
    return out


def _vectors(lm, site, norm=8.0, seed=0):
    """Offsets of the norms real transferred vectors have (5-11 on the zoo 1.5B)."""
    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for layer in (1, 2, 3):
        v = torch.randn(lm.hidden_size, generator=g)
        dirs[layer] = v / v.norm() * norm
    return SteeringVectors(dirs, lm.n_layers, lm.hidden_size, site, lm.model.config.model_type, {"source": "test"})


def _stored_dtypes(folder: Path) -> set[str]:
    found = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            found |= {str(fh.get_slice(name).get_dtype()) for name in fh.keys()}
    return found


def _fold(capsys, src, vec_path, out, *extra):
    code = main(["--quiet", "fold", str(src), "--vectors", str(vec_path), "-o", str(out), *map(str, extra)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("arch,site", FAMILIES)
def test_a_half_precision_checkpoint_folds_verifies_and_reloads_in_its_own_precision(
        tmp_path_factory, tmp_path, capsys, tiny_model_dir, arch, site, dtype_name):
    dtype = HALF[dtype_name]
    src = _half_checkpoint(tiny_model_dir(arch), tmp_path_factory.mktemp(f"{arch}-{dtype_name}") / "m", dtype)
    assert _stored_dtypes(src) == {dtype_name.replace("bfloat16", "BF16").replace("float16", "F16")}
    lm = load(str(src), dtype="float32", device="cpu")  # the half weights, upcast exactly
    vectors = _vectors(lm, site)
    vec_path = vectors.save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    code, err = _fold(capsys, src, vec_path, out, "--scale", "1")
    assert code == 0, err

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype_name
    assert _stored_dtypes(out) == _stored_dtypes(src)  # nothing widened to float32
    served = AutoModelForCausalLM.from_pretrained(out)  # what a stock loader does with no dtype given
    assert {p.dtype for p in served.parameters()} == {dtype}

    info = json.loads((out / "unlock.json").read_text())
    ver = info["verification"]
    assert ver["passed"] and ver["dtype"] == dtype_name and ver["float32_tolerance"] == 1e-3
    assert ver["precision_floor_max_abs_dlogit"] > 0
    assert ver["tolerance"] == pytest.approx(1e-3 + ver["precision_floor_max_abs_dlogit"])
    assert ver["exact_max_abs_dlogit"] <= 1e-3

    # recomputed here: float32 on the same weights, the hooks adding the requested offsets ...
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = _logits(reloaded, lm.tokenizer)
    plain = _logits(lm.model, lm.tokenizer)
    with additive_steering(lm, vectors, 1.0):
        requested = _logits(lm.model, lm.tokenizer)
    assert _diff(got, plain) > 0.5  # the offset is really there
    assert _diff(got, requested) <= ver["tolerance"]
    # ... and the hooks adding the offsets rounded to the checkpoint's precision: the fold itself is exact
    rounded = SteeringVectors({k: (v * 1.0).to(dtype).float() for k, v in vectors.directions.items()},
                              vectors.layer_count, vectors.hidden_size, site)
    if arch not in ("gpt2", "gpt_neox"):  # these add to a bias of their own: the sum is rounded, not the offset
        with additive_steering(lm, rounded, 1.0):
            assert _diff(got, _logits(lm.model, lm.tokenizer)) <= 1e-4
    card = (out / "README.md").read_text()
    assert f"| weights | {dtype_name} (every floating tensor of the checkpoint) |" in card
    assert f"plus the {dtype_name} floor" in card


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("gemma3", True)])
@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_a_half_checkpoint_loaded_as_float32_is_widened_exactly(tmp_path_factory, tiny_model_dir, arch, tied,
                                                                dtype_name):
    """load() reads a 16-bit checkpoint in its own precision and widens it one tensor at a time: the weights,
    buffers, tying and logits equal transformers' own float32 load of the same files."""
    src = tiny_model_dir(arch, tie_word_embeddings=tied)
    half = _half_checkpoint(src, tmp_path_factory.mktemp(f"widen-{arch}-{dtype_name}") / "m", HALF[dtype_name])
    from unlock_export.models import loading

    widened = loading._narrower_stored_dtype(loading.resolve(str(half)), torch.float32, torch.device("cpu"), None)
    assert widened == HALF[dtype_name]  # the path under test, not transformers' own conversion
    lm = load(str(half), dtype="float32", device="cpu")
    direct = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32).eval()
    assert lm.model.dtype == torch.float32 and lm.model.config.dtype == direct.config.dtype
    ours, theirs = dict(lm.model.named_parameters()), dict(direct.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours, theirs = dict(lm.model.named_buffers()), dict(direct.named_buffers())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    embeddings = lm.model.get_input_embeddings().weight
    assert (lm.model.get_output_embeddings().weight is embeddings) == tied
    assert torch.equal(torch.stack(_logits(lm.model, lm.tokenizer)[:1]), torch.stack(_logits(direct, lm.tokenizer)[:1]))


def test_the_bf16_fold_a_new_user_tried_succeeds(tmp_path_factory, tmp_path, capsys, tiny_model_dir):
    """The issue's report: a tiny llama saved in bf16, `fold DIR --vectors v -o out`, exit 1 before."""
    src = _half_checkpoint(tiny_model_dir("llama"), tmp_path_factory.mktemp("llama-bf16") / "m", torch.bfloat16)
    lm = load(str(src), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({layer: torch.randn(64, generator=g) * 3 for layer in (1, 2, 3)}, 4, 64)
    vec_path = vectors.save(tmp_path / "v.safetensors")
    code = main(["fold", str(src), "--vectors", str(vec_path), "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "verified in bfloat16" in captured.out + captured.err and lm.hidden_size == 64


def test_dtype_converts_a_float32_checkpoint_and_is_refused_for_adapters(tmp_path, capsys, tiny_model_dir):
    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = _vectors(lm, "layer_output").save(tmp_path / "v.safetensors")
    code, err = _fold(capsys, src, vec_path, tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    assert _stored_dtypes(tmp_path / "bf16") == {"BF16"}
    info = json.loads((tmp_path / "bf16" / "unlock.json").read_text())
    assert info["verification"]["dtype"] == "bfloat16" and info["verification"]["passed"]
    code, err = _fold(capsys, src, vec_path, tmp_path / "f32", "--dtype", "auto")
    assert code == 0, err
    assert _stored_dtypes(tmp_path / "f32") == {"F32"}
    ver = json.loads((tmp_path / "f32" / "unlock.json").read_text())["verification"]
    assert ver["tolerance"] == 1e-3 and ver["precision_floor_max_abs_dlogit"] == 0.0
    code, err = _fold(capsys, src, vec_path, tmp_path / "adapter", "--mode", "adapter", "--dtype", "bfloat16")
    assert code == 2 and "--dtype applies to --mode bias or --mode gated-lora --merge only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "adapter").exists()


def test_the_exactness_check_fails_when_the_stored_offsets_are_not_what_the_export_holds(tmp_path, capsys,
                                                                                         tiny_model_dir,
                                                                                         tmp_path_factory):
    src = _half_checkpoint(tiny_model_dir("llama"), tmp_path_factory.mktemp("llama-bf16-x") / "m", torch.bfloat16)
    lm = load(str(src), dtype="float32", device="cpu")
    vectors = _vectors(lm, "layer_output")
    vec_path = vectors.save(tmp_path / "v.safetensors")
    code, err = _fold(capsys, src, vec_path, tmp_path / "out")
    assert code == 0, err
    wrong = SteeringVectors({k: v * 1.05 for k, v in vectors.directions.items()}, 4, 64)
    with pytest.raises(ExportFailure, match="the fold is not exact"):
        verify_export(tmp_path / "out", vectors, 1.0, str(src), dtype=torch.bfloat16, stored=wrong, reference=lm)
    report = verify_export(tmp_path / "out", vectors, 1.0, str(src), dtype=torch.bfloat16, reference=lm)
    assert report["passed"] and "exact_max_abs_dlogit" not in report
    # the shared model is put back exactly as it was after the precision floor ran it in bfloat16
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    fresh = load(str(src), dtype="float32", device="cpu")
    assert _diff(_logits(lm.model, lm.tokenizer), _logits(fresh.model, fresh.tokenizer)) == 0.0


def test_a_merged_gated_edit_is_written_in_the_targets_precision(tmp_path_factory, tmp_path, capsys, tiny_model_dir):
    src = _half_checkpoint(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("qwen2-bf16-g") / "m", torch.bfloat16)
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = _vectors(lm, "layer_output", norm=2.0).save(tmp_path / "v.safetensors")
    code, err = _fold(capsys, src, vec_path, tmp_path / "merged", "--mode", "gated-lora", "--multiplier", "3",
                      "--gate-prompts", "builtin:arithmetic", "--gate-count", "16", "--gate-heldout", "0", "--merge")
    assert code == 0, err
    assert _stored_dtypes(tmp_path / "merged") == {"BF16"}
    ver = json.loads((tmp_path / "merged" / "unlock.json").read_text())["verification"]
    assert ver["passed"] and ver["dtype"] == "bfloat16" and ver["precision_floor_max_abs_dlogit"] > 0


# -- file modes: everything the tool writes follows the umask --------------------------------------

def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_every_file_of_an_export_a_control_vector_and_a_run_follows_the_umask(umask_022, tmp_path, capsys, tiny_model_dir,
                                                                   tiny_recipe):
    src = tiny_model_dir("llama")
    lm = load(str(src), dtype="float32", device="cpu")
    vec_path = _vectors(lm, "layer_output").save(tmp_path / "v.safetensors")
    for mode in ("bias", "adapter"):
        code, err = _fold(capsys, src, vec_path, tmp_path / mode, "--mode", mode)
        assert code == 0, err
    code = main(["--quiet", "cvec", "--vectors", str(vec_path), "-o", str(tmp_path / "folded.gguf")])
    assert code == 0, capsys.readouterr().err
    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "scale": 0.5}
    path.write_text(yaml.safe_dump(recipe))
    code = main(["--quiet", "run", str(path), str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err

    for folder in ("bias", "adapter", "run"):
        modes = _modes(tmp_path / folder)
        assert any(name.endswith(".safetensors") for name in modes)
        wrong = {name: oct(mode) for name, mode in modes.items()
                 if mode != (0o755 if (tmp_path / folder / name).is_dir() else 0o644)}
        assert not wrong, (folder, wrong)
    assert stat.S_IMODE((tmp_path / "folded.gguf").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "bias").stat().st_mode) == 0o755
