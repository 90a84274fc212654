// Thread pool: dp_set_threads(n) runs parallel regions on the calling thread plus n - 1 workers.
// A region is split in chunks that threads claim from a shared ticket; the caller works too and
// returns once every chunk is done, without waiting for workers that never woke up (a worker the VM
// or another process delays costs nothing unless it holds a chunk). Workers spin for a while after
// each region (decode calls come every few microseconds), yielding the core to anything else that
// wants it, then sleep on a condition variable so an idle process burns no CPU. One region runs at
// a time (dispatch mutex), so callers on different threads are simply serialized.
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  // clock_gettime, sched_yield under -std=c11
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "native.h"

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
    flush_denormals();  // for good: the thread is the pool's
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

// fn over [begin, end) on every thread, in chunks (see native.h)
void parallel_for(range_fn fn, void *ctx, int64_t begin, int64_t end, int64_t chunk, int nap) {
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
int64_t chunk_rows(int64_t n) {
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

// Once per process, before any other call: the fp16 table (dequant.c) and the fork handlers.
static void init_once(void) {
    init_f16_table();
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

void dp_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_once);
}
