"""`python -m kernels.bench`: how the kernels do on this machine. It prints tables; it is not a test.

On a GPU (compiled backend): TFLOP/s of `fp8_gemm` against `torch._scaled_mm` (block-scaled where this
torch and GPU support it, else row-wise, as labelled) and a bf16 matmul, on DeepSeek-V3's projection
shapes for M in {1, 64, 4096} tokens; then `fused_moe` (bf16 and FP8) against a per-expert loop in bf16
on V3's expert geometry (E=256, k=8, H=7168, I=2048).

On a CPU: the active backend (the interpreter, with Triton) checked against the reference on small
shapes, then the speed of the plain-PyTorch path, the one a CPU user runs, on the V3 projection shapes for
M in {1, 64} and on a CPU-sized MoE.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from tqdm import tqdm

import kernels
from kernels import reference as R

# name: (N, K) of the weight, y = x W^T
V3_PROJECTIONS = {
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512),
    "o": (7168, 16384), "expert gate_up": (4096, 7168), "expert down": (7168, 2048),
}
V3_MOE = dict(E=256, k=8, H=7168, I=2048)
CPU_MOE = dict(E=32, k=8, H=1024, I=512)


def table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def time_ms(fn, device: str, reps: int) -> float:
    """Median milliseconds per call (after one warm-up call)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else device


