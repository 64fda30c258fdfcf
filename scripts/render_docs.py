#!/usr/bin/env python3
"""Render the reference pages of docs/ from the code, so they cannot drift from it.

  docs/recipes.md   from the pydantic schema of unlock_export.recipe.spec.Recipe
  docs/commands.md  from the click group unlock_export.cli.cli (every command, recursively)
  docs/faults.md    from the fault cases that parametrise and list the tests (tests/test_faults.py)

  python scripts/render_docs.py           # write both files
  python scripts/render_docs.py --check   # exit 1, naming the stale file, when a file differs

The output depends only on the code: fixed help width, fixed order, no dates or paths.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COMMAND = "python scripts/render_docs.py"
WIDTH = 100  # help text width, independent of the terminal

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- recipes.md -----------------------------------------------------------------------------------

def _model_class(annotation):
    """The pydantic model class an annotation holds (directly or inside Optional), else None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _type_name(annotation) -> str:
    """A short, stable spelling of a field type: `int`, `bias \\| adapter`, `list of int`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if isinstance(a, str) else json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        text = " \\| ".join(parts)
        return f"{text} \\| null" if type(None) in args else text
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return _model_class(annotation).__name__ if _model_class(annotation) else annotation.__name__
    return str(annotation).replace("typing.", "")


def _registry_type(field) -> str | None:
    """A field whose values a registry holds (an export form, an engine): the names registered now."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "registry" not in extra:
        return None
    import importlib

    module, _, name = extra["registry"].partition(":")
    names = [*extra.get("extra", []), *getattr(importlib.import_module(module), name)()]
    return " \\| ".join(f"`{n}`" for n in names)


def _constraints(field) -> str:
    """Bounds and patterns pydantic enforces on a field, as text (`>= 1`, `pattern ^...$`)."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    out = []
    for item in field.metadata:
        for attr, sign in signs.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            out.append(f"pattern `{pattern}`".replace("|", "\\|"))
    return ", ".join(out)


def _scalar(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _default(field, model_cls) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if model_cls is not None:
        return "absent (step off)" if value is None else "its keys' defaults"
    return _scalar(value)


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _sections(model, path: str) -> list[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """(dotted path, model class, rows) for `model` and every sub-model below it, depth first in
    declaration order. A row: (dotted key, type, default, description)."""
    rows, below = [], []
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        sub = _model_class(field.annotation)
        kind = _registry_type(field) or _type_name(field.annotation) if sub is None else "section"
        if sub is not None and not field.is_required():
            kind = "section, optional" if field.default is None else "section"
        constraint = _constraints(field)
        if constraint:
            kind = f"{kind} ({constraint})"
        description = field.description or ""
        if sub is not None:
            description = (description + " " if description else "") + f"Keys: see [`{key}`](#{_anchor(key)})."
        rows.append((key, kind, _default(field, sub), description))
        if sub is not None:
            below += _sections(sub, key)
    return [(path, model, rows)] + below


def _anchor(key: str) -> str:
    """GitHub's heading anchor for '## `a.b_c`': lower case, dots dropped, underscores kept."""
    return key.replace(".", "").lower()


def _builtin_names() -> list[str]:
    from unlock_export import prompts

    names = getattr(prompts, "BUILTIN_NAMES", None)
    return list(names) if names else [prompts.BUILTIN_PREFIX + "arithmetic"]


EXAMPLE = """\
name: qwen0.5b-to-1.5b-cot
source:
  locked:   {model: "zoo:qwen2.5-coder-0.5b-instruct", template: direct}
  unlocked: {model: "zoo:qwen2.5-coder-0.5b-instruct", template: cot}
target:
  model: "zoo:qwen2.5-coder-1.5b-instruct"
prompts: {path: "builtin:gsm8k-train", key_count: 64}
key: {method: mean, answer_tokens: 16}
align: {rank: 16}
vectors: {layers: "1--1"}          # every layer but 0 (llama.cpp never steers layer 0)
fold: {mode: bias, scale: auto}    # label-free scale; writes OUT_DIR/model
"""


def _shipped_recipes() -> list[tuple[str, str]]:
    """(file name, its `description`) of every recipe in recipes/, by name."""
    import yaml

    rows = []
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            data = {}
        rows.append((path.name, str(data.get("description", "")) if isinstance(data, dict) else ""))
    return rows


