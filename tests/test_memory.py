"""Memory store: append without re-copying, FIFO eviction as a prefix-valid ring, padding mask,
reset/reorder/dtype moves, safetensors round trip and rejection of corrupt or mismatched files."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="rows must be ints"):
        s.reset([5])
    with pytest.raises(ValueError, match="index values"):
        s.reorder([0, 2])
