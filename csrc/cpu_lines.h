// The CPU kernels' inner loops: the interior cells of one cell row as "lines", loops over the tensors' contiguous
// dimension that the compiler vectorizes (no branches, compile-time steps, restrict pointers).
//
// A line runs along the dimension every tensor of an op has unit stride in:
//   LineDim::Channels  (channels_last): the C channels of one cell, every pointer stepping 1;
//   LineDim::Width     (NCHW, concat-buffer slices of it): the cells v_lo..v_hi-1 of one channel; logical
//                      pixels (out, grad) step 2, pooled ones 1, z entries 2 (upscale 1) or 1 (upscale 2).
// Cells with a pixel outside the image (odd sizes, the border grid of the backward ops), tensors with neither
// unit stride and float64 (CpuBackend::kLines, ops.cpp) take the per-cell functions of fastunet_math.h, which the
// line loops compute the same math as: the same per-element functions (bn_relu, pool_argmax4, relu_pool_dy,
// bn_backward_dz), in the same order, so the elementwise ops give the same bits either way.
// bfloat16 and float16 lines load the 16-bit values, widen them to float32, compute in float32 and round once on
// store (to nearest even, as c10's conversions), as ATen's Vectorized does: the conversions (widen, narrow) work
// on the raw bits without branches, so that the loops vectorize (c10's float16 conversion is not inlined there).
// The reductions' sums are in double, in a fixed order that depends on the shapes only.
// Along the width a line spans the interior cell rows of a (sample, channel) plane (LineStart::rows): the backward
// lines run its whole cells of 8 in cpu_vec8.h's AVX2 intrinsics where the CPU has AVX2 and F16C (LineIsa), the
// other ops and the portable loops a row at a time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "cpu_vec8.h"
#include "fastunet_math.h"

// The loops are compiled twice on x86-64 Linux (GCC, Clang): for AVX2 and for the baseline, the one the CPU runs
// picked at load time (an ifunc). With FMA contraction off (-ffp-contract=off) both give the same bits. An AVX-512
// clone made the short NCHW lines (2 x 256 x 32^2) 1.2-1.5x slower on a Sapphire Rapids (benchmarks/RESULTS.md).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FASTUNET_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#include <immintrin.h>
#else
#define FASTUNET_CPU_CLONES
#endif

namespace fastunet::cpu {

// An element of a line in float32: float32 as it is, bfloat16 and float16 widened (exactly).
__attribute__((always_inline)) inline float widen(float v) { return v; }

__attribute__((always_inline)) inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

__attribute__((always_inline)) inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// All ones where c holds, else 0; pick(m, a, b): a where m is all ones, b where 0. Selects in this form stay
// selects: from the ternary operator, GCC makes branches of the float16 conversions (then left scalar).
__attribute__((always_inline)) inline uint32_t mask_of(bool c) { return 0u - static_cast<uint32_t>(c); }

__attribute__((always_inline)) inline uint32_t pick(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }

// bfloat16 is the upper half of a float32.
__attribute__((always_inline)) inline float widen(c10::BFloat16 v) { return bits_to_float(uint32_t(v.x) << 16); }

// float16 (1 sign, 5 exponent, 10 mantissa bits): normal numbers, infinities and NaNs move their exponent field
// over by 13 bits and re-bias it (maximal exponent to maximal); subnormals are their mantissa times 2^-24.
__attribute__((always_inline)) inline float widen(c10::Half v) {
  const uint32_t sign = uint32_t(v.x & 0x8000u) << 16, magnitude = v.x & 0x7fffu;
  const uint32_t normal =
      (magnitude << 13) + ((127u - 15u) << 23) + (mask_of(magnitude >= 0x7c00u) & ((128u - 16u) << 23));
  const uint32_t subnormal = float_to_bits(static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f);
  return bits_to_float(sign | pick(mask_of(magnitude >= 0x0400u), normal, subnormal));
}

// A float32 rounded to scalar_t, to nearest even (NaN to c10's NaN: bfloat16 0x7fc0, float16 0x7e00 with the sign).
template <typename scalar_t>
scalar_t narrow(float v);

template <>
__attribute__((always_inline)) inline float narrow<float>(float v) {
  return v;
}

template <>
__attribute__((always_inline)) inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(pick(mask_of(v != v), 0x7fc0u, rounded)), c10::BFloat16::from_bits());
}

// Magnitudes from 2^-14 (float16's least normal) drop 13 mantissa bits, rounded to nearest even, and re-bias the
// exponent (a carry rounds up into it; from 65520 on it is infinity); smaller ones add 0.5f, whose unit in the
// last place is float16's subnormal step 2^-24, so that the float32 addition rounds them to their subnormal
// mantissa (in the sum's low bits).
template <>
__attribute__((always_inline)) inline c10::Half narrow<c10::Half>(float v) {
  const uint32_t bits = float_to_bits(v), magnitude = bits & 0x7fffffffu;
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t normal = ((magnitude + 0xfffu + ((magnitude >> 13) & 1u)) >> 13) - ((127u - 15u) << 10);
  const uint32_t subnormal = float_to_bits(bits_to_float(magnitude) + 0.5f) - float_to_bits(0.5f);
  uint32_t h = pick(mask_of(magnitude >= 0x38800000u), normal, subnormal);
  h = pick(mask_of(magnitude >= 0x477ff000u), 0x7c00u, h);
  h = pick(mask_of(magnitude > 0x7f800000u), 0x7e00u, h);
  return c10::Half(static_cast<uint16_t>(sign | h), c10::Half::from_bits());
}

// The instruction set of the line loops, picked at load time from the CPU and settable (set_line_isa) so that
// tests run each one on any CPU that has it:
//   Portable: the loops as GCC vectorizes them (target_clones), float16 converted by the bit code above;
//   Avx2:     the backward lines' whole cells of 8 in AVX2 intrinsics (cpu_vec8.h), float16 chunks converted
//             with F16C in AVX2 vectors (GCC does not vectorize the bit code's float16 as well as one
//             vcvtph2ps/vcvtps2ph a vector);
//   Avx512:   as Avx2, the float16 chunks converted in AVX-512 vectors.
enum class LineIsa : int { Portable = 0, Avx2 = 1, Avx512 = 2 };

