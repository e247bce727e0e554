// AdderNet layer y[n, o, oy, ox] = −Σ_{c,i,j} |x[n, c, oy·sh + i − ph, ox·sw + j − pw] − W[o, c, i, j]|, as a
// register-tiled loop over a padded copy of the input (no im2col).
//
// One template, instantiated once per instruction set by the isa_*.cpp files, each compiled with its own
// -m flags. Everything here has internal linkage (anonymous namespace), so the AVX-512 instantiation can never
// stand in for the portable one at link time.
//
// A trait T supplies the vector type and a handful of operations; the loop is the GEMM micro-kernel shape
// with |x − w| in place of x·w:
//   float: channels-first input (a plain padded copy); for each patch value, x is broadcast and compared with
//          T::W filters at once (weights packed tap-major per block of filters);
//   uint8: channels-last input, so that each kernel row of a patch is one contiguous run of kw·C bytes; 8
//          patch bytes are broadcast to every 64-bit lane and compared with 8 bytes of one filter per lane
//          (x86 PSADBW sums them in that lane; NEON with pairwise adds). Channels are padded to a multiple
//          of 8 with zeros on both sides (|0 − 0| = 0).
// Packed weights are cached per weight buffer (checked against a copy of its contents on every call), so a
// model's constant weights are packed once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "adder.h"

namespace {

struct Geometry {
  int c, h, w, o, kh, kw, sh, sw, ph, pw, oh, ow;
  int L() const { return oh * ow; }
};

inline Geometry geometry(const qkit_adder_shape* s) {
  Geometry g{s->c, s->h, s->w, s->o, s->kh, s->kw, s->sh, s->sw, s->ph, s->pw, 0, 0};
  g.oh = (g.h + 2 * g.ph - g.kh) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.kw) / g.sw + 1;
  return g;
}

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Patch origins of output pixels l0..l0+MR−1 in row-major order, stepped without divisions; pixels past the
// last repeat it (computed, never stored). `oy`/`ox` are pixel l0's and come back as pixel l0 + MR's.
template <int MR, class E>
void origins(const E* xp, const Geometry& g, int cp, int l0, int& oy, int& ox, const E* (&rows)[MR]) {
  const int wp = g.w + 2 * g.pw;
  for (int r = 0; r < MR; ++r) {
    rows[r] = xp + (static_cast<size_t>(oy) * g.sh * wp + static_cast<size_t>(ox) * g.sw) * cp;
    if (l0 + r + 1 < g.L() && ++ox == g.ow) ox = 0, ++oy;
  }
  if (l0 + MR >= g.L()) ox = 0, oy = 0;
}

// Weights packed for blocks of nr filters, in the order the tile reads them: [block][step][filter in block]
// [unit], a step being one value (float, unit 1) or 8 bytes (uint8, unit 8); `slot(ci, i, j)` is where tap
// (ci, i, j) sits in a filter's sequence of `steps`·unit values. Filters past O are zero. Cached per buffer.
template <class E>
struct Packed {
  const E* key = nullptr;
  int o = 0, c = 0, kh = 0, kw = 0, nr = 0;
  std::vector<E> raw, data;
  std::vector<float> sums;  // Σ_k W[o, k], for the float max identity
};

