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

#endif
