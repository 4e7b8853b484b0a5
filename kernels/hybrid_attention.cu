// Device half of hybrid attention for one decode query per sequence, compiled at run time by
// NVRTC (src/gpu/kernels.rs). No CUDA headers are included, so NVRTC needs no include path:
// half and bfloat16 are handled as raw 16-bit storage with explicit conversions.
//
// Two kernels, used together:
//
// split_attention_<T>: the token concatenator. The attended sequence is, in token order,
//   device tokens [0, sinks) | m shipped host tokens | device tokens [sinks, n_dev)
//   Device tokens get their logit here (q . k * scale, masked by dev_mask); host tokens come with
//   their logit already computed by the CPU (host_logits, -inf = ignore) and their value row
//   shipped next to it (host_v). Each block covers one slice of that virtual sequence and writes
//   the slice's softmax partial per query head: normalised output and log-sum-exp. With m = 0 it
//   is plain attention over the device tier.
//
// merge_partials: combines the slices of each (sequence, query head), plus optionally the
//   CPU's own partial (output + log-sum-exp over the host tokens: the HGCA merge), into the
//   final output o = sum_i e^{lse_i - M} o_i / sum_i e^{lse_i - M} with M = max lse_i.
//
// Why it is shaped this way. Decoding one query reads every K and V row once and does ~2 FLOPs
// per byte per query head, so the limit to design for is HBM bandwidth (3.35 TB/s on H100,
// 4.8 TB/s on H200: 14-20 bytes per clock per SM). Reaching it takes:
//   - every byte read once: a block serves all query heads of a GQA group (up to PASS_HEADS = 8;
//     larger groups are cut into chunks of blocks that run side by side, src/gpu/launch.rs)
//     from one read of its KV head's rows;
//   - wide, coalesced loads: a lane loads 16 bytes (8 halves or 4 floats) and L = d / 8 lanes
//     (f16/bf16; d / 4 for f32) cover a row, so one warp load covers 32 / L consecutive rows
//     (2 rows of a 128-dim f16 head, 4 of a 64-dim one) and a row's dot product is reduced over
//     L lanes (log2 L shuffle steps, for all rows of the warp at once);
//   - many bytes in flight (~20-30 KB per SM at ~1 us of loaded latency): a lane issues the K and
//     V loads of U rows (U x 32 bytes; U = 5 with one head per lane, 2 with four) before using
//     any, and a block is small enough (4 warps, <= 128 registers a thread, ~41 KB of shared
//     memory) for 4 to be resident per SM: 16 warps, 32-80 KB in flight;
//   - enough blocks: at batch 1 there are only b x hkv groups, so each group's tokens are cut
//     into slices (flash-decoding) until the grid is one full wave of 4 blocks per SM
//     (src/gpu/launch.rs); partials merge exactly, so the result is exact up to float32 rounding;
//   - registers, not local memory: the accumulators and loaded rows live in arrays whose bounds
//     are template constants (elements per load, loads per lane per row, heads per lane: 1 or
//     4), every loop over them unrolled. Which instantiation runs is chosen per block from d,
//     the group size and the alignment, so the four entry points and their launches stay as
//     they were. The queries are read back from shared memory for every row (a broadcast, cheap
//     next to the rows) rather than held in 32 more registers per lane.
// The online softmax works in base 2 (the queries are pre-scaled by scale * log2(e), so a weight
// is one ex2 instruction), folds U rows at a time and rescales its accumulators only when the
// running maximum grows, which after the first rows is rare: the FP32 work is ~2 FMAs per head
// per element. With 4 heads per lane (Llama-3-8B: 32 query heads on 8 KV heads) the loop issues
// ~180 warp instructions per KB of K and V, within the ~200 an H200 SM can issue in the time
// HBM delivers 1 KB to it (~290 on H100).
//
// Lane layout (one warp): lane = r * L + l with l the lane's column of a row and r one of
// R = 32 / L row groups; r = ts * HS + hs: HS head slices (each GL heads) by R / HS token slots.
// The 4 warps of a block are WS head slices by 4 / WS token groups. Head slices of the same row
// load the same addresses, served by one request (same warp) or from L1 (other warps). Each
// (token slot, token group) keeps its own softmax state; they are combined at the end, in the
// warp by shuffles and across warps through shared memory.
//
// Rows whose d is not a multiple of the vector width, or whose pointers or strides are not
// 16-byte aligned, take the same code with one element per load (coalesced, but 2-4 bytes).
// These, and float rows longer than 128, hold one head per lane: a group of more than 4 heads
// is then served in passes over the slice (its rows read again, mostly from L2).

