// The CUDA vocabulary kernels/hybrid_attention.cu uses, for compiling it as ordinary C++ and
// running it on the fiber scheduler (runtime.h). Anything the kernel file starts using that is
// not here fails to compile, which is the point: nothing is emulated by accident.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "runtime.h"

#define HYBRIDGEN_EMULATION 1

// Qualifiers. __shared__ variables are statics: one copy, and blocks run one after another, so
// each block sees what the previous one left (as stale as real shared memory can be).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::emu::block_barrier(__LINE__)

// Vector types the kernel loads (16-byte aligned, as CUDA's are: UBSan reports a misaligned load)
// and the read-only cache load, which on the CPU is a plain load.
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
template <typename T>
inline T __ldg(const T* p) { return *p; }

// Bit casts.
template <typename To, typename From>
inline To emu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
    To t;
    std::memcpy(&t, &v, sizeof t);
    return t;
}
inline float __int_as_float(int v) { return emu_bit_cast<float>(v); }
inline float __uint_as_float(unsigned v) { return emu_bit_cast<float>(v); }
inline int __float_as_int(float v) { return emu_bit_cast<int>(v); }
inline unsigned __float_as_uint(float v) { return emu_bit_cast<unsigned>(v); }

// IEEE binary16 bits to float, exactly (what PTX cvt.f32.f16 does).
inline float emu_half_bits_to_float(unsigned short h) {
    unsigned sign = (unsigned)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        float f = std::ldexp((float)man, -24);
        return sign ? -f : f;
    }
    return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline float __bfloat162float_raw(unsigned short b) { return __uint_as_float((unsigned)b << 16); }

// Math. The device's fast intrinsics are taken at full precision; the tolerance of the tests
// covers the device's approximation error.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
// expf, logf, fmaxf, ... come from <cmath> (math.h's global float functions).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// Warp shuffles and votes: every lane of the mask must reach the same call (same line).
template <typename T>
inline T emu_shuffle(::emu::WarpOp op, unsigned mask, T v, int arg, int width, const char* what, int line) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
    uint64_t in = 0;
    std::memcpy(&in, &v, sizeof v);
    uint64_t out = ::emu::warp_exchange(op, mask, in, arg, width, what, line);
    T r;
    std::memcpy(&r, &out, sizeof r);
    return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int line = __builtin_LINE()) {
    return emu_shuffle(::emu::SHFL_XOR, mask, v, lane_mask, width, "__shfl_xor_sync", line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    return emu_shuffle(::emu::SHFL_DOWN, mask, v, (int)delta, width, "__shfl_down_sync", line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    return emu_shuffle(::emu::SHFL_UP, mask, v, (int)delta, width, "__shfl_up_sync", line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, int line = __builtin_LINE()) {
    return emu_shuffle(::emu::SHFL_IDX, mask, v, src, width, "__shfl_sync", line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return (unsigned)::emu::warp_exchange(::emu::VOTE_BALLOT, mask, pred != 0, 0, 32, "__ballot_sync", line);
}
inline int __any_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return (int)::emu::warp_exchange(::emu::VOTE_ANY, mask, pred != 0, 0, 32, "__any_sync", line);
}
inline int __all_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
    return (int)::emu::warp_exchange(::emu::VOTE_ALL, mask, pred != 0, 0, 32, "__all_sync", line);
}
