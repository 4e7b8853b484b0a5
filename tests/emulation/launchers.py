"""The launches of src/gpu/device.rs (`Gpu::split_attention`, `Gpu::merge_partials`) against the
emulator: same kernels, same argument order, same grid and block.

The geometry (grid, block, shared memory, tokens per split) is the core's own, from
`_native.launch_geometry` (src/gpu/launch.rs, which device.rs launches with); nothing of it is
restated here. It is computed where a job is made (`split_geometry`, `merge_geometry`, in the
test process, which imports hybridgen) and travels with the job to the sanitized worker that
runs the launch (which does not import hybridgen, or torch with it)."""

from __future__ import annotations

import numpy as np
from emulator import EmulationError

KERNEL = {"f16": "split_attention_f16", "bf16": "split_attention_bf16", "f32": "split_attention_f32"}


def split_geometry(batch: int, hq: int, hkv: int, d: int, tokens: int, splits: int) -> dict:
    from hybridgen import _native

    return _native.launch_geometry("split_attention", batch, hq, hkv, d, tokens, splits)


def merge_geometry(rows: int, d: int, splits: int) -> dict:
    from hybridgen import _native

    return _native.launch_geometry("merge_partials", rows, 1, 1, d, 0, splits)


def _launch(emu, name, geometry, args, schedule, seed):
    if 0 in geometry["grid"]:
        return  # an empty batch: device.rs launches nothing
    if geometry["shared_mem_bytes"]:
        raise EmulationError(f"{name}: dynamic shared memory is not emulated (only __shared__ variables)")
    emu.launch(name, geometry["grid"], geometry["block"], args, schedule=schedule, seed=seed)


def split_attention(
    emu,
    dtype,
    *,
    geometry,
    q,
    dev_k,
    dev_v,
    dev_batch_stride,
    dev_head_stride,
    dev_mask,
    n_dev,
    sinks,
    host_logits,
    host_v,
    m,
    host_grouped,
    hq,
    hkv,
    d,
    scale,
    part_o,
    part_lse,
    schedule=0,
    seed=0,
):
    assert part_o.shape[1] == geometry["splits"], "part_o was sized for another split count"
    _launch(
        emu,
        KERNEL[dtype],
        geometry,
        [
            q,
            dev_k,
            dev_v,
            int(dev_batch_stride),
            int(dev_head_stride),
            dev_mask,
            n_dev,
            sinks,
            host_logits,
            host_v,
            m,
            int(host_grouped),
            hq,
            hkv,
            d,
            np.float32(scale).item(),
            geometry["tokens_per_split"],
            part_o,
            part_lse,
        ],
        schedule,
        seed,
    )


def merge_partials(emu, *, geometry, part_o, part_lse, host_o, host_lse, out, out_lse, schedule=0, seed=0):
    rows, splits, d = part_o.shape
    _launch(
        emu, "merge_partials", geometry, [part_o, part_lse, splits, host_o, host_lse, d, out, out_lse], schedule, seed
    )
