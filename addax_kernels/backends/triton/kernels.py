"""The fused multi-tensor kernel of the Triton backend (docs/triton.md explains the design).

One launch covers one class of tensors of a group (``launch.py`` splits a group by memory
alignment).  The tensors are rows of an int64 table.  Work is cut into tiles of ``BLOCK``
elements aligned in the *global* element index (``e = offset + local index``), so a tile
never splits a Philox block of either noise kind whatever a shard's offset:

* full tiles (every element inside its tensor) are dealt out in contiguous runs to
  ``num_full_programs`` persistent programs; a program finds the row of its first tile by
  binary search once, then walks forward, so the search is paid once per program, not per
  tile, and the steady state is an unmasked loop over the tiles of one tensor;
* edge tiles (a tensor's partial first or last tile) get one program each, masked; they
  come first in the grid so that they finish while the persistent programs still run.

Importing this module decides between compiled kernels and the interpreter: Triton reads
``TRITON_INTERPRET`` when a function is decorated.  ``INTERPRETED`` records that choice.
The constexpr ``FAST`` (compiled for an NVIDIA GPU) selects MUFU transcendentals through PTX
and the hardware bfloat16 conversion; otherwise (interpreter, ROCm) the same formulas use
exact float32 ``log2/sin/cos`` and integer rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import (
    SCALAR_ADAM_BC2_SQRT,
    SCALAR_ADAM_BETA2,
    SCALAR_ADAM_EPS,
    SCALAR_ADAM_W2,
    SCALAR_FIRST_COEFF,
    SCALAR_GRAD_COEFF,
    SCALAR_LR,
    SCALAR_MOMENTUM,
    SCALAR_SHIFT,
    STATE_ADAM,
    STATE_MOMENTUM,
    STATE_NONE,
)
from ... import rng
from . import _interpreter_requested

INTERPRETED = _interpreter_requested()

# Table row layout (int64 columns).  Element e (global index) of a tensor lives at
# ``base + delta + e`` of the class's typed base pointer for that kind of buffer (for the
# BYTES access mode: byte ``base + delta + e * element_size``).
COL_PARAM_DELTA = 0
COL_STATE0_DELTA = 1
COL_STATE1_DELTA = 2
COL_TID = 3
COL_DECAY_BITS = 4  # float32 bit pattern of the tensor's weight decay
COL_TILE = 5  # full rows: global tile index of the first full tile minus COL_FIRST; edges: the tile's index
COL_FIRST = 6  # full rows: ordinal of the row's first full tile among the launch's full tiles
COL_LOW = 7  # edge rows: global index of the tensor's first element
COL_HIGH = 8  # edge rows: global index of the tensor's last element (inclusive: offset + numel may be 2**63)
TABLE_COLUMNS = 9

STORAGE_FP32 = 0
STORAGE_FP16 = 1
STORAGE_BF16 = 2
# How a class reaches memory: 16-byte vectors (every tile of every tensor starts on a 16-byte
# boundary), element-wide accesses (element-aligned), or bytes (addresses that are not a
# multiple of the element size, e.g. torch.frombuffer at an odd offset).
ACCESS_VECTOR = 0
ACCESS_ELEMENT = 1
ACCESS_BYTES = 2
NOISE_GAUSSIAN = 0
NOISE_RADEMACHER = 1
ROUNDING_NEAREST = 0
ROUNDING_STOCHASTIC = 1

# Kernels may only read globals wrapped in tl.constexpr.
_K_PARAM = tl.constexpr(COL_PARAM_DELTA)
_K_STATE0 = tl.constexpr(COL_STATE0_DELTA)
_K_STATE1 = tl.constexpr(COL_STATE1_DELTA)
_K_TID = tl.constexpr(COL_TID)
_K_DECAY = tl.constexpr(COL_DECAY_BITS)
_K_TILE = tl.constexpr(COL_TILE)
_K_FIRST = tl.constexpr(COL_FIRST)
_K_LOW = tl.constexpr(COL_LOW)
_K_HIGH = tl.constexpr(COL_HIGH)
_K_COLUMNS = tl.constexpr(TABLE_COLUMNS)
_K_FP32 = tl.constexpr(STORAGE_FP32)
_K_FP16 = tl.constexpr(STORAGE_FP16)
_K_VECTOR = tl.constexpr(ACCESS_VECTOR)
_K_BYTES = tl.constexpr(ACCESS_BYTES)
_K_GAUSSIAN = tl.constexpr(NOISE_GAUSSIAN)
_K_NEAREST = tl.constexpr(ROUNDING_NEAREST)
_K_STATE_NONE = tl.constexpr(STATE_NONE)
_K_MOMENTUM = tl.constexpr(STATE_MOMENTUM)
_K_ADAM = tl.constexpr(STATE_ADAM)
_K_SHIFT = tl.constexpr(SCALAR_SHIFT)
_K_LR = tl.constexpr(SCALAR_LR)
_K_GRAD_COEFF = tl.constexpr(SCALAR_GRAD_COEFF)
# Slot 3 holds the momentum β or Adam's 1 − β1 (SCALAR_MOMENTUM == SCALAR_ADAM_W1).
_K_MOMENTUM_SLOT = tl.constexpr(SCALAR_MOMENTUM)
_K_ADAM_BETA2 = tl.constexpr(SCALAR_ADAM_BETA2)
_K_ADAM_W2 = tl.constexpr(SCALAR_ADAM_W2)
_K_ADAM_BC2_SQRT = tl.constexpr(SCALAR_ADAM_BC2_SQRT)
_K_ADAM_EPS = tl.constexpr(SCALAR_ADAM_EPS)
_K_FIRST_COEFF = tl.constexpr(SCALAR_FIRST_COEFF)
_K_PHILOX_M0 = tl.constexpr(rng.PHILOX_M0)
_K_PHILOX_M1 = tl.constexpr(rng.PHILOX_M1)
_K_PHILOX_W0 = tl.constexpr(rng.PHILOX_W0)
_K_PHILOX_W1 = tl.constexpr(rng.PHILOX_W1)
_K_STATE_KEY0_LO = tl.constexpr(rng.STATE_ROUNDING_KEYS[0] & 0xFFFFFFFF)
_K_STATE_KEY0_HI = tl.constexpr(rng.STATE_ROUNDING_KEYS[0] >> 32)
_K_STATE_KEY1_LO = tl.constexpr(rng.STATE_ROUNDING_KEYS[1] & 0xFFFFFFFF)
_K_STATE_KEY1_HI = tl.constexpr(rng.STATE_ROUNDING_KEYS[1] >> 32)
_K_TWO_PI = tl.constexpr(6.283185307179586)
_K_PI = tl.constexpr(3.141592653589793)
# z = −sqrt(2 ln 2) · sqrt(|log2 u|) · cos θ (see _radius_root and _angle).
_K_MINUS_SQRT_2LN2 = tl.constexpr(-1.1774100225154747)
# 1 - 2**-24: (1 + m * 2**-23) - this = (2m + 1) * 2**-24, exactly.
_K_UNIFORM_BIAS = tl.constexpr(0.99999994039535522)


# ----------------------------------------------------------------------------- Philox


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (SPEC §1) of counter (c0, c1, c2, c3) under key (k0, k1), all uint32.

    The same generator as ``tl.philox``, written with 64-bit products: ``mul.wide.u32`` gives
    both halves in one IMAD.WIDE, where tl.philox's separate umulhi and multiply cost two.
    Counter words may be scalars (the tile's j hi, the tensor's tid, the purpose): the rounds
    that only see scalars are then computed once per tile, not per element.
    """
    for _ in tl.static_range(10):
        product0 = c0.to(tl.uint64) * _K_PHILOX_M0
        product1 = c2.to(tl.uint64) * _K_PHILOX_M1
        next0 = (product1 >> 32).to(tl.uint32) ^ c1 ^ k0
        next2 = (product0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = product1.to(tl.uint32)
        c3 = product0.to(tl.uint32)
        c0 = next0
        c2 = next2
        k0 = k0 + _K_PHILOX_W0
        k1 = k1 + _K_PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _key_from_int64(seed):
    """(key lo, key hi) of SPEC §1 from an int64 holding the u64 seed's bits."""
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def _key_from_halves(seed_lo, seed_hi):
    """(key lo, key hi) from two int32 kernel arguments holding the seed's bit pattern."""
    return seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)


