"""ModelConfig: every size and switch of a DeepSeek-V3-style model, validated on construction.

Field names follow DeepSeek's own inference code (`inference/model.py`, `ModelArgs`) so the two read side by
side; `ModelConfig.from_hf` maps the Hugging Face `config.json` names onto them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
SCORE_FUNCS = ("sigmoid", "softmax")
# "naive" decompresses K/V per head and caches them; "absorb" caches only the latent + rope key; "auto" (the default)
# runs absorbed wherever a KV cache is used (generate: DeepSeek's inference code always absorbs) and naive without
# one (training, evaluation), which is how DeepSeek trains and serves (mla.py).
MLA_MODES = ("auto", "naive", "absorb")


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------------------------
    vocab_size: int = 264  # tokens in the vocabulary (the byte tokenizer uses 256 bytes + 8 specials)
    dim: int = 128  # hidden size d of the residual stream
    n_layers: int = 4  # transformer blocks in the main model (MTP modules not counted)
    n_dense_layers: int = 1  # the first n_dense_layers blocks use a dense SwiGLU MLP instead of MoE
    inter_dim: int = 384  # width of the dense SwiGLU MLP
    moe_inter_dim: int = 64  # width of each routed and shared expert
    n_heads: int = 4  # attention (query) heads
    max_seq_len: int = 256  # longest sequence the RoPE table and the KV cache are built for
    norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    init_std: float = 0.02  # std of the normal init of Linear and Embedding weights
    tie_embeddings: bool = False  # share the input embedding with the output head (DeepSeek does not)

    # --- attention ---------------------------------------------------------------------------------------------
    attn_type: str = "mla"  # "mla" (DeepSeek), or a baseline: "mha", "gqa", "mqa"
    n_kv_heads: int = 0  # key/value heads for "gqa" (0 = n_heads); "mha" uses n_heads, "mqa" uses 1
    head_dim: int = 32  # per-head size of q, k and v for "mha"/"gqa"/"mqa" (RoPE on all of it)
    q_lora_rank: int = 64  # MLA: rank of the query compression (0 = queries projected directly, as V2-Lite)
    kv_lora_rank: int = 64  # MLA: d_c, size of the joint K/V latent that is cached
    qk_nope_head_dim: int = 32  # MLA: per-head query/key size that carries no position (d_h)
    qk_rope_head_dim: int = 16  # MLA: per-head decoupled RoPE size (d_h^R); the rope key is shared by heads
    v_head_dim: int = 32  # MLA: per-head value size
    mla_mode: str = "auto"  # MLA: "auto" absorbed with a KV cache (inference), naive without (training); or force one

    # --- mixture of experts ------------------------------------------------------------------------------------
    n_routed_experts: int = 8  # routed experts per MoE layer
    n_shared_experts: int = 1  # always-on shared experts per MoE layer (fused into one MLP of that width)
    n_activated_experts: int = 2  # top-k: routed experts each token is sent to
    n_expert_groups: int = 1  # experts are split into this many groups (nodes) for group-limited routing
    n_limited_groups: int = 1  # each token may route only within this many groups
    score_func: str = "sigmoid"  # V3: sigmoid affinities; V2: softmax
    route_scale: float = 1.0  # routed scaling factor multiplied into the gating weights (V3: 2.5)
    norm_topk_prob: bool = True  # normalize the chosen k gating weights to sum to one (V3 yes, V2-Lite no)
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing (0 freezes the bias)
    seq_aux_alpha: float = 0.0001  # alpha of the complementary sequence-wise balance loss (0 disables it)
    aux_loss_alpha: float = 0.0  # alpha of the classic expert-level balance loss over the whole batch (V2; 0 = off)

    # --- multi-token prediction --------------------------------------------------------------------------------
    n_mtp_modules: int = 1  # sequential MTP modules (depth D); V3 uses 1
    mtp_loss_weight: float = 0.3  # lambda weighting the mean MTP loss (V3: 0.3, later 0.1)

    # --- RoPE and YaRN -----------------------------------------------------------------------------------------
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_factor: float = 1.0  # YaRN context-extension factor s (1 = plain RoPE)
    original_seq_len: int = 4096  # context the model was pre-trained on, before YaRN
    beta_fast: float = 32.0  # YaRN: rotations above which a frequency is kept as is
    beta_slow: float = 1.0  # YaRN: rotations below which a frequency is fully interpolated
    mscale: float = 1.0  # YaRN: m of the rotary-embedding magnitude correction 0.1*m*ln(s)+1
    mscale_all_dim: float = 1.0  # YaRN: m used for the softmax-scale correction (squared into the scale)

    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # fields read from HF that we carry along

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: {why}")

        positive = ["vocab_size", "dim", "n_layers", "inter_dim", "moe_inter_dim", "n_heads", "max_seq_len",
                    "head_dim", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
                    "original_seq_len"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        non_negative = ["n_dense_layers", "n_kv_heads", "q_lora_rank", "n_shared_experts", "n_mtp_modules"]
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        for name in ["norm_eps", "init_std", "rope_theta", "rope_factor", "route_scale"]:
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                fail(name, "must be a positive number")
        for name in ["bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "mtp_loss_weight", "mscale", "mscale_all_dim"]:
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                fail(name, "must be a non-negative number")
        if self.n_dense_layers > self.n_layers:
            fail("n_dense_layers", f"exceeds n_layers = {self.n_layers}")
        if self.attn_type not in ATTENTION_TYPES:
            fail("attn_type", f"must be one of {ATTENTION_TYPES}")
        if self.attn_type == "gqa":
            kv = self.n_kv_heads or self.n_heads
            if self.n_heads % kv:
                fail("n_kv_heads", f"must divide n_heads = {self.n_heads} (each KV head serves a whole group)")
        if self.mla_mode not in MLA_MODES:
            fail("mla_mode", f"must be one of {MLA_MODES}")
        # Rotary embeddings rotate pairs of dimensions, so every rotated size must be even.
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.attn_type != "mla" and self.head_dim % 2:
            fail("head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.score_func not in SCORE_FUNCS:
            fail("score_func", f"must be one of {SCORE_FUNCS}")
        if self.n_activated_experts > self.n_routed_experts:
            fail("n_activated_experts", f"top-k exceeds n_routed_experts = {self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            fail("n_expert_groups", f"must divide n_routed_experts = {self.n_routed_experts}")
        if self.n_limited_groups > self.n_expert_groups:
            fail("n_limited_groups", f"(topk_group) exceeds n_expert_groups = {self.n_expert_groups} (n_group)")
        experts_in_reach = self.n_limited_groups * (self.n_routed_experts // self.n_expert_groups)
        if self.n_activated_experts > experts_in_reach:
            fail("n_activated_experts", f"top-k exceeds the {experts_in_reach} experts in the kept groups")
        if self.n_expert_groups > 1 and self.score_func == "sigmoid" and self.n_routed_experts // self.n_expert_groups < 2:
            fail("n_expert_groups", "sigmoid group scores sum the top-2 experts of a group: groups need >= 2")
        if self.rope_factor < 1:
            fail("rope_factor", "must be >= 1 (1 = plain RoPE, >1 = YaRN)")

    # ------------------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size of MLA: the no-position part plus the rope part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads of the non-MLA variants."""
        return {"mha": self.n_heads, "mqa": 1, "gqa": self.n_kv_heads or self.n_heads}.get(self.attn_type, self.n_heads)

    @property
    def rope_dim(self) -> int:
        """Size of the rotated part of each query/key head."""
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim

    @property
    def yarn(self) -> bool:
        return self.rope_factor > 1

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN (DeepSeek's correction of attention entropy).

        m = mscale_all_dim, as transformers does; DeepSeek's inference code uses `mscale` (and only when its
        max_seq_len exceeds original_seq_len). The published configs give both the same value.
        """
        d = self.qk_head_dim if self.attn_type == "mla" else self.head_dim
        scale = d**-0.5
        if self.yarn and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    def kv_cache_elements_per_token(self) -> int:
        """Elements cached per token over all layers (DeepSeek-V2, Table 1), for this config's attention (MLA's
        "auto" mode caches the latent, as "absorb" does)."""
        if self.attn_type == "mla":
            per_layer = (self.kv_lora_rank + self.qk_rope_head_dim) if self.mla_mode != "naive" else \
                self.n_heads * (self.qk_head_dim + self.v_head_dim)
        else:
            per_layer = 2 * self.kv_heads * self.head_dim
        return per_layer * self.n_layers

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """One of PRESETS: "toy", "small", "v2-lite", "v3"; keyword overrides change fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config (a dict, a config.json path, or a checkpoint folder)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        return cls(**hf_to_fields(config))

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (model_type deepseek_v3) for this config."""
        return fields_to_hf(self)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1*m*ln(s) + 1 (1 when the factor s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """YaRN's magnitude on cos/sin, transformers' `attention_factor`: yarn_mscale(s, mscale) / yarn_mscale(s,
    mscale_all_dim) when both are set, else yarn_mscale(s); 1 without YaRN (s <= 1)."""
    if factor <= 1:
        return 1.0
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


# ----------------------------------------------------------------------------------------------------------------
# Presets. "v3" and "v2-lite" are the published geometries; "toy" and "small" keep every mechanism at a size a
# laptop CPU trains in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "toy": dict(
        vocab_size=264, dim=128, n_layers=4, n_dense_layers=1, inter_dim=384, moe_inter_dim=64, n_heads=4,
        max_seq_len=256, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
        score_func="sigmoid", route_scale=1.0, n_mtp_modules=1,
    ),
    "small": dict(
        vocab_size=264, dim=256, n_layers=6, n_dense_layers=1, inter_dim=768, moe_inter_dim=128, n_heads=8,
        max_seq_len=1024, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
        n_limited_groups=2, score_func="sigmoid", route_scale=2.5, n_mtp_modules=1,
    ),
    # DeepSeek-V2-Lite (16B): config.json of deepseek-ai/DeepSeek-V2-Lite.
    "v2-lite": dict(
        vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, inter_dim=10944, moe_inter_dim=1408, n_heads=16,
        max_seq_len=163840, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
        n_limited_groups=1, score_func="softmax", route_scale=1.0, norm_topk_prob=False, n_mtp_modules=0,
        seq_aux_alpha=0.001, bias_update_speed=0.0,
        rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
    ),
    # DeepSeek-V3 (671B): config.json of deepseek-ai/DeepSeek-V3.
    "v3": dict(
        vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, inter_dim=18432, moe_inter_dim=2048, n_heads=128,
        max_seq_len=163840, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
        n_limited_groups=4, score_func="sigmoid", route_scale=2.5, norm_topk_prob=True, n_mtp_modules=1,
        rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
_HF_NAMES = {  # HF name -> our field
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers",
    "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_attention_heads": "n_heads",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "initializer_range": "init_std",
    "tie_word_embeddings": "tie_embeddings",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "norm_topk_prob": "norm_topk_prob",
    "num_nextn_predict_layers": "n_mtp_modules",
    "rope_theta": "rope_theta",
}
_HF_ROPE_NAMES = {  # HF rope_scaling / rope_parameters key -> our field
    "factor": "rope_factor",
    "original_max_position_embeddings": "original_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
}
# rope keys read without a field of their own: the type and theta; YaRN's attention_factor and truncate are accepted
# when they say what the fields above imply (checked in hf_to_fields), and rejected by name otherwise
_HF_ROPE_OTHER = ("rope_type", "type", "rope_theta")
_HF_YARN_CHECKED = ("attention_factor", "truncate")


# Our fields with no Hugging Face name, kept in config.json under "mini_deepseek" (transformers ignores the key).
_COURSE_KEY = "mini_deepseek"
_COURSE_FIELDS = ("mla_mode", "bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "mtp_loss_weight")


def hf_to_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Map a Hugging Face DeepSeek-V3/V2 config dict onto ModelConfig fields."""
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"config.json model_type = {model_type!r}: expected 'deepseek_v3' or 'deepseek_v2'")
    fields: dict[str, Any] = {ours: hf[theirs] for theirs, ours in _HF_NAMES.items() if hf.get(theirs) is not None}
    fields.setdefault("n_shared_experts", 0)
    fields.setdefault("n_mtp_modules", 0)
    if hf.get("q_lora_rank") is None:
        fields["q_lora_rank"] = 0  # HF writes null for "no query compression"
    if hf.get("n_routed_experts") is None:  # a dense-only model: keep the MoE fields valid but unused
        fields["n_dense_layers"] = fields.get("n_layers", 1)
    # transformers reads first_k_dense_replace >= num_hidden_layers as "every layer dense" (its default is 3).
    fields["n_dense_layers"] = min(fields.get("n_dense_layers", 1), fields.get("n_layers", 4))
    for name, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(name, want) != want:
            raise ValueError(f"config.json {name} = {hf[name]!r} is not supported (only {want!r})")
    if model_type == "deepseek_v2" and hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json moe_layer_freq = {hf['moe_layer_freq']!r}: only 1 (every layer MoE) fits")
    if model_type == "deepseek_v2":
        fields.setdefault("score_func", "softmax")
        fields.setdefault("norm_topk_prob", False)
        fields["n_mtp_modules"] = 0
        if hf.get("topk_method", "greedy") == "greedy":  # V2 "greedy": plain top-k, no group limit
            fields["n_expert_groups"] = fields["n_limited_groups"] = 1
    # Checkpoints published with transformers < 5 write rope_scaling; newer transformers write rope_parameters
    # (which also carries rope_theta). Either may be null for plain RoPE.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"config.json rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    known = _HF_ROPE_OTHER + ((*_HF_ROPE_NAMES, *_HF_YARN_CHECKED) if rope_type == "yarn" else ())
    unknown = sorted(set(rope) - set(known))
    if unknown:
        raise ValueError(f"config.json rope parameters {unknown} are not supported for rope type {rope_type!r} "
                         f"(known: {sorted(known)})")
    if rope_type == "yarn":
        for theirs, ours in _HF_ROPE_NAMES.items():
            if rope.get(theirs) is not None:
                fields[ours] = rope[theirs]
        if rope.get("factor") is None and "original_max_position_embeddings" in rope:  # transformers' fallback
            fields["rope_factor"] = hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
        # HF: mscale/mscale_all_dim default to 1 only when given; absent means "no correction" (m = 0).
        fields.setdefault("mscale", 0.0)
        fields.setdefault("mscale_all_dim", 0.0)
        fields.setdefault("original_seq_len", hf.get("max_position_embeddings", 4096))
        _check_yarn_extras(rope, fields)
    for name in ("rope_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "rope_theta"):
        if name in fields:
            fields[name] = float(fields[name])
    # head_dim, qk_head_dim and num_key_value_heads are derived (transformers writes num_key_value_heads = 128, its
    # default, even for a 4-head model): dropped here, written afresh by to_hf.
    # DeepSeek's own modeling code (MoEGate) weighs its balance loss by aux_loss_alpha: the sequence-wise loss when
    # seq_aux is true (its default, and what the published V2 and V3 configs say), which is our seq_aux_alpha; with
    # seq_aux false, DeepSeek-V2's expert-level loss over the whole batch, which is our aux_loss_alpha.
    # (The published V3 config.json says 0.001, V2's value; the V3 report gives alpha = 0.0001, the "v3" preset.)
    # Our own fields, under the "mini_deepseek" key below, take precedence over both.
    alpha = hf.get("aux_loss_alpha")
    if alpha is not None and hf.get("seq_aux", True):
        fields["seq_aux_alpha"] = float(alpha)
    elif alpha is not None:
        fields["aux_loss_alpha"] = float(alpha)
    course = hf.get(_COURSE_KEY) or {}
    unknown = sorted(set(course) - set(_COURSE_FIELDS))
    if unknown:
        raise ValueError(f"config.json {_COURSE_KEY} has unknown fields {unknown}; known: {list(_COURSE_FIELDS)}")
    fields.update(course)
    known = set(_HF_NAMES) | {"rope_scaling", "rope_parameters", "model_type", "head_dim", "qk_head_dim",
                              "num_key_value_heads", "aux_loss_alpha", "seq_aux", _COURSE_KEY}
    fields["extra"] = {k: v for k, v in hf.items() if k not in known}
    return fields


def _check_yarn_extras(rope: dict[str, Any], fields: dict[str, Any]) -> None:
    """attention_factor and truncate (transformers' YaRN options) must say what our fields imply: we derive the
    cos/sin magnitude from factor, mscale and mscale_all_dim, and floor/ceil the ramp's ends (truncate = true)."""
    given = rope.get("attention_factor")
    if given is not None:
        implied = yarn_attention_factor(float(fields.get("rope_factor", 1.0)), fields["mscale"], fields["mscale_all_dim"])
        if not math.isclose(given, implied, rel_tol=1e-6):
            raise ValueError(f"config.json rope attention_factor = {given} is not supported: ModelConfig derives "
                             f"it from factor, mscale and mscale_all_dim ({implied:.6g} here)")
    if rope.get("truncate", True) is not True:
        raise ValueError(f"config.json rope truncate = {rope['truncate']!r} is not supported: YaRN's correction "
                         "range is floored and ceiled to whole dimensions (truncate = true), as DeepSeek does")


def fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.attn_type != "mla":
        raise ValueError(f"ModelConfig.attn_type = {cfg.attn_type!r}: only MLA models have a deepseek_v3 config.json")
    hf: dict[str, Any] = {**cfg.extra}
    hf.update({theirs: getattr(cfg, ours) for theirs, ours in _HF_NAMES.items()})
    hf.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu",
              topk_method="noaux_tc", attention_bias=False, rope_interleave=True)
    if cfg.q_lora_rank == 0:
        hf["q_lora_rank"] = None
    hf["head_dim"] = cfg.qk_rope_head_dim
    # MLA has one key per query head; transformers would otherwise default num_key_value_heads to 128.
    hf["num_key_value_heads"] = cfg.n_heads
    hf[_COURSE_KEY] = {name: getattr(cfg, name) for name in _COURSE_FIELDS}
    hf["rope_scaling"] = None
    if cfg.yarn:
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                              "original_max_position_embeddings": cfg.original_seq_len,
                              "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                              "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim}
    return hf
