#!/usr/bin/env bash
# Everything a lent-GPU visit does, in one call (../shared/GPU.md), most valuable stage first,
# each under an absolute deadline, the results copied to $OUT after every stage (a kill at the
# device limit keeps what was measured).
#
# Usage, from the repository root:
#   bash bench/gpu_visit.sh [STAGE ...]
# Stages, in value order (default: all):
#   tests     the GPU-marked kernel tests (pytest -m gpu: tests/test_cuda.py, tests/test_triton.py)
#             on CUDA tensors
#   check     large-N bf16 agreement of each compiled backend with the torch backend
#   headline  clip_loss and siglip_loss fwd+bwd, bf16, N=65536, D=768, every backend and peer,
#             each Triton gradient pass forced too, with the dense bf16 matmul ceiling of the run
#   second    the losses with a second stream (#16), bf16, N=32768, D=768, Triton and peers: four
#             Matryoshka prefixes against one full-width loss (info_nce_mnrl), distillation, the
#             guide mask
#   sweep     the fused/chunked crossover: the same losses over N in {65536, 262144} x D in
#             {256, 512, 768, 1024}, Triton with each pass forced and CUDA
#   maxbatch  the largest N each implementation fits
#   sanitize  compute-sanitizer memcheck over one small call of every kernel mode, per GPU backend
#             (bench/sanitize.py); skipped where the tool is missing or refuses the device
#   quick     the README's main job on the GPU
# The build (install fastcl, the CUDA extension compiled for the card) runs first whenever
# fastcl._C is not importable; a build without the extension fails the visit loudly.
# Stages not reached by the end are written to $OUT/next_stages.txt: pass them to a second call.
#
# Environment:
#   OUT                where results go (default bench/results/visit-<date>): visit.log,
#                      summary.txt, results.tar.gz (unpack: tar xzf results.tar.gz -C bench/results),
#                      next_stages.txt; at most 8 files come back from a device call
#   VISIT_BUDGET_S     seconds for the whole visit (default 540: one device call runs <= 600 s);
#                      each stage's deadline is a fixed share of it (printed at the start)
#   FASTCL_GIT_COMMIT  the commit measured, recorded in the results when .git did not travel
#   FASTCL_CUDA_ARCH   architectures for the CUDA extension (default 90)
#   CUDA_HOME          default: the toolkit of the nvcc on PATH, else /usr/local/cuda
#   PYTHON             interpreter (default python3)
#   VISIT_SMOKE=1      on a machine without a GPU: every stage's plumbing at tiny sizes on the
#                      CPU (tests collected, bench rows, archive), so no device minute goes to a typo
#
# Wheels: .whl/*.whl (carried by the device call; bench/fetch_wheels.sh downloads them) are
# installed with --no-deps into /tmp/site first.
# Exit status: 0 when every stage that ran passed, 1 otherwise; a GPU-less machine exits 0.

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${VISIT_BUDGET_S:-540}
DATE=$(date -u +%Y-%m-%d)
OUT=${OUT:-bench/results/visit-$DATE}
ALL_STAGES="tests check headline second sweep maxbatch sanitize quick"
STAGES=${*:-$ALL_STAGES}
mkdir -p "$OUT"
LOG="$OUT/visit.log"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=0
SMOKE=0
RES=${VISIT_RESULTS:-$(mktemp -d /tmp/fastcl-results.XXXX)}
mkdir -p "$RES"

# Deadlines: percent of the budget at which each stage must have ended.
declare -A END_PCT=([tests]=36 [check]=46 [headline]=64 [second]=72 [sweep]=86 [maxbatch]=91 [sanitize]=96
                   [quick]=98)

note() { echo "$*" | tee -a "$SUMMARY"; }
deadline() { echo $((BUDGET * ${END_PCT[$1]} / 100)); }
left_for() { echo $(($(deadline "$1") - SECONDS)); }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

