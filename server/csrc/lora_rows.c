/* The LoRA rows of a step on the CPU (AVX-512 or AVX2, simd.h): each row with an adapter
 * reads its own adapter's A and B, stored as float32 or as bfloat16 (widened to float32
 * exactly on load); float32 activations, products and sums either way. */
#include <stdint.h>

#include "pool.h"
#include "simd.h"

/* For each row t with s = slots[t] >= 0 and r = ranks[t]:
 *   h = A[s, :r] x[t]            a: (S, r_max, K) contiguous
 *   y[t] += h @ Bt[s, :r]        bt: (S, r_max, N) contiguous (row k = column k of B' = scale B)
 * x (T, K) row stride xs, y (T, N) row stride ys, in place. Rows are split across threads
 * (each row writes only its own y row). K and N must be multiples of 16 and r_max at most
 * 1024; returns -1 otherwise. Independent accumulator chains (four rows of A, two chunks
 * of a row of y) keep several reads in flight: 20 -> 24-30 GB/s of float32 adapter bytes at
 * batch 32 with 32 distinct adapters (2-core Zen 4, noisy); bf16 stays near 15-20 GB/s. */
typedef struct {
    const float *x;
    const void *a, *bt;  /* float or uint16_t (bf16), as the entry point says */
    const int64_t *slots, *ranks;
    int64_t K, xs, r_max, N, ys;
    float *y;
} lora_job;

/* VL weights from element i of a float32 (bf16 == 0) or bfloat16 (bf16 == 1) array */
static inline __attribute__((always_inline)) vf load_w(const void *w, int64_t i, const int bf16) {
    return bf16 ? vload_bf16((const uint16_t *)w + i) : vload((const float *)w + i);
}

static inline __attribute__((always_inline)) void lora_rows_range(const lora_job *j, int64_t lo, int64_t hi,
                                                                  const int bf16) {
    const int64_t K = j->K, N = j->N, r_max = j->r_max;
    for (int64_t t = lo; t < hi; t++) {
        const int64_t s = j->slots[t], r = j->ranks[t];
        if (s < 0 || r <= 0) continue;
        float h[1024];
        const float *xt = j->x + t * j->xs;
        int64_t k = 0;
        for (; k + 4 <= r; k += 4) {  /* four rows of A side by side: four streams, four chains */
            const int64_t a0 = (s * r_max + k) * K;
            vf c0 = vzero(), c1 = vzero(), c2 = vzero(), c3 = vzero();
            for (int64_t i = 0; i < K; i += VL) {
                const vf xv = vload(xt + i);
                c0 = vfmadd(load_w(j->a, a0 + i, bf16), xv, c0);
                c1 = vfmadd(load_w(j->a, a0 + K + i, bf16), xv, c1);
                c2 = vfmadd(load_w(j->a, a0 + 2 * K + i, bf16), xv, c2);
                c3 = vfmadd(load_w(j->a, a0 + 3 * K + i, bf16), xv, c3);
            }
            h[k] = vsum(c0);
            h[k + 1] = vsum(c1);
            h[k + 2] = vsum(c2);
            h[k + 3] = vsum(c3);
        }
        for (; k < r; k++) {
            const int64_t ak = (s * r_max + k) * K;
            vf acc = vzero();
            for (int64_t i = 0; i < K; i += VL)
                acc = vfmadd(load_w(j->a, ak + i, bf16), vload(xt + i), acc);
            h[k] = vsum(acc);
        }
        float *yt = j->y + t * j->ys;
        const int64_t bs = s * r_max * N;
        int64_t n = 0;
        for (; n + 2 * VL <= N; n += 2 * VL) {  /* two column chunks: two chains */
            vf acc0 = vload(yt + n), acc1 = vload(yt + n + VL);
            for (int64_t q = 0; q < r; q++) {
                const vf hq = vset1(h[q]);
                acc0 = vfmadd(hq, load_w(j->bt, bs + q * N + n, bf16), acc0);
                acc1 = vfmadd(hq, load_w(j->bt, bs + q * N + n + VL, bf16), acc1);
            }
            vstore(yt + n, acc0);
            vstore(yt + n + VL, acc1);
        }
        for (; n < N; n += VL) {
            vf acc = vload(yt + n);
            for (int64_t q = 0; q < r; q++)
                acc = vfmadd(vset1(h[q]), load_w(j->bt, bs + q * N + n, bf16), acc);
            vstore(yt + n, acc);
        }
    }
}

static void range_f32(void *arg, int64_t lo, int64_t hi) { lora_rows_range(arg, lo, hi, 0); }
static void range_bf16(void *arg, int64_t lo, int64_t hi) { lora_rows_range(arg, lo, hi, 1); }

static int run(const float *x, int64_t T, int64_t K, int64_t xs, const void *a, int64_t r_max, const void *bt,
               int64_t N, const int64_t *slots, const int64_t *ranks, float *y, int64_t ys, int threads,
               lp_task range) {
    if (K % 16 != 0 || N % 16 != 0 || K <= 0 || N <= 0 || r_max <= 0 || r_max > 1024 || T < 0) return -1;
    lora_job job = {x, a, bt, slots, ranks, K, xs, r_max, N, ys, y};
    lp_parallel(T, lp_chunk(T, threads), range, &job, threads);
    return 0;
}

/* A and Bt in float32. */
int lora_rows_f32(const float *x, int64_t T, int64_t K, int64_t xs, const float *a, int64_t r_max,
                  const float *bt, int64_t N, const int64_t *slots, const int64_t *ranks, float *y,
                  int64_t ys, int threads) {
    return run(x, T, K, xs, a, r_max, bt, N, slots, ranks, y, ys, threads, range_f32);
}

/* A and Bt in bfloat16: half the bytes a row reads. */
int lora_rows_bf16(const float *x, int64_t T, int64_t K, int64_t xs, const uint16_t *a, int64_t r_max,
                   const uint16_t *bt, int64_t N, const int64_t *slots, const int64_t *ranks, float *y,
                   int64_t ys, int threads) {
    return run(x, T, K, xs, a, r_max, bt, N, slots, ranks, y, ys, threads, range_bf16);
}
