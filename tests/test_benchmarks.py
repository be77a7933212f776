"""The benchmark scripts run end to end. They print speed figures; nothing here times anything."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=None if env is None else os.environ | env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_decode_benchmark_generates_the_same_tokens_as_transformers():
    pytest.importorskip("transformers")
    out = run("benchmarks/decode_vs_hf.py", "--quick", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith(("transformers (", "mini_deepseek default",
                                                                  "mini_deepseek, naive"))]
    assert len(rows) == 3 and all(line.rstrip().endswith("True") for line in rows), out
    assert "memory-bandwidth floor" in out and "Training step" in out


def test_kernel_benchmark_checks_correctness_on_the_cpu():
    # Interpreted even where a GPU is present (the GPU tables take V3 shapes: benchmarks/gpu_check.sh runs them).
    out = run("-m", "kernels.bench", "--m", "1", "--reps", "1", env={"TRITON_INTERPRET": "1"})
    assert "MISMATCH" not in out and out.count("bit-identical") == 3, out
    assert "fp8_gemm" in out and "fused_moe" in out, out


def test_speculative_benchmark_runs_and_keeps_the_tokens(tmp_path):
    args = ["benchmarks/speculative.py", "--quick", "--repeats", "1", "--toy-steps", "2", "--hf-steps", "2",
            "--checkpoint", str(tmp_path / "toy")]
    try:
        import transformers  # noqa: F401
    except ImportError:
        args.append("--skip-hf")
    out = run(*args)
    toy_rows = [line for line in out.splitlines() if line.startswith(("arithmetic ", "code "))]
    assert len(toy_rows) == 4 and all(line.rstrip().endswith("True") for line in toy_rows), out
    assert (tmp_path / "toy" / "config.json").is_file()  # trained and saved, as the notebook would have
    if "--skip-hf" not in args:
        rows = [line for line in out.splitlines() if line.startswith(("transformers generate", "mini_deepseek "))]
        assert len(rows) == 3 and all(line.rstrip().endswith("True") for line in rows), out


def test_fp8_training_benchmark_runs_both_precisions():
    out = run("benchmarks/fp8_train_step.py", "--quick", "--reps", "1")
    rows = [line for line in out.splitlines() if line.replace(" ", "").startswith(("|BF16|", "|FP8|"))]
    assert "One Linear" in out and "One training step" in out, out
    assert len(rows) == 2 and "nan" not in out, out
