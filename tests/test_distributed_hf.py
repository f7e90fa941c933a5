"""Sharded memory inference of a Hugging Face model: ``enable_memory(..., process_group=pg)`` over
2 and 3 gloo ranks started by the test itself (one spawn per world size runs every case).

Every rank runs the same tiny random Llama (same seed) on the same inputs and keeps 1/P of the
memory; it must generate the tokens that one process with the whole memory generates, with logits
within the flash-attention tolerance rule of the float64 model (one process, float64 weights and
memory) and the same bits on every rank. Also: the union of the ranks' slots is exactly the
unsharded store's content after overflow (FIFO eviction of the global capacity), save/load per
rank, and an error on one rank (bad input, a failing layer, inputs that differ) raised on every
rank, never a hang (collective timeout + a deadline on the whole spawn). In the children
torch.empty & co. return NaN-filled tensors.
"""

from __future__ import annotations

import json
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist import poison_empty, run_spawned

pytest.importorskip("transformers", minversion="5.0")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

WORLDS = (2, 3)
DEADLINE_S = 240  # one spawn, start-up included; a hang fails here
COLLECTIVE_TIMEOUT_S = 90
WINDOW, LAST, CAPACITY, LAYERS = 16, 8, 24, (1, 3)  # CAPACITY: a multiple of every world size, < the context
STEPS = 8  # generated tokens


def tiny_llama(seed: int = 0, dtype=torch.float32):
    """A tiny random Llama (GQA, head dim 12), the same on every rank for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=WINDOW, initializer_range=0.2, pad_token_id=0,
        eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().to(dtype)


def inputs(seed: int = 1, length: int = 70):
    """Two rows, the second left-padded (padding slots enter memory as in the unsharded store)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def enable(model, topk, group=None, mem_dtype=None):
    from fot_kernels.integrations.transformers import enable_memory

    enable_memory(model, list(LAYERS), topk=topk, capacity=CAPACITY, last_context_length=LAST, window=WINDOW,
                  mem_dtype=mem_dtype, process_group=group)  # fmt: skip
    return model


def generate(model, ids, mask):
    """Greedy tokens [B, STEPS], per-step logits [B, STEPS, V] and the cache."""
    cache = model.fot_memory.new_cache()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=STEPS, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1), cache


def same_on_every_rank(group, *tensors: torch.Tensor) -> None:
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, flat, group=group)
        for r, p in enumerate(parts):
            if not torch.equal(p.nan_to_num(1e300), flat.nan_to_num(1e300)):
                raise AssertionError(f"result differs between this rank and rank {r}")


def gather_objects(group, obj) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# --------------------------------------------------------------------------------------------
# Cases: case(group, rank, world, tmp_dir)
# --------------------------------------------------------------------------------------------


def _slot_table(cache, layer: int, row: int) -> torch.Tensor:
    """One row's slots of a layer as rows [key | value | valid] (float64), sorted by key[0, 0]
    (the slot's column number, written there by the test)."""
    keys, values, valid = cache.memory.slots_in_order(layer, row)  # [H, n, D], [H, n, D], [n]
    heads, n, dim = keys.shape
    table = torch.cat([keys.transpose(0, 1).reshape(n, heads * dim), values.transpose(0, 1).reshape(n, heads * dim),
                       valid[:, None].double()], 1).double()  # fmt: skip
    return table[table[:, 0].argsort()]


