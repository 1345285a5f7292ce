"""Input validation shared by the public functions (scikit-learn's ``_check_*`` style).

Every helper raises ``ValueError`` or ``TypeError`` whose message names the
parameter and shows the offending value.  No ``assert`` on user input.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "check_int",
    "check_rank",
    "check_positive",
    "check_choice",
    "check_psd",
    "check_spectrum",
    "check_matrix",
    "check_rng",
]


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as ``int`` if it is an integer (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {name}={value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {name}={value}")
    return value


def check_rank(n, r) -> tuple[int, int]:
    """Validate the ambient dimension ``n`` and the rank ``r`` (1 <= r <= n)."""
    n = check_int(n, "n", minimum=1)
    r = check_int(r, "r")
    if not 1 <= r <= n:
        raise ValueError(f"`r` must satisfy 1 <= r <= n, got r={r}, n={n}")
    return n, r


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {name}={value!r} ({type(value).__name__})")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be finite and {bound}, got {name}={value}")
    return value


def check_choice(value, name: str, choices) -> str:
    """A string among ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {name}={value!r}")
    return value


def check_matrix(a, name: str, *, shape: tuple | None = None, square: bool = False) -> np.ndarray:
    """A finite 2-D float64 array."""
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a real array, got {type(a).__name__}") from exc
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D, got {name}.shape={arr.shape}")
    if square and arr.shape[0] != arr.shape[1]:
        raise ValueError(f"`{name}` must be square, got {name}.shape={arr.shape}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {name}.shape={arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains NaN or Inf")
    return arr


def check_psd(S, name: str = "S", *, rtol: float = 1e-8) -> np.ndarray:
    """A symmetric positive semi-definite matrix, up to rounding (relative ``rtol``).

    Returns the symmetrised array ``(S + Sᵀ)/2``.
    """
    S = check_matrix(S, name, square=True)
    scale = max(float(np.max(np.abs(S))), np.finfo(float).tiny)
    asym = float(np.max(np.abs(S - S.T)))
    if asym > rtol * scale * 10:
        raise ValueError(f"`{name}` must be symmetric, got max|{name} - {name}ᵀ| = {asym:.3g}")
    S = 0.5 * (S + S.T)
    lam_min = float(np.linalg.eigvalsh(S)[0]) if S.size else 0.0
    if lam_min < -rtol * scale * max(S.shape[0], 1):
        raise ValueError(f"`{name}` must be positive semi-definite, got smallest eigenvalue {lam_min:.3g}")
    return S


def check_spectrum(sigma, name: str = "sigma") -> np.ndarray:
    """A non-empty finite 1-D array of non-negative numbers."""
    try:
        arr = np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a real 1-D array, got {type(sigma).__name__}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array, got {name}.shape={arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains NaN or Inf: {arr}")
    if np.any(arr < 0):
        raise ValueError(f"`{name}` must be non-negative, got min({name})={arr.min():.3g}")
    return arr


def check_rng(rng) -> np.random.Generator:
    """``None`` → a fresh unseeded Generator; a Generator is passed through; an int seeds one."""
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"`rng` must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")
