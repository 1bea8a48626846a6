/* The NF4 and bf16-weight matmuls on AMX tiles (LP_AMX: Sapphire Rapids and later), for the
 * decode step's few rows of x. Included by cpu_matmul.c, which falls back to its AVX-512
 * driver where the tiles cannot be used (the OS refuses them, or a shape does not fit).
 *
 * Precision: bf16x3. AMX multiplies bfloat16 pairs and accumulates in float32. Each float32
 * operand v is split into v_hi = bf16(v) and v_lo = bf16(v - v_hi); the kernel sums
 * w_hi x_hi + w_hi x_lo + w_lo x_hi. Each of those products is exact in float32 (8-bit by
 * 8-bit significands), and what is left out (w_lo x_lo and the rounding of the two lo parts)
 * is at most 3 * 2^-16 of |w x| per term: float32-grade results (the LM head's weights are
 * bf16 already, w_lo = 0, so there it is two products). The NF4 weight is bitsandbytes'
 * float32 value code[q] * absmax, split as above.
 *
 * Layout (Intel's tile matmul, C[m][n] += sum_k A[m][k] B[k][n] with B in pairs of k):
 * the roles are turned around so that W needs no transpose: A is 16 rows of W (16 outputs)
 * by 32 k, natural row-major bf16, and B is 32 k of x (as 16 k-pairs) by 16 rows of x;
 * C is 16 outputs by 16 rows of x, float32. Rows of x beyond T are zero.
 */
#ifndef LORAPLEX_AMX_H
#define LORAPLEX_AMX_H

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_N 16   /* rows of W (outputs) per tile */
#define AMX_K 32   /* k per tile step */
#define AMX_M 16   /* rows of x per tile */
/* From this many rows of x the NF4 matmul takes the tiles; below, the AVX-512 kernel, whose
 * cost falls with the rows while a tile product costs the same for 1 row as for 16. Measured
 * on SmolLM2's four decoder shapes, 2 threads, AVX-512 time over AMX time: 0.63 at 1 row,
 * 0.84 at 4, 1.00 at 5, 1.17 at 6, 1.12 at 8. The bf16 head takes the tiles at every row
 * count (1.06 at 1 row, 1.73 at 8). */
#define AMX_NF4_ROWS 6

/* Tiles, by number (the intrinsics take literals): 0-3 C; 4 A hi; 5 A lo; 6 B hi; 7 B lo */
#define AMX_TILES 8

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Linux hands out AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA), once per process. 1 when granted. */
static int amx_ready(void) {
    static int state = 0;  /* first asked from the calling thread, before any parallel region */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return state > 0;
}

/* Every tile is 16 rows of 64 bytes. Per thread: the configuration is thread state. */
static void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < AMX_TILES; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* 16 float32 -> the bf16 of each (round to nearest even) and of what that leaves, as the
 * low halves of two 16-bit vectors */
static inline void split_bf16(__m512 v, __m256i *hi, __m256i *lo) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    *hi = h;
    *lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
}

/* x (T, K) float32, row stride xs -> xt, the B tiles, where dword (j, m) holds a bf16 pair
 * of one row of x at the step's k positions 2j and 2j + 1; columns past T are zero.
 * Wide (T > 8): per group of 16 rows g and k step s, a hi tile and a lo tile of 1 KB,
 * column m = row g*16 + m; xt holds groups * (K / 32) * 2 KB. Narrow (T <= 8): per step
 * one tile, column m the hi part of row m and column m + 8 its lo part (so one tile product
 * takes both); xt holds K / 32 KB.
 * nf4_order: step s's 32 positions are the even (s even) or odd (s odd) elements of block
 * s / 2, the order amx_dequant_block writes the weights in; else natural order. */
