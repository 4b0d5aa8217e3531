/* Causal prefill attention in bf16: a prefill chunk's S queries against its L keys (the
 * chunk's own and any before it), grouped-query heads sharing a kv head. Two back-ends
 * with one data layout: AMX tiles where the CPU has them and Linux grants the tile state,
 * else AVX-512 BF16's vdpbf16ps (AMD Zen 4, Intel Cooper Lake on). And in fp32 on
 * AVX-512F or AVX2 (prefill_attention_f32, below: the vector back-end's blocking in fp32
 * FMAs).
 *
 * torch's CPU flash attention ran a 256-token chunk of this model's 9 heads at ~165
 * GFLOP/s on one core of a Sapphire Rapids (a quarter of a bf16 prefill step beside GEMMs
 * at ~1 TFLOP/s), and at ~36 GFLOP/s on one core of an EPYC (Zen 4), where it was a
 * quarter of a served burst's time. Here, per 16 queries of a head: their scores against
 * every key block they see (Q x K^T, K packed once per call), an exact softmax over each
 * row in fp32 (the row's maximum, then exp), the unnormalised probabilities rounded to
 * bf16 and multiplied by V (packed likewise), and the sums divided by the row's total at
 * the end -- the order of torch's flash kernel for one key block (its probabilities are
 * rounded to bf16 for its value product too), so results differ from it only in the
 * order of the fp32 sums.
 *
 * Query t (0 <= t < S) sits at position L - S + t and sees keys 0 .. L - S + t. Head
 * dims of 32 or 64 (one or two 32-wide tiles of Q, at most four 16-wide accumulators for
 * the output); other shapes are refused (-1) and the caller uses torch.
 *
 * Packed K, per kv head and block of 16 keys and 32 dims, one B tile: [16 dim pairs][16
 * keys][2]. Packed V, per kv head and block of 32 keys and 16 dims: [16 key pairs][16
 * dims][2]. Keys past L are zero in both, and their probabilities are zero. A tile row is
 * also one zmm register: vdpbf16ps of it against a query's (or probability row's) pair
 * broadcast to all lanes adds that pair's products to sixteen keys' scores (or sixteen
 * output dims) at once, with no horizontal sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_VDPBF16 1
#else
#define HAVE_VDPBF16 0
#endif

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#ifdef __AVX512F__
#include <immintrin.h>

/* One row's softmax numerators, e[j] = exp(s[j] * scale - max) for j < n and zero on to
 * width (a multiple of 16), each sixteen handed to store(dst, j, e[j ..]); returns the sum
 * of the first n. Sixteen at a time, the last sixteen masked. Inlined with store known. */
static inline __attribute__((always_inline)) float softmax_numerators(
    const float *s, int64_t n, int64_t width, float scale, void *dst,
    void (*store)(void *, int64_t, __m512)) {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + j), sc);
        m16 = _mm512_mask_max_ps(m16, live, m16, x);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(m16));
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), sc), m);
        const __m512 e = _mm512_maskz_mov_ps(live, vexpf16(x));
        sum = _mm512_add_ps(sum, e);
        store(dst, j, e);
    }
    for (; j < width; j += 16) store(dst, j, _mm512_setzero_ps());
    return n ? _mm512_reduce_add_ps(sum) : 0.f;
}
#endif

#if HAVE_AMX || HAVE_VDPBF16

static void pack_k(const bf16 *k, int64_t k_row, int64_t L, int64_t D, int64_t kb,
                   bf16 *tiles) {
    for (int64_t c = 0; c < D / 32; c++) {
        bf16 *tile = tiles + c * 512;
        for (int n = 0; n < 16; n++) {
            const int64_t j = kb * 16 + n;
            const bf16 *row = k + j * k_row + c * 32;
            for (int r = 0; r < 16; r++) {
                tile[(r * 16 + n) * 2] = j < L ? row[2 * r] : 0;
                tile[(r * 16 + n) * 2 + 1] = j < L ? row[2 * r + 1] : 0;
            }
        }
    }
}

