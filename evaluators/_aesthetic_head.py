"""The LAION improved aesthetic predictor's head, as a module whose state keys match the file.

The released head (``sac+logos+ava1-l14-linearMSE.pth``) is five Linear layers with Dropouts
between the first four and no activations, so it is affine in its input; keys are
``layers.{0,2,4,6,7}.{weight,bias}``. Widths are read from the state dict, so a tiny CLIP
(embed_dim 32) pairs with a tiny head of the same structure and key names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DEFAULT_WIDTHS = (1024, 128, 64, 16)
_DROPOUTS = (0.2, 0.2, 0.1)
LINEAR_KEYS = (0, 2, 4, 6, 7)


class AestheticHead(nn.Module):
    """Linear(in,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16)
    Linear(16,1), no activations."""

    def __init__(self, in_features: int = 768, widths: tuple[int, ...] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.layers = nn.Sequential(
            nn.Linear(in_features, w1), nn.Dropout(_DROPOUTS[0]),
            nn.Linear(w1, w2), nn.Dropout(_DROPOUTS[1]),
            nn.Linear(w2, w3), nn.Dropout(_DROPOUTS[2]),
            nn.Linear(w3, w4), nn.Linear(w4, 1),
        )

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> AestheticHead:
        """Build a head shaped like ``state`` and load it strictly (raises on any mismatch)."""
        missing = [f"layers.{i}.weight" for i in LINEAR_KEYS if f"layers.{i}.weight" not in state]
        if missing:
            found = ", ".join(sorted(state)[:6])
            raise ValueError(f"not a LAION aesthetic head: missing keys {missing} "
                             f"(found: {found} ...)")
        in_features = state["layers.0.weight"].shape[1]
        widths = tuple(state[f"layers.{i}.weight"].shape[0] for i in LINEAR_KEYS[:4])
        head = cls(in_features, widths)
        head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        return head.eval()
