/* bfloat16 (the top half of an IEEE float) to and from fp32, for the bf16 kernels. */
#ifndef BATON_BF16_H
#define BATON_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float f32(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* To nearest, ties to even; branch-free, so loops of it vectorize; a NaN stays a (quiet)
 * NaN. */
static inline bf16 to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (bf16)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

static inline float round_bf16(float f) { return f32(to_bf16(f)); }

#ifdef __AVX512F__
#include <immintrin.h>

/* The same conversions, sixteen lanes at a time. */
static inline __m512 widen16(const bf16 *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256i to_bf16_x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                   lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16),
                                                      _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

/* to_bf16_x16 in one instruction where the CPU has AVX-512 BF16 (half the cost of SiLU x
 * mul was its two roundings): to nearest, ties to even, as to_bf16, except that values
 * below 2^-126 in magnitude become zero (the instruction flushes denormals). */
static inline __m256i to_bf16_ftz_x16(__m512 v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    return to_bf16_x16(v);
#endif
}

static inline __m512 round_bf16_ftz_x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_ftz_x16(v)), 16));
}
#endif

#endif
