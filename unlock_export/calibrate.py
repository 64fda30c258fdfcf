"""Label-free calibration of the additive (folded) form's scale.

The paper's form edits only the last prompt token during prefill; a fold adds a constant offset
at every position, so the same strength does not mean the same thing. The scale is chosen so the
additive form's next-token distribution at the answer start (the last prompt token) is closest in
KL to the reference form's, on unlabeled prompts, among the scales that keep perplexity on plain
text within a margin of the unsteered model's. No labels are read.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError
from .steer import steering
from .vectors import SteeringVectors

# 0 (unsteered), then 1/256 .. 64 in sqrt(2) steps. Vectors keep their natural norms and a fold adds
# one at every steered layer, so useful scales run from about 1/(steered layers) upwards.
DEFAULT_SCALES = (0.0,) + tuple(round(2 ** (k / 2), 6) for k in range(-16, 13))


def _batches(loaded, texts: list[str], batch_size: int | str):
    from .capture import resolve_batch_size

    batch_size = resolve_batch_size(batch_size, loaded, texts)
    tok = loaded.tokenizer
    for start in range(0, len(texts), batch_size):
        yield tok(texts[start:start + batch_size], return_tensors="pt", padding=True).to(loaded.device)


@torch.inference_mode()
def answer_start_logprobs(loaded, texts: list[str], batch_size: int = 8) -> torch.Tensor:
    """log p(next token) at the last prompt token of each text: [n, vocab] float32 (left padding)."""
    rows = []
    for enc in _batches(loaded, texts, batch_size):
        logits = loaded.model(**enc, logits_to_keep=1).logits[:, -1].float()
        rows.append(torch.log_softmax(logits, -1).cpu())
    return torch.cat(rows)


@torch.inference_mode()
def perplexity(loaded, texts: list[str], batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every real token of `texts`."""
    total, count = 0.0, 0
    for enc in _batches(loaded, texts, batch_size):
        logits = loaded.model(**enc).logits[:, :-1].float()
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """mean over rows of KL(p || q), both given as log-probabilities."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def calibrate_scale(loaded, vectors: SteeringVectors, texts: list[str], ppl_texts: list[str],
                    reference_form: str = "paper", reference_strength: float = 0.1,
                    scales: tuple[float, ...] = DEFAULT_SCALES, ppl_margin: float = 0.10,
                    batch_size: int = 8, refine: bool = True, progress: bool = False,
                    stop_after_rejected: int = 2, additive_layers: list[int] | None = None) -> dict:
    """Pick the additive scale closest (KL at the answer start) to `reference_form` at
    `reference_strength`, subject to perplexity <= (1 + ppl_margin) x unsteered.

    The reference steers every layer of `vectors`; `additive_layers` (default: the same) restricts
    the additive form to a band, as a fold with `--layers` would.

    Scales are tried in ascending order; perplexity grows with the scale, so the search stops once
    `stop_after_rejected` scales in a row fail the perplexity guard (0: try every scale)."""
    if not texts or not ppl_texts:
        raise UserError("calibration needs prompts and plain texts; pass --count > 0")
    if any(s < 0 or not math.isfinite(s) for s in scales):
        raise UserError("calibration scales must be finite and >= 0")
    additive = vectors if additive_layers is None else vectors.select(additive_layers)
    with steering(loaded, vectors, reference_form, reference_strength):
        reference = answer_start_logprobs(loaded, texts, batch_size)
    plain = answer_start_logprobs(loaded, texts, batch_size)
    base_ppl = perplexity(loaded, ppl_texts, batch_size)
    table: dict[float, dict] = {}

    def measure(scale: float) -> dict:
        if scale not in table:
            with steering(loaded, additive, "additive", scale):
                q = answer_start_logprobs(loaded, texts, batch_size)
                ppl = perplexity(loaded, ppl_texts, batch_size)
            table[scale] = {"scale": scale, "kl_to_reference": kl(reference, q), "perplexity": ppl,
                            "perplexity_ratio": ppl / base_ppl, "allowed": ppl <= base_ppl * (1 + ppl_margin)}
        return table[scale]

    from tqdm.auto import tqdm

    rejected = 0
    for scale in tqdm(sorted(scales), desc="calibrate scales", unit="scale", disable=not progress):
        rejected = 0 if measure(scale)["allowed"] else rejected + 1
        if stop_after_rejected and rejected >= stop_after_rejected:
            break
    if refine:  # one finer pass around the best allowed grid point
        allowed = sorted(s for s, r in table.items() if r["allowed"])
        if allowed:
            best = min(allowed, key=lambda s: table[s]["kl_to_reference"])
            for factor in (0.7071, 0.8409, 1.1892, 1.4142):
                candidate = round(best * factor, 4)
                if candidate > 0:
                    measure(candidate)
    allowed = [r for r in table.values() if r["allowed"]]
    chosen = min(allowed, key=lambda r: r["kl_to_reference"]) if allowed else None
    return {
        "scale": chosen["scale"] if chosen else 0.0,
        "kl_to_reference": chosen["kl_to_reference"] if chosen else kl(reference, plain),
        "kl_unsteered_to_reference": kl(reference, plain),
        "reference": {"form": reference_form, "strength": reference_strength, "layers": vectors.layers},
        "layers": additive.layers,
        "unsteered_perplexity": base_ppl,
        "ppl_margin": ppl_margin,
        "prompts": len(texts),
        "ppl_texts": len(ppl_texts),
        "table": [table[s] for s in sorted(table)],
        "note": None if chosen else "no scale kept perplexity within the margin: scale 0 (unsteered)",
    }
