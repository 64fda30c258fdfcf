"""Render the markdown reports in reports/ and README.md's generated blocks from the results JSON in reports/results/.

  python scripts/render_report.py            # (re)write reports/gsm8k-qwen2.5-coder.md, reports/performance.md
  python scripts/render_report.py --check    # exit 1 naming each report a fresh render would change
  python scripts/render_report.py --results DIR --out DIR

What the reports show is data, in scripts/report_specs.py (its templates: scripts/report_template.py); this is the
engine that renders it. A figure is as recorded, or computed from the recorded counts with the package's own
functions: Wilson 95% intervals by `wilson`, won / lost and the exact McNemar p by `paired_comparison` from both
runs' `correct_indices` where recorded, else the p by `mcnemar_exact` from the recorded won / lost. A recorded
figure that disagrees with its counts stops the render, naming the file and key. The output depends only on the
input files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "scripts"):  # this checkout's package (it needs no torch here), the specs beside this file
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import report_specs as specs  # noqa: E402
from report_specs import DEMO  # noqa: E402
from report_template import EMPTY, Doc, Scope, code, code_key, dig, entries, key  # noqa: E402
from report_template import interval as interval  # noqa: E402  (re-exported for callers, as are pct and pvalue)
from report_template import pct as pct  # noqa: E402
from report_template import pvalue as pvalue  # noqa: E402

from unlock_export.evaluation.run import mcnemar_exact as mcnemar  # noqa: E402
from unlock_export.evaluation.run import paired_comparison, wilson  # noqa: E402

RESULTS, OUT, README = ROOT / "reports" / "results", ROOT / "reports", ROOT / "README.md"
GSM8K_REPORT, PERFORMANCE_REPORT = specs.GSM8K.file, specs.PERFORMANCE.file
DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"
CONFIRM_START, CONFIRM_END = "<!-- confirmation:start -->", "<!-- confirmation:end -->"


class Inconsistent(Exception):
    """A recorded figure disagrees with the counts it was computed from."""


def relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows)]


# -- inputs -------------------------------------------------------------------------------------

def load(results: Path, out: Path, name: str, needed: str = "") -> Doc | None:
    """The results file `name`; None where it is absent, unless it is `needed` (why)."""
    path = results / name
    if not path.is_file():
        if needed:
            raise SystemExit(f"{path} not found: {needed}")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SystemExit(f"{path}: not JSON ({exc})") from None
    return Doc(name, relative(path, out), data)


def provenance_text(doc: Doc) -> str:
    data = doc.data if isinstance(doc.data, dict) else {}
    if not (prov := data.get("provenance")):
        recorded = [f"{name} {code(data[name])}" for name in ("command", "machine") if isinstance(data.get(name), str)]
        return "provenance not recorded" + (f" (the file itself records: {'; '.join(recorded)})" if recorded else "")
    commit, m = prov.get("commit"), prov.get("machine") or {}
    parts = [f"commit {code(commit[:12])}" + (" with uncommitted changes" if prov.get("dirty") else "") if commit
             else "commit unknown (not run from a git checkout)", prov.get("date") and str(prov["date"]),
             prov.get("command") and f"command {code(prov['command'])}",
             ", ".join(f"{name} {v}" for name, v in (prov.get("versions") or {}).items() if v)]
    if m:
        parts.append(", ".join(b for b in [m.get("platform"), m.get("cpu_count") and f"{m['cpu_count']} CPUs",
                                           m.get("memory_gib") and f"{m['memory_gib']} GiB", m.get("gpu") or "no GPU"]
                               if b))
    return "; ".join(p for p in parts if p)


# -- statistics ---------------------------------------------------------------------------------

def paired_indices(a, b, questions) -> dict:
    """paired_comparison of run a against run b on `questions`, from their correct_indices."""
    right_a, right_b = set(a), set(b)
    rows = [{"index": i, "correct": i in right_a} for i in questions]
    baseline = [{"index": i, "correct": i in right_b} for i in questions]
    return {**paired_comparison(rows, baseline), "a_right": len(right_a.intersection(questions)),
            "b_right": len(right_b.intersection(questions)), "both": len(right_a & right_b.intersection(questions))}


def _close(recorded, computed, rel: float = 0.0, absolute: float = 5.1e-5) -> bool:
    return abs(recorded - computed) <= max(absolute, rel * abs(computed))


def check_counts(where: str, run: dict) -> None:
    n, correct, indices = run["n"], run["correct"], run.get("correct_indices")
    if indices is not None and (len(indices) != correct or len(set(indices)) != correct):
        raise Inconsistent(f"{where}: {len(indices)} correct_indices for {correct} correct")
    if run.get("accuracy") is not None and not _close(run["accuracy"], correct / n):
        raise Inconsistent(f"{where}: recorded accuracy {run['accuracy']} but {correct}/{n}")
    lo, hi = wilson(correct, n)
    if run.get("ci95") is not None and not (_close(run["ci95"][0], lo) and _close(run["ci95"][1], hi)):
        raise Inconsistent(f"{where}: recorded ci95 {run['ci95']} but Wilson gives [{lo:.4f}, {hi:.4f}]")


def check_paired(where: str, recorded: dict | None, counts: dict) -> None:
    if not isinstance(recorded, dict) or "won" not in recorded:
        return
    won, lost, p = counts["won"], counts["lost"], counts["p_mcnemar_exact"]
    if (recorded["won"], recorded["lost"]) != (won, lost):
        raise Inconsistent(f"{where}: recorded won/lost {recorded['won']}/{recorded['lost']} but the "
                           f"correct_indices give {won}/{lost}")
    if "p_mcnemar_exact" in recorded and not _close(recorded["p_mcnemar_exact"], p, rel=2e-3, absolute=1e-12):
        raise Inconsistent(f"{where}: recorded p {recorded['p_mcnemar_exact']} but exact McNemar gives {p}")


# -- runs and pairs -----------------------------------------------------------------------------

def run_rows(run: specs.Run, scope: Scope, grid: str | None) -> list[tuple]:
    """(key path, figures) of each row a Run gives."""
    runs = [run]
    if "[*]" in run.key:  # a run per entry that records `correct`
        runs = [replace(run, **{part: getattr(run, part).replace("[*]", f"[{json.dumps(name)}]")
                                for part in ("key", "base", "recorded") if getattr(run, part)})
                for name, entry in entries(scope.locate(run.key.partition("[*]")[0])[1])
                if isinstance(entry, dict) and "correct" in entry]
    rows = []
    for run in runs:
        (path, summary), base = scope.locate(run.key), scope.locate(run.base)[0]
        base, first, subset = None if base == path else base, run.first and scope.evaluate(run.first)[1], None
        if not isinstance(summary, dict):
            continue
        if first and summary["n"] > first and base:  # recorded over more questions: the first ones' row too
            rows.append((path, figures(scope.at(path), summary, replace(run, recorded=None), None, None, grid)))
            run, subset = replace(run, label=f"{run.label}, first {{{run.first}}}"), range(first)
        rows.append((path, figures(scope.at(path), summary, run, base, subset, grid)))
    return rows


def figures(item: Scope, summary: dict, run: specs.Run, base: tuple | None, subset: range | None, grid) -> dict:
    """A run's counts, rates and pairing against its base (on `subset` of its questions only, where given)."""
    doc, path = item.doc, item.path
    check_counts(f"{doc.name} {key(*path)}", summary)
    n, correct, offset, cut = summary["n"], summary["correct"], summary.get("offset") or 0, summary.get("cut_rate")
    found = {"tokens": summary.get("mean_output_tokens"), "says": summary.get("says_the_answer_is"),
             "cut": summary["at_cap"] / n if cut is None and summary.get("at_cap") is not None else cut,
             "states": summary.get("states_answer_rate"), "wall": summary.get("wall_s")}
    span, sources = range(offset, offset + n), [code_key(*path)]
    if subset:  # the run-wide rates are not the subset's
        correct, n, span, found = sum(i in subset for i in summary["correct_indices"]), len(subset), subset, {}
        sources[0] = f"{code_key(*path, 'correct_indices')} in {subset.start}-{subset.stop - 1}"
    recorded_path, recorded = item.locate(run.recorded if subset else
                                          " | ".join(filter(None, [run.recorded, specs.RUN_PAIRED])))
    where, base_run, counts = f"{doc.name} {key(*(recorded_path or path))}", base and dig(doc.data, base)[1], None
    if isinstance(base_run, dict) and None not in (summary.get("correct_indices"), base_run.get("correct_indices")):
        counts = paired_indices(summary["correct_indices"], base_run["correct_indices"],
                                item.questions(run.span) if run.span else span)
        sources.append(f"won / lost: `correct_indices` against {code_key(*base)}")
    elif isinstance(recorded, dict) and "won" in recorded:
        counts = {**recorded, "p_mcnemar_exact": mcnemar(recorded["won"], recorded["lost"])}
        sources.append(f"won / lost: {code_key(*recorded_path)}")
    if counts:
        check_paired(where, recorded, counts)
        found.update(won=counts["won"], lost=counts["lost"], p=counts["p_mcnemar_exact"])
    scale = run.scale.get(path[-1]) if isinstance(run.scale, dict) else run.scale
    scale_path, scale = item.locate(scale or specs.RUN_SCALE)
    if scale is not None and scale_path[:len(path)] != path:
        sources.append(f"scale: {code_key(*scale_path)}")
    grid_path, grid_rows = item.locate(grid)
    if (at := at_scale(grid_rows, scale)) is not None:
        found["grid"] = grid_rows[at]
        sources.append(f"calibration: {code_key(*grid_path, at)}")
    engine = run.engine or summary.get("engine") or "-"
    return {**found, "label": item.filled(run.label, "-"), "engine": {"llamacpp": "llama.cpp"}.get(engine, engine),
            "scale": scale, "correct": correct, "n": n, "ci": wilson(correct, n), "source": "; ".join(sources),
            "base": base}


