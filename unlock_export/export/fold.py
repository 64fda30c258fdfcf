"""Fold steering vectors into ordinary weights.

bias     a standalone checkpoint whose bias on each steered layer's residual-writing module (the
         architecture registry's bias plan) equals the offset; stock loaders need no custom code.
adapter  a PEFT BEFT adapter (PEFT >= 0.20): one bias vector on that module per steered layer, added
         to its output, which is exactly the offset; nothing else, no relabel. nn.Linear modules only.
lora     a PEFT LoRA with lora_bias=True on that module (PEFT >= 0.14): standard init (B = 0) makes
         the low-rank delta zero, so the lora_B bias is exactly the offset (lora_alpha = r keeps
         scaling 1). For PEFT before BEFT, and GPT-2's Conv1D modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import owned_prefix, staging_dir
from ..choices import MODES
from ..errors import ExportFailure, UserError
from ..method.vectors import SteeringVectors
from ..models.architectures import BiasPlan, architecture_for_config
from ..models.checkpoint import Checkpoint, check_output_path, write_checkpoint
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


def fold_tensors(ckpt: Checkpoint, plan: BiasPlan, vectors: SteeringVectors, scale: float,
                 layers_path: str, dtype: torch.dtype | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], SteeringVectors]:
    """(added, changed) tensors that carry `scale * vectors` as biases under `plan`, in `dtype` (default:
    each carrier's own), and the offsets they hold once rounded into it (scale 1: what `verify` checks
    the fold against, beside the requested offsets)."""
    prefix = ckpt.layer_prefix(layers_path)
    added: dict[str, torch.Tensor] = {}
    changed: dict[str, torch.Tensor] = {}
    stored: dict[int, torch.Tensor] = {}
    for layer in range(ckpt.layer_count()):
        for module in plan.zero_biases:
            weight = f"{prefix}.{layer}.{module}.weight"
            if not ckpt.has(weight):
                raise UserError(f"expected tensor '{weight}' is missing from '{ckpt.dir}'; is the checkpoint complete?")
            added[f"{prefix}.{layer}.{module}.bias"] = torch.zeros(ckpt.shape(weight)[0],
                                                                   dtype=dtype or ckpt.dtype(weight))
        if layer not in vectors.directions:
            continue
        offset = vectors.directions[layer].double() * scale
        name = f"{prefix}.{layer}.{plan.carrier}.bias"
        if plan.native_bias:
            if not ckpt.has(name):
                raise UserError(f"expected bias '{name}' is missing from '{ckpt.dir}'; is the checkpoint complete?")
            current = ckpt.read(name).to(dtype or ckpt.dtype(name))
            changed[name] = (current.double() + offset).to(current.dtype)
            stored[layer] = (changed[name].double() - current.double()).float()
        else:
            added[name] = offset.to(dtype or ckpt.dtype(f"{prefix}.{layer}.{plan.carrier}.weight"))
            stored[layer] = added[name].float()
    return added, changed, dataclasses.replace(vectors, directions=stored)


def export_dtype(ckpt: Checkpoint, dtype: str | torch.dtype | None) -> torch.dtype:
    """The precision a checkpoint export is written in: the checkpoint's own (`auto`, None) or `dtype`."""
    from ..models.loading import choose_dtype

    if dtype is None or dtype == "auto":
        return ckpt.weights_dtype()
    return dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype, torch.device("cpu"))


def _folded_config(config: dict, plan: BiasPlan) -> dict:
    out = {k: v for k, v in config.items() if k not in plan.config_drop and k != "quantization_config"}
    out.update(plan.config_set)
    return out


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


