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


def base_model_id(target: str) -> str:
    """What the Hub's base_model field can link: an id as given, a zoo model's upstream id, else the name."""
    from ..models.zoo import ZOO, ZOO_PREFIX

    if target.count("/") == 1 and not Path(target).exists():
        return target
    if target.startswith(ZOO_PREFIX) and target[len(ZOO_PREFIX):] in ZOO:
        return ZOO[target[len(ZOO_PREFIX):]].hub_id
    by_file = {m.filename: m.hub_id for m in ZOO.values()}
    return by_file.get(Path(target).name, Path(target).name)




def provenance(result, vectors: SteeringVectors, target: str, peft_type: str | None, rank: int | None,
               context: dict) -> dict:
    return {
        "tool": "unlock-export",
        "version": __version__,
        "mode": result.mode,
        "target": target,
        "target_model_type": result.model_type,
        "exported_model_type": result.exported_model_type,
        "site": result.site,
        "carrier_module": result.carrier,
        "layers": result.layers,
        "scale": result.scale,
        "peft_type": peft_type,
        "adapter_rank": rank if peft_type == "LORA" else None,
        "vector_norms": {str(k): round(v, 6) for k, v in vectors.norms().items()},
        "vectors_provenance": vectors.provenance,
        "verification": result.verification,
        "command": context.get("command") or " ".join(shlex.quote(a) for a in ["unlock-export", *sys.argv[1:]]),
        **{k: v for k, v in context.items() if k != "command"},
    }


def write(work: Path, result, vectors: SteeringVectors, target: str, source_dir: Path, peft_type: str | None,
          rank: int | None, context: dict, text) -> None:
    """unlock.json and the model card (README.md with Hub front matter) of an export in `work`; `text` is the
    form's part of the card (export.forms.CardText)."""
    info = provenance(result, vectors, target, peft_type, rank, context)
    (work / "unlock.json").write_text(json.dumps(info, indent=2))
    card = "---\n" + yaml.safe_dump(_front(target, peft_type, source_dir), sort_keys=False) + "---\n"
    (work / "README.md").write_text(card + _body(result, vectors, target, peft_type, context, info, text),
                                    encoding="utf-8")


def _front(target: str, peft_type: str | None, source_dir: Path) -> dict:
    """The card's front matter: what the Hub links to (base model, library, tags, the base's license)."""
    front = {"base_model": base_model_id(target),
             "library_name": "peft" if peft_type else "transformers",
             "tags": ["unlock-export", "steering"] + ([peft_type.lower()] if peft_type else [])}
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


def _body(result, vectors: SteeringVectors, target: str, peft_type: str | None, context: dict, info: dict,
          text) -> str:
    """The card's text: what the export is, its provenance table, how to load it, how to reproduce it."""
    prov = vectors.provenance
    norms = vectors.norms()
    verification = _verification_line(result.verification)
    relabel = (f"\nThe checkpoint is relabelled from `{result.model_type}` to `{result.exported_model_type}`, "
               "which has the same layout plus the bias flags it needs; the unsteered weights are unchanged.\n"
               if result.exported_model_type != result.model_type else "")
    diag_rows = ""
    if context.get("diagnostics"):
        diag_rows += f"| diagnostics | {context['diagnostics']} (per layer: diagnostics.json / .png beside this export's recipe outputs) |\n"
    if context.get("calibration"):
        diag_rows += f"| scale choice | {context['calibration']} |\n"
    diag_rows += text.rows
    what, note, load_hint = text.what, text.note, text.load
    body = f"""
# {base_model_id(target)} + UNLOCK steering ({result.mode})

This {"adapter" if peft_type else "checkpoint"} was produced by
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


