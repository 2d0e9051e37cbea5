/* NF4 block quantization on the CPU: the fast path beside lorafit/quant/nf4.py (the reference).
 *
 * Every function reproduces the PyTorch reference bit for bit, so the arithmetic below keeps its
 * exact operation order, and the file must be compiled with -ffp-contract=off: a fused multiply-add
 * rounds once where the reference rounds twice (absmax = code2[q] * absmax2 + offset, and the
 * 8-bit statistics bin), which would change the last bit.
 *
 * Layout (see NF4Tensor): element i of the flat tensor sits in byte i / 2, the high nibble for even
 * i; block b covers elements [b * blocksize, (b + 1) * blocksize), the last block may be partial.
 *
 * Vector paths (AVX-512, AVX2) are chosen at compile time from the -march=native macros; the scalar
 * code is the fallback and also handles every partial block. Work is split over whole blocks, so
 * threads never share an output byte.
 */

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* The 16 NF4 levels (fp32, same values as NF4_LEVELS in nf4.py). */
static const float LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* Midpoints between neighbouring levels, computed in fp32 as the reference does: a value's code is
 * the number of midpoints strictly below it. Filled when the library loads; entry 15 is padding. */
static float MIDS[16];

__attribute__((constructor)) static void init_midpoints(void) {
    for (int i = 0; i < 15; i++) MIDS[i] = (LEVELS[i] + LEVELS[i + 1]) / 2.0f;
    MIDS[15] = 2.0f;
}

int lf_simd_level(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Threads: fn(args, b0, b1) processes blocks [b0, b1). The calling thread and n_threads - 1 helpers
 * take chunks of about 32K elements from a shared counter until none are left, so a helper that
 * starts late or is preempted (the cores may be busy with other work) leaves its share to the others
 * instead of holding up the call. Helpers are detached; the caller waits only for chunks that were
 * taken. The shared state is on the heap and freed by whichever thread leaves it last, since a helper
 * may first look at it after the caller has returned. */

#define LF_MAX_THREADS 64

typedef void (*block_fn)(const void *args, int64_t b0, int64_t b1);

typedef struct {
    block_fn fn;
    const void *args; /* only read by a thread that took a chunk, so the caller is still waiting */
    int64_t n_blocks, chunk;
    int64_t next, done; /* atomics: first block not yet taken; blocks finished */
    int refs;           /* atomic: threads still using this struct */
} work_t;

static void take_chunks(work_t *w) {
    for (;;) {
        int64_t b0 = __atomic_fetch_add(&w->next, w->chunk, __ATOMIC_RELAXED);
        if (b0 >= w->n_blocks) return;
        int64_t b1 = b0 + w->chunk < w->n_blocks ? b0 + w->chunk : w->n_blocks;
        w->fn(w->args, b0, b1);
        __atomic_fetch_add(&w->done, b1 - b0, __ATOMIC_RELEASE);
    }
}

static void release(work_t *w) {
    if (__atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) == 0) free(w);
}

static void *helper(void *p) {
    take_chunks((work_t *)p);
    release((work_t *)p);
    return NULL;
}

static void parallel_blocks(block_fn fn, const void *args, int64_t n_blocks, int64_t blocksize, int n_threads) {
    int64_t chunk = blocksize >= 32768 ? 1 : 32768 / blocksize;
    if (n_threads > LF_MAX_THREADS) n_threads = LF_MAX_THREADS;
    work_t *w = n_threads > 1 && n_blocks > chunk ? malloc(sizeof(work_t)) : NULL;
    if (w == NULL) {
        fn(args, 0, n_blocks);
        return;
    }
    *w = (work_t){fn, args, n_blocks, chunk, 0, 0, 1};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int t = 1; t < n_threads; t++) {
        pthread_t tid;
        __atomic_add_fetch(&w->refs, 1, __ATOMIC_RELAXED);
        if (pthread_create(&tid, &attr, helper, w) != 0) {
            __atomic_sub_fetch(&w->refs, 1, __ATOMIC_RELAXED); /* no thread: the others share its work */
            break;
        }
    }
    pthread_attr_destroy(&attr);
    take_chunks(w);
    while (__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) < n_blocks) sched_yield(); /* a helper's last chunk */
    release(w);
}

