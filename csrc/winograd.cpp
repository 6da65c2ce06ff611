// Winograd F(2x2, 3x3) for the CPU's 3x3 convolutions (stride 1, padding 1), float32: the transforms of the
// weights, of the input tiles and of the products, around one batched GEMM in ATen (torch.bmm, MKL or oneDNN):
//   U = G g G^T    per (input channel, output channel):      [16, Cin, Cout]
//   V = B^T d B    per 4 x 4 input tile and input channel:    [16, T, Cin]      T = N * ceil(H/2) * ceil(W/2)
//   M = V @ U      (a GEMM for each of the 16 positions)      [16, T, Cout]
//   Y = A^T M A    per 2 x 2 output tile and output channel, plus a bias, optionally ReLU'd
// A 2 x 2 output tile costs 16 multiplies per (Cin, Cout) pair instead of 36. The transforms are adds (and halves
// in G, exact): fastunet/winograd.py's references compute them in the same order, so kernel and reference agree
// bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu_lines.h"

namespace fastunet {
namespace {

using at::Tensor;

constexpr int64_t kTiles = 16;  // positions of a 4 x 4 tile: the GEMMs' batch

// B^T applied to the four values a0..a3 (a row or a column of a tile).
struct Four {
  float v0, v1, v2, v3;
};
__attribute__((always_inline)) inline Four input_transform(float a0, float a1, float a2, float a3) {
  return {a0 - a2, a1 + a2, a2 - a1, a1 - a3};
}

// V of one tile for channels [0, C): the tile's value at row r, column s, channel c is x[r * rs + s * ss + c * cs];
// position k = 4r + s goes to v[k * v_stride + c]. CS: the channel stride at compile time (0: cs).
template <int64_t CS>
FASTUNET_CPU_CLONES void input_tile_kernel(int64_t C, const float* __restrict__ x, int64_t rs, int64_t ss, int64_t cs,
                                           float* __restrict__ v, int64_t v_stride) {
  const int64_t step = CS > 0 ? CS : cs;
  for (int64_t c = 0; c < C; ++c) {
    float t[4][4];
    for (int s = 0; s < 4; ++s) {
      const float* d = x + s * ss + c * step;
      const Four col = input_transform(d[0], d[rs], d[2 * rs], d[3 * rs]);
      t[0][s] = col.v0;
      t[1][s] = col.v1;
      t[2][s] = col.v2;
      t[3][s] = col.v3;
    }
    for (int r = 0; r < 4; ++r) {
      const Four row = input_transform(t[r][0], t[r][1], t[r][2], t[r][3]);
      v[(4 * r + 0) * v_stride + c] = row.v0;
      v[(4 * r + 1) * v_stride + c] = row.v1;
      v[(4 * r + 2) * v_stride + c] = row.v2;
      v[(4 * r + 3) * v_stride + c] = row.v3;
    }
  }
}

// The 2 x 2 outputs of one tile for channels [0, C) from its 16 products m[k * m_stride + c]: A^T m A plus the bias,
// ReLU'd if RELU (a NaN stays a NaN); output (a, b) of channel c goes to out[a * rs + b * ss + c * cs].
template <int64_t CS, bool RELU>
FASTUNET_CPU_CLONES void output_tile_kernel(int64_t C, const float* __restrict__ m, int64_t m_stride,
                                            const float* __restrict__ bias, float* __restrict__ out, int64_t rs,
                                            int64_t ss, int64_t cs) {
  const int64_t step = CS > 0 ? CS : cs;
  for (int64_t c = 0; c < C; ++c) {
    float s0[4], s1[4];
    for (int s = 0; s < 4; ++s) {
      const float m0 = m[s * m_stride + c], m1 = m[(4 + s) * m_stride + c], m2 = m[(8 + s) * m_stride + c],
                  m3 = m[(12 + s) * m_stride + c];
      s0[s] = m0 + m1 + m2;
      s1[s] = m1 - m2 - m3;
    }
    float y[4] = {s0[0] + s0[1] + s0[2] + bias[c], s0[1] - s0[2] - s0[3] + bias[c], s1[0] + s1[1] + s1[2] + bias[c],
                  s1[1] - s1[2] - s1[3] + bias[c]};
    if (RELU)
      for (float& value : y) value = value < 0.0f ? 0.0f : value;
    float* o = out + c * step;
    o[0] = y[0];
    o[ss] = y[1];
    o[rs] = y[2];
    o[rs + ss] = y[3];
  }
}

template <int64_t CS>
void output_tile(bool relu, int64_t C, const float* m, int64_t m_stride, const float* bias, float* out, int64_t rs,
                 int64_t ss, int64_t cs) {
  if (relu) {
    output_tile_kernel<CS, true>(C, m, m_stride, bias, out, rs, ss, cs);
  } else {
    output_tile_kernel<CS, false>(C, m, m_stride, bias, out, rs, ss, cs);
  }
}

// The 16 values A dy A^T of one output-gradient tile for channels [0, C) (the gradient reaching M): dy (a, b) of
// channel c is dy[a * rs + b * ss + c * cs]; position k = 4 k1 + k2 goes to g[k * g_stride + c].
template <int64_t CS>
FASTUNET_CPU_CLONES void grad_tile_kernel(int64_t C, const float* __restrict__ dy, int64_t rs, int64_t ss, int64_t cs,
                                          float* __restrict__ g, int64_t g_stride) {
  const int64_t step = CS > 0 ? CS : cs;
  for (int64_t c = 0; c < C; ++c) {
    const float* d = dy + c * step;
    // A = [[1, 0], [1, 1], [1, -1], [0, -1]] applied to the columns, then to the rows.
    const float y00 = d[0], y01 = d[ss], y10 = d[rs], y11 = d[rs + ss];
    const float p[4][2] = {{y00, y01}, {y00 + y10, y01 + y11}, {y00 - y10, y01 - y11}, {-y10, -y11}};
    for (int k1 = 0; k1 < 4; ++k1) {
      g[(4 * k1) * g_stride + c] = p[k1][0];
      g[(4 * k1 + 1) * g_stride + c] = p[k1][0] + p[k1][1];
      g[(4 * k1 + 2) * g_stride + c] = p[k1][0] - p[k1][1];
      g[(4 * k1 + 3) * g_stride + c] = -p[k1][1];
    }
  }
}

// U = G g G^T for a block of kernels g[3r + s][j]: u[4r + s][j].
template <int64_t J>
__attribute__((always_inline)) inline void weight_block_transform(const float (&g)[9][J], float (&u)[16][J]) {
  float t[4][3][J];
  for (int s = 0; s < 3; ++s)
    for (int64_t j = 0; j < J; ++j) {
      t[0][s][j] = g[s][j];
      t[1][s][j] = (g[s][j] + g[3 + s][j] + g[6 + s][j]) * 0.5f;
      t[2][s][j] = (g[s][j] - g[3 + s][j] + g[6 + s][j]) * 0.5f;
      t[3][s][j] = g[6 + s][j];
    }
  for (int r = 0; r < 4; ++r)
    for (int64_t j = 0; j < J; ++j) {
      u[4 * r][j] = t[r][0][j];
      u[4 * r + 1][j] = (t[r][0][j] + t[r][1][j] + t[r][2][j]) * 0.5f;
      u[4 * r + 2][j] = (t[r][0][j] - t[r][1][j] + t[r][2][j]) * 0.5f;
      u[4 * r + 3][j] = t[r][2][j];
    }
}

constexpr int64_t kWeightBlock = 16;

// Kernel (a, b) of the conv to transform at tap (r, s): w[a * sa + b * sb + r * sr + s * ss], multiplied by
// scale_a[a] and scale_b[b] where given.
struct WeightView {
  const float* w;
  int64_t sa, sb, sr, ss;
  const float* scale_a;
  const float* scale_b;
};

// U[k][a][b0 + j] = (G g G^T)[k] for all a and j < width: a block's 16 transformed rows formed in registers (the
// loops over the block vectorize), written as whole cache lines of U's 16 planes (plane stride `plane`, row `row`).
FASTUNET_CPU_CLONES void weight_block_kernel(const WeightView& view, int64_t A, int64_t b0, int64_t width,
                                             float* __restrict__ u, int64_t plane, int64_t row) {
  for (int64_t a = 0; a < A; ++a) {
    float g[9][kWeightBlock] = {};
    for (int64_t j = 0; j < width; ++j) {
      const float* kernel = view.w + a * view.sa + (b0 + j) * view.sb;
      for (int r = 0; r < 3; ++r)
        for (int s = 0; s < 3; ++s) g[3 * r + s][j] = kernel[r * view.sr + s * view.ss];
    }
    if (view.scale_a != nullptr)
      for (auto& tap : g)
        for (int64_t j = 0; j < kWeightBlock; ++j) tap[j] *= view.scale_a[a];
    if (view.scale_b != nullptr)
      for (auto& tap : g)
        for (int64_t j = 0; j < width; ++j) tap[j] *= view.scale_b[b0 + j];
    float u16[16][kWeightBlock];
    weight_block_transform(g, u16);
    for (int k = 0; k < 16; ++k)
      for (int64_t j = 0; j < width; ++j) u[k * plane + a * row + j] = u16[k][j];
  }
}

struct TileGrid {
  int64_t N, H, W, th, tw;
  int64_t count() const { return N * th * tw; }
  void tile(int64_t t, int64_t* n, int64_t* i, int64_t* j) const {
    *j = t % tw;
    *i = t / tw % th;
    *n = t / (tw * th);
  }
};

TileGrid tile_grid(const Tensor& x) {
  const int64_t H = x.size(2), W = x.size(3);
  return TileGrid{x.size(0), H, W, (H + 1) / 2, (W + 1) / 2};
}

void check_float_4d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastunet.winograd: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastunet.winograd: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, "fastunet.winograd: ", name, " must be 4-D [N, C, H, W], got ", t.dim(), "-D");
}

