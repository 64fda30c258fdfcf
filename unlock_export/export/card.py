"""Model card (README.md, Hub conventions) and unlock.json provenance for every export."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import yaml

from .. import __version__
from ..method.vectors import SteeringVectors, format_layers


def _base_license(source_dir: Path) -> str | None:
    readme = source_dir / "README.md"
    if readme.is_file():
        meta = front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        if meta.get("license"):
            return str(meta["license"])
    return None


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card ({} when it has none or it does not parse)."""
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _base_model_id(target: str) -> str:
    """What the Hub's base_model field can link: an id as given, a zoo model's upstream id, else the name."""
    from ..models.zoo import ZOO, ZOO_PREFIX

    if target.count("/") == 1 and not Path(target).exists():
        return target
    if target.startswith(ZOO_PREFIX) and target[len(ZOO_PREFIX):] in ZOO:
        return ZOO[target[len(ZOO_PREFIX):]].hub_id
    by_file = {m.filename: m.hub_id for m in ZOO.values()}
    return by_file.get(Path(target).name, Path(target).name)


PEFT_TYPES = {"adapter": "BEFT", "lora": "LORA", "gated-lora": "LORA"}  # the fold modes that write a PEFT adapter


def provenance(result, vectors: SteeringVectors, target: str, mode: str, rank: int, context: dict) -> dict:
    return {
        "tool": "unlock-export",
        "version": __version__,
        "mode": mode,
        "target": target,
        "target_model_type": result.model_type,
        "exported_model_type": result.exported_model_type,
        "site": result.site,
        "carrier_module": result.carrier,
        "layers": result.layers,
        "scale": result.scale,
        "peft_type": PEFT_TYPES.get(mode),
        "adapter_rank": rank if mode in ("lora", "gated-lora") else None,
        "vector_norms": {str(k): round(v, 6) for k, v in vectors.norms().items()},
        "vectors_provenance": vectors.provenance,
        "verification": result.verification,
        "command": context.get("command") or " ".join(shlex.quote(a) for a in ["unlock-export", *sys.argv[1:]]),
        **{k: v for k, v in context.items() if k != "command"},
    }


def write(work: Path, result, vectors: SteeringVectors, target: str, source_dir: Path, mode: str, rank: int,
          context: dict) -> None:
    """unlock.json and the model card (README.md with Hub front matter) of an export in `work`."""
    info = provenance(result, vectors, target, mode, rank, context)
    (work / "unlock.json").write_text(json.dumps(info, indent=2))
    card = "---\n" + yaml.safe_dump(_front(target, mode, source_dir), sort_keys=False) + "---\n"
    (work / "README.md").write_text(card + _body(result, vectors, target, mode, context, info), encoding="utf-8")


def _front(target: str, mode: str, source_dir: Path) -> dict:
    """The card's front matter: what the Hub links to (base model, library, tags, the base's license)."""
    front = {"base_model": _base_model_id(target),
             "library_name": "peft" if mode in PEFT_TYPES else "transformers",
             "tags": ["unlock-export", "steering"] + ([PEFT_TYPES[mode].lower()] if mode in PEFT_TYPES else [])}
    license_ = _base_license(source_dir)
    if license_:
        front["license"] = license_
    return front


def _verification_line(ver: dict | None) -> str:
    if not ver:
        return "not run (--no-verify)"
    line = (f"max \\|dlogit\\| {ver['max_abs_dlogit']:.3g} against the hook-steered original on {ver['prompts']} "
            f"prompts (tolerance {ver['tolerance']:.3g}, top-1 agreement {ver['top1_agreement']:.1%}; the steering "
            f"itself moves logits by up to {ver['steering_effect_max_abs_dlogit']:.3g})")
    if ver.get("precision_floor_max_abs_dlogit"):
        line += (f"; the tolerance is {ver['float32_tolerance']:g} plus the {ver['dtype']} floor "
                 f"{ver['precision_floor_max_abs_dlogit']:.3g} (how far computing the unsteered model in "
                 f"{ver['dtype']} moves its logits)")
    if ver.get("exact_max_abs_dlogit") is not None:
        line += (f"; against the hooks adding the offsets as stored in {ver['dtype']}: "
                 f"{ver['exact_max_abs_dlogit']:.3g}")
    return line


def _precision_line(result) -> str:
    """What precision the export's tensors are in."""
    stored = (result.shards or {}).get("dtype")
    if stored:
        return f"{stored} (every floating tensor of the checkpoint)"
    return "float32 adapter tensors, applied to the base model in the precision it is loaded in"