def tflops(flops: float, ms: float | None) -> float | str:
    return "n/a" if ms is None else flops / ms / 1e9


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def routing(T: int, E: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(T, E, device=device).softmax(-1).topk(k, dim=-1)


def moe_weights(E: int, H: int, I: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated in `dtype` directly: V3's bf16 experts are 22 GB, float32 temporaries would double that."""
    w1 = torch.randn(E, 2 * I, H, device=device, dtype=dtype).div_(H**0.5)
    return w1, torch.randn(E, H, I, device=device, dtype=dtype).div_(I**0.5)


# ---- CPU ----

def cpu_correctness() -> None:
    """The active backend against the reference at sizes the interpreter runs in seconds."""
    rows = []
    x, w = torch.randn(33, 300), torch.randn(576, 300)
    for name, (q, s), (rq, rs) in (("act_quant 33x300", kernels.act_quant(x), R.act_quant(x)),
                                   ("weight_quant 576x300", kernels.weight_quant(w), R.weight_quant(w))):
        same = torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
        rows.append([name, "codes and scales bit-identical" if same else "MISMATCH", ""])
    wq, ws = R.weight_quant(w)
    same = torch.equal(kernels.weight_dequant(wq, ws, dtype=torch.bfloat16), R.weight_dequant(wq, ws, dtype=torch.bfloat16))
    rows.append(["weight_dequant 576x300 bf16", "bit-identical" if same else "MISMATCH", ""])

    a_q, a_s = R.act_quant(x)
    c = kernels.fp8_gemm(a_q, a_s, wq, ws, out_dtype=torch.float32)
    rows.append(["fp8_gemm 33x576x300", f"rel err vs reference {rel_err(c, R.fp8_gemm(a_q, a_s, wq, ws, out_dtype=torch.float32)):.1e}",
                 f"vs float32 x.w^T {rel_err(c, x @ w.T):.1e}"])

    T, E, k, H, I = 33, 8, 2, 256, 128
    weights, ids = routing(T, E, k, "cpu")
    w1, w2 = moe_weights(E, H, I, torch.float32, "cpu")
    x = torch.randn(T, H)
    plain = kernels.fused_moe(x, w1, w2, weights, ids)
    rows.append([f"fused_moe T={T} E={E} k={k} H={H} I={I}",
                 f"rel err vs loop {rel_err(plain, R.fused_moe(x, w1, w2, weights, ids)):.1e}", ""])
    (q1, s1), (q2, s2) = R.weight_quant(w1), R.weight_quant(w2)
    fp8 = dict(w1=q1, w2=q2, w1_scale=s1, w2_scale=s2, topk_weights=weights, topk_ids=ids)
    y = kernels.fused_moe(x, **fp8)
    rows.append(["fused_moe FP8 w8a8, same", f"rel err vs FP8 loop {rel_err(y, R.fused_moe(x, **fp8)):.1e}",
                 f"vs float32 {rel_err(y, plain):.1e}"])
    table(f"Correctness, backend {kernels.backend()!r} vs kernels.reference", ["check", "result", ""], rows)


def cpu_speed(ms: list[int], reps: int) -> None:
    previous = kernels.backend()
    kernels.set_backend("torch")
    try:
        rows = []
        for name, (N, K) in tqdm(V3_PROJECTIONS.items(), desc="projections", leave=False):
            b_q, b_s = kernels.weight_quant(torch.randn(N, K) * 0.02)
            b32 = kernels.weight_dequant(b_q, b_s, dtype=torch.float32)
            b16 = b32.bfloat16()
            for M in ms:
                x = torch.randn(M, K)
                a_q, a_s = kernels.act_quant(x)
                x16 = x.bfloat16()
                t_fp8 = time_ms(partial(kernels.fp8_gemm, a_q, a_s, b_q, b_s), "cpu", reps)
                t_32 = time_ms(partial(torch.matmul, x, b32.T), "cpu", reps)
                t_16 = time_ms(partial(torch.matmul, x16, b16.T), "cpu", reps)
                flops = 2 * M * N * K
                rows.append([name, M, N, K, t_fp8, flops / t_fp8 / 1e6, t_32, flops / t_32 / 1e6, t_16,
                             flops / t_16 / 1e6])
        table("fp8_gemm on the PyTorch path (dequantize the weight, float32 matmul) vs plain matmuls, CPU",
              ["projection", "M", "N", "K", "fp8_gemm ms", "GFLOP/s", "fp32 matmul ms", "GFLOP/s", "bf16 matmul ms",
               "GFLOP/s"], rows)

        E, k, H, I = (CPU_MOE[n] for n in "EkHI")
        w1, w2 = moe_weights(E, H, I, torch.float32, "cpu")
        (q1, s1), (q2, s2) = kernels.weight_quant(w1), kernels.weight_quant(w2)
        rows = []
        for T in tqdm(ms, desc="moe", leave=False):
            x = torch.randn(T, H)
            weights, ids = routing(T, E, k, "cpu")
            t_plain = time_ms(partial(kernels.fused_moe, x, w1, w2, weights, ids), "cpu", reps)
            t_fp8 = time_ms(partial(kernels.fused_moe, x, q1, q2, weights, ids, w1_scale=s1, w2_scale=s2), "cpu", reps)
            flops = 2 * T * k * 3 * H * I
            rows.append([T, t_plain, flops / t_plain / 1e6, t_fp8, flops / t_fp8 / 1e6])
        table(f"fused_moe on the PyTorch path (per-expert loop), CPU, E={E} k={k} H={H} I={I}",
              ["T", "float32 ms", "GFLOP/s", "FP8 w8a8 ms", "GFLOP/s"], rows)
    finally:
        kernels.set_backend("torch" if previous == "torch" else "triton")


# ---- GPU ----

def scaled_mm(a_q, a_s, b_q, b_s) -> tuple[object, str]:
    """torch._scaled_mm as a callable on these operands, block-scaled if supported, else row-wise."""
    attempts = [
        # 1x128 activation and 128x128 weight scales; torch wants the activation scales outer-dim-major.
        ("block", lambda: torch._scaled_mm(a_q, b_q.t(), scale_a=a_s.t().contiguous().t(), scale_b=b_s.t(),
                                           out_dtype=torch.bfloat16)),
        # One scale per row of A and per row of B (column of B^T): the coarser recipe.
        ("row-wise", lambda: torch._scaled_mm(a_q, b_q.t(), scale_a=a_s.amax(-1, keepdim=True),
                                              scale_b=b_s.amax(-1).repeat_interleave(128)[: b_q.shape[0]][None],
                                              out_dtype=torch.bfloat16)),
    ]
    for label, fn in attempts:
        try:
            fn()
            return fn, label
        except (RuntimeError, ValueError):
            continue
    return None, "unsupported"


def gpu_gemm(ms: list[int], device: str = "cuda") -> None:
    rows = []
    for name, (N, K) in tqdm(V3_PROJECTIONS.items(), desc="projections", leave=False):
        b_q, b_s = kernels.weight_quant(torch.randn(N, K, device=device) * 0.02)
        b16 = kernels.weight_dequant(b_q, b_s, dtype=torch.bfloat16)
        for M in ms:
            x = torch.randn(M, K, device=device)
            a_q, a_s = kernels.act_quant(x)
            x16 = x.bfloat16()
            flops = 2 * M * N * K
            t_ours = time_ms(partial(kernels.fp8_gemm, a_q, a_s, b_q, b_s), device, 3)
            err = rel_err(kernels.fp8_gemm(a_q, a_s, b_q, b_s), R.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32))
            fn, label = scaled_mm(a_q, a_s, b_q, b_s)
            t_scaled = time_ms(fn, device, 3) if fn else None
            t_bf16 = time_ms(partial(torch.matmul, x16, b16.T), device, 3)
            rows.append([name, M, N, K, tflops(flops, t_ours), err, tflops(flops, t_scaled), label,
                         tflops(flops, t_bf16)])
    table(f"fp8_gemm on {device_name(device)}, TFLOP/s",
          ["projection", "M", "N", "K", "fp8_gemm", "rel err", "_scaled_mm", "scaling", "bf16 matmul"], rows)


def gpu_moe(ms: list[int], device: str = "cuda") -> None:
    E, k, H, I = (V3_MOE[n] for n in "EkHI")
    w1, w2 = moe_weights(E, H, I, torch.bfloat16, device)
    (q1, s1), (q2, s2) = kernels.weight_quant(w1), kernels.weight_quant(w2)
    rows = []
    for T in tqdm(ms, desc="moe", leave=False):
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        weights, ids = routing(T, E, k, device)
        flops = 2 * T * k * 3 * H * I
        t_bf16 = time_ms(partial(kernels.fused_moe, x, w1, w2, weights, ids), device, 3)
        t_fp8 = time_ms(partial(kernels.fused_moe, x, q1, q2, weights, ids, w1_scale=s1, w2_scale=s2), device, 3)
        t_loop = time_ms(partial(R.fused_moe, x, w1, w2, weights, ids, compute_dtype=torch.bfloat16), device, 3)
        rows.append([T, t_bf16, tflops(flops, t_bf16), t_fp8, tflops(flops, t_fp8), t_loop, tflops(flops, t_loop)])
    table(f"fused_moe on {device_name(device)}, E={E} k={k} H={H} I={I}",
          ["T", "fused bf16 ms", "TFLOP/s", "fused FP8 ms", "TFLOP/s", "per-expert loop bf16 ms", "TFLOP/s"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", help="token counts (default: 1 64 4096 on GPU, 1 64 on CPU)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per CPU measurement")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"kernels backend: {kernels.backend()}; torch {torch.__version__}")
    if kernels.backend() == "triton":
        ms = args.m or [1, 64, 4096]
        gpu_gemm(ms)
        gpu_moe(ms)
    else:
        print("(the GPU tables need compiled Triton on a CUDA GPU)")
        cpu_correctness()
        cpu_speed(args.m or [1, 64], args.reps)


if __name__ == "__main__":
    main()