def at_scale(grid: list | None, scale: float | None) -> int | None:
    """The index of a calibration grid's row at `scale`."""
    return next((j for j, r in enumerate(grid or []) if scale is not None and abs(r["scale"] - scale) < 1e-9), None)


def column_rows(columns: list[tuple[str, str]], found: list[tuple], scope: Scope) -> tuple[list, list]:
    """(headers, rows) of (header, template) columns filled from each (key path, figures) found."""
    headers, templates = zip(*columns)
    return list(headers), [[scope.at(path, **figs).filled(t, "-") for t in templates] for path, figs in found]


def pair_counts(pair: specs.Pair, scope: Scope) -> dict | None:
    """paired_indices of a against b on the pair's questions, with labels and source; None where one is lacking."""
    (a_path, a), (b_path, b), (recorded_path, recorded) = (scope.locate(x) for x in (pair.a, pair.b, pair.recorded))
    try:
        span = scope.questions(pair.questions)
    except KeyError:
        return None
    if not (span and isinstance(a, dict) and isinstance(b, dict) and "correct_indices" in a and "correct_indices" in b):
        return None
    counts = paired_indices(a["correct_indices"], b["correct_indices"], span)
    source = f"`correct_indices` of {code_key(*a_path)} and {code_key(*b_path)}"
    if recorded_path:
        check_paired(f"{scope.doc.name} {key(*recorded_path)}", recorded, counts)
        source += f"; agrees with {code_key(*recorded_path)}"
    return {**counts, "start": span.start, "stop": span.stop, "source": source,
            "a_label": scope.filled(pair.a_label, "-") if pair.a_label else a_path[-1],
            "b_label": scope.filled(pair.b_label, "-") if pair.b_label else b_path[-1]}


