"""mini_deepseek.fp8_numerics: number formats, scaling granularity, the limited-precision accumulator and the memory
accounting notebook 04 reports."""

import pytest
import torch

from kernels import reference as R
from mini_deepseek import (
    DeepSeekV3,
    FP8TrainingExperts,
    FP8TrainingLinear,
    ModelConfig,
    convert_to_fp8_training,
)
from mini_deepseek.fp8_numerics import (
    FORMATS,
    accumulation_error,
    amplify_outlier,
    error_beside_outlier,
    fake_quantize,
    limited_precision_sum,
    quantization_error,
    representable_values,
    round_to_bits,
    training_memory,
)


def test_formats_match_the_published_ranges():
    e4m3, e5m2 = FORMATS["E4M3"], FORMATS["E5M2"]
    assert (e4m3.max, e4m3.min_normal, e4m3.min_subnormal) == (448.0, 2.0**-6, 2.0**-9)
    assert (e5m2.max, e5m2.min_normal, e5m2.min_subnormal) == (57344.0, 2.0**-14, 2.0**-16)
    assert FORMATS["BF16"].relative_step == 2.0**-7 and FORMATS["FP32"].mantissa_bits == 23
    values = representable_values(e4m3)
    assert len(values) == 127 and values[1] == 2.0**-9 and values[-1] == 448.0  # 0, 7 subnormals, 119 normals
    assert len(representable_values(e5m2)) == 124  # 0, 3 subnormals, 30 exponents x 4 (the last one is inf/NaN)
    with pytest.raises(ValueError, match="too many"):
        representable_values(FORMATS["FP32"])


def test_fake_quantize_granularities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g)
    x[:, 3] *= 5000  # one outlier channel, in the first 128-wide tile of every token
    assert torch.equal(fake_quantize(x, "1x128"), R.act_dequant(*R.act_quant(x)))
    assert torch.equal(fake_quantize(x, "128x128"), R.weight_dequant(*R.weight_quant(x), dtype=torch.float32))
    errors = {s: quantization_error(x, fake_quantize(x, s)) for s in ("per-tensor", "1x128", "128x128")}
    # The outlier sets the scale of its tile, block or tensor: the coarser the group, the more small values it pushes
    # into E4M3's subnormals (3 mantissa bits fewer) or to zero.
    assert errors["per-tensor"].underflow > errors["128x128"].underflow > errors["1x128"].underflow
    assert errors["per-tensor"].median_element > 1.2 * errors["1x128"].median_element
    away = quantization_error(x[:, 128:], fake_quantize(x, "1x128")[:, 128:])  # tiles without the outlier
    assert away.underflow == 0 and away.relative < 0.03
    with pytest.raises(ValueError, match="unknown scaling"):
        fake_quantize(x, "per-channel")
    with pytest.raises(ValueError, match="not E5M2"):
        fake_quantize(x, "1x128", FORMATS["E5M2"])


def test_round_to_bits_and_the_accumulator():
    x = torch.tensor([1.9375, -1.9375, 1.0625, 3.0], dtype=torch.float64)
    assert round_to_bits(x, 4).tolist() == [1.875, -1.875, 1.0, 3.0]
    assert round_to_bits(x, 4, "nearest").tolist() == [2.0, -2.0, 1.0, 3.0]  # 1.0625: tie to even
    products = torch.tensor([1.0] + [1 / 16] * 15, dtype=torch.float64)
    assert limited_precision_sum(products, 4).item() == 1.0
    assert limited_precision_sum(products, 4, promote_every=4).item() == 1.75
    with pytest.raises(ValueError, match="rounding must be"):
        round_to_bits(x, 4, "up")


def test_accumulation_error_grows_with_k_and_promotion_bounds_it():
    short, long = accumulation_error(256, n_outputs=64), accumulation_error(2048, n_outputs=64)
    promoted = accumulation_error(2048, promote_every=128, n_outputs=64)
    assert long > 4 * short and promoted < short  # truncation error grows about linearly in K
    assert accumulation_error(2048, acc_bits=24, n_outputs=64) < 1e-5  # an FP32-like accumulator


def test_training_memory_counts_what_the_model_holds_and_saves():
    cfg = ModelConfig.preset("toy")
    memory = training_memory(cfg)
    torch.manual_seed(0)
    model = convert_to_fp8_training(DeepSeekV3(cfg))
    fp8_params = sum(p.numel() for m in model.modules() if isinstance(m, (FP8TrainingLinear, FP8TrainingExperts))
                     for p in m.parameters())
    assert memory.fp8_params == fp8_params
    assert memory.fp8_params + memory.other_params == sum(p.numel() for p in model.parameters())

    # Count the distinct inputs of the converted layers in one forward: routed experts see their k tokens each.
    # Keyed by storage, holding each input so that no later tensor reuses its memory.
    inputs: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}

    def record(module, args):
        x = args[0]
        if isinstance(module, FP8TrainingExperts):  # each token's input, and its SwiGLU output, once per chosen expert
            inputs["routed", x.data_ptr()] = x, x.numel() * cfg.n_activated_experts + args[1].numel() * cfg.moe_inter_dim
        else:
            inputs["dense", x.data_ptr()] = x, x.numel()

    for m in model.modules():
        if isinstance(m, (FP8TrainingLinear, FP8TrainingExperts)):
            m.register_forward_pre_hook(record)
    batch, seq = 2, 16
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (batch, seq)), return_mtp=True)
    # The MTP module sees seq - 1 positions; every token of the main model passes every layer.
    main_and_mtp = sum(n for _, n in inputs.values())
    mtp_tokens, tokens = batch * (seq - 1), batch * seq
    per_token_mtp = memory.linear_inputs_per_token - training_memory(cfg.replace(n_mtp_modules=0)).linear_inputs_per_token
    assert main_and_mtp == (memory.linear_inputs_per_token - per_token_mtp) * tokens + per_token_mtp * mtp_tokens
    assert memory.bytes_per_token(fp8=True) == pytest.approx(memory.linear_inputs_per_token * (1 + 4 / 128))
    assert memory.weight_bytes(fp8=True) < 0.6 * memory.weight_bytes(fp8=False)


@pytest.mark.parametrize("along", ["channel", "token"])
def test_error_beside_outlier_measures_everything_but_the_outlier(along):
    """Against the same arithmetic written out with the outlier's column (row) 7 deleted by hand; and what notebook
    04 teaches: at 10,000x, one scale per tensor flushes other elements to zero, 1 x 128 tiles along the channels do
    not (for a channel outlier)."""
    torch.manual_seed(0)
    t = torch.randn(64, 256) * torch.rand(1, 256)
    if along == "channel":
        t[:, 7] *= 20
    else:
        t[7] *= 20
    for scaling in ("per-tensor", "1x128", "128x128"):
        amplified = amplify_outlier(t, 1_000, along)
        x_hat = fake_quantize(amplified, scaling)
        drop = (lambda x: torch.cat([x[:, :7], x[:, 8:]], dim=1)) if along == "channel" else \
            (lambda x: torch.cat([x[:7], x[8:]], dim=0))
        assert error_beside_outlier(t, 1_000, along, scaling) == quantization_error(drop(amplified), drop(x_hat))
    if along == "channel":
        assert error_beside_outlier(t, 10_000, along, "per-tensor").underflow > 0.05
        assert error_beside_outlier(t, 10_000, along, "1x128").underflow < 0.05
