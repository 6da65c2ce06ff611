// C++ test of libfastunet_ops (CMakeLists.txt, run by ctest): calls each op through the dispatcher, as a
// libtorch user would, and checks it against plain ATen computations (autograd for the backward ops),
// done in float64 on the same random float32 inputs. Runs on the CPU, and on CUDA too when the library
// has the CUDA kernels and a GPU is present. Exits non-zero, naming each failed check, on failure.
// Per-operator headers rather than <ATen/ATen.h>: this file compiles in half the time.
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/full.h>
#include <ATen/ops/max_pool2d.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/var.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The kernels' C++ signatures (csrc/ops.cpp); typed() checks them against the registered ones.
using BnStatsFn = std::tuple<Tensor, Tensor>(const Tensor&, int64_t);
using BnReluPoolFn = void(const Tensor&, const Tensor&, const Tensor&, int64_t, Tensor&, const OptTensor&);
using ReluPoolBackwardFn = Tensor(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                                  int64_t);
using BackwardReduceFn = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&, int64_t);
using BackwardApplyFn = Tensor(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);

c10::OperatorHandle find_op(const char* name) {
  auto handle = c10::Dispatcher::singleton().findSchema({std::string("fastunet::") + name, ""});
  if (!handle.has_value())
    throw std::runtime_error(std::string("fastunet::") + name +
                             " is not registered: was libfastunet_ops loaded (linked without --no-as-needed?)");
  return *handle;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return find_op(name).typed<Sig>();
}

const std::vector<int64_t> kChannelDims = {0, 2, 3};
constexpr int64_t N = 2, C = 3, H = 4, W = 6;  // logical low-res size; W != H catches swapped axes
constexpr double kEps = 1e-5;

int g_checks = 0, g_failures = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void expect_close(const Tensor& got, const Tensor& want, const std::string& what) {
  if (got.sizes() != want.sizes()) {
    expect(false, what + ": shape " + c10::str(got.sizes()) + ", expected " + c10::str(want.sizes()));
    return;
  }
  const Tensor g = got.detach().cpu().to(at::kDouble), w = want.detach().cpu().to(at::kDouble);
  const bool ok = at::allclose(g, w, /*rtol=*/1e-4, /*atol=*/1e-5);
  const double err = (g - w).abs().max().item<double>();
  expect(ok, what + ": max abs error " + std::to_string(err));
}

template <typename F>
void expect_error(F&& call, const std::string& needle, const std::string& what) {
  try {
    call();
  } catch (const c10::Error& e) {
    expect(e.msg().find(needle) != std::string::npos,
           what + ": the error '" + e.msg() + "' does not mention '" + needle + "'");
    return;
  }
  expect(false, what + ": no c10::Error thrown");
}

Tensor per_channel(const Tensor& v) { return v.view({1, -1, 1, 1}); }

// Per-channel mean and biased variance of a logical [N, C, H, W] tensor: batch_norm's training statistics.
std::tuple<Tensor, Tensor> mean_var(const Tensor& x) {
  return {at::mean(x, kChannelDims), at::var(x, at::IntArrayRef(kChannelDims), /*unbiased=*/false, false)};
}

// The logical [N, C, S*H, S*W] BN input read from conv output z (geometry of csrc/fastunet_math.h):
// pixel (S*i + a, S*j + b) of channel c is z[:, (a*S + b)*C + c, i + a, j + b]. Differentiable.
Tensor to_logical(const Tensor& z, int64_t S) {
  if (S == 1) return z;
  const int64_t c = z.size(1) / 4, h = z.size(2) - 1, w = z.size(3) - 1;
  std::vector<Tensor> rows;
  for (int64_t a = 0; a < 2; ++a) {
    std::vector<Tensor> cols;
    for (int64_t b = 0; b < 2; ++b) cols.push_back(z.narrow(1, (a * 2 + b) * c, c).narrow(2, a, h).narrow(3, b, w));
    rows.push_back(at::stack(cols, -1));  // [N, C, H, W, 2 (b)]
  }
  return at::stack(rows, 3).reshape({z.size(0), c, 2 * h, 2 * w});  // [N, C, H, 2 (a), W, 2 (b)]
}

