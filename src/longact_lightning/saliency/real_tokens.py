"""Which tokens of a forward pass are real, where the model's inputs carry padding that no 2D attention mask names.

Saliency statistics must count real tokens only. A forward's 2D ``attention_mask`` says which those are, and
:class:`~longact_lightning.callbacks.ActivationSaliency` reads it. Some forwards have padding that mask cannot
describe: packed rows behind a 4D block mask, or right-padded rows run causally with no mask at all (causal attention
keeps real tokens from seeing later padding, so none is needed). Code that builds such inputs declares their real
tokens here, around the forward pass. A forward that carries no real token at all (the zero-weight micro-batch that
keeps a rank's collectives in step with the others' under FSDP) runs inside :func:`padding_only`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_DECLARED: ContextVar[torch.Tensor | None] = ContextVar("real_tokens", default=None)
_PADDING_ONLY: ContextVar[bool] = ContextVar("padding_only", default=False)


@contextmanager
def declare_real_tokens(mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, forwards over ``[B, T]`` inputs count ``mask`` ``[B, T]`` (True on real tokens) as real."""
    token = _DECLARED.set(mask)
    try:
        yield
    finally:
        _DECLARED.reset(token)


def declared_real_tokens() -> torch.Tensor | None:
    """The innermost declared mask, or ``None`` outside any :func:`declare_real_tokens` block."""
    return _DECLARED.get()


@contextmanager
def padding_only() -> Iterator[None]:
    """Inside the block, no forward carries a real token, whatever inner :func:`declare_real_tokens` blocks say."""
    token = _PADDING_ONLY.set(True)
    try:
        yield
    finally:
        _PADDING_ONLY.reset(token)


def is_padding_only() -> bool:
    """Whether the current forward runs inside :func:`padding_only`."""
    return _PADDING_ONLY.get()
