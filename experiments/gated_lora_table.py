"""Does the gated LoRA carry the paper form's gain? (issue: the paper's own form in stock servers)

On the zoo 1.5B target (0.5B source, CoT key, the recipe zoo-qwen0.5b-to-1.5b-cot with layers 1..27),
the first COUNT GSM8K dev questions, direct prompt, greedy, at 512 new tokens:

  unsteered          llama.cpp, the target's zoo GGUF
  paper-form         transformers hooks: the paper's prefill-only last-token edit at alpha 0.1
  folded-answer-key  llama.cpp, the bias fold of the key read over the answer's first 16 tokens at its
                     label-free scale (patched GGUF): the best bias fold of the 200-question table
  gated-lora         llama.cpp, the target's GGUF with `fold --mode gated-lora --multiplier auto` of the
                     paper form's own vectors as a LoRA GGUF (`llama-server --lora`)

(experiments/eval_table.py runs each row; its cache in OUT is reused and resumed.) At 256 new tokens
the gated-lora row is run the same way, and the other three rows are the recorded 200-question runs
of reports/results/eval_qwen0.5b_to_1.5b.json on the same questions (their correct_indices, read
from that file). Writes reports/results/gated_lora_qwen1.5b.json, which scripts/render_report.py
renders into reports/gsm8k-qwen2.5-coder.md.

  python experiments/gated_lora_table.py [--out out/gated-lora] [--count 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTION = "0.5b-to-1.5b"
CONFIGS = ("unsteered", "folded-answer-key", "paper-form", "gated-lora")
RECORDED = ROOT / "reports" / "results" / "eval_qwen0.5b_to_1.5b.json"
RESULT = ROOT / "reports" / "results" / "gated_lora_qwen1.5b.json"
# the prepared inputs a second eval_table run (256 tokens) shares with the first
PREPARED = ("recipe", "recipe.yaml", "folded.gguf", "gated-lora-adapter", "gated-lora.gguf")


def eval_table(out: Path, count: int, tokens: int, configs: tuple[str, ...], *extra: str) -> dict:
    """experiments/eval_table.py for the one direction and `configs` -> their rows (from its table.json)."""
    subprocess.run([sys.executable, str(ROOT / "experiments" / "eval_table.py"), "--out", str(out), "--count",
                    str(count), "--max-new-tokens", str(tokens), "--only", DIRECTION, "--configs", ",".join(configs),
                    *extra], check=True)
    return json.loads((out / "table.json").read_text())["directions"][DIRECTION]


def share_preparation(first: Path, second: Path) -> None:
    """Link the first run's prepared inputs (recipe run, folds, adapter) into the second's folder."""
    (second / DIRECTION).mkdir(parents=True, exist_ok=True)
    for name in PREPARED:
        link, target = second / DIRECTION / name, first / DIRECTION / name
        if target.exists() and not link.exists():
            link.symlink_to(target.resolve())


def recorded_rows(count: int) -> dict:
    """The 200-question table's runs on questions 0..count-1, as that results file records them."""
    table = json.loads(RECORDED.read_text())["table_200_questions"]["configs"]
    rows = {}
    for name in ("unsteered", "paper-form", "folded-answer-key"):
        run = table[name]
        indices = [i for i in run["correct_indices"] if i < count]
        rows[name] = {"n": count, "correct": len(indices), "accuracy": len(indices) / count,
                      "correct_indices": indices, "engine": run.get("engine"), "max_new_tokens": 256,
                      "source": f"{RECORDED.name} table_200_questions.configs.{name}, questions 0-{count - 1}"}
    return rows


def cached_rows(out: Path, tokens: int, count: int, tables: list[Path]) -> dict:
    """The rows already finished for `tokens` new tokens: each row's own eval folder under OUT, else a
    table.json given with --table (a run's table, kept when its folder was written over)."""
    rows = {}
    for table in tables:
        data = json.loads(table.read_text())
        if data.get("max_new_tokens") == tokens and data.get("count") == count:
            rows.update(data["directions"][DIRECTION]["rows"])
    folder = out / DIRECTION
    for name in CONFIGS:
        summary = folder / name / "summary.json"
        if summary.is_file():
            found = json.loads(summary.read_text())
            if found.get("n") == count and found.get("max_new_tokens") == tokens and name not in rows:
                predictions = [json.loads(line) for line in (folder / name / "predictions.jsonl").read_text().splitlines()]
                rows[name] = {**found, "correct_indices": [r["index"] for r in predictions if r["correct"]]}
    return rows