# -- blocks -------------------------------------------------------------------------------------

def emit_table(out: list, headers: list[str], rows: list[list], scope: Scope, caption: str = "") -> None:
    column = headers[-1] if headers[-1] in ("source", "from") else None
    per_row, link = f"; each row's key in its `{column}` column" if column else "", scope.doc.link
    out += [*table(headers, rows), "", f"Source: [{code(link)}]({link}){per_row}{caption}.", ""] if rows else []


def table_rows(block: specs.Table, scope: Scope) -> list[list]:
    """A Table's rows: a fixed row is left out where a value is absent; a row one cell short gets its source."""
    rows, width = [], len(block.headers)
    for row in block.rows:
        if not isinstance(row, specs.Each):
            values = scope.at()  # its source: the keys its value cells read
            try:
                cells = [scope.at().fill(row[0])] + [values.fill(template) for template in row[1:]]
            except KeyError:
                continue
            rows.append(["-" if c is None else c for c in cells]
                        + [", ".join(code_key(*path) for path in values.read)] * (len(cells) < width))
            continue
        base, container = scope.locate(row.key)
        for name, _ in entries(container):
            item = scope.at((*base, name))
            if row.where and item.locate(row.where)[1] is None:
                continue
            for recorded, computed, tolerance in row.agree:  # a recorded ratio against the one computed here
                (path, value), ratio = item.locate(recorded), item.locate(computed)[1]
                if value is not None and abs(value - ratio) > tolerance:
                    raise Inconsistent(f"{item.doc.name} {key(*path)}: recorded {value} but {ratio:.4g}")
            cells = [item.filled(template, "-") for template in row.cells]
            rows.append(cells + [code_key(*item.path)] * (len(cells) < width))
    return rows


