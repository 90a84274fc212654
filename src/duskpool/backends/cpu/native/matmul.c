// dp_matmul: y = x W^T straight from GGUF blocks. It splits the weight rows over the thread pool
// (dp_set_threads); for the few rows of x of one decode step it takes the per-block sums of x the
// kernels need and gives each range to the SIMD kernel for the type (matmul_x86.c) or, for a type or
// CPU without one, to the scalar matmul (dequant.c: dequantize a row into L1, then dot); for more
// rows (a batch of sessions, a prompt) to gemm.c.
// Results match a dequantize-then-matmul reference up to summation order (and, for Q4_0/Q4_1, one
// rounding of a rearranged x: see q4_tile in matmul_x86.c).
#include <stdlib.h>

#include "native.h"

#ifndef DP_SIMD
tile_kernel tiled_kernel(int type) { (void)type; return NULL; }
row_kernel row_kernel_for(int type) { (void)type; return NULL; }
#endif

// Values per sum of x the type's kernel takes (its offsets are per block of this many), or 0
static int block_sum_width(int type) {
    switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q4_K: case Q5_K: return 32;
    case Q2_K: return 16;
    default: return 0;
    }
}

typedef struct {
    int type, tile_rows, sum_width;  // weight rows per tile call; values per sum in sx
    tile_kernel tile;
    row_kernel row;
    const uint8_t *w;
    int64_t row_bytes, K, M, ldy;
    const float *x, *sx;
    float *y;
    const float *xt;  // x rearranged for gemm.c (many rows of x), or NULL
    int64_t ldm;
} matmul_job;

static void matmul_range(void *ctx, int64_t n0, int64_t n1) {
    const matmul_job *j = ctx;
    if (j->xt) { gemm_range(j->type, j->w, j->row_bytes, n0, n1, j->K, j->xt, j->ldm, j->M, j->y, j->ldy); return; }
    const int64_t K = j->K, M = j->M, ns = j->sum_width ? K / j->sum_width : 0, rb = j->row_bytes;
    if (j->tile || j->row) {
        float out[4 * MAX_MB];
        const int mchunk = MAX_MB / j->tile_rows;
        if (j->tile) {  // the tiles prefetch_ahead (matmul_x86.c) does not cover: the first ones of this range
            const uint8_t *p = j->w + n0 * rb, *end = j->w + (n1 < n0 + PF_TILES * j->tile_rows ? n1 : n0 + PF_TILES * j->tile_rows) * rb;
            for (; p < end; p += 64) __builtin_prefetch(p, 0, 3);
        }
        for (int64_t n = n0; n < n1;) {
            const int R = n1 - n >= j->tile_rows ? j->tile_rows : 1;
            const uint8_t *w = j->w + n * rb;
            for (int64_t m0 = 0; m0 < M; m0 += mchunk) {
                const int mb = M - m0 < mchunk ? (int)(M - m0) : mchunk;
                const float *x = j->x + m0 * K, *sx = j->sx ? j->sx + m0 * ns : NULL;
                if (j->tile) j->tile(w, rb, K, x, sx, R, mb, out);
                else {
                    if (m0 == 0)  // one row at a time: fetch the row two ahead
                        for (int64_t i = 0; i < rb; i += 64) __builtin_prefetch(w + 2 * rb + i, 0, 3);
                    j->row(w, K, x, sx, mb, out);
                }
                for (int r = 0; r < R; r++)
                    for (int m = 0; m < mb; m++) j->y[(m0 + m) * j->ldy + n + r] = out[r * MAX_MB + m];
            }
            n += R;
        }
        return;
    }
    scalar_matmul_range(j->type, j->w, rb, n0, n1, K, j->x, M, j->y, j->ldy);
}

// Below this many weight bytes a call runs on the calling thread alone.
#define PARALLEL_MIN_BYTES 32768

// y[m, n] = sum_k x[m, k] * W[n, k] for n in [n0, n1); W is N rows of row_bytes each.
// y has row stride ldy, so several weights can write into one fused output.
void dp_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
               const float *x, int64_t M, float *y, int64_t ldy) {
    if (n1 <= n0 || M <= 0) return;
    const fp_mode mode = flush_denormals();
    matmul_job job = { .type = type, .tile = tiled_kernel(type), .w = w, .row_bytes = row_bytes, .K = K, .M = M,
                       .ldy = ldy, .x = x, .y = y };
    job.row = job.tile ? NULL : row_kernel_for(type);
    job.tile_rows = job.tile ? (M == 1 ? 4 : M == 2 ? 2 : 1) : 1;
    float *scratch = NULL;
    if (M >= gemm_min_rows(type)) {
        job.ldm = gemm_ldm(M);
        scratch = aligned_alloc(64, (K * job.ldm * sizeof(float) + 63) / 64 * 64);
        gemm_transpose(x, M, K, scratch, job.ldm);
        job.xt = scratch;
    }
    const int width = (job.tile || job.row) && !job.xt ? block_sum_width(type) : 0;
    if (width) {
        const int64_t ns = K / width;
        const int rearrange = type == Q4_0 || type == Q4_1;  // see q4_tile
        scratch = malloc((M * ns + (rearrange ? M * K : 0)) * sizeof(float));
        float *sx = scratch, *xt = scratch + M * ns;
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < ns; b++) {
                const float *p = x + m * K + b * width;
                float s = 0.0f;
                for (int i = 0; i < width; i++) s += p[i];
                sx[m * ns + b] = s;
                if (rearrange) {
                    float *t = xt + m * K + b * 32;
                    for (int i = 0; i < 16; i++) { t[i] = p[i] - p[i + 16] * 0.0625f; t[i + 16] = p[i + 16] * 0.0625f; }
                }
            }
        job.sx = sx;
        job.sum_width = width;
        if (rearrange) job.x = xt;
    }
    const int64_t N = n1 - n0;
    if (N * row_bytes < PARALLEL_MIN_BYTES) matmul_range(&job, n0, n1);
    else parallel_for(matmul_range, &job, n0, n1, (chunk_rows(N) + 11) / 12 * 12, 0);  // whole tiles and panels
    free(scratch);
    restore_fp_mode(mode);
}
