"""Vectors made elsewhere: llama.cpp control vectors (written here with gguf-py in repeng's layout, not
with this package's writer) and bare direction.N safetensors fold, steer and convert exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors


def repeng_gguf(path, directions: dict[int, np.ndarray], model_hint: str = "llama"):
    """A control vector as repeng's ControlVector.export_gguf writes it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _directions(hidden: int, layers=(1, 2, 3), seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal(hidden).astype(np.float32) for layer in layers}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_repeng_control_vector_folds_exactly(arch, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlock_export.method.steer import additive_steering
    from unlock_export.models.loading import load

    model_dir = tiny_model_dir(arch)
    steer = repeng_gguf(tmp_path / "steer.gguf", _directions(64), model_hint=arch)
    out = tmp_path / "folded"
    assert main(["--quiet", "fold", str(model_dir), "--vectors", str(steer), "--scale", "1.5", "-o", str(out)]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "unlock.json").read_text())["layers"] == [1, 2, 3]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["Question: What is 2 + 3?\nAnswer:"], return_tensors="pt")
    folded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = load(str(model_dir), dtype="float32", device="cpu")
    vectors = SteeringVectors.load(steer)
    with torch.no_grad(), additive_steering(base, vectors, 1.5):
        reference = base.model(**ids).logits
    with torch.no_grad():
        got = folded(**ids).logits
        plain = base.model(**ids).logits
    assert float((got - reference).abs().max()) <= 1e-4 < float((plain - reference).abs().max())


def test_a_control_vector_that_does_not_fit_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path, capsys):
    model_dir = str(tiny_model_dir("llama"))
    for name, directions, reason in [("wide", _directions(96), "size 96"),
                                     ("deep", _directions(64, layers=(1, 7)), "steer layer 7")]:
        steer = repeng_gguf(tmp_path / f"{name}.gguf", directions)
        out = tmp_path / f"out-{name}"
        assert main(["--quiet", "fold", model_dir, "--vectors", str(steer), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err
        assert not out.exists() and not any(p.name.startswith(f".out-{name}") for p in tmp_path.iterdir())
    not_a_cvec = tmp_path / "model.gguf"
    import gguf

    writer = gguf.GGUFWriter(str(not_a_cvec), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert main(["--quiet", "fold", model_dir, "--vectors", str(not_a_cvec), "-o", str(tmp_path / "o")]) == 2
    assert "not a control vector" in capsys.readouterr().err


def test_vectors_import_and_export_round_trip(tmp_path, capsys):
    directions = _directions(32, layers=(1, 4))
    steer = repeng_gguf(tmp_path / "steer.gguf", directions, model_hint="qwen2")
    imported = tmp_path / "steer.safetensors"
    assert main(["--quiet", "vectors", "import", str(steer), "-o", str(imported)]) == 0
    vectors = SteeringVectors.load(imported)
    assert vectors.layers == [1, 4] and vectors.hidden_size == 32 and vectors.model_hint == "qwen2"
    for layer, direction in directions.items():
        assert np.array_equal(vectors.directions[layer].numpy(), direction)
    exported = tmp_path / "again.gguf"
    assert main(["--quiet", "vectors", "export", str(imported), "--scale", "2", "-o", str(exported)]) == 0
    back = SteeringVectors.load(exported)
    for layer, direction in directions.items():
        np.testing.assert_allclose(back.directions[layer].numpy(), 2 * direction, rtol=1e-6)
    assert main(["--quiet", "vectors", "import", str(steer), "-o", str(imported)]) == 2  # no silent overwrite


def test_bare_direction_tensors_are_read_with_a_warning(tiny_model_dir, tmp_path, caplog, capsys):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({f"direction.{k}": torch.from_numpy(v) for k, v in _directions(64).items()}, str(bare))
    with caplog.at_level("WARNING", logger="unlock_export"):
        vectors = SteeringVectors.load(bare)
    assert "has no steering-vectors metadata" in caplog.text and vectors.layers == [1, 2, 3]
    assert main(["--quiet", "fold", str(tiny_model_dir("llama")), "--vectors", str(bare), "-o",
                 str(tmp_path / "folded")]) == 0, capsys.readouterr().err


def test_eval_steers_with_a_control_vector(tiny_model_dir, tmp_path, capsys):
    math_set = tmp_path / "m.jsonl"
    math_set.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}) + "\n"
                                for a, b in [(2, 3), (4, 5)]))
    steer = repeng_gguf(tmp_path / "steer.gguf", _directions(64))
    common = ["--quiet", "eval", str(tiny_model_dir("llama")), "--data", str(math_set), "--max-new-tokens", "5"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    assert main([*common, "--vectors", str(steer), "--form", "additive", "--scale", "3", "-o",
                 str(tmp_path / "steered")]) == 0, capsys.readouterr().err
    outputs = [[json.loads(line)["output"] for line in (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
               for run in ("plain", "steered")]
    assert outputs[0] != outputs[1]


def test_an_imported_control_vector_still_fits_any_deep_enough_model(tiny_model_dir, tmp_path, capsys):
    """`vectors import` keeps "made elsewhere": the file's layer count stays a lower bound, so the vectors
    of layers 1-2 fold into a 4-layer model (as the GGUF itself does), with provenance added."""
    steer = repeng_gguf(tmp_path / "steer.gguf", _directions(64, layers=(1, 2)))
    imported = tmp_path / "steer.safetensors"
    assert main(["--quiet", "vectors", "import", str(steer), "-o", str(imported)]) == 0
    vectors = SteeringVectors.load(imported)
    assert not vectors.layer_count_known and vectors.declared_layers == 2
    out = tmp_path / "folded"
    assert main(["--quiet", "fold", str(tiny_model_dir("llama")), "--vectors", str(imported), "-o", str(out)]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "unlock.json").read_text())["layers"] == [1, 2]
