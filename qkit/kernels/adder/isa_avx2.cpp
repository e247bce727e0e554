// x86 AVX2 (+FMA): VPSADBW on 4 filters × 8 bytes per instruction; float max(x, w) on 8 lanes (f32_ymm.h).
#include <immintrin.h>

#include "adder_impl.h"
#include "f32_ymm.h"

namespace {

using F32 = F32Ymm;

struct U8 {
  using V = __m256i;
  using X = __m256i;
  using Wv = __m256i;
  static constexpr int W = 4;
  static V zero() { return _mm256_setzero_si256(); }
  static X xload(const uint8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
  }
  static Wv wload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V accum(V acc, X x, Wv w) { return _mm256_add_epi64(acc, _mm256_sad_epu8(x, w)); }
  static void store(int32_t* out, V v) {  // the low half of each 64-bit sum, packed into 4 int32
    const __m256i low = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(low));
  }
};

}  // namespace

QKIT_ADDER_DECLARE(avx2)
QKIT_ADDER_ENTRY(avx2, F32, 5, 2, U8, 6, 2)
