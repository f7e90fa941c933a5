"""Memory sharded along M over the ranks of a torch.distributed process group (docs/DESIGN.md 7).

Each rank passes ITS shard of the memory (``mem_keys``/``mem_values`` ``[B, Hkv, M_r, D]``, M_r may
differ between ranks and may be 0, with that shard's ``mem_lengths``/``mem_mask``); the query, the
local key/value and every other argument are the same on every rank. Every rank returns the same
result: the single-process op of ``fot_kernels.ops`` over the concatenation of the shards in rank
order (group rank), within rounding. Global slot index = (sum of M_r over lower ranks) + local
index; ties keep the lower global index.

How (P ranks, per call)::

    1. all_gather (asynchronous, overlapped with the local work of step 2) of a small vector per
       rank: shard size M_r, an error flag and a fingerprint of the arguments that must agree
       (shapes, dtypes, k, causal, scale, query.requires_grad)
    2. local work: the local causal part (computed identically on every rank, counted once), and
       kNN: the shard's own top-k (``fot_kernels.knn_topk``);
       dense: attention over the whole shard (``fot_kernels.knn_attention(topk=None)``) -> (out_r, lse_r)
    kNN only:
    3. all_gather of the candidates (scores, global indices: [B, Hq, Lq, k] each) -> every rank
       selects the same global top-k (stable: score descending, then lower global index); each
       rank: attention over ITS slots that made the cut -> (out_r, lse_r)
    4. all_gather of (out_r, lse_r); log-sum-exp merge of [local part | out_0 .. out_{P-1}] ->
       (out, lse), identical on every rank.

A group of one rank runs the single-process op itself.

Communication per rank and call is O(B * Hq * Lq * (k + D)), never proportional to the memory.
Every data collective carries a status element: an error on one rank (bad input, a failed kernel)
is raised on every rank with the failing rank's message (``ValueError``/``TypeError`` for bad
input, else ``RuntimeError``), never a hang. Arguments that must agree but do not raise
``ValueError`` on every rank. A step made of several calls with other code in between (one forward
of a model with sharded memory layers) ends with :func:`synchronize_errors`, whose collective has
the shape of every op's first one: a rank that failed between two ops sends its error there, and
its peers, blocked in the next op or in their own end of step, raise it too.

Gradients (docs/DESIGN.md 3.4): one autograd node per call. Its backward needs the loss to be the
same on every rank (the normal case: the same model run on the same inputs everywhere) and
``backward`` to be called on every rank. With the merged output and lse, each rank computes the
gradients of its own shard (they land on its rank, as the slice of the single-process gradient)
and its shard's contribution to d query; one all_reduce of d query (only when query requires
grad) adds the shards' contributions; the local part's gradients (d query, d key, d value) are
computed identically on every rank, so every rank gets the single-process d query, d key, d value.

Devices: NCCL (CUDA tensors; the collectives' buffers on the current CUDA device) and gloo (CPU
tensors, or CUDA tensors staged through host buffers, e.g. several ranks sharing one GPU, which
NCCL refuses).

Limits: with a bf16/fp16 query, the local part and the dense shard parts come from the
single-process ops in the query's dtype, so the merge sees them rounded once more than the
single-process op does (within the tests' tolerance rule). An invalid ``group`` argument (or a
process outside the group) is raised on that rank alone, before any collective: there is no group
to tell the peers through, so they wait for the process group's timeout (as with any mismatched
torch.distributed collective).

Kernels: each rank's parts run on the backend the single-process op picks for ``backend`` and its
shard (``auto``: the C++ kernels on CPUs, Triton or CUDA on GPUs). The kNN partial attention over
a rank's selected slots is that backend's kernel: Triton's fused attention kernel with the
selection given (``backends.triton.selected_attention``), the CUDA or C++ ``gather_attention``,
or the PyTorch one of ``backends.streaming`` (reference / streaming); the backward runs that
backend's backward kernels (``streaming.memory_attention_backward`` with its ``Kernels``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _merge, ops
from . import _validate as V
from .autograd import needs_grad
from .backends import streaming

_DTYPE_CODES = {torch.float16: 1.0, torch.bfloat16: 2.0, torch.float32: 3.0, torch.float64: 4.0}

_BYTES_SENT = [0]


def bytes_sent() -> int:
    """Bytes this process has contributed to the collectives of this module so far (the payloads
    of its all_gather / all_reduce calls, status elements included; the error path's object
    gathers excluded). Each all_gather delivers every rank's payload to every rank: a rank
    receives (P - 1) times what each peer sends. For benchmarks: take differences."""
    return _BYTES_SENT[0]


@dataclass
class _Call:
    """What one call knows about its group and its arguments."""

    op: str
    group: object
    rank: int
    world: int
    comm_device: torch.device  # where the collectives' buffers live (see _setup)
    topk: int | None = None
    causal: bool = False
    scale: float = 1.0
    backend: str = "auto"
    offset: int = 0  # global index of this rank's slot 0
    num_slots: int = 0  # this rank's M_r
    total_slots: int = 0  # sum of M_r
    impl: object = None  # attention ops: the backend module serving this rank's part (see _pick_kernels)
    kernels: streaming.Kernels = streaming.TORCH_KERNELS  # ... and its op-shaped kernels


def _setup(op: str, group) -> _Call:
    """Local checks of the group (nothing collective can run without one)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"fot_kernels.distributed.{op} needs an initialised torch.distributed process group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group")
    # NCCL: buffers on the current CUDA device; gloo (and others): host buffers, whatever the
    # tensors' device (CUDA tensors over gloo are staged through host memory)
    backend = str(dist.get_backend(group)).lower()
    comm_device = torch.device("cpu")
    if "nccl" in backend:
        comm_device = torch.device("cuda", torch.cuda.current_device())
    return _Call(op, group, rank, dist.get_world_size(group), comm_device)


