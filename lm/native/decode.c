/* A whole GPT decode step on the CPU: one new token per row, every layer, in one call.
 *
 * The per-token cost of a small GPT in eager PyTorch is mostly dispatch and Python over
 * two dozen small matrix products; here, as in llama2.c, the step is plain loops over
 * float32 weights packed into one buffer (lm/native/decode.py packs them, lm/models/gpt.py
 * says which tensor is which). Per layer: norm, qkv projection, QK-norm, rotary positions
 * at each row's own position, the new key and value rounded to the cache's type and
 * written at that position, attention over the row's cache (attention.c's kernel, so a
 * row computes what the layer-by-layer path computes), output projection, residual, norm,
 * MLP, residual; then the final norm, the output layer and the logit soft-cap. Rows may
 * sit at different positions; a row's result does not depend on the others in its batch,
 * nor on the number of threads. Matrices are packed in panels of 8 outputs (`linear`).
 * The threads (`threads`, one OpenMP region per step) share every stage's work.
 *
 * Also here: `lm_draw`, the last step of the engine's sampler (a token from a row of
 * logits, a temperature and a uniform number), and `lm_gpt_generate_*`, a run of decode
 * steps for one row with each step's token drawn by the same code and fed to the next
 * (the engine's path for a sequence running alone).
 *
 * Arguments:
 *   shape    n_layer, n_embd, n_head, mlp hidden width, vocab, context, norm (0 LayerNorm,
 *            1 RMSNorm), mlp (0 GELU, 1 ReLU squared, 2 SwiGLU), matrices (0 float32,
 *            1 bfloat16 pairs, 2 int8 with scales: `linear`)
 *   numbers  eps of the block norms, eps of the QK-norm, logit soft-cap (0: none)
 *   weights  the packed tensors, float32 but for bfloat16 and int8 matrices; `offsets` says
 *            where each slot starts, in floats (-1: absent)
 *   ids, pos [batch] int64: each row's new token and its position (< context)
 *   k_caches, v_caches  per layer, keys and values [rows, heads, ctx, dim] in the cache's
 *            type (int8: dim + 4 bytes a vector, attention.c), rows `cache_row_stride`
 *            elements apart
 *   logits   [batch, vocab] float32, written
 *   threads  how many threads share the step
 * Returns 0; or, with nothing written, 1 when the scratch could not be allocated, 2 for a
 * token outside the vocabulary, 3 for a position outside the context, 4 for bfloat16
 * matrices in a build without them (`lm_bf16_weights`), 5 for int8 matrices in a build
 * without them (`lm_i8_weights`).
 */
#define LM_ATTENTION_HELPERS_ONLY /* attend_one and friends, not attention.c's exports */
#include "attention.c"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Global slots, then SLOTS_PER_LAYER slots for each layer (lm/native/decode.py: SLOTS). */
enum { WTE, WPE, LNF_W, LNF_B, HEAD, ROPE_COS, ROPE_SIN, GLOBAL_SLOTS };
enum {
    LN1_W, LN1_B, ATTN_W, ATTN_B, Q_NORM, K_NORM, PROJ_W, PROJ_B,
    LN2_W, LN2_B, FC_W, FC_B, MLP_PROJ_W, MLP_PROJ_B, SLOTS_PER_LAYER
};
enum { GELU, RELU2, SWIGLU };
#define PAD(n) (((n) + 15) & ~(int64_t)15) /* floats, to a multiple of 64 bytes */

/* Float to IEEE half, rounding to nearest even as PyTorch's `Tensor.to` does
   (F. Giesen's float_to_half_fast3_rtne). */
static inline uint16_t float_to_half(float value)
{
    const uint32_t infinity = 255u << 23, too_big = (127u + 16) << 23;
    const uint32_t subnormal_magic = ((127u - 15) + (23 - 10) + 1) << 23;
    uint32_t f = float_to_bits(value);
    uint32_t sign = f & 0x80000000u;
    uint16_t h;
    f ^= sign;
    if (f >= too_big) {
        h = f > infinity ? 0x7e00 : 0x7c00;
    } else if (f < 113u << 23) {
        /* A float addition rounds the mantissa into half subnormal position. */
        float shifted = bits_to_float(f) + bits_to_float(subnormal_magic);
        h = (uint16_t)(float_to_bits(shifted) - subnormal_magic);
    } else {
        uint32_t odd = (f >> 13) & 1;
        f += ((uint32_t)(15 - 127) << 23) + 0xfff + odd;
        h = (uint16_t)(f >> 13);
    }
    return h | (uint16_t)(sign >> 16);
}

/* Float to bfloat16, rounding to nearest even (NaN stays NaN), as PyTorch does. */
static inline uint16_t float_to_bf16(float value)
{
    uint32_t bits = float_to_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

/* `n` floats as the cache holds them. int8 (lm/kv_int8.py's `quantize`, the same float
   operations): scale = max|x| * (1/127), q = round(x * (1 / scale)) to even, the scale's
   four bytes after the numbers. */
static void store(void *to, const float *from, int64_t n, enum element kind)
{
    if (kind == F32) {
        memcpy(to, from, n * sizeof(float));
    } else if (kind == I8) {
        float amax = 0.0f;
        for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(from[i]));
        const float scale = amax * (1.0f / 127.0f), inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
        int8_t *out = to;
        for (int64_t i = 0; i < n; i++) {
            float q = nearbyintf(from[i] * inverse);
            out[i] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
        }
        memcpy(out + n, &scale, sizeof scale);
    } else {
        uint16_t *out = to;
        for (int64_t i = 0; i < n; i++)
            out[i] = kind == F16 ? float_to_half(from[i]) : float_to_bf16(from[i]);
    }
}

/* Eight floats: GCC and Clang turn arithmetic on these into one vector instruction each
   (AVX2 with -march=native; two SSE or NEON ones elsewhere). */
typedef float v8 __attribute__((vector_size(32)));
#define PANEL 8 /* outputs per panel */

/* The sums of `R` rows x `P` panels. Every kernel below sums an output in one order, so a
   row's result does not depend on which kernel, batch or thread computed it: two chains
   of multiply-adds, over the even inputs and over the odd ones, each in input order, then
   added. One or two rows run the two chains side by side (eight independent sums keep
   both FMA units busy); more rows run them one after the other, four or five rows by
   two panels at a time (ten sums, two weight vectors and a broadcast input in registers;
   GCC spills from six rows on): 10 multiply-adds for 7 loads, against 8 for 8 with two
   rows side by side. */
