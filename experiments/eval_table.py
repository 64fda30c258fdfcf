"""The GSM8K table: does the transfer help? (`make eval-table`)

For each direction (qwen2.5-coder-0.5b -> 1.5b and 1.5b -> 0.5b, CoT direction by prompt contrast)
the target's accuracy under the direct prompt on the first COUNT questions of the GSM8K dev split:

  unsteered       llama.cpp, the target's zoo GGUF
  cot-prompt      llama.cpp, the CoT template (the prompting baseline)
  paper-form      transformers hooks: prefill-only last-token edit at alpha (the paper's form);
                  `check-alpha` at that alpha is recorded beside it (does the steered model still write text?)
  folded          llama.cpp, the folded GGUF (route a) with the label-free calibrated scale
  folded-answer-key  the same, with the key read over the answer's first --answer-tokens tokens
                  (`key --answer-tokens`, recipe key.answer_tokens) instead of the last prompt token
  self-key        llama.cpp, the target's own CoT key as a control vector, same calibration
  self-answer-key the same, with the target's own key read over the answer's first --answer-tokens tokens
                  (a self key whose calibration picks 0 runs at the largest scale the perplexity guard allows)
  random          llama.cpp, random directions with the folded vectors' norms and scale
  random-answer-key  the same control for folded-answer-key: its vectors' norms and scale
  tuned-answer-key  llama.cpp, the folded-answer-key vectors as a control vector at the scale that
                  dev-set accuracy picks (uses labels, unlike every other row): 0 and TUNE_FACTORS x the
                  label-free scale are each scored on --tune-count dev questions held out from the table
                  (the ones after its first COUNT), in OUT/<direction>/tune-answer-key/; the most accurate wins
                  (when that is the label-free scale, the folded-answer-key run is the row)
  gated-lora      llama.cpp, the target's zoo GGUF with the gated edit as a LoRA (`llama-server --lora`):
                  `fold --mode gated-lora --multiplier auto` of the folded row's vectors (gates fitted on
                  --gate-count train prompts from --gate-offset, the next 8 held out), then `gguf` of the adapter
  scale-S         llama.cpp, the UNLOCK vectors as a control vector at scale S (--sweep-scales):
                  accuracy against scale on the table's own questions (in-sample)

Every configuration writes OUT/<direction>/<config>/{predictions.jsonl,summary.json}; an existing
summary is reused, and a configuration stopped part way (its progress.jsonl) resumes from its last
finished chunk of questions. The table goes to OUT/table.md and table.json (with its provenance:
command, commit, versions, machine, date). Questions: the packaged GSM8K dev split (builtin:gsm8k-dev).

  python experiments/eval_table.py [--out DIR] [--count 200] [--max-new-tokens 256] [--only DIRECTION]
                               [--configs unsteered,folded,...] [--calibrate-count 8]
                               [--sweep-scales 0.0442,0.125,0.177] [--answer-tokens 16] [--tune-count 64]
                               [--tune-factors 0.5,0.7071,1,1.4142,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEV = "builtin:gsm8k-dev"  # the GSM8K dev split, shipped inside the package
DIRECTIONS = {
    "0.5b-to-1.5b": ROOT / "recipes" / "zoo-qwen0.5b-to-1.5b-cot.yaml",
    "1.5b-to-0.5b": ROOT / "recipes" / "zoo-qwen1.5b-to-0.5b-cot.yaml",
}
CONFIGS = ("unsteered", "cot-prompt", "paper-form", "folded", "folded-answer-key", "self-key", "self-answer-key",
           "random", "random-answer-key", "tuned-answer-key", "gated-lora")
ANSWER_ROWS = {"folded-answer-key", "random-answer-key", "self-answer-key", "tuned-answer-key"}
# rows that steer the target's own GGUF with a control vector: (prep key of the vectors, prep key of the scale)
CONTROL_VECTOR_ROWS = {"self-key": ("self_key", "self_scale"), "self-answer-key": ("self_answer_key", "self_answer_scale"),
                       "random": ("random", "scale"), "random-answer-key": ("answer_random", "answer_scale"),
                       "tuned-answer-key": ("answer_vectors", "tuned_answer_scale")}
# sweep rows 'PREFIX-S': (prep key of the vectors) at scale S
SWEEP_ROWS = {"scale-": "vectors", "answer-scale-": "answer_vectors"}
# multiples of the answer key's label-free scale that tuned-answer-key tries (sqrt(2) steps), besides 0
TUNE_FACTORS = (0.5, 0.7071, 1.0, 1.4142, 2.0)


def cli(*args: str) -> None:
    from unlock_export.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"unlock-export {' '.join(map(str, args[:3]))} ... failed with exit code {code}")


def steerable(vectors):
    """llama.cpp never steers layer 0: every configuration here leaves it out, folded included."""
    return vectors.select([layer for layer in vectors.layers if layer != 0])


def random_like(vectors, path: Path) -> Path:
    """Random directions (seed 0) with the per-layer norms of `vectors`, saved at `path` once."""
    from unlock_export.method.vectors import SteeringVectors

    if not path.exists():
        g = torch.Generator().manual_seed(0)
        rand = {}
        for layer, vec in vectors.directions.items():
            r = torch.randn(vec.shape[0], generator=g)
            rand[layer] = r / r.norm() * vec.norm()
        SteeringVectors(rand, vectors.layer_count, vectors.hidden_size, model_hint=vectors.model_hint,
                        provenance={"kind": "random, same norms as the UNLOCK vectors"}).save(path)
    return path


def own_scale(calibration: dict) -> float:
    """The scale a self-key row runs at: the label-free one; where no scale brings the additive form
    closer to the paper form than unsteered (scale 0), the largest that the perplexity guard allows,
    so the row still says what the target's own direction does."""
    if calibration["scale"] > 0:
        return calibration["scale"]
    return max((row["scale"] for row in calibration["table"] if row["allowed"]), default=0.0)


