#!/usr/bin/env bash
# The from-scratch PRIOR-vs-NTP experiment on the demo corpus (the LVLM's LM, and the ViT, trained
# from random init, a regime the paper does not use; the paper's regimes are
# experiments/run_paper_regimes.py): the shared stages (corpus, tokenizer, reference LM, weights),
# then LVLM runs over backbone (encoder_free, visual_encoder) x loss (ntp, prior) x seeds, each
# evaluated every 75 steps, then experiments/results/from_scratch/ (tables and plots).
#
#   bash experiments/run_prior_vs_ntp.sh                 # 12 runs one after the other
#   PARALLEL=4 TRAINER=gpu bash experiments/run_prior_vs_ntp.sh   # 4 sweeps side by side
#
# Environment: SEEDS (default 0,1,2), PARALLEL (1 or 4), TRAINER (a trainer preset, default cpu),
# PY (the Python to use, default .venv/bin/python), RUNS (run folder, default logs/prior_vs_ntp),
# CORPUS and REF_STEPS (default corpus, 600 steps), EXTRA (overrides for the reference LM and
# every LVLM run, e.g. "data.num_workers=3"), RESULTS (default experiments/results/from_scratch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0,1,2}
PARALLEL=${PARALLEL:-1}
TRAINER=${TRAINER:-cpu}
RUNS=${RUNS:-logs/prior_vs_ntp}
CORPUS=${CORPUS:-default}
REF_STEPS=${REF_STEPS:-600}
RESULTS=${RESULTS:-experiments/results/from_scratch}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

"$PY" -m prior.cli.demo_data "corpus=$CORPUS"
"$PY" -m prior.cli.tokenizer
"$PY" -m prior.cli.train_ref "trainer=$TRAINER" trainer.precision=32-true logger=csv \
    "trainer.max_steps=$REF_STEPS" "trainer.val_check_interval=$REF_STEPS" "${EXTRA_ARGS[@]}"
"$PY" -m prior.cli.weights

mkdir -p "$RUNS"
pids=()
for backbone in encoder_free visual_encoder; do
  for loss in ntp prior; do
    cmd=("$PY" -m prior.cli.train_lvlm -m experiment=prior_vs_ntp "backbone=$backbone" "loss=$loss"
         "seed=$SEEDS" "trainer=$TRAINER" trainer.precision=32-true "hydra.sweep.dir=$RUNS/$backbone-$loss"
         "${EXTRA_ARGS[@]}")
    if [ "$PARALLEL" -gt 1 ]; then
      "${cmd[@]}" > "$RUNS/$backbone-$loss.log" 2>&1 &
      pids+=($!)
    else
      "${cmd[@]}"
    fi
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done  # fails if any sweep failed

"$PY" experiments/aggregate.py "$RUNS" --out "$RESULTS"
