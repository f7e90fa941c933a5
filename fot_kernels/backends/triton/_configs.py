"""Tile configurations of the Triton kernels: one place that the launchers and the sm_80/sm_90
compile check (tests/test_triton_compile.py) both read, so that every shipped configuration is
compiled and its register/stack/shared-memory use checked without a GPU.

No autotuning: the configuration is a pure function of (padded head dim, k, rows per kv head), so
results are deterministic and every variant is known at review time.
"""

from __future__ import annotations

from dataclasses import dataclass

#: largest k whose running top-k is kept on chip (in registers)
MAX_K = 256
#: largest head dim served (padded to BD = next power of two >= 16 inside the kernels)
MAX_D = 256
#: register cap passed to every launch (ptxas otherwise targets two CTAs per SM for some
#: configurations and spills; with the cap at 255 the compile table shows no spills)
MAXNREG = 255
#: rows (query head x query pairs of one kv head) at or below which the small-row ("decode") tiles are used
DECODE_ROWS = 16


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_d(head_dim: int) -> int:
    """Padded head dim BD: a power of two, at least 16 (the tensor-core minimum)."""
    return max(16, next_pow2(head_dim))


@dataclass(frozen=True)
class KnnConfig:
    BM: int  # query rows per program
    BN: int  # memory slots per tile (>= K: the tile's own top K is taken with tl.topk)
    K: int  # running top-k width, a power of two >= k
    DC: int  # head-dim chunk of the product (== BD: the query tile stays in registers)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttnConfig:
    BM: int  # query rows per program
    BN: int  # local / dense-memory keys per tile
    num_warps: int
    num_stages: int


def knn_config(k: int, bd: int, n_rows: int, fp32: bool = False) -> KnnConfig:
    """Tiles of the kNN scan, chosen from the sm_80/sm_90 compile table (no spills). The register
    budget is dominated by the int64 keys of a [BM, BN] tile, the [BM, K] running list and the
    product's operands; BM shrinks as K grows, and fp32 / wide heads run the product in head-dim
    chunks (DC < BD)."""
    kp = max(16, next_pow2(k))  # below 16 the sorting network saves little
    bn = max(64, kp)
    if fp32:  # 3xTF32 products: operands are split in hi/lo parts, chunked over the head dim
        bm, warps, dc = 16, 8, min(bd, 16)
    elif bd > 128 and kp <= 32:
        bm, warps, dc = 16, 8, 64
    elif kp <= 32:
        bm, warps, dc = 64, 4, bd
    elif kp <= 64:
        bm, warps, dc = (32, 4, bd) if bd <= 64 else (16, 4, bd) if bd <= 128 else (16, 8, bd)
    else:
        bm, warps, dc = 16, 8, bd
    if n_rows <= DECODE_ROWS:
        bm = 16
    return KnnConfig(BM=bm, BN=bn, K=kp, DC=dc, num_warps=warps, num_stages=2)


def knn_unserved_reason(k: int, head_dim: int, fp32: bool) -> str | None:
    """Combinations whose running top-k does not fit on chip without spilling."""
    kp = max(16, next_pow2(k))
    if kp > MAX_K:
        return f"topk={k} > {MAX_K} not served on chip"
    if fp32 and (kp > 64 or block_d(head_dim) > 128):
        return (f"topk={k} with head_dim {head_dim} and fp32 or mixed-dtype products not served on chip "
                "(fp32 products serve k <= 64 with head_dim <= 128; registers would spill)")  # fmt: skip
    if kp > 128 and block_d(head_dim) > 64:
        return f"topk={k} > 128 with head_dim {head_dim} > 64 not served on chip (registers would spill)"
    return None


