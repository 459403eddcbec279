"""Front-end integrations.

* :mod:`.transformers` — :class:`ZOTrainer` / :class:`ZOTrainingArguments`: a
  ``transformers.Trainer`` that trains with MeZO or Addax (needs transformers).
* :mod:`.mezo_adapter` — :class:`MeZOKernelsMixin` / :class:`MeZOAdapter`: MeZO's trainer
  methods (``zo_perturb_parameters``, ``zo_step``, ``zo_update``) on the fused ops; on
  ZO-Bench's trainer, ZO-Bench's step methods on the fused ZO-Bench-family ops, refusing,
  naming it, every setting it does not reproduce (``_zo_bench.py`` lists them).

Names are resolved on first use, so ``import addax_kernels.integrations`` never imports
transformers by itself.
"""

from importlib import import_module

_EXPORTS = {
    "ZOTrainer": ".transformers",
    "ZOTrainingArguments": ".transformers",
    "MeZOKernelsMixin": ".mezo_adapter",
    "MeZOAdapter": ".mezo_adapter",
    "MeZOArguments": ".mezo_adapter",
    "mezo_decays": ".mezo_adapter",
    "zo_bench_unserved_setting": ".mezo_adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
