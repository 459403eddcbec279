"""Zeroth-order (MeZO) and hybrid (Addax) fine-tuning inside ``transformers.Trainer``.

Usage::

    from addax_kernels.integrations import ZOTrainer, ZOTrainingArguments

    args = ZOTrainingArguments(output_dir="out", zo_method="addax", learning_rate=1e-4,
                               zo_eps=1e-3, addax_alpha=0.5, addax_length_threshold=128,
                               lr_scheduler_type="constant", max_steps=1000)
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

How it fits the Trainer (transformers 4.40 – 5.x):

* A ZO step needs the batch (it evaluates the loss at θ ± εz), so it runs inside
  :meth:`ZOTrainer.training_step`, which calls the :mod:`addax_kernels.optim` optimizer's
  ``step(closure)``.  The Trainer loop then calls ``optimizer.step()`` without a batch; the
  optimizer it holds (:class:`_StepTakenInTrainingStep`) makes that call a no-op, the pattern
  the Trainer already uses for LOMO.  The loop's lr scheduler, ``optimizer.pt`` checkpoints
  and param-group handling all reach the real optimizer through it.
* MeZO: the whole batch is the ZO batch.  Addax: the batch is split by sequence length
  (:func:`addax_kernels.data.split_by_length`): sequences longer than
  ``addax_length_threshold`` form the ZO batch (forward passes only), the others the FO batch
  (one backward, applied in place per parameter).
* ZO forward passes run with the model in eval mode (dropout off, so both perturbed losses
  see the same network, as in MeZO); the FO forward/backward runs in train mode.
* Weight decay follows the package's rule (:func:`addax_kernels.optim.decayed_parameter_names`:
  no decay for biases and the parameters of normalization modules), which
  :meth:`ZOTrainer.get_decay_parameter_names` returns; only parameters with
  ``requires_grad`` are touched, so PEFT adapters train and the frozen base model is never
  written.
* ZO losses are computed in float32 when the model has bf16/fp16 parameters or runs under
  bf16 autocast: torch's loss functions (cross entropy, MSE, BCE, ...) get float32 inputs
  while the loss is computed, whatever the head.  A 16-bit loss has so few values near its
  magnitude that (l+ - l-) / 2eps takes only a handful of values; a loss that still comes
  back in 16 bits (a ``compute_loss`` that does its own arithmetic) gets a warning.
* Defaults suit ZO fine-tuning: ``learning_rate`` is 1e-6 (full-parameter MeZO uses
  1e-7 – 1e-6; the Trainer's 5e-5 is far above that), the rest are the Trainer's.
* Checkpoints: the optimizer's ``state_dict`` (which carries the seed stream) goes to
  ``optimizer.pt`` as usual, so ``resume_from_checkpoint`` continues with the same z's.
* Logged per ``logging_steps``: ``loss`` (MeZO: loss at θ+εz; Addax: the mean of the ZO and
  FO losses weighted by their numbers of sequences), ``projected_grad_rms`` (root mean square
  of the projected gradients since the last log; for Gaussian z, E[(∇L·z)²] = ‖∇L‖², so it
  estimates the gradient norm), and for Addax ``zo_loss`` / ``fo_loss``.  The Trainer's
  ``grad_norm`` is dropped: no gradient buffer exists when the loop asks for it.
* Evaluation is the Trainer's own (forward passes under ``torch.no_grad``); it never builds
  gradients.

Not supported (clear errors): gradient accumulation (a ZO step is one two-point estimate on
one batch; raise the batch size instead), fp16 AMP (its GradScaler cannot reach the backward
that Addax runs inside the optimizer; bf16 AMP and bf16/fp16 weights are fine), DeepSpeed,
and Addax across several processes (see docs/distributed.md for the DDP hook route).
MeZO across processes all-reduces the projected gradient only
(:func:`addax_kernels.distributed.all_reduce_mean`).  ``max_grad_norm`` has no effect.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import Trainer, TrainingArguments

from ..ops import BACKEND_CHOICES
from ..optim.rounding import DEFAULT_ROUNDING, check_rounding
from ..rng import NOISE_KINDS

__all__ = ["ZOTrainer", "ZOTrainingArguments"]

ZO_METHODS = ("mezo", "addax")
# Full-parameter MeZO learning rates are 1e-7 - 1e-6 (MeZO's paper), far below the Trainer's 5e-5.
ZO_DEFAULT_LEARNING_RATE = 1e-6

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# torch's loss functions, as heads call them (HF's losses, nn.*Loss modules).
_LOSS_FUNCTIONS = frozenset({
    F.cross_entropy, F.nll_loss, F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.mse_loss,
    F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div, F.soft_margin_loss, F.multilabel_soft_margin_loss,
    F.poisson_nll_loss,
})


def _to_float32(value):
    if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION:
        return value.float()
    return value


class _Float32Losses(TorchFunctionMode):
    """Inside this mode torch's loss functions compute in float32: their bf16/fp16 tensor
    arguments are upcast first (the logits themselves stay as the model computed them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOSS_FUNCTIONS:
            args = tuple(_to_float32(value) for value in args)
            kwargs = {key: _to_float32(value) for key, value in kwargs.items()}
        return func(*args, **kwargs)


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the zeroth-order settings (all parse with ``HfArgumentParser``).

    ``learning_rate`` and ``weight_decay`` are the Trainer's own fields; ``learning_rate``
    defaults to 1e-6 here (typical MeZO learning rates are 1e-7 – 1e-6 for full fine-tuning,
    1e-5 – 1e-4 for LoRA), instead of the Trainer's 5e-5.
    """

    learning_rate: float = field(
        default=ZO_DEFAULT_LEARNING_RATE,
        metadata={"help": "Learning rate (default 1e-6: full-parameter MeZO; 1e-5 - 1e-4 suit LoRA)."},
    )

    zo_method: str = field(default="mezo", metadata={"help": "'mezo' (ZO-SGD) or 'addax' (ZO on long, FO on short sequences)."})
    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale epsilon."})
    zo_num_directions: int = field(default=1, metadata={"help": "MeZO only: directions per step (n-SPSA)."})
    zo_noise: str = field(default="gaussian", metadata={"help": "'gaussian' or 'rademacher' z."})
    zo_rounding: str = field(
        default=DEFAULT_ROUNDING,
        metadata={"help": "The optimizers' rounding policy, one of addax_kernels.optim.ROUNDING_CHOICES "
                          "(docs/optimizers.md)."},
    )
    zo_backend: str = field(default="auto", metadata={"help": "addax_kernels backend: auto, reference, triton, native."})
    zo_seed: Optional[int] = field(default=None, metadata={"help": "Base seed of the z stream (default: the run's seed)."})
    addax_alpha: float = field(default=0.5, metadata={"help": "Addax: weight of the ZO estimate, 1 - alpha on the FO gradient."})
    addax_length_threshold: Optional[int] = field(
        default=None, metadata={"help": "Addax: sequences longer than this go to the ZO batch, the rest to the FO batch."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.zo_method not in ZO_METHODS:
            raise ValueError(f"zo_method must be one of {ZO_METHODS}, got {self.zo_method!r}")
        if not self.zo_eps > 0:
            raise ValueError(f"zo_eps must be positive, got {self.zo_eps}")
        if isinstance(self.zo_num_directions, bool) or not isinstance(self.zo_num_directions, int) or self.zo_num_directions < 1:
            raise ValueError(f"zo_num_directions must be a positive int, got {self.zo_num_directions!r}")
        if self.zo_method == "addax" and self.zo_num_directions != 1:
            raise ValueError("zo_num_directions > 1 is a MeZO option; Addax uses one direction per step")
        if self.zo_noise not in NOISE_KINDS:
            raise ValueError(f"zo_noise must be one of {NOISE_KINDS}, got {self.zo_noise!r}")
        check_rounding(self.zo_rounding, "zo_rounding")
        if self.zo_backend not in BACKEND_CHOICES:
            raise ValueError(f"zo_backend must be one of {BACKEND_CHOICES}, got {self.zo_backend!r}")
        if self.zo_seed is not None and not 0 <= self.zo_seed < 2**64:
            raise ValueError(f"zo_seed must be in [0, 2**64), got {self.zo_seed}")
        if not 0.0 <= self.addax_alpha <= 1.0:
            raise ValueError(f"addax_alpha must be in [0, 1], got {self.addax_alpha}")
        if self.zo_method == "addax" and self.addax_length_threshold is None:
            raise ValueError("zo_method='addax' needs addax_length_threshold (the sequence length L_T of the split)")
        if self.addax_length_threshold is not None and self.addax_length_threshold < 0:
            raise ValueError(f"addax_length_threshold must be >= 0, got {self.addax_length_threshold}")


class _StepTakenInTrainingStep(torch.optim.Optimizer):
    """The optimizer the Trainer loop drives: the ZO optimizer's param_groups, state and
    state_dict, with a ``step()`` that does nothing, because :meth:`ZOTrainer.training_step`
    already took the step (it needs the batch; the loop calls ``step()`` without one).

    ``super().__init__`` is deliberately not called: it would copy the param groups, and
    schedulers must edit the real optimizer's ``lr``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        raise ValueError(
            "ZOTrainer's optimizer has fixed param groups: a parameter's stream id is its position, "
            "which must not change during training"
        )

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZOTrainer takes its optimizer step in training_step; step() accepts no closure")
        return None

    def __repr__(self):
        return f"{type(self).__name__}({self.optimizer!r})"


