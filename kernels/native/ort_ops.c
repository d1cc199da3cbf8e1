/* leapc's ONNX Runtime custom-op library: domain "ai.leapc".

   Q8MatMul(x float [..., K], w uint8 [N/16, 16 K], s float [N/16, K/2][, residual]) -> y
   float [..., N] runs `q8_gemm.c` on every row of x: w and s are the weight in that
   kernel's tiled layout (`leapc.kernels.q8_gemm.pack_weights`). The rows' activations are
   quantized once, then the column tiles are shared out over ORT's intra-op pool
   (KernelContext_ParallelFor); a column's arithmetic does not depend on which thread
   computes it. BF16MatMul(x, w uint16 [N/16, 16 K][, residual]) is the same with
   bfloat16 weights and float32 arithmetic (`bf16_gemm.c`). RMSNorm* and SwiGLU* first
   apply a row prologue (row_ops.c); a residual, when given, is added to y as the Add node
   it replaces did.

   TreeAttention(q, k_past, k_new, v_past, v_new, past_len, tree_mask; scale) -> out runs
   `tree_attention.c` (shapes in tree_attention.h): one task per (batch row, KV head) to
   transpose the keys, then tasks of query rows; a row's arithmetic does not depend on the
   task it falls in. RotaryTreeAttention is the same attention from a fused q/k/v
   projection, RoPE included (below). */

#include "ort_abi.h"
#include "row_ops.h"
#include "tree_attention.h"

#include <immintrin.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void q8_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, int32_t *starts,
                      float *scales);
void q8_gemm_tiles(const int8_t *q, const int32_t *starts, const float *scales, int64_t M,
                   int64_t K, const uint8_t *w, const float *ws, int64_t N, float *y,
                   int64_t t0, int64_t t1);
void bf16_gemm_tiles(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                     float *y, int64_t t0, int64_t t1);

#define MAX_RANK 8
#define MAX_INPUTS 7
/* a multiple of the kernel's 4-row groups: a bundled verify step of 8 tokens gives each
   KV head's 40 query rows 3 tasks, so a one-row batch with few KV heads fills the pool */
#define ROWS_PER_TASK 16

#define TRY(expr)                \
    do {                         \
        OrtStatus *st_ = (expr); \
        if (st_) return st_;     \
    } while (0)

/* What a GEMM op computes on its rows before multiplying them (row_ops.h). */
typedef enum { PROLOGUE_NONE, PROLOGUE_RMS_NORM, PROLOGUE_SWIGLU } Prologue;
/* How a GEMM op's weights are stored: int8 and scales (q8_gemm.c), or bfloat16 (bf16_gemm.c) */
typedef enum { WEIGHTS_Q8, WEIGHTS_BF16 } Weights;

/* One op of the library: ORT hands `base` back to every callback, which finds the rest. */
typedef struct {
    OrtCustomOp base;
    const char *name;
    size_t inputs, outputs; /* outputs are float */
    size_t optional_from;   /* inputs from this index on may be left out (0: none) */
    Prologue prologue;
    Weights weights;
    ONNXTensorElementDataType input_types[MAX_INPUTS];
} Op;

typedef struct {
    const OrtApi *api;
    const OrtCustomOp *op;
    Prologue prologue;
    float epsilon;     /* RMSNormQ8MatMul's attribute */
    float scale;       /* the attention ops' */
    float softcap;     /* the attention ops' optional one (0: none) */
    int64_t window;    /* the attention ops' optional sliding window (0: none) */
    int64_t num_heads; /* RotaryTreeAttention's */
} Kernel;

/* The calling thread's scratch memory, grown as needed and kept between calls: a fresh
   allocation of a step's few hundred KB is mmap'ed and page-faulted on every call, which
   cost more than the attention it served. Freed when the thread exits. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

typedef struct {
    size_t bytes;
    void *data;
} Scratch;

static void free_scratch(void *p) {
    free(((Scratch *)p)->data);
    free(p);
}

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free_scratch); }

static void *scratch_memory(size_t bytes) {
    pthread_once(&scratch_once, make_scratch_key);
    Scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (s->bytes < bytes) {
        free(s->data);
        s->bytes = (bytes + 63) / 64 * 64;
        if (!(s->data = aligned_alloc(64, s->bytes))) s->bytes = 0;
    }
    return s->data;
}

static OrtStatus *invalid(const OrtApi *api, const char *message) {
    return lc_ort_CreateStatus(api, ORT_INVALID_ARGUMENT, message);
}

static OrtStatus *out_of_memory(const OrtApi *api) {
    return lc_ort_CreateStatus(api, ORT_FAIL, "leapc ops: out of memory");
}

/* Input `index`: its data and dims (at most MAX_RANK, exactly `want_rank` unless 0),
   checking its element type. */
