/* The LoRA rows of a step on the CPU (AVX-512 or AVX2, simd.h): each row with an adapter
 * reads its own adapter's A and B; float32 products and sums. */
#include <stdint.h>

#include "pool.h"
#include "simd.h"

/* For each row t with s = slots[t] >= 0 and r = ranks[t]:
 *   h = A[s, :r] x[t]            a: (S, r_max, K) contiguous
 *   y[t] += h @ Bt[s, :r]        bt: (S, r_max, N) contiguous (row k = column k of B' = scale B)
 * x (T, K) row stride xs, y (T, N) row stride ys, in place; float32 products and sums. Rows
 * are split across threads (each row writes only its own y row). K and N must be multiples of
 * 16 and r_max at most 1024; returns -1 otherwise. */
typedef struct {
    const float *x, *a, *bt;
    const int64_t *slots, *ranks;
    int64_t K, xs, r_max, N, ys;
    float *y;
} lora_job;

static void lora_range(void *arg, int64_t lo, int64_t hi) {
    const lora_job *j = arg;
    const int64_t K = j->K, N = j->N, r_max = j->r_max;
    for (int64_t t = lo; t < hi; t++) {
        const int64_t s = j->slots[t], r = j->ranks[t];
        if (s < 0 || r <= 0) continue;
        float h[1024];
        const float *xt = j->x + t * j->xs;
        for (int64_t k = 0; k < r; k++) {
            const float *ak = j->a + (s * r_max + k) * K;
            vf acc = vzero();
            for (int64_t i = 0; i < K; i += VL)
                acc = vfmadd(vload(ak + i), vload(xt + i), acc);
            h[k] = vsum(acc);
        }
        float *yt = j->y + t * j->ys;
        const float *bs = j->bt + s * r_max * N;
        for (int64_t n = 0; n < N; n += VL) {
            vf acc = vload(yt + n);
            for (int64_t k = 0; k < r; k++)
                acc = vfmadd(vset1(h[k]), vload(bs + k * N + n), acc);
            vstore(yt + n, acc);
        }
    }
}

int lora_rows_f32(const float *x, int64_t T, int64_t K, int64_t xs, const float *a, int64_t r_max,
                  const float *bt, int64_t N, const int64_t *slots, const int64_t *ranks, float *y,
                  int64_t ys, int threads) {
    if (K % 16 != 0 || N % 16 != 0 || K <= 0 || N <= 0 || r_max <= 0 || r_max > 1024 || T < 0) return -1;
    lora_job job = {x, a, bt, slots, ranks, K, xs, r_max, N, ys, y};
    lp_parallel(T, lp_chunk(T, threads), lora_range, &job, threads);
    return 0;
}
