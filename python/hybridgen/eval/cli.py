"""``python -m hybridgen eval <task>`` and ``python -m hybridgen profile-kmin``: accuracy of every
policy at the same token budget, measured through the decode path, against full attention."""

from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction
from pathlib import Path

from ..config import POLICIES
from .common import EVAL_POLICIES, TEXTS, VARIANTS, check_context, load_model, load_text, policy_config

DEFAULT_POLICIES = [p for p in POLICIES if p not in ("aog", "aoc")]  # exact like "all"; add them by name
#: ``eval ruler``'s default: a few policies that decode a 4K context quickly on a CPU (``full``,
#: the reference, always runs).
RULER_POLICIES = ["post_qkt", "pre_qkt", "scheduler", "streaming"]


def _common(p, context_default=4096):
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M)")
    p.add_argument("--gpu-budget", type=int, default=512, help="recent tokens per layer on the device")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--k", type=int, default=256, help="extra tokens per head each policy may use (see eval.common)")
    p.add_argument("--k-min", type=int, default=None, help="scheduler's K_min (default: --profile's, else --k)")
    p.add_argument("--profile", type=Path, default=None, help="a K_min profile from `profile-kmin`")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON (and a .md table)")


def _policies(p, default, names=POLICIES):
    p.add_argument(
        "--policies",
        nargs="+",
        default=default,
        choices=names,
        metavar="POLICY",
        help=f"any of {', '.join(names)} (default: {' '.join(default)})",
    )


def _texts(p):
    p.add_argument("--text", nargs="+", default=["essays", "austen"], help=f"{' / '.join(TEXTS)} or a UTF-8 file path")
    p.add_argument("--score", type=int, default=128, help="tokens scored at the end of each window")
    p.add_argument("--windows", type=int, default=2, help="consecutive windows of each text")


def build_parser(sub):
    p = sub.add_parser("eval", help="accuracy of every policy against full attention")
    tasks = p.add_subparsers(dest="task", required=True)

    ppl = tasks.add_parser("perplexity", help="perplexity over long texts per policy and context")
    _common(ppl)
    _texts(ppl)
    ppl.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    _policies(ppl, DEFAULT_POLICIES)
    ppl.set_defaults(func=run_perplexity)

    needle = tasks.add_parser("needle", help="needle-in-a-haystack retrieval per policy")
    _common(needle)
    needle.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    needle.add_argument("--depths", type=int, default=10, help="depths from start to end")
    _policies(needle, DEFAULT_POLICIES)
    needle.set_defaults(func=run_needle)

    choice = tasks.add_parser("choice", help="the packaged multiple-choice suite per policy")
    _common(choice)
    choice.add_argument("--limit", type=int, default=None, help="first N items only")
    _policies(choice, ["post_qkt", "streaming", "h2o"])
    choice.set_defaults(func=run_choice, gpu_budget=16, k=8, sinks=2)

    from .ruler import TASK_NAMES

    ruler = tasks.add_parser(
        "ruler", help="RULER-style long-context tasks (retrieval, tracing, aggregation) per policy"
    )
    _common(ruler)
    ruler.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASK_NAMES),
        choices=TASK_NAMES,
        metavar="TASK",
        help=f"any of {', '.join(TASK_NAMES)} (default: all)",
    )
    ruler.add_argument(
        "--contexts", type=int, nargs="+", default=[4096], help="context lengths in tokens (default: 4096)"
    )
    ruler.add_argument("--samples", type=_positive, default=2, help="cases per task and context (default: 2)")
    ruler.add_argument("--seed", type=int, default=0, help="seed of the generated cases (default: 0)")
    ruler.add_argument(
        "--k-fraction",
        type=_fraction,
        default=None,
        help="K per context as this share of the host tokens (context - sinks - gpu budget), e.g. 1/16; overrides --k",
    )
    _policies(ruler, RULER_POLICIES, EVAL_POLICIES)
    ruler.set_defaults(func=run_ruler)

    cmp = tasks.add_parser("compare", help="one table: perplexity and needle retrieval of every policy at one context")
    _common(cmp)
    _texts(cmp)
    cmp.add_argument("--context", type=int, default=4096)
    _policies(cmp, list(POLICIES))
    cmp.set_defaults(func=run_compare)

    prof = sub.add_parser("profile-kmin", help="the smallest K whose perplexity stays within a tolerance of full")
    prof.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M)")
    prof.add_argument("--text", default="essays", help=f"{' / '.join(TEXTS)} or a UTF-8 file path")
    prof.add_argument("--context", type=int, default=4096)
    prof.add_argument("--score", type=int, default=128)
    prof.add_argument("--windows", type=int, default=2)
    prof.add_argument("--gpu-budget", type=int, default=512)
    prof.add_argument("--sinks", type=int, default=4)
    prof.add_argument("--tolerance", type=float, default=0.01, help="relative perplexity increase allowed")
    prof.add_argument("--out", type=Path, default=None, help="profile path (default: the data dir's profiles/)")
    prof.set_defaults(func=run_profile)
    return p


