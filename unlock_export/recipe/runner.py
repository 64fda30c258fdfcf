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
    from ..api import LowRankMap, MasterKey, SteeringVectors


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

    from ..api import compare_arms
    from ..evaluation.compare import CompareRequest
    from .outputs import run_arms

    e = recipe.evaluate
    _, arms = run_arms(out_dir, e.paper)
    arms = ["unsteered", *arms, *(f"{name}={what}" for name, what in e.arms.items())]
    request = {f.name: getattr(e, f.name) for f in dataclasses.fields(CompareRequest) if hasattr(e, f.name)}
    request.update(budgets=tuple(e.budgets), chat=recipe.prompts.chat)
    try:
        results = compare_arms(recipe.target.model, arms, out_dir / "compare", confirm=e.confirm,
                               command=["unlock-export", "run", f"# recipe {recipe.name}: evaluate"],
                               options=recipe.runtime, progress=progress, **request)
    except KeyboardInterrupt as exc:  # the outputs are in place; `run --resume` continues the comparison
        from .._io import note_progress

        note_progress(exc, out_dir / "compare")
        raise
    return {"results": str(out_dir / "compare" / "results.json"), "report": str(out_dir / "compare" / "report.md"),
            "title": results["title"], "table": [{k: row.get(k) for k in (
                "arm", "budget", "correct", "n", "accuracy", "won", "lost", "p_holm")} for row in results["table"]]}


def _run(recipe: Recipe, work: Path, out_dir: Path, progress: bool, recipe_text: str | None,
         checkpoint_dir: Path) -> dict:
    clock = _Clock()
    steps = _Steps(recipe, progress, checkpoint_dir)
    transfer = _transfer(steps, work, clock)
    (work / "recipe.yaml").write_text(recipe_text or yaml.safe_dump(recipe.model_dump(), sort_keys=False))
    outputs = ["key.safetensors", "map.safetensors", "vectors.safetensors"]
    card_extra: dict = {}
    diag = None
    if recipe.diagnostics.enabled:
        with clock.stage("diagnostics"):
            diag = _diagnostics(steps, transfer, work)
            outputs += diag["files"]
            card_extra["diagnostics"] = diag["summary"]
    folded = _fold_stage(steps, transfer, work, out_dir, recipe_text, card_extra, clock)
    outputs += folded.outputs
    gguf_info = None
    if recipe.gguf is not None:
        with clock.stage("gguf"):
            gguf_info = _llamacpp_files(recipe.gguf, work, folded.vectors, folded.scale)
        outputs += list(gguf_info["files"])
    summary = _summary(recipe, transfer, out_dir, outputs, clock, folded.info, gguf_info,
                       diag["summary"] if diag else None)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@dataclass(frozen=True)
class _Steps:
    """What every stage's call into the API shares: the recipe, its runtime, and the run's progress folder
    (a capture finished there is read back, not run again, by a later stage that asks for the same rows)."""

    recipe: Recipe
    progress: bool
    checkpoint_dir: Path

    @property
    def common(self) -> dict:
        return {"options": self.recipe.runtime, "progress": self.progress, "checkpoint_dir": self.checkpoint_dir}


def _key(steps: _Steps, model: str, key_questions: list[str]):
    """The Master Key on `model` (the source's, or the target's own for the diagnostics) the recipe's way:
    its pairs, or its two variants' prompt contrast."""
    from ..api import master_key

    recipe = steps.recipe
    source, p = recipe.source, recipe.prompts
    common = {"method": recipe.key.method, "chat": p.chat, "system": p.system, **steps.common}
    if source.pairs is not None:
        return master_key(model, pairs=source.pairs.path, count=source.pairs.count, offset=source.pairs.offset,
                          **common)
    locked, unlocked = source.locked, source.unlocked
    same = locked.model == unlocked.model
    return master_key(model if same else locked.model, model if same else unlocked.model, prompts=key_questions,
                      locked_template=locked.template, unlocked_template=unlocked.template,
                      answer_tokens=recipe.key.answer_tokens, locked_system=locked.system,
                      unlocked_system=unlocked.system, **common)


