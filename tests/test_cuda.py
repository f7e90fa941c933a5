"""The cuda backend (csrc/cuda kernels) against the float64 reference, torch.library.opcheck of
its custom ops, and the CUDA emulator's own checks.

Every test runs twice: "emulated" runs the kernels on the CPU through tests/cuda_emu (the same
sources compiled as host C++ with threads as fibers; runs in CI, which has no GPU), "gpu" on a
CUDA device with the built extension (skipped without one). The emulated runs also check that the
results do not depend on the order in which threads and blocks run (a race detector) and that the
emulator catches the bugs it claims to.

The cases every backend shares (odd head dims, GQA, masks, lengths, ties, NaN keys, decode, empty
memory, every dtype pairing) run against the cuda backend in tests/test_backends.py (the `impl`
fixture's "cuda-emulated" and "cuda"); this module adds what is specific to these kernels: memory
long enough to split across blocks (and merge the splits), ties across splits, exactness of the
fp32 path with bf16 memory, tensor-core head dims, smaller shared-memory budgets, what is not
served, and the custom ops' opcheck / fake kernels / torch.compile. Tolerances: flash-attention's
rule (fot_kernels.testing.assert_close_to_reference) for attention, fot_kernels.testing.check_knn
for kNN (exact top-k against float64 scores, free only among rounding-level near-ties).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fot_kernels as fk
from fot_kernels.backends import cuda as CB
from fot_kernels.backends import reference
from fot_kernels.testing import assert_close_to_reference, check_knn
from _inputs import make_case
from conftest import emulate_cuda_backend


@pytest.fixture(params=["emulated", "gpu"])
def env(request, monkeypatch):
    """Where the kernels run: ``env.dev`` (the inputs' device), ``env.ops`` (the op namespace),
    ``env.emulated``."""
    if request.param == "emulated":
        ops = emulate_cuda_backend(monkeypatch)
        return SimpleNamespace(dev="cpu", ops=ops, emulated=True)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if CB.extension_status() is not None:
        pytest.skip(f"no CUDA extension: {CB.extension_status()}")
    # Leave NaN-filled blocks in the caching allocator so that outputs allocated with at::empty
    # likely start as NaN (the emulated build poisons its outputs itself).
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in [2**18] * 8 + [2**22] * 4]
    del blocks
    return SimpleNamespace(dev="cuda", ops=torch.ops.fot_cuda, emulated=False)


@pytest.fixture
def emulated(env):
    if not env.emulated:
        pytest.skip("checks of the CUDA emulator")
    return env


def _attention_against_reference(env, case, dtype_out, **kw):
    out, lse = fk.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                   return_lse=True, backend="cuda", **case.memory_kwargs(), **kw)  # fmt: skip
    hi = case.to(torch.float64)
    ref_hi, lse_hi = reference.memory_attention(hi.query, hi.key, hi.value, hi.mem_keys, hi.mem_values,
                                                **case.memory_kwargs(), **kw)  # fmt: skip
    ref_lo, lse_lo = reference.memory_attention(case.query, case.key, case.value, case.mem_keys, case.mem_values,
                                                **case.memory_kwargs(), **kw)  # fmt: skip
    assert out.dtype == dtype_out and lse.dtype == torch.float32 and out.device.type == env.dev
    assert_close_to_reference(out, ref_hi, ref_lo, "out")
    assert_close_to_reference(lse, lse_hi, lse_lo.float(), "lse")
    return out, lse


# ------------------------------------------------------------------------------------ knn_topk


def _launches(env) -> int | None:
    import cuda_emu

    return cuda_emu.stats()["launches"] if env.emulated else None


def test_knn_topk_fp32_query_bf16_memory_is_the_fp32_dot_of_upcast_values(env):
    case = make_case(1, 2, 1, 40, 1, 3000, 128, dtype=torch.float32, mem_dtype=torch.bfloat16, device=env.dev)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, 32, backend="cuda")
    upcast = case.mem_keys.double().repeat_interleave(2, dim=1)  # bf16 -> exact in float64
    exact = (case.query.double() @ upcast.transpose(-1, -2)).gather(-1, indices)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-5)  # fp32 rounding only, no TF32
    check_knn(scores, indices, case.query, case.mem_keys, 32)


def test_knn_topk_ties_across_splits_keep_lower_index(env):
    # identical keys spread over a long memory: the split merge must keep the lowest indices
    keys = torch.randn(1, 1, 30_000, 64, device=env.dev) * 0.01
    keys[0, 0, ::997] = 1.0  # 31 slots with the same (largest) score
    query = torch.ones(1, 1, 1, 64, device=env.dev)
    before = _launches(env)
    scores, indices = fk.knn_topk(query, keys, 8, backend="cuda")
    assert indices[0, 0, 0].tolist() == list(range(0, 30_000, 997))[:8]
    if env.emulated:
        assert _launches(env) - before == 2, "the memory was not split (scan + merge)"


@pytest.mark.parametrize("num_sms", [1, 8, 132])
def test_knn_scan_selection_edge_cases(env, num_sms):
    """The scan's selection (packed keys, candidate buffer, sort, merge by rank, split merge) on
    exact scores (D = 1, query 1): many ties (also +0 / -0), NaN, -inf, masks, lengths, k from 1
    to 256, as many splits as the emulated SM count gives."""
    if not env.emulated and num_sms != 132:
        pytest.skip("the SM count is the device's")
    if env.emulated:
        import cuda_emu

        cuda_emu.configure(num_sms=num_sms)
    gen = torch.Generator().manual_seed(num_sms)
    for trial in range(14):
        m = int(torch.randint(0, 3000, (1,), generator=gen))
        k = [1, 5, 32, 33, 64, 100, 256][trial % 7]
        s = torch.randn(2, m, generator=gen)
        if m > 8:
            if trial % 2 == 0:
                s = (s * 2).round() / 2  # many exact ties
            s[:, torch.randint(0, m, (3,), generator=gen)] = float("nan")
            s[:, torch.randint(0, m, (2,), generator=gen)] = float("-inf")
            s[:, :2] = torch.tensor([0.0, -0.0])
        keys = s.reshape(2, 1, m, 1).to(env.dev)
        mask = (torch.rand(2, m, generator=gen) > 0.2).to(env.dev)
        lengths = torch.tensor([m, m // 2], device=env.dev)
        query = torch.ones(2, 1, 1, 1, device=env.dev)
        got_s, got_i = env.ops.knn_scan(query, keys, lengths, mask, k)
        ref_s, ref_i = reference.knn_topk(query.cpu(), keys.cpu(), k, mem_lengths=lengths.cpu(), mem_mask=mask.cpu())
        assert got_i.cpu().tolist() == ref_i.tolist(), (trial, m, k)
        assert got_s.cpu().tolist() == ref_s.tolist(), (trial, m, k)


@pytest.mark.parametrize("k", [32, 256])
def test_knn_topk_long_memory_splits_and_merges(env, k):
    m = 12_000 if env.emulated else 40_000
    case = make_case(1, 4, 2, 1, None, m, 128, dtype=torch.bfloat16, lengths=True, mask=True, device=env.dev)
    scores, indices = fk.knn_topk(case.query, case.mem_keys, k, backend="cuda", **case.memory_kwargs())
    check_knn(scores, indices, case.query, case.mem_keys, k, **case.memory_kwargs())


def test_unsupported_inputs_are_reported(env):
    case = make_case(1, 2, 1, 4, 4, 10, 8, device=env.dev)
    assert any("k=300" in r for r in CB.unsupported_reasons("knn_topk", case.query, case.mem_keys, topk=300))
    q64 = case.query.double()
    assert any("float64" in r for r in CB.unsupported_reasons("knn_topk", q64, case.mem_keys, topk=3))
    with pytest.raises(fk.BackendUnavailableError, match="k=300"):
        fk.knn_topk(case.query, case.mem_keys, 300, backend="cuda")
    q_grad = case.query.clone().requires_grad_()
    assert any("require grad" in r for r in CB.unsupported_reasons("knn_topk", q_grad, case.mem_keys, topk=3))
    with torch.no_grad():
        assert not CB.unsupported_reasons("knn_topk", q_grad, case.mem_keys, topk=3)


# ----------------------------------------------------------------------------- memory_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_memory_attention_tensor_core_head_dims(env, dtype, d):
    m = 700 if env.emulated else 3000
    case = make_case(1, 4, 4, 130, 130, m, d, dtype=dtype, lengths=True, mask=True, device=env.dev)
    for topk in (None, 64):
        _attention_against_reference(env, case, dtype, topk=topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lq", "lk"), [(1, 3000), (3, 2500), (700, 1100)])
def test_long_local_context_splits_the_causal_part(env, dtype, lq, lk):
    """Decoding (or short chunks) over a long local cache: the causal flash pass is split across
    blocks like the memory; splits that start past a row's last visible key add nothing."""
    case = make_case(1, 4, 2, lq, lk, 300, 64, dtype=dtype, lengths=True, device=env.dev)
    before = _launches(env)
    _attention_against_reference(env, case, dtype, topk=None, causal=True)
    if env.emulated and lq < 700:  # the local scan and its split merge, the (short: unsplit) memory scan
        assert _launches(env) - before == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_shared_memory_budget_picks_smaller_tiles(emulated, dtype):
    """A device with 99 KB of shared memory per block (sm_86 / 89 / 120, e.g. an RTX 4090, against an
    H100's 227 KB): the plans fall back to smaller tiles, down to 16-slot attention tiles and 32-slot
    kNN tiles for D=256, k=256 (tests/test_cuda_compile.py tabulates every plan); with 48 KB an
    fp32 D=256 k=256 scan no longer fits and is refused with a message."""
    import cuda_emu

    cuda_emu.configure(smem_optin=99 * 1024)
    case = make_case(1, 4, 2, 70, 70, 1500, 128, dtype=dtype, lengths=True, mask=True, device="cpu")
    for topk in (None, 16):
        _attention_against_reference(emulated, case, dtype, topk=topk)
    case = make_case(1, 2, 1, 6, 6, 700, 256, dtype=dtype, lengths=True, mask=True, device="cpu")
    _attention_against_reference(emulated, case, dtype, topk=256)
    _attention_against_reference(emulated, case, dtype, topk=None)
    assert 0 < cuda_emu.stats()["max_dynamic_smem"] <= 99 * 1024
    cuda_emu.configure(smem_optin=48 * 1024)
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(RuntimeError, match="shared memory does not fit"):
        emulated.ops.knn_scan(q, torch.randn(1, 1, 100, 256), None, None, 256)


# ------------------------------------------------------------------------------ custom ops


def _op_samples(env):
    torch.manual_seed(1)
    q = torch.randn(2, 2, 9, 40, device=env.dev)
    mk = torch.randn(2, 2, 300, 40, device=env.dev, dtype=torch.bfloat16)
    mv = torch.randn_like(mk)
    lengths = torch.tensor([300, 123], device=env.dev)
    mask = torch.rand(2, 300, device=env.dev) > 0.3
    scores, indices = env.ops.knn_scan(q, mk, lengths, mask, 12)
    return {
        "knn_scan": [(q, mk, lengths, mask, 12), (q.bfloat16(), mk, None, None, 5)],
        "flash_scan": [(q, mk, mv, lengths, mask, 0.2, 0), (q.bfloat16(), mk, mv, None, None, 0.2, 3)],
        "gather_attention": [(scores, indices, mv, 0.2)],
    }


@pytest.mark.parametrize("name", ["knn_scan", "flash_scan", "gather_attention"])
def test_opcheck(env, name):
    op = getattr(env.ops, name).default
    for args in _op_samples(env)[name]:
        torch.library.opcheck(op, args)


def test_op_input_checks_name_the_tensor(env):
    q = torch.randn(1, 2, 3, 8, device=env.dev)
    mk = torch.randn(1, 2, 10, 8, device=env.dev)
    with pytest.raises(RuntimeError, match="mem_keys must have shape"):
        env.ops.knn_scan(q, mk[:, :1], None, None, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        env.ops.knn_scan(q, mk, None, None, 1000)
    with pytest.raises(RuntimeError, match="query must be float32 or have mem_keys"):
        env.ops.knn_scan(q.half(), mk.bfloat16(), None, None, 2)
    with pytest.raises(RuntimeError, match="mem_mask must have shape"):
        env.ops.knn_scan(q, mk, None, torch.ones(1, 9, dtype=torch.bool, device=env.dev), 2)
    with pytest.raises(RuntimeError, match="values must have keys' dtype"):
        env.ops.flash_scan(q, mk, mk.half(), None, None, 1.0, 0)


def test_torch_compile_traces_the_ops(env):
    case = make_case(1, 2, 1, 5, 5, 200, 32, device=env.dev)

    def f(q, k, v, mk, mv):
        return fk.memory_attention(q, k, v, mk, mv, topk=8, backend="cuda")

    args = (case.query, case.key, case.value, case.mem_keys, case.mem_values)
    eager = f(*args)
    # the emulated ops are CPU ops: aot_eager traces them through their fakes without inductor's
    # C++ code generation
    compiled = torch.compile(f, fullgraph=False, backend="aot_eager" if env.emulated else "inductor")(*args)
    torch.testing.assert_close(compiled, eager)


# ------------------------------------------------------------------ the emulator's own checks


def test_results_do_not_depend_on_thread_or_block_order(emulated):
    """A race (a missing barrier, a read of another lane's write without __syncwarp) makes the
    result depend on the order threads run between barriers: forward, reverse and shuffled
    schedules must agree bit for bit."""
    import cuda_emu

    ops = emulated.ops
    q = torch.randn(1, 2, 70, 100)
    keys, values = torch.randn(1, 2, 4200, 100), torch.randn(1, 2, 4200, 100)
    lengths = torch.tensor([4000])
    mask = torch.rand(1, 4200) > 0.1

    def run():
        outs = []
        for dt in (torch.float32, torch.bfloat16):
            qd, kd, vd = (q if dt == torch.float32 else q.to(dt)), keys.to(dt), values.to(dt)
            s, i = ops.knn_scan(qd, kd, lengths, mask, 40)
            outs += [s, i, *ops.flash_scan(qd, kd, vd, lengths, mask, 0.1, 0)]
            outs += [*ops.flash_scan(qd, kd[:, :, :70], vd[:, :, :70], None, None, 0.1, 35)]
            outs += [*ops.gather_attention(s, i, vd, 0.1)]
        return outs

    cuda_emu.configure(schedule="forward")
    base = run()
    for schedule, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
        cuda_emu.configure(schedule=schedule, seed=seed)
        for a, b in zip(base, run()):
            assert torch.equal(a, b), schedule


@pytest.mark.parametrize(
    ("which", "message"),
    [
        (1, "__syncthreads reached by 128 threads while 128 have exited"),
        (2, "__shfl_xor_sync reached by a warp some of whose lanes have exited"),
        (4, "wmma pointer not 256-bit aligned"),
        (5, "write outside the block's dynamic shared memory"),
        (6, "more than the 49152 allowed"),
        (8, "thread exited with cp.async copies it never waited for"),
    ],
)
def test_emulator_reports_device_bugs(emulated, which, message):
    import cuda_emu

    assert cuda_emu.selftest(0) == ("", sum(3 * i + 1 for i in range(256)))  # a correct kernel passes
    error, _ = cuda_emu.selftest(which)
    assert message in error


def test_emulator_shared_memory_starts_as_garbage(emulated):
    """Static __shared__ arrays start every block 0xFF-filled (-1 ints), not zeroed or left over
    from the previous block, so a read of unwritten shared memory shows in the results."""
    import cuda_emu

    assert cuda_emu.selftest(9) == ("", -32)


def test_emulator_schedules_expose_a_missing_barrier(emulated):
    import cuda_emu

    checksums = set()
    for schedule in ("forward", "reverse", "shuffle"):
        cuda_emu.configure(schedule=schedule)
        error, checksum = cuda_emu.selftest(3)
        assert error == ""
        checksums.add(checksum)
    assert len(checksums) == 3


def test_no_out_of_bounds_access_under_asan(emulated):
    """The emulated backend suite again, with the kernels built with AddressSanitizer: a read or
    write past any tensor's storage aborts it (the emulator's own checks cover shared memory).
    Self-test 7 shows an out-of-bounds global read being reported."""
    import subprocess
    import sys

    import cuda_emu

    env = cuda_emu.asan_environment()
    if env is None:
        if os.environ.get("FOT_KERNELS_REQUIRE_CPU_EXT") == "1":
            pytest.fail("libasan not found")
        pytest.skip("libasan not found")
    tests = Path(__file__).resolve().parent
    probe = "import cuda_emu; print(cuda_emu.selftest(7))"
    bad = subprocess.run([sys.executable, "-c", probe], cwd=tests, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    run = subprocess.run(
        # -s: an AddressSanitizer report goes to the subprocess' stderr, not into pytest's capture
        [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", "test_backends.py", "test_cuda.py",
         "-k", "emulated and not peak_memory and not asan and not thread_or_block_order"],
        cwd=tests, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, (run.stdout[-3000:], run.stderr[-3000:])
