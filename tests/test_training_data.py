"""FoT's document-aware K-packing batcher (fot_kernels.training.KPackingDataset)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fot_kernels.training import KPackingDataset, collate_steps, cross_batch_contexts

BOS, EOS = 1, 2


def _docs(lengths, seed=0):
    """Documents whose token ids say where they come from: document i holds 1000 * (i + 1) + j."""
    return [[1000 * (i + 1) + j for j in range(n)] for i, n in enumerate(lengths)]


def _doc_of(token):
    return token // 1000 - 1 if token >= 1000 else None


def test_hand_made_documents_exact_batches():
    """B = 4, L = 3, k = 2: two streams of 2 rows; each step needs 2 * 3 + 1 tokens per stream."""
    docs = [[10, 11, 12, 13, 14], [20, 21, 22], [30] * 9, [40, 41], [50, 51, 52, 53, 54, 55, 56]]
    steps = list(KPackingDataset(docs, batch_size=4, seq_len=3, packing=2, bos_token_id=BOS, eos_token_id=EOS))
    # stream 0: doc 0 (7 tokens with bos/eos), then docs 3, 4; stream 1: docs 1, 2
    assert steps[0]["input_ids"].tolist() == [[1, 10, 11], [12, 13, 14], [1, 20, 21], [22, 2, 1]]
    assert steps[0]["shift_labels"].tolist() == [[10, 11, 12], [13, 14, 2], [20, 21, 22], [2, 1, 30]]
    assert steps[1]["input_ids"].tolist() == [[2, 1, 40], [41, 2, 1], [30, 30, 30], [30, 30, 30]]
    assert steps[1]["shift_labels"].tolist() == [[1, 40, 41], [2, 1, 50], [30, 30, 30], [30, 30, 30]]
    # step 2: stream 1 has [30, 30, 30, 2] left and no document to take: iteration ends, tail dropped
    assert len(steps) == 2
    for step in steps:
        assert torch.equal(step["labels"], step["input_ids"]) and step["labels"] is not step["input_ids"]
        assert all(t.dtype == torch.int64 and t.shape == (4, 3) for t in step.values())


@pytest.mark.parametrize(("batch", "length", "packing"), [(6, 5, 3), (4, 7, 1), (8, 4, 4), (2, 9, 2)])
def test_streams_are_documents_in_turn_without_padding(batch, length, packing):
    """Rows s*k .. s*k+k-1 of every step, read in order and step after step, are stream s: a
    sequence of whole documents each as [bos] doc [eos]; documents split across steps continue;
    every document is used once, in order of first use; labels are the stream's next tokens."""
    rng = np.random.default_rng(batch * 100 + length)
    docs = _docs(rng.integers(0, 3 * length, size=60).tolist())
    steps = list(KPackingDataset(docs, batch_size=batch, seq_len=length, packing=packing, bos_token_id=BOS,
                                 eos_token_id=EOS))  # fmt: skip
    assert len(steps) >= 3
    streams = batch // packing
    text = [[] for _ in range(streams)]
    for t, step in enumerate(steps):
        ids, targets = step["input_ids"], step["shift_labels"]
        for s in range(streams):
            rows = ids[s * packing : (s + 1) * packing].flatten().tolist()
            text[s].extend(rows)
            flat_targets = targets[s * packing : (s + 1) * packing].flatten().tolist()
            assert flat_targets[:-1] == rows[1:]  # within a step: the next token of the stream
            if t + 1 < len(steps):  # the last target is carried over: the stream's next step starts with it
                assert flat_targets[-1] == steps[t + 1]["input_ids"][s * packing, 0].item()
    used = []
    for s in range(streams):
        stream = text[s]
        i = 0
        while i < len(stream):  # parse [bos] doc [eos] ... (the last document may be cut)
            assert stream[i] == BOS, f"stream {s} position {i}: expected bos"
            j = i + 1
            while j < len(stream) and stream[j] != EOS:
                j += 1
            body = stream[i + 1 : j]
            if body:
                doc = _doc_of(body[0])
                assert body == docs[doc][: len(body)]
                assert j == len(stream) or len(body) == len(docs[doc])  # whole, unless cut by the end
                used.append(doc)
            i = j + 1
    assert 0 not in [t for s in text for t in s]  # no padding anywhere
    nonempty = [i for i, d in enumerate(docs) if d]
    assert sorted(used) == nonempty[: len(used)]  # documents taken in order, none skipped or repeated


