"""Prefill of a long document into memory with a small random Llama (transformers) on the CPU.

Side by side, on the same model, weights and input, through ``enable_memory``:

- ``fot_kernels``: the memory layers run ``fot_kernels`` ops (dense memory, or kNN top-k);
- ``longllama_torch``: the memory layers run LongLLaMA's released computation in plain PyTorch
  (``LongLlamaAttention`` with ``mem_attention_grouping``; benchmarks/baselines.py): scores against
  local keys and the whole memory materialised per chunk of queries, concatenated, one fp32
  softmax. In kNN mode the baseline selects the top-k from the materialised scores with
  ``torch.topk``.

Everything else (windowing, non-memory layers, MLPs) is the same code, so the difference is the
memory layers' attention; its time is also reported alone (``mem_attn``). Before any timing, the
providers' logits are compared on a short document, and a mismatch marks the rows ``check=FAIL``.

    python benchmarks/bench_hf_prefill.py                 # 64k tokens, dense + kNN (several minutes)
    python benchmarks/bench_hf_prefill.py --tokens 16384  # quicker
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import csv_row, format_table, human_bytes, machine_info, measure, write_csv
from baselines import longllama_attention as longllama

from fot_kernels.integrations.transformers import enable_memory

RESULTS = Path(__file__).resolve().parent / "results"
HEADERS = ["mode", "provider", "tok/s", "total s", "mem-layer attn s", "peak RSS growth", "check"]


def longllama_attention(query, key, value, memory, *, key_padding_mask=None, topk=None, softmax_scale=None,
                        backend=None, query_chunk=256):  # fmt: skip
    """LongLLaMA's memory-layer attention (baselines.longllama_attention: scores materialised per
    chunk of queries), with the signature of ``fot_kernels.nn.memory_layer_attention``."""
    mem_keys = mem_values = mem_valid = None
    if memory is not None and memory.num_slots > 0:
        mem_keys, mem_values = memory.keys, memory.values
        mem_valid = torch.arange(memory.num_slots, device=query.device)[None, :] < memory.lengths[:, None]
        if memory.mask is not None:
            mem_valid = mem_valid & memory.mask
    return longllama(query, key, value, mem_keys, mem_values, scale=softmax_scale, local_valid=key_padding_mask,
                     mem_valid=mem_valid, topk=topk, query_chunk=query_chunk)  # fmt: skip


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.window, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def prepared(args, provider: str, topk: int | None):
    model = build_model(args)
    state = enable_memory(
        model, args.mem_layers, topk=topk, capacity=args.tokens, window=args.window,
        last_context_length=args.last_context_length, mem_dtype=args.mem_dtype,
    )  # fmt: skip
    inner = longllama_attention if provider == "longllama_torch" else state.memory_attention
    spent = [0.0]

    def timed(*a, **k):
        start = time.perf_counter()
        out = inner(*a, **k)
        spent[0] += time.perf_counter() - start
        return out

    state.memory_attention = timed
    return model, spent


def check_providers(args, topk) -> tuple[str, float]:
    """Logits of both providers on a short document (4 windows); 'ok' within fp32 rounding."""
    small = argparse.Namespace(**{**vars(args), "tokens": 4 * 64 + 32, "window": 64, "last_context_length": 32})
    ids = torch.randint(1, args.vocab, (1, small.tokens), generator=torch.Generator().manual_seed(1))
    logits = []
    for provider in ("fot_kernels", "longllama_torch"):
        model, _ = prepared(small, provider, topk)
        with torch.no_grad():
            logits.append(model(ids).logits)
    err = (logits[0] - logits[1]).abs().max().item()
    scale = logits[1].abs().max().item()
    return ("ok" if err <= 1e-4 * max(scale, 1.0) else "FAIL"), err


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--last-context-length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mem-layers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--mem-dtype", default="float32")
    parser.add_argument("--modes", nargs="+", default=["dense", "knn"], choices=["dense", "knn"])
    parser.add_argument("--providers", nargs="+", default=["fot_kernels", "longllama_torch"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--csv", type=Path, default=RESULTS / "hf_prefill.csv")
    args = parser.parse_args(argv)

    info = machine_info(str(torch.get_num_threads()))
    print(f"# {info['device']}, torch {info['torch_version']}, {info['threads']} threads, commit {info['git_commit']}")
    ids = torch.randint(1, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    rows, table = [], []
    for mode in args.modes:
        topk = args.topk if mode == "knn" else None
        check, err = check_providers(args, topk)
        print(f"# {mode}: providers agree on a short document: {check} (max |logit diff| {err:.2e})")
        results = {}
        for provider in args.providers:
            model, spent = prepared(args, provider, topk)

            def run(lap, model=model, spent=spent):
                spent[0] = 0.0
                with torch.no_grad():
                    out = model(ids, logits_to_keep=1)
                lap("mem_attn_marker")
                return spent[0], out.cache.memory.num_slots(args.mem_layers[0])

            m = measure(run, repeats=args.repeats, warmup=0, budget_s=0.0, min_repeats=args.repeats)
            (mem_attn, slots), total = m.result, m.laps["total"].median
            results[provider] = (total, mem_attn)
            keys = ("tokens", "window", "last_context_length", "hidden", "heads", "layers", "mem_layers", "mem_dtype")
            config = {k: getattr(args, k) for k in keys}
            config.update(mode=mode, topk=topk, memory_slots=slots)
            st = m.laps["total"]
            common = dict(kernel="hf_prefill", provider=provider, mode=mode, x_name="tokens", x_value=args.tokens,
                          check=check, samples=st.samples)  # fmt: skip
            rows.append(csv_row(info, config, metric="tokens_per_s", unit="tok/s", median=args.tokens / total,
                                p20=args.tokens / st.p80, p80=args.tokens / st.p20, **common))  # fmt: skip
            rows.append(csv_row(info, config, metric="time", unit="s", median=total, p20=st.p20, p80=st.p80, **common))
            rows.append(csv_row(info, config, metric="mem_attn_time", unit="s", median=mem_attn, **common))
            rows.append(csv_row(info, config, metric="peak_rss_growth", unit="B", median=m.peak_bytes, **common))
            table.append([mode, provider, f"{args.tokens / total:,.0f}", f"{total:.1f}", f"{mem_attn:.1f}",
                          human_bytes(m.peak_bytes), check])  # fmt: skip
            print(format_table(HEADERS, table[-1:]))
        if {"fot_kernels", "longllama_torch"} <= set(results) and check == "ok":
            (t_ours, a_ours), (t_base, a_base) = results["fot_kernels"], results["longllama_torch"]
            table.append([mode, "speedup", f"x{t_base / t_ours:.2f} total", "", f"x{a_base / a_ours:.2f} mem attn",
                          "", ""])  # fmt: skip
    print()
    print(format_table(HEADERS, table))
    write_csv(args.csv, rows)
    print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