# --- helpers --------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """``0.0625`` or ``1/16``: a share in (0, 1]."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r} (e.g. 1/16 or 0.0625)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _k_min(args):
    if args.k_min is not None:
        return args.k_min
    if args.profile is not None:
        from ..config import HybridConfig

        return HybridConfig.from_profile(args.profile).k_min
    return None


def _windows(model, tokenizer, text_name: str, context: int, count: int, score: int):
    from .kmin import windows

    text = load_text(text_name)
    check_context(model, context)
    if score >= context:
        raise ValueError(f"--score ({score}) must be smaller than the context ({context})")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return windows(ids, context, count)


def _save(args, record: dict, table: str, model) -> None:
    """Prints the table; with ``--out``, writes the record as JSON and the table as ``.md`` next to
    it. The record names what ran: the model's path, hybridgen's and transformers' versions, and
    the arguments as given (JSON values, not their strings)."""
    print(table)
    if args.out:
        from importlib.metadata import version

        import torch

        from .. import __version__

        args.out.parent.mkdir(parents=True, exist_ok=True)
        given = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("func", "version", "command_line")
        }
        record = {
            "command": args.command_line,
            "model": str(model.name_or_path),
            "hybridgen": __version__,
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "args": given,
            **record,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"`{record['command']}` ({record['model']})\n\n{table}\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md').name}")


# --- tasks ----------------------------------------------------------------------------------------
def run_perplexity(args) -> int:
    from .kmin import mean_nll, record_windows

    model, tokenizer = load_model(args.model)
    k_min, rows = _k_min(args), []
    for text in args.text:
        for n in args.contexts:
            wins = _windows(model, tokenizer, text, n, args.windows, args.score)
            recorded = record_windows(model, wins, n - args.score)
            full = None
            for policy in ["full", *[p for p in args.policies if p != "full"]]:
                config = policy_config(
                    policy, gpu_budget=args.gpu_budget, k=args.k, sinks=args.sinks, context=n, k_min=k_min
                )
                ppl = math.exp(mean_nll(model, wins, n - args.score, config, True, recorded))
                full = full or ppl
                rows.append(
                    {"text": text, "context": n, "policy": policy, "perplexity": ppl, "delta_vs_full": ppl / full - 1}
                )
                print(f"{text:>8} {n:>6} {policy:<10} {ppl:9.3f}  {100 * (ppl / full - 1):+7.2f} %", flush=True)
    lines = ["| text | context | policy | perplexity | Δ vs full |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['text']} | {r['context']} | `{r['policy']}` | {r['perplexity']:.3f} | {100 * r['delta_vs_full']:+.2f} % |"
        for r in rows
    ]
    _save(args, {"results": rows}, "\n".join(lines), model)
    return 0


def run_needle(args) -> int:
    from .needle import as_rows, needle_trials, retrieval

    model, tokenizer = load_model(args.model)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    for n in args.contexts:
        check_context(model, n)
    k_min = _k_min(args)
    configs = {
        p: (
            lambda n, p=p: policy_config(
                p, gpu_budget=args.gpu_budget, k=args.k, sinks=args.sinks, context=n, k_min=k_min
            )
        )
        for p in args.policies
    }
    trials = needle_trials(model, tokenizer, configs, args.contexts, depths=depths, progress=True)
    lines = ["| policy | " + " | ".join(map(str, args.contexts)) + " |", "|---|" + "---|" * len(args.contexts)]
    for policy in args.policies:
        per = [retrieval([t for t in trials if t.policy == policy and t.context == n]) for n in args.contexts]
        lines.append(f"| `{policy}` | " + " | ".join(f"{100 * r:.0f} %" for r in per) + " |")
    _save(args, {"trials": as_rows(trials)}, "\n".join(lines), model)
    return 0


