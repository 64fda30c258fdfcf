"""Export forms are plug-ins: a toy form registered with one line of FORMS is a choice of `fold --mode`,
of the recipe's fold.mode and of the generated recipe reference, and folds end to end through the
shared skeleton (the stock reload, the verification, the card), while the options it does not take
are refused from its declaration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unlock_export.cli import main
from unlock_export.export import forms
from unlock_export.export.forms import CardText
from unlock_export.export.forms.bias import BiasForm
from unlock_export.method.vectors import SteeringVectors

ROOT = Path(__file__).resolve().parents[1]


class ToyForm(BiasForm):
    """A bias checkpoint whose card says it came from the toy form (the bias form's files)."""

    name = "toy-bias"
    summary = "a bias checkpoint with a toy card"

    def card(self, result, target: str, context: dict) -> CardText:
        return CardText("a toy bias", "Load it with transformers.", note="Made by the toy form.")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(forms.FORMS, "toy-bias", ToyForm())  # the one registry line
    return forms.FORMS["toy-bias"]


def _vectors(tmp_path) -> Path:
    generator = torch.Generator().manual_seed(0)
    return SteeringVectors({1: torch.randn(64, generator=generator), 2: torch.randn(64, generator=generator)},
                           4, 64).save(tmp_path / "v.safetensors")


def test_a_registered_form_folds_end_to_end_and_is_a_cli_choice(toy, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    out = tmp_path / "toy"
    assert main(["--quiet", "fold", str(src), "--vectors", str(_vectors(tmp_path)), "--mode", "toy-bias",
                 "--scale", "2", "-o", str(out)]) == 0
    info = json.loads((out / "unlock.json").read_text())
    assert info["mode"] == "toy-bias" and info["peft_type"] is None and info["verification"]["passed"]
    assert "Made by the toy form." in (out / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    folded = AutoModelForCausalLM.from_pretrained(str(out))  # the stock library loads it, no custom code
    assert folded.model.layers[1].mlp.down_proj.bias is not None
    capsys.readouterr()
    assert main(["fold", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "toy-bias" in help_text.split("--mode [", 1)[1].split("]", 1)[0]


def test_a_registered_form_is_in_the_recipe_schema_and_its_reference(toy):
    from unlock_export.recipe.spec import FoldSpec

    assert FoldSpec(mode="toy-bias").mode == "toy-bias"
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        FoldSpec(mode="nope")
    spec = importlib.util.spec_from_file_location("render_docs_toy", ROOT / "scripts" / "render_docs.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    row = next(line for line in render.render_recipes().splitlines() if line.startswith("| `fold.mode`"))
    assert "`toy-bias`" in row and "`gated-lora`" in row


def test_options_a_form_does_not_take_are_refused_from_its_declaration(toy, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    vec = str(_vectors(tmp_path))
    for extra, message in [(["--rank", "4"], "--rank applies to --mode lora or --mode gated-lora only (a toy-bias "
                                             "fold has no rank)"),
                           (["--merge"], "--merge applies to --mode gated-lora only (a toy-bias fold is already a "
                                         "checkpoint)")]:
        capsys.readouterr()
        code = main(["--quiet", "fold", str(src), "--vectors", vec, "--mode", "toy-bias", *extra,
                     "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_the_registry_declares_each_form():
    assert forms.form_names() == ("bias", "adapter", "lora", "gated-lora")
    assert [forms.form(n).peft_type(False) for n in forms.form_names()] == [None, "BEFT", "LORA", "LORA"]
    assert forms.form("gated-lora").peft_type(True) is None  # merged: a checkpoint
    assert forms.forms_with(lambda f: f.default_rank is not None) == ["lora", "gated-lora"]
    assert forms.forms_with(lambda f: f.fits_gates) == ["gated-lora"]
