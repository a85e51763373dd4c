"""Head fusion: ``(B, H, N, N)`` attention maps → ``(B, N, N)``, by ``mean``, ``max`` or ``min`` over heads.

Used while recording (a class-agnostic capture keeps only the fused map of each layer) and by the methods
after weighting. Written with tensor methods alone, so that the declarations that name the fusions
(``vitexplain --help``) import no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor

Fusion = Literal["mean", "max", "min"]
FUSIONS: tuple[str, ...] = ("mean", "max", "min")


def check_fusion(fusion: str) -> str:
    """Return ``fusion`` if it is one of :data:`FUSIONS`, else raise ``ValueError``."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    return fusion


def fuse_heads(maps: Tensor, fusion: Fusion) -> Tensor:
    """Reduce ``(B, H, N, N)`` over heads with ``mean``, ``max`` or ``min``."""
    check_fusion(fusion)
    if maps.shape[1] == 1:  # one head (or already fused): nothing to reduce, no copy
        return maps[:, 0]
    if fusion == "mean":
        return head_mean(maps)
    return maps.amax(dim=1) if fusion == "max" else maps.amin(dim=1)


def head_mean(maps: Tensor) -> Tensor:
    """``(B, H, N, N) → (B, N, N)`` mean over heads, as the product ``(1/H)·1ᵀ·A_b`` of each sample's
    ``(H, N²)`` maps: a matrix product reads the maps once, where ``mean(dim=1)`` zero-fills, sums and
    divides in separate passes."""
    batch, heads = maps.shape[:2]
    weights = maps.new_full((1, heads), 1.0 / heads)
    return weights.matmul(maps.reshape(batch, heads, -1)).view(batch, *maps.shape[2:])
