#!/usr/bin/env bash
# Issue 34's MATH run, as a user would run it: the fold chosen on GSM8K dev (the pre-registered arm of
# reports/results/choice_gsm8k_cot_fold.json) on the MATH-500 problems a 2-core CPU can afford, levels 1
# and 2 (133 of the 500), against the unsteered model and the CoT prompt (`math-cot`), every answer asked
# for in \boxed{} and scored by math-verify. Greedy, 512 and 1024 new tokens from one generation, every arm on
# llama.cpp. No choice has seen a MATH problem, so `--confirm` titles it a confirmation of that arm.
#
#   bash experiments/confirm_math500.sh          # OUT=out/confirm; rerun to continue where it stopped
#   bash experiments/confirm_math500.sh keep     # before the machine goes: keep the answers so far in reports/
#
# The fold is the one confirm_gsm8k.sh builds and checks (its `fold` step runs first). About 4 h on a quiet
# 2-core machine: 3 arms x 133 problems, up to 1024 tokens each.
set -euo pipefail
OUT="${OUT:-out/confirm}"
CLI=(${UNLOCK_CLI:-.venv/bin/unlock-export})
TARGET=zoo:qwen2.5-coder-1.5b-instruct
CHOICE=reports/results/choice_gsm8k_cot_fold.json
KEPT=reports/results/confirm_math500_answers
RUN="$OUT/math500"
if [[ "${1:-}" == keep ]]; then  # the plan and each arm's answers into $KEPT (once ended: its results and report)
    source experiments/keep_comparison.sh
    keep_comparison "$RUN" "$KEPT" confirm_math500
    exit $?
fi
OUT="$OUT" bash experiments/confirm_gsm8k.sh fold
if [[ ! -d "$RUN" && -f "$KEPT/compare.json" ]]; then
    mkdir -p "$RUN" && cp -r "$KEPT/." "$RUN/"
fi
[[ -f "$RUN/results.json" ]] || "${CLI[@]}" compare "$TARGET" --arm "fold=$OUT/fold.gguf" --arm cot=template:math-cot \
    --data builtin:math500 --where level=1,2 --max-new-tokens 512,1024 --confirm "$CHOICE" -o "$RUN"
