// Schemas of the fastunet ops (declared once here) and their CPU kernels.
//
// The ops are the memory-bound parts around each convolution of a U-Net block; see fastunet_math.h for
// the geometry (plain block: upscale 1; sub-pixel up block: upscale 2). Convolutions stay in ATen.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "ops_common.h"

namespace fastunet {
namespace {

using at::Tensor;
using c10::optional;

// Per-channel reductions on the CPU accumulate in double, as ATen's CPU BatchNorm does; rows of a channel
// are reduced on their own and then combined.
using cpu_sum_t = double;

template <typename F>
void for_each_row_of_channel(const Geom& g, int64_t c, F&& row_fn) {
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t Y = 0; Y < g.out_h(); ++Y) row_fn(n, c, Y);
}

std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& z, int64_t upscale) {
  const Geom g = geom_of(z, upscale);
  TORCH_CHECK(g.count_per_channel() > 0, "fastunet.bn_stats: empty batch");
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  const Strides4 zs = strides_of(z);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Welford<cpu_sum_t> total{};
        for_each_row_of_channel(g, c, [&](int64_t n, int64_t cc, int64_t Y) {
          Welford<cpu_sum_t> row{};
          for (int64_t X = 0; X < g.out_w(); ++X) row.push(static_cast<cpu_sum_t>(zp[g.z_offset(zs, n, cc, Y, X)]));
          total.merge(row);
        });
        mp[c] = static_cast<acc_t>(total.mean);
        vp[c] = static_cast<acc_t>(total.var_biased());
      }
    });
  });
  return {mean, var};
}

void bn_relu_pool_cpu(const Tensor& z, const Tensor& scale, const Tensor& shift, int64_t upscale, Tensor& out,
                      const optional<Tensor>& pooled) {
  const Geom g = geom_of(z, upscale);
  check_vec(scale, "scale", g, z);
  check_vec(shift, "shift", g, z);
  check_out_like(out, "out", g, z);
  check_pooled(pooled, "pooled", g, z);
  const Strides4 zs = strides_of(z), os = strides_of(out);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* pp = pooled.has_value() ? pooled->mutable_data_ptr<scalar_t>() : nullptr;
    const Strides4 ps = pooled.has_value() ? strides_of(*pooled) : Strides4{0, 0, 0, 0};
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t nc = b0; nc < b1; ++nc) {
        const int64_t n = nc / g.C, c = nc % g.C;
        const acc_t s = sc[c], t = sh[c];
        if (pp == nullptr) {
          for (int64_t Y = 0; Y < g.out_h(); ++Y)
            for (int64_t X = 0; X < g.out_w(); ++X)
              op[os.at(n, c, Y, X)] = static_cast<scalar_t>(logical_y<scalar_t, scalar_t, acc_t>(zp, zs, g, n, c, Y, X, s, t));
          continue;
        }
        for (int64_t Y = 0; Y < g.out_h(); Y += 2)
          for (int64_t X = 0; X < g.out_w(); X += 2) {
            acc_t v[4];
            for (int k = 0; k < 4; ++k) {
              v[k] = logical_y<scalar_t, scalar_t, acc_t>(zp, zs, g, n, c, Y + k / 2, X + k % 2, s, t);
              op[os.at(n, c, Y + k / 2, X + k % 2)] = static_cast<scalar_t>(v[k]);
            }
            pp[ps.at(n, c, Y / 2, X / 2)] = static_cast<scalar_t>(v[pool_argmax4<acc_t>(v)]);
          }
      }
    });
  });
}

// Visits every element of z (all z channels q and positions zi, zj of sample n) in parallel; f writes it.
template <typename F>
void for_each_z_element(const Geom& g, F&& f) {
  const int64_t zc = g.z_channels();
  at::parallel_for(0, g.N * zc, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nq = b0; nq < b1; ++nq) {
      const int64_t n = nq / zc, q = nq % zc;
      for (int64_t zi = 0; zi < g.z_h(); ++zi)
        for (int64_t zj = 0; zj < g.z_w(); ++zj) f(n, q, zi, zj);
    }
  });
}