/* ------------------------------------------------------------------------------------------------
 * Dequantize: out[i] = LEVELS[code(i)] * absmax(block(i)).
 *
 * The LUT trick: the 16 levels fit in one 512-bit register, and vpermps (_mm512_permutexvar_ps) looks
 * up 16 lanes at once using only the low 4 bits of each 32-bit index. So the index vector does not
 * need its nibbles isolated: zero-extend 8 packed bytes to 8 64-bit lanes, and build each lane as
 * (byte >> 4) in its low half (the first element, high nibble) and the whole byte in its high half
 * (the lookup ignores bits 4-7, leaving the low nibble). One permute then yields 16 levels already in
 * element order. AVX2's vpermps has 8 entries, so it looks up both halves of the table and picks one
 * per lane by bit 3 of the code. */

typedef struct {
    const uint8_t *packed;
    int64_t n, blocksize;
    const float *absmax;    /* fp32 per block, or NULL when double-quantized: */
    const uint8_t *qabsmax; /* uint8 dynamic-map code per block, */
    const float *code2;     /* the 256-entry dynamic map, */
    const float *absmax2;   /* fp32 per 256 blocks, */
    float offset;           /* and the mean that was subtracted. */
    void *out;              /* float or bf16 (uint16) */
} dequant_args;

static inline float block_absmax(const dequant_args *a, int64_t b) {
    if (a->absmax) return a->absmax[b];
    float centred = a->code2[a->qabsmax[b]] * a->absmax2[b >> 8]; /* two roundings, as in torch */
    return centred + a->offset;
}

/* fp32 -> bf16 with round-to-nearest-even, NaN -> 0x7FC0, as torch's .to(torch.bfloat16). */
static inline uint16_t to_bf16(float v) {
    uint32_t u;
    if (v != v) return 0x7FC0;
    memcpy(&u, &v, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void dequant_scalar(const dequant_args *a, int64_t e0, int64_t e1, float scale, int bf16) {
    for (int64_t e = e0; e < e1; e++) {
        uint8_t byte = a->packed[e >> 1];
        float v = LEVELS[(e & 1) ? (byte & 15) : (byte >> 4)] * scale;
        if (bf16) ((uint16_t *)a->out)[e] = to_bf16(v);
        else ((float *)a->out)[e] = v;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* One full block; blocksize is a multiple of 16. */
static void dequant_block_vec(const dequant_args *a, int64_t e0, float scale, int bf16) {
    const __m512 levels = _mm512_loadu_ps(LEVELS);
    const __m512 vscale = _mm512_set1_ps(scale);
    const uint8_t *p = a->packed + (e0 >> 1);
    for (int64_t i = 0; i < a->blocksize; i += 16) {
        __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(p + i / 2)));
        __m512i idx = _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32));
        __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, levels), vscale);
        if (bf16) {
            __m512i u = _mm512_castps_si512(v);
            __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                            _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
            r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
            __m256i h = _mm512_cvtepi32_epi16(r);
            _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + e0 + i), h);
        } else {
            _mm512_storeu_ps((float *)a->out + e0 + i, v);
        }
    }
}
#define HAVE_DEQUANT_VEC 1
#elif defined(__AVX2__)
static void dequant_block_vec(const dequant_args *a, int64_t e0, float scale, int bf16) {
    const __m256 lo_table = _mm256_loadu_ps(LEVELS), hi_table = _mm256_loadu_ps(LEVELS + 8);
    const __m256 vscale = _mm256_set1_ps(scale);
    const uint8_t *p = a->packed + (e0 >> 1);
    for (int64_t i = 0; i < a->blocksize; i += 8) {
        uint32_t four;
        memcpy(&four, p + i / 2, 4);
        __m256i q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)four));
        __m256i idx = _mm256_or_si256(_mm256_srli_epi64(q, 4), _mm256_slli_epi64(q, 32));
        __m256 from_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* sign bit = code bit 3 */
        __m256 lv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_table, idx),
                                     _mm256_permutevar8x32_ps(hi_table, idx), from_hi);
        __m256 v = _mm256_mul_ps(lv, vscale);
        if (bf16) {
            uint16_t *o = (uint16_t *)a->out + e0 + i;
            float tmp[8];
            _mm256_storeu_ps(tmp, v);
            for (int k = 0; k < 8; k++) o[k] = to_bf16(tmp[k]);
        } else {
            _mm256_storeu_ps((float *)a->out + e0 + i, v);
        }
    }
}
#define HAVE_DEQUANT_VEC 1
#endif

/* A fresh output of 32 MiB or more is a new anonymous mapping (glibc mmaps every allocation that
 * large), and writing it page-faults once per 4 KiB page, which costs more than the dequantization
 * itself. Asking for transparent huge pages (honoured when THP is in "madvise" or "always" mode) makes
 * that one fault per 2 MiB. Only the 2 MiB-aligned interior is advised; smaller outputs are usually
 * reused heap memory and are left alone. */
