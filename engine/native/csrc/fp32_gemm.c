/* fp32 GEMMs of a decode step's rows (5 to 64: the GEMV in small_linear.c takes fewer)
 * from a weight packed once into blocks of sixteen outputs.
 *
 * oneDNN's fp32 GEMM on a packed weight ran SmolLM2's layers at 45-60 GFLOP/s at 8 rows,
 * 75-93 at 16 and 107-162 at 64 on two Zen 4 cores (30 layers' weights, from memory);
 * this kernel ran the same at 102-120, 133-149 and 165-185 (2026-12-07). Layout
 * (fp32_tile_pack): block nb of the weight [O, I] is I x 16 floats, P[nb][k][j] =
 * W[16 nb + j][k], so one 512-bit load is the sixteen outputs' weights for input k. A
 * pass takes four rows of x against six blocks (96 outputs): 24 sums in registers, six
 * weight loads and four broadcasts per input, 24 multiply-adds; each output's sum runs
 * over the inputs in order. The next four rows reread the six blocks (216 KiB at 576
 * inputs, 576 KiB at 1536) from L2.
 */
#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define FP32_TILE_MAX_ROWS 64
#define TILE_ROWS 4   /* rows of x a pass takes */
#define TILE_BLOCKS 6 /* output blocks a pass takes */

/* The most rows fp32_tile_linear takes; 0 where the build lacks AVX-512. */
int fp32_tile_max_rows(void) {
#ifdef __AVX512F__
    return FP32_TILE_MAX_ROWS;
#else
    return 0;
#endif
}

/* W [O, I] into P (O x I floats) as above; -1 where O is not a multiple of 16. */
int fp32_tile_pack(const float *W, float *P, int64_t O, int64_t I) {
    if (O % 16) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < O / 16; nb++)
        for (int64_t k = 0; k < I; k++)
            for (int64_t j = 0; j < 16; j++) P[(nb * I + k) * 16 + j] = W[(nb * 16 + j) * I + k];
    return 0;
}

#ifdef __AVX512F__
/* y[t, o0 + 16 n ..] for R rows of x and NB consecutive packed blocks starting at w;
 * inlined with R and NB constant, so the R x NB sums live in registers. */
static inline __attribute__((always_inline)) void tile_block(
    const float *w, const float *x, int64_t I, const float *b, float *y, int64_t O,
    int64_t o0, const int R, const int NB) {
    __m512 acc[TILE_ROWS][TILE_BLOCKS];
    for (int t = 0; t < R; t++)
        for (int n = 0; n < NB; n++) acc[t][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < I; k++) {
        __m512 wr[TILE_BLOCKS];
        for (int n = 0; n < NB; n++) wr[n] = _mm512_loadu_ps(w + (n * I + k) * 16);
        for (int t = 0; t < R; t++) {
            const __m512 xt = _mm512_set1_ps(x[t * I + k]);
            for (int n = 0; n < NB; n++) acc[t][n] = _mm512_fmadd_ps(xt, wr[n], acc[t][n]);
        }
    }
    for (int n = 0; n < NB; n++) {
        const __m512 bias = b ? _mm512_loadu_ps(b + o0 + 16 * n) : _mm512_setzero_ps();
        for (int t = 0; t < R; t++)
            _mm512_storeu_ps(y + t * O + o0 + 16 * n, _mm512_add_ps(acc[t][n], bias));
    }
}

static void tile_rows(const float *w, const float *x, int64_t I, const float *b, float *y,
                      int64_t O, int64_t o0, int R, int NB) {
#define TILE_CASE(RR, NN) \
    case (RR) * 8 + (NN): tile_block(w, x, I, b, y, O, o0, RR, NN); break;
#define TILE_ROW_CASES(RR) \
    TILE_CASE(RR, 1) TILE_CASE(RR, 2) TILE_CASE(RR, 3) TILE_CASE(RR, 4) TILE_CASE(RR, 5) \
    TILE_CASE(RR, 6)
    switch (R * 8 + NB) {
        TILE_ROW_CASES(1) TILE_ROW_CASES(2) TILE_ROW_CASES(3) TILE_ROW_CASES(4)
    }
#undef TILE_ROW_CASES
#undef TILE_CASE
}
#endif

/* y [T, O] = x [T, I] W^T (+ b [O] or NULL) from P = fp32_tile_pack(W), for 1 <= T <=
 * FP32_TILE_MAX_ROWS; -1 a shape it does not take, -2 where the build lacks AVX-512. */
int fp32_tile_linear(const float *x, const float *P, const float *b, float *y, int64_t T,
                     int64_t O, int64_t I) {
#ifdef __AVX512F__
    if (T < 1 || T > FP32_TILE_MAX_ROWS || O % 16 || I < 1) return -1;
    const int64_t blocks = O / 16, groups = (blocks + TILE_BLOCKS - 1) / TILE_BLOCKS;
#pragma omp parallel for schedule(dynamic)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t nb = g * TILE_BLOCKS;
        const int n = blocks - nb < TILE_BLOCKS ? (int)(blocks - nb) : TILE_BLOCKS;
        for (int64_t t = 0; t < T; t += TILE_ROWS)
            tile_rows(P + nb * I * 16, x + t * I, I, b, y + t * O, O, nb * 16,
                      T - t < TILE_ROWS ? (int)(T - t) : TILE_ROWS, n);
    }
    return 0;
#else
    (void)x; (void)P; (void)b; (void)y; (void)T; (void)O; (void)I;
    return -2;
#endif
}
