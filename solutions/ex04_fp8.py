"""Reference answers to exercises/ex04_fp8.py (the docstrings there are the specification)."""

import torch

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float32 x -> uint8 E4M3 codes: nearest value, ties to even, saturating at 448, NaN -> 0x7F."""
    x = x.float()
    sign = torch.signbit(x).to(torch.uint8) << 7
    magnitude = x.abs().clamp(max=E4M3_MAX)  # saturation (an infinity too); NaN stays NaN
    # The grid spacing near |x|: 2^(e - 3) for |x| in [2^e, 2^(e+1)); below 2^-6 the subnormals keep 2^-9.
    exponent = torch.frexp(magnitude.clamp(min=2.0**-6)).exponent - 1  # |x| in [2^e, 2^(e+1)), at least 2^-6
    quantum = torch.exp2(exponent - 3.0)
    steps = torch.round(magnitude / quantum)  # torch.round rounds half to even; exact, steps <= 16
    value = steps * quantum  # the chosen E4M3 value; steps == 16 has carried into the next exponent
    normal = value >= 2.0**-6
    value_exponent = torch.frexp(value.clamp(min=2.0**-6)).exponent - 1.0
    biased = torch.where(normal, value_exponent + 7, 0)
    mantissa = torch.where(normal, value / torch.exp2(value_exponent - 3) - 8, value / 2.0**-9)
    code = (biased.to(torch.uint8) << 3) | mantissa.to(torch.uint8)
    return torch.where(x.isnan(), torch.tensor(0x7F, dtype=torch.uint8), sign | code)


def _scale_shape(shape: tuple[int, int], block_rows: int, block_cols: int) -> tuple[int, int]:
    return -(-shape[0] // block_rows), -(-shape[1] // block_cols)


def _expand(s: torch.Tensor, shape: tuple[int, int], block_rows: int, block_cols: int) -> torch.Tensor:
    """The scale of every element's block, [R, C]."""
    return s.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)[: shape[0], : shape[1]]


def quantize_blocks(x: torch.Tensor, block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    R, C = x.shape
    nr, nc = _scale_shape((R, C), block_rows, block_cols)
    padded = torch.zeros(nr * block_rows, nc * block_cols)
    padded[:R, :C] = x.float().abs()
    amax = padded.view(nr, block_rows, nc, block_cols).amax(dim=(1, 3))  # [nr, nc]
    s = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    q = (x.float() / _expand(s, (R, C), block_rows, block_cols)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    return q.float() * _expand(s, tuple(q.shape), block_rows, block_cols)


def limited_precision_sum(products: torch.Tensor, acc_bits: int = 14, promote_every: int | None = None) -> torch.Tensor:
    products = products.double()
    acc = torch.zeros(products.shape[:-1], dtype=torch.float64)
    total = torch.zeros(products.shape[:-1], dtype=torch.float32)
    for k in range(products.shape[-1]):
        mantissa, exponent = torch.frexp(acc + products[..., k])
        acc = torch.trunc(mantissa * 2.0**acc_bits) * torch.exp2((exponent - acc_bits).double())
        if promote_every is not None and (k + 1) % promote_every == 0:
            total, acc = total + acc.float(), torch.zeros_like(acc)
    return acc if promote_every is None else (total + acc.float()).double()


def block_scaled_matmul(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                        block_size: int = 128, acc_bits: int | None = None) -> torch.Tensor:
    (M, K), N = a_q.shape, b_q.shape[0]
    a, b = a_q.float(), b_q.float()
    b_scale_rows = b_s.repeat_interleave(block_size, 0)[:N]  # [N, n_steps]: each row's block scale
    c = torch.zeros(M, N)
    for j, start in enumerate(range(0, K, block_size)):
        a_step, b_step = a[:, start:start + block_size], b[:, start:start + block_size]
        if acc_bits is None:
            partial = a_step @ b_step.T  # [M, N]
        else:
            products = a_step[:, None, :].double() * b_step[None, :, :].double()  # [M, N, step]
            partial = limited_precision_sum(products, acc_bits).float()
        c += partial * a_s[:, j, None] * b_scale_rows[None, :, j]
    return c
