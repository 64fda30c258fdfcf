"""`eval` on the stock servers: vLLM gives the transformers engine's answers on the same checkpoint,
and a server lost mid-run stops the eval in one line with its progress kept, which `--resume` then
finishes exactly. The refusals and the executable lookup need no engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlock_export.cli import main

QUESTIONS = [("What is 2 plus 3?", 5), ("The capital of France is", 0),
             ("Tom has 3 apples and buys 4 more. How many?", 7), ("Ann reads 5 pages a day for 3 days.", 15)]


def _data(path: Path, questions=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in questions))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def _fold(m, tmp_path) -> Path:
    vec_path = m["vectors"].save(tmp_path / "v.safetensors")
    folded = tmp_path / "folded"
    assert main(["--quiet", "fold", str(m["dir"]), "--vectors", str(vec_path), "-o", str(folded)]) == 0
    return folded


# -- no engine needed ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--vectors", "{vectors}", "--form", "additive"], "the vllm engine runs no additive steering hooks"),
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1"),
])
def test_vllm_engine_refusals(tmp_path, capsys, tiny_model_dir, extra, message):
    from unlock_export.method.vectors import SteeringVectors

    vec = SteeringVectors({1: __import__("torch").ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    extra = [x.format(vectors=vec) for x in extra]
    src = tiny_model_dir("llama")
    capsys.readouterr()  # the fixture's own output
    code = main(["--quiet", "eval", str(src), "--engine", "vllm", "--data",
                 str(_data(tmp_path / "d.jsonl")), *extra, "-o", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev" / "summary.json").exists()


def test_vllm_engine_refuses_an_adapter_and_a_gguf(tmp_path, capsys, tiny_model_dir):
    import torch

    from unlock_export.method.vectors import SteeringVectors

    src = tiny_model_dir("llama")
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    assert main(["--quiet", "fold", str(src), "--vectors", str(vec), "--mode", "adapter", "-o",
                 str(tmp_path / "adapter")]) == 0
    data = str(_data(tmp_path / "d.jsonl"))
    code = main(["--quiet", "eval", str(tmp_path / "adapter"), "--engine", "vllm", "--data", data, "-o",
                 str(tmp_path / "ev")])
    assert code == 2 and "fold with --mode bias" in capsys.readouterr().err
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    code = main(["--quiet", "eval", str(gguf), "--engine", "vllm", "--data", data, "-o", str(tmp_path / "ev")])
    assert code == 2 and "--engine llamacpp" in capsys.readouterr().err


def test_find_vllm_takes_the_option_the_environment_and_a_scripts_python(tmp_path, monkeypatch):
    from unlock_export.errors import UserError
    from unlock_export.evaluation.engines.vllm_server import VLLM_ENV, find_vllm

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    (venv / "vllm").write_text(f"#!{venv / 'python'}\nimport sys\n")
    assert find_vllm(str(venv / "vllm")) == venv / "python"  # the console script's own Python
    assert find_vllm(str(venv / "python")) == venv / "python"
    monkeypatch.setenv(VLLM_ENV, str(venv / "vllm"))
    assert find_vllm(None) == venv / "python"
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    (elsewhere / "vllm").write_text(f"#!{venv / 'python'} -E\n")  # a Python named only by the shebang
    assert find_vllm(str(elsewhere / "vllm")) == venv / "python"
    with pytest.raises(UserError, match="not found"):
        find_vllm(str(tmp_path / "missing"))


def test_a_lost_server_stops_eval_in_one_line_keeping_progress(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """The engine contract without a real server: a request that fails after the first chunk (as a
    killed server's does) ends the run with exit 1, a line naming the engine and the finished
    chunk, and progress.jsonl holding that chunk; --resume finishes with the uninterrupted rows."""
    import unlock_export.evaluation.run as ev
    from unlock_export.evaluation.engines import EngineLost
    from unlock_export.evaluation.engines.transformers_engine import TransformersEngine

    src = tiny_model_dir("llama")
    questions = [(f"What is {i} plus {i}?", 2 * i) for i in range(ev.CHUNK + 4)]
    data = str(_data(tmp_path / "d.jsonl", questions))
    common = ["--quiet", "eval", str(src), "--data", data, "--max-new-tokens", "4", "--template", "plain"]
    assert main([*common, "-o", str(tmp_path / "whole")]) == 0
    real, calls = TransformersEngine.generate, []

    def lost_on_second_chunk(self, texts, max_new_tokens, progress=None):
        calls.append(len(texts))
        if len(calls) == 2:
            raise EngineLost("llama-server exited with code -9 (ConnectionRefusedError)")
        return real(self, texts, max_new_tokens, progress)

    monkeypatch.setattr(TransformersEngine, "generate", lost_on_second_chunk)
    capsys.readouterr()
    code = main([*common, "-o", str(tmp_path / "cut")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "llama-server exited" in err and f"questions 1-{ev.CHUNK}" in err and "--resume" in err
    progress = (tmp_path / "cut" / ev.PROGRESS).read_text().splitlines()
    assert len(progress) == 2 and not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(TransformersEngine, "generate", real)
    assert main([*common, "--resume", "-o", str(tmp_path / "cut")]) == 0
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")


def test_an_interrupted_server_generate_does_not_wait_for_requests_in_flight():
    """Ctrl-C or SIGTERM during a server's chunk (here: a request that fails, as the interrupt does in the
    main thread) leaves generate at once: the queued prompts are never sent and the requests still in
    flight are not waited for (they end when the server is stopped). Before, the executor's exit waited
    for them, so a SIGTERM'd `compare` ran on until its 512-token answers were done."""
    import threading

    from unlock_export.evaluation.engines.server import LocalServer

    release, started, finished = threading.Event(), [], []

    class Fake(LocalServer):
        def _one(self, text, max_new_tokens):
            started.append(text)
            if text == "interrupt":
                raise KeyboardInterrupt
            release.wait(timeout=10)  # a long answer, until the test lets it go
            finished.append(text)
            return text, 1

    texts = ["interrupt", "in flight", *(f"queued {i}" for i in range(8))]
    with pytest.raises(KeyboardInterrupt):
        Fake(parallel=2, startup_timeout=1).generate(texts, 4)
    assert "in flight" in started and not finished  # returned while that request was still in flight
    release.set()
    time.sleep(0.2)
    # at most one queued prompt was taken by the freed worker before the queue was dropped
    assert len(started) <= 3, started


