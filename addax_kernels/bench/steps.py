"""Step-level benchmark: one MeZO step and one Addax step on an OPT model built from config.

Each algorithm runs twice on identically initialized models:

* ``addax_kernels``: :class:`addax_kernels.optim.MeZO` / :class:`addax_kernels.optim.Addax`
  (fused passes; Addax applies the FO update per parameter inside the backward pass);
* ``mezo-reference``: the step written the way MeZO's trainer writes it
  (``zo_perturb_parameters`` regenerating z with ``torch.normal`` after
  ``torch.manual_seed``, a ``.item()`` for the projected gradient, ``zo_update`` with
  ``param.data = param.data - lr * (projected_grad * z + wd * param.data)``; for Addax the
  FO loss is backpropagated into full ``.grad`` buffers and folded into the same update).

Step time is split into the forward passes (the closures, timed from inside) and the rest:
the parameter passes for MeZO, the backward plus the parameter passes for Addax.  The model
weights are random: the loss values are irrelevant, only the work per step matters.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .kernels import DTYPE_NAMES, mezo_perturb_
from .timing import PeakMemoryMeter, SectionClock, synchronize

# OPT shapes (transformers.OPTConfig fields).  "125m" and larger match the released models.
MODEL_PRESETS: Dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=2048),
    "small": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4, vocab_size=8192),
    "125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32, vocab_size=50272),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, vocab_size=50272),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32, vocab_size=50272),
}
MAX_POSITIONS = 2048

# MeZO's trainer skips weight decay for parameters whose names contain these.
_MEZO_NO_DECAY_MARKERS = ("bias", "layer_norm", "layernorm")


@dataclass(frozen=True)
class StepSettings:
    device: torch.device
    model_size: str
    dtype: torch.dtype
    batch_size: int
    seq_len: int
    warmup: int
    repeats: int
    backend: str = "auto"
    rounding: str = "auto"
    lr: float = 1e-6
    eps: float = 1e-3
    alpha: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0

    @property
    def fo_seq_len(self) -> int:
        """Addax sends the shorter sequences to the FO batch; here half the ZO length."""
        return max(1, self.seq_len // 2)


def build_model(settings: StepSettings) -> torch.nn.Module:
    """An OPT causal LM of the preset's shape with dropout off, on the settings' device."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        **MODEL_PRESETS[settings.model_size],
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    )
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):  # initialize in place: a 6.7B model is slow to build on the host
        model = OPTForCausalLM(config)
    model = model.to(dtype=settings.dtype)
    model.eval()
    return model


def make_batches(settings: StepSettings, vocab_size: int):
    generator = torch.Generator().manual_seed(settings.seed + 1)
    zo_ids = torch.randint(0, vocab_size, (settings.batch_size, settings.seq_len), generator=generator)
    fo_ids = torch.randint(0, vocab_size, (settings.batch_size, settings.fo_seq_len), generator=generator)
    return zo_ids.to(settings.device), fo_ids.to(settings.device)


def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def _mezo_decays(model: torch.nn.Module, weight_decay: float):
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return [
        (param, 0.0 if any(marker in name for marker in _MEZO_NO_DECAY_MARKERS) else weight_decay)
        for name, param in named
    ]


class MeZOReference:
    """MeZO's trainer (``zo_step`` + ``zo_update``), with Addax's FO term as an option."""

    def __init__(self, model: torch.nn.Module, settings: StepSettings):
        self.settings = settings
        self.params_and_decays = _mezo_decays(model, settings.weight_decay)
        self.params = [param for param, _ in self.params_and_decays]
        self._seeds = random.Random(settings.seed)

    def _zo_gradient(self, zo_closure, seed: int):
        eps = self.settings.eps
        mezo_perturb_(self.params, seed, eps, scaling_factor=1)
        loss1 = zo_closure()
        mezo_perturb_(self.params, seed, eps, scaling_factor=-2)
        loss2 = zo_closure()
        projected_grad = ((loss1 - loss2) / (2 * eps)).item()
        mezo_perturb_(self.params, seed, eps, scaling_factor=1)
        return loss1, projected_grad

    def mezo_step(self, zo_closure) -> torch.Tensor:
        seed = self._seeds.randrange(1_000_000_000)
        loss1, projected_grad = self._zo_gradient(zo_closure, seed)
        lr = self.settings.lr
        torch.manual_seed(seed)
        for param, decay in self.params_and_decays:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data - lr * (projected_grad * z + decay * param.data)
        return loss1

    def addax_step(self, zo_closure, fo_closure) -> torch.Tensor:
        seed = self._seeds.randrange(1_000_000_000)
        _, projected_grad = self._zo_gradient(zo_closure, seed)
        fo_loss = fo_closure()
        fo_loss.backward()
        lr, alpha = self.settings.lr, self.settings.alpha
        torch.manual_seed(seed)
        for param, decay in self.params_and_decays:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data - lr * (alpha * projected_grad * z + (1 - alpha) * param.grad + decay * param.data)
            param.grad = None
        return fo_loss.detach()