static void amx_pack_x(const float *x, int64_t T, int64_t K, int64_t xs, int nf4_order, uint32_t *xt) {
    const int64_t steps = K / AMX_K, groups = (T + AMX_M - 1) / AMX_M;
    const int narrow = T <= AMX_M / 2;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    memset(xt, 0, (size_t)groups * steps * 2 * 1024);
    for (int64_t t = 0; t < T; t++) {
        const int64_t g = t / AMX_M, m = t % AMX_M;
        for (int64_t s = 0; s < steps; s++) {
            __m512 v0, v1;
            if (nf4_order) {
                const float *xb = x + t * xs + (s / 2) * 64;
                const __m512i pick = s % 2 ? odd : even;
                v0 = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), pick, _mm512_loadu_ps(xb + 16));
                v1 = _mm512_permutex2var_ps(_mm512_loadu_ps(xb + 32), pick, _mm512_loadu_ps(xb + 48));
            } else {
                v0 = _mm512_loadu_ps(x + t * xs + s * AMX_K);
                v1 = _mm512_loadu_ps(x + t * xs + s * AMX_K + 16);
            }
            uint32_t hi[16], lo[16];
            __m256i h0, l0, h1, l1;
            split_bf16(v0, &h0, &l0);
            split_bf16(v1, &h1, &l1);
            _mm256_storeu_si256((__m256i *)hi, h0);
            _mm256_storeu_si256((__m256i *)(hi + 8), h1);
            _mm256_storeu_si256((__m256i *)lo, l0);
            _mm256_storeu_si256((__m256i *)(lo + 8), l1);
            if (narrow) {
                uint32_t *tile = xt + s * 256;
                for (int j = 0; j < 16; j++) {
                    tile[j * 16 + m] = hi[j];
                    tile[j * 16 + m + 8] = lo[j];
                }
            } else {
                uint32_t *tile = xt + (g * steps + s) * 512;
                for (int j = 0; j < 16; j++) {
                    tile[j * 16 + m] = hi[j];
                    tile[256 + j * 16 + m] = lo[j];
                }
            }
        }
    }
}

/* A row group's codes for block b (32 bytes a row) -> its four A tiles, 16 rows of 32 bf16
 * each, at a: the even elements' hi and lo (step 2b), then the odd elements' (step 2b + 1).
 * Per row, the block's book is scaled by its absmax in float32 (bitsandbytes' value
 * code[q] * absmax), split into bf16 hi and lo tables (each repeated in both halves of a
 * 32-entry table, so vpermw may ignore an index's fifth bit), and looked up: one vpermw per
 * 32 codes and part. */
static inline void amx_dequant_block(const uint8_t *codes, const float *absmax, __m512 book, int64_t K,
                                     int64_t b, uint16_t *a) {
    for (int r = 0; r < AMX_N; r++) {
        const __m512 v = _mm512_mul_ps(book, _mm512_set1_ps(absmax[r * (K / 64) + b]));
        /* v rounded to bf16 (nearest even) in float32, by integer arithmetic */
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512 vh = _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), _mm512_set1_epi32((int)0xFFFF0000)));
        const __m512i th = (__m512i)_mm512_cvtne2ps_pbh(vh, vh);
        const __m512i tl = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(v, vh), _mm512_sub_ps(v, vh));
        /* word i = byte i: its high nibble (element 2i) after a shift, its low one (2i + 1) in bits 0-3 */
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + r * (K / 2) + b * 32)));
        const __m512i hi = _mm512_srli_epi16(w, 4);
        _mm512_storeu_si512(a + r * 32, _mm512_permutexvar_epi16(hi, th));
        _mm512_storeu_si512(a + 512 + r * 32, _mm512_permutexvar_epi16(hi, tl));
        _mm512_storeu_si512(a + 1024 + r * 32, _mm512_permutexvar_epi16(w, th));
        _mm512_storeu_si512(a + 1536 + r * 32, _mm512_permutexvar_epi16(w, tl));
    }
}

/* C tile (16 outputs x 16 columns, in c) -> y[t0 + m, n0 + n] (+ bias) for m < mt: column m
 * (wide), or the sum of columns m and m + 8 (narrow: row m's hi and lo parts of x) */
static inline void amx_store(const float *c, int narrow, int64_t mt, float *y, int64_t ys, int64_t t0, int64_t n0,
                             const float *bias) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    const __m512i rows = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (int64_t m = 0; m < mt; m++) {  /* the 16 outputs of row t0 + m */
        __m512 v = _mm512_i32gather_ps(rows, c + m, 4);
        if (narrow) v = _mm512_add_ps(v, _mm512_i32gather_ps(rows, c + m + 8, 4));
        _mm512_storeu_ps(y + (t0 + m) * ys + n0, _mm512_add_ps(v, b));
    }
}