def gated_lora(target: str, vectors: Path, work: Path, alpha: float, gate_count: int, gate_offset: int) -> dict:
    """`fold --mode gated-lora --multiplier auto` of `vectors` into work/gated-lora-adapter (not the row's
    own eval folder, work/gated-lora), and its LoRA GGUF."""
    adapter, gguf = work / "gated-lora-adapter", work / "gated-lora.gguf"
    if not (adapter / "unlock.json").exists():
        cli("--quiet", "fold", target, "--vectors", vectors, "--mode", "gated-lora", "--multiplier", "auto",
            "--alpha", alpha, "--gate-count", gate_count, "--gate-offset", gate_offset, "-o", adapter, "--overwrite")
    if not gguf.exists():
        cli("--quiet", "gguf", adapter, "-o", gguf)
    return {"gated_adapter": adapter, "gated_gguf": gguf,
            "gate_fit": json.loads((adapter / "unlock.json").read_text())["gate_fit"]}


def answer_key_at(recipe, run_dir: Path, work: Path, answer_tokens: int, scale: float) -> tuple[Path, Path]:
    """The key read over the answer's first `answer_tokens` tokens (`key --answer-tokens`), projected
    with the recipe run's own map and folded at a given `scale` (no calibration run): the label-free
    scale an earlier calibration of the same inputs chose -> (its vectors, its folded GGUF)."""
    folder = work / f"answer-key-{answer_tokens}-at-{scale:g}"
    folder.mkdir(parents=True, exist_ok=True)
    key, vectors, gguf = folder / "key.safetensors", folder / "vectors.safetensors", folder / "folded.gguf"
    if not key.exists():
        cli("--quiet", "key", "--locked", recipe.source.locked.model, "--unlocked", recipe.source.unlocked.model,
            "--locked-template", recipe.source.locked.template, "--unlocked-template", recipe.source.unlocked.template,
            "--prompts", recipe.prompts.path, "--count", recipe.prompts.key_count, "--offset", recipe.prompts.offset,
            "--method", recipe.key.method,
            "--answer-tokens", answer_tokens, "-o", key)
    if not vectors.exists():
        cli("--quiet", "project", "--key", key, "--map", run_dir / "map.safetensors", "--layers", "1--1", "-o", vectors)
    if not (folder / "model" / "unlock.json").exists():
        cli("--quiet", "fold", recipe.target.model, "--vectors", vectors, "--scale", scale, "-o", folder / "model",
            "--overwrite")
    if not gguf.exists():
        cli("--quiet", "gguf", folder / "model", "-o", gguf)
    return vectors, gguf


