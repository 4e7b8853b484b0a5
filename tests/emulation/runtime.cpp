// Fibers on ucontext, with AddressSanitizer told about every stack switch (otherwise it takes
// a fiber's stack for a corrupted one and reports false errors).
#include "runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(const volatile void* addr, size_t size);
}
#endif

namespace emu {
namespace {

constexpr size_t STACK_BYTES = 256 * 1024;  // sanitizer builds have large frames

enum class State { RUNNABLE, AT_WARP, AT_BLOCK, DONE };

struct Fiber {
    ucontext_t ctx;
    char* stack = nullptr;  // from the pool below
    uint3 tid{};
    unsigned linear = 0;
    State state = State::RUNNABLE;
    // At a warp exchange: what, where, and the payload in and out.
    WarpOp op = SHFL_XOR;
    unsigned mask = 0;
    int arg = 0, width = 32, line = 0;
    const char* what = "";
    uint64_t in = 0, out = 0;
};

struct Launch {
    dim3 grid, block;
    uint3 block_id{};
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    ucontext_t scheduler;
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
    const std::function<void()>* kernel = nullptr;
    std::string error;
};

Launch* g = nullptr;

// Fiber stacks, kept from launch to launch: allocating (and, under ASan, poisoning and
// unpoisoning) 256 KB per thread per launch would be most of the time of a small launch.
std::vector<std::unique_ptr<char[]>> stack_pool;
// Whether a launch stopped on an error since the stacks were last cleaned: its fibers' stacks
// are left poisoned mid-frame. Fibers that ran to the end leave them as they found them.
bool stacks_dirty = true;

// A warp's lanes in a mask, without allocating (this runs at every shuffle).
struct Lanes {
    Fiber* at[32];
    int n = 0, missing = 0;
    Fiber** begin() { return at; }
    Fiber** end() { return at + n; }
};

void to_scheduler(bool finished) {
    Fiber* f = g->current;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g->sched_bottom, g->sched_size);
    swapcontext(&f->ctx, &g->scheduler);
    __sanitizer_finish_switch_fiber(fake, &g->sched_bottom, &g->sched_size);
#else
    (void)finished;
    swapcontext(&f->ctx, &g->scheduler);
#endif
}

void resume(Fiber& f) {
    g->current = &f;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK_BYTES);
    swapcontext(&g->scheduler, &f.ctx);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    swapcontext(&g->scheduler, &f.ctx);
#endif
    g->current = nullptr;
}

void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &g->sched_bottom, &g->sched_size);
#endif
    (*g->kernel)();
    g->current->state = State::DONE;
    to_scheduler(true);
}

void fail(const std::string& msg) {
    if (g->error.empty()) {
        char where[96];
        std::snprintf(where, sizeof where, "block (%u,%u,%u): ", g->block_id.x, g->block_id.y, g->block_id.z);
        g->error = where + msg;
    }
}

std::string thread_name(const Fiber& f) {
    char s[64];
    std::snprintf(s, sizeof s, "thread %u (warp %u lane %u)", f.linear, f.linear / 32, f.linear % 32);
    return s;
}

std::string describe(const Fiber& f) {
    char s[160];
    switch (f.state) {
        case State::AT_WARP: std::snprintf(s, sizeof s, "at %s (line %d)", f.what, f.line); break;
        case State::AT_BLOCK: std::snprintf(s, sizeof s, "at __syncthreads (line %d)", f.line); break;
        case State::DONE: std::snprintf(s, sizeof s, "exited"); break;
        default: std::snprintf(s, sizeof s, "running"); break;
    }
    return thread_name(f) + " " + s;
}

// The lanes of the warp of `f` that are in `mask` and exist in this block.
Lanes lanes_of(const Fiber& f, unsigned mask) {
    Lanes lanes;
    unsigned base = f.linear / 32 * 32;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1)) continue;
        if (base + l >= g->fibers.size()) {
            ++lanes.missing;
            continue;
        }
        lanes.at[lanes.n++] = &g->fibers[base + l];
    }
    return lanes;
}

