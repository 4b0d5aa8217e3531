/* What the fp32 and bf16 paged decode attention kernels (paged_decode.c, bf16_ops.c)
 * share: when to use both threads, how far ahead to ask for the cache's rows, a token's
 * cache slot, the key pass (256-bit sums of eight keys) and the fp32-probability value
 * pass (pv_fp32_heads).
 */
#ifndef BATON_DECODE_ATTENTION_H
#define BATON_DECODE_ATTENTION_H

#include <stdint.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
/* The key pass needs 256-bit FMAs only; the value pass runs on da_vec, sixteen lanes with
 * AVX-512, else eight. */
#define DA_VECTOR 1
#endif

/* Work (heads x context x head size) worth waking the other threads for: at batch 1 in a
 * decode step (two cores, 256-token context, timed inside the native step) SmolLM2 bf16's
 * attention took 577 us a step on one thread and 435-495 on two; fp32's 1.41-1.49 ms with
 * the old threshold (1 M, and a prefetch only from 1 MiB), 1.11-1.12 with this one. */
#define PAR_MIN_ATTENTION (1 << 16)

/* Decode attention streams the KV cache from memory (a batch's contexts times the layers
 * are far past the caches) in block-sized runs of rows that the hardware prefetcher does
 * not follow from one block to the next: each pass asks for the row PREFETCH_ROWS ahead
 * (into L2) while it computes on the current ones. Measured on one core, 30 layers'
 * caches, 288-token contexts: 0.61-0.74x the time at batch 8-64 with blocks scattered,
 * 0.64-0.93x with them in order (5.6-7 GB/s before, where the weights stream at ~11);
 * batch 1 unchanged within noise. A distance of 32 or 128 rows did a little worse, 256
 * nothing. Each pass's first rows are asked for before it starts (the value pass's while
 * the softmax runs). At batch 1 too: a standalone loop over 30 layers' caches found them
 * in the CPU caches and asking cost 1.1-1.2x (fp32), but in a decode step the layers'
 * weights stream between one layer's attention and the next and nothing of the KV cache
 * is left; timed inside the native step (SmolLM2 bf16, 256-token context, two cores),
 * asking took the step's attention from 850 to 577 us. */
#define PREFETCH_ROWS 64

/* Ask for `bytes` bytes from p into L2. */
static inline void prefetch_bytes(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 2);
}

/* The cache slot of a request's token j: its block from the table, its offset in it
 * (32-bit division: a 64-bit one costs tens of cycles, once per key it dominated). */
static inline int64_t slot(const int64_t *table, int64_t bs, int64_t j) {
    uint32_t u = (uint32_t)j, b = (uint32_t)bs;
    return table[u / b] * bs + u % b;
}

#ifdef DA_VECTOR
/* Lane r of the result: the sum of a[r]'s eight lanes (a transpose-and-add tree: two
 * unpacks and a permute, about one add per sum; a 512-bit tree of sixteen sums does twice
 * the lane operations per sum). */
static inline __m256 sum8(const __m256 a[8]) {
    __m256 b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++) {
        __m256d x = _mm256_castps_pd(b[2 * i]), y = _mm256_castps_pd(b[2 * i + 1]);
        c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                             _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20),
                         _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

/* scores[g][0..8) = scale * (q_g . k_r) for GN query heads (rows D elements of `es` bytes
 * apart, scores rows `len` apart) and eight keys k, `chunk` elements (256 bits) at a time:
 * each key's chunk loaded once for the GN heads, dot(acc, q chunk, k chunk) adding their
 * products into eight fp32 lanes, 8 x GN sums in registers (GN <= 3: 24 of the 32),
 * reduced by sum8. Inlined with GN, chunk and dot constant. */
