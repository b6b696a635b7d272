/* Decode-step attention for the GPT's KV cache, on the CPU.
 *
 * One call does a whole layer's attention for one new token per row: it writes each row's
 * new key and value into the cache at that row's own position, then attends the row's
 * query over that row's keys only, 0..pos[b]. Rows at different positions cost what their
 * own length costs (a batched matrix product pads every row to the longest); the mask,
 * scores and softmax stay in a small per-thread scratch; every row's result is
 * independent of the others in its batch. The cache may hold float32, float16,
 * bfloat16 (half the bytes to read, and decode is bound by reading the cache) or int8 with
 * a float32 scale after each vector (lm/kv_int8.py: D + 4 bytes a vector of D); scores,
 * softmax and sums are float32. lm/native/__init__.py compiles this file on first use;
 * lm/models/gpt.py keeps a PyTorch path that computes the same thing.
 *
 * Layouts (C-contiguous within a row; rows `*_row_stride` elements apart; a vector is
 * `dim` elements, or dim + 4 bytes in an int8 cache):
 *   q        [batch, heads, dim]      float32, the new tokens' queries
 *   k_new    [batch, heads, vector]   the new keys, in the cache's type
 *   v_new    [batch, heads, vector]   the new values, in the cache's type
 *   k_cache  [rows, heads, ctx, vector]  keys
 *   v_cache  [rows, heads, ctx, vector]  values
 *   pos      [batch]                  where each row's new token goes (< ctx)
 *   out      [batch, heads, dim]      float32
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum element { F32, F16, BF16, I8 };

/* Bytes of one element of the cache's type, and of one cached vector of `dim` numbers. */
static inline size_t element_size(enum element kind)
{
    return kind == F32 ? 4 : kind == I8 ? 1 : 2;
}

static inline int64_t vector_bytes(int64_t dim, enum element kind)
{
    return kind == I8 ? dim + 4 : dim * (int64_t)element_size(kind);
}

