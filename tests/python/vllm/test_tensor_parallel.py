"""Tensor parallelism on vLLM's CPU backend (``tensor_parallel_size=2``: two worker processes and
its shared-memory communicator): each rank's runtime keeps the host slots of its own KV heads
(one of the tiny model's two), both serve every decode row, and the greedy tokens equal vLLM's
without plugins on one rank."""

import json

from vllm_runs import CONFIG, LAYERS, LENGTHS, MAX_TOKENS, finish, prompts, run_env, start_run


def test_each_rank_serves_its_own_kv_heads(tiny_model, reference, tmp_path):
    out, stats_dir = tmp_path / "tokens.json", tmp_path / "stats"
    # No thread pinning: vLLM's automatic binding wants a NUMA node per rank.
    env = run_env(
        plugin_config=CONFIG, multiprocess=True, HYBRIDGEN_VLLM_STATS=str(stats_dir), VLLM_CPU_OMP_THREADS_BIND="nobind"
    )
    proc = start_run(tiny_model, prompts(LENGTHS), MAX_TOKENS, out, env, {"tensor_parallel_size": 2})
    result = finish(proc, out, 600, "the tensor-parallel run with the plugin")
    ranks = [json.loads(f.read_text()) for f in sorted(stats_dir.glob("hybridgen-stats-*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1], (ranks, result["log"][-3000:])
    assert "1 KV heads in this worker, tensor-parallel rank 0 of 2" in result["log"]
    for stats in ranks:
        assert stats["hybrid_rows"] == len(LENGTHS) * (MAX_TOKENS - 1) * LAYERS, stats
        assert stats["untracked"] == 0
    assert result["tokens"] == reference()["tokens"]
