#!/usr/bin/env bash
# Sourced by the confirmation scripts: keep_comparison RUN KEPT [NAME] copies a `compare` output folder's plan
# (compare.json) and each arm's answers into KEPT, so that a later machine continues from them: a finished
# arm's predictions and summary (its progress file is gone once it ends), an unfinished arm's finished
# chunks. Once the comparison has ended (its plan is gone then), KEPT holds every arm's answers and, with
# NAME, its results go to reports/results/NAME.json (and .png) and its report to reports/NAME-as-dashes.md.
keep_comparison() {
    local run="$1" kept="$2" name="${3:-}"
    [[ -f "$run/compare.json" || -f "$run/results.json" ]] || { echo "error: no comparison under $run to keep" >&2; return 2; }
    mkdir -p "$kept"
    [[ ! -f "$run/compare.json" ]] || cp "$run/compare.json" "$kept/"  # gone once the comparison has ended
    local arm into
    for arm in "$run"/arms/*/; do
        into="$kept/arms/$(basename "$arm")"
        mkdir -p "$into"
        if [[ -f "$arm/summary.json" ]]; then
            cp "$arm/predictions.jsonl" "$arm/summary.json" "$into/" && rm -f "$into/progress.jsonl"
        elif [[ -f "$arm/progress.jsonl" ]]; then
            cp "$arm/progress.jsonl" "$into/"
        fi
    done
    if [[ -n "$name" && -f "$run/results.json" ]]; then
        cp "$run/results.json" "reports/results/$name.json"
        cp "$run/report.md" "reports/${name//_/-}.md"
        [[ ! -f "$run/report.png" ]] || cp "$run/report.png" "reports/results/$name.png"
    fi
}
