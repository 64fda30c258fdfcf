"""The lora converter: a PEFT LoRA adapter (the gated-lora form) as a llama.cpp LoRA GGUF, with how
llama-server serves it (export.lora_gguf.write_lora_gguf)."""

from __future__ import annotations

from pathlib import Path

from . import Converter


def _write(adapter, out: Path, *, overwrite: bool = False, base: str | Path | None = None) -> dict:
    from ..lora_gguf import write_lora_gguf
    from ..serving import lora_request, lora_server_command

    info = write_lora_gguf(adapter, out, base=base, overwrite=overwrite)
    info["serve"] = lora_server_command(out, info["base"])
    info["request"] = lora_request(1.0)
    return info


def _describe(info: dict, out: Path) -> str:
    base_note = "" if info["base"] else (" (BASE.gguf: the GGUF of the adapter's base model, e.g. "
                                         "`unlock-export gguf TARGET_DIR --route convert -o BASE.gguf`)")
    modules = len(info["tensors"]) // 2
    return (f"wrote {out} (llama.cpp LoRA for {info['architecture']}: {modules} module"
            f"{'s' if modules != 1 else ''}, rank {info['rank']})\nserve with:{base_note}\n  {info['serve']}\n"
            f"scale per request (0 = the base model; adapters a request leaves out get 0):\n  {info['request']}")


CONVERTER = Converter("lora", "a PEFT LoRA adapter as a llama.cpp LoRA GGUF, its scale chosen per request",
                      "adapter", ("base",), _write, _describe)
