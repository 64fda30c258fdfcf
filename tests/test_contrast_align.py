"""Alignment on the key's own contrast (align --contrast-template / --contrast-system, recipe
align.contrast): the map pairs the prompts in both of the key's formats, equals a hand computation, and
carries a prompt-contrast key where the plain map does not."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from unlock_export import prompts
from unlock_export.cli import main
from unlock_export.method import align
from unlock_export.method.align import LowRankMap
from unlock_export.method.pipeline import capture_states, compute_key, compute_map
from unlock_export.models.pool import ModelPool
from unlock_export.models.runtime import RuntimeOptions


def _pool():
    return ModelPool(RuntimeOptions(dtype="float32", device="cpu", batch_size=4), progress=False)


def test_the_contrast_map_pairs_both_formats_as_a_hand_computation(tiny_model_dir):
    source, target = str(tiny_model_dir("llama")), str(tiny_model_dir("qwen2", hidden=48, layers=3))
    questions = prompts.builtin_arithmetic(12, seed=5)
    pool = _pool()
    lrmap = compute_map(pool, source, target, "direct", "direct", questions, 4, contrast=("cot", None))
    xs = torch.cat([capture_states(pool, source, t, questions, "s") for t in ("direct", "cot")], dim=1)
    xb = torch.cat([capture_states(pool, target, t, questions, "t") for t in ("direct", "cot")], dim=1)
    by_hand = align.fit(xs, xb, 4)
    key = torch.randn(xs.shape[0], xs.shape[-1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lrmap.map_key(key), by_hand.map_key(key), atol=1e-5)
    assert lrmap.provenance["contrast"] == "template cot"


def test_the_contrast_map_carries_a_template_key_the_plain_map_does_not(tiny_model_dir):
    """Label-free fidelity on tiny models: the CoT-template key carried by each map against the target's
    own key (the same contrast computed on the target), alignment on other questions than the key's."""
    source, target = str(tiny_model_dir("llama")), str(tiny_model_dir("qwen2", hidden=48, layers=3))
    pool = _pool()
    key_q, align_q = prompts.builtin_arithmetic(16, seed=1), prompts.builtin_arithmetic(24, seed=2)
    source_key = compute_key(pool, source, source, "direct", "cot", key_q)[0].vectors
    target_key = compute_key(pool, target, target, "direct", "cot", key_q)[0].vectors
    cosine = {}
    for name, contrast in (("plain", None), ("contrast", ("cot", None))):
        lrmap = compute_map(pool, source, target, "direct", "direct", align_q, 8, contrast=contrast)
        moved = lrmap.map_key(source_key)[1:]
        cosine[name] = float(torch.nn.functional.cosine_similarity(moved, target_key[1:], dim=-1).mean())
    print(cosine)
    assert cosine["contrast"] > 0.9 and cosine["contrast"] > cosine["plain"] + 0.2


