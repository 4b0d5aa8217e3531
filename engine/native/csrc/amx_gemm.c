/* bf16 GEMM of a few rows on AMX: y = x W^T (+ b) for a decode step's 1 to 64 rows.
 *
 * At those row counts a GEMM is bound by reading W, and oneDNN's packed GEMM read it at
 * 10-12 GB/s on this machine where a plain read runs at ~22 (its M=32 product took 21 ms
 * per step of this model's layers against 9.7 ms of weight bytes at that rate). Here W is
 * packed once into AMX's B-tile layout and streamed once per call: each 1 KiB tile (16
 * outputs x 32 inputs) is multiplied by every 16-row tile of x while it is loaded, the
 * sums kept in up to four accumulator tiles (64 rows).
 *
 * Packed layout P: [O / 16][I / 32][16][16][2]: tile (n, k) holds, for input pair r and
 * output c, W[16n + c][32k + 2r], W[16n + c][32k + 2r + 1] (the VNNI pairs TDPBF16PS
 * reads). Shapes that are not multiples of 16 outputs and 32 inputs are not packed (the
 * caller uses oneDNN).
 *
 * Sums are fp32 in AMX's order; each output is rounded to bf16 once, after the bias (as
 * oneDNN's bf16 linear does), so results may differ from oneDNN's in the last bf16 bit.
 *
 * Linux hands a process the tile state only when asked (arch_prctl, 5.16+): amx_init()
 * asks, and returns nonzero where the CPU, kernel or compiler lacks AMX.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"

#define MAX_ROWS 64

/* The most rows amx_linear_bf16 takes (Python checks its own copy against this). */
int amx_max_rows(void) { return MAX_ROWS; }

int amx_init(void) { return amx_request(); }

/* W: [O, I] row-major bf16 -> P (see above); -1 when O % 16 or I % 32. */
int amx_pack_bf16(const bf16 *W, bf16 *P, int64_t O, int64_t I) {
    if (O % 16 || I % 32) return -1;
    const int64_t KB = I / 32;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < O / 16; nb++)
        for (int64_t kb = 0; kb < KB; kb++) {
            bf16 *tile = P + (nb * KB + kb) * 512;
            for (int r = 0; r < 16; r++)
                for (int c = 0; c < 16; c++) {
                    const bf16 *w = W + (nb * 16 + c) * I + kb * 32 + 2 * r;
                    tile[(r * 16 + c) * 2] = w[0];
                    tile[(r * 16 + c) * 2 + 1] = w[1];
                }
        }
    return 0;
}

#if HAVE_AMX
/* Tiles (amx_configure: all 16 rows of 64 bytes) 0-3 accumulators (row tile m, output
 * block n at 2n + m), 4-5 x tiles (row tiles 0, 1), 6-7 W tiles (output blocks 0, 1). */

/* NB (1 or 2) blocks of 16 outputs (W tiles from w0, w1: 1 KiB each per input block, in
 * order) against MT (1 or 2) 16-row tiles of x (xp, row stride I): each W tile and each x
 * tile is loaded once per input block and used for two products (one product per load
 * left AMX waiting on loads: 0.55 TFLOP/s a core on weights in cache). acc: [MT * 16][32]
 * fp32, block 0's sums in columns 0-15, block 1's in 16-31. */
