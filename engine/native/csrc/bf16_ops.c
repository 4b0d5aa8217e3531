/* The bf16 model's elementwise work and decode attention on CPU (see fused_ops.c and
 * paged_decode.c for the fp32 ones).
 *
 * Tensors hold bfloat16 (the top half of an IEEE float); everything is computed in fp32
 * and rounded to bf16 (to nearest, ties to even) wherever torch's bf16 ops round, so
 * each output is what the torch reference (engine/models/llama.py run in bf16) computes,
 * up to the order of the norm's and attention's sums:
 *
 * - add_rms_norm_bf16: x = bf16(x + r); out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))
 *   (sixteen at a time; AVX-512 BF16's conversion flushes denormal results to zero).
 * - rope_qkv_bf16: x1' = bf16(bf16(x1 * c) + bf16(-x2 * s)), with c and s the bf16 tables
 *   (sixteen at a time for heads of 32 to 128; denormal results flushed to zero).
 * - silu_mul_bf16: out = bf16(bf16(silu(gate)) * up) (sixteen at a time with vexpf16, and
 *   denormal results flushed to zero by AVX-512 BF16's conversion).
 * - paged_decode_attention_bf16: one query per request against its paged bf16 keys and
 *   values, scores and softmax in fp32; the probabilities rounded to bf16 (as torch's
 *   bf16 attention multiplies the values by) where the CPU has AVX-512 BF16, the weighted
 *   sum in fp32, the output rounded once.
 * - small_linear_bf16: y = x W^T (+ b) for a few rows, the products exact in fp32 and
 *   summed in fp32 (AVX-512 BF16's dot-product instruction where the CPU has it), the
 *   output rounded once. oneDNN runs such a GEMV at about half the machine's bandwidth.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "decode_attention.h"
#include "vec_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#pragma GCC optimize("fp-contract=off")

#define PAR_MIN_ELEMS 32768

/* x: [T, D] (updated in place when r is not NULL); r: [T, D] or NULL; w: [D]; out: [T, D]. */
int add_rms_norm_bf16(bf16 *x, const bf16 *r, const bf16 *w, bf16 *out, int64_t T, int64_t D,
                      float eps) {
#pragma omp parallel for schedule(static) if (T * D >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        bf16 *xt = x + t * D, *ot = out + t * D;
        const bf16 *rt = r ? r + t * D : 0;
        float ss = 0.f;
        int64_t i = 0;
#ifdef __AVX512F__
        __m512 sums = _mm512_setzero_ps();
        for (; i + 16 <= D; i += 16) {
            __m512 v = widen16(xt + i);
            if (rt) {
                v = round_bf16_ftz_x16(_mm512_add_ps(v, widen16(rt + i)));
                _mm256_storeu_si256((__m256i *)(xt + i), to_bf16_ftz_x16(v));
            }
            sums = _mm512_add_ps(sums, _mm512_mul_ps(v, v));
        }
        ss = _mm512_reduce_add_ps(sums);
#endif
        for (; i < D; i++) {
            float v = rt ? round_bf16(f32(xt[i]) + f32(rt[i])) : f32(xt[i]);
            xt[i] = to_bf16(v);
            ss += v * v;
        }
        float inv = 1.f / sqrtf(ss / (float)D + eps);
        i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= D; i += 16) {
            const __m512 n = round_bf16_ftz_x16(_mm512_mul_ps(widen16(xt + i), _mm512_set1_ps(inv)));
            _mm256_storeu_si256((__m256i *)(ot + i), to_bf16_ftz_x16(_mm512_mul_ps(widen16(w + i), n)));
        }
#endif
        for (; i < D; i++) ot[i] = to_bf16(f32(w[i]) * round_bf16(f32(xt[i]) * inv));
    }
    return 0;
}

/* qkv: [T, stride] with q heads at column 0 and k heads right after them; nheads = q heads
 * + k heads, each Dh wide; cos, sin: [P, Dh] fp32 (rounded to bf16 here); pos: [T]. */