# ----------------------------------------------------------------------------- noise


@triton.jit
def _fast_log2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _fast_sqrt(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("sqrt.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.sqrt(x)


@triton.jit
def _fast_cos(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.cos(x)


@triton.jit
def _fast_sin(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.sin(x)


@triton.jit
def _uniform(word):
    """``(2 * (w >> 9) + 1) * 2**-24``: exact in float32, strictly inside (0, 1).

    Formed as (1 + (w >> 9)·2^-23) − (1 − 2^-24): the float in [1, 2) with mantissa w >> 9
    (one shift-add), then one exact subtraction; no int → float conversion.
    """
    one_to_two = ((word >> 9) + 0x3F800000).to(tl.float32, bitcast=True)
    return one_to_two - _K_UNIFORM_BIAS


@triton.jit
def _radius_root(word, FAST: tl.constexpr):
    """sqrt(|log2 u|): the Box–Muller radius sqrt(−2 ln u) divided by sqrt(2 ln 2).

    The constant −sqrt(2 ln 2) (RADIUS_SCALE) is folded into the coefficient that multiplies
    z, once per program.  Near u → 1 the MUFU log2 has an absolute error of about 2^-22.6 and
    can go positive: the absolute value (an operand modifier of the square root) keeps the
    radius finite and within sqrt(2 ln 2 · 2^-22.6) ≈ 4.6e-4 of the exact one there
    (docs/triton.md has the error budget).
    """
    return _fast_sqrt(tl.abs(_fast_log2(_uniform(word), FAST)), FAST)


@triton.jit
def _angle(word):
    """θ = 2πu − π in [−π, π), where the MUFU sine and cosine are most accurate:
    cos 2πu = −cos θ and sin 2πu = −sin θ, the sign being part of RADIUS_SCALE."""
    return _uniform(word) * _K_TWO_PI - _K_PI


@triton.jit
def _pick4(lane, a, b, c, d):
    """Per element of a [ROWS, 4] tile, the row's value for its lane (0..3)."""
    return tl.where(lane == 0, a[:, None], tl.where(lane == 1, b[:, None],
                    tl.where(lane == 2, c[:, None], d[:, None])))


@triton.jit
def _pick8(lane, a, b, c, d, e, f, g, h):
    """Per element of a [ROWS, 8] tile, the row's value for its lane (0..7)."""
    low = _pick4(lane, a, b, c, d)
    high = _pick4(lane - 4, e, f, g, h)
    return tl.where(lane < 4, low, high)


@triton.jit
def _tile_blocks(tile_start, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """(c0 of the first Philox block of each row, the tile's j hi): Gaussian / word layout."""
    block = tile_start >> 2
    rows = tl.arange(0, ROWS).to(tl.uint32)
    # A tile spans BLOCK / 4 blocks starting at a multiple of that: j hi is the same for all.
    return block.to(tl.uint32) + rows * (WIDTH // 4), (block >> 32).to(tl.uint32)


@triton.jit
def _tile_words(k0, k1, tid, tile_start, PURPOSE: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """The Philox word of each element of the tile, lane e & 3 of block e >> 2 ([ROWS, WIDTH] uint32)."""
    lane = tl.arange(0, WIDTH)[None, :]
    c0, c1 = _tile_blocks(tile_start, ROWS, WIDTH)
    a0, a1, a2, a3 = _philox(c0, c1, tid, PURPOSE, k0, k1)
    if WIDTH == 4:
        return _pick4(lane, a0, a1, a2, a3)
    else:
        b0, b1, b2, b3 = _philox(c0 + 1, c1, tid, PURPOSE, k0, k1)
        return _pick8(lane, a0, a1, a2, a3, b0, b1, b2, b3)


@triton.jit
def _gaussian_factors(k0, k1, tid, c0, c1, FAST: tl.constexpr):
    w0, w1, w2, w3 = _philox(c0, c1, tid, 0, k0, k1)
    return _radius_root(w0, FAST), _angle(w1), _radius_root(w2, FAST), _angle(w3)


@triton.jit
def _tile_noise(k0, k1, tid, tile_start, NOISE: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                FAST: tl.constexpr):
    """z of the tile's elements (tile_start + WIDTH*row + lane) as two [ROWS, WIDTH] factors.

    z = noise_scale(NOISE) · root · unit: for Gaussian noise ``root`` is the radius factor of
    the element's Box–Muller pair (one value per pair, so a coefficient times it costs one
    multiply per pair) and ``unit`` its cosine or sine; for Rademacher noise root is 1 and
    unit ±1.
    """
    lane = tl.arange(0, WIDTH)[None, :]
    if NOISE == _K_GAUSSIAN:
        c0, c1 = _tile_blocks(tile_start, ROWS, WIDTH)
        r0, angle0, r1, angle1 = _gaussian_factors(k0, k1, tid, c0, c1, FAST)
        root = _pick4(lane & 3, r0, r0, r1, r1)
        if WIDTH == 4:
            angle = _pick4(lane, angle0, angle0, angle1, angle1)
        else:
            s0, sangle0, s1, sangle1 = _gaussian_factors(k0, k1, tid, c0 + 1, c1, FAST)
            root = tl.where(lane < 4, root, _pick4(lane - 4, s0, s0, s1, s1))
            angle = _pick8(lane, angle0, angle0, angle1, angle1, sangle0, sangle0, sangle1, sangle1)
        unit = tl.where((lane & 1) == 0, _fast_cos(angle, FAST), _fast_sin(angle, FAST))
        return root, unit
    else:
        # Element e is bit (e & 31) of word (e >> 5) & 3 of block e >> 7 (tile_start is a multiple
        # of 128).  Row q holds elements WIDTH*q .. WIDTH*q + WIDTH - 1 of the tile.
        rows = tl.arange(0, ROWS)
        PER_WORD: tl.constexpr = 32 // WIDTH
        PER_BLOCK: tl.constexpr = 128 // WIDTH
        block = (tile_start >> 7) + rows // PER_BLOCK
        w0, w1, w2, w3 = _philox(block.to(tl.uint32), (tile_start >> 39).to(tl.uint32), tid, 0, k0, k1)
        word_index = (rows // PER_WORD) & 3
        word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
        bits = (word >> ((rows % PER_WORD) * WIDTH).to(tl.uint32))[:, None] >> lane.to(tl.uint32)
        return 1.0, tl.where((bits & 1) != 0, -1.0, 1.0)


@triton.jit
def _noise_scale(NOISE: tl.constexpr):
    """The constant factor of z not carried by _tile_noise (see there)."""
    if NOISE == _K_GAUSSIAN:
        return _K_MINUS_SQRT_2LN2
    else:
        return 1.0


@triton.jit
def _noise_term(scaled_coeff, k0, k1, tid, tile_start, sparsity_threshold, NOISE: tl.constexpr,
                SPARSE: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr, FAST: tl.constexpr):
    """coeff · z for the tile, given scaled_coeff = coeff · _noise_scale(NOISE); 0 where the
    sparsity mask drops an element."""
    root, unit = _tile_noise(k0, k1, tid, tile_start, NOISE, ROWS, WIDTH, FAST)
    term = (scaled_coeff * root) * unit
    if SPARSE:
        term = tl.where(_keep(k0, k1, tid, tile_start, sparsity_threshold, ROWS, WIDTH), term, 0.0)
    return term


@triton.jit
def _keep(k0, k1, tid, tile_start, threshold, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """SPEC §1 sparsity mask: 2·(w >> 9) + 1 ≥ threshold for the purpose-2 word of each element."""
    words = _tile_words(k0, k1, tid, tile_start, 2, ROWS, WIDTH)
    return ((words >> 8) | 1) >= threshold.to(tl.uint32)


# ----------------------------------------------------------------------------- memory


@triton.jit
def _element_pointers(base, delta, tile_start, offsets, ACCESS: tl.constexpr, WIDTH: tl.constexpr):
    """Pointers to the tile's elements; the sum is formed here so the alignment hint lands on it."""
    start = delta + tile_start
    if ACCESS == _K_VECTOR:
        # launch.py puts a tensor in a VECTOR class only when its global element 0 sits on a
        # 16-byte boundary relative to a 16-byte-aligned base: tiles are BLOCK elements apart.
        start = tl.multiple_of(start, WIDTH)
    return base + start + offsets


@triton.jit
def _load_byte(pointers, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(pointers, mask=mask, other=0).to(tl.uint32)
    else:
        return tl.load(pointers).to(tl.uint32)


@triton.jit
def _load_bits(base, delta, tile_start, offsets, mask, STORAGE: tl.constexpr, ACCESS: tl.constexpr,
               MASKED: tl.constexpr, WIDTH: tl.constexpr):
    """The tile's stored values as raw bits: float32, or int16 for 16-bit storage."""
    if ACCESS == _K_BYTES:
        SIZE: tl.constexpr = 4 if STORAGE == _K_FP32 else 2
        byte = base + delta + (tile_start + offsets) * SIZE
        word = _load_byte(byte, mask, MASKED)
        for index in tl.static_range(1, SIZE):
            word = word | (_load_byte(byte + index, mask, MASKED) << (8 * index))
        if STORAGE == _K_FP32:
            return word.to(tl.float32, bitcast=True)
        else:
            return word.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        pointers = _element_pointers(base, delta, tile_start, offsets, ACCESS, WIDTH)
        if MASKED:
            return tl.load(pointers, mask=mask, other=0, eviction_policy="evict_first")
        else:
            return tl.load(pointers, eviction_policy="evict_first")


@triton.jit
def _to_float32(raw, STORAGE: tl.constexpr):
    # 16-bit storage is widened with bit operations: exact, and independent of how the
    # interpreter represents bfloat16.
    if STORAGE == _K_FP32:
        return raw
    elif STORAGE == _K_FP16:
        return raw.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_float32(base, delta, tile_start, offsets, mask, STORAGE: tl.constexpr, ACCESS: tl.constexpr,
                  MASKED: tl.constexpr, WIDTH: tl.constexpr):
    raw = _load_bits(base, delta, tile_start, offsets, mask, STORAGE, ACCESS, MASKED, WIDTH)
    return _to_float32(raw, STORAGE)


@triton.jit
def _store_bits(base, delta, tile_start, offsets, mask, bits, STORAGE: tl.constexpr, ACCESS: tl.constexpr,
                MASKED: tl.constexpr, WIDTH: tl.constexpr):
    """Store float32 values (float32 storage) or int16 bit patterns (16-bit storage)."""
    if ACCESS == _K_BYTES:
        SIZE: tl.constexpr = 4 if STORAGE == _K_FP32 else 2
        byte = base + delta + (tile_start + offsets) * SIZE
        if STORAGE == _K_FP32:
            word = bits.to(tl.uint32, bitcast=True)
        else:
            word = bits.to(tl.uint16, bitcast=True).to(tl.uint32)
        for index in tl.static_range(SIZE):
            tl.store(byte + index, ((word >> (8 * index)) & 0xFF).to(tl.uint8), mask=mask)
    else:
        pointers = _element_pointers(base, delta, tile_start, offsets, ACCESS, WIDTH)
        if MASKED:
            tl.store(pointers, bits, mask=mask)
        else:
            tl.store(pointers, bits)


# ----------------------------------------------------------------------------- rounding


@triton.jit
def _nearest_bf16_bits(x):
    """float32 → bfloat16 bits (uint32), round-half-to-even, overflow to ±inf, NaN → 0x7FC0.

    Integer arithmetic because the interpreter truncates float32 → bfloat16 casts; 0x7FC0 is
    the NaN PyTorch produces.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FC0, rounded)


@triton.jit
def _nearest_bf16(x, FAST: tl.constexpr):
    """Round-half-to-even bfloat16 bits as int16: the hardware conversion when compiled for NVIDIA."""
    if FAST:
        # cvt.rn.bf16x2.f32: two elements per instruction.
        return x.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        return _nearest_bf16_bits(x).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _stochastic_bf16(x, word, FAST: tl.constexpr):
    """SPEC §2 as int16 bits: (bits(x) + (w >> 16)) >> 16, saturating; NaN and inf pass through.

    The sum is right for every |x| up to the largest bfloat16 (0x7F7F0000).  Above it
    (larger finite values, inf, NaN) the result must not depend on the word: finite values
    give 0x7F7F (the saturated value whatever the word), inf stays inf, NaN stays NaN.  Those
    elements take the top half of a value that already is that result: on NVIDIA GPUs x + 0,
    which is x for finite x and inf and the canonical NaN 0x7FFFFFFF for any NaN (one FADD);
    elsewhere x's own bits with a quiet bit forced into a NaN whose payload sat lower.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + (word >> 16)
    if FAST:
        special = not (tl.abs(x) <= 3.3895313892515355e38)  # unordered: NaN is special
        kept = (x + 0.0).to(tl.uint32, bitcast=True)
    else:
        magnitude = bits & 0x7FFFFFFF
        special = magnitude > 0x7F7F0000
        kept = bits | tl.where(magnitude > 0x7F800000, 0x00400000, 0)
    return (tl.where(special, kept, rounded) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _stochastic_fp16(x, word):
    """SPEC §2: between adjacent fp16 magnitudes lo ≤ |x| < hi, round up iff (w >> 8)·2^-24 < (|x| − lo)/(hi − lo).

    Non-finite x rounds to nearest; finite magnitudes saturate at 65504.
    """
    magnitude = tl.minimum(tl.abs(x), 65504.0)
    nearest = magnitude.to(tl.float16)
    nearest_bits = nearest.to(tl.int16, bitcast=True).to(tl.int32)
    low_bits = nearest_bits - (nearest.to(tl.float32) > magnitude).to(tl.int32)
    low = low_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (low_bits + 1).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    # hi - lo is a power of two (or inf at the top, giving 0): the quotient is exact with IEEE division.
    fraction = tl.math.div_rn(magnitude - low, high - low)
    threshold = (word >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
    magnitude_bits = low_bits + (threshold < fraction).to(tl.int32)
    sign = ((x.to(tl.uint32, bitcast=True) >> 16) & 0x8000).to(tl.int32)
    stochastic = (magnitude_bits | sign).to(tl.int16)
    finite = (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
    return tl.where(finite, stochastic, x.to(tl.float16).to(tl.int16, bitcast=True))


@triton.jit
def _rounded_bits(x, k0, k1, tid, tile_start, STORAGE: tl.constexpr, ROUNDING: tl.constexpr,
                  ROWS: tl.constexpr, WIDTH: tl.constexpr, FAST: tl.constexpr):
    """x rounded to the storage type once (SPEC §2): float32 values or int16 bit patterns."""
    if STORAGE == _K_FP32:
        return x
    elif ROUNDING == _K_NEAREST:
        if STORAGE == _K_FP16:
            return x.to(tl.float16).to(tl.int16, bitcast=True)
        else:
            return _nearest_bf16(x, FAST)
    else:
        word = _tile_words(k0, k1, tid, tile_start, 1, ROWS, WIDTH)
        if STORAGE == _K_FP16:
            return _stochastic_fp16(x, word)
        else:
            return _stochastic_bf16(x, word, FAST)


# ----------------------------------------------------------------------------- the pass


@triton.jit
def _tile(
    tile_start, low, high, param_base, grad_base, state0_base, state1_base, seeds_ptr, scalars_ptr,
    param_delta, grad_delta, state0_delta, state1_delta, tid, decay,
    k0, k1, round0, round1, sparsity_threshold, num_directions,
    shift_s, coeff0_s, linear_s, lr, grad_coeff, slot3, slot4, slot5, slot6, slot7,
    BLOCK: tl.constexpr, WIDTH: tl.constexpr, MASKED: tl.constexpr,
    PARAM_STORAGE: tl.constexpr, GRAD_STORAGE: tl.constexpr, STATE_STORAGE: tl.constexpr,
    ACCESS: tl.constexpr, GRAD_ACCESS: tl.constexpr, HAS_SHIFT: tl.constexpr, DIRECTIONS: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_DECAY: tl.constexpr, STATE: tl.constexpr, NOISE: tl.constexpr,
    ROUNDING: tl.constexpr, SPARSE: tl.constexpr, SEEDS_ON_DEVICE: tl.constexpr, FAST: tl.constexpr,
):
    """The fused pass of backends/__init__.py over one tile (masked to [low, high] when MASKED)."""
    ROWS: tl.constexpr = BLOCK // WIDTH
    offsets = tl.arange(0, ROWS)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    mask = None
    if MASKED:
        element = tile_start + offsets
        mask = (element >= low) & (element <= high)
    x = _load_float32(param_base, param_delta, tile_start, offsets, mask, PARAM_STORAGE, ACCESS, MASKED, WIDTH)

    NEEDS_UPDATE: tl.constexpr = DIRECTIONS > 0 or HAS_GRAD or HAS_DECAY or STATE != _K_STATE_NONE
    # A pass whose only use of z is linear (perturb; the single-direction ZO update, restore
    # included) adds linear_s·z once: θ + r·z − lr·c·z = θ + (r − lr·c)·z.
    LINEAR: tl.constexpr = not (HAS_GRAD or HAS_DECAY or STATE != _K_STATE_NONE or DIRECTIONS > 1)
    # The restore shift, one direction, no state, a gradient or weight decay: z is used once too,
    # x' = x + r·z, x' − lr·(c·z + g·grad + wd·x') = a·x + (a·r − lr·c)·z − lr·g·grad, a = 1 − lr·wd.
    # Written with two uses of z (x' and the direction), triton 3.6 computed the noise in a layout
    # where several threads compute each Philox block: 4-5x the instructions (docs/triton.md).
    FOLDED: tl.constexpr = HAS_SHIFT and DIRECTIONS == 1 and STATE == _K_STATE_NONE and not LINEAR
    if HAS_SHIFT or DIRECTIONS > 0:
        root, unit = _tile_noise(k0, k1, tid, tile_start, NOISE, ROWS, WIDTH, FAST)
        if SPARSE:
            keep = _keep(k0, k1, tid, tile_start, sparsity_threshold, ROWS, WIDTH)
    if LINEAR:
        step = (linear_s * root) * unit
        if SPARSE:
            step = tl.where(keep, step, 0.0)
        x = x + step
    elif FOLDED:
        if HAS_DECAY:
            kept = 1.0 - lr * decay
            # The reference's x' − lr·wd·x' is NaN for a non-finite x' where wd != 0 (inf − inf),
            # a·x is not: x·0 carries the NaN.  A zero decay leaves x as it is.
            x = tl.where(decay != 0.0, x * kept + x * 0.0, x)
        else:
            kept = 1.0
        step = ((kept * shift_s - lr * coeff0_s) * root) * unit
        if SPARSE:
            step = tl.where(keep, step, 0.0)
        x = x + step
        if HAS_GRAD:
            grad = _load_float32(grad_base, grad_delta, tile_start, offsets, mask, GRAD_STORAGE, GRAD_ACCESS,
                                 MASKED, WIDTH)
            x = x - (lr * grad_coeff) * grad
    else:
        if HAS_SHIFT:
            step = (shift_s * root) * unit
            if SPARSE:
                step = tl.where(keep, step, 0.0)
            x = x + step
        if NEEDS_UPDATE:
            direction = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
            if DIRECTIONS > 0:
                direction = (coeff0_s * root) * unit
                if SPARSE:
                    direction = tl.where(keep, direction, 0.0)
            if DIRECTIONS > 1:
                for k in range(1, num_directions):
                    kk0, kk1 = _key_from_int64(tl.load(seeds_ptr + k))
                    coeff_k = tl.load(scalars_ptr + _K_FIRST_COEFF + k) * _noise_scale(NOISE)
                    direction = direction + _noise_term(coeff_k, kk0, kk1, tid, tile_start, sparsity_threshold,
                                                        NOISE, SPARSE, ROWS, WIDTH, FAST)
            if HAS_GRAD:
                grad = _load_float32(grad_base, grad_delta, tile_start, offsets, mask, GRAD_STORAGE, GRAD_ACCESS,
                                     MASKED, WIDTH)
                direction = direction + grad_coeff * grad
            if HAS_DECAY:
                # A zero decay must not touch the direction (0 * inf would be NaN).
                direction = tl.where(decay != 0.0, direction + decay * x, direction)
            if STATE == _K_MOMENTUM:
                buffer = _load_float32(state0_base, state0_delta, tile_start, offsets, mask, STATE_STORAGE, ACCESS,
                                       MASKED, WIDTH)
                buffer = slot3 * buffer + direction
                _store_bits(state0_base, state0_delta, tile_start, offsets, mask,
                            _rounded_bits(buffer, round0 ^ _K_STATE_KEY0_LO, round1 ^ _K_STATE_KEY0_HI, tid,
                                          tile_start, STATE_STORAGE, ROUNDING, ROWS, WIDTH, FAST),
                            STATE_STORAGE, ACCESS, MASKED, WIDTH)
                direction = buffer
            elif STATE == _K_ADAM:
                m = _load_float32(state0_base, state0_delta, tile_start, offsets, mask, STATE_STORAGE, ACCESS,
                                  MASKED, WIDTH)
                v = _load_float32(state1_base, state1_delta, tile_start, offsets, mask, STATE_STORAGE, ACCESS,
                                  MASKED, WIDTH)
                m = m + slot3 * (direction - m)
                v = slot4 * v + slot5 * (direction * direction)
                _store_bits(state0_base, state0_delta, tile_start, offsets, mask,
                            _rounded_bits(m, round0 ^ _K_STATE_KEY0_LO, round1 ^ _K_STATE_KEY0_HI, tid,
                                          tile_start, STATE_STORAGE, ROUNDING, ROWS, WIDTH, FAST),
                            STATE_STORAGE, ACCESS, MASKED, WIDTH)
                _store_bits(state1_base, state1_delta, tile_start, offsets, mask,
                            _rounded_bits(v, round0 ^ _K_STATE_KEY1_LO, round1 ^ _K_STATE_KEY1_HI, tid,
                                          tile_start, STATE_STORAGE, ROUNDING, ROWS, WIDTH, FAST),
                            STATE_STORAGE, ACCESS, MASKED, WIDTH)
                denominator = tl.math.div_rn(tl.sqrt_rn(v), slot6) + slot7
                direction = tl.math.div_rn(m, denominator)
            x = x - lr * direction
    out = _rounded_bits(x, round0, round1, tid, tile_start, PARAM_STORAGE, ROUNDING, ROWS, WIDTH, FAST)
    _store_bits(param_base, param_delta, tile_start, offsets, mask, out, PARAM_STORAGE, ACCESS, MASKED, WIDTH)


@triton.jit(do_not_specialize=[
    "num_full_rows", "search_steps", "num_full_tiles", "tiles_per_program", "num_edges", "seed_lo", "seed_hi",
    "rounding_lo", "rounding_hi", "sparsity_threshold", "num_directions",
])
def fused_pass_kernel(
    table_ptr, grad_deltas_ptr, param_base, grad_base, state0_base, state1_base, seeds_ptr, scalars_ptr,
    num_full_rows, search_steps, num_full_tiles, tiles_per_program, num_edges,
    seed_lo, seed_hi, rounding_lo, rounding_hi, sparsity_threshold, num_directions,
    shift, lr, grad_coeff, slot3, slot4, slot5, slot6, slot7, coeff0,
    BLOCK: tl.constexpr, WIDTH: tl.constexpr,
    PARAM_STORAGE: tl.constexpr, GRAD_STORAGE: tl.constexpr, STATE_STORAGE: tl.constexpr,
    ACCESS: tl.constexpr, GRAD_ACCESS: tl.constexpr, HAS_SHIFT: tl.constexpr, DIRECTIONS: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_DECAY: tl.constexpr, STATE: tl.constexpr, NOISE: tl.constexpr,
    ROUNDING: tl.constexpr, SPARSE: tl.constexpr, SEEDS_ON_DEVICE: tl.constexpr,
    SCALARS_ON_DEVICE: tl.constexpr, FAST: tl.constexpr,
):
    """The fused pass of backends/__init__.py over one class of a group (see the module docstring).

    ``DIRECTIONS`` is the structural part of the direction count (0, 1, or 2 for two or
    more); ``num_directions`` the count itself, so that any number of directions shares one
    compiled kernel whose loop over directions past the first is not unrolled.

    Programs ``[0, num_edges)`` take one edge tile each (table rows after the full rows and
    their sentinel); the programs after them take ``tiles_per_program`` of the
    ``num_full_tiles`` full tiles each, in order.
    """
    program = tl.program_id(0)
    if SEEDS_ON_DEVICE:
        # Read when the kernel runs: a CUDA graph replays with the seeds the tensor holds then.
        k0, k1 = _key_from_int64(tl.load(seeds_ptr))
        round0, round1 = _key_from_int64(tl.load(seeds_ptr + tl.maximum(num_directions, 1)))
    else:
        k0, k1 = _key_from_halves(seed_lo, seed_hi)
        round0, round1 = _key_from_halves(rounding_lo, rounding_hi)
    if SCALARS_ON_DEVICE:
        shift = tl.load(scalars_ptr + _K_SHIFT)
        lr = tl.load(scalars_ptr + _K_LR)
        grad_coeff = tl.load(scalars_ptr + _K_GRAD_COEFF)
        slot3 = tl.load(scalars_ptr + _K_MOMENTUM_SLOT)
        slot4 = tl.load(scalars_ptr + _K_ADAM_BETA2)
        slot5 = tl.load(scalars_ptr + _K_ADAM_W2)
        slot6 = tl.load(scalars_ptr + _K_ADAM_BC2_SQRT)
        slot7 = tl.load(scalars_ptr + _K_ADAM_EPS)
        # A pass without directions has no coefficient slot: the vector ends before it.
        if DIRECTIONS > 0:
            coeff0 = tl.load(scalars_ptr + _K_FIRST_COEFF)
        else:
            coeff0 = shift * 0.0
    # Coefficients of z times the noise kind's constant factor (see _tile_noise); linear_s
    # is the one coefficient of a LINEAR pass (see _tile).
    noise_scale = _noise_scale(NOISE)
    shift_s = shift * noise_scale
    coeff0_s = coeff0 * noise_scale
    linear = coeff0 * 0.0
    if HAS_SHIFT:
        linear = shift
    if DIRECTIONS == 1:
        linear = linear - lr * coeff0
    linear_s = linear * noise_scale

    if program < num_edges:
        row = table_ptr + (num_full_rows + 1 + program).to(tl.int64) * _K_COLUMNS
        grad_delta = 0
        if HAS_GRAD:
            grad_delta = tl.load(grad_deltas_ptr + num_full_rows + 1 + program)
        _tile(
            tl.load(row + _K_TILE) * BLOCK, tl.load(row + _K_LOW), tl.load(row + _K_HIGH),
            param_base, grad_base, state0_base, state1_base, seeds_ptr, scalars_ptr,
            tl.load(row + _K_PARAM), grad_delta, tl.load(row + _K_STATE0), tl.load(row + _K_STATE1),
            tl.load(row + _K_TID).to(tl.uint32), tl.load(row + _K_DECAY).to(tl.int32).to(tl.float32, bitcast=True),
            k0, k1, round0, round1, sparsity_threshold, num_directions,
            shift_s, coeff0_s, linear_s, lr, grad_coeff, slot3, slot4, slot5, slot6, slot7,
            BLOCK, WIDTH, True, PARAM_STORAGE, GRAD_STORAGE, STATE_STORAGE, ACCESS, GRAD_ACCESS, HAS_SHIFT,
            DIRECTIONS, HAS_GRAD, HAS_DECAY, STATE, NOISE, ROUNDING, SPARSE, SEEDS_ON_DEVICE, FAST,
        )
    else:
        tile = (program - num_edges) * tiles_per_program
        stop = tl.minimum(tile + tiles_per_program, num_full_tiles)
        # The last row whose first full tile is <= tile (COL_FIRST increases strictly).
        low_row = 0
        high_row = num_full_rows
        for _ in range(search_steps):
            middle = (low_row + high_row) // 2
            goes_right = tl.load(table_ptr + middle.to(tl.int64) * _K_COLUMNS + _K_FIRST) <= tile
            low_row = tl.where(goes_right, middle, low_row)
            high_row = tl.where(goes_right, high_row, middle)
        row_index = low_row
        while tile < stop:
            row = table_ptr + row_index.to(tl.int64) * _K_COLUMNS
            row_stop = tl.minimum(tl.load(row + _K_COLUMNS + _K_FIRST).to(tl.int32), stop)
            param_delta = tl.load(row + _K_PARAM)
            state0_delta = tl.load(row + _K_STATE0)
            state1_delta = tl.load(row + _K_STATE1)
            grad_delta = 0
            if HAS_GRAD:
                grad_delta = tl.load(grad_deltas_ptr + row_index)
            tid = tl.load(row + _K_TID).to(tl.uint32)
            decay = tl.load(row + _K_DECAY).to(tl.int32).to(tl.float32, bitcast=True)
            tile_start = (tl.load(row + _K_TILE) + tile) * BLOCK
            while tile < row_stop:
                _tile(
                    tile_start, 0, 0, param_base, grad_base, state0_base, state1_base, seeds_ptr, scalars_ptr,
                    param_delta, grad_delta, state0_delta, state1_delta, tid, decay,
                    k0, k1, round0, round1, sparsity_threshold, num_directions,
                    shift_s, coeff0_s, linear_s, lr, grad_coeff, slot3, slot4, slot5, slot6, slot7,
                    BLOCK, WIDTH, False, PARAM_STORAGE, GRAD_STORAGE, STATE_STORAGE, ACCESS, GRAD_ACCESS, HAS_SHIFT,
                    DIRECTIONS, HAS_GRAD, HAS_DECAY, STATE, NOISE, ROUNDING, SPARSE, SEEDS_ON_DEVICE, FAST,
                )
                tile += 1
                tile_start += BLOCK
            row_index += 1
