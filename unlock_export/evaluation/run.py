"""Does the transfer help? Greedy accuracy on a math set (GSM8K numbers, MATH LaTeX), for a model as it
is, under the reference steering hooks (paper or additive form), served by llama.cpp (a folded GGUF or
a control vector) or by vLLM (a folded checkpoint). The engines are plug-ins: evaluation/engines/.

Each run writes predictions.jsonl (one line per question) and summary.json; finished chunks are
kept in progress.jsonl until then, so an interrupted run (Ctrl-C, SIGTERM, a lost server) resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

from .._io import atomic_write_text
from ..choices import EVAL_FORMS
from ..errors import UserError
from ..settings import setting
from .answers import shows_steps, states_answer
from .engines import STOP, EngineLost, check_request, parse_lora
from .questions import Item, load_items, render_prompts
from .tasks import task_for

__all__ = ["STOP", "EngineLost", "Item", "load_items", "render_prompts", "parse_lora"]


def _cut(text: str) -> str:
    for stop in STOP:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# -- the evaluation -----------------------------------------------------------------------------

PROGRESS = "progress.jsonl"
CHUNK = 16  # questions per checkpoint; fixed chunks make a resumed run identical to an uninterrupted one


def _fingerprint(texts: list[str], label: dict | None, max_new_tokens: int, prefixes: tuple[int, ...] = ()) -> str:
    settings = [label or {}, max_new_tokens] + ([list(prefixes)] if prefixes else [])
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def _read_progress(path: Path, fingerprint: str) -> tuple[dict[int, tuple], float | None]:
    """Finished chunks of an interrupted run with the same prompts and settings: ({position: (output, tokens[,
    prefix texts])}, the seconds they took to generate, None where a chunk did not record it)."""
    done: dict[int, tuple] = {}
    seconds: float | None = 0.0
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
        raise UserError(f"'{path}' belongs to a run with other prompts or settings: rerun with the same "
                        "arguments, or pass --overwrite to start again")
    for line in lines[1:]:
        try:
            chunk = json.loads(line)
        except json.JSONDecodeError:
            break  # a chunk cut off mid-write: redo it
        for pos, *result in chunk["rows"]:
            done[pos] = tuple(result)
        seconds = None if seconds is None or "seconds" not in chunk else seconds + chunk["seconds"]
    return done, seconds


def read_predictions(run_dir: str | Path) -> list[dict]:
    """The per-question rows of an earlier `eval` run (its OUTPUT folder)."""
    path = Path(run_dir) / "predictions.jsonl"
    if not path.is_file():
        raise UserError(f"'{run_dir}' holds no predictions.jsonl: pass the output folder of a finished `eval` run")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not JSON lines: rerun that `eval` to rewrite it") from None


def _by_index(indices: list[int], baseline: list[dict]) -> dict[int, dict]:
    theirs = {r["index"]: r for r in baseline}
    missing = [i for i in indices if i not in theirs]
    if missing:
        raise UserError(f"the baseline run lacks {len(missing)} of these questions (first: index {missing[0]}): "
                        "compare runs over the same --data, --offset and --count")
    return theirs


def read_baseline(run_dir: str | Path, items: list[Item]) -> list[dict]:
    """An earlier run's rows, checked to cover every question of `items` (before anything runs)."""
    rows = read_predictions(run_dir)
    _by_index([item.index for item in items], rows)
    return rows


def mcnemar_exact(won: int, lost: int) -> float:
    """The exact two-sided McNemar p-value: a binomial test of `won` against `lost` at 1/2."""
    n = won + lost
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1))
    return min(1.0, 2 * tail / 2 ** n) if n else 1.0


def paired_comparison(rows: list[dict], baseline: list[dict]) -> dict:
    """Paired comparison on the same questions: how many this run gets right that the baseline got
    wrong (won) and the reverse (lost), with the exact two-sided McNemar p-value (a binomial test of
    won against lost at 1/2; the questions both or neither get right carry no information)."""
    theirs = _by_index([r["index"] for r in rows], baseline)
    won = sum(r["correct"] and not theirs[r["index"]]["correct"] for r in rows)
    lost = sum(theirs[r["index"]]["correct"] and not r["correct"] for r in rows)
    return {"n": len(rows), "won": won, "lost": lost, "p_mcnemar_exact": mcnemar_exact(won, lost),
            "baseline_accuracy": sum(theirs[r["index"]]["correct"] for r in rows) / len(rows)}