static OrtStatus *input(const OrtApi *api, OrtKernelContext *ctx, size_t index,
                        ONNXTensorElementDataType want, size_t want_rank, void **data,
                        int64_t *dims, size_t *rank) {
    const OrtValue *value;
    TRY(lc_ort_KernelContext_GetInput(api, ctx, index, &value));
    OrtTensorTypeAndShapeInfo *info = NULL;
    TRY(lc_ort_GetTensorTypeAndShape(api, value, &info));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    OrtStatus *st = lc_ort_GetTensorElementType(api, info, &type);
    if (!st) st = lc_ort_GetDimensionsCount(api, info, rank);
    if (!st && (*rank > MAX_RANK || *rank == 0 || (want_rank && *rank != want_rank) ||
                type != want)) {
        char message[120];
        snprintf(message, sizeof message,
                 "leapc ops: input %zu has the wrong element type or rank", index);
        st = invalid(api, message);
    }
    if (!st) st = lc_ort_GetDimensions(api, info, dims, *rank);
    lc_ort_ReleaseTensorTypeAndShapeInfo(api, info);
    if (!st) st = lc_ort_GetTensorMutableData(api, (OrtValue *)value, data);
    return st;
}

/* ---- Q8MatMul, BF16MatMul and their RMSNorm / SwiGLU forms ---- */

typedef struct {
    Weights weights;
    const float *x; /* the rows (BF16) */
    const int8_t *q; /* the rows quantized (Q8) */
    const int32_t *starts;
    const float *scales;
    int64_t M, K, N, tiles, tiles_per_task;
    const void *w;
    const float *ws;
    const float *residual; /* [M, N] added to y, or NULL */
    float *y;
} MatMulJob;

static void matmul_task(void *user, size_t task) {
    const MatMulJob *job = (const MatMulJob *)user;
    const int64_t t0 = (int64_t)task * job->tiles_per_task;
    const int64_t t1 = t0 + job->tiles_per_task < job->tiles ? t0 + job->tiles_per_task : job->tiles;
    if (job->weights == WEIGHTS_Q8)
        q8_gemm_tiles(job->q, job->starts, job->scales, job->M, job->K, job->w, job->ws, job->N,
                      job->y, t0, t1);
    else
        bf16_gemm_tiles(job->x, job->M, job->K, job->w, job->N, job->y, t0, t1);
    if (!job->residual) return;
    for (int64_t m = 0; m < job->M; ++m) /* y + residual, as the Add node it replaces */
        for (int64_t c = 16 * t0; c < 16 * t1; c += 16) {
            float *y = job->y + m * job->N + c;
            _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y),
                                              _mm512_loadu_ps(job->residual + m * job->N + c)));
        }
}

/* Optional input `index`: *data stays NULL when the node leaves it out. */
static OrtStatus *optional_input(const OrtApi *api, OrtKernelContext *ctx, size_t index,
                                 void **data, int64_t *dims, size_t *rank) {
    size_t count = 0;
    const OrtValue *value = NULL;
    *data = NULL;
    TRY(lc_ort_KernelContext_GetInputCount(api, ctx, &count));
    if (index < count) TRY(lc_ort_KernelContext_GetInput(api, ctx, index, &value));
    if (!value) return NULL;
    return input(api, ctx, index, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 0, data, dims, rank);
}