/* The A tiles of row group `half` (0, 1) of the pair at step s: NF4 from its dequantized
 * buffer (hi in tile 4, lo in 5), bf16 straight from the weight (hi only). */
#define AMX_LOAD_A(half)                                                              \
    do {                                                                              \
        if (w16) {                                                                    \
            _tile_loadd(4, w16 + (n0 + (half) * AMX_N) * K + s * AMX_K, K * 2);       \
        } else {                                                                      \
            _tile_loadd(4, a + (half) * 2048 + (s % 2) * 1024, 64);                   \
            _tile_loadd(5, a + (half) * 2048 + (s % 2) * 1024 + 512, 64);             \
        }                                                                             \
    } while (0)

/* Wide: the loaded A tiles (4 hi, 5 lo) times the loaded x tiles (6 hi, 7 lo): A hi x hi and
 * A lo x hi into C tile `chi`, A hi x lo into `clo` (the head's A has no lo part) */
#define AMX_PRODUCTS(chi, clo)                   \
    do {                                         \
        _tile_dpbf16ps(chi, 4, 6);               \
        _tile_dpbf16ps(clo, 4, 7);               \
        if (!w16) _tile_dpbf16ps(chi, 5, 6);     \
    } while (0)

/* y (T, N) = x @ W.T (+ bias) for W NF4 (codes, absmax, book) or bf16 (w16), on tiles.
 * N a multiple of 32, K of 64. Pairs of 16-output row groups are split across threads; each
 * pass over a pair's weights serves up to 32 rows of x. A tile product has a long latency
 * (and this CPU's two threads may share one tile unit), so the products are few and each
 * pass keeps four C tiles (0-3) accumulating side by side:
 * - narrow (T <= 8, amx_pack_x): per row group and step, A hi and A lo each times the one x
 *   tile (which holds x's hi and lo parts): 2 products (the head: 1), in C0/C1 and C2/C3;
 * - wide, one x tile: A hi x hi and A lo x hi in C0 (C2), A hi x lo in C1 (C3): 3 products;
 * - wide, two x tiles: one C tile per row group and x tile.
 * Returns 0, or -1 when a buffer cannot be allocated. */
typedef struct {
    const uint8_t *codes;
    const float *absmax, *bias;
    const uint16_t *w16;
    const uint32_t *xt;
    __m512 book;
    int64_t T, K, ys;
    int narrow;
    float *y;
    _Atomic int failed;
} amx_job;

