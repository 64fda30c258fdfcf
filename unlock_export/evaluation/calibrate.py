"""Label-free calibration of the additive (folded) form's scale.

The paper's form edits only the last prompt token during prefill; a fold adds a constant offset
at every position, so the same strength does not mean the same thing. The scale is chosen to bring
the additive form closest to the reference form on unlabeled prompts, among the scales that keep
perplexity on plain text within a margin of the unsteered model's. No labels are read. Objectives:

  answer-start   KL(reference || additive) of the next-token distribution at the last prompt token
  continuation   cross-entropy, under the additive form, of the reference form's own greedy
                 continuations (teacher-forced): how well the fold reproduces the steered answers'
                 first N tokens, not only their first one

`check_alphas` guards the reference itself: the paper form at too large an alpha breaks a model's
text (its own greedy continuations become unlikely under the unsteered model), and no fold should
be calibrated against that.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass

import torch

from ..choices import OBJECTIVES
from ..errors import UserError
from ..method.generate import cut_at_end
from ..method.steer import paper_steering, require_paper_site, steering
from ..method.vectors import SteeringVectors

# 0 (unsteered), then 1/256 .. 64 in sqrt(2) steps. Vectors keep their natural norms and a fold adds
# one at every steered layer, so useful scales run from about 1/(steered layers) upwards.
DEFAULT_SCALES = (0.0,) + tuple(round(2 ** (k / 2), 6) for k in range(-16, 13))


# On the CPU a forward pass of about this many (padded) tokens runs fastest: the zoo 1.5B in float32 scores
# 8 calibration prompts (468 tokens) in 15.5 s as one padded batch, 10.0 s in length-sorted pairs
CPU_BATCH_TOKENS = 160


def _left_padded(loaded, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id `rows`, left padded to the longest, on the model's device."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=loaded.device)
    return ids, mask


def _batches(loaded, rows: list[list[int]], batch_size: int | str):
    """(indices, input_ids, attention_mask) of token-id `rows` in batches, shortest first, left padded: at
    most `batch_size` rows each and, on the CPU, at most CPU_BATCH_TOKENS padded tokens (or one row)."""
    batch_size = _batch_size(loaded, rows, batch_size)
    budget = CPU_BATCH_TOKENS if loaded.device.type == "cpu" else None
    batch: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i])):
        if batch and (len(batch) == batch_size or (budget and (len(batch) + 1) * len(rows[i]) > budget)):
            yield batch, *_left_padded(loaded, [rows[j] for j in batch])
            batch = []
        batch.append(i)
    if batch:
        yield batch, *_left_padded(loaded, [rows[j] for j in batch])


def _batch_size(loaded, rows: list[list[int]], batch_size: int | str) -> int:
    from ..method.capture import choose_batch_size

    return int(batch_size) if batch_size != "auto" else choose_batch_size(loaded, max(map(len, rows), default=1))


def _ids(loaded, texts: list[str]) -> list[list[int]]:
    return loaded.tokenizer(list(texts))["input_ids"]


@torch.inference_mode()
def answer_start_logprobs(loaded, texts: list[str], batch_size: int | str = 8) -> torch.Tensor:
    """log p(next token) at the last prompt token of each text: [n, vocab] float32, in the texts' order."""
    rows: list = [None] * len(texts)
    for idx, ids, mask in _batches(loaded, _ids(loaded, texts), batch_size):
        logits = loaded.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
        for row, i in zip(torch.log_softmax(logits, -1).cpu(), idx):
            rows[i] = row
    return torch.stack(rows)


@torch.inference_mode()
def perplexity(loaded, texts: list[str], batch_size: int | str = 8) -> float:
    """exp(mean next-token NLL) over every real token of `texts`."""
    total, count = 0.0, 0
    for _, ids, mask in _batches(loaded, _ids(loaded, texts), batch_size):
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        kept = mask[:, 1:].bool() & mask[:, :-1].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[kept].sum())
        count += int(kept.sum())
    return math.exp(total / max(count, 1))


