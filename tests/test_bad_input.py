"""Bad input: each case gives one line on stderr naming the problem and the fix, exit code 2, and
leaves nothing written (issue 6). Cases covered elsewhere: unknown/wrong-typed recipe keys, layers
out of range, NaN activations (test_cli.py); mismatched hidden sizes, output inside the source
(test_fold.py); NaN/inf in a vectors file (test_vectors.py); bad Hub repo ids (test_hub.py)."""

from __future__ import annotations

import errno
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
    from unlock_export.export.gguf import write_control_vector

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
