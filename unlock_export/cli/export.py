"""Export and share: `fold`, `verify`, `cvec`, `gguf`, `push`, `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .._io import refuse_existing
from ..choices import EXPORT_DTYPES, OUTTYPES
from ..errors import UserError
from ..settings import GateSettings
from .app import cli, emit
from .options import (
    choice,
    converter_choice,
    converter_help,
    flag_param,
    form_choice,
    form_help,
    given_options,
    parse_multiplier,
    settings_options,
)

# -- fold ------------------------------------------------------------------------------------
GATE_FLAGS = {"multiplier": "--multiplier", "alpha": "--alpha", "prompts": "--gate-prompts", "count": "--gate-count",
              "heldout": "--gate-heldout", "offset": "--gate-offset", "chat": "--gate-chat", "system": "--gate-system"}


@cli.command()
@click.argument("target")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file from `project` (or `run`).")
@click.option("--scale", default=None, type=float, help="Offset = scale * direction (default 1; not for gated-lora).")
@click.option("--mode", type=form_choice(), default="bias", show_default=True, help=form_help("What to write:"))
@click.option("--rank", default=None, type=int,
              help="lora: the LoRA rank (default 8); gated-lora: gates per layer, the last prompt token and then "
                   "the first RANK-1 answer tokens (default 1).")
@settings_options(GateSettings, GATE_FLAGS, lead="gated-lora: ", types={"multiplier": str})
@click.option("--merge", is_flag=True, help="gated-lora: merge the edit into a standalone checkpoint.")
@click.option("--layers", default=None, help="Fold only these layers of the vectors file (all, A-B, 1,4,7).")
@click.option("--link", is_flag=True, help="Hard-link untouched shards instead of copying them.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Reload the export with the stock library and compare logits with the hook-steered original.")
@click.option("--tolerance", default=1e-3, show_default=True, type=float,
              help="Max |dlogit| allowed by --verify (float32), plus the precision floor of a bfloat16 or float16 "
                   "export (how far computing the unsteered model in it moves logits, measured).")
@click.option("--dtype", type=choice(("auto",) + EXPORT_DTYPES), default="auto", show_default=True,
              help="Precision of a checkpoint's weights (bias mode, gated-lora --merge); auto: the target's own "
                   "(its config's dtype: bfloat16 for most Hub releases).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a .bin-only TARGET (read with torch weights_only=True, exported as safetensors).")
@click.pass_context
def fold(ctx, target, vectors_path, scale, mode, rank, multiplier, alpha, gate_prompts, gate_count, gate_heldout,
         gate_offset, gate_chat, gate_system, merge, layers, link, verify, tolerance, dtype, output, overwrite,
         allow_pickle):
    """Fold steering vectors into TARGET's weights: a checkpoint or adapter stock loaders run as is.

    TARGET is a model directory, a GGUF file (dequantized), a zoo name or a Hub id. The offset sits
    on the last write into the residual stream of each steered layer (down_proj for Llama-like
    blocks; in bias mode Qwen2 and Mistral are relabelled as Llama). Families where no bias equals
    a residual offset (Gemma 2/3, OLMo 2, unknown) are refused: use a llama.cpp control vector.
    Adapters load with PEFT only; vLLM and llama.cpp serve the bias mode's checkpoint.

    \b
    Example:
      unlock-export fold zoo:qwen2.5-coder-1.5b-instruct --vectors out/demo/vectors.safetensors \\
          --scale 4 -o out/qwen1.5b-cot
      unlock-export fold ./Llama-3-8B --vectors v.safetensors --mode adapter -o out/adapter
    """
    from ..api import SteeringVectors, fold
    from ..export.forms import form, forms_with

    vectors = SteeringVectors.load(vectors_path)
    if layers:
        vectors = vectors.select(layers)
    shared = {"merge": merge, "link": link, "overwrite": overwrite, "verify": verify, "tolerance": tolerance,
              "progress": not ctx.obj["quiet"], "card_context": {"vectors_file": str(vectors_path)}, "dtype": dtype}
    if form(mode).fits_gates:
        if scale is not None:
            raise UserError("gated-lora takes --multiplier and --alpha, not --scale: drop it")
        settings = GateSettings(prompts=gate_prompts, count=gate_count, offset=gate_offset, heldout=gate_heldout,
                                chat=gate_chat, system=gate_system, alpha=alpha, multiplier=parse_multiplier(multiplier),
                                **({"rank": rank} if rank is not None else {}))
        result = fold(target, vectors, output, mode=mode, gate=settings, **shared)
    else:
        given = given_options(ctx, GATE_FLAGS.values())
        if given:
            gated = " or ".join(f"--mode {n}" for n in forms_with(lambda f: f.fits_gates))
            raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {gated} only: drop "
                            f"{'it' if len(given) == 1 else 'them'}")
        result = fold(target, vectors, output, mode=mode, scale=1.0 if scale is None else scale, rank=rank,
                      allow_pickle=allow_pickle, **shared)
    ver = result.verification
    check = (f"verified in {ver['dtype']}: max |dlogit| {ver['max_abs_dlogit']:.3g} <= {ver['tolerance']:.3g}, "
             f"top-1 agreement {ver['top1_agreement']:.1%}" if ver else "not verified")
    strength = f"multiplier {result.scale:g}" if form(mode).fits_gates else f"scale {result.scale:g}"
    emit(ctx, result.as_dict(), f"wrote {output} ({result.mode}, {result.exported_model_type}, "
                                 f"{len(result.layers)} layers, {strength}); {check}")


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
    from ..api import SteeringVectors, verify

    report = verify(export_dir, SteeringVectors.load(vectors_path), scale=scale, base=base, tolerance=tolerance)
    close = report.get("closeness")
    if close:
        click.echo(f"closeness to the paper form (recorded at fold time, KL at the answer start on {close['prompts']} "
                   f"held-out prompts): this edit {close['gated']['kl']:.3g}, the bias fold at its label-free scale "
                   f"{close['bias']['kl']:.3g}, unsteered {close['unsteered']:.3g}", err=True)
    emit(ctx, report, f"ok: max |dlogit| {report['max_abs_dlogit']:.3g} <= {tolerance:g}, top-1 agreement "
                       f"{report['top1_agreement']:.1%} on {report['prompts']} prompts "
                       f"(steering moves logits by up to {report['steering_effect_max_abs_dlogit']:.3g})")


# -- llama.cpp ----------------------------------------------------------------------------------
@cli.command()
@click.option("--vectors", "vectors_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file from `project` or `run`.")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Baked into the tensors (llama-server scales again: --control-vector-scaled FILE:SCALE).")
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
    from ..api import SteeringVectors
    from ..export.converters import write_gguf

    vectors = SteeringVectors.load(vectors_path)
    if layers:
        vectors = vectors.select(layers)
    info = write_gguf("control-vector", vectors, output, overwrite=overwrite, scale=scale, model_hint=model_hint)
    emit(ctx, info, _converter_line("control-vector", info, output))


def _converter_line(name: str, info: dict, output: Path) -> str:
    from ..export.converters import converter

    return converter(name).describe(info, output)


@cli.command("gguf")
@click.argument("folded", type=click.Path(file_okay=False, path_type=Path))
@click.option("--route", type=converter_choice("fold"), default="patch", show_default=True,
              help=converter_help("How a bias export becomes a GGUF:", "fold"))
@click.option("--base", default=None,
              help="patch: the target's GGUF file (default: the fold's target when it was a GGUF or zoo model); "
                   "a LoRA adapter: the base GGUF it is checked against and served with.")
@click.option("--llama-cpp", "llama_cpp", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="convert: llama.cpp source tree (default: $UNLOCK_LLAMA_CPP, else the engines cache).")
@click.option("--outtype", default="f32", show_default=True, type=choice(OUTTYPES),
              help="convert: tensor type of the GGUF.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def gguf_cmd(ctx, folded, route, base, llama_cpp, outtype, output, overwrite):
    """Turn FOLDED (a bias export from `fold`) into a GGUF that stock llama.cpp runs.

    A PEFT LoRA folder (`fold --mode gated-lora`) becomes a llama.cpp LoRA adapter GGUF instead
    (no route), served on the base model's GGUF with `llama-server --lora`, its scale chosen per
    request. BEFT adapters and LoRAs with lora_bias are refused: fold those with --mode bias.
    Options the chosen converter does not take are refused.

    \b
    Example:
      unlock-export gguf out/qwen1.5b-cot -o qwen1.5b-cot.gguf           # patch the zoo GGUF
      unlock-export gguf out/qwen1.5b-cot --base target-q4_k_m.gguf -o folded.gguf
      unlock-export gguf out/qwen1.5b-cot --route convert --llama-cpp ~/llama.cpp -o folded-f16.gguf --outtype f16
      unlock-export gguf out/gated -o gated-lora.gguf                     # a gated-lora adapter
    """
    from ..export.converters import converter_names, reads_of, write_gguf

    given = {flag_param(f)[1] for f in given_options(ctx, ("--route", "--base", ("--llama-cpp", "llama_cpp"),
                                                              "--outtype"))}
    values = {"base": base, "llama_cpp": llama_cpp, "outtype": outtype}
    if reads_of(folded) == "adapter":
        name = converter_names("adapter")[0]
        if "route" in given:
            raise UserError(f"'{folded}' is a PEFT adapter, which the {name} converter writes as a LoRA GGUF "
                            "(no route): drop --route")
    else:
        name = route
    info = write_gguf(name, folded, output, overwrite=overwrite, **{k: values[k] for k in given if k in values})
    emit(ctx, info, _converter_line(name, info, output))


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
    from ..api import push_to_hub, upload_text

    report = push_to_hub(artifact, repo_id, private=private, revision=revision, base_model=base_model,
                           message=message, dry_run=dry_run)
    if ctx.obj["json"]:
        click.echo(json.dumps(report))
    elif dry_run or not ctx.obj["quiet"]:
        click.echo(upload_text(report))


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
    from ..api import describe_artifact

    click.echo(json.dumps(describe_artifact(artifact)) if ctx.obj["json"] else describe_artifact(artifact, text=True))




# -- vectors made elsewhere -------------------------------------------------------------------------
@cli.group("vectors")
def vectors_group():
    """Steering vectors to and from llama.cpp control vectors.

    \b
    Example:
      unlock-export vectors import steer.gguf -o steer.safetensors
      unlock-export vectors export out/demo/vectors.safetensors --layers 1-27 -o steer.gguf
    Every command that takes --vectors also reads a control-vector GGUF directly.
    """


@vectors_group.command("import")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering-vectors file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def vectors_import(ctx, source, output, overwrite):
    """A llama.cpp control vector (llama.cpp's cvector-generator, repeng, `cvec`) or bare direction.N
    tensors as a steering-vectors file, so provenance can be added and `inspect` shows it.

    The file names no layer count of its model: the layers it steers are kept, and each command
    that uses the vectors checks them against its model (hidden size, highest layer).

    \b
    Example:
      unlock-export vectors import steer.gguf -o steer.safetensors
    """
    from ..api import SteeringVectors

    refuse_existing(output, overwrite)
    vectors = SteeringVectors.load(source)
    vectors.save(output)
    emit(ctx, {"output": str(output), "layers": vectors.layers, "hidden_size": vectors.hidden_size},
         f"wrote {output}: {len(vectors.layers)} layers of size {vectors.hidden_size} from {source}")


@vectors_group.command("export")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scale", default=1.0, show_default=True, type=float, help="Baked into the tensors.")
@click.option("--layers", default=None, help="Keep only these layers (all, A-B, 1,4,7); layer 0 is never steered.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.pass_context
def vectors_export(ctx, source, scale, layers, output, overwrite):
    """A steering-vectors file as a llama.cpp control vector (the same as `cvec`).

    \b
    Example:
      unlock-export vectors export out/demo/vectors.safetensors --layers 1-27 -o steer.gguf
    """
    ctx.invoke(cvec, vectors_path=source, scale=scale, layers=layers, model_hint=None, output=output,
               overwrite=overwrite)