# --------------------------------------------------------------------------------------------
# Collectives that never hang on an error: every payload carries a status element
# --------------------------------------------------------------------------------------------


#: set (True) on the errors this module raises on every rank of a group at once (see synchronize_errors)
RAISED_ON_EVERY_RANK = "fot_raised_on_every_rank"


def _everywhere(error: BaseException) -> BaseException:
    """Mark ``error`` as raised on every rank of the group (by the same call)."""
    setattr(error, RAISED_ON_EVERY_RANK, True)
    return error


def _raise_everywhere(call: _Call, exc: BaseException | None) -> None:
    """Every rank calls this once any rank has failed: gathers the failures and raises the one of
    the lowest failing rank, on every rank, with the same type (ValueError/TypeError for bad
    input, else RuntimeError) and message."""
    mine = None
    if exc is not None:
        kind = "TypeError" if isinstance(exc, TypeError) else "ValueError" if isinstance(exc, ValueError) else "other"
        mine = (kind, f"{type(exc).__name__}: {exc}")
    failures = [None] * call.world
    dist.all_gather_object(failures, mine, group=call.group)
    for rank, failure in enumerate(failures):
        if failure is not None:
            kind, message = failure
            cls = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
            error = cls(f"fot_kernels.distributed.{call.op} failed on rank {rank} of {call.world}: {message}")
            raise _everywhere(error) from exc
    raise _everywhere(RuntimeError(f"fot_kernels.distributed.{call.op}: a rank reported a failure but sent no message"))


class _Gather:
    """An all_gather of a flat payload of ``numel`` elements (the same count on every rank) plus a
    status element, started at construction (asynchronously: local work may run meanwhile) and
    completed by :meth:`finish`. A rank that failed (``exc``) sends zeros and status 1; then
    ``finish`` raises on every rank. The buffers live on ``call.comm_device``; ``finish`` returns
    the parts on ``device``."""

    def __init__(self, call: _Call, payload: Tensor | None, numel: int, dtype, device, exc) -> None:
        self.call, self.numel, self.exc, self.device = call, numel, exc, device
        buf = torch.zeros(numel + 1, dtype=dtype, device=call.comm_device)
        if exc is None:
            buf[:numel] = payload.reshape(-1)
        else:
            buf[numel] = 1
        self.buf = buf  # kept alive until the collective completes
        self.parts = [torch.empty_like(buf) for _ in range(call.world)]
        _BYTES_SENT[0] += buf.numel() * buf.element_size()
        self.work = dist.all_gather(self.parts, buf, group=call.group, async_op=True)

    def finish(self) -> list[Tensor]:
        self.work.wait()
        numel = self.numel
        if self.exc is not None or bool(torch.stack([p[numel] for p in self.parts]).ne(0).any()):
            _raise_everywhere(self.call, self.exc)
        return [p[:numel].to(self.device) for p in self.parts]


