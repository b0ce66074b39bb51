"""The engine's arithmetic over flat block buffers, streamed in chunks when it must be.

The fast ops are one kernel over a whole block when the sources sit on the device in the live
dtype (that is the memory-speed floor). Otherwise chunks are staged into preallocated device
buffers — on CUDA on a side stream, double-buffered, so copies overlap the arithmetic — and
the ComfyUI-exact ops run in preallocated float32 scratch. A block held in another precision
than the live weights (the Recipe's ``unet_dtype`` / ``text_encoder_dtype``) is computed in
float32 scratch and rounded to that precision before it is stored. Nothing is allocated per
candidate. The results equal ``merge_backend.methods`` to the bit (see its docstring for the
formulas).
"""

from __future__ import annotations

import torch

from .dtypes import rounds_to

FAST_OPS = ("copy", "weighted_sum_fast", "add_difference_fast")


def add_difference_target(m1: torch.Tensor, m2: torch.Tensor, base: torch.Tensor,
                          dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """model1 + (model2 - base), in float32, rounded once to ``dtype`` (host memory)."""
    out = torch.empty(m1.numel(), dtype=dtype)
    for s in range(0, m1.numel(), chunk):
        e = min(s + chunk, m1.numel())
        out[s:e] = (m1[s:e].float() + (m2[s:e].float() - base[s:e].float())).to(dtype)
    return out


def op_kind(op: str, arithmetic: str) -> str:
    if op in ("weighted_sum", "add_difference") and arithmetic == "fast":
        return f"{op}_fast"
    return op


def _roles(kind: str) -> tuple[str, ...]:
    return {
        "copy": ("model1",),
        "weighted_sum_fast": ("model1", "model2"),
        "add_difference_fast": ("model1", "target"),
        "weighted_sum": ("model1", "model2"),
        "subtract": ("model1", "model2"),
        "add": ("model1", "model2"),
        "add_difference": ("model1", "model2", "base"),
    }[kind]


class Runner:
    """Executes one block's candidate; owns the staging and scratch buffers."""

    def __init__(self, device: torch.device, live_dtype: torch.dtype, chunk: int):
        self.device = device
        self.live_dtype = live_dtype
        self.chunk = chunk
        self.cuda = device.type == "cuda"
        self._stage: list[list[torch.Tensor]] = [[], []]  # [slot][role index]
        self._scratch: list[torch.Tensor] = []
        self._rounding: dict[torch.dtype, torch.Tensor] = {}  # a chunk per held dtype
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]

    # ------------------------------------------------------------------ buffers
    def allocate(self, staging_roles: int, scratch: int,
                 rounding: tuple[torch.dtype, ...] = ()) -> None:
        """Allocate every buffer once, at bind time: applying a candidate allocates nothing.
        ``rounding``: held precisions results are rounded through (see ``round_through``)."""
        for dtype in rounding:
            if dtype not in self._rounding:
                self._rounding[dtype] = torch.empty(self.chunk, dtype=dtype, device=self.device)
        for slot in self._stage:
            while len(slot) < staging_roles:
                slot.append(torch.empty(self.chunk, dtype=self.live_dtype, device=self.device))
        while len(self._scratch) < scratch:
            self._scratch.append(torch.empty(self.chunk, dtype=torch.float32, device=self.device))

    def _stage_buffer(self, slot: int, i: int) -> torch.Tensor:
        return self._stage[slot][i]

    def scratch(self, i: int, n: int) -> torch.Tensor:
        return self._scratch[i][:n]

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ running
    def run(self, group, op: str, ratio: float, multiplier: float, arithmetic: str,
            loras: list[tuple[torch.Tensor, float]] = (), held: torch.dtype | None = None) -> None:
        """Write one block's candidate; ``loras`` = [(flat float32 delta, strength)] added in
        float32 before the final rounding, as the file merge does. ``held`` is the precision
        the block is held in (its sources already hold such values): the result is rounded to
        it before it is stored in the live dtype (default: the live dtype)."""
        kind = op_kind(op, arithmetic)
        held = held or self.live_dtype
        sources = [group.sources[r] for r in _roles(kind)]
        if kind in FAST_OPS and held != self.live_dtype:
            # the working dtype is not the live one: lerp in float32 scratch, round to it
            post = self._post(loras, held, round_first=True)
            float_fast(self, kind, group.live, sources, ratio, multiplier, post)
            return
        direct = all(s.device == self.device and s.dtype == self.live_dtype for s in sources)
        if kind in FAST_OPS and direct:
            compute(self, kind, group.live, sources, ratio, multiplier)
        else:
            for slot, (s, e) in enumerate(_chunks(group.numel, self.chunk)):
                terms = [(d[s:e], k) for d, k in loras]
                self._run_chunk(slot % 2, kind, group.live[s:e], [x[s:e] for x in sources],
                                ratio, multiplier, terms, held)
        if kind in FAST_OPS and loras:
            # fast ops round into the live dtype first (the file merge rounds to its working
            # dtype the same way), then the LoRAs are added in float32
            for s, e in _chunks(group.numel, self.chunk):
                w = self.scratch(0, e - s)
                w.copy_(group.live[s:e])
                w.add_(self.lora_total([(d[s:e], k) for d, k in loras], e - s))
                group.live[s:e].copy_(w)

    def _post(self, loras, held: torch.dtype, round_first: bool = False):
        """What happens to a float32 chunk result before it is stored: (rounded to the held
        precision,) LoRAs added, rounded to the held precision."""
        rounds = rounds_to(held, self.live_dtype)
        if not loras and not rounds:
            return None

        def post(w: torch.Tensor, s: int, e: int) -> None:
            if round_first and rounds:
                self.round_through(w, held)
            if loras:
                w.add_(self.lora_total([(d[s:e], k) for d, k in loras], e - s))
            if rounds:
                self.round_through(w, held)
        return post

    def round_through(self, w: torch.Tensor, dtype: torch.dtype) -> None:
        """Round a float32 chunk to ``dtype`` in place (through a buffer made once per dtype)."""
        buf = self._rounding.get(dtype)
        if buf is None or buf.numel() < w.numel():
            buf = self._rounding[dtype] = torch.empty(max(self.chunk, w.numel()), dtype=dtype,
                                                      device=self.device)
        part = buf[:w.numel()]
        part.copy_(w)
        w.copy_(part)

    def lora_total(self, terms: list[tuple[torch.Tensor, float]], n: int) -> torch.Tensor:
        """Σ strength · delta in float32, in the order and with the ops the file merge uses."""
        total = self.scratch(1, n)
        delta = self.scratch(2, n)
        for i, (d, k) in enumerate(terms):
            if d.device != self.device:
                delta.copy_(d, non_blocking=False)
                d = delta
            if i == 0:
                torch.mul(d, k, out=total)
            else:
                total.add_(d, alpha=k)
        return total

    def _run_chunk(self, slot: int, kind: str, live: torch.Tensor, parts: list[torch.Tensor],
                   ratio: float, multiplier: float, terms=(), held: torch.dtype | None = None
                   ) -> None:
        n = live.numel()
        if kind not in FAST_OPS:
            # Exact ops copy (and convert) straight into float32 scratch; no staging needed.
            compute(self, kind, live, parts, ratio, multiplier,
                    self._post(terms, held or self.live_dtype))
            return
        if not self.cuda:
            staged = [_staged(self._stage_buffer(slot, i)[:n], p) for i, p in enumerate(parts)]
            compute(self, kind, live, staged, ratio, multiplier)
            return
        compute_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])
            staged = [_staged(self._stage_buffer(slot, i)[:n], p, non_blocking=True)
                      for i, p in enumerate(parts)]
            self.ready[slot].record(self.copy_stream)
        compute_stream.wait_event(self.ready[slot])
        compute(self, kind, live, staged, ratio, multiplier)
        self.free[slot].record(compute_stream)


