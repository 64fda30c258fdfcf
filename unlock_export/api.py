"""The public Python API, re-exported by `unlock_export` (see its __all__).

Every model argument takes a spec string (a local folder, a .gguf file, zoo:NAME, a Hub id), a
`(model, tokenizer)` pair the caller already loaded, or a LoadedModel: a model already in memory is
used as it is and never loaded again. Prompts are a list of strings or a source name
(`builtin:gsm8k-train`, a JSONL file) with `count`. Results are small frozen dataclasses with
`as_dict()`; bad arguments raise `UserError` with a one-line message that names the argument.

    import unlock_export as ux
    key = ux.master_key("zoo:qwen2.5-coder-0.5b-instruct", prompts="builtin:gsm8k-train", count=64)
    lrmap = ux.fit_map("zoo:qwen2.5-coder-0.5b-instruct", "zoo:qwen2.5-coder-1.5b-instruct",
                       prompts="builtin:gsm8k-train", count=64)
    vectors = lrmap.project(key, layers="1--1")
    result = ux.fold("zoo:qwen2.5-coder-1.5b-instruct", vectors, "out/folded", scale=0.42)
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from . import prompts as prompt_sources
from ._io import refuse_existing
from .errors import UserError
from .evaluation.calibrate import Calibration
from .evaluation.run import EvalRequest, EvalSummary
from .export.base import FoldResult
from .method.align import LowRankMap
from .method.key import MasterKey
from .method.vectors import SteeringVectors
from .models.loading import LoadedModel
from .models.pool import ModelPool, as_loaded
from .models.runtime import RuntimeOptions
from .settings import CalibrationSettings

if TYPE_CHECKING:
    from .method.gate import GateFit, GateSettings

ModelLike = Union[str, Path, LoadedModel, tuple]
Prompts = Union[str, Sequence[str]]


def _questions(prompts: Prompts, count: int | None, offset: int = 0, field: str = "question") -> list[str]:
    if isinstance(prompts, (str, Path)):
        return prompt_sources.load_questions(str(prompts), field, count, offset)
    questions = [str(q) for q in prompts][offset:]
    questions = questions[:count] if count is not None else questions
    if not questions:
        raise UserError("prompts is empty: pass a list of prompt strings or a source like builtin:gsm8k-train")
    return questions


def _pool(options: RuntimeOptions | None, progress: bool) -> ModelPool:
    return ModelPool(options or RuntimeOptions(), progress=progress)


def load_model(spec: str | Path, options: RuntimeOptions | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer (eval mode) from a spec; `options` sets dtype, device and so on."""
    return ModelPool(options or RuntimeOptions(), progress=False).get(str(spec))


def master_key(locked: ModelLike, unlocked: ModelLike | None = None, *, prompts: Prompts | None = None,
               count: int | None = None, locked_template: str = "direct", unlocked_template: str = "cot",
               method: str = "mean", answer_tokens: int = 0, pairs: "str | Sequence | None" = None,
               chat: bool = False, system: str | None = None, locked_system: str | None = None,
               unlocked_system: str | None = None, options: RuntimeOptions | None = None,
               progress: bool = False) -> MasterKey:
    """The Master Key: per-layer mean (or first principal direction) of unlocked - locked residuals.

    Args:
        locked: the capability-absent source (a base checkpoint, or the model under `locked_template`);
            with `pairs`, the one model both sides run on.
        unlocked: the capability-present source (default: `locked`, contrasted by template).
        prompts: prompt strings or a source name; `count` of them.
        locked_template, unlocked_template: `direct`, `cot`, `plain` or a format string with {question}.
        method: `mean` or `pca`.
        answer_tokens: 0 reads the last prompt token (the paper's key); K reads the answer's first K tokens.
        pairs: contrastive pairs instead of prompts and templates: a JSONL file (rows `{"positive", "negative"}`
            or `{"prompt", "positive", "negative"}`), or a list of such dicts or `(positive, negative)` tuples;
            `count` of them. The key is positive - negative.
        chat: wrap every prompt (or pair text) in the model's own chat template; `system` is the system
            turn of both variants, `locked_system` / `unlocked_system` of one each (a system-prompt contrast).
    """
    from .method.pipeline import compute_key, compute_pair_key
    from .prompts import Chat

    if not chat and (system or locked_system or unlocked_system):
        raise UserError("system, locked_system and unlocked_system need chat=True (they are chat template turns)")
    pool = _pool(options, progress)
    if pairs is not None:
        if prompts is not None or unlocked is not None or answer_tokens or locked_system or unlocked_system:
            raise UserError("pairs replace prompts, unlocked, templates, answer_tokens and the per-variant system "
                            "texts: pass pairs and the one model")
        rows, name = _pairs(pairs, count)
        return compute_pair_key(pool, locked, rows, method, Chat(system) if chat else None, name)
    if prompts is None:
        raise UserError("master_key needs prompts (a list or a source like builtin:gsm8k-train) or pairs")
    questions = _questions(prompts, count)
    locked_chat = Chat(locked_system or system) if chat else None
    unlocked_chat = Chat(unlocked_system or system) if chat else None
    key, _ = compute_key(pool, locked, unlocked if unlocked is not None else locked,
                         locked_template, unlocked_template, questions, method, answer_tokens,
                         locked_chat, unlocked_chat)
    return key


