"""Every setting has one default: the library's settings objects (GateSettings, CalibrationSettings,
EvalRequest, CompareRequest) give the API's, the CLI's and the recipe's, and options that do not apply
to the chosen mode or form are refused, never ignored."""

from __future__ import annotations

import inspect

import click
import pytest

from unlock_export import api
from unlock_export.cli import cli, main
from unlock_export.evaluation.compare import CompareRequest
from unlock_export.evaluation.run import EvalRequest
from unlock_export.recipe.spec import EvaluateSpec, FoldSpec
from unlock_export.settings import CalibrationSettings, GateSettings

GATE, CAL, EVAL, CMP = GateSettings(), CalibrationSettings(), EvalRequest(), CompareRequest()

# command -> {click parameter: the settings object and field whose default it must have}
CLI = {
    "fold": {"multiplier": (GATE, "multiplier"), "alpha": (GATE, "alpha"), "gate_prompts": (GATE, "prompts"),
             "gate_count": (GATE, "count"), "gate_heldout": (GATE, "heldout"), "gate_offset": (GATE, "offset"),
             "gate_chat": (GATE, "chat"), "gate_system": (GATE, "system")},
    "eval": {"multiplier": (GATE, "multiplier"), "gate_rank": (GATE, "rank"), "gate_prompts": (GATE, "prompts"),
             "gate_count": (GATE, "count"), "gate_heldout": (GATE, "heldout"), "gate_offset": (GATE, "offset"),
             "alpha": (EVAL, "alpha"), "scale": (EVAL, "scale"), "form": (EVAL, "form"), "engine": (EVAL, "engine"),
             "max_new_tokens": (EVAL, "max_new_tokens"), "parallel": (EVAL, "parallel"), "count": (EVAL, "count"),
             "offset": (EVAL, "offset"), "template": (EVAL, "template")},
    "calibrate": {"alpha": (CAL, "alpha"), "scales": (CAL, "scales"), "ppl_margin": (CAL, "ppl_margin"),
                  "objective": (CAL, "objective"), "continuation_tokens": (CAL, "continuation_tokens"),
                  "count": (CAL, "count")},
    "compare": {"data_path": (CMP, "data"), "count": (CMP, "count"), "offset": (CMP, "offset"),
                "template": (CMP, "template"), "budgets": (CMP, "budgets"), "engine": (CMP, "engine"),
                "parallel": (CMP, "parallel")},
}
RECIPE = {
    FoldSpec: {"alpha": (CAL, "alpha"), "scales": (CAL, "scales"), "objective": (CAL, "objective"),
               "continuation_tokens": (CAL, "continuation_tokens"), "calibrate_count": (CAL, "count"),
               "ppl_margin": (CAL, "ppl_margin"), "multiplier": (GATE, "multiplier"),
               "gate_prompts": (GATE, "prompts"), "gate_count": (GATE, "count"), "gate_offset": (GATE, "offset"),
               "gate_heldout": (GATE, "heldout")},
    EvaluateSpec: {"data": (CMP, "data"), "count": (CMP, "count"), "offset": (CMP, "offset"), "task": (CMP, "task"),
                   "budgets": (CMP, "budgets"), "engine": (CMP, "engine")},
}
API = {
    api.calibrate_scale: {name: (CAL, name) for name in ("alpha", "count", "scales", "ppl_margin", "objective",
                                                         "continuation_tokens")},
    api.evaluate: {name: (EVAL, name) for name in ("data", "count", "offset", "form", "scale", "alpha", "template",
                                                   "max_new_tokens", "engine")},
}
# settings whose every CLI option must be in the table above, whichever command grows one
SETTING_NAMES = {"multiplier", "gate_prompts", "gate_count", "gate_heldout", "gate_offset", "gate_rank", "gate_chat",
                 "gate_system", "ppl_margin",
                 "objective", "continuation_tokens", "scales", "budgets"}


