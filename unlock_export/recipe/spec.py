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

from .. import prompts
from ..errors import UserError
from ..models.runtime import RuntimeOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _doc(text: str, **kwargs):
    """A field with its documentation (docs/recipes.md is generated from these)."""
    return Field(description=text, **kwargs)


class Variant(_Strict):
    model: str = _doc("Model: a local folder with config.json, a .gguf file, zoo:NAME or a Hub id.")
    template: str = _doc("Prompt template: direct, cot, plain, or a format string containing {question}.",
                         default="direct")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        prompts.template_text(value)  # raises UserError for bad templates
        return value


class SourceSpec(_Strict):
    """The two source variants whose difference is the Master Key."""

    locked: Variant = _doc("The capability-absent variant (a base checkpoint, or the direct prompt).")
    unlocked: Variant = _doc("The capability-present variant (the post-trained checkpoint, or the CoT prompt).")


class TargetSpec(_Strict):
    """The model that receives the capability."""

    model: str = _doc("Model: a local folder with config.json, a .gguf file, zoo:NAME or a Hub id.")
    template: Optional[str] = _doc("Template of the target's prompts (default: the source's locked template).",
                                   default=None)


class PromptSpec(_Strict):
    """Unlabeled prompts shared by the key and the alignment (answers are never read)."""

    path: str = _doc("builtin:gsm8k-train, builtin:gsm8k-dev, builtin:arithmetic, or a JSONL file (plain or .gz).",
                     default="builtin:arithmetic")
    field: str = _doc("JSONL field holding the prompt text.", default="question")
    key_count: int = _doc("Prompts for the Master Key.", default=256, ge=1)
    align_count: Optional[int] = _doc("Prompts for the alignment (default: key_count, the same prompts reused).",
                                      default=None, ge=1)
    offset: int = _doc("Skip this many prompts first.", default=0, ge=0)

    @field_validator("path")
    @classmethod
    def _builtin(cls, value: str) -> str:
        if prompts.is_builtin(value) and value not in prompts.BUILTIN_NAMES:
            raise ValueError(f"unknown builtin data set '{value}': use {', '.join(prompts.BUILTIN_NAMES)}")
        return value


class KeySpec(_Strict):
    """How the Master Key is read."""

    method: Literal["mean", "pca"] = _doc("Aggregate the differences by their mean, or their first principal "
                                          "direction with a sign fix.", default="mean")
    answer_tokens: int = _doc("0: the last prompt token (the paper's key). K > 0: the mean over the last prompt "
                              "token and the unlocked variant's first K greedy answer tokens.", default=0, ge=0)


class AlignSpec(_Strict):
    """The per-layer low-rank map from source to target."""

    rank: int = _doc("Subspace rank k of each layer's map.", default=16, ge=1)


class VectorsSpec(_Strict):
    """Which target layers get a steering vector, and where it is added."""

    layers: Union[str, list[int]] = _doc("all, A-B (negative counts from the end: 1--1 is every layer but 0), "
                                         "or a list of layer numbers.", default="all")
    site: Literal["layer_output", "post_attention"] = _doc("Where the vector is added in each layer.",
                                                           default="layer_output")


class FoldSpec(_Strict):
    """Optional: fold the vectors into the target's weights (written to OUT_DIR/model), verified."""

    mode: Literal["bias", "adapter"] = _doc("bias: a standalone checkpoint; adapter: a PEFT LoRA with lora_bias.",
                                            default="bias")
    scale: Union[float, Literal["auto"]] = _doc(
        "Offset = scale * vector. auto: the label-free calibration (closest to the paper form at `alpha` by "
        "`objective`, perplexity within `ppl_margin`).", default="auto")
    alpha: float = _doc("The paper form's strength that the calibration matches.", default=0.1, gt=0)
    scales: Optional[list[float]] = _doc("scale auto: the grid searched, ascending, then refined around the best "
                                         "(default: 0, then 1/256 to 64 in sqrt(2) steps).", default=None,
                                         min_length=1)
    objective: Literal["answer-start", "continuation"] = _doc(
        "answer-start: KL of the next-token distribution at the last prompt token; continuation: cross-entropy "
        "of the paper form's greedy continuations.", default="answer-start")
    continuation_tokens: int = _doc("continuation: tokens of each paper-form continuation scored.", default=32, ge=1)
    calibrate_count: int = _doc("Prompts (the first of the key's) the calibration reads.", default=32, ge=1)
    ppl_margin: float = _doc("Allowed relative rise of perplexity on the plain prompts (0.10 = +10%).",
                             default=0.10, ge=0)
    check_alpha: bool = _doc("Before calibrating, check that the paper form at `alpha` still writes text "
                             "(`check-alpha` on 8 prompts); refuse to calibrate against it if not.", default=True)
    alpha_margin: float = _doc("check_alpha: allowed relative rise of the continuations' perplexity.",
                               default=1.0, ge=0)
    rank: int = _doc("adapter: LoRA rank.", default=8, ge=1)
    layers: Optional[Union[str, list[int]]] = _doc("Fold only these layers of the vectors (default: all of them).",
                                                   default=None)
    verify: bool = _doc("Reload the export with the stock library and compare its logits with the hooks.",
                        default=True)
    tolerance: float = _doc("verify: largest |dlogit| allowed (float32).", default=1e-3, gt=0)