@torch.inference_mode()
def greedy_continuations(loaded, texts: list[str], tokens: int, batch_size: int | str = 8) -> list[list[int]]:
    """Token ids of each text's greedy continuation (at most `tokens`, cut at end of text, at least one)."""
    from ..method.capture import resolve_batch_size
    from ..method.generate import greedy

    batch_size = resolve_batch_size(batch_size, loaded, texts, extra_tokens=tokens)
    return greedy(loaded, texts, tokens, batch_size, keep_first=True, by_length=False)


@torch.inference_mode()
def continuation_logprobs(loaded, texts: list[str], continuations: list[list[int]],
                          batch_size: int | str = 8, skip: int = 0) -> tuple[torch.Tensor, float]:
    """Teacher-forced on prompt + continuation: (log p(next token) at the last prompt token [n, vocab],
    mean NLL per continuation token, leaving out each continuation's first `skip` tokens)."""
    rows = [prompt + list(cont) for prompt, cont in zip(_ids(loaded, texts), continuations)]
    first: list = [None] * len(texts)
    nll, count = 0.0, 0
    for idx, ids, mask in _batches(loaded, rows, batch_size):
        longest = max(len(continuations[i]) for i in idx)  # left padding: every continuation ends in the last column
        logits = loaded.model(input_ids=ids, attention_mask=mask, logits_to_keep=longest + 1).logits.float()
        for row, i in enumerate(idx):
            cont = continuations[i]
            lp = torch.log_softmax(logits[row, -len(cont) - 1:], -1)
            first[i] = lp[0].cpu()
            scored = torch.tensor(cont[skip:], device=lp.device, dtype=torch.long)
            nll -= float(lp[skip:-1].gather(1, scored[:, None]).sum())
            count += len(scored)
    return torch.stack(first), nll / max(count, 1)


