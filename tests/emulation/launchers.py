"""The launches of src/gpu/device.rs (`Gpu::split_attention`, `Gpu::merge_partials`) against the
emulator: same kernels, same argument order, same grid and block.

The split count is the caller's (from `_native.choose_splits`, the core's own function). The
block of split_attention is the kernel's launch bound (device.rs's SPLIT_THREADS, which the Rust
test tests/kernel_abi.rs holds equal to it). Two one-line formulas of device.rs are not exposed
by the core and are restated here: tokens per split and merge_partials' block width."""

from __future__ import annotations

import numpy as np

KERNEL = {"f16": "split_attention_f16", "bf16": "split_attention_bf16", "f32": "split_attention_f32"}


def tokens_per_split(total: int, splits: int) -> int:
    return max(1, -(-total // splits))  # device.rs: total.div_ceil(splits).max(1)


def merge_threads(head_dim: int) -> int:
    return -(-head_dim // 32) * 32  # device.rs: head_dim.div_ceil(32) * 32


def split_attention(emu, dtype, *, q, dev_k, dev_v, dev_batch_stride, dev_head_stride, dev_mask, n_dev, sinks,
                    host_logits, host_v, m, host_grouped, hq, hkv, d, scale, splits, part_o, part_lse,
                    schedule=0, seed=0):
    rows = part_lse.shape[0]
    if rows == 0:
        return
    name = KERNEL[dtype]
    tps = tokens_per_split(n_dev + m, splits)
    emu.launch(name, (rows, splits), (emu.max_threads(name),),
               [q, dev_k, dev_v, int(dev_batch_stride), int(dev_head_stride), dev_mask, n_dev, sinks,
                host_logits, host_v, m, int(host_grouped), hq, hkv, d, np.float32(scale).item(), tps, part_o, part_lse],
               schedule=schedule, seed=seed)


def merge_partials(emu, *, part_o, part_lse, host_o, host_lse, out, out_lse, schedule=0, seed=0):
    rows, splits, d = part_o.shape
    if rows == 0:
        return
    emu.launch("merge_partials", (rows,), (merge_threads(d),),
               [part_o, part_lse, splits, host_o, host_lse, d, out, out_lse], schedule=schedule, seed=seed)
