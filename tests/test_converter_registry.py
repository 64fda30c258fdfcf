"""GGUF converters are plug-ins: a toy converter registered with one line of CONVERTERS is a choice of
`gguf --route` with its help, runs through `gguf` and `write_gguf`, and the options a converter does
not declare are refused in one line that names them (never ignored), for the shipped converters too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unlock_export.cli import main
from unlock_export.errors import UserError
from unlock_export.export import converters
from unlock_export.export.converters import Converter, converter_names, write_gguf
from unlock_export.method.vectors import SteeringVectors


def _toy_write(folded, out: Path, *, overwrite: bool = False, tag: str | None = None) -> dict:
    """A GGUF holding the fold's offsets file as one tensor per stored offset (the toy's whole format)."""
    import gguf
    from safetensors.numpy import load_file

    offsets = load_file(str(Path(folded) / "model-unlock-offsets.safetensors"))
    writer = gguf.GGUFWriter(str(out), "toy")
    writer.add_string("toy.tag", tag or "none")
    for name, value in sorted(offsets.items()):
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"out": str(out), "tensors": sorted(offsets)}


TOY = Converter("toy", "the offsets alone, as a toy GGUF", "fold", ("tag",), _toy_write,
                lambda info, out: f"wrote {out} (toy: {len(info['tensors'])} tensors)")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(converters.CONVERTERS, "toy", TOY)  # the one registry line
    return TOY


@pytest.fixture
def folded(tiny_model_dir, tmp_path) -> Path:
    generator = torch.Generator().manual_seed(0)
    vectors = SteeringVectors({1: torch.randn(64, generator=generator)}, 4, 64).save(tmp_path / "v.safetensors")
    out = tmp_path / "folded"
    assert main(["--quiet", "fold", str(tiny_model_dir("llama")), "--vectors", str(vectors), "-o", str(out)]) == 0
    return out


def test_registry_lists_the_shipped_converters_by_what_they_read():
    assert converter_names("fold") == ["patch", "convert"]
    assert converter_names("adapter") == ["lora"] and converter_names("vectors") == ["control-vector"]
    assert all(converters.converter(n).reads in converters.READS for n in converter_names())


def test_a_registered_converter_is_a_gguf_route_and_runs(toy, folded, tmp_path, capsys):
    capsys.readouterr()
    assert main(["gguf", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--route [patch|convert|toy]" in help_text  # the choices are read from the registry when asked
    assert "convert: llama.cpp's convert_hf_to_gguf.py on the folded checkpoint" in help_text
    out = tmp_path / "toy.gguf"
    assert main(["gguf", str(folded), "--route", "toy", "-o", str(out)]) == 0
    import gguf
    from safetensors.numpy import load_file

    stored = load_file(str(folded / "model-unlock-offsets.safetensors"))
    assert f"(toy: {len(stored)} tensors)" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert [t.name for t in reader.tensors] == sorted(stored)
    for tensor in reader.tensors:
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(-1), stored[tensor.name].reshape(-1))
    # the options it declares reach it; the ones it does not are refused
    info = write_gguf("toy", folded, tmp_path / "tagged.gguf", tag="x")
    assert info["tensors"] == sorted(stored)
    with pytest.raises(UserError, match="the toy converter .* takes --tag, not --base: drop --base"):
        write_gguf("toy", folded, tmp_path / "no.gguf", base="x.gguf")
    assert not (tmp_path / "no.gguf").exists()


@pytest.mark.parametrize("route, extra, flag", [
    ("patch", ["--outtype", "f16"], "--outtype"),
    ("patch", ["--llama-cpp", "."], "--llama-cpp"),
    ("convert", ["--base", "b.gguf"], "--base"),
])
def test_options_another_converter_takes_are_refused(route, extra, flag, folded, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert main(["--quiet", "gguf", str(folded), "--route", route, *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the {route} converter" in err and f"drop {flag}" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unknown_converter_is_refused_with_the_choices():
    with pytest.raises(UserError, match="unknown converter 'nope': use patch or convert or lora or control-vector"):
        write_gguf("nope", None, "x.gguf")


def test_cvec_runs_through_the_registry(tmp_path, capsys):
    vectors = SteeringVectors({1: torch.ones(8), 2: torch.ones(8)}, 3, 8, model_hint="qwen2")
    path = vectors.save(tmp_path / "v.safetensors")
    out = tmp_path / "c.gguf"
    assert main(["--json", "cvec", "--vectors", str(path), "--scale", "2", "-o", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [1, 2] and info["scale"] == 2 and info["model_hint"] == "qwen2"
