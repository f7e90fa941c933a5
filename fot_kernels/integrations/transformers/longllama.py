"""LongLLaMA checkpoints in a stock ``LlamaForCausalLM``: config conversion and loading with
memory enabled from the checkpoint's own settings."""

from __future__ import annotations

import json
import os

from ._hf import LlamaConfig
from .enable import enable_memory

#: LongLLaMA config fields that map onto enable_memory arguments
LONGLLAMA_FIELDS = ("mem_layers", "last_context_length", "mem_dtype", "mem_positionals", "mem_attention_grouping")
_DROPPED = (
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "torch_attention",
    "gradient_checkpoint_every_ith",
)


def longllama_config_to_llama(config) -> LlamaConfig:
    """A ``LlamaConfig`` from a LongLLaMA config (object with ``to_dict()`` or dict): same
    architecture fields, the LongLLaMA memory fields kept as attributes (``enable_memory`` reads
    them)."""
    if isinstance(config, dict):
        data = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        data = dict(config.to_dict())
    else:
        raise TypeError(f"config must be a dict or a transformers config, got {type(config).__name__}")
    for key in _DROPPED:
        data.pop(key, None)
    data.setdefault("num_key_value_heads", data.get("num_attention_heads"))
    data.setdefault("rope_theta", 10000.0)
    extra = {k: data.pop(k) for k in LONGLLAMA_FIELDS if k in data}
    llama = LlamaConfig(**data)
    for k, v in extra.items():
        setattr(llama, k, v)
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def load_longllama(path: str | os.PathLike, *, capacity: int, topk: int | None = None, **from_pretrained_kwargs):
    """Load a LongLLaMA checkpoint (a local directory) into a stock ``LlamaForCausalLM`` with
    memory enabled from its config (``mem_layers``, ``last_context_length``, ``mem_dtype``);
    LongLLaMA's per-layer ``rotary_emb.inv_freq`` buffers in the checkpoint are ignored."""
    from transformers import LlamaForCausalLM

    with open(os.path.join(os.fspath(path), "config.json")) as f:
        config = longllama_config_to_llama(json.load(f))
    model = LlamaForCausalLM.from_pretrained(path, config=config, **from_pretrained_kwargs)
    enable_memory(model, topk=topk, capacity=capacity)
    return model


__all__ = ["LONGLLAMA_FIELDS", "load_longllama", "longllama_config_to_llama"]