static OrtStatus *LC_ORT_CALL matmul(void *kernel, OrtKernelContext *ctx) {
    const Kernel *k = (const Kernel *)kernel;
    const OrtApi *api = k->api;
    const Weights weights = ((const Op *)k->op)->weights;
    const int q8 = weights == WEIGHTS_Q8;
    const size_t wi = k->prologue == PROLOGUE_RMS_NORM ? 2 : 1; /* x [, gamma], w [, s] [, r] */
    void *x, *w, *s = NULL, *y, *gamma = NULL, *residual;
    int64_t xd[MAX_RANK], wd[MAX_RANK], sd[MAX_RANK] = {0}, gd[MAX_RANK], rd[MAX_RANK];
    size_t xr, wr, sr, gr, rr;
    TRY(input(api, ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 0, &x, xd, &xr));
    TRY(input(api, ctx, wi, q8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                               : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, 2, &w, wd, &wr));
    if (q8) TRY(input(api, ctx, wi + 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 2, &s, sd, &sr));
    TRY(optional_input(api, ctx, wi + 1 + q8, &residual, rd, &rr));
    const int64_t width = xd[xr - 1], tiles = wd[0], N = 16 * tiles;
    const int64_t K = k->prologue == PROLOGUE_SWIGLU ? width / 2 : width;
    int ok = wd[1] == 16 * K && (!q8 || (K % 32 == 0 && sd[0] == tiles && sd[1] == K / 2)) &&
             (k->prologue != PROLOGUE_SWIGLU || width == 2 * K);
    if (k->prologue == PROLOGUE_RMS_NORM) {
        TRY(input(api, ctx, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1, &gamma, gd, &gr));
        ok = ok && gd[0] == K;
    }
    int64_t M = 1, yd[MAX_RANK];
    for (size_t i = 0; i + 1 < xr; ++i) M *= (yd[i] = xd[i]);
    yd[xr - 1] = N;
    for (size_t i = 0; residual && i < xr; ++i) ok = ok && rr == xr && rd[i] == yd[i];
    if (!ok) {
        char message[240];
        snprintf(message, sizeof message,
                 "leapc %s: x [..., %lld] does not match packed weights [%lld, %lld] and "
                 "scales [%lld, %lld] (or its norm weights or residual)",
                 ((const Op *)k->op)->name, (long long)width, (long long)wd[0],
                 (long long)wd[1], (long long)sd[0], (long long)sd[1]);
        return invalid(api, message);
    }
    OrtValue *yv;
    TRY(lc_ort_KernelContext_GetOutput(api, ctx, 0, yd, xr, &yv));
    if (M == 0) return NULL;
    TRY(lc_ort_GetTensorMutableData(api, yv, &y));

    const int64_t blocks = K / 32, staged = k->prologue == PROLOGUE_NONE ? 0 : M * K;
    const size_t quantized = q8 ? (size_t)(M * K + M * blocks * (sizeof(int32_t) + sizeof(float)))
                                : 0;
    const size_t bytes = sizeof(float) * (size_t)staged + quantized;
    char *scratch = bytes ? scratch_memory(bytes) : NULL;
    if (bytes && !scratch) return out_of_memory(api);
    float *rows = (float *)scratch;
    if (k->prologue == PROLOGUE_RMS_NORM)
        lc_rms_norm_rows(x, gamma, M, K, k->epsilon, rows);
    else if (k->prologue == PROLOGUE_SWIGLU)
        lc_swiglu_rows(x, M, K, rows);
    /* The kernel's tile group (four tiles for one row, else two) per task: ORT's pool hands
       tasks out one at a time, so small tasks keep both threads busy to the end. With 8
       tiles a task, a 320-column projection was 8 + 8 + 4 tiles on two threads. */
    const int64_t per_task = M == 1 ? 4 : 2;
    MatMulJob job = {weights, staged ? rows : (const float *)x, NULL, NULL, NULL, M, K, N,
                     tiles, per_task, w, (const float *)s, (const float *)residual, (float *)y};
    if (q8) {
        int8_t *q = (int8_t *)(rows + staged);
        int32_t *starts = (int32_t *)(q + M * K);
        float *scales = (float *)(starts + M * blocks);
        q8_quantize_rows(job.x, M, K, q, starts, scales);
        job.q = q, job.starts = starts, job.scales = scales;
    }
    const size_t tasks = (size_t)((tiles + per_task - 1) / per_task);
    return lc_ort_KernelContext_ParallelFor(api, ctx, matmul_task, tasks, 0, &job);
}

/* ---- TreeAttention ---- */

typedef struct {
    LcTreeAttention args;
    float *extra;   /* the caller's scratch */
    float *kt;      /* B * Hkv transposed key blocks */
    float *scratch; /* one block per task */
    int64_t chunks; /* tasks per KV head */
} AttentionJob;

static void transpose_task(void *user, size_t bh) {
    const AttentionJob *job = (const AttentionJob *)user;
    const int64_t size = job->args.D * lc_tree_attention_kt_stride(&job->args);
    lc_tree_attention_transpose(&job->args, (int64_t)bh, job->kt + (int64_t)bh * size);
}

