#!/usr/bin/env bash
# One-shot GPU check: run it whenever a CUDA machine is available (about 8 minutes at most after the install).
#
#   bash scripts/gpu_check.sh [--no-install] [--cpu-smoke]
#
# Steps, each under its own timeout (seconds, in brackets), each recorded as pass / fail / timeout / skipped
# with its numbers:
#   install [300]       pip install -e ".[test]" when the project or its test extras do not import (--no-install:
#                       never; GPU_CHECK_INSTALL=1: always)
#   env [30]            torch, CUDA, GPU name, capability, bf16 and nccl support
#   train_fp32 [60]     the quickstart on CUDA for 64 steps (train_curriculum.py --device cuda)
#   train_bf16 [60]     the same under train.amp=bf16
#   ddp_nccl [45]       torchrun --nproc_per_node 1, an nccl process group, DDP steps and an all-reduce
#   bench_train [120]   scripts/bench.py --parts train (CIFAR-10 UNet: ours vs diffusers, fp32 and bf16, memory)
#   bench_ddim [45]     scripts/bench.py --parts ddim (sampling, ours vs a diffusers DDIMScheduler loop)
#   semistructured [45] 2:4 magnitude masks, fp16, DDIM sampling dense vs torch.sparse semi-structured
#                       (skipped below compute capability 8.0)
#   twoscale_quick [75] scripts/run_experiments.py configs/experiments/twoscale_modes.json --quick
#                       (the experiment runner trains on the CPU; this checks the grid end to end on that machine)
# Output ($OUT if set, else ./gpu_check_out): gpu_check.json (every step, status, seconds, numbers),
# gpu_check.md (a table for docs/benchmarks.md), steps/<step>.log and the bench JSON.
# --cpu-smoke: no GPU needed; runs env and a 2-step CPU training through the same machinery and marks the CUDA
# steps skipped (tests the script itself in seconds). Without CUDA and without --cpu-smoke it exits with 2.
set -u
cd "$(dirname "$0")/.."

INSTALL=${GPU_CHECK_INSTALL:-auto}
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$arg'; use --no-install, --cpu-smoke or --help" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
OUT_DIR=${OUT:-./gpu_check_out}
mkdir -p "$OUT_DIR/steps" || { echo "gpu_check.sh: cannot create output folder $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STEPS="$OUT_DIR/steps.jsonl"
: > "$STEPS"
GC=ddpm_curriculum.bench.gpu_check  # the Python steps and the report
export PY OUT_DIR GC

record() {  # record NAME STATUS RC WALL_S LIMIT_S NOTE: one line of steps.jsonl (numbers from steps/NAME.json)
  "$PY" - "$@" "$OUT_DIR" >> "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
name, status, rc, wall, limit, note, out = sys.argv[1:8]
numbers = Path(out, "steps", name + ".json")
rec = {"name": name, "status": status, "rc": int(rc), "wall_s": round(float(wall), 1), "limit_s": int(limit),
       "numbers": json.loads(numbers.read_text()) if numbers.exists() else {}}
if note:
    rec["note"] = note
print(json.dumps(rec))
EOF
}

step() {  # step NAME LIMIT_S CMD...: run CMD under a timeout, log to steps/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t0 t1 rc status note=""
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT_DIR/steps/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  if [ "$rc" -eq 0 ]; then status=pass
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; note="over the ${limit} s limit"
  else status=fail; note=$(grep -v '^\s*$' "$OUT_DIR/steps/$name.log" | tail -n 1 | cut -c1-300)
  fi
  record "$name" "$status" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "$limit" "$note"
  echo "[gpu_check] $name: $status ($(awk "BEGIN {printf \"%.1f\", $t1 - $t0}") s)"
}

skip() {  # skip NAME REASON
  record "$1" skipped 0 0 0 "$2"
  echo "[gpu_check] $1: skipped ($2)"
}

numbers() {  # numbers NAME HELPER_STEP ARGS...: write steps/NAME.json from a helper step
  "$PY" -m "$GC" "$2" "$OUT_DIR/steps/$1.json" "${@:3}"
}
export -f numbers

