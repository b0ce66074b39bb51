"""The streamed file merge's arithmetic: one key at a time, into buffers reused for every key.

Allocating a fresh float32 copy of every tensor (what ``merge_backend.methods`` does, plainly)
costs more than the arithmetic: each new page must be faulted in and zeroed, which made a
ComfyUI-exact merge of SD1.5 take 2–4x as long as the fast one. Here the exact ops run chunk by
chunk in float32 scratch with the engine's own kernels (so the file, the engine and
the methods' own ``merge`` agree to the bit), and every result lands in one output buffer per dtype.

A result is valid until the next ``merge`` call: the writer must have consumed it by then.
"""

from __future__ import annotations

import torch

from . import dtypes
from . import engine_kernels as kernels
from .methods import MergeMethod

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

    def merge(self, method: MergeMethod, tensors: list[torch.Tensor], ratio: float,
              multiplier: float, delta: torch.Tensor | None = None,
              held: torch.dtype | None = None) -> torch.Tensor:
        """``method`` over ``tensors`` (in its roles' order), cast to the output dtype.

        ``held``: the precision the key's component is held in (sources rounded to it, the
        result rounded to it before the output dtype; None: no rounding but the output's).
        ``delta`` (float32, the key's shape) is added before the final rounding for the exact
        ops and after rounding to the working dtype for the fast ones, as ``methods`` and the
        engine do.
        """
        tensors = [dtypes.held(t, held) for t in tensors]
        shape = tensors[0].shape
        if not kernels.is_fast(method, self.arithmetic):
            out = self._buffer(self.out_dtype, shape)
            rounds = dtypes.rounds_to(held, self.out_dtype)

            def post(w: torch.Tensor, s: int, e: int) -> None:
                if delta is not None:
                    w.add_(delta.reshape(-1)[s:e])
                if rounds:
                    self.runner.round_through(w, held)
            self.runner.allocate(0, kernels.scratch_needed(method))
            kernels.exact(self.runner, method, out.view(-1),
                          {r: t.reshape(-1) for r, t in zip(method.roles, tensors)},
                          ratio, multiplier, post if delta is not None or rounds else None)
            return out
        fast = method.fast
        work = held or self.out_dtype  # the fast ops' working dtype
        weight = fast.weight(ratio, multiplier)
        by_role = dict(zip(method.roles, tensors))
        if fast.target is None and work == self.out_dtype:
            out = self._buffer(work, shape)  # one lerp, straight into the output dtype
            torch.lerp(by_role[fast.start].to(work), by_role[fast.end].to(work), weight, out=out)
        elif fast.target is None:  # chunked through float32 scratch, rounded to work
            out = self._buffer(self.out_dtype, shape)
            rounds = dtypes.rounds_to(held, self.out_dtype)

            def post(w: torch.Tensor, s: int, e: int) -> None:
                if rounds:
                    self.runner.round_through(w, held)
                if delta is not None:
                    w.add_(delta.reshape(-1)[s:e])
                    if rounds:
                        self.runner.round_through(w, held)
            kernels.float_fast(self.runner, out.view(-1),
                               [by_role[r].reshape(-1) for r in fast.roles], weight, post)
            return out
        else:  # a bound target (add-difference): rare enough to run the plain function
            out = method.merge(tensors, ratio, multiplier, arithmetic="fast", work_dtype=work)
        if delta is not None:
            out = (out.float() + delta).to(work)
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)