#define WARPS 4                 // warps per split_attention block (src/gpu/device.rs SPLIT_THREADS)
#define MIN_BLOCKS_PER_SM 4     // launch bound: at most 128 registers a thread
#define MAX_HEAD_DIM 256
#define PASS_HEADS 8            // query heads a block combines at once (shared memory holds them)
#define MERGE_WARPS 8           // largest merge_partials block (src/gpu/launch.rs)
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // -infinity without math headers
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

struct f16 { unsigned short x; };
struct bf16 { unsigned short x; };

__device__ __forceinline__ float half_to_float(unsigned short h) {
#ifdef HYBRIDGEN_EMULATION  // compiled as C++ by the tests (tests/emulation): no inline PTX
    return emu_half_bits_to_float(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// One element of type T from its bits (the low 16 bits for the 16-bit types).
template <typename T> __device__ __forceinline__ float from_bits(unsigned int w);
template <> __device__ __forceinline__ float from_bits<float>(unsigned int w) { return __uint_as_float(w); }
template <> __device__ __forceinline__ float from_bits<f16>(unsigned int w) { return half_to_float((unsigned short)w); }
template <> __device__ __forceinline__ float from_bits<bf16>(unsigned int w) { return __uint_as_float(w << 16); }

template <typename T> __device__ __forceinline__ float to_float(const T& v) { return from_bits<T>(v.x); }
template <> __device__ __forceinline__ float to_float<float>(const float& v) { return v; }

// VEC consecutive elements of T as raw 32-bit words (one word for a lone 16-bit element):
// converted to float only when used, so a lane holds half the registers per loaded 16-bit row.
template <typename T, int VEC>
struct Raw {
    static constexpr int BYTES = VEC * (int)sizeof(T);
    static constexpr int WORDS = BYTES < 4 ? 1 : BYTES / 4;
    unsigned int w[WORDS];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(Raw<T, VEC>& r, const T* p) {
    if constexpr (Raw<T, VEC>::BYTES == 16) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
        r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
    } else if constexpr (Raw<T, VEC>::BYTES == 4) {
        r.w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else {
        static_assert(Raw<T, VEC>::BYTES == 2, "loads are 2, 4 or 16 bytes");
        r.w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void clear(Raw<T, VEC>& r) {
#pragma unroll
    for (int i = 0; i < Raw<T, VEC>::WORDS; ++i) r.w[i] = 0u;  // +0.0 in every type
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Raw<T, VEC>& r, float (&f)[VEC]) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) f[i] = __uint_as_float(r.w[i]);
    } else if constexpr (VEC == 1) {
        f[0] = from_bits<T>(r.w[0]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) {
            f[2 * i] = from_bits<T>(r.w[i]);
            f[2 * i + 1] = from_bits<T>(r.w[i] >> 16);
        }
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// VEC queries from shared memory, read again for every row rather than held in registers: with
// four heads per lane they would take 32 of them. The loads are volatile asm so the compiler
// cannot hoist them out of the row loop (which would put the queries back in registers).
template <int VEC>
__device__ __forceinline__ void load_q(float (&f)[VEC], const float* p) {
#ifdef HYBRIDGEN_EMULATION
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = p[i];
#else
    const unsigned int addr = (unsigned int)__cvta_generic_to_shared(p);
    if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int i = 0; i < VEC; i += 4)
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(f[i]), "=f"(f[i + 1]), "=f"(f[i + 2]), "=f"(f[i + 3])
                         : "r"(addr + 4 * i));
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) asm volatile("ld.shared.f32 %0, [%1];" : "=f"(f[i]) : "r"(addr + 4 * i));
    }
#endif
}