class _StepMetrics:
    """Running sums on the device between two logs (no host sync per step)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def add(self, name: str, total: torch.Tensor, count: int) -> None:
        total = total.detach().float()
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0) + count

    def means(self) -> Dict[str, float]:
        return {name: self.sums[name].item() / self.counts[name] for name in self.sums if self.counts[name]}


def _batch_size(batch: Dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: no tensor among the batch keys {sorted(batch)}")


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that fine-tunes with MeZO or Addax through addax_kernels.

    Takes :class:`ZOTrainingArguments`; everything else is the Trainer's (datasets, collator,
    callbacks, evaluation, checkpoints, ``compute_loss`` overrides).  An optimizer passed as
    ``optimizers=(opt, scheduler)`` must be an :class:`addax_kernels.optim.MeZO` or
    :class:`~addax_kernels.optim.Addax` matching ``zo_method``.

    After each step, :attr:`zo_optimizer` holds the optimizer, with ``projected_grads``,
    ``zo_loss`` and ``fo_loss`` of that step.
    """

    def __init__(self, model=None, args: Optional[ZOTrainingArguments] = None, *trainer_args, **trainer_kwargs):
        if args is None:
            args = ZOTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, ZOTrainingArguments):
            raise TypeError(f"ZOTrainer needs ZOTrainingArguments, got {type(args).__name__}")
        self.zo_optimizer = None
        self._zo_metrics = _StepMetrics()
        self._zo_loss_mode = None  # _Float32Losses for a 16-bit model, decided at the first ZO loss
        self._warned_low_precision_loss = False
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._check_supported()
        if self.optimizer is not None:
            self._adopt(self.optimizer)

    # ------------------------------------------------------------------ setup

    def _check_supported(self) -> None:
        args = self.args
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"ZOTrainer has no gradient accumulation (gradient_accumulation_steps={args.gradient_accumulation_steps}): "
                "a ZO step is one two-point estimate on one batch; raise per_device_train_batch_size instead"
            )
        if args.fp16:
            raise ValueError("ZOTrainer does not support fp16 AMP (GradScaler); use bf16, or fp16 weights without AMP")
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("ZOTrainer does not support DeepSpeed")
        if args.zo_method == "addax" and args.world_size > 1:
            raise ValueError(
                "ZOTrainer runs Addax in a single process; for data-parallel Addax use the optimizer with "
                "addax_kernels.distributed (docs/distributed.md)"
            )

    def _optimizer_class(self):
        from ..optim import Addax, MeZO

        return MeZO if self.args.zo_method == "mezo" else Addax

    def _adopt(self, optimizer) -> None:
        inner = optimizer.optimizer if isinstance(optimizer, _StepTakenInTrainingStep) else optimizer
        expected = self._optimizer_class()
        if not isinstance(inner, expected):
            raise TypeError(
                f"zo_method={self.args.zo_method!r} needs an addax_kernels.optim.{expected.__name__} optimizer, "
                f"got {type(inner).__name__}"
            )
        self.zo_optimizer = inner
        self.optimizer = optimizer if isinstance(optimizer, _StepTakenInTrainingStep) else _StepTakenInTrainingStep(inner)

    def _projected_grad_reduce(self):
        if self.args.world_size > 1:
            from ..distributed import all_reduce_mean

            return all_reduce_mean()
        return None

    def get_decay_parameter_names(self, model) -> List[str]:
        """The package's weight-decay rule (:func:`addax_kernels.optim.decayed_parameter_names`):
        every parameter but biases and the parameters of normalization modules."""
        from ..optim import decayed_parameter_names

        return decayed_parameter_names(model)

    def create_optimizer(self, model=None):
        """The MeZO/Addax optimizer over the trainable parameters, in two groups: with the
        Trainer's ``weight_decay`` and without (biases and norm parameters)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decayed_names = set(self.get_decay_parameter_names(opt_model))
            trainable = [(name, p) for name, p in opt_model.named_parameters() if p.requires_grad]
            if not trainable:
                raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
            groups = [
                {"params": [p for n, p in trainable if n in decayed_names], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in trainable if n not in decayed_names], "weight_decay": 0.0},
            ]
            groups = [group for group in groups if group["params"]]
            args = self.args
            common = dict(
                lr=args.learning_rate,
                eps=args.zo_eps,
                noise=args.zo_noise,
                rounding=args.zo_rounding,
                seed=args.seed if args.zo_seed is None else args.zo_seed,
                backend=args.zo_backend,
                grad_reduce=self._projected_grad_reduce(),
            )
            optimizer_class = self._optimizer_class()
            if args.zo_method == "mezo":
                optimizer = optimizer_class(groups, num_directions=args.zo_num_directions, **common)
            else:
                optimizer = optimizer_class(groups, alpha=args.addax_alpha, **common)
            self._adopt(optimizer)
        return self.optimizer

    # ------------------------------------------------------------------ training

    def _zo_loss(self, model, batch) -> torch.Tensor:
        """The loss at the current (perturbed) parameters, in eval mode, in float32."""
        model.eval()
        if self._zo_loss_mode is None:
            low_precision = self.args.bf16 or any(p.dtype in _LOW_PRECISION for p in model.parameters())
            self._zo_loss_mode = _Float32Losses() if low_precision else False
        with self.compute_loss_context_manager():
            if self._zo_loss_mode:
                with self._zo_loss_mode:
                    loss = self.compute_loss(model, batch)
            else:
                loss = self.compute_loss(model, batch)
        if loss.dtype in _LOW_PRECISION and not self._warned_low_precision_loss:
            self._warned_low_precision_loss = True
            warnings.warn(
                f"ZOTrainer: compute_loss returned a {loss.dtype} loss, so the two-point estimate "
                "(l+ - l-) / (2 zo_eps) takes only a few distinct values (multiples of the loss's 16-bit "
                "spacing / (2 zo_eps)). Compute the loss in float32 in compute_loss, e.g. "
                "torch.nn.functional.cross_entropy(outputs.logits.float(), labels).",
                RuntimeWarning,
                stacklevel=2,
            )
        return loss.mean() if loss.dim() else loss

    def _fo_loss(self, model, batch) -> torch.Tensor:
        model.train()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.mean() if loss.dim() else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One MeZO or Addax step on ``inputs`` (the optimizer updates the parameters here).

        ``num_items_in_batch`` is not forwarded: each closure's loss is the mean over its own
        (sub-)batch, which is what the two-point estimate and the FO gradient need.
        """
        if self.zo_optimizer is None:
            self.create_optimizer()
        optimizer = self.zo_optimizer
        if self.args.zo_method == "mezo":
            inputs = self._prepare_inputs(inputs)
            loss = optimizer.step(lambda: self._zo_loss(model, inputs))
        else:
            from ..data import split_by_length

            # Split before moving to the device: the split reads lengths on the host (no sync
            # when the loader yields CPU batches).  Trimming the padding columns a side does
            # not need also shortens the FO backward.
            encoder_decoder = bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))
            zo_batch, fo_batch = split_by_length(inputs, self.args.addax_length_threshold, trim_padding=True,
                                                 encoder_decoder=encoder_decoder)
            zo_batch = None if zo_batch is None else self._prepare_inputs(zo_batch)
            fo_batch = None if fo_batch is None else self._prepare_inputs(fo_batch)
            optimizer.step(
                None if zo_batch is None else (lambda: self._zo_loss(model, zo_batch)),
                None if fo_batch is None else (lambda: self._fo_loss(model, fo_batch)),
            )
            loss = self._addax_batch_loss(zo_batch, fo_batch)
        model.train()
        self._record_step(optimizer)
        return loss.detach()

    def _addax_batch_loss(self, zo_batch, fo_batch) -> torch.Tensor:
        """The ZO and FO losses of this step, weighted by their numbers of sequences.

        A part that did not run (an empty side, or alpha = 0 / 1 in every group) has no loss;
        if neither ran the step is NaN, which the Trainer's ``logging_nan_inf_filter`` (on by
        default) replaces with the running mean instead of logging it.
        """
        optimizer = self.zo_optimizer
        parts = [
            (loss.detach().float(), _batch_size(batch))
            for loss, batch in ((optimizer.zo_loss, zo_batch), (optimizer.fo_loss, fo_batch))
            if loss is not None
        ]
        if not parts:
            return torch.tensor(float("nan"), device=self.args.device)
        total = sum(n for _, n in parts)
        return sum(loss * (n / total) for loss, n in parts)

    def _record_step(self, optimizer) -> None:
        projected = optimizer.projected_grads
        if projected is not None:
            self._zo_metrics.add("projected_grad_sq", projected.float().square().sum(), projected.numel())
        if self.args.zo_method == "addax":
            if optimizer.zo_loss is not None:
                self._zo_metrics.add("zo_loss", optimizer.zo_loss, 1)
            if optimizer.fo_loss is not None:
                self._zo_metrics.add("fo_loss", optimizer.fo_loss, 1)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """Adds ``projected_grad_rms`` (and Addax's ``zo_loss``/``fo_loss``) to training logs."""
        if "loss" in logs:
            logs.pop("grad_norm", None)
            means = self._zo_metrics.means()
            if "projected_grad_sq" in means:
                logs["projected_grad_rms"] = means.pop("projected_grad_sq") ** 0.5
            logs.update(means)
            self._zo_metrics.reset()
        super().log(logs, *args, **kwargs)
