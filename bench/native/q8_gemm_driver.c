/* Timing driver for bench/bench_q8_gemm.py: runs a list of int8 GEMMs back to back as
   ONNX Runtime runs leapc's Q8MatMul nodes (rows quantized on the calling thread, then
   the column tiles handed out task by task to `threads` threads, the caller included,
   which spin between GEMMs as ORT's pool does), with the weights evicted from the caches
   before every repetition. Compiled with q8_gemm.c and leapc's own flags. */

#define _POSIX_C_SOURCE 200809L
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void q8_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, int32_t *starts,
                      float *scales);
void q8_gemm_tiles(const int8_t *q, const int32_t *starts, const float *scales, int64_t M,
                   int64_t K, const uint8_t *w, const float *ws, int64_t N, float *y,
                   int64_t t0, int64_t t1);

/* The task size ort_ops.c uses; a kernel that defines its own rule overrides this one. */
__attribute__((weak)) int64_t q8_tiles_per_task(int64_t M) { return M == 1 ? 4 : 2; }

typedef struct {
    int64_t K, N;
    const uint8_t *w;
    const float *ws;
} Gemm;

typedef struct {
    const int8_t *q;
    const int32_t *starts;
    const float *scales;
    int64_t M, K, N, tiles, per_task;
    const uint8_t *w;
    const float *ws;
    float *y;
    atomic_long next;
    atomic_int done;
} Job;

static Job job;
static atomic_int generation, stopping;

/* Spins a while, then yields: with another process on the cores, a pure spin left a
   pass waiting for a descheduled thread. */
static void pause_or_yield(int *spins) {
    if (++*spins < 4096) _mm_pause();
    else sched_yield();
}

static void run_tasks(void) {
    for (;;) {
        const int64_t t0 = atomic_fetch_add(&job.next, 1) * job.per_task;
        if (t0 >= job.tiles) return;
        const int64_t t1 = t0 + job.per_task < job.tiles ? t0 + job.per_task : job.tiles;
        q8_gemm_tiles(job.q, job.starts, job.scales, job.M, job.K, job.w, job.ws, job.N, job.y,
                      t0, t1);
    }
}

static void *worker(void *arg) {
    (void)arg;
    int seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load(&generation) == seen) {
            if (atomic_load(&stopping)) return NULL;
            pause_or_yield(&spins);
        }
        ++seen;
        run_tasks();
        atomic_fetch_add(&job.done, 1);
    }
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* Times `reps` passes over the `count` GEMMs at M rows (x: M rows of the largest K),
   writing each pass's ms to times[]; evict (evict_bytes) is rewritten before each pass
   (0 bytes: weights stay hot). Returns 0, or -1 if memory ran out. */
__attribute__((visibility("default"))) int
q8_bench(const Gemm *gemms, int count, int64_t M, const float *x, int threads, int reps,
         double *times, uint8_t *evict, size_t evict_bytes) {
    int64_t kmax = 0, nmax = 0;
    for (int i = 0; i < count; ++i) {
        if (gemms[i].K > kmax) kmax = gemms[i].K;
        if (gemms[i].N > nmax) nmax = gemms[i].N;
    }
    char *scratch = aligned_alloc(64, (size_t)(M * kmax + M * kmax / 32 * 8 + 64) / 64 * 64 + 64);
    float *y = aligned_alloc(64, (size_t)(M * nmax) * sizeof(float));
    if (!scratch || !y) return -1;
    pthread_t pool[8];
    if (threads > 9) threads = 9;
    atomic_store(&generation, 0);
    atomic_store(&stopping, 0);
    for (int i = 0; i + 1 < threads; ++i) pthread_create(&pool[i], NULL, worker, NULL);
    int gen = 0;
    for (int rep = 0; rep < reps; ++rep) {
        for (size_t i = 0; i < evict_bytes; i += 64) evict[i] += 1;
        const double start = now_ms();
        for (int i = 0; i < count; ++i) {
            const Gemm *g = &gemms[i];
            int8_t *q = (int8_t *)scratch;
            int32_t *starts = (int32_t *)(q + M * g->K);
            float *scales = (float *)(starts + M * (g->K / 32));
            q8_quantize_rows(x, M, g->K, q, starts, scales);
            job.q = q, job.starts = starts, job.scales = scales, job.M = M, job.K = g->K;
            job.N = g->N, job.tiles = g->N / 16, job.per_task = q8_tiles_per_task(M);
            job.w = g->w, job.ws = g->ws, job.y = y;
            atomic_store(&job.next, 0);
            atomic_store(&job.done, 0);
            atomic_store(&generation, ++gen);
            run_tasks();
            int spins = 0;
            while (atomic_load(&job.done) < threads - 1) pause_or_yield(&spins);
        }
        times[rep] = now_ms() - start;
    }
    atomic_store(&stopping, 1);
    for (int i = 0; i + 1 < threads; ++i) pthread_join(pool[i], NULL);
    free(scratch);
    free(y);
    return 0;
}
