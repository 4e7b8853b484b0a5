"""What the FlexGen drop-in's tests share: FlexGen on the CPU, its policies and masks, its own
attention as the reference, a tiny OPT in FlexGen's weight format, and one SelfAttention driven
through FlexGen's cache protocol."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

fo = pytest.importorskip("flexgen.flex_opt")  # first: it fixes FlexGen's circular import

from flexgen import pytorch_backend as pb  # noqa: E402
from flexgen.compression import CompressionConfig  # noqa: E402
from flexgen.opt_config import OptConfig  # noqa: E402
from flexgen.utils import ExecutionEnv, Task, ValueHolder  # noqa: E402

from hybridgen.flexgen.layer_cache import FlexGenLayerCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TorchTensor = pb.TorchTensor


class CPUDevice(pb.TorchDevice):
    """FlexGen's TorchDevice on the CPU without pinned memory or CUDA synchronisation (both need a GPU)."""

    def allocate(self, shape, dtype, pin_memory=None, name=None):
        return super().allocate(shape, dtype, pin_memory=False, name=name)

    def synchronize(self):
        pass


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass


def flex_policy(**overrides):
    fields = dict(
        gpu_batch_size=2,
        num_gpu_batches=1,
        w_gpu_percent=100,
        w_cpu_percent=0,
        cache_gpu_percent=100,
        cache_cpu_percent=0,
        act_gpu_percent=100,
        act_cpu_percent=0,
        overlap=False,
        sep_layer=True,
        pin_weight=False,
        cpu_cache_compute=False,
        attn_sparsity=1.0,
        compress_weight=False,
        comp_weight_config=CompressionConfig(4, 64, 0, False),
        compress_cache=False,
        comp_cache_config=CompressionConfig(4, 64, 2, False),
    )
    fields.update(overrides)
    return fo.Policy(**fields)


def left_padded_mask(b, s, pads):
    """FlexGen's attention mask: bool ``(b, s)``, True = attend, ``pads[i]`` leading pad tokens."""
    mask = torch.ones(b, s, dtype=torch.bool)
    for i, p in enumerate(pads):
        mask[i, :p] = False
    return mask


def flexgen_attention(device, q, k_all, v_all, mask, n_head):
    """FlexGen's own dense decode attention (``_attention_value``) in float32, from FlexGen's cache
    layout ``(s, b*n_head, d)`` and a pre-scaled ``q [b, n_head, d]``; returns ``[b, n_head, d]``."""
    s, bn, d = k_all.shape
    b = bn // n_head
    value = device._attention_value(
        q.reshape(bn, 1, d).float(),
        k_all.permute(1, 2, 0).float(),
        v_all.permute(1, 0, 2).float(),
        mask,
        b,
        s,
        1,
        n_head,
        d,
    )
    return value.view(b, n_head, d)


def heads(x, b, n):
    """``(s, b*n, d)`` -> ``[b, n, d]`` for one token (s == 1 squeezed)."""
    return x.view(x.shape[0], b, n, -1).permute(1, 2, 0, 3).squeeze(2)


def new_state(session, *, b, n, d, max_tokens, sinks, gpu_budget):
    return FlexGenLayerCache(
        session, 0, batch=b, n_head=n, head_dim=d, max_tokens=max_tokens, sinks=sinks, gpu_budget=gpu_budget
    )


class AttentionRun:
    """One FlexGen ``SelfAttention`` driven step by step the way ``OptLM.generate`` drives it."""

    def __init__(self, device, weights, policy, cfg, prompt_len, gen_len):
        env = ExecutionEnv(gpu=device, cpu=device, disk=None, mixed=None)
        self.device, self.weights = device, weights
        self.layer = fo.SelfAttention(cfg, env, policy, 0)
        self.layer.set_task(
            Task(
                inputs=None,
                prompt_len=prompt_len,
                gen_len=gen_len,
                cut_gen_len=None,
                do_sample=False,
                temperature=1.0,
                stop=None,
            )
        )
        self.home, self.read, self.write = ValueHolder(), ValueHolder(), ValueHolder()
        self.layer.init_cache_one_gpu_batch(self.home)

    def step(self, i, hidden, mask):
        self.layer.load_cache(self.home, self.read, i)
        w = ValueHolder()
        w.store(tuple((TorchTensor.create_from_torch(t, self.device), False) for t in self.weights))
        h, m = ValueHolder(), ValueHolder()
        h.store(TorchTensor.create_from_torch(hidden.clone(), self.device))
        m.store(TorchTensor.create_from_torch(mask.clone(), self.device))
        self.layer.forward(h, self.read, w, m, self.write, i, 0)
        self.layer.store_cache(self.home, self.write, i)
        return h.val.data


