// Schemas of the fastunet ops (declared once here) and their CPU backend (ops_host.h).
//
// The ops are the memory-bound parts around each convolution of a U-Net block; see fastunet_math.h for
// the geometry (plain block: upscale 1; sub-pixel up block: upscale 2). Convolutions stay in ATen.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops_host.h"

namespace fastunet {
namespace {

using at::Tensor;

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

// The CPU backend of ops_host.h: cell rows in parallel (OpenMP through at::parallel_for); reductions sum in double
// over a fixed number of chunks of cell rows, so that a result does not depend on the thread count.
struct CpuBackend {
  static constexpr int64_t kReductionChunks = 64;

  template <typename acc_t>
  using sum_type = double;

  static int guard(const Tensor&) { return 0; }

  template <typename scalar_t, typename F>
  static void for_each_cell(const CellGrid& cg, bool channels_inner, int width, const F& cells) {
    with_run_width<scalar_t>(width, [&](auto run) {
      constexpr int V = decltype(run)::value;
      at::parallel_for(0, cg.rows(), 1, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row)
          visit_row<V>(cg, row, channels_inner,
                       [&](int64_t n, int64_t u, int64_t v, int64_t c0) { cells.template run<V>(n, u, v, c0); });
      });
    });
  }

  template <typename scalar_t, typename sum_t, typename F, typename Finish>
  static void reduce(const CellGrid& cg, bool channels_inner, int width, const F& cells, const Finish& finish,
                     const at::TensorOptions&) {
    const int64_t C = cg.g.C;
    const ReductionPlan plan = plan_reduction(cg.rows(), kReductionChunks);
    std::vector<sum_t> constants(C);
    for (int64_t c = 0; c < C; ++c) constants[c] = cells.channel_constant(c);
    std::vector<sum_t> partial(2 * plan.chunks * C);
    with_run_width<scalar_t>(width, [&](auto run) {
      constexpr int V = decltype(run)::value;
      at::parallel_for(0, plan.chunks, 1, [&](int64_t k0, int64_t k1) {
        std::vector<SumPair<sum_t>> acc(C);
        for (int64_t chunk = k0; chunk < k1; ++chunk) {
          std::fill(acc.begin(), acc.end(), SumPair<sum_t>{0, 0});
          const int64_t first = chunk * plan.rows_per_chunk, last = std::min(first + plan.rows_per_chunk, cg.rows());
          for (int64_t row = first; row < last; ++row)
            visit_row<V>(cg, row, channels_inner, [&](int64_t n, int64_t u, int64_t v, int64_t c0) {
              cells.template run<V>(n, u, v, c0, constants.data() + c0, acc.data() + c0);
            });
          for (int64_t c = 0; c < C; ++c) store_partial(partial.data(), plan.chunks, C, chunk, c, acc[c]);
        }
      });
    });
    for (int64_t c = 0; c < C; ++c) finish(c, sum_over_chunks(partial.data(), plan.chunks, C, c));
  }
};

}  // namespace

TORCH_LIBRARY(fastunet, m) {
  m.def("bn_stats(Tensor z, int upscale) -> (Tensor mean, Tensor var)");
  m.def("bn_relu_pool(Tensor z, Tensor scale, Tensor shift, int upscale, Tensor(a!) out, Tensor(b!)? pooled) -> ()");
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

TORCH_LIBRARY_IMPL(fastunet, CPU, m) { register_cell_ops<CpuBackend>(m); }

}  // namespace fastunet
