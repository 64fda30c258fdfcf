"""Runs inside the llama-cpp-python venv. Request (stdin JSON): model, cvec (GGUF or null), prompts
(token id lists), out_dir, generate (greedy steps). Answer (JSON at request's answer_path): .npy paths of the
logits at every prompt position, greedy continuations, and the control vector's layers."""

import ctypes
import json
import sys
from pathlib import Path

import numpy as np


def read_cvec(path, n_layer, n_embd):
    """llama.cpp's control-vector layout: direction.L at offset (L - 1) * n_embd, L >= 1."""
    import gguf

    data = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    layers = []
    for t in gguf.GGUFReader(path).tensors:
        layer = int(t.name.split(".")[1])
        assert layer >= 1, "llama.cpp never steers layer 0"
        data[(layer - 1) * n_embd:layer * n_embd] += np.asarray(t.data, dtype=np.float32).reshape(-1)
        layers.append(layer)
    return data, sorted(layers)


def main():
    req = json.loads(sys.stdin.read())
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=req["model"], n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, n_threads=2, seed=0)
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    layers = []
    if req.get("cvec"):
        data, layers = read_cvec(req["cvec"], n_layer, n_embd)
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                              data.size, n_embd, 1, n_layer - 1)
        assert rc == 0, f"llama_set_adapter_cvec returned {rc}"
    out_dir = Path(req["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, continuations = [], []
    for i, ids in enumerate(req["prompts"]):
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
        path = out_dir / f"logits-{i}.npy"
        np.save(path, logits)
        paths.append(str(path))
        generated = []
        for _ in range(req.get("generate", 0)):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
        continuations.append(generated)
    Path(req["answer_path"]).write_text(json.dumps({"logits": paths, "continuations": continuations, "cvec_layers": layers,
                      "n_layer": n_layer, "n_embd": n_embd}))


if __name__ == "__main__":
    main()
