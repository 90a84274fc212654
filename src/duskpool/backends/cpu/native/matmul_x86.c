// The AVX2/FMA kernels of dp_matmul, built where the compiler targets both (-march=native on such a
// CPU). For the few rows of a decode step each weight row is read once and dotted with every row of
// x block by block: d * sum(q * x) (+ m * sum(x) for the types with a min, with sum(x) per 32 values,
// 16 for Q2_K, taken once per call by matmul.c). Q4_0, Q4_1, Q8_0 and IQ4_NL have tile kernels (several
// weight rows at once), the other types row kernels; F16 needs F16C. The lookups at the end are what
// matmul.c calls.
#include "native.h"

#ifdef DP_AVX2
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256i u8x8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m256i i8x8(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline __m256 ld(const float *p) { return _mm256_loadu_ps(p); }
#define FMA _mm256_fmadd_ps

// The two halves at p (a block's d and m, or d and the first quants) as floats in lanes 0 and 1:
// one F16C conversion costs less than two table lookups (which also compete with the weights for L1)
DP_INLINE __m128 half2(const uint8_t *p) {
#ifdef __F16C__
    int32_t h; memcpy(&h, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(h));
#else
    return _mm_setr_ps(f16(p), f16(p + 2), 0.0f, 0.0f);
#endif
}

// sum_j q[j] * x[8j .. 8j + 7] for four vectors of 8 weights
DP_INLINE __m256 dot32(__m256 q0, __m256 q1, __m256 q2, __m256 q3, const float *x) {
    __m256 s = _mm256_mul_ps(q0, ld(x));
    s = FMA(q1, ld(x + 8), s);
    s = FMA(q2, ld(x + 16), s);
    return FMA(q3, ld(x + 24), s);
}

// Two sets of accumulators, alternated between blocks (or groups) so that the chain of FMAs into
// one set does not limit the loop; the block functions below add into the set they are given.
#define ACC_ARGS __m256 *restrict acc, float *restrict macc
#define ACC_DECL                                                                                   \
    __m256 acc0[MAX_MB], acc1[MAX_MB]; float macc0[MAX_MB], macc1[MAX_MB];                         \
    for (int m = 0; m < MB; m++) { acc0[m] = acc1[m] = _mm256_setzero_ps(); macc0[m] = macc1[m] = 0.0f; }
#define ACC_OUT                                                                                    \
    for (int m = 0; m < MB; m++) out[m] = hsum8(_mm256_add_ps(acc0[m], acc1[m])) + (macc0[m] + macc1[m]);
// for b in [0, nb): block(w + b * size, b, acc, macc, args...) with acc alternating when MB <= 2
#define BLOCK_LOOP(block, nb, size, ...)                                                           \
    do {                                                                                           \
        int64_t b_ = 0;                                                                            \
        if (MB <= 2)                                                                               \
            for (; b_ + 2 <= (nb); b_ += 2) {                                                      \
                block(w + b_ * (size), b_, acc0, macc0, __VA_ARGS__);                              \
                block(w + (b_ + 1) * (size), b_ + 1, acc1, macc1, __VA_ARGS__);                    \
            }                                                                                      \
        for (; b_ < (nb); b_++) block(w + b_ * (size), b_, acc0, macc0, __VA_ARGS__);              \
    } while (0)

#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif
// The R rows of a tile are R streams through memory, which the hardware prefetchers follow poorly:
// while working on one tile, fetch the tiles PF_TILES ahead, bytes in step with the blocks done.
DP_INLINE void prefetch_ahead(const uint8_t *p, int64_t tile_bytes, int step) {
    if (PF_TILES == 0) return;
    const uint8_t *q = p + PF_TILES * tile_bytes;
    for (int i = 0; i < step; i += 64) _mm_prefetch((const char *)q + i, PF_HINT);
}

// Tiles: R weight rows against MB rows of x (R * MB <= 4), out[r * MAX_MB + m]. Several weight
// rows at once share the loads of x, which otherwise limit the loop as much as the arithmetic does.

// Q4_0 and Q4_1: 32 nibbles, value q * d + m (Q4_0: m = -8 d). Byte j holds q_j (low nibble) and
// q_{16+j} (high); rather than shifting out the high nibble, the tile takes x already rearranged per
// block as xt = [x_j - x_{16+j} / 16, x_{16+j} / 16] (j < 16), so that
// lo_j * xt_j + byte_j * xt_{16+j} = lo_j * x_j + hi_j * x_{16+j} with byte_j = lo_j + 16 hi_j.
// That saves the FMA ports two shifts per block; the price is one fp32 rounding of x_j - x_{16+j}/16
// (relative 2^-24 of |x_j| + |x_{16+j}| / 16), well inside the error of the fp32 sum itself.
DP_INLINE void q4_tile(const uint8_t *w, int64_t rb, int64_t K, const float *xt, const float *sx, float *out,
                       const int R, const int MB, const int has_min) {
    const int64_t nb = K / 32;
    const int size = has_min ? 20 : 18, off = has_min ? 4 : 2;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc[4]; float macc[4];
    for (int i = 0; i < R * MB; i++) { acc[i] = _mm256_setzero_ps(); macc[i] = 0.0f; }
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * R * size, R * rb, R * size);
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * rb + b * size;
            const __m256i r0 = u8x8(blk + off), r1 = u8x8(blk + off + 8);
            const __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(r0, low)), l1 = _mm256_cvtepi32_ps(_mm256_and_si256(r1, low));
            const __m256 b0 = _mm256_cvtepi32_ps(r0), b1 = _mm256_cvtepi32_ps(r1);
            const __m128 dm = half2(blk);
            const __m256 d = _mm256_broadcastss_ps(dm);
            const float mn = has_min ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : -8.0f * _mm_cvtss_f32(dm);
            for (int m = 0; m < MB; m++) {
                const float *xb = xt + m * K + b * 32;
                __m256 s = FMA(l1, ld(xb + 8), _mm256_mul_ps(l0, ld(xb)));
                s = FMA(b0, ld(xb + 16), s);
                s = FMA(b1, ld(xb + 24), s);
                acc[r * MB + m] = FMA(s, d, acc[r * MB + m]);
                macc[r * MB + m] += mn * sx[m * nb + b];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) out[r * MAX_MB + m] = hsum8(acc[r * MB + m]) + macc[r * MB + m];
}

