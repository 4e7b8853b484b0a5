"""The plugin without an engine: discovery, registration, configuration errors at start-up."""

import importlib.metadata
import subprocess
import sys

import pytest


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "hybridgen.vllm.plugin:register" in {ep.value for ep in eps if ep.name == "hybridgen"}


def test_vllm_loads_the_plugin_and_it_overrides_cpu_attn(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv("HYBRIDGEN_CONFIG", raising=False)
    from vllm.plugins import load_plugins_by_group
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "hybridgen" in plugins
    plugins["hybridgen"]()
    plugins["hybridgen"]()  # vLLM may load a plugin more than once per process
    assert AttentionBackendEnum.CPU_ATTN.get_path() == "hybridgen.vllm.backend.HybridCPUAttentionBackend"
    backend = AttentionBackendEnum.CPU_ATTN.get_class()
    assert backend.get_name() == "CPU_ATTN"
    assert backend.forward_includes_kv_cache_update is False
    assert backend.get_impl_cls().__name__ == "HybridCPUAttentionBackendImpl"


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "not valid JSON"),
        ('["policy", "all"]', "must be a JSON object"),
        ('{"gpu_budgt": 64}', "unknown field(s) ['gpu_budgt']"),
        ('{"gpu_budget": 0}', "gpu_budget must be >= 1"),
        ('{"policy": "h2o"}', "not served by the vLLM plugin"),
        ('{"merge": "concat"}', "merge 'concat' is not served"),
        ('{"pipeline": true, "speculative": true}', "speculative=true is not served"),
    ],
)
def test_bad_configuration_stops_registration(monkeypatch, raw, message):
    from hybridgen.vllm import ConfigError
    from hybridgen.vllm.plugin import register

    monkeypatch.setenv("HYBRIDGEN_CONFIG", raw)
    with pytest.raises(ConfigError) as e:
        register()
    assert message in str(e.value)


def test_configuration_without_the_variable_is_named(monkeypatch):
    from hybridgen.vllm import load_config

    config, source = load_config({})
    assert config.policy == "all"
    assert "HYBRIDGEN_CONFIG not set" in source and "gpu_budget=1024" in source


def test_importing_hybridgen_vllm_does_not_import_vllm():
    code = "import sys, hybridgen, hybridgen.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_backend_is_flash_attention_with_the_hybrid_mixins():
    # Structure only: the CUDA branch is unverified (no GPU here); this checks that it imports
    # against the installed vLLM and derives from FLASH_ATTN's classes.
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl, FlashAttentionMetadataBuilder

    from hybridgen.vllm.backend import HybridBuilderMixin, HybridImplMixin
    from hybridgen.vllm.flash import HybridFlashAttentionBackend

    assert HybridFlashAttentionBackend.get_name() == "HYBRIDGEN"
    assert HybridFlashAttentionBackend.forward_includes_kv_cache_update is False
    impl, builder = HybridFlashAttentionBackend.get_impl_cls(), HybridFlashAttentionBackend.get_builder_cls()
    assert issubclass(impl, HybridImplMixin) and issubclass(impl, FlashAttentionImpl)
    assert issubclass(builder, HybridBuilderMixin) and issubclass(builder, FlashAttentionMetadataBuilder)


@pytest.mark.parametrize(
    "fields",
    [{"policy": "pre_qkt", "predictor": "positional", "k": 32}, {"policy": "scheduler", "predictor": "positional"}],
)
def test_the_served_policies_load(fields):
    import json

    from hybridgen.vllm import load_config

    config, source = load_config({"HYBRIDGEN_CONFIG": json.dumps(fields)})
    assert config.policy == fields["policy"] and "predictor=positional" in source


