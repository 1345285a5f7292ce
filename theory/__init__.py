"""NumPy/SciPy mathematics of optimal low-rank stochastic gradient estimation.

Imports nothing from :mod:`estimators` or :mod:`studies`.  Every closed form of
``theory.md`` lives here once; samplers, estimators, studies and tests call it.
"""

from .moments import (
    FAMILIES,
    iid_second_moment,
    isotropic_second_moment,
    mse,
    optimal_scale,
    second_moment_matrix,
)
from . import testing
from .optimal import *  # noqa: F401,F403  (issue 3: bounds, water-filling, duality)
from .optimal import __all__ as _optimal_all
from .functional import FunctionalResult, solve_functional
from .estimator_moments import trace_weighted_moment, zo_second_moment

__all__ = [
    "FAMILIES",
    "iid_second_moment",
    "isotropic_second_moment",
    "mse",
    "optimal_scale",
    "second_moment_matrix",
    "testing",
    *_optimal_all,
    "FunctionalResult",
    "solve_functional",
    "trace_weighted_moment",
    "zo_second_moment",
]