#define PANEL_KERNEL(R, P)                                                                    \
    static inline __attribute__((always_inline)) void f32_kernel_##R##x##P(                 \
        const float *restrict w, const float *restrict x, int64_t x_stride, int64_t in,       \
        v8 out[R][P])                                                                         \
    {                                                                                         \
        v8 even[R][P], odd[R][P];                                                             \
        for (int r = 0; r < R; r++)                                                           \
            for (int p = 0; p < P; p++) even[r][p] = odd[r][p] = (v8){0};                     \
        if (R * P <= 4) {                                                                     \
            int64_t i = 0;                                                                    \
            for (; i + 2 <= in; i += 2)                                                       \
                for (int p = 0; p < P; p++) {                                                 \
                    v8 w0 = *(const v8 *)(w + (p * in + i) * PANEL);                          \
                    v8 w1 = *(const v8 *)(w + (p * in + i + 1) * PANEL);                      \
                    for (int r = 0; r < R; r++) {                                             \
                        even[r][p] += w0 * x[r * x_stride + i];                               \
                        odd[r][p] += w1 * x[r * x_stride + i + 1];                            \
                    }                                                                         \
                }                                                                             \
            if (i < in)                                                                       \
                for (int p = 0; p < P; p++)                                                   \
                    for (int r = 0; r < R; r++)                                               \
                        even[r][p] += *(const v8 *)(w + (p * in + i) * PANEL) * x[r * x_stride + i]; \
        } else {                                                                              \
            for (int64_t i = 0; i < in; i += 2)                                               \
                for (int p = 0; p < P; p++) {                                                 \
                    v8 weights = *(const v8 *)(w + (p * in + i) * PANEL);                     \
                    for (int r = 0; r < R; r++) even[r][p] += weights * x[r * x_stride + i];  \
                }                                                                             \
            for (int64_t i = 1; i < in; i += 2)                                               \
                for (int p = 0; p < P; p++) {                                                 \
                    v8 weights = *(const v8 *)(w + (p * in + i) * PANEL);                     \
                    for (int r = 0; r < R; r++) odd[r][p] += weights * x[r * x_stride + i];   \
                }                                                                             \
        }                                                                                     \
        for (int r = 0; r < R; r++)                                                           \
            for (int p = 0; p < P; p++) out[r][p] = even[r][p] + odd[r][p];                   \
    }

PANEL_KERNEL(1, 4)
PANEL_KERNEL(1, 2)
PANEL_KERNEL(2, 2)
PANEL_KERNEL(4, 2)
PANEL_KERNEL(5, 2)
#define TILE_ROWS 5

/* Write one panel's sums (plus bias) into y's row, or add them to it; the last panel of a
   width that is not a multiple of 8 writes only the outputs that exist. */
static inline void panel_store(v8 sums, const float *bias, float *y, int64_t o, int64_t out,
                               int accumulate)
{
    float lanes[PANEL];
    memcpy(lanes, &sums, sizeof lanes);
    int64_t n = out - o < PANEL ? out - o : PANEL;
    for (int64_t l = 0; l < n; l++) {
        float value = bias ? lanes[l] + bias[o + l] : lanes[l];
        y[o + l] = accumulate ? y[o + l] + value : value;
    }
}

static void activate_group(const float *restrict f, int64_t f_stride, float *restrict a,
                           int64_t a_stride, int64_t batch, int64_t p0, int64_t count,
                           int64_t hidden, int kind);

#if defined(__AVX512BF16__) && defined(__AVX512VL__) /* attention.c includes immintrin.h */
#define BF16_WEIGHTS 1
/* The same sums from bfloat16 weights and inputs, where the CPU multiplies bfloat16 pairs
   (AVX512-BF16): a panel is [in / 2][PANEL][2], inputs 2i and 2i + 1's weights side by
   side for each of the panel's eight outputs, so one VDPBF16PS adds both products (each
   exact in float32) to each output's float32 sum: twice the products of a float32
   multiply-add, from half the bytes. The inputs come as bfloat16 pairs (`to_pairs`), one
   32-bit word per pair; `pairs` is in / 2 rounded up (an odd width's last pair ends in
   zeros). Each output is summed in one order whatever the tile: the even pairs and the odd
   pairs in two chains, then added. */
#define BF16_KERNEL(R, P)                                                                     \
    static inline __attribute__((always_inline)) void bf16_kernel_##R##x##P(                  \
        const uint16_t *restrict w, const uint32_t *restrict x, int64_t x_stride,             \
        int64_t pairs, v8 out[R][P])                                                          \
    {                                                                                         \
        __m256 even[R][P], odd[R][P];                                                         \
        for (int r = 0; r < R; r++)                                                           \
            for (int p = 0; p < P; p++) even[r][p] = odd[r][p] = _mm256_setzero_ps();         \
        int64_t i = 0;                                                                        \
        for (; i + 2 <= pairs; i += 2)                                                        \
            for (int p = 0; p < P; p++) {                                                     \
                const uint16_t *at = w + (p * pairs + i) * 2 * PANEL;                         \
                __m256bh w0 = (__m256bh)_mm256_loadu_si256((const __m256i *)at);             \
                __m256bh w1 = (__m256bh)_mm256_loadu_si256((const __m256i *)(at + 2 * PANEL)); \
                for (int r = 0; r < R; r++) {                                                 \
                    __m256i x0 = _mm256_set1_epi32((int)x[r * x_stride + i]);                 \
                    __m256i x1 = _mm256_set1_epi32((int)x[r * x_stride + i + 1]);             \
                    even[r][p] = _mm256_dpbf16_ps(even[r][p], w0, (__m256bh)x0);              \
                    odd[r][p] = _mm256_dpbf16_ps(odd[r][p], w1, (__m256bh)x1);                \
                }                                                                             \
            }                                                                                 \
        if (i < pairs)                                                                        \
            for (int p = 0; p < P; p++) {                                                     \
                const uint16_t *at = w + (p * pairs + i) * 2 * PANEL;                         \
                __m256bh w0 = (__m256bh)_mm256_loadu_si256((const __m256i *)at);             \
                for (int r = 0; r < R; r++) {                                                 \
                    __m256i x0 = _mm256_set1_epi32((int)x[r * x_stride + i]);                 \
                    even[r][p] = _mm256_dpbf16_ps(even[r][p], w0, (__m256bh)x0);              \
                }                                                                             \
            }                                                                                 \
        for (int r = 0; r < R; r++)                                                           \
            for (int p = 0; p < P; p++) out[r][p] = (v8)_mm256_add_ps(even[r][p], odd[r][p]); \
    }

