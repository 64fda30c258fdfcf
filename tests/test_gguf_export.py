"""GGUF files written without an engine: control vectors, and the patch route's byte-level promises
(every untouched tensor copied byte for byte, q/k rows moved whole, keys relabelled). The engine
checks of the same files live in test_serve_llamacpp.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors


def _vectors(layers=(1, 2, 3), hint="qwen2", hidden=64, site="layer_output"):
    g = torch.Generator().manual_seed(0)
    return SteeringVectors({i: torch.randn(hidden, generator=g) for i in layers}, 4, hidden, site=site,
                           model_hint=hint)


def _fields(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_cvec_file_layout(tmp_path):
    vec = _vectors()
    vec_path = vec.save(tmp_path / "v.safetensors")
    out = tmp_path / "steer.gguf"
    assert main(["--quiet", "cvec", "--vectors", str(vec_path), "--scale", "2.5", "-o", str(out)]) == 0
    reader, fields = _fields(out)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "qwen2"
    assert fields["controlvector.layer_count"] == 3
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(got) == ["direction.1", "direction.2", "direction.3"]
    for layer in (1, 2, 3):
        assert got[f"direction.{layer}"].dtype == np.float32
        np.testing.assert_allclose(got[f"direction.{layer}"], vec.directions[layer].numpy() * 2.5, rtol=1e-6)


def test_cvec_refuses_layer_zero_and_other_sites(tmp_path, capsys):
    vec_path = _vectors(layers=(0, 1)).save(tmp_path / "v.safetensors")
    out = tmp_path / "steer.gguf"
    assert main(["cvec", "--vectors", str(vec_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "layer 0" in err and "--layers 1-3" in err and not out.exists()
    # selecting the steerable layers works, and gemma3 gets its llama.cpp name as the hint
    vec_path = _vectors(layers=(0, 1, 2), hint="gemma3_text").save(tmp_path / "g.safetensors")
    assert main(["--quiet", "cvec", "--vectors", str(vec_path), "--layers", "1-3", "-o", str(out)]) == 0
    assert _fields(out)[1]["controlvector.model_hint"] == "gemma3"
    assert main(["cvec", "--vectors", str(vec_path), "--layers", "1-3", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    vec_path = _vectors(site="post_attention").save(tmp_path / "p.safetensors")
    assert main(["cvec", "--vectors", str(vec_path), "-o", str(tmp_path / "p.gguf")]) == 2
    assert "site layer_output" in capsys.readouterr().err


def _fake_qwen2_gguf(path, config: dict, quantized: bool = True):
    """A GGUF with qwen2 metadata and tensor names, Q8_0 weights (random: only bytes are checked)."""
    import gguf
    from gguf.quants import quantize

    hidden, n_head, n_kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // n_head
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(hidden)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_context_length(256)
    writer.add_string("tokenizer.ggml.pre", "qwen2")
    rng = np.random.default_rng(0)

    def add(name, shape):
        data = rng.standard_normal(shape).astype(np.float32)
        if quantized and len(shape) == 2:
            writer.add_tensor(name, quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", (config["vocab_size"], hidden))
    for i in range(config["num_hidden_layers"]):
        add(f"blk.{i}.attn_q.weight", (n_head * head_dim, hidden))
        add(f"blk.{i}.attn_q.bias", (n_head * head_dim,))
        add(f"blk.{i}.attn_k.weight", (n_kv * head_dim, hidden))
        add(f"blk.{i}.attn_k.bias", (n_kv * head_dim,))
        add(f"blk.{i}.attn_v.weight", (n_kv * head_dim, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, config["intermediate_size"]))
    add("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_patch_route_keeps_bytes_relabels_and_permutes(tiny_model_dir, tmp_path):
    import json

    from unlock_export.export.gguf import _neox_to_llama_rows

    model_dir = tiny_model_dir("qwen2")
    config = json.loads((model_dir / "config.json").read_text())
    base = tmp_path / "base.gguf"
    _fake_qwen2_gguf(base, config)
    vec = _vectors()
    vec_path = vec.save(tmp_path / "v.safetensors")
    folded = tmp_path / "folded"
    assert main(["--quiet", "fold", str(model_dir), "--vectors", str(vec_path), "--scale", "3",
                 "-o", str(folded)]) == 0
    out = tmp_path / "patched.gguf"
    assert main(["--quiet", "gguf", str(folded), "--base", str(base), "-o", str(out)]) == 0

    src, src_fields = _fields(base)
    dst, dst_fields = _fields(out)
    assert dst_fields["general.architecture"] == "llama"
    assert dst_fields["llama.block_count"] == 4 and "qwen2.block_count" not in dst_fields
    assert dst_fields["tokenizer.ggml.pre"] == "qwen2"
    src_t = {t.name: t for t in src.tensors}
    dst_t = {t.name: t for t in dst.tensors}
    assert set(dst_t) == set(src_t) | {"blk.1.ffn_down.bias", "blk.2.ffn_down.bias", "blk.3.ffn_down.bias"}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for name, t in src_t.items():
        a, b = np.asarray(t.data), np.asarray(dst_t[name].data)
        assert dst_t[name].tensor_type == t.tensor_type
        if ".attn_q." in name or ".attn_k." in name:
            perm = _neox_to_llama_rows(a.shape[0], n_head if ".attn_q." in name else n_kv)
            assert np.array_equal(b, a[perm]) and not np.array_equal(a, b)
        else:
            assert a.tobytes() == b.tobytes(), name
    for layer in (1, 2, 3):
        np.testing.assert_allclose(np.asarray(dst_t[f"blk.{layer}.ffn_down.bias"].data),
                                   vec.directions[layer].numpy() * 3, rtol=1e-6)


def test_neox_permutation_matches_llama_converter_convention():
    """Rows [h0: x0..x3 | y0..y3] (rotate-half pairs x_i, y_i) become interleaved x0 y0 x1 y1 ..."""
    from unlock_export.export.gguf import _neox_to_llama_rows

    perm = _neox_to_llama_rows(16, 2)
    assert perm[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert perm[8:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def test_patch_route_refuses_mismatched_base(tiny_model_dir, tmp_path, capsys):
    import json

    model_dir = tiny_model_dir("qwen2")
    config = json.loads((model_dir / "config.json").read_text())
    other = dict(config, num_hidden_layers=3)
    base = tmp_path / "base.gguf"
    _fake_qwen2_gguf(base, other)
    vec_path = _vectors().save(tmp_path / "v.safetensors")
    folded = tmp_path / "folded"
    assert main(["--quiet", "fold", str(model_dir), "--vectors", str(vec_path), "-o", str(folded)]) == 0
    out = tmp_path / "patched.gguf"
    assert main(["gguf", str(folded), "--base", str(base), "-o", str(out)]) == 2
    assert "3 layers" in capsys.readouterr().err and not out.exists()
    # without --base, a fold of a local directory has no GGUF to patch
    assert main(["gguf", str(folded), "-o", str(out)]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["gguf", str(folded), "--route", "convert", "--llama-cpp", str(tmp_path), "-o", str(out)]) == 2
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err and not out.exists()


def test_recipe_gguf_step_writes_the_patched_gguf_and_control_vector(tiny_recipe, tmp_path, capsys):
    """A recipe with fold and gguf writes model.gguf (the fold patched into the target's GGUF) and
    control-vector.gguf (the folded vectors at the fold's scale), and prints how to serve each; the
    printed transformers command runs as it is."""
    import json
    import shlex
    import subprocess
    import sys

    import yaml

    path, raw = tiny_recipe
    config = json.loads((Path(raw["target"]["model"]) / "config.json").read_text())
    base = tmp_path / "target.gguf"
    _fake_qwen2_gguf(base, config, quantized=False)  # hidden 48: not a whole number of Q8_0 blocks
    raw = {**raw, "vectors": {"layers": "1--1"}, "fold": {"mode": "bias", "scale": 2.5},
           "gguf": {"model": True, "control_vector": True, "base": str(base)}, "diagnostics": {"enabled": False}}
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["--quiet", "run", str(path), str(out)]) == 0, capsys.readouterr().err
    vec = SteeringVectors.load(out / "vectors.safetensors")
    assert vec.layers == [1, 2]

    _, model_fields = _fields(out / "model.gguf")
    reader, cv_fields = _fields(out / "control-vector.gguf")
    assert cv_fields["general.architecture"] == "controlvector" and cv_fields["controlvector.layer_count"] == 2
    directions = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(directions) == {"direction.1", "direction.2"}
    patched = {t.name: np.asarray(t.data) for t in _fields(out / "model.gguf")[0].tensors}
    for layer in (1, 2):
        want = vec.directions[layer].numpy() * 2.5
        np.testing.assert_allclose(directions[f"direction.{layer}"], want, rtol=1e-6)
        np.testing.assert_allclose(patched[f"blk.{layer}.ffn_down.bias"], want, rtol=1e-6)
    assert "blk.0.ffn_down.bias" not in patched

    summary = json.loads((out / "summary.json").read_text())
    assert summary["gguf"]["control_vector"] == {"scale": 2.5, "layers": [1, 2], "dropped_layer_0": False}
    serve = {(row["engine"], row["artifact"]): row["command"] for row in summary["serve"]}
    assert serve[("llama.cpp", str(out / "model.gguf"))] == f"llama-server -m {out / 'model.gguf'} --port 8080"
    assert serve[("llama.cpp", str(out / "control-vector.gguf"))] == (
        f"llama-server -m {base} --control-vector {out / 'control-vector.gguf'} --port 8080")
    assert serve[("vllm", str(out / "model"))] == f"vllm serve {out / 'model'}"
    command = shlex.split(serve[("transformers", str(out / "model"))])
    assert command[0] == "python"
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.startswith("Question: What is 12 * 7 + 5?"), done.stderr[-500:]


def test_recipe_gguf_model_needs_a_bias_fold(tiny_recipe, capsys):
    import yaml

    path, raw = tiny_recipe
    path.write_text(yaml.safe_dump({**raw, "gguf": {"model": True}}))
    assert main(["--quiet", "run", "--dry-run", str(path), "unused"]) == 2
    assert "gguf.model patches a bias fold" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**raw, "gguf": {"control_vector": True}}))
    assert main(["--quiet", "run", "--dry-run", str(path), "unused"]) == 2
    assert "gguf.control_vector needs a scale" in capsys.readouterr().err