void winograd_weights(const Tensor& weight, const c10::optional<Tensor>& scale, bool transposed, Tensor& u) {
  check_float_4d(weight, "weight");
  TORCH_CHECK(weight.size(2) == 3 && weight.size(3) == 3, "fastunet.winograd_weights: expected a 3x3 kernel, got ",
              weight.sizes());
  const int64_t O = weight.size(0), I = weight.size(1);
  const float* sp = nullptr;
  Tensor scale_c;
  if (scale.has_value()) {
    TORCH_CHECK(
        scale->dim() == 1 && scale->size(0) == O && scale->scalar_type() == at::kFloat && scale->device().is_cpu(),
        "fastunet.winograd_weights: scale must be a float32 CPU vector of ", O, " values");
    scale_c = scale->contiguous();
    sp = scale_c.const_data_ptr<float>();
  }
  // U[k][a][b]: a the transformed conv's input channel, b its output channel.
  const int64_t A = transposed ? O : I, B = transposed ? I : O;
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.sizes() == at::IntArrayRef({kTiles, A, B}) &&
                  u.stride(2) == 1 && u.stride(1) == B && u.stride(0) >= A * B,
              "fastunet.winograd_weights: u must be a float32 CPU tensor [16, ", A, ", ", B,
              "] with rows contiguous and planes apart, got ", u.scalar_type(), " ", u.sizes(), " strides ",
              u.strides());
  // The transformed conv's kernel (a, b) at (r, s): the forward one's (b, a) at (r, s), or for the input gradient
  // its (a, b) at (2 - r, 2 - s), rotated by 180 degrees.
  const int64_t so = weight.stride(0), si = weight.stride(1), sr = weight.stride(2), ss = weight.stride(3);
  const WeightView view =
      transposed ? WeightView{weight.const_data_ptr<float>() + 2 * sr + 2 * ss, so, si, -sr, -ss, sp, nullptr}
                 : WeightView{weight.const_data_ptr<float>(), si, so, sr, ss, nullptr, sp};
  float* up = u.mutable_data_ptr<float>();
  at::parallel_for(0, (B + kWeightBlock - 1) / kWeightBlock, 1, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t b0 = blk * kWeightBlock;
      weight_block_kernel(view, A, b0, std::min(kWeightBlock, B - b0), up + b0, u.stride(0), B);
    }
  });
}