def _score(loaded, texts: list[str], continuations: list[list[int]] | None, batch_size) -> tuple[torch.Tensor, float | None]:
    """What a search compares: the answer-start log-probabilities, or with `continuations` the
    teacher-forced ones and the continuations' mean NLL."""
    if continuations is None:
        return answer_start_logprobs(loaded, texts, batch_size), None
    return continuation_logprobs(loaded, texts, continuations, batch_size)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """mean over rows of KL(p || q), both given as log-probabilities."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


@dataclass(frozen=True)
class Calibration:
    """A label-free scale search: the chosen scale, how close it brings the additive form to the
    reference, and every scale tried (`table`). `as_dict()` is calibration.json."""

    scale: float
    objective: str
    kl_to_reference: float
    kl_unsteered_to_reference: float
    layers: list[int]
    reference: dict
    prompts: int
    table: list[dict]
    details: dict

    @classmethod
    def from_dict(cls, result: dict) -> "Calibration":
        return cls(result["scale"], result["objective"], result["kl_to_reference"],
                   result["kl_unsteered_to_reference"], result["layers"], result["reference"], result["prompts"],
                   result["table"], result)

    def as_dict(self) -> dict:
        return dict(self.details)


@dataclass(frozen=True)
class Baseline:
    """What a scale search compares with and what does not change with the scale: the reference form's
    next-token log-probabilities at the answer start of `texts`, the unsteered model's, the unsteered
    perplexity of `ppl_texts`, and for the continuation objective the reference's greedy continuations
    with their unsteered cross-entropy. Measured once (`measure_baseline`) and shared by every search
    on the same prompts (the bias scale's and the gated multiplier's)."""

    texts: tuple[str, ...]
    ppl_texts: tuple[str, ...]
    reference_form: str
    reference_strength: float
    objective: str
    reference: torch.Tensor
    plain: torch.Tensor
    base_ppl: float
    continuations: list | None = None
    plain_ce: float | None = None

    def fits(self, texts, ppl_texts, reference_form, reference_strength, objective) -> bool:
        return (self.texts, self.ppl_texts, self.reference_form, self.reference_strength, self.objective) == (
            tuple(texts), tuple(ppl_texts), reference_form, reference_strength, objective)


def measure_baseline(loaded, vectors: SteeringVectors, texts: list[str], ppl_texts: list[str],
                     reference_form: str = "paper", reference_strength: float = 0.1, objective: str = "answer-start",
                     continuation_tokens: int = 32, batch_size: int = 8, known: dict | None = None) -> Baseline:
    """The Baseline of a scale search. `known`: answer-start log-probabilities check_alphas recorded
    ({"texts": ..., "unsteered": [n, vocab], alpha: [n, vocab]}), used instead of measuring them again
    when they were computed on exactly `texts`."""
    known = known if known and known.get("texts") == tuple(texts) else {}
    continuations = None
    if objective == "continuation":
        with steering(loaded, vectors, reference_form, reference_strength):
            continuations = greedy_continuations(loaded, texts, continuation_tokens, batch_size)
    plain, plain_ce = (known["unsteered"], None) if objective != "continuation" and "unsteered" in known else \
        _score(loaded, texts, continuations, batch_size)
    reference = known.get(reference_strength) if reference_form == "paper" else None
    if reference is None:
        with steering(loaded, vectors, reference_form, reference_strength):
            reference = answer_start_logprobs(loaded, texts, batch_size)
    return Baseline(tuple(texts), tuple(ppl_texts), reference_form, reference_strength, objective, reference, plain,
                    perplexity(loaded, ppl_texts, batch_size), continuations, plain_ce)


class _Grid:
    """The rows of a scale search, measured on demand: `closeness(scale)` runs the objective's pass (KL at
    the answer start, or the continuations' cross-entropy), `guard(scale)` the perplexity pass; `infer(scale)`
    marks a scale allowed without measuring its perplexity (it lies below an allowed one)."""

    def __init__(self, score, ppl, base_ppl: float, ppl_margin: float, key: str, progress: bool):
        self.score, self.ppl, self.base_ppl, self.ppl_margin = score, ppl, base_ppl, ppl_margin
        self.key, self.progress = key, progress
        self.rows: dict[float, dict] = {}
        self.seconds: dict[float, float] = {}  # the time each scale's passes took (not part of the table: it varies)

    def _timed(self, scale: float, work) -> None:
        t0 = time.perf_counter()
        work(self.rows.setdefault(scale, {"scale": scale}))
        self.seconds[scale] = round(self.seconds.get(scale, 0.0) + time.perf_counter() - t0, 2)

    def closeness(self, scale: float) -> float:
        if self.key not in self.rows.get(scale, {}):
            self._timed(scale, lambda row: row.update(self.score(scale)))
            self._say(scale)
        return self.rows[scale][self.key]

    def guard(self, scale: float) -> bool:
        if "perplexity" not in self.rows.get(scale, {}):
            def work(row: dict) -> None:
                value = self.ppl(scale)
                row.update(perplexity=value, perplexity_ratio=value / self.base_ppl,
                           allowed=value <= self.base_ppl * (1 + self.ppl_margin))
                row.pop("guard", None)
            self._timed(scale, work)
            self._say(scale)
        return self.rows[scale]["allowed"]

    def infer(self, scale: float) -> None:
        row = self.rows.setdefault(scale, {"scale": scale})
        if "perplexity" not in row:
            row.update(allowed=True, guard="inferred")

    def allowed(self) -> list[float]:
        return sorted(s for s, row in self.rows.items() if row.get("allowed"))

    def rejected(self) -> list[float]:
        return sorted(s for s, row in self.rows.items() if row.get("allowed") is False)

    def table(self) -> list[dict]:
        order = ("scale", "kl_to_reference", "perplexity", "perplexity_ratio", "allowed", "guard", "continuation_ce")
        return [{k: self.rows[s][k] for k in order if k in self.rows[s]} for s in sorted(self.rows)]

    def _say(self, scale: float) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        row = self.rows[scale]
        parts = [f"KL {row['kl_to_reference']:.4g}"] if "kl_to_reference" in row else []
        if "perplexity" in row:
            parts.append(f"perplexity x{row['perplexity_ratio']:.3f}"
                         + ("" if row["allowed"] else " (over the guard: not allowed)"))
        tqdm.write(f"calibrate: scale {scale:g}: " + ", ".join(parts))


def _search(grid: _Grid, scales, refine: bool, stop_after_rejected: int) -> None:
    """Fill `grid` over `scales`, then (with `refine`) one finer pass around the best allowed grid point.

    stop_after_rejected=1: perplexity grows with the scale (the assumption of stopping at the first scale
    over the guard), so the guard's boundary on the grid is found by bisection and a scale below an allowed
    one is allowed without measuring it; the objective is measured at every allowed scale and nowhere else.
    Otherwise every scale is measured in ascending order, both passes, until `stop_after_rejected` scales in
    a row fail the guard (0: every scale)."""
    points = sorted(set(scales) - set(grid.rows))
    bisect = stop_after_rejected == 1
    if bisect:
        lo, hi = -1, len(points)  # points[:lo + 1] are allowed, points[hi:] are not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if grid.guard(points[mid]) else (lo, mid)
        for scale in points[:lo + 1]:
            grid.infer(scale)
            grid.closeness(scale)
    else:
        rejected = 0
        for scale in points:
            grid.closeness(scale)
            rejected = 0 if grid.guard(scale) else rejected + 1
            if stop_after_rejected and rejected >= stop_after_rejected:
                break
    allowed = grid.allowed()
    if not refine or not allowed:
        return
    best = min(allowed, key=grid.closeness)
    for factor in (0.7071, 0.8409, 1.1892, 1.4142):
        candidate = round(best * factor, 4)
        if candidate <= 0 or any(abs(candidate - s) <= 0.005 * candidate for s in grid.rows):
            continue  # a grid point within 0.5% was measured already
        if not bisect:
            grid.closeness(candidate)
            grid.guard(candidate)
        elif candidate <= grid.allowed()[-1]:
            grid.infer(candidate)
            grid.closeness(candidate)
        elif candidate < min(grid.rejected(), default=math.inf) and grid.guard(candidate):
            grid.closeness(candidate)  # it lay between the largest allowed scale and the smallest rejected one


def search_scale(loaded, vectors: SteeringVectors, texts: list[str], ppl_texts: list[str],
                    reference_form: str = "paper", reference_strength: float = 0.1,
                    scales: tuple[float, ...] = DEFAULT_SCALES, ppl_margin: float = 0.10,
                    batch_size: int = 8, refine: bool = True, progress: bool = False,
                    stop_after_rejected: int = 1, additive_layers: list[int] | None = None,
                    objective: str = "answer-start", continuation_tokens: int = 32,
                    edit=None, form: str = "additive", baseline: Baseline | None = None) -> "Calibration":
    """Pick the additive scale closest to `reference_form` at `reference_strength` by `objective`
    (see the module docstring), subject to perplexity <= (1 + ppl_margin) x unsteered.

    The reference steers every layer of `vectors`; `additive_layers` (default: the same) restricts
    the additive form to a band, as a fold with `--layers` would.

    Perplexity grows with the scale: by default (`stop_after_rejected=1`) the guard's boundary on the
    grid is found by bisection, the objective is measured at every allowed scale, and a scale below an
    allowed one counts as allowed without its perplexity pass (its row says "guard": "inferred"; the
    chosen scale's perplexity is always measured). `stop_after_rejected=k` > 1 measures both passes in
    ascending order until k scales in a row fail the guard; 0 measures every scale. Scale 0 is the
    unsteered model, measured once in the baseline.

    `edit` (a callable: scale -> context manager) calibrates another edit's strength by the same rule,
    named `form` in the result: the gated edit's multiplier (method.gate) does. `baseline`: what does
    not depend on the scale, measured already (`measure_baseline`) for these prompts and reference."""
    if not texts or not ppl_texts:
        raise UserError("calibration needs prompts and plain texts; pass --count > 0")
    if any(s < 0 or not math.isfinite(s) for s in scales):
        raise UserError("calibration scales must be finite and >= 0")
    if objective not in OBJECTIVES:
        raise UserError(f"unknown calibration objective '{objective}': use {' or '.join(OBJECTIVES)}")
    if continuation_tokens < 1:
        raise UserError("continuation tokens must be at least 1")
    additive = vectors if additive_layers is None else vectors.select(additive_layers)
    candidate = edit or (lambda scale: steering(loaded, additive, "additive", scale))
    if baseline is None:
        baseline = measure_baseline(loaded, vectors, texts, ppl_texts, reference_form, reference_strength, objective,
                                    continuation_tokens, batch_size)
    elif not baseline.fits(texts, ppl_texts, reference_form, reference_strength, objective):
        raise ValueError("the baseline was measured on other prompts or another reference")
    continuations, reference, plain = baseline.continuations, baseline.reference, baseline.plain
    plain_ce, base_ppl = baseline.plain_ce, baseline.base_ppl

    key = "kl_to_reference" if continuations is None else "continuation_ce"

    def score(scale: float) -> dict:
        with candidate(scale):
            q, ce = _score(loaded, texts, continuations, batch_size)
        return {"kl_to_reference": kl(reference, q), **({} if ce is None else {"continuation_ce": ce})}

    def ppl(scale: float) -> float:
        with candidate(scale):
            return perplexity(loaded, ppl_texts, batch_size)

    grid = _Grid(score, ppl, base_ppl, ppl_margin, key, progress)
    if 0.0 in scales:  # the unsteered model: measured in the baseline
        grid.rows[0.0] = {"scale": 0.0, "kl_to_reference": kl(reference, plain), "perplexity": base_ppl,
                          "perplexity_ratio": 1.0, "allowed": True}
        if continuations is not None:
            grid.rows[0.0]["continuation_ce"] = plain_ce
    _search(grid, scales, refine, stop_after_rejected)
    while True:  # the chosen scale's perplexity is measured, never only inferred
        chosen_scale = min(grid.allowed(), key=grid.closeness, default=None)
        if chosen_scale is None or grid.guard(chosen_scale):
            break
    table, seconds = grid.table(), grid.seconds
    chosen = grid.rows[chosen_scale] if chosen_scale is not None else None
    result = {
        "scale": chosen["scale"] if chosen else 0.0,
        "objective": objective,
        "kl_to_reference": chosen["kl_to_reference"] if chosen else kl(reference, plain),
        "kl_unsteered_to_reference": kl(reference, plain),
        "reference": {"form": reference_form, ("alpha" if reference_form == "paper" else "scale"): reference_strength,
                      "layers": vectors.layers},
        "form": form,
        "layers": additive.layers,
        "unsteered_perplexity": base_ppl,
        "ppl_margin": ppl_margin,
        "prompts": len(texts),
        "ppl_texts": len(ppl_texts),
        "table": table,
        "seconds_per_scale": {f"{s:g}": seconds[s] for s in sorted(seconds)},
        "note": None if chosen else "no scale kept perplexity within the margin: scale 0 (unsteered)",
    }
    if continuations is not None:
        result.update(continuation_tokens=continuation_tokens,
                      continuation_ce=chosen["continuation_ce"] if chosen else plain_ce,
                      continuation_ce_unsteered=plain_ce)
    return Calibration.from_dict(result)


@torch.inference_mode()
def paper_pairs(loaded, vectors: SteeringVectors, texts: list[str], alpha: float, tokens: int, batch_size: int,
                plain: bool = True) -> dict:
    """Greedy continuations of `texts` under the paper form at `alpha` (at most `tokens`, cut at end of text,
    at least one token), each scored by the unsteered model, and with `plain` the unsteered continuations,
    in one decode. The paper form edits only the last prompt token, so each prompt but that token is
    prefilled once, unsteered, and its cache shared by every row of the prompt: the unsteered model's
    continuation (with `plain`), the steered one, and the unsteered model fed the steered row's tokens,
    whose log-probability of each is what teacher forcing the steered continuation would give. The rows
    run in lockstep; `batch_size`: prompts per decode.

    -> {"steered": token ids, "steered_first": answer-start log-probabilities [vocab] (float32, CPU),
        "scores": the unsteered log-probability of each steered token (before the cut), and with `plain`
        "plain", "plain_first", "plain_scores" (each chosen token's log-probability)}, lists in the texts'
    order."""
    from ..models.loading import end_of_text_ids

    model = loaded.model
    ends = end_of_text_ids(model, loaded.tokenizer)
    end_ids = torch.tensor(ends, device=loaded.device)
    kinds = (["plain"] if plain else []) + ["steered", "forced"]  # the rows of each prompt, in this order
    k, steered, forced = len(kinds), kinds.index("steered"), kinds.index("forced")
    # transformers 5.x renamed the cache argument and output from past_key_values to cache
    cached = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: dict = {name: [] for name in kinds}
    firsts: dict = {name: [] for name in kinds}
    scores: dict = {name: [] for name in kinds}
    for start in range(0, len(texts), batch_size):
        ids = _ids(loaded, texts[start:start + batch_size])
        if min(map(len, ids)) < 2:
            raise UserError("the alpha check needs prompts of at least two tokens: use a prompt template")
        prefix, mask = _left_padded(loaded, [row[:-1] for row in ids])
        cache = model(input_ids=prefix, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                      use_cache=True, logits_to_keep=1)[cached]
        cache.batch_repeat_interleave(k)
        mask = mask.repeat_interleave(k, 0)
        step = torch.tensor([row[-1] for row in ids], device=loaded.device).repeat_interleave(k)[:, None]
        picked, chosen, done = [], [], torch.zeros(len(step), dtype=torch.bool, device=loaded.device)
        for n in range(tokens):
            position = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            edit = paper_steering(loaded, vectors, alpha, rows=slice(steered, None, k), every_call=True) if n == 0 \
                else contextlib.nullcontext()
            with edit:
                logits = model(input_ids=step, attention_mask=mask, position_ids=position, use_cache=True,
                               **{cached: cache}).logits[:, -1].float()
            lp = torch.log_softmax(logits, -1)
            if n == 0:
                for at, name in enumerate(kinds):
                    firsts[name].extend(lp[at::k].cpu())
            pick = lp.argmax(-1).view(-1, k)
            pick[:, forced] = pick[:, steered]  # the unsteered model, fed the steered continuation
            pick = pick.reshape(-1)
            picked.append(pick)
            chosen.append(lp.gather(1, pick[:, None])[:, 0])
            done |= torch.isin(pick, end_ids)
            if bool(done.view(-1, k)[:, :forced].all()):  # the generating rows have ended
                break
            step = pick[:, None]
        rows = torch.stack(picked, 1).tolist()
        lps = torch.stack(chosen, 1).cpu().tolist()
        for at, name in enumerate(kinds):
            out[name].extend(cut_at_end(row, ends) or row[:1] for row in rows[at::k])
            scores[name].extend(lps[at::k])
    result = {"steered": out["steered"], "steered_first": firsts["steered"], "scores": scores["forced"]}
    if plain:
        result.update(plain=out["plain"], plain_first=firsts["plain"], plain_scores=scores["plain"])
    return result


DEFAULT_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2)


def check_alphas(loaded, vectors: SteeringVectors, texts: list[str], alphas: tuple[float, ...] = DEFAULT_ALPHAS,
                 margin: float = 1.0, tokens: int = 32, skip: int = 1, batch_size: int = 8,
                 stop_after_rejected: int = 1, progress: bool = False, answer_start: dict | None = None) -> dict:
    """Label-free guard for the paper form's alpha: does the steered model still write text?

    For each alpha (ascending) the paper form's greedy continuations of `texts` (at most `tokens`)
    are scored by the unsteered model as teacher forcing would (`paper_pairs`), leaving out their first
    `skip` tokens (the answer's opening is what the steering is meant to change). The fluency ratio is
    that perplexity over the unsteered model's perplexity of its own greedy continuations, scored the same
    way; an alpha passes when the ratio is at most 1 + `margin`. The chosen alpha is the largest that
    passes (None if none does). The search stops once `stop_after_rejected` alphas in a row fail (0: try
    every alpha). No labels are read. `answer_start`: a dict that receives what the generations
    computed on the way, the answer-start log-probabilities of `texts` unsteered ("unsteered") and
    under the paper form at each alpha tried (a Baseline's `known`: the calibration then skips them).
    `batch_size`: prompts per decode; the smallest alpha's continuations are generated together with the
    unsteered ones, on rows that share each prompt's prefill (`paper_pairs`)."""
    if not texts:
        raise UserError("the alpha check needs prompts; pass --count > 0")
    if not alphas or any(a <= 0 or not math.isfinite(a) for a in alphas):
        raise UserError("alphas must be finite and > 0")
    if tokens < skip + 1:
        raise UserError(f"continuation tokens must exceed the {skip} skipped; pass --tokens {skip + 8} or more")
    if margin < 0:
        raise UserError("the fluency margin must be >= 0")
    require_paper_site(vectors)  # before any generation
    tok = loaded.tokenizer
    alphas = sorted(alphas)
    if batch_size == "auto":  # the prompts whose rows (three each) fit
        from ..method.capture import resolve_batch_size

        batch_size = max(1, resolve_batch_size("auto", loaded, [t for t in texts for _ in range(3)],
                                                extra_tokens=tokens) // 3)
    first = paper_pairs(loaded, vectors, texts, alphas[0], tokens, int(batch_size))
    plain = first["plain"]
    if answer_start is not None:
        answer_start.update(texts=tuple(texts), unsteered=torch.stack(first["plain_first"]))

    def nll(scores: list[list[float]], continuations: list[list[int]]) -> float:
        """Mean negative log-probability of the continuations' tokens after the first `skip`."""
        scored = [lps[skip:len(cont)] for lps, cont in zip(scores, continuations)]
        return -sum(map(sum, scored)) / max(sum(map(len, scored)), 1)

    # the unsteered model's own continuations, scored as it generated them
    plain_nll = nll(first["plain_scores"], plain)

    from tqdm.auto import tqdm

    table, rejected = [], 0
    for alpha in tqdm(alphas, desc="check alphas", unit="alpha", disable=not progress):
        run = first if alpha == alphas[0] else paper_pairs(loaded, vectors, texts, alpha, tokens, int(batch_size),
                                                           plain=False)
        steered = run["steered"]
        if answer_start is not None:
            answer_start[alpha] = torch.stack(run["steered_first"])
        steered_nll = nll(run["scores"], steered)
        ratio = math.exp(steered_nll - plain_nll)
        table.append({"alpha": alpha, "perplexity": math.exp(steered_nll), "fluency_ratio": ratio,
                      "allowed": ratio <= 1 + margin,
                      "first_token_changed": sum(s[0] != p[0] for s, p in zip(steered, plain)) / len(texts),
                      "sample": tok.decode(steered[0])})
        rejected = 0 if table[-1]["allowed"] else rejected + 1
        if stop_after_rejected and rejected >= stop_after_rejected:
            break
    allowed = [r["alpha"] for r in table if r["allowed"]]
    return {"alpha": max(allowed) if allowed else None, "margin": margin, "tokens": tokens, "skip": skip,
            "unsteered_perplexity": math.exp(plain_nll), "prompts": len(texts), "layers": vectors.layers,
            "unsteered_sample": tok.decode(plain[0]), "table": table,
            "note": None if allowed else "every alpha tried breaks the text: try smaller alphas"}


def fit_gated_edit(loaded, vectors: SteeringVectors, settings, closeness: bool = True, progress: bool = False):
    """The gates `settings` (method.gate.GateSettings) describe, fitted on the float32 target in `loaded`,
    with the multiplier chosen when it is 'auto' and, with `closeness`, the KL report (`calibrate_gate`)."""
    from ..method.gate import fit_for

    settings.check()
    fit = fit_for(loaded, vectors, settings)
    if settings.multiplier != "auto" and not closeness:
        return fit
    return calibrate_gate(loaded, vectors, fit, settings, closeness=closeness, progress=progress)


def calibrate_gate(loaded, vectors: SteeringVectors, fit, settings, batch_size: int = 8, progress: bool = False,
                   closeness: bool = True):
    """The gated edit's multiplier when `settings.multiplier` is 'auto', and its closeness to the paper
    form, on the held-out prompts of `settings` (method.gate.GateSettings) -> the fit with both.

    The multiplier follows `search_scale`'s rule over method.gate.MULTIPLIERS: the one closest to
    the paper form at `settings.alpha` (KL at the answer start) among those within the perplexity guard
    on the same prompts as plain text. `closeness` gives that KL for the gated edit at its multiplier,
    for the bias fold (the additive form) at its own label-free scale, and for the unsteered model."""
    import contextlib
    import dataclasses

    from ..method.gate import MULTIPLIERS, gated_edit, settings_texts

    _, heldout, plain = settings_texts(settings, loaded.tokenizer)
    if not heldout:
        if settings.multiplier == "auto":
            raise UserError("multiplier 'auto' is chosen on the held-out prompts: keep at least one")
        return fit

    def edit(multiplier: float):
        return gated_edit(loaded, fit.scaled(multiplier)) if multiplier > 0 else contextlib.nullcontext()

    auto, ppl_margin = settings.multiplier == "auto", settings.ppl_margin
    shared = measure_baseline(loaded, vectors, heldout, plain, "paper", settings.alpha, batch_size=batch_size)
    gated = search_scale(loaded, vectors, heldout, plain, "paper", settings.alpha,
                            scales=MULTIPLIERS if auto else (0.0, fit.multiplier), ppl_margin=ppl_margin,
                            batch_size=batch_size, refine=auto, progress=progress, stop_after_rejected=1 if auto else 0,
                            edit=edit, form="gated-lora", baseline=shared)
    calibration = None
    if auto:
        if gated.scale <= 0:
            raise UserError("no multiplier brings the gated edit closer to the paper form than the unsteered model "
                            f"on the {len(heldout)} held-out prompts within the perplexity guard: pass --multiplier")
        fit = fit.scaled(gated.scale)
        calibration = {"multiplier": gated.scale, "prompts": len(heldout), "ppl_margin": ppl_margin,
                       "table": [{k: row[k] for k in ("scale", "kl_to_reference", "perplexity_ratio", "allowed", "guard")
                                  if k in row} for row in gated.table]}
    if not closeness:
        return dataclasses.replace(fit, calibration=calibration)
    at = next(row for row in gated.table if row["scale"] == fit.multiplier)
    bias = search_scale(loaded, vectors, heldout, plain, "paper", settings.alpha, ppl_margin=ppl_margin,
                           batch_size=batch_size, progress=progress, baseline=shared)
    report = {"prompts": len(heldout), "paper_alpha": settings.alpha,
                 "measure": "KL(paper form || form) of the next token at the last prompt token, held-out prompts",
                 "unsteered": gated.kl_unsteered_to_reference,
                 "gated": {"multiplier": fit.multiplier, "kl": at["kl_to_reference"],
                           "perplexity_ratio": at["perplexity_ratio"]},
                 "bias": {"scale": bias.scale, "kl": bias.kl_to_reference,
                          "note": "the additive form at its own label-free scale (calibrate's rule)"}}
    return dataclasses.replace(fit, calibration=calibration, closeness=report)