template <class E, class Slot>
const Packed<E>& packed(const E* w, const Geometry& g, int nr, int unit, int steps, Slot slot) {
  thread_local std::vector<Packed<E>> cache;
  const size_t n = static_cast<size_t>(g.o) * g.c * g.kh * g.kw;
  for (const Packed<E>& e : cache)
    if (e.key == w && e.o == g.o && e.c == g.c && e.kh == g.kh && e.kw == g.kw && e.nr == nr &&
        std::memcmp(e.raw.data(), w, n * sizeof(E)) == 0)
      return e;
  if (cache.size() >= 256) cache.clear();
  Packed<E> p;
  p.key = w, p.o = g.o, p.c = g.c, p.kh = g.kh, p.kw = g.kw, p.nr = nr;
  p.raw.assign(w, w + n);
  const int blocks = round_up(g.o, nr) / nr;
  p.data.assign(static_cast<size_t>(blocks) * steps * nr * unit, E{0});
  p.sums.assign(static_cast<size_t>(blocks) * nr, 0.0f);
  for (int o = 0; o < g.o; ++o)
    for (int ci = 0; ci < g.c; ++ci)
      for (int i = 0; i < g.kh; ++i)
        for (int j = 0; j < g.kw; ++j) {
          const E v = w[((static_cast<size_t>(o) * g.c + ci) * g.kh + i) * g.kw + j];
          const int pos = slot(ci, i, j);
          p.data[((static_cast<size_t>(o / nr) * steps + pos / unit) * nr + o % nr) * unit + pos % unit] = v;
          p.sums[o] += static_cast<float>(v);
        }
  cache.push_back(std::move(p));
  return cache.back();
}

// ---- float -------------------------------------------------------------------------------------------------
// Channels-first: a patch is C·kh runs of kw values, at `offsets` from its origin in the zero-padded input.
// T::V vector of T::W floats; T::accum(acc, x, w) adds |x − w| or, where T::kMaxTrick, max(x, w):
// Σ|x − w| = 2·Σmax(x, w) − Σx − Σw, two instructions per pair instead of three.

// KW: the kernel width when fixed at compile time (3 or 5: the run loop unrolls), 0 for any width `kw`.
template <class T, int MR, int NV, int KW>
void tile_f32(const float* const (&rows)[MR], const std::vector<int>& offsets, int kw, const float* wb,
              float* acc_out) {
  typename T::V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = T::zero();
  const int width = KW ? KW : kw;
  for (const int off : offsets)
    for (int t = 0; t < width; ++t, wb += NV * T::W) {
      typename T::V w[NV];
      for (int j = 0; j < NV; ++j) w[j] = T::load(wb + j * T::W);
      for (int r = 0; r < MR; ++r) {
        const typename T::V x = T::bcast(rows[r][off + t]);
        for (int j = 0; j < NV; ++j) acc[r][j] = T::accum(acc[r][j], x, w[j]);
      }
    }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) T::store(acc_out + (r * NV + j) * T::W, acc[r][j]);
}

