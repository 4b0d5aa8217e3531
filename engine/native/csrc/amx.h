/* What the AMX kernels (amx_gemm.c, prefill_attention.c) share: whether the build has AMX,
 * the tile state Linux grants on request, one tile shape for all eight tiles, and bf16
 * conversions of sixteen lanes. */
#ifndef BATON_AMX_H
#define BATON_AMX_H

#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands a process the tile state only when asked (arch_prctl, 5.16+): 0 once it
 * has, -1 where the CPU, kernel or compiler lacks AMX. A tile instruction without it is
 * SIGILL, so each kernel asks on its first call (racing first calls both ask: harmless). */
static inline int amx_request(void) {
#if HAVE_AMX
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
#else
    return -1;
#endif
}

/* amx_request once per kernel file: 0 once this process holds the tile state. Racing first
 * calls both ask: harmless. */
static inline int amx_granted(void) {
    static int granted = 0;
    if (!granted) {
        if (amx_request()) return -1;
        granted = 1;
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

/* All eight tiles 16 rows of 64 bytes (a bf16 tile of 16 x 32, an fp32 one of 16 x 16). */
static inline void amx_configure(void) {
    struct tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

#endif

#endif