// 2^x, flushing results below 2^-126 to 0 (weights that small do not count): one MUFU.EX2,
// where exp2f (and __expf) without --use_fast_math add a subnormal fix-up around it. The split
// kernel works in base 2 throughout (logits scaled by log2(e)), so a weight is this alone.
__device__ __forceinline__ float exp2_fast(float x) {
#ifdef HYBRIDGEN_EMULATION
    return std::exp2(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

__device__ __forceinline__ int pow2_ceil(int v) {
    int p = 1;
    while (p < v) p <<= 1;
    return p;
}

// The query head of slot s of KV head kvh's group: heads kvh * g .. kvh * g + g - 1 share it.
__device__ __forceinline__ int query_head(int kvh, int g, int hkv, int s) {
    (void)hkv;
    return kvh * g + s;
}

template <typename T>
struct Args {
    const T* q;
    const T* dev_k;
    const T* dev_v;
    long long dev_batch_stride, dev_head_stride;
    const unsigned char* dev_mask;
    int n_dev, sinks;
    const float* host_logits;
    const T* host_v;
    int m, host_grouped, hq, hkv, d;
    float scale;
    float* part_o;
    float* part_lse;
};

// The pass's queries (read back for every row: see load_q), and where the block's softmax
// states meet: one per (token group of warps, head of the pass).
struct Shared {
    alignas(16) float q[PASS_HEADS][MAX_HEAD_DIM];
    float acc[WARPS][PASS_HEADS][MAX_HEAD_DIM];
    float mx[WARPS][PASS_HEADS];
    float sum[WARPS][PASS_HEADS];
};

// One pass of a block over its slice for up to GL * HS * WS heads of one group: VEC elements per
// load, NV loads per lane per row, GL heads per lane. These bound the registers; how many lanes
// share a row (L, a power of two <= 32, so L * NV * VEC >= d) is chosen at run time from d.
template <typename T, int VEC, int NV, int GL>
struct Pass {
    static constexpr int WORDS = Raw<T, VEC>::WORDS;
    // Rows each lane has in flight (K and V loads issued before any is used): ~40 registers of
    // loaded rows with one head per lane, ~16 with four, which hold four times the q and
    // accumulator registers. Every variant is inlined into one entry, so each must leave room.
    static constexpr int U0 = (GL == 1 ? 40 : 16) / (2 * NV * WORDS);
    static constexpr int U = U0 < 1 ? 1 : (U0 > 8 ? 8 : U0);
    static constexpr int UH = U / GL < 1 ? 1 : U / GL;
    using V = Raw<T, VEC>;
    static_assert(32 * NV * VEC <= MAX_HEAD_DIM, "a row fits the shared accumulators");

    const Args<T>& a;
    int L, l, hs, ts, tpw, ws, wt, wtn, HS;
    int col[NV];      // the lane's first element of each of its loads
    bool head_ok[GL];
    int head[GL];     // query head of each of the lane's slots (clamped to a valid one if unused)
    const float* qs;  // the lane's first query in shared memory
    float acc[GL][NV][VEC], mx[GL], sum[GL];

    __device__ __forceinline__ Pass(const Args<T>& args, Shared& sh, int lanes, int b, int kvh, int g, int first,
                                    int nh, int hs_count, int ws_count)
        : a(args) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        L = lanes, HS = hs_count;
        const int r = lane / L;
        l = lane % L, hs = r % HS, ts = r / HS, tpw = 32 / L / HS;
        ws = warp % ws_count, wt = warp / ws_count, wtn = WARPS / ws_count;
#pragma unroll
        for (int k = 0; k < NV; ++k) col[k] = (k * L + l) * VEC;
        // The pass's queries, zero past d and for unused slots (the rows there are zero too,
        // but stale shared memory could hold a NaN), scaled so that q . k is the logit in base 2.
        const float qscale = a.scale * LOG2E;
        for (int i = threadIdx.x; i < PASS_HEADS * MAX_HEAD_DIM; i += WARPS * 32) {
            const int slot = i / MAX_HEAD_DIM, c = i % MAX_HEAD_DIM;
            const T* qrow = a.q + ((long long)b * a.hq + query_head(kvh, g, a.hkv, first + slot)) * a.d;
            sh.q[slot][c] = slot < nh && c < a.d ? to_float(qrow[c]) * qscale : 0.f;
        }
        qs = &sh.q[(ws * HS + hs) * GL][0];
#pragma unroll
        for (int j = 0; j < GL; ++j) {
            const int slot = (ws * HS + hs) * GL + j;
            head_ok[j] = slot < nh;
            head[j] = query_head(kvh, g, a.hkv, first + (head_ok[j] ? slot : 0));
#pragma unroll
            for (int k = 0; k < NV; ++k)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[j][k][e] = 0.f;
            mx[j] = NEG_INF;
            sum[j] = 0.f;
        }
        __syncthreads();  // the queries are in shared memory
    }

    // Online softmax over U rows: logits x in base 2 (NEG_INF = not attended, its value row zeroed) and
    // value rows v, one per row (VH = 1, shared by the heads) or one per head (VH = GL).
    template <int UU, int VH>
    __device__ __forceinline__ void fold(const float (&x)[UU][GL], const V (&v)[UU][VH][NV]) {
        constexpr int U = UU;
        float w[U][GL];
#pragma unroll
        for (int j = 0; j < GL; ++j) {
            float top = x[0][j];
#pragma unroll
            for (int u = 1; u < U; ++u) top = fmaxf(top, x[u][j]);
            if (top > mx[j]) {  // the running maximum grows: rescale what is there (rare)
                const float keep = exp2_fast(mx[j] - top);  // 0 while nothing was attended
                sum[j] *= keep;
#pragma unroll
                for (int k = 0; k < NV; ++k)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[j][k][e] *= keep;
                mx[j] = top;
            }
            const float base = mx[j] == NEG_INF ? 0.f : mx[j];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                w[u][j] = exp2_fast(x[u][j] - base);  // 0 for a row not attended
                sum[j] += w[u][j];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int hv = 0; hv < VH; ++hv)
#pragma unroll
                for (int k = 0; k < NV; ++k) {
                    float f[VEC];
                    unpack(v[u][hv][k], f);
#pragma unroll
                    for (int j = 0; j < GL; ++j)
                        if (VH == 1 || j == hv)
#pragma unroll
                            for (int e = 0; e < VEC; ++e) acc[j][k][e] = fmaf(w[u][j], f[e], acc[j][k][e]);
                }
    }

    // Device rows [ta, tb) of this (sequence, KV head): K and V rows at kb/vb + t * d, mask row
    // (1 = ignore) or null. Warp-uniform: every lane runs every iteration.
    __device__ __forceinline__ void device_rows(const T* kb, const T* vb, const unsigned char* mask, int ta, int tb) {
        const int d = a.d, step = wtn * U * tpw, first = ta + wt * U * tpw + ts;
        for (int base = ta, t0 = first; base < tb; base += step, t0 += step) {
            V kr[U][NV], vr[U][1][NV];
            bool live[U];
            const long long row0 = (long long)t0 * d;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = t0 + u * tpw;
                const bool in = t < tb;
                unsigned char masked = 0;
                if (in & (mask != nullptr)) masked = __ldg(mask + t);  // one predicated load
                live[u] = in & !masked;
                const int off = u * tpw * d;
#pragma unroll
                for (int k = 0; k < NV; ++k) {
                    // V is loaded with K, before the mask is known: its latency overlaps K's.
                    clear(kr[u][k]);
                    clear(vr[u][0][k]);
                    if (in && col[k] < d) {
                        load(kr[u][k], kb + row0 + (off + col[k]));
                        load(vr[u][0][k], vb + row0 + (off + col[k]));
                    }
                }
            }
            float x[U][GL];
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int j = 0; j < GL; ++j) x[u][j] = 0.f;
#pragma unroll
                for (int k = 0; k < NV; ++k) {
                    float f[VEC];
                    unpack(kr[u][k], f);
#pragma unroll
                    for (int j = 0; j < GL; ++j) {
                        float qv[VEC];
                        load_q(qv, qs + j * MAX_HEAD_DIM + col[k]);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) x[u][j] = fmaf(qv[e], f[e], x[u][j]);
                    }
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)  // dot products: sum over the L lanes of each row
                if (o < L)
#pragma unroll
                    for (int u = 0; u < U; ++u)
#pragma unroll
                        for (int j = 0; j < GL; ++j) x[u][j] += __shfl_xor_sync(FULL_MASK, x[u][j], o);
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int j = 0; j < GL; ++j) x[u][j] = live[u] ? x[u][j] : NEG_INF;
                if (!live[u])  // a masked row's value may be anything (NaN): never weigh it
