#!/usr/bin/env bash
# Issue 34's confirmation, as a user would run it: the fold the README's development table chose
# (recipes/zoo-qwen0.5b-to-1.5b-cot-fold.yaml, chosen on GSM8K dev 0-63), compared on dev, the choice
# recorded with `choose`, then confirmed once with `compare --confirm` on all 400 questions of
# builtin:gsm8k-confirm, which no choice here has seen. Every arm on llama.cpp (the fold as the patched
# GGUF users serve), greedy, 256 and 512 new tokens from one generation.
#
#   bash experiments/confirm_gsm8k.sh            # OUT=out/confirm; rerun to continue where it stopped
#   bash experiments/confirm_gsm8k.sh keep       # before the machine goes: keep the finished chunks in reports/
#   bash experiments/confirm_gsm8k.sh fold       # only build (and check) the fold GGUF, as confirm_math500.sh needs
#
# Each step is skipped when its output exists, and an interrupted `compare` continues from its finished
# chunks when rerun with the same arguments. About 6-7 h on a quiet 2-core machine (the 1.5B answers at
# about 19 s per 512-token answer): the confirmation is 3 arms x 400 questions.
set -euo pipefail
OUT="${OUT:-out/confirm}"
CLI=(${UNLOCK_CLI:-.venv/bin/unlock-export})
TARGET=zoo:qwen2.5-coder-1.5b-instruct
CHOICE=reports/results/choice_gsm8k_cot_fold.json
mkdir -p "$OUT"
KEPT=reports/results/confirm_gsm8k_inprogress
if [[ "${1:-}" == keep ]]; then  # `confirm_gsm8k.sh keep`: copy the plan and each arm's finished chunks into $KEPT
    [[ -f "$OUT/confirm/compare.json" ]] || { echo "error: no confirmation under $OUT/confirm to keep" >&2; exit 2; }
    mkdir -p "$KEPT" && cp "$OUT/confirm/compare.json" "$KEPT/"
    for arm in "$OUT"/confirm/arms/*/; do
        if [[ -f "$arm/progress.jsonl" ]]; then
            mkdir -p "$KEPT/arms/$(basename "$arm")" && cp "$arm/progress.jsonl" "$KEPT/arms/$(basename "$arm")/"
        fi
    done
    exit 0
fi

[[ -f "$OUT/fold/summary.json" ]] || "${CLI[@]}" run recipes/zoo-qwen0.5b-to-1.5b-cot-fold.yaml "$OUT/fold"
[[ -f "$OUT/fold.gguf" ]] || "${CLI[@]}" gguf "$OUT/fold/model" -o "$OUT/fold.gguf"
# the confirmation is resumed across machines from its committed progress only on the same fold GGUF.
# The fold is bit-reproducible by commit on one machine, not across CPUs (float rounding in the captures):
# the digest was recorded again on 2026-12-07, before any fold-arm answer, when 3869278 and HEAD both
# rebuilt b53a3229... here and the first machine's 293d0a73... could not be rebuilt
SHA=reports/results/confirm_gsm8k_fold_gguf.sha256
got=$(sha256sum "$OUT/fold.gguf" | cut -d' ' -f1)
if [[ -f "$SHA" && "$(cat "$SHA")" != "$got" ]]; then
    echo "error: $OUT/fold.gguf ($got) is not the fold the confirmation began on ($(cat "$SHA")): rebuild it at that commit" >&2
    exit 2
fi
[[ -f "$SHA" ]] || echo "$got" > "$SHA"
[[ "${1:-}" == fold ]] && exit 0

ARMS=(--arm "fold=$OUT/fold.gguf" --arm cot=template:cot)
# development: where the configuration was chosen (dev 0-63); the first 32 questions, every arm
[[ -f "$OUT/dev/results.json" || -f "$CHOICE" ]] || "${CLI[@]}" compare "$TARGET" "${ARMS[@]}" --data builtin:gsm8k-dev \
    --count 32 --max-new-tokens 256,512 -o "$OUT/dev"
[[ -f "$CHOICE" ]] || "${CLI[@]}" choose "$OUT/dev" fold -o "$CHOICE" \
    --note "the bias fold of the answer-start CoT key (recipe zoo-qwen0.5b-to-1.5b-cot-fold), chosen on GSM8K dev 0-63 by the README's development table"
# the confirmation: once, on questions the choice never saw. A session that stops before it ends keeps its
# finished chunks in $KEPT (the plan and each arm's progress); a later one on another machine starts from there.
if [[ ! -d "$OUT/confirm" && -f "$KEPT/compare.json" ]]; then
    mkdir -p "$OUT/confirm" && cp -r "$KEPT/." "$OUT/confirm/"
fi
[[ -f "$OUT/confirm/results.json" ]] || "${CLI[@]}" compare "$TARGET" "${ARMS[@]}" --data builtin:gsm8k-confirm \
    --max-new-tokens 256,512 --confirm "$CHOICE" -o "$OUT/confirm"
