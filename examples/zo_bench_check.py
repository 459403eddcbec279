"""Run ZO-Bench's own trainer with and without addax_kernels' MeZO-trainer adapter.

ZO-Bench (ZO-Bench/ZO-LLM) is not part of this project: clone it yourself and point
``--zo-bench`` at its ``zo-bench`` folder.  Its trainer pins transformers 4.28, so run this
from a separate virtual environment with that version (torch installed first, then
``transformers==4.28.1 tokenizers==0.13.3 accelerate==0.25.0 "numpy<2" scikit-learn wandb``),
with this checkout on PYTHONPATH:

    PYTHONPATH=. python examples/zo_bench_check.py --zo-bench ../ZO-LLM/zo-bench --out zo_bench_check.json

For each ZO-Bench setting below, ZO-Bench's ``OurTrainer`` trains a tiny OPT language model
(built from a config, nothing downloaded) on synthetic sequences twice per seed: as ZO-Bench
ships it, and with ``MeZOKernelsMixin`` first in its bases.  Recorded per run: the training
loss ZO-Bench logs, the loss at θ on a fixed held-out batch before and after training, the
number of state tensors ZO-Bench's own torch optimizer holds at the end (the adapter updates
without it: none), or the error the adapter raised.  The adapter must either train like ZO-Bench (equal in
distribution: the z streams differ) or refuse the setting, naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Dict, List, Optional

import torch

# (label, ZO-Bench argument overrides, learning rate or None for --lr)
SETTINGS = [
    ("zo_sgd", {}, None),
    # Momentum 0.9 makes the effective step ten times lr: a tenth of the lr of plain ZO-SGD.
    ("zo_sgd, momentum=0.9", {"momentum": 0.9}, 1e-4),
    # Adam moves every coordinate by about lr per step.
    ("zo_adam", {"trainer": "zo_adam"}, 3e-4),
    ("zo_adam, q=2, one_side", {"trainer": "zo_adam", "q": 2, "perturbation_mode": "one_side"}, 3e-4),
    ("zo_sign_opt (optimizer=sgd)", {"trainer": "zo_sign_opt", "optimizer": "sgd"}, None),
    ("zo_sign_opt (optimizer=adam)", {"trainer": "zo_sign_opt", "optimizer": "adam"}, 3e-4),
    ("zo_conserv (optimizer=sgd)", {"trainer": "zo_conserv", "optimizer": "sgd"}, None),
    ("zo_sgd, q=2", {"q": 2}, None),
    ("zo_sgd, perturbation_mode=one_side", {"perturbation_mode": "one_side"}, None),
    ("zo_sgd, gradient_sparsity=0.75", {"gradient_sparsity": 0.75}, None),
    # Refused: ZO-Bench's zo_step_v1 perturbs with sparse z and updates with dense z.
    ("zo_sgd, q=2, gradient_sparsity=0.75", {"q": 2, "gradient_sparsity": 0.75}, None),
]

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zo-bench", required=True, help="the zo-bench folder of a ZO-Bench/ZO-LLM checkout")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--settings", nargs="+", default=None, metavar="LABEL",
                        help="run only these settings (labels as printed, e.g. zo_sgd)")
    parser.add_argument("--same-noise", action="store_true",
                        help="ZO-Bench's trainer draws the adapter's z (Philox, addax_kernels.noise) in place of "
                             "torch.normal, so both runs of a seed follow the same trajectory up to float rounding; "
                             "reports the largest parameter difference (sparse settings are skipped)")
    parser.add_argument("--out", default="zo_bench_check.json")
    return parser.parse_args(argv)


def zo_bench_arguments(base):
    """A TrainingArguments subclass with the fields of ZO-Bench's ``OurArguments``
    (zo-bench/run.py) that its trainer reads, under its names and defaults."""

    @dataclasses.dataclass
    class ZOBenchArguments(base):
        trainer: str = "zo_sgd"
        optimizer: str = "adamw"
        momentum: float = 0.0
        zo_eps: float = 1e-3
        perturbation_mode: str = "two_side"
        q: int = 1
        gradient_sparsity: Optional[float] = None
        sparse_gradient_resample_steps: int = 1
        sparse_gradient_group: str = "layer"
        module_wise_perturbation: bool = False
        perturbed_module_level: str = "transformer-block"
        coordinate_perturbation: bool = True
        linear_probing: bool = False
        lp_early_stopping: bool = False
        non_diff: bool = False
        only_train_option: bool = True
        train_as_classification: bool = False

    return ZOBenchArguments


def synthetic_sequences(count: int, length: int, vocab: int, generator: torch.Generator) -> List[Dict]:
    """Token sequences from a fixed random bigram table in which each token has one likely
    successor (probability 0.8): a language model can learn it from scratch."""
    table = torch.Generator().manual_seed(1234)
    successor = torch.randperm(vocab, generator=table)
    examples = []
    for _ in range(count):
        tokens = [int(torch.randint(vocab, (), generator=generator))]
        for _ in range(length - 1):
            follow = float(torch.rand((), generator=generator)) < 0.8
            tokens.append(int(successor[tokens[-1]]) if follow else int(torch.randint(vocab, (), generator=generator)))
        ids = torch.tensor(tokens)
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return examples


def tiny_opt(seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.OPTConfig(vocab_size=32, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                    dropout=0.0, attention_dropout=0.0)
    return transformers.OPTForCausalLM(config)


@torch.no_grad()
def held_out_loss(model, batch) -> float:
    model.eval()
    return float(model(**batch).loss)


def run_one(our_trainer, arguments, overrides, lr: float, use_adapter: bool, seed: int, options) -> Dict:
    """One training run; the record keeps the trained parameters under ``"parameters"`` (not saved)."""
    from transformers import default_data_collator

    from addax_kernels.integrations import MeZOKernelsMixin

    trainer_class = type("FusedOurTrainer", (MeZOKernelsMixin, our_trainer), {}) if use_adapter else our_trainer
    generator = torch.Generator().manual_seed(seed)
    train = synthetic_sequences(256, 16, 32, generator)
    held_out = default_data_collator(synthetic_sequences(64, 16, 32, generator))
    model = tiny_opt(seed)
    with tempfile.TemporaryDirectory() as output_dir:
        args = arguments(output_dir=output_dir, max_steps=options.steps, per_device_train_batch_size=16,
                         learning_rate=lr, zo_eps=options.eps, lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to=[], seed=seed, no_cuda=True, disable_tqdm=True,
                         **overrides)
        trainer = trainer_class(evaluate_func=None, dev_samples=None, eval_samples=None, perturb_module_regex=None,
                                model=model, args=args, train_dataset=train, eval_dataset=train[:16],
                                data_collator=default_data_collator)
        before = held_out_loss(model, held_out)
        record = {"adapter": use_adapter, "seed": seed, "lr": lr, "held_out_loss_before": before}
        try:
            trainer.train()
        except ValueError as error:
            record["error"] = str(error)
            return record
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record.update(
        held_out_loss_after=held_out_loss(model, held_out),
        # Tensors held by ZO-Bench's torch optimizer: state it stepped (momentum, Adam); under the
        # adapter, which updates on its own, none.
        zo_bench_optimizer_state_tensors=sum(
            isinstance(value, torch.Tensor) and value.numel() > 1
            for state in trainer.optimizer.state.values() for value in state.values()),
        train_loss_first_10=sum(losses[:10]) / len(losses[:10]),
        train_loss_last_10=sum(losses[-10:]) / len(losses[-10:]),
        steps=len(losses),
        parameters=[p.detach().clone() for p in model.parameters()],
        initial_parameters=[p.detach().clone() for p in tiny_opt(seed).parameters()],
    )
    return record


class PhiloxTorch:
    """Stands for the ``torch`` module inside ZO-Bench's trainer module (``--same-noise``):
    ``torch.manual_seed(s)`` then the i-th ``torch.normal(0, 1, size, ...)`` gives
    ``addax_kernels.noise(size, s, tid=i)``, the z the adapter uses for parameter i at seed s
    (ZO-Bench draws z parameter by parameter right after seeding); everything else is torch.
    ZO-Bench's sparsity mask is drawn by ``Tensor.normal_`` from a generator of its own, which
    this does not replace."""

    def __init__(self):
        self._seed, self._tid = None, 0

    def manual_seed(self, seed):
        self._seed, self._tid = int(seed), 0
        return torch.manual_seed(seed)

    def normal(self, mean=0, std=1, size=None, device=None, dtype=None, **kwargs):
        import addax_kernels

        if (mean, std) != (0, 1) or kwargs or self._seed is None:
            raise RuntimeError(f"PhiloxTorch.normal stands only for ZO-Bench's z draws, got mean={mean}, std={std}, "
                               f"{kwargs}, seed {self._seed}")
        # backend "auto", as the adapter's default: the very z its kernels regenerate.
        z = addax_kernels.noise(tuple(size), self._seed, tid=self._tid, dtype=dtype or torch.float32, device=device,
                                backend="auto")
        self._tid += 1
        return z

    def __getattr__(self, name):
        return getattr(torch, name)


def parameter_difference(zo_bench: Dict, adapter: Dict) -> float:
    """max |θ_ZO-Bench − θ_adapter| over the max |θ_end − θ_start| of ZO-Bench's run."""
    difference = max(float((a - b).abs().max()) for a, b in zip(zo_bench["parameters"], adapter["parameters"]))
    moved = max(float((a - b).abs().max()) for a, b in zip(zo_bench["parameters"], zo_bench["initial_parameters"]))
    return difference / moved


