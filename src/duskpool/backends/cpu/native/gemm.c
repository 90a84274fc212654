// dp_matmul's path for many rows of x (a batch of sessions' decode steps, a chunk of a prompt): each
// weight row is decoded to float once for all the rows of x, not once per MAX_MB of them as the fused
// kernels do, and the products are plain fp32 FMAs, none spent on scales. A thread takes a range of
// weight rows, NR at a time: it decodes them into a panel (NR x K floats, in L1 or L2), then runs every
// tile of MT rows of x against it, with the NR x MT results in registers for the whole of K (blocking K
// cost more than it saved: each block's partial sums go back to memory). x is rearranged once per
// call so that MT rows are one vector per k. Vectors are GCC/Clang vector extensions, so the source
// serves AVX2, AVX-512 (as 256-bit vectors, with 32 registers) and NEON alike.
// Results: the dot products of x with the dequantized weight, summed in another order.
#include <stdlib.h>

#include "native.h"

#define VL 8         // floats per vector
#define MT (2 * VL)  // rows of x per tile
#define NR 6         // weight rows per panel: 2 NR accumulators + 2 vectors of x + one weight = 15 registers

typedef float f8 __attribute__((vector_size(4 * VL)));
typedef float f8u __attribute__((vector_size(4 * VL), aligned(4)));  // at any float's address
typedef uint8_t u8x8 __attribute__((vector_size(8)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

DP_INLINE void store8(float *y, f8 v) { *(f8u *)y = v; }
DP_INLINE u8x8 load_u8(const uint8_t *p) { u8x8 v; memcpy(&v, p, 8); return v; }
// bytes to floats through int32 (a direct conversion compiles to one scalar conversion per value with GCC 12)
DP_INLINE f8 floats(u8x8 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x8), f8); }

// A row of the 4-bit types most weights are stored in and Q6_K (Q4_K_M's other type), 8 values at a time;
// dequantize_row for the others (Q8_0's loop vectorizes as it is)
static void decode_q4(const uint8_t *x, float *y, int64_t K, int has_min) {  // Q4_0, Q4_1
    for (int64_t b = 0; b < K / 32; b++, x += has_min ? 20 : 18, y += 32) {
        const float d = f16(x), m = has_min ? f16(x + 2) : -8.0f * d;
        const uint8_t *qs = x + (has_min ? 4 : 2);
        for (int h = 0; h < 16; h += 8) {
            const u8x8 q = load_u8(qs + h);
            store8(y + h, floats(q & 15) * d + m);
            store8(y + 16 + h, floats(q >> 4) * d + m);
        }
    }
}

static void decode_q4_k(const uint8_t *x, float *y, int64_t K) {
    for (int64_t b = 0; b < K / 256; b++, x += 144) {
        const float d = f16(x), dmin = f16(x + 2);
        const uint8_t *q = x + 16;
        for (int g = 0; g < 4; g++, q += 32, y += 64) {  // 64 values: the low nibbles of 32 bytes, then the high
            uint8_t sc, m;
            scale_min_k4(2 * g, x + 4, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(2 * g + 1, x + 4, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l += 8) {
                const u8x8 v = load_u8(q + l);
                store8(y + l, d1 * floats(v & 15) - m1);
                store8(y + 32 + l, d2 * floats(v >> 4) - m2);
            }
        }
    }
}

static void decode_q6_k(const uint8_t *x, float *y, int64_t K) {
    for (int64_t b = 0; b < K / 256; b++, x += 210) {
        const uint8_t *ql = x, *qh = x + 128;
        const int8_t *sc = (const int8_t *)(x + 192);
        const float d = f16(x + 208);
        for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8)
            for (int l = 0; l < 32; l += 8) {  // value l + 32 i: 4 bits of ql, 2 of qh, minus 32, times its scale
                const u8x8 lo = load_u8(ql + l), hi = load_u8(ql + l + 32), h = load_u8(qh + l);
                const int is = l / 16;
                store8(y + l, d * sc[is] * (floats((lo & 15) | ((h & 3) << 4)) - 32.0f));
                store8(y + l + 32, d * sc[is + 2] * (floats((hi & 15) | (((h >> 2) & 3) << 4)) - 32.0f));
                store8(y + l + 64, d * sc[is + 4] * (floats((lo >> 4) | (((h >> 4) & 3) << 4)) - 32.0f));
                store8(y + l + 96, d * sc[is + 6] * (floats((hi >> 4) | (((h >> 6) & 3) << 4)) - 32.0f));
            }
    }
}

