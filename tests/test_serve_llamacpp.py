"""llama.cpp runs the exports unchanged: patched GGUF (route a), converted GGUF (route b) and
control vectors, checked against the transformers additive-form reference with the real engine.

Tiny models use real tokenizers (ones llama.cpp's converter recognizes, see conftest.py), head
size 32, float32 weights and an F32 KV cache, so the engines must agree to max |dlogit| <= 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SERVED_TEXTS as TEXTS
from engines import hf_reference, llama_completion, llama_cpp_src, llama_logits, llama_server

pytestmark = pytest.mark.engines

TOL = 1e-4


@pytest.fixture(scope="module")
def served(served_tiny):
    """served(arch) -> served_tiny(arch) plus `base`: its float32 GGUF from llama.cpp's converter."""
    from unlock_export.export.gguf import convert_gguf

    def make(arch):
        m = served_tiny(arch)
        if "base" not in m:
            m["base"] = m["root"] / "base-f32.gguf"
            convert_gguf(m["dir"], m["base"], llama_cpp=llama_cpp_src(), outtype="f32")
        return m

    return make


def max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folded_gguf_routes_and_control_vector_match_reference(arch, served, tmp_path):
    from unlock_export.cli import main
    from unlock_export.export.gguf import convert_gguf, patch_gguf, write_control_vector_gguf

    m = served(arch)
    vec_path = m["vectors"].save(tmp_path / "v.safetensors")
    folded = tmp_path / "folded"
    assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec_path), "-o", str(folded)]) == 0
    patched = tmp_path / "patched.gguf"
    info = patch_gguf(folded, patched, base=str(m["base"]))
    assert info["biases_added"] == [f"blk.{i}.ffn_down.bias" for i in (1, 2, 3)]
    if arch == "qwen2":
        assert info["relabelled_from"] == "qwen2" and info["qk_rows_permuted"]
    converted = tmp_path / "converted.gguf"
    convert_gguf(folded, converted, llama_cpp=llama_cpp_src(), outtype="f32")
    cvec = tmp_path / "steer.gguf"
    write_control_vector_gguf(m["vectors"], cvec)

    plain, _ = hf_reference(m["dir"], None, m["ids"])
    reference, ref_greedy = hf_reference(m["dir"], m["vectors"], m["ids"], generate=8)
    effect = max_diff(plain, reference)
    assert effect > 0.1, "the vectors must move the logits for this test to mean anything"

    base_run = llama_logits(m["base"], m["ids"], tmp_path / "base")
    assert max_diff(base_run["logits"], plain) <= TOL  # the unsteered conversion itself is exact
    for name, run in [("patched", llama_logits(patched, m["ids"], tmp_path / "p", generate=8)),
                      ("converted", llama_logits(converted, m["ids"], tmp_path / "c", generate=8)),
                      ("cvec", llama_logits(m["base"], m["ids"], tmp_path / "v", cvec=cvec, generate=8))]:
        diff = max_diff(run["logits"], reference)
        assert diff <= TOL, f"{name}: max |dlogit| {diff:.3g} vs the transformers reference (effect {effect:.3g})"
        assert run["continuations"] == ref_greedy, name
    assert llama_logits(m["base"], m["ids"][:1], tmp_path / "v2", cvec=cvec)["cvec_layers"] == [1, 2, 3]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_control_vector_cli_equals_reference_text(arch, served, tmp_path):
    """llama-completion --control-vector gives the transformers reference's greedy text (and, for
    foldable families, the folded GGUF's)."""
    from unlock_export.export.gguf import patch_gguf, write_control_vector_gguf

    m = served(arch)
    cvec = tmp_path / "steer.gguf"
    write_control_vector_gguf(m["vectors"], cvec)
    with_cvec = llama_completion(m["base"], TEXTS[1], 12, cvec=cvec)
    unsteered = llama_completion(m["base"], TEXTS[1], 12)
    _, ref_greedy = hf_reference(m["dir"], m["vectors"], m["ids"][1:], generate=12)
    expected = m["tokenizer"].decode(ref_greedy[0])
    assert with_cvec == expected.rstrip("\n")
    assert unsteered != with_cvec, "the control vector must change the greedy text for this test to mean anything"
    if arch != "gemma3":
        from unlock_export.cli import main

        vec_path = m["vectors"].save(tmp_path / "v.safetensors")
        assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec_path), "-o", str(tmp_path / "f")]) == 0
        patch_gguf(tmp_path / "f", tmp_path / "patched.gguf", base=str(m["base"]))
        assert llama_completion(tmp_path / "patched.gguf", TEXTS[1], 12) == with_cvec


