/* The vector operations cpu_matmul.c is written in, for two instruction sets: AVX-512
 * (LP_AVX512 defined: 16 float lanes) and AVX2 with FMA (8 lanes). server/cpu_kernel.py
 * builds the library once per machine for the wider set the CPU has.
 *
 * Both give the same float32 products and sums lane by lane; only VL, the tile shape and
 * the order of the final horizontal additions differ. The one operation with no direct AVX2
 * counterpart is the 16-entry NF4 book lookup: AVX-512 holds the book in one register and
 * looks it up with one vpermps; AVX2 holds it in two and picks by the code's top bit
 * (two vpermps and a blend, the same float32 values).
 */
#ifndef LORAPLEX_SIMD_H
#define LORAPLEX_SIMD_H

#include <immintrin.h>
#include <stdint.h>

#if defined(LP_AVX512)

#define VL 16  /* float lanes */
#define NR 4   /* rows of W per group */
#define MT 4   /* rows of x per tile (16 accumulators of the 32 registers) */
typedef __m512 vf;
typedef __m512i vi;
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vfmadd _mm512_fmadd_ps
#define vfnmadd _mm512_fnmadd_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vmin _mm512_min_ps
#define vsum _mm512_reduce_add_ps
#define vhmax _mm512_reduce_max_ps
#define vround(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vscale2n _mm512_scalef_ps  /* p * 2^n, n integral */

/* VL bytes, each widened to an int32 lane */
static inline vi vload_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vhigh4(vi v) { return _mm512_srli_epi32(v, 4); }
static inline vi vlow4(vi v) { return _mm512_and_si512(v, _mm512_set1_epi32(0xF)); }
/* VL bf16 values widened to float32 (exact: a bf16 is the high half of a float32) */
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* the NF4 code book (16 float32), times an absmax, looked up by 4-bit code */
typedef struct { __m512 all; } book16;
static inline book16 book_load(const float *code_book) { return (book16){_mm512_loadu_ps(code_book)}; }
static inline book16 book_scaled(book16 b, float s) { return (book16){_mm512_mul_ps(b.all, _mm512_set1_ps(s))}; }
static inline vf book_lookup(book16 b, vi code) { return _mm512_permutexvar_ps(code, b.all); }

/* first n < VL lanes (or all for n >= VL) */
static inline vf vload_first(const float *p, int64_t n, float fill) {
    __mmask16 k = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), k, p);
}
static inline vf vkeep_first(vf v, int64_t n) {
    return _mm512_maskz_mov_ps(n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1), v);
}
static inline void vstore_first(float *p, int64_t n, vf v) {
    _mm512_mask_storeu_ps(p, n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1), v);
}

/* 2 VL natural-order values (a, b) -> their even and their odd elements; and back */
static inline void vsplit(vf a, vf b, vf *even, vf *odd) {
    *even = _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
    *odd = _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
}
static inline void vmerge(vf even, vf odd, vf *a, vf *b) {
    *a = _mm512_permutex2var_ps(even, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), odd);
    *b = _mm512_permutex2var_ps(even, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), odd);
}

/* The 16 sums of a full NR x MT tile (acc[r][m] for y[t + m, n0 + r]), reduced together by a
 * transpose tree (45 shuffles and adds instead of 16 separate reductions) and stored as MT
 * runs of 4 consecutive outputs. */
static inline __attribute__((always_inline)) void store_tile(vf acc[NR][MT], float *y, int64_t ys, int64_t t,
                                                             int64_t n0, const float *bias) {
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
    for (int m = 0; m < MT; m++) {
        __m128 s = m == 0 ? _mm512_extractf32x4_ps(sums, 0) : m == 1 ? _mm512_extractf32x4_ps(sums, 1)
                 : m == 2 ? _mm512_extractf32x4_ps(sums, 2) : _mm512_extractf32x4_ps(sums, 3);
        _mm_storeu_ps(y + (t + m) * ys + n0, s);
    }
}

#else  /* AVX2 + FMA */

#define VL 8
#define NR 4   /* rows of W per group */
#define MT 2   /* rows of x per tile (8 accumulators, 4 weights and x of the 16 registers) */
typedef __m256 vf;
typedef __m256i vi;
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
#define vfmadd _mm256_fmadd_ps
#define vfnmadd _mm256_fnmadd_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
#define vmin _mm256_min_ps
#define vround(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

static inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vhmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
/* p * 2^n for integral n in [-127, 127] (the callers clamp): 2^n built in the exponent field */
static inline vf vscale2n(vf p, vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline vi vload_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi vhigh4(vi v) { return _mm256_srli_epi32(v, 4); }
static inline vi vlow4(vi v) { return _mm256_and_si256(v, _mm256_set1_epi32(0xF)); }
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

typedef struct { __m256 lo, hi; } book16;  /* entries 0-7 and 8-15 */
static inline book16 book_load(const float *code_book) {
    return (book16){_mm256_loadu_ps(code_book), _mm256_loadu_ps(code_book + 8)};
}
static inline book16 book_scaled(book16 b, float s) {
    const __m256 v = _mm256_set1_ps(s);
    return (book16){_mm256_mul_ps(b.lo, v), _mm256_mul_ps(b.hi, v)};
}
static inline vf book_lookup(book16 b, vi code) {
    /* vpermps reads the low 3 bits; bit 3, moved to the sign bit, picks the half */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(b.lo, code), _mm256_permutevar8x32_ps(b.hi, code),
                            _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
}

static inline __m256 first_mask(int64_t n) {
    const int c = n >= 8 ? 8 : (int)n;
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
static inline vf vload_first(const float *p, int64_t n, float fill) {
    const __m256 k = first_mask(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, _mm256_castps_si256(k)), k);
}
static inline vf vkeep_first(vf v, int64_t n) { return _mm256_and_ps(v, first_mask(n)); }
static inline void vstore_first(float *p, int64_t n, vf v) {
    _mm256_maskstore_ps(p, _mm256_castps_si256(first_mask(n)), v);
}

static inline void vsplit(vf a, vf b, vf *even, vf *odd) {
    /* per 128-bit lane (a0 a2 b0 b2 | a4 a6 b4 b6), then the 64-bit pairs in order 0 2 1 3 */
    *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
}
static inline void vmerge(vf even, vf odd, vf *a, vf *b) {
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    *a = _mm256_permute2f128_ps(lo, hi, 0x20);
    *b = _mm256_permute2f128_ps(lo, hi, 0x31);
}

/* The sums of a full NR x MT tile: for each x row m, the 4 row sums acc[0..3][m] reduced
 * together (two horizontal-add rounds and one 128-bit add) into 4 consecutive outputs. */
static inline __attribute__((always_inline)) void store_tile(vf acc[NR][MT], float *y, int64_t ys, int64_t t,
                                                             int64_t n0, const float *bias) {
    for (int m = 0; m < MT; m++) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][m], acc[1][m]), _mm256_hadd_ps(acc[2][m], acc[3][m]));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (bias) s = _mm_add_ps(s, _mm_loadu_ps(bias + n0));
        _mm_storeu_ps(y + (t + m) * ys + n0, s);
    }
}

#endif
#endif
