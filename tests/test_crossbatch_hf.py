"""Hugging Face CrossBatch training mode (``enable_crossbatch``) on tiny random Llama, Mistral and Qwen2.

The oracle is :func:`oracle_forward`, a plain-PyTorch, layer-by-layer re-implementation of a
decoder whose memory layers attend as FoT's CrossBatch does (docs/DESIGN.md 3.5): own visibility
rule, gathered contexts, un-rotated memory keys, one softmax over ``[local causal | memory]``; it
calls the model's own projections, norms and MLPs but no fot_kernels code. It runs in float64 on a
float64 copy of the model (the high reference) and in float32 on the model itself (the low one), so
the integration's losses and gradients are judged by the flash-attention tolerance rule.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", minversion="5.0")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fot_kernels.integrations.transformers import (  # noqa: E402
    CROSSBATCH_IMPLEMENTATION,
    disable_crossbatch,
    disable_memory,
    enable_crossbatch,
    enable_memory,
)
from fot_kernels.integrations.transformers.crossbatch import crossbatch_attention_function  # noqa: E402
from fot_kernels.testing import assert_close_to_reference  # noqa: E402
from fot_kernels.training import KPackingDataset, collate_steps  # noqa: E402

VOCAB = 101
FAMILIES = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny(family: str = "llama", *, layers: int = 3, seed: int = 0, **overrides):
    """A tiny random model of ``family``: hidden 48, 4 query heads / 2 kv heads (GQA), head_dim 12."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
        eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    common.update(overrides)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**{"sliding_window": None, **common})).eval()
    if family == "qwen2":  # q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(family)


# ----------------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------------


def _rope(x, theta):
    """HF's default RoPE at positions 0..L-1 (angles in float32, as transformers computes them)."""
    dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def visible_rows(batch, d, packing, stepping):
    """Row b's memory rows, by DESIGN 3.5 written out."""
    rows = []
    for b in range(batch):
        pack = d + 1
        if packing > 1 and stepping:
            pack = min((b % packing) * math.ceil((d + 1) / max(packing - 1, 1)) + 1, d + 1)
        rows.append([b - c for c in range(1, min(pack, b + 1))])
    return rows


def _attend(q, k, v, mem_k, mem_v, valid, scale):
    """One row: q [H, L, D], k/v [Hkv, L, D], mem_k/mem_v [Hkv, M, D], valid [L] bool; one softmax."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    mem_k, mem_v = mem_k.repeat_interleave(groups, 0), mem_v.repeat_interleave(groups, 0)
    length = q.shape[1]
    local = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[None, :]
    local = local.masked_fill(~allowed, -math.inf)
    scores = torch.cat([local, (q @ mem_k.transpose(-1, -2)) * scale], -1)
    probs = torch.softmax(scores, -1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32).to(q.dtype)
    probs = torch.nan_to_num(probs)  # a row with nothing visible gets 0
    return probs @ torch.cat([v, mem_v], 1)


def oracle_forward(model, ids, mask, memory_layers, d, packing=1, stepping=False):
    """Logits [B, L, V] of ``model`` with CrossBatch memory layers, computed step by step."""
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    batch, length = ids.shape
    valid = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
    rows = visible_rows(batch, d, packing, stepping)
    h = model.model.embed_tokens(ids)
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        dim = attn.head_dim
        q = attn.q_proj(x).view(batch, length, -1, dim).transpose(1, 2)
        k_plain = attn.k_proj(x).view(batch, length, -1, dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, dim).transpose(1, 2)
        q, k = _rope(q, theta), _rope(k_plain, theta)
        outs = []
        for b in range(batch):
            mem = rows[b] if idx in memory_layers else []
            mem_k = torch.cat([k_plain[r] for r in mem], 1) if mem else k_plain[b, :, :0]
            mem_v = torch.cat([v[r] for r in mem], 1) if mem else v[b, :, :0]
            outs.append(_attend(q[b], k[b], v[b], mem_k, mem_v, valid[b], dim**-0.5))
        out = torch.stack(outs).transpose(1, 2).reshape(batch, length, -1)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


def hf_loss(logits, labels):
    """transformers' causal-LM loss (position i scored against labels[i + 1]), in the logits' dtype."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _grads(model, memory_layers):
    out = {}
    for i in memory_layers:
        attn = model.model.layers[i].self_attn
        for p in PROJECTIONS:
            out[(i, p, "weight")] = getattr(attn, p).weight.grad.detach().clone()
            if getattr(attn, p).bias is not None:
                out[(i, p, "bias")] = getattr(attn, p).bias.grad.detach().clone()
    return out