def attention_weights(h, gen):
    """Random OPT attention weights in FlexGen's order (w_q, b_q, ..., w_ln, b_ln), float16."""
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).half()  # noqa: E731
    return (
        r(h, h, s=h**-0.5 * 2),
        r(h, s=0.1),
        r(h, h, s=h**-0.5 * 2),
        r(h, s=0.1),
        r(h, h, s=h**-0.5),
        r(h, s=0.1),
        r(h, h, s=h**-0.5),
        r(h, s=0.1),
        (1 + 0.1 * torch.randn(h, generator=gen)).half(),
        r(h, s=0.1),
    )


def decode_scenario(rng, b, h, n_head, prompt_len, gen_len, pads):
    """One attention layer's config and weights, a prompt, the decode inputs and their masks."""
    cfg = OptConfig(name="opt-test", num_hidden_layers=1, input_dim=h, hidden_size=h, n_head=n_head)
    weights = attention_weights(h, rng)
    prompt = torch.randn(b, prompt_len, h, generator=rng).half()
    steps = [torch.randn(b, 1, h, generator=rng).half() for _ in range(gen_len - 1)]
    masks = [left_padded_mask(b, prompt_len + i, pads) for i in range(gen_len)]
    return cfg, weights, prompt, steps, masks


def run_attention(device, weights, policy, cfg, prompt, steps, masks, gen_len):
    run = AttentionRun(device, weights, policy, cfg, prompt.shape[1], gen_len)
    outs = [run.step(0, prompt, masks[0])]
    for i, x in enumerate(steps, start=1):
        outs.append(run.step(i, x, masks[i]))
    return run, outs


TINY = dict(
    name="opt-tiny",
    num_hidden_layers=2,
    max_seq_len=128,
    hidden_size=64,
    n_head=4,
    input_dim=64,
    ffn_embed_dim=256,
    vocab_size=256,
)


def write_flexgen_weights(path, cfg, seed=0):
    """A random OPT (transformers' OPTForCausalLM) saved in FlexGen's numpy format (the conversion
    FlexGen's own download_opt_weights does). Weights are drawn wider than OPT's initialisation so
    that greedy decoding does not collapse into one repeated token."""
    from transformers import OPTConfig, OPTForCausalLM

    hf_cfg = OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.input_dim,
        num_hidden_layers=cfg.num_hidden_layers,
        ffn_dim=cfg.ffn_embed_dim,
        num_attention_heads=cfg.n_head,
        word_embed_proj_dim=cfg.input_dim,
        max_position_embeddings=cfg.max_seq_len,
        pad_token_id=cfg.pad_token_id,
    )
    model = OPTForCausalLM(hf_cfg)
    gen = torch.Generator().manual_seed(seed)
    out = Path(path) / f"{cfg.name}-np"
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            value = torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1)
            if "layer_norm.weight" in name:
                value += 1.0
            name = name.replace("decoder.final_layer_norm", "decoder.layer_norm")
            np.save(out / name, value.half().numpy(), allow_pickle=False)
            os.replace(out / f"{name}.npy", out / name)  # FlexGen's file names have no suffix


def generate(device, path, prompts, gen_len, **policy):
    env = ExecutionEnv(gpu=device, cpu=device, disk=None, mixed=None)
    model = fo.OptLM(OptConfig(**TINY), env, path, flex_policy(**policy))
    return model.generate(prompts, max_new_tokens=gen_len)