// Called by the last lane to arrive: computes every lane's result.
void resolve_warp(Lanes& lanes) {
    const Fiber& first = *lanes.at[0];
    unsigned base = first.linear / 32 * 32;
    auto lane_fiber = [&](int lane) -> Fiber* {
        unsigned idx = base + (unsigned)lane;
        return idx < g->fibers.size() && (first.mask >> lane & 1) ? &g->fibers[idx] : nullptr;
    };
    uint64_t ballot = 0;
    for (Fiber* f : lanes)
        if (f->in) ballot |= 1ull << (f->linear % 32);
    for (Fiber* f : lanes) {
        int lane = (int)(f->linear % 32), w = f->width, seg = lane / w * w, src = lane;
        switch (f->op) {
            case SHFL_XOR: src = lane ^ f->arg; if (src >= seg + w) src = lane; break;
            case SHFL_DOWN: src = lane + f->arg; if (src >= seg + w) src = lane; break;
            case SHFL_UP: src = lane - f->arg; if (src < seg) src = lane; break;
            case SHFL_IDX: src = seg + ((f->arg % w) + w) % w; break;
            default: break;
        }
        switch (f->op) {
            case VOTE_BALLOT: f->out = ballot & first.mask; break;
            case VOTE_ANY: f->out = (ballot & first.mask) != 0; break;
            case VOTE_ALL: f->out = (ballot & first.mask) == (first.mask & ((1ull << 32) - 1)); break;
            default: {
                Fiber* s = lane_fiber(src);
                if (!s) {
                    fail(thread_name(*f) + ": " + f->what + " (line " + std::to_string(f->line) +
                         ") reads lane " + std::to_string(src) + ", which is not in the mask");
                    return;
                }
                f->out = s->in;
            }
        }
    }
    for (Fiber* f : lanes) f->state = State::RUNNABLE;
}

void check_block_barrier() {
    int line = -1;
    for (const Fiber& f : g->fibers) {
        if (f.state != State::AT_BLOCK) return;  // someone still to come
        if (line >= 0 && f.line != line) {
            fail("threads wait at different __syncthreads (lines " + std::to_string(line) + " and " +
                 std::to_string(f.line) + ")");
            return;
        }
        line = f.line;
    }
    for (Fiber& f : g->fibers) f.state = State::RUNNABLE;
}

// Every fiber waits, none can go on: name the first inconsistency.
void diagnose_deadlock() {
    // A warp split between two places is the cause; a barrier left waiting is its consequence.
    for (const Fiber& f : g->fibers) {
        if (f.state != State::AT_WARP) continue;
        for (Fiber* o : lanes_of(f, f.mask))
            if (o->state != State::AT_WARP || o->line != f.line) {
                fail(std::string("divergent ") + f.what + " (line " + std::to_string(f.line) + "): " + describe(f) +
                     ", but " + describe(*o));
                return;
            }
    }
    for (const Fiber& f : g->fibers) {
        if (f.state != State::AT_BLOCK) continue;
        for (const Fiber& o : g->fibers)
            if (o.state != State::AT_BLOCK) {
                fail("__syncthreads (line " + std::to_string(f.line) + ") not reached by every thread: " + describe(f) +
                     ", but " + describe(o));
                return;
            }
    }
    fail("deadlock");
}

}  // namespace

