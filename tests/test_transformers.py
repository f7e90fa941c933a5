"""Hugging Face integration: stock Llama, Mistral and Qwen2 models with LongLLaMA memory inference.

The oracle is :class:`LongLlamaReference`, a plain-PyTorch, step-by-step re-implementation of the
released LongLLaMA inference code (``modeling_longllama.py``: ``_handle_long_input``,
``LongLlamaModel.forward``, ``LongLlamaAttention.forward``) running on the stock model's weights:
un-rotated keys in the local cache re-rotated with positions relative to the oldest cached token,
additive float masks clamped at -1e6, memory scores concatenated to the local ones before one fp32
softmax, windows appended to memory after their attention, the local cache moved to memory when
it would exceed the window. Tiny random models only (no downloads).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fot_kernels.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    MemoryCache,
    disable_memory,
    enable_memory,
    load_longllama,
    longllama_config_to_llama,
)
from fot_kernels.testing import assert_close_to_reference  # noqa: E402

WINDOW, LAST = 16, 8


FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    # a sliding window as long as the memory window: served (sliding and causal attention agree)
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v projections with biases
}


def tiny_llama(
    heads: int = 4, kv_heads: int = 2, layers: int = 4, seed: int = 0, head_dim: int = 12, family: str = "llama"
):
    """A tiny random causal LM of ``family`` (default Llama)."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=101, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=WINDOW, initializer_range=0.2, pad_token_id=0, eos_token_id=None, bos_token_id=None,
        **extra,
    )  # fmt: skip
    return model_class(config).eval()


# ----------------------------------------------------------------------------------------------
# the oracle: LongLLaMA's released inference, step by step, in plain PyTorch
# ----------------------------------------------------------------------------------------------


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x, groups):
    return x.repeat_interleave(groups, dim=1)


