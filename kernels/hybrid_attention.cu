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
//   shipped next to it (host_v). Each block covers one slice of that virtual sequence for one
//   (sequence, query head) and writes the slice's softmax partial: normalised output and
//   log-sum-exp. With m = 0 it is plain attention over the device tier.
//
// merge_partials: combines the slices of each (sequence, query head), plus optionally the
//   CPU's own partial (output + log-sum-exp over the host tokens: the HGCA merge), into the
//   final output o = sum_i e^{lse_i - M} o_i / sum_i e^{lse_i - M} with M = max lse_i.
//
// Splitting the sequence over blocks (flash-decoding) keeps the GPU busy at batch 1 with few
// heads; exact up to float32 rounding, since softmax partials merge exactly.

#define WARPS 4
#define MAX_D_PER_LANE 8  // head_dim <= 256
#define NEG_INF __int_as_float(0xff800000)  // -infinity without math headers

struct f16 { unsigned short x; };
struct bf16 { unsigned short x; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(f16 v) {
#ifdef HYBRIDGEN_EMULATION  // compiled as C++ by the tests (tests/emulation): no inline PTX
    return emu_half_bits_to_float(v.x);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
#endif
}
__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(((unsigned int)v.x) << 16); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One attended token, folded into a running (max, sum, output) triple.
__device__ __forceinline__ void online_update(float x, const float* v, int n, float& mx, float& sum, float* acc) {
    if (x == NEG_INF) return;
    float new_mx = fmaxf(mx, x);
    float keep = (mx == NEG_INF) ? 0.f : __expf(mx - new_mx);
    float w = __expf(x - new_mx);
    sum = sum * keep + w;
    for (int j = 0; j < n; ++j) acc[j] = acc[j] * keep + w * v[j];
    mx = new_mx;
}

template <typename T>
__device__ void split_attention(
    const T* __restrict__ q,            // [b, hq, d]
    const T* __restrict__ dev_k,        // [b, hkv, n_dev, d], rows contiguous
    const T* __restrict__ dev_v,
    long long dev_batch_stride,         // elements between sequences
    long long dev_head_stride,          // elements between KV heads
    const unsigned char* __restrict__ dev_mask,  // [b, n_dev], 1 = ignore; may be null
    int n_dev, int sinks,
    const float* __restrict__ host_logits,  // [b, hq, m]; may be null when m == 0
    const T* __restrict__ host_v,           // [b, hv, m, d], hv = hkv (grouped) or hq
    int m, int host_grouped,
    int hq, int hkv, int d, float scale, int tokens_per_split,
    float* __restrict__ part_o,         // [b * hq, splits, d]
    float* __restrict__ part_lse)       // [b * hq, splits]
{
    const int bh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int b = bh / hq, h = bh % hq, kvh = h / (hq / hkv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int per_lane = (d + 31) / 32;

    float qr[MAX_D_PER_LANE];
    for (int j = 0; j < per_lane; ++j) {
        int i = lane + 32 * j;
        qr[j] = i < d ? to_float(q[(long long)bh * d + i]) : 0.f;
    }
    const T* kbase = dev_k + b * dev_batch_stride + kvh * dev_head_stride;
    const T* vbase = dev_v + b * dev_batch_stride + kvh * dev_head_stride;
    const int hv = host_grouped ? kvh : h;
    const int hv_count = host_grouped ? hkv : hq;
    const T* hvbase = host_v ? host_v + ((long long)b * hv_count + hv) * (long long)m * d : nullptr;
    const float* hlog = host_logits ? host_logits + (long long)bh * m : nullptr;

    const int total = n_dev + m;
    const int lo = split * tokens_per_split;
    const int hi = min(total, lo + tokens_per_split);

    float mx = NEG_INF, sum = 0.f, acc[MAX_D_PER_LANE], vr[MAX_D_PER_LANE];
    for (int j = 0; j < per_lane; ++j) acc[j] = 0.f;

    for (int t = lo + warp; t < hi; t += WARPS) {
        float x;
        const T* vrow;
        if (t >= sinks && t < sinks + m) {  // a shipped host token
            int i = t - sinks;
            x = hlog[i];
            vrow = hvbase + (long long)i * d;
        } else {  // a device token
            int i = t < sinks ? t : t - m;
            const T* krow = kbase + (long long)i * d;
            float dot = 0.f;
            for (int j = 0; j < per_lane; ++j) {
                int c = lane + 32 * j;
                if (c < d) dot += qr[j] * to_float(krow[c]);
            }
            x = warp_sum(dot) * scale;
            if (dev_mask && dev_mask[(long long)b * n_dev + i]) x = NEG_INF;
            vrow = vbase + (long long)i * d;
        }
        if (x == NEG_INF) continue;  // uniform across the warp
        for (int j = 0; j < per_lane; ++j) {
            int c = lane + 32 * j;
            vr[j] = c < d ? to_float(vrow[c]) : 0.f;
        }
        online_update(x, vr, per_lane, mx, sum, acc);
    }

    // Combine the warps of the block.
    __shared__ float s_mx[WARPS], s_sum[WARPS];
    __shared__ float s_acc[WARPS][32 * MAX_D_PER_LANE];
    if (lane == 0) { s_mx[warp] = mx; s_sum[warp] = sum; }
    for (int j = 0; j < per_lane; ++j) s_acc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, s_mx[w]);
    float L = 0.f;
    for (int w = 0; w < WARPS; ++w) L += (s_mx[w] == NEG_INF) ? 0.f : s_sum[w] * expf(s_mx[w] - M);
    const long long slot = (long long)bh * splits + split;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (s_mx[w] != NEG_INF) o += s_acc[w][i] * expf(s_mx[w] - M);
        part_o[slot * d + i] = L > 0.f ? o / L : 0.f;
    }
    if (threadIdx.x == 0) part_lse[slot] = L > 0.f ? M + __logf(L) : NEG_INF;
}