def case_union_of_shards_is_the_unsharded_store(group, rank, world, tmp_dir):
    """Appends of uneven sizes (one empty, one larger than the capacity), padding, a partial row
    reset: after every append, the ranks' slots together are exactly the unsharded store's, each
    rank preallocates capacity / P slots and holds its share."""
    from fot_kernels.integrations.transformers import MemoryCache

    batch, heads, dim, layers = 3, 2, 5, [0, 2]
    full = MemoryCache(3, layers, window=4, capacity=CAPACITY, mem_dtype=torch.float64)
    mine = MemoryCache(3, layers, window=4, capacity=CAPACITY, mem_dtype=torch.float64, process_group=group)
    assert mine.shard_capacity == CAPACITY // world
    gen = torch.Generator().manual_seed(11)
    column = 0
    for step, n in enumerate([5, 1, 7, 3, 0, 29, 2, 4, 9, 1, 6, 11]):
        keys = torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64)
        keys[:, :, :, 0] = torch.arange(column, column + n, dtype=torch.float64)  # the column, to sort by
        values = torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64)
        valid = torch.rand(batch, n, generator=gen) > 0.3
        for layer in layers:
            full._append_memory(layer, keys, values, valid)
            mine._append_memory(layer, keys, values, valid)
        column += n
        if step == 6:  # a new document in row 1 only
            full.reset_memory([1])
            mine.reset_memory([1])
        assert mine.memory.capacity == CAPACITY // world
        places = [(layer, row) for layer in layers for row in range(batch)]
        everyone = gather_objects(group, [_slot_table(mine, layer, row) for layer, row in places])  # [P][places]
        for i, (layer, row) in enumerate(places):
            shards = [tables[i] for tables in everyone]
            union = torch.cat(shards, 0)
            union = union[union[:, 0].argsort()]
            want = _slot_table(full, layer, row)
            assert torch.equal(union, want), f"step {step}, layer {layer}, row {row}: union != unsharded store"
            sizes = [s.shape[0] for s in shards]
            assert max(sizes) - min(sizes) <= 1, f"unbalanced shards {sizes}"
    assert column > CAPACITY  # the test did overflow


def case_generate_like_one_process(group, rank, world, tmp_dir):
    """Dense and kNN memory: greedy tokens equal to one process with the whole memory (and the
    float64 model), logits within the tolerance rule, the same bits on every rank, 1/P of the
    slots per rank (their sum: the unsharded store's)."""
    from fot_kernels.testing import assert_close_to_reference

    ids, mask = inputs()
    for topk in (None, 3):
        hi_tokens, hi_logits, _ = generate(enable(tiny_llama(dtype=torch.float64), topk, mem_dtype=torch.float64),
                                           ids, mask)  # fmt: skip
        lo_tokens, lo_logits, lo_cache = generate(enable(tiny_llama(), topk), ids, mask)
        tokens, logits, cache = generate(enable(tiny_llama(), topk, group), ids, mask)
        assert torch.equal(lo_tokens, hi_tokens), f"topk={topk}: the float32 model differs from float64 (seed?)"
        assert torch.equal(tokens, lo_tokens), f"topk={topk}: sharded tokens {tokens} != one process {lo_tokens}"
        assert not torch.isnan(logits).any()
        assert_close_to_reference(logits, hi_logits, lo_logits, f"logits (topk={topk}, {world} ranks)")
        same_on_every_rank(group, tokens, logits)
        assert cache.memory.capacity == CAPACITY // world
        for layer in LAYERS:
            held = torch.stack(gather_objects(group, cache.memory.lengths(layer)))  # [P, B]
            assert torch.equal(held.sum(0), lo_cache.memory.lengths(layer)), f"slots {held} != {lo_cache.memory}"
            assert int(held.sum(0).min()) == CAPACITY, "the context overflows the capacity"
            assert int(held.max()) <= CAPACITY // world
    # beam search (reorders every rank's rows alike)
    with torch.no_grad():
        settings = dict(attention_mask=mask, max_new_tokens=STEPS, num_beams=2, do_sample=False)
        beams = enable(tiny_llama(), 3, group).generate(ids, **settings)
        assert torch.equal(beams, enable(tiny_llama(), 3).generate(ids, **settings))
    same_on_every_rank(group, beams)