#if FASTUNET_VEC8
inline bool cpu_has(LineIsa isa) {
  __builtin_cpu_init();
  if (isa == LineIsa::Avx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
  if (isa == LineIsa::Avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return true;
}
#else
inline bool cpu_has(LineIsa isa) { return isa == LineIsa::Portable; }
#endif

inline LineIsa best_line_isa() {
  for (LineIsa isa : {LineIsa::Avx512, LineIsa::Avx2})
    if (cpu_has(isa)) return isa;
  return LineIsa::Portable;
}

inline std::atomic<LineIsa>& line_isa() {
  static std::atomic<LineIsa> isa{best_line_isa()};
  return isa;
}

// Sets the line loops' instruction set (false, nothing changed, where the CPU lacks it).
inline bool set_line_isa(LineIsa isa) {
  if (!cpu_has(isa)) return false;
  line_isa().store(isa);
  return true;
}

// Whether the backward lines run their whole cells of 8 in cpu_vec8.h's intrinsics.
inline bool vec8_lines() {
#if FASTUNET_VEC8
  return line_isa().load(std::memory_order_relaxed) != LineIsa::Portable;
#else
  return false;
#endif
}

FASTUNET_CPU_CLONES inline void widen_half_bits(int64_t n, const c10::Half* __restrict__ src, float* __restrict__ dst) {
  for (int64_t t = 0; t < n; ++t) dst[t] = widen(src[t]);
}

FASTUNET_CPU_CLONES inline void narrow_half_bits(int64_t n, const float* __restrict__ src,
                                                 c10::Half* __restrict__ dst) {
  for (int64_t t = 0; t < n; ++t) dst[t] = narrow<c10::Half>(src[t]);
}

#if FASTUNET_VEC8
using vec8::c10_nan;

// The last n % 8 elements go through a zero-padded vector (no scalar code: one rounding path for all).
__attribute__((target("avx2,f16c"))) inline void widen_half_avx2(int64_t n, const c10::Half* src, float* dst) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    _mm256_storeu_ps(dst + t, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + t))));
  if (t == n) return;
  uint16_t h[8] = {};
  float f[8];
  std::memcpy(h, src + t, (n - t) * sizeof(uint16_t));
  _mm256_storeu_ps(f, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))));
  std::memcpy(dst + t, f, (n - t) * sizeof(float));
}

__attribute__((target("avx2,f16c"))) inline void narrow_half_avx2(int64_t n, const float* src, c10::Half* dst) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + t),
                     c10_nan(_mm256_cvtps_ph(_mm256_loadu_ps(src + t), _MM_FROUND_TO_NEAREST_INT)));
  if (t == n) return;
  float f[8] = {};
  uint16_t h[8];
  std::memcpy(f, src + t, (n - t) * sizeof(float));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h),
                   c10_nan(_mm256_cvtps_ph(_mm256_loadu_ps(f), _MM_FROUND_TO_NEAREST_INT)));
  std::memcpy(dst + t, h, (n - t) * sizeof(uint16_t));
}

__attribute__((target("avx512f,avx2,f16c"))) inline void widen_half_avx512(int64_t n, const c10::Half* src,
                                                                           float* dst) {
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    _mm512_storeu_ps(dst + t, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + t))));
  widen_half_avx2(n - t, src + t, dst + t);
}

__attribute__((target("avx512f,avx2,f16c"))) inline void narrow_half_avx512(int64_t n, const float* src,
                                                                            c10::Half* dst) {
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t),
                        c10_nan(_mm512_cvtps_ph(_mm512_loadu_ps(src + t), _MM_FROUND_TO_NEAREST_INT)));
  narrow_half_avx2(n - t, src + t, dst + t);
}
#endif

// n contiguous float16 values widened to float32, and back (rounded as narrow<c10::Half>), with the conversions
// of line_isa().
inline void widen_half(int64_t n, const c10::Half* src, float* dst) {
#if FASTUNET_VEC8
  switch (line_isa().load(std::memory_order_relaxed)) {
    case LineIsa::Avx512:
      return widen_half_avx512(n, src, dst);
    case LineIsa::Avx2:
      return widen_half_avx2(n, src, dst);
    case LineIsa::Portable:
      break;
  }
#endif
  widen_half_bits(n, src, dst);
}

inline void narrow_half(int64_t n, const float* src, c10::Half* dst) {
#if FASTUNET_VEC8
  switch (line_isa().load(std::memory_order_relaxed)) {
    case LineIsa::Avx512:
      return narrow_half_avx512(n, src, dst);
    case LineIsa::Avx2:
      return narrow_half_avx2(n, src, dst);
    case LineIsa::Portable:
      break;
  }
#endif
  narrow_half_bits(n, src, dst);
}

// BN+ReLU of one z value rounded through scalar_t: bn_relu_rounded with the line's conversions.
template <typename scalar_t>
__attribute__((always_inline)) inline float bn_relu_line(float z, float scale, float shift) {
  return widen(narrow<scalar_t>(bn_relu<float>(z, scale, shift)));
}

// The activation a backward line recomputes from z: BN+ReLU rounded through scalar_t; without Affine (scale 1 and
// shift 0 in every channel: exact mode's ReLU and max-pool of ATen's BN output, z already in scalar_t) z itself.
// That gives the same gradients: ReLU passes z > 0 as y > 0; a window whose max is positive has the same argmax in z
// as in relu(z); one whose max is not positive routes nothing, its argmax failing the ReLU mask.
template <typename scalar_t, bool Affine>
__attribute__((always_inline)) inline float line_activation(float z, float scale, float shift) {
  if constexpr (Affine) {
    return bn_relu_line<scalar_t>(z, scale, shift);
  } else {
    return z;
  }
}

enum class LineDim { Channels, Width, Strided };

// The line dimension of an op's tensors (null strides: a tensor the op does not have).
inline LineDim line_dim(std::initializer_list<const Strides4*> strides) {
  bool channels = true, width = true;
  for (const Strides4* s : strides) {
    if (s == nullptr) continue;
    channels = channels && s->c == 1;
    width = width && s->w == 1;
  }
  return channels ? LineDim::Channels : width ? LineDim::Width : LineDim::Strided;
}

// The compile-time steps of a line: of z-like tensors (z, dz), of logical-output-like ones (out, grad), of the
// per-channel vectors (1 along channels, 0 along a row of one channel). Pooled tensors step 1 on both kinds.
template <int ZStep, int OutStep, int ChannelStep>
struct Steps {
  static constexpr int z = ZStep, out = OutStep, channel = ChannelStep;
};
using ChannelSteps = Steps<1, 1, 1>;
template <int64_t S>
using WidthSteps = Steps<S == 1 ? 2 : 1, 2, 0>;

// Element t of the odd-column pixel (k = 1, 3) of a line, given the even one's pointer and its own. Along the width
// a tensor that steps 2 has each odd pixel right after its even one: read and written through the even pointer,
// GCC sees one interleaved group and vectorizes it with shuffles (through two strided pointers it stores the
// elements one by one). Other steps use the pixel's own pointer.
template <int Step, typename T>
__attribute__((always_inline)) inline T& odd_pixel(T* even, T* odd, int64_t t) {
  if constexpr (Step == 2) {
    return even[2 * t + 1];
  } else {
    return odd[t * Step];
  }
}

