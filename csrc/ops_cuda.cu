// CUDA kernels of the fastunet ops. The per-cell work (math, indexing, masks) is fastunet_math.h's, shared
// with the CPU twin (ops.cpp), so CI exercises it without a GPU; what is CUDA's own here is the mapping of
// cells and channels onto threads and the two-step, atomic-free reductions. All offsets are 64-bit.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "ops_common.h"

namespace fastunet {
namespace {

using at::Tensor;
using c10::optional;

// A block is 256 threads over a tile of channels x cell columns of one cell row. Consecutive lanes take
// consecutive channels when channels are the contiguous dimension (channels_last, and the concat-buffer
// slices of it): a warp then reads and writes 32 adjacent elements. Otherwise lanes take consecutive cells.
constexpr int kThreads = 256;

template <bool kChannelsFastest>
struct Tile {
  static constexpr int kChannels = kChannelsFastest ? 32 : 8;
  static constexpr int kColumns = kThreads / kChannels;
  __device__ static int channel_lane() { return kChannelsFastest ? threadIdx.x % kChannels : threadIdx.x / kColumns; }
  __device__ static int column_lane() { return kChannelsFastest ? threadIdx.x / kChannels : threadIdx.x % kColumns; }
};

// Grid (cell rows, channel tiles): calls f(n, u, v, c) for every cell and channel.
template <bool kChannelsFastest, typename F>
__global__ void __launch_bounds__(kThreads) cells_kernel(CellGrid cg, F f) {
  using T = Tile<kChannelsFastest>;
  const int64_t c = int64_t(blockIdx.y) * T::kChannels + T::channel_lane();
  if (c >= cg.g.C) return;
  int64_t n, u;
  cg.row_of(blockIdx.x, &n, &u);
  const int64_t v0 = cg.first_v();
  const int64_t cols = cg.cols();
  for (int64_t col = T::column_lane(); col < cols; col += T::kColumns) f(n, u, v0 + col, c);
}

// Grid (chunks, channel tiles): block `chunk` sums f's partial sums over its cell rows into
// the [2, chunks, C] partial sums (store_partial). Within a block the column lanes are summed in order.
template <bool kChannelsFastest, typename sum_t, typename F>
__global__ void __launch_bounds__(kThreads) cell_sums_kernel(CellGrid cg, int64_t rows_per_chunk, F f,
                                                             sum_t* partial) {
  using T = Tile<kChannelsFastest>;
  __shared__ SumPair<sum_t> lanes[T::kColumns][T::kChannels];
  const int cl = T::channel_lane(), vl = T::column_lane();
  const int64_t C = cg.g.C, chunks = gridDim.x, chunk = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * T::kChannels + cl;
  SumPair<sum_t> acc{0, 0};
  if (c < C) {
    const sum_t constant = f.channel_constant(c);
    const int64_t first = chunk * rows_per_chunk, last = min(first + rows_per_chunk, cg.rows()), cols = cg.cols();
    for (int64_t row = first; row < last; ++row) {
      int64_t n, u;
      cg.row_of(row, &n, &u);
      const int64_t v0 = cg.first_v();
      for (int64_t col = vl; col < cols; col += T::kColumns) f(n, u, v0 + col, c, constant, &acc);
    }
  }
  lanes[vl][cl] = acc;
  __syncthreads();
  if (vl != 0 || c >= C) return;
  SumPair<sum_t> total{0, 0};
  for (int i = 0; i < T::kColumns; ++i) {
    total.first += lanes[i][cl].first;
    total.second += lanes[i][cl].second;
  }
  store_partial(partial, chunks, C, chunk, c, total);
}

template <typename scalar_t, typename acc_t>
__global__ void finish_stats_kernel(StatsCells<scalar_t, acc_t> f, const acc_t* partial, int64_t chunks,
                                    acc_t* mean, acc_t* var) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= f.g.C) return;
  const SumPair<double> total = sum_over_chunks(partial, chunks, f.g.C, c);
  double m, v;
  finish_stats(static_cast<double>(f.channel_constant(c)), total.first, total.second,
               static_cast<double>(f.g.count_per_channel()), &m, &v);
  mean[c] = static_cast<acc_t>(m);
  var[c] = static_cast<acc_t>(v);
}

template <typename acc_t>
__global__ void finish_sums_kernel(const acc_t* partial, int64_t chunks, int64_t C, acc_t* first, acc_t* second) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const SumPair<double> total = sum_over_chunks(partial, chunks, C, c);
  first[c] = static_cast<acc_t>(total.first);
  second[c] = static_cast<acc_t>(total.second);
}

template <bool kChannelsFastest>
dim3 tile_grid(int64_t rows, int64_t channels) {
  const int64_t tiles = (channels + Tile<kChannelsFastest>::kChannels - 1) / Tile<kChannelsFastest>::kChannels;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() && tiles <= 65535, "fastunet: ", rows, " cell rows x ",
              tiles, " channel tiles exceed the CUDA grid");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
}

