/* The step's new keys and values into the paged KV cache, one plain copy per token row.
 *
 * torch's index_copy_ along the cache's slot dimension is a parallel loop: on a loaded
 * machine its threads wait for each other at every one of the step's 2 x layers calls.
 * The copy is small (T x Hkv x Dh elements each for k and v), so one thread does it.
 * Elements are copied as bytes (`esize` each): fp32 and bf16 caches alike.
 */
#include <stdint.h>
#include <string.h>

/* k, v: [T, Hkv, Dh] with row stride `row` (elements) and heads contiguous (stride Dh);
 * kc, vc: [Hkv, S, Dh] (S = blocks x block size); slots: [T] int64.
 * Returns -1 (and writes nothing) when a slot is outside [0, S). */
int kv_write(const char *k, const char *v, int64_t row, char *kc, char *vc,
             const int64_t *slots, int64_t T, int64_t Hkv, int64_t Dh, int64_t S,
             int64_t esize) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= S) return -1;
    const size_t bytes = (size_t)(Dh * esize);
    for (int64_t h = 0; h < Hkv; h++) {
        char *kh = kc + h * S * Dh * esize, *vh = vc + h * S * Dh * esize;
        for (int64_t t = 0; t < T; t++) {
            memcpy(kh + slots[t] * Dh * esize, k + (t * row + h * Dh) * esize, bytes);
            memcpy(vh + slots[t] * Dh * esize, v + (t * row + h * Dh) * esize, bytes);
        }
    }
    return 0;
}
