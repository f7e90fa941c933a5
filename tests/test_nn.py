"""Drop-in MemoryAttention module: equals a stock Llama attention without memory, and a plain
PyTorch computation of LongLLaMA's windowed memory attention with memory."""

from __future__ import annotations

import math

import pytest
import torch

from fot_kernels.nn import MemoryAttention, apply_rope, rope_cos_sin, rope_inv_freq


def naive_layer(layer: MemoryAttention, x, window, use_cache_chunks=None):
    """Windows of `window` tokens; each attends to [itself causally | all earlier windows'
    un-rotated keys] in one fp32 softmax, with positions restarting at 0 per window."""
    batch, length, _ = x.shape
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(batch, length, h, d).transpose(1, 2).double()
    k = layer.k_proj(x).view(batch, length, hkv, d).transpose(1, 2).double()
    v = layer.v_proj(x).view(batch, length, hkv, d).transpose(1, 2).double()
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    inv = rope_inv_freq(d, 10000.0).double()
    outs = []
    for beg in range(0, length, window):
        end = min(beg + window, length)
        pos = torch.arange(end - beg).expand(batch, -1)
        freqs = pos[..., None].double() * inv
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        rot = lambda t: t * cos + torch.cat((-t[..., d // 2 :], t[..., : d // 2]), -1) * sin  # noqa: E731
        qw, kw = rot(q[:, :, beg:end]), rot(k[:, :, beg:end])
        local = (qw @ kw.transpose(-1, -2)) / math.sqrt(d)
        local = local.masked_fill(torch.ones(end - beg, end - beg, dtype=torch.bool).triu(1), float("-inf"))
        mem = (qw @ k[:, :, :beg].transpose(-1, -2)) / math.sqrt(d)
        p = torch.softmax(torch.cat([local, mem], -1), -1)
        outs.append(p @ torch.cat([v[:, :, beg:end], v[:, :, :beg]], 2))
    out = torch.cat(outs, 2).transpose(1, 2).reshape(batch, length, -1)
    return layer.o_proj(out.float())


def test_prefill_matches_naive_windowed_memory_attention():
    layer = MemoryAttention(48, 4, 2, window=16, capacity=64, mem_dtype=torch.float32)
    x = torch.randn(2, 53, 48)
    with torch.no_grad():
        got = layer(x)
        want = naive_layer(layer, x, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.memory.num_slots(0) == 53


def test_knn_k_covering_memory_equals_dense_and_small_k_differs():
    dense = MemoryAttention(32, 2, window=8, capacity=64, mem_dtype=torch.float32)
    knn = MemoryAttention(32, 2, window=8, capacity=64, topk=64, mem_dtype=torch.float32)
    knn.load_state_dict(dense.state_dict())
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(knn(x), dense(x), atol=1e-5, rtol=1e-5)
        small = MemoryAttention(32, 2, window=8, capacity=64, topk=2, mem_dtype=torch.float32)
        small.load_state_dict(dense.state_dict())
        dense.reset()
        assert not torch.allclose(small(x), dense(x))


def test_local_cache_moves_to_memory_before_overflowing_attention():
    """Decoding token by token with use_cache=True: after `window` tokens the local cache moves
    to memory and positions restart, which equals the windowed prefill of the same tokens."""
    layer = MemoryAttention(32, 4, window=8, capacity=64, mem_dtype=torch.float32)
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        prefill = layer(x)
        layer.reset()
        steps = torch.cat([layer(x[:, i : i + 1], use_cache=True) for i in range(20)], 1)
    torch.testing.assert_close(steps, prefill, atol=1e-5, rtol=1e-5)
    assert layer.local_length == 4 and layer.memory.num_slots(0) == 16


def test_from_llama_without_memory_equals_llama_attention():
    transformers = pytest.importorskip("transformers", minversion="5.0")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=32, intermediate_size=8)  # fmt: skip
    config._attn_implementation = "sdpa"
    attn = LlamaAttention(config, 0).eval()
    layer = MemoryAttention.from_llama(attn, config, capacity=64, mem_dtype=torch.float32)
    x = torch.randn(2, 32, 64)
    pos = torch.arange(32).expand(2, -1)
    with torch.no_grad():
        cos, sin = LlamaRotaryEmbedding(config)(x, pos)
        want, _ = attn(x, (cos, sin), attention_mask=None)
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_helpers_match_transformers():
    transformers = pytest.importorskip("transformers", minversion="5.0")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=40, num_attention_heads=2, head_dim=20)
    x = torch.randn(1, 2, 7, 20)
    pos = torch.arange(7)[None]
    cos, sin = LlamaRotaryEmbedding(config)(x, pos)
    mine = rope_cos_sin(rope_inv_freq(20, 10000.0), pos, x.dtype)
    assert torch.equal(mine[0], cos) and torch.equal(mine[1], sin)
    assert torch.equal(apply_rope(x, cos, sin), apply_rotary_pos_emb(x, x, cos, sin)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"capacity \(4\) must be >= window \(8\)"):
        MemoryAttention(32, 2, window=8, capacity=4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MemoryAttention(32, 4, 3, window=8, capacity=8)
    with pytest.raises(TypeError, match="mem_dtype"):
        MemoryAttention(32, 2, window=8, capacity=8, mem_dtype=torch.int8)
    layer = MemoryAttention(32, 2, window=8, capacity=8)
    with pytest.raises(ValueError, match="hidden_states must be"):
        layer(torch.randn(1, 3, 31))
    layer(torch.randn(1, 3, 32), use_cache=True)
    with pytest.raises(ValueError, match="use_cache=False with a non-empty local cache"):
        layer(torch.randn(1, 3, 32))