def score_row(task, item: Item, output: str, n_tokens: int, max_new_tokens: int) -> dict:
    """One question's row of predictions.jsonl: the output cut at the stop strings, scored by `task`
    (evaluation.tasks; None: gsm8k)."""
    output = _cut(output)
    predicted, correct = (task or task_for("")).score(output, item.gold)
    return {"index": item.index, "question": item.question, "gold": str(item.gold), **item.groups,
            "predicted": predicted, "correct": correct, "output_tokens": n_tokens, "cut": n_tokens >= max_new_tokens,
            "shows_steps": shows_steps(output), "states_answer": states_answer(output), "output": output}


def summarize(rows: list[dict], max_new_tokens: int, group_fields: tuple[str, ...] = ("level", "subject")) -> dict:
    """Accuracy with its 95% Wilson interval, mean output length, the rates of steps shown, answers
    stated and answers cut, and accuracy by each group field the rows carry (MATH: level, subject)."""
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson(correct, n)
    summary = {"n": n, "correct": correct, "accuracy": correct / n, "ci95": [round(low, 4), round(high, 4)],
               "ci_method": "wilson", "mean_output_tokens": sum(r["output_tokens"] for r in rows) / n,
               "steps_rate": sum(r["shows_steps"] for r in rows) / n,
               "states_answer_rate": sum(r["states_answer"] for r in rows) / n,
               "cut_rate": sum(r["cut"] for r in rows) / n, "max_new_tokens": max_new_tokens}
    groups = {}
    for field in group_fields:
        values = sorted({str(r[field]) for r in rows if field in r})
        if values:
            groups[field] = {v: {"n": sum(str(r.get(field)) == v for r in rows),
                                 "correct": sum(r["correct"] for r in rows if str(r.get(field)) == v)} for v in values}
    if groups:
        summary["by_group"] = groups
    return summary