static inline __attribute__((always_inline)) void qk8_fixed(
    const char *q, const char *const k[8], int64_t D, int64_t es, int64_t chunk,
    __m256 (*dot)(__m256, __m256i, __m256i), float *scores, int64_t len, float scale,
    const int GN) {
    __m256 acc[3][8];
    for (int g = 0; g < GN; g++)
        for (int r = 0; r < 8; r++) acc[g][r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += chunk) {
        __m256i qv[3];
        for (int g = 0; g < GN; g++)
            qv[g] = _mm256_loadu_si256((const __m256i *)(q + (g * D + d) * es));
        for (int r = 0; r < 8; r++) {
            const __m256i kv = _mm256_loadu_si256((const __m256i *)(k[r] + d * es));
            for (int g = 0; g < GN; g++) acc[g][r] = dot(acc[g][r], qv[g], kv);
        }
    }
    for (int g = 0; g < GN; g++)
        _mm256_storeu_ps(scores + g * len, _mm256_mul_ps(sum8(acc[g]), _mm256_set1_ps(scale)));
}

/* The key pass over a (request, kv head)'s keys (kbase: its cache of D-element rows),
 * eight keys at a time, in groups of up to three heads (qk8_fixed); returns the keys done
 * (len rounded down to eight). D a multiple of `chunk`. */
static inline __attribute__((always_inline)) int64_t qk_keys(
    const char *q, const char *kbase, const int64_t *table, int64_t len, float *scores,
    int64_t G, int64_t D, int64_t es, int64_t chunk, __m256 (*dot)(__m256, __m256i, __m256i),
    int64_t bs, float scale) {
    const int64_t row = D * es;
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        const char *k[8];
        const int64_t ahead = j + PREFETCH_ROWS;
        if (bs % 8 == 0) { /* the eight share a block, as do the eight ahead */
            const char *k0 = kbase + slot(table, bs, j) * row;
            for (int r = 0; r < 8; r++) k[r] = k0 + r * row;
            if (ahead < len) {
                const char *a0 = kbase + slot(table, bs, ahead) * row;
                for (int64_t r = 0; r < 8 && ahead + r < len; r++) prefetch_bytes(a0 + r * row, row);
            }
        } else {
            for (int r = 0; r < 8; r++) k[r] = kbase + slot(table, bs, j + r) * row;
            for (int64_t r = ahead; r < ahead + 8 && r < len; r++)
                prefetch_bytes(kbase + slot(table, bs, r) * row, row);
        }
        for (int64_t g = 0; g < G; g += 3) {
            const char *qg = q + g * row;
            float *sg = scores + g * len + j;
            switch (G - g < 3 ? G - g : 3) {
            case 1: qk8_fixed(qg, k, D, es, chunk, dot, sg, len, scale, 1); break;
            case 2: qk8_fixed(qg, k, D, es, chunk, dot, sg, len, scale, 2); break;
            default: qk8_fixed(qg, k, D, es, chunk, dot, sg, len, scale, 3); break;
            }
        }
    }
    return j;
}

#ifdef __AVX512F__
typedef __m512 da_vec;
#define DA_LANES 16
#define DA_MAX_CN 4 /* 4 heads x 4 chunks of 16: 16 sums, 4 rows, a broadcast */
#define da_zero _mm512_setzero_ps
#define da_set1 _mm512_set1_ps
#define da_fmadd _mm512_fmadd_ps
#define da_store _mm512_storeu_ps
#else
typedef __m256 da_vec;
#define DA_LANES 8
#define DA_MAX_CN 3 /* 4 heads x 3 chunks of 8: 12 sums, 3 rows, a broadcast (16 ymm) */
#define da_zero _mm256_setzero_ps
#define da_set1 _mm256_set1_ps
#define da_fmadd _mm256_fmadd_ps
#define da_store _mm256_storeu_ps
#endif

/* acc[g][c * DA_LANES ..] = sum over keys j of p[g][j] * v_j[c * DA_LANES ..] in fp32, for
 * GN heads (probabilities p [GN, len]) and CN chunks of DA_LANES value elements (v: the
 * tile's first element in each cached value row, rows `row` elements of `es` bytes apart;
 * acc rows `row` floats apart); load reads DA_LANES elements as fp32. The GN x CN sums
 * live in registers across the keys (summed in memory, each key's update waited on the
 * last one's store), each over the keys in order. Inlined with GN, CN and load constant. */
