"""A backend (the protocol of addax_kernels/backends/__init__.py) that runs the CUDA kernels'
CPU emulation on CPU tensors: the native backend's own prepare/run with the emulated extension
as device 0.  The tests install it in place of the native backend (:func:`installed`)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from addax_kernels import backends
from addax_kernels.backends import native
from addax_kernels.ops import _backend_choice, _plan

from . import load, missing_toolchain

__all__ = ["unavailable_reason", "prepare", "run", "active", "installed", "missing_toolchain"]

EMULATED_DEVICE = 0  # the emulated runtime's one device
EMULATED_STREAM = 0


def unavailable_reason(device: torch.device) -> Optional[str]:
    if torch.device(device).type != "cpu":
        return "the CUDA emulation runs on CPU tensors"
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None


def prepare(group, params, states):
    return native.prepare_with(load(), EMULATED_DEVICE, group, params, states)


def run(prepared, group, job, params, grads, states) -> None:
    native.run_with(load(), prepared, group, job, grads, 1, EMULATED_STREAM)


def active() -> bool:
    """Whether backend="native" currently means this emulation."""
    return backends._MODULES["native"] == __name__


@contextlib.contextmanager
def installed():
    """backend="native" runs the CUDA emulation inside the block.  The ops cache the module of
    a backend name and the prepared groups of each plan per backend name, so both caches are
    emptied on the way in and out."""
    original = backends._MODULES["native"]
    _forget_backend_modules()
    backends._MODULES["native"] = __name__
    try:
        yield
    finally:
        backends._MODULES["native"] = original
        _forget_backend_modules()


def _forget_backend_modules() -> None:
    _backend_choice._RESOLVED.clear()
    _plan.CACHE.clear()
