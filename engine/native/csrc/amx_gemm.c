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
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define MAX_ROWS 64

int amx_init(void) {
#if HAVE_AMX
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
#else
    return -1;
#endif
}

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
struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0-3: accumulators (16 rows of x each); 4, 6: W tiles; 5, 7: x tiles; all 16 rows
 * of 64 bytes. The W and x tiles alternate between pairs by input block, so a load need
 * not wait for the products reading the previous block's tile. */
static void configure(void) {
    struct tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* One block of 16 outputs against MT 16-row tiles of x (xp: [MT * 16, I], stride I);
 * acc: [MT * 16, 16] fp32. KB input blocks; W tiles from w (1 KiB each, in order). The
 * W tile alternates between tiles 4 and 6 by input block, the x tile between 5 and 7 by
 * row tile, so no load waits for the product that read the tile before it. */
#define PRODUCTS(B)                                                       \
    do {                                                                  \
        _tile_loadd(5, xp + kb * 32, ld);                                 \
        _tile_dpbf16ps(0, 5, B);                                          \
        if (MT > 1) {                                                     \
            _tile_loadd(7, xp + 16 * I + kb * 32, ld);                    \
            _tile_dpbf16ps(1, 7, B);                                      \
        }                                                                 \
        if (MT > 2) {                                                     \
            _tile_loadd(5, xp + 32 * I + kb * 32, ld);                    \
            _tile_dpbf16ps(2, 5, B);                                      \
        }                                                                 \
        if (MT > 3) {                                                     \
            _tile_loadd(7, xp + 48 * I + kb * 32, ld);                    \
            _tile_dpbf16ps(3, 7, B);                                      \
        }                                                                 \
    } while (0)

static inline __attribute__((always_inline)) void block(const bf16 *w, const bf16 *xp,
                                                       int64_t I, float *acc, const int MT) {
    const int64_t KB = I / 32, ld = I * 2;
    _tile_zero(0);
    if (MT > 1) _tile_zero(1);
    if (MT > 2) _tile_zero(2);
    if (MT > 3) _tile_zero(3);
    int64_t kb = 0;
    for (; kb + 2 <= KB; kb += 2) {
        _tile_loadd(4, w + kb * 512, 64);
        PRODUCTS(4);
        kb++;
        _tile_loadd(6, w + kb * 512, 64);
        PRODUCTS(6);
        kb--;
    }
    if (kb < KB) {
        _tile_loadd(4, w + kb * 512, 64);
        PRODUCTS(4);
    }
    _tile_stored(0, acc, 64);
    if (MT > 1) _tile_stored(1, acc + 256, 64);
    if (MT > 2) _tile_stored(2, acc + 512, 64);
    if (MT > 3) _tile_stored(3, acc + 768, 64);
}
#undef PRODUCTS
#endif

/* x: [T, I] bf16, 1 <= T <= 64; P: amx_pack_bf16(W) for W [O, I]; b: [O] bf16 or NULL;
 * y: [T, O] bf16. -1: no AMX, or a shape this kernel does not take. */
int amx_linear_bf16(const bf16 *x, const bf16 *P, const bf16 *b, bf16 *y, int64_t T,
                    int64_t O, int64_t I) {
#if HAVE_AMX
    if (T < 1 || T > MAX_ROWS || O % 16 || I % 32) return -1;
    const int MT = (int)((T + 15) / 16);
    /* x padded to whole tiles (the pad rows' sums are computed and dropped). */
    bf16 *xp = (bf16 *)aligned_alloc(64, (size_t)(MT * 16 * I) * sizeof(bf16) + 64);
    if (!xp) return -1;
    memcpy(xp, x, (size_t)(T * I) * sizeof(bf16));
    memset(xp + T * I, 0, (size_t)((MT * 16 - T) * I) * sizeof(bf16));
    const int64_t KB = I / 32;
#pragma omp parallel
    {
        float acc[MAX_ROWS * 16] __attribute__((aligned(64)));
        configure();
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < O / 16; nb++) {
            const bf16 *w = P + nb * KB * 512;
            switch (MT) {
            case 1: block(w, xp, I, acc, 1); break;
            case 2: block(w, xp, I, acc, 2); break;
            case 3: block(w, xp, I, acc, 3); break;
            default: block(w, xp, I, acc, 4); break;
            }
            for (int64_t t = 0; t < T; t++)
                for (int c = 0; c < 16; c++) {
                    float v = acc[t * 16 + c] + (b ? f32(b[nb * 16 + c]) : 0.f);
                    y[t * O + nb * 16 + c] = to_bf16(v);
                }
        }
        _tile_release();
    }
    free(xp);
    return 0;
#else
    (void)x; (void)P; (void)b; (void)y; (void)T; (void)O; (void)I;
    return -1;
#endif
}
