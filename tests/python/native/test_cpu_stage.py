"""``_native.HostKVStore.cpu_stage`` (the CPU stage in one native call) against an independent
float64 torch reference and against the Python ``hybridgen.attention.cpu_stage`` it replaces.

The reference sees the keys and values as stored (rounded to the storage dtype) and computes in
float64, so only the kernels' float32 accumulation differs: tolerances are relative to the
largest reference magnitude. The Python stage runs the same kernels one by one, so its results
must be identical.
"""

import threading

import pytest
import reference as ref
import torch

import hybridgen
from hybridgen import _native

try:
    from hybridgen.attention import cpu_stage as python_stage
except ImportError:  # the Python stage may move; the reference comparison still runs
    python_stage = None

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = 1e-4


def make_store(b, hkv, d, n, dtype, gen):
    """A one-layer store of ``n`` random host tokens; returns it with K and V as stored."""
    store = hybridgen.HostKVStore(1, b, hkv, d, dtype, near_capacity_bytes=1 << 24, far_capacity_bytes=1 << 25)
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    store.append(0, n)
    if n:
        store.evict(0, keys, values)
    return store, keys, values


def tensor(x):
    """A result entry as a torch tensor (entries are tensors, DLPack capsules or None)."""
    return x if x is None or isinstance(x, torch.Tensor) else torch.from_dlpack(x)


def native(store, q, scale, merge, **kw):
    r = store._native.cpu_stage(0, q, scale, merge, **kw)
    return {k: tensor(v) if k in ("out", "lse", "logits", "indices", "values") else v for k, v in r.items()}


def reference(keys, values, q, scale, merge, top_k=None, positions=None, mask=None):
    """The stage's definition in float64: scored tokens, masking, top-k (NaN lowest, ties to the
    earlier scored token, kept in scored order), then LSE partial attention or the selection."""
    b, hkv, n, d = keys.shape
    hq = q.shape[1]
    g = hq // hkv
    cand = torch.arange(n) if positions is None else positions
    m = cand.numel()
    x = ref.logits(q, keys, scale)[..., cand]  # [b, hq, m]
    if mask is not None:
        x = x.masked_fill(mask[:, cand].bool().unsqueeze(1), float("-inf"))
    indexed = positions is not None or (top_k is not None and top_k < m)
    if top_k is not None and top_k < m:
        key = torch.nan_to_num(x, nan=float("-inf"))
        order = torch.sort(-key, dim=-1, stable=True).indices[..., :top_k]
        local = order.sort(dim=-1).values
        x = torch.gather(x, 2, local)
        idx = cand[local]
    else:
        idx = cand.expand(b, hq, m)
    rows = ref.expand_kv(values, g)  # [b, hq, n, d]
    picked = torch.gather(rows, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))  # [b, hq, k, d]
    result = {"tokens": x.shape[-1], "indexed": indexed, "logits": x, "indices": idx, "values": picked}
    if merge == "lse":
        lse = torch.logsumexp(x, dim=-1) if x.shape[-1] else torch.full((b, hq), float("-inf"), dtype=torch.float64)
        p = torch.exp(x - lse.unsqueeze(-1)).nan_to_num(0.0)
        result["out"] = torch.einsum("bhk,bhkd->bhd", p, picked.double())
        result["lse"] = lse
    return result


def assert_close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got[~finite].double(), want[~finite]), f"{what}: infinities differ"
    if finite.any():
        scale = max(want[finite].abs().max().item(), 1e-6)
        err = (got[finite].double() - want[finite]).abs().max().item()
        assert err <= TOL * scale, f"{what}: max error {err:.3e} > {TOL:.0e} × {scale:.3e}"


