"""SDXL against diffusers, the independent reference (float32, seeded random weights).

- The UNet at the real SDXL config (2.6B parameters): diffusers' model is built without memory
  behind its weights, each weight then a view into a few shared pools of seeded normals (one per
  fan-in), so the whole network holds ~0.5 GB instead of 10 GB. Our UNet receives those very
  tensors through the converter's in-memory path (config, renames, strict load), and both run one
  forward on small latents with several sizes and crops in the added embedding.
- A tiny SDXL-shaped pipeline through files: diffusers folder -> ours -> diffusers (identical
  tensors, loadable by diffusers), the dual text encoder against diffusers' own prompt encoding.
- The original single file, key by key against diffusers' converters at the real config.

Run with -s to see the measured errors, time and memory.
"""
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert  # noqa: E402
import model as M  # noqa: E402

diffusers = pytest.importorskip('diffusers')

TOL = 1e-4  # max |ours - ref| / max |ref|

SDXL_UNET = dict(down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
                 up_block_types=['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
                 addition_embed_type='text_time', addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
TINY_SDXL_UNET = dict(SDXL_UNET, block_out_channels=[32, 64], down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
                      up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D'], layers_per_block=1, cross_attention_dim=64,
                      attention_head_dim=[2, 2], transformer_layers_per_block=[1, 2], addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=16)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def pooled_views(cls, config, seed):
    """A diffusers model whose weights are seeded normals, each a view into a pool shared by all
    weights of its kind: fan-in f (scaled by 1/sqrt(f), unit-variance activations), norm scales
    (1 + 0.1 n) and biases (0.1 n). Random offsets into a prime-length base make each layer's
    weights differ. Memory: the pools, not the network."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        net = cls.from_config(config)
    params = [(name, m, pn, p) for name, m in net.named_modules() for pn, p in m._parameters.items() if p is not None]
    kind = lambda name, pn, p: (p[0].numel() if p.ndim >= 2 else 'norm' if 'norm' in name and pn == 'weight' else 'bias')
    P = 1_000_003
    sizes = {}
    for name, _, pn, p in params:
        k = kind(name, pn, p)
        sizes[k] = max(sizes.get(k, 0), p.numel() + P)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(sizes.values()), generator=g).half().float()  # exact in float16, like test_convert
    pools = {k: base[:n] / k ** 0.5 if isinstance(k, int) else 1 + 0.1 * base[:n] if k == 'norm' else 0.1 * base[:n]
             for k, n in sizes.items()}
    del base
    for name, module, pn, p in params:
        start = int(torch.randint(P, (1,), generator=g))
        view = pools[kind(name, pn, p)][start:start + p.numel()].view(p.shape)
        module._parameters[pn] = torch.nn.Parameter(view, requires_grad=False)
    return net.eval()


def added_inputs(batch, pooled_dim, seed=0):
    """Pooled text and size/crop ids: three sizes, with and without crops."""
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(batch, pooled_dim, generator=g)
    ids = torch.tensor([[1024., 1024., 0., 0., 1024., 1024.], [512., 768., 64., 32., 512., 512.],
                        [768., 1344., 0., 128., 832., 1216.]])[:batch]
    return pooled, ids


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


@torch.no_grad()
def test_sdxl_unet_parity_at_the_real_config():
    t0 = time.time()
    ref_net = pooled_views(diffusers.UNet2DConditionModel, SDXL_UNET, seed=21)
    cfg = convert.unet_config(dict(ref_net.config))
    assert cfg == M.PRESETS['sdxl']
    ours = convert.load_strict(cfg, {convert.to_ours(k): v for k, v in ref_net.state_dict().items()}, 'sdxl')
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref_net.parameters()) > 2.5e9
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 8, 2048, generator=g)
    t = torch.tensor([999, 500, 20])
    pooled, ids = added_inputs(3, 1280)
    ref = ref_net(x, t, encoder_hidden_states=ctx, added_cond_kwargs={'text_embeds': pooled, 'time_ids': ids}).sample
    out = ours(x, t, ctx, added=torch.cat([pooled, ids], dim=1))
    errs = [rel_err(out[i], ref[i]) for i in range(3)]
    print(f"\nparity sdxl unet (real config, 8x8 latents; sizes/crops {ids.tolist()}): "
          f"{', '.join(f'{e:.2e}' for e in errs)}; {time.time() - t0:.1f} s, peak RSS {peak_rss_gb():.2f} GiB")
    assert max(errs) <= TOL
    # the added embedding matters: other size ids, another output
    other = ours(x[:1], t[:1], ctx[:1], added=torch.cat([pooled[:1], ids[1:2]], dim=1))
    assert rel_err(other, out[:1]) > 1e-3
