"""Where a results file came from: the command, the code's commit, package versions, the machine, the date.

`run_record()` is what every results JSON the scripts and benchmarks write carries as "provenance".
It never imports torch: versions come from the installed distributions' metadata, and the GPU is
named only when the caller has already imported torch (the process that ran the models).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# distribution names whose versions a record carries (python is the interpreter's own)
DISTRIBUTIONS = ("torch", "transformers", "peft", "gguf", "unlock-export")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding unlock_export/


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, working tree dirty) of the git checkout this package is imported from; (None, None)
    when git is missing or the package does not sit at a checkout's top (an installed copy)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != PACKAGE_ROOT:
        return None, None
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None, None
    status = _git("status", "--porcelain")
    return head.strip(), (bool(status.strip()) if status is not None else None)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def memory_gib() -> float | None:
    """Physical memory: MemTotal of /proc/meminfo, else the page count times the page size."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 2**30, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def gpu_name() -> str | None:
    """The CUDA device's name, when the caller has imported torch and CUDA is available; never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
    except Exception:  # a broken driver must not fail the results file
        return None
    return name if count <= 1 else f"{count} x {name}"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "machine": platform.machine() or None, "cpu_count": os.cpu_count(), "memory_gib": memory_gib(),
            "gpu": gpu_name()}


def utc_now() -> str:
    """Now, in UTC, to the second (ISO 8601): the date every record this package writes carries."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(argv: list[str] | None = None) -> dict:
    """The provenance of a results file written now: {command, commit, dirty, versions, machine, date}."""
    commit, dirty = git_state()
    return {"command": shlex.join(sys.argv if argv is None else argv), "commit": commit, "dirty": dirty,
            "versions": versions(), "machine": machine(), "date": utc_now()}