def prepare(direction: str, recipe_path: Path, out: Path, alpha: float, calibrate_count: int = 8,
            self_key: bool = True, answer_tokens: int = 0, answer_scale: float | None = None) -> dict:
    """Recipe (key, map, vectors, calibration, fold) -> folded GGUF, self-key and random vectors; with
    answer_tokens, also the fold of the key read over the answer's first tokens (at `answer_scale`
    when given, else at the scale its own calibrated recipe run picks)."""
    import yaml

    from unlock_export.evaluation.calibrate import search_scale
    from unlock_export.method.vectors import SteeringVectors
    from unlock_export.models.loading import resolve
    from unlock_export.prompts import apply_template, load_questions
    from unlock_export.recipe.spec import load_recipe

    work = out / direction
    work.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(recipe_path)
    target = recipe.target.model

    def folded_recipe(name: str, answer_tokens: int = 0) -> tuple[Path, Path]:
        """The recipe with layers 1.., a label-free bias fold and its key read at answer_tokens
        (0: the last prompt token, as the recipe ships) -> (run folder, folded GGUF)."""
        run_dir = work / name
        if not (run_dir / "summary.json").exists():
            data = yaml.safe_load(recipe_path.read_text())
            data["prompts"]["path"] = str(recipe.prompts.path)
            data["vectors"]["layers"] = "1--1"
            data["fold"] = {"mode": "bias", "scale": "auto", "alpha": alpha, "verify": True,
                            "calibrate_count": calibrate_count}
            if answer_tokens:
                data["key"] = {**data.get("key", {}), "answer_tokens": answer_tokens}
                data["diagnostics"] = {"enabled": False}
            tmp_recipe = work / f"{name}.yaml"
            tmp_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
            cli("--quiet", "run", "--overwrite", tmp_recipe, run_dir)
        gguf = work / ("folded.gguf" if name == "recipe" else f"folded-{name}.gguf")
        if not gguf.exists():
            cli("--quiet", "gguf", run_dir / "model", "-o", gguf)
        return run_dir, gguf

    run_dir, folded_gguf = folded_recipe("recipe")
    calibration = json.loads((run_dir / "calibration.json").read_text())
    scale = calibration["scale"]
    answer = {}
    if answer_tokens and answer_scale:
        answer["vectors"], answer["gguf"] = answer_key_at(recipe, run_dir, work, answer_tokens, answer_scale)
        answer["scale"] = answer_scale
        answer["random"] = random_like(steerable(SteeringVectors.load(answer["vectors"])),
                                       work / f"random-answer-key-{answer_tokens}.safetensors")
    elif answer_tokens:
        answer_dir, answer["gguf"] = folded_recipe(f"answer-key-{answer_tokens}", answer_tokens)
        answer["vectors"] = answer_dir / "vectors.safetensors"
        answer["scale"] = json.loads((answer_dir / "calibration.json").read_text())["scale"]
        answer["random"] = random_like(steerable(SteeringVectors.load(answer_dir / "vectors.safetensors")),
                                       work / f"random-answer-key-{answer_tokens}.safetensors")
    vectors = steerable(SteeringVectors.load(run_dir / "vectors.safetensors"))

    pool = None  # one load of the target serves both self keys
    questions = load_questions(recipe.prompts.path, recipe.prompts.field, recipe.prompts.key_count,
                               recipe.prompts.offset)

    def own_key(name: str, answer_tokens: int = 0) -> tuple[Path, float]:
        """The target's own CoT key (the recipe's key stage with the target as its source: `key` then
        `project --self`), read at answer_tokens, and its label-free scale -> (vectors, scale)."""
        nonlocal pool
        path, cal_path = work / f"{name}.safetensors", work / f"{name}-calibration.json"
        if not path.exists() or not cal_path.exists():
            from unlock_export.method.pipeline import compute_key, self_vectors
            from unlock_export.models.pool import ModelPool
            from unlock_export.models.runtime import RuntimeOptions

            pool = pool or ModelPool(RuntimeOptions(dtype="float32", device="cpu"), progress=False)
            key, _ = compute_key(pool, target, target, "direct", "cot", questions, recipe.key.method,
                                 answer_tokens=answer_tokens)
            own = self_vectors(key, vectors.layers)
            own.save(path)
            calib_q = questions[:calibrate_count]
            cal = search_scale(pool.get(target), own, apply_template("direct", calib_q),
                                  apply_template("plain", calib_q), "paper", alpha).as_dict()
            cal_path.write_text(json.dumps(cal, indent=2))
        return path, own_scale(json.loads(cal_path.read_text()))

    try:
        self_path, self_scale = own_key("self-key") if self_key else (None, None)
        own_answer = own_key(f"self-answer-key-{answer_tokens}", answer_tokens) if self_key and answer_tokens else (None, None)
    finally:
        if pool is not None:
            pool.release()
    source = resolve(target)
    return {"target": target, "target_gguf": Path(source.path) / source.gguf_file, "folded_gguf": folded_gguf,
            "vectors": run_dir / "vectors.safetensors", "scale": scale, "alpha": alpha,
            "self_key": self_path, "self_scale": self_scale,
            "self_answer_key": own_answer[0], "self_answer_scale": own_answer[1],
            "random": random_like(vectors, work / "random.safetensors"), "calibration": calibration, "prompts": recipe.prompts.path,
            "answer_gguf": answer.get("gguf"), "answer_scale": answer.get("scale"), "answer_random": answer.get("random"),
            "answer_vectors": answer.get("vectors")}


