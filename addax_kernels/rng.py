"""The one definition of the noise z (SPEC §1) and of the storage rounding (SPEC §2).

Everything here is plain PyTorch on int64/float tensors, written for clarity and
bit-exactness rather than speed.  Every backend is tested against these functions:

* :func:`philox4x32` — Random123 Philox4x32-10 on uint32 words.
* :func:`uniforms` — ``u = (2 * (w >> 9) + 1) * 2**-24``, exact in float32, inside (0, 1).
* :func:`noise_range` — z for the flat element range ``[start, start + count)`` of tensor
  stream ``tid``; :func:`noise` wraps it for a shaped tensor.
* :func:`rounding_words` — the purpose-1 word of each element, for stochastic rounding.
* :func:`keep_mask_range` — the sparsity mask of SPEC §1 (purpose-2 words), and
  :func:`sparsity_threshold`, the exact integer form of its comparison ``u ≥ p``.
* :func:`round_to_dtype` — float32 → fp32/fp16/bf16, nearest or stochastic.
* :func:`state_rounding_seed` — the key whose purpose-1 words round optimizer state buffers.

A seed is a Python int in ``[0, 2**64)`` or a 0-dim int64/uint64 tensor holding those bits
(SPEC §1); :func:`check_seed` accepts both, and every function here that takes a seed works on
either without reading a device tensor on the host.

Unsigned 32-bit words are carried in int64 tensors (values in ``[0, 2**32)``) because
PyTorch's unsigned integer types lack most arithmetic.  Products of two 32-bit words are
formed from 16-bit halves so that no intermediate leaves the int64 range.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ._numbers import is_integer, is_real_number

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "NOISE_KINDS",
    "PURPOSE_NOISE",
    "PURPOSE_ROUNDING",
    "PURPOSE_MASK",
    "STATE_ROUNDING_KEYS",
    "philox4x32",
    "uniforms",
    "noise_range",
    "noise",
    "rounding_words",
    "keep_mask_range",
    "sparsity_threshold",
    "state_rounding_seed",
    "round_to_dtype",
    "check_seed",
    "check_tid",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

NOISE_KINDS = ("gaussian", "rademacher")
PURPOSE_NOISE = 0
PURPOSE_ROUNDING = 1
PURPOSE_MASK = 2

# Stochastic rounding of optimizer state buffer s (0: momentum / Adam's exp_avg, 1: Adam's
# exp_avg_sq) draws purpose-1 words under the key ``rounding_seed ^ STATE_ROUNDING_KEYS[s]``,
# so the parameter and each state buffer of one element round independently.  (SPEC §2 fixes
# the parameter's words only; the constants are SplitMix64's, odd and dense in bits, so a
# small or sequential rounding seed lands far from every other seed in use.)
STATE_ROUNDING_KEYS = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)

# A sparsity threshold is ceil(p * 2**24): element kept iff 2 * (w >> 9) + 1 >= threshold.
SPARSITY_SCALE = 1 << 24

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_TWO_PI = 2.0 * math.pi

# Elements per Philox call for each noise kind: four Gaussians, or 128 Rademacher signs.
_ELEMENTS_PER_BLOCK = {"gaussian": 4, "rademacher": 128}
_SEED_TENSOR_DTYPES = (torch.int64, torch.uint64) if hasattr(torch, "uint64") else (torch.int64,)


def check_seed(seed, name: str = "seed", device: Optional[torch.device] = None) -> Union[int, torch.Tensor]:
    """``seed`` as a Python int in [0, 2**64), or as a 0-dim int64 tensor (SPEC §1).

    A 0-dim int64 or uint64 tensor is returned as a detached int64 view of the same 64 bits
    (never read on the host); with ``device`` given it must live there.  Anything else raises
    a TypeError/ValueError naming ``name``.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0:
            raise ValueError(f"{name} must be an int or a 0-dim int64/uint64 tensor, got shape {tuple(seed.shape)}")
        if seed.dtype not in _SEED_TENSOR_DTYPES:
            raise TypeError(f"{name} must be an int or a 0-dim int64/uint64 tensor, got a {seed.dtype} tensor")
        if device is not None and seed.device != torch.device(device):
            raise ValueError(f"{name} is on {seed.device} but must be on {torch.device(device)} (the params' device)")
        seed = seed.detach()
        return seed if seed.dtype == torch.int64 else seed.view(torch.int64)
    if not is_integer(seed):
        raise TypeError(f"{name} must be an int in [0, 2**64) or a 0-dim int64/uint64 tensor, "
                        f"got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def seed_as_int64(seed: int) -> int:
    """The int64 with the bits of u64 ``seed`` (two's complement), as a seed tensor holds it."""
    return seed - 2**64 if seed >= 2**63 else seed


def seed_from_int64(value: int) -> int:
    """The u64 seed whose bits the int64 ``value`` holds."""
    return value + 2**64 if value < 0 else value


def _key_words(seed: Union[int, torch.Tensor]):
    """(key lo, key hi) of SPEC §1 as ints, or as int64 tensors for a seed tensor."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        return seed & _MASK32, (seed >> 32) & _MASK32
    return seed & _MASK32, seed >> 32


def state_rounding_seed(rounding_seed: Union[int, torch.Tensor], state_index: int) -> Union[int, torch.Tensor]:
    """The key of the purpose-1 words that round state buffer ``state_index`` (0 or 1)."""
    mask = STATE_ROUNDING_KEYS[state_index]
    if isinstance(rounding_seed, torch.Tensor):
        return rounding_seed ^ seed_as_int64(mask)
    return rounding_seed ^ mask


def sparsity_threshold(sparsity, name: str = "sparsity") -> int:
    """The exact integer form of SPEC §1's ``u ≥ p``: ``ceil(p * 2**24)``, 0 for a dense z.

    With u = odd * 2**-24 (odd = 2 * (w >> 9) + 1), u ≥ p  ⇔  odd ≥ ceil(p * 2**24); the
    product by a power of two is exact for a float p, so every backend compares integers.
    """
    if not is_real_number(sparsity):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    value = float(sparsity)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return math.ceil(value * SPARSITY_SCALE)


def check_tid(tid, name: str = "tid") -> int:
    """Return ``tid`` as a Python int in [0, 2**32) or raise a clear error."""
    if not is_integer(tid):
        raise TypeError(f"{name} must be an int in [0, 2**32), got {type(tid).__name__} {tid!r}")
    tid = int(tid)
    if not 0 <= tid < 2**32:
        raise ValueError(f"{name} must be in [0, 2**32), got {tid}")
    return tid


def _mulhilo32(a: torch.Tensor, multiplier: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``a * multiplier`` for uint32 ``a`` held in int64."""
    product_low_half = a * (multiplier & _MASK16)  # < 2**48
    product_high_half = a * (multiplier >> 16)  # < 2**48; weight 2**16
    low_sum = ((product_high_half & _MASK16) << 16) + product_low_half  # < 2**49
    low = low_sum & _MASK32
    high = ((product_high_half >> 16) + (low_sum >> 32)) & _MASK32
    return high, low


def _philox_words(c0, c1, c2, c3, k0, k1):
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32(counter, key):
    """Random123 Philox4x32-10.

    ``counter`` has shape ``(..., 4)`` and ``key`` shape ``(..., 2)`` (broadcast against each
    other), both holding uint32 values, as numpy arrays (any integer dtype) or torch tensors.
    Returns the four output words with shape ``(..., 4)``: a ``numpy.uint32`` array for numpy
    input, an int64 tensor (values in [0, 2**32)) for torch input.
    """
    as_numpy = isinstance(counter, np.ndarray) or isinstance(key, np.ndarray)
    counter_t = _as_word_tensor(counter, "counter")
    key_t = _as_word_tensor(key, "key")
    if counter_t.shape[-1:] != (4,) or key_t.shape[-1:] != (2,):
        raise ValueError(
            f"philox4x32 takes counter (..., 4) and key (..., 2), got {tuple(counter_t.shape)} "
            f"and {tuple(key_t.shape)}"
        )
    if key_t.device != counter_t.device:
        key_t = key_t.to(counter_t.device)
    shape = torch.broadcast_shapes(counter_t.shape[:-1], key_t.shape[:-1])
    counter_t = counter_t.expand(*shape, 4)
    key_t = key_t.expand(*shape, 2)
    words = _philox_words(*counter_t.unbind(-1), *key_t.unbind(-1))
    out = torch.stack(words, dim=-1)
    if as_numpy:
        return out.cpu().numpy().astype(np.uint32)
    return out


def _as_word_tensor(words, name: str, function: str = "philox4x32") -> torch.Tensor:
    if isinstance(words, torch.Tensor):
        if words.dtype.is_floating_point or words.dtype.is_complex or words.dtype == torch.bool:
            raise TypeError(f"{function}: {name} must hold integers, got {words.dtype}")
        tensor = words.to(torch.int64)
    else:
        array = np.asarray(words)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{function}: {name} must hold integers, got {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.int64))
    if bool(((tensor < 0) | (tensor > _MASK32)).any()):
        raise ValueError(f"{function}: {name} values must be in [0, 2**32)")
    return tensor


