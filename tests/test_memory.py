"""Memory store: append without re-copying, FIFO eviction as a prefix-valid ring, padding mask,
reset/reorder/dtype moves, safetensors round trip and rejection of corrupt or mismatched files."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import struct
import threading

import numpy as np
import pytest
import torch

import fot_kernels as fk
from fot_kernels.backends import reference
from fot_kernels.memory import MemoryFileError, MemoryStore

pytest.importorskip("safetensors")


def store(capacity=10, batch=2, heads=2, dim=6, dtype=torch.float32, layers=(3, 7)):
    return MemoryStore(layers, batch_size=batch, num_kv_heads=heads, head_dim=dim, capacity=capacity, dtype=dtype)


def chunk(n, batch=2, heads=2, dim=6):
    return torch.randn(batch, heads, n, dim), torch.randn(batch, heads, n, dim)


def test_append_is_in_place_and_views_share_storage():
    s = store()
    kbuf, _ = s.buffers(3)
    k1, v1 = chunk(4)
    s.append(3, k1, v1)
    ptr = kbuf.data_ptr()
    k2, v2 = chunk(3)
    s.append(3, k2, v2)
    view = s.view(3)
    assert s.buffers(3)[0].data_ptr() == ptr and view.keys.data_ptr() == ptr  # no reallocation, no copy
    assert torch.equal(view.keys, torch.cat([k1, k2], 2)) and torch.equal(view.values, torch.cat([v1, v2], 2))
    assert view.lengths.tolist() == [7, 7] and view.mask is None
    assert s.num_slots(7) == 0  # layers fill independently


def test_fifo_eviction_keeps_the_newest_slots_and_attention_sees_exactly_them():
    s = store(capacity=10)
    chunks = [chunk(4) for _ in range(4)]  # 16 slots into 10
    for k, v in chunks:
        s.append(3, k, v)
    keys = torch.cat([k for k, _ in chunks], 2)[:, :, -10:]
    values = torch.cat([v for _, v in chunks], 2)[:, :, -10:]
    ok, ov, valid = s.slots_in_order(3, 1)
    assert torch.equal(ok, keys[1]) and torch.equal(ov, values[1]) and valid.all()
    view = s.view(3)
    assert view.lengths.tolist() == [10, 10]
    q = torch.randn(2, 4, 5, 6)
    got = fk.knn_attention(q, view.keys, view.values, topk=None, mem_lengths=view.lengths)[0]
    want = reference.memory_attention(q, None, None, keys, values, topk=None, causal=False, softmax_scale=6**-0.5)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_append_larger_than_capacity_keeps_the_tail():
    s = store(capacity=5)
    k, v = chunk(12)
    s.append(7, k, v)
    assert torch.equal(s.slots_in_order(7, 0)[0], k[0, :, -5:])


def test_padding_mask_and_partial_reset():
    s = store(capacity=8)
    k, v = chunk(5)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, :2] = False  # left padding of row 1
    s.append(3, k, v, valid)
    view = s.view(3)
    assert view.mask is not None and view.mask[1, :2].tolist() == [False, False] and view.mask[0].all()
    s.reset([1])
    assert s.view(3).lengths.tolist() == [5, 0]
    k2, v2 = chunk(2)
    s.append(3, k2, v2)  # rows at different ring positions now
    assert torch.equal(s.slots_in_order(3, 0)[0], torch.cat([k, k2], 2)[0])
    assert torch.equal(s.slots_in_order(3, 1)[0], k2[1])
    assert s.view(3).mask is None  # the padded slots are gone


def test_reorder_repeat_and_dtype_moves():
    s = store()
    k, v = chunk(3)
    s.append(3, k, v)
    s.reorder([1, 1, 0])
    assert s.batch_size == 3 and torch.equal(s.view(3).keys, k[[1, 1, 0]])
    s.repeat_interleave(2)
    assert s.batch_size == 6 and torch.equal(s.view(3).keys, k[[1, 1, 1, 1, 0, 0]])
    s.to(dtype="bfloat16")
    assert s.dtype == torch.bfloat16 and s.view(3).keys.dtype == torch.bfloat16
    torch.testing.assert_close(s.view(3).keys.float(), k[[1, 1, 1, 1, 0, 0]], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_roundtrips_exactly(tmp_path, dtype):
    s = store(capacity=6, dtype=dtype)
    for _ in range(3):  # wraps the ring
        k, v = chunk(4)
        valid = torch.rand(2, 4) > 0.3
        s.append(3, k, v, valid)
    s.append(7, *chunk(2))
    path = tmp_path / "m.safetensors"
    s.save(path)
    t = MemoryStore.load(path, expect={"layers": [3, 7], "capacity": 6, "dtype": dtype})
    for layer in (3, 7):
        a, b = s.view(layer), t.view(layer)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.lengths, b.lengths)
        assert (a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask)
        for row in range(2):
            assert all(torch.equal(x, y) for x, y in zip(s.slots_in_order(layer, row), t.slots_in_order(layer, row)))
    k, v = chunk(1)  # continues with the same ring position
    s.append(3, k, v)
    t.append(3, k, v)
    assert torch.equal(s.view(3).keys, t.view(3).keys)


def test_load_rejects_corrupt_and_mismatched_files(tmp_path):
    s = store()
    s.append(3, *chunk(4))
    path = tmp_path / "m.safetensors"
    s.save(path)
    raw = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    raw2 = bytearray(raw)
    raw2[-3] ^= 0xFF  # a data byte
    flipped.write_bytes(bytes(raw2))
    with pytest.raises(MemoryFileError, match="checksum"):
        MemoryStore.load(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(MemoryFileError, match="not a readable safetensors"):
        MemoryStore.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(MemoryFileError):
        MemoryStore.load(garbage)
    with pytest.raises(MemoryFileError, match="capacity: file has 10, expected 12"):
        MemoryStore.load(path, expect={"capacity": 12})
    with pytest.raises(MemoryFileError, match="dtype"):
        MemoryStore.load(path, expect={"dtype": torch.bfloat16})
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(MemoryFileError, match="not a fot-kernels memory file"):
        MemoryStore.load(other)


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        store(capacity=0)
    with pytest.raises(TypeError, match="dtype"):
        store(dtype=torch.int32)
    with pytest.raises(ValueError, match="distinct"):
        store(layers=(1, 1))
    s = store()
    with pytest.raises(ValueError, match="layer 5 is not a memory layer"):
        s.append(5, *chunk(2))
    with pytest.raises(ValueError, match=r"keys must have shape \[B=2, Hkv=2, n, D=6\]"):
        s.append(3, torch.randn(2, 3, 2, 6), torch.randn(2, 3, 2, 6))
    with pytest.raises(ValueError, match="valid must have shape"):
        s.append(3, *chunk(2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rows values must be in \[0, 2\)"):
        s.reset([5])
    with pytest.raises(ValueError, match=r"index values must be in \[0, 2\)"):
        s.reorder([0, 2])


# ----------------------------------------------------------------------------------------------
# files: checksum over every byte, bounds before allocation, ring state, format version
# ----------------------------------------------------------------------------------------------

_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL"}


def forge(path, tensors, geometry, *, version="2", edit=None):
    """Write a memory file by hand, with a VALID checksum (the documented rule: SHA-256 of the whole
    file with the 64 checksum digits read as zeros), so that only the content checks can reject it.
    ``edit(header)`` may change the header's tensor entries before the file is written."""
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        offsets = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": offsets}
        data += raw
    if edit is not None:
        edit(header)
    header["__metadata__"] = {
        "format": "fot-kernels-memory",
        "format_version": version,
        "geometry": json.dumps(geometry),
        "sha256": "0" * 64,
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    blob = bytearray(struct.pack("<Q", len(text)) + text + data)
    at = blob.index(b"0" * 64)
    blob[at : at + 64] = hashlib.sha256(blob).hexdigest().encode()
    path.write_bytes(bytes(blob))
    return path


def layer_tensors(layer=3, lengths=(4, 4), heads=(4, 4), batch=2, kv=2, dim=6, num=None):
    num = max(lengths) if num is None else num
    return {
        f"keys.{layer}": torch.randn(batch, kv, num, dim),
        f"values.{layer}": torch.randn(batch, kv, num, dim),
        f"valid.{layer}": torch.ones(batch, num, dtype=torch.bool),
        f"lengths.{layer}": torch.tensor(lengths, dtype=torch.int64),
        f"heads.{layer}": torch.tensor(heads, dtype=torch.int64),
    }


GEOMETRY = {"layers": [3], "batch_size": 2, "num_kv_heads": 2, "head_dim": 6, "capacity": 8, "dtype": "float32"}


def test_forged_valid_file_loads(tmp_path):
    """The forging helper is right: a consistent file it writes loads (so the rejections below
    are due to the content alone)."""
    tensors = layer_tensors(lengths=(8, 3), heads=(5, 3))
    s = MemoryStore.load(forge(tmp_path / "ok.safetensors", tensors, GEOMETRY))
    assert s.lengths(3).tolist() == [8, 3] and torch.equal(s.view(3).keys, tensors["keys.3"])


def test_checksum_covers_every_byte_of_the_file(tmp_path):
    """Regression: the SHA-256 covered the tensors only, so a flipped header bit (e.g. capacity 8
    -> 9) loaded silently and later made a never-written slot valid. Now flipping any single bit
    of any byte (size prefix, header, tensors) is rejected."""
    s = store(capacity=8, batch=1, heads=1, dim=2, layers=(3,))
    s.append(3, *chunk(8, batch=1, heads=1, dim=2))  # full: with capacity 9 a never-written slot would be valid
    path = tmp_path / "m.safetensors"
    s.save(path)
    raw = path.read_bytes()
    for at in range(len(raw)):
        bad = bytearray(raw)
        bad[at] ^= 1 << (at % 8)
        (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
        with pytest.raises(MemoryFileError):
            MemoryStore.load(tmp_path / "bad.safetensors")
    digit = raw.index(b'capacity\\": 8') + len(b'capacity\\": ')  # in the JSON-encoded geometry string
    bad = bytearray(raw)
    bad[digit] ^= 1  # "8" -> "9"
    (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
    with pytest.raises(MemoryFileError, match="checksum mismatch"):
        MemoryStore.load(tmp_path / "bad.safetensors")


def test_saved_file_is_a_plain_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    s = store()
    k, v = chunk(3)
    s.append(3, k, v)
    s.save(tmp_path / "m.safetensors")
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["keys.3"], k)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"capacity": 2**40}, "capacity must be <="),
        ({"capacity": 2**29}, "more than max_bytes"),  # 512 GiB: bounded by max_bytes before any allocation
        ({"head_dim": 0}, "head_dim must be >= 1"),
        ({"batch_size": -1}, "batch_size must be >= 0"),
        ({"batch_size": True}, "batch_size must be an int"),
        ({"dtype": "int32"}, "dtype must be one of"),
        ({"layers": [3, 3]}, "distinct"),
        ({"extra": 1}, "exactly the fields"),
    ],
)
def test_geometry_is_checked_against_bounds_before_allocating(tmp_path, monkeypatch, change, match):
    """Regression: a header claiming a huge capacity was allocated before any check (a raw
    allocator error). Nothing may be allocated before the geometry is known to be sane."""
    path = forge(tmp_path / "m.safetensors", layer_tensors(), {**GEOMETRY, **change})

    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated before the file was checked")

    monkeypatch.setattr(torch, "zeros", no_allocation)
    monkeypatch.setattr(torch, "ones", no_allocation)
    with pytest.raises(MemoryFileError, match=match):
        MemoryStore.load(path)