Tensor relu_pool_backward_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                              const Tensor& scale, const Tensor& shift, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  Tensor dy = at::empty_like(z);
  const Strides4 zs = strides_of(z), gs = strides_of(grad), ds = strides_of(dy);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "relu_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* pp = grad_pooled.has_value() ? grad_pooled->const_data_ptr<scalar_t>() : nullptr;
    const Strides4 ps = grad_pooled.has_value() ? strides_of(*grad_pooled) : Strides4{0, 0, 0, 0};
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* dp = dy.mutable_data_ptr<scalar_t>();
    for_each_z_element(g, [&](int64_t n, int64_t q, int64_t zi, int64_t zj) {
      int64_t c, Y, X;
      acc_t d = 0;
      if (g.logical_of(q, zi, zj, &c, &Y, &X)) d = relu_pool_dy<scalar_t, acc_t>(zp, zs, gp, gs, pp, ps, g, n, c, Y, X, sc[c], sh[c]);
      dp[ds.at(n, q, zi, zj)] = static_cast<scalar_t>(d);
    });
  });
  return dy;
}

std::tuple<Tensor, Tensor> bn_relu_backward_reduce_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled,
                                                       const Tensor& z, const Tensor& scale, const Tensor& shift,
                                                       const Tensor& mean, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_vec(mean, "mean", g, z);
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor sum_dy = at::empty({g.C}, opts), sum_dy_xmu = at::empty({g.C}, opts);
  const Strides4 zs = strides_of(z), gs = strides_of(grad);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* pp = grad_pooled.has_value() ? grad_pooled->const_data_ptr<scalar_t>() : nullptr;
    const Strides4 ps = grad_pooled.has_value() ? strides_of(*grad_pooled) : Strides4{0, 0, 0, 0};
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    acc_t* s1 = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* s2 = sum_dy_xmu.mutable_data_ptr<acc_t>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        cpu_sum_t t1 = 0, t2 = 0;
        for_each_row_of_channel(g, c, [&](int64_t n, int64_t cc, int64_t Y) {
          cpu_sum_t r1 = 0, r2 = 0;
          for (int64_t X = 0; X < g.out_w(); ++X) {
            const cpu_sum_t d = relu_pool_dy<scalar_t, acc_t>(zp, zs, gp, gs, pp, ps, g, n, cc, Y, X, sc[cc], sh[cc]);
            r1 += d;
            r2 += d * (static_cast<cpu_sum_t>(zp[g.z_offset(zs, n, cc, Y, X)]) - static_cast<cpu_sum_t>(mp[cc]));
          }
          t1 += r1;
          t2 += r2;
        });
        s1[c] = static_cast<acc_t>(t1);
        s2[c] = static_cast<acc_t>(t2);
      }
    });
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor bn_relu_backward_apply_cpu(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                                  const Tensor& scale, const Tensor& shift, const Tensor& mean,
                                  const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xmu,
                                  int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_vec(mean, "mean", g, z);
  check_vec(invstd, "invstd", g, z);
  check_vec(sum_dy, "sum_dy", g, z);
  check_vec(sum_dy_xmu, "sum_dy_xmu", g, z);
  Tensor dz = at::empty_like(z);
  const Strides4 zs = strides_of(z), gs = strides_of(grad), ds = strides_of(dz);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* pp = grad_pooled.has_value() ? grad_pooled->const_data_ptr<scalar_t>() : nullptr;
    const Strides4 ps = grad_pooled.has_value() ? strides_of(*grad_pooled) : Strides4{0, 0, 0, 0};
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    const acc_t* s1 = sum_dy.const_data_ptr<acc_t>();
    const acc_t* s2 = sum_dy_xmu.const_data_ptr<acc_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(g.count_per_channel());
    scalar_t* dp = dz.mutable_data_ptr<scalar_t>();
    for_each_z_element(g, [&](int64_t n, int64_t q, int64_t zi, int64_t zj) {
      int64_t c, Y, X;
      acc_t d = 0;
      if (g.logical_of(q, zi, zj, &c, &Y, &X)) {
        const acc_t dy = relu_pool_dy<scalar_t, acc_t>(zp, zs, gp, gs, pp, ps, g, n, c, Y, X, sc[c], sh[c]);
        d = bn_backward_dz<acc_t>(dy, static_cast<acc_t>(zp[zs.at(n, q, zi, zj)]), mp[c], ip[c], sc[c], s1[c], s2[c], inv_m);
      }
      dp[ds.at(n, q, zi, zj)] = static_cast<scalar_t>(d);
    });
  });
  return dz;
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
