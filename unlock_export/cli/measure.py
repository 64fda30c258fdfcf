"""Measure: `eval`, `calibrate`, `check-alpha`."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import EVAL_FORMS, OBJECTIVES, TASKS
from ..errors import UserError
from ..evaluation.compare import CompareRequest
from ..evaluation.run import PROGRESS, EvalRequest
from ..settings import CalibrationSettings, GateSettings
from .app import cli, emit, number_list, prompt_options, write_json
from .options import (
    chat_options,
    choice,
    engine_choice,
    engine_help,
    flag_param,
    given_options,
    parse_multiplier,
    runtime_from,
    runtime_options,
    settings_options,
)


# -- evaluation -----------------------------------------------------------------------------------
def _refuse_output_in_model(output: Path, model: str, what: str = "model") -> None:
    """eval writes into OUTPUT: never into a local model (or adapter) folder, nor through a link into one."""
    source = Path(model)
    if not source.is_dir():
        return
    out_r, src_r = output.resolve(), source.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise UserError(f"output '{output}' is inside the {what} '{model}' (it resolves to '{out_r}'): choose a "
                        "folder outside it")


_EVAL, _COMPARE = EvalRequest(), CompareRequest()  # the commands' defaults are the library's
EVAL_GATE_FLAGS = {"multiplier": "--multiplier", "rank": ("--rank", "gate_rank"), "prompts": "--gate-prompts",
                   "count": "--gate-count", "heldout": "--gate-heldout", "offset": "--gate-offset"}


EVAL_FLAGS = {"data": ("--data", "data_path"), "task": "--task", "count": "--count", "offset": "--offset",
              "where": "--where", "template": "--template", "chat": "--chat"}
EVAL_STEERING_FLAGS = {"form": "--form", "alpha": "--alpha", "scale": "--scale"}
EVAL_SERVING_FLAGS = {"lora": "--lora", "layers": "--layers", "control_vector": "--control-vector",
                      "llama_server": "--llama-server", "parallel": "--parallel", "vllm": "--vllm",
                      "tensor_parallel_size": "--tensor-parallel-size", "data_parallel_size": "--data-parallel-size",
                      "gpu_memory_utilization": "--gpu-memory-utilization", "max_new_tokens": "--max-new-tokens",
                      "overwrite": "--overwrite", "resume": "--resume", "baseline": "--baseline"}
_PATH = click.Path(dir_okay=False, path_type=Path)


@cli.command("eval")
@click.argument("model")
@settings_options(EvalRequest, EVAL_FLAGS, types={"task": choice(TASKS), "count": int})
@click.option("--engine", type=engine_choice(), default=_EVAL.engine, show_default=True,
              help=engine_help("Where the model runs:"))
@click.option("--vectors", "vectors_path", default=None, type=_PATH,
              help="Steer with this vectors file (transformers: hooks; llamacpp: as a control vector).")
@settings_options(EvalRequest, EVAL_STEERING_FLAGS, types={"form": choice(EVAL_FORMS)})
@settings_options(GateSettings, EVAL_GATE_FLAGS, lead="gated-lora: ", types={"multiplier": str})
@settings_options(EvalRequest, EVAL_SERVING_FLAGS,
                  types={"control_vector": _PATH, "gpu_memory_utilization": float,
                         "baseline": click.Path(file_okay=False, path_type=Path)})
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for predictions.jsonl and summary.json.")
@runtime_options
@click.pass_context
def eval_cmd(ctx, model, data_path, vectors_path, output, **options):
    """Greedy accuracy of MODEL on a math set, optionally steered; writes predictions and a summary.

    MODEL is anything `fold` accepts, or a bias export folder / folded GGUF (loaded as it is). The
    summary has accuracy with a 95% Wilson interval, mean output length, the rates of answers that
    show intermediate steps, that state the answer ("the answer is N", \\boxed, ####) and that were
    cut at --max-new-tokens, and with --baseline a paired comparison (won, lost, McNemar p).

    \b
    Example:
      unlock-export eval zoo:qwen2.5-coder-1.5b-instruct --data builtin:gsm8k-dev --count 200 -o ev/plain
      unlock-export eval zoo:qwen2.5-coder-1.5b-instruct --data builtin:gsm8k-dev --vectors v.safetensors \\
          --form paper --alpha 0.1 -o ev/paper
      unlock-export eval qwen1.5b-cot.gguf --engine llamacpp --data builtin:gsm8k-dev --baseline ev/plain -o ev/folded
      unlock-export eval out/qwen1.5b-cot --engine vllm --data builtin:gsm8k-dev --tensor-parallel-size 2 -o ev/vllm
    """
    from ..api import SteeringVectors, evaluate

    runtime = runtime_from(options)
    if options["layers"] and not vectors_path:
        raise UserError("--layers selects layers of --vectors: pass --vectors too")
    if options["max_new_tokens"] < 1:
        raise UserError("--max-new-tokens must be at least 1")
    for name in ("control_vector", "baseline"):
        options[name] = str(options[name]) if options[name] else None
    strength = {"additive": "--scale", "paper": "--alpha", "gated-lora": "--alpha"}[options["form"]]
    given = given_options(ctx, ["--form", "--scale", "--alpha"])
    if given and not vectors_path:
        raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to steering with --vectors: "
                        f"pass --vectors too, or drop {'it' if len(given) == 1 else 'them'}")
    unused = [f for f in given if f not in ("--form", strength)]
    if unused:
        raise UserError(f"{unused[0]} is the strength of another form (--form {options['form']} takes {strength}): "
                        "drop it, or choose its form")
    gate = {field: options.pop(flag_param(flag)[1]) for field, flag in EVAL_GATE_FLAGS.items()}
    if options["form"] == "gated-lora":
        options["gate"] = GateSettings(**{**gate, "multiplier": parse_multiplier(gate["multiplier"])},
                                       alpha=options["alpha"], chat=options["chat"])
    else:
        given = given_options(ctx, EVAL_GATE_FLAGS.values())
        if given:
            raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --form gated-lora only: "
                            f"drop {'it' if len(given) == 1 else 'them'}")
    vectors = SteeringVectors.load(vectors_path) if vectors_path else None
    _refuse_output_in_model(output, model)
    if options["lora"]:
        from ..evaluation.engines import parse_lora

        _refuse_output_in_model(output, str(parse_lora(options["lora"])[0]), "LoRA adapter")
    from .._io import note_progress, output_lock

    try:
        with output_lock(output):  # a second eval into OUTPUT is refused, not interleaved
            summary = evaluate(model, data=data_path, vectors=vectors, out=output,
                               vectors_name=str(vectors_path) if vectors_path else None, options=runtime,
                               progress=not ctx.obj["quiet"], **options)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: the finished chunks are in OUTPUT/progress.jsonl
        if (output / PROGRESS).is_file():
            note_progress(exc, output / PROGRESS)
        raise
    lo, hi = summary.ci95
    paired = summary.paired
    emit(ctx, summary.as_dict(), f"accuracy {summary.accuracy:.1%} ({summary.correct}/{summary.n}, 95% CI "
                                 f"{lo:.1%}-{hi:.1%}), mean {summary.mean_output_tokens:.0f} tokens, steps shown "
                                 f"{summary.steps_rate:.0%}, answer stated {summary.states_answer_rate:.0%}, cut at "
                                 f"{options['max_new_tokens']} tokens {summary.cut_rate:.0%}"
                                 + (f"; against the baseline {paired['won']} won, {paired['lost']} lost "
                                    f"(McNemar p = {paired['p_mcnemar_exact']:.2g})" if paired else "")
                                 + f"; wrote {output}/predictions.jsonl and summary.json")


def _budgets(value: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        budgets = ()
    if not budgets or min(budgets) < 1:
        raise UserError(f"--max-new-tokens '{value}' is not a comma list of whole numbers >= 1 (such as 256,512)")
    return budgets


COMPARE_FLAGS = {"data": ("--data", "data_path"), "task": "--task", "count": "--count", "offset": "--offset",
                 "where": "--where", "template": "--template", "chat": "--chat", "budgets": ("--max-new-tokens", "budgets")}
COMPARE_SERVING_FLAGS = {"llama_server": "--llama-server", "vllm": "--vllm", "parallel": "--parallel"}


@cli.command()
@click.argument("model", required=False)
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="A `run` output folder: one arm per artifact it wrote (fold-gguf, control-vector, gated-lora, "
                   "fold), beside any --arm; MODEL defaults to its target.")
@click.option("--paper", is_flag=True, help="With --run: add the paper form's hooks at the fold's alpha (slow).")
@click.option("--arm", "arm_specs", multiple=True, metavar="NAME[=WHAT]",
              help="An arm (repeat): NAME alone is MODEL as it is; NAME=PATH a model folder or GGUF (a fold); "
                   "NAME=template:T MODEL with prompt template T (cot: the prompt baseline); "
                   "NAME=control-vector:FILE MODEL's GGUF with a control vector; NAME=lora:PATH[:SCALE] MODEL with "
                   "a LoRA; NAME=paper:VECTORS[@ALPHA] or NAME=additive:VECTORS[@SCALE] the reference hooks "
                   "(transformers, slow).")
@click.option("--unsteered/--no-unsteered", default=True, show_default=True,
              help="Add MODEL as it is as the first arm, named 'unsteered' (the baseline unless --baseline).")
@settings_options(CompareRequest, {"baseline": "--baseline"})
@settings_options(CompareRequest, COMPARE_FLAGS, types={"task": choice(TASKS), "count": int, "budgets": str})
@click.option("--engine", type=engine_choice(("auto",)), default=_COMPARE.engine, show_default=True,
              help="The engine of MODEL and model arms: auto is llamacpp for a GGUF (zoo models too), else "
                   "transformers. Hook arms run on the first engine that runs their form, control vectors on the "
                   "first that loads them (`eval --help` lists what each engine serves).")
@click.option("--confirm", "confirm_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A choice record from `choose`: refuse questions the choice saw, and title the report a "
                   "confirmation of its arm.")
@click.option("--allow-overlap", is_flag=True,
              help="With --confirm, run on overlapping questions anyway; the report's title says it is no "
                   "confirmation.")
@settings_options(CompareRequest, COMPARE_SERVING_FLAGS)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json, report.md, report.png and each arm's eval (arms/NAME).")
@click.option("--overwrite", is_flag=True, help="Replace a comparison in OUTPUT (an interrupted one resumes without it).")
@click.option("--add-arms", is_flag=True,
              help="Continue the interrupted comparison in OUTPUT with the arms given here that it lacks; the arms "
                   "it holds keep their answers, and results.json says which arms joined and when.")
@runtime_options
@click.pass_context
def compare(ctx, model, run_dir, paper, arm_specs, unsteered, baseline, data_path, budgets, confirm_path, allow_overlap,
            output, overwrite, add_arms, **options):
    """Score several arms of MODEL on the same questions, paired against the unsteered model.

    Each arm is an `eval` run on the engine that serves it (OUTPUT/arms/NAME); results.json has per
    arm and budget the accuracy (95% Wilson interval), mean output tokens, the cut rate, and against
    the baseline arm the questions won and lost, the exact McNemar p and Holm's adjusted p across the
    arms; report.md (and report.png, with matplotlib) are rendered from it. An interrupted comparison
    (Ctrl-C, a lost server) continues when rerun with the same arguments.

    Choose on dev, then confirm once: `choose OUT ARM -o choice.json` records the choice and the
    questions it saw; `compare --confirm choice.json --data builtin:gsm8k-confirm` refuses questions
    the choice saw.

    \b
    Example:
      unlock-export compare zoo:qwen2.5-coder-1.5b-instruct --arm fold=out/demo/model.gguf \\
          --arm cvec=control-vector:out/demo/steer.gguf --arm cot=template:cot \\
          --data builtin:gsm8k-dev --count 64 --max-new-tokens 256,512 -o cmp/dev
      unlock-export compare --run out/demo --arm cot=template:cot --count 64 --max-new-tokens 256,512 -o cmp/run
      unlock-export choose cmp/dev fold -o choice.json
      unlock-export compare zoo:qwen2.5-coder-1.5b-instruct --arm fold=out/demo/model.gguf --arm cot=template:cot \\
          --data builtin:gsm8k-confirm --max-new-tokens 256,512 --confirm choice.json -o cmp/confirm
    """
    import sys

    from .._io import output_lock
    from ..api import compare_arms

    runtime = runtime_from(options)
    if paper and not run_dir:
        raise UserError("--paper adds the hooks of a --run's vectors: pass --run too (or --arm NAME=paper:VECTORS)")
    run_target, run_arms = None, []
    if run_dir:
        from ..recipe.outputs import run_arms as arms_of_run

        run_target, run_arms = arms_of_run(run_dir, paper)
    model = model or run_target
    if not model:
        raise UserError("pass MODEL (the unsteered target), or --run with a run folder that records its target")
    arms = (["unsteered"] if unsteered else []) + run_arms + list(arm_specs)
    if allow_overlap and not confirm_path:
        raise UserError("--allow-overlap applies to --confirm only")
    _refuse_output_in_model(output, model)
    with output_lock(output):
        results = compare_arms(model, arms, output, confirm=confirm_path, allow_overlap=allow_overlap,
                               overwrite=overwrite, add_arms=add_arms, command=["unlock-export", *sys.argv[1:]],
                               options=runtime, progress=not ctx.obj["quiet"], data=data_path, budgets=_budgets(budgets),
                               baseline=baseline, **options)
    lines = [results["title"]]
    for e in results["table"]:
        paired = (f", vs {results['baseline']} {e['won']} won / {e['lost']} lost, p {e['p_mcnemar_exact']:.2g} "
                  f"(Holm {e['p_holm']:.2g})" if "won" in e else " (baseline)")
        lines.append(f"  {e['budget']:>5} tokens  {e['arm']:<16} {e['correct']}/{e['n']} = {e['accuracy']:.1%} "
                     f"[{e['ci95'][0]:.1%}-{e['ci95'][1]:.1%}], cut {e['cut_rate']:.0%}{paired}")
    lines.append(f"wrote {output}/results.json and report.md")
    emit(ctx, results, "\n".join(lines))


@cli.command()
@click.argument("results_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("arm")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The choice record to write (never replaced).")
@click.option("--note", default=None, help="Why this arm (kept in the record).")
@click.pass_context
def choose(ctx, results_dir, arm, output, note):
    """Record the choice of ARM from a comparison (RESULTS_DIR, a `compare` output) before confirming it.

    The record (pre-registration) holds the arm and its settings, every question the choice saw, the
    commit and the date; `compare --confirm RECORD` then refuses those questions.

    \b
    Example:
      unlock-export choose cmp/dev fold -o choice.json --note "best at 512 tokens on dev"
    """
    from ..api import record_choice

    record = record_choice(results_dir, arm, output, note)
    emit(ctx, record, f"recorded the choice of arm '{arm}' ({len(record['seen'])} questions seen) in {output}")


@cli.command()
@click.argument("model")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file for MODEL.")
@settings_options(CalibrationSettings, {"alpha": "--alpha", "scales": "--scales", "ppl_margin": "--ppl-margin",
                                         "objective": "--objective", "continuation_tokens": "--continuation-tokens"},
                  types={"scales": str, "objective": choice(OBJECTIVES)})
@click.option("--template", default="direct", show_default=True, help="Prompt template for the answer-start distribution.")
@chat_options
@click.option("--layers", default=None,
              help="Calibrate a fold of only these layers (all, A-B, 1,4,7): the additive form steers them, "
                   "the paper-form reference keeps every layer of --vectors.")
@prompt_options(count=CalibrationSettings.count)
@runtime_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON.")
@click.pass_context
def calibrate(ctx, model, vectors_path, alpha, scales, ppl_margin, template, chat, system, layers, objective,
              continuation_tokens, prompts_path, field, count, offset, output, **runtime):
    """Pick the additive (folded) scale without labels: the one closest to the paper form.

    The additive form adds the vector at every position, the paper form edits only the last prompt
    token in prefill, so their strengths differ. The chosen scale brings the additive form closest
    to the paper form at --alpha (--objective answer-start: KL of the next-token distribution at
    the answer start; continuation: cross-entropy of the paper form's own greedy continuations),
    among scales that keep perplexity on the plain prompts within --ppl-margin of the unsteered
    model's.

    \b
    Example:
      unlock-export calibrate zoo:qwen2.5-coder-1.5b-instruct --vectors out/demo/vectors.safetensors \\
          --alpha 0.1 --prompts builtin:gsm8k-train --count 64
    """
    from ..api import SteeringVectors, calibrate_scale
    from ..prompts import load_questions

    rt = runtime_from(runtime)
    result = calibrate_scale(model, SteeringVectors.load(vectors_path),
                             prompts=load_questions(prompts_path, field=field, count=count, offset=offset),
                             count=None, alpha=alpha, template=template, objective=objective,
                             scales=number_list(scales, "--scales"), ppl_margin=ppl_margin, layers=layers,
                             continuation_tokens=continuation_tokens, chat=chat, system=system, options=rt,
                             progress=not ctx.obj["quiet"])
    result = result.as_dict()
    write_json(output, result)
    ratio = next((r["perplexity_ratio"] for r in result["table"] if r["scale"] == result["scale"]), 1.0)
    closeness = (f"continuation cross-entropy {result['continuation_ce']:.4g} (unsteered "
                 f"{result['continuation_ce_unsteered']:.4g})" if objective == "continuation" else
                 f"KL at the answer start {result['kl_to_reference']:.4g} (unsteered {result['kl_unsteered_to_reference']:.4g})")
    emit(ctx, result, f"scale {result['scale']:g} for the paper form at alpha {alpha:g}: {closeness}, "
                       f"perplexity x{ratio:.3f}")


@cli.command("check-alpha")
@click.argument("model")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file for MODEL.")
@click.option("--alphas", default=None,
              help="Comma list of paper-form alphas to check (default 0.01,0.02,0.05,0.1,0.2); tried in ascending "
                   "order, stopping at the first that fails.")
@click.option("--margin", default=1.0, show_default=True, type=float,
              help="Allowed relative rise of the continuations' perplexity (1.0 = up to twice the unsteered's).")
@click.option("--tokens", default=32, show_default=True, type=int, help="Greedy tokens generated per prompt.")
@click.option("--template", default="direct", show_default=True, help="Prompt template.")
@prompt_options
@runtime_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON.")
@click.pass_context
def check_alpha(ctx, model, vectors_path, alphas, margin, tokens, template, prompts_path, field, count, offset,
                output, **runtime):
    """Check, without labels, which paper-form alphas leave MODEL writing text.

    Too large an alpha breaks a model's text. For each alpha the paper form's greedy continuations (--tokens) are scored by the unsteered model,
    after their first token (the opening the steering is meant to change); an alpha passes when
    that perplexity is within --margin of the unsteered model's on its own continuations. Prints
    the largest alpha that passes; exit code 0 either way (the JSON says which failed).

    \b
    Example:
      unlock-export check-alpha zoo:qwen2.5-coder-0.5b-instruct --vectors out/r/vectors.safetensors \\
          --prompts builtin:gsm8k-train --count 8
    """
    from ..api import SteeringVectors, check_alpha

    result = check_alpha(model, SteeringVectors.load(vectors_path), prompts=prompts_path, field=field, count=count,
                         offset=offset, alphas=number_list(alphas, "--alphas"), margin=margin, tokens=tokens,
                         template=template, options=runtime_from(runtime), progress=not ctx.obj["quiet"])
    write_json(output, result)
    verdicts = ", ".join(f"{r['alpha']:g} x{r['fluency_ratio']:.2f}{'' if r['allowed'] else ' (breaks the text)'}"
                         for r in result["table"])
    best = (f"largest alpha that keeps the text: {result['alpha']:g}" if result["alpha"] is not None
            else "no alpha tried keeps the text: try smaller --alphas")
    emit(ctx, result, f"{best}; continuation perplexity against unsteered (margin x{1 + margin:g}): {verdicts}")


