/* NF4 matmul on the CPU with AVX-512 or AVX2 (simd.h): y = x @ dequant(W).T (+ bias), all in float32.
 *
 * W (N, K) is in bitsandbytes' canonical NF4 layout: element e = n * K + k is the nibble
 * of byte e / 2, the high nibble for even e and the low nibble for odd e; block e / 64 has
 * one float32 absmax; the value is code[nibble] * absmax (bitsandbytes' dequantize_4bit in
 * float32). K must be a multiple of 64, so no block spans two rows.
 *
 * The kernel reads each weight byte once per call. Rows of W are taken NR at a time: their
 * 4-bit codes are expanded into a float32 buffer of NR * K values that stays in L1/L2 (the
 * 16-entry code book lives in registers, simd.h's dequant_block), and the buffer is then
 * multiplied with every row of x, MT rows of x at a time, in an NR x MT tile of VL-lane
 * accumulators. Products and sums are float32, so the result equals
 * dequantize + float32 matmul to float rounding (only the summation order differs).
 *
 * Threads: row groups are claimed in chunks by the pool's threads (pool.h). No software
 * prefetch: fetching the group 8 or 16 ahead into L2 sped up a microbenchmark that re-read
 * one weight (the head 6.8 -> 4.6 ms), but not the engine's step, whose weights come from
 * memory (2-core Zen 4, batch 8, interleaved: 33.6 against 33.4 and 33.2 ms).
 *
 * bf16_matmul_f32 is the same driver for a bfloat16 weight (the LM head): the weight is
 * widened to float32 exactly, activations, products and sums stay float32.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"
#include "pool.h"
#if defined(LP_AMX)
#include "amx.h"
#endif

/* Expand `rows` rows of codes (K/2 bytes each) into buf (rows * K floats), each block of 64
 * in simd.h's buffer order. x is put in the same order once per call (split_rows), so the
 * dot products are unchanged and the codes need no interleaving. */
static void dequant_rows(const uint8_t *codes, const float *absmax, const book16 *lut, int64_t K, int rows,
                         float *buf) {
    const int64_t blocks = (int64_t)rows * K / 64;
    for (int64_t b = 0; b < blocks; b++) dequant_block(codes + b * 32, absmax[b], lut, buf + b * 64);
}

/* Rows of x (T, K), row stride xs, into xp (T, K) contiguous in buffer order. */
static void split_rows(const float *x, int64_t T, int64_t K, int64_t xs, float *xp) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k += 64) to_buffer_order(x + t * xs + k, xp + t * K + k);
}

/* y[t, n0 + r] for r < nr, t < T, from the dequantized rows in buf. Inlined, so that the
 * full groups (nr == NR, a constant there) keep their accumulators in registers. */