def test_each_document_split_across_steps_continues_in_the_same_stream():
    docs = _docs([40, 3, 25])
    steps = list(KPackingDataset(docs, batch_size=2, seq_len=4, packing=1, bos_token_id=BOS, eos_token_id=EOS))
    row0 = torch.cat([s["input_ids"][0] for s in steps]).tolist()
    assert len(steps) == 7 and row0 == [BOS, *docs[0]][:28]  # document 0 continues over 7 steps in row 0
    assert steps[0]["input_ids"][1].tolist() == [BOS, *docs[1]] and steps[1]["input_ids"][1, 0] == EOS


def test_without_bos_or_eos():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    (step,) = list(KPackingDataset(docs, batch_size=1, seq_len=7, eos_token_id=EOS))
    assert step["input_ids"].tolist() == [[5, 6, 7, 2, 8, 9, 2]] and step["shift_labels"][0, -1] == 10
    (step,) = list(KPackingDataset(docs, batch_size=1, seq_len=8))
    assert step["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]


def test_inputs_of_any_integer_container():
    docs = [torch.tensor([5, 6, 7], dtype=torch.int32), np.array([8, 9], dtype=np.uint16), (10, 11, 12), []]
    (step,) = list(KPackingDataset(docs, batch_size=1, seq_len=10, bos_token_id=BOS, eos_token_id=EOS))
    assert step["input_ids"].tolist() == [[1, 5, 6, 7, 2, 1, 8, 9, 2, 1]]


def test_dataloader_and_collate():
    docs = _docs([13, 5, 22, 9, 31, 4, 17, 8] * 3)
    ds = KPackingDataset(docs, batch_size=4, seq_len=5, packing=2, bos_token_id=BOS, eos_token_id=EOS)
    direct = list(ds)
    plain = list(DataLoader(ds, batch_size=None))
    ones = list(DataLoader(ds, batch_size=1, collate_fn=collate_steps))
    assert len(direct) == len(plain) == len(ones) > 2
    for a, b, c in zip(direct, plain, ones):
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    with pytest.raises(ValueError, match="exactly 1 item"):
        next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_steps)))


def test_dataloader_workers_shard_documents():
    docs = _docs([13, 5, 22, 9, 31, 4, 17, 8] * 4)
    ds = KPackingDataset(docs, batch_size=4, seq_len=5, packing=2, bos_token_id=BOS, eos_token_id=EOS)
    runs = [list(DataLoader(ds, batch_size=None, num_workers=2)) for _ in range(2)]
    for a, b in zip(*runs):  # deterministic
        assert torch.equal(a["input_ids"], b["input_ids"])
    parities = set()
    for step in runs[0]:  # every batch comes from one worker, whose documents are i with i mod 2 == w
        ids = step["input_ids"]
        assert ids.shape == (4, 5)
        docs_here = {_doc_of(x) for x in ids.flatten().tolist()} - {None}
        assert len({d % 2 for d in docs_here}) == 1
        parities |= {d % 2 for d in docs_here}
    assert parities == {0, 1}
    single = {_doc_of(x) for step in ds for x in step["input_ids"].flatten().tolist()} - {None}
    sharded = {_doc_of(x) for step in runs[0] for x in step["input_ids"].flatten().tolist()} - {None}
    assert len(sharded) >= len(single) - 4  # no document lost beyond the workers' dropped tails


