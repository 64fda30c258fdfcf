"""The steering-vectors file format and layer selection."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unlock_export.errors import UserError
from unlock_export.method.vectors import FORMAT, SteeringVectors, parse_layers


def make(layers=(1, 2), n=4, d=8, site="layer_output"):
    return SteeringVectors({L: torch.randn(d) for L in layers}, n, d, site, "llama", {"source": "a", "rank": "4"})


def test_round_trip_and_llama_cpp_naming(tmp_path):
    vec = make()
    path = vec.save(tmp_path / "v.safetensors")
    with safe_open(str(path), "pt") as fh:
        assert sorted(fh.keys()) == ["direction.1", "direction.2"]
        meta = fh.metadata()
        assert fh.get_tensor("direction.1").dtype == torch.float32
    assert meta["format"] == FORMAT and meta["layer_count"] == "4" and meta["hidden_size"] == "8"
    assert meta["site"] == "layer_output" and meta["model_hint"] == "llama" and meta["source"] == "a"
    back = SteeringVectors.load(path)
    assert back.layers == [1, 2] and torch.equal(back.directions[1], vec.directions[1])
    assert back.provenance["rank"] == "4"


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1-2", 4) == [1, 2]
    assert parse_layers("0,3", 4) == [0, 3]
    assert parse_layers("-1", 4) == [3]
    assert parse_layers([2, 1], 4) == [1, 2]
    with pytest.raises(UserError, match="out of range"):
        parse_layers("7", 4)
    with pytest.raises(UserError, match="cannot read layers"):
        parse_layers("one", 4)


def test_invalid_vectors_are_refused(tmp_path):
    with pytest.raises(UserError, match="out of range"):
        SteeringVectors({5: torch.zeros(8)}, 4, 8)
    with pytest.raises(UserError, match="shape"):
        SteeringVectors({1: torch.zeros(7)}, 4, 8)
    with pytest.raises(UserError, match="unknown site"):
        make(site="middle")
    bad = tmp_path / "nan.safetensors"
    save_file({"direction.1": torch.tensor([float("nan")] * 8)}, str(bad),
              metadata={"format": FORMAT, "layer_count": "4", "hidden_size": "8"})
    with pytest.raises(UserError, match="NaN or inf"):
        SteeringVectors.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        SteeringVectors.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"direction.1": torch.zeros(8)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(UserError, match="not a steering-vectors file"):
        SteeringVectors.load(other)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)  # _io imports it when it writes
    with pytest.raises(OSError):
        make().save(tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_outputs_get_the_permissions_of_a_plain_write(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (owner-only); what lands has the umask's permissions."""
    import os

    from unlock_export._io import atomic_write_text, staging_dir

    old = os.umask(0o022)
    try:
        saved = make().save(tmp_path / "v.safetensors")
        text = atomic_write_text(tmp_path / "s.json", "{}")
        with staging_dir(tmp_path / "folder") as work:
            (work / "x").write_text("x")
    finally:
        os.umask(old)
    assert oct(saved.stat().st_mode & 0o777) == oct(0o644) and oct(text.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "folder").stat().st_mode & 0o777) == oct(0o755)
