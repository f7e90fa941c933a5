"""The windowed forward of a memory-enabled model (LongLLaMA's ``_handle_long_input``).

The input minus its last ``last_context_length`` tokens is processed in windows of ``window``
tokens, each attending to the memory and to itself and then appended to the memory of the memory
layers; non-memory layers see only the current window. The last ``last_context_length`` tokens go
to the local cache (``use_cache=True``, the default) or to memory too (``use_cache=False``).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._hf import Cache, CausalLMOutputWithPast
from .cache import MemoryCache

if TYPE_CHECKING:
    from .enable import MemoryIntegration


def resolve_cache(state: MemoryIntegration, cache: object, batch: int) -> MemoryCache:
    """The :class:`MemoryCache` a call with ``batch`` rows uses: the given one (made for this model
    and holding the state of ``batch`` rows, or none yet), or a new one when none or an empty
    transformers cache (e.g. the ``DynamicCache`` ``generate`` makes) is given."""
    if isinstance(cache, MemoryCache):
        if cache.process_group is not state.process_group:
            raise ValueError(
                "this MemoryCache was made for another process group than the model's (make it with "
                "model.fot_memory.new_cache())"
            )
        if cache.memory_layers != state.memory_layers or cache.window != state.window:
            raise ValueError(
                f"this MemoryCache was made for memory_layers={list(cache.memory_layers)}, window={cache.window}; "
                f"the model uses memory_layers={list(state.memory_layers)}, window={state.window}"
            )
        cache.check_batch_size(batch)
        return cache
    if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
        return state.new_cache()
    raise TypeError(
        "a memory-enabled model needs a MemoryCache (model.fot_memory.new_cache()), "
        f"got a non-empty {type(cache).__name__}"
    )


def _padding(attention_mask: object, batch: int, length: int, device: torch.device) -> Tensor | None:
    """The new tokens' padding mask (bool ``[B, L]``, the last L columns), None when none."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
        raise ValueError(
            f"attention_mask must be 2-D [B, >= L] = [{batch}, >= {length}] (padding mask), got {tuple(mask.shape)}"
        )
    valid = attention_mask[:, attention_mask.shape[1] - length :].to(device=device, dtype=torch.bool)
    return None if bool(valid.all()) else valid


def _position_ids(position_ids: object, cache: MemoryCache, batch: int, length: int, device) -> Tensor:
    if position_ids is None:  # continue after the local cache (generate's convention without padding)
        if cache.local_length:
            start = cache.local_positions.max(dim=1, keepdim=True).values + 1
        else:
            start = torch.zeros(batch, 1, dtype=torch.long, device=device)
        return start.to(device) + torch.arange(length, device=device)
    if not isinstance(position_ids, Tensor) or position_ids.is_floating_point() or position_ids.is_complex():
        got = position_ids.dtype if isinstance(position_ids, Tensor) else type(position_ids).__name__
        raise TypeError(f"position_ids must be an integer tensor, got {got}")
    if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [B or 1, L] = [{batch}, {length}], got {tuple(position_ids.shape)}")
    return position_ids.to(device=device, dtype=torch.long).expand(batch, length)


def make_forward(state: MemoryIntegration):
    """The forward that replaces ``model.forward`` on the model instance (bind it with
    ``types.MethodType``); ``LlamaForCausalLM.forward``'s signature."""

    def memory_forward(
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
        """LongLLaMA input handling around the stock decoder (fot_kernels.integrations.transformers).
        With a process group, an error on one rank is raised on every rank (never a hang)."""
        args = (self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, use_cache, logits_to_keep)
        if state.process_group is None:
            return windowed_forward(*args, **kwargs)
        from ... import distributed

        try:
            out = windowed_forward(*args, **kwargs)
        except Exception as exc:
            distributed.synchronize_errors(exc, group=state.process_group)  # raises on every rank
            raise  # not reached: synchronize_errors raises
        distributed.synchronize_errors(None, group=state.process_group)
        return out

    def windowed_forward(
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
        cache = resolve_cache(state, cache, batch)
        valid = _padding(attention_mask, batch, length, device)
        positions = _position_ids(position_ids, cache, batch, length, device)

        to_memory = max(length - state.last_context_length, 0)
        pieces = [(beg, min(beg + state.window, to_memory)) for beg in range(0, to_memory, state.window)]
        if length > to_memory:
            pieces.append((to_memory, length))
        hidden = []
        for beg, end in pieces:
            last = end == length and beg == to_memory
            store_local = cache.local_length > 0 or (last and use_cache)
            window_valid = None if valid is None else valid[:, beg:end]
            window = cache.open_window(positions[:, beg:end], window_valid, store_local=store_local)
            with window as plan, state.capturing(cache):
                out = self.model(
                    input_ids=None if input_ids is None else input_ids[:, beg:end],
                    inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, beg:end],
                    attention_mask=plan.attention_mask,
                    position_ids=plan.position_ids,
                    cache=cache,
                    use_cache=True,
                    fot_cache=cache,
                    fot_state=state,
                    **kwargs,
                )
            hidden.append(out.last_hidden_state)
        if hidden:
            hidden_states = torch.cat(hidden, dim=1)
        else:  # an empty input
            hidden_states = self.lm_head.weight.new_zeros(batch, 0, self.config.hidden_size)
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    return memory_forward


def bind_forward(model, state: MemoryIntegration) -> types.MethodType:
    """``make_forward(state)`` bound to ``model`` (to assign to ``model.forward``)."""
    return types.MethodType(make_forward(state), model)


__all__ = ["bind_forward", "make_forward", "resolve_cache"]
