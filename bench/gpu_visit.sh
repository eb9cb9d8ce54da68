#!/usr/bin/env bash
# Everything a lent-GPU visit does, in one call (../shared/GPU.md): install the carried wheels,
# build and install fastcl, run the GPU tests, the large-N / bf16 checks, the benchmark suites
# and the plots; write it all under $OUT; print a short table last.
#
# Usage, from the repository root:
#   bash bench/gpu_visit.sh [STAGE ...]      stages: test check bench maxbatch (default: all four)
#
# Environment:
#   OUT                where logs and results go (default bench/results/visit-<date>). A device call
#                      brings back at most 8 files, so the result files travel as one
#                      results.tar.gz (unpack: tar xzf results.tar.gz -C bench/results), beside
#                      visit.log, summary.txt, checks.json and the CSVs
#   VISIT_BUDGET_S     seconds for the whole visit (default 540: one device call runs <= 600 s)
#   FASTCL_GIT_COMMIT  the commit measured, recorded in the results when .git did not travel
#                      (the results always carry source_sha, a hash of fastcl's sources)
#   FASTCL_CUDA_ARCH   architectures for the CUDA extension (default 90)
#   PYTHON             interpreter (default python3)
#   VISIT_SMOKE=1      on a machine without a GPU, run the plumbing (bench at tiny sizes, plots,
#                      summary, archive) instead of stopping after the skip notice
#
# Wheels: if .whl/*.whl exist (a folder named in the device call's `carry`), they are installed
# with --no-deps into /tmp/site first (open_clip_torch, ftfy, wcwidth, inf_cl).
# Exit status: 0 when every stage that ran passed, 1 otherwise; a GPU-less machine exits 0.

set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${VISIT_BUDGET_S:-540}
DATE=$(date -u +%Y-%m-%d)
OUT=${OUT:-bench/results/visit-$DATE}
STAGES=${*:-test check bench maxbatch}
mkdir -p "$OUT"
LOG="$OUT/visit.log"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=0
SMOKE=0

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }
# seconds for a stage: a percentage of what is left, at least 30
share() { local s=$(($(left) * $1 / 100)); echo $((s < 30 ? 30 : s)); }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

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
    else
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 \
            | tee -a "$SUMMARY"
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FASTCL_CUDA_ARCH=${FASTCL_CUDA_ARCH:-90}
        echo "== building and installing fastcl (FASTCL_CUDA_ARCH=$FASTCL_CUDA_ARCH)"
        if ! $PY -m pip install -q --no-build-isolation --no-deps --no-index -e .; then
            note "BUILD FAILED: pip install -e . (see visit.log)"
            FAILED=1
        fi
    fi
    $PY -c "import fastcl, json; print('build_info', json.dumps(fastcl.build_info()))" 2>&1 | tee -a "$SUMMARY"
    return 0
}

run_tests() {
    local backend rc
    for backend in torch triton cuda; do
        if ! $PY -c "import sys, torch; from fastcl._dispatch import unavailable_reason as u; \
r = u('$backend', torch.device('cuda')); print(r or ''); sys.exit(1 if r else 0)" >/tmp/reason 2>&1; then
            note "tests backend=$backend: skipped ($(tail -n 1 /tmp/reason))"
            continue
        fi
        echo "== tests/test_losses.py on cuda, backend=$backend"
        FASTCL_TEST_DEVICE=cuda FASTCL_TEST_BACKENDS=$backend timeout "$(share 35)" \
            $PY -m pytest tests/test_losses.py -q --maxfail=25 2>&1 | tee /tmp/pytest.log
        rc=${PIPESTATUS[0]}
        note "tests backend=$backend: rc=$rc $(tail -n 1 /tmp/pytest.log)"
        [ "$rc" = 0 ] || FAILED=1
    done
    echo "== kernel tests on the GPU (tests/test_cuda.py, tests/test_triton.py)"
    FASTCL_TEST_DEVICE=cuda timeout "$(share 25)" $PY -m pytest tests/test_cuda.py tests/test_triton.py -q \
        --maxfail=25 2>&1 | tee /tmp/pytest.log
    rc=${PIPESTATUS[0]}
    note "kernel tests: rc=$rc $(tail -n 1 /tmp/pytest.log)"
    [ "$rc" = 0 ] || FAILED=1
}

run_checks() {
    echo "== large-N / bf16 checks"
    timeout "$(share 25)" $PY -m bench check --out "$OUT/checks.json" 2>&1 | tee /tmp/check.log
    local rc=${PIPESTATUS[0]}
    grep -E "^check" /tmp/check.log >>"$SUMMARY"
    [ "$rc" = 0 ] || FAILED=1
}

run_bench() {
    local quick=(quick) targets=(full --preset gpu-targets)
    if [ "$SMOKE" = 1 ]; then
        quick=(quick --n 64 128 --d 16 --target-s 0.05 --min-reps 2 --threads 1)
        targets=(full --losses clip_loss siglip_loss --n 64 --d 16 --peers naive --target-s 0.05 --min-reps 2
                 --threads 1)
    fi
    echo "== bench quick"
    $PY -m bench "${quick[@]}" --out "$RES" --time-budget "$(share 20)" || FAILED=1
    echo "== bench targets"
    $PY -m bench "${targets[@]}" --out "$RES" --time-budget "$(share 75)" --row-timeout 120 || FAILED=1
}

run_maxbatch() {
    local args=(maxbatch --backends auto --peers naive open_clip inf_cl)
    [ "$SMOKE" = 1 ] && args=(maxbatch --start-n 256 --max-n 1024 --d 16 --peers naive --threads 1)
    echo "== bench maxbatch"
    $PY -m bench "${args[@]}" --out "$RES" --time-budget "$(($(left) - 20))" --row-timeout 150 || FAILED=1
}

finish() {
    if ls "$RES"/*.json >/dev/null 2>&1; then
        $PY -m bench plot "$RES"/*.json >/dev/null || note "plotting failed"
        tar czf "$OUT/results.tar.gz" -C "$RES" .
        cp "$RES"/*.csv "$OUT/"
        note "results: $OUT/results.tar.gz ($(ls "$RES" | wc -l) files; tar xzf results.tar.gz -C bench/results)"
    fi
    echo
    echo "================ summary (${SECONDS}s) ================"
    cat "$SUMMARY"
    if ls "$RES"/*.json >/dev/null 2>&1; then
        $PY -m bench summary "$RES"/*.json
    fi
}

visit() {
    echo "== fastcl GPU visit $DATE: stages [$STAGES], budget ${BUDGET}s, out $OUT"
    setup || return 0
    RES=${VISIT_RESULTS:-$(mktemp -d /tmp/fastcl-results.XXXX)}
    mkdir -p "$RES"
    if [ "$SMOKE" = 0 ]; then
        has_stage test && run_tests
        has_stage check && run_checks
    fi
    has_stage bench && run_bench
    has_stage maxbatch && run_maxbatch
    finish
    return $FAILED
}

visit 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