// q4_tile for 3 or 4 rows of x: the block's weights decoded to floats once, a_j = d lo_j + m and b_j = d hi_j + m,
// and dotted in xt's terms (a_j against xt_j, a_j + 16 b_j = d byte_j + 17 m against xt_{16+j}). Each row of x
// then costs its 4 FMAs and no fifth for d nor a sum of x for m; shared by 3 or 4 rows, the decode costs less than
// those. Measured on one Zen 4 core, Q4_1 3072 x 576 at 4 rows: 293 -> 235 us.
DP_INLINE void q4_tile_decoded(const uint8_t *w, int64_t rb, int64_t K, const float *xt, float *out, const int MB,
                               const int has_min) {
    const int64_t nb = K / 32;
    const int size = has_min ? 20 : 18, off = has_min ? 4 : 2;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc[MAX_MB][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * size;
        prefetch_ahead(blk, rb, size);
        const __m256i r0 = u8x8(blk + off), r1 = u8x8(blk + off + 8);
        const __m128 dm = half2(blk);
        const __m256 d = _mm256_broadcastss_ps(dm);
        const __m256 mn = has_min ? _mm256_broadcastss_ps(_mm_movehdup_ps(dm)) : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
        const __m256 mn17 = _mm256_mul_ps(mn, _mm256_set1_ps(17.0f));
        const __m256 a0 = FMA(_mm256_cvtepi32_ps(_mm256_and_si256(r0, low)), d, mn);
        const __m256 a1 = FMA(_mm256_cvtepi32_ps(_mm256_and_si256(r1, low)), d, mn);
        const __m256 c0 = FMA(_mm256_cvtepi32_ps(r0), d, mn17), c1 = FMA(_mm256_cvtepi32_ps(r1), d, mn17);
        for (int m = 0; m < MB; m++) {
            const float *xb = xt + m * K + b * 32;
            acc[m][0] = FMA(a0, ld(xb), FMA(c0, ld(xb + 16), acc[m][0]));
            acc[m][1] = FMA(a1, ld(xb + 8), FMA(c1, ld(xb + 24), acc[m][1]));
        }
    }
    for (int m = 0; m < MB; m++) out[m] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// Q5_0 and Q5_1: nibbles plus a fifth bit from a 32-bit mask, value q * d + m (Q5_0: m = -16 d)
DP_INLINE void q5_block(const uint8_t *w, int64_t b, ACC_ARGS, const float *x, int64_t K, const float *sx, const int MB, const int has_min) {
    const int off = has_min ? 4 : 2;
    const __m256i low = _mm256_set1_epi32(15), sixteen = _mm256_set1_epi32(16);
    const __m256i s0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), s8 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i s12 = _mm256_setr_epi32(12, 13, 14, 15, 16, 17, 18, 19), s20 = _mm256_setr_epi32(20, 21, 22, 23, 24, 25, 26, 27);
    uint32_t qh; memcpy(&qh, w + off, 4);
    const __m256i h = _mm256_set1_epi32((int)qh), h4 = _mm256_slli_epi32(h, 4);
    __m256i r0 = u8x8(w + off + 4), r1 = u8x8(w + off + 12);
    // element j < 16: bit j of qh; element 16 + j: bit 16 + j; moved to bit 4
    __m256 q0 = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(r0, low), _mm256_and_si256(_mm256_srlv_epi32(h4, s0), sixteen)));
    __m256 q1 = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(r1, low), _mm256_and_si256(_mm256_srlv_epi32(h4, s8), sixteen)));
    __m256 q2 = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(r0, 4), _mm256_and_si256(_mm256_srlv_epi32(h, s12), sixteen)));
    __m256 q3 = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(r1, 4), _mm256_and_si256(_mm256_srlv_epi32(h, s20), sixteen)));
    const __m128 dm = half2(w);
    const __m256 d = _mm256_broadcastss_ps(dm);
    const float mn = has_min ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : -16.0f * _mm_cvtss_f32(dm);
    for (int m = 0; m < MB; m++) {
        acc[m] = FMA(dot32(q0, q1, q2, q3, x + m * K + b * 32), d, acc[m]);
        macc[m] += mn * sx[m * (K / 32) + b];
    }
}