def _all_gather(call: _Call, payload: Tensor | None, numel: int, dtype, device, exc) -> list[Tensor]:
    """:class:`_Gather` started and finished: raises on every rank when any rank failed."""
    return _Gather(call, payload, numel, dtype, device, exc).finish()


def _all_reduce(call: _Call, payload: Tensor | None, shape, dtype, device, exc) -> Tensor:
    """Sum over the ranks of a tensor of ``shape`` and ``dtype`` (returned on ``device``), with a
    status element."""
    buf = torch.zeros(math.prod(shape) + 1, dtype=dtype, device=call.comm_device)
    if exc is None:
        buf[:-1] = payload.reshape(-1)
    else:
        buf[-1] = 1
    _BYTES_SENT[0] += buf.numel() * buf.element_size()
    dist.all_reduce(buf, group=call.group)
    if exc is not None or bool(buf[-1] != 0):
        _raise_everywhere(call, exc)
    return buf[:-1].view(shape).to(device)


#: what must agree on every rank: the shapes and dtypes of query/key/value and the arguments
#: (identical by contract), and of the shards what fixes the compute dtype (float64 or not; a
#: shard may otherwise be stored in another float dtype than its peers) and the kv heads
_FINGERPRINT = (
    "batch", "query heads", "queries", "head dim", "query dtype", "query device type", "mem_keys heads",
    "mem_keys float64-ness", "mem_values float64-ness", "key given", "local keys", "key dtype", "value dtype",
    "k/topk", "causal", "softmax_scale", "query requires grad",
)  # fmt: skip


def _fingerprint(call: _Call, query, key, value, mem_keys, mem_values) -> list[float]:
    """The arguments that must agree on every rank, as float64-exact numbers (see _FINGERPRINT)."""
    code = _DTYPE_CODES.get
    return [
        *query.shape, code(query.dtype), 1.0 if query.device.type == "cuda" else 0.0, mem_keys.shape[1],
        float(mem_keys.dtype == torch.float64), float(mem_values is not None and mem_values.dtype == torch.float64),
        float(key is not None), 0.0 if key is None else key.shape[2], 0.0 if key is None else code(key.dtype),
        0.0 if value is None else code(value.dtype), 0.0 if call.topk is None else call.topk,
        float(call.causal), call.scale, float(torch.is_grad_enabled() and query.requires_grad),
    ]  # fmt: skip


class _Agreement:
    """Collective 1, started at construction and completed by :meth:`finish` (local work may run
    in between): every rank learns every shard size (-> this rank's offset) and whether any rank
    failed its local checks (then every rank raises); the arguments that must agree are compared
    with rank 0's (``ValueError`` on every rank if they differ)."""

    def __init__(self, call: _Call, exc, fingerprint: list[float] | None, num_slots: int) -> None:
        self.call = call
        payload = None
        if exc is None:
            payload = torch.tensor([float(num_slots), *fingerprint], dtype=torch.float64)
        self.gather = _Gather(call, payload, 1 + len(_FINGERPRINT), torch.float64, call.comm_device, exc)

    def finish(self) -> None:
        call = self.call
        table = torch.stack(self.gather.finish()).cpu()  # [P, 1 + len(_FINGERPRINT)]
        ended = table[:, 1] == _END_OF_STEP
        if bool(ended.any()) and not bool(ended.all()):
            raise _everywhere(ValueError(
                f"fot_kernels.distributed.{call.op}: ranks {ended.nonzero().flatten().tolist()} of the group ended "
                f"their step (synchronize_errors) while ranks {(~ended).nonzero().flatten().tolist()} called an op: "
                "the ranks made different sequences of calls (inputs that differ between ranks?)"
            ))  # fmt: skip
        for column, name in enumerate(_FINGERPRINT, start=1):
            values = table[:, column]
            if not bool((values == values[0]).all()):
                got = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(values.tolist()))
                raise _everywhere(ValueError(
                    f"fot_kernels.distributed.{call.op}: the {name} must be the same on every rank of the group, "
                    f"got {got}"
                ))  # fmt: skip
        sizes = [int(s) for s in table[:, 0].tolist()]
        call.num_slots = sizes[call.rank]
        call.offset = sum(sizes[: call.rank])
        call.total_slots = sum(sizes)


# --------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------


