"""addax_kernels.distributed on 2 CPU processes (gloo), against 1-process runs.

Every multi-process test spawns its own ranks (``spawn`` start method, a free port on
127.0.0.1, a bounded wait; ranks that outlive it are killed) and sends results back as
numpy arrays.  The healthy scenarios share one spawn (a module fixture) because starting
two Python processes that import torch costs seconds on the CI machine.

References are independent of the code under test: the unsharded tensor updated by the
public op in this process, and a 1-process run of the same training over the whole batch.

Tolerance of the training comparisons: the models compute their loss in float64, but the
optimizers take it as float32 (±6e-8 for losses in [1, 2)) before forming
g = (l+ - l-)/(2 eps).  A 2-rank g (the mean of two such estimates) and a 1-rank g therefore
differ by at most 4 * 6e-8 / (2 eps) = 1.2e-5 with eps = 1e-2, which moves a parameter by at
most lr * 1.2e-5 * max|z| ~ 0.02 * 1.2e-5 * 4 ~ 1e-6 per step, 4e-6 over the 4 steps: we allow
1e-5 (observed: 2e-7), while the parameters themselves move by ~3e-2.  The FO gradients that
DDP / FSDP2 average in float32 differ from the 1-process gradient by float32 rounding only.
"""

from __future__ import annotations

import datetime
import multiprocessing
import queue
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import addax_kernels as ak
from addax_kernels import distributed as akd
from addax_kernels import sharding
from addax_kernels.optim import Addax, MeZO

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD_SIZE = 2
PROCESS_GROUP_TIMEOUT_S = 30  # bounds every collective of a healthy run
SPAWN_WAIT_S = 120  # bounds a whole spawned run, imports included, on a loaded 2-core machine
PARAM_ATOL = 1e-5

SEED = 20250
LR = 0.02
EPS = 1e-2
ALPHA = 0.5
STEPS = 4
IN_FEATURES, HIDDEN, OUT_FEATURES = 6, 7, 3  # HIDDEN and OUT_FEATURES shard unevenly over 2 ranks


# ----------------------------------------------------------------------------- spawning ranks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _to_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy()
    if isinstance(value, dict):
        return {key: _to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(item) for item in value)
    return value


PROCESS_GROUP_KEY = "init_process_group"


def _rank_main(rank, world_size, port, scenarios, results):
    torch.set_num_threads(1)  # two ranks share two cores
    outcome = {}
    try:
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S),
            )
        except Exception:
            outcome[PROCESS_GROUP_KEY] = ("error", traceback.format_exc())
            return
        for scenario in scenarios:
            try:
                outcome[scenario.__name__] = ("ok", _to_numpy(scenario(rank, world_size)))
            except Exception:
                outcome[scenario.__name__] = ("error", traceback.format_exc())
                break
    finally:
        results.put((rank, outcome))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(*scenarios, world_size=WORLD_SIZE, wait_s=SPAWN_WAIT_S):
    """Run ``scenario(rank, world_size)`` for each scenario in ``world_size`` fresh processes.

    Returns ``{scenario name: {rank: ("ok", value) or ("error", traceback)}}``.  Raises if a
    rank reports nothing within ``wait_s`` seconds (its processes are then killed).
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, scenarios, results), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes = {}
    deadline = time.monotonic() + wait_s
    try:
        while len(outcomes) < world_size:
            try:
                rank, outcome = results.get(timeout=0.5)
                outcomes[rank] = outcome
                continue
            except queue.Empty:
                pass
            silent = [rank for rank in range(world_size) if rank not in outcomes]
            dead = [rank for rank in silent if processes[rank].exitcode is not None]
            if dead and results.empty():
                # A rank that reports always reports before exiting; give its message time to arrive.
                time.sleep(1.0)
                if results.empty():
                    codes = {rank: processes[rank].exitcode for rank in dead}
                    raise AssertionError(f"ranks exited without reporting (exit codes {codes})")
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks {silent} reported nothing within {wait_s} s")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    return {
        scenario.__name__: {
            rank: outcomes[rank].get(scenario.__name__, outcomes[rank].get(PROCESS_GROUP_KEY, ("error", "not reached")))
            for rank in outcomes
        }
        for scenario in scenarios
    }


def values_of(per_rank):
    """The per-rank values of a scenario, failing with the rank's traceback if it raised."""
    for rank, (status, value) in sorted(per_rank.items()):
        assert status == "ok", f"rank {rank} failed:\n{value}"
    return {rank: value for rank, (_, value) in per_rank.items()}