def _staged(buffer: torch.Tensor, part: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if part.device == buffer.device and part.dtype == buffer.dtype:
        return part
    buffer.copy_(part, non_blocking=non_blocking)
    return buffer


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def compute(runner: Runner, kind: str, live: torch.Tensor, src: list[torch.Tensor],
             ratio: float, multiplier: float, post=None) -> None:
    if kind == "copy":
        live.copy_(src[0])
    elif kind == "weighted_sum_fast":
        torch.lerp(src[1], src[0], ratio, out=live)
    elif kind == "add_difference_fast":
        torch.lerp(src[0], src[1], (1.0 - ratio) * multiplier, out=live)
    elif kind == "add_difference":
        _exact_add_difference(runner, live, src, ratio, multiplier, post)
    else:
        a, b = {"weighted_sum": (ratio, 1.0 - ratio), "subtract": (multiplier, -multiplier),
                "add": (1.0, 1.0)}[kind]
        _exact_patch(runner, live, src, a, b, post)


def _patch(w: torch.Tensor, other: torch.Tensor, a: float, b: float) -> None:
    """ComfyUI's weight patch in place, in float32: ``w *= a`` (skipped at 1), then
    ``w += b * other`` (skipped at 0); ``other`` is float32 scratch and is overwritten."""
    if a != 1.0:
        w.mul_(a)
    if b != 0.0:
        other.mul_(b)
        w.add_(other)


def _exact_patch(runner: Runner, live: torch.Tensor, src: list[torch.Tensor], a: float,
                 b: float, post=None) -> None:
    # ComfyUI's sequence, chunk by chunk: w = W1.float(); w *= a; w += b * W2.float()
    for s, e in _chunks(live.numel(), runner.chunk):
        w = runner.scratch(0, e - s)
        t = runner.scratch(1, e - s)
        w.copy_(src[0][s:e])
        t.copy_(src[1][s:e])
        _patch(w, t, a, b)
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)