def _transfer(steps: _Steps, work: Path, clock: _Clock) -> Transfer:
    """key -> align -> project; the key, map and vectors files written into `work`."""
    from ..api import fit_map

    recipe = steps.recipe
    p = recipe.prompts
    key_questions = prompts.load_questions(p.path, p.field, p.key_count, p.offset)
    align_count = p.align_count or p.key_count
    align_questions = key_questions if align_count == p.key_count else prompts.load_questions(
        p.path, p.field, align_count, p.offset)
    locked, unlocked, pairs = recipe.source.locked, recipe.source.unlocked, recipe.source.pairs
    target_template = recipe.target.template or locked.template
    with clock.stage("key"):
        key = _key(steps, locked.model, key_questions)
    key.save(work / "key.safetensors")
    with clock.stage("align"):
        by_format = recipe.align.contrast and pairs is None  # the prompts in both of the key's formats
        lrmap = fit_map(locked.model, recipe.target.model, prompts=align_questions, rank=recipe.align.rank,
                        source_template=locked.template, target_template=target_template, chat=p.chat,
                        system=(locked.system or p.system) if by_format else p.system,
                        contrast_template=unlocked.template if by_format else None,
                        contrast_system=(unlocked.system or p.system) if by_format and p.chat else None,
                        contrast_pairs=prompts.load_pairs(pairs.path, pairs.count, pairs.offset)
                        if recipe.align.contrast and pairs is not None else None, **steps.common)
    lrmap.save(work / "map.safetensors")
    vectors = lrmap.project(key, recipe.vectors.layers, recipe.vectors.site)
    vectors.provenance["recipe"] = recipe.name
    vectors.save(work / "vectors.safetensors")
    return Transfer(key, lrmap, vectors, key_questions, align_questions, target_template)


def _calibrate_stage(steps: _Steps, transfer: Transfer, band: list[int]) -> dict:
    """fold.scale auto: the label-free scale (the alpha checked first), as calibration.json holds it."""
    from ..api import calibrate_scale
    from ..errors import AlphaBreaksText

    recipe = steps.recipe
    f, p = recipe.fold, recipe.prompts
    try:
        return calibrate_scale(recipe.target.model, transfer.vectors, prompts=transfer.key_questions,
                               count=f.calibrate_count, alpha=f.alpha, template=transfer.target_template,
                               objective=f.objective, scales=f.scales, ppl_margin=f.ppl_margin, layers=band,
                               continuation_tokens=f.continuation_tokens, chat=p.chat, system=p.system,
                               alpha_margin=f.alpha_margin if f.check_alpha else None, options=recipe.runtime,
                               progress=steps.progress).as_dict()
    except AlphaBreaksText as exc:
        raise UserError(f"fold.alpha {exc.alpha:g} breaks the target's text: the paper form's continuations score "
                        f"x{exc.ratio:.3g} the unsteered perplexity (fold.alpha_margin allows x{1 + exc.margin:g}); "
                        "lower fold.alpha (`unlock-export check-alpha` lists the alphas that pass) or set "
                        "fold.check_alpha: false") from None


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


