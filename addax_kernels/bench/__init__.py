"""The benchmark behind ``python -m addax_kernels bench`` (see docs/benchmark.md).

* :mod:`.kernels` — fused ops vs the copy roofline and MeZO-style PyTorch, per size/dtype;
* :mod:`.steps` — full MeZO and Addax steps on an OPT model vs MeZO's reference code;
* :mod:`.timing` — CUDA-event / perf_counter medians with cache-defeating buffer rotation,
  peak-memory meters;
* :mod:`.report`, :mod:`.plot` — tables, targets, JSON, summary.md and the PNG.
"""

from .cli import main, run, build_config
from .kernels import bytes_moved, mezo_addax_update_, mezo_perturb_, mezo_zo_update_

__all__ = ["main", "run", "build_config", "bytes_moved", "mezo_perturb_", "mezo_zo_update_", "mezo_addax_update_"]