def _same(value):
    """A default as the settings hold it: a CLI's text parsed (numbers, comma lists), lists as tuples."""
    if isinstance(value, str):
        parts = value.split(",")
        try:
            numbers = tuple(float(p) for p in parts)
        except ValueError:
            return value
        return numbers if len(parts) > 1 else numbers[0]
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value) if len(value) != 1 else float(value[0])
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _one(settings, field):
    return _same(getattr(settings, field))


@pytest.mark.parametrize("command", sorted(CLI))
def test_cli_defaults_are_the_settings(command):
    params = {p.name: p for p in cli.commands[command].params}
    for name, (settings, field) in CLI[command].items():
        assert name in params, f"{command} has no {name}"
        assert _same(params[name].default) == _one(settings, field), (command, name)


def test_every_command_with_such_a_setting_is_checked():
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name in SETTING_NAMES:
                assert param.name in CLI.get(name, {}), f"{name} --{param.name} has no one-default check"


@pytest.mark.parametrize("command,settings", [("eval", EvalRequest), ("compare", CompareRequest)])
def test_request_fields_are_the_commands_flags(command, settings):
    """eval's and compare's flags are generated from their request's fields: each field with a help is a
    flag with the field's one default and help (the engine, whose choices are the registry's, is checked above)."""
    import dataclasses

    options = {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}
    described = [f for f in dataclasses.fields(settings) if f.metadata.get("help")]
    assert len(described) >= 10
    for f in described:
        param = options.get(f.name) or options.get(f"{f.name}_path")  # --data is received as data_path
        assert param is not None, f"{command}: the field {f.name} has no flag"
        assert param.help == f.metadata["help"], (command, f.name)
        assert _same(param.default) == _same(f.default), (command, f.name)


@pytest.mark.parametrize("spec", list(RECIPE), ids=lambda s: s.__name__)
def test_recipe_defaults_are_the_settings(spec):
    for name, (settings, field) in RECIPE[spec].items():
        assert _same(spec.model_fields[name].default) == _one(settings, field), (spec.__name__, name)


@pytest.mark.parametrize("function", list(API), ids=lambda f: f.__name__)
def test_api_defaults_are_the_settings(function):
    params = inspect.signature(function).parameters
    for name, (settings, field) in API[function].items():
        assert _same(params[name].default) == _same(getattr(settings, field)), (function.__name__, name)


def test_the_gate_and_calibration_agree_on_the_shared_strength():
    assert GATE.alpha == CAL.alpha == EVAL.alpha and GATE.ppl_margin == CAL.ppl_margin


@pytest.mark.parametrize("command,extra,message", [
    ("fold", ["--gate-count", "4"], "--gate-count applies to --mode gated-lora only"),
    ("fold", ["--alpha", "0.2", "--gate-prompts", "builtin:gsm8k-dev"],
     "--alpha, --gate-prompts apply to --mode gated-lora only"),
    ("eval", ["--gate-heldout", "3"], "--gate-heldout applies to --form gated-lora only"),
    ("eval", ["--rank", "2"], "--rank applies to --form gated-lora only"),
    ("eval", ["--scale", "2"], "--scale is the strength of another form (--form paper takes --alpha)"),
    ("eval", ["--form", "additive", "--alpha", "0.3"], "--alpha is the strength of another form"),
    ("eval-plain", ["--alpha", "0.3"], "--alpha applies to steering with --vectors: pass --vectors too"),
])
def test_options_of_another_mode_are_refused_not_ignored(command, extra, message, tiny_model_dir, tmp_path, capsys):
    import torch

    from unlock_export.method.vectors import SteeringVectors

    src = tiny_model_dir("llama")
    vec = SteeringVectors({1: torch.ones(64)}, 4, 64).save(tmp_path / "v.safetensors")
    args = {"fold": ["fold", str(src), "--vectors", str(vec)],
            "eval": ["eval", str(src), "--data", "builtin:gsm8k-dev", "--count", "2", "--vectors", str(vec)],
            "eval-plain": ["eval", str(src), "--data", "builtin:gsm8k-dev", "--count", "2"]}[command]
    capsys.readouterr()
    code = main(["--quiet", *args, *extra, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
