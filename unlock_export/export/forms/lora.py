"""lora: a PEFT LoRA with lora_bias=True on each steered layer's carrier module (PEFT >= 0.14): standard
init (B = 0) makes the low-rank delta zero, so the lora_B bias is exactly the offset (lora_alpha = r
keeps scaling 1). For PEFT before BEFT, and GPT-2's Conv1D modules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import ExportJob, OffsetForm, Written

if TYPE_CHECKING:  # a form module loads no torch until it writes (the CLI reads the registry)
    import torch

    from ...method.vectors import SteeringVectors
    from ...models.checkpoint import Checkpoint


def lora_tensors(ckpt: Checkpoint, carrier: str, vectors: SteeringVectors, scale: float, rank: int,
                 layers_path: str, conv1d: bool, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LoRA weights with standard init (A random, B zero) and the offset as lora_B's bias."""
    import torch

    from ..base import carrier_modules

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


class LoraForm(OffsetForm):
    name = "lora"
    summary = "a PEFT LoRA with lora_bias holding the offsets (older PEFT, GPT-2's Conv1D)"
    default_rank = 8
    peft = "LORA"
    loads_as = "a LoRA adapter whose lora_B bias carries the offset (PEFT 0.14 or later, `lora_bias`)"

    def write(self, job: ExportJob) -> Written:
        from peft import LoraConfig

        from ..base import write_peft

        conv1d = job.arch.conv1d
        tensors, modules = lora_tensors(job.ckpt, job.carrier, job.vectors, job.scale, job.rank,
                                        job.arch.layers_path, conv1d)
        config = LoraConfig(r=job.rank, lora_alpha=job.rank, lora_dropout=0.0, target_modules=modules,
                            lora_bias=True, bias="none", fan_in_fan_out=conv1d, task_type="CAUSAL_LM",
                            base_model_name_or_path=job.target)
        write_peft(job.ckpt, job.work, config, tensors)
        return Written(job.arch.model_type)


FORM = LoraForm()