def case_training_steps_like_one_process(group, rank, world, tmp_dir):
    """Training through sharded memory layers: a model in train mode with enable_memory(...,
    process_group) (the early windows go to the sharded memory, the last part attends to it with
    gradients) takes SGD steps; every parameter's gradient at every step is within the tolerance
    rule of one process with the whole memory (float64 model vs float32), finite, non-zero in the
    memory layers' projections, and the same bits on every rank (d query is all-reduced)."""
    from fot_kernels.testing import assert_close_to_reference

    ids, mask = inputs(seed=3, length=45)
    labels = ids.masked_fill(mask == 0, -100)
    for topk in (None, 3):
        models = [enable(tiny_llama(dtype=torch.float64), topk, mem_dtype=torch.float64), enable(tiny_llama(), topk),
                  enable(tiny_llama(), topk, group)]  # fmt: skip
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        for step in range(2):
            grads = []
            for model, opt in zip(models, optimizers):
                model.train()
                opt.zero_grad()
                out = model(ids, attention_mask=mask, labels=labels)
                assert out.loss.requires_grad
                out.loss.backward()
                grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
                opt.step()
            hi, lo, got = grads
            for name, g in got.items():
                assert torch.isfinite(g).all(), f"step {step}: {name}"
                assert_close_to_reference(g, hi[name], lo[name], f"step {step}, topk={topk}: d {name}")
            for layer in LAYERS:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    g = got[f"model.layers.{layer}.self_attn.{proj}.weight"]
                    assert g.abs().max() > 0, f"step {step}: layer {layer} {proj} gradient is 0"
            same_on_every_rank(group, *got.values())


def case_save_load_per_rank(group, rank, world, tmp_dir):
    from fot_kernels.integrations.transformers import MemoryCache
    from fot_kernels.integrations.transformers.cache import SHARD_METADATA
    from fot_kernels.memory import MemoryFileError

    doc, question = inputs(seed=2, length=50)[0], inputs(seed=3, length=5)[0]
    model = enable(tiny_llama(), 3, group)
    plain = enable(tiny_llama(), 3)
    path = f"{tmp_dir}/mem-{world}-{rank}.safetensors"
    plain_path = f"{tmp_dir}/plain-{world}-{rank}.safetensors"
    with torch.no_grad():
        cache = model.fot_memory.new_cache()
        model(doc, cache=cache, use_cache=False)
        cache.save_memory(path)
        expected = model(question, cache=cache, use_cache=False).logits
        other = model.fot_memory.new_cache()
        other.load_memory(path)
        got = model(question, cache=other, use_cache=False).logits
        assert torch.equal(got, expected), "a reloaded shard continues exactly"
        assert other._columns == cache._columns
        plain_cache = plain.fot_memory.new_cache()
        plain(doc, cache=plain_cache, use_cache=False)
        plain_cache.save_memory(plain_path)
    dist.barrier(group)  # every rank's file exists

    def refused(load, *fragments):
        try:
            load()
        except MemoryFileError as exc:
            for fragment in fragments:
                assert fragment in str(exc), f"{fragment!r} not in {exc}"
            return
        raise AssertionError("the file was accepted")

    peer = f"{tmp_dir}/mem-{world}-{(rank + 1) % world}.safetensors"
    refused(lambda: model.fot_memory.new_cache().load_memory(peer), f"rank: file has {(rank + 1) % world}")
    local = CAPACITY // world
    refused(lambda: model.fot_memory.new_cache().load_memory(plain_path),
            f"capacity: file has {CAPACITY}, expected {local}", f"rank {rank} of {world}")  # fmt: skip
    refused(lambda: plain.fot_memory.new_cache().load_memory(path), f"capacity: file has {local}", "sharded cache")
    # the same slots per rank file as an unsharded cache of capacity / P: the shard entry refuses it
    small = MemoryCache(4, list(LAYERS), window=4, capacity=local, mem_dtype=torch.float32)
    refused(lambda: small.load_memory(path), "not sharded")
    forged = f"{tmp_dir}/forged-{world}-{rank}.safetensors"
    shard = cache._shard_metadata() | {"world_size": world + 1}
    cache.memory.save(forged, metadata={SHARD_METADATA: json.dumps(shard)})
    refused(lambda: model.fot_memory.new_cache().load_memory(forged), f"world_size: file has {world + 1}")
    blob = bytearray(Path(path).read_bytes())
    blob[-3] ^= 1
    corrupt = f"{tmp_dir}/corrupt-{world}-{rank}.safetensors"
    Path(corrupt).write_bytes(bytes(blob))
    refused(lambda: model.fot_memory.new_cache().load_memory(corrupt), "checksum")
    dist.barrier(group)


