"""Check an export against the hook-steered original: the stock library reloads the exported
checkpoint (or PEFT adapter) and its logits are compared with the additive-form reference."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import prompts
from ..errors import ExportFailure, UserError, first_line
from ..method.steer import additive_steering
from ..method.vectors import SteeringVectors
from ..models.loading import load

DEFAULT_PROMPTS = 4


def _logits(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Per-prompt logits over every position (one prompt at a time: no padding effects)."""
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer([text], return_tensors="pt").to(model.device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b| over all logits, fraction of positions whose top-1 token agrees)."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)]).mean()
    return diff, float(agree)


def verify_export(out: str | Path, vectors: SteeringVectors, scale: float, base: str,
                  tolerance: float = 1e-3, texts: list[str] | None = None, raise_on_fail: bool = True,
                  reference=None, edit=None) -> dict:
    """Compare the export in `out` with `base` steered by `scale * vectors` (additive form), in float32.
    `reference`: the base already loaded (a float32 LoadedModel) is used instead of loading it again;
    an adapter is always checked on a fresh load, since PEFT wraps the model it is given. `edit(loaded)`:
    the hook form of another edit to compare with (a context manager; the gated edit's), instead."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    texts = texts or prompts.apply_template("direct", prompts.builtin_arithmetic(DEFAULT_PROMPTS, seed=11))
    usable = (reference is not None and not (out / "adapter_config.json").is_file()
              and next(reference.model.parameters()).dtype == torch.float32)
    reference_model = reference if usable else load(base, dtype="float32", device="cpu")
    tokenizer = reference_model.tokenizer
    plain = _logits(reference_model.model, tokenizer, texts)
    with (edit(reference_model) if edit else additive_steering(reference_model, vectors, scale)):
        reference = _logits(reference_model.model, tokenizer, texts)
    if (out / "adapter_config.json").is_file():
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # "cannot merge: the base layer has no bias": the card says so
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            exported = PeftModel.from_pretrained(reference_model.model, str(out)).eval()
        kind = "peft adapter"
    else:
        try:
            exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            exported.to(reference_model.device)
        except (OSError, ValueError) as exc:
            raise UserError(f"transformers cannot load '{out}': {first_line(exc, 300)}")
        kind = "checkpoint"
    got = _logits(exported, tokenizer, texts)
    max_diff, top1 = compare(got, reference)
    effect, _ = compare(plain, reference)
    report = {"kind": kind, "prompts": len(texts), "max_abs_dlogit": max_diff, "top1_agreement": top1,
              "steering_effect_max_abs_dlogit": effect, "tolerance": tolerance, "passed": max_diff <= tolerance}
    if raise_on_fail and not report["passed"]:
        raise ExportFailure(
            f"verification failed: exported {kind} differs from the hook-steered reference by max |dlogit| "
            f"{max_diff:.3g} > tolerance {tolerance:g} (top-1 agreement {top1:.1%})"
        )
    return report