def alpha_check(prep: dict, out: Path, count: int = 8) -> dict:
    """`check-alpha` at the paper form's alpha: does the paper-form row still write text?"""
    path = out / "alpha-check.json"
    if not path.exists():
        cli("--quiet", "check-alpha", prep["target"], "--vectors", prep["vectors"], "--alphas", prep["alpha"],
            "--prompts", prep["prompts"], "--count", count, "--dtype", "float32", "-o", path)
    row = json.loads(path.read_text())["table"][0]
    return {"alpha": row["alpha"], "fluency_ratio": round(row["fluency_ratio"], 3), "allowed": row["allowed"]}


def interrupted(run_dir: Path, count: int) -> bool:
    """Did an earlier run of this configuration over `count` questions stop part way?"""
    from unlock_export.evaluation.run import PROGRESS

    progress = run_dir / PROGRESS
    if not progress.is_file():
        return False
    try:
        return json.loads(progress.read_text().splitlines()[0]).get("n") == count
    except (IndexError, ValueError):
        return False


def control_vector(name: str, prep: dict) -> tuple[Path, float] | None:
    """(vectors, scale) of a row that steers the target's GGUF with a control vector; None for other rows."""
    if name in CONTROL_VECTOR_ROWS:
        vectors, scale = CONTROL_VECTOR_ROWS[name]
        return prep[vectors], prep[scale]
    for prefix, vectors in SWEEP_ROWS.items():
        if name.startswith(prefix):
            return prep[vectors], float(name.removeprefix(prefix))
    return None


def same_run(name: str, prep: dict) -> str:
    """The configuration whose run answers row `name`: tuned-answer-key at the label-free scale is the
    folded-answer-key model itself (same vectors, same scale), so that row's run serves it."""
    if name == "tuned-answer-key" and prep.get("tuned_answer_scale") == prep.get("answer_scale"):
        return "folded-answer-key"
    return name


