"""Turning LongLLaMA memory inference on and off on one model instance: :func:`enable_memory`,
:func:`disable_memory`, and the per-model state they install (:class:`MemoryIntegration`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ...memory import MAX_DIM, _parse_dtype, _positive_int
from ...nn import _check_backend, _check_topk, memory_layer_attention
from . import attention
from .cache import MemoryCache
from .forward import bind_forward

#: the attribute of a memory-enabled model that holds its :class:`MemoryIntegration`
STATE_ATTR = "fot_memory"


class MemoryIntegration:
    """Settings and hooks of one memory-enabled model (``model.fot_memory``), made by
    :func:`enable_memory`.

    Attributes:
        memory_layers, topk, capacity, window, last_context_length, mem_dtype, backend: the
            settings :func:`enable_memory` resolved.
        num_layers: the model's number of decoder layers.
        memory_attention: the memory layers' attention, with
            :func:`fot_kernels.nn.memory_layer_attention`'s signature; replaceable, e.g. to run a
            baseline (the LongLLaMA-style plain-PyTorch one in benchmarks/) on the same model.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        memory_layers: tuple[int, ...],
        topk: int | None,
        capacity: int,
        window: int,
        last_context_length: int,
        mem_dtype: torch.dtype,
        backend: str,
    ) -> None:
        self.num_layers = num_layers
        self.memory_layers = memory_layers
        self.topk, self.capacity, self.window = topk, capacity, window
        self.last_context_length, self.mem_dtype, self.backend = last_context_length, mem_dtype, backend
        self.memory_attention = memory_layer_attention
        self._active: MemoryCache | None = None  # the cache of the window being processed
        self._hooks: list = []
        self._previous_attn: str | None = None
        self._previous_forward = None

    def new_cache(self) -> MemoryCache:
        """An empty :class:`MemoryCache` for this model (e.g. to keep memory across calls)."""
        return MemoryCache(
            self.num_layers, self.memory_layers, window=self.window, capacity=self.capacity, mem_dtype=self.mem_dtype
        )

    @contextmanager
    def capturing(self, cache: MemoryCache) -> Iterator[None]:
        """While the block runs, the memory layers' ``k_proj`` hooks hand their un-rotated keys to
        ``cache`` (:meth:`MemoryCache.capture_unrotated_keys`)."""
        self._active = cache
        try:
            yield
        finally:
            self._active = None

    def attach(self, model: nn.Module) -> None:
        """Install on ``model``: the key hooks, the attention implementation, this state at
        ``model.fot_memory`` and the windowed forward (an instance attribute)."""
        attention.register()
        self._previous_attn = model.config._attn_implementation
        self._previous_forward = vars(model).get("forward")  # e.g. an accelerate hook's wrapper, restored later
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)  # first: the step that may refuse
        for idx in self.memory_layers:
            attn = model.model.layers[idx].self_attn
            self._hooks.append(attn.k_proj.register_forward_hook(self._key_hook(idx, attn.head_dim)))
        setattr(model, STATE_ATTR, self)
        model.forward = bind_forward(model, self)

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        del model.forward  # the instance attribute; the class's forward is visible again
        if self._previous_forward is not None:
            model.forward = self._previous_forward
        model.set_attn_implementation(self._previous_attn)
        delattr(model, STATE_ATTR)

    def _key_hook(self, layer_idx: int, head_dim: int):
        def hook(_module, _inputs, output):
            if self._active is not None:
                batch, length = output.shape[:2]
                self._active.capture_unrotated_keys(layer_idx, output.view(batch, length, -1, head_dim).transpose(1, 2))

        return hook

    def __repr__(self) -> str:
        return (
            f"MemoryIntegration(memory_layers={list(self.memory_layers)}, topk={self.topk}, capacity={self.capacity}, "
            f"window={self.window}, last_context_length={self.last_context_length}, mem_dtype={self.mem_dtype}, "
            f"backend={self.backend!r})"
        )