def check_against_reference(r, want, merge, dtype, b, hq, hkv, d, n):
    assert r["merge"] == merge and r["host_len"] == n and r["tokens"] == want["tokens"]
    k = want["tokens"]
    if merge == "lse":
        assert r["logits"] is None and r["values"] is None
        assert r["out"].dtype == torch.float32 and r["lse"].dtype == torch.float32
        assert_close(r["out"], want["out"], "out")
        assert_close(r["lse"], want["lse"], "lse")
        return
    assert r["out"] is None and r["lse"] is None
    assert r["logits"].dtype == torch.float32
    assert_close(r["logits"], want["logits"], "logits")
    if want["indexed"]:
        assert not r["grouped"]
        assert r["indices"].dtype == torch.int64 and torch.equal(r["indices"], want["indices"])
        assert r["values"].dtype == dtype and r["values"].shape == (b, hq, k, d)
        assert torch.equal(r["values"], want["values"])
    else:
        assert r["grouped"] and r["indices"] is None
        assert r["values"].shape == (b, hkv, n, d)


def check_against_python(store, q, scale, merge, r, **kw):
    if python_stage is None:
        return
    part = python_stage(store, 0, q, scale=scale, merge=merge, **kw)
    assert part.tokens == r["tokens"]
    if merge == "lse":
        assert torch.equal(part.out, r["out"]) and torch.equal(part.lse, r["lse"])
    else:
        assert part.grouped == r["grouped"]
        assert torch.equal(part.logits, r["logits"]) and torch.equal(part.values, r["values"])


