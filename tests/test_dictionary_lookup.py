"""benchmarks/dictionary_lookup.py (issue 11 part 5, arXiv 2307.03170 5.2): the data generator's
invariants, the memory filling shortcut against the package's windowed forward, the local
CrossBatch fallback against the package's training mode, and a tiny end-to-end train + eval +
report run (the real training is not run in CI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dictionary_lookup as DL

CHUNK = DL.CHUNK
R = DL.records_per_chunk(CHUNK)


def _records(chunk_tokens: np.ndarray, marker: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(key, value) symbol tuples of the records of one chunk, checking the record format."""
    out = []
    for r in range(len(chunk_tokens) // DL.RECORD):
        rec = chunk_tokens[r * DL.RECORD : (r + 1) * DL.RECORD]
        if rec[0] != marker:
            break
        assert rec[5] == DL.VAL
        sym = rec[[1, 2, 3, 4, 6, 7, 8, 9]] - DL.SYMBOL0
        assert ((sym >= 0) & (sym < DL.NUM_SYMBOLS)).all(), rec
        out.append((tuple(sym[:4]), tuple(sym[4:])))
    return out


def test_token_map():
    ids = list(DL.TOKEN_MAP.values())
    assert len(set(ids)) == len(ids) == 6 + DL.NUM_SYMBOLS
    assert max(ids) < DL.VOCAB_SIZE
    assert R == 25 and 1 + R * DL.RECORD <= CHUNK


def test_training_documents_format_and_labels():
    tokens, labels = DL.training_documents(seed=3, step=7, num_docs=5)
    assert tokens.shape == labels.shape == (5, 2 * CHUNK) and tokens.dtype == np.int64
    vpos = DL.value_positions(CHUNK)
    for doc, lab in zip(tokens, labels):
        defs, queries = doc[:CHUNK], doc[CHUNK:]
        # definition chunk: bos, 25 definitions, padding; query chunk: 25 queries, padding, eos
        assert defs[0] == DL.BOS and (defs[1 + R * DL.RECORD :] == DL.PAD).all()
        d = _records(defs[1:], DL.KEY)
        q = _records(queries, DL.QRY)
        assert len(d) == len(q) == R
        assert (queries[R * DL.RECORD : -1] == DL.PAD).all() and queries[-1] == DL.EOS
        # keys unique in the document; each query asks a definition of ITS document, with its values
        keys = [k for k, _ in d]
        assert len(set(keys)) == R
        assert sorted(q) == sorted(d)  # a permutation of the definitions
        assert len({k for k, _ in q}) == R  # no query answerable from an earlier query of its chunk
        # nothing but queries in the query chunk: answering needs the previous chunk (the memory)
        assert not np.isin(queries, [DL.KEY, DL.BOS]).any()
        # loss only on v1..v4 of the queries
        scored = np.flatnonzero(lab != DL.IGNORE)
        np.testing.assert_array_equal(scored, CHUNK + vpos)
        np.testing.assert_array_equal(lab[scored], doc[scored])
        assert (lab[scored] >= DL.SYMBOL0).all()
        for r in range(R):  # v1..v4 are the 4 tokens after the query's <v>
            assert doc[CHUNK + r * DL.RECORD + 5] == DL.VAL
            np.testing.assert_array_equal(scored[4 * r : 4 * r + 4], CHUNK + r * DL.RECORD + np.arange(6, 10))


def test_training_documents_deterministic():
    a = DL.training_documents(seed=1, step=4, num_docs=3)
    b = DL.training_documents(seed=1, step=4, num_docs=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], DL.training_documents(seed=1, step=5, num_docs=3)[0])
    assert not np.array_equal(a[0], DL.training_documents(seed=2, step=4, num_docs=3)[0])


