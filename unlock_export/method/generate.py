"""Greedy generation with the end-of-text rule, in one place (eval's answers, the key's answer
openings, calibration's continuations)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cut_at_end(row: list[int], ends: set[int] | list[int]) -> list[int]:
    """The tokens before the first end-of-text token (a finished row is padded after it)."""
    ends = set(ends)
    return row[:next((k for k, t in enumerate(row) if t in ends), len(row))]


@torch.inference_mode()
def greedy(loaded, texts: list[str], max_new_tokens: int, batch_size: int = 8, stop_strings: list[str] | None = None,
           on_batch: Callable[[int], None] | None = None, keep_first: bool = False,
           by_length: bool = True) -> list[list[int]]:
    """The new token ids of each text's greedy continuation, at most `max_new_tokens`, cut at its first
    end-of-text token (models.loading.end_of_text_ids); with `keep_first`, at least the first token
    (the end-of-text token itself when the answer is empty). Texts are batched by length (left
    padding; `by_length=False`: in their order); the result keeps their order. `on_batch(n)` is
    called after each batch of n texts."""
    from ..models.loading import end_of_text_ids

    tok, model = loaded.tokenizer, loaded.model
    ends = end_of_text_ids(model, tok)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if by_length else list(range(len(texts)))
    out: list = [None] * len(texts)
    extra = {"stop_strings": stop_strings, "tokenizer": tok} if stop_strings else {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True).to(loaded.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
                             pad_token_id=tok.pad_token_id, **extra)
        for row, i in enumerate(idx):
            out[i] = gen[row, enc["input_ids"].shape[1]:].tolist()
        if on_batch:
            on_batch(len(idx))
    return [cut_at_end(row, ends) or (row[:1] if keep_first else []) for row in out]