def _group_rows(x: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, Lq, ...] -> [B, Hkv, G * Lq, ...] (query head h = kv * G + g: rows g * Lq ...)."""
    batch, num_q_heads, len_q = x.shape[:3]
    return x.reshape(batch, num_kv_heads, (num_q_heads // num_kv_heads) * len_q, *x.shape[3:])


def _local_candidates(call: _Call, query: Tensor, mem_keys: Tensor, mem_lengths, mem_mask):
    """This rank's top-min(topk, max(M_r, 1)) (scores, local indices); runs before the shard
    sizes of the other ranks are known."""
    k_local = min(call.topk, max(mem_keys.shape[2], 1))
    return ops.knn_topk(query, mem_keys, k_local, mem_lengths=mem_lengths, mem_mask=mem_mask, backend=call.backend)


def _gather_candidates(call: _Call, local, score_dtype, shape_q, device, exc):
    """Collective 2: every rank's local candidates padded to kk = min(topk, max(sum M_r, 1))
    columns with (-inf, -1), global indices, concatenated in rank order: (scores, indices)
    [B, Hq, Lq, P * kk], the same on every rank; raises on every rank when any rank failed."""
    kk = min(call.topk, max(call.total_slots, 1))
    shape = (*shape_q, kk)
    payload = None
    if exc is None:
        try:
            scores, indices = local
            indices = torch.where(indices >= 0, indices + call.offset, indices)
            pad = kk - scores.shape[-1]  # >= 0: the whole memory holds at least M_r slots
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
            indices = torch.nn.functional.pad(indices, (0, pad), value=-1)
            # float64 holds fp32/fp64 scores and indices < 2**53 exactly: one collective for both
            payload = torch.cat([scores.to(torch.float64).reshape(-1), indices.to(torch.float64).reshape(-1)])
        except Exception as error:
            exc = error
    numel = 2 * math.prod(shape)
    parts = _all_gather(call, payload, numel, torch.float64, device, exc)
    half = numel // 2
    all_scores = torch.cat([p[:half].view(shape) for p in parts], -1).to(score_dtype)
    all_indices = torch.cat([p[half:].view(shape) for p in parts], -1).to(torch.int64)
    return all_scores, all_indices


def _select(all_scores: Tensor, all_indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The global top-k of the gathered candidates. Each rank's candidates are in the contract's
    order and global indices ascend with the rank, so the stable sort of select_topk keeps the
    lower global index among equal scores."""
    return _merge.select_topk(all_scores, all_indices, all_indices >= 0, k)


def _pick_kernels(call: _Call, query, key, value, mem_keys, mem_values, needs_grad: bool) -> None:
    """Sets ``call.impl``, the backend that serves this rank's part of an attention call (the one
    the single-process op picks for ``call.backend`` and this shard: the C++ kernels on CPUs, the
    Triton or CUDA ones on GPUs, ...), and ``call.kernels``, its op-shaped kernels (the PyTorch ones
    for the reference backend), which run the kNN partial attention and every part's backward.
    Raises ``BackendUnavailableError`` (a ValueError) when ``call.backend`` cannot serve."""
    topk = None if call.topk is None else ops._cap_k(call.topk, mem_keys.shape[2])
    call.impl = ops._pick_backend("memory_attention", call.backend, query, mem_keys, key=key, value=value,
                                  mem_values=mem_values, topk=topk, needs_grad=needs_grad)  # fmt: skip
    kernels = getattr(call.impl, "kernels", None)
    call.kernels = streaming.TORCH_KERNELS if kernels is None else kernels(query, key, value, mem_keys, mem_values)


def _selected_attention(call: _Call, query, mem_keys, mem_values, scores, selection):
    """This rank's partial attention over its slots that made the global top-k: ``selection``
    [B, Hkv, G * Lq, k] local slot indices (-1: another rank's or none), ``scores`` their scores
    -> (out, lse) in the layout of ``[B, Hq, Lq, (D)]``. Triton re-scores the selected slots in its
    fused attention kernel (as in its single-process kNN mode); the other backends run their
    ``gather_attention`` kernel (C++ on CPUs, CUDA, or PyTorch) on the given scores."""
    if call.impl.NAME == "triton":
        return call.impl.selected_attention(query, mem_keys, mem_values, selection, softmax_scale=call.scale)
    return call.kernels.ops.gather_attention(scores, selection, mem_values, call.scale)