static void pack_v(const bf16 *v, int64_t v_row, int64_t L, int64_t D, int64_t kb,
                   bf16 *tiles) {
    for (int64_t db = 0; db < D / 16; db++) {
        bf16 *tile = tiles + db * 512;
        for (int r = 0; r < 16; r++)
            for (int e = 0; e < 2; e++) {
                const int64_t j = kb * 32 + 2 * r + e;
                const bf16 *row = v + j * v_row + db * 16;
                for (int c = 0; c < 16; c++) tile[(r * 16 + c) * 2 + e] = j < L ? row[c] : 0;
            }
    }
}

#endif

#if HAVE_AMX
/* Scores of one 16-query tile (Q in tiles 4, 5) against key blocks 0 .. nkb: two blocks
 * at a time (accumulators 0, 1; K through 6, 7 and 2, 3). s: [16][ld] fp32. */
static inline void scores(const bf16 *kp, int64_t nkb, int64_t D, float *s, int64_t ld) {
    const int64_t per = D / 32 * 512; /* one key block's K tiles */
    int64_t kb = 0;
    for (; kb + 2 <= nkb; kb += 2) {
        const bf16 *k0 = kp + kb * per, *k1 = k0 + per;
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(6, k0, 64);
        _tile_loadd(2, k1, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 2);
        if (D == 64) {
            _tile_loadd(7, k0 + 512, 64);
            _tile_loadd(3, k1 + 512, 64);
            _tile_dpbf16ps(0, 5, 7);
            _tile_dpbf16ps(1, 5, 3);
        }
        _tile_stored(0, s + kb * 16, ld * 4);
        _tile_stored(1, s + kb * 16 + 16, ld * 4);
    }
    if (kb < nkb) {
        const bf16 *k0 = kp + kb * per;
        _tile_zero(0);
        _tile_loadd(6, k0, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (D == 64) {
            _tile_loadd(7, k0 + 512, 64);
            _tile_dpbf16ps(0, 5, 7);
        }
        _tile_stored(0, s + kb * 16, ld * 4);
    }
}

#endif

#if HAVE_VDPBF16
/* A pair of bf16 (two dims of a query, two keys' probabilities) in every lane. */
static inline __m512bh pair_at(const bf16 *x) {
    uint32_t u;
    memcpy(&u, x, sizeof u);
    return (__m512bh)_mm512_set1_epi32((int)u);
}

/* Scores of four query rows (q, rows D apart) against NB key blocks from kb, into s (rows
 * ld apart): one accumulator of sixteen keys per row and block, the key tiles' rows
 * loaded once for the four rows. */
static inline __attribute__((always_inline)) void scores_vec_4xn(
    const bf16 *q, const bf16 *kp, int64_t kb, int64_t D, float *s, int64_t ld, const int NB) {
    const int64_t per = D / 32 * 512;
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D / 32; c++)
        for (int i = 0; i < 16; i++) {
            __m512bh k[4];
            for (int b = 0; b < NB; b++)
                k[b] = (__m512bh)_mm512_load_si512(kp + (kb + b) * per + c * 512 + i * 32);
            for (int r = 0; r < 4; r++) {
                const __m512bh qr = pair_at(q + r * D + c * 32 + 2 * i);
                for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qr, k[b]);
            }
        }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(s + r * ld + (kb + b) * 16, acc[r][b]);
}

/* Scores of a 16-query block (qt: 16 padded rows of D) against key blocks 0 .. nkb. */
static void scores_vec(const bf16 *qt, const bf16 *kp, int64_t nkb, int64_t D, float *s,
                       int64_t ld) {
    for (int r = 0; r < 16; r += 4) {
        int64_t kb = 0;
        for (; kb + 4 <= nkb; kb += 4) scores_vec_4xn(qt + r * D, kp, kb, D, s + r * ld, ld, 4);
        for (; kb < nkb; kb++) scores_vec_4xn(qt + r * D, kp, kb, D, s + r * ld, ld, 1);
    }
}