BF16_KERNEL(1, 4)
BF16_KERNEL(1, 2)
BF16_KERNEL(2, 2)
BF16_KERNEL(4, 2)
BF16_KERNEL(5, 2)

/* `rows` rows of `in` floats, `x_stride` apart, as bfloat16 pairs (rounded to nearest
   even), `pairs_stride` words apart. */
static void to_pairs(const float *restrict x, int64_t x_stride, uint32_t *restrict pairs,
                     int64_t pairs_stride, int64_t rows, int64_t in)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        uint32_t *out = pairs + r * pairs_stride;
        int64_t i = 0;
        for (; i + 16 <= in; i += 16)
            _mm256_storeu_si256((__m256i *)(out + i / 2),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + i)));
        for (; i < in; i += 2) {
            uint32_t high = i + 1 < in ? float_to_bf16(xr[i + 1]) : 0;
            out[i / 2] = float_to_bf16(xr[i]) | high << 16;
        }
    }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define I8_WEIGHTS 1
/* The sums from int8 weights and inputs, where the CPU multiplies bytes (AVX512-VNNI), as
   CTranslate2's int8 does: each output's weights are rounded to int8 with one float32 scale
   (max |w| / 127), and each row of inputs, when a product needs it, to int8 with its own
   scale (`to_quads`), plus 128 so that one VPDPBUSD multiplies four unsigned inputs by four
   signed weights and adds them to an int32 sum: four products per lane where bfloat16
   pairs give two, from a quarter of float32's bytes. The sum is exact (integers); the 128s
   come off with the output's `128 * sum(weights)` (`comp`), and
   y = (sum - comp) * (input scale * weight scale). A panel is [in / 4][PANEL][4] int8
   (inputs 4i .. 4i + 3 side by side for each of its eight outputs), then the eight scales
   and the eight comps: I8_PANEL_BYTES(quads) bytes. */
#define I8_PANEL_BYTES(quads) ((quads) * 4 * PANEL + 2 * PANEL * 4)
#define I8_KERNEL(R, P)                                                                       \
    static inline __attribute__((always_inline)) void i8_kernel_##R##x##P(                    \
        const int8_t *restrict w, const uint32_t *restrict x, int64_t x_stride,               \
        int64_t quads, __m256i out[R][P])                                                     \
    {                                                                                         \
        const int64_t stride = I8_PANEL_BYTES(quads);                                         \
        /* Integer sums: any order gives the same. One row runs two chains per panel (the  \
           even and the odd quads), to hide the multiply-add's latency. */                   \
        const int chains = R == 1 ? 2 : 1;                                                    \
        __m256i acc[2][R][P];                                                                 \
        for (int c = 0; c < 2; c++)                                                           \
            for (int r = 0; r < R; r++)                                                       \
                for (int p = 0; p < P; p++) acc[c][r][p] = _mm256_setzero_si256();            \
        int64_t i = 0;                                                                        \
        for (; i + chains <= quads; i += chains)                                              \
            for (int c = 0; c < chains; c++)                                                  \
                for (int p = 0; p < P; p++) {                                                 \
                    __m256i weights =                                                         \
                        _mm256_loadu_si256((const __m256i *)(w + p * stride + (i + c) * 4 * PANEL)); \
                    for (int r = 0; r < R; r++)                                               \
                        acc[c][r][p] = _mm256_dpbusd_epi32(                                   \
                            acc[c][r][p], _mm256_set1_epi32((int)x[r * x_stride + i + c]), weights); \
                }                                                                             \
        for (; i < quads; i++)                                                                \
            for (int p = 0; p < P; p++) {                                                     \
                __m256i weights =                                                             \
                    _mm256_loadu_si256((const __m256i *)(w + p * stride + i * 4 * PANEL));    \
                for (int r = 0; r < R; r++)                                                   \
                    acc[0][r][p] = _mm256_dpbusd_epi32(                                       \
                        acc[0][r][p], _mm256_set1_epi32((int)x[r * x_stride + i]), weights);  \
            }                                                                                 \
        for (int r = 0; r < R; r++)                                                           \
            for (int p = 0; p < P; p++) out[r][p] = _mm256_add_epi32(acc[0][r][p], acc[1][r][p]); \
    }

I8_KERNEL(1, 4)
I8_KERNEL(1, 2)
I8_KERNEL(2, 2)
I8_KERNEL(4, 2)
I8_KERNEL(5, 2)

/* `rows` rows of `in` floats, `x_stride` apart, rounded to int8 plus 128 (unsigned bytes,
   four to a word; 128 past `in`, to a whole word), `q_stride` words apart; each row's scale
   (max |x| / 127, a float) in the word after its bytes. round(x * (1 / scale)), halves to
   even, as lm/native/decode.py's `quantize_rows`. A row with a NaN or an infinity gets a
   NaN scale, so that all its outputs are NaN (the engine then fails that row alone). */
