"""Did the transfer help? Several arms on the same questions in one call, each on the engine that
serves it, paired against a baseline arm (the unsteered model), at several budgets from one generation.

An arm is the model as it is, an export (a folded checkpoint or GGUF, a control vector, a LoRA), a
prompt baseline (another template) or the reference hooks. Each arm is an `eval` run in
OUT/arms/NAME at the largest budget; a smaller budget is scored on each answer's prefix (greedy
decoding makes the first N tokens of a longer answer the answer a run at N would give, at the same
batch size), where the engine returns prefixes (transformers, llama-server), and run separately where
it does not (vLLM). results.json holds per arm and budget the accuracy with its Wilson interval, the
mean output length and the cut rate, and against the baseline arm the questions won and lost, the
exact McNemar p and the Holm-adjusted p across the arms at that budget; report.md is rendered from it.

Confirmation: a choice made on some questions (`choose`: a pre-registration record naming the arm,
its settings and the questions it saw) is confirmed by `compare --confirm RECORD` on questions it
never saw; an overlap is refused before anything runs, unless `allow_overlap`, whose report then says
in its title that it is no confirmation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from .._io import atomic_write_text
from ..errors import UserError
from ..settings import setting
from .engines import engines_with
from .run import EvalRequest, load_items, mcnemar_exact, read_predictions, score_row, summarize
from .tasks import task_for

ARM_KINDS = ("model", "template", "control-vector", "lora", "paper", "additive")
RESULTS = "results.json"
PLAN = "compare.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: `kind` (ARM_KINDS) and its `value` (a model, a template, a file), with a strength for
    the hook forms (paper: alpha, additive: scale) and a LoRA's scale."""

    name: str
    kind: str = "model"
    value: str | None = None
    strength: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "Arm":
        """'NAME' (the baseline: MODEL as it is), 'NAME=PATH' (a model: a folder or GGUF), or
        'NAME=KIND:VALUE' with KIND template, control-vector, lora (VALUE PATH[:SCALE]), paper or
        additive (VALUE VECTORS[@STRENGTH])."""
        name, sep, rest = spec.partition("=")
        if not _NAME.fullmatch(name):
            raise UserError(f"arm '{spec}': its name '{name}' must be letters, digits, '_', '.' or '-' (at most 64)")
        if not sep:
            return cls(name)
        kind, colon, value = rest.partition(":")
        if not colon or kind not in ARM_KINDS or (kind == "model" and not value):
            kind, value = "model", rest  # a path (which may hold a colon, as zoo:NAME does)
        strength = None
        if kind in ("paper", "additive"):
            value, at, number = value.rpartition("@") if "@" in value else (value, "", "")
            if at:
                try:
                    strength = float(number)
                except ValueError:
                    raise UserError(f"arm '{spec}': '{number}' after '@' is not a number") from None
        if not value:
            raise UserError(f"arm '{spec}' names no {kind}: write NAME={kind}:VALUE")
        return cls(name, kind, value, strength)

    def describe(self) -> dict:
        return {"kind": self.kind, "value": self.value, **({"strength": self.strength} if self.strength is not None else {})}


