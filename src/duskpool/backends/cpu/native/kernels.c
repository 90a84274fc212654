// Matmul and row lookup straight from GGUF blocks, so quantized weights stay packed in memory.
// Block layouts follow ggml-common.h. For the few rows of a decode step (M small) each weight row
// is read once and dotted with every row of x block by block: d * sum(q * x) (+ m * sum(x) for the
// types with a min, sum(x) per 32 taken once per call), with AVX2/FMA where the compiler targets it
// and plain C (dequantize a row into L1, then dot) elsewhere. All arithmetic is fp32, so results
// match a dequantize-then-matmul reference up to summation order (and, for Q4_0/Q4_1, one rounding
// of a rearranged x: see q4_tile). Rows are split over a small persistent thread pool
// (dp_set_threads). Built at first use by duskpool/weights/kernels.py.
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  // clock_gettime, sched_yield under -std=c11
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DP_AVX2 1
#endif

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
       Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

#define DP_INLINE static inline __attribute__((always_inline))

static float f16_table[65536];  // half -> float for every bit pattern, as ggml does

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

static inline float f16(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return f16_table[h]; }

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

// One row of K weights (K a multiple of the block size) into y.
static void dequantize_row(int type, const uint8_t *restrict x, float *restrict y, int64_t K) {
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

// ---------------------------------------------------------------------------------------------
// Thread pool: dp_set_threads(n) runs parallel regions on the calling thread plus n - 1 workers.
// A region is split in chunks that threads claim from a shared ticket; the caller works too and
// returns once every chunk is done, without waiting for workers that never woke up (a worker the VM
// or another process delays costs nothing unless it holds a chunk). Workers spin for a while after
// each region (decode calls come every few microseconds), yielding the core to anything else that
// wants it, then sleep on a condition variable so an idle process burns no CPU. One region runs at
// a time (dispatch mutex), so callers on different threads are simply serialized.

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

#define MAX_THREADS 64
#define SPIN_PAUSE_NS 20000LL    // after a region, busy-wait this long,
#define SPIN_YIELD_NS 300000LL   // then busy-wait with sched_yield until this, then sleep

static struct {
    pthread_mutex_t dispatch, lock;
    pthread_cond_t wake;
    int want, workers;
    pthread_t tid[MAX_THREADS];
    atomic_uint_fast64_t generation;  // bumped to start a region (or to stop the workers)
    atomic_int sleeping, quit;
    // the current region: written by the caller before it bumps generation
    _Atomic(range_fn) fn;
    _Atomic(void *) ctx;
    atomic_int_fast64_t begin, end, chunk, n_chunks;
    atomic_int nap;                   // workers sleep right after this region (torch runs next)
    atomic_uint_fast64_t ticket;      // (generation << 32) | next chunk to claim
    atomic_int_fast64_t done;         // chunks finished
} pool = { .dispatch = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
           .wake = PTHREAD_COND_INITIALIZER, .want = 1 };

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

#define RELAXED memory_order_relaxed

// Claim and run chunks of region `gen` until none is left. The fields read here are those of `gen`
// whenever a claim succeeds: the caller rewrites them only after every claimed chunk is done.
static void run_chunks(uint32_t gen) {
    range_fn fn = atomic_load_explicit(&pool.fn, RELAXED);
    void *ctx = atomic_load_explicit(&pool.ctx, RELAXED);
    const int64_t begin = atomic_load_explicit(&pool.begin, RELAXED), end = atomic_load_explicit(&pool.end, RELAXED);
    const int64_t chunk = atomic_load_explicit(&pool.chunk, RELAXED), n = atomic_load_explicit(&pool.n_chunks, RELAXED);
    uint64_t t = atomic_load(&pool.ticket);
    for (;;) {
        if ((uint32_t)(t >> 32) != gen || (int64_t)(t & 0xffffffffu) >= n) return;
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) continue;
        const int64_t a = begin + (int64_t)(t & 0xffffffffu) * chunk, b = a + chunk < end ? a + chunk : end;
        fn(ctx, a, b);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        t = atomic_load(&pool.ticket);
    }
}

