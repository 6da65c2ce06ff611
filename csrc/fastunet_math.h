// Per-element math and the unit of work shared by the CPU twin (ops.cpp) and the CUDA kernels (ops_cuda.cu).
//
// Geometry of every fused op ("upscale" S is 1 for a plain conv block, 2 for the sub-pixel up block):
//   z   : conv output, shape [N, S*S*C, H + S - 1, W + S - 1], any strides.
//   out : logical BN+ReLU output, shape [N, C, S*H, S*W], any strides (often a channel slice of a
//         concat buffer).
// Logical pixel (n, c, Y, X) with a = Y % S, b = X % S, i = Y / S, j = X / S reads
//   z[n, (a*S + b)*C + c, i + a, j + b].
// z entries that no logical pixel reads (the up block's border) get a zero gradient.
//
// Every kernel walks the logical output in 2x2 cells, as the Triton kernels do (kernels/utils.py): pixel
// k = 2*dy + dx of cell (u, v) is logical pixel (2u + dy, 2v + dx). A cell is a max-pool window; for S = 2
// it is the four sub-pixel phases of low-res position (u, v), pixel k reading z[n, k*C + c, u + dy, v + dx].
// The work item of a thread (CUDA) or of an inner loop step (CPU) is one cell of one channel; the CUDA
// kernels put consecutive channels on consecutive lanes, the contiguous dimension of channels_last.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FU_HD __host__ __device__ __forceinline__
// Loops over the 4 pixels of a cell and the V channels of a run are unrolled, so that the per-cell arrays
// stay in registers (a run-time index would put them in local memory).
#define FU_UNROLL _Pragma("unroll")
#else
#define FU_HD inline
#define FU_UNROLL
#endif

namespace fastunet {

struct Strides4 {
  int64_t n, c, h, w;
  FU_HD int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const { return in * n + ic * c + ih * h + iw * w; }
};

struct Geom {
  int64_t N, C, H, W;  // logical channels, low-res (per-phase) spatial size
  int64_t S;           // upscale: 1 or 2
  FU_HD int64_t out_h() const { return S * H; }
  FU_HD int64_t out_w() const { return S * W; }
  FU_HD int64_t count_per_channel() const { return N * S * H * S * W; }
};

// The cells a kernel visits. With border = 1 (backward kernels, S = 2) the grid also holds the cells one
// row/column outside the image on each side, whose pixels are outside the image but whose z entries
// (u + dy, v + dx) are the z border that no pixel reads: they get their zero gradient from the same loop.
struct CellGrid {
  Geom g;
  int64_t border;  // 0 or 1 (meaningful for S = 2 only)
  FU_HD int64_t rows_per_sample() const { return g.S == 2 ? g.H + 2 * border : (g.out_h() + 1) / 2; }
  FU_HD int64_t cols() const { return g.S == 2 ? g.W + 2 * border : (g.out_w() + 1) / 2; }
  FU_HD int64_t rows() const { return g.N * rows_per_sample(); }
  // Sample n and cell row u of flat cell row `row` (its cells are (u, first_v() + col) for col < cols()).
  FU_HD void row_of(int64_t row, int64_t* n, int64_t* u) const {
    *n = row / rows_per_sample();
    *u = row % rows_per_sample() - (g.S == 2 ? border : 0);
  }
  FU_HD int64_t first_v() const { return g.S == 2 ? -border : 0; }
};

// Whether pixel k of cell (u, v) lies in the logical output.
FU_HD bool pixel_in_image(const Geom& g, int64_t u, int64_t v, int k) {
  const int64_t Y = 2 * u + k / 2, X = 2 * v + k % 2;
  return Y >= 0 && Y < g.out_h() && X >= 0 && X < g.out_w();
}

// Whether the z position of pixel k of cell (u, v) is an element of z (read by a pixel or not).
FU_HD bool pixel_in_z(const Geom& g, int64_t u, int64_t v, int k) {
  if (g.S == 1) return pixel_in_image(g, u, v, k);
  const int64_t i = u + k / 2, j = v + k % 2;
  return i >= 0 && i <= g.H && j >= 0 && j <= g.W;
}

// Offset, in a tensor laid out as z, of the z entry of pixel k of cell (u, v), channel c.
FU_HD int64_t cell_z_offset(const Geom& g, const Strides4& zs, int64_t n, int64_t u, int64_t v, int k, int64_t c) {
  if (g.S == 2) return zs.at(n, k * g.C + c, u + k / 2, v + k % 2);
  return zs.at(n, c, 2 * u + k / 2, 2 * v + k % 2);
}

// Offset, in a tensor laid out as the logical output (out, grad), of pixel k of cell (u, v), channel c.
FU_HD int64_t cell_out_offset(const Strides4& s, int64_t n, int64_t u, int64_t v, int k, int64_t c) {
  return s.at(n, c, 2 * u + k / 2, 2 * v + k % 2);
}

// BN apply + ReLU. NaN propagates (as torch.relu); the ReLU mask is v > 0 (as threshold_backward).
template <typename acc_t>
FU_HD acc_t bn_relu(acc_t z, acc_t scale, acc_t shift) {
  const acc_t v = z * scale + shift;
  return v < acc_t(0) ? acc_t(0) : v;
}

// Index (0..3, row-major in the 2x2 window) that ATen's max_pool2d picks: the first strict maximum,
// any NaN overriding (the last NaN wins), exactly as `if (val > maxval || isnan(val))` from -inf. Written as
// selects and the index in index_t: the CPU's line loops (cpu_lines.h) take it as acc_t, the form GCC vectorizes
// (a boolean or, or an int index beside float masks, it does not).
template <typename acc_t, typename index_t = int>
FU_HD index_t pool_argmax4(const acc_t v[4], acc_t* max_value = nullptr) {
  index_t idx = 0;
  acc_t best = -INFINITY;
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    const acc_t previous = best;
    best = v[k] > previous ? v[k] : previous;
    best = v[k] != v[k] ? v[k] : best;
    idx = v[k] > previous ? index_t(k) : idx;
    idx = v[k] != v[k] ? index_t(k) : idx;
  }
  if (max_value != nullptr) *max_value = best;  // v[idx], without an indexed read
  return idx;
}