def uniforms(words, dtype: torch.dtype = torch.float32):
    """SPEC §1's uniforms of Philox words: ``u = (2 * (w >> 9) + 1) * 2**-24``, exact in
    float32, strictly inside (0, 1).

    ``words``: values in [0, 2**32) as a torch tensor or numpy array of any integer dtype (what
    :func:`philox4x32` returns).  Returns a tensor of ``dtype`` of the same shape, on the words'
    device, or, for numpy input, a numpy array (``dtype`` float32 or float64).
    """
    result = _uniforms(_as_word_tensor(words, "words", "uniforms"), dtype)
    return result.numpy() if isinstance(words, np.ndarray) else result


def _uniforms(words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`uniforms` of an int64 tensor of words, unchecked (the reference backend's path)."""
    return ((words >> 9) * 2 + 1).to(dtype) * (2.0**-24)


def _block_words(seed, tid: int, first_block: int, num_blocks: int, purpose: int, device):
    """Words of Philox blocks ``first_block …`` of stream ``tid``; ``seed`` an int or int64 tensor."""
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed = seed.to(device)
    blocks = torch.arange(first_block, first_block + num_blocks, dtype=torch.int64, device=device)
    c0 = blocks & _MASK32
    c1 = blocks >> 32
    c2 = torch.full_like(blocks, tid)
    c3 = torch.full_like(blocks, purpose)
    k0, k1 = _key_words(seed)
    return _philox_words(c0, c1, c2, c3, k0, k1)


def _element_words(seed, tid: int, start: int, count: int, purpose: int, device) -> torch.Tensor:
    """Word ``e & 3`` of block ``e >> 2`` for each element e in ``[start, start + count)`` (int64)."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first_block = start // 4
    last_block = (start + count - 1) // 4
    words = _block_words(seed, tid, first_block, last_block - first_block + 1, purpose, device)
    flat = torch.stack(words, dim=-1).reshape(-1)
    skip = start - first_block * 4
    return flat[skip : skip + count]


def keep_mask_range(seed, tid: int, start: int, count: int, threshold: int, device=None) -> torch.Tensor:
    """SPEC §1 sparsity: True where element e of ``[start, start + count)`` is perturbed.

    Element e is kept iff ``2 * (w >> 9) + 1 >= threshold`` for the purpose-2 word of its lane
    (``threshold`` from :func:`sparsity_threshold`; 0 keeps everything).
    """
    words = _element_words(seed, tid, start, count, PURPOSE_MASK, device)
    return (words >> 9) * 2 + 1 >= threshold


def _gaussian_from_words(words, dtype: torch.dtype) -> torch.Tensor:
    u0, u1, u2, u3 = (_uniforms(w, dtype) for w in words)
    r0 = torch.sqrt(-2.0 * torch.log(u0))
    r1 = torch.sqrt(-2.0 * torch.log(u2))
    theta0 = _TWO_PI * u1
    theta1 = _TWO_PI * u3
    z = torch.stack(
        (r0 * torch.cos(theta0), r0 * torch.sin(theta0), r1 * torch.cos(theta1), r1 * torch.sin(theta1)),
        dim=-1,
    )
    return z.reshape(-1)


def _rademacher_from_words(words, dtype: torch.dtype) -> torch.Tensor:
    bit_index = torch.arange(32, dtype=torch.int64, device=words[0].device)
    # Element e of the block is bit (e & 31) of word (e >> 5) & 3.
    bits = torch.stack([(w.unsqueeze(-1) >> bit_index) & 1 for w in words], dim=1)
    return (1 - 2 * bits).reshape(-1).to(dtype)


def noise_range(
    seed: int,
    tid: int,
    start: int,
    count: int,
    *,
    noise: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device=None,
    purpose: int = PURPOSE_NOISE,
    sparsity_threshold: int = 0,
) -> torch.Tensor:
    """z for flat elements ``[start, start + count)`` of stream ``tid`` as a 1-D tensor.

    ``dtype=torch.float64`` evaluates the Gaussian formula in float64 (the judge of SPEC §1);
    any other dtype evaluates it in float32, the precision every kernel uses, then casts.
    ``seed`` is an int or a 0-dim int64 tensor.  With ``sparsity_threshold`` > 0 (see
    :func:`sparsity_threshold`) the elements the mask drops are exactly 0.
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if start < 0 or count < 0 or start + count > 2**63:
        raise ValueError(f"element range [{start}, {start + count}) is outside [0, 2**63)")
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    per_block = _ELEMENTS_PER_BLOCK[noise]
    first_block = start // per_block
    last_block = (start + count - 1) // per_block
    words = _block_words(seed, tid, first_block, last_block - first_block + 1, purpose, device)
    if noise == "gaussian":
        z = _gaussian_from_words(words, compute_dtype)
    else:
        z = _rademacher_from_words(words, compute_dtype)
    skip = start - first_block * per_block
    z = z[skip : skip + count]
    if sparsity_threshold:
        keep = keep_mask_range(seed, tid, start, count, sparsity_threshold, device=z.device)
        z = torch.where(keep, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return z.to(dtype)


def noise(
    shape,
    seed,
    tid: int = 0,
    offset: int = 0,
    *,
    noise: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device=None,
    purpose: int = PURPOSE_NOISE,
    sparsity: float = 0.0,
) -> torch.Tensor:
    """z materialized for a tensor of ``shape`` whose first element has global index ``offset``.

    ``seed`` is an int in [0, 2**64) or a 0-dim int64/uint64 tensor; ``sparsity`` p zeroes the
    elements SPEC §1's purpose-2 mask drops.  For tests and references only: the fused ops never
    build this tensor.
    """
    seed = check_seed(seed)
    shape, tid, offset = check_noise_layout(shape, tid, offset, dtype)
    if purpose not in (PURPOSE_NOISE, PURPOSE_ROUNDING):
        raise ValueError(f"purpose must be 0 (noise) or 1 (rounding bits), got {purpose!r}")
    threshold = sparsity_threshold(sparsity)
    z = noise_range(
        seed, tid, offset, shape.numel(), noise=noise, dtype=dtype, device=device, purpose=purpose,
        sparsity_threshold=threshold,
    )
    return z.reshape(shape)


def check_noise_layout(shape, tid, offset, dtype) -> Tuple[torch.Size, int, int]:
    """``(shape, tid, offset)`` of a materialized z, checked: ``shape`` an int or a sequence of
    ints >= 0, ``tid`` in [0, 2**32), ``offset`` an int >= 0 with offset + numel <= 2**63, and
    ``dtype`` a floating torch dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"noise dtype must be a floating torch.dtype, got {dtype!r}")
    dims = (shape,) if is_integer(shape) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if not all(is_integer(dim) and dim >= 0 for dim in dims):
        raise ValueError(f"shape must be an int or a sequence of ints >= 0, got {shape!r}")
    shape = torch.Size(int(dim) for dim in dims)
    tid = check_tid(tid)
    if not is_integer(offset) or offset < 0 or offset + shape.numel() > 2**63:
        raise ValueError(f"offset must be an int >= 0 with offset + numel <= 2**63, got {offset!r} for "
                         f"{shape.numel()} elements")
    return shape, tid, int(offset)


def rounding_words(seed, tid: int, start: int, count: int, device=None) -> torch.Tensor:
    """The purpose-1 Philox word of each element in ``[start, start + count)`` (int64)."""
    return _element_words(seed, tid, start, count, PURPOSE_ROUNDING, device)


_BF16_MAX_FINITE_BITS = 0x7F7F
_FP16_MAX = 65504.0


def _int64_to_int16_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)


def _stochastic_bf16(x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = (bits + (words >> 16)) >> 16
    sign = rounded & 0x8000
    overflowed = (rounded & 0x7FFF) == 0x7F80
    rounded = torch.where(overflowed, sign | _BF16_MAX_FINITE_BITS, rounded)
    stochastic = _int64_to_int16_bits(rounded).view(torch.bfloat16)
    return torch.where(finite, stochastic, x.to(torch.bfloat16))


def _stochastic_fp16(x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    magnitude = x.abs().clamp(max=_FP16_MAX)
    nearest = magnitude.to(torch.float16)
    nearest_bits = nearest.view(torch.int16).to(torch.int64)
    # Round toward zero: step back one fp16 code where round-to-nearest went up.
    went_up = nearest.to(torch.float32) > magnitude
    low_bits = torch.where(went_up, nearest_bits - 1, nearest_bits)
    low = _int64_to_int16_bits(low_bits).view(torch.float16).to(torch.float32)
    high = _int64_to_int16_bits(low_bits + 1).view(torch.float16).to(torch.float32)
    fraction = (magnitude - low) / (high - low)
    threshold = (words >> 8).to(torch.float32) * (2.0**-24)
    rounded = torch.where(threshold < fraction, high, low)
    stochastic = torch.copysign(rounded, x).to(torch.float16)
    return torch.where(torch.isfinite(x), stochastic, x.to(torch.float16))


def round_to_dtype(
    x: torch.Tensor, dtype: torch.dtype, rounding: str = "nearest", words: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` once (SPEC §2).

    ``nearest`` is IEEE round-half-to-even with overflow to ±inf.  ``stochastic`` uses the
    purpose-1 ``words`` of the same elements; finite results saturate at the largest finite
    value of the storage type.  float32 storage is returned unchanged.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_dtype takes float32 input, got {x.dtype}")
    if dtype == torch.float32:
        return x
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"storage dtype must be float32, float16 or bfloat16, got {dtype}")
    if rounding == "nearest":
        return x.to(dtype)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if words is None or words.shape != x.shape:
        raise ValueError("stochastic rounding needs one purpose-1 word per element")
    if dtype == torch.bfloat16:
        return _stochastic_bf16(x, words)
    return _stochastic_fp16(x, words)