/* acc (16 rows of 64 floats, D used) = P (16 rows of ld bf16) x V over 32-key blocks up
 * to nkb2; four probability rows at a time against every output dim (at most 16 sums in
 * registers), each V tile row loaded once for the four. */
static inline __attribute__((always_inline)) void values_vec_rows(
    const bf16 *p, int64_t ld, const bf16 *vp, int64_t nkb2, float *acc, const int DB) {
    const int64_t per = DB * 512;
    for (int r0 = 0; r0 < 16; r0 += 4) {
        __m512 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int d = 0; d < DB; d++) a[r][d] = _mm512_setzero_ps();
        for (int64_t kb = 0; kb < nkb2; kb++)
            for (int i = 0; i < 16; i++) {
                __m512bh v[4];
                for (int d = 0; d < DB; d++)
                    v[d] = (__m512bh)_mm512_load_si512(vp + kb * per + d * 512 + i * 32);
                for (int r = 0; r < 4; r++) {
                    const __m512bh pr = pair_at(p + (r0 + r) * ld + kb * 32 + 2 * i);
                    for (int d = 0; d < DB; d++) a[r][d] = _mm512_dpbf16_ps(a[r][d], pr, v[d]);
                }
            }
        for (int r = 0; r < 4; r++)
            for (int d = 0; d < DB; d++) _mm512_store_ps(acc + (r0 + r) * 64 + d * 16, a[r][d]);
    }
}

static void values_vec(const bf16 *p, int64_t ld, const bf16 *vp, int64_t nkb2, int64_t D,
                       float *acc) {
    if (D == 64) values_vec_rows(p, ld, vp, nkb2, acc, 4);
    else values_vec_rows(p, ld, vp, nkb2, acc, 2);
}
#endif

#if HAVE_AMX || HAVE_VDPBF16
static inline void store_bf16_x16(void *p, int64_t j, __m512 e) {
    _mm256_storeu_si256((__m256i *)((bf16 *)p + j), to_bf16_x16(e));
}

/* One row's softmax numerators: p[j] = bf16(exp(s[j] * scale - max)) for j < n, zero on to
 * width (a multiple of 32); returns their fp32 sum (of the unrounded values). */
static float softmax_row(const float *s, int64_t n, int64_t width, float scale, bf16 *p) {
    return softmax_numerators(s, n, width, scale, p, store_bf16_x16);
}

#endif