publish() {
    # the results so far, in at most 8 files: refreshed after every stage
    tar czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null
    echo "$PENDING" | xargs -n1 2>/dev/null | tr '\n' ' ' >"$OUT/next_stages.txt"
}

setup() {
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        echo "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        note "no CUDA device visible: GPU stages skipped ($STAGES)"
        [ "${VISIT_SMOKE:-0}" = 1 ] || return 1
        SMOKE=1
        note "VISIT_SMOKE=1: the stages' plumbing at tiny sizes on the CPU"
        return 0
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 \
        | tee -a "$SUMMARY"
    if $PY -c "import fastcl._C" 2>/dev/null; then
        note "build: fastcl._C already importable"
    else
        local nvcc
        nvcc=$(command -v nvcc || true)
        export CUDA_HOME=${CUDA_HOME:-$( [ -n "$nvcc" ] && dirname "$(dirname "$nvcc")" || echo /usr/local/cuda)}
        export FASTCL_CUDA_ARCH=${FASTCL_CUDA_ARCH:-90} FASTCL_BUILD_CUDA=require
        echo "== building fastcl (CUDA_HOME=$CUDA_HOME, FASTCL_CUDA_ARCH=$FASTCL_CUDA_ARCH)"
        if ! MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
            || ! $PY -c "import fastcl._C"; then
            note "BUILD FAILED: the CUDA extension did not build (see visit.log); CUDA backend rows will fail"
            FAILED=1
        fi
    fi
    $PY -c "import fastcl, json; print('build_info', json.dumps(fastcl.build_info()))" 2>&1 | tee -a "$SUMMARY"
    return 0
}

# run a stage's command line (a string) under its deadline; record rc and the seconds it took
stage() {
    local name=$1 cmd=$2 t0=$SECONDS budget rc
    budget=$(left_for "$name")
    if [ "$budget" -lt 10 ]; then
        note "stage $name: not reached (deadline $(deadline "$name") s passed)"
        return
    fi
    echo "== stage $name (deadline $(deadline "$name") s, ${budget} s left): $cmd"
    timeout --kill-after=10 "$budget" bash -o pipefail -c "$cmd"
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "stage $name: cut at its deadline after $((SECONDS - t0)) s"
    else
        note "stage $name: rc=$rc in $((SECONDS - t0)) s"
    fi
    [ "$rc" = 0 ] || FAILED=1
    PENDING=${PENDING/$name/}
    publish
}

tests_cmd() {
    # the compiled kernels only: Triton's interpreter must never run on the visit machine (it
    # crashes with numpy >= 2.4); smoke mode only collects the tests
    # the compiled kernels' variants compile in parallel where pytest-xdist is installed
    local dev=cuda extra=""
    [ "$SMOKE" = 1 ] && dev=cpu extra=--collect-only
    [ "$SMOKE" = 1 ] || ! $PY -c "import xdist" 2>/dev/null || extra="-n 8"
    echo "FASTCL_TEST_DEVICE=$dev FASTCL_TEST_BACKENDS=triton,cuda TRITON_INTERPRET=0 $PY -m pytest" \
        "tests -m gpu -q --maxfail=25 -p no:cacheprovider $extra" \
        "2>&1 | tee $RES/gpu_tests.log | tail -n 40"
}

sanitize_cmd() {
    if [ "$SMOKE" = 1 ]; then
        echo "$PY -m bench.sanitize --backend torch --device cpu 2>&1 | tee $RES/sanitize.log"
        return
    fi
    # each backend under memcheck; a tool that cannot instrument this device is a skip, not a failure
    echo "if ! command -v compute-sanitizer >/dev/null; then echo 'compute-sanitizer not on PATH: skipped'; exit 0; fi;" \
        "rc=0; for b in cuda triton; do" \
        "compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m bench.sanitize --backend \$b" \
        ">$RES/sanitize_\$b.log 2>&1; r=\$?; tail -n 3 $RES/sanitize_\$b.log;" \
        "if [ \$r != 0 ] && grep -qiE 'not supported|unsupported device|no supported device' $RES/sanitize_\$b.log;" \
        "then echo \"memcheck \$b: the tool refused the device: skipped\"; elif [ \$r != 0 ]; then rc=1;" \
        "echo \"memcheck \$b: FAILED\"; else echo \"memcheck \$b: clean\"; fi; done; exit \$rc"
}