def with_indices(summary: dict, run_dir: Path) -> dict:
    """The summary and the dev indices of the questions the run got right (for paired comparisons),
    where the run's predictions.jsonl is there."""
    from unlock_export.evaluation.run import read_predictions

    if not (run_dir / "predictions.jsonl").is_file():
        return summary
    return {**summary, "correct_indices": [r["index"] for r in read_predictions(run_dir) if r["correct"]]}


def run_config(name: str, prep: dict, out: Path, count: int, max_new_tokens: int, offset: int = 0) -> dict:
    """Row `name` over `count` dev questions from `offset` -> its summary and correct_indices (reused when
    already finished)."""
    summary_path = out / name / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if (summary["n"] == count and summary["max_new_tokens"] == max_new_tokens
                and summary.get("offset", 0) == offset):
            return with_indices(summary, out / name)  # finished earlier with the same settings
    common = ["--data", DEV, "--count", count, "--max-new-tokens", max_new_tokens, "-o", out / name, "--overwrite"]
    if offset:
        common += ["--offset", offset]
    if interrupted(out / name, count):
        common.append("--resume")  # keep its finished chunks of questions
    if name != "unsteered" and (out / "unsteered" / "summary.json").exists():
        common += ["--baseline", out / "unsteered"]  # paired comparison: won, lost, McNemar p
    cpp = ["--engine", "llamacpp", "--parallel", "4"]
    steering = control_vector(name, prep)
    if steering is not None:
        vectors, scale = steering
        cli("--quiet", "eval", prep["target_gguf"], *cpp, "--vectors", vectors, "--form", "additive",
            "--scale", scale, *common)
    elif name == "unsteered":
        cli("--quiet", "eval", prep["target_gguf"], *cpp, *common)
    elif name == "cot-prompt":
        cli("--quiet", "eval", prep["target_gguf"], *cpp, "--template", "cot", *common)
    elif name == "paper-form":
        cli("--quiet", "eval", prep["target"], "--vectors", prep["vectors"], "--form", "paper",
            "--alpha", prep["alpha"], "--dtype", "float32", "--batch-size", "8", *common)
    elif name == "folded":
        cli("--quiet", "eval", prep["folded_gguf"], *cpp, *common)
    elif name == "folded-answer-key":
        cli("--quiet", "eval", prep["answer_gguf"], *cpp, *common)
    elif name == "gated-lora":
        cli("--quiet", "eval", prep["target_gguf"], *cpp, "--lora", prep["gated_gguf"], *common)
    return with_indices(json.loads(summary_path.read_text()), out / name)


def pick_by_accuracy(points: list[dict], label_free_scale: float, png: Path, title: str) -> dict:
    """The most accurate of `points` ({scale, accuracy, ci95}; the smaller scale on a tie): the scale
    dev-set accuracy picks (it reads labels, unlike the calibration), with `png` plotting them all."""
    best = max(points, key=lambda p: (p["accuracy"], -p["scale"]))
    from unlock_export.evaluation.diagnostics import plot_accuracy_vs_scale, plots_available

    if plots_available():
        plot_accuracy_vs_scale(points, png, title)
    return {"scale": best["scale"], "accuracy": best["accuracy"], "label_free_scale": label_free_scale,
            "points": sorted(({"scale": p["scale"], "accuracy": p["accuracy"], "ci95": p["ci95"]} for p in points),
                             key=lambda p: p["scale"])}


def accuracy_vs_scale(rows: dict, label_free_scale: float, out: Path) -> dict:
    """Accuracy against the additive scale on the table's own questions (0 = unsteered, the folded
    scale, the --sweep-scales rows) and accuracy_vs_scale.png."""
    points = [{"scale": float(name.removeprefix("scale-")), **rows[name]} for name in rows if name.startswith("scale-")]
    if "unsteered" in rows:
        points.append({"scale": 0.0, **rows["unsteered"]})
    if "folded" in rows:
        points.append({"scale": label_free_scale, **rows["folded"]})
    return pick_by_accuracy(points, label_free_scale, out / "accuracy_vs_scale.png",
                            "accuracy vs additive scale (folded = label-free)")


