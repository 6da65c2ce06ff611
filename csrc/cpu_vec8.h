// Eight float32 lanes in AVX2 with F16C: the backward line loops of cpu_lines.h written with intrinsics, for the
// dtypes whose loops GCC does not vectorize well (float16 converts through F16C here, in registers, where the
// portable loops go through chunk buffers) and for short lines (a row of 16 cells in NCHW), where the portable
// loops' remainders and lane sums cost more than the work.
//
// The per-element math is fastunet_math.h's (bn_relu, pool_argmax4, relu_pool_dy, bn_backward_dz), the same
// operations in the same order, no fused multiply-add: every lane gives the bits the scalar code gives. 16-bit
// values widen exactly and round to nearest even on store, NaNs as c10's (bfloat16 0x7fc0, float16 0x7e00 with the
// sign).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FASTUNET_VEC8 1
#include <immintrin.h>
#else
#define FASTUNET_VEC8 0
#endif

#if FASTUNET_VEC8
namespace fastunet::cpu::vec8 {

#define FU_VEC8 __attribute__((target("avx2,f16c"), always_inline)) inline

using vf = __m256;

// vcvtps2ph rounds to nearest even as c10 does, but keeps a NaN's payload: NaNs become c10's 0x7e00 | sign.
FU_VEC8 __m128i c10_nan(__m128i h) {
  const __m128i nan = _mm_cmpgt_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_set1_epi16(0x7c00));
  return _mm_blendv_epi8(h, _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(-0x8000)), _mm_set1_epi16(0x7e00)), nan);
}

FU_VEC8 __m256i c10_nan(__m256i h) {
  const __m256i nan = _mm256_cmpgt_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7fff)), _mm256_set1_epi16(0x7c00));
  return _mm256_blendv_epi8(
      h, _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16(-0x8000)), _mm256_set1_epi16(0x7e00)), nan);
}

// Eight consecutive elements widened to float32.
FU_VEC8 vf load(const float* p) { return _mm256_loadu_ps(p); }

FU_VEC8 vf load(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

FU_VEC8 vf load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// bfloat16 rounding kept in 32-bit lanes: each float32 rounded to nearest even to its upper 16 bits (narrow of
// cpu_lines.h), the lower 16 zero; NaN as c10's 0x7fc0.
FU_VEC8 __m256i round_bfloat16_bits(vf v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd),
                                           _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(nan));
}

// Eight float32 rounded to 16 bits (narrow<scalar_t> of cpu_lines.h, lane by lane).
FU_VEC8 __m128i narrow_bits(vf v, c10::BFloat16) {
  const __m256i rounded = _mm256_srli_epi32(round_bfloat16_bits(v), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// (c10_nan only where a lane is NaN: rare, and a predictable branch costs less than the fix-up.)
FU_VEC8 __m128i narrow_bits(vf v, c10::Half) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) == 0 ? h : c10_nan(h);
}

FU_VEC8 void store(float* p, vf v) { _mm256_storeu_ps(p, v); }

template <typename scalar_t>
FU_VEC8 void store(scalar_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow_bits(v, scalar_t()));
}

// v rounded through scalar_t and widened back: the backward lines' activations (bn_relu_line's rounding), which
// are only compared, so a float16 NaN keeps its payload (a NaN either way).
template <typename scalar_t>
FU_VEC8 vf round_through(vf v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return _mm256_castsi256_ps(round_bfloat16_bits(v));
  } else {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// The lanes hold 8 consecutive cells of a line, in an order of the line's kind: along channels in order; along a
// row, for float32 and float16, cells 0 1 4 5 2 3 6 7 (what splitting 16 interleaved pixels into their even and odd
// ones gives without a lane-crossing permute; tensors with one element per cell are permuted to match), for
// bfloat16 in order (a pixel pair is one 32-bit lane: even pixel in its lower half, odd in its upper).
template <bool AlongRow, typename scalar_t>
constexpr bool kPairOrder = AlongRow && !std::is_same_v<scalar_t, c10::BFloat16>;

// Swaps cells 2 3 with 4 5: from the order in memory to the pair order and back.
FU_VEC8 vf swap_middle(vf v) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xd8)); }

// The 8 cells t..t+7 of a tensor with one element per cell, in the line's order.
template <bool AlongRow, typename scalar_t>
FU_VEC8 vf load_cells(const scalar_t* p, int64_t t) {
  const vf v = load(p + t);
  return kPairOrder<AlongRow, scalar_t> ? swap_middle(v) : v;
}

template <bool AlongRow, typename scalar_t>
FU_VEC8 void store_cells(scalar_t* p, int64_t t, vf v) {
  store(p + t, kPairOrder<AlongRow, scalar_t> ? swap_middle(v) : v);
}

