"""fot-kernels: fused kNN memory attention for Focused Transformer / LongLLaMA models."""

from ._version import __version__
from .crossbatch import crossbatch_attention
from .memory import MemoryFileError, MemoryStore
from .nn import MemoryAttention
from .ops import BackendUnavailableError, knn_attention, knn_topk, memory_attention, merge_attention

__all__ = [
    "BackendUnavailableError",
    "MemoryAttention",
    "MemoryFileError",
    "MemoryStore",
    "__version__",
    "crossbatch_attention",
    "knn_attention",
    "knn_topk",
    "memory_attention",
    "merge_attention",
]