static void rows_task(void *user, size_t task) {
    const AttentionJob *job = (const AttentionJob *)user;
    const int64_t bh = (int64_t)task / job->chunks, chunk = (int64_t)task % job->chunks;
    if (job->chunks == 1) transpose_task(user, (size_t)bh); /* no other task reads its keys */
    const int64_t rows = job->args.H / job->args.Hkv * job->args.N;
    const int64_t first = chunk * ROWS_PER_TASK;
    const int64_t end = first + ROWS_PER_TASK < rows ? first + ROWS_PER_TASK : rows;
    const int64_t size = job->args.D * lc_tree_attention_kt_stride(&job->args);
    lc_tree_attention_rows(&job->args, bh, job->kt + bh * size, first, end,
                           job->scratch + (int64_t)task * lc_tree_attention_scratch(&job->args));
}

/* The attention ops' seven inputs: five float tensors of the given ranks, then past_len
   [B] int64 and tree_mask [B, N, N] bool. */
static OrtStatus *attention_operands(const OrtApi *api, OrtKernelContext *ctx,
                                     const size_t ranks[5], void *data[7],
                                     int64_t d[7][MAX_RANK]) {
    size_t rank;
    for (size_t i = 0; i < 7; ++i)
        TRY(input(api, ctx, i,
                  i < 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                        : i == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                 : ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
                  i < 5 ? ranks[i] : i == 5 ? 1 : 3, &data[i], d[i], &rank));
    return NULL;
}

/* Each row's valid cache slots lie within the cache's T. */
static OrtStatus *check_past_lengths(const OrtApi *api, const char *op, const int64_t *past_len,
                                     int64_t B, int64_t T) {
    for (int64_t b = 0; b < B; ++b)
        if (past_len[b] < 0 || past_len[b] > T) {
            char message[120];
            snprintf(message, sizeof message, "leapc %s: a past_len is outside [0, T]", op);
            return invalid(api, message);
        }
    return NULL;
}

/* Reads the inputs into `a`, checking that their shapes agree. */
static OrtStatus *attention_inputs(const OrtApi *api, OrtKernelContext *ctx, LcTreeAttention *a) {
    void *data[7];
    int64_t d[7][MAX_RANK];
    static const size_t ranks[5] = {4, 4, 4, 4, 4};
    TRY(attention_operands(api, ctx, ranks, data, d));
    *a = (LcTreeAttention){data[0], data[1], data[2], data[3], data[4], data[5], data[6], NULL,
                           d[0][0], d[0][1], d[1][1], d[0][2], d[1][2], d[0][3], d[3][3], 0.0f, 0};
    int ok = a->Hkv > 0 && a->H % a->Hkv == 0 && d[1][3] == a->D;
    for (size_t i = 1; i < 5; ++i) ok = ok && d[i][0] == a->B && d[i][1] == a->Hkv;
    ok = ok && d[2][2] == a->N && d[3][2] == a->T && d[4][2] == a->N && d[4][3] == a->Dv &&
         d[2][3] == a->D && d[5][0] == a->B && d[6][0] == a->B && d[6][1] == a->N &&
         d[6][2] == a->N;
    if (!ok) {
        char message[300];
        snprintf(message, sizeof message,
                 "leapc TreeAttention: q [%lld, %lld, %lld, %lld] does not fit k_past [B, Hkv, T, "
                 "D], k_new [B, Hkv, N, D], v_past [B, Hkv, T, Dv], v_new [B, Hkv, N, Dv], "
                 "past_len [B], tree_mask [B, N, N] (H a multiple of Hkv)",
                 (long long)d[0][0], (long long)d[0][1], (long long)d[0][2], (long long)d[0][3]);
        return invalid(api, message);
    }
    return check_past_lengths(api, "TreeAttention", a->past_len, a->B, a->T);
}

/* Shares the attention of `a` out into tasks and takes scratch memory for them, after
   `extra` floats for the caller (job->extra). */
