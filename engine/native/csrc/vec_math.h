/* Math the compiler can vectorize: libm's expf is a call per element, which kept the
 * SiLU and the softmax scalar (a 256-token prefill's SiLU took longer than its down
 * projection). Included by the kernels that need it; part of the build's cache key.
 */
#ifndef BATON_VEC_MATH_H
#define BATON_VEC_MATH_H

#include <math.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* exp(x) in fp32 to within 2 ulp of the true value (Cephes' expf: x = n ln2 + r, a
 * degree-6 polynomial in r, times 2^n built in the exponent bits). Inputs below -87.3
 * give about 1e-38 instead of a subnormal or 0, above 88 give exp(88); NaN stays NaN. */
static inline float vexpf(float x) {
    float c = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
    float n = floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    union { int i; float f; } scale = { .i = ((int)n + 127) << 23 };
    float out = y * scale.f;
    return x != x ? x : out;
}

#ifdef __AVX512F__
/* vexpf of sixteen lanes at once, the same reduction and polynomial (with fused
 * multiply-adds, so the last bit may differ from vexpf's) and 2^n applied by scalef:
 * within 2 ulp; inputs clamped to [-87.3, 88] as vexpf's, NaN stays NaN. The scalar
 * vexpf's floorf and exponent arithmetic vectorized poorly (about 2 cycles a lane). */
static inline __m512 vexpf16(__m512 x) {
    const __m512 c = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(c, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}
#endif

/* max(s[0..n)), -inf for n == 0. Vector maxima where the CPU has AVX-512 (one running
 * maximum was a chain of dependent scalar max instructions: a quarter of the decode
 * attention's time); a max is exact, so the order does not change the result. */
static inline float max_of(const float *s, long n) {
    float m = -INFINITY;
    long j = 0;
#ifdef __AVX512F__
    if (n >= 16) {
        __m512 lanes = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= n; j += 16) lanes = _mm512_max_ps(_mm512_loadu_ps(s + j), lanes);
        m = _mm512_reduce_max_ps(lanes);
    }
#endif
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    return m;
}

/* s[0..n) = softmax(s), in place: max, exp of the differences, normalize. */
static inline void softmax_inplace(float *s, long n) {
    float m = max_of(s, n), sum = 0.f;
    long j = 0;
#ifdef __AVX512F__
    __m512 sums = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 e = vexpf16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(m)));
        _mm512_storeu_ps(s + j, e);
        sums = _mm512_add_ps(sums, e);
    }
    sum = _mm512_reduce_add_ps(sums);
#endif
    for (; j < n; j++) { s[j] = vexpf(s[j] - m); sum += s[j]; }
    float inv = 1.f / sum;
    for (j = 0; j < n; j++) s[j] *= inv;
}

#endif
