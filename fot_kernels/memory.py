"""Memory store: preallocated keys/values of the memory layers (docs/DESIGN.md section 4).

One :class:`MemoryStore` holds, for each memory layer, a key and a value buffer
``[B, Hkv, capacity, D]`` allocated once, plus per batch row: the number of valid slots, the next
slot to write, and a per-slot validity bit (memory padding mask).

Layout choice (FIFO eviction without re-copying): each row is a **ring buffer**. Appending n
slots writes them at ``head, head + 1, ...`` modulo ``capacity``; nothing already stored moves.
Until a row is full its valid slots are ``[0, length)`` and ``head == length``; once full, every
slot is valid and the new slots overwrite the oldest ones (FIFO). Either way the valid slots of a
row are always the prefix ``[0, length)``, so the ops read the store with ``mem_lengths`` on the
view ``buffer[:, :, :max(length)]`` (no copy). Attention and kNN do not depend on the order of the
slots, only on which are valid, so the ring's rotation is invisible to them (up to the
summation order of the softmax, and which of several exactly tied slots kNN keeps).
Padding (e.g. left-padded rows) is kept per slot and passed as ``mem_mask``, only while some
valid slot of the layer is padding.

The store is a cache: it keeps detached copies, so gradients never flow into or out of it.
Every method that reads or writes the fill state takes the store's lock, so a :meth:`save` that
runs while another thread appends writes a consistent snapshot (before or after the append).

Files (format version 2): :meth:`MemoryStore.save` writes a safetensors file holding the filled
part of each layer (``keys.L``, ``values.L``, ``valid.L``) and its ring state (``lengths.L``,
``heads.L``), with a format tag, the geometry, optional caller entries (``save(metadata=)``, e.g.
a sharded cache's rank; ``load`` returns them as ``file_metadata``) and a SHA-256 in the header
metadata. The SHA-256 covers every byte of the file (size prefix, header, tensors) except its own
64 hex digits, which are hashed as ``"0" * 64``. :meth:`MemoryStore.load` verifies the checksum,
then the geometry against bounds and against the tensor shapes the header declares, then the ring
state, and only then allocates; anything wrong raises :class:`MemoryFileError` (a ``ValueError``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validate import MAX_HEAD_DIM

FORMAT = "fot-kernels-memory"
#: version 1 (fot-kernels <= 0.x) checksummed the tensors only; its files are rejected
FORMAT_VERSION = "2"
#: default bound on what :meth:`MemoryStore.load` may allocate (keys, values and validity bits)
DEFAULT_MAX_LOAD_BYTES = 64 * 2**30
MAX_DIM = 2**31 - 1  # batch size, heads, capacity, layer index
MAX_LAYERS = 4096
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ST_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
    "I64": torch.int64,
}
_KINDS = ("keys", "values", "valid", "lengths", "heads")
_GEOMETRY_FIELDS = ("layers", "batch_size", "num_kv_heads", "head_dim", "capacity", "dtype")
_SHA_PLACEHOLDER = "0" * 64
_RESERVED_METADATA = ("format", "format_version", "geometry", "sha256")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class MemoryFileError(ValueError):
    """A memory file is unreadable, corrupt, or does not match what the caller expects."""


@dataclass(frozen=True)
class MemoryView:
    """What the ops need to read one layer's memory, without copies.

    keys, values: ``[B, Hkv, M, D]`` views of the store (M = the longest row's length);
    lengths: int64 ``[B]``, slot m of row b is valid iff ``m < lengths[b]``;
    mask: bool ``[B, M]`` or None (None: no valid slot is padding).
    """

    keys: Tensor
    values: Tensor
    lengths: Tensor
    mask: Tensor | None

    @property
    def num_slots(self) -> int:
        return self.keys.shape[2]

    def op_kwargs(self) -> dict:
        """``mem_keys``/``mem_values``/``mem_lengths``/``mem_mask`` for ``fot_kernels`` ops."""
        return {"mem_keys": self.keys, "mem_values": self.values, "mem_lengths": self.lengths, "mem_mask": self.mask}

    def snapshot(self) -> MemoryView:
        """A copy of this view that later writes to the store cannot change (for autograd, which
        keeps the memory it read until the backward pass)."""
        mask = None if self.mask is None else self.mask.clone()
        return MemoryView(self.keys.clone(), self.values.clone(), self.lengths.clone(), mask)


# ----------------------------------------------------------------------------------------------
# argument checks (shared with fot_kernels.nn and the integrations)
# ----------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _parse_dtype(name: object, what: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        dtype = name
    elif isinstance(name, str) and isinstance(getattr(torch, name.replace("torch.", ""), None), torch.dtype):
        dtype = getattr(torch, name.replace("torch.", ""))
    else:
        raise TypeError(f"{what} must be a torch float dtype or its name (e.g. 'bfloat16'), got {name!r}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be one of float16, bfloat16, float32, float64, got {_dtype_name(dtype)}")
    return dtype


def _positive_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """An int (numpy ints too, bools not) in ``[minimum, maximum]``, as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def _parse_device(device: object, what: str = "device") -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{what} must be a torch.device or a str such as 'cuda:0', got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{what} must name a torch device, got {device!r} ({exc})") from exc


def _index_list(name: str, index: object, batch: int, *, allow_mask: bool) -> list[int]:
    """Batch row indices from a sequence of ints or a 1-D integer tensor (and, when
    ``allow_mask``, an int or a bool ``[B]`` tensor), each in ``[0, batch)``."""
    if isinstance(index, Tensor):
        if index.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(index.shape)}")
        if index.dtype == torch.bool:
            if not allow_mask:
                raise TypeError(f"{name} must hold integer row indices, got a bool tensor (a mask: use mask.nonzero())")
            if index.shape != (batch,):
                raise ValueError(f"a bool {name} mask must have shape [B] = ({batch},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.dtype.is_floating_point or index.dtype.is_complex:
            raise TypeError(f"{name} must hold integer row indices, got a {_dtype_name(index.dtype)} tensor")
        values = index.tolist()
    elif allow_mask and isinstance(index, numbers.Integral) and not isinstance(index, bool):
        values = [index]
    elif isinstance(index, Iterable) and not isinstance(index, (str, bytes)):
        values = list(index)
    else:
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {type(index).__name__}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must hold integer row indices, got {type(value).__name__} {value!r}")
        if not 0 <= value < batch:
            raise ValueError(f"{name} values must be in [0, {batch}) (the batch size), got {value}")
    return [int(v) for v in values]


def _check_geometry(layers, batch_size, num_kv_heads, head_dim, capacity, dtype) -> dict:
    """Normalised geometry; TypeError/ValueError naming the field."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a sequence of ints, got {type(layers).__name__}")
    layers = tuple(_positive_int("each entry of layers", layer, 0, MAX_DIM) for layer in layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"layers must hold at most {MAX_LAYERS} entries, got {len(layers)}")
    return {
        "layers": layers,
        "batch_size": _positive_int("batch_size", batch_size, 0, MAX_DIM),
        "num_kv_heads": _positive_int("num_kv_heads", num_kv_heads, 1, MAX_DIM),
        "head_dim": _positive_int("head_dim", head_dim, 1, MAX_HEAD_DIM),
        "capacity": _positive_int("capacity", capacity, 1, MAX_DIM),
        "dtype": _parse_dtype(dtype, "dtype"),
    }


def _store_bytes(geometry: dict) -> int:
    """Bytes a store of this geometry allocates: keys, values and validity bits of every layer."""
    g = geometry
    per_slot = 2 * g["num_kv_heads"] * g["head_dim"] * g["dtype"].itemsize + 1
    return len(g["layers"]) * g["batch_size"] * g["capacity"] * per_slot


# ----------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------


class MemoryStore:
    """Preallocated FoT memory for a set of memory layers.

    Args:
        layers: indices of the memory layers (any distinct non-negative ints, e.g. ``[6, 12, 18]``).
        batch_size: B, number of independent rows (documents / beams), may be 0.
        num_kv_heads: Hkv.
        head_dim: D, 1..256.
        capacity: slots per row and layer; at capacity the oldest slots are evicted (FIFO).
        dtype: storage dtype (LongLLaMA stores bf16); appends are cast on the way in.
        device: where the buffers live; appended tensors must be on it.

    Each layer has its own fill state, because within one forward pass layer 6 appends its window
    before layer 12 reads its memory. Methods are thread-safe (one lock per store).
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype | str = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        g = _check_geometry(layers, batch_size, num_kv_heads, head_dim, capacity, dtype)
        self.layers: tuple[int, ...] = g["layers"]
        self.batch_size: int = g["batch_size"]
        self.num_kv_heads: int = g["num_kv_heads"]
        self.head_dim: int = g["head_dim"]
        self.capacity: int = g["capacity"]
        self.dtype: torch.dtype = g["dtype"]
        self.device = _parse_device(device)
        #: the extra header metadata entries of the file this store was loaded from (:meth:`load`), else {}
        self.file_metadata: dict[str, str] = {}
        self._lock = threading.RLock()
        shape = (self.batch_size, self.num_kv_heads, self.capacity, self.head_dim)
        self._keys = {layer: torch.zeros(shape, dtype=self.dtype, device=self.device) for layer in self.layers}
        self._values = {layer: torch.zeros(shape, dtype=self.dtype, device=self.device) for layer in self.layers}
        valid_shape = (self.batch_size, self.capacity)
        self._valid = {layer: torch.ones(valid_shape, dtype=torch.bool, device=self.device) for layer in self.layers}
        # host-side fill state (read on every append/view; the ops need it on the host anyway)
        self._lengths = {layer: [0] * self.batch_size for layer in self.layers}
        self._heads = {layer: [0] * self.batch_size for layer in self.layers}

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: a lock is not copyable
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------
    # inspection
    # ------------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        with self._lock:
            fill = {layer: max(lengths, default=0) for layer, lengths in self._lengths.items()}
        return (
            f"MemoryStore(layers={list(self.layers)}, batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, capacity={self.capacity}, dtype={_dtype_name(self.dtype)}, "
            f"device={self.device}, max_fill={fill})"
        )

    def _layer(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
        if layer not in self._keys:
            raise ValueError(f"layer {layer!r} is not a memory layer of this store (layers: {list(self.layers)})")
        return int(layer)

    def lengths(self, layer: int) -> Tensor:
        """int64 ``[B]``: valid slots per row of ``layer``."""
        with self._lock:
            return torch.tensor(self._lengths[self._layer(layer)], dtype=torch.int64, device=self.device)

    def num_slots(self, layer: int) -> int:
        """The longest row's number of valid slots in ``layer``."""
        with self._lock:
            return max(self._lengths[self._layer(layer)], default=0)

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """The whole preallocated ``(keys, values)`` ``[B, Hkv, capacity, D]`` of ``layer``."""
        with self._lock:
            layer = self._layer(layer)
            return self._keys[layer], self._values[layer]

    def view(self, layer: int) -> MemoryView:
        """The filled part of ``layer`` as views (no copy), ready for ``fot_kernels`` ops. Later
        appends write into the same buffers; :meth:`MemoryView.snapshot` makes a stable copy."""
        with self._lock:
            layer = self._layer(layer)
            num = self.num_slots(layer)
            lengths = self.lengths(layer)
            mask = None
            valid = self._valid[layer][:, :num]
            if num > 0 and not bool(valid.all()):
                mask = valid
            return MemoryView(self._keys[layer][:, :, :num], self._values[layer][:, :, :num], lengths, mask)

    def slots_in_order(self, layer: int, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys ``[Hkv, n, D]``, values and validity ``[n]`` of one row, oldest first (copies)."""
        with self._lock:
            layer = self._layer(layer)
            row = _positive_int("row", row, 0)
            if row >= self.batch_size:
                raise ValueError(f"row must be in [0, {self.batch_size}) (the batch size), got {row}")
            length, head = self._lengths[layer][row], self._heads[layer][row]
            order = torch.arange(length, device=self.device)
            if length == self.capacity:
                order = (order + head) % self.capacity
            return (
                self._keys[layer][row][:, order],
                self._values[layer][row][:, order],
                self._valid[layer][row][order],
            )

    # ------------------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------------------

    def append(self, layer: int, keys: Tensor, values: Tensor, valid: Tensor | None = None) -> None:
        """Append n slots to every row of ``layer`` (cast to the store's dtype, detached), evicting
        the oldest slots of a full row (FIFO). Already stored slots are never moved or copied.

        Args:
            keys, values: ``[B, Hkv, n, D]`` (any float dtype, any strides) on the store's device.
            valid: optional bool ``[B, n]`` on the store's device; False marks padding, which
                attention never sees.
        """
        with self._lock:  # the whole call: a concurrent reorder changes the batch size
            self._append(self._layer(layer), keys, values, valid)

    def _append(self, layer: int, keys: Tensor, values: Tensor, valid: Tensor | None) -> None:
        expected = (self.batch_size, self.num_kv_heads, None, self.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} must have a float dtype, got {_dtype_name(t.dtype)}")
            if t.dim() != 4 or t.shape[0] != expected[0] or t.shape[1] != expected[1] or t.shape[3] != expected[3]:
                raise ValueError(
                    f"{name} must have shape [B={self.batch_size}, Hkv={self.num_kv_heads}, n, D={self.head_dim}], "
                    f"got {tuple(t.shape)}"
                )
            if t.device != self.device:
                raise ValueError(f"{name} must be on the store's device ({self.device}), got {t.device}")
        if keys.shape != values.shape:
            shapes = f"{tuple(keys.shape)} and {tuple(values.shape)}"
            raise ValueError(f"keys and values must have the same shape, got {shapes}")
        n = keys.shape[2]
        if valid is not None:
            if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
                got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
                raise TypeError(f"valid must be a bool torch.Tensor or None, got {got}")
            if valid.shape != (self.batch_size, n):
                raise ValueError(f"valid must have shape [B, n] = ({self.batch_size}, {n}), got {tuple(valid.shape)}")
            if valid.device != self.device:
                raise ValueError(f"valid must be on the store's device ({self.device}), got {valid.device}")
        if n == 0 or self.batch_size == 0:
            return
        keys, values = keys.detach(), values.detach()
        if n > self.capacity:  # only the newest `capacity` slots can survive
            keys, values = keys[:, :, n - self.capacity :], values[:, :, n - self.capacity :]
            valid = None if valid is None else valid[:, n - self.capacity :]
            n = self.capacity
        heads, lengths = self._heads[layer], self._lengths[layer]
        by_head: dict[int, list[int]] = {}
        for row, head in enumerate(heads):
            by_head.setdefault(head, []).append(row)
        for head, rows in by_head.items():
            first = min(n, self.capacity - head)  # slots before the ring wraps
            pieces = [(head, 0, first)] + ([(0, first, n)] if first < n else [])
            for dst, lo, hi in pieces:
                part_valid = None if valid is None else valid[:, lo:hi]
                self._write(layer, rows, dst, keys[:, :, lo:hi], values[:, :, lo:hi], part_valid)
        for row in range(self.batch_size):
            heads[row] = (heads[row] + n) % self.capacity
            lengths[row] = min(lengths[row] + n, self.capacity)

    def _write(self, layer: int, rows: list[int], dst: int, keys: Tensor, values: Tensor, valid: Tensor | None) -> None:
        n = keys.shape[2]
        kbuf, vbuf, vmask = self._keys[layer], self._values[layer], self._valid[layer]
        if len(rows) == self.batch_size:
            kbuf[:, :, dst : dst + n].copy_(keys)
            vbuf[:, :, dst : dst + n].copy_(values)
            vmask[:, dst : dst + n] = True if valid is None else valid
            return
        for row in rows:  # rows at different ring positions (after a partial reset)
            kbuf[row, :, dst : dst + n].copy_(keys[row])
            vbuf[row, :, dst : dst + n].copy_(values[row])
            vmask[row, dst : dst + n] = True if valid is None else valid[row]

    def reset(self, rows: Sequence[int] | Tensor | None = None) -> None:
        """Empty the given batch rows in every layer (a new document): None for all rows, an int,
        a sequence or 1-D integer tensor of row indices, or a bool ``[B]`` mask."""
        with self._lock:
            batch = self.batch_size
            rows = list(range(batch)) if rows is None else _index_list("rows", rows, batch, allow_mask=True)
            for layer in self.layers:
                for row in rows:
                    self._lengths[layer][row] = 0
                    self._heads[layer][row] = 0
                if rows:
                    self._valid[layer][rows] = True

    def reorder(self, index: Tensor | Sequence[int]) -> None:
        """Make row i a copy of old row ``index[i]`` (beam search). ``index``: a sequence or 1-D
        integer tensor (any device) of rows in ``[0, B)``; ``len(index)`` may differ from B: the
        batch size becomes ``len(index)``. Bool masks and float tensors are rejected."""
        with self._lock:
            host = _index_list("index", index, self.batch_size, allow_mask=False)
            index = torch.tensor(host, dtype=torch.int64, device=self.device)
            for layer in self.layers:
                self._keys[layer] = self._keys[layer].index_select(0, index)
                self._values[layer] = self._values[layer].index_select(0, index)
                self._valid[layer] = self._valid[layer].index_select(0, index)
                self._lengths[layer] = [self._lengths[layer][i] for i in host]
                self._heads[layer] = [self._heads[layer][i] for i in host]
            self.batch_size = len(host)

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat each row ``repeats`` times (rows b*r ... b*r+r-1 copy old row b), as
        ``generate`` does to its inputs for beam search / several return sequences."""
        repeats = _positive_int("repeats", repeats)
        with self._lock:
            self.reorder(torch.arange(self.batch_size).repeat_interleave(repeats))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> MemoryStore:
        """Move and/or cast the buffers in place; returns self. Casting to a lower precision
        rounds the stored slots."""
        device = None if device is None else _parse_device(device)
        dtype = None if dtype is None else _parse_dtype(dtype, "dtype")
        with self._lock:
            device = self.device if device is None else device
            dtype = self.dtype if dtype is None else dtype
            for layer in self.layers:
                self._keys[layer] = self._keys[layer].to(device=device, dtype=dtype)
                self._values[layer] = self._values[layer].to(device=device, dtype=dtype)
                self._valid[layer] = self._valid[layer].to(device=device)
            self.device, self.dtype = device, dtype
        return self

    # ------------------------------------------------------------------------------------------
    # files
    # ------------------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[dict, dict[str, Tensor]]:
        """Geometry and fresh CPU copies of the file's tensors, taken under the lock."""
        tensors = {}
        with self._lock:
            geometry = {
                "layers": list(self.layers),
                "batch_size": self.batch_size,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "capacity": self.capacity,
                "dtype": _dtype_name(self.dtype),
            }
            for layer in self.layers:
                num = self.num_slots(layer)
                tensors[f"keys.{layer}"] = _cpu_copy(self._keys[layer][:, :, :num])
                tensors[f"values.{layer}"] = _cpu_copy(self._values[layer][:, :, :num])
                tensors[f"valid.{layer}"] = _cpu_copy(self._valid[layer][:, :num])
                tensors[f"lengths.{layer}"] = torch.tensor(self._lengths[layer], dtype=torch.int64)
                tensors[f"heads.{layer}"] = torch.tensor(self._heads[layer], dtype=torch.int64)
        return geometry, tensors

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
        """Write the filled part of the store to a safetensors file (exact, any dtype). The state
        is snapshotted under the store's lock; the file is written to a temporary name beside
        ``path`` and renamed, so a reader never sees a partial file.

        Args:
            path: the file.
            metadata: optional extra string entries for the header metadata (covered by the
                checksum; :meth:`load` returns them as ``file_metadata``), e.g. a sharded cache's
                rank; names other than the format's own (format, format_version, geometry, sha256).
        """
        from safetensors.torch import save as serialize

        path = _fspath(path)
        extra = {} if metadata is None else metadata
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise TypeError(f"metadata must be a dict of str to str or None, got {extra!r}")
        reserved = sorted(set(extra) & set(_RESERVED_METADATA))
        if reserved:
            raise ValueError(f"metadata must not use the format's own entries {reserved}")
        if any(_SHA_PLACEHOLDER in text for item in extra.items() for text in item):
            raise ValueError("metadata must not hold 64 zeros in a row (the checksum's placeholder in the header)")
        geometry, tensors = self._snapshot()
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "geometry": json.dumps(geometry),
            **extra,
            "sha256": _SHA_PLACEHOLDER,
        }
        blob = bytearray(serialize(tensors, metadata=metadata))
        header_end = 8 + struct.unpack_from("<Q", blob)[0]
        at = _checksum_offset(blob, header_end, _SHA_PLACEHOLDER)
        if at is None:  # cannot happen: no other field holds 64 zeros
            raise RuntimeError("internal error: the checksum placeholder is not unique in the header")
        blob[at : at + 64] = _file_digest(blob, at).encode()
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        expect: dict | None = None,
        max_bytes: int = DEFAULT_MAX_LOAD_BYTES,
    ) -> MemoryStore:
        """Read a file written by :meth:`save` (format version 2).

        The extra header metadata entries that :meth:`save` wrote (``metadata=``) are returned
        as the store's ``file_metadata``. Nothing is allocated before the file has been checked:
        checksum over the whole file, format tag and version, geometry within bounds (and within
        ``max_bytes``), the tensors the header declares against the geometry, the ring state
        (lengths, heads) against the capacity and the tensors.

        Args:
            path: the file.
            device: where to put the buffers.
            expect: optional geometry the file must have, any of ``layers``, ``batch_size``,
                ``num_kv_heads``, ``head_dim``, ``capacity``, ``dtype``; a mismatch raises.
            max_bytes: the most the store may allocate (keys, values and validity bits of every
                layer at full capacity); a larger geometry raises instead of allocating.

        Raises:
            FileNotFoundError: no such file.
            MemoryFileError: unreadable or corrupt file (bad header, checksum mismatch, missing or
                inconsistent tensors or ring state), not a memory file or an unsupported version,
                a geometry out of bounds or different from ``expect``.
        """
        path = _fspath(path)
        device = _parse_device(device)
        want = _check_expect(expect)
        max_bytes = _positive_int("max_bytes", max_bytes)
        blob = _read_file(path, max_bytes)
        header, data = _parse_header(blob, path)
        geometry = _parse_geometry(header, path, max_bytes)
        diffs = [
            f"{k}: file has {_show(geometry[k])}, expected {_show(v)}" for k, v in want.items() if geometry[k] != v
        ]
        if diffs:
            raise MemoryFileError(f"{path}: memory file does not match: " + "; ".join(diffs))
        tensors = _file_tensors(header, geometry, data, path)
        shape = {k: geometry[k] for k in ("batch_size", "num_kv_heads", "head_dim", "capacity", "dtype")}
        store = cls(geometry["layers"], **shape, device=device)
        with store._lock:
            for layer in store.layers:
                num = tensors[f"keys.{layer}"].shape[2]
                store._keys[layer][:, :, :num].copy_(tensors[f"keys.{layer}"])
                store._values[layer][:, :, :num].copy_(tensors[f"values.{layer}"])
                store._valid[layer][:, :num].copy_(tensors[f"valid.{layer}"])
                store._lengths[layer] = tensors[f"lengths.{layer}"].tolist()
                store._heads[layer] = tensors[f"heads.{layer}"].tolist()
        extra = {k: v for k, v in header["__metadata__"].items() if k not in _RESERVED_METADATA}
        store.file_metadata = {k: v for k, v in extra.items() if isinstance(k, str) and isinstance(v, str)}
        return store


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------


def _fspath(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str path, got {type(path).__name__}")
    return path


def _cpu_copy(t: Tensor) -> Tensor:
    """A fresh contiguous CPU copy (never an alias of the store's buffers)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t)


def _show(value: object) -> str:
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    return repr(list(value) if isinstance(value, tuple) else value)


def _check_expect(expect: object) -> dict:
    if expect is None:
        return {}
    if not isinstance(expect, dict):
        raise TypeError(f"expect must be a dict of geometry fields or None, got {type(expect).__name__}")
    unknown = set(expect) - set(_GEOMETRY_FIELDS)
    if unknown:
        raise ValueError(f"expect has unknown fields {sorted(unknown)}; known: {sorted(_GEOMETRY_FIELDS)}")
    want = dict(expect)
    if "dtype" in want:
        want["dtype"] = _parse_dtype(want["dtype"], "expect['dtype']")
    if "layers" in want:
        layers = want["layers"]
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"expect['layers'] must be a sequence of ints, got {type(layers).__name__}")
        want["layers"] = tuple(_positive_int("each entry of expect['layers']", x, 0) for x in layers)
    for key in ("batch_size", "num_kv_heads", "head_dim", "capacity"):
        if key in want:
            want[key] = _positive_int(f"expect[{key!r}]", want[key], 0)
    return want


def _read_file(path: str, max_bytes: int) -> bytearray:
    size = os.path.getsize(path)  # FileNotFoundError as is
    if size > max_bytes + _MAX_HEADER_BYTES:
        raise MemoryFileError(f"{path}: the file is {size} bytes, more than max_bytes ({max_bytes}) allows")
    blob = bytearray(size)
    with open(path, "rb") as f:
        got = f.readinto(blob)
    if got != size:
        raise MemoryFileError(f"{path}: read {got} of {size} bytes (the file changed while reading)")
    return blob


def _checksum_offset(blob: bytearray, header_end: int, digest: str) -> int | None:
    """Offset of the only occurrence of ``digest`` in the header, None if absent or repeated."""
    at = blob.find(digest.encode(), 8, header_end)
    if at < 0 or blob.find(digest.encode(), at + 1, header_end) >= 0:
        return None
    return at


def _file_digest(blob: bytearray, at: int) -> str:
    """SHA-256 of the whole file with the 64 checksum digits at ``at`` read as zeros."""
    h = hashlib.sha256()
    view = memoryview(blob)
    h.update(view[:at])
    h.update(_SHA_PLACEHOLDER.encode())
    h.update(view[at + 64 :])
    return h.hexdigest()


def _parse_header(blob: bytearray, path: str) -> tuple[dict, memoryview]:
    """The safetensors header (checksum verified, format and version checked) and the data."""
    if len(blob) < 8:
        raise MemoryFileError(f"{path}: not a readable safetensors file (only {len(blob)} bytes)")
    size = struct.unpack_from("<Q", blob)[0]
    if size > min(_MAX_HEADER_BYTES, len(blob) - 8):
        raise MemoryFileError(f"{path}: not a readable safetensors file (header size {size}, file size {len(blob)})")
    header_end = 8 + size
    try:
        header = json.loads(bytes(blob[8:header_end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoryFileError(f"{path}: not a readable safetensors file (bad header: {exc})") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise MemoryFileError(f"{path}: not a fot-kernels memory file (no header metadata)")
    if metadata.get("format") != FORMAT:
        raise MemoryFileError(f"{path}: not a fot-kernels memory file (format tag {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        why = ""
        if version == "1":
            why = " (version 1 checksummed the tensors only, its header cannot be verified: re-create and re-save it)"
        raise MemoryFileError(
            f"{path}: memory file format version {version!r} is not supported "
            f"(this version reads {FORMAT_VERSION!r}){why}"
        )
    digest = metadata.get("sha256")
    if not isinstance(digest, str) or not _SHA_RE.fullmatch(digest):
        raise MemoryFileError(f"{path}: the header's sha256 is not 64 lowercase hex digits, the file is corrupt")
    at = _checksum_offset(blob, header_end, digest)
    if at is None or _file_digest(blob, at) != digest:
        raise MemoryFileError(f"{path}: checksum mismatch, the file is corrupt")
    return header, memoryview(blob)[header_end:]


def _parse_geometry(header: dict, path: str, max_bytes: int) -> dict:
    metadata = header["__metadata__"]
    try:
        raw = json.loads(metadata["geometry"])
        if not isinstance(raw, dict) or set(raw) != set(_GEOMETRY_FIELDS):
            raise ValueError(f"geometry must have exactly the fields {list(_GEOMETRY_FIELDS)}, got {raw!r}")
        geometry = _check_geometry(*(raw[k] for k in _GEOMETRY_FIELDS))
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise MemoryFileError(f"{path}: bad geometry in the header ({exc})") from exc
    need = _store_bytes(geometry)
    if need > max_bytes:
        raise MemoryFileError(
            f"{path}: the geometry {raw} needs {need} bytes, more than max_bytes ({max_bytes}); "
            "pass a larger max_bytes to load it"
        )
    return geometry


def _file_tensors(header: dict, geometry: dict, data: memoryview, path: str) -> dict[str, Tensor]:
    """CPU tensors over ``data`` (no copy) after checking every entry of the header against the
    geometry and the data size, and the ring state against the capacity and the tensors."""
    layers, batch, capacity = geometry["layers"], geometry["batch_size"], geometry["capacity"]
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    expected = {f"{kind}.{layer}" for layer in layers for kind in _KINDS}
    if set(entries) != expected:
        raise MemoryFileError(
            f"{path}: tensors {sorted(set(entries) ^ expected)} are missing or unexpected for layers {list(layers)}"
        )
    spans = []
    for name, entry in entries.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in _ST_DTYPES and isinstance(entry.get("shape"), list)
        offsets = entry.get("data_offsets") if ok else None
        ints = [*entry["shape"], *offsets] if ok and isinstance(offsets, list) and len(offsets) == 2 else None
        if ints is None or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints):
            raise MemoryFileError(f"{path}: bad header entry for {name}: {entry!r}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for lo, hi, name in sorted(spans):
        if lo != end:
            raise MemoryFileError(f"{path}: tensor data offsets overlap or leave gaps (at {name})")
        end = hi
    if end != len(data):
        raise MemoryFileError(f"{path}: the tensors cover {end} bytes of data, the file holds {len(data)}")

    def tensor(name: str, dtype: torch.dtype, shape: tuple) -> Tensor:
        entry = entries[name]
        if _ST_DTYPES[entry["dtype"]] != dtype or tuple(entry["shape"]) != shape:
            raise MemoryFileError(
                f"{path}: {name} is {_dtype_name(_ST_DTYPES[entry['dtype']])} {tuple(entry['shape'])}, "
                f"expected {_dtype_name(dtype)} {shape}"
            )
        lo, hi = entry["data_offsets"]
        numel = 1
        for dim in shape:
            numel *= dim
        if hi - lo != numel * dtype.itemsize:
            need = numel * dtype.itemsize
            raise MemoryFileError(f"{path}: {name} spans {hi - lo} bytes, its shape {shape} needs {need}")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        if dtype == torch.bool:  # a bool byte must be 0 or 1
            raw = torch.frombuffer(data, dtype=torch.uint8, count=numel, offset=lo)
            if int(raw.max()) > 1:
                raise MemoryFileError(f"{path}: {name} holds bytes other than 0 and 1 for bools")
            return raw.view(torch.bool).view(shape)
        return torch.frombuffer(data, dtype=dtype, count=numel, offset=lo).view(shape)

    out = {}
    heads, dim, dtype = geometry["num_kv_heads"], geometry["head_dim"], geometry["dtype"]
    for layer in layers:
        lengths = tensor(f"lengths.{layer}", torch.int64, (batch,))
        ring = tensor(f"heads.{layer}", torch.int64, (batch,))
        for row, (length, head) in enumerate(zip(lengths.tolist(), ring.tolist())):
            if not 0 <= length <= capacity or not 0 <= head < capacity or (length < capacity and head != length):
                raise MemoryFileError(
                    f"{path}: layer {layer} row {row} has length {length} and ring head {head}, impossible with "
                    f"capacity {capacity} (a row holds 0..capacity slots; the head equals the length until it is full)"
                )
        num = max(lengths.tolist(), default=0)
        out[f"lengths.{layer}"], out[f"heads.{layer}"] = lengths, ring
        out[f"keys.{layer}"] = tensor(f"keys.{layer}", dtype, (batch, heads, num, dim))
        out[f"values.{layer}"] = tensor(f"values.{layer}", dtype, (batch, heads, num, dim))
        out[f"valid.{layer}"] = tensor(f"valid.{layer}", torch.bool, (batch, num))
    return out


__all__ = ["DEFAULT_MAX_LOAD_BYTES", "FORMAT_VERSION", "MemoryFileError", "MemoryStore", "MemoryView"]
