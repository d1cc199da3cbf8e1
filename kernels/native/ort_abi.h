/* The subset of ONNX Runtime's stable C ABI that leapc's custom-op library uses, declared here
   because the onnxruntime wheel ships no C headers.

   ORT hands a library one table of function pointers, OrtApi, obtained from
   OrtApiBase::GetApi(version). The table only ever grows at its end: the function in slot N stays
   in slot N in every later release, so a slot index is part of the ABI. Rather than declaring the
   whole table, each function we call is fetched by its slot index (LC_ORT_SLOT_*) and cast to its
   signature (the lc_ort_* helpers below).

   Target: API version 17 (ONNX Runtime 1.17). Every slot used here exists in version 17, and
   OrtCustomOp is laid out as version 17 defines it. A library built on this header asks
   GetApi(LC_ORT_API_VERSION) and sets OrtCustomOp.version to the same value, so it should load
   in any ORT >= 1.17. Checked against onnxruntime 1.32.0 (x86_64 Linux).

   Slots are indexed as an array of pointer-sized entries, so the indices hold on any pointer
   width; ORT's enums are plain int-sized C enums. The calling convention is the platform
   default except on 32-bit Windows (__stdcall). */

#ifndef LEAPC_ORT_ABI_H
#define LEAPC_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LC_ORT_API_VERSION 17u

#if defined(_WIN32)
#define LC_ORT_CALL __stdcall
#else
#define LC_ORT_CALL
#endif

/* ---- Opaque handles: only ever used through pointers. ---- */

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

/* ---- Enums (numeric values are fixed by ORT; the tensor types follow onnx.TensorProto). ---- */

typedef enum ONNXTensorElementDataType {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 = 4,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL = 9
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
    ORT_OK = 0,
    ORT_FAIL = 1,
    ORT_INVALID_ARGUMENT = 2
} OrtErrorCode;

typedef enum OrtCustomOpInputOutputCharacteristic {
    INPUT_OUTPUT_REQUIRED = 0,
    INPUT_OUTPUT_OPTIONAL = 1,
    INPUT_OUTPUT_VARIADIC = 2
} OrtCustomOpInputOutputCharacteristic;

/* Where a custom op wants an input to live (returned by OrtCustomOp.GetInputMemoryType). */
typedef enum OrtMemType {
    OrtMemTypeCPUInput = -2,
    OrtMemTypeCPUOutput = -1,
    OrtMemTypeDefault = 0
} OrtMemType;

/* ---- Entry point ORT passes to RegisterCustomOps. Two slots; this struct never changes. ---- */

typedef struct OrtApiBase {
    const OrtApi *(LC_ORT_CALL *GetApi)(uint32_t version); /* NULL if version is unsupported */
    const char *(LC_ORT_CALL *GetVersionString)(void);
} OrtApiBase;

/* ---- A custom operator, as ORT reads it. ----
   ORT only reads the members that exist in the version the op declares in `version`, so with
   version = 17 the members below are all it looks at. Set every member not marked as optional:
   for a version 17 op ORT calls the name, type and count queries, both characteristics,
   GetInputMemoryType and KernelDestroy without checking them for NULL. */

typedef struct OrtCustomOp OrtCustomOp;
struct OrtCustomOp {
    uint32_t version; /* the API version this op is written against: LC_ORT_API_VERSION */

    /* v1. CreateKernel/KernelCompute are used only when their V2 forms below are NULL (then
       they must be set). */
    void *(LC_ORT_CALL *CreateKernel)(const OrtCustomOp *op, const OrtApi *api,
                                      const OrtKernelInfo *info);
    const char *(LC_ORT_CALL *GetName)(const OrtCustomOp *op);
    const char *(LC_ORT_CALL *GetExecutionProviderType)(const OrtCustomOp *op); /* NULL: CPU */
    ONNXTensorElementDataType(LC_ORT_CALL *GetInputType)(const OrtCustomOp *op, size_t index);
    size_t(LC_ORT_CALL *GetInputTypeCount)(const OrtCustomOp *op);
    ONNXTensorElementDataType(LC_ORT_CALL *GetOutputType)(const OrtCustomOp *op, size_t index);
    size_t(LC_ORT_CALL *GetOutputTypeCount)(const OrtCustomOp *op);
    void(LC_ORT_CALL *KernelCompute)(void *kernel, OrtKernelContext *context);
    void(LC_ORT_CALL *KernelDestroy)(void *kernel);