def _fold_stage(steps: _Steps, transfer: Transfer, work: Path, out_dir: Path, recipe_text: str | None,
                card_extra: dict, clock: _Clock) -> FoldStage:
    """The optional fold: calibrate when asked, then fold (verified) into work/model."""
    from ..api import fold

    recipe, progress = steps.recipe, steps.progress
    f = recipe.fold
    if f is None:
        return FoldStage(transfer.vectors, None, None, [])
    vectors = transfer.vectors
    chosen = vectors.select(f.layers)
    def context() -> dict:  # the card's: read after the calibration adds its line
        return {"command": f"unlock-export run RECIPE.yaml OUT_DIR  # recipe {recipe.name}", "recipe": recipe_text or "",
                **card_extra}

    if form(f.mode).fits_gates:
        return _gated_fold_stage(steps, transfer, chosen, work, out_dir, context(), clock)
    outputs, scale = [], f.scale
    if scale == "auto":
        with clock.stage("calibrate"):
            calibration = _calibrate_stage(steps, transfer, chosen.layers)
        (work / "calibration.json").write_text(json.dumps(calibration, indent=2))
        outputs.append("calibration.json")
        scale = calibration["scale"]
        card_extra["calibration"] = _calibration_note(f, calibration)
    t0 = time.perf_counter()
    result = fold(recipe.target.model, chosen, work / "model", scale=scale, mode=f.mode, rank=f.rank, verify=f.verify,
                  tolerance=f.tolerance, allow_pickle=recipe.runtime.allow_pickle, progress=progress,
                  card_context=context(), dtype=f.dtype)
    clock.timings["fold_s"] = time.perf_counter() - t0
    return FoldStage(chosen, scale, {**result.as_dict(), "out": str(out_dir / "model")}, [*outputs, "model"])


def _gated_fold_stage(steps: _Steps, transfer: Transfer, chosen, work: Path, out_dir: Path, context: dict,
                      clock: _Clock) -> FoldStage:
    """fold.mode gated-lora: the gates fitted on the target (float32), the multiplier chosen when it is
    auto, then the LoRA (or with merge the checkpoint) written into work/model, verified."""
    from ..api import fold_gated_lora
    from ..settings import GateSettings

    recipe, f = steps.recipe, steps.recipe.fold
    settings = GateSettings(prompts=f.gate_prompts, count=f.gate_count, offset=f.gate_offset, heldout=f.gate_heldout,
                            template=transfer.target_template, chat=recipe.prompts.chat, system=recipe.prompts.system, alpha=f.alpha, multiplier=f.multiplier,
                            ppl_margin=f.ppl_margin, rank=f.rank or 1)
    t0 = time.perf_counter()
    result = fold_gated_lora(recipe.target.model, chosen, work / "model", settings, merge=f.merge, verify=f.verify,
                             tolerance=f.tolerance, progress=steps.progress, card_context=context, dtype=f.dtype)
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


def _diagnostics(steps: _Steps, transfer: Transfer, work: Path) -> dict:
    """Held-out map fit and, for a prompt or pairs contrast, the target's own key read the way the source's
    was; diagnostics.json (and .png) written into `work`."""
    from ..api import diagnose_transfer

    recipe = steps.recipe
    d, p = recipe.diagnostics, recipe.prompts
    locked = recipe.source.locked
    used = max(p.key_count, p.align_count or p.key_count)
    target_key = (_key(steps, recipe.target.model, transfer.key_questions)
                  if d.target_key and recipe.target_can_take_the_key else None)
    return diagnose_transfer(transfer.key, transfer.lrmap, transfer.vectors, locked.model, recipe.target.model,
                             prompts=p.path, field=p.field, count=d.heldout_count, offset=p.offset + used,
                             source_template=locked.template, target_template=transfer.target_template, chat=p.chat,
                             system=p.system, target_key=target_key, out=work, **steps.common)


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
    from ..api import zoo_models

    model = recipe.target.model
    zoo = {m["name"]: m["path"] for m in zoo_models()}
    if model.removeprefix("zoo:") in zoo:
        return zoo[model.removeprefix("zoo:")]
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
    from ..api import push_to_hub
    from ..errors import ExportFailure

    artifact = out_dir / ("model" if spec.artifact == "model" else "vectors.safetensors")
    try:
        report = push_to_hub(artifact, spec.repo_id, private=spec.private, revision=spec.revision,
                             base_model=spec.base_model)
    except UserError as exc:
        retry = (f"unlock-export push {artifact} --repo-id {spec.repo_id}"
                 + (f" --revision {spec.revision}" if spec.revision else "") + (" --private" if spec.private else ""))
        raise ExportFailure(f"{exc} (the outputs in {out_dir} are complete; push them with: {retry})") from exc
    return {k: report[k] for k in ("repo_id", "revision", "commit_url", "commit") if k in report}