@pytest.mark.parametrize("hard", [0.5, 0.9])
def test_training_documents_hard_keys(hard):
    """--hard-keys: a fraction of each document's keys are one-symbol variants of another of its
    keys (still unique, still all asked once), the definitions shuffled; hard = 0 is the plain data."""
    plain = DL.training_documents(seed=3, step=7, num_docs=4)
    np.testing.assert_array_equal(DL.training_documents(seed=3, step=7, num_docs=4, hard=0.0)[0], plain[0])
    tokens, labels = DL.training_documents(seed=3, step=7, num_docs=4, hard=hard)
    np.testing.assert_array_equal(labels != DL.IGNORE, plain[1] != DL.IGNORE)
    n_hard = round(hard * R)
    for doc in tokens:
        d, q = _records(doc[1:CHUNK], DL.KEY), _records(doc[CHUNK:], DL.QRY)
        assert sorted(q) == sorted(d) and len({k for k, _ in d}) == R
        keys = np.array([k for k, _ in d])
        differ = (keys[:, None] != keys[None]).sum(-1)
        np.fill_diagonal(differ, 9)
        near = differ.min(1) == 1
        assert near.sum() >= n_hard + 1  # each variant and its original have a one-symbol neighbour
    with pytest.raises(ValueError, match="hard"):
        DL.training_documents(seed=3, step=7, num_docs=1, hard=1.0)


def test_eval_document_queries_need_memory():
    doc = DL.eval_document(seed=5, memory_tokens=3000, num_query_chunks=3)
    defs, queries, labels = doc["definitions"], doc["queries"], doc["labels"]
    assert defs.shape == (12, CHUNK) and queries.shape == labels.shape == (3, CHUNK)  # ceil(3000 / 256)
    table = {}
    for chunk_idx, c in enumerate(defs):
        assert c[0] == DL.BOS
        for k, v in _records(c[1:], DL.KEY):
            assert k not in table  # keys unique in the whole document
            table[k] = (v, chunk_idx)
    assert len(table) == 12 * R
    for i, qc in enumerate(queries):
        q = _records(qc, DL.QRY)
        assert len(q) == R and len({k for k, _ in q}) == R
        for j, (k, v) in enumerate(q):
            assert table[k] == (v, doc["query_source"][i, j])
        assert not np.isin(qc, [DL.KEY, DL.BOS]).any()  # the local window holds no definition
        np.testing.assert_array_equal(np.flatnonzero(labels[i] != DL.IGNORE), DL.value_positions(CHUNK))
    # queries drawn from the whole memory, not only the last chunk
    assert len(np.unique(doc["query_source"])) > 3
    again = DL.eval_document(seed=5, memory_tokens=3000, num_query_chunks=3)
    for key in doc:
        np.testing.assert_array_equal(doc[key], again[key])


def test_unique_codes_and_value_metrics():
    rng = np.random.default_rng(0)
    codes = DL.unique_codes(rng, 5000)
    assert np.unique(codes).size == 5000 and codes.min() >= 0 and codes.max() < DL.NUM_KEYS
    sym = DL.codes_to_symbols(np.array([0, DL.NUM_KEYS - 1, 64 + 2]))
    np.testing.assert_array_equal(sym, [[0, 0, 0, 0], [63, 63, 63, 63], [0, 0, 1, 2]])
    tokens, labels = DL.query_chunks(*(rng.integers(0, 64, size=(2, R, 4)) for _ in range(2)))
    logits = torch.randn(2, CHUNK, DL.VOCAB_SIZE)
    logits[:, :-1].scatter_(2, torch.from_numpy(tokens[:, 1:, None]), 100.0)  # perfect prediction
    assert DL.value_metrics(logits, torch.from_numpy(labels)) == (2 * R * 4, 2 * R * 4, 2 * R, 2 * R)
    logits[0, DL.value_positions()[5] - 1] = 0  # ruin the 2nd value token of query 1 of row 0
    logits[0, DL.value_positions()[5] - 1, DL.PAD] = 100.0
    assert DL.value_metrics(logits, torch.from_numpy(labels)) == (2 * R * 4 - 1, 2 * R * 4, 2 * R - 1, 2 * R)


def _args(**kw):
    base = dict(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, memory_layer=None, seed=0, chunk=64)
    base.update(kw)
    return type("Args", (), base)()