    /* v8: optional inputs/outputs. */
    OrtCustomOpInputOutputCharacteristic(LC_ORT_CALL *GetInputCharacteristic)(
        const OrtCustomOp *op, size_t index);
    OrtCustomOpInputOutputCharacteristic(LC_ORT_CALL *GetOutputCharacteristic)(
        const OrtCustomOp *op, size_t index);

    /* v13 */
    OrtMemType(LC_ORT_CALL *GetInputMemoryType)(const OrtCustomOp *op, size_t index);

    /* v14: variadic inputs/outputs (read only for a VARIADIC last input/output). */
    int(LC_ORT_CALL *GetVariadicInputMinArity)(const OrtCustomOp *op);
    int(LC_ORT_CALL *GetVariadicInputHomogeneity)(const OrtCustomOp *op);
    int(LC_ORT_CALL *GetVariadicOutputMinArity)(const OrtCustomOp *op);
    int(LC_ORT_CALL *GetVariadicOutputHomogeneity)(const OrtCustomOp *op);

    /* v16: status-returning kernel creation and compute; used when non-NULL. */
    OrtStatus *(LC_ORT_CALL *CreateKernelV2)(const OrtCustomOp *op, const OrtApi *api,
                                             const OrtKernelInfo *info, void **kernel);
    OrtStatus *(LC_ORT_CALL *KernelComputeV2)(void *kernel, OrtKernelContext *context);

    /* v17: shape inference and the op's opset range; each may be NULL. */
    OrtStatus *(LC_ORT_CALL *InferOutputShapeFn)(const OrtCustomOp *op,
                                                 OrtShapeInferContext *context);
    int(LC_ORT_CALL *GetStartVersion)(const OrtCustomOp *op);
    int(LC_ORT_CALL *GetEndVersion)(const OrtCustomOp *op);

    /* Version 18 appends four more members (in-place and alias maps). They are not part of the
       version 17 layout and ORT does not read them for a version 17 op; this zeroed tail only
       keeps a stray read of them harmless. Leave it NULL. */
    void (*reserved_v18[4])(void);
};

/* ---- OrtApi slot indices (0-based, one per table entry, stable forever). ---- */

#define LC_ORT_SLOT_CreateStatus 0                        /* CreateStatus */
#define LC_ORT_SLOT_GetErrorCode 1                        /* GetErrorCode */
#define LC_ORT_SLOT_GetErrorMessage 2                     /* GetErrorMessage */
#define LC_ORT_SLOT_CreateCustomOpDomain 26               /* CreateCustomOpDomain */
#define LC_ORT_SLOT_CustomOpDomain_Add 27                 /* CustomOpDomain_Add */
#define LC_ORT_SLOT_AddCustomOpDomain 28                  /* AddCustomOpDomain */
#define LC_ORT_SLOT_GetTensorMutableData 51               /* GetTensorMutableData */
#define LC_ORT_SLOT_GetTensorElementType 60               /* GetTensorElementType */
#define LC_ORT_SLOT_GetDimensionsCount 61                 /* GetDimensionsCount */
#define LC_ORT_SLOT_GetDimensions 62                      /* GetDimensions */
#define LC_ORT_SLOT_GetTensorTypeAndShape 65              /* GetTensorTypeAndShape */
#define LC_ORT_SLOT_KernelInfoGetAttribute_float 85       /* KernelInfoGetAttribute_float */
#define LC_ORT_SLOT_KernelInfoGetAttribute_int64 86       /* KernelInfoGetAttribute_int64 */
#define LC_ORT_SLOT_KernelContext_GetInputCount 88        /* KernelContext_GetInputCount */
#define LC_ORT_SLOT_KernelContext_GetOutputCount 89       /* KernelContext_GetOutputCount */
#define LC_ORT_SLOT_KernelContext_GetInput 90             /* KernelContext_GetInput */
#define LC_ORT_SLOT_KernelContext_GetOutput 91            /* KernelContext_GetOutput */
#define LC_ORT_SLOT_ReleaseStatus 93                      /* ReleaseStatus */
#define LC_ORT_SLOT_ReleaseTensorTypeAndShapeInfo 99      /* ReleaseTensorTypeAndShapeInfo */
#define LC_ORT_SLOT_KernelInfoGetConstantInput_tensor 249 /* KernelInfoGetConstantInput_tensor */
#define LC_ORT_SLOT_KernelContext_ParallelFor 274         /* KernelContext_ParallelFor */