#if HAVE_AMX
/* acc (tiles 0 .. D/16) = P (rows of ld bf16) x V over key blocks of 32 up to nkb2. */
static inline void values(const bf16 *p, int64_t ld, const bf16 *vp, int64_t nkb2, int64_t D) {
    const int64_t per = D / 16 * 512; /* one 32-key block's V tiles */
    _tile_zero(0);
    _tile_zero(1);
    if (D == 64) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t kb = 0; kb < nkb2; kb++) {
        const bf16 *v = vp + kb * per;
        _tile_loadd(4, p + kb * 32, ld * 2);
        _tile_loadd(5, v, 64);
        _tile_loadd(6, v + 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        if (D == 64) {
            _tile_loadd(7, v + 1024, 64);
            _tile_loadd(5, v + 1536, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* fp32, AVX-512F or AVX2. torch's CPU flash attention ran this model's 256-token chunks at
 * ~70 GFLOP/s (causal work) on the two cores of an EPYC (Zen 4), where fp32 GEMMs run at
 * ~200: an eighth of a fp32 prefill step at 256 tokens, a third at 2048. The same blocking
 * as the bf16 kernels' vector back-end, in fp32 FMAs: K packed per kv head and block of 16
 * keys dim-major ([D][16], keys past L zero), so one load holds sixteen keys' element d
 * (two loads of eight with AVX2) and a broadcast query element scores them all; scores of
 * four query rows by four key blocks in sixteen registers (AVX2: by one block, eight of
 * its sixteen); an exact softmax per row in fp32 (maximum, exp of the differences, their
 * sum), its unnormalised probabilities times V read in place (rows of contiguous head
 * elements: four rows by 64 output elements in registers, AVX2 by 24, each V row loaded
 * once for the four), each sum divided by its row's total at the end. torch's flash
 * kernel does the same arithmetic in blocks of keys, rescaling as the maximum grows, so
 * results differ from it only in the order of the fp32 sums. On two Zen 3 cores (AVX2)
 * it ran 80-94 GFLOP/s at 256-1024 tokens, 0.56-0.73x SDPA's time, and 1.01x at 2048
 * (`python -m bench.prefill_attention --dtypes float32`, 2026-12-07; 1.40x at 2048
 * before V was taken in runs of keys, below). */
#define PA_F32 1
#ifdef __AVX512F__
typedef __m512 pa_vec;
#define PA_LANES 16
#define PA_SCORE_BLOCKS 4 /* key blocks a scores pass takes */
#define PA_VALUE_CHUNKS 4 /* PA_LANES-wide output chunks a values pass takes */
#define pa_zero _mm512_setzero_ps
#define pa_load _mm512_loadu_ps
#define pa_load_aligned _mm512_load_ps
#define pa_store _mm512_storeu_ps
#define pa_set1 _mm512_set1_ps
#define pa_fmadd _mm512_fmadd_ps
#define pa_mul _mm512_mul_ps
#else
typedef __m256 pa_vec;
#define PA_LANES 8
#define PA_SCORE_BLOCKS 1
#define PA_VALUE_CHUNKS 3
#define pa_zero _mm256_setzero_ps
#define pa_load _mm256_loadu_ps
#define pa_load_aligned _mm256_load_ps
#define pa_store _mm256_storeu_ps
#define pa_set1 _mm256_set1_ps
#define pa_fmadd _mm256_fmadd_ps
#define pa_mul _mm256_mul_ps
#endif
#define PA_VPB (16 / PA_LANES) /* registers a block of sixteen keys fills */
#define PA_KEY_RUN 64   /* keys of V a values pass takes before the next row group */

static void pack_k_f32(const float *k, int64_t k_row, int64_t L, int64_t D, int64_t kb,
                       float *blk) {
    for (int n = 0; n < 16; n++) {
        const int64_t j = kb * 16 + n;
        const float *row = k + j * k_row;
        for (int64_t d = 0; d < D; d++) blk[d * 16 + n] = j < L ? row[d] : 0.f;
    }
}

/* Scores of four query rows (q, rows D apart) against NB key blocks from kb, into s (rows
 * ld apart). */
static inline __attribute__((always_inline)) void scores_f32_4xn(
    const float *q, const float *kp, int64_t kb, int64_t D, float *s, int64_t ld, const int NB) {
    pa_vec acc[4][PA_SCORE_BLOCKS * PA_VPB];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB * PA_VPB; b++) acc[r][b] = pa_zero();
    for (int64_t d = 0; d < D; d++) {
        pa_vec k[PA_SCORE_BLOCKS * PA_VPB];
        for (int b = 0; b < NB * PA_VPB; b++)
            k[b] = pa_load_aligned(kp + ((kb + b / PA_VPB) * D + d) * 16 + (b % PA_VPB) * PA_LANES);
        for (int r = 0; r < 4; r++) {
            const pa_vec qr = pa_set1(q[r * D + d]);
            for (int b = 0; b < NB * PA_VPB; b++) acc[r][b] = pa_fmadd(qr, k[b], acc[r][b]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB * PA_VPB; b++)
            pa_store(s + r * ld + kb * 16 + b * PA_LANES, acc[r][b]);
}

#ifdef __AVX512F__
static inline void store_f32_x16(void *p, int64_t j, __m512 e) {
    _mm512_storeu_ps((float *)p + j, e);
}

/* Row r's softmax numerators in place: s[j] = exp(s[j] * scale - max) for j < n, zero on
 * to width (a multiple of 16); returns their sum. */
static float softmax_row_f32(float *s, int64_t n, int64_t width, float scale) {
    return softmax_numerators(s, n, width, scale, s, store_f32_x16);
}
#else
/* softmax_row_f32 eight at a time (AVX2): lanes past n blended out of the maximum and
 * zeroed after the exp (the row holds width floats, so every load is inside it). */
static float softmax_row_f32(float *s, int64_t n, int64_t width, float scale) {
    const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 m8 = ninf;
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 live = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), iota));
        const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), sc);
        m8 = _mm256_max_ps(m8, _mm256_blendv_ps(ninf, x, live));
    }
    const __m256 m = _mm256_set1_ps(hmax8(m8));
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j < n; j += 8) {
        const __m256 live = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), iota));
        const __m256 x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), sc), m);
        const __m256 e = _mm256_and_ps(live, vexpf8(x));
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(s + j, e);
    }
    for (; j < width; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
    return n ? hsum8(sum) : 0.f;
}
#endif

