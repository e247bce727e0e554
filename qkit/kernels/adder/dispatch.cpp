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

extern "C" int qkit_adder_f32(const float* x, int n, const qkit_adder_shape* s, const float* w, float* y, int isa) {
  switch (resolve(isa)) {
#if defined(__x86_64__)
    case QKIT_SSE2: qkit_adder_f32_sse2(x, n, s, w, y); return 0;
    case QKIT_AVX2: qkit_adder_f32_avx2(x, n, s, w, y); return 0;
    case QKIT_AVX512BW: qkit_adder_f32_avx512(x, n, s, w, y); return 0;
#elif defined(__aarch64__)
    case QKIT_NEON: qkit_adder_f32_neon(x, n, s, w, y); return 0;
#endif
    case QKIT_PORTABLE: qkit_adder_f32_portable(x, n, s, w, y); return 0;
    default: return -1;
  }
}

extern "C" int qkit_adder_u8(const uint8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w, uint8_t pad,
                             int32_t* y, int isa) {
  switch (resolve(isa)) {
#if defined(__x86_64__)
    case QKIT_SSE2: qkit_adder_u8_sse2(x, n, s, w, pad, y); return 0;
    case QKIT_AVX2: qkit_adder_u8_avx2(x, n, s, w, pad, y); return 0;
    case QKIT_AVX512BW: qkit_adder_u8_avx512(x, n, s, w, pad, y); return 0;
#elif defined(__aarch64__)
    case QKIT_NEON: qkit_adder_u8_neon(x, n, s, w, pad, y); return 0;
#endif
    case QKIT_PORTABLE: qkit_adder_u8_portable(x, n, s, w, pad, y); return 0;
    default: return -1;
  }
}

extern "C" int qkit_adder_q8(const float* x, int n, const qkit_adder_shape* s, const uint8_t* w, const int32_t* excess,
                             float scale, int zero_point, float* y, int isa) {
  switch (resolve(isa)) {
#if defined(__x86_64__)
    case QKIT_SSE2: qkit_adder_q8_sse2(x, n, s, w, excess, scale, zero_point, y); return 0;
    case QKIT_AVX2: qkit_adder_q8_avx2(x, n, s, w, excess, scale, zero_point, y); return 0;
    case QKIT_AVX512BW: qkit_adder_q8_avx512(x, n, s, w, excess, scale, zero_point, y); return 0;
#elif defined(__aarch64__)
    case QKIT_NEON: qkit_adder_q8_neon(x, n, s, w, excess, scale, zero_point, y); return 0;
#endif
    case QKIT_PORTABLE: qkit_adder_q8_portable(x, n, s, w, excess, scale, zero_point, y); return 0;
    default: return -1;
  }
}
