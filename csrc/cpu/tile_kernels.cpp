// One tile of the fused pass on the CPU.
//
// setup.py compiles this file three times, with ADDAX_TILE_ISA = avx512 (-mavx512f ...),
// avx2 (-mavx2) and baseline (plain x86-64 / the host's default), each defining
// process_tile_<ISA>; fused_cpu.cpp picks one at run time from the CPU's features, so the
// build never assumes the builder's CPU (no -march=native).  Everything here is either
// always_inline or has internal linkage: no function compiled with wide instructions can be
// merged by the linker into the baseline path.  No standard-library templates for the same
// reason.
//
// Inside a tile every stage is a flat loop over float/uint32 buffers (structure of arrays):
// Philox words for all blocks (explicit SIMD from simd_lanes.h, 32 or 16 blocks per step), the
// Box–Muller transform (auto-vectorized), then load / shift / accumulate / update / store over
// elements (one fused loop for the common one-direction update).
#include "tile_kernels.h"

#include "../philox.h"

#if !defined(ADDAX_TILE_ISA)
#error "compile with -DADDAX_TILE_ISA=avx512|avx2|baseline"
#endif

#define ADDAX_CONCAT_INNER(a, b) a##b
#define ADDAX_CONCAT(a, b) ADDAX_CONCAT_INNER(a, b)

#if defined(__AVX2__) || defined(__AVX512F__)
#include "simd_lanes.h"
#define ADDAX_WIDE_PHILOX 1
#else
#define ADDAX_WIDE_PHILOX 0
#endif

namespace addax {
namespace cpu {
namespace {

constexpr int64_t kMaxBlocks = kTile / kGaussianPerBlock + 2;  // a tile may start and end mid-block

#if ADDAX_WIDE_PHILOX
constexpr int64_t kPhiloxStep = simd::CounterLanes::kBlocks;
#else
constexpr int64_t kPhiloxStep = 1;
#endif
// The wide Philox loop runs whole steps and may compute a few words past the last block.
constexpr int64_t kBlockCapacity = (kMaxBlocks + kPhiloxStep - 1) / kPhiloxStep * kPhiloxStep;

struct BlockWords {
  alignas(64) uint32_t w0[kBlockCapacity];
  alignas(64) uint32_t w1[kBlockCapacity];
  alignas(64) uint32_t w2[kBlockCapacity];
  alignas(64) uint32_t w3[kBlockCapacity];
};

// Philox words of blocks first_block .. first_block + num_blocks - 1 (num_blocks <= kMaxBlocks),
// one array per word.
void philox_blocks(uint64_t seed, uint32_t tid, uint64_t first_block, int64_t num_blocks, uint32_t purpose,
                   BlockWords& out) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  int64_t b = 0;
#if ADDAX_WIDE_PHILOX
  const uint32_t first_low = static_cast<uint32_t>(first_block);
  const uint32_t first_high = static_cast<uint32_t>(first_block >> 32);
  const int64_t padded = (num_blocks + kPhiloxStep - 1) / kPhiloxStep * kPhiloxStep;
  // Lanes share the high counter word, so the wide path runs only where the low word does not
  // wrap; the scalar loop below handles the rare run that crosses a multiple of 2^32 blocks.
  if (static_cast<uint64_t>(first_low) + static_cast<uint64_t>(padded) <= (uint64_t{1} << 32)) {
    for (; b < num_blocks; b += kPhiloxStep) {
      simd::CounterLanes c0 = simd::iota(first_low + static_cast<uint32_t>(b));
      simd::CounterLanes c1 = simd::broadcast(first_high);
      simd::CounterLanes c2 = simd::broadcast(tid);
      simd::CounterLanes c3 = simd::broadcast(purpose);
      philox4x32_10_rounds(c0, c1, c2, c3, key0, key1);
      simd::store(out.w0 + b, c0);
      simd::store(out.w1 + b, c1);
      simd::store(out.w2 + b, c2);
      simd::store(out.w3 + b, c3);
    }
    return;
  }
#endif
  for (; b < num_blocks; ++b) {
    const uint64_t block = first_block + static_cast<uint64_t>(b);
    const Words words = philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), tid,
                                      purpose, key0, key1);
    out.w0[b] = words.w0;
    out.w1[b] = words.w1;
    out.w2[b] = words.w2;
    out.w3[b] = words.w3;
  }
}

void gaussian_from_blocks(const BlockWords& words, int64_t num_blocks, float* __restrict out) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    const Gaussian4 z = gaussian4(Words{words.w0[b], words.w1[b], words.w2[b], words.w3[b]});
    out[4 * b + 0] = z.z0;
    out[4 * b + 1] = z.z1;
    out[4 * b + 2] = z.z2;
    out[4 * b + 3] = z.z3;
  }
}

