"""The public in-place ops (SPEC §2): check, pack seeds and scalars, pick a backend, dispatch.

* :func:`perturb_`, :func:`zo_update_`, :func:`addax_update_`, :func:`zo_momentum_update_`,
  :func:`zo_adam_update_`: one fused pass each over all tensors (``backends/__init__.py``
  states the pass every op reduces to); :func:`noise` materializes z.
* Nothing is modified unless every argument is valid: all checks run before the first kernel.
  A parameter list is checked once and its plan cached (``_plan.py``), so a call costs O(1)
  Python plus C++ work linear in the number of tensors; the checks themselves never change.
* Tensors are grouped by (parameter dtype, gradient dtype, state dtype); each group goes to
  the backend in one call.  After the pass the version counter of every written tensor is
  bumped, so autograd notices the in-place update as it does for torch's own in-place ops.
* Under ``torch.compile`` the ops record one custom op, ``addax_kernels::fused_update_``,
  whose implementation is the eager op (``_compiled.py``).

:func:`is_real_number` and :func:`is_integer` are the number checks (bool refused) the
optimizers share with the ops.
"""

from ._addax_update import addax_update_
from ._backend_choice import BACKEND_CHOICES, BACKEND_ENV_VAR, BACKEND_NAMES, available_backends, backend_report, resolve_backend
from ._checks import ROUNDING_MODES, SUPPORTED_DTYPES, is_integer, is_real_number
from ._compiled import fused_update_op as _fused_update_op
from ._noise import noise
from ._perturb import perturb_
from ._plan import check_grads as _check_grads
from ._plan import host_info
from ._zo_adam_update import zo_adam_update_
from ._zo_momentum_update import zo_momentum_update_
from ._zo_update import zo_update_

__all__ = [
    "perturb_",
    "zo_update_",
    "addax_update_",
    "zo_momentum_update_",
    "zo_adam_update_",
    "noise",
    "available_backends",
    "backend_report",
    "resolve_backend",
    "host_info",
    "is_integer",
    "is_real_number",
    "BACKEND_CHOICES",
    "BACKEND_ENV_VAR",
    "BACKEND_NAMES",
    "SUPPORTED_DTYPES",
    "ROUNDING_MODES",
]
