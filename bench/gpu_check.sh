#!/usr/bin/env bash
# One GPU check of the whole project, sized for a short lease on one H100/H200 (~6.5 minutes),
# the most valuable parts first so that a run cut short still pays:
#   0. versions (nvidia-smi, torch, CUDA, triton, liger-kernel)           -> $OUT/env.md
#   1. the tests that need CUDA: pytest tests/kernels                    -> $OUT/pytest_kernels.txt
#   2. bench_linear_ce_kl on cuda: bf16, H 4096, methods floor, ours, eager, liger; workload
#      mixed at N {4096, 16384} x V {32000, 128256}, then ce at N 16384  -> $OUT/linear_ce_kl_h200.md
#   3. bench_unlearn_step: one SKU stage-1 step, LLaMA-2-7B shape        -> $OUT/unlearn_step_h200.md
#   4. if time is left: mixed_frozen_head at N 16384, V 128256, then torch.compile at one shape
#      (appended to 2's file)
# Sized from the first H200 run (bench/results/gpu_check_h200.md): each bench row is its own
# process, about 8 s there (start-up, CUDA init, inputs, 1 + 5 runs); pytest took 49 s and the
# 7B step 43 s.
# Everything is logged to $OUT/gpu_check.log. Each part runs under `timeout` and the whole run
# under a deadline (GPU_CHECK_BUDGET seconds, default 395): a part that no longer fits is skipped
# and says so. Safe to rerun (results are overwritten).
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   OUT=/tmp/x bash bench/gpu_check.sh --dry-run     # here, on CPU: the same steps, tiny shapes
#
# Peers: liger-kernel is installed from wheels in .cache/gpuwheels when there are any
# (`pip download --no-deps -d .cache/gpuwheels liger-kernel` beforehand; carry that folder).
set -u -o pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-395}
START=$(date +%s)
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
if ((DRY)); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    unset TRITON_INTERPRET
fi

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# part NAME LIMIT MIN CMD...: run CMD under min(LIMIT, time left), if at least MIN is left
# (else it returns 200: skipped).
part() {
    local name=$1 limit=$2 min=$3 rest t0 rc
    shift 3
    rest=$(left)
    if ((rest < min)); then
        log "== $name: SKIPPED, ${rest}s left of the ${BUDGET}s budget (needs ${min}s)"
        return 200
    fi
    ((limit > rest)) && limit=$rest
    log "== $name: start at +$(($(date +%s) - START))s, limit ${limit}s: $*"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    log "== $name: rc $rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)') in $(($(date +%s) - t0))s"
    return "$rc"
}

# ---------------------------------------------------------------- 0. versions, peers
if compgen -G ".cache/gpuwheels/*.whl" >/dev/null; then
    part "install peers" 60 10 "$PY" -m pip install -q --no-deps --no-index --no-compile \
        --upgrade --target "$SITE" .cache/gpuwheels/*.whl
fi
{
    echo "# GPU check environment"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.limit \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    nvidia-smi 2>/dev/null | grep -m1 "CUDA Version" || true
    timeout 120 "$PY" - <<'EOF' 2>&1
import platform
from importlib.metadata import version, PackageNotFoundError
import torch
import torch.nn.functional as F
print("python", platform.python_version())
for pkg in ("torch", "triton", "transformers", "peft", "liger-kernel"):
    try:
        print(pkg, version(pkg))
    except PackageNotFoundError:
        print(pkg, "not installed")
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
print("F.linear_cross_entropy in this torch:", hasattr(F, "linear_cross_entropy"))
EOF
    echo '```'
} >"$OUT/env.md"
tee -a "$LOG" <"$OUT/env.md"

# ---------------------------------------------------------------- 1. the tests that need CUDA
# tests/kernels holds every test that skips without CUDA (bf16 Triton vs float64, GPU memory
# far below the full logits); the sm_90 SASS spill check runs there too.
# pytest-xdist (in the GPU image) spreads the Triton compiles over 4 processes; if it breaks
# (rc >= 2, not a timeout) the tests run again serially.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
PYTEST=("$PY" -m pytest -q -rs -ra -p no:cacheprovider tests/kernels)
part "pytest tests/kernels" 120 30 "${PYTEST[@]}" "${XDIST[@]}" >"$OUT/pytest_kernels.txt"
rc=$?
cat "$OUT/pytest_kernels.txt"
if ((${#XDIST[@]} && rc >= 2 && rc != 124 && rc != 137 && rc != 200)); then
    part "pytest tests/kernels, serial" 150 30 "${PYTEST[@]}" >>"$OUT/pytest_kernels.txt"
    tail -n 30 "$OUT/pytest_kernels.txt"
fi

# ---------------------------------------------------------------- 2. linear_ce_kl bench
BENCH=$OUT/linear_ce_kl_h200.md
: >"$BENCH"
TMP=$(mktemp -d)
# bench NAME LIMIT MIN ARGS...: one bench invocation; its table is appended to $BENCH, or, if it
# was cut off before writing one, the rows it had measured (one line each, from its stderr).
bench() {
    local name=$1 limit=$2 min=$3 rc
    shift 3
    if ((DRY)); then  # the last of a repeated option wins: tiny fp32 shapes on the CPU
        set -- "$@" --device cpu --dtype fp32 --h 64 --n 256 --v 1000 --repeats 1 --rounds 1 \
            --timeout 120
    fi
    part "bench $name" "$limit" "$min" "$PY" bench/bench_linear_ce_kl.py "$@" --force \
        --out "$TMP/$name.md" | tee "$TMP/$name.log"
    rc=${PIPESTATUS[0]}
    if [[ -s "$TMP/$name.md" ]]; then
        { echo "## $name"; echo; cat "$TMP/$name.md"; echo; } >>"$BENCH"
    elif ((rc == 200)); then
        printf '## %s: skipped, out of time\n\n' "$name" >>"$BENCH"
    else
        { echo "## $name: no table (rc $rc); the rows measured before it stopped:"; echo
          echo '```'; grep -E '^[a-z_]+ N=[0-9]+ V=[0-9]+ ' "$TMP/$name.log"; echo '```'
          echo; } >>"$BENCH"
    fi
}
CUDA_ARGS=(--device cuda --dtype bf16 --h 4096 --repeats 5 --warmup 1 --timeout 90)
bench mixed 160 60 --n 4096 16384 --v 32000 128256 "${CUDA_ARGS[@]}" --workloads mixed \
    --methods floor ours eager liger
bench ce 90 45 --n 16384 --v 32000 128256 "${CUDA_ARGS[@]}" --workloads ce \
    --methods floor ours eager liger

# ---------------------------------------------------------------- 3. SKU stage-1 step, 7B shape
UNLEARN=(--steps 3 --out "$OUT/unlearn_step_h200.md")
((DRY)) && UNLEARN=(--tiny --steps 1 --out "$OUT/unlearn_step_h200.md")
part "unlearn step" 100 50 "$PY" bench/bench_unlearn_step.py "${UNLEARN[@]}"

# ---------------------------------------------------------------- 4. if time is left
bench frozen_head 45 30 --n 16384 --v 128256 "${CUDA_ARGS[@]}" --workloads mixed_frozen_head \
    --methods floor ours eager
bench compile 60 35 --n 4096 --v 32000 "${CUDA_ARGS[@]}" \
    --workloads mixed --methods floor ours compile

rm -rf "$TMP"
log "== done in $(($(date +%s) - START))s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
