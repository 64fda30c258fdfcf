"""One front door: the CLI (and the recipe runner) is a thin face on the public API. Its modules import the
library only through
`unlock_export.api`, the plug-in registries, the recipe package (the `run` command's own entry, built on
the API) and the torch-free support modules: the settings and request objects that give its options their
defaults, errors, choices, prompts and output handling. Read from the source, so a new command that
reaches past the API into a pipeline stage fails here. The recipe runner, the `run` command's stages, follows
the same rule: each stage is a call into the API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unlock_export"
CLI = sorted((PACKAGE / "cli").glob("*.py"))
RUNNER = PACKAGE / "recipe" / "runner.py"

# module -> the names the CLI may import from it (None: any)
ALLOWED = {
    "unlock_export": None, "unlock_export.api": None,
    # the registries: choices, help and dispatch of export forms, GGUF converters and engines
    "unlock_export.export.forms": None, "unlock_export.export.converters": None,
    "unlock_export.evaluation.engines": None,
    # the recipe's own entry (run, its dry-run plan, and compare --run's arms of a run folder)
    "unlock_export.recipe.spec": None, "unlock_export.recipe.plan": None, "unlock_export.recipe.runner": None,
    "unlock_export.recipe.outputs": None,
    # torch-free support: settings, errors, fixed choices, prompt sources, atomic outputs
    "unlock_export.settings": None, "unlock_export.errors": None, "unlock_export.choices": None,
    "unlock_export.prompts": None, "unlock_export._io": None, "unlock_export.models.runtime": {"RuntimeOptions"},
    # the request objects whose fields are eval's and compare's option defaults, and the serve-command text
    "unlock_export.evaluation.run": {"EvalRequest", "PROGRESS"},
    "unlock_export.evaluation.compare": {"CompareRequest"},
    "unlock_export.export.serving": {"ServeCommand", "format_commands", "serve_commands"},
}


def _imports(path: Path, package: str = "unlock_export.cli") -> list[tuple[str, str, int]]:
    """(absolute module, name, line) of every `from ... import name` of the library in `path`, a module of
    `package`, leaving out the package's own modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: 2 - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("unlock_export") and not module.startswith(package):
                found += [(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "*", node.lineno) for alias in node.names if alias.name.startswith("unlock_export")]
    return found


@pytest.mark.parametrize("path", CLI, ids=lambda p: p.name)
def test_the_cli_reaches_the_library_through_the_api_only(path):
    wrong = [f"{path.name}:{line} imports {name} from {module}" for module, name, line in _imports(path)
             if module not in ALLOWED or (ALLOWED[module] is not None and name not in ALLOWED[module])]
    assert not wrong, "\n".join(wrong)


def test_the_recipe_runner_calls_the_api_for_every_stage():
    wrong = [f"runner.py:{line} imports {name} from {module}" for module, name, line in
             _imports(RUNNER, "unlock_export.recipe")
             if module not in ALLOWED or (ALLOWED[module] is not None and name not in ALLOWED[module])]
    assert not wrong, "\n".join(wrong)


def test_the_rule_reads_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..method.pipeline import compute_key\nfrom ..api import fold\nfrom .app import cli\n")
    assert _imports(probe) == [("unlock_export.method.pipeline", "compute_key", 1), ("unlock_export.api", "fold", 2)]
