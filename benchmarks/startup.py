"""Start-up benchmark: what `import unlock_export` and `unlock-export --help` cost, and whether they
import torch or transformers (they should not: a command imports them when it needs them).

Each measurement is a fresh interpreter (`python -c ...` or `python -m unlock_export.cli --help`),
run --repeat times; the median wall time is kept. --tree measures another checkout of the package
(an older commit, say) with the same interpreter, so two trees compare on one machine.

With --fold-model DIR --fold-vectors V it also times `fold --link --no-verify` of that (small)
checkpoint: a fold whose work is nearly nothing, so what it measures is the command's start-up.

  python benchmarks/startup.py [--tree DIR] [--label NAME] [--repeat 7] [--json reports/results/startup.json]
                               [--fold-model DIR --fold-vectors V]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECKS = {
    "import unlock_export": ["-c", "import unlock_export"],
    "unlock-export --help": ["-m", "unlock_export.cli", "--help"],
}
PROBE = ("import sys, unlock_export, unlock_export.cli; "
         "print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules))")


def wall(args: list[str], env: dict, repeat: int, clean: Path | None = None) -> float:
    times = []
    for _ in range(repeat):
        if clean is not None:
            shutil.rmtree(clean, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(tree: Path, repeat: int, fold_model: Path | None = None, fold_vectors: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    result = {name: {"median_s": round(wall(args, env, repeat), 3), "repeat": repeat} for name, args in CHECKS.items()}
    if fold_model is not None:
        out = Path(tempfile.mkdtemp()) / "folded"
        args = ["-m", "unlock_export.cli", "--quiet", "fold", str(fold_model), "--vectors", str(fold_vectors),
                "--link", "--no-verify", "-o", str(out)]
        result["fold --link --no-verify (small checkpoint)"] = {"median_s": round(wall(args, env, repeat, out), 3),
                                                               "repeat": repeat, "model": str(fold_model)}
    loaded = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    result["heavy modules imported by the CLI"] = loaded.stdout.split()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    result["tree_commit"] = commit.stdout.strip() or None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose package is measured")
    parser.add_argument("--label", default="current", help="the name of this measurement in the JSON")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=ROOT / "reports" / "results" / "startup.json")
    parser.add_argument("--fold-model", type=Path, default=None, help="a small checkpoint folder to fold")
    parser.add_argument("--fold-vectors", type=Path, default=None, help="a vectors file for it")
    args = parser.parse_args()
    from unlock_export.provenance import run_record

    result = measure(args.tree.resolve(), args.repeat, args.fold_model, args.fold_vectors)
    data = json.loads(args.json.read_text()) if args.json.is_file() else {"results": {}}
    data["results"][args.label] = {**result, "provenance": run_record()}
    data["provenance"] = run_record()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({args.label: result}, indent=2))


if __name__ == "__main__":
    main()
