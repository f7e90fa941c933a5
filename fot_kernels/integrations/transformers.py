"""LongLLaMA memory inference for a stock Hugging Face Llama model (transformers >= 5).

    from fot_kernels.integrations.transformers import enable_memory, disable_memory

    enable_memory(model, memory_layers=[6, 12, 18], topk=None, capacity=65536, last_context_length=1024)
    out = model(long_input_ids)                  # windows -> memory, last 1024 tokens -> local cache
    text = model.generate(long_input_ids, max_new_tokens=64)
    disable_memory(model)                        # the model is stock again

What changes, on the given model instance only (no library function is replaced):

- ``model.forward`` becomes an instance attribute that runs LongLLaMA's input handling: the input
  minus its last ``last_context_length`` tokens is processed in windows of ``window`` tokens
  (default ``config.max_position_embeddings``), each window attending to the memory and to itself
  and then appended to the memory of the memory layers; non-memory layers see only the current
  window. The last ``last_context_length`` tokens go to the local cache (``use_cache=True``, the
  default) or to memory too (``use_cache=False``).
- the model's attention implementation becomes ``"fot_memory"``, a function registered in
  transformers' ``AttentionInterface`` (plus its mask builder in ``AttentionMaskInterface``): memory
  layers run one joint softmax over ``[local causal | memory]`` through ``fot_kernels`` ops (dense,
  or kNN top-k with ``topk=k``); other layers run plain causal attention.
- a forward hook on each memory layer's ``k_proj`` captures the keys before RoPE, so that memory
  keys are stored un-rotated, exactly as LongLLaMA stores them.
- the state lives in a :class:`MemoryCache` (a transformers ``Cache``): per-layer local caches
  (bounded by the window: when it would overflow, its whole content moves to memory before the
  attention that follows, and local positions restart at 0) and a
  :class:`~fot_kernels.memory.MemoryStore`. ``generate()`` creates one automatically; pass your own
  with ``cache=`` to keep memory across calls, and ``cache.reset()`` between documents.

Positions: like LongLLaMA, the rotary position of a local token is its position id minus the
smallest position id in the local context, so each window and each local cache after a move
starts at 0. Position ids default to ``generate``'s (cumulative sum of the attention mask, so a
left-padded row is rotated like the same row without padding). Padding (``attention_mask == 0``)
is masked locally and in memory.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..memory import MemoryStore, MemoryView, _parse_dtype
from ..nn import local_attention, memory_layer_attention

try:
    from transformers import AttentionInterface, LlamaConfig
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover - import guard
    raise ImportError(
        "fot_kernels.integrations.transformers needs transformers >= 5: pip install 'fot-kernels[hf]'"
    ) from exc

ATTN_IMPLEMENTATION = "fot_memory"
_STATE_ATTR = "fot_memory"


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What one call of the inner model (one window) does; set before it, committed after it."""

    length: int
    store_local: bool  # keep the tokens in the local cache (else: append them to memory after attention)
    move: bool  # move the whole local cache to memory before attending
    positions: Tensor  # absolute position ids of the new tokens [B, n]
    valid: Tensor | None  # new tokens' padding mask [B, n] (None: no padding)
    kv_valid: Tensor | None  # padding mask of [kept local | new] [B, Lk] (None: no padding)


class _LocalLayer(DynamicLayer):
    """A DynamicLayer (rotated keys, values) that memory layers extend with the un-rotated keys."""

    def __init__(self, keep_unrotated: bool) -> None:
        super().__init__()
        self.keep_unrotated = keep_unrotated
        self.unrotated: Tensor | None = None

    def clear(self) -> None:
        self.keys = self.values = self.unrotated = None
        self.is_initialized = False

    def append(self, key: Tensor, value: Tensor, unrotated: Tensor | None) -> tuple[Tensor, Tensor]:
        keys, values = DynamicLayer.update(self, key, value)
        if self.keep_unrotated:
            self.unrotated = unrotated if self.unrotated is None else torch.cat([self.unrotated, unrotated], dim=2)
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.unrotated is not None:
            self.unrotated = self.unrotated.index_select(0, beam_idx.to(self.unrotated.device))

    def reset(self) -> None:
        self.unrotated = None
        super().reset()