def _raises_everywhere(group, fn, cls, fragment):
    try:
        fn()
    except cls as exc:
        assert fragment in str(exc), f"{fragment!r} not in {exc}"
    else:
        raise AssertionError(f"no {cls.__name__} on this rank")
    same_on_every_rank(group, torch.ones(1))  # the ranks' collectives are still aligned


def case_error_on_one_rank_raises_everywhere(group, rank, world, tmp_dir):
    from fot_kernels.integrations.transformers import enable_memory

    ids, mask = inputs()
    last = rank == world - 1
    model = enable(tiny_llama(), 3, group)
    with torch.no_grad():
        # bad input on one rank, found before any collective of the forward
        positions = torch.arange(ids.shape[1]).expand(2, -1)
        bad = positions.float() if last else positions
        _raises_everywhere(group, lambda: model(ids, position_ids=bad, cache=model.fot_memory.new_cache()),
                           TypeError, "position_ids must be an integer tensor")  # fmt: skip
        # a layer failing on one rank between two memory layers' collectives
        mlp = model.model.layers[2].mlp
        real = mlp.forward

        def broken(*args, **kwargs):
            raise RuntimeError("layer 2 broke")

        if last:
            mlp.forward = broken
        _raises_everywhere(group, lambda: model(ids, cache=model.fot_memory.new_cache()), RuntimeError,
                           "layer 2 broke")  # fmt: skip
        mlp.forward = real
        # inputs that differ between the ranks
        longer = torch.cat([ids, ids[:, :WINDOW]], 1) if last else ids
        _raises_everywhere(group, lambda: model(longer, cache=model.fot_memory.new_cache()), ValueError,
                           "on every rank")  # fmt: skip
        # the same mistake on every rank: a cache of the unsharded model
        plain = enable(tiny_llama(), 3)
        _raises_everywhere(group, lambda: model(ids, cache=plain.fot_memory.new_cache()), ValueError,
                           "another process group")  # fmt: skip
        # a global capacity that the ranks cannot share evenly: refused before the model changes
        other = tiny_llama()
        for bad_capacity in (CAPACITY + 1, CAPACITY + world - 1):
            try:
                enable_memory(other, list(LAYERS), capacity=bad_capacity, process_group=group)
            except ValueError as exc:
                assert "multiple of the process group's size" in str(exc), exc
            else:
                raise AssertionError(f"capacity {bad_capacity} with {world} ranks was accepted")
            assert not hasattr(other, "fot_memory")
        # the group still works: a normal forward, the same on every rank
        logits = model(ids, attention_mask=mask, cache=model.fot_memory.new_cache()).logits
        same_on_every_rank(group, logits)


CASES = [
    case_union_of_shards_is_the_unsharded_store,
    case_generate_like_one_process,
    case_training_steps_like_one_process,
    case_save_load_per_rank,
    case_error_on_one_rank_raises_everywhere,
]


# --------------------------------------------------------------------------------------------
# The spawn
# --------------------------------------------------------------------------------------------


def _worker(rank: int, init_file: str, results, world: int, tmp_dir: str) -> None:
    report = {}
    try:
        torch.set_num_threads(1)
        poison_empty()
        import transformers

        transformers.logging.set_verbosity_error()  # the tiny model's max_position_embeddings < generated length
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
        for case in CASES:
            started = time.perf_counter()
            try:
                case(dist.group.WORLD, rank, world, tmp_dir)
                report[case.__name__] = (None, time.perf_counter() - started)
            except Exception:
                report[case.__name__] = (traceback.format_exc(), time.perf_counter() - started)
        dist.destroy_process_group()
    except BaseException:
        report[("worker", "")] = (traceback.format_exc(), 0.0)
    results.put((rank, report))


