/* The vector operations cpu_matmul.c is written in, for two instruction sets: AVX-512
 * (LP_AVX512 defined: 16 float lanes) and AVX2 with FMA (8 lanes). server/cpu_kernel.py
 * builds the library once per machine for the wider set the CPU has.
 *
 * Both give the same float32 products and sums lane by lane; only VL, the tile shape and
 * the order of the final horizontal additions differ. The one operation with no direct AVX2
 * counterpart is the 16-entry NF4 book lookup: AVX-512 holds the book in one register and
 * looks it up with one vpermps per 16 codes; AVX2 holds it as four byte planes and looks
 * up 32 codes with four vpshufb (the same float32 values). Each set puts a block's 64
 * values in its own buffer order, and x in the same order, so the dot products are
 * unchanged.
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
#define vdiv _mm512_div_ps
static inline vf vneg(vf x) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000))); }
static inline int vany_nan(vf x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0; }

/* VL bf16 values widened to float32 (exact: a bf16 is the high half of a float32) */
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The NF4 code book (16 float32) in one register. */
typedef struct { __m512 all; } book16;
static inline book16 book_load(const float *code_book) { return (book16){_mm512_loadu_ps(code_book)}; }

/* One block: 64 codes (32 bytes; element 2i is the high nibble of byte i, 2i + 1 the low one)
 * times absmax, into dst (64 floats) in buffer order: per 16 bytes, the 16 even elements,
 * then the 16 odd ones. The book is scaled first (code[q] * absmax, the same float32
 * product as bitsandbytes'), then looked up with one vpermps per 16 codes. */
static inline void dequant_block(const uint8_t *src, float absmax, const book16 *lut, float *dst) {
    const __m512 book = _mm512_mul_ps(lut->all, _mm512_set1_ps(absmax));
    for (int half = 0; half < 2; half++) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + half * 16)));
        _mm512_storeu_ps(dst + half * 32, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), book));
        _mm512_storeu_ps(dst + half * 32 + 16, _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)), book));
    }
}

/* 64 values of x in natural order -> xp in buffer order; and buffer order back to natural,
 * in place */
static inline void to_buffer_order(const float *x, float *xp) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int k = 0; k < 64; k += 32) {
        __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
        _mm512_storeu_ps(xp + k, _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(xp + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}
static inline void to_natural_order(float *buf) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int k = 0; k < 64; k += 32) {
        __m512 even = _mm512_loadu_ps(buf + k), odd = _mm512_loadu_ps(buf + k + 16);
        _mm512_storeu_ps(buf + k, _mm512_permutex2var_ps(even, lo, odd));
        _mm512_storeu_ps(buf + k + 16, _mm512_permutex2var_ps(even, hi, odd));
    }
}

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
#define vdiv _mm256_div_ps
static inline vf vneg(vf x) { return _mm256_xor_ps(x, _mm256_set1_ps(-0.0f)); }
static inline int vany_nan(vf x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0; }

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

static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* The NF4 code book as 4 byte planes (byte j of each of the 16 floats), each in both
 * 128-bit lanes: vpshufb looks up 32 codes in one plane at once, and four planes
 * interleaved give the 32 floats back exactly. Zen 3 runs vpshufb and the unpacks on two
 * pipes and vpermps on one: 1.7x the vpermps-and-blend lookup's rate, measured. */
typedef struct { __m256i plane[4]; } book16;
static inline book16 book_load(const float *code_book) {
    uint8_t bytes[4][16];
    for (int i = 0; i < 16; i++) {
        union { float f; uint32_t u; } v = {.f = code_book[i]};
        for (int j = 0; j < 4; j++) bytes[j][i] = (uint8_t)(v.u >> (8 * j));
    }
    book16 b;
    for (int j = 0; j < 4; j++) b.plane[j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes[j]));
    return b;
}

/* 32 codes (one per byte, < 16) looked up into 4 vectors: byte i of each 128-bit lane ends
 * in float lane order (i0-3 | i16-19), (i4-7 | i20-23), (i8-11 | i24-27), (i12-15 | i28-31). */