# ----------------------------------------------------------------------------- model and data


class TinyNet(torch.nn.Module):
    """Two linear layers with float32 parameters whose forward runs in float64."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.fc1 = torch.nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, OUT_FEATURES)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x):
        w1, b1, w2, b2 = (p.double() for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias))
        return F.linear(torch.tanh(F.linear(x.double(), w1, b1)), w2, b2)


def make_data(rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, IN_FEATURES, generator=generator)
    targets = torch.randn(rows, OUT_FEATURES, generator=generator)
    return inputs, targets


ZO_BATCH = (16, 11)  # (rows, data seed)
FO_BATCH = (8, 12)


def rank_rows(batch, rank: int, world_size: int):
    """This rank's equal slice of a batch (equal slices make the mean of means the global mean)."""
    rows = batch[0].shape[0] // world_size
    return tuple(t[rank * rows : (rank + 1) * rows] for t in batch)


def mse(model, batch):
    inputs, targets = batch
    return ((model(inputs) - targets.double()) ** 2).mean()


def train(optimizer, model, zo_batch=None, fo_batch=None, params_model=None):
    """``STEPS`` steps; ``model`` runs the forward passes (maybe a DDP or FSDP2 wrapper)."""
    zo_closure = (lambda: mse(model, zo_batch)) if zo_batch is not None else None
    fo_closure = (lambda: mse(model, fo_batch)) if fo_batch is not None else None
    for _ in range(STEPS):
        if isinstance(optimizer, MeZO):
            optimizer.step(zo_closure)
        else:
            optimizer.step(zo_closure, fo_closure)
    params = (params_model or model).parameters()
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in params]


def mezo(model, seed=SEED, **kwargs):
    return MeZO(model.parameters(), lr=LR, eps=EPS, seed=seed, **kwargs)


def addax(model, seed=SEED, **kwargs):
    return Addax(model.parameters(), lr=LR, eps=EPS, alpha=ALPHA, seed=seed, **kwargs)


def one_process_mezo(batch, **kwargs):
    model = TinyNet()
    return train(mezo(model, **kwargs), model, batch)


def one_process_addax(**kwargs):
    model = TinyNet()
    return train(addax(model, **kwargs), model, make_data(*ZO_BATCH), make_data(*FO_BATCH))


def assert_params_match(got, expected):
    assert len(got) == len(expected)
    for index, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(
            torch.from_numpy(np.asarray(g)), e, atol=PARAM_ATOL, rtol=0, msg=lambda m: f"param {index}: {m}"
        )


def max_difference(got, expected) -> float:
    return max(float((torch.from_numpy(np.asarray(g)) - e).abs().max()) for g, e in zip(got, expected))


# ----------------------------------------------------------------------------- rank scenarios


SHARD_CASES = [
    # (name, global shape, dtype, rounding, placement kind)
    ("uneven rows fp32", (7, 5), torch.float32, "nearest", "shard0"),
    ("vector bf16 stochastic", (9,), torch.bfloat16, "stochastic", "shard0"),
    ("row vector on dim 1", (1, 10), torch.float32, "nearest", "shard1"),
    ("replicated fp16 stochastic", (4, 3), torch.float16, "stochastic", "replicate"),
    ("HSDP-style 2-D mesh", (7, 5), torch.float32, "nearest", "replicate x shard0"),
]


