/* The step's new keys and values into the paged KV cache, one plain copy per token row.
 *
 * torch's index_copy_ along the cache's slot dimension is a parallel loop: on a loaded
 * machine its threads wait for each other at every one of the step's 2 x layers calls.
 * The copy is small (T x Hkv x Dh floats each for k and v), so one thread does it.
 */
#include <stdint.h>
#include <string.h>

/* k, v: [T, Hkv, Dh] with row stride `row` (floats) and heads contiguous (stride Dh);
 * kc, vc: [Hkv, S, Dh] (S = blocks x block size); slots: [T] int64.
 * Returns -1 (and writes nothing) when a slot is outside [0, S). */
int kv_write(const float *k, const float *v, int64_t row, float *kc, float *vc,
             const int64_t *slots, int64_t T, int64_t Hkv, int64_t Dh, int64_t S) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= S) return -1;
    const size_t bytes = (size_t)Dh * sizeof(float);
    for (int64_t h = 0; h < Hkv; h++) {
        float *kh = kc + h * S * Dh, *vh = vc + h * S * Dh;
        for (int64_t t = 0; t < T; t++) {
            memcpy(kh + slots[t] * Dh, k + t * row + h * Dh, bytes);
            memcpy(vh + slots[t] * Dh, v + t * row + h * Dh, bytes);
        }
    }
    return 0;
}