# -- the real engines ---------------------------------------------------------------------------

@pytest.mark.engines
def test_eval_vllm_engine_matches_transformers_on_a_tiny_fold(served_tiny, tmp_path, capsys):
    from engines import engine_python

    engine_python("vllm")  # skips (locally) or fails (CI) when vLLM is not built
    m = served_tiny("llama")
    folded = _fold(m, tmp_path)
    common = ["--data", str(_data(tmp_path / "d.jsonl")), "--max-new-tokens", "12", "--template", "plain",
              "--dtype", "float32"]
    assert main(["--quiet", "eval", str(folded), "--engine", "vllm", "--parallel", "2", *common,
                 "-o", str(tmp_path / "vllm")]) == 0, capsys.readouterr().err
    assert main(["--quiet", "eval", str(folded), *common, "-o", str(tmp_path / "hf")]) == 0
    vllm, hf = _rows(tmp_path / "vllm"), _rows(tmp_path / "hf")
    assert [r["output"] for r in vllm] == [r["output"] for r in hf]
    assert any(r["output"].strip() for r in hf)
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert summary["engine"] == "vllm" and summary["dtype"] == "float32" and summary["n"] == len(QUESTIONS)


@pytest.mark.engines
@pytest.mark.slow
def test_eval_vllm_engine_matches_transformers_on_the_zoo_fold(tmp_path, capsys):
    """The zoo's qwen2.5-coder-0.5b folded (float32) and answered by vLLM and transformers, greedy."""
    import torch
    from engines import engine_python

    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.models.loading import load

    engine_python("vllm")
    zoo = "zoo:qwen2.5-coder-0.5b-instruct"
    loaded = load(zoo, dtype="float32", device="cpu")
    n_layers, hidden = loaded.n_layers, loaded.hidden_size
    del loaded
    generator = torch.Generator().manual_seed(5)
    vectors = SteeringVectors({L: torch.randn(hidden, generator=generator) for L in range(8, 16)}, n_layers, hidden,
                              model_hint="qwen2")
    vec_path = vectors.save(tmp_path / "v.safetensors")
    folded = tmp_path / "folded"
    assert main(["--quiet", "fold", zoo, "--vectors", str(vec_path), "--scale", "0.5", "-o", str(folded)]) == 0
    common = ["--data", "builtin:gsm8k-dev", "--count", "3", "--max-new-tokens", "48", "--dtype", "float32"]
    assert main(["--quiet", "eval", str(folded), "--engine", "vllm", *common, "-o", str(tmp_path / "vllm")]) == 0, \
        capsys.readouterr().err
    assert main(["--quiet", "eval", str(folded), *common, "-o", str(tmp_path / "hf")]) == 0
    vllm, hf = _rows(tmp_path / "vllm"), _rows(tmp_path / "hf")
    assert [r["predicted"] for r in vllm] == [r["predicted"] for r in hf]
    assert [r["output"] for r in vllm] == [r["output"] for r in hf]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.engines