void expand_signs(const uint32_t* __restrict words, float* __restrict out) {
  for (int w = 0; w < 4; ++w) {
    const uint32_t word = words[w];
    for (uint32_t bit = 0; bit < 32; ++bit) out[32 * w + bit] = ((word >> bit) & 1u) ? -1.0f : 1.0f;
  }
}

// The word of purpose `purpose` of each element of [first, first + count) (lane e & 3 of block
// e >> 2); returns a pointer to word[first].
const uint32_t* element_words_tile(uint64_t seed, uint32_t tid, uint64_t first, int64_t count, uint32_t purpose,
                                   uint32_t* buffer, BlockWords& words) {
  const uint64_t first_block = first >> 2;
  const int64_t num_blocks = static_cast<int64_t>(((first + count - 1) >> 2) - first_block) + 1;
  philox_blocks(seed, tid, first_block, num_blocks, purpose, words);
  for (int64_t b = 0; b < num_blocks; ++b) {
    buffer[4 * b + 0] = words.w0[b];
    buffer[4 * b + 1] = words.w1[b];
    buffer[4 * b + 2] = words.w2[b];
    buffer[4 * b + 3] = words.w3[b];
  }
  return buffer + (first & 3);
}

// z of elements [first, first + count) for one seed, with the sparsity mask of the same seed
// applied (threshold 0: dense); returns a pointer to z[first].  `mask_words` is scratch.
float* noise_tile(uint64_t seed, uint32_t tid, uint64_t first, int64_t count, NoiseKind kind, uint32_t threshold,
                  float* buffer, uint32_t* mask_words, BlockWords& words) {
  float* z;
  if (kind == NoiseKind::kGaussian) {
    const uint64_t first_block = first >> 2;
    const int64_t num_blocks = static_cast<int64_t>(((first + count - 1) >> 2) - first_block) + 1;
    philox_blocks(seed, tid, first_block, num_blocks, kPurposeNoise, words);
    gaussian_from_blocks(words, num_blocks, buffer);
    z = buffer + (first & 3);
  } else {
    const uint64_t first_block = first >> 7;
    const int64_t num_blocks = static_cast<int64_t>(((first + count - 1) >> 7) - first_block) + 1;
    philox_blocks(seed, tid, first_block, num_blocks, kPurposeNoise, words);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const uint32_t block[4] = {words.w0[b], words.w1[b], words.w2[b], words.w3[b]};
      expand_signs(block, buffer + kRademacherPerBlock * b);
    }
    z = buffer + (first & 127);
  }
  if (threshold != 0) {
    const uint32_t* mask = element_words_tile(seed, tid, first, count, kPurposeMask, mask_words, words);
    for (int64_t i = 0; i < count; ++i) z[i] = keep_element(mask[i], threshold) ? z[i] : 0.0f;
  }
  return z;
}

void load_storage(StorageType type, const void* base, int64_t begin, int64_t count, float* __restrict out) {
  switch (type) {
    case StorageType::kFloat32: {
      const float* __restrict in = static_cast<const float*>(base) + begin;
      for (int64_t i = 0; i < count; ++i) out[i] = in[i];
      break;
    }
    case StorageType::kBFloat16: {
      const uint16_t* __restrict in = static_cast<const uint16_t*>(base) + begin;
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_bits_to_float(in[i]);
      break;
    }
    case StorageType::kFloat16: {
      const uint16_t* __restrict in = static_cast<const uint16_t*>(base) + begin;
      for (int64_t i = 0; i < count; ++i) out[i] = fp16_bits_to_float(in[i]);
      break;
    }
  }
}

// acc = acc + scale * values, with the reference's two roundings (the build disables contraction).
void add_scaled(float* __restrict acc, float scale, const float* __restrict values, int64_t count) {
  for (int64_t i = 0; i < count; ++i) acc[i] = acc[i] + scale * values[i];
}

void subtract_scaled(float* __restrict acc, float scale, const float* __restrict values, int64_t count) {
  for (int64_t i = 0; i < count; ++i) acc[i] = acc[i] - scale * values[i];
}

// The update with one direction (MeZO's restore + step, Addax's step) in one pass over the
// tile instead of five: the same products and sums in the same order as the general path
// below (x + shift z; d = 0 + c z [+ g grad] [+ wd x]; x - lr d), so the results are identical.
// The flags are template parameters so that each combination is a branch-free vector loop.
template <bool kShift, bool kGrad, bool kDecay>
void update_one_direction_loop(float* __restrict x, const float* __restrict z, float shift, float coeff,
                               const float* __restrict grad, float grad_coeff, float weight_decay, float lr,
                               int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    float xi = x[i];
    if (kShift) xi = xi + shift * z[i];
    float direction = 0.0f + coeff * z[i];
    if (kGrad) direction = direction + grad_coeff * grad[i];
    if (kDecay) direction = direction + weight_decay * xi;
    x[i] = xi - lr * direction;
  }
}

