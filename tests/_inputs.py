"""Random test inputs (never zeros) shared by the test modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Case:
    query: Tensor
    key: Tensor | None
    value: Tensor | None
    mem_keys: Tensor
    mem_values: Tensor
    mem_lengths: Tensor | None = None
    mem_mask: Tensor | None = None
    extra: dict = field(default_factory=dict)

    def memory_kwargs(self) -> dict:
        return {"mem_lengths": self.mem_lengths, "mem_mask": self.mem_mask}

    def to(self, dtype: torch.dtype) -> Case:
        """Same values cast to dtype (for the float64 oracle)."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return Case(cast(self.query), cast(self.key), cast(self.value), cast(self.mem_keys), cast(self.mem_values),
                    self.mem_lengths, self.mem_mask)  # fmt: skip


def make_case(
    batch: int = 2,
    q_heads: int = 4,
    kv_heads: int = 2,
    len_q: int = 37,
    len_k: int = 50,
    slots: int = 300,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    mem_dtype: torch.dtype | None = None,
    lengths: bool = False,
    mask: bool = False,
    device: str = "cpu",
    strided_memory: bool = False,
) -> Case:
    """Random inputs; ``strided_memory`` makes the memory a slice of a larger store, like the
    memory store hands out (stride(2) != D... and storage shared with unused capacity)."""
    mem_dtype = mem_dtype or dtype
    rnd = lambda *s, dt=dtype: torch.randn(*s, device=device).to(dt)  # noqa: E731
    query = rnd(batch, q_heads, len_q, head_dim)
    key = rnd(batch, kv_heads, len_k, head_dim) if len_k is not None else None
    value = rnd(batch, kv_heads, len_k, head_dim) if len_k is not None else None
    capacity = slots + 13 if strided_memory else slots
    mem_keys = rnd(batch, kv_heads, capacity, head_dim, dt=mem_dtype)[:, :, :slots]
    mem_values = rnd(batch, kv_heads, capacity, head_dim, dt=mem_dtype)[:, :, :slots]
    mem_lengths = mem_mask = None
    if lengths:
        mem_lengths = torch.randint(0, slots + 1, (batch,), device=device)
        mem_lengths[0] = slots  # one full row, the others random
    if mask:
        mem_mask = torch.rand(batch, slots, device=device) > 0.2
    return Case(query, key, value, mem_keys, mem_values, mem_lengths, mem_mask)