bench_cmd() {
    # $1: headline|second|sweep|maxbatch|quick -> the bench command line (tiny sizes in smoke mode)
    local tiny="--target-s 0.05 --min-reps 2 --threads 1" args
    case "$1:$SMOKE" in
        headline:0) args="full --tag headline --losses clip_loss siglip_loss --n 65536 --d 768 --dtypes bfloat16
                          --modes fwd+bwd --backends triton cuda triton:fused triton:chunked --row-timeout 90" ;;
        second:0) args="full --tag second --losses info_nce_mnrl info_nce_matryoshka distill_clip_loss info_nce_guided
                        --n 32768 --d 768 --dtypes bfloat16 --modes fwd+bwd --backends triton --row-timeout 60" ;;
        sweep:0) args="full --tag sweep --losses clip_loss siglip_loss --n 65536 262144 --d 256 512 768 1024
                       --dtypes bfloat16 --modes fwd+bwd --backends triton:fused triton:chunked cuda --peers ''
                       --row-timeout 60" ;;
        maxbatch:0) args="maxbatch --backends auto --peers naive open_clip inf_cl --row-timeout 120" ;;
        quick:0) args="quick" ;;
        headline:1) args="full --tag headline --losses clip_loss siglip_loss --n 64 --d 16 --peers naive $tiny" ;;
        second:1) args="full --tag second --losses info_nce_mnrl info_nce_matryoshka distill_clip_loss info_nce_guided
                        --n 64 --d 16 --peers naive $tiny" ;;
        sweep:1) args="full --tag sweep --losses clip_loss --n 32 64 --d 8 16 --backends torch:fused torch:chunked
                       --peers naive $tiny" ;;
        maxbatch:1) args="maxbatch --start-n 256 --max-n 512 --d 16 --peers naive --threads 1" ;;
        quick:1) args="quick --n 64 --d 16 --peers naive $tiny" ;;
    esac
    local tb=$(($(left_for "$1") - 15))  # the rows stop starting 15 s before the deadline
    echo "$PY -m bench" $args "--out $RES --time-budget $((tb < 5 ? 5 : tb))"
}

visit() {
    echo "== fastcl GPU visit $DATE: stages [$STAGES], budget ${BUDGET}s, out $OUT"
    local s line="deadlines (s from start):"
    for s in $STAGES; do line="$line $s=$(deadline "$s")"; done
    note "$line"
    PENDING=$STAGES
    setup || { PENDING=""; publish; return 0; }
    publish
    has_stage tests && stage tests "$(tests_cmd)"
    has_stage check && stage check "$PY -m bench check --out $RES/checks.json"
    for s in headline second sweep maxbatch; do
        has_stage "$s" && stage "$s" "$(bench_cmd "$s")"
    done
    has_stage sanitize && stage sanitize "$(sanitize_cmd)"
    has_stage quick && stage quick "$(bench_cmd quick)"
    if ls "$RES"/*.json >/dev/null 2>&1; then
        timeout 30 $PY -m bench plot "$RES"/*.json >/dev/null || note "plotting failed"
        publish
    fi
    echo
    echo "================ summary (${SECONDS}s) ================"
    cat "$SUMMARY"
    [ -n "$(echo "$PENDING" | xargs)" ] && echo "not reached: $(cat "$OUT/next_stages.txt") (run them in a second call)"
    ls "$RES"/*.json >/dev/null 2>&1 && timeout 30 $PY -m bench summary "$RES"/*.json
    return $FAILED
}

visit 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