static void advise_huge_pages(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (bytes < ((size_t)32 << 20)) return;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1), end = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE); /* advice only: errors are harmless */
#else
    (void)p;
    (void)bytes;
#endif
}

static void dequant_blocks(const void *args, int64_t b0, int64_t b1, int bf16) {
    const dequant_args *a = (const dequant_args *)args;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * a->blocksize, e1 = e0 + a->blocksize;
        float scale = block_absmax(a, b);
#ifdef HAVE_DEQUANT_VEC
        if (e1 <= a->n) {
            dequant_block_vec(a, e0, scale, bf16);
            continue;
        }
#endif
        dequant_scalar(a, e0, e1 < a->n ? e1 : a->n, scale, bf16);
    }
}

static void dequant_blocks_f32(const void *args, int64_t b0, int64_t b1) { dequant_blocks(args, b0, b1, 0); }
static void dequant_blocks_bf16(const void *args, int64_t b0, int64_t b1) { dequant_blocks(args, b0, b1, 1); }

/* out: n floats (out_bf16 = 0) or n bf16 values (out_bf16 = 1). Pass absmax for plain fp32
 * statistics, or absmax = NULL and the double-quantized ones (qabsmax, code2, absmax2, offset). */
void lf_nf4_dequantize(const uint8_t *packed, int64_t n, int64_t blocksize, const float *absmax,
                       const uint8_t *qabsmax, const float *code2, const float *absmax2, float offset,
                       void *out, int out_bf16, int n_threads) {
    dequant_args a = {packed, n, blocksize, absmax, qabsmax, code2, absmax2, offset, out};
    advise_huge_pages(out, (size_t)n * (out_bf16 ? 2 : 4));
    int64_t n_blocks = (n + blocksize - 1) / blocksize;
    parallel_blocks(out_bf16 ? dequant_blocks_bf16 : dequant_blocks_f32, &a, n_blocks, blocksize, n_threads);
}

/* ------------------------------------------------------------------------------------------------
 * Quantize: per block absmax = max |x|, scaled = x * (1 / max(absmax, 1e-38)) (x / absmax in the
 * last, partial block, which stores the clamped absmax), code = number of MIDS strictly below
 * scaled. Clamping scaled to [-1, 1] (as the reference does) cannot change that count.
 * NaN follows torch: it propagates through the absmax and the clamp, and a NaN value gets code 15
 * (torch.bucketize puts it past every boundary), hence "not (s <= mid)" rather than "s > mid". */

typedef struct {
    const float *x;
    int64_t n, blocksize;
    uint8_t *packed;
    float *absmax;
} quant_args;

static inline uint8_t code_of(float s) {
    uint8_t c = 0;
    for (int k = 0; k < 15; k++) c += !(s <= MIDS[k]);
    return c;
}

static inline float abs_max_scalar(const float *x, int64_t len) {
    float m = 0.0f;
    for (int64_t i = 0; i < len; i++) {
        float v = x[i] < 0 ? -x[i] : x[i];
        m = (v > m || v != v) ? v : m; /* once NaN, stays NaN */
    }
    return m;
}

static inline float clamp_tiny(float amax) { return amax < 1e-38f ? 1e-38f : amax; } /* keeps NaN */

#if defined(__AVX512F__) && defined(__AVX512BW__)
static float abs_max_vec(const float *x, int64_t len) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0; /* vmaxps drops NaN, so track it apart */
    for (int64_t i = 0; i < len; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
    }
    return nan ? __builtin_nanf("") : _mm512_reduce_max_ps(m);
}

/* Codes by a branch-free binary search over the 16-entry midpoint table (one vpermps per step),
 * then pairs of codes folded into bytes within each 64-bit lane and narrowed with vpmovqb. */
static void codes_vec(const float *x, int64_t len, float inv, uint8_t *out) {
    const __m512 mids = _mm512_loadu_ps(MIDS), vinv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < len; i += 16) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
        __m512i c = _mm512_setzero_si512();
        for (int step = 8; step >= 1; step >>= 1) {
            __m512i probe = _mm512_add_epi32(c, _mm512_set1_epi32(step));
            __m512 mid = _mm512_permutexvar_ps(_mm512_sub_epi32(probe, _mm512_set1_epi32(1)), mids);
            c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(s, mid, _CMP_NLE_UQ), probe);
        }
        __m512i pair = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
        _mm_storel_epi64((__m128i *)(out + i / 2), _mm512_cvtepi64_epi8(pair));
    }
}
#define HAVE_QUANT_VEC 1
#elif defined(__AVX2__)
static float abs_max_vec(const float *x, int64_t len) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps(); /* vmaxps drops NaN, so track it apart */
    for (int64_t i = 0; i < len; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, m);
    return _mm256_movemask_ps(nan) ? __builtin_nanf("") : abs_max_scalar(tmp, 8);
}

