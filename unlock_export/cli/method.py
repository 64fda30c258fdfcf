"""The method's stages: `key`, `align`, `project`, and `run` (a whole recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .._io import refuse_existing
from ..choices import METHODS, SITES
from ..errors import UserError
from .app import cli, emit, prompt_options, resumable_output
from .options import chat_options, choice, runtime_from, runtime_options


# -- key -------------------------------------------------------------------------------------
@cli.command()
@click.option("--locked", required=True,
              help="Capability-absent source model (dir, .gguf, zoo:NAME, Hub id); with --pairs, the one model.")
@click.option("--unlocked", default=None, help="Capability-present source model (default: same as --locked).")
@click.option("--locked-template", default="direct", show_default=True, help="Template for the locked variant.")
@click.option("--unlocked-template", default="cot", show_default=True, help="Template for the unlocked variant.")
@prompt_options
@click.option("--pairs", "pairs_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help='Contrastive pairs instead of prompts and templates: JSONL rows {"positive": ..., "negative": ...} '
                   '(two texts, read at the last token) or {"prompt": ..., "positive": ..., "negative": ...} (two '
                   "completions, read over their tokens); --count and --offset apply. Key = positive - negative.")
@chat_options
@click.option("--locked-system", default=None, help="--chat: the locked variant's system turn.")
@click.option("--unlocked-system", default=None, help="--chat: the unlocked variant's system turn.")
@click.option("--method", type=choice(METHODS), default="mean", show_default=True,
              help="Aggregate the differences by their mean or first principal direction.")
@click.option("--answer-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: read the last prompt token (the paper's key). K > 0: read the answer's start instead: the "
                   "unlocked variant writes its first K tokens (greedy), both variants read that same text after "
                   "their own prompt, and the key is the mean difference over the last prompt token and those K.")
@resumable_output("Key file to write.")
@runtime_options
@click.pass_context
def key(ctx, locked, unlocked, locked_template, unlocked_template, prompts_path, field, count, offset, pairs_path,
        chat, system, locked_system, unlocked_system, method, answer_tokens, output, overwrite, resume, **runtime):
    """Compute the Master Key: per-layer difference between unlocked and locked source states.

    \b
    Example (CoT direction by prompt contrast on one model):
      unlock-export key --locked zoo:qwen2.5-coder-0.5b-instruct \\
          --locked-template direct --unlocked-template cot \\
          --prompts builtin:gsm8k-train --count 64 -o key.safetensors
    Example (a behaviour from a system-prompt contrast, through the chat template):
      unlock-export key --locked zoo:qwen2.5-coder-0.5b-instruct --chat --locked-template plain \\
          --unlocked-template plain --locked-system "Answer in English." \\
          --unlocked-system "Answer in French." --count 64 -o french.safetensors
    Example (contrastive pairs):
      unlock-export key --locked zoo:qwen2.5-coder-0.5b-instruct --pairs pairs.jsonl -o key.safetensors
    """
    from .._io import progress_folder
    from ..api import master_key

    given = {name for name in ("unlocked", "locked_template", "unlocked_template", "prompts_path", "field",
                               "answer_tokens", "locked_system", "unlocked_system")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if pairs_path is not None and given:
        flags = ", ".join("--" + n.replace("_path", "").replace("_", "-") for n in sorted(given))
        raise UserError(f"--pairs gives both sides of the contrast: drop {flags}")
    if not chat and (system or locked_system or unlocked_system):
        raise UserError("--system, --locked-system and --unlocked-system are chat turns: add --chat")
    refuse_existing(output, overwrite)
    sides = ({"pairs": str(pairs_path)} if pairs_path is not None else
             {"unlocked": unlocked, "prompts": prompts_path, "field": field, "locked_template": locked_template,
              "unlocked_template": unlocked_template, "answer_tokens": answer_tokens,
              "locked_system": locked_system, "unlocked_system": unlocked_system})
    with progress_folder(output, resume, overwrite) as checkpoint_dir:
        master = master_key(locked, **sides, count=count, offset=offset, method=method, chat=chat, system=system,
                            checkpoint_dir=checkpoint_dir, options=runtime_from(runtime),
                            progress=not ctx.obj["quiet"])
        master.save(output)
    norms = [round(float(v), 4) for v in master.vectors.norm(dim=1)]
    emit(ctx, {"output": str(output), "layers": len(norms), "norms": norms},
          f"wrote {output}: key for {len(norms)} layers, norms {min(norms):.3g}..{max(norms):.3g}")


# -- align -----------------------------------------------------------------------------------
@cli.command()
@click.option("--source", required=True, help="Source model (the locked variant the key was computed on).")
@click.option("--target", required=True, help="Target model that receives the capability.")
@click.option("--source-template", default="direct", show_default=True)
@click.option("--target-template", default="direct", show_default=True)
@prompt_options
@chat_options
@click.option("--contrast-template", default=None,
              help="Also pair the same prompts in this template (the key's unlocked variant's, such as cot), in "
                   "both models: the map then sees the contrast the key is made of, and carries it.")
@click.option("--contrast-system", default=None,
              help="--chat: also pair the same prompts under this system turn (the key's unlocked variant's).")
@click.option("--contrast-pairs", "contrast_pairs_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A pairs key's own pairs file (`key --pairs`): both sides of every pair, read at their last token, "
                   "are paired too, in both models, so the map sees the pairs' contrast.")
@click.option("--rank", default=16, show_default=True, type=int, help="Subspace rank k of the map.")
@resumable_output("Map file to write.")
@runtime_options
@click.pass_context
def align(ctx, source, target, source_template, target_template, prompts_path, field, count, offset, chat, system,
          contrast_template, contrast_system, contrast_pairs_path, rank, output, overwrite, resume, **runtime):
    """Fit the per-layer low-rank map from source to target on shared unlabeled prompts.

    With --contrast-template / --contrast-system the prompts are paired in the key's two formats (the
    locked one, then the unlocked one), so the map carries a prompt-contrast key (a CoT template, a
    system prompt) instead of dropping it; with --contrast-pairs a pairs key's own pairs are paired too.

    \b
    Example:
      unlock-export align --source zoo:qwen2.5-coder-0.5b-instruct \\
          --target zoo:qwen2.5-coder-1.5b-instruct --rank 16 --count 64 -o map.safetensors
      unlock-export align --source S --target T --source-template plain --target-template plain --chat \\
          --system "You always answer in English." --contrast-system "You always answer in French." \\
          --offset 1000 -o french-map.safetensors
    """
    from .._io import progress_folder
    from ..api import fit_map

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    refuse_existing(output, overwrite)
    with progress_folder(output, resume, overwrite) as checkpoint_dir:
        lrmap = fit_map(source, target, prompts=prompts_path, field=field, count=count, offset=offset, rank=rank,
                        source_template=source_template, target_template=target_template, chat=chat, system=system,
                        contrast_template=contrast_template, contrast_system=contrast_system,
                        contrast_pairs=str(contrast_pairs_path) if contrast_pairs_path else None,
                        checkpoint_dir=checkpoint_dir, options=runtime_from(runtime), progress=not ctx.obj["quiet"])
        lrmap.save(output)
    emit(ctx, {"output": str(output), "rank": lrmap.rank, "target_layers": lrmap.target_layer_count,
                "factor_bytes": lrmap.factor_bytes(), "dense_bytes": lrmap.dense_bytes()},
          f"wrote {output}: rank {lrmap.rank}, {lrmap.target_layer_count} target layers, "
          f"{lrmap.factor_bytes() / 2**20:.2f} MiB (dense maps would be {lrmap.dense_bytes() / 2**20:.1f} MiB)")


# -- project ---------------------------------------------------------------------------------
@cli.command()
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Key file from `key`.")
@click.option("--map", "map_path", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Map file from `align`.")
@click.option("--self", "self_steer", is_flag=True,
              help="No map: the key steers the model it was computed on (self-steering, the upper reference).")
@click.option("--layers", default="all", show_default=True, help="Target layers to steer: all, A-B, or 1,4,7.")
@click.option("--site", type=choice(SITES), default="layer_output", show_default=True,
              help="Where the vector is added in each layer.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Vectors file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def project(ctx, key_path, map_path, self_steer, layers, site, output, overwrite):
    """Project the key into the target through the map: writes the steering-vectors file.

    With --self instead of --map, the key becomes vectors for the model it was computed on.

    \b
    Example:
      unlock-export project --key key.safetensors --map map.safetensors --layers 1-27 -o vectors.safetensors
      unlock-export project --key own-key.safetensors --self --layers 1-27 -o self-vectors.safetensors
    """
    from ..api import LowRankMap, MasterKey, steering_vectors

    if bool(map_path) == self_steer:
        raise UserError("pass --map MAP (from `align`) to carry the key into a target, or --self to steer the "
                        "key's own model, not both or neither")
    refuse_existing(output, overwrite)
    vectors = steering_vectors(MasterKey.load(key_path), None if self_steer else LowRankMap.load(map_path),
                               layers=layers, site=site)
    vectors.save(output)
    norms = vectors.norms()
    emit(ctx, {"output": str(output), "layers": vectors.layers, "norms": norms},
          f"wrote {output}: {len(norms)} layers, norms {min(norms.values()):.3g}..{max(norms.values()):.3g}")


# -- run -------------------------------------------------------------------------------------
@cli.command()
@click.argument("recipe_path", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True,
              help="Check the recipe and every input, print the stages, models, prompts, outputs and an estimate "
                   "of the work; load, fetch and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT_DIR.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: finished captures and batches kept in .OUT_DIR.partial are reused.")
@click.pass_context
def run(ctx, recipe_path, out_dir, dry_run, overwrite, resume):
    """Run a whole recipe: key -> align -> project, then the optional fold, GGUF files and push.

    Writes key, map and vectors files and summary.json into OUT_DIR (with fold: the checkpoint in
    OUT_DIR/model; with gguf: model.gguf, lora.gguf and control-vector.gguf), then prints how to serve them.

    \b
    Example:
      unlock-export run --dry-run recipes/demo.yaml out/demo
      unlock-export run recipes/demo.yaml out/demo
    Recipe keys (docs/recipes.md has each key's type, default and meaning):
    name, description, source.{locked,unlocked}.{model,template,system} or source.pairs.{path,model,count,offset,template},
    target.{model,template},
    prompts.{path,field,key_count,align_count,offset,chat,system}, key.{method,answer_tokens}, align.{rank,contrast},
    vectors.{layers,site}, fold.{mode,scale (auto|number),alpha,scales,objective,continuation_tokens,calibrate_count,
    ppl_margin,check_alpha,alpha_margin,rank,layers,verify,tolerance,dtype; mode gated-lora: multiplier,gate_prompts,
    gate_count,gate_offset,gate_heldout,merge} (optional: writes OUT_DIR/model),
    gguf.{model,base,control_vector,scale,lora} (optional: llama.cpp files),
    diagnostics.{enabled,heldout_count,target_key},
    push.{repo_id,artifact (model|vectors),private,revision,base_model} (optional, after the outputs are written),
    evaluate.{data,count,offset,task,budgets,engine,paper,arms,confirm} (optional: `compare` of the outputs into
    OUT_DIR/compare; an interrupted one continues with --resume),
    runtime.{dtype,device,device_map,batch_size,max_length,trust_remote_code,allow_pickle}.
    """
    from ..recipe.runner import run_recipe
    from ..recipe.spec import load_recipe

    recipe = load_recipe(recipe_path)
    if dry_run:
        from ..recipe.plan import format_plan, plan_recipe

        refuse_existing(out_dir, overwrite, resume)
        plan = plan_recipe(recipe, out_dir)
        click.echo(json.dumps(plan.as_dict()) if ctx.obj["json"] else format_plan(plan))  # printed even with --quiet
        return
    summary = run_recipe(recipe, out_dir, overwrite=overwrite, progress=not ctx.obj["quiet"],
                         recipe_text=recipe_path.read_text(encoding="utf-8"), resume=resume)
    lines = [f"recipe {summary['recipe']} done in {sum(summary['timings_s'].values()):.1f} s"]
    lines += [f"  {name}: {path}" for name, path in summary["outputs"].items()]
    if summary["serve"]:
        from ..export.serving import ServeCommand, format_commands

        lines += ["serve with:", format_commands([ServeCommand(**row) for row in summary["serve"]])]
    emit(ctx, summary, "\n".join(lines))


