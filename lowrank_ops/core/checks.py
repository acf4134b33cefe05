"""Input checks shared by every public entry point.

Each helper raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, device, value) with a message naming the argument, what was expected and what came.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """``value`` is a tensor with one of ``dtypes`` and (if given) ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got shape {tuple(value.shape)}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` is a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_device(name: str, value: torch.Tensor, device: torch.device, owner: str) -> None:
    """``value`` lives on ``device``, that of ``owner`` (named in the message)."""
    if value.device != device:
        raise ValueError(f"{name}: expected device {device} (that of {owner}), got {value.device}")


def check_same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``value`` has the dtype and device of ``ref``."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {value.dtype}")
    check_device(name, value, ref.device, ref_name)


def check_dim(name: str, value: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """``value.shape[dim] == expected``."""
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected size {expected} at dim {dim} ({meaning}), got shape {tuple(value.shape)}"
        )


def check_finite(name: str, value: torch.Tensor) -> None:
    """No NaN or Inf."""
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf entries")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` is an int (not bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}], got {value}")
    return value


def check_choice(name: str, value: object, allowed: Sequence[int]) -> int:
    """``value`` is an int (not bool) among ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int in {list(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value}")
    return value


def check_name(name: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` is a str among ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str in {list(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
    return value


def check_fraction(name: str, value: object, *, low_open: bool = True, high_closed: bool = True) -> float:
    """``value`` is a real number in (0, 1] (bounds adjustable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value <= 1 if high_closed else value < 1
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + ("]" if high_closed else ")")
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """``value`` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def check_linear(linear: object) -> nn.Linear:
    """``linear`` is a ``torch.nn.Linear`` with a 2-D float weight."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
    check_tensor("linear.weight", linear.weight, ndim=2)
    return linear


def check_format_metadata(state: object, metadata: object, keys: Sequence[str], fmt: str, cls_name: str) -> Mapping[str, Any]:
    """The common checks of a packed format's ``from_state_dict(state, metadata)``: both are
    mappings, ``metadata`` (the format's ``config()``) has ``keys`` and names format ``fmt``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping of tensor names to tensors, got {type(state).__name__}")
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a mapping ({cls_name}.config()), got {type(metadata).__name__}")
    missing = [key for key in keys if key not in metadata]
    if missing:
        raise ValueError(f"metadata: expected keys {list(keys)}, missing {missing}")
    if metadata["format"] != fmt:
        raise ValueError(f"metadata: expected format {fmt!r}, got {metadata['format']!r}")
    return metadata


def check_kernel_operand(name: str, t: object, dtypes: tuple, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A tensor a raw-pointer kernel may read: one of ``dtypes``, exactly ``shape``, row-major
    contiguous, on ``device`` (that of x)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous (row-major) tensor, got strides {t.stride()}")
    check_device(name, t, device, "x")
    return t


def check_kernel_device(x: torch.Tensor, device_type: str) -> None:
    """The last check of a raw-pointer kernel's inputs: x (and so every operand, checked against
    x's device before) on a ``device_type`` device (cuda; cpu for the CUDA emulation lane)."""
    if x.device.type != device_type:
        raise ValueError(f"x: expected a {device_type.upper()} tensor, got device {x.device}")


def check_decode_x(x: object, dtypes: Iterable[torch.dtype], max_rows: int, kernel: str) -> tuple[int, int]:
    """``x`` for a raw-pointer decode kernel: a contiguous 2-D tensor of one of ``dtypes`` with
    1..``max_rows`` rows and at least one column. Returns (M, K); the device is checked last by
    the caller, so every other check runs on CPU tensors."""
    dtypes = tuple(dtypes)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"x: expected dtype {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dimensions (M, K), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous (row-major) tensor, got strides {x.stride()}")
    rows, k = x.shape
    if not 1 <= rows <= max_rows:
        raise ValueError(f"x: expected 1..{max_rows} rows for the {kernel}, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"x: expected K >= 1 columns, got shape {tuple(x.shape)}")
    return rows, k


def check_lowrank_pair(lr_u: object, lr_v: object, out_features: int, in_features: int,
                       dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    """The optional low-rank compensation factors of a packed format: both or neither;
    ``lr_u`` (out_features, r) and ``lr_v`` (r, in_features) with r ≥ 1, one dtype."""
    if (lr_u is None) != (lr_v is None):
        raise ValueError("lr_u/lr_v: expected both or neither, got one")
    if lr_u is None:
        return
    check_tensor("lr_u", lr_u, ndim=2, dtypes=dtypes)
    check_tensor("lr_v", lr_v, ndim=2, dtypes=dtypes)
    check_dim("lr_u", lr_u, 0, out_features, "out_features")
    check_dim("lr_v", lr_v, 1, in_features, "in_features")
    check_dim("lr_v", lr_v, 0, lr_u.shape[1], "rank = lr_u.shape[1]")
    if lr_u.shape[1] < 1:
        raise ValueError("lr_u: expected rank >= 1 (use None for no low-rank path), got rank 0")
    if lr_v.dtype != lr_u.dtype:
        raise TypeError(f"lr_v: expected dtype {lr_u.dtype} (that of lr_u), got {lr_v.dtype}")
