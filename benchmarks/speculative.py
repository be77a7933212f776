"""Speculative decoding with the MTP modules against plain decoding, on trained checkpoints; and the combined
speed-up over transformers' DeepseekV3.

    python benchmarks/speculative.py [--quick] [--checkpoint DIR] [--threads N] [--repeats R] [--skip-hf]

1. The toy of notebook 03 (mini_deepseek.mtp_experiments: 12 thin layers, D = 2 MTP modules), trained on the
   notebook's mix of standard-library code and arithmetic. Read from --checkpoint (the notebook saves it to
   runs/03_mtp/toy-mtp2), or trained here with the notebook's recipe and saved there first. Greedy decoding of
   held-out arithmetic and code prompts by model.generate and by speculative_generate (1 and 2 drafts), timed in
   turns (speculative.measure_speedup): tokens per second, speed-up, tokens per forward, acceptance per depth.
2. Where transformers is installed: the geometry of benchmarks/decode_vs_hf.py (BENCH_CONFIG) with one MTP
   module, trained briefly on arithmetic so that the module has something to draft (random weights would accept
   nothing), saved by our save_pretrained and read by transformers' DeepseekV3ForCausalLM, which leaves the MTP
   layer out. Greedy generation of 128 tokens after a ~1024-token arithmetic prompt: transformers against our plain
   and speculative decoding (absorbed MLA), median of --repeats runs; the "total x" of the speculative row is the
   combined speed-up (absorption and drafting together).
Figures, not tests: tests/test_benchmarks.py only runs the --quick version end to end.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from decode_vs_hf import BENCH_CONFIG, hf_greedy, load_in_transformers, median_time

from mini_deepseek import (
    DeepSeekV3,
    ModelConfig,
    TokenDataset,
    arithmetic_problems,
    arithmetic_text,
    from_pretrained,
    save_pretrained,
)
from mini_deepseek.mtp_experiments import CHECKPOINT_DIR, encode, heldout_prompts, train_toy
from mini_deepseek.speculative import measure_speedup, speculative_generate
from mini_deepseek.tokenizer import ByteTokenizer
from mini_deepseek.train import TrainConfig, train

TOY_STEPS = 200  # the notebook's full-mode training


def toy_model(path: str, steps: int) -> DeepSeekV3:
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"toy: read {path}")
        return from_pretrained(path)
    print(f"toy: no checkpoint at {path}; training the notebook's toy with D = 2 for {steps} steps first")
    model, _ = train_toy(2, steps, seed=0)
    save_pretrained(model, path)
    return model


def toy_benchmark(args: argparse.Namespace) -> None:
    model = toy_model(args.checkpoint, args.toy_steps)
    model.set_mla_mode("absorb")
    n_prompts, new_tokens = (2, 32) if args.quick else (4, 128)
    print(f"\nToy: {model.config.n_layers} layers of {model.config.dim}, {len(model.mtp)} MTP modules; greedy, "
          f"{n_prompts} held-out prompts per kind x {new_tokens} new tokens, median of {args.repeats} passes")
    print(f"{'text':<12}{'drafts':>7}{'plain tok/s':>13}{'spec tok/s':>12}{'speed-up':>10}{'tok/forward':>13}"
          f"  {'acceptance per depth':<24}same tokens")
    for kind in ("arithmetic", "code"):
        prompts = encode(heldout_prompts(kind, n_prompts))
        for n_draft in range(1, len(model.mtp) + 1):
            r = measure_speedup(model, prompts, new_tokens, n_draft=n_draft, repeats=args.repeats)
            acceptance = ", ".join(f"{a:.1%}" for a in r["acceptance"])
            print(f"{kind:<12}{n_draft:>7}{r['plain_tokens_per_s']:>13.1f}{r['speculative_tokens_per_s']:>12.1f}"
                  f"{r['speedup']:>9.2f}x{r['tokens_per_forward']:>13.2f}  {acceptance:<24}{r['same_tokens']}")


def hf_benchmark(args: argparse.Namespace) -> None:
    try:
        import transformers
    except ImportError:
        print("\ntransformers is not installed: no comparison with its DeepseekV3 (pip install -e '.[hf]')")
        return
    prompt_len, new_tokens = (128, 16) if args.quick else (1024, 128)
    steps = args.hf_steps if args.hf_steps is not None else 10 if args.quick else 150
    torch.manual_seed(0)
    ours = DeepSeekV3(ModelConfig.preset("toy", **{**BENCH_CONFIG, "n_mtp_modules": 1}))
    dataset = TokenDataset.from_text(arithmetic_text(20_000, seed=0))
    print(f"\nThe geometry of decode_vs_hf.py with one MTP module, trained {steps} steps on arithmetic:")
    train(ours, dataset, TrainConfig(steps=steps, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=max(1, steps // 10),
                                     eval_every=0, log_every=max(1, steps // 10)))
    ours.eval().set_mla_mode("absorb")
    hf = load_in_transformers(ours, transformers)  # transformers warns that it leaves the MTP layer out
    text = arithmetic_text(200, seed=1) + arithmetic_problems(1, seed=2)[0].prompt  # ends with "Q: ..=? A:"
    prompt = torch.tensor([ByteTokenizer().encode(text)[-prompt_len:]])
    with torch.no_grad():
        parity = (ours(prompt) - hf(prompt).logits).abs().max().item()
    print(f"transformers {transformers.__version__}, {args.threads} threads; max |logits ours - transformers| = "
          f"{parity:.2e}")

    def speculative(n: int) -> torch.Tensor:
        return speculative_generate(ours, prompt, n)[0]

    runs = [("transformers generate", lambda n=new_tokens: hf_greedy(hf, prompt, n)),
            ("mini_deepseek generate, MLA absorb", lambda n=new_tokens: ours.generate(prompt, n)),
            ("mini_deepseek speculative_generate, MLA absorb, D = 1", speculative)]
    reference = runs[0][1]()
    _, stats = speculative_generate(ours, prompt, new_tokens)
    rows = []
    for name, generate in runs:
        same = torch.equal(generate(new_tokens), reference)
        total = median_time(lambda g=generate: g(new_tokens), args.repeats)
        prefill = median_time(lambda g=generate: g(1), args.repeats)
        rows.append((name, total, prefill, (new_tokens - 1) / (total - prefill), same))
    base_total, base_rate = rows[0][1], rows[0][3]
    print(f"\nGenerate: prompt {prompt_len} tokens + {new_tokens} new tokens (greedy), median of {args.repeats}; "
          f"speculative: acceptance {stats['acceptance'][0]:.1%}, {stats['tokens_per_forward']:.2f} tokens/forward")
    print(f"{'implementation':<56}{'total s':>8}{'prefill s':>10}{'decode tok/s':>13}{'decode x':>9}"
          f"{'total x':>8}  same tokens")
    for name, total, prefill, rate, same in rows:
        print(f"{name:<56}{total:>8.2f}{prefill:>10.2f}{rate:>13.1f}{rate / base_rate:>8.2f}x"
              f"{base_total / total:>7.2f}x  {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter generations; a few training steps")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT_DIR), help="the toy's save_pretrained folder")
    parser.add_argument("--toy-steps", type=int, default=TOY_STEPS, help="training steps when no checkpoint exists")
    parser.add_argument("--hf-steps", type=int, default=None,
                        help="training steps of the decode_vs_hf geometry (default 150, 10 with --quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true", help="only the toy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    started = time.perf_counter()
    toy_benchmark(args)
    if not args.skip_hf:
        hf_benchmark(args)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