def shard_backends():
    # The CPU backends; Triton on the CPU is its interpreter, covered by its own tests.
    return [name for name in ("reference", "native") if name in ak.available_backends("cpu")]


def shard_case_tensor(shape, dtype, tid):
    generator = torch.Generator().manual_seed(100 + tid)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def scenario_local_shard(rank, world_size):
    """Perturb the local shard of each DTensor case; return the gathered full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    # Replicas along the first mesh dimension, shards along the second, as HSDP lays them out.
    mesh_2d = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
    layouts = {
        "shard0": (mesh, [Shard(0)]),
        "shard1": (mesh, [Shard(1)]),
        "replicate": (mesh, [Replicate()]),
        "replicate x shard0": (mesh_2d, [Replicate(), Shard(0)]),
    }
    gathered, aliases = {}, []
    for backend in shard_backends():
        gathered[backend] = []
        for tid, (_, shape, dtype, rounding, kind) in enumerate(SHARD_CASES):
            sharded = distribute_tensor(shard_case_tensor(shape, dtype, tid), *layouts[kind])
            local, offset = akd.local_shard(sharded)
            aliases.append(local.data_ptr() == sharded.to_local().data_ptr())
            ak.perturb_(local, SEED, 1e-3, tids=[tid], offsets=[offset], rounding=rounding, backend=backend)
            gathered[backend].append(sharded.full_tensor())
    errors = []
    for shape, placement in (((4, 6), Shard(1)), ((4, 6), Shard(0))):
        try:
            akd.local_shard(distribute_tensor(torch.zeros(shape), mesh, [placement]))
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    return {"gathered": gathered, "aliases": aliases, "errors": errors}


def scenario_mezo_data_parallel(rank, world_size):
    batch = rank_rows(make_data(*ZO_BATCH), rank, world_size)
    results = {}
    for directions in (1, 2):
        model = TinyNet()
        reduce = akd.all_reduce_mean()
        optimizer = mezo(model, num_directions=directions, grad_reduce=reduce)
        akd.check_ranks_agree(optimizer)
        results[directions] = {"params": train(optimizer, model, batch), "calls": reduce.calls}
    return results


def scenario_check_ranks_agree_rejects_mismatch(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    def message_of(optimizer, **kwargs):
        try:
            akd.check_ranks_agree(optimizer, **kwargs)
        except ValueError as error:
            return str(error)
        return None

    model = TinyNet()
    messages = {
        "seed": message_of(mezo(model, seed=SEED + rank)),
        "directions": message_of(mezo(model, num_directions=1 + rank)),
        "agreeing": message_of(mezo(model)),
    }
    with torch.no_grad():
        model.fc2.bias[0] += rank  # replicas that were initialized differently
    messages["values"] = message_of(mezo(model))
    messages["values unchecked"] = message_of(mezo(model), compare_values=False)
    ddp_model = DistributedDataParallel(TinyNet())
    messages["ddp in backward"] = message_of(addax(ddp_model.module), model=ddp_model)
    messages["ddp after backward"] = message_of(addax(ddp_model.module, fo_in_backward=False), model=ddp_model)
    return messages


def scenario_mezo_fsdp2(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = TinyNet()
    # The root's default keeps unsharded parameters after forward, and the next forward would
    # not see perturbations of the shards: a ZO step needs every forward to re-gather.
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), reshard_after_forward=True)
    local_numel = sum(akd.local_shard(p)[0].numel() for p in model.parameters())
    optimizer = mezo(model, grad_reduce=akd.all_reduce_mean())
    akd.check_ranks_agree(optimizer)
    params = train(optimizer, model, rank_rows(make_data(*ZO_BATCH), rank, world_size))
    return {"params": params, "local_numel": local_numel}


def scenario_addax_fsdp2(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = TinyNet()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), reshard_after_forward=True)
    optimizer = addax(model, grad_reduce=akd.all_reduce_mean())
    zo_batch = rank_rows(make_data(*ZO_BATCH), rank, world_size)
    fo_batch = rank_rows(make_data(*FO_BATCH), rank, world_size)
    return train(optimizer, model, zo_batch, fo_batch)


def scenario_addax_ddp(rank, world_size):
    """Addax with DDP's gradient all-reduce: updated after backward, or per bucket by the hook."""
    from torch.nn.parallel import DistributedDataParallel

    zo_batch = rank_rows(make_data(*ZO_BATCH), rank, world_size)
    fo_batch = rank_rows(make_data(*FO_BATCH), rank, world_size)
    results = {}
    for variant in ("after backward", "comm hook"):
        model = TinyNet()
        # Small buckets so that the hook sees more than one.
        ddp_model = DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=1e-4)
        optimizer = addax(model, grad_reduce=akd.all_reduce_mean(), fo_in_backward=False)
        if variant == "comm hook":
            ddp_model.register_comm_hook(None, akd.addax_comm_hook(optimizer))
        results[variant] = train(optimizer, ddp_model, zo_batch, fo_batch, params_model=model)
    try:  # the hook has no step to apply outside Addax.step: a clear error, not a silent no-op
        mse(ddp_model, fo_batch).backward()
        results["backward outside step"] = None
    except RuntimeError as error:
        results["backward outside step"] = str(error)
    return results