@dataclasses.dataclass(frozen=True)
class CompareRequest:
    """The questions and budgets every arm is scored on, and how arms that name no engine are served. Its
    fields are `compare`'s flags and a recipe's `evaluate:` section (generated from them, one default each)."""

    data: str = setting("builtin:gsm8k-dev",
        "As eval's --data: builtin:gsm8k-dev (choose here), builtin:gsm8k-confirm (confirm here, once), "
        "builtin:math500, builtin:agieval-math, or a JSONL file.")
    count: int | None = setting(None, "The first N questions (after --offset).")
    offset: int = setting(0, "Skip this many lines first.")
    where: str | None = setting(None, "As eval's --where: only the questions whose FIELD is one of the values.")
    task: str | None = setting(None, "As eval's --task (default: the data set's own).")
    template: str | None = setting(None, "The prompt template of every arm but template arms (default: the task's).")
    chat: bool = setting(False, "Wrap every prompt in the model's chat template.")
    budgets: tuple[int, ...] = setting((256,),
        "Budgets, a comma list (256,512,1024): generated once at the largest, each smaller one scored on the "
        "answers' first N tokens (run separately on engines that return no prefixes: vLLM).")
    engine: str = "auto"  # for MODEL and model arms: auto (llamacpp for a GGUF, else transformers), or one
    baseline: str | None = setting(None, "The arm every other arm is paired against (default: the first).")
    llama_server: str | None = setting(None, "llamacpp arms: the llama-server binary.")
    vllm: str | None = setting(None, "vllm arms: the `vllm` executable or its Python.")
    parallel: int = setting(4, "llamacpp, vllm: requests in flight.")

def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (family-wise error), in their own order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def question_digest(question: str) -> str:
    return hashlib.sha256(question.encode()).hexdigest()


def _is_gguf(model: str) -> bool:
    from ..models.loading import resolve

    try:
        return resolve(model).kind == "gguf"
    except UserError:
        return str(model).endswith(".gguf")


def arm_request(arm: Arm, model: str, request: CompareRequest, max_new_tokens: int,
                prefixes: tuple[int, ...]) -> tuple[str, EvalRequest, str | None]:
    """(the model the arm runs, its eval request, the vectors file its hooks read) for `arm` over MODEL."""
    served = arm.value if arm.kind == "model" and arm.value else model
    engine = request.engine
    if arm.kind in ("paper", "additive"):
        engine = engines_with("forms", arm.kind)[0]  # the first engine that runs these hooks
    elif arm.kind == "control-vector":
        engine = engines_with("control_vector")[0]
    elif engine == "auto":
        engine = "llamacpp" if _is_gguf(served) else "transformers"
    fields = dict(data=request.data, count=request.count, offset=request.offset, where=request.where, task=request.task,
                  template=request.template, chat=request.chat, engine=engine, max_new_tokens=max_new_tokens,
                  llama_server=request.llama_server, vllm=request.vllm, parallel=request.parallel, prefixes=prefixes)
    vectors = None
    if arm.kind == "template":
        fields["template"] = arm.value
    elif arm.kind == "control-vector":
        fields["control_vector"] = arm.value
    elif arm.kind == "lora":
        fields["lora"] = arm.value
    elif arm.kind == "paper":
        fields.update(form="paper", alpha=0.1 if arm.strength is None else arm.strength)
        vectors = arm.value
    elif arm.kind == "additive":
        fields.update(form="additive", scale=1.0 if arm.strength is None else arm.strength)
        vectors = arm.value
    return served, EvalRequest(**fields), vectors


def _check_arms(arms: list[Arm], request: CompareRequest) -> str:
    if len(arms) < 2:
        raise UserError("compare needs at least two arms: the baseline and one to compare with it")
    names = [a.name for a in arms]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"two arms are named '{duplicate}': give each arm its own name")
    baseline = request.baseline or names[0]
    if baseline not in names:
        raise UserError(f"--baseline '{baseline}' is none of the arms ({', '.join(names)})")
    if not request.budgets or any(b < 1 for b in request.budgets):
        raise UserError("budgets (--max-new-tokens) must be whole numbers >= 1, such as 256,512")
    for arm in arms:
        if arm.kind in ("control-vector", "paper", "additive") and not Path(arm.value).is_file():
            raise UserError(f"arm '{arm.name}': {arm.kind} file '{arm.value}' not found")
    return baseline


