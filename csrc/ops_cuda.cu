// CUDA kernels of the fastunet ops. The per-cell work (math, indexing, masks) is fastunet_math.h's, shared
// with the CPU twin (ops.cpp), so CI exercises it without a GPU; what is CUDA's own here is the mapping of
// cells and channels onto threads and the two-step, atomic-free reductions. All offsets are 64-bit.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>

#include "ops_host.h"

namespace fastunet {
namespace {

using at::Tensor;

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
  for (int64_t col = lanes.column_lane(); col < cols; col += lanes.column_lanes())
    f.template run<V>(n, u, v0 + col, c0);
}

// Grid (chunks, run tiles): block `chunk` sums the cells' partial sums over its cell rows into the [2, chunks, C]
// partial sums (store_partial). Within a block the column lanes are summed in order.
template <int V, typename sum_t, typename F>
__global__ void __launch_bounds__(kThreads)
    cell_sums_kernel(CellGrid cg, LaneMap lanes, int64_t rows_per_chunk, F f, sum_t* partial) {
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
      for (int64_t col = cl; col < cols; col += lanes.column_lanes())
        f.template run<V>(n, u, v0 + col, c0, constants, acc);
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

// One thread per channel: finish(c, the channel's totals of the [2, chunks, C] partial sums).
template <typename sum_t, typename Finish>
__global__ void finish_kernel(const sum_t* partial, int64_t chunks, int64_t C, Finish finish) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c < C) finish(c, sum_over_chunks(partial, chunks, C, c));
}

dim3 tile_grid(int64_t rows, int64_t runs, const LaneMap& lanes) {
  const int64_t tiles = (runs + lanes.run_lanes - 1) / lanes.run_lanes;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() && tiles <= 65535, "fastunet: ", rows, " cell rows x ", tiles,
              " channel tiles exceed the CUDA grid");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
}

#ifdef FASTUNET_CUDA_ARCHS
constexpr const char* kBuiltArchs = FASTUNET_CUDA_ARCHS;
#else
constexpr const char* kBuiltArchs = "the archs of TORCH_CUDA_ARCH_LIST at build time";
#endif

// Where this build holds no code for the current GPU, an error that says what to do instead of CUDA's "no kernel
// image is available"; checked once per device.
void check_code_for_current_device() {
  constexpr int kDevices = 128;
  static std::array<std::atomic<bool>, kDevices> has_code{};
  const int index = at::cuda::current_device();
  if (index < kDevices && has_code[index].load(std::memory_order_relaxed)) return;
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, finish_kernel<float, SumsFinish<float>>) != cudaSuccess) {
    (void)cudaGetLastError();
    const cudaDeviceProp* gpu = at::cuda::getDeviceProperties(index);
    TORCH_CHECK(false, "fastunet's compiled CUDA kernels hold no code for ", gpu->name, " (sm_", gpu->major, gpu->minor,
                "; built for ", kBuiltArchs,
                "). Run fastunet's Triton kernels instead (the default: "
                "leave FASTUNET_CUDA_BACKEND unset, or call fastunet.ops.select_cuda_kernels(\"triton\")), or rebuild "
                "with TORCH_CUDA_ARCH_LIST=\"",
                gpu->major, ".", gpu->minor, "\"");
  }
  if (index < kDevices) has_code[index].store(true, std::memory_order_relaxed);
}

// The CUDA backend of ops_host.h.
struct CudaBackend {
  template <typename acc_t>
  using sum_type = acc_t;

  // The device guard of an op's call, which also checks that this build has code for the device.
  struct Guard {
    c10::cuda::CUDAGuard device;
    explicit Guard(const Tensor& z) : device(z.device()) { check_code_for_current_device(); }
  };

  static Guard guard(const Tensor& z) { return Guard(z); }

  // cells_kernel over the grid, with runs of `width` channels and the lane layout that matches z's.
  template <typename scalar_t, typename F>
  static void for_each_cell(const CellGrid& cg, bool channels_fastest_layout, int width, const F& cells) {
    if (cg.rows() == 0 || cg.g.C == 0) return;
    const auto stream = at::cuda::getCurrentCUDAStream();
    with_run_width<scalar_t>(width, [&](auto run) {
      constexpr int V = decltype(run)::value;
      const LaneMap lanes = lane_map(cg.g.C / V, channels_fastest_layout);
      cells_kernel<V><<<tile_grid(cg.rows(), cg.g.C / V, lanes), kThreads, 0, stream>>>(cg, lanes, cells);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // cell_sums_kernel into [2, chunks, C] partial sums, about eight resident blocks per SM in all (more chunks
  // only lengthen the final sum), then finish_kernel.
  template <typename scalar_t, typename sum_t, typename F, typename Finish>
  static void reduce(const CellGrid& cg, bool channels_fastest_layout, int width, const F& cells, const Finish& finish,
                     const at::TensorOptions& opts) {
    const int64_t target_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
    const auto stream = at::cuda::getCurrentCUDAStream();
    with_run_width<scalar_t>(width, [&](auto run) {
      constexpr int V = decltype(run)::value;
      const int64_t runs = cg.g.C / V;
      const LaneMap lanes = lane_map(runs, channels_fastest_layout);
      const int64_t tiles = (runs + lanes.run_lanes - 1) / lanes.run_lanes;
      const ReductionPlan plan = plan_reduction(cg.rows(), std::max<int64_t>(1, target_blocks / tiles));
      Tensor partial = at::empty({2, plan.chunks, cg.g.C}, opts);
      cell_sums_kernel<V, sum_t><<<tile_grid(plan.chunks, runs, lanes), kThreads, 0, stream>>>(
          cg, lanes, plan.rows_per_chunk, cells, partial.mutable_data_ptr<sum_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finish_kernel<<<static_cast<unsigned>((cg.g.C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          partial.const_data_ptr<sum_t>(), plan.chunks, cg.g.C, finish);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastunet, CUDA, m) { register_cell_ops<CudaBackend>(m); }

}  // namespace fastunet