@pytest.mark.parametrize("raw", ['{"policy": "pre_qkt"}', '{"policy": "scheduler", "predictor": "pages"}'])
def test_page_summary_pre_qkt_is_served_where_the_core_selects_pages_per_slot(raw):
    from hybridgen.vllm import ConfigError, load_config
    from hybridgen.vllm.settings import slot_pages

    if slot_pages():
        config, source = load_config({"HYBRIDGEN_CONFIG": raw})
        assert config.predictor == "pages" and "predictor=pages" in source
    else:
        with pytest.raises(ConfigError) as e:
            load_config({"HYBRIDGEN_CONFIG": raw})
        assert "takes no page selection" in str(e.value) and 'add "predictor": "positional"' in str(e.value)


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs
    from vllm_runs import ENGINE_ARGS

    return EngineArgs(str(model), **{**ENGINE_ARGS, **kwargs}).create_engine_config()


def test_with_the_variable_set_the_connector_is_vllms_default(monkeypatch, tiny_model):
    monkeypatch.setenv("HYBRIDGEN_CONFIG", '{"gpu_budget": 64}')
    from hybridgen.vllm.plugin import register

    register()
    kv = engine_config(tiny_model).kv_transfer_config
    assert kv.kv_connector == "HybridgenConnector" and kv.kv_role == "kv_both"
    # Given explicitly, it is kept as it is.
    import hybridgen.vllm

    kv = engine_config(tiny_model, kv_transfer_config=hybridgen.vllm.kv_transfer_config()).kv_transfer_config
    assert kv.kv_connector == "HybridgenConnector"


def test_without_the_variable_vllm_gets_no_connector(monkeypatch, tiny_model):
    monkeypatch.delenv("HYBRIDGEN_CONFIG", raising=False)
    from hybridgen.vllm.plugin import register

    register()
    assert engine_config(tiny_model).kv_transfer_config is None


@pytest.mark.parametrize(
    "kv, offloading, message",
    [
        (
            {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"},
            None,
            "names the KV connector 'OffloadingConnector'",
        ),
        (None, 4, "KV offloading (kv_offloading_size=4) replaces"),
    ],
)
def test_with_the_variable_set_another_connector_stops_start_up(monkeypatch, kv, offloading, message):
    from hybridgen.vllm import ConfigError
    from hybridgen.vllm.plugin import with_connector

    monkeypatch.setenv("HYBRIDGEN_CONFIG", "{}")
    with pytest.raises(ConfigError) as e:
        with_connector(kv, offloading)
    assert message in str(e.value)


def test_on_cuda_the_variable_selects_the_hybridgen_backend(monkeypatch):
    # The CUDA branch is unverified (no GPU here): the choice of backend only, on a stand-in.
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from hybridgen.vllm import ConfigError
    from hybridgen.vllm.plugin import _default_cuda_backend

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    args = SimpleNamespace(attention_backend=None, attention_config=SimpleNamespace(backend=None))
    _default_cuda_backend(args)
    assert args.attention_backend == "HYBRIDGEN"
    args = SimpleNamespace(attention_backend="FLASH_ATTN", attention_config=None)
    with pytest.raises(ConfigError) as e:
        _default_cuda_backend(args)
    assert "attention backend is FLASH_ATTN" in str(e.value)


def test_with_the_variable_set_an_engine_without_the_connector_stops_start_up(monkeypatch):
    # A VllmConfig made without vLLM's engine arguments (so without the plugin's default).
    from types import SimpleNamespace

    from hybridgen.vllm import ConfigError
    from hybridgen.vllm.backend import runtime_for

    monkeypatch.setenv("HYBRIDGEN_CONFIG", "{}")
    with pytest.raises(ConfigError) as e:
        runtime_for(SimpleNamespace(kv_transfer_config=None), None)
    assert "runs without hybridgen's KV connector" in str(e.value)


def test_the_serve_wrapper_checks_the_configuration_first(tmp_path):
    import os

    env = {**os.environ, "HYBRIDGEN_CONFIG": '{"gpu_budgt": 1}'}
    cmd = [sys.executable, "-m", "hybridgen.vllm", "serve", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown field(s) ['gpu_budgt']" in proc.stderr


def test_the_serve_command_hands_every_argument_to_vllm():
    import argparse

    from hybridgen.vllm.serve import build_parser

    parser = argparse.ArgumentParser()
    build_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "MODEL", "--host", "127.0.0.1", "--port", "8000", "--help"])
    assert args.args == ["MODEL", "--host", "127.0.0.1", "--port", "8000", "--help"]
