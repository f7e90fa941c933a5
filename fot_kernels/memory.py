"""Memory store: preallocated keys/values of the memory layers (DESIGN.md section 4).

One :class:`MemoryStore` holds, for each memory layer, a key and a value buffer
``[B, Hkv, capacity, D]`` allocated once, plus per batch row: the number of valid slots, the next
slot to write, and a per-slot validity bit (memory padding mask).

Layout choice (FIFO eviction without re-copying): each row is a **ring buffer**. Appending n
slots writes them at ``head, head + 1, ...`` modulo ``capacity``; nothing already stored moves.
Until a row is full its valid slots are ``[0, length)``; once full, every slot is valid and the
new slots overwrite the oldest ones (FIFO). Either way the valid slots of a row are always the
prefix ``[0, length)``, so the ops read the store with ``mem_lengths`` on the view
``buffer[:, :, :max(length)]`` (no copy). Attention and kNN do not depend on the order of the
slots, only on which are valid, so the ring's rotation is invisible to them (up to the
summation order of the softmax, and which of several exactly tied slots kNN keeps).
Padding (e.g. left-padded rows) is kept per slot and passed as ``mem_mask``, only while some
valid slot of the layer is padding.

Files: :meth:`MemoryStore.save` / :meth:`MemoryStore.load` use safetensors, store the filled part
only, and carry a format tag, the geometry and a SHA-256 of the tensor bytes in the header; load
rejects a corrupt, truncated or mismatched file with :class:`MemoryFileError` (a ``ValueError``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FORMAT = "fot-kernels-memory"
FORMAT_VERSION = "1"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class MemoryStore:
    """Preallocated FoT memory for a set of memory layers.

    Args:
        layers: indices of the memory layers (any distinct non-negative ints, e.g. ``[6, 12, 18]``).
        batch_size: B, number of independent rows (documents / beams).
        num_kv_heads: Hkv.
        head_dim: D.
        capacity: slots per row and layer; at capacity the oldest slots are evicted (FIFO).
        dtype: storage dtype (LongLLaMA stores bf16); appends are cast on the way in.
        device: where the buffers live.

    Each layer has its own fill state, because within one forward pass layer 6 appends its window
    before layer 12 reads its memory.
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
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be a sequence of ints, got {type(layers).__name__}")
        layers = tuple(layers)
        for layer in layers:
            _positive_int("each entry of layers", layer, 0)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {list(layers)}")
        self.layers = layers
        self.batch_size = _positive_int("batch_size", batch_size, 0)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.capacity = _positive_int("capacity", capacity)
        self.dtype = _parse_dtype(dtype, "dtype")
        self.device = torch.device(device)
        shape = (self.batch_size, self.num_kv_heads, self.capacity, self.head_dim)
        self._keys = {layer: torch.zeros(shape, dtype=self.dtype, device=self.device) for layer in layers}
        self._values = {layer: torch.zeros(shape, dtype=self.dtype, device=self.device) for layer in layers}
        self._valid = {layer: torch.ones(shape[0], shape[2], dtype=torch.bool, device=self.device) for layer in layers}
        # host-side fill state (read on every append/view; the ops need it on the host anyway)
        self._lengths = {layer: [0] * self.batch_size for layer in layers}
        self._heads = {layer: [0] * self.batch_size for layer in layers}

    # ------------------------------------------------------------------------------------------
    # inspection
    # ------------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        fill = {layer: max(lengths, default=0) for layer, lengths in self._lengths.items()}
        return (
            f"MemoryStore(layers={list(self.layers)}, batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, capacity={self.capacity}, dtype={_dtype_name(self.dtype)}, "
            f"device={self.device}, max_fill={fill})"
        )

    def _layer(self, layer: object) -> int:
        if layer not in self._keys:
            raise ValueError(f"layer {layer!r} is not a memory layer of this store (layers: {list(self.layers)})")
        return layer  # type: ignore[return-value]

    def lengths(self, layer: int) -> Tensor:
        """int64 ``[B]``: valid slots per row of ``layer``."""
        return torch.tensor(self._lengths[self._layer(layer)], dtype=torch.int64, device=self.device)

    def num_slots(self, layer: int) -> int:
        """The longest row's number of valid slots in ``layer``."""
        return max(self._lengths[self._layer(layer)], default=0)

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """The whole preallocated ``(keys, values)`` ``[B, Hkv, capacity, D]`` of ``layer``."""
        layer = self._layer(layer)
        return self._keys[layer], self._values[layer]

    def view(self, layer: int) -> MemoryView:
        """The filled part of ``layer`` as views (no copy), ready for ``fot_kernels`` ops."""
        layer = self._layer(layer)
        num = self.num_slots(layer)
        lengths = self.lengths(layer)
        mask = None
        valid = self._valid[layer][:, :num]
        if num > 0 and not bool(valid.all()):
            mask = valid
        return MemoryView(self._keys[layer][:, :, :num], self._values[layer][:, :, :num], lengths, mask)

    def slots_in_order(self, layer: int, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys ``[Hkv, n, D]``, values and validity ``[n]`` of one row, oldest first (for checks)."""
        layer = self._layer(layer)
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
        """Append n slots to every row of ``layer`` (cast to the store's dtype), evicting the oldest
        slots of a full row (FIFO). Already stored slots are never moved or copied.

        Args:
            keys, values: ``[B, Hkv, n, D]`` (any float dtype, any strides).
            valid: optional bool ``[B, n]``; False marks padding, which attention never sees.
        """
        layer = self._layer(layer)
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
        if keys.shape != values.shape:
            raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}")
        n = keys.shape[2]
        if valid is not None:
            if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
                raise TypeError(f"valid must be a bool torch.Tensor or None, got {getattr(valid, 'dtype', type(valid))}")
            if valid.shape != (self.batch_size, n):
                raise ValueError(f"valid must have shape [B, n] = ({self.batch_size}, {n}), got {tuple(valid.shape)}")
        if n == 0 or self.batch_size == 0:
            return
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
                self._write(layer, rows, dst, keys[:, :, lo:hi], values[:, :, lo:hi], None if valid is None else valid[:, lo:hi])
        for row in range(self.batch_size):
            heads[row] = (heads[row] + n) % self.capacity
            lengths[row] = min(lengths[row] + n, self.capacity)

    def _write(self, layer: int, rows: list[int], dst: int, keys: Tensor, values: Tensor, valid: Tensor | None) -> None:
        n = keys.shape[2]
        kbuf, vbuf, vmask = self._keys[layer], self._values[layer], self._valid[layer]
        if len(rows) == self.batch_size:
            kbuf[:, :, dst : dst + n].copy_(keys)
            vbuf[:, :, dst : dst + n].copy_(values)
            vmask[:, dst : dst + n] = True if valid is None else valid.to(self.device)
            return
        for row in rows:  # rows at different ring positions (after a partial reset)
            kbuf[row, :, dst : dst + n].copy_(keys[row])
            vbuf[row, :, dst : dst + n].copy_(values[row])
            vmask[row, dst : dst + n] = True if valid is None else valid[row].to(self.device)

    def reset(self, rows: Sequence[int] | Tensor | None = None) -> None:
        """Empty the given batch rows (all rows when None) in every layer: a new document."""
        rows = self._rows(rows)
        for layer in self.layers:
            for row in rows:
                self._lengths[layer][row] = 0
                self._heads[layer][row] = 0
            if rows:
                self._valid[layer][rows] = True

    def _rows(self, rows: Sequence[int] | Tensor | None) -> list[int]:
        if rows is None:
            return list(range(self.batch_size))
        if isinstance(rows, Tensor):
            if rows.dtype == torch.bool:
                if rows.shape != (self.batch_size,):
                    raise ValueError(f"a bool rows mask must have shape [B] = ({self.batch_size},), got {tuple(rows.shape)}")
                rows = rows.nonzero().flatten()
            rows = rows.tolist()
        if isinstance(rows, int):
            rows = [rows]
        rows = list(rows)
        for row in rows:
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.batch_size:
                raise ValueError(f"rows must be ints in [0, {self.batch_size}), got {row!r}")
        return rows

    def reorder(self, index: Tensor | Sequence[int]) -> None:
        """Make row i a copy of old row ``index[i]`` (beam search). ``len(index)`` may differ from B:
        the batch size becomes ``len(index)``."""
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise ValueError(f"index values must be in [0, {self.batch_size}), got {index.tolist()}")
        host = index.tolist()
        index = index.to(self.device)
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
        self.reorder(torch.arange(self.batch_size).repeat_interleave(repeats))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> "MemoryStore":
        """Move and/or cast the buffers in place; returns self. Casting to a lower precision
        rounds the stored slots."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else _parse_dtype(dtype, "dtype")
        for layer in self.layers:
            self._keys[layer] = self._keys[layer].to(device=device, dtype=dtype)
            self._values[layer] = self._values[layer].to(device=device, dtype=dtype)
            self._valid[layer] = self._valid[layer].to(device=device)
        self.device, self.dtype = device, dtype
        return self

    # ------------------------------------------------------------------------------------------
    # files
    # ------------------------------------------------------------------------------------------

    def _geometry(self) -> dict:
        return {
            "layers": list(self.layers),
            "batch_size": self.batch_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "capacity": self.capacity,
            "dtype": _dtype_name(self.dtype),
        }

    def _file_tensors(self) -> dict[str, Tensor]:
        tensors = {}
        for layer in self.layers:
            num = self.num_slots(layer)
            tensors[f"keys.{layer}"] = self._keys[layer][:, :, :num].contiguous().cpu()
            tensors[f"values.{layer}"] = self._values[layer][:, :, :num].contiguous().cpu()
            tensors[f"valid.{layer}"] = self._valid[layer][:, :num].contiguous().cpu()
            tensors[f"lengths.{layer}"] = torch.tensor(self._lengths[layer], dtype=torch.int64)
            tensors[f"heads.{layer}"] = torch.tensor(self._heads[layer], dtype=torch.int64)
        return tensors

    def save(self, path: str | os.PathLike) -> None:
        """Write the filled part of the store to a safetensors file (exact, any dtype)."""
        from safetensors.torch import save_file

        tensors = self._file_tensors()
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "geometry": json.dumps(self._geometry()),
            "sha256": _digest(tensors),
        }
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        expect: dict | None = None,
    ) -> "MemoryStore":
        """Read a file written by :meth:`save`.

        Args:
            path: the file.
            device: where to put the buffers.
            expect: optional geometry the file must have, any of ``layers``, ``batch_size``,
                ``num_kv_heads``, ``head_dim``, ``capacity``, ``dtype``; a mismatch raises.

        Raises:
            MemoryFileError: unreadable or corrupt file (bad header, checksum mismatch, missing or
                inconsistent tensors), not a memory file, or a geometry different from ``expect``.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers/truncation
            raise MemoryFileError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        if metadata.get("format") != FORMAT:
            raise MemoryFileError(f"{path}: not a fot-kernels memory file (format tag {metadata.get('format')!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise MemoryFileError(
                f"{path}: memory file format version {metadata.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION!r})"
            )
        try:
            geometry = json.loads(metadata["geometry"])
            store = cls(
                geometry["layers"],
                batch_size=geometry["batch_size"],
                num_kv_heads=geometry["num_kv_heads"],
                head_dim=geometry["head_dim"],
                capacity=geometry["capacity"],
                dtype=geometry["dtype"],
                device="cpu",
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise MemoryFileError(f"{path}: bad geometry in the header ({exc})") from exc
        if _digest(tensors) != metadata.get("sha256"):
            raise MemoryFileError(f"{path}: checksum mismatch, the file is corrupt")
        if expect:
            unknown = set(expect) - set(geometry)
            if unknown:
                raise ValueError(f"expect has unknown fields {sorted(unknown)}; known: {sorted(geometry)}")
            want = dict(expect)
            if "dtype" in want:
                want["dtype"] = _dtype_name(_parse_dtype(want["dtype"], "expect['dtype']"))
            if "layers" in want:
                want["layers"] = list(want["layers"])
            diffs = [f"{k}: file has {geometry[k]!r}, expected {v!r}" for k, v in want.items() if geometry[k] != v]
            if diffs:
                raise MemoryFileError(f"{path}: memory file does not match: " + "; ".join(diffs))
        store._fill_from(tensors, path)
        return store.to(device=device)

    def _fill_from(self, tensors: dict[str, Tensor], path: str) -> None:
        expected = {f"{kind}.{layer}" for layer in self.layers for kind in ("keys", "values", "valid", "lengths", "heads")}
        if set(tensors) != expected:
            raise MemoryFileError(
                f"{path}: tensors {sorted(set(tensors) ^ expected)} are missing or unexpected for layers {list(self.layers)}"
            )
        batch, heads, dim = self.batch_size, self.num_kv_heads, self.head_dim
        for layer in self.layers:
            lengths, ring = tensors[f"lengths.{layer}"], tensors[f"heads.{layer}"]
            if lengths.dtype != torch.int64 or lengths.shape != (batch,) or ring.dtype != torch.int64 or ring.shape != (batch,):
                raise MemoryFileError(f"{path}: lengths/heads of layer {layer} must be int64 [{batch}]")
            num = int(lengths.max()) if batch else 0
            if batch and (int(lengths.min()) < 0 or num > self.capacity or int(ring.min()) < 0 or int(ring.max()) >= self.capacity):
                raise MemoryFileError(f"{path}: lengths/heads of layer {layer} out of range for capacity {self.capacity}")
            for kind in ("keys", "values"):
                t = tensors[f"{kind}.{layer}"]
                if t.dtype != self.dtype or tuple(t.shape) != (batch, heads, num, dim):
                    raise MemoryFileError(
                        f"{path}: {kind}.{layer} is {_dtype_name(t.dtype)} {tuple(t.shape)}, expected "
                        f"{_dtype_name(self.dtype)} {(batch, heads, num, dim)}"
                    )
            valid = tensors[f"valid.{layer}"]
            if valid.dtype != torch.bool or tuple(valid.shape) != (batch, num):
                raise MemoryFileError(f"{path}: valid.{layer} must be bool {(batch, num)}, got {valid.dtype} {tuple(valid.shape)}")
            self._keys[layer][:, :, :num].copy_(tensors[f"keys.{layer}"])
            self._values[layer][:, :, :num].copy_(tensors[f"values.{layer}"])
            self._valid[layer][:, :num].copy_(valid)
            self._lengths[layer] = lengths.tolist()
            self._heads[layer] = ring.tolist()


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{_dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


__all__ = ["MemoryFileError", "MemoryStore", "MemoryView"]
