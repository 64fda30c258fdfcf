"""Does a map fitted on prompts that span the key's own contrast carry the key? Label-free.

The map today is fitted on the same prompts in one format (GSM8K questions). A key is a contrast
between two formats of a prompt (English vs French system prompt; direct vs CoT template); the map
sees no variation along it, so least squares has no reason to carry it (reports/map-fidelity.md: no
variant carried the French key, cosine <= 0.12 to the target's own key). Here the alignment prompts
are other questions (train 1000+, not the key's) in *both* of the key's formats, run through source
and target: still shared unlabeled prompts, no answers, no training. Variants: the baseline formats
(GSM8K `direct`; the chat template with `direct`), each contrast's two formats, and all four
together; last token or every token (one tokenizer); rank 16 and 64.

Per variant: each key's cosine with the target's own key per target layer (mean over layers 1..B-1),
and the share of the source key inside the map's source subspace. With --behaviour N: the target's
French rate on N held-out questions (chat template, greedy) under additive hooks at a small grid of
scales, for its own key, the key carried by today's map and by the best contrast map, and a random
direction at the carried key's norms (the word-count detector of experiments/map_fidelity.py).

  python experiments/contrast_alignment.py --behaviour 16 --out reports/results/contrast_alignment.json
  python experiments/contrast_alignment.py --render reports/results/contrast_alignment.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from map_fidelity import SYSTEMS, fidelity, is_french, last_rows, token_states  # noqa: E402

# alignment prompt sets: name -> (template, system prompt or None for no chat template, "" for chat, no system)
FORMATS = {
    "direct": ("direct", None),
    "chat": ("direct", ""),
    "chat-english": ("plain", SYSTEMS["english"]),
    "chat-french": ("plain", SYSTEMS["french"]),
    "cot": ("cot", None),
}
VARIANTS = {  # alignment prompt sets used together
    "direct (today)": ["direct"],
    "chat": ["chat"],
    "french contrast: english + french systems": ["chat-english", "chat-french"],
    "cot contrast: direct + cot templates": ["direct", "cot"],
    "both contrasts": ["chat-english", "chat-french", "direct", "cot"],
}


def measure(args) -> dict:
    from unlock_export import prompts
    from unlock_export.method import align
    from unlock_export.method.pipeline import compute_key, prompt_texts
    from unlock_export.models.pool import ModelPool
    from unlock_export.models.runtime import RuntimeOptions
    from unlock_export.provenance import run_record

    pool = ModelPool(RuntimeOptions(dtype="float32", device="cpu", batch_size=8), progress=False)
    key_q = prompts.load_questions("builtin:gsm8k-train", count=args.key_count)
    align_q = prompts.load_questions("builtin:gsm8k-train", count=args.align_count, offset=1000)
    record = {"provenance": run_record(["experiments/contrast_alignment.py", *sys.argv[1:]]), "source": args.source,
              "target": args.target, "key_prompts": args.key_count, "align_prompts": args.align_count,
              "align_offset": 1000, "variants": [], "timings_s": {}}
    keys, states = {}, {}
    for role, spec in (("source", args.source), ("target", args.target)):
        t0 = time.perf_counter()
        keys[(role, "french")] = compute_key(pool, spec, spec, "plain", "plain", key_q, "mean", 0,
                                             prompts.Chat(SYSTEMS["english"]), prompts.Chat(SYSTEMS["french"]))[0].vectors
        keys[(role, "cot")] = compute_key(pool, spec, spec, "direct", "cot", key_q)[0].vectors
        loaded = pool.get(spec)
        for name, (template, system) in FORMATS.items():
            chat = None if system is None else prompts.Chat(system or None)
            states[(role, name)] = token_states(loaded, prompt_texts(loaded, template, align_q, chat, spec))
        record["timings_s"][role] = round(time.perf_counter() - t0, 1)
        print(f"{role}: keys and states in {record['timings_s'][role]} s", flush=True)
        pool.release()
    n_target = keys[("target", "french")].shape[0]
    record["target_hidden"] = int(keys[("target", "french")].shape[1])
    steered = list(range(1, n_target))
    maps = {}

    def stacked(role: str, names: list[str], positions: str) -> torch.Tensor:
        parts = []
        for name in names:
            x, ids = states[(role, name)]
            parts.append(last_rows(x, ids) if positions == "last" else x)
        return torch.cat(parts, dim=1)

    for variant, names in VARIANTS.items():
        for name in names:
            if states[("source", name)][1] != states[("target", name)][1]:
                raise SystemExit(f"the {name} prompts tokenize differently on source and target")
        for positions in ("last", "all"):
            for rank in (16, 64):
                lrmap = align.fit(stacked("source", names, positions), stacked("target", names, positions), rank)
                row = {"variant": variant, "formats": names, "positions": positions, "rank": rank,
                       "effective_rank": lrmap.rank, "pairs": int(stacked("source", names, positions).shape[1])}
                for kind in ("french", "cot"):
                    row[kind] = fidelity(lrmap, keys[("source", kind)], keys[("target", kind)], steered)
                maps[(variant, positions, rank)] = lrmap
                record["variants"].append(row)
                print(f"{variant:45} {positions:4} rank {rank:3}: french cos {row['french']['cosine_mean']:.3f} "
                      f"(upper {row['french']['cosine_upper_mean']:.3f}) share {row['french']['share_mean']:.2f}; "
                      f"cot cos {row['cot']['cosine_mean']:.3f} share {row['cot']['share_mean']:.2f}", flush=True)
    best = max(record["variants"], key=lambda r: r["french"]["cosine_mean"])
    record["best"] = {k: best[k] for k in ("variant", "positions", "rank")}
    record["today"] = {"variant": "direct (today)", "positions": "last", "rank": 16}
    if args.behaviour:
        carried = {name: maps[(cfg["variant"], cfg["positions"], cfg["rank"])].map_key(keys[("source", "french")])
                   for name, cfg in (("today", record["today"]), ("best", record["best"]))}
        record["behaviour"] = behaviour(args, pool, keys[("target", "french")], carried)
    return record


def behaviour(args, pool, own: torch.Tensor, carried: dict) -> dict:
    from unlock_export import prompts
    from unlock_export.evaluation.run import wilson
    from unlock_export.method.generate import greedy
    from unlock_export.method.pipeline import prompt_texts
    from unlock_export.method.steer import additive_steering
    from unlock_export.method.vectors import SteeringVectors

    loaded = pool.get(args.target)
    n, d = loaded.n_layers, loaded.hidden_size
    layers = list(range(1, n))
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(n, d, generator=g)
    directions = {"target's own key": own, "carried, today's map": carried["today"],
                  "carried, best contrast map": carried["best"],
                  "random, the best map's carried norms": rand / rand.norm(dim=1, keepdim=True)
                  * carried["best"].norm(dim=1, keepdim=True)}
    questions = prompts.load_questions("builtin:gsm8k-train", count=args.behaviour, offset=3000)
    texts = prompt_texts(loaded, "plain", questions, prompts.Chat(), args.target)
    out = {"questions": len(texts), "new_tokens": args.tokens, "layers": f"1-{n - 1}", "rows": []}

    def run(name: str, scale: float, vectors) -> None:
        t0 = time.perf_counter()
        if vectors is None:
            rows = greedy(loaded, texts, args.tokens, 8)
        else:
            with additive_steering(loaded, vectors, scale):
                rows = greedy(loaded, texts, args.tokens, 8)
        answers = [loaded.tokenizer.decode(r) for r in rows]
        k = sum(map(is_french, answers))
        lo, hi = wilson(k, len(answers))
        out["rows"].append({"direction": name, "scale": scale, "french": k, "n": len(answers), "ci95": [lo, hi],
                            "sample": answers[0][:160], "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:40} scale {scale:<5} French {k}/{len(answers)}  {answers[0][:80]!r}", flush=True)

    run("unsteered", 0.0, None)
    for name, dirs in directions.items():
        vectors = SteeringVectors({b: dirs[b] for b in layers}, n, d)
        for scale in args.scales:
            run(name, scale, vectors)
    return out


def render(path: Path) -> str:
    doc = json.loads(path.read_text())
    lines = [f"_Generated by `python experiments/contrast_alignment.py --render {path.relative_to(ROOT)}` from its "
             "results file; figures are label-free._", "",
             f"# A map fitted on the key's own contrast: {doc['source']} -> {doc['target']}", "",
             f"Keys from {doc['key_prompts']} GSM8K train questions (french: the English vs French system prompt "
             "through the chat template; cot: direct vs CoT template). Alignment on "
             f"{doc['align_prompts']} other train questions (from {doc['align_offset']}) in the formats named. "
             "Cosine: the carried key against the target's own key, mean over layers 1..B-1 (upper: the top "
             "third); share: the source key's norm inside the map's source subspace. Random directions in this "
             f"width: cosine about {1 / doc['target_hidden'] ** 0.5:.2f}.", "",
             "| alignment prompts | positions | rank | pairs | french cosine | french upper | french share | "
             "cot cosine | cot share |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        lines.append(f"| {r['variant']} | {r['positions']} | {r['rank']} ({r['effective_rank']}) | {r['pairs']} | "
                     f"{r['french']['cosine_mean']:.3f} | {r['french']['cosine_upper_mean']:.3f} | "
                     f"{r['french']['share_mean']:.2f} | {r['cot']['cosine_mean']:.3f} | {r['cot']['share_mean']:.2f} |")
    lines += ["", f"Today's map: {doc['today']}. Best by French cosine: {doc['best']}.", ""]
    beh = doc.get("behaviour")
    if beh:
        lines += [f"## French answers of the target ({beh['questions']} held-out questions, chat template, greedy, "
                  f"{beh['new_tokens']} new tokens, additive hooks on layers {beh['layers']})", "",
                  "French rate: a word count (French function words outnumber English ones), not a language "
                  "identifier.", "", "| direction | scale | French | 95% CI | first answer |", "|---|---|---|---|---|"]
        for r in beh["rows"]:
            sample = r["sample"].replace("|", "/").replace("\n", " ")[:90]
            lines.append(f"| {r['direction']} | {r['scale']:g} | {r['french']}/{r['n']} | "
                         f"{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%} | {sample} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="zoo:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--target", default="zoo:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--key-count", type=int, default=64)
    parser.add_argument("--align-count", type=int, default=64)
    parser.add_argument("--behaviour", type=int, default=0, help="held-out questions for the French rate (0: skip)")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "results" / "contrast_alignment.json")
    parser.add_argument("--render", type=Path, default=None, help="write the markdown report of this results file")
    args = parser.parse_args()
    if args.render:
        target = ROOT / "reports" / "contrast-alignment.md"
        target.write_text(render(args.render.resolve()))
        print(f"wrote {target}")
        return
    record = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
