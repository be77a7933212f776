#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the GPU-only tests (marker `gpu`: compiled Triton kernels against
# the PyTorch references, FP8 model layers, FP8 training, the library on the GPU against the CPU), then
# `python -m kernels.bench` (fp8_gemm against torch._scaled_mm and a bf16 matmul on DeepSeek-V3 projection shapes,
# fused_moe against a per-expert loop on V3's expert geometry), then benchmarks/fp8_train_step.py (FP8 training
# against BF16: one Linear on V3 shapes, and one training step of a 2-layer model with V3's widths). Uses the python3
# on PATH, which must already hold torch, triton, safetensors, tqdm, pytest and hypothesis; installs nothing. Logs go
# to $OUT (or ./gpu-check) so they can be kept with the results; benchmarks/results/h200.md holds the first run's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MINI_DEEPSEEK_KERNELS=auto
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" \
  | tee "$out/versions.txt" || exit 1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_fp8_model.py tests/test_fp8_training.py tests/test_gpu_library.py 2>&1 | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
python3 -m kernels.bench 2>&1 | tee "$out/kernels-bench.txt"
bench_rc=${PIPESTATUS[0]}
python3 benchmarks/fp8_train_step.py 2>&1 | tee "$out/fp8-train-step.txt"
train_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, bench exit $bench_rc, fp8 training step exit $train_rc"
exit $(( tests_rc || bench_rc || train_rc ))