DP_INLINE void q5_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB, const int has_min) {
    ACC_DECL
    BLOCK_LOOP(q5_block, K / 32, has_min ? 24 : 22, x, K, sx, MB, has_min);
    ACC_OUT
}

DP_INLINE void q8_0_tile(const uint8_t *w, int64_t rb, int64_t K, const float *x, const float *sx, float *out,
                         const int R, const int MB) {
    (void)sx;
    const int64_t nb = K / 32;
    __m256 acc[4];
    for (int i = 0; i < R * MB; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * R * 34, R * rb, R * 34);
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * rb + b * 34;
            const __m256 q0 = _mm256_cvtepi32_ps(i8x8(blk + 2)), q1 = _mm256_cvtepi32_ps(i8x8(blk + 10));
            const __m256 q2 = _mm256_cvtepi32_ps(i8x8(blk + 18)), q3 = _mm256_cvtepi32_ps(i8x8(blk + 26));
            const __m256 d = _mm256_broadcastss_ps(half2(blk));
            for (int m = 0; m < MB; m++) acc[r * MB + m] = FMA(dot32(q0, q1, q2, q3, x + m * K + b * 32), d, acc[r * MB + m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) out[r * MAX_MB + m] = hsum8(acc[r * MB + m]);
}

// Q4_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min: d * sc * q - dmin * mn.
// Group g (64 values) has its 32 bytes of nibbles at q + 32 g: low nibbles sub-block 2g, high 2g+1.
DP_INLINE void q4_k_group(const uint8_t *w, int64_t sb, const int g, ACC_ARGS, const float *x, int64_t K, const float *sx, const int MB) {
    const __m256i low = _mm256_set1_epi32(15);
    const float d = f16(w), dmin = f16(w + 2);
    const uint8_t *q = w + 16 + 32 * g;
    uint8_t sc1, m1, sc2, m2;
    scale_min_k4(2 * g, w + 4, &sc1, &m1);
    scale_min_k4(2 * g + 1, w + 4, &sc2, &m2);
    const __m256 d1 = _mm256_set1_ps(d * sc1), d2 = _mm256_set1_ps(d * sc2);
    const float mn1 = -dmin * m1, mn2 = -dmin * m2;
    __m256i r0 = u8x8(q), r1 = u8x8(q + 8), r2 = u8x8(q + 16), r3 = u8x8(q + 24);
    const int64_t b = sb * 8 + 2 * g;
    __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(r0, low)), l1 = _mm256_cvtepi32_ps(_mm256_and_si256(r1, low));
    __m256 l2 = _mm256_cvtepi32_ps(_mm256_and_si256(r2, low)), l3 = _mm256_cvtepi32_ps(_mm256_and_si256(r3, low));
    for (int m = 0; m < MB; m++) {
        acc[m] = FMA(dot32(l0, l1, l2, l3, x + m * K + b * 32), d1, acc[m]);
        macc[m] += mn1 * sx[m * (K / 32) + b];
    }
    __m256 h0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(r0, 4)), h1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(r1, 4));
    __m256 h2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(r2, 4)), h3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(r3, 4));
    for (int m = 0; m < MB; m++) {
        acc[m] = FMA(dot32(h0, h1, h2, h3, x + m * K + b * 32 + 32), d2, acc[m]);
        macc[m] += mn2 * sx[m * (K / 32) + b + 1];
    }
}

