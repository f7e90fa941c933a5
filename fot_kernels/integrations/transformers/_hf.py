"""The transformers names the integration uses, with a clear error when transformers (>= 5) is
missing."""

from __future__ import annotations

try:
    from transformers import AttentionInterface, LlamaConfig
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover - import guard
    raise ImportError(
        "fot_kernels.integrations.transformers needs transformers >= 5: pip install 'fot-kernels[hf]'"
    ) from exc

__all__ = [
    "AttentionInterface",
    "AttentionMaskInterface",
    "Cache",
    "CausalLMOutputWithPast",
    "DynamicLayer",
    "LlamaConfig",
]
