"""Turning LongLLaMA memory inference on and off on one model instance: :func:`enable_memory`,
:func:`disable_memory`, and the per-model state they install (:class:`MemoryIntegration`)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...memory import MAX_DIM, _parse_dtype, _positive_int
from ...nn import _check_backend, _check_topk, memory_layer_attention
from . import attention
from .cache import MemoryCache, check_process_group
from .forward import bind_forward
from .models import add_unrotated_key_hooks, check_memory_layers, check_model, sliding_window

#: the attribute of a memory-enabled model that holds its :class:`MemoryIntegration`
if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

STATE_ATTR = "fot_memory"
#: the attribute of a model in CrossBatch training mode (:mod:`.crossbatch`); the two modes exclude each other
CROSSBATCH_ATTR = "fot_crossbatch"


class MemoryIntegration:
    """Settings and hooks of one memory-enabled model (``model.fot_memory``), made by
    :func:`enable_memory`.

    Attributes:
        memory_layers, topk, capacity, window, last_context_length, mem_dtype, backend: the
            settings :func:`enable_memory` resolved.
        num_layers: the model's number of decoder layers.
        process_group: None, or the torch.distributed ProcessGroup whose ranks share the memory.
        memory_attention: the memory layers' attention, with
            :func:`fot_kernels.nn.memory_layer_attention`'s signature; replaceable, e.g. to run a
            baseline (the LongLLaMA-style plain-PyTorch one in benchmarks/) on the same model.
            With a ``process_group``: :func:`fot_kernels.distributed.memory_layer_attention`
            with ``group=process_group``.
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
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.memory_layers = memory_layers
        self.topk, self.capacity, self.window = topk, capacity, window
        self.last_context_length, self.mem_dtype, self.backend = last_context_length, mem_dtype, backend
        self.process_group = process_group
        self.memory_attention = memory_layer_attention
        if process_group is not None:
            from ... import distributed

            self.memory_attention = functools.partial(distributed.memory_layer_attention, group=process_group)
        self._active: MemoryCache | None = None  # the cache of the window being processed
        self._hooks: list = []
        self._previous_attn: str | None = None
        self._previous_forward = None

    def new_cache(self) -> MemoryCache:
        """An empty :class:`MemoryCache` for this model (e.g. to keep memory across calls)."""
        return MemoryCache(
            self.num_layers,
            self.memory_layers,
            window=self.window,
            capacity=self.capacity,
            mem_dtype=self.mem_dtype,
            process_group=self.process_group,
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
        self._hooks.extend(add_unrotated_key_hooks(model, self.memory_layers, self._capture))
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

    def _capture(self, layer_idx: int, keys: Tensor) -> None:
        """The memory layers' ``k_proj`` hooks: un-rotated keys ``[B, Hkv, n, D]`` go to the active cache."""
        if self._active is not None:
            self._active.capture_unrotated_keys(layer_idx, keys)

    def _group_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.process_group)

    def __repr__(self) -> str:
        return (
            f"MemoryIntegration(memory_layers={list(self.memory_layers)}, topk={self.topk}, capacity={self.capacity}, "
            f"window={self.window}, last_context_length={self.last_context_length}, mem_dtype={self.mem_dtype}, "
            f"backend={self.backend!r}"
            + ("" if self.process_group is None else f", process_group of {self._group_size()} ranks")
            + ")"
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
    process_group: ProcessGroup | None = None,
) -> MemoryIntegration:
    """Give a Llama, Mistral or Qwen2 causal LM instance LongLLaMA's memory inference (reverse: :func:`disable_memory`).

    Every argument is checked here, before the model is changed.

    Args:
        model: a transformers (>= 5) ``LlamaForCausalLM``, ``MistralForCausalLM`` or
            ``Qwen2ForCausalLM`` (:mod:`.models`); only this instance is changed. A sliding-window
            model is served when its local contexts (``window``, ``last_context_length``) fit in
            the sliding window, where sliding and causal attention agree.
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
        process_group: None, or a torch.distributed ProcessGroup of P ranks that share the memory
            (docs/DESIGN.md 7; this process must be a member): run the same model on the same
            inputs on every rank (e.g. under torchrun); each rank keeps 1/P of the memory slots
            (:class:`MemoryCache` says which) and the memory layers run
            :func:`fot_kernels.distributed.memory_layer_attention`, so every rank computes what
            one process with the whole memory computes (within rounding; kNN ties: see
            :class:`MemoryCache`). ``capacity`` stays the global number of slots and must be a
            multiple of P. Every forward ends with one small collective
            (:func:`fot_kernels.distributed.synchronize_errors`): an error on one rank is raised
            on every rank, never a hang.

    Returns:
        the :class:`MemoryIntegration`, also at ``model.fot_memory`` (``.new_cache()`` makes a
        :class:`MemoryCache` to pass as ``cache=``).
    """
    layers = check_model(model, "enable_memory")
    config = model.config
    if hasattr(model, STATE_ATTR):
        raise ValueError("memory is already enabled on this model; call disable_memory(model) first")
    if hasattr(model, CROSSBATCH_ATTR):
        raise ValueError(
            "this model is in CrossBatch training mode (enable_crossbatch); call disable_crossbatch(model) before "
            "enable_memory(model)"
        )
    memory_layers = check_memory_layers(memory_layers, len(layers), config)
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
    sliding = sliding_window(config)
    if sliding is not None and max(window, last_context_length) > sliding:
        raise ValueError(
            f"{type(model).__name__} uses sliding_window={sliding}, smaller than window ({window}) or "
            f"last_context_length ({last_context_length}): sliding-window attention is not supported with memory; "
            f"pass window <= {sliding} and last_context_length <= {sliding} (where it equals causal attention), "
            "or set config.sliding_window=None"
        )
    if mem_dtype is None:
        mem_dtype = getattr(config, "mem_dtype", None) or model.dtype
    mem_dtype = _parse_dtype(mem_dtype, "mem_dtype")
    backend = _check_backend(backend)
    if process_group is not None:
        _, world = check_process_group(process_group)
        if capacity % world:
            raise ValueError(
                f"capacity ({capacity}) must be a multiple of the process group's size ({world}): capacity is the "
                "global number of memory slots, each rank holds capacity / size"
            )
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
        process_group=process_group,
    )
    state.attach(model)
    return state


def disable_memory(model) -> None:
    """Undo :func:`enable_memory`: remove the hooks and the forward, restore the attention implementation."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, MemoryIntegration):
        raise ValueError("memory is not enabled on this model")
    state.detach(model)


__all__ = ["CROSSBATCH_ATTR", "STATE_ATTR", "MemoryIntegration", "disable_memory", "enable_memory"]
