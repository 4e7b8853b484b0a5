// The scheduler that runs a CUDA grid on one CPU thread: every CUDA thread of a block is a
// cooperative fiber, blocks run one after another, and every synchronisation point (block
// barrier, warp shuffle or vote) is a place where a fiber waits until its partners arrive.
// Whatever real hardware would leave undefined or hang on (a shuffle not reached by every lane
// of its mask, a barrier some threads never reach) is reported as a launch error instead.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace emu {

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };

// Built-in variables of the fiber now running (valid only inside a kernel).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// The order in which runnable fibers are resumed: a race between warps (a missing barrier)
// gives different results under different orders.
enum Schedule { FORWARD = 0, REVERSE = 1, SHUFFLED = 2 };

// Runs `kernel` once per thread of the grid. Returns "" on success, else what went wrong.
std::string launch(dim3 grid, dim3 block, int schedule, unsigned seed, const std::function<void()>& kernel);

// Warp-level exchange: every lane of `mask` arrives with a 64-bit payload; `op` combines them.
enum WarpOp { SHFL_XOR, SHFL_DOWN, SHFL_UP, SHFL_IDX, VOTE_BALLOT, VOTE_ANY, VOTE_ALL };
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* what, int line);

// __syncthreads(): waits until every thread of the block arrives at the same barrier.
void block_barrier(int line);

}  // namespace emu
