"""Bad input gets a clear Python exception (ValueError / TypeError, CapacityError for a full
tier), never a crash or a Rust panic crossing into Python."""

import pytest
import torch

import hybridgen

B, KVH, G, D = 2, 2, 2, 8


def make_store(**kw):
    args = dict(near_capacity_bytes=1 << 16, far_capacity_bytes=1 << 17, sinks=1)
    args.update(kw)
    store = hybridgen.HostKVStore(3, B, KVH, D, torch.float16, **args)
    store.append(0, 6)
    store.evict(0, torch.zeros(B, KVH, 4, D, dtype=torch.float16), torch.zeros(B, KVH, 4, D, dtype=torch.float16))
    return store


def kv(m=1, dtype=torch.float16):
    return torch.zeros(B, KVH, m, D, dtype=dtype)


def q(heads=KVH * G, dtype=torch.float32):
    return torch.zeros(B, heads, D, dtype=dtype)


CONSTRUCTOR_CASES = {
    "zero layers": (dict(layers=0), ValueError),
    "negative batch": (dict(batch=-1), ValueError),
    "zero kv heads": (dict(kv_heads=0), ValueError),
    "zero head_dim": (dict(head_dim=0), ValueError),
    "unknown dtype": (dict(dtype="int8"), ValueError),
    "dtype of wrong type": (dict(dtype=3.5), TypeError),
    "torch dtype not supported": (dict(dtype=torch.int32), TypeError),
    "zero near budget": (dict(near_capacity_bytes=0), ValueError),
    "zero far budget": (dict(far_capacity_bytes=0), ValueError),
    "negative near budget": (dict(near_capacity_bytes=-5), ValueError),
    "far budget below one token": (dict(far_capacity_bytes=3), ValueError),
    "negative sinks": (dict(sinks=-1), ValueError),
    "negative numa node": (dict(near_node=-2), ValueError),
    "zero max_host_tokens": (dict(max_host_tokens=0), ValueError),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=str)
def test_constructor_rejects(case):
    kw, exc = CONSTRUCTOR_CASES[case]
    args = dict(
        layers=2,
        batch=1,
        kv_heads=2,
        head_dim=8,
        dtype=torch.float16,
        near_capacity_bytes=1 << 16,
        far_capacity_bytes=1 << 16,
    )
    args.update(kw)
    pos = [args.pop(k) for k in ("layers", "batch", "kv_heads", "head_dim", "dtype")]
    with pytest.raises(exc):
        hybridgen.HostKVStore(*pos, **args)