def test_max_bytes_bounds_the_allocation(tmp_path):
    path = forge(tmp_path / "m.safetensors", layer_tensors(), GEOMETRY)
    need = 2 * 8 * (2 * 2 * 6 * 4 + 1)  # B * capacity * (keys + values + valid bit)
    assert MemoryStore.load(path, max_bytes=need).capacity == 8
    with pytest.raises(MemoryFileError, match=f"needs {need} bytes, more than max_bytes"):
        MemoryStore.load(path, max_bytes=need - 1)


@pytest.mark.parametrize(
    ("tensors", "edit", "match"),
    [
        (layer_tensors(lengths=(9, 4), heads=(0, 4)), None, "length 9 and ring head 0, impossible with capacity 8"),
        (layer_tensors(lengths=(4, 4), heads=(4, 1)), None, "row 1 has length 4 and ring head 1"),  # head != length
        (layer_tensors(lengths=(8, 4), heads=(8, 4)), None, "ring head 8"),
        (layer_tensors(lengths=(-1, 4), heads=(0, 4)), None, "length -1"),
        (layer_tensors(lengths=(4, 4), heads=(4, 4), num=5), None, r"keys.3 is float32 \(2, 2, 5, 6\), expected"),
        (layer_tensors(lengths=(4, 4), heads=(4, 4), kv=1), None, "keys.3 is float32"),
        (layer_tensors(lengths=(4,), heads=(4,), batch=1), None, "lengths.3 is int64"),
        ({k: v for k, v in layer_tensors().items() if k != "valid.3"}, None, r"\['valid.3'\] are missing"),
        ({**layer_tensors(), "extra": torch.zeros(1)}, None, r"\['extra'\] are missing or unexpected"),
        (layer_tensors(), lambda h: h["lengths.3"].update(data_offsets=[0, 8]), "gaps"),
        (layer_tensors(), lambda h: h["keys.3"].update(dtype="F16"), "keys.3 is float16"),
        (layer_tensors(), lambda h: h["keys.3"].update(shape="x"), "bad header entry for keys.3"),
    ],
)
def test_file_with_valid_checksum_but_inconsistent_content_is_rejected(tmp_path, tensors, edit, match):
    """Regression: a file with a valid checksum but lengths > capacity, or ring heads that do not
    match the lengths and tensors, loaded."""
    path = forge(tmp_path / "m.safetensors", tensors, GEOMETRY, edit=edit)
    with pytest.raises(MemoryFileError, match=match):
        MemoryStore.load(path)


