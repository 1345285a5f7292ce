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
from .lowrank import LowRankLinear, convert, lowrank_layers, merge_all, resample_all
from .lazy import LazyUpdate
from .instance import InstanceDependent
from .estimate import METHODS, estimate  # the function shadows the submodule name; import helpers from estimators.estimate

__all__ = [
    "PROJECTORS",
    "Coordinate",
    "Gaussian",
    "HaarStiefel",
    "Projector",
    "Rademacher",
    "make_projector",
    "LowRankLinear",
    "convert",
    "lowrank_layers",
    "merge_all",
    "resample_all",
    "LazyUpdate",
    "InstanceDependent",
    "METHODS",
    "estimate",
]