def read_choice(path: str | Path) -> dict:
    """A pre-registration record written by `choose`."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the choice record '{path}' ({type(exc).__name__}): pass the file "
                        "`unlock-export choose` wrote") from None
    if not isinstance(record, dict) or record.get("kind") != "unlock-export choice" or "seen" not in record:
        raise UserError(f"'{path}' is not a choice record: write one with `unlock-export choose`")
    return record


def choose(results_dir: str | Path, arm: str, output: str | Path, note: str | None = None) -> dict:
    """Record a choice made on a comparison (RESULTS_DIR, a `compare` output) before it is confirmed:
    the arm, its settings, the questions the choice saw (every question of that comparison), the commit
    and the date. Written once; an existing record is never replaced."""
    from ..provenance import run_record, utc_now

    results = read_results(results_dir)
    arms = {a["name"]: a for a in results["arms"]}
    if arm not in arms:
        raise UserError(f"'{results_dir}' has no arm '{arm}': choose one of {', '.join(arms)}")
    output = Path(output)
    if output.exists():
        raise UserError(f"'{output}' exists: a choice is recorded once; write the new one elsewhere")
    seen = set(results["questions"]["sha256"])
    for earlier in results.get("choices_seen", []):
        seen |= set(earlier)
    record = {"kind": "unlock-export choice", "arm": arms[arm], "chosen_on": {
        "results": str(Path(results_dir).resolve()), "data": results["request"]["data"],
        "indices": results["questions"]["indices"]}, "note": note,
        "seen": sorted(seen), "recorded": utc_now(),
        "provenance": run_record(["choose", str(results_dir), arm])}
    atomic_write_text(output, json.dumps(record, indent=2) + "\n")
    return record


def read_results(out: str | Path) -> dict:
    path = Path(out) / RESULTS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"'{out}' holds no {RESULTS}: pass the output folder of a finished `compare`") from None


def budget_rows(task, items, rows: list[dict], budget: int) -> list[dict]:
    """The rows a run at `budget` gives, from the rows of a run at a larger one: an answer that ended
    within `budget` tokens is the same answer; a longer one is its first `budget` tokens."""
    scored = []
    for item, row in zip(items, rows):
        if row["output_tokens"] <= budget:
            scored.append(score_row(task, item, row["output"], row["output_tokens"], budget))
        else:
            scored.append(score_row(task, item, row["prefix_outputs"][str(budget)], budget, budget))
    return scored


def _arm_folder(out: Path, name: str, budget: int | None = None) -> Path:
    """OUT/arms/NAME: the arm's eval at the largest budget; OUT/arms/NAME@N: a budget run on its own."""
    return out / "arms" / (name if budget is None else f"{name}@{budget}")


def _arm_rows(arm: Arm, model: str, request: CompareRequest, out: Path, options, progress: bool,
              vectors_cache: dict, task, items) -> dict[int, list[dict]]:
    """Run one arm (resuming what an interrupted compare left) -> {budget: its rows}."""
    from ..method.vectors import SteeringVectors
    from .run import PROGRESS, run_eval

    largest = max(request.budgets)
    smaller = tuple(b for b in request.budgets if b < largest)
    runs: dict[int, list[dict]] = {}

    def run(budget: int, prefixes: tuple[int, ...]) -> list[dict]:
        folder = _arm_folder(out, arm.name, budget if budget != largest else None)
        if (folder / "summary.json").exists():
            return read_predictions(folder)
        served, ask, vectors_file = arm_request(arm, model, request, budget, prefixes)
        ask = dataclasses.replace(ask, resume=(folder / PROGRESS).exists())
        vectors = None
        if vectors_file:
            if vectors_file not in vectors_cache:  # several arms may steer with one file: read it once
                vectors_cache[vectors_file] = SteeringVectors.load(vectors_file)
            vectors = vectors_cache[vectors_file]
        run_eval(served, ask, folder, vectors=vectors, vectors_name=vectors_file, options=options, progress=progress)
        return read_predictions(folder)

    rows = run(largest, smaller)
    runs[largest] = rows
    for budget in smaller:
        if all(r["output_tokens"] <= budget or str(budget) in r.get("prefix_outputs", {}) for r in rows):
            runs[budget] = budget_rows(task, items, rows, budget)
        else:  # the engine gives no prefixes (vLLM): that budget runs on its own
            runs[budget] = run(budget, ())
    return runs