def scenario_addax_ddp_rank_without_zo_batch(rank, world_size):
    """A per-rank length split can leave a rank without a long example: that rank still takes
    part in the estimate's reduction (with a zero estimate), or the collectives would pair up
    wrongly and the job would fail."""
    from torch.nn.parallel import DistributedDataParallel

    zo_batch = rank_rows(make_data(*ZO_BATCH), rank, world_size) if rank == 0 else None
    fo_batch = rank_rows(make_data(*FO_BATCH), rank, world_size)
    model = TinyNet()
    ddp_model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    optimizer = addax(model, grad_reduce=akd.all_reduce_mean(), fo_in_backward=False)
    return train(optimizer, ddp_model, zo_batch, fo_batch, params_model=model)


def simulated_failure():
    raise RuntimeError("simulated failure in the closure of rank 1")


def timed_step_outcome(optimizer, closure):
    """The DistributedStepError message of one step (None if it succeeds) and how long it took."""
    started = time.monotonic()
    try:
        optimizer.step(closure)
    except akd.DistributedStepError as error:
        return {"message": str(error), "seconds": time.monotonic() - started}
    return {"message": None, "seconds": time.monotonic() - started}


def scenario_rank_one_crashes(rank, world_size):
    """Rank 1 raises inside its second step's closure; rank 0 must get a clear error."""
    model = TinyNet()
    batch = rank_rows(make_data(*ZO_BATCH), rank, world_size)
    optimizer = mezo(model, grad_reduce=akd.all_reduce_mean())
    optimizer.step(lambda: mse(model, batch))
    if rank == 1:
        optimizer.step(simulated_failure)
    return timed_step_outcome(optimizer, lambda: mse(model, batch))


HANG_TIMEOUT_S = 1.0
HANG_SLEEP_S = 4.0


def scenario_rank_one_stalls(rank, world_size):
    """Rank 1 stalls longer than the all-reduce timeout; rank 0 must fail after the timeout."""
    model = TinyNet()
    batch = rank_rows(make_data(*ZO_BATCH), rank, world_size)
    optimizer = mezo(model, grad_reduce=akd.all_reduce_mean(timeout=HANG_TIMEOUT_S))
    optimizer.step(lambda: mse(model, batch))
    if rank == 1:
        time.sleep(HANG_SLEEP_S)
        return {"message": "stalled"}
    return timed_step_outcome(optimizer, lambda: mse(model, batch))


