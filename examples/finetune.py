"""Fine-tune a small transformer with MeZO, Addax and in-place SGD on a synthetic task, over seeds.

The task (generated here, nothing is downloaded): sequences of random tokens with lengths
spread over [--min-len, --max-len]; the label says whether the "needle" token occurs in the
sequence.  Varied lengths are what Addax exploits: sequences longer than the length threshold
go to the zeroth-order batch (forward passes only, memory of inference), the short ones to the
first-order batch (one backward, applied in place per parameter).

The model is built from a config (Llama-style or OPT), randomly initialized.  For each seed,
all three methods start from the same weights, see the same data and the same batches; the
seed changes the data, the initialization, the batch order and the z stream.

* ``mezo``:  addax_kernels.optim.MeZO on the whole batch (two forward passes per step);
* ``addax``: addax_kernels.optim.Addax, batch split by length (ZO on long, FO on short);
* ``sgd``:   addax_kernels.optim.Addax with alpha=0 and the whole batch as the FO batch, i.e.
  in-place SGD: each gradient is applied and freed as soon as backward produces it.

Learning rates follow a schedule (default: linear warm-up over the first 10% of the steps,
then cosine decay to 0).  With a constant rate, the SGD steps on this small transformer can
blow up late in a run (Addax at a constant 3e-2 reached accuracy 0.998 on one seed and ended
at 0.756); decaying the rate keeps the end of every run at its best.  Peak rates: Addax 3e-2,
the best constant rate of a small sweep on the default task (lr 3e-2 or 1e-1, alpha 0.01 or
0.05); MeZO 2e-3 and SGD 2e-2, twice their best constant rates of that sweep (MeZO 3e-4 to
3e-3, SGD 3e-3 to 1e-1), since the schedule averages about half its peak.  MeZO needs far
more steps than the others: with 85k parameters the variance of a single-direction estimate
is large, which is why it is used for memory, not speed.

Writes to ``--out``:

* ``finetune_runs.json``: ``runs``, one entry per (method, seed): the evaluation steps,
  accuracies and losses, the training loss and learning rate of every step, the final and best
  evaluation accuracy, the share of sequences that went through ZO, wall time; and
  ``summary``: per method, mean / min / max over the seeds of the final and best accuracy.
* ``finetune.png``: training loss, evaluation accuracy and learning rate against the step, the
  mean over the seeds as a line and their range as a band.

    python examples/finetune.py                                  # defaults: one seed, 2.5 CPU-minutes
    python examples/finetune.py --seeds 0 1 2 3 4 --out runs/    # the spread over 5 seeds
    python examples/finetune.py --steps 3 --out /tmp/ft          # smoke test

On CPU the fast path is the native (C++) backend when it is built, else the PyTorch reference;
``--backend`` forces one.  Timings on a shared CPU say little about the kernels: use the
benchmark for that.
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
SCHEDULES = ("cosine", "linear", "constant")

# What each method's training loss is, for the plot's legend.
LOSS_MEANING = {
    "mezo": "MeZO: loss at θ+εz, whole batch",
    "addax": "Addax: ZO loss (long sequences, at θ+εz) and FO loss (short ones, at θ),\nmean weighted by sequence count",
    "sgd": "SGD: loss at θ, whole batch",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each method per seed")
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
    parser.add_argument("--eval-points", type=int, default=10, help="evaluations along each run (plus step 0)")
    parser.add_argument("--lr-mezo", type=float, default=2e-3, help="MeZO peak learning rate")
    parser.add_argument("--lr-addax", type=float, default=3e-2, help="Addax peak learning rate")
    parser.add_argument("--lr-sgd", type=float, default=2e-2, help="SGD peak learning rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                        help="after the warm-up: cosine or linear decay to 0, or constant")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps spent warming up linearly")
    parser.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    parser.add_argument("--alpha", type=float, default=0.05, help="Addax weight of the ZO estimate")
    parser.add_argument("--backend", default="auto", choices=addax_kernels.ops.BACKEND_CHOICES,
                        help="addax_kernels backend (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; models this small gain nothing from more, and a busy machine "
                        "loses a lot to spinning threads (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run in this many worker processes at once (each with --threads threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="finetune_out", help="output folder")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods takes a subset of {','.join(METHODS)}, got {unknown or 'nothing'}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if not 1 <= args.min_len <= args.max_len:
        parser.error("need 1 <= --min-len <= --max-len")
    if not 0.0 < args.alpha < 1.0:
        parser.error("--alpha must be in (0, 1): its endpoints are the sgd and mezo methods")
    if args.steps < 1 or args.batch_size < 1 or args.eval_points < 1 or args.jobs < 1:
        parser.error("--steps, --batch-size, --eval-points and --jobs must be positive")
    if not 0.0 <= args.warmup < 1.0:
        parser.error("--warmup must be in [0, 1)")
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


def build_model(args, seed: int) -> torch.nn.Module:
    """A randomly initialized sequence classifier, built from a config (no download)."""
    import transformers

    torch.manual_seed(seed)
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


def peak_lr(method: str, args) -> float:
    return {"mezo": args.lr_mezo, "addax": args.lr_addax, "sgd": args.lr_sgd}[method]


def lr_factor(step: int, args) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    warmup_steps = int(args.warmup * args.steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if args.schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, args.steps - warmup_steps)
    if args.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(method: str, model, args, seed: int):
    groups = no_decay_param_groups(model)
    lr = peak_lr(method, args)
    if method == "mezo":
        return MeZO(groups, lr=lr, eps=args.eps, seed=seed, backend=args.backend)
    alpha = args.alpha if method == "addax" else 0.0
    return Addax(groups, lr=lr, eps=args.eps, alpha=alpha, seed=seed, backend=args.backend)


def loss_closure(model, batch, train: bool):
    def closure():
        # ZO losses in eval mode: both perturbed evaluations must see the same network.
        model.train(train)
        return model(**batch).loss

    return closure


def train_one(method: str, seed: int, initial_model, train: Dataset, evaluation: Dataset, args, progress) -> Dict:
    model = copy.deepcopy(initial_model)
    optimizer = make_optimizer(method, model, args, seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    batches = torch.Generator().manual_seed(seed + 1)  # the same batch sequence for every method
    eval_every = max(1, args.steps // args.eval_points)
    losses: List[float] = []
    learning_rates: List[float] = []
    evals = [{"step": 0, **evaluate(model, evaluation, args)}]
    zo_sequences = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        learning_rates.append(optimizer.param_groups[0]["lr"])
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
        scheduler.step()
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{method}, seed {seed}: loss became {losses[-1]} at step {step}; "
                                     "lower its learning rate")
        if step % eval_every == 0 or step == args.steps:
            evals.append({"step": step, **evaluate(model, evaluation, args)})
        progress.update(1)
    accuracies = [point["accuracy"] for point in evals]
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "method": method,
        "seed": seed,
        "peak_lr": peak_lr(method, args),
        "eval_steps": [point["step"] for point in evals],
        "eval_accuracy": accuracies,
        "eval_loss": [point["loss"] for point in evals],
        "final_eval_accuracy": accuracies[-1],
        "best_eval_accuracy": max(accuracies),
        "final_eval_loss": evals[-1]["loss"],
        "final_train_loss": sum(tail) / len(tail),
        "train_loss": losses,
        "learning_rate": learning_rates,
        "zo_fraction_of_sequences": zo_sequences / (args.steps * args.batch_size),
        "seconds": time.perf_counter() - start,
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


def summarize(runs: List[Dict], methods: List[str]) -> Dict[str, Dict]:
    summary = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        summary[method] = {
            key: {
                "mean": sum(run[key] for run in mine) / len(mine),
                "min": min(run[key] for run in mine),
                "max": max(run[key] for run in mine),
            }
            for key in ("final_eval_accuracy", "best_eval_accuracy", "final_eval_loss", "final_train_loss")
        }
        summary[method]["largest_drop_from_best"] = max(run["best_eval_accuracy"] - run["final_eval_accuracy"]
                                                        for run in mine)
        summary[method]["seeds"] = [run["seed"] for run in mine]
    return summary


def _smooth(values: List[float], window: int) -> List[float]:
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def _band(curves: List[List[float]]):
    columns = list(zip(*curves))
    return ([sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns])


def plot(runs: List[Dict], methods: List[str], path: str, args, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (loss_axis, accuracy_axis, lr_axis) = plt.subplots(1, 3, figsize=(17, 6))
    window = max(1, args.steps // 40)
    seeds = sorted({run["seed"] for run in runs})
    spread = "mean over seeds, band = min-max" if len(seeds) > 1 else f"seed {seeds[0]}"
    for index, method in enumerate(methods):
        color = f"C{index}"
        mine = [run for run in runs if run["method"] == method]
        steps = list(range(1, args.steps + 1))
        mean, low, high = _band([_smooth(run["train_loss"], window) for run in mine])
        loss_axis.plot(steps, mean, color=color, label=LOSS_MEANING[method])
        loss_axis.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        eval_steps = mine[0]["eval_steps"]
        mean, low, high = _band([run["eval_accuracy"] for run in mine])
        accuracy_axis.plot(eval_steps, mean, color=color, marker="o", markersize=3, label=method)
        accuracy_axis.fill_between(eval_steps, low, high, color=color, alpha=0.2, linewidth=0)
        lr_axis.plot(steps, mine[0]["learning_rate"], color=color, linestyle=("-", "--", ":")[index % 3],
                     label=f"{method}: peak {peak_lr(method, args):g}")
    loss_axis.set_ylabel("training loss" + (f" (moving mean of {window} steps)" if window > 1 else ""))
    loss_axis.set_title(f"training loss ({spread})", fontsize=10)
    accuracy_axis.set_ylabel(f"evaluation accuracy ({args.eval_size} held-out sequences)")
    accuracy_axis.set_title(f"evaluation accuracy ({spread})", fontsize=10)
    lr_axis.set_yscale("log")
    lr_axis.set_ylabel("learning rate")
    warmup_steps = int(args.warmup * args.steps)
    warmup = f"linear warm-up over {warmup_steps} steps, then " if warmup_steps else ""
    decay = "constant" if args.schedule == "constant" else f"{args.schedule} decay to 0"
    lr_axis.set_title(f"learning rate: {warmup}{decay}", fontsize=10)
    for axis in (loss_axis, accuracy_axis, lr_axis):
        axis.set_xlabel("optimizer step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> Dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    backend = addax_kernels.resolve_backend(args.backend, torch.device(args.device))
    total_steps = len(args.seeds) * len(args.methods) * args.steps
    with _progress_bar(total_steps, args.no_progress) as progress:
        if args.jobs == 1 or len(args.seeds) == 1:
            per_seed = [run_seed(args, seed, progress) for seed in args.seeds]
        else:
            per_seed = _run_seeds_in_processes(args, progress)
    num_params = per_seed[0][0]
    runs = [run for _, seed_runs in per_seed for run in seed_runs]
    return write_outputs(args, runs, num_params, backend)


def _progress_bar(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", disable=disable, dynamic_ncols=True)


class _NoProgress:
    def update(self, count):
        pass

    def set_description(self, text):
        pass

    def write(self, text):
        print(text, flush=True)


def _run_seeds_in_processes(args, progress):
    """One worker process per seed, ``--jobs`` at a time; the bar advances as seeds finish."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    results = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(_seed_worker, args, seed): seed for seed in args.seeds}
        progress.set_description(f"{len(args.seeds)} seeds, {args.jobs} at a time")
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            progress.update(len(args.methods) * args.steps)
    return [results[seed] for seed in args.seeds]


