/* The kernels' thread pool (pool.h says what and why). */
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pool.h"

#define LP_MAX_WORKERS 63
#define LP_SPIN_NS 200000   /* a worker spins this long after its last chunk, then sleeps */
#define LP_YIELD_NS 50000   /* the caller, waiting on taken chunks, yields its CPU after this */

typedef struct {
    lp_task fn;
    void *ctx;
    int64_t n, chunk, chunks;
    int threads;  /* workers with an index below threads - 1 take part */
} lp_job;

static struct {
    pthread_mutex_t start;        /* serialises calls and the workers' creation */
    _Atomic uint32_t generation;  /* bumped once per call: the futex the workers sleep on */
    _Atomic uint64_t claim;       /* (generation << 32) | next chunk */
    _Atomic int64_t done;         /* chunks finished in this call */
    _Atomic int sleepers;
    lp_job job[2];                /* by generation parity: a late worker never sees a half-written job */
    int workers;
} lp_pool = {.start = PTHREAD_MUTEX_INITIALIZER};

static inline int64_t lp_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Run chunks of the call `gen` until none is left (or a newer call has begun). */
static void lp_work(uint32_t gen, int index) {
    const lp_job *job = &lp_pool.job[gen & 1];
    if (index >= job->threads - 1 && index >= 0) return;  /* not one of this call's threads */
    for (;;) {
        uint64_t c = atomic_load(&lp_pool.claim);
        if ((uint32_t)(c >> 32) != gen || (int64_t)(c & 0xFFFFFFFF) >= job->chunks) return;
        if (!atomic_compare_exchange_weak(&lp_pool.claim, &c, c + 1)) continue;
        const int64_t lo = (int64_t)(c & 0xFFFFFFFF) * job->chunk;
        const int64_t hi = lo + job->chunk < job->n ? lo + job->chunk : job->n;
        job->fn(job->ctx, lo, hi);
        atomic_fetch_add(&lp_pool.done, 1);
    }
}

static void *lp_worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&lp_pool.generation);
    for (;;) {
        const int64_t until = lp_now_ns() + LP_SPIN_NS;
        uint32_t gen;
        while ((gen = atomic_load(&lp_pool.generation)) == seen && lp_now_ns() < until) _mm_pause();
        if (gen == seen) {
            atomic_fetch_add(&lp_pool.sleepers, 1);
            while ((gen = atomic_load(&lp_pool.generation)) == seen)
                syscall(SYS_futex, &lp_pool.generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&lp_pool.sleepers, 1);
        }
        seen = gen;
        lp_work(gen, index);
    }
    return NULL;
}

void lp_parallel(int64_t n, int64_t chunk, lp_task fn, void *ctx, int threads) {
    if (n <= 0) return;
    if (chunk < 1) chunk = 1;
    const int64_t chunks = (n + chunk - 1) / chunk;
    if (threads > LP_MAX_WORKERS + 1) threads = LP_MAX_WORKERS + 1;
    if (threads <= 1 || chunks == 1) {
        fn(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&lp_pool.start);
    while (lp_pool.workers < threads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, lp_worker, (void *)(intptr_t)lp_pool.workers) != 0) break;
        pthread_detach(t);
        lp_pool.workers++;
    }
    const uint32_t gen = atomic_load(&lp_pool.generation) + 1;
    lp_pool.job[gen & 1] = (lp_job){fn, ctx, n, chunk, chunks, threads};
    atomic_store(&lp_pool.done, 0);
    atomic_store(&lp_pool.claim, (uint64_t)gen << 32);
    atomic_store(&lp_pool.generation, gen);
    if (atomic_load(&lp_pool.sleepers) > 0)
        syscall(SYS_futex, &lp_pool.generation, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    lp_work(gen, -1);  /* the caller takes chunks too */
    const int64_t yield_at = lp_now_ns() + LP_YIELD_NS;
    while (atomic_load(&lp_pool.done) < chunks) {
        if (lp_now_ns() > yield_at) sched_yield(); else _mm_pause();
    }
    pthread_mutex_unlock(&lp_pool.start);
}

/* Per-thread scratch that lives as long as the thread: slot i grown to at least `bytes`
 * (64-byte aligned). NULL when memory runs out. */
void *lp_scratch(int slot, size_t bytes) {
    static __thread void *buf[4];
    static __thread size_t have[4];
    if (have[slot] < bytes) {
        free(buf[slot]);
        have[slot] = 0;
        buf[slot] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!buf[slot]) return NULL;
        have[slot] = bytes;
    }
    return buf[slot];
}