def render_recipes() -> str:
    from unlock_export.recipe.spec import Recipe

    builtins = ", ".join(f"`{n}`" for n in _builtin_names())
    out = [
        f"_Generated by `{COMMAND}` from `unlock_export.recipe.spec.Recipe`. Do not edit by hand._",
        "",
        "# Recipe reference",
        "",
        "A recipe is a YAML file that `unlock-export run RECIPE.yaml OUT_DIR` validates and runs: key, "
        "align and project, then the optional steps it names (the sections marked optional below). "
        "`unlock-export run --dry-run RECIPE.yaml OUT_DIR` checks it without running anything. "
        "Unknown keys and wrong types are refused before anything runs, with the key's dotted path. "
        "Relative paths in a recipe (prompt files, local models) resolve against the recipe's folder, "
        "not the working directory, and each must name an input of the right kind (a prompt file; a "
        "model folder with `config.json`, or a `.gguf` file). `prompts.path` takes a JSONL file or a "
        f"builtin set: {builtins}. Model keys take anything a model argument of the CLI takes: a local "
        "folder, a `.gguf` file, `zoo:NAME` or a Hub id.",
        "",
        "```yaml",
        EXAMPLE.rstrip("\n"),
        "```",
    ]
    shipped = _shipped_recipes()
    if shipped:
        out += ["", "Shipped in `recipes/` (run one with `unlock-export run recipes/NAME.yaml OUT_DIR`):", "",
                "| recipe | description |", "|---|---|"]
        out += [f"| `{name}` | {_cell(desc)} |" for name, desc in shipped]
    for path, model, rows in _sections(Recipe, ""):
        title = f"`{path}`" if path else "Top level"
        out += ["", f"## {title}", ""]
        doc = " ".join((model.__doc__ or "").split()) if model.__doc__ else ""
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{key}` | {kind} | {default} | {_cell(desc)} |" for key, kind, default, desc in rows]
    return "\n".join(out) + "\n"


# -- commands.md ----------------------------------------------------------------------------------

def _walk(command, ctx):
    """(full name, command, context) for `command` and every subcommand, depth first, sorted by name
    within a group (the order `--help` lists them in)."""
    import click

    yield ctx.command_path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            yield from _walk(sub, click.Context(sub, info_name=name, parent=ctx))


def render_commands() -> str:
    import click

    from unlock_export.cli import cli

    settings = dict(cli.context_settings)
    settings.update(max_content_width=WIDTH, terminal_width=WIDTH)
    root = click.Context(cli, info_name="unlock-export", **settings)
    entries = list(_walk(cli, root))
    out = [
        f"_Generated by `{COMMAND}` from the click group `unlock_export.cli.cli`. Do not edit by hand._",
        "",
        "# Command reference",
        "",
        "Every command's `--help`, as the command line prints it. Model arguments take a local "
        "folder, a `.gguf` file, `zoo:NAME` or a Hub id. Exit codes: 0 success, 1 failure, 2 bad input, "
        "130 interrupted (Ctrl-C), 143 terminated (SIGTERM).",
        "",
    ]
    for name, command, _ in entries[1:]:
        short = command.get_short_help_str(limit=WIDTH)
        out.append(f"- [`{name}`](#{_command_anchor(name)}): {_cell(short)}")
    for name, command, ctx in entries:
        out += ["", f"## {name}", "", "```text", command.get_help(ctx).rstrip(), "```"]
    return "\n".join(out) + "\n"


def _command_anchor(name: str) -> str:
    """GitHub's heading anchor for '## unlock-export zoo fetch'."""
    return "".join(c for c in name.lower().replace(" ", "-") if c.isalnum() or c in "-_")


# -- faults.md ------------------------------------------------------------------------------------

FAULT_TESTS = ROOT / "tests" / "test_faults.py"


def _literals(path: Path, names: tuple[str, ...]) -> dict:
    """Module-level `NAME = <literal>` assignments of a file, read without importing it."""
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def fault_rows(path: Path = FAULT_TESTS) -> list[dict]:
    """The signal cases that parametrise test_a_signal_stops_the_command_cleanly, as rows, then FAULTS."""
    table = _literals(path, ("SIGNALS", "FAULTS"))
    rows = [{"fault": f"{case['signal']} mid-work", "command": case["command"], "what": case["what"],
             "test": f"tests/test_faults.py::test_a_signal_stops_the_command_cleanly[{case['command']}-{case['signal']}]"}
            for case in table["SIGNALS"]]
    return rows + table["FAULTS"]


def render_faults() -> str:
    rows = fault_rows()
    pending = [row for row in rows if row.get("pending")]
    tests = {row["test"] for row in rows if not row.get("pending")}
    out = [
        f"_Generated by `{COMMAND}` from `SIGNALS` and `FAULTS` in `tests/test_faults.py`. Do not edit by hand._",
        "",
        "# Faults and what happens",
        "",
        "What each `unlock-export` command does when it is stopped (Ctrl-C, SIGTERM from a scheduler, `timeout` or a "
        "container stop, SIGKILL), when two commands write one output, and when it is handed files other "
        "tools wrote; each row names the test that shows it. [security.md](security.md) describes the "
        "rules behind them: atomic outputs, the output lock, resume, exit codes.",
        "",
        f"{len(rows)} fault cases, covered by {len(tests)} tests"
        + (f"; {len(pending)} pending (its test is to be written)." if pending else "."),
        "",
        "| fault | command | what happens | test |",
        "|---|---|---|---|",
    ]
    for row in rows:
        test = f"`{row['test']}`" + (" (pending)" if row.get("pending") else "")
        out.append(f"| {_cell(row['fault'])} | {_cell(row['command'])} | {_cell(row['what'])} | {_cell(test)} |")
    return "\n".join(out) + "\n"


# -- writing and checking -------------------------------------------------------------------------

RENDERERS = {"recipes.md": render_recipes, "commands.md": render_commands, "faults.md": render_faults}


def render_all() -> dict[str, str]:
    return {name: render() for name, render in RENDERERS.items()}


def stale(docs_dir: Path = DOCS, rendered: dict[str, str] | None = None) -> list[str]:
    """Names of the generated files in `docs_dir` that differ from what would be rendered now."""
    rendered = rendered if rendered is not None else render_all()
    out = []
    for name, text in rendered.items():
        path = Path(docs_dir) / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a checked-in file differs from what would be rendered")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: docs/ of this checkout)")
    args = parser.parse_args(argv)
    rendered = render_all()
    if args.check:
        names = stale(args.docs, rendered)
        if names:
            where = ", ".join(str(Path(args.docs) / n) for n in names)
            print(f"stale: {where} differs from the code; run `{COMMAND}` and commit the result", file=sys.stderr)
            return 1
        return 0
    args.docs.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.docs / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.docs / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
