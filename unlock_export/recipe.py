"""YAML recipes: the whole pipeline in one validated file (mergekit style).

Relative paths in a recipe (prompt files, local models) are resolved against the recipe's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import diagnostics, prompts
from ._io import progress_folder
from .errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Strict):
    model: str
    template: str = "direct"

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        prompts.template_text(value)  # raises UserError for bad templates
        return value


class SourceSpec(_Strict):
    locked: Variant
    unlocked: Variant


class TargetSpec(_Strict):
    model: str
    template: Optional[str] = None  # default: the source's locked template


class PromptSpec(_Strict):
    path: str = "builtin:arithmetic"
    field: str = "question"
    key_count: int = Field(256, ge=1)
    align_count: Optional[int] = Field(None, ge=1)  # default: key_count (same prompts reused)
    offset: int = Field(0, ge=0)


class KeySpec(_Strict):
    method: Literal["mean", "pca"] = "mean"
    answer_tokens: int = Field(0, ge=0)  # 0: the last prompt token (paper); K: the answer's first K tokens


class AlignSpec(_Strict):
    rank: int = Field(16, ge=1)


class VectorsSpec(_Strict):
    layers: Union[str, list[int]] = "all"
    site: Literal["layer_output", "post_attention"] = "layer_output"


class FoldSpec(_Strict):
    """Optional last step: fold the vectors into the target (written to OUT_DIR/model)."""

    mode: Literal["bias", "adapter"] = "bias"
    # "auto": label-free calibration (closest to the paper form at `alpha` by `objective`,
    # perplexity within `ppl_margin`); or a number
    scale: Union[float, Literal["auto"]] = "auto"
    alpha: float = Field(0.1, gt=0)
    objective: Literal["answer-start", "continuation"] = "answer-start"
    continuation_tokens: int = Field(32, ge=1)
    calibrate_count: int = Field(32, ge=1)
    ppl_margin: float = Field(0.10, ge=0)
    # before calibrating: does the paper form at `alpha` still write text? (`check-alpha`, 8 prompts)
    check_alpha: bool = True
    alpha_margin: float = Field(1.0, ge=0)
    rank: int = Field(8, ge=1)
    layers: Optional[Union[str, list[int]]] = None
    verify: bool = True
    tolerance: float = Field(1e-3, gt=0)


class DiagnosticsSpec(_Strict):
    """Per-layer diagnostics written beside the outputs (diagnostics.json, diagnostics.png)."""

    enabled: bool = True
    heldout_count: int = Field(32, ge=2)  # prompts after the key/align ones, never used to fit the map
    target_key: bool = True  # the target's own key by the same prompt contrast (prompt-contrast keys only)


class PushSpec(_Strict):
    """Optional last step: push the folded model (or the vectors file) to the Hugging Face Hub."""

    repo_id: str
    artifact: Literal["model", "vectors"] = "model"
    private: bool = False
    revision: Optional[str] = None
    base_model: Optional[str] = None  # Hub id for the card (default: the target's, zoo models included)

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        from .hub import validate_repo_id

        return validate_repo_id(value)


class RuntimeSpec(_Strict):
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    batch_size: Union[Literal["auto"], int] = 8  # auto: from free memory and the longest prompt

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be a positive integer or auto")
        return value
    max_length: Optional[int] = Field(None, ge=1)
    trust_remote_code: bool = False
    allow_pickle: bool = False


class Recipe(_Strict):
    name: str = Field("unlock", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = ""
    source: SourceSpec
    target: TargetSpec
    prompts: PromptSpec = PromptSpec()
    key: KeySpec = KeySpec()
    align: AlignSpec = AlignSpec()
    vectors: VectorsSpec = VectorsSpec()
    fold: Optional[FoldSpec] = None
    diagnostics: DiagnosticsSpec = DiagnosticsSpec()
    push: Optional[PushSpec] = None
    runtime: RuntimeSpec = RuntimeSpec()


def _first_error(exc: ValidationError, path: Path) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"recipe {path}: unknown key '{where}'; check the spelling against recipes/README or `unlock-export run --help`"
    if err["type"] == "missing":
        return f"recipe {path}: missing required key '{where}'"
    return f"recipe {path}: '{where}': {err['msg']}"


def _resolve_path(value: str, base: Path) -> str:
    """Resolve a relative local path against the recipe folder; leave ids, zoo names and builtins."""
    if value.startswith(("zoo:", prompts.BUILTIN_PREFIX)) or os.path.isabs(value):
        return value
    candidate = base / value
    if value.startswith(".") or candidate.exists():
        return str(candidate.resolve())
    return value


def _check_inputs(recipe: "Recipe", path: Path, raw: dict) -> None:
    """Every local path a recipe names must be an input of the right kind, checked before anything
    runs: a recipe only names inputs (outputs go to OUT_DIR), so a path that climbs out of its
    folder ('../../etc') to something that is not a prompt file or a model is refused here."""
    where = {"prompts.path": recipe.prompts.path, "source.locked.model": recipe.source.locked.model,
             "source.unlocked.model": recipe.source.unlocked.model, "target.model": recipe.target.model}
    for key, value in where.items():
        if value.startswith(("zoo:", prompts.BUILTIN_PREFIX)) or not os.path.isabs(value):
            continue  # builtins, zoo names, Hub ids
        given = _dig(raw, key)
        local = Path(value)
        if key == "prompts.path":
            ok, wanted = local.is_file(), "a JSONL prompt file"
        else:
            ok = (local.is_dir() and (local / "config.json").is_file()) or (local.is_file() and local.suffix == ".gguf")
            wanted = "a model folder with config.json or a .gguf file"
        if not ok:
            state = "does not exist" if not local.exists() else f"is not {wanted}"
            raise UserError(f"recipe {path}: {key} '{given}' (resolved to {local}) {state}; "
                            f"give {wanted}, relative to the recipe's folder or absolute")


def _dig(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"recipe {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8 YAML")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping with source, target, ... keys")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(_first_error(exc, path))
    if recipe.push is not None and recipe.push.artifact == "model" and recipe.fold is None:
        raise UserError(f"recipe {path}: push.artifact 'model' needs a fold step; add fold: or push artifact: vectors")
    base = path.parent
    if not recipe.prompts.path.startswith(prompts.BUILTIN_PREFIX) and not os.path.isabs(recipe.prompts.path):
        recipe.prompts.path = str((base / recipe.prompts.path).resolve())  # always a file, never a Hub id
    for variant in (recipe.source.locked, recipe.source.unlocked):
        variant.model = _resolve_path(variant.model, base)
    recipe.target.model = _resolve_path(recipe.target.model, base)
    _check_inputs(recipe, path, data)
    return recipe


def _diagnostics(recipe: Recipe, pool, key, lrmap, vectors, key_questions: list[str], target_template: str) -> dict:
    """Held-out map fit and, for a prompt-contrast key, the target's own key (extra captures)."""
    from .pipeline import capture_states, compute_key

    d, p = recipe.diagnostics, recipe.prompts
    locked, unlocked = recipe.source.locked, recipe.source.unlocked
    used = max(p.key_count, p.align_count or p.key_count)
    heldout_q = prompts.load_questions(p.path, p.field, d.heldout_count, p.offset + used)
    # the target first: align left it loaded (and its locked capture is usually align's, from the checkpoint)
    target_heldout = capture_states(pool, recipe.target.model, target_template, heldout_q, "capture target (held out)")
    target_key = None
    if d.target_key and locked.model == unlocked.model and locked.template != unlocked.template:
        # the target's own key, read the way the source's was (same templates, method, position)
        target_key = compute_key(pool, recipe.target.model, recipe.target.model, locked.template, unlocked.template,
                                 key_questions, recipe.key.method, recipe.key.answer_tokens)[0].vectors
    heldout = (capture_states(pool, locked.model, locked.template, heldout_q, "capture source (held out)"),
               target_heldout)
    pool.release()
    return diagnostics.transfer_diagnostics(key, lrmap, vectors, heldout, target_key)


