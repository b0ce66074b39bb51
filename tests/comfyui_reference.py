"""ComfyUI's arithmetic, written out from its source (REFERENCE §1, §2, §6) so that tests
derive expected tensors independently of mergesearch's kernels. The merge-node patch, the held
precision and the workflow evaluator live in ``merge_backend.methods.comfyui_reference`` (the
method contract uses them too); the add-difference chain and LoraSave's extraction are here.
"""

from __future__ import annotations

import torch

from merge_backend.methods.comfyui_reference import held, patch

__all__ = ["add_difference", "extract_lora", "held", "patch"]


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, m: float, r: float
                   ) -> torch.Tensor:
    """ModelMergeSubtract(B, C, m) -> ModelMergeAdd(A, .) -> ModelMergeSimple(A, ., r)."""
    difference = patch(b, c, m, -m)
    target = patch(a, difference, 1.0, 1.0)
    return patch(a, target, r, 1.0 - r)


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
