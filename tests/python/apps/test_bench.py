"""``python -m hybridgen bench``: the record covers every (policy, context, batch), its numbers agree
with each other and with the token bookkeeping of a decode run, the plot is a PNG, configurations
that do not fit are skipped with a reason, and bad options fail before any work."""

import json
import shlex
import statistics
import struct
import zlib
from pathlib import Path

import pytest
import torch

from hybridgen.apps import bench
from hybridgen.hf.models import ModelInfo

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--model", "tiny-random", "--gpu-budget", "16", "--sinks", "4", "--k", "8", "--threads", "1"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return struct.unpack(">II", chunks[0][1][:8])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = [
        *TINY,
        "--contexts",
        "128",
        "64",
        "--batch",
        "1",
        "2",
        "--policies",
        "post_qkt",
        "h2o",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    record = bench.main(argv)
    return argv, out, record


def test_record_has_a_row_for_every_policy_context_and_batch(sweep):
    argv, out, record = sweep
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["command"] == "python -m hybridgen bench " + shlex.join(argv)
    keys = sorted((r["policy"], r["context"], r["batch"]) for r in on_disk["rows"])
    assert keys == sorted((p, n, b) for p in ("full", "post_qkt", "h2o") for n in (64, 128) for b in (1, 2))
    assert all(r["status"] == "ok" for r in on_disk["rows"])
    m = on_disk["machine"]
    for key in ("cpu", "cores", "torch_threads", "isa", "torch", "transformers"):
        assert m[key], key
    assert m["torch_threads"] == 1 and m["cuda_device"] is None


def test_latency_throughput_and_ratios_agree(sweep):
    _, _, record = sweep
    rows = record["rows"]
    for r in rows:
        assert len(r["step_ms"]) == 2 and len(r["round_ms"]) == 2  # one measured step per round
        assert r["round_ms"] == pytest.approx(r["step_ms"])
        assert r["ms_per_token"] == pytest.approx(statistics.median(r["round_ms"]))
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_token"])
        full = next(
            f for f in rows if f["policy"] == "full" and f["context"] == r["context"] and f["batch"] == r["batch"]
        )
        assert r["ratio_to_full"] == pytest.approx(r["ms_per_token"] / full["ms_per_token"])
        assert r["speedup_vs_full"] == pytest.approx(1 / r["ratio_to_full"])
        assert r["prefill_s"] > 0 and r["placement_s"] >= 0
        shares = r["cpu_share"] + r["device_share"] + r["transfer_share"]
        assert shares == pytest.approx(1.0)


def test_token_counts_and_k_follow_the_decode(sweep):
    _, _, record = sweep
    for r in record["rows"]:
        decoded = 1 + 2  # warm-up + measured steps; the last one's record counts its own new token
        assert r["host_tokens"] + r["device_tokens"] == r["context"] + decoded
        assert [s for s, _, _ in r["k_per_step"]] == list(range(decoded)) and r["warmup_steps"] == 1
        if r["policy"] == "full":
            assert r["host_tokens"] == 0 and r["cpu_share"] == 0
        else:
            # 4 sinks + 16 recent stay on the device (no eviction before 32 new tokens).
            assert r["device_tokens"] == 4 + 16 + decoded
            assert {k for _, k, _ in r["k_per_step"]} == {8}
            assert {st for _, _, st in r["k_per_step"]} == {r["policy"]}
    post = [r for r in record["rows"] if r["policy"] == "post_qkt"]
    assert all(r["cpu_ms_per_step"] > 0 for r in post), "post_qkt attends to its host tokens on the CPU"


def test_plot_is_a_png_next_to_the_record(sweep):
    _, out, _ = sweep
    width, height = png_size(out.with_suffix(".png"))
    assert width > 800 and height > 300


