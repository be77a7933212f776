"""mini_deepseek/r1.py: sampling and scoring completions, the GRPO trainer (micro-batches that add up to the whole
batch, a frozen reference, bounded batches), rejection sampling, distillation, evaluation, and PPO's memory."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mini_deepseek import DeepSeekV3, ModelConfig, TrainConfig
from mini_deepseek.data import make_word_problem, word_problems
from mini_deepseek.grpo import kl_k3
from mini_deepseek.params import count_params
from mini_deepseek.r1 import (
    BYTES_FROZEN,
    BYTES_TRAINED,
    GRPOConfig,
    _optimize_on_batch,
    completion_logprobs,
    distill,
    evaluate,
    generate_completions,
    grpo_train,
    rejection_sample,
    rl_memory,
)
from mini_deepseek.tokenizer import TagTokenizer

tok = TagTokenizer()


def tiny_model(seed: int = 0, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("toy", dim=32, n_layers=2, inter_dim=64, moe_inter_dim=16, n_heads=2, q_lora_rank=16,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                             n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_mtp_modules=0,
                             max_seq_len=160, **overrides)
    return DeepSeekV3(cfg)


class ScriptedModel(torch.nn.Module):
    """Stands in for a policy: generate() appends a fixed completion chosen by the prompt's length, so tests can
    say exactly what was 'sampled'."""

    def __init__(self, replies: dict[int, str], max_seq_len: int = 256):
        super().__init__()
        self.config = ModelConfig.preset("toy", max_seq_len=max_seq_len)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.replies = replies

    def generate(self, input_ids, max_new_tokens, eos_id=None, attention_mask=None, **kwargs):
        rows = []
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(input_ids)
        for row, length in zip(input_ids.tolist(), lengths, strict=True):
            reply = tok.encode(self.replies[length], eos=True)[:max_new_tokens]
            rows.append(row + reply + [tok.pad_id] * (max_new_tokens - len(reply)))
        return torch.tensor(rows)


# --- sampling and scoring ------------------------------------------------------------------------------------------
def test_completion_logprobs_match_a_forward_pass_per_sequence():
    model = tiny_model().eval()
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11], [12, 13, 14]]
    logp, mask = completion_logprobs(model, prompts, completions, tok.pad_id)
    assert logp.shape == mask.shape == (2, 3)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([p + c])
            token_logp = F.log_softmax(model(ids)[0, :-1], dim=-1)  # [T-1, vocab]
            expected = torch.stack([token_logp[len(p) - 1 + j, t] for j, t in enumerate(c)])
            assert_close(logp[i, :len(c)], expected, atol=1e-5, rtol=1e-5)


def test_completion_logprobs_score_the_tempered_distribution():
    model = tiny_model().eval()
    logp, _ = completion_logprobs(model, [[5, 6, 7]], [[10, 11]], tok.pad_id, temperature=0.5)
    with torch.no_grad():
        scaled = F.log_softmax(model(torch.tensor([[5, 6, 7, 10]]))[0] / 0.5, dim=-1)  # [4, vocab]
    assert_close(logp[0], torch.stack([scaled[2, 10], scaled[3, 11]]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, [[5]], [[10]], tok.pad_id, temperature=0.0)


def test_an_empty_completion_has_no_tokens_in_the_mask_and_no_nan():
    logp, mask = completion_logprobs(tiny_model().eval(), [[5, 6, 7], [8, 9]], [[], [12]], tok.pad_id)
    assert mask.tolist() == [[False], [True]] and torch.isfinite(logp).all()
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        completion_logprobs(tiny_model(), [[5], [6]], [[1]], tok.pad_id)


def test_generate_completions_stop_at_eos_and_keep_it():
    model = ScriptedModel({3: "<think>1</think><answer>1</answer>", 4: "x" * 50})
    out = generate_completions(model, [[1, 2, 3], [1, 2, 3, 4]], max_new_tokens=8, eos_id=tok.eos_id)
    assert out[0] == tok.encode("<think>1</think><answer>1</answer>", eos=True)  # 6 tokens: eos kept, pads cut
    assert out[1] == tok.encode("x" * 8)  # never reached eos: cut at max_new_tokens


def test_prompts_longer_than_the_context_are_rejected_by_name():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 has 150 tokens.*max_seq_len = 160"):
        generate_completions(model, [[1] * 10, [1] * 150], max_new_tokens=20, eos_id=tok.eos_id)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_completions(model, [[]], max_new_tokens=5, eos_id=tok.eos_id)


# --- the trainer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_add_up_to_the_whole_batch(loss_type):
    torch.manual_seed(0)
    prompts = [[3 + i, 4, 5][: 1 + i % 3] for i in range(6)]
    completions = [list(range(20, 20 + n)) for n in (1, 4, 2, 5, 3, 1)]  # unequal lengths weigh differently
    advantages = torch.randn(6)
    grads = []
    for micro in (6, 4, 1):
        policy, reference = tiny_model(), tiny_model(seed=1)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        cfg = GRPOConfig(updates_per_batch=1, micro_batch_size=micro, loss_type=loss_type, grad_clip=0.0, beta=0.1)
        _optimize_on_batch(policy.eval(), reference.eval(), optimizer, prompts, completions, advantages, cfg,
                           tok.pad_id)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)


def test_logged_kl_is_the_on_policy_estimate_before_the_updates():
    # After an update the tokens are samples of pi_old, not of pi_theta: k3 on them is unbounded (notebook 06 logged
    # 41 from one token), so the logged KL is the mean k3 of the first pass, where pi_theta sampled the tokens.
    torch.manual_seed(0)
    prompts = [[3 + i, 4, 5][: 1 + i % 3] for i in range(6)]
    completions = [list(range(20, 20 + n)) for n in (1, 4, 2, 5, 3, 1)]
    advantages = torch.randn(6)
    policy, reference = tiny_model().eval(), tiny_model(seed=1).eval()
    with torch.no_grad():
        logp, mask = completion_logprobs(policy, prompts, completions, tok.pad_id)
        ref_logp, _ = completion_logprobs(reference, prompts, completions, tok.pad_id)
    expected = float(torch.where(mask, kl_k3(logp, ref_logp), 0.0).sum() / mask.sum())
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)  # a large step: the second pass's k3 differs a lot
    cfg = GRPOConfig(updates_per_batch=2, micro_batch_size=4, grad_clip=0.0, beta=0.1)
    stats = _optimize_on_batch(policy, reference, optimizer, prompts, completions, advantages, cfg, tok.pad_id)
    assert stats["kl"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        moved, _ = completion_logprobs(policy, prompts, completions, tok.pad_id)
    assert not torch.allclose(torch.where(mask, moved, 0.0), torch.where(mask, logp, 0.0), atol=1e-2)


def test_grpo_train_runs_and_logs_every_curve(monkeypatch):
    # A random model earns no rule reward, so no advantage, so no update: reward texts whose bytes sum to an even
    # number instead.
    import mini_deepseek.r1 as r1

    monkeypatch.setattr(r1, "rule_rewards", lambda text, answer, language: {
        "accuracy": float(sum(text.encode()) % 2 == 0), "format": 0.0, "language": 0.0})
    problems = word_problems(12, seed=0, levels=(1,))
    policy = tiny_model()
    reference = copy.deepcopy(policy)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    cfg = GRPOConfig(steps=2, prompts_per_step=3, group_size=2, updates_per_batch=2, max_new_tokens=8,
                     sample_batch_size=4, micro_batch_size=4, eval_every=1, lr=1e-3)
    history = grpo_train(policy, reference, tok, problems, cfg, eval_problems=problems[:4])
    assert [r["step"] for r in history.train] == [1, 2]
    for record in history.train:
        for key in ("reward", "accuracy", "format", "language", "length", "kl", "clip_fraction", "ratio"):
            assert math.isfinite(record[key]), key
        assert 1 <= record["length"] <= 8
    assert [e["step"] for e in history.evals] == [1, 2] and "val_accuracy" in history.evals[0]
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items()), "the reference moved"
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items()), "the policy did not move"


def test_grpo_config_rejects_groups_of_one_and_unknown_rewards():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOConfig(reward_weights={"length": 1.0})
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="temperature > 0"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="eval_samples"):
        GRPOConfig(eval_samples=4)  # several eval samples of a greedy decoder would all be the same


# --- evaluation, rejection sampling, distillation ------------------------------------------------------------------
def scripted_problems():
    right = make_word_problem(7, [("+", 5)])  # prompt of 35 tokens
    mixed = make_word_problem(9, [("-", 2), ("+", 1)], language="words", verbs=["sells", "gets"])
    return right, mixed


def test_evaluate_and_rejection_sampling_with_scripted_answers():
    right, mixed = scripted_problems()
    n_right, n_mixed = len(tok.encode(right.prompt)), len(tok.encode(mixed.prompt))
    assert n_right != n_mixed
    model = ScriptedModel({n_right: right.r1_completion, n_mixed: "<think>nine-two=7; 7+1=8</think><answer>8</answer>"})
    result = evaluate(model, tok, [right, mixed], max_new_tokens=60)
    assert result.metrics["accuracy"] == 1.0 and result.metrics["format"] == 1.0
    assert result.metrics["language"] == pytest.approx((1 + 2 / 6) / 2)
    assert result.metrics["accuracy_language_words"] == 1.0
    kept = rejection_sample(model, tok, [right, mixed], n_samples=3, max_new_tokens=60)
    assert kept.pairs == [(right.prompt, right.r1_completion)]  # one copy; the mixed-language answer filtered out
    assert kept.drawn == 6 and kept.prompts_with_a_keeper == 1
    relaxed = rejection_sample(model, tok, [right, mixed], n_samples=1, max_new_tokens=60, require=("accuracy",))
    assert len(relaxed.pairs) == 2
    sampled = evaluate(model, tok, [right, mixed], max_new_tokens=60, temperature=0.6, top_p=0.95, samples=3)
    assert len(sampled.completions) == 6 and sampled.completions[:3] == [right.r1_completion] * 3
    assert sampled.metrics["accuracy"] == 1.0
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate(model, tok, [right], max_new_tokens=60, samples=2)
    # "right in any format": the reasoning's conclusion, whether or not the answer tag agrees
    plain = evaluate(ScriptedModel({n_right: "<think>7+5=12; so 12</think><answer>1</answer>", n_mixed: " 9-2=7; so 8"}),
                     tok, [right, mixed], max_new_tokens=60, plain_format=True)
    assert plain.metrics["accuracy"] == 1.0 and "format" not in plain.metrics


def test_distill_trains_the_student_on_the_teachers_kept_samples():
    right, mixed = scripted_problems()
    teacher = ScriptedModel({len(tok.encode(right.prompt)): right.r1_completion,
                             len(tok.encode(mixed.prompt)): "no"})
    student = tiny_model()
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=100, warmup_steps=1, eval_every=0, log_every=1)
    history, samples = distill(teacher, student, tok, [right, mixed], n_samples=2, max_new_tokens=60, cfg=cfg)
    assert samples.pairs == [(right.prompt, right.r1_completion)] and len(history.train) == 3
    with pytest.raises(ValueError, match="nothing to distill"):
        distill(ScriptedModel({len(tok.encode(right.prompt)): "no"}), student, tok, [right], 1, 60, cfg)


# --- PPO against GRPO ----------------------------------------------------------------------------------------------
def test_rl_memory_counts_the_value_model():
    cfg = ModelConfig.preset("toy")
    policy = count_params(cfg).total
    value = policy - cfg.vocab_size * cfg.dim + cfg.dim
    memory = rl_memory(cfg)
    assert memory["GRPO"]["parameters"] == 2 * policy
    assert memory["PPO"]["parameters"] == 2 * policy + value
    assert memory["PPO"]["bytes"] - memory["GRPO"]["bytes"] == value * BYTES_TRAINED
    assert memory["GRPO"]["bytes"] == policy * (BYTES_TRAINED + BYTES_FROZEN)
    v3 = rl_memory(ModelConfig.preset("v3"))
    assert v3["GRPO"]["policy"] == 671_026_404_352  # the published 671B, from the config alone


def test_mean_over_seeds_and_format_seeds():
    from mini_deepseek.r1_plots import format_seeds, mean_over_seeds

    assert mean_over_seeds([[1.0, 2.0], [3.0, 6.0]]) == [2.0, 4.0]
    assert mean_over_seeds([{"a": 0.5, "b": 1.0}, {"a": 0.7, "b": 3.0}]) == pytest.approx({"a": 0.6, "b": 2.0})
    assert mean_over_seeds([{"a": 0.5}, {"a": 0.7}, {"a": 0.9}]) == pytest.approx({"a": 0.7})
    with pytest.raises(ValueError, match="different lengths"):
        mean_over_seeds([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="different keys"):
        mean_over_seeds([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        mean_over_seeds([])
    assert format_seeds([0.53, 0.505, 0.55]) == "52.8% (53.0 / 50.5 / 55.0)"
    assert format_seeds([27.5, 30.0], percent=False) == "28.8 (27.5 / 30.0)"
    assert format_seeds([0.4]) == "40.0%"
    assert format_seeds([0.0312, 0.0254], percent=False, digits=3) == "0.028 (0.031 / 0.025)"
    assert format_seeds([0.5], digits=0) == "50%"


def test_plot_grpo_curves_draws_each_seed_and_their_mean():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mini_deepseek.r1_plots import CURVES, plot_grpo_curves
    from mini_deepseek.train import History

    runs = []
    for offset in (0.0, 1.0):
        h = History()
        h.train = [{"step": s, "reward": s + offset, "kl": 0.1, "length": 10.0, "clip_fraction": 0.0}
                   for s in (1, 2)]
        h.evals = [{"step": 2, "val_accuracy": 0.2 + offset / 10}]
        runs.append(h)
    fig, axes = plt.subplots(1, len(CURVES))
    plot_grpo_curves(axes, {"two seeds": runs, "one": runs[0]}, window=1)
    reward_lines = axes[0].get_lines()
    assert len(reward_lines) == 4  # two seeds + their mean, then the single run
    assert list(reward_lines[2].get_ydata()) == [1.5, 2.5]
    assert list(axes[1].get_lines()[2].get_ydata()) == pytest.approx([0.25])
    plt.close(fig)


def test_group_objective_hand_computed():
    from mini_deepseek.r1_plots import group_objective

    advantages, objective = group_objective(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.5, 1.0, 1.5]),
                                            clip_eps=0.2, beta=0.04)
    a, b = 0.75 / (0.5 + 1e-4), -0.25 / (0.5 + 1e-4)  # the sample std of (1, 0, 0, 0) is 1/2
    assert_close(advantages, torch.tensor([a, b, b, b]))
    k3 = torch.tensor([1 / 0.5 + math.log(0.5) - 1, 0.0, 1 / 1.5 + math.log(1.5) - 1])  # pi_ref = pi_old
    # A > 0: the ratio term is r A up to 1 + eps, then flat; A < 0: flat below 1 - eps, then r A
    assert_close(objective[0], torch.tensor([0.5 * a, a, 1.2 * a]) - 0.04 * k3)
    assert_close(objective[1], torch.tensor([0.8 * b, b, 1.5 * b]) - 0.04 * k3)
    assert_close(objective[1], objective[3])


def test_parse_rewards_and_group_table():
    from mini_deepseek.r1_plots import group_table, parse_rewards

    assert parse_rewards("2, 2,1  0").tolist() == [2.0, 2.0, 1.0, 0.0]
    for bad, match in (("2, x", "numbers separated by commas"), ("  ", "no rewards")):
        with pytest.raises(ValueError, match=match):
            parse_rewards(bad)
    lines = group_table(torch.tensor([1.0, 0.0, 0.0, 0.0]), clip_eps=0.2, beta=0.0, ratios=(0.5, 1.5)).splitlines()
    assert lines[0].split() == ["sample", "reward", "advantage", "r", "=", "0.5", "r", "=", "1.5", "clipped", "where"]
    # sample 1: A = 0.75 / 0.5001 = +1.500, objective 0.5 A and 1.2 A; sample 2: A = -0.500, 0.8 A and 1.5 A
    assert lines[2].split() == ["1", "1", "+1.500", "+0.750", "+1.800", "r", ">", "1.2"]
    assert lines[3].split() == ["2", "0", "-0.500", "-0.400", "-0.750", "r", "<", "0.8"]
    equal = group_table(torch.tensor([1.0, 1.0]), clip_eps=0.2, beta=0.0, ratios=(1.0,)).splitlines()
    assert equal[2].split()[2:5] == ["+0.000", "+0.000", "nowhere"]


def test_plot_group_objective_one_curve_per_distinct_advantage(capsys):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mini_deepseek.r1_plots import group_objective, plot_group_objective, show_grpo_group

    rewards = torch.tensor([2.0, 2.0, 1.0, 0.0, 0.0])
    fig, axes = plt.subplots(1, 2)
    plot_group_objective(axes, rewards, clip_eps=0.2, beta=0.04)
    curves = [line for line in axes[1].get_lines() if len(line.get_xdata()) > 2]  # not the two clip edges
    # advantages (2, 2, 1, 0, 0) -> (+1, +1, 0, -1, -1) / (1 + eps): three distinct values, in decreasing order
    assert [line.get_label() for line in curves] == ["A = +1.00 (2 samples)", "A = +0.00 (1 sample)",
                                                     "A = -1.00 (2 samples)"]
    ratios = torch.tensor(curves[0].get_xdata(), dtype=torch.float32)
    _, objective = group_objective(rewards, ratios, 0.2, 0.04)
    for line, row in zip(curves, (0, 2, 3), strict=True):  # the advantages in decreasing order, one curve each
        assert_close(torch.tensor(line.get_ydata(), dtype=torch.float32), objective[row])
    assert len(axes[0].patches) == 2 * len(rewards)  # a reward bar and an advantage bar per sample
    plt.close(fig)
    show_grpo_group(0.2, 0.04, "1, one")  # a typo prints what is wrong, and draws nothing
    assert "not a group GRPO can use" in capsys.readouterr().out
