"""A PEFT LoRA folder as a llama.cpp LoRA adapter GGUF (`llama-server -m BASE.gguf --lora LORA.gguf`).

The file llama.cpp's adapter loader reads: `general.architecture` equal to the base GGUF's,
`general.type` = adapter, `adapter.type` = lora, `adapter.lora.alpha` (float32), and for each adapted
weight `blk.N.NAME.weight.lora_a` (PEFT's lora_A, [r, in]) and `.lora_b` (lora_B, [out, r]) as they
are; llama.cpp adds `scale * alpha / r * B (A x)` to that weight's product, `scale` being the
request's (`"lora": [{"id": 0, "scale": S}]`) or the server's (`--lora-scaled FILE:S`, 1 by default).
`alpha` is written so that alpha / r is PEFT's own scaling, so scale 1 serves what PEFT computes.

Mapped modules: each layer's residual writers (the registry's `mlp_out` and `attn_out`, llama.cpp's
`ffn_down` and `attn_output`), the modules a steering export adapts; their rows need no reordering
in any family llama.cpp converts. Everything llama.cpp's LoRA cannot carry is refused in one line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..models.architectures import architecture_for_config, registered_model_types
from .gguf import SITE_TENSOR, atomic_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}' is not readable JSON ({type(exc).__name__}); the adapter is damaged")
    if not isinstance(value, dict):
        raise UserError(f"'{path}' is not a JSON object; the adapter is damaged")
    return value


def _fix(info: dict) -> str:
    """What to do instead, for an adapter llama.cpp's LoRA cannot express."""
    if info.get("mode") == "gated-lora":
        return ("fold with --mode gated-lora --merge, then `unlock-export gguf MERGED --route convert`")
    return "fold with --mode bias, then `unlock-export gguf FOLDED` (or `unlock-export cvec` for a control vector)"


def _checked_config(adapter: Path, config: dict, info: dict) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        kind = "a BEFT adapter (a bias per module)" if peft_type == "BEFT" else f"a {peft_type or 'untyped'} adapter"
        raise UserError(f"'{adapter}' is {kind}, which llama.cpp's LoRA cannot express: {_fix(info)}")
    refusals = [
        (config.get("lora_bias"), "has lora_bias (a bias on lora_B), which llama.cpp's LoRA drops"),
        (config.get("fan_in_fan_out"), "adapts Conv1D modules (fan_in_fan_out, GPT-2), which this writer does not map"),
        (config.get("use_dora"), "is a DoRA adapter (a magnitude vector), which llama.cpp's LoRA drops"),
        (config.get("modules_to_save"), "saves whole modules (modules_to_save), which a llama.cpp LoRA cannot carry"),
        (config.get("rank_pattern") or config.get("alpha_pattern"),
         "sets a rank or alpha per module (rank_pattern/alpha_pattern), which this writer does not map"),
    ]
    for flagged, why in refusals:
        if flagged:
            raise UserError(f"'{adapter}' {why}: {_fix(info)}")


def _model_type(adapter: Path, config: dict, info: dict, base_arch: str | None) -> str:
    """The adapted model's family: unlock.json's, else its base folder's config.json, else (a base GGUF
    given) the first registered family llama.cpp runs under that architecture."""
    if info.get("target_model_type"):
        return str(info["target_model_type"])
    base = config.get("base_model_name_or_path")
    if base and (Path(str(base)).expanduser() / "config.json").is_file():
        model_type = _read_json(Path(str(base)).expanduser() / "config.json").get("model_type")
        if model_type:
            return str(model_type)
    if base_arch:
        for model_type in registered_model_types():
            if architecture_for_config({"model_type": model_type}).gguf_arch == base_arch:
                return model_type
    raise UserError(f"'{adapter}' does not say which model family it adapts (no unlock.json, and its base "
                    f"'{base}' is no local folder with a config.json): pass --base TARGET.gguf")


def _gguf_name(module: str, arch) -> str | None:
    """llama.cpp's tensor name (blk.N.ffn_down.weight) of a residual writer's module path, or None."""
    writers = {arch.mlp_out: SITE_TENSOR["layer_output"], arch.attn_out: SITE_TENSOR["post_attention"]}
    parts = arch.layers_path.split(".")
    for i in range(len(parts)):  # GPT-2 files may drop the 'transformer.' prefix (Checkpoint.layer_prefix)
        match = re.fullmatch(re.escape(".".join(parts[i:])) + r"\.(\d+)\.(.+)", module)
        if match and match.group(2) in writers:
            return f"blk.{int(match.group(1))}.{writers[match.group(2)]}.weight"
    return None


def _base_fields(base: Path) -> dict:
    from ..models.gguf_fields import read_fields

    arch = read_fields(base, {"general.architecture"}).get("general.architecture")
    keys = {f"{arch}.block_count", f"{arch}.embedding_length"}
    return {"architecture": arch, **{k.split(".", 1)[1]: v for k, v in read_fields(base, keys).items()}}


