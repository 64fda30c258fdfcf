"""Bad input: each case gives one line on stderr naming the problem and the fix, exit code 2, and
leaves nothing written (issue 6). Cases covered elsewhere: unknown/wrong-typed recipe keys, layers
out of range, NaN activations (test_cli.py); mismatched hidden sizes, output inside the source
(test_fold.py); NaN/inf in a vectors file (test_vectors.py); bad Hub repo ids (test_hub.py)."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
import yaml

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors
from unlock_export.models.loading import load


def run(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    code = main(["--quiet", *map(str, args)])
    return code, capsys.readouterr().err


def assert_refused(capsys, args, match, code=2):
    got, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def vectors_file(tmp_path, tiny_model_dir):
    lm = load(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    vec = SteeringVectors({L: torch.randn(lm.hidden_size, generator=g) for L in (1, 2)}, lm.n_layers,
                          lm.hidden_size, "layer_output", "llama", {})
    return vec.save(tmp_path / "v.safetensors")


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- recipes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("prompts.path", "missing.jsonl", "prompts.path 'missing.jsonl'"),
    ("prompts.path", "../../../../../../../../etc", "is not a JSONL prompt file"),
    ("target.model", "../../../../../../../../etc", "is not a model folder with config.json or a .gguf file"),
    ("target.model", "./no-such-model", "does not exist"),
    ("name", "../../etc/x", "'name'"),
])
def test_recipe_paths_and_names(capsys, tiny_recipe, key, value, match):
    path, recipe = tiny_recipe
    section, _, field = key.partition(".")
    if field:
        recipe[section][field] = value
    else:
        recipe[section] = value
    path.write_text(yaml.safe_dump(recipe))
    out = path.parent / "out"
    assert_refused(capsys, ["run", path, out], match)
    assert not out.exists() and _leftovers(path.parent) == []


def test_recipe_that_is_not_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    assert_refused(capsys, ["run", bad, tmp_path / "out"], "is not valid YAML at line")


# -- damaged weights --------------------------------------------------------------------------
def test_truncated_shard_is_refused_before_anything_is_written(capsys, tmp_path, tiny_model_dir, vectors_file):
    model = _copy_model(tiny_model_dir("llama"), tmp_path / "model")
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_refused(capsys, ["fold", model, "--vectors", vectors_file, "-o", tmp_path / "out"], "is truncated")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert_refused(capsys, ["key", "--locked", model, "--count", "4", "-o", tmp_path / "k.safetensors"],
                   "is truncated")
    assert not (tmp_path / "k.safetensors").exists()


def test_corrupted_shard_header_is_refused(capsys, tmp_path, tiny_model_dir, vectors_file):
    model = _copy_model(tiny_model_dir("llama"), tmp_path / "model")
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\x00garbage\xff\xfe\x00\x01\x02\x03\x04\x05\x06"
    shard.write_bytes(bytes(data))
    assert_refused(capsys, ["fold", model, "--vectors", vectors_file, "-o", tmp_path / "out"],
                   "is not a valid safetensors file")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_refused(capsys, tmp_path, vectors_file):
    from unlock_export.export.gguf import write_control_vector_gguf as write_control_vector

    cvec = tmp_path / "steer.gguf"
    write_control_vector(SteeringVectors.load(vectors_file), cvec)
    cvec.write_bytes(cvec.read_bytes()[:-50])
    assert_refused(capsys, ["inspect", cvec], "is not a readable GGUF file")
    assert_refused(capsys, ["key", "--locked", cvec, "--count", "4", "-o", tmp_path / "k.safetensors"],
                   "is not a readable GGUF file")
    assert not (tmp_path / "k.safetensors").exists()


# -- pickles ----------------------------------------------------------------------------------
@pytest.fixture
def pickle_model(tmp_path, tiny_model_dir):
    """The tiny llama with its weights as a pickled pytorch_model.bin only."""
    src = tiny_model_dir("llama")
    model = tmp_path / "pickled"
    model.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, model / f.name)
    lm = load(str(src), dtype="float32", device="cpu")
    torch.save(lm.model.state_dict(), model / "pytorch_model.bin")
    return model


def test_pickle_only_model_is_refused_unless_allowed(capsys, tmp_path, pickle_model, vectors_file, tiny_model_dir):
    line = assert_refused(capsys, ["fold", pickle_model, "--vectors", vectors_file, "-o", tmp_path / "out"],
                          "--allow-pickle")
    assert "pickled .bin weights" in line and not (tmp_path / "out").exists()
    assert_refused(capsys, ["key", "--locked", pickle_model, "--count", "4", "-o", tmp_path / "k.safetensors"],
                   "--allow-pickle")
    # allowed: the export is safetensors and equals the export of the safetensors original
    code, err = run(capsys, "fold", pickle_model, "--vectors", vectors_file, "--allow-pickle", "-o", tmp_path / "out")
    assert code == 0, err
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "out").iterdir())
    assert not any(p.suffix == ".bin" for p in (tmp_path / "out").iterdir())
    code, err = run(capsys, "fold", tiny_model_dir("llama"), "--vectors", vectors_file, "-o", tmp_path / "ref")
    assert code == 0, err
    a = load(str(tmp_path / "out"), dtype="float32", device="cpu")
    b = load(str(tmp_path / "ref"), dtype="float32", device="cpu")
    ids = a.tokenizer(["12 + 7 ="], return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(a.model(**ids).logits, b.model(**ids).logits, atol=1e-5)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_allowed_pickle_still_never_runs_code(capsys, tmp_path, pickle_model):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    _Payload.marker = marker
    torch.save({"model.embed_tokens.weight": payload}, pickle_model / "pytorch_model.bin")
    code, err = run(capsys, "key", "--locked", pickle_model, "--allow-pickle", "--count", "4",
                    "-o", tmp_path / "k.safetensors")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "k.safetensors").exists()


# -- vectors ----------------------------------------------------------------------------------
def test_vectors_with_nan_are_refused_by_fold(capsys, tmp_path, tiny_model_dir, vectors_file):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(vectors_file), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["direction.1"][3] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    assert_refused(capsys, ["fold", tiny_model_dir("llama"), "--vectors", tmp_path / "nan.safetensors",
                            "-o", tmp_path / "out"], "contains NaN or inf")
    assert not (tmp_path / "out").exists()


# -- disk full --------------------------------------------------------------------------------
def test_disk_full_during_export_removes_partial_output(capsys, tmp_path, tiny_model_dir, vectors_file, monkeypatch):
    import unlock_export.models.checkpoint as ckpt_mod

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 1000)  # a partial file, as a filling disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    line = assert_refused(capsys, ["fold", tiny_model_dir("llama"), "--vectors", vectors_file,
                                   "-o", out_parent / "out"], "no space left on device")
    assert "nothing was written" in line
    assert list(out_parent.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_batch_size(capsys, tmp_path, tiny_model_dir, value):
    assert_refused(capsys, ["key", "--locked", tiny_model_dir("llama"), "--batch-size", value, "--count", "4",
                            "-o", tmp_path / "k.safetensors"], "positive integer or auto")


def test_auto_batch_size_on_the_command_line(capsys, tmp_path, tiny_model_dir):
    code, err = run(capsys, "key", "--locked", tiny_model_dir("llama"), "--batch-size", "auto", "--count", "6",
                    "-o", tmp_path / "k.safetensors")
    assert code == 0, err
    assert (tmp_path / "k.safetensors").is_file()


# -- files from elsewhere (issue 25) ------------------------------------------------------------------
def _control_vector(path, directions: dict, layer_count: int | None = None, raw=None):
    """A control-vector GGUF written with gguf-py (tensor names as given; `raw` maps a name to its GGUF type)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", layer_count if layer_count is not None else len(directions))
    for name, data in directions.items():
        if raw and name in raw:
            writer.add_tensor(name, data, raw_dtype=raw[name])
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _offsets(folded):
    from safetensors.torch import load_file

    return load_file(folded / "model-unlock-offsets.safetensors")


