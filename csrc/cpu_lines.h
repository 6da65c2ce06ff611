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
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "fastunet_math.h"

// The loops are compiled three times on x86-64 Linux (GCC, Clang): for AVX-512 (x86-64-v4), AVX2 and the baseline,
// the one the CPU runs picked at load time (an ifunc). With FMA contraction off (-ffp-contract=off) all give the same
// bits.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FASTUNET_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
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

// BN+ReLU of one z value rounded through scalar_t: bn_relu_rounded with the line's conversions.
template <typename scalar_t>
__attribute__((always_inline)) inline float bn_relu_line(float z, float scale, float shift) {
  return widen(narrow<scalar_t>(bn_relu<float>(z, scale, shift)));
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

// Pointers to the 4 pixels of a line's first cell (k = 2*dy + dx) in one tensor.
template <typename T>
struct Quad {
  T* p[4];
};

// Where a line starts and how long it is: cells (n, u, v0 ..) of channel c0 (Width), or channels c0 .. of cell
// (n, u, v0) (Channels).
struct LineStart {
  int64_t n, u, v0, c0, length;
};

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
    const acc_t y[4] = {
        bn_relu_line<scalar_t>(widen(z0[t * St::z]), sc, sh), bn_relu_line<scalar_t>(widen(z1[t * St::z]), sc, sh),
        bn_relu_line<scalar_t>(widen(z2[t * St::z]), sc, sh), bn_relu_line<scalar_t>(widen(z3[t * St::z]), sc, sh)};
    o0[t * St::out] = narrow<scalar_t>(y[0]);
    o1[t * St::out] = narrow<scalar_t>(y[1]);
    o2[t * St::out] = narrow<scalar_t>(y[2]);
    o3[t * St::out] = narrow<scalar_t>(y[3]);
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
  bn_relu_pool_kernel<St, scalar_t, acc_t, Pool>(l.length, z.p[0], z.p[1], z.p[2], z.p[3], f.scale + l.c0,
                                                 f.shift + l.c0, out.p[0], out.p[1], out.p[2], out.p[3],
                                                 Pool ? f.pooled + f.ps.at(l.n, l.c0, l.u, l.v0) : nullptr);
}

// Element t of a backward line: the z values (zv) and the gradients reaching their pre-ReLU values (dy), as
// cell_relu_pool_dy computes them, the activations rounded through round_t (the tensors' dtype; scalar_t is
// float32 where a reduction reads widened copies of 16-bit tensors). Always inlined: GCC leaves a plain inline
// call in the target_clones copies of the loops below, which then stay scalar.
template <typename St, typename scalar_t, typename acc_t, bool Pool, typename round_t = scalar_t>
__attribute__((always_inline)) inline void relu_pool_dy_at(int64_t t, const scalar_t* z0, const scalar_t* z1,
                                                           const scalar_t* z2, const scalar_t* z3, const scalar_t* g0,
                                                           const scalar_t* g1, const scalar_t* g2, const scalar_t* g3,
                                                           const scalar_t* grad_pooled, acc_t sc, acc_t sh,
                                                           acc_t (&zv)[4], acc_t (&dy)[4]) {
  zv[0] = widen(z0[t * St::z]);
  zv[1] = widen(z1[t * St::z]);
  zv[2] = widen(z2[t * St::z]);
  zv[3] = widen(z3[t * St::z]);
  const acc_t y[4] = {bn_relu_line<round_t>(zv[0], sc, sh), bn_relu_line<round_t>(zv[1], sc, sh),
                      bn_relu_line<round_t>(zv[2], sc, sh), bn_relu_line<round_t>(zv[3], sc, sh)};
  const acc_t argmax = Pool ? pool_argmax4<acc_t, acc_t>(y) : acc_t(-1);
  const acc_t pg = Pool ? widen(grad_pooled[t]) : acc_t(0);
  dy[0] = relu_pool_dy<acc_t, acc_t>(y[0], widen(g0[t * St::out]), acc_t(0), argmax, pg);
  dy[1] = relu_pool_dy<acc_t, acc_t>(y[1], widen(g1[t * St::out]), acc_t(1), argmax, pg);
  dy[2] = relu_pool_dy<acc_t, acc_t>(y[2], widen(g2[t * St::out]), acc_t(2), argmax, pg);
  dy[3] = relu_pool_dy<acc_t, acc_t>(y[3], widen(g3[t * St::out]), acc_t(3), argmax, pg);
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

template <typename St, typename scalar_t, typename acc_t, bool Pool, bool Bn>
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
    relu_pool_dy_at<St, scalar_t, acc_t, Pool>(t, z0, z1, z2, z3, g0, g1, g2, g3, grad_pooled, sc, shift[c], zv, dy);
    for (int k = 0; k < 4; ++k)
      d[k] = Bn ? bn_backward_dz<acc_t>(dy[k], zv[k], bn.mean[c], bn.invstd[c], sc, bn.sum_dy[c], bn.sum_dy_xmu[c],
                                        bn.inv_m)
                : dy[k];
    d0[t * St::z] = narrow<scalar_t>(d[0]);
    d1[t * St::z] = narrow<scalar_t>(d[1]);
    d2[t * St::z] = narrow<scalar_t>(d[2]);
    d3[t * St::z] = narrow<scalar_t>(d[3]);
  }
}

