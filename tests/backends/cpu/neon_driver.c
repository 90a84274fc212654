// test_neon.py's driver, built with the CPU backend's C files for aarch64 and run under qemu-aarch64:
//   neon_driver IN OUT
// IN: int32 type, N, K, M, row_bytes; then N weight rows of row_bytes; then x as M x K float32.
// OUT: int32 1 if this build has a SIMD row or tile kernel for the type (0: dp_matmul fell back to the
// scalar matmul); then y from dp_matmul and y from the scalar matmul, each M x N float32.
#include <stdio.h>
#include <stdlib.h>

#include "../../../src/duskpool/backends/cpu/native/native.h"

void dp_init(void);
void dp_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
               const float *x, int64_t M, float *y, int64_t ldy);

static void *read_exactly(FILE *f, size_t n) {
    void *p = malloc(n);
    if (!p || fread(p, 1, n, f) != n) { fprintf(stderr, "neon_driver: short input\n"); exit(1); }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: neon_driver IN OUT\n"); return 2; }
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) { perror("neon_driver"); return 1; }
    int32_t *head = read_exactly(in, 5 * sizeof(int32_t));
    const int type = head[0];
    const int64_t N = head[1], K = head[2], M = head[3], row_bytes = head[4];
    const uint8_t *w = read_exactly(in, N * row_bytes);
    const float *x = read_exactly(in, M * K * sizeof(float));
    float *simd = calloc(M * N, sizeof(float)), *scalar = calloc(M * N, sizeof(float));
    dp_init();
    dp_matmul(type, w, row_bytes, 0, N, K, x, M, simd, N);
    scalar_matmul_range(type, w, row_bytes, 0, N, K, x, M, scalar, N);
    const int32_t has_kernel = tiled_kernel(type) != NULL || row_kernel_for(type) != NULL;
    fwrite(&has_kernel, sizeof has_kernel, 1, out);
    fwrite(simd, sizeof(float), M * N, out);
    fwrite(scalar, sizeof(float), M * N, out);
    return fclose(out) != 0;
}
