"""Feed a long synthetic document through a tiny random Llama with FoT memory.

(a) A planted fact is found through a memory layer's attention: the document holds a "needle"
    token once, followed by its "value" token. After the whole document is in memory, the needle
    token is presented again; the memory layer's query for it scores the memory with
    ``fot_kernels.knn_topk`` and attends with ``knn_attention``, and the best slot is the planted one,
    whose successor in the document is the value. (The model is random, so layer 0 is given
    ``q_proj = k_proj`` to make a token's query match its own key: a hand-built retrieval head.)
(b) Throughput and peak memory of the prefill with dense and kNN memory.

    python examples/long_document.py [--tokens 8192]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fot_kernels as fk
from fot_kernels.integrations.transformers import disable_memory, enable_memory
from fot_kernels.testing import peak_memory

NEEDLE, VALUE = 5, 7


def build(window: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=window, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight.data.mul_(8.0)  # a sharp retrieval head: a token's query equals its own key
    attn.q_proj.weight.data.copy_(attn.k_proj.weight.data)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--topk", type=int, default=32)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(1)
    doc = torch.randint(10, 1000, (1, args.tokens), generator=g)
    where = args.tokens // 3
    doc[0, where], doc[0, where + 1] = NEEDLE, VALUE
    model = build(args.window)
    print(f"document: {args.tokens} tokens, needle at position {where}, window {args.window}, memory layers [0, 2]")

    for topk in (None, args.topk):
        enable_memory(model, [0, 2], topk=topk, capacity=args.tokens, window=args.window, mem_dtype="bfloat16")
        try:
            report(model, doc, topk, where)
        finally:
            disable_memory(model)


def report(model: LlamaForCausalLM, doc: torch.Tensor, topk: int | None, where: int) -> None:
    """Prefill ``doc`` into memory, then look the needle up in memory layer 0."""
    tokens = doc.shape[1]
    cache = model.fot_memory.new_cache()
    start = time.perf_counter()
    with torch.no_grad():
        _, peak = peak_memory(lambda: model(doc, cache=cache, use_cache=False, logits_to_keep=1))
    seconds = time.perf_counter() - start
    mode = "dense" if topk is None else f"kNN k={topk}"
    print(
        f"\n[{mode}] prefill: {tokens / seconds:,.0f} tokens/s ({seconds:.2f} s), "
        f"peak RSS growth {peak / 2**20:.1f} MiB, "
        f"memory per layer {cache.memory.num_slots(0)} slots in {cache.memory.dtype}"
    )

    # (a) the needle's query in memory layer 0, at local position 0 (a fresh local context)
    with torch.no_grad():
        layer = model.model.layers[0]
        hidden = layer.input_layernorm(model.model.embed_tokens(torch.tensor([[NEEDLE]])))
        query = layer.self_attn.q_proj(hidden).view(1, 1, 4, -1).transpose(1, 2)  # [1, H, 1, D]
        view = cache.memory.view(0)
        scores, slots = fk.knn_topk(query, view.keys, 3, mem_lengths=view.lengths)
        _, lse = fk.knn_attention(query, view.keys, view.values, topk=topk, mem_lengths=view.lengths)
    scale = 1 / math.sqrt(query.shape[-1])
    weight = torch.exp(scores[..., 0] * scale - lse)  # attention weight of the best slot, per head
    best = slots[0, :, 0, 0]
    found = int(best.mode().values)
    weights = ", ".join(f"{w:.2f}" for w in weight.flatten().tolist())
    print(f"  memory layer 0, needle query: best slot per head {best.tolist()} (attention weight {weights})")
    following = int(doc[0, found + 1])
    verdict = "OK" if found == where and following == VALUE else "MISSED"
    print(
        f"  planted fact retrieved: slot {found} -> document position {found}, next token {following} "
        f"(planted value {VALUE}) -> {verdict}"
    )
    with torch.no_grad():  # and the model itself runs the same query through all layers
        logits = model(torch.tensor([[NEEDLE]]), cache=cache).logits
    finite = bool(torch.isfinite(logits).all())
    print(f"  model step on the needle token with memory: logits {tuple(logits.shape)}, finite {finite}")


if __name__ == "__main__":
    main()