// Gradient of BN (training statistics) for one element, given the per-channel reductions
// sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (z - mean)) over the M elements of the channel.
// With sum_dy = sum_dy_xmu = 0 this is the eval-mode gradient scale * dy.
template <typename acc_t>
FU_HD acc_t bn_backward_dz(acc_t dy, acc_t z, acc_t mean, acc_t invstd, acc_t scale, acc_t sum_dy, acc_t sum_dy_xmu,
                           acc_t inv_m) {
  const acc_t proj = (z - mean) * invstd * invstd * sum_dy_xmu * inv_m;
  return scale * (dy - sum_dy * inv_m - proj);
}

// Rounds through the output dtype, so that recomputed activations equal the stored ones bit for bit.
template <typename out_t, typename acc_t>
FU_HD acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<out_t>(v));
}

// BN+ReLU of one z value, rounded to scalar_t: what a pixel of the logical output holds.
template <typename scalar_t, typename acc_t>
FU_HD acc_t bn_relu_rounded(acc_t z, acc_t scale, acc_t shift) {
  return round_to<scalar_t, acc_t>(bn_relu<acc_t>(z, scale, shift));
}

// The gradient reaching the pre-ReLU value of pixel k of a window whose max-pool argmax is `argmax` (-1: no
// max-pool): the output's gradient, plus the pooled gradient at the argmax; zero where the ReLU was off. Three
// selects, the form GCC vectorizes in the CPU's line loops (which take k and argmax as acc_t, cpu_lines.h).
template <typename acc_t, typename index_t>
FU_HD acc_t relu_pool_dy(acc_t y, acc_t grad, index_t k, index_t argmax, acc_t pooled_grad) {
  const acc_t plain = y > acc_t(0) ? grad : acc_t(0);
  const acc_t routed = y > acc_t(0) ? grad + pooled_grad : acc_t(0);
  return k == argmax ? routed : plain;
}

// Everything a per-cell function reads or writes: tensors and their strides (null pointers where an
// op has no such tensor; grad and grad_pooled in the forward op, pooled without max-pool, ...).
template <typename scalar_t>
struct CellTensors {
  const scalar_t* z;
  Strides4 zs;
  const scalar_t* grad;  // laid out as the logical output
  Strides4 gs;
  const scalar_t* grad_pooled;  // [N, C, S*H/2, S*W/2]; null: no max-pool
  Strides4 gps;
};

