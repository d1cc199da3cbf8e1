/* y[M, N] = x[M, K] @ W[K, N] with int8 weights and int8 activations, on AVX512-VNNI.

   Weights: symmetric int8, one float scale per 32 inputs (K) per column, stored offset
   by +128 as unsigned bytes so `vpdpbusd` (unsigned x signed) can take them as its first
   operand. Packed in tiles of 16 columns: for tile t, K/4 groups of 64 bytes, each the
   16 columns' four consecutive inputs k..k+3 (the dot-product unit of `vpdpbusd`).
   Scales: for tile t, K/32 rows of 16 floats.

   Activations: each row is quantized per block of 32 inputs (symmetric int8, scale =
   max|x| / 127) and its block sums kept: sum_k (q_w + 128) q_a = sum_k q_w q_a + 128 *
   sum_k q_a, so each block's exact integer dot product starts from -128 * sum q_a (the
   "start" kept per row and block). Rows come in groups of eight, interleaved so that one
   pointer reaches all eight (`q8_quantize_rows`), then the remaining rows one by one.

   Why this kernel exists: every output element is
       y = (((0 + i_0 * (w_0 * a_0)) + i_1 * (w_1 * a_1)) + ...)      (float32, block order)
   with i_b the exact integer dot product of block b, whatever M is, whichever rows share
   the call, and however the columns are split across threads. A verify step of N tokens
   therefore computes each token's row bit for bit as a one-token step does (the
   N-invariance speculative decoding needs), and M rows reuse each 64-byte weight load,
   so a step of 8 tokens reads the weights once, like a step of one.
   Built with -ffp-contract=off: the multiply and add above must not become one FMA
   (the Python reference in `leapc.kernels.q8_gemm` reproduces the arithmetic exactly). */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define Q8_BLOCK 32
#define Q8_TILE 16

/* Where row m's four activations k..k+3 (k % 4 == 0) and its block b's start and scale
   sit: groups of eight rows block-major, [block][k / 4 % 8][row % 8] (4 bytes each, and
   [block][row % 8] for starts and scales), then the rows after the last full group
   row-major. */
static inline int64_t q8_at(int64_t m, int64_t k, int64_t M, int64_t K) {
    return m < M / 8 * 8 ? (m / 8) * 8 * K + ((k / 4) * 8 + m % 8) * 4 : m * K + k;
}
static inline int64_t q8_block_at(int64_t m, int64_t b, int64_t M, int64_t blocks) {
    return m < M / 8 * 8 ? (m / 8) * 8 * blocks + b * 8 + m % 8 : m * blocks + b;
}

/* One row's block of 32 inputs: its 32 int8 (eight groups of four, in a 256-bit
   register), -128 x their sum and their scale. */
static inline __m256i q8_quantize_block(const float *src, int32_t *start, float *scale) {
    __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
    float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));  /* max is exact */
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512 vinv = _mm512_set1_ps(inv);
    __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vinv));  /* round to even */
    __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vinv));
    const __m512i lim = _mm512_set1_epi32(127);
    qlo = _mm512_max_epi32(_mm512_min_epi32(qlo, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
    qhi = _mm512_max_epi32(_mm512_min_epi32(qhi, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
    *start = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));  /* exact */
    *scale = amax / 127.0f;
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(qlo)),
                                   _mm512_cvtepi32_epi8(qhi), 1);
}

/* Quantize rows of x [M, K] (K % 32 == 0) into the layout above: q [M * K] int8, starts
   (-128 x the block's sum) and scales [M * K/32]. A group's eight rows are quantized block
   by block and their 8 x 8 groups of four bytes transposed in registers (this ran on one
   thread before each GEMM's parallel part: with a store per four bytes through `q8_at`,
   all the step's GEMMs spent 0.13 ms here at M = 16). */
