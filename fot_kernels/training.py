"""FoT's document-aware K-packing data pipeline for CrossBatch training, in plain PyTorch.

:class:`KPackingDataset` reproduces ``KPackingDAPipeline`` of the released FoT code
(``fot_continued_pretraining/FoT/data_pipeline.py`` of the long_llama repository): a
``DocAwareDataPipeline`` with ``B / k`` streams of ``k * L`` tokens, reshaped to ``[B, L]``.

::

    documents:  d0 d1 d2 d3 d4 ...        (token-id sequences, taken in order)
    stream s:   [bos] d_i [eos] [bos] d_j [eos] [bos] d_m ...   (no padding; documents in turn)

    step t, B = 6, k = 3 (2 streams):      row 0 = stream 0 tokens [tL*3 + 0L, + 1L)
                                           row 1 = stream 0 tokens [ ...  + 1L, + 2L)
                                           row 2 = stream 0 tokens [ ...  + 2L, + 3L)
                                           row 3 = stream 1 tokens [ ...  + 0L, + 1L)   ...

- Each stream takes the next document of the (shared) document sequence whenever its buffer runs
  short, so a document continues in the same rows of the next steps until it ends; then the next
  document follows after ``eos`` ``bos`` (each document is emitted as ``[bos] tokens [eos]``, the
  FoT text processor's convention; either id may be None to leave it out).
- Streams are filled in order 0, 1, ..., B/k - 1 at every step, each pulling documents from the
  one shared sequence (the order FoT's pipeline assigns documents to batch entries).
- Rows ``s*k .. s*k + k - 1`` of a step are ``k`` consecutive chunks of stream ``s``.

Labels. Every step consumes ``k * L`` tokens of each stream but needs ``k * L + 1``: the next-token
target of a row's last token is the stream's next token, i.e. the first token of the next row of
the same stream or, for the stream's last row, the first token of that stream's next step, which
is carried over (it is both the last target of step t and the first input of step t + 1), exactly
as the released ``DocAwareDataPipeline`` does (``input = buf[:kL]``, ``target = buf[1:kL+1]``,
``buf = buf[kL:]``). A step therefore waits until each stream holds ``k * L + 1`` tokens. Each
step is a dict of int64 tensors ``[B, L]``:

- ``input_ids``;
- ``labels``: a copy of ``input_ids`` in the Hugging Face convention (the model shifts them:
  position i is scored against ``labels[i + 1]``, the last position of each row is not scored);
- ``shift_labels``: FoT's ``target_tokens``, already shifted: ``shift_labels[b, i]`` is the token
  that follows ``input_ids[b, i]`` in its stream, for every i, the last one included. transformers'
  causal-LM loss uses ``shift_labels`` instead of shifting ``labels`` when it is passed, so
  ``model(**batch)`` scores all ``B * L`` positions, FoT's loss; pass only ``input_ids`` and
  ``labels`` for the plain Hugging Face loss (``B * (L - 1)`` positions).

Relation to ``crossbatch_attention``'s ``dataset_packing``: with ``packing=k`` pass
``dataset_packing=k``. Row b's previous chunk of the same stream is row b - 1 when ``b mod k > 0``
(``b mod k`` is the chunk's position within its stream), and rows b - 1, ..., b - (b mod k) are all
earlier chunks of its own stream (positives: the same document, or the one before it in the
stream), while rows before ``s*k`` belong to other streams (negatives). Without
``cross_batch_stepping`` every row sees the ``cross_batch_range`` rows before it (never a later
row, never wrapping); with it, row b sees ``min((b mod k) * ceil((d + 1) / max(k - 1, 1)) + 1,
d + 1) - 1`` earlier rows, so the first chunk of each stream sees only its local context and later
chunks see their own earlier chunks plus more and more negatives (FoT's "several cross-batch ranges
in one batch", docs/DESIGN.md section 3.5).

DataLoader. A step is a whole batch: use ``DataLoader(dataset, batch_size=None)``, or
``batch_size=1`` with ``collate_fn=collate_steps`` (what the Hugging Face ``Trainer`` needs:
``per_device_train_batch_size=1, data_collator=collate_steps``). With ``num_workers = W > 1`` the
documents are sharded: worker w takes documents ``i`` with ``i mod W == w`` (of the shuffled order)
and runs its own ``B / k`` streams, so every batch still has the layout above, and the DataLoader
returns the workers' batches in turn (a document split across steps then continues every W-th
batch). Deterministic given ``seed`` (and, with workers, W). Several training processes (DDP) are
not sharded here: give each rank its own dataset over its share of the documents, and keep each
rank's [B, L] step whole (a loader that splits the batch dimension across ranks, as
``accelerate``'s default dispatching of iterable datasets does, would cut the streams apart).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _token_id(name: str, value: object) -> int | None:
    return None if value is None else _int_arg(name, value, 0)


def _as_tokens(doc: object, index: int) -> Tensor:
    """A document as a 1-D int64 CPU tensor of token ids >= 0."""
    name = f"documents[{index}]"
    if isinstance(doc, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of token ids (tokenize text first), got {type(doc).__name__}")
    if isinstance(doc, Tensor):
        if doc.is_floating_point() or doc.is_complex() or doc.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a {doc.dtype} tensor")
        tokens = doc.detach().to("cpu", torch.int64)
    else:
        try:
            array = np.asarray(doc)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of token ids, got {type(doc).__name__}") from exc
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {array.dtype}")
        tokens = torch.from_numpy(array.astype(np.int64, copy=False).copy())
    if tokens.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one document's token ids), got shape {tuple(tokens.shape)}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"{name} holds a negative token id {int(tokens.min())}")
    return tokens


class KPackingDataset(IterableDataset):
    """FoT's document-aware K-packing batcher as a torch ``IterableDataset`` (module docstring).

    Args:
        documents: the documents, each a sequence of token ids (list, 1-D integer tensor or numpy
            array). A ``Sequence`` (e.g. a list) can be shuffled and repeated; any other iterable
            is read in order, and must be re-iterable (not a one-shot iterator) for ``repeat``.
        batch_size: B, rows per step.
        seq_len: L, tokens per row.
        packing: k, consecutive rows per stream (``B % k == 0``; ``crossbatch_attention``'s
            ``dataset_packing``).
        bos_token_id, eos_token_id: inserted before / after every document (None: not inserted).
        shuffle: shuffle the document order (each epoch anew; needs a ``Sequence``).
        seed: the shuffle seed (epoch e uses ``seed + e``).
        repeat: start again from the first document when they run out (endless); else the
            iteration ends at the first step some stream cannot fill (its tail is dropped).

    Yields:
        dicts of int64 ``[B, L]`` tensors ``input_ids``, ``labels``, ``shift_labels``.
    """

    def __init__(
        self,
        documents: Sequence | Iterable,
        *,
        batch_size: int,
        seq_len: int,
        packing: int = 1,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(documents, (str, bytes, Tensor)) or not isinstance(documents, Iterable):
            raise TypeError(
                f"documents must be a sequence or iterable of token-id sequences, got {type(documents).__name__}"
            )
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.seq_len = _int_arg("seq_len", seq_len, 1)
        self.packing = _int_arg("packing", packing, 1)
        if self.batch_size % self.packing:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of packing ({self.packing}): "
                "each stream fills packing consecutive rows"
            )
        self.bos_token_id = _token_id("bos_token_id", bos_token_id)
        self.eos_token_id = _token_id("eos_token_id", eos_token_id)
        for name, flag in (("shuffle", shuffle), ("repeat", repeat)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        self.seed = _int_arg("seed", seed, 0)
        is_sequence = isinstance(documents, Sequence)
        one_shot = isinstance(documents, Iterator)
        if shuffle and not is_sequence:
            raise ValueError(
                f"shuffle=True needs documents to be a Sequence (e.g. a list), got {type(documents).__name__}"
            )
        if repeat and one_shot:
            raise ValueError("repeat=True needs re-iterable documents (a list or an iterable), got a one-shot iterator")
        self.documents = documents
        self.shuffle, self.repeat = shuffle, repeat
        self._one_shot = one_shot
        self._used = False

    @property
    def num_streams(self) -> int:
        """B / k, the number of document streams."""
        return self.batch_size // self.packing

    def _epoch_documents(self, epoch: int) -> Iterator[tuple[int, object]]:
        """(global index, document) of one epoch, in this epoch's order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.documents), generator=generator).tolist()
            return ((i, self.documents[j]) for i, j in enumerate(order))
        return enumerate(self.documents)

    def _documents(self, worker: int, workers: int) -> Iterator[Tensor]:
        """This worker's documents with bos/eos added, over the epochs (one unless ``repeat``)."""
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        epoch = 0
        while True:
            yielded = False
            for index, doc in self._epoch_documents(epoch):
                if index % workers != worker:
                    continue
                tokens = _as_tokens(doc, index)
                piece = torch.cat([torch.tensor(bos, dtype=torch.int64), tokens, torch.tensor(eos, dtype=torch.int64)])
                if piece.numel():
                    yielded = True
                    yield piece
            if not self.repeat:
                return
            if not yielded:
                raise ValueError(
                    "documents yielded no tokens in a whole epoch (for this DataLoader worker): repeat=True would loop "
                    "forever"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self._one_shot:
            if workers > 1:
                raise ValueError(
                    "a one-shot iterator of documents cannot be sharded across DataLoader workers: pass a list "
                    "(or a re-iterable) or use num_workers <= 1"
                )
            if self._used:
                raise RuntimeError("this KPackingDataset's documents were a one-shot iterator, already consumed")
            self._used = True
        return self._steps(self._documents(worker, workers))

    def _steps(self, docs: Iterator[Tensor]) -> Iterator[dict[str, Tensor]]:
        k, length = self.packing, self.seq_len
        need = k * length + 1  # k rows plus the last row's next-token target
        buffers: list[list[Tensor]] = [[] for _ in range(self.num_streams)]
        sizes = [0] * self.num_streams
        while True:
            rows = []
            for s in range(self.num_streams):  # FoT fills the streams in order from the shared documents
                while sizes[s] < need:
                    piece = next(docs, None)
                    if piece is None:
                        return
                    buffers[s].append(piece)
                    sizes[s] += piece.numel()
                stream = torch.cat(buffers[s]) if len(buffers[s]) > 1 else buffers[s][0]
                rows.append(stream[:need])
                rest = stream[k * length :]  # the carried-over token is the next step's first input
                buffers[s], sizes[s] = [rest], rest.numel()
            window = torch.stack(rows)  # [B/k, k*L + 1]
            inputs = window[:, :-1].reshape(self.batch_size, length)
            targets = window[:, 1:].reshape(self.batch_size, length)
            yield {"input_ids": inputs, "labels": inputs.clone(), "shift_labels": targets.contiguous()}

    def __repr__(self) -> str:
        return (
            f"KPackingDataset(batch_size={self.batch_size}, seq_len={self.seq_len}, packing={self.packing}, "
            f"bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id}, shuffle={self.shuffle}, "
            f"seed={self.seed}, repeat={self.repeat})"
        )


def collate_steps(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``collate_fn`` for a DataLoader (or ``data_collator`` for the Hugging Face ``Trainer``) with
    batch size 1 over a :class:`KPackingDataset`: a step already is a whole batch, returned as is.
    Any other batch size would mix steps and break the stream layout, and is refused."""
    if not isinstance(items, (list, tuple)) or len(items) != 1:
        got = len(items) if isinstance(items, (list, tuple)) else type(items).__name__
        raise ValueError(
            f"collate_steps needs batches of exactly 1 item (each item is a whole [B, L] step), got {got}: "
            "use batch_size=1 (Trainer: per_device_train_batch_size=1), or DataLoader(dataset, batch_size=None)"
        )
    return items[0]


def cross_batch_contexts(batch_size: int, cross_batch_range: int, dataset_packing: int = 1, stepping: bool = False):
    """For each batch row b, the rows whose keys/values it sees besides its own, nearest first
    (DESIGN 3.5's visibility rule, the released ``cross_batch.py``): a list of B lists. Handy to
    check which rows are positives (same stream) for a given ``KPackingDataset`` layout."""
    batch_size = _int_arg("batch_size", batch_size, 1)
    d = _int_arg("cross_batch_range", cross_batch_range, 1)
    packing = _int_arg("dataset_packing", dataset_packing, 1)
    if batch_size % packing:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of dataset_packing ({packing})")
    if not isinstance(stepping, bool):
        raise TypeError(f"stepping must be a bool, got {type(stepping).__name__}")
    out = []
    for b in range(batch_size):
        if packing == 1 or not stepping:
            pack = d + 1
        else:
            pack = min((b % packing) * math.ceil((d + 1) / max(packing - 1, 1)) + 1, d + 1)
        pack = min(pack, b + 1)
        out.append([b - c for c in range(1, pack)])
    return out


__all__ = ["KPackingDataset", "collate_steps", "cross_batch_contexts"]
