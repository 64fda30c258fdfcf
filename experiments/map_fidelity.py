"""Does a better map carry the direction? Label-free transfer fidelity of alignment variants.

A key the target can compute itself (a system-prompt contrast through the chat template: "You always
answer in English." vs "... in French.", or the direct vs CoT prompt contrast) is read on the source
and on the target. Each alignment variant maps the source's key into the target; per target layer we
record its cosine with the target's own key and the share of the source key's norm inside the map's
source subspace (what the map can carry at all). No labels are read anywhere.

Variants: the prompts' format (GSM8K `direct`, or the key's own chat format), the positions paired
(the last token of each prompt, or every token: source and target share a tokenizer), the rank, and
centring and ridge least squares on the best of them.

With --behaviour, the target answers held-out questions (chat template, no system text, greedy) steered
by additive hooks at a small grid of scales: unsteered, its own key, the key carried by today's map and
by the best variant, and a random direction at the carried key's norms. The French rate is a
transparent word count (French function words outnumber English ones in the answer), not a language
identifier: it says whether the answers switch language, not how well they read.

  python experiments/map_fidelity.py --out reports/results/map_fidelity.json       # ~25 min on 2 cores
  python experiments/map_fidelity.py --render reports/results/map_fidelity.json    # the markdown report
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = {"english": "You always answer in English.", "french": "You always answer in French."}
FRENCH = {"le", "la", "les", "est", "et", "une", "un", "des", "du", "pour", "que", "avec", "dans", "il", "elle",
          "nous", "vous", "sont", "par", "sur", "qui", "pas", "au", "aux", "ce", "cette", "donc", "alors"}
ENGLISH = {"the", "is", "and", "of", "to", "a", "in", "for", "that", "with", "it", "he", "she", "we", "you", "are",
           "by", "on", "who", "not", "at", "this", "so", "then", "has", "have", "was"}


def is_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    fr = sum(w in FRENCH for w in words)
    en = sum(w in ENGLISH for w in words)
    return fr > en


@torch.inference_mode()
def token_states(loaded, texts: list[str], batch_size: int = 8) -> tuple[torch.Tensor, list[list[int]]]:
    """Every decoder layer's output at every real token: [layers, rows, d] (the prompts' tokens in order)
    and each prompt's token ids."""
    model, tok = loaded.model, loaded.tokenizer
    layers = loaded.arch.decoder_layers(model)
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    ids: list[list[int]] = []
    state: dict = {}

    def hook(i):
        def run(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            mask = state["mask"]
            for row in range(hidden.shape[0]):
                per_layer[i].append(hidden[row][mask[row]].float().cpu())
        return run

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True)
            state["mask"] = enc["attention_mask"].bool()
            ids += [row[m].tolist() for row, m in zip(enc["input_ids"], state["mask"])]
            model(**enc, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.cat(rows) for rows in per_layer]), ids


