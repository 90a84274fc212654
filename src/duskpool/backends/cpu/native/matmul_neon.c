// The NEON kernels of dp_matmul, for 64-bit ARM (Linux boards, a Mac's CPU side): the AVX2 file's
// method on 128-bit vectors. Each weight row is read once and dotted with every row of x block by
// block: d * sum(q * x) (+ m * sum(x) for the types with a min, sum(x) per 32 values from matmul.c),
// the quants widened to fp32 and multiplied in with FMAs. Row kernels only (no tiles): Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS, Q4_K, Q5_K, Q6_K, F32, F16 and BF16; Q2_K and Q3_K stay with the
// scalar matmul.
#include "native.h"

#ifdef DP_NEON
#include <arm_neon.h>

// The 16 bytes of v as four vectors of 4 floats
DP_INLINE void widen_u8(const uint8x16_t v, float32x4_t q[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_u8(vget_high_u8(v));
    q[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    q[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo)));
    q[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    q[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)));
}

DP_INLINE void widen_s8(const int8x16_t v, float32x4_t q[4]) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_s8(vget_high_s8(v));
    q[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    q[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    q[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    q[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

// s + q . x[0 .. 15], lane by lane
DP_INLINE float32x4_t dot16(const float32x4_t q[4], const float *x, float32x4_t s) {
    s = vfmaq_f32(s, q[0], vld1q_f32(x));
    s = vfmaq_f32(s, q[1], vld1q_f32(x + 4));
    s = vfmaq_f32(s, q[2], vld1q_f32(x + 8));
    return vfmaq_f32(s, q[3], vld1q_f32(x + 12));
}

// A block's 32 quants, widened once and dotted with the block's 32 values of each row of x: every
// kernel below is "for each block: quants, scale (and min); then this".
#define ROWS_DECL                                                                                  \
    float32x4_t acc[MAX_MB]; float macc[MAX_MB];                                                   \
    for (int m = 0; m < MB; m++) { acc[m] = vdupq_n_f32(0.0f); macc[m] = 0.0f; }
#define ROWS_OUT for (int m = 0; m < MB; m++) out[m] = vaddvq_f32(acc[m]) + macc[m];

// acc[m] += d * (q0 . x[m, 32b .. 32b + 15] + q1 . x[m, 32b + 16 ..]); macc[m] += mn * sum(x) there
DP_INLINE void block32(const float32x4_t q0[4], const float32x4_t q1[4], float d, float mn, int64_t b,
                       const float *x, int64_t K, const float *sx, float32x4_t *acc, float *macc, const int MB) {
    for (int m = 0; m < MB; m++) {
        const float *xb = x + m * K + b * 32;
        acc[m] = vfmaq_n_f32(acc[m], dot16(q1, xb + 16, dot16(q0, xb, vdupq_n_f32(0.0f))), d);
        if (mn != 0.0f) macc[m] += mn * sx[m * (K / 32) + b];
    }
}

// Q4_0 and Q4_1: byte j holds q_j (low nibble) and q_{16+j} (high). x comes rearranged per block by
// matmul.c as xt = [x_j - x_{16+j} / 16, x_{16+j} / 16] (see q4_tile in matmul_x86.c), so that the
// low nibbles against the first half plus the whole bytes against the second give q . x, no shift.
static void q4_rows(const uint8_t *w, int64_t K, const float *xt, const float *sx, int MB, float *out,
                    const int has_min) {
    ROWS_DECL
    const int size = has_min ? 20 : 18;
    for (int64_t b = 0; b < K / 32; b++, w += size) {
        const uint8x16_t bytes = vld1q_u8(w + (has_min ? 4 : 2));
        float32x4_t lo[4], whole[4];
        widen_u8(vandq_u8(bytes, vdupq_n_u8(15)), lo);
        widen_u8(bytes, whole);
        const float d = f16(w);
        block32(lo, whole, d, has_min ? f16(w + 2) : -8.0f * d, b, xt, K, sx, acc, macc, MB);
    }
    ROWS_OUT
}

// 16 at byte j where bit j of the 16 bits at h is set (a fifth bit, as Q5_0 and Q5_K store it)
static const uint8_t bit_j[16] = { 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128 };
DP_INLINE uint8x16_t fifth_bits(const uint8_t *h) {
    const uint8x16_t bytes = vcombine_u8(vdup_n_u8(h[0]), vdup_n_u8(h[1]));
    return vandq_u8(vtstq_u8(bytes, vld1q_u8(bit_j)), vdupq_n_u8(16));
}

// Q5_0 and Q5_1: Q4's nibbles plus bit j of qh[4] (value j), value q * d + m (Q5_0: m = -16 d)
static void q5_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out,
                    const int has_min) {
    ROWS_DECL
    const int size = has_min ? 24 : 22;
    for (int64_t b = 0; b < K / 32; b++, w += size) {
        const uint8_t *qh = w + (has_min ? 4 : 2);
        const uint8x16_t bytes = vld1q_u8(qh + 4);
        float32x4_t lo[4], hi[4];
        widen_u8(vorrq_u8(vandq_u8(bytes, vdupq_n_u8(15)), fifth_bits(qh)), lo);
        widen_u8(vorrq_u8(vshrq_n_u8(bytes, 4), fifth_bits(qh + 2)), hi);
        const float d = f16(w);
        block32(lo, hi, d, has_min ? f16(w + 2) : -16.0f * d, b, x, K, sx, acc, macc, MB);
    }
    ROWS_OUT
}

// Q8_0: d, then 32 int8: d * q
static void q8_0_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) {
    ROWS_DECL
    for (int64_t b = 0; b < K / 32; b++, w += 34) {
        float32x4_t q0[4], q1[4];
        widen_s8(vld1q_s8((const int8_t *)w + 2), q0);
        widen_s8(vld1q_s8((const int8_t *)w + 18), q1);
        block32(q0, q1, f16(w), 0.0f, b, x, K, sx, acc, macc, MB);
    }
    ROWS_OUT
}

// IQ4_NL: d, then 16 bytes of 4-bit codes (low nibbles the first 16 values): d * iq4_values[code],
// one table lookup per 16 codes
static void iq4_nl_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) {
    ROWS_DECL
    const int8x16_t table = vld1q_s8(iq4_values);
    for (int64_t b = 0; b < K / 32; b++, w += 18) {
        const uint8x16_t codes = vld1q_u8(w + 2);
        float32x4_t lo[4], hi[4];
        widen_s8(vqtbl1q_s8(table, vandq_u8(codes, vdupq_n_u8(15))), lo);
        widen_s8(vqtbl1q_s8(table, vshrq_n_u8(codes, 4)), hi);
        block32(lo, hi, f16(w), 0.0f, b, x, K, sx, acc, macc, MB);
    }
    ROWS_OUT
}

// IQ4_XS: d, scales_h, scales_l[4], qs[128]: IQ4_NL's codes in 8 sub-blocks of 32, each scaled by
// d * (its 6-bit scale - 32)
static void iq4_xs_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) {
    ROWS_DECL
    const int8x16_t table = vld1q_s8(iq4_values);
    for (int64_t sb = 0; sb < K / 256; sb++, w += 136) {
        const float d = f16(w);
        for (int ib = 0; ib < 8; ib++) {
            const uint8x16_t codes = vld1q_u8(w + 8 + 16 * ib);
            float32x4_t lo[4], hi[4];
            widen_s8(vqtbl1q_s8(table, vandq_u8(codes, vdupq_n_u8(15))), lo);
            widen_s8(vqtbl1q_s8(table, vshrq_n_u8(codes, 4)), hi);
            block32(lo, hi, d * (scale_iq4_xs(w, ib) - 32), 0.0f, sb * 8 + ib, x, K, sx, acc, macc, MB);
        }
    }
    ROWS_OUT
}