static void *worker_main(void *arg) {
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    int nap = 0;
    for (;;) {
        int64_t t0 = 0;
        for (uint32_t i = 1; !nap && atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; i++) {
            cpu_relax();
            if ((i & 63) == 0) {
                const int64_t t = now_ns();
                if (t0 == 0) t0 = t;
                else if (t - t0 > SPIN_YIELD_NS) break;
                else if (t - t0 > SPIN_PAUSE_NS) sched_yield();
            }
        }
        if (atomic_load(&pool.generation) == seen) {
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (atomic_load(&pool.quit)) return NULL;
        nap = atomic_load_explicit(&pool.nap, RELAXED);
        run_chunks((uint32_t)seen);
    }
}

static void publish(void) {  // bump the generation and wake sleeping workers
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
}

static void stop_workers(void) {  // with dispatch held
    if (pool.workers == 0) return;
    atomic_store(&pool.quit, 1);
    publish();
    for (int i = 0; i < pool.workers; i++) pthread_join(pool.tid[i], NULL);
    pool.workers = 0;
    atomic_store(&pool.quit, 0);
}

static void start_workers(void) {  // with dispatch held
    if (pool.workers == pool.want - 1) return;
    stop_workers();
    uint64_t gen = atomic_load(&pool.generation);
    for (int i = 0; i < pool.want - 1; i++) {
        if (pthread_create(&pool.tid[i], NULL, worker_main, (void *)(uintptr_t)gen) != 0) break;
        pool.workers++;
    }
}

// fn(ctx, a, b) over [begin, end) in chunks of `chunk` rows, on all threads; returns when all are
// done. nap: let the workers sleep right after (the caller runs torch's own threads next).
static void parallel_for(range_fn fn, void *ctx, int64_t begin, int64_t end, int64_t chunk, int nap) {
    if (pool.want <= 1 || end - begin <= chunk) { fn(ctx, begin, end); return; }
    pthread_mutex_lock(&pool.dispatch);
    start_workers();
    if (pool.workers == 0) { pthread_mutex_unlock(&pool.dispatch); fn(ctx, begin, end); return; }
    const int64_t n = (end - begin + chunk - 1) / chunk;
    const uint32_t gen = (uint32_t)(atomic_load(&pool.generation) + 1);
    atomic_store_explicit(&pool.fn, fn, RELAXED);
    atomic_store_explicit(&pool.ctx, ctx, RELAXED);
    atomic_store_explicit(&pool.begin, begin, RELAXED);
    atomic_store_explicit(&pool.end, end, RELAXED);
    atomic_store_explicit(&pool.chunk, chunk, RELAXED);
    atomic_store_explicit(&pool.n_chunks, n, RELAXED);
    atomic_store_explicit(&pool.nap, nap, RELAXED);
    atomic_store_explicit(&pool.done, 0, RELAXED);
    atomic_store(&pool.ticket, (uint64_t)gen << 32);
    publish();
    run_chunks(gen);
    int64_t t0 = 0;
    for (uint32_t i = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < n; i++) {
        cpu_relax();  // a worker is finishing its last chunk
        if ((i & 63) == 0) {
            const int64_t t = now_ns();
            if (t0 == 0) t0 = t;
            else if (t - t0 > SPIN_PAUSE_NS) sched_yield();
        }
    }
    pthread_mutex_unlock(&pool.dispatch);
}

// Rows per chunk: a few chunks per thread, so that a thread slowed down by the VM costs little.
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 4
#endif
static int64_t chunk_rows(int64_t n) {
    int64_t chunks = CHUNKS_PER_THREAD * (int64_t)pool.want, c = (n + chunks - 1) / chunks;
    return c < 1 ? 1 : c;
}

void dp_set_threads(int n) {
    n = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
    pthread_mutex_lock(&pool.dispatch);
    pool.want = n;
    if (pool.workers != n - 1) stop_workers();  // started again by the next region
    pthread_mutex_unlock(&pool.dispatch);
}

int dp_get_threads(void) { return pool.want; }

// fork() copies only the forking thread: the child starts with no workers and fresh locks.
static void before_fork(void) { pthread_mutex_lock(&pool.dispatch); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.dispatch); }
static void after_fork_child(void) {
    pthread_mutex_init(&pool.dispatch, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    atomic_store(&pool.sleeping, 0);
    atomic_store(&pool.quit, 0);
}

static void init_once(void) {
    for (uint32_t i = 0; i < 65536; i++) f16_table[i] = half_to_float((uint16_t)i);
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

void dp_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_once);
}