def _local_part(call: _Call, query, key, value, mem_keys, mem_values) -> tuple[Tensor, Tensor]:
    """The local causal part, the same on every rank."""
    empty_k, empty_v = mem_keys[:, :, :0], mem_values[:, :, :0]
    return ops.memory_attention(
        query, key, value, empty_k, empty_v, causal=call.causal, softmax_scale=call.scale, return_lse=True,
        backend=call.backend,
    )  # fmt: skip


def _attention_forward(call: _Call, agreement: _Agreement, query, key, value, mem_keys, mem_values, mem_lengths,
                       mem_mask):  # fmt: skip
    """(out [B, Hq, Lq, D] in the compute dtype, lse, this rank's kNN selection [B, Hkv, G * Lq, k]
    in local indices (-1: not this rank's) or None); out and lse are the same on every rank.
    Completes ``agreement`` (collective 1) after the work that needs no other rank."""
    batch, num_q_heads, len_q, head_dim = query.shape
    cd = _merge.compute_dtype(query, key, value, mem_keys, mem_values)
    mine = payload = exc = candidates = None
    parts_out, parts_lse = [], []
    with torch.no_grad():
        try:  # the work that needs no other rank, while collective 1 is in flight
            if call.topk is not None:
                candidates = _local_candidates(call, query, mem_keys, mem_lengths, mem_mask)
            if key is not None:
                out_loc, lse_loc = _local_part(call, query, key, value, mem_keys, mem_values)
                parts_out.append(out_loc.to(cd))
                parts_lse.append(lse_loc.to(cd))
            if call.topk is None:
                out_r, lse_r = ops.knn_attention(
                    query, mem_keys, mem_values, topk=None, softmax_scale=call.scale, mem_lengths=mem_lengths,
                    mem_mask=mem_mask, backend=call.backend,
                )  # fmt: skip
        except Exception as error:  # a kernel error becomes an error on every rank at the next gather
            exc = error
        agreement.finish()  # raises on every rank if a rank failed its checks
        if call.topk is not None:
            score_dtype = _merge.compute_dtype(query, mem_keys)
            candidates = _gather_candidates(call, candidates, score_dtype, query.shape[:3], query.device, exc)
            try:  # a local failure from here on is raised on every rank at the last gather
                kk = min(call.topk, max(call.total_slots, 1))
                scores, indices = _select(*candidates, kk)
                local = indices - call.offset
                is_mine = (indices >= 0) & (local >= 0) & (local < call.num_slots)
                num_kv_heads = mem_keys.shape[1]
                mine = _group_rows(local.masked_fill(~is_mine, -1), num_kv_heads).contiguous()
                my_scores = _group_rows(scores.to(cd).masked_fill(~is_mine, float("-inf")), num_kv_heads)
                out_r, lse_r = _selected_attention(call, query, mem_keys, mem_values, my_scores, mine)
            except Exception as error:
                exc = error
        if exc is None:
            try:
                payload = torch.cat([out_r.to(cd).reshape(-1), lse_r.to(cd).reshape(-1)])
            except Exception as error:
                exc = error
        rows = batch * num_q_heads * len_q
        parts = _all_gather(call, payload, rows * (head_dim + 1), cd, query.device, exc)  # the last collective
        for part in parts:  # rank order
            parts_out.append(part[: rows * head_dim].view(batch, num_q_heads, len_q, head_dim))
            parts_lse.append(part[rows * head_dim :].view(batch, num_q_heads, len_q))
        out, lse = _merge.merge_attention(parts_out, parts_lse)
    return out, lse, mine