// Q4_K and Q5_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min: d * sc * q - dmin * mn.
// Group g (64 values) has 32 bytes of nibbles: low nibbles sub-block 2g, high 2g + 1; Q5_K adds bit 2g
// (low) or 2g + 1 (high) of qh[l] as the fifth bit of value l.
static void q45_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out,
                       const int five) {
    ROWS_DECL
    const int size = five ? 176 : 144;
    for (int64_t sb = 0; sb < K / 256; sb++, w += size) {
        const float d = f16(w), dmin = f16(w + 2);
        const uint8_t *qh = w + 16, *ql = w + (five ? 48 : 16);
        for (int g = 0; g < 4; g++) {
            uint8_t sc1, m1, sc2, m2;
            scale_min_k4(2 * g, w + 4, &sc1, &m1);
            scale_min_k4(2 * g + 1, w + 4, &sc2, &m2);
            for (int h = 0; h < 2; h++) {  // values 16 h .. 16 h + 15 of both sub-blocks
                const uint8x16_t bytes = vld1q_u8(ql + 32 * g + 16 * h);
                uint8x16_t lo = vandq_u8(bytes, vdupq_n_u8(15)), hi = vshrq_n_u8(bytes, 4);
                if (five) {
                    const uint8x16_t bits = vld1q_u8(qh + 16 * h);
                    lo = vorrq_u8(lo, vandq_u8(vtstq_u8(bits, vdupq_n_u8(1 << 2 * g)), vdupq_n_u8(16)));
                    hi = vorrq_u8(hi, vandq_u8(vtstq_u8(bits, vdupq_n_u8(2 << 2 * g)), vdupq_n_u8(16)));
                }
                float32x4_t ql4[4], qh4[4];
                widen_u8(lo, ql4);
                widen_u8(hi, qh4);
                const int64_t b = sb * 8 + 2 * g;
                for (int m = 0; m < MB; m++) {
                    const float *xb = x + m * K + b * 32 + 16 * h;
                    acc[m] = vfmaq_n_f32(acc[m], dot16(ql4, xb, vdupq_n_f32(0.0f)), d * sc1);
                    acc[m] = vfmaq_n_f32(acc[m], dot16(qh4, xb + 32, vdupq_n_f32(0.0f)), d * sc2);
                }
            }
            for (int m = 0; m < MB; m++)  // the mins, once per sub-block
                macc[m] -= dmin * (m1 * sx[m * (K / 32) + sb * 8 + 2 * g] + m2 * sx[m * (K / 32) + sb * 8 + 2 * g + 1]);
        }
    }
    ROWS_OUT
}

