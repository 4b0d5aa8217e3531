/* y = x W^T (+ b) for a handful of rows: the decode of one or a few requests.
 *
 * At that size MKL's sgemv streams the weights at about a third of this machine's
 * read bandwidth; one pass over W's rows, each dotted with every x row while it sits in
 * L1, runs at bandwidth. Plain C: -O3 -march=native vectorizes the dot product once
 * reassociation is allowed (see FLAGS in engine/native/__init__.py).
 */
#include <stdint.h>

/* x: [T, I]; W: [O, I] row-major; b: [O] or NULL; y: [T, O]. */
int small_linear(const float *x, const float *W, const float *b, float *y, int64_t T,
                 int64_t O, int64_t I) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const float *w = W + o * I;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * I;
            float s = 0.f;
            for (int64_t i = 0; i < I; i++) s += w[i] * xt[i];
            y[t * O + o] = s + (b ? b[o] : 0.f);
        }
    }
    return 0;
}