def enable_memory(
    model,
    memory_layers: Iterable[int] | None = None,
    *,
    topk: int | None = None,
    capacity: int,
    last_context_length: int | None = None,
    window: int | None = None,
    mem_dtype: torch.dtype | str | None = None,
    backend: str = "auto",
) -> MemoryIntegration:
    """Give a ``LlamaForCausalLM`` instance LongLLaMA's memory inference (reverse: :func:`disable_memory`).

    Every argument is checked here, before the model is changed.

    Args:
        model: a transformers (>= 5) ``LlamaForCausalLM``; only this instance is changed.
        memory_layers: decoder layer indices with memory (default: ``config.mem_layers``, the
            LongLLaMA config field).
        topk: None for dense memory (LongLLaMA's released inference) or k >= 1 for kNN memory.
        capacity: memory slots per batch row and layer, preallocated; the oldest slots are evicted
            beyond it. Must be >= window and >= last_context_length.
        last_context_length: tokens of a long input kept in the local cache for generation
            (default: ``config.last_context_length``, else ``min(1024, window)``).
        window: context window (default ``config.max_position_embeddings``, as LongLLaMA).
        mem_dtype: memory storage dtype (default: ``config.mem_dtype``, else the model's dtype).
        backend: ``"auto"`` or a ``fot_kernels`` backend name for the memory layers.

    Returns:
        the :class:`MemoryIntegration`, also at ``model.fot_memory`` (``.new_cache()`` makes a
        :class:`MemoryCache` to pass as ``cache=``).
    """
    layers = _check_model(model)
    config = model.config
    if hasattr(model, STATE_ATTR):
        raise ValueError("memory is already enabled on this model; call disable_memory(model) first")
    if memory_layers is None:
        memory_layers = getattr(config, "mem_layers", None)
        if memory_layers is None:
            raise ValueError("memory_layers is required (the model config has no mem_layers field)")
    if isinstance(memory_layers, (str, bytes)) or not isinstance(memory_layers, Iterable):
        raise TypeError(f"memory_layers must be a list of layer indices, got {type(memory_layers).__name__}")
    memory_layers = list(memory_layers)
    if not memory_layers:
        raise ValueError("memory_layers must name at least one layer")
    for idx in memory_layers:
        _positive_int("each entry of memory_layers", idx, 0)
        if idx >= len(layers):
            raise ValueError(
                f"memory layer index {idx} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})"
            )
    memory_layers = tuple(int(idx) for idx in memory_layers)
    if len(set(memory_layers)) != len(memory_layers):
        raise ValueError(f"memory_layers must be distinct, got {list(memory_layers)}")
    topk = _check_topk(topk)
    window = _positive_int("window", config.max_position_embeddings if window is None else window, 1, MAX_DIM)
    if last_context_length is None:
        last_context_length = getattr(config, "last_context_length", None)
        last_context_length = min(1024, window) if last_context_length is None else last_context_length
    last_context_length = _positive_int("last_context_length", last_context_length, 0, MAX_DIM)
    capacity = _positive_int("capacity", capacity, 1, MAX_DIM)
    if capacity < max(window, last_context_length):
        raise ValueError(
            f"capacity ({capacity}) must be >= window ({window}) and >= last_context_length ({last_context_length}): "
            "a window (or an evicted local cache) must fit in memory"
        )
    if mem_dtype is None:
        mem_dtype = getattr(config, "mem_dtype", None) or model.dtype
    mem_dtype = _parse_dtype(mem_dtype, "mem_dtype")
    backend = _check_backend(backend)
    if getattr(config, "mem_positionals", True) is False:
        raise ValueError("mem_positionals=False (memory layers without RoPE) is not supported")
    if getattr(config, "mem_attention_grouping", None) is not None:
        warnings.warn(
            "mem_attention_grouping is ignored: the fot_kernels ops never materialise queries x memory", stacklevel=2
        )
    state = MemoryIntegration(
        num_layers=len(layers),
        memory_layers=memory_layers,
        topk=topk,
        capacity=capacity,
        window=window,
        last_context_length=last_context_length,
        mem_dtype=mem_dtype,
        backend=backend,
    )
    state.attach(model)
    return state


def disable_memory(model) -> None:
    """Undo :func:`enable_memory`: remove the hooks and the forward, restore the attention implementation."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, MemoryIntegration):
        raise ValueError("memory is not enabled on this model")
    state.detach(model)


def _check_model(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(model, nn.Module) or not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise TypeError(f"enable_memory needs a transformers LlamaForCausalLM-like model, got {type(model).__name__}")
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "layer_idx"):
            raise TypeError(f"{type(model).__name__}: decoder layers must have a Llama-style self_attn with k_proj")
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only the default RoPE is supported with memory, got rope_type {rope.get('rope_type')!r}")
    return layers


__all__ = ["STATE_ATTR", "MemoryIntegration", "disable_memory", "enable_memory"]