static inline __attribute__((always_inline)) void tiles(const bf16 *w0, const bf16 *w1,
                                                       const bf16 *xp, int64_t I, float *acc,
                                                       const int MT, const int NB) {
    const int64_t KB = I / 32, ld = I * 2;
    _tile_zero(0);
    if (MT > 1) _tile_zero(1);
    if (NB > 1) _tile_zero(2);
    if (MT > 1 && NB > 1) _tile_zero(3);
    for (int64_t kb = 0; kb < KB; kb++) {
        _tile_loadd(6, w0 + kb * 512, 64);
        if (NB > 1) _tile_loadd(7, w1 + kb * 512, 64);
        _tile_loadd(4, xp + kb * 32, ld);
        _tile_dpbf16ps(0, 4, 6);
        if (NB > 1) _tile_dpbf16ps(2, 4, 7);
        if (MT > 1) {
            _tile_loadd(5, xp + 16 * I + kb * 32, ld);
            _tile_dpbf16ps(1, 5, 6);
            if (NB > 1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, acc, 128);
    if (MT > 1) _tile_stored(1, acc + 16 * 32, 128);
    if (NB > 1) _tile_stored(2, acc + 16, 128);
    if (MT > 1 && NB > 1) _tile_stored(3, acc + 16 * 32 + 16, 128);
}

/* Four blocks of 16 outputs (their W tiles KB * 512 apart, from w) against one 16-row tile
 * of x (T <= 16, a decode step's usual rows): four accumulators (tiles 0-3), x in tile 4,
 * W through tiles 5-7, the fourth block's reusing 5 once block 0's product has read it.
 * Four weight streams at a time where tiles() has two: 0.92-0.94x its time over this
 * model's weights (one core, 1 and 16 rows, A/B in one process). acc: [16][64] fp32. */
static inline void tiles4(const bf16 *w, const bf16 *xp, int64_t I, float *acc) {
    const int64_t KB = I / 32;
    _tile_zero(0); /* tile numbers are immediates: no loop */
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < KB; kb++) {
        _tile_loadd(4, xp + kb * 32, I * 2);
        _tile_loadd(5, w + kb * 512, 64);
        _tile_loadd(6, w + (KB + kb) * 512, 64);
        _tile_loadd(7, w + (2 * KB + kb) * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, w + (3 * KB + kb) * 512, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, acc, 256);
    _tile_stored(1, acc + 16, 256);
    _tile_stored(2, acc + 32, 256);
    _tile_stored(3, acc + 48, 256);
}

/* y[t][n0 .. n0 + 16 * nb) = bf16(acc + bias) for the rows t < rows of acc ([rows][16 *
 * width]). */
static inline void store(const float *acc, int width, const bf16 *b, bf16 *y, int64_t O,
                         int64_t rows, int64_t n0, int nb) {
    for (int g = 0; g < nb; g++) {
        const __m512 bias = b ? widen16(b + n0 + 16 * g) : _mm512_setzero_ps();
        for (int64_t t = 0; t < rows; t++)
            _mm256_storeu_si256(
                (__m256i *)(y + t * O + n0 + 16 * g),
                to_bf16_x16(_mm512_add_ps(_mm512_load_ps(acc + t * 16 * width + 16 * g), bias)));
    }
}
#endif

/* x: [T, I] bf16, 1 <= T <= 64; P: amx_pack_bf16(W) for W [O, I]; b: [O] bf16 or NULL;
 * y: [T, O] bf16. -1: a shape this kernel does not take; -2: no AMX (the first call asks
 * Linux for the tile state, as amx_init: a tile instruction without it is SIGILL). */
int amx_linear_bf16(const bf16 *x, const bf16 *P, const bf16 *b, bf16 *y, int64_t T,
                    int64_t O, int64_t I) {
#if HAVE_AMX
    if (amx_granted()) return -2;
    if (T < 1 || T > MAX_ROWS || O % 16 || I % 32) return -1;
    const int64_t tiles_x = (T + 15) / 16, blocks = O / 16;
    /* x padded to whole tiles (the pad rows' sums are computed and dropped); rows that
     * fill whole tiles are read where they are. */
    bf16 *pad = NULL;
    if (T % 16) {
        pad = (bf16 *)aligned_alloc(64, (size_t)(tiles_x * 16 * I) * sizeof(bf16) + 64);
        if (!pad) return -1;
        memcpy(pad, x, (size_t)(T * I) * sizeof(bf16));
        memset(pad + T * I, 0, (size_t)((tiles_x * 16 - T) * I) * sizeof(bf16));
    }
    const bf16 *xp = pad ? pad : x;
    const int64_t KB = I / 32;
    /* One row tile: output blocks by fours (tiles4), the last few by pairs. */
    const int64_t quads = tiles_x == 1 ? blocks / 4 : 0, first = 4 * quads;
#pragma omp parallel
    {
        float acc[32 * 64] __attribute__((aligned(64)));
        amx_configure();
        /* Output blocks handed out a few at a time: a thread the machine's other work
         * preempts holds up only its current few. */
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t quad = 0; quad < quads; quad++) {
            tiles4(P + 4 * quad * KB * 512, xp, I, acc);
            store(acc, 4, b, y, O, T, 64 * quad, 4);
        }
#pragma omp for schedule(dynamic, 2)
        for (int64_t pair = 0; pair < (blocks - first + 1) / 2; pair++) {
            const int64_t nb = first + 2 * pair;
            const int two = nb + 1 < blocks;
            const bf16 *w0 = P + nb * KB * 512, *w1 = w0 + KB * 512;
            for (int64_t m = 0; m < tiles_x; m += 2) { /* 32 rows at a time */
                const bf16 *xm = xp + m * 16 * I;
                const int64_t rows = T - m * 16 < 32 ? T - m * 16 : 32;
                if (rows > 16) {
                    if (two) tiles(w0, w1, xm, I, acc, 2, 2);
                    else tiles(w0, w1, xm, I, acc, 2, 1);
                } else {
                    if (two) tiles(w0, w1, xm, I, acc, 1, 2);
                    else tiles(w0, w1, xm, I, acc, 1, 1);
                }
                store(acc, 2, b, y + m * 16 * O, O, rows, nb * 16, two ? 2 : 1);
            }
        }
        _tile_release();
    }
    free(pad);
    return 0;
#else
    (void)x; (void)P; (void)b; (void)y; (void)T; (void)O; (void)I;
    return -2;
#endif
}

/* The same product from the same packed W without AMX, with AVX-512 BF16's vdpbf16ps
 * (AMD Zen 4): a packed tile row (sixteen outputs' pair of inputs) is one zmm register,
 * multiplied by each row's pair of x broadcast to every lane, so each output's sum grows
 * in its own lane with no horizontal sums (the plain GEMV reduces sixteen lanes per output)
 * and each loaded row of W serves every row of x. Up to VNNI_MAX_ROWS rows (decode steps;
 * measured in docs/architecture.md: 0.84-0.90x oneDNN's time at 32-64 rows on two EPYC
 * cores); beyond them oneDNN's packed GEMM is as fast. Sums fp32, one rounding after the
 * bias.
 *
 * Six output blocks by up to four rows of x at a time (24 accumulators, six weight
 * registers and the broadcast: 31 of the 32): the broadcasts, one per row and pair, bound
 * the loop, and six blocks share each. On one Zen 4 core over 30 layers' weights this ran
 * 0.86x the time of two blocks by eight rows at 16 rows, 0.85x at 8, 0.76x at 4, 0.91x at
 * 1; past four rows the next four reread the six blocks (108 KiB at 576 inputs, 288 KiB
 * at 1536), by then in L2. */
#define VNNI_MAX_ROWS 64
#define VNNI_ROWS 4   /* rows of x a pass takes */
#define VNNI_BLOCKS 6 /* output blocks a pass takes */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_VNNI_LINEAR 1
#else
#define HAVE_VNNI_LINEAR 0
#endif

/* The most rows vnni_linear_bf16 takes; 0 where the build lacks AVX-512 BF16. */
int vnni_max_rows(void) { return HAVE_VNNI_LINEAR ? VNNI_MAX_ROWS : 0; }

#if HAVE_VNNI_LINEAR
/* y[t, o0 + 16 n ..] for R rows of x and NB consecutive packed blocks starting at w (each
 * I * 16 elements); inlined with R and NB constant, so the R x NB sums live in registers. */
static inline __attribute__((always_inline)) void vnni_block(
    const bf16 *w, const bf16 *x, int64_t I, const bf16 *b, bf16 *y, int64_t O, int64_t o0,
    const int R, const int NB) {
    const int64_t KB = I / 32;
    __m512 acc[VNNI_ROWS][VNNI_BLOCKS];
    for (int t = 0; t < R; t++)
        for (int n = 0; n < NB; n++) acc[t][n] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < KB; kb++)
        for (int r = 0; r < 16; r++) {
            __m512bh wr[VNNI_BLOCKS];
            for (int n = 0; n < NB; n++)
                wr[n] = (__m512bh)_mm512_loadu_si512(w + n * KB * 512 + (kb * 16 + r) * 32);
            for (int t = 0; t < R; t++) {
                uint32_t u;
                memcpy(&u, x + t * I + kb * 32 + 2 * r, sizeof u);
                const __m512bh xt = (__m512bh)_mm512_set1_epi32((int)u);
                for (int n = 0; n < NB; n++) acc[t][n] = _mm512_dpbf16_ps(acc[t][n], xt, wr[n]);
            }
        }
    for (int n = 0; n < NB; n++) {
        const __m512 bias = b ? widen16(b + o0 + 16 * n) : _mm512_setzero_ps();
        for (int t = 0; t < R; t++)
            _mm256_storeu_si256((__m256i *)(y + t * O + o0 + 16 * n),
                                to_bf16_x16(_mm512_add_ps(acc[t][n], bias)));
    }
}

