"""Export the gated edit (method/gate.py): a plain PEFT LoRA, or merged, a standalone checkpoint.

gated-lora  on each steered layer's carrier module a rank-1 LoRA with A = a_L^T (the gate) and
            B = w_L (the write), lora_alpha = r so PEFT's scaling is 1, and no biases: stock PEFT
            loads it, and it merges into any module (the product lives in the weight).
--merge     W += w_L a_L^T written into the checkpoint's shards (no config change, no relabel).
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
from .fold import FoldResult, _write_peft, carrier_modules, materialize

MODE = "gated-lora"


def gated_lora_tensors(ckpt: Checkpoint, carrier: str, fit: GateFit, layers_path: str,
                       conv1d: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """lora_A [1, in] = the gate, lora_B [out, 1] = the write, per steered layer (no biases)."""
    tensors, modules = {}, []
    for layer, module in carrier_modules(ckpt, carrier, fit.gates, layers_path):
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = fit.gates[layer].float()[None, :].contiguous()
        tensors[f"{key}.lora_B.weight"] = fit.writes[layer].float()[:, None].contiguous()
        modules.append(module)
    return tensors, modules


def merged_weights(ckpt: Checkpoint, carrier: str, fit: GateFit, layers_path: str,
                   conv1d: bool) -> dict[str, torch.Tensor]:
    """The carrier weights with w a^T added (Conv1D stores [in, out]: a w^T), in their own dtype."""
    changed = {}
    for layer, module in carrier_modules(ckpt, carrier, fit.gates, layers_path):
        gate, name = fit.gates[layer], f"{module}.weight"
        weight = ckpt.read(name)
        delta = torch.outer(gate.double(), fit.writes[layer].double()) if conv1d else \
            torch.outer(fit.writes[layer].double(), gate.double())
        changed[name] = (weight.double() + delta).to(weight.dtype)
    return changed


def fold_gated(target: str, fit: GateFit, vectors: SteeringVectors, out: str | Path, merge: bool = False,
               link: bool = False, overwrite: bool = False, card_context: dict | None = None, verify: bool = True,
               tolerance: float = 1e-3, progress: bool = True, reference=None) -> FoldResult:
    """Write the gated edit of `target` (gates and writes in `fit`, from `vectors`) to `out`: a PEFT
    LoRA, or with `merge` a standalone checkpoint; verified against `gated_edit` on the target."""
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
        with staging_dir(out, overwrite) as work:
            if merge:
                changed = merged_weights(ckpt, carrier, fit, arch.layers_path, arch.conv1d)
                shards = write_checkpoint(ckpt, work, dict(ckpt.config), {}, changed,
                                          link=link or source.kind == "gguf", progress=progress)
            else:
                from peft import LoraConfig

                tensors, modules = gated_lora_tensors(ckpt, carrier, fit, arch.layers_path, arch.conv1d)
                config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=modules, bias="none",
                                    fan_in_fan_out=arch.conv1d, task_type="CAUSAL_LM",
                                    base_model_name_or_path=target)
                _write_peft(ckpt, work, config, tensors)
            if verify:
                try:
                    verification = verify_export(work, vectors, fit.multiplier, base=str(source_dir),
                                                 tolerance=tolerance, reference=reference,
                                                 edit=lambda loaded: gated_edit(loaded, fit))
                except ExportFailure as exc:
                    raise ExportFailure(f"{exc}; no output was written")
            result = FoldResult(out, MODE + ("-merged" if merge else ""), arch.model_type, arch.model_type,
                                vectors.layers, fit.multiplier, vectors.site, carrier, shards, verification)
            card.write(work, result, vectors, target=target, source_dir=source_dir, mode=result.mode, rank=1,
                       context={**(card_context or {}), "gate_fit": fit.summary()})
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fit_and_fold(target: str, vectors: SteeringVectors, out: str | Path, *, prompts: str = "builtin:gsm8k-train",
                 count: int = 32, offset: int = 0, heldout: int = 8, template: str = "direct", alpha: float = 0.1,
                 multiplier: float = 1.0, ridge: float | None = None, merge: bool = False, loaded=None,
                 **fold_options) -> FoldResult:
    """Fit the gates on `count` unlabeled prompts of the target (after `offset`; the next `heldout`
    measure them) and write the gated edit: `fold --mode gated-lora`. `loaded`: the target already in
    memory in float32 (else it is loaded here, float32 on the CPU)."""
    from ..method.gate import DEFAULT_RIDGE, fit_gates
    from ..models.loading import load
    from ..prompts import apply_template, load_questions

    if count < 1 or heldout < 0:
        raise UserError(f"the gate fit needs --gate-count >= 1 and a held-out count >= 0, got {count} and {heldout}")
    questions = load_questions(prompts, count=count + heldout, offset=offset)
    if len(questions) < count:
        raise UserError(f"'{prompts}' holds {len(questions)} prompts after offset {offset}: the gate fit needs "
                        f"{count}; lower --gate-count")
    texts = apply_template(template, questions)
    if loaded is None or next(loaded.model.parameters()).dtype != torch.float32:
        loaded = load(target, dtype="float32", device="cpu")
    vectors = vectors.for_model(loaded.n_layers, loaded.hidden_size, f"'{target}'")
    fit = fit_gates(loaded, vectors, texts[:count], texts[count:], alpha=alpha, multiplier=multiplier,
                    ridge=DEFAULT_RIDGE if ridge is None else ridge)
    context = {**fold_options.pop("card_context", {}), "gate_prompts": f"{prompts} [{offset}:{offset + count}], "
               f"template {template}"}
    return fold_gated(target, fit, vectors, out, merge=merge, reference=loaded, card_context=context, **fold_options)