def test_gemma3_control_vector_binding_matches_reference(served, tmp_path):
    """Gemma 3 cannot be folded, but its control vector runs in llama.cpp. Its GELU is evaluated
    through a float16 lookup table in ggml, so the conversion itself is off by a few 1e-4 here: the
    steered run must be no further from the steered reference than the plain run is from the plain
    reference (plus 1e-4)."""
    from unlock_export.export.gguf import write_control_vector_gguf

    m = served("gemma3")
    cvec = tmp_path / "steer.gguf"
    write_control_vector_gguf(m["vectors"], cvec)
    reference, _ = hf_reference(m["dir"], m["vectors"], m["ids"])
    plain, _ = hf_reference(m["dir"], None, m["ids"])
    engine_plain = max_diff(llama_logits(m["base"], m["ids"], tmp_path / "p")["logits"], plain)
    engine_steered = max_diff(llama_logits(m["base"], m["ids"], tmp_path / "g", cvec=cvec)["logits"], reference)
    print(f"gemma3: plain {engine_plain:.3g}, steered {engine_steered:.3g}")
    assert engine_plain <= 2e-3
    assert engine_steered <= 1.5 * engine_plain + TOL
    assert max_diff(plain, reference) > 0.1


def test_llama_server_serves_folded_gguf(served, tmp_path):
    """llama-server on 127.0.0.1 with a patched GGUF: the OpenAI-compatible API's greedy completion
    equals the transformers reference text. The server is bounded in time and always stopped."""
    from unlock_export.cli import main
    from unlock_export.export.gguf import patch_gguf

    m = served("qwen2")
    vec_path = m["vectors"].save(tmp_path / "v.safetensors")
    assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec_path), "-o", str(tmp_path / "f")]) == 0
    patched = tmp_path / "patched.gguf"
    patch_gguf(tmp_path / "f", patched, base=str(m["base"]))
    _, ref_greedy = hf_reference(m["dir"], m["vectors"], m["ids"][1:], generate=10)
    expected = m["tokenizer"].decode(ref_greedy[0])

    with llama_server(["-m", str(patched)], tmp_path / "server.log", ctx=512) as post:
        answer = post("/v1/completions", {"prompt": TEXTS[1], "max_tokens": 10, "temperature": 0, "top_k": 1})
    assert answer["choices"][0]["text"] == expected


def test_eval_llamacpp_engine_matches_transformers(served, tmp_path, capsys):
    """`eval --engine llamacpp` (a stock llama-server with the vectors as a control vector) gives
    the same greedy answers as `eval --engine transformers` with the additive hooks."""
    from unlock_export.cli import main

    m = served("llama")
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                            for q, a in [("What is 2 plus 3?", 5), ("The capital of France is", 0),
                                         ("Tom has 3 apples and buys 4 more. How many?", 7)]))
    vec_path = m["vectors"].save(tmp_path / "v.safetensors")
    common = ["--data", str(data), "--max-new-tokens", "8", "--vectors", str(vec_path), "--form", "additive",
              "--scale", "1", "--template", "plain"]
    assert main(["--quiet", "eval", str(m["base"]), "--engine", "llamacpp", "--parallel", "2", *common,
                 "-o", str(tmp_path / "cpp")]) == 0, capsys.readouterr().err
    assert main(["--quiet", "eval", str(m["dir"]), *common, "-o", str(tmp_path / "hf")]) == 0
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    cpp, hf = read("cpp"), read("hf")
    assert [r["output"] for r in cpp] == [r["output"] for r in hf]
    assert json.loads((tmp_path / "cpp" / "summary.json").read_text())["engine"] == "llamacpp"