// The adjoint of to_logical: scatters a logical-layout gradient back to z's layout, 0 where no pixel reads z.
Tensor from_logical(const Tensor& grad, const Tensor& z, int64_t S) {
  Tensor w = at::zeros(z.sizes(), grad.options()).requires_grad_();
  to_logical(w, S).backward(grad);
  return w.grad();
}

struct Case {
  c10::Device device;
  int64_t S;           // upscale
  bool channels_last;  // layout of z
  bool pool;           // with the 2x2 max-pool output / its gradient
  std::string name() const {
    return device.str() + " upscale=" + std::to_string(S) + (channels_last ? " channels_last" : " contiguous") +
           (pool ? " +pool" : "");
  }
  at::TensorOptions opts() const { return at::TensorOptions().dtype(at::kFloat).device(device); }
  Tensor randn(at::IntArrayRef sizes) const { return at::randn(sizes, opts()); }
  // A conv output [N, S*S*C, H+S-1, W+S-1].
  Tensor conv_output() const {
    Tensor z = randn({N, S * S * C, H + S - 1, W + S - 1});
    return channels_last ? z.contiguous(at::MemoryFormat::ChannelsLast) : z;
  }
};

void test_bn_stats(const Case& k) {
  const Tensor z = k.conv_output();
  auto [mean, var] = typed_op<BnStatsFn>("bn_stats").call(z, k.S);
  auto [want_mean, want_var] = mean_var(to_logical(z.to(at::kDouble), k.S));
  expect_close(mean, want_mean, "bn_stats mean, " + k.name());
  expect_close(var, want_var, "bn_stats var, " + k.name());
}

void test_bn_relu_pool(const Case& k) {
  const int64_t oh = k.S * H, ow = k.S * W;
  const Tensor z = k.conv_output(), scale = k.randn({C}), shift = k.randn({C});
  // out and pooled are channel slices of NaN-poisoned concat buffers: the op writes exactly the slice.
  const Tensor buf = at::full({N, C + 3, oh, ow}, NAN, k.opts());
  const Tensor pooled_buf = at::full({N, C + 2, oh / 2, ow / 2}, NAN, k.opts());
  Tensor out = buf.narrow(1, 1, C);
  const OptTensor pooled = k.pool ? OptTensor(pooled_buf.narrow(1, 1, C)) : std::nullopt;
  typed_op<BnReluPoolFn>("bn_relu_pool").call(z, scale, shift, k.S, out, pooled);

  const Tensor want = at::relu(to_logical(z.to(at::kDouble), k.S) * per_channel(scale.to(at::kDouble)) +
                               per_channel(shift.to(at::kDouble)));
  expect_close(out, want, "bn_relu_pool out, " + k.name());
  expect(buf.narrow(1, 0, 1).isnan().all().item<bool>() && buf.narrow(1, C + 1, 2).isnan().all().item<bool>(),
         "bn_relu_pool wrote outside its channel slice of out, " + k.name());
  if (k.pool) {
    expect_close(*pooled, at::max_pool2d(want, {2, 2}, {2, 2}), "bn_relu_pool pooled, " + k.name());
    expect(pooled_buf.narrow(1, 0, 1).isnan().all().item<bool>() &&
               pooled_buf.narrow(1, C + 1, 1).isnan().all().item<bool>(),
           "bn_relu_pool wrote outside its channel slice of pooled, " + k.name());
  } else {
    expect(pooled_buf.isnan().all().item<bool>(), "bn_relu_pool wrote pooled though none was given, " + k.name());
  }
}

