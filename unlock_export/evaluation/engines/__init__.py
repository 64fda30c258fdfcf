"""What `eval` and `compare` generate with, as plug-ins: one module per engine, one line per engine in
ENGINES, and the capabilities each declares.

transformers  batched greedy generation in this process; steering hooks for any form (transformers_engine)
llamacpp      a stock `llama-server` of a GGUF; a control vector for the additive form, a LoRA GGUF (llama_server)
vllm          a stock vLLM OpenAI server of a model folder, optionally with plain PEFT LoRAs (vllm_server)

An engine module defines PLUGIN, an object with
  name          the engine's choice (`--engine NAME`)
  summary       what it serves, in a few words (the CLI's --engine help)
  capabilities  a Capabilities: what models it serves and which steering it runs
  open(model, request, items, vectors, label, options, progress)
                a context manager giving a Session: the started engine (its `generate(texts,
                max_new_tokens, progress, prefixes)` returns (text, generated tokens[, prefix texts]) per
                prompt, greedy, cut at STOP), the rendered prompts, and the run's label
What a request asks of an engine that it does not declare is refused here, before anything starts, in
one wording (`check_request`). A server that dies or stops answering mid-run raises EngineLost (exit
1): the eval keeps its finished chunks for `--resume`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ContextManager, Protocol

from ...errors import UserError
from ...registry import lookup

STOP = ["\nQuestion:", "\n\nQuestion"]

# name -> "module:attribute" of its plug-in (modules relative to this package), or the plug-in itself
ENGINES: dict[str, Any] = {
    "transformers": ".transformers_engine:PLUGIN",
    "llamacpp": ".llama_server:PLUGIN",
    "vllm": ".vllm_server:PLUGIN",
}


class EngineLost(UserError):
    """The serving engine died or stopped answering mid-run (exit code 1: not bad input)."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an engine serves and runs; check_request refuses anything else in one line."""

    models: tuple[str, ...]  # what it serves: "loaded" (an in-process model), "folder", "hub", "gguf"
    forms: tuple[str, ...] = ()  # steering forms it runs from vectors (choices.EVAL_FORMS)
    control_vector: bool = False  # a control-vector GGUF beside the model
    lora: bool = False  # a plain LoRA adapter beside the model
    lora_scale: bool = False  # a LoRA at a scale other than 1, per request
    parallel_devices: bool = False  # tensor / data parallelism and a GPU memory share
    prefixes: bool = False  # the texts of an answer's first N tokens, for budgets scored from one generation


@dataclasses.dataclass
class Session:
    """A started engine, the prompts it answers, and the label its run records."""

    engine: Any
    texts: list[str]
    label: dict


class EnginePlugin(Protocol):
    name: str
    summary: str  # what it serves, in a few words (the CLI's --engine help)
    capabilities: Capabilities

    def open(self, model, request, items, vectors, label: dict, options, progress: bool) -> ContextManager[Session]:
        ...


def engine_names() -> tuple[str, ...]:
    return tuple(ENGINES)


def plugin(name: str) -> EnginePlugin:
    """The plug-in registered as `name` (imported on first use)."""
    return lookup(ENGINES, name, __name__, "engine")


def engines_with(capability: str, value: str | None = None) -> list[str]:
    """The registered engines that declare `capability` (with `value` in it, for a tuple capability)."""
    names = []
    for name in ENGINES:
        declared = getattr(plugin(name).capabilities, capability)
        if (value in declared) if value is not None else bool(declared):
            names.append(name)
    return names


_MODEL_WORDS = {"loaded": "a loaded model", "folder": "a model folder", "hub": "a Hub id", "gguf": "a GGUF file"}

# capability -> (what the refusal says the engine lacks, the fix); {engines}: the engines that have it
_LACKS = {
    "forms": ("runs no {value} steering hooks",
              {"gated-lora": "`unlock-export fold --mode gated-lora` writes the same edit as a LoRA: evaluate it "
                             "with --lora, or use {engines}",
               "additive": "fold the vectors (`unlock-export fold --mode bias`) and evaluate the folded export, "
                           "or use {engines}",
               "paper": "pass --form additive where the engine runs it, or use {engines}"}),
    "control_vector": ("takes no control vector", "use {engines}, or pass the vectors with --vectors"),
    "lora": ("serves no LoRA adapter", "use {engines}"),
    "lora_scale": ("has no per-request LoRA scale, and --lora asks for {value}",
                   "refold the adapter with --multiplier {value} times its own, or use {engines}"),
    "parallel_devices": ("runs on one device: {value} applies to the vllm engine only",
                         "drop {value}, or use {engines}"),
}


def refusal(name: str, capability: str, value=None) -> UserError:
    """The one wording of an engine lacking a capability: what it lacks, and the engines that have it."""
    lacks, fix = _LACKS[capability]
    if isinstance(fix, dict):
        fix = fix[value]
    having = engines_with(capability, value if capability == "forms" else None)
    text = f"the {name} engine {lacks}: {fix}".format(value=value, engines=" or ".join(f"--engine {e}" for e in having) or "(none registered)")
    return UserError(text)


def parse_lora(spec: str | Path) -> tuple[Path, float]:
    """'PATH' or 'PATH:SCALE' -> (the adapter's path, its scale, 1 when not given). The adapter is a
    PEFT LoRA folder, or for llama.cpp also a LoRA GGUF; it must exist."""
    text = str(spec)
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).exists():
        try:
            path, scale = head, float(tail)
        except ValueError:
            raise UserError(f"--lora takes PATH or PATH:SCALE, and '{tail}' in '{text}' is not a number") from None
        if not math.isfinite(scale):
            raise UserError(f"the LoRA scale in '{text}' must be a finite number")
    if not Path(path).exists():
        raise UserError(f"LoRA adapter '{path}' not found: pass the folder `fold --mode gated-lora` wrote (or a "
                        "LoRA GGUF from `gguf` for --engine llamacpp)")
    return Path(path), scale


def check_request(name: str, model, request, vectors) -> EnginePlugin:
    """The plug-in for `name`, after refusing (one line each) what `request` asks that it does not declare."""
    engine = plugin(name)
    caps = engine.capabilities
    if not isinstance(model, (str, Path)) and "loaded" not in caps.models:
        served = " or ".join(_MODEL_WORDS[m] for m in caps.models if m != "hub")
        raise UserError(f"the {name} engine serves {served}: pass its path, not a loaded model")
    if vectors is not None and request.form not in caps.forms:
        raise refusal(name, "forms", request.form)
    if request.control_vector and not caps.control_vector:
        raise refusal(name, "control_vector")
    if request.lora:
        if not caps.lora:
            raise refusal(name, "lora")
        scale = parse_lora(request.lora)[1]
        if scale != 1 and not caps.lora_scale:
            raise refusal(name, "lora_scale", f"{scale:g}")
    if not caps.parallel_devices:
        for option, value, default in (("--tensor-parallel-size", request.tensor_parallel_size, 1),
                                       ("--data-parallel-size", request.data_parallel_size, 1),
                                       ("--gpu-memory-utilization", request.gpu_memory_utilization, None)):
            if value != default:
                raise refusal(name, "parallel_devices", option)
    return engine
