/* NF4 matmul on the CPU with AVX-512: y = x @ dequant(W).T (+ bias), all in float32.
 *
 * W (N, K) is in bitsandbytes' canonical NF4 layout: element e = n * K + k is the nibble
 * of byte e / 2, the high nibble for even e and the low nibble for odd e; block e / 64 has
 * one float32 absmax; the value is code[nibble] * absmax (bitsandbytes' dequantize_4bit in
 * float32). K must be a multiple of 64, so no block spans two rows.
 *
 * The kernel reads each weight byte once per call. Rows of W are taken NR at a time: their
 * 4-bit codes are expanded into a float32 buffer of NR * K values that stays in L1/L2 (the
 * 16-entry code book lives in one register, one vpermps per 16 codes), and the buffer is
 * then multiplied with every row of x, MT rows of x at a time, in an NR x MT tile of
 * 16-lane accumulators. Products and sums are float32, so the result equals
 * dequantize + float32 matmul to float rounding (only the summation order differs).
 *
 * Threads: row groups are split statically across `threads` OpenMP threads (the process's
 * one OpenMP runtime, torch's).
 *
 * bf16_matmul_f32 is the same driver for a bfloat16 weight (the LM head): the weight is
 * widened to float32 exactly, activations, products and sums stay float32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define NR 4   /* rows of W per group */
#define MT 4   /* rows of x per tile (store_tile assumes NR == MT == 4) */

/* Expand `rows` rows of codes (K/2 bytes each) into buf (rows * K floats), each 32 values in
 * "split" order: the 16 even elements of the 32, then the 16 odd ones (the high and the low
 * nibbles of 16 bytes). x is put in the same order once per call (split_rows), so the dot
 * products are unchanged and the codes need no interleaving. */
static void dequant_rows(const uint8_t *codes, const float *absmax, __m512 lut, int64_t K,
                         int rows, float *buf) {
    const __m512i mask = _mm512_set1_epi32(0xF);
    const int64_t blocks = (int64_t)rows * K / 64;
    for (int64_t b = 0; b < blocks; b++) {
        /* code[q] * absmax, looked up from the scaled book: the same float32 product */
        const __m512 book = _mm512_mul_ps(lut, _mm512_set1_ps(absmax[b]));
        const uint8_t *src = codes + b * 32;
        float *dst = buf + b * 64;
        for (int half = 0; half < 2; half++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + half * 16)));
            _mm512_storeu_ps(dst + half * 32, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), book));  /* 2j */
            _mm512_storeu_ps(dst + half * 32 + 16, _mm512_permutexvar_ps(_mm512_and_si512(v, mask), book));  /* 2j+1 */
        }
    }
}

/* Rows of x (T, K), row stride xs, into xp (T, K) contiguous in split order. */
static void split_rows(const float *x, int64_t T, int64_t K, int64_t xs, float *xp) {
    const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t k = 0; k < K; k += 32) {
            __m512 a = _mm512_loadu_ps(x + t * xs + k), b = _mm512_loadu_ps(x + t * xs + k + 16);
            _mm512_storeu_ps(xp + t * K + k, _mm512_permutex2var_ps(a, even_idx, b));
            _mm512_storeu_ps(xp + t * K + k + 16, _mm512_permutex2var_ps(a, odd_idx, b));
        }
    }
}

/* The 16 sums of a full NR x MT tile (acc[r][m] for y[t + m, n0 + r]), reduced together by a
 * transpose tree (45 shuffles and adds instead of 16 separate reductions) and stored as MT
 * runs of 4 consecutive outputs. */