void q8_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, int32_t *starts,
                      float *scales) {
    const int64_t blocks = K / Q8_BLOCK, M8 = M / 8 * 8;
    for (int64_t g = 0; g < M8; g += 8) {
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t at = q8_block_at(g, b, M, blocks);
            const float *src = x + g * K + b * Q8_BLOCK;
            __m256i r0 = q8_quantize_block(src, starts + at, scales + at);
            __m256i r1 = q8_quantize_block(src + K, starts + at + 1, scales + at + 1);
            __m256i r2 = q8_quantize_block(src + 2 * K, starts + at + 2, scales + at + 2);
            __m256i r3 = q8_quantize_block(src + 3 * K, starts + at + 3, scales + at + 3);
            __m256i r4 = q8_quantize_block(src + 4 * K, starts + at + 4, scales + at + 4);
            __m256i r5 = q8_quantize_block(src + 5 * K, starts + at + 5, scales + at + 5);
            __m256i r6 = q8_quantize_block(src + 6 * K, starts + at + 6, scales + at + 6);
            __m256i r7 = q8_quantize_block(src + 7 * K, starts + at + 7, scales + at + 7);
            /* rows x four-byte groups -> groups x rows */
            __m256i t0 = _mm256_unpacklo_epi32(r0, r1), t1 = _mm256_unpackhi_epi32(r0, r1);
            __m256i t2 = _mm256_unpacklo_epi32(r2, r3), t3 = _mm256_unpackhi_epi32(r2, r3);
            __m256i t4 = _mm256_unpacklo_epi32(r4, r5), t5 = _mm256_unpackhi_epi32(r4, r5);
            __m256i t6 = _mm256_unpacklo_epi32(r6, r7), t7 = _mm256_unpackhi_epi32(r6, r7);
            __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
            __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
            __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
            __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
            __m256i *dst = (__m256i *)(q + q8_at(g, b * Q8_BLOCK, M, K));
            _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u4, 0x20));
            _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u1, u5, 0x20));
            _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u2, u6, 0x20));
            _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u3, u7, 0x20));
            _mm256_storeu_si256(dst + 4, _mm256_permute2x128_si256(u0, u4, 0x31));
            _mm256_storeu_si256(dst + 5, _mm256_permute2x128_si256(u1, u5, 0x31));
            _mm256_storeu_si256(dst + 6, _mm256_permute2x128_si256(u2, u6, 0x31));
            _mm256_storeu_si256(dst + 7, _mm256_permute2x128_si256(u3, u7, 0x31));
        }
    }
    for (int64_t m = M8; m < M; ++m)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t at = q8_block_at(m, b, M, blocks);
            _mm256_storeu_si256((__m256i *)(q + q8_at(m, b * Q8_BLOCK, M, K)),
                                q8_quantize_block(x + m * K + b * Q8_BLOCK, starts + at,
                                                  scales + at));
        }
}

/* d += dot products of w's unsigned bytes with the four signed bytes at *a, broadcast
   (`_mm512_dpbusd_epi32(d, w, _mm512_set1_epi32(*a))`) as the instruction's own {1to16}
   memory operand: GCC emitted a separate vpbroadcastd per product. */
#define Q8_DPBUSD_BCAST(d, w, a) \
    __asm__("vpdpbusd %[m]%{1to16%}, %[wv], %[dv]" : [dv] "+v"(d) : [wv] "v"(w), [m] "m"(*(a)));

/* R rows x C column tiles of the output, all K: R * C accumulators stay in registers.
   Rows laid out one by one (the rows after the last group of eight). */
static inline __attribute__((always_inline)) void
q8_block(const int R, const int C, const int8_t *q, const int32_t *starts, const float *scales,
         int64_t K, const uint8_t *w, const float *ws, int64_t tile_w, int64_t tile_s,
         float *y, int64_t N) {
    const int64_t blocks = K / Q8_BLOCK;
    __m512 acc[4][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i dot[4][4];
        for (int r = 0; r < R; ++r) {
            __m512i start = _mm512_set1_epi32(starts[r * blocks + b]);
            for (int c = 0; c < C; ++c) dot[r][c] = start;
        }
        for (int j = 0; j < Q8_BLOCK / 4; ++j) {
            __m512i wv[4];
            for (int c = 0; c < C; ++c)
                wv[c] = _mm512_loadu_si512(w + c * tile_w + (b * Q8_BLOCK + 4 * j) * Q8_TILE);
            for (int r = 0; r < R; ++r) {
                __m512i a = _mm512_set1_epi32(*(const int32_t *)(q + r * K + b * Q8_BLOCK + 4 * j));
                for (int c = 0; c < C; ++c) dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], wv[c], a);
            }
        }
        for (int c = 0; c < C; ++c) {
            __m512 s = _mm512_loadu_ps(ws + c * tile_s + b * Q8_TILE);
            for (int r = 0; r < R; ++r) {
                __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(scales[r * blocks + b]));
                acc[r][c] = _mm512_add_ps(acc[r][c],
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][c]), scale));
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + r * N + c * Q8_TILE, acc[r][c]);
}