def calibrations(block: specs.Calibrations, scope: Scope) -> tuple[list, list]:
    """(key path, figures) of each calibration: its label, chosen scale and grid row there; a Details of each grid."""
    rows, grids = [], []
    for label, text in block.entries:
        path, calibration = scope.locate(text)
        if isinstance(calibration, dict):
            scale = calibration.get("scale", calibration.get("label_free_scale"))
            tried = calibration.get("table") or []
            at = {} if (j := at_scale(tried, scale)) is None else tried[j]
            rows.append((path, {"label": label, "scale": scale, "at": at, "source": code_key(*path)}))
            path, calibration = (*path, "table"), calibration.get("table")
        if isinstance(calibration, list) and calibration:
            width = len(specs.GRID_CELLS) - all("continuation_ce" not in r for r in calibration)
            grid = key(*path)
            grids.append(specs.Details(f"{label}: every scale tried (<code>{grid}</code>)", [specs.Table(
                specs.GRID_HEADERS[:width], [specs.Each(grid, specs.GRID_CELLS[:width])], f", {code(grid)}")]))
    return rows, grids


def render_blocks(blocks: list, scope: Scope, out: list) -> None:
    """Append each block's lines (report_specs says what each kind shows)."""
    for block in blocks:
        if getattr(block, "when", None) and scope.locate(block.when)[1] in EMPTY:
            continue
        match block:
            case specs.From() if scope.docs.get(block.name):
                inner = replace(scope, doc=scope.docs[block.name], path=(), read=[], vars={})
                inner.vars = {name: inner.evaluate(text)[:2] for name, text in block.vars.items()}
                render_blocks(block.body, inner, out)
            case specs.Section():
                body = []
                render_blocks(block.body, scope, body)
                out += [f"{'#' * block.level} {scope.filled(block.title, '-')}", "", *body] if body else []
            case specs.Details():
                body, summary = [], scope.filled(block.summary)
                render_blocks(block.body, scope, body)
                if summary and body:
                    out += ["<details>", f"<summary>{summary}</summary>", "", *body, "</details>", ""]
            case specs.Para():
                counts = {name: pair_counts(pair, scope) for name, pair in block.pairs.items()}
                text = None if None in counts.values() else scope.at(**counts).filled(block.text)
                out += [text, ""] if text else []
            case specs.Note():
                path, text = scope.locate(block.key)
                if isinstance(text, str) and text.strip():
                    out += [f"> Recorded note (`{key(*path)}`): {text.strip()}", ""]
            case specs.Bullets():
                out += [f"- {item}" for item in block.items] + [""]
            case specs.Plots():
                results, folder = scope.folders
                lines = [f"- [{text}]({relative(results / name, folder)})" for name, text in block.items
                         if (results / name).is_file()]
                out += [*lines, ""] if lines else []
            case specs.Table():
                emit_table(out, block.headers, table_rows(block, scope), scope, scope.filled(block.caption, ""))
            case specs.Eval():
                found = [row for run in block.runs for row in run_rows(run, scope, block.grid)]
                base = next((figs["base"] for _, figs in found if figs["base"]), None)
                emit_table(out, *column_rows(block.columns or specs.EVAL_COLUMNS, found, scope), scope,
                           scope.at(base=base).filled(block.caption, ""))
            case specs.Pairs():
                found = [(None, counts) for counts in (pair_counts(pair, scope) for pair in block.pairs) if counts]
                emit_table(out, *column_rows(specs.PAIR_COLUMNS, found, scope), scope)
            case specs.Calibrations():
                found, grids = calibrations(block, scope)
                emit_table(out, *column_rows(specs.CALIBRATION_COLUMNS, found, scope), scope)
                render_blocks(grids, scope, out)


