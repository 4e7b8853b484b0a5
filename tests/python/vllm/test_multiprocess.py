"""vLLM's default multi-process mode (``VLLM_ENABLE_V1_MULTIPROCESSING`` unset: the model runs in
the engine-core process, not the caller's): hybrid decode runs there too, and its greedy tokens
equal vLLM's without plugins. The counters live in that process: the runtime writes them to the
folder ``HYBRIDGEN_VLLM_STATS`` names."""

import json

from vllm_runs import CONFIG, LAYERS, LENGTHS, MAX_TOKENS, finish, prompts, run_env, start_run


def test_hybrid_decode_runs_in_vllms_default_multiprocess_mode(tiny_model, reference, tmp_path):
    out, stats_dir = tmp_path / "tokens.json", tmp_path / "stats"
    env = run_env(plugin_config=CONFIG, multiprocess=True, HYBRIDGEN_VLLM_STATS=str(stats_dir))
    proc = start_run(tiny_model, prompts(LENGTHS), MAX_TOKENS, out, env)
    result = finish(proc, out, 600, "the multi-process run with the plugin")
    files = sorted(stats_dir.glob("hybridgen-stats-*.json"))
    assert len(files) == 1, (files, result["log"][-3000:])
    stats = json.loads(files[0].read_text())
    assert stats["pid"] != proc.pid  # another process: vLLM's engine core
    assert result["impls"] == []  # the caller's process holds no attention layer
    assert stats["hybrid_rows"] == len(LENGTHS) * (MAX_TOKENS - 1) * LAYERS, stats
    assert stats["rows_by_strategy"]["all"] == stats["hybrid_rows"] and stats["untracked"] == 0
    assert result["tokens"] == reference()["tokens"]
