"""The one validator of compute devices: ``"cpu"`` or CUDA indexes such as ``"0"`` or ``"0,1"``.

:func:`parse_device` checks the spelling (config models, the training request, the CLI);
:func:`check_device_available` checks that this host has the device (imports torch).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

__all__ = ["DeviceName", "check_device_available", "parse_device"]


def parse_device(value: str, *, several: bool = True) -> str:
    """Normalise a device string; a ValueError says what is allowed (callers name the field).

    Args:
        value: ``"cpu"``, a CUDA index (``"0"``) or, when ``several``, a list (``"0,1"``).
        several: Whether several CUDA devices may be named.
    """
    text = value.strip().lower()
    parts = text.split(",")
    if text == "cpu" or (all(p.isdigit() for p in parts) and (several or len(parts) == 1)):
        return text
    allowed = "CUDA device indexes like '0' or '0,1'" if several else "a CUDA index like '0'"
    raise ValueError(f"expected 'cpu' or {allowed}")


def check_device_available(device: str) -> None:
    """Fail early, with the reason, when a CUDA device is requested but not usable here.

    Raises:
        ConfigError: no CUDA, or fewer CUDA devices than the indexes name.
    """
    if device == "cpu":
        return
    import torch

    from retrain_lib.core.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: CUDA was requested but no CUDA device is available here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use "
            "--device cpu, or run on a GPU host (docker runner with gpus > 0)")
    wanted = [int(i) for i in device.split(",")]
    count = torch.cuda.device_count()
    if max(wanted) >= count:
        raise ConfigError(f"device {device!r}: only {count} CUDA device(s) are visible "
                          f"(indexes 0..{count - 1})")


DeviceName = Annotated[str, AfterValidator(parse_device)]
"""A device field of a config model: checked and normalised by :func:`parse_device`."""