/* acc[r][0 .. PA_LANES CN) (rows acc_ld apart) += sum over keys j0 <= j < j1 of p[r][j]
 * v_j[0 .. PA_LANES CN) for four probability rows (ld apart), v_j at v + j * v_row, acc
 * taken as zero when j0 is 0; each V row's chunks loaded once for the four rows. A run
 * after another carries its sums on in the same order, so splitting the keys into runs
 * leaves the result as it was. */
static inline __attribute__((always_inline)) void values_f32_4(
    const float *p, int64_t ld, const float *v, int64_t v_row, int64_t j0, int64_t j1,
    float *acc, int64_t acc_ld, const int CN) {
    pa_vec a[4][PA_VALUE_CHUNKS];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < CN; c++)
            a[r][c] = j0 ? pa_load(acc + r * acc_ld + c * PA_LANES) : pa_zero();
    for (int64_t j = j0; j < j1; j++) {
        pa_vec vr[PA_VALUE_CHUNKS];
        for (int c = 0; c < CN; c++) vr[c] = pa_load(v + j * v_row + c * PA_LANES);
        for (int r = 0; r < 4; r++) {
            const pa_vec pr = pa_set1(p[r * ld + j]);
            for (int c = 0; c < CN; c++) a[r][c] = pa_fmadd(pr, vr[c], a[r][c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < CN; c++) pa_store(acc + r * acc_ld + c * PA_LANES, a[r][c]);
}
#endif

/* 1 where prefill_attention_f32 runs (the build has AVX-512F or AVX2 with FMA), else 0. */
int prefill_attention_f32_available(void) {
#ifdef PA_F32
    return 1;
#else
    return 0;
#endif
}

/* fp32 causal prefill attention: the arguments and results of prefill_attention_bf16 (no
 * allow_amx), all fp32, any head size D a multiple of 16 up to 256. -2 where the build
 * has neither AVX-512F nor AVX2 with FMA. */
int prefill_attention_f32(const float *q, int64_t q_row, const float *k, int64_t k_row,
                          int64_t k_head, const float *v, int64_t v_row, int64_t v_head,
                          float *out, int64_t out_row, int64_t S, int64_t L, int64_t H,
                          int64_t Hkv, int64_t D, float scale) {
#ifdef PA_F32
    if (S < 1 || L < S || Hkv < 1 || H % Hkv || D < 16 || D % 16 || D > 256) return -1;
    const int64_t G = H / Hkv, L16 = round_up(L, 16), kblocks = L16 / 16;
    const int64_t qblocks = (S + 15) / 16;
    const int64_t lds = L16 + 16; /* rows 4 KiB apart would share an L1 set */
    const int64_t ksize = L16 * D;
    float *kp = (float *)aligned_alloc(64, (size_t)(Hkv * ksize) * sizeof(float));
    if (!kp) return -3;
    int failed = 0;
#pragma omp parallel
    {
        /* Per thread: 16 rows of scores, then a block's 16 query rows and output sums. */
        float *s = (float *)aligned_alloc(64, (size_t)(16 * lds + 2 * 16 * D) * sizeof(float));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t kb = 0; kb < kblocks; kb++)
                pack_k_f32(k + g * k_head, k_row, L, D, kb, kp + g * ksize + kb * 16 * D);
        if (s && !failed) {
            float *qt = s + 16 * lds, *acc = qt + 16 * D;
            /* Later query blocks see more keys: handed out one at a time, last first. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = H * qblocks - 1; item >= 0; item--) {
                const int64_t h = item % H, qb = item / H, g = h / G;
                const int64_t rows = S - qb * 16 < 16 ? S - qb * 16 : 16;
                const int64_t first = L - S + qb * 16; /* keys row 0 sees, less one */
                const int64_t nkb = (first + rows + 15) / 16;
                for (int64_t r = 0; r < 16; r++) {
                    if (r < rows) memcpy(qt + r * D, q + (qb * 16 + r) * q_row + h * D,
                                         (size_t)D * sizeof(float));
                    else memset(qt + r * D, 0, (size_t)D * sizeof(float));
                }
                /* Key blocks outside, row groups inside: each run of blocks (4 KiB a
                 * block at D = 64) is read from L2 once and reused from L1 by the four
                 * groups; with the rows outside, a long context's packed K (512 KiB a
                 * kv head at 2048 keys) was streamed once per group, past a Zen 3 core's
                 * L2. */
                const float *kh = kp + g * ksize;
                int64_t kb = 0;
                for (; kb + PA_SCORE_BLOCKS <= nkb; kb += PA_SCORE_BLOCKS)
                    for (int64_t r = 0; r < rows; r += 4)
                        scores_f32_4xn(qt + r * D, kh, kb, D, s + r * lds, lds, PA_SCORE_BLOCKS);
                for (; kb < nkb; kb++)
                    for (int64_t r = 0; r < rows; r += 4)
                        scores_f32_4xn(qt + r * D, kh, kb, D, s + r * lds, lds, 1);
                float inv[16];
                for (int64_t r = 0; r < 16; r++) {
                    const int64_t n = r < rows ? first + r + 1 : 0;
                    const float sum = softmax_row_f32(s + r * lds, n, nkb * 16, scale);
                    inv[r] = n ? 1.f / sum : 0.f;
                }
                const float *vh = v + g * v_head;
                /* Runs of PA_KEY_RUN keys outside, row groups and output chunks inside:
                 * a run's V rows (16 KiB at D = 64) are read from memory once and reused
                 * from L1 by every group and chunk; with the keys inside, a long
                 * context's V was streamed once per group and chunk (twelve times at
                 * 2048 keys with AVX2, past a Zen 3 core's L2). */
                for (int64_t j0 = 0; j0 < first + rows; j0 += PA_KEY_RUN)
                    for (int64_t r = 0; r < rows; r += 4) {
                        /* The keys the group's last row sees (the others' past theirs
                         * are 0); every group sees key 0, so each starts its sums. */
                        const int64_t n = first + (r + 4 < rows ? r + 4 : rows);
                        if (j0 >= n) continue;
                        const int64_t j1 = j0 + PA_KEY_RUN < n ? j0 + PA_KEY_RUN : n;
                        for (int64_t d0 = 0; d0 < D; d0 += PA_VALUE_CHUNKS * PA_LANES) {
                            const float *p = s + r * lds;
                            float *a = acc + r * D + d0;
                            const int64_t left = (D - d0) / PA_LANES;
                            switch (left < PA_VALUE_CHUNKS ? left : PA_VALUE_CHUNKS) {
                            case 1: values_f32_4(p, lds, vh + d0, v_row, j0, j1, a, D, 1); break;
                            case 2: values_f32_4(p, lds, vh + d0, v_row, j0, j1, a, D, 2); break;
#if PA_VALUE_CHUNKS == 4
                            case 3: values_f32_4(p, lds, vh + d0, v_row, j0, j1, a, D, 3); break;
#endif
                            default:
                                values_f32_4(p, lds, vh + d0, v_row, j0, j1, a, D,
                                             PA_VALUE_CHUNKS);
                            }
                        }
                    }
                for (int64_t r = 0; r < rows; r++) {
                    float *o = out + (qb * 16 + r) * out_row + h * D;
                    const pa_vec iv = pa_set1(inv[r]);
                    for (int64_t d = 0; d < D; d += PA_LANES)
                        pa_store(o + d, pa_mul(pa_load(acc + r * D + d), iv));
                }
            }
        }
        free(s);
    }
    free(kp);
    return failed ? -3 : 0;
#else
    (void)q; (void)q_row; (void)k; (void)k_row; (void)k_head; (void)v; (void)v_row;
    (void)v_head; (void)out; (void)out_row; (void)S; (void)L; (void)H; (void)Hkv; (void)D;
    (void)scale;
    return -2;
#endif
}