def _added_arms(stored: dict, asked: dict) -> list[str]:
    """The names of the arms `asked` adds to the interrupted comparison `stored`, where that is the only
    difference (every stored arm asked again as it was); else []."""
    kept = {a["name"]: a for a in asked["arms"]}
    if any(kept.get(a["name"]) != a for a in stored["arms"]):
        return []
    if {k: v for k, v in stored.items() if k != "arms"} != {k: v for k, v in asked.items() if k != "arms"}:
        return []
    had = {a["name"] for a in stored["arms"]}
    return [a["name"] for a in asked["arms"] if a["name"] not in had]


def compare(model: str, arms: list[Arm], request: CompareRequest, out: str | Path, options=None,
            progress: bool = True, confirm: str | Path | None = None, allow_overlap: bool = False,
            overwrite: bool = False, command: list[str] | None = None, add_arms: bool = False) -> dict:
    """Score every arm on the same questions at every budget, pair each against the baseline arm, and
    write OUT/results.json and OUT/report.md (a PNG too where matplotlib is installed). `add_arms`: an
    interrupted comparison in OUT asked again with more arms continues with them added (the arms it holds
    keep their answers; results.json's `arms_added` says which arms joined and when)."""
    from ..provenance import run_record, utc_now

    out = Path(out)
    if add_arms and overwrite:
        raise UserError("--add-arms keeps a comparison's answers and --overwrite replaces them: pass one of the two")
    baseline = _check_arms(arms, request)
    request = dataclasses.replace(request, budgets=tuple(sorted(set(request.budgets))))
    task = task_for(request.data, request.task)
    items = load_items(request.data, request.count, request.offset, task=task.name, where=request.where)
    digests = [question_digest(it.question) for it in items]
    choice = read_choice(confirm) if confirm else None
    if choice is not None:
        seen = set(choice["seen"])
        overlap = [it.index for it, d in zip(items, digests) if d in seen]
        if overlap and not allow_overlap:
            raise UserError(f"{len(overlap)} of these {len(items)} questions (first: index {overlap[0]}) were seen "
                            f"by the choice in '{confirm}': confirm on questions it never saw (such as "
                            "builtin:gsm8k-confirm), or pass --allow-overlap for a report titled as no confirmation")
        if choice["arm"]["name"] not in [a.name for a in arms]:
            raise UserError(f"the choice in '{confirm}' is arm '{choice['arm']['name']}', which is not among these "
                            f"arms: add --arm {choice['arm']['name']}=...")
    else:
        overlap = []
    plan = {"model": model, "arms": [{"name": a.name, **a.describe()} for a in arms],
            "request": dataclasses.asdict(request), "baseline": baseline,
            "confirm": str(confirm) if confirm else None, "allow_overlap": allow_overlap}
    plan_path = out / PLAN
    if (out / RESULTS).exists() and not overwrite:
        raise UserError(f"'{out}' already holds a comparison: choose another folder or pass --overwrite")
    if plan_path.exists() and not overwrite:
        stored = json.loads(plan_path.read_text(encoding="utf-8"))
        defaults = json.loads(json.dumps(dataclasses.asdict(CompareRequest())))
        stored["request"] = {**defaults, **stored.get("request", {})}  # a setting added since: its default
        plan["arms_added"] = stored.pop("arms_added", [])
        asked = json.loads(json.dumps({k: v for k, v in plan.items() if k != "arms_added"}))
        if stored != asked:
            added = _added_arms(stored, asked)
            if not (add_arms and added):
                raise UserError(f"'{out}' holds an interrupted comparison with other arms or settings: rerun it with "
                                "the same arguments to continue" + (", or pass --add-arms to add these arms to it"
                                                                   if added else "") + ", or --overwrite to start again")
            plan["arms_added"].append({"arms": added, "date": utc_now()})
    elif add_arms:
        raise UserError(f"--add-arms adds arms to an interrupted comparison, and '{out}' holds none: leave it out")
    elif overwrite and out.exists():
        import shutil

        for name in (RESULTS, PLAN, "report.md", "report.png"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "arms", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")

    vectors_cache: dict = {}
    per_arm = {a.name: _arm_rows(a, model, request, out, options, progress, vectors_cache, task, items) for a in arms}
    table = []
    for budget in request.budgets:
        base_rows = {r["index"]: r for r in per_arm[baseline][budget]}
        entries = []
        for arm in arms:
            rows = per_arm[arm.name][budget]
            summary = summarize(rows, budget)
            entry = {"arm": arm.name, "budget": budget, **{k: summary[k] for k in (
                "n", "correct", "accuracy", "ci95", "mean_output_tokens", "cut_rate")}}
            if "by_group" in summary:
                entry["by_group"] = summary["by_group"]
            if arm.name != baseline:
                won = sum(r["correct"] and not base_rows[r["index"]]["correct"] for r in rows)
                lost = sum(base_rows[r["index"]]["correct"] and not r["correct"] for r in rows)
                entry.update(won=won, lost=lost, p_mcnemar_exact=mcnemar_exact(won, lost))
            entries.append(entry)
        paired = [e for e in entries if "won" in e]
        for entry, adjusted in zip(paired, holm([e["p_mcnemar_exact"] for e in paired])):
            entry["p_holm"] = adjusted
        table.extend(entries)
    arm_records = []
    for arm in arms:
        served, ask, vectors_file = arm_request(arm, model, request, max(request.budgets), ())
        summary = json.loads((out / "arms" / arm.name / "summary.json").read_text(encoding="utf-8"))
        arm_records.append({"name": arm.name, **arm.describe(), "model": served, "engine": ask.engine,
                            "template": summary.get("template"), "wall_s": summary.get("wall_s"),
                            "resumed_from": summary.get("resumed_from", 0),  # answers an earlier run gave: not in wall_s
                            "generation_s": summary.get("generation_s"),  # every answer's, across runs
                            "smaller_budgets": "run separately" if any(
                                _arm_folder(out, arm.name, b).exists() for b in request.budgets[:-1])
                            else "scored on the largest budget's answer prefixes"})
    results = {
        "title": _title(choice, overlap, allow_overlap),
        "confirmation": choice is not None and not overlap,
        "preregistration": choice and {k: choice[k] for k in ("arm", "chosen_on", "recorded", "note", "provenance")},
        "overlap_with_choice": len(overlap),
        "model": model, "baseline": baseline, "task": task.name, "request": dataclasses.asdict(request),
        "questions": {"n": len(items), "indices": [it.index for it in items], "sha256": digests},
        "choices_seen": [choice["seen"]] if choice else [],
        "arms": arm_records, **({"arms_added": plan["arms_added"]} if plan.get("arms_added") else {}),
        "table": table,
        "multiple_comparisons": "Holm across the arms paired with the baseline, at each budget",
        "provenance": run_record(command or ["compare"]),
    }
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(results))
    _plot(results, out / "report.png")
    plan_path.unlink(missing_ok=True)
    return results