// The unit of work is one cell of a run of V consecutive channels c0 .. c0+V-1. Runs of V > 1 are taken only
// where every tensor of the op has channel stride 1, all its other strides multiples of V, a 16-byte aligned
// start and V dividing C (the host's run_width() decides), so that a run is V contiguous elements: on the GPU
// one 16-byte access, on the CPU a short loop the compiler vectorizes. V = 1 walks any strides.

// 16 bytes moved as one access on the GPU (the type only carries the bits).
struct alignas(16) Bits16 {
  uint32_t w[4];
};

template <int V, typename T>
FU_HD void load_run(const T* p, int64_t stride, T (&out)[V]) {
#if defined(__CUDA_ARCH__)
  if constexpr (V > 1) {
    static_assert(sizeof(T) * V == sizeof(Bits16), "a run of V > 1 channels is 16 bytes");
    const Bits16 bits = *reinterpret_cast<const Bits16*>(p);
    memcpy(out, &bits, sizeof(bits));
  } else
#endif
  {
    FU_UNROLL
    for (int i = 0; i < V; ++i) out[i] = p[i * stride];
  }
}

template <int V, typename T>
FU_HD void store_run(T* p, int64_t stride, const T (&in)[V]) {
#if defined(__CUDA_ARCH__)
  // Written out as one st.global.v4: from C++ the compiler splits the store where the values come from several
  // branches.
  if constexpr (V > 1) {
    static_assert(sizeof(T) * V == sizeof(Bits16), "a run of V > 1 channels is 16 bytes");
    uint32_t w[4];
    memcpy(w, in, sizeof(w));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  } else
#endif
  {
    FU_UNROLL
    for (int i = 0; i < V; ++i) p[i * stride] = in[i];
  }
}

// BN+ReLU of the pixels of one cell of channels c0.., rounded to scalar_t (0 for pixels outside the image);
// zv receives the z values read.
template <typename scalar_t, typename acc_t, int V>
FU_HD void cell_bn_relu(const CellTensors<scalar_t>& t, const Geom& g, int64_t n, int64_t u, int64_t v, int64_t c0,
                        const acc_t* scale, const acc_t* shift, acc_t (&y)[4][V], acc_t (&zv)[4][V]) {
  acc_t sc[V], sh[V];
  FU_UNROLL
  for (int i = 0; i < V; ++i) {
    sc[i] = scale[c0 + i];
    sh[i] = shift[c0 + i];
  }
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    const bool inside = pixel_in_image(g, u, v, k);
    scalar_t raw[V];
    if (inside) {
      load_run<V>(t.z + cell_z_offset(g, t.zs, n, u, v, k, c0), t.zs.c, raw);
    } else {
      FU_UNROLL
      for (int i = 0; i < V; ++i) raw[i] = scalar_t(0);
    }
    FU_UNROLL
    for (int i = 0; i < V; ++i) {
      zv[k][i] = static_cast<acc_t>(raw[i]);
      y[k][i] = inside ? bn_relu_rounded<scalar_t, acc_t>(zv[k][i], sc[i], sh[i]) : acc_t(0);
    }
  }
}

// The max-pool argmax (pool_argmax4) of channel i of a cell's values, and the max itself.
template <typename acc_t, int V>
FU_HD int cell_argmax(const acc_t (&y)[4][V], int i, acc_t* max_value = nullptr) {
  const acc_t window[4] = {y[0][i], y[1][i], y[2][i], y[3][i]};
  return pool_argmax4<acc_t>(window, max_value);
}