def render_report(report: specs.Report, results: Path, out: Path) -> str:
    docs, body = {name: load(results, out, name) for name in report.inputs}, []
    render_blocks(report.body, Scope(folders=(results, out), docs=docs), body)
    inputs = [[f"[{code(doc.link)}]({doc.link})" if doc else code(name),
               provenance_text(doc) if doc else "absent: its sections are left out"] for name, doc in docs.items()]
    lines = [specs.GENERATED.format(results=relative(results, out) + "/"), "",
             f"# {report.title}", "", "## Inputs", "", *table(["results file", "provenance"], inputs), "", *body]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines).rstrip("\n") + "\n")


# -- the README's generated blocks --------------------------------------------------------------

def readme_confirmation(results: Path = RESULTS) -> str:
    """The README's confirmations (specs.CONFIRMATIONS), each its title and every arm at every budget of its
    comparison (compare's results.json), each interval, p and Holm p checked against its counts; where a
    confirmation has no such file yet, a sentence saying it is not finished."""
    sections = [confirmation_section(confirmation, results) for confirmation in specs.CONFIRMATIONS]
    return "\n".join([CONFIRM_START, *"\n\n".join(sections).splitlines(), CONFIRM_END])


def confirmation_section(confirmation: specs.Confirmation, results: Path = RESULTS) -> str:
    from unlock_export.evaluation.compare import holm

    name, path = confirmation.results, results / confirmation.results
    title = textwrap.wrap(confirmation.title, 100, break_on_hyphens=False)
    if not path.is_file():
        pending = confirmation.pending.format(script=confirmation.script, kept=confirmation.kept)
        return "\n".join([*title, "", *textwrap.wrap(pending, 100, break_on_hyphens=False)])
    found = json.loads(path.read_text(encoding="utf-8"))
    if not found.get("confirmation"):
        raise SystemExit(f"{path}: not a confirmation (compare --confirm): the README shows only a confirmation here")
    rows = []
    for budget in found["request"]["budgets"]:
        entries_ = [e for e in found["table"] if e["budget"] == budget]
        paired = [e for e in entries_ if "won" in e]
        for e, adjusted in zip(paired, holm([mcnemar(e["won"], e["lost"]) for e in paired])):
            if not _close(e["p_mcnemar_exact"], mcnemar(e["won"], e["lost"]), rel=1e-9, absolute=0) \
                    or not _close(e["p_holm"], adjusted, rel=1e-9, absolute=0):
                raise Inconsistent(f"{name} table, {e['arm']} at {budget}: p or Holm p disagrees with won / lost")
        for e in entries_:
            check_counts(f"{name} table, {e['arm']} at {budget}", e)
            low, high = wilson(e["correct"], e["n"])
            versus = (f"{e['won']} / {e['lost']}, p = {pvalue(e['p_mcnemar_exact'])}, Holm {pvalue(e['p_holm'])}"
                      if "won" in e else "-")
            rows.append([budget, confirmation.labels.get(e["arm"], e["arm"]), f"{e['correct']}/{e['n']}",  # as
                         f"{e['correct'] / e['n']:.1%} ({low:.1%}-{high:.1%})", versus,  # compare's report rounds
                         f"{e['cut_rate']:.1%}"])
    pre = found["preregistration"]
    added = "".join(f" Added after the comparison began ({a['date'][:10]}): {', '.join(a['arms'])}."
                    for a in found.get("arms_added", []))
    registered = (f"Pre-registered arm: {pre['arm']['name']}, recorded {pre['recorded'][:10]} at commit "
                  f"{(pre['provenance'].get('commit') or '?')[:12]}, before any confirmation answer.{added}")
    source = (f"Rendered by `python scripts/render_report.py` from [reports/results/{name}](reports/results/{name}); "
              f"the report: [reports/{confirmation.report}](reports/{confirmation.report}).")
    headers = ["max new tokens", "arm", "correct", "accuracy (95% CI)",
               "vs unsteered: won / lost, exact McNemar p, Holm-adjusted p", "cut at the limit"]
    return "\n".join([*title, "", *table(headers, rows), "", f"{registered} {source}"])