// The backward ops against autograd of batch_norm (training mode) + relu (+ max_pool2d). With
// scale = gamma * invstd and shift = beta - mean * scale, relu(z * scale + shift) is that forward.
void test_backward(const Case& k) {
  const int64_t oh = k.S * H, ow = k.S * W;
  const Tensor z = k.conv_output(), gamma = k.randn({C}), beta = k.randn({C});
  const Tensor grad = k.randn({N, C, oh, ow});
  const OptTensor grad_pooled = k.pool ? OptTensor(k.randn({N, C, oh / 2, ow / 2})) : std::nullopt;

  const Tensor zd = z.to(at::kDouble).detach().requires_grad_();
  const Tensor zl = to_logical(zd, k.S);
  const Tensor bn_out = at::batch_norm(zl, gamma.to(at::kDouble), beta.to(at::kDouble), {}, {},
                                       /*training=*/true, /*momentum=*/0.1, kEps, /*cudnn_enabled=*/false);
  bn_out.retain_grad();
  const Tensor y = at::relu(bn_out);
  Tensor loss = (y * grad.to(at::kDouble)).sum();
  if (k.pool) loss = loss + (at::max_pool2d(y, {2, 2}, {2, 2}) * grad_pooled->to(at::kDouble)).sum();
  loss.backward();
  const Tensor d_bn_out = bn_out.grad();  // what reaches the pre-ReLU values

  auto [mean_d, var_d] = mean_var(zl.detach());
  const Tensor invstd = (var_d + kEps).rsqrt().to(at::kFloat), mean = mean_d.to(at::kFloat);
  const Tensor scale = gamma * invstd, shift = beta - mean * scale;

  const Tensor dy = typed_op<ReluPoolBackwardFn>("relu_pool_backward").call(grad, grad_pooled, z, scale, shift, k.S);
  expect_close(dy, from_logical(d_bn_out, z, k.S), "relu_pool_backward, " + k.name());

  auto [sum_dy, sum_dy_xmu] =
      typed_op<BackwardReduceFn>("bn_relu_backward_reduce").call(grad, grad_pooled, z, scale, shift, mean, k.S);
  expect_close(sum_dy, d_bn_out.sum(kChannelDims), "bn_relu_backward_reduce sum_dy, " + k.name());
  expect_close(sum_dy_xmu, (d_bn_out * (zl.detach() - per_channel(mean_d))).sum(kChannelDims),
               "bn_relu_backward_reduce sum_dy_xmu, " + k.name());

  const Tensor dz = typed_op<BackwardApplyFn>("bn_relu_backward_apply")
                        .call(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, k.S);
  expect_close(dz, zd.grad(), "bn_relu_backward_apply dz == d loss / d z, " + k.name());
}

void test_errors() {
  const Case k{c10::Device(c10::kCPU), 1, false, true};
  const Tensor z = k.conv_output(), scale = k.randn({C}), shift = k.randn({C});
  Tensor bad_out = k.randn({N, C, H, W + 1});
  expect_error([&] { typed_op<BnReluPoolFn>("bn_relu_pool").call(z, scale, shift, 1, bad_out, std::nullopt); },
               "out must have shape", "bn_relu_pool with a wrong-shape out");
  expect_error([&] { typed_op<BnStatsFn>("bn_stats").call(z[0], 1); }, "expected a 4-D conv output",
               "bn_stats with a 3-D input");
  expect_error([&] { typed_op<BnStatsFn>("bn_stats").call(z, 3); }, "upscale must be 1 or 2",
               "bn_stats with upscale 3");
  const Tensor grad = k.randn({N, C, H, W});
  expect_error(
      [&] {
        typed_op<ReluPoolBackwardFn>("relu_pool_backward").call(grad, std::nullopt, z, k.randn({C + 1}), shift, 1);
      },
      "scale must have shape", "relu_pool_backward with a wrong-size scale");
}

}  // namespace

int main() {
  try {
    at::manual_seed(0);
    std::vector<c10::Device> devices = {c10::Device(c10::kCPU)};
    const bool cuda_kernels = find_op("bn_stats").hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    if (cuda_kernels && at::hasCUDA())
      devices.emplace_back(c10::kCUDA, 0);
    else if (cuda_kernels)
      std::printf("libfastunet_ops has CUDA kernels, but there is no GPU: testing the CPU kernels only\n");
    else if (at::hasCUDA())
      std::printf("a GPU is present, but libfastunet_ops has no CUDA kernels: testing the CPU kernels only\n");
    for (const c10::Device& device : devices) {
      for (int64_t S : {1, 2}) {
        for (bool channels_last : {false, true}) {
          test_bn_stats({device, S, channels_last, false});
          for (bool pool : {false, true}) {
            const Case k{device, S, channels_last, pool};
            test_bn_relu_pool(k);
            test_backward(k);
          }
        }
      }
    }
    test_errors();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (g_failures > 0) {
    std::fprintf(stderr, "%d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  std::printf("fastunet ops: all %d checks passed\n", g_checks);
  return 0;
}
