#!/usr/bin/env bash
# Issue 34's confirmation, as a user would run it: the fold the README's development table chose
# (recipes/zoo-qwen0.5b-to-1.5b-cot-fold.yaml, chosen on GSM8K dev 0-63), compared on dev, the choice
# recorded with `choose`, then confirmed once with `compare --confirm` on all 400 questions of
# builtin:gsm8k-confirm, which no choice here has seen. Every arm on llama.cpp (the fold as the patched
# GGUF users serve), greedy, 256 and 512 new tokens from one generation.
#
#   bash experiments/confirm_gsm8k.sh            # OUT=out/confirm; rerun to continue where it stopped
#   bash experiments/confirm_gsm8k.sh keep       # before the machine goes: keep the answers so far in reports/
#                                                # (once it has ended: its results.json and report too)
#   bash experiments/confirm_gsm8k.sh fold       # only build (and check) the fold GGUF, as confirm_math500.sh needs
#   bash experiments/confirm_gsm8k.sh gated      # only build the gated LoRA's GGUF (and keep it in reports/)
#
# Each step is skipped when its output exists, and an interrupted `compare` continues from its finished
# chunks when rerun with the same arguments. About 7-9 h on a quiet 2-core machine (the 1.5B answers at
# about 10-19 s per 512-token answer): the confirmation is 4 arms x 400 questions.
set -euo pipefail
OUT="${OUT:-out/confirm}"
CLI=(${UNLOCK_CLI:-.venv/bin/unlock-export})
TARGET=zoo:qwen2.5-coder-1.5b-instruct
CHOICE=reports/results/choice_gsm8k_cot_fold.json
mkdir -p "$OUT"
KEPT=reports/results/confirm_gsm8k_answers
if [[ "${1:-}" == keep ]]; then  # `confirm_gsm8k.sh keep`: the plan and each arm's answers into $KEPT (and once
    # it has ended, its results.json and report beside the other results)
    source experiments/keep_comparison.sh
    keep_comparison "$OUT/confirm" "$KEPT" confirm_gsm8k
    exit $?
fi

# the fold GGUF every fold-arm answer comes from. The recipe's captures are reproducible on one CPU, not across
# CPUs (float rounding), so the fold's vectors and scale are committed (FOLD): folding them and patching the zoo
# GGUF gives the same bytes on any machine. The recipe's run (3869278 and later) made them; a machine without
# the committed fold runs the recipe
FOLD=reports/results/confirm_gsm8k_fold
if [[ ! -f "$OUT/fold.gguf" ]]; then
    if [[ -f "$FOLD/vectors.safetensors" ]]; then
        [[ -f "$OUT/fold/model/unlock.json" ]] || "${CLI[@]}" fold "$TARGET" --vectors "$FOLD/vectors.safetensors" \
            --scale "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["scale"])' "$FOLD/fold.json")" \
            -o "$OUT/fold/model"
    else
        [[ -f "$OUT/fold/summary.json" ]] || "${CLI[@]}" run recipes/zoo-qwen0.5b-to-1.5b-cot-fold.yaml "$OUT/fold"
    fi
    "${CLI[@]}" gguf "$OUT/fold/model" -o "$OUT/fold.gguf"
fi
# the confirmation is resumed across machines from its committed progress only on the same fold GGUF: the
# digest was recorded on 2026-12-07, before any fold-arm answer (the first machine's 293d0a73... came from a
# recipe run on another CPU, before the fold was committed)
SHA=reports/results/confirm_gsm8k_fold_gguf.sha256
got=$(sha256sum "$OUT/fold.gguf" | cut -d' ' -f1)
if [[ -f "$SHA" && "$(cat "$SHA")" != "$got" ]]; then
    echo "error: $OUT/fold.gguf ($got) is not the fold the confirmation began on ($(cat "$SHA")): remove it and rerun to rebuild it from $FOLD" >&2
    exit 2
fi
[[ -f "$SHA" ]] || echo "$got" > "$SHA"
[[ "${1:-}" == fold ]] && exit 0

# the gated LoRA (the paper form's last-token edit as a plain LoRA, served with llama-server --lora), made as
# experiments/eval_table.py made the development table's gated-lora row: the last-token key of recipe
# zoo-qwen0.5b-to-1.5b-cot, layers 1.., alpha 0.1, the multiplier chosen without labels, gates fitted on 32 train
# prompts from offset 1000. Its LoRA GGUF is committed (GATED) so that the arm answers the same on any machine;
# a machine without it builds it. It joined the confirmation after its other arms had begun (compare --add-arms)
GATED=reports/results/confirm_gsm8k_gated
if [[ ! -f "$GATED/lora.gguf" ]]; then
    [[ -f "$OUT/gated/recipe/summary.json" ]] || "${CLI[@]}" run recipes/zoo-qwen0.5b-to-1.5b-cot.yaml "$OUT/gated/recipe"
    [[ -f "$OUT/gated/adapter/unlock.json" ]] || "${CLI[@]}" fold "$TARGET" --vectors "$OUT/gated/recipe/vectors.safetensors" \
        --layers 1--1 --mode gated-lora --alpha 0.1 --multiplier auto --gate-count 32 --gate-offset 1000 -o "$OUT/gated/adapter"
    [[ -f "$OUT/gated/lora.gguf" ]] || "${CLI[@]}" gguf "$OUT/gated/adapter" -o "$OUT/gated/lora.gguf"
    mkdir -p "$GATED"
    cp "$OUT/gated/adapter/unlock.json" "$GATED/unlock.json"
    cp "$OUT/gated/recipe/vectors.safetensors" "$GATED/vectors.safetensors"
    cp "$OUT/gated/lora.gguf" "$GATED/lora.gguf"
fi
[[ "${1:-}" == gated ]] && exit 0

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
# the gated LoRA joins a comparison begun without it (--add-arms, recorded in results.json's arms_added)
ADD=()
if [[ -f "$OUT/confirm/compare.json" ]] && ! grep -q '"name": "gated"' "$OUT/confirm/compare.json"; then ADD=(--add-arms); fi
[[ -f "$OUT/confirm/results.json" ]] || "${CLI[@]}" compare "$TARGET" "${ARMS[@]}" --arm "gated=lora:$GATED/lora.gguf" \
    --data builtin:gsm8k-confirm --max-new-tokens 256,512 --confirm "$CHOICE" "${ADD[@]}" -o "$OUT/confirm"