// The tiles' rows of V (or M) from first_tile on: [16, tiles, C], contiguous.
void check_tile_rows(const Tensor& t, const char* op, const char* name, const TileGrid& tg, int64_t first_tile,
                     int64_t C) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == kTiles &&
                  t.size(2) == C && t.is_contiguous(),
              "fastunet.", op, ": ", name, " must be a contiguous float32 CPU tensor [16, tiles, ", C, "], got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(first_tile >= 0 && first_tile + t.size(1) <= tg.count(), "fastunet.", op, ": tiles ", first_tile, "..",
              first_tile + t.size(1), " outside the ", tg.count(), " tiles of the image");
}

// Calls kernel(t, corner, row stride, column stride, channel stride) for each tile t in [t0, t1) of `image`, whose
// Size x Size pixels start at row 2i + offset, column 2j + offset: in place, or for a tile reaching outside the
// image from a copy in `border` (zero outside, channels innermost).
template <int Size, typename Kernel>
void for_each_tile(const Tensor& image, const TileGrid& tg, int64_t t0, int64_t t1, int64_t offset,
                   std::vector<float>& border, const Kernel& kernel) {
  const int64_t C = image.size(1);
  const float* p = image.const_data_ptr<float>();
  const int64_t sn = image.stride(0), sc = image.stride(1), sh = image.stride(2), sw = image.stride(3);
  for (int64_t t = t0; t < t1; ++t) {
    int64_t n, i, j;
    tg.tile(t, &n, &i, &j);
    const int64_t h0 = 2 * i + offset, w0 = 2 * j + offset;
    if (h0 >= 0 && h0 + Size <= tg.H && w0 >= 0 && w0 + Size <= tg.W) {
      kernel(t, p + n * sn + h0 * sh + w0 * sw, sh, sw, sc);
      continue;
    }
    border.assign(Size * Size * C, 0.0f);
    for (int r = 0; r < Size; ++r)
      for (int s = 0; s < Size; ++s) {
        const int64_t h = h0 + r, w = w0 + s;
        if (h < 0 || h >= tg.H || w < 0 || w >= tg.W) continue;
        const float* src = p + n * sn + h * sh + w * sw;
        for (int64_t c = 0; c < C; ++c) border[(Size * r + s) * C + c] = src[c * sc];
      }
    kernel(t, border.data(), Size * C, C, int64_t{1});
  }
}

