"""Which backend runs a call: ``backend="auto"`` resolution, the environment override, reports."""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Tuple, Union

import torch

from .. import backends as _backends

BACKEND_ENV_VAR = "ADDAX_KERNELS_BACKEND"
BACKEND_NAMES = _backends.BACKEND_NAMES
# What a call's backend= accepts: "auto" (resolved per device) or a backend by name.
BACKEND_CHOICES = ("auto",) + BACKEND_NAMES


def device_backend_order(device: torch.device) -> Tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "native", "reference")
    # Triton on the CPU is its interpreter: correct but far slower than the reference.
    return ("native", "reference")


def backend_report(device: Union[str, torch.device] = "cpu") -> Dict[str, str]:
    """For each backend, ``"available"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {
        name: (_backends.unavailable_reason(name, device) or "available") for name in _backends.BACKEND_NAMES
    }


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Names of the backends that can run on ``device``."""
    return [name for name, state in backend_report(device).items() if state == "available"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device``.

    ``"auto"`` honours the ``ADDAX_KERNELS_BACKEND`` environment variable, then picks the
    fastest available backend for the device; when that is the slow reference backend because
    a faster one is missing, one warning per process and device type says why.  An explicitly
    named backend that cannot run raises a RuntimeError saying why.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return _resolve_backend(backend, str(device), os.environ.get(BACKEND_ENV_VAR, "").strip())


_FALLBACK_WARNED = set()


def _warn_reference_fallback(device: torch.device) -> None:
    if device.type in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(device.type)
    reasons = "; ".join(
        f"{name}: {_backends.unavailable_reason(name, device)}" for name in device_backend_order(device)[:-1]
    )
    warnings.warn(
        f"addax_kernels: backend='auto' fell back to the pure-PyTorch reference backend on {device.type}, "
        f"which is tens of times slower ({reasons}). Set {BACKEND_ENV_VAR}=reference to choose it knowingly.",
        RuntimeWarning,
        stacklevel=5,
    )


# Under torch.compile the choice is made once at trace time and baked into the graph.
@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device_name: str, override: str) -> str:
    device = torch.device(device_name)
    if backend == "auto":
        if override and override != "auto":
            if override not in _backends.BACKEND_NAMES:
                raise ValueError(f"{BACKEND_ENV_VAR}={override!r} is not one of {BACKEND_CHOICES}")
            backend = override
        else:
            for name in device_backend_order(device):
                if _backends.unavailable_reason(name, device) is None:
                    if name == "reference":
                        _warn_reference_fallback(device)
                    return name
            raise RuntimeError(f"no addax_kernels backend can run on {device}")
    if backend not in _backends.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    reason = _backends.unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
    return backend


# (backend argument, device, environment override) -> (name, module), for eager calls.  Whether
# a backend can run on a device does not change within a process.
_RESOLVED: Dict[tuple, tuple] = {}


def backend_module(backend, device: torch.device):
    """``(name, module)`` of the backend that runs an eager call on ``device``."""
    if type(backend) is not str:
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    key = (backend, device, os.environ.get(BACKEND_ENV_VAR, ""))
    resolved = _RESOLVED.get(key)
    if resolved is None:
        name = resolve_backend(backend, device)
        resolved = (name, _backends.load(name))
        _RESOLVED[key] = resolved
    return resolved