// bn_relu_pool for one cell of channels c0..: out = relu(z*scale + shift) and, if pooled is given, the
// window's max (the pixel ATen's max_pool2d picks).
template <typename scalar_t, typename acc_t, int V>
FU_HD void cell_bn_relu_pool(const CellTensors<scalar_t>& t, const Geom& g, int64_t n, int64_t u, int64_t v, int64_t c0,
                             const acc_t* scale, const acc_t* shift, scalar_t* out, const Strides4& os,
                             scalar_t* pooled, const Strides4& ps) {
  acc_t y[4][V], zv[4][V];
  cell_bn_relu<scalar_t, acc_t, V>(t, g, n, u, v, c0, scale, shift, y, zv);
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (!pixel_in_image(g, u, v, k)) continue;
    scalar_t o[V];
    FU_UNROLL
    for (int i = 0; i < V; ++i) o[i] = static_cast<scalar_t>(y[k][i]);
    store_run<V>(out + cell_out_offset(os, n, u, v, k, c0), os.c, o);
  }
  if (pooled == nullptr) return;
  scalar_t best[V];
  FU_UNROLL
  for (int i = 0; i < V; ++i) {
    acc_t max_value;
    cell_argmax<acc_t, V>(y, i, &max_value);
    best[i] = static_cast<scalar_t>(max_value);
  }
  store_run<V>(pooled + ps.at(n, c0, u, v), ps.c, best);
}

// Gradient dy reaching the pre-ReLU value of each pixel of one cell of channels c0..: the output's gradient
// plus, at the window's max-pool argmax, the pooled gradient; zero where the ReLU was off and outside the
// image. zv receives the z values read.
template <typename scalar_t, typename acc_t, int V>
FU_HD void cell_relu_pool_dy(const CellTensors<scalar_t>& t, const Geom& g, int64_t n, int64_t u, int64_t v, int64_t c0,
                             const acc_t* scale, const acc_t* shift, acc_t (&dy)[4][V], acc_t (&zv)[4][V]) {
  acc_t y[4][V];
  cell_bn_relu<scalar_t, acc_t, V>(t, g, n, u, v, c0, scale, shift, y, zv);
  scalar_t pooled_grad[V];
  int argmax[V];
  if (t.grad_pooled != nullptr) {
    load_run<V>(t.grad_pooled + t.gps.at(n, c0, u, v), t.gps.c, pooled_grad);
  } else {
    FU_UNROLL
    for (int i = 0; i < V; ++i) pooled_grad[i] = scalar_t(0);  // never routed (argmax -1), but defined
  }
  FU_UNROLL
  for (int i = 0; i < V; ++i) argmax[i] = t.grad_pooled != nullptr ? cell_argmax<acc_t, V>(y, i) : -1;
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    FU_UNROLL
    for (int i = 0; i < V; ++i) dy[k][i] = acc_t(0);
    if (!pixel_in_image(g, u, v, k)) continue;
    scalar_t grad[V];
    load_run<V>(t.grad + cell_out_offset(t.gs, n, u, v, k, c0), t.gs.c, grad);
    FU_UNROLL
    for (int i = 0; i < V; ++i)
      dy[k][i] = relu_pool_dy<acc_t, int>(y[k][i], static_cast<acc_t>(grad[i]), k, argmax[i],
                                          static_cast<acc_t>(pooled_grad[i]));
  }
}

// The per-channel vectors of BN's training-mode backward (null sum pointers: the ReLU/max-pool backward only).
template <typename acc_t>
struct BnBackwardVectors {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* sum_dy;
  const acc_t* sum_dy_xmu;
  acc_t inv_m;  // 1 / elements per channel
};

// relu_pool_backward (bn.sum_dy null) or bn_relu_backward_apply for one cell of channels c0..: writes the
// gradient of every z entry of the cell, 0 for the entries no pixel reads.
template <typename scalar_t, typename acc_t, int V>
FU_HD void cell_z_grad(const CellTensors<scalar_t>& t, const Geom& g, int64_t n, int64_t u, int64_t v, int64_t c0,
                       const acc_t* scale, const acc_t* shift, const BnBackwardVectors<acc_t>& bn, scalar_t* dz,
                       const Strides4& ds) {
  acc_t dy[4][V], zv[4][V];
  cell_relu_pool_dy<scalar_t, acc_t, V>(t, g, n, u, v, c0, scale, shift, dy, zv);
  acc_t mean[V], invstd[V], sc[V], sum_dy[V], sum_dy_xmu[V];  // the run's BN vectors, read once per cell
  if (bn.sum_dy != nullptr) {
    FU_UNROLL
    for (int i = 0; i < V; ++i) {
      mean[i] = bn.mean[c0 + i];
      invstd[i] = bn.invstd[c0 + i];
      sc[i] = scale[c0 + i];
      sum_dy[i] = bn.sum_dy[c0 + i];
      sum_dy_xmu[i] = bn.sum_dy_xmu[c0 + i];
    }
  }
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (!pixel_in_z(g, u, v, k)) continue;
    const bool bn_backward = bn.sum_dy != nullptr && pixel_in_image(g, u, v, k);
    scalar_t d[V];
    FU_UNROLL
    for (int i = 0; i < V; ++i)
      d[i] = static_cast<scalar_t>(bn_backward ? bn_backward_dz<acc_t>(dy[k][i], zv[k][i], mean[i], invstd[i], sc[i],
                                                                       sum_dy[i], sum_dy_xmu[i], bn.inv_m)
                                               : dy[k][i]);
    store_run<V>(dz + cell_z_offset(g, ds, n, u, v, k, c0), ds.c, d);
  }
}