/* Slot N of the table, as a generic function pointer (cast to the real signature before use). */
typedef void (*lc_ort_fn)(void);
#define LC_ORT_SLOT(api, n) (((const lc_ort_fn *)(const void *)(api))[n])

/* ---- Typed calls. Status-returning ones give NULL on success; the caller owns a non-NULL
   status and must ReleaseStatus it (or return it to ORT, which takes ownership). ---- */

static inline OrtStatus *lc_ort_CreateStatus(const OrtApi *api, OrtErrorCode code,
                                             const char *msg) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(OrtErrorCode, const char *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_CreateStatus))(code, msg); /* copies msg */
}

static inline OrtErrorCode lc_ort_GetErrorCode(const OrtApi *api, const OrtStatus *status) {
    typedef OrtErrorCode(LC_ORT_CALL * fn_t)(const OrtStatus *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetErrorCode))(status);
}

static inline const char *lc_ort_GetErrorMessage(const OrtApi *api, const OrtStatus *status) {
    typedef const char *(LC_ORT_CALL * fn_t)(const OrtStatus *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetErrorMessage))(status); /* owned by status */
}

static inline void lc_ort_ReleaseStatus(const OrtApi *api, OrtStatus *status) {
    typedef void(LC_ORT_CALL * fn_t)(OrtStatus *);
    ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_ReleaseStatus))(status);
}

/* The domain and every op added to it must stay alive as long as any session using them. */
static inline OrtStatus *lc_ort_CreateCustomOpDomain(const OrtApi *api, const char *domain,
                                                     OrtCustomOpDomain **out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const char *, OrtCustomOpDomain **);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_CreateCustomOpDomain))(domain, out);
}

static inline OrtStatus *lc_ort_CustomOpDomain_Add(const OrtApi *api, OrtCustomOpDomain *domain,
                                                   const OrtCustomOp *op) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(OrtCustomOpDomain *, const OrtCustomOp *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_CustomOpDomain_Add))(domain, op);
}

static inline OrtStatus *lc_ort_AddCustomOpDomain(const OrtApi *api, OrtSessionOptions *options,
                                                  OrtCustomOpDomain *domain) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(OrtSessionOptions *, OrtCustomOpDomain *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_AddCustomOpDomain))(options, domain);
}

/* Fails (non-NULL status) when the node has no such attribute. */
static inline OrtStatus *lc_ort_KernelInfoGetAttribute_float(const OrtApi *api,
                                                             const OrtKernelInfo *info,
                                                             const char *name, float *out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelInfo *, const char *, float *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelInfoGetAttribute_float))(info, name, out);
}

/* Fails (non-NULL status) when the node has no such attribute. */
static inline OrtStatus *lc_ort_KernelInfoGetAttribute_int64(const OrtApi *api,
                                                             const OrtKernelInfo *info,
                                                             const char *name, int64_t *out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelInfo *, const char *, int64_t *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelInfoGetAttribute_int64))(info, name, out);
}

/* Input `index` if it is a constant initializer (*is_constant = 1, *out borrowed from ORT);
   usable from CreateKernel(V2), e.g. to pre-pack weights. */
static inline OrtStatus *lc_ort_KernelInfoGetConstantInput_tensor(const OrtApi *api,
                                                                  const OrtKernelInfo *info,
                                                                  size_t index, int *is_constant,
                                                                  const OrtValue **out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelInfo *, size_t, int *,
                                            const OrtValue **);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelInfoGetConstantInput_tensor))(
        info, index, is_constant, out);
}

static inline OrtStatus *lc_ort_KernelContext_GetInputCount(const OrtApi *api,
                                                            const OrtKernelContext *context,
                                                            size_t *out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelContext *, size_t *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelContext_GetInputCount))(context, out);
}

