"""`python -m tests.mutants` (`make mutants`): plant plausible mistakes in the library, the kernels and the exercise
solutions, one at a time, and check that the tests meant to catch each one fail.

A test suite proves what it can fail on. Each entry of MUTANTS below is one mistake someone could plausibly make
(a flipped sign, a mask aligned to the wrong corner, a scale read from the wrong block): a file, an exact piece of
its text, what that text becomes, and the tests that must then fail. For every mutant the script edits a
temporary copy of the repository (never the working tree), runs those tests there with `pytest -x`, restores the
file, and prints a table: caught (and by which test) or MISSED, with the time taken. It exits non-zero when a
mutant is missed, when its tests error instead of failing, or when an anchor is not found exactly once.

Before the mutants run, the same tests run on the unmodified copy and must pass: a test that already fails would
"catch" every mutant.

    python -m tests.mutants              # every mutant (a few minutes)
    python -m tests.mutants -k rope      # the mutants whose name or file contains "rope"
    python -m tests.mutants --list       # the list, nothing run

Adding a mutant: append a Mutant(...) to MUTANTS. The anchor is copied from the source exactly, long enough to
occur once; when someone edits that code, the anchor stops matching and this script says so loudly, so that the
mutant is re-anchored rather than silently dropped. The tests are pytest arguments run from the repository root:
node ids, plus options such as `--impl=solutions` for the graded exercise tests. Name the quickest tests that
catch the mistake first (pytest stops at the first failure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # per pytest run


@dataclass(frozen=True)
class Mutant:
    name: str  # the mistake, in a few words
    file: str  # relative to the repository root
    anchor: str  # exact text, found exactly once in `file`
    replacement: str  # what the anchor becomes
    tests: tuple[str, ...]  # pytest arguments (node ids, options) of the tests that must fail


SOLVED = "--impl=solutions"  # the graded exercise tests, run on the reference answers

MUTANTS: list[Mutant] = [
    # --- multi-token prediction ---------------------------------------------------------------------------------
    Mutant("MTP concatenates the hidden state first (the paper's order, not the checkpoints')", "mini_deepseek/mtp.py",
           "torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1)",
           "torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1)",
           ("tests/test_mtp.py::test_eh_proj_takes_the_normalized_embedding_first",)),
    Mutant("MTP depth k embeds token i+k-1 instead of i+k (off by one)", "mini_deepseek/model.py",
           "self.embed_tokens(input_ids[:, k:])", "self.embed_tokens(input_ids[:, k - 1:T - 1])",
           ("tests/test_model.py::test_model_is_causal_and_mtp_sees_exactly_one_more_token",)),
    Mutant("MTP modules read h before the main model's final norm (h^0 is after it)", "mini_deepseek/model.py",
           # _hidden ends with the final norm; the mutant skips it there (an identity forward for the one call) and
           # applies it for the output head only, so the MTP modules get the un-normalized h
           "        h = self._hidden(input_ids, freqs, start_pos, cache, padding, counted)  # [B, T, dim]\n"
           "        logits = self.lm_head(h).float()\n",
           "        self.norm.__dict__['forward'] = lambda x: x\n"
           "        h = self._hidden(input_ids, freqs, start_pos, cache, padding, counted)\n"
           "        del self.norm.__dict__['forward']\n"
           "        logits = self.lm_head(self.norm(h)).float()\n",
           ("tests/test_model.py::test_mtp_reads_the_normalized_main_output_and_chains_through_the_head_norm",)),
    Mutant("nucleus sampling drops the token that crosses top_p", "mini_deepseek/model.py",
           "outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p",
           "outside = sorted_probs.cumsum(dim=-1) >= top_p",
           ("tests/test_sampling.py::test_nucleus_is_the_smallest_prefix_reaching_top_p",)),
    Mutant("temperature multiplies the logits instead of dividing them", "mini_deepseek/model.py",
           "probs = (logits.float() / temperature).softmax(dim=-1)",
           "probs = (logits.float() * temperature).softmax(dim=-1)",
           ("tests/test_sampling.py::test_temperature_divides_the_logits",)),
    # --- speculative decoding with the MTP modules --------------------------------------------------------------
    Mutant("speculative sampling accepts a draft with min(1, q/p) instead of min(1, p/q)",
           "mini_deepseek/speculative.py",
           "passed = u * q_draft < p_draft", "passed = u * p_draft < q_draft",
           ("tests/test_speculative.py::test_verify_sampled_emits_the_target_distribution",)),
    Mutant("speculative sampling resamples a rejection from p, not from max(0, p - q)",
           "mini_deepseek/speculative.py",
           "residual = (p[rows, accepted] - q_after[rows, accepted]).clamp_min(0)",
           "residual = p[rows, accepted]",
           ("tests/test_speculative.py::test_verify_sampled_emits_the_target_distribution",)),
    Mutant("speculative decoding keeps the MTP cache entries that read a rejected draft (no rollback)",
           "mini_deepseek/speculative.py",
           "valid[k - 1] = min(n - 1, n + j - k)", "valid[k - 1] = min(n - 1, n + j + 1 - k)",
           ("tests/test_speculative.py::test_drafts_are_what_the_training_forward_predicts",)),
    # --- RoPE and YaRN ------------------------------------------------------------------------------------------
    Mutant("YaRN: cos/sin left at magnitude 1", "mini_deepseek/rope.py",
           "magnitude = torch.full_like(angles, rope_attention_factor(cfg))", "magnitude = torch.ones_like(angles)",
           ("tests/test_rope.py::test_yarn_rotary_table_magnitude",)),
    Mutant("YaRN: cos/sin scaled by mscale(s, mscale), not the ratio with mscale_all_dim", "mini_deepseek/config.py",
           "return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)",
           "return yarn_mscale(factor, mscale)",
           ("tests/test_rope.py::test_yarn_rotary_table_magnitude",)),
    Mutant("YaRN: softmax scale without mscale^2", "mini_deepseek/config.py",
           "            scale *= m * m\n", "            scale *= 1.0\n",
           ("tests/test_config.py::test_v3_softmax_scale_has_the_yarn_correction",)),
    Mutant("softmax scale 1/sqrt(d_nope), forgetting the rope dims", "mini_deepseek/config.py",
           'd = self.qk_head_dim if self.attn_type == "mla" else self.head_dim',
           'd = self.qk_nope_head_dim if self.attn_type == "mla" else self.head_dim',
           ("tests/test_config.py::test_v3_softmax_scale_has_the_yarn_correction",)),
    Mutant("RoPE rotates rotate-half pairs (i, i + d/2) instead of interleaved pairs (2i, 2i+1)",
           "mini_deepseek/rope.py",
           "    pairs = torch.view_as_complex(x.float().reshape(B, T, H, d // 2, 2))  # [B, T, H, d/2] complex\n"
           "    rotated = pairs * freqs_cis.view(1, T, 1, d // 2)\n"
           "    return torch.view_as_real(rotated).reshape(B, T, H, d).to(x.dtype)",
           "    pairs = torch.view_as_complex(x.float().reshape(B, T, H, 2, d // 2).transpose(-1, -2).contiguous())\n"
           "    rotated = pairs * freqs_cis.view(1, T, 1, d // 2)\n"
           "    return torch.view_as_real(rotated).transpose(-1, -2).reshape(B, T, H, d).to(x.dtype)",
           ("tests/test_rope.py::test_rotary_embedding_turns_interleaved_pairs_forward",)),
    Mutant("RoPE turns the wrong way (conjugate rotation)", "mini_deepseek/rope.py",
           "rotated = pairs * freqs_cis.view(1, T, 1, d // 2)",
           "rotated = pairs * freqs_cis.conj().view(1, T, 1, d // 2)",
           ("tests/test_rope.py::test_rotary_embedding_turns_interleaved_pairs_forward",)),
    # --- attention ----------------------------------------------------------------------------------------------
    Mutant("causal mask off by one (a query does not see its own key)", "mini_deepseek/attention_ops.py",
           "mask = keys[None, :] <= query_pos[:, None]  # [T, S] causal",
           "mask = keys[None, :] < query_pos[:, None]  # [T, S] causal",
           ("tests/test_model.py::test_cached_chunks_equal_full_forward",)),
    Mutant("causal mask aligned to the top-left corner (query i at key position i, not S - T + i)",
           "mini_deepseek/attention_ops.py",
           "query_pos = torch.arange(S - T, S, device=device)", "query_pos = torch.arange(T, device=device)",
           ("tests/test_model.py::test_cached_chunks_equal_full_forward",)),
    Mutant("absorbed MLA: mask rows head-major while the query rows are token-major", "mini_deepseek/attention_ops.py",
           "attention_mask(T, S, padding, q.device).repeat_interleave(H, dim=2)",
           "attention_mask(T, S, padding, q.device).repeat(1, 1, H, 1)",
           ("tests/test_model.py::test_absorbed_mla_equals_naive",)),
    Mutant("padding keys visible to real queries", "mini_deepseek/attention_ops.py",
           "return (mask & ~padding[:, None, None, :]) | itself", "return mask | itself",
           ("tests/test_generate.py::test_left_padded_row_gives_the_logits_it_gives_alone",)),
    Mutant("MLA: latent c_KV not normalized (kv_a_layernorm skipped)", "mini_deepseek/mla.py",
           "c_kv = self.kv_a_layernorm(c_kv)", "c_kv = c_kv",
           ("tests/exercises/test_ex01_attention.py", SOLVED, "--exercise=mla_keys_values")),
    Mutant("the outlier's cost measured beside the smallest channel instead of the outlier",
           "mini_deepseek/fp8_numerics.py",
           "rest[int(t.abs().amax(dim=dim).argmax())] = False", "rest[int(t.abs().amax(dim=dim).argmin())] = False",
           ("tests/test_fp8_numerics.py::test_error_beside_outlier_measures_everything_but_the_outlier",)),
    Mutant("RMSNorm rounded twice: cast to bf16, then the weight (as transformers' RMSNorm does)",
           "mini_deepseek/norm.py",
           "return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)",
           "return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight.to(x.dtype)",
           ("tests/test_norm.py::test_rms_norm_is_the_exact_value_rounded_once",)),
    # --- the MoE gate -------------------------------------------------------------------------------------------
    Mutant("bias update sign flipped (load - mean)", "mini_deepseek/moe.py",
           "torch.sign(self.last_load.mean() - self.last_load)", "torch.sign(self.last_load - self.last_load.mean())",
           ("tests/test_model.py::test_bias_update_moves_towards_balance",)),
    Mutant("dropped groups masked with 0 instead of -inf", "mini_deepseek/moe.py",
           'grouped.masked_fill(dropped.unsqueeze(-1), float("-inf"))',
           "grouped.masked_fill(dropped.unsqueeze(-1), 0.0)",
           ("tests/test_model.py::test_negative_biased_scores_never_pick_a_masked_group",)),
    Mutant("gating weights taken from the biased scores", "mini_deepseek/moe.py",
           "weights = scores.gather(1, indices)", "weights = biased.gather(1, indices)",
           ("tests/test_model.py::test_bias_changes_selection_but_not_the_gating_weights",)),
    Mutant("no routed scaling factor", "mini_deepseek/moe.py",
           "weights = weights * self.route_scale", "weights = weights * 1.0",
           ("tests/test_model.py::test_group_limited_routing_and_routed_scaling",)),
    Mutant("top-k gating weights not normalized", "mini_deepseek/moe.py",
           "weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)", "weights = weights",
           ("tests/test_model.py::test_group_limited_routing_and_routed_scaling",)),
    Mutant("group score is the group's best expert (V2) instead of its top-2 sum (V3)", "mini_deepseek/moe.py",
           "group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)", "group_scores = grouped.amax(dim=-1)",
           ("tests/test_model.py::test_group_limited_routing_and_routed_scaling",)),
    Mutant("sequence-wise balance loss: f_i without the N_r / K_r factor", "mini_deepseek/moe.py",
           "f = (in_topk.view(-1, seq_len, E) * w).sum(dim=1) * (E / k) / per_token",
           "f = (in_topk.view(-1, seq_len, E) * w).sum(dim=1) / per_token",
           ("tests/test_model.py::test_sequence_balance_loss_matches_the_formula",)),
    Mutant("sequence-wise balance loss: P_i from affinities not normalized over the experts", "mini_deepseek/moe.py",
           "probs = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}", "probs = scores  # s'_{i,t}",
           ("tests/test_model.py::test_sequence_balance_loss_matches_the_formula",)),
    Mutant("routing statistics count padding and -100 targets", "mini_deepseek/moe.py",
           "ones = torch.ones_like(weights) if counted is None else counted[:, None].expand_as(weights).float()",
           "ones = torch.ones_like(weights)",
           ("tests/test_generate.py::test_padding_is_not_seen_by_real_tokens_and_not_counted_by_the_router",
            "tests/test_moe.py::test_expert_load_counts_only_the_counted_tokens")),
    Mutant("routing bias cast to bf16 with the model (its +-gamma updates round away)", "mini_deepseek/moe.py",
           "            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)\n",
           "            pass\n",
           ("tests/test_model.py::test_routing_bias_stays_float32_when_the_model_is_cast",)),
    Mutant("mla_mode auto: the prefill attends per head but leaves the latent out of the cache", "mini_deepseek/mla.py",
           "            write_cache(cache[\"latent\"], torch.cat([c_kv, k_pe.squeeze(2)], dim=-1).unsqueeze(1), start_pos)\n",
           "",
           ("tests/test_model.py::test_auto_mode_caches_the_latent_prefills_naive_and_decodes_absorbed",)),
    Mutant("mla_mode auto: decoding takes the naive path too (the latent cache decompressed by nobody)",
           "mini_deepseek/mla.py", "(self.mode == \"auto\" and cache is not None and start_pos > 0)",
           "(self.mode == \"auto\" and cache is not None and start_pos > 10**9)",
           ("tests/test_model.py::test_auto_mode_caches_the_latent_prefills_naive_and_decodes_absorbed",)),
    Mutant("MoE layer's grouped experts drop the gating weights", "mini_deepseek/moe.py",
           "        out = out * weights.flatten()[pair, None]  # scaled by each pair's gating weight\n", "",
           ("tests/test_moe.py::test_moe_adds_the_shared_experts_to_the_routed_ones",)),
    Mutant("MoE layer's grouped experts take the up half as the gate", "mini_deepseek/moe.py",
           "gate, up = grouped_matmul(x[token], self.w_gate_up, ends).chunk(2, dim=-1)",
           "up, gate = grouped_matmul(x[token], self.w_gate_up, ends).chunk(2, dim=-1)",
           ("tests/test_moe.py::test_moe_adds_the_shared_experts_to_the_routed_ones",)),
    Mutant("MoE layer's grouped experts: pairs not sorted by expert (rows meet the wrong expert's weights)",
           "mini_deepseek/moe.py", "expert_of_pair, pair = indices.flatten().sort(stable=True)",
           "expert_of_pair, pair = indices.flatten().sort(stable=True)[0], torch.arange(indices.numel())",
           ("tests/test_moe.py::test_moe_adds_the_shared_experts_to_the_routed_ones",)),
    Mutant("MoE layer's grouped experts: each pair's gating weight read by its sorted position", "mini_deepseek/moe.py",
           "weights.flatten()[pair, None]", "weights.flatten()[:, None]",
           ("tests/test_moe.py::test_moe_adds_the_shared_experts_to_the_routed_ones",)),
    Mutant("grouped matmul: block ends counted from the left (experts shifted by one block)", "mini_deepseek/moe.py",
           "torch.arange(self.n_experts, device=x.device), right=True,", "torch.arange(self.n_experts, device=x.device), right=False,",
           ("tests/test_moe.py::test_moe_adds_the_shared_experts_to_the_routed_ones",)),
    Mutant("compiled grouped matmul: the weight gradient always through padded blocks (other bits than eager)",
           "mini_deepseek/moe.py", "return grad_rows, torch._grouped_mm(grad.t(), rows, offs=ends)",
           "pass",
           ("tests/test_moe.py::test_the_grouped_operator_for_torch_compile_gives_the_eager_bits_and_gradients",)),
    Mutant("grouped matmul fallback: the padded product read back in padded order (padding rows kept)",
           "mini_deepseek/moe.py", "torch.bmm(padded, w.transpose(1, 2))[expert, slot]",
           "torch.bmm(padded, w.transpose(1, 2)).flatten(0, 1)[:M]",
           ("tests/test_moe.py::test_grouped_matmul_runs_each_block_of_rows_through_its_own_matrix",)),
    Mutant("shared experts left out of the MoE output", "mini_deepseek/moe.py",
           "y = y + self.shared_experts(flat)", "y = y",
           ("tests/test_moe.py::test_moe_adds_the_shared_experts_to_the_routed_ones",)),
    # --- load balancing: the expert-level auxiliary loss, MaxVio, expert parallelism (notebook 02) ------------
    Mutant("expert-level aux loss: f_i = share of the slots, without the E / K factor", "mini_deepseek/moe.py",
           "f = counts * E / (self.topk * n)", "f = counts / n",
           ("tests/test_model.py::test_expert_balance_loss_is_alpha_at_uniform_affinities_and_pushes_overloaded_experts_down",
            "tests/test_model.py::test_expert_balance_loss_matches_the_formula")),
    Mutant("expert-level aux loss: P_i averaged over every token, padding and -100 targets included",
           "mini_deepseek/moe.py", "P = (probs * w[:, None]).sum(dim=0) / n", "P = probs.mean(dim=0)",
           ("tests/test_model.py::test_expert_balance_loss_counts_only_the_counted_tokens",)),
    Mutant("sequence-wise loss averaged over every sequence, those without counted tokens included",
           "mini_deepseek/moe.py", "per_sequence.sum() / has_tokens.sum().clamp(min=1)",
           "per_sequence.sum() / len(has_tokens)",
           ("tests/test_model.py::test_sequence_balance_loss_counts_only_the_counted_tokens",)),
    Mutant("expert-level aux loss: P_i from affinities not normalized over the experts", "mini_deepseek/moe.py",
           "probs = scores / scores.sum(dim=-1, keepdim=True)  # [N, E]", "probs = scores  # [N, E]",
           ("tests/test_model.py::test_expert_balance_loss_matches_the_formula",)),
    Mutant("MaxVio of the busiest layer instead of the mean over layers", "mini_deepseek/train.py",
           "load.mean(dim=-1).clamp_min(1e-9) - 1).mean().item()", "load.mean(dim=-1).clamp_min(1e-9) - 1).amax().item()",
           ("tests/test_train.py::test_max_violation",)),
    Mutant("expert parallelism: each rank's bias update sees only its own tokens' load", "mini_deepseek/expert_parallel.py",
           "            dist.all_reduce(self.gate.last_load, group=self.group)", "            pass",
           ("tests/test_expert_parallel.py::test_expert_parallel_matches_one_process",)),
    # --- the expert loop (kernels.reference.fused_moe: the MoE layer's loop and the kernels' specification) ------
    Mutant("expert loop drops the routing weights", "kernels/reference.py",
           "y.index_add_(0, tokens, out * flat_weights[slots, None].to(compute_dtype))",
           "y.index_add_(0, tokens, out)",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    Mutant("expert loop swaps the gate and up halves of w_gate_up", "kernels/reference.py",
           "gate, up = linear(x[tokens], w1s[e], w1_scale[e] if fp8 else None).chunk(2, dim=-1)",
           "up, gate = linear(x[tokens], w1s[e], w1_scale[e] if fp8 else None).chunk(2, dim=-1)",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    Mutant("FP8 expert loop: SwiGLU output not re-quantized before the down projection", "kernels/reference.py",
           "out = linear(h, w2s[e], w2_scale[e] if fp8 else None)",
           "out = F.linear(h.to(compute_dtype), weight_dequant(w2s[e], w2_scale[e], block_size, compute_dtype) "
           "if fp8 else w2s[e].to(compute_dtype))",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    Mutant("weight_dequant divides by weight_scale_inv (its name suggests an inverse)", "kernels/reference.py",
           "blocks = _block_view(q, block_size).mul_(s[..., :, None, :, None])",
           "blocks = _block_view(q, block_size).div_(s[..., :, None, :, None])",
           ("tests/test_checkpoint.py::test_fp8_checkpoint",)),
    # --- Triton kernels -----------------------------------------------------------------------------------------
    Mutant("FP8 GEMM: no per-128 promotion (partials summed unscaled, scales applied once at the end)",
           "kernels/fp8.py",
           "        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # promote this 128-deep partial to float32\n"
           "        a_ptrs += BLOCK_K\n"
           "        b_ptrs += BLOCK_K\n",
           "        acc += tl.dot(a, b)\n"
           "        a_ptrs += BLOCK_K\n"
           "        b_ptrs += BLOCK_K\n"
           "    acc = acc * a_s[:, None] * b_s[None, :]\n",
           ("tests/kernels/test_fp8_kernels.py::test_ragged_shapes_use_partial_blocks",)),
    Mutant("FP8 GEMM: every K step reads the first step's weight scale", "kernels/fp8.py",
           "b_s = tl.load(b_s_ptrs + step, mask=col_ok, other=0.0)", "b_s = tl.load(b_s_ptrs, mask=col_ok, other=0.0)",
           ("tests/kernels/test_fp8_kernels.py::test_ragged_shapes_use_partial_blocks",)),
    Mutant("FP8 quantization without the amax floor (an all-zero tile divides 0 by 0)", "kernels/fp8.py",
           "tl.div_rn(tl.maximum(amax, amax_floor), _FP8_MAX)", "tl.div_rn(amax, _FP8_MAX)",
           ("tests/kernels/test_fp8_kernels.py::test_zero_tiles_get_finite_scale_and_zero_codes",)),
    Mutant("E4M3 rounding truncates instead of rounding to nearest even", "kernels/fp8.py",
           "rounded = ((steps + RNE_MAGIC) - RNE_MAGIC) * quantum", "rounded = tl.floor(steps) * quantum",
           ("tests/kernels/test_fp8_kernels.py::test_rounding_cases",)),
    Mutant("fused MoE kernel: every K step reads the first step's weight scale", "kernels/moe.py",
           "b_s = tl.load(b_s_ptrs + step, mask=col_ok, other=0.0)", "b_s = tl.load(b_s_ptrs, mask=col_ok, other=0.0)",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",
            "tests/test_fp8_model.py::test_interpreted_triton_kernels_on_a_model_with_several_k_steps")),
    Mutant("fused MoE kernel: every K step reads the first step's activation scale", "kernels/moe.py",
           "a_s = tl.load(a_s_ptrs + step, mask=slot_ok, other=0.0) if FP8 else 0.0",
           "a_s = tl.load(a_s_ptrs, mask=slot_ok, other=0.0) if FP8 else 0.0",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    Mutant("fused MoE kernel: the up rows take the gate rows' block scales", "kernels/moe.py",
           "up_s_ptrs = w_s_ptr + expert * stride_wse + ((cols + N) // BLOCK_K) * NK",
           "up_s_ptrs = w_s_ptr + expert * stride_wse + (cols // BLOCK_K) * NK",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    Mutant("fused MoE kernel: routing weight never multiplied in", "kernels/moe.py",
           "ROUTED_WEIGHT=not swiglu", "ROUTED_WEIGHT=False",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    Mutant("fused MoE kernel: silu applied to the up half", "kernels/moe.py",
           "acc = acc * tl.sigmoid(acc) * acc_up", "acc = acc_up * tl.sigmoid(acc_up) * acc",
           ("tests/kernels/test_fused_moe.py::test_routing_edge_cases",)),
    # --- FP8 layers and checkpoints -----------------------------------------------------------------------------
    Mutant("FP8Linear quantizes the weight only, the activations enter the GEMM unquantized", "mini_deepseek/fp8.py",
           "        x_q, x_s = ops.act_quant(x, self.block_size)  # [..., in] codes, [..., ceil(in / bs)] per-token "
           "scales\n        return ops.fp8_gemm(x_q, x_s, self.weight, self.weight_scale_inv, self.block_size, "
           "out_dtype=x.dtype)",
           "        return x @ self.dequantized_weight(x.dtype).T",
           ("tests/test_fp8_model.py::test_fp8_linear_error_is_fp8_rounding",)),
    Mutant("quantize_to_fp8 also quantizes the output head", "mini_deepseek/fp8.py",
           "if isinstance(child, nn.Linear) and name not in _KEPT_LINEARS:", "if isinstance(child, nn.Linear):",
           ("tests/test_fp8_model.py::test_quantize_to_fp8_replaces_what_deepseek_quantizes",)),
    Mutant("FP8 checkpoint loading divides by weight_scale_inv", "mini_deepseek/checkpoint.py",
           "return weight_dequant(t, s, block, out_dtype)", "return weight_dequant(t, 1 / s, block, out_dtype)",
           ("tests/test_checkpoint.py::test_fp8_checkpoint",)),
    # --- data and training --------------------------------------------------------------------------------------
    Mutant("batches ignore the dataset's seed", "mini_deepseek/data.py",
           "generator = torch.Generator().manual_seed(_batch_seed(self.seed, split, step))\n"
           "        starts = torch.randint(",
           "generator = torch.Generator().manual_seed(_batch_seed(0, split, step))\n"
           "        starts = torch.randint(",
           ("tests/test_data.py::test_batches_depend_on_the_dataset_seed",)),
    Mutant("targets not shifted by one token", "mini_deepseek/data.py",
           "return chunk[:, :-1], chunk[:, 1:]", "return chunk[:, :-1], chunk[:, :-1]",
           ("tests/test_data.py::test_batches_are_windows_of_their_own_split",)),
    Mutant("training never updates the routing bias", "mini_deepseek/train.py",
           "            model.update_routing_bias()\n", "            pass\n",
           ("tests/test_train.py::test_training_updates_the_routing_bias",)),
    # --- pipeline schedules (notebook 05) -----------------------------------------------------------------------
    Mutant("1F1B: one warm-up forward too few on every stage", "mini_deepseek/pipeline/schedules.py",
           "    warmup = P - 1 - s\n", "    warmup = max(P - 2 - s, 0)\n",
           ("tests/test_pipeline.py::test_idle_time_equals_the_closed_form_on_every_device",)),
    Mutant("DualPipe's bubble with zero-bubble's 2W instead of its own 3W", "mini_deepseek/pipeline/simulate.py",
           '"dualpipe": (P // 2 - 1) * (FB + B - 3 * W)', '"dualpipe": (P // 2 - 1) * (FB + B - 2 * W)',
           ("tests/test_pipeline.py::test_idle_time_equals_the_closed_form_on_every_device",)),
    # --- GRPO (notebook 06) ---------------------------------------------------------------------------------------
    Mutant("group advantages with the population std (n) instead of the sample std (n - 1)", "mini_deepseek/grpo.py",
           "std = rewards.std(dim=1, keepdim=True)", "std = rewards.std(dim=1, keepdim=True, unbiased=False)",
           ("tests/test_grpo.py::test_group_advantages_hand_computed",)),
    Mutant("k3 with the log-ratio's sign flipped (log pi_theta / pi_ref)", "mini_deepseek/grpo.py",
           "log_ratio = ref_logp - logp  # log(pi_ref / pi_theta)", "log_ratio = logp - ref_logp",
           ("tests/test_grpo.py::test_kl_k3_hand_computed_and_shapes",)),
    Mutant("the clipped surrogate takes the max instead of the min (clips on the wrong side)", "mini_deepseek/grpo.py",
           "surrogate = torch.min(ratio * adv,", "surrogate = torch.max(ratio * adv,",
           ("tests/test_grpo.py::test_grpo_loss_hand_computed_grpo_and_dapo",)),
    Mutant("GRPO logs the KL of every pass, off-policy k3 after the first update included", "mini_deepseek/r1.py",
           'passes = 1 if key == "kl" else cfg.updates_per_batch', "passes = cfg.updates_per_batch",
           ("tests/test_r1.py::test_logged_kl_is_the_on_policy_estimate_before_the_updates",)),
    Mutant("GRPO curves over seeds: the thick line is the first seed, not the mean", "mini_deepseek/r1_plots.py",
           "ax.plot(steps, mean_over_seeds(curves), style", "ax.plot(steps, curves[0], style",
           ("tests/test_r1.py::test_plot_grpo_curves_draws_each_seed_and_their_mean",)),
    Mutant("metrics over seeds divided by the number of metrics instead of seeds", "mini_deepseek/r1_plots.py",
           "return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}",
           "return {k: sum(r[k] for r in runs) / len(runs[0]) for k in runs[0]}",
           ("tests/test_r1.py::test_mean_over_seeds_and_format_seeds",)),
    Mutant("format_seeds reports the first seed as the mean", "mini_deepseek/r1_plots.py",
           "mean = sum(values) / len(values)", "mean = values[0]",
           ("tests/test_r1.py::test_mean_over_seeds_and_format_seeds",)),
    Mutant("GRPO's per-token objective drops the KL term", "mini_deepseek/grpo.py",
           "return surrogate - beta * kl\n", "return surrogate\n",
           ("tests/test_grpo.py::test_per_token_objective_hand_computed_and_what_the_loss_averages",)),
    Mutant("the group explorer takes the ratio for its log (r where log r belongs)", "mini_deepseek/r1_plots.py",
           "logp = ratios.log()[None].expand(len(rewards), -1)", "logp = ratios[None].expand(len(rewards), -1)",
           ("tests/test_r1.py::test_group_objective_hand_computed",)),
    Mutant("the group explorer puts the clip of a positive advantage on the wrong side", "mini_deepseek/r1_plots.py",
           'return f"r > {1 + clip_eps:g}"', 'return f"r < {1 - clip_eps:g}"',
           ("tests/test_r1.py::test_parse_rewards_and_group_table",)),
    # --- FP8 training (notebook 04) ---
    Mutant("FP8 Dgrad: the weight transposed but its block scales not", "mini_deepseek/fp8_training.py",
           "w_t_q, w_t_s = w_q.T.contiguous(), w_s.T.contiguous()",
           "w_t_q, w_t_s = w_q.T.contiguous(), w_s.contiguous()",
           ("tests/test_fp8_training.py::test_gradients_equal_autograd_of_the_dequantized_arithmetic",)),
    Mutant("FP8 gradients quantized with the activations' amax floor (small gradients lose bits)",
           "mini_deepseek/fp8_training.py",
           "dy_q, dy_s = ops.act_quant(dy, bs, GRAD_AMAX_FLOOR)", "dy_q, dy_s = ops.act_quant(dy, bs)",
           ("tests/test_fp8_training.py::test_tiny_gradients_lose_nothing_to_the_amax_floor",)),
    Mutant("accumulator promotion keeps the partial sum instead of restarting it", "mini_deepseek/fp8_numerics.py",
           "total, acc = total + acc.float(), torch.zeros_like(acc)", "total, acc = total + acc.float(), acc * 0.5",
           ("tests/test_fp8_numerics.py::test_round_to_bits_and_the_accumulator",)),
    # --- exercise solutions (the graded tests must tell these apart from the right answers) ---------------------
    Mutant("exercise rms_norm computed in bf16 (the docstring asks float32)", "solutions/ex00_basics.py",
           "    x32 = x.float()\n    normalized = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)\n"
           "    return (normalized * weight.float()).to(x.dtype)",
           "    normalized = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)\n"
           "    return (normalized * weight).to(x.dtype)",
           ("tests/exercises/test_ex00_basics.py", SOLVED, "--exercise=rms_norm")),
    Mutant("exercise mla_absorbed_attention: causal mask aligned to the top-left corner", "solutions/ex01_attention.py",
           "_causal_softmax(scores.float())",
           "(scores.float().masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float('-inf'))"
           " if scores.shape[-2] > 1 else scores.float()).softmax(dim=-1)",
           ("tests/exercises/test_ex01_attention.py", SOLVED, "--exercise=mla_absorbed_attention")),
    Mutant("exercise update_bias: sign flipped (overloaded experts pushed up)", "solutions/ex02_balancing.py",
           "return bias + gamma * torch.sign(load.mean() - load)", "return bias + gamma * torch.sign(load - load.mean())",
           ("tests/exercises/test_ex02_balancing.py", SOLVED, "--exercise=update_bias")),
    Mutant("exercise sequence_balance_loss: f from the whole batch instead of each sequence",
           "solutions/ex02_balancing.py",
           "f = chosen.sum(dim=1) * E / (k * T)  # [B, E]", "f = chosen.sum(dim=(0, 1)) * E / (k * B * T)  # [E]",
           ("tests/exercises/test_ex02_balancing.py", SOLVED, "--exercise=sequence_balance_loss")),
]


# ---- running ----------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # "caught", "MISSED", "ERROR" or "NO ANCHOR"
    detail: str  # the failing test, or what went wrong
    seconds: float


def anchor_problem(mutant: Mutant, root: Path) -> str | None:
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.anchor)
    if count != 1:
        return f"anchor found {count} times in {mutant.file} (needs exactly 1): {mutant.anchor.strip()[:60]!r}"
    return None


def copy_repository(destination: Path) -> None:
    """The files git knows about (tracked, and untracked but not ignored): the working tree as a user has it."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a deleted but still tracked file is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_pytest(root: Path, args: tuple[str, ...]) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # No bytecode: a mutated module and its restored original can share an mtime, and a stale .pyc would hide one.
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1", MINI_DEEPSEEK_QUICK="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # small tests, one after another: threads only wait for each other
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *args],
                                cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as timeout:
        code, output = -1, f"timed out after {TIMEOUT_S} s\n{timeout.stdout or ''}"
    return code, output, time.perf_counter() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("FAILED "):
            return line.removeprefix("FAILED ").split(" - ")[0]
    return "?"