static void to_quads(const float *restrict x, int64_t x_stride, uint32_t *restrict q,
                     int64_t q_stride, int64_t rows, int64_t in)
{
    const int64_t quads = (in + 3) / 4;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        uint8_t *out = (uint8_t *)(q + r * q_stride);
        /* max |x| by the bits (integer order of non-negative floats; NaN above infinity):
           -ffast-math lets the compiler assume every float is finite. */
        uint32_t top = 0;
        for (int64_t i = 0; i < in; i++) {
            uint32_t bits = float_to_bits(xr[i]) & 0x7fffffffu;
            top = bits > top ? bits : top;
        }
        float scale = bits_to_float(top) * (1.0f / 127.0f);
        float inverse = top ? 1.0f / scale : 0.0f;
        if (top >= 0x7f800000u) scale = bits_to_float(0x7fc00000u), inverse = 0.0f;
        int64_t i = 0;
        const __m512 by = _mm512_set1_ps(inverse);
        for (; i + 16 <= in; i += 16) {
            __m512i n = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), by));
            n = _mm512_min_epi32(_mm512_max_epi32(n, _mm512_set1_epi32(-127)),
                                 _mm512_set1_epi32(127));
            n = _mm512_add_epi32(n, _mm512_set1_epi32(128));
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(n));
        }
        for (; i < in; i++) {
            float n = nearbyintf(xr[i] * inverse);
            n = n < -127.0f ? -127.0f : n > 127.0f ? 127.0f : n;
            out[i] = (uint8_t)((int)n + 128);
        }
        for (; i < 4 * quads; i++) out[i] = 128;
        memcpy(q + r * q_stride + quads, &scale, sizeof scale);
    }
}

/* One panel's int32 sums for a row whose input scale is `scale`, as floats (plus bias)
   into y's row, or added to it (panel_store). */
static inline void i8_store(__m256i sums, const int8_t *panel, int64_t quads, float scale,
                            const float *bias, float *y, int64_t o, int64_t out, int accumulate)
{
    const int8_t *tail = panel + quads * 4 * PANEL;
    __m256 w_scale = _mm256_loadu_ps((const float *)tail);
    __m256i comp = _mm256_loadu_si256((const __m256i *)(tail + PANEL * 4));
    __m256 value = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, comp));
    /* Each product as written: -ffast-math lets the compiler reassociate the three factors
       or fuse the last product with the addition of the bias or residual, differently in
       different inlined tiles, and a row's numbers would then depend on its tile. */
    __m256 factor = _mm256_mul_ps(_mm256_set1_ps(scale), w_scale);
    __asm__("" : "+x"(factor));
    value = _mm256_mul_ps(value, factor);
    __asm__("" : "+x"(value));
    panel_store((v8)value, bias, y, o, out, accumulate);
}

#define I8_TILE(R, P)                                                                         \
    do {                                                                                      \
        __m256i sums[R][P];                                                                   \
        const int8_t *first = w + p * I8_PANEL_BYTES(in);                                     \
        i8_kernel_##R##x##P(first, x + b * x_stride, x_stride, in, sums);                     \
        for (int r = 0; r < R; r++) {                                                         \
            float scale;                                                                      \
            memcpy(&scale, x + (b + r) * x_stride + in, sizeof scale);                        \
            for (int q = 0; q < P; q++)                                                       \
                i8_store(sums[r][q], first + q * I8_PANEL_BYTES(in), in, scale, bias,         \
                         y + (b + r) * y_stride, (p + q) * PANEL, out, accumulate);           \
        }                                                                                     \
    } while (0)

/* As `f32_tile` (`in` counts quads). */
static inline void i8_tile(const int8_t *restrict w, const float *restrict bias,
                           const uint32_t *restrict x, int64_t x_stride, float *restrict y,
                           int64_t y_stride, int64_t b, int64_t rows, int64_t p, int64_t in,
                           int64_t out, int accumulate)
{
    switch (rows) {
    case 1: I8_TILE(1, 2); break;
    case 2: I8_TILE(2, 2); break;
    case 3: I8_TILE(2, 2); b += 2; I8_TILE(1, 2); break;
    case 4: I8_TILE(4, 2); break;
    default: I8_TILE(5, 2); break;
    }
}
#endif

/* One tile: `R` rows from row `b` by `P` panels from panel `p` of the `FAMILY` kernels
   (f32 or bf16; `in` counts their inputs: floats or pairs), computed and stored. */
#define TILE(FAMILY, R, P)                                                                    \
    do {                                                                                      \
        v8 sums[R][P];                                                                        \
        FAMILY##_kernel_##R##x##P(w + p * in * (PANEL * sizeof(float) / sizeof *w),          \
                                  x + b * x_stride, x_stride, in, sums);                      \
        for (int r = 0; r < R; r++)                                                           \
            for (int q = 0; q < P; q++)                                                       \
                panel_store(sums[r][q], bias, y + (b + r) * y_stride, (p + q) * PANEL, out,   \
                            accumulate);                                                      \
    } while (0)

/* Rows b .. b + rows - 1 (at most TILE_ROWS) by panels p and p + 1. */
#define DEFINE_TILE(FAMILY, WEIGHT, INPUT)                                                    \
    static inline void FAMILY##_tile(const WEIGHT *restrict w, const float *restrict bias,    \
                                     const INPUT *restrict x, int64_t x_stride,               \
                                     float *restrict y, int64_t y_stride, int64_t b,          \
                                     int64_t rows, int64_t p, int64_t in, int64_t out,        \
                                     int accumulate)                                          \
    {                                                                                         \
        switch (rows) {                                                                       \
        case 1: TILE(FAMILY, 1, 2); break;                                                    \
        case 2: TILE(FAMILY, 2, 2); break;                                                    \
        case 3: TILE(FAMILY, 2, 2); b += 2; TILE(FAMILY, 1, 2); break;                        \
        case 4: TILE(FAMILY, 4, 2); break;                                                    \
        default: TILE(FAMILY, 5, 2); break;                                                   \
        }                                                                                     \
    }

DEFINE_TILE(f32, float, float)
#ifdef BF16_WEIGHTS
DEFINE_TILE(bf16, uint16_t, uint32_t)
#endif
#define f32_ONE_ROW TILE(f32, 1, 4)
#define bf16_ONE_ROW TILE(bf16, 1, 4)
#define i8_ONE_ROW I8_TILE(1, 4)

/* One group of four panels, for every row: TILE_ROWS rows at a time by two panels (one row
   alone takes all four at once). */
#define GROUP(FAMILY)                                                                         \
    do {                                                                                      \
        if (batch == 1 && end - p0 == 4) {                                                    \
            const int64_t b = 0, p = p0;                                                      \
            FAMILY##_ONE_ROW;                                                                 \
        } else {                                                                              \
            for (int64_t b = 0; b < batch; b += TILE_ROWS)                                    \
                for (int64_t p = p0; p < end; p += 2)                                         \
                    FAMILY##_tile(w, bias, x, x_stride, y, y_stride, b,                       \
                                  batch - b < TILE_ROWS ? batch - b : TILE_ROWS, p, in, out,  \
                                  accumulate);                                                \
        }                                                                                     \
    } while (0)

