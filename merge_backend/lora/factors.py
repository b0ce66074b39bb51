"""LyCORIS factors rebuilt into a fixed full difference: LoHa, LoKr and LoCon's Tucker core.

``lycoris_delta`` returns the module's float32 difference at its own scale (alpha / r where
the format has one), as LyCORIS' ``make_weight`` / ``diff_weight`` builds it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .adapters import Adapter, Dora, Glora, Ia3, Oft
from .errors import LoraError


def alpha_of(value: Tensor | None, metadata_alpha: float | None) -> float | None:
    if value is not None:
        return float(value.reshape(-1)[0].item())
    return metadata_alpha


_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def tucker(core: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Tucker rebuild: W[p, q, ...] = Σ_ij up[i, p] core[i, j, ...] down[j, q]."""
    return torch.einsum("ij...,jq,ip->pq...", core.float(), down.float().flatten(1),
                        up.float().flatten(1))


def lycoris_delta(path: Path, name: str, parts: dict[str, Tensor],
                   metadata_alpha: float | None) -> Tensor | None:
    """The full float32 delta of a LoHa / LoKr / Tucker-LoCon module, or None for others.

    LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = rows of w1b (Tucker: each factor rebuilt
    through hada_t1 / hada_t2, w1a then (r, out)). LoKr: kron(w1, w2), each full or a·b
    (w2 Tucker through lokr_t2), scaled by alpha/r only when a factor is decomposed.
    LoCon Tucker: up · lora_mid · down · alpha/r. A conv delta without Tucker is returned as
    (out, in·kh·kw) and reshaped to the checkpoint's weight when applied.
    """
    alpha_t = parts.get("alpha")
    try:
        if any(k in parts for k in _LOHA):
            missing = [k for k in _LOHA if k not in parts]
            if missing:
                raise LoraError(f"{path}: LoHa module {name!r} lacks {', '.join(missing)}")
            w1a, w1b, w2a, w2b = (parts[k].float() for k in _LOHA)
            rank = int(w1b.shape[0])
            if "hada_t1" in parts and "hada_t2" in parts:
                w1 = tucker(parts["hada_t1"], w1b, w1a)
                w2 = tucker(parts["hada_t2"], w2b, w2a)
            else:
                w1 = w1a.flatten(1) @ w1b.flatten(1)
                w2 = w2a.flatten(1) @ w2b.flatten(1)
            alpha = alpha_of(alpha_t, metadata_alpha)
            return w1 * w2 * (1.0 if alpha is None else alpha / rank)
        if any(k.startswith("lokr_") for k in parts):
            rank = None
            if "lokr_w1" in parts:
                w1 = parts["lokr_w1"].float()
            elif "lokr_w1_a" in parts and "lokr_w1_b" in parts:
                w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
                rank = int(parts["lokr_w1_b"].shape[0])
            else:
                raise LoraError(f"{path}: LoKr module {name!r} has neither lokr_w1 nor "
                                "lokr_w1_a + lokr_w1_b")
            if "lokr_w2" in parts:
                w2 = parts["lokr_w2"].float()
            elif "lokr_w2_a" in parts and "lokr_w2_b" in parts:
                a, b = parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float()
                rank = int(b.shape[0])
                w2 = tucker(parts["lokr_t2"], b, a) if "lokr_t2" in parts else a @ b.flatten(1)
            else:
                raise LoraError(f"{path}: LoKr module {name!r} has neither lokr_w2 nor "
                                "lokr_w2_a + lokr_w2_b")
            if w2.ndim == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            alpha = alpha_of(alpha_t, metadata_alpha)
            scale = 1.0 if alpha is None or rank is None else alpha / rank
            return torch.kron(w1.contiguous(), w2.contiguous()) * scale
        if "mid" in parts:
            up, down = parts.get("up"), parts.get("down")
            if up is None or down is None:
                raise LoraError(f"{path}: LoCon module {name!r} has a lora_mid but no "
                                "lora_up / lora_down")
            rank = int(down.shape[0])
            alpha = alpha_of(alpha_t, metadata_alpha)
            return tucker(parts["mid"], down, up.flatten(1).T) * (1.0 if alpha is None else alpha / rank)
    except RuntimeError as exc:  # factor shapes that do not chain
        first = str(exc).strip().splitlines()[0]
        raise LoraError(f"{path}: module {name!r}: its factors do not fit together ({first})"
                        ) from None
    return None




# Roles that make a module weight-dependent (see adapters.py).
ADAPTER_ROLES = ("dora_scale", "magnitude", "oft_blocks", "ia3", "a1")


def adapter_of(path: Path, name: str, parts: dict[str, Tensor], metadata_alpha: float | None,
               delta: Tensor | None) -> Adapter | None:
    """The weight-dependent rule of a DoRA / OFT / BOFT / IA3 / GLoRA module, or None.

    ``delta`` is the module's fixed LoRA-like difference (DoRA's ΔW), when it has one.
    """
    alpha = alpha_of(parts.get("alpha"), metadata_alpha)
    magnitude = parts.get("dora_scale", parts.get("magnitude"))
    if magnitude is not None:
        if delta is None:
            raise LoraError(f"{path}: DoRA module {name!r} has a magnitude but no LoRA factors "
                            "(lora_up / lora_down, lora_A / lora_B, LoHa or LoKr)")
        # kohya / LyCORIS: (out, 1, …) per output row, (1, in, …) per input column;
        # PEFT: always per output row ((out,) or (1, out, 1, 1) for a conv)
        on_out = "magnitude" in parts or magnitude.ndim == 1 or magnitude.shape[0] > 1
        return Dora(delta.float(), magnitude.float(), on_out, peft="magnitude" in parts)
    if "oft_blocks" in parts:
        blocks = parts["oft_blocks"].float()
        if blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise LoraError(f"{path}: OFT module {name!r}: oft_blocks {list(blocks.shape)} is "
                            "not (blocks, b, b) nor (stages, blocks, b, b)")
        rows = blocks.shape[-3] * blocks.shape[-2]
        rescale = parts.get("rescale")
        # LyCORIS multiplies the stored constraint by the output width (DiagOFT, BOFT)
        return Oft(blocks, None if rescale is None else rescale.float(),
                   (alpha or 0.0) * rows)
    if "ia3" in parts:
        return Ia3(parts["ia3"].float(), bool(parts["on_input"].reshape(-1)[0].item()))
    if "a1" in parts:
        missing = [k for k in ("a1", "a2", "b1", "b2") if k not in parts]
        if missing:
            raise LoraError(f"{path}: GLoRA module {name!r} lacks "
                            f"{', '.join(m + '.weight' for m in missing)}")
        a2, b1, b2 = parts["a2"].float(), parts["b1"].float(), parts["b2"].float()
        rank = int(a2.shape[0])
        if "bm" in parts:
            b = tucker(parts["bm"], b2, b1.flatten(1).T)
        else:
            b = b1.flatten(1) @ b2.flatten(1)
        return Glora(parts["a1"].float(), a2, b, 1.0 if not alpha else alpha / rank)
    return None