#define Q8_VARIANT(R, C)                                                                    \
    static void q8_block_##R##x##C(const int8_t *q, const int32_t *st, const float *sc,     \
                                   int64_t K, const uint8_t *w, const float *ws,            \
                                   int64_t tw, int64_t ts, float *y, int64_t N) {           \
        q8_block(R, C, q, st, sc, K, w, ws, tw, ts, y, N);                                  \
    }
Q8_VARIANT(4, 2) Q8_VARIANT(3, 2) Q8_VARIANT(2, 2) Q8_VARIANT(1, 2) Q8_VARIANT(1, 4)
Q8_VARIANT(4, 1) Q8_VARIANT(3, 1) Q8_VARIANT(2, 1) Q8_VARIANT(1, 1)

typedef void (*q8_block_fn)(const int8_t *, const int32_t *, const float *, int64_t,
                            const uint8_t *, const float *, int64_t, int64_t, float *, int64_t);

/* Rows [0, M < 8) over tiles [t0, t1): tiles go two at a time (four for a single row),
   and every group of four rows runs over them while they sit in L1, so each 64-byte
   weight load feeds up to eight accumulators. */
static void q8_few_rows(const int8_t *q, const int32_t *starts, const float *scales, int64_t M,
                        int64_t K, const uint8_t *w, const float *ws, int64_t N, float *y,
                        int64_t t0, int64_t t1) {
    static const q8_block_fn pair[5] = {0, q8_block_1x2, q8_block_2x2, q8_block_3x2, q8_block_4x2};
    static const q8_block_fn one[5] = {0, q8_block_1x1, q8_block_2x1, q8_block_3x1, q8_block_4x1};
    const int64_t blocks = K / Q8_BLOCK, tile_w = K * Q8_TILE, tile_s = blocks * Q8_TILE;
    const int C = M == 1 ? 4 : 2;
    int64_t t = t0;
    for (; t + C <= t1; t += C)
        for (int64_t m = 0; m < M; m += 4) {
            const int R = M - m < 4 ? (int)(M - m) : 4;
            (C == 4 ? q8_block_1x4 : pair[R])(
                q + m * K, starts + m * blocks, scales + m * blocks, K, w + t * tile_w,
                ws + t * tile_s, tile_w, tile_s, y + m * N + t * Q8_TILE, N);
        }
    for (; t < t1; ++t)
        for (int64_t m = 0; m < M; m += 4) {
            const int R = M - m < 4 ? (int)(M - m) : 4;
            one[R](q + m * K, starts + m * blocks, scales + m * blocks, K, w + t * tile_w,
                   ws + t * tile_s, tile_w, tile_s, y + m * N + t * Q8_TILE, N);
        }
}

/* Fetch block b of another tile (its 512 bytes of weights and 64 of scales) into L1
   (the next tile: `q8_gemm_tiles`). */
#define Q8_PREFETCH_BLOCK(pw, ps, b)                                                      \
    {                                                                                     \
        for (int i_ = 0; i_ < 8; ++i_)                                                    \
            _mm_prefetch((const char *)(pw) + (b) * Q8_BLOCK * Q8_TILE + 64 * i_, _MM_HINT_T0); \
        _mm_prefetch((const char *)((ps) + (b) * Q8_TILE), _MM_HINT_T0);                  \
    }

/* One tile of eight interleaved rows (a group of `q8_quantize_rows`), all K: eight
   accumulators, one weight load per four inputs for all eight rows, one pointer to the
   rows' activations. Named variables, not arrays: with eight rows' pointers and sums in
   arrays, GCC spilled them to the stack inside the loop. pw, ps: a tile whose weights and
   scales to prefetch meanwhile, block by block, or NULL. */
