"""Padding masks and generation: the one masking rule of attention_ops, left-padded ragged batches (forward and
generate), rows that finish at eos, and non-finite logits."""

import pytest
import torch
import torch.nn.functional as F
from test_model import VARIANTS, ids, tiny_model

from mini_deepseek.attention_ops import attend, attend_one_kv_head, attention_mask

TOL = dict(atol=2e-5, rtol=0)  # float rounding: rotations at other absolute positions, other expert batches


# --- the primitives ---------------------------------------------------------------------------------------------
def reference_attention(q, k, v, scale, padding):
    """Softmax attention written out: query i at key position S - T + i sees keys j <= S - T + i that are not
    padding, and always itself."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale  # [B, H, T, S]
    for b in range(B):
        for i in range(T):
            for j in range(S):
                visible = j <= S - T + i and (padding is None or not padding[b, j] or j == S - T + i)
                if not visible:
                    scores[b, :, i, j] = float("-inf")
    return scores.softmax(dim=-1) @ v


@pytest.mark.parametrize("T, S", [(5, 5), (1, 6), (3, 7)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attend_follows_the_one_masking_rule(T, S, padded, kv_heads):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, kv_heads, S, 8), torch.randn(2, kv_heads, S, 6)
    padding = torch.zeros(2, S, dtype=torch.bool)
    padding[1, :3] = True  # row 1: three padding keys on the left
    padding = padding if padded else None
    expected = reference_attention(q, k, v, 0.3, padding)
    torch.testing.assert_close(attend(q, k, v, 0.3, padding), expected)
    if kv_heads == 1:  # heads folded into query rows (MQA over MLA's latent)
        torch.testing.assert_close(attend_one_kv_head(q, k, v, 0.3, padding), expected)


def test_attention_mask_keeps_every_row_nonempty():
    padding = torch.tensor([[True, True, False, False]])
    mask = attention_mask(4, 4, padding)[0, 0]
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False],  # padding queries: themselves
                             [False, False, True, False], [False, False, True, True]]
    with pytest.raises(ValueError, match="last T"):
        attention_mask(5, 4)


# --- forward with a padding mask --------------------------------------------------------------------------------
MASK_CASES = [("mla", "naive"), ("mla", "absorb"), ("mla-yarn", "absorb"), ("gqa", "naive"), ("mqa", "naive")]


@pytest.mark.parametrize("variant, mode", MASK_CASES)
def test_left_padded_row_gives_the_logits_it_gives_alone(variant, mode):
    model = tiny_model(mla_mode=mode, **VARIANTS[variant])
    short, long = ids(B=1, T=7), ids(B=1, T=12)
    batch = torch.cat([torch.cat([torch.full((1, 5), 3), short], dim=1), long])  # row 0: 5 padding tokens
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    padded = model(batch, attention_mask=mask)
    torch.testing.assert_close(padded[0, 5:], model(short)[0], **TOL)
    torch.testing.assert_close(padded[1], model(long)[0], **TOL)
    assert torch.isfinite(padded).all()  # padding positions too: no NaN leaks into the cache or the experts
    # the same through a KV cache, in two chunks (the mask covers the cached positions)
    cache = model.new_cache(2, 12)
    chunks = [model(batch[:, :8], cache=cache, attention_mask=mask[:, :8]),
              model(batch[:, 8:], start_pos=8, cache=cache, attention_mask=mask)]
    torch.testing.assert_close(torch.cat(chunks, dim=1)[0, 5:], padded[0, 5:], **TOL)


def test_padding_is_not_seen_by_real_tokens_and_not_counted_by_the_router():
    model = tiny_model()
    batch = ids(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :4] = False
    other = batch.clone()
    other[:, :4] = (other[:, :4] + 7) % 264  # different padding tokens
    a, b = model(batch, attention_mask=mask), model(other, attention_mask=mask)
    torch.testing.assert_close(a[:, 4:], b[:, 4:], **TOL)
    assert model.expert_load().sum(dim=1).tolist() == [2 * 6 * 2] * 2  # 2 rows x 6 tokens x top-2, per MoE layer


def test_bad_attention_masks_raise_clear_errors():
    model = tiny_model()
    x = ids(B=2, T=6)
    hole = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6])
    with pytest.raises(ValueError, match="between the tokens"):
        model(x, attention_mask=hole)
    with pytest.raises(ValueError, match="expected"):
        model(x, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="only 1"):
        model(x, attention_mask=torch.full((2, 6), 2))
    with pytest.raises(ValueError, match="bool or integer"):
        model(x, attention_mask=torch.ones(2, 6))
    right_padded = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    model(x, attention_mask=right_padded)  # forward accepts padding on the right (completions)
    with pytest.raises(ValueError, match="LEFT"):
        model.generate(x, 3, attention_mask=right_padded)


# --- generate -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, mode", MASK_CASES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_generates_what_each_row_generates_alone(variant, mode, use_cache):
    model = tiny_model(mla_mode=mode, **VARIANTS[variant])
    prompts = [ids(B=1, T=n)[0] for n in (4, 9, 6)]
    batch = torch.stack([F.pad(p, (9 - len(p), 0), value=0) for p in prompts])  # left padding with token 0
    mask = torch.stack([F.pad(torch.ones_like(p), (9 - len(p), 0)) for p in prompts])
    out = model.generate(batch, 12, use_cache=use_cache, attention_mask=mask)
    assert out.shape == (3, 21) and torch.equal(out[:, :9], batch)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 12, use_cache=use_cache)
        assert torch.equal(out[row, 9:], alone[0, len(prompt):]), row


def test_finished_rows_emit_only_padding_and_generation_stops_when_all_are_done():
    model = tiny_model()
    prompts = ids(B=2, T=5)
    free = model.generate(prompts, 10)[:, 5:]
    step = 2
    eos = int(free[0, step])
    assert eos not in free[1].tolist(), "pick another seed: row 1 emits the chosen eos too"
    out = model.generate(prompts, 10, eos_id=eos, pad_id=7)
    assert out.shape == (2, 15)  # row 1 never finishes
    assert torch.equal(out[0, 5:5 + step + 1], free[0, :step + 1])  # up to and with eos
    assert out[0, 5 + step + 1:].tolist() == [7] * (10 - step - 1)  # then padding only
    assert torch.equal(out[1, 5:], free[1])
    # pad_id defaults to eos_id; once every row emitted it, generation stops
    both = model.generate(prompts[:1].expand(2, -1), 10, eos_id=eos)
    assert both.shape == (2, 5 + step + 1) and (both[:, -1] == eos).all()


def test_non_finite_logits_raise_instead_of_sampling_token_zero():
    model = tiny_model().train()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(RuntimeError, match="not finite"):
            model.generate(ids(B=2, T=4), 3, temperature=temperature)
    assert model.training  # generate restores the mode it found, error or not
