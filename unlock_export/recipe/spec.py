"""YAML recipes: the whole pipeline in one validated file (mergekit style).

Relative paths in a recipe (prompt files, local models) are resolved against the recipe's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import prompts
from ..errors import UserError
from ..evaluation.compare import CompareRequest
from ..evaluation.engines import engine_names
from ..export.forms import form, form_names, forms_with
from ..models.runtime import RuntimeOptions
from ..settings import CalibrationSettings, GateSettings

_COMPARE = CompareRequest()  # the evaluate stage's defaults are compare's


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _doc(text: str, **kwargs):
    """A field with its documentation (docs/recipes.md is generated from these)."""
    return Field(description=text, **kwargs)


class Variant(_Strict):
    model: str = _doc("Model: a local folder with config.json, a .gguf file, zoo:NAME or a Hub id.")
    template: str = _doc("Prompt template: direct, cot, plain, or a format string containing {question}.",
                         default="direct")
    system: Optional[str] = _doc("prompts.chat: this variant's system turn (default: prompts.system); two "
                                 "system texts make a system-prompt contrast.", default=None)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        prompts.template_text(value)  # raises UserError for bad templates
        return value


class PairsSpec(_Strict):
    """Contrastive pairs on one model, instead of two variants: the key is positive - negative."""

    path: str = _doc('JSONL rows {"positive": ..., "negative": ...} (two texts, read at the last token) or '
                     '{"prompt": ..., "positive": ..., "negative": ...} (two completions, read over their tokens).')
    model: str = _doc("The model both sides run on: a local folder, a .gguf file, zoo:NAME or a Hub id.")
    count: Optional[int] = _doc("Pairs to read (default: all of them).", default=None, ge=1)
    offset: int = _doc("Skip this many pairs first.", default=0, ge=0)
    template: str = _doc("Template of the source's alignment prompts (prompts.path).", default="direct")


class SourceSpec(_Strict):
    """The two source variants whose difference is the Master Key, or contrastive pairs."""

    locked: Optional[Variant] = _doc("The capability-absent variant (a base checkpoint, or the direct prompt).",
                                     default=None)
    unlocked: Optional[Variant] = _doc("The capability-present variant (the post-trained checkpoint, or the CoT "
                                       "prompt).", default=None)
    pairs: Optional[PairsSpec] = _doc("Contrastive pairs instead of the two variants.", default=None)

    @model_validator(mode="after")
    def _one_contrast(self) -> "SourceSpec":
        if self.pairs is not None:
            if self.locked is not None or self.unlocked is not None:
                raise ValueError("source.pairs replaces source.locked and source.unlocked: give one or the other")
            self.locked = self.unlocked = Variant(model=self.pairs.model, template=self.pairs.template)
        elif self.locked is None or self.unlocked is None:
            raise ValueError("give source.locked and source.unlocked (two variants), or source.pairs")
        return self


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
    chat: bool = _doc("Wrap every prompt (key, alignment, diagnostics, calibration) in each model's own chat "
                      "template, as a chat endpoint serves it.", default=False)
    system: Optional[str] = _doc("chat: the system turn (a variant's own `system` overrides it).", default=None)

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
    contrast: Optional[bool] = _doc(
        "Also pair the alignment prompts in the unlocked variant's format (its template and system), or with "
        "source.pairs both sides of each pair, on both models, so the map sees the contrast the key is made of "
        "and carries it (reports/contrast-alignment.md, reports/behaviours.md); not for a key from two models. "
        "Unset: on for a pairs key (source.pairs), off for a prompt contrast.", default=None)


class VectorsSpec(_Strict):
    """Which target layers get a steering vector, and where it is added."""

    layers: Union[str, list[int]] = _doc("all, A-B (negative counts from the end: 1--1 is every layer but 0), "
                                         "or a list of layer numbers.", default="all")
    site: Literal["layer_output", "post_attention"] = _doc("Where the vector is added in each layer.",
                                                           default="layer_output")


_CALIBRATION, _GATE = CalibrationSettings(), GateSettings()


class FoldSpec(_Strict):
    """Optional: fold the vectors into the target's weights (written to OUT_DIR/model), verified."""

    mode: str = _doc("What the fold writes: a registered export form (export.forms; `fold --help` says what each "
                     "writes).", default="bias", json_schema_extra={"registry": "unlock_export.export.forms:form_names"})
    scale: Union[float, Literal["auto"]] = _doc(
        "Offset = scale * vector. auto: the label-free calibration (closest to the paper form at `alpha` by "
        "`objective`, perplexity within `ppl_margin`).", default="auto")
    alpha: float = _doc("The paper form's strength that the calibration matches.", default=_CALIBRATION.alpha, gt=0)
    scales: Optional[list[float]] = _doc("scale auto: the grid searched (the perplexity guard bisected), then refined "
                                         "around the best (default: 0, then 1/256 to 64 in sqrt(2) steps).",
                                         default=_CALIBRATION.scales,
                                         min_length=1)
    objective: Literal["answer-start", "continuation"] = _doc(
        "answer-start: KL of the next-token distribution at the last prompt token; continuation: cross-entropy "
        "of the paper form's greedy continuations.", default=_CALIBRATION.objective)
    continuation_tokens: int = _doc("continuation: tokens of each paper-form continuation scored.", default=_CALIBRATION.continuation_tokens, ge=1)
    calibrate_count: int = _doc("Prompts (the first of the key's) the calibration reads.", default=_CALIBRATION.count, ge=1)
    ppl_margin: float = _doc("Allowed relative rise of perplexity on the plain prompts (0.10 = +10%).",
                             default=_CALIBRATION.ppl_margin, ge=0)
    check_alpha: bool = _doc("Before calibrating, check that the paper form at `alpha` still writes text "
                             "(`check-alpha` on 8 prompts); refuse to calibrate against it if not.", default=True)
    alpha_margin: float = _doc("check_alpha: allowed relative rise of the continuations' perplexity.",
                               default=1.0, ge=0)
    rank: Optional[int] = _doc("lora: LoRA rank (default 8); gated-lora: gates per layer, the last prompt token "
                               "and then the first rank-1 answer tokens (default 1); the other modes take none.",
                               default=None, ge=1)
    multiplier: Union[float, Literal["auto"]] = _doc(
        "gated-lora: the write is multiplier x alpha x |h| x the unit direction; auto: the multiplier closest to "
        "the paper form on the held-out gate prompts, perplexity within `ppl_margin` (no labels).", default=_GATE.multiplier)
    gate_prompts: str = _doc("gated-lora: unlabeled prompts of the target the gates are fitted on.",
                             default=_GATE.prompts)
    gate_count: int = _doc("gated-lora: prompts the gates are fitted on.", default=_GATE.count, ge=1)
    gate_offset: int = _doc("gated-lora: skip this many of `gate_prompts` first.", default=_GATE.offset, ge=0)
    gate_heldout: int = _doc("gated-lora: the next prompts, held out: they measure the gates, choose multiplier "
                             "auto and give the closeness to the paper form.", default=_GATE.heldout, ge=0)
    merge: bool = _doc("gated-lora: write the edit merged into a standalone checkpoint instead of a LoRA.",
                       default=False)
    layers: Optional[Union[str, list[int]]] = _doc("Fold only these layers of the vectors (default: all of them).",
                                                   default=None)
    verify: bool = _doc("Reload the export with the stock library and compare its logits with the hooks.",
                        default=True)
    tolerance: float = _doc("verify: largest |dlogit| allowed (float32), plus a half-precision export's floor.",
                            default=1e-3, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _doc(
        "Precision of a checkpoint's weights (mode bias, gated-lora with merge); auto: the target's own.",
        default="auto")


    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in form_names():
            raise ValueError(f"unknown mode '{value}': use {' or '.join(form_names())}")
        return value

class GgufSpec(_Strict):
    """Optional: llama.cpp files written beside the outputs."""

    model: bool = _doc("OUT_DIR/model.gguf: the folded checkpoint patched into the target's GGUF (quantization "
                       "kept); needs fold.mode bias, and a GGUF or zoo target or `base`.", default=False)
    base: Optional[str] = _doc("model: the target's GGUF file (default: the target itself when it is a GGUF or "
                               "zoo model).", default=None)
    control_vector: bool = _doc("OUT_DIR/control-vector.gguf: the vectors as a llama.cpp control vector at the "
                                "fold's scale (or `scale`), on the folded layers except layer 0.", default=False)
    scale: Optional[float] = _doc("control_vector: the scale baked in (default: the fold's, calibrated or given; "
                                  "required without a fold step or with a gated-lora fold).", default=None)
    lora: bool = _doc("OUT_DIR/lora.gguf: a gated-lora fold as a llama.cpp LoRA GGUF (`llama-server --lora`, its "
                      "scale chosen per request); needs fold.mode gated-lora without merge.", default=False)


class DiagnosticsSpec(_Strict):
    """Per-layer diagnostics written beside the outputs (diagnostics.json, diagnostics.png)."""

    enabled: bool = _doc("Write the diagnostics.", default=True)
    heldout_count: int = _doc("Prompts after the key/align ones, never used to fit the map, for the held-out fit.",
                              default=32, ge=2)
    target_key: bool = _doc("Also compute the target's own key by the same contrast, to compare directions "
                            "(a pairs key, or one source model under two templates or system texts).", default=True)


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


class EvaluateSpec(_Strict):
    """Optional last stage: `compare` on the run's outputs (OUT_DIR/compare): the unsteered target, every
    artifact the run wrote, the hooks when asked and any extra arm, paired, at each budget."""

    data: str = _doc("Questions with answers: builtin:gsm8k-dev (choose here), builtin:gsm8k-confirm (confirm "
                     "here, once), builtin:math500, builtin:agieval-math, or a JSONL file.",
                     default=_COMPARE.data)
    count: Optional[int] = _doc("The first N questions after `offset` (default: all).", default=_COMPARE.count, ge=1)
    offset: int = _doc("Skip this many questions first.", default=_COMPARE.offset, ge=0)
    task: Optional[Literal["gsm8k", "math"]] = _doc("How answers are scored (default: the data set's own).",
                                                   default=_COMPARE.task)
    budgets: list[int] = _doc("Max new tokens, each scored from one generation at the largest.",
                              default=list(_COMPARE.budgets), min_length=1)
    engine: str = _doc("The engine of the target and model arms: auto (llamacpp for a GGUF, else transformers) "
                       "or a registered engine (evaluation.engines).", default=_COMPARE.engine,
                       json_schema_extra={"registry": "unlock_export.evaluation.engines:engine_names", "extra": ["auto"]})
    paper: bool = _doc("Also the paper form's hooks at fold.alpha (slow: transformers).", default=False)
    arms: dict[str, str] = _doc("Extra arms, NAME: WHAT as `compare --arm NAME=WHAT` takes it (template:cot, "
                                "control-vector:FILE, lora:PATH, paper:VECTORS@ALPHA, a model path).", default={})
    confirm: Optional[str] = _doc("A choice record (`choose`): refuse questions it saw; the report is then a "
                                  "confirmation.", default=None)


    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value != "auto" and value not in engine_names():
            raise ValueError(f"unknown engine '{value}': use auto or {' or '.join(engine_names())}")
        return value

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
    evaluate: Optional[EvaluateSpec] = _doc("compare the outputs, paired against the target (off when absent).",
                                            default=None)
    runtime: RuntimeOptions = _doc("How models run (the same settings as the CLI's runtime flags).",
                                   default=RuntimeOptions())

    @property
    def target_can_take_the_key(self) -> bool:
        """Whether the key's contrast can be read on the target too (the diagnostics' target key): a pairs
        key, or one source model under two templates (or, through the chat template, two system texts)."""
        if self.source.pairs is not None:
            return True
        locked, unlocked, p = self.source.locked, self.source.unlocked, self.prompts
        return locked.model == unlocked.model and (locked.template != unlocked.template or (
            p.chat and (locked.system or p.system) != (unlocked.system or p.system)))


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
    pairs = recipe.source.pairs
    if pairs is not None and not Path(pairs.path).is_file():
        raise UserError(f"recipe {path}: source.pairs.path '{_dig(raw, 'source.pairs.path')}' (resolved to "
                        f"{pairs.path}) is not a file; give a JSONL file of pairs, relative to the recipe's folder")
    where = {"prompts.path": recipe.prompts.path, "target.model": recipe.target.model,
             **({"source.pairs.model": pairs.model} if pairs is not None else
                {"source.locked.model": recipe.source.locked.model,
                 "source.unlocked.model": recipe.source.unlocked.model})}
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


def _check_outputs(recipe: "Recipe", path: Path) -> None:
    """The fold, GGUF and push sections agree with each other (refused in one line, naming the key)."""
    if recipe.push is not None and recipe.push.artifact == "model" and recipe.fold is None:
        raise UserError(f"recipe {path}: push.artifact 'model' needs a fold step; add fold: or push artifact: vectors")
    f = recipe.fold
    chosen = form(f.mode) if f is not None else None
    if f is not None and f.rank is not None and chosen.default_rank is None:
        having = " and ".join(forms_with(lambda x: x.default_rank is not None))
        raise UserError(f"recipe {path}: fold.rank applies to fold.mode {having} only; drop it or set the mode")
    gated = f is not None and chosen.fits_gates
    if f is not None:
        given = f.model_fields_set
        bias_keys = given & {"scale", "scales", "objective", "continuation_tokens", "calibrate_count", "check_alpha",
                             "alpha_margin"}
        gate_keys = given & {"multiplier", "gate_prompts", "gate_count", "gate_offset", "gate_heldout", "merge"}
        if gated and bias_keys:
            raise UserError(f"recipe {path}: fold.mode gated-lora takes fold.multiplier and the fold.gate_ keys, not "
                            f"the bias fold's {', '.join(sorted(bias_keys))}: drop them")
        if not gated and gate_keys:
            raise UserError(f"recipe {path}: fold.{', fold.'.join(sorted(gate_keys))} apply to fold.mode gated-lora "
                            "only")
    g = recipe.gguf
    if g is not None and g.model and (f is None or f.mode != "bias"):
        raise UserError(f"recipe {path}: gguf.model patches a bias fold into the target's GGUF; add fold: with "
                        "mode: bias, or set gguf.model: false" + ("; a gated-lora fold takes gguf.lora" if gated else ""))
    if g is not None and g.lora and not (gated and not f.merge):
        raise UserError(f"recipe {path}: gguf.lora writes a gated-lora fold's LoRA GGUF: set fold.mode gated-lora "
                        "(without merge), or gguf.lora: false")
    if g is not None and g.control_vector and gated and g.scale is None:
        raise UserError(f"recipe {path}: gguf.control_vector with a gated-lora fold needs gguf.scale: the gated "
                        "edit has no additive scale to reuse")
    if g is not None and g.control_vector and g.scale is None and recipe.fold is None:
        raise UserError(f"recipe {path}: gguf.control_vector needs a scale: add gguf.scale or a fold step")
    if g is not None and g.control_vector and recipe.vectors.site != "layer_output":
        raise UserError(f"recipe {path}: gguf.control_vector needs vectors.site layer_output (llama.cpp adds "
                        "control vectors to layer outputs)")


def _check_evaluate(recipe: "Recipe", path: Path) -> None:
    """The evaluate section: its files found beside the recipe, its arms readable, its budgets sound."""
    base, f = path.parent, recipe.fold
    e = recipe.evaluate
    if e is not None:
        from ..evaluation.compare import Arm

        if not e.data.startswith(prompts.BUILTIN_PREFIX):
            e.data = _resolve_path(e.data, base)
        if e.confirm is not None:
            e.confirm = _resolve_path(e.confirm, base)
        for name, what in e.arms.items():
            Arm.parse(f"{name}={what}")  # a bad arm is refused now, not after the run
        if e.paper and f is None:
            raise UserError(f"recipe {path}: evaluate.paper compares the hooks at fold.alpha: add a fold step, or an "
                            "evaluate.arms entry paper: paper:VECTORS@ALPHA")
        if len(set(e.budgets)) != len(e.budgets) or min(e.budgets) < 1:
            raise UserError(f"recipe {path}: evaluate.budgets must be distinct whole numbers >= 1, such as [256, 512]")


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
    _check_outputs(recipe, path)
    f, g = recipe.fold, recipe.gguf
    base = path.parent
    if not recipe.prompts.path.startswith(prompts.BUILTIN_PREFIX) and not os.path.isabs(recipe.prompts.path):
        recipe.prompts.path = str((base / recipe.prompts.path).resolve())  # always a file, never a Hub id
    if f is not None and not f.gate_prompts.startswith(prompts.BUILTIN_PREFIX) and not os.path.isabs(f.gate_prompts):
        f.gate_prompts = str((base / f.gate_prompts).resolve())
    for variant in {id(v): v for v in (recipe.source.locked, recipe.source.unlocked)}.values():
        variant.model = _resolve_path(variant.model, base)
    pairs = recipe.source.pairs
    if pairs is not None:
        pairs.model = recipe.source.locked.model
        if not pairs.path.startswith(prompts.BUILTIN_PREFIX) and not os.path.isabs(pairs.path):
            pairs.path = str((base / pairs.path).resolve())
    systems = [recipe.prompts.system, recipe.source.locked.system, recipe.source.unlocked.system]
    if any(systems) and not recipe.prompts.chat:
        raise UserError(f"recipe {path}: a system text is a chat turn: set prompts.chat: true")
    recipe.target.model = _resolve_path(recipe.target.model, base)
    if g is not None and g.base is not None:
        g.base = _resolve_path(g.base, base)
    if recipe.align.contrast is None:  # a pairs key's map is aligned on its pairs unless the recipe says otherwise
        recipe.align.contrast = recipe.source.pairs is not None
    if recipe.align.contrast and recipe.source.pairs is None:
        locked, unlocked = recipe.source.locked, recipe.source.unlocked
        if locked.model != unlocked.model:
            raise UserError(f"recipe {path}: align.contrast pairs the prompts in the unlocked variant's format, which "
                            "needs a prompt contrast on one source model (or pairs), not two models: drop it")
        if (unlocked.template, unlocked.system) == (locked.template, locked.system):
            raise UserError(f"recipe {path}: align.contrast: the two variants' formats are the same: drop it")
        if (recipe.target.template or locked.template) != locked.template:
            raise UserError(f"recipe {path}: align.contrast pairs one format on both models: drop target.template")
    _check_evaluate(recipe, path)
    _check_inputs(recipe, path, data)
    return recipe
