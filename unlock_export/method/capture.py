"""Activation capture: the residual stream after decoder layers, one row per prompt.

Forward hooks on the decoder layers copy out only the rows that are needed (the last prompt token,
a masked mean over all tokens, or the mean over each text's last few tokens) into preallocated
float32 accumulators, instead of keeping every layer's full [batch, tokens, hidden] tensor as
`output_hidden_states=True` does. When only the first few layers are needed, the forward pass
stops after the deepest of them.

Given a checkpoint folder, a capture saves its finished batches there every few seconds and when
interrupted; the same capture started again (same model, prompts and settings) continues from the
saved batches. Batches are fixed by the prompts and the batch size, so the result is identical.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.architectures import config_size, layer_output_tensor
from ..models.loading import LoadedModel

POSITIONS = ("last", "mean", "tail")
log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass early."""


class CaptureCheckpoint:
    """The finished batches of one capture, in `folder/capture-<fingerprint>.safetensors`.

    The fingerprint covers the model, its dtype, the texts and every setting that changes the rows,
    so a checkpoint is only ever resumed by the capture that wrote it."""

    def __init__(self, folder: str | Path, fingerprint: str, every_s: float = 30.0):
        self.path = Path(folder) / f"capture-{fingerprint[:24]}.safetensors"
        self.every_s = every_s
        self._last = time.monotonic()

    def load(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, int] | None:
        """(rows so far, number of finished batches), or None when there is nothing usable."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.path.is_file():
            return None
        try:
            saved = load_file(str(self.path))
        except (SafetensorError, OSError) as exc:
            log.warning("ignoring unreadable capture checkpoint %s (%s)", self.path, exc)
            return None
        rows, done = saved.get("rows"), saved.get("batches_done")
        if rows is None or done is None or tuple(rows.shape) != shape:
            return None
        return rows, int(done)

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, rows: torch.Tensor, batches_done: int) -> None:
        from .._io import atomic_save

        atomic_save({"rows": rows, "batches_done": torch.tensor(batches_done)}, self.path,
                    {"format": "unlock-export/capture-checkpoint"})
        self._last = time.monotonic()


def capture_fingerprint(loaded: LoadedModel, texts: list[str], layers: list[int], position: str,
                        batch_size: int, max_length: int | None, tail_tokens: list[int] | None = None) -> str:
    params = next(loaded.model.parameters())
    settings = [loaded.source.spec, str(params.dtype), layers, position, batch_size, max_length, len(texts)]
    if tail_tokens is not None:
        settings.append(tail_tokens)
    digest = hashlib.sha256(json.dumps(settings).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding."""
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (steps + 1)).argmax(dim=1)


