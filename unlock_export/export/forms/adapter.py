"""adapter: a PEFT BEFT adapter (PEFT >= 0.20): one bias vector on each steered layer's carrier module,
added to its output, which is exactly the offset; nothing else, no relabel. nn.Linear modules only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import UserError
from . import ExportJob, OffsetForm, Written

if TYPE_CHECKING:  # a form module loads no torch until it writes (the CLI reads the registry)
    import torch

    from ...method.vectors import SteeringVectors
    from ...models.checkpoint import Checkpoint

def beft_tensors(ckpt: Checkpoint, carrier: str, vectors: SteeringVectors, scale: float,
                 layers_path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BEFT weights: the offset as each carrier module's `beft_bias` ([1, out], as PEFT stores it)."""
    from ..base import carrier_modules

    tensors, modules = {}, []
    for layer, module in carrier_modules(ckpt, carrier, vectors.directions, layers_path):
        vec = vectors.directions[layer]
        tensors[f"base_model.model.{module}.beft_bias"] = (vec.double() * scale).float().unsqueeze(0)
        modules.append(module)
    return tensors, modules


def beft_config_class():
    try:
        from peft import BeftConfig
    except ImportError:
        import peft

        raise UserError(f"--mode adapter writes a BEFT adapter, which needs PEFT 0.20 or later (found "
                        f"{peft.__version__}): upgrade peft, or use --mode lora") from None
    return BeftConfig


class AdapterForm(OffsetForm):
    name = "adapter"
    summary = "a PEFT BEFT adapter: a bias per steered module (PEFT >= 0.20)"
    peft = "BEFT"
    loads_as = "a BEFT adapter (one bias vector per steered module; PEFT 0.20 or later)"

    def carrier(self, arch, config: dict, site: str) -> str:
        carrier = arch.adapter_carrier(site)
        if arch.conv1d:
            raise UserError(f"PEFT's BEFT adapts nn.Linear modules only and {arch.model_type}'s {carrier} is a "
                            "Conv1D: use --mode lora (a LoRA with lora_bias) or --mode bias")
        return carrier

    def write(self, job: ExportJob) -> Written:
        from ..base import write_peft

        config_class = beft_config_class()
        tensors, modules = beft_tensors(job.ckpt, job.carrier, job.vectors, job.scale, job.arch.layers_path)
        write_peft(job.ckpt, job.work, config_class(target_modules=modules, task_type="CAUSAL_LM",
                                                    base_model_name_or_path=job.target), tensors)
        return Written(job.arch.model_type)


FORM = AdapterForm()
