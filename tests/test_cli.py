"""The command line end to end on tiny models, and one-line errors with exit code 2."""

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from unlock_export.cli import main
from unlock_export.method.vectors import SteeringVectors
from unlock_export.recipe.spec import load_recipe

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args):
    code = main(["--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(capsys, args, match):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def test_run_recipe_end_to_end(capsys, tmp_path, tiny_recipe):
    path, _ = tiny_recipe
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "run", path, out)
    assert code == 0, err
    for name in ("key.safetensors", "map.safetensors", "vectors.safetensors", "summary.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    vec = SteeringVectors.load(out / "vectors.safetensors")
    assert vec.layer_count == 3 and vec.hidden_size == 48 and vec.layers == [0, 1, 2]
    assert vec.model_hint == "qwen2" and vec.provenance["rank"] == "8"
    assert all(n > 0 for n in vec.norms().values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source_layers"] == 4 and summary["target_layers"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    # an existing output folder is refused, untouched
    assert_one_line_error(capsys, ["run", path, out], "exists")


def test_interrupted_run_resumes_captures_with_identical_outputs(capsys, tmp_path, tiny_recipe, monkeypatch):
    import unlock_export.method.capture as capture_mod

    path, _ = tiny_recipe
    real, calls = capture_mod.tokenize, []

    def counting(*args, **kwargs):  # one call per capture batch
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "tokenize", counting)
    assert run_cli(capsys, "run", path, tmp_path / "whole")[0] == 0
    fresh_batches = len(calls)

    def interrupt_tenth(*args, **kwargs):  # 4 locked + 4 unlocked batches, then the target's second
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(capture_mod, "tokenize", interrupt_tenth)
    out = tmp_path / "cut"
    code, _, err = run_cli(capsys, "run", path, out)
    assert code == 130 and not out.exists()
    partial = tmp_path / ".cut.partial"
    assert len(list(partial.glob("capture-*.safetensors"))) == 3  # locked, unlocked, target (1 batch)
    assert_one_line_error(capsys, ["run", path, out], "--resume")  # neither --resume nor --overwrite
    calls.clear()
    monkeypatch.setattr(capture_mod, "tokenize", counting)
    code, _, err = run_cli(capsys, "run", path, out, "--resume")
    assert code == 0, err
    assert len(calls) == fresh_batches - 9  # only the unfinished batches ran again
    assert not partial.exists()
    from safetensors.torch import load_file

    for name in ("key.safetensors", "map.safetensors", "vectors.safetensors"):
        resumed, whole = load_file(out / name), load_file(tmp_path / "whole" / name)
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole), name
    # --overwrite starts over, discarding kept progress
    partial.mkdir()
    (partial / "capture-stale.safetensors").write_bytes(b"x")
    calls.clear()
    assert run_cli(capsys, "run", path, out, "--overwrite")[0] == 0
    assert len(calls) >= fresh_batches and not partial.exists()


def test_recipe_with_fold_step(capsys, tmp_path, tiny_recipe):
    from transformers import AutoModelForCausalLM

    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "scale": 0.5, "layers": "1-2"}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", path, out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fold"]["verification"]["passed"] and summary["fold"]["layers"] == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM"  # the qwen2 target, relabelled
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_recipe_writes_diagnostics_and_plots(capsys, tmp_path, tiny_recipe):
    path, recipe = tiny_recipe
    recipe["diagnostics"] = {"heldout_count": 12}
    recipe["fold"] = {"mode": "bias", "scale": 0.5}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", path, out)
    assert code == 0, err
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["layers"] == [0, 1, 2] and diag["heldout_prompts"] == 12
    assert len(diag["map_r2_heldout"]) == 3 and all(r <= 1.0 for r in diag["map_r2_heldout"])
    assert len(diag["cosine_target_key"]) == 3 and all(-1 <= c <= 1 for c in diag["cosine_target_key"])
    assert all(n > 0 for n in diag["key_norm"] + diag["vector_norm"])
    png = (out / "diagnostics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    card = (out / "model" / "README.md").read_text()
    assert "| diagnostics | held-out map R^2 mean" in card
    assert json.loads((out / "summary.json").read_text())["diagnostics"].startswith("held-out map R^2")


def test_accuracy_vs_scale_plot(tmp_path):
    from unlock_export.evaluation.diagnostics import plot_accuracy_vs_scale

    path = plot_accuracy_vs_scale([{"scale": s, "accuracy": a, "ci95": [a - 0.1, a + 0.1]}
                                   for s, a in [(0, 0.3), (2, 0.45), (4, 0.5), (8, 0.2)]], tmp_path / "acc.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def test_recipe_without_matplotlib_writes_json_and_says_how_to_get_plots(capsys, caplog, tmp_path, tiny_recipe,
                                                                         monkeypatch):
    from unlock_export.evaluation import diagnostics

    monkeypatch.setattr(diagnostics, "plots_available", lambda: False)
    path, _ = tiny_recipe
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", path, out)
    assert code == 0, err
    assert (out / "diagnostics.json").is_file() and not (out / "diagnostics.png").exists()
    assert "unlock-export[plots]" in caplog.text + err
    with pytest.raises(diagnostics.UserError, match=r"unlock-export\[plots\]"):
        diagnostics.plot_accuracy_vs_scale([{"scale": 0, "accuracy": 0.5, "ci95": [0.4, 0.6]}], tmp_path / "a.png")


@pytest.mark.parametrize("objective", ["answer-start", "continuation"])
def test_recipe_fold_scale_auto_is_calibrated_without_labels(objective, capsys, tmp_path, tiny_recipe):
    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "layers": "1-2", "alpha": 0.5, "calibrate_count": 6, "ppl_margin": 10.0,
                      "objective": objective, "continuation_tokens": 4}
    recipe["runtime"]["batch_size"] = "auto"  # resolved for every stage, calibration included
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", path, out)
    assert code == 0, err
    calibration = json.loads((out / "calibration.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    # the fold steers layers 1-2; the paper-form reference it is matched to keeps every vector layer
    assert calibration["reference"] == {"form": "paper", "alpha": 0.5, "layers": [0, 1, 2]}
    assert calibration["layers"] == [1, 2] and calibration["objective"] == objective
    card = (out / "model" / "README.md").read_text()
    assert ("continuations" in card) == (objective == "continuation")
    assert summary["fold"]["scale"] == calibration["scale"] > 0
    assert calibration["kl_to_reference"] < calibration["kl_unsteered_to_reference"]
    check = calibration["alpha_check"]  # the reference was checked first: it still writes text
    assert check["alpha"] == 0.5 and check["fluency_ratio"] <= 1 + check["margin"] and check["prompts"] == 6


def test_recipe_refuses_to_calibrate_against_a_paper_form_that_breaks_the_text(capsys, tmp_path, tiny_recipe):
    path, recipe = tiny_recipe
    recipe["fold"] = {"mode": "bias", "alpha": 100.0, "calibrate_count": 4, "alpha_margin": 0.0}
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # the fixture's own output
    assert_one_line_error(capsys, ["run", path, tmp_path / "out"], "fold.alpha 100 breaks the target's text")
    assert not (tmp_path / "out").exists()
    recipe["fold"]["check_alpha"] = False  # the user's call: calibrate anyway
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(capsys, "run", path, tmp_path / "out", "--resume")  # the captures are kept
    assert code == 0, err
    assert "alpha_check" not in json.loads((tmp_path / "out" / "calibration.json").read_text())


def test_stage_commands_match_the_recipe(capsys, tmp_path, tiny_recipe):
    path, recipe = tiny_recipe
    src, tgt = recipe["source"]["locked"]["model"], recipe["target"]["model"]
    common = ["--prompts", "builtin:arithmetic", "--count", "16", "--dtype", "float32", "--device", "cpu",
              "--batch-size", "4"]
    assert run_cli(capsys, "key", "--locked", src, "-o", tmp_path / "k.st", *common)[0] == 0
    assert run_cli(capsys, "align", "--source", src, "--target", tgt, "--rank", "8",
                   "-o", tmp_path / "m.st", *common)[0] == 0
    assert run_cli(capsys, "project", "--key", tmp_path / "k.st", "--map", tmp_path / "m.st",
                   "--layers", "1-2", "-o", tmp_path / "v.st")[0] == 0
    assert run_cli(capsys, "run", path, tmp_path / "out")[0] == 0
    staged = SteeringVectors.load(tmp_path / "v.st")
    whole = SteeringVectors.load(tmp_path / "out" / "vectors.safetensors")
    assert staged.layers == [1, 2]
    for layer in staged.layers:
        assert torch.allclose(staged.directions[layer], whole.directions[layer], atol=1e-5)
    # --self: the key as vectors for its own model (4 layers, hidden 64), exactly the key's rows
    from unlock_export.method.key import MasterKey

    assert run_cli(capsys, "project", "--key", tmp_path / "k.st", "--self", "--layers", "1-3",
                   "-o", tmp_path / "self.st")[0] == 0
    own, key = SteeringVectors.load(tmp_path / "self.st"), MasterKey.load(tmp_path / "k.st").vectors
    assert (own.layer_count, own.hidden_size, own.layers) == (key.shape[0], key.shape[1], [1, 2, 3])
    assert own.model_hint == "llama" and all(torch.equal(own.directions[b], key[b]) for b in own.layers)
    for extra in ([], ["--self", "--map", tmp_path / "m.st"]):
        assert_one_line_error(capsys, ["project", "--key", tmp_path / "k.st", *extra, "-o", tmp_path / "x.st"],
                              "pass --map MAP")
    assert not (tmp_path / "x.st").exists()


def _every_command(group, path=()):
    import click

    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _every_command(command, (*path, name))


def test_help_shows_examples(capsys):
    """Every command of the click group (derived from it, so a new command is covered) has --help with
    an example."""
    from unlock_export.cli import cli

    commands = list(_every_command(cli))
    assert {("run",), ("check-alpha",), ("zoo", "fetch")} <= set(commands)
    for cmd in [[], *map(list, commands)]:
        code = main([*cmd, "--help"])
        out = capsys.readouterr().out
        assert code == 0 and "Example" in out, cmd


def test_shell_completion_script(tmp_path):
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "unlock-export"
    env = {**os.environ, "_UNLOCK_EXPORT_COMPLETE": "bash_source"}
    script = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "_unlock_export_completion" in script and "complete " in script
    env = {**os.environ, "_UNLOCK_EXPORT_COMPLETE": "bash_complete", "COMP_WORDS": "unlock-export pu", "COMP_CWORD": "1"}
    words = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "push" in words


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "unlock-export, version" in capsys.readouterr().out


def test_shipped_recipes_validate_and_plan(capsys, tmp_path):
    """Every shipped recipe validates and its dry run resolves every input (zoo models need not be
    fetched: the plan says what would be), with no data file beside the checkout."""
    shipped = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(shipped) >= 5
    for path in shipped:
        recipe = load_recipe(path)
        assert recipe.source.locked.model and recipe.target.model, path
        assert recipe.prompts.path.startswith("builtin:"), path
        code, out, err = run_cli(capsys, "--json", "run", "--dry-run", path, tmp_path / path.stem)
        assert code == 0, (path, err)
        plan = json.loads(out)
        assert plan["recipe"] == recipe.name and plan["prompts"]["key"] == recipe.prompts.key_count
        assert not (tmp_path / path.stem).exists()


def test_dry_run_plans_without_loading_or_writing(capsys, tmp_path, tiny_recipe, monkeypatch):
    import unlock_export.models.loading as models_mod

    path, raw = tiny_recipe
    raw = {**raw, "key": {"answer_tokens": 2}, "fold": {"mode": "bias", "scale": "auto", "calibrate_count": 4},
           "diagnostics": {"heldout_count": 4}}
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(models_mod, "load", lambda *a, **k: pytest.fail("a dry run loaded a model"))
    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "--json", "run", "--dry-run", path, out)
    assert code == 0, err
    plan = json.loads(text)
    assert [s["name"] for s in plan["stages"]] == ["key", "align", "project", "diagnostics", "calibrate", "fold"]
    source, target = raw["source"]["locked"]["model"], raw["target"]["model"]
    assert plan["models"][source]["layers"] == 4 and plan["models"][target]["layers"] == 3  # from config.json
    assert plan["prompts"] == {"source": "builtin:arithmetic", "offset": 0, "key": 16, "align": 16, "heldout": 4}
    # the source: two key captures of 16 prompts (the unlocked one after writing 2 tokens each), a fresh
    # align capture (the key read the answer, so its capture is not reused) and the held-out 4
    assert plan["models"][source]["prompt_passes"] == 16 + 16 + 16 + 16 + 4
    assert plan["models"][source]["generated_tokens"] == 16 * 2
    assert "model/" in plan["outputs"] and "calibration.json" in plan["outputs"]
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # the text form names the stages and models
    code, text, _ = run_cli(capsys, "run", "--dry-run", path, out)
    assert code == 0 and "1. key" in text and target in text and "nothing loaded, fetched or written" in text


def test_dry_run_refuses_what_the_run_would(capsys, tmp_path, tiny_recipe):
    path, raw = tiny_recipe
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"question": f"q{i}?"}) + "\n" for i in range(10)))
    path.write_text(yaml.safe_dump({**raw, "prompts": {"path": str(few), "key_count": 16}}))
    assert_one_line_error(capsys, ["run", "--dry-run", path, tmp_path / "o"], "holds 10 prompts")
    path.write_text(yaml.safe_dump({**raw, "target": {"model": "zoo:no-such-model"}}))
    assert_one_line_error(capsys, ["run", "--dry-run", path, tmp_path / "o"], "no-such-model")
    path.write_text(yaml.safe_dump({**raw, "prompts": {"path": "builtin:gsm8k-test"}}))
    assert_one_line_error(capsys, ["run", "--dry-run", path, tmp_path / "o"], "unknown builtin data set")
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "o").mkdir()
    assert_one_line_error(capsys, ["run", "--dry-run", path, tmp_path / "o"], "exists")