template <class T, int MR, int NV>
void adder_f32(const float* x, int n, const Geometry& g, const float* wt, float* y) {
  constexpr int NR = NV * T::W;
  const int L = g.L(), hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw, blocks = round_up(g.o, NR) / NR;
  const size_t plane = static_cast<size_t>(hp) * wp;
  const Packed<float>& pw = packed(wt, g, NR, 1, g.c * g.kh * g.kw,
                                   [&](int ci, int i, int j) { return (ci * g.kh + i) * g.kw + j; });
  std::vector<int> offsets;
  for (int ci = 0; ci < g.c; ++ci)
    for (int i = 0; i < g.kh; ++i) offsets.push_back(static_cast<int>(ci * plane + i * wp));
  thread_local std::vector<float> xp, chan_sum, patch_sum;
  alignas(64) float acc[MR * NR];
  for (int b = 0; b < n; ++b) {
    xp.assign(plane * g.c, 0.0f);  // zero-padded copy, channels first
    for (int ci = 0; ci < g.c; ++ci)
      for (int yy = 0; yy < g.h; ++yy)
        std::memcpy(&xp[ci * plane + static_cast<size_t>(yy + g.ph) * wp + g.pw],
                    x + ((static_cast<size_t>(b) * g.c + ci) * g.h + yy) * g.w, sizeof(float) * g.w);
    if (T::kMaxTrick) {  // Σx over each patch: the channel-sum image, then a kh × kw box sum
      chan_sum.assign(plane, 0.0f);
      for (int ci = 0; ci < g.c; ++ci)
        for (size_t p = 0; p < plane; ++p) chan_sum[p] += xp[ci * plane + p];
      patch_sum.resize(L);
      for (int l = 0; l < L; ++l) {
        const int oy = l / g.ow, ox = l % g.ow;
        float s = 0.0f;
        for (int i = 0; i < g.kh; ++i)
          for (int j = 0; j < g.kw; ++j) s += chan_sum[static_cast<size_t>(oy * g.sh + i) * wp + ox * g.sw + j];
        patch_sum[l] = s;
      }
    }
    float* yb = y + static_cast<size_t>(b) * g.o * L;
    const float* rows[MR];
    int oy = 0, ox = 0;
    for (int l0 = 0; l0 < L; l0 += MR) {
      origins<MR>(xp.data(), g, 1, l0, oy, ox, rows);
      for (int blk = 0; blk < blocks; ++blk) {
        const float* wb = &pw.data[static_cast<size_t>(blk) * g.c * g.kh * g.kw * NR];
        if (g.kw == 3)
          tile_f32<T, MR, NV, 3>(rows, offsets, g.kw, wb, acc);
        else if (g.kw == 5)
          tile_f32<T, MR, NV, 5>(rows, offsets, g.kw, wb, acc);
        else
          tile_f32<T, MR, NV, 0>(rows, offsets, g.kw, wb, acc);
        for (int j = 0; j < NR && blk * NR + j < g.o; ++j) {
          const int o = blk * NR + j;
          float* yo = yb + static_cast<size_t>(o) * L + l0;
          for (int r = 0; r < MR && l0 + r < L; ++r) {
            const float a = acc[r * NR + j];
            yo[r] = T::kMaxTrick ? patch_sum[l0 + r] + pw.sums[o] - 2.0f * a : -a;
          }
        }
      }
    }
  }
}

// ---- uint8 -------------------------------------------------------------------------------------------------
// T::W filters per vector, 8 bytes of each; T::xload broadcasts 8 patch bytes, T::accum adds Σ|x − w| per
// filter, T::store writes T::W int32 sums.
// Input and output are NCHW or channels-last (NHWC). Channels-last is the kernel's own working layout, so there
// it reads rows and writes pixels as contiguous runs; an ExecuTorch graph exported channels-last (what
// write_pte does for these layers) hands tensors over that way, with no transposition on either side.

