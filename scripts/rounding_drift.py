"""How each rounding policy of the optimizers behaves on bfloat16 parameters.

Two measurements per policy of ``addax_kernels.optim.ROUNDING_CHOICES``, both with MeZO
(two-sided, ε = 1e-3):

1. Drift under a constant loss.  50,000 bf16 gains start at exactly 1.0 (a LayerNorm weight at
   initialization); the closure returns a constant, so g = 0 and in exact arithmetic nothing
   ever moves.  Reported: the mean and the root-mean-square of (gain − 1) after 200 and 2000
   steps.  The mean is the bias; the RMS also counts the random walk of individual elements.
2. Training loss.  A 2-layer MLP with LayerNorms (5,569 parameters in one flat tensor) fits a
   fixed teacher network on 512 fixed inputs for 2000 steps (lr 3e-3), stored in bf16 and,
   as the reference, in float32; the forward always computes in float32 from the stored
   weights, so the difference measures storage rounding alone.  Reported: the final full-data
   MSE, averaged over three optimizer seeds, and its gap to float32.

Everything is deterministic (fixed seeds, fixed data).  Prints a Markdown table; the table in
docs/optimizers.md is this script's output.

    python scripts/rounding_drift.py [--backend reference] [--drift-steps 200 2000]
                                     [--train-steps 2000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Sequence

import torch

from addax_kernels.optim import DEFAULT_ROUNDING, ROUNDING_CHOICES, MeZO

GAINS = 50_000
EPS = 1e-3
LR = 3e-3
HIDDEN = 64
INPUTS = 16
SAMPLES = 512
# (shape, initial value): "uniform" is nn.Linear's U(±1/sqrt(fan_in)); "ones"/"zeros" for
# LayerNorm gains/shifts and biases.
LAYOUT = [
    ((HIDDEN, INPUTS), "uniform"), ((HIDDEN,), "zeros"), ((HIDDEN,), "ones"), ((HIDDEN,), "zeros"),
    ((HIDDEN, HIDDEN), "uniform"), ((HIDDEN,), "zeros"), ((HIDDEN,), "ones"), ((HIDDEN,), "zeros"),
    ((1, HIDDEN), "uniform"), ((1,), "zeros"),
]


def gain_drift(policy: str, checkpoints: Sequence[int], backend: str) -> Dict[int, Dict[str, float]]:
    """Mean and RMS of (gain − 1) at each checkpoint, constant-loss MeZO steps from 1.0."""
    gains = torch.ones(GAINS, dtype=torch.bfloat16)
    optimizer = MeZO([gains], lr=1e-3, eps=EPS, rounding=policy, seed=0, backend=backend)
    constant = torch.tensor(1.0)
    results = {}
    for step in range(1, max(checkpoints) + 1):
        optimizer.step(lambda: constant)
        if step in checkpoints:
            drift = gains.float() - 1.0
            results[step] = {"mean": float(drift.mean()), "rms": float(drift.square().mean().sqrt())}
    return results


def initial_weights(dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for shape, kind in LAYOUT:
        if kind == "uniform":
            parts.append(((torch.rand(shape, generator=generator) * 2 - 1) * shape[1] ** -0.5).flatten())
        else:
            parts.append((torch.ones if kind == "ones" else torch.zeros)(shape).flatten())
    return torch.cat(parts).to(dtype)


def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float32 from the stored weights (views of the one flat tensor)."""
    weights, start = [], 0
    stored = flat.float()
    for shape, _ in LAYOUT:
        count = torch.Size(shape).numel()
        weights.append(stored[start:start + count].view(shape))
        start += count
    w1, b1, g1, c1, w2, b2, g2, c2, w3, b3 = weights
    hidden = torch.nn.functional.gelu(torch.nn.functional.layer_norm(x @ w1.T + b1, (HIDDEN,), g1, c1))
    hidden = torch.nn.functional.gelu(torch.nn.functional.layer_norm(hidden @ w2.T + b2, (HIDDEN,), g2, c2))
    return hidden @ w3.T + b3


def task():
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, INPUTS, generator=generator)
    with torch.no_grad():
        y = forward(initial_weights(torch.float32, seed=99), x) * 3
    return x, y


def final_loss(dtype: torch.dtype, policy: str, seed: int, steps: int, backend: str) -> float:
    x, y = task()
    flat = initial_weights(dtype, seed=0)
    optimizer = MeZO([flat], lr=LR, eps=EPS, rounding=policy, seed=seed, backend=backend)

    def loss():
        return torch.nn.functional.mse_loss(forward(flat, x), y)

    for _ in range(steps):
        optimizer.step(loss)
    with torch.no_grad():
        return float(loss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--drift-steps", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()

    reference = [final_loss(torch.float32, "nearest", seed, args.train_steps, args.backend) for seed in args.seeds]
    reference_mean = sum(reference) / len(reference)
    rows: List[str] = []
    for policy in ROUNDING_CHOICES:
        drift = gain_drift(policy, args.drift_steps, args.backend)
        losses = [final_loss(torch.bfloat16, policy, seed, args.train_steps, args.backend) for seed in args.seeds]
        mean = sum(losses) / len(losses)
        cells = [f"`{policy}`" + (" (default)" if policy == DEFAULT_ROUNDING else "")]
        cells += [f"{drift[s]['mean']:+.2e}" for s in args.drift_steps]
        cells += [f"{drift[s]['rms']:.2e}" for s in args.drift_steps]
        cells += [f"{mean:.4f} ({', '.join(f'{v:.4f}' for v in losses)})", f"{mean - reference_mean:+.4f}"]
        rows.append("| " + " | ".join(cells) + " |")

    header = (["policy"] + [f"mean drift, {s} steps" for s in args.drift_steps]
              + [f"RMS drift, {s} steps" for s in args.drift_steps]
              + [f"final loss, bf16 (seeds {', '.join(map(str, args.seeds))})", "gap to fp32"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))
    print()
    print(f"float32 reference: final loss {reference_mean:.4f} ({', '.join(f'{v:.4f}' for v in reference)}); "
          f"gains: {GAINS} bf16 elements at 1.0, constant loss, ε = {EPS}; training: {args.train_steps} MeZO "
          f"steps, lr {LR}, ε = {EPS}; backend {args.backend}, torch {torch.__version__}; "
          f"{time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
