/* Paged decode attention on CPU: one query token per request, read straight from the
 * block-paged cache, so no gathered copy of the context is ever made.
 *
 * Cache layout (the torch backend's): [Hkv, N, bs, D], float32. For each (request, kv
 * head) the keys are read once for all G = H / Hkv query heads that share them (GQA).
 * Softmax is computed in two passes over a per-head score buffer of the context length.
 * With AVX-512 the key pass takes eight keys at a time against up to three heads, their
 * 256-bit partial sums in registers and reduced together, and the value pass keeps up to
 * four heads by 64 elements of the output in registers across the keys (the compiler's
 * vectorized loops reduced each score on its own and summed the output in memory, each
 * key's update waiting on the last one's store). Batch 64, 330-token contexts, 30 layers'
 * caches, two threads: 51.9 -> 45.0 ms (a plain read of those caches: 37.0); batch 1
 * 0.81 -> 0.42 ms. With AVX2 (Zen 3) the same key pass and a value pass of four heads by
 * 24 elements, and the softmax's exp eight lanes at a time (it was the scalar vexpf):
 * batch 1 1.29-2.28 -> 0.72-0.73 ms, batch 64 69-73 -> 66-70 (read: 32-35;
 * `python -m bench.decode_attention`, two runs each, alternating, 2026-12-07).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "decode_attention.h"
#include "vec_math.h"

/* Ask for n elements of a cache row. */
static inline void prefetch_row(const float *row, int64_t n) { prefetch_bytes(row, n * 4); }

/* Token j's row. */
static inline const float *row_at(const float *base, const int64_t *table, int64_t bs,
                                  int64_t D, int64_t j) {
    return base + slot(table, bs, j) * D;
}

#ifdef DA_VECTOR
#ifdef __AVX512F__
static inline __m512 load_fp32(const void *p) { return _mm512_loadu_ps(p); }
#else
static inline __m256 load_fp32(const void *p) { return _mm256_loadu_ps(p); }
#endif

/* acc + q * k, eight fp32 lanes (qk_keys' dot). */
static inline __m256 dot8_fp32(__m256 acc, __m256i q, __m256i k) {
    return _mm256_fmadd_ps(_mm256_castsi256_ps(q), _mm256_castsi256_ps(k), acc);
}
#endif

static void one(const float *q, const float *kc, const float *vc, const int64_t *table,
                int64_t len, float *out, float *scores, int64_t G, int64_t D, int64_t bs,
                int64_t N, int64_t kvh, float scale) {
    const float *kbase = kc + kvh * N * bs * D;
    const float *vbase = vc + kvh * N * bs * D;
    for (int64_t r = 0; r < PREFETCH_ROWS && r < len; r++)
        prefetch_row(row_at(kbase, table, bs, D, r), D);
    int64_t j0 = 0;
#ifdef DA_VECTOR
    if (D % 8 == 0)
        j0 = qk_keys((const char *)q, (const char *)kbase, table, len, scores, G, D,
                     sizeof(float), 8, dot8_fp32, bs, scale);
#endif
    for (int64_t j = j0; j < len; j++) {
        const float *k = row_at(kbase, table, bs, D, j);
        if (j + PREFETCH_ROWS < len)
            prefetch_row(row_at(kbase, table, bs, D, j + PREFETCH_ROWS), D);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float dot = 0.f;
            for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];
            scores[g * len + j] = dot * scale;
        }
    }
    for (int64_t r = 0; r < PREFETCH_ROWS && r < len; r++)
        prefetch_row(row_at(vbase, table, bs, D, r), D);
    for (int64_t g = 0; g < G; g++) softmax_inplace(scores + g * len, len);
    int64_t d0 = 0;
#ifdef DA_VECTOR
    d0 = pv_fp32_heads(scores, len, (const char *)vbase, sizeof(float), load_fp32, table, bs,
                       G, D, out);
#endif
    if (d0 == D) return;
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = d0; d < D; d++) out[g * D + d] = 0.f;
    for (int64_t j = 0, blk = 0, off = 0; j < len; j++) {
        const float *v = vbase + (table[blk] * bs + off) * D;
        if (++off == bs) {
            off = 0;
            blk++;
        }
        if (j + PREFETCH_ROWS < len)
            prefetch_row(row_at(vbase, table, bs, D, j + PREFETCH_ROWS), D);
        for (int64_t g = 0; g < G; g++) {
            float p = scores[g * len + j], *o = out + g * D;
            for (int64_t d = d0; d < D; d++) o[d] += p * v[d];
        }
    }
}

/* q, out: [B, H, D]; tables: [B, W]; lens: [B]; scratch: [B * Hkv, G * max_len]. */
int paged_decode_attention(const float *q, const float *kc, const float *vc,
                           const int64_t *tables, const int64_t *lens, float *out,
                           float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                           int64_t bs, int64_t N, int64_t W, int64_t max_len, float scale) {
    const int64_t G = H / Hkv;
    /* A few short contexts run on the calling thread: waking the pool would cost more
     * than the work. */
    const int par = B * Hkv > 1 && B * H * max_len * D >= PAR_MIN_ATTENTION;
#pragma omp parallel for schedule(dynamic) if (par)
    for (int64_t i = 0; i < B * Hkv; i++) {
        int64_t b = i / Hkv, kvh = i % Hkv;
        one(q + (b * H + kvh * G) * D, kc, vc, tables + b * W, lens[b],
            out + (b * H + kvh * G) * D, scratch + i * G * max_len, G, D, bs, N, kvh, scale);
    }
    return 0;
}
