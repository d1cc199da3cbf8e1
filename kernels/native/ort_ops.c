/* leapc's ONNX Runtime custom-op library: domain "ai.leapc".

   Q8MatMul(x float [..., K], w uint8 [N/16, 16 K], s float [N/16, K/2]) -> y float [..., N]
   runs `q8_gemm.c` on every row of x: w and s are the weight in that kernel's tiled layout
   (`leapc.kernels.q8_gemm.pack_weights`). The rows' activations are quantized once, then
   the column tiles are shared out over ORT's intra-op pool (KernelContext_ParallelFor);
   a column's arithmetic does not depend on which thread computes it. */

#include "ort_abi.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void q8_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, int32_t *sums,
                      float *scales);
void q8_gemm_tiles(const int8_t *q, const int32_t *sums, const float *scales, int64_t M,
                   int64_t K, const uint8_t *w, const float *ws, int64_t N, float *y,
                   int64_t t0, int64_t t1);

#define TILES_PER_TASK 8 /* 128 columns: a multiple of the kernel's 2- and 4-tile groups */
#define MAX_RANK 8

#define TRY(expr)                \
    do {                         \
        OrtStatus *st_ = (expr); \
        if (st_) return st_;     \
    } while (0)

typedef struct {
    const OrtApi *api;
} Kernel;

typedef struct {
    const int8_t *q;
    const int32_t *sums;
    const float *scales;
    int64_t M, K, N, tiles;
    const uint8_t *w;
    const float *ws;
    float *y;
} Job;

static void run_task(void *user, size_t task) {
    const Job *job = (const Job *)user;
    const int64_t t0 = (int64_t)task * TILES_PER_TASK;
    const int64_t t1 = t0 + TILES_PER_TASK < job->tiles ? t0 + TILES_PER_TASK : job->tiles;
    q8_gemm_tiles(job->q, job->sums, job->scales, job->M, job->K, job->w, job->ws, job->N,
                  job->y, t0, t1);
}

static OrtStatus *invalid(const OrtApi *api, const char *message) {
    return lc_ort_CreateStatus(api, ORT_INVALID_ARGUMENT, message);
}

/* The dims of input `index` (at most MAX_RANK), checking its element type. */
static OrtStatus *input_shape(const OrtApi *api, OrtKernelContext *ctx, size_t index,
                              ONNXTensorElementDataType want, const OrtValue **value,
                              int64_t *dims, size_t *rank) {
    TRY(lc_ort_KernelContext_GetInput(api, ctx, index, value));
    OrtTensorTypeAndShapeInfo *info = NULL;
    TRY(lc_ort_GetTensorTypeAndShape(api, *value, &info));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    OrtStatus *st = lc_ort_GetTensorElementType(api, info, &type);
    if (!st) st = lc_ort_GetDimensionsCount(api, info, rank);
    if (!st && (*rank > MAX_RANK || *rank == 0 || type != want))
        st = invalid(api, "leapc Q8MatMul: an input has the wrong element type or rank");
    if (!st) st = lc_ort_GetDimensions(api, info, dims, *rank);
    lc_ort_ReleaseTensorTypeAndShapeInfo(api, info);
    return st;
}

