"""Dictionary lookup with FoT memory: arXiv 2307.03170 (Focused Transformer) section 5.2 / appendix D
at CPU scale (issue 11, part 5).

Task. Over 64 key/value symbols, a definition record is ``<k> k1 k2 k3 k4 <v> v1 v2 v3 v4`` and a
query record ``<q> k1 k2 k3 k4 <v> v1 v2 v3 v4`` (10 tokens each); the loss and the accuracy are
on v1..v4 of the queries only (labels -100 elsewhere). Chunks of ``CHUNK = 256`` tokens:

    definition chunk: [bos] + 25 definitions + 5 x [pad]        (every definition chunk)
    query chunk:      25 queries + 5 x [pad] + [eos]

- training document (512 tokens) = one definition chunk + one query chunk whose 25 queries are a
  random permutation of that chunk's 25 definitions (keys unique within the document, so a query
  is never answerable from an earlier query of its own chunk);
- evaluation document = ceil(N / 256) definition chunks (N = the memory tokens, keys unique in the
  whole document) + query chunks, each asking 25 distinct definitions drawn uniformly from the
  whole memory. Every query chunk is evaluated as "the last 256 tokens" against the same memory
  (a fresh local context each), so more queries cost no extra memory filling.

The local context is 256 tokens (one chunk), so a query can only be answered through the memory
layer. All data is generated from ``numpy.random.default_rng([seed, step])`` (training) or
``default_rng([seed, N, 1])`` (eval): deterministic, and resuming a run replays the same batches.

Model: a tiny ``LlamaForCausalLM`` (defaults: hidden 128, 2 layers, 8 heads of 32, RoPE theta 1e6,
0.67M parameters, 2.6 MiB of fp32 safetensors) with one memory layer in the upper half (default
``layers // 2``, here layer 1; ``config.mem_layers``, read by ``enable_memory``). Memory keys are
un-rotated and queries rotated, so only the RoPE planes that turn little over a chunk can match
memory: a large theta gives more of them. With 2 layers the lookup is the classic two-step circuit
(layer 0 gathers the key tokens, the memory layer matches and copies); in 4-layer probes the
in-context lookup of the baseline lived in layers 1 and 3, not in the memory layer 2, so it did
not carry over to memory. ``--init-from CKPT`` starts from another run's weights (curriculum
stages: FoT as continued training). ``--device cuda`` runs the same code on a GPU.

Curriculum (``results/dictionary_lookup/train.sh``, the committed runs): from scratch at 256-token
chunks every probe stayed at chance for millions of tokens; at 32-token chunks (3 definitions)
the circuit forms within ~150 steps and carries over to 64, 128 and 256 in a few dozen steps each
(``--stop-acc`` ends a stage once learned).

Training (``train``): the package's CrossBatch training mode
(``fot_kernels.integrations.transformers.enable_crossbatch``) on the memory layer, with
``dataset_packing = 2`` (rows 2s, 2s+1 are the definition and query chunks of document s) and
``cross_batch_stepping=True``: a definition row sees only its own local context, a query row sees
its own document's definitions (row 2s, the positive) and, with d > 1, the d - 1 rows before it
(other documents' chunks: negatives; fewer for the first rows of the batch, which never see later
rows). d = 1 until the training value-token accuracy (mean of the last ``--switch-window`` steps)
reaches ``--switch-acc`` (paper: 98%), or at ``--switch-step`` at the latest, then ``--d-max``
(default B - 1; paper: 128). ``--no-negatives``: d = 1 throughout (the ablation).
``--baseline``: no memory, 512-token context, trains on the whole documents as B/2 rows of 512
(the same tokens per step). ``--crossbatch-impl fallback`` runs ``fot_kernels.crossbatch_attention``
through a local attention function with the same semantics instead (a cross-check, tested equal);
the run's JSON records which one ran.

Evaluation (``eval``), as the paper: a document of N memory tokens of definitions, queries only in
the last 256 tokens, kNN memory attention with k = ``--topk`` (32) through
``enable_memory(topk=32)``, memory in bf16. Filling: ``--fill fast`` (default) computes the memory
layer's keys/values of all definition chunks in large batches with the lower layers only (the
memory layer's keys/values depend on its window alone: the layers below it have no memory, and a
memory window's own attention output is not needed), then hands that store to the memory-enabled
model for the query chunks; ``--fill package`` runs the package's windowed forward over the whole
document (each window also attends to the memory: quadratic, small N only). The test checks that
both give the same predictions. The baseline sees the last 512 tokens (the last definition chunk
and the query chunk). ``--ranks P`` spawns P gloo processes (a file store:
no network) that run the same inputs, each keeping 1/P of the memory (slot g on rank g mod P:
``enable_memory(process_group=...)``, docs/DESIGN.md 7); the JSON then records ``ranks`` and
``peak_rss_per_rank``.

Metric: ``accuracy`` = fraction of queries whose 4 value tokens are all the argmax (over the whole
vocabulary) of the teacher-forced logits (= greedy decoding of the query's values; earlier queries
of the chunk are in context with their correct values). ``token_accuracy`` = fraction of value
tokens. The paper reports accuracy of the values; we take the stricter per-query exact match as
the headline and report both.

Usage::

    python benchmarks/dictionary_lookup.py train --out runs/fot --steps 3000
    python benchmarks/dictionary_lookup.py eval --checkpoint runs/fot --memory-tokens 262144 --json r.json
    python benchmarks/dictionary_lookup.py report --results benchmarks/results/dictionary_lookup
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

# ----------------------------------------------------------------------------------------------
# tokens and data
# ----------------------------------------------------------------------------------------------

PAD, BOS, EOS, KEY, VAL, QRY = 0, 1, 2, 3, 4, 5
NUM_SYMBOLS = 64
SYMBOL0 = 6  # symbol s is token SYMBOL0 + s
VOCAB_SIZE = 72  # 70 used, rounded up
TOKEN_MAP = {"pad": PAD, "bos": BOS, "eos": EOS, "<k>": KEY, "<v>": VAL, "<q>": QRY}
TOKEN_MAP.update({f"s{i}": SYMBOL0 + i for i in range(NUM_SYMBOLS)})
KEY_LEN = VAL_LEN = 4
RECORD = 2 + KEY_LEN + VAL_LEN  # 10
CHUNK = 256
NUM_KEYS = NUM_SYMBOLS**KEY_LEN
IGNORE = -100

VARIANTS = ("fot", "no-negatives", "baseline")


def records_per_chunk(chunk: int = CHUNK) -> int:
    """Records per chunk: one token of each chunk is bos (definitions) or eos (queries)."""
    if chunk < RECORD + 1:
        raise ValueError(f"chunk must be >= {RECORD + 1}, got {chunk}")
    return (chunk - 1) // RECORD


def codes_to_symbols(codes: np.ndarray) -> np.ndarray:
    """Key codes in [0, 64^4) -> [..., 4] symbols (base-64 digits, most significant first)."""
    digits = [(codes // NUM_SYMBOLS**p) % NUM_SYMBOLS for p in range(KEY_LEN - 1, -1, -1)]
    return np.stack(digits, axis=-1)


def unique_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct key codes, uniform, in random order."""
    if n > NUM_KEYS:
        raise ValueError(f"at most {NUM_KEYS} distinct keys, asked for {n}")
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        draw = rng.integers(0, NUM_KEYS, size=int((n - out.size) * 1.05) + 8, dtype=np.int64)
        merged = np.concatenate([out, draw])
        _, first = np.unique(merged, return_index=True)
        out = merged[np.sort(first)]  # keeps the first occurrence, in draw order
    return out[:n]


