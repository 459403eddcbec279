"""The PyTorch code the fused ops replace, written the way MeZO's and ZO-Bench's trainers write
it: z drawn with ``torch.normal`` per parameter after ``torch.manual_seed(seed)``, ``param.data``
reassigned.  The kernel, ZO-Bench and step benchmarks all use these functions."""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch


def _mezo_z(param: torch.Tensor, sparsity: float = 0.0) -> torch.Tensor:
    z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
    if sparsity:  # ZO-Bench's sparse perturbation: a random mask, drawn each time, zeroes z
        z[torch.rand_like(z) < sparsity] = 0
    return z


def mezo_perturb_(params: Sequence[torch.Tensor], seed: int, eps: float, scaling_factor: float = 1.0,
                  sparsity: float = 0.0) -> None:
    """MeZO's ``zo_perturb_parameters``: θ ← θ + scaling_factor·z·ε (``sparsity``: ZO-Bench's)."""
    torch.manual_seed(seed)
    for param in params:
        param.data = param.data + scaling_factor * _mezo_z(param, sparsity) * eps


def mezo_zo_update_(params: Sequence[torch.Tensor], seed: int, projected_grad: float, lr: float, eps: float,
                    weight_decays: Sequence[float]) -> None:
    """The end of a MeZO step: restore θ − εz to θ, then MeZO's ``zo_update`` with z redrawn:
    θ ← θ − lr·(g·z + wd·θ)."""
    mezo_perturb_(params, seed, eps)
    torch.manual_seed(seed)
    for param, decay in zip(params, weight_decays):
        param.data = param.data - lr * (projected_grad * _mezo_z(param) + decay * param.data)


def mezo_addax_update_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], seed: int,
                       projected_grad: float, lr: float, alpha: float, weight_decays: Sequence[float]) -> None:
    """Addax's update written the MeZO way: θ ← θ − lr·(α·g0·z + (1−α)·∇θ + wd·θ)."""
    torch.manual_seed(seed)
    for param, grad, decay in zip(params, grads, weight_decays):
        z = _mezo_z(param)
        param.data = param.data - lr * (alpha * projected_grad * z + (1 - alpha) * grad + decay * param.data)


def zo_bench_update_(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, seed: int,
                     projected_grad: float, eps: float, sparsity: float = 0.0, sign: bool = False) -> None:
    """The end of a ZO-Bench step: restore θ − εz to θ, then per parameter z redrawn,
    ``p.grad = g·z`` (sign(g)·z for ZO-SGD-Sign), ``optimizer.step()``, ``p.grad = None``."""
    mezo_perturb_(params, seed, eps, sparsity=sparsity)
    coeff = float((projected_grad > 0) - (projected_grad < 0)) if sign else projected_grad
    torch.manual_seed(seed)
    for param in params:
        param.grad = coeff * _mezo_z(param, sparsity)
        optimizer.step()  # ZO-Bench's optimizer holds every parameter; only this one has a grad
        param.grad = None


def compiled_perturb() -> Callable[[Sequence[torch.Tensor], float], None]:
    """``torch.compile`` of ``p.add_(torch.randn_like(p) * s)``, applied tensor by tensor."""

    @torch.compile(dynamic=True)
    def perturb_one(param: torch.Tensor, scale: float) -> None:
        param.add_(torch.randn_like(param) * scale)

    def perturb(params: Sequence[torch.Tensor], scale: float) -> None:
        for param in params:
            perturb_one(param, scale)

    return perturb


def _zo_forward(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():  # MeZO's zo_forward
        return closure()


class MeZOReference:
    """MeZO's trainer (``zo_step`` + ``zo_update``) on param groups, and Addax written the same way
    (the FO loss backpropagated into ``.grad`` buffers and folded into the update).  Step t uses
    seed ``seed + t``."""

    def __init__(self, groups: Sequence[dict], lr: float, eps: float, alpha: float = 0.5, seed: int = 0):
        self.params = [param for group in groups for param in group["params"]]
        self.decays = [float(group.get("weight_decay", 0.0)) for group in groups for _ in group["params"]]
        self.lr, self.eps, self.alpha = lr, eps, alpha
        self._seeds = itertools.count(seed)

    def _projected_grad(self, closure: Callable[[], torch.Tensor], seed: int) -> float:
        """Losses at θ ± εz; leaves θ − εz in place, as MeZO's zo_step before its restore."""
        mezo_perturb_(self.params, seed, self.eps, 1.0)
        loss_plus = _zo_forward(closure)
        mezo_perturb_(self.params, seed, self.eps, -2.0)
        loss_minus = _zo_forward(closure)
        return ((loss_plus - loss_minus) / (2 * self.eps)).item()

    def mezo_step(self, closure: Callable[[], torch.Tensor]) -> None:
        seed = next(self._seeds)
        projected_grad = self._projected_grad(closure, seed)
        mezo_zo_update_(self.params, seed, projected_grad, self.lr, self.eps, self.decays)

    def addax_step(self, zo_closure: Callable[[], torch.Tensor], fo_closure: Callable[[], torch.Tensor]) -> None:
        seed = next(self._seeds)
        projected_grad = self._projected_grad(zo_closure, seed)
        mezo_perturb_(self.params, seed, self.eps, 1.0)
        fo_closure().backward()
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in self.params]
        mezo_addax_update_(self.params, grads, seed, projected_grad, self.lr, self.alpha, self.decays)
        for param in self.params:
            param.grad = None