class LongLlamaReference:
    def __init__(
        self, model, mem_layers, *, window=WINDOW, last_context_length=LAST, mem_dtype=torch.float32, topk=None
    ):
        self.model, self.mem_layers, self.window, self.last = model, set(mem_layers), window, last_context_length
        self.mem_dtype, self.topk = mem_dtype, topk
        self.layers = model.model.layers
        self.past = None  # per layer (un-rotated keys, values, position ids [B, 1, L, 1])
        self.mem = [None] * len(self.layers)  # per layer (keys, values, additive masks [B, 1, M, 1])
        theta = model.config.rope_parameters["rope_theta"]
        dim = self.layers[0].self_attn.head_dim
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    def _rope(self, x, pos):  # pos [B, L]
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        return x * cos + _rotate_half(x) * sin

    def _attention(self, idx, hidden, mask, pos, use_cache):
        attn = self.layers[idx].self_attn
        bsz, q_len, _ = hidden.shape
        d = attn.head_dim
        q = attn.q_proj(hidden).view(bsz, q_len, -1, d).transpose(1, 2)
        k = attn.k_proj(hidden).view(bsz, q_len, -1, d).transpose(1, 2)
        v = attn.v_proj(hidden).view(bsz, q_len, -1, d).transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        pos = pos[:, None, :, None]
        past = None if self.past is None else self.past[idx]
        is_mem = idx in self.mem_layers
        mem = self.mem[idx]
        mem_no_local_cache = is_mem and past is None and not use_cache
        if mem_no_local_cache:  # rotate_as_if_first is the identity
            update = (k.to(self.mem_dtype), v.to(self.mem_dtype), mask[..., -1, :, None])
        if past is not None:
            past_size = past[0].shape[-2]
            k, v, pos = torch.cat([past[0], k], -2), torch.cat([past[1], v], -2), torch.cat([past[2], pos], -2)
            if k.shape[-2] > self.window:
                if is_mem and use_cache:
                    old_mask = mask[..., -1, :, None][:, :, :past_size]
                    drop = (k[:, :, :past_size].to(self.mem_dtype), v[:, :, :past_size].to(self.mem_dtype), old_mask)
                    mem = drop if mem is None else tuple(torch.cat([a, b], -2) for a, b in zip(mem, drop))
                k, v, pos, mask = k[:, :, past_size:], v[:, :, past_size:], pos[:, :, past_size:], mask[..., past_size:]
        new_past = (k, v, pos) if use_cache else None
        rel = (pos - pos.min(dim=-2, keepdim=True)[0]).squeeze(3).squeeze(1)
        q, k = self._rope(q, rel[:, -q_len:]), self._rope(k, rel)
        w = q @ _repeat_kv(k, groups).transpose(2, 3) / math.sqrt(d) + mask
        w = torch.max(w, torch.tensor(-1e6, dtype=w.dtype))
        values = _repeat_kv(v, groups)
        if mem is not None:
            mem_bias = mem[2].squeeze(-1).unsqueeze(-2)
            mw = q @ _repeat_kv(mem[0], groups).transpose(2, 3).to(k.dtype) / math.sqrt(d) + mem_bias
            mw = torch.max(mw, torch.tensor(-1e6, dtype=mw.dtype))
            if self.topk is not None and self.topk < mw.shape[-1]:  # the paper's kNN: keep the k best slots
                keep = torch.zeros_like(mw, dtype=torch.bool).scatter_(-1, mw.topk(self.topk, dim=-1).indices, True)
                mw = mw.masked_fill(~keep, -1e6)
            w = torch.cat([w, mw], -1)
            values = torch.cat([values, _repeat_kv(mem[1], groups).to(v.dtype)], -2)
        probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ values).transpose(1, 2).reshape(bsz, q_len, -1)
        if mem_no_local_cache:
            mem = update if mem is None else tuple(torch.cat([a, b], -2) for a, b in zip(mem, update))
        self.mem[idx] = mem
        return attn.o_proj(out), new_past

    def _model_forward(self, ids, mask2d, pos, use_cache):
        past_len = 0 if self.past is None else self.past[0][0].shape[-2]
        bsz, n = ids.shape
        h = self.model.model.embed_tokens(ids)
        dtype, big = h.dtype, torch.finfo(h.dtype).min
        if mask2d is None:
            mask2d = torch.ones(bsz, past_len + n, dtype=torch.bool)
        mask = (1.0 - mask2d[:, None, None, :].to(dtype)).expand(bsz, 1, n, past_len + n)
        mask = mask.masked_fill(mask.to(torch.bool), big)
        if n > 1:
            causal = torch.full((n, n), big, dtype=dtype).triu(1)
            mask = mask + torch.cat([torch.zeros(n, past_len, dtype=dtype), causal], -1)
        new_past = []
        for idx, layer in enumerate(self.layers):
            a, p = self._attention(idx, layer.input_layernorm(h), mask, pos, use_cache)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_past.append(p)
        self.past = new_past if use_cache else None
        return self.model.model.norm(h)

    @torch.no_grad()
    def forward(self, ids, mask2d=None, pos=None, use_cache=True):
        """_handle_long_input; mask2d covers [local cache | ids] (or more, sliced from the right)."""
        bsz, n = ids.shape
        initial = 0 if self.past is None else self.past[0][0].shape[-2]
        if pos is None:
            if self.past is None:
                start = torch.zeros(bsz, 1, dtype=torch.long)
            else:
                start = self.past[0][2].view(bsz, -1).max(-1)[0].view(bsz, 1) + 1
            pos = torch.arange(n).view(1, n) + start
        if mask2d is not None:
            mask2d = mask2d[:, -(initial + n) :]
        to_mem = max(n - self.last, 0)
        hidden = []
        for beg in range(0, to_mem, self.window):
            end = min(to_mem, beg + self.window)
            m = None
            if mask2d is not None:
                local = 0 if self.past is None else self.past[0][0].shape[-2]
                m = mask2d[:, beg + initial - local : end + initial]
            cached = False if self.past is None else use_cache
            hidden.append(self._model_forward(ids[:, beg:end], m, pos[:, beg:end], cached))
        length = n - to_mem + (0 if self.past is None else self.past[0][0].shape[-2])
        m = None if mask2d is None else mask2d[:, -length:]
        hidden.append(self._model_forward(ids[:, to_mem:], m, pos[:, to_mem:], use_cache))
        return self.model.lm_head(torch.cat(hidden, 1))


