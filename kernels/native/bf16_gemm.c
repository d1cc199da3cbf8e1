/* y[M, N] = x[M, K] @ W[K, N] with bfloat16 weights and float32 activations, on AVX-512F.

   Weights: bfloat16 (the top half of a float32), packed in tiles of 16 columns: for tile
   t, K rows of the 16 columns' weights (32 bytes each). Widening one to float32 is a
   16-bit shift, exact.

   Why this kernel exists: it halves the bytes a step streams against float32 weights
   (a decode step at M = 1 reads every weight once, from DRAM) and keeps the arithmetic in
   float32, so a bfloat16 checkpoint runs as stored. Every output element is
       y = fma(x_{K-1}, w_{K-1}, ... fma(x_1, w_1, fma(x_0, w_0, 0)))
   in that order whatever M is, whichever rows share the call, and however the columns
   are split across threads: a verify step of N tokens computes each token's row bit for
   bit as a one-token step does (the N-invariance speculative decoding needs), and M rows
   share each weight load. `leapc.kernels.bf16_gemm.reference` reproduces the arithmetic. */

#include <immintrin.h>
#include <stdint.h>

#define BF16_TILE 16

static inline __m512 widen(const uint16_t *w) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

/* R rows x C column tiles of the output, all K: R * C accumulators stay in registers. */
static inline __attribute__((always_inline)) void
bf16_block(const int R, const int C, const float *x, int64_t K, const uint16_t *w,
           int64_t tile_w, float *y, int64_t N) {
    __m512 acc[8][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m512 wv[4];
        for (int c = 0; c < C; ++c) wv[c] = widen(w + c * tile_w + k * BF16_TILE);
        for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(x[r * K + k]);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(a, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + r * N + c * BF16_TILE, acc[r][c]);
}

#define BF16_VARIANT(R, C)                                                                \
    static void bf16_block_##R##x##C(const float *x, int64_t K, const uint16_t *w,        \
                                     int64_t tw, float *y, int64_t N) {                   \
        bf16_block(R, C, x, K, w, tw, y, N);                                              \
    }
BF16_VARIANT(1, 4)
BF16_VARIANT(1, 2) BF16_VARIANT(2, 2) BF16_VARIANT(3, 2) BF16_VARIANT(4, 2)
BF16_VARIANT(5, 2) BF16_VARIANT(6, 2) BF16_VARIANT(7, 2) BF16_VARIANT(8, 2)
BF16_VARIANT(1, 1) BF16_VARIANT(2, 1) BF16_VARIANT(3, 1) BF16_VARIANT(4, 1)
BF16_VARIANT(5, 1) BF16_VARIANT(6, 1) BF16_VARIANT(7, 1) BF16_VARIANT(8, 1)

typedef void (*bf16_block_fn)(const float *, int64_t, const uint16_t *, int64_t, float *,
                              int64_t);

/* Output columns [16 t0, 16 t1) of every row: the unit a thread takes. Tiles go two at a
   time (four for a single row) under groups of up to eight rows, 16 accumulators. */
void bf16_gemm_tiles(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                     float *y, int64_t t0, int64_t t1) {
    static const bf16_block_fn pair[9] = {0, bf16_block_1x2, bf16_block_2x2, bf16_block_3x2,
                                          bf16_block_4x2, bf16_block_5x2, bf16_block_6x2,
                                          bf16_block_7x2, bf16_block_8x2};
    static const bf16_block_fn one[9] = {0, bf16_block_1x1, bf16_block_2x1, bf16_block_3x1,
                                         bf16_block_4x1, bf16_block_5x1, bf16_block_6x1,
                                         bf16_block_7x1, bf16_block_8x1};
    const int64_t tile_w = K * BF16_TILE;
    const int C = M == 1 ? 4 : 2;
    int64_t t = t0;
    for (; t + C <= t1; t += C)
        for (int64_t m = 0; m < M; m += 8) {
            const int R = M - m < 8 ? (int)(M - m) : 8;
            (C == 4 ? bf16_block_1x4 : pair[R])(x + m * K, K, w + t * tile_w, tile_w,
                                                 y + m * N + t * BF16_TILE, N);
        }
    for (; t < t1; ++t)
        for (int64_t m = 0; m < M; m += 8) {
            const int R = M - m < 8 ? (int)(M - m) : 8;
            one[R](x + m * K, K, w + t * tile_w, tile_w, y + m * N + t * BF16_TILE, N);
        }
}
