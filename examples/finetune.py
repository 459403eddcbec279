"""Fine-tune a small transformer with MeZO, Addax and in-place SGD on a synthetic task.

The task (generated here, nothing is downloaded): sequences of random tokens with lengths
spread over [--min-len, --max-len]; the label says whether the "needle" token occurs in the
sequence.  Varied lengths are what Addax exploits: sequences longer than the length threshold
go to the zeroth-order batch (forward passes only, memory of inference), the short ones to the
first-order batch (one backward, applied in place per parameter).

The model is built from a config (Llama-style or OPT), randomly initialized with a fixed seed;
all three methods start from the same weights and see the same batches:

* ``mezo``:  addax_kernels.optim.MeZO on the whole batch (two forward passes per step);
* ``addax``: addax_kernels.optim.Addax, batch split by length (ZO on long, FO on short);
* ``sgd``:   addax_kernels.optim.Addax with alpha=0 and the whole batch as the FO batch, i.e.
  in-place SGD: each gradient is applied and freed as soon as backward produces it.

The default learning rates are each method's best of a small sweep on the default task
(300-400 steps; MeZO lr in {3e-4, 1e-3, 3e-3}; Addax lr in {3e-2, 1e-1} x alpha in {0.01, 0.05};
SGD lr in {3e-3, 1e-2, 3e-2, 1e-1}).  MeZO needs far more steps than the others: with 85k
parameters the variance of a single-direction estimate is large, which is why it is used for
memory, not speed.

Writes ``<out-dir>/finetune_summary.json`` (final losses, accuracies, wall time per method) and
``<out-dir>/finetune_loss.png`` (training loss and evaluation accuracy against steps).

    python examples/finetune.py                       # defaults: a few minutes on 2 CPU cores
    python examples/finetune.py --steps 3 --out-dir /tmp/ft   # smoke test
    python examples/finetune.py --model opt --hidden-size 128 --layers 4 --steps 1000

On CPU the fast path is the native (C++) backend when it is built, else the PyTorch reference;
``--backend`` forces one.  Timings on a shared CPU say little about the kernels: use the
benchmarks for that.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

import addax_kernels
from addax_kernels.data import split_by_length
from addax_kernels.optim import Addax, MeZO, no_decay_param_groups

PAD = 0
NEEDLE = 1
METHODS = ("mezo", "addax", "sgd")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per method")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of mezo,addax,sgd")
    parser.add_argument("--model", choices=("llama", "opt"), default="llama")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=48)
    parser.add_argument("--min-len", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--length-threshold", type=int, default=None,
                        help="Addax L_T: longer sequences go to the ZO batch (default: middle of the length range)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--eval-size", type=int, default=512)
    parser.add_argument("--eval-points", type=int, default=8, help="evaluations along each run (plus the final one)")
    parser.add_argument("--lr-mezo", type=float, default=1e-3)
    parser.add_argument("--lr-addax", type=float, default=3e-2)
    parser.add_argument("--lr-sgd", type=float, default=1e-2)
    parser.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    parser.add_argument("--alpha", type=float, default=0.05, help="Addax weight of the ZO estimate")
    parser.add_argument("--backend", default="auto", help="addax_kernels backend: auto, reference, triton, native")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; models this small gain nothing from more, and a busy machine "
                        "loses a lot to spinning threads (0: torch's default)")
    parser.add_argument("--out-dir", default="finetune_out")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods takes a subset of {','.join(METHODS)}, got {unknown or 'nothing'}")
    if not 1 <= args.min_len <= args.max_len:
        parser.error("need 1 <= --min-len <= --max-len")
    if not 0.0 < args.alpha < 1.0:
        parser.error("--alpha must be in (0, 1): its endpoints are the sgd and mezo methods")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    if args.length_threshold is None:
        args.length_threshold = (args.min_len + args.max_len) // 2
    return args


# ----------------------------------------------------------------------------- data


@dataclass
class Dataset:
    input_ids: torch.Tensor  # [n, max_len], right-padded with PAD
    attention_mask: torch.Tensor  # [n, max_len]
    labels: torch.Tensor  # [n]

    def batch(self, index: torch.Tensor, device) -> Dict[str, torch.Tensor]:
        """The examples at ``index``, with the padding columns no example needs removed."""
        mask = self.attention_mask[index]
        width = int(mask.sum(-1).max())
        return {
            "input_ids": self.input_ids[index, :width].to(device),
            "attention_mask": mask[:, :width].to(device),
            "labels": self.labels[index].to(device),
        }


def make_dataset(size: int, args, generator: torch.Generator) -> Dataset:
    """Random sequences over tokens [2, vocab); label 1 puts the needle at a random position."""
    lengths = torch.randint(args.min_len, args.max_len + 1, (size,), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    input_ids = torch.randint(2, args.vocab_size, (size, args.max_len), generator=generator)
    positions = torch.arange(args.max_len)
    needle_at = (torch.rand(size, generator=generator) * lengths).long()
    input_ids[labels.bool(), needle_at[labels.bool()]] = NEEDLE
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    return Dataset(input_ids, attention_mask, labels)


# ----------------------------------------------------------------------------- model


def build_model(args) -> torch.nn.Module:
    """A randomly initialized sequence classifier, built from a config (no download)."""
    import transformers

    torch.manual_seed(args.seed)
    common = dict(vocab_size=args.vocab_size, num_labels=2, pad_token_id=PAD)
    if args.model == "llama":
        config = transformers.LlamaConfig(
            hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=args.max_len,
            **common,
        )
        model = transformers.LlamaForSequenceClassification(config)
    else:
        config = transformers.OPTConfig(
            hidden_size=args.hidden_size,
            ffn_dim=2 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            word_embed_proj_dim=args.hidden_size,
            max_position_embeddings=args.max_len,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
        model = transformers.OPTForSequenceClassification(config)
    return model.to(args.device)


@torch.no_grad()
def evaluate(model, data: Dataset, args) -> Dict[str, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data.labels), 256):
        index = torch.arange(start, min(start + 256, len(data.labels)))
        batch = data.batch(index, args.device)
        out = model(**batch)
        total_loss += float(out.loss) * len(index)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return {"loss": total_loss / len(data.labels), "accuracy": correct / len(data.labels)}


# ----------------------------------------------------------------------------- training


def make_optimizer(method: str, model, args):
    groups = no_decay_param_groups(model, weight_decay=0.0)
    if method == "mezo":
        return MeZO(groups, lr=args.lr_mezo, eps=args.eps, seed=args.seed, backend=args.backend)
    if method == "addax":
        return Addax(groups, lr=args.lr_addax, eps=args.eps, alpha=args.alpha, seed=args.seed, backend=args.backend)
    return Addax(groups, lr=args.lr_sgd, eps=args.eps, alpha=0.0, seed=args.seed, backend=args.backend)


def loss_closure(model, batch, train: bool):
    def closure():
        # ZO losses in eval mode: both perturbed evaluations must see the same network.
        model.train(train)
        return model(**batch).loss

    return closure


def train_one(method: str, initial_model, train: Dataset, evaluation: Dataset, args) -> Dict:
    model = copy.deepcopy(initial_model)
    optimizer = make_optimizer(method, model, args)
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batch sequence for every method
    eval_every = max(1, args.steps // max(1, args.eval_points))
    losses: List[float] = []
    evals = [{"step": 0, **evaluate(model, evaluation, args)}]
    zo_sequences = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(train.labels), (args.batch_size,), generator=batches)
        batch = train.batch(index, args.device)
        if method == "mezo":
            loss = optimizer.step(loss_closure(model, batch, train=False))
            zo_sequences += args.batch_size
        elif method == "addax":
            zo_batch, fo_batch = split_by_length(batch, args.length_threshold, trim_padding=True)
            optimizer.step(
                None if zo_batch is None else loss_closure(model, zo_batch, train=False),
                None if fo_batch is None else loss_closure(model, fo_batch, train=True),
            )
            loss = _batch_mean_loss(optimizer, zo_batch, fo_batch)
            zo_sequences += 0 if zo_batch is None else len(zo_batch["labels"])
        else:
            loss = optimizer.step(None, loss_closure(model, batch, train=True))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{method}: loss became {losses[-1]} at step {step}; lower its learning rate")
        if step % eval_every == 0 or step == args.steps:
            evals.append({"step": step, **evaluate(model, evaluation, args)})
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "train_loss_curve": losses,
        "eval_curve": evals,
        "final_train_loss": sum(tail) / len(tail),
        "final_eval_loss": evals[-1]["loss"],
        "final_eval_accuracy": evals[-1]["accuracy"],
        "zo_fraction_of_sequences": zo_sequences / (args.steps * args.batch_size),
        "seconds": seconds,
    }


def _batch_mean_loss(optimizer, zo_batch, fo_batch) -> torch.Tensor:
    """ZO and FO losses of the step weighted by their numbers of sequences (a part that did
    not run has no loss)."""
    parts = [
        (loss.detach().float(), len(batch["labels"]))
        for loss, batch in ((optimizer.zo_loss, zo_batch), (optimizer.fo_loss, fo_batch))
        if loss is not None
    ]
    total = sum(n for _, n in parts)
    return sum(loss * (n / total) for loss, n in parts)


# ----------------------------------------------------------------------------- outputs


def _smooth(values: List[float], window: int) -> List[float]:
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def plot(results: Dict[str, Dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, args.steps // 40)
    for method, result in results.items():
        curve = result["train_loss_curve"]
        loss_axis.plot(range(1, len(curve) + 1), _smooth(curve, window), label=method)
        steps = [point["step"] for point in result["eval_curve"]]
        accuracy_axis.plot(steps, [point["accuracy"] for point in result["eval_curve"]], marker="o", label=method)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel(f"training loss (moving mean of {window})")
    accuracy_axis.set_xlabel("step")
    accuracy_axis.set_ylabel("evaluation accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{args.model}, hidden {args.hidden_size}, {args.layers} layers; Addax L_T = {args.length_threshold}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args) -> Dict:
    os.makedirs(args.out_dir, exist_ok=True)
    data_generator = torch.Generator().manual_seed(args.seed)
    train = make_dataset(args.train_size, args, data_generator)
    evaluation = make_dataset(args.eval_size, args, data_generator)
    initial_model = build_model(args)
    num_params = sum(p.numel() for p in initial_model.parameters())
    backend = addax_kernels.resolve_backend(args.backend, torch.device(args.device))
    print(f"{args.model} classifier, {num_params:,} parameters, backend {backend!r}, device {args.device}")

    results = {}
    for method in args.methods:
        result = train_one(method, initial_model, train, evaluation, args)
        results[method] = result
        print(
            f"{method:>6}: train loss {result['final_train_loss']:.4f}  eval loss {result['final_eval_loss']:.4f}  "
            f"eval accuracy {result['final_eval_accuracy']:.3f}  ({result['seconds']:.1f} s)"
        )

    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "num_parameters": num_params,
        "backend": backend,
        "methods": {
            method: {key: value for key, value in result.items() if key != "train_loss_curve"}
            for method, result in results.items()
        },
    }
    summary_path = os.path.join(args.out_dir, "finetune_summary.json")
    with open(summary_path, "w") as handle:
        json.dump(summary, handle, indent=2)
    plot_path = os.path.join(args.out_dir, "finetune_loss.png")
    plot(results, plot_path, args)
    print(f"wrote {summary_path} and {plot_path}")
    return summary


if __name__ == "__main__":
    main()
