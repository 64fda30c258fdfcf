"""The zoo's qwen2.5-coder-0.5b (Q4_K_M GGUF) folded and served by the real engines.

llama.cpp computes with the quantized weights (and quantized activations in its dot products)
while transformers runs their float32 dequantization, so logits are compared through the
steering's effect: the steered-minus-unsteered logit shift must point the same way in both
(cosine >= 0.99). The float32 routes (converted GGUF, vLLM) are compared value by value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engines import hf_reference, llama_cpp_src, llama_logits, run_script

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors

pytestmark = [pytest.mark.engines, pytest.mark.slow]

ZOO = "zoo:qwen2.5-coder-0.5b-instruct"
TEXTS = ["Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
         "in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
         "def fibonacci(n):"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from unlock_export.models.loading import load, resolve

    root = tmp_path_factory.mktemp("real-serve")
    source = resolve(ZOO)
    loaded = load(ZOO, dtype="float32", device="cpu")
    n_layers, hidden = loaded.n_layers, loaded.hidden_size
    ids = [loaded.tokenizer(t)["input_ids"] for t in TEXTS]
    del loaded
    generator = torch.Generator().manual_seed(3)
    directions = {}
    for layer in range(1, n_layers):
        v = torch.randn(hidden, generator=generator)
        directions[layer] = v / v.norm() * 4.0
    vectors = SteeringVectors(directions, n_layers, hidden, model_hint="qwen2")
    vec_path = vectors.save(root / "vectors.safetensors")
    folded = root / "folded"
    # float32: the zoo's own precision is bfloat16 (its dequantized copy), and the float32 routes below
    # are compared value by value with transformers' float32 run of the same weights
    assert main(["--quiet", "fold", ZOO, "--vectors", str(vec_path), "-o", str(folded), "--dtype", "float32"]) == 0
    gguf_file = source.path + "/" + source.gguf_file
    plain, _ = hf_reference(ZOO, None, ids)
    steered, greedy = hf_reference(ZOO, vectors, ids, generate=6)
    return {"root": root, "folded": folded, "gguf": gguf_file, "vectors": vectors, "ids": ids,
            "plain": plain, "steered": steered, "greedy": greedy}


def _shift_cosine(a_steered, a_plain, b_steered, b_plain) -> float:
    x = np.concatenate([(s - p).ravel() for s, p in zip(a_steered, a_plain)]).astype(np.float64)
    y = np.concatenate([(s - p).ravel() for s, p in zip(b_steered, b_plain)]).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_real_patched_q4km_gguf_in_llama_cpp(real, tmp_path, capsys):
    from pathlib import Path

    patched = tmp_path / "patched.gguf"
    assert main(["--json", "gguf", str(real["folded"]), "-o", str(patched)]) == 0  # base: the fold's zoo GGUF
    assert abs(patched.stat().st_size - Path(real["gguf"]).stat().st_size) < 1_000_000  # as small as the input
    plain = llama_logits(Path(real["gguf"]), real["ids"], tmp_path / "plain")["logits"]
    steered = llama_logits(patched, real["ids"], tmp_path / "steered")["logits"]
    cvec_path = tmp_path / "steer.gguf"
    assert main(["--quiet", "cvec", "--vectors", str(real["root"] / "vectors.safetensors"), "-o", str(cvec_path)]) == 0
    with_cvec = llama_logits(Path(real["gguf"]), real["ids"], tmp_path / "cvec", cvec=cvec_path)["logits"]
    cosine = _shift_cosine(steered, plain, real["steered"], real["plain"])
    cvec_cosine = _shift_cosine(with_cvec, plain, real["steered"], real["plain"])
    # the same quantized weights steered two ways: equal up to float order, which llama.cpp's
    # activation quantization (Q8 blocks in the dot products) turns into visible differences
    gap = max(float(np.abs(a - b).max()) for a, b in zip(steered, with_cvec))
    print(f"patched Q4_K_M: logit-shift cosine vs transformers {cosine:.5f}; control vector {cvec_cosine:.5f}; "
          f"patched vs control vector max |dlogit| {gap:.3g}")
    assert cosine >= 0.99 and cvec_cosine >= 0.99


def test_real_converted_f32_gguf_in_llama_cpp(real, tmp_path):
    from unlock_export.export.gguf import convert_gguf

    converted = tmp_path / "converted.gguf"
    convert_gguf(real["folded"], converted, llama_cpp=llama_cpp_src(), outtype="f32")
    run = llama_logits(converted, real["ids"], tmp_path / "c", generate=6)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(run["logits"], real["steered"]))
    print(f"converted f32: max |dlogit| vs transformers {diff:.3g}")
    assert _shift_cosine(run["logits"], real["plain"], real["steered"], real["plain"]) >= 0.999
    assert diff <= 1e-2
    assert run["continuations"] == real["greedy"]


def test_real_vllm_serves_folded(real):
    answer = run_script("vllm", "vllm_logprobs.py", {"model": str(real["folded"]), "prompts": real["ids"],
                                                     "generate": 6})
    assert "error" not in answer, answer.get("error")
    diffs = []
    for r, logits, seq in zip(answer["results"], real["steered"], real["ids"]):
        ref = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()[np.arange(len(seq) - 1), seq[1:]]
        diffs.append(float(np.abs(np.array(r["prompt_logprobs"]) - ref).max()))
    print(f"vLLM: max |dlogprob| vs transformers {max(diffs):.3g}")
    # float32 end to end; 24 layers and a 151,936-token softmax in another kernel order put the
    # real model at about 1.0e-4 (tiny models: well under 1e-4), hence 2e-4 here
    assert max(diffs) <= 2e-4
    assert [r["tokens"] for r in answer["results"]] == real["greedy"]
