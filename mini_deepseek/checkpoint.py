"""Checkpoints in the published Hugging Face layout: `config.json` plus `*.safetensors` (one file, or shards with
`model.safetensors.index.json`), key names as in deepseek-ai/DeepSeek-V3.

    model = from_pretrained("path/to/checkpoint")                   # ready, in eval mode
    model = from_pretrained("path/to/DeepSeek-V3", n_layers=4)      # the first 4 layers of the 671B model
    save_pretrained(model, "out/", max_shard_size="2GB")

Our parameter names are the checkpoint's without the `model.` prefix, with two exceptions mapped here:

    ours                                        checkpoint
    layers.{i}.mlp.experts.w_gate_up [E,2I,D]   model.layers.{i}.mlp.experts.{e}.gate_proj.weight [I,D]  (rows :I)
                                                model.layers.{i}.mlp.experts.{e}.up_proj.weight   [I,D]  (rows I:)
    layers.{i}.mlp.experts.w_down    [E,D,I]    model.layers.{i}.mlp.experts.{e}.down_proj.weight [D,I]
    layers.{i}.mlp.experts.w_*_scale_inv        the experts' weight_scale_inv, stacked the same way (FP8)
    mtp.{k}.*                                   model.layers.{n_layers + k}.*

The published MTP layer also repeats the embedding (`model.layers.{n}.embed_tokens.weight`) and the output head
(`model.layers.{n}.shared_head.head.weight`). We write both copies on save, as the published layout does, and on
load check their shapes and skip them: the model shares the main embedding and head. transformers saves the
published per-expert layout too (checkpoints written with `save_original_format=False` hold its in-memory fused
`mlp.experts.gate_up_proj` [E,2I,D] / `mlp.experts.down_proj` [E,D,I]; we read those as well), and never saves
MTP weights: a checkpoint without any MTP key loads as a model without MTP modules.

FP8 checkpoints (the published V3 weights) store Linear weights as float8_e4m3fn with a float32
`weight_scale_inv` per block (`quantization_config.weight_block_size`, 128 x 128). By default they are
dequantized to `dtype` on load. With `fp8=True` the model is built with FP8 layers (fp8.py) and keeps them as
they are, codes and scales; a weight the checkpoint holds in higher precision is then quantized. Stacking the
experts keeps their scales exactly when moe_inter_dim is a multiple of the block (V3: 2048 = 16 x 128), or when
gate and up share one block row (the toy preset); otherwise a block of the stack would mix gate and up rows
with different scales, and the experts are quantized anew. save_pretrained writes an FP8 model in the
published FP8 layout.

Only safetensors files are read (never pickle), and lazily: a shard is opened only when it holds a tensor the
model needs, so the first layers of a 671B checkpoint load on a laptop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.reference import FP8, block_scale_shape, weight_dequant, weight_quant

from .config import ModelConfig
from .fp8 import fp8_block_size, quantize_to_fp8
from .model import DeepSeekV3
from .rope import precompute_freqs_cis

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FP8_BLOCK = 128  # the block side when a checkpoint's quantization_config gives none

_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_MAX_LISTED = 40  # keys listed per kind in an error message


class CheckpointNotice(UserWarning):
    """A one-line notice about how a checkpoint was read (e.g. it has no MTP weights)."""


# ----------------------------------------------------------------------------------------------------------------
# Name mapping
def hf_key(name: str, n_layers: int) -> str:
    """Our state-dict name -> the checkpoint key (stacked expert tensors excepted: see expert_keys)."""
    if name.startswith("mtp."):
        _, k, rest = name.split(".", 2)
        return f"model.layers.{n_layers + int(k)}.{rest}"
    return name if name == "lm_head.weight" else "model." + name


def expert_keys(prefix: str, n_experts: int) -> dict[str, list[str]]:
    """Per-expert checkpoint keys of one MoE layer; prefix like 'model.layers.3.mlp.experts'."""
    return {proj: [f"{prefix}.{e}.{proj}.weight" for e in range(n_experts)]
            for proj in ("gate_proj", "up_proj", "down_proj")}


def _mtp_duplicates(n_layers: int, n_mtp: int) -> list[str]:
    return [f"model.layers.{n_layers + k}.{s}" for k in range(n_mtp)
            for s in ("embed_tokens.weight", "shared_head.head.weight")]


def to_hf_state_dict(model: DeepSeekV3, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the published checkpoint keys, per-expert weights (and FP8 scales) split out.

    Tensors may be views sharing storage (expert slices, the MTP layer's copies of the embedding and head); the
    routing bias, FP8 codes and their scales keep their dtypes, other floating tensors are cast to dtype when given.
    """
    cfg = model.config
    n = cfg.n_layers
    block = fp8_block_size(model)

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = dtype is None or not t.is_floating_point() or t.dtype == FP8 or \
            name.endswith(("e_score_correction_bias", "_scale_inv"))
        return t if keep else t.to(dtype)

    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers saves only the embedding
        if name.endswith(("experts.w_gate_up_scale_inv", "experts.w_down_scale_inv")):
            continue  # split out with their weights
        if name.endswith(("experts.w_gate_up", "experts.w_down")):
            prefix = hf_key(name, n).rsplit(".", 1)[0]
            projs = ("gate_proj", "up_proj") if name.endswith("w_gate_up") else ("down_proj",)
            rows = [t.shape[1] // len(projs)] * len(projs)
            scale = state.get(name + "_scale_inv")  # FP8 experts only
            for e in range(t.shape[0]):
                for proj, w in zip(projs, t[e].split(rows), strict=True):
                    out[f"{prefix}.{e}.{proj}.weight"] = cast(name, w)
                if scale is None:
                    continue
                scales = _regroup_scales([scale[e]], [t.shape[1]], rows, block)
                if scales is None:
                    raise ValueError(f"{name}: moe_inter_dim = {rows[0]} is not a multiple of the FP8 block "
                                     f"{block}, so blocks of the stacked experts mix gate and up rows, which the "
                                     "per-expert checkpoint layout cannot express; save the model before "
                                     "quantize_to_fp8")
                for proj, s in zip(projs, scales, strict=True):
                    out[f"{prefix}.{e}.{proj}.weight_scale_inv"] = s
            continue
        out[hf_key(name, n)] = cast(name, t)
        if name.startswith("mtp.") and name.endswith(".shared_head.norm.weight"):  # the published copies
            layer = hf_key(name, n).split(".shared_head")[0]
            out[f"{layer}.embed_tokens.weight"] = cast(name, state["embed_tokens.weight"])
            out[f"{layer}.shared_head.head.weight"] = cast(name, state["lm_head.weight"])
    return out


def _regroup_scales(scales: list[torch.Tensor], rows: list[int], new_rows: list[int],
                    block: int) -> list[torch.Tensor] | None:
    """Block scales of matrices stacked along their rows (heights `rows`) -> the block scales of the same rows cut
    into heights `new_rows`: one expert's gate and up scales -> those of its w_gate_up, or back. None if a new
    block would span rows with different scales."""
    per_row = torch.cat([s.repeat_interleave(block, dim=0)[:n] for s, n in zip(scales, rows, strict=True)])
    parts = per_row.split(new_rows)  # each [height, ceil(cols / block)]: the scale of every row's blocks
    regrouped = [part[::block] for part in parts]
    exact = all(torch.equal(r.repeat_interleave(block, dim=0)[:len(part)], part)
                for r, part in zip(regrouped, parts, strict=True))
    return regrouped if exact else None


# ----------------------------------------------------------------------------------------------------------------
# Reading safetensors headers (8-byte little-endian length, then JSON) without touching the tensor data
def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype string, shape)} of one safetensors file, read from its header only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