def test_bool_bytes_other_than_0_and_1_are_rejected(tmp_path):
    tensors = layer_tensors()
    tensors["valid.3"] = tensors["valid.3"].view(torch.uint8).clone()
    tensors["valid.3"][0, 0] = 2
    tensors["valid.3"] = tensors["valid.3"].view(torch.bool)
    with pytest.raises(MemoryFileError, match="bytes other than 0 and 1"):
        MemoryStore.load(forge(tmp_path / "m.safetensors", tensors, GEOMETRY))


def test_old_format_version_is_rejected_with_a_clear_message(tmp_path):
    path = forge(tmp_path / "m.safetensors", layer_tensors(), GEOMETRY, version="1")
    with pytest.raises(MemoryFileError, match=r"format version '1' is not supported .*re-create and re-save"):
        MemoryStore.load(path)


def test_load_argument_checks(tmp_path):
    s = store()
    s.save(tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="expect must be a dict"):
        MemoryStore.load(tmp_path / "m.safetensors", expect=[("capacity", 10)])
    with pytest.raises(ValueError, match="expect has unknown fields"):
        MemoryStore.load(tmp_path / "m.safetensors", expect={"capacityy": 10})
    with pytest.raises(ValueError, match="device must name a torch device, got 'nope'"):
        MemoryStore.load(tmp_path / "m.safetensors", device="nope")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        MemoryStore.load(3)
    with pytest.raises(FileNotFoundError):
        MemoryStore.load(tmp_path / "missing.safetensors")
    empty = MemoryStore([0, 1], batch_size=0, num_kv_heads=1, head_dim=4, capacity=3)
    empty.save(tmp_path / "empty.safetensors")
    assert MemoryStore.load(tmp_path / "empty.safetensors").batch_size == 0