def _check_reference_alpha(target_loaded, vectors, texts: list[str], f: FoldSpec, batch_size) -> dict | None:
    """`check-alpha` at fold.alpha before the calibration matches a fold to the paper form: a reference
    that breaks the target's text is refused, not matched."""
    if not f.check_alpha:
        return None
    from .calibrate import check_alphas

    result = check_alphas(target_loaded, vectors, texts, (f.alpha,), f.alpha_margin, batch_size=batch_size)
    row = result["table"][0]
    if not row["allowed"]:
        raise UserError(f"fold.alpha {f.alpha:g} breaks the target's text: the paper form's continuations score "
                        f"x{row['fluency_ratio']:.3g} the unsteered perplexity (fold.alpha_margin allows "
                        f"x{1 + f.alpha_margin:g}); lower fold.alpha (`unlock-export check-alpha` lists the alphas "
                        f"that pass) or set fold.check_alpha: false")
    return {"alpha": f.alpha, "fluency_ratio": row["fluency_ratio"], "margin": f.alpha_margin,
            "prompts": result["prompts"], "tokens": result["tokens"]}


def run_recipe(recipe: Recipe, out_dir: str | Path, overwrite: bool = False, progress: bool = True,
               recipe_text: str | None = None, resume: bool = False) -> dict:
    """Run key -> align -> project and write key, map, vectors and a summary into out_dir.

    Everything is written into a temporary folder beside out_dir and renamed at the end, so a
    failed run leaves no partial output. Captures keep their progress in `.OUT.partial` beside it;
    with `resume`, an interrupted run continues from there (see capture.CaptureCheckpoint).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"output folder '{out_dir}' exists: choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with progress_folder(out_dir, resume, start_over=overwrite) as checkpoint_dir:
        summary = _run(recipe, out_dir, progress, recipe_text, checkpoint_dir)
    if recipe.push is not None:
        summary["push"] = _push(recipe.push, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run(recipe: Recipe, out_dir: Path, progress: bool, recipe_text: str | None, checkpoint_dir: Path) -> dict:
    from .pipeline import ModelPool, Runtime, compute_key, compute_map, project

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        timings: dict[str, float] = {}
        rt = recipe.runtime
        pool = ModelPool(Runtime(rt.dtype, rt.device, rt.device_map, rt.batch_size, rt.max_length,
                                 rt.trust_remote_code, progress, rt.allow_pickle, checkpoint_dir))
        p = recipe.prompts
        key_questions = prompts.load_questions(p.path, p.field, p.key_count, p.offset)
        align_count = p.align_count or p.key_count
        same_prompts = align_count == p.key_count
        align_questions = key_questions if same_prompts else prompts.load_questions(p.path, p.field, align_count, p.offset)
        locked, unlocked = recipe.source.locked, recipe.source.unlocked
        target_template = recipe.target.template or locked.template

        t0 = time.perf_counter()
        key, locked_states = compute_key(pool, locked.model, unlocked.model, locked.template, unlocked.template,
                                         key_questions, recipe.key.method, recipe.key.answer_tokens)
        timings["key_s"] = time.perf_counter() - t0
        key.save(work / "key.safetensors")

        t0 = time.perf_counter()
        lrmap = compute_map(pool, locked.model, recipe.target.model, locked.template, target_template,
                            align_questions, recipe.align.rank,
                            source_states=locked_states if same_prompts and locked_states is not None else None)
        timings["align_s"] = time.perf_counter() - t0
        lrmap.save(work / "map.safetensors")

        vectors = project(key, lrmap, recipe.vectors.layers, recipe.vectors.site)
        vectors.provenance["recipe"] = recipe.name
        vectors.save(work / "vectors.safetensors")
        (work / "recipe.yaml").write_text(recipe_text or yaml.safe_dump(recipe.model_dump(), sort_keys=False))
        outputs = ["key.safetensors", "map.safetensors", "vectors.safetensors"]
        card_extra: dict = {}
        diag = None
        if recipe.diagnostics.enabled:
            t0 = time.perf_counter()
            diag = _diagnostics(recipe, pool, key, lrmap, vectors, key_questions, target_template)
            outputs += diagnostics.write(diag, work)
            card_extra["diagnostics"] = diagnostics.summary_line(diag)
            timings["diagnostics_s"] = time.perf_counter() - t0
        fold_info = None
        if recipe.fold is None:
            pool.release()
        else:
            from .fold import fold
            from .vectors import parse_layers

            f = recipe.fold
            t0 = time.perf_counter()
            chosen = vectors if f.layers is None else vectors.select(parse_layers(f.layers, vectors.layer_count))
            scale = f.scale
            if scale == "auto":
                from .calibrate import calibrate_scale

                from .capture import resolve_batch_size

                calib_questions = key_questions[:f.calibrate_count]
                calib_texts = prompts.apply_template(target_template, calib_questions)
                target_loaded = pool.get(recipe.target.model)
                batch_size = resolve_batch_size(rt.batch_size, target_loaded, calib_texts, rt.max_length)
                alpha_check = _check_reference_alpha(target_loaded, vectors, calib_texts[:8], f, batch_size)
                calibration = calibrate_scale(target_loaded, vectors, calib_texts,
                                              prompts.apply_template("plain", calib_questions), "paper", f.alpha,
                                              ppl_margin=f.ppl_margin, progress=progress, additive_layers=chosen.layers,
                                              objective=f.objective, continuation_tokens=f.continuation_tokens,
                                              batch_size=batch_size)
                if alpha_check is not None:
                    calibration["alpha_check"] = alpha_check
                (work / "calibration.json").write_text(json.dumps(calibration, indent=2))
                outputs.append("calibration.json")
                scale = calibration["scale"]
                timings["calibrate_s"] = time.perf_counter() - t0
                closeness = (
                    f"cross-entropy of its {f.continuation_tokens}-token continuations "
                    f"{calibration['continuation_ce']:.3g}, unsteered {calibration['continuation_ce_unsteered']:.3g}"
                    if f.objective == "continuation" else
                    f"KL at the answer start {calibration['kl_to_reference']:.3g}, unsteered "
                    f"{calibration['kl_unsteered_to_reference']:.3g}")
                card_extra["calibration"] = (
                    f"label-free: closest to the paper form at alpha {f.alpha:g} on {calibration['prompts']} "
                    f"prompts ({closeness}), perplexity within +{f.ppl_margin:.0%}")
            pool.release()  # fold's verification loads the target and the export
            result = fold(recipe.target.model, chosen, work / "model", scale=scale, mode=f.mode, rank=f.rank,
                          verify=f.verify, tolerance=f.tolerance, allow_pickle=rt.allow_pickle, progress=progress,
                          card_context={"command": f"unlock-export run RECIPE.yaml OUT_DIR  # recipe {recipe.name}",
                                        "recipe": recipe_text or "", **card_extra})
            timings["fold_s"] = time.perf_counter() - t0
            outputs.append("model")
            fold_info = {**result.as_dict(), "out": str(out_dir / "model")}
        summary = {
            "recipe": recipe.name,
            "outputs": {name: str(out_dir / name) for name in outputs},
            "source_layers": lrmap.source_layer_count,
            "target_layers": lrmap.target_layer_count,
            "rank": lrmap.rank,
            "n_prompts_key": len(key_questions),
            "n_prompts_align": len(align_questions),
            "key_norms": [round(float(v), 4) for v in key.vectors.norm(dim=1)],
            "vector_norms": {str(k): round(v, 4) for k, v in vectors.norms().items()},
            "map_bytes": {"factors": lrmap.factor_bytes(), "dense_equivalent": lrmap.dense_bytes()},
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "fold": fold_info,
            "diagnostics": diagnostics.summary_line(diag) if diag else None,
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _push(spec: PushSpec, out_dir: Path) -> dict:
    """The push step runs after the outputs are in place: a failed push keeps them, and says how to retry."""
    from .card import _base_model_id
    from .errors import ExportFailure
    from .hub import push

    artifact = out_dir / ("model" if spec.artifact == "model" else "vectors.safetensors")
    base_model = spec.base_model
    if base_model is None and artifact.is_dir():
        target = json.loads((artifact / "unlock.json").read_text()).get("target", "")
        base_model = _base_model_id(target) if _base_model_id(target).count("/") == 1 else None
    try:
        report = push(artifact, spec.repo_id, private=spec.private, revision=spec.revision, base_model=base_model)
    except UserError as exc:
        retry = (f"unlock-export push {artifact} --repo-id {spec.repo_id}"
                 + (f" --revision {spec.revision}" if spec.revision else "") + (" --private" if spec.private else ""))
        raise ExportFailure(f"{exc} (the outputs in {out_dir} are complete; push them with: {retry})") from exc
    return {k: report[k] for k in ("repo_id", "revision", "commit_url", "commit") if k in report}
