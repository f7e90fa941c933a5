"""The state of a memory-enabled model: per-layer local caches and the FoT memory
(:class:`MemoryCache`, a transformers ``Cache``), and the plan of one window (:class:`WindowPlan`).

One call of the inner decoder processes one window. The patched forward opens it with
:meth:`MemoryCache.open_window`, which plans what happens to the window (kept in the local cache, or
appended to memory after its attention; whether the local cache moves to memory first) and
commits the plan when the call returns. During the call, the memory layers' ``k_proj`` hook hands
the un-rotated keys to :meth:`MemoryCache.capture_unrotated_keys`, the attention reads
:meth:`MemoryCache.memory_view` and then calls :meth:`MemoryCache.after_attention`, and
transformers calls :meth:`MemoryCache.update` for the local cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...memory import (
    MAX_DIM,
    MemoryFileError,
    MemoryStore,
    MemoryView,
    _index_list,
    _parse_device,
    _parse_dtype,
    _positive_int,
)
from ._hf import Cache, DynamicLayer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: the header metadata entry of a memory file saved by a sharded cache (rank, world size, ...)
SHARD_METADATA = "fot_shard"


def check_process_group(group: object) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group`` (a torch.distributed ProcessGroup of
    which this process is a member, in an initialised default group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs an initialised torch.distributed default process group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of process_group")
    return rank, dist.get_world_size(group)


@dataclass(frozen=True)
class WindowPlan:
    """What one call of the inner model (one window of ``length`` new tokens) does.

    Attributes:
        length: number of new tokens.
        store_local: the tokens go to the local cache (else they are appended to memory right
            after each memory layer's attention, a LongLLaMA prefill window).
        move: the whole local cache moves to memory before the attention (it would overflow the
            window otherwise); local positions restart at 0.
        valid: padding of the new tokens, bool ``[B, length]``, or None when nothing is padded.
        attention_mask: padding of the keys the window attends to locally (``[kept local | new]``),
            bool ``[B, Lk]``, or None when nothing is padded.
        position_ids: rotary positions of the new tokens ``[B, length]``, relative to the oldest
            token of the local context (LongLLaMA).
        local_positions, local_valid: absolute position ids and padding ``[B, Lk]`` of the local
            context after this window (the cache's new local state when the tokens are kept).
    """

    length: int
    store_local: bool
    move: bool
    valid: Tensor | None
    attention_mask: Tensor | None
    position_ids: Tensor
    local_positions: Tensor
    local_valid: Tensor


class _LocalLayer(DynamicLayer):
    """A DynamicLayer (rotated keys, values) that memory layers extend with the un-rotated keys,
    which is what moves to memory when the local cache overflows."""

    def __init__(self, keep_unrotated: bool) -> None:
        super().__init__()
        self.keep_unrotated = keep_unrotated
        self.unrotated: Tensor | None = None

    def append(self, key: Tensor, value: Tensor, unrotated: Tensor | None) -> tuple[Tensor, Tensor]:
        keys, values = DynamicLayer.update(self, key, value)
        if self.keep_unrotated:
            self.unrotated = unrotated if self.unrotated is None else torch.cat([self.unrotated, unrotated], dim=2)
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.unrotated is not None:
            self.unrotated = self.unrotated.index_select(0, beam_idx.to(self.unrotated.device))

    def reset(self) -> None:
        self.unrotated = None
        super().reset()


class MemoryCache(Cache):
    """Local caches of every layer plus the FoT memory of the memory layers.

    ``get_seq_length()`` is the number of tokens this cache has seen (memory + local), the
    transformers convention for "past length", so that ``generate`` continues from a cache the way
    it does for a ``DynamicCache``. The local cache holds at most ``window`` tokens (it may briefly
    hold ``last_context_length`` > window tokens after a prefill, as in LongLLaMA). A cache holds
    the state of its batch rows: an input with another batch size is rejected (reorder it
    explicitly with :meth:`reorder_cache` / :meth:`batch_repeat_interleave`, or make a new one).

    Sharded memory (``process_group`` of P ranks, docs/DESIGN.md 7): the same model runs the same
    inputs on every rank, and each rank keeps 1/P of the memory. Slot-level round robin: the
    memory slots a layer appends are numbered in append order over the cache's life (the
    layer's *columns*, the same for every batch row); column g is kept on rank g mod P only.
    ``capacity`` stays the GLOBAL number of slots per row and layer and must be a multiple of
    P; each rank's store holds ``capacity / P`` slots with its own FIFO ring. Any ``capacity``
    consecutive columns hold exactly ``capacity / P`` columns of each rank, so the slots that
    the ranks keep together are exactly those an unsharded cache keeps (its newest
    ``capacity`` slots per row, padding slots counted as in the unsharded store), per row
    after partial resets as well. The memory layers' attention
    (:func:`fot_kernels.distributed.memory_layer_attention`) reads this rank's share as its
    shard: dense memory gives the unsharded result within rounding; kNN selects the same
    slots, except among slots whose scores tie exactly at the k-th place: the distributed op
    keeps the lower index in the concatenation of the shards in rank order, the unsharded
    store the lower index in its ring (neither is chronological order), so such a tie may
    keep another of the tied slots (a different result only where tied slots hold different
    values; exact score ties between model keys are practically absent). Save/load per rank:
    the file records the rank, the world size, the global capacity and the columns appended,
    and a cache of another rank, world size, capacity or an unsharded cache refuses it.

    Args:
        num_layers: the model's number of decoder layers.
        memory_layers: indices of the memory layers (distinct, in ``[0, num_layers)``).
        window: local context window.
        capacity: memory slots per row and layer (FIFO eviction beyond), >= window; with a
            ``process_group``, over all its ranks together (a multiple of the group size).
        mem_dtype: memory storage dtype.
        process_group: None (the whole memory here), or the torch.distributed ProcessGroup whose
            ranks share the memory (this process must be a member).
    """

    def __init__(
        self,
        num_layers: int,
        memory_layers: Sequence[int],
        *,
        window: int,
        capacity: int,
        mem_dtype: torch.dtype | str,
        process_group: ProcessGroup | None = None,
    ) -> None:
        num_layers = _positive_int("num_layers", num_layers, 1, MAX_DIM)
        if isinstance(memory_layers, (str, bytes)) or not isinstance(memory_layers, Sequence):
            raise TypeError(f"memory_layers must be a sequence of layer indices, got {type(memory_layers).__name__}")
        layers = tuple(_positive_int("each entry of memory_layers", i, 0, num_layers - 1) for i in memory_layers)
        if len(set(layers)) != len(layers):
            raise ValueError(f"memory_layers must be distinct, got {list(layers)}")
        self.memory_layers = layers
        super().__init__(layers=[_LocalLayer(i in layers) for i in range(num_layers)])
        self.window = _positive_int("window", window, 1, MAX_DIM)
        self.capacity = _positive_int("capacity", capacity, 1, MAX_DIM)
        if self.capacity < self.window:
            raise ValueError(f"capacity ({capacity}) must be >= window ({window}): a window must fit in memory")
        self.mem_dtype = _parse_dtype(mem_dtype, "mem_dtype")
        self.process_group = process_group
        self.shard_rank, self.shard_world = (0, 1) if process_group is None else check_process_group(process_group)
        if self.capacity % self.shard_world:
            raise ValueError(
                f"capacity ({capacity}) must be a multiple of the process group's size ({self.shard_world}): "
                "each rank holds capacity / size slots"
            )
        self.shard_capacity = self.capacity // self.shard_world  # slots per row and layer in this rank's store
        self._columns = dict.fromkeys(layers, 0)  # slots appended per layer over the cache's life (sharded)
        self.memory: MemoryStore | None = None  # allocated on the first append (batch size, heads, device)
        self.seen_tokens = 0
        self.local_positions: Tensor | None = None  # [B, Lc] absolute position ids of the local tokens
        self.local_valid: Tensor | None = None  # [B, Lc] bool
        self._plan: WindowPlan | None = None  # the open window, between open_window() and its end
        self._unrotated: dict[int, Tensor] = {}  # the open window's un-rotated keys, per memory layer
        self._changed = False  # the open window has changed a local cache or the memory
        self._failed: str | None = None  # why the state is inconsistent (a window failed half-way)

    # ---- transformers Cache API ------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self._plan is None:
            return self.local_length + query_length, 0
        kept = 0 if (self._plan.move or not self._plan.store_local) else self.local_length
        return kept + query_length, 0

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Called by transformers' attention with the rotated keys and the values of the window:
        returns the local keys/values to attend to (``[kept local | new]``)."""
        plan = self._open_plan()
        if not plan.store_local:  # prefill window: nothing local; memory layers append after attention
            return key_states, value_states
        layer = self.layers[layer_idx]
        is_memory = layer_idx in self.memory_layers
        if plan.move and layer.get_seq_length() > 0:
            if is_memory:  # LongLLaMA: the evicted local cache enters memory before this attention
                self._append_memory(layer_idx, layer.unrotated, layer.values, self.local_valid)
            layer.reset()
        unrotated = self._captured(layer_idx) if is_memory else None
        self._changed = True
        return layer.append(key_states, value_states, unrotated)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a MemoryCache cannot be cropped (tokens moved to memory cannot be removed)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row ``beam_idx[i]`` (local caches and memory).
        ``beam_idx``: a 1-D integer tensor or sequence of rows in ``[0, B)``."""
        if self.batch_rows == 0:  # nothing held yet
            return
        beam_idx = torch.tensor(_index_list("beam_idx", beam_idx, self.batch_rows, allow_mask=False), dtype=torch.long)
        super().reorder_cache(beam_idx)
        if self.local_positions is not None:
            idx = beam_idx.to(self.local_positions.device)
            self.local_positions = self.local_positions.index_select(0, idx)
            self.local_valid = self.local_valid.index_select(0, idx)
        if self.memory is not None:
            self.memory.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (e.g. before ``generate`` with beams)."""
        repeats = _positive_int("repeats", repeats)
        self.reorder_cache(torch.arange(self.batch_rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).flatten())

    def reset(self) -> None:
        """Forget everything (memory and local caches): a new document for every row. Also makes a
        cache usable again after a call that failed half-way."""
        self._failed = None
        for layer in self.layers:
            layer.reset()
        if self.memory is not None:
            self.memory.reset()
        self.seen_tokens = 0
        self.local_positions = self.local_valid = None

    # ---- state ---------------------------------------------------------------------------------

    @property
    def local_length(self) -> int:
        return 0 if self.local_positions is None else self.local_positions.shape[1]

    @property
    def batch_rows(self) -> int:
        """Batch size this cache holds state for (0 when it holds none yet)."""
        if self.local_positions is not None:
            return self.local_positions.shape[0]
        return self.memory.batch_size if self.memory is not None else 0

    def reset_memory(self, rows: Sequence[int] | Tensor | None = None) -> None:
        """Empty the memory of the given batch rows (all when None); the local cache is kept."""
        if self.memory is not None:
            self.memory.reset(rows)

    def memory_view(self, layer_idx: int) -> MemoryView | None:
        """The memory of a memory layer, as views (None before anything was appended)."""
        return None if self.memory is None else self.memory.view(layer_idx)

    def _append_memory(self, layer_idx: int, keys: Tensor, values: Tensor, valid: Tensor | None) -> None:
        if self.memory is None:
            batch, heads, _, dim = keys.shape
            self.memory = MemoryStore(
                self.memory_layers,
                batch_size=batch,
                num_kv_heads=heads,
                head_dim=dim,
                capacity=self.shard_capacity,
                dtype=self.mem_dtype,
                device=keys.device,
            )
        self._changed = True
        if self.shard_world > 1:  # this rank's columns: g = start + j with g mod P == rank
            start, world = self._columns[layer_idx], self.shard_world
            self._columns[layer_idx] = start + keys.shape[2]
            first = (self.shard_rank - start) % world
            keys, values = keys[:, :, first::world], values[:, :, first::world]
            valid = None if valid is None else valid[:, first::world]
        self.memory.append(layer_idx, keys, values, valid)

    def _shard_metadata(self) -> dict:
        return {
            "rank": self.shard_rank,
            "world_size": self.shard_world,
            "capacity": self.capacity,
            "columns": {str(layer): n for layer, n in self._columns.items()},
        }

    def save_memory(self, path) -> None:
        """Write the memory (not the local cache) with :meth:`MemoryStore.save`; a sharded cache
        writes this rank's store and, in the file's checksummed header, its rank, the group's
        size, the global capacity and the columns appended per layer."""
        if self.memory is None:
            raise ValueError("the memory is empty: nothing has been appended yet")
        if self.shard_world == 1:
            self.memory.save(path)
        else:
            self.memory.save(path, metadata={SHARD_METADATA: json.dumps(self._shard_metadata())})

    def load_memory(self, path, *, device: torch.device | str | None = None) -> None:
        """Replace the memory by a file written by :meth:`save_memory`; its geometry must match this
        cache (layers, capacity, dtype, and the batch size and heads of the state it holds). A
        sharded cache loads the file its own rank saved: a file of another rank, group size or
        global capacity, or an unsharded file, raises :class:`fot_kernels.memory.MemoryFileError`
        (and an unsharded cache refuses a rank's file)."""
        expect = {"layers": list(self.memory_layers), "capacity": self.shard_capacity, "dtype": self.mem_dtype}
        if self.batch_rows:
            expect["batch_size"] = self.batch_rows
        if self.memory is not None:
            expect.update(num_kv_heads=self.memory.num_kv_heads, head_dim=self.memory.head_dim)
        if device is None:
            device = self.memory.device if self.memory is not None else "cpu"
            device = self.local_positions.device if self.local_positions is not None else device
        try:
            store = MemoryStore.load(path, device=_parse_device(device), expect=expect)
        except MemoryFileError as exc:
            if "capacity: file has" not in str(exc):
                raise
            hint = (
                f"this cache is rank {self.shard_rank} of {self.shard_world} of a sharded memory of capacity "
                f"{self.capacity}: each rank's file holds capacity / {self.shard_world} slots; load the file this "
                "rank saved"
                if self.shard_world > 1
                else "a sharded cache's file (one rank's share: capacity / group size slots) loads only in the "
                "sharded cache of that rank"
            )
            raise MemoryFileError(f"{exc} ({hint})") from exc
        columns = self._check_shard_entry(path, store.file_metadata.get(SHARD_METADATA))
        self.memory = store
        if columns is not None:
            self._columns = columns

    def _check_shard_entry(self, path, raw: str | None) -> dict[int, int] | None:
        """The columns per layer a sharded cache's file records (None for an unsharded cache),
        after checking the file's shard entry ``raw`` (None: none) against this cache."""
        if self.shard_world == 1:
            if raw is not None:
                raise MemoryFileError(
                    f"{path}: the file holds one rank's share of a sharded memory ({raw}); this cache is not "
                    "sharded (pass the same process_group to enable_memory)"
                )
            return None
        if raw is None:
            raise MemoryFileError(
                f"{path}: the file holds an unsharded memory; this cache is rank {self.shard_rank} of "
                f"{self.shard_world} (load it on each rank from the file that rank saved)"
            )
        want = self._shard_metadata()
        try:
            shard = json.loads(raw)
            got = {key: shard[key] for key in ("rank", "world_size", "capacity", "columns")}
            columns = {int(layer): n for layer, n in got["columns"].items()}
            ok = sorted(columns) == sorted(self.memory_layers) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in columns.values()
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MemoryFileError(f"{path}: bad {SHARD_METADATA} entry in the header ({exc})") from exc
        if not ok:
            raise MemoryFileError(f"{path}: bad columns in the {SHARD_METADATA} entry: {got['columns']!r}")
        diffs = [f"{k}: file has {got[k]}, expected {want[k]}" for k in ("rank", "world_size", "capacity")]
        diffs = [d for d, k in zip(diffs, ("rank", "world_size", "capacity")) if got[k] != want[k]]
        if diffs:
            raise MemoryFileError(f"{path}: the memory shard does not match this cache: " + "; ".join(diffs))
        return columns

    # ---- windows (used by the patched forward, the attention function and the key hook) ---------

    @contextmanager
    def open_window(self, positions: Tensor, valid: Tensor | None, *, store_local: bool) -> Iterator[WindowPlan]:
        """Open a window of new tokens for one call of the inner model; the plan is committed
        (local state, seen tokens) when the block exits normally. When the block raises after some
        layers changed their local cache or memory, the layers disagree: the cache refuses further
        use until :meth:`reset`.

        Args:
            positions: absolute position ids of the new tokens, int ``[B, n]``.
            valid: their padding mask, bool ``[B, n]``, or None.
            store_local: keep the tokens in the local cache (else they go to memory after attention).

        Raises:
            ValueError: ``B`` differs from the batch size of the state this cache holds.
            RuntimeError: a window is already open, or an earlier one failed half-way.
        """
        if self._plan is not None:
            raise RuntimeError("a MemoryCache window is already open (nested or concurrent use of one cache)")
        plan = self._plan_window(positions, valid, store_local)
        self._plan, self._changed = plan, False
        try:
            yield plan
        except BaseException as exc:
            if self._changed:
                self._failed = f"{type(exc).__name__}: {exc}"
            raise
        else:
            if plan.store_local:
                self.local_positions, self.local_valid = plan.local_positions, plan.local_valid
            self.seen_tokens += plan.length
        finally:
            self._plan = None
            self._unrotated.clear()

    def check_batch_size(self, batch: int) -> None:
        """Raise ValueError unless an input of ``batch`` rows can use this cache: it holds no state
        yet, or the state of exactly ``batch`` rows (never silently expanded). RuntimeError when
        an earlier call failed half-way (the layers' states disagree: :meth:`reset` first)."""
        if self._failed is not None:
            raise RuntimeError(
                f"this MemoryCache is inconsistent: a call failed after some layers had stored its tokens "
                f"({self._failed}); call cache.reset() (or use a new cache)"
            )
        if self.batch_rows and self.batch_rows != batch:
            raise ValueError(
                f"input batch size {batch} differs from the MemoryCache's ({self.batch_rows}): a cache holds the "
                "state of its own rows; make a new one (model.fot_memory.new_cache()), or reorder it explicitly "
                "first (cache.batch_repeat_interleave(n) for beam search, cache.reorder_cache(index))"
            )

    def _plan_window(self, positions: Tensor, valid: Tensor | None, store_local: bool) -> WindowPlan:
        batch, length = positions.shape
        self.check_batch_size(batch)
        move = store_local and self.local_length > 0 and self.local_length + length > self.window
        keep = store_local and not move and self.local_length > 0
        new_valid = valid if valid is not None else torch.ones(batch, length, dtype=torch.bool, device=positions.device)
        all_positions = torch.cat([self.local_positions, positions], 1) if keep else positions
        kv_valid = torch.cat([self.local_valid, new_valid], 1) if keep else new_valid
        rel = positions - all_positions.min(dim=1, keepdim=True).values if length else positions
        return WindowPlan(
            length=length,
            store_local=store_local,
            move=move,
            valid=valid,
            attention_mask=None if bool(kv_valid.all()) else kv_valid,
            position_ids=rel,
            local_positions=all_positions,
            local_valid=kv_valid,
        )

    def _open_plan(self) -> WindowPlan:
        if self._plan is None:
            raise RuntimeError("a MemoryCache is only usable through a model prepared by enable_memory()")
        return self._plan

    def _captured(self, layer_idx: int) -> Tensor:
        keys = self._unrotated.pop(layer_idx, None)
        if keys is None:
            raise RuntimeError(
                f"no un-rotated keys were captured for memory layer {layer_idx} in this window "
                "(its k_proj hook did not run: was the model prepared by enable_memory()?)"
            )
        return keys

    def capture_unrotated_keys(self, layer_idx: int, keys: Tensor) -> None:
        """Called by a memory layer's ``k_proj`` hook: the window's keys before RoPE,
        ``[B, Hkv, n, D]``, which are what enters memory (LongLLaMA stores them un-rotated)."""
        self._open_plan()
        if layer_idx not in self.memory_layers:
            raise ValueError(f"layer {layer_idx} is not a memory layer of this cache ({list(self.memory_layers)})")
        self._unrotated[layer_idx] = keys

    def after_attention(self, layer_idx: int, values: Tensor) -> None:
        """Called by a memory layer's attention once it has attended: a prefill window (not kept
        in the local cache) enters that layer's memory now, as un-rotated keys and ``values``
        ``[B, Hkv, n, D]``, with its padding mask."""
        plan = self._open_plan()
        if not plan.store_local:
            self._append_memory(layer_idx, self._captured(layer_idx), values, plan.valid)


__all__ = ["SHARD_METADATA", "MemoryCache", "WindowPlan", "check_process_group"]