#pragma unroll
                    for (int k = 0; k < NV; ++k) clear(vr[u][0][k]);
            }
            fold<U, 1>(x, vr);
        }
    }

    // Shipped host rows [ia, ib) of sequence b: logits per query head, values per KV head
    // (grouped) or per query head. (Row addresses are recomputed per row rather than held in
    // per-head pointer registers: the loop is short of registers, not of integer issue.)
    __device__ __forceinline__ void host_rows(int b, int kvh, int ia, int ib) {
        constexpr int U = UH;  // a value row per head: fewer rows in flight
        const int d = a.d, m = a.m, step = wtn * U * tpw;
        const bool grouped = a.host_grouped != 0;
        const long long seq_heads = (long long)b * a.hq, group_row = (long long)b * a.hkv + kvh;
        for (int base = ia; base < ib; base += step) {
            V vr[U][GL][NV];
            float x[U][GL];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = base + (wt * U + u) * tpw + ts;
                const bool in = i < ib;
#pragma unroll
                for (int j = 0; j < GL; ++j)
                    x[u][j] = in && head_ok[j] ? LOG2E * __ldg(a.host_logits + (seq_heads + head[j]) * m + i) : NEG_INF;
                if (grouped) {  // one value row for the whole group
                    const T* vrow = a.host_v + (group_row * m + i) * d;
#pragma unroll
                    for (int k = 0; k < NV; ++k) {
                        if (in && col[k] < d) load(vr[u][0][k], vrow + col[k]);
                        else clear(vr[u][0][k]);
#pragma unroll
                        for (int j = 1; j < GL; ++j) vr[u][j][k] = vr[u][0][k];
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < GL; ++j) {
                        const T* vrow = a.host_v + ((seq_heads + head[j]) * m + i) * d;
#pragma unroll
                        for (int k = 0; k < NV; ++k) {
                            if (in && head_ok[j] && col[k] < d) load(vr[u][j][k], vrow + col[k]);
                            else clear(vr[u][j][k]);
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < GL; ++j)
                    if (x[u][j] == NEG_INF)
#pragma unroll
                        for (int k = 0; k < NV; ++k) clear(vr[u][j][k]);
            }
            fold<U, GL>(x, vr);
        }
    }

    // Folds the state of lane ^ off (same heads, other rows) into this lane's.
    __device__ __forceinline__ void combine_lanes(int off) {
#pragma unroll
        for (int j = 0; j < GL; ++j) {
            const float om = __shfl_xor_sync(FULL_MASK, mx[j], off);
            const float os = __shfl_xor_sync(FULL_MASK, sum[j], off);
            const float top = fmaxf(mx[j], om), base = top == NEG_INF ? 0.f : top;
            const float ca = exp2_fast(mx[j] - base), cb = exp2_fast(om - base);
            sum[j] = sum[j] * ca + os * cb;
#pragma unroll
            for (int k = 0; k < NV; ++k)
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float other = __shfl_xor_sync(FULL_MASK, acc[j][k][e], off);
                    acc[j][k][e] = acc[j][k][e] * ca + other * cb;
                }
            mx[j] = top;
        }
    }

    // Combines every lane's state and writes the slice's partial of the pass's nh heads.
    __device__ __forceinline__ void finish(Shared& sh, int b, int kvh, int g, int first, int nh, int split) {
        for (int off = HS * L; off < 32; off <<= 1) combine_lanes(off);  // token slots of the warp
        if (ts == 0) {
#pragma unroll
            for (int j = 0; j < GL; ++j) {
                const int slot = (ws * HS + hs) * GL + j;
                if (l == 0) {
                    sh.mx[wt][slot] = mx[j];
                    sh.sum[wt][slot] = sum[j];
                }
#pragma unroll
                for (int k = 0; k < NV; ++k)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) sh.acc[wt][slot][col[k] + e] = acc[j][k][e];
            }
        }
        __syncthreads();  // every warp's state is in shared memory
        const int d = a.d, splits = gridDim.y;
        for (int idx = threadIdx.x; idx < nh * d; idx += WARPS * 32) {
            const int slot = idx / d, c = idx - slot * d;
            float top = NEG_INF;
            for (int w = 0; w < wtn; ++w) top = fmaxf(top, sh.mx[w][slot]);
            const float base = top == NEG_INF ? 0.f : top;
            float lsum = 0.f, o = 0.f;
            for (int w = 0; w < wtn; ++w) {
                const float e = exp2f(sh.mx[w][slot] - base);
                lsum += sh.sum[w][slot] * e;
                o += sh.acc[w][slot][c] * e;
            }
            const int h = query_head(kvh, g, a.hkv, first + slot);
            const long long out = ((long long)b * a.hq + h) * splits + split;
            a.part_o[out * d + c] = lsum > 0.f ? o / lsum : 0.f;
            if (c == 0) a.part_lse[out] = lsum > 0.f ? top * LN2 + logf(lsum) : NEG_INF;  // natural log again
        }
        __syncthreads();  // shared memory is free again for the next pass
    }
};