def _left_padded(batch=2, length=61, pad=5, vocab=101, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def _hf_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_memory_equals_stock_model(family):
    model = tiny_llama(family=family)
    ids, mask = _left_padded(length=LAST)  # short: nothing reaches memory
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        enable_memory(model, [1, 3], capacity=64, last_context_length=LAST)
        ours = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(ours[valid], stock[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "topk"), [("llama", None), ("llama", 3), ("mistral", None), ("qwen2", 3)])
def test_long_input_matches_longllama_reference(family, topk):
    """Convergence check: logits of the patched model vs LongLLaMA's computation of the same
    windows and joint softmax, at every non-padding position, under the flash-attention rule."""
    model = tiny_llama(family=family)
    ids, mask = _left_padded(length=61, pad=21)  # row 1: a whole first window of padding
    pos = _hf_positions(mask)
    ref_lo = LongLlamaReference(model, [1, 3], topk=topk).forward(ids, mask, pos)
    ref_hi = LongLlamaReference(tiny_llama(family=family).double(), [1, 3], mem_dtype=torch.float64, topk=topk)
    ref_hi = ref_hi.forward(ids, mask, pos)
    enable_memory(model, [1, 3], topk=topk, capacity=128, last_context_length=LAST, mem_dtype=torch.float32)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos)
    valid = mask.bool()
    assert_close_to_reference(out.logits[valid], ref_hi[valid].float(), ref_lo[valid], "logits")
    cache = out.cache
    assert cache.local_length == LAST and cache.seen_tokens == 61
    assert cache.memory.num_slots(1) == 61 - LAST
    padded = ~cache.memory.view(1).mask[1, :21]  # left padding masked in memory too
    assert padded.all()


def test_bf16_memory_matches_reference():
    model = tiny_llama()
    ids = torch.randint(1, 101, (1, 50))
    ref = LongLlamaReference(model, [2], mem_dtype=torch.bfloat16).forward(ids)
    enable_memory(model, [2], capacity=64, last_context_length=LAST, mem_dtype="bfloat16")
    with torch.no_grad():
        out = model(ids)
    assert out.cache.memory.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, ref, atol=2e-3, rtol=2e-3)


def test_knn_with_k_at_least_memory_size_equals_dense():
    ids = torch.randint(1, 101, (2, 45))
    dense, knn = tiny_llama(), tiny_llama()
    enable_memory(dense, [0, 2], capacity=64, last_context_length=LAST)
    enable_memory(knn, [0, 2], topk=64, capacity=64, last_context_length=LAST)
    with torch.no_grad():
        a, b = dense(ids).logits, knn(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_use_cache_false_sends_everything_to_memory():
    model = tiny_llama()
    ids = torch.randint(1, 101, (1, 40))
    ref = LongLlamaReference(model, [1]).forward(ids, use_cache=False)
    enable_memory(model, [1], capacity=64, last_context_length=LAST)
    with torch.no_grad():
        out = model(ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert out.cache.local_length == 0 and out.cache.memory.num_slots(1) == 40


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_step_by_step_reference(family):
    """Prefill + 20 decoding steps: the local cache overflows the window twice, moves to memory,
    and local positions restart at 0; tokens and every step's logits match the reference."""
    model = tiny_llama(family=family)
    ids, mask = _left_padded(length=37, pad=3)
    steps = 20
    ref = LongLlamaReference(model, [1, 3])
    logits = ref.forward(ids, mask, _hf_positions(mask))[:, -1]
    tokens, ref_logits, m = [], [], mask
    for _ in range(steps):
        ref_logits.append(logits)
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(tok)
        m = torch.cat([m, torch.ones_like(tok)], 1)
        logits = ref.forward(tok, m, _hf_positions(m)[:, -1:])[:, -1]
    ref_tokens = torch.cat(tokens, 1)
    enable_memory(model, [1, 3], capacity=128, last_context_length=LAST)
    with torch.no_grad():
        kwargs = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True)
        out = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(out.sequences[:, ids.shape[1] :], ref_tokens)
    for step, (a, b) in enumerate(zip(out.logits, ref_logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_beam_search_and_sampling_run_with_memory():
    model = tiny_llama()
    ids = torch.randint(1, 101, (2, 40))
    enable_memory(model, [1], capacity=128, last_context_length=LAST)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
        beam1 = model.generate(ids, max_new_tokens=12, num_beams=1, do_sample=False)
        beams = model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False, num_return_sequences=2)
        torch.manual_seed(5)
        s1 = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=10)
        torch.manual_seed(5)
        s2 = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=10)
    assert torch.equal(greedy, beam1)
    assert beams.shape == (4, 52)
    assert torch.equal(s1, s2)


