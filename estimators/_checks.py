"""Input validation for the PyTorch side (names the parameter and shows the value)."""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_generator", "resolve_dtype", "resolve_device", "check_batch_shape", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_dtype(dtype) -> tuple[torch.dtype, torch.dtype]:
    """Return ``(output_dtype, compute_dtype)``; half precision is computed in float32."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype or None, got dtype={dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"`dtype` must be one of float16, bfloat16, float32, float64, got dtype={dtype}"
        )
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return dtype, compute


def check_generator(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def resolve_device(device, generator) -> torch.device:
    """The device to sample on: ``device``, else the generator's, else the CPU.

    A generator lives on one device; sampling elsewhere with it is an error.
    """
    generator = check_generator(generator)
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"`device` must be a torch.device, a string or None, got device={device!r}") from exc
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"`generator` lives on {generator.device} but `device` is {device}: "
            "pass a generator created on the sampling device"
        )
    return device


def check_batch_shape(batch_shape) -> tuple[int, ...]:
    if isinstance(batch_shape, numbers.Integral) and not isinstance(batch_shape, bool):
        batch_shape = (int(batch_shape),)
    try:
        shape = tuple(batch_shape)
    except TypeError as exc:
        raise TypeError(f"`batch_shape` must be a tuple of ints, got batch_shape={batch_shape!r}") from exc
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
            raise ValueError(f"`batch_shape` must hold non-negative ints, got batch_shape={batch_shape!r}")
    return tuple(int(s) for s in shape)