# Each case: a callable on a prepared store, the exception, and a fragment of the message.
CALL_CASES = {
    "evict wrong dtype": (lambda s: s.evict(0, kv(dtype=torch.float32), kv(dtype=torch.float32)), TypeError, "float16"),
    "evict wrong rank": (lambda s: s.evict(0, kv()[0], kv()[0]), ValueError, "dimensions"),
    "evict wrong head count": (
        lambda s: s.evict(0, torch.zeros(B, 3, 1, D).half(), torch.zeros(B, 3, 1, D).half()),
        ValueError,
        "dimension 1",
    ),
    "evict wrong head_dim": (
        lambda s: s.evict(0, torch.zeros(B, KVH, 1, 4).half(), torch.zeros(B, KVH, 1, 4).half()),
        ValueError,
        "dimension 3",
    ),
    "evict wrong batch": (
        lambda s: s.evict(0, torch.zeros(1, KVH, 1, D).half(), torch.zeros(1, KVH, 1, D).half()),
        ValueError,
        "dimension 0",
    ),
    "evict non-contiguous": (
        lambda s: s.evict(0, torch.zeros(B, KVH, D, 2).half().transpose(2, 3)[:, :, :1], kv()),
        ValueError,
        "contiguous",
    ),
    "evict keys/values differ": (lambda s: s.evict(0, kv(1), kv(2)), ValueError, "same shape"),
    "evict more than on device": (lambda s: s.evict(0, kv(5), kv(5)), ValueError, "non-sink device tokens"),
    "evict a list": (lambda s: s.evict(0, [[1.0]], kv()), TypeError, "tensor"),
    "evict numpy wrong dtype": (lambda s: s.evict(0, kv().numpy().astype("float64"), kv()), TypeError, "float16"),
    "layer out of range": (lambda s: s.append(3, 1), ValueError, "out of range"),
    "negative layer": (lambda s: s.host_len(-1), ValueError, ">= 0"),
    "negative append": (lambda s: s.append(0, -1), ValueError, ">= 0"),
    "spill more than near": (lambda s: s.spill_keys(0, 99), ValueError, "near tier"),
    "read out of range": (lambda s: s.read(0, 2, 9), ValueError, "out of bounds"),
    "read stop before start": (lambda s: s.read(0, 3, 1), ValueError, "stop"),
    "view bad kind": (lambda s: s.view(0, "queries", 0, 1), ValueError, "keys"),
    "view out of range": (lambda s: s.view(0, "keys", 0, 5), ValueError, "out of bounds"),
    "q heads not multiple of kv heads": (lambda s: s.logits(0, q(heads=3), 1.0), ValueError, "multiple"),
    "q wrong head_dim": (lambda s: s.logits(0, torch.zeros(B, 4, 5), 1.0), ValueError, "dimension 2"),
    "q integer dtype": (lambda s: s.logits(0, torch.zeros(B, 4, D, dtype=torch.int64), 1.0), TypeError, "floating"),
    "q wrong rank": (lambda s: s.logits(0, torch.zeros(4, D), 1.0), ValueError, "dimensions"),
    "q not a tensor": (lambda s: s.logits(0, "q", 1.0), TypeError, "Tensor"),
    "indices out of range": (
        lambda s: s.logits(0, q(), 1.0, torch.tensor([[[0, 4]] * KVH] * B)),
        ValueError,
        "out of range",
    ),
    "negative index": (lambda s: s.logits(0, q(), 1.0, torch.tensor([[[-1]] * KVH] * B)), ValueError, "out of range"),
    "indices wrong dtype": (
        lambda s: s.logits(0, q(), 1.0, torch.zeros(B, KVH, 1, dtype=torch.int32)),
        TypeError,
        "int64",
    ),
    "logits out wrong shape": (
        lambda s: s.logits(0, q(), 1.0, out=torch.zeros(B, 4, 3)),
        ValueError,
        "out holds 3 logits per head",
    ),
    "logits out wrong dtype": (
        lambda s: s.logits(0, q(), 1.0, out=torch.zeros(B, 4, 4, dtype=torch.float64)),
        TypeError,
        "float32",
    ),
    "unknown isa": (lambda s: s.logits(0, q(), 1.0, isa="neon"), ValueError, "isa"),
    "gather index past end": (lambda s: s.gather_values(0, torch.full((B, 4, 2), 7)), ValueError, "out of range"),
    "gather out wrong dtype": (
        lambda s: s.gather_values(0, torch.zeros(B, 4, 2, dtype=torch.int64), out=torch.zeros(B, 4, 2, D)),
        TypeError,
        "float16",
    ),
    "partial logits not covering host": (
        lambda s: s.partial_attention(0, torch.zeros(B, 4, 3)),
        ValueError,
        "host tokens",
    ),
    "partial indices shape mismatch": (
        lambda s: s.partial_attention(0, torch.zeros(B, 4, 2), torch.zeros(B, 4, 3, dtype=torch.int64)),
        ValueError,
        "dimension 2",
    ),
    "partial logits float16": (
        lambda s: s.partial_attention(0, torch.zeros(B, 4, 4, dtype=torch.float16)),
        TypeError,
        "float32",
    ),
}


@pytest.mark.parametrize("case", CALL_CASES, ids=str)
def test_calls_reject(case):
    call, exc, fragment = CALL_CASES[case]
    store = make_store()
    before = store.tier_stats()
    with pytest.raises(exc, match=fragment):
        call(store)
    assert store.tier_stats() == before, "a rejected call changes nothing"


def test_cuda_tensors_get_a_clear_message():
    class FakeCuda:
        """Announces itself as a CUDA DLPack producer (works without a GPU)."""

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, **kw):
            raise AssertionError("must be rejected before export")

    store = make_store()
    with pytest.raises(ValueError, match=r"CUDA tensor \(cuda:0\).*\.cpu\(\)"):
        store.evict(0, FakeCuda(), kv())


@pytest.mark.gpu
def test_real_cuda_tensors_are_rejected_with_the_same_message():
    store = make_store()
    with pytest.raises(ValueError, match="CUDA tensor"):
        store.evict(0, kv().cuda(), kv().cuda())


def test_topk_rejects():
    x = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="larger than"):
        hybridgen.topk(x, 6)
    with pytest.raises(ValueError, match="> 0"):
        hybridgen.topk(x, 0)
    with pytest.raises(TypeError, match="int"):
        hybridgen.topk(x, 2.5)
    with pytest.raises(ValueError, match=r"\[b, h, n\]"):
        hybridgen.topk(torch.zeros(5), 1)
    with pytest.raises(TypeError, match="float32"):
        hybridgen.topk(x.double(), 1)


def test_full_far_tier_is_a_capacity_error():
    tb = B * KVH * D * 2
    store = hybridgen.HostKVStore(1, B, KVH, D, torch.float16, near_capacity_bytes=tb, far_capacity_bytes=3 * tb)
    store.append(0, 10)
    store.evict(0, kv(2), kv(2))  # 2 values + 1 spilled key = 3 tokens of far space
    with pytest.raises(hybridgen.CapacityError, match="far tier full"):
        store.evict(0, kv(1), kv(1))
    assert store.host_len(0) == 2
    assert issubclass(hybridgen.CapacityError, RuntimeError)