template <bool kShift, bool kGrad>
void update_one_direction_decay(float* x, const float* z, float shift, float coeff, const float* grad,
                                float grad_coeff, float weight_decay, float lr, int64_t count) {
  if (weight_decay != 0.0f) {
    update_one_direction_loop<kShift, kGrad, true>(x, z, shift, coeff, grad, grad_coeff, weight_decay, lr, count);
  } else {
    update_one_direction_loop<kShift, kGrad, false>(x, z, shift, coeff, grad, grad_coeff, weight_decay, lr, count);
  }
}

// grad: null without gradients.
void update_one_direction(float* x, const float* z, bool has_shift, float shift, float coeff, const float* grad,
                          float grad_coeff, float weight_decay, float lr, int64_t count) {
  if (has_shift) {
    if (grad != nullptr) {
      update_one_direction_decay<true, true>(x, z, shift, coeff, grad, grad_coeff, weight_decay, lr, count);
    } else {
      update_one_direction_decay<true, false>(x, z, shift, coeff, grad, grad_coeff, weight_decay, lr, count);
    }
  } else if (grad != nullptr) {
    update_one_direction_decay<false, true>(x, z, shift, coeff, grad, grad_coeff, weight_decay, lr, count);
  } else {
    update_one_direction_decay<false, false>(x, z, shift, coeff, grad, grad_coeff, weight_decay, lr, count);
  }
}

void store_storage(StorageType type, bool stochastic, const float* __restrict x, const uint32_t* __restrict words,
                   int64_t count, void* base, int64_t begin) {
  if (type == StorageType::kFloat32) {
    float* __restrict out = static_cast<float*>(base) + begin;
    for (int64_t i = 0; i < count; ++i) out[i] = x[i];
    return;
  }
  uint16_t* __restrict out = static_cast<uint16_t*>(base) + begin;
  if (type == StorageType::kBFloat16) {
    if (stochastic) {
      for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16_stochastic(x[i], words[i]);
    } else {
      for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16_nearest(x[i]);
    }
  } else if (stochastic) {
    for (int64_t i = 0; i < count; ++i) out[i] = float_to_fp16_stochastic(x[i], words[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = float_to_fp16_nearest(x[i]);
  }
}

// acc = momentum * acc + direction, then x = x - lr * acc (torch.optim.SGD's buffer update and
// step, in the reference's order); `acc` holds the buffer's float32 values.
void momentum_step(float* __restrict x, float* __restrict acc, const float* __restrict direction, float momentum,
                   float lr, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float buffer = momentum * acc[i] + direction[i];
    acc[i] = buffer;
    x[i] = x[i] - lr * buffer;
  }
}

// torch.optim.Adam's moments and step on d, in the reference's order (see backends/__init__.py):
// m = m + w1 (d - m); v = beta2 v + w2 d^2; x = x - lr m / (sqrt(v) / bc2_sqrt + eps).
void adam_step(float* __restrict x, float* __restrict m, float* __restrict v, const float* __restrict direction,
               const float* scalars, int64_t count) {
  const float w1 = scalars[kScalarAdamW1], beta2 = scalars[kScalarAdamBeta2], w2 = scalars[kScalarAdamW2];
  const float bc2_sqrt = scalars[kScalarAdamBc2Sqrt], eps = scalars[kScalarAdamEps], lr = scalars[kScalarLr];
  for (int64_t i = 0; i < count; ++i) {
    const float d = direction[i];
    const float m_new = m[i] + w1 * (d - m[i]);
    const float v_new = beta2 * v[i] + w2 * (d * d);
    m[i] = m_new;
    v[i] = v_new;
    x[i] = x[i] - lr * (m_new / (sqrt_rn(v_new) / bc2_sqrt + eps));
  }
}

// Noise buffers start at the block boundary before the tile: up to one extra Rademacher block
// on each side.
constexpr int64_t kNoiseBuffer = kTile + 2 * kRademacherPerBlock;

// A state buffer's float32 values for the tile: the buffer itself for float32 state (updated
// in place), else a copy in `scratch` that store_state writes back.
float* load_state(StorageType type, void* base, int64_t begin, int64_t count, float* scratch) {
  if (type == StorageType::kFloat32) return static_cast<float*>(base) + begin;
  load_storage(type, base, begin, count, scratch);
  return scratch;
}

void store_state(StorageType type, const JobArgs& job, const GroupArgs& group, int index, const TensorArg& tensor,
                 uint64_t first, const float* values, int64_t begin, int64_t count, uint32_t* word_buffer,
                 BlockWords& words) {
  if (type == StorageType::kFloat32) return;
  const bool stochastic = job.rounding == Rounding::kStochastic;
  const uint32_t* element_words =
      stochastic ? element_words_tile(rounding_seed(job) ^ group.state_keys[index], tensor.tid, first, count,
                                      kPurposeRounding, word_buffer, words)
                 : nullptr;
  store_storage(type, stochastic, values, element_words, count, tensor.state[index], begin);
}

}  // namespace

