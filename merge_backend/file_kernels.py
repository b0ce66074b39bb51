"""The streamed file merge's arithmetic: one key at a time, into buffers reused for every key.

Allocating a fresh float32 copy of every tensor (what ``merge_backend.methods`` does, plainly)
costs more than the arithmetic: each new page must be faulted in and zeroed, which made a
ComfyUI-exact merge of SD1.5 take 2–4x as long as the fast one. Here the exact ops run chunk by
chunk in float32 scratch with the engine's own kernels (so the file, the engine and
``methods`` agree to the bit), and every result lands in one output buffer per dtype.

A result is valid until the next ``merge`` call: the writer must have consumed it by then.
"""

from __future__ import annotations

import torch

from . import engine_kernels as kernels
from .methods import apply_op

CHUNK = 1 << 18  # elements per float32 scratch chunk: 1 MiB, cache-sized


class KeyArithmetic:
    """Merges one key's source tensors into a reused output buffer (CPU)."""

    def __init__(self, out_dtype: torch.dtype, arithmetic: str):
        self.out_dtype = out_dtype
        self.arithmetic = arithmetic
        self.runner = kernels.Runner(torch.device("cpu"), out_dtype, CHUNK)
        self.runner.allocate(0, 3)
        self._out: dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        numel = shape.numel()
        buf = self._out.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._out[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)

    def merge(self, op: str, tensors: list[torch.Tensor], ratio: float, multiplier: float,
              delta: torch.Tensor | None = None) -> torch.Tensor:
        """``op`` over ``tensors`` (roles in the method's order), cast to the output dtype.

        ``delta`` (float32, the key's shape) is added before the final rounding for the exact
        ops and after rounding to the working dtype for the fast ones, as ``methods`` and the
        engine do.
        """
        kind = kernels.op_kind(op, self.arithmetic)
        shape = tensors[0].shape
        if kind not in kernels.FAST_OPS:
            out = self._buffer(self.out_dtype, shape)
            post = None if delta is None else \
                (lambda w, s, e: w.add_(delta.reshape(-1)[s:e]))
            kernels.compute(self.runner, kind, out.view(-1),
                            [t.reshape(-1) for t in tensors], ratio, multiplier, post)
            return out
        if kind == "weighted_sum_fast":
            out = self._buffer(self.out_dtype, shape)
            w1, w2 = (t.to(self.out_dtype) for t in tensors)
            torch.lerp(w2, w1, ratio, out=out)
        else:  # add_difference_fast: rare enough to run the plain function
            out = apply_op(op, tensors, ratio, multiplier, arithmetic=self.arithmetic,
                           work_dtype=self.out_dtype)
        if delta is None:
            return out
        return (out.float() + delta).to(self.out_dtype)
