// Schemas of the fastunet ops (declared once here) and their CPU backend (ops_host.h).
//
// The ops are the memory-bound parts around each convolution of a U-Net block; see fastunet_math.h for
// the geometry (plain block: upscale 1; sub-pixel up block: upscale 2). Convolutions stay in ATen.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_lines.h"
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

// The line kernel of each op (cpu_lines.h) and the line dimension its tensors allow.
template <typename scalar_t, typename acc_t>
cpu::LineDim line_dim_of(const BnReluPoolCells<scalar_t, acc_t>& f) {
  return cpu::line_dim({&f.t.zs, &f.os, f.pooled != nullptr ? &f.ps : nullptr});
}

template <typename scalar_t, typename acc_t>
bool unit_affine(const BnReluPoolCells<scalar_t, acc_t>&) {
  return false;
}

template <typename St, typename scalar_t, typename acc_t>
void run_line(const BnReluPoolCells<scalar_t, acc_t>& f, const cpu::LineStart& l, bool) {
  cpu::for_each_row(l, [&](const cpu::LineStart& row) {
    if (f.pooled != nullptr) {
      cpu::bn_relu_pool_line<St, scalar_t, acc_t, true>(f, row);
    } else {
      cpu::bn_relu_pool_line<St, scalar_t, acc_t, false>(f, row);
    }
  });
}

template <typename scalar_t, typename acc_t>
cpu::LineDim line_dim_of(const ZGradCells<scalar_t, acc_t>& f) {
  return cpu::line_dim({&f.t.zs, &f.t.gs, f.t.grad_pooled != nullptr ? &f.t.gps : nullptr, &f.ds});
}

// Whether relu_pool_backward's scale and shift are 1 and 0 in every channel (exact mode, after ATen's BN): its lines
// then skip recomputing BN+ReLU (cpu::line_activation).
template <typename scalar_t, typename acc_t>
bool unit_affine(const ZGradCells<scalar_t, acc_t>& f) {
  if (f.bn.sum_dy != nullptr) return false;
  for (int64_t c = 0; c < f.g.C; ++c)
    if (!(f.scale[c] == acc_t(1) && f.shift[c] == acc_t(0))) return false;
  return true;
}

template <typename St, typename scalar_t, typename acc_t>
void run_line(const ZGradCells<scalar_t, acc_t>& f, const cpu::LineStart& l, bool unit) {
  const bool pool = f.t.grad_pooled != nullptr, bn = f.bn.sum_dy != nullptr;
  if (pool && bn) {
    cpu::z_grad_line<St, scalar_t, acc_t, true, true, true>(f, l);
  } else if (pool) {
    if (unit) {
      cpu::z_grad_line<St, scalar_t, acc_t, true, false, false>(f, l);
    } else {
      cpu::z_grad_line<St, scalar_t, acc_t, true, false, true>(f, l);
    }
  } else if (bn) {
    cpu::z_grad_line<St, scalar_t, acc_t, false, true, true>(f, l);
  } else if (unit) {
    cpu::z_grad_line<St, scalar_t, acc_t, false, false, false>(f, l);
  } else {
    cpu::z_grad_line<St, scalar_t, acc_t, false, false, true>(f, l);
  }
}

template <typename scalar_t, typename sum_t>
cpu::LineDim line_dim_of(const StatsCells<scalar_t, sum_t>& f) {
  return cpu::line_dim({&f.t.zs});
}

template <typename St, typename scalar_t, typename sum_t>
void run_sum_line(const StatsCells<scalar_t, sum_t>& f, const cpu::LineStart& l, const double* constants, double* first,
                  double* second) {
  cpu::for_each_row(l, [&](const cpu::LineStart& row) { cpu::stats_line<St>(f, row, constants, first, second); });
}

template <typename scalar_t, typename acc_t, typename sum_t>
cpu::LineDim line_dim_of(const BackwardSumCells<scalar_t, acc_t, sum_t>& f) {
  return cpu::line_dim({&f.t.zs, &f.t.gs, f.t.grad_pooled != nullptr ? &f.t.gps : nullptr});
}

template <typename St, typename scalar_t, typename acc_t, typename sum_t>
void run_sum_line(const BackwardSumCells<scalar_t, acc_t, sum_t>& f, const cpu::LineStart& l, const double* constants,
                  double* first, double* second) {
  if (f.t.grad_pooled != nullptr) {
    cpu::backward_sums_line<St, scalar_t, acc_t, sum_t, true>(f, l, constants, first, second);
  } else {
    cpu::backward_sums_line<St, scalar_t, acc_t, sum_t, false>(f, l, constants, first, second);
  }
}

