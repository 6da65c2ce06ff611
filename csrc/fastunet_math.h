// Per-element math shared by the CPU twin (ops_cpu.cpp) and the CUDA kernels (ops_cuda.cu).
//
// Geometry of every fused op ("upscale" S is 1 for a plain conv block, 2 for the sub-pixel up block):
//   z   : conv output, shape [N, S*S*C, H + S - 1, W + S - 1], any strides.
//   out : logical BN+ReLU output, shape [N, C, S*H, S*W], any strides (often a channel slice of a
//         concat buffer).
// Logical pixel (n, c, Y, X) with a = Y % S, b = X % S, i = Y / S, j = X / S reads
//   z[n, (a*S + b)*C + c, i + a, j + b].
// z entries that no logical pixel reads (the up block's border) get a zero gradient.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FU_HD __host__ __device__ __forceinline__
#else
#define FU_HD inline
#endif

namespace fastunet {

struct Strides4 {
  int64_t n, c, h, w;
  FU_HD int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// Maps logical output pixels to conv-output (z) coordinates and back.
struct Geom {
  int64_t N, C, H, W;  // logical channels, low-res (per-phase) spatial size
  int64_t S;           // upscale: 1 or 2
  FU_HD int64_t out_h() const { return S * H; }
  FU_HD int64_t out_w() const { return S * W; }
  FU_HD int64_t count_per_channel() const { return N * S * H * S * W; }
  FU_HD int64_t z_channels() const { return S * S * C; }
  FU_HD int64_t z_h() const { return H + S - 1; }
  FU_HD int64_t z_w() const { return W + S - 1; }
  // Offset into z of logical pixel (n, c, Y, X).
  FU_HD int64_t z_offset(const Strides4& zs, int64_t n, int64_t c, int64_t Y, int64_t X) const {
    const int64_t a = Y % S, b = X % S;
    return zs.at(n, (a * S + b) * C + c, Y / S + a, X / S + b);
  }
  // Logical pixel of z element (q, zi, zj); false if no logical pixel reads it.
  FU_HD bool logical_of(int64_t q, int64_t zi, int64_t zj, int64_t* c, int64_t* Y, int64_t* X) const {
    const int64_t p = q / C;
    const int64_t a = p / S, b = p % S;
    const int64_t i = zi - a, j = zj - b;
    if (i < 0 || i >= H || j < 0 || j >= W) return false;
    *c = q % C;
    *Y = i * S + a;
    *X = j * S + b;
    return true;
  }
};

// BN apply + ReLU. NaN propagates (as torch.relu); the ReLU mask is v > 0 (as threshold_backward).
template <typename acc_t>
FU_HD acc_t bn_relu(acc_t z, acc_t scale, acc_t shift) {
  const acc_t v = z * scale + shift;
  return v < acc_t(0) ? acc_t(0) : v;
}

// Index (0..3, row-major in the 2x2 window) that ATen's max_pool2d picks: the first strict maximum,
// any NaN overriding (the last NaN wins), exactly as `if (val > maxval || isnan(val))` from -inf.
template <typename acc_t>
FU_HD int pool_argmax4(const acc_t v[4]) {
  int idx = 0;
  acc_t best = -INFINITY;
  for (int k = 0; k < 4; ++k) {
    if (v[k] > best || v[k] != v[k]) {
      best = v[k];
      idx = k;
    }
  }
  return idx;
}

// Welford accumulator (Chan's parallel merge), used for the per-channel batch statistics.
// Trivially constructible (it lives in CUDA shared memory): create with `Welford<acc_t> w{};`.
template <typename acc_t>
struct Welford {
  acc_t mean, m2;
  int64_t count;
  FU_HD void push(acc_t x) {
    ++count;
    const acc_t d = x - mean;
    mean += d / acc_t(count);
    m2 += d * (x - mean);
  }
  FU_HD void merge(const Welford& o) {
    if (o.count == 0) return;
    if (count == 0) {
      *this = o;
      return;
    }
    const int64_t n = count + o.count;
    const acc_t d = o.mean - mean;
    const acc_t fo = acc_t(o.count) / acc_t(n);
    mean += d * fo;
    m2 += o.m2 + d * d * acc_t(count) * fo;
    count = n;
  }
  FU_HD acc_t var_biased() const { return count > 0 ? m2 / acc_t(count) : acc_t(0); }
};

// Gradient of BN (training statistics) for one element, given the per-channel reductions
// sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (z - mean)) over the M elements of the channel.
// With sum_dy = sum_dy_xmu = 0 this is the eval-mode gradient scale * dy.
template <typename acc_t>
FU_HD acc_t bn_backward_dz(acc_t dy, acc_t z, acc_t mean, acc_t invstd, acc_t scale, acc_t sum_dy,
                           acc_t sum_dy_xmu, acc_t inv_m) {
  const acc_t proj = (z - mean) * invstd * invstd * sum_dy_xmu * inv_m;
  return scale * (dy - sum_dy * inv_m - proj);
}

}  // namespace fastunet

namespace fastunet {

// Rounds through the output dtype, so that recomputed activations equal the stored ones bit for bit.
template <typename out_t, typename acc_t>
FU_HD acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<out_t>(v));
}

// BN+ReLU output of logical pixel (n, c, Y, X), rounded to the output dtype out_t.
template <typename scalar_t, typename out_t, typename acc_t>
FU_HD acc_t logical_y(const scalar_t* z, const Strides4& zs, const Geom& g, int64_t n, int64_t c, int64_t Y,
                      int64_t X, acc_t scale, acc_t shift) {
  return round_to<out_t, acc_t>(bn_relu<acc_t>(static_cast<acc_t>(z[g.z_offset(zs, n, c, Y, X)]), scale, shift));
}

// Gradient reaching the pre-ReLU value of logical pixel (n, c, Y, X): the output's gradient plus,
// where this pixel is its window's max-pool argmax, the pooled gradient; zero where the ReLU was off.
template <typename scalar_t, typename acc_t>
FU_HD acc_t relu_pool_dy(const scalar_t* z, const Strides4& zs, const scalar_t* grad, const Strides4& gs,
                         const scalar_t* grad_pooled, const Strides4& ps, const Geom& g, int64_t n, int64_t c,
                         int64_t Y, int64_t X, acc_t scale, acc_t shift) {
  const acc_t y = logical_y<scalar_t, scalar_t, acc_t>(z, zs, g, n, c, Y, X, scale, shift);
  if (!(y > acc_t(0))) return acc_t(0);
  acc_t d = static_cast<acc_t>(grad[gs.at(n, c, Y, X)]);
  if (grad_pooled != nullptr) {
    const int64_t Y0 = Y - (Y & 1), X0 = X - (X & 1);
    acc_t v[4];
    for (int k = 0; k < 4; ++k) v[k] = logical_y<scalar_t, scalar_t, acc_t>(z, zs, g, n, c, Y0 + k / 2, X0 + k % 2, scale, shift);
    const int k = pool_argmax4<acc_t>(v);
    if (Y0 + k / 2 == Y && X0 + k % 2 == X) d += static_cast<acc_t>(grad_pooled[ps.at(n, c, Y / 2, X / 2)]);
  }
  return d;
}

}  // namespace fastunet