def _batch(batch=4, length=11, seed=1, pad_row=2, pad=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_row is not None:  # right padding (training batches): masked locally, and its labels ignored
        mask[pad_row, length - pad :] = 0
        ids[pad_row, length - pad :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "packing", "stepping"),
    [("llama", 1, False), ("llama", 2, True), ("mistral", 2, False), ("qwen2", 4, True)],
)
def test_loss_and_gradients_match_the_oracle(family, packing, stepping):
    """Loss and every q/k/v/o gradient of the memory layers: default backend (float32) vs the
    float64 oracle under the tolerance rule; backend="reference" on the float64 model vs the same
    oracle (the plumbing: un-rotated mem_keys, rotated local keys, padding, packing, stepping)."""
    layers, d = (1, 2), 3
    ids, mask, labels = _batch(batch=8 if packing == 4 else 4)
    model = tiny(family)
    hi_model = tiny(family).double()
    with torch.no_grad():
        stock = model(ids, attention_mask=mask, labels=labels).loss

    lo_loss = hf_loss(oracle_forward(model, ids, mask, layers, d, packing, stepping), labels)
    lo_loss.backward()
    lo_grads = _grads(model, layers)
    model.zero_grad()
    hi_loss = hf_loss(oracle_forward(hi_model, ids, mask, layers, d, packing, stepping), labels)
    hi_loss.backward()
    hi_grads = _grads(hi_model, layers)
    hi_model.zero_grad()

    enable_crossbatch(model, layers, cross_batch_range=d, dataset_packing=packing, cross_batch_stepping=stepping)
    model.train()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close_to_reference(out.loss.detach(), hi_loss.detach(), lo_loss.detach(), "loss")
    assert abs(out.loss.item() - stock.item()) > 1e-4  # the memory changes the loss (the test can fail)
    for key, got in _grads(model, layers).items():
        assert torch.isfinite(got).all() and got.abs().max() > 0, f"{key}: gradient is 0 or not finite"
        assert_close_to_reference(got, hi_grads[key], lo_grads[key], f"grad {key}")

    enable_crossbatch(
        hi_model, layers, cross_batch_range=d, dataset_packing=packing, cross_batch_stepping=stepping,
        backend="reference",
    )  # fmt: skip
    ref = hi_model(ids, attention_mask=mask, labels=labels)  # transformers' loss is computed in float32
    torch.testing.assert_close(ref.loss, hi_loss.float(), atol=1e-6, rtol=1e-6)
    ref_loss = hf_loss(ref.logits, labels)
    ref_loss.backward()
    # float64 up to the non-memory layers' padded local attention (fot_kernels.nn.local_attention),
    # which computes in fp32: a few 1e-7, where a plumbing error would be 1e-2
    torch.testing.assert_close(ref_loss, hi_loss, atol=1e-6, rtol=1e-6)
    for key, got in _grads(hi_model, layers).items():
        torch.testing.assert_close(got, hi_grads[key], atol=1e-6, rtol=1e-5, msg=f"reference backend {key}")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_one_row_equals_the_stock_model(family):
    """B = 1: no other row to see, only the local context: the stock model's loss and gradients."""
    ids, mask, labels = _batch(batch=1, pad_row=0)
    stock, model = tiny(family).train(), tiny(family).train()
    ref = stock(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    enable_crossbatch(model, [0, 2], cross_batch_range=4)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_information_leak_from_later_rows():
    """Changing row 2 changes no earlier row's logits nor their gradients' sources; it changes row 3."""
    model = tiny()
    enable_crossbatch(model, [1], cross_batch_range=3)
    ids, _, _ = _batch(pad_row=None)
    other = ids.clone()
    other[2] = torch.randint(1, VOCAB, (ids.shape[1],), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    assert torch.equal(a[:2], b[:2])
    assert not torch.allclose(a[3], b[3])


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Every decoder layer checkpointed, memory layers included: the k_proj hooks fire again in
    the recomputation and hand the same un-rotated keys to the same attention."""
    ids, mask, labels = _batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        enable_crossbatch(model, [1, 2], cross_batch_range=2, dataset_packing=2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-7, rtol=1e-6, msg=name)


def test_bf16_autocast_on_the_cpu():
    ids, mask, labels = _batch()
    model = tiny()
    enable_crossbatch(model, [1], cross_batch_range=2)
    model.train()
    with torch.no_grad():
        fp32 = model(ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.05
    for key, g in _grads(model, [1]).items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0, key


def test_batcher_targets_give_fots_loss_over_every_position():
    """model(**step) with the KPackingDataset's shift_labels scores all B * L positions."""
    docs = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 7, 19, 44, 12)]
    step = next(iter(KPackingDataset(docs, batch_size=4, seq_len=9, packing=2, bos_token_id=1, eos_token_id=2)))
    model = tiny()
    enable_crossbatch(model, [1], cross_batch_range=2, dataset_packing=2)
    with torch.no_grad():
        out = model(**step)
        expected = F.cross_entropy(out.logits.flatten(0, 1), step["shift_labels"].flatten())
        plain = model(input_ids=step["input_ids"], labels=step["labels"]).loss
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(plain, hf_loss(out.logits, step["labels"]))