int rope_qkv_bf16(bf16 *qkv, const float *cos_t, const float *sin_t, const int64_t *pos,
                  int64_t T, int64_t stride, int64_t nheads, int64_t Dh) {
    const int64_t half = Dh / 2;
#pragma omp parallel for schedule(static) if (T * nheads * Dh >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * Dh, *s = sin_t + pos[t] * Dh;
#ifdef __AVX512F__
        if (half % 16 == 0 && half <= 64) { /* the token's tables rounded once, for all heads */
            __m512 c1[4], s1[4], c2[4], s2[4];
            for (int64_t k = 0; k < half / 16; k++) {
                c1[k] = round_bf16_ftz_x16(_mm512_loadu_ps(c + 16 * k));
                s1[k] = round_bf16_ftz_x16(_mm512_loadu_ps(s + 16 * k));
                c2[k] = round_bf16_ftz_x16(_mm512_loadu_ps(c + half + 16 * k));
                s2[k] = round_bf16_ftz_x16(_mm512_loadu_ps(s + half + 16 * k));
            }
            for (int64_t h = 0; h < nheads; h++) {
                bf16 *x = qkv + t * stride + h * Dh;
                for (int64_t k = 0; k < half / 16; k++) {
                    const __m512 x1 = widen16(x + 16 * k), x2 = widen16(x + half + 16 * k);
                    const __m512 nx2 = _mm512_castsi512_ps( /* -x2, as torch's: -0 for +0 */
                        _mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(INT32_MIN)));
                    const __m512 a = _mm512_add_ps(round_bf16_ftz_x16(_mm512_mul_ps(x1, c1[k])),
                                                   round_bf16_ftz_x16(_mm512_mul_ps(nx2, s1[k])));
                    const __m512 b = _mm512_add_ps(round_bf16_ftz_x16(_mm512_mul_ps(x2, c2[k])),
                                                   round_bf16_ftz_x16(_mm512_mul_ps(x1, s2[k])));
                    _mm256_storeu_si256((__m256i *)(x + 16 * k), to_bf16_ftz_x16(a));
                    _mm256_storeu_si256((__m256i *)(x + half + 16 * k), to_bf16_ftz_x16(b));
                }
            }
            continue;
        }
#endif
        for (int64_t h = 0; h < nheads; h++) {
            bf16 *x = qkv + t * stride + h * Dh;
            for (int64_t i = 0; i < half; i++) {
                float x1 = f32(x[i]), x2 = f32(x[i + half]);
                float c1 = round_bf16(c[i]), s1 = round_bf16(s[i]);
                float c2 = round_bf16(c[i + half]), s2 = round_bf16(s[i + half]);
                x[i] = to_bf16(round_bf16(x1 * c1) + round_bf16(-x2 * s1));
                x[i + half] = to_bf16(round_bf16(x2 * c2) + round_bf16(x1 * s2));
            }
        }
    }
    return 0;
}

/* gate_up: [T, 2I] (gate then up); out: [T, I]. */
int silu_mul_bf16(const bf16 *gate_up, bf16 *out, int64_t T, int64_t I) {
#pragma omp parallel for schedule(static) if (T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const bf16 *g = gate_up + t * 2 * I, *u = g + I;
        bf16 *o = out + t * I;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16) {
            const __m512 x = widen16(g + i);
            const __m512 s = round_bf16_ftz_x16(
                _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), vexpf16(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
            _mm256_storeu_si256((__m256i *)(o + i), to_bf16_ftz_x16(_mm512_mul_ps(s, widen16(u + i))));
        }
#endif
        for (; i < I; i++) {
            float x = f32(g[i]);
            o[i] = to_bf16(round_bf16(x / (1.f + vexpf(-x))) * f32(u[i]));
        }
    }
    return 0;
}

/* sum_i x[i] * w[i] over n bf16 elements, in fp32. */
static inline float dot_bf16(const bf16 *x, const bf16 *w, int64_t n) {
#ifdef __AVX512BF16__
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + i),
                               (__m512bh)_mm512_loadu_si512(w + i));
    if (i < n) {
        __mmask32 m = (__mmask32)((1ull << (n - i)) - 1);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, x + i),
                               (__m512bh)_mm512_maskz_loadu_epi16(m, w + i));
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += f32(x[i]) * f32(w[i]);
    return s;