static void decode(int type, const uint8_t *x, float *y, int64_t K) {
    switch (type) {
    case Q4_0: decode_q4(x, y, K, 0); return;
    case Q4_1: decode_q4(x, y, K, 1); return;
    case Q4_K: decode_q4_k(x, y, K); return;
    case Q6_K: decode_q6_k(x, y, K); return;
    default: dequantize_row(type, x, y, K);
    }
}

// From this many rows of x a call comes here rather than to the fused kernels: where decoding a row costs
// what the fused kernels spend on about that many rows (2-core AVX2, 3072 x 1024 weights; a type that
// dequantize_row decodes slowly, one value at a time, needs more)
int gemm_min_rows(int type) {
    switch (type) {
    case Q4_0: case Q4_1: case Q4_K: case Q5_K: case F32: case BF16: return 8;
    case F16: case IQ4_NL: case IQ4_XS: return 24;
    default: return 12;
    }
}

int64_t gemm_ldm(int64_t M) { return (M + VL - 1) / VL * VL; }

// x [M, K] for gemm_range, in tiles of MT rows (the last may be VL), each transposed: the rows of a tile
// at one k are contiguous. ldm = gemm_ldm(M) floats per k; zeros past M.
void gemm_transpose(const float *x, int64_t M, int64_t K, float *xt, int64_t ldm) {
    memset(xt, 0, K * ldm * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        const int64_t first = m / MT * MT, width = ldm - first < MT ? ldm - first : MT;
        float *tile = xt + first * K + m % MT;
        for (int64_t k = 0; k < K; k++) tile[k * width] = x[m * K + k];
    }
}

// y[m, n] = sum_k xt[k, m] * p[n, k] for the mv * VL rows of x of one tile (those below M) and nr weight
// rows: each weight broadcast against VL rows of x at once, so each accumulator is a column of y
DP_INLINE void tile(const float *xt, const float *p, int64_t K, float *y, int64_t ldy, int64_t M, const int mv,
                    const int nr) {
    f8 acc[NR][2];
    for (int n = 0; n < nr; n++)
        for (int v = 0; v < mv; v++) acc[n][v] = (f8){0};
    for (int64_t k = 0; k < K; k++) {
        f8 x[2];
        for (int v = 0; v < mv; v++) x[v] = *(const f8 *)(xt + (k * mv + v) * VL);
        for (int n = 0; n < nr; n++) {
            const float w = p[n * K + k];
            for (int v = 0; v < mv; v++) acc[n][v] += x[v] * w;
        }
    }
    for (int v = 0; v < mv; v++)
        for (int i = 0; i < VL && VL * v + i < M; i++)
            for (int n = 0; n < nr; n++) y[(VL * v + i) * ldy + n] = acc[n][v][i];
}

// tile() compiled for each shape, so that its loops unroll into registers
#define SHAPE(nr) case nr: if (mv == 2) tile(xt, p, K, y, ldy, M, 2, nr); else tile(xt, p, K, y, ldy, M, 1, nr); return;
static void any_tile(const float *xt, const float *p, int64_t K, float *y, int64_t ldy, int64_t M, int mv, int nr) {
    switch (nr) { SHAPE(6) SHAPE(5) SHAPE(4) SHAPE(3) SHAPE(2) SHAPE(1) }
}

void gemm_range(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K, const float *xt,
                int64_t ldm, int64_t M, float *y, int64_t ldy) {
    float *panel = aligned_alloc(64, (NR * K * sizeof(float) + 63) / 64 * 64);
    for (int64_t nb = n0; nb < n1; nb += NR) {
        const int nr = n1 - nb < NR ? (int)(n1 - nb) : NR;
        for (int n = 0; n < nr; n++) decode(type, w + (nb + n) * row_bytes, panel + n * K, K);
        for (int64_t m = 0; m < M; m += MT)
            any_tile(xt + m * K, panel, K, y + m * ldy + nb, ldy, M - m, ldm - m < MT ? 1 : 2, nr);
    }
    free(panel);
}