def _seed_worker(args, seed):
    return run_seed(args, seed, _NoProgress())


def run_seed(args, seed: int, progress):
    """Every method on the data, initialization and batches of ``seed``: (parameter count, runs)."""
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data_generator = torch.Generator().manual_seed(seed)
        train = make_dataset(args.train_size, args, data_generator)
        evaluation = make_dataset(args.eval_size, args, data_generator)
        initial_model = build_model(args, seed)
        runs = []
        for method in args.methods:
            progress.set_description(f"{method} seed {seed}")
            result = train_one(method, seed, initial_model, train, evaluation, args, progress)
            runs.append(result)
            progress.write(
                f"{method:>6} seed {seed}: final eval accuracy {result['final_eval_accuracy']:.3f} "
                f"(best {result['best_eval_accuracy']:.3f}), eval loss {result['final_eval_loss']:.4f}, "
                f"train loss {result['final_train_loss']:.4f}  ({result['seconds']:.1f} s)"
            )
        return sum(p.numel() for p in initial_model.parameters()), runs
    finally:
        torch.set_num_threads(previous_threads)


def write_outputs(args, runs: List[Dict], num_params: int, backend: str) -> Dict:
    summary = summarize(runs, args.methods)
    title = (f"{args.model} classifier, {num_params:,} parameters, {args.steps} steps, batch {args.batch_size}, "
             f"Addax L_T = {args.length_threshold}, α = {args.alpha}; {len(args.seeds)} seed(s); backend {backend}")
    result = {"config": dict(vars(args)), "num_parameters": num_params, "backend": backend,
              "summary": summary, "runs": runs}
    json_path = os.path.join(args.out, "finetune_runs.json")
    with open(json_path, "w") as handle:
        json.dump(result, handle, indent=1)
    plot_path = os.path.join(args.out, "finetune.png")
    plot(runs, args.methods, plot_path, args, title)
    for method, stats in summary.items():
        final = stats["final_eval_accuracy"]
        print(f"{method:>6}: final eval accuracy mean {final['mean']:.3f} (min {final['min']:.3f}, "
              f"max {final['max']:.3f}); largest drop from a run's best: {stats['largest_drop_from_best']:.3f}")
    print(f"wrote {json_path} and {plot_path}")
    return result


if __name__ == "__main__":
    main()
