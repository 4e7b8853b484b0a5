"""``python -m hybridgen eval perplexity``: perplexity of each policy at the same token budget,
measured through the decode path, against the model's own full attention."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import POLICIES, HybridConfig
from .perplexity import decode_perplexity


def build_parser(sub):
    p = sub.add_parser("eval", help="accuracy of hybrid attention against full attention")
    tasks = p.add_subparsers(dest="task", required=True)
    ppl = tasks.add_parser("perplexity", help=__doc__.splitlines()[0], description=__doc__)
    ppl.add_argument("--model", default=None, help="model path (default: SmolLM2-135M)")
    ppl.add_argument("--text", type=Path, default=None, help="a UTF-8 text file (default: the packaged essays)")
    ppl.add_argument("--context", type=int, default=2048, help="tokens per window")
    ppl.add_argument("--score", type=int, default=128, help="tokens scored at the end of each window")
    ppl.add_argument("--windows", type=int, default=2, help="consecutive windows of the text")
    ppl.add_argument("--gpu-budget", type=int, default=256)
    ppl.add_argument("--sinks", type=int, default=4)
    ppl.add_argument("--k", type=int, default=256, help="host tokens per head for post_qkt / pre_qkt")
    ppl.add_argument("--policies", nargs="+", default=["all", "post_qkt", "pre_qkt", "streaming"],
                     choices=[p for p in POLICIES if p != "scheduler"])
    ppl.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ppl.set_defaults(func=run_perplexity)
    return p


def _text(args, tokenizer) -> torch.Tensor:
    if args.text is not None:
        if not args.text.is_file():
            raise SystemExit(f"--text {args.text}: no such file")
        text = args.text.read_text(encoding="utf-8")
    else:
        from ..assets import essays

        text = "\n\n".join(t for _, t in essays())
    return tokenizer(text, return_tensors="pt")["input_ids"]


def run_perplexity(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import smollm2

    if args.score >= args.context:
        raise SystemExit(f"--score ({args.score}) must be smaller than --context ({args.context})")
    path = args.model or smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = _text(args, tokenizer)
    if ids.shape[1] < args.context * args.windows:
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than {args.windows} windows of {args.context}")
    # Same token budget for every policy: the window gets what selection gets on the host.
    budgets = {"streaming": args.gpu_budget + args.k}
    results = {}
    for name in ["full", *args.policies]:
        nll = []
        for w in range(args.windows):
            window = ids[:, w * args.context : (w + 1) * args.context]
            config = None if name == "full" else HybridConfig(
                gpu_budget=budgets.get(name, args.gpu_budget), sinks=args.sinks, policy=name, k=args.k,
                max_context=args.context + 8)
            nll.append(decode_perplexity(model, window, args.context - args.score, config, progress=True).nll)
        results[name] = sum(nll) / len(nll)
    full = torch.tensor(results["full"]).exp().item()
    print(f"\nperplexity over {args.windows} × {args.score} tokens scored after {args.context - args.score} "
          f"(device budget {args.sinks} sinks + {args.gpu_budget}, k {args.k})")
    rows = []
    for name, nll in results.items():
        ppl = torch.tensor(nll).exp().item()
        rows.append({"policy": name, "perplexity": ppl, "delta_vs_full": ppl / full - 1})
        print(f"  {name:<10} {ppl:9.3f}   {100 * (ppl / full - 1):+7.2f} %")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import sys

        record = {"command": "python -m hybridgen " + " ".join(sys.argv[1:]),
                  "args": {k: str(v) for k, v in vars(args).items() if k != "func"}, "results": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0
