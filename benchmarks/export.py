"""Export benchmark: `unlock-export fold` on a sharded checkpoint against `cp -r` of the same folder.

Builds (once, cached) a random-initialised Llama-shaped checkpoint of about 2.4 GB in float32,
saved in 500 MB shards, then measures wall time and peak RSS of:
  cp -r SRC DST
  unlock-export fold SRC --no-verify         (copies untouched shards, writes the bias shard)
  unlock-export fold SRC --no-verify --link  (hard-links untouched shards)

  python benchmarks/export.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)


def build(src: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(src, max_shard_size="500MB")
    build_tokenizer().save_pretrained(src)


def vectors(path: Path) -> None:
    import torch

    from unlock_export.method.vectors import SteeringVectors

    n, d = CONFIG["num_hidden_layers"], CONFIG["hidden_size"]
    SteeringVectors({L: torch.randn(d) for L in range(1, n)}, n, d, "layer_output", "llama").save(path)


def timed(cmd: list[str]) -> dict:
    # ru_maxrss of children is the max over all of them, so each command runs under a fresh
    # wrapper process that reports the peak of its one child
    t0 = time.perf_counter()
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]).returncode;"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r)", *cmd]
    proc = subprocess.run(wrapper, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_kib / 1024, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/unlock-export/bench-export"))
    parser.add_argument("--json", default=str(ROOT / "reports" / "results" / "export.json"))
    args = parser.parse_args()
    cache = Path(args.cache)
    src = cache / "llama-2.4g"
    if not (src / "config.json").is_file():
        print("building the sharded checkpoint (once) ...", flush=True)
        build(src)
    shards = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    vec = cache / "vectors.safetensors"
    vectors(vec)
    cli = str(Path(sys.executable).with_name("unlock-export"))
    results = {"checkpoint_bytes": size, "shards": len(shards), "largest_shard_bytes": largest}
    work = Path(tempfile.mkdtemp(dir=cache))
    try:
        for name, cmd in [
            ("cp -r", ["cp", "-r", str(src), str(work / "copy")]),
            ("fold (copy)", [cli, "--quiet", "fold", str(src), "--vectors", str(vec), "--no-verify", "-o", str(work / "fold")]),
            ("fold --link", [cli, "--quiet", "fold", str(src), "--vectors", str(vec), "--no-verify", "--link",
                             "-o", str(work / "link")]),
        ]:
            subprocess.run(["sync"])
            results[name] = timed(cmd)
            r = results[name]
            print(f"{name:<12} {r['seconds']:>7.2f} s   peak RSS {r['peak_rss_mib']:>8.1f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp, fold, link = results["cp -r"], results["fold (copy)"], results["fold --link"]
    print(f"checkpoint {size / 2**30:.2f} GiB in {len(shards)} shards (largest {largest / 2**20:.0f} MiB)")
    print(f"fold / cp time: {fold['seconds'] / cp['seconds']:.2f}x;  --link: {link['seconds']:.2f} s;  "
          f"fold peak RSS / largest shard: {fold['peak_rss_mib'] * 2**20 / largest:.2f}x")
    from unlock_export.provenance import run_record

    results["provenance"] = run_record()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
