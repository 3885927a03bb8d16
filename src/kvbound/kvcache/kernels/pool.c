/* A few worker threads shared by the native kernels, woken per task: a decode step runs ~120 matrices and a
 * thread created per matrix would cost more than its share of the work. Workers spin briefly after each task
 * (the next one usually follows within microseconds), then sleep on a condition variable. One task runs at a
 * time; a caller that finds the pool busy (another thread of the process) does the task alone. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "kvb.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define relax() _mm_pause()
#else
#define relax() ((void)0)
#endif

#define MAX_WORKERS (KVB_MAX_THREADS - 1)
#define SPIN_NS 200000 /* how long an idle worker waits for the next task before sleeping */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t tid[MAX_WORKERS];
    int started, first_seen[MAX_WORKERS]; /* the generation a worker has seen when it is created */
    atomic_int generation, pending, busy;
    void (*fn)(void *, int, int);
    void *arg;
    int parts;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *worker(void *arg) {
    const int me = (int)(intptr_t)arg; /* 1 .. MAX_WORKERS; the caller is part 0 */
    int seen = pool.first_seen[me - 1]; /* written before the thread was created */
    for (;;) {
        int gen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        for (int64_t until = now_ns() + SPIN_NS; gen == seen && now_ns() < until;) {
            for (int i = 0; i < 64 && gen == seen; i++) {
                relax();
                gen = atomic_load_explicit(&pool.generation, memory_order_acquire);
            }
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((gen = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        if (me < pool.parts) {
            pool.fn(pool.arg, me, pool.parts);
            atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel);
        }
    }
    return NULL;
}

int kvb_parallel(void (*fn)(void *, int, int), void *arg, int parts) {
    parts = parts < 1 ? 1 : parts > KVB_MAX_THREADS ? KVB_MAX_THREADS : parts;
    int expected = 0;
    if (parts == 1 || !atomic_compare_exchange_strong(&pool.busy, &expected, 1)) {
        for (int i = 0; i < parts; i++) fn(arg, i, parts); /* alone: every part here, in order */
        return 1;
    }
    pthread_mutex_lock(&pool.lock);
    while (pool.started < parts - 1 &&
           (pool.first_seen[pool.started] = atomic_load(&pool.generation),
            pthread_create(&pool.tid[pool.started], NULL, worker, (void *)(intptr_t)(pool.started + 1)) == 0)) {
        pthread_detach(pool.tid[pool.started]);
        pool.started++;
    }
    const int workers = pool.started < parts - 1 ? pool.started : parts - 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.parts = workers + 1;
    atomic_store_explicit(&pool.pending, workers, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(arg, 0, workers + 1);
    for (int spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spins++) {
        if (spins < 100000) relax();
        else sched_yield();
    }
    atomic_store_explicit(&pool.busy, 0, memory_order_release);
    return workers + 1;
}