/* What the matrices hold (shape[8]). */
enum { F32_MATRICES, BF16_MATRICES, I8_MATRICES };

/* The weights of a `linear`: float32, bfloat16 pairs or int8 (`kind`), with `pairs`, a
   thread's own scratch for the inputs as pairs or quads, `pairs_stride` words a row; `in`
   counts floats either way. */
struct matrix {
    const void *w;
    int kind;
    uint32_t *pairs;
    int64_t pairs_stride;
};

static inline void linear_group(struct matrix m, const float *restrict bias,
                                const float *restrict x_f32, int64_t x_stride_f32,
                                float *restrict y, int64_t y_stride, int64_t batch, int64_t in_f32,
                                int64_t out, int accumulate, int act, float *restrict a,
                                int64_t a_stride, int64_t hidden, int64_t panels, int64_t g)
{
    const int64_t p0 = 4 * g, end = panels < p0 + 4 ? panels : p0 + 4;
#ifdef BF16_WEIGHTS
    if (m.kind == BF16_MATRICES) {
        const uint16_t *w = m.w;
        const uint32_t *x = m.pairs;
        const int64_t x_stride = m.pairs_stride, in = (in_f32 + 1) / 2;
        GROUP(bf16);
    } else
#endif
#ifdef I8_WEIGHTS
    if (m.kind == I8_MATRICES) {
        const int8_t *w = m.w;
        const uint32_t *x = m.pairs;
        const int64_t x_stride = m.pairs_stride, in = (in_f32 + 3) / 4;
        GROUP(i8);
    } else
#endif
    {
        const float *w = m.w, *x = x_f32;
        const int64_t x_stride = x_stride_f32, in = in_f32;
        GROUP(f32);
    }
    if (act >= 0) activate_group(y, y_stride, a, a_stride, batch, p0, end - p0, hidden, act);
}

/* y[b, o] (+)= W[o, :] . x[b, :] + bias[o] for `batch` rows `x_stride` and `y_stride`
   apart. W is packed in panels (lm/native/decode.py): outputs 8p..8p+7 are the panel p,
   [in][8] (bfloat16: [in / 2][8][2]), so one vector load holds one input's (or pair's)
   weights for eight outputs and no sum is reduced across vector lanes. Groups of four
   panels are read for TILE_ROWS rows at a time, two panels at a time (one row alone takes
   all four at once); the threads (inside the step's parallel region) take the groups.
   With `act` (an MLP kind; -1 for none) each group's outputs are also
   activated into `a` (`activate_group`). */
static void linear(struct matrix m, const float *restrict bias, const float *restrict x,
                   int64_t x_stride, float *restrict y, int64_t y_stride, int64_t batch,
                   int64_t in, int64_t out, int accumulate, int act, float *restrict a,
                   int64_t a_stride, int64_t hidden)
{
    const int64_t panels = 2 * ((out + 2 * PANEL - 1) / (2 * PANEL)), groups = (panels + 3) / 4;
    /* Every thread converts the rows for itself: no wait for the others. */
#ifdef BF16_WEIGHTS
    if (m.kind == BF16_MATRICES) to_pairs(x, x_stride, m.pairs, m.pairs_stride, batch, in);
#endif
#ifdef I8_WEIGHTS
    if (m.kind == I8_MATRICES) to_quads(x, x_stride, m.pairs, m.pairs_stride, batch, in);
#endif
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++)
        linear_group(m, bias, x, x_stride, y, y_stride, batch, in, out, accumulate, act, a,
                     a_stride, hidden, panels, g);
}

/* LayerNorm (with `bias` or none) or, when `rms`, RMSNorm of each of `rows` vectors of
   size `n`, `stride` apart. */
static void norm(const float *x, float *y, const float *weight, const float *bias, int64_t rows,
                 int64_t n, int64_t stride, float eps, int rms)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * stride;
        float *yr = y + r * stride;
        float mean = 0.0f, var = 0.0f;
        if (!rms) {
#pragma omp simd reduction(+ : mean)
            for (int64_t i = 0; i < n; i++) mean += xr[i];
            mean /= (float)n;
        }
#pragma omp simd reduction(+ : var)
        for (int64_t i = 0; i < n; i++) var += (xr[i] - mean) * (xr[i] - mean);
        float inv = 1.0f / sqrtf(var / (float)n + eps);
        for (int64_t i = 0; i < n; i++) {
            float v = (xr[i] - mean) * inv * weight[i];
            yr[i] = bias ? v + bias[i] : v;
        }
    }
}

/* Rotate one head's vector by position `p` (rotate-half convention; tables [ctx, dim]). */
static void rotate(float *restrict x, const float *cos_table, const float *sin_table, int64_t p,
                   int64_t dim)
{
    const float *c = cos_table + p * dim, *s = sin_table + p * dim;
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float first = x[i], second = x[i + half];
        x[i] = first * c[i] - second * s[i];
        x[i + half] = second * c[i + half] + first * s[i + half];
    }
}