// ---------------------------------------------------------------------------------------------
// Fused row kernels: one weight row against MB <= 4 rows of x (row stride K), out[m] = dot.
// sx[m * (K / 32) + b] = sum of x[m, 32b .. 32b + 31], for the types with a per-block offset.

typedef void (*row_kernel)(const uint8_t *w, int64_t K, const float *x, const float *sx, int MB, float *out);
typedef void (*tile_kernel)(const uint8_t *w, int64_t rb, int64_t K, const float *x, const float *sx, int R, int MB, float *out);
#define MAX_MB 4

#ifdef DP_AVX2
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

#ifndef PF_TILES
#define PF_TILES 2
#endif
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
TILE_KERNEL(tile_q4_0, q4_tile(w, rb, K, x, sx, out, RC, MBC, 0))
TILE_KERNEL(tile_q4_1, q4_tile(w, rb, K, x, sx, out, RC, MBC, 1))
TILE_KERNEL(tile_q8_0, q8_0_tile(w, rb, K, x, sx, out, RC, MBC))
ROW_KERNEL(rows_q5_0, q5_rows(w, K, x, sx, out, MBC, 0))
ROW_KERNEL(rows_q5_1, q5_rows(w, K, x, sx, out, MBC, 1))
ROW_KERNEL(rows_q4_k, q4_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_q5_k, q5_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_q6_k, q6_k_rows(w, K, x, sx, out, MBC))
ROW_KERNEL(rows_f32, float_rows(w, K, x, sx, out, MBC, F32))
ROW_KERNEL(rows_bf16, float_rows(w, K, x, sx, out, MBC, BF16))
#ifdef __F16C__
ROW_KERNEL(rows_f16, float_rows(w, K, x, sx, out, MBC, F16))
#endif

static tile_kernel tiled_kernel(int type) {
    switch (type) {
    case Q4_0: return tile_q4_0;
    case Q4_1: return tile_q4_1;
    case Q8_0: return tile_q8_0;
    default: return NULL;
    }
}

static row_kernel row_kernel_for(int type) {
    switch (type) {
    case Q5_0: return rows_q5_0;
    case Q5_1: return rows_q5_1;
    case Q4_K: return rows_q4_k;
    case Q5_K: return rows_q5_k;
    case Q6_K: return rows_q6_k;
    case F32: return rows_f32;
    case BF16: return rows_bf16;
#ifdef __F16C__
    case F16: return rows_f16;
#endif
    default: return NULL;
    }
}
#else
static tile_kernel tiled_kernel(int type) { (void)type; return NULL; }
static row_kernel row_kernel_for(int type) { (void)type; return NULL; }
#endif

static int needs_block_sums(int type) {
    return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q4_K || type == Q5_K;
}

// ---------------------------------------------------------------------------------------------

typedef struct {
    int type, tile_rows;  // weight rows per tile call
    tile_kernel tile;
    row_kernel row;
    const uint8_t *w;
    int64_t row_bytes, K, M, ldy;
    const float *x, *sx;
    float *y;
} matmul_job;