def gate_fit(out: Path) -> dict:
    for name in ("gated-lora-adapter", "gated-lora"):  # the adapter's folder (named gated-lora before 30942e9)
        info = out / DIRECTION / name / "unlock.json"
        if info.is_file():
            return json.loads(info.read_text())["gate_fit"]
    raise SystemExit(f"no gated-lora adapter under {out / DIRECTION}: run without --assemble first")


def result_record(args, rows512: dict, rows256: dict, fit: dict, answer_scale: float, started: float,
                  extra_note: str = "") -> dict:
    from unlock_export.provenance import run_record
    from unlock_export.recipe.spec import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "zoo-qwen0.5b-to-1.5b-cot.yaml")
    missing = [f"{name} at {tokens} tokens" for tokens, rows in ((512, rows512), (256, rows256))
               for name in (CONFIGS if tokens == 512 else ("gated-lora",)) if name not in rows]
    return {
        "count": args.count, "data": "builtin:gsm8k-dev", "direction": DIRECTION,
        "target": recipe.target.model, "alpha": fit.get("alpha"), "answer_key_scale": answer_scale,
        "answer_key_scale_source": f"{RECORDED.name} answer_key_16.calibration.scale",
        "gate_fit": fit,
        "tokens_512": {"max_new_tokens": 512, "configs": rows512},
        "tokens_256": {"max_new_tokens": 256, "configs": rows256, "recorded": recorded_rows(args.count)},
        "missing": missing,
        "wall_s": round(time.perf_counter() - started, 1),
        "note": ("llama.cpp rows: llama-server --parallel 4 on the zoo Q4_K_M GGUF; paper-form: transformers, "
                 f"the GGUF dequantized to float32. gated-lora: its gates fitted on {fit.get('fit_prompts')} train "
                 "prompts from offset 1000 (the key and the map read 0-63), the multiplier chosen without labels "
                 "on the next 8. folded-answer-key: the answer-start key folded at the label-free scale its "
                 "calibration chose in the 200-question table." + extra_note),
        "provenance": run_record(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gated-lora")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--assemble", action="store_true",
                        help="run nothing: write the results file from the rows finished so far (missing ones listed)")
    parser.add_argument("--table", type=Path, action="append", default=[],
                        help="--assemble: also a table.json a run wrote, for rows whose folder was written over")
    parser.add_argument("--note", default="", help="--assemble: a sentence added to the results file's note")
    args = parser.parse_args()
    started = time.perf_counter()
    recorded = json.loads(RECORDED.read_text())
    answer_scale = recorded["answer_key_16"]["calibration"]["scale"]  # its label-free scale, as recorded
    long, short = args.out / "512", args.out / "256"
    if args.assemble:
        rows512 = cached_rows(long, 512, args.count, args.table)
        rows256 = {k: v for k, v in cached_rows(short, 256, args.count, args.table).items() if k == "gated-lora"}
        result = result_record(args, rows512, rows256, gate_fit(long), answer_scale, started,
                               f" {args.note}" if args.note else "")
    else:
        # cheapest first: the llama.cpp rows, then the paper form's hooks (transformers)
        first = eval_table(long, args.count, 512, ("unsteered", "gated-lora"))
        share_preparation(long, short)
        gated256 = eval_table(short, args.count, 256, ("gated-lora",))
        paper = eval_table(long, args.count, 512, ("paper-form",))
        answer = eval_table(long, args.count, 512, ("folded-answer-key",), "--answer-key-scale", str(answer_scale))
        result = result_record(args, {**first["rows"], **paper["rows"], **answer["rows"]}, gated256["rows"],
                               first["gate_fit"], answer_scale, started)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