def _pairs(pairs, count: int | None) -> tuple[list, str]:
    """Pairs from a file name, or from a list of dicts or (positive, negative) tuples, and their source's name."""
    from .prompts import Pair, load_pairs

    if isinstance(pairs, (str, Path)):
        return load_pairs(pairs, count), str(pairs)
    rows = []
    for i, row in enumerate(list(pairs)[:count] if count else list(pairs), 1):
        if isinstance(row, Pair):
            rows.append(row)
            continue
        if isinstance(row, (tuple, list)) and len(row) == 2:
            row = {"positive": row[0], "negative": row[1]}
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("positive", "negative")):
            raise UserError(f"pairs[{i - 1}]: a pair needs non-empty 'positive' and 'negative' texts")
        rows.append(Pair(row["positive"], row["negative"], row.get("prompt"), i))
    if not rows:
        raise UserError("pairs is empty: pass a JSONL file or a list of (positive, negative) pairs")
    if len({r.prompt is None for r in rows}) > 1:
        raise UserError("pairs mix two shapes: give every pair a prompt, or none")
    return rows, "(pairs given in Python)"


def fit_map(source: ModelLike, target: ModelLike, *, prompts: Prompts, count: int | None = None, rank: int = 16,
            source_template: str = "direct", target_template: str | None = None, chat: bool = False,
            system: str | None = None, contrast_pairs: "str | Sequence | None" = None,
            options: RuntimeOptions | None = None, progress: bool = False) -> LowRankMap:
    """The per-layer low-rank map from `source` to `target` on shared unlabeled prompts.

    Args:
        source: the source model the key was read on (its locked variant).
        target: the model that receives the capability.
        prompts: prompt strings or a source name; `count` of them.
        rank: the subspace rank k of each layer's map.
        target_template: the target's template (default: `source_template`).
        chat: both models read the prompts through their own chat templates (`system`: a system turn).
        contrast_pairs: a pairs key's own pairs (as `master_key(pairs=...)` takes them): both sides of
            every pair are paired too, in both models, so the map sees the contrast and carries it.
    """
    from .method.pipeline import compute_map

    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    from .prompts import Chat

    if system and not chat:
        raise UserError("system needs chat=True (it is a chat template turn)")
    pairs = _pairs(contrast_pairs, None)[0] if contrast_pairs is not None else None
    return compute_map(_pool(options, progress), source, target, source_template, target_template or source_template,
                       _questions(prompts, count), rank, chat=Chat(system) if chat else None, contrast_pairs=pairs)


def fold(target: ModelLike, vectors: SteeringVectors, out: str | Path, *, scale: float = 1.0, mode: str = "bias",
         rank: int | None = None, layers: str | list[int] | None = None, verify: bool = True,
         tolerance: float = 1e-3, overwrite: bool = False, link: bool = False, progress: bool = False,
         gate: "GateSettings | dict | None" = None, merge: bool = False, dtype: str = "auto") -> FoldResult:
    """Fold `scale * vectors` into `target`'s weights: a checkpoint (mode `bias`, in `dtype`: `auto` is the
    precision of the target's own weights, or float32, bfloat16, float16), a PEFT BEFT adapter
    (mode `adapter`) or a PEFT LoRA with lora_bias (mode `lora`, `rank` default 8) in `out`, verified
    against the hooks before it is written. Mode `gated-lora` writes the gated edit instead (`scale`
    and `rank` unused): `gate` is its method.gate.GateSettings (or a dict of them: prompts, count,
    offset, heldout, template, alpha, multiplier (a number or "auto"), ridge, rank), fitted by
    `fit_gates`; `merge` writes it into a standalone checkpoint instead of a PEFT LoRA.

    A fold reads the target's files: pass a spec, or a model loaded from a local folder or GGUF."""
    from .export.forms import export, form, forms_with

    if layers is not None:
        vectors = vectors.select(layers)
    reference = None if isinstance(target, (str, Path)) else as_loaded(target)  # verify reuses it, if float32
    if form(mode).fits_gates:
        return fold_gated_lora(target, vectors, out, gate, merge=merge, link=link, overwrite=overwrite,
                               verify=verify, tolerance=tolerance, progress=progress, dtype=dtype)
    if gate:
        raise UserError(f"gate settings apply to mode {' or '.join(forms_with(lambda f: f.fits_gates))} only")
    return export(mode, _files_of(target), vectors, out, scale=scale, rank=rank, link=link,
                      overwrite=overwrite, verify=verify, tolerance=tolerance, progress=progress, reference=reference,
                      dtype=dtype)