// Calls cell(n, u, v, c) for channels [c_begin, c_end) of the cells of cell row `row` with a pixel outside the
// image. Interior cells are u, v in [0, out/2) for both upscales.
template <typename Cell>
void visit_border_cells(const CellGrid& cg, int64_t row, int64_t c_begin, int64_t c_end, const Cell& cell) {
  const Geom& g = cg.g;
  int64_t n, u;
  cg.row_of(row, &n, &u);
  const int64_t first = cg.first_v(), last = first + cg.cols();
  const bool interior_row = u >= 0 && u < g.out_h() / 2;
  const int64_t lo = interior_row ? 0 : last, hi = interior_row ? g.out_w() / 2 : last;  // interior cells: [lo, hi)
  const auto visit = [&](int64_t v_begin, int64_t v_end) {
    for (int64_t v = v_begin; v < v_end; ++v)
      for (int64_t c = c_begin; c < c_end; ++c) cell(n, u, v, c);
  };
  visit(first, lo);
  visit(hi, last);
}

// Along channels: the border cells of cell row `row` (cell), then a line of all channels per interior cell (line).
template <typename Line, typename Cell>
void visit_row_channel_lines(const CellGrid& cg, int64_t row, const Line& line, const Cell& cell) {
  const Geom& g = cg.g;
  visit_border_cells(cg, row, 0, g.C, cell);
  int64_t n, u;
  cg.row_of(row, &n, &u);
  if (u < 0 || u >= g.out_h() / 2) return;
  for (int64_t v = 0; v < g.out_w() / 2; ++v) line(cpu::ChannelSteps{}, cpu::LineStart{n, u, v, 0, g.C});
}

// Along the width: the border cells of sample n's cell rows in channel c (cell), then one line over all its
// interior cells (line: every interior cell row, cpu::LineStart::rows).
template <typename Line, typename Cell>
void visit_plane_lines(const CellGrid& cg, int64_t n, int64_t c, const Line& line, const Cell& cell) {
  const Geom& g = cg.g;
  const int64_t rows = cg.rows_per_sample();
  for (int64_t r = 0; r < rows; ++r) visit_border_cells(cg, n * rows + r, c, c + 1, cell);
  const cpu::LineStart interior{n, 0, 0, c, g.out_w() / 2, g.out_h() / 2};
  if (interior.length == 0 || interior.rows == 0) return;
  if (g.S == 1) {
    line(cpu::WidthSteps<1>{}, interior);
  } else {
    line(cpu::WidthSteps<2>{}, interior);
  }
}

// The CPU backend of ops_host.h: vectorized lines (cpu_lines.h) where the tensors have unit stride in channels or
// width, else cell by cell; work in parallel (OpenMP through at::parallel_for) by cell rows, or by (sample, channel)
// planes along the width. Reductions sum in double in an order fixed by the shapes, never by the thread count:
// along the width channel by channel, else over a fixed number of chunks of cell rows summed in order.
struct CpuBackend {
  static constexpr int64_t kReductionChunks = 64;
  // The dtypes that take the line loops: float32 and the 16-bit floats (loaded, widened to float32, rounded once
  // on store; cpu_lines.h); float64, which runs the pure-PyTorch path in training, goes cell by cell.
  template <typename scalar_t>
  static constexpr bool kLines =
      std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

  template <typename acc_t>
  using sum_type = double;

  static int guard(const Tensor&) { return 0; }

