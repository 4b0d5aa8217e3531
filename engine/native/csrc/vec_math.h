/* Math the compiler can vectorize: libm's expf is a call per element, which kept the
 * SiLU and the softmax scalar (a 256-token prefill's SiLU took longer than its down
 * projection). Included by the kernels that need it; part of the build's cache key.
 */
#ifndef BATON_VEC_MATH_H
#define BATON_VEC_MATH_H

#include <math.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
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

/* The vector exps' shared middle: y = e^r for r = c - n ln2 (ln2 in two parts, as vexpf),
 * the degree-6 polynomial by fused multiply-adds; PFX the intrinsics' prefix (_mm512,
 * _mm256), T its vector type. */
#define VEXPF_POLY(PFX, T, c, n, y)                                                  \
    T y;                                                                             \
    do {                                                                             \
        T r_ = PFX##_fnmadd_ps(n, PFX##_set1_ps(0.693359375f), c);                   \
        r_ = PFX##_fnmadd_ps(n, PFX##_set1_ps(-2.12194440e-4f), r_);                 \
        T p_ = PFX##_set1_ps(1.9875691500e-4f);                                      \
        p_ = PFX##_fmadd_ps(p_, r_, PFX##_set1_ps(1.3981999507e-3f));                \
        p_ = PFX##_fmadd_ps(p_, r_, PFX##_set1_ps(8.3334519073e-3f));                \
        p_ = PFX##_fmadd_ps(p_, r_, PFX##_set1_ps(4.1665795894e-2f));                \
        p_ = PFX##_fmadd_ps(p_, r_, PFX##_set1_ps(1.6666665459e-1f));                \
        p_ = PFX##_fmadd_ps(p_, r_, PFX##_set1_ps(5.0000001201e-1f));                \
        y = PFX##_add_ps(PFX##_fmadd_ps(p_, PFX##_mul_ps(r_, r_), r_), PFX##_set1_ps(1.0f)); \
    } while (0)

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
    VEXPF_POLY(_mm512, __m512, c, n, y);
    return _mm512_scalef_ps(y, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* vexpf of eight lanes (AVX2): vexpf16's reduction and polynomial, 2^n built in the
 * exponent bits as vexpf does (the clamp keeps n in [-126, 127]); within 2 ulp. */
static inline __m256 vexpf8(__m256 x) {
    const __m256 c = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
    const __m256 n = _mm256_floor_ps(
        _mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    VEXPF_POLY(_mm256, __m256, c, n, y);
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_blendv_ps(out, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN stays NaN */
}

/* The sum and the maximum of eight lanes. */
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

static inline float hmax8(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}
#endif

/* The vector the loops below run on: sixteen lanes with AVX-512, eight with AVX2. */
#if defined(__AVX512F__)
typedef __m512 vm_vec;
#define VM_LANES 16
#define vm_exp vexpf16
#define vm_load _mm512_loadu_ps
#define vm_store _mm512_storeu_ps
#define vm_set1 _mm512_set1_ps
#define vm_zero _mm512_setzero_ps
#define vm_add _mm512_add_ps
#define vm_sub _mm512_sub_ps
#define vm_max _mm512_max_ps
#define vm_sum _mm512_reduce_add_ps
#define vm_top _mm512_reduce_max_ps
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vm_vec;
#define VM_LANES 8
#define vm_exp vexpf8
#define vm_load _mm256_loadu_ps
#define vm_store _mm256_storeu_ps
#define vm_set1 _mm256_set1_ps
#define vm_zero _mm256_setzero_ps
#define vm_add _mm256_add_ps
#define vm_sub _mm256_sub_ps
#define vm_max _mm256_max_ps
#define vm_sum hsum8
#define vm_top hmax8
#endif

/* max(s[0..n)), -inf for n == 0. Vector maxima where the CPU has AVX-512 or AVX2 (one
 * running maximum was a chain of dependent scalar max instructions: a quarter of the
 * decode attention's time); a max is exact, so the order does not change the result. */
static inline float max_of(const float *s, long n) {
    float m = -INFINITY;
    long j = 0;
#ifdef VM_LANES
    if (n >= VM_LANES) {
        vm_vec lanes = vm_set1(-INFINITY);
        for (; j + VM_LANES <= n; j += VM_LANES) lanes = vm_max(vm_load(s + j), lanes);
        m = vm_top(lanes);
    }
#endif
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    return m;
}

/* s[0..n) = softmax(s), in place: max, exp of the differences, normalize. */
static inline void softmax_inplace(float *s, long n) {
    float m = max_of(s, n), sum = 0.f;
    long j = 0;
#ifdef VM_LANES
    vm_vec sums = vm_zero();
    for (; j + VM_LANES <= n; j += VM_LANES) {
        const vm_vec e = vm_exp(vm_sub(vm_load(s + j), vm_set1(m)));
        vm_store(s + j, e);
        sums = vm_add(sums, e);
    }
    sum = vm_sum(sums);
#endif
    for (; j < n; j++) { s[j] = vexpf(s[j] - m); sum += s[j]; }
    float inv = 1.f / sum;
    for (j = 0; j < n; j++) s[j] *= inv;
}

#endif
