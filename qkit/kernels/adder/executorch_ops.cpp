// The adder kernels as ExecuTorch operators, registered into the runtime's kernel registry when this library
// is loaded (dlopen): qkit::adder2d.out (fp32) and qkit::adder2d_u8.out (the adder-int8 integer grid).
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

// stack: x, weight, stride, padding, out (, the returned out)
void adder2d_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  Tensor& out = stack[4]->toTensor();
  qkit_adder_shape s;
  if (x.scalar_type() != ScalarType::Float || w.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || !shape_of(x, w, *stack[2], *stack[3], out, &s)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  qkit_adder_f32(x.const_data_ptr<float>(), static_cast<int>(x.size(0)), &s, w.const_data_ptr<float>(),
                 out.mutable_data_ptr<float>(), QKIT_BEST);
}

// stack: x (float, on the grid scale·(q − zero_point)), weight codes (uint8), excess (int32 per filter),
// scale, zero_point, stride, padding, out. out = −scale·(Σ|q(x) − code| + excess).
void adder2d_u8_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  const Tensor& x = stack[0]->toTensor();
  const Tensor& w = stack[1]->toTensor();
  const Tensor& excess = stack[2]->toTensor();
  const float scale = static_cast<float>(stack[3]->toDouble());
  const int64_t zero_point = stack[4]->toInt();
  Tensor& out = stack[7]->toTensor();
  qkit_adder_shape s;
  if (x.scalar_type() != ScalarType::Float || w.scalar_type() != ScalarType::Byte ||
      excess.scalar_type() != ScalarType::Int || out.scalar_type() != ScalarType::Float ||
      !shape_of(x, w, *stack[5], *stack[6], out, &s) || excess.numel() != s.o || zero_point < 0 ||
      zero_point > 255 || !(scale > 0.0f)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  qkit_adder_q8(x.const_data_ptr<float>(), static_cast<int>(x.size(0)), &s, w.const_data_ptr<uint8_t>(),
                excess.const_data_ptr<int32_t>(), scale, static_cast<int>(zero_point), out.mutable_data_ptr<float>(),
                QKIT_BEST);
}

const Kernel kKernels[] = {Kernel("qkit::adder2d.out", adder2d_out), Kernel("qkit::adder2d_u8.out", adder2d_u8_out)};
const Error kRegistered = executorch::runtime::register_kernels(Span<const Kernel>(kKernels, 2));

}  // namespace

extern "C" QKIT_API int qkit_adder_executorch_registered(void) { return kRegistered == Error::Ok; }
