// The C ABI: picks the path by the CPU's features at run time (one library runs on every CPU of its arch).
#include <initializer_list>

#include "adder.h"

#if defined(__x86_64__)
QKIT_ADDER_DECLARE(sse2)
QKIT_ADDER_DECLARE(avx2)
QKIT_ADDER_DECLARE(avx512)
#elif defined(__aarch64__)
QKIT_ADDER_DECLARE(neon)
#endif
QKIT_ADDER_DECLARE(portable)

extern "C" int qkit_adder_isas(void) {
  int bits = 1 << QKIT_PORTABLE;
#if defined(__x86_64__)
  __builtin_cpu_init();
  bits |= 1 << QKIT_SSE2;
  if (__builtin_cpu_supports("avx2")) bits |= 1 << QKIT_AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    bits |= 1 << QKIT_AVX512BW;
#elif defined(__aarch64__)
  bits |= 1 << QKIT_NEON;  // Advanced SIMD is part of every ARMv8-A core
#endif
  return bits;
}

extern "C" int qkit_adder_best(void) {
  const int bits = qkit_adder_isas();
  for (const int isa : {QKIT_AVX512BW, QKIT_AVX2, QKIT_SSE2, QKIT_NEON})
    if (bits & (1 << isa)) return isa;
  return QKIT_PORTABLE;
}

namespace {
int resolve(int isa) {
  if (isa == QKIT_BEST) return qkit_adder_best();
  return isa >= 0 && isa <= QKIT_NEON && (qkit_adder_isas() & (1 << isa)) ? isa : -1;
}
}  // namespace

// The path for `isa` of entry point NAME, or return −1 from the caller when this CPU lacks it.
#if defined(__x86_64__)
#define QKIT_PICK(NAME)                                          \
  decltype(&NAME##_portable) path = nullptr;                     \
  switch (resolve(isa)) {                                        \
    case QKIT_SSE2: path = NAME##_sse2; break;                   \
    case QKIT_AVX2: path = NAME##_avx2; break;                   \
    case QKIT_AVX512BW: path = NAME##_avx512; break;             \
    case QKIT_PORTABLE: path = NAME##_portable; break;           \
    default: return -1;                                          \
  }
#elif defined(__aarch64__)
#define QKIT_PICK(NAME)                                          \
  decltype(&NAME##_portable) path = nullptr;                     \
  switch (resolve(isa)) {                                        \
    case QKIT_NEON: path = NAME##_neon; break;                   \
    case QKIT_PORTABLE: path = NAME##_portable; break;           \
    default: return -1;                                          \
  }
#endif

extern "C" int qkit_adder_f32(const float* x, int n, const qkit_adder_shape* s, const float* w, float* y, int isa) {
  QKIT_PICK(qkit_adder_f32)
  path(x, n, s, w, y);
  return 0;
}

extern "C" int qkit_adder_u8(const uint8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w, uint8_t pad,
                             int nhwc, int32_t* y, int isa) {
  QKIT_PICK(qkit_adder_u8)
  path(x, n, s, w, pad, nhwc, y);
  return 0;
}

extern "C" int qkit_adder_q8(const int8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w, const float* alpha,
                             const float* beta, int zero_point, double out_scale, int out_zero_point, int out_min,
                             int nhwc, int8_t* y, int isa) {
  QKIT_PICK(qkit_adder_q8)
  path(x, n, s, w, alpha, beta, zero_point, out_scale, out_zero_point, out_min, nhwc, y);
  return 0;
}