// Pointers to the 4 pixels of a line's first cell (k = 2*dy + dx) in one tensor.
template <typename T>
struct Quad {
  T* p[4];
};

// Where a line starts and how long it is: cells (n, u, v0 ..) of channel c0 (Width), or channels c0 .. of cell
// (n, u, v0) (Channels).
// Along the width a line may span `rows` consecutive cell rows u.. (the same cells of each: a plane's interior).
struct LineStart {
  int64_t n, u, v0, c0, length;
  int64_t rows = 1;
};

// Calls f(row) with each cell row of a line as a line of its own.
template <typename F>
void for_each_row(const LineStart& l, const F& f) {
  for (int64_t i = 0; i < l.rows; ++i) f(LineStart{l.n, l.u + i, l.v0, l.c0, l.length});
}

// How far, in elements, each tensor of a backward line moves from one cell row to the next.
struct RowSteps {
  int64_t z, out, pooled, dz;
};

inline RowSteps row_steps(const Geom& g, const Strides4& zs, const Strides4& gs, const Strides4& gps,
                          const Strides4& ds) {
  return RowSteps{g.S == 2 ? zs.h : 2 * zs.h, 2 * gs.h, gps.h, g.S == 2 ? ds.h : 2 * ds.h};
}

template <typename T>
void next_row(Quad<T>& q, int64_t step) {
  for (int k = 0; k < 4; ++k) q.p[k] += step;
}

template <typename T>
Quad<T> z_quad(T* base, const Geom& g, const Strides4& s, const LineStart& l) {
  Quad<T> q;
  for (int k = 0; k < 4; ++k) q.p[k] = base + cell_z_offset(g, s, l.n, l.u, l.v0, k, l.c0);
  return q;
}

template <typename T>
Quad<T> out_quad(T* base, const Strides4& s, const LineStart& l) {
  Quad<T> q;
  for (int k = 0; k < 4; ++k) q.p[k] = base + cell_out_offset(s, l.n, l.u, l.v0, k, l.c0);
  return q;
}

// The reductions' lines of 16-bit tensors are widened to float32 a chunk at a time, then summed by the float32
// loops (their 8 double partial sums along the width do not vectorize from 16-bit loads): a plain widening loop
// per tensor, into contiguous buffers.
constexpr int64_t kWidenChunk = 256;

template <int Step, typename scalar_t>
FASTUNET_CPU_CLONES void widen_kernel(int64_t length, const scalar_t* __restrict__ src, float* __restrict__ dst) {
  for (int64_t t = 0; t < length; ++t) dst[t] = widen(src[t * Step]);
}

// Calls sum(t0, n, steps) for the chunks [t0, t0 + n) of a line of `length` elements, n <= kWidenChunk; steps
// those of the widened buffers (contiguous, the channel step of St).
template <typename St, typename F>
void for_each_chunk(int64_t length, const F& sum) {
  for (int64_t t0 = 0; t0 < length; t0 += kWidenChunk)
    sum(t0, std::min(kWidenChunk, length - t0), Steps<1, 1, St::channel>{});
}

// float16 lines go a chunk at a time through contiguous float32 buffers: widen each tensor's chunk (F16C where the
// CPU has it), compute BN+ReLU in float32, round the activations through float16 (narrow and widen back), run the
// op's float32 loop on them, narrow its results. The same math as the other lines, in the same order, so the same
// bits; the conversions, a vector instruction each with F16C, leave the float32 loops.
using HalfBuffer = c10::Half[kWidenChunk];
using FloatQuad = float[4][kWidenChunk];

// A row's pixel pairs split into their even and odd pixels, and back: one pass over both (see odd_pixel).
FASTUNET_CPU_CLONES inline void deinterleave_kernel(int64_t n, const c10::Half* __restrict__ src,
                                                    c10::Half* __restrict__ even, c10::Half* __restrict__ odd) {
  for (int64_t t = 0; t < n; ++t) {
    even[t].x = src[2 * t].x;
    odd[t].x = src[2 * t + 1].x;
  }
}

FASTUNET_CPU_CLONES inline void interleave_kernel(int64_t n, const c10::Half* __restrict__ even,
                                                  const c10::Half* __restrict__ odd, c10::Half* __restrict__ dst) {
  for (int64_t t = 0; t < n; ++t) {
    dst[2 * t].x = even[t].x;
    dst[2 * t + 1].x = odd[t].x;
  }
}

// The chunk [t0, t0 + n) of a line's 4 pixels widened into dst[k]: elements q.p[k][t * Step], Step 1 or 2 (then
// pixel k + 1 of an even k follows pixel k in memory).
template <int Step>
void widen_quad(int64_t n, const Quad<const c10::Half>& q, int64_t t0, FloatQuad& dst) {
  static_assert(Step == 1 || Step == 2);
  if constexpr (Step == 1) {
    for (int k = 0; k < 4; ++k) widen_half(n, q.p[k] + t0, dst[k]);
  } else {
    HalfBuffer even, odd;
    for (int k = 0; k < 4; k += 2) {
      deinterleave_kernel(n, q.p[k] + 2 * t0, even, odd);
      widen_half(n, even, dst[k]);
      widen_half(n, odd, dst[k + 1]);
    }
  }
}

// The chunk's 16-bit values h[k] stored into a line's 4 pixels (as widen_quad reads them).
template <int Step>
void store_quad(int64_t n, const c10::Half (&h)[4][kWidenChunk], const Quad<c10::Half>& q, int64_t t0) {
  static_assert(Step == 1 || Step == 2);
  for (int k = 0; k < 4; k += 2) {
    if constexpr (Step == 1) {
      std::copy_n(h[k], n, q.p[k] + t0);
      std::copy_n(h[k + 1], n, q.p[k + 1] + t0);
    } else {
      interleave_kernel(n, h[k], h[k + 1], q.p[k] + 2 * t0);
    }
  }
}

// src[k] narrowed into the chunk [t0, t0 + n) of a line's 4 pixels.
template <int Step>
void narrow_quad(int64_t n, const FloatQuad& src, const Quad<c10::Half>& q, int64_t t0) {
  if constexpr (Step == 1) {
    for (int k = 0; k < 4; ++k) narrow_half(n, src[k], q.p[k] + t0);
  } else {
    c10::Half h[4][kWidenChunk];
    for (int k = 0; k < 4; ++k) narrow_half(n, src[k], h[k]);
    store_quad<Step>(n, h, q, t0);
  }
}