static void matmul_range(void *ctx, int64_t n0, int64_t n1) {
    const matmul_job *j = ctx;
    const int64_t K = j->K, M = j->M, nb = K / 32, rb = j->row_bytes;
    if (j->tile || j->row) {
        float out[4 * MAX_MB];
        const int mchunk = MAX_MB / j->tile_rows;
#ifdef DP_AVX2
        if (j->tile) {  // the tiles prefetch_ahead does not cover: the first ones of this range
            const uint8_t *p = j->w + n0 * rb, *end = j->w + (n1 < n0 + PF_TILES * j->tile_rows ? n1 : n0 + PF_TILES * j->tile_rows) * rb;
            for (; p < end; p += 64) _mm_prefetch((const char *)p, _MM_HINT_T0);
        }
#endif
        for (int64_t n = n0; n < n1;) {
            const int R = n1 - n >= j->tile_rows ? j->tile_rows : 1;
            const uint8_t *w = j->w + n * rb;
            for (int64_t m0 = 0; m0 < M; m0 += mchunk) {
                const int mb = M - m0 < mchunk ? (int)(M - m0) : mchunk;
                const float *x = j->x + m0 * K, *sx = j->sx ? j->sx + m0 * nb : NULL;
                if (j->tile) j->tile(w, rb, K, x, sx, R, mb, out);
                else {
#ifdef DP_AVX2
                    if (m0 == 0)  // one row at a time: fetch the row two ahead
                        for (int64_t i = 0; i < rb; i += 64) _mm_prefetch((const char *)w + 2 * rb + i, _MM_HINT_T0);
#endif
                    j->row(w, K, x, sx, mb, out);
                }
                for (int r = 0; r < R; r++)
                    for (int m = 0; m < mb; m++) j->y[(m0 + m) * j->ldy + n + r] = out[r * MAX_MB + m];
            }
            n += R;
        }
        return;
    }
    float *row = malloc(K * sizeof(float));
    for (int64_t n = n0; n < n1; n++) {
        dequantize_row(j->type, j->w + n * rb, row, K);
        for (int64_t m = 0; m < M; m++) j->y[m * j->ldy + n] = dot(row, j->x + m * K, K);
    }
    free(row);
}

// Below this many weight bytes a call runs on the calling thread alone.
#define PARALLEL_MIN_BYTES 32768

// y[m, n] = sum_k x[m, k] * W[n, k] for n in [n0, n1); W is N rows of row_bytes each.
// y has row stride ldy, so several weights can write into one fused output.
void dp_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
               const float *x, int64_t M, float *y, int64_t ldy) {
    if (n1 <= n0 || M <= 0) return;
    matmul_job job = { .type = type, .tile = tiled_kernel(type), .w = w, .row_bytes = row_bytes, .K = K, .M = M,
                       .ldy = ldy, .x = x, .y = y };
    job.row = job.tile ? NULL : row_kernel_for(type);
    job.tile_rows = job.tile ? (M == 1 ? 4 : M == 2 ? 2 : 1) : 1;
    const int64_t nb = K / 32;
    float *scratch = NULL;
    if ((job.tile || job.row) && needs_block_sums(type)) {
        const int rearrange = type == Q4_0 || type == Q4_1;  // see q4_tile
        scratch = malloc((M * nb + (rearrange ? M * K : 0)) * sizeof(float));
        float *sx = scratch, *xt = scratch + M * nb;
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < nb; b++) {
                const float *p = x + m * K + b * 32;
                float s = 0.0f;
                for (int i = 0; i < 32; i++) s += p[i];
                sx[m * nb + b] = s;
                if (rearrange) {
                    float *t = xt + m * K + b * 32;
                    for (int i = 0; i < 16; i++) { t[i] = p[i] - p[i + 16] * 0.0625f; t[i + 16] = p[i + 16] * 0.0625f; }
                }
            }
        job.sx = sx;
        if (rearrange) job.x = xt;
    }
    const int64_t N = n1 - n0;
    if (N * row_bytes < PARALLEL_MIN_BYTES) matmul_range(&job, n0, n1);
    else parallel_for(matmul_range, &job, n0, n1, (chunk_rows(N) + 3) / 4 * 4, 0);
    free(scratch);
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
