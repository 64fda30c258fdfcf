"""`unlock-export inspect FILE`: what a key, map, vectors file, GGUF, adapter or export folder holds."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..method.vectors import FORMAT as VECTORS_FORMAT
from ..method.vectors import format_layers


def _safetensors_meta(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file ({exc}); write it again") from exc


def _describe_safetensors(path: Path) -> dict:
    from ..method.align import FORMAT as MAP_FORMAT
    from ..method.align import LowRankMap
    from ..method.key import FORMAT as KEY_FORMAT
    from ..method.key import MasterKey
    from ..method.vectors import SteeringVectors

    fmt = _safetensors_meta(path).get("format")
    if fmt == VECTORS_FORMAT:
        vectors = SteeringVectors.load(path)
        norms = vectors.norms()
        return {"kind": "steering vectors", "model_hint": vectors.model_hint, "site": vectors.site,
                "layer_count": vectors.layer_count, "hidden_size": vectors.hidden_size,
                "layers": format_layers(vectors.layers), "norms": {str(k): round(v, 6) for k, v in norms.items()},
                "provenance": vectors.provenance}
    if fmt == KEY_FORMAT:
        key = MasterKey.load(path)
        norms = key.vectors.norm(dim=1).tolist()
        return {"kind": "master key", "layer_count": key.vectors.shape[0], "hidden_size": key.vectors.shape[1],
                "norms": {str(i): round(v, 6) for i, v in enumerate(norms)}, "provenance": key.provenance}
    if fmt == MAP_FORMAT:
        lrmap = LowRankMap.load(path)
        return {"kind": "low-rank map", "rank": lrmap.rank, "source_layer_count": lrmap.source_layer_count,
                "target_layer_count": lrmap.target_layer_count, "source_hidden": lrmap.source_hidden,
                "target_hidden": lrmap.target_hidden, "layer_map": lrmap.layer_map,
                "factor_bytes": lrmap.factor_bytes(), "dense_bytes": lrmap.dense_bytes(),
                "provenance": lrmap.provenance}
    raise UserError(f"'{path}' is a safetensors file but not an unlock-export key, map or vectors file "
                    f"(format '{fmt or 'missing'}'); inspect takes those, a GGUF or an export folder")


def _describe_gguf(path: Path) -> dict:
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken file
        raise UserError(f"'{path}' is not a readable GGUF file ({exc}); write it again") from exc

    from ..models.gguf_fields import read_fields

    fields = read_fields(path)

    def field(name):
        return fields.get(name)

    arch = field("general.architecture")
    if arch == "controlvector":
        norms = {}
        for tensor in reader.tensors:
            if tensor.name.startswith("direction."):
                norms[tensor.name.split(".")[1]] = round(float(np.linalg.norm(np.asarray(tensor.data, dtype=np.float64))), 6)
        layers = sorted(int(k) for k in norms)
        return {"kind": "llama.cpp control vector", "model_hint": field("controlvector.model_hint"),
                "layer_count": field("controlvector.layer_count"), "layers": format_layers(layers),
                "norms": {str(k): norms[str(k)] for k in layers}}
    if field("general.type") == "adapter":
        pairs = sorted({t.name.rsplit(".", 1)[0] for t in reader.tensors if t.name.endswith((".lora_a", ".lora_b"))})
        layers = sorted({int(name.split(".")[1]) for name in pairs if name.startswith("blk.")})
        ranks = sorted({int(t.shape[0]) for t in reader.tensors if t.name.endswith(".lora_b")})  # ne: [r, out]
        return {"kind": f"llama.cpp {field('adapter.type') or 'adapter'} adapter", "architecture": arch,
                "lora_alpha": field("adapter.lora.alpha"), "rank": ranks[0] if len(ranks) == 1 else ranks,
                "modules": len(pairs), "layers": format_layers(layers) if layers else "none",
                "adapter_of": field("unlock_export.adapter_of"), "bytes": path.stat().st_size}
    biases = sorted(int(t.name.split(".")[1]) for t in reader.tensors if t.name.endswith("ffn_down.bias"))
    return {"kind": "GGUF model", "architecture": arch, "name": field("general.name"),
            "block_count": field(f"{arch}.block_count"), "embedding_length": field(f"{arch}.embedding_length"),
            "tensors": len(reader.tensors), "folded_layers (ffn_down.bias)": format_layers(biases) if biases else "none",
            "bytes": path.stat().st_size}


def _describe_folder(path: Path) -> dict:
    info: dict = {}
    provenance = path / "unlock.json"
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text())
        modules = config.get("target_modules")
        info = {"kind": "PEFT adapter", "peft_type": config.get("peft_type"),
                **({"rank": config["r"]} if config.get("r") is not None else {}),
                "base_model": config.get("base_model_name_or_path"),
                "target_modules": sorted(modules) if isinstance(modules, list) else modules}
    elif (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        info = {"kind": "checkpoint", "model_type": config.get("model_type"),
                "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size")}
    elif (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        return {"kind": "recipe output", "recipe": summary.get("recipe"), "outputs": summary.get("outputs"),
                "fold": summary.get("fold"), "diagnostics": summary.get("diagnostics")}
    else:
        raise UserError(f"'{path}' is not an export folder (no config.json, adapter_config.json or summary.json)")
    if provenance.is_file():
        prov = json.loads(provenance.read_text())
        info.update({"unlock": {k: prov.get(k) for k in ("mode", "target", "site", "layers", "scale",
                                                         "carrier_module", "verification", "command")}})
        info["unlock"]["layers"] = format_layers(prov.get("layers") or [])
    info["files"] = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return info


def describe(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist")
    if path.is_dir():
        out = _describe_folder(path)
    elif path.suffix == ".gguf":
        out = _describe_gguf(path)
    elif path.suffix == ".safetensors":
        out = _describe_safetensors(path)
    else:
        raise UserError(f"'{path}': inspect takes a .safetensors key/map/vectors file, a .gguf or an export folder")
    return {"path": str(path), **out}


def format_description(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict) and key in ("norms",):
            vals = list(value.values())
            if vals:
                lines.append(f"{key:<22} {min(vals):.4g} .. {max(vals):.4g} over {len(vals)} layers")
            continue
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k:<20} {v}" for k, v in value.items()]
            continue
        lines.append(f"{key:<22} {value}")
    return "\n".join(lines)

