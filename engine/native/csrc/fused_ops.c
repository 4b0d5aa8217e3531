/* The decoder layer's elementwise work, each in one pass instead of torch's chain of ops
 * (and their dispatch, temporaries and thread hand-offs):
 *
 * - add_rms_norm: x += r (the residual add), then out = w * (x * rsqrt(mean(x^2) + eps)).
 * - rope_qkv: the rotate-half rotary embedding of q and k, in place in the fused qkv rows,
 *   read from the cos/sin tables by position.
 * - silu_mul: out = silu(gate) * up from the fused gate_up rows.
 *
 * Every element is computed with the same operations in the same order as the torch
 * reference (engine/models/llama.py); only the sum of squares is accumulated in a different
 * order, and silu's exp is vexpf/vexpf16 (vec_math.h), within 2 ulp. Rows are split across threads only when there are
 * enough of them to pay for it.
 */
#include <math.h>
#include <stdint.h>

#include "vec_math.h"

/* No a*b+c fused into one rounding: each product and sum rounds as torch's ops do. */
#pragma GCC optimize("fp-contract=off")

#define PAR_MIN_ELEMS 32768

/* x: [T, D] (updated in place when r is not NULL); r: [T, D] or NULL; w: [D]; out: [T, D]. */
int add_rms_norm(float *x, const float *r, const float *w, float *out, int64_t T, int64_t D,
                 float eps) {
#pragma omp parallel for schedule(static) if (T * D >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        float *xt = x + t * D, *ot = out + t * D;
        const float *rt = r ? r + t * D : 0;
        float ss = 0.f;
        for (int64_t i = 0; i < D; i++) {
            float v = rt ? xt[i] + rt[i] : xt[i];
            xt[i] = v;
            ss += v * v;
        }
        float inv = 1.f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) ot[i] = w[i] * (xt[i] * inv);
    }
    return 0;
}

/* qkv: [T, stride] with q heads at column 0 and k heads right after them; nheads = q heads
 * + k heads, each Dh wide; cos, sin: [P, Dh]; pos: [T]. */
int rope_qkv(float *qkv, const float *cos_t, const float *sin_t, const int64_t *pos, int64_t T,
             int64_t stride, int64_t nheads, int64_t Dh) {
    const int64_t half = Dh / 2;
#pragma omp parallel for schedule(static) if (T * nheads * Dh >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * Dh, *s = sin_t + pos[t] * Dh;
        for (int64_t h = 0; h < nheads; h++) {
            float *x = qkv + t * stride + h * Dh;
            for (int64_t i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] + (-x2) * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
    return 0;
}

/* gate_up: [T, 2I] (gate then up); out: [T, I]. */
int silu_mul(const float *gate_up, float *out, int64_t T, int64_t I) {
#pragma omp parallel for schedule(static) if (T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16) {
            const __m512 x = _mm512_loadu_ps(g + i);
            const __m512 e = vexpf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)),
                                                  _mm512_loadu_ps(u + i)));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= I; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = vexpf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                                  _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = (g[i] / (1.f + vexpf(-g[i]))) * u[i];
    }
    return 0;
}