static OrtStatus *plan_attention(const OrtApi *api, const LcTreeAttention *a, int64_t extra,
                                 AttentionJob *job) {
    *job = (AttentionJob){.args = *a};
    job->chunks = (a->H / a->Hkv * a->N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    const int64_t tasks = a->B * a->Hkv * job->chunks;
    const int64_t kt_floats = a->B * a->Hkv * a->D * lc_tree_attention_kt_stride(a);
    job->extra = scratch_memory(
        sizeof(float) * (size_t)(extra + kt_floats + tasks * lc_tree_attention_scratch(a)));
    if (!job->extra) return out_of_memory(api);
    job->kt = job->extra + extra;
    job->scratch = job->kt + kt_floats;
    return NULL;
}

static OrtStatus *launch_attention(const OrtApi *api, OrtKernelContext *ctx, AttentionJob *job) {
    const int64_t heads = job->args.B * job->args.Hkv;
    if (job->chunks > 1)
        TRY(lc_ort_KernelContext_ParallelFor(api, ctx, transpose_task, (size_t)heads, 0, job));
    return lc_ort_KernelContext_ParallelFor(api, ctx, rows_task, (size_t)(heads * job->chunks), 0,
                                            job);
}

static OrtStatus *LC_ORT_CALL tree_attention(void *kernel, OrtKernelContext *ctx) {
    const Kernel *k = (const Kernel *)kernel;
    const OrtApi *api = k->api;
    LcTreeAttention a;
    TRY(attention_inputs(api, ctx, &a));
    a.scale = k->scale;
    a.softcap = k->softcap;
    a.window = k->window;
    const int64_t od[4] = {a.B, a.H, a.N, a.Dv};
    OrtValue *ov;
    void *out;
    TRY(lc_ort_KernelContext_GetOutput(api, ctx, 0, od, 4, &ov));
    if (a.B * a.H * a.N == 0) return NULL;
    TRY(lc_ort_GetTensorMutableData(api, ov, &out));
    a.out = (float *)out;
    AttentionJob job;
    TRY(plan_attention(api, &a, 0, &job));
    return launch_attention(api, ctx, &job);
}

/* RotaryTreeAttention(qkv [B, N, W], cos, sin [B, N, R/2], k_past, v_past, past_len,
   tree_mask; scale, num_heads) -> out [B, N, H*Dv], k_new [B, Hkv, N, D], v_new: a
   decoder's attention block from its fused projection to the input of its output
   projection, in one node (`lc_rotary_split`, then TreeAttention in token-major order). */
static OrtStatus *LC_ORT_CALL rotary_tree_attention(void *kernel, OrtKernelContext *ctx) {
    const Kernel *k = (const Kernel *)kernel;
    const OrtApi *api = k->api;
    void *data[7];
    int64_t d[7][MAX_RANK];
    static const size_t ranks[5] = {3, 3, 3, 4, 4};
    TRY(attention_operands(api, ctx, ranks, data, d));
    const int64_t B = d[0][0], N = d[0][1], H = k->num_heads, Hkv = d[3][1], T = d[3][2];
    const int64_t D = d[3][3], Dv = d[4][3], R = 2 * d[1][2];
    int ok = Hkv > 0 && H % Hkv == 0 && d[0][2] == (H + Hkv) * D + Hkv * Dv && R <= D;
    for (size_t i = 1; i < 3; ++i) ok = ok && d[i][0] == B && d[i][1] == N && d[i][2] == R / 2;
    ok = ok && d[3][0] == B && d[4][0] == B && d[4][1] == Hkv && d[4][2] == T && d[5][0] == B &&
         d[6][0] == B && d[6][1] == N && d[6][2] == N;
    if (!ok) {
        char message[300];
        snprintf(message, sizeof message,
                 "leapc RotaryTreeAttention: qkv [%lld, %lld, %lld] does not fit %lld heads, "
                 "k_past [B, Hkv, T, D], v_past [B, Hkv, T, Dv], cos and sin [B, N, R/2 <= D/2], "
                 "past_len [B], tree_mask [B, N, N]",
                 (long long)B, (long long)N, (long long)d[0][2], (long long)H);
        return invalid(api, message);
    }
    const int64_t *past_len = data[5];
    TRY(check_past_lengths(api, "RotaryTreeAttention", past_len, B, T));
    const int64_t shapes[3][4] = {{B, N, H * Dv}, {B, Hkv, N, D}, {B, Hkv, N, Dv}};
    float *outputs[3];
    for (size_t i = 0; i < 3; ++i) {
        OrtValue *value;
        void *out;
        TRY(lc_ort_KernelContext_GetOutput(api, ctx, i, shapes[i], i ? 4 : 3, &value));
        TRY(lc_ort_GetTensorMutableData(api, value, &out));
        outputs[i] = out;
    }
    if (B * N == 0) return NULL;
    LcTreeAttention a = {NULL, data[3], outputs[1], data[4], outputs[2], past_len, data[6],
                         outputs[0], B, H, Hkv, N, T, D, Dv, k->scale, 1, k->softcap,
                         k->window};
    AttentionJob job;
    TRY(plan_attention(api, &a, B * H * N * D, &job));
    lc_rotary_split(data[0], data[1], data[2], B, N, H, Hkv, D, Dv, R, job.extra, outputs[1],
                    outputs[2]);
    job.args.q = job.extra;
    return launch_attention(api, ctx, &job);
}

/* ---- Registration ---- */

/* An attribute a node may leave out: ORT reports a missing one as ORT_FAIL, which is no
   error here (the caller's value is 0: the kernel is calloc'ed). */
static OrtStatus *unless_absent(const OrtApi *api, OrtStatus *st) {
    if (st && lc_ort_GetErrorCode(api, st) == ORT_FAIL) {
        lc_ort_ReleaseStatus(api, st);
        return NULL;
    }
    return st;
}

/* The attention ops' scale, and their optional soft cap and window (0 when absent). */
static OrtStatus *attention_attributes(const OrtApi *api, const OrtKernelInfo *info,
                                       Kernel *kernel) {
    TRY(lc_ort_KernelInfoGetAttribute_float(api, info, "scale", &kernel->scale));
    TRY(unless_absent(api, lc_ort_KernelInfoGetAttribute_float(api, info, "softcap",
                                                               &kernel->softcap)));
    TRY(unless_absent(api, lc_ort_KernelInfoGetAttribute_int64(api, info, "window",
                                                               &kernel->window)));
    return kernel->window < 0 ? invalid(api, "leapc tree attention: window must not be negative")
                              : NULL;
}

static OrtStatus *LC_ORT_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                            const OrtKernelInfo *info, void **out) {
    Kernel *kernel = calloc(1, sizeof *kernel);
    if (!kernel) return out_of_memory(api);
    kernel->api = api;
    kernel->op = op;
    kernel->prologue = ((const Op *)op)->prologue;
    OrtStatus *st = NULL;
    if (kernel->prologue == PROLOGUE_RMS_NORM)
        st = lc_ort_KernelInfoGetAttribute_float(api, info, "epsilon", &kernel->epsilon);
    if (!st && op->KernelComputeV2 != matmul) st = attention_attributes(api, info, kernel);
    if (!st && op->KernelComputeV2 == rotary_tree_attention)
        st = lc_ort_KernelInfoGetAttribute_int64(api, info, "num_heads", &kernel->num_heads);
    if (!st && op->KernelComputeV2 == rotary_tree_attention && kernel->num_heads < 1)
        st = invalid(api, "leapc RotaryTreeAttention: num_heads must be positive");
    if (st) {
        free(kernel);
        return st;
    }
    *out = kernel;
    return NULL;
}

