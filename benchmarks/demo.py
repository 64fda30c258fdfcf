"""The demo, measured: `make demo`'s run (recipes/demo.yaml on the zoo models) as a child process, with
its wall time, stage times, peak resident memory, the bytes it wrote and what it chose and verified.

Writes reports/results/demo.json (the README's demo sentence is rendered from it by
scripts/render_report.py). Run on demand, on a quiet machine (the load average at the start is
recorded); not part of CI.

  python benchmarks/demo.py                       # zoo fetch (once), then the run into out/demo
  python benchmarks/demo.py --out /tmp/demo --json /tmp/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")


def _cli() -> list[str]:
    return [sys.executable, "-m", "unlock_export"]


def _written(folder: Path) -> dict:
    """Bytes in the run's folder: files it wrote, and files hard-linked from elsewhere (the dequantized copy)."""
    written = linked = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            if info.st_nlink > 1:
                linked += info.st_size
            else:
                written += info.st_size
    return {"written_bytes": written, "linked_bytes": linked}


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _sampled(command: list[str], every: float = 0.5) -> tuple[int, list[tuple[float, int]]]:
    """Run `command`, sampling its resident memory every `every` s: (exit code, [(seconds, KiB)])."""
    proc = subprocess.Popen(command)
    t0, samples = time.perf_counter(), []
    while proc.poll() is None:
        samples.append((time.perf_counter() - t0, _rss_kib(proc.pid)))
        time.sleep(every)
    return proc.returncode, samples


def _peak_by_stage(samples: list[tuple[float, int]], timings: dict, wall: float) -> dict:
    """The peak resident memory (GiB) in each stage, the stages laid end to end in the order they ran
    (what runs between them, loading and writing, counts to the stage after)."""
    stages, end = {}, 0.0
    names = list(timings)
    for i, name in enumerate(names):
        start, end = end, end + timings[name]
        if i == 0:  # start-up, planning and the first model's load come before the first stage's clock
            start, end = 0.0, wall - sum(timings.values()) + timings[name]
        inside = [kib for t, kib in samples if start <= t < end]
        stages[name.removesuffix("_s")] = round(max(inside) / 2**20, 2) if inside else None
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--json", type=Path, default=ROOT / "reports" / "results" / "demo.json")
    parser.add_argument("--note", default=None, help="what else the machine was doing, if anything")
    args = parser.parse_args()
    for name in ZOO:
        subprocess.run(_cli() + ["zoo", "fetch", name], check=True)
    load = os.getloadavg()
    command = _cli() + ["--quiet", "run", "--overwrite", str(args.recipe), str(args.out)]
    t0 = time.perf_counter()
    returncode, samples = _sampled(command)
    wall = time.perf_counter() - t0
    if returncode != 0:
        sys.exit(f"the demo run failed (exit {returncode}); nothing recorded")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child: the run
    summary = json.loads((args.out / "summary.json").read_text())
    unlock = json.loads((args.out / "model" / "unlock.json").read_text())
    calibration = json.loads((args.out / "calibration.json").read_text())
    from unlock_export.provenance import run_record

    record = {
        "provenance": run_record(["benchmarks/demo.py", *sys.argv[1:]]),
        "command": " ".join(["unlock-export", *command[3:]]),
        "load_average_at_start": [round(x, 2) for x in load],
        "conditions": args.note or ("quiet: nothing else ran" if load[0] < 0.5 else
                                    f"load average {load[0]:.2f} at the start"),
        "run_wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "timings_s": summary["timings_s"],
        "peak_rss_gib_by_stage": _peak_by_stage(samples, summary["timings_s"], wall),
        **_written(args.out),
        "scale": calibration["scale"],
        "calibration_scales_measured": len(calibration["table"]),
        "calibration_timings_s": {**calibration.get("timings_s", {}),
                                  "per_scale": calibration.get("seconds_per_scale")},
        "weights_dtype": unlock["verification"]["dtype"],
        "verification": {k: unlock["verification"][k] for k in
                         ("max_abs_dlogit", "tolerance", "precision_floor_max_abs_dlogit", "passed")
                         if k in unlock["verification"]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in summary["timings_s"].items())
    print(f"demo: {wall / 60:.1f} min ({stages}), peak {record['peak_rss_gib']} GiB, scale {record['scale']}, "
          f"wrote {record['written_bytes'] / 1e9:.2f} GB; {args.json}")


if __name__ == "__main__":
    main()