def test_beam_reorder_moves_memory_rows():
    model = tiny_llama()
    enable_memory(model, [1], capacity=64, last_context_length=LAST)
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        model(torch.randint(1, 101, (3, 30)), cache=cache)
    keys_before = cache.memory.view(1).keys.clone()
    local_before = cache.layers[1].keys.clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.memory.view(1).keys, keys_before[[2, 2, 0]])
    assert torch.equal(cache.layers[1].keys, local_before[[2, 2, 0]])


def test_reset_between_documents_and_cache_reuse():
    model = tiny_llama()
    enable_memory(model, [1, 2], capacity=64, last_context_length=LAST)
    doc_a, doc_b = torch.randint(1, 101, (1, 45)), torch.randint(1, 101, (1, 38))
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        model(doc_a, cache=cache)
        cache.reset()
        reused = model(doc_b, cache=cache).logits
        fresh = model(doc_b).logits
    assert torch.equal(reused, fresh)


def test_memory_save_load_roundtrip(tmp_path):
    model = tiny_llama()
    enable_memory(model, [1, 3], capacity=64, last_context_length=0)
    doc, question = torch.randint(1, 101, (2, 40)), torch.randint(1, 101, (2, 5))
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        model(doc, cache=cache, use_cache=False)  # everything to memory
        cache.save_memory(tmp_path / "mem.safetensors")
        expected = model(question, cache=cache, use_cache=False).logits
        other = model.fot_memory.new_cache()
        other.load_memory(tmp_path / "mem.safetensors")
        got = model(question, cache=other, use_cache=False).logits
    assert torch.equal(got, expected)


def test_continuation_of_a_cache_with_generate():
    """A document fed with forward, then generate() continuing the same cache (HF convention:
    input_ids hold the whole sequence, the cache's seen tokens are skipped) equals LongLLaMA doing
    the same two calls and then decoding step by step."""
    model = tiny_llama()
    doc, prompt = torch.randint(1, 101, (1, 40)), torch.randint(1, 101, (1, 4))
    ref = LongLlamaReference(model, [1])
    ref.forward(doc)
    logits, tokens = ref.forward(prompt)[:, -1], []
    for _ in range(6):
        tokens.append(logits.argmax(-1, keepdim=True))
        logits = ref.forward(tokens[-1])[:, -1]
    enable_memory(model, [1], capacity=128, last_context_length=LAST)
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        model(doc, cache=cache)
        continued = model.generate(torch.cat([doc, prompt], 1), cache=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(continued[:, 44:], torch.cat(tokens, 1))
    assert cache.seen_tokens == 44 + 5


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_memory_restores_the_stock_model(family):
    model = tiny_llama(family=family)
    ids = torch.randint(1, 101, (1, 40))
    previous = model.config._attn_implementation
    with torch.no_grad():
        stock = model(ids).logits
        enable_memory(model, [1], capacity=64)
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        assert not torch.allclose(model(ids).logits, stock)  # 40 tokens > window: windows + memory
        disable_memory(model)
        again = model(ids).logits
    assert model.config._attn_implementation == previous
    assert "forward" not in vars(model) and not hasattr(model, "fot_memory")
    assert not model.model.layers[1].self_attn.k_proj._forward_hooks
    assert torch.equal(again, stock)
    other = tiny_llama(seed=3, family=family)  # another instance was never touched
    assert other.config._attn_implementation == previous


def test_bad_arguments_raise_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="memory layer index 7 is out of range"):
        enable_memory(model, [1, 7], capacity=64)
    with pytest.raises(ValueError, match=r"capacity \(8\) must be >= window \(16\)"):
        enable_memory(model, [1], capacity=8)
    with pytest.raises(TypeError, match="mem_dtype"):
        enable_memory(model, [1], capacity=64, mem_dtype=torch.int32)
    with pytest.raises(ValueError, match="topk"):
        enable_memory(model, [1], capacity=64, topk=0)
    with pytest.raises(ValueError, match="memory_layers is required"):
        enable_memory(model, capacity=64)
    with pytest.raises(ValueError, match="distinct"):
        enable_memory(model, [1, 1], capacity=64)
    with pytest.raises(ValueError, match="not enabled"):
        disable_memory(model)
    with pytest.raises(TypeError, match="LlamaForCausalLM-like"):
        enable_memory(torch.nn.Linear(2, 2), [0], capacity=64)
    enable_memory(model, [1], capacity=64)
    with pytest.raises(ValueError, match="already enabled"):
        enable_memory(model, [1], capacity=64)
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        model(torch.randint(1, 101, (1, 5)), attention_mask=torch.ones(1, 1, 5, 5))
    with pytest.raises(TypeError, match="MemoryCache"):
        from transformers import DynamicCache

        c = DynamicCache()
        c.update(torch.zeros(1, 2, 3, 12), torch.zeros(1, 2, 3, 12), 0)
        model(torch.randint(1, 101, (1, 5)), cache=c)
    cache = model.fot_memory.new_cache()
    assert isinstance(cache, MemoryCache)