DP_INLINE void q4_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB) {
    ACC_DECL
    for (int64_t sb = 0; sb < K / 256; sb++, w += 144) {
        q4_k_group(w, sb, 0, acc0, macc0, x, K, sx, MB);
        q4_k_group(w, sb, 1, acc1, macc1, x, K, sx, MB);
        q4_k_group(w, sb, 2, acc0, macc0, x, K, sx, MB);
        q4_k_group(w, sb, 3, acc1, macc1, x, K, sx, MB);
    }
    ACC_OUT
}

// Q5_K: Q4_K plus a fifth bit per value from qh[32] (bit 2g for the low nibbles of group g, 2g+1 high)
DP_INLINE void q5_k_group(const uint8_t *w, int64_t sb, const int g, ACC_ARGS, const float *x, int64_t K, const float *sx, const int MB) {
    const __m256i low = _mm256_set1_epi32(15), sixteen = _mm256_set1_epi32(16);
    const float d = f16(w), dmin = f16(w + 2);
    const uint8_t *qh = w + 16, *q = w + 48 + 32 * g;
    uint8_t sc1, m1, sc2, m2;
    scale_min_k4(2 * g, w + 4, &sc1, &m1);
    scale_min_k4(2 * g + 1, w + 4, &sc2, &m2);
    const __m256 d1 = _mm256_set1_ps(d * sc1), d2 = _mm256_set1_ps(d * sc2);
    const float mn1 = -dmin * m1, mn2 = -dmin * m2;
    const __m128i shift_lo = _mm_cvtsi32_si128(2 * g), shift_hi = _mm_cvtsi32_si128(2 * g + 1);
    __m256 l[4], u[4];
    for (int k = 0; k < 4; k++) {
        const __m256i r = u8x8(q + 8 * k), h = _mm256_slli_epi32(u8x8(qh + 8 * k), 4);
        l[k] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(r, low), _mm256_and_si256(_mm256_srl_epi32(h, shift_lo), sixteen)));
        u[k] = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(r, 4), _mm256_and_si256(_mm256_srl_epi32(h, shift_hi), sixteen)));
    }
    const int64_t b = sb * 8 + 2 * g;
    for (int m = 0; m < MB; m++) {
        acc[m] = FMA(dot32(l[0], l[1], l[2], l[3], x + m * K + b * 32), d1, acc[m]);
        acc[m] = FMA(dot32(u[0], u[1], u[2], u[3], x + m * K + b * 32 + 32), d2, acc[m]);
        macc[m] += mn1 * sx[m * (K / 32) + b] + mn2 * sx[m * (K / 32) + b + 1];
    }
}

DP_INLINE void q5_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB) {
    ACC_DECL
    for (int64_t sb = 0; sb < K / 256; sb++, w += 176) {
        q5_k_group(w, sb, 0, acc0, macc0, x, K, sx, MB);
        q5_k_group(w, sb, 1, acc1, macc1, x, K, sx, MB);
        q5_k_group(w, sb, 2, acc0, macc0, x, K, sx, MB);
        q5_k_group(w, sb, 3, acc1, macc1, x, K, sx, MB);
    }
    ACC_OUT
}

// Q6_K: 256 values of 6 bits (4 in ql, 2 in qh) minus 32, in 16 sub-blocks of 16 with int8 scales.
// In each half of 128, value 32 * quad + l (l < 32) has its low 4 bits in ql[l + 32 * (quad & 1)]
// (low nibble for quad < 2, high otherwise) and its top 2 bits at bit 2 * quad of qh[l].
DP_INLINE __m256 q6_vec(const uint8_t *ql, const uint8_t *qh, const int quad, const int l) {
    const __m256i src = u8x8(ql + l + 32 * (quad & 1)), h = u8x8(qh + l);
    const __m256i nib = quad < 2 ? _mm256_and_si256(src, _mm256_set1_epi32(15)) : _mm256_srli_epi32(src, 4);
    const __m256i top = quad == 0 ? _mm256_slli_epi32(h, 4) : quad == 1 ? _mm256_slli_epi32(h, 2)
                      : quad == 2 ? h : _mm256_srli_epi32(h, 2);
    const __m256i q = _mm256_or_si256(nib, _mm256_and_si256(top, _mm256_set1_epi32(48)));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(32)));
}

