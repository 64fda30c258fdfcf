"""Property-based tests (hypothesis): the recipe loader and the vectors-file reader, fed random and
malformed input, either return a valid object or raise UserError (one line, exit code 2 at the
CLI); never another exception."""

from __future__ import annotations

import json
import string
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unlock_export.errors import UserError
from unlock_export.method.vectors import FORMAT, SteeringVectors
from unlock_export.recipe.spec import load_recipe

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=20))
yaml_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(string.ascii_letters + "_.", max_size=12), children,
                                                    max_size=4)), max_leaves=12)
KEYS = ["name", "source", "target", "prompts", "key", "align", "vectors", "fold", "diagnostics", "push", "runtime"]


def _valid_recipe() -> dict:
    return {"name": "p", "source": {"locked": {"model": "org/a", "template": "direct"},
                                    "unlocked": {"model": "org/a", "template": "cot"}},
            "target": {"model": "org/b"}, "prompts": {"path": "builtin:arithmetic", "key_count": 4}}


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=6))
def test_recipe_loader_random_mappings(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        recipe = load_recipe(path)
    except UserError as exc:
        assert "\n" not in str(exc).strip()
    else:  # accepted: what it holds is what the file said
        assert recipe.source.locked.model == data["source"]["locked"]["model"]
        assert recipe.target.model == data["target"]["model"]


@SETTINGS
@given(section=st.sampled_from(KEYS), value=yaml_values)
def test_recipe_loader_one_damaged_section(tmp_path, section, value):
    data = _valid_recipe()
    data[section] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        recipe = load_recipe(path)
    except UserError as exc:
        assert str(exc).startswith(f"recipe {path}") or "--repo-id" in str(exc), str(exc)
    else:
        assert recipe.source.locked.model == "org/a"


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_recipe_loader_random_bytes(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    try:
        recipe = load_recipe(path)
    except UserError as exc:
        assert "\n" not in str(exc).strip() and str(exc).startswith(f"recipe {path}"), str(exc)
    else:  # random bytes that happen to be a valid recipe: it round-trips through the schema
        assert type(recipe).model_validate(recipe.model_dump()) == recipe


def _vectors_bytes(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=meta)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@settings(SETTINGS, max_examples=150)
@given(layers=st.dictionaries(st.integers(-2, 12), st.sampled_from(["fits", "fits", "fits", "short", "empty"]),
                              min_size=0, max_size=4),
       layer_count=st.sampled_from(["4", "8", "8", "x", "-1"]), hidden=st.sampled_from(["8", "16", "0"]),
       bad=st.sampled_from([None, None, "nan", "inf", "name"]),
       site=st.sampled_from(["layer_output", "layer_output", "post_attention", "z"]),
       dtype=st.sampled_from(sorted(DTYPES)), form=st.sampled_from(["flat", "row", "column", "matrix"]),
       alias=st.booleans())
def test_vectors_reader_valid_or_refused(tmp_path, layers, layer_count, hidden, bad, site, dtype, form, alias):
    """Files from elsewhere too: half precision (converted), [1, N] and [N, 1] (read as N values),
    matrices and two names for one layer (`direction.1`, `direction.01`: refused), negative layers."""
    tensors = {}
    for layer, fit in layers.items():
        size = {"fits": int(hidden), "short": max(int(hidden) - 1, 1), "empty": 0}[fit]
        t = torch.randn(size).to(DTYPES[dtype])
        if bad in ("nan", "inf") and t.numel():
            t[0] = float(bad)
        shape = {"flat": (size,), "row": (1, size), "column": (size, 1),
                 "matrix": (2, size // 2) if size >= 4 and size % 2 == 0 else (size,)}[form]
        tensors[f"direction.{layer}" if bad != "name" else f"dir{layer}"] = t.reshape(shape)
    if alias and layers and bad != "name":
        first = min(layers)
        tensors[f"direction.0{first}" if first >= 0 else "direction.-0"] = tensors[f"direction.{first}"].clone()
    meta = {"format": FORMAT, "layer_count": layer_count, "hidden_size": hidden, "site": site}
    path = tmp_path / "v.safetensors"
    path.write_bytes(_vectors_bytes(tensors, meta))
    try:
        vectors = SteeringVectors.load(path)
    except UserError as exc:
        assert "\n" not in str(exc)
    else:  # accepted: exactly the tensors written, as float32 vectors, with the metadata given
        assert all(torch.isfinite(v).all() and v.shape == (vectors.hidden_size,) for v in vectors.directions.values())
        assert all(v.dtype == torch.float32 for v in vectors.directions.values())
        assert all(0 <= k < vectors.layer_count for k in vectors.directions)
        assert vectors.layer_count == int(layer_count) and vectors.hidden_size == int(hidden) and vectors.site == site
        assert len(tensors) == len(vectors.directions) == len(layers)  # no layer read from two tensors
        assert sorted(vectors.directions) == sorted(layers)
        for layer, vector in vectors.directions.items():
            written = tensors[f"direction.{layer}"]
            assert sum(d != 1 for d in written.shape) <= 1  # a matrix is never read as a vector
            assert torch.equal(vector, written.float().reshape(-1))


@SETTINGS
@given(hidden=st.sampled_from([8, 16]), steered=st.sets(st.integers(0, 9), min_size=1, max_size=4),
       declared=st.one_of(st.none(), st.integers(1, 12)), target_layers=st.integers(1, 10),
       target_hidden=st.sampled_from([8, 16]), gguf_type=st.sampled_from(["F32", "F16", "BF16"]))
def test_control_vector_reader_against_a_target(tmp_path, hidden, steered, declared, target_layers, target_hidden,
                                                gguf_type):
    """A control-vector GGUF fits a target exactly when its hidden size matches, the target has every layer it
    steers, and its controlvector.layer_count (when stated) is not more than the target's layer count."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(len(steered) * 100 + hidden)
    values = {layer: rng.standard_normal(hidden).astype(np.float32) for layer in sorted(steered)}
    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    if declared is not None:
        writer.add_uint32("controlvector.layer_count", declared)
    for layer, value in values.items():
        if gguf_type == "F16":
            writer.add_tensor(f"direction.{layer}", value.astype(np.float16))
        elif gguf_type == "BF16":
            writer.add_tensor(f"direction.{layer}", (value.view(np.uint32) >> 16).astype(np.uint16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(f"direction.{layer}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vectors = SteeringVectors.load(path)
    fits = (hidden == target_hidden and max(steered) < target_layers
            and (declared is None or declared <= target_layers))
    try:
        fitted = vectors.for_model(target_layers, target_hidden)
    except UserError as exc:
        assert not fits and "\n" not in str(exc), str(exc)
    else:
        assert fits and fitted.layer_count == target_layers and fitted.layers == sorted(steered)
        for layer, value in values.items():
            expected = {"F32": value, "F16": value.astype(np.float16).astype(np.float32),
                        "BF16": ((value.view(np.uint32) >> 16) << 16).astype(np.uint32).view(np.float32)}[gguf_type]
            assert np.array_equal(fitted.directions[layer].numpy(), expected)


@SETTINGS
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_vectors_reader_damaged_bytes(tmp_path, cut, flips):
    good = SteeringVectors({1: torch.ones(8), 2: torch.ones(8)}, 4, 8, model_hint="llama")
    data = bytearray(_vectors_bytes({f"direction.{k}": v for k, v in good.directions.items()},
                                    {"format": FORMAT, "layer_count": "4", "hidden_size": "8"}))
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    path = tmp_path / "v.safetensors"
    path.write_bytes(bytes(data[: max(0, len(data) - cut)] if cut else data))
    try:
        vectors = SteeringVectors.load(path)
    except UserError as exc:
        assert "\n" not in str(exc)
    else:  # damage that left a valid file (bytes in padding, say): every vector has the declared size
        assert all(v.shape == (vectors.hidden_size,) and torch.isfinite(v).all() for v in vectors.directions.values())
        assert set(vectors.directions) <= set(range(vectors.layer_count))


def test_header_length_overflow_is_refused(tmp_path):
    path = tmp_path / "v.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + json.dumps({}).encode())
    with pytest.raises(UserError, match="not a readable safetensors file"):
        SteeringVectors.load(path)