// V of tiles [t0, t1) of x (4 x 4, from one pixel above and left of each 2 x 2 output tile), tile t at
// v + (t - first_tile) * C, planes v_stride apart.
void input_tiles(const Tensor& x, const TileGrid& tg, int64_t t0, int64_t t1, int64_t first_tile, float* v,
                 int64_t v_stride, std::vector<float>& border) {
  const int64_t C = x.size(1);
  for_each_tile<4>(x, tg, t0, t1, -1, border, [&](int64_t t, const float* corner, int64_t rs, int64_t ss, int64_t cs) {
    float* vt = v + (t - first_tile) * C;
    if (cs == 1) {
      input_tile_kernel<1>(C, corner, rs, ss, 1, vt, v_stride);
    } else {
      input_tile_kernel<0>(C, corner, rs, ss, cs, vt, v_stride);
    }
  });
}

// The outputs of tiles [t0, t1) into out from their products, tile t at m + (t - first_tile) * C, planes m_stride
// apart.
void output_tiles(const float* m, int64_t m_stride, const float* bias, bool relu, const TileGrid& tg, int64_t t0,
                  int64_t t1, int64_t first_tile, Tensor& out, std::vector<float>& border) {
  const int64_t C = out.size(1);
  float* op = out.mutable_data_ptr<float>();
  const int64_t sn = out.stride(0), sc = out.stride(1), sh = out.stride(2), sw = out.stride(3);
  for (int64_t t = t0; t < t1; ++t) {
    int64_t n, i, j;
    tg.tile(t, &n, &i, &j);
    const int64_t h0 = 2 * i, w0 = 2 * j;
    const float* mt = m + (t - first_tile) * C;
    float* corner = op + n * sn + h0 * sh + w0 * sw;
    if (h0 + 1 < tg.H && w0 + 1 < tg.W) {
      if (sc == 1) {
        output_tile<1>(relu, C, mt, m_stride, bias, corner, sh, sw, 1);
      } else {
        output_tile<0>(relu, C, mt, m_stride, bias, corner, sh, sw, sc);
      }
      continue;
    }
    border.resize(4 * C);  // a border tile's outputs: [2 rows][2 columns][C]
    output_tile<1>(relu, C, mt, m_stride, bias, border.data(), 2 * C, C, 1);
    for (int a = 0; a < 2; ++a)
      for (int s = 0; s < 2; ++s) {
        if (h0 + a >= tg.H || w0 + s >= tg.W) continue;
        for (int64_t c = 0; c < C; ++c) corner[a * sh + s * sw + c * sc] = border[(2 * a + s) * C + c];
      }
  }
}