_REPORTS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """world -> {rank: {case: (traceback | None, seconds)}}, one spawn per world size, on demand."""
    from fot_kernels.backends import _cpu_ext

    _cpu_ext.load()  # build (or find) the C++ CPU kernels once here, not in every child at once

    def reports(world: int) -> dict[int, dict]:
        if world not in _REPORTS:
            tmp = tmp_path_factory.mktemp(f"dist_hf_{world}")
            _REPORTS[world] = run_spawned(_worker, world, str(tmp / "init"), DEADLINE_S, (world, str(tmp)))
            slowest = sorted(((t, c) for rep in _REPORTS[world].values() for c, (_, t) in rep.items()), reverse=True)
            print(f"slowest cases with {world} ranks (s):", [(round(t, 1), c) for t, c in slowest[:4]])
        return _REPORTS[world]

    return reports


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [c.__name__ for c in CASES])
def test_sharded_memory(spawned, world, case):
    reports = spawned(world)
    failures = []
    for rank in range(world):
        outcome = reports[rank].get(case)
        if outcome is None:
            failures.append(f"--- rank {rank}: case did not run")
        elif outcome[0] is not None:
            failures.append(f"--- rank {rank} of {world}:\n{outcome[0]}")
    if failures:
        pytest.fail("\n".join(failures))


def test_process_group_is_checked_before_the_model_changes():
    from fot_kernels.integrations.transformers import MemoryCache

    model = tiny_llama()
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="initialised"):
            enable(model, None, group=object())
        with pytest.raises(RuntimeError, match="initialised"):
            MemoryCache(2, [1], window=4, capacity=8, mem_dtype=torch.float32, process_group=object())
        assert not hasattr(model, "fot_memory")


def test_memory_file_metadata_round_trip_and_checks(tmp_path):
    """MemoryStore.save(metadata=) (what a sharded cache's file carries): checksummed, returned by
    load as file_metadata; the format's own entries and non-strings are refused."""
    from fot_kernels.memory import MemoryFileError, MemoryStore

    store = MemoryStore([2], batch_size=1, num_kv_heads=1, head_dim=3, capacity=4, dtype=torch.float32)
    store.append(2, torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3))
    store.save(tmp_path / "m", metadata={"fot_shard": '{"rank": 1}'})
    assert MemoryStore.load(tmp_path / "m").file_metadata == {"fot_shard": '{"rank": 1}'}
    store.save(tmp_path / "plain")
    assert MemoryStore.load(tmp_path / "plain").file_metadata == {}
    with pytest.raises(ValueError, match="format's own entries"):
        store.save(tmp_path / "x", metadata={"geometry": "{}"})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        store.save(tmp_path / "x", metadata={"rank": 1})
    with pytest.raises(ValueError, match="64 zeros"):
        store.save(tmp_path / "x", metadata={"note": "0" * 64})
    blob = bytearray((tmp_path / "m").read_bytes())
    at = blob.index(b'{\\"rank\\": 1}')
    blob[at + 11] = ord("2")  # the entry says rank 2 now: the checksum catches it
    (tmp_path / "m").write_bytes(bytes(blob))
    with pytest.raises(MemoryFileError, match="checksum"):
        MemoryStore.load(tmp_path / "m")


def test_the_torchrun_example_runs(tmp_path):
    """examples/sharded_memory.py under torchrun (2 gloo ranks, the standalone rendezvous on the
    loopback address): the ranks' memory shares add up to the whole memory, rank 0 finds the same
    tokens as one process with the whole memory, and each rank saved its share."""
    import os
    import re
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "sharded_memory.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(example),
           "--tokens", "700", "--window", "64", "--new", "6", "--check", "--save", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    held = [int(n) for n in re.findall(r"rank \d/2: holds (\d+) of the memory slots", out)]
    whole = re.search(r"one process with the whole memory \((\d+) slots\): the same tokens", out)
    assert len(held) == 2 and whole is not None, out[-5000:]
    assert sum(held) == int(whole.group(1)) > 0 and abs(held[0] - held[1]) <= 1
    assert (tmp_path / "rank0.mem").exists() and (tmp_path / "rank1.mem").exists()
