#!/usr/bin/env bash
# One device call: the NCCL parity tests, then the scaling bench (one run.py invocation over the
# world sizes), with a stage-3 step profiled at the largest W. Everything lands in $OUT:
#
#   results.tgz           every file below plus per-W NAME_wW.json/.md/.log, traces, parity report
#   NAME_scaling.md/.json the combined table (tok/s per GPU, efficiency, peak memory, ratios)
#   nccl_parity.log/.json pytest output and the measured parity errors
#   NAME_*.profile.json   the profiled step's summary (NCCL time hidden behind compute)
#
# (at most 8 files come back from a device call, so the rest travels inside results.tgz, which is
# rewritten every 45 s and at the end: whatever finished comes back even if the call is cut off).
#
#   bash bench/scaling.sh --world_sizes 2,4 --modes hfzero-s2,hfzero-s3,ds-z2,ds-z3,fsdp2 \
#       --max_steps 8 --tests 2,4 --budget 570 --commit "$(git rev-parse HEAD)"
#
# Options (default):
#   --world_sizes LIST   bench world sizes, run in this order (2,4); W above the GPU count is skipped
#   --modes LIST         bench modes (hfzero-s2,hfzero-s3,ds-z2,ds-z3,fsdp2)
#   --preset NAME        job.py preset (7b)
#   --seq_len N          (2048)
#   --micro_batch N      per GPU (2)
#   --max_steps N        (8)    --warmup_steps N (3)
#   --extra STR          Trainer flags for every mode ("--gradient_checkpointing"; fsdp2 gets FSDP's own)
#   --init_device D      where job.py builds the model: cuda (fast) or cpu (cuda)
#   --profile_step N     optimizer step profiled on rank 0 at the largest W, 0 = none (6)
#   --profile_modes LIST (hfzero-s3)
#   --tests LIST         NCCL parity world sizes, or none (2,4)
#   --test_timeout S     seconds for the parity tests (240)
#   --timeout S          seconds per bench mode (300)
#   --min_mode_s S       do not start a bench mode with less time left (90)
#   --budget S           seconds for this whole script (570: a 600 s call minus margin)
#   --name NAME          results stem (h100_<preset>)
#   --commit SHA         git commit recorded in the results (the device copy has no .git)
set -uo pipefail
START=$SECONDS

WORLD_SIZES=2,4
MODES=hfzero-s2,hfzero-s3,ds-z2,ds-z3,fsdp2
PRESET=7b
SEQ_LEN=2048
MICRO_BATCH=2
MAX_STEPS=8
WARMUP_STEPS=3
EXTRA="--gradient_checkpointing"
INIT_DEVICE=cuda
PROFILE_STEP=6
PROFILE_MODES=hfzero-s3
TESTS=2,4
TEST_TIMEOUT=240
TIMEOUT=300
MIN_MODE_S=90
BUDGET=570
NAME=
COMMIT=
while [ $# -gt 0 ]; do
    case "$1" in
        --world_sizes) WORLD_SIZES=$2 ;;
        --modes) MODES=$2 ;;
        --preset) PRESET=$2 ;;
        --seq_len) SEQ_LEN=$2 ;;
        --micro_batch) MICRO_BATCH=$2 ;;
        --max_steps) MAX_STEPS=$2 ;;
        --warmup_steps) WARMUP_STEPS=$2 ;;
        --extra) EXTRA=$2 ;;
        --init_device) INIT_DEVICE=$2 ;;
        --profile_step) PROFILE_STEP=$2 ;;
        --profile_modes) PROFILE_MODES=$2 ;;
        --tests) TESTS=$2 ;;
        --test_timeout) TEST_TIMEOUT=$2 ;;
        --timeout) TIMEOUT=$2 ;;
        --min_mode_s) MIN_MODE_S=$2 ;;
        --budget) BUDGET=$2 ;;
        --name) NAME=$2 ;;
        --commit) COMMIT=$2 ;;
        *) echo "scaling.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift 2 || { echo "scaling.sh: $1 needs a value" >&2; exit 2; }
