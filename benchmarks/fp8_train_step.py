"""`python benchmarks/fp8_train_step.py`: FP8 training (convert_to_fp8_training) against BF16, timed. It prints tables;
it is not a test.

1. One Linear, forward and backward, on DeepSeek-V3's projection shapes: BF16 (nn.Linear under autocast, FP32 master
   weight) against FP8TrainingLinear (Fprop, Dgrad and Wgrad through act_quant / weight_quant / fp8_gemm), with the
   relative difference of the FP8 gradients from the BF16 ones.
2. One whole training step (forward, backward, AdamW) of a 2-layer model with V3's widths (hidden 7168, 128 heads,
   MLA ranks, a dense layer and an MoE layer, 16 routed experts instead of 256 so that it fits one GPU), BF16 against
   FP8, with the peak memory of each.

Both precisions run the rest of the model under torch.autocast(bfloat16); the BF16 baseline is what DeepSeek-V3 compares
its FP8 training with. On a CUDA GPU with FP8 support (compute capability 8.9+) the kernel switch's "auto" runs the
compiled Triton kernels. Elsewhere (--quick, a CPU) the same code runs on a tiny config through the kernels' PyTorch
reference: a smoke test whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch import nn

from kernels.bench import device_name, rel_err, table, time_ms
from mini_deepseek import DeepSeekV3, FP8TrainingLinear, ModelConfig, TrainConfig, convert_to_fp8_training
from mini_deepseek.train import make_optimizer

# name: (N, K) of the weight, y = x W^T (kernels/bench.py's V3 projections, a subset)
V3_LINEARS = {"q_a": (1536, 7168), "o": (7168, 16384), "expert gate_up": (4096, 7168), "expert down": (7168, 2048)}
TINY_LINEARS = {"tiny": (96, 200)}


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)


def linear_table(shapes: dict[str, tuple[int, int]], M: int, device: str, reps: int) -> None:
    rows = []
    for name, (N, K) in shapes.items():
        torch.manual_seed(0)
        plain = nn.Linear(K, N, bias=False, device=device)
        fp8 = FP8TrainingLinear.from_linear(nn.Linear(K, N, bias=False, device=device))
        fp8.weight.data.copy_(plain.weight.data)
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
        grads = {}
        for label, layer in (("bf16", plain), ("fp8", fp8)):
            def step(layer=layer, x=x, dy=dy):
                x.grad = layer.weight.grad = None
                with autocast(device):
                    y = layer(x)
                y.backward(dy)

            step()
            grads[label] = (x.grad.float(), layer.weight.grad.float())
            grads[label + " ms"] = time_ms(step, device, reps)
        flops = 3 * 2 * M * N * K  # Fprop, Dgrad, Wgrad
        rows.append([name, M, N, K, grads["bf16 ms"], flops / grads["bf16 ms"] / 1e9, grads["fp8 ms"],
                     flops / grads["fp8 ms"] / 1e9, grads["bf16 ms"] / grads["fp8 ms"],
                     rel_err(grads["fp8"][0], grads["bf16"][0]), rel_err(grads["fp8"][1], grads["bf16"][1])])
    table(f"One Linear, forward + backward, on {device_name(device)}",
          ["layer", "M", "N", "K", "BF16 ms", "TFLOP/s", "FP8 ms", "TFLOP/s", "FP8 speed-up", "dx rel diff",
           "dW rel diff"], rows)


def model_table(cfg: ModelConfig, batch: int, seq: int, device: str, reps: int) -> None:
    rows = []
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    for precision in ("BF16", "FP8"):
        torch.manual_seed(0)
        model = DeepSeekV3(cfg).to(device).train()
        if precision == "FP8":
            convert_to_fp8_training(model)
        optimizer = make_optimizer(model, TrainConfig())
        losses = []

        def step(model=model, optimizer=optimizer, losses=losses):
            with autocast(device):
                loss, _ = model.loss(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = time_ms(step, device, reps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else "n/a"
        rows.append([precision, f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M", batch * seq, ms,
                     batch * seq / ms * 1e3, peak, losses[0]])
        del model, optimizer
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    rows[1].append(f"{rows[0][3] / rows[1][3]:.2f}x")
    rows[0].append("1.00x")
    table(f"One training step (forward, backward, AdamW), {cfg.n_layers} layers of hidden {cfg.dim}, "
          f"{cfg.n_routed_experts} routed experts, on {device_name(device)}",
          ["precision", "parameters", "tokens", "ms / step", "tokens/s", "peak GiB", "first loss", "speed-up"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny config (the default without a CUDA GPU)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement on a CPU")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    print(f"device: {device_name(device)}; torch {torch.__version__}; {'quick (tiny shapes)' if quick else 'V3 shapes'}")
    if quick:
        linear_table(TINY_LINEARS, 64, device, args.reps)
        model_table(ModelConfig.preset("toy", n_layers=2, n_mtp_modules=0, max_seq_len=64), 2, 32, device, args.reps)
    else:
        linear_table(V3_LINEARS, args.tokens, device, args.reps)
        v3_two_layers = ModelConfig.preset("v3", n_layers=2, n_dense_layers=1, n_routed_experts=16, n_expert_groups=1,
                                           n_limited_groups=1, n_mtp_modules=0, max_seq_len=args.tokens)
        model_table(v3_two_layers, 1, args.tokens, device, args.reps)


if __name__ == "__main__":
    main()
