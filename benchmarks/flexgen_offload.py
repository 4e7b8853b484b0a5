"""FlexGen's own KV-cache offloading vs hybrid attention, in one process on one GPU.

Three runs of FlexGen's ``flex_opt`` benchmark (``run_flexgen``: a warm-up, then the prefill and
``--gen-len`` decode steps of ``gpu_batch_size x num_gpu_batches`` prompts of ``--prompt-len``
tokens), same model, same lengths, weights on the GPU:

  flexgen-cpu-cache    ``--percent 100 0 0 100 100 0``: the whole KV cache in CPU memory, copied
                       to the GPU layer by layer for attention (FlexGen's offloading)
  flexgen-cpu-compute  the same with ``--cpu-cache-compute``: attention over the cache on the CPU
  hybrid               FlexGen patched with hybridgen: sinks + ``--gpu-budget`` recent tokens on
                       the GPU, the rest in host memory, where the CPU attends over them

Weights are ``_DUMMY_`` (all ones, so outputs are meaningless: this measures time only) and the
prompts come from the stand-in tokenizer (no download). Prints a table and writes a JSON record
(command, machine, every run's FlexGen figures, hybrid telemetry, ratios) under
``benchmarks/results/``. Needs a CUDA GPU.

    .venv/bin/python benchmarks/flexgen_offload.py --prompt-len 4096 --gen-len 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: name -> the flex_opt options that make it (besides the shared ones).
VARIANTS = {
    "flexgen-cpu-cache": ["--no-hybrid", "--percent", "100", "0", "0", "100", "100", "0"],
    "flexgen-cpu-compute": ["--no-hybrid", "--percent", "100", "0", "0", "100", "100", "0", "--cpu-cache-compute"],
    "hybrid": ["--percent", "100", "0", "100", "0", "100", "0"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="facebook/opt-1.3b", help="an OPT name FlexGen knows (shape only: _DUMMY_ weights)"
    )
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--gpu-budget", type=int, default=1024, help="hybrid: recent tokens per layer on the GPU")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--policy", default="scheduler", choices=("all", "post_qkt", "pre_qkt", "scheduler"))
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--k-min", type=int, default=64)
    p.add_argument("--k-max", type=int, default=2048)
    p.add_argument("--merge", default="lse", choices=("lse", "concat"))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--offload-dir", default=None, help="FlexGen's offload directory (default: a temporary one)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON record (default benchmarks/results/flexgen_offload_<model>_p<prompt>_g<gen>.json)",
    )
    args = p.parse_args(argv)
    for name in ("prompt_len", "gen_len", "gpu_batch_size", "num_gpu_batches", "gpu_budget"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gen_len < 2:
        p.error("--gen-len must be >= 2: the first token comes from the prefill, decode steps follow")
    if args.out is None:
        args.out = RESULTS / f"flexgen_offload_{args.model.split('/')[-1]}_p{args.prompt_len}_g{args.gen_len}.json"
    return args


def variant_argv(args: argparse.Namespace, name: str, workdir: str) -> list[str]:
    """``python -m hybridgen.flexgen`` arguments of one run."""
    argv = [
        "--model",
        args.model,
        "--path",
        "_DUMMY_",
        "--prompt-len",
        str(args.prompt_len),
        "--gen-len",
        str(args.gen_len),
        "--gpu-batch-size",
        str(args.gpu_batch_size),
        "--num-gpu-batches",
        str(args.num_gpu_batches),
        "--offload-dir",
        args.offload_dir or os.path.join(workdir, "offload"),
        "--log-file",
        os.path.join(workdir, f"{name}.log"),
        "--verbose",
        "1",
        *VARIANTS[name],
    ]
    if name == "hybrid":
        argv += [
            "--gpu-budget",
            str(args.gpu_budget),
            "--sinks",
            str(args.sinks),
            "--policy",
            args.policy,
            "--k",
            str(args.k),
            "--k-min",
            str(args.k_min),
            "--k-max",
            str(args.k_max),
            "--merge",
            args.merge,
        ]
    return argv


def build_record(command: str, machine: dict, settings: dict, runs: list[dict]) -> dict:
    """The JSON record; ``ratios``: hybrid's decode and total throughput over each other run's."""
    by_name = {r["name"]: r for r in runs}
    ratios = {}
    hybrid = by_name.get("hybrid")
    if hybrid is not None:
        for r in runs:
            if r["name"] != "hybrid":
                ratios[f"hybrid/{r['name']}"] = {
                    "decode_throughput": hybrid["decode_tokens_per_s"] / r["decode_tokens_per_s"],
                    "total_throughput": hybrid["total_tokens_per_s"] / r["total_tokens_per_s"],
                }
    return {"command": command, "machine": machine, "settings": settings, "runs": runs, "ratios": ratios}


def format_table(record: dict) -> str:
    lines = [
        f"{'run':<22}{'prefill s':>11}{'decode s':>11}{'decode tok/s':>14}{'total tok/s':>13}{'GPU peak GiB':>14}"
        "  hybrid decode speed-up"
    ]
    for r in record["runs"]:
        ratio = record["ratios"].get(f"hybrid/{r['name']}")
        lines.append(
            f"{r['name']:<22}{r['prefill_s']:>11.3f}{r['decode_s']:>11.3f}{r['decode_tokens_per_s']:>14.1f}"
            f"{r['total_tokens_per_s']:>13.1f}{r.get('gpu_peak_gib', float('nan')):>14.2f}  "
            + (f"{ratio['decode_throughput']:.2f}x" if ratio else "-")
        )
    return "\n".join(lines)


def write_record(record: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def machine_info() -> dict:
    import torch

    from hybridgen.apps.bench import machine_info as bench_machine_info
    from hybridgen.flexgen import flexgen_version

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {**bench_machine_info(device), "flexgen": flexgen_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("flexgen_offload: needs a CUDA GPU (FlexGen runs its model on one); none is available", file=sys.stderr)
        return 1
    from hybridgen.apps.flexgen import cli
    from hybridgen.flexgen.install import require_flexgen

    flex_opt, _ = require_flexgen()
    parser = cli.build_parser(flex_opt)
    runs = []
    with tempfile.TemporaryDirectory(prefix="flexgen_offload_") as workdir:
        for name in args.variants:
            flex_argv = variant_argv(args, name, workdir)
            print(f"== {name}: python -m hybridgen.flexgen {shlex.join(flex_argv)}", flush=True)
            torch.cuda.reset_peak_memory_stats()
            result = cli.run(parser.parse_args(flex_argv))
            result.update(name=name, argv=flex_argv, gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            runs.append(result)
            gc.collect()
            torch.cuda.empty_cache()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    command = "python benchmarks/flexgen_offload.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = build_record(command, machine_info(), settings, runs)
    print(format_table(record))
    write_record(record, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
