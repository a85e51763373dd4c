"""A whole method in one file, as a plug-in author writes one: declaration, math, registration.

Class-agnostic, no discard ratio: a Gaussian bump of width ``--width`` patches centred on the patch grid,
whatever the image (so that its masks are known exactly).
"""
from __future__ import annotations

from vitexplain.methods.base import Explainer, Param
from vitexplain.methods.registry import register_method


def centre_bump(grid: tuple[int, int], width: float):
    """``exp(−(y² + x²) / (2·width²))`` over the grid, coordinates from its centre; max 1."""
    import torch

    gh, gw = grid
    y = torch.arange(gh, dtype=torch.float32) - (gh - 1) / 2
    x = torch.arange(gw, dtype=torch.float32) - (gw - 1) / 2
    bump = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * width ** 2))
    return bump / bump.max()


@register_method
class CentreBump(Explainer):
    name = "toy-centre"
    summary = "Toy plug-in: a Gaussian bump at the centre of the patch grid."
    params = (Param("width", float, 2.0, "Bump width in patches.", check=lambda w: None if w > 0 else "must be positive",
                    tag="w"),)

    def masks_for(self, capture, gradients, discard_ratios):
        bump = centre_bump(capture.layout.grid, self.settings["width"])
        return bump.expand(capture.logits.shape[0], 1, *bump.shape).clone()
