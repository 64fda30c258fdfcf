"""The vllm engine: a stock vLLM OpenAI server of a model folder (a folded checkpoint or the unsteered
target), optionally with plain PEFT LoRAs beside it, each chosen per request by `model`."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ...errors import UserError
from ..questions import render_prompts
from . import STOP, Capabilities, Session, parse_lora
from .server import LocalServer, find_executable

VLLM_ENV = "UNLOCK_VLLM"
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


class VllmServerEngine(LocalServer):
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
            from ...export.serving import vllm_lora_rank

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
            from ...export.serving import vllm_lora_args

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

    def chat(self, messages: list[dict], max_new_tokens: int, model: str | None = None) -> tuple[str, int]:
        """Greedy reply and its token count through the OpenAI-compatible chat endpoint, the model's own
        chat template applied by the server (as a chat client gets it)."""
        answer = self._post("/v1/chat/completions", {
            "model": model or self.serve, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0.0,
            "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "seed": 0})
        return answer["choices"][0]["message"]["content"], int(answer.get("usage", {}).get("completion_tokens", 0))


def find_vllm(path: str | None = None) -> Path:
    """The Python that runs vLLM: --vllm (the `vllm` executable or that Python), else $UNLOCK_VLLM, else
    the engines cache, else `vllm` on PATH. The server is started as `python -m
    vllm.entrypoints.openai.api_server`, which is what `vllm serve` runs (and works where a build
    is installed under another name, as vllm-cpu is)."""
    from ...export.gguf import engines_dir

    cached = [p for p in [engines_dir() / "vllm" / "bin" / "vllm"] if p.is_file()]
    exe = find_executable(path, VLLM_ENV, cached, "vllm", "vLLM",
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


class VllmPlugin:
    name = "vllm"
    summary = "a stock vLLM server; model folders such as a bias fold, plain LoRAs"
    capabilities = Capabilities(models=("folder", "hub"), lora=True, parallel_devices=True)

    @contextlib.contextmanager
    def open(self, model, request, items, vectors, label, options, progress):
        """A stock vLLM server of a model folder (a bias fold, or the unsteered target); with request.lora,
        a plain PEFT LoRA served on it (`--enable-lora --lora-modules steer=DIR`) that every request names."""
        from ...models.loading import load_tokenizer, resolve

        if request.parallel < 1:
            raise UserError(f"--parallel must be at least 1, got {request.parallel}")
        for option, value in (("--tensor-parallel-size", request.tensor_parallel_size),
                              ("--data-parallel-size", request.data_parallel_size)):
            if value < 1:
                raise UserError(f"{option} must be at least 1, got {value}")
        if (Path(model) / "adapter_config.json").is_file():
            try:
                vllm_lora_rank_of(model)
            except UserError:
                raise UserError(f"'{model}' is a PEFT adapter and vLLM takes no adapter biases: fold with --mode "
                                "bias and evaluate that checkpoint") from None
            raise UserError(f"'{model}' is a LoRA adapter: pass the base model it was folded from as the model and "
                            f"the adapter as --lora ('eval BASE --engine vllm --lora {model}')")
        loras = None
        if request.lora:
            lora_dir = parse_lora(request.lora)[0]
            vllm_lora_rank_of(lora_dir)  # BEFT adapters and LoRAs with lora_bias are refused here, in one line
            loras = {"steer": lora_dir}
        source = resolve(str(model))
        if source.kind == "gguf":
            raise UserError(f"the vllm engine serves a transformers model folder and '{model}' is a GGUF: use "
                            "--engine llamacpp, or `unlock-export fold` it into a folder")
        if source.kind not in ("dir", "hub"):
            raise UserError(f"the vllm engine needs a model folder or a Hub id, not '{model}'")
        tokenizer = load_tokenizer(source) if request.chat else None
        texts = render_prompts(items, request.template, tokenizer, request.chat)
        dtype = options.dtype
        if dtype == "auto":  # the package's rule: bfloat16 on a GPU, float32 on the CPU
            import torch

            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        engine = VllmServerEngine(Path(source.path), request.vllm, parallel=request.parallel,
                                  max_model_len=max_model_len(Path(source.path), request.max_new_tokens + 1024),
                                  dtype=dtype, tensor_parallel_size=request.tensor_parallel_size,
                                  data_parallel_size=request.data_parallel_size,
                                  gpu_memory_utilization=request.gpu_memory_utilization, loras=loras)
        label = {**label, "dtype": dtype, "tensor_parallel_size": request.tensor_parallel_size,
                 "data_parallel_size": request.data_parallel_size}
        with engine as server:
            yield Session(server, texts, label)


PLUGIN = VllmPlugin()