static inline void lookup32(const book16 *b, __m256i code, __m256 out[4]) {
    const __m256i p0 = _mm256_shuffle_epi8(b->plane[0], code), p1 = _mm256_shuffle_epi8(b->plane[1], code);
    const __m256i p2 = _mm256_shuffle_epi8(b->plane[2], code), p3 = _mm256_shuffle_epi8(b->plane[3], code);
    const __m256i l01 = _mm256_unpacklo_epi8(p0, p1), h01 = _mm256_unpackhi_epi8(p0, p1);
    const __m256i l23 = _mm256_unpacklo_epi8(p2, p3), h23 = _mm256_unpackhi_epi8(p2, p3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

/* A block's 64 code-book values (not yet times absmax) in buffer order: the 32 even elements
 * in lookup32's order, then the 32 odd ones. */
static inline void lookup_block(const uint8_t *src, const book16 *lut, __m256 out[8]) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)src), nib = _mm256_set1_epi8(0xF);
    lookup32(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib), out);
    lookup32(lut, _mm256_and_si256(v, nib), out + 4);
}

/* One block: 64 codes (32 bytes; element 2i is the high nibble of byte i, 2i + 1 the low
 * one) times absmax (code[q] * absmax, bitsandbytes' float32 product), into dst (64 floats)
 * in buffer order: the 32 even elements in lookup32's order, then the 32 odd ones. */
static inline void dequant_block(const uint8_t *src, float absmax, const book16 *lut, float *dst) {
    __m256 w[8];
    lookup_block(src, lut, w);
    const __m256 s = _mm256_set1_ps(absmax);
    for (int j = 0; j < 8; j++) _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(w[j], s));
}

/* even (e) and odd (o) elements of 16 natural-order values, and back */
static inline void split16(const float *x, __m256 *e, __m256 *o) {
    const __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
    /* per 128-bit lane (a0 a2 b0 b2 | a4 a6 b4 b6), then the 64-bit pairs in order 0 2 1 3 */
    *e = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    *o = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
}
static inline void merge16(__m256 e, __m256 o, float *x) {
    const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
    _mm256_storeu_ps(x, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(x + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* 64 values of x in natural order -> xp in buffer order; and buffer order back to natural,
 * in place. With E0-E3 the even elements i0-7, ..., i24-31 (O the odd), buffer order is
 * (E0.lo E2.lo) (E0.hi E2.hi) (E1.lo E3.lo) (E1.hi E3.hi), the same for O. */
static inline void to_buffer_order(const float *x, float *xp) {
    __m256 e[4], o[4];
    for (int j = 0; j < 4; j++) split16(x + 16 * j, &e[j], &o[j]);
    const __m256 *half[2] = {e, o};
    for (int h = 0; h < 2; h++) {
        const __m256 *v = half[h];
        _mm256_storeu_ps(xp + 32 * h, _mm256_permute2f128_ps(v[0], v[2], 0x20));
        _mm256_storeu_ps(xp + 32 * h + 8, _mm256_permute2f128_ps(v[0], v[2], 0x31));
        _mm256_storeu_ps(xp + 32 * h + 16, _mm256_permute2f128_ps(v[1], v[3], 0x20));
        _mm256_storeu_ps(xp + 32 * h + 24, _mm256_permute2f128_ps(v[1], v[3], 0x31));
    }
}
static inline void to_natural_order(float *buf) {
    __m256 v[2][4];
    for (int h = 0; h < 2; h++) {
        const float *p = buf + 32 * h;
        const __m256 f0 = _mm256_loadu_ps(p), f1 = _mm256_loadu_ps(p + 8);
        const __m256 f2 = _mm256_loadu_ps(p + 16), f3 = _mm256_loadu_ps(p + 24);
        v[h][0] = _mm256_permute2f128_ps(f0, f1, 0x20);
        v[h][2] = _mm256_permute2f128_ps(f0, f1, 0x31);
        v[h][1] = _mm256_permute2f128_ps(f2, f3, 0x20);
        v[h][3] = _mm256_permute2f128_ps(f2, f3, 0x31);
    }
    for (int j = 0; j < 4; j++) merge16(v[0][j], v[1][j], buf + 16 * j);
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

/* ---- shared by both sets ---- */

/* e^x for VL floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial, ~1 ulp). */
static inline vf vexp(vf x) {
    x = vmax(vmin(x, vset1(88.3762626647949f)), vset1(-88.3762626647949f));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnmadd(n, vset1(0.693359375f), x);
    r = vfnmadd(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.9875691500E-4f);
    p = vfmadd(p, r, vset1(1.3981999507E-3f));
    p = vfmadd(p, r, vset1(8.3334519073E-3f));
    p = vfmadd(p, r, vset1(4.1665795894E-2f));
    p = vfmadd(p, r, vset1(1.6666665459E-1f));
    p = vfmadd(p, r, vset1(5.0000001201E-1f));
    p = vfmadd(vmul(p, r), r, vadd(r, vset1(1.0f)));
    return vscale2n(p, n);
}

#endif
