"""LoRA modules whose change depends on the weight they are applied to: DoRA, OFT, BOFT,
IA3, GLoRA.

A plain LoRA (or LoHa / LoKr) adds a fixed difference. These formats instead define the new
weight from the current one, ``W' = F(W)``; at strength ``s`` the weight becomes
``W + s · (F(W) − W)`` — ComfyUI's rule for all of them (``weight_adapter``), and LyCORIS'
own ``apply_dora_scale``: strength 0 leaves ``W``, strength 1 gives ``F(W)``. ``W`` is the
weight the LoRA meets: the merged candidate when a LoRA is applied on top of a merge (ComfyUI
patches the weight it is given, after the merge nodes), and, with several LoRAs, the weight
as the LoRAs before it in the list left it (ComfyUI's LoraLoader chain).

``F`` follows each format's writer (the ``lycoris-lora`` package's modules, PEFT's DoRA
layer); every function takes and returns float32 in the diffusers module's shape.

Example:
    >>> import torch
    >>> ia3 = Ia3(torch.tensor([0.5, 1.0]), on_input=False)
    >>> ia3.difference(torch.ones(2, 3))[:, 0].tolist()     # F(W) − W = W · w per out row
    [0.5, 1.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _rows(weight: Tensor) -> Tensor:
    """(out, in, k): a linear or conv weight with its spatial axes flattened."""
    return weight.reshape(weight.shape[0], weight.shape[1] if weight.ndim > 1 else 1, -1)


@dataclass
class Dora:
    """Weight-decomposed LoRA: ``F(W) = m · (W + ΔW) / ‖W + ΔW‖``.

    ``magnitude`` holds one value per output row (``on_out``: kohya/LyCORIS ``dora_scale`` of
    shape (out, 1, …), PEFT's ``lora_magnitude_vector``) or per input column (LyCORIS with
    ``wd_on_out=False``: (1, in, …)); the norm is taken over the other axes. ``delta`` is the
    LoRA's own difference at scale alpha/r (any LoRA-like factors: lora_up/down, LoHa, LoKr).
    """

    delta: Tensor
    magnitude: Tensor
    on_out: bool
    peft: bool = False  # PEFT's lora_magnitude_vector (kohya / LyCORIS: dora_scale)
    kind: str = "DoRA"

    def difference(self, weight: Tensor) -> Tensor:
        w = _rows(weight.float())
        merged = w + self.delta.to(w).reshape(w.shape)
        mag = self.magnitude.to(w).reshape(-1)
        if self.on_out:
            norm = merged.flatten(1).norm(dim=1)
            merged = merged * (mag / norm).reshape(-1, 1, 1)
        else:
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1)
            merged = merged * (mag / norm).reshape(1, -1, 1)
        return (merged - w).reshape(weight.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        axis = shape[0] if self.on_out else (shape[1] if len(shape) > 1 else 1)
        return self.magnitude.numel() == axis and self.delta.numel() == math.prod(shape)


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, Q scaled down to norm ``constraint`` when its
    norm (over all blocks) exceeds it (``constraint`` ≤ 0: no limit)."""
    blocks = blocks.float()
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass
class Oft:
    """Orthogonal fine-tuning: output rows rotated block by block, ``F(W) = Rᵀ·W`` per block
    (LyCORIS diag-OFT and kohya's OFT: ``oft_blocks`` (blocks, b, b)); BOFT (``oft_blocks``
    (m, blocks, b, b)) chains m butterfly stages. ``rescale`` (out, 1, …) scales the result
    per row. ``constraint`` is the file's alpha times the module's output width, as
    LyCORIS reads it (ComfyUI uses the alpha itself)."""

    blocks: Tensor
    rescale: Tensor | None
    constraint: float

    @property
    def kind(self) -> str:
        return "BOFT" if self.blocks.ndim == 4 else "OFT"

    def _rotated(self, w: Tensor) -> Tensor:
        r = cayley(self.blocks.to(w.device), self.constraint)
        if self.blocks.ndim == 3:
            n, b, _ = r.shape
            return torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])
                                ).reshape(w.shape)
        stages, _, b, _ = r.shape
        half, out = b // 2, w
        for i in range(stages):  # stage i mixes rows 2^i·b/2 apart, in blocks of b
            k = 2 ** i * half
            out = out.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            out = torch.einsum("bij,bj...->bi...", r[i], out)
            out = out.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        return out

    def difference(self, weight: Tensor) -> Tensor:
        w = _rows(weight.float())
        out = self._rotated(w)
        if self.rescale is not None:
            out = out * self.rescale.to(w).reshape(-1, 1, 1)
        return (out - w).reshape(weight.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        rows = self.blocks.shape[-3] * self.blocks.shape[-2]  # blocks × block size
        return rows == shape[0] and (self.rescale is None or self.rescale.numel() == shape[0])


@dataclass
class Ia3:
    """IA3: ``F(W) = W · (1 + w)`` with ``w`` per output row, or per input column when
    ``on_input`` (LyCORIS' ``weight`` and ``on_input`` keys)."""

    scale: Tensor
    on_input: bool
    kind: str = "IA3"

    def difference(self, weight: Tensor) -> Tensor:
        w = _rows(weight.float())
        s = self.scale.to(w).reshape(-1)
        s = s.reshape(1, -1, 1) if self.on_input else s.reshape(-1, 1, 1)
        return (w * s).reshape(weight.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        axis = (shape[1] if len(shape) > 1 else 1) if self.on_input else shape[0]
        return self.scale.numel() == axis


@dataclass
class Glora:
    """Generalised LoRA: ``F(W) − W = (W·a1·a2 + b1·b2) · alpha/r`` (LyCORIS' GLoRA: a1 is
    (in, r), a2 (r, in), b1 (out, r), b2 (r, in·k); r = rows of a2)."""

    a1: Tensor
    a2: Tensor
    b: Tensor  # b1 · b2 (out, in·k)
    scale: float
    kind: str = "GLoRA"

    def difference(self, weight: Tensor) -> Tensor:
        w = _rows(weight.float())
        a1, a2 = self.a1.to(w).flatten(1), self.a2.to(w).flatten(1)
        wa = torch.einsum("oik,ij,jl->olk", w, a1, a2)
        return ((wa + self.b.to(w).reshape(w.shape)) * self.scale).reshape(weight.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        inp = shape[1] if len(shape) > 1 else 1
        return (self.a1.shape[0] == inp and self.a2.flatten(1).shape[1] == inp
                and self.b.numel() == math.prod(shape))


Adapter = Dora | Oft | Ia3 | Glora