/* Row-group pairs [lo, hi) on this thread's tiles. */
static void amx_range(void *arg, int64_t lo, int64_t hi) {
    amx_job *j = arg;
    const uint8_t *codes = j->codes;
    const float *absmax = j->absmax, *bias = j->bias;
    const uint16_t *w16 = j->w16;
    const uint32_t *xt = j->xt;
    const __m512 book = j->book;
    const int64_t T = j->T, K = j->K, ys = j->ys, steps = K / AMX_K, xgroups = (T + AMX_M - 1) / AMX_M;
    const int narrow = j->narrow;
    float *y = j->y;
    uint16_t *a = lp_scratch(2, 8 * 1024);  /* one block's A tiles: per row group, per step, hi and lo */
    float *c = lp_scratch(3, 4 * 1024);     /* the four C tiles */
    if (!a || !c) {
        atomic_store(&j->failed, 1);
        return;
    }
    amx_configure();
    for (int64_t p = lo; p < hi; p++) {
        const int64_t n0 = p * 2 * AMX_N;
        for (int64_t x0 = 0; x0 < xgroups; x0 += 2) {
            const int two = xgroups - x0 > 1;
            const uint32_t *bx0 = xt + x0 * steps * 512, *bx1 = bx0 + steps * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t s = 0; s < steps; s++) {
                if (!w16 && s % 2 == 0)
                    for (int h = 0; h < 2; h++)
                        amx_dequant_block(codes + (n0 + h * AMX_N) * K / 2, absmax + (n0 + h * AMX_N) * K / 64,
                                          book, K, s / 2, a + h * 2048);
                if (narrow) {  /* C0/C1: group 0 with A hi / A lo; C2/C3: group 1 */
                    _tile_loadd(6, xt + s * 256, 64);
                    AMX_LOAD_A(0);
                    _tile_dpbf16ps(0, 4, 6);
                    if (!w16) _tile_dpbf16ps(1, 5, 6);
                    AMX_LOAD_A(1);
                    _tile_dpbf16ps(2, 4, 6);
                    if (!w16) _tile_dpbf16ps(3, 5, 6);
                    continue;
                }
                _tile_loadd(6, bx0 + s * 512, 64);
                _tile_loadd(7, bx0 + s * 512 + 256, 64);
                if (!two) {  /* C0/C1: group 0 x hi / x lo; C2/C3: group 1 */
                    AMX_LOAD_A(0);
                    AMX_PRODUCTS(0, 1);
                    AMX_LOAD_A(1);
                    AMX_PRODUCTS(2, 3);
                } else {     /* C0/C1: group 0 with x tile 0 / 1; C2/C3: group 1 */
                    AMX_LOAD_A(0);
                    AMX_PRODUCTS(0, 0);
                    AMX_LOAD_A(1);
                    AMX_PRODUCTS(2, 2);
                    _tile_loadd(6, bx1 + s * 512, 64);
                    _tile_loadd(7, bx1 + s * 512 + 256, 64);
                    AMX_PRODUCTS(3, 3);  /* group 1's A tiles are still loaded */
                    AMX_LOAD_A(0);
                    AMX_PRODUCTS(1, 1);
                }
            }
            const int64_t t0 = x0 * AMX_M, mt0 = T - t0 < AMX_M ? T - t0 : AMX_M;
            _tile_stored(0, c, 64);
            _tile_stored(1, c + 256, 64);
            _tile_stored(2, c + 512, 64);
            _tile_stored(3, c + 768, 64);
            if (!two) {  /* C0 + C1, C2 + C3 */
                for (int i = 0; i < 256; i += 16) {
                    _mm512_store_ps(c + i, _mm512_add_ps(_mm512_load_ps(c + i), _mm512_load_ps(c + 256 + i)));
                    _mm512_store_ps(c + 512 + i, _mm512_add_ps(_mm512_load_ps(c + 512 + i), _mm512_load_ps(c + 768 + i)));
                }
                amx_store(c, narrow, mt0, y, ys, t0, n0, bias);
                amx_store(c + 512, narrow, mt0, y, ys, t0, n0 + AMX_N, bias);
            } else {
                const int64_t t1 = t0 + AMX_M, mt1 = T - t1 < AMX_M ? T - t1 : AMX_M;
                amx_store(c, 0, mt0, y, ys, t0, n0, bias);
                amx_store(c + 256, 0, mt1, y, ys, t1, n0, bias);
                amx_store(c + 512, 0, mt0, y, ys, t0, n0 + AMX_N, bias);
                amx_store(c + 768, 0, mt1, y, ys, t1, n0 + AMX_N, bias);
            }
        }
    }
    _tile_release();
}

static int amx_matmul(const uint8_t *codes, const float *absmax, const float *code_book, const uint16_t *w16,
                      const float *x, int64_t T, int64_t K, int64_t xs, int64_t N, const float *bias,
                      float *y, int64_t ys, int threads) {
    const int64_t steps = K / AMX_K, pairs = N / (2 * AMX_N), xgroups = (T + AMX_M - 1) / AMX_M;
    uint32_t *xt = lp_scratch(1, (size_t)xgroups * steps * 2 * 1024);  /* wide's size; narrow needs half */
    if (!xt) return -1;
    amx_pack_x(x, T, K, xs, w16 == NULL, xt);
    amx_job job = {codes, absmax, bias, w16, xt, code_book ? _mm512_loadu_ps(code_book) : _mm512_setzero_ps(),
                   T, K, ys, T <= AMX_M / 2, y, 0};
    lp_parallel(pairs, (pairs + 4 * threads - 1) / (4 * threads), amx_range, &job, threads);
    return atomic_load(&job.failed) ? -1 : 0;
}

#endif
