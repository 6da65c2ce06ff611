// The host side of the five fastunet ops, written once for the CPU and CUDA implementations: argument checks,
// outputs, dtype dispatch, the per-cell functors (fastunet_math.h) and the run width. What differs is the
// Backend (ops.cpp: CpuBackend, ops_cuda.cu: CudaBackend), which provides
//   guard(z)                                     the device guard (none on the CPU)
//   sum_type<acc_t>                              what a reduction's partial sums are kept in
//   for_each_cell<scalar_t>(cg, channels_fastest, width, cells)
//                                                cells.run<V> for every cell and run of channels
//   reduce<scalar_t, sum_t>(cg, channels_fastest, width, cells, finish, options)
//                                                partial sums per chunk of cell rows, then finish(c, totals)
//                                                per channel
#pragma once

#include <torch/library.h>

#include <tuple>

#include "ops_common.h"

namespace fastunet {

template <typename Backend>
struct CellOps {
  using Tensor = at::Tensor;
  using OptionalTensor = c10::optional<at::Tensor>;

  static std::tuple<Tensor, Tensor> bn_stats(const Tensor& z, int64_t upscale) {
    const Geom g = geom_of(z, upscale);
    TORCH_CHECK(g.count_per_channel() > 0, "fastunet.bn_stats: empty batch");
    const auto guard = Backend::guard(z);
    const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
    Tensor mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
    if (g.C == 0) return {mean, var};
    FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "fastunet.bn_stats", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using sum_t = typename Backend::template sum_type<acc_t>;
      const StatsCells<scalar_t, sum_t> cells{cell_tensors<scalar_t>(z), g};
      Backend::template reduce<scalar_t, sum_t>(
          CellGrid{g, 0}, channels_fastest(z), run_width<scalar_t>(g.C, {&z}), cells,
          StatsFinish<scalar_t, acc_t, sum_t>{cells, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()},
          opts);
    });
    return {mean, var};
  }

  static void bn_relu_pool(const Tensor& z, const Tensor& scale, const Tensor& shift, int64_t upscale, Tensor& out,
                           const OptionalTensor& pooled) {
    const Geom g = check_bn_relu_pool_args(z, scale, shift, upscale, out, pooled);
    const auto guard = Backend::guard(z);
    FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "fastunet.bn_relu_pool", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Backend::template for_each_cell<scalar_t>(CellGrid{g, 0}, channels_fastest(z),
                                                run_width<scalar_t>(g.C, {&z, &out, optional_ptr(pooled)}),
                                                bn_relu_pool_cells<scalar_t, acc_t>(z, g, scale, shift, out, pooled));
    });
  }

  static Tensor relu_pool_backward(const Tensor& grad, const OptionalTensor& grad_pooled, const Tensor& z,
                                   const Tensor& scale, const Tensor& shift, int64_t upscale) {
    const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
    return z_grad(grad, grad_pooled, z, scale, shift, nullptr, nullptr, nullptr, nullptr, g);
  }

  static std::tuple<Tensor, Tensor> bn_relu_backward_reduce(const Tensor& grad, const OptionalTensor& grad_pooled,
                                                            const Tensor& z, const Tensor& scale, const Tensor& shift,
                                                            const Tensor& mean, int64_t upscale) {
    const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
    check_vec(mean, "mean", g, z);
    const auto guard = Backend::guard(z);
    const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
    Tensor sum_dy = at::empty({g.C}, opts), sum_dy_xmu = at::empty({g.C}, opts);
    if (g.C == 0) return {sum_dy, sum_dy_xmu};
    FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "fastunet.bn_relu_backward_reduce", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using sum_t = typename Backend::template sum_type<acc_t>;
      Backend::template reduce<scalar_t, sum_t>(
          CellGrid{g, 0}, channels_fastest(z), run_width<scalar_t>(g.C, {&z, &grad, optional_ptr(grad_pooled)}),
          backward_sum_cells<scalar_t, acc_t, sum_t>(grad, grad_pooled, z, scale, shift, mean, g),
          SumsFinish<acc_t>{sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>()}, opts);
    });
    return {sum_dy, sum_dy_xmu};
  }

  static Tensor bn_relu_backward_apply(const Tensor& grad, const OptionalTensor& grad_pooled, const Tensor& z,
                                       const Tensor& scale, const Tensor& shift, const Tensor& mean,
                                       const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                       int64_t upscale) {
    const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
    check_bn_vectors({{&mean, "mean"}, {&invstd, "invstd"}, {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}, g, z);
    return z_grad(grad, grad_pooled, z, scale, shift, &mean, &invstd, &sum_dy, &sum_dy_xmu, g);
  }

 private:
  // relu_pool_backward (mean null) or bn_relu_backward_apply: the gradient of every z element.
  static Tensor z_grad(const Tensor& grad, const OptionalTensor& grad_pooled, const Tensor& z, const Tensor& scale,
                       const Tensor& shift, const Tensor* mean, const Tensor* invstd, const Tensor* sum_dy,
                       const Tensor* sum_dy_xmu, const Geom& g) {
    const auto guard = Backend::guard(z);
    Tensor dz = at::empty_like(z);
    FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "fastunet.z_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Backend::template for_each_cell<scalar_t>(
          CellGrid{g, 1}, channels_fastest(z), run_width<scalar_t>(g.C, {&z, &grad, optional_ptr(grad_pooled), &dz}),
          z_grad_cells<scalar_t, acc_t>(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, g, dz));
    });
    return dz;
  }
};

// The five ops of Backend, for a TORCH_LIBRARY_IMPL block of its dispatch key.
template <typename Backend>
void register_cell_ops(torch::Library& m) {
  m.impl("bn_stats", &CellOps<Backend>::bn_stats);
  m.impl("bn_relu_pool", &CellOps<Backend>::bn_relu_pool);
  m.impl("relu_pool_backward", &CellOps<Backend>::relu_pool_backward);
  m.impl("bn_relu_backward_reduce", &CellOps<Backend>::bn_relu_backward_reduce);
  m.impl("bn_relu_backward_apply", &CellOps<Backend>::bn_relu_backward_apply);
}

}  // namespace fastunet
