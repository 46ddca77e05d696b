#!/usr/bin/env bash
# The one prepared GPU check (issue 13), for a session that is lent a GPU machine (its 15 minutes of device time
# include the machine's start). That machine has Python 3.12 with CUDA PyTorch, scikit-learn, SciPy and pytest, but
# not fedssl's other needs, no Fashion-MNIST and no network. So:
#
#   bash benchmarks/gpu_check.sh prepare        # here, once: wheels for 3.12 and Fashion-MNIST into .gpu/ (ignored)
#   run(command="bash benchmarks/gpu_check.sh run", carry=[".gpu"], timeout_s=540)   # there, through the device tool
#
# `run` (on the GPU machine) installs the wheels into /tmp/site, then:
#   1. tests/gpu: a DP round on CUDA charged as on the CPU, book-keeping == the per-sample definition on CUDA
#      (ResNet-GN), the coordinator's evaluation and warm start on CUDA (skipped without CUDA: a skip fails the check);
#   2. benchmarks/gpu.py: plain vs book-keeping vs Opacus hooks on the ResNet-GN at 3x32x32 and 1x28x28,
#      batch 256 and 1024: samples/s and peak memory;
#   3. one short Fashion-MNIST pretraining on CUDA through the flagship's own code: 10 sites, ε = 8, 2 rounds x 20
#      DP steps, CNN w64, seed 0, scored at 600 labels against random init and raw pixels (a timing, not a result).
# Every result file and the log land in $OUT (the device tool brings them back); copy them to benchmarks/results/.
# GPU_CHECK_ALLOW_CPU=1 runs `run` on a machine without CUDA at tiny sizes (tests/gpu then skip): a smoke check of
# this script (tests/test_gpu_check_smoke.py, with GPU_CHECK_DATA naming tiny IDX files and PYTHON the venv's).
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
PYTHON=${PYTHON:-python3}
# Pinned to what the CPU venv runs (pip list in .venv), for CPython 3.12 on x86-64 Linux.
WHEELS="opacus==1.6.0 dp-accounting==0.6.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12"

prepare() {
    mkdir -p "$GPU_DIR/whl" "$GPU_DIR/fashion"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$GPU_DIR/whl" $WHEELS || return 1
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$GPU_DIR/fashion/" \
        || { echo "gpu_check: no Fashion-MNIST here; apt-get install dataset-fashion-mnist"; return 1; }
    du -sh "$GPU_DIR"
}

run() {
    local out=${OUT:-$GPU_DIR/out} failed=0 smoke=${GPU_CHECK_ALLOW_CPU:-0}
    mkdir -p "$out"
    # The wheels are for the GPU machine's CPython 3.12; a smoke run uses the venv it is given (PYTHON).
    if [ "$smoke" != 1 ] && ls "$GPU_DIR"/whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_DIR"/whl/*.whl || return 1
        export PYTHONPATH=/tmp/site:$PWD
    fi
    export PYTHONUNBUFFERED=1 FEDSSL_BENCH_OUT=$out
    local gpu_args=() flagship_args=(--device cuda --rounds 2 --local-steps 20 --width 64 --warm-steps 200)
    if [ "$smoke" = 1 ]; then
        gpu_args=(--allow-cpu --quick) flagship_args=(--device auto --quick)
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu_check.log"
    echo "== 1. tests/gpu" | tee -a "$out/gpu_check.log"
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 | tee -a "$out/gpu_check.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
    if grep -q "skipped" "$out/gpu_check.log" && [ "$smoke" != 1 ]; then
        echo "gpu_check: tests/gpu skipped (no CUDA?): the check did not run" | tee -a "$out/gpu_check.log"; failed=1
    fi
    echo "== 2. benchmarks/gpu.py" | tee -a "$out/gpu_check.log"
    for input in 3,32,32 1,28,28; do
        "$PYTHON" benchmarks/gpu.py --input "$input" --batches 256,1024 "${gpu_args[@]}" 2>&1 | tee -a "$out/gpu_check.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
    done
    echo "== 3. a short Fashion-MNIST pretraining on the GPU" | tee -a "$out/gpu_check.log"
    local data=${GPU_CHECK_DATA:-$GPU_DIR/fashion}
    "$PYTHON" benchmarks/flagship.py --data "$data" --seeds 0 --epsilons 8 --budgets 600 --suffix _gpu_short \
        "${flagship_args[@]}" 2>&1 | tee -a "$out/gpu_check.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
    echo "gpu_check: $([ $failed = 0 ] && echo passed || echo FAILED); results in $out" | tee -a "$out/gpu_check.log"
    return $failed
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|run (see its header)"; exit 2 ;;
esac