def generate_and_score(items: list[Item], texts: list[str], engine, max_new_tokens: int, out_dir: Path,
             label: dict | None = None, progress: bool = True, resume: bool = False,
             baseline: list[dict] | None = None, task=None, prefixes: tuple[int, ...] = ()) -> dict:
    """Generate for every prompt, score, and write predictions.jsonl and summary.json atomically.

    Finished chunks of CHUNK questions are appended to OUT/progress.jsonl as they complete; with
    `resume`, an interrupted run (crash, Ctrl-C) continues from there with identical results.
    With `baseline` (the rows of an earlier run on the same questions) the summary also holds the
    paired comparison against it. `task` (evaluation.tasks) scores the answers (None: gsm8k). `prefixes`:
    smaller budgets whose answers the rows keep too (prefix_outputs: the text of an answer's first N
    tokens, for each N it ran past), where the engine gives them (evaluation.compare scores them)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefixes = tuple(sorted(b for b in prefixes if b < max_new_tokens)) if getattr(engine, "gives_prefixes", False) \
        else ()
    fingerprint = _fingerprint(texts, label, max_new_tokens, prefixes)
    progress_path = out_dir / PROGRESS
    done, generation = _read_progress(progress_path, fingerprint) if resume and progress_path.exists() else ({}, 0.0)
    if not done:
        atomic_write_text(progress_path, json.dumps({"fingerprint": fingerprint, "n": len(texts)}) + "\n")
    resumed = len(done)
    bar = tqdm(total=len(texts), initial=resumed, desc="eval", unit="q", disable=not progress)
    start = time.perf_counter()
    with open(progress_path, "a", encoding="utf-8") as log:
        for first in range(0, len(texts), CHUNK):
            positions = [i for i in range(first, min(first + CHUNK, len(texts)))]
            if all(i in done for i in positions):
                continue
            began = time.perf_counter()
            try:
                asked = {"prefixes": prefixes} if prefixes else {}
                results = engine.generate([texts[i] for i in positions], max_new_tokens, progress=bar.update, **asked)
            except EngineLost as exc:
                chunks = -(-len(texts) // CHUNK)
                kept = (f"questions 1-{first} (chunks 1-{first // CHUNK} of {chunks}) finished" if first
                        else f"no chunk of {chunks} had finished")
                raise EngineLost(f"{exc} during questions {first + 1}-{positions[-1] + 1} of {len(texts)}; {kept}, "
                                 f"kept in '{progress_path}': rerun with --resume to continue on a new server") from None
            for i, result in zip(positions, results):
                done[i] = tuple(result)
            seconds = round(time.perf_counter() - began, 2)
            generation = None if generation is None else generation + seconds
            log.write(json.dumps({"rows": [[i, *done[i]] for i in positions], "seconds": seconds}) + "\n")
            log.flush()
            os.fsync(log.fileno())
    wall = time.perf_counter() - start
    bar.close()
    outputs = [done[i] for i in range(len(texts))]
    rows = [score_row(task, item, output[0], output[1], max_new_tokens) for item, output in zip(items, outputs)]
    for row, output in zip(rows, outputs):
        if prefixes:
            row["prefix_outputs"] = output[2]
    # wall_s: this run's; generation_s: every chunk's generation, across the runs that answered (None where a
    # resumed chunk was written before chunks recorded their time)
    summary = {**(label or {}), **summarize(rows, max_new_tokens), "wall_s": round(wall, 1), "resumed_from": resumed,
               "generation_s": None if generation is None else round(generation, 1),
               "output_tokens_per_s": round(sum(r["output_tokens"] for r in rows) / wall, 2)
               if wall and not resumed else None}
    if baseline is not None:
        summary["paired"] = paired_comparison(rows, baseline)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    progress_path.unlink(missing_ok=True)
    return summary




# -- the library's eval: a request, the engine it names, a typed summary --------------------------

@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What to evaluate: the questions, the prompt, the engine, the steering strength and the budget. Its
    fields are `eval`'s flags (generated from them, with their one default and help)."""

    data: str = setting("builtin:gsm8k-dev",
        "builtin:gsm8k-dev, builtin:gsm8k-confirm, builtin:math500, builtin:agieval-math (packaged), or a JSONL "
        "file (plain or .gz) with question and answer (GSM8K '#### N', or a plain number).")
    count: int | None = setting(None, "Evaluate the first N questions (after --offset).")
    offset: int = setting(0, "Skip this many lines first.")
    where: str | None = setting(None,
        "FIELD=V1,V2: only the questions whose FIELD is one of these values (such as level=1,2 on MATH-500); "
        "--count counts those kept.")
    template: str | None = setting(None,
        "direct, cot, math, math-cot, plain, or a format string with {question}. Default: the task's (direct for "
        "gsm8k, math for math).")
    task: str | None = setting(None,
        "How answers are read and scored: gsm8k (numbers) or math (LaTeX, by math-verify; fields problem and "
        "answer). Default: the data set's own (math for builtin:math500 and builtin:agieval-math), else gsm8k.")
    chat: bool = setting(False, "Wrap the templated prompt in the model's chat template.")
    engine: str = "transformers"  # its flag's choices and help come from the engine registry
    form: str = setting("paper",
        "paper: prefill-only last-token norm-preserving edit at --alpha; additive: h += scale * v everywhere, at "
        "--scale; gated-lora: the gated edit `fold --mode gated-lora` writes, as hooks (its gates fitted here, "
        "float32).")
    scale: float = setting(1.0, "The additive form's strength.")
    alpha: float = setting(0.1, "The paper form's strength (gated-lora: the strength it reproduces).")
    gate: "object | None" = None  # gated-lora form: its method.gate.GateSettings (default settings when None)
    lora: str | None = setting(None,
        "Run with a plain LoRA, PATH or PATH:SCALE: a PEFT folder (`fold --mode gated-lora`) for transformers "
        "and vllm, a PEFT folder or LoRA GGUF for llamacpp (the scale sent per request; vllm: 1 only).")
    layers: str | list[int] | None = setting(None,
        "Steer only these layers of --vectors (all, A-B, 1,4,7), as `fold --layers` would.")
    control_vector: str | None = setting(None, "llamacpp: a control-vector GGUF from `cvec`.")
    llama_server: str | None = setting(None, "llamacpp: the llama-server binary.")
    parallel: int = setting(4, "llamacpp, vllm: requests in flight.")
    vllm: str | None = setting(None,
        "vllm: the `vllm` executable, or the Python of its environment (default: $UNLOCK_VLLM, the engines cache, "
        "then PATH).")
    tensor_parallel_size: int = setting(1, "vllm: GPUs per model copy.")
    data_parallel_size: int = setting(1, "vllm: model copies.")
    gpu_memory_utilization: float | None = setting(None,
        "vllm: fraction of each GPU's memory vLLM may take (vLLM's default when unset).")
    max_new_tokens: int = setting(256, "Greedy tokens per answer.")
    overwrite: bool = setting(False, "Replace results in an existing folder.")
    resume: bool = setting(False, "Continue an interrupted run in OUTPUT (same arguments) where it stopped.")
    baseline: str | None = setting(None,
        "OUTPUT folder of an earlier eval on the same questions (the unsteered run, say): the summary adds "
        "questions won and lost against it and the exact McNemar p-value.")
    prefixes: tuple[int, ...] = ()  # smaller budgets whose answer prefixes the rows keep, where the engine can

    @property
    def strength(self) -> float:
        return self.alpha if self.form == "paper" else self.scale