def last_rows(states: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    ends = torch.tensor([len(i) for i in ids]).cumsum(0) - 1
    return states[:, ends]


def fidelity(lrmap, key: torch.Tensor, target_key: torch.Tensor, layers: list[int]) -> dict:
    moved = lrmap.map_key(key)
    cos = torch.nn.functional.cosine_similarity(moved, target_key, dim=-1)
    share = lrmap.key_share(key)
    upper = [b for b in layers if b >= 2 * len(cos) // 3]
    return {"cosine": [round(float(c), 4) for c in cos], "share": [round(float(s), 4) for s in share],
            "cosine_mean": round(float(cos[layers].mean()), 4), "cosine_upper_mean": round(float(cos[upper].mean()), 4),
            "share_mean": round(float(share[layers].mean()), 4)}


def measure(args) -> dict:
    from unlock_export import prompts
    from unlock_export.method import align
    from unlock_export.method.pipeline import compute_key, prompt_texts
    from unlock_export.models.pool import ModelPool
    from unlock_export.models.runtime import RuntimeOptions
    from unlock_export.provenance import run_record

    pool = ModelPool(RuntimeOptions(dtype="float32", device="cpu", batch_size=8), progress=False)
    key_q = prompts.load_questions("builtin:gsm8k-train", count=args.key_count)
    align_q = prompts.load_questions("builtin:gsm8k-train", count=args.align_count)
    chat = prompts.Chat()
    record = {"provenance": run_record(["experiments/map_fidelity.py", *sys.argv[1:]]), "source": args.source,
              "target": args.target, "key_prompts": args.key_count, "align_prompts": args.align_count,
              "keys": {}, "variants": [], "timings_s": {}}
    keys: dict = {}
    states: dict = {}
    for role, spec in (("source", args.source), ("target", args.target)):
        t0 = time.perf_counter()
        keys[(role, "french")] = compute_key(pool, spec, spec, "plain", "plain", key_q, "mean", 0,
                                             prompts.Chat(SYSTEMS["english"]), prompts.Chat(SYSTEMS["french"]))[0]
        keys[(role, "cot")] = compute_key(pool, spec, spec, "direct", "cot", key_q)[0]
        loaded = pool.get(spec)
        for fmt in ("direct", "chat"):
            texts = prompt_texts(loaded, "direct", align_q, chat if fmt == "chat" else None, spec)
            states[(role, fmt)] = token_states(loaded, texts)
        record["timings_s"][role] = round(time.perf_counter() - t0, 1)
        pool.release()
    for fmt in ("direct", "chat"):
        if states[("source", fmt)][1] != states[("target", fmt)][1]:
            raise SystemExit(f"the {fmt} prompts tokenize differently on source and target: every-token pairing "
                             "needs one tokenizer")
    n_target = states[("target", "direct")][0].shape[0]
    record["target_hidden"] = int(states[("target", "direct")][0].shape[-1])
    steered = list(range(1, n_target))
    t0 = time.perf_counter()

    def variant(fmt: str, positions: str, rank: int, center: bool = False, ridge: float = 0.0) -> dict:
        (xs, ids), (xb, _) = states[("source", fmt)], states[("target", fmt)]
        if positions == "last":
            xs, xb = last_rows(xs, ids), last_rows(xb, ids)
        lrmap = align.fit(xs, xb, rank, center=center, ridge=ridge)
        row = {"format": fmt, "positions": positions, "rank": rank, "effective_rank": lrmap.rank, "center": center,
               "ridge": ridge, "pairs": int(xs.shape[1])}
        for kind in ("french", "cot"):
            row[kind] = fidelity(lrmap, keys[("source", kind)].vectors, keys[("target", kind)].vectors, steered)
        print(f"{fmt:6} {positions:4} rank {rank:3} center {center!s:5} ridge {ridge:<4} french cos "
              f"{row['french']['cosine_mean']:.3f} (upper {row['french']['cosine_upper_mean']:.3f}) share "
              f"{row['french']['share_mean']:.2f}; cot cos {row['cot']['cosine_mean']:.3f}", flush=True)
        return row

    for fmt in ("direct", "chat"):
        for positions in ("last", "all"):
            for rank in (16, 64, 256):
                if positions == "last" and rank > args.align_count:
                    continue
                record["variants"].append(variant(fmt, positions, rank))
    best = max(record["variants"], key=lambda r: r["french"]["cosine_mean"])
    for center, ridge in ((True, 0.0), (False, 0.1), (True, 0.1)):
        record["variants"].append(variant(best["format"], best["positions"], best["rank"], center, ridge))
    record["timings_s"]["fits"] = round(time.perf_counter() - t0, 1)
    for (role, kind), key in keys.items():
        record["keys"][f"{role}_{kind}"] = [round(float(v), 4) for v in key.vectors.norm(dim=1)]
    record["best"] = {k: v for k, v in max(record["variants"], key=lambda r: r["french"]["cosine_mean"]).items()
                      if k in ("format", "positions", "rank", "center", "ridge")}
    record["today"] = {"format": "direct", "positions": "last", "rank": 16, "center": False, "ridge": 0.0}
    if args.behaviour:
        record["behaviour"] = behaviour(args, pool, keys, states, record)
    return record


def behaviour(args, pool, keys, states, record) -> dict:
    """The target's French rate on held-out questions under additive hooks, per direction and scale."""
    from unlock_export import prompts
    from unlock_export.evaluation.run import wilson
    from unlock_export.method import align
    from unlock_export.method.generate import greedy
    from unlock_export.method.pipeline import prompt_texts
    from unlock_export.method.steer import additive_steering
    from unlock_export.method.vectors import SteeringVectors

    def fitted(cfg: dict):
        (xs, ids), (xb, _) = states[("source", cfg["format"])], states[("target", cfg["format"])]
        if cfg["positions"] == "last":
            xs, xb = last_rows(xs, ids), last_rows(xb, ids)
        return align.fit(xs, xb, cfg["rank"], center=cfg["center"], ridge=cfg["ridge"])

    loaded = pool.get(args.target)
    n, d = loaded.n_layers, loaded.hidden_size
    layers = list(range(1, n))
    own = keys[("target", "french")].vectors
    directions = {"target's own key": own}
    for name in ("today", "best"):
        directions[f"carried, {name} map"] = fitted(record[name]).map_key(keys[("source", "french")].vectors)
    g = torch.Generator().manual_seed(0)
    carried = directions["carried, best map"]
    rand = torch.randn(n, d, generator=g)
    directions["random, the best map's carried norms"] = rand / rand.norm(dim=1, keepdim=True) * carried.norm(
        dim=1, keepdim=True)
    questions = prompts.load_questions("builtin:gsm8k-train", count=args.behaviour, offset=3000)
    texts = prompt_texts(loaded, "plain", questions, prompts.Chat(), args.target)
    out = {"questions": len(texts), "new_tokens": args.tokens, "layers": "1-%d" % (n - 1), "rows": []}

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
    lines = [f"_Generated by `python experiments/map_fidelity.py --render {path.relative_to(ROOT)}` from its "
             "results file; figures are label-free._", "",
             f"# Does the map carry the direction? {doc['source']} -> {doc['target']}", "",
             f"Keys from {doc['key_prompts']} GSM8K train questions: **french**, the system-prompt contrast through "
             "the chat template (\"You always answer in English.\" vs \"... in French.\"); **cot**, direct vs "
             f"CoT prompt. Alignment on {doc['align_prompts']} GSM8K train questions. Cosine: the carried key "
             "against the target's own key, mean over layers 1..B-1 (upper: the top third); share: the source "
             "key's norm inside the map's source subspace. Random directions in this width: cosine about "
             f"{1 / doc['target_hidden'] ** 0.5:.2f}.", "",
             "| format | positions | rank | center | ridge | pairs | french cosine | french upper | french share "
             "| cot cosine | cot share |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        lines.append(f"| {r['format']} | {r['positions']} | {r['rank']} ({r['effective_rank']}) | {r['center']} | "
                     f"{r['ridge']} | {r['pairs']} | {r['french']['cosine_mean']:.3f} | "
                     f"{r['french']['cosine_upper_mean']:.3f} | {r['french']['share_mean']:.2f} | "
                     f"{r['cot']['cosine_mean']:.3f} | {r['cot']['share_mean']:.2f} |")
    lines += ["", f"Today's map: {doc['today']}. Best by French cosine: {doc['best']}.", ""]
    beh = doc.get("behaviour")
    if beh:
        lines += [f"## Behaviour: French answers of the target ({beh['questions']} held-out questions, chat template, "
                  f"greedy, {beh['new_tokens']} new tokens, additive hooks on layers {beh['layers']})", "",
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
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "results" / "map_fidelity.json")
    parser.add_argument("--render", type=Path, default=None, help="write the markdown report of this results file")
    args = parser.parse_args()
    if args.render:
        target = ROOT / "reports" / "map-fidelity.md"
        target.write_text(render(args.render.resolve()))
        print(f"wrote {target}")
        return
    record = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