HEALTHY_SCENARIOS = (
    scenario_local_shard,
    scenario_mezo_data_parallel,
    scenario_check_ranks_agree_rejects_mismatch,
    scenario_mezo_fsdp2,
    scenario_addax_fsdp2,
    scenario_addax_ddp,
    scenario_addax_ddp_rank_without_zo_batch,
)


@pytest.fixture(scope="module")
def healthy_run():
    return run_ranks(*HEALTHY_SCENARIOS)


# ----------------------------------------------------------------------------- tests


def test_plain_tensor_is_its_own_shard():
    tensor = torch.randn(3, 4)
    local, offset = akd.local_shard(tensor)
    assert local is tensor and offset == 0


def test_local_shard_rejects_non_tensors():
    with pytest.raises(TypeError, match="Tensor"):
        akd.local_shard([1.0, 2.0])


def test_all_reduce_mean_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        akd.all_reduce_mean()


def test_flat_offset_of_supported_and_unsupported_blocks():
    # Rows 4..6 of a (7, 5) tensor start at flat element 20; a column block of a matrix is
    # not one flat range, a column block of a row vector is.
    assert sharding._flat_offset((7, 5), (3, 5), (4, 0), ()) == 20
    assert sharding._flat_offset((1, 10), (1, 5), (0, 5), ()) == 5
    assert sharding._flat_offset((2, 3, 4), (2, 3, 4), (0, 0, 0), ()) == 0
    with pytest.raises(ValueError, match="Shard\\(0\\)"):
        sharding._flat_offset((4, 6), (4, 3), (0, 3), ())
    with pytest.raises(ValueError, match="not one contiguous range"):
        sharding._flat_offset((4, 6), (2, 3), (2, 3), ())


def test_sharded_perturbation_equals_unsharded(healthy_run):
    results = values_of(healthy_run["scenario_local_shard"])
    for rank, value in results.items():
        assert all(value["aliases"]), f"rank {rank}: a local shard does not alias its DTensor"
        assert sorted(value["gathered"]) == sorted(shard_backends())
        for backend, gathered in value["gathered"].items():
            for tid, (name, shape, dtype, rounding, _) in enumerate(SHARD_CASES):
                expected = shard_case_tensor(shape, dtype, tid)
                ak.perturb_(expected, SEED, 1e-3, tids=[tid], rounding=rounding, backend=backend)
                # Same backend, same (seed, tid, global element) for every element: bit-identical.
                assert torch.equal(torch.from_numpy(gathered[tid]), expected.float()), (
                    f"rank {rank}, {backend} backend, case {name!r}"
                )


def test_column_shards_of_a_matrix_are_rejected_with_the_supported_layouts(healthy_run):
    for rank, value in values_of(healthy_run["scenario_local_shard"]).items():
        column_error, row_error = value["errors"]
        assert column_error is not None, f"rank {rank} accepted Shard(1) of a matrix"
        assert "not one contiguous range" in column_error and "Shard(0)" in column_error
        assert row_error is None


def test_data_parallel_mezo_equals_one_process(healthy_run):
    full_batch = make_data(*ZO_BATCH)
    for rank, value in values_of(healthy_run["scenario_mezo_data_parallel"]).items():
        for directions, result in value.items():
            assert result["calls"] == STEPS, f"rank {rank}: one all-reduce per step expected"
            expected = one_process_mezo(full_batch, num_directions=directions)
            assert_params_match(result["params"], expected)
    # The all-reduce matters: one rank's half of the batch alone trains a visibly different model.
    half_batch = one_process_mezo(rank_rows(full_batch, 0, WORLD_SIZE))
    assert max_difference(value[1]["params"], half_batch) > 100 * PARAM_ATOL


def test_check_ranks_agree_names_the_mismatch(healthy_run):
    for rank, messages in values_of(healthy_run["scenario_check_ranks_agree_rejects_mismatch"]).items():
        assert messages["agreeing"] is None and messages["values unchecked"] is None
        assert messages["ddp after backward"] is None
        assert "base_seed" in messages["seed"] and "next step seeds" in messages["seed"]
        assert "num_directions=2 vs 1" in messages["directions"]
        # fc2.bias is the last of the four parameters (tid 3).
        assert "parameter values" in messages["values"] and "[3]" in messages["values"]
        assert "fo_in_backward=False" in messages["ddp in backward"], f"rank {rank}"


