// Schemas of the fastunet ops (declared once here) and their CPU kernels.
//
// The ops are the memory-bound parts around each convolution of a U-Net block; see fastunet_math.h for
// the geometry (plain block: upscale 1; sub-pixel up block: upscale 2). Convolutions stay in ATen.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops_common.h"

namespace fastunet {
namespace {

using at::Tensor;
using c10::optional;

// Per-channel reductions on the CPU sum in double, over a fixed number of chunks of cell rows.
using cpu_sum_t = double;
constexpr int64_t kCpuReductionChunks = 64;

// Calls f(n, u, v, c0) for every cell of cell row `row` and every run of V channels c0..c0+V-1: runs innermost
// where channels are z's contiguous dimension (channels_last), else columns.
template <int V, typename F>
void visit_row(const CellGrid& cg, int64_t row, bool channels_inner, const F& f) {
  const int64_t cols = cg.cols(), C = cg.g.C, v0 = cg.first_v();
  int64_t n, u;
  cg.row_of(row, &n, &u);
  if (channels_inner) {
    for (int64_t col = 0; col < cols; ++col)
      for (int64_t c0 = 0; c0 < C; c0 += V) f(n, u, v0 + col, c0);
  } else {
    for (int64_t c0 = 0; c0 < C; c0 += V)
      for (int64_t col = 0; col < cols; ++col) f(n, u, v0 + col, c0);
  }
}

// Runs cells.run<V> for every cell and run of channels of the grid (V: run_width's `width`), cell rows in
// parallel.
template <typename scalar_t, typename F>
void for_each_cell(const CellGrid& cg, bool channels_inner, int width, const F& cells) {
  with_run_width<scalar_t>(width, [&](auto run) {
    constexpr int V = decltype(run)::value;
    at::parallel_for(0, cg.rows(), 1, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row)
        visit_row<V>(cg, row, channels_inner,
                     [&](int64_t n, int64_t u, int64_t v, int64_t c0) { cells.template run<V>(n, u, v, c0); });
    });
  });
}

// Per-channel totals of the cells' partial sums over the whole grid: chunks of cell rows in parallel, each
// into its own [2, chunks, C] partial sums, then summed over the chunks in order (as the CUDA kernels do).
template <typename scalar_t, typename F>
std::vector<SumPair<double>> reduce_cells(const CellGrid& cg, bool channels_inner, int width, const F& cells) {
  const int64_t C = cg.g.C;
  const ReductionPlan plan = plan_reduction(cg.rows(), kCpuReductionChunks);
  std::vector<cpu_sum_t> constants(C);
  for (int64_t c = 0; c < C; ++c) constants[c] = cells.channel_constant(c);
  std::vector<cpu_sum_t> partial(2 * plan.chunks * C);
  with_run_width<scalar_t>(width, [&](auto run) {
    constexpr int V = decltype(run)::value;
    at::parallel_for(0, plan.chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<SumPair<cpu_sum_t>> acc(C);
      for (int64_t chunk = k0; chunk < k1; ++chunk) {
        std::fill(acc.begin(), acc.end(), SumPair<cpu_sum_t>{0, 0});
        const int64_t first = chunk * plan.rows_per_chunk, last = std::min(first + plan.rows_per_chunk, cg.rows());
        for (int64_t row = first; row < last; ++row)
          visit_row<V>(cg, row, channels_inner, [&](int64_t n, int64_t u, int64_t v, int64_t c0) {
            cells.template run<V>(n, u, v, c0, constants.data() + c0, acc.data() + c0);
          });
        for (int64_t c = 0; c < C; ++c) store_partial(partial.data(), plan.chunks, C, chunk, c, acc[c]);
      }
    });
  });
  std::vector<SumPair<double>> total(C);
  for (int64_t c = 0; c < C; ++c) total[c] = sum_over_chunks(partial.data(), plan.chunks, C, c);
  return total;
}