def _default_base(info: dict) -> Path | None:
    """The fold's target when it was a GGUF file (or an already fetched zoo model)."""
    from ..models.loading import resolve

    target = info.get("target")
    if not target:
        return None
    try:
        source = resolve(str(target), fetch_zoo=False)
    except UserError:
        return None
    path = Path(source.path) / (source.gguf_file or "")
    return path if source.kind == "gguf" and path.is_file() else None


def _adapter_tensors(adapter: Path) -> dict[str, dict[str, np.ndarray]]:
    """{module: {"lora_A": [r, in], "lora_B": [out, r]}} as float32, every other tensor refused."""
    from safetensors import SafetensorError, safe_open

    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = (adapter / "adapter_model.bin").is_file()
        raise UserError(f"'{adapter}' has no {ADAPTER_WEIGHTS}" + (
            " (only a pickled adapter_model.bin): save the adapter with safe_serialization=True" if pickled else
            ": is the adapter complete?"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                match = _KEY.match(key)
                if not match:
                    raise UserError(f"'{path}' holds '{key}', which is no lora_A/lora_B weight a llama.cpp LoRA "
                                    "can carry (biases, magnitudes and saved modules are not)")
                pairs.setdefault(match.group("module"), {})[match.group("kind")] = \
                    f.get_tensor(key).float().numpy()
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file ({exc}); the adapter is damaged")
    if not pairs:
        raise UserError(f"'{path}' holds no LoRA weights")
    return pairs


def write_lora_gguf(adapter: str | Path, out: str | Path, base: str | Path | None = None,
                    overwrite: bool = False) -> dict:
    """Write the PEFT LoRA folder `adapter` as a llama.cpp LoRA GGUF at `out` (atomically). `base`: the
    target's GGUF, checked to be the model the adapter fits (default: the fold's target when it is one)."""
    import gguf

    from .base import read_unlock_json

    adapter = Path(adapter)
    if not is_peft_adapter(adapter):
        raise UserError(f"'{adapter}' has no {ADAPTER_CONFIG}: pass a PEFT adapter folder")
    config, info = _read_json(adapter / ADAPTER_CONFIG), read_unlock_json(adapter)
    _checked_config(adapter, config, info)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UserError(f"'{adapter / ADAPTER_CONFIG}' needs an integer r >= 1 and a finite lora_alpha, got "
                        f"r={rank!r}, lora_alpha={alpha!r}")
    # PEFT's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA); llama.cpp's is alpha / r
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    base_path = Path(base).expanduser() if base else _default_base(info)
    if base_path is not None and not base_path.is_file():
        raise UserError(f"base GGUF '{base_path}' not found")
    fields = _base_fields(base_path) if base_path else {}
    arch = architecture_for_config({"model_type": _model_type(adapter, config, info, fields.get("architecture"))})
    if not arch.gguf_arch:
        raise UserError(f"'{arch.model_type}' is not a family llama.cpp runs in the architecture registry "
                        f"(known: {', '.join(registered_model_types())})")
    if fields and fields["architecture"] != arch.gguf_arch:
        raise UserError(f"'{base_path}' is a '{fields['architecture']}' GGUF but the adapter is for a "
                        f"'{arch.model_type}' model (llama.cpp '{arch.gguf_arch}'): pass the GGUF of its base model")

    tensors: dict[str, np.ndarray] = {}
    for module, pair in sorted(_adapter_tensors(adapter).items(), key=lambda kv: _natural(kv[0])):
        name = _gguf_name(module, arch)
        if name is None:
            raise UserError(f"'{module}' has no llama.cpp LoRA name here (only each layer's {arch.mlp_out} and "
                            f"{arch.attn_out} are mapped): use llama.cpp's convert_lora_to_gguf.py, or {_fix(info)}")
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None:
            raise UserError(f"'{module}' lacks its {'lora_A' if a is None else 'lora_B'} weight; the adapter is damaged")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise UserError(f"'{module}': lora_A {list(a.shape)} and lora_B {list(b.shape)} are not [r, in] and "
                            f"[out, r] with r = {rank}; the adapter is damaged")
        layer = int(name.split(".")[1])
        if fields.get("block_count") is not None and layer >= fields["block_count"]:
            raise UserError(f"'{module}' is layer {layer} but '{base_path}' has {fields['block_count']} layers: "
                            "pass the GGUF of the adapter's base model")
        if fields.get("embedding_length") is not None and b.shape[0] != fields["embedding_length"]:
            raise UserError(f"'{module}' writes {b.shape[0]} values but '{base_path}' has embedding length "
                            f"{fields['embedding_length']}: pass the GGUF of the adapter's base model")
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)

    gguf_alpha = float(scaling * rank)  # llama.cpp: scale * alpha / r = scale * PEFT's scaling
    with atomic_file(Path(out), overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha)
        writer.add_string("unlock_export.adapter_of", str(info.get("target") or config.get("base_model_name_or_path")
                                                          or ""))
        if info.get("mode"):
            writer.add_string("unlock_export.mode", str(info["mode"]))
        for name, value in tensors.items():
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "adapter": str(adapter), "architecture": arch.gguf_arch, "rank": rank,
            "alpha": gguf_alpha, "peft_scaling": scaling, "tensors": list(tensors),
            "base": str(base_path) if base_path else None, "target": info.get("target")}


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
