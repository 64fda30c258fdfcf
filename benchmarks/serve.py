"""Serving benchmark: llama.cpp prompt and generation speed of qwen2.5-coder-1.5b (Q4_K_M, the zoo
GGUF) unsteered, folded (route a: the same GGUF plus one ffn_down bias per layer, relabelled to
llama) and unsteered with a control vector (--control-vector).

The folded GGUF comes from a real fold of the zoo model (dequantized, cached with the vectors).
Each configuration runs `llama-completion` REPEATS times, interleaved, and the medians of its own
timing lines are reported (prompt time = total - generation time, since llama.cpp resets its
prompt timer when a control vector is applied). Aim: folded within 2% of unsteered speed. Run it
on an otherwise idle machine.

  python benchmarks/serve.py [--cache DIR] [--repeats N] [--prompt-tokens N] [--gen-tokens N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ZOO = "zoo:qwen2.5-coder-1.5b-instruct"
_TIMING = re.compile(r"\b(prompt eval|eval|total) time =\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)")


def prepare(cache: Path) -> tuple[Path, Path, Path]:
    """(unsteered zoo GGUF, folded GGUF, control vector), built once into `cache`."""
    import torch

    from unlock_export.cli import main
    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.models.loading import resolve

    source = resolve(ZOO)
    base = Path(source.path) / source.gguf_file
    cache.mkdir(parents=True, exist_ok=True)
    vec_path, folded, patched, cvec = (cache / "vectors.safetensors", cache / "folded", cache / "folded.gguf",
                                       cache / "steer.gguf")
    if not vec_path.exists():
        from gguf import GGUFReader

        fields = GGUFReader(str(base)).fields
        n, d = int(fields["qwen2.block_count"].contents()), int(fields["qwen2.embedding_length"].contents())
        g = torch.Generator().manual_seed(0)
        SteeringVectors({L: torch.randn(d, generator=g) for L in range(1, n)}, n, d, model_hint="qwen2").save(vec_path)
    if not patched.exists():
        if not folded.exists():
            assert main(["--quiet", "fold", ZOO, "--vectors", str(vec_path), "--no-verify", "-o", str(folded)]) == 0
        assert main(["--quiet", "gguf", str(folded), "-o", str(patched)]) == 0
    if not cvec.exists():
        assert main(["--quiet", "cvec", "--vectors", str(vec_path), "-o", str(cvec)]) == 0
    return base, patched, cvec


def run_once(model: Path, prompt: str, gen_tokens: int, cvec: Path | None) -> dict:
    from engines import llama_bin

    cmd = [str(llama_bin("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(gen_tokens),
           "--temp", "0", "-t", "2", "-c", "2048", "-b", "512", "--no-warmup", "-no-cnv", "-s", "0", "--ignore-eos"]
    if cvec:
        cmd += ["--control-vector", str(cvec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"llama-completion failed: {proc.stderr[-2000:]}")
    found = {kind: (float(ms), int(n)) for kind, ms, n in _TIMING.findall(proc.stderr)}
    # llama.cpp resets its prompt timer when a control vector is applied, so the prompt time is
    # taken as total - generation for every configuration alike
    total_ms, (eval_ms, eval_n) = found["total"][0], found["eval"]
    prompt_n = found["prompt eval"][1]
    return {"prompt_tok_s": prompt_n / ((total_ms - eval_ms) / 1000), "gen_tok_s": eval_n / (eval_ms / 1000),
            "prompt_tokens": prompt_n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "unlock-export" / "bench-serve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "results" / "serve.json")
    args = parser.parse_args()

    base, patched, cvec = prepare(args.cache)
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * (args.prompt_tokens // 9 + 1))
    configs = {"unsteered": (base, None), "folded": (patched, None), "control_vector": (base, cvec)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    run_once(base, prompt, 4, None)  # warm the page cache
    for _ in range(args.repeats):
        for name, (model, vec) in configs.items():
            runs[name].append(run_once(model, prompt, args.gen_tokens, vec))
    result = {"model": ZOO, "repeats": args.repeats, "prompt_tokens_requested": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "threads": 2, "configs": {}}
    for name, rs in runs.items():
        result["configs"][name] = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
    ref = result["configs"]["unsteered"]
    for name, figures in result["configs"].items():
        figures["prompt_vs_unsteered"] = round(figures["prompt_tok_s"] / ref["prompt_tok_s"], 4)
        figures["gen_vs_unsteered"] = round(figures["gen_tok_s"] / ref["gen_tok_s"], 4)
    from unlock_export.provenance import run_record

    result["provenance"] = run_record()
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
