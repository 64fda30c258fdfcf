"""Which behaviours does the map carry, and where does the chain break? A label-free benchmark.

Five behaviours a program can check without labels, each a contrastive-pairs key (the same GSM8K
question as the user's turn of the model's chat template, after an instruction that asks for the
behaviour or for its opposite):

  french     "Answer in French."                vs "Answer in English."          (a French word count)
  capitals   "Answer in ALL CAPITAL LETTERS."   vs "Answer in normal sentence case."  (>= 80% of letters upper)
  bullets    "Answer as a bulleted list."       vs "Answer in one paragraph of prose." (>= 2 lines opening "- ", "* ", "• ")
  brief      "Answer in at most ten words."     vs "Answer in full detail."       (ends within the budget, <= 20 words)
  emoji      "Answer with many emojis."         vs "Answer without any emojis."   (an emoji in the answer)

Per model: the residual at the last token of both sides of each pair (`pipeline.pair_states`, the
product's pairs path) for the key pairs (train questions 0..K-1) and for alignment pairs (1000..,
other questions), and the last-token states of plain prompts (2000.., direct template; chat template,
no instruction). A key is the mean positive - negative difference. Maps per direction, all from these
states (`align.fit`): **today's** (direct prompts, rank 16: what `align` fits by default), **own
contrast** (plain chat prompts plus this behaviour's alignment pairs, rank 64: `align --contrast-pairs`),
and **other contrasts** (plain chat prompts plus the *other four* behaviours' alignment pairs, rank 64:
does a map carry a behaviour it never saw?).

Then the target answers held-out questions (train 3000.., plain user turns through its chat template,
greedy) under additive hooks on layers 1..B-1 at a small grid of scales: the prompt that asks for the
behaviour (the ceiling), unsteered, its own key (is the target steerable?), the key carried by each map,
and a random direction at the own-contrast carried key's norms (control). The source steered by its own
key is the reverse direction's "own key" row (both directions run). A degenerate answer (one token
more than 40% of it) is counted apart: a rate reached by breaking the model is not a transfer.

  python experiments/behaviours.py                      # resumable; results after every row
  python experiments/behaviours.py --scales 0.1,0.25,0.5   # later: add a scale's rows, keep the others
  python experiments/behaviours.py --scales 0.1,0.25,0.5 --behaviours capitals --directions qwen0.5b->qwen1.5b
  python experiments/behaviours.py --render reports/results/behaviours.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from map_fidelity import is_french  # noqa: E402

BEHAVIOURS = {
    "french": ("Answer in French.", "Answer in English."),
    "capitals": ("Answer in ALL CAPITAL LETTERS.", "Answer in normal sentence case."),
    "bullets": ("Answer as a bulleted list.", "Answer in one paragraph of prose."),
    "brief": ("Answer in at most ten words.", "Answer in full detail."),
    "emoji": ("Answer with many emojis.", "Answer without any emojis."),
}
MODELS = {"qwen0.5b": "zoo:qwen2.5-coder-0.5b-instruct", "qwen1.5b": "zoo:qwen2.5-coder-1.5b-instruct",
          "smollm2-135m": "zoo:smollm2-135m-instruct"}
DIRECTIONS = [("qwen0.5b", "qwen1.5b"), ("qwen1.5b", "qwen0.5b"), ("qwen0.5b", "smollm2-135m")]
OWN = ("unsteered", "ceiling", "own key")  # what a target does by itself (the source's check in the other direction)
# the order rows are run in: the forward direction whole, what the 0.5B does by itself (the forward key's check),
# the cross-family direction, then the rest of the reverse direction
PLAN = [(DIRECTIONS[0], None), (DIRECTIONS[1], "own"), (DIRECTIONS[2], None), (DIRECTIONS[1], "carried")]
MAPS = {"today": "today's map (direct prompts, rank 16)",
        "own": "own contrast (chat prompts + this behaviour's pairs, rank 64)",
        "others": "other contrasts (chat prompts + the other four behaviours' pairs, rank 64)"}
EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
BULLET = re.compile(r"^\s*[-*\u2022]\s+\S", re.M)


def shows(behaviour: str, text: str, finished: bool) -> bool:
    """Whether an answer shows the behaviour (the detectors in the module's docstring)."""
    if behaviour == "french":
        return is_french(text)
    if behaviour == "capitals":
        letters = [c for c in text if c.isalpha() and c.isascii()]
        return len(letters) >= 10 and sum(c.isupper() for c in letters) >= 0.8 * len(letters)
    if behaviour == "bullets":
        return len(BULLET.findall(text)) >= 2
    if behaviour == "brief":
        return finished and len(text.split()) <= 20
    if behaviour == "emoji":
        return bool(EMOJI.search(text))
    raise KeyError(behaviour)


def degenerate(ids: list[int]) -> bool:
    return len(ids) >= 8 and Counter(ids).most_common(1)[0][1] > 0.4 * len(ids)


def pairs_of(questions: list[str], behaviour: str):
    from unlock_export.prompts import Pair

    positive, negative = BEHAVIOURS[behaviour]
    return [Pair(f"{positive}\n\n{q}", f"{negative}\n\n{q}", None, i + 1) for i, q in enumerate(questions)]


def capture(pool, name: str, args, cache: Path) -> dict:
    """Every last-token state a model contributes, cached: {key/align: {behaviour: [L, 2N, d]}, plain: ...}."""
    import torch

    from unlock_export import prompts
    from unlock_export.method.pipeline import capture_states, pair_states

    path = cache / f"states-{name}.pt"
    if path.exists():
        return torch.load(path)
    spec, t0 = MODELS[name], time.perf_counter()
    key_q = prompts.load_questions("builtin:gsm8k-train", count=args.key_count)
    align_q = prompts.load_questions("builtin:gsm8k-train", count=args.align_count, offset=1000)
    plain_q = prompts.load_questions("builtin:gsm8k-train", count=args.plain_count, offset=2000)
    chat = prompts.Chat()
    states = {"key": {}, "align": {}}
    for b in BEHAVIOURS:
        states["key"][b] = pair_states(pool, spec, pairs_of(key_q, b), chat, f"{name} key pairs {b}")
        states["align"][b] = pair_states(pool, spec, pairs_of(align_q, b), chat, f"{name} align pairs {b}")
    states["direct"] = capture_states(pool, spec, "direct", plain_q, f"{name} direct")
    states["chat"] = capture_states(pool, spec, "plain", plain_q, f"{name} chat", chat=chat)
    states["seconds"] = round(time.perf_counter() - t0, 1)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(states, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    print(f"{name}: states in {states['seconds']} s", flush=True)
    return states


def key_of(states: dict, part: str, behaviour: str):
    from unlock_export.method.key import aggregate_differences

    both = states[part][behaviour]
    n = both.shape[1] // 2
    return aggregate_differences(both[:, n:], both[:, :n])  # positive - negative


def maps_of(src: dict, tgt: dict, behaviour: str, today) -> dict:
    """today's map (fitted once per direction, passed in), and the two contrast maps of `behaviour`."""
    import torch

    from unlock_export.method import align

    def stacked(states: dict, extra: list[str]):
        return torch.cat([states["chat"], *(states["align"][b] for b in extra)], dim=1)

    others = [b for b in BEHAVIOURS if b != behaviour]
    return {"today": today,
            "own": align.fit(stacked(src, [behaviour]), stacked(tgt, [behaviour]), 64),
            "others": align.fit(stacked(src, others), stacked(tgt, others), 64)}


def fidelity(lrmap, key, own) -> dict:
    import torch

    cos = torch.nn.functional.cosine_similarity(lrmap.map_key(key), own, dim=-1)[1:]
    return {"cosine": round(float(cos.mean()), 4), "share": round(float(lrmap.key_share(key)[1:].mean()), 4)}


def measure(args, record: dict, save) -> None:
    import torch

    from unlock_export import prompts
    from unlock_export.evaluation.run import wilson
    from unlock_export.method.generate import greedy
    from unlock_export.method.pipeline import prompt_texts
    from unlock_export.method.steer import additive_steering
    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.models.pool import ModelPool
    from unlock_export.models.runtime import RuntimeOptions

    pool = ModelPool(RuntimeOptions(dtype="float32", device="cpu", batch_size=8), progress=False)
    states = {}
    for name in dict.fromkeys(n for d in DIRECTIONS for n in d):
        states[name] = capture(pool, name, args, args.cache)
        record["states_s"][name] = states[name]["seconds"]
        pool.release()
    for name, st in states.items():  # each key's norm per layer beside the residual's (the plain prompts' mean)
        residual = st["chat"].norm(dim=-1).mean(dim=1)
        record.setdefault("key_norms", {})[name] = {
            "residual": [round(float(x), 2) for x in residual],
            **{b: [round(float(x), 2) for x in key_of(st, "key", b).norm(dim=-1)] for b in BEHAVIOURS}}
    questions = prompts.load_questions("builtin:gsm8k-train", count=args.questions, offset=3000)
    unsteered: dict = {}
    done = {(r["source"], r["target"], r["behaviour"], r["direction"], r["scale"]) for r in record["rows"]}
    for (source, target), only in PLAN:
        if args.directions and f"{source}->{target}" not in args.directions:
            continue
        src, tgt = states[source], states[target]
        loaded = pool.get(MODELS[target])
        n, d = loaded.n_layers, loaded.hidden_size
        plain = prompt_texts(loaded, "plain", questions, prompts.Chat(), target)

        def run(behaviour: str, direction: str, scale: float, texts: list[str], vectors=None) -> None:
            if (source, target, behaviour, direction, scale) in done or (only == "own") != (direction in OWN) \
                    and only is not None:
                return
            t0 = time.perf_counter()
            if vectors is None and texts is plain:  # one unsteered generation serves every behaviour
                if target not in unsteered:
                    unsteered[target] = greedy(loaded, texts, args.tokens, 16)
                rows = unsteered[target]
            elif vectors is None:
                rows = greedy(loaded, texts, args.tokens, 16)
            else:
                with additive_steering(loaded, SteeringVectors({b: vectors[b] for b in range(1, n)}, n, d), scale):
                    rows = greedy(loaded, texts, args.tokens, 16)
            answers = [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
            hits = [shows(behaviour, a, len(r) < args.tokens) for a, r in zip(answers, rows)]
            broken = [degenerate(r) for r in rows]
            k = sum(h and not x for h, x in zip(hits, broken))
            record["rows"].append({
                "source": source, "target": target, "behaviour": behaviour, "direction": direction, "scale": scale,
                "shows": k, "shows_any": sum(hits), "degenerate": sum(broken), "n": len(rows), "ci95": list(wilson(k, len(rows))),
                "sample": answers[0][:160], "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{source}->{target} {behaviour:8} {direction:9} {scale:<5} {k}/{len(rows)} "
                  f"(degenerate {sum(broken)})  {answers[0][:70]!r}", flush=True)
            done.add((source, target, behaviour, direction, scale))
            save()

        from unlock_export.method import align

        today = align.fit(src["direct"], tgt["direct"], 16)  # the same for every behaviour
        for behaviour in args.behaviours or BEHAVIOURS:
            own = key_of(tgt, "key", behaviour)
            key = key_of(src, "key", behaviour)
            maps = maps_of(src, tgt, behaviour, today)
            record["fidelity"].setdefault(f"{source}->{target}", {})[behaviour] = {
                m: fidelity(lrmap, key, own) for m, lrmap in maps.items()}
            carried = {m: lrmap.map_key(key) for m, lrmap in maps.items()}
            rand = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
            run(behaviour, "unsteered", 0.0, plain)
            run(behaviour, "ceiling", 0.0, prompt_texts(
                loaded, "plain", [f"{BEHAVIOURS[behaviour][0]}\n\n{q}" for q in questions], prompts.Chat(), target))
            directions = {"own key": own, **carried,
                          "random": rand / rand.norm(dim=1, keepdim=True) * carried["own"].norm(dim=1, keepdim=True)}
            for scale in args.scales:
                for direction, vectors in directions.items():
                    run(behaviour, direction, scale, plain, vectors)
        pool.release()


def render(path: Path) -> str:
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    lines = [f"_Generated by `python experiments/behaviours.py --render {path.relative_to(ROOT)}` from its results "
             "file; no labels are read._", "", "# Which behaviours does the map carry?", "",
             f"Keys: {doc['key_count']} contrastive pairs per behaviour (GSM8K train questions after an instruction "
             "for the behaviour or its opposite, the user's turn of the chat template). Alignment pairs: "
             f"{doc['align_count']} other questions; plain prompts {doc['plain_count']}. Answers: {doc['questions']} held-out questions as plain user "
             f"turns, greedy, {doc['tokens']} new tokens, additive hooks on layers 1..B-1 at scales "
             f"from {', '.join(f'{s:g}' for s in doc['scales'])} (each direction says which were run). A cell is the best scale's count of answers that show the "
             "behaviour and are not degenerate (one token over 40% of the answer), with its scale; "
             "**bold** where it beats unsteered by at least half the questions.", "",
             "| behaviour | instruction | detector |", "|---|---|---|",
             "| french | Answer in French. / in English. | French function words outnumber English ones |",
             "| capitals | Answer in ALL CAPITAL LETTERS. / in normal sentence case. | >= 80% of ASCII letters upper |",
             "| bullets | Answer as a bulleted list. / in one paragraph of prose. | >= 2 lines opening -, * or • |",
             "| brief | Answer in at most ten words. / in full detail. | ends within the budget, <= 20 words |",
             "| emoji | Answer with many emojis. / without any emojis. | an emoji in the answer |", ""]
    for source, target in DIRECTIONS:
        sel = [r for r in rows if r["source"] == source and r["target"] == target]
        if not sel:
            continue
        tried = {b: sorted({r["scale"] for r in sel if r["behaviour"] == b and r["direction"] == "own key"})
                 for b in BEHAVIOURS}
        tried_text = "; ".join(f"{b} {', '.join(f'{x:g}' for x in v)}" for b, v in tried.items() if v)
        lines += [f"## {source} -> {target}", "", f"Scales run, per behaviour: {tried_text or 'none yet'}.", "",
                  "| behaviour | ceiling (asked) | unsteered | target's own key | " +
                  " | ".join(f"carried, {m}" for m in MAPS) + " | random | breaks at |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in BEHAVIOURS:
            by = {(r["direction"], r["scale"]): r for r in sel if r["behaviour"] == b}
            if ("unsteered", 0.0) not in by:
                continue
            n = by[("unsteered", 0.0)]["n"]
            base = by[("unsteered", 0.0)]["shows"]

            def cell(direction: str, scale=None) -> tuple[str, bool]:
                found = [by[k] for k in by if k[0] == direction and (scale is None or k[1] == scale)]
                if not found:
                    return "-", False
                r = max(found, key=lambda r: (r["shows"], -r["scale"]))
                lifted = r["shows"] - base >= n / 2
                text = f"{r['shows']}/{n}" + (f" @{r['scale']:g}" if direction not in ("unsteered", "ceiling") else "")
                text += f" ({r['degenerate']} degenerate)" if r["degenerate"] else ""
                return (f"**{text}**" if lifted else text), lifted

            cells = {d: cell(d) for d in ("ceiling", "unsteered", "own key", *MAPS, "random")}
            def broken(found: list) -> bool:  # every scale tried breaks the text (most answers degenerate)
                return bool(found) and all(r["degenerate"] >= r["n"] / 2 for r in found)

            own_rows = [r for r in sel if r["behaviour"] == b and r["direction"] == "own key"]
            src_rows = [r for r in rows if r["target"] == source and r["behaviour"] == b and r["direction"] == "own key"]
            src_base = [r for r in rows if r["target"] == source and r["behaviour"] == b and r["direction"] == "unsteered"]
            source_ok = None
            if src_rows and src_base:
                source_ok = max(r["shows"] for r in src_rows) - src_base[0]["shows"] >= src_base[0]["n"] / 2
            carriers = [m for m in MAPS if cells[m][1]]
            if any(cells[m][0] == "-" for m in (*MAPS, "random")):
                where = "not known yet: the carried rows have not all run"
            elif carriers:  # the target shows it under a carried key, whatever the source does with it
                where = "carried by " + ", ".join(carriers) + ("" if "today" in carriers else "; today's map breaks")
                if source_ok is False:
                    where += " (though the source's own key does not steer the source)"
            elif source_ok is False:
                where = ("scale: the source's own key breaks the source's text at every scale tried"
                         if broken(src_rows) else "key: the source's own key does not steer the source")
            elif not cells["own key"][1]:
                where = ("scale: the target's own key breaks its text at every scale tried (smaller ones not tried)"
                         if broken(own_rows) else "target: its own key does not steer it")
            else:
                where = "map"
            if source_ok is None:
                where += " (the source's own key not run yet)"
            if not cells["ceiling"][1]:
                where += "; the target does not do it even when asked"
            lines.append(f"| {b} | " + " | ".join(cells[d][0] for d in cells) + f" | {where} |")
        norms = doc.get("key_norms", {}).get(target)
        if norms:
            mid = len(norms["residual"]) // 2
            lines += ["", f"The target's own keys' norms at its middle layer {mid}, against the residual's "
                      f"({norms['residual'][mid]:g}): " + ", ".join(f"{b} {norms[b][mid]:g}" for b in BEHAVIOURS) + "."]
        fid = doc["fidelity"].get(f"{source}->{target}", {})
        if fid:
            lines += ["", "Label-free fidelity of the carried key (cosine with the target's own key, mean over layers "
                      "1..B-1 / share of the source key inside the map's source subspace):", "",
                      "| behaviour | " + " | ".join(MAPS[m] for m in MAPS) + " |", "|---|---|---|---|"]
            for b, per in fid.items():
                lines.append(f"| {b} | " + " | ".join(f"{per[m]['cosine']:.2f} / {per[m]['share']:.2f}" for m in MAPS)
                             + " |")
        lines.append("")
    lines += ["## Every row", "", "| direction | behaviour | steering | scale | shows | 95% CI | degenerate | first answer |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sample = r["sample"].replace("|", "/").replace("\n", " ")[:80]
        lines.append(f"| {r['source']}->{r['target']} | {r['behaviour']} | {r['direction']} | {r['scale']:g} | "
                     f"{r['shows']}/{r['n']} | {r['ci95'][0]:.0%}-{r['ci95'][1]:.0%} | {r['degenerate']} | {sample} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-count", type=int, default=24)
    parser.add_argument("--align-count", type=int, default=24)
    parser.add_argument("--plain-count", type=int, default=64, help="plain prompts (today's map; the chat part)")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    parser.add_argument("--behaviours", type=lambda s: [b for b in s.split(",") if b], default=None,
                        help="run only these behaviours' rows now (comma list; default all)")
    parser.add_argument("--directions", type=lambda s: s.split(","), default=None,
                        help="run only these directions' rows now (such as qwen0.5b->qwen1.5b; default all)")
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "behaviours")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "results" / "behaviours.json")
    parser.add_argument("--render", type=Path, default=None, help="write the markdown report of this results file")
    args = parser.parse_args()
    if args.render:
        target = ROOT / "reports" / "behaviours.md"
        target.write_text(render(args.render.resolve()))
        print(f"wrote {target}")
        return
    from unlock_export.provenance import run_record

    settings = {"key_count": args.key_count, "align_count": args.align_count, "plain_count": args.plain_count, "questions": args.questions,
                "tokens": args.tokens, "scales": args.scales}
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if record and any(record.get(k) != v for k, v in settings.items() if k != "scales"):
        raise SystemExit(f"{args.out} was made with other settings: move it away to start again")
    if record and not set(record["scales"]) <= set(args.scales):
        raise SystemExit(f"{args.out} has rows at scales {record['scales']}: --scales may add scales, not drop them")
    if record:
        record["scales"] = sorted(args.scales)  # more scales: their rows are added, the others kept
    record = record or {"provenance": run_record(["experiments/behaviours.py", *sys.argv[1:]]), **settings,
                        "models": MODELS, "states_s": {}, "fidelity": {}, "rows": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, args.out)

    measure(args, record, save)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