// The bias as a contiguous float32 vector of C values (zeros without one).
Tensor bias_vector(const c10::optional<Tensor>& bias, int64_t C, const char* op) {
  Tensor b = at::zeros({C}, at::TensorOptions().dtype(at::kFloat));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "fastunet.", op, ": bias must be a float32 CPU vector of ", C, " values");
    b.copy_(*bias);
  }
  return b;
}

void winograd_input(const Tensor& x, int64_t first_tile, Tensor& v) {
  check_float_4d(x, "x");
  const TileGrid tg = tile_grid(x);
  check_tile_rows(v, "winograd_input", "v", tg, first_tile, x.size(1));
  if (v.numel() == 0) return;
  float* vp = v.mutable_data_ptr<float>();
  at::parallel_for(first_tile, first_tile + v.size(1), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> border;
    input_tiles(x, tg, t0, t1, first_tile, vp, v.size(1) * x.size(1), border);
  });
}

void winograd_output(const Tensor& m, const c10::optional<Tensor>& bias, bool relu, int64_t first_tile, Tensor& out) {
  check_float_4d(out, "out");
  const TileGrid tg = tile_grid(out);
  const int64_t C = out.size(1);
  check_tile_rows(m, "winograd_output", "m", tg, first_tile, C);
  const Tensor b = bias_vector(bias, C, "winograd_output");
  if (out.numel() == 0) return;
  at::parallel_for(first_tile, first_tile + m.size(1), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> border;
    output_tiles(m.const_data_ptr<float>(), m.size(1) * C, b.const_data_ptr<float>(), relu, tg, t0, t1, first_tile, out,
                 border);
  });
}

// The whole conv, chunk by chunk of `chunk_tiles` tiles, the chunks in parallel: each thread transforms its chunk's
// tiles into its own V, multiplies by U (ATen's bmm, on the thread alone inside the parallel region) and transforms
// the products into out; V and M stay in the thread's cache for chunks of a few hundred kilobytes. A single chunk
// (all tiles) runs each step on all threads instead: wide layers, where U outweighs the tiles, read U once so.
void winograd_conv3x3(const Tensor& x, const Tensor& u, const c10::optional<Tensor>& bias, bool relu,
                      int64_t chunk_tiles, Tensor& out) {
  check_float_4d(x, "x");
  check_float_4d(out, "out");
  const int64_t cin = x.size(1), cout = out.size(1);
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.dim() == 3 && u.size(0) == kTiles &&
                  u.size(1) == cin && u.size(2) == cout,
              "fastunet.winograd_conv3x3: u must be float32 [16, ", cin, ", ", cout, "] on the CPU, got ",
              u.scalar_type(), " ", u.sizes());
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(2) == x.size(2) && out.size(3) == x.size(3),
              "fastunet.winograd_conv3x3: out ", out.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(chunk_tiles > 0, "fastunet.winograd_conv3x3: chunk_tiles must be positive, got ", chunk_tiles);
  const TileGrid tg = tile_grid(x);
  const Tensor b = bias_vector(bias, cout, "winograd_conv3x3");
  if (out.numel() == 0) return;
  const int64_t chunks = (tg.count() + chunk_tiles - 1) / chunk_tiles;
  // V and M, made for this call by the calling thread (nothing is kept between calls). A worker thread's own
  // allocations would go to its own glibc arena, which keeps their pages after the call (malloc_trim does not
  // give back an arena's top); the calling thread's blocks are given back (steady-state calls reuse them).
  const auto tiles = [&](float* buffer, int64_t count) {
    return std::make_pair(at::from_blob(buffer, {kTiles, count, cin}, x.options()),
                          at::from_blob(buffer + kTiles * count * cin, {kTiles, count, cout}, x.options()));
  };
  if (chunks == 1) {  // one chunk: every thread on each transform and on the GEMM
    const Tensor buffer = at::empty({kTiles * tg.count() * (cin + cout)}, x.options());
    auto [v, m] = tiles(buffer.mutable_data_ptr<float>(), tg.count());
    at::parallel_for(0, tg.count(), 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> border;
      input_tiles(x, tg, t0, t1, 0, v.mutable_data_ptr<float>(), tg.count() * cin, border);
    });
    at::bmm_out(m, v, u);
    at::parallel_for(0, tg.count(), 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> border;
      output_tiles(m.const_data_ptr<float>(), tg.count() * cout, b.const_data_ptr<float>(), relu, tg, t0, t1, 0, out,
                   border);
    });
    return;
  }
  // Each thread's V and M in its own slice of one buffer, by its thread number in the parallel region.
  const int64_t threads = at::get_num_threads(), per_thread = kTiles * chunk_tiles * (cin + cout);
  const Tensor buffers = at::empty({threads * per_thread}, x.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads, "fastunet.winograd_conv3x3: thread ", thread, " of ", threads);
    std::vector<float> border;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t first = chunk * chunk_tiles, count = std::min(chunk_tiles, tg.count() - first);
      auto [v, m] = tiles(buffers.mutable_data_ptr<float>() + thread * per_thread, count);
      input_tiles(x, tg, first, first + count, first, v.mutable_data_ptr<float>(), count * cin, border);
      at::bmm_out(m, v, u);
      output_tiles(m.const_data_ptr<float>(), count * cout, b.const_data_ptr<float>(), relu, tg, first, first + count,
                   first, out, border);
    }
  });
}