#endif
}

/* o[i] += p * v[i] over n elements, v in bf16. */
static inline void add_scaled_bf16(float *o, float p, const bf16 *v, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16) {
        __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + i)));
        __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
        _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, vf, _mm512_loadu_ps(o + i)));
    }
#endif
    for (; i < n; i++) o[i] += p * f32(v[i]);
}

/* Ask for n elements of a cache row. */
static inline void prefetch_row(const bf16 *row, int64_t n) { prefetch_bytes(row, n * 2); }

#ifdef __AVX512F__
static inline __m512 load16_bf16(const void *p) { return widen16((const bf16 *)p); }
#endif

#ifdef __AVX512BF16__
/* softmax(s) over n scores, rounded to bf16 into out (which may alias s: it is written
 * behind where s is read), then a zero where n is odd, so out holds whole pairs. The
 * probabilities rounded to bf16 before the weighted sum are what torch's bf16 attention
 * (eager: softmax in fp32, then .to(bf16); SDPA on CPU likewise) multiplies the values by. */
static void softmax_to_bf16(float *s, int64_t n, bf16 *out) {
    const float m = max_of(s, n);
    __m512 sums = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 e = vexpf16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(m)));
        _mm512_storeu_ps(s + j, e);
        sums = _mm512_add_ps(sums, e);
    }
    float sum = _mm512_reduce_add_ps(sums);
    for (; j < n; j++) {
        s[j] = vexpf(s[j] - m);
        sum += s[j];
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (j = 0; j + 16 <= n; j += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), inv);
        _mm256_storeu_si256((__m256i *)(out + j), to_bf16_ftz_x16(x));
    }
    for (; j < n; j++) out[j] = to_bf16(s[j] * (1.f / sum));
    if (n % 2) out[n] = 0;
}

/* The sixteen value elements at v[0..16) of two keys' rows a and b (b NULL: zeros),
 * interleaved a0 b0 a1 b1 ..: vdpbf16ps's pairs, in the elements' order. */
static inline __m512bh pair16(const bf16 *a, const bf16 *b) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)a));
    if (!b) return (__m512bh)lo;
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)b));
    return (__m512bh)_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* acc[g][0 .. 32 C32 + 16 H16) = sum over keys j of p[g][j] * v_j[..], for GN heads of
 * bf16 probabilities p ([GN, stride], whole pairs: softmax_to_bf16), C32 chunks of 32 and
 * H16 of 16 value elements (the tile's first element in each cached value row; acc rows D
 * apart), two keys at a time, each head's pair of probabilities against the two rows with
 * one vdpbf16ps. A 32-element chunk's pairs come from one unpack each of the low and high
 * halves of the rows' 128-bit quarters (elements 8q..8q+3 and 8q+4..8q+7 of quarter q),
 * put back in order on the store; a 16-element one from pair16. (The fp32 pass it
 * replaced converted each row to fp32 and took one multiply-add per key and head.) */
