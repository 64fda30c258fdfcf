"""gated-lora: the gated edit (method/gate.py) as weights, the paper form's last-token edit that stock
servers switch per request.

LoRA     on each steered layer's carrier module a rank-r LoRA with A = [a_L1 .. a_Lr]^T (the gates) and
         B = [w_L .. w_L] (the write, once per gate), lora_alpha = r so PEFT's scaling is 1, and no
         biases: stock PEFT loads it, and it merges into any module.
--merge  W += w_L (a_L1 + .. + a_Lr)^T written into the checkpoint's shards (no config change, no
         relabel).
Both are verified against the hook form (`gated_edit`). The gates are fitted on the loaded target first
(api.fold_gated_lora), and the export takes that fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import UserError
from . import CHECKPOINT_LOAD, CardText, ExportJob, Written, peft_load

if TYPE_CHECKING:  # a form module loads no torch until it writes (the CLI reads the registry)
    import torch

    from ...method.gate import GateFit
    from ...models.checkpoint import Checkpoint


def gated_lora_tensors(ckpt: Checkpoint, carrier: str, fit: GateFit,
                       layers_path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """lora_A [r, in] = the gates, lora_B [out, r] = the write once per gate, per steered layer (no biases)."""
    from ..base import carrier_modules

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
    import torch

    from ..base import carrier_modules

    changed = {}
    for layer, module in carrier_modules(ckpt, carrier, fit.gates, layers_path):
        gate, name = fit.gates[layer].sum(0), f"{module}.weight"
        weight = ckpt.read(name).to(dtype or ckpt.dtype(name))
        delta = torch.outer(gate.double(), fit.writes[layer].double()) if conv1d else \
            torch.outer(fit.writes[layer].double(), gate.double())
        changed[name] = (weight.double() + delta).to(weight.dtype)
    return changed


class GatedLoraForm:
    name = "gated-lora"
    summary = ("the paper form's last-token edit as a plain rank-r LoRA whose label-free gates open at the last "
               "prompt token (or merged into a checkpoint)")
    default_rank = 1
    merges = True
    fits_gates = True  # its gates are fitted on the loaded target first (api.fold_gated_lora)

    def peft_type(self, merge: bool) -> str | None:
        return None if merge else "LORA"

    def carrier(self, arch, config: dict, site: str) -> str:
        return arch.adapter_carrier(site)

    def write(self, job: ExportJob) -> Written:
        from ...method.gate import gated_edit
        from ...models.checkpoint import write_checkpoint
        from ..base import write_peft

        fit = job.fit
        if fit is None:
            raise UserError("the gated-lora form writes gates fitted on the loaded target: use "
                            "unlock_export.fold(mode='gated-lora') or `unlock-export fold --mode gated-lora`")
        if sorted(fit.gates) != job.vectors.layers:
            raise UserError(f"the gates are for layers {sorted(fit.gates)} but the vectors steer {job.vectors.layers}")
        shards = {}
        if job.merge:
            changed = merged_weights(job.ckpt, job.carrier, fit, job.arch.layers_path, job.arch.conv1d, job.dtype)
            shards = write_checkpoint(job.ckpt, job.work, dict(job.ckpt.config), {}, changed,
                                      link=job.link or job.source_kind == "gguf", progress=job.progress,
                                      dtype=job.dtype)
        else:
            from peft import LoraConfig

            tensors, modules = gated_lora_tensors(job.ckpt, job.carrier, fit, job.arch.layers_path)
            config = LoraConfig(r=fit.rank, lora_alpha=fit.rank, lora_dropout=0.0, target_modules=modules,
                                bias="none", fan_in_fan_out=job.arch.conv1d, task_type="CAUSAL_LM",
                                base_model_name_or_path=job.target)
            write_peft(job.ckpt, job.work, config, tensors)
        return Written(job.arch.model_type, shards, edit=lambda loaded: gated_edit(loaded, fit),
                       card_context={"gate_fit": fit.summary()})

    def reference(self, export_dir: Path, info: dict):
        """The hook form of the gated edit a written LoRA holds (its own gates and write), for `verify`."""
        from ...method.gate import gated_edit

        if str(info.get("mode", "")).endswith("-merged"):
            raise UserError(f"'{export_dir}' is a merged gated edit, whose gates live inside its weights: it was "
                            "verified when it was written (unlock.json: verification); verify its LoRA form instead")
        fit = fit_from_adapter(export_dir, info)
        return lambda loaded: gated_edit(loaded, fit)

    def card(self, result, target: str, context: dict) -> CardText:
        fit = context.get("gate_fit") or {}
        rank = fit.get("rank", 1)
        window = "the last prompt token" + (f" and the first {rank - 1} answer tokens" if rank > 1 else "")
        what = (f"a gated rank-{rank} edit of `{result.carrier}` in each steered layer: W += w (a_1 + .. + a_{rank})^T, "
                "where each gate a_k, fitted without labels on the module's own input, reads about 1 at one "
                f"position of {window} and about 0 elsewhere, and w = multiplier x alpha x |h| x the unit "
                f"direction (multiplier {result.scale:g}, alpha {fit.get('alpha', '?')}).")
        gates = fit.get("heldout") or {}
        held = (f"on held-out prompts the first gate reads {min(v['at_last_token'] for v in gates.values()):.3g} .. "
                f"{max(v['at_last_token'] for v in gates.values()):.3g} at the last prompt token, the gates together "
                f"at most {max(v['max_abs_elsewhere'] for v in gates.values()):.3g} at other prompt tokens and "
                f"{max(v.get('max_abs_later_answer_tokens', 0.0) for v in gates.values()):.3g} at later answer tokens"
                if gates else "not measured")
        rows = (f"| gate fit | {fit.get('fit_prompts', '?')} prompts ({fit.get('fit_positions', '?')} positions), "
                f"ridge {fit.get('ridge', '?')}; {held} |\n")
        if fit.get("multiplier_calibration"):
            rows += (f"| multiplier choice | label-free: the closest to the paper form at the answer start on "
                     f"{fit['multiplier_calibration']['prompts']} held-out prompts within the perplexity guard |\n")
        close = fit.get("closeness")
        if close:
            rows += (f"| closeness to the paper form | KL at the answer start on {close['prompts']} held-out "
                     f"prompts: this edit {close['gated']['kl']:.3g}, the bias fold at its label-free scale "
                     f"{close['bias']['scale']:g} {close['bias']['kl']:.3g}, unsteered {close['unsteered']:.3g} |\n")
        note = ("Note: the gate is a linear read of the module's input, so it also opens, weakly, at positions "
                "other than the last prompt token (the figure above); the paper's own edit touches that token only.")
        return CardText(what, CHECKPOINT_LOAD if result.mode.endswith("-merged") else self._lora_load(target), rows, note)

    @staticmethod
    def _lora_load(target: str) -> str:
        from ..card import base_model_id
        from ..serving import lora_request, lora_server_command, vllm_lora_command

        base = base_model_id(target)
        return ("This is a plain LoRA (no biases). It loads with PEFT on top of the base model, and "
                f"`model.merge_and_unload()` gives an ordinary checkpoint:\n\n{peft_load(base)}\n\n"
                "Stock servers switch it per request. vLLM serves it beside the base model (and other "
                "adapters), chosen by the request's `model`:\n\n"
                f"```sh\n{vllm_lora_command(base, {'steer': 'PATH_TO_THIS_FOLDER'})}\n```\n\n"
                "llama.cpp takes it as a LoRA GGUF (`unlock-export gguf PATH_TO_THIS_FOLDER -o steer.gguf`) on the "
                "base model's GGUF, its scale chosen in each request:\n\n"
                f"```sh\n{lora_server_command('steer.gguf', 'BASE.gguf')}\n{lora_request(1.0)}\n```")


def fit_from_adapter(adapter: str | Path, info: dict) -> GateFit:
    """The gated edit a gated-lora adapter holds (lora_A: the gates; lora_B's first column: the write),
    with its fit's record from unlock.json (`info`): the hook form `verify` checks the reload against."""
    import re

    from safetensors.torch import load_file

    from ...method.gate import GateFit

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


FORM = GatedLoraForm()
