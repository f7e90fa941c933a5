"""Drop-in MemoryAttention module: equals a stock Llama attention without memory, and a plain
PyTorch computation of LongLLaMA's windowed memory attention with memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fot_kernels.memory import MemoryStore
from fot_kernels.nn import MemoryAttention, apply_rope, memory_layer_attention, rope_cos_sin, rope_inv_freq


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
        qw, kw = q[:, :, beg:end], k[:, :, beg:end]
        qw, kw = (t * cos + torch.cat((-t[..., d // 2 :], t[..., : d // 2]), -1) * sin for t in (qw, kw))
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


# ----------------------------------------------------------------------------------------------
# constructor and forward argument checks
# ----------------------------------------------------------------------------------------------

GOOD = dict(hidden_size=32, num_heads=4, num_kv_heads=2, window=8, capacity=16)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"rope_theta": 0.0}, ValueError, r"rope_theta must be a finite float > 0 .* got 0\.0"),
        ({"rope_theta": -1.0}, ValueError, "rope_theta must be a finite float > 0"),
        ({"rope_theta": float("nan")}, ValueError, "rope_theta must be a finite float > 0"),
        ({"rope_theta": float("inf")}, ValueError, "rope_theta must be a finite float > 0"),
        ({"rope_theta": 10**400}, ValueError, "rope_theta must be a finite float > 0"),
        ({"rope_theta": "1e4"}, TypeError, "rope_theta must be a float, got str"),
        ({"rope_theta": True}, TypeError, "rope_theta must be a float, got bool"),
        ({"hidden_size": 0}, ValueError, "hidden_size must be >= 1"),
        ({"hidden_size": 32.0}, TypeError, "hidden_size must be an int, got float"),
        ({"hidden_size": True}, TypeError, "hidden_size must be an int, got bool"),
        ({"num_heads": 0}, ValueError, "num_heads must be >= 1"),
        ({"num_heads": 3, "num_kv_heads": 1}, ValueError, r"head_dim is required when hidden_size \(32\) is not"),
        ({"num_kv_heads": 0}, ValueError, "num_kv_heads must be >= 1"),
        ({"num_kv_heads": 3}, ValueError, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"num_kv_heads": 2.0}, TypeError, "num_kv_heads must be an int"),
        ({"head_dim": 0}, ValueError, "head_dim must be >= 1"),
        ({"head_dim": 7}, ValueError, "head_dim must be even"),
        ({"head_dim": 258}, ValueError, "head_dim must be <= 256"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"window": None}, TypeError, "window must be an int"),
        ({"capacity": 4}, ValueError, r"capacity \(4\) must be >= window \(8\)"),
        ({"topk": 0}, ValueError, "topk must be >= 1"),
        ({"topk": 1.5}, TypeError, "topk must be an int"),
        ({"topk": True}, TypeError, "topk must be an int, got bool"),
        ({"mem_dtype": torch.int8}, TypeError, "mem_dtype"),
        ({"bias": 1}, TypeError, "bias must be a bool, got int"),
        ({"backend": "nope"}, ValueError, r"backend must be 'auto' or one of \[.*'streaming'.*\], got 'nope'"),
        ({"backend": None}, TypeError, "backend must be a str"),
    ],
)
def test_constructor_rejects_every_bad_argument(change, error, match):
    """Regression: rope_theta=0.0 silently gave zeros (NaN rotations), backend="nope" failed only
    at the first forward, topk=True was k=1; now every argument is checked at construction."""
    with pytest.raises(error, match=match):
        MemoryAttention(**{**GOOD, **change})


def test_constructor_accepts_numpy_numbers():
    sizes = dict(window=np.int64(8), capacity=np.int64(16), topk=np.int64(2), rope_theta=np.float32(500.0))
    layer = MemoryAttention(np.int64(32), np.int32(4), np.int64(2), **sizes, backend="reference")
    assert (layer.num_kv_heads, layer.head_dim, layer.topk) == (2, 8, 2) and type(layer.window) is int
    assert layer(torch.randn(1, 9, 32)).shape == (1, 9, 32)


def test_empty_batch_gives_an_empty_output():
    """Regression: B = 0 raised a raw error from deep inside the forward."""
    layer = MemoryAttention(**GOOD)
    x = torch.randn(0, 20, 32)
    assert layer(x).shape == (0, 20, 32)
    assert layer(x, attention_mask=torch.ones(0, 20, dtype=torch.bool)).shape == (0, 20, 32)
    assert layer(torch.randn(2, 20, 32)).shape == (2, 20, 32)  # an empty memory adapts to the next batch


def test_forward_rejects_bad_inputs():
    layer = MemoryAttention(**GOOD)
    with pytest.raises(TypeError, match=r"hidden_states must have the module's dtype \(torch.float32\)"):
        layer(torch.randn(1, 3, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hidden_states must be a torch\.Tensor"):
        layer([[0.0] * 32])
    with pytest.raises(TypeError, match="attention_mask must be a bool or integer tensor"):
        layer(torch.randn(1, 3, 32), attention_mask=torch.ones(1, 3))
    with pytest.raises(TypeError, match="use_cache must be a bool"):
        layer(torch.randn(1, 3, 32), use_cache=1)
    layer(torch.randn(2, 3, 32), use_cache=True)
    with pytest.raises(ValueError, match=r"the input \(batch size 3, on cpu\) does not match .* call reset\(\) first"):
        layer(torch.randn(3, 1, 32), use_cache=True)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        q = torch.randn(1, 4, 3, 8)
        memory_layer_attention(q, q[:, :2], q[:, :2], None, key_padding_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        memory_layer_attention(q, q[:, :2], q[:, :2], None, backend="nope")


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _grads(layer):
    return {name: getattr(layer, name).weight.grad.clone() for name in PROJECTIONS}


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_training_steps_default_backend_match_reference(topk, padded):
    """A few optimizer steps through MemoryAttention with the default backend: every projection
    gets a finite, non-zero gradient equal to the reference backend's, at every step (the memory
    holds earlier windows, so the queries' gradient goes through the memory scores too).

    Regressions: appended keys dragged their graph into the store (a second step failed to
    backward through a freed graph), and a later window's in-place append invalidated the memory
    the previous window's backward needed."""
    torch.manual_seed(0)
    kwargs = dict(hidden_size=48, num_heads=4, num_kv_heads=2, window=8, capacity=64, topk=topk)
    kwargs["mem_dtype"] = torch.float32
    default = MemoryAttention(**kwargs)
    reference = MemoryAttention(**kwargs, backend="reference")
    reference.load_state_dict(default.state_dict())
    x, target = torch.randn(2, 27, 48), torch.randn(2, 27, 48)
    mask = None
    if padded:
        mask = torch.ones(2, 27, dtype=torch.bool)
        mask[1, :5] = False
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (default, reference)]
    for step in range(3):
        grads = []
        for layer, opt in zip((default, reference), optimizers):
            layer.reset()
            opt.zero_grad()
            out = layer(x, mask)
            assert out.requires_grad, "an output detached from the graph"
            ((out - target) ** 2).mean().backward()
            grads.append(_grads(layer))
            opt.step()
        for name in PROJECTIONS:
            got, want = grads[0][name], grads[1][name]
            assert torch.isfinite(got).all() and got.abs().max() > 0, f"step {step}: {name} gradient is 0 or not finite"
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=f"step {step}: {name}")
    for name in PROJECTIONS:
        torch.testing.assert_close(getattr(default, name).weight, getattr(reference, name).weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "streaming", "auto"])
def test_backward_is_unaffected_by_appends_after_the_forward(backend):
    """The memory a window read is what its backward uses, although the next append writes the
    store in place (regression: "modified by an inplace operation", or a gradient computed from
    the overwritten slots)."""
    store = MemoryStore([0], batch_size=1, num_kv_heads=2, head_dim=8, capacity=6, dtype=torch.float32)
    store.append(0, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))  # full: the next append overwrites slots
    frozen = store.view(0).snapshot()
    q = torch.randn(1, 4, 3, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    out = memory_layer_attention(q, k, v, store.view(0), backend=backend)
    store.append(0, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    q_ref = q.detach().clone().requires_grad_()
    ref = memory_layer_attention(q_ref, k, v, frozen, backend="reference")
    (want,) = torch.autograd.grad(ref.square().sum(), q_ref)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
