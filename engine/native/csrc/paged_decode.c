/* Paged decode attention on CPU: one query token per request, read straight from the
 * block-paged cache, so no gathered copy of the context is ever made.
 *
 * Cache layout (the torch backend's): [Hkv, N, bs, D], float32. For each (request, kv
 * head) the keys are read once for all G = H / Hkv query heads that share them (GQA).
 * Softmax is computed in two passes over a per-head score buffer of the context length.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

/* Work (heads x context x head size) worth waking the other threads for, as the bf16
 * kernel's: at batch 1 in a decode step (SmolLM2 fp32, 256-token context, two cores,
 * timed inside the native step) the attention took 1.41-1.49 ms a step with the old 1 M
 * and a prefetch only from 1 MiB, 1.11-1.12 with this and the prefetch at every size. */
#define PAR_MIN_ATTENTION (1 << 16)

/* As the bf16 kernel (bf16_ops.c, which has the measurements): each pass asks for the
 * row PREFETCH_ROWS ahead of it, and for its first rows before it starts, at every size
 * (in a decode step the weights stream between layers, so the KV cache is not cached);
 * the hardware prefetcher does not follow a block table. */
#define PREFETCH_ROWS 64

static inline void prefetch_row(const float *row, int64_t D) {
    for (int64_t b = 0; b < D * (int64_t)sizeof(float); b += 64)
        __builtin_prefetch((const char *)row + b, 0, 2);
}

static inline const float *row_at(const float *base, const int64_t *table, int64_t bs,
                                  int64_t D, int64_t j) {
    return base + (table[j / bs] * bs + j % bs) * D;
}

static void one(const float *q, const float *kc, const float *vc, const int64_t *table,
                int64_t len, float *out, float *scores, int64_t G, int64_t D, int64_t bs,
                int64_t N, int64_t kvh, float scale) {
    const float *kbase = kc + kvh * N * bs * D;
    const float *vbase = vc + kvh * N * bs * D;
    for (int64_t r = 0; r < PREFETCH_ROWS && r < len; r++)
        prefetch_row(row_at(kbase, table, bs, D, r), D);
    for (int64_t j = 0, blk = 0, off = 0; j < len; j++) {
        const float *k = kbase + (table[blk] * bs + off) * D;
        if (++off == bs) { /* a running block and offset: a division per key dominated */
            off = 0;
            blk++;
        }
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
    for (int64_t g = 0; g < G; g++) {
        softmax_inplace(scores + g * len, len);
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0.f;
    }
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
            for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
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
