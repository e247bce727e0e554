// qkit's AdderNet kernels, C ABI: y = −Σ|x − w| (float) or Σ|x − w| (uint8 → int32) for a 2-D adder layer
// (NCHW input, OIHW weights, stride, zero padding, groups = 1). Built by `python -m qkit.kernels.build`.
#pragma once
#include <stdint.h>

#define QKIT_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int c, h, w;     // input channels and size
  int o, kh, kw;   // filters and kernel size
  int sh, sw;      // stride
  int ph, pw;      // zero padding (the float 0; for uint8 the caller's `pad` code, its zero point)
} qkit_adder_shape;

// Instruction sets, as bits of qkit_adder_isas() and values of `isa`.
enum { QKIT_PORTABLE = 0, QKIT_SSE2 = 1, QKIT_AVX2 = 2, QKIT_AVX512BW = 3, QKIT_NEON = 4, QKIT_BEST = -1 };

QKIT_API int qkit_adder_isas(void);  // bit i set: path i is built and this CPU runs it
QKIT_API int qkit_adder_best(void);  // the path QKIT_BEST picks

// y: (n, o, oh, ow). Return 0, or −1 when `isa` is not available here.
QKIT_API int qkit_adder_f32(const float* x, int n, const qkit_adder_shape* s, const float* w, float* y, int isa);
// The uint8 paths take and give NCHW tensors, or channels-last ones (NHWC, nhwc ≠ 0: their working layout).
// Sums of |x − w| over uint8 codes; padded pixels hold `pad`. Exact in int32.
QKIT_API int qkit_adder_u8(const uint8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w, uint8_t pad, int nhwc,
                           int32_t* y, int isa);
// The adder-int8 layer on int8 codes in and out (how a .pte hands them over between quantized partitions):
// input codes x are the uint8 codes x + 128 of the weights' grid (padded pixels: zero_point), and in float, one
// rounding per operation: y = clamp(round_half_even((alpha[o]·Σ|x + 128 − w| + beta[o])·(float)(1/out_scale))
// + out_zero_point, out_min, 127).
QKIT_API int qkit_adder_q8(const int8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w, const float* alpha,
                           const float* beta, int zero_point, double out_scale, int out_zero_point, int out_min,
                           int nhwc, int8_t* y, int isa);

#ifdef __cplusplus
}

#define QKIT_ADDER_DECLARE(NAME)                                                                     \
  void qkit_adder_f32_##NAME(const float* x, int n, const qkit_adder_shape* s, const float* w, float* y); \
  void qkit_adder_u8_##NAME(const uint8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w,      \
                            uint8_t pad, int nhwc, int32_t* y);                                      \
  void qkit_adder_q8_##NAME(const int8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w,       \
                            const float* alpha, const float* beta, int zero_point, double out_scale, \
                            int out_zero_point, int out_min, int nhwc, int8_t* y);
#endif