void ADDAX_CONCAT(process_tile_, ADDAX_TILE_ISA)(const TensorArg& tensor, const void* grad_base,
                                                 const GroupArgs& group, const JobArgs& job, bool needs_update,
                                                 int64_t begin, int64_t count) {
  alignas(64) float first_noise[kNoiseBuffer];
  alignas(64) float other_noise[kNoiseBuffer];
  alignas(64) float x_buffer[kTile];
  alignas(64) float direction[kTile];
  alignas(64) float grad_buffer[kTile];
  alignas(64) uint32_t word_buffer[kTile + 8];
  BlockWords words;

  const float* scalars = job.scalars;
  const uint64_t first = tensor.offset + static_cast<uint64_t>(begin);
  const float* z0 = noise_tile(job.seeds[0], tensor.tid, first, count, job.noise, job.sparsity_threshold,
                               first_noise, word_buffer, words);

  // float32 parameters are updated in place (every step below is elementwise), which saves a
  // copy in and a copy out of the tile; other types go through a float32 buffer.
  const bool in_place = group.param_type == StorageType::kFloat32;
  float* x = in_place ? static_cast<float*>(tensor.param) + begin : x_buffer;
  if (!in_place) load_storage(group.param_type, tensor.param, begin, count, x);
  const float* grad = nullptr;
  if (needs_update && job.has_grad) {
    grad = static_cast<const float*>(grad_base) + begin;
    if (group.grad_type != StorageType::kFloat32) {
      load_storage(group.grad_type, grad_base, begin, count, grad_buffer);
      grad = grad_buffer;
    }
  }
  if (needs_update && job.num_directions == 1 && job.state == StateKind::kNone) {
    update_one_direction(x, z0, job.has_shift, scalars[kScalarShift], scalars[kScalarFirstCoeff], grad,
                         scalars[kScalarGradCoeff], tensor.weight_decay, scalars[kScalarLr], count);
  } else {
    if (job.has_shift) add_scaled(x, scalars[kScalarShift], z0, count);
    if (needs_update) {
      for (int64_t i = 0; i < count; ++i) direction[i] = 0.0f;
      for (int32_t k = 0; k < job.num_directions; ++k) {
        const float* zk = k == 0 ? z0
                                 : noise_tile(job.seeds[k], tensor.tid, first, count, job.noise,
                                              job.sparsity_threshold, other_noise, word_buffer, words);
        add_scaled(direction, scalars[kScalarFirstCoeff + k], zk, count);
      }
      if (grad != nullptr) add_scaled(direction, scalars[kScalarGradCoeff], grad, count);
      if (tensor.weight_decay != 0.0f) add_scaled(direction, tensor.weight_decay, x, count);
      if (job.state == StateKind::kNone) {
        subtract_scaled(x, scalars[kScalarLr], direction, count);
      } else {
        // The noise buffers are free now: they hold the state buffers' float32 copies.
        float* first_state = load_state(group.state_type, tensor.state[0], begin, count, first_noise);
        if (job.state == StateKind::kMomentum) {
          momentum_step(x, first_state, direction, scalars[kScalarMomentum], scalars[kScalarLr], count);
        } else {
          float* second_state = load_state(group.state_type, tensor.state[1], begin, count, other_noise);
          adam_step(x, first_state, second_state, direction, scalars, count);
          store_state(group.state_type, job, group, 1, tensor, first, second_state, begin, count, word_buffer,
                      words);
        }
        store_state(group.state_type, job, group, 0, tensor, first, first_state, begin, count, word_buffer, words);
      }
    }
  }
  if (in_place) return;

  const bool stochastic = job.rounding == Rounding::kStochastic;
  const uint32_t* element_words =
      stochastic ? element_words_tile(rounding_seed(job), tensor.tid, first, count, kPurposeRounding, word_buffer,
                                      words)
                 : nullptr;
  store_storage(group.param_type, stochastic, x, element_words, count, tensor.param, begin);
}

}  // namespace cpu
}  // namespace addax
