// ARM64 NEON: UABD (absolute difference) on 2 filters × 8 bytes, UADDLP/UADALP (pairwise add-long) into
// 32-bit sums; float FABD (|x − w| in one instruction) on 4 lanes.
#include <arm_neon.h>

#include "adder_impl.h"

namespace {

struct F32 {
  using V = float32x4_t;
  static constexpr int W = 4;
  static constexpr bool kMaxTrick = false;
  static V zero() { return vdupq_n_f32(0.0f); }
  static V load(const float* p) { return vld1q_f32(p); }
  static V bcast(float x) { return vdupq_n_f32(x); }
  static V accum(V acc, V x, V w) { return vaddq_f32(acc, vabdq_f32(x, w)); }
  static void store(float* out, V v) { vst1q_f32(out, v); }
};

struct U8 {
  using V = uint32x4_t;  // lanes 0-1: filter 0, lanes 2-3: filter 1
  using X = uint8x16_t;
  using Wv = uint8x16_t;
  static constexpr int W = 2;
  static V zero() { return vdupq_n_u32(0); }
  static X xload(const uint8_t* p) { const uint8x8_t v = vld1_u8(p); return vcombine_u8(v, v); }
  static Wv wload(const uint8_t* p) { return vld1q_u8(p); }
  static V accum(V acc, X x, Wv w) { return vpadalq_u16(acc, vpaddlq_u8(vabdq_u8(x, w))); }
  static void store(int32_t* out, V v) {
    out[0] = static_cast<int32_t>(vgetq_lane_u32(v, 0) + vgetq_lane_u32(v, 1));
    out[1] = static_cast<int32_t>(vgetq_lane_u32(v, 2) + vgetq_lane_u32(v, 3));
  }
};

}  // namespace

QKIT_ADDER_DECLARE(neon)
QKIT_ADDER_ENTRY(neon, F32, 6, 4, U8, 6, 4)