// The block's heads [first, first + hc) of KV head kvh's group, over the virtual tokens [lo, hi),
// in passes of at most PASS_HEADS heads.
// Not inlined: each variant is register-allocated on its own (one function holding all of them
// made ptxas spill at the 128-register bound), and the entry compiles in a fraction of the time.
template <typename T, int VEC, int NV, int GL>
__device__ __noinline__ void attend(const Args<T>& a, Shared& sh, int b, int kvh, int g, int first, int hc, int lo, int hi, int split) {
    using P = Pass<T, VEC, NV, GL>;
    const int lanes = pow2_ceil((a.d + VEC * NV - 1) / (VEC * NV)), rows = 32 / lanes;
    const T* kb = a.dev_k + b * a.dev_batch_stride + kvh * a.dev_head_stride;
    const T* vb = a.dev_v + b * a.dev_batch_stride + kvh * a.dev_head_stride;
    const unsigned char* mask = a.dev_mask ? a.dev_mask + (long long)b * a.n_dev : nullptr;
    const int sinks = a.sinks, m = a.m;
    for (int done = 0; done < hc;) {
        // Head slices of GL heads: across the row groups of a warp first, then across warps.
        const int want = min(hc - done, PASS_HEADS);
        const int slices = pow2_ceil((want + GL - 1) / GL);
        const int hs_count = min(slices, rows), ws_count = min(slices / hs_count, WARPS);
        const int nh = min(want, GL * hs_count * ws_count);
        P p(a, sh, lanes, b, kvh, g, first + done, nh, hs_count, ws_count);
        // The slice in token order: device sinks, host tokens, the other device rows. (Softmax
        // partials do not depend on the order; one loop over both device ranges keeps one copy
        // of its code.)
        if (max(lo, sinks) < min(hi, sinks + m)) p.host_rows(b, kvh, max(lo, sinks) - sinks, min(hi, sinks + m) - sinks);
#pragma unroll 1
        for (int part = 0; part < 2; ++part) {
            const int ta = part == 0 ? lo : max(lo, sinks + m) - m;
            const int tb = part == 0 ? min(hi, sinks) : hi - m;
            if (ta < tb) p.device_rows(kb, vb, mask, ta, tb);
        }
        p.finish(sh, b, kvh, g, first + done, nh, split);
        done += nh;
    }
}