// The output-gradient transforms of tiles [t0, t1) of dy, tile t at g + (t - first_tile) * C, planes g_stride apart.
void grad_tiles(const Tensor& dy, const TileGrid& tg, int64_t t0, int64_t t1, int64_t first_tile, float* g,
                int64_t g_stride, std::vector<float>& border) {
  const int64_t C = dy.size(1);
  for_each_tile<2>(dy, tg, t0, t1, 0, border, [&](int64_t t, const float* corner, int64_t rs, int64_t ss, int64_t cs) {
    float* gt = g + (t - first_tile) * C;
    if (cs == 1) {
      grad_tile_kernel<1>(C, corner, rs, ss, 1, gt, g_stride);
    } else {
      grad_tile_kernel<0>(C, corner, rs, ss, cs, gt, g_stride);
    }
  });
}

// dw[o][i] = G^T du[i][o] G (3 x 3 from the 16 planes of du [16, I, O], planes du_plane apart), for input channels
// [i0, i1).
void weight_grad_back_transform(const float* du, int64_t du_plane, int64_t I, int64_t O, int64_t i0, int64_t i1,
                                Tensor& dw) {
  float* wp = dw.mutable_data_ptr<float>();
  const int64_t so = dw.stride(0), si = dw.stride(1), sr = dw.stride(2), ss = dw.stride(3);
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t o = 0; o < O; ++o) {
      float d[16];
      for (int k = 0; k < 16; ++k) d[k] = du[k * du_plane + i * O + o];
      // G^T = [[1, .5, .5, 0], [0, .5, -.5, 0], [0, .5, .5, 1]] applied to the rows, then to the columns.
      float t[3][4];
      for (int k2 = 0; k2 < 4; ++k2) {
        t[0][k2] = d[k2] + (d[4 + k2] + d[8 + k2]) * 0.5f;
        t[1][k2] = (d[4 + k2] - d[8 + k2]) * 0.5f;
        t[2][k2] = (d[4 + k2] + d[8 + k2]) * 0.5f + d[12 + k2];
      }
      for (int r = 0; r < 3; ++r) {
        float* row = wp + o * so + i * si + r * sr;
        row[0] = t[r][0] + (t[r][1] + t[r][2]) * 0.5f;
        row[ss] = (t[r][1] - t[r][2]) * 0.5f;
        row[2 * ss] = (t[r][1] + t[r][2]) * 0.5f + t[r][3];
      }
    }
}