static inline __attribute__((always_inline)) void tile_rows(const float *buf, int nr, int64_t K, const float *x, int64_t T, int64_t xs,
                      float *y, int64_t ys, int64_t n0, const float *bias) {
    int64_t t = 0;
    for (; t + MT <= T; t += MT) {
        vf acc[NR][MT];
        for (int r = 0; r < NR; r++)
            for (int m = 0; m < MT; m++) acc[r][m] = vzero();
        for (int64_t k = 0; k < K; k += VL) {
            vf xv[MT];
            for (int m = 0; m < MT; m++) xv[m] = vload(x + (t + m) * xs + k);
            for (int r = 0; r < nr; r++) {
                vf w = vload(buf + r * K + k);
                for (int m = 0; m < MT; m++) acc[r][m] = vfmadd(w, xv[m], acc[r][m]);
            }
        }
        if (nr == NR) {
            store_tile(acc, y, ys, t, n0, bias);
        } else {
            for (int r = 0; r < nr; r++)
                for (int m = 0; m < MT; m++)
                    y[(t + m) * ys + n0 + r] = vsum(acc[r][m]) + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    for (; t < T; t++) {
        vf acc[NR];
        for (int r = 0; r < NR; r++) acc[r] = vzero();
        for (int64_t k = 0; k < K; k += VL) {
            vf xv = vload(x + t * xs + k);
            for (int r = 0; r < nr; r++) acc[r] = vfmadd(vload(buf + r * K + k), xv, acc[r]);
        }
        for (int r = 0; r < nr; r++) y[t * ys + n0 + r] = vsum(acc[r]) + (bias ? bias[n0 + r] : 0.0f);
    }
}

/* bf16 weight rows (K values each) widened to float32 into buf: exact (a bf16 is the high
 * half of a float32). */
static void widen_bf16_rows(const uint16_t *w, int64_t K, int rows, float *buf) {
    const int64_t n = (int64_t)rows * K;
    for (int64_t i = 0; i < n; i += VL) vstore(buf + i, vload_bf16(w + i));
}

/* tile_rows specialised twice: the full groups with nr a constant (accumulators stay in
 * registers), the last, partial group with nr a variable. Not inlined, so that the compiler
 * cannot merge the two back into one variable-nr loop. */
static __attribute__((noinline)) void tile_full(const float *buf, int64_t K, const float *x, int64_t T,
                                                int64_t xs, float *y, int64_t ys, int64_t n0, const float *bias) {
    tile_rows(buf, NR, K, x, T, xs, y, ys, n0, bias);
}

static __attribute__((noinline)) void tile_part(const float *buf, int nr, int64_t K, const float *x, int64_t T,
                                                int64_t xs, float *y, int64_t ys, int64_t n0, const float *bias) {
    tile_rows(buf, nr, K, x, T, xs, y, ys, n0, bias);
}

#if !defined(LP_AVX512)
/* AVX2, one or two rows of x: no buffer. Each block's code-book values are multiplied with x
 * straight from the lookup's registers and the block's sum is scaled by its absmax once
 * (sum_b absmax_b * sum_k code_k x_k: the same products as dequantize + matmul up to float32
 * rounding, 8 multiplies fewer per block); at these sizes the buffer's stores and loads
 * cost as much as the FMAs. */
#define FUSED_T 2
static void fused_rows(const uint8_t *codes, const float *absmax, const book16 *lut, int64_t K, int nr,
                       const float *x, int64_t T, float *y, int64_t ys, int64_t n0, const float *bias) {
    const int64_t blocks = K / 64;
    for (int r = 0; r < nr; r++) {
        vf total[FUSED_T] = {vzero(), vzero()};
        for (int64_t b = 0; b < blocks; b++) {
            vf w[8];
            lookup_block(codes + ((n0 + r) * blocks + b) * 32, lut, w);
            const vf s = vset1(absmax[(n0 + r) * blocks + b]);
            for (int64_t t = 0; t < T; t++) {
                const float *xb = x + t * K + b * 64;
                vf lo = vmul(w[0], vload(xb)), hi = vmul(w[4], vload(xb + 32));
                for (int j = 1; j < 4; j++) {
                    lo = vfmadd(w[j], vload(xb + 8 * j), lo);
                    hi = vfmadd(w[4 + j], vload(xb + 32 + 8 * j), hi);
                }
                total[t] = vfmadd(vadd(lo, hi), s, total[t]);
            }
        }
        for (int64_t t = 0; t < T; t++) y[t * ys + n0 + r] = vsum(total[t]) + (bias ? bias[n0 + r] : 0.0f);
    }
}
#endif

enum weights { NF4, BF16 };

typedef struct {
    enum weights kind;
    const void *w;
    const float *absmax, *x, *bias;
    const book16 *lut;
    int64_t T, K, xs, N, ys;
    float *y;
    _Atomic int failed;
} groups_job;

/* Row groups [lo, hi) of W: each expanded into this thread's float32 buffer and multiplied
 * with every row of x (already in the order the expansion produces). */
static void run_group_range(void *arg, int64_t lo, int64_t hi) {
    groups_job *j = arg;
    float *buf = lp_scratch(0, (size_t)NR * j->K * sizeof(float));
    if (!buf) {
        atomic_store(&j->failed, 1);
        return;
    }
    for (int64_t g = lo; g < hi; g++) {
        const int64_t n0 = g * NR;
        const int nr = (int)(j->N - n0 < NR ? j->N - n0 : NR);
#if !defined(LP_AVX512)
        if (j->kind == NF4 && j->T <= FUSED_T) {  /* x is contiguous here (split_rows) */
            fused_rows((const uint8_t *)j->w, j->absmax, j->lut, j->K, nr, j->x, j->T, j->y, j->ys, n0, j->bias);
            continue;
        }
#endif
        if (j->kind == NF4)
            dequant_rows((const uint8_t *)j->w + n0 * j->K / 2, j->absmax + n0 * j->K / 64, j->lut, j->K, nr, buf);
        else
            widen_bf16_rows((const uint16_t *)j->w + n0 * j->K, j->K, nr, buf);
        if (nr == NR)
            tile_full(buf, j->K, j->x, j->T, j->xs, j->y, j->ys, n0, j->bias);
        else
            tile_part(buf, nr, j->K, j->x, j->T, j->xs, j->y, j->ys, n0, j->bias);
    }
}

/* The shared driver: row groups of W split across the pool's threads (pool.h). */
static int run_groups(enum weights kind, const void *w, const float *absmax, const float *code_book,
                      const float *x, int64_t T, int64_t K, int64_t xs, int64_t N, const float *bias,
                      float *y, int64_t ys, int threads) {
    const float none[16] = {0};
    const book16 lut = book_load(code_book ? code_book : none);
    const int64_t groups = (N + NR - 1) / NR;
    groups_job job = {kind, w, absmax, x, bias, &lut, T, K, xs, N, ys, y, 0};
    lp_parallel(groups, lp_chunk(groups, threads), run_group_range, &job, threads);
    return atomic_load(&job.failed) ? -1 : 0;
}

/* y (T, N) with row stride ys = x (T, K) with row stride xs @ dequant(codes, absmax).T + bias.
 * Returns 0, or -1 when K is not a multiple of 64 or a buffer cannot be allocated. */
int nf4_matmul_f32(const float *x, int64_t T, int64_t K, int64_t xs, const uint8_t *codes,
                   const float *absmax, const float *code_book, int64_t N, const float *bias,
                   float *y, int64_t ys, int threads) {
    if (K % 64 != 0 || K <= 0 || N <= 0 || T < 0) return -1;
    if (T == 0) return 0;
#if defined(LP_AMX)
    if (T >= AMX_NF4_ROWS && N % (2 * AMX_N) == 0 && amx_ready())
        return amx_matmul(codes, absmax, code_book, NULL, x, T, K, xs, N, bias, y, ys, threads);
#endif
    float *xp = aligned_alloc(64, (size_t)T * K * sizeof(float));  /* x in split order */
    if (!xp) return -1;
    split_rows(x, T, K, xs, xp);
    int rc = run_groups(NF4, codes, absmax, code_book, xp, T, K, K, N, bias, y, ys, threads);
    free(xp);
    return rc;
}

/* y (T, N) = x (T, K) float32 @ w (N, K) bfloat16 .T, products and sums in float32 (so only
 * the weights carry bf16 rounding). Returns 0, or -1 when K is not a multiple of 16. */
int bf16_matmul_f32(const float *x, int64_t T, int64_t K, int64_t xs, const uint16_t *w, int64_t N,
                    float *y, int64_t ys, int threads) {
    if (K % 16 != 0 || K <= 0 || N <= 0 || T < 0) return -1;
    if (T == 0) return 0;
#if defined(LP_AMX)
    if (K % AMX_K == 0 && N % (2 * AMX_N) == 0 && amx_ready())
        return amx_matmul(NULL, NULL, NULL, w, x, T, K, xs, N, NULL, y, ys, threads);
#endif
    return run_groups(BF16, w, NULL, NULL, x, T, K, xs, N, NULL, y, ys, threads);
}

/* dequant(codes, absmax) as a dense (N, K) float32 matrix: the weight of the prefill path
 * (server/model/quant.py, DENSE_ROWS) and the layout check the tests use. Rows are split
 * across `threads` threads, 16 at a time, each expanded and put back in natural order. */
typedef struct {
    const uint8_t *codes;
    const float *absmax;
    const book16 *lut;
    int64_t N, K;
    float *out;
} dequant_job;

static void dequant_range(void *arg, int64_t lo, int64_t hi) {
    const dequant_job *j = arg;
    for (int64_t c = lo; c < hi; c++) {
        const int64_t n0 = c * 16;
        const int rows = (int)(j->N - n0 < 16 ? j->N - n0 : 16);
        float *dst = j->out + n0 * j->K;
        dequant_rows(j->codes + n0 * j->K / 2, j->absmax + n0 * j->K / 64, j->lut, j->K, rows, dst);
        for (int64_t i = 0; i < (int64_t)rows * j->K; i += 64) to_natural_order(dst + i);
    }
}

int nf4_dequant_f32(const uint8_t *codes, const float *absmax, const float *code_book, int64_t N,
                    int64_t K, float *out, int threads) {
    if (K % 64 != 0 || K <= 0 || N <= 0) return -1;
    const book16 lut = book_load(code_book);
    const int64_t chunks = (N + 15) / 16;
    dequant_job job = {codes, absmax, &lut, N, K, out};
    lp_parallel(chunks, lp_chunk(chunks, threads), dequant_range, &job, threads);
    return 0;
}