template <typename T, int VEC, int NV>
__device__ void attend_heads(const Args<T>& a, Shared& sh, int b, int kvh, int g, int first, int hc, int lo, int hi, int split) {
    // One head per lane unless at least 3 share the rows (2 heads use two row groups instead),
    // or the lane already holds two loads per row (float rows longer than 128).
    if (VEC == 1 || NV > 1 || hc <= 2) attend<T, VEC, NV, 1>(a, sh, b, kvh, g, first, hc, lo, hi, split);
    else attend<T, VEC, NV, 4>(a, sh, b, kvh, g, first, hc, lo, hi, split);
}

template <typename T>
__device__ void split_attention(const Args<T>& args, int tokens_per_split) {
    __shared__ Shared sh;
    // The arguments go to the variant by reference to shared memory: by value they would be
    // copied to the stack at the call.
    __shared__ Args<T> a;
    if (threadIdx.x == 0) a = args;
    __syncthreads();
    constexpr int VW = 16 / (int)sizeof(T);  // elements per 16-byte load
    // Grid: x = chunk of the group's heads, y = slice, z = sequence * hkv + KV head.
    const int g = a.hq / a.hkv, chunks = gridDim.x, per_chunk = (g + chunks - 1) / chunks;
    const int first = blockIdx.x * per_chunk, hc = min(g, first + per_chunk) - first;
    const int split = blockIdx.y, b = blockIdx.z / a.hkv, kvh = blockIdx.z % a.hkv;
    if (hc <= 0) return;  // more chunks than heads: nothing for this block
    const long long total = (long long)a.n_dev + a.m;
    const int lo = (int)min((long long)split * tokens_per_split, total);
    const int hi = (int)min(total, (long long)lo + tokens_per_split);
    const unsigned long long addr = (unsigned long long)a.dev_k | (unsigned long long)a.dev_v |
                                    (a.m > 0 ? (unsigned long long)a.host_v : 0ull);
    const bool vec = a.d % VW == 0 && addr % 16 == 0 && a.dev_batch_stride % VW == 0 && a.dev_head_stride % VW == 0;
    if (vec) {  // 16-byte loads: one per lane per row, two for float rows longer than 128
        if (a.d <= 32 * VW) attend_heads<T, VW, 1>(a, sh, b, kvh, g, first, hc, lo, hi, split);
        else attend_heads<T, VW, MAX_HEAD_DIM / (32 * VW)>(a, sh, b, kvh, g, first, hc, lo, hi, split);
    } else {  // odd head_dim or unaligned rows: one element per load
        if (a.d <= 64) attend_heads<T, 1, 2>(a, sh, b, kvh, g, first, hc, lo, hi, split);
        else attend_heads<T, 1, MAX_HEAD_DIM / 32>(a, sh, b, kvh, g, first, hc, lo, hi, split);
    }
}