def mean_sd(values: List[float]):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def spread(values: List[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f} ({min(values):.3f} – {max(values):.3f})"


def welch_t(first: List[float], second: List[float]) -> float:
    (m1, s1), (m2, s2) = mean_sd(first), mean_sd(second)
    error = math.sqrt(s1 ** 2 / len(first) + s2 ** 2 / len(second))
    return (m2 - m1) / error if error > 0 else 0.0


def main(argv=None):
    options = parse_args(argv)
    sys.path.insert(0, os.path.abspath(options.zo_bench))
    import transformers
    import wandb

    wandb.init(mode="disabled")  # ZO-Bench's loop calls wandb.log
    import trainer as zo_bench_trainer  # ZO-Bench's zo-bench/trainer.py
    from trainer import OurTrainer

    torch.set_num_threads(1)
    arguments = zo_bench_arguments(transformers.TrainingArguments)
    settings = [setting for setting in SETTINGS if options.settings is None or setting[0] in options.settings]
    if options.same_noise:
        settings = [setting for setting in settings if setting[1].get("gradient_sparsity") is None]
    if not settings:
        raise SystemExit(f"--settings matches none of {[label for label, _, _ in SETTINGS]}")
    results = []
    for label, overrides, lr in settings:
        for use_adapter in (False, True):
            for seed in options.seeds:
                if options.same_noise and not use_adapter:
                    zo_bench_trainer.torch = PhiloxTorch()
                try:
                    record = run_one(OurTrainer, arguments, overrides, lr or options.lr, use_adapter, seed, options)
                finally:
                    zo_bench_trainer.torch = torch
                record["setting"] = label
                results.append(record)
                outcome = record.get("error") or (
                    f"held-out loss {record['held_out_loss_before']:.3f} -> {record['held_out_loss_after']:.3f}, "
                    f"train loss {record['train_loss_first_10']:.3f} -> {record['train_loss_last_10']:.3f}")
                print(f"{label:38s} {'adapter' if use_adapter else 'ZO-Bench':8s} seed {seed}: {outcome}", flush=True)
    print("\nsummary over seeds: held-out loss after training and its decrease, mean ± sd (min – max), "
          "or the adapter's error; t: Welch's t of the difference of the mean losses after training")
    for label, _, _ in settings:
        after = {}
        for use_adapter in (False, True):
            mine = [r for r in results if r["setting"] == label and r["adapter"] == use_adapter]
            errors = {r["error"] for r in mine if "error" in r}
            if errors:
                summary = "refused: " + " | ".join(sorted(errors))
            else:
                after[use_adapter] = [r["held_out_loss_after"] for r in mine]
                decrease = [r["held_out_loss_before"] - r["held_out_loss_after"] for r in mine]
                summary = f"after {spread(after[use_adapter])}, decrease {spread(decrease)}"
            print(f"  {label:38s} {'with adapter' if use_adapter else 'ZO-Bench':12s} {summary}")
        if len(after) == 2 and len(options.seeds) > 1:
            print(f"  {label:38s} {'':12s} t = {welch_t(after[False], after[True]):+.2f}")
        if len(after) == 2 and options.same_noise:
            worst = max(parameter_difference(r, a) for r in results for a in results
                        if r["setting"] == a["setting"] == label and not r["adapter"] and a["adapter"]
                        and r["seed"] == a["seed"])
            print(f"  {label:38s} {'':12s} same z: largest |θ_ZO-Bench − θ_adapter| / largest |θ_end − θ_start| "
                  f"= {worst:.1e}")
    for record in results:
        record.pop("parameters", None)
        record.pop("initial_parameters", None)
    with open(options.out, "w") as handle:
        json.dump({"steps": options.steps, "seeds": options.seeds, "eps": options.eps, "same_noise": options.same_noise,
                   "results": results},
                  handle, indent=1)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
