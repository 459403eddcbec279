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
loss ZO-Bench logs, the loss at θ on a fixed held-out batch before and after training, or the
error the adapter raised.  The adapter must either train like ZO-Bench (equal in
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

# (label, ZO-Bench argument overrides)
SETTINGS = [
    ("zo_sgd", {}),
    ("zo_sgd, momentum=0.9", {"momentum": 0.9}),
    ("zo_adam", {"trainer": "zo_adam"}),
    ("zo_sign_opt (optimizer=sgd)", {"trainer": "zo_sign_opt", "optimizer": "sgd"}),
    ("zo_conserv (optimizer=sgd)", {"trainer": "zo_conserv", "optimizer": "sgd"}),
    ("zo_sgd, q=2", {"q": 2}),
    ("zo_sgd, perturbation_mode=one_side", {"perturbation_mode": "one_side"}),
    ("zo_sgd, gradient_sparsity=0.75", {"gradient_sparsity": 0.75}),
]
LEARNING_RATES = {"zo_adam": 1e-4}  # Adam moves every coordinate by about lr: a smaller step than SGD's


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zo-bench", required=True, help="the zo-bench folder of a ZO-Bench/ZO-LLM checkout")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--settings", nargs="+", default=None, metavar="LABEL",
                        help="run only these settings (labels as printed, e.g. zo_sgd)")
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


def run_one(our_trainer, arguments, overrides, use_adapter: bool, seed: int, options) -> Dict:
    from transformers import default_data_collator

    from addax_kernels.integrations import MeZOKernelsMixin

    trainer_class = type("FusedOurTrainer", (MeZOKernelsMixin, our_trainer), {}) if use_adapter else our_trainer
    generator = torch.Generator().manual_seed(seed)
    train = synthetic_sequences(256, 16, 32, generator)
    held_out = default_data_collator(synthetic_sequences(64, 16, 32, generator))
    model = tiny_opt(seed)
    lr = LEARNING_RATES.get(overrides.get("trainer"), options.lr)
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
        train_loss_first_10=sum(losses[:10]) / len(losses[:10]),
        train_loss_last_10=sum(losses[-10:]) / len(losses[-10:]),
        steps=len(losses),
    )
    return record


def main(argv=None):
    options = parse_args(argv)
    sys.path.insert(0, os.path.abspath(options.zo_bench))
    import transformers
    import wandb

    wandb.init(mode="disabled")  # ZO-Bench's loop calls wandb.log
    from trainer import OurTrainer  # ZO-Bench's zo-bench/trainer.py

    torch.set_num_threads(1)
    arguments = zo_bench_arguments(transformers.TrainingArguments)
    settings = [(label, overrides) for label, overrides in SETTINGS
                if options.settings is None or label in options.settings]
    if not settings:
        raise SystemExit(f"--settings matches none of {[label for label, _ in SETTINGS]}")
    results = []
    for label, overrides in settings:
        for use_adapter in (False, True):
            for seed in options.seeds:
                record = run_one(OurTrainer, arguments, overrides, use_adapter, seed, options)
                record["setting"] = label
                results.append(record)
                outcome = record.get("error") or (
                    f"held-out loss {record['held_out_loss_before']:.3f} -> {record['held_out_loss_after']:.3f}, "
                    f"train loss {record['train_loss_first_10']:.3f} -> {record['train_loss_last_10']:.3f}")
                print(f"{label:38s} {'adapter' if use_adapter else 'ZO-Bench':8s} seed {seed}: {outcome}", flush=True)
    print("\nsummary (mean over seeds of the held-out loss after training, or the adapter's error):")
    for label, _ in settings:
        for use_adapter in (False, True):
            mine = [r for r in results if r["setting"] == label and r["adapter"] == use_adapter]
            errors = {r["error"] for r in mine if "error" in r}
            if errors:
                summary = "refused: " + " | ".join(sorted(errors))
            else:
                after = [r["held_out_loss_after"] for r in mine]
                mean = sum(after) / len(after)
                spread = math.sqrt(sum((a - mean) ** 2 for a in after) / max(1, len(after) - 1))
                summary = (f"held-out loss {mine[0]['held_out_loss_before']:.3f} -> {mean:.3f} ± {spread:.3f} "
                           f"(min {min(after):.3f}, max {max(after):.3f})")
            print(f"  {label:38s} {'with adapter' if use_adapter else 'ZO-Bench':12s} {summary}")
    with open(options.out, "w") as handle:
        json.dump({"steps": options.steps, "seeds": options.seeds, "eps": options.eps, "results": results},
                  handle, indent=1)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
