"""The commands that serve what a run wrote, with stock engines (no code of this package at serve time).

Only command lines are made here; nothing is started. The engines' own flags: llama.cpp's
`llama-server -m MODEL.gguf [--control-vector CVEC.gguf]`, vLLM's `vllm serve FOLDER`, and the
transformers loaders.
"""

from __future__ import annotations

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
                   adapter: bool = False) -> list[ServeCommand]:
    """How each written artifact is served. `model_dir` is a fold's output folder (a checkpoint; no
    command for a PEFT adapter, which loads onto the base model the caller has), `model_gguf` its
    patched GGUF, `control_vector` a control-vector GGUF for `target_gguf` (the unsteered target's
    GGUF; a placeholder when unknown)."""
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
    return rows


def format_commands(rows: list[ServeCommand]) -> str:
    return "\n".join(f"  {r.engine:<12} {r.command}" for r in rows)
