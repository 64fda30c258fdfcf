"""Export the gated edit (method/gate.py): a plain PEFT LoRA, or merged, a standalone checkpoint.

gated-lora  on each steered layer's carrier module a rank-r LoRA with A = [a_L1 .. a_Lr]^T (the
            gates) and B = [w_L .. w_L] (the write, once per gate), lora_alpha = r so PEFT's scaling
            is 1, and no biases: stock PEFT loads it, and it merges into any module.
--merge     W += w_L (a_L1 + .. + a_Lr)^T written into the checkpoint's shards (no config change, no
            relabel).
Both are verified against the hook form (`gated_edit`) before anything is written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .._io import owned_prefix, staging_dir
from ..errors import ExportFailure, UserError
from ..method.gate import GateFit, gated_edit
from ..method.vectors import SteeringVectors
from ..models.architectures import architecture_for_config
from ..models.checkpoint import Checkpoint, check_output_path, write_checkpoint
from .fold import FoldResult, _write_peft, carrier_modules, export_dtype, materialize

MODE = "gated-lora"


def gated_lora_tensors(ckpt: Checkpoint, carrier: str, fit: GateFit,
                       layers_path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """lora_A [r, in] = the gates, lora_B [out, r] = the write once per gate, per steered layer (no biases)."""
    tensors, modules = {}, []
    for layer, module in carrier_modules(ckpt, carrier, fit.gates, layers_path):
        key = f"base_model.model.{module}"
        gates = fit.gates[layer].float()
        tensors[f"{key}.lora_A.weight"] = gates.contiguous()
        tensors[f"{key}.lora_B.weight"] = fit.writes[layer].float()[:, None].repeat(1, gates.shape[0]).contiguous()
        modules.append(module)
    return tensors, modules


def merged_weights(ckpt: Checkpoint, carrier: str, fit: GateFit, layers_path: str,
                   conv1d: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The carrier weights with w (a_1 + .. + a_r)^T added (Conv1D stores [in, out]: the transpose), in
    `dtype` (default: their own)."""
    changed = {}
    for layer, module in carrier_modules(ckpt, carrier, fit.gates, layers_path):
        gate, name = fit.gates[layer].sum(0), f"{module}.weight"
        weight = ckpt.read(name).to(dtype or ckpt.dtype(name))
        delta = torch.outer(gate.double(), fit.writes[layer].double()) if conv1d else \
            torch.outer(fit.writes[layer].double(), gate.double())
        changed[name] = (weight.double() + delta).to(weight.dtype)
    return changed


def fold_gated(target: str, fit: GateFit, vectors: SteeringVectors, out: str | Path, merge: bool = False,
               link: bool = False, overwrite: bool = False, card_context: dict | None = None, verify: bool = True,
               tolerance: float = 1e-3, progress: bool = True, reference=None,
               dtype: str | torch.dtype | None = "auto") -> FoldResult:
    """Write the gated edit of `target` (gates and writes in `fit`, from `vectors`) to `out`: a PEFT
    LoRA (float32), or with `merge` a standalone checkpoint in `dtype` (`auto`: the target's own);
    verified against `gated_edit` on the target (`verify.verify_export`: its precision floor)."""
    from . import card
    from .verify import verify_export

    out = Path(out)
    scratch = Path(tempfile.mkdtemp(prefix=owned_prefix(out, "src"), dir=out.parent if out.parent.exists() else None))
    try:
        source_dir, source = materialize(target, scratch)
        check_output_path(out, source_dir if source.kind != "gguf" else Path(source.path) / source.gguf_file, overwrite)
        ckpt = Checkpoint(source_dir)
        vectors = vectors.for_model(ckpt.layer_count(), ckpt.hidden_size(), f"'{target}'")
        if sorted(fit.gates) != vectors.layers:
            raise UserError(f"the gates are for layers {sorted(fit.gates)} but the vectors steer {vectors.layers}")
        arch = architecture_for_config(ckpt.config)
        carrier = arch.adapter_carrier(vectors.site)
        shards, verification = {}, None
        if not merge and dtype not in (None, "auto"):
            raise UserError("--dtype applies to a merged gated edit only (--merge; the LoRA is float32 beside the "
                            "base): drop it")
        weights = export_dtype(ckpt, dtype) if merge else torch.float32
        with staging_dir(out, overwrite) as work:
            if merge:
                changed = merged_weights(ckpt, carrier, fit, arch.layers_path, arch.conv1d, weights)
                shards = write_checkpoint(ckpt, work, dict(ckpt.config), {}, changed,
                                          link=link or source.kind == "gguf", progress=progress, dtype=weights)
            else:
                from peft import LoraConfig

                tensors, modules = gated_lora_tensors(ckpt, carrier, fit, arch.layers_path)
                config = LoraConfig(r=fit.rank, lora_alpha=fit.rank, lora_dropout=0.0, target_modules=modules, bias="none",
                                    fan_in_fan_out=arch.conv1d, task_type="CAUSAL_LM",
                                    base_model_name_or_path=target)
                _write_peft(ckpt, work, config, tensors)
            if verify:
                try:
                    verification = verify_export(work, vectors, fit.multiplier, base=str(source_dir),
                                                 tolerance=tolerance, reference=reference, dtype=weights,
                                                 edit=lambda loaded: gated_edit(loaded, fit))
                except ExportFailure as exc:
                    raise ExportFailure(f"{exc}; no output was written")
            result = FoldResult(out, MODE + ("-merged" if merge else ""), arch.model_type, arch.model_type,
                                vectors.layers, fit.multiplier, vectors.site, carrier, shards, verification)
            card.write(work, result, vectors, target=target, source_dir=source_dir, mode=result.mode, rank=fit.rank,
                       context={**(card_context or {}), "gate_fit": fit.summary()})
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fit_from_adapter(adapter: str | Path, info: dict) -> GateFit:
    """The gated edit a gated-lora adapter holds (lora_A: the gates; lora_B's first column: the write),
    with its fit's record from unlock.json (`info`): the hook form `verify` checks the reload against."""
    import re

    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    fit = info.get("gate_fit") or {}
    gates, writes = {}, {}
    for name, tensor in tensors.items():
        found = re.search(r"\.(\d+)\.[\w.]+\.lora_([AB])\.weight$", name)
        if not found:
            raise UserError(f"'{adapter}' holds '{name}', which is no gated-lora tensor: pass a `fold --mode "
                            "gated-lora` folder")
        layer = int(found.group(1))
        if found.group(2) == "A":
            gates[layer] = tensor.float()
        else:
            writes[layer] = tensor.float()[:, 0]
    if sorted(gates) != sorted(writes):
        raise UserError(f"'{adapter}' has lora_A and lora_B tensors for different layers: refold it")
    return GateFit(gates, writes, fit.get("site", "layer_output"), fit.get("alpha", 0.0),
                   fit.get("multiplier", info.get("scale", 1.0)), fit.get("ridge", 0.0), fit.get("fit_prompts", 0),
                   fit.get("fit_positions", 0), rank=next(iter(gates.values())).shape[0] if gates else 1)