def _records(marker: int, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[..., n, 4] key symbols and value symbols -> [..., n * 10] tokens."""
    shape = keys.shape[:-1]
    head = np.full((*shape, 1), marker, dtype=np.int64)
    sep = np.full((*shape, 1), VAL, dtype=np.int64)
    rec = np.concatenate([head, keys + SYMBOL0, sep, values + SYMBOL0], axis=-1)
    return rec.reshape(*shape[:-1], shape[-1] * RECORD)


def definition_chunks(keys: np.ndarray, values: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """keys/values [..., n, 4] with n a multiple of records_per_chunk -> [..., n / R, chunk]."""
    r = records_per_chunk(chunk)
    n = keys.shape[-2]
    if n % r:
        raise ValueError(f"the number of definitions ({n}) must be a multiple of {r}")
    lead = keys.shape[:-2]
    recs = _records(KEY, keys.reshape(*lead, n // r, r, KEY_LEN), values.reshape(*lead, n // r, r, VAL_LEN))
    out = np.full((*lead, n // r, chunk), PAD, dtype=np.int64)
    out[..., 0] = BOS
    out[..., 1 : 1 + r * RECORD] = recs
    return out


def query_chunks(keys: np.ndarray, values: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """keys/values [..., R, 4] (R = records_per_chunk) -> tokens, labels [..., chunk]: the labels
    are the value tokens v1..v4 of each query, -100 elsewhere (Hugging Face convention: the model
    shifts them, so the logits at ``<v>``, v1, v2, v3 are scored)."""
    r = records_per_chunk(chunk)
    if keys.shape[-2] != r:
        raise ValueError(f"a query chunk holds {r} queries, got {keys.shape[-2]}")
    lead = keys.shape[:-2]
    out = np.full((*lead, chunk), PAD, dtype=np.int64)
    out[..., : r * RECORD] = _records(QRY, keys, values)
    out[..., chunk - 1] = EOS
    labels = np.full_like(out, IGNORE)
    mask = value_positions(chunk)
    labels[..., mask] = out[..., mask]
    return out, labels


def value_positions(chunk: int = CHUNK) -> np.ndarray:
    """Positions of the value tokens v1..v4 of the queries in a query chunk (sorted)."""
    r = records_per_chunk(chunk)
    base = np.arange(r)[:, None] * RECORD + 2 + KEY_LEN
    return (base + np.arange(VAL_LEN)[None]).reshape(-1)


def training_documents(
    seed: int, step: int, num_docs: int, chunk: int = CHUNK, hard: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The documents of training step ``step``: tokens and labels ``[num_docs, 2 * chunk]``
    (definition chunk, then the query chunk asking each of its definitions once, in random order).

    ``hard`` (hard negatives inside the document): this fraction of each document's keys are
    near-copies of another of its keys, differing in one symbol at a random position, and the
    definitions are shuffled. A query must then tell its key from one that shares 3 of its 4
    symbols, as in a large memory (at 256k memory tokens ~30% of the queries have such a
    distractor; among the ~800 keys a d = 31 training step shows, ~1%). ``hard = 0`` draws
    exactly the data of the plain task."""
    if not 0.0 <= hard < 1.0:
        raise ValueError(f"hard must be in [0, 1), got {hard}")
    rng = np.random.default_rng([seed, step])
    r = records_per_chunk(chunk)
    codes = rng.integers(0, NUM_KEYS, size=(num_docs, r), dtype=np.int64)
    for i in range(num_docs):  # keys unique within a document (a collision is rare: ~r^2 / 2^25)
        while np.unique(codes[i]).size < r:
            codes[i] = unique_codes(rng, r)
    keys = codes_to_symbols(codes)
    n_hard = min(round(hard * r), r - 1)
    for i in range(num_docs if n_hard else 0):
        for t in range(r - n_hard, r):  # key t := an earlier key with one symbol changed, unique
            while True:
                new = keys[i, rng.integers(0, r - n_hard)].copy()
                pos = rng.integers(0, KEY_LEN)
                new[pos] = (new[pos] + rng.integers(1, NUM_SYMBOLS)) % NUM_SYMBOLS
                if not (keys[i, :t] == new).all(-1).any():
                    keys[i, t] = new
                    break
        keys[i] = keys[i, rng.permutation(r)]
    values = rng.integers(0, NUM_SYMBOLS, size=(num_docs, r, VAL_LEN), dtype=np.int64)
    order = rng.permuted(np.tile(np.arange(r), (num_docs, 1)), axis=1)
    defs = definition_chunks(keys, values, chunk)[:, 0]
    qk = np.take_along_axis(keys, order[..., None], axis=1)
    qv = np.take_along_axis(values, order[..., None], axis=1)
    qtok, qlab = query_chunks(qk, qv, chunk)
    tokens = np.concatenate([defs, qtok], axis=1)
    labels = np.concatenate([np.full_like(defs, IGNORE), qlab], axis=1)
    return tokens, labels


def eval_document(seed: int, memory_tokens: int, num_query_chunks: int, chunk: int = CHUNK) -> dict:
    """An evaluation document: ``ceil(memory_tokens / chunk)`` definition chunks (keys unique in
    the whole document) and ``num_query_chunks`` query chunks, each asking ``R`` distinct
    definitions drawn uniformly from all of them. Returns a dict of arrays: ``definitions``
    ``[C, chunk]``, ``queries``/``labels`` ``[Q, chunk]``, ``query_source`` ``[Q, R]`` (the
    definition chunk each query refers to)."""
    if memory_tokens < 1 or num_query_chunks < 1:
        raise ValueError("memory_tokens and num_query_chunks must be >= 1")
    r = records_per_chunk(chunk)
    num_chunks = -(-memory_tokens // chunk)
    n = num_chunks * r
    rng = np.random.default_rng([seed, memory_tokens, 1])
    keys = codes_to_symbols(unique_codes(rng, n))
    values = rng.integers(0, NUM_SYMBOLS, size=(n, VAL_LEN), dtype=np.int64)
    pick = np.stack([rng.choice(n, size=r, replace=False) for _ in range(num_query_chunks)])
    qtok, qlab = query_chunks(keys[pick], values[pick], chunk)
    return {
        "definitions": definition_chunks(keys, values, chunk),
        "queries": qtok,
        "labels": qlab,
        "query_source": pick // r,
    }


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, variant: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.heads % args.kv_heads:
        raise ValueError("--heads must be a multiple of --kv-heads")
    head_dim = getattr(args, "head_dim", None) or args.hidden // args.heads
    rope_theta = float(getattr(args, "rope_theta", 10000.0))
    memory_layer = args.layers // 2 if args.memory_layer is None else args.memory_layer
    if not 0 <= memory_layer < args.layers:
        raise ValueError(f"--memory-layer must be in [0, {args.layers}), got {memory_layer}")
    chunk = args.chunk
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=head_dim, max_position_embeddings=2 * chunk if variant == "baseline" else chunk,
        initializer_range=0.02, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        attn_implementation="sdpa", rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )  # fmt: skip
    if variant != "baseline":
        config.mem_layers = [memory_layer]
        config.last_context_length = chunk
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def init_from(args, variant: str):
    """A model with ``args.init_from``'s weights (e.g. the trained 512-token baseline: FoT as
    continued training of an existing model, like LongLLaMA from OpenLLaMA), set up for
    ``variant`` (memory layer, context = one chunk)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    config = model.config
    memory_layer = config.num_hidden_layers // 2 if args.memory_layer is None else args.memory_layer
    if not 0 <= memory_layer < config.num_hidden_layers:
        raise ValueError(f"--memory-layer must be in [0, {config.num_hidden_layers}), got {memory_layer}")
    config.max_position_embeddings = 2 * args.chunk if variant == "baseline" else args.chunk
    if variant == "baseline":
        for name in ("mem_layers", "last_context_length"):
            if hasattr(config, name):
                delattr(config, name)
    else:
        config.mem_layers = [memory_layer]
        config.last_context_length = args.chunk
    return model


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- CrossBatch: the package's training mode, or the local fallback ---------------------------

_FALLBACK_ATTN = "dictionary_lookup_crossbatch_fallback"


def _fallback_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """FALLBACK (used only while ``enable_crossbatch`` is missing): CrossBatch in the memory layer
    through ``fot_kernels.crossbatch_attention``, causal SDPA elsewhere."""
    from fot_kernels import crossbatch_attention

    state = getattr(module, "_dl_crossbatch", None)
    if state is None:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
    else:
        mem_keys = state["captured"].pop("keys")
        out = crossbatch_attention(
            query, key, value, mem_keys, cross_batch_range=state["d"], dataset_packing=state["packing"],
            cross_batch_stepping=state["stepping"], softmax_scale=scaling,
        )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


class CrossBatch:
    """Turns CrossBatch training on for the memory layers, with ``set_range`` to change d.
    ``impl``: "package" (``enable_crossbatch``), "fallback" (local, marked) or "auto"."""

    def __init__(self, model, memory_layers, packing: int, stepping: bool, impl: str = "auto") -> None:
        if impl == "auto":
            try:
                from fot_kernels.integrations.transformers import enable_crossbatch  # noqa: F401

                impl = "package"
            except ImportError:
                warnings.warn(
                    "fot_kernels.integrations.transformers.enable_crossbatch is not available: using the LOCAL "
                    "FALLBACK (crossbatch_attention through a benchmark-local attention function)",
                    stacklevel=2,
                )
                impl = "fallback"
        if impl not in ("package", "fallback"):
            raise ValueError(f"crossbatch impl must be auto, package or fallback, got {impl!r}")
        self.model, self.memory_layers = model, list(memory_layers)
        self.packing, self.stepping, self.impl = packing, stepping, impl
        self.d: int | None = None
        self._hooks: list = []

    def set_range(self, d: int) -> None:
        if d == self.d:
            return
        if self.d is not None:
            self.disable()
        self.enable(d)

    def enable(self, d: int) -> None:
        if self.impl == "package":
            from fot_kernels.integrations.transformers import enable_crossbatch

            enable_crossbatch(
                self.model, memory_layers=self.memory_layers, cross_batch_range=d, dataset_packing=self.packing,
                cross_batch_stepping=self.stepping,
            )  # fmt: skip
        else:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            AttentionInterface.register(_FALLBACK_ATTN, _fallback_attention)
            AttentionMaskInterface.register(_FALLBACK_ATTN, _no_mask)
            self.model.set_attn_implementation(_FALLBACK_ATTN)
            for idx in self.memory_layers:
                attn = self.model.model.layers[idx].self_attn
                state = {"d": d, "packing": self.packing, "stepping": self.stepping, "captured": {}}
                attn._dl_crossbatch = state

                def hook(_m, _i, out, state=state, head_dim=attn.head_dim):
                    b, n = out.shape[:2]
                    state["captured"]["keys"] = out.view(b, n, -1, head_dim).transpose(1, 2)

                self._hooks.append(attn.k_proj.register_forward_hook(hook))
        self.d = d

    def disable(self) -> None:
        if self.d is None:
            return
        if self.impl == "package":
            from fot_kernels.integrations.transformers import disable_crossbatch

            disable_crossbatch(self.model)
        else:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            for idx in self.memory_layers:
                del self.model.model.layers[idx].self_attn._dl_crossbatch
            self.model.set_attn_implementation("sdpa")
        self.d = None

    @contextlib.contextmanager
    def suspended(self):
        """The stock model inside the block (e.g. to save it), CrossBatch again after."""
        d = self.d
        self.disable()
        try:
            yield
        finally:
            if d is not None:
                self.enable(d)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def value_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """(correct value tokens, value tokens, exactly-correct queries, queries) of a batch; labels
    in the Hugging Face convention (logits at p score labels at p + 1)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    pred = logits[:, :-1].argmax(-1)
    correct = (pred == target)[mask]  # row-major: each query's 4 values are consecutive
    if correct.numel() % VAL_LEN:
        raise RuntimeError("value tokens are not in groups of 4")
    exact = correct.view(-1, VAL_LEN).all(1)
    return int(correct.sum()), correct.numel(), int(exact.sum()), exact.numel()


def lr_at(step: int, args) -> float:
    warm = max(1, int(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, args.steps - warm))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Logger:
    def __init__(self, path: Path, quiet: bool = False) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"{stamp} {line}\n")
        if not self.quiet:
            print(line, flush=True)

    def close(self) -> None:
        self.file.close()


