"""unlock_export.provenance: the record every results JSON carries, checked against the real values."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path

import pytest

from unlock_export import provenance

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_commit_is_the_checkouts_head():
    record = provenance.run_record([])
    head = _git("rev-parse", "HEAD")
    if head is None or Path(_git("rev-parse", "--show-toplevel")).resolve() != REPO:
        assert record["commit"] is None and record["dirty"] is None
        return
    assert record["commit"] == head and len(head) == 40
    assert record["dirty"] is bool(_git("status", "--porcelain"))


def test_an_installed_copy_outside_a_checkout_records_no_commit(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", tmp_path)  # not a git checkout
    assert provenance.git_state() == (None, None)
    record = provenance.run_record(["x"])
    assert record["commit"] is None and record["dirty"] is None


def test_versions_are_the_installed_distributions():
    """Checked against what each library says of itself (its __version__), and this package's against
    pyproject.toml: not the metadata lookup the record itself makes."""
    import peft
    import tomllib
    import torch
    import transformers

    found = provenance.run_record([])["versions"]
    assert found["python"] == platform.python_version()
    for name, module in (("torch", torch), ("transformers", transformers), ("peft", peft)):
        assert found[name] == module.__version__.split("+")[0] or found[name] == module.__version__, name
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert found["unlock-export"] == project["version"]  # this package is installed (editable) here


def test_a_missing_distribution_is_null(monkeypatch):
    monkeypatch.setattr(provenance, "DISTRIBUTIONS", ("torch", "surely-not-installed-dist"))
    found = provenance.versions()
    assert found["surely-not-installed-dist"] is None and found["torch"] == metadata.version("torch")


@pytest.mark.parametrize("argv", [
    ["benchmarks/capture.py", "--n", "16"],
    ["scripts/eval_table.py", "--configs", "a,b", "--out", "dir with spaces", "it's", 'say "hi"', "$HOME", ""],
])
def test_command_round_trips_through_shlex(argv):
    command = provenance.run_record(argv)["command"]
    assert isinstance(command, str) and shlex.split(command) == argv


def test_command_defaults_to_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--json", "a b.json"])
    assert shlex.split(provenance.run_record()["command"]) == ["bench.py", "--json", "a b.json"]


def test_machine_and_date():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    record = provenance.run_record([])
    after = datetime.now(timezone.utc)
    m = record["machine"]
    assert m["platform"] == platform.platform() and m["machine"] == (platform.machine() or None)
    assert m["processor"] == (platform.processor() or None)
    import os

    assert m["cpu_count"] == os.cpu_count()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(next(line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")).split()[1])
        assert m["memory_gib"] == round(kib * 1024 / 2**30, 1)
    else:
        assert m["memory_gib"] is None or m["memory_gib"] > 0
    date = datetime.fromisoformat(record["date"])
    assert date.utcoffset() == timedelta(0)  # UTC
    assert before <= date <= after
    assert set(record) == {"command", "commit", "dirty", "versions", "machine", "date"}
    json.dumps(record)  # goes into a results JSON as it is


def test_gpu_follows_an_imported_torch(monkeypatch):
    import torch

    expected = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if expected is not None and torch.cuda.device_count() > 1:
        expected = f"{torch.cuda.device_count()} x {expected}"
    assert provenance.run_record([])["machine"]["gpu"] == expected

    class FakeCuda:
        @staticmethod
        def is_available():
            return True

        @staticmethod
        def device_count():
            return 1

        @staticmethod
        def get_device_name(index):
            return "Fake GPU"

    monkeypatch.setitem(sys.modules, "torch", type("FakeTorch", (), {"cuda": FakeCuda}))
    assert provenance.gpu_name() == "Fake GPU"


def test_the_record_never_imports_torch():
    code = ("import json, sys; from unlock_export.provenance import run_record; r = run_record(['x']); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'gpu': r['machine']['gpu'], "
            "'version': r['versions']['torch']}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(out.stdout)
    assert result == {"torch": False, "gpu": None, "version": metadata.version("torch")}