static inline __attribute__((always_inline)) void store_tile(__m512 acc[NR][MT], float *y, int64_t ys,
                                                             int64_t t, int64_t n0, const float *bias) {
    __m512 u[8], w[4];
    for (int j = 0; j < 8; j++) {  /* vector i = r * 4 + m */
        __m512 a = acc[(2 * j) / 4][(2 * j) % 4], b = acc[(2 * j + 1) / 4][(2 * j + 1) % 4];
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int j = 0; j < 4; j++)
        w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
    __m512 p0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    __m512 p1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(p0, p1, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(p0, p1, _MM_SHUFFLE(3, 2, 3, 2)));
    /* 128-bit lane m of sums = (y[t + m, n0 + r] for r = 0..3) */
    if (bias) sums = _mm512_add_ps(sums, _mm512_broadcast_f32x4(_mm_loadu_ps(bias + n0)));
    _mm_storeu_ps(y + (t + 0) * ys + n0, _mm512_extractf32x4_ps(sums, 0));  /* MT == 4 */
    _mm_storeu_ps(y + (t + 1) * ys + n0, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(y + (t + 2) * ys + n0, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(y + (t + 3) * ys + n0, _mm512_extractf32x4_ps(sums, 3));
}

/* y[t, n0 + r] for r < nr, t < T, from the dequantized rows in buf. Inlined, so that the
 * full groups (nr == NR, a constant there) keep their accumulators in registers. */
static inline __attribute__((always_inline)) void tile_rows(const float *buf, int nr, int64_t K, const float *x, int64_t T, int64_t xs,
                      float *y, int64_t ys, int64_t n0, const float *bias) {
    int64_t t = 0;
    for (; t + MT <= T; t += MT) {
        __m512 acc[NR][MT];
        for (int r = 0; r < NR; r++)
            for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 xv[MT];
            for (int m = 0; m < MT; m++) xv[m] = _mm512_loadu_ps(x + (t + m) * xs + k);
            for (int r = 0; r < nr; r++) {
                __m512 w = _mm512_loadu_ps(buf + r * K + k);
                for (int m = 0; m < MT; m++) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
            }
        }
        if (nr == NR) {
            store_tile(acc, y, ys, t, n0, bias);
        } else {
            for (int r = 0; r < nr; r++)
                for (int m = 0; m < MT; m++)
                    y[(t + m) * ys + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    for (; t < T; t++) {
        __m512 acc[NR];
        for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + t * xs + k);
            for (int r = 0; r < nr; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(buf + r * K + k), xv, acc[r]);
        }
        for (int r = 0; r < nr; r++) y[t * ys + n0 + r] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[n0 + r] : 0.0f);
    }
}

/* bf16 weight rows (K values each) widened to float32 into buf: exact (a bf16 is the high
 * half of a float32). */
static void widen_bf16_rows(const uint16_t *w, int64_t K, int rows, float *buf) {
    const int64_t n = (int64_t)rows * K;
    for (int64_t i = 0; i < n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + i)));
        _mm512_storeu_ps(buf + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
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

enum weights { NF4, BF16 };

/* The shared driver: row groups of W split across threads, each expanded into its float32
 * buffer and multiplied with every row of x (already in the order the expansion produces). */
static int run_groups(enum weights kind, const void *w, const float *absmax, const float *code_book,
                      const float *x, int64_t T, int64_t K, int64_t xs, int64_t N, const float *bias,
                      float *y, int64_t ys, int threads) {
    const __m512 lut = code_book ? _mm512_loadu_ps(code_book) : _mm512_setzero_ps();
    const int64_t groups = (N + NR - 1) / NR;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|: failed)
    {
        float *buf = aligned_alloc(64, (size_t)NR * K * sizeof(float));
        if (!buf) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                const int64_t n0 = g * NR;
                const int nr = (int)(N - n0 < NR ? N - n0 : NR);
                if (kind == NF4)
                    dequant_rows((const uint8_t *)w + n0 * K / 2, absmax + n0 * K / 64, lut, K, nr, buf);
                else
                    widen_bf16_rows((const uint16_t *)w + n0 * K, K, nr, buf);
                if (nr == NR)
                    tile_full(buf, K, x, T, xs, y, ys, n0, bias);
                else
                    tile_part(buf, nr, K, x, T, xs, y, ys, n0, bias);
            }
            free(buf);
        }
    }
    return failed ? -1 : 0;
}

/* y (T, N) with row stride ys = x (T, K) with row stride xs @ dequant(codes, absmax).T + bias.
 * Returns 0, or -1 when K is not a multiple of 64 or a buffer cannot be allocated. */
int nf4_matmul_f32(const float *x, int64_t T, int64_t K, int64_t xs, const uint8_t *codes,
                   const float *absmax, const float *code_book, int64_t N, const float *bias,
                   float *y, int64_t ys, int threads) {
    if (K % 64 != 0 || K <= 0 || N <= 0 || T < 0) return -1;
    if (T == 0) return 0;
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
    return run_groups(BF16, w, NULL, NULL, x, T, K, xs, N, NULL, y, ys, threads);
}

/* dequant(codes, absmax) as a dense (N, K) float32 matrix: the weight of the prefill path
 * (server/model/quant.py, DENSE_ROWS) and the layout check the tests use. Rows are split
 * across `threads` threads, 16 at a time, each expanded and put back in natural order. */
int nf4_dequant_f32(const uint8_t *codes, const float *absmax, const float *code_book, int64_t N,
                    int64_t K, float *out, int threads) {
    if (K % 64 != 0 || K <= 0 || N <= 0) return -1;
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 lut = _mm512_loadu_ps(code_book);
    const int64_t chunks = (N + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n0 = c * 16;
        const int rows = (int)(N - n0 < 16 ? N - n0 : 16);
        float *dst = out + n0 * K;
        dequant_rows(codes + n0 * K / 2, absmax + n0 * K / 64, lut, K, rows, dst);
        for (int64_t i = 0; i < (int64_t)rows * K; i += 32) {  /* split order -> natural order */
            __m512 even = _mm512_loadu_ps(dst + i), odd = _mm512_loadu_ps(dst + i + 16);
            _mm512_storeu_ps(dst + i, _mm512_permutex2var_ps(even, lo_idx, odd));
            _mm512_storeu_ps(dst + i + 16, _mm512_permutex2var_ps(even, hi_idx, odd));
        }
    }
    return 0;
}

/* ---- paged decode attention ---------------------------------------------------------- */

