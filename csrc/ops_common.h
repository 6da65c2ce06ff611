// Shape, dtype and device checks shared by the CPU and CUDA implementations of the fastunet ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "fastunet_math.h"

namespace fastunet {

inline Strides4 strides_of(const at::Tensor& t) { return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The dtype of per-channel vectors (scale, shift, mean, ...) for a given activation dtype.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool channels_fastest(const at::Tensor& t) { return t.dim() == 4 && t.stride(1) == 1 && t.size(1) > 1; }

// The tensors a per-cell function reads (grad and grad_pooled absent in the forward ops).
template <typename scalar_t>
CellTensors<scalar_t> cell_tensors(const at::Tensor& z, const at::Tensor* grad = nullptr,
                                   const c10::optional<at::Tensor>* grad_pooled = nullptr) {
  CellTensors<scalar_t> t{z.const_data_ptr<scalar_t>(), strides_of(z), nullptr,
                          Strides4{0, 0, 0, 0},         nullptr,       Strides4{0, 0, 0, 0}};
  if (grad != nullptr) {
    t.grad = grad->const_data_ptr<scalar_t>();
    t.gs = strides_of(*grad);
  }
  if (grad_pooled != nullptr && grad_pooled->has_value()) {
    t.grad_pooled = (*grad_pooled)->const_data_ptr<scalar_t>();
    t.gps = strides_of(**grad_pooled);
  }
  return t;
}

inline const at::Tensor* optional_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// Channels per run (fastunet_math.h): 16 bytes of scalar_t where C and every tensor of the op allow it
// (channel stride 1, the other strides multiples of the run, a 16-byte aligned start), else 1.
template <typename scalar_t>
int run_width(int64_t C, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int64_t wide = 16 / sizeof(scalar_t);
  if (C % wide != 0) return 1;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (t->stride(1) != 1 || t->stride(0) % wide || t->stride(2) % wide || t->stride(3) % wide ||
        reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0)
      return 1;
  }
  return static_cast<int>(wide);
}

// Calls f(std::integral_constant<int, V>{}) with V the run width `width` (1 or 16 bytes of scalar_t).
template <typename scalar_t, typename F>
void with_run_width(int width, const F& f) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (width == wide) {
    f(std::integral_constant<int, wide>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// How a per-channel reduction splits the cell rows into chunks: each chunk's partial sums are formed on their
// own, then summed over the chunks in order, so that a result depends on the plan alone (never on the
// thread count or scheduling).
struct ReductionPlan {
  int64_t rows_per_chunk, chunks;
};

inline ReductionPlan plan_reduction(int64_t rows, int64_t max_chunks) {
  const int64_t wanted = std::max<int64_t>(1, std::min(rows, max_chunks));
  const int64_t rows_per_chunk = std::max<int64_t>(1, (rows + wanted - 1) / wanted);
  return ReductionPlan{rows_per_chunk, std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk)};
}

inline Geom geom_of(const at::Tensor& z, int64_t upscale) {
  TORCH_CHECK(z.dim() == 4, "fastunet: expected a 4-D conv output [N, C, H, W], got ", z.dim(), "-D");
  TORCH_CHECK(upscale == 1 || upscale == 2, "fastunet: upscale must be 1 or 2, got ", upscale);
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "fastunet: expected a floating-point tensor, got ", z.scalar_type());
  const int64_t phases = upscale * upscale;
  TORCH_CHECK(z.size(1) % phases == 0, "fastunet: conv output channels ", z.size(1),
              " are not a multiple of upscale^2 = ", phases);
  const int64_t H = z.size(2) - (upscale - 1), W = z.size(3) - (upscale - 1);
  TORCH_CHECK(H > 0 && W > 0, "fastunet: conv output spatial size ", z.sizes(), " too small for upscale ", upscale);
  return Geom{z.size(0), z.size(1) / phases, H, W, upscale};
}

inline void check_vec(const at::Tensor& v, const char* name, const Geom& g, const at::Tensor& z) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == g.C, "fastunet: ", name, " must have shape [", g.C, "], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_dtype(z.scalar_type()), "fastunet: ", name, " must be ",
              acc_dtype(z.scalar_type()), " for ", z.scalar_type(), " activations, got ", v.scalar_type());
  TORCH_CHECK(v.device() == z.device(), "fastunet: ", name, " is on ", v.device(), " but the activations on ",
              z.device());
  TORCH_CHECK(v.is_contiguous(), "fastunet: ", name, " must be contiguous");
}

// A tensor laid out as the logical output [N, C, S*H, S*W] (out or its gradient).
inline void check_out_like(const at::Tensor& t, const char* name, const Geom& g, const at::Tensor& z) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == g.N && t.size(1) == g.C && t.size(2) == g.out_h() && t.size(3) == g.out_w(),
              "fastunet: ", name, " must have shape [", g.N, ", ", g.C, ", ", g.out_h(), ", ", g.out_w(), "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "fastunet: ", name, " has dtype ", t.scalar_type(),
              " but the conv output has ", z.scalar_type());
  TORCH_CHECK(t.device() == z.device(), "fastunet: ", name, " is on ", t.device(), " but the conv output on ",
              z.device());
}