class MemoryCache(Cache):
    """Local caches of every layer plus the FoT memory of the memory layers.

    ``get_seq_length()`` is the number of tokens this cache has seen (memory + local), the
    transformers convention for "past length", so that ``generate`` continues from a cache the way
    it does for a ``DynamicCache``. The local cache holds at most ``window`` tokens (it may briefly
    hold ``last_context_length`` > window tokens after a prefill, as in LongLLaMA).

    Args:
        num_layers: the model's number of decoder layers.
        memory_layers: indices of the memory layers.
        window: local context window.
        capacity: memory slots per row and layer (FIFO eviction beyond).
        mem_dtype: memory storage dtype.
    """

    def __init__(self, num_layers: int, memory_layers: Sequence[int], *, window: int, capacity: int, mem_dtype: torch.dtype) -> None:
        self.memory_layers = tuple(memory_layers)
        super().__init__(layers=[_LocalLayer(i in self.memory_layers) for i in range(num_layers)])
        self.window, self.capacity, self.mem_dtype = window, capacity, mem_dtype
        self.memory: MemoryStore | None = None  # allocated on the first append (batch size, heads, device)
        self.seen_tokens = 0
        self.local_positions: Tensor | None = None  # [B, Lc] absolute position ids of the local tokens
        self.local_valid: Tensor | None = None  # [B, Lc] bool
        self._plan: _Plan | None = None
        self._unrotated: dict[int, Tensor] = {}  # this call's un-rotated keys, per memory layer

    # ---- transformers Cache API ------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._plan is None:
            return self.local_length + query_length, 0
        kept = 0 if (self._plan.move or not self._plan.store_local) else self.local_length
        return kept + query_length, 0

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        plan = self._plan
        if plan is None:
            raise RuntimeError("a MemoryCache is only usable through a model prepared by enable_memory()")
        if not plan.store_local:  # prefill window: nothing local; memory layers append after attention
            return key_states, value_states
        layer = self.layers[layer_idx]
        is_memory = layer_idx in self.memory_layers
        if plan.move and layer.get_seq_length() > 0:
            if is_memory:  # LongLLaMA: the evicted local cache enters memory before this attention
                self.append_memory(layer_idx, layer.unrotated, layer.values, self.local_valid)
            layer.clear()
        return layer.append(key_states, value_states, self._unrotated.pop(layer_idx, None) if is_memory else None)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a MemoryCache cannot be cropped (tokens already moved to memory cannot be removed)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row ``beam_idx[i]`` (local caches and memory)."""
        super().reorder_cache(beam_idx)
        if self.local_positions is not None:
            idx = beam_idx.to(self.local_positions.device)
            self.local_positions = self.local_positions.index_select(0, idx)
            self.local_valid = self.local_valid.index_select(0, idx)
        if self.memory is not None:
            self.memory.reorder(beam_idx.cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(self.batch_rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).flatten())

    def reset(self) -> None:
        """Forget everything (memory and local caches): a new document for every row."""
        for layer in self.layers:
            layer.reset()
        if self.memory is not None:
            self.memory.reset()
        self.seen_tokens = 0
        self.local_positions = self.local_valid = None

    # ---- memory ----------------------------------------------------------------------------

    @property
    def local_length(self) -> int:
        return 0 if self.local_positions is None else self.local_positions.shape[1]

    @property
    def batch_rows(self) -> int:
        """Batch size this cache holds state for (0 when empty)."""
        if self.local_positions is not None:
            return self.local_positions.shape[0]
        return self.memory.batch_size if self.memory is not None else 0

    def reset_memory(self, rows: Sequence[int] | Tensor | None = None) -> None:
        """Empty the memory of the given batch rows (all when None); the local cache is kept."""
        if self.memory is not None:
            self.memory.reset(rows)

    def memory_view(self, layer_idx: int) -> MemoryView | None:
        return None if self.memory is None else self.memory.view(layer_idx)

    def append_memory(self, layer_idx: int, keys: Tensor, values: Tensor, valid: Tensor | None) -> None:
        if self.memory is None:
            self.memory = MemoryStore(
                self.memory_layers, batch_size=keys.shape[0], num_kv_heads=keys.shape[1], head_dim=keys.shape[3],
                capacity=self.capacity, dtype=self.mem_dtype, device=keys.device,
            )  # fmt: skip
        self.memory.append(layer_idx, keys, values, valid)

    def save_memory(self, path) -> None:
        """Write the memory (not the local cache) with :meth:`MemoryStore.save`."""
        if self.memory is None:
            raise ValueError("the memory is empty: nothing has been appended yet")
        self.memory.save(path)

    def load_memory(self, path, *, device: torch.device | str | None = None) -> None:
        """Replace the memory by a file written by :meth:`save_memory`; the geometry must match."""
        expect = {"layers": list(self.memory_layers), "capacity": self.capacity, "dtype": self.mem_dtype}
        if self.memory is not None:
            expect.update(batch_size=self.memory.batch_size, num_kv_heads=self.memory.num_kv_heads, head_dim=self.memory.head_dim)
        self.memory = MemoryStore.load(path, device=device or (self.memory.device if self.memory else "cpu"), expect=expect)

    # ---- per-call plan (used by the patched forward) ---------------------------------------

    def _begin(self, positions: Tensor, valid: Tensor | None, store_local: bool) -> tuple[_Plan, Tensor]:
        """Plan one inner call; returns the plan and the local (relative) position ids."""
        batch, length = positions.shape
        if self.batch_rows and self.batch_rows != batch:
            raise ValueError(f"batch size {batch} differs from the cache's ({self.batch_rows})")
        move = store_local and self.local_length > 0 and self.local_length + length > self.window
        keep = store_local and not move and self.local_length > 0
        all_positions = torch.cat([self.local_positions, positions], 1) if keep else positions
        new_valid = valid if valid is not None else torch.ones(batch, length, dtype=torch.bool, device=positions.device)
        kv_valid = torch.cat([self.local_valid, new_valid], 1) if keep else new_valid
        rel = positions - all_positions.min(dim=1, keepdim=True).values if length else positions
        self._plan = _Plan(length, store_local, move, positions, valid, None if bool(kv_valid.all()) else kv_valid)
        self._plan_kv_valid_full = kv_valid
        self._plan_all_positions = all_positions
        return self._plan, rel

    def _commit(self) -> None:
        plan = self._plan
        if plan.store_local:
            self.local_positions = self._plan_all_positions
            self.local_valid = self._plan_kv_valid_full
        self.seen_tokens += plan.length
        self._end()

    def _end(self) -> None:
        self._plan = None
        self._unrotated.clear()
        self._plan_kv_valid_full = self._plan_all_positions = None


# ----------------------------------------------------------------------------------------------
# attention and mask functions (registered under ATTN_IMPLEMENTATION)
# ----------------------------------------------------------------------------------------------


def _fot_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    cache = kwargs.get("fot_cache")
    state = kwargs.get("fot_state")
    if not isinstance(cache, MemoryCache) or state is None:
        raise RuntimeError(
            f"attn_implementation {ATTN_IMPLEMENTATION!r} only runs inside a model prepared by "
            "fot_kernels.integrations.transformers.enable_memory()"
        )
    padding = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
    layer_idx = module.layer_idx
    if layer_idx not in cache.memory_layers:
        out = local_attention(query, key, value, key_padding_mask=padding, softmax_scale=scaling)
    else:
        out = state.memory_attention(
            query, key, value, cache.memory_view(layer_idx), key_padding_mask=padding,
            topk=state.topk, softmax_scale=scaling, backend=state.backend,
        )  # fmt: skip
        plan = cache._plan
        if not plan.store_local:  # LongLLaMA: the window enters memory after its attention
            cache.append_memory(layer_idx, cache._unrotated.pop(layer_idx), value, plan.valid)
    return out.transpose(1, 2).contiguous(), None


def _fot_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """The 2D key padding mask [B, kv_length] (True = token), or None when nothing is padded; the
    attention function applies the causal part itself."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def _register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, _fot_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _fot_mask)