def run_mutant(mutant: Mutant, root: Path) -> Outcome:
    path = root / mutant.file
    original = path.read_text()
    path.write_text(original.replace(mutant.anchor, mutant.replacement))
    try:
        code, output, seconds = run_pytest(root, mutant.tests)
    finally:
        path.write_text(original)
    if code == 1:  # pytest: some test failed
        return Outcome("caught", first_failure(output), seconds)
    if code == 0:
        return Outcome("MISSED", "every listed test passed", seconds)
    return Outcome("ERROR", f"pytest exit code {code}:\n" + "\n".join(output.splitlines()[-15:]), seconds)


def baseline_arguments(mutants: list[Mutant]) -> tuple[str, ...]:
    """Every test the mutants name, once, with their options."""
    args = dict.fromkeys(a for m in mutants for a in m.tests)
    return tuple(a for a in args if not a.startswith("-")) + tuple(a for a in args if a.startswith("-"))


def print_table(rows: list[tuple[Mutant, Outcome]]) -> None:
    headers = ("mutant", "file", "result", "caught by", "s")
    cells = [headers] + [(m.name, m.file, o.status, o.detail if o.status == "caught" else o.detail.splitlines()[0],
                          f"{o.seconds:.0f}") for m, o in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="keyword", default="", help="only mutants whose name or file contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests; run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmodified copy")
    args = parser.parse_args(argv)
    selected = [m for m in MUTANTS if args.keyword.lower() in (m.name + " " + m.file).lower()]
    if not selected:
        parser.error(f"no mutant matches {args.keyword!r}")
    if args.list:
        problems = 0
        for m in selected:
            problem = anchor_problem(m, ROOT)
            problems += problem is not None
            print(f"{m.name}\n    {m.file}: {problem or 'anchor found'}; tests: {' '.join(m.tests)}")
        return 1 if problems else 0

    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        root = Path(tmp)
        copy_repository(root)
        missing = [(m, Outcome("NO ANCHOR", problem, 0.0)) for m in selected if (problem := anchor_problem(m, root))]
        runnable = [m for m in selected if not anchor_problem(m, root)]
        if runnable and not args.no_baseline:
            print(f"baseline: the {len(baseline_arguments(runnable))} test arguments of {len(runnable)} mutants on the "
                  "unmodified copy ...", flush=True)
            code, output, seconds = run_pytest(root, baseline_arguments(runnable))
            if code != 0:
                print(output[-6000:])
                print(f"the tests fail (exit code {code}) without any mutant: fix them first")
                return 2
            print(f"baseline passed in {seconds:.0f} s", flush=True)
        rows = list(missing)
        for i, mutant in enumerate(runnable, 1):
            outcome = run_mutant(mutant, root)
            print(f"[{i}/{len(runnable)}] {outcome.status:7s} {outcome.seconds:5.0f} s  {mutant.name}", flush=True)
            if outcome.status == "ERROR":
                print(outcome.detail)
            rows.append((mutant, outcome))

    print()
    print_table(rows)
    failed = [m.name for m, o in rows if o.status != "caught"]
    total = sum(o.seconds for _, o in rows)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} mutants caught in {total:.0f} s of test runs")
    if failed:
        print("not caught (or not run):\n  " + "\n  ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