def _package_optimizer(algorithm: str, model: torch.nn.Module, settings: StepSettings):
    from addax_kernels.optim import Addax, MeZO, no_decay_param_groups

    groups = no_decay_param_groups(model, weight_decay=settings.weight_decay)
    common = dict(
        lr=settings.lr, eps=settings.eps, rounding=settings.rounding, seed=settings.seed, backend=settings.backend
    )
    if algorithm == "mezo":
        return MeZO(groups, **common)
    return Addax(groups, alpha=settings.alpha, **common)


def _step_runner(algorithm: str, implementation: str, model, settings: StepSettings, zo_ids, fo_ids):
    """``run(clock)`` performs one step, timing its forward passes on ``clock``."""

    def zo_forward(clock):
        if implementation == "mezo-reference":
            # MeZO's zo_forward evaluates under inference_mode.
            def closure():
                with torch.inference_mode():
                    return clock.section(lambda: _loss(model, zo_ids)).detach()
        else:
            def closure():
                return clock.section(lambda: _loss(model, zo_ids))
        return closure

    def fo_forward(clock):
        return lambda: clock.section(lambda: _loss(model, fo_ids))

    if implementation == "mezo-reference":
        reference = MeZOReference(model, settings)
        if algorithm == "mezo":
            return lambda clock: reference.mezo_step(zo_forward(clock))
        return lambda clock: reference.addax_step(zo_forward(clock), fo_forward(clock))
    optimizer = _package_optimizer(algorithm, model, settings)
    if algorithm == "mezo":
        return lambda clock: optimizer.step(zo_forward(clock))
    return lambda clock: optimizer.step(zo_forward(clock), fo_forward(clock))


def _time_steps(run: Callable, settings: StepSettings):
    device = settings.device
    totals, forwards = [], []
    for index in range(settings.warmup + settings.repeats):
        forward_clock = SectionClock(device)
        synchronize(device)
        if device.type == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
            run(forward_clock)
            end_event.record()
            synchronize(device)
            total = start_event.elapsed_time(end_event) * 1e-3
        else:
            start = time.perf_counter()
            run(forward_clock)
            total = time.perf_counter() - start
        if index >= settings.warmup:
            totals.append(total)
            forwards.append(forward_clock.total_s())
    others = [total - forward for total, forward in zip(totals, forwards)]
    return {
        "median_step_s": statistics.median(totals),
        "median_forward_s": statistics.median(forwards),
        "median_other_s": statistics.median(others),
        "step_samples_s": totals,
        "forward_samples_s": forwards,
    }


def param_bytes(model: torch.nn.Module) -> int:
    return sum(param.numel() * param.element_size() for param in model.parameters())


def run_step_benchmarks(
    settings: StepSettings,
    algorithms=("mezo", "addax"),
    progress: Optional[Callable[[str], None]] = None,
    memory: Optional[PeakMemoryMeter] = None,
) -> dict:
    """Time each (algorithm, implementation); schedule one more step of each on ``memory``
    (peak beyond what was allocated before the step: activations and gradients count as
    extra; a deferred measurement keeps that model alive until ``memory.finish()``)."""
    implementations = ("addax_kernels", "mezo-reference")
    zo_ids = fo_ids = None
    records: List[dict] = []
    model_info: dict = {}
    for algorithm in algorithms:
        for implementation in implementations:
            model = build_model(settings)
            if not model_info:
                model_info = {
                    "preset": settings.model_size,
                    "config": dict(MODEL_PRESETS[settings.model_size]),
                    "num_params": sum(p.numel() for p in model.parameters()),
                    "param_bytes": param_bytes(model),
                }
                zo_ids, fo_ids = make_batches(settings, model.config.vocab_size)
            record = {"algorithm": algorithm, "implementation": implementation, "peak_extra_bytes": None}
            try:
                run = _step_runner(algorithm, implementation, model, settings, zo_ids, fo_ids)
            except ImportError as error:
                record["error"] = f"addax_kernels.optim is not importable: {type(error).__name__}: {error}"
                records.append(record)
                if progress is not None:
                    progress(f"{algorithm} {implementation} (skipped)")
                continue
            record.update(_time_steps(run, settings))
            records.append(record)
            if memory is not None:
                memory.schedule(record, lambda run=run: (lambda: run(SectionClock(settings.device))))
            del model, run
            if progress is not None:
                progress(f"{algorithm} step {implementation}")

    by_key = {(r["algorithm"], r["implementation"]): r for r in records}
    for algorithm in algorithms:
        ours, reference = by_key.get((algorithm, "addax_kernels")), by_key.get((algorithm, "mezo-reference"))
        if ours and reference and "error" not in ours and "error" not in reference:
            ours["speedup_vs_reference"] = reference["median_step_s"] / ours["median_step_s"]
            ours["other_speedup_vs_reference"] = reference["median_other_s"] / max(ours["median_other_s"], 1e-12)

    return {
        "model": model_info,
        "dtype": DTYPE_NAMES[settings.dtype],
        "batch_size": settings.batch_size,
        "zo_seq_len": settings.seq_len,
        "fo_seq_len": settings.fo_seq_len,
        "results": records,
    }


def count_steps(algorithms=("mezo", "addax")) -> int:
    return 2 * len(algorithms)
