// What the CPU backend's C files share. native/__init__.py compiles every .c here into one library:
//   threads.c     the thread pool (parallel_for), dp_set_threads, dp_get_threads, dp_init
//   dequant.c     GGUF blocks in plain C: a row of any type into floats, dp_dequantize_rows, and the
//                 scalar matmul (dequantize a weight row into L1, then dot it with each row of x)
//   matmul.c      dp_matmul: per-block sums of x, rows split over the pool, each range of rows given
//                 to this CPU's SIMD kernel for the type or else to the scalar matmul, or for many
//                 rows of x to gemm.c
//   gemm.c        many rows of x: weight rows decoded to float once, then register-tiled fp32 FMAs
//   matmul_x86.c  the AVX2/FMA kernels, built where the compiler targets AVX2 and FMA
//   matmul_neon.c the NEON kernels, built for 64-bit ARM (tests/backends/cpu/test_neon.py runs them
//                 under qemu-aarch64 against the scalar matmul)
//   ops.c         the per-token ops of a layer (dp_rms_norm, dp_rope, dp_attention, ...)
// Matmul and row lookup work straight from GGUF blocks, so quantized weights stay packed in memory;
// block layouts follow ggml-common.h. All arithmetic is fp32.
//
// SIMD kernels plug in per instruction set: a file whose body is guarded by its macro below defines
// tiled_kernel() and row_kernel_for() (declared at the end), returning NULL for the types it leaves
// to the scalar matmul: matmul_x86.c under DP_AVX2, matmul_neon.c under DP_NEON. Where no SIMD file
// applies (no AVX2, or a build without -march=native), matmul.c's fallbacks return NULL for every type.
#ifndef DUSKPOOL_NATIVE_H
#define DUSKPOOL_NATIVE_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#define DP_AVX2 1  // matmul_x86.c
#define DP_SIMD 1
#elif defined(__ARM_NEON) && defined(__aarch64__)  // 64-bit ARM: its NEON has the FMAs and sums used
#define DP_NEON 1  // matmul_neon.c
#define DP_SIMD 1
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

// Denormal floats flushed to zero on this thread (x86: FTZ and DAZ; ARM: FZ), returning the mode to restore. An x86
// core takes a microcode assist of ~100 cycles for each operation on a denormal, and real activations make them:
// attention's weights of positions scored far below a row's best fall under 2^-126. Entry points that compute
// flush for the length of the call (the caller's thread is Python's), the pool's workers for good. Values below
// 1.2e-38 become 0: nothing any tolerance sees.
typedef uint64_t fp_mode;
static inline fp_mode flush_denormals(void) {
#if defined(__x86_64__) || defined(__i386__)
    const fp_mode mode = _mm_getcsr();
    _mm_setcsr((unsigned)mode | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
    return mode;
#elif defined(__aarch64__)
    fp_mode mode;
    __asm__ volatile("mrs %0, fpcr" : "=r"(mode));
    __asm__ volatile("msr fpcr, %0" : : "r"(mode | (1ull << 24)));  // FZ
    return mode;
#else
    return 0;
#endif
}
static inline void restore_fp_mode(fp_mode mode) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr((unsigned)mode);
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(mode));
#else
    (void)mode;
#endif
}

// Names shared between the files stay out of the library's exported symbols (only dp_* are).
#define DP_HIDDEN __attribute__((visibility("hidden")))
#define DP_INLINE static inline __attribute__((always_inline))

// GGML type ids of the weights we read
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11,
       Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30 };

// ---------------------------------------------------------------------------------------------
// Block formats (dequant.c)

DP_HIDDEN extern float f16_table[65536];  // half -> float for every bit pattern, as ggml does
DP_HIDDEN void init_f16_table(void);      // by dp_init

static inline float f16(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return f16_table[h]; }

// Q4_K and Q5_K: sub-block j's 6-bit scale and min from the 12 packed bytes at q
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

