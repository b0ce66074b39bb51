"""The engine's arithmetic over flat block buffers, streamed in chunks when it must be.

The fast ops are one kernel over a whole block when the sources sit on the device in the live
dtype (that is the memory-speed floor). Otherwise chunks are staged into preallocated device
buffers — on CUDA on a side stream, double-buffered, so copies overlap the arithmetic — and
the ComfyUI-exact ops run in preallocated float32 scratch. Nothing is allocated per candidate.
The results equal ``merge_backend.methods`` to the bit (see its docstring for the formulas).
"""

from __future__ import annotations

import torch

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
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]

    # ------------------------------------------------------------------ buffers
    def allocate(self, staging_roles: int, scratch: int) -> None:
        """Allocate every buffer once, at bind time: applying a candidate allocates nothing."""
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
            loras: list[tuple[torch.Tensor, float]] = ()) -> None:
        """Write one block's candidate; ``loras`` = [(flat float32 delta, strength)] added in
        float32 before the final rounding, as the file merge does."""
        kind = op_kind(op, arithmetic)
        sources = [group.sources[r] for r in _roles(kind)]
        direct = all(s.device == self.device and s.dtype == self.live_dtype for s in sources)
        if kind in FAST_OPS and direct:
            compute(self, kind, group.live, sources, ratio, multiplier)
        else:
            for slot, (s, e) in enumerate(_chunks(group.numel, self.chunk)):
                terms = [(d[s:e], k) for d, k in loras]
                self._run_chunk(slot % 2, kind, group.live[s:e], [x[s:e] for x in sources],
                                ratio, multiplier, terms)
        if kind in FAST_OPS and loras:
            # fast ops round into the live dtype first (the file merge rounds to its working
            # dtype the same way), then the LoRAs are added in float32
            for s, e in _chunks(group.numel, self.chunk):
                w = self.scratch(0, e - s)
                w.copy_(group.live[s:e])
                w.add_(self.lora_total([(d[s:e], k) for d, k in loras], e - s))
                group.live[s:e].copy_(w)

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
                   ratio: float, multiplier: float, terms=()) -> None:
        n = live.numel()
        if kind not in FAST_OPS:
            # Exact ops copy (and convert) straight into float32 scratch; no staging needed.
            post = (lambda w, s, e: w.add_(self.lora_total([(d[s:e], k) for d, k in terms], e - s))
                    ) if terms else None
            compute(self, kind, live, parts, ratio, multiplier, post)
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
        _exact_add_difference(runner, live, src, (1.0 - ratio) * multiplier, post)
    else:
        a, b = {"weighted_sum": (ratio, 1.0 - ratio), "subtract": (multiplier, -multiplier),
                "add": (1.0, 1.0)}[kind]
        _exact_patch(runner, live, src, a, b, post)


def _exact_patch(runner: Runner, live: torch.Tensor, src: list[torch.Tensor], a: float,
                 b: float, post=None) -> None:
    # ComfyUI's sequence, chunk by chunk: w = W1.float(); w *= a; w += b * W2.float()
    for s, e in _chunks(live.numel(), runner.chunk):
        w = runner.scratch(0, e - s)
        t = runner.scratch(1, e - s)
        w.copy_(src[0][s:e])
        if a != 1.0:
            w.mul_(a)
        t.copy_(src[1][s:e])
        t.mul_(b)
        w.add_(t)
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)


def _exact_add_difference(runner: Runner, live: torch.Tensor, src: list[torch.Tensor],
                          k: float, post=None) -> None:
    # w = W1.float(); w += k * (W2.float() - W3.float())
    for s, e in _chunks(live.numel(), runner.chunk):
        w = runner.scratch(0, e - s)
        d = runner.scratch(1, e - s)
        t = runner.scratch(2, e - s)
        d.copy_(src[1][s:e])
        t.copy_(src[2][s:e])
        d.sub_(t)
        d.mul_(k)
        w.copy_(src[0][s:e])
        w.add_(d)
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)