inline void check_pooled(const c10::optional<at::Tensor>& p, const char* name, const Geom& g, const at::Tensor& z) {
  if (!p.has_value()) return;
  const at::Tensor& t = *p;
  TORCH_CHECK(g.out_h() % 2 == 0 && g.out_w() % 2 == 0, "fastunet: max-pool needs an even output size, got ", g.out_h(),
              "x", g.out_w());
  TORCH_CHECK(
      t.dim() == 4 && t.size(0) == g.N && t.size(1) == g.C && t.size(2) == g.out_h() / 2 && t.size(3) == g.out_w() / 2,
      "fastunet: ", name, " must have shape [", g.N, ", ", g.C, ", ", g.out_h() / 2, ", ", g.out_w() / 2, "], got ",
      t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "fastunet: ", name, " has dtype ", t.scalar_type(),
              " but the conv output has ", z.scalar_type());
  TORCH_CHECK(t.device() == z.device(), "fastunet: ", name, " is on ", t.device(), " but the conv output on ",
              z.device());
}

// The checks every cell op shares: z's geometry, the tensor laid out as the logical output (out, or grad in the
// backward ops), its optional max-pooled twin (pooled, grad_pooled), and BN's scale and shift.
inline Geom check_cell_args(const at::Tensor& z, int64_t upscale, const at::Tensor& out_like, const char* out_name,
                            const c10::optional<at::Tensor>& pooled_like, const char* pooled_name,
                            const at::Tensor& scale, const at::Tensor& shift) {
  const Geom g = geom_of(z, upscale);
  check_out_like(out_like, out_name, g, z);
  check_pooled(pooled_like, pooled_name, g, z);
  check_vec(scale, "scale", g, z);
  check_vec(shift, "shift", g, z);
  return g;
}

inline Geom check_bn_relu_pool_args(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                                    int64_t upscale, const at::Tensor& out, const c10::optional<at::Tensor>& pooled) {
  return check_cell_args(z, upscale, out, "out", pooled, "pooled", scale, shift);
}

inline Geom check_backward_args(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_pooled,
                                const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                                int64_t upscale) {
  return check_cell_args(z, upscale, grad, "grad", grad_pooled, "grad_pooled", scale, shift);
}

// The per-channel vectors of BN's backward, each checked as scale and shift are.
inline void check_bn_vectors(std::initializer_list<std::pair<const at::Tensor*, const char*>> vectors, const Geom& g,
                             const at::Tensor& z) {
  for (const auto& [v, name] : vectors) check_vec(*v, name, g, z);
}

// The per-cell functors of the ops (fastunet_math.h), built from checked arguments: one place for the CPU and
// CUDA hosts. z_grad_cells' vector pointers may be null (relu_pool_backward has no BN vectors).
template <typename scalar_t, typename acc_t>
BnReluPoolCells<scalar_t, acc_t> bn_relu_pool_cells(const at::Tensor& z, const Geom& g, const at::Tensor& scale,
                                                    const at::Tensor& shift, at::Tensor& out,
                                                    const c10::optional<at::Tensor>& pooled) {
  return {cell_tensors<scalar_t>(z),
          g,
          scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(),
          strides_of(out),
          pooled.has_value() ? pooled->mutable_data_ptr<scalar_t>() : nullptr,
          pooled.has_value() ? strides_of(*pooled) : Strides4{0, 0, 0, 0}};
}

template <typename scalar_t, typename acc_t>
ZGradCells<scalar_t, acc_t> z_grad_cells(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_pooled,
                                         const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                                         const at::Tensor* mean, const at::Tensor* invstd, const at::Tensor* sum_dy,
                                         const at::Tensor* sum_dy_xmu, const Geom& g, at::Tensor& dz) {
  auto vec = [](const at::Tensor* t) { return t ? t->const_data_ptr<acc_t>() : nullptr; };
  const BnBackwardVectors<acc_t> bn{vec(mean), vec(invstd), vec(sum_dy), vec(sum_dy_xmu),
                                    acc_t(1) / static_cast<acc_t>(g.count_per_channel())};
  return {cell_tensors<scalar_t>(z, &grad, &grad_pooled),
          g,
          scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(),
          bn,
          dz.mutable_data_ptr<scalar_t>(),
          strides_of(dz)};
}

template <typename scalar_t, typename acc_t, typename sum_t>
BackwardSumCells<scalar_t, acc_t, sum_t> backward_sum_cells(const at::Tensor& grad,
                                                            const c10::optional<at::Tensor>& grad_pooled,
                                                            const at::Tensor& z, const at::Tensor& scale,
                                                            const at::Tensor& shift, const at::Tensor& mean,
                                                            const Geom& g) {
  return {cell_tensors<scalar_t>(z, &grad, &grad_pooled), g, scale.const_data_ptr<acc_t>(),
          shift.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>()};
}

}  // namespace fastunet

#define FASTUNET_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
