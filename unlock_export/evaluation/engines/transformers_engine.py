"""The transformers engine: batched greedy generation in this process, with the reference steering
hooks (paper, additive or the gated edit), or a plain PEFT LoRA applied for the run."""

from __future__ import annotations

import contextlib

from ...errors import UserError
from ..questions import render_prompts
from . import STOP, Capabilities, Session, parse_lora


class TransformersEngine:
    """Batched greedy generation with left padding; an optional steering context (hooks)."""

    name = "transformers"
    gives_prefixes = True

    def __init__(self, loaded, steering=None, batch_size: int = 8):
        self.loaded, self.steering, self.batch_size = loaded, steering, batch_size

    def generate(self, texts: list[str], max_new_tokens: int, progress=None, prefixes: tuple[int, ...] = ()) -> list:
        """(text, generated tokens) per prompt; with `prefixes`, a third item: {budget: the text of the
        answer's first `budget` tokens} for each budget the answer ran past."""
        from ...method.generate import greedy

        tok = self.loaded.tokenizer
        context = self.steering() if self.steering else contextlib.nullcontext()
        with context:
            rows = greedy(self.loaded, texts, max_new_tokens, self.batch_size, stop_strings=STOP, on_batch=progress)
        if not prefixes:
            return [(tok.decode(row, skip_special_tokens=True), len(row)) for row in rows]
        return [(tok.decode(row, skip_special_tokens=True), len(row),
                 {str(b): tok.decode(row[:b], skip_special_tokens=True) for b in prefixes if b < len(row)})
                for row in rows]


class TransformersPlugin:
    name = "transformers"
    summary = "hooks for every steering form and plain LoRAs, in this process; any model"
    capabilities = Capabilities(models=("loaded", "folder", "hub", "gguf"), forms=("paper", "additive", "gated-lora"),
                                lora=True, lora_scale=True, prefixes=True)

    @contextlib.contextmanager
    def open(self, model, request, items, vectors, label, options, progress):
        from ...method.capture import resolve_batch_size
        from ...models.pool import ModelPool, model_label

        loaded = ModelPool(options, progress=progress).get(model)
        texts = render_prompts(items, request.template, loaded.tokenizer, request.chat)
        steer = None
        if vectors is not None and request.form == "gated-lora":
            steer, multiplier = gated_steering(loaded, vectors, request, model_label(model), progress)
            label["steering"]["multiplier"] = multiplier
        elif vectors is not None:
            from ...method.steer import steering

            vectors = vectors.for_model(loaded.n_layers, loaded.hidden_size, f"'{model_label(model)}'")
            steer = lambda: steering(loaded, vectors, request.form, request.strength)  # noqa: E731
        elif request.lora:
            from ...models.loading import applied_lora

            path, scale = parse_lora(request.lora)
            steer = lambda: applied_lora(loaded, path, scale)  # noqa: E731
        batch_size = resolve_batch_size(options.batch_size, loaded, texts, options.max_length,
                                        extra_tokens=request.max_new_tokens)
        yield Session(TransformersEngine(loaded, steer, batch_size), texts, label)


def gated_steering(loaded, vectors, request, name: str, progress: bool):
    """The gated edit's hooks (method.gate), its gates fitted here on the target as request.gate says
    (in float32: the gate fit and fold run there)."""
    import torch

    from ...method.gate import gated_edit
    from ..calibrate import fit_gated_edit

    if next(loaded.model.parameters()).dtype != torch.float32:
        raise UserError("the gated-lora form fits its gates in float32: pass --dtype float32")
    settings = request.gate  # run_eval fills in the defaults
    vectors = vectors.for_model(loaded.n_layers, loaded.hidden_size, f"'{name}'")
    fit = fit_gated_edit(loaded, vectors, settings, closeness=False, progress=progress)  # eval needs no KL report
    return (lambda: gated_edit(loaded, fit)), fit.multiplier


PLUGIN = TransformersPlugin()