def test_fsdp2_sharded_mezo_equals_one_process(healthy_run):
    expected = one_process_mezo(make_data(*ZO_BATCH))
    results = values_of(healthy_run["scenario_mezo_fsdp2"])
    total = sum(p.numel() for p in expected)
    # Each rank holds only its shard (uneven: ceil-division rows on rank 0).
    assert sum(value["local_numel"] for value in results.values()) == total
    assert all(value["local_numel"] < total for value in results.values())
    for value in results.values():
        assert_params_match(value["params"], expected)


def test_fsdp2_sharded_addax_equals_one_process(healthy_run):
    expected = one_process_addax()
    for value in values_of(healthy_run["scenario_addax_fsdp2"]).values():
        assert_params_match(value, expected)


def test_ddp_addax_equals_one_process(healthy_run):
    expected = one_process_addax()
    for value in values_of(healthy_run["scenario_addax_ddp"]).values():
        assert "Addax.step" in value.pop("backward outside step")
        for variant, params in value.items():
            assert_params_match(params, expected)


def test_ddp_addax_rank_without_zo_batch_joins_the_reduction(healthy_run):
    """Equal to one process whose estimate is rank 0's, averaged with rank 1's zero; the
    replicas stay bit-identical (rank 1 makes the same perturbation passes)."""
    values = values_of(healthy_run["scenario_addax_ddp_rank_without_zo_batch"])
    model = TinyNet()
    optimizer = addax(model, grad_reduce=lambda g: g / WORLD_SIZE)
    expected = train(optimizer, model, rank_rows(make_data(*ZO_BATCH), 0, WORLD_SIZE), make_data(*FO_BATCH))
    for value in values.values():
        assert_params_match(value, expected)
    assert all(np.array_equal(a, b) for a, b in zip(values[0], values[1]))


def test_crashed_rank_surfaces_a_clear_error_on_the_others():
    outcome = run_ranks(scenario_rank_one_crashes)["scenario_rank_one_crashes"]
    status, value = outcome[1]
    assert status == "error" and "simulated failure" in value
    status, value = outcome[0]
    assert status == "ok", value
    assert value["message"] is not None, "rank 0 finished a step its peer never joined"
    assert "rank 0 of 2" in value["message"] and "projected gradient" in value["message"]
    assert value["seconds"] < PROCESS_GROUP_TIMEOUT_S


def test_stalled_rank_fails_the_others_after_the_timeout():
    outcome = run_ranks(scenario_rank_one_stalls)["scenario_rank_one_stalls"]
    value = values_of(outcome)[0]
    assert value["message"] is not None, "rank 0 finished a step its peer never joined"
    assert "rank 0 of 2" in value["message"]
    # Fails no earlier than the timeout and well before the stalled rank wakes up.
    assert HANG_TIMEOUT_S * 0.9 <= value["seconds"] < HANG_SLEEP_S


def test_comm_hook_refuses_an_optimizer_that_updates_from_local_gradients():
    model = TinyNet()
    with pytest.raises(ValueError, match="fo_in_backward=False"):
        akd.addax_comm_hook(addax(model))
    with pytest.raises(TypeError, match="Addax"):
        akd.addax_comm_hook(mezo(model))


def test_timeouts_are_seconds_or_timedeltas():
    assert akd._as_timedelta(1.5) == datetime.timedelta(seconds=1.5)
    assert akd._as_timedelta(None) is None
    with pytest.raises(ValueError, match="positive"):
        akd._as_timedelta(0)
    with pytest.raises(TypeError, match="timedelta"):
        akd._as_timedelta("10s")