// y[k][t] = bn_relu(z[k][t]) with the channel's scale and shift, not yet rounded.
template <typename St>
FASTUNET_CPU_CLONES void bn_relu_chunk_kernel(int64_t n, const FloatQuad& __restrict__ z,
                                              const float* __restrict__ scale, const float* __restrict__ shift,
                                              FloatQuad& __restrict__ y) {
  for (int64_t t = 0; t < n; ++t) {
    const float sc = scale[t * St::channel], sh = shift[t * St::channel];
    for (int k = 0; k < 4; ++k) y[k][t] = bn_relu<float>(z[k][t], sc, sh);
  }
}

// Rounds y through float16 in place; the float16 values into h.
inline void round_half(int64_t n, float* y, c10::Half* h) {
  narrow_half(n, y, h);
  widen_half(n, h, y);
}

// The chunk [t0, t0 + n) of a float16 line: z widened into zb, and the activations: y in yb (rounded through
// float16), or without Affine z itself (line_activation), zb. Returns the activations' buffer.
template <typename St, bool Affine = true>
const FloatQuad& half_activations(const Quad<const c10::Half>& z, const float* scale, const float* shift, int64_t t0,
                                  int64_t n, FloatQuad& zb, FloatQuad& yb) {
  widen_quad<St::z>(n, z, t0, zb);
  if constexpr (!Affine) return zb;
  const int64_t c = t0 * St::channel;
  bn_relu_chunk_kernel<Steps<1, 1, St::channel>>(n, zb, scale + c, shift + c, yb);
  HalfBuffer h;
  for (int k = 0; k < 4; ++k) round_half(n, yb[k], h);
  return yb;
}

FASTUNET_CPU_CLONES inline void pool_chunk_kernel(int64_t n, const FloatQuad& __restrict__ y,
                                                  float* __restrict__ best) {
  for (int64_t t = 0; t < n; ++t) {
    const float v[4] = {y[0][t], y[1][t], y[2][t], y[3][t]};
    float b;
    pool_argmax4<float>(v, &b);
    best[t] = b;
  }
}

// The loops proper take every pointer as a restrict parameter (what lets GCC vectorize them without alias checks).
template <typename St, typename scalar_t, typename acc_t, bool Pool>
FASTUNET_CPU_CLONES void bn_relu_pool_kernel(int64_t length, const scalar_t* __restrict__ z0,
                                             const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                                             const scalar_t* __restrict__ z3, const acc_t* __restrict__ scale,
                                             const acc_t* __restrict__ shift, scalar_t* __restrict__ o0,
                                             scalar_t* __restrict__ o1, scalar_t* __restrict__ o2,
                                             scalar_t* __restrict__ o3, scalar_t* __restrict__ pooled) {
  for (int64_t t = 0; t < length; ++t) {
    const acc_t sc = scale[t * St::channel], sh = shift[t * St::channel];
    const acc_t y[4] = {bn_relu_line<scalar_t>(widen(z0[t * St::z]), sc, sh),
                        bn_relu_line<scalar_t>(widen(odd_pixel<St::z>(z0, z1, t)), sc, sh),
                        bn_relu_line<scalar_t>(widen(z2[t * St::z]), sc, sh),
                        bn_relu_line<scalar_t>(widen(odd_pixel<St::z>(z2, z3, t)), sc, sh)};
    o0[t * St::out] = narrow<scalar_t>(y[0]);
    odd_pixel<St::out>(o0, o1, t) = narrow<scalar_t>(y[1]);
    o2[t * St::out] = narrow<scalar_t>(y[2]);
    odd_pixel<St::out>(o2, o3, t) = narrow<scalar_t>(y[3]);
    if constexpr (Pool) {
      acc_t best;
      pool_argmax4<acc_t>(y, &best);
      pooled[t] = narrow<scalar_t>(best);
    }
  }
}

// bn_relu_pool over a line (cell_bn_relu_pool per element).
template <typename St, typename scalar_t, typename acc_t, bool Pool>
void bn_relu_pool_line(const BnReluPoolCells<scalar_t, acc_t>& f, const LineStart& l) {
  const Quad<const scalar_t> z = z_quad(f.t.z, f.g, f.t.zs, l);
  const Quad<scalar_t> out = out_quad(f.out, f.os, l);
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    scalar_t* pooled = Pool ? f.pooled + f.ps.at(l.n, l.c0, l.u, l.v0) : nullptr;
    FloatQuad zb, yb;
    float best[kWidenChunk];
    c10::Half h[4][kWidenChunk];
    for_each_chunk<St>(l.length, [&](int64_t t0, int64_t n, auto) {
      widen_quad<St::z>(n, z, t0, zb);
      const int64_t c = l.c0 + t0 * St::channel;
      bn_relu_chunk_kernel<Steps<1, 1, St::channel>>(n, zb, f.scale + c, f.shift + c, yb);
      if constexpr (St::out == 1) {  // out narrowed; with Pool, yb rounded through it
        for (int k = 0; k < 4; ++k) {
          narrow_half(n, yb[k], out.p[k] + t0);
          if (Pool) widen_half(n, out.p[k] + t0, yb[k]);
        }
      } else {
        for (int k = 0; k < 4; ++k) {
          narrow_half(n, yb[k], h[k]);
          if (Pool) widen_half(n, h[k], yb[k]);
        }
        store_quad<St::out>(n, h, out, t0);
      }
      if constexpr (Pool) {
        pool_chunk_kernel(n, yb, best);
        narrow_half(n, best, pooled + t0);
      }
    });
    return;
  }
  bn_relu_pool_kernel<St, scalar_t, acc_t, Pool>(l.length, z.p[0], z.p[1], z.p[2], z.p[3], f.scale + l.c0,
                                                 f.shift + l.c0, out.p[0], out.p[1], out.p[2], out.p[3],
                                                 Pool ? f.pooled + f.ps.at(l.n, l.c0, l.u, l.v0) : nullptr);
}

// The gradients reaching the pre-ReLU values of a window with activations y, output gradients g and pooled
// gradient pg (cell_relu_pool_dy).
template <typename acc_t, bool Pool>
__attribute__((always_inline)) inline void window_dy(const acc_t (&y)[4], const acc_t (&g)[4], acc_t pg,
                                                     acc_t (&dy)[4]) {
  const acc_t argmax = Pool ? pool_argmax4<acc_t, acc_t>(y) : acc_t(-1);
  for (int k = 0; k < 4; ++k) dy[k] = relu_pool_dy<acc_t, acc_t>(y[k], g[k], acc_t(k), argmax, pg);
}