def test_align_command_contrast_and_refusals(tiny_model_dir, tmp_path, capsys):
    source, target = str(tiny_model_dir("llama")), str(tiny_model_dir("qwen2", hidden=48, layers=3))
    base = ["align", "--source", source, "--target", target, "--prompts", "builtin:arithmetic", "--count", "8",
            "--rank", "4", "--device", "cpu", "--dtype", "float32"]
    out = tmp_path / "map.safetensors"
    assert main(["--quiet", *base, "--contrast-template", "cot", "-o", str(out)]) == 0
    assert LowRankMap.load(out).provenance["contrast"] == "template cot"
    for extra, message in [(["--contrast-system", "x"], "chat turns"),
                           (["--contrast-template", "direct"], "equals the prompts' own"),
                           (["--contrast-template", "cot", "--target-template", "plain"], "one template")]:
        capsys.readouterr()
        assert main([*base, *extra, "-o", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "x.safetensors").exists()


def test_recipe_align_contrast_runs_and_is_planned(tiny_recipe, tmp_path, capsys):
    path, recipe = tiny_recipe
    recipe["align"]["contrast"] = True
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", "--dry-run", str(path), str(tmp_path / "p")]) == 0
    assert "and the same in the unlocked format 'cot'" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["--quiet", "run", str(path), str(out)]) == 0
    assert LowRankMap.load(out / "map.safetensors").provenance["contrast"] == "template cot"
    # the recipe's map is the command's
    assert main(["--quiet", "align", "--source", recipe["source"]["locked"]["model"], "--target",
                 recipe["target"]["model"], "--prompts", "builtin:arithmetic", "--count", "16", "--rank", "8",
                 "--contrast-template", "cot", "--device", "cpu", "--dtype", "float32", "--batch-size", "4",
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    key = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    a, b = LowRankMap.load(out / "map.safetensors"), LowRankMap.load(tmp_path / "m.safetensors")
    assert torch.allclose(a.map_key(key), b.map_key(key), atol=1e-4)
    assert json.loads((out / "summary.json").read_text())["rank"] == 8


@pytest.mark.parametrize("change,message", [
    ({"source": {"locked": {"model": "S", "template": "direct"}, "unlocked": {"model": "S", "template": "direct"}}},
     "formats are the same"),
    ({"target": {"template": "plain"}}, "drop target.template"),
])
def test_recipe_align_contrast_refusals(tiny_recipe, tmp_path, capsys, change, message):
    path, recipe = tiny_recipe
    recipe["align"]["contrast"] = True
    for section, value in change.items():
        if section == "source":
            model = recipe["source"]["locked"]["model"]
            recipe["source"] = {k: {**v, "model": model} for k, v in value.items()}
        else:
            recipe[section] = {**recipe[section], **value}
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", "--dry-run", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def _pairs(n: int, seed: int) -> list:
    """Text pairs that differ in one systematic way (an answer in capitals against the same in lower case)."""
    return [prompts.Pair(f"Question: {q}\nAnswer: THE ANSWER IS SHORT.", f"Question: {q}\nAnswer: the answer is short.",
                         None, i) for i, q in enumerate(prompts.builtin_arithmetic(n, seed=seed), 1)]


def test_the_pairs_contrast_map_pairs_both_sides_as_a_hand_computation(tiny_model_dir):
    from unlock_export.method.pipeline import pair_states

    source, target = str(tiny_model_dir("llama")), str(tiny_model_dir("qwen2", hidden=48, layers=3))
    questions, pairs = prompts.builtin_arithmetic(12, seed=5), _pairs(6, 7)
    pool = _pool()
    lrmap = compute_map(pool, source, target, "direct", "direct", questions, 4, contrast_pairs=pairs)
    sides = [p.positive for p in pairs] + [p.negative for p in pairs]
    xs = torch.cat([capture_states(pool, source, "direct", questions, "s"),
                    capture_states(pool, source, "plain", sides, "s")], dim=1)
    xb = torch.cat([capture_states(pool, target, "direct", questions, "t"),
                    capture_states(pool, target, "plain", sides, "t")], dim=1)
    assert torch.allclose(pair_states(pool, source, pairs, None, "s"), xs[:, len(questions):])
    by_hand = align.fit(xs, xb, 4)
    key = torch.randn(xs.shape[0], xs.shape[-1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lrmap.map_key(key), by_hand.map_key(key), atol=1e-5)
    assert lrmap.provenance["contrast_pairs"] == "6"


def test_the_pairs_contrast_map_carries_a_pairs_key_the_plain_map_does_not(tiny_model_dir):
    """The pairs key carried by each map against the target's own pairs key (the same pairs on the
    target); the map is fitted on other questions and other pairs than the key's."""
    from unlock_export.method.pipeline import compute_pair_key

    source, target = str(tiny_model_dir("llama")), str(tiny_model_dir("qwen2", hidden=48, layers=3))
    pool = _pool()
    key_pairs, align_pairs = _pairs(16, 1), _pairs(16, 2)
    source_key = compute_pair_key(pool, source, key_pairs).vectors
    target_key = compute_pair_key(pool, target, key_pairs).vectors
    questions = prompts.builtin_arithmetic(24, seed=3)
    cosine = {}
    for name, pairs in (("plain", None), ("pairs", align_pairs)):
        lrmap = compute_map(pool, source, target, "direct", "direct", questions, 8, contrast_pairs=pairs)
        moved = lrmap.map_key(source_key)[1:]
        cosine[name] = float(torch.nn.functional.cosine_similarity(moved, target_key[1:], dim=-1).mean())
    print(cosine)
    assert cosine["pairs"] > 0.85 and cosine["pairs"] > cosine["plain"] + 0.5  # measured: 0.91 against -0.16


def test_recipe_align_contrast_with_pairs_runs_and_equals_the_command(tiny_recipe, tmp_path, capsys):
    path, recipe = tiny_recipe
    rows = [{"positive": p.positive, "negative": p.negative} for p in _pairs(6, 4)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = recipe["source"]["locked"]["model"]
    recipe["source"] = {"pairs": {"path": str(pairs_file), "model": source}}
    recipe["align"]["contrast"] = True
    recipe.pop("diagnostics", None)
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["run", "--dry-run", str(path), str(tmp_path / "p")]) == 0
    assert "and both sides of the 6 pairs" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["--quiet", "run", str(path), str(out)]) == 0, capsys.readouterr().err
    assert LowRankMap.load(out / "map.safetensors").provenance["contrast_pairs"] == "6"
    assert main(["--quiet", "align", "--source", source, "--target", recipe["target"]["model"], "--prompts",
                 "builtin:arithmetic", "--count", "16", "--rank", "8", "--contrast-pairs", str(pairs_file),
                 "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "-o", str(tmp_path / "m.safetensors")]) == 0
    key = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    a, b = LowRankMap.load(out / "map.safetensors"), LowRankMap.load(tmp_path / "m.safetensors")
    assert torch.allclose(a.map_key(key), b.map_key(key), atol=1e-4)