def knn_merge_block(k_pad: int) -> int:
    """Rows per program of the split-merge kernel: about 2048 keys per program."""
    return max(16, min(64, 2048 // k_pad))


def attn_config(bd: int, n_rows: int, mem_mode: int, fp32: bool = False) -> AttnConfig:
    """Tiles of the attention kernel (local flash pass + dense memory, or + kNN gather), chosen
    from the sm_80/sm_90 compile table (no spills). The kNN gather holds [BM, BD] pointer tiles
    (64-bit) for keys and values, so it uses fewer rows per program."""
    if fp32:
        bm, bn, warps = 16, 32, 8
    elif bd <= 64:
        bm, bn, warps = 64, 64, 8
    elif bd <= 128:
        bm, bn, warps = (128, 64, 8) if mem_mode != 2 else (32, 64, 8)
    else:
        bm, bn, warps = 16, 32, 8
    if n_rows <= DECODE_ROWS:
        bm = 16
    return AttnConfig(BM=bm, BN=bn, num_warps=warps, num_stages=2)


def shipped_knn_configs() -> list[tuple[int, int, int]]:
    """(k_pad, bd, n_rows, fp32) combinations that cover every distinct KnnConfig the launcher can pick."""
    out = []
    for kp in (16, 32, 64, 128, 256):
        for bd in (16, 32, 64, 128, 256):
            for rows in (1, 1024):
                for fp32 in (False, True):
                    if knn_unserved_reason(kp, bd, fp32) is None:
                        out.append((kp, bd, rows, fp32))
    return out


def shipped_attn_configs() -> list[tuple[int, int, int, bool]]:
    """(bd, n_rows, mem_mode, fp32) combinations that cover every AttnConfig the launchers can pick
    (mem_mode 0, local only, runs the dense configuration without its memory loop; it is listed for
    the op-shaped ``flash_scan``'s causal pass, which applies the validity to the local keys)."""
    return [(bd, rows, mode, fp32) for bd in (16, 32, 64, 128, 256) for rows in (1, 1024) for mode in (0, 1, 2)
            for fp32 in (False, True) if attn_unserved_reason(bd, fp32) is None]  # fmt: skip


@dataclass(frozen=True)
class BwdConfig:
    BM: int  # stacked query rows per tile (dK/dV kernel: per step of its row loop)
    BN: int  # key slots per tile (dQ kernel: per step of its key loop)
    DC: int  # head-dim chunk of the score products (== BD: the loop-invariant tiles stay in registers)
    num_warps: int
    num_stages: int


def bwd_dkdv_config(bd: int, fp32: bool = False) -> BwdConfig:
    """dK/dV kernel of the dense backward, from the sm_80/sm_90 compile table (no spills): BN keys
    per program (their dK, dV fp32 accumulators stay in registers), BM rows per step of its loop."""
    if fp32:  # 3xTF32 (hi/lo operand pairs): the score products run over head-dim chunks of 32
        bn = 16 if bd > 64 else 32
        return BwdConfig(BM=16, BN=bn, DC=min(bd, 32), num_warps=8, num_stages=1)
    if bd <= 32:
        return BwdConfig(BM=32, BN=64, DC=bd, num_warps=4, num_stages=2)
    if bd <= 64:
        return BwdConfig(BM=64, BN=32, DC=bd, num_warps=8, num_stages=2)
    if bd <= 128:
        return BwdConfig(BM=32, BN=32, DC=bd, num_warps=8, num_stages=2)
    return BwdConfig(BM=16, BN=16, DC=32, num_warps=8, num_stages=1)  # BD 256: score products in chunks


def bwd_dq_config(bd: int, fp32: bool = False) -> BwdConfig:
    """dQ kernel of the dense backward (compile table, no spills): BM rows per program (their dQ
    fp32 accumulator stays in registers), BN keys per step of its loop."""
    if fp32:
        bn = 16 if bd > 64 else 32
        return BwdConfig(BM=16, BN=bn, DC=min(bd, 32), num_warps=8, num_stages=1)
    if bd <= 32:
        return BwdConfig(BM=64, BN=32, DC=bd, num_warps=4, num_stages=2)
    if bd <= 64:
        return BwdConfig(BM=32, BN=32, DC=bd, num_warps=4, num_stages=2)
    if bd <= 128:
        return BwdConfig(BM=32, BN=32, DC=bd, num_warps=8, num_stages=2)
    return BwdConfig(BM=32, BN=16, DC=bd, num_warps=8, num_stages=1)


#: kNN backward: rows per program of the dQ kernel (one [BM, BD] key and value gather per candidate,
#: with [BM, BD] 64-bit pointer tiles: about 8 elements of a tile per thread fit without spills)
def knn_bwd_dq_config(bd: int) -> BwdConfig:
    return BwdConfig(BM=min(64, 2048 // bd), BN=1, DC=bd, num_warps=8, num_stages=1)


#: kNN backward: sorted positions per program of the deterministic dK/dV scatter
def knn_bwd_scatter_config(bd: int) -> BwdConfig:
    return BwdConfig(BM=min(64, 2048 // bd), BN=1, DC=bd, num_warps=8, num_stages=1)


def shipped_bwd_configs() -> list[tuple[int, bool]]:
    """(bd, fp32) combinations that cover every backward configuration the launchers can pick."""
    return [(bd, fp32) for bd in (16, 32, 64, 128, 256) for fp32 in (False, True)
            if attn_unserved_reason(bd, fp32) is None]  # fmt: skip


def attn_unserved_reason(head_dim: int, fp32: bool) -> str | None:
    """Attention combinations whose tiles do not fit on chip without spilling."""
    if fp32 and block_d(head_dim) > 128:
        return f"fp32 or mixed-dtype attention with head_dim {head_dim} > 128 not served (registers would spill)"
    return None