#define SPLIT_ATTENTION(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                                \
        const T* q, const T* dev_k, const T* dev_v, long long dev_batch_stride,                     \
        long long dev_head_stride, const unsigned char* dev_mask, int n_dev, int sinks,            \
        const float* host_logits, const T* host_v, int m, int host_grouped, int hq, int hkv, int d, \
        float scale, int tokens_per_split, float* part_o, float* part_lse) {                       \
        split_attention<T>(q, dev_k, dev_v, dev_batch_stride, dev_head_stride, dev_mask, n_dev,     \
                           sinks, host_logits, host_v, m, host_grouped, hq, hkv, d, scale,         \
                           tokens_per_split, part_o, part_lse);                                    \
    }

SPLIT_ATTENTION(split_attention_f16, f16)
SPLIT_ATTENTION(split_attention_bf16, bf16)
SPLIT_ATTENTION(split_attention_f32, float)

// One block per (sequence, query head), one thread per output element (blockDim >= d).
extern "C" __global__ void merge_partials(
    const float* __restrict__ part_o,    // [b * hq, splits, d]
    const float* __restrict__ part_lse,  // [b * hq, splits]
    int splits,
    const float* __restrict__ host_o,    // [b * hq, d]; may be null (no CPU partial)
    const float* __restrict__ host_lse,  // [b * hq]
    int d,
    float* __restrict__ out,             // [b * hq, d]
    float* __restrict__ out_lse)         // [b * hq]; may be null
{
    const int bh = blockIdx.x, i = threadIdx.x;
    const float* lse = part_lse + (long long)bh * splits;
    float M = host_o ? host_lse[bh] : NEG_INF;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, lse[s]);
    if (M == NEG_INF) {  // nothing attended (fully masked): zeros, as torch's SDPA gives
        if (i < d) out[(long long)bh * d + i] = 0.f;
        if (i == 0 && out_lse) out_lse[bh] = NEG_INF;
        return;
    }
    float L = 0.f, o = 0.f;
    for (int s = 0; s < splits; ++s) {
        float w = expf(lse[s] - M);  // exp(-inf) = 0 for empty slices
        L += w;
        if (i < d) o += w * part_o[((long long)bh * splits + s) * d + i];
    }
    if (host_o) {
        float w = expf(host_lse[bh] - M);
        L += w;
        if (i < d) o += w * host_o[(long long)bh * d + i];
    }
    if (i < d) out[(long long)bh * d + i] = o / L;
    if (i == 0 && out_lse) out_lse[bh] = M + __logf(L);
}