static void LC_ORT_CALL destroy_kernel(void *kernel) { free(kernel); }
static const char *LC_ORT_CALL op_name(const OrtCustomOp *op) { return ((const Op *)op)->name; }
static const char *LC_ORT_CALL cpu_provider(const OrtCustomOp *op) { (void)op; return NULL; }
static size_t LC_ORT_CALL input_count(const OrtCustomOp *op) { return ((const Op *)op)->inputs; }
static size_t LC_ORT_CALL output_count(const OrtCustomOp *op) { return ((const Op *)op)->outputs; }
static int LC_ORT_CALL int_one(const OrtCustomOp *op) { (void)op; return 1; }

static ONNXTensorElementDataType LC_ORT_CALL input_type(const OrtCustomOp *op, size_t i) {
    return ((const Op *)op)->input_types[i];
}
static ONNXTensorElementDataType LC_ORT_CALL output_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    (void)i;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static OrtCustomOpInputOutputCharacteristic LC_ORT_CALL input_kind(const OrtCustomOp *op,
                                                                   size_t i) {
    const size_t from = ((const Op *)op)->optional_from;
    return from && i >= from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic LC_ORT_CALL required(const OrtCustomOp *op,
                                                                 size_t i) {
    (void)op;
    (void)i;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType LC_ORT_CALL default_memory(const OrtCustomOp *op, size_t i) {
    (void)op;
    (void)i;
    return OrtMemTypeDefault;
}

#define F ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
/* ORT keeps pointers to the ops for every session: static storage */
static Op ops[] = {
    /* x, w, s [, residual]: y = x @ W (+ residual) */
    {.name = "Q8MatMul", .inputs = 4, .outputs = 1, .optional_from = 3,
     .input_types = {F, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, F, F},
     .base = {.KernelComputeV2 = matmul}},
    /* x, gamma, w, s [, residual]; epsilon: y = rms_norm(x) gamma @ W (+ residual) */
    {.name = "RMSNormQ8MatMul", .inputs = 5, .outputs = 1, .optional_from = 4,
     .prologue = PROLOGUE_RMS_NORM,
     .input_types = {F, F, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, F, F},
     .base = {.KernelComputeV2 = matmul}},
    /* gate_up, w, s [, residual]: y = silu(gate) up @ W (+ residual) */
    {.name = "SwiGLUQ8MatMul", .inputs = 4, .outputs = 1, .optional_from = 3,
     .prologue = PROLOGUE_SWIGLU,
     .input_types = {F, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, F, F},
     .base = {.KernelComputeV2 = matmul}},
    /* the same three with bfloat16 weights (uint16 bits) and no scales */
    {.name = "BF16MatMul", .inputs = 3, .outputs = 1, .optional_from = 2,
     .weights = WEIGHTS_BF16, .input_types = {F, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, F},
     .base = {.KernelComputeV2 = matmul}},
    {.name = "RMSNormBF16MatMul", .inputs = 4, .outputs = 1, .optional_from = 3,
     .prologue = PROLOGUE_RMS_NORM, .weights = WEIGHTS_BF16,
     .input_types = {F, F, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, F},
     .base = {.KernelComputeV2 = matmul}},
    {.name = "SwiGLUBF16MatMul", .inputs = 3, .outputs = 1, .optional_from = 2,
     .prologue = PROLOGUE_SWIGLU, .weights = WEIGHTS_BF16,
     .input_types = {F, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, F},
     .base = {.KernelComputeV2 = matmul}},
    {.name = "TreeAttention", .inputs = 7, .outputs = 1,
     .input_types = {F, F, F, F, F, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
                     ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL},
     .base = {.KernelComputeV2 = tree_attention}},
    {.name = "RotaryTreeAttention", .inputs = 7, .outputs = 3,
     .input_types = {F, F, F, F, F, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
                     ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL},
     .base = {.KernelComputeV2 = rotary_tree_attention}},
};
#undef F

static void fill_callbacks(OrtCustomOp *op) {
    op->version = LC_ORT_API_VERSION;
    op->GetName = op_name;
    op->GetExecutionProviderType = cpu_provider;
    op->GetInputType = input_type;
    op->GetInputTypeCount = input_count;
    op->GetOutputType = output_type;
    op->GetOutputTypeCount = output_count;
    op->KernelDestroy = destroy_kernel;
    op->GetInputCharacteristic = input_kind;
    op->GetOutputCharacteristic = required;
    op->GetInputMemoryType = default_memory;
    op->GetVariadicInputMinArity = int_one;
    op->GetVariadicInputHomogeneity = int_one;
    op->GetVariadicOutputMinArity = int_one;
    op->GetVariadicOutputHomogeneity = int_one;
    op->CreateKernelV2 = create_kernel;
}

__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(LC_ORT_API_VERSION);
    if (!api) {
        const OrtApi *any = base->GetApi(1); /* slot 0 is CreateStatus in every version */
        return any ? lc_ort_CreateStatus(any, ORT_FAIL, "leapc's ops need ONNX Runtime >= 1.17")
                   : NULL;
    }
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw"))
        return lc_ort_CreateStatus(api, ORT_FAIL,
                                   "this engine's kernels need a CPU with AVX512-VNNI "
                                   "(rebuild it with --quantize int8-nbits and --attention "
                                   "invariant for this machine)");
    OrtCustomOpDomain *domain; /* lives as long as the process, like the ops */
    TRY(lc_ort_CreateCustomOpDomain(api, "ai.leapc", &domain));
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; ++i) {
        fill_callbacks(&ops[i].base);
        TRY(lc_ort_CustomOpDomain_Add(api, domain, &ops[i].base));
    }
    return lc_ort_AddCustomOpDomain(api, options, domain);
}