def _title(choice, overlap, allow_overlap) -> str:
    if choice is None:
        return "Development comparison (not a confirmation: no recorded choice was confirmed)"
    if overlap:
        return (f"NOT A CONFIRMATION: {len(overlap)} questions overlap the choice's (--allow-overlap): "
                f"arm {choice['arm']['name']}")
    return f"Confirmation of arm {choice['arm']['name']}, chosen before on other questions"


def render_report(results: dict) -> str:
    """report.md from results.json: every figure read from it."""
    request = results["request"]
    lines = [f"# {results['title']}", "",
             f"_Rendered from results.json by `unlock_export.evaluation.compare.render_report`; commit "
             f"{(results['provenance'].get('commit') or '?')[:12]}._", "",
             f"Model {results['model']}; {results['questions']['n']} questions of {request['data']} from offset "
             f"{request['offset']}" + (f" where {request['where']}" if request.get("where") else "")
             + f" (task {results['task']}); greedy; paired against arm **{results['baseline']}**: "
             f"won / lost, exact McNemar p, and p adjusted by {results['multiple_comparisons']}.", ""]
    if results.get("preregistration"):
        pre = results["preregistration"]
        lines += [f"Pre-registered: arm **{pre['arm']['name']}** ({pre['arm']['kind']}: {pre['arm']['value']}), chosen "
                  f"on {pre['chosen_on']['data']} ({len(pre['chosen_on']['indices'])} questions), recorded "
                  f"{pre['recorded']} at commit {(pre['provenance'].get('commit') or '?')[:12]}.", ""]
    for added in results.get("arms_added", []):
        lines += [f"Added to the comparison after it began ({added['date'][:10]}): "
                  + ", ".join(f"**{name}**" for name in added["arms"]) + ".", ""]
    lines += ["| budget | arm | accuracy | 95% CI | won / lost | p | p (Holm) | mean tokens | cut |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in results["table"]:
        paired = (f"{e['won']} / {e['lost']} | {e['p_mcnemar_exact']:.3g} | {e['p_holm']:.3g}" if "won" in e
                  else "baseline | | ")
        lines.append(f"| {e['budget']} | {e['arm']} | {e['correct']}/{e['n']} = {e['accuracy']:.1%} | "
                     f"{e['ci95'][0]:.1%}-{e['ci95'][1]:.1%} | {paired} | {e['mean_output_tokens']:.0f} | "
                     f"{e['cut_rate']:.0%} |")
    lines += ["", "| arm | kind | what | engine | template | wall s |", "|---|---|---|---|---|---|"]
    n = results["questions"]["n"]
    for a in results["arms"]:
        resumed = a.get("resumed_from") or 0  # the wall time is the last run's, over the answers it gave
        wall = f"{a['wall_s']}"
        if resumed and a.get("generation_s") is not None:
            wall = f"{a['generation_s']} generating all {n} ({a['wall_s']} in the last run, {resumed} resumed)"
        elif resumed:
            wall = f"{a['wall_s']} for the last {n - resumed} ({resumed} resumed)"
        lines.append(f"| {a['name']} | {a['kind']} | {a['value'] or a['model']} | {a['engine']} | {a['template']} | "
                     f"{wall} |")
    grouped = [e for e in results["table"] if "by_group" in e and e["budget"] == max(request["budgets"])]
    for field in ("level", "subject"):
        values = sorted({v for e in grouped for v in e["by_group"].get(field, {})})
        if not values:
            continue
        lines += ["", f"Accuracy by {field} at {max(request['budgets'])} tokens:", "",
                  f"| arm | {' | '.join(values)} |", "|---|" + "---|" * len(values)]
        for e in grouped:
            cells = [e["by_group"][field].get(v, {"n": 0, "correct": 0}) for v in values]
            lines.append(f"| {e['arm']} | " + " | ".join(f"{c['correct']}/{c['n']}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    """Accuracy and interval per arm against the budget (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in [a["name"] for a in results["arms"]]:
        rows = [e for e in results["table"] if e["arm"] == arm]
        budgets = [e["budget"] for e in rows]
        acc = [e["accuracy"] for e in rows]
        err = [[e["accuracy"] - e["ci95"][0] for e in rows], [e["ci95"][1] - e["accuracy"] for e in rows]]
        ax.errorbar(budgets, acc, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xlabel("max new tokens")
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_title(results["title"][:70], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["ARM_KINDS", "Arm", "CompareRequest", "choose", "compare", "holm", "read_choice", "render_report",
           "read_results"]
