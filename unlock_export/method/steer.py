"""Reference steering with hooks: for evaluation and verification only, never in exported artifacts.

Two forms:
  paper     the UNLOCK paper's form: during prefill only, at the last prompt token only, after
            every steered layer, h <- |h| * normalize(h/|h| + alpha * r/|r|). Decode steps are
            untouched (the effect reaches them through the KV cache).
  additive  the form a static checkpoint can carry: h += scale * r at every position and every
            step, at the vectors' site (layer output, or right after the attention block).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..choices import FORMS
from ..errors import UserError
from ..models.architectures import (
    Architecture,
    architecture_for,
    config_size,
    layer_output_tensor,
    replace_layer_output,
)
from .capture import last_token_index
from .vectors import SteeringVectors


def _resolve(model) -> tuple[nn.Module, Architecture]:
    """The module and its architecture from a LoadedModel, a (model, tokenizer) pair or a module."""
    if hasattr(model, "arch") and hasattr(model, "model"):  # a LoadedModel
        return model.model, model.arch
    if isinstance(model, tuple):
        model = model[0]
    if isinstance(model, (str, Path)):
        raise UserError("model: steering hooks go on a loaded model; pass a LoadedModel or a (model, tokenizer) "
                        "pair (ux.load_model(spec) loads one)")
    return model, architecture_for(model)


def _check(model: nn.Module, arch: Architecture, vectors: SteeringVectors) -> None:
    vectors.check_fits(len(arch.decoder_layers(model)), int(config_size(model.config, "hidden")))


@contextmanager
def additive_steering(model, vectors: SteeringVectors, scale: float = 1.0):
    """Context manager: h += scale * direction[L] after each steered layer, at every position, at the vectors'
    site (what a fold or a control vector computes). `model`: a LoadedModel, a (model, tokenizer) pair or a module."""
    model, arch = _resolve(model)
    _check(model, arch, vectors)
    handles = []

    def make_hook(vec: torch.Tensor):
        def hook(module, args, output):
            hidden = layer_output_tensor(output)
            return replace_layer_output(output, hidden + vec.to(hidden.device, hidden.dtype))
        return hook

    try:
        for layer, vec in vectors.directions.items():
            module = arch.site_module(model, layer, vectors.site)
            handles.append(module.register_forward_hook(make_hook(vec * scale)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def require_paper_site(vectors: SteeringVectors) -> None:
    """The paper form edits the layer output: refuse vectors for another site."""
    if vectors.site != "layer_output":
        raise UserError("the paper form edits the layer output: use vectors with site layer_output")


def _is_prefill(kwargs: dict, length: int) -> bool:
    """Whether this forward call is the prefill (nothing cached yet) rather than a decode step.

    transformers 5.x renamed the cache argument from past_key_values to cache (generate passes the
    new name); both are read. Without a cache object, position ids tell: a prefill's last position
    is length - 1, a decode step's is further on."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if hasattr(cache, "get_seq_length"):
            return cache.get_seq_length() == 0
    positions = kwargs.get("position_ids", kwargs.get("cache_position"))
    if isinstance(positions, torch.Tensor) and positions.numel():
        return int(positions.max()) == length - 1
    return True


@contextmanager
def paper_steering(model, vectors: SteeringVectors, alpha: float = 0.1, rows: slice | None = None,
                   every_call: bool = False):
    """Context manager: the paper's prefill-only, last-prompt-token, norm-preserving update after each steered
    layer, at `alpha`. `model`: a LoadedModel, a (model, tokenizer) pair or a module. `rows`: edit only these
    rows of each batch (a slice of the batch dimension, e.g. slice(1, None, 2) for every second row; the
    others run unsteered, so one batch can hold the steered and the unsteered model's prompts).
    `every_call`: edit the last position of every forward call, cached or not: for a caller that prefilled
    all of the prompt but its last token unsteered and runs that token as a call of its own (the edit is
    the same, since the paper form changes nothing before the last prompt token)."""
    model, arch = _resolve(model)
    _check(model, arch, vectors)
    require_paper_site(vectors)
    state: dict = {"prefill": False, "last": None}
    layers = arch.decoder_layers(model)
    selected = slice(None) if rows is None else rows

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = (ids if ids is not None else embeds).shape[1]
        batch = (ids if ids is not None else embeds).shape[0]
        state["prefill"] = every_call or _is_prefill(kwargs, length)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length:
            state["last"] = last_token_index(mask)
        else:
            state["last"] = torch.full((batch,), length - 1, dtype=torch.long)

    def make_hook(unit: torch.Tensor):
        def hook(module, args, output):
            if not state["prefill"]:
                return None
            hidden = layer_output_tensor(output)
            edited = torch.arange(hidden.shape[0], device=hidden.device)[selected]
            last = state["last"].to(hidden.device)[selected]
            h = hidden[edited, last].float()
            norm = h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            mixed = h / norm + alpha * unit.to(hidden.device)
            new = norm * mixed / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            hidden = hidden.clone()
            hidden[edited, last] = new.to(hidden.dtype)
            return replace_layer_output(output, hidden)
        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for layer, vec in vectors.directions.items():
            unit = vec.float() / vec.float().norm().clamp_min(1e-12)
            handles.append(layers[layer].register_forward_hook(make_hook(unit)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def steering(model, vectors: SteeringVectors, form: str, strength: float):
    """`additive` with scale=strength, or `paper` with alpha=strength."""
    if form == "additive":
        return additive_steering(model, vectors, strength)
    if form == "paper":
        return paper_steering(model, vectors, strength)
    raise UserError(f"unknown steering form '{form}': use {' or '.join(FORMS)}")