# ----------------------------------------------------------------------------------------------
# saving while another thread appends
# ----------------------------------------------------------------------------------------------


def _append_in_thread(s, layer, keys, values):
    thread = threading.Thread(target=s.append, args=(layer, keys, values), daemon=True)
    thread.start()
    return thread


def test_save_during_a_concurrent_append_writes_a_consistent_snapshot(tmp_path, monkeypatch):
    """Regression: saving while another thread appended wrote a corrupt file (the file referenced
    the live buffers of a full ring, which the append overwrote after the checksum was taken).
    Deterministic: the append runs to completion while save serialises."""
    import safetensors.torch

    s = store(capacity=6, layers=(3,))
    s.append(3, *chunk(6))  # full ring: the filled part is the whole buffer
    before = [t.clone() for t in s.slots_in_order(3, 0)]
    new_k, new_v = chunk(2)
    threads = []

    def serialising(real):
        def wrapper(*args, **kwargs):
            threads.append(_append_in_thread(s, 3, new_k, new_v))
            threads[-1].join(timeout=10)
            assert not threads[-1].is_alive(), "the append did not finish within 10 s"
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(safetensors.torch, "save", serialising(safetensors.torch.save))
    monkeypatch.setattr(safetensors.torch, "save_file", serialising(safetensors.torch.save_file))
    s.save(tmp_path / "m.safetensors")
    monkeypatch.undo()
    assert len(threads) == 1
    loaded = MemoryStore.load(tmp_path / "m.safetensors")  # the state before the append, exactly
    assert all(torch.equal(a, b) for a, b in zip(loaded.slots_in_order(3, 0), before))
    assert torch.equal(s.slots_in_order(3, 0)[0][:, -2:], new_k[0])  # the append itself happened


