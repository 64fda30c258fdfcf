"""The gated edit: the paper form's last-token edit as an ordinary rank-1 weight edit.

On each steered layer's last write into the residual stream (the registry's carrier module, e.g.
`mlp.down_proj`) the edit is W += w_L a_L^T, so the module's output gains (x . a_L) w_L:
  a_L  a linear gate on the module's own input x, fitted without labels (weighted ridge, no
       intercept) to read 1 at the last prompt token of a templated prompt and 0 at every other
       position of the same prompts;
  w_L  = multiplier * alpha * n_L * v_L / |v_L|, with n_L the layer output's mean norm at the last
       prompt token (the paper form's edit moves h by about alpha * |h| there).
As a PEFT LoRA it is A = a_L^T, B = w_L (rank 1, lora_alpha = r, no biases); merged, an ordinary
checkpoint. `gated_edit` is its hook form, the reference the exports are verified against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..errors import UserError

DEFAULT_RIDGE = 1e-2


@dataclass(frozen=True)
class GateFit:
    """Fitted gates and the writes they switch on, per layer, and how well the gates separate the last
    prompt token from the rest on held-out prompts."""

    gates: dict[int, torch.Tensor]  # a_L [in]
    writes: dict[int, torch.Tensor]  # w_L [out]
    site: str
    alpha: float
    multiplier: float
    ridge: float
    fit_prompts: int
    fit_positions: int
    heldout: dict = field(default_factory=dict)  # {layer: {"at_last_token": mean, "max_abs_elsewhere": max}}

    def summary(self) -> dict:
        return {"site": self.site, "alpha": self.alpha, "multiplier": self.multiplier, "ridge": self.ridge,
                "fit_prompts": self.fit_prompts, "fit_positions": self.fit_positions,
                "heldout": {str(k): v for k, v in sorted(self.heldout.items())}}


@torch.inference_mode()
def capture_carrier_inputs(loaded, texts: list[str], layers: list[int], site: str):
    """Per layer: the carrier module's input at every token of every text [rows, in] (float32), the
    rows' labels (1 at each text's last token), each text's length, and the layer output's mean norm
    at the last token. One text per pass, so there is no padding."""
    from .capture import tokenize

    decoder = loaded.arch.decoder_layers(loaded.model)
    inputs = {layer: [] for layer in layers}
    norms = {layer: [] for layer in layers}
    lengths = []

    def pre(layer):
        return lambda module, args: inputs[layer].append(args[0][0].float().cpu())

    def post(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            norms[layer].append(float(h[0, -1].float().norm()))
        return hook

    handles = [loaded.arch.writer_module(loaded.model, layer, site).register_forward_pre_hook(pre(layer))
               for layer in layers]
    handles += [decoder[layer].register_forward_hook(post(layer)) for layer in layers]
    try:
        for text in texts:
            enc = tokenize(loaded.tokenizer, [text], loaded.device)
            lengths.append(enc["input_ids"].shape[1])
            loaded.model(**enc, use_cache=False, logits_to_keep=1)  # only the hooks' rows are needed
    finally:
        for handle in handles:
            handle.remove()
    labels = torch.cat([torch.cat([torch.zeros(n - 1), torch.ones(1)]) for n in lengths])
    return ({layer: torch.cat(rows) for layer, rows in inputs.items()}, labels, lengths,
            {layer: sum(v) / len(v) for layer, v in norms.items()})


def fit_gate(x: torch.Tensor, label: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Weighted ridge without intercept, in its dual form (rows may be fewer than inputs): the
    positives weigh as much as all negatives together. a = X^T (W X X^T + lam I)^-1 W g, with lam
    `ridge` times the mean squared row norm."""
    x64, g = x.double(), label.double()
    positives = float(g.sum())
    weight = torch.where(g > 0, (len(g) - positives) / positives, 1.0).double()
    gram = x64 @ x64.T
    lam = ridge * float(gram.diagonal().mean())
    system = weight[:, None] * gram + lam * torch.eye(len(g), dtype=torch.float64)
    return (x64.T @ torch.linalg.solve(system, weight * g)).float()


def _gate_stats(values: torch.Tensor, lengths: list[int]) -> dict:
    at_last, elsewhere, start = [], [0.0], 0
    for n in lengths:
        row = values[start:start + n]
        at_last.append(float(row[-1]))
        if n > 1:
            elsewhere.append(float(row[:-1].abs().max()))
        start += n
    return {"at_last_token": sum(at_last) / len(at_last), "max_abs_elsewhere": max(elsewhere)}


def fit_gates(loaded, vectors, texts: list[str], heldout_texts: list[str], alpha: float = 0.1,
              multiplier: float = 1.0, ridge: float = DEFAULT_RIDGE) -> GateFit:
    """Gates for every layer of `vectors` (layer 0 included only if the vectors steer it), fitted on
    `texts` (templated prompts of the target, unlabeled) and measured on `heldout_texts`."""
    if not texts:
        raise UserError("the gate fit needs prompts: pass a prompt source with at least one prompt")
    if alpha <= 0 or multiplier <= 0 or ridge <= 0:
        raise UserError(f"alpha, multiplier and ridge must be positive, got {alpha:g}, {multiplier:g}, {ridge:g}")
    layers, site = vectors.layers, vectors.site
    inputs, labels, _, norms = capture_carrier_inputs(loaded, texts, layers, site)
    gates = {layer: fit_gate(inputs[layer], labels, ridge) for layer in layers}
    del inputs
    writes = {layer: multiplier * alpha * norms[layer] * vectors.directions[layer].float()
              / vectors.directions[layer].float().norm() for layer in layers}
    heldout = {}
    if heldout_texts:
        held, _, lengths, _ = capture_carrier_inputs(loaded, heldout_texts, layers, site)
        heldout = {layer: _gate_stats(held[layer] @ gates[layer], lengths) for layer in layers}
    return GateFit(gates, writes, site, alpha, multiplier, ridge, len(texts), len(labels), heldout)


@contextlib.contextmanager
def gated_edit(loaded, fit: GateFit):
    """Hooks equal to merging W += w a^T into each carrier module: its output gains (x . a) w."""
    handles = []
    for layer, gate in fit.gates.items():
        module = loaded.arch.writer_module(loaded.model, layer, fit.site)
        dtype = next(module.parameters()).dtype
        a, w = gate.to(loaded.device, dtype), fit.writes[layer].to(loaded.device, dtype)
        store = {}
        handles.append(module.register_forward_pre_hook(lambda m, args, store=store: store.__setitem__("x", args[0])))
        handles.append(module.register_forward_hook(
            lambda m, args, out, store=store, a=a, w=w: out + (store["x"] @ a)[..., None] * w))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