SELECTIONS = {
    "all": lambda n: {},
    "top_k": lambda n: {"top_k": max(n // 4, 1)},
    "positions": lambda n: {"positions": torch.tensor([n - 1, 0, 5, 5, n // 2, 3])},
    "positions_top_k": lambda n: {"positions": torch.arange(n - 1, -1, -2), "top_k": 7},
}


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_python_stage(dtype, g, b, masked, selection, merge, rng):
    hkv, d, n = 2, 64, 67
    hq = hkv * g
    store, keys, values = make_store(b, hkv, d, n, dtype, rng)
    q = torch.randn((b, hq, d), generator=rng)
    scale = d**-0.5
    kw = SELECTIONS[selection](n)
    if masked:
        mask = torch.rand((b, n), generator=rng) < 0.3
        mask[0] = True  # a fully masked sequence: lse -inf and zeros; top-k takes the first k
        kw["host_mask"] = mask
    r = native(store, q, scale, merge, **kw)
    want = reference(keys, values, q, scale, merge, kw.get("top_k"), kw.get("positions"), kw.get("host_mask"))
    check_against_reference(r, want, merge, dtype, b, hq, hkv, d, n)
    check_against_python(store, q, scale, merge, r, **kw)


@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_every_isa_agrees(merge, rng):
    store, keys, values = make_store(2, 2, 80, 301, torch.bfloat16, rng)
    q = torch.randn((2, 8, 80), generator=rng)
    want = reference(keys, values, q, 0.1, merge, 40)
    for isa in hybridgen.available_isas():
        r = native(store, q, 0.1, merge, top_k=40, isa_name=isa)
        check_against_reference(r, want, merge, torch.bfloat16, 2, 8, 2, 80, 301)


def test_ties_go_to_the_earlier_token_and_indices_stay_in_order(rng):
    b, hkv, d, n = 1, 1, 16, 12
    store = hybridgen.HostKVStore(1, b, hkv, d, torch.float32, near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 20)
    keys = torch.randn((b, hkv, n, d), generator=rng)
    keys[..., 9, :] = keys[..., 2, :]  # equal logits at tokens 2 and 9 ...
    q = keys[0, :, 2, :].unsqueeze(0).clone()  # ... and the largest (q parallel to them)
    values = torch.randn((b, hkv, n, d), generator=rng)
    store.append(0, n)
    store.evict(0, keys, values)
    r = native(store, q, 1.0, "concat", top_k=1)
    assert r["indices"].tolist() == [[[2]]]
    r = native(store, q, 1.0, "concat", top_k=4)
    assert r["indices"][0, 0].tolist() == sorted(r["indices"][0, 0].tolist())
    # Positions keep the order they are given in, also after top-k; ties go to the earlier one.
    r = native(store, q, 1.0, "concat", positions=torch.tensor([9, 5, 2]), top_k=2)
    assert r["indices"].tolist() == [[[9, 2]]]
    r = native(store, q, 1.0, "concat", positions=torch.tensor([9, 5, 2]), top_k=1)
    assert r["indices"].tolist() == [[[9]]]


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"top_k": 5}, {"top_k": 0}, {"positions": torch.empty(0, dtype=torch.int64)}],
    ids=["all", "top_k", "k0", "no_positions"],
)
def test_no_host_tokens(merge, kw, rng):
    b, hkv, g, d = 2, 2, 2, 32
    store, _, _ = make_store(b, hkv, d, 0, torch.float16, rng)
    q = torch.randn((b, hkv * g, d), generator=rng)
    r = native(store, q, 1.0, merge, **kw)
    assert r["tokens"] == 0 and r["host_len"] == 0
    indexed = "positions" in kw
    if merge == "lse":
        assert torch.equal(r["out"], torch.zeros((b, hkv * g, d)))
        assert torch.equal(r["lse"], torch.full((b, hkv * g), float("-inf")))
    else:
        assert r["logits"].shape == (b, hkv * g, 0)
        assert r["grouped"] == (not indexed)
        assert r["values"].shape == ((b, hkv * g, 0, d) if indexed else (b, hkv, 0, d))
    with pytest.raises(ValueError, match="out of range"):
        store._native.cpu_stage(0, q, 1.0, merge, positions=torch.tensor([0]))


@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_k_zero_selects_nothing_and_k_beyond_n_selects_all(merge, rng):
    store, keys, values = make_store(1, 2, 32, 20, torch.float32, rng)
    q = torch.randn((1, 4, 32), generator=rng)
    r = native(store, q, 1.0, merge, top_k=0)
    assert r["tokens"] == 0
    if merge == "lse":
        assert torch.equal(r["out"], torch.zeros((1, 4, 32))) and torch.isneginf(r["lse"]).all()
    else:
        assert r["values"].shape == (1, 4, 0, 32) and r["indices"].shape == (1, 4, 0)
    everything = native(store, q, 1.0, merge)
    for k in (20, 21, 1000):
        r = native(store, q, 1.0, merge, top_k=k)
        assert r["tokens"] == 20
        for name in ("out", "lse", "logits"):
            if r[name] is not None:
                assert torch.equal(r[name], everything[name])
        if merge == "concat":
            assert r["grouped"] and torch.equal(r["values"], values)


def test_concat_over_all_tokens_is_a_view_of_the_store(rng):
    store, _, values = make_store(1, 2, 16, 10, torch.float16, rng)
    r = native(store, torch.randn((1, 2, 16), generator=rng), 1.0, "concat")
    assert r["values"].data_ptr() == store.view(0, "values", 0, 10).data_ptr()
    assert torch.equal(r["values"], values)


@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_outputs_written_in_place_or_into_buffers(merge, rng):
    b, hkv, g, d, n, k = 2, 2, 3, 32, 50, 7
    hq = hkv * g
    store, _, _ = make_store(b, hkv, d, n, torch.bfloat16, rng)
    q = torch.randn((b, hq, d), generator=rng)
    fresh = native(store, q, 0.5, merge, top_k=k, indices_out=torch.empty((b, hq, k), dtype=torch.int64))
    names = {
        "lse": {"out": ("out", torch.float32, (b, hq, d)), "lse_out": ("lse", torch.float32, (b, hq))},
        "concat": {
            "logits_out": ("logits", torch.float32, (b, hq, k)),
            "values_out": ("values", torch.bfloat16, (b, hq, k, d)),
        },
    }[merge]
    names["indices_out"] = ("indices", torch.int64, (b, hq, k))
    # Exact shapes: written in place and handed back as the same objects.
    exact = {arg: torch.full(shape, 7, dtype=dt) for arg, (_, dt, shape) in names.items()}
    raw = store._native.cpu_stage(0, q, 0.5, merge, top_k=k, **exact)
    for arg, (key, _, _) in names.items():
        assert raw[key] is exact[arg]
        assert torch.equal(exact[arg], fresh[key])
    # 1-D buffers with room to spare (a plan's, allocated once): the result fills their start.
    spare = {
        arg: torch.full((2 * torch.Size(shape).numel() + 3,), 7, dtype=dt) for arg, (_, dt, shape) in names.items()
    }
    r = native(store, q, 0.5, merge, top_k=k, **spare)
    for arg, (key, _, shape) in names.items():
        assert r[key].shape == shape and r[key].data_ptr() == spare[arg].data_ptr()
        assert torch.equal(r[key], fresh[key])
        assert (spare[arg][torch.Size(shape).numel() :] == 7).all()
    del spare  # the returned views keep the buffers alive
    assert torch.equal(r[key], fresh[key])


@pytest.mark.gpu
def test_page_locked_buffers_stay_page_locked(rng):
    store, _, _ = make_store(1, 2, 64, 100, torch.float16, rng)
    q = torch.randn((1, 4, 64), generator=rng)
    logits = torch.empty(4 * 16, dtype=torch.float32, pin_memory=True)
    values = torch.empty(4 * 16 * 64, dtype=torch.float16, pin_memory=True)
    r = native(store, q, 1.0, "concat", top_k=16, logits_out=logits, values_out=values)
    assert r["logits"].is_pinned() and r["values"].is_pinned()
    assert torch.equal(r["values"].cuda().cpu(), r["values"])


def test_concurrent_stages_on_one_store(rng):
    store, keys, values = make_store(1, 2, 64, 2000, torch.float16, rng)
    qs = [torch.randn((1, 8, 64), generator=rng) for _ in range(8)]
    want = [native(store, q, 0.1, "lse", top_k=100) for q in qs]
    got = [None] * len(qs)

    def run(i):
        got[i] = native(store, qs[i], 0.1, "lse", top_k=100)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, r in zip(want, got):
        assert torch.equal(w["out"], r["out"]) and torch.equal(w["lse"], r["lse"])


# --- bad input: a ValueError or TypeError naming the problem, never a crash ----------------------------


class FakeCuda:
    """Announces itself as a CUDA DLPack producer (works without a GPU)."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kw):
        raise AssertionError("must be rejected before export")


@pytest.fixture
def small(rng):
    store, _, _ = make_store(2, 2, 16, 10, torch.float16, rng)
    return store._native, torch.randn((2, 4, 16), generator=rng)


@pytest.mark.parametrize(
    "args,kw,exc,match",
    [
        ((0, "q32", 1.0, "sum"), {}, ValueError, "merge must be one of"),
        ((0, "q32", 1.0, 3), {}, TypeError, "merge"),
        ((1, "q32", 1.0, "lse"), {}, ValueError, "layer 1 out of range"),
        ((-1, "q32", 1.0, "lse"), {}, ValueError, "layer must be >= 0"),
        ((0, "q16", 1.0, "lse"), {}, TypeError, "q must have dtype float32"),
        ((0, "q_wide", 1.0, "lse"), {}, ValueError, "q has shape"),
        ((0, "q_heads", 1.0, "lse"), {}, ValueError, "multiple of kv_heads"),
        ((0, "q_rank2", 1.0, "lse"), {}, ValueError, "dimensions"),
        ((0, "q_list", 1.0, "lse"), {}, TypeError, "q must be a tensor"),
        ((0, "q_cuda", 1.0, "lse"), {}, ValueError, r"CUDA tensor \(cuda:0\)"),
        ((0, "q_strided", 1.0, "lse"), {}, ValueError, "contiguous"),
        ((0, "q32", 1.0, "lse"), {"top_k": -1}, ValueError, "top_k must be >= 0"),
        ((0, "q32", 1.0, "lse"), {"positions": torch.tensor([0, 10])}, ValueError, "out of range"),
        ((0, "q32", 1.0, "lse"), {"positions": torch.tensor([-1])}, ValueError, "out of range"),
        ((0, "q32", 1.0, "lse"), {"positions": torch.tensor([0.0])}, TypeError, "positions must have dtype int64"),
        ((0, "q32", 1.0, "lse"), {"positions": torch.zeros((2, 2), dtype=torch.int64)}, ValueError, "dimensions"),
        ((0, "q32", 1.0, "lse"), {"host_mask": torch.zeros((2, 9), dtype=torch.bool)}, ValueError, "host_mask must be"),
        (
            (0, "q32", 1.0, "lse"),
            {"host_mask": torch.zeros((3, 10), dtype=torch.bool)},
            ValueError,
            "host_mask has shape",
        ),
        ((0, "q32", 1.0, "lse"), {"host_mask": torch.zeros((2, 10))}, TypeError, "bool or uint8"),
        ((0, "q32", 1.0, "lse"), {"out": torch.empty((2, 4, 15))}, ValueError, "out has shape"),
        ((0, "q32", 1.0, "lse"), {"out": torch.empty(127)}, ValueError, "1-D buffer of at least 128"),
        (
            (0, "q32", 1.0, "lse"),
            {"out": torch.empty((2, 4, 16), dtype=torch.float16)},
            TypeError,
            "out must have dtype float32",
        ),
        ((0, "q32", 1.0, "lse"), {"lse_out": torch.empty((2, 4, 1))}, ValueError, "lse_out has shape"),
        ((0, "q32", 1.0, "lse"), {"logits_out": torch.empty((2, 4, 10))}, ValueError, "not written by the lse merge"),
        ((0, "q32", 1.0, "concat"), {"out": torch.empty((2, 4, 16))}, ValueError, "not written by the concat merge"),
        ((0, "q32", 1.0, "concat"), {"top_k": 3, "values_out": torch.empty((2, 4, 3, 16))}, TypeError, "float16"),
        (
            (0, "q32", 1.0, "concat"),
            {"top_k": 3, "indices_out": torch.empty((2, 4, 3), dtype=torch.int32)},
            TypeError,
            "int64",
        ),
        (
            (0, "q32", 1.0, "concat"),
            {"top_k": 3, "logits_out": torch.empty((2, 4, 4))},
            ValueError,
            "logits_out has shape",
        ),
        ((0, "q32", 1.0, "concat"), {"logits_out": torch.empty((4, 10, 2)).transpose(0, 2)}, ValueError, "contiguous"),
        ((0, "q32", 1.0, "lse"), {"isa_name": "avx1024"}, ValueError, "unknown isa"),
    ],
)
def test_bad_input_is_an_error(small, args, kw, exc, match):
    native_store, q = small
    qs = {
        "q32": q,
        "q16": q.half(),
        "q_wide": torch.zeros((2, 4, 17)),
        "q_heads": torch.zeros((2, 3, 16)),
        "q_rank2": torch.zeros((8, 16)),
        "q_list": q.tolist(),
        "q_cuda": FakeCuda(),
        "q_strided": torch.zeros((2, 16, 4)).transpose(1, 2),
    }
    args = (args[0], qs[args[1]], *args[2:])
    with pytest.raises(exc, match=match):
        native_store.cpu_stage(*args, **kw)


def test_outputs_must_not_share_memory(small):
    native_store, q = small
    with pytest.raises(ValueError, match="must not share memory with q"):
        native_store.cpu_stage(0, q, 1.0, "lse", out=q)
    buf = torch.empty(1000)
    with pytest.raises(ValueError, match="must not share memory"):
        native_store.cpu_stage(0, q, 1.0, "lse", out=buf[:128], lse_out=buf[100:108])


def test_constants_are_exported_once():
    assert _native.MERGES == ("concat", "lse")
    assert _native.DTYPES == ("float16", "bfloat16", "float32")
    assert _native.MAX_HEAD_DIM == 256
    assert _native.STRATEGIES == ("post_qkt", "pre_qkt")
    assert _native.TIERS == ("device", "near", "far")
    assert hybridgen.host_store.Tier.NEAR == _native.TIERS.index("near")


def test_stub_declares_every_constant():
    import ast
    from pathlib import Path

    stub = ast.parse(Path(hybridgen.__file__).with_name("_native.pyi").read_text())
    declared = {n.target.id for n in stub.body if isinstance(n, ast.AnnAssign)} - {"__version__"}
    exported = {n for n in vars(_native) if n.isupper()}
    assert declared == exported