// Element t of a backward line: the z values (zv) and the gradients reaching their pre-ReLU values (dy), as
// cell_relu_pool_dy computes them, the activations rounded through round_t (the tensors' dtype; scalar_t is
// float32 where a reduction reads widened copies of 16-bit tensors). Always inlined: GCC leaves a plain inline
// call in the target_clones copies of the loops below, which then stay scalar.
template <typename St, typename scalar_t, typename acc_t, bool Pool, typename round_t = scalar_t, bool Affine = true>
__attribute__((always_inline)) inline void relu_pool_dy_at(int64_t t, const scalar_t* z0, const scalar_t* z1,
                                                           const scalar_t* z2, const scalar_t* z3, const scalar_t* g0,
                                                           const scalar_t* g1, const scalar_t* g2, const scalar_t* g3,
                                                           const scalar_t* grad_pooled, acc_t sc, acc_t sh,
                                                           acc_t (&zv)[4], acc_t (&dy)[4]) {
  zv[0] = widen(z0[t * St::z]);
  zv[1] = widen(odd_pixel<St::z>(z0, z1, t));
  zv[2] = widen(z2[t * St::z]);
  zv[3] = widen(odd_pixel<St::z>(z2, z3, t));
  const acc_t y[4] = {line_activation<round_t, Affine>(zv[0], sc, sh), line_activation<round_t, Affine>(zv[1], sc, sh),
                      line_activation<round_t, Affine>(zv[2], sc, sh), line_activation<round_t, Affine>(zv[3], sc, sh)};
  const acc_t g[4] = {widen(g0[t * St::out]), widen(odd_pixel<St::out>(g0, g1, t)), widen(g2[t * St::out]),
                      widen(odd_pixel<St::out>(g2, g3, t))};
  window_dy<acc_t, Pool>(y, g, Pool ? widen(grad_pooled[t]) : acc_t(0), dy);
}

// Element t of a float16 line's chunk (half_activations): its z values, activations and gradients.
template <bool Pool>
__attribute__((always_inline)) inline void chunk_dy_at(int64_t t, const FloatQuad& z, const FloatQuad& y,
                                                       const FloatQuad& g, const float* grad_pooled, float (&zv)[4],
                                                       float (&dy)[4]) {
  const float yv[4] = {y[0][t], y[1][t], y[2][t], y[3][t]}, gv[4] = {g[0][t], g[1][t], g[2][t], g[3][t]};
  for (int k = 0; k < 4; ++k) zv[k] = z[k][t];
  window_dy<float, Pool>(yv, gv, Pool ? grad_pooled[t] : 0.0f, dy);
}

// The BN vectors of z_grad_kernel (unread without Bn).
template <typename acc_t>
struct BnLine {
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ invstd;
  const acc_t* __restrict__ sum_dy;
  const acc_t* __restrict__ sum_dy_xmu;
  acc_t inv_m;
};

#if FASTUNET_VEC8
// relu_pool_dy_at for the 8 cells t..t+7 of a line (float32 arithmetic for every dtype): their z values and the
// gradients reaching their pre-ReLU values.
template <typename St, typename scalar_t, bool Pool, bool Affine>
__attribute__((target("avx2,f16c"), always_inline)) inline void relu_pool_dy_vec8(
    int64_t t, const Quad<const scalar_t>& zq, const Quad<const scalar_t>& gq, const scalar_t* grad_pooled,
    const float* scale, const float* shift, vec8::vf (&z)[4], vec8::vf (&dy)[4]) {
  using namespace vec8;
  constexpr bool row = St::channel == 0;
  vf g[4], y[4];
  load_pair<St::z, row>(zq.p[0], zq.p[1], t, z[0], z[1]);
  load_pair<St::z, row>(zq.p[2], zq.p[3], t, z[2], z[3]);
  load_pair<St::out, row>(gq.p[0], gq.p[1], t, g[0], g[1]);
  load_pair<St::out, row>(gq.p[2], gq.p[3], t, g[2], g[3]);
  const vf sc = channel_vector<St::channel>(scale, t), sh = channel_vector<St::channel>(shift, t);
  for (int k = 0; k < 4; ++k) y[k] = Affine ? round_through<scalar_t>(bn_relu(z[k], sc, sh)) : z[k];
  window_dy<Pool>(y, g, Pool ? load_cells<row>(grad_pooled, t) : _mm256_setzero_ps(), dy);
}

// z_grad_kernel over the cells [0, length) of `rows` cell rows, length a multiple of 8.
template <typename St, typename scalar_t, bool Pool, bool Bn, bool Affine>
__attribute__((target("avx2,f16c"))) void z_grad_vec8(int64_t rows, int64_t length, Quad<const scalar_t> z,
                                                      Quad<const scalar_t> g, const scalar_t* grad_pooled,
                                                      const float* scale, const float* shift, const BnLine<float> bn,
                                                      Quad<scalar_t> d, const RowSteps step) {
  using namespace vec8;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t t = 0; t < length; t += 8) {
      vf zv[4], dy[4], dz[4];
      relu_pool_dy_vec8<St, scalar_t, Pool, Affine>(t, z, g, grad_pooled, scale, shift, zv, dy);
      if constexpr (Bn) {
        const vf mean = channel_vector<St::channel>(bn.mean, t), invstd = channel_vector<St::channel>(bn.invstd, t);
        const vf sc = channel_vector<St::channel>(scale, t), sum_dy = channel_vector<St::channel>(bn.sum_dy, t);
        const vf sum_dy_xmu = channel_vector<St::channel>(bn.sum_dy_xmu, t), inv_m = _mm256_set1_ps(bn.inv_m);
        for (int k = 0; k < 4; ++k) dz[k] = bn_backward_dz(dy[k], zv[k], mean, invstd, sc, sum_dy, sum_dy_xmu, inv_m);
      } else {
        for (int k = 0; k < 4; ++k) dz[k] = dy[k];
      }
      store_pair<St::z, St::channel == 0>(d.p[0], d.p[1], t, dz[0], dz[1]);
      store_pair<St::z, St::channel == 0>(d.p[2], d.p[3], t, dz[2], dz[3]);
    }
    next_row(z, step.z);
    next_row(g, step.out);
    next_row(d, step.dz);
    if (Pool) grad_pooled += step.pooled;
  }
}

