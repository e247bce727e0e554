// x86 AVX-512BW: VPSADBW on 8 filters × 8 bytes per instruction; float as AVX2's (f32_ymm.h), with more rows.
#include <immintrin.h>

#include "adder_impl.h"
#include "f32_ymm.h"

namespace {

// float on 256-bit vectors: Zen 4 splits 512-bit FP ops in two, and 16-filter blocks fit O = 16 layers; what
// AVX-512 adds is 32 registers (AVX-512VL), so the tile has twice AVX2's rows
using F32 = F32Ymm;

struct U8 {
  using V = __m512i;
  using X = __m512i;
  using Wv = __m512i;
  static constexpr int W = 8;
  static V zero() { return _mm512_setzero_si512(); }
  static X xload(const uint8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm512_set1_epi64(v);
  }
  static Wv wload(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static V accum(V acc, X x, Wv w) { return _mm512_add_epi64(acc, _mm512_sad_epu8(x, w)); }
  static void store(int32_t* out, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi64_epi32(v)); }
};

}  // namespace

QKIT_ADDER_DECLARE(avx512)
QKIT_ADDER_ENTRY(avx512, F32, 10, 2, U8, 12, 2)
