#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the GPU-only tests (marker `gpu`: compiled Triton kernels against
# the PyTorch references, FP8 model layers), then `python -m kernels.bench` (fp8_gemm against torch._scaled_mm
# and a bf16 matmul on DeepSeek-V3 projection shapes, fused_moe against a per-expert loop on V3's expert
# geometry). Uses the python3 on PATH, which must already hold torch, triton, safetensors, tqdm, pytest and
# hypothesis; installs nothing. Logs go to $OUT (or ./gpu-check) so they can be kept with the results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MINI_DEEPSEEK_KERNELS=auto
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" \
  | tee "$out/versions.txt" || exit 1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_fp8_model.py 2>&1 | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
python3 -m kernels.bench 2>&1 | tee "$out/kernels-bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc || bench_rc ))