// backward_sums_kernel over the cells [0, length) of `rows` cell rows, length a multiple of 8: along channels each
// channel's 4 pixels summed in float32, then added to its double sums; along a row 8 float32 lanes of partial sums,
// added to 8 double lanes at the row's end, and those to the double sums in lane order at the end.
template <typename St, typename scalar_t, bool Pool>
__attribute__((target("avx2,f16c"))) void backward_sums_vec8(int64_t rows, int64_t length, Quad<const scalar_t> z,
                                                             Quad<const scalar_t> g, const scalar_t* grad_pooled,
                                                             const float* scale, const float* shift, const double* mean,
                                                             double* first, double* second, const RowSteps step) {
  using namespace vec8;
  __m256d lanes[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (int64_t row = 0; row < rows; ++row) {
    vf row_first = _mm256_setzero_ps(), row_second = _mm256_setzero_ps();
    for (int64_t t = 0; t < length; t += 8) {
      vf zv[4], dy[4];
      relu_pool_dy_vec8<St, scalar_t, Pool, true>(t, z, g, grad_pooled, scale, shift, zv, dy);
      const vf mu = channel_vector<St::channel>(mean, t);
      vf a = St::channel == 1 ? _mm256_setzero_ps() : row_first;
      vf b = St::channel == 1 ? _mm256_setzero_ps() : row_second;
      for (int k = 0; k < 4; ++k) {
        a = _mm256_add_ps(a, dy[k]);
        b = _mm256_add_ps(b, _mm256_mul_ps(dy[k], _mm256_sub_ps(zv[k], mu)));
      }
      if constexpr (St::channel == 1) {
        const __m256d sums[4] = {
            _mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)),
            _mm256_cvtps_pd(_mm256_castps256_ps128(b)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1))};
        double* to[4] = {first + t, first + t + 4, second + t, second + t + 4};
        for (int i = 0; i < 4; ++i) _mm256_storeu_pd(to[i], _mm256_add_pd(_mm256_loadu_pd(to[i]), sums[i]));
      } else {
        row_first = a;
        row_second = b;
      }
    }
    if constexpr (St::channel != 1) {
      lanes[0] = _mm256_add_pd(lanes[0], _mm256_cvtps_pd(_mm256_castps256_ps128(row_first)));
      lanes[1] = _mm256_add_pd(lanes[1], _mm256_cvtps_pd(_mm256_extractf128_ps(row_first, 1)));
      lanes[2] = _mm256_add_pd(lanes[2], _mm256_cvtps_pd(_mm256_castps256_ps128(row_second)));
      lanes[3] = _mm256_add_pd(lanes[3], _mm256_cvtps_pd(_mm256_extractf128_ps(row_second, 1)));
    }
    next_row(z, step.z);
    next_row(g, step.out);
    if (Pool) grad_pooled += step.pooled;
  }
  if constexpr (St::channel != 1) {
    double sums[4][4];
    for (int i = 0; i < 4; ++i) _mm256_storeu_pd(sums[i], lanes[i]);
    for (int i = 0; i < 8; ++i) {
      first[0] += sums[i / 4][i % 4];
      second[0] += sums[2 + i / 4][i % 4];
    }
  }
}
#endif

// The cells of a line from its k-th on.
template <typename St>
LineStart line_from(const LineStart& l, int64_t k) {
  return St::channel == 1 ? LineStart{l.n, l.u, l.v0, l.c0 + k, l.length - k, l.rows}
                          : LineStart{l.n, l.u, l.v0 + k, l.c0, l.length - k, l.rows};
}

template <typename St, typename scalar_t, typename acc_t, bool Pool, bool Bn, bool Affine>
FASTUNET_CPU_CLONES void z_grad_kernel(int64_t length, const scalar_t* __restrict__ z0, const scalar_t* __restrict__ z1,
                                       const scalar_t* __restrict__ z2, const scalar_t* __restrict__ z3,
                                       const scalar_t* __restrict__ g0, const scalar_t* __restrict__ g1,
                                       const scalar_t* __restrict__ g2, const scalar_t* __restrict__ g3,
                                       const scalar_t* __restrict__ grad_pooled, const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift, const BnLine<acc_t> bn,
                                       scalar_t* __restrict__ d0, scalar_t* __restrict__ d1, scalar_t* __restrict__ d2,
                                       scalar_t* __restrict__ d3) {
  for (int64_t t = 0; t < length; ++t) {
    const int64_t c = t * St::channel;
    const acc_t sc = scale[c];
    acc_t zv[4], dy[4], d[4];
    relu_pool_dy_at<St, scalar_t, acc_t, Pool, scalar_t, Affine>(t, z0, z1, z2, z3, g0, g1, g2, g3, grad_pooled, sc,
                                                                 shift[c], zv, dy);
    for (int k = 0; k < 4; ++k)
      d[k] = Bn ? bn_backward_dz<acc_t>(dy[k], zv[k], bn.mean[c], bn.invstd[c], sc, bn.sum_dy[c], bn.sum_dy_xmu[c],
                                        bn.inv_m)
                : dy[k];
    d0[t * St::z] = narrow<scalar_t>(d[0]);
    odd_pixel<St::z>(d0, d1, t) = narrow<scalar_t>(d[1]);
    d2[t * St::z] = narrow<scalar_t>(d[2]);
    odd_pixel<St::z>(d2, d3, t) = narrow<scalar_t>(d[3]);
  }
}

template <typename St, bool Pool, bool Bn>
FASTUNET_CPU_CLONES void z_grad_chunk_kernel(int64_t n, const FloatQuad& __restrict__ z,
                                             const FloatQuad& __restrict__ y, const FloatQuad& __restrict__ g,
                                             const float* __restrict__ grad_pooled, const float* __restrict__ scale,
                                             const BnLine<float> bn, FloatQuad& __restrict__ d) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t c = t * St::channel;
    float zv[4], dy[4];
    chunk_dy_at<Pool>(t, z, y, g, grad_pooled, zv, dy);
    for (int k = 0; k < 4; ++k)
      d[k][t] = Bn ? bn_backward_dz<float>(dy[k], zv[k], bn.mean[c], bn.invstd[c], scale[c], bn.sum_dy[c],
                                           bn.sum_dy_xmu[c], bn.inv_m)
                   : dy[k];
  }
}

// The chunks' output gradients and pooled gradients widened (pooled ones only with Pool).
template <typename St, bool Pool>
void widen_gradients(const Quad<const c10::Half>& g, const c10::Half* grad_pooled, int64_t t0, int64_t n, FloatQuad& gb,
                     float* pb) {
  widen_quad<St::out>(n, g, t0, gb);
  if (Pool) widen_half(n, grad_pooled + t0, pb);
}

