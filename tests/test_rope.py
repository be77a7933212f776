"""The rotary table and rotation themselves, without transformers: which pairs turn, which way, by how much."""

import math

import pytest
import torch

from mini_deepseek import ModelConfig
from mini_deepseek.config import yarn_mscale
from mini_deepseek.rope import apply_rotary_emb, precompute_freqs_cis, rope_inv_freq


@pytest.mark.parametrize("factor, mscale, mscale_all_dim", [
    (40.0, 1.0, 1.0),  # V3: the two corrections cancel on cos/sin
    (40.0, 1.0, 0.5),
    (4.0, 0.707, 1.0),
    (4.0, 0.0, 0.0),  # no m given: transformers falls back to mscale(s) with m = 1
    (1.0, 1.0, 0.5),  # plain RoPE: magnitude 1 whatever m says
])
def test_yarn_rotary_table_magnitude(factor, mscale, mscale_all_dim):
    # transformers' attention_factor (and ours): cos/sin scaled by mscale(s, mscale) / mscale(s, mscale_all_dim).
    cfg = ModelConfig.preset("toy", rope_factor=factor, original_seq_len=16, mscale=mscale,
                             mscale_all_dim=mscale_all_dim)
    if factor == 1.0:
        expected = 1.0
    elif mscale and mscale_all_dim:
        expected = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        expected = yarn_mscale(factor)
    table = precompute_freqs_cis(cfg, 32)
    torch.testing.assert_close(table.abs(), torch.full(table.shape, expected), rtol=1e-6, atol=0)
    if (factor, mscale, mscale_all_dim) == (40.0, 1.0, 0.5):  # by hand: (0.1 ln 40 + 1) / (0.05 ln 40 + 1)
        assert expected == pytest.approx(1.155722, rel=1e-6)


def test_rotary_embedding_turns_interleaved_pairs_forward():
    # The published weights rotate adjacent pairs (2i, 2i+1) by +angle. A quarter turn sends (1, 0) to (0, 1) and
    # (0, 1) to (-1, 0); pairing (i, i + d/2) as rotate-half does, or turning backwards, gives [0, -1, 1, 0].
    quarter_turn = torch.polar(torch.ones(1, 2), torch.full((1, 2), math.pi / 2))  # [T=1, d/2=2]
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    torch.testing.assert_close(apply_rotary_emb(x, quarter_turn), torch.tensor([0.0, 1.0, -1.0, 0.0]).view(1, 1, 1, 4),
                               atol=1e-7, rtol=0)

    # Every position and pair of the toy table, against the rotation written out.
    cfg = ModelConfig.preset("toy")
    T, d = 10, cfg.rope_dim
    x = torch.randn(2, T, 3, d)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), rope_inv_freq(cfg))[None, :, None]  # [1, T, 1, d/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1)
    torch.testing.assert_close(apply_rotary_emb(x, precompute_freqs_cis(cfg, T)), expected.flatten(-2))
