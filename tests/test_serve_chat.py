"""The served chat path: a chat client talks to a stock server's /v1/chat/completions, and the server
applies the model's own chat template. On a fold that must give the text transformers gives when the
same template is applied by the tokenizer and the hooks steer: llama-server on the patched GGUF, vLLM on
the bias checkpoint (tiny Qwen2 with Qwen2.5's real tokenizer and chat template, float32)."""

from __future__ import annotations

import pytest
from engines import hf_reference, llama_cpp_src

from unlock_export.cli import main

pytestmark = pytest.mark.engines

QUESTIONS = ["What is 2 plus 3?", "Name a colour."]
TOKENS = 10


@pytest.fixture(scope="module")
def chat_fold(served_tiny, tmp_path_factory):
    """The tiny qwen2's bias fold, its patched GGUF, and transformers' steered greedy reply to each
    question under the tokenizer's own chat template."""
    from unlock_export.export.gguf import convert_gguf, patch_gguf

    m = served_tiny("qwen2")
    root = tmp_path_factory.mktemp("chat")
    assert m["tokenizer"].chat_template, "the served tokenizer has no chat template"
    vec_path = m["vectors"].save(root / "v.safetensors")
    folded = root / "folded"
    assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec_path), "--dtype", "float32",
                 "-o", str(folded)]) == 0
    base = root / "base-f32.gguf"
    convert_gguf(m["dir"], base, llama_cpp=llama_cpp_src(), outtype="f32")
    patched = root / "patched.gguf"
    patch_gguf(folded, patched, base=str(base))
    texts = [m["tokenizer"].apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in QUESTIONS]
    ids = [m["tokenizer"](text, add_special_tokens=False)["input_ids"] for text in texts]
    _, greedy = hf_reference(m["dir"], m["vectors"], ids, generate=TOKENS)
    _, plain = hf_reference(m["dir"], None, ids, generate=TOKENS)
    decode = m["tokenizer"].decode
    return {"folded": folded, "patched": patched, "expected": [decode(g, skip_special_tokens=True) for g in greedy],
            "unsteered": [decode(g, skip_special_tokens=True) for g in plain]}


def test_llama_server_chat_endpoint_gives_the_chat_templated_reference(chat_fold):
    from engines import llama_bin

    from unlock_export.evaluation.engines.llama_server import LlamaServerEngine

    with LlamaServerEngine(chat_fold["patched"], server=str(llama_bin("llama-server")), parallel=1) as server:
        replies = [server.chat([{"role": "user", "content": q}], TOKENS)[0] for q in QUESTIONS]
    assert replies == chat_fold["expected"]
    assert replies != chat_fold["unsteered"]  # the fold's steering is in the served text


def test_vllm_chat_endpoint_gives_the_chat_templated_reference(chat_fold):
    from engines import engine_python

    from unlock_export.evaluation.engines.vllm_server import VllmServerEngine

    with VllmServerEngine(chat_fold["folded"], str(engine_python("vllm")), parallel=2, max_model_len=256,
                          dtype="float32") as server:
        replies = [server.chat([{"role": "user", "content": q}], TOKENS)[0] for q in QUESTIONS]
    assert replies == chat_fold["expected"]
    assert replies != chat_fold["unsteered"]