def tail_mask(attention_mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """1 on each row's last `counts[i]` real tokens (any padding side), else 0."""
    before = attention_mask.long().flip(-1).cumsum(-1).flip(-1)  # real tokens from here to the end
    counts_t = torch.tensor(counts, device=attention_mask.device)[:, None]
    return (attention_mask.bool() & (before <= counts_t)).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (as `generate` computes them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def tokenize(tokenizer, texts: list[str], device, max_length: int | None = None) -> dict:
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # the last tokens are the ones that matter
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    batch = tokenizer(texts, return_tensors="pt", padding=True, **kwargs)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def check_finite(states: torch.Tensor, what: str, layers: list[int]) -> None:
    bad = ~torch.isfinite(states).reshape(states.shape[0], -1).all(dim=1)
    if bad.any():
        layer = layers[int(bad.nonzero()[0])]
        raise UserError(
            f"{what}: activations at layer {layer} contain NaN or inf; load the model with "
            "--dtype float32 or check the checkpoint"
        )


def free_memory_bytes(device: torch.device) -> int:
    """Memory a batch may use: free GPU memory on CUDA, MemAvailable on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_bytes_per_row(config, seq_len: int, dtype_bytes: int) -> int:
    """A conservative peak for one prompt row in one decoder layer's forward: the residual, norm,
    q/k/v/o and MLP intermediates for every token, plus eager attention scores (SDPA needs less)."""
    hidden = int(config_size(config, "hidden"))
    inter = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", None) or 1)
    per_token = (6 * hidden + 3 * inter) * dtype_bytes
    scores = heads * seq_len * seq_len * max(dtype_bytes, 4)
    return seq_len * per_token + scores


def choose_batch_size(loaded: LoadedModel, seq_len: int, free_bytes: int | None = None, fraction: float = 0.5,
                      cap: int = 256) -> int:
    """The largest batch whose activations fit in `fraction` of the free memory (at least 1, at most cap)."""
    device = input_device(loaded.model)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    dtype_bytes = next(loaded.model.parameters()).element_size()
    per_row = activation_bytes_per_row(loaded.model.config, max(1, seq_len), dtype_bytes)
    return max(1, min(cap, int(fraction * free // per_row)))


def resolve_batch_size(batch_size: int | str, loaded: LoadedModel, texts: list[str], max_length: int | None = None,
                       extra_tokens: int = 0) -> int:
    """An int as given; "auto" from free memory and the longest prompt (plus tokens to be generated)."""
    if batch_size != "auto":
        return int(batch_size)
    lengths = [len(ids) for ids in loaded.tokenizer(texts, add_special_tokens=True).input_ids] or [1]
    longest = min(max(lengths), max_length) if max_length else max(lengths)
    chosen = choose_batch_size(loaded, longest + extra_tokens)
    log.info("batch size auto: %d (longest prompt %d tokens)", chosen, longest)
    return chosen


@torch.inference_mode()
def _checked_request(loaded: LoadedModel, texts: list[str], layers: list[int] | None, position: str,
                     batch_size: int | str, max_length: int | None, tail_tokens: list[int] | None) -> tuple[list, int]:
    """The layers to capture (sorted) and the batch size, or a UserError naming what is wrong."""
    n_layers = loaded.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    if position not in POSITIONS:
        raise UserError(f"unknown capture position '{position}': use {' or '.join(POSITIONS)}")
    if not texts:
        raise UserError("no prompts to capture: give at least one prompt")
    if (position == "tail") != (tail_tokens is not None):
        raise UserError("tail_tokens go with position 'tail' and only with it")
    if tail_tokens is not None and (len(tail_tokens) != len(texts) or min(tail_tokens) < 1):
        raise UserError("tail_tokens needs one count of at least 1 per text")
    batch_size = resolve_batch_size(batch_size, loaded, texts, max_length)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    return layers, batch_size


def _row_hooks(loaded: LoadedModel, layers: list[int], position: str, state: dict, staging: torch.Tensor) -> list:
    """Forward hooks that copy each captured layer's rows (at `position`, read from `state`) into
    `staging`, and stop the forward after the deepest one. Returns their handles."""
    n_layers = loaded.n_layers
    slot = {layer: i for i, layer in enumerate(layers)}
    deepest = layers[-1]

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = layer_output_tensor(output)
            if position == "last":
                rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), state["last"].to(hidden.device)]
            else:
                mask = state["mask" if position == "mean" else "tail"].to(hidden.device, hidden.dtype).unsqueeze(-1)
                rows = (hidden * mask).sum(1) / mask.sum(1)
            # fp32 rows only, into the staging buffer; from a GPU an asynchronous copy into pinned memory
            staging[slot[layer], :rows.shape[0]].copy_(rows.float(), non_blocking=staging.is_pinned())
            if layer == deepest and deepest < n_layers - 1:
                raise _StopForward
        return hook

    decoder_layers = loaded.arch.decoder_layers(loaded.model)
    return [decoder_layers[layer].register_forward_hook(make_hook(layer)) for layer in layers]


def capture(
    loaded: LoadedModel,
    texts: list[str],
    layers: list[int] | None = None,
    position: str = "last",
    batch_size: int | str = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "capture",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    tail_tokens: list[int] | None = None,
) -> torch.Tensor:
    """Residual stream after each layer in `layers` (default all) for each text.

    position: "last" (the last token), "mean" (every token) or "tail" (the mean over each text's
    last `tail_tokens[i]` tokens, e.g. the last prompt token and the answer tokens after it).

    Returns a float32 CPU tensor [len(layers), len(texts), hidden_size] in the given order.
    With `checkpoint_dir`, finished batches are saved there (see the module docstring) and a
    capture with the same fingerprint continues from them.
    """
    layers, batch_size = _checked_request(loaded, texts, layers, position, batch_size, max_length, tail_tokens)
    model, tokenizer = loaded.model, loaded.tokenizer
    out = torch.zeros(len(layers), len(texts), loaded.hidden_size, dtype=torch.float32)
    on_gpu = any(p.is_cuda for p in model.parameters())
    staging = torch.zeros(len(layers), min(batch_size, len(texts)), loaded.hidden_size, dtype=torch.float32,
                          pin_memory=on_gpu)
    state: dict = {}
    handles = _row_hooks(loaded, layers, position, state, staging)
    # Sort by length so batches hold similar lengths (less padding), then write back in order.
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    device = input_device(model)
    accepted = inspect.signature(model.forward).parameters
    extra = {"use_cache": False}
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = 1  # skip the LM head over every position
    starts = list(range(0, len(order), batch_size))
    checkpoint, done = None, 0
    if checkpoint_dir is not None:
        checkpoint = CaptureCheckpoint(checkpoint_dir, capture_fingerprint(
            loaded, texts, layers, position, batch_size, max_length, tail_tokens), checkpoint_every_s)
        saved = checkpoint.load(tuple(out.shape))
        if saved is not None:
            out, done = saved
            log.info("%s: resuming after %d of %d batches from %s", desc, done, len(starts), checkpoint.path)
    try:
        for index in tqdm(range(done, len(starts)), desc=desc, unit="batch", disable=not progress,
                          initial=done, total=len(starts)):
            rows = order[starts[index]:starts[index] + batch_size]
            batch = tokenize(tokenizer, [texts[i] for i in rows], device, max_length)
            state.update(rows=torch.tensor(rows), mask=batch["attention_mask"],
                         last=last_token_index(batch["attention_mask"]))
            if tail_tokens is not None:
                state["tail"] = tail_mask(batch["attention_mask"], [tail_tokens[i] for i in rows])
            if "position_ids" in accepted:  # absolute-position models need mask-aware positions
                batch["position_ids"] = position_ids(batch["attention_mask"])
            try:
                model(**batch, **extra)
            except _StopForward:
                pass
            if on_gpu:
                torch.cuda.synchronize()  # the asynchronous row copies have landed
            out[:, state["rows"]] = staging[:, :len(rows)]
            done = index + 1
            if checkpoint is not None and (checkpoint.due() or done == len(starts)):
                checkpoint.save(out, done)
    except BaseException:
        if checkpoint is not None and done:  # Ctrl-C or a failure: keep what is finished
            checkpoint.save(out, done)
        raise
    finally:
        for handle in handles:
            handle.remove()
    check_finite(out, desc, layers)
    return out