// Launches cells_kernel over the grid, with the lane layout that matches z's.
template <typename F>
void launch_cells(const CellGrid& cg, bool channels_fastest_layout, const F& f) {
  if (cg.rows() == 0 || cg.g.C == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (channels_fastest_layout) {
    cells_kernel<true><<<tile_grid<true>(cg.rows(), cg.g.C), kThreads, 0, stream>>>(cg, f);
  } else {
    cells_kernel<false><<<tile_grid<false>(cg.rows(), cg.g.C), kThreads, 0, stream>>>(cg, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches cell_sums_kernel; returns the [2, chunks, C] partial sums and the chunk count.
template <typename sum_t, typename F>
std::tuple<Tensor, int64_t> launch_cell_sums(const CellGrid& cg, bool channels_fastest_layout, const F& f,
                                             const at::TensorOptions& opts) {
  const int64_t tile_channels = channels_fastest_layout ? Tile<true>::kChannels : Tile<false>::kChannels;
  const int64_t channel_tiles = (cg.g.C + tile_channels - 1) / tile_channels;
  // About eight resident blocks per SM in all (more chunks only lengthen the final sum).
  const int64_t target_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const ReductionPlan plan = plan_reduction(cg.rows(), std::max<int64_t>(1, target_blocks / channel_tiles));
  Tensor partial = at::empty({2, plan.chunks, cg.g.C}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  sum_t* p = partial.mutable_data_ptr<sum_t>();
  if (channels_fastest_layout) {
    dim3 grid = tile_grid<true>(plan.chunks, cg.g.C);
    cell_sums_kernel<true, sum_t><<<grid, kThreads, 0, stream>>>(cg, plan.rows_per_chunk, f, p);
  } else {
    dim3 grid = tile_grid<false>(plan.chunks, cg.g.C);
    cell_sums_kernel<false, sum_t><<<grid, kThreads, 0, stream>>>(cg, plan.rows_per_chunk, f, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, plan.chunks};
}

unsigned vector_blocks(int64_t C) { return static_cast<unsigned>((C + kThreads - 1) / kThreads); }

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& z, int64_t upscale) {
  const Geom g = geom_of(z, upscale);
  TORCH_CHECK(g.count_per_channel() > 0, "fastunet.bn_stats: empty batch");
  c10::cuda::CUDAGuard guard(z.device());
  const auto opts = z.options().dtype(acc_dtype(z.scalar_type()));
  Tensor mean = at::empty({g.C}, opts), var = at::empty({g.C}, opts);
  if (g.C == 0) return {mean, var};
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatsCells<scalar_t, acc_t> f{cell_tensors<scalar_t>(z), g};
    auto [partial, chunks] = launch_cell_sums<acc_t>(CellGrid{g, 0}, channels_fastest(z), f, opts);
    finish_stats_kernel<scalar_t, acc_t><<<vector_blocks(g.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        f, partial.const_data_ptr<acc_t>(), chunks, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

void bn_relu_pool_cuda(const Tensor& z, const Tensor& scale, const Tensor& shift, int64_t upscale, Tensor& out,
                       const optional<Tensor>& pooled) {
  const Geom g = check_bn_relu_pool_args(z, scale, shift, upscale, out, pooled);
  c10::cuda::CUDAGuard guard(z.device());
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "bn_relu_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = bn_relu_pool_cells<scalar_t, acc_t>(z, g, scale, shift, out, pooled);
    launch_cells(CellGrid{g, 0}, channels_fastest(z), f);
  });
}

// relu_pool_backward (mean null) or bn_relu_backward_apply: the gradient of every z element.
Tensor z_grad_cuda(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z, const Tensor& scale,
                   const Tensor& shift, const Tensor* mean, const Tensor* invstd, const Tensor* sum_dy,
                   const Tensor* sum_dy_xmu, const Geom& g) {
  c10::cuda::CUDAGuard guard(z.device());
  Tensor dz = at::empty_like(z);
  FASTUNET_DISPATCH_FLOATING(z.scalar_type(), "z_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = z_grad_cells<scalar_t, acc_t>(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu,
                                                 g, dz);
    launch_cells(CellGrid{g, 1}, channels_fastest(z), f);
  });
  return dz;
}

Tensor relu_pool_backward_cuda(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                               const Tensor& scale, const Tensor& shift, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  return z_grad_cuda(grad, grad_pooled, z, scale, shift, nullptr, nullptr, nullptr, nullptr, g);
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
    const auto f = backward_sum_cells<scalar_t, acc_t, acc_t>(grad, grad_pooled, z, scale, shift, mean, g);
    auto [partial, chunks] = launch_cell_sums<acc_t>(CellGrid{g, 0}, channels_fastest(z), f, opts);
    finish_sums_kernel<acc_t><<<vector_blocks(g.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        partial.const_data_ptr<acc_t>(), chunks, g.C, sum_dy.mutable_data_ptr<acc_t>(),
        sum_dy_xmu.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor bn_relu_backward_apply_cuda(const Tensor& grad, const optional<Tensor>& grad_pooled, const Tensor& z,
                                   const Tensor& scale, const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                   const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t upscale) {
  const Geom g = check_backward_args(grad, grad_pooled, z, scale, shift, upscale);
  check_bn_vectors({{&mean, "mean"}, {&invstd, "invstd"}, {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}, g, z);
  return z_grad_cuda(grad, grad_pooled, z, scale, shift, &mean, &invstd, &sum_dy, &sum_dy_xmu, g);
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
