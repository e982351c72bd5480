#!/bin/bash
# All GPU work of a session in one command on the GPU machine: GPU tests, then benchmarks, each under its own time
# limit so one slow part cannot eat the others'. Logs and results are packed into $OUT/gpu_run.tar.gz
# (one file to fetch back).
#
#   bash benchmarks/gpu_run.sh tests step codecs      # parts, in the order given
#
# Parts: tests (every @pytest.mark.cuda test), pass_tests (the pass's structure and numerics tests, which run on
# the GPU when there is one), step (benchmarks/step_time.py, with STEP_ARGS), codecs, shampoo, quality
# (the quality suite's GPU mode, benchmarks/quality/run.py --device cuda --scale large, QUALITY_ARGS; mnist1d travels
# as a wheel; QUALITY_OUT=benchmarks/results with --append in QUALITY_ARGS adds to the carried results),
# efcp, ablation (benchmarks/fused_ablation.py, ABLATION_ARGS), shampoo_tests (tests/test_shampoo.py on the GPU; slow: kernel
# compiles per block order), profile (benchmarks/profile_steps.py, PROFILE_ARGS), ncu (Nsight Compute sections of
# one launch of the fused update kernel in profile_steps' NCU_CASE).
# Anchors travel as wheels in .whl/ (bitsandbytes, torchao; the machine has pytest and hypothesis);
# Distributed Shampoo's source sits in .ext/distributed_shampoo. None of them is part of this repository.
set -u
OUT=${OUT:-/tmp/gpu_run_out}
LOGS=/tmp/gpu_run
mkdir -p "$OUT" "$LOGS/results"
export PYTHONUNBUFFERED=1
site=/tmp/lowbit_site
mkdir -p "$site"
wheels=$(ls .whl/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels \
        >"$LOGS/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
fi
export PYTHONPATH=$PWD:$site:$PWD/.ext${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$LOGS/device.txt" 2>&1

run() {  # run NAME SECONDS COMMAND...: log to $LOGS/NAME.log, record the exit status and the wall time
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name rc=$rc in $((SECONDS - began))s" | tee -a "$LOGS/$name.log"
    tail -n 25 "$LOGS/$name.log"
}

for part in "$@"; do
    case $part in
        tests) run gpu_tests "${TESTS_S:-200}" python3 -m pytest -q -m cuda -p no:cacheprovider --durations=15 -rfEsx \
                   tests/test_codecs_triton.py tests/test_backend_gpu.py tests/test_optim_compile.py \
                   tests/test_shampoo_kernels.py tests/test_shampoo_compile.py tests/test_efcp.py ;;
        pass_tests) run pass_tests "${PASS_TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider --durations=10 -rfEsx \
                   tests/test_pass_structure.py tests/test_pass_pointwise.py tests/test_backend_numerics.py ;;
        shampoo_tests) run shampoo_tests "${SHAMPOO_TESTS_S:-240}" python3 -m pytest -q -x -p no:cacheprovider \
                   --durations=10 tests/test_shampoo.py ;;
        step) run step_time "${STEP_S:-330}" python3 benchmarks/step_time.py --out "$LOGS/results" ${STEP_ARGS:-} ;;
        codecs) run codecs "${CODECS_S:-120}" python3 benchmarks/codecs.py --out "$LOGS/results" ;;
        shampoo) run shampoo "${SHAMPOO_S:-300}" python3 benchmarks/shampoo.py --out "$LOGS/results" ;;
        ablation) run fused_ablation "${ABLATION_S:-240}" python3 benchmarks/fused_ablation.py --out "$LOGS/results" ${ABLATION_ARGS:-} ;;
        profile) run profile_steps "${PROFILE_S:-300}" python3 benchmarks/profile_steps.py ${PROFILE_ARGS:-} ;;
        ncu) run ncu "${NCU_S:-240}" /usr/local/cuda/bin/ncu --kernel-name regex:fused_update --launch-skip 3 \
                   --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
                   --section LaunchStats --section Occupancy --section SchedulerStats \
                   python3 benchmarks/profile_steps.py --cases ${NCU_CASE:-adamw8} ;;
        quality) run quality "${QUALITY_S:-360}" python3 -m benchmarks.quality.run --device cuda --scale large \
                   --budget-s "${QUALITY_BUDGET_S:-300}" --out "${QUALITY_OUT:-$LOGS/results}" \
                   ${QUALITY_ARGS:---compile --seeds 5 --optimizers torch_adamw,adamw32,adamw8,adamw4,shampoo32,shampoo4} ;;
        efcp) run efcp "${EFCP_S:-240}" python3 benchmarks/efcp.py --out "$LOGS/results" --budget-s 180 --target-s 0.5 ;;
        *) echo "unknown part: $part" ;;
    esac
done
ls -la "$LOGS" "$LOGS/results"
tar -czf "$OUT/gpu_run.tar.gz" -C "$LOGS" .
