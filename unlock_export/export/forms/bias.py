"""bias: a standalone checkpoint whose bias on each steered layer's residual-writing module (the
architecture registry's bias plan) equals the offset; stock loaders need no custom code."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ...errors import UserError
from . import ExportJob, OffsetForm, Written

if TYPE_CHECKING:  # a form module loads no torch until it writes (the CLI reads the registry)
    import torch

    from ...method.vectors import SteeringVectors
    from ...models.architectures import BiasPlan
    from ...models.checkpoint import Checkpoint


def fold_tensors(ckpt: Checkpoint, plan: BiasPlan, vectors: SteeringVectors, scale: float,
                 layers_path: str, dtype: torch.dtype | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], SteeringVectors]:
    """(added, changed) tensors that carry `scale * vectors` as biases under `plan`, in `dtype` (default:
    each carrier's own), and the offsets they hold once rounded into it (scale 1: what `verify` checks
    the fold against, beside the requested offsets)."""
    import torch

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


def folded_config(config: dict, plan: BiasPlan) -> dict:
    out = {k: v for k, v in config.items() if k not in plan.config_drop and k != "quantization_config"}
    out.update(plan.config_set)
    return out


class BiasForm(OffsetForm):
    name = "bias"
    summary = "a standalone checkpoint whose carrier biases hold the offsets"

    def carrier(self, arch, config: dict, site: str) -> str:
        return arch.bias_plan(config, site).carrier

    def write(self, job: ExportJob) -> Written:
        from ...models.checkpoint import write_checkpoint

        plan = job.arch.bias_plan(job.ckpt.config, job.vectors.site)
        added, changed, stored = fold_tensors(job.ckpt, plan, job.vectors, job.scale, job.arch.layers_path, job.dtype)
        config = folded_config(job.ckpt.config, plan)
        shards = write_checkpoint(job.ckpt, job.work, config, added, changed,
                                  link=job.link or job.source_kind == "gguf", progress=job.progress, dtype=job.dtype)
        return Written(config.get("model_type", job.arch.model_type), shards, stored)


FORM = BiasForm()