/* e^x for 16 floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial, ~1 ulp). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* One query token per sequence against its paged K/V, read in place (no gather):
 *   q (B, H, hd), k_cache / v_cache (num_blocks, block_size, Hkv, hd), block_tables (B, stride)
 *   int64, context_lens (B,) int64 -> out (B, H, hd); query head h reads KV head h / (H / Hkv).
 * Scores, softmax and the weighted sum of V are float32; exp is exp16 above. hd must be a
 * multiple of 16 and H / Hkv at most 64; returns -1 otherwise or when a buffer cannot be
 * allocated. */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, int64_t table_stride,
                               const int64_t *context_lens, int64_t B, int64_t H, int64_t Hkv,
                               int64_t hd, int64_t block_size, float scale, float *out, int threads) {
    if (hd % 16 != 0 || hd <= 0 || Hkv <= 0 || H % Hkv != 0 || H / Hkv > 64 || B < 0) return -1;
    const int64_t G = H / Hkv, chunks = hd / 16, row = Hkv * hd;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = context_lens[b] > max_len ? context_lens[b] : max_len;
    const int64_t padded = (max_len + 15) / 16 * 16;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|: failed)
    {
        float *scores = aligned_alloc(64, (size_t)(G * padded > 0 ? G * padded : 16) * sizeof(float));
        if (!scores) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < B * Hkv; task++) {
                const int64_t b = task / Hkv, kvh = task % Hkv, L = context_lens[b];
                const int64_t *table = block_tables + b * table_stride;
                const float *qb = q + (b * H + kvh * G) * hd;   /* the group's G query heads */
                for (int64_t t = 0; t < L; t++) {
                    const float *kp = k_cache + (table[t / block_size] * block_size + t % block_size) * row + kvh * hd;
                    for (int64_t g = 0; g < G; g++) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t c = 0; c < chunks; c++)
                            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qb + g * hd + c * 16), _mm512_loadu_ps(kp + c * 16), acc);
                        scores[g * padded + t] = _mm512_reduce_add_ps(acc) * scale;
                    }
                }
                float inv[64];
                for (int64_t g = 0; g < G; g++) {
                    float *s = scores + g * padded;
                    __m512 m = _mm512_set1_ps(-INFINITY);
                    for (int64_t t = 0; t < L; t += 16) {
                        __mmask16 k = L - t >= 16 ? 0xFFFF : (__mmask16)((1u << (L - t)) - 1);
                        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, s + t));
                    }
                    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t t = 0; t < L; t += 16) {
                        __mmask16 k = L - t >= 16 ? 0xFFFF : (__mmask16)((1u << (L - t)) - 1);
                        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), mx));
                        e = _mm512_maskz_mov_ps(k, e);
                        _mm512_mask_storeu_ps(s + t, k, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
                }
                for (int64_t c = 0; c < chunks; c++) {
                    for (int64_t g = 0; g < G; g++) {
                        const float *p = scores + g * padded;
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t t = 0; t < L; t++) {
                            const float *vp = v_cache + (table[t / block_size] * block_size + t % block_size) * row + kvh * hd;
                            acc = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), _mm512_loadu_ps(vp + c * 16), acc);
                        }
                        _mm512_storeu_ps(out + (b * H + kvh * G + g) * hd + c * 16, _mm512_mul_ps(acc, _mm512_set1_ps(inv[g])));
                    }
                }
            }
            free(scores);
        }
    }
    return failed ? -1 : 0;
}

/* ---- LoRA rows ------------------------------------------------------------------------ */

/* For each row t with s = slots[t] >= 0 and r = ranks[t]:
 *   h = A[s, :r] x[t]            a: (S, r_max, K) contiguous
 *   y[t] += h @ Bt[s, :r]        bt: (S, r_max, N) contiguous (row k = column k of B' = scale B)
 * x (T, K) row stride xs, y (T, N) row stride ys, in place; float32 products and sums. Rows
 * are split across threads (each row writes only its own y row). K and N must be multiples of
 * 16 and r_max at most 1024; returns -1 otherwise. */
int lora_rows_f32(const float *x, int64_t T, int64_t K, int64_t xs, const float *a, int64_t r_max,
                  const float *bt, int64_t N, const int64_t *slots, const int64_t *ranks, float *y,
                  int64_t ys, int threads) {
    if (K % 16 != 0 || N % 16 != 0 || K <= 0 || N <= 0 || r_max <= 0 || r_max > 1024 || T < 0) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t], r = ranks[t];
        if (s < 0 || r <= 0) continue;
        float h[1024];
        const float *xt = x + t * xs;
        for (int64_t k = 0; k < r; k++) {
            const float *ak = a + (s * r_max + k) * K;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < K; i += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(ak + i), _mm512_loadu_ps(xt + i), acc);
            h[k] = _mm512_reduce_add_ps(acc);
        }
        float *yt = y + t * ys;
        const float *bs = bt + s * r_max * N;
        for (int64_t n = 0; n < N; n += 16) {
            __m512 acc = _mm512_loadu_ps(yt + n);
            for (int64_t k = 0; k < r; k++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(h[k]), _mm512_loadu_ps(bs + k * N + n), acc);
            _mm512_storeu_ps(yt + n, acc);
        }
    }
    return 0;
}
