"""The French recipe end to end, as a user serves it: does the served export answer in French?

`unlock-export run recipes/zoo-qwen0.5b-to-1.5b-french.yaml OUT` writes the fold, a patched GGUF and a
control vector of the 0.5B's French key carried into the 1.5B (the map aligned on the key's contrast).
Here held-out questions (GSM8K train from offset 3100, never used by the recipe or to choose its scale)
go, as plain user turns, to:

  - llama-server's chat endpoint (/v1/chat/completions, the GGUF's own chat template) on the unsteered
    GGUF, on the patched GGUF, and on the unsteered GGUF with the control vector;
  - transformers, the chat template, the additive hooks of the run's vectors at the fold's scale (the
    reference the exports were verified against) and none (unsteered).

Greedy, 40 new tokens. French rate: experiments/map_fidelity.py's word count, not a language
identifier.

  python experiments/french_served.py OUT --out reports/results/french_served.json
  python experiments/french_served.py --render reports/results/french_served.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from map_fidelity import is_french  # noqa: E402


def _chat(port: int, question: str, tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "temperature": 0,
            "top_k": 1, "seed": 0, "cache_prompt": False}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def measure(args) -> dict:
    import torch  # noqa: F401

    from unlock_export import prompts
    from unlock_export.evaluation.engines.llama_server import LlamaServerEngine
    from unlock_export.evaluation.run import wilson
    from unlock_export.method.generate import greedy
    from unlock_export.method.pipeline import prompt_texts
    from unlock_export.method.steer import additive_steering
    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.models import zoo
    from unlock_export.models.loading import load
    from unlock_export.provenance import run_record

    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    scale = summary["fold"]["scale"]
    target = summary["target"]
    questions = prompts.load_questions("builtin:gsm8k-train", count=args.count, offset=args.offset)
    record = {"provenance": run_record(["experiments/french_served.py", *sys.argv[1:]]), "run": str(run),
              "recipe": summary["recipe"], "target": target, "scale": scale, "questions": len(questions),
              "offset": args.offset, "new_tokens": args.tokens, "rows": []}

    def add(name: str, engine: str, answers: list[str], seconds: float) -> None:
        k = sum(map(is_french, answers))
        lo, hi = wilson(k, len(answers))
        record["rows"].append({"arm": name, "engine": engine, "french": k, "n": len(answers), "ci95": [lo, hi],
                               "sample": answers[0][:160], "seconds": round(seconds, 1)})
        print(f"{name:40} {engine:28} French {k}/{len(answers)}  {answers[0][:70]!r}", flush=True)

    base_gguf = zoo.model_path(zoo.lookup(target)) if target.startswith("zoo:") else Path(target)
    if base_gguf.is_dir():
        base_gguf = next(base_gguf.glob("*.gguf"))
    for name, gguf, cvec in (("unsteered", base_gguf, None), ("patched GGUF", run / "model.gguf", None),
                             ("control vector", base_gguf, run / "control-vector.gguf")):
        t0 = time.perf_counter()
        with LlamaServerEngine(Path(gguf), Path(cvec) if cvec else None, parallel=1,
                               ctx_per_slot=args.tokens + 512) as server:
            answers = [_chat(server.port, q, args.tokens) for q in questions]
        add(name, "llama-server /v1/chat/completions", answers, time.perf_counter() - t0)

    loaded = load(target, dtype="float32", device="cpu")
    texts = prompt_texts(loaded, "plain", questions, prompts.Chat(), target)
    vectors = SteeringVectors.load(run / "vectors.safetensors")
    for name, steer in (("unsteered", None), ("hooks (additive, the fold's scale)", vectors)):
        t0 = time.perf_counter()
        if steer is None:
            rows = greedy(loaded, texts, args.tokens, 8)
        else:
            with additive_steering(loaded, steer, scale):
                rows = greedy(loaded, texts, args.tokens, 8)
        add(name, "transformers, chat template", [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in rows],
            time.perf_counter() - t0)
    return record


def render(path: Path) -> str:
    doc = json.loads(path.read_text())
    lines = [f"_Generated by `python experiments/french_served.py --render {path.relative_to(ROOT)}` from its results "
             "file; no labels are read._", "",
             f"# The French recipe served: {doc['recipe']}", "",
             f"`unlock-export run recipes/{doc['recipe']}.yaml` (fold scale {doc['scale']:g}) into {doc['target']}; "
             f"{doc['questions']} held-out GSM8K train questions from {doc['offset']} as plain user turns, greedy, "
             f"{doc['new_tokens']} new tokens. French rate: a word count (French function words outnumber English "
             "ones), not a language identifier.", "",
             "| arm | engine | French | 95% CI | first answer |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        sample = r["sample"].replace("|", "/").replace("\n", " ")[:90]
        lines.append(f"| {r['arm']} | {r['engine']} | {r['french']}/{r['n']} | {r['ci95'][0]:.0%}-{r['ci95'][1]:.0%} "
                     f"| {sample} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="the output folder of the French recipe's run")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--offset", type=int, default=3100)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "results" / "french_served.json")
    parser.add_argument("--render", type=Path, default=None, help="write the markdown report of this results file")
    args = parser.parse_args()
    if args.render:
        target = ROOT / "reports" / "french-served.md"
        target.write_text(render(args.render.resolve()))
        print(f"wrote {target}")
        return
    if not args.run:
        parser.error("pass the run's output folder, or --render")
    record = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
