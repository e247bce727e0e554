// Portable C++: the reference every SIMD path is tested against.
#include <cmath>
#include <cstdlib>

#include "adder_impl.h"

namespace {

struct F32 {
  using V = float;
  static constexpr int W = 1;
  static constexpr bool kMaxTrick = false;
  static V zero() { return 0.0f; }
  static V load(const float* p) { return *p; }
  static V bcast(float x) { return x; }
  static V accum(V acc, V x, V w) { return acc + std::fabs(x - w); }
  static void store(float* out, V v) { *out = v; }
};

struct U8 {
  using V = int32_t;
  using X = const uint8_t*;
  using Wv = const uint8_t*;
  static constexpr int W = 1;
  static V zero() { return 0; }
  static X xload(const uint8_t* p) { return p; }
  static Wv wload(const uint8_t* p) { return p; }
  static V accum(V acc, X x, Wv w) {
    for (int t = 0; t < 8; ++t) acc += std::abs(int{x[t]} - int{w[t]});
    return acc;
  }
  static void store(int32_t* out, V v) { *out = v; }
};

}  // namespace

QKIT_ADDER_DECLARE(portable)
QKIT_ADDER_ENTRY(portable, F32, 4, 4, U8, 4, 4)
