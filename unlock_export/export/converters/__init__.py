"""How an export becomes a file llama.cpp serves, as plug-ins: one module per converter, one line per
converter in CONVERTERS, and one entry (`write_gguf`) that checks a request against the declarations.

patch           a bias export's offsets added to the target's own GGUF, every other tensor kept byte for byte
convert         a bias export through llama.cpp's convert_hf_to_gguf.py
lora            a PEFT LoRA adapter (the gated-lora form) as a llama.cpp LoRA GGUF, served with --lora
control-vector  steering vectors as a llama.cpp control vector (direction.N), served with --control-vector

A converter module defines CONVERTER, a Converter: its name and a line of help, what it `reads` (one of
READS), the `options` it takes besides the output file and `overwrite` (each an argument of its `write`
and, with dashes, a flag of `unlock-export gguf` or `cvec`), `write(source, out, overwrite=..., **options)`
returning what it wrote as a dict, and `describe(info, out)`, the line the CLI prints. An option a
converter does not declare is refused in one line, never ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ...errors import UserError
from ...registry import lookup

# name -> "module:attribute" of its plug-in (modules relative to this package), or the plug-in itself
CONVERTERS: dict[str, Any] = {
    "patch": ".patch:CONVERTER",
    "convert": ".convert:CONVERTER",
    "lora": ".lora:CONVERTER",
    "control-vector": ".control_vector:CONVERTER",
}
# what a converter reads: a bias export folder (`fold --mode bias`), a PEFT LoRA adapter folder
# (`fold --mode gated-lora`), or steering vectors (a SteeringVectors)
READS = ("fold", "adapter", "vectors")


@dataclasses.dataclass(frozen=True)
class Converter:
    name: str
    summary: str
    reads: str
    options: tuple[str, ...]
    write: Callable[..., dict]
    describe: Callable[[dict, Path], str]


def converter(name: str) -> Converter:
    return lookup(CONVERTERS, name, __name__, "converter")


def converter_names(reads: str | None = None) -> list[str]:
    """The registered converters (those that read `reads`), in registry order."""
    return [name for name in CONVERTERS if reads is None or converter(name).reads == reads]


def reads_of(path: str | Path) -> str:
    """What a folder given to `gguf` is: a PEFT adapter ('adapter') or a bias export ('fold')."""
    from ..lora_gguf import is_peft_adapter

    return "adapter" if is_peft_adapter(path) else "fold"


def write_gguf(name: str, source, out: str | Path, *, overwrite: bool = False, **options) -> dict:
    """Run converter `name` on `source` into `out`. `options` are the ones the caller was given: one the
    converter does not declare is refused in one line that names it."""
    plugin = converter(name)
    extra = [k for k, v in options.items() if v is not None and k not in plugin.options]
    if extra:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in extra)
        takes = ", ".join(f"--{k.replace('_', '-')}" for k in plugin.options) or "no options"
        raise UserError(f"the {name} converter ({plugin.summary}) takes {takes}, not {flags}: drop {flags}")
    given = {k: v for k, v in options.items() if v is not None}
    return plugin.write(source, Path(out), overwrite=overwrite, **given)