def _exact_add_difference(runner: Runner, live: torch.Tensor, src: list[torch.Tensor],
                          ratio: float, multiplier: float, post=None) -> None:
    # The exported workflow's chain, step for step in float32 (REFERENCE §6):
    #   d = B; d *= m; d += (-m) * C       ModelMergeSubtract(B, C, m)
    #   t = A; t += 1.0 * d                ModelMergeAdd(A, subtract)
    #   w = A; w *= r; w += (1 - r) * t    the ratio node (A, add, r)
    for s, e in _chunks(live.numel(), runner.chunk):
        w = runner.scratch(0, e - s)
        d = runner.scratch(1, e - s)
        t = runner.scratch(2, e - s)
        d.copy_(src[1][s:e])
        t.copy_(src[2][s:e])
        _patch(d, t, multiplier, -multiplier)
        t.copy_(src[0][s:e])
        _patch(t, d, 1.0, 1.0)
        w.copy_(src[0][s:e])
        _patch(w, t, ratio, 1.0 - ratio)
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)


def float_fast(runner: Runner, kind: str, live: torch.Tensor, src: list[torch.Tensor],
                ratio: float, multiplier: float, post=None) -> None:
    # A fast op whose working dtype is not the live one: the lerp in float32 scratch (a lerp
    # on fp16 / bf16 computes in float32 and rounds once, so rounding this result to the
    # working dtype is that lerp), then post (rounding, LoRAs) and the store.
    for s, e in _chunks(live.numel(), runner.chunk):
        w = runner.scratch(0, e - s)
        x = runner.scratch(1, e - s)
        x.copy_(src[0][s:e])
        if kind == "copy":
            w.copy_(x)
        else:
            y = runner.scratch(2, e - s)
            y.copy_(src[1][s:e])
            if kind == "weighted_sum_fast":
                torch.lerp(y, x, ratio, out=w)
            else:
                torch.lerp(x, y, (1.0 - ratio) * multiplier, out=w)
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)
