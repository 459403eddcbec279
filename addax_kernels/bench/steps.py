"""Full MeZO and Addax steps on an OPT causal LM built from config (random weights, dropout off).

Each algorithm runs as ``addax_kernels`` (:class:`addax_kernels.optim.MeZO` / ``Addax``) and as
``mezo-reference`` (:class:`.baselines.MeZOReference`, MeZO's trainer code) on one model.  Per
step: its time; ``model_s``, the closures' work alone (two ZO forwards, plus the FO forward and
backward for Addax); ``other_s`` = step − model (parameter passes and host work); for MeZO,
``trivial_s``, the step with a closure that returns a constant (parameter passes plus host time,
measured directly), and on CUDA ``host_s``, that step's host time.  On CUDA, a MeZO step built
with ``capturable=True`` is captured in a CUDA graph and its replay timed against eager steps.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Tuple

import torch

from .baselines import MeZOReference
from .timing import host_seconds_per_call, peak_extra_bytes, seconds_per_call

# OPT shapes (transformers.OPTConfig fields); "125m" and larger are the released models' shapes.
MODEL_PRESETS: Dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=2048),
    "small": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4, vocab_size=8192),
    "125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32, vocab_size=50272),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32, vocab_size=50272),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32, vocab_size=50272),
}
MAX_POSITIONS = 2048
LR, EPS, ALPHA, WEIGHT_DECAY = 1e-6, 1e-3, 0.5, 0.0


def opt_param_shapes(preset: str) -> List[Tuple[int, ...]]:
    """The shapes of ``OPTForCausalLM(preset).parameters()`` in order (the LM head is tied)."""
    config = MODEL_PRESETS[preset]
    hidden, ffn = config["hidden_size"], config["ffn_dim"]
    # embed_tokens, embed_positions (OPT offsets positions by 2), the final LayerNorm; then per
    # layer k/v/q/out projections, attention LayerNorm, fc1, fc2, final LayerNorm.
    head = [(config["vocab_size"], hidden), (MAX_POSITIONS + 2, hidden), (hidden,), (hidden,)]
    layer = [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,), (ffn, hidden), (ffn,), (hidden, ffn),
                                                  (hidden,), (hidden,), (hidden,)]
    return head + layer * config["num_hidden_layers"]


def build_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**MODEL_PRESETS[preset], max_position_embeddings=MAX_POSITIONS, dropout=0.0,
                       attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it runs: a large model is slow to build on the host
        model = OPTForCausalLM(config)
    return model.to(dtype=dtype).eval()


def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss


def step_tasks(cfg, results: dict) -> Tuple[List[Tuple[str, Callable[[], None]]], List[Tuple[str, Callable]]]:
    """The step benchmark as (label, task) pairs, in two lists run in order with others between
    them; they share one model.  The second (graph capture, release) comes last in a run: a
    capture that fails could leave the device in a state later measurements should not meet."""
    state: dict = {}
    tasks = [(f"OPT-{cfg.model_size}: build, forward and backward alone", partial(_setup, cfg, state, results))]
    for algorithm in cfg.steps:
        for impl in ("mezo-reference", "addax_kernels"):  # Addax's hooks stay on the params: package last
            tasks.append((f"{algorithm} step {impl}", partial(_measure_step, cfg, state, results, algorithm, impl)))
    last = [("captured MeZO step", partial(_measure_graphs, cfg, state, results))] if cfg.device.type == "cuda" else []
    return tasks, last + [("release the model", state.clear)]


def _setup(cfg, state: dict, results: dict) -> None:
    from addax_kernels.optim import no_decay_param_groups

    model = build_model(cfg.model_size, cfg.step_dtype, cfg.device)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    zo_ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=generator).to(cfg.device)
    # Addax sends the shorter sequences to the FO batch: here half the ZO length.
    fo_ids = torch.randint(0, vocab, (cfg.batch_size, max(2, cfg.seq_len // 2)), generator=generator).to(cfg.device)
    state.update(model=model, zo=lambda: _loss(model, zo_ids), fo=lambda: _loss(model, fo_ids),
                 groups=lambda: no_decay_param_groups(model, weight_decay=WEIGHT_DECAY),
                 constant=torch.zeros((), device=cfg.device))

    def forward_backward():
        _loss(model, fo_ids).backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        zo_forward_s = seconds_per_call(state["zo"], cfg.device, cfg.budget_s)
    fo_s = seconds_per_call(forward_backward, cfg.device, cfg.budget_s)
    state["model_s"] = {"mezo": 2 * zo_forward_s, "addax": 2 * zo_forward_s + fo_s}
    results["steps"] = {
        "model": {"preset": cfg.model_size, "config": dict(MODEL_PRESETS[cfg.model_size]),
                  "num_params": sum(p.numel() for p in model.parameters()),
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
        "dtype": str(cfg.step_dtype).replace("torch.", ""), "batch_size": cfg.batch_size,
        "zo_seq_len": cfg.seq_len, "fo_seq_len": fo_ids.shape[1], "backend": cfg.step_backend,
        "zo_forward_s": zo_forward_s, "fo_forward_backward_s": fo_s, "results": [], "graph": [],
    }


def _package_optimizer(cfg, state: dict, algorithm: str, **options):
    from addax_kernels.optim import Addax, MeZO

    common = dict(lr=LR, eps=EPS, backend=cfg.step_backend, rounding=cfg.rounding, **options)
    if algorithm == "mezo":
        return MeZO(state["groups"](), **common)
    return Addax(state["groups"](), alpha=ALPHA, **common)


def _measure_step(cfg, state: dict, results: dict, algorithm: str, impl: str) -> None:
    device, budget = cfg.device, cfg.budget_s
    zo, fo, constant = state["zo"], state["fo"], state["constant"]
    if impl == "mezo-reference":
        reference = MeZOReference(state["groups"](), LR, EPS, ALPHA)
        step = {"mezo": reference.mezo_step, "addax": partial(reference.addax_step, fo_closure=fo)}[algorithm]
    else:
        optimizer = _package_optimizer(cfg, state, algorithm)
        step = {"mezo": optimizer.step, "addax": partial(optimizer.step, fo_closure=fo)}[algorithm]
    step_s = seconds_per_call(lambda: step(zo), device, budget)
    model_s = state["model_s"][algorithm]
    record = {"algorithm": algorithm, "impl": impl, "model": cfg.model_size, "step_s": step_s, "model_s": model_s,
              "other_s": step_s - model_s, "trivial_s": None, "host_s": None, "passes_fraction": None}
    if algorithm == "mezo":
        record["trivial_s"] = seconds_per_call(lambda: step(lambda: constant), device, budget)
        record["passes_fraction"] = record["trivial_s"] / step_s
        if device.type == "cuda":  # on the CPU the passes run on the host: no separate host time
            record["host_s"] = host_seconds_per_call(lambda: step(lambda: constant), device, calls=5)
    record["peak_extra_bytes"] = peak_extra_bytes(lambda: step(zo), device)
    previous = [r for r in results["steps"]["results"] if r["algorithm"] == algorithm and r["impl"] != impl]
    if previous and impl == "addax_kernels":
        record["vs_reference"] = previous[0]["step_s"] / step_s
        record["other_vs_reference"] = previous[0]["other_s"] / max(record["other_s"], 1e-12)
    results["steps"]["results"].append(record)


def _capture(fn: Callable[[], object]) -> "torch.cuda.CUDAGraph":
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _measure_graphs(cfg, state: dict, results: dict) -> None:
    """A MeZO(capturable=True) step captured whole, replayed against the same step run eagerly."""
    constant = state["constant"]
    for name, closure in (("model", state["zo"]), ("constant", lambda: constant)):
        row: dict = {"closure": name}
        try:
            optimizer = _package_optimizer(cfg, state, "mezo", capturable=True)
            row["eager_s"] = seconds_per_call(lambda: optimizer.step(closure), cfg.device, cfg.budget_s)
            graph = _capture(lambda: optimizer.step(closure))
            row["replay_s"] = seconds_per_call(graph.replay, cfg.device, cfg.budget_s)
            row["speedup"] = row["eager_s"] / row["replay_s"]
        except Exception as error:  # an optimizer without capturable=, or a model that cannot be captured
            row["error"] = f"{type(error).__name__}: {error}"
        results["steps"]["graph"].append(row)
