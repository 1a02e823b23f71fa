"""Locate every attention layer's query and key channels inside the weight matrices that produce them.

Output channel ``c`` of a query (or key) projection is produced by one row of a Linear weight. Where that row sits
depends on the architecture:

* separate projections (Llama, Mistral, Qwen2/3, Gemma): ``q_proj`` / ``k_proj``, channel ``c`` is row ``c``;
* fused, concatenated (Phi-3 ``qkv_proj``): rows ``[0, Hq*d)`` are queries, the next ``Hkv*d`` rows keys;
* fused, interleaved per head (GPT-NeoX ``query_key_value``): the output is viewed as ``[H, 3*d]``, so head ``h``
  owns rows ``h*3d + [0, d)`` (query), ``+ [d, 2d)`` (key), ``+ [2d, 3d)`` (value).

With grouped-query attention the key projection has ``Hkv * d`` channels. Channel order is always
``head * head_dim + dim``, the order attention consumes them in, so per-head and RoPE-pair selection can reason
about channels without knowing the storage layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

# Wrappers that insert themselves into module names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_name(name: str) -> str:
    """A parameter or module name with wrapper segments removed, so names are stable across strategies."""
    return ".".join(segment for segment in name.split(".") if segment not in _WRAPPER_SEGMENTS)


@dataclass(frozen=True, eq=False)
class QKProjection:
    """The query or key channels of one attention layer.

    Attributes:
        layer: index of the decoder layer.
        kind: ``"q"`` or ``"k"``.
        module_name: the Linear module that produces the channels (cleaned name, relative to the searched root).
        rows: ``[channels]`` row of the module's weight that produces each channel, in channel order.
        num_heads: query heads for ``"q"``, key/value heads for ``"k"``.
        head_dim: channels per head.
        rotary_dim: leading channels of each head that RoPE rotates (``head_dim`` unless partial rotary); RoPE pairs
            channel ``i`` with ``i + rotary_dim // 2``.
        has_bias: whether the module has a bias, whose entries follow the same rows.
        weight_rows: output rows of the whole weight (under FSDP1 the parameter itself is a flat shard, so this is
            recorded from the module).
    """

    layer: int
    kind: Literal["q", "k"]
    module_name: str
    rows: torch.Tensor
    num_heads: int
    head_dim: int
    rotary_dim: int
    has_bias: bool
    weight_rows: int

    @property
    def channels(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def key(self) -> str:
        """A stable identifier named after the parameter, e.g. ``"model.layers.3.self_attn.q_proj.weight:q"``."""
        return f"{self.weight_name}:{self.kind}"

    @property
    def weight_name(self) -> str:
        return f"{self.module_name}.weight"

    @property
    def bias_name(self) -> str | None:
        return f"{self.module_name}.bias" if self.has_bias else None


@dataclass(frozen=True)
class _HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int


def find_qk_projections(
    model: nn.Module, patterns: Mapping[str, str] | None = None, config: object | None = None
) -> list[QKProjection]:
    """Find the query and key projections of every attention layer of ``model``.

    Args:
        model: a HF causal LM (or any module containing one); names are relative to it.
        patterns: optional ``{"q": regex, "k": regex}`` matched (``re.search``) against cleaned module names; each
            match is a separate projection whose rows are all its output rows. Overrides discovery.
        config: the HF config to read head counts from; defaults to the first ``config`` attribute found.

    Raises:
        ValueError: when nothing is found, listing the Linear modules seen so the user can write ``patterns``.
    """
    config = config if config is not None else _find_config(model)
    layout = _head_layout(config)
    linears = {clean_name(name): module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    found = _from_patterns(linears, patterns, layout) if patterns is not None else _discover(linears, layout)
    if not found:
        shown = ", ".join(list(linears)[:24]) + (f", ... ({len(linears)} in all)" if len(linears) > 24 else "")
        raise ValueError(
            f"No query/key projections found in {type(model).__name__}; Linear modules seen: [{shown}]. "
            'Pass patterns={"q": <regex>, "k": <regex>} that match the query and key Linear module names.'
        )
    return sorted(found, key=lambda p: (p.layer, p.kind))


def _discover(linears: Mapping[str, nn.Linear], layout: _HeadLayout) -> list[QKProjection]:
    q_channels = layout.num_heads * layout.head_dim
    k_channels = layout.num_kv_heads * layout.head_dim
    found: list[QKProjection] = []
    for name, module in linears.items():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if leaf == "q_proj" and f"{parent}.k_proj" in linears:
            found.append(_projection(name, module, "q", torch.arange(q_channels), layout))
        elif leaf == "k_proj" and f"{parent}.q_proj" in linears:
            found.append(_projection(name, module, "k", torch.arange(k_channels), layout))
        elif leaf == "qkv_proj":
            _expect_rows(name, module, q_channels + 2 * k_channels)
            found.append(_projection(name, module, "q", torch.arange(q_channels), layout))
            found.append(_projection(name, module, "k", q_channels + torch.arange(k_channels), layout))
        elif leaf == "query_key_value":
            if layout.num_kv_heads != layout.num_heads:
                raise ValueError(
                    f"{name}: per-head interleaved query_key_value (GPT-NeoX layout) needs num_key_value_heads == "
                    f"num_attention_heads, got {layout.num_kv_heads} != {layout.num_heads}; pass `patterns` instead."
                )
            _expect_rows(name, module, 3 * q_channels)
            d = layout.head_dim
            head_base = torch.arange(layout.num_heads).repeat_interleave(d) * 3 * d  # [H*d]
            within = torch.arange(d).repeat(layout.num_heads)  # [H*d]
            found.append(_projection(name, module, "q", head_base + within, layout))
            found.append(_projection(name, module, "k", head_base + d + within, layout))
    return found


def _from_patterns(
    linears: Mapping[str, nn.Linear], patterns: Mapping[str, str], layout: _HeadLayout
) -> list[QKProjection]:
    unknown = set(patterns) - {"q", "k"}
    if unknown:
        raise ValueError(f"patterns has keys {sorted(unknown)}; only 'q' and 'k' are allowed.")
    found = []
    for kind in ("q", "k"):
        if kind not in patterns:
            continue
        for name, module in linears.items():
            if re.search(patterns[kind], name):
                found.append(_projection(name, module, kind, torch.arange(module.out_features), layout))
    return found


def _projection(
    name: str, module: nn.Linear, kind: Literal["q", "k"], rows: torch.Tensor, layout: _HeadLayout
) -> QKProjection:
    num_heads = layout.num_heads if kind == "q" else layout.num_kv_heads
    head_dim = layout.head_dim
    if rows.numel() != num_heads * head_dim:  # user patterns on a model whose config disagrees: one head per row
        num_heads, head_dim = 1, rows.numel()
    return QKProjection(
        layer=_layer_index(name),
        kind=kind,
        module_name=name,
        rows=rows,
        num_heads=num_heads,
        head_dim=head_dim,
        rotary_dim=min(layout.rotary_dim, head_dim),
        has_bias=module.bias is not None,
        weight_rows=module.out_features,
    )


def _expect_rows(name: str, module: nn.Linear, rows: int) -> None:
    if module.out_features != rows:
        raise ValueError(
            f"{name} has {module.out_features} output rows but the config implies {rows}; "
            "the head counts in the config do not match this layer. Pass `patterns` to select rows explicitly."
        )


def _layer_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else 0


def _find_config(model: nn.Module) -> object:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            return config
    raise ValueError(
        f"{type(model).__name__} has no HF config with num_attention_heads; pass `config=` to find_qk_projections."
    )


def _head_layout(config: Any) -> _HeadLayout:
    """Head counts from a HF config; which fields exist depends on the architecture, hence read duck-typed."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return _HeadLayout(num_heads, num_kv_heads, head_dim, int(head_dim * _partial_rotary_factor(text_config)))


def _partial_rotary_factor(config: object) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, Mapping) and "partial_rotary_factor" in rope:
        return float(rope["partial_rotary_factor"])
    for attr in ("partial_rotary_factor", "rotary_pct"):
        if getattr(config, attr, None) is not None:
            return float(getattr(config, attr))
    return 1.0