// relu_pool_backward (Bn false) or bn_relu_backward_apply (Bn true) over a line in the portable loops (cell_z_grad
// per element); Affine false where scale and shift are 1 and 0 (line_activation).
template <typename St, typename scalar_t, typename acc_t, bool Pool, bool Bn, bool Affine>
void z_grad_line_portable(const ZGradCells<scalar_t, acc_t>& f, const LineStart& l) {
  const Quad<const scalar_t> z = z_quad(f.t.z, f.g, f.t.zs, l);
  const Quad<const scalar_t> g = out_quad(f.t.grad, f.t.gs, l);
  const Quad<scalar_t> d = z_quad(f.dz, f.g, f.ds, l);
  const BnLine<acc_t> bn{Bn ? f.bn.mean + l.c0 : nullptr, Bn ? f.bn.invstd + l.c0 : nullptr,
                         Bn ? f.bn.sum_dy + l.c0 : nullptr, Bn ? f.bn.sum_dy_xmu + l.c0 : nullptr, f.bn.inv_m};
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    const scalar_t* grad_pooled = Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr;
    FloatQuad zb, yb, gb, db;
    float pb[kWidenChunk];
    for_each_chunk<St>(l.length, [&](int64_t t0, int64_t n, auto steps) {
      const FloatQuad& y = half_activations<St, Affine>(z, f.scale + l.c0, f.shift + l.c0, t0, n, zb, yb);
      widen_gradients<St, Pool>(g, grad_pooled, t0, n, gb, pb);
      const int64_t c = t0 * St::channel;
      const BnLine<acc_t> bn_chunk{Bn ? bn.mean + c : nullptr, Bn ? bn.invstd + c : nullptr,
                                   Bn ? bn.sum_dy + c : nullptr, Bn ? bn.sum_dy_xmu + c : nullptr, bn.inv_m};
      z_grad_chunk_kernel<decltype(steps), Pool, Bn>(n, zb, y, gb, pb, f.scale + l.c0 + c, bn_chunk, db);
      narrow_quad<St::z>(n, db, d, t0);
    });
    return;
  }
  z_grad_kernel<St, scalar_t, acc_t, Pool, Bn, Affine>(
      l.length, z.p[0], z.p[1], z.p[2], z.p[3], g.p[0], g.p[1], g.p[2], g.p[3],
      Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr, f.scale + l.c0, f.shift + l.c0, bn, d.p[0],
      d.p[1], d.p[2], d.p[3]);
}

// relu_pool_backward (Bn false) or bn_relu_backward_apply (Bn true) over a line of one or more cell rows: its whole
// cells of 8 in vec8 lanes where the line ISA allows, the others (or all) in the portable loops a row at a time.
template <typename St, typename scalar_t, typename acc_t, bool Pool, bool Bn, bool Affine>
void z_grad_line(const ZGradCells<scalar_t, acc_t>& f, const LineStart& l) {
  const auto portable = [&](const LineStart& row) {
    z_grad_line_portable<St, scalar_t, acc_t, Pool, Bn, Affine>(f, row);
  };
#if FASTUNET_VEC8
  if (const int64_t body = l.length - l.length % 8; body > 0 && vec8_lines()) {
    const BnLine<float> bn{Bn ? f.bn.mean + l.c0 : nullptr, Bn ? f.bn.invstd + l.c0 : nullptr,
                           Bn ? f.bn.sum_dy + l.c0 : nullptr, Bn ? f.bn.sum_dy_xmu + l.c0 : nullptr, f.bn.inv_m};
    z_grad_vec8<St, scalar_t, Pool, Bn, Affine>(
        l.rows, body, z_quad(f.t.z, f.g, f.t.zs, l), out_quad(f.t.grad, f.t.gs, l),
        Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr, f.scale + l.c0, f.shift + l.c0, bn,
        z_quad(f.dz, f.g, f.ds, l), row_steps(f.g, f.t.zs, f.t.gs, f.t.gps, f.ds));
    if (body < l.length) for_each_row(line_from<St>(l, body), portable);
    return;
  }
#endif
  for_each_row(l, portable);
}

// Adds term(t, s1, s2) of elements t < length to two per-channel double sums, the terms first added to partial sums
// in lane_t (double for the statistics; the backward reductions' accumulation type, float for all but float64
// tensors: twice double's vector lanes, where double partials made the 16-bit lines compute-bound). Along channels
// (ChannelStep 1) a partial per element t (its cell's 4 pixels), added to first[t], second[t]; along a row of one
// channel 64 bytes of partials (8 double or 16 float lanes, a vectorizable reduction in a fixed order), added to
// first[0], second[0]. It and its terms are always inlined: GCC leaves calls otherwise (to the default target, in
// the target_clones copies), once the terms round through float16.
template <typename St, typename lane_t, typename Term>
__attribute__((always_inline)) inline void sum_line(int64_t length, const Term& term, double* __restrict__ first,
                                                    double* __restrict__ second) {
  if constexpr (St::channel == 1) {
    for (int64_t t = 0; t < length; ++t) {
      lane_t a = 0, b = 0;
      term(t, a, b);
      first[t] += static_cast<double>(a);
      second[t] += static_cast<double>(b);
    }
  } else {
    constexpr int lanes = 64 / sizeof(lane_t);
    lane_t a[lanes] = {}, b[lanes] = {};
    int64_t t = 0;
    for (; t + lanes <= length; t += lanes)
      for (int i = 0; i < lanes; ++i) term(t + i, a[i], b[i]);
    for (int i = 0; t < length; ++t, ++i) term(t, a[i], b[i]);
    for (int i = 0; i < lanes; ++i) {
      first[0] += static_cast<double>(a[i]);
      second[0] += static_cast<double>(b[i]);
    }
  }
}

template <typename St, typename scalar_t>
FASTUNET_CPU_CLONES void stats_kernel(int64_t length, const scalar_t* __restrict__ z0, const scalar_t* __restrict__ z1,
                                      const scalar_t* __restrict__ z2, const scalar_t* __restrict__ z3,
                                      const double* __restrict__ ref, double* __restrict__ first,
                                      double* __restrict__ second) {
  sum_line<St, double>(
      length,
      [&](int64_t t, double& s1, double& s2) __attribute__((always_inline)) {
        const double r = ref[t * St::channel];
        const double d[4] = {
            static_cast<double>(widen(z0[t * St::z])) - r, static_cast<double>(widen(odd_pixel<St::z>(z0, z1, t))) - r,
            static_cast<double>(widen(z2[t * St::z])) - r, static_cast<double>(widen(odd_pixel<St::z>(z2, z3, t))) - r};
        for (int k = 0; k < 4; ++k) {
          s1 += d[k];
          s2 += d[k] * d[k];
        }
      },
      first, second);
}

// bn_stats over a line (cell_stats_sums per element): ref the channels' shift constants.
template <typename St, typename scalar_t, typename sum_t>
void stats_line(const StatsCells<scalar_t, sum_t>& f, const LineStart& l, const double* ref, double* first,
                double* second) {
  const Quad<const scalar_t> z = z_quad(f.t.z, f.g, f.t.zs, l);
  if constexpr (std::is_same_v<scalar_t, float>) {
    stats_kernel<St, scalar_t>(l.length, z.p[0], z.p[1], z.p[2], z.p[3], ref, first, second);
  } else {
    float zb[4][kWidenChunk];
    for_each_chunk<St>(l.length, [&](int64_t t0, int64_t n, auto steps) {
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {
        widen_quad<St::z>(n, z, t0, zb);
      } else {
        for (int k = 0; k < 4; ++k) widen_kernel<St::z>(n, z.p[k] + t0 * St::z, zb[k]);
      }
      const int64_t c = t0 * St::channel;
      stats_kernel<decltype(steps), float>(n, zb[0], zb[1], zb[2], zb[3], ref + c, first + c, second + c);
    });
  }
}

