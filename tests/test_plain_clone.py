"""The project runs from a plain copy of its files, with nothing beside it: no data folder next to the
checkout, no fetched data. The copy's own package is what runs (checked), from the copy's folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("unlock_export", "recipes", "scripts", "Makefile", "README.md", "docs")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repo's files (tracked, and untracked ones git does not ignore) copied into an empty folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    root = tmp_path_factory.mktemp("plain") / "unlock-export"
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    assert not (root.parent / "shared").exists()
    return root


def _cli(root: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "unlock_export.cli", "--quiet", *map(str, args)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_the_copy_runs_its_own_package(clone):
    env = {**os.environ, "PYTHONPATH": str(clone)}
    where = subprocess.run([sys.executable, "-c", "import unlock_export; print(unlock_export.__file__)"], cwd=clone,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(clone)
    assert (clone / "unlock_export" / "data" / "gsm8k-train.jsonl.gz").is_file()


def test_the_product_never_refers_to_the_workplace_data_folder(clone):
    hits = []
    for top in PRODUCT:
        paths = [clone / top] if (clone / top).is_file() else sorted((clone / top).rglob("*"))
        for path in paths:
            if path.is_file() and path.suffix not in (".gz", ".png"):
                text = path.read_text(encoding="utf-8", errors="replace")
                hits += [f"{path.relative_to(clone)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                         if "shared/" in line]
    assert not hits, hits


def test_every_shipped_recipe_dry_runs(clone, tmp_path):
    recipes = sorted((clone / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        done = _cli(clone, "--json", "run", "--dry-run", recipe, tmp_path / recipe.stem)
        assert done.returncode == 0, (recipe.name, done.stderr)
        plan = json.loads(done.stdout)
        assert plan["stages"][0]["name"] == "key" and not (tmp_path / recipe.stem).exists()


def test_a_recipe_on_the_packaged_questions_runs_end_to_end(clone, tmp_path, tiny_recipe):
    _, raw = tiny_recipe
    raw = {**raw, "prompts": {"path": "builtin:gsm8k-train", "key_count": 8}, "diagnostics": {"heldout_count": 4},
           "fold": {"mode": "bias", "scale": 1.0}}
    path = tmp_path / "gsm8k.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = _cli(clone, "--json", "run", path, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n_prompts_key"] == 8 and summary["fold"]["verification"]["max_abs_dlogit"] <= 1e-3
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_eval_on_the_packaged_dev_split(clone, tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    done = _cli(clone, "--json", "eval", model, "--data", "builtin:gsm8k-dev", "--count", "2", "--max-new-tokens", "4",
                "--device", "cpu", "--dtype", "float32", "-o", tmp_path / "ev")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and re.match(r"Janet", rows[0]["question"])