def _tiny(variant="fot", chunk=64):
    model = DL.build_model(_args(chunk=chunk), variant)
    torch.manual_seed(1)
    with torch.no_grad():  # sharper random attention than the 0.02 init
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def test_fast_fill_matches_package_windowed_forward():
    """The memory the eval fills in batches (layers below the memory layer only) is the memory the
    package's windowed forward builds, and the query logits through enable_memory agree."""
    model = _tiny()
    layer = model.config.mem_layers[0]
    assert layer == 1
    doc = DL.eval_document(seed=2, memory_tokens=64 * 6, num_query_chunks=2, chunk=64)
    defs, queries = torch.from_numpy(doc["definitions"]), torch.from_numpy(doc["queries"])
    args = dict(topk=8, mem_dtype=torch.float32)
    fast, _, _ = DL.memory_logits(model, defs, queries, [layer], fill="fast", fill_batch=4, **args)
    slow, _, _ = DL.memory_logits(model, defs, queries, [layer], fill="package", **args)
    assert fast.shape == (2, 64, DL.VOCAB_SIZE) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    store = DL.fill_memory_fast(model, defs, layer, torch.float32, batch=4)
    view = store.view(layer)
    assert view.keys.shape == (1, 2, 6 * 64, 8)
    # the memory matters: an empty-ish memory (other definitions) changes the query logits
    other = torch.from_numpy(
        DL.eval_document(seed=9, memory_tokens=64 * 6, num_query_chunks=1, chunk=64)["definitions"]
    )
    changed, _, _ = DL.memory_logits(model, other, queries[:1], [layer], fill="fast", **args)
    assert (changed - fast[:1]).abs().max() > 1e-3