const uint3& thread_idx() { return g->current->tid; }
const uint3& block_idx() { return g->block_id; }
const dim3& block_dim() { return g->block; }
const dim3& grid_dim() { return g->grid; }

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* what, int line) {
    Fiber* f = g->current;
    unsigned lane = f->linear % 32;
    if (!(mask >> lane & 1)) {
        fail(thread_name(*f) + " calls " + what + " (line " + std::to_string(line) + ") with a mask that excludes itself");
        to_scheduler(false);
    }
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        fail(std::string(what) + " with width " + std::to_string(width));
        to_scheduler(false);
    }
    f->op = op, f->mask = mask, f->in = value, f->arg = arg, f->width = width, f->what = what, f->line = line;
    f->state = State::AT_WARP;
    Lanes lanes = lanes_of(*f, mask);
    if (lanes.missing) fail(std::string(what) + " (line " + std::to_string(line) + ") names lanes beyond the block");
    bool all_here = true;
    for (Fiber* o : lanes) {
        if (o->state == State::DONE) {
            fail(std::string("divergent ") + what + " (line " + std::to_string(line) + "): " + describe(*f) + ", but " +
                 describe(*o));
        } else if (o->state == State::AT_WARP && (o->line != line || o->op != op || o->mask != mask)) {
            fail(std::string("divergent ") + what + " (line " + std::to_string(line) + "): " + describe(*f) + ", but " +
                 describe(*o));
        } else if (o->state != State::AT_WARP) {
            all_here = false;
        }
    }
    if (g->error.empty() && all_here) resolve_warp(lanes);
    to_scheduler(false);
    return f->out;
}

void block_barrier(int line) {
    Fiber* f = g->current;
    f->state = State::AT_BLOCK;
    f->line = line;
    check_block_barrier();
    to_scheduler(false);
}

std::string launch(dim3 grid, dim3 block, int schedule, unsigned seed, const std::function<void()>& kernel) {
    if (g) return "nested launch";
    unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        return "invalid launch configuration";
    Launch l;
    l.grid = grid, l.block = block, l.kernel = &kernel;
    l.fibers.resize(threads);
    g = &l;
    while (stack_pool.size() < threads) stack_pool.emplace_back(new char[STACK_BYTES]);
    for (unsigned i = 0; i < threads; ++i) l.fibers[i].stack = stack_pool[i].get();
#if defined(__SANITIZE_ADDRESS__)
    if (stacks_dirty)
        for (auto& stack : stack_pool) __asan_unpoison_memory_region(stack.get(), STACK_BYTES);
#endif
    stacks_dirty = false;
    std::mt19937 rng(seed);
    std::vector<unsigned> order(threads);
    for (unsigned z = 0; z < grid.z && l.error.empty(); ++z)
        for (unsigned y = 0; y < grid.y && l.error.empty(); ++y)
            for (unsigned x = 0; x < grid.x && l.error.empty(); ++x) {
                l.block_id = {x, y, z};
                for (unsigned i = 0; i < threads; ++i) {
                    Fiber& f = l.fibers[i];
                    f.linear = i;
                    f.tid = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
                    f.state = State::RUNNABLE;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = STACK_BYTES;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_main, 0);
                    // The stack is set now; ASan's swapcontext interceptor would otherwise clear
                    // the shadow of all of it (32 KB) at every switch into the fiber.
                    f.ctx.uc_stack.ss_size = 0;
                }
                for (;;) {
                    for (unsigned i = 0; i < threads; ++i) order[i] = schedule == REVERSE ? threads - 1 - i : i;
                    if (schedule == SHUFFLED) std::shuffle(order.begin(), order.end(), rng);
                    bool progressed = false, all_done = true;
                    for (unsigned i : order) {
                        if (!l.error.empty()) break;
                        Fiber& f = l.fibers[i];
                        if (f.state == State::RUNNABLE) {
                            resume(f);
                            progressed = true;
                        }
                        all_done &= f.state == State::DONE;
                    }
                    if (!l.error.empty()) break;
                    if (all_done) {
                        bool really = std::all_of(l.fibers.begin(), l.fibers.end(),
                                                  [](const Fiber& f) { return f.state == State::DONE; });
                        if (really) break;
                    }
                    if (!progressed) {
                        diagnose_deadlock();
                        break;
                    }
                }
            }
    g = nullptr;
    if (!l.error.empty()) stacks_dirty = true;
    return l.error;
}

}  // namespace emu