# -- bad input: one line, exit code 2 ---------------------------------------------------------
def test_missing_model(capsys, tmp_path):
    assert_one_line_error(capsys, ["key", "--locked", tmp_path / "nope", "-o", tmp_path / "k"], "not found")


def test_unknown_zoo_model(capsys, tmp_path):
    assert_one_line_error(capsys, ["key", "--locked", "zoo:gpt-17", "-o", tmp_path / "k"], "not a zoo model")


def test_gguf_of_unsupported_architecture(capsys, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(capsys, ["key", "--locked", path, "-o", tmp_path / "k"], "architecture 'rwkv6'")


def test_corrupt_gguf(capsys, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert_one_line_error(capsys, ["key", "--locked", path, "-o", tmp_path / "k"], "not a readable GGUF")


def test_empty_prompt_file(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_one_line_error(capsys, ["key", "--locked", tiny_model_dir("llama"), "--prompts", empty,
                                   "-o", tmp_path / "k"], "holds no prompts")


def test_prompt_file_without_field(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "hello"}\n')
    assert_one_line_error(capsys, ["key", "--locked", tiny_model_dir("llama"), "--prompts", bad,
                                   "-o", tmp_path / "k"], "no string field 'question'")


def test_layer_out_of_range(capsys, tmp_path, tiny_recipe):
    path, _ = tiny_recipe
    assert run_cli(capsys, "run", path, tmp_path / "out")[0] == 0
    assert_one_line_error(capsys, ["project", "--key", tmp_path / "out/key.safetensors", "--map",
                                   tmp_path / "out/map.safetensors", "--layers", "9", "-o", tmp_path / "v"],
                          "out of range")
    assert not (tmp_path / "v").exists()


def test_rank_below_one(capsys, tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")
    assert_one_line_error(capsys, ["align", "--source", d, "--target", d, "--rank", "0", "-o", tmp_path / "m"],
                          "rank must be at least 1")


def test_nan_activations(capsys, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(src).save_pretrained(bad)
    assert_one_line_error(capsys, ["key", "--locked", bad, "--count", "4", "--device", "cpu",
                                   "-o", tmp_path / "k"], "NaN or inf")
    assert not (tmp_path / "k").exists()


def test_identical_variants(capsys, tmp_path, tiny_model_dir):
    d = tiny_model_dir("llama")
    assert_one_line_error(capsys, ["key", "--locked", d, "--unlocked-template", "direct", "-o", tmp_path / "k"],
                          "identical")


def test_recipe_with_unknown_key(capsys, tmp_path, tiny_recipe):
    _, recipe = tiny_recipe
    recipe["align"]["rnak"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert_one_line_error(capsys, ["run", path, tmp_path / "o"], "unknown key 'align.rnak'")


def test_recipe_with_wrong_type(capsys, tmp_path, tiny_recipe):
    _, recipe = tiny_recipe
    recipe["align"]["rank"] = "sixteen"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert_one_line_error(capsys, ["run", path, tmp_path / "o"], "align.rank")


def test_unknown_option_is_one_line(capsys):
    assert_one_line_error(capsys, ["key", "--bogus"], "No such option")


def test_run_help_names_every_recipe_key(capsys):
    """`run --help` lists the recipe keys section by section (`fold.{mode,scale,...}`): a key counts only
    inside its own section's braces, so none may go missing when a spec gains a field."""
    import re

    from unlock_export.recipe import spec as recipe_mod

    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    specs = {"fold": recipe_mod.FoldSpec, "diagnostics": recipe_mod.DiagnosticsSpec, "push": recipe_mod.PushSpec,
             "runtime": recipe_mod.RuntimeOptions, "vectors": recipe_mod.VectorsSpec, "prompts": recipe_mod.PromptSpec,
             "gguf": recipe_mod.GgufSpec, "align": recipe_mod.AlignSpec, "key": recipe_mod.KeySpec,
             "evaluate": recipe_mod.EvaluateSpec, "target": recipe_mod.TargetSpec}
    missing = []
    for section, spec in specs.items():
        found = re.search(rf"(?<![\w.]){section}\.(?:\{{([^}}]*)\}}|(\w+))", text)
        listed = set(re.findall(r"[a-z_]+", found.group(1) or found.group(2))) if found else set()
        missing += [f"{section}.{key}" for key in spec.model_fields if key not in listed]
    assert not missing, missing


def test_answer_token_key_in_a_recipe_matches_the_key_command(capsys, tmp_path, tiny_recipe):
    path, recipe = tiny_recipe
    recipe["key"] = {"method": "mean", "answer_tokens": 3}
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli(capsys, "run", path, tmp_path / "out")[0] == 0
    src = recipe["source"]["locked"]["model"]
    code, _, err = run_cli(capsys, "key", "--locked", src, "--answer-tokens", "3", "--prompts", "builtin:arithmetic",
                           "--count", "16", "--dtype", "float32", "--device", "cpu", "--batch-size", "4",
                           "-o", tmp_path / "k.st")
    assert code == 0, err
    from unlock_export.method.key import MasterKey

    staged, whole = MasterKey.load(tmp_path / "k.st"), MasterKey.load(tmp_path / "out" / "key.safetensors")
    assert staged.provenance["answer_tokens"] == whole.provenance["answer_tokens"] == "3"
    assert torch.allclose(staged.vectors, whole.vectors, atol=1e-5)
    vectors = SteeringVectors.load(tmp_path / "out" / "vectors.safetensors")
    assert vectors.provenance["key_answer_tokens"] == "3"
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert len(diag["cosine_target_key"]) == len(diag["layers"])  # the target's own key, read the same way
    recipe["key"]["answer_tokens"] = -2
    path.write_text(yaml.safe_dump(recipe))
    assert_one_line_error(capsys, ["run", path, tmp_path / "out2"], "key.answer_tokens")


def test_quiet_silences_the_gguf_dequantization_bar_too(capsys):
    """transformers' GGUF loader calls tqdm directly; while loading, it follows transformers' switch."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from unlock_export.models.loading import gguf_progress_follows_transformers

    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        with gguf_progress_follows_transformers():
            assert isinstance(gguf_utils.tqdm, functools.partial)
            list(gguf_utils.tqdm(range(3), desc="de-quantizing"))
        assert "de-quantizing" not in capsys.readouterr().err
        assert not isinstance(gguf_utils.tqdm, functools.partial)  # restored after loading
        hf_logging.enable_progress_bar()
        with gguf_progress_follows_transformers():
            list(gguf_utils.tqdm(range(3), desc="de-quantizing"))
        assert "de-quantizing" in capsys.readouterr().err  # shown when progress is on
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
