"""Can a weight edit reproduce the paper form's prefill-only edit? A feasibility measurement.

The paper form edits only the last prompt token; a bias fold adds its offset at every position.
This script tries a third form that is still an ordinary checkpoint: a rank-1 edit of each steered
layer's last write into the residual stream (`mlp.down_proj`, or `self_attn.o_proj` with
`--site attn`), W += m * alpha * n_L * r_L a_L^T, where r_L is the unit steering direction, n_L the
layer output's mean norm at the last prompt token, and a_L a linear gate fitted without labels
(weighted ridge regression, no intercept) to read 1 at the last prompt token of a direct prompt
and 0 at every other position, from the module's own input. Merged into the weights it changes
nothing else in the model, so any stack serves it; as a PEFT LoRA (A = a_L, B = r_L) it is a plain
adapter too.

Printed, on held-out prompts (no labels read anywhere): the gate's value at the last prompt token
and elsewhere (prompt tokens, and the paper form's own continuation, teacher-forced), then for each
multiplier m: KL(paper || gated) at the answer start, the cross-entropy of the paper form's first
continuation tokens under the gated model, and the perplexity ratio on plain text, beside the same
figures for the unsteered model and the bias fold at a given scale.

  python experiments/gated_fold.py zoo:qwen2.5-coder-1.5b-instruct --vectors out/r/vectors.safetensors \
      --fit-count 32 --count 16 --multipliers 0.5,1,2 --bias-scale 0.0884

With --eval-count N the script instead scores the gated edit at --eval-multiplier on the first N
questions of --eval-data (direct prompt, greedy, transformers; the hooks equal the merged weights,
so they act at every position and decoding step as the edited checkpoint would), optionally paired
against an earlier `unlock-export eval` run (--baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlock_export.method.gate import fit_gate  # noqa: E402  (the product's gate fit)

SITES = {"mlp": "layer_output", "attn": "post_attention"}  # the registry's site of each writer


def _writer(loaded, layer: int, site: str) -> torch.nn.Module:
    """The projection the edit goes into (the architecture registry's writer for the site)."""
    return loaded.arch.writer_module(loaded.model, layer, SITES[site])


def capture_site_inputs(loaded, texts: list[str], layers: list[int], site: str):
    """Per layer: the site module's input at every token [rows, d_in], the rows' labels (1 at each
    text's last token), and the layer output's norm at the last token (method.gate's capture)."""
    from unlock_export.method.gate import capture_carrier_inputs, position_labels

    sequences = [loaded.tokenizer(text)["input_ids"] for text in texts]
    lengths = [len(ids) for ids in sequences]
    inputs, norms = capture_carrier_inputs(loaded, sequences, lengths, layers, SITES[site])
    return inputs, position_labels(sequences, lengths, 0), norms


def gated_edit(loaded, gates: dict[int, torch.Tensor], writes: dict[int, torch.Tensor], site: str):
    """The product's hook form (method.gate.gated_edit) of W += write a^T in each site module."""
    from unlock_export.method.gate import GateFit
    from unlock_export.method.gate import gated_edit as hooks

    return hooks(loaded, GateFit({layer: gate[None] for layer, gate in gates.items()}, writes, SITES[site],
                                 0.0, 0.0, 0.0, 0, 0))


@torch.inference_mode()
def merge_gap(loaded, gates, writes, site: str, text: str) -> float:
    """max |logits(hooks) - logits(weights merged W += write a^T)| on one text: the hooks are the
    checkpoint the edit would be."""
    from unlock_export.method.capture import tokenize

    enc = tokenize(loaded.tokenizer, [text], loaded.device)
    with gated_edit(loaded, gates, writes, site):
        hooked = loaded.model(**enc).logits.float()
    saved = {}
    try:
        for layer, gate in gates.items():
            weight = _writer(loaded, layer, site).weight
            saved[layer] = weight.detach().clone()
            weight += torch.outer(writes[layer], gate).to(weight.dtype)
        merged = loaded.model(**enc).logits.float()
    finally:
        for layer, original in saved.items():
            _writer(loaded, layer, site).weight.copy_(original)
    return float((hooked - merged).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--alpha", type=float, default=0.1, help="the paper form's strength")
    parser.add_argument("--site", choices=sorted(SITES), default="mlp")
    parser.add_argument("--prompts", default="builtin:gsm8k-train")
    parser.add_argument("--fit-count", type=int, default=32, help="prompts the gates are fitted on")
    parser.add_argument("--count", type=int, default=16, help="held-out prompts the forms are compared on")
    parser.add_argument("--offset", type=int, default=1000, help="skip the prompts the key was computed on")
    parser.add_argument("--ridge", type=float, default=1e-2, help="ridge strength, relative to the mean row norm^2")
    parser.add_argument("--multipliers", default="0.5,1,2")
    parser.add_argument("--bias-scale", type=float, default=None, help="also show the bias fold at this scale")
    parser.add_argument("--tokens", type=int, default=32, help="continuation tokens scored")
    parser.add_argument("--json", default=None)
    parser.add_argument("--eval-count", type=int, default=0, help="score the gated edit on this many questions")
    parser.add_argument("--eval-multiplier", type=float, default=0.5)
    parser.add_argument("--eval-data", default="builtin:gsm8k-dev")
    parser.add_argument("--eval-out", default="out/gated-eval")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--baseline", default=None, help="an earlier eval run on the same questions")
    args = parser.parse_args()

    from unlock_export.evaluation.calibrate import (
        answer_start_logprobs,
        continuation_logprobs,
        greedy_continuations,
        kl,
        perplexity,
    )
    from unlock_export.method.steer import steering
    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.models.loading import load
    from unlock_export.prompts import apply_template, load_questions

    started = time.perf_counter()
    vectors = SteeringVectors.load(args.vectors)
    layers = [layer for layer in vectors.layers if layer != 0]
    vectors = vectors.select(layers)
    loaded = load(args.model, dtype="float32")
    fit_q = load_questions(args.prompts, "question", args.fit_count, args.offset)
    test_q = load_questions(args.prompts, "question", args.count, args.offset + args.fit_count)
    fit_texts, texts = apply_template("direct", fit_q), apply_template("direct", test_q)
    plain = apply_template("plain", test_q[: max(1, args.count // 2)])

    inputs, labels, norms = capture_site_inputs(loaded, fit_texts, layers, args.site)
    gates = {layer: fit_gate(inputs[layer], labels, args.ridge) for layer in layers}
    del inputs
    print(f"gates fitted on {len(fit_texts)} prompts ({len(labels)} positions) at the {args.site} writer, "
          f"{time.perf_counter() - started:.0f} s")
    unit = {layer: args.alpha * norms[layer] * vectors.directions[layer] / vectors.directions[layer].norm()
            for layer in layers}
    print(f"hooks against merged weights (m 1, one prompt): max logit gap "
          f"{merge_gap(loaded, gates, unit, args.site, fit_texts[0]):.2e}")
    if args.eval_count:
        evaluate_gated(loaded, gates, norms, vectors, layers, args)
        return

    with steering(loaded, vectors, "paper", args.alpha):
        reference = answer_start_logprobs(loaded, texts)
        continuations = greedy_continuations(loaded, texts, args.tokens)
    decode = lambda lp: [loaded.tokenizer.decode([int(i)]) for i in lp.argmax(-1)]  # noqa: E731

    # the gates on held-out text: prompts, and prompt + the paper form's continuation
    held_inputs, held_labels, _ = capture_site_inputs(
        loaded, [t + loaded.tokenizer.decode(c) for t, c in zip(texts, continuations)], layers, args.site)
    prompt_len = [len(loaded.tokenizer(t)["input_ids"]) for t in texts]
    gate_rows = []
    for layer in layers:
        values = held_inputs[layer] @ gates[layer]
        start, at_last, in_prompt, in_answer = 0, [], [], []
        for text_len, n in zip(_lengths(held_labels), prompt_len):
            row = values[start:start + text_len]
            at_last.append(float(row[n - 1]))
            in_prompt.append(float(row[:n - 1].abs().max()) if n > 1 else 0.0)
            in_answer.append(float(row[n:].abs().max()) if text_len > n else 0.0)
            start += text_len
        gate_rows.append({"layer": layer, "at_last_prompt_token": sum(at_last) / len(at_last),
                          "max_abs_other_prompt_tokens": max(in_prompt), "max_abs_answer_tokens": max(in_answer)})
    del held_inputs
    print("| layer | gate at the last prompt token (mean) | max |gate| at other prompt tokens | "
          "max |gate| in the paper form's answer |")
    print("|---|---|---|---|")
    for row in gate_rows:
        print(f"| {row['layer']} | {row['at_last_prompt_token']:.3f} | {row['max_abs_other_prompt_tokens']:.3f} | "
              f"{row['max_abs_answer_tokens']:.3f} |")

    base_ppl = perplexity(loaded, plain)

    def measure(label: str, ctx) -> dict:
        with ctx:
            first, ce = continuation_logprobs(loaded, texts, continuations)
            answer_start = answer_start_logprobs(loaded, texts)
            ppl = perplexity(loaded, plain)
        row = {"form": label, "kl_to_paper": kl(reference, answer_start), "continuation_ce": ce,
               "ppl_ratio": ppl / base_ppl, "top_first_tokens": decode(answer_start)[:6]}
        print(f"| {label} | {row['kl_to_paper']:.3f} | {ce:.3f} | {row['ppl_ratio']:.3f} | {row['top_first_tokens']} |")
        return row

    print(f"paper form (alpha {args.alpha:g}) top first tokens: {decode(reference)[:6]}")
    print("| form | KL(paper || form) at the answer start | CE of the paper form's continuation | "
          "perplexity ratio | top first tokens |")
    print("|---|---|---|---|---|")
    rows = [measure("unsteered", contextlib.nullcontext())]
    if args.bias_scale is not None:
        rows.append(measure(f"bias fold, scale {args.bias_scale:g}",
                            steering(loaded, vectors, "additive", args.bias_scale)))
    for m in [float(x) for x in args.multipliers.split(",")]:
        writes = {layer: m * args.alpha * norms[layer] * vectors.directions[layer] / vectors.directions[layer].norm()
                  for layer in layers}
        rows.append(measure(f"gated edit, m {m:g}", gated_edit(loaded, gates, writes, args.site)))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        from unlock_export.provenance import run_record

        Path(args.json).write_text(json.dumps({"args": vars(args), "gates": gate_rows, "forms": rows,
                                               "wall_s": time.perf_counter() - started,
                                               "provenance": run_record()}, indent=2) + "\n")


def evaluate_gated(loaded, gates, norms, vectors, layers, args) -> None:
    from unlock_export.evaluation.engines.transformers_engine import TransformersEngine
    from unlock_export.evaluation.run import generate_and_score, load_items, read_baseline, render_prompts

    items = load_items(args.eval_data, args.eval_count)
    texts = render_prompts(items, "direct", loaded.tokenizer)
    m = args.eval_multiplier
    writes = {layer: m * args.alpha * norms[layer] * vectors.directions[layer] / vectors.directions[layer].norm()
              for layer in layers}
    engine = TransformersEngine(loaded, lambda: gated_edit(loaded, gates, writes, args.site), batch_size=8)
    label = {"form": "gated edit", "multiplier": m, "alpha": args.alpha, "site": SITES[args.site],
             "fit_count": args.fit_count, "ridge": args.ridge, "vectors": str(args.vectors)}
    baseline = read_baseline(args.baseline, items) if args.baseline else None
    summary = generate_and_score(items, texts, engine, args.max_new_tokens, Path(args.eval_out), label=label, resume=True,
                       baseline=baseline)
    paired = summary.get("paired")
    versus = f"; {paired['won']} won, {paired['lost']} lost, p = {paired['p_mcnemar_exact']:.2g}" if paired else ""
    print(f"gated edit, m {m:g}: {summary['correct']}/{summary['n']} = {summary['accuracy']:.1%}{versus}")


def _lengths(labels: torch.Tensor) -> list[int]:
    """Lengths of the texts whose positions `labels` concatenates (each ends in its one 1)."""
    ends = (labels > 0).nonzero().flatten().tolist()
    return [end - previous for previous, end in zip([-1] + ends[:-1], ends)]


if __name__ == "__main__":
    main()