std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& z, int64_t upscale) {
  const Geom g = geom_of(z, upscale);
  TORCH_CHECK(g.count_per_channel() > 0, "fastunet.bn_stats: empty batch");
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatsCells<scalar_t, cpu_sum_t> f{cell_tensors<scalar_t>(z), g};
    const auto sums = reduce_cells<scalar_t>(CellGrid{g, 0}, channels_fastest(z), run_width<scalar_t>(g.C, {&z}), f);
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      double m, v;
      finish_stats(f.channel_constant(c), sums[c].first, sums[c].second, static_cast<double>(g.count_per_channel()),
                   &m, &v);
      mp[c] = static_cast<acc_t>(m);
      vp[c] = static_cast<acc_t>(v);
    }
  });
  return {mean, var};
}

void bn_relu_pool_cpu(const Tensor& z, const Tensor& scale, const Tensor& shift, int64_t upscale, Tensor& out,
                      const optional<Tensor>& pooled) {
  const Geom g = check_bn_relu_pool_args(z, scale, shift, upscale, out, pooled);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = bn_relu_pool_cells<scalar_t, acc_t>(z, g, scale, shift, out, pooled);
    for_each_cell<scalar_t>(CellGrid{g, 0}, channels_fastest(z),
                            run_width<scalar_t>(g.C, {&z, &out, optional_ptr(pooled)}), f);
  });
}

// relu_pool_backward (mean null) or bn_relu_backward_apply: the gradient of every z element.
Tensor z_grad_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z, const Tensor& scale,
                  const Tensor& shift, const Tensor* mean, const Tensor* invstd, const Tensor* sum_dy,
                  const Tensor* sum_dy_xmu, const Geom& g) {
  Tensor dz = at::empty_like(z);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "z_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = z_grad_cells<scalar_t, acc_t>(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu,
                                                 g, dz);
    for_each_cell<scalar_t>(CellGrid{g, 1}, channels_fastest(z),
                            run_width<scalar_t>(g.C, {&z, &grad, optional_ptr(grad_pooled), &dz}), f);
  });
  return dz;
}

Tensor relu_pool_backward_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                              const Tensor& scale, const Tensor& shift, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  return z_grad_cpu(grad, grad_pooled, z, scale, shift, nullptr, nullptr, nullptr, nullptr, g);
}

std::tuple<Tensor, Tensor> bn_relu_backward_reduce_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled,
                                                       const Tensor& z, const Tensor& scale, const Tensor& shift,
                                                       const Tensor& mean, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_vec(mean, "mean", g, z);
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor sum_dy = at::empty({g.C}, opts), sum_dy_xmu = at::empty({g.C}, opts);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = backward_sum_cells<scalar_t, acc_t, cpu_sum_t>(grad, grad_pooled, z, scale, shift, mean, g);
    const auto sums = reduce_cells<scalar_t>(CellGrid{g, 0}, channels_fastest(z),
                                             run_width<scalar_t>(g.C, {&z, &grad, optional_ptr(grad_pooled)}), f);
    acc_t* s1 = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* s2 = sum_dy_xmu.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      s1[c] = static_cast<acc_t>(sums[c].first);
      s2[c] = static_cast<acc_t>(sums[c].second);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor bn_relu_backward_apply_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                                  const Tensor& scale, const Tensor& shift, const Tensor& mean,
                                  const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                  int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_bn_vectors({{&mean, "mean"}, {&invstd, "invstd"}, {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}, g, z);
  return z_grad_cpu(grad, grad_pooled, z, scale, shift, &mean, &invstd, &sum_dy, &sum_dy_xmu, g);
}

}  // namespace

TORCH_LIBRARY(fastunet, m) {
  m.def("bn_stats(Tensor z, int upscale) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_relu_pool(Tensor z, Tensor scale, Tensor shift, int upscale, Tensor(a!) out, Tensor(b!)? pooled) -> ()");
  m.def(
      "relu_pool_backward(Tensor grad, Tensor? grad_pooled, Tensor z, Tensor scale, Tensor shift, int upscale) -> "
      "Tensor");
  m.def(
      "bn_relu_backward_reduce(Tensor grad, Tensor? grad_pooled, Tensor z, Tensor scale, Tensor shift, "
      "Tensor mean, int upscale) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "bn_relu_backward_apply(Tensor grad, Tensor? grad_pooled, Tensor z, Tensor scale, Tensor shift, "
      "Tensor mean, Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int upscale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastunet, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_relu_pool", &bn_relu_pool_cpu);
  m.impl("relu_pool_backward", &relu_pool_backward_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cpu);
}

}  // namespace fastunet
