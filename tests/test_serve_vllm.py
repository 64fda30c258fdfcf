"""vLLM (CPU build, float32) serves the folded checkpoints unchanged: prompt logprobs match the
transformers additive-form reference and greedy text is identical. Qwen3 shows what vLLM does
with an o_proj-bias fold, and that `--model-impl transformers` is the supported route."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engines import hf_reference, run_script

from unlock_export.cli import main

pytestmark = pytest.mark.engines

TOL = 1e-4
GENERATE = 8


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()


def _reference_logprobs(logits: list[np.ndarray], ids: list[list[int]]) -> list[np.ndarray]:
    """log p(token p | tokens < p) for p >= 1, as vLLM's prompt_logprobs reports them."""
    return [_log_softmax(lg)[np.arange(len(seq) - 1), seq[1:]] for lg, seq in zip(logits, ids)]


def _vllm(model_dir, ids, model_impl="auto") -> dict:
    return run_script("vllm", "vllm_logprobs.py", {"model": str(model_dir), "prompts": ids, "generate": GENERATE,
                                                   "model_impl": model_impl})


def _fold(m, out, *extra) -> None:
    vec_path = m["vectors"].save(out.parent / f"{out.name}.vectors.safetensors")
    assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec_path), "-o", str(out), *extra]) == 0


def _check_matches(answer: dict, m: dict, vectors) -> float:
    assert "error" not in answer, answer.get("error")
    logits, greedy = hf_reference(m["dir"], vectors, m["ids"], generate=GENERATE)
    reference = _reference_logprobs(logits, m["ids"])
    diff = max(float(np.abs(np.array(r["prompt_logprobs"]) - ref).max())
               for r, ref in zip(answer["results"], reference))
    assert [r["tokens"] for r in answer["results"]] == greedy
    return diff


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_serves_folded_checkpoint(arch, served_tiny, tmp_path):
    m = served_tiny(arch)
    folded = tmp_path / "folded"
    _fold(m, folded)
    diff = _check_matches(_vllm(folded, m["ids"]), m, m["vectors"])
    assert diff <= TOL, f"vLLM prompt logprobs differ from the reference by {diff:.3g}"
    # and the steering is visible in vLLM's numbers: the unsteered model is far from them
    plain_logits, _ = hf_reference(m["dir"], None, m["ids"])
    steered_logits, _ = hf_reference(m["dir"], m["vectors"], m["ids"])
    effect = max(float(np.abs(a - b).max()) for a, b in zip(_reference_logprobs(plain_logits, m["ids"]),
                                                              _reference_logprobs(steered_logits, m["ids"])))
    assert effect > 100 * TOL


def test_vllm_qwen3_post_attention_fold(served_tiny, tmp_path):
    """A qwen3 fold puts the offset on o_proj's bias (post_attention site). vLLM's own qwen3 model
    has no o_proj bias; its transformers backend runs the checkpoint as transformers does."""
    from unlock_export.method.vectors import SteeringVectors

    m = served_tiny("qwen3")
    vectors = SteeringVectors(m["vectors"].directions, 4, 64, site="post_attention", model_hint="qwen3")
    m = dict(m, vectors=vectors)
    folded = tmp_path / "folded"
    _fold(m, folded)
    native = _vllm(folded, m["ids"])
    print(f"vLLM's own qwen3 on an o_proj-bias fold: {native.get('error') or 'loaded'}")
    if "error" not in native:  # loaded: the bias is then ignored, so it must not match the reference
        logits, _ = hf_reference(m["dir"], vectors, m["ids"])
        reference = _reference_logprobs(logits, m["ids"])
        diff = max(float(np.abs(np.array(r["prompt_logprobs"]) - ref).max())
                   for r, ref in zip(native["results"], reference))
        print(f"  max |dlogprob| vs the steered reference: {diff:.3g}")
        assert diff > 100 * TOL, "vLLM's qwen3 unexpectedly honours the o_proj bias: update the docs"
    via_transformers = _check_matches(_vllm(folded, m["ids"], model_impl="transformers"), m, vectors)
    assert via_transformers <= TOL