def test_append_waits_while_save_takes_its_snapshot(tmp_path, monkeypatch):
    """The snapshot is taken under the store's lock: an append started in the middle of it blocks
    until the snapshot is complete (deterministic: the append thread is still blocked after a
    wait, and the file holds the state before it)."""
    from fot_kernels import memory

    s = store(capacity=6)
    s.append(3, *chunk(5))
    s.append(7, *chunk(2))
    before = {layer: s.view(layer).keys.clone() for layer in (3, 7)}
    real_copy, seen = memory._cpu_copy, []

    def copy_and_race(t):
        if not seen:
            seen.append(_append_in_thread(s, 7, *chunk(3)))
            seen[-1].join(timeout=0.2)
            seen.append(seen[0].is_alive())
        return real_copy(t)

    monkeypatch.setattr(memory, "_cpu_copy", copy_and_race)
    s.save(tmp_path / "m.safetensors")
    seen[0].join(timeout=10)
    assert seen[1] is True, "an append ran in the middle of the snapshot"
    assert not seen[0].is_alive() and s.num_slots(7) == 5
    loaded = MemoryStore.load(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded.view(layer).keys, before[layer]) for layer in (3, 7))


def test_concurrent_appends_and_saves_always_give_loadable_consistent_files(tmp_path):
    """Stress, bounded: one thread appends slots whose keys hold their sequence number, the main
    thread saves; every file loads and each row holds consecutive numbers ending at its length."""
    s = MemoryStore([0], batch_size=2, num_kv_heads=1, head_dim=2, capacity=7, dtype=torch.float64)

    def writer():
        for i in range(60):
            s.append(0, torch.full((2, 1, 1, 2), float(i), dtype=torch.float64), torch.zeros(2, 1, 1, 2))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    for i in range(25):
        s.save(tmp_path / f"m{i}.safetensors")
    thread.join(timeout=30)
    assert not thread.is_alive()
    for i in range(25):
        t = MemoryStore.load(tmp_path / f"m{i}.safetensors")
        keys = t.slots_in_order(0, 0)[0][0, :, 0]
        n = keys.numel()
        assert t.num_slots(0) == n and (n == 0 or torch.equal(keys, keys[0] + torch.arange(n, dtype=torch.float64)))