def fold_gated_lora(target: ModelLike, vectors: SteeringVectors, out: str | Path,
                    gate: "GateSettings | dict | None" = None, *, merge: bool = False, link: bool = False,
                    overwrite: bool = False, verify: bool = True, tolerance: float = 1e-3, progress: bool = False,
                    card_context: dict | None = None, dtype: str = "auto") -> FoldResult:
    """`fold(mode="gated-lora")`: fit the gates (`fit_gates`) on the target, loaded once in float32
    (or used as it is when the caller's model is float32), and write the edit, verified against its
    hook form on that same model."""
    from .export.forms import export
    from .models.checkpoint import check_output_path
    from .models.loading import resolve

    settings = _settings(gate)
    settings.check()
    files = _files_of(target)
    source = resolve(files)
    if source.kind == "dir":  # refused before the fit, not after it
        check_output_path(Path(out), Path(source.path), overwrite)
    else:
        refuse_existing(out, overwrite)
    loaded = _float32_model(target, progress)
    fit = fit_gates(loaded, vectors, settings, progress=progress)
    context = {**(card_context or {}), "gate_prompts": f"{settings.prompts} [{settings.offset}:"
               f"{settings.offset + settings.count}], template {settings.template}"
               + (f", the target's chat template{f' (system: {settings.system})' if settings.system else ''}"
                  if settings.chat else "")}
    return export("gated-lora", files, vectors, out, fit=fit, merge=merge, link=link, overwrite=overwrite, verify=verify,
                      tolerance=tolerance, progress=progress, reference=loaded, card_context=context, dtype=dtype)


def _settings(gate: "GateSettings | dict | None") -> "GateSettings":
    from .method.gate import GateSettings

    return gate if isinstance(gate, GateSettings) else GateSettings.from_dict(gate)


def _float32_model(target: ModelLike, progress: bool) -> LoadedModel:
    """`target` as a float32 LoadedModel: the caller's model when it is float32, else loaded once in
    float32 on the CPU (the gate fit and the fold's verification run there)."""
    import torch

    if not isinstance(target, (str, Path)):
        loaded = as_loaded(target)
        if next(loaded.model.parameters()).dtype == torch.float32:
            return loaded
    return _pool(RuntimeOptions(dtype="float32", device="cpu"), progress).get(_files_of(target))


def fit_gates(target: ModelLike, vectors: SteeringVectors, gate: "GateSettings | dict | None" = None, *,
              progress: bool = False) -> "GateFit":
    """The gated edit of `vectors` on `target` (method.gate.GateFit): its gates fitted without labels on
    the prompts `gate` names (method.gate.GateSettings, or a dict of them), the multiplier chosen
    without labels when it is "auto", and its closeness to the paper form beside the bias fold's (KL
    at the answer start on the held-out prompts). `target` in float32 is used as it is; anything else
    is loaded in float32 on the CPU. `ux.gated_edit(model, fit)`-style hooks: method.gate.gated_edit."""
    from .evaluation.calibrate import fit_gated_edit

    settings = _settings(gate)
    settings.check()
    loaded = _float32_model(target, progress)
    vectors = vectors.for_model(loaded.n_layers, loaded.hidden_size, "target")
    return fit_gated_edit(loaded, vectors, settings, progress=progress)


def _files_of(model: ModelLike) -> str:
    """The spec of the files behind a model (a fold and a GGUF patch read files, not modules)."""
    if isinstance(model, (str, Path)):
        return str(model)
    loaded = as_loaded(model)
    if loaded.source.kind == "loaded":
        raise UserError("target: this model was loaded elsewhere and its files are unknown: pass the folder it "
                        "was loaded from (its name_or_path is not a local folder)")
    return loaded.source.spec


def write_control_vector(vectors: SteeringVectors, path: str | Path, *, scale: float = 1.0,
                         model_hint: str | None = None, overwrite: bool = False) -> dict:
    """`scale * vectors` as a llama.cpp control-vector GGUF (direction.N, added to the output of layer N)."""
    from .export.converters import write_gguf

    return write_gguf("control-vector", vectors, path, overwrite=overwrite, scale=scale, model_hint=model_hint)


def additive_steering(model: ModelLike, vectors: SteeringVectors, scale: float = 1.0):
    """Context manager: h += scale * direction[L] after each steered layer, at every position (what a
    fold or a control vector computes). `model` is a LoadedModel, a (model, tokenizer) pair or a module."""
    from .method.steer import additive_steering as hooks

    return hooks(_module(model), vectors, scale)


