"""The model families the integration serves, and what it needs from them: the check that a model is
one of them, the un-rotated-key hooks of the memory layers, and the sliding-window limit.

Served: transformers' ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``
(:data:`SUPPORTED_MODEL_TYPES`, LongLLaMA checkpoints load as Llama). What the integration relies on,
and why other families are refused rather than guessed at:

- ``model.model.layers[i].self_attn`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linear
  projections and ``head_dim``, whose attention goes through transformers' ``AttentionInterface``
  (``config._attn_implementation``) with the RoPE-rotated queries and keys;
- the pre-RoPE key is exactly ``k_proj``'s output (bias included, Qwen2): no key norm between
  the projection and RoPE (a family with ``k_norm``, e.g. Qwen3, would need the hook elsewhere);
- the default RoPE (``rope_type == "default"``), which LongLLaMA's "as if at position 0" memory
  keys assume.

Sliding window (Mistral's ``config.sliding_window``, Qwen2's ``use_sliding_window``): the attention
functions apply a causal (not sliding) local mask, which equals the sliding-window mask exactly when
a query sees at most ``sliding_window`` local keys. Longer local contexts are refused, never
computed differently (:func:`check_local_length`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

from ...memory import _positive_int

#: ``config.model_type`` values of the families served
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_model(model: object, caller: str) -> nn.ModuleList:
    """The decoder layers of ``model`` when it is a served causal LM, else TypeError (ValueError for
    a served family with an unsupported setting) naming what is wrong."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    served = ", ".join(SUPPORTED_MODEL_TYPES)
    if not isinstance(model, nn.Module) or config is None:
        raise TypeError(
            f"{caller} needs a transformers causal LM of a served family ({served}; a LlamaForCausalLM-like "
            f"model), got {type(model).__name__}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"{caller} serves the model families {served} (LlamaForCausalLM-like: RoPE on k_proj's output, "
            f"attention through transformers' AttentionInterface), got {type(model).__name__} with "
            f"model_type {model_type!r}"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise TypeError(
            f"{caller} needs the causal LM (a LlamaForCausalLM-like model with .model.layers and .lm_head), "
            f"got {type(model).__name__}"
        )
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if (
            attn is None
            or not hasattr(attn, "layer_idx")
            or not isinstance(getattr(attn, "head_dim", None), int)
            or not all(isinstance(getattr(attn, p, None), nn.Linear) for p in _PROJECTIONS)
            or hasattr(attn, "k_norm")
        ):
            raise TypeError(
                f"{type(model).__name__}: decoder layers must have a Llama-style self_attn (q_proj, k_proj, v_proj, "
                "o_proj linear projections, head_dim, layer_idx, no key norm)"
            )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only the default RoPE is supported with memory, got rope_type {rope.get('rope_type')!r}")
    return layers


def check_memory_layers(memory_layers: object, num_layers: int, config: object) -> tuple[int, ...]:
    """The memory layer indices as a tuple of distinct ints in ``[0, num_layers)``; None means the
    LongLLaMA config field ``config.mem_layers``."""
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
        if idx >= num_layers:
            raise ValueError(
                f"memory layer index {idx} is out of range: the model has {num_layers} layers (0..{num_layers - 1})"
            )
    layers = tuple(int(idx) for idx in memory_layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"memory_layers must be distinct, got {list(layers)}")
    return layers


def sliding_window(config: object) -> int | None:
    """The local sliding window of the model's attention layers (None: full causal attention)."""
    if getattr(config, "model_type", None) == "qwen2":
        layer_types = getattr(config, "layer_types", None) or ()
        if not getattr(config, "use_sliding_window", False) and "sliding_attention" not in layer_types:
            return None
    window = getattr(config, "sliding_window", None)
    return None if window is None else int(window)


def check_local_length(sliding: object, length: int, layer_idx: int) -> None:
    """Refuse a local context of ``length`` keys in a layer with a smaller sliding window (the
    ``sliding_window`` keyword transformers passes to the attention function)."""
    if sliding is not None and not isinstance(sliding, bool) and length > int(sliding):
        raise ValueError(
            f"layer {layer_idx} has sliding_window={int(sliding)} but attends to {length} local keys: sliding-window "
            "attention is not supported with memory/CrossBatch (only local contexts of at most sliding_window "
            "tokens, where it equals causal attention); use shorter windows/sequences or set config.sliding_window=None"
        )


def add_unrotated_key_hooks(
    model: nn.Module, memory_layers: Sequence[int], sink: Callable[[int, Tensor], None]
) -> list:
    """Forward hooks on the memory layers' ``k_proj`` that hand ``sink(layer_idx, keys)`` the keys
    before RoPE, ``[B, Hkv, L, D]`` (a view of ``k_proj``'s output: gradients flow through it).
    Returns the hook handles (``.remove()`` each to undo)."""
    handles = []
    for idx in memory_layers:
        attn = model.model.layers[idx].self_attn

        def hook(_module, _inputs, output, idx=idx, head_dim=attn.head_dim):
            batch, length = output.shape[:2]
            sink(idx, output.view(batch, length, -1, head_dim).transpose(1, 2))

        handles.append(attn.k_proj.register_forward_hook(hook))
    return handles


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "add_unrotated_key_hooks",
    "check_local_length",
    "check_memory_layers",
    "check_model",
    "sliding_window",
]