# ----------------------------------------------------------------------------------------------
# argument holes of the other methods
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (torch.tensor([True, False]), TypeError, "index must hold integer row indices, got a bool tensor"),
        (torch.tensor([1.7, 0.2]), TypeError, "index must hold integer row indices, got a float32 tensor"),
        ([1.0, 0.0], TypeError, "index must hold integer row indices, got float"),
        ([True, False], TypeError, "index must hold integer row indices, got bool"),
        (torch.tensor([[0, 1]]), ValueError, "index must be a 1-D tensor"),
        (1, TypeError, "index must be a sequence of ints or a 1-D integer tensor"),
        ([0, -1], ValueError, r"index values must be in \[0, 2\)"),
    ],
)
def test_reorder_rejects_masks_floats_and_out_of_range(index, error, match):
    """Regression: reorder() read a bool mask as indices (True -> row 1) and truncated floats."""
    s = store()
    s.append(3, *chunk(2))
    with pytest.raises(error, match=match):
        s.reorder(index)
    assert s.batch_size == 2


def test_reorder_accepts_numpy_and_int32_indices():
    s = store()
    k, v = chunk(2)
    s.append(3, k, v)
    s.reorder(np.array([1, 0]))
    s.reorder(torch.tensor([1, 1, 0], dtype=torch.int32))
    assert torch.equal(s.view(3).keys, k[[0, 0, 1]])


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        (torch.tensor([0.0]), TypeError, "rows must hold integer row indices, got a float32 tensor"),
        ([0.5], TypeError, "rows must hold integer row indices"),
        (True, TypeError, "rows must be a sequence of ints"),
        ([-1], ValueError, r"rows values must be in \[0, 2\)"),
        (torch.tensor([True]), ValueError, r"a bool rows mask must have shape \[B\] = \(2,\)"),
        (torch.tensor([[0]]), ValueError, "rows must be a 1-D tensor"),
    ],
)
def test_reset_rejects_bad_rows(rows, error, match):
    s = store()
    s.append(3, *chunk(2))
    with pytest.raises(error, match=match):
        s.reset(rows)
    assert s.lengths(3).tolist() == [2, 2]


def test_reset_accepts_an_int_a_mask_and_numpy_ints():
    s = store()
    s.append(3, *chunk(2))
    s.reset(np.int64(1))
    assert s.lengths(3).tolist() == [2, 0]
    s.reset(torch.tensor([True, False]))
    assert s.lengths(3).tolist() == [0, 0]


def test_other_method_holes():
    """Regressions: a bool layer silently meant layer 1, a negative row read the last row, tensors
    on another device were accepted, appended tensors dragged their autograd graph into the
    store, numpy ints were rejected, and a store could not be copied."""
    s = store(layers=(1, 7))
    with pytest.raises(TypeError, match="layer must be an int, got bool"):
        s.append(True, *chunk(2))
    k, v = chunk(2)
    s.append(1, k.requires_grad_(), v)
    assert not s.buffers(1)[0].requires_grad and s.view(1).keys.grad_fn is None
    with pytest.raises(ValueError, match=r"row must be in \[0, 2\)"):
        s.slots_in_order(1, 2)
    with pytest.raises(ValueError, match="row must be >= 0"):
        s.slots_in_order(1, -1)
    with pytest.raises(ValueError, match=r"keys must be on the store's device \(cpu\), got meta"):
        s.append(1, torch.empty(2, 2, 1, 6, device="meta"), torch.empty(2, 2, 1, 6, device="meta"))
    with pytest.raises(ValueError, match=r"valid must be on the store's device \(cpu\), got meta"):
        s.append(1, *chunk(1), torch.ones(2, 1, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="device must name a torch device"):
        s.to("nope")
    with pytest.raises(ValueError, match="head_dim must be <= 256"):
        store(dim=257)
    copied = copy.deepcopy(s)
    copied.append(1, *chunk(1))
    assert copied.num_slots(1) == 3 and s.num_slots(1) == 2
    assert pickle.loads(pickle.dumps(s)).num_slots(1) == 2
    numpy_store = MemoryStore([np.int64(3)], batch_size=np.int32(1), num_kv_heads=np.int64(2), head_dim=6, capacity=4)
    assert numpy_store.layers == (3,) and type(numpy_store.batch_size) is int