// Q3_K: the 16 6-bit scales (before their -32) packed in 12 bytes at p: sub-block j's low 4 bits
// are nibble j / 8 of byte j % 8, its top 2 bits bits 2 (j / 4) of byte 8 + j % 4 (ggml's unpacking)
static inline void scales_q3_k(const uint8_t *p, uint8_t sc[16]) {
    uint32_t a[4]; memcpy(a, p, 12);
    const uint32_t m4 = 0x0f0f0f0f, m2 = 0x03030303, t = a[2];
    a[2] = ((a[0] >> 4) & m4) | (((t >> 4) & m2) << 4);
    a[3] = ((a[1] >> 4) & m4) | (((t >> 6) & m2) << 4);
    a[0] = (a[0] & m4) | ((t & m2) << 4);
    a[1] = (a[1] & m4) | (((t >> 2) & m2) << 4);
    memcpy(sc, a, 16);
}

// IQ4_NL and IQ4_XS: a 4-bit code indexes these 16 values (non-uniform, denser near zero)
static const int8_t iq4_values[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };

// IQ4_XS: sub-block ib's 6-bit scale (before its -32): 4 bits from scales_l at w + 4, 2 from scales_h at w + 2
static inline int scale_iq4_xs(const uint8_t *w, int ib) {
    const int h = w[2] | (w[3] << 8);
    return ((w[4 + ib / 2] >> 4 * (ib % 2)) & 0xF) | (((h >> 2 * ib) & 3) << 4);
}

// K values of a row (K a multiple of the type's block size) from its blocks at x into floats at y
DP_HIDDEN void dequantize_row(int type, const uint8_t *restrict x, float *restrict y, int64_t K);

// y[m, n] = sum_k x[m, k] * W[n, k] for n in [n0, n1), in plain C: each row of W dequantized, then
// dotted with every row of x. W is rows of row_bytes; y has row stride ldy.
DP_HIDDEN void scalar_matmul_range(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                                   const float *x, int64_t M, float *y, int64_t ldy);

// The same for many rows of x (gemm.c): each weight row decoded to float once for all of them. From
// gemm_min_rows(type) rows of x on; x rearranged first by gemm_transpose, ldm = gemm_ldm(M) floats per k.
DP_HIDDEN int gemm_min_rows(int type);
DP_HIDDEN int64_t gemm_ldm(int64_t M);
DP_HIDDEN void gemm_transpose(const float *x, int64_t M, int64_t K, float *xt, int64_t ldm);
DP_HIDDEN void gemm_range(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                          const float *xt, int64_t ldm, int64_t M, float *y, int64_t ldy);

// ---------------------------------------------------------------------------------------------
// Thread pool (threads.c)

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

// fn(ctx, a, b) over [begin, end) in chunks of `chunk` rows, on all threads; returns when all are
// done. nap: let the workers sleep right after (the caller runs torch's own threads next).
DP_HIDDEN void parallel_for(range_fn fn, void *ctx, int64_t begin, int64_t end, int64_t chunk, int nap);
DP_HIDDEN int64_t chunk_rows(int64_t n);  // rows per chunk for n rows: a few chunks per thread

// ---------------------------------------------------------------------------------------------
// SIMD kernels (matmul_x86.c, matmul_neon.c; matmul.c returns NULL where none is built)
// Row kernels: one weight row against MB <= MAX_MB rows of x (row stride K), out[m] = dot.
// Tile kernels: R weight rows (rb bytes apart) against MB rows of x, R * MB <= 4, out[r * MAX_MB + m].
// sx[m * (K / S) + b] = sum of x[m, S b .. S b + S - 1], for the types with a per-block offset, with
// S = 32, or 16 for Q2_K, whose mins are per 16 values (matmul.c's block_sum_width).

typedef void (*row_kernel)(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out);
typedef void (*tile_kernel)(const uint8_t *w, int64_t rb, int64_t K, const float *x, const float *sx, int R, int MB, float *out);
#define MAX_MB 4

#ifndef PF_TILES
#define PF_TILES 2  // tile kernels prefetch this many tiles ahead; matmul.c fetches a range's first ones
#endif

DP_HIDDEN tile_kernel tiled_kernel(int type);   // NULL if this type has no tile kernel
DP_HIDDEN row_kernel row_kernel_for(int type);  // NULL if it has no row kernel either

#endif
