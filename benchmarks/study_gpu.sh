#!/usr/bin/env bash
# The default-setting MoE-versus-dense study (issue 25) on one GPU in about 5 minutes, as one prepared call.
#
#   MMOE_COMMIT=<sha> OUT=/path bash benchmarks/study_gpu.sh
#
# Steps, each under its own `timeout`, each leaving its log in $OUT even when a later one fails:
#   1. packages the GPU image lacks (jsonargparse, ...) from wheels in .whl/ (git-ignored) into .site/
#   2. the default synthetic data (data/synthetic, seed 0; skipped when already there)
#   3. benchmarks/moe_vs_dense.py --setting default: moe and its dense twin (equal active params), 3 seeds,
#      on the two-stage recipe (stage-0 tower per seed and shape, then the VLM), bf16-mixed, STUDY_JOBS runs
#      sharing the GPU at once, full test (1,500 q) and held-out (900 q) splits
#   4. results: a tarball of benchmarks/results/<study>, summary.json and table.md copied to $OUT
# Files back in $OUT (8): steps.log, study.log, data.log, install.log, gpu_util.csv, summary.json, table.md,
# study_results.tgz. The last stdout line is the study's JSON summary (paired held-out/test deltas vs dense).
#
# Knobs (environment): STUDY_VARIANTS ("moe dense"; add flat_routing / dense_total if time allows), STUDY_SEEDS
# ("0 1 2"; "0 1" for a shorter run), STUDY_JOBS (6), STUDY_TIMEOUT (seconds for step 3, 530: run the whole
# script under a 600 s limit), PY (python3), STUDY_NAME, MMOE_COMMIT (the commit recorded in summary.json).
# Rehearsal on CPU (tiny step counts, small data, same code path): STUDY_REHEARSAL=1 bash benchmarks/study_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/study_out}
PY=${PY:-python3}
REHEARSAL=${STUDY_REHEARSAL:-0}
VARIANTS=${STUDY_VARIANTS:-moe dense}
SEEDS=${STUDY_SEEDS:-0 1 2}
JOBS=${STUDY_JOBS:-6}
STUDY_TIMEOUT=${STUDY_TIMEOUT:-530}
mkdir -p "$OUT"
export PYTHONPATH="$REPO:$REPO/.site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
log() { echo "[study_gpu +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }

if [ "$REHEARSAL" = 1 ]; then
    DATA=data/synthetic_rehearsal
    GEN_ARGS=(--n-train 64 --n-val 16 --n-test 16 --n-heldout 16)
    STUDY_ARGS=(--accelerator cpu --steps 2 --stage0-steps 2 --eval-limit 8)
    NAME=${STUDY_NAME:-moe_vs_dense_default_rehearsal}
else
    DATA=data/synthetic
    GEN_ARGS=()
    STUDY_ARGS=(--accelerator gpu --precision bf16-mixed)
    NAME=${STUDY_NAME:-moe_vs_dense_default_gpu}
fi
RESULTS=benchmarks/results/$NAME
log "start: variants [$VARIANTS] seeds [$SEEDS] jobs $JOBS data $DATA out $RESULTS rehearsal=$REHEARSAL"

# 1. packages the GPU image lacks
if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout 120 "$PY" -m pip install --no-index --no-deps --target .site .whl/*.whl >"$OUT/install.log" 2>&1
        log "install from .whl: rc=$?"
    else
        log "jsonargparse missing and no .whl/ folder: the study cannot run"
    fi
else
    echo "all present" >"$OUT/install.log"
fi

# 2. data
if [ -f "$DATA/meta.json" ] && [ -f "$DATA/tokenizer.json" ]; then
    log "data: $DATA already there"
else
    timeout 300 "$PY" data_scripts/make_synthetic.py --out "$DATA" --seed 0 --overwrite --workers 8 "${GEN_ARGS[@]}" \
        >"$OUT/data.log" 2>&1
    log "data: rc=$? $(tail -1 "$OUT/data.log" | cut -c1-160)"
fi

# 3. the study (GPU utilisation sampled alongside)
UTIL_PID=
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 >"$OUT/gpu_util.csv" 2>&1 &
    UTIL_PID=$!
fi
# shellcheck disable=SC2086  # VARIANTS and SEEDS are word lists
timeout "$STUDY_TIMEOUT" "$PY" benchmarks/moe_vs_dense.py --setting default --data "$DATA" --variants $VARIANTS \
    --seeds $SEEDS --jobs "$JOBS" --out "$RESULTS" "${STUDY_ARGS[@]}" >"$OUT/study.log" 2>&1
RC=$?
log "study: rc=$RC"
if [ -n "$UTIL_PID" ]; then kill "$UTIL_PID" 2>/dev/null; fi
if [ "$RC" != 0 ] && [ -f "$RESULTS/results.json" ]; then  # cut short: summarise the runs that finished
    timeout 60 "$PY" benchmarks/moe_vs_dense.py --setting default --data "$DATA" --variants $VARIANTS \
        --seeds $SEEDS --out "$RESULTS" --summary-only "${STUDY_ARGS[@]}" >>"$OUT/study.log" 2>&1
    log "summary of the finished runs: rc=$?"
fi

# 4. results
for f in summary.json table.md; do
    if [ -f "$RESULTS/$f" ]; then cp "$RESULTS/$f" "$OUT/$f"; fi
done
tar czf "$OUT/study_results.tgz" "$RESULTS" 2>>"$OUT/steps.log"
log "done in $(( $(date +%s) - T0 )) s"
tail -n 1 "$OUT/study.log"