  template <typename scalar_t, typename F>
  static void for_each_cell(const CellGrid& cg, bool channels_inner, int width, const F& cells) {
    if constexpr (kLines<scalar_t>) {
      const cpu::LineDim dim = line_dim_of(cells);
      if (dim != cpu::LineDim::Strided) return for_each_line(cg, dim, cells);
    }
    with_run_width<scalar_t>(width, [&](auto run) {
      constexpr int V = decltype(run)::value;
      at::parallel_for(0, cg.rows(), 1, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row)
          visit_row<V>(cg, row, channels_inner,
                       [&](int64_t n, int64_t u, int64_t v, int64_t c0) { cells.template run<V>(n, u, v, c0); });
      });
    });
  }

  template <typename F>
  static void for_each_line(const CellGrid& cg, cpu::LineDim dim, const F& cells) {
    const bool unit = unit_affine(cells);
    const auto line = [&](auto steps, const cpu::LineStart& l) { run_line<decltype(steps)>(cells, l, unit); };
    const auto cell = [&](int64_t n, int64_t u, int64_t v, int64_t c) { cells.template run<1>(n, u, v, c); };
    if (dim == cpu::LineDim::Channels) {
      at::parallel_for(0, cg.rows(), 1, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) visit_row_channel_lines(cg, row, line, cell);
      });
      return;
    }
    // Along the width, a thread takes whole (sample, channel) planes: its rows are consecutive in memory.
    const int64_t C = cg.g.C;
    at::parallel_for(0, cg.g.N * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) visit_plane_lines(cg, p / C, p % C, line, cell);
    });
  }

  template <typename scalar_t, typename sum_t, typename F, typename Finish>
  static void reduce(const CellGrid& cg, bool channels_inner, int width, const F& cells, const Finish& finish,
                     const at::TensorOptions&) {
    const int64_t C = cg.g.C;
    const ReductionPlan plan = plan_reduction(cg.rows(), kReductionChunks);
    cpu::LineDim dim = cpu::LineDim::Strided;
    if constexpr (kLines<scalar_t>) dim = line_dim_of(cells);
    std::vector<sum_t> constants(C);
    for (int64_t c = 0; c < C; ++c) constants[c] = cells.channel_constant(c);
    if constexpr (kLines<scalar_t>) {
      if (dim == cpu::LineDim::Width) return reduce_width_lines(cg, cells, finish, constants);
    }
    std::vector<sum_t> partial(2 * plan.chunks * C);
    with_run_width<scalar_t>(dim == cpu::LineDim::Strided ? width : 1, [&](auto run) {
      constexpr int V = decltype(run)::value;
      at::parallel_for(0, plan.chunks, 1, [&](int64_t k0, int64_t k1) {
        std::vector<SumPair<sum_t>> acc(C);
        std::vector<double> first(C), second(C);
        for (int64_t chunk = k0; chunk < k1; ++chunk) {
          std::fill(acc.begin(), acc.end(), SumPair<sum_t>{0, 0});
          std::fill(first.begin(), first.end(), 0.0);
          std::fill(second.begin(), second.end(), 0.0);
          const int64_t begin = chunk * plan.rows_per_chunk, end = std::min(begin + plan.rows_per_chunk, cg.rows());
          for (int64_t row = begin; row < end; ++row) {
            if (dim == cpu::LineDim::Strided) {
              visit_row<V>(cg, row, channels_inner, [&](int64_t n, int64_t u, int64_t v, int64_t c0) {
                cells.template run<V>(n, u, v, c0, constants.data() + c0, acc.data() + c0);
              });
              continue;
            }
            if constexpr (kLines<scalar_t>)
              visit_row_channel_lines(
                  cg, row,
                  [&](auto steps, const cpu::LineStart& l) {
                    run_sum_line<decltype(steps)>(cells, l, constants.data() + l.c0, first.data() + l.c0,
                                                  second.data() + l.c0);
                  },
                  [&](int64_t n, int64_t u, int64_t v, int64_t c) {
                    cells.template run<1>(n, u, v, c, constants.data() + c, acc.data() + c);
                  });
          }
          for (int64_t c = 0; c < C; ++c)
            store_partial(partial.data(), plan.chunks, C, chunk, c,
                          SumPair<sum_t>{acc[c].first + first[c], acc[c].second + second[c]});
        }
      });
    });
    for (int64_t c = 0; c < C; ++c) finish(c, sum_over_chunks(partial.data(), plan.chunks, C, c));
  }

  // Along the width, a thread takes whole channels, each summed over its samples' planes in order.
  template <typename sum_t, typename F, typename Finish>
  static void reduce_width_lines(const CellGrid& cg, const F& cells, const Finish& finish,
                                 const std::vector<sum_t>& constants) {
    at::parallel_for(0, cg.g.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        SumPair<sum_t> cell_sums{0, 0};
        double first = 0, second = 0;
        for (int64_t n = 0; n < cg.g.N; ++n)
          visit_plane_lines(
              cg, n, c,
              [&](auto steps, const cpu::LineStart& l) {
                run_sum_line<decltype(steps)>(cells, l, constants.data() + c, &first, &second);
              },
              [&](int64_t n, int64_t u, int64_t v, int64_t) {
                cells.template run<1>(n, u, v, c, constants.data() + c, &cell_sums);
              });
        finish(c, SumPair<double>{cell_sums.first + first, cell_sums.second + second});
      }
    });
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