static inline __attribute__((always_inline)) void pv_pairs_fixed(
    const bf16 *p, int64_t stride, int64_t len, const bf16 *v, const int64_t *table,
    int64_t bs, int64_t D, float *acc, const int GN, const int C32, const int H16) {
    const int NA = 2 * C32 + H16;
    __m512 a[4][4];
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < NA; c++) a[g][c] = _mm512_setzero_ps();
    const int cols = 32 * C32 + 16 * H16;
    for (int64_t j = 0; j < len; j += 2) {
        const bf16 *r0 = v + slot(table, bs, j) * D;
        const bf16 *r1 = j + 1 == len ? NULL
                         : bs % 2 == 0 ? r0 + D /* j is even: a pair shares its block */
                                       : v + slot(table, bs, j + 1) * D;
        if (j + PREFETCH_ROWS + 1 < len) { /* this tile's columns of those rows */
            prefetch_row(v + slot(table, bs, j + PREFETCH_ROWS) * D, cols);
            prefetch_row(v + slot(table, bs, j + PREFETCH_ROWS + 1) * D, cols);
        }
        __m512bh vp[4];
        for (int c = 0; c < C32; c++) {
            const __m512i x = _mm512_loadu_si512(r0 + 32 * c);
            const __m512i y = r1 ? _mm512_loadu_si512(r1 + 32 * c) : _mm512_setzero_si512();
            vp[2 * c] = (__m512bh)_mm512_unpacklo_epi16(x, y);
            vp[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
        }
        if (H16) vp[2 * C32] = pair16(r0 + 32 * C32, r1 ? r1 + 32 * C32 : NULL);
        for (int g = 0; g < GN; g++) {
            uint32_t pp;
            memcpy(&pp, p + g * stride + j, sizeof pp);
            const __m512bh pg = (__m512bh)_mm512_set1_epi32((int)pp);
            for (int c = 0; c < NA; c++) a[g][c] = _mm512_dpbf16_ps(a[g][c], pg, vp[c]);
        }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21,
                                            22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28,
                                             29, 30, 31);
    for (int g = 0; g < GN; g++) {
        float *o = acc + g * D;
        for (int c = 0; c < C32; c++) {
            _mm512_storeu_ps(o + 32 * c, _mm512_permutex2var_ps(a[g][2 * c], first, a[g][2 * c + 1]));
            _mm512_storeu_ps(o + 32 * c + 16,
                             _mm512_permutex2var_ps(a[g][2 * c], second, a[g][2 * c + 1]));
        }
        if (H16) _mm512_storeu_ps(o + 32 * C32, a[g][2 * C32]);
    }
}

