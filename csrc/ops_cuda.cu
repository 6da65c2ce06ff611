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

// A block is 256 threads over a tile of channel runs x cell columns of one cell row. Where channels are the
// contiguous dimension (channels_last, and the concat-buffer slices of it), consecutive lanes take consecutive
// runs of V channels (fastunet_math.h: 16-byte runs where the tensors allow), so a warp moves contiguous
// memory; otherwise lanes take consecutive cells.
constexpr int kThreads = 256;

struct LaneMap {
  int run_lanes;         // lanes over channel runs: a power of two, at most 32
  bool columns_fastest;  // consecutive threads take consecutive cell columns
  __host__ __device__ int column_lanes() const { return kThreads / run_lanes; }
  __device__ int run_lane() const { return columns_fastest ? threadIdx.x / column_lanes() : threadIdx.x % run_lanes; }
  __device__ int column_lane() const {
    return columns_fastest ? threadIdx.x % column_lanes() : threadIdx.x / run_lanes;
  }
};

LaneMap lane_map(int64_t runs, bool channels_fastest_layout) {
  if (!channels_fastest_layout) return LaneMap{8, true};
  int lanes = 1;
  while (lanes < 32 && lanes < runs) lanes *= 2;
  return LaneMap{lanes, false};
}

// Grid (cell rows, run tiles): calls f.run<V>(n, u, v, c0) for every cell and run of V channels.
template <int V, typename F>
__global__ void __launch_bounds__(kThreads) cells_kernel(CellGrid cg, LaneMap lanes, F f) {
  const int64_t c0 = (int64_t(blockIdx.y) * lanes.run_lanes + lanes.run_lane()) * V;
  if (c0 >= cg.g.C) return;
  int64_t n, u;
  cg.row_of(blockIdx.x, &n, &u);
  const int64_t v0 = cg.first_v(), cols = cg.cols();
  for (int64_t col = lanes.column_lane(); col < cols; col += lanes.column_lanes()) f.template run<V>(n, u, v0 + col, c0);
}

// Grid (chunks, run tiles): block `chunk` sums the cells' partial sums over its cell rows into the [2, chunks, C]
// partial sums (store_partial). Within a block the column lanes are summed in order.
template <int V, typename sum_t, typename F>
__global__ void __launch_bounds__(kThreads) cell_sums_kernel(CellGrid cg, LaneMap lanes, int64_t rows_per_chunk, F f,
                                                             sum_t* partial) {
  __shared__ SumPair<sum_t> lane_sums[kThreads][V];
  const int rl = lanes.run_lane(), cl = lanes.column_lane(), slot = cl * lanes.run_lanes + rl;
  const int64_t C = cg.g.C, chunks = gridDim.x, chunk = blockIdx.x;
  const int64_t c0 = (int64_t(blockIdx.y) * lanes.run_lanes + rl) * V;
  SumPair<sum_t> acc[V];
  for (int i = 0; i < V; ++i) acc[i] = SumPair<sum_t>{0, 0};
  if (c0 < C) {
    sum_t constants[V];
    for (int i = 0; i < V; ++i) constants[i] = f.channel_constant(c0 + i);
    const int64_t first = chunk * rows_per_chunk, last = min(first + rows_per_chunk, cg.rows());
    const int64_t v0 = cg.first_v(), cols = cg.cols();
    for (int64_t row = first; row < last; ++row) {
      int64_t n, u;
      cg.row_of(row, &n, &u);
      for (int64_t col = cl; col < cols; col += lanes.column_lanes()) f.template run<V>(n, u, v0 + col, c0, constants, acc);
    }
  }
  for (int i = 0; i < V; ++i) lane_sums[slot][i] = acc[i];
  __syncthreads();
  if (cl != 0 || c0 >= C) return;
  for (int i = 0; i < V; ++i) {
    SumPair<sum_t> total{0, 0};
    for (int j = 0; j < lanes.column_lanes(); ++j) {
      total.first += lane_sums[j * lanes.run_lanes + rl][i].first;
      total.second += lane_sums[j * lanes.run_lanes + rl][i].second;
    }
    store_partial(partial, chunks, C, chunk, c0 + i, total);
  }
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

dim3 tile_grid(int64_t rows, int64_t runs, const LaneMap& lanes) {
  const int64_t tiles = (runs + lanes.run_lanes - 1) / lanes.run_lanes;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() && tiles <= 65535, "fastunet: ", rows, " cell rows x ",
              tiles, " channel tiles exceed the CUDA grid");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
}

// Launches cells_kernel over the grid, with runs of `width` channels and the lane layout that matches z's.
template <typename scalar_t, typename F>
void launch_cells(const CellGrid& cg, bool channels_fastest_layout, int width, const F& f) {
  if (cg.rows() == 0 || cg.g.C == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_run_width<scalar_t>(width, [&](auto run) {
    constexpr int V = decltype(run)::value;
    const LaneMap lanes = lane_map(cg.g.C / V, channels_fastest_layout);
    cells_kernel<V><<<tile_grid(cg.rows(), cg.g.C / V, lanes), kThreads, 0, stream>>>(cg, lanes, f);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches cell_sums_kernel; returns the [2, chunks, C] partial sums and the chunk count.
template <typename scalar_t, typename sum_t, typename F>
std::tuple<Tensor, int64_t> launch_cell_sums(const CellGrid& cg, bool channels_fastest_layout, int width, const F& f,
                                             const at::TensorOptions& opts) {
  // About eight resident blocks per SM in all (more chunks only lengthen the final sum).
  const int64_t target_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  Tensor partial;
  int64_t chunks = 0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_run_width<scalar_t>(width, [&](auto run) {
    constexpr int V = decltype(run)::value;
    const int64_t runs = cg.g.C / V;
    const LaneMap lanes = lane_map(runs, channels_fastest_layout);
    const int64_t tiles = (runs + lanes.run_lanes - 1) / lanes.run_lanes;
    const ReductionPlan plan = plan_reduction(cg.rows(), std::max<int64_t>(1, target_blocks / tiles));
    partial = at::empty({2, plan.chunks, cg.g.C}, opts);
    chunks = plan.chunks;
    cell_sums_kernel<V, sum_t><<<tile_grid(plan.chunks, runs, lanes), kThreads, 0, stream>>>(
        cg, lanes, plan.rows_per_chunk, f, partial.mutable_data_ptr<sum_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, chunks};
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
    auto [partial, chunks] =
        launch_cell_sums<scalar_t, acc_t>(CellGrid{g, 0}, channels_fastest(z), run_width<scalar_t>(g.C, {&z}), f, opts);
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
    launch_cells<scalar_t>(CellGrid{g, 0}, channels_fastest(z),
                           run_width<scalar_t>(g.C, {&z, &out, optional_ptr(pooled)}), f);
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
    launch_cells<scalar_t>(CellGrid{g, 1}, channels_fastest(z),
                           run_width<scalar_t>(g.C, {&z, &grad, optional_ptr(grad_pooled), &dz}), f);
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
    auto [partial, chunks] = launch_cell_sums<scalar_t, acc_t>(
        CellGrid{g, 0}, channels_fastest(z), run_width<scalar_t>(g.C, {&z, &grad, optional_ptr(grad_pooled)}), f, opts);
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
