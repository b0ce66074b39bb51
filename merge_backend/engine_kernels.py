"""The engine's arithmetic over flat block buffers, streamed in chunks when it must be.

The fast ops are one kernel over a whole block when the sources sit on the device in the live
dtype (that is the memory-speed floor). Otherwise chunks are staged into preallocated device
buffers — on CUDA on a side stream, double-buffered, so copies overlap the arithmetic — and
the ComfyUI-exact ops run in preallocated float32 scratch. A block held in another precision
than the live weights (the Recipe's ``unet_dtype`` / ``text_encoder_dtype``) is computed in
float32 scratch and rounded to that precision before it is stored. Nothing is allocated per
candidate. Which kernel a block runs is the method's declaration (merge_backend.methods): its
ComfyUI node chain step for step (or its own elementwise ``exact`` on float32 chunks, which
allocates its result per chunk), or its fast ``Lerp``; the results equal the method's own
``merge`` to the bit.
"""

from __future__ import annotations

from functools import cache

import torch

from .dtypes import rounds_to
from .methods import MergeMethod, Node, Target


def is_fast(method: MergeMethod | None, arithmetic: str) -> bool:
    """Whether a block runs a fast kernel: a copy (method None), or fast arithmetic with a
    method that has one (methods without a fast kernel run their exact arithmetic)."""
    return method is None or (arithmetic == "fast" and method.fast is not None)


def kernel_roles(method: MergeMethod | None, arithmetic: str) -> tuple[str, ...]:
    """The bound sources a block's kernel reads, in the kernel's order."""
    if method is None:
        return ("model1",)
    if arithmetic == "fast" and method.fast is not None:
        return method.fast.roles  # (start, end); end may be the bound target
    return method.roles


def scratch_needed(method: MergeMethod | None) -> int:
    """float32 scratch buffers the method's exact arithmetic needs (at least 3: the result
    and the LoRA sum run through buffers 0-2)."""
    if method is None:
        return 3
    if method.comfy:
        return max(3, 1 + max(max(out, tmp) for out, tmp, _ in _chain_plan(method.comfy)))
    return max(3, 1 + len(method.roles))


def build_target(target: Target, flats: list[torch.Tensor], dtype: torch.dtype,
                 chunk: int) -> torch.Tensor:
    """A fast kernel's bound target (add-difference's model1 + (model2 - base)): computed in
    float32 from the sources' held values, rounded once to ``dtype`` (host memory)."""
    n = flats[0].numel()
    out = torch.empty(n, dtype=dtype)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        out[s:e] = target.fn(*(f[s:e].float() for f in flats)).to(dtype)
    return out


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
    def run(self, group, method: MergeMethod | None, ratio: float, multiplier: float,
            arithmetic: str, loras: list[tuple[torch.Tensor, float]] = (),
            held: torch.dtype | None = None) -> None:
        """Write one block's candidate (``method`` None: model1's weights); ``loras`` =
        [(flat float32 delta, strength)] added in float32 before the final rounding, as the
        file merge does. ``held`` is the precision the block is held in (its sources already
        hold such values): the result is rounded to it before it is stored in the live dtype
        (default: the live dtype)."""
        fast = is_fast(method, arithmetic)
        weight = method.fast.weight(ratio, multiplier) if fast and method is not None else None
        held = held or self.live_dtype
        sources = [group.sources[r] for r in kernel_roles(method, arithmetic)]
        if fast and held != self.live_dtype:
            # the working dtype is not the live one: lerp in float32 scratch, round to it
            post = self._post(loras, held, round_first=True)
            float_fast(self, group.live, sources, weight, post)
            return
        direct = all(s.device == self.device and s.dtype == self.live_dtype for s in sources)
        if fast and direct:
            lerp_or_copy(group.live, sources, weight)
        else:
            roles = kernel_roles(method, arithmetic)
            for slot, (s, e) in enumerate(_chunks(group.numel, self.chunk)):
                terms = [(d[s:e], k) for d, k in loras]
                parts = dict(zip(roles, (x[s:e] for x in sources)))
                self._run_chunk(slot % 2, method if not fast else None, weight,
                                group.live[s:e], parts, ratio, multiplier, terms, held)
        if fast and loras:
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

    def _run_chunk(self, slot: int, exact_method: MergeMethod | None, weight: float | None,
                   live: torch.Tensor, parts: dict[str, torch.Tensor], ratio: float,
                   multiplier: float, terms=(), held: torch.dtype | None = None) -> None:
        """One chunk: the exact arithmetic of ``exact_method``, or (None) the fast kernel."""
        n = live.numel()
        if exact_method is not None:
            # Exact ops copy (and convert) straight into float32 scratch; no staging needed.
            exact(self, exact_method, live, parts, ratio, multiplier,
                  self._post(terms, held or self.live_dtype))
            return
        if not self.cuda:
            staged = [_staged(self._stage_buffer(slot, i)[:n], p)
                      for i, p in enumerate(parts.values())]
            lerp_or_copy(live, staged, weight)
            return
        compute_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])
            staged = [_staged(self._stage_buffer(slot, i)[:n], p, non_blocking=True)
                      for i, p in enumerate(parts.values())]
            self.ready[slot].record(self.copy_stream)
        compute_stream.wait_event(self.ready[slot])
        lerp_or_copy(live, staged, weight)
        self.free[slot].record(compute_stream)