// The pixels of 8 cells in one tensor along a line, k = 0, 1 (a pixel pair), in the line's order: Step 2, pixel 1
// follows pixel 0 in memory (NCHW rows: 16 elements split into their even and odd ones); Step 1, each pixel has
// its own pointer.
template <int Step, bool AlongRow, typename scalar_t>
FU_VEC8 void load_pair(const scalar_t* p0, const scalar_t* p1, int64_t t, vf& v0, vf& v1) {
  if constexpr (Step == 2 && std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + 2 * t));
    v0 = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    v1 = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  } else if constexpr (Step == 2) {
    const vf a = load(p0 + 2 * t), b = load(p0 + 2 * t + 8);
    v0 = _mm256_shuffle_ps(a, b, 0x88);
    v1 = _mm256_shuffle_ps(a, b, 0xdd);
  } else {
    v0 = load_cells<AlongRow>(p0, t);
    v1 = load_cells<AlongRow>(p1, t);
  }
}

template <int Step, bool AlongRow, typename scalar_t>
FU_VEC8 void store_pair(scalar_t* p0, scalar_t* p1, int64_t t, vf v0, vf v1) {
  if constexpr (Step == 2 && std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i pairs = _mm256_or_si256(_mm256_srli_epi32(round_bfloat16_bits(v0), 16), round_bfloat16_bits(v1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0 + 2 * t), pairs);
  } else if constexpr (Step == 2) {
    store(p0 + 2 * t, _mm256_unpacklo_ps(v0, v1));
    store(p0 + 2 * t + 8, _mm256_unpackhi_ps(v0, v1));
  } else {
    store_cells<AlongRow>(p0, t, v0);
    store_cells<AlongRow>(p1, t, v1);
  }
}

// A per-channel vector at element t of a line: 8 channels (ChannelStep 1) or the line's one channel (0).
template <int ChannelStep>
FU_VEC8 vf channel_vector(const float* p, int64_t t) {
  return ChannelStep == 1 ? _mm256_loadu_ps(p + t) : _mm256_set1_ps(p[0]);
}

template <int ChannelStep>
FU_VEC8 vf channel_vector(const double* p, int64_t t) {
  if constexpr (ChannelStep == 1) {
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + t + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p + t)));
  } else {
    return _mm256_set1_ps(static_cast<float>(p[0]));
  }
}

// where(m, a, b): a in the lanes where m is all ones, else b.
FU_VEC8 vf where(vf m, vf a, vf b) { return _mm256_blendv_ps(b, a, m); }

// bn_relu's v < 0 ? 0 : v is max(0, v) as vmaxps computes it: (0 > v) ? 0 : v, a NaN v (unordered) passed on.
FU_VEC8 vf bn_relu(vf z, vf scale, vf shift) {
  return _mm256_max_ps(_mm256_setzero_ps(), _mm256_add_ps(_mm256_mul_ps(z, scale), shift));
}

// pool_argmax4's index (as float32) of the windows y[0..3]: without a NaN the first index of the maximum (strictly
// greater values replace it, so ties keep the first, +0 and -0 tie); with one, the last NaN's.
FU_VEC8 vf pool_argmax4(const vf (&y)[4]) {
  const vf max = _mm256_max_ps(_mm256_max_ps(y[0], y[1]), _mm256_max_ps(y[2], y[3]));
  vf idx = _mm256_set1_ps(3.0f);
  for (int k = 2; k >= 0; --k)
    idx = where(_mm256_cmp_ps(y[k], max, _CMP_EQ_OQ), _mm256_set1_ps(static_cast<float>(k)), idx);
  for (int k = 0; k < 4; ++k)
    idx = where(_mm256_cmp_ps(y[k], y[k], _CMP_UNORD_Q), _mm256_set1_ps(static_cast<float>(k)), idx);
  return idx;
}

// window_dy: the gradients reaching the pre-ReLU values of 8 windows (relu_pool_dy per pixel).
template <bool Pool>
FU_VEC8 void window_dy(const vf (&y)[4], const vf (&g)[4], vf pooled_grad, vf (&dy)[4]) {
  const vf argmax = Pool ? pool_argmax4(y) : _mm256_set1_ps(-1.0f);
  for (int k = 0; k < 4; ++k) {
    const vf positive = _mm256_cmp_ps(y[k], _mm256_setzero_ps(), _CMP_GT_OQ);
    dy[k] = _mm256_and_ps(positive, g[k]);
    if constexpr (Pool) {
      const vf routed = _mm256_and_ps(positive, _mm256_add_ps(g[k], pooled_grad));
      dy[k] = where(_mm256_cmp_ps(_mm256_set1_ps(static_cast<float>(k)), argmax, _CMP_EQ_OQ), routed, dy[k]);
    }
  }
}

FU_VEC8 vf bn_backward_dz(vf dy, vf z, vf mean, vf invstd, vf scale, vf sum_dy, vf sum_dy_xmu, vf inv_m) {
  const vf proj = _mm256_mul_ps(
      _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(z, mean), invstd), invstd), sum_dy_xmu), inv_m);
  return _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_sub_ps(dy, _mm256_mul_ps(sum_dy, inv_m)), proj));
}

#undef FU_VEC8

}  // namespace fastunet::cpu::vec8
#endif