DP_INLINE void q6_k_quad(const uint8_t *w, int64_t sb, const int half, const int quad, ACC_ARGS, const float *x, int64_t K, const int MB) {
    (void)macc;
    const uint8_t *ql = w + 64 * half, *qh = w + 128 + 32 * half;
    const int8_t *sc = (const int8_t *)(w + 192) + 8 * half;
    const float d = f16(w + 208);
    __m256 q0 = q6_vec(ql, qh, quad, 0), q1 = q6_vec(ql, qh, quad, 8);
    __m256 q2 = q6_vec(ql, qh, quad, 16), q3 = q6_vec(ql, qh, quad, 24);
    const __m256 d0 = _mm256_set1_ps(d * sc[2 * quad]), d1 = _mm256_set1_ps(d * sc[2 * quad + 1]);
    for (int m = 0; m < MB; m++) {
        const float *xq = x + m * K + sb * 256 + half * 128 + 32 * quad;
        __m256 s0 = FMA(q1, ld(xq + 8), _mm256_mul_ps(q0, ld(xq)));
        __m256 s1 = FMA(q3, ld(xq + 24), _mm256_mul_ps(q2, ld(xq + 16)));
        acc[m] = FMA(s1, d1, FMA(s0, d0, acc[m]));
    }
}

DP_INLINE void q6_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB) {
    (void)sx;
    ACC_DECL
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210)
        for (int half = 0; half < 2; half++) {
            q6_k_quad(w, sb, half, 0, acc0, macc0, x, K, MB);
            q6_k_quad(w, sb, half, 1, acc1, macc1, x, K, MB);
            q6_k_quad(w, sb, half, 2, acc0, macc0, x, K, MB);
            q6_k_quad(w, sb, half, 3, acc1, macc1, x, K, MB);
        }
    ACC_OUT
}

// Q2_K and Q3_K: in each half of 128 values, value 32 j + l (l < 32) has its two low bits at bit 2j
// of the half's qs[l], and the 32 form sub-blocks 2j and 2j + 1 of 16 values (each its own scale).
// lo_bits: the 8 bytes qs[8k .. 8k + 7] of a half as int32 lanes. ds: the 16 sub-block scales as floats.
DP_INLINE __m256 low2(const __m256i lo_bits, const int j) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(lo_bits, 2 * j), _mm256_set1_epi32(3)));
}

// acc += ds[is] * (q0, q1) . x[0 .. 15] + ds[is + 1] * (q2, q3) . x[16 .. 31], for the 32 values at x
DP_INLINE void two_subblocks(__m256 q0, __m256 q1, __m256 q2, __m256 q3, const float *ds, const int is,
                             __m256 *restrict acc, const float *x, int64_t K, const int MB) {
    const __m256 da = _mm256_broadcast_ss(ds + is), db = _mm256_broadcast_ss(ds + is + 1);
    for (int m = 0; m < MB; m++) {
        const float *xq = x + m * K;
        __m256 s0 = FMA(q1, ld(xq + 8), _mm256_mul_ps(q0, ld(xq)));
        __m256 s1 = FMA(q3, ld(xq + 24), _mm256_mul_ps(q2, ld(xq + 16)));
        acc[m] = FMA(s1, db, FMA(s0, da, acc[m]));
    }
}

// The 16 bytes of v as two vectors of 8 floats (is_signed: the bytes are int8)
DP_INLINE void bytes16(const __m128i v, __m256 *lo, __m256 *hi, const int is_signed) {
    const __m128i v8 = _mm_unpackhi_epi64(v, v);
    *lo = _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
    *hi = _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(v8) : _mm256_cvtepu8_epi32(v8));
}

