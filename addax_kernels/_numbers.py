"""The package's number checks, below every layer: Python or numpy numbers, bool refused
(``True`` is an ``int`` to Python, never a count, a seed or a learning rate here)."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["is_integer", "is_real_number"]


def is_integer(value) -> bool:
    """True for a Python or numpy integer; False for bool."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real_number(value) -> bool:
    """True for a Python or numpy real number (int or float); False for bool."""
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))