def paper_steering(model: ModelLike, vectors: SteeringVectors, alpha: float = 0.1):
    """Context manager: the paper's form, the last prompt token in prefill only, norm-preserving, at `alpha`."""
    from .method.steer import paper_steering as hooks

    return hooks(_module(model), vectors, alpha)


def _module(model):
    if isinstance(model, tuple):
        return model[0]
    if isinstance(model, (str, Path)):
        raise UserError("model: steering hooks go on a loaded model; pass a LoadedModel or a (model, tokenizer) "
                        "pair (ux.load_model(spec) loads one)")
    return model


_CALIBRATION = CalibrationSettings()
_EVAL = EvalRequest()


def calibrate_scale(model: ModelLike, vectors: SteeringVectors, *, prompts: Prompts,
                    count: int | None = _CALIBRATION.count, alpha: float = _CALIBRATION.alpha, template: str = "direct",
                    objective: str = _CALIBRATION.objective, scales: Sequence[float] | None = _CALIBRATION.scales,
                    ppl_margin: float = _CALIBRATION.ppl_margin, layers: str | list[int] | None = None,
                    continuation_tokens: int = _CALIBRATION.continuation_tokens, chat: bool = False,
                    system: str | None = None, options: RuntimeOptions | None = None,
                    progress: bool = False) -> Calibration:
    """The additive (folded) scale closest to the paper form at `alpha`, without labels, among the
    scales that keep perplexity on the plain prompts within `ppl_margin` of the unsteered model's
    (defaults: unlock_export.settings.CalibrationSettings, the CLI's and a recipe's too). `chat`: the
    prompts read through the model's chat template (`system`: a system turn). `layers`: calibrate a fold
    of only these layers (the paper-form reference keeps every layer of `vectors`)."""
    from .evaluation.calibrate import DEFAULT_SCALES
    from .evaluation.calibrate import search_scale as search
    from .method.capture import resolve_batch_size
    from .method.pipeline import prompt_texts
    from .prompts import Chat

    if system and not chat:
        raise UserError("system is a chat turn: pass chat=True (--chat)")
    options = options or RuntimeOptions()
    loaded = _pool(options, progress).get(model)
    name = f"'{model}'" if isinstance(model, (str, Path)) else f"'{loaded.source.spec}'"
    vectors = vectors.for_model(loaded.n_layers, loaded.hidden_size, name)
    questions = _questions(prompts, count)
    texts = prompt_texts(loaded, template, questions, Chat(system) if chat else None, name.strip("'"))
    band = vectors.select(layers).layers if layers else None
    batch_size = resolve_batch_size(options.batch_size, loaded, prompt_sources.apply_template(template, questions),
                                    options.max_length)
    return search(loaded, vectors, texts, prompt_sources.apply_template("plain", questions), "paper", alpha,
                  tuple(scales) if scales else DEFAULT_SCALES, ppl_margin, batch_size, progress=progress,
                  additive_layers=band, objective=objective, continuation_tokens=continuation_tokens)


def evaluate(model: ModelLike, *, data: str = _EVAL.data, count: int | None = _EVAL.count, offset: int = _EVAL.offset,
             vectors: SteeringVectors | None = None, form: str = _EVAL.form, scale: float = _EVAL.scale,
             alpha: float = _EVAL.alpha, template: str | None = _EVAL.template,
             max_new_tokens: int = _EVAL.max_new_tokens, engine: str = _EVAL.engine,
             out: str | Path | None = None, options: RuntimeOptions | None = None, progress: bool = False,
             **request) -> EvalSummary:
    """Greedy accuracy on a math set (GSM8K's numbers, or MATH's LaTeX answers scored by math-verify),
    optionally steered by `vectors` (`form` additive at `scale`, or paper at `alpha`), on `engine`
    (transformers; llamacpp for a GGUF file; vllm for a model folder); the defaults are EvalRequest's,
    the CLI's too. `template` None: the data set's
    (direct for GSM8K, math for MATH sets). Writes predictions.jsonl and summary.json into `out` (a
    temporary folder when None). Further settings of evaluation.run.EvalRequest (task, chat, layers, baseline, resume, llama_server,
    parallel, vllm, tensor_parallel_size, data_parallel_size, gpu_memory_utilization) pass through."""
    from .evaluation.run import run_eval

    ask = EvalRequest(data=data, count=count, offset=offset, template=template, engine=engine, form=form,
                      scale=scale, alpha=alpha, max_new_tokens=max_new_tokens, **request)
    if out is not None:
        return run_eval(model, ask, Path(out), vectors=vectors, options=options, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        return run_eval(model, ask, Path(tmp) / "eval", vectors=vectors, options=options, progress=progress)
