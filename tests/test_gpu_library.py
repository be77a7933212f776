"""The library without the kernels on a CUDA GPU, against the same seeds on the CPU: forward and backward, bf16
(torch._grouped_mm's experts on Hopper), cached greedy decoding and a few training steps.

First run on an H200 (benchmarks/results/h200.md): logits 7.7e-7 and gradients 1.3e-6 from the CPU's, the same
greedy tokens, training losses equal to 5 significant digits.
"""

import copy

import pytest
import torch

from mini_deepseek import DeepSeekV3, ModelConfig, set_kernels
from mini_deepseek.data import TokenDataset
from mini_deepseek.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = "cuda"
IDS = torch.randint(0, 264, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def plain_pytorch():
    set_kernels("off")  # the library's own PyTorch code; tests/test_fp8_model.py covers the kernels
    yield
    set_kernels("auto")


def small_model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(ModelConfig.preset("small"))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def logits_and_grads(device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = small_model().to(device).train()
    logits = model(IDS.to(device))
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_forward_and_backward_match_the_cpu():
    logits, grads = logits_and_grads(CUDA)
    cpu_logits, cpu_grads = logits_and_grads("cpu")
    assert relative_error(logits, cpu_logits) < 1e-5
    assert grads.keys() == cpu_grads.keys()
    for name in grads:
        assert relative_error(grads[name], cpu_grads[name]) < 1e-4, name


def test_bfloat16_runs_close_to_float32():
    model = small_model().to(CUDA).eval()
    half = copy.deepcopy(model).bfloat16()
    with torch.no_grad():
        assert relative_error(half(IDS.to(CUDA)), model(IDS.to(CUDA))) < 5e-2  # 1.3e-2 on an H200
    half.train()
    half(IDS.to(CUDA)).float().square().mean().backward()
    assert all(p.grad.isfinite().all() for p in half.parameters() if p.grad is not None)


def test_greedy_decoding_matches_the_cpu():
    prompt = IDS[:, :16]
    with torch.no_grad():
        on_gpu = small_model().to(CUDA).eval().generate(prompt.to(CUDA), 24).cpu()
        on_cpu = small_model().eval().generate(prompt, 24)
    assert torch.equal(on_gpu, on_cpu)  # logits agree to 1e-6: no near-tie flips at this seed


def test_training_matches_the_cpu():
    data = TokenDataset(torch.randint(0, 264, (20_000,), generator=torch.Generator().manual_seed(2)))
    cfg = TrainConfig(steps=5, batch_size=4, seq_len=64, eval_every=0, log_every=5)
    losses = {dev: [r["loss"] for r in train(small_model().to(dev), data, cfg).train] for dev in (CUDA, "cpu")}
    assert losses[CUDA] == pytest.approx(losses["cpu"], rel=1e-4)