# ----------------------------------------------------------------------------------------------
# the integration state and the patched forward
# ----------------------------------------------------------------------------------------------


class MemoryIntegration:
    """Settings and hooks of one memory-enabled model (``model.fot_memory``)."""

    def __init__(self, model, memory_layers, topk, capacity, window, last_context_length, mem_dtype, backend, previous_attn):
        self.memory_layers = tuple(memory_layers)
        self.topk, self.capacity, self.window = topk, capacity, window
        self.last_context_length, self.mem_dtype, self.backend = last_context_length, mem_dtype, backend
        self.previous_attn = previous_attn
        #: the memory layers' attention, ``memory_layer_attention``'s signature; replaceable to
        #: run a baseline (e.g. the LongLLaMA-style plain-PyTorch one in benchmarks/) on the same model
        self.memory_attention = memory_layer_attention
        self.num_layers = len(_decoder_layers(model))
        self.active: MemoryCache | None = None
        self.previous_forward = None
        self.hooks = []
        for idx in self.memory_layers:
            attn = _decoder_layers(model)[idx].self_attn
            self.hooks.append(attn.k_proj.register_forward_hook(self._key_hook(idx, attn.head_dim)))

    def _key_hook(self, layer_idx: int, head_dim: int):
        def hook(_module, _inputs, output):
            if self.active is not None:
                batch, length = output.shape[:2]
                self.active._unrotated[layer_idx] = output.view(batch, length, -1, head_dim).transpose(1, 2)

        return hook

    def new_cache(self) -> MemoryCache:
        """An empty :class:`MemoryCache` for this model (e.g. to keep memory across calls)."""
        return MemoryCache(self.num_layers, self.memory_layers, window=self.window, capacity=self.capacity, mem_dtype=self.mem_dtype)

    def __repr__(self) -> str:
        return (
            f"MemoryIntegration(memory_layers={list(self.memory_layers)}, topk={self.topk}, capacity={self.capacity}, "
            f"window={self.window}, last_context_length={self.last_context_length}, mem_dtype={self.mem_dtype}, backend={self.backend!r})"
        )


