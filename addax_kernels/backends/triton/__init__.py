"""The Triton backend: the fused pass of backends/__init__.py as multi-tensor launches (docs/triton.md).

z is regenerated in the kernel from ``tl.philox`` with the explicit counters of SPEC §1, so
a pass reads and writes each parameter once and never materializes noise.  On CUDA devices
the kernels are compiled; on the CPU they run under Triton's interpreter
(``TRITON_INTERPRET=1``), which is slow and meant for tests.

Importing this package never fails: a missing or broken triton is reported by
:func:`unavailable_reason`.  The kernels are imported on first use because Triton decides
between compiling and interpreting when a kernel is defined.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Tuple

import torch

from .. import FusedJob, TensorGroup

_KERNELS_MODULE = __name__ + ".kernels"


def _interpreter_requested() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _leading_numbers(version: str) -> Tuple[int, ...]:
    """(major, minor) of a version string such as ``3.6.0`` or ``2.4.0rc1``."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _interpreter_conflict() -> Optional[str]:
    """Why this triton's interpreter cannot run the kernels with this NumPy, or None.

    Triton 3.6's interpreter takes int() of a runtime integer argument held as a 1-element
    array, which NumPy 2.4 refuses; the kernels loop over such counts.  Triton 3.7 fixed it.
    """
    import numpy
    import triton

    if _leading_numbers(triton.__version__) < (3, 7) and _leading_numbers(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} cannot run these kernels with NumPy "
                f"{numpy.__version__} (it calls int() on 1-element arrays, which NumPy >= 2.4 refuses); "
                "use triton >= 3.7 or numpy < 2.4 for the CPU interpreter")
    return None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as error:  # missing, or broken by a mismatched install
        return f"triton cannot be imported ({type(error).__name__}: {error}); install it with `pip install triton`"
    interpret = _interpreter_requested()
    loaded = sys.modules.get(_KERNELS_MODULE)
    if device.type == "cuda":
        if interpret:
            return ("TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only; "
                    "unset it for CUDA tensors")
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device or driver"
        if loaded is not None and loaded.INTERPRETED:
            return ("the Triton kernels were loaded for the interpreter in this process; "
                    "restart without TRITON_INTERPRET")
        return None
    if device.type == "cpu":
        if not interpret:
            return ("on the CPU the Triton backend runs only under its interpreter: "
                    "set TRITON_INTERPRET=1 before the first use")
        if loaded is not None and not loaded.INTERPRETED:
            return "the Triton kernels were compiled for GPU in this process before TRITON_INTERPRET=1 was set"
        return _interpreter_conflict()
    return f"the Triton backend runs on CUDA devices (or the CPU under TRITON_INTERPRET=1), not on {device.type}"


def prepare(group: TensorGroup, params, states):
    """Alignment classes and their metadata tables for ``group`` (uploaded once; no tensor kept)."""
    from . import launch

    return launch.prepare(group, params, states)


def run(prepared, group: TensorGroup, job: FusedJob, params, grads, states) -> None:
    """The fused pass of ``addax_kernels.backends`` over ``group``: one launch per alignment class."""
    from . import launch

    launch.run(prepared, group, job, params, grads, states)


def run_groups(prepared_list, groups, job: FusedJob, params, grads, states) -> None:
    """:func:`run` over every group of one call, compiling what is new before launching any."""
    from . import launch

    launch.run_groups(prepared_list, groups, job, params, grads, states)
