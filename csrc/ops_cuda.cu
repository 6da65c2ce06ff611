// CUDA kernels of the fastunet ops. The per-element math is fastunet_math.h, shared with the CPU twin
// (ops.cpp), so CI exercises the same arithmetic without a GPU. All indexing is 64-bit.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "ops_common.h"

namespace fastunet {
namespace {

using at::Tensor;
using c10::optional;

constexpr int kReduceThreads = 256;
constexpr int kElementThreads = 256;

inline int64_t blocks_for(int64_t n) {
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((n + kElementThreads - 1) / kElementThreads, max_blocks));
}

// Decodes a flat index over [N, C, H, W] with channels fastest (channels_last) or columns fastest.
struct Decoder4 {
  int64_t C, H, W;
  bool channels_fastest;
  __device__ void operator()(int64_t k, int64_t* n, int64_t* c, int64_t* h, int64_t* w) const {
    if (channels_fastest) {
      *c = k % C; k /= C;
      *w = k % W; k /= W;
      *h = k % H; *n = k / H;
    } else {
      *w = k % W; k /= W;
      *h = k % H; k /= H;
      *c = k % C; *n = k / C;
    }
  }
};

inline bool channels_fastest(const Tensor& t) { return t.dim() == 4 && t.stride(1) == 1 && t.size(1) > 1; }

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_kernel(const scalar_t* __restrict__ z, Strides4 zs, Geom g, acc_t* mean, acc_t* var) {
  __shared__ Welford<acc_t> part[kReduceThreads];
  const int64_t c = blockIdx.x;
  const int64_t OW = g.out_w(), OH = g.out_h(), M = g.count_per_channel();
  Welford<acc_t> w{};
  for (int64_t k = threadIdx.x; k < M; k += blockDim.x) {
    const int64_t X = k % OW, Y = (k / OW) % OH, n = k / (OW * OH);
    w.push(static_cast<acc_t>(z[g.z_offset(zs, n, c, Y, X)]));
  }
  part[threadIdx.x] = w;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x].merge(part[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mean[c] = part[0].mean;
    var[c] = part[0].var_biased();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_pool_kernel(const scalar_t* __restrict__ z, Strides4 zs, Geom g, const acc_t* scale,
                                    const acc_t* shift, scalar_t* out, Strides4 os, scalar_t* pooled, Strides4 ps,
                                    Decoder4 dec, int64_t total) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, Y, X;
    dec(k, &n, &c, &Y, &X);
    const acc_t s = scale[c], t = shift[c];
    if (pooled == nullptr) {
      out[os.at(n, c, Y, X)] = static_cast<scalar_t>(logical_y<scalar_t, scalar_t, acc_t>(z, zs, g, n, c, Y, X, s, t));
      continue;
    }
    acc_t v[4];
    for (int q = 0; q < 4; ++q) {
      v[q] = logical_y<scalar_t, scalar_t, acc_t>(z, zs, g, n, c, 2 * Y + q / 2, 2 * X + q % 2, s, t);
      out[os.at(n, c, 2 * Y + q / 2, 2 * X + q % 2)] = static_cast<scalar_t>(v[q]);
    }
    pooled[ps.at(n, c, Y, X)] = static_cast<scalar_t>(v[pool_argmax4<acc_t>(v)]);
  }
}

// Gradient w.r.t. every z element: dy (relu_pool_backward) or the BN-backward dz (bn_relu_backward_apply).
template <typename scalar_t, typename acc_t, bool kBnBackward>
__global__ void z_grad_kernel(const scalar_t* __restrict__ grad, Strides4 gs, const scalar_t* __restrict__ grad_pooled,
                              Strides4 ps, const scalar_t* __restrict__ z, Strides4 zs, Geom g, const acc_t* scale,
                              const acc_t* shift, const acc_t* mean, const acc_t* invstd, const acc_t* sum_dy,
                              const acc_t* sum_dy_xmu, scalar_t* dz, Strides4 ds, Decoder4 dec, int64_t total) {
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(g.count_per_channel());
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, q, zi, zj, c, Y, X;
    dec(k, &n, &q, &zi, &zj);
    acc_t d = 0;
    if (g.logical_of(q, zi, zj, &c, &Y, &X)) {
      d = relu_pool_dy<scalar_t, acc_t>(z, zs, grad, gs, grad_pooled, ps, g, n, c, Y, X, scale[c], shift[c]);
      if (kBnBackward)
        d = bn_backward_dz<acc_t>(d, static_cast<acc_t>(z[zs.at(n, q, zi, zj)]), mean[c], invstd[c], scale[c],
                                  sum_dy[c], sum_dy_xmu[c], inv_m);
    }
    dz[ds.at(n, q, zi, zj)] = static_cast<scalar_t>(d);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_backward_reduce_kernel(const scalar_t* __restrict__ grad, Strides4 gs,
                                               const scalar_t* __restrict__ grad_pooled, Strides4 ps,
                                               const scalar_t* __restrict__ z, Strides4 zs, Geom g,
                                               const acc_t* scale, const acc_t* shift, const acc_t* mean,
                                               acc_t* sum_dy, acc_t* sum_dy_xmu) {
  __shared__ acc_t p1[kReduceThreads], p2[kReduceThreads];
  const int64_t c = blockIdx.x;
  const int64_t OW = g.out_w(), OH = g.out_h(), M = g.count_per_channel();
  const acc_t s = scale[c], t = shift[c], mu = mean[c];
  acc_t r1 = 0, r2 = 0;
  for (int64_t k = threadIdx.x; k < M; k += blockDim.x) {
    const int64_t X = k % OW, Y = (k / OW) % OH, n = k / (OW * OH);
    const acc_t d = relu_pool_dy<scalar_t, acc_t>(z, zs, grad, gs, grad_pooled, ps, g, n, c, Y, X, s, t);
    r1 += d;
    r2 += d * (static_cast<acc_t>(z[g.z_offset(zs, n, c, Y, X)]) - mu);
  }
  p1[threadIdx.x] = r1;
  p2[threadIdx.x] = r2;
  __syncthreads();
  for (int st = blockDim.x / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) {
      p1[threadIdx.x] += p1[threadIdx.x + st];
      p2[threadIdx.x] += p2[threadIdx.x + st];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sum_dy[c] = p1[0];
    sum_dy_xmu[c] = p2[0];
  }
}

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& z, int64_t upscale) {
  const Geom g = geom_of(z, upscale);
  TORCH_CHECK(g.count_per_channel() > 0, "fastunet.bn_stats: empty batch");
  c10::cuda::CUDAGuard guard(z.device());
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_stats_kernel<scalar_t, acc_t><<<g.C, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.const_data_ptr<scalar_t>(), strides_of(z), g, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

void bn_relu_pool_cuda(const Tensor& z, const Tensor& scale, const Tensor& shift, int64_t upscale, Tensor& out,
                       const optional<Tensor>& pooled) {
  const Geom g = geom_of(z, upscale);
  check_vec(scale, "scale", g, z);
  check_vec(shift, "shift", g, z);
  check_out_like(out, "out", g, z);
  check_pooled(pooled, "pooled", g, z);
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard guard(z.device());
  const bool pool = pooled.has_value();
  const int64_t H = pool ? g.out_h() / 2 : g.out_h(), W = pool ? g.out_w() / 2 : g.out_w();
  const Decoder4 dec{g.C, H, W, channels_fastest(out)};
  const int64_t total = g.N * g.C * H * W;
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_relu_pool_kernel<scalar_t, acc_t><<<blocks_for(total), kElementThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.const_data_ptr<scalar_t>(), strides_of(z), g, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), strides_of(out), pool ? pooled->mutable_data_ptr<scalar_t>() : nullptr,
        pool ? strides_of(*pooled) : Strides4{0, 0, 0, 0}, dec, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <bool kBnBackward>
Tensor launch_z_grad(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z, const Tensor& scale,
                     const Tensor& shift, const Tensor* mean, const Tensor* invstd, const Tensor* sum_dy,
                     const Tensor* sum_dy_xmu, const Geom& g) {
  c10::cuda::CUDAGuard guard(z.device());
  Tensor dz = at::empty_like(z);
  const int64_t total = z.numel();
  if (total == 0) return dz;
  const Decoder4 dec{z.size(1), z.size(2), z.size(3), channels_fastest(dz)};
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "z_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto vec = [](const Tensor* t) { return t ? t->const_data_ptr<acc_t>() : nullptr; };
    z_grad_kernel<scalar_t, acc_t, kBnBackward><<<blocks_for(total), kElementThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), strides_of(grad),
        grad_pooled.has_value() ? grad_pooled->const_data_ptr<scalar_t>() : nullptr,
        grad_pooled.has_value() ? strides_of(*grad_pooled) : Strides4{0, 0, 0, 0}, z.const_data_ptr<scalar_t>(),
        strides_of(z), g, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), vec(mean), vec(invstd),
        vec(sum_dy), vec(sum_dy_xmu), dz.mutable_data_ptr<scalar_t>(), strides_of(dz), dec, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

Tensor relu_pool_backward_cuda(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                               const Tensor& scale, const Tensor& shift, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  return launch_z_grad<false>(grad, grad_pooled, z, scale, shift, nullptr, nullptr, nullptr, nullptr, g);
}

std::tuple<Tensor, Tensor> bn_relu_backward_reduce_cuda(const Tensor& grad, const optional<Tensor>& grad_pooled,
                                                        const Tensor& z, const Tensor& scale, const Tensor& shift,
                                                        const Tensor& mean, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_vec(mean, "mean", g, z);
  c10::cuda::CUDAGuard guard(z.device());
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor sum_dy = at::empty({g.C}, opts), sum_dy_xmu = at::empty({g.C}, opts);
  if (g.C == 0) return {sum_dy, sum_dy_xmu};
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_relu_backward_reduce_kernel<scalar_t, acc_t><<<g.C, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), strides_of(grad),
        grad_pooled.has_value() ? grad_pooled->const_data_ptr<scalar_t>() : nullptr,
        grad_pooled.has_value() ? strides_of(*grad_pooled) : Strides4{0, 0, 0, 0}, z.const_data_ptr<scalar_t>(),
        strides_of(z), g, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
        sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor bn_relu_backward_apply_cuda(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                                   const Tensor& scale, const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                   const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_vec(mean, "mean", g, z);
  check_vec(invstd, "invstd", g, z);
  check_vec(sum_dy, "sum_dy", g, z);
  check_vec(sum_dy_xmu, "sum_dy_xmu", g, z);
  return launch_z_grad<true>(grad, grad_pooled, z, scale, shift, &mean, &invstd, &sum_dy, &sum_dy_xmu, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastunet, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_relu_pool", &bn_relu_pool_cuda);
  m.impl("relu_pool_backward", &relu_pool_backward_cuda);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cuda);
}

}  // namespace fastunet
