"""The click group, its global options, and the helpers every command shares."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from .. import __version__
from ..errors import UserError

DEFAULT_PROMPTS = "builtin:arithmetic"


class Stopped(Exception):
    """An interrupt (Ctrl-C, SIGTERM) that has unwound through the whole command; `main` reports it.
    Raised in place of the KeyboardInterrupt so that click prints nothing of its own."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__("interrupted")
        self.interrupt = interrupt


class Command(click.Command):
    """A command whose interrupt reaches `main` as `Stopped`, after every cleanup inside it ran."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Stopped(exc) from exc


class Group(click.Group):
    """The group class of the CLI: its commands are `Command`s, its subgroups `Group`s."""

    command_class = Command
    group_class = type  # subgroups are of this same class


def prompt_options(fn=None, *, count: int = 256):
    """--prompts, --field, --count (default `count`) and --offset; `@prompt_options` or `@prompt_options(count=N)`."""
    options = [
        click.option("--prompts", "prompts_path", default=DEFAULT_PROMPTS, show_default=True,
                     help="builtin:gsm8k-train, builtin:gsm8k-dev, builtin:arithmetic (packaged), or a JSONL file "
                          "(plain or .gz) of unlabeled prompts."),
        click.option("--field", default="question", show_default=True, help="JSONL field holding the prompt."),
        click.option("--count", default=count, show_default=True, type=int, help="Number of prompts."),
        click.option("--offset", default=0, show_default=True, type=int, help="Skip this many prompts first."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate(fn) if fn is not None else decorate


def resumable_output(help_text: str):
    """-o/--output (a file), --overwrite and --resume (progress kept beside the output), as `key` and `align`
    take them."""
    options = [
        click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help=help_text),
        click.option("--overwrite", is_flag=True, help="Replace an existing output file."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run from the progress it kept beside the output (.NAME.partial)."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def emit(ctx, payload: dict, text: str) -> None:
    if ctx.obj["json"]:
        click.echo(json.dumps(payload))
    elif not ctx.obj["quiet"]:
        click.echo(text)



def number_list(value: str | None, option: str) -> tuple[float, ...] | None:
    """'0.1,0.2' -> (0.1, 0.2); None or empty -> None."""
    if not value:
        return None
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} '{value}' is not a comma list of numbers")


def write_json(output: Path | None, payload: dict) -> None:
    if output:
        from .._io import atomic_write_text

        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(payload, indent=2) + "\n")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    Exit codes: 0 ok, 1 failure, 2 bad input, 130 interrupted, 143 terminated (SIGTERM).
    """
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if as_json:
        quiet = True
    ctx.obj = {"quiet": quiet, "json": as_json}
    if quiet:
        import transformers

        transformers.logging.disable_progress_bar()