// Partial sums of the per-channel reductions, over some cells of one channel, in sum_t.
template <typename sum_t>
struct SumPair {
  sum_t first, second;
};

// A reduction's partial sums per chunk of cells, laid out [2, chunks, C]: all first sums, then all second sums.
template <typename sum_t>
FU_HD void store_partial(sum_t* partial, int64_t chunks, int64_t C, int64_t chunk, int64_t c,
                         const SumPair<sum_t>& sums) {
  partial[chunk * C + c] = sums.first;
  partial[(chunks + chunk) * C + c] = sums.second;
}

// Channel c's totals, in double, of [2, chunks, C] partial sums: the chunks summed in order, so that a result
// depends on the chunking alone.
template <typename sum_t>
FU_HD SumPair<double> sum_over_chunks(const sum_t* partial, int64_t chunks, int64_t C, int64_t c) {
  SumPair<double> total{0, 0};
  for (int64_t k = 0; k < chunks; ++k) {
    total.first += static_cast<double>(partial[k * C + c]);
    total.second += static_cast<double>(partial[(chunks + k) * C + c]);
  }
  return total;
}

// bn_stats partial sums for one cell of channels c0..: sum(z - ref) and sum((z - ref)^2) over its pixels in
// the image, with ref[i] a value of channel c0+i itself (shifted sums: exact-ish even when the mean is large
// against the spread).
template <typename scalar_t, typename sum_t, int V>
FU_HD void cell_stats_sums(const CellTensors<scalar_t>& t, const Geom& g, int64_t n, int64_t u, int64_t v, int64_t c0,
                           const sum_t* ref, SumPair<sum_t>* acc) {
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (!pixel_in_image(g, u, v, k)) continue;
    scalar_t raw[V];
    load_run<V>(t.z + cell_z_offset(g, t.zs, n, u, v, k, c0), t.zs.c, raw);
    FU_UNROLL
    for (int i = 0; i < V; ++i) {
      const sum_t d = static_cast<sum_t>(raw[i]) - ref[i];
      acc[i].first += d;
      acc[i].second += d * d;
    }
  }
}

// The value channel c's statistics are shifted by: its logical pixel (0, c, 0, 0).
template <typename scalar_t, typename sum_t>
FU_HD sum_t stats_ref(const CellTensors<scalar_t>& t, const Geom& g, int64_t c) {
  return static_cast<sum_t>(t.z[cell_z_offset(g, t.zs, 0, 0, 0, 0, c)]);
}

// Mean and biased variance from the shifted sums of count values. A negative variance (cancellation) becomes
// 0; a NaN stays NaN, as in nn.BatchNorm2d (a NaN in the batch makes the statistics NaN).
FU_HD void finish_stats(double ref, double sum_d, double sum_d2, double count, double* mean, double* var) {
  const double mean_d = sum_d / count;
  const double v = sum_d2 / count - mean_d * mean_d;
  *mean = ref + mean_d;
  *var = v < 0.0 ? 0.0 : v;
}

