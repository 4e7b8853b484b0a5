"""What the vLLM tests share: engine arguments, prompts, the environment, runs in a fresh process.

Run as a script (``python vllm_runs.py MODEL PROMPTS_JSON MAX_TOKENS OUT [ENGINE_ARGS_JSON]``), it
generates greedily with the same engine arguments (plus any given) in a fresh process and writes the token ids (and, in process, the
attention implementations that ran) as JSON to ``OUT``: the tests run it with ``VLLM_PLUGINS=""``
(vLLM without any plugin) as the reference, and with the plugin in vLLM's default multi-process
mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

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

#: The prompts of the runs compared with the reference: the longest prefills in three chunks
#: while the others decode.
LENGTHS = [37, 150, 290, 600]
MAX_TOKENS = 24
#: Small device tier (4 sinks + 16 recent tokens) and small eviction chunks: every prompt above
#: leaves most of its tokens in the host store.
CONFIG = {"policy": "all", "gpu_budget": 16, "sinks": 4, "evict_chunk": 4}
LAYERS = 2


def prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
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
    """Class names of the attention implementations the engine's layers run (in process only:
    in multi-process mode the layers live in another process and this is empty)."""
    from vllm.model_executor.layers.attention import Attention

    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return {type(layer.impl).__name__ for layer in ctx.values() if isinstance(layer, Attention)}


def run_env(*, plugin_config: Optional[dict] = None, multiprocess: bool = False, **extra: str) -> dict:
    """The environment of a run in a fresh process: vLLM without plugins (``plugin_config``
    ``None``), or with hybridgen and ``HYBRIDGEN_CONFIG=plugin_config``; in process, or in vLLM's
    default multi-process mode."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRIDGEN_CONFIG", "VLLM_PLUGINS")}
    env.update(ENV)
    if multiprocess:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    if plugin_config is None:
        env["VLLM_PLUGINS"] = ""
    else:
        env["HYBRIDGEN_CONFIG"] = json.dumps(plugin_config)
    env.update(extra)
    return env


def start_run(
    model: Path, token_prompts, max_tokens: int, out: Path, env: dict, engine_args: Optional[dict] = None
) -> subprocess.Popen:
    """Starts a run (this file as a script) in a subprocess writing JSON to ``out``;
    ``engine_args`` are added to :data:`ENGINE_ARGS`."""
    args = [sys.executable, __file__, str(model), json.dumps(token_prompts), str(max_tokens), str(out)]
    args.append(json.dumps(engine_args or {}))
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_stock_run(model: Path, token_prompts, max_tokens: int, out: Path) -> subprocess.Popen:
    """Starts the reference run (vLLM without plugins, in process) writing JSON to ``out``."""
    return start_run(model, token_prompts, max_tokens, out, run_env())


def finish(proc: subprocess.Popen, out: Path, timeout: float, what: str) -> dict:
    """Waits for a run (killing it after ``timeout`` seconds) and returns its JSON."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        raise AssertionError(f"{what} took more than {timeout} s:\n{log[-4000:]}") from None
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{log[-4000:]}"
    return {**json.loads(out.read_text()), "log": log}


def _main(model: str, token_prompts: str, max_tokens: str, out: str, engine_args: str = "{}") -> None:
    from vllm import LLM

    llm = LLM(model, **{**ENGINE_ARGS, **json.loads(engine_args)})
    result = {"tokens": generate(llm, json.loads(token_prompts), int(max_tokens)), "impls": sorted(impl_classes(llm))}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _main(*sys.argv[1:])
