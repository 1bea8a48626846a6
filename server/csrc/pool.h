/* The kernels' threads: a small pool of our own, in place of OpenMP parallel regions.
 *
 * Why: a decode step makes ~190 kernel calls of 20-150 us each. With OMP_WAIT_POLICY=PASSIVE
 * (which the server keeps, so that idle threads never busy-wait) each OpenMP region has to
 * wake its sleeping thread through the kernel, and on a VM's vCPUs that wake-up cost about as
 * much as the call itself: the batch-8 step measured 40-44 ms with PASSIVE threads and 23 ms
 * with spinning ones (OMP_WAIT_POLICY=ACTIVE), in one run. Spinning all the time is not an
 * option (it starves whatever else runs on the machine, this process's Python thread
 * included), so the pool's workers spin only briefly after each call, while a step's next
 * kernel call is likely to come within microseconds, and then sleep on a futex.
 *
 * Work is claimed, never assigned: a call splits its range into chunks and the caller and
 * any awake workers take chunks from one counter until none is left. A worker that is asleep,
 * descheduled or slow to wake takes nothing, and the caller does that share itself, so a call
 * never waits for a thread that has not started; it waits only for chunks already taken.
 * That also keeps a forked child (which has no worker threads) correct.
 *
 *   lp_parallel(n, chunk, fn, ctx, threads): fn(ctx, lo, hi) for [0, n) in chunks of `chunk`,
 *   on up to `threads` threads (the caller is one); returns when every chunk has run.
 */
#ifndef LORAPLEX_POOL_H
#define LORAPLEX_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef void (*lp_task)(void *ctx, int64_t lo, int64_t hi);

/* fn(ctx, lo, hi) over [0, n) in chunks of `chunk` on up to `threads` threads; see above. */
__attribute__((visibility("hidden"))) void lp_parallel(int64_t n, int64_t chunk, lp_task fn, void *ctx, int threads);

/* Per-thread scratch that lives as long as the thread: slot i (< 4) grown to at least `bytes`
 * (64-byte aligned). NULL when memory runs out. */
__attribute__((visibility("hidden"))) void *lp_scratch(int slot, size_t bytes);

/* Chunks of work per thread a call is split into: enough that a late thread's share is
 * small, few enough that claiming stays cheap. */
#define LP_CHUNKS_PER_THREAD 4

/* The chunk size for n items on `threads` threads. */
static inline int64_t lp_chunk(int64_t n, int threads) {
    const int64_t parts = (int64_t)(threads > 0 ? threads : 1) * LP_CHUNKS_PER_THREAD;
    return (n + parts - 1) / parts;
}

#endif