template <typename St, typename scalar_t, typename acc_t, bool Pool, typename round_t = scalar_t>
FASTUNET_CPU_CLONES void backward_sums_kernel(int64_t length, const scalar_t* __restrict__ z0,
                                              const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
                                              const scalar_t* __restrict__ z3, const scalar_t* __restrict__ g0,
                                              const scalar_t* __restrict__ g1, const scalar_t* __restrict__ g2,
                                              const scalar_t* __restrict__ g3, const scalar_t* __restrict__ grad_pooled,
                                              const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                              const double* __restrict__ mean, double* __restrict__ first,
                                              double* __restrict__ second) {
  sum_line<St, acc_t>(
      length,
      [&](int64_t t, acc_t& s1, acc_t& s2) __attribute__((always_inline)) {
        const int64_t c = t * St::channel;
        acc_t zv[4], dy[4];
        relu_pool_dy_at<St, scalar_t, acc_t, Pool, round_t>(t, z0, z1, z2, z3, g0, g1, g2, g3, grad_pooled, scale[c],
                                                            shift[c], zv, dy);
        const acc_t mu = static_cast<acc_t>(mean[c]);  // exact: the op's mean tensor is acc_t
        for (int k = 0; k < 4; ++k) {
          s1 += dy[k];
          s2 += dy[k] * (zv[k] - mu);
        }
      },
      first, second);
}

template <typename St, bool Pool>
FASTUNET_CPU_CLONES void backward_sums_chunk_kernel(int64_t n, const FloatQuad& __restrict__ z,
                                                    const FloatQuad& __restrict__ y, const FloatQuad& __restrict__ g,
                                                    const float* __restrict__ grad_pooled,
                                                    const double* __restrict__ mean, double* __restrict__ first,
                                                    double* __restrict__ second) {
  sum_line<St, float>(
      n,
      [&](int64_t t, float& s1, float& s2) __attribute__((always_inline)) {
        float zv[4], dy[4];
        chunk_dy_at<Pool>(t, z, y, g, grad_pooled, zv, dy);
        const float mu = static_cast<float>(mean[t * St::channel]);  // exact: the op's mean is float32
        for (int k = 0; k < 4; ++k) {
          s1 += dy[k];
          s2 += dy[k] * (zv[k] - mu);
        }
      },
      first, second);
}

// bn_relu_backward_reduce over a line in the portable loops (cell_backward_sums per element): mean the channels'
// means in double.
template <typename St, typename scalar_t, typename acc_t, typename sum_t, bool Pool>
void backward_sums_line_portable(const BackwardSumCells<scalar_t, acc_t, sum_t>& f, const LineStart& l,
                                 const double* mean, double* first, double* second) {
  const Quad<const scalar_t> z = z_quad(f.t.z, f.g, f.t.zs, l);
  const Quad<const scalar_t> g = out_quad(f.t.grad, f.t.gs, l);
  const scalar_t* grad_pooled = Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr;
  const acc_t *scale = f.scale + l.c0, *shift = f.shift + l.c0;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    FloatQuad zb, yb, gb;
    float pb[kWidenChunk];
    for_each_chunk<St>(l.length, [&](int64_t t0, int64_t n, auto steps) {
      half_activations<St>(z, scale, shift, t0, n, zb, yb);
      widen_gradients<St, Pool>(g, grad_pooled, t0, n, gb, pb);
      const int64_t c = t0 * St::channel;
      backward_sums_chunk_kernel<decltype(steps), Pool>(n, zb, yb, gb, pb, mean + c, first + c, second + c);
    });
  } else if constexpr (std::is_same_v<scalar_t, float> || St::channel == 1) {
    backward_sums_kernel<St, scalar_t, acc_t, Pool>(l.length, z.p[0], z.p[1], z.p[2], z.p[3], g.p[0], g.p[1], g.p[2],
                                                    g.p[3], grad_pooled, scale, shift, mean, first, second);
  } else {
    float zb[4][kWidenChunk], gb[4][kWidenChunk], pb[kWidenChunk];
    for_each_chunk<St>(l.length, [&](int64_t t0, int64_t n, auto steps) {
      for (int k = 0; k < 4; ++k) {
        widen_kernel<St::z>(n, z.p[k] + t0 * St::z, zb[k]);
        widen_kernel<St::out>(n, g.p[k] + t0 * St::out, gb[k]);
      }
      if (Pool) widen_kernel<1>(n, grad_pooled + t0, pb);
      const int64_t c = t0 * St::channel;
      backward_sums_kernel<decltype(steps), float, acc_t, Pool, scalar_t>(n, zb[0], zb[1], zb[2], zb[3], gb[0], gb[1],
                                                                          gb[2], gb[3], pb, scale + c, shift + c,
                                                                          mean + c, first + c, second + c);
    });
  }
}

// bn_relu_backward_reduce over a line of one or more cell rows: its whole cells of 8 in vec8 lanes where the line
// ISA allows, the others (or all) in the portable loops a row at a time. mean, first and second step along
// channels, not along a row.
template <typename St, typename scalar_t, typename acc_t, typename sum_t, bool Pool>
void backward_sums_line(const BackwardSumCells<scalar_t, acc_t, sum_t>& f, const LineStart& l, const double* mean,
                        double* first, double* second) {
  // The portable loops on the rows of a line whose first channel is `k` channels past the line's (0 along a row).
  const auto portable = [&](int64_t k) {
    return [&, k](const LineStart& row) {
      backward_sums_line_portable<St, scalar_t, acc_t, sum_t, Pool>(f, row, mean + k, first + k, second + k);
    };
  };
#if FASTUNET_VEC8
  if (const int64_t body = l.length - l.length % 8; body > 0 && vec8_lines()) {
    backward_sums_vec8<St, scalar_t, Pool>(l.rows, body, z_quad(f.t.z, f.g, f.t.zs, l), out_quad(f.t.grad, f.t.gs, l),
                                           Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr,
                                           f.scale + l.c0, f.shift + l.c0, mean, first, second,
                                           row_steps(f.g, f.t.zs, f.t.gs, f.t.gps, f.t.zs));
    if (body < l.length) for_each_row(line_from<St>(l, body), portable(St::channel * body));
    return;
  }
#endif
  for_each_row(l, portable(0));
}

}  // namespace fastunet::cpu