static inline __attribute__((always_inline)) void pv_fp32_fixed(
    const float *p, int64_t len, const char *v, int64_t es, da_vec (*load)(const void *),
    const int64_t *table, int64_t bs, int64_t row, float *acc, const int GN, const int CN) {
    da_vec a[4][DA_MAX_CN];
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CN; c++) a[g][c] = da_zero();
    /* Running blocks and offsets of the row and of the one PREFETCH_ROWS ahead. */
    int64_t blk = 0, off = 0, ablk = PREFETCH_ROWS / bs, aoff = PREFETCH_ROWS % bs;
    for (int64_t j = 0; j < len; j++) {
        const char *r = v + (table[blk] * bs + off) * row * es;
        if (++off == bs) {
            off = 0;
            blk++;
        }
        if (j + PREFETCH_ROWS < len) { /* this tile's columns of that row */
            prefetch_bytes(v + (table[ablk] * bs + aoff) * row * es, CN * DA_LANES * es);
            if (++aoff == bs) {
                aoff = 0;
                ablk++;
            }
        }
        da_vec vr[DA_MAX_CN];
        for (int c = 0; c < CN; c++) vr[c] = load(r + c * DA_LANES * es);
        for (int g = 0; g < GN; g++) {
            const da_vec pg = da_set1(p[g * len + j]);
            for (int c = 0; c < CN; c++) a[g][c] = da_fmadd(pg, vr[c], a[g][c]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CN; c++) da_store(acc + g * row + c * DA_LANES, a[g][c]);
}

/* pv_fp32_fixed for gn (1-4) heads and cn (1-DA_MAX_CN) chunks. */
static inline __attribute__((always_inline)) void pv_fp32_tile(
    const float *p, int64_t len, const char *v, int64_t es, da_vec (*load)(const void *),
    const int64_t *table, int64_t bs, int64_t row, float *acc, int64_t gn, int64_t cn) {
#define PV_CASE(GN, CN) \
    case (GN) * 8 + (CN): pv_fp32_fixed(p, len, v, es, load, table, bs, row, acc, GN, CN); break;
#if DA_MAX_CN == 4
#define PV_HEAD_CASES(GN) PV_CASE(GN, 1) PV_CASE(GN, 2) PV_CASE(GN, 3) PV_CASE(GN, 4)
#else
#define PV_HEAD_CASES(GN) PV_CASE(GN, 1) PV_CASE(GN, 2) PV_CASE(GN, 3)
#endif
    switch (gn * 8 + cn) {
        PV_HEAD_CASES(1) PV_HEAD_CASES(2) PV_HEAD_CASES(3) PV_HEAD_CASES(4)
    }
#undef PV_HEAD_CASES
#undef PV_CASE
}

/* The fp32-probability value pass over a (request, kv head)'s G heads: acc[g][0 .. d) for
 * the returned d, D rounded down to DA_LANES, up to four heads by DA_MAX_CN x DA_LANES
 * elements at a time (pv_fp32_tile; p: [G, len], vbase: the cache of D-element rows, acc
 * rows D floats apart). The caller sums the columns past d, if any. */
static inline __attribute__((always_inline)) int64_t pv_fp32_heads(
    const float *p, int64_t len, const char *vbase, int64_t es, da_vec (*load)(const void *),
    const int64_t *table, int64_t bs, int64_t G, int64_t D, float *acc) {
    int64_t d0 = 0;
    while (d0 + DA_LANES <= D) {
        const int64_t cn = (D - d0) / DA_LANES < DA_MAX_CN ? (D - d0) / DA_LANES : DA_MAX_CN;
        for (int64_t g0 = 0; g0 < G; g0 += 4)
            pv_fp32_tile(p + g0 * len, len, vbase + d0 * es, es, load, table, bs, D,
                         acc + g0 * D + d0, G - g0 < 4 ? G - g0 : 4, cn);
        d0 += cn * DA_LANES;
    }
    return d0;
}
#endif

#endif