// Q2_K: scales[16] (4-bit scale, 4-bit min above it), qs[64], d, dmin: d * sc * q - dmin * mn per
// sub-block of 16. The mins' part, dmin * sum_s mn_s * (sum of x over sub-block s), takes the sums
// of x per 16 from matmul.c and goes into the same accumulator.
DP_INLINE void q2_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB) {
    ACC_DECL
    float ds[16];
    for (int64_t sb = 0; sb < K / 256; sb++, w += 84) {
        const __m128 dm = half2(w + 80);
        const __m256 d = _mm256_broadcastss_ps(dm), dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
        const __m128i sc = _mm_loadu_si128((const __m128i *)w), nib = _mm_set1_epi8(15);
        __m256 s0, s1, mn0, mn1;
        bytes16(_mm_and_si128(sc, nib), &s0, &s1, 0);
        bytes16(_mm_and_si128(_mm_srli_epi16(sc, 4), nib), &mn0, &mn1, 0);
        _mm256_storeu_ps(ds, _mm256_mul_ps(d, s0));
        _mm256_storeu_ps(ds + 8, _mm256_mul_ps(d, s1));
        mn0 = _mm256_mul_ps(dmin, mn0), mn1 = _mm256_mul_ps(dmin, mn1);
        for (int m = 0; m < MB; m++) {
            const float *s = sx + m * (K / 16) + sb * 16;
            acc1[m] = _mm256_fnmadd_ps(mn1, ld(s + 8), _mm256_fnmadd_ps(mn0, ld(s), acc1[m]));
        }
        for (int half = 0; half < 2; half++) {
            const uint8_t *q = w + 16 + 32 * half;
            const __m256i r0 = u8x8(q), r1 = u8x8(q + 8), r2 = u8x8(q + 16), r3 = u8x8(q + 24);
            const float *xh = x + sb * 256 + 128 * half;
            two_subblocks(low2(r0, 0), low2(r1, 0), low2(r2, 0), low2(r3, 0), ds, 8 * half + 0, acc0, xh, K, MB);
            two_subblocks(low2(r0, 1), low2(r1, 1), low2(r2, 1), low2(r3, 1), ds, 8 * half + 2, acc1, xh + 32, K, MB);
            two_subblocks(low2(r0, 2), low2(r1, 2), low2(r2, 2), low2(r3, 2), ds, 8 * half + 4, acc0, xh + 64, K, MB);
            two_subblocks(low2(r0, 3), low2(r1, 3), low2(r2, 3), low2(r3, 3), ds, 8 * half + 6, acc1, xh + 96, K, MB);
        }
    }
    ACC_OUT
}

// The 32 bytes of v (int8) as four vectors of 8 floats
DP_INLINE void bytes32(const __m256i v, __m256 *q0, __m256 *q1, __m256 *q2, __m256 *q3) {
    bytes16(_mm256_castsi256_si128(v), q0, q1, 1);
    bytes16(_mm256_extracti128_si256(v, 1), q2, q3, 1);
}

// Q3_K: hmask[32], qs[64], scales[12], d: d * (sc - 32) * (q - 4) per sub-block of 16, where q's
// two low bits are as Q2_K's and its third is bit 4 half + j of hmask[l]. The 3-bit codes of 32
// values are put together in bytes (shifts of 16-bit lanes, masked per byte), then widened.
DP_INLINE void q3_k_pair(const __m256i qs, const __m256i hm, const int half, const int j, const float *ds,
                         __m256 *restrict acc, const float *x, int64_t K, const int MB) {
    const int bit = 4 * half + j;  // moved to bit 2
    const __m256i h = bit >= 2 ? _mm256_srli_epi16(hm, bit - 2) : _mm256_slli_epi16(hm, 2 - bit);
    const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), _mm256_set1_epi8(3)),
                                      _mm256_and_si256(h, _mm256_set1_epi8(4)));
    __m256 q0, q1, q2, q3;
    bytes32(_mm256_sub_epi8(q, _mm256_set1_epi8(4)), &q0, &q1, &q2, &q3);
    two_subblocks(q0, q1, q2, q3, ds, 8 * half + 2 * j, acc, x + 128 * half + 32 * j, K, MB);
}

DP_INLINE void q3_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB) {
    (void)sx;
    ACC_DECL
    float ds[16];
    for (int64_t sb = 0; sb < K / 256; sb++, w += 110) {
        uint8_t sc[16];
        scales_q3_k(w + 96, sc);
        const __m256 d = _mm256_set1_ps(f16(w + 108));
        __m256 s0, s1;
        bytes16(_mm_sub_epi8(_mm_loadu_si128((const __m128i *)sc), _mm_set1_epi8(32)), &s0, &s1, 1);
        _mm256_storeu_ps(ds, _mm256_mul_ps(d, s0));
        _mm256_storeu_ps(ds + 8, _mm256_mul_ps(d, s1));
        const __m256i hm = _mm256_loadu_si256((const __m256i *)w);
        const float *xs = x + sb * 256;
        for (int half = 0; half < 2; half++) {
            const __m256i qs = _mm256_loadu_si256((const __m256i *)(w + 32 + 32 * half));
            q3_k_pair(qs, hm, half, 0, ds, acc0, xs, K, MB);
            q3_k_pair(qs, hm, half, 1, ds, acc1, xs, K, MB);
            q3_k_pair(qs, hm, half, 2, ds, acc0, xs, K, MB);
            q3_k_pair(qs, hm, half, 3, ds, acc1, xs, K, MB);
        }
    }
    ACC_OUT
}

