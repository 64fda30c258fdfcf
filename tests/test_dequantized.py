"""A GGUF is dequantized once: the checkpoint cached beside it is reused by every later load and fold,
rebuilt when the GGUF changed or the copy is damaged. transformers' GGUF loader itself is replaced here
by a stand-in that writes a tiny checkpoint (the real one runs in test_real_models, on a zoo GGUF)."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors
from unlock_export.models import dequantized
from unlock_export.models.loading import load


def _gguf(path, seed=0):
    """A small GGUF file with llama metadata (its tensors are never read by the stand-in loader)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_tensor("token_embd.weight", np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def counted(monkeypatch, tiny_model_dir):
    """Every dequantization, recorded; each writes the tiny llama (what transformers would write)."""
    calls = []
    src = tiny_model_dir("llama")

    def stand_in(gguf, out, dtype):
        calls.append((gguf.name, dtype))
        for path in src.iterdir():
            shutil.copyfile(path, out / path.name)

    monkeypatch.setattr(dequantized, "dequantize", stand_in)
    return calls


def _logits(lm):
    enc = lm.tokenizer(["Question: 3 + 4?\nAnswer:"], return_tensors="pt")
    with torch.inference_mode():
        return lm.model(**enc).logits


def test_a_gguf_is_dequantized_once_and_every_later_load_reads_the_copy(tmp_path, counted, tiny_model_dir):
    gguf = _gguf(tmp_path / "m.gguf")
    first = load(str(gguf), dtype="float32", device="cpu")
    second = load(str(gguf), dtype="float32", device="cpu")
    assert counted == [("m.gguf", "float32")]  # an all-F32 GGUF keeps its precision
    folder = tmp_path / ".m.gguf.dequantized"
    record = json.loads((folder / "dequantized.json").read_text())
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert record["dtype"] == "float32" and record["size"] == gguf.stat().st_size
    assert first.source.kind == "gguf" and second.source.spec == str(gguf)
    reference = load(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    assert torch.equal(_logits(second), _logits(reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.gguf.dequantized", "m.gguf"]  # no leftovers


def test_a_touched_gguf_is_rehashed_not_rebuilt_and_a_changed_one_is_rebuilt(tmp_path, counted, caplog):
    gguf = _gguf(tmp_path / "m.gguf")
    load(str(gguf), dtype="float32", device="cpu")
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    load(str(gguf), dtype="float32", device="cpu")
    assert len(counted) == 1
    record = json.loads((tmp_path / ".m.gguf.dequantized" / "dequantized.json").read_text())
    assert record["mtime_ns"] == gguf.stat().st_mtime_ns
    _gguf(gguf, seed=1)  # other bytes
    load(str(gguf), dtype="float32", device="cpu")
    assert len(counted) == 2 and "was made from another file" in caplog.text
    record = json.loads((tmp_path / ".m.gguf.dequantized" / "dequantized.json").read_text())
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "delete-record", "delete-tokenizer"])
def test_a_damaged_copy_is_rebuilt(tmp_path, counted, damage):
    gguf = _gguf(tmp_path / "m.gguf")
    load(str(gguf), dtype="float32", device="cpu")
    folder = tmp_path / ".m.gguf.dequantized"
    if damage == "truncate":
        shard = folder / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "delete-record":
        (folder / "dequantized.json").unlink()
    else:
        (folder / "tokenizer_config.json").unlink()
    lm = load(str(gguf), dtype="float32", device="cpu")
    assert len(counted) == 2 and lm.n_layers == 4
    assert (folder / "dequantized.json").is_file() and (folder / "tokenizer_config.json").is_file()


def test_an_interrupted_dequantization_leaves_no_copy(tmp_path, monkeypatch):
    gguf = _gguf(tmp_path / "m.gguf")

    def interrupted(gguf, out, dtype):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dequantized, "dequantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(str(gguf), dtype="float32", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_fold_of_a_gguf_reuses_the_copy_and_links_its_shards(tmp_path, counted, capsys):
    gguf = _gguf(tmp_path / "m.gguf")
    g = torch.Generator().manual_seed(0)
    vec_path = SteeringVectors({layer: torch.randn(64, generator=g) for layer in (1, 2)}, 4, 64).save(
        tmp_path / "v.safetensors")
    for out in ("a", "b"):
        code = main(["--quiet", "fold", str(gguf), "--vectors", str(vec_path), "-o", str(tmp_path / out)])
        assert code == 0, capsys.readouterr().err
    assert len(counted) == 1
    base = tmp_path / "a" / "model-base.safetensors"
    assert base.stat().st_ino == (tmp_path / ".m.gguf.dequantized" / "model.safetensors").stat().st_ino
    info = json.loads((tmp_path / "b" / "unlock.json").read_text())
    assert info["verification"]["passed"]


def test_the_precision_follows_the_gguf_file_type(tmp_path):
    import gguf

    for file_type, want in ((0, "float32"), (1, "float16"), (32, "bfloat16"), (15, "bfloat16"), (7, "bfloat16")):
        path = tmp_path / f"t{file_type}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_file_type(file_type)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert dequantized.release_dtype(path) == want, file_type
