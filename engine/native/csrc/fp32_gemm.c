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
 * inputs, 576 KiB at 1536) from L2. With AVX2 (sixteen 256-bit registers) a block is two
 * registers and a pass takes six rows against one block, the same sums in the same
 * order; on two Zen 3 cores it ran the layers at 0.47x oneDNN's time at 5 rows, 0.52x
 * at 8, 0.60x at 16, 0.69x at 32, 0.72x at 64 (53-111 GFLOP/s against 28-80;
 * `python -m bench.decode_gemm --dtype float32`, 2026-12-07).
 */
#include <stdint.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define FP32_TILE_MAX_ROWS 64
#define BLOCK 16 /* outputs a packed block holds */

/* A pass: TILE_ROWS rows of x against TILE_BLOCKS blocks, the sums in registers. AVX-512
 * (32 registers of 16 floats): 4 x 6 blocks, 24 sums. AVX2 (16 registers of 8): a block
 * is two registers, 6 rows x 1 block, 12 sums beside the block's two loads and the
 * broadcast. */
#if defined(__AVX512F__)
#define FP32_TILES 1
#define TILE_ROWS 4
#define TILE_BLOCKS 6
typedef __m512 vec;
#define VLANES 16
#define vzero _mm512_setzero_ps
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vset1 _mm512_set1_ps
#define vfmadd _mm512_fmadd_ps
#define vadd _mm512_add_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define FP32_TILES 1
#define TILE_ROWS 6
#define TILE_BLOCKS 1
typedef __m256 vec;
#define VLANES 8
#define vzero _mm256_setzero_ps
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vset1 _mm256_set1_ps
#define vfmadd _mm256_fmadd_ps
#define vadd _mm256_add_ps
#endif

/* The most rows fp32_tile_linear takes; 0 where the build has neither AVX-512 nor
 * AVX2 with FMA. */
int fp32_tile_max_rows(void) {
#ifdef FP32_TILES
    return FP32_TILE_MAX_ROWS;
#else
    return 0;
#endif
}

/* W [O, I] into P (O x I floats) as above; -1 where O is not a multiple of 16. */
int fp32_tile_pack(const float *W, float *P, int64_t O, int64_t I) {
    if (O % BLOCK) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < O / BLOCK; nb++)
        for (int64_t k = 0; k < I; k++)
            for (int64_t j = 0; j < BLOCK; j++)
                P[(nb * I + k) * BLOCK + j] = W[(nb * BLOCK + j) * I + k];
    return 0;
}

#ifdef FP32_TILES
#define VPB (BLOCK / VLANES) /* registers a block's sixteen outputs fill */

/* y[t, o0 + 16 n ..] for R rows of x and NB consecutive packed blocks starting at w;
 * inlined with R and NB constant, so the R x NB sums live in registers. */
static inline __attribute__((always_inline)) void tile_block(
    const float *w, const float *x, int64_t I, const float *b, float *y, int64_t O,
    int64_t o0, const int R, const int NB) {
    vec acc[TILE_ROWS][TILE_BLOCKS * VPB];
    for (int t = 0; t < R; t++)
        for (int v = 0; v < NB * VPB; v++) acc[t][v] = vzero();
    for (int64_t k = 0; k < I; k++) {
        vec wr[TILE_BLOCKS * VPB];
        for (int n = 0; n < NB; n++)
            for (int h = 0; h < VPB; h++) wr[n * VPB + h] = vload(w + (n * I + k) * BLOCK + h * VLANES);
        for (int t = 0; t < R; t++) {
            const vec xt = vset1(x[t * I + k]);
            for (int v = 0; v < NB * VPB; v++) acc[t][v] = vfmadd(xt, wr[v], acc[t][v]);
        }
    }
    for (int v = 0; v < NB * VPB; v++) {
        const vec bias = b ? vload(b + o0 + v * VLANES) : vzero();
        for (int t = 0; t < R; t++) vstore(y + t * O + o0 + v * VLANES, vadd(acc[t][v], bias));
    }
}

static void tile_rows(const float *w, const float *x, int64_t I, const float *b, float *y,
                      int64_t O, int64_t o0, int R, int NB) {
#define TILE_CASE(RR, NN) \
    case (RR) * 8 + (NN): tile_block(w, x, I, b, y, O, o0, RR, NN); break;
#if TILE_BLOCKS == 6
#define TILE_ROW_CASES(RR) \
    TILE_CASE(RR, 1) TILE_CASE(RR, 2) TILE_CASE(RR, 3) TILE_CASE(RR, 4) TILE_CASE(RR, 5) \
    TILE_CASE(RR, 6)
    switch (R * 8 + NB) {
        TILE_ROW_CASES(1) TILE_ROW_CASES(2) TILE_ROW_CASES(3) TILE_ROW_CASES(4)
    }
#undef TILE_ROW_CASES
#else
    switch (R * 8 + NB) {
        TILE_CASE(1, 1) TILE_CASE(2, 1) TILE_CASE(3, 1) TILE_CASE(4, 1) TILE_CASE(5, 1)
        TILE_CASE(6, 1)
    }
#endif
#undef TILE_CASE
}
#endif

/* y [T, O] = x [T, I] W^T (+ b [O] or NULL) from P = fp32_tile_pack(W), for 1 <= T <=
 * FP32_TILE_MAX_ROWS; -1 a shape it does not take, -2 where the build has no tile pass. */
int fp32_tile_linear(const float *x, const float *P, const float *b, float *y, int64_t T,
                     int64_t O, int64_t I) {
#ifdef FP32_TILES
    if (T < 1 || T > FP32_TILE_MAX_ROWS || O % 16 || I < 1) return -1;
    const int64_t blocks = O / BLOCK, groups = (blocks + TILE_BLOCKS - 1) / TILE_BLOCKS;
#pragma omp parallel for schedule(dynamic)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t nb = g * TILE_BLOCKS;
        const int n = blocks - nb < TILE_BLOCKS ? (int)(blocks - nb) : TILE_BLOCKS;
        for (int64_t t = 0; t < T; t += TILE_ROWS)
            tile_rows(P + nb * I * BLOCK, x + t * I, I, b, y + t * O, O, nb * BLOCK,
                      T - t < TILE_ROWS ? (int)(T - t) : TILE_ROWS, n);
    }
    return 0;
#else
    (void)x; (void)P; (void)b; (void)y; (void)T; (void)O; (void)I;
    return -2;
#endif
}