/* One hidden unit of an MLP: SwiGLU's gate times up, GELU (erf form). */
static inline float swiglu(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

static inline float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* The MLP's activation for the fc outputs of panels p0..p0+count-1, into `a`. SwiGLU's fc
   weights are packed with gate and up panels alternating (lm/native/decode.py), so a
   group of panels holds whole (gate, up) pairs: panel 2k's eight gates and panel 2k+1's
   eight ups make hidden units 8k..8k+7. The thread that computed a group activates it,
   with no wait for the others. */
static void activate_group(const float *restrict f, int64_t f_stride, float *restrict a,
                           int64_t a_stride, int64_t batch, int64_t p0, int64_t count,
                           int64_t hidden, int kind)
{
    for (int64_t b = 0; b < batch; b++) {
        float *ab = a + b * a_stride;
        const float *fb = f + b * f_stride;
        if (kind == SWIGLU) {
            for (int64_t k = p0 / 2; k < (p0 + count) / 2; k++) {
                const float *gate = fb + 2 * k * PANEL, *up = gate + PANEL;
                if ((k + 1) * PANEL <= hidden) { /* a whole panel: one vector expf */
#pragma omp simd
                    for (int64_t l = 0; l < PANEL; l++)
                        ab[k * PANEL + l] = swiglu(gate[l], up[l]);
                } else {
                    for (int64_t l = 0; k * PANEL + l < hidden; l++)
                        ab[k * PANEL + l] = swiglu(gate[l], up[l]);
                }
            }
            continue;
        }
        int64_t last = (p0 + count) * PANEL < hidden ? (p0 + count) * PANEL : hidden;
        if (kind == RELU2) {
            for (int64_t i = p0 * PANEL; i < last; i++) {
                float r = fb[i] > 0.0f ? fb[i] : 0.0f;
                ab[i] = r * r;
            }
        } else { /* GELU: a whole panel through one vector erff, as SwiGLU's expf above */
            for (int64_t i = p0 * PANEL; i < last; i += PANEL) {
                if (i + PANEL <= last) {
#pragma omp simd
                    for (int64_t l = i; l < i + PANEL; l++) ab[l] = gelu(fb[l]);
                } else {
                    for (int64_t l = i; l < last; l++) ab[l] = gelu(fb[l]);
                }
            }
        }
    }
}

/* One head of one row: attention.c's item, with the head size as a constant where common. */
#define ATTEND_ITEM(DIM, KIND)                                                                \
    attend_one(q, 0, new_key, new_value, 0, keys, values, 0, pos, out, heads, DIM, ctx,      \
               scale, h, h + 1 < heads ? h + 1 : -1, scores, KIND)

#define DEFINE_ATTEND_HEAD(NAME, KIND)                                                        \
    static void NAME(const float *q, const void *new_key, const void *new_value, char *keys,  \
                     char *values, const int64_t *pos, int64_t h, float *out, int64_t heads,  \
                     int64_t dim, int64_t ctx, float scale, float *scores)                    \
    {                                                                                         \
        switch (dim) {                                                                        \
        case 16: ATTEND_ITEM(16, KIND); break;                                                \
        case 32: ATTEND_ITEM(32, KIND); break;                                                \
        case 64: ATTEND_ITEM(64, KIND); break;                                                \
        default: ATTEND_ITEM(dim, KIND);                                                      \
        }                                                                                     \
    }

DEFINE_ATTEND_HEAD(attend_head_f32, F32)
DEFINE_ATTEND_HEAD(attend_head_f16, F16)
DEFINE_ATTEND_HEAD(attend_head_bf16, BF16)
DEFINE_ATTEND_HEAD(attend_head_i8, I8)

/* What one decode step's threads share: the model's numbers and weights, the batch, and the
   step's scratch arrays (each row 64 bytes aligned: the vectorised loops then sum in one
   order, and a row's result is its own). */
struct step {
    int64_t n_layer, n_embd, heads, hidden, vocab, ctx, mlp, dim, fc_out;
    int rms;
    float eps, qk_eps, softcap, scale;
    const float *weights;
    const int64_t *offsets, *ids, *pos;
    void *const *k_caches, *const *v_caches;
    int64_t cache_row_stride, batch;
    float *logits;
    enum element kind;
    int matrices;                       /* F32_MATRICES, BF16_MATRICES or I8_MATRICES */
    int64_t row, qkv_row, f_row, a_row; /* scratch row strides, in floats */
    int64_t pairs_row; /* a row of inputs as bfloat16 pairs or int8 quads, in words */
    float *x, *qkv, *att, *f, *a;       /* [batch, *_row] */
    int chunk;                          /* attention items a thread takes at a time */
};

/* The step, run by every thread of its parallel region: each stage is a work-shared loop
   (over rows, (row, head) pairs, or groups of output panels in `linear`) whose end is a
   barrier. `scores`, `new_kv`, `h` and `pairs` are the thread's own scratch (attention
   scores, a row's new keys and values, normalised rows, a row of inputs as bfloat16 pairs:
   every thread normalises every row, instead of waiting for the others to). */
static void step_layers(const struct step *s, float *scores, char *new_kv, float *h,
                        uint32_t *pairs)
{
    const int64_t n_embd = s->n_embd, heads = s->heads, dim = s->dim, row = s->row;
    const int64_t qkv_row = s->qkv_row, f_row = s->f_row, a_row = s->a_row, nb = s->batch;
    const size_t size = element_size(s->kind);
    const int64_t vector = vector_bytes(dim, s->kind); /* a head's cached key, in bytes */
    const int64_t *ids = s->ids, *pos = s->pos;
    float *x = s->x, *qkv = s->qkv, *att = s->att, *f = s->f, *a = s->a, *logits = s->logits;
#define SLOT(i) (s->offsets[i] < 0 ? NULL : s->weights + s->offsets[i])
#define LAYER_SLOT(layer, i) SLOT(GLOBAL_SLOTS + (layer) * SLOTS_PER_LAYER + (i))
    const float *wte = SLOT(WTE), *wpe = SLOT(WPE);
    const float *cos_table = SLOT(ROPE_COS), *sin_table = SLOT(ROPE_SIN);
#define MATRIX(w) ((struct matrix){(w), s->matrices, pairs, s->pairs_row})

#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const float *token = wte + ids[b] * n_embd;
        for (int64_t i = 0; i < n_embd; i++)
            x[b * row + i] = wpe ? token[i] + wpe[pos[b] * n_embd + i] : token[i];
    }
    for (int64_t layer = 0; layer < s->n_layer; layer++) {
        norm(x, h, LAYER_SLOT(layer, LN1_W), LAYER_SLOT(layer, LN1_B), nb, n_embd, row, s->eps,
             s->rms);
        linear(MATRIX(LAYER_SLOT(layer, ATTN_W)), LAYER_SLOT(layer, ATTN_B), h, row, qkv, qkv_row,
               nb, n_embd, 3 * n_embd, 0, -1, NULL, 0, 0);
        const float *q_norm = LAYER_SLOT(layer, Q_NORM), *k_norm = LAYER_SLOT(layer, K_NORM);
        char *k_cache = s->k_caches[layer], *v_cache = s->v_caches[layer];
#pragma omp for schedule(dynamic, s->chunk)
        for (int64_t item = 0; item < nb * heads; item++) {
            const int64_t b = item / heads, head = item % heads;
            float *q = qkv + b * qkv_row, *k = q + n_embd, *v = k + n_embd;
            if (q_norm) {
                norm(q + head * dim, q + head * dim, q_norm, NULL, 1, dim, dim, s->qk_eps, 1);
                norm(k + head * dim, k + head * dim, k_norm, NULL, 1, dim, dim, s->qk_eps, 1);
            }
            if (cos_table) {
                rotate(q + head * dim, cos_table, sin_table, pos[b], dim);
                rotate(k + head * dim, cos_table, sin_table, pos[b], dim);
            }
            /* This head's new key and value, in the cache's type, where attend_one looks
               for them in a row's. */
            char *new_key = new_kv, *new_value = new_kv + heads * vector;
            store(new_key + head * vector, k + head * dim, dim, s->kind);
            store(new_value + head * vector, v + head * dim, dim, s->kind);
            char *keys = k_cache + b * s->cache_row_stride * size;
            char *values = v_cache + b * s->cache_row_stride * size;
            float *out = att + b * row;
            if (s->kind == F32)
                attend_head_f32(q, new_key, new_value, keys, values, pos + b, head, out, heads,
                                dim, s->ctx, s->scale, scores);
            else if (s->kind == F16)
                attend_head_f16(q, new_key, new_value, keys, values, pos + b, head, out, heads,
                                dim, s->ctx, s->scale, scores);
            else if (s->kind == BF16)
                attend_head_bf16(q, new_key, new_value, keys, values, pos + b, head, out, heads,
                                 dim, s->ctx, s->scale, scores);
            else
                attend_head_i8(q, new_key, new_value, keys, values, pos + b, head, out, heads,
                               dim, s->ctx, s->scale, scores);
        }
        linear(MATRIX(LAYER_SLOT(layer, PROJ_W)), LAYER_SLOT(layer, PROJ_B), att, row, x, row, nb,
               n_embd, n_embd, 1, -1, NULL, 0, 0);
        norm(x, h, LAYER_SLOT(layer, LN2_W), LAYER_SLOT(layer, LN2_B), nb, n_embd, row, s->eps,
             s->rms);
        linear(MATRIX(LAYER_SLOT(layer, FC_W)), LAYER_SLOT(layer, FC_B), h, row, f, f_row, nb,
               n_embd, s->fc_out, 0, (int)s->mlp, a, a_row, s->hidden);
        linear(MATRIX(LAYER_SLOT(layer, MLP_PROJ_W)), LAYER_SLOT(layer, MLP_PROJ_B), a, a_row, x,
               row, nb, s->hidden, n_embd, 1, -1, NULL, 0, 0);
    }
    norm(x, h, SLOT(LNF_W), SLOT(LNF_B), nb, n_embd, row, s->eps, s->rms);
    linear(MATRIX(SLOT(HEAD)), NULL, h, row, logits, s->vocab, nb, n_embd, s->vocab, 0, -1, NULL,
           0, 0);
    if (s->softcap > 0.0f) { /* row by row: vector and scalar tanhf differ in the last bit */
        const float cap = s->softcap;
        const int64_t vocab = s->vocab;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t i = 0; i < vocab; i++)
                logits[b * vocab + i] = cap * tanhf(logits[b * vocab + i] / cap);
    }
