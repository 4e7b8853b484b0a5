"""What the vLLM tests share: engine arguments, the environment, the stock reference run.

Run as a script (``python vllm_runs.py MODEL PROMPTS_JSON MAX_TOKENS``), it generates greedily with
the same engine arguments in a fresh process and prints the token ids as JSON: the tests run it
with ``VLLM_PLUGINS=""`` (vLLM without any plugin) as the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: In-process engine (one process: fast start-up, and the tests see the worker's state).
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}

#: Engine arguments of every run: float32, eager (no compilation), small batches of tokens so
#: that long prompts prefill in chunks while shorter requests decode (mixed batches).
ENGINE_ARGS = dict(
    dtype="float32",
    max_model_len=1024,
    max_num_seqs=8,
    max_num_batched_tokens=256,
    enforce_eager=True,
    seed=0,
)


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    """Random token ids (2..VOCAB-1: no BOS/EOS), one prompt per length."""
    import random

    from tiny_llama import VOCAB

    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in lengths]


def generate(llm, token_prompts, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def impl_classes(llm) -> set[str]:
    """Class names of the attention implementations the engine's layers run."""
    from vllm.model_executor.layers.attention import Attention

    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return {type(layer.impl).__name__ for layer in ctx.values() if isinstance(layer, Attention)}


def start_stock_run(model: Path, token_prompts, max_tokens: int, out: Path) -> subprocess.Popen:
    """Starts the reference run (vLLM without plugins) in a subprocess writing JSON to ``out``."""
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDGEN_CONFIG"}
    env.update(ENV, VLLM_PLUGINS="")
    args = [sys.executable, __file__, str(model), json.dumps(token_prompts), str(max_tokens), str(out)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _main(model: str, token_prompts: str, max_tokens: str, out: str) -> None:
    from vllm import LLM

    llm = LLM(model, **ENGINE_ARGS)
    result = {"tokens": generate(llm, json.loads(token_prompts), int(max_tokens)), "impls": sorted(impl_classes(llm))}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _main(*sys.argv[1:])