CONFIG_NAME = "dictionary_lookup.json"
STATE_NAME = "training_state.pt"


def save_checkpoint(model, crossbatch, out: Path, meta: dict, optimizer, step: int) -> int:
    ctx = crossbatch.suspended() if crossbatch is not None else contextlib.nullcontext()
    with ctx:
        model.save_pretrained(out)  # transformers >= 5 writes safetensors (model.safetensors)
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"save_pretrained did not write {weights}")
    size = weights.stat().st_size
    meta = {**meta, "step": step, "weights_bytes": size}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "meta": meta}, out / STATE_NAME)
    return size


def train(args) -> dict:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    variant = "baseline" if args.baseline else "no-negatives" if args.no_negatives else "fot"
    if args.baseline and args.no_negatives:
        raise ValueError("--baseline and --no-negatives are exclusive")
    if args.batch_size < 2 or args.batch_size % 2:
        raise ValueError(f"--batch-size (rows of {args.chunk} tokens) must be even and >= 2, got {args.batch_size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train.log", quiet=args.quiet)
    docs_per_step = args.batch_size // 2
    d_max = args.d_max if args.d_max is not None else args.batch_size - 1
    if not 1 <= d_max <= args.batch_size - 1:
        raise ValueError(f"--d-max must be in [1, batch_size - 1 = {args.batch_size - 1}], got {d_max}")

    start, phase, history = 0, 0, []
    state_path = out / STATE_NAME
    if args.resume and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["meta"]["variant"] != variant:
            raise ValueError(f"--resume: {out} holds a {saved['meta']['variant']!r} run, not {variant!r}")
        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
        start, phase = saved["step"], saved["meta"].get("phase", 0)
        history = saved["meta"].get("acc_history", [])
        log(f"resumed from {out} at step {start} (phase {phase})")
    elif args.init_from:
        model = init_from(args, variant)
        log(f"initialised from {args.init_from} (weights only; fresh optimizer and schedule)")
    else:
        model = build_model(args, variant)
    device = torch.device(args.device)
    model.to(device).train()
    memory_layers = list(getattr(model.config, "mem_layers", None) or [])
    crossbatch = None
    if variant != "baseline":
        crossbatch = CrossBatch(model, memory_layers, packing=2, stepping=True, impl=args.crossbatch_impl)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, eps=1e-8
    )
    if start:
        optimizer.load_state_dict(saved["optimizer"])
    n_params = num_parameters(model)
    meta = {
        "variant": variant, "args": {k: v for k, v in vars(args).items() if k != "func"}, "token_map": TOKEN_MAP,
        "chunk": args.chunk, "memory_layers": memory_layers, "num_parameters": n_params,
        "crossbatch_impl": crossbatch.impl if crossbatch else None, "dataset_packing": 2,
        "cross_batch_stepping": True, "d_max": d_max, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    log(
        f"dictionary lookup train: variant={variant} params={n_params / 1e6:.2f}M memory_layers={memory_layers} "
        f"batch={args.batch_size}x{args.chunk} steps={args.steps} lr={args.lr} d: 1 -> {d_max} at train acc >= "
        f"{args.switch_acc} crossbatch={meta['crossbatch_impl']} threads={torch.get_num_threads()}"
    )
    t0 = time.perf_counter()
    window_tokens = window_time = 0.0
    window_stats = np.zeros(6)
    last = {}
    for step in range(start, args.steps):
        d = 0 if variant == "baseline" else 1 if (variant == "no-negatives" or phase == 0) else d_max
        if crossbatch is not None:
            crossbatch.set_range(d)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, labels = training_documents(args.seed, step, docs_per_step, args.chunk, args.hard_keys)
        rows = args.chunk if variant != "baseline" else 2 * args.chunk
        ids = torch.from_numpy(tokens.reshape(-1, rows)).to(device)  # a document's chunks: rows 2s, 2s+1
        lab = torch.from_numpy(labels.reshape(-1, rows)).to(device)
        ts = time.perf_counter()
        result = model(input_ids=ids, labels=lab)
        result.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_time += time.perf_counter() - ts
        window_tokens += ids.numel()
        with torch.no_grad():
            c, n, e, q = value_metrics(result.logits.detach(), lab)
        window_stats += (result.loss.detach().item(), c, n, e, q, 1)
        history.append(c / n)
        history = history[-args.switch_window :]
        reached = len(history) >= args.switch_window and float(np.mean(history)) >= args.switch_acc
        forced = args.switch_step is not None and step + 1 >= args.switch_step
        if variant == "fot" and phase == 0 and (reached or forced):
            phase = 1
            why = f">= {args.switch_acc}" if reached else f"(--switch-step {args.switch_step})"
            log(f"step {step + 1}: train value accuracy {np.mean(history):.4f} {why}: d 1 -> {d_max}")
            history = []  # --stop-acc is judged on d = d_max steps only
        stop = (
            args.stop_acc is not None and (variant != "fot" or phase == 1) and len(history) >= args.switch_window
            and float(np.mean(history)) >= args.stop_acc
        ) or (args.stop_step is not None and step + 1 >= args.stop_step)  # fmt: skip
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or stop:
            loss, c, n, e, q, k = window_stats
            last = {
                "step": step + 1, "loss": loss / k, "value_token_acc": c / max(n, 1), "query_exact_acc": e / max(q, 1),
                "d": d, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(window_time, 1e-9),
                "elapsed_s": time.perf_counter() - t0,
            }  # fmt: skip
            log(
                f"step {step + 1}/{args.steps} loss {last['loss']:.4f} acc {last['value_token_acc']:.4f} "
                f"exact {last['query_exact_acc']:.4f} d {d} lr {lr:.2e} gnorm {last['grad_norm']:.2f} "
                f"tok/s {last['tokens_per_s']:.0f} elapsed {last['elapsed_s']:.0f}s"
            )
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            window_stats[:] = 0
            window_tokens = window_time = 0.0
        if stop:
            why = f"--stop-step {args.stop_step}" if args.stop_step is not None and step + 1 >= args.stop_step else (
                f"train value accuracy {np.mean(history):.4f} >= --stop-acc {args.stop_acc}")  # fmt: skip
            log(f"step {step + 1}: {why}: stop")
            break
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            snapshot = {**meta, "phase": phase, "acc_history": history}
            save_checkpoint(model, crossbatch, out, snapshot, optimizer, step + 1)
    meta.update(phase=phase, acc_history=history, last_log=last, train_seconds=time.perf_counter() - t0)
    size = save_checkpoint(model, crossbatch, out, meta, optimizer, last.get("step", args.steps))
    if size > 20 * 2**20:
        log(f"WARNING: model.safetensors is {size / 2**20:.1f} MiB (> 20 MiB: too big to commit)")
    log(f"saved {out / 'model.safetensors'} ({size / 2**20:.2f} MiB) and {out / CONFIG_NAME}")
    if crossbatch is not None:
        crossbatch.disable()
    log.close()
    return meta


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def fill_memory_fast(
    model, definitions: torch.Tensor, layer: int, mem_dtype: torch.dtype, batch: int, group=None
):
    """A :class:`fot_kernels.memory.MemoryStore` (1 row) holding the memory layer's un-rotated keys
    and values of every definition chunk, in order, computed with the layers below it only (the
    stock model, windows of one chunk, ``batch`` chunks at a time).

    ``group`` (a torch.distributed process group of P ranks, all calling this with the same
    arguments): this rank's store holds only the slots ``g`` with ``g mod P == rank`` (the share a
    sharded ``enable_memory(process_group=...)`` cache of that rank keeps: docs/DESIGN.md 7). The
    work is shared: in each round every rank computes one batch of chunks, and an all_gather
    hands every rank the round's keys/values (a one-off O(memory) exchange of the fill; the
    attention calls afterwards communicate O(queries) only)."""
    import torch.distributed as dist

    from fot_kernels.memory import MemoryStore

    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    attn = model.model.layers[layer].self_attn
    heads, dim = model.config.num_key_value_heads, attn.head_dim
    num, chunk = definitions.shape
    store = MemoryStore(
        [layer],
        batch_size=1,
        num_kv_heads=heads,
        head_dim=dim,
        capacity=max(-(-num * chunk // world), chunk),
        dtype=mem_dtype,
        device=definitions.device,
    )
    got = {}

    def key_hook(_m, _i, out):
        got["k"] = out

    def value_hook(_m, _i, out):
        got["v"] = out
        raise _Stop

    def keys_values(beg: int) -> torch.Tensor:
        """[2 (k, v), 1, heads, nb * chunk, dim] of the chunks beg .. beg + batch - 1."""
        ids = definitions[beg : beg + batch]
        got.clear()
        with contextlib.suppress(_Stop):
            model.model(input_ids=ids, use_cache=False)
        if set(got) != {"k", "v"}:
            raise RuntimeError(f"the memory layer's k_proj/v_proj hooks did not run (layer {layer})")
        nb = ids.shape[0]
        return torch.stack([got[x].view(nb, chunk, heads, dim).permute(2, 0, 1, 3).reshape(1, heads, nb * chunk, dim)
                            for x in ("k", "v")])  # fmt: skip

    def keep(beg: int, kv: torch.Tensor) -> None:  # this rank's slots g = beg * chunk + j, g mod P == rank
        first = (rank - beg * chunk) % world
        store.append(layer, kv[0][:, :, first::world], kv[1][:, :, first::world])

    starts = list(range(0, num, batch))
    hooks = [attn.k_proj.register_forward_hook(key_hook), attn.v_proj.register_forward_hook(value_hook)]
    try:
        with torch.no_grad():
            for t in range(0, len(starts), world):
                if world == 1:
                    keep(starts[t], keys_values(starts[t]))
                    continue
                shape = (2, 1, heads, batch * chunk, dim)
                mine = torch.zeros(shape, dtype=mem_dtype, device=definitions.device)
                if t + rank < len(starts):
                    kv = keys_values(starts[t + rank])
                    mine[:, :, :, : kv.shape[3]] = kv  # rounded to mem_dtype here, as the store would
                wire = mine.view(torch.uint8)  # gloo has no bf16 (nor int16): send the bytes
                parts = [torch.empty_like(wire) for _ in range(world)]
                dist.all_gather(parts, wire, group=group)
                for i, part in enumerate(parts):
                    if t + i < len(starts):
                        beg = starts[t + i]
                        n = (min(beg + batch, num) - beg) * chunk
                        part = part.view(mem_dtype)
                        keep(beg, part[:, :, :, :n])
    finally:
        for h in hooks:
            h.remove()
    return store


def memory_logits(model, defs, queries, layers, *, topk, mem_dtype, fill="fast", fill_batch=64, group=None):
    """Logits ``[Q, chunk, V]`` of each query chunk of ``queries`` ``[Q, chunk]`` as the last
    ``chunk`` tokens of a document whose definition chunks ``defs`` ``[C, chunk]`` fill the memory
    (``enable_memory(topk=...)``, window = last_context_length = chunk), and the seconds spent
    filling the memory and answering. ``fill``: "fast" (:func:`fill_memory_fast`) or "package"
    (the memory-enabled model's windowed forward over the definitions and the first query chunk).
    Every query chunk gets a fresh local context and reads the same memory. ``group``: a
    torch.distributed process group whose ranks all call this with the same arguments; each keeps
    1/P of the memory (``enable_memory(process_group=group)``), and all return the same logits."""
    from fot_kernels.integrations.transformers import disable_memory, enable_memory

    chunk = defs.shape[1]
    dist = torch.distributed
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    t1 = time.perf_counter()
    store = None
    if fill == "fast":
        store = fill_memory_fast(model, defs, layers[0], mem_dtype, fill_batch, group=group)
    elif fill != "package":
        raise ValueError(f"fill must be 'fast' or 'package', got {fill!r}")
    capacity = -(-max(defs.numel(), chunk) // world) * world  # a multiple of the group's size
    enable_memory(
        model, memory_layers=layers, topk=topk, capacity=capacity, window=chunk,
        last_context_length=chunk, mem_dtype=mem_dtype, process_group=group,
    )  # fmt: skip
    logits = []
    try:
        with torch.no_grad():
            if store is None:  # the package's windowed forward over the whole document
                cache = model.fot_memory.new_cache()
                full = torch.cat([defs.reshape(-1), queries[0]])[None]
                logits.append(model(input_ids=full, cache=cache, logits_to_keep=chunk).logits)
                store = cache.memory
            fill_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            for i in range(len(logits), queries.shape[0]):
                cache = model.fot_memory.new_cache()
                cache.memory = store  # the same (read-only) memory for every query chunk
                logits.append(model(input_ids=queries[i : i + 1], cache=cache).logits)
            share = len(range(rank, defs.numel(), world))  # this rank's slots
            if store.num_slots(layers[0]) != share:
                raise RuntimeError("the memory does not hold exactly the definitions (this rank's share)")
    finally:
        disable_memory(model)
    return torch.cat(logits), fill_s, time.perf_counter() - t2


def memory_bytes(model, tokens: int, mem_dtype: torch.dtype) -> int:
    """Memory store size for one row: layers x Hkv x D x 2 (keys, values) x bytes x tokens."""
    layers = len(getattr(model.config, "mem_layers", None) or [])
    head_dim = model.config.head_dim
    elem = torch.empty((), dtype=mem_dtype).element_size()
    return layers * model.config.num_key_value_heads * head_dim * 2 * elem * tokens


def evaluate(args) -> dict:
    """``eval``: on this process, or with ``--ranks P`` on P spawned gloo processes that each keep
    1/P of the memory (the sharded ``enable_memory(process_group=...)``, docs/DESIGN.md 7)."""
    ckpt = Path(args.checkpoint)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    if args.memory_tokens < 1 or args.queries < 1 or args.topk < 1:
        raise ValueError("--memory-tokens, --queries and --topk must be >= 1")
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    if args.ranks > 1 and meta["variant"] == "baseline":
        raise ValueError("--ranks > 1 shards the memory: the baseline has none")
    if args.ranks == 1:
        torch.set_num_threads(args.threads)
        result, logits = _evaluate(args, meta)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out_file = str(Path(tmp) / "result.pt")
            C.spawn_ranks(_eval_rank, args.ranks, (args, meta, out_file), args.timeout)
            result, logits = torch.load(out_file)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.logits_out:
        torch.save(logits, args.logits_out)
    return result


def _eval_rank(rank: int, ranks: int, init_file: str, args, meta: dict, out_file: str) -> None:
    """One rank of a sharded eval: the same inputs on every rank, 1/P of the memory here."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=args.timeout))  # fmt: skip
    try:
        result, logits = _evaluate(args, meta, group=dist.group.WORLD, quiet=rank != 0)
        peak = torch.tensor([float(C.status_bytes("VmHWM"))])
        peaks = [torch.zeros(1) for _ in range(ranks)]
        dist.all_gather(peaks, peak)
        result.update(ranks=ranks, peak_rss_per_rank=[float(p) for p in peaks])
        if rank == 0:
            torch.save((result, logits), out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _evaluate(args, meta: dict, group=None, quiet: bool = False) -> tuple[dict, torch.Tensor]:
    from transformers import LlamaForCausalLM

    ckpt = Path(args.checkpoint)
    variant, chunk = meta["variant"], meta["chunk"]
    mem_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.mem_dtype]
    r = records_per_chunk(chunk)
    num_qc = -(-args.queries // r)
    t0 = time.perf_counter()
    doc = eval_document(args.seed, args.memory_tokens, num_qc, chunk)
    device = torch.device(args.device)
    defs = torch.from_numpy(doc["definitions"]).to(device)
    queries, labels = torch.from_numpy(doc["queries"]).to(device), torch.from_numpy(doc["labels"]).to(device)
    t_data = time.perf_counter() - t0
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
    result = {
        "variant": variant, "label": args.label or variant, "checkpoint": str(ckpt), "memory_tokens": int(defs.numel()),
        "memory_tokens_requested": args.memory_tokens, "queries": num_qc * r, "definitions": int(defs.shape[0] * r),
        "topk": None, "seed": args.seed, "chunk": chunk, "threads": torch.get_num_threads(),
        "train_step": meta.get("step"), "crossbatch_impl": meta.get("crossbatch_impl"),
        "ranks": 1 if group is None else torch.distributed.get_world_size(group),
    }  # fmt: skip
    logits = []
    if variant == "baseline":
        ctx = 2 * chunk
        inputs = torch.cat([defs[-1:].expand(num_qc, chunk), queries], dim=1)  # the last 512 tokens
        t1 = time.perf_counter()
        with torch.no_grad():
            for beg in range(0, num_qc, args.query_batch):
                logits.append(model(input_ids=inputs[beg : beg + args.query_batch]).logits[:, -chunk:])
        result.update(context_tokens=ctx, fill="none", fill_s=0.0, query_s=time.perf_counter() - t1)
    else:
        layers = list(meta["memory_layers"])
        if len(layers) != 1:
            raise ValueError(f"expected one memory layer, got {layers}")
        need = memory_bytes(model, defs.numel(), mem_dtype)
        head_dim = model.config.head_dim
        world = 1 if group is None else torch.distributed.get_world_size(group)
        if not quiet:
            print(
                f"memory: {defs.numel()} tokens x {len(layers)} layer x {model.config.num_key_value_heads} kv heads x "
                f"{head_dim} dim x 2 (k, v) x {torch.empty((), dtype=mem_dtype).element_size()} B = "
                f"{need / 2**20:.1f} MiB ({args.mem_dtype})" + (f", 1/{world} on each rank" if world > 1 else ""),
                flush=True,
            )  # fmt: skip
        logits, fill_s, query_s = memory_logits(
            model, defs, queries, layers, topk=args.topk, mem_dtype=mem_dtype, fill=args.fill,
            fill_batch=args.fill_batch, group=group,
        )  # fmt: skip
        result.update(
            topk=args.topk, mem_dtype=args.mem_dtype, memory_bytes=need, fill=args.fill, fill_s=fill_s,
            query_s=query_s, context_tokens=chunk,
        )  # fmt: skip
    logits = torch.cat(logits) if isinstance(logits, list) else logits
    c, n, e, q = value_metrics(logits, labels)
    # accuracy of queries whose definition is in the last definition chunk (the baseline's context)
    in_last = torch.from_numpy(doc["query_source"] == defs.shape[0] - 1).reshape(-1).to(device)
    target = labels[:, 1:]
    correct = (logits[:, :-1].argmax(-1) == target)[target != IGNORE].view(-1, VAL_LEN).all(1)
    result.update(
        accuracy=e / q, token_accuracy=c / n, queries_in_last_chunk=int(in_last.sum()),
        accuracy_last_chunk=float(correct[in_last].float().mean()) if bool(in_last.any()) else None,
        data_s=t_data, total_s=time.perf_counter() - t0, process_cpu_s=time.process_time(),
    )  # fmt: skip
    if not quiet:
        print(
            f"{variant} memory_tokens={result['memory_tokens']} queries={q}: accuracy {e / q:.4f} "
            f"(value tokens {c / n:.4f}); fill {result['fill_s']:.1f}s, queries {result['query_s']:.1f}s, "
            f"total {result['total_s']:.1f}s",
            flush=True,
        )
    return result, logits


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _fmt_tokens(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def report(args) -> str:
    rows = []
    for path in sorted(glob.glob(os.path.join(args.results, "**", "*.json"), recursive=True)):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and {"accuracy", "memory_tokens", "variant"} <= data.keys():
            rows.append(data)
    if not rows:
        raise SystemExit(f"no eval JSONs under {args.results}")
    table: dict[int, dict[str, dict]] = {}
    for r in rows:
        table.setdefault(r["memory_tokens"], {})[r.get("label") or r["variant"]] = r
    labels = {r.get("label") or r["variant"] for r in rows}  # the variants first, then other labels by name
    variants = [v for v in VARIANTS if v in labels] + sorted(labels - set(VARIANTS))
    lines = [
        "| memory tokens | " + " | ".join(variants) + " |",
        "|---:|" + "---:|" * len(variants),
    ]
    for mem in sorted(table):
        cells = []
        for v in variants:
            r = table[mem].get(v)
            ranks = r.get("ranks", 1) if r is not None else 1
            cells.append(
                "" if r is None else f"{100 * r['accuracy']:.1f}% ({100 * r['token_accuracy']:.1f}%; n={r['queries']}"
                + (f"; {ranks} ranks)" if ranks > 1 else ")")
            )  # fmt: skip
        lines.append(f"| {_fmt_tokens(mem)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out_md = Path(args.out_md or os.path.join(args.results, "accuracy.md"))
    header = (
        "Dictionary lookup (arXiv 2307.03170 5.2 / appendix D, CPU scale): per-query exact accuracy of the 4 "
        "value tokens (greedy, teacher-forced) vs memory tokens, in brackets the accuracy of single value tokens, the "
        "number of queries and, where the memory was sharded (enable_memory(process_group=...)), the number of "
        f"gloo ranks; FoT/no-negatives: kNN memory, k = {sorted({r['topk'] for r in rows if r.get('topk')})}; "
        "baseline: 512-token context.\n\n"
    )
    out_md.write_text(header + text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return text
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for v in variants:
        pts = sorted((m, t[v]["accuracy"], t[v]["token_accuracy"]) for m, t in table.items() if v in t)
        (line,) = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{v}: queries")
        ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker=".", ls="--", color=line.get_color(),
                alpha=0.6, label=f"{v}: value tokens")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Dictionary lookup: accuracy vs memory size")
    fig.tight_layout()
    out_png = Path(args.out_png or os.path.join(args.results, "accuracy.png"))
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_md} and {out_png}")
    return text


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (FoT, --no-negatives or --baseline)")
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=16, help="rows of --chunk tokens per step (2 per document)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.1)
    t.add_argument("--warmup", type=float, default=0.02, help="warmup fraction of --steps")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads (2 only pays on an idle box)")
    t.add_argument("--device", default="cpu", help="e.g. cuda (the package's GPU backends)")
    t.add_argument("--chunk", type=int, default=CHUNK, help="tokens per chunk = local context (paper: 256)")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--heads", type=int, default=8)
    t.add_argument("--kv-heads", type=int, default=8)
    t.add_argument("--head-dim", type=int, default=32, help="0: hidden // heads")
    t.add_argument("--rope-theta", type=float, default=1e6)
    t.add_argument("--memory-layer", type=int, default=None, help="default layers // 2")
    t.add_argument("--d-max", type=int, default=None, help="cross_batch_range after the switch (default B - 1)")
    t.add_argument("--switch-acc", type=float, default=0.98, help="train value accuracy that switches d 1 -> d-max")
    t.add_argument("--switch-window", type=int, default=20, help="steps averaged for --switch-acc")
    t.add_argument("--switch-step", type=int, default=None, help="switch d at this step at the latest (default: never)")
    t.add_argument(
        "--stop-acc", type=float, default=None,
        help="end the run early once the train value accuracy (mean of --switch-window steps; for fot: after "
        "the switch to d-max) reaches this (curriculum stages)",
    )  # fmt: skip
    t.add_argument("--stop-step", type=int, default=None, help="end the run after this step (the schedule of --steps)")
    t.add_argument(
        "--hard-keys", type=float, default=0.0,
        help="fraction of each document's keys that are near-copies (one symbol changed) of another of its keys",
    )  # fmt: skip
    t.add_argument("--no-negatives", action="store_true", help="d = 1 throughout (own definitions only)")
    t.add_argument("--baseline", action="store_true", help="no memory, 512-token context")
    t.add_argument("--crossbatch-impl", choices=("auto", "package", "fallback"), default="auto")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=250)
    t.add_argument("--resume", action="store_true", help="continue from --out's training_state.pt")
    t.add_argument("--init-from", default=None, help="start from this checkpoint's weights (e.g. the baseline)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=train)
    e = sub.add_parser("eval", help="accuracy with N memory tokens")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--memory-tokens", type=int, required=True)
    e.add_argument("--queries", type=int, default=500, help="rounded up to whole query chunks of 25")
    e.add_argument("--topk", type=int, default=32)
    e.add_argument("--json", default=None)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--device", default="cpu")
    e.add_argument("--mem-dtype", choices=("bf16", "fp32"), default="bf16")
    e.add_argument("--fill", choices=("fast", "package"), default="fast")
    e.add_argument("--fill-batch", type=int, default=64, help="definition chunks per batch (fast fill)")
    e.add_argument("--query-batch", type=int, default=16, help="query chunks per batch (baseline)")
    e.add_argument("--label", default=None, help="the column of this result in the report (default: the variant)")
    e.add_argument("--ranks", type=int, default=1, help="shard the memory over this many gloo processes (1/P each)")
    e.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before a sharded eval is killed")
    e.add_argument("--logits-out", default=None, help="also save the query logits [Q, chunk, V] (torch.save)")
    e.set_defaults(func=evaluate)
    r = sub.add_parser("report", help="table + plot from eval JSONs")
    r.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "dictionary_lookup"))
    r.add_argument("--out-md", default=None)
    r.add_argument("--out-png", default=None)
    r.set_defaults(func=report)
    return p


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