template <class T, int MR, int NV>
void tile_u8(const uint8_t* const (&rows)[MR], int kh, int groups, int row_stride, const uint8_t* wb, int32_t* acc_out) {
  typename T::V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = T::zero();
  for (int i = 0; i < kh; ++i) {
    const int off = i * row_stride;
    for (int gi = 0; gi < groups; ++gi, wb += NV * T::W * 8) {
      typename T::Wv w[NV];
      for (int j = 0; j < NV; ++j) w[j] = T::wload(wb + j * T::W * 8);
      for (int r = 0; r < MR; ++r) {
        const typename T::X xv = T::xload(rows[r] + off + gi * 8);
        for (int j = 0; j < NV; ++j) acc[r][j] = T::accum(acc[r][j], xv, w[j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) T::store(acc_out + (r * NV + j) * T::W, acc[r][j]);
}

// One image as padded channels-last codes: `pad` around it, 0 in channels c..cp−1 (|0 − 0| = 0); `code(v)` maps an
// input value to its code.
template <class E, class Code>
void padded_hwc(const E* x, bool nhwc, const Geometry& g, int cp, uint8_t pad, Code code, std::vector<uint8_t>& out) {
  const int hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw;
  out.assign(static_cast<size_t>(hp) * wp * cp, 0);
  if (pad != 0)
    for (int y = 0; y < hp; ++y)
      for (int xx = 0; xx < wp; ++xx)
        if (y < g.ph || y >= g.ph + g.h || xx < g.pw || xx >= g.pw + g.w)
          std::fill_n(&out[(static_cast<size_t>(y) * wp + xx) * cp], g.c, pad);
  const int h = g.h, w = g.w, c = g.c, run = w * c;  // locals: the uint8 stores may alias anything in memory
  for (int y = 0; y < h; ++y) {
    uint8_t* dst = &out[(static_cast<size_t>(y + g.ph) * wp + g.pw) * cp];
    if (nhwc && cp == c) {  // the image row is one contiguous run
      const E* src = x + static_cast<size_t>(y) * run;
      for (int i = 0; i < run; ++i) dst[i] = code(src[i]);
    } else if (nhwc) {
      for (int xx = 0; xx < w; ++xx)
        for (int ci = 0; ci < c; ++ci) dst[xx * cp + ci] = code(x[(static_cast<size_t>(y) * w + xx) * c + ci]);
    } else {  // NCHW: contiguous reads, stores cp apart
      for (int ci = 0; ci < c; ++ci) {
        const E* src = x + (static_cast<size_t>(ci) * h + y) * w;
        for (int xx = 0; xx < w; ++xx) dst[xx * cp + ci] = code(src[xx]);
      }
    }
  }
}

// `value(o, sum)` of a tile's sums (acc[r·NR + j]: pixel l0 + r, filter o0 + j) into image output yb.
template <int NR, class Out, class Value>
void store_tile(Out* yb, bool nhwc, const Geometry& g, int l0, int count, int o0, const int32_t* acc, Value value) {
  const int filters = std::min(NR, g.o - o0);
  if (nhwc && filters == NR) {  // a full run of filters per pixel: compile-time width, through locals (no
    decltype(value(0, 0)) v[NR];  // aliasing with what `value` reads; values at their own width), vectorised
    Out run[NR];
    for (int r = 0; r < count; ++r) {
      for (int j = 0; j < NR; ++j) v[j] = value(o0 + j, acc[r * NR + j]);
      for (int j = 0; j < NR; ++j) run[j] = static_cast<Out>(v[j]);
      std::memcpy(yb + static_cast<size_t>(l0 + r) * g.o + o0, run, sizeof run);
    }
  } else if (nhwc) {
    for (int r = 0; r < count; ++r) {
      Out* px = yb + static_cast<size_t>(l0 + r) * g.o + o0;
      for (int j = 0; j < filters; ++j) px[j] = static_cast<Out>(value(o0 + j, acc[r * NR + j]));
    }
  } else {
    for (int j = 0; j < filters; ++j) {
      Out* plane = yb + static_cast<size_t>(o0 + j) * g.L() + l0;
      for (int r = 0; r < count; ++r) plane[r] = static_cast<Out>(value(o0 + j, acc[r * NR + j]));
    }
  }
}

// The uint8 layer: input values → codes (`code`), sums of |code − weight code|, `value(o, sum)` → output.
template <class T, int MR, int NV, class In, class Out, class Code, class Value>
void adder_u8(const In* x, int n, bool nhwc, const Geometry& g, const uint8_t* wt, uint8_t pad, Code code,
              Value value, Out* y) {
  constexpr int NR = NV * T::W;
  const int cp = round_up(g.c, 8), L = g.L(), wp = g.w + 2 * g.pw, groups = g.kw * cp / 8;
  const int blocks = round_up(g.o, NR) / NR;
  const Packed<uint8_t>& pw = packed(wt, g, NR, 8, g.kh * groups,
                                     [&](int ci, int i, int j) { return (i * g.kw + j) * cp + ci; });
  thread_local std::vector<uint8_t> xp;
  alignas(64) int32_t acc[MR * NR];
  for (int b = 0; b < n; ++b) {
    padded_hwc(x + static_cast<size_t>(b) * g.c * g.h * g.w, nhwc, g, cp, pad, code, xp);
    Out* yb = y + static_cast<size_t>(b) * g.o * L;
    const uint8_t* rows[MR];
    int oy = 0, ox = 0;
    for (int l0 = 0; l0 < L; l0 += MR) {
      origins<MR>(xp.data(), g, cp, l0, oy, ox, rows);
      for (int blk = 0; blk < blocks; ++blk) {
        tile_u8<T, MR, NV>(rows, g.kh, groups, wp * cp, &pw.data[static_cast<size_t>(blk) * g.kh * groups * NR * 8], acc);
        store_tile<NR>(yb, nhwc, g, l0, std::min(MR, L - l0), blk * NR, acc, value);
      }
    }
  }
}

// Raw sums of absolute differences over uint8 codes (int32 out, exact).
template <class T, int MR, int NV>
void adder_u8_raw(const uint8_t* x, int n, const Geometry& g, const uint8_t* wt, uint8_t pad, bool nhwc, int32_t* y) {
  adder_u8<T, MR, NV>(x, n, nhwc, g, wt, pad, [](uint8_t v) { return v; }, [](int, int32_t s) { return s; }, y);
}

// The adder-int8 layer on int8 codes in and out, as a .pte runs it between XNNPACK's quantized partitions: input
// code q (uint8 code q + 128 on the weights' grid), then the layer y = α[o]·Σ|q + 128 − w| + β[o] (the
// per-filter excess and the BatchNorm fold live in α, β) and the next layer's QuantizeLinear, each step one IEEE
// float operation (the build turns contraction off; the NumPy reference repeats them):
// clamp(round_half_even((α·sum + β)·inv) + out_zp, out_min, 127), inv = (float)(1/out_scale), out_min = out_zp
// fusing a ReLU.
template <class T, int MR, int NV>
void adder_q8(const int8_t* x, int n, const Geometry& g, const uint8_t* wt, const float* alpha, const float* beta,
              int zero_point, double out_scale, int out_zero_point, int out_min, bool nhwc, int8_t* y) {
  const float inv = static_cast<float>(1.0 / out_scale);
  const float lo = static_cast<float>(out_min - out_zero_point), hi = static_cast<float>(127 - out_zero_point);
  const int zp = out_zero_point;
  adder_u8<T, MR, NV>(
      x, n, nhwc, g, wt, static_cast<uint8_t>(zero_point), [](int8_t v) { return static_cast<uint8_t>(v + 128); },
      [=](int o, int32_t sum) {
        const float v = std::min(std::max((alpha[o] * static_cast<float>(sum) + beta[o]) * inv, lo), hi);
        const float r = (v + 12582912.0f) - 12582912.0f;  // half to even by 1.5·2^23 (|v| ≤ 255 after the clamp)
        return static_cast<int32_t>(r) + zp;               // in −128..127: stored as int8
      },
      y);
}

}  // namespace

// Each isa_*.cpp defines its entry points with this macro (MR × NV tiles chosen per register file).
#define QKIT_ADDER_ENTRY(NAME, TF, MRF, NVF, TU, MRU, NVU)                                                 \
  void qkit_adder_f32_##NAME(const float* x, int n, const qkit_adder_shape* s, const float* w, float* y) {   \
    adder_f32<TF, MRF, NVF>(x, n, geometry(s), w, y);                                                      \
  }                                                                                                        \
  void qkit_adder_u8_##NAME(const uint8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w,          \
                            uint8_t pad, int nhwc, int32_t* y) {                                           \
    adder_u8_raw<TU, MRU, NVU>(x, n, geometry(s), w, pad, nhwc != 0, y);                                   \
  }                                                                                                        \
  void qkit_adder_q8_##NAME(const int8_t* x, int n, const qkit_adder_shape* s, const uint8_t* w,           \
                            const float* alpha, const float* beta, int zero_point, double out_scale,       \
                            int out_zero_point, int out_min, int nhwc, int8_t* y) {                        \
    adder_q8<TU, MRU, NVU>(x, n, geometry(s), w, alpha, beta, zero_point, out_scale, out_zero_point, out_min, \
                           nhwc != 0, y);                                                                  \
  }
