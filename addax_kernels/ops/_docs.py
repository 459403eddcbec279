"""The argument documentation the public ops share (each op's docstring is assembled from it)."""

from __future__ import annotations

PARAMS = """\
    params: a Tensor or a sequence of Tensors updated in place: float32, float16 or bfloat16,
        contiguous, any shape, all on one device (cpu or cuda), not overlapping in memory.
        Empty tensors are allowed and left alone."""

SEED = """\
    seed: the key of z (SPEC §1): an int in [0, 2**64), or a 0-dim int64/uint64 tensor on the
        params' device holding those 64 bits (int64: two's complement), read by the kernel
        without a host sync (a replayed CUDA graph reads the value the tensor holds then)."""

SEEDS = """\
    seeds: the keys of the K >= 1 directions z_k: one seed (an int in [0, 2**64) or a 0-dim
        int64/uint64 tensor on the params' device), a sequence of them, or a 1-D int64 tensor
        of K seeds."""

COEFFS = """\
    coeffs: one coefficient per seed (a number, a 0-dim tensor, a sequence of them or a 1-D
        tensor): typically the projected gradient of direction k divided by K."""

STEP_SCALAR = """\
        A step scalar is a Python float (finite, within float32; int and numpy numbers
        accepted), or a 0-dim tensor: a CPU tensor is read and checked like a float, a tensor
        on the params' device is read by the kernel (no host sync, CUDA-graph friendly) and
        therefore not checked for NaN."""

LR = """\
    lr: the learning rate, a step scalar."""

RESTORE = """\
    restore: None (default), or a step scalar r: θ' = θ + r·z(seeds[0]) is applied first in the
        same pass (the last +ε·z of a MeZO step), weight decay acting on θ'."""

WEIGHT_DECAY = """\
    weight_decay: L2 weight decay wd, a float or one float per tensor (finite, within float32),
        default 0.
    decay_mask: None (default: every tensor decays) or one bool per tensor; False turns the
        tensor's weight decay off (MeZO skips biases and LayerNorm weights)."""

COMMON = """\
    tids: per-tensor noise stream ids (SPEC §1; "tid" names the tensor's stream of z, not a
        thread), one int in [0, 2**32) per tensor; default their positions in ``params``.  A
        tensor must keep its id across calls to see the same z.
    offsets: per-tensor global flat index of element 0, one int >= 0 per tensor (a shard passes
        its global offset and gets exactly the z of the unsharded tensor); default 0.
        offset + numel must not exceed 2**63 (element indices are int64).
    noise: "gaussian" (default) or "rademacher": the distribution of z.
    rounding: "nearest" (default, round-half-to-even) or "stochastic": how float32 results are
        stored in float16/bfloat16 tensors, once per op (float32 tensors are stored exactly).
    rounding_seed: key of the stochastic-rounding words (same types as a seed); default the
        (first) seed.  Give each pass of a training step its own (SPEC §2).
    sparsity: p in [0, 1): an element is perturbed / updated along z only where its purpose-2
        uniform is >= p (SPEC §1); elsewhere z = 0 (no rescaling).  Default 0 (dense).
    backend: "auto" (default: the ``ADDAX_KERNELS_BACKEND`` environment variable if set, else
        the fastest available for the device), "reference", "triton" or "native"."""

RAISES = """\
Raises:
    TypeError / ValueError: an argument of the wrong type or value, naming it (and the
        offending tensor's index, shape, dtype and device): a dtype outside float32/float16/
        bfloat16, a non-contiguous, meta, sparse or wrongly shaped tensor, tensors on several
        devices, tensors overlapping in memory (or a read tensor overlapping a written one), a
        seed outside [0, 2**64), a NaN/inf/float32-overflowing scalar, a wrong count of tids,
        offsets, weight decays or coefficients, an offset + numel past 2**63, an unknown
        choice.
    RuntimeError: a written tensor is an inference tensor and the call is not inside
        ``torch.inference_mode()``; the named backend cannot run on this device (the message
        says why).
    Every check runs before anything is modified: a call that raises changed nothing.  After
    the pass the autograd version counter of every written tensor is bumped (as torch's own
    in-place ops do), so a backward through a graph that saved one of them raises.  Under
    ``torch.compile`` the call is recorded as the custom op ``addax_kernels::fused_update_``,
    whose checks run, with the same errors, when the compiled graph runs; Python numbers that
    change between calls (an lr schedule, the seeds) are graph inputs, not constants."""


def compose(summary: str, *arguments: str, notes: str = "") -> str:
    """A public op's docstring: summary, the arguments, the common keywords, the errors."""
    parts = [summary.strip("\n"), "", "Args:"]
    parts += [argument for argument in arguments]
    parts += [COMMON, ""]
    if notes:
        parts += [notes.strip("\n"), ""]
    parts.append(RAISES)
    return "\n".join(parts) + "\n"