#undef MATRIX
#undef LAYER_SLOT
#undef SLOT
}

static int decode_step(const int64_t *shape, const float *numbers, const float *weights,
                       const int64_t *offsets, const int64_t *ids, const int64_t *pos,
                       int64_t batch, void *const *k_caches, void *const *v_caches,
                       int64_t cache_row_stride, float *logits, int threads, enum element kind)
{
    struct step s = {
        .n_layer = shape[0], .n_embd = shape[1], .heads = shape[2], .hidden = shape[3],
        .vocab = shape[4], .ctx = shape[5], .rms = (int)shape[6], .mlp = shape[7],
        .eps = numbers[0], .qk_eps = numbers[1], .softcap = numbers[2],
        .weights = weights, .offsets = offsets, .ids = ids, .pos = pos,
        .k_caches = k_caches, .v_caches = v_caches, .cache_row_stride = cache_row_stride,
        .batch = batch, .logits = logits, .kind = kind, .matrices = (int)shape[8],
    };
#ifndef BF16_WEIGHTS
    if (s.matrices == BF16_MATRICES) return 4;
#endif
#ifndef I8_WEIGHTS
    if (s.matrices == I8_MATRICES) return 5;
#endif
    s.dim = s.n_embd / s.heads;
    s.scale = 1.0f / sqrtf((float)s.dim);
    /* SwiGLU's gate and up rows, each padded to whole panels, alternate panel by panel. */
    s.fc_out = s.mlp == SWIGLU ? 2 * PANEL * ((s.hidden + PANEL - 1) / PANEL) : s.hidden;
    for (int64_t b = 0; b < batch; b++) {
        if (ids[b] < 0 || ids[b] >= s.vocab) return 2;
        if (pos[b] < 0 || pos[b] >= s.ctx) return 3;
    }
    if (threads < 1) threads = 1;
    s.row = PAD(s.n_embd), s.qkv_row = PAD(3 * s.n_embd), s.f_row = PAD(s.fc_out);
    s.a_row = PAD(s.hidden);
    s.pairs_row = PAD(((s.n_embd > s.hidden ? s.n_embd : s.hidden) + 1) / 2);
    const int64_t own = PAD(s.ctx) + PAD(2 * s.n_embd) + batch * (s.row + s.pairs_row);
    size_t floats =
        (size_t)(batch * (2 * s.row + s.qkv_row + s.f_row + s.a_row) + threads * own);
    float *scratch = aligned_alloc(64, sizeof(float) * floats);
    if (scratch == NULL) return 1;
    s.x = scratch, s.qkv = s.x + batch * s.row, s.att = s.qkv + batch * s.qkv_row;
    s.f = s.att + batch * s.row, s.a = s.f + batch * s.f_row;
    float *owned = s.a + batch * s.a_row;
    /* Attention items: a thread takes a whole row's heads (its cache in memory order) when
       there are rows enough to share, single heads when there are not (batch 1). */
    s.chunk = batch >= 4 * threads ? (int)s.heads : 1;
    /* One parallel region for the whole step (`step_layers`). */
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float *scores = owned + omp_get_thread_num() * own;
#else
        float *scores = owned;
#endif
        char *new_kv = (char *)(scores + PAD(s.ctx));
        float *h = scores + PAD(s.ctx) + PAD(2 * s.n_embd);
        uint32_t *pairs = (uint32_t *)(h + batch * s.row);
        step_layers(&s, scores, new_kv, h, pairs);
    }
    free(scratch);
    return 0;
}

