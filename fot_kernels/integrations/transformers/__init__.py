"""LongLLaMA memory inference and FoT CrossBatch training for stock Hugging Face Llama, Mistral and
Qwen2 causal LMs (transformers >= 5).

    from fot_kernels.integrations.transformers import enable_memory, disable_memory

    enable_memory(model, memory_layers=[6, 12, 18], topk=None, capacity=65536, last_context_length=1024)
    out = model(long_input_ids)                  # windows -> memory, last 1024 tokens -> local cache
    text = model.generate(long_input_ids, max_new_tokens=64)
    disable_memory(model)                        # the model is stock again

What changes, on the given model instance only (no library function is replaced):

- ``model.forward`` becomes an instance attribute that runs LongLLaMA's input handling
  (:mod:`.forward`): the input minus its last ``last_context_length`` tokens is processed in
  windows of ``window`` tokens (default ``config.max_position_embeddings``), each window attending
  to the memory and to itself and then appended to the memory of the memory layers; non-memory
  layers see only the current window. The last ``last_context_length`` tokens go to the local
  cache (``use_cache=True``, the default) or to memory too (``use_cache=False``).
- the model's attention implementation becomes ``"fot_memory"`` (:mod:`.attention`), a function
  registered in transformers' ``AttentionInterface`` (plus its mask builder in
  ``AttentionMaskInterface``): memory layers run one joint softmax over ``[local causal | memory]``
  through the public ``fot_kernels`` ops (dense, or kNN top-k with ``topk=k``); other layers run
  plain causal attention.
- a forward hook on each memory layer's ``k_proj`` captures the keys before RoPE, so that memory
  keys are stored un-rotated, exactly as LongLLaMA stores them.
- the state lives in a :class:`MemoryCache` (:mod:`.cache`, a transformers ``Cache``): per-layer
  local caches (bounded by the window: when it would overflow, its whole content moves to memory
  before the attention that follows, and local positions restart at 0) and a
  :class:`~fot_kernels.memory.MemoryStore`. ``generate()`` creates one automatically; pass your
  own with ``cache=`` to keep memory across calls, and ``cache.reset()`` between documents. A
  cache serves the batch size it was filled with; any other batch size is rejected.

Positions: like LongLLaMA, the rotary position of a local token is its position id minus the
smallest position id in the local context, so each window and each local cache after a move
starts at 0. Position ids default to ``generate``'s (cumulative sum of the attention mask, so a
left-padded row is rotated like the same row without padding). Padding (``attention_mask == 0``)
is masked locally and in memory.

Training through memory inference: gradients flow through the memory layers (local part and the
queries that score the memory); the memory is a detached cache.

FoT's CrossBatch training (:mod:`.crossbatch`): ``enable_crossbatch(model, memory_layers,
cross_batch_range, dataset_packing=1, cross_batch_stepping=False)`` makes the memory layers attend
across the rows of each training batch (docs/DESIGN.md 3.5) with the stock forward, loss, gradient
checkpointing, autocast and ``Trainer``; ``disable_crossbatch(model)`` undoes it, and the trained
model then runs ``enable_memory`` with the same memory layers, no conversion. The two modes
exclude each other on one instance.

Model families (:mod:`.models`): Llama, Mistral and Qwen2 (``SUPPORTED_MODEL_TYPES``); others are
refused with a TypeError. Sliding-window attention is served only where it equals causal attention
(local contexts of at most ``sliding_window`` tokens), and refused beyond.

Modules: :mod:`.cache` (state), :mod:`.attention` (attention-interface registration),
:mod:`.forward` (windowed forward), :mod:`.enable` (enable/disable), :mod:`.crossbatch`
(CrossBatch training mode), :mod:`.models` (model families, key hooks), :mod:`.longllama`
(LongLLaMA checkpoints).
"""

from __future__ import annotations

from .attention import ATTN_IMPLEMENTATION
from .cache import MemoryCache, WindowPlan
from .crossbatch import CROSSBATCH_IMPLEMENTATION, CrossBatchIntegration, disable_crossbatch, enable_crossbatch
from .enable import MemoryIntegration, disable_memory, enable_memory
from .longllama import LONGLLAMA_FIELDS, load_longllama, longllama_config_to_llama
from .models import SUPPORTED_MODEL_TYPES

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CROSSBATCH_IMPLEMENTATION",
    "LONGLLAMA_FIELDS",
    "SUPPORTED_MODEL_TYPES",
    "CrossBatchIntegration",
    "MemoryCache",
    "MemoryIntegration",
    "WindowPlan",
    "disable_crossbatch",
    "disable_memory",
    "enable_crossbatch",
    "enable_memory",
    "load_longllama",
    "longllama_config_to_llama",
]