def readme_with_results(text: str, block: str, start_mark: str, end_mark: str) -> str:
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < start:
        raise SystemExit(f"README.md has no {start_mark} ... {end_mark} block")
    return text[:start] + block + text[end + len(end_mark):]


def readme_demo(results: Path = RESULTS) -> str:
    """The README's demo sentence: benchmarks/demo.py's measurement of `make demo`'s run."""
    scope = Scope(load(results, ROOT, DEMO, "the README's demo sentence is rendered from it "
                                            "(python benchmarks/demo.py)"))
    stages = ", ".join(filter(None, (scope.filled(stage) for stage in specs.DEMO_STAGES)))
    text = scope.at(stages=stages).fill(specs.DEMO_SENTENCE)
    return "\n".join([DEMO_START, *textwrap.wrap(text, 100, break_on_hyphens=False), DEMO_END])


# -- command line -------------------------------------------------------------------------------

def render(results: Path = RESULTS, out: Path = OUT) -> dict[str, str]:
    """{report file name: its text}, rendered from the results folder for reports written to `out`."""
    return {report.file: render_report(report, results, out) for report in specs.REPORTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of results JSON (reports/results)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the reports go (reports)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each stale or missing report")
    parser.add_argument("--readme", type=Path, default=README,
                        help="the README whose results block is rendered too (README.md); --readme '' skips it")
    args = parser.parse_args(argv)
    results = args.results.resolve()
    try:
        reports = {args.out / name: text for name, text in render(results, args.out.resolve()).items()}
        if args.readme.name:
            current = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
            current = readme_with_results(current, readme_demo(results), DEMO_START, DEMO_END)
            reports[args.readme] = readme_with_results(current, readme_confirmation(results), CONFIRM_START,
                                                       CONFIRM_END)
    except Inconsistent as exc:
        print(f"render_report: inconsistent results: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, text in reports.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"stale: {path} (run python scripts/render_report.py)", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(reports[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
