// The float trait on 256-bit vectors with FMA, shared by the AVX2 and AVX-512 files: max(x, w) on 8 lanes,
// accumulated by an FMA with 1 (exact, as an add) so that the max and the accumulation run on different FP
// pipes. Internal linkage, so each file keeps the copy compiled with its own flags.
#pragma once

#include <immintrin.h>

namespace {

struct F32Ymm {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr bool kMaxTrick = true;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(float x) { return _mm256_set1_ps(x); }
  static V accum(V acc, V x, V w) { return _mm256_fmadd_ps(_mm256_max_ps(x, w), _mm256_set1_ps(1.0f), acc); }
  static void store(float* out, V v) { _mm256_storeu_ps(out, v); }
};

}  // namespace