def test_longllama_checkpoint_loads_into_stock_llama(tmp_path):
    """A LongLLaMA-style checkpoint (model_type longllama, mem_layers, last_context_length,
    mem_dtype, per-layer rotary inv_freq buffers) loads into LlamaForCausalLM and runs with memory."""
    from safetensors.torch import save_file

    model = tiny_llama(heads=4, kv_heads=4)
    cfg = model.config.to_dict()
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "initializer_range",
        "pad_token_id",
        "head_dim",
    )
    longllama = {k: cfg[k] for k in fields}
    longllama.update(
        model_type="longllama", architectures=["LongLlamaForCausalLM"], auto_map={"AutoModelForCausalLM": "x.y"},
        mem_layers=[1, 3], last_context_length=LAST, mem_dtype="float32", mem_positionals=True,
        mem_attention_grouping=None, torch_attention=False, tie_word_embeddings=False,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(longllama))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for i in range(4):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_longllama(str(tmp_path), capacity=64)
    assert loaded.fot_memory.memory_layers == (1, 3) and loaded.fot_memory.last_context_length == LAST
    assert loaded.fot_memory.mem_dtype == torch.float32
    ids = torch.randint(1, 101, (1, 50))
    ref = LongLlamaReference(model, [1, 3]).forward(ids)
    with torch.no_grad():
        out = loaded(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(longllama_config_to_llama(longllama), LlamaConfig)


# ----------------------------------------------------------------------------------------------
# argument checks, batch size, gradients, layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "nope"}, ValueError, r"backend must be 'auto' or one of \[.*\], got 'nope'"),
        ({"backend": 3}, TypeError, "backend must be a str"),
        ({"topk": True}, TypeError, "topk must be an int, got bool"),
        ({"topk": 2.0}, TypeError, "topk must be an int, got float"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"capacity": "64"}, TypeError, "capacity must be an int, got str"),
        ({"last_context_length": -1}, ValueError, "last_context_length must be >= 0"),
        ({"memory_layers": [True]}, TypeError, "each entry of memory_layers must be an int, got bool"),
    ],
)
def test_enable_memory_checks_every_argument_before_changing_the_model(kwargs, error, match):
    """Regression: backend="nope" was accepted and failed at the first forward."""
    model = tiny_llama()
    previous = model.config._attn_implementation
    with pytest.raises(error, match=match):
        enable_memory(model, **{"memory_layers": [1], "capacity": 64, **kwargs})
    assert not hasattr(model, "fot_memory") and "forward" not in vars(model)
    assert model.config._attn_implementation == previous


def test_enable_memory_accepts_numpy_ints():
    model = tiny_llama()
    state = enable_memory(model, np.array([1, 3]), topk=np.int64(4), capacity=np.int64(64), window=np.int32(16))
    assert state.memory_layers == (1, 3) and state.topk == 4 and type(state.capacity) is int
    with torch.no_grad():
        assert model(torch.randint(1, 101, (1, 30))).logits.shape == (1, 30, 101)


def test_cache_with_another_batch_size_is_rejected():
    """Regression: a batch-2 MemoryCache used with a batch-4 input was silently repeat-interleaved
    (rows 0, 0, 1, 1 of the old state), which is only right for some beam-search layouts."""
    model = tiny_llama()
    enable_memory(model, [1], capacity=64, last_context_length=LAST)
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        model(torch.randint(1, 101, (2, 30)), cache=cache)
        with pytest.raises(ValueError, match=r"input batch size 4 differs from the MemoryCache's \(2\)"):
            model(torch.randint(1, 101, (4, 3)), cache=cache)
        assert cache.batch_rows == 2 and cache.seen_tokens == 30  # untouched by the rejected call
        cache.batch_repeat_interleave(2)  # explicit, e.g. before beam search
        assert model(torch.randint(1, 101, (4, 3)), cache=cache).logits.shape == (4, 3, 101)
    with pytest.raises(TypeError, match="beam_idx must hold integer row indices, got a bool tensor"):
        cache.reorder_cache(torch.tensor([True, False, True, True]))


