// The pixel-lane tile of the kernel-granularity direct conv (see conv.cpp), written once and compiled
// twice: conv.cpp includes this file inside one namespace per instruction set, with KC_PIXVEC_TARGET
// set to that set's target string ("avx2,fma" / "avx2,fma,avx512f,avx512vl") and KC_PIXVEC_LANES to its
// float vector width (8: __m256, 16: __m512), one lane per pixel of a tile.  The window transpose and the
// final 8x8 transposes are AVX2 in both copies.  No include guard: each inclusion defines the functions
// in its own namespace.  Needs ConvGeom, kQuad and transpose8 (an AVX2 8x8 transpose, inlined into either
// copy) from conv.cpp.
#ifndef KC_PIXVEC_TARGET
#error "define KC_PIXVEC_TARGET before including conv_pixvec.h"
#endif
#if KC_PIXVEC_LANES != 8 && KC_PIXVEC_LANES != 16
#error "define KC_PIXVEC_LANES as 8 or 16 before including conv_pixvec.h"
#endif

// The vector of kLanes floats and the six operations the tile needs (aligned loads and stores).
constexpr int kLanes = KC_PIXVEC_LANES;
#if KC_PIXVEC_LANES == 16
using vecf = __m512;
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vzero() { return _mm512_setzero_ps(); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vload(const float* p) { return _mm512_load_ps(p); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline void vstore(float* p, vecf v) { _mm512_store_ps(p, v); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vadd(vecf a, vecf b) { return _mm512_add_ps(a, b); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vbcast(const float* s) { return _mm512_set1_ps(*s); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vfma(vecf a, vecf b, vecf c) {
  return _mm512_fmadd_ps(a, b, c);
}
#else
using vecf = __m256;
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vzero() { return _mm256_setzero_ps(); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vload(const float* p) { return _mm256_load_ps(p); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline void vstore(float* p, vecf v) { _mm256_store_ps(p, v); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vadd(vecf a, vecf b) { return _mm256_add_ps(a, b); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vbcast(const float* s) { return _mm256_broadcast_ss(s); }
__attribute__((target(KC_PIXVEC_TARGET), always_inline)) inline vecf vfma(vecf a, vecf b, vecf c) {
  return _mm256_fmadd_ps(a, b, c);
}
#endif

// The window values of input channels [i0, i0 + 4) for the tile's TW pixels: xt[(c * taps + k) * TW + t],
// channel i0 + c, tap k, pixel t (zero outside the image).  Channels-last rows hold the four channels
// of a (tap, pixel) side by side: one 4-float load each, transposed four pixels at a time, where
// scalar loads cost four times the instructions.  A load that would run past the end of x (the
// last pixel of the batch with a quad of fewer than 4 channels) is assembled from the nc live
// channels; lanes past nc (channels of the next pixel, or zeros) are never used.
template <int TW>
__attribute__((target(KC_PIXVEC_TARGET))) inline void quad_window(const float* __restrict x,
                                                                   const int64_t* __restrict off, int64_t taps,
                                                                   int64_t i0, int nc, int64_t xsize,
                                                                   float* __restrict xt) {
  static_assert(kQuad == 4, "one __m128 of channels");
  const auto load4 = [&](int64_t o) -> __m128 {
    if (o < 0) return _mm_setzero_ps();
    const int64_t p = o + i0;
    if (p + kQuad <= xsize) return _mm_loadu_ps(x + p);
    alignas(16) float v[kQuad] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c = 0; c < nc; ++c) v[c] = x[p + c];
    return _mm_load_ps(v);
  };
  for (int64_t k = 0; k < taps; ++k)
    for (int t0 = 0; t0 < TW; t0 += 8) {
      const int64_t* ok = off + k * TW + t0;
      // r_t: pixels t (low half) and t + 4 (high half), four channels each
      const __m256 r0 = _mm256_set_m128(load4(ok[4]), load4(ok[0]));
      const __m256 r1 = _mm256_set_m128(load4(ok[5]), load4(ok[1]));
      const __m256 r2 = _mm256_set_m128(load4(ok[6]), load4(ok[2]));
      const __m256 r3 = _mm256_set_m128(load4(ok[7]), load4(ok[3]));
      const __m256 t0l = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);  // channels 0,1 / 2,3
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      float* d = xt + k * TW + t0;
      _mm256_store_ps(d + 0 * taps * TW, _mm256_shuffle_ps(t0l, t2, 0x44));
      _mm256_store_ps(d + 1 * taps * TW, _mm256_shuffle_ps(t0l, t2, 0xEE));
      _mm256_store_ps(d + 2 * taps * TW, _mm256_shuffle_ps(t1, t3, 0x44));
      _mm256_store_ps(d + 3 * taps * TW, _mm256_shuffle_ps(t1, t3, 0xEE));
    }
}

// MB maps [m, m + MB) of one input channel's responses for the tile's TW = kLanes * NV pixels:
// pc[(m + q) * TW + t] = sum_k w[k * Mpad + m + q] * xc[k * TW + t], MB * NV independent FMA chains.
template <int NV, int MB>
__attribute__((target(KC_PIXVEC_TARGET))) inline void responses_block(const float* __restrict xc,
                                                                       const float* __restrict w, int64_t taps,
                                                                       int64_t Mpad, int64_t m, float* __restrict pc) {
  constexpr int TW = kLanes * NV;
  vecf r[MB][NV];
  for (int q = 0; q < MB; ++q)
    for (int v = 0; v < NV; ++v) r[q][v] = vzero();
  for (int64_t k = 0; k < taps; ++k) {
    vecf xk[NV];
    for (int v = 0; v < NV; ++v) xk[v] = vload(xc + k * TW + kLanes * v);
    const float* wk = w + k * Mpad + m;
    for (int q = 0; q < MB; ++q) {
      const vecf bq = vbcast(wk + q);
      for (int v = 0; v < NV; ++v) r[q][v] = vfma(bq, xk[v], r[q][v]);
    }
  }
  for (int q = 0; q < MB; ++q)
    for (int v = 0; v < NV; ++v) vstore(pc + (m + q) * TW + kLanes * v, r[q][v]);
}

// The M responses of one input channel for the tile's TW pixels: pc[m * TW + t] = sum_k w[k * Mpad + m] *
// xc[k * TW + t].  MB maps at a time, each NV vectors of pixels: MB * NV independent FMA chains (8),
// enough for the FMA latency, and with NV = 2 (AVX2) each weight broadcast feeds two FMAs.  (On AVX-512,
// NV = 1 with 16 chains of 16 maps measured no faster than 8 chains, Zen 5.)  M is rounded up
// to a multiple of MB with the pack's zero maps (Mpad is a multiple of 16): a lone map's chain would
// wait on the FMA latency at every tap, costing as much as a block.
template <int NV>
__attribute__((target(KC_PIXVEC_TARGET))) inline void channel_responses_px(const float* __restrict xc,
                                                                            const float* __restrict w, int64_t taps,
                                                                            int64_t M, int64_t Mpad,
                                                                            float* __restrict pc) {
  constexpr int MB = 8 / NV;
  static_assert(16 % MB == 0, "blocks of maps within Mpad");
  for (int64_t m = 0; m < M; m += MB) responses_block<NV, MB>(xc, w, taps, Mpad, m, pc);
}

// channel_responses_px<2> with 12 chains (6 maps x 2 vectors of the 16 pixels) instead of 8: slack over
// the 8 the FMA latency needs.  Taken for kernels of more than kShortTaps taps (the 7x7 stem), where the
// tap loop is long enough to pay: measured on AVX2 (Zen 3), resnet18's stem at 32 maps ran 6% faster,
// while on 3x3 layers the narrow tail blocks ate the gain.  AVX2 copy only (the AVX-512 one runs NV = 1).
// The last maps take a block of 6, 4 or 2
// that stays inside Mpad (a multiple of 16, so M = Mpad leaves 4, 2 or 0 after the blocks of 6).
__attribute__((target(KC_PIXVEC_TARGET))) inline void channel_responses_px12(const float* __restrict xc,
                                                                              const float* __restrict w, int64_t taps,
                                                                              int64_t M, int64_t Mpad,
                                                                              float* __restrict pc) {
  int64_t m = 0;
  for (; M - m >= 6; m += 6) responses_block<2, 6>(xc, w, taps, Mpad, m, pc);
  const int64_t r = M - m;
  if (r == 5) responses_block<2, 6>(xc, w, taps, Mpad, m, pc);
  else if (r >= 3) responses_block<2, 4>(xc, w, taps, Mpad, m, pc);
  else if (r >= 1) responses_block<2, 2>(xc, w, taps, Mpad, m, pc);
}

// Taken on AVX2 for every M (it has no 16-lane permutes), and on AVX-512 wherever the register tiles
// of conv.cpp lose to it (more than 32 maps per input channel, more than 64 outputs, or at most 8
// maps of a 3x3 or smaller kernel; see make_direct_pack): the pixels are the vector lanes instead.
//
// A tile is TW = kLanes * NV consecutive output pixels of the whole batch (flattened [N, H_out, W_out]
// order, so a tile may span rows and images and only the batch's last tile has idle lanes).  For
// each quad of input channels: the window values xt [4][taps][TW] and the M responses pv [c][M][TW]
// of each channel c of the quad (independent FMA chains), then every output o adds the four response
// vectors it takes: acc[o] += sum_c pv[c][slot[i0 + c, o]] (acc [C][TW], L1-resident up to C = 512 at TW = 8, 256 at TW = 16).
// Tiles: AVX2 takes 16 pixels (NV = 2) up to 64 padded maps and 8 beyond, where a quad's responses would
// outgrow 16 KB; AVX-512 one vector of 16 pixels for every M (32-pixel tiles, NV = 2, measured no
// faster on Zen 5: the responses and acc double for the same broadcasts saved).
// slotp is [C_in/4][Cpad][4] here, each entry the float offset of its response vector in pv
// (c * Mpad * TW + slot * TW), so the four offsets of an output are one 64-bit load (16-bit offsets)
// or two, and acc[o] is loaded and stored once per quad: the scatter is bound by its loads.  With
// NV = 2 (16 pixels, small M) each offset load, and each acc round trip, serves twice the pixels.
// Channels past C_in in the last quad point at a zeroed vector.  The result acc is transposed into
// accT [TW][Cpad] for the shared epilogue.  off [taps][TW]: the x offset of each (tap, pixel)
// without the channel, -1 outside the image or past the batch.
// S: the offset type, uint16_t where they fit (one 64-bit load an output), else int32_t.  NV: vectors
// of kLanes pixels per tile.  The tile is pixels [m0, m0 + np) of the flattened output, np <= TW.
template <typename S, int NV>
__attribute__((target(KC_PIXVEC_TARGET))) void direct_tile_pixvec(
    const float* __restrict x, const float* __restrict wtp, const S* __restrict slotp, const ConvGeom& g,
    int64_t Cpad, int64_t Mpad, int64_t m0, int np, float* __restrict acc, float* __restrict accT,
    float* __restrict xt, float* __restrict pv, int64_t* __restrict off) {
  constexpr int TW = kLanes * NV;
  const int64_t taps = g.kh * g.kw, C = g.C, M = g.M;
  // off[k][t] = base[t] + (a * dh * W + b * dw) * C_in for tap k = (a, b) where the tap is inside the
  // image, else -1: adds, compares and masks over contiguous pixels (vectorized)
  alignas(32) int64_t base[TW], hb[TW], wb[TW];
  {
    int64_t n = m0 / (g.Ho * g.Wo), ho = m0 / g.Wo % g.Ho, wo = m0 % g.Wo;
    for (int t = 0; t < TW; ++t) {
      const int64_t h0 = ho * g.sh - g.ph;
      wb[t] = wo * g.sw - g.pw;
      base[t] = ((n * g.H + h0) * g.W + wb[t]) * g.Cin;
      hb[t] = t < np ? h0 : g.H;  // a pixel past the batch: every tap outside
      if (++wo == g.Wo) {
        wo = 0;
        if (++ho == g.Ho) ho = 0, ++n;
      }
    }
  }
  for (int64_t a = 0; a < g.kh; ++a)
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t dh = a * g.dh, dw = b * g.dw, delta = (dh * g.W + dw) * g.Cin, H = g.H, W = g.W;
      int64_t* ok = off + (a * g.kw + b) * TW;
      for (int t = 0; t < TW; ++t) {
        const int64_t h = hb[t] + dh, w = wb[t] + dw;
        const int64_t in = -static_cast<int64_t>((h >= 0) & (h < H) & (w >= 0) & (w < W));  // all ones or zero
        ok[t] = ((base[t] + delta) & in) | ~in;
      }
    }
  for (int64_t e = 0; e < Cpad * TW; e += kLanes) vstore(acc + e, vzero());
  const int64_t pstride = Mpad * TW, xsize = g.N * g.H * g.W * g.Cin;
  for (int64_t i0 = g.c_lo; i0 < g.c_hi; i0 += kQuad) {  // c_lo is a multiple of 16
    const int nc = static_cast<int>(std::min<int64_t>(kQuad, g.c_hi - i0));
    quad_window<TW>(x, off, taps, i0, nc, xsize, xt);
    for (int c = 0; c < kQuad; ++c) {
      float* pc = pv + c * pstride;
      if (c >= nc) {  // past C_in: its slots point at pc[0..TW)
        for (int v = 0; v < NV; ++v) vstore(pc + kLanes * v, vzero());
        continue;
      }
      const float* xc = xt + c * taps * TW;
      const float* wc = wtp + (i0 + c) * taps * Mpad;
      if (NV == 2 && taps > kShortTaps) channel_responses_px12(xc, wc, taps, M, Mpad, pc);  // see there
      else channel_responses_px<NV>(xc, wc, taps, M, Mpad, pc);
    }
    const S* sq = slotp + (i0 / kQuad) * Cpad * kQuad;
    for (int64_t o = 0; o < C; ++o) {
      uint64_t o0, o1, o2, o3;
      if constexpr (sizeof(S) == 2) {
        uint64_t s4;
        std::memcpy(&s4, sq + o * kQuad, 8);
        o0 = s4 & 0xFFFF, o1 = (s4 >> 16) & 0xFFFF, o2 = (s4 >> 32) & 0xFFFF, o3 = s4 >> 48;
      } else {
        uint64_t s01, s23;
        std::memcpy(&s01, sq + o * kQuad, 8);
        std::memcpy(&s23, sq + o * kQuad + 2, 8);
        o0 = uint32_t(s01), o1 = s01 >> 32, o2 = uint32_t(s23), o3 = s23 >> 32;
      }
      for (int v = 0; v < NV; ++v) {
        const float* p = pv + kLanes * v;
        const vecf u01 = vadd(vload(p + o0), vload(p + o1)), u23 = vadd(vload(p + o2), vload(p + o3));
        float* ao = acc + o * TW + kLanes * v;
        vstore(ao, vadd(vload(ao), vadd(u01, u23)));
      }
    }
  }
  // accT [TW][Cpad] = acc [Cpad][TW] transposed, 8 x 8 blocks (the pad rows of acc stay zero)
  for (int64_t o0 = 0; o0 < Cpad; o0 += 8)
    for (int t0 = 0; t0 < TW; t0 += 8) {
      __m256 r[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(acc + (o0 + q) * TW + t0);
      transpose8(r);
      for (int q = 0; q < 8; ++q) _mm256_store_ps(accT + (t0 + q) * Cpad + o0, r[q]);
    }
}