#define Q8_ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
static void q8_group(const int8_t *q, const int32_t *starts, const float *scales, int64_t K,
                     const uint8_t *w, const float *ws, float *y, int64_t N,
                     const uint8_t *pw, const float *ps) {
    const int64_t blocks = K / Q8_BLOCK;
#define Q8_ZERO(r) __m512 acc##r = _mm512_setzero_ps();
    Q8_ROWS8(Q8_ZERO)
    for (int64_t b = 0; b < blocks; ++b) {
        const int32_t *start = starts + b * 8;
        const int32_t *a = (const int32_t *)(q + b * 8 * Q8_BLOCK);
        const uint8_t *wb = w + b * Q8_BLOCK * Q8_TILE;
#define Q8_START(r) __m512i dot##r = _mm512_set1_epi32(start[r]);
        Q8_ROWS8(Q8_START)
        if (pw) Q8_PREFETCH_BLOCK(pw, ps, b)
        for (int j = 0; j < Q8_BLOCK / 4; ++j) {
            const __m512i wv = _mm512_loadu_si512(wb + 64 * j);
#define Q8_DOT(r) Q8_DPBUSD_BCAST(dot##r, wv, a + 8 * j + r)
            Q8_ROWS8(Q8_DOT)
        }
        const __m512 s = _mm512_loadu_ps(ws + b * Q8_TILE);
        const float *scale = scales + b * 8;
#define Q8_SUM(r)                                                                         \
    acc##r = _mm512_add_ps(acc##r, _mm512_mul_ps(_mm512_cvtepi32_ps(dot##r),              \
                                                 _mm512_mul_ps(s, _mm512_set1_ps(scale[r]))));
        Q8_ROWS8(Q8_SUM)
    }
#define Q8_STORE(r) _mm512_storeu_ps(y + r * N, acc##r);
    Q8_ROWS8(Q8_STORE)
}

/* Output columns [16 t0, 16 t1) of every row: the unit a thread takes. Groups of eight
   rows take one tile at a time, so a tile's weights are read once for all eight and the
   multiplications run while the next loads are in flight: the weights come from DRAM
   (on this shared machine, L3 did not keep a step's 16 MB from one step to the next), and
   passing over a tile pair once per four rows left the second pass's compute outside
   the load time. All the step's GEMMs at M = 8, one thread: 1.35 -> 1.05 ms (DRAM);
   interleaving the group's rows took 0.89 -> 0.81 ms (hot).
   The first group's pass over tile t also prefetches tile t + 1 (the next one of the
   matrix, whichever task it falls in), spread over its blocks: at M = 16..32 the later
   groups' passes run from L1, and without it DRAM sat idle during them. Two threads,
   weights evicted (bench/bench_q8_gemm.py), against the kernel without it: M = 8 1.23 ->
   1.09 ms, M = 16 1.63 -> 1.45, M = 32 2.49 -> 2.33. Tried and dropped: two groups (16
   rows) per weight load, accumulators kept in y between blocks: slower at M = 16 (1.6 ->
   2.2 ms cold; no gain hot). */
void q8_gemm_tiles(const int8_t *q, const int32_t *starts, const float *scales, int64_t M,
                   int64_t K, const uint8_t *w, const float *ws, int64_t N, float *y,
                   int64_t t0, int64_t t1) {
    const int64_t blocks = K / Q8_BLOCK, tile_w = K * Q8_TILE, tile_s = blocks * Q8_TILE;
    const int64_t M8 = M / 8 * 8, tiles = N / Q8_TILE;
    for (int64_t t = t0; t < t1; ++t)
        for (int64_t m = 0; m < M8; m += 8)
            q8_group(q + m * K, starts + m * blocks, scales + m * blocks, K, w + t * tile_w,
                     ws + t * tile_s, y + m * N + t * Q8_TILE, N,
                     m == 0 && t + 1 < tiles ? w + (t + 1) * tile_w : NULL,
                     ws + (t + 1) * tile_s);
    if (M > M8)
        q8_few_rows(q + M8 * K, starts + M8 * blocks, scales + M8 * blocks, M - M8, K, w, ws,
                    N, y + M8 * N, t0, t1);
}
