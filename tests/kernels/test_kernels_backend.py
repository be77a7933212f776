"""The backend switch: chosen on first use from the environment (importing has no side effect), switchable at
run time."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference as R

ROOT = Path(__file__).resolve().parents[2]


def import_kernels(env: dict[str, str], prelude: str = "") -> list[str]:
    """Import kernels in a fresh interpreter, then use it once. Returns [backend, TRITON_INTERPRET, triton imported?,
    warnings] after that first use."""
    code = textwrap.dedent(prelude) + textwrap.dedent("""
        import os, sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kernels
            assert "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ, "import side effect"
            active = kernels.backend()  # the first use chooses the backend
        print(active, os.environ.get("TRITON_INTERPRET"), "triton" in sys.modules,
              "|".join(str(w.message) for w in caught), sep="\\n")
    """)
    clean = {k: v for k, v in os.environ.items() if k not in ("MINI_DEEPSEEK_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], env=clean | env | {"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.splitlines()


def test_env_var_selects_torch_without_importing_triton():
    backend, _, triton_imported, _ = import_kernels({"MINI_DEEPSEEK_KERNELS": "torch"})
    assert backend == "torch" and triton_imported == "False"


def test_without_triton_falls_back_to_torch_with_a_notice():
    hide_triton = """
        import importlib.util
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else find_spec(name, *a)
    """
    backend, _, _, notice = import_kernels({}, hide_triton)
    assert backend == "torch" and "Triton is not installed" in notice


def test_cpu_with_triton_interprets():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels compile")
    backend, interpret, _, notice = import_kernels({})
    assert (backend, interpret, notice) == ("interpret", "1", "")


def test_interpreter_works_when_triton_was_imported_first():
    """torch._dynamo imports Triton (before TRITON_INTERPRET is set, now that importing kernels sets nothing): the
    first kernel call must still run interpreted, bit-identical to the reference."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels compile")
    code = textwrap.dedent("""
        import sys
        import torch._dynamo  # imports triton
        assert "triton" in sys.modules
        import torch, kernels
        from kernels import reference as R
        x = torch.randn(3, 200)
        (q, s), (rq, rs) = kernels.act_quant(x), R.act_quant(x)
        print(kernels.backend(), torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs))
    """)
    clean = {k: v for k, v in os.environ.items() if k not in ("MINI_DEEPSEEK_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], env=clean | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["interpret", "True"]


def test_set_backend_round_trip():
    active = kernels.backend()
    assert active in ("triton", "interpret", "torch")
    try:
        assert kernels.set_backend("torch") == "torch" == kernels.backend()
        x = torch.randn(3, 200)
        assert all(torch.equal(a, b) for a, b in zip(kernels.act_quant(x), R.act_quant(x), strict=True))
    finally:
        assert kernels.set_backend("torch" if active == "torch" else "triton") == active
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.set_backend("cuda")


def test_with_cuda_cpu_tensors_take_the_plain_pytorch_backend(monkeypatch):
    """On a machine with a CUDA GPU the active backend is compiled Triton, whose kernels run CUDA tensors only. Faked
    here: CUDA reported available, compiled mode chosen by set_backend, every Triton kernel replaced by one that
    fails. CPU tensors must still work, through kernels.reference, in the kernels and in the library's FP8 model."""
    triton = pytest.importorskip("triton")
    from mini_deepseek import DeepSeekV3, ModelConfig, quantize_to_fp8, set_kernels

    monkeypatch.setattr(kernels, "_backend", kernels.backend())  # restored after the test, as are the others
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)  # what _load_triton reads: compiled, not interpreted
    compiled = {}
    for name in ("act_quant", "weight_quant", "weight_dequant", "fp8_gemm", "fused_moe"):
        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"a CPU tensor reached the compiled Triton kernel {name}")
        compiled[name] = refuse
    monkeypatch.setattr(kernels, "_triton_impls", compiled)  # set first, so no Triton module is imported compiled
    assert kernels.set_backend("auto") == "triton" == kernels.backend()
    assert kernels.backend("cuda") == "triton" and kernels.backend("cpu") == kernels.backend("meta") == "torch"

    x, w = torch.randn(5, 200), torch.randn(72, 200)
    (a_q, a_s), (b_q, b_s) = kernels.act_quant(x), kernels.weight_quant(w)
    for ours, ref in [((a_q, a_s), R.act_quant(x)), ((b_q, b_s), R.weight_quant(w))]:
        assert torch.equal(ours[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(ours[1], ref[1])
    assert torch.equal(kernels.weight_dequant(b_q, b_s), R.weight_dequant(b_q, b_s))
    assert torch.equal(kernels.fp8_gemm(a_q, a_s, b_q, b_s), R.fp8_gemm(a_q, a_s, b_q, b_s))
    w1, w2, ids = torch.randn(3, 64, 200), torch.randn(3, 200, 32), torch.randint(0, 3, (5, 2))
    weights = torch.rand(5, 2)
    assert torch.equal(kernels.fused_moe(x, w1, w2, weights, ids), R.fused_moe(x, w1, w2, weights, ids))

    cfg = ModelConfig.preset("toy", n_layers=2, max_seq_len=16)
    model = quantize_to_fp8(DeepSeekV3(cfg))
    try:
        for mode in ("auto", "on"):  # "on": the library calls the kernels, which pick the reference for CPU tensors
            set_kernels(mode)
            assert model.generate(torch.randint(0, cfg.vocab_size, (1, 4)), 2).shape == (1, 6)
    finally:
        set_kernels("auto")