def _load_hint(target: str, mode: str) -> str:
    """How to load the export, and which stacks can (an adapter: PEFT only; the routes for the others)."""
    if mode == "gated-lora":
        from .serving import lora_request, lora_server_command, vllm_lora_command

        return ("This is a plain LoRA (no biases). It loads with PEFT on top of the base model, and "
                "`model.merge_and_unload()` gives an ordinary checkpoint:\n\n"
                "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{_base_model_id(target)}\")\n"
                "model = PeftModel.from_pretrained(base, \"PATH_TO_THIS_FOLDER\")\n```\n\n"
                "Stock servers switch it per request. vLLM serves it beside the base model (and other "
                "adapters), chosen by the request's `model`:\n\n"
                f"```sh\n{vllm_lora_command(_base_model_id(target), {'steer': 'PATH_TO_THIS_FOLDER'})}\n```\n\n"
                "llama.cpp takes it as a LoRA GGUF (`unlock-export gguf PATH_TO_THIS_FOLDER -o steer.gguf`) on the "
                "base model's GGUF, its scale chosen in each request:\n\n"
                f"```sh\n{lora_server_command('steer.gguf', 'BASE.gguf')}\n{lora_request(1.0)}\n```")
    if mode not in PEFT_TYPES:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n"
                "model = AutoModelForCausalLM.from_pretrained(\"PATH_TO_THIS_FOLDER\")  # no trust_remote_code, "
                "no hooks\n```")
    what = ("a BEFT adapter (one bias vector per steered module; PEFT 0.20 or later)" if mode == "adapter" else
            "a LoRA adapter whose lora_B bias carries the offset (PEFT 0.14 or later, `lora_bias`)")
    return (
        f"This is {what}. It loads with PEFT on top of the base model:\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained(\"{_base_model_id(target)}\")\n"
        "model = PeftModel.from_pretrained(base, \"PATH_TO_THIS_FOLDER\")\n```\n\n"
        "`model.merge_and_unload()` works only where the steered module already has a bias of its own "
        "(GPT-NeoX, GPT-2); elsewhere PEFT refuses to merge. vLLM and llama.cpp do not load bias adapters: "
        "serve the folded checkpoint (`unlock-export fold --mode bias`) with vLLM or transformers, or the "
        "control vector (`unlock-export cvec`) with llama.cpp."
    )


def _body(result, vectors: SteeringVectors, target: str, mode: str, context: dict, info: dict) -> str:
    """The card's text: what the export is, its provenance table, how to load it, how to reproduce it."""
    prov = vectors.provenance
    norms = vectors.norms()
    verification = _verification_line(result.verification)
    load_hint = _load_hint(target, mode)
    relabel = (f"\nThe checkpoint is relabelled from `{result.model_type}` to `{result.exported_model_type}`, "
               "which has the same layout plus the bias flags it needs; the unsteered weights are unchanged.\n"
               if result.exported_model_type != result.model_type else "")
    diag_rows = ""
    if context.get("diagnostics"):
        diag_rows += f"| diagnostics | {context['diagnostics']} (per layer: diagnostics.json / .png beside this export's recipe outputs) |\n"
    if context.get("calibration"):
        diag_rows += f"| scale choice | {context['calibration']} |\n"
    what = (f"a constant offset added to the residual stream{' after the attention block' if result.site == 'post_attention' else ' at the output'}\n"
            f"of each steered decoder layer, as {'a bias vector the adapter adds to the output' if mode in PEFT_TYPES else 'the bias'} "
            f"of `{result.carrier}`.")
    note = ("Note: the offset applies at every position, prompt and generated tokens alike. That is a different\n"
            "intervention from the paper's own prefill-only, last-token edit; the scale was chosen for this form.")
    if mode.startswith("gated-lora"):
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
        diag_rows += (f"| gate fit | {fit.get('fit_prompts', '?')} prompts ({fit.get('fit_positions', '?')} positions), "
                      f"ridge {fit.get('ridge', '?')}; {held} |\n")
        if fit.get("multiplier_calibration"):
            diag_rows += (f"| multiplier choice | label-free: the closest to the paper form at the answer start on "
                          f"{fit['multiplier_calibration']['prompts']} held-out prompts within the perplexity guard |\n")
        close = fit.get("closeness")
        if close:
            diag_rows += (f"| closeness to the paper form | KL at the answer start on {close['prompts']} held-out "
                          f"prompts: this edit {close['gated']['kl']:.3g}, the bias fold at its label-free scale "
                          f"{close['bias']['scale']:g} {close['bias']['kl']:.3g}, unsteered {close['unsteered']:.3g} |\n")
        note = ("Note: the gate is a linear read of the module's input, so it also opens, weakly, at positions "
                "other than the last prompt token (the figure above); the paper's own edit touches that token only.")
    body = f"""
# {_base_model_id(target)} + UNLOCK steering ({mode})

This {"adapter" if mode in PEFT_TYPES else "checkpoint"} was produced by
[unlock-export](https://pypi.org/project/unlock-export/) {__version__}. It carries a capability
direction transferred training-free (UNLOCK, arXiv 2604.06377) as {what}
{relabel}
| | |
|---|---|
| source (unlocked / locked) | `{prov.get('source', '?')}` / `{prov.get('source_locked', '?')}` |
| key | {prov.get('method', '?')}, templates {prov.get('key_templates', '?')}, N = {prov.get('n_prompts_key', '?')} |
| alignment | rank {prov.get('rank', '?')}, N = {prov.get('n_prompts_align', '?')} |
| target | `{target}` |
| layers | {format_layers(result.layers)} ({len(result.layers)} of {vectors.layer_count}) |
| site | {result.site} |
| scale | {result.scale:g} |
| vector norms (x scale) | {min(norms.values()) * abs(result.scale):.4g} .. {max(norms.values()) * abs(result.scale):.4g} |
| weights | {_precision_line(result)} |
| verification | {verification} |
{diag_rows}
{note}

## Use

{load_hint}

## Reproduce

```sh
{info['command']}
```
"""
    return body


