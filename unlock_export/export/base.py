"""What every export form shares: the result of a fold, the target's files as a local safetensors
folder, the precision of a checkpoint export, the carrier module of each steered layer, the files of a
PEFT adapter, and reading an export's unlock.json."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models.checkpoint import Checkpoint
from ..models.loading import ModelSource, resolve


@dataclass(frozen=True)
class FoldResult:
    """What a fold wrote: the folder, mode, layers, scale, the carrier module, and the verification."""

    out: Path
    mode: str
    model_type: str
    exported_model_type: str
    layers: list[int]
    scale: float
    site: str
    carrier: str
    shards: dict = field(default_factory=dict)
    verification: dict | None = None

    def as_dict(self) -> dict:
        return {"out": str(self.out), "mode": self.mode, "model_type": self.model_type,
                "exported_model_type": self.exported_model_type, "layers": self.layers, "scale": self.scale,
                "site": self.site, "carrier": self.carrier, "shards": self.shards,
                "verification": self.verification}


def materialize(spec: str, scratch: Path, allow_pickle: bool = False) -> tuple[Path, ModelSource]:
    """A local safetensors directory for `spec`. GGUF files are dequantized once (models.dequantized:
    the copy cached beside the file), pickle-only folders (when allowed) converted into `scratch`; Hub
    ids are fetched with huggingface_hub."""
    from ..models.loading import check_weights, pickle_only

    source = resolve(spec)
    check_weights(source, allow_pickle)
    if source.kind == "dir" and not pickle_only(source.path):
        return Path(source.path), source
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.path, allow_patterns=[
                "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"])), source
        except Exception as exc:  # network or auth errors come in many types
            raise UserError(f"cannot download '{spec}' from the Hub ({type(exc).__name__}); pass a local directory")
    if source.kind == "gguf":
        from ..models.loading import checkpoint_source

        return Path(checkpoint_source(source).path), source  # its dequantized copy (models.dequantized)
    from ..models.loading import load

    loaded = load(spec, dtype="float32", device="cpu", allow_pickle=allow_pickle)  # pickle-only, allowed
    target = scratch / "converted"
    loaded.model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    return target, source


def export_dtype(ckpt: Checkpoint, dtype: str | torch.dtype | None) -> torch.dtype:
    """The precision a checkpoint export is written in: the checkpoint's own (`auto`, None) or `dtype`."""
    from ..models.loading import choose_dtype

    if dtype is None or dtype == "auto":
        return ckpt.weights_dtype()
    return dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype, torch.device("cpu"))


def carrier_modules(ckpt: Checkpoint, carrier: str, layers, layers_path: str) -> list[tuple[int, str]]:
    """(layer, full module name) of the carrier of each of `layers`, checked present in `ckpt`."""
    prefix = ckpt.layer_prefix(layers_path)
    found = []
    for layer in sorted(layers):
        module = f"{prefix}.{layer}.{carrier}"
        if not ckpt.has(f"{module}.weight"):
            raise UserError(f"expected tensor '{module}.weight' is missing from '{ckpt.dir}'; is the checkpoint "
                            "complete?")
        found.append((layer, module))
    return found


def write_peft(ckpt: Checkpoint, work: Path, config, tensors: dict[str, torch.Tensor]) -> None:
    """adapter_config.json, adapter_model.safetensors and the tokenizer files, as PEFT saves them."""
    from safetensors.torch import save_file

    config.save_pretrained(str(work))
    save_file(tensors, str(work / "adapter_model.safetensors"), metadata={"format": "pt"})
    for path in ckpt.side_files():  # tokenizer and chat template travel with the adapter
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copyfile(path, work / path.name)


def read_unlock_json(out: Path) -> dict:
    path = Path(out) / "unlock.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"'{path}' is not valid JSON; the export is damaged, fold again")