def test_lost_llama_server_stops_eval_keeps_progress(served_tiny, tmp_path):
    """A real llama-server killed mid-eval: exit 1, one line naming it and the last finished chunk,
    progress kept; --resume on a new server ends with the rows of an uninterrupted run."""
    from engines import llama_cpp_src

    import unlock_export.evaluation.run as ev
    from unlock_export.export.gguf import convert_gguf

    m = served_tiny("llama")
    gguf = tmp_path / "base-f32.gguf"
    convert_gguf(m["dir"], gguf, llama_cpp=llama_cpp_src(), outtype="f32")
    questions = [(f"Question {i}: what is {i} plus {i}?", 2 * i) for i in range(ev.CHUNK * 6)]
    data = str(_data(tmp_path / "d.jsonl", questions))
    common = ["eval", str(gguf), "--engine", "llamacpp", "--parallel", "1", "--data", data, "--max-new-tokens", "16",
              "--template", "plain"]
    assert main(["--quiet", *common, "-o", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "unlock_export", "--quiet", *common, "-o", str(cut)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # wait for one finished chunk
        progress = cut / ev.PROGRESS
        if progress.is_file() and len(progress.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    servers = _children(proc.pid)
    assert proc.poll() is None and servers, "the eval finished before the server could be killed"
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "llama-server" in lines[0] and "finished" in lines[0] and "--resume" in lines[0]
    kept = (cut / ev.PROGRESS).read_text().splitlines()
    assert len(kept) >= 2 and not (cut / "summary.json").exists()
    assert main(["--quiet", *common, "--resume", "-o", str(cut)]) == 0
    assert _rows(cut) == _rows(tmp_path / "whole")
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] >= ev.CHUNK


@pytest.mark.engines
def test_compare_budgets_from_llama_server_prefixes_equal_separate_runs(served_tiny, tmp_path, capsys):
    """llama-server returns each answer's token ids (return_tokens) and detokenizes their prefixes:
    compare's smaller budget, scored on those prefixes, equals a separate eval at that budget."""
    from engines import llama_cpp_src

    from unlock_export.export.gguf import convert_gguf

    m = served_tiny("llama")
    gguf = tmp_path / "base-f32.gguf"
    convert_gguf(m["dir"], gguf, llama_cpp=llama_cpp_src(), outtype="f32")
    questions = [(f"Question {i}: what is {i} plus {i + 1}?", 2 * i + 1) for i in range(8)]
    data = str(_data(tmp_path / "d.jsonl", questions))
    common = ["--engine", "llamacpp", "--parallel", "1", "--data", data]
    out = tmp_path / "cmp"
    assert main(["--quiet", "compare", str(gguf), "--arm", "plain=template:plain", *common,
                 "--max-new-tokens", "3,12", "-o", str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert not (out / "arms" / "unsteered@3").exists()  # from the prefixes, not a second run
    keys = ("index", "output", "output_tokens", "predicted", "correct", "cut")
    for arm, extra in (("unsteered", []), ("plain", ["--template", "plain"])):
        whole = _rows(out / "arms" / arm)
        assert any(r["output_tokens"] > 3 for r in whole)
        for budget in (3, 12):
            folder = tmp_path / f"ev-{arm}-{budget}"
            assert main(["--quiet", "eval", str(gguf), *common, *extra, "--max-new-tokens", str(budget),
                         "-o", str(folder)]) == 0
            separate = _rows(folder)
            entry = next(e for e in results["table"] if e["arm"] == arm and e["budget"] == budget)
            assert entry["correct"] == sum(r["correct"] for r in separate)
            assert entry["cut_rate"] == sum(r["cut"] for r in separate) / len(separate)
            if budget == 12:
                assert [[r[k] for k in keys] for r in whole] == [[r[k] for k in keys] for r in separate]
            else:
                from unlock_export.evaluation.compare import budget_rows
                from unlock_export.evaluation.run import load_items
                from unlock_export.evaluation.tasks import task_for

                prefix = budget_rows(task_for(data), load_items(data), whole, 3)
                assert [[r[k] for k in keys] for r in prefix] == [[r[k] for k in keys] for r in separate]


@pytest.mark.parametrize("crash", ["SIGSEGV", "SIGILL"])
def test_llama_server_crashing_while_repacking_is_started_again_without_repacking(tmp_path, caplog, crash):
    """llama.cpp 11434 segfaults repacking some quantized weights on AMX CPUs: the engine starts it
    again once with --no-repack (here a stand-in server that crashes unless given that flag)."""
    import stat
    import textwrap

    from unlock_export.evaluation.engines.llama_server import LlamaServerEngine

    fake = tmp_path / "llama-server"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import http.server, os, signal, sys
        with open({str(tmp_path / "calls")!r}, "a") as log:
            log.write(" ".join(sys.argv[1:]) + "\\n")
        if "--no-repack" not in sys.argv:
            os.kill(os.getpid(), signal.{crash})
        port = int(sys.argv[sys.argv.index("--port") + 1])
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with caplog.at_level("WARNING"), LlamaServerEngine(model, server=str(fake), startup_timeout=30) as server:
        assert not server.repack and "--no-repack" in server._command()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and "--no-repack" not in calls[0] and "--no-repack" in calls[1]
    assert f"({crash}); starting it again with --no-repack" in caplog.text
