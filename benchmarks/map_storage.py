"""Map storage: our low-rank factors against the dense per-layer d_s x d_t maps the paper's code
saves, for the paper's model pairs, computed from the models' configs (no weights needed).

The factors are built for real (random SVD-shaped tensors of the exact shapes, on the meta device
so nothing is allocated) through unlock_export.method.align.LowRankMap, so the byte counts are the ones
`align` writes; the dense size is target_layers x d_s x d_t in float32.

  python benchmarks/map_storage.py [--rank 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unlock_export.method.align import LowRankMap, layer_map
from unlock_export.provenance import run_record

ROOT = Path(__file__).resolve().parents[1]

# (num_hidden_layers, hidden_size) from the models' config.json on the Hub
CONFIGS = {
    "Qwen/Qwen3-4B": (36, 2560),
    "Qwen/Qwen3-14B": (40, 5120),
    "Qwen/Qwen1.5-7B": (32, 4096),
    "Qwen/Qwen1.5-14B": (40, 5120),
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": (24, 896),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": (28, 1536),
}
PAIRS = [("Qwen/Qwen3-4B", "Qwen/Qwen3-14B"), ("Qwen/Qwen1.5-14B", "Qwen/Qwen1.5-7B"),
         ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct")]


def measure(source: str, target: str, rank: int) -> dict:
    (s_layers, d_s), (t_layers, d_t) = CONFIGS[source], CONFIGS[target]
    meta = torch.device("meta")
    lrmap = LowRankMap(torch.empty(t_layers, rank, d_s, device=meta), torch.empty(t_layers, rank, rank, device=meta),
                       torch.empty(t_layers, rank, d_t, device=meta), layer_map(s_layers, t_layers), s_layers)
    factors, dense = lrmap.factor_bytes(), lrmap.dense_bytes()
    return {"source": source, "target": target, "rank": rank, "target_layers": t_layers, "d_s": d_s, "d_t": d_t,
            "factor_bytes": factors, "dense_bytes": dense, "ratio": round(dense / factors, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "reports" / "results" / "map_storage.json"))
    args = parser.parse_args()
    rows = [measure(s, t, args.rank) for s, t in PAIRS]
    print("| source -> target | rank | our factors | dense maps (paper code) | smaller by |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source'].split('/')[1]} -> {r['target'].split('/')[1]} | {r['rank']} | "
              f"{r['factor_bytes'] / 2**20:.1f} MiB | {r['dense_bytes'] / 2**20:,.0f} MiB | {r['ratio']:g}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"provenance": run_record(), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