// IQ4_NL and IQ4_XS: 32 values from 16 bytes of 4-bit codes (low nibbles the first 16, high the
// next), each code looked up in iq4_values with one byte shuffle per 16
DP_INLINE void iq4_vecs(const uint8_t *qs, __m256 *q0, __m256 *q1, __m256 *q2, __m256 *q3) {
    const __m128i table = _mm_loadu_si128((const __m128i *)iq4_values), nib = _mm_set1_epi8(15);
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    bytes16(_mm_shuffle_epi8(table, _mm_and_si128(b, nib)), q0, q1, 1);
    bytes16(_mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(b, 4), nib)), q2, q3, 1);
}

// IQ4_NL: d, qs[16] per block of 32: d * iq4_values[code]. A tile, as Q8_0.
DP_INLINE void iq4_nl_tile(const uint8_t *w, int64_t rb, int64_t K, const float *x, const float *sx, float *out,
                           const int R, const int MB) {
    (void)sx;
    const int64_t nb = K / 32;
    __m256 acc[4];
    for (int i = 0; i < R * MB; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w + b * R * 18, R * rb, R * 18);
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * rb + b * 18;
            __m256 q0, q1, q2, q3;
            iq4_vecs(blk + 2, &q0, &q1, &q2, &q3);
            const __m256 d = _mm256_broadcastss_ps(half2(blk));
            for (int m = 0; m < MB; m++) acc[r * MB + m] = FMA(dot32(q0, q1, q2, q3, x + m * K + b * 32), d, acc[r * MB + m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) out[r * MAX_MB + m] = hsum8(acc[r * MB + m]);
}

// IQ4_XS: d, scales_h, scales_l[4], qs[128]: IQ4_NL's codes in 8 sub-blocks of 32, each scaled by
// d * (its 6-bit scale - 32); the 8 scales are unpacked together (scale_iq4_xs for one)
DP_INLINE void iq4_xs_sub(const uint8_t *w, int64_t sb, const int ib, const float *dl, ACC_ARGS, const float *x, int64_t K, const int MB) {
    (void)macc;
    __m256 q0, q1, q2, q3;
    iq4_vecs(w + 8 + 16 * ib, &q0, &q1, &q2, &q3);
    const __m256 d = _mm256_broadcast_ss(dl + ib);
    for (int m = 0; m < MB; m++) acc[m] = FMA(dot32(q0, q1, q2, q3, x + m * K + sb * 256 + 32 * ib), d, acc[m]);
}

DP_INLINE void iq4_xs_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB) {
    (void)sx;
    ACC_DECL
    float dl[8];
    const __m256i lo_shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), hi_shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    for (int64_t sb = 0; sb < K / 256; sb++, w += 136) {
        int32_t lo; uint16_t hi; memcpy(&lo, w + 4, 4); memcpy(&hi, w + 2, 2);
        const __m256i l = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(lo), lo_shift), _mm256_set1_epi32(15));
        const __m256i h = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(hi), hi_shift), _mm256_set1_epi32(3));
        const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(l, _mm256_slli_epi32(h, 4)), _mm256_set1_epi32(32));
        _mm256_storeu_ps(dl, _mm256_mul_ps(_mm256_set1_ps(f16(w)), _mm256_cvtepi32_ps(ls)));
        for (int ib = 0; ib < 8; ib += 2) {
            iq4_xs_sub(w, sb, ib, dl, acc0, macc0, x, K, MB);
            iq4_xs_sub(w, sb, ib + 1, dl, acc1, macc1, x, K, MB);
        }
    }
    ACC_OUT
}