class GgufSpec(_Strict):
    """Optional: llama.cpp files written beside the outputs."""

    model: bool = _doc("OUT_DIR/model.gguf: the folded checkpoint patched into the target's GGUF (quantization "
                       "kept); needs fold.mode bias, and a GGUF or zoo target or `base`.", default=False)
    base: Optional[str] = _doc("model: the target's GGUF file (default: the target itself when it is a GGUF or "
                               "zoo model).", default=None)
    control_vector: bool = _doc("OUT_DIR/control-vector.gguf: the vectors as a llama.cpp control vector at the "
                                "fold's scale (or `scale`), on the folded layers except layer 0.", default=False)
    scale: Optional[float] = _doc("control_vector: the scale baked in (default: the fold's, calibrated or given; "
                                  "required without a fold step).", default=None)


class DiagnosticsSpec(_Strict):
    """Per-layer diagnostics written beside the outputs (diagnostics.json, diagnostics.png)."""

    enabled: bool = _doc("Write the diagnostics.", default=True)
    heldout_count: int = _doc("Prompts after the key/align ones, never used to fit the map, for the held-out fit.",
                              default=32, ge=2)
    target_key: bool = _doc("Also compute the target's own key by the same prompt contrast, to compare directions "
                            "(prompt-contrast keys only).", default=True)


class PushSpec(_Strict):
    """Optional last step: push the folded model (or the vectors file) to the Hugging Face Hub."""

    repo_id: str = _doc("Hub repo USER/NAME (created if missing).")
    artifact: Literal["model", "vectors"] = _doc("What to push: the folded model folder or the vectors file.",
                                                 default="model")
    private: bool = _doc("Create the repo as private.", default=False)
    revision: Optional[str] = _doc("Branch to commit to (default main).", default=None)
    base_model: Optional[str] = _doc("Hub id for the card's base_model (default: the target's, zoo models "
                                     "included).", default=None)

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        from ..export.hub import validate_repo_id

        return validate_repo_id(value)