def test_fallback_crossbatch_matches_package():
    pytest.importorskip("fot_kernels.integrations.transformers", reason="transformers integration")
    from fot_kernels.integrations import transformers as hf

    if not hasattr(hf, "enable_crossbatch"):
        pytest.skip("enable_crossbatch is not in the package yet")
    tokens, labels = DL.training_documents(seed=0, step=0, num_docs=3, chunk=64)
    ids, lab = torch.from_numpy(tokens.reshape(6, 64)), torch.from_numpy(labels.reshape(6, 64))
    results = {}
    for impl in ("package", "fallback"):
        model = _tiny()
        model.train()
        cb = DL.CrossBatch(model, model.config.mem_layers, packing=2, stepping=True, impl=impl)
        cb.set_range(3)
        out = model(input_ids=ids, labels=lab)
        out.loss.backward()
        results[impl] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        cb.set_range(1)  # re-enable with another range works
        model(input_ids=ids)
        cb.disable()
        assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(results["package"][0], results["fallback"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["package"][1].items():
        torch.testing.assert_close(grad, results["fallback"][1][name], atol=1e-5, rtol=1e-4)


def test_end_to_end_train_eval_report(tmp_path):
    """A few training steps of each variant, eval JSONs, resume, and the report."""
    small = ["--chunk", "64", "--hidden", "32", "--layers", "3", "--heads", "4", "--kv-heads", "2", "--threads", "1"]
    common = ["--batch-size", "4", "--log-every", "2", "--quiet", *small]
    fot = tmp_path / "fot"
    meta = DL.main(["train", "--out", str(fot), "--steps", "5", "--stop-step", "3", "--d-max", "3",
                    "--switch-step", "2", "--switch-window", "1", "--hard-keys", "0.5", *common])  # fmt: skip
    assert "--stop-step 3: stop" in (fot / "train.log").read_text()
    assert meta["variant"] == "fot" and meta["phase"] == 1 and meta["memory_layers"] == [1]
    log = [json.loads(line) for line in (fot / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3] and np.isfinite(log[-1]["loss"])
    assert [r["d"] for r in log] == [1, 3]  # d = 1, then d_max from the step after --switch-step
    assert "d 1 -> 3" in (fot / "train.log").read_text()
    assert (fot / "model.safetensors").stat().st_size < 20 * 2**20
    saved = json.loads((fot / DL.CONFIG_NAME).read_text())
    assert saved["step"] == 3 and saved["crossbatch_impl"] in ("package", "fallback")
    # resume continues at the saved step
    DL.main(["train", "--out", str(fot), "--steps", "4", "--resume", "--d-max", "3", *common])
    assert "resumed from" in (fot / "train.log").read_text()
    assert json.loads((fot / DL.CONFIG_NAME).read_text())["step"] == 4
    base = tmp_path / "base"
    DL.main(["train", "--out", str(base), "--steps", "2", "--baseline", *common])
    nonneg = tmp_path / "noneg"  # FoT-style continued training from the baseline's weights
    meta = DL.main(["train", "--out", str(nonneg), "--steps", "2", "--no-negatives", "--init-from", str(base), *common])
    assert meta["variant"] == "no-negatives" and meta["memory_layers"] == [1]
    assert "initialised from" in (nonneg / "train.log").read_text()
    results = tmp_path / "results"
    for ckpt in (fot, base, nonneg):
        for mem in (256, 1024):
            path = results / f"{ckpt.name}_{mem}.json"
            DL.main(["eval", "--checkpoint", str(ckpt), "--memory-tokens", str(mem), "--queries", "12", "--topk", "4",
                     "--json", str(path), "--threads", "1"])  # fmt: skip
            data = json.loads(path.read_text())
            assert data["memory_tokens"] == mem and data["queries"] == 12
            assert 0.0 <= data["accuracy"] <= data["token_accuracy"] <= 1.0
            assert data["total_s"] > 0 and "fill_s" in data and "query_s" in data
            assert data["variant"] == {"fot": "fot", "base": "baseline", "noneg": "no-negatives"}[ckpt.name]
    # the memory sharded over 2 gloo ranks (1/2 each, enable_memory(process_group=...); bf16 memory; the fill
    # shared in rounds of 2 batches of 3 chunks, the last round partial): the same logits
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for ranks, out in ((1, one), (2, two)):
        DL.main(["eval", "--checkpoint", str(fot), "--memory-tokens", "1024", "--queries", "12", "--topk", "4",
                 "--threads", "1", "--ranks", str(ranks), "--timeout", "300", "--fill-batch", "3",
                 "--logits-out", str(out), "--json", str(tmp_path / f"ranks{ranks}.json")])  # fmt: skip
    sharded = json.loads((tmp_path / "ranks2.json").read_text())
    assert sharded["ranks"] == 2 and len(sharded["peak_rss_per_rank"]) == 2
    assert torch.isfinite(torch.load(one)).all()
    torch.testing.assert_close(torch.load(two), torch.load(one), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="baseline"):
        DL.main(["eval", "--checkpoint", str(base), "--memory-tokens", "256", "--ranks", "2"])
    text = DL.main(["report", "--results", str(results)])
    assert "| 1k |" in text and "baseline" in text and "no-negatives" in text
    assert (results / "accuracy.md").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (results / "accuracy.png").stat().st_size > 1000


def test_layout_is_the_k_packing_batchers():
    """The training batch layout (document s -> rows 2s, 2s+1) is what fot_kernels.training's
    K-packing batcher yields for these 512-token documents with packing = 2 and no bos/eos:
    every step's rows 2s, 2s+1 are the definition and query chunks of one document."""
    training = pytest.importorskip("fot_kernels.training")
    tokens, _ = DL.training_documents(seed=0, step=0, num_docs=12, chunk=64)
    dataset = training.KPackingDataset(list(tokens), batch_size=4, seq_len=64, packing=2)
    docs = {tuple(doc) for doc in tokens}
    steps = list(dataset)
    assert len(steps) >= 2
    for step in steps:
        rows = step["input_ids"].numpy()
        assert rows.shape == (4, 64)
        for s in range(2):
            assert tuple(np.concatenate([rows[2 * s], rows[2 * s + 1]])) in docs


def test_committed_checkpoints_answer_from_memory(tmp_path):
    """The committed FoT checkpoint (benchmarks/results/dictionary_lookup/fot, trained with
    enable_crossbatch) answers through enable_memory(topk=32) from a 16k-token memory, as its
    results table says (100%); the 512-context baseline cannot (its window holds 1/64 of them)."""
    results = Path(DL.__file__).resolve().parent / "results" / "dictionary_lookup"
    out = {}
    for variant in ("fot", "baseline"):
        path = tmp_path / f"{variant}.json"
        DL.main(["eval", "--checkpoint", str(results / variant), "--memory-tokens", "16384", "--queries", "100",
                 "--threads", "1", "--json", str(path)])  # fmt: skip
        out[variant] = json.loads(path.read_text())
    assert out["fot"]["variant"] == "fot" and out["fot"]["topk"] == 32 and out["fot"]["queries"] == 100
    assert out["fot"]["accuracy"] >= 0.95
    assert out["baseline"]["accuracy"] <= 0.1
