"""Running a recipe: its stages in order, each writing into one staging folder that becomes OUT_DIR
at the end (nothing partial is left behind). Each stage does one job and returns what the next reads.

    transfer     key -> align -> project: key, map and vectors files
    diagnostics  held-out fit, the target's own key (optional)
    calibrate    the label-free scale of the fold (fold.scale auto)
    fold         the checkpoint or adapter in OUT_DIR/model, verified
    gguf         model.gguf and control-vector.gguf for llama.cpp
    push         the Hub, after OUT_DIR is in place
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .. import prompts
from .._io import refuse_existing
from ..errors import UserError
from ..export.forms import form
from .spec import FoldSpec, GgufSpec, PushSpec, Recipe

if TYPE_CHECKING:  # the runner loads torch only when a stage runs
    from ..method.align import LowRankMap
    from ..method.key import MasterKey
    from ..method.vectors import SteeringVectors


@dataclass
class _Clock:
    """Per-stage wall times for summary.json."""

    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str):
        clock = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.timings[f"{name}_s"] = time.perf_counter() - self.t0

        return _Timer()


@dataclass(frozen=True)
class Transfer:
    """The transfer stage's result: the key, the map and the vectors, and the prompts they read."""

    key: "MasterKey"
    lrmap: "LowRankMap"
    vectors: "SteeringVectors"
    key_questions: list[str]
    align_questions: list[str]
    target_template: str


@dataclass(frozen=True)
class FoldStage:
    """The fold stage's result: the vectors it folded (its layers), the scale, and what it wrote."""

    vectors: "SteeringVectors"
    scale: float | None
    info: dict | None
    outputs: list[str]


