"""addax_kernels: fused zeroth-order (MeZO) and hybrid ZO/FO (Addax) parameter updates.

The noise z is regenerated inside the kernels from Philox4x32-10 (see ``SPEC.md``), so a
perturbation or an update is one pass over the parameters and never materializes z.

Importing never fails for a missing native extension, Triton or GPU; ask
:func:`backend_report` why a backend is unavailable.
"""

from .rng import philox4x32, uniforms
from .ops import (
    BACKEND_ENV_VAR,
    addax_update_,
    available_backends,
    backend_report,
    noise,
    perturb_,
    resolve_backend,
    zo_adam_update_,
    zo_momentum_update_,
    zo_update_,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "addax_update_",
    "available_backends",
    "backend_report",
    "noise",
    "perturb_",
    "philox4x32",
    "resolve_backend",
    "uniforms",
    "zo_adam_update_",
    "zo_momentum_update_",
    "zo_update_",
    "__version__",
]