def tune_answer_scale(prep: dict, out: Path, count: int, tune_count: int, max_new_tokens: int,
                      factors: tuple[float, ...] = TUNE_FACTORS) -> dict:
    """The answer key's scale that dev-set accuracy picks: 0 (unsteered) and `factors` x its label-free
    scale, each scored on the `tune_count` dev questions after the table's first `count` (held out: the
    table's own questions never choose the scale), rows in OUT/tune-answer-key/."""
    tune_dir = out / "tune-answer-key"
    label_free = prep["answer_scale"]
    points = [{"scale": 0.0, **run_config("unsteered", prep, tune_dir, tune_count, max_new_tokens, offset=count)}]
    for factor in factors:
        scale = round(label_free * factor, 4)
        summary = run_config(f"answer-scale-{scale:g}", prep, tune_dir, tune_count, max_new_tokens, offset=count)
        points.append({"scale": scale, **summary})
    picked = pick_by_accuracy(points, label_free, tune_dir / "accuracy_vs_scale.png",
                              f"answer-start key: accuracy vs scale, dev questions {count}-{count + tune_count - 1}")
    return {**picked, "questions": [count, count + tune_count]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "eval-table")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--only", choices=sorted(DIRECTIONS), default=None)
    parser.add_argument("--calibrate-count", type=int, default=8,
                        help="unlabeled prompts for the label-free scale (the README tables used 8)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="answer tokens the folded-answer-key row's key is read over")
    parser.add_argument("--answer-key-scale", type=float, default=None,
                        help="fold the answer-start key at this scale (an earlier label-free calibration's) instead "
                             "of running its calibrated recipe")
    parser.add_argument("--gate-count", type=int, default=32, help="gated-lora: train prompts the gates are fitted on")
    parser.add_argument("--gate-offset", type=int, default=1000,
                        help="gated-lora: where those prompts start (after the key's and the map's)")
    parser.add_argument("--sweep-scales", default="",
                        help="comma list of extra additive scales (control vector): accuracy against scale")
    parser.add_argument("--tune-count", type=int, default=64,
                        help="held-out dev questions (after the table's) on which tuned-answer-key picks its scale")
    parser.add_argument("--tune-factors", default=",".join(f"{f:g}" for f in TUNE_FACTORS),
                        help="multiples of the answer key's label-free scale that tuned-answer-key tries, besides 0")
    args = parser.parse_args()
    wanted = [c for c in args.configs.split(",") if c]
    unknown = set(wanted) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    try:
        sweep = [float(s) for s in args.sweep_scales.split(",") if s]
    except ValueError:
        raise SystemExit(f"--sweep-scales takes numbers separated by commas, not {args.sweep_scales!r}") from None
    try:
        factors = tuple(float(f) for f in args.tune_factors.split(",") if f)
    except ValueError:
        raise SystemExit(f"--tune-factors takes numbers separated by commas, not {args.tune_factors!r}") from None
    if not factors or min(factors) <= 0:
        raise SystemExit(f"--tune-factors takes positive multiples of the label-free scale, not {args.tune_factors!r}")
    wanted += [f"scale-{s:g}" for s in sweep]
    from unlock_export.evaluation.run import load_items

    available = len(load_items(DEV))
    if "tuned-answer-key" in wanted and (args.tune_count < 1 or args.count + args.tune_count > available):
        raise SystemExit(f"tuned-answer-key picks its scale on --tune-count questions after the table's {args.count}, "
                         f"and {DEV} holds {available}: lower --count or --tune-count")
    started = time.perf_counter()
    table = {}
    for direction, recipe_path in DIRECTIONS.items():
        if args.only and direction != args.only:
            continue
        t0 = time.perf_counter()
        prep = prepare(direction, recipe_path, args.out, args.alpha, args.calibrate_count,
                       bool({"self-key", "self-answer-key"} & set(wanted)),
                       args.answer_tokens if ANSWER_ROWS & set(wanted) else 0, args.answer_key_scale)
        if "gated-lora" in wanted:
            prep.update(gated_lora(prep["target"], prep["vectors"], args.out / direction, args.alpha,
                                   args.gate_count, args.gate_offset))
        tuned = None
        if "tuned-answer-key" in wanted:
            tuned = tune_answer_scale(prep, args.out / direction, args.count, args.tune_count, args.max_new_tokens,
                                      factors)
            prep["tuned_answer_scale"] = tuned["scale"]
        rows = {}
        for name in wanted:
            c0 = time.perf_counter()
            rows[name] = run_config(same_run(name, prep), prep, args.out / direction, args.count, args.max_new_tokens)
            print(f"{direction} {name}: {rows[name]['accuracy']:.1%} ({time.perf_counter() - c0:.0f} s)", flush=True)
        table[direction] = {"target": prep["target"], "scale": prep["scale"], "self_scale": prep["self_scale"],
                            "self_answer_key_scale": prep["self_answer_scale"],
                            "answer_key_scale": prep["answer_scale"],
                            "alpha": args.alpha, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
        if tuned:
            table[direction]["tuned_answer_key"] = tuned
        if "gate_fit" in prep:
            table[direction]["gate_fit"] = prep["gate_fit"]
        if "paper-form" in wanted:
            table[direction]["alpha_check"] = alpha_check(prep, args.out / direction)
        if sweep:
            table[direction]["by_accuracy"] = accuracy_vs_scale(rows, prep["scale"], args.out / direction)
    from unlock_export.provenance import run_record

    result = {"count": args.count, "max_new_tokens": args.max_new_tokens, "data": DEV,
              "wall_s": round(time.perf_counter() - started, 1), "directions": table, "provenance": run_record()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(result, indent=2))
    lines = ["| direction | configuration | accuracy | 95% CI | mean output tokens | answers cut | states the answer "
             "| vs unsteered: won / lost, McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for direction, d in table.items():
        for name, s in d["rows"].items():
            paired = s.get("paired")
            versus = f"{paired['won']} / {paired['lost']}, p = {paired['p_mcnemar_exact']:.2g}" if paired else "-"
            lines.append(f"| {direction} | {name} | {s['accuracy']:.1%} | {s['ci95'][0]:.1%}-{s['ci95'][1]:.1%} | "
                         f"{s['mean_output_tokens']:.0f} | {s.get('cut_rate', float('nan')):.0%} | "
                         f"{s.get('states_answer_rate', float('nan')):.0%} | {versus} |")
    for direction, d in table.items():
        if "alpha_check" in d:
            a = d["alpha_check"]
            lines.append(f"\n{direction}: check-alpha at {a['alpha']:g}: the paper form's continuations score "
                         f"x{a['fluency_ratio']:.2f} the unsteered perplexity "
                         f"({'passes' if a['allowed'] else 'FAILS: its text is broken'})")
        if "tuned_answer_key" in d:
            t = d["tuned_answer_key"]
            lines.append(f"\n{direction}: on dev questions {t['questions'][0]}-{t['questions'][1] - 1} (held out from the "
                         f"table; uses labels) accuracy picks the answer key's scale {t['scale']:g} "
                         f"({t['accuracy']:.1%}); the label-free calibration picked {t['label_free_scale']:g}; by scale: "
                         + ", ".join(f"{p['scale']:g} {p['accuracy']:.1%}" for p in t["points"]))
        if "by_accuracy" in d:
            b = d["by_accuracy"]
            lines.append(f"\n{direction}: dev-set accuracy (uses labels) picks scale {b['scale']:g} "
                         f"({b['accuracy']:.1%}); the label-free calibration picked {b['label_free_scale']:g}")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall time {result['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