// Q6_K: ql[128], qh[64], scales[16] (int8), d: d * sc * (q - 32) per sub-block of 16. In each half
// of 128 values, value 32 quad + l (l < 32) has its low 4 bits in ql[l + 32 (quad & 1)] (low nibble
// for quad < 2, high otherwise) and its top 2 bits at bit 2 quad of qh[l].
static void q6_k_rows(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) {
    (void)sx;
    ROWS_DECL
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        const float d = f16(w + 208);
        for (int half = 0; half < 2; half++)
            for (int quad = 0; quad < 4; quad++)
                for (int h = 0; h < 2; h++) {  // values 32 quad + 16 h .. + 15: sub-block 8 half + 2 quad + h
                    const uint8x16_t low = vld1q_u8(w + 64 * half + 32 * (quad & 1) + 16 * h);
                    const uint8x16_t top = vld1q_u8(w + 128 + 32 * half + 16 * h);
                    const uint8x16_t nib = quad < 2 ? vandq_u8(low, vdupq_n_u8(15)) : vshrq_n_u8(low, 4);
                    const uint8x16_t q = vorrq_u8(nib, vshlq_n_u8(vandq_u8(vshlq_u8(top, vdupq_n_s8(-2 * quad)), vdupq_n_u8(3)), 4));
                    float32x4_t q4[4];
                    widen_s8(vsubq_s8(vreinterpretq_s8_u8(q), vdupq_n_s8(32)), q4);
                    const float ds = d * sc[8 * half + 2 * quad + h];
                    for (int m = 0; m < MB; m++)
                        acc[m] = vfmaq_n_f32(acc[m], dot16(q4, x + m * K + sb * 256 + 128 * half + 32 * quad + 16 * h,
                                                           vdupq_n_f32(0.0f)), ds);
                }
    }
    ROWS_OUT
}

// F32, F16, BF16: 4 values at a time as floats, then the tail (K need not be a multiple of 4)
DP_INLINE float32x4_t float4(const uint8_t *p, const int type) {
    if (type == F32) return vld1q_f32((const float *)p);
    const uint16x4_t h = vld1_u16((const uint16_t *)p);
    if (type == F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(h), 16));
}

static inline float float1(const uint8_t *p, const int type) {
    if (type == F32) { float f; memcpy(&f, p, 4); return f; }
    if (type == F16) return f16(p);
    const uint32_t b = (uint32_t)(p[0] | (p[1] << 8)) << 16; float f; memcpy(&f, &b, 4); return f;
}

static void float_rows(const uint8_t *w, int64_t K, const float *x, int MB, float *out, const int type) {
    ROWS_DECL
    const int size = type == F32 ? 4 : 2;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const float32x4_t v = float4(w + k * size, type);
        for (int m = 0; m < MB; m++) acc[m] = vfmaq_f32(acc[m], v, vld1q_f32(x + m * K + k));
    }
    for (; k < K; k++)
        for (int m = 0; m < MB; m++) macc[m] += float1(w + k * size, type) * x[m * K + k];
    ROWS_OUT
}

static void rows_f32(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { (void)sx; float_rows(w, K, x, MB, out, F32); }
static void rows_f16(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { (void)sx; float_rows(w, K, x, MB, out, F16); }
static void rows_bf16(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { (void)sx; float_rows(w, K, x, MB, out, BF16); }
static void rows_q4_0(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { q4_rows(w, K, x, sx, MB, out, 0); }
static void rows_q4_1(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { q4_rows(w, K, x, sx, MB, out, 1); }
static void rows_q5_0(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { q5_rows(w, K, x, sx, MB, out, 0); }
static void rows_q5_1(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { q5_rows(w, K, x, sx, MB, out, 1); }
static void rows_q4_k(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { q45_k_rows(w, K, x, sx, MB, out, 0); }
static void rows_q5_k(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out) { q45_k_rows(w, K, x, sx, MB, out, 1); }

tile_kernel tiled_kernel(int type) { (void)type; return NULL; }

row_kernel row_kernel_for(int type) {
    switch (type) {
    case Q4_0: return rows_q4_0;
    case Q4_1: return rows_q4_1;
    case Q5_0: return rows_q5_0;
    case Q5_1: return rows_q5_1;
    case Q8_0: return q8_0_rows;
    case IQ4_NL: return iq4_nl_rows;
    case Q4_K: return rows_q4_k;
    case Q5_K: return rows_q5_k;
    case Q6_K: return q6_k_rows;
    case IQ4_XS: return iq4_xs_rows;
    case F32: return rows_f32;
    case F16: return rows_f16;
    case BF16: return rows_bf16;
    default: return NULL;
    }
}
#endif