static void vnni_rows(const bf16 *w, const bf16 *x, int64_t I, const bf16 *b, bf16 *y,
                      int64_t O, int64_t o0, int R, int NB) {
#define VNNI_CASE(RR, NN) \
    case (RR) * 8 + (NN): vnni_block(w, x, I, b, y, O, o0, RR, NN); break;
#define VNNI_ROW_CASES(RR) \
    VNNI_CASE(RR, 1) VNNI_CASE(RR, 2) VNNI_CASE(RR, 3) VNNI_CASE(RR, 4) VNNI_CASE(RR, 5) \
    VNNI_CASE(RR, 6)
    switch (R * 8 + NB) {
        VNNI_ROW_CASES(1) VNNI_ROW_CASES(2) VNNI_ROW_CASES(3) VNNI_ROW_CASES(4)
    }
#undef VNNI_ROW_CASES
#undef VNNI_CASE
}
#endif

/* As amx_linear_bf16, for 1 <= T <= VNNI_MAX_ROWS; -2 where the build lacks AVX-512 BF16. */
int vnni_linear_bf16(const bf16 *x, const bf16 *P, const bf16 *b, bf16 *y, int64_t T,
                     int64_t O, int64_t I) {
#if HAVE_VNNI_LINEAR
    if (T < 1 || T > VNNI_MAX_ROWS || O % 16 || I % 32) return -1;
    const int64_t blocks = O / 16, groups = (blocks + VNNI_BLOCKS - 1) / VNNI_BLOCKS;
#pragma omp parallel for schedule(dynamic)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t nb = g * VNNI_BLOCKS;
        const int n = blocks - nb < VNNI_BLOCKS ? (int)(blocks - nb) : VNNI_BLOCKS;
        for (int64_t t = 0; t < T; t += VNNI_ROWS)
            vnni_rows(P + nb * I * 16, x + t * I, I, b, y + t * O, O, nb * 16,
                      T - t < VNNI_ROWS ? (int)(T - t) : VNNI_ROWS, n);
    }
    return 0;
#else
    (void)x; (void)P; (void)b; (void)y; (void)T; (void)O; (void)I;
    return -2;
#endif
}