static inline float bits_to_float(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t float_to_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* IEEE half to float for finite values, normals and subnormals alike: shift exponent and
   mantissa into float position, rescale by 2^112, then put the sign back. */
static inline float half_to_float(uint16_t h)
{
    float magnitude = bits_to_float((uint32_t)(h & 0x7fff) << 13) * 0x1p112f;
    return bits_to_float(float_to_bits(magnitude) | (uint32_t)(h & 0x8000) << 16);
}

static inline __attribute__((always_inline)) float load(const void *base, int64_t i,
                                                         enum element kind)
{
    switch (kind) {
    case F32: return ((const float *)base)[i];
    case F16: return half_to_float(((const uint16_t *)base)[i]);
    case I8: return (float)((const int8_t *)base)[i]; /* times the vector's scale, later */
    default: return bits_to_float((uint32_t)((const uint16_t *)base)[i] << 16);
    }
}

/* An int8 vector's scale: the float32 after its `dim` numbers. */
static inline float vector_scale(const char *vector, int64_t dim)
{
    float scale;
    memcpy(&scale, vector + dim, sizeof scale);
    return scale;
}

/* LANES int8 numbers as floats, as one vector of the machine's width (16 with AVX-512, 8
   with AVX2, else 4): with intrinsics on x86 (GCC widens int8 vectors one number at a time
   otherwise, and spills 64-byte vectors to memory where registers hold 32). */
#if defined(__AVX512F__)
#define LANES 16
typedef float fvec __attribute__((vector_size(64)));
static inline fvec widen(const char *p)
{
    return (fvec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#define LANES 8
typedef float fvec __attribute__((vector_size(32)));
static inline fvec widen(const char *p)
{
    return (fvec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else /* 128-bit vectors: SSE2, NEON */
#define LANES 4
typedef float fvec __attribute__((vector_size(16)));
static inline fvec widen(const char *p)
{
    fvec out;
    for (int i = 0; i < LANES; i++) out[i] = (float)((const int8_t *)p)[i];
    return out;
}
#endif

/* An int8 cache's weighted sum of values, softmax weights `scores` (their sum `sum`): LANES
   numbers a vector, two keys at a time on separate sums (a multiply-add waits for the one
   before it on the same sum), so up to 2 * dim / LANES chains run side by side. */
#define I8_MAX_DIM 128
static inline __attribute__((always_inline)) void i8_values(
    const char *values, int64_t row_bytes, const float *scores, int64_t len, int64_t dim,
    float sum, float *out)
{
    const int64_t chunks = dim / LANES;
    fvec even[I8_MAX_DIM / LANES], odd[I8_MAX_DIM / LANES];
    for (int64_t c = 0; c < chunks; c++) even[c] = odd[c] = (fvec){0};
    int64_t t = 0;
    for (; t + 1 < len; t += 2) {
        const char *first = values + t * row_bytes, *second = first + row_bytes;
        float w0 = scores[t] * vector_scale(first, dim);
        float w1 = scores[t + 1] * vector_scale(second, dim);
        for (int64_t c = 0; c < chunks; c++) {
            even[c] += w0 * widen(first + LANES * c);
            odd[c] += w1 * widen(second + LANES * c);
        }
    }
    if (t < len) {
        const char *last = values + t * row_bytes;
        float w = scores[t] * vector_scale(last, dim);
        for (int64_t c = 0; c < chunks; c++) even[c] += w * widen(last + LANES * c);
    }
    for (int64_t c = 0; c < chunks; c++) {
        fvec total = (even[c] + odd[c]) / sum;
        memcpy(out + LANES * c, &total, sizeof total);
    }
}

/* One (row, head): store the new key and value, then softmax(q . keys) . values. `next`
   is the item after this one (-1 if none), most often this thread's next. */
static inline __attribute__((always_inline)) void attend_one(
    const float *q_all, int64_t q_row_stride, const char *k_new, const char *v_new,
    int64_t kv_row_stride, char *k_cache, char *v_cache, int64_t cache_row_stride,
    const int64_t *pos, float *out, int64_t heads, int64_t dim, int64_t ctx, float scale,
    int64_t item, int64_t next, float *restrict scores, enum element kind)
{
    const size_t size = element_size(kind);
    int64_t b = item / heads, h = item % heads;
    const float *q = q_all + b * q_row_stride + h * dim;
    const int64_t row_bytes = vector_bytes(dim, kind), head_bytes = ctx * row_bytes;
    char *keys = k_cache + b * cache_row_stride * size + h * head_bytes;   /* [ctx, dim] */
    char *values = v_cache + b * cache_row_stride * size + h * head_bytes; /* [ctx, dim] */
    const char *key = k_new + b * kv_row_stride * size + h * row_bytes;
    const char *value = v_new + b * kv_row_stride * size + h * row_bytes;
    int64_t p = pos[b], len = p + 1;
    memcpy(keys + p * row_bytes, key, row_bytes);
    memcpy(values + p * row_bytes, value, row_bytes);
    /* The cache outgrows the CPU's caches: ask for this item's values (read after the
       scores) and the next item's keys while this item computes, a slice at each of the
       key loop's steps (asked for all at once, a long row's hundreds of lines overrun the
       core's queue of misses and the later ones are dropped), into the core's L2 rather
       than L1 (locality 2: prefetcht1), which took 15-20% off a 64-row layer whose cache
       streams from memory, and nothing where it fits the L3. */
    const char *next_keys = NULL;
    int64_t next_bytes = 0;
    if (next >= 0) {
        int64_t next_b = next / heads;
        next_bytes = (pos[next_b] + 1) * row_bytes;
        next_keys = k_cache + next_b * cache_row_stride * size + next % heads * head_bytes;
    }
    const int64_t value_bytes = len * row_bytes;
    int64_t asked = 0; /* bytes asked for so far, of the values and of the next keys each */
    float scaled[dim];
    for (int64_t d = 0; d < dim; d++) scaled[d] = q[d] * scale;
    for (int64_t t = 0; t < len; t++) {
        for (; asked < (t + 1) * row_bytes; asked += 64) {
            if (asked < value_bytes) __builtin_prefetch(values + asked, 0, 2);
            if (asked < next_bytes) __builtin_prefetch(next_keys + asked, 0, 2);
        }
        const char *key_row = keys + t * row_bytes;
        float score = 0.0f;
        if (kind == I8 && dim % LANES == 0) {
            fvec sums = {0};
            for (int64_t d = 0; d < dim; d += LANES) {
                fvec qd;
                memcpy(&qd, scaled + d, sizeof qd);
                sums += qd * widen(key_row + d);
            }
            for (int i = 0; i < LANES; i++) score += sums[i];
        } else {
            for (int64_t d = 0; d < dim; d++) score += scaled[d] * load(key_row, d, kind);
        }
        if (kind == I8) score *= vector_scale(key_row, dim);
        scores[t] = score;
    }
    float max = scores[0];
    for (int64_t t = 1; t < len; t++) max = scores[t] > max ? scores[t] : max;
    float sum = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        /* exp(-80) is 2e-35, still a normal float: no slow subnormal arithmetic below. */
        float shifted = scores[t] - max;
        scores[t] = expf(shifted < -80.0f ? -80.0f : shifted);
        sum += scores[t];
    }
    float *o = out + (b * heads + h) * dim;
    if (kind == I8 && dim % LANES == 0 && dim <= I8_MAX_DIM) {
        i8_values(values, row_bytes, scores, len, dim, sum, o);
        return;
    }
    float acc[dim];  /* registers, where the head size is a constant (see the dispatch) */
    for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const char *value_row = values + t * row_bytes;
        float weight = kind == I8 ? scores[t] * vector_scale(value_row, dim) : scores[t];
        for (int64_t d = 0; d < dim; d++) acc[d] += weight * load(value_row, d, kind);
    }
    for (int64_t d = 0; d < dim; d++) o[d] = acc[d] / sum;
}

#ifndef LM_ATTENTION_HELPERS_ONLY /* decode.c includes the helpers above, not these */

/* One (row, head) item, with the common head sizes as constants: the compiler then keeps
   the output accumulator in registers and unrolls the head-size loops. */
#define ATTEND_ITEM(DIM, KIND)                                                               \
    attend_one(q, q_row_stride, k_new, v_new, kv_row_stride, k_cache, v_cache,               \
               cache_row_stride, pos, out, heads, DIM, ctx, scale, item,                     \
               item + 1 < batch * heads ? item + 1 : -1, scratch, KIND)

/* Returns 0, or 1 when a thread could not allocate its scratch (nothing is then valid).
   Threads take runs of 8 adjacent items: each walks the cache in memory order (faster
   than interleaving single items), and runs balance rows of different lengths. */
#define DEFINE_DECODE_ATTENTION(NAME, KIND)                                                 \
    int NAME(const float *q, int64_t q_row_stride, const void *k_new, const void *v_new,    \
             int64_t kv_row_stride, void *k_cache, void *v_cache, int64_t cache_row_stride, \
             const int64_t *pos, float *out, int64_t batch, int64_t heads, int64_t dim,     \
             int64_t ctx, float scale, int threads)                                         \
    {                                                                                       \
        int failed = 0;                                                                     \
        _Pragma("omp parallel num_threads(threads) reduction(|: failed)")                   \
        {                                                                                   \
            float *scratch = malloc(sizeof(float) * (size_t)ctx);                           \
            failed = scratch == NULL;                                                       \
            _Pragma("omp for schedule(dynamic, 8)")                                         \
            for (int64_t item = 0; item < batch * heads; item++) {                          \
                if (scratch == NULL) continue;                                              \
                switch (dim) {                                                              \
                case 16: ATTEND_ITEM(16, KIND); break;                                      \
                case 32: ATTEND_ITEM(32, KIND); break;                                      \
                case 64: ATTEND_ITEM(64, KIND); break;                                      \
                case 128: ATTEND_ITEM(128, KIND); break;                                    \
                default: ATTEND_ITEM(dim, KIND);                                            \
                }                                                                           \
            }                                                                               \
            free(scratch);                                                                  \
        }                                                                                   \
        return failed;                                                                      \
    }

DEFINE_DECODE_ATTENTION(lm_decode_attention_f32, F32)
DEFINE_DECODE_ATTENTION(lm_decode_attention_f16, F16)
DEFINE_DECODE_ATTENTION(lm_decode_attention_bf16, BF16)
DEFINE_DECODE_ATTENTION(lm_decode_attention_i8, I8)

#endif
