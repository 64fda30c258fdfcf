"""End to end: `run` on the offline Qwen recipe, wall time per stage.

Runs the recipe (key -> align -> project, diagnostics, and calibrate + fold when the recipe has a
fold step) and prints the stage timings that run_recipe records in summary.json (each stage's
time includes loading the models it needs), plus the whole command's wall time.

  python benchmarks/end_to_end.py                                  # runs the zoo recipe into out/bench-e2e
  python benchmarks/end_to_end.py --reuse out/demo                 # the timings of an earlier run (make demo)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "zoo-qwen0.5b-to-1.5b-cot.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-e2e")
    parser.add_argument("--reuse", type=Path, default=None, help="read the timings of an existing run's summary.json")
    parser.add_argument("--json", type=Path, default=ROOT / "reports" / "results" / "end_to_end.json")
    args = parser.parse_args()
    wall = None
    if args.reuse:
        summary = json.loads((args.reuse / "summary.json").read_text())
        source = str(args.reuse)
    else:
        from unlock_export.recipe.runner import run_recipe
        from unlock_export.recipe.spec import load_recipe

        t0 = time.perf_counter()
        summary = run_recipe(load_recipe(args.recipe), args.out, overwrite=True, progress=False,
                             recipe_text=args.recipe.read_text())
        wall = round(time.perf_counter() - t0, 1)
        source = str(args.out)
    timings = summary["timings_s"]
    total = sum(timings.values())
    print(f"recipe {summary['recipe']}: {summary['n_prompts_key']} key prompts, {summary['n_prompts_align']} "
          f"align prompts, rank {summary['rank']}, {summary['source_layers']} -> {summary['target_layers']} layers")
    print(f"{'stage':<14} {'seconds':>8} {'share':>6}")
    for stage, seconds in timings.items():
        print(f"{stage.removesuffix('_s'):<14} {seconds:>8.1f} {seconds / total:>6.0%}")
    print(f"{'stages total':<14} {total:>8.1f}" + (f"   (run_recipe wall {wall} s)" if wall else ""))
    from unlock_export.provenance import run_record

    record = {"recipe": summary["recipe"], "from": source, "timings_s": timings, "stages_total_s": round(total, 1),
              "run_recipe_wall_s": wall, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "device": "cuda" if _cuda() else "cpu"}
    record["provenance"] = run_record()  # after _cuda(): torch is imported, so the record names a GPU
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
