#!/usr/bin/env bash
# The GPU checks that a CPU-only machine cannot make (issues 5, 6, 8 and 20): vitlens's CUDA tests, the two-rank NCCL
# test (skipped with its reason on a machine with fewer than two GPUs) and the CUDA benchmark.
#
# Run from the repository root on a machine with a CUDA GPU whose python3 already has vitlens's dependencies (torch,
# timm, typer, rich, matplotlib, scikit-learn, einops, safetensors, pytest, hypothesis); nothing is installed or
# downloaded. Logs and benchmarks/results-style files go to $OUT (default: gpu-check/). BENCH_TIMEOUT (seconds,
# default 420) bounds the benchmark, whose full CUDA run (ViT-S/B/L in float32, bfloat16 and float16) may need more:
# the defaults below run bfloat16 only; pass BENCH_ARGS to change that.
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$out/device.log"
python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_attention_driver.py::test_cuda_matches_cpu \
    "tests/test_analysis_properties.py::test_accelerator_matches_cpu" \
    tests/test_device_placement.py tests/test_fewshot.py tests/test_attention_driver.py \
    tests/test_distributed.py::test_nccl_ranks_give_the_single_gpu_numbers 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-420}" python3 -m benchmarks --device cuda ${BENCH_ARGS:---gpu-dtypes bfloat16} --out "$out" \
    2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench" | tee -a "$out/device.log"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
