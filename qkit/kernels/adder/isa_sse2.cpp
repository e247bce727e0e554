// x86 SSE2 (every x86-64): PSADBW on 2 filters × 8 bytes; float max(x, w) on 4 lanes.
#include <emmintrin.h>

#include "adder_impl.h"

namespace {

struct F32 {
  using V = __m128;
  static constexpr int W = 4;
  static constexpr bool kMaxTrick = true;
  static V zero() { return _mm_setzero_ps(); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static V bcast(float x) { return _mm_set1_ps(x); }
  static V accum(V acc, V x, V w) { return _mm_add_ps(acc, _mm_max_ps(x, w)); }
  static void store(float* out, V v) { _mm_storeu_ps(out, v); }
};

struct U8 {
  using V = __m128i;
  using X = __m128i;
  using Wv = __m128i;
  static constexpr int W = 2;
  static V zero() { return _mm_setzero_si128(); }
  static X xload(const uint8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm_set1_epi64x(v);
  }
  static Wv wload(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static V accum(V acc, X x, Wv w) { return _mm_add_epi64(acc, _mm_sad_epu8(x, w)); }
  static void store(int32_t* out, V v) {  // the low half of each 64-bit sum, packed into 2 int32
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 0, 2, 0)));
  }
};

}  // namespace

QKIT_ADDER_DECLARE(sse2)
QKIT_ADDER_ENTRY(sse2, F32, 6, 2, U8, 6, 2)
