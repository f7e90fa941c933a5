"""FoT's CrossBatch training mode for a stock Llama / Mistral / Qwen2 causal LM:
:func:`enable_crossbatch`, :func:`disable_crossbatch`.

    from fot_kernels.integrations.transformers import enable_crossbatch, disable_crossbatch
    from fot_kernels.training import KPackingDataset

    enable_crossbatch(model, memory_layers=[6, 12, 18], cross_batch_range=3, dataset_packing=2)
    for batch in DataLoader(KPackingDataset(docs, batch_size=8, seq_len=2048, packing=2), batch_size=None):
        model(**batch).loss.backward()        # the usual causal-LM loss; gradient checkpointing, autocast, Trainer
    disable_crossbatch(model)                  # stock again
    enable_memory(model, memory_layers=[6, 12, 18], capacity=...)   # inference with the same layers

What changes, on the given instance only:

- the attention implementation becomes ``"fot_crossbatch"``, a function registered in transformers'
  ``AttentionInterface`` (and the 2-D padding-mask builder in ``AttentionMaskInterface``): in the
  memory layers, :func:`fot_kernels.crossbatch.crossbatch_attention` with the RoPE-rotated
  queries and local keys (positions 0..L-1 of every row) and the **un-rotated** keys of the same
  layer as ``mem_keys``, exactly as LongLLaMA was trained (the memory values are the layer's
  values); row b attends to its causal local context and to every key of rows b-1 .. b-d of the
  same batch that the packing/stepping rule makes visible, in one fp32 softmax, with gradients
  flowing into the rows the memory comes from. Other layers run plain causal attention (torch
  SDPA; with padding an explicit fp32 softmax), as the stock model does.
- forward hooks on the memory layers' ``k_proj`` hand the un-rotated keys to the attention (the
  same hooks ``enable_memory`` uses to store memory keys un-rotated, :mod:`.models`); they also
  fire when gradient checkpointing recomputes a layer.
- a forward pre-hook on the model checks each call: no KV cache (``cache``/``past_key_values`` is
  refused; ``use_cache`` defaults to False and ``use_cache=True`` is refused: CrossBatch is a
  training forward over whole [B, L] batches, for generation ``disable_crossbatch`` and
  ``enable_memory``), ``position_ids`` None or ``0..L-1`` on every row, ``B`` a multiple of
  ``dataset_packing``, no ``output_attentions``.
- the state lives at ``model.fot_crossbatch`` (:class:`CrossBatchIntegration`).

``model.forward`` itself is not replaced, so ``disable_crossbatch`` gives back the stock model
bit for bit, and the Hugging Face ``Trainer``, ``gradient_checkpointing_enable()`` (memory layers
included) and ``torch.autocast`` work as with the stock model. The ``attention_mask`` (padding,
1 = token) becomes the op's ``key_padding_mask``: it masks the padded keys of each row's **local**
context; a padded row's keys stay visible to the rows after it as memory (docs/DESIGN.md 3.5, as
in the released FoT code, whose pipeline never pads: use :class:`fot_kernels.training.KPackingDataset`).
The loss is the model's own (``labels``, or ``shift_labels`` for the batcher's pre-shifted
targets). Not served, with an error: a KV cache, attention dropout, packed-sequence (padding-free)
batches, 4-D attention masks, sliding-window attention over more than ``sliding_window`` local keys.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ...memory import _positive_int
from ...nn import _check_backend, local_attention
from ._hf import AttentionInterface, AttentionMaskInterface
from .attention import check_attention_kwargs, fot_mask
from .enable import CROSSBATCH_ATTR, STATE_ATTR
from .models import add_unrotated_key_hooks, check_memory_layers, check_model

#: the attention implementation name of a model in CrossBatch training mode
CROSSBATCH_IMPLEMENTATION = "fot_crossbatch"

# attention module -> (its model's CrossBatchIntegration, whether it is a memory layer); weak keys:
# nothing here keeps a model alive, and no module is given an attribute
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_settings(
    cross_batch_range: object, dataset_packing: object, cross_batch_stepping: object, backend: object
) -> tuple[int, int, bool, str]:
    if not isinstance(cross_batch_stepping, bool):
        raise TypeError(
            f"cross_batch_stepping must be a bool, got {type(cross_batch_stepping).__name__} {cross_batch_stepping!r}"
        )
    return (
        _positive_int("cross_batch_range", cross_batch_range, 1),
        _positive_int("dataset_packing", dataset_packing, 1),
        cross_batch_stepping,
        _check_backend(backend),
    )


class CrossBatchIntegration:
    """Settings and hooks of a model in CrossBatch training mode (``model.fot_crossbatch``), made by
    :func:`enable_crossbatch`.

    Attributes:
        memory_layers, cross_batch_range, dataset_packing, cross_batch_stepping, backend: the
            settings :func:`enable_crossbatch` resolved (the last four are passed to
            ``crossbatch_attention`` at every call; change them between steps with :meth:`update`,
            e.g. to schedule d from small to large).
        num_layers: the model's number of decoder layers.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        memory_layers: tuple[int, ...],
        cross_batch_range: int,
        dataset_packing: int,
        cross_batch_stepping: bool,
        backend: str,
    ) -> None:
        self.num_layers = num_layers
        self.memory_layers = memory_layers
        self.cross_batch_range, self.dataset_packing = cross_batch_range, dataset_packing
        self.cross_batch_stepping, self.backend = cross_batch_stepping, backend
        self._unrotated: dict[int, Tensor] = {}
        self._handles: list = []
        self._previous_attn: str | None = None
        self._forward_params: list[str] = []

    def update(
        self,
        *,
        cross_batch_range: int | None = None,
        dataset_packing: int | None = None,
        cross_batch_stepping: bool | None = None,
        backend: str | None = None,
    ) -> None:
        """Change settings between steps (None keeps one), each checked as by :func:`enable_crossbatch`;
        nothing changes when one is refused."""
        new = {
            "cross_batch_range": self.cross_batch_range if cross_batch_range is None else cross_batch_range,
            "dataset_packing": self.dataset_packing if dataset_packing is None else dataset_packing,
            "cross_batch_stepping": self.cross_batch_stepping if cross_batch_stepping is None else cross_batch_stepping,
            "backend": self.backend if backend is None else backend,
        }
        checked = _check_settings(**new)
        self.cross_batch_range, self.dataset_packing, self.cross_batch_stepping, self.backend = checked

    # ---- install / remove ----------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Install on ``model``: attention implementation, key hooks, call checks, ``model.fot_crossbatch``."""
        register()
        self._previous_attn = model.config._attn_implementation
        model.set_attn_implementation(CROSSBATCH_IMPLEMENTATION)  # first: the step that may refuse
        self._handles.extend(add_unrotated_key_hooks(model, self.memory_layers, self._capture))
        self._forward_params = list(inspect.signature(type(model).forward).parameters)[1:]
        self._handles.append(model.register_forward_pre_hook(self._check_call, with_kwargs=True))
        for layer in model.model.layers:
            _LAYERS[layer.self_attn] = (self, layer.self_attn.layer_idx in self.memory_layers)
        setattr(model, CROSSBATCH_ATTR, self)

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in model.model.layers:
            _LAYERS.pop(layer.self_attn, None)
        self._unrotated.clear()
        model.set_attn_implementation(self._previous_attn)
        delattr(model, CROSSBATCH_ATTR)

    # ---- per call ------------------------------------------------------------------------------

    def _capture(self, layer_idx: int, keys: Tensor) -> None:
        self._unrotated[layer_idx] = keys

    def _check_call(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model's forward pre-hook: the call's arguments by name, checked (module docstring)."""
        if len(args) > len(self._forward_params):
            raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
        named = dict(zip(self._forward_params, args))
        for name in named:
            if name in kwargs:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {name!r}")
        named.update(kwargs)
        for name in ("cache", "past_key_values"):
            if named.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported in CrossBatch training mode (a training forward over whole [B, L] "
                    "batches, no KV cache); for generation call disable_crossbatch(model), then enable_memory(model)"
                )
        if named.get("use_cache"):
            raise ValueError(
                "use_cache=True is not supported in CrossBatch training mode (no KV cache); for generation call "
                "disable_crossbatch(model), then enable_memory(model)"
            )
        named["use_cache"] = False
        if named.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported in CrossBatch training mode")
        inputs = named.get("input_ids")
        inputs = named.get("inputs_embeds") if inputs is None else inputs
        if isinstance(inputs, Tensor) and inputs.dim() >= 2:
            batch, length = inputs.shape[:2]
            if batch % self.dataset_packing:
                raise ValueError(
                    f"the batch size ({batch}) must be a multiple of dataset_packing ({self.dataset_packing})"
                )
            positions = named.get("position_ids")
            if positions is not None:
                expected = torch.arange(length, device=positions.device)
                if positions.shape[-1] != length or not bool((positions == expected).all()):
                    raise ValueError(
                        "position_ids must be None or 0..L-1 on every row in CrossBatch training mode (local "
                        "positions restart at 0 in every row, as LongLLaMA was trained)"
                    )
        mask = named.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2-D padding mask [B, L] in CrossBatch training mode, got shape "
                f"{tuple(mask.shape)}"
            )
        self._unrotated.clear()
        return (), named

    def unrotated_keys(self, layer_idx: int, key: Tensor) -> Tensor:
        """The un-rotated keys ``k_proj``'s hook captured in this layer's forward, checked against
        the rotated ``key`` ``[B, Hkv, L, D]`` they belong to."""
        keys = self._unrotated.pop(layer_idx, None)
        if keys is None or keys.shape != key.shape:
            got = "none" if keys is None else f"shape {tuple(keys.shape)}"
            raise RuntimeError(
                f"memory layer {layer_idx}: no un-rotated keys of shape {tuple(key.shape)} were captured in this "
                f"forward (got {got}): was the layer's k_proj called, and the model prepared by enable_crossbatch()?"
            )
        return keys

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mem_keys: Tensor, padding, scale: float) -> Tensor:
        """``crossbatch_attention`` with this model's settings; under ``torch.autocast`` every input
        is cast to the autocast dtype first (as autocast does for SDPA) and the op runs outside it."""
        from ...crossbatch import crossbatch_attention

        settings = dict(
            cross_batch_range=self.cross_batch_range,
            dataset_packing=self.dataset_packing,
            cross_batch_stepping=self.cross_batch_stepping,
            key_padding_mask=padding,
            softmax_scale=scale,
            backend=self.backend,
        )
        device = query.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            tensors = [t.to(dtype) for t in (query, key, value, mem_keys)]
            with torch.autocast(device, enabled=False):
                return crossbatch_attention(*tensors, **settings)
        tensors = [t.to(query.dtype) for t in (query, key, value, mem_keys)]
        return crossbatch_attention(*tensors, **settings)

    def __repr__(self) -> str:
        settings = (
            f"memory_layers={list(self.memory_layers)}, cross_batch_range={self.cross_batch_range}, "
            f"dataset_packing={self.dataset_packing}, cross_batch_stepping={self.cross_batch_stepping}, "
            f"backend={self.backend!r}"
        )
        return f"CrossBatchIntegration({settings})"


def crossbatch_attention_function(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature (registered as :data:`CROSSBATCH_IMPLEMENTATION`):
    CrossBatch attention in memory layers, causal attention elsewhere. Returns ``([B, L, Hq, D], None)``."""
    entry = _LAYERS.get(module)
    if entry is None:
        raise RuntimeError(
            f"attn_implementation {CROSSBATCH_IMPLEMENTATION!r} only runs inside a model prepared by "
            "fot_kernels.integrations.transformers.enable_crossbatch()"
        )
    state, is_memory = entry
    check_attention_kwargs(module, key, dropout, kwargs)
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"CrossBatch training mode attends within each [B, L] batch (no KV cache), but layer {module.layer_idx} "
            f"got {query.shape[2]} queries and {key.shape[2]} keys: pass use_cache=False and no cache"
        )
    if isinstance(attention_mask, Tensor) and attention_mask.dim() != 2:
        raise ValueError(f"CrossBatch needs a 2-D padding mask, got an attention mask of shape {attention_mask.shape}")
    padding = attention_mask if isinstance(attention_mask, Tensor) else None
    if is_memory:
        mem_keys = state.unrotated_keys(module.layer_idx, key)
        out = state.attend(query, key, value, mem_keys, padding, scaling)
    else:
        out = local_attention(query, key, value, key_padding_mask=padding, softmax_scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`crossbatch_attention_function` and the padding-mask builder under
    :data:`CROSSBATCH_IMPLEMENTATION` (idempotent)."""
    AttentionInterface.register(CROSSBATCH_IMPLEMENTATION, crossbatch_attention_function)
    AttentionMaskInterface.register(CROSSBATCH_IMPLEMENTATION, fot_mask)


def enable_crossbatch(
    model,
    memory_layers: Iterable[int] | None,
    cross_batch_range: int,
    dataset_packing: int = 1,
    cross_batch_stepping: bool = False,
    backend: str = "auto",
) -> CrossBatchIntegration:
    """Put a Llama / Mistral / Qwen2 causal LM instance in FoT's CrossBatch training mode (module
    docstring; reverse: :func:`disable_crossbatch`). Every argument is checked before the model is
    changed.

    Args:
        model: a transformers (>= 5) ``LlamaForCausalLM``, ``MistralForCausalLM`` or
            ``Qwen2ForCausalLM``; only this instance is changed. Not while ``enable_memory`` is
            active on it.
        memory_layers: decoder layer indices with CrossBatch attention (None: ``config.mem_layers``,
            the LongLLaMA config field); use the same ones with ``enable_memory`` at inference.
        cross_batch_range: d >= 1, the previous batch rows each row may attend to.
        dataset_packing: P >= 1, rows per document stream (``KPackingDataset(packing=P)``); the
            batch size must be a multiple of it.
        cross_batch_stepping: FoT's stepping rule (different ranges within one batch, with P > 1).
        backend: ``"auto"`` or a ``crossbatch_attention`` backend name.

    Returns:
        the :class:`CrossBatchIntegration`, also at ``model.fot_crossbatch``.
    """
    layers = check_model(model, "enable_crossbatch")
    if hasattr(model, CROSSBATCH_ATTR):
        raise ValueError(
            "CrossBatch training mode is already enabled on this model; call disable_crossbatch(model) first"
        )
    if hasattr(model, STATE_ATTR):
        raise ValueError(
            "memory inference (enable_memory) is active on this model; call disable_memory(model) before "
            "enable_crossbatch(model)"
        )
    memory_layers = check_memory_layers(memory_layers, len(layers), model.config)
    d, packing, stepping, backend = _check_settings(cross_batch_range, dataset_packing, cross_batch_stepping, backend)
    state = CrossBatchIntegration(
        num_layers=len(layers),
        memory_layers=memory_layers,
        cross_batch_range=d,
        dataset_packing=packing,
        cross_batch_stepping=stepping,
        backend=backend,
    )
    if getattr(model.config, "mem_positionals", True) is False:
        raise ValueError("mem_positionals=False (memory layers without RoPE) is not supported")
    state.attach(model)
    return state


def disable_crossbatch(model) -> None:
    """Undo :func:`enable_crossbatch`: the stock attention implementation, no hooks."""
    state = getattr(model, CROSSBATCH_ATTR, None)
    if not isinstance(state, CrossBatchIntegration):
        raise ValueError("CrossBatch training mode is not enabled on this model")
    state.detach(model)


__all__ = [
    "CROSSBATCH_IMPLEMENTATION",
    "CrossBatchIntegration",
    "crossbatch_attention_function",
    "disable_crossbatch",
    "enable_crossbatch",
    "register",
]
