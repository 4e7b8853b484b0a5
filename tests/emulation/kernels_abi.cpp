// The C ABI Python calls through ctypes: the kernel file, compiled unchanged on top of
// cuda_emulation.h, and one launch entry shaped like cuLaunchKernel (kernel name, grid, block,
// an array of pointers to the argument values), so callers pass arguments exactly as the
// driver launch in src/gpu/device.rs does.
//
// HYBRIDGEN_KERNEL_SOURCE is the path of the .cu file (a string literal), given by the build.
#include "cuda_emulation.h"

#include HYBRIDGEN_KERNEL_SOURCE

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace {

std::string last_error;

// One type code per kernel parameter: p pointer, i int, q long long, f float.
template <typename T>
constexpr char code() {
    if constexpr (std::is_pointer_v<T>) return 'p';
    else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, long long>) return 'q';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else static_assert(sizeof(T) == 0, "kernel parameter type without an ABI code");
}

template <typename... A, size_t... I>
void call(void (*fn)(A...), void** params, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

struct Kernel {
    const char* name;
    int max_threads;  // the kernel's __launch_bounds__, else the device limit
    std::string signature;
    std::string (*launch)(emu::dim3, emu::dim3, int, unsigned, void**);
};

template <auto Fn>
struct Entry;
template <typename... A, void (*Fn)(A...)>
struct Entry<Fn> {
    static std::string signature() { return std::string{code<A>()...}; }
    static std::string launch(emu::dim3 grid, emu::dim3 block, int schedule, unsigned seed, void** params) {
        return emu::launch(grid, block, schedule, seed,
                           [params] { call(Fn, params, std::index_sequence_for<A...>{}); });
    }
};

#define KERNEL(NAME, MAX_THREADS) Kernel{#NAME, MAX_THREADS, Entry<NAME>::signature(), Entry<NAME>::launch}

const Kernel* find(const char* name) {
    static const Kernel kernels[] = {
        KERNEL(split_attention_f16, WARPS * 32),
        KERNEL(split_attention_bf16, WARPS * 32),
        KERNEL(split_attention_f32, WARPS * 32),
        KERNEL(merge_partials, MERGE_WARPS * 32),
    };
    for (const Kernel& k : kernels)
        if (std::strcmp(k.name, name) == 0) return &k;
    return nullptr;
}

}  // namespace

extern "C" {

// The parameter type codes of kernel `name`, or null if there is no such kernel.
const char* emu_signature(const char* name) {
    const Kernel* k = find(name);
    return k ? k->signature.c_str() : nullptr;
}

int emu_max_threads(const char* name) {
    const Kernel* k = find(name);
    return k ? k->max_threads : 0;
}

// 0 on success; otherwise emu_last_error() says why.
int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
               void** params, int n_params, int schedule, unsigned seed) {
    const Kernel* k = find(name);
    if (!k) {
        last_error = std::string("no kernel named ") + name;
        return 1;
    }
    if (n_params != (int)k->signature.size()) {
        last_error = std::string(name) + " takes " + std::to_string(k->signature.size()) + " arguments, got " +
                     std::to_string(n_params);
        return 1;
    }
    if ((long long)bx * by * bz > k->max_threads) {
        last_error = std::string(name) + ": block of " + std::to_string(bx * by * bz) + " threads exceeds its launch bounds (" +
                     std::to_string(k->max_threads) + ")";
        return 1;
    }
    last_error = k->launch(emu::dim3{gx, gy, gz}, emu::dim3{bx, by, bz}, schedule, seed, params);
    return last_error.empty() ? 0 : 1;
}

const char* emu_last_error() { return last_error.c_str(); }

}  // extern "C"