class Recipe(_Strict):
    """A whole run: key -> align -> project, then optionally fold, GGUF files and a Hub push."""

    name: str = _doc("Recipe name (letters, digits, . _ -), recorded in the outputs.", default="unlock",
                     pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = _doc("Free text.", default="")
    source: SourceSpec = _doc("The source variants.")
    target: TargetSpec = _doc("The target model.")
    prompts: PromptSpec = _doc("The unlabeled prompts.", default=PromptSpec())
    key: KeySpec = _doc("The Master Key.", default=KeySpec())
    align: AlignSpec = _doc("The alignment.", default=AlignSpec())
    vectors: VectorsSpec = _doc("The projected steering vectors.", default=VectorsSpec())
    fold: Optional[FoldSpec] = _doc("Fold step (off when absent).", default=None)
    gguf: Optional[GgufSpec] = _doc("llama.cpp files (off when absent).", default=None)
    diagnostics: DiagnosticsSpec = _doc("Diagnostics.", default=DiagnosticsSpec())
    push: Optional[PushSpec] = _doc("Hub push (off when absent).", default=None)
    runtime: RuntimeOptions = _doc("How models run (the same settings as the CLI's runtime flags).",
                                   default=RuntimeOptions())


def _first_error(exc: ValidationError, path: Path) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"recipe {path}: unknown key '{where}'; check the spelling against docs/recipes.md or `unlock-export run --help`"
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
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever the reader says
        raise UserError(f"recipe {path} is not valid YAML{where}: {problem}")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping with source, target, ... keys")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(_first_error(exc, path))
    if recipe.push is not None and recipe.push.artifact == "model" and recipe.fold is None:
        raise UserError(f"recipe {path}: push.artifact 'model' needs a fold step; add fold: or push artifact: vectors")
    g = recipe.gguf
    if g is not None and g.model and (recipe.fold is None or recipe.fold.mode != "bias"):
        raise UserError(f"recipe {path}: gguf.model patches a bias fold into the target's GGUF; add fold: with "
                        "mode: bias, or set gguf.model: false")
    if g is not None and g.control_vector and g.scale is None and recipe.fold is None:
        raise UserError(f"recipe {path}: gguf.control_vector needs a scale: add gguf.scale or a fold step")
    if g is not None and g.control_vector and recipe.vectors.site != "layer_output":
        raise UserError(f"recipe {path}: gguf.control_vector needs vectors.site layer_output (llama.cpp adds "
                        "control vectors to layer outputs)")
    base = path.parent
    if not recipe.prompts.path.startswith(prompts.BUILTIN_PREFIX) and not os.path.isabs(recipe.prompts.path):
        recipe.prompts.path = str((base / recipe.prompts.path).resolve())  # always a file, never a Hub id
    for variant in (recipe.source.locked, recipe.source.unlocked):
        variant.model = _resolve_path(variant.model, base)
    recipe.target.model = _resolve_path(recipe.target.model, base)
    if g is not None and g.base is not None:
        g.base = _resolve_path(g.base, base)
    _check_inputs(recipe, path, data)
    return recipe


def _diagnostics(recipe: Recipe, pool, key, lrmap, vectors, key_questions: list[str], target_template: str) -> dict:
    """Held-out map fit and, for a prompt-contrast key, the target's own key (extra captures)."""
    from ..evaluation import diagnostics
    from ..method.pipeline import capture_states, compute_key

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
    from ..evaluation.calibrate import check_alphas

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
    from .._io import progress_folder

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
    from ..evaluation import diagnostics
    from ..method.pipeline import compute_key, compute_map, project
    from ..models.pool import ModelPool

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        timings: dict[str, float] = {}
        rt = recipe.runtime
        pool = ModelPool(rt, progress=progress, checkpoint_dir=checkpoint_dir)
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
        chosen, scale = vectors, None
        if recipe.fold is None:
            pool.release()
        else:
            from ..export.fold import fold
            from ..method.vectors import parse_layers

            f = recipe.fold
            t0 = time.perf_counter()
            chosen = vectors if f.layers is None else vectors.select(parse_layers(f.layers, vectors.layer_count))
            scale = f.scale
            if scale == "auto":
                from ..evaluation.calibrate import calibrate_scale
                from ..method.capture import resolve_batch_size

                calib_questions = key_questions[:f.calibrate_count]
                calib_texts = prompts.apply_template(target_template, calib_questions)
                target_loaded = pool.get(recipe.target.model)
                batch_size = resolve_batch_size(rt.batch_size, target_loaded, calib_texts, rt.max_length)
                alpha_check = _check_reference_alpha(target_loaded, vectors, calib_texts[:8], f, batch_size)
                calibration = calibrate_scale(target_loaded, vectors, calib_texts,
                                              prompts.apply_template("plain", calib_questions), "paper", f.alpha,
                                              **({"scales": tuple(f.scales)} if f.scales else {}),
                                              ppl_margin=f.ppl_margin, progress=progress, additive_layers=chosen.layers,
                                              objective=f.objective, continuation_tokens=f.continuation_tokens,
                                              batch_size=batch_size).as_dict()
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
        gguf_info = None
        if recipe.gguf is not None:
            t0 = time.perf_counter()
            gguf_info = _llamacpp_files(recipe.gguf, work, chosen, scale)
            outputs += list(gguf_info["files"])
            timings["gguf_s"] = time.perf_counter() - t0
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
            "gguf": gguf_info,
            "diagnostics": diagnostics.summary_line(diag) if diag else None,
            "serve": [c.as_dict() for c in _serve(recipe, out_dir, outputs, gguf_info)],
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _llamacpp_files(g: GgufSpec, work: Path, vectors, fold_scale: float | None) -> dict:
    """The gguf step: the fold patched into the target's GGUF, and the vectors as a control vector."""
    from ..export.gguf import patch_gguf, write_control_vector

    info: dict = {"files": []}
    if g.model:
        patched = patch_gguf(work / "model", work / "model.gguf", base=g.base)
        info["model"] = {"base": patched["base"], "biases_added": len(patched["biases_added"])}
        info["files"].append("model.gguf")
    if g.control_vector:
        scale = g.scale if g.scale is not None else fold_scale
        steered = [layer for layer in vectors.layers if layer != 0]  # llama.cpp never steers layer 0
        if not steered:
            raise UserError("gguf.control_vector: the vectors steer only layer 0, which llama.cpp never steers; "
                            "set vectors.layers to include layers from 1")
        written = write_control_vector(vectors.select(steered), work / "control-vector.gguf", scale=scale)
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


def _serve(recipe: Recipe, out_dir: Path, outputs: list[str], gguf_info: dict | None):
    from ..export.serving import serve_commands

    return serve_commands(
        model_dir=out_dir / "model" if "model" in outputs else None,
        model_gguf=out_dir / "model.gguf" if "model.gguf" in outputs else None,
        control_vector=out_dir / "control-vector.gguf" if "control-vector.gguf" in outputs else None,
        target_gguf=_target_gguf(recipe), adapter=recipe.fold is not None and recipe.fold.mode == "adapter")


def _push(spec: PushSpec, out_dir: Path) -> dict:
    """The push step runs after the outputs are in place: a failed push keeps them, and says how to retry."""
    from ..errors import ExportFailure
    from ..export.card import _base_model_id
    from ..export.hub import push

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
