"""Check an export against the hook-steered original: the stock library reloads the exported
checkpoint (or PEFT adapter) and its logits are compared with the additive-form reference."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import prompts
from ..errors import ExportFailure, UserError, first_line
from ..method.steer import additive_steering
from ..method.vectors import SteeringVectors
from ..models.checkpoint import dtype_name
from ..models.loading import ModelSource, from_pretrained, load

DEFAULT_PROMPTS = 4


def _logits(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Per-prompt logits over every position (one prompt at a time: no padding effects)."""
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer([text], return_tensors="pt").to(model.device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def logit_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b| over all logits, fraction of positions whose top-1 token agrees)."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)]).mean()
    return diff, float(agree)


def _representable(model, dtype: torch.dtype) -> bool:
    """Whether every float32 parameter of `model` is exactly a `dtype` value."""
    return all(torch.equal(p, p.to(dtype).to(p.dtype)) for p in model.parameters() if p.is_floating_point())


def _round_weights(model, dtype: torch.dtype) -> None:
    """Round `model`'s parameters to `dtype` in place, keeping them float32 (the export's base weights)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(dtype))


def precision_floor(loaded, texts: list[str], dtype: torch.dtype, plain: list[torch.Tensor]) -> float:
    """max |dlogit| between the unsteered model computed in `dtype` and in float32 (`plain`): how far the
    precision the export is served in moves logits by itself. The weights must be `dtype` values; the model
    is put back exactly as it was (its float buffers restored)."""
    model = loaded.model
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.is_floating_point()}
    model.to(dtype)
    try:
        low = _logits(model, loaded.tokenizer, texts)
    finally:
        model.to(torch.float32)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return logit_gap(low, plain)[0]


def verify_export(out: str | Path, vectors: SteeringVectors, scale: float, base: str,
                  tolerance: float = 1e-3, texts: list[str] | None = None, raise_on_fail: bool = True,
                  reference=None, edit=None, dtype: torch.dtype = torch.float32,
                  stored: SteeringVectors | None = None) -> dict:
    """Compare the export in `out` with `base` steered by `scale * vectors` (additive form), in float32.

    `dtype`: the precision the export's weights are stored in. Both sides run in float32 on the same
    weights (the base's rounded to `dtype`), so they differ by how the export carries the edit and by
    the edit's own rounding into `dtype`. The bound is `tolerance` plus the precision floor: how far
    computing the unsteered model in `dtype` moves its logits (measured here; 0 for float32).
    `stored`: the offsets the export holds (scale 1, as rounded into `dtype`): the export must then also
    equal the hooks adding exactly those within `tolerance` alone, which shows the fold itself is exact.
    `reference`: the base already loaded (a float32 LoadedModel) is used instead of loading it again
    when its weights are `dtype` values; an adapter is always checked on a fresh load, since PEFT wraps
    the model it is given. `edit(loaded)`: the hook form of another edit to compare with (a context
    manager; the gated edit's), instead."""
    out = Path(out)
    texts = texts or prompts.apply_template("direct", prompts.builtin_arithmetic(DEFAULT_PROMPTS, seed=11))
    half = dtype != torch.float32
    adapter = (out / "adapter_config.json").is_file()
    usable = (reference is not None and not adapter
              and next(reference.model.parameters()).dtype == torch.float32
              and (not half or _representable(reference.model, dtype)))
    reference_model = reference if usable else load(base, dtype="float32", device="cpu")
    if half and not usable:
        _round_weights(reference_model.model, dtype)
    tokenizer = reference_model.tokenizer
    plain = _logits(reference_model.model, tokenizer, texts)
    with (edit(reference_model) if edit else additive_steering(reference_model, vectors, scale)):
        expected = _logits(reference_model.model, tokenizer, texts)
    exact = None
    if half and stored is not None:
        with additive_steering(reference_model, stored, 1.0):
            exact = _logits(reference_model.model, tokenizer, texts)
    floor = precision_floor(reference_model, texts, dtype, plain) if half else 0.0
    device = reference_model.device
    if not adapter and reference_model is not reference:  # every reference logit is in hand: free it first,
        del reference_model  # so the base and the export are never in memory together
        import gc

        gc.collect()
    if adapter:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # "cannot merge: the base layer has no bias": the card says so
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            exported = PeftModel.from_pretrained(reference_model.model, str(out)).eval()
        kind = "peft adapter"
    else:
        try:
            # the stock loader, in the export's precision, widened exactly (models.loading.from_pretrained)
            exported = from_pretrained(ModelSource(str(out), "dir", str(out)), torch.device("cpu"),
                                       dtype=torch.float32).eval()
            exported.to(device)
        except (OSError, ValueError) as exc:
            raise UserError(f"transformers cannot load '{out}': {first_line(exc, 300)}")
        kind = "checkpoint"
    got = _logits(exported, tokenizer, texts)
    max_diff, top1 = logit_gap(got, expected)
    effect, _ = logit_gap(plain, expected)
    bound = tolerance + floor
    report = {"kind": kind, "dtype": dtype_name(dtype), "prompts": len(texts),
              "max_abs_dlogit": max_diff, "top1_agreement": top1, "steering_effect_max_abs_dlogit": effect,
              "tolerance": bound, "float32_tolerance": tolerance, "precision_floor_max_abs_dlogit": floor,
              "passed": max_diff <= bound}
    if exact is not None:
        report["exact_max_abs_dlogit"] = logit_gap(got, exact)[0]
        report["passed"] = report["passed"] and report["exact_max_abs_dlogit"] <= tolerance
    if raise_on_fail and not report["passed"]:
        if max_diff > bound:
            floor_note = f" = {tolerance:g} + the {report['dtype']} floor {floor:.3g}" if half else ""
            raise ExportFailure(
                f"verification failed: exported {kind} differs from the hook-steered reference by max |dlogit| "
                f"{max_diff:.3g} > tolerance {bound:.3g}{floor_note} (top-1 agreement {top1:.1%})")
        raise ExportFailure(
            f"verification failed: exported {kind} differs from the hooks adding the offsets it stores by max "
            f"|dlogit| {report['exact_max_abs_dlogit']:.3g} > tolerance {tolerance:g}: the fold is not exact")
    return report