def test_configurations_that_do_not_fit_are_skipped_with_a_reason(tmp_path):
    # tiny-random: 2 layers × 2 KV heads × 16 dims × K and V × 4 bytes = 512 bytes per token.
    # With 1 MiB, context 64 fits (full ~64 KiB, the others ~75 KiB each); 4096 does not
    # (full alone ~4 MiB, the prompt with older tokens on the host ~2.5 MiB).
    out = tmp_path / "skip.json"
    record = bench.main(
        [
            *TINY,
            "--contexts",
            "64",
            "4096",
            "--policies",
            "aoc",
            "streaming",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--max-memory",
            str(1 / 1024),
            "--out",
            str(out),
        ]
    )
    rows = {(r["policy"], r["context"]): r for r in record["rows"]}
    assert len(rows) == 6
    for p in ("full", "aoc", "streaming"):
        assert rows[p, 64]["status"] == "ok" and rows[p, 64]["ratio_to_full"] > 0
        skipped = rows[p, 4096]
        assert skipped["status"] == "skipped" and "memory" in skipped["reason"]
        assert "ms_per_token" not in skipped and skipped["estimated_host_bytes"] + skipped["estimated_device_bytes"] > 0
    assert rows["full", 4096]["estimated_device_bytes"] == 2 * 512 * 4096
    png_size(out.with_suffix(".png"))


def test_plan_skips_in_order_once_memory_runs_out():
    info = ModelInfo("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, max_positions=4096)
    cfg = bench.HybridConfig(gpu_budget=16, sinks=4, k=8)
    aoc = 2 * 2 * 16 * 2 * 4 * 1000  # host bytes of 1000 tokens
    pools = {"host": int(2.5 * aoc / bench.MEMORY_HEADROOM) + 1}
    estimates, reasons = bench.plan(["aoc", "full"], 1000, 1, info, 4, cfg, pools)
    assert estimates["aoc"] == {"device": 0, "host": aoc}
    assert estimates["full"] == {"device": 2 * aoc, "host": 0}
    assert set(reasons) == {"full"}, "full (2× the KV) no longer fits after aoc"
    assert "host memory" in reasons["full"]
    assert set(bench.plan(["full", "aoc"], 1000, 1, info, 4, cfg, pools)[1]) == {"aoc"}, "first come, first served"
    # With a device pool (CUDA), device bytes are checked against it, not against host RAM.
    _, reasons = bench.plan(["full"], 1000, 1, info, 4, cfg, {"host": 10**12, "device": aoc})
    assert "device memory" in reasons["full"]


@pytest.mark.parametrize(
    "argv, error, fragment",
    [
        (["--policies", "full", "nope"], ValueError, "unknown policy 'nope'"),
        (["--contexts", "64", "20"], ValueError, "must exceed"),
        (["--batch", "1", "0"], ValueError, "batch sizes"),
        (["--model", "gpt-9"], ValueError, "unknown model 'gpt-9'"),
        (["--model", "./no/such/model"], FileNotFoundError, "no such model directory"),
        (["--steps", "1", "--rounds", "2"], ValueError, "--steps"),
        (["--threads", "many"], ValueError, "--threads"),
        (["--k", "0"], ValueError, "--k"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, argv, error, fragment):
    out = tmp_path / "never.json"
    base = [*TINY, "--contexts", "64", "--out", str(out)]
    with pytest.raises(error, match=fragment.replace("(", r"\(")):
        bench.main(base + argv)
    assert not out.exists()


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        bench.main(["--model", str(tmp_path), "--contexts", "4096"])


def test_the_command_line_reports_bad_input_without_a_traceback(cli):
    code, _, err = cli("bench", "--policies", "fastest")
    assert code != 0
    assert "unknown policy 'fastest'" in err and "Traceback" not in err


def test_bars_and_largest_fit_summarise_rows():
    from hybridgen.apps.bench import bars, largest_fit

    def row(policy, n, b, ms, status="ok"):
        return {"policy": policy, "context": n, "batch": b, "status": status, "ms_per_token": ms, "k_last": 64}

    rows = [
        row("aog", 1024, 1, 30.0),
        row("streaming", 1024, 1, 12.0),
        row("h2o", 1024, 1, 15.0),
        row("scheduler", 1024, 1, 10.0),
        row("full", 2048, 4, 5.0, status="skipped"),
        row("full", 1024, 4, 4.0),
    ]
    (b,) = bars(rows)
    assert b["speedup_vs_aog"] == 3.0 and b["best_selective"] == "streaming"
    assert abs(b["speedup_vs_best_selective"] - 1.2) < 1e-12
    fit = largest_fit(rows)
    assert fit["full"] == {"batch": 4, "context": 1024, "tokens": 4096}
    assert fit["scheduler"]["tokens"] == 1024


def test_llama8b_shape_is_llama_3_1_8b():
    from hybridgen.apps.bench import llama8b_random

    model = llama8b_random(torch.device("meta"), torch.bfloat16)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 32, 8, 128)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (4096, 14336, 128256)
    assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9
