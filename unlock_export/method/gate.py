"""The gated edit: the paper form's last-token edit as an ordinary rank-r weight edit.

On each steered layer's last write into the residual stream (the registry's carrier module, e.g.
`mlp.down_proj`) the edit is W += w_L (a_L1 + .. + a_Lr)^T, so the module's output gains
(x . a_L1 + .. + x . a_Lr) w_L:
  a_Lk linear gates on the module's own input x, fitted without labels (weighted ridge, no
       intercept), each to read 1 at one position of a templated prompt followed by the target's own
       greedy answer, and 0 at every other position of it: gate 1 at the last prompt token (the
       paper form's edit), gate k > 1 at answer token k - 1 (rank r widens the edit to the first r - 1
       answer tokens). The answer's later tokens are negatives too, so the gates stay shut while
       the model writes its answer.
  w_L  = multiplier * alpha * n_L * v_L / |v_L|, with n_L the layer output's mean norm at the last
       prompt token (the paper form's edit moves h by about alpha * |h| there).
As a PEFT LoRA it is A = [a_L1 .. a_Lr]^T, B = [w_L .. w_L] (rank r, lora_alpha = r so PEFT's scaling
is 1, no biases); every gate switches on the same write, so the product B A has rank 1. Merged, an
ordinary checkpoint. `gated_edit` is its hook form, the reference the exports are verified against.

The multiplier may be chosen without labels (`GateSettings(multiplier="auto")`): the rule of
`calibrate` (evaluation.calibrate), KL to the paper form at the answer start on the held-out prompts
within a perplexity guard. `closeness` reports that KL for the gated edit beside the bias fold's at
its own label-free scale and the unsteered model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..settings import ANSWER_TOKENS, DEFAULT_RIDGE, GateSettings

__all__ = ["ANSWER_TOKENS", "DEFAULT_RIDGE", "GateSettings"]

# the multipliers `auto` tries: 0 (unsteered), then 1/4 .. 4 in sqrt(2) steps
MULTIPLIERS = (0.0,) + tuple(round(2 ** (k / 2), 6) for k in range(-4, 5))


@dataclass(frozen=True)
class GateFit:
    """Fitted gates and the writes they switch on, per layer, and how well the gates separate their
    positions from the rest on held-out prompts."""

    gates: dict[int, torch.Tensor]  # [rank, in] per layer: a_L1 .. a_Lr
    writes: dict[int, torch.Tensor]  # w_L [out]
    site: str
    alpha: float
    multiplier: float
    ridge: float
    fit_prompts: int
    fit_positions: int
    heldout: dict = field(default_factory=dict)  # {layer: {"at_last_token", "max_abs_elsewhere", ...}}
    rank: int = 1
    calibration: dict | None = None  # the `auto` multiplier's search, when it chose the multiplier
    closeness: dict | None = None  # KL to the paper form: gated, bias fold, unsteered

    def scaled(self, multiplier: float) -> "GateFit":
        """The same gates with the write at another multiplier."""
        factor = multiplier / self.multiplier
        return dataclasses.replace(self, multiplier=multiplier,
                                   writes={layer: w * factor for layer, w in self.writes.items()})

    def summary(self) -> dict:
        return {"site": self.site, "alpha": self.alpha, "multiplier": self.multiplier, "ridge": self.ridge,
                "rank": self.rank, "gates": "the last prompt token" + (
                    f", then answer tokens 1-{self.rank - 1}" if self.rank > 1 else ""),
                "fit_prompts": self.fit_prompts, "fit_positions": self.fit_positions,
                "heldout": {str(k): v for k, v in sorted(self.heldout.items())},
                "multiplier_calibration": self.calibration, "closeness": self.closeness}


@torch.inference_mode()
def capture_carrier_inputs(loaded, sequences: list[list[int]], prompt_lengths: list[int], layers: list[int],
                           site: str) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per layer: the carrier module's input at every token of every sequence (prompt ids, then answer
    ids) [rows, in] float32, and the layer output's mean norm at the last prompt token. One sequence
    per pass, so there is no padding."""
    inputs = {layer: [] for layer in layers}
    norms = {layer: [] for layer in layers}
    at = {}

    def pre(layer):
        return lambda module, args: inputs[layer].append(args[0][0].float().cpu())

    def post(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            norms[layer].append(float(h[0, at["last"]].float().norm()))
        return hook

    decoder = loaded.arch.decoder_layers(loaded.model)
    handles = [loaded.arch.writer_module(loaded.model, layer, site).register_forward_pre_hook(pre(layer))
               for layer in layers]
    handles += [decoder[layer].register_forward_hook(post(layer)) for layer in layers]
    try:
        for ids, length in zip(sequences, prompt_lengths):
            at["last"] = length - 1
            loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return ({layer: torch.cat(rows) for layer, rows in inputs.items()},
            {layer: sum(v) / len(v) for layer, v in norms.items()})


def fit_gate(x: torch.Tensor, label: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Weighted ridge without intercept, in its dual form (rows may be fewer than inputs): the
    positives weigh as much as all negatives together. a = X^T (W X X^T + lam I)^-1 W g, with lam
    `ridge` times the mean squared row norm."""
    x64, g = x.double(), label.double()
    positives = float(g.sum())
    if positives == 0:
        raise UserError("a gate has no position to open at: its prompts' answers are too short; lower the rank")
    weight = torch.where(g > 0, (len(g) - positives) / positives, 1.0).double()
    gram = x64 @ x64.T
    lam = ridge * float(gram.diagonal().mean())
    system = weight[:, None] * gram + lam * torch.eye(len(g), dtype=torch.float64)
    return (x64.T @ torch.linalg.solve(system, weight * g)).float()


def _sequences(loaded, texts: list[str], answer_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Each text's prompt ids followed by the target's own greedy answer (at most `answer_tokens`)."""
    from .generate import greedy

    prompts = [loaded.tokenizer(text)["input_ids"] for text in texts]
    answers = greedy(loaded, texts, answer_tokens, batch_size=8, keep_first=True)
    return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]


def position_labels(sequences: list[list[int]], prompt_lengths: list[int], gate: int) -> torch.Tensor:
    """1 at position prompt_length - 1 + gate of each sequence, 0 at all its other positions."""
    rows = []
    for ids, length in zip(sequences, prompt_lengths):
        row = torch.zeros(len(ids))
        if length - 1 + gate < len(ids):
            row[length - 1 + gate] = 1.0
        rows.append(row)
    return torch.cat(rows)


def _gate_stats(gates: torch.Tensor, x: torch.Tensor, sequences: list[list[int]], prompt_lengths: list[int]) -> dict:
    """On held-out sequences: each gate's mean value at its own position, and the largest |sum of the
    gates| at the other prompt positions and at the answer tokens after the gated window."""
    values = x @ gates.T  # [rows, rank]
    total = values.sum(-1)
    rank, start = gates.shape[0], 0
    own = [[] for _ in range(rank)]
    prompt_rest, answer_rest = [0.0], [0.0]
    for ids, length in zip(sequences, prompt_lengths):
        for k in range(rank):
            if length - 1 + k < len(ids):
                own[k].append(float(values[start + length - 1 + k, k]))
        if length > 1:
            prompt_rest.append(float(total[start:start + length - 1].abs().max()))
        if length - 1 + rank < len(ids):
            answer_rest.append(float(total[start + length - 1 + rank:start + len(ids)].abs().max()))
        start += len(ids)
    stats = {"at_last_token": sum(own[0]) / len(own[0]), "max_abs_elsewhere": max(prompt_rest),
             "max_abs_later_answer_tokens": max(answer_rest)}
    if rank > 1:
        stats["at_answer_tokens"] = [sum(v) / len(v) if v else None for v in own[1:]]
    return stats


def fit_gates_on_texts(loaded, vectors, texts: list[str], heldout_texts: list[str], alpha: float = 0.1,
              multiplier: float = 1.0, ridge: float = DEFAULT_RIDGE, rank: int = 1,
              answer_tokens: int = ANSWER_TOKENS) -> GateFit:
    """`rank` gates for every layer of `vectors` (layer 0 included only if the vectors steer it), fitted
    on `texts` (templated prompts of the target, unlabeled) followed by the target's own greedy
    answers, and measured the same way on `heldout_texts`."""
    if not texts:
        raise UserError("the gate fit needs prompts: pass a prompt source with at least one prompt")
    if alpha <= 0 or multiplier <= 0 or ridge <= 0:
        raise UserError(f"alpha, multiplier and ridge must be positive, got {alpha:g}, {multiplier:g}, {ridge:g}")
    if not 1 <= rank <= answer_tokens:
        raise UserError(f"the gated edit's rank runs from 1 to {answer_tokens}, got {rank}")
    layers, site = vectors.layers, vectors.site
    sequences, lengths = _sequences(loaded, texts, answer_tokens)
    inputs, norms = capture_carrier_inputs(loaded, sequences, lengths, layers, site)
    labels = [position_labels(sequences, lengths, k) for k in range(rank)]
    gates = {layer: torch.stack([fit_gate(inputs[layer], label, ridge) for label in labels]) for layer in layers}
    positions = len(labels[0])
    del inputs
    writes = {layer: multiplier * alpha * norms[layer] * vectors.directions[layer].float()
              / vectors.directions[layer].float().norm() for layer in layers}
    heldout = {}
    if heldout_texts:
        held_sequences, held_lengths = _sequences(loaded, heldout_texts, answer_tokens)
        held, _ = capture_carrier_inputs(loaded, held_sequences, held_lengths, layers, site)
        heldout = {layer: _gate_stats(gates[layer], held[layer], held_sequences, held_lengths) for layer in layers}
    return GateFit(gates, writes, site, alpha, multiplier, ridge, len(texts), positions, heldout, rank)


def settings_texts(settings: GateSettings, tokenizer=None) -> tuple[list[str], list[str], list[str]]:
    """The templated fit prompts, the templated held-out prompts and the held-out prompts as plain
    text (the perplexity guard's), as `settings` names them; with `settings.chat` the first two are
    wrapped by `tokenizer`'s chat template."""
    from ..prompts import Chat, apply_template, chat_texts, load_questions

    settings.check()
    questions = load_questions(settings.prompts, count=settings.count + settings.heldout, offset=settings.offset)
    if len(questions) < settings.count:
        raise UserError(f"'{settings.prompts}' holds {len(questions)} prompts after offset {settings.offset}: the "
                        f"gate fit needs {settings.count}; lower the gate count")
    fit, held = questions[:settings.count], questions[settings.count:]
    fit, heldout = apply_template(settings.template, fit), apply_template(settings.template, held)
    if settings.chat:
        fit, heldout = (chat_texts(tokenizer, texts, Chat(settings.system), "the target") for texts in (fit, heldout))
    return fit, heldout, apply_template("plain", held)


def fit_for(loaded, vectors, settings: GateSettings) -> GateFit:
    """The gates `settings` describe, fitted on the target in `loaded` (multiplier 1 when it is 'auto':
    evaluation.calibrate.calibrate_gate chooses it)."""
    texts, heldout, _ = settings_texts(settings, loaded.tokenizer)
    multiplier = 1.0 if settings.multiplier == "auto" else float(settings.multiplier)
    return fit_gates_on_texts(loaded, vectors, texts, heldout, alpha=settings.alpha, multiplier=multiplier,
                     ridge=settings.ridge, rank=settings.rank)


@contextlib.contextmanager
def gated_edit(loaded, fit: GateFit):
    """Hooks equal to merging W += w (a_1 + .. + a_r)^T into each carrier module: its output gains
    (x . a_1 + .. + x . a_r) w."""
    handles = []
    for layer, gates in fit.gates.items():
        module = loaded.arch.writer_module(loaded.model, layer, fit.site)
        dtype = next(module.parameters()).dtype
        a, w = gates.sum(0).to(loaded.device, dtype), fit.writes[layer].to(loaded.device, dtype)
        store = {}
        handles.append(module.register_forward_pre_hook(lambda m, args, store=store: store.__setitem__("x", args[0])))
        handles.append(module.register_forward_hook(
            lambda m, args, out, store=store, a=a, w=w: out + (store["x"] @ a)[..., None] * w))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
