"""ComfyUI's arithmetic, written out here from its source (REFERENCE §1, §2, §6) so that tests
derive expected tensors independently of mergesearch's kernels.

- A merge node is a weight patch on model1's weight, in float32: ``w *= strength_model``
  (skipped at 1), then ``w += strength_patch * other`` (skipped at 0); a patch taken from an
  already patched model is computed first, from that model's own weight.
- A model is held in one precision (``held``): its weights are rounded to it when loaded, and
  the patched result is rounded to it once.
"""

from __future__ import annotations

import torch


def patch(w1: torch.Tensor, w2: torch.Tensor, strength_model: float, strength_patch: float
          ) -> torch.Tensor:
    w = w1.float().clone()
    if strength_model != 1.0:
        w *= strength_model
    if strength_patch != 0.0:
        w += strength_patch * w2.float()
    return w


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, m: float, r: float
                   ) -> torch.Tensor:
    """ModelMergeSubtract(B, C, m) -> ModelMergeAdd(A, .) -> ModelMergeSimple(A, ., r)."""
    difference = patch(b, c, m, -m)
    target = patch(a, difference, 1.0, 1.0)
    return patch(a, target, r, 1.0 - r)


def held(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a model held in ``dtype`` holds it (float32 holds fp16/bf16/fp32 exactly)."""
    return t.to(dtype).float() if t.is_floating_point() else t


def extract_lora(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """"Extract and Save Lora" on one weight difference (comfy_extras/nodes_lora_extract.py):
    a 3x3 conv flattened to out x in·9 (1x1 squeezed), the float32 SVD, up = U[:, :r]·diag(S[:r])
    and down = Vh[:r] with r = min(rank, out, in), both clamped to ± the 0.99 quantile of their
    concatenated (signed) values, stored as fp16. (ComfyUI asks for the full SVD; its top r
    triplets are the thin SVD's, which is what this takes, to stay within memory.)"""
    out_dim, in_dim = diff.shape[:2]
    r = min(rank, in_dim, out_dim)
    mat = diff.flatten(start_dim=1) if diff.ndim == 4 else diff
    u, s, vh = torch.linalg.svd(mat.float(), full_matrices=False)
    up = u[:, :r] @ torch.diag(s[:r])
    down = vh[:r, :]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    return up.clamp(-hi, hi).half(), down.clamp(-hi, hi).half()
