#!/usr/bin/env bash
# One prepared GPU call for issue 23 (MoE execution on GPU): every step under its own `timeout`, each step's
# log in $OUT/<step>.log and its final JSON line (plus exit code and seconds) appended to $OUT/summary.jsonl,
# so a step that fails or overruns leaves the others' results. ~5-6 minutes on one H200 for the default steps.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine (python3 there; PY to override)
#   GPU_CHECK_REHEARSE=1 bash benchmarks/gpu_check.sh     # CPU rehearsal: same steps, tiny sizes
#   GPU_CHECK_STEPS="correctness moe_profile model_step_compiled" bash benchmarks/gpu_check.sh   # chosen steps
#
# Steps (GPU_CHECK_STEPS, in this order; default: correctness moe_layer model_step train):
#   correctness          bf16 grouped_mm == loop == dense, no host sync at any MoE site, fullgraph inductor
#                        compile of a MoE block == eager without recompiles, CUDA-graph decode == eager
#   moe_layer            the issue's MoE FFN shapes against dense and transformers' Mixtral
#   model_step           configs/model/mid.yaml, bf16 autocast, fused AdamW, MFU
#   moe_profile          where the MoE training step's time goes: op and kernel tables, eager and compiled (~2 min)
#   model_step_compiled  model_step with every block compiled (fullgraph; model.compile: true) (~2-3 min)
#   train                `make train` recipe with --trainer.accelerator gpu --trainer.precision bf16-mixed, with
#                        what is left of the budget; needs jsonargparse: run benchmarks/gpu_wheels.sh beforehand
#                        where a package index is reachable and carry .whl along.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
REHEARSE=${GPU_CHECK_REHEARSE:-0}
BUDGET=${GPU_CHECK_BUDGET:-570}  # seconds for all steps together (GPU mode)
STEPS=" ${GPU_CHECK_STEPS:-correctness moe_layer model_step train} "
for s in $STEPS; do
  case $s in correctness|moe_layer|model_step|moe_profile|model_step_compiled|train) ;;
    *) echo "GPU_CHECK_STEPS: unknown step '$s' (correctness moe_layer model_step moe_profile" \
         "model_step_compiled train)" >&2; exit 2 ;;
  esac
done
if [ -z "${PY:-}" ]; then
  if [ "$REHEARSE" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import jsonargparse" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target .site .whl/*.whl
fi
[ -d .site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.site"
SUMMARY="$OUT/summary.jsonl"
: > "$SUMMARY"
T0=$(date +%s)

step() {  # step NAME SECONDS CMD...: run CMD if NAME is in GPU_CHECK_STEPS
  local name=$1 limit=$2; shift 2
  local start rc line
  [[ "$STEPS" == *" $name "* ]] || return 0
  start=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  line=$(grep '^{' "$OUT/$name.log" | tail -n 1)
  [ -n "$line" ] || line='null'
  printf '{"step": "%s", "rc": %d, "seconds": %d, "result": %s}\n' "$name" "$rc" "$(( $(date +%s) - start ))" \
    "$line" >> "$SUMMARY"
  tail -n 1 "$SUMMARY"
}

if [ "$REHEARSE" = 1 ]; then
  # tiny-size records must not overwrite the measured ones in benchmarks/results/
  export MMOE_BENCH_RESULTS=${MMOE_BENCH_RESULTS:-$OUT/results}
  step correctness 900 "$PY" benchmarks/gpu_correctness.py --device cpu --size tiny
  step moe_layer 900 "$PY" benchmarks/moe_layer.py --gpu-mode --device cpu --dtype bf16 --size tiny
  step model_step 600 "$PY" benchmarks/model_step.py --gpu-mode --device cpu --batch 2 --seq 40 --repeats 2 \
    --warmup 1
  step moe_profile 600 "$PY" benchmarks/moe_profile.py --device cpu --dtype fp32 --size tiny
  step model_step_compiled 900 "$PY" benchmarks/model_step.py --gpu-mode --device cpu --batch 2 --seq 40 \
    --repeats 2 --warmup 1 --compile
  step train 900 "$PY" -m mmoe.training.main_job --config configs/default.yaml --data data/synthetic \
    --run-dir runs/gpu_check_train --vision-pretrain none --eval-limit 8 -- --trainer.max_steps=2 \
    --trainer.val_check_interval=2 --trainer.limit_val_batches=1
else
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/nvidia_smi.log" 2>&1
  step correctness 110 "$PY" benchmarks/gpu_correctness.py --device cuda
  step moe_layer 130 "$PY" benchmarks/moe_layer.py --device cuda --dtype bf16
  step model_step 130 "$PY" benchmarks/model_step.py --device cuda --config configs/model/mid.yaml --batch 8 \
    --seq 1024 --repeats 5 --warmup 3
  step moe_profile 150 "$PY" benchmarks/moe_profile.py --device cuda --dtype bf16
  step model_step_compiled 200 "$PY" benchmarks/model_step.py --device cuda --config configs/model/mid.yaml \
    --batch 8 --seq 1024 --repeats 5 --warmup 3 --compile
  # make train last, with what is left of the budget (a run(...) call allows 600 s in all)
  left=$(( BUDGET - ($(date +%s) - T0) )); [ "$left" -gt 300 ] && left=300; [ "$left" -lt 30 ] && left=30
  step train "$left" "$PY" -m mmoe.training.main_job --config configs/default.yaml --data data/synthetic \
    --run-dir runs/gpu_check_train -- --trainer.accelerator=gpu --trainer.precision=bf16-mixed
fi
echo "== total $(( $(date +%s) - T0 ))s; results in $SUMMARY"
cat "$SUMMARY"