static inline OrtStatus *lc_ort_KernelContext_GetOutputCount(const OrtApi *api,
                                                             const OrtKernelContext *context,
                                                             size_t *out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelContext *, size_t *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelContext_GetOutputCount))(context, out);
}

/* *out is borrowed (do not release); NULL for an omitted optional input. */
static inline OrtStatus *lc_ort_KernelContext_GetInput(const OrtApi *api,
                                                       const OrtKernelContext *context,
                                                       size_t index, const OrtValue **out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelContext *, size_t, const OrtValue **);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelContext_GetInput))(context, index, out);
}

/* Allocates output `index` with the given shape; *out is borrowed (do not release). */
static inline OrtStatus *lc_ort_KernelContext_GetOutput(const OrtApi *api,
                                                        OrtKernelContext *context, size_t index,
                                                        const int64_t *dims, size_t dim_count,
                                                        OrtValue **out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(OrtKernelContext *, size_t, const int64_t *, size_t,
                                            OrtValue **);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelContext_GetOutput))(context, index, dims,
                                                                         dim_count, out);
}

/* Runs fn(user_data, i) for every i in [0, total) on the session's intra-op thread pool and
   returns when all are done. batches = 0: one task per index; otherwise the indices are split
   into that many batches. With no pool (one thread) the calls run inline on this thread. */
typedef void (*lc_ort_parallel_fn)(void *user_data, size_t i);

static inline OrtStatus *lc_ort_KernelContext_ParallelFor(const OrtApi *api,
                                                          const OrtKernelContext *context,
                                                          lc_ort_parallel_fn fn, size_t total,
                                                          size_t batches, void *user_data) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtKernelContext *, lc_ort_parallel_fn, size_t,
                                            size_t, void *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_KernelContext_ParallelFor))(context, fn, total,
                                                                           batches, user_data);
}

/* The tensor's data buffer (also for inputs: cast the const away, do not write). */
static inline OrtStatus *lc_ort_GetTensorMutableData(const OrtApi *api, OrtValue *value,
                                                     void **out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(OrtValue *, void **);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetTensorMutableData))(value, out);
}

/* *out is owned by the caller: ReleaseTensorTypeAndShapeInfo it. */
static inline OrtStatus *lc_ort_GetTensorTypeAndShape(const OrtApi *api, const OrtValue *value,
                                                      OrtTensorTypeAndShapeInfo **out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtValue *, OrtTensorTypeAndShapeInfo **);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetTensorTypeAndShape))(value, out);
}

static inline OrtStatus *lc_ort_GetTensorElementType(const OrtApi *api,
                                                     const OrtTensorTypeAndShapeInfo *info,
                                                     ONNXTensorElementDataType *out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtTensorTypeAndShapeInfo *,
                                            ONNXTensorElementDataType *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetTensorElementType))(info, out);
}

static inline OrtStatus *lc_ort_GetDimensionsCount(const OrtApi *api,
                                                   const OrtTensorTypeAndShapeInfo *info,
                                                   size_t *out) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtTensorTypeAndShapeInfo *, size_t *);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetDimensionsCount))(info, out);
}

/* Writes the tensor's dimensions into dims; count is its rank (GetDimensionsCount). */
static inline OrtStatus *lc_ort_GetDimensions(const OrtApi *api,
                                              const OrtTensorTypeAndShapeInfo *info,
                                              int64_t *dims, size_t count) {
    typedef OrtStatus *(LC_ORT_CALL * fn_t)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t);
    return ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_GetDimensions))(info, dims, count);
}

static inline void lc_ort_ReleaseTensorTypeAndShapeInfo(const OrtApi *api,
                                                        OrtTensorTypeAndShapeInfo *info) {
    typedef void(LC_ORT_CALL * fn_t)(OrtTensorTypeAndShapeInfo *);
    ((fn_t)LC_ORT_SLOT(api, LC_ORT_SLOT_ReleaseTensorTypeAndShapeInfo))(info);
}

#ifdef __cplusplus
}
#endif

#endif /* LEAPC_ORT_ABI_H */
