// GGUF block formats in plain C: a row of any type into floats (dp_dequantize_rows, the embedding
// lookup), and the scalar matmul that dots such a row with x wherever no SIMD kernel covers a type.
// Block layouts follow ggml-common.h.
#include <stdlib.h>

#include "native.h"

float f16_table[65536];

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) { bits = sign; }
        else {  // subnormal: renormalize
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (mant << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (mant << 13); }
    float f; memcpy(&f, &bits, 4); return f;
}

void init_f16_table(void) {
    for (uint32_t i = 0; i < 65536; i++) f16_table[i] = half_to_float((uint16_t)i);
}

// One row of K weights (K a multiple of the block size) into y.
void dequantize_row(int type, const uint8_t *restrict x, float *restrict y, int64_t K) {
    switch (type) {
    case F32: memcpy(y, x, K * 4); return;
    case F16: for (int64_t i = 0; i < K; i++) y[i] = f16(x + 2 * i); return;
    case BF16: for (int64_t i = 0; i < K; i++) { uint32_t b = (uint32_t)(x[2*i] | (x[2*i+1] << 8)) << 16; memcpy(y + i, &b, 4); } return;
    case Q4_0:
        for (int64_t b = 0; b < K / 32; b++, x += 18, y += 32) {
            float d = f16(x); const uint8_t *qs = x + 2;
            for (int j = 0; j < 16; j++) { y[j] = ((qs[j] & 0xF) - 8) * d; y[j + 16] = ((qs[j] >> 4) - 8) * d; }
        }
        return;
    case Q4_1:
        for (int64_t b = 0; b < K / 32; b++, x += 20, y += 32) {
            float d = f16(x), m = f16(x + 2); const uint8_t *qs = x + 4;
            for (int j = 0; j < 16; j++) { y[j] = (qs[j] & 0xF) * d + m; y[j + 16] = (qs[j] >> 4) * d + m; }
        }
        return;
    case Q5_0:
    case Q5_1: {
        const int has_min = type == Q5_1, size = has_min ? 24 : 22;
        for (int64_t b = 0; b < K / 32; b++, x += size, y += 32) {
            float d = f16(x), m = has_min ? f16(x + 2) : -16.0f * d;
            const uint8_t *qhp = x + (has_min ? 4 : 2), *qs = qhp + 4;
            uint32_t qh; memcpy(&qh, qhp, 4);
            for (int j = 0; j < 16; j++) {
                int lo = (qs[j] & 0xF) | (((qh >> j) << 4) & 0x10), hi = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
                y[j] = lo * d + m; y[j + 16] = hi * d + m;
            }
        }
        return;
    }
    case Q8_0:
        for (int64_t b = 0; b < K / 32; b++, x += 34, y += 32) {
            float d = f16(x); const int8_t *qs = (const int8_t *)(x + 2);
            for (int j = 0; j < 32; j++) y[j] = qs[j] * d;
        }
        return;
    case Q2_K:  // scales[16] (4-bit scale | 4-bit min << 4 per 16 values), qs[64], d, dmin
        for (int64_t b = 0; b < K / 256; b++, x += 84) {
            const uint8_t *sc = x, *q = x + 16;
            float d = f16(x + 80), dmin = f16(x + 82);
            for (int half = 0; half < 2; half++, q += 32)  // value 32 j + l of a half: bits 2j of q[l]
                for (int j = 0; j < 4; j++, sc += 2)
                    for (int k = 0; k < 2; k++) {
                        float dl = d * (sc[k] & 0xF), ml = dmin * (sc[k] >> 4);
                        for (int l = 16 * k; l < 16 * k + 16; l++) *y++ = dl * ((q[l] >> 2 * j) & 3) - ml;
                    }
        }
        return;
    case Q3_K:  // hmask[32] (the third bit), qs[64] (two bits), scales[12] (16 of 6 bits), d
        for (int64_t b = 0; b < K / 256; b++, x += 110) {
            const uint8_t *hm = x, *q = x + 32;
            uint8_t sc[16]; scales_q3_k(x + 96, sc);
            float d = f16(x + 108);
            for (int half = 0, is = 0; half < 2; half++, q += 32)  // as Q2_K, third bit 4 half + j of hm[l]
                for (int j = 0; j < 4; j++)
                    for (int k = 0; k < 2; k++, is++) {
                        float dl = d * (sc[is] - 32);
                        for (int l = 16 * k; l < 16 * k + 16; l++)
                            *y++ = dl * (((q[l] >> 2 * j) & 3) - (hm[l] >> (4 * half + j) & 1 ? 0 : 4));
                    }
        }
        return;
    case IQ4_NL:
        for (int64_t b = 0; b < K / 32; b++, x += 18, y += 32) {
            float d = f16(x), t[16]; const uint8_t *qs = x + 2;
            for (int i = 0; i < 16; i++) t[i] = d * iq4_values[i];  // the block's 16 values, then lookups
            for (int j = 0; j < 16; j++) { y[j] = t[qs[j] & 0xF]; y[j + 16] = t[qs[j] >> 4]; }
        }
        return;
    case IQ4_XS:  // d, scales_h, scales_l[4], qs[128]: IQ4_NL's codes in 8 sub-blocks of 32 with 6-bit scales
        for (int64_t b = 0; b < K / 256; b++, x += 136) {
            float d = f16(x); const uint8_t *qs = x + 8;
            for (int ib = 0; ib < 8; ib++, qs += 16, y += 32) {
                float dl = d * (scale_iq4_xs(x, ib) - 32), t[16];
                for (int i = 0; i < 16; i++) t[i] = dl * iq4_values[i];
                for (int j = 0; j < 16; j++) { y[j] = t[qs[j] & 0xF]; y[j + 16] = t[qs[j] >> 4]; }
            }
        }
        return;
    case Q4_K:
        for (int64_t b = 0; b < K / 256; b++, x += 144) {
            float d = f16(x), dmin = f16(x + 2); const uint8_t *scales = x + 4, *q = x + 16;
            for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
                uint8_t sc, m; scale_min_k4(is, scales, &sc, &m); float d1 = d * sc, m1 = dmin * m;
                scale_min_k4(is + 1, scales, &sc, &m); float d2 = d * sc, m2 = dmin * m;
                for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
                for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
            }
        }
        return;
    case Q5_K:
        for (int64_t b = 0; b < K / 256; b++, x += 176) {
            float d = f16(x), dmin = f16(x + 2); const uint8_t *scales = x + 4, *qh = x + 16, *ql = x + 48;
            uint8_t u1 = 1, u2 = 2;
            for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
                uint8_t sc, m; scale_min_k4(is, scales, &sc, &m); float d1 = d * sc, m1 = dmin * m;
                scale_min_k4(is + 1, scales, &sc, &m); float d2 = d * sc, m2 = dmin * m;
                for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
                for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            }
        }
        return;
    case Q6_K:
        for (int64_t b = 0; b < K / 256; b++, x += 210) {
            const uint8_t *ql = x, *qh = x + 128; const int8_t *sc = (const int8_t *)(x + 192);
            float d = f16(x + 208);
            for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
                for (int l = 0; l < 32; l++) {
                    int is = l / 16;
                    int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                    int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    y[l] = d * sc[is] * q1; y[l + 32] = d * sc[is + 2] * q2;
                    y[l + 64] = d * sc[is + 4] * q3; y[l + 96] = d * sc[is + 6] * q4;
                }
            }
        }
        return;
    }
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t K) {
    // 16 independent lanes: the compiler keeps them in vector registers.
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[k + j] * b[k + j];
    float s = 0;
    for (; k < K; k++) s += a[k] * b[k];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

void scalar_matmul_range(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                         const float *x, int64_t M, float *y, int64_t ldy) {
    float *row = malloc(K * sizeof(float));
    for (int64_t n = n0; n < n1; n++) {
        dequantize_row(type, w + n * row_bytes, row, K);
        for (int64_t m = 0; m < M; m++) y[m * ldy + n] = dot(row, x + m * K, K);
    }
    free(row);
}

typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_bytes, K;
    const int64_t *rows;
    float *out;
} rows_job;

static void rows_range(void *ctx, int64_t i0, int64_t i1) {
    const rows_job *j = ctx;
    for (int64_t i = i0; i < i1; i++) dequantize_row(j->type, j->w + j->rows[i] * j->row_bytes, j->out + i * j->K, j->K);
}

// out[i, :] = W[rows[i], :]
void dp_dequantize_rows(int type, const uint8_t *w, int64_t row_bytes, const int64_t *rows, int64_t n_rows,
                        int64_t K, float *out) {
    rows_job job = { type, w, row_bytes, K, rows, out };
    if (n_rows * K < 65536) rows_range(&job, 0, n_rows);
    else parallel_for(rows_range, &job, 0, n_rows, chunk_rows(n_rows), 1);
}