// The weight gradient of conv2d(x, w, padding=1) from the output's gradient dy, by Winograd: dU[k] = V[k]^T Gd[k]
// summed over the tiles (V the input transform, Gd = A dy A^T), then dw = G^T dU G. Chunks of `chunk_tiles` tiles,
// in parallel into one accumulator per thread, summed in thread order (the result depends on the thread count, not
// on the run); a single chunk runs each step on all threads instead.
void winograd_weight_grad(const Tensor& x, const Tensor& dy, int64_t chunk_tiles, Tensor& dw) {
  check_float_4d(x, "x");
  check_float_4d(dy, "grad");
  check_float_4d(dw, "grad_weight");
  const int64_t cin = x.size(1), cout = dy.size(1);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == x.size(2) && dy.size(3) == x.size(3),
              "fastunet.winograd_weight_grad: grad ", dy.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(dw.sizes() == at::IntArrayRef({cout, cin, 3, 3}), "fastunet.winograd_weight_grad: grad_weight must be [",
              cout, ", ", cin, ", 3, 3], got ", dw.sizes());
  TORCH_CHECK(chunk_tiles > 0, "fastunet.winograd_weight_grad: chunk_tiles must be positive, got ", chunk_tiles);
  const TileGrid tg = tile_grid(x);
  const int64_t chunks = (tg.count() + chunk_tiles - 1) / chunk_tiles, plane = cin * cout;
  Tensor du;
  if (chunks == 1) {
    Tensor v = at::empty({kTiles, tg.count(), cin}, x.options()),
           g = at::empty({kTiles, tg.count(), cout}, x.options());
    at::parallel_for(0, tg.count(), 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> border;
      input_tiles(x, tg, t0, t1, 0, v.mutable_data_ptr<float>(), tg.count() * cin, border);
      grad_tiles(dy, tg, t0, t1, 0, g.mutable_data_ptr<float>(), tg.count() * cout, border);
    });
    du = at::bmm(v.transpose(1, 2), g);
  } else {
    const int threads = at::get_num_threads();
    Tensor partial = at::zeros({threads, kTiles, cin, cout}, x.options());
    // Each thread's V and G, made by the calling thread (as winograd_conv3x3's).
    Tensor tiles = at::empty({threads, kTiles, chunk_tiles, cin + cout}, x.options());
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      Tensor acc = partial[at::get_thread_num()];
      Tensor mine = tiles[at::get_thread_num()].view({-1});
      Tensor v = mine.narrow(0, 0, kTiles * chunk_tiles * cin).view({kTiles, chunk_tiles, cin}),
             g = mine.narrow(0, kTiles * chunk_tiles * cin, kTiles * chunk_tiles * cout)
                     .view({kTiles, chunk_tiles, cout});
      std::vector<float> border;
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t first = chunk * chunk_tiles, count = std::min(chunk_tiles, tg.count() - first);
        Tensor vc = v.narrow(1, 0, count), gc = g.narrow(1, 0, count);
        input_tiles(x, tg, first, first + count, first, v.mutable_data_ptr<float>(), chunk_tiles * cin, border);
        grad_tiles(dy, tg, first, first + count, first, g.mutable_data_ptr<float>(), chunk_tiles * cout, border);
        acc.baddbmm_(vc.transpose(1, 2), gc);
      }
    });
    du = partial.sum(0);
  }
  du = du.contiguous();
  at::parallel_for(0, cin, 1, [&](int64_t i0, int64_t i1) {
    weight_grad_back_transform(du.const_data_ptr<float>(), plane, cin, cout, i0, i1, dw);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastunet, m) {
  m.def("winograd_weights(Tensor weight, Tensor? scale, bool transposed, Tensor(a!) u) -> ()");
  m.def("winograd_input(Tensor x, int first_tile, Tensor(a!) v) -> ()");
  m.def("winograd_output(Tensor m, Tensor? bias, bool relu, int first_tile, Tensor(a!) out) -> ()");
  m.def("winograd_conv3x3(Tensor x, Tensor u, Tensor? bias, bool relu, int chunk_tiles, Tensor(a!) out) -> ()");
  m.def("winograd_weight_grad(Tensor x, Tensor grad, int chunk_tiles, Tensor(a!) grad_weight) -> ()");
}

TORCH_LIBRARY_IMPL(fastunet, CPU, m) {
  m.impl("winograd_weights", &winograd_weights);
  m.impl("winograd_input", &winograd_input);
  m.impl("winograd_output", &winograd_output);
  m.impl("winograd_conv3x3", &winograd_conv3x3);
  m.impl("winograd_weight_grad", &winograd_weight_grad);
}

}  // namespace fastunet