static OrtStatus *LC_ORT_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const OrtApi *api = ((const Kernel *)kernel)->api;
    const OrtValue *xv, *wv, *sv;
    int64_t xd[MAX_RANK], wd[MAX_RANK], sd[MAX_RANK];
    size_t xr, wr, sr;
    TRY(input_shape(api, ctx, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &xv, xd, &xr));
    TRY(input_shape(api, ctx, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, &wv, wd, &wr));
    TRY(input_shape(api, ctx, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &sv, sd, &sr));
    const int64_t K = xd[xr - 1], tiles = wd[0], N = 16 * tiles;
    if (wr != 2 || sr != 2 || K % 32 != 0 || wd[1] != 16 * K || sd[0] != tiles ||
        sd[1] != K / 2) {
        char message[200];
        snprintf(message, sizeof message,
                 "leapc Q8MatMul: x [..., %lld] does not match packed weights [%lld, %lld] "
                 "and scales [%lld, %lld]",
                 (long long)K, (long long)wd[0], (long long)wd[1], (long long)sd[0],
                 (long long)sd[1]);
        return invalid(api, message);
    }
    int64_t M = 1, yd[MAX_RANK];
    for (size_t i = 0; i + 1 < xr; ++i) M *= (yd[i] = xd[i]);
    yd[xr - 1] = N;
    OrtValue *yv;
    TRY(lc_ort_KernelContext_GetOutput(api, ctx, 0, yd, xr, &yv));
    if (M == 0) return NULL;
    void *x, *w, *s, *y;
    TRY(lc_ort_GetTensorMutableData(api, (OrtValue *)xv, &x));
    TRY(lc_ort_GetTensorMutableData(api, (OrtValue *)wv, &w));
    TRY(lc_ort_GetTensorMutableData(api, (OrtValue *)sv, &s));
    TRY(lc_ort_GetTensorMutableData(api, yv, &y));

    const int64_t blocks = K / 32;
    char *scratch = malloc((size_t)(M * K + M * blocks * (sizeof(int32_t) + sizeof(float))));
    if (!scratch) return lc_ort_CreateStatus(api, ORT_FAIL, "leapc Q8MatMul: out of memory");
    int8_t *q = (int8_t *)scratch;
    int32_t *sums = (int32_t *)(scratch + M * K);
    float *scales = (float *)(sums + M * blocks);
    q8_quantize_rows((const float *)x, M, K, q, sums, scales);
    Job job = {q, sums, scales, M, K, N, tiles, (const uint8_t *)w, (const float *)s, (float *)y};
    const size_t tasks = (size_t)((tiles + TILES_PER_TASK - 1) / TILES_PER_TASK);
    OrtStatus *st = lc_ort_KernelContext_ParallelFor(api, ctx, run_task, tasks, 0, &job);
    free(scratch);
    return st;
}

static OrtStatus *LC_ORT_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api,
                                            const OrtKernelInfo *info, void **out) {
    (void)op;
    (void)info;
    Kernel *kernel = malloc(sizeof *kernel);
    if (!kernel) return lc_ort_CreateStatus(api, ORT_FAIL, "leapc Q8MatMul: out of memory");
    kernel->api = api;
    *out = kernel;
    return NULL;
}

static void LC_ORT_CALL destroy_kernel(void *kernel) { free(kernel); }
static const char *LC_ORT_CALL op_name(const OrtCustomOp *op) { (void)op; return "Q8MatMul"; }
static const char *LC_ORT_CALL cpu_provider(const OrtCustomOp *op) { (void)op; return NULL; }
static size_t LC_ORT_CALL three(const OrtCustomOp *op) { (void)op; return 3; }
static size_t LC_ORT_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int LC_ORT_CALL int_one(const OrtCustomOp *op) { (void)op; return 1; }

static ONNXTensorElementDataType LC_ORT_CALL input_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static ONNXTensorElementDataType LC_ORT_CALL output_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    (void)i;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
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

static OrtCustomOp q8_matmul; /* ORT keeps pointers to it for every session: static */

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
                                   "this engine's int8 kernels need a CPU with AVX512-VNNI "
                                   "(rebuild it with --quantize int8-ort for this machine)");
    memset(&q8_matmul, 0, sizeof q8_matmul);
    q8_matmul.version = LC_ORT_API_VERSION;
    q8_matmul.GetName = op_name;
    q8_matmul.GetExecutionProviderType = cpu_provider;
    q8_matmul.GetInputType = input_type;
    q8_matmul.GetInputTypeCount = three;
    q8_matmul.GetOutputType = output_type;
    q8_matmul.GetOutputTypeCount = one;
    q8_matmul.KernelDestroy = destroy_kernel;
    q8_matmul.GetInputCharacteristic = required;
    q8_matmul.GetOutputCharacteristic = required;
    q8_matmul.GetInputMemoryType = default_memory;
    q8_matmul.GetVariadicInputMinArity = int_one;
    q8_matmul.GetVariadicInputHomogeneity = int_one;
    q8_matmul.GetVariadicOutputMinArity = int_one;
    q8_matmul.GetVariadicOutputHomogeneity = int_one;
    q8_matmul.CreateKernelV2 = create_kernel;
    q8_matmul.KernelComputeV2 = compute;
    OrtCustomOpDomain *domain; /* lives as long as the process, like the op */
    TRY(lc_ort_CreateCustomOpDomain(api, "ai.leapc", &domain));
    TRY(lc_ort_CustomOpDomain_Add(api, domain, &q8_matmul));
    return lc_ort_AddCustomOpDomain(api, options, domain);
}