def test_trainer_runs_two_steps(tmp_path):
    pytest.importorskip("accelerate")  # the Trainer needs it (the test extra lists it)
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, VOCAB, (int(n),), generator=g) for n in torch.randint(5, 40, (40,), generator=g)]
    data = KPackingDataset(docs, batch_size=4, seq_len=8, packing=2, bos_token_id=1, eos_token_id=2, repeat=True)
    model = tiny()
    enable_crossbatch(model, [1], cross_batch_range=2, dataset_packing=2)
    before = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate_steps)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(model.model.layers[1].self_attn.k_proj.weight, before)
    assert model.fot_crossbatch.memory_layers == (1,)


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_the_stock_model_bit_for_bit(family):
    model = tiny(family)
    ids, mask, _ = _batch()
    previous = model.config._attn_implementation
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        enable_crossbatch(model, [0, 1], cross_batch_range=2)
        assert model.config._attn_implementation == CROSSBATCH_IMPLEMENTATION
        assert not torch.allclose(model(ids, attention_mask=mask).logits, stock)
        disable_crossbatch(model)
        again = model(ids, attention_mask=mask).logits
    assert torch.equal(again, stock)
    assert model.config._attn_implementation == previous
    assert "forward" not in vars(model) and not hasattr(model, "fot_crossbatch")
    assert not model._forward_pre_hooks
    assert all(not layer.self_attn.k_proj._forward_hooks for layer in model.model.layers)
    with pytest.raises(ValueError, match="not enabled"):
        disable_crossbatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_model_runs_memory_inference_without_conversion(family):
    """enable_crossbatch -> 2 training steps -> disable -> enable_memory with the same layers ->
    generate, which matches the same model with backend="reference"."""
    layers = [1, 2]
    model = tiny(family)
    enable_crossbatch(model, layers, cross_batch_range=2)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids, mask, labels = _batch()
    for _ in range(2):
        opt.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    disable_crossbatch(model)
    model.eval()
    twin = tiny(family)
    twin.load_state_dict(model.state_dict())
    prompt = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    settings = dict(capacity=128, window=16, last_context_length=8)
    enable_memory(model, layers, **settings)
    enable_memory(twin, layers, **settings, backend="reference")
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out, ref = model.generate(prompt, **kwargs), twin.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    disable_memory(model)


def test_settings_can_be_updated_between_steps_and_are_checked():
    model = tiny()
    state = enable_crossbatch(model, [1], cross_batch_range=1)
    ids, _, labels = _batch(pad_row=None)
    with torch.no_grad():
        near = model(ids, labels=labels).loss
        with pytest.raises(ValueError, match="cross_batch_range must be >= 1"):
            state.update(cross_batch_range=0)
        with pytest.raises(TypeError, match="cross_batch_stepping must be a bool"):
            state.update(cross_batch_range=3, cross_batch_stepping=1)
        assert state.cross_batch_range == 1  # nothing changed by a refused update
        assert torch.equal(model(ids, labels=labels).loss, near)
        state.update(cross_batch_range=3)
        far = model(ids, labels=labels).loss
        ref = oracle_forward(tiny(), ids, None, [1], 3)
    assert abs(far.item() - near.item()) > 1e-4
    torch.testing.assert_close(far, hf_loss(ref, labels), atol=1e-5, rtol=1e-5)


def test_the_two_modes_exclude_each_other():
    model = tiny()
    enable_crossbatch(model, [1], cross_batch_range=1)
    with pytest.raises(ValueError, match=r"CrossBatch training mode.*disable_crossbatch"):
        enable_memory(model, [1], capacity=64)
    with pytest.raises(ValueError, match="already enabled"):
        enable_crossbatch(model, [1], cross_batch_range=1)
    disable_crossbatch(model)
    enable_memory(model, [1], capacity=64)
    with pytest.raises(ValueError, match=r"enable_memory\) is active.*disable_memory"):
        enable_crossbatch(model, [1], cross_batch_range=1)
    disable_memory(model)
    enable_crossbatch(model, [1], cross_batch_range=1)


