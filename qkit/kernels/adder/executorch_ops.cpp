// The adder kernels as ExecuTorch operators, registered into the runtime's kernel registry when this library
// is loaded (dlopen): qkit::adder2d.out (fp32) and qkit::adder2d_q8.out (adder-int8, int8 codes in and out).
// Their schemas are declared on the Python side (qkit/kernels/ops.py), which also holds the reference math.
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include "adder.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Kernel;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

// Shape of an NCHW input against OIHW weights; false when the tensors do not fit together.
bool shape_of(const Tensor& x, const Tensor& w, const EValue& stride, const EValue& padding, const Tensor& out,
              qkit_adder_shape* s) {
  if (x.dim() != 4 || w.dim() != 4 || out.dim() != 4 || x.size(1) != w.size(1)) return false;
  const auto st = stride.toIntList(), pd = padding.toIntList();
  if (st.size() != 2 || pd.size() != 2) return false;
  *s = qkit_adder_shape{static_cast<int>(x.size(1)), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                        static_cast<int>(w.size(0)), static_cast<int>(w.size(2)), static_cast<int>(w.size(3)),
                        static_cast<int>(st[0]), static_cast<int>(st[1]), static_cast<int>(pd[0]),
                        static_cast<int>(pd[1])};
  return out.size(0) == x.size(0) && out.size(1) == s->o && out.size(2) == (s->h + 2 * s->ph - s->kh) / s->sh + 1 &&
         out.size(3) == (s->w + 2 * s->pw - s->kw) / s->sw + 1;
}

bool has_dim_order(const Tensor& t, const int (&order)[4]) {
  const auto d = t.dim_order();
  return d.size() == 4 && d[0] == order[0] && d[1] == order[1] && d[2] == order[2] && d[3] == order[3];
}

// NCHW or channels-last, the same for input and output (what the graph's memory planning gave them).
bool layout_of(const Tensor& x, const Tensor& out, int* nhwc) {
  constexpr int kNCHW[4] = {0, 1, 2, 3}, kNHWC[4] = {0, 2, 3, 1};
  if (has_dim_order(x, kNCHW) && has_dim_order(out, kNCHW)) return *nhwc = 0, true;
  if (has_dim_order(x, kNHWC) && has_dim_order(out, kNHWC)) return *nhwc = 1, true;
  return false;
}

// stack: x, weight, stride, padding, out (, the returned out); NCHW only
void adder2d_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (stack.size() < 5) return ctx.fail(Error::InvalidArgument);
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  Tensor& out = stack[4]->toTensor();
  qkit_adder_shape s;
  int nhwc = 0;
  if (x.scalar_type() != ScalarType::Float || w.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || !shape_of(x, w, *stack[2], *stack[3], out, &s) ||
      !layout_of(x, out, &nhwc) || nhwc) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  qkit_adder_f32(x.const_data_ptr<float>(), static_cast<int>(x.size(0)), &s, w.const_data_ptr<float>(),
                 out.mutable_data_ptr<float>(), QKIT_BEST);
}

// stack: x (int8 codes), weight codes (uint8), alpha, beta (float per filter), zero_point (the weights' uint8
// grid), out_scale, out_zero_point, out_min, stride, padding, out (int8 codes); see qkit_adder_q8.
void adder2d_q8_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (stack.size() < 11) return ctx.fail(Error::InvalidArgument);
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  const Tensor& alpha = stack[2]->toTensor();
  const Tensor& beta = stack[3]->toTensor();
  const int64_t zero_point = stack[4]->toInt(), out_zero_point = stack[6]->toInt(), out_min = stack[7]->toInt();
  const double out_scale = stack[5]->toDouble();
  Tensor& out = stack[10]->toTensor();
  qkit_adder_shape s;
  int nhwc = 0;
  if (x.scalar_type() != ScalarType::Char || w.scalar_type() != ScalarType::Byte ||
      alpha.scalar_type() != ScalarType::Float || beta.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Char || !shape_of(x, w, *stack[8], *stack[9], out, &s) ||
      alpha.numel() != s.o || beta.numel() != s.o || zero_point < 0 || zero_point > 255 || !(out_scale > 0.0) ||
      out_zero_point < -128 || out_zero_point > 127 || out_min < -128 || out_min > 127 || !layout_of(x, out, &nhwc)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  qkit_adder_q8(x.const_data_ptr<int8_t>(), static_cast<int>(x.size(0)), &s, w.const_data_ptr<uint8_t>(),
                alpha.const_data_ptr<float>(), beta.const_data_ptr<float>(), static_cast<int>(zero_point), out_scale,
                static_cast<int>(out_zero_point), static_cast<int>(out_min), nhwc, out.mutable_data_ptr<int8_t>(),
                QKIT_BEST);
}

const Kernel kKernels[] = {Kernel("qkit::adder2d.out", adder2d_out), Kernel("qkit::adder2d_q8.out", adder2d_q8_out)};
const Error kRegistered = executorch::runtime::register_kernels(Span<const Kernel>(kKernels, 2));

}  // namespace

extern "C" QKIT_API int qkit_adder_executorch_registered(void) { return kRegistered == Error::Ok; }
