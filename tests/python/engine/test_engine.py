"""The decode engine on plain tensors: no model, no framework. Every policy's step against an
independent float64 reference, step boundaries, exactness decided in one place, the pipelining
worker per engine, and the engine's layers kept free of any framework."""

import ast
import re
from pathlib import Path

import pytest
import torch
from reference import attention as ref_attention
from reference import expand_kv
from reference import logits as ref_logits

from hybridgen import HybridConfig
from hybridgen.config import POLICIES
from hybridgen.engine import Engine, ModelInfo, PromptRecorder
from hybridgen.policies import policy_class

PACKAGE = Path(__file__).resolve().parents[3] / "python" / "hybridgen"
INFO = ModelInfo("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, max_positions=512)


def run_engine(config, steps=6, prompt=40, batch=2, seed=0, keep=None):
    """Prompt + ``steps`` decode tokens through an engine on the CPU; per step and layer the
    output and the float64 reference over every token (the logical sequence)."""
    g = torch.Generator().manual_seed(seed)
    eng = Engine(config, INFO)
    eng.plan(batch=batch, dtype=torch.float32, device="cpu", max_tokens=prompt + steps + 1)
    b, hq, hkv, d = batch, INFO.q_heads, INFO.kv_heads, INFO.head_dim
    seq_k = [torch.randn(b, hkv, prompt, d, generator=g) for _ in range(INFO.layers)]
    seq_v = [torch.randn(b, hkv, prompt, d, generator=g) for _ in range(INFO.layers)]
    for layer in range(INFO.layers):
        q = torch.randn(b, hq, prompt, d, generator=g)
        eng.place(layer, seq_k[layer], seq_v[layer], prompt=True)
        eng.prefill(layer, q, seq_k[layer], seq_v[layer], None, d**-0.5)
    results = []
    for _ in range(steps):
        for layer in range(INFO.layers):
            k, v = torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
            seq_k[layer] = torch.cat([seq_k[layer], k], 2)
            seq_v[layer] = torch.cat([seq_v[layer], v], 2)
            q = torch.randn(b, hq, d, generator=g)
            eng.place(layer, k, v)
            out = eng.step(layer, q, None, d**-0.5)
            want, _ = ref_attention(ref_logits(q, seq_k[layer], d**-0.5), expand_kv(seq_v[layer], hq // hkv))
            results.append((out, want))
        eng.close_step()
    return eng, results


@pytest.mark.parametrize("policy", ["all", "full", "aog", "aoc"])
@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_exact_policies_equal_full_attention_on_plain_tensors(policy, merge):
    eng, results = run_engine(HybridConfig(policy=policy, merge=merge, gpu_budget=8, sinks=2, evict_chunk=2))
    assert eng.exact
    assert eng.steps == 6 and len(eng.telemetry.records) == 12
    if policy != "full":
        assert eng.tiers[0].host_tokens > 0  # the host path really ran
    for out, want in results:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("all", "full", "aog", "aoc")])
def test_selective_policies_run_and_equal_full_attention_when_their_budget_covers_every_token(policy):
    # k and the window cover the whole sequence: every selective policy must then be exact too.
    config = HybridConfig(policy=policy, k=512, k_min=512, k_max=512, gpu_budget=8, sinks=2, evict_chunk=2)
    if policy == "streaming":
        config = HybridConfig(policy=policy, gpu_budget=512, sinks=2)
    eng, results = run_engine(config)
    assert not eng.exact or policy == "all"
    assert {r.strategy for r in eng.telemetry.records}
    for out, want in results:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_post_qkt_with_a_small_k_differs_from_full_attention():
    """The comparison above can fail: a real selection changes the output."""
    _, results = run_engine(HybridConfig(policy="post_qkt", k=2, gpu_budget=4, sinks=1, evict_chunk=2))
    assert max((out.double() - want).abs().max().item() for out, want in results) > 1e-3


def test_a_tier_decoding_again_starts_the_next_step():
    eng, _ = run_engine(HybridConfig(policy="all", gpu_budget=8, sinks=2), steps=1)
    d = INFO.head_dim
    for _ in range(3):  # no close_step: the engine finds the boundaries itself
        for layer in range(INFO.layers):
            eng.place(layer, torch.randn(2, 2, 1, d), torch.randn(2, 2, 1, d))
            eng.step(layer, torch.randn(2, 4, d), None, d**-0.5)
    assert eng.steps == 3  # steps 1 and 2 closed when layer 0 decoded again; step 3 is open
    assert eng.clock.open_records == INFO.layers
    eng.close_step()
    assert eng.steps == 4 and [r.step for r in eng.telemetry.records][-2:] == [3, 3]


def test_exactness_is_decided_by_the_policy_and_speculation_is_never_exact():
    for name in POLICIES:
        exact = policy_class(name).is_exact(HybridConfig(policy=name))
        assert exact == (name in ("all", "full", "aog", "aoc")), name
        if name in ("all", "aoc"):
            spec = HybridConfig(policy=name, pipeline=True, speculative=True)
            assert not policy_class(name).is_exact(spec), f"{name} with speculation starts from an estimate"


def test_pipelined_stages_run_on_the_engines_own_worker():
    cfg = HybridConfig(policy="all", gpu_budget=8, sinks=2, pipeline=True)
    a, results = run_engine(cfg, steps=2)
    b, _ = run_engine(cfg, steps=2)
    assert a.worker is not b.worker and a.policy.worker is a.worker
    for out, want in results:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_speculation_takes_a_query_estimate_tensor():
    cfg = HybridConfig(policy="all", gpu_budget=8, sinks=2, pipeline=True, speculative=True)
    eng, _ = run_engine(cfg, steps=1)
    d = INFO.head_dim
    assert eng.wants_query_estimate(1)
    q = torch.randn(2, 4, d)
    eng.speculate(1, q, None, d**-0.5)  # the estimate is the true query: the result is exact
    eng.place(1, torch.randn(2, 2, 1, d), torch.randn(2, 2, 1, d))
    eng.step(1, q, None, d**-0.5)
    assert eng.clock.last_record.speculative


def test_a_recorded_prompt_replays_into_another_policys_engine():
    d = INFO.head_dim
    src = Engine(HybridConfig(policy="full"), INFO)
    src.plan(batch=1, dtype=torch.float32, device="cpu", max_tokens=64)
    rec = src.on_prefill = PromptRecorder(window=4)
    k, v, q = torch.randn(1, 2, 30, d), torch.randn(1, 2, 30, d), torch.randn(1, 4, 30, d)
    src.place(0, k, v, prompt=True)
    src.prefill(0, q, k, v, None, d**-0.5)
    assert rec.layers[0].query.shape[2] == 4
    dst = Engine(HybridConfig(policy="h2o", gpu_budget=8, sinks=2, k=4), INFO)
    dst.plan(batch=1, dtype=torch.float32, device="cpu", max_tokens=64)
    rec.replay(dst, 0)
    assert dst.tiers[0].total == 30 and dst.tiers[0].host_tokens == 20
    assert dst.tiers[0].policy_state is not None  # h2o saw the recorded queries


def test_the_engine_refuses_a_changed_shape_or_placement():
    eng, _ = run_engine(HybridConfig(policy="all", gpu_budget=8, sinks=2), steps=1)
    with pytest.raises(ValueError, match="batch size changed"):
        eng.plan(batch=3, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="stores torch.float32"):
        eng.plan(batch=2, dtype=torch.float16, device="cpu")
    with pytest.raises(ValueError, match="places tokens as"):
        eng.set_config(HybridConfig(policy="aoc"))
    with pytest.raises(TypeError, match="HybridConfig"):
        Engine({"policy": "all"}, INFO)


# --- the layers below the front ends know no framework ---------------------------------------
FRAMEWORK = re.compile(r"transformers|flexgen|self_attn|decoder_layer")


@pytest.mark.parametrize("package", ["engine", "policies"])
def test_engine_and_policies_never_name_a_framework(package):
    found = [
        f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
        for p in sorted((PACKAGE / package).rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if FRAMEWORK.search(line)
    ]
    assert not found, "\n".join(found)


def _imports(path: Path) -> set[str]:
    """The hybridgen modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            name = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m.removesuffix(".__init__") for m in found if m.startswith("hybridgen")}


def test_no_import_cycles_between_the_layers():
    """policies import the engine's parts, never the Engine; hf.attention and hf.patch do not
    import each other both ways; nothing under engine/ or policies/ imports a front end."""
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph = {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}
    for m, deps in graph.items():
        if m.startswith(("hybridgen.engine", "hybridgen.policies")):
            assert not {d for d in deps if d.startswith(("hybridgen.hf", "hybridgen.flexgen", "hybridgen.apps"))}, m
        if m.startswith("hybridgen.policies"):
            assert "hybridgen.engine.engine" not in deps and "hybridgen.engine" not in deps, m
    assert not (
        "hybridgen.hf.patch" in graph["hybridgen.hf.attention"]
        and "hybridgen.hf.attention" in graph["hybridgen.hf.patch"]
    )
    # No cycle among modules once package aggregators (__init__) are left out.
    plain = {
        m: {d for d in deps if modules[d].name != "__init__.py"}
        for m, deps in graph.items()
        if modules[m].name != "__init__.py"
    }
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for d in plain.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in plain:
        if m not in state:
            visit(m, [m])
