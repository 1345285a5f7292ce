"""Random draws shared by the forward-only estimators."""

from __future__ import annotations

import torch

__all__ = ["draw_normal"]


def draw_normal(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """I.i.d. ``N(0, 1)`` of ``shape`` from ``generator`` (on its device), moved to ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