// F32, F16 (with F16C), BF16: 32 values at a time, then the tail
DP_INLINE __m256 float8(const uint8_t *p, const int type) {
    if (type == F32) return _mm256_loadu_ps((const float *)p);
#ifdef __F16C__
    if (type == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float float1(const uint8_t *p, const int type) {
    if (type == F32) { float f; memcpy(&f, p, 4); return f; }
    if (type == F16) return f16(p);
    uint32_t b = (uint32_t)(p[0] | (p[1] << 8)) << 16; float f; memcpy(&f, &b, 4); return f;
}

DP_INLINE void float_block(const uint8_t *w, int64_t b, ACC_ARGS, const float *x, int64_t K, const int MB, const int type) {
    (void)macc;
    const int es = type == F32 ? 4 : 2;
    __m256 q0 = float8(w, type), q1 = float8(w + 8 * es, type), q2 = float8(w + 16 * es, type), q3 = float8(w + 24 * es, type);
    for (int m = 0; m < MB; m++) acc[m] = _mm256_add_ps(acc[m], dot32(q0, q1, q2, q3, x + m * K + b * 32));
}

DP_INLINE void float_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, float *out, const int MB, const int type) {
    (void)sx;
    const int es = type == F32 ? 4 : 2;
    ACC_DECL
    BLOCK_LOOP(float_block, K / 32, 32 * es, x, K, MB, type);
    for (int64_t k = K / 32 * 32; k < K; k++) {
        const float v = float1(w + k * es, type);
        for (int m = 0; m < MB; m++) macc0[m] += v * x[m * K + k];
    }
    ACC_OUT
}

// One function per type and tile shape, so that each loop is compiled for fixed R and MB.
#define ROW_KERNEL(name, call)                                                                     \
    static void name(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { \
        switch (MB) {                                                                              \
        case 1: { enum { MBC = 1 }; call; } break;                                                 \
        case 2: { enum { MBC = 2 }; call; } break;                                                 \
        case 3: { enum { MBC = 3 }; call; } break;                                                 \
        default: { enum { MBC = 4 }; call; } break;                                                \
        }                                                                                          \
    }
#define TILE_KERNEL(name, call)                                                                    \
    static void name(const uint8_t *w, int64_t rb, int64_t K, const float *x, const float *sx, int R, int MB, float *out) { \
        switch (R * 8 + MB) {                                                                      \
        case 33: { enum { RC = 4, MBC = 1 }; call; } break;                                        \
        case 18: { enum { RC = 2, MBC = 2 }; call; } break;                                        \
        case 17: { enum { RC = 2, MBC = 1 }; call; } break;                                        \
        case 9: { enum { RC = 1, MBC = 1 }; call; } break;                                         \
        case 10: { enum { RC = 1, MBC = 2 }; call; } break;                                        \
        case 11: { enum { RC = 1, MBC = 3 }; call; } break;                                        \
        default: { enum { RC = 1, MBC = 4 }; call; } break;                                        \
        }                                                                                          \
    }
TILE_KERNEL(tile_q4_0, if (RC == 1 && MBC >= 3) q4_tile_decoded(w, rb, K, x, out, MBC, 0); else q4_tile(w, rb, K, x, sx, out, RC, MBC, 0))
TILE_KERNEL(tile_q4_1, if (RC == 1 && MBC >= 3) q4_tile_decoded(w, rb, K, x, out, MBC, 1); else q4_tile(w, rb, K, x, sx, out, RC, MBC, 1))
TILE_KERNEL(tile_q8_0, q8_0_tile(w, rb, K, x, sx, out, RC, MBC))
TILE_KERNEL(tile_iq4_nl, iq4_nl_tile(w, rb, K, x, sx, out, RC, MBC))
ROW_KERNEL(rows_q5_0, q5_rows(w, K, x, sx, out, MBC, 0))
ROW_KERNEL(rows_q5_1, q5_rows(w, K, x, sx, out, MBC, 1))
ROW_KERNEL(rows_q2_k, q2_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_q3_k, q3_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_q4_k, q4_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_q5_k, q5_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_q6_k, q6_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_iq4_xs, iq4_xs_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_f32, float_rows(w, K, x, sx, out, MBC, F32))
ROW_KERNEL(rows_bf16, float_rows(w, K, x, sx, out, MBC, BF16))
#ifdef __F16C__
ROW_KERNEL(rows_f16, float_rows(w, K, x, sx, out, MBC, F16))
#endif

tile_kernel tiled_kernel(int type) {
    switch (type) {
    case Q4_0: return tile_q4_0;
    case Q4_1: return tile_q4_1;
    case Q8_0: return tile_q8_0;
    case IQ4_NL: return tile_iq4_nl;
    default: return NULL;
    }
}

row_kernel row_kernel_for(int type) {
    switch (type) {
    case Q5_0: return rows_q5_0;
    case Q5_1: return rows_q5_1;
    case Q2_K: return rows_q2_k;
    case Q3_K: return rows_q3_k;
    case Q4_K: return rows_q4_k;
    case Q5_K: return rows_q5_k;
    case Q6_K: return rows_q6_k;
    case IQ4_XS: return rows_iq4_xs;
    case F32: return rows_f32;
    case BF16: return rows_bf16;
#ifdef __F16C__
    case F16: return rows_f16;
#endif
    default: return NULL;
    }
}
#endif