#define DEFINE_DECODE_STEP(NAME, KIND)                                                        \
    int NAME(const int64_t *shape, const float *numbers, const float *weights,                \
             const int64_t *offsets, const int64_t *ids, const int64_t *pos, int64_t batch,   \
             void *const *k_caches, void *const *v_caches, int64_t cache_row_stride,          \
             float *logits, int threads)                                                      \
    {                                                                                         \
        return decode_step(shape, numbers, weights, offsets, ids, pos, batch, k_caches,       \
                           v_caches, cache_row_stride, logits, threads, KIND);                \
    }

DEFINE_DECODE_STEP(lm_gpt_decode_f32, F32)
DEFINE_DECODE_STEP(lm_gpt_decode_f16, F16)
DEFINE_DECODE_STEP(lm_gpt_decode_bf16, BF16)
DEFINE_DECODE_STEP(lm_gpt_decode_i8, I8)

/* -- sampling and whole runs of tokens ---------------------------------------------------- */

/* Exact IEEE arithmetic in what follows: the engine's batched sampler (lm/sampling.py) and
   the run below draw through this one function, so a seeded request gets the same tokens
   either way; fast-math could reorder the sums differently in the two callers. */
#if defined(__clang__)
#define EXACT_MATH _Pragma("clang fp reassociate(off) contract(off)")
#define EXACT_FUNCTION
#elif defined(__GNUC__)
#define EXACT_MATH
#define EXACT_FUNCTION __attribute__((optimize("no-fast-math", "no-tree-vectorize")))
#else
#define EXACT_MATH
#define EXACT_FUNCTION
#endif

/* One token from a row of logits: the first largest when `temperature` is 0 (greedy);
   else the first token whose running sum of exp((logit - max) / temperature), summed in
   double, exceeds `u` (in [0, 1)) times the whole sum. Logits of -inf never win. */
static EXACT_FUNCTION int64_t draw(const float *logits, int64_t vocab, float temperature,
                                   double u)
{
    EXACT_MATH
    int64_t best = 0;
    float max = logits[0];
    for (int64_t i = 1; i < vocab; i++)
        if (logits[i] > max) max = logits[i], best = i;
    if (!(temperature > 0.0f)) return best;
    double total = 0.0;
    for (int64_t i = 0; i < vocab; i++) total += (double)expf((logits[i] - max) / temperature);
    double target = u * total, sum = 0.0;
    int64_t last = best;
    for (int64_t i = 0; i < vocab; i++) {
        float weight = expf((logits[i] - max) / temperature);
        if (weight > 0.0f) last = i;
        sum += (double)weight;
        if (sum > target && weight > 0.0f) return i;
    }
    return last; /* u * total rounded up to the whole sum */
}

/* `rows` draws: row r from logits[r * vocab ...] with temperature[r] and uniform[r]. */
void lm_draw(const float *logits, int64_t rows, int64_t vocab, const float *temperature,
             const double *uniform, int64_t *out)
{
    for (int64_t r = 0; r < rows; r++)
        out[r] = draw(logits + r * vocab, vocab, temperature[r], uniform[r]);
}

/* Up to `count` tokens of one row, each step's token drawn (temperature, uniform[i]) and
   fed to the next step: `id` goes in at position `pos` first. Writes the drawn tokens to
   `out` and returns how many; fewer than `count` when a step's logits are not finite
   (that step's token is not drawn: the caller's per-step path reports it). Negative: the
   step's error (-1 scratch, -2 token, -3 position), nothing drawn. */
static int64_t generate(const int64_t *shape, const float *numbers, const float *weights,
                        const int64_t *offsets, int64_t id, int64_t pos, int64_t count,
                        void *const *k_caches, void *const *v_caches, float temperature,
                        const double *uniform, int64_t *out, int threads, enum element kind)
{
    const int64_t vocab = shape[4];
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    if (logits == NULL) return -1;
    int64_t done = 0;
    for (; done < count; done++) {
        int64_t p = pos + done;
        int failed = decode_step(shape, numbers, weights, offsets, &id, &p, 1, k_caches,
                                 v_caches, 0, logits, threads, kind);
        if (failed) {
            done = done ? done : -failed;
            break;
        }
        /* By the bits: -ffast-math lets the compiler assume every float is finite. */
        uint32_t exponents = 0;
        for (int64_t i = 0; i < vocab; i++)
            exponents |= (float_to_bits(logits[i]) & 0x7f800000u) == 0x7f800000u;
        if (exponents) break;
        id = out[done] = draw(logits, vocab, temperature, uniform[done]);
    }
    free(logits);
    return done;
}

#define DEFINE_GENERATE(NAME, KIND)                                                           \
    int64_t NAME(const int64_t *shape, const float *numbers, const float *weights,            \
                 const int64_t *offsets, int64_t id, int64_t pos, int64_t count,              \
                 void *const *k_caches, void *const *v_caches, float temperature,             \
                 const double *uniform, int64_t *out, int threads)                            \
    {                                                                                         \
        return generate(shape, numbers, weights, offsets, id, pos, count, k_caches,          \
                        v_caches, temperature, uniform, out, threads, KIND);                  \
    }

DEFINE_GENERATE(lm_gpt_generate_f32, F32)
DEFINE_GENERATE(lm_gpt_generate_f16, F16)
DEFINE_GENERATE(lm_gpt_generate_bf16, BF16)
DEFINE_GENERATE(lm_gpt_generate_i8, I8)

/* Whether this build multiplies bfloat16 weights (shape[8] = 1): compiled for a CPU with
   AVX512-BF16. */
int lm_bf16_weights(void)
{
#ifdef BF16_WEIGHTS
    return 1;
#else
    return 0;
#endif
}

/* Whether this build multiplies int8 weights (shape[8] = 2): compiled for a CPU with
   AVX512-VNNI. */
int lm_i8_weights(void)
{
#ifdef I8_WEIGHTS
    return 1;
#else
    return 0;
#endif
}