@pytest.mark.parametrize("enable", [enable_crossbatch, enable_memory])
def test_unsupported_models_are_refused(enable):
    kwargs = {"cross_batch_range": 1} if enable is enable_crossbatch else {"capacity": 64}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(TypeError, match=r"serves the model families llama, mistral, qwen2.*GPT2LMHeadModel"):
        enable(gpt2, [0], **kwargs)
    with pytest.raises(TypeError, match="LlamaForCausalLM-like"):
        enable(torch.nn.Linear(2, 2), [0], **kwargs)
    assert gpt2.config._attn_implementation != CROSSBATCH_IMPLEMENTATION


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cross_batch_range": 0}, ValueError, "cross_batch_range must be >= 1"),
        ({"cross_batch_range": 2.0}, TypeError, "cross_batch_range must be an int"),
        ({"dataset_packing": True}, TypeError, "dataset_packing must be an int, got bool"),
        ({"dataset_packing": 0}, ValueError, "dataset_packing must be >= 1"),
        ({"cross_batch_stepping": "yes"}, TypeError, "cross_batch_stepping must be a bool"),
        ({"backend": "nope"}, ValueError, "backend must be 'auto' or one of"),
        ({"memory_layers": [3]}, ValueError, "memory layer index 3 is out of range"),
        ({"memory_layers": [1, 1]}, ValueError, "distinct"),
        ({"memory_layers": None}, ValueError, "memory_layers is required"),
    ],
)
def test_enable_crossbatch_checks_every_argument_before_changing_the_model(kwargs, error, match):
    model = tiny()
    previous = model.config._attn_implementation
    with pytest.raises(error, match=match):
        enable_crossbatch(model, **{"memory_layers": [1], "cross_batch_range": 2, **kwargs})
    assert not hasattr(model, "fot_crossbatch") and model.config._attn_implementation == previous
    assert not model._forward_pre_hooks and not model.model.layers[1].self_attn.k_proj._forward_hooks


def test_what_is_not_served_is_refused():
    model = tiny()
    enable_crossbatch(model, [1], cross_batch_range=2, dataset_packing=2)
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="use_cache=True is not supported"):
        model(ids, use_cache=True)
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="not supported in CrossBatch training mode"):
        model(ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="not supported in CrossBatch training mode"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"position_ids must be None or 0\.\.L-1"):
        model(ids, position_ids=torch.arange(ids.shape[1])[None] + 5)
    with pytest.raises(ValueError, match=r"batch size \(3\) must be a multiple of dataset_packing \(2\)"):
        model(ids[:3])
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(ids, attention_mask=torch.ones(4, 1, 11, 11, dtype=torch.bool))
    assert model(ids, attention_mask=mask, position_ids=torch.arange(11)[None], labels=labels).loss.isfinite()
    q = torch.randn(1, 4, 5, 12)
    with pytest.raises(RuntimeError, match="only runs inside a model prepared by"):
        crossbatch_attention_function(torch.nn.Linear(1, 1), q, q[:, :2], q[:, :2], None, 0.3)

    dropout = tiny(attention_dropout=0.1)
    enable_crossbatch(dropout, [1], cross_batch_range=1)
    dropout.train()
    with pytest.raises(ValueError, match="attention dropout is not supported"):
        dropout(ids)
    dropout.eval()  # no dropout in eval mode
    assert dropout(ids).logits.shape == (4, 11, VOCAB)


def test_mistral_sliding_window_is_served_only_where_it_is_causal():
    ids, _, labels = _batch(pad_row=None)
    short = tiny("mistral", sliding_window=11)  # == L: sliding and causal attention agree
    stock = tiny("mistral", sliding_window=11)
    enable_crossbatch(short, [1], cross_batch_range=1)
    with torch.no_grad():
        torch.testing.assert_close(short(ids[:1], labels=labels[:1]).loss, stock(ids[:1], labels=labels[:1]).loss)
    narrow = tiny("mistral", sliding_window=6)
    enable_crossbatch(narrow, [1], cross_batch_range=1)
    with pytest.raises(ValueError, match=r"sliding_window=6 but attends to 11 local keys"):
        narrow(ids, labels=labels)
    with pytest.raises(ValueError, match=r"sliding_window=6.*window \(16\)"):
        enable_memory(tiny("mistral", sliding_window=6), [1], capacity=64, window=16, last_context_length=4)


def test_the_training_example_runs(tmp_path, capsys):
    """examples/train_crossbatch.py end to end on a few steps (its loss-falling run is in its README)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_crossbatch.py"
    spec = importlib.util.spec_from_file_location("train_crossbatch", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--steps", "6", "--documents", "60", "--hidden", "32", "--layers", "2", "--memory-layers", "1",
            "--log-every", "3", "--no-tqdm", "--output-dir", str(tmp_path)]  # fmt: skip
    assert example.main(argv) == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 6 and len(log["losses"]) == 6 and all(math.isfinite(x) for x in log["losses"])
    assert (tmp_path / "checkpoint" / "config.json").exists()
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "checkpoint"))
    assert loaded.config.num_hidden_layers == 2
    out = capsys.readouterr().out
    assert "enable_memory generation" in out and "step     6/6" in out
    with pytest.raises(SystemExit):
        example.parse_args(["--batch-size", "6", "--packing", "4"])
