/* Reads every byte of a list of buffers once, the way a batch-1 decode step streams its
 * weights: one buffer after another, each split evenly among the OpenMP threads, all in
 * one parallel region (no call per buffer). The engine benchmark times it over the very
 * tensors a batch-1 step reads, where they lie in memory: the least time any step reading
 * them can take (its memory roofline). On this machine's VMs the read rate depends on the
 * allocation (the same 1 GiB sum read 59 and 33 GB/s on alternate allocations in one
 * process), so a rate measured on another buffer judges the step by another placement.
 *
 * Returns the XOR of the buffers' 8-byte words (a tail of fewer than 8 bytes taken as the
 * low bytes of one more word, the rest zero), so the loads cannot be elided and a test
 * can check that every byte was read. */
#include <omp.h>
#include <stdint.h>
#include <string.h>

uint64_t read_buffers(const int64_t *ptrs, const int64_t *sizes, int64_t n) {
    uint64_t sum = 0;
#pragma omp parallel reduction(^ : sum)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t i = 0; i < n; i++) {
            const unsigned char *base = (const unsigned char *)(intptr_t)ptrs[i];
            const int64_t words = sizes[i] / 8, lo = words * t / nt, hi = words * (t + 1) / nt;
            uint64_t acc = 0;
            for (int64_t j = lo; j < hi; j++) {
                uint64_t w;
                memcpy(&w, base + 8 * j, sizeof w);
                acc ^= w;
            }
            if (t == nt - 1 && sizes[i] % 8) {
                uint64_t w = 0;
                memcpy(&w, base + 8 * words, (size_t)(sizes[i] % 8));
                acc ^= w;
            }
            sum ^= acc;
        }
    }
    return sum;
}
