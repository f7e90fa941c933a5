"""The attention function of memory-enabled models, registered in transformers'
``AttentionInterface`` (and its mask builder in ``AttentionMaskInterface``) under
:data:`ATTN_IMPLEMENTATION`.

Memory layers run one joint softmax over ``[local causal | memory]`` through the public
``fot_kernels`` ops (via :func:`fot_kernels.nn.memory_layer_attention`, or the integration's
replacement of it); other layers run plain causal attention over the window.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn import local_attention
from ._hf import AttentionInterface, AttentionMaskInterface
from .cache import MemoryCache
from .models import check_local_length

ATTN_IMPLEMENTATION = "fot_memory"

#: keyword arguments of packed (padding-free) batches, which these attention functions do not serve
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def check_attention_kwargs(module: nn.Module, key: Tensor, dropout: float, kwargs: dict) -> None:
    """Refuse what the integration's attention functions do not compute (never a silently
    different result): attention dropout, packed-sequence batches, and a local context longer
    than the layer's sliding window."""
    if dropout:
        raise ValueError(f"attention dropout is not supported with memory/CrossBatch, got {dropout}")
    packed = [name for name in PACKED_KWARGS if kwargs.get(name) is not None]
    if packed:
        raise ValueError(
            f"packed-sequence batches ({', '.join(packed)}) are not supported with memory/CrossBatch: pass a [B, L] "
            "batch with an attention_mask"
        )
    check_local_length(kwargs.get("sliding_window"), key.shape[2], module.layer_idx)


def fot_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; ``kwargs`` carry ``fot_cache`` (the
    :class:`MemoryCache`) and ``fot_state`` (the :class:`MemoryIntegration`), which the patched
    forward passes to the inner model. Returns ``([B, Lq, Hq, D], None)``."""
    cache = kwargs.get("fot_cache")
    state = kwargs.get("fot_state")
    if not isinstance(cache, MemoryCache) or state is None:
        raise RuntimeError(
            f"attn_implementation {ATTN_IMPLEMENTATION!r} only runs inside a model prepared by "
            "fot_kernels.integrations.transformers.enable_memory()"
        )
    check_attention_kwargs(module, key, dropout, kwargs)
    padding = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
    layer_idx = module.layer_idx
    if layer_idx not in cache.memory_layers:
        out = local_attention(query, key, value, key_padding_mask=padding, softmax_scale=scaling)
    else:
        out = state.memory_attention(
            query,
            key,
            value,
            cache.memory_view(layer_idx),
            key_padding_mask=padding,
            topk=state.topk,
            softmax_scale=scaling,
            backend=state.backend,
        )
        cache.after_attention(layer_idx, value)  # LongLLaMA: a prefill window enters memory after its attention
    return out.transpose(1, 2).contiguous(), None


def fot_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """The 2D key padding mask ``[B, kv_length]`` (True = token), or None when nothing is padded;
    the attention function applies the causal part itself."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def register() -> None:
    """Register :func:`fot_attention` and :func:`fot_mask` under :data:`ATTN_IMPLEMENTATION`
    (idempotent; registering adds a name, it replaces no library function)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, fot_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fot_mask)


__all__ = ["ATTN_IMPLEMENTATION", "PACKED_KWARGS", "check_attention_kwargs", "fot_attention", "fot_mask", "register"]