// bn_relu_backward_reduce partial sums for one cell of channels c0..: sum(dy) and sum(dy * (z - mean)).
template <typename scalar_t, typename acc_t, typename sum_t, int V>
FU_HD void cell_backward_sums(const CellTensors<scalar_t>& t, const Geom& g, int64_t n, int64_t u, int64_t v,
                              int64_t c0, const acc_t* scale, const acc_t* shift, const sum_t* mean,
                              SumPair<sum_t>* acc) {
  acc_t dy[4][V], zv[4][V];
  cell_relu_pool_dy<scalar_t, acc_t, V>(t, g, n, u, v, c0, scale, shift, dy, zv);
  FU_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (!pixel_in_image(g, u, v, k)) continue;
    FU_UNROLL
    for (int i = 0; i < V; ++i) {
      acc[i].first += static_cast<sum_t>(dy[k][i]);
      acc[i].second += static_cast<sum_t>(dy[k][i]) * (static_cast<sum_t>(zv[k][i]) - mean[i]);
    }
  }
}

// The per-cell work of each op as a function object, called per (cell, run of V channels) by the CPU loops
// (ops.cpp) and the CUDA kernels (ops_cuda.cu) alike. Elementwise ops: f.run<V>(n, u, v, c0). Reductions:
// f.run<V>(n, u, v, c0, constants, partial_sums), constants[i] = f.channel_constant(c0 + i), both arrays of V.

template <typename scalar_t, typename acc_t>
struct BnReluPoolCells {
  CellTensors<scalar_t> t;
  Geom g;
  const acc_t* scale;
  const acc_t* shift;
  scalar_t* out;
  Strides4 os;
  scalar_t* pooled;  // null: no max-pool
  Strides4 ps;
  template <int V>
  FU_HD void run(int64_t n, int64_t u, int64_t v, int64_t c0) const {
    cell_bn_relu_pool<scalar_t, acc_t, V>(t, g, n, u, v, c0, scale, shift, out, os, pooled, ps);
  }
};

template <typename scalar_t, typename acc_t>
struct ZGradCells {
  CellTensors<scalar_t> t;
  Geom g;
  const acc_t* scale;
  const acc_t* shift;
  BnBackwardVectors<acc_t> bn;
  scalar_t* dz;
  Strides4 ds;
  template <int V>
  FU_HD void run(int64_t n, int64_t u, int64_t v, int64_t c0) const {
    cell_z_grad<scalar_t, acc_t, V>(t, g, n, u, v, c0, scale, shift, bn, dz, ds);
  }
};

template <typename scalar_t, typename sum_t>
struct StatsCells {
  CellTensors<scalar_t> t;
  Geom g;
  FU_HD sum_t channel_constant(int64_t c) const { return stats_ref<scalar_t, sum_t>(t, g, c); }
  template <int V>
  FU_HD void run(int64_t n, int64_t u, int64_t v, int64_t c0, const sum_t* ref, SumPair<sum_t>* acc) const {
    cell_stats_sums<scalar_t, sum_t, V>(t, g, n, u, v, c0, ref, acc);
  }
};

template <typename scalar_t, typename acc_t, typename sum_t>
struct BackwardSumCells {
  CellTensors<scalar_t> t;
  Geom g;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;
  FU_HD sum_t channel_constant(int64_t c) const { return static_cast<sum_t>(mean[c]); }
  template <int V>
  FU_HD void run(int64_t n, int64_t u, int64_t v, int64_t c0, const sum_t* mu, SumPair<sum_t>* acc) const {
    cell_backward_sums<scalar_t, acc_t, sum_t, V>(t, g, n, u, v, c0, scale, shift, mu, acc);
  }
};

// What a reduction does with channel c's totals (sum_over_chunks): bn_stats' mean and biased variance, or
// bn_relu_backward_reduce's two sums as they are. Run per channel on the CPU and by the CUDA finishing kernel.
template <typename scalar_t, typename acc_t, typename sum_t>
struct StatsFinish {
  StatsCells<scalar_t, sum_t> cells;
  acc_t* mean;
  acc_t* var;
  FU_HD void operator()(int64_t c, const SumPair<double>& total) const {
    double m, v;
    finish_stats(static_cast<double>(cells.channel_constant(c)), total.first, total.second,
                 static_cast<double>(cells.g.count_per_channel()), &m, &v);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(v);
  }
};

template <typename acc_t>
struct SumsFinish {
  acc_t* first;
  acc_t* second;
  FU_HD void operator()(int64_t c, const SumPair<double>& total) const {
    first[c] = static_cast<acc_t>(total.first);
    second[c] = static_cast<acc_t>(total.second);
  }
};

}  // namespace fastunet