# --- install (optional) -------------------------------------------------------------------------------------
imports_ok() { "$PY" -c "import ddpm_curriculum, torch, diffusers, pytest" > /dev/null 2>&1; }
if [ "$INSTALL" = 1 ] || { [ "$INSTALL" = auto ] && ! imports_ok; }; then
  step install 300 "$PY" -m pip install -e ".[test]"
elif [ "$INSTALL" = 0 ]; then
  skip install "--no-install"
else
  skip install "already importable"
fi

# --- environment --------------------------------------------------------------------------------------------
step env 30 "$PY" -m "$GC" env "$OUT_DIR/steps/env.json"
cuda_ok() {  # from env.json: no second torch import
  "$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get('cuda_available') else 3)" \
    "$OUT_DIR/steps/env.json" > /dev/null 2>&1
}
if ! cuda_ok; then
  if [ "$SMOKE" = 0 ]; then
    "$PY" -m "$GC" report "$OUT_DIR" > /dev/null 2>&1
    echo "gpu_check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a GPU" \
         "machine, or pass --cpu-smoke to test the script here" >&2
    exit 2
  fi
fi

RUNS="$OUT_DIR/runs"
rm -rf "$RUNS"
export RUNS
if [ "$SMOKE" = 1 ]; then
  cat > "$OUT_DIR/tiny.json" <<'EOF'
{"dataset": {"name": "twoscale", "image_size": 8, "num_samples": 32, "k1": 2, "k2": 2},
 "diffusion": {"timesteps": 50},
 "model": {"hid_channels": 16, "ch_multipliers": [1, 2], "num_res_blocks": 1, "apply_attn": [false, false],
           "norm_groups": 8},
 "train": {"steps": 2, "batch_size": 8, "warmup": 1, "log_intv": 1, "num_samples": 0, "image_intv": 0,
           "chkpt_intv": 0},
 "eval": {"num_samples": 0}}
EOF
  train() {
    "$PY" train_curriculum.py --config "$OUT_DIR/tiny.json" --device cpu --no-progress --run-dir "$RUNS/$1" \
      && numbers "$1" run_metrics "$RUNS/$1"
  }
  export -f train
  step train_fp32 60 train train_fp32
  for s in train_bf16 ddp_nccl bench_train bench_ddim semistructured twoscale_quick; do skip "$s" "--cpu-smoke"; done
else
  train() {  # train NAME [--set ...]: 64 quickstart steps on CUDA, numbers from its metrics.jsonl
    local name=$1
    shift
    "$PY" train_curriculum.py --config configs/quickstart.json --device cuda --no-progress --run-dir "$RUNS/$name" \
      --stop-at-step 64 --set train.log_intv=16 "$@" && numbers "$name" run_metrics "$RUNS/$name"
  }
  export -f train
  step train_fp32 60 train train_fp32
  step train_bf16 60 train train_bf16 --set train.amp=bf16
  step ddp_nccl 45 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m ddpm_curriculum.bench.gpu_check ddp_nccl "$OUT_DIR/steps/ddp_nccl.json"
  bench() {  # bench NAME PARTS
    "$PY" scripts/bench.py --device cuda --parts "$2" --rounds 3 --steps 3 --json "$OUT_DIR/bench_$1.json" \
      && numbers "$1" bench_numbers "$OUT_DIR/bench_$1.json"
  }
  export -f bench
  step bench_train 120 bench bench_train train
  step bench_ddim 45 bench bench_ddim ddim
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.get_device_capability() >= (8, 0) else 3)"; then
    step semistructured 45 "$PY" -m "$GC" semistructured "$OUT_DIR/steps/semistructured.json"
  else
    skip semistructured "compute capability below 8.0"
  fi
  step twoscale_quick 75 "$PY" scripts/run_experiments.py configs/experiments/twoscale_modes.json --quick \
    --jobs 4 --out "$RUNS/twoscale_quick"
fi

"$PY" -m "$GC" report "$OUT_DIR"
echo "[gpu_check] wrote $OUT_DIR/gpu_check.json and $OUT_DIR/gpu_check.md"
