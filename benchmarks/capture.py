"""Capture benchmark: our hook capture against the reference approach, same model, prompts, batch.

Methods (each runs in its own process so memory figures do not mix):
  ours            hook capture of the last prompt token at every layer (unlock_export.method.capture)
  reference       the paper code's way: forward with output_hidden_states=True (full logits),
                  then slice the last token of every layer
  reference-keep1 the same, but with logits_to_keep=1 (isolates hidden-state retention)
  plain           a plain forward with logits_to_keep=1 and no capture: the unavoidable work
  ours-half       hook capture of layers 0..N/2-1 only: the forward stops after layer N/2-1 (early exit)

Peak activation memory is the peak resident memory during the capture loop minus the resident
memory before it (sampled every 2 ms; on CUDA: torch.cuda.max_memory_allocated minus the baseline).

  python benchmarks/capture.py                       # qwen2.5-coder-0.5b, 64 prompts x 256 tokens
  python benchmarks/capture.py --n 16 --tokens 128   # quicker
  python benchmarks/capture.py --model random:qwen2.5-7b --dtype bfloat16 --device cuda   # realistic shapes

`random:NAME` builds a random-initialised model from a real config (no weights needed; speed and
memory do not depend on the values): qwen2.5-7b, qwen3-14b, qwen2.5-coder-1.5b. `--num-layers K`
keeps only the first K decoder layers (to try the large shapes on a small machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ours", "reference", "reference-keep1", "plain", "ours-half")
PROMPTS = "builtin:gsm8k-train"  # GSM8K train questions, shipped inside the package
# config.json fields of the real models (from the Hub); random weights of these shapes
RANDOM_CONFIGS = {
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False},
    "qwen3-14b": {"model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                  "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": False},
    "qwen2.5-coder-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                           "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                           "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                           "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
}


def load_model(spec: str, dtype: str, device: str, num_layers: int | None):
    """unlock_export's loader, or a random-initialised model of a real config for `random:NAME`."""
    import torch

    from unlock_export.models import loading as models

    if not spec.startswith("random:"):
        return models.load(spec, dtype=dtype, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(RANDOM_CONFIGS[spec.removeprefix("random:")])
    if num_layers:
        fields["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(**fields)
    target = models.choose_device(device)
    torch_dtype = models.choose_dtype(dtype, target)
    torch.manual_seed(0)
    with torch.device(target):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval().requires_grad_(False)

    class _Vocab:  # make_batches draws token ids; a random model has no tokenizer
        def __call__(self, text, **kwargs):
            g = torch.Generator().manual_seed(0)
            return type("Enc", (), {"input_ids": torch.randint(0, config.vocab_size, (65536,), generator=g).tolist()})

    source = models.ModelSource(spec, "random", spec)
    return models.LoadedModel(model, _Vocab(), source, models.architecture_for(model))


def make_batches(tokenizer, n: int, tokens: int, batch: int, device):
    """n prompts of exactly `tokens` tokens (GSM8K train questions joined)."""
    import torch

    from unlock_export import prompts

    questions = prompts.load_questions(PROMPTS, count=max(n * 8, 64))
    stream = tokenizer("\n".join(questions), add_special_tokens=False).input_ids
    need = n * tokens
    while len(stream) < need:
        stream = stream + stream
    ids = torch.tensor(stream[:need]).reshape(n, tokens)
    return [ids[i:i + batch].to(device) for i in range(0, n, batch)]


class PeakRSS:
    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


def child(args) -> dict:
    import torch

    torch.set_grad_enabled(False)
    lm = load_model(args.model, args.dtype, args.device, args.num_layers)
    batches = make_batches(lm.tokenizer, args.n, args.tokens, args.batch, lm.device)
    cuda = lm.device.type == "cuda"
    n_layers = lm.n_layers

    def run_method():
        if args.method in ("ours", "ours-half"):
            # capture() tokenizes text; feed it the same token ids as text-free batches instead
            return capture_ids(lm, batches, None if args.method == "ours" else list(range(n_layers // 2)))
        rows = []
        for ids in batches:
            if args.method == "plain":
                lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
                continue
            kwargs = {"logits_to_keep": 1} if args.method == "reference-keep1" else {}
            out = lm.model(input_ids=ids, use_cache=False, output_hidden_states=True, **kwargs)
            rows.append(torch.stack([h[:, -1].float().cpu() for h in out.hidden_states[1:]]))
            del out
        return rows

    # warm-up on one batch (allocator, kernels), not timed
    _ = lm.model(input_ids=batches[0][:1, :16], use_cache=False, logits_to_keep=1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.inference_mode(), PeakRSS() as rss:
        t0 = time.perf_counter()
        run_method()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else rss.delta
    return {"method": args.method, "model": args.model, "device": str(lm.device), "layers": n_layers,
            "prompts": args.n, "tokens_per_prompt": args.tokens, "batch": args.batch,
            "seconds": round(seconds, 2), "tokens_per_s": round(args.n * args.tokens / seconds, 1),
            "peak_activation_mib": round(peak / 2**20, 1),
            "memory_measure": "cuda max_memory_allocated" if cuda else "peak RSS delta"}


def capture_ids(lm, batches, layers=None):
    """Run unlock_export's hook capture on pre-tokenized batches (no padding)."""
    import torch

    from unlock_export.method import capture as cap

    texts_ids = torch.cat(batches)

    class _IdTokenizer:  # hands capture() the fixed token ids instead of re-tokenizing text
        padding_side = "left"
        truncation_side = "left"

        def __call__(self, texts, **kwargs):
            rows = texts_ids[torch.tensor([int(t) for t in texts])]
            return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}

    real = lm.tokenizer
    lm.tokenizer = _IdTokenizer()
    try:
        # equal lengths keep capture()'s length sort a no-op, so batches match the reference's
        return cap.capture(lm, [str(i) for i in range(len(texts_ids))], layers=layers,
                           batch_size=batches[0].shape[0], progress=False)
    finally:
        lm.tokenizer = real


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--n", type=int, default=64, help="prompts")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-layers", type=int, default=0, help="random:NAME only: keep the first K layers")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method, interleaved; the median is kept")
    parser.add_argument("--json", default=str(ROOT / "reports" / "results" / "capture.json"),
                        help="where to write the results")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.method:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--method", method] + [
                f"--{k}={v}" for k, v in (("model", args.model), ("n", args.n), ("tokens", args.tokens),
                                           ("batch", args.batch), ("dtype", args.dtype), ("device", args.device),
                                           ("num-layers", args.num_layers))]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault(method, []).append(r)
            print(f"[{repeat + 1}/{args.repeats}] {method:<16} {r['tokens_per_s']:>9.1f} tok/s  "
                  f"{r['peak_activation_mib']:>9.1f} MiB  ({r['seconds']} s)", flush=True)
    results = []
    for method, rs in runs.items():  # the median run by time
        r = sorted(rs, key=lambda x: x["seconds"])[len(rs) // 2]
        results.append({**r, "repeats": len(rs), "seconds_all": [x["seconds"] for x in rs]})
    print("median of the repeats:")
    for r in results:
        print(f"{r['method']:<16} {r['tokens_per_s']:>9.1f} tok/s  {r['peak_activation_mib']:>9.1f} MiB  ({r['seconds']} s)")
    by = {r["method"]: r for r in results}
    if "ours" in by:
        for other in ("reference", "reference-keep1"):
            if other in by:
                r = by[other]
                print(f"ours vs {other}: {r['peak_activation_mib'] / max(by['ours']['peak_activation_mib'], 0.1):.1f}x "
                      f"less peak activation memory, speed {by['ours']['tokens_per_s'] / r['tokens_per_s']:.2f}x")
        if "plain" in by:
            overhead = by["plain"]["tokens_per_s"] / by["ours"]["tokens_per_s"] - 1
            print(f"ours vs plain forward: {100 * overhead:+.1f}% time overhead")
        if "ours-half" in by:
            print(f"early exit (layers < N/2): {by['ours-half']['seconds'] / by['ours']['seconds']:.0%} "
                  "of the full-depth capture time")
    from unlock_export.provenance import run_record

    if any(r["device"].startswith("cuda") for r in results):
        import torch  # noqa: F401  (the children ran on the GPU: let the record name it)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"provenance": run_record(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