def run_choice(args) -> int:
    from .choice import load_suite, score_items

    model, tokenizer = load_model(args.model)
    items = load_suite()[: args.limit]
    k_min, results = _k_min(args), {}
    context = max(len(tokenizer(i.context)["input_ids"]) for i in items) + 16
    for policy in ["full", *[p for p in args.policies if p != "full"]]:
        config = policy_config(
            policy, gpu_budget=args.gpu_budget, k=args.k, sinks=args.sinks, context=context, k_min=k_min
        )
        result = score_items(model, tokenizer, items, config, progress=True)
        results[policy] = result.metrics()
        print(result.format(), flush=True)
    kinds = list(next(iter(results.values())))
    lines = ["| policy | " + " | ".join(f"{k} acc / acc_norm" for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for policy, metrics in results.items():
        cells = [
            f"{100 * metrics[k]['acc']:.0f} / {100 * metrics[k]['acc_norm']:.0f} % (n {metrics[k]['n']})" for k in kinds
        ]
        lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
    _save(args, {"metrics": results}, "\n".join(lines), model)
    return 0


def ruler_k(context: int, *, k: int, k_fraction, gpu_budget: int, sinks: int) -> int:
    """``eval ruler``'s K at ``context``: ``k``, or with ``k_fraction`` that share of the host
    tokens (``context - sinks - gpu_budget``), at least 1."""
    if k_fraction is None:
        return k
    return max(1, round(k_fraction * (context - sinks - gpu_budget)))


def _load(average) -> str:
    return "?" if not average else f"{average[0]:.1f}"


def run_ruler(args) -> int:
    import os
    import time

    from ..apps.bench.report import machine_info
    from ..policies import table as policy_table
    from .ruler import as_rows, markdown, plot, run_suite, summarize

    model, tokenizer = load_model(args.model)
    for n in args.contexts:
        check_context(model, n)
    k_min = _k_min(args)

    def config_for(policy):
        def config(n):
            k = ruler_k(n, k=args.k, k_fraction=args.k_fraction, gpu_budget=args.gpu_budget, sinks=args.sinks)
            return policy_config(policy, gpu_budget=args.gpu_budget, k=k, sinks=args.sinks, context=n, k_min=k_min)

        return config

    policies = ["full", *[p for p in args.policies if p != "full"]]
    configs = {p: (lambda n: None) if p == "full" else config_for(p) for p in policies}
    for n in args.contexts:  # fail on a bad budget before the first prefill
        for p in policies:
            configs[p](n)
    machine = machine_info(model.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    results, timing = run_suite(
        model, tokenizer, configs, args.tasks, args.contexts, args.samples, seed=args.seed, progress=True
    )
    timing["total"] = time.perf_counter() - start
    timing["cpu"] = time.process_time() - cpu_start  # the process's CPU seconds, all threads
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary = summarize(results)
    # Keys read: the policies that read host memory on every step (not those that only drop tokens).
    readers = [r["policy"] for r in policy_table() if not r["bus"].startswith("nothing")]
    readers += [name for name, (base, _) in VARIANTS.items() if base in readers]
    ks = {
        str(n): ruler_k(n, k=args.k, k_fraction=args.k_fraction, gpu_budget=args.gpu_budget, sinks=args.sinks)
        for n in args.contexts
    }
    table = markdown(summary, host_readers=readers)
    table += (
        f"\n\n{args.samples} case(s) per task and context, seed {args.seed}; budget: {args.sinks} sinks + "
        f"{args.gpu_budget} recent tokens on the device, K {', '.join(f'{v} at {n}' for n, v in ks.items())}. "
        "Keys read: host keys the CPU read per step and KV head (page summaries included) over the host tokens. "
        f"Wall time {timing['total']:.0f} s (prefill {timing['prefill']:.0f} s), CPU time {timing['cpu']:.0f} s, "
        f"load average {_load(machine['load_average'])} before, {_load(machine['load_average_after'])} after "
        f"({machine['cores']} cores)."
    )
    record = {
        "machine": machine,
        "summary": summary,
        "k": ks,
        "timing": timing,
        "cases": as_rows(results),
    }
    _save(args, record, table, model)
    if args.out:
        png = args.out.with_suffix(".png")
        if plot(summary, png):
            print(f"wrote {png.name}")
    return 0


def run_compare(args) -> int:
    from .compare import compare_policies, markdown_table

    model, tokenizer = load_model(args.model)
    texts = {t: _windows(model, tokenizer, t, args.context, args.windows, args.score) for t in args.text}
    names = [Path(t).stem for t in texts]
    result = compare_policies(
        model,
        tokenizer,
        args.policies,
        dict(zip(names, texts.values())),
        context=args.context,
        score=args.score,
        gpu_budget=args.gpu_budget,
        k=args.k,
        sinks=args.sinks,
        k_min=_k_min(args),
        progress=True,
    )
    _save(args, result, markdown_table(result["rows"], names), model)
    return 0


def run_profile(args) -> int:
    from .kmin import default_profile_path, profile_kmin

    model, tokenizer = load_model(args.model)
    wins = _windows(model, tokenizer, args.text, args.context, args.windows, args.score)
    name = args.model or "SmolLM2-135M-Instruct"
    profile = profile_kmin(
        model,
        wins,
        score=args.score,
        gpu_budget=args.gpu_budget,
        sinks=args.sinks,
        tolerance=args.tolerance,
        model_name=Path(name).name,
        progress=True,
    )
    profile.command = args.command_line
    for point in profile.curve:
        print(
            f"K {point['k']:>5} ({point['share']:.3f} of host tokens): perplexity {point['perplexity']:.3f} "
            f"({100 * point['delta']:+.2f} %)"
        )
    path = profile.save(args.out or default_profile_path(name))
    print(
        f"K_min = {profile.k_min} (perplexity within {100 * args.tolerance:.1f} % of full {profile.full_perplexity:.3f}); "
        f"saved {path} — load it with HybridConfig.from_profile(path)"
    )
    return 0