def test_a_call_failing_half_way_makes_the_cache_refuse_until_reset():
    """A window that fails after memory layer 1 stored it but before layer 3 did leaves the
    layers disagreeing; the cache must not be used silently afterwards."""
    model = tiny_llama()
    enable_memory(model, [1, 3], capacity=64, last_context_length=LAST)
    cache = model.fot_memory.new_cache()

    def boom(*args):
        raise RuntimeError("boom")

    hook = model.model.layers[3].register_forward_pre_hook(boom)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randint(1, 101, (1, 30)), cache=cache)
        assert cache.memory.num_slots(1) == 16 and cache.memory.num_slots(3) == 0  # the half-way state
        hook.remove()
        with pytest.raises(RuntimeError, match=r"inconsistent: a call failed .*boom.*call cache.reset\(\)"):
            model(torch.randint(1, 101, (1, 30)), cache=cache)
        cache.reset()
        ids = torch.randint(1, 101, (1, 30))
        assert torch.equal(model(ids, cache=cache).logits, model(ids).logits)


def test_memory_cache_checks_its_arguments():
    with pytest.raises(ValueError, match="each entry of memory_layers must be <= 3"):
        MemoryCache(4, [1, 4], window=16, capacity=64, mem_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"capacity \(8\) must be >= window \(16\)"):
        MemoryCache(4, [1], window=16, capacity=8, mem_dtype=torch.float32)
    with pytest.raises(TypeError, match="mem_dtype"):
        MemoryCache(4, [1], window=16, capacity=64, mem_dtype="int8")
    cache = MemoryCache(4, [1], window=16, capacity=64, mem_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="only usable through a model prepared by enable_memory"):
        cache.update(torch.zeros(1, 2, 3, 12), torch.zeros(1, 2, 3, 12), 0)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("topk", [None, 3])
def test_training_steps_through_memory_layers_match_reference_backend(topk):
    """A few optimizer steps of a tiny Llama with memory (windows -> memory, then the local part),
    default backend vs backend="reference": every projection of every memory layer gets a finite,
    non-zero gradient equal to the reference's, at every step; the output is never detached."""
    ids, mask = _left_padded(length=45, pad=6)
    models = [tiny_llama(), tiny_llama()]  # same seed: same weights
    settings = dict(topk=topk, capacity=128, last_context_length=LAST, mem_dtype=torch.float32)
    enable_memory(models[0], [1, 3], **settings)
    enable_memory(models[1], [1, 3], **settings, backend="reference")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for step in range(3):
        grads = []
        for model, opt in zip(models, optimizers):
            model.train()
            opt.zero_grad()
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            assert out.loss.requires_grad
            out.loss.backward()
            attns = {i: model.model.layers[i].self_attn for i in (1, 3)}
            grads.append({(i, p): getattr(attns[i], p).weight.grad.clone() for i in attns for p in PROJECTIONS})
            opt.step()
        for key, got in grads[0].items():
            assert torch.isfinite(got).all() and got.abs().max() > 0, f"step {step}: {key} gradient is 0 or not finite"
            torch.testing.assert_close(got, grads[1][key], atol=1e-6, rtol=1e-4, msg=f"step {step}: layer {key}")


def test_layout_public_names_and_no_private_access_between_modules():
    """The integration is a package by concern; every public name is importable from the package;
    no module reaches into another object's private state (``obj._x`` with obj not ``self``); the
    memory layers go through the public ops (no backend imported)."""
    import ast
    import importlib
    import pathlib

    import fot_kernels.integrations.transformers as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None
    modules = {"cache", "attention", "forward", "enable", "longllama"}
    assert modules <= {p.stem for p in pathlib.Path(pkg.__file__).parent.glob("*.py")}
    assert importlib.import_module(f"{pkg.__name__}.cache").MemoryCache is MemoryCache
    allowed = {"_attn_implementation"}  # transformers' own config field, read to restore it
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                assert owner in ("self", "cls") or node.attr in allowed, f"{path.name}:{node.lineno} reads .{node.attr}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("backends" in n for n in names), f"{path.name}:{node.lineno} imports a backend"