def _decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def _resolve_cache(state: MemoryIntegration, cache, batch: int) -> MemoryCache:
    if isinstance(cache, MemoryCache):
        if cache.memory_layers != state.memory_layers or cache.window != state.window:
            raise ValueError(
                f"this MemoryCache was made for memory_layers={list(cache.memory_layers)}, window={cache.window}; "
                f"the model uses memory_layers={list(state.memory_layers)}, window={state.window}"
            )
        rows = cache.batch_rows
        if rows and rows != batch:
            if batch % rows:
                raise ValueError(f"input batch size {batch} is not a multiple of the MemoryCache's ({rows})")
            cache.batch_repeat_interleave(batch // rows)  # e.g. generate() expanding for beam search
        return cache
    if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
        return state.new_cache()  # also replaces the empty DynamicCache that generate() makes
    raise TypeError(
        f"a memory-enabled model needs a MemoryCache (model.fot_memory.new_cache()), got a non-empty {type(cache).__name__}"
    )


def _memory_forward(
    self,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    cache: Cache | None = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | Tensor = 0,
    **kwargs,
) -> CausalLMOutputWithPast:
    """LongLLaMA input handling around the stock decoder (see the module docstring)."""
    state: MemoryIntegration = getattr(self, _STATE_ATTR)
    if "past_key_values" in kwargs:
        legacy = kwargs.pop("past_key_values")
        cache = legacy if cache is None else cache
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, False):
            raise ValueError(f"{flag}=True is not supported with memory (the input is processed in windows)")
    kwargs.pop("return_dict", None)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    inputs = input_ids if input_ids is not None else inputs_embeds
    batch, length = inputs.shape[:2]
    device = inputs.device
    use_cache = self.config.use_cache if use_cache is None else bool(use_cache)
    cache = _resolve_cache(state, cache, batch)

    valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise ValueError(
                f"attention_mask must be 2-D [B, >= L] = [{batch}, >= {length}] (padding mask), got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        valid = None if bool(valid.all()) else valid
    if position_ids is None:
        start = cache.local_positions.max(dim=1, keepdim=True).values + 1 if cache.local_length else torch.zeros(batch, 1, dtype=torch.long, device=device)
        position_ids = start + torch.arange(length, device=device)
    else:
        position_ids = position_ids.to(device=device, dtype=torch.long)
        if position_ids.dim() != 2 or position_ids.shape[-1] != length:
            raise ValueError(f"position_ids must be [B, L] with L = {length}, got {tuple(position_ids.shape)}")
        position_ids = position_ids.expand(batch, length)

    to_memory = max(length - state.last_context_length, 0)
    pieces = [(beg, min(beg + state.window, to_memory)) for beg in range(0, to_memory, state.window)]
    if length > to_memory:
        pieces.append((to_memory, length))
    hidden = []
    for beg, end in pieces:
        last = end == length and beg == to_memory
        store_local = cache.local_length > 0 or (last and use_cache)
        plan, rel_positions = cache._begin(position_ids[:, beg:end], None if valid is None else valid[:, beg:end], store_local)
        state.active = cache
        try:
            out = self.model(
                input_ids=None if input_ids is None else input_ids[:, beg:end],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, beg:end],
                attention_mask=plan.kv_valid,
                position_ids=rel_positions,
                cache=cache,
                use_cache=True,
                fot_cache=cache,
                fot_state=state,
                **kwargs,
            )
            cache._commit()
        except BaseException:
            cache._end()
            raise
        finally:
            state.active = None
        hidden.append(out.last_hidden_state)
    hidden_states = torch.cat(hidden, dim=1) if hidden else inputs.new_zeros(batch, 0, self.config.hidden_size)
    if isinstance(logits_to_keep, int):
        kept = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
    else:
        kept = hidden_states[:, logits_to_keep, :]
    logits = self.lm_head(kept)
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


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

    Args:
        model: a transformers (>= 5) ``LlamaForCausalLM``; only this instance is changed.
        memory_layers: decoder layer indices with memory (default: ``config.mem_layers``, the
            LongLLaMA config field).
        topk: None for dense memory (LongLLaMA's released inference) or k for kNN memory.
        capacity: memory slots per batch row and layer, preallocated; the oldest slots are evicted
            beyond it. Must be >= window and >= last_context_length.
        last_context_length: tokens of a long input kept in the local cache for generation
            (default: ``config.last_context_length``, else ``min(1024, window)``).
        window: context window (default ``config.max_position_embeddings``, as LongLLaMA).
        mem_dtype: memory storage dtype (default: ``config.mem_dtype``, else the model's dtype).
        backend: ``fot_kernels`` backend for the memory layers.

    Returns:
        the :class:`MemoryIntegration`, also at ``model.fot_memory`` (``.new_cache()`` makes a
        :class:`MemoryCache` to pass as ``cache=``).
    """
    layers = _check_model(model)
    config = model.config
    if hasattr(model, _STATE_ATTR):
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
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TypeError(f"memory_layers entries must be ints, got {idx!r}")
        if not 0 <= idx < len(layers):
            raise ValueError(f"memory layer index {idx} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    if len(set(memory_layers)) != len(memory_layers):
        raise ValueError(f"memory_layers must be distinct, got {memory_layers}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be None (dense memory) or an int >= 1, got {topk!r}")
    window = config.max_position_embeddings if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if last_context_length is None:
        last_context_length = getattr(config, "last_context_length", None)
        last_context_length = min(1024, window) if last_context_length is None else last_context_length
    if isinstance(last_context_length, bool) or not isinstance(last_context_length, int) or last_context_length < 0:
        raise ValueError(f"last_context_length must be an int >= 0, got {last_context_length!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity < max(window, last_context_length):
        raise ValueError(
            f"capacity ({capacity}) must be >= window ({window}) and >= last_context_length ({last_context_length}): "
            "a window (or an evicted local cache) must fit in memory"
        )
    if mem_dtype is None:
        mem_dtype = getattr(config, "mem_dtype", None) or model.dtype
    mem_dtype = _parse_dtype(mem_dtype, "mem_dtype")
    if getattr(config, "mem_positionals", True) is False:
        raise ValueError("mem_positionals=False (memory layers without RoPE) is not supported")
    if getattr(config, "mem_attention_grouping", None) is not None:
        warnings.warn("mem_attention_grouping is ignored: the fot_kernels ops never materialise queries x memory", stacklevel=2)
    previous = config._attn_implementation
    _register()
    state = MemoryIntegration(model, memory_layers, topk, capacity, window, last_context_length, mem_dtype, backend, previous)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    setattr(model, _STATE_ATTR, state)
    state.previous_forward = vars(model).get("forward")  # e.g. an accelerate hook's wrapper, restored later
    model.forward = types.MethodType(_memory_forward, model)
    return state


def disable_memory(model) -> None:
    """Undo :func:`enable_memory`: remove the hooks and the forward, restore the attention implementation."""
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, MemoryIntegration):
        raise ValueError("memory is not enabled on this model")
    for hook in state.hooks:
        hook.remove()
    del model.forward  # the instance attribute; the class's forward is visible again
    if state.previous_forward is not None:
        model.forward = state.previous_forward
    model.set_attn_implementation(state.previous_attn)
    delattr(model, _STATE_ATTR)


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


# ----------------------------------------------------------------------------------------------
# LongLLaMA checkpoints
# ----------------------------------------------------------------------------------------------

#: LongLLaMA config fields that map onto enable_memory arguments
LONGLLAMA_FIELDS = ("mem_layers", "last_context_length", "mem_dtype", "mem_positionals", "mem_attention_grouping")


def longllama_config_to_llama(config) -> LlamaConfig:
    """A ``LlamaConfig`` from a LongLLaMA config (object or dict): same architecture fields, the
    LongLLaMA memory fields kept as attributes (``enable_memory`` reads them)."""
    data = dict(config if isinstance(config, dict) else config.to_dict())
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "torch_attention", "gradient_checkpoint_every_ith"):
        data.pop(key, None)
    data.setdefault("num_key_value_heads", data.get("num_attention_heads"))
    data.setdefault("rope_theta", 10000.0)
    extra = {k: data.pop(k) for k in LONGLLAMA_FIELDS if k in data}
    llama = LlamaConfig(**data)
    for k, v in extra.items():
        setattr(llama, k, v)
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def load_longllama(path: str, *, capacity: int, topk: int | None = None, **from_pretrained_kwargs):
    """Load a LongLLaMA checkpoint into a stock ``LlamaForCausalLM`` with memory enabled from its
    config (``mem_layers``, ``last_context_length``, ``mem_dtype``); LongLLaMA's per-layer
    ``rotary_emb.inv_freq`` buffers in the checkpoint are ignored."""
    import json
    import os

    from transformers import LlamaForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        config = longllama_config_to_llama(json.load(f))
    model = LlamaForCausalLM.from_pretrained(path, config=config, **from_pretrained_kwargs)
    enable_memory(model, topk=topk, capacity=capacity)
    return model


__all__ = [
    "ATTN_IMPLEMENTATION",
    "MemoryCache",
    "MemoryIntegration",
    "disable_memory",
    "enable_memory",
    "load_longllama",
    "longllama_config_to_llama",
]
