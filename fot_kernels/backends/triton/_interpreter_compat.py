"""Work around a Triton 3.6 interpreter bug that only matters under ``TRITON_INTERPRET=1``.

With numpy >= 2.4 the interpreter cannot use a runtime scalar as a loop bound (``range(0, n, BN)``
raises "only 0-dimensional arrays can be converted to Python scalars": the interpreter holds
scalars as 1-element arrays and calls ``int()`` on them; triton-lang/triton#9171, fixed upstream
after 3.6). The fix below is the upstream one, applied to the interpreter's per-launch patching
only, and only when the launchers run in interpreter mode; the compiled GPU path never calls it.
"""

from __future__ import annotations

_applied = False


def ensure() -> None:
    """Idempotent: make the interpreter's tensor ``__index__`` accept 1-element arrays."""
    global _applied
    if _applied:
        return
    _applied = True
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a Triton whose interpreter is laid out differently: leave it alone
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor

    # Speed only: the interpreter reduces with a user combine function one element at a time in
    # Python; the bitonic sorts (tl.topk, tl.sort, tl.flip) reduce with XOR, which numpy does at
    # once. Same result, about 50x faster kNN tests.
    import triton.language as tl

    reduce_ops = getattr(interpreter, "ReduceOps", None)
    xor_combine = getattr(tl.standard, "_xor_combine", None)
    if reduce_ops is None or xor_combine is None:
        return
    generic_apply = reduce_ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == xor_combine and len(input) == 1 and self.axis is not None:
            data = input[0].handle.data
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims), input[0].dtype)
        return generic_apply(self, input)

    reduce_ops.apply_impl = apply_impl
