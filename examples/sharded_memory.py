"""FoT memory sharded over torchrun ranks: each rank keeps 1/P of the memory, all generate alike.

    torchrun --standalone --nproc-per-node 2 examples/sharded_memory.py [--tokens 4096] [--topk 32] [--check]
    torchrun --standalone --nproc-per-node 2 examples/sharded_memory.py --backend nccl   # one GPU per rank

Every rank builds the same tiny random Llama (seed 0), puts it in memory mode with
``enable_memory(..., process_group=WORLD)``, reads the same long random document (its windows go
to memory: slot g of a layer on rank g mod P) and generates ``--new`` tokens greedily. Each rank
prints how many memory slots it holds (about 1/P of the document); rank 0 prints the tokens.
``--check``: rank 0 then runs the same model with the whole memory in its own process and says
whether the tokens are the same (they are: the sharded ops are exact). ``--save DIR``: each rank
writes its share of the memory to ``DIR/rank<r>.mem`` (``MemoryCache.save_memory``; a cache of
the same rank, world size and capacity loads it back with ``load_memory``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from fot_kernels.integrations.transformers import enable_memory


def build(window: int, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=window, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().to(device)


def generate(model, doc: torch.Tensor, new: int):
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        out = model.generate(doc, cache=cache, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(doc))
    return out[:, doc.shape[1] :], cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="document length")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--topk", type=int, default=32, help="k of kNN memory; 0: dense memory")
    parser.add_argument("--new", type=int, default=16, help="tokens to generate")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--check", action="store_true", help="rank 0: compare with one process holding all memory")
    parser.add_argument("--save", type=Path, help="write each rank's memory to DIR/rank<r>.mem")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # the window (max_position_embeddings) < the document: by design

    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    topk = args.topk or None
    capacity = -(-args.tokens // world) * world  # the global capacity: a multiple of the group's size
    doc = torch.randint(10, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)

    model = build(args.window, device)
    enable_memory(model, [1, 3], topk=topk, capacity=capacity, window=args.window, mem_dtype="bfloat16",
                  process_group=dist.group.WORLD)  # fmt: skip
    started = time.perf_counter()
    tokens, cache = generate(model, doc, args.new)
    seconds = time.perf_counter() - started
    held = int(cache.memory.lengths(1).max())
    print(f"rank {rank}/{world}: holds {held} of the memory slots of layer 1 ({args.tokens}-token document, "
          f"{'dense' if topk is None else f'kNN k={topk}'} memory), {seconds:.2f} s", flush=True)  # fmt: skip
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        cache.save_memory(args.save / f"rank{rank}.mem")
    dist.barrier()
    if rank == 0:
        print(f"generated: {tokens[0].tolist()}")
        if args.check:
            whole = build(args.window, device)
            enable_memory(whole, [1, 3], topk=topk, capacity=capacity, window=args.window, mem_dtype="bfloat16")
            alone, whole_cache = generate(whole, doc, args.new)
            same = torch.equal(alone, tokens)
            print(f"one process with the whole memory ({int(whole_cache.memory.lengths(1).max())} slots): "
                  f"{'the same tokens' if same else 'DIFFERENT tokens: ' + str(alone[0].tolist())}")  # fmt: skip
            if not same:
                raise SystemExit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