def run_recipe(recipe: Recipe, out_dir: str | Path, overwrite: bool = False, progress: bool = True,
               recipe_text: str | None = None, resume: bool = False) -> dict:
    """Run the recipe's stages and write their outputs and summary.json into out_dir.

    Everything is written into a staging folder beside out_dir and renamed at the end, so a failed
    run leaves no partial output. Captures keep their progress in `.OUT.partial` beside it; with
    `resume`, an interrupted run continues from there (see capture.CaptureCheckpoint).
    """
    from .._io import progress_folder, staging_dir

    out_dir = Path(out_dir)
    if resume and not overwrite and recipe.evaluate is not None and (out_dir / "summary.json").is_file() \
            and not (out_dir / "compare" / "results.json").is_file():  # the run finished; its comparison did not
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
        summary["evaluate"] = evaluate_stage(recipe, out_dir, progress)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with progress_folder(out_dir, resume, start_over=overwrite) as checkpoint_dir:
        with staging_dir(out_dir, overwrite=True) as work:
            summary = _run(recipe, work, out_dir, progress, recipe_text, checkpoint_dir)
    if recipe.push is not None:
        summary["push"] = _push(recipe.push, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if recipe.evaluate is not None:
        summary["evaluate"] = evaluate_stage(recipe, out_dir, progress)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_stage(recipe: Recipe, out_dir: Path, progress: bool) -> dict:
    """The evaluate stage, after the outputs are in place: `compare` of the run's outputs into
    OUT_DIR/compare. An interrupted comparison continues with `run --resume` (its arms resume)."""
    import dataclasses

    from ..evaluation.compare import Arm, CompareRequest, compare
    from .outputs import run_arms

    e = recipe.evaluate
    _, arms = run_arms(out_dir, e.paper)
    arms = [Arm("unsteered"), *arms, *(Arm.parse(f"{name}={what}") for name, what in e.arms.items())]
    request = CompareRequest(**{f.name: getattr(e, f.name) for f in dataclasses.fields(CompareRequest)
                                if hasattr(e, f.name)})
    request = dataclasses.replace(request, budgets=tuple(e.budgets), chat=recipe.prompts.chat)
    try:
        results = compare(recipe.target.model, arms, request, out_dir / "compare", recipe.runtime, progress=progress,
                          confirm=e.confirm, command=["unlock-export", "run", f"# recipe {recipe.name}: evaluate"])
    except KeyboardInterrupt as exc:  # the outputs are in place; `run --resume` continues the comparison
        from .._io import note_progress

        note_progress(exc, out_dir / "compare")
        raise
    return {"results": str(out_dir / "compare" / "results.json"), "report": str(out_dir / "compare" / "report.md"),
            "title": results["title"], "table": [{k: row.get(k) for k in (
                "arm", "budget", "correct", "n", "accuracy", "won", "lost", "p_holm")} for row in results["table"]]}


def _run(recipe: Recipe, work: Path, out_dir: Path, progress: bool, recipe_text: str | None,
         checkpoint_dir: Path) -> dict:
    from ..evaluation import diagnostics
    from ..models.pool import ModelPool

    clock = _Clock()
    pool = ModelPool(recipe.runtime, progress=progress, checkpoint_dir=checkpoint_dir)
    transfer = _transfer(recipe, pool, work, clock)
    (work / "recipe.yaml").write_text(recipe_text or yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    outputs = ["key.safetensors", "map.safetensors", "vectors.safetensors"]
    card_extra: dict = {}
    diag = None
    if recipe.diagnostics.enabled:
        with clock.stage("diagnostics"):
            diag = _diagnostics(recipe, pool, transfer.key, transfer.lrmap, transfer.vectors,
                                transfer.key_questions, transfer.target_template)
            outputs += diagnostics.write(diag, work)
            card_extra["diagnostics"] = diagnostics.summary_line(diag)
    folded = _fold_stage(recipe, pool, transfer, work, out_dir, progress, recipe_text, card_extra, clock)
    outputs += folded.outputs
    gguf_info = None
    if recipe.gguf is not None:
        with clock.stage("gguf"):
            gguf_info = _llamacpp_files(recipe.gguf, work, folded.vectors, folded.scale)
        outputs += list(gguf_info["files"])
    summary = _summary(recipe, transfer, out_dir, outputs, clock, folded.info, gguf_info,
                       diagnostics.summary_line(diag) if diag else None)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _chat(recipe: Recipe, variant=None):
    """prompts.chat: the chat wrapping of a variant's prompts (its own system text, else prompts.system)."""
    if not recipe.prompts.chat:
        return None
    return prompts.Chat((variant.system if variant is not None else None) or recipe.prompts.system)


def _key(recipe: Recipe, pool, model: str, key_questions: list[str]):
    """The Master Key on `model` (the source's, or the target's own for the diagnostics) the recipe's way:
    its pairs, or its two variants' prompt contrast. Returns (key, the locked states or None)."""
    from ..method.pipeline import compute_key, compute_pair_key

    source, k = recipe.source, recipe.key
    if source.pairs is not None:
        pairs = prompts.load_pairs(source.pairs.path, source.pairs.count, source.pairs.offset)
        return compute_pair_key(pool, model, pairs, k.method, _chat(recipe), source.pairs.path), None
    locked, unlocked = source.locked, source.unlocked
    same = locked.model == unlocked.model
    return compute_key(pool, model if same else locked.model, model if same else unlocked.model, locked.template,
                       unlocked.template, key_questions, k.method, k.answer_tokens, _chat(recipe, locked),
                       _chat(recipe, unlocked))


def _transfer(recipe: Recipe, pool, work: Path, clock: _Clock) -> Transfer:
    """key -> align -> project; the key, map and vectors files written into `work`."""
    from ..method.pipeline import compute_map

    p = recipe.prompts
    key_questions = prompts.load_questions(p.path, p.field, p.key_count, p.offset)
    align_count = p.align_count or p.key_count
    same_prompts = align_count == p.key_count
    align_questions = key_questions if same_prompts else prompts.load_questions(p.path, p.field, align_count, p.offset)
    locked = recipe.source.locked
    target_template = recipe.target.template or locked.template
    with clock.stage("key"):
        key, locked_states = _key(recipe, pool, recipe.source.locked.model, key_questions)
    key.save(work / "key.safetensors")
    with clock.stage("align"):
        unlocked, pairs_spec = recipe.source.unlocked, recipe.source.pairs
        by_pairs = recipe.align.contrast and pairs_spec is not None
        by_format = recipe.align.contrast and pairs_spec is None
        lrmap = compute_map(pool, locked.model, recipe.target.model, locked.template, target_template,
                            align_questions, recipe.align.rank,
                            source_states=locked_states if same_prompts and locked_states is not None else None,
                            chat=_chat(recipe, locked) if by_format else _chat(recipe),
                            contrast=(unlocked.template, _chat(recipe, unlocked)) if by_format else None,
                            contrast_pairs=prompts.load_pairs(pairs_spec.path, pairs_spec.count, pairs_spec.offset)
                            if by_pairs else None)
    lrmap.save(work / "map.safetensors")
    vectors = lrmap.project(key, recipe.vectors.layers, recipe.vectors.site)
    vectors.provenance["recipe"] = recipe.name
    vectors.save(work / "vectors.safetensors")
    return Transfer(key, lrmap, vectors, key_questions, align_questions, target_template)


def _calibrate_stage(recipe: Recipe, pool, transfer: Transfer, band: list[int], progress: bool) -> dict:
    """fold.scale auto: the label-free scale (check-alpha first), as calibration.json holds it."""
    from ..evaluation.calibrate import measure_baseline, search_scale
    from ..method.capture import resolve_batch_size
    from ..method.pipeline import prompt_texts

    f, rt = recipe.fold, recipe.runtime
    calib_questions = transfer.key_questions[:f.calibrate_count]
    t_load = time.perf_counter()
    target_loaded = pool.get(recipe.target.model)
    calib_texts = prompt_texts(target_loaded, transfer.target_template, calib_questions, _chat(recipe),
                               recipe.target.model)
    batch_size = resolve_batch_size(rt.batch_size, target_loaded, calib_texts, rt.max_length)
    answer_start: dict = {}
    t0 = time.perf_counter()
    loading = t0 - t_load
    alpha_check = _check_reference_alpha(target_loaded, transfer.vectors, calib_texts[:8], f, batch_size, answer_start)
    t1 = time.perf_counter()
    ppl_texts = prompts.apply_template("plain", calib_questions)
    baseline = measure_baseline(target_loaded, transfer.vectors, calib_texts, ppl_texts, "paper", f.alpha, f.objective,
                                f.continuation_tokens, batch_size, known=answer_start)  # used if the same prompts
    t2 = time.perf_counter()
    calibration = search_scale(target_loaded, transfer.vectors, calib_texts, ppl_texts, "paper", f.alpha,
                                  **({"scales": tuple(f.scales)} if f.scales else {}),
                                  ppl_margin=f.ppl_margin, progress=progress, additive_layers=band,
                                  objective=f.objective, continuation_tokens=f.continuation_tokens,
                                  batch_size=batch_size, baseline=baseline).as_dict()
    if alpha_check is not None:
        calibration["alpha_check"] = alpha_check
    calibration["timings_s"] = {"load_s": round(loading, 2), "alpha_check_s": round(t1 - t0, 2), "baseline_s": round(t2 - t1, 2),
                                "search_s": round(time.perf_counter() - t2, 2)}
    return calibration


def _calibration_note(f: FoldSpec, calibration: dict) -> str:
    """The model card's line on how the scale was chosen."""
    closeness = (
        f"cross-entropy of its {f.continuation_tokens}-token continuations "
        f"{calibration['continuation_ce']:.3g}, unsteered {calibration['continuation_ce_unsteered']:.3g}"
        if f.objective == "continuation" else
        f"KL at the answer start {calibration['kl_to_reference']:.3g}, unsteered "
        f"{calibration['kl_unsteered_to_reference']:.3g}")
    return (f"label-free: closest to the paper form at alpha {f.alpha:g} on {calibration['prompts']} "
            f"prompts ({closeness}), perplexity within +{f.ppl_margin:.0%}")


def _fold_stage(recipe: Recipe, pool, transfer: Transfer, work: Path, out_dir: Path, progress: bool,
                recipe_text: str | None, card_extra: dict, clock: _Clock) -> FoldStage:
    """The optional fold: calibrate when asked, then fold (verified) into work/model."""
    from ..export.forms import export

    f = recipe.fold
    if f is None:
        pool.release()
        return FoldStage(transfer.vectors, None, None, [])
    vectors = transfer.vectors
    chosen = vectors.select(f.layers)
    def context() -> dict:  # the card's: read after the calibration adds its line
        return {"command": f"unlock-export run RECIPE.yaml OUT_DIR  # recipe {recipe.name}", "recipe": recipe_text or "",
                **card_extra}

    if form(f.mode).fits_gates:
        return _gated_fold_stage(recipe, pool, transfer, chosen, work, out_dir, progress, context(), clock)
    outputs, scale = [], f.scale
    if scale == "auto":
        with clock.stage("calibrate"):
            calibration = _calibrate_stage(recipe, pool, transfer, chosen.layers, progress)
        (work / "calibration.json").write_text(json.dumps(calibration, indent=2))
        outputs.append("calibration.json")
        scale = calibration["scale"]
        card_extra["calibration"] = _calibration_note(f, calibration)
    pool.release()  # fold's verification loads the target and the export
    t0 = time.perf_counter()
    result = export(f.mode, recipe.target.model, chosen, work / "model", scale=scale, rank=f.rank,
                  verify=f.verify, tolerance=f.tolerance, allow_pickle=recipe.runtime.allow_pickle, progress=progress,
                  card_context=context(), dtype=f.dtype)
    clock.timings["fold_s"] = time.perf_counter() - t0
    return FoldStage(chosen, scale, {**result.as_dict(), "out": str(out_dir / "model")}, [*outputs, "model"])


def _gated_fold_stage(recipe: Recipe, pool, transfer: Transfer, chosen, work: Path, out_dir: Path, progress: bool,
                      context: dict, clock: _Clock) -> FoldStage:
    """fold.mode gated-lora: the gates fitted on the target (float32), the multiplier chosen when it is
    auto, then the LoRA (or with merge the checkpoint) written into work/model, verified."""
    from ..api import fold_gated_lora
    from ..method.gate import GateSettings

    f = recipe.fold
    settings = GateSettings(prompts=f.gate_prompts, count=f.gate_count, offset=f.gate_offset, heldout=f.gate_heldout,
                            template=transfer.target_template, chat=recipe.prompts.chat, system=recipe.prompts.system, alpha=f.alpha, multiplier=f.multiplier,
                            ppl_margin=f.ppl_margin, rank=f.rank or 1)
    pool.release()  # the gate fit loads the target in float32 on its own
    t0 = time.perf_counter()
    result = fold_gated_lora(recipe.target.model, chosen, work / "model", settings, merge=f.merge, verify=f.verify,
                             tolerance=f.tolerance, progress=progress, card_context=context, dtype=f.dtype)
    clock.timings["fold_s"] = time.perf_counter() - t0
    return FoldStage(chosen, result.scale, {**result.as_dict(), "out": str(out_dir / "model")}, ["model"])


def _summary(recipe: Recipe, transfer: Transfer, out_dir: Path, outputs: list[str], clock: _Clock,
             fold_info: dict | None, gguf_info: dict | None, diagnostics_line: str | None) -> dict:
    key, lrmap, vectors = transfer.key, transfer.lrmap, transfer.vectors
    return {
        "recipe": recipe.name,
        "target": recipe.target.model,
        "paper_alpha": recipe.fold.alpha if recipe.fold else None,  # the reference the fold was matched to
        "outputs": {name: str(out_dir / name) for name in outputs},
        "source_layers": lrmap.source_layer_count,
        "target_layers": lrmap.target_layer_count,
        "rank": lrmap.rank,
        "n_prompts_key": len(transfer.key_questions),
        "n_prompts_align": len(transfer.align_questions),
        "key_norms": [round(float(v), 4) for v in key.vectors.norm(dim=1)],
        "vector_norms": {str(k): round(v, 4) for k, v in vectors.norms().items()},
        "map_bytes": {"factors": lrmap.factor_bytes(), "dense_equivalent": lrmap.dense_bytes()},
        "timings_s": {k: round(v, 2) for k, v in clock.timings.items()},
        "fold": fold_info,
        "gguf": gguf_info,
        "diagnostics": diagnostics_line,
        "serve": [c.as_dict() for c in _serve(recipe, out_dir, outputs)],
    }


def _diagnostics(recipe: Recipe, pool, key, lrmap, vectors, key_questions: list[str], target_template: str) -> dict:
    """Held-out map fit and, for a prompt-contrast key, the target's own key (extra captures)."""
    from ..evaluation import diagnostics
    from ..method.pipeline import capture_states

    d, p = recipe.diagnostics, recipe.prompts
    locked, unlocked = recipe.source.locked, recipe.source.unlocked
    used = max(p.key_count, p.align_count or p.key_count)
    heldout_q = prompts.load_questions(p.path, p.field, d.heldout_count, p.offset + used)
    # the target first: align left it loaded (and its locked capture is usually align's, from the checkpoint)
    chat = _chat(recipe)
    target_heldout = capture_states(pool, recipe.target.model, target_template, heldout_q, "capture target (held out)",
                                    chat=chat)
    target_key = None
    contrast = recipe.source.pairs is not None or (locked.model == unlocked.model and (
        locked.template != unlocked.template or _chat(recipe, locked) != _chat(recipe, unlocked)))
    if d.target_key and contrast:
        # the target's own key, read the way the source's was (same pairs or templates, method, position)
        target_key = _key(recipe, pool, recipe.target.model, key_questions)[0].vectors
    heldout = (capture_states(pool, locked.model, locked.template, heldout_q, "capture source (held out)", chat=chat),
               target_heldout)
    pool.release()
    return diagnostics.transfer_diagnostics(key, lrmap, vectors, heldout, target_key)


def _check_reference_alpha(target_loaded, vectors, texts: list[str], f: FoldSpec, batch_size,
                           answer_start: dict | None = None) -> dict | None:
    """`check-alpha` at fold.alpha before the calibration matches a fold to the paper form: a reference
    that breaks the target's text is refused, not matched."""
    if not f.check_alpha:
        return None
    from ..evaluation.calibrate import check_alphas

    result = check_alphas(target_loaded, vectors, texts, (f.alpha,), f.alpha_margin, batch_size=batch_size,
                          answer_start=answer_start)
    row = result["table"][0]
    if not row["allowed"]:
        raise UserError(f"fold.alpha {f.alpha:g} breaks the target's text: the paper form's continuations score "
                        f"x{row['fluency_ratio']:.3g} the unsteered perplexity (fold.alpha_margin allows "
                        f"x{1 + f.alpha_margin:g}); lower fold.alpha (`unlock-export check-alpha` lists the alphas "
                        f"that pass) or set fold.check_alpha: false")
    return {"alpha": f.alpha, "fluency_ratio": row["fluency_ratio"], "margin": f.alpha_margin,
            "prompts": result["prompts"], "tokens": result["tokens"]}


def _llamacpp_files(g: GgufSpec, work: Path, vectors, fold_scale: float | None) -> dict:
    """The gguf step: the fold patched into the target's GGUF (or the gated-lora adapter as a LoRA GGUF),
    and the vectors as a control vector, each by its converter (export.converters)."""
    from ..export.converters import write_gguf

    info: dict = {"files": []}
    if g.lora:
        written = write_gguf("lora", work / "model", work / "lora.gguf", base=g.base)
        info["lora"] = {"rank": written["rank"], "architecture": written["architecture"]}
        info["files"].append("lora.gguf")
    if g.model:
        patched = write_gguf("patch", work / "model", work / "model.gguf", base=g.base)
        info["model"] = {"base": patched["base"], "biases_added": len(patched["biases_added"])}
        info["files"].append("model.gguf")
    if g.control_vector:
        scale = g.scale if g.scale is not None else fold_scale
        steered = [layer for layer in vectors.layers if layer != 0]  # llama.cpp never steers layer 0
        if not steered:
            raise UserError("gguf.control_vector: the vectors steer only layer 0, which llama.cpp never steers; "
                            "set vectors.layers to include layers from 1")
        written = write_gguf("control-vector", vectors.select(steered), work / "control-vector.gguf", scale=scale)
        info["control_vector"] = {"scale": scale, "layers": written["layers"],
                                  "dropped_layer_0": 0 in vectors.layers}
        info["files"].append("control-vector.gguf")
    return info


def _target_gguf(recipe: Recipe) -> str | None:
    """The unsteered target's GGUF, which a control vector is served with (None when it has none)."""
    from ..models import zoo

    model = recipe.target.model
    if model.startswith(zoo.ZOO_PREFIX) or model in zoo.ZOO:
        return str(zoo.model_path(zoo.lookup(model)))
    if model.endswith(".gguf"):
        return model
    return recipe.gguf.base if recipe.gguf is not None else None


def _serve(recipe: Recipe, out_dir: Path, outputs: list[str]):
    from ..export.serving import serve_commands

    f = recipe.fold
    written = form(f.mode) if f is not None else None
    gated_lora = written is not None and written.fits_gates and not f.merge and "model" in outputs
    return serve_commands(
        model_dir=out_dir / "model" if "model" in outputs else None,
        model_gguf=out_dir / "model.gguf" if "model.gguf" in outputs else None,
        control_vector=out_dir / "control-vector.gguf" if "control-vector.gguf" in outputs else None,
        target_gguf=_target_gguf(recipe), adapter=written is not None and written.peft_type(f.merge) is not None,
        lora_gguf=out_dir / "lora.gguf" if "lora.gguf" in outputs else None,
        lora_dir=out_dir / "model" if gated_lora else None, lora_base=recipe.target.model,
        lora_rank=(f.rank or 1) if gated_lora else 1)


def _push(spec: PushSpec, out_dir: Path) -> dict:
    """The push step runs after the outputs are in place: a failed push keeps them, and says how to retry."""
    from ..errors import ExportFailure
    from ..export.card import base_model_id
    from ..export.hub import push

    artifact = out_dir / ("model" if spec.artifact == "model" else "vectors.safetensors")
    base_model = spec.base_model
    if base_model is None and artifact.is_dir():
        target = json.loads((artifact / "unlock.json").read_text()).get("target", "")
        base_model = base_model_id(target) if base_model_id(target).count("/") == 1 else None
    try:
        report = push(artifact, spec.repo_id, private=spec.private, revision=spec.revision, base_model=base_model)
    except UserError as exc:
        retry = (f"unlock-export push {artifact} --repo-id {spec.repo_id}"
                 + (f" --revision {spec.revision}" if spec.revision else "") + (" --private" if spec.private else ""))
        raise ExportFailure(f"{exc} (the outputs in {out_dir} are complete; push them with: {retry})") from exc
    return {k: report[k] for k in ("repo_id", "revision", "commit_url", "commit") if k in report}