def _staged(buffer: torch.Tensor, part: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if part.device == buffer.device and part.dtype == buffer.dtype:
        return part
    buffer.copy_(part, non_blocking=non_blocking)
    return buffer


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def lerp_or_copy(live: torch.Tensor, src: list[torch.Tensor], weight: float | None) -> None:
    """The fast kernels: a copy of model1 (``weight`` None), or ``lerp(start, end, weight)``."""
    if weight is None:
        live.copy_(src[0])
    else:
        torch.lerp(src[0], src[1], weight, out=live)


def _patch(w: torch.Tensor, other: torch.Tensor, a: float, b: float) -> None:
    """ComfyUI's weight patch in place, in float32: ``w *= a`` (skipped at 1), then
    ``w += b * other`` (skipped at 0); ``other`` is float32 scratch and is overwritten."""
    if a != 1.0:
        w.mul_(a)
    if b != 0.0:
        other.mul_(b)
        w.add_(other)


@cache
def _chain_plan(nodes: tuple[Node, ...]) -> tuple[tuple[int, int, bool], ...]:
    """Per node of a ComfyUI chain: (its result's scratch buffer, the buffer its model2 is
    patched from, whether model2 is copied there first). The last result lands in buffer 0
    (where the LoRA sum and rounding expect it); an earlier result read for the last time as
    model2 is patched from in place, anything else is copied into a free buffer."""
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        last_use[node.model1] = last_use[node.model2] = i
    live: dict[str, int] = {}  # earlier results still needed -> their buffers

    def free(*taken: int) -> int:
        return min(set(range(1, 2 * len(nodes) + 2)) - set(live.values()) - set(taken))

    plan = []
    for i, node in enumerate(nodes):
        out = 0 if i == len(nodes) - 1 else free()
        in_place = node.model2 in live and last_use[node.model2] == i \
            and node.model2 != node.model1
        tmp = live[node.model2] if in_place else free(out)
        plan.append((out, tmp, not in_place))
        for value in (node.model1, node.model2):
            if value in live and last_use[value] == i:
                del live[value]
        live[node.name] = out
    return tuple(plan)


def exact(runner: Runner, method: MergeMethod, live: torch.Tensor,
          src: dict[str, torch.Tensor], ratio: float, multiplier: float, post=None) -> None:
    """A method's exact arithmetic over flat sources (by role), chunk by chunk in float32
    scratch: its ComfyUI node chain step for step (REFERENCE §6), e.g. add-difference's
        d = B; d *= m; d += (-m) * C       ModelMergeSubtract(B, C, m)
        t = A; t += 1.0 * d                ModelMergeAdd(A, subtract)
        w = A; w *= r; w += (1 - r) * t    the ratio node (A, add, r)
    or, without a chain, the method's own elementwise ``exact`` on float32 chunks.
    ``post(w, s, e)`` (rounding, LoRAs) runs on each float32 result before it is stored."""
    nodes = method.comfy
    plan = _chain_plan(nodes) if nodes else ()
    for s, e in _chunks(live.numel(), runner.chunk):
        n = e - s
        if nodes:
            results: dict[str, torch.Tensor] = {}
            for node, (out, tmp, copy) in zip(nodes, plan):
                w = runner.scratch(out, n)
                w.copy_(results[node.model1] if node.model1 in results else src[node.model1][s:e])
                t = runner.scratch(tmp, n)
                if copy:
                    t.copy_(results[node.model2] if node.model2 in results
                            else src[node.model2][s:e])
                _patch(w, t, *node.strengths(ratio, multiplier))
                results[node.name] = w
        else:
            parts = []
            for i, role in enumerate(method.roles):
                part = runner.scratch(1 + i, n)
                part.copy_(src[role][s:e])
                parts.append(part)
            w = runner.scratch(0, n)
            w.copy_(method.exact(parts, ratio, multiplier))
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)


def float_fast(runner: Runner, live: torch.Tensor, src: list[torch.Tensor],
               weight: float | None, post=None) -> None:
    # A fast op whose working dtype is not the live one: the lerp in float32 scratch (a lerp
    # on fp16 / bf16 computes in float32 and rounds once, so rounding this result to the
    # working dtype is that lerp), then post (rounding, LoRAs) and the store.
    for s, e in _chunks(live.numel(), runner.chunk):
        w = runner.scratch(0, e - s)
        x = runner.scratch(1, e - s)
        x.copy_(src[0][s:e])
        if weight is None:
            w.copy_(x)
        else:
            y = runner.scratch(2, e - s)
            y.copy_(src[1][s:e])
            torch.lerp(x, y, weight, out=w)
        if post is not None:
            post(w, s, e)
        live[s:e].copy_(w)