def beft_tensors(ckpt: Checkpoint, carrier: str, vectors: SteeringVectors, scale: float,
                 layers_path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BEFT weights: the offset as each carrier module's `beft_bias` ([1, out], as PEFT stores it)."""
    tensors, modules = {}, []
    for layer, module in carrier_modules(ckpt, carrier, vectors.directions, layers_path):
        vec = vectors.directions[layer]
        tensors[f"base_model.model.{module}.beft_bias"] = (vec.double() * scale).float().unsqueeze(0)
        modules.append(module)
    return tensors, modules


def lora_tensors(ckpt: Checkpoint, carrier: str, vectors: SteeringVectors, scale: float, rank: int,
                 layers_path: str, conv1d: bool, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LoRA weights with standard init (A random, B zero) and the offset as lora_B's bias."""
    generator = torch.Generator().manual_seed(seed)
    tensors, modules = {}, []
    for layer, module in carrier_modules(ckpt, carrier, vectors.directions, layers_path):
        vec = vectors.directions[layer]
        shape = ckpt.shape(f"{module}.weight")
        out_features = vec.shape[0]
        in_features = shape[0] if conv1d else shape[1]  # nn.Linear stores [out, in]; Conv1D [in, out]
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), PEFT's default for lora_A
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = torch.zeros(out_features, rank)
        tensors[f"{key}.lora_B.bias"] = (vec.double() * scale).float()
        modules.append(module)
    return tensors, modules


DEFAULT_LORA_RANK = 8


def _checked_rank(mode: str, rank: int | None) -> int | None:
    """The LoRA rank of a `lora` fold (default 8); the other modes take none."""
    if mode != "lora":
        if rank is not None:
            raise UserError(f"--rank applies to --mode lora only (a {mode} fold has no rank): drop it")
        return None
    rank = DEFAULT_LORA_RANK if rank is None else rank
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    return rank


def fold(target: str, vectors: SteeringVectors, out: str | Path, scale: float = 1.0, mode: str = "bias",
         rank: int | None = None, link: bool = False, overwrite: bool = False, card_context: dict | None = None,
         verify: bool = True, tolerance: float = 1e-3, allow_pickle: bool = False, progress: bool = True,
         reference=None, dtype: str | torch.dtype | None = "auto") -> FoldResult:
    """Export `target` with `scale * vectors` folded in; see the module docstring for the modes. A bias
    fold is written in `dtype` (`auto`: the precision of the target's own weights) and verified in it
    (`verify.verify_export`); adapters keep their tensors in float32 beside the base."""
    from . import card
    from . import verify as verify_mod

    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}': use {' or '.join(MODES)}")
    if mode == "gated-lora":
        raise UserError("the gated-lora mode fits gates on the loaded target: use export.gated.fit_and_fold "
                        "(the CLI's and unlock_export.fold's gated-lora mode)")
    rank = _checked_rank(mode, rank)
    if not math.isfinite(scale):
        raise UserError(f"--scale must be a finite number, got {scale}")
    out = Path(out)
    scratch = Path(tempfile.mkdtemp(prefix=owned_prefix(out, "src"), dir=out.parent if out.parent.exists() else None))
    try:
        source_dir, source = materialize(target, scratch, allow_pickle)
        check_output_path(out, source_dir if source.kind != "gguf" else Path(source.path) / source.gguf_file, overwrite)
        ckpt = Checkpoint(source_dir)
        vectors = vectors.for_model(ckpt.layer_count(), ckpt.hidden_size(), f"'{target}'")
        arch = architecture_for_config(ckpt.config)
        if mode == "bias":
            plan = arch.bias_plan(ckpt.config, vectors.site)
            carrier = plan.carrier
        else:
            carrier = arch.adapter_carrier(vectors.site)
            if mode == "adapter" and arch.conv1d:
                raise UserError(f"PEFT's BEFT adapts nn.Linear modules only and {arch.model_type}'s {carrier} is a "
                                "Conv1D: use --mode lora (a LoRA with lora_bias) or --mode bias")
        exported_type, shards, verification = arch.model_type, {}, None
        weights = export_dtype(ckpt, dtype) if mode == "bias" else torch.float32
        if mode != "bias" and dtype not in (None, "auto"):
            raise UserError(f"--dtype applies to --mode bias only (a {mode} adapter is float32 beside the base): "
                            "drop it")
        stored = None
        with staging_dir(out, overwrite) as work:
            if mode == "bias":
                added, changed, stored = fold_tensors(ckpt, plan, vectors, scale, arch.layers_path, weights)
                config = _folded_config(ckpt.config, plan)
                exported_type = config.get("model_type", arch.model_type)
                shards = write_checkpoint(ckpt, work, config, added, changed,
                                          link=link or source.kind == "gguf", progress=progress, dtype=weights)
            elif mode == "adapter":
                _write_beft(ckpt, work, carrier, vectors, scale, arch.layers_path, target)
            else:
                _write_lora(ckpt, work, carrier, vectors, scale, rank, arch.layers_path, arch.conv1d, target)
            if verify:
                try:
                    verification = verify_mod.verify_export(work, vectors, scale, base=str(source_dir),
                                                            tolerance=tolerance, reference=reference,
                                                            dtype=weights, stored=stored)
                except ExportFailure as exc:
                    raise ExportFailure(f"{exc}; no output was written")
            result = FoldResult(out, mode, arch.model_type, exported_type, vectors.layers, scale, vectors.site,
                                carrier, shards, verification)
            card.write(work, result, vectors, target=target, source_dir=source_dir, mode=mode, rank=rank,
                       context=card_context or {})
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _beft_config_class():
    try:
        from peft import BeftConfig
    except ImportError:
        import peft

        raise UserError(f"--mode adapter writes a BEFT adapter, which needs PEFT 0.20 or later (found "
                        f"{peft.__version__}): upgrade peft, or use --mode lora") from None
    return BeftConfig


def _write_beft(ckpt: Checkpoint, work: Path, carrier: str, vectors: SteeringVectors, scale: float,
                layers_path: str, target: str) -> None:
    config_class = _beft_config_class()
    tensors, modules = beft_tensors(ckpt, carrier, vectors, scale, layers_path)
    config = config_class(target_modules=modules, task_type="CAUSAL_LM", base_model_name_or_path=target)
    _write_peft(ckpt, work, config, tensors)


def _write_lora(ckpt: Checkpoint, work: Path, carrier: str, vectors: SteeringVectors, scale: float,
                rank: int, layers_path: str, conv1d: bool, target: str) -> None:
    from peft import LoraConfig

    tensors, modules = lora_tensors(ckpt, carrier, vectors, scale, rank, layers_path, conv1d)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=modules, lora_bias=True,
                        bias="none", fan_in_fan_out=conv1d, task_type="CAUSAL_LM",
                        base_model_name_or_path=target)
    _write_peft(ckpt, work, config, tensors)


def _write_peft(ckpt: Checkpoint, work: Path, config, tensors: dict[str, torch.Tensor]) -> None:
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


