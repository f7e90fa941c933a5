"""Drop-in FoT memory attention: the functional core shared with the Hugging Face integration, and
a self-contained ``nn.Module`` (projections, rotary embedding, local cache, memory read/write).

Semantics (LongLLaMA's, docs/DESIGN.md section 1):

- keys enter the memory **un-rotated** (RoPE "as if at position 0", the identity); the query that
  scores them is the same RoPE-rotated query that scores the local keys;
- one softmax in fp32 over ``[local causal scores | memory scores]`` with the same
  ``1/sqrt(head_dim)`` scale and no gate; memory validity is per (row, slot), shared by heads and
  queries, and memory is never causally masked;
- a window attends first, then its keys/values are appended to memory; with a local cache, the
  cache contents move to memory *before* the attention that would make it exceed the window, and
  local positions restart at 0 after such a move.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._merge import causal_allowed
from ._validate import MAX_HEAD_DIM, check_backend
from .backends import NAMES as BACKEND_NAMES
from .memory import MAX_DIM, MemoryStore, MemoryView, _parse_dtype, _positive_int


def _check_backend(backend: object) -> str:
    """``"auto"`` or a backend name (``fot_kernels.backends.NAMES``), checked when a module is
    built rather than at its first forward."""
    return check_backend(backend, BACKEND_NAMES)


def _check_topk(topk: object) -> int | None:
    return None if topk is None else _positive_int("topk", topk, 1, MAX_DIM)


def _check_rope_theta(rope_theta: object) -> float:
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real):
        raise TypeError(f"rope_theta must be a float, got {type(rope_theta).__name__} {rope_theta!r}")
    try:
        theta = float(rope_theta)
    except OverflowError:  # e.g. 10**400
        theta = math.inf
    if not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"rope_theta must be a finite float > 0 (the RoPE base, e.g. 10000.0), got {rope_theta!r:.60}")
    return theta


# ----------------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------------


def local_attention(
    query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None, softmax_scale: float
) -> Tensor:
    """Causal (bottom-right aligned) attention over local keys only, with an optional key padding
    mask ``[B, Lk]`` (True = real token). Shapes as in :func:`memory_layer_attention`; rows with no
    visible key get 0. Uses torch SDPA when there is no padding."""
    len_q, len_k = query.shape[2], key.shape[2]
    if key_padding_mask is None:
        sdpa = F.scaled_dot_product_attention
        if len_q == len_k or len_q == 1:
            causal = len_q == len_k and len_q > 1
            return sdpa(query, key, value, is_causal=causal, scale=softmax_scale, enable_gqa=True)
        mask = causal_allowed(len_q, len_k, query.device)
        return sdpa(query, key, value, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
    out, _ = _masked_local_part(query, key, value, key_padding_mask, softmax_scale)
    return out.to(query.dtype)


def _masked_local_part(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Explicit fp32 local attention with causal + key padding mask: (out fp32, lse fp32).
    Materialises [B, Hq, Lq, Lk] (a window x window block, as standard attention does)."""
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = (query.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    causal = causal_allowed(query.shape[2], key.shape[2], query.device)
    allowed = causal[None, None] & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with nothing visible
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ v, lse


def memory_layer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    memory: MemoryView | None,
    *,
    key_padding_mask: Tensor | None = None,
    topk: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """One FoT memory layer's attention: one softmax over local causal keys and memory, through
    the public ``fot_kernels`` ops.

    Args:
        query: ``[B, Hq, Lq, D]``, RoPE-rotated with local positions.
        key, value: ``[B, Hkv, Lk, D]`` local keys (rotated) / values; the queries are the last Lq.
        memory: the layer's memory (:meth:`MemoryStore.view`), or None for no memory.
        key_padding_mask: optional bool ``[B, Lk]``, False marks local padding (left padding).
        topk: None attends to every valid memory slot (LongLLaMA); k attends to the k best.
        softmax_scale: default ``1/sqrt(D)``.
        backend: passed to the ``fot_kernels`` ops.

    Returns:
        ``[B, Hq, Lq, D]`` in query.dtype; a row with nothing to attend to is 0. An empty batch
        (B = 0) or no query (Lq = 0) gives an empty output.

    Gradients flow to query, key and value; the memory is a detached cache. When they are needed,
    the memory is read through a snapshot (one copy of the filled part), so that later appends to
    the store, which write in place, cannot change what the backward pass reads.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 4-D torch.Tensor [B, H, L, D], got {got}")
    topk = _check_topk(topk)
    backend = _check_backend(backend)
    if memory is not None and not isinstance(memory, MemoryView):
        raise TypeError(f"memory must be a MemoryView (MemoryStore.view(layer)) or None, got {type(memory).__name__}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor or None, got {got}")
        want = (query.shape[0], key.shape[2])
        if key_padding_mask.shape != want:
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = {want}, got {tuple(key_padding_mask.shape)}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if query.shape[0] == 0 or query.shape[2] == 0:  # no batch row or no query: nothing to compute
        return query.new_zeros(query.shape)
    if memory is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        memory = memory.snapshot()
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    if memory is None or memory.num_slots == 0:
        if key_padding_mask is None:
            empty = key[:, :, :0]
            return ops.memory_attention(query, key, value, empty, empty, softmax_scale=scale, backend=backend)
        return local_attention(query, key, value, key_padding_mask=key_padding_mask, softmax_scale=scale)
    if key_padding_mask is None:  # the fused path: local + memory in one op
        kwargs = memory.op_kwargs()
        return ops.memory_attention(query, key, value, topk=topk, softmax_scale=scale, backend=backend, **kwargs)
    # local padding: the op has no local key mask, so do the local part explicitly and merge exactly
    out_local, lse_local = _masked_local_part(query, key, value, key_padding_mask, scale)
    out_mem, lse_mem = ops.knn_attention(
        query,
        memory.keys,
        memory.values,
        topk=topk,
        softmax_scale=scale,
        mem_lengths=memory.lengths,
        mem_mask=memory.mask,
        backend=backend,
    )
    out, _ = ops.merge_attention([out_local, out_mem.float()], [lse_local, lse_mem])
    return out.to(query.dtype)


# ----------------------------------------------------------------------------------------------
# rotary embedding (Llama's default RoPE, same arithmetic as transformers)
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions int ``[B, L]`` -> cos, sin ``[B, L, D]`` in dtype."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[B, H, L, D]``, cos/sin ``[B, L, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------


class MemoryAttention(nn.Module):
    """Llama-style self-attention block with FoT memory, usable on its own.

    Holds its own state: a :class:`~fot_kernels.memory.MemoryStore` (allocated on the first call,
    for that batch size and device) and a local cache. ``forward(x, use_cache=False)`` processes x
    in windows of ``window`` tokens, each attending to memory + itself and then appended to memory
    (a LongLLaMA prefill); ``use_cache=True`` keeps the tokens in the local cache instead, moving
    the whole local cache to memory first whenever it would exceed ``window`` (LongLLaMA decoding).

    Trainable: gradients reach the four projections through the local part and through the
    queries that score the memory; the memory itself is a detached cache (see
    :func:`memory_layer_attention`). Call :meth:`reset` before each new document / step.

    Args:
        hidden_size, num_heads: model width and query heads (ints >= 1).
        num_kv_heads: key/value heads dividing num_heads (default num_heads; GQA when smaller).
        head_dim: even, 2..256 (default hidden_size // num_heads, which must then divide exactly).
        window: the context window (LongLLaMA: max_position_embeddings), >= 1.
        capacity: memory slots per row (FIFO eviction beyond), >= window.
        topk: None (dense memory) or k >= 1 (kNN memory).
        rope_theta: RoPE base, a finite float > 0.
        mem_dtype: memory storage dtype (LongLLaMA: bfloat16).
        bias: projections with bias.
        backend: ``"auto"`` or a ``fot_kernels`` backend name (``fot_kernels.backends.NAMES``).

    Ints may be numpy ints; bools are not ints here.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        window: int,
        capacity: int,
        topk: int | None = None,
        rope_theta: float = 10000.0,
        mem_dtype: torch.dtype | str = torch.bfloat16,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.hidden_size = _positive_int("hidden_size", hidden_size, 1, MAX_DIM)
        self.num_heads = _positive_int("num_heads", num_heads, 1, MAX_DIM)
        kv_heads = self.num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads, 1, MAX_DIM)
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv_heads})")
        self.num_kv_heads = kv_heads
        if head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"head_dim is required when hidden_size ({self.hidden_size}) is not a multiple of "
                    f"num_heads ({self.num_heads})"
                )
            head_dim = self.hidden_size // self.num_heads
        self.head_dim = _positive_int("head_dim", head_dim, 1, MAX_HEAD_DIM)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self.window = _positive_int("window", window, 1, MAX_DIM)
        self.capacity = _positive_int("capacity", capacity, 1, MAX_DIM)
        if self.capacity < self.window:
            raise ValueError(f"capacity ({capacity}) must be >= window ({window}): one window must fit in memory")
        self.topk = _check_topk(topk)
        self.rope_theta = _check_rope_theta(rope_theta)
        self.mem_dtype = _parse_dtype(mem_dtype, "mem_dtype")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
        self.backend = _check_backend(backend)
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        # kept out of the buffers so that module.to(bfloat16) does not round the frequencies
        self._inv_freq = rope_inv_freq(self.head_dim, self.rope_theta)
        self.memory: MemoryStore | None = None
        self._local: tuple[Tensor, Tensor, Tensor] | None = None  # un-rotated keys, values, valid [B, Lc]

    @classmethod
    def from_llama(cls, attn: nn.Module, config, **kwargs) -> MemoryAttention:
        """Build from a transformers ``LlamaAttention`` (weights are copied) and its config;
        ``kwargs`` are this class's keyword arguments (window, capacity, topk, ...)."""
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only the default RoPE is supported, got rope_type {rope.get('rope_type')!r}")
        kwargs.setdefault("window", config.max_position_embeddings)
        heads = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, attn.head_dim)
        module = cls(*heads, rope_theta=theta, bias=attn.q_proj.bias is not None, **kwargs)
        projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        module.load_state_dict({k: v for k, v in attn.state_dict().items() if k.split(".")[0] in projections})
        return module.to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)

    @property
    def local_length(self) -> int:
        return 0 if self._local is None else self._local[0].shape[2]

    def reset(self) -> None:
        """Forget the memory and the local cache (a new document)."""
        if self.memory is not None:
            self.memory.reset()
        self._local = None

    def _heads(self, x: Tensor, proj: nn.Linear, heads: int) -> Tensor:
        batch, length, _ = x.shape
        return proj(x).view(batch, length, heads, self.head_dim).transpose(1, 2)

    def _memory(self, batch: int, device: torch.device) -> MemoryStore:
        """The store for this batch size and device (reallocated only while it is empty)."""
        local = self._local is not None and (self._local[0].shape[0] != batch or self._local[0].device != device)
        memory = self.memory
        if local or (memory is not None and (memory.batch_size, memory.device) != (batch, device)):
            if local or memory.num_slots(0) > 0:
                held = self._local[0] if local else memory.buffers(0)[0]
                raise ValueError(
                    f"the input (batch size {batch}, on {device}) does not match the state this module holds "
                    f"(batch size {held.shape[0]}, on {held.device}); call reset() first"
                )
            memory = None
        if memory is None:
            memory = MemoryStore(
                [0],
                batch_size=batch,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                capacity=self.capacity,
                dtype=self.mem_dtype,
                device=device,
            )
            self.memory = memory
        return memory

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, *, use_cache: bool = False
    ) -> Tensor:
        """hidden_states ``[B, L, hidden]`` (the module's dtype and device; B may be 0);
        attention_mask optional bool or integer ``[B, L]`` (1/True = token, 0 = padding, e.g. left
        padding) for these L tokens. Returns ``[B, L, hidden]``."""
        x = hidden_states
        if not isinstance(x, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, L, {self.hidden_size}], got shape {tuple(x.shape)}")
        weight = self.q_proj.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"hidden_states must have the module's dtype ({weight.dtype}), got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"hidden_states must be on the module's device ({weight.device}), got {x.device}")
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
        batch, length, _ = x.shape
        valid = None
        if attention_mask is not None:
            mask = attention_mask
            if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
                got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"attention_mask must be a bool or integer tensor (1 = token, 0 = padding), got {got}")
            if mask.shape != (batch, length):
                raise ValueError(f"attention_mask must be [B, L] = ({batch}, {length}), got {tuple(mask.shape)}")
            valid = mask.to(device=x.device, dtype=torch.bool)
        if not use_cache and self._local is not None:
            raise ValueError("use_cache=False with a non-empty local cache: continue with use_cache=True or reset()")
        memory = self._memory(batch, x.device)
        outs = []
        for beg in range(0, length, self.window):
            end = min(beg + self.window, length)
            chunk_valid = None if valid is None else valid[:, beg:end]
            outs.append(self._window(x[:, beg:end], chunk_valid, memory, use_cache))
        if not outs:
            return torch.zeros_like(x)
        return torch.cat(outs, dim=1)

    def _window(self, x: Tensor, valid: Tensor | None, memory: MemoryStore, use_cache: bool) -> Tensor:
        batch, length, _ = x.shape
        query = self._heads(x, self.q_proj, self.num_heads)
        key = self._heads(x, self.k_proj, self.num_kv_heads)  # un-rotated
        value = self._heads(x, self.v_proj, self.num_kv_heads)
        new_valid = torch.ones(batch, length, dtype=torch.bool, device=x.device) if valid is None else valid
        if use_cache:
            if self._local is not None and self.local_length + length > self.window:
                memory.append(0, *self._local)  # the whole local cache moves to memory first
                self._local = None
            if self._local is not None:
                key = torch.cat([self._local[0], key], dim=2)
                value = torch.cat([self._local[1], value], dim=2)
                new_valid = torch.cat([self._local[2], new_valid], dim=1)
            self._local = (key, value, new_valid)
        positions = torch.arange(key.shape[2], device=x.device).expand(batch, -1)  # restart at 0 per local context
        cos, sin = rope_cos_sin(self._inv_freq.to(x.device), positions, query.dtype)
        rot_query = apply_rope(query, cos[:, -length:], sin[:, -length:])
        rot_key = apply_rope(key, cos, sin)
        out = memory_layer_attention(
            rot_query, rot_key, value, memory.view(0), key_padding_mask=new_valid, topk=self.topk, backend=self.backend
        )
        if not use_cache:
            memory.append(0, key, value, valid)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


__all__ = ["MemoryAttention", "local_attention", "memory_layer_attention"]
