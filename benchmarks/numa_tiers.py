"""The CPU logits pass with the keys in near memory against the keys in far memory.

For a machine with two or more NUMA nodes: a two-socket server (far = the other socket's
DRAM) or a CXL memory expander (far = its CPU-less node). Two host stores of the same
shape and contents, both with values on the far node, differ only in where their keys live:

  * ``keys near``: ``HostKVStore(near_node=NEAR, far_node=FAR)``, keys on the CPUs' own node;
  * ``keys far``: ``HostKVStore(near_node=FAR, far_node=FAR)``, keys in far memory (what the
    store does to the oldest keys once near memory is full).

With the process bound to the near node's CPUs, each round times in turn, per placement, a
plain streaming read of the key bytes (the tier's read bandwidth, the ceiling), the logits
pass ``q·Kᵀ`` over every host key (``HostKVStore.logits``) and the fused partial attention
over every host token (``cpu_stage(merge="lse")``: keys from their tier, values from far).
Medians of ``--repeats`` rounds; the node of the keys and values is read back from the kernel
(``node_of``) and recorded, so a placement that did not happen cannot pass as a result.

    .venv/bin/python benchmarks/numa_tiers.py     # near: the first node with CPUs; far: a CPU-less node, else the nearest other
    .venv/bin/python benchmarks/numa_tiers.py --near-node 0 --far-node 2 --key-gib 2

Prints a table and writes ``benchmarks/results/numa_tiers_<cpu>.json`` (the command, the CPU
model, every node with its CPUs, memory and distances as ``numactl -H`` shows them, and the
figures). On a machine with one NUMA node it says it cannot compare tiers and exits with
status 2. ``--smoke`` runs a small case on whatever nodes there are (on one node both stores
are on it): a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import hybridgen
from hybridgen import _native

sys.path.insert(0, str(Path(__file__).parent))
from logits_bandwidth import cpu_model, interleaved, slug  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NODES = Path("/sys/devices/system/node")
GIB = 1 << 30


# --- the machine's nodes (what `numactl -H` prints, from sysfs) -------------------------------


def parse_list(text: str) -> list[int]:
    """``"0-3,8"`` → ``[0, 1, 2, 3, 8]`` (the kernel's cpulist / node list format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def online_nodes() -> list[int]:
    try:
        return parse_list((NODES / "online").read_text())
    except OSError:
        return [0]


def node_info(node: int) -> dict:
    d = NODES / f"node{node}"
    mem = {}
    try:
        for line in (d / "meminfo").read_text().splitlines():
            # "Node 0 MemTotal:       1030484 kB"
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("MemTotal:", "MemFree:"):
                mem[parts[2][:-1]] = int(parts[3]) * 1024
    except OSError:
        pass
    try:
        distances = [int(x) for x in (d / "distance").read_text().split()]
    except OSError:
        distances = []
    try:
        cpus = parse_list((d / "cpulist").read_text())
    except OSError:
        cpus = []
    return {
        "node": node,
        "cpus": cpus,
        "memory_bytes": mem.get("MemTotal"),
        "free_bytes": mem.get("MemFree"),
        "distances": distances,
    }


def print_nodes(nodes: list[dict]) -> None:
    print(f"available: {len(nodes)} nodes ({','.join(str(n['node']) for n in nodes)})")
    for n in nodes:
        cpus = " ".join(map(str, n["cpus"])) or "(none)"
        print(f"node {n['node']} cpus: {cpus}")
        if n["memory_bytes"] is not None:
            print(f"node {n['node']} size: {n['memory_bytes'] >> 20} MB")
            print(f"node {n['node']} free: {(n['free_bytes'] or 0) >> 20} MB")
    print("node distances:")
    print("node " + " ".join(f"{n['node']:>4}" for n in nodes))
    for n in nodes:
        print(f"{n['node']:>4}: " + " ".join(f"{x:>4}" for x in n["distances"]))


def machine(nodes: list[dict]) -> dict:
    return {
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "nodes": nodes,
        "native_threads": _native.num_threads(),
        "isa": _native.isa(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hybridgen": hybridgen.__version__,
    }


# --- the two placements -----------------------------------------------------------------------


def make_store(args, near: int, far: int, tokens: int, seed: int = 0) -> hybridgen.HostKVStore:
    """One layer, batch 1, every token on the host: keys on ``near``, values on ``far``."""
    dtype = getattr(torch, args.dtype)
    token_bytes = args.kv_heads * args.head_dim * torch.finfo(dtype).bits // 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallen-back node is not a measurement
        store = hybridgen.HostKVStore(
            1,
            1,
            args.kv_heads,
            args.head_dim,
            dtype,
            near_capacity_bytes=tokens * token_bytes,
            far_capacity_bytes=tokens * token_bytes,
            near_node=near,
            far_node=far,
            max_host_tokens=tokens,
        )
    store.append(0, tokens)
    gen = torch.Generator().manual_seed(seed)
    chunk = 65536
    for start in range(0, tokens, chunk):
        m = min(chunk, tokens - start)
        k = torch.randn((1, args.kv_heads, m, args.head_dim), generator=gen).to(dtype)
        v = torch.randn((1, args.kv_heads, m, args.head_dim), generator=gen).to(dtype)
        store.evict(0, k, v)
    return store


def kernel_nodes(store: hybridgen.HostKVStore, tokens: int) -> dict:
    """The kernel's node of the first, middle and last key and value (``get_mempolicy``)."""
    probe = sorted({0, tokens // 2, tokens - 1})
    return {kind: sorted({store.node_of(0, kind, i) for i in probe}, key=str) for kind in ("keys", "values")}


def measure(args, near: int, far: int) -> dict:
    dtype = getattr(torch, args.dtype)
    row = args.head_dim * torch.finfo(dtype).bits // 8
    # A whole number of pages per strip keeps the strips back to back (one flat view to read).
    per_page = 4096 // row if 4096 % row == 0 else 1
    tokens = max(per_page, int(args.key_gib * GIB) // (args.kv_heads * row) // per_page * per_page)
    placements = {"keys near": (near, far), "keys far": (far, far)}
    t0 = time.perf_counter()
    stores = {name: make_store(args, k, v, tokens) for name, (k, v) in placements.items()}
    fill_s = time.perf_counter() - t0
    q_heads = args.kv_heads * args.group
    q = torch.randn((1, q_heads, args.head_dim), generator=torch.Generator().manual_seed(1))
    scale = args.head_dim**-0.5
    logits_out = torch.empty((1, q_heads, tokens))
    out, lse = torch.empty((1, q_heads, args.head_dim)), torch.empty((1, q_heads))

    fns = {}
    key_bytes = {}
    for name, store in stores.items():
        keys = store.view(0, "keys", 0, tokens)
        assert keys.is_contiguous(), "the key strips are not back to back"
        flat = keys.reshape(-1).view(torch.uint8)
        key_bytes[name] = flat.numel()
        fns[f"read/{name}"] = lambda flat=flat: _native.stream_read(flat)
        fns[f"logits/{name}"] = lambda s=store: s.logits(0, q, scale, out=logits_out, isa=args.isa)
        fns[f"lse/{name}"] = lambda s=store: s.cpu_stage(0, q, scale, "lse", out=out, lse_out=lse, isa_name=args.isa)
    t = interleaved(fns, args.repeats, "rounds")

    # Both placements hold the same keys: the logits must agree exactly.
    a, b = (stores[n].logits(0, q, scale, isa=args.isa) for n in placements)
    assert torch.equal(a, b), "the two placements gave different logits"

    k_bytes = key_bytes["keys near"]
    v_bytes = k_bytes
    results = {}
    for name, store in stores.items():
        results[name] = {
            "requested": {"keys": placements[name][0], "values": placements[name][1]},
            "placement": store.placement,
            "kernel_nodes": kernel_nodes(store, tokens),
            "read_k_s": t[f"read/{name}"],
            "read_k_gbps": k_bytes / t[f"read/{name}"] / 1e9,
            "logits_s": t[f"logits/{name}"],
            "logits_gbps": k_bytes / t[f"logits/{name}"] / 1e9,
            "lse_all_s": t[f"lse/{name}"],
            "lse_all_gbps_of_kv": (k_bytes + v_bytes) / t[f"lse/{name}"] / 1e9,
        }
    near_r, far_r = results["keys near"], results["keys far"]
    return {
        "tokens": tokens,
        "k_bytes": k_bytes,
        "v_bytes": v_bytes,
        "fill_s": fill_s,
        "placements": results,
        # How much slower the CPU stage is with its keys in far memory (1.0: no difference).
        "logits_far_over_near": far_r["logits_s"] / near_r["logits_s"],
        "lse_all_far_over_near": far_r["lse_all_s"] / near_r["lse_all_s"],
        "read_far_over_near": far_r["read_k_s"] / near_r["read_k_s"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--near-node", type=int, help="node of the CPUs and the near keys (default: the first node with CPUs)"
    )
    p.add_argument(
        "--far-node", type=int, help="far node (default: a node without CPUs, CXL, if any, else the nearest other node)"
    )
    p.add_argument("--key-gib", type=float, default=1.5, help="GiB of keys (as much of values); keep above the LLC")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head (GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--isa", default=None, help="force an instruction set (default: the best this CPU runs)")
    p.add_argument("--no-bind", action="store_true", help="do not bind the process to the near node's CPUs")
    p.add_argument("--smoke", action="store_true", help="a small run on any machine, one node too (checks the script)")
    p.add_argument("--out", type=Path, help="JSON record (default: benchmarks/results/numa_tiers_<cpu>.json)")
    args = p.parse_args(argv)

    online = online_nodes()
    nodes = [node_info(n) for n in online]
    print_nodes(nodes)
    if len(online) < 2 and not args.smoke:
        print(
            f"numa_tiers: this machine has one NUMA node online ({online[0]}): it cannot compare near and far "
            "memory. Run it on a two-socket server or a machine with CXL memory (a node without CPUs).",
            file=sys.stderr,
        )
        return 2
    with_cpus = [n["node"] for n in nodes if n["cpus"]]
    near = args.near_node if args.near_node is not None else (with_cpus or online)[0]
    if args.far_node is not None:
        far = args.far_node
    else:
        others = [n for n in nodes if n["node"] != near]
        cpu_less = [n["node"] for n in others if not n["cpus"]]
        by_distance = sorted(others, key=lambda n: n["distances"][near] if len(n["distances"]) > near else 0)
        far = (cpu_less or [n["node"] for n in by_distance] or [near])[0]
    for name, node in (("near", near), ("far", far)):
        if node not in online:
            print(f"numa_tiers: --{name}-node {node} is not online (online: {online})", file=sys.stderr)
            return 2
    if near == far and not args.smoke:
        print(f"numa_tiers: near and far are both node {near}: nothing to compare", file=sys.stderr)
        return 2
    near_cpus = next(n["cpus"] for n in nodes if n["node"] == near)
    if not args.no_bind:
        if not near_cpus:
            print(f"numa_tiers: near node {near} has no CPUs to run on (use --no-bind)", file=sys.stderr)
            return 2
        # Before the first kernel runs: the native thread pool is sized by this affinity.
        os.sched_setaffinity(0, near_cpus)
    if args.smoke:
        args.key_gib = min(args.key_gib, 1 / 64)
        args.repeats = min(args.repeats, 3)

    print(f"numa_tiers: CPUs of node {near}, keys on node {near} vs node {far}, values on node {far}")
    r = measure(args, near, far)
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "smoke": args.smoke,
        "near_node": near,
        "far_node": far,
        "bound_to_cpus": None if args.no_bind else near_cpus,
        "shape": {"kv_heads": args.kv_heads, "group": args.group, "head_dim": args.head_dim, "dtype": args.dtype},
        "repeats": args.repeats,
        "machine": machine(nodes),
        **r,
    }
    print(f"{r['tokens']} tokens, {r['k_bytes'] / GIB:.2f} GiB of keys, {args.dtype}, GQA {args.group}, batch 1")
    print(f"{'keys':<10} {'kernel says K/V on':<20} {'read K GB/s':>12} {'logits GB/s':>12} {'lse K+V GB/s':>13}")
    for name, x in r["placements"].items():
        where = f"{x['kernel_nodes']['keys']}/{x['kernel_nodes']['values']}"
        print(
            f"{name:<10} {where:<20} {x['read_k_gbps']:>12.2f} {x['logits_gbps']:>12.2f} {x['lse_all_gbps_of_kv']:>13.2f}"
        )
    print(
        f"far / near time: read {r['read_far_over_near']:.2f}x, logits {r['logits_far_over_near']:.2f}x, "
        f"partial attention {r['lse_all_far_over_near']:.2f}x"
    )
    out = args.out
    if out is None and not args.smoke:
        out = RESULTS / f"numa_tiers_{slug(record['machine']['cpu']['model'])}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
