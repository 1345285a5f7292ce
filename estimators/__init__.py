"""PyTorch samplers, base and low-rank gradient estimators, low-rank layers and training.

May import :mod:`theory`, never :mod:`studies`.
"""

from .projectors import (
    PROJECTORS,
    Coordinate,
    Gaussian,
    HaarStiefel,
    Projector,
    Rademacher,
    make_projector,
)

__all__ = [
    "PROJECTORS",
    "Coordinate",
    "Gaussian",
    "HaarStiefel",
    "Projector",
    "Rademacher",
    "make_projector",
]