def test_shuffle_is_deterministic_given_the_seed_and_repeat_reshuffles():
    docs = _docs([6, 9, 4, 11, 7, 5, 8, 10])

    def first_docs(seed, n=12):
        ds = KPackingDataset(docs, batch_size=2, seq_len=4, bos_token_id=BOS, eos_token_id=EOS, shuffle=True,
                             seed=seed, repeat=True)  # fmt: skip
        out = []
        for step in itertools.islice(ds, n):
            out.extend(_doc_of(x) for x in step["input_ids"].flatten().tolist() if x >= 1000)
        return out

    assert first_docs(3) == first_docs(3)
    assert first_docs(3) != first_docs(4)
    ds = KPackingDataset(docs, batch_size=1, seq_len=4, eos_token_id=EOS, shuffle=True, seed=3, repeat=True)
    order = []
    for step in itertools.islice(ds, 40):
        for x in step["input_ids"].flatten().tolist():
            if x >= 1000 and (not order or order[-1] != _doc_of(x)):
                order.append(_doc_of(x))
    first, second = order[:8], order[8:16]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second  # each epoch reshuffled


def test_one_shot_iterators():
    docs = iter(_docs([10, 12, 9]))
    ds = KPackingDataset(docs, batch_size=1, seq_len=4)
    assert len(list(ds)) == 7
    with pytest.raises(RuntimeError, match="already consumed"):
        list(ds)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": 6, "packing": 4}, ValueError, r"batch_size \(6\) must be a multiple of packing \(4\)"),
        ({"seq_len": "8"}, TypeError, "seq_len must be an int, got str"),
        ({"packing": True}, TypeError, "packing must be an int, got bool"),
        ({"bos_token_id": -1}, ValueError, "bos_token_id must be >= 0"),
        ({"eos_token_id": 2.0}, TypeError, "eos_token_id must be an int"),
        ({"shuffle": 1}, TypeError, "shuffle must be a bool"),
        ({"seed": -3}, ValueError, "seed must be >= 0"),
        ({"documents": "some text"}, TypeError, "documents must be a sequence or iterable"),
        ({"documents": iter([[1]]), "shuffle": True}, ValueError, "shuffle=True needs documents to be a Sequence"),
        ({"documents": iter([[1]]), "repeat": True}, ValueError, "repeat=True needs re-iterable documents"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"documents": [[3, 4, 5]], "batch_size": 4, "seq_len": 8, **kwargs}
    with pytest.raises(error, match=match):
        KPackingDataset(args.pop("documents"), **args)


@pytest.mark.parametrize(
    ("doc", "error", "match"),
    [
        ([1.5, 2.0], TypeError, r"documents\[1\] must hold integer token ids"),
        ("text", TypeError, r"documents\[1\] must be a sequence of token ids \(tokenize text first\)"),
        ([[1, 2], [3, 4]], ValueError, r"documents\[1\] must be 1-D"),
        ([3, -1], ValueError, r"documents\[1\] holds a negative token id -1"),
        (torch.tensor([True]), TypeError, r"documents\[1\] must hold integer token ids, got a torch.bool tensor"),
    ],
)
def test_bad_documents_are_named(doc, error, match):
    ds = KPackingDataset([[5] * 20, doc], batch_size=2, seq_len=4)
    with pytest.raises(error, match=match):
        list(ds)


def test_repeat_with_no_tokens_refuses_to_loop_forever():
    with pytest.raises(ValueError, match="no tokens in a whole epoch"):
        next(iter(KPackingDataset([[], []], batch_size=1, seq_len=4, repeat=True)))


def test_cross_batch_contexts_follow_fots_rule():
    """The released README's example (B = 8, d = 6, doc_aware_k4, stepping): ranges 0 1 2 3 0 3 6 6;
    and the same rule as the op's own ``crossbatch_pack`` everywhere on a grid."""
    ranges = [len(c) for c in cross_batch_contexts(8, 6, 4, True)]
    assert ranges == [0, 1, 2, 3, 0, 3, 6, 6]
    assert cross_batch_contexts(4, 2) == [[], [0], [1, 0], [2, 1]]
    crossbatch = pytest.importorskip("fot_kernels.crossbatch")
    for batch, d, packing, stepping in itertools.product((1, 4, 6, 8), (1, 2, 3, 7), (1, 2, 4), (False, True)):
        if batch % packing:
            continue
        packs = crossbatch.crossbatch_pack(batch, d, packing, stepping)
        assert [len(c) + 1 for c in cross_batch_contexts(batch, d, packing, stepping)] == packs
    with pytest.raises(ValueError, match="multiple of dataset_packing"):
        cross_batch_contexts(6, 2, 4)