@dataclasses.dataclass(frozen=True)
class EvalSummary:
    """The figures of an eval run; `as_dict()` is its summary.json."""

    accuracy: float
    correct: int
    n: int
    ci95: tuple[float, float]
    mean_output_tokens: float
    cut_rate: float
    steps_rate: float
    states_answer_rate: float
    out: Path
    paired: dict | None
    details: dict

    @classmethod
    def from_summary(cls, summary: dict, out: Path) -> "EvalSummary":
        return cls(summary["accuracy"], summary["correct"], summary["n"], tuple(summary["ci95"]),
                   summary["mean_output_tokens"], summary["cut_rate"], summary["steps_rate"],
                   summary["states_answer_rate"], Path(out), summary.get("paired"), summary)

    def as_dict(self) -> dict:
        return dict(self.details)


def _steering_label(request: EvalRequest, vectors, vectors_name: str | None) -> dict | None:
    if vectors is None:
        return None
    if request.form == "gated-lora":
        gate = request.gate  # run_eval fills in the defaults
        strength = {"alpha": gate.alpha, "gate": dataclasses.asdict(gate)}
    else:
        strength = {"alpha": request.alpha} if request.form == "paper" else {"scale": request.scale}
    return {"vectors": vectors_name, "form": request.form, **strength, "layers": vectors.layers}


def _lora_label(request: EvalRequest) -> dict | None:
    if not request.lora:
        return None
    path, scale = parse_lora(request.lora)
    return {"path": str(path), "scale": scale}


def run_eval(model, request: EvalRequest, out: Path, vectors=None, vectors_name: str | None = None,
             options=None, progress: bool = True) -> EvalSummary:
    """Evaluate `model` (a spec, a LoadedModel or a (model, tokenizer) pair) as `request` says, on its
    engine, writing predictions.jsonl and summary.json into `out`."""
    from ..models.pool import model_label
    from ..models.runtime import RuntimeOptions

    options = options or RuntimeOptions()
    out = Path(out)
    if request.max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    if (out / "summary.json").exists() and not request.overwrite:
        raise UserError(f"'{out}' already holds results: choose another folder or pass --overwrite")
    if (out / PROGRESS).exists() and not (request.resume or request.overwrite):
        raise UserError(f"'{out}' holds an interrupted run: pass --resume to continue it or --overwrite to restart")
    task = task_for(request.data, request.task)
    items = load_items(request.data, request.count, request.offset, task=task.name, where=request.where)
    request = dataclasses.replace(request, template=request.template or task.template, task=task.name)
    baseline_rows = read_baseline(request.baseline, items) if request.baseline else None
    if request.layers and vectors is None:
        raise UserError("layers selects layers of the vectors: pass vectors too")
    if request.layers:
        vectors = vectors.select(request.layers)
    if request.form not in EVAL_FORMS:
        raise UserError(f"unknown steering form '{request.form}': use {', '.join(EVAL_FORMS)}")
    if request.lora and vectors is not None:
        raise UserError("pass either vectors or a LoRA adapter, not both: the adapter already holds its steering")
    if request.gate is not None and request.form != "gated-lora":
        raise UserError("gate settings apply to the gated-lora form only")
    if request.form == "gated-lora" and vectors is not None and request.gate is None:  # its defaults, once
        from ..settings import GateSettings

        request = dataclasses.replace(request, gate=GateSettings(alpha=request.alpha, chat=request.chat))
    engine = check_request(request.engine, model, request, vectors)
    label = {"model": model_label(model), "engine": request.engine, "task": task.name, "template": request.template,
             "chat": request.chat, "data": str(request.data), "offset": request.offset,
             **({"where": request.where} if request.where else {}),
             "steering": _steering_label(request, vectors, vectors_name)}
    if request.lora:
        label["lora"] = _lora_label(request)
    with engine.open(model, request, items, vectors, label, options, progress) as session:
        summary = generate_and_score(items, session.texts, session.engine, request.max_new_tokens, out, session.label, progress,
                           resume=request.resume, baseline=baseline_rows, task=task, prefixes=request.prefixes)
    return EvalSummary.from_summary(summary, out)