/* Which back-end a call with allow_amx set takes: 2 AMX (the first call asks Linux for
 * the tile state), 1 AVX-512 BF16, 0 none (every call returns -2). */
int prefill_attention_isa(void) {
#if HAVE_AMX
    if (!amx_granted()) return 2;
#endif
    return HAVE_VDPBF16 ? 1 : 0;
}

/* q: query t's head h at q + t * q_row + h * D; k: key j's kv head g at k + j * k_row + g *
 * k_head, v likewise with its own strides; out: query t's head h at out + t * out_row + h *
 * D. All bf16, each head's D elements contiguous. allow_amx: 0 keeps to the vector
 * back-end (tests of it on a CPU with AMX). 0: done; -1: a shape this kernel does not
 * take; -2: no back-end here; -3: out of memory. */
int prefill_attention_bf16(const bf16 *q, int64_t q_row, const bf16 *k, int64_t k_row,
                           int64_t k_head, const bf16 *v, int64_t v_row, int64_t v_head,
                           bf16 *out, int64_t out_row, int64_t S, int64_t L, int64_t H,
                           int64_t Hkv, int64_t D, float scale, int allow_amx) {
#if HAVE_AMX || HAVE_VDPBF16
    const int isa = prefill_attention_isa();
    const int amx = HAVE_AMX && allow_amx && isa == 2;
    if (!amx && !HAVE_VDPBF16) return -2;
    if (S < 1 || L < S || Hkv < 1 || H % Hkv || (D != 32 && D != 64)) return -1;
    const int64_t G = H / Hkv, S16 = round_up(S, 16), L16 = round_up(L, 16), L32 = round_up(L, 32);
    const int64_t kblocks = L16 / 16, vblocks = L32 / 32, qblocks = S16 / 16;
    /* Row strides of the scores and probabilities one line past a multiple of 4 KiB:
     * rows 4 KiB apart share an L1 set, and a tile's 16 rows then evict each other. */
    const int64_t lds = L32 + 16, ldp = L32 + 32;
    const int64_t ksize = kblocks * (D / 32) * 512, vsize = vblocks * (D / 16) * 512;
    bf16 *kp = (bf16 *)aligned_alloc(64, (size_t)(Hkv * (ksize + vsize)) * sizeof(bf16));
    /* Q per head, padded to whole tiles (the pad rows' results are dropped). */
    bf16 *qp = (bf16 *)aligned_alloc(64, (size_t)(H * S16 * D) * sizeof(bf16));
    if (!kp || !qp) {
        free(kp);
        free(qp);
        return -3;
    }
    bf16 *vp = kp + Hkv * ksize;
    int failed = 0;
#pragma omp parallel
    {
        float *s = (float *)aligned_alloc(64, (size_t)(16 * lds + 16 * 64) * sizeof(float));
        bf16 *p = (bf16 *)aligned_alloc(64, (size_t)(16 * ldp) * sizeof(bf16));
        if (!s || !p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static) collapse(2)
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t kb = 0; kb < kblocks; kb++) {
                pack_k(k + g * k_head, k_row, L, D, kb, kp + g * ksize + kb * (D / 32) * 512);
                if (kb % 2 == 0)
                    pack_v(v + g * v_head, v_row, L, D, kb / 2,
                           vp + g * vsize + kb / 2 * (D / 16) * 512);
            }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < S16; t++) {
                bf16 *dst = qp + (h * S16 + t) * D;
                if (t < S) memcpy(dst, q + t * q_row + h * D, (size_t)D * sizeof(bf16));
                else memset(dst, 0, (size_t)D * sizeof(bf16));
            }
        if (s && p && !failed) {
            float *acc = s + 16 * lds;
#if HAVE_AMX
            if (amx) amx_configure();
#endif
            /* Later query blocks see more keys: handed out one at a time, last first. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = H * qblocks - 1; item >= 0; item--) {
                const int64_t h = item % H, qb = item / H, g = h / G;
                const int64_t rows = S - qb * 16 < 16 ? S - qb * 16 : 16;
                const int64_t kend = L - S + qb * 16 + rows; /* keys the last row sees */
                const int64_t nkb = (kend + 15) / 16, nkb2 = (kend + 31) / 32;
                const bf16 *qt = qp + (h * S16 + qb * 16) * D;
#if HAVE_AMX
                if (amx) {
                    _tile_loadd(4, qt, D * 2);
                    if (D == 64) _tile_loadd(5, qt + 32, D * 2);
                    scores(kp + g * ksize, nkb, D, s, lds);
                }
#endif
#if HAVE_VDPBF16
                if (!amx) scores_vec(qt, kp + g * ksize, nkb, D, s, lds);
#endif
                float inv[16];
                for (int64_t r = 0; r < 16; r++) {
                    const int64_t n = r < rows ? L - S + qb * 16 + r + 1 : 0;
                    const float sum = softmax_row(s + r * lds, n, nkb2 * 32, scale, p + r * ldp);
                    inv[r] = n ? 1.f / sum : 0.f;
                }
#if HAVE_AMX
                if (amx) {
                    values(p, ldp, vp + g * vsize, nkb2, D);
                    _tile_stored(0, acc, 256);
                    _tile_stored(1, acc + 16, 256);
                    if (D == 64) {
                        _tile_stored(2, acc + 32, 256);
                        _tile_stored(3, acc + 48, 256);
                    }
                }
#endif
#if HAVE_VDPBF16
                if (!amx) values_vec(p, ldp, vp + g * vsize, nkb2, D, acc);
#endif
                for (int64_t r = 0; r < rows; r++) {
                    bf16 *o = out + (qb * 16 + r) * out_row + h * D;
                    const __m512 iv = _mm512_set1_ps(inv[r]);
                    for (int64_t d = 0; d < D; d += 16)
                        _mm256_storeu_si256((__m256i *)(o + d),
                                            to_bf16_x16(_mm512_mul_ps(_mm512_load_ps(acc + r * 64 + d), iv)));
                }
            }
#if HAVE_AMX
            if (amx) _tile_release();
#endif
        }
        free(s);
        free(p);
    }
    free(kp);
    free(qp);
    return failed ? -3 : 0;
#else
    (void)q; (void)q_row; (void)k; (void)k_row; (void)k_head; (void)v; (void)v_row;
    (void)v_head; (void)out; (void)out_row; (void)S; (void)L; (void)H; (void)Hkv; (void)D;
    (void)scale; (void)allow_amx;
    return -2;
#endif
}
