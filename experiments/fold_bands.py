"""Which layers can a fold steer? Prints, for bands of layers and additive scales, how close the
additive (folded) form comes to the paper form at the answer start, and what it costs in perplexity.

For each band and scale: KL(paper || additive) of the next-token distribution at the last prompt
token, the additive form's probability mass on the paper form's top token, how often their top
tokens agree, the perplexity ratio on plain text, and the additive form's top first tokens. No
labels are read. A band's scales stop once perplexity rises past x1.5.

  python experiments/fold_bands.py zoo:qwen2.5-coder-1.5b-instruct --vectors out/eval-table/.../vectors.safetensors \
      --bands 1-27,1-9,5-13,10-18,14-22,19-27 --scales 0.0884,0.177,0.354,0.707 --count 16 --offset 1000 \
      --json reports/results/fold_bands_qwen1.5b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--alpha", type=float, default=0.1, help="the paper form's strength")
    parser.add_argument("--bands", default="1-27,1-9,10-18,19-27")
    parser.add_argument("--scales", default="0.0884,0.177,0.354")
    parser.add_argument("--prompts", default="builtin:gsm8k-train")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--offset", type=int, default=1000, help="skip the prompts the key was computed on")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    from unlock_export.evaluation.calibrate import answer_start_logprobs, kl, perplexity
    from unlock_export.method.steer import steering
    from unlock_export.method.vectors import SteeringVectors, parse_layers
    from unlock_export.models.loading import load
    from unlock_export.prompts import apply_template, load_questions

    vectors = SteeringVectors.load(args.vectors)
    vectors = vectors.select([layer for layer in vectors.layers if layer != 0])
    loaded = load(args.model, dtype="float32")
    questions = load_questions(args.prompts, "question", args.count, args.offset)
    texts, plain = apply_template("direct", questions), apply_template("plain", questions[: max(1, args.count // 2)])
    decode = lambda lp: [loaded.tokenizer.decode([int(i)]) for i in lp.argmax(-1)]  # noqa: E731
    started = time.perf_counter()
    with steering(loaded, vectors, "paper", args.alpha):
        reference = answer_start_logprobs(loaded, texts)
    unsteered = answer_start_logprobs(loaded, texts)
    base_ppl = perplexity(loaded, plain)
    top = reference.argmax(-1, keepdim=True)
    print(f"paper form (alpha {args.alpha:g}) top first tokens: {decode(reference)[:8]}")
    print(f"unsteered top first tokens: {decode(unsteered)[:8]}; KL(paper || unsteered) {kl(reference, unsteered):.3f}")
    print("| layers | scale | KL to paper form | mass on paper's top token | top-1 agreement | perplexity ratio | top first tokens |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for band in args.bands.split(","):
        chosen = vectors.select(parse_layers(band, vectors.layer_count))
        for scale in (float(s) for s in args.scales.split(",")):
            with steering(loaded, chosen, "additive", scale):
                q = answer_start_logprobs(loaded, texts)
                ratio = perplexity(loaded, plain) / base_ppl
            row = {"layers": band, "scale": scale, "kl_to_paper": kl(reference, q),
                   "paper_top_mass": float(q.exp().gather(1, top).mean()),
                   "top1_agreement": float((q.argmax(-1) == top[:, 0]).float().mean()),
                   "perplexity_ratio": ratio, "top_first_tokens": decode(q)[:6]}
            rows.append(row)
            print(f"| {band} | {scale:g} | {row['kl_to_paper']:.2f} | {row['paper_top_mass']:.4f} | "
                  f"{row['top1_agreement']:.2f} | {ratio:.3f} | {' '.join(repr(t) for t in row['top_first_tokens'])} |",
                  flush=True)
            if ratio > 1.5:
                break
    print(f"wall {time.perf_counter() - started:.0f} s")
    if args.json:
        from unlock_export.provenance import run_record

        Path(args.json).write_text(json.dumps({"model": args.model, "vectors": args.vectors, "alpha": args.alpha,
                                               "prompts": len(texts), "offset": args.offset,
                                               "kl_unsteered_to_paper": kl(reference, unsteered),
                                               "paper_top_first_tokens": decode(reference), "rows": rows,
                                               "provenance": run_record()},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