def _assert_same_fold(a, b):
    ta, tb = _offsets(a), _offsets(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_half_precision_vectors_are_converted(capsys, tmp_path, tiny_model_dir):
    import gguf
    import numpy as np
    from safetensors.torch import save_file

    from unlock_export.method.vectors import FORMAT

    model = tiny_model_dir("llama")
    g = torch.Generator().manual_seed(1)
    full = {layer: torch.randn(64, generator=g) for layer in (1, 2)}
    meta = {"format": FORMAT, "layer_count": "4", "hidden_size": "64", "site": "layer_output"}
    for dtype in (torch.float16, torch.bfloat16):
        rounded = {k: v.to(dtype) for k, v in full.items()}
        save_file({f"direction.{k}": v for k, v in rounded.items()}, str(tmp_path / "half.safetensors"), metadata=meta)
        SteeringVectors({k: v.float() for k, v in rounded.items()}, 4, 64).save(tmp_path / "ref.safetensors")
        for name in ("half", "ref"):
            code, err = run(capsys, "fold", model, "--vectors", tmp_path / f"{name}.safetensors", "--no-verify",
                            "-o", tmp_path / f"{name}-{dtype}")
            assert code == 0, err
        _assert_same_fold(tmp_path / f"half-{dtype}", tmp_path / f"ref-{dtype}")
    # a control vector in F16 and in BF16 (which GGUF stores as raw 16-bit words)
    as_bf16 = {k: v.to(torch.bfloat16) for k, v in full.items()}
    words = {k: (v.float().numpy().view(np.uint32) >> 16).astype(np.uint16) for k, v in as_bf16.items()}
    _control_vector(tmp_path / "bf16.gguf", {f"direction.{k}": w for k, w in words.items()},
                    raw={f"direction.{k}": gguf.GGMLQuantizationType.BF16 for k in words})
    _control_vector(tmp_path / "f16.gguf", {f"direction.{k}": v.to(torch.float16).numpy() for k, v in full.items()})
    for name, exact in (("bf16", as_bf16), ("f16", {k: v.to(torch.float16) for k, v in full.items()})):
        vectors = SteeringVectors.load(tmp_path / f"{name}.gguf")
        assert vectors.layers == [1, 2] and vectors.hidden_size == 64
        for layer, value in exact.items():
            assert vectors.directions[layer].dtype == torch.float32
            assert torch.equal(vectors.directions[layer], value.float()), name


def test_matrix_shaped_directions(capsys, tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    from unlock_export.method.vectors import FORMAT

    model = tiny_model_dir("llama")
    meta = {"format": FORMAT, "layer_count": "4", "hidden_size": "64"}
    v = torch.randn(64)
    for shape in ((1, 64), (64, 1)):  # one vector, stored with a unit dimension: read as the vector
        save_file({"direction.1": v.reshape(shape)}, str(tmp_path / "row.safetensors"), metadata=meta)
        assert torch.equal(SteeringVectors.load(tmp_path / "row.safetensors").directions[1], v)
    save_file({"direction.1": v.reshape(8, 8)}, str(tmp_path / "matrix.safetensors"), metadata=meta)
    line = assert_refused(capsys, ["fold", model, "--vectors", tmp_path / "matrix.safetensors", "-o",
                                   tmp_path / "out"], "has shape (8, 8)")
    assert "1-D" in line and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    save_file({"direction.1": v.reshape(8, 8)}, str(tmp_path / "bare.safetensors"))  # no metadata
    assert_refused(capsys, ["fold", model, "--vectors", tmp_path / "bare.safetensors", "-o", tmp_path / "out"],
                   "has shape (8, 8)")
    _control_vector(tmp_path / "matrix.gguf", {"direction.1": v.reshape(8, 8).numpy()})
    assert_refused(capsys, ["fold", model, "--vectors", tmp_path / "matrix.gguf", "-o", tmp_path / "out"],
                   "has shape (8, 8)")
    assert not (tmp_path / "out").exists()


def test_duplicate_and_negative_layer_names_are_refused(capsys, tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    from unlock_export.method.vectors import FORMAT

    model = tiny_model_dir("llama")
    meta = {"format": FORMAT, "layer_count": "4", "hidden_size": "64"}
    one, two = torch.ones(64), 2 * torch.ones(64)
    cases = {
        "dup.safetensors": lambda p: save_file({"direction.1": one, "direction.01": two}, str(p), metadata=meta),
        "dup-bare.safetensors": lambda p: save_file({"direction.1": one, "direction.001": two}, str(p)),
        "dup.gguf": lambda p: _control_vector(p, {"direction.2": one.numpy(), "direction.02": two.numpy()}),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        line = assert_refused(capsys, ["fold", model, "--vectors", tmp_path / name, "-o", tmp_path / "out"],
                              "holds two directions for layer")
        assert "direction.0" in line and "keep one" in line
    save_file({"direction.-1": one}, str(tmp_path / "neg.safetensors"), metadata=meta)
    _control_vector(tmp_path / "neg.gguf", {"direction.-1": one.numpy()})
    for name in ("neg.safetensors", "neg.gguf"):
        assert_refused(capsys, ["fold", model, "--vectors", tmp_path / name, "-o", tmp_path / "out"],
                       "'direction.-1', a negative layer number")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_control_vector_made_for_another_layer_count_is_refused(capsys, tmp_path, tiny_model_dir):
    import numpy as np

    model = tiny_model_dir("llama")  # 4 layers
    rng = np.random.default_rng(0)
    directions = {f"direction.{k}": rng.standard_normal(64).astype(np.float32) for k in (1, 2, 3)}
    # a tool that records the model's layer count (36) and kept three of its layers
    _control_vector(tmp_path / "deep.gguf", directions, layer_count=36)
    line = assert_refused(capsys, ["fold", model, "--vectors", tmp_path / "deep.gguf", "-o", tmp_path / "out"],
                          "states 36 layers (controlvector.layer_count)")
    assert "has 4" in line and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert_refused(capsys, ["eval", model, "--data", "builtin:gsm8k-dev", "--count", "1", "--vectors",
                            tmp_path / "deep.gguf", "--form", "additive", "-o", tmp_path / "ev"], "states 36 layers")
    assert not (tmp_path / "ev" / "summary.json").exists()
    # the count of its own tensors (repeng, llama.cpp) or the target's own count: accepted
    for count in (3, 4):
        _control_vector(tmp_path / "fits.gguf", directions, layer_count=count)
        code, err = run(capsys, "fold", model, "--vectors", tmp_path / "fits.gguf", "-o", tmp_path / f"out{count}")
        assert code == 0, err


def test_selected_layers_of_a_control_vector_fit_a_deeper_model(capsys, tmp_path, tiny_model_dir):
    import numpy as np

    model = tiny_model_dir("llama", layers=6)
    rng = np.random.default_rng(0)
    _control_vector(tmp_path / "cv.gguf", {f"direction.{k}": rng.standard_normal(64).astype(np.float32)
                                           for k in (1, 2, 3)})
    code, err = run(capsys, "fold", model, "--vectors", tmp_path / "cv.gguf", "--layers", "1-2", "-o", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "unlock.json").read_text())["layers"] == [1, 2]


def test_checkpoint_with_safetensors_and_a_pickle_uses_the_safetensors(capsys, tmp_path, tiny_model_dir,
                                                                        vectors_file):
    src = tiny_model_dir("llama")
    model = _copy_model(src, tmp_path / "both")
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    torch.save({"model.embed_tokens.weight": _Payload()}, model / "pytorch_model.bin")  # runs code if unpickled
    code, err = run(capsys, "fold", model, "--vectors", vectors_file, "-o", tmp_path / "out")
    assert code == 0, err
    assert not any(p.suffix == ".bin" for p in (tmp_path / "out").iterdir())
    code, err = run(capsys, "fold", src, "--vectors", vectors_file, "-o", tmp_path / "ref")
    assert code == 0, err
    _assert_same_fold(tmp_path / "out", tmp_path / "ref")
    code, err = run(capsys, "key", "--locked", model, "--count", "4", "-o", tmp_path / "k.safetensors")
    assert code == 0, err
    assert not marker.exists()


def test_index_naming_a_missing_shard_is_refused(capsys, tmp_path, tiny_model_dir, vectors_file):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    model = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(model, max_shard_size="60KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, model / f.name)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (model / gone).unlink()
    assert_refused(capsys, ["fold", model, "--vectors", vectors_file, "-o", tmp_path / "out"],
                   f"shard '{gone}' listed in model.safetensors.index.json is missing")
    assert_refused(capsys, ["key", "--locked", model, "--count", "4", "-o", tmp_path / "k.safetensors"],
                   f"shard '{gone}'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "k.safetensors").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_rope_scaling_the_relabel_cannot_represent_is_refused(capsys, tmp_path, tiny_model_dir, vectors_file, arch):
    model = _copy_model(tiny_model_dir(arch), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(config))
    for extra in ([], ["--no-verify"]):
        line = assert_refused(capsys, ["fold", model, "--vectors", vectors_file, *extra, "-o", tmp_path / "out"],
                              "rope scaling 'mrope' has no Llama equivalent")
        assert "cvec" in line and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # a rope scaling Llama computes (yarn) is kept by the relabel and folds exactly
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                                 "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(config))
    code, err = run(capsys, "fold", model, "--vectors", vectors_file, "-o", tmp_path / "yarn")
    assert code == 0, err
    folded = json.loads((tmp_path / "yarn" / "config.json").read_text())
    assert folded["model_type"] == "llama" and folded["rope_parameters"]["rope_type"] == "yarn"
    assert json.loads((tmp_path / "yarn" / "unlock.json").read_text())["verification"]["passed"] is True


def test_output_symlink_into_the_source_model_is_refused(capsys, tmp_path, tiny_model_dir, vectors_file):
    model = _copy_model(tiny_model_dir("llama"), tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    links = {"to-model": model, "to-inside": model / "sub", "to-shard": model / "model.safetensors"}
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    (tmp_path / "via").symlink_to(model, target_is_directory=True)
    for out in (tmp_path / "to-model", tmp_path / "to-inside", tmp_path / "via" / "folded"):
        for extra in ([], ["--overwrite"]):
            assert_refused(capsys, ["fold", model, "--vectors", vectors_file, "-o", out, *extra],
                           "is inside the source model")
    # eval writes into its output folder: never through a link into the model it evaluates
    for out in (tmp_path / "to-model", tmp_path / "to-inside", tmp_path / "via" / "ev"):
        assert_refused(capsys, ["eval", model, "--data", "builtin:gsm8k-dev", "--count", "1", "-o", out],
                       "is inside the model")
    # gguf: a link to the base GGUF itself
    from unlock_export.export.gguf import write_control_vector_gguf as write_control_vector

    base = tmp_path / "base-dir" / "model.gguf"
    base.parent.mkdir()
    write_control_vector(SteeringVectors.load(vectors_file), base)  # stands in for a model GGUF: refused first
    (tmp_path / "to-base.gguf").symlink_to(base)
    code, err = run(capsys, "fold", model, "--vectors", vectors_file, "-o", tmp_path / "folded")
    assert code == 0, err
    assert_refused(capsys, ["gguf", tmp_path / "folded", "--base", base, "-o", tmp_path / "to-base.gguf",
                            "--overwrite"], "is the base GGUF itself")
    assert sorted(p.name for p in model.iterdir()) == before and not (model / "sub").exists()
    # a folder output that is a dangling link is refused before any work, not after it
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_refused(capsys, ["fold", model, "--vectors", vectors_file, "--no-verify", "-o", tmp_path / "dangling"],
                   "is a symbolic link")
    assert not (tmp_path / "nowhere").exists() and _leftovers(tmp_path) == []
