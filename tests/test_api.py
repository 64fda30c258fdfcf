"""The public Python API: what `import unlock_export as ux` offers, that it loads nothing heavy until
used, and that its errors speak of arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import unlock_export as ux
from unlock_export.errors import UserError

API = {"master_key", "fit_map", "fold", "write_control_vector", "additive_steering", "paper_steering",
       "calibrate_scale", "evaluate", "load_model", "MasterKey", "LowRankMap", "SteeringVectors", "FoldResult",
       "Calibration", "EvalSummary", "LoadedModel", "RuntimeOptions", "UserError", "ExportFailure",
       "fit_gates", "gated_edit", "GateSettings", "GateFit", "steering_vectors", "verify", "check_alpha",
       "compare_arms", "record_choice", "describe_artifact", "push_to_hub", "upload_text", "zoo_models", "fetch_zoo",
       "write_lm_eval_config", "write_lm_eval_task", "diagnose_transfer", "AlphaBreaksText"}


def test_all_lists_the_api_and_every_name_resolves():
    assert API | {"__version__"} == set(ux.__all__)  # nothing public is left out of this list, nothing extra
    for name in ux.__all__:
        assert getattr(ux, name) is not None, name
    with pytest.raises(AttributeError):
        ux.no_such_name  # noqa: B018


def test_the_gate_names_are_the_librarys_own():
    from unlock_export import api, settings
    from unlock_export.method import gate

    assert ux.GateSettings is settings.GateSettings is gate.GateSettings
    assert ux.GateFit is gate.GateFit and ux.gated_edit is gate.gated_edit and ux.fit_gates is api.fit_gates
    with pytest.raises(UserError, match="unknown gate settings"):
        api.fit_gates("unused", None, {"no_such_setting": 1})


@pytest.mark.parametrize("code", ["import unlock_export", "import unlock_export.cli",
                                  "from unlock_export.cli import main; main(['--help'])"])
def test_importing_the_package_and_help_load_no_torch_or_transformers(code):
    probe = f"{code}\nimport sys\nprint('HEAVY:', *(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:", done.stdout[-300:]


def test_prompts_as_a_list_and_a_source_give_the_same_key(tiny_model_dir, questions):
    model = str(tiny_model_dir("llama"))
    options = ux.RuntimeOptions(dtype="float32", device="cpu", batch_size=4)
    from_list = ux.master_key(model, prompts=questions[:6], options=options)
    assert isinstance(from_list, ux.MasterKey) and from_list.vectors.shape == (4, 64)
    from unlock_export import prompts

    again = ux.master_key(model, prompts=prompts.builtin_arithmetic(6, seed=3), options=options)
    assert torch.allclose(from_list.vectors, again.vectors)


def test_a_pair_is_used_as_it_is_and_the_callers_tokenizer_is_left_alone(tiny_model_dir, questions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("llama")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    key = ux.master_key((model, tok), prompts=questions[:4])
    spec_key = ux.master_key(str(path), prompts=questions[:4], options=ux.RuntimeOptions(dtype="float32",
                                                                                          device="cpu"))
    assert torch.allclose(key.vectors, spec_key.vectors, atol=1e-5)
    assert tok.padding_side == "right"  # copied, not changed


def test_errors_speak_of_arguments(tiny_model_dir, questions, tmp_path):
    from unlock_export.models.pool import as_loaded

    model = str(tiny_model_dir("llama"))
    with pytest.raises(UserError, match="rank must be >= 1"):
        ux.fit_map(model, model, prompts=questions[:4], rank=0)
    with pytest.raises(UserError, match="^prompts is empty"):
        ux.master_key(model, prompts=[])
    with pytest.raises(UserError, match="^model: expected a spec string"):
        as_loaded(object())
    with pytest.raises(UserError, match="^model: steering hooks go on a loaded model"):
        with ux.additive_steering(model, None, 1.0):
            pass


def test_fold_of_a_model_without_files_says_what_to_pass(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("llama")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    model.name_or_path = ""  # as if built in memory
    model.config._name_or_path = ""
    vectors = ux.SteeringVectors({1: torch.ones(64)}, 4, 64)
    with pytest.raises(UserError, match="^target: this model was loaded elsewhere"):
        ux.fold((model, tok), vectors, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_steering_vectors_carry_a_key_through_a_map_or_keep_it_on_its_own_model():
    """`steering_vectors(key, lrmap)` is the map's projection of the key; without a map, the key itself."""
    from unlock_export.method.align import fit

    g = torch.Generator().manual_seed(0)
    key = ux.MasterKey(torch.randn(4, 16, generator=g), {"unlocked_model": "src", "locked_model": "src"})
    lrmap = fit(torch.randn(4, 32, 16, generator=g), torch.randn(5, 32, 24, generator=g), 8)
    carried = ux.steering_vectors(key, lrmap, layers="1-4")
    assert carried.layers == [1, 2, 3, 4] and carried.hidden_size == 24
    for layer in carried.layers:
        assert torch.allclose(carried.directions[layer], lrmap.map_key(key.vectors)[layer])
    own = ux.steering_vectors(key, layers="all")
    assert own.layers == [0, 1, 2, 3] and torch.equal(own.directions[2], key.vectors[2])


def test_zoo_models_lists_the_zoo():
    names = [m["name"] for m in ux.zoo_models()]
    assert "qwen2.5-coder-0.5b-instruct" in names and all(isinstance(m["fetched"], bool) for m in ux.zoo_models())