done
NAME=${NAME:-h100_${PRESET}}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/hf_zero_scaling_out}
WORK=/tmp/hf_zero_scaling_work
cd "$(dirname "$0")/.." || exit 2
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
log() { echo "[scaling.sh +$((SECONDS - START))s] $*"; }
# $1: temporary name; the background packer and the final pack never share one, and mv is atomic.
pack() { tar -czf "$OUT/$1" -C "$WORK" . 2>/dev/null && mv -f "$OUT/$1" "$OUT/results.tgz"; }

# DeepSpeed wheels carried in .whl (bench/README.md); the image's 9.0a arch breaks DeepSpeed's op builder.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || log "pip install of .whl failed: ds-* modes will fail"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent machines (KINDS.md); set here too in case a caller cleared them.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
"$PY" -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count())'
nvidia-smi -L 2>/dev/null | tee "$WORK/gpus.txt"

# Output to /dev/null: a sleep left behind when the packer is killed must not hold our stdout open.
(while sleep 45; do pack results.tgz.bg; done) >/dev/null 2>&1 &
PACKER=$!
trap 'kill $PACKER 2>/dev/null' EXIT

# 1. NCCL parity tests (tests/gpu), W from --tests.
if [ "$TESTS" != none ]; then
    log "NCCL parity tests at W = $TESTS"
    HF_ZERO_PARITY_WORLDS=$TESTS HF_ZERO_PARITY_REPORT="$WORK/nccl_parity.json" \
        timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$WORK/nccl_parity.log"
    log "parity tests exit $?"
    pack results.tgz.fg
fi

# 2. Scaling bench: one run.py invocation over the world sizes, 25 s kept for packing.
LEFT=$((BUDGET - (SECONDS - START) - 25))
log "bench at W = $WORLD_SIZES, modes $MODES, ${LEFT}s budget"
PROFILE_ARGS=()
if [ "$PROFILE_STEP" != 0 ]; then PROFILE_ARGS=(--profile_step "$PROFILE_STEP" --profile_modes "$PROFILE_MODES"); fi
COMMIT_ARGS=()
if [ -n "$COMMIT" ]; then COMMIT_ARGS=(--git_commit "$COMMIT"); fi
"$PY" bench/run.py --preset "$PRESET" --world_sizes "$WORLD_SIZES" --modes "$MODES" --seq_len "$SEQ_LEN" \
    --micro_batch "$MICRO_BATCH" --max_steps "$MAX_STEPS" --warmup_steps "$WARMUP_STEPS" --extra="$EXTRA" \
    --init_device "$INIT_DEVICE" --timeout "$TIMEOUT" --exit_grace 20 --budget_s "$LEFT" --min_mode_s "$MIN_MODE_S" \
    --name "$NAME" --results_dir "$WORK" "${PROFILE_ARGS[@]}" "${COMMIT_ARGS[@]}"
log "bench exit $?"

kill $PACKER 2>/dev/null
pack results.tgz.fg
rm -f "$OUT/results.tgz.bg"  # a packer tar cut off mid-write (the file is unlinked, the tar harmless)
cp -f "$WORK/${NAME}_scaling.md" "$WORK/${NAME}_scaling.json" "$OUT/" 2>/dev/null
cp -f "$WORK/nccl_parity.log" "$WORK/nccl_parity.json" "$OUT/" 2>/dev/null
for f in "$WORK"/*.profile.json; do [ -e "$f" ] && cp -f "$f" "$OUT/" && break; done
for f in "$WORK"/*.profile.json; do
    [ -e "$f" ] && "$PY" -c 'import json,sys; print(sys.argv[1], "\n ", json.load(open(sys.argv[1]))["note"])' "$f"
done
[ -e "$WORK/nccl_parity.log" ] && tail -n 3 "$WORK/nccl_parity.log"
log "done; $OUT: $(ls "$OUT" | tr '\n' ' ')"