#define SPLIT_ATTENTION(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS_PER_SM) NAME(             \
        const T* q, const T* dev_k, const T* dev_v, long long dev_batch_stride,                     \
        long long dev_head_stride, const unsigned char* dev_mask, int n_dev, int sinks,            \
        const float* host_logits, const T* host_v, int m, int host_grouped, int hq, int hkv, int d, \
        float scale, int tokens_per_split, float* part_o, float* part_lse) {                       \
        const Args<T> a{q, dev_k, dev_v, dev_batch_stride, dev_head_stride, dev_mask, n_dev, sinks, \
                        host_logits, host_v, m, host_grouped, hq, hkv, d, scale, part_o, part_lse}; \
        split_attention<T>(a, tokens_per_split);                                                   \
    }

SPLIT_ATTENTION(split_attention_f16, f16)
SPLIT_ATTENTION(split_attention_bf16, bf16)
SPLIT_ATTENTION(split_attention_f32, float)

// Grid: x = row (sequence * hq + query head), y = 32 output columns; block: up to MERGE_WARPS
// warps. Every warp finds the row's maximum log-sum-exp and total weight itself (the slices'
// log-sum-exps are few and cached), then warp w folds slices w, w + warps, ... of its 32 columns:
// the loads of many slices are in flight at once, where one thread per column walking all slices
// would wait on each in turn.
extern "C" __global__ void __launch_bounds__(MERGE_WARPS * 32) merge_partials(
    const float* __restrict__ part_o,    // [b * hq, splits, d]
    const float* __restrict__ part_lse,  // [b * hq, splits]
    int splits,
    const float* __restrict__ host_o,    // [b * hq, d]; may be null (no CPU partial)
    const float* __restrict__ host_lse,  // [b * hq]
    int d,
    float* __restrict__ out,             // [b * hq, d]
    float* __restrict__ out_lse)         // [b * hq]; may be null
{
    __shared__ float s_o[MERGE_WARPS][32];
    const int row = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int col = blockIdx.y * 32 + lane;
    const bool first_thread = threadIdx.x == 0 && blockIdx.y == 0;
    const float* lse = part_lse + (long long)row * splits;
    float top = NEG_INF;
    for (int s = lane; s < splits; s += 32) top = fmaxf(top, lse[s]);
    top = warp_max(top);
    if (host_o) top = fmaxf(top, host_lse[row]);
    if (top == NEG_INF) {  // nothing attended (fully masked): zeros, as torch's SDPA gives
        if (warp == 0 && col < d) out[(long long)row * d + col] = 0.f;
        if (first_thread && out_lse) out_lse[row] = NEG_INF;
        return;  // the same for every warp of the block
    }
    float total = 0.f;
    for (int s = lane; s < splits; s += 32) total += expf(lse[s] - top);  // exp(-inf) = 0: empty slices
    total = warp_sum(total);
    if (host_o) total += expf(host_lse[row] - top);
    float o = 0.f;
    if (col < d) {
        const float* po = part_o + (long long)row * splits * d + col;
#pragma unroll 4
        // An empty part (lse -inf) weighs 0, and its output may hold anything (NaN included):
        // skipped, not multiplied by 0, as the CPU merge does.
        for (int s = warp; s < splits; s += warps) {
            const float l = lse[s];
            if (l != NEG_INF) o += expf(l - top) * po[(long long)s * d];
        }
        if (host_o && warp == 0 && host_lse[row] != NEG_INF)
            o += expf(host_lse[row] - top) * host_o[(long long)row * d + col];
    }
    s_o[warp][lane] = o;
    __syncthreads();
    if (warp == 0) {
        float t = 0.f;
        for (int w = 0; w < warps; ++w) t += s_o[w][lane];
        if (col < d) out[(long long)row * d + col] = t / total;
    }
    if (first_thread && out_lse) out_lse[row] = top + __logf(total);
}
