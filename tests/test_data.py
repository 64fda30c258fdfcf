"""The data sets shipped inside the package (GSM8K, MIT): builtin:gsm8k-train and builtin:gsm8k-dev."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest

from unlock_export import prompts
from unlock_export.cli import main
from unlock_export.errors import UserError
from unlock_export.evaluation.run import load_items

REPO = Path(__file__).resolve().parents[1]


def test_train_questions_are_shipped_without_answers():
    path = prompts.builtin_file("gsm8k-train")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 7473 and all(set(r) == {"question"} for r in rows)  # unlabeled: no answers shipped
    qs = prompts.load_questions("builtin:gsm8k-train", count=3)
    assert qs[0].startswith("Natalia sold clips to 48 of her friends in April")
    assert prompts.load_questions("builtin:gsm8k-train", count=2, offset=1) == qs[1:3]
    assert len(prompts.load_questions("builtin:gsm8k-train")) == 7473


def test_dev_split_has_answers_for_eval():
    items = load_items("builtin:gsm8k-dev")
    assert len(items) == 400 and [it.index for it in items[:3]] == [0, 1, 2]
    assert items[0].question.startswith("Janet") and items[0].gold == Fraction(18)
    later = load_items("builtin:gsm8k-dev", count=2, offset=10)
    assert [it.index for it in later] == [10, 11] and later[0].question == items[10].question
    # the dev questions are prompts too
    assert prompts.load_questions("builtin:gsm8k-dev", count=1)[0] == items[0].question


def test_a_users_gzip_jsonl_reads_like_plain(tmp_path):
    rows = [{"question": "What is 2 + 3?", "answer": "#### 5"}, {"question": "What is 4 * 2?", "answer": "8"}]
    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(packed, "wt") as fh:
        fh.write(plain.read_text())
    assert prompts.load_questions(packed) == prompts.load_questions(plain) == [r["question"] for r in rows]
    assert [(i.question, i.gold) for i in load_items(packed)] == [(i.question, i.gold) for i in load_items(plain)]


def test_unknown_builtin_is_refused_naming_the_sets(capsys, tmp_path):
    with pytest.raises(UserError, match="builtin:gsm8k-train"):
        prompts.load_questions("builtin:gsm8k-test")
    with pytest.raises(UserError, match="builtin:gsm8k-dev"):
        load_items("builtin:nope")
    assert main(["eval", "zoo:smollm2-135m-instruct", "--data", "builtin:nope", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown builtin data set 'builtin:nope'" in err[0]
    assert not (tmp_path / "o").exists()


def test_wheel_carries_the_data_and_its_licence(tmp_path):
    """The data are package data: a built wheel holds both sets and GSM8K's licence."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("unlock_export-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("gsm8k-train.jsonl.gz", "gsm8k-dev.jsonl.gz", "LICENSE-GSM8K"):
        assert f"unlock_export/data/{member}" in names, member
    licence = zipfile.ZipFile(wheel).read("unlock_export/data/LICENSE-GSM8K").decode()
    assert "MIT License" in licence and "OpenAI" in licence
    # the package's own licence as an SPDX expression, and every licence file in the wheel's metadata
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    shipped = {n.rsplit("/", 1)[-1] for n in names if ".dist-info/licenses/" in n}
    assert {"LICENSE", "LICENSE-GSM8K", "LICENSE-MATH500", "LICENSE-AGIEVAL-MATH"} <= shipped, shipped


def test_where_keeps_the_rows_whose_field_has_one_of_the_values():
    """MATH-500 levels 1-2 (43 + 90 problems): every row kept is of those levels, in file order, and --count
    counts the rows kept; a malformed selection, or one that keeps nothing, is refused in one line."""
    every = load_items("builtin:math500")
    kept = load_items("builtin:math500", where="level=1,2")
    assert len(kept) == 133 == sum(it.groups["level"] in (1, 2) for it in every)
    assert [it.index for it in kept] == [it.index for it in every if it.groups["level"] in (1, 2)]
    assert [it.index for it in load_items("builtin:math500", count=5, where="level=1,2")] == [it.index for it in kept[:5]]
    for bad, message in [("level", "is not FIELD=VALUE"), ("level=", "is not FIELD=VALUE"),
                         ("level=9", "holds no questions after offset 0 where level=9")]:
        with pytest.raises(UserError, match=message):
            load_items("builtin:math500", where=bad)
