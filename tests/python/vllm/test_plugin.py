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