class _Shards:
    """Which file holds each key (from the index, or every file's header), with headers read on demand."""

    def __init__(self, folder: str):
        self.folder = folder
        self.headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        index = os.path.join(folder, INDEX_NAME)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.file_of: dict[str, str] = json.load(f)["weight_map"]
            return
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            raise FileNotFoundError(f"no *.safetensors in {folder}" + (
                f" (found {pickled}: pickle files are never loaded, convert them to safetensors)" if pickled else ""))
        self.file_of = {}
        for file in files:
            for key in self.header(file):
                self.file_of[key] = file

    def header(self, file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        if file not in self.headers:
            self.headers[file] = read_safetensors_header(os.path.join(self.folder, file))
        return self.headers[file]

    def info(self, key: str) -> tuple[str, tuple[int, ...]] | None:
        """(dtype, shape) of key if its shard's header has been read, else None."""
        header = self.headers.get(self.file_of.get(key, ""))
        return None if header is None else header.get(key)


# ----------------------------------------------------------------------------------------------------------------
# Loading: plan which checkpoint keys make each of our tensors, check names (index only) and shapes (headers of
# the shards to be read), then read.
@dataclass
class _Entry:
    """How one of our state-dict tensors is assembled from checkpoint keys."""

    name: str  # our state-dict name
    shape: tuple[int, ...]  # our shape
    keys: list[str]  # checkpoint keys it reads
    kind: str = "copy"  # "copy", "gate_up" (per-expert gate, up, gate, up, ...), "down" (per-expert down)
    optional: bool = False  # V2's softmax gates have no correction bias: ours then stays zero

    @property
    def key_shape(self) -> tuple[int, ...]:
        """The shape each of its checkpoint keys must have."""
        if self.kind == "gate_up":
            return (self.shape[1] // 2, self.shape[2])
        return self.shape[1:] if self.kind == "down" else self.shape


def _plan(model: DeepSeekV3, present: set[str]) -> list[_Entry]:
    """One entry per tensor of model (built on the meta device), in the expert layout the checkpoint has."""
    cfg = model.config
    entries = []
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if not name.endswith(("experts.w_gate_up", "experts.w_down")):
            optional = name.endswith("e_score_correction_bias") and cfg.score_func == "softmax"
            entries.append(_Entry(name, shape, [hf_key(name, cfg.n_layers)], optional=optional))
            continue
        prefix = hf_key(name, cfg.n_layers).rsplit(".", 1)[0]  # model.layers.{i}.mlp.experts
        fused = f"{prefix}.gate_up_proj" if name.endswith("w_gate_up") else f"{prefix}.down_proj"
        per_expert = expert_keys(prefix, shape[0])
        if fused in present:  # transformers' in-memory layout: the same shapes as ours
            entries.append(_Entry(name, shape, [fused]))
        elif name.endswith("w_gate_up"):
            keys = [k for pair in zip(per_expert["gate_proj"], per_expert["up_proj"], strict=True) for k in pair]
            entries.append(_Entry(name, shape, keys, "gate_up"))
        else:
            entries.append(_Entry(name, shape, per_expert["down_proj"], "down"))
    return entries


def _layer_of(key: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _check_names(plan: list[_Entry], shards: _Shards, duplicates: set[str]) -> tuple[list[str], list[str]]:
    """Missing and unexpected keys of the whole checkpoint, from names alone."""
    present = set(shards.file_of)
    allowed = {k for e in plan for k in e.keys} | duplicates
    scales = {k for k in present if k.endswith(".weight_scale_inv")}
    unexpected = sorted(k for k in present - allowed - scales if not k.endswith("rotary_emb.inv_freq"))
    unexpected += sorted(k for k in scales if k.removesuffix("_scale_inv") not in allowed)
    missing = sorted({k for e in plan if not e.optional for k in e.keys} - present)
    return [f"{k} {list(_shape_of(plan, k))}" for k in missing], [f"{k} {_shape_str(shards.info(k))}" for k in unexpected]


def _check_shapes(plan: list[_Entry], shards: _Shards, duplicates: dict[str, tuple[int, ...]],
                  block: int) -> tuple[list, list]:
    """Mis-shaped keys (block scales included), and FP8 weights without their scale, among the keys in shards whose
    header was read."""
    misshaped, missing = [], []
    wanted = [(k, e.key_shape) for e in plan for k in e.keys] + list(duplicates.items())
    for key, shape in wanted:
        info, scale = shards.info(key), shards.info(key + "_scale_inv")
        if info is None:
            continue
        if info[1] != shape:
            misshaped.append(f"{key}: checkpoint {list(info[1])}, model expects {list(shape)}")
        if scale is not None:
            blocks = block_scale_shape(info[1], block)
            if scale[1] != blocks:
                misshaped.append(f"{key}_scale_inv: checkpoint {list(scale[1])}, expected {list(blocks)} for "
                                 f"{block} x {block} blocks")
        if info[0] in _FP8_DTYPES and key + "_scale_inv" not in shards.file_of:
            missing.append(f"{key}_scale_inv")
    return misshaped, missing


def _shape_of(plan: list[_Entry], key: str) -> tuple[int, ...]:
    return next(e.key_shape for e in plan if key in e.keys)


def _shape_str(info: tuple[str, tuple[int, ...]] | None) -> str:
    return "(shape not read)" if info is None else f"{list(info[1])} {info[0]}"


def _format_keys(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def _read_state(plan: list[_Entry], cfg: ModelConfig, shards: _Shards, dtype: torch.dtype,
                device: str | torch.device, fp8: set[str], block: int) -> dict[str, torch.Tensor]:
    """Read, convert and stack every planned tensor, opening each needed shard once.

    The tensors named in fp8 come with `{name}_scale_inv`: the checkpoint's E4M3 codes and scales as they are when
    nothing needs rearranging, else quantized here. The others are dequantized (FP8) or cast to dtype.
    """
    interleaved = cfg.extra.get("rope_interleave", True) is not False
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = {}

        def raw(key: str) -> torch.Tensor:
            file = shards.file_of[key]
            if file not in handles:
                handles[file] = stack.enter_context(
                    safe_open(os.path.join(shards.folder, file), framework="pt", device=str(device)))
            return handles[file].get_tensor(key)

        def scale(key: str) -> torch.Tensor | None:
            """The block scales of an FP8 key (they may sit in another shard); None for other keys."""
            return raw(key + "_scale_inv").float() if key + "_scale_inv" in shards.file_of else None

        def dense(key: str, out_dtype: torch.dtype) -> torch.Tensor:
            t, s = raw(key), scale(key)
            if s is not None:
                return weight_dequant(t, s, block, out_dtype)
            return t.to(out_dtype) if t.is_floating_point() else t

        def codes(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
            """(E4M3 codes, scales) of a key stored that way; None for any other."""
            s = scale(key)
            t = None if s is None else raw(key)
            return (t, s) if t is not None and t.dtype == FP8 else None

        def dense_experts(e: _Entry, out_dtype: torch.dtype) -> torch.Tensor:
            stacked = torch.empty(e.shape, dtype=out_dtype, device=device)  # filled expert by expert
            for i, key in enumerate(e.keys):
                if e.kind == "gate_up":  # keys alternate gate, up of expert i // 2: rows :I, then I:
                    inter = e.shape[1] // 2
                    stacked[i // 2, (i % 2) * inter:(i % 2 + 1) * inter] = dense(key, out_dtype)
                else:
                    stacked[i] = dense(key, out_dtype)
            return stacked

        def fp8_pair(e: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
            if e.kind == "copy":
                pair = codes(e.keys[0]) if interleaved or not e.name.endswith(_ROPE_WEIGHTS) else None
                if pair is None:
                    t = dense(e.keys[0], torch.float32)
                    pair = weight_quant(t if interleaved else _to_interleaved(e.name, t, cfg), block)
                return pair
            per_expert = len(e.keys) // e.shape[0]  # gate and up, or down
            stacked, scales = torch.empty(e.shape, dtype=FP8, device=device), []
            for i in range(e.shape[0]):
                pairs = [codes(k) for k in e.keys[i * per_expert:(i + 1) * per_expert]]
                regrouped = None if any(p is None for p in pairs) else \
                    _regroup_scales([s for _, s in pairs], [len(q) for q, _ in pairs], [e.shape[1]], block)
                if regrouped is None:  # plain experts, or gate and up rows sharing blocks: quantize anew
                    return weight_quant(dense_experts(e, torch.float32), block)
                stacked[i] = torch.cat([q for q, _ in pairs])
                scales += regrouped
            return stacked, torch.stack(scales)

        for e in plan:
            out_dtype = torch.float32 if e.name.endswith("e_score_correction_bias") else dtype
            if e.kind == "copy" and e.keys[0] not in shards.file_of:  # an optional key
                state[e.name] = torch.zeros(e.shape, dtype=out_dtype, device=device)
            elif e.name in fp8:
                state[e.name], state[e.name + "_scale_inv"] = fp8_pair(e)
            elif e.kind == "copy":
                t = dense(e.keys[0], out_dtype)
                state[e.name] = t if interleaved else _to_interleaved(e.name, t, cfg)
            else:
                state[e.name] = dense_experts(e, out_dtype)
    return state


def _resolve_folder(path: str | os.PathLike) -> str:
    folder = os.fspath(path)
    if os.path.isfile(folder):
        folder = os.path.dirname(folder) or "."
    if not os.path.exists(os.path.join(folder, CONFIG_NAME)):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: expected a Hugging Face checkpoint folder")
    return folder


def _fp8_block(cfg: ModelConfig) -> int:
    """The side of the checkpoint's FP8 blocks (`quantization_config.weight_block_size`, square)."""
    size = (cfg.extra.get("quantization_config") or {}).get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"quantization_config.weight_block_size = {size}: only square blocks are supported "
                         "(the published checkpoints use [128, 128])")
    return size[0]


def _config_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype config.json records (`dtype`, or `torch_dtype` in older files); float32 if none fits."""
    dtype = getattr(torch, str(cfg.extra.get("dtype") or cfg.extra.get("torch_dtype")), None)
    ok = isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2
    return dtype if ok else torch.float32


def _deinterleave_perm(rope_dim: int) -> torch.Tensor:
    """Row order turning a rotate-half rope layout (pairs i, i + d/2) into interleaved pairs (2i, 2i+1)."""
    half = torch.arange(rope_dim // 2)
    return torch.stack([half, half + rope_dim // 2], dim=-1).flatten()


_ROPE_WEIGHTS = ("q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight")  # what _to_interleaved permutes


def _to_interleaved(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Permute the rope rows of the query and kv_a projections of a `rope_interleave: false` checkpoint."""
    perm = _deinterleave_perm(cfg.qk_rope_head_dim)
    if name.endswith(("q_b_proj.weight", "q_proj.weight")):
        t = t.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, -1)
        return torch.cat([t[:, : cfg.qk_nope_head_dim], t[:, cfg.qk_nope_head_dim:][:, perm]], dim=1).flatten(0, 1)
    if name.endswith("kv_a_proj_with_mqa.weight"):
        return torch.cat([t[: cfg.kv_lora_rank], t[cfg.kv_lora_rank:][perm]], dim=0)
    return t


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    n_layers: int | None = None, num_layers: int | None = None, mtp: bool = True, fp8: bool = False,
                    **config_overrides) -> DeepSeekV3:
    """Load a Hugging Face DeepSeek-V3 checkpoint folder as a DeepSeekV3 model in eval mode.

    dtype: of the floating weights (default: the config's `dtype`/`torch_dtype`, else float32); FP8 weights are
    dequantized to it; the routing bias stays float32. fp8=True: build the model with FP8 layers (fp8.py) and keep
    FP8 weights as they are; dtype is then that of the other weights and of the activations. n_layers (alias
    num_layers): build only the first n transformer layers, plus the final norm and head, without MTP; only the
    shards holding them are read. mtp=False skips the MTP modules. Other keyword arguments override ModelConfig fields that keep the shapes
    (e.g. max_seq_len=4096, mla_mode="absorb"). Missing, unexpected or mis-shaped keys raise a ValueError that
    lists them.
    """
    folder = _resolve_folder(path)
    if n_layers is not None and num_layers is not None and n_layers != num_layers:
        raise ValueError(f"n_layers = {n_layers} and num_layers = {num_layers} disagree; give one of them")
    n_keep = n_layers if n_layers is not None else num_layers
    cfg = ModelConfig.from_hf(folder)
    n_full = cfg.n_layers
    block = _fp8_block(cfg)
    if n_keep is not None and not 1 <= n_keep <= n_full:
        raise ValueError(f"n_layers = {n_keep}: the checkpoint has {n_full} layers")
    shards = _Shards(folder)

    # MTP: transformers never saves it. Absent everywhere: a model without MTP modules; partly present: an error.
    if cfg.n_mtp_modules and not any((_layer_of(k) or 0) >= n_full for k in shards.file_of):
        if n_keep is None and mtp:
            warnings.warn(f"{folder}: no MTP weights (model.layers.{n_full}.*) in the checkpoint; built without "
                          "MTP modules", CheckpointNotice, stacklevel=2)
        cfg = cfg.replace(n_mtp_modules=0)

    # Names of the whole checkpoint are checked against the whole model (the index suffices: no shard is read) ...
    with torch.device("meta"):
        full = DeepSeekV3(cfg)
    plan = _plan(full, set(shards.file_of))
    duplicates = {k: tuple(full.embed_tokens.weight.shape) for k in _mtp_duplicates(n_full, cfg.n_mtp_modules)}
    missing, unexpected = _check_names(plan, shards, set(duplicates))

    # ... then the model asked for is planned, the headers of its shards are read and the shapes checked.
    if n_keep is not None:
        cfg = cfg.replace(n_layers=n_keep, n_dense_layers=min(cfg.n_dense_layers, n_keep), n_mtp_modules=0)
    elif not mtp:
        cfg = cfg.replace(n_mtp_modules=0)
    cfg = cfg.replace(**config_overrides)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    if fp8:
        quantize_to_fp8(model, block)
    meta_state = model.state_dict()  # a scale `{name}_scale_inv` is read along with its FP8 weight `{name}`
    fp8_names = {name for name, t in meta_state.items() if t.dtype == FP8}
    wanted = {name for name in meta_state if not name.endswith("_scale_inv")}
    wanted -= {"lm_head.weight"} if cfg.tie_embeddings else set()
    plan = [e for e in plan if e.name in wanted]
    if {e.name for e in plan} != wanted:
        raise ValueError(f"config overrides {sorted(config_overrides)} change the model's structure")
    for key in (k + suffix for e in plan for k in e.keys for suffix in ("", "_scale_inv")):
        if key in shards.file_of:
            shards.header(shards.file_of[key])
    misshaped, missing_scales = _check_shapes(plan, shards, duplicates, block)
    missing += missing_scales
    if missing or unexpected or misshaped:
        parts = [_format_keys(title, items) for title, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if items]
        raise ValueError(f"checkpoint {folder} does not match the model its config.json describes:\n" + "\n".join(parts))

    state = _read_state(plan, cfg, shards, dtype or _config_dtype(cfg), device, fp8_names, block)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # The weights are interleaved now, and FP8 ones dequantized or held by FP8 layers that know their block size:
    # the config no longer describes a rotate-half layout or a quantization.
    model.config = cfg.replace(extra={k: v for k, v in cfg.extra.items()
                                      if k not in ("quantization_config", "rope_interleave")})
    model.freqs_cis = precompute_freqs_cis(model.config).to(device)  # it was built on the meta device
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size = {size!r}: give bytes (int) or a string like '5GB' or '500MiB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base**power)


def _shards_of(keys: Iterable[str], tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_pretrained(model: DeepSeekV3, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write model as config.json + safetensors in the published layout (sharded with an index when larger
    than max_shard_size). dtype casts the floating weights (the routing bias stays float32). FP8 layers are written
    as the published FP8 checkpoints hold them: `weight` codes, `weight_scale_inv` and a quantization_config."""
    limit = _parse_size(max_shard_size)
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    tensors = to_hf_state_dict(model, dtype)
    saved_dtype = dtype or model.embed_tokens.weight.dtype
    hf = model.config.to_hf()
    for key in ("quantization_config", "transformers_version", "_name_or_path"):
        hf.pop(key, None)
    hf["dtype"] = hf["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    block = fp8_block_size(model)
    if block is not None:
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    # Stale weight files of an earlier save would confuse a loader that lists the folder.
    for f in os.listdir(folder):
        if f in (WEIGHTS_NAME, INDEX_NAME) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f):
            os.remove(os.path.join(folder, f))
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")

    groups = _shards_of(tensors, tensors, limit)
    names = [WEIGHTS_NAME] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, keys in zip(names, groups, strict=True):
        # clone: safetensors refuses tensors that share storage (expert slices, the MTP copies)
        shard = {k: tensors[k].detach().to("cpu", copy=True).contiguous() for k in keys}
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