class _ShardedAttention(torch.autograd.Function):
    """(query, key, value, mem_keys, mem_values) -> (out in query.dtype, lse); see the module
    docstring for the backward's all_reduce of d query."""

    @staticmethod
    def forward(ctx, query, key, value, mem_keys, mem_values, mem_lengths, mem_mask, call, agreement):
        out, lse, mine = _attention_forward(
            call, agreement, query, key, value, mem_keys, mem_values, mem_lengths, mem_mask
        )
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, key, value, mem_keys, mem_values, out, lse, mine, mem_lengths, mem_mask)
        return out.to(query.dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        query, key, value, mem_keys, mem_values, out, lse, mine, mem_lengths, mem_mask = ctx.saved_tensors
        call = ctx.call
        needs = tuple(ctx.needs_input_grad[:5])
        acc = _merge.lse_dtype(_merge.compute_dtype(query, key, value, mem_keys, mem_values))
        # the kernels of the forward's backend; d query comes back in acc: summed over the ranks
        # (and with the local part's) before one rounding
        backward = functools.partial(streaming.memory_attention_backward, softmax_scale=call.scale,
                                     kernels=call.kernels, dq_in_acc=True)  # fmt: skip
        exc = None
        dq_mem = dq_loc = d_key = d_value = d_mem_keys = d_mem_values = None
        try:
            dq_mem, _, _, d_mem_keys, d_mem_values = backward(
                grad_out, grad_lse, query, None, None, mem_keys, mem_values, out, lse, mine, mem_lengths, mem_mask,
                (needs[0], False, False, needs[3], needs[4]), topk=call.topk, causal=False,
            )  # fmt: skip
            if key is not None and any(needs[:3]):
                dq_loc, d_key, d_value, _, _ = backward(
                    grad_out, grad_lse, query, key, value, mem_keys[:, :, :0], mem_values[:, :, :0], out, lse, None,
                    None, None, (needs[0], needs[1], needs[2], False, False), topk=None, causal=call.causal,
                )  # fmt: skip
        except Exception as error:
            exc = error
        d_query = None
        if needs[0]:  # the same on every rank (checked in the forward): every rank reduces
            d_query = _all_reduce(call, dq_mem, query.shape, acc, query.device, exc)
            if dq_loc is not None:
                d_query = d_query + dq_loc
            d_query = d_query.to(query.dtype)
        elif exc is not None:
            raise exc
        return d_query, d_key, d_value, d_mem_keys, d_mem_values, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def knn_topk(
    query: Tensor,
    mem_keys: Tensor,
    k: int,
    *,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact global k nearest memory slots over the shards of every rank of ``group``.

    Args as :func:`fot_kernels.knn_topk`, with ``mem_keys`` ``[B, Hkv, M_r, D]`` (and
    ``mem_lengths``/``mem_mask``) this rank's shard; ``group`` the process group (default: the
    world). query, k and backend must be the same on every rank.

    Returns:
        ``(scores, indices)`` ``[B, Hq, Lq, k]``, the same on every rank: the single-process
        ``knn_topk`` over the concatenation of the shards in rank order; indices are global
        (sum of the shard sizes of lower ranks + local index); ties keep the lower global index.
        Not differentiable.
    """
    call = _setup("knn_topk", group)
    if call.world == 1:
        return ops.knn_topk(query, mem_keys, k, mem_lengths=mem_lengths, mem_mask=mem_mask, backend=backend)
    exc = fingerprint = None
    num_slots = 0
    try:
        q, mk = V.check_query_and_memory(query, mem_keys)
        call.topk = V.check_k("k", k)
        V.check_backend(backend, ops.NAMES)
        call.backend = backend
        mem_lengths, mem_mask = V.check_memory_validity(q, mk, mem_lengths, mem_mask)
        num_slots = mk.shape[2]
        fingerprint = _fingerprint(call, q, None, None, mk, None)
        fingerprint[-1] = 0.0  # not differentiable: requires_grad does not matter
    except Exception as error:
        exc = error
    agreement = _Agreement(call, exc, fingerprint, num_slots)  # collective 1, in flight
    local = None
    if exc is None:
        try:
            with torch.no_grad():
                local = _local_candidates(call, q, mk, mem_lengths, mem_mask)
        except Exception as error:  # a kernel error becomes an error on every rank
            exc = error
    agreement.finish()  # raises on every rank if a rank failed its checks
    score_dtype = _merge.compute_dtype(q, mk)
    candidates = _gather_candidates(call, local, score_dtype, q.shape[:3], q.device, exc)  # the last collective
    return _select(*candidates, call.topk)  # k beyond the whole memory: padded to k columns


def memory_attention(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    topk: int | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`fot_kernels.memory_attention` over a memory sharded along M over ``group``.

    Args as the single-process op, with ``mem_keys``/``mem_values`` ``[B, Hkv, M_r, D]`` (and
    ``mem_lengths``/``mem_mask``) this rank's shard; query, key, value and every other argument
    the same on every rank (as is ``query.requires_grad``); ``group`` the process group
    (default: the world).

    Returns:
        out ``[B, Hq, Lq, D]`` (and lse ``[B, Hq, Lq]`` if ``return_lse``), the same on every rank:
        the single-process op over the concatenation of the shards in rank order. Differentiable:
        gradients of the shard land on its rank; d query / d key / d value are the
        single-process ones on every rank (``backward`` must run on every rank).
    """
    out, lse = _attention("memory_attention", query, key, value, mem_keys, mem_values, topk, causal, softmax_scale,
                          mem_lengths, mem_mask, return_lse, backend, group)  # fmt: skip
    return (out, lse) if return_lse else out


def knn_attention(
    query: Tensor,
    mem_keys: Tensor,
    mem_values: Tensor,
    *,
    topk: int | None,
    softmax_scale: float | None = None,
    mem_lengths: Tensor | None = None,
    mem_mask: Tensor | None = None,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`fot_kernels.knn_attention` (the memory part alone, ``(out, lse)``) over a memory
    sharded along M over ``group``; arguments and result as :func:`memory_attention`."""
    return _attention("knn_attention", query, None, None, mem_keys, mem_values, topk, False, softmax_scale,
                      mem_lengths, mem_mask, True, backend, group)  # fmt: skip


def _attention(op, query, key, value, mem_keys, mem_values, topk, causal, softmax_scale, mem_lengths, mem_mask,
               return_lse, backend, group, pre_error=None):  # fmt: skip
    call = _setup(op, group)
    if pre_error is not None and call.world == 1:
        raise pre_error
    if call.world == 1:  # the single-process op itself
        if op == "knn_attention":
            return ops.knn_attention(query, mem_keys, mem_values, topk=topk, softmax_scale=softmax_scale,
                                     mem_lengths=mem_lengths, mem_mask=mem_mask, backend=backend)  # fmt: skip
        return ops.memory_attention(query, key, value, mem_keys, mem_values, topk=topk, causal=causal,
                                    softmax_scale=softmax_scale, mem_lengths=mem_lengths, mem_mask=mem_mask,
                                    return_lse=True, backend=backend)  # fmt: skip
    exc = fingerprint = None
    num_slots, grad = 0, False
    try:
        if pre_error is not None:
            raise pre_error
        q, mk = V.check_query_and_memory(query, mem_keys, mem_values)
        V.check_local(q, key, value, mk)
        call.topk = V.check_topk(topk)
        call.causal = V.check_flag("causal", causal)
        V.check_flag("return_lse", return_lse)
        call.scale = V.check_scale(softmax_scale, q.shape[-1])
        V.check_backend(backend, ops.NAMES)
        call.backend = backend
        mem_lengths, mem_mask = V.check_memory_validity(q, mk, mem_lengths, mem_mask)
        num_slots = mk.shape[2]
        fingerprint = _fingerprint(call, q, key, value, mk, mem_values)
        grad = needs_grad(q, key, value, mk, mem_values)
        _pick_kernels(call, q, key, value, mk, mem_values, grad)
    except Exception as error:
        exc = error
    agreement = _Agreement(call, exc, fingerprint, num_slots)  # collective 1, completed in the forward
    if exc is not None:
        agreement.finish()  # raises on every rank
    if grad:
        return _ShardedAttention.apply(q, key, value, mk, mem_values, mem_lengths, mem_mask, call, agreement)
    out, lse, _ = _attention_forward(call, agreement, q, key, value, mk, mem_values, mem_lengths, mem_mask)
    return out.to(q.dtype), lse


#: the batch-size entry of synchronize_errors' fingerprint (no op has a negative batch size)
_END_OF_STEP = -1.0


def synchronize_errors(error: BaseException | None = None, *, group: dist.ProcessGroup | None = None) -> None:
    """End a step made of several calls of this module's ops (e.g. one forward of a model whose
    memory layers run them) so that a failure on one rank becomes a failure on every rank, never
    a hang. Collective: every rank of ``group`` calls it once per step, with the exception it
    caught during the step (None if it succeeded).

    - Every rank passed None: returns.
    - ``error`` was raised by one of this module's calls on every rank at once (it carries the
      attribute :data:`RAISED_ON_EVERY_RANK`; then every rank has it): re-raised at once,
      nothing is communicated.
    - Otherwise the error of the lowest failing rank is raised on every rank (``ValueError`` /
      ``TypeError`` for bad input, else ``RuntimeError``, chained to ``error`` where it is local).

    Its collective has the shape of the first collective of every op of this module, so a rank
    that failed between two ops (e.g. in a model layer) releases its peers blocked in the next
    op: they raise there. A rank that ends its step while its peers call an op (the ranks made
    different sequences of calls) raises ``ValueError`` on every rank.
    """
    if error is not None and not isinstance(error, BaseException):
        raise TypeError(f"error must be an exception or None, got {type(error).__name__}")
    if error is not None and getattr(error, RAISED_ON_EVERY_RANK, False):
        raise error
    call = _setup("synchronize_errors", group)
    if call.world == 1:
        if error is not None:
            raise error
        return
    fingerprint = [_END_OF_STEP] + [0.0] * (len(_FINGERPRINT) - 1)
    _Agreement(call, error, None if error is not None else fingerprint, 0).finish()


def memory_layer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    memory,
    *,
    key_padding_mask: Tensor | None = None,
    topk: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """:func:`fot_kernels.nn.memory_layer_attention` (one FoT memory layer: local causal keys, with
    an optional left-padding mask, plus memory, in one softmax) with the layer's memory sharded
    over ``group``: ``memory`` is THIS rank's shard (a :class:`fot_kernels.memory.MemoryView`, or
    None for an empty shard); query, key, value, key_padding_mask and the settings are the same on
    every rank. Returns ``[B, Hq, Lq, D]`` in query.dtype, the same on every rank: the
    single-process function over the concatenation of the shards in rank order.

    This is the memory layers' attention of a sharded memory (``MemoryIntegration.memory_attention``
    has this signature once ``group`` is bound); the memory cache must then hold only this rank's
    share of the slots (a memory whose every slot is on every rank would count each slot P times).
    Gradients flow to query, key and value (identical on every rank) as in the single-process
    function; the memory is read through a snapshot when they are needed.
    """
    from . import nn as fnn
    from .memory import MemoryView

    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 4-D torch.Tensor [B, H, L, D], got {got}")
    topk = fnn._check_topk(topk)
    backend = fnn._check_backend(backend)
    if key_padding_mask is not None:  # the same on every rank: raised on every rank alike
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor or None, got {got}")
        want = (query.shape[0], key.shape[2])
        if key_padding_mask.shape != want:
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = {want}, got {tuple(key_padding_mask.shape)}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if query.shape[0] == 0 or query.shape[2] == 0:  # no batch row or no query: the same on every rank
        return query.new_zeros(query.shape)
    pre_error = None  # a bad shard is this rank's alone: raised on every rank by the op
    if memory is not None and not isinstance(memory, MemoryView):
        pre_error = TypeError(
            f"memory must be a MemoryView (MemoryStore.view(layer)) or None, got {type(memory).__name__}"
        )
        memory = None
    if memory is None:  # an empty shard
        empty = key.new_empty((key.shape[0], key.shape[1], 0, key.shape[3]))
        memory = MemoryView(empty, empty, torch.zeros(key.shape[0], dtype=torch.int64, device=key.device), None)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        memory = memory.snapshot()  # later appends to the store must not change what backward reads
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    shard = dict(mem_keys=memory.keys, mem_values=memory.values, mem_lengths=memory.lengths, mem_mask=memory.mask)
    if key_padding_mask is None:  # local + memory in one op
        out, _ = _attention("memory_attention", query, key, value, shard["mem_keys"], shard["mem_values"], topk,
                            True, scale, shard["mem_lengths"], shard["mem_mask"], False, backend, group,
                            pre_error)  # fmt: skip
        return out
    # local padding: the op has no local key mask, so the local part is explicit and merged exactly
    out_local, lse_local = fnn._masked_local_part(query, key, value, key_padding_mask, scale)
    out_mem, lse_mem = _attention("knn_attention", query, None, None, shard["mem_keys"], shard["mem_values"], topk,
                                  False, scale, shard["mem_lengths"], shard["mem_mask"], True, backend, group,
                                  pre_error)  # fmt: skip
    out, _ = ops.merge_attention([out_local, out_mem.float()], [lse_local, lse_mem])
    return out.to(query.dtype)


__all__ = [
    "RAISED_ON_EVERY_RANK", "bytes_sent", "knn_attention", "knn_topk", "memory_attention", "memory_layer_attention",
    "synchronize_errors",
]  # fmt: skip