// relu_pool_backward (Bn false) or bn_relu_backward_apply (Bn true) over a line (cell_z_grad per element).
template <typename St, typename scalar_t, typename acc_t, bool Pool, bool Bn>
void z_grad_line(const ZGradCells<scalar_t, acc_t>& f, const LineStart& l) {
  const Quad<const scalar_t> z = z_quad(f.t.z, f.g, f.t.zs, l);
  const Quad<const scalar_t> g = out_quad(f.t.grad, f.t.gs, l);
  const Quad<scalar_t> d = z_quad(f.dz, f.g, f.ds, l);
  const BnLine<acc_t> bn{Bn ? f.bn.mean + l.c0 : nullptr, Bn ? f.bn.invstd + l.c0 : nullptr,
                         Bn ? f.bn.sum_dy + l.c0 : nullptr, Bn ? f.bn.sum_dy_xmu + l.c0 : nullptr, f.bn.inv_m};
  z_grad_kernel<St, scalar_t, acc_t, Pool, Bn>(l.length, z.p[0], z.p[1], z.p[2], z.p[3], g.p[0], g.p[1], g.p[2], g.p[3],
                                               Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr,
                                               f.scale + l.c0, f.shift + l.c0, bn, d.p[0], d.p[1], d.p[2], d.p[3]);
}

// Adds term(t, s1, s2) of elements t < length to two per-channel sums: into first[t], second[t] along channels
// (ChannelStep 1); along a row of one channel into first[0], second[0], through 8 partial sums (a vectorizable
// reduction in a fixed order). It and its terms are always inlined: GCC leaves calls otherwise (to the default
// target, in the target_clones copies), once the terms round through float16.
template <typename St, typename Term>
__attribute__((always_inline)) inline void sum_line(int64_t length, const Term& term, double* __restrict__ first,
                                                    double* __restrict__ second) {
  if constexpr (St::channel == 1) {
    for (int64_t t = 0; t < length; ++t) term(t, first[t], second[t]);
  } else {
    constexpr int lanes = 8;
    double a[lanes] = {}, b[lanes] = {};
    int64_t t = 0;
    for (; t + lanes <= length; t += lanes)
      for (int i = 0; i < lanes; ++i) term(t + i, a[i], b[i]);
    for (int i = 0; t < length; ++t, ++i) term(t, a[i], b[i]);
    for (int i = 0; i < lanes; ++i) {
      first[0] += a[i];
      second[0] += b[i];
    }
  }
}

template <typename St, typename scalar_t>
FASTUNET_CPU_CLONES void stats_kernel(int64_t length, const scalar_t* __restrict__ z0, const scalar_t* __restrict__ z1,
                                      const scalar_t* __restrict__ z2, const scalar_t* __restrict__ z3,
                                      const double* __restrict__ ref, double* __restrict__ first,
                                      double* __restrict__ second) {
  sum_line<St>(
      length,
      [&](int64_t t, double& s1, double& s2) __attribute__((always_inline)) {
        const double r = ref[t * St::channel];
        const double d[4] = {
            static_cast<double>(widen(z0[t * St::z])) - r, static_cast<double>(widen(z1[t * St::z])) - r,
            static_cast<double>(widen(z2[t * St::z])) - r, static_cast<double>(widen(z3[t * St::z])) - r};
        for (int k = 0; k < 4; ++k) {
          s1 += d[k];
          s2 += d[k] * d[k];
        }
      },
      first, second);
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
      for (int k = 0; k < 4; ++k) widen_kernel<St::z>(n, z.p[k] + t0 * St::z, zb[k]);
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
  sum_line<St>(
      length,
      [&](int64_t t, double& s1, double& s2) __attribute__((always_inline)) {
        const int64_t c = t * St::channel;
        acc_t zv[4], dy[4];
        relu_pool_dy_at<St, scalar_t, acc_t, Pool, round_t>(t, z0, z1, z2, z3, g0, g1, g2, g3, grad_pooled, scale[c],
                                                            shift[c], zv, dy);
        const double mu = mean[c];
        for (int k = 0; k < 4; ++k) {
          s1 += static_cast<double>(dy[k]);
          s2 += static_cast<double>(dy[k]) * (static_cast<double>(zv[k]) - mu);
        }
      },
      first, second);
}

// bn_relu_backward_reduce over a line (cell_backward_sums per element): mean the channels' means in double.
template <typename St, typename scalar_t, typename acc_t, typename sum_t, bool Pool>
void backward_sums_line(const BackwardSumCells<scalar_t, acc_t, sum_t>& f, const LineStart& l, const double* mean,
                        double* first, double* second) {
  const Quad<const scalar_t> z = z_quad(f.t.z, f.g, f.t.zs, l);
  const Quad<const scalar_t> g = out_quad(f.t.grad, f.t.gs, l);
  const scalar_t* grad_pooled = Pool ? f.t.grad_pooled + f.t.gps.at(l.n, l.c0, l.u, l.v0) : nullptr;
  const acc_t *scale = f.scale + l.c0, *shift = f.shift + l.c0;
  if constexpr (std::is_same_v<scalar_t, float>) {
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

}  // namespace fastunet::cpu