/* Codes by counting: each comparison yields -1 where a midpoint is below, so subtract them. */
static void codes_vec(const float *x, int64_t len, float inv, uint8_t *out) {
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i gather_bytes = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                  0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int64_t i = 0; i < len; i += 8) {
        __m256 s = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
        __m256i c = _mm256_setzero_si256();
        for (int k = 0; k < 15; k++) {
            c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_set1_ps(MIDS[k]), _CMP_NLE_UQ)));
        }
        __m256i pair = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
        __m256i bytes = _mm256_shuffle_epi8(pair, gather_bytes);
        uint16_t lo = (uint16_t)_mm256_extract_epi16(bytes, 0), hi = (uint16_t)_mm256_extract_epi16(bytes, 8);
        memcpy(out + i / 2, &lo, 2);
        memcpy(out + i / 2 + 2, &hi, 2);
    }
}
#define HAVE_QUANT_VEC 1
#endif

static void quant_blocks(const void *args, int64_t b0, int64_t b1) {
    const quant_args *a = (const quant_args *)args;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * a->blocksize, len = a->n - e0 < a->blocksize ? a->n - e0 : a->blocksize;
        const float *x = a->x + e0;
        uint8_t *out = a->packed + e0 / 2;
        if (len == a->blocksize) {
#ifdef HAVE_QUANT_VEC
            float amax = abs_max_vec(x, len);
#else
            float amax = abs_max_scalar(x, len);
#endif
            a->absmax[b] = amax;
            float inv = 1.0f / clamp_tiny(amax);
#ifdef HAVE_QUANT_VEC
            codes_vec(x, len, inv, out);
#else
            for (int64_t i = 0; i < len; i += 2) out[i / 2] = (uint8_t)(code_of(x[i] * inv) << 4 | code_of(x[i + 1] * inv));
#endif
        } else { /* the last, partial block: divide, and pad an odd count with 0.0 (code 7) */
            float amax = clamp_tiny(abs_max_scalar(x, len));
            a->absmax[b] = amax;
            for (int64_t i = 0; i < len; i += 2) {
                uint8_t second = i + 1 < len ? code_of(x[i + 1] / amax) : code_of(0.0f);
                out[i / 2] = (uint8_t)(code_of(x[i] / amax) << 4 | second);
            }
        }
    }
}

/* x: n floats -> packed: ceil(n / 2) bytes, absmax: ceil(n / blocksize) floats. */
void lf_nf4_quantize(const float *x, int64_t n, int64_t blocksize, uint8_t *packed, float *absmax, int n_threads) {
    quant_args a = {x, n, blocksize, packed, absmax};
    parallel_blocks(quant_blocks, &a, (n + blocksize - 1) / blocksize, blocksize, n_threads);
}

/* ------------------------------------------------------------------------------------------------
 * Double quantization of the block absmax values (quantize_blockwise_8bit in nf4.py): centre on the
 * offset, scale each run of 256 by its absmax, map [-1, 1] to one of 65536 bins and read the code
 * from `lut` (65536 entries). The bin index is trunc(fp32(double(v) * 65535 + 0.5)), the reference's
 * emulation of bitsandbytes' fused multiply-add. A run whose absmax is 0 (or NaN) gets code 0, and so
 * does a NaN value (where the reference would index out of range), so the table is never overread. */
void lf_quantize_stats(const float *absmax, int64_t n, float offset, const uint8_t *lut, uint8_t *codes,
                       float *absmax2) {
    for (int64_t b0 = 0; b0 < n; b0 += 256) {
        int64_t len = n - b0 < 256 ? n - b0 : 256;
        float centred[256];
        for (int64_t i = 0; i < len; i++) centred[i] = absmax[b0 + i] - offset;
        float m = abs_max_scalar(centred, len);
        absmax2[b0 / 256] = m;
        float inv = m > 0 ? 1.0f / m : 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float s = centred[i] * inv;
            s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            float half = (s + 1.0f) * 0.5f;
            double bin = (double)half * 65535.0 + 0.5;
            codes[b0 + i] = (m > 0 && half == half) ? lut[(int64_t)(float)bin] : 0;
        }
    }
}
