"""Fine-tune a tiny Llama with FoT's CrossBatch training on synthetic text, on the CPU, in minutes.

    python examples/train_crossbatch.py --steps 200
    python examples/train_crossbatch.py --steps 30 --output-dir /tmp/cb    # a quick check

What it does:

1. makes synthetic documents: each repeats a random motif of 6..40 tokens with 10% of the tokens
   replaced at random, so that once a motif has been seen, later occurrences are predictable: from
   the local context when it is short, and only from the previous chunks of the same document
   (the memory) when it is longer than what a row holds;
2. packs them with FoT's document-aware K-packing batcher (:class:`fot_kernels.training.KPackingDataset`,
   ``packing`` consecutive rows per document stream, ``eos`` ``bos`` between documents);
3. builds a small random ``LlamaForCausalLM`` and puts it in CrossBatch training mode
   (:func:`fot_kernels.integrations.transformers.enable_crossbatch`): its memory layers attend to
   the previous ``--cross-batch-range`` rows of each batch (positives: earlier chunks of the same
   stream; negatives: other streams), with gradients through them;
4. trains with AdamW, printing the loss (a tqdm bar when tqdm is installed), then compares the
   held-out loss with and without the cross-batch memory, writes the loss curve (PNG, when
   matplotlib is installed), and saves the checkpoint (``save_pretrained``, after
   ``disable_crossbatch``: a stock Llama checkpoint);
5. reloads nothing and converts nothing: the same model runs LongLLaMA memory inference
   (``enable_memory`` with the same memory layers) on a long prompt and generates a few tokens.

No dependency beyond the package's own (torch, transformers); tqdm and matplotlib are optional.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from fot_kernels.integrations.transformers import disable_crossbatch, enable_crossbatch, enable_memory
from fot_kernels.training import KPackingDataset

PAD, BOS, EOS = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (B)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per row (L)")
    p.add_argument("--packing", type=int, default=4, help="consecutive rows per document stream (k)")
    p.add_argument("--cross-batch-range", type=int, default=3, help="previous rows each row sees (d)")
    p.add_argument("--stepping", action="store_true", help="FoT's cross_batch_stepping")
    p.add_argument("--memory-layers", type=int, nargs="+", default=[2], help="decoder layers with CrossBatch")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--vocab", type=int, default=96, help="vocabulary size")
    p.add_argument("--documents", type=int, default=4000, help="synthetic training documents")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps (at most steps / 10)")
    p.add_argument("--log-every", type=int, default=10, help="log the mean loss every N steps")
    p.add_argument("--no-tqdm", action="store_true", help="plain progress lines even when tqdm is installed")
    p.add_argument("--backend", default="auto", help="crossbatch_attention backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--output-dir", default=os.path.join(tempfile.gettempdir(), "fot_train_crossbatch"),
        help="where the loss log, loss curve and checkpoint go",
    )  # fmt: skip
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "packing", "cross_batch_range", "layers", "documents"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size % args.packing:
        p.error(f"--batch-size ({args.batch_size}) must be a multiple of --packing ({args.packing})")
    if args.vocab < 8:
        p.error("--vocab must be >= 8")
    return args


def synthetic_documents(count: int, vocab: int, seed: int, min_len: int, max_len: int) -> list[torch.Tensor]:
    """Documents that repeat a motif of 6..40 tokens with 10% of the tokens replaced; tokens are drawn
    from a Zipf-like distribution (learnable at once), the repetitions are learnable by copying."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab - 2, dtype=torch.float64) ** 1.1  # over the ids 3 .. vocab-1

    def draw(n: int) -> torch.Tensor:
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        return 3 + torch.multinomial(zipf, n, replacement=True, generator=g)

    docs = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        motif = draw(int(torch.randint(6, 41, (), generator=g)))
        doc = motif.repeat(length // motif.numel() + 1)[:length].clone()
        noise = torch.rand(length, generator=g) < 0.1
        doc[noise] = draw(int(noise.sum()))
        docs.append(doc)
    return docs


class Progress:
    """A tqdm bar when tqdm is installed (and wanted), else plain lines; :meth:`log` prints a line."""

    def __init__(self, total: int, use_tqdm: bool = True) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, desc="train", unit="step") if tqdm is not None and use_tqdm else None
        self.total, self.start = total, time.time()

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def log(self, step: int, mean_loss: float, lr: float) -> None:
        rate = step / max(time.time() - self.start, 1e-9)
        line = f"step {step:5d}/{self.total}  loss {mean_loss:.4f}  lr {lr:.2e}  {rate:.1f} steps/s"
        (self.bar.write if self.bar is not None else print)(line)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def save_curve(losses: list[float], every: int, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss curve PNG (pip install matplotlib)"
    windows = [losses[max(0, i - every + 1) : i + 1] for i in range(len(losses))]
    smooth = [sum(w) / len(w) for w in windows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.3, label="loss")
    ax.plot(range(1, len(losses) + 1), smooth, label=f"mean of {every}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("CrossBatch fine-tuning of a tiny Llama")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"loss curve: {path}"


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    row_tokens = args.packing * args.seq_len
    docs = synthetic_documents(args.documents, args.vocab, args.seed, row_tokens // 2, 3 * row_tokens)
    held_docs = synthetic_documents(200, args.vocab, args.seed + 1, row_tokens // 2, 3 * row_tokens)
    batcher = dict(batch_size=args.batch_size, seq_len=args.seq_len, packing=args.packing, bos_token_id=BOS,
                   eos_token_id=EOS)  # fmt: skip
    train = KPackingDataset(docs, **batcher, shuffle=True, seed=args.seed, repeat=True)
    held_out = list(KPackingDataset(held_docs, **batcher))[:8]

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    state = enable_crossbatch(
        model, args.memory_layers, cross_batch_range=args.cross_batch_range, dataset_packing=args.packing,
        cross_batch_stepping=args.stepping, backend=args.backend,
    )  # fmt: skip
    print(f"model: {params / 1e6:.2f}M parameters, {state}")
    print(f"data: {train}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, min(args.warmup, args.steps // 10))

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        return min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(step / args.steps, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    model.train()
    losses: list[float] = []
    progress = Progress(args.steps, use_tqdm=not args.no_tqdm)
    start = time.time()
    for step, batch in enumerate(DataLoader(train, batch_size=None), start=1):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(losses[-1])
        if step % args.log_every == 0 or step == args.steps:
            window = losses[-args.log_every :]
            progress.log(step, sum(window) / len(window), sched.get_last_lr()[0])
        if step == args.steps:
            break
    progress.close()
    elapsed = time.time() - start
    model.eval()

    with_memory = held_out_loss(model, held_out)
    disable_crossbatch(model)  # a stock Llama again: rows see only their own local context
    local_only = held_out_loss(model, held_out)
    first = sum(losses[: args.log_every]) / len(losses[: args.log_every])
    last = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
    summary = {
        "steps": len(losses),
        "seconds": round(elapsed, 1),
        "train_loss_first": round(first, 4),
        "train_loss_last": round(last, 4),
        "held_out_loss_crossbatch": round(with_memory, 4),
        "held_out_loss_local_only": round(local_only, 4),
        "parameters": params,
        "args": vars(args),
    }
    print(
        f"trained {len(losses)} steps in {elapsed:.0f} s: train loss {first:.3f} -> {last:.3f}; held-out loss "
        f"{with_memory:.3f} with the cross-batch memory, {local_only:.3f} with the local context only"
    )
    with open(os.path.join(args.output_dir, "train_log.json"), "w") as f:
        json.dump({**summary, "losses": [round(x, 5) for x in losses]}, f, indent=1)
    print(save_curve(losses, args.log_every, os.path.join(args.output_dir, "loss_curve.png")))
    checkpoint = os.path.join(args.output_dir, "checkpoint")
    model.save_pretrained(checkpoint)
    print(f"checkpoint: {checkpoint} (a stock LlamaForCausalLM; memory layers {list(state.memory_layers)})")

    # the same weights, no conversion: LongLLaMA memory inference with the trained memory layers
    enable_memory(model, state.memory_layers, capacity=4096, window=args.seq_len, last_context_length=args.seq_len)
    prompt = torch.cat([torch.tensor([BOS]), held_docs[0][: 4 * args.seq_len]])[None]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=16, do_sample=False)
    print(
        f"enable_memory generation after a {prompt.shape[1]}-token prompt: {generated[0, prompt.shape[1] :].tolist()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