/* pv_pairs_fixed over `cols` (16, 32, 48 or 64) value elements. */
static void pv_pairs_tile(const bf16 *p, int64_t stride, int64_t len, const bf16 *v,
                          const int64_t *table, int64_t bs, int64_t D, float *acc, int64_t gn,
                          int64_t cols) {
#define PV_CASE(GN, C32, H16) \
    case (GN) * 8 + 2 * (C32) + (H16): \
        pv_pairs_fixed(p, stride, len, v, table, bs, D, acc, GN, C32, H16); \
        break;
#define PV_HEADS(GN) PV_CASE(GN, 0, 1) PV_CASE(GN, 1, 0) PV_CASE(GN, 1, 1) PV_CASE(GN, 2, 0)
    switch (gn * 8 + cols / 16) {
        PV_HEADS(1) PV_HEADS(2) PV_HEADS(3) PV_HEADS(4)
    }
#undef PV_HEADS
#undef PV_CASE
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
/* acc + the dot products of q and k's eight pairs of bf16 (qk_keys' dot). */
static inline __m256 dot16_bf16(__m256 acc, __m256i q, __m256i k) {
    return _mm256_dpbf16_ps(acc, (__m256bh)q, (__m256bh)k);
}
#endif

/* One (request, kv head): G query heads of D against len keys; scores: [G, len] fp32;
 * acc: [G, D] fp32. Caches: [Hkv, N, bs, D] bf16. */
static void one(const bf16 *q, const bf16 *kc, const bf16 *vc, const int64_t *table,
                int64_t len, bf16 *out, float *scores, float *acc, int64_t G, int64_t D,
                int64_t bs, int64_t N, int64_t kvh, float scale) {
    const bf16 *kbase = kc + kvh * N * bs * D;
    const bf16 *vbase = vc + kvh * N * bs * D;
    for (int64_t r = 0; r < PREFETCH_ROWS && r < len; r++) /* the pass asks on from here */
        prefetch_row(kbase + slot(table, bs, r) * D, D);
    int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    if (D % 16 == 0)
        j = qk_keys((const char *)q, (const char *)kbase, table, len, scores, G, D,
                    sizeof(bf16), 16, dot16_bf16, bs, scale);
#endif
    for (; j < len; j++) {
        const bf16 *k = kbase + slot(table, bs, j) * D;
        for (int64_t g = 0; g < G; g++) scores[g * len + j] = dot_bf16(q + g * D, k, D) * scale;
    }
    for (int64_t r = 0; r < PREFETCH_ROWS && r < len; r++)
        prefetch_row(vbase + slot(table, bs, r) * D, D);
#ifdef __AVX512BF16__
    if (D % 16 == 0) { /* bf16 probabilities, two keys a vdpbf16ps */
        const int64_t stride = len + len % 2;
        /* Head g's probabilities at bf16 element g * stride, byte 2g(len + 1) at most: never
         * past its own scores (byte 4g len, for len >= 1), so rounding them in place is safe. */
        bf16 *p = (bf16 *)scores;
        for (int64_t g = 0; g < G; g++) softmax_to_bf16(scores + g * len, len, p + g * stride);
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int64_t cols = D - d0 < 64 ? D - d0 : 64;
            for (int64_t g0 = 0; g0 < G; g0 += 4)
                pv_pairs_tile(p + g0 * stride, stride, len, vbase + d0, table, bs, D,
                              acc + g0 * D + d0, G - g0 < 4 ? G - g0 : 4, cols);
        }
        for (int64_t i = 0; i < G * D; i++) out[i] = to_bf16(acc[i]);
        return;
    }
#endif
    for (int64_t g = 0; g < G; g++) softmax_inplace(scores + g * len, len);
    int64_t d0 = 0;
#ifdef __AVX512F__
    /* Up to four heads by four 16-wide chunks of the value at a time, their sums kept in
     * registers across the keys (in memory, each key's update waited on the last one's
     * store); each sum still runs over the keys in order, so the result is the same. */
    d0 = pv_fp32_heads(scores, len, (const char *)vbase, sizeof(bf16), load16_bf16, table, bs,
                       G, D, acc);
#endif
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = d0; d < D; d++) acc[g * D + d] = 0.f;
    if (d0 < D)
        for (int64_t j = 0, blk = 0, off = 0; j < len; j++) {
            const bf16 *v = vbase + (table[blk] * bs + off) * D;
            if (++off == bs) { /* the next token starts the next block */
                off = 0;
                blk++;
            }
            for (int64_t d = d0; d < D; d++)
                for (int64_t g = 0; g < G; g++) acc[g * D + d] += scores[g * len + j] * f32(v[d]);
        }
    for (int64_t i = 0; i < G * D; i++) out[i] = to_bf16(acc[i]);
}

/* q, out: [B, H, D] bf16; tables: [B, W]; lens: [B]; scratch: [B * Hkv, G * (max_len + D)]
 * fp32. */
int paged_decode_attention_bf16(const bf16 *q, const bf16 *kc, const bf16 *vc,
                                const int64_t *tables, const int64_t *lens, bf16 *out,
                                float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                int64_t bs, int64_t N, int64_t W, int64_t max_len, float scale) {
    const int64_t G = H / Hkv;
    const int64_t per = G * (max_len + D);
    const int par = B * Hkv > 1 && B * H * max_len * D >= PAR_MIN_ATTENTION;
#pragma omp parallel for schedule(dynamic) if (par)
    for (int64_t i = 0; i < B * Hkv; i++) {
        int64_t b = i / Hkv, kvh = i % Hkv;
        float *s = scratch + i * per;
        one(q + (b * H + kvh * G) * D, kc, vc, tables + b * W, lens[b],
            out + (b * H + kvh * G) * D, s, s + G * max_len, G, D, bs, N, kvh, scale);
    }
    return 0;
}

/* x: [T, I]; W: [O, I] row-major; b: [O] or NULL; y: [T, O]; all bf16. */
int small_linear_bf16(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int64_t T,
                      int64_t O, int64_t I) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const bf16 *w = W + o * I;
        for (int64_t t = 0; t < T; t++)
            y[t * O + o] = to_bf16(dot_bf16(x + t * I, w, I) + (b ? f32(b[o]) : 0.f));
    }
    return 0;
}
