"""Input checks at the public boundary. Each error names the argument, what it got and what it
expected; backends assume inputs that passed these."""

import numbers
from typing import Optional, Union

import torch

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def values_readable(device: torch.device) -> bool:
    """Whether checks may read tensor values on the host: not while a CUDA graph is being
    captured on ``device`` (a host read is forbidden then), nor while ``torch.compile`` traces
    (a data-dependent branch would break the graph). The value checks (ranges, signs) are
    skipped then; they run on eager calls, and a graph replays whatever values its inputs hold."""
    if torch.compiler.is_compiling():  # a data-dependent branch would break the compiled graph
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def features(name: str, t, rank: int = 2) -> torch.Tensor:
    """A floating tensor of the given rank with no empty dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D; got {describe(t)}")
    if any(size == 0 for size in t.shape):
        raise ValueError(f"{name} must not be empty; got {describe(t)}")
    return t


def same_width(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has feature width D={t.shape[-1]} but {ref_name} has D={ref.shape[-1]}; they must match"
        )


def same_kind(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same device and dtype as the reference tensor."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype")


def same_rows(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has {t.shape[0]} rows but {ref_name} has {ref.shape[0]}; they must match")


def integer_vector(name: str, t, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long); got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},); got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    # a private copy: an in-place change between forward and backward must not reach the backward
    return t.to(torch.long, copy=True)


def flag(name: str, value) -> bool:
    """A bool option (a string such as "False" would otherwise act as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return value


def scalar(name: str, value, device: torch.device, positive: bool) -> Union[float, torch.Tensor]:
    """A Python number, or a tensor of shape () or (1,) (returned as ())."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (a float, or a tensor of shape () or (1,)); "
                         f"got shape {tuple(value.shape)}")
    value = scalar_or_rows(name, value, 1, device, positive)
    return value.reshape(()) if isinstance(value, torch.Tensor) else value


def scalar_or_rows(name: str, value, n: int, device: torch.device, positive: bool) -> Union[float, torch.Tensor]:
    """A Python number, or a tensor of shape (), (1,) or (n,), returned as () or (n,). A (1,)
    tensor for a single row is per-row: a one-row shard of per-row values stays per-row."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor; got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor; got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        if value.dim() == 1 and value.shape[0] == n:
            pass
        elif value.numel() == 1 and value.dim() <= 1:
            value = value.reshape(())
        elif value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name} must be a scalar, shape (1,) or shape ({n},) (one per row); "
                             f"got {tuple(value.shape)}")
        if positive and values_readable(value.device) and bool((value.detach() <= 0).any()):
            raise ValueError(f"{name} must be > 0; got a tensor with min {float(value.detach().min()):.4g}")
        return value
    value = float(value)
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def optional_bias(name: str, value, device: torch.device) -> Optional[Union[float, torch.Tensor]]:
    return None if value is None else scalar(name, value, device, positive=False)
