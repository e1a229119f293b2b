"""convert.py against diffusers, the independent reference.

- Parity: for every real architecture (SD1.5, SD2.1 base, SD2.1-768, PixArt-alpha 512 and 1024, the
  SD VAE) and the tiny presets, a diffusers model with seeded random weights is saved as a
  diffusers folder, converted, loaded as ours, and both are run on the same inputs in float32.
- Original layouts: the SD single-file key map is checked against diffusers' own LDM converters
  on a state dict written from the original network's construction order (itself checked by
  diffusers' converter landing exactly on a diffusers model's keys and shapes); the PixArt .pth
  path against a .pth fused by hand from a diffusers model, following the original's layout.
- Round trips back to diffusers, and every bad input ends in one clear line.

Run with -s to see the measured parity errors.
"""
import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert  # noqa: E402
import model as M  # noqa: E402

diffusers = pytest.importorskip('diffusers')
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

TOL = 1e-4  # max |ours - ref| / max |ref|, float32
ERRORS = {}  # measured parity errors, printed at the end of the module

# -----------------------------------------------------------------------------
# Real and tiny architectures, written as diffusers configs (the reference side)

CROSS3 = dict(down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
              up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3, block_out_channels=[320, 640, 1280, 1280],
              layers_per_block=2, sample_size=64)
SD15_UNET = dict(CROSS3, cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(CROSS3, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SD21_768_UNET = dict(SD21_UNET, sample_size=96, upcast_attention=True)
TINY_UNET = dict(down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
                 up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D'], block_out_channels=[32, 64], layers_per_block=1,
                 cross_attention_dim=32, attention_head_dim=2, sample_size=16)
PIXART_512 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                  patch_size=2, cross_attention_dim=1152, caption_channels=4096, sample_size=64)
PIXART_1024 = dict(PIXART_512, sample_size=128)  # diffusers' defaults: interpolation 2, size conditioning
TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                patch_size=2, cross_attention_dim=32, caption_channels=32, sample_size=16)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=['DownEncoderBlock2D'] * 4,
              up_block_types=['UpDecoderBlock2D'] * 4, layers_per_block=2, latent_channels=4, sample_size=512)
TINY_VAE = dict(block_out_channels=[32, 64], down_block_types=['DownEncoderBlock2D'] * 2,
                up_block_types=['UpDecoderBlock2D'] * 2, layers_per_block=1, latent_channels=4)
SD_SCHED = dict(_class_name='PNDMScheduler', beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                num_train_timesteps=1000, prediction_type='epsilon', steps_offset=1, skip_prk_steps=True)
V_SCHED = dict(SD_SCHED, _class_name='EulerDiscreteScheduler', prediction_type='v_prediction')
PIXART_SCHED = dict(_class_name='DPMSolverMultistepScheduler', beta_start=0.0001, beta_end=0.02,
                    beta_schedule='linear', num_train_timesteps=1000, prediction_type='epsilon')


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def record(name, err):
    ERRORS[name] = err
    print(f"\nparity {name}: max|ours-ref|/max|ref| = {err:.2e}")
    assert err <= TOL, f"{name}: {err:.2e} > {TOL}"


@pytest.fixture(scope='module', autouse=True)
def report():
    yield
    print('\nparity errors (max|ours-ref|/max|ref|, float32):')
    for name, err in ERRORS.items():
        print(f"  {name:28s} {err:.2e}")


def randomized(cls, config, seed):
    """A diffusers model with seeded random weights, fast at SD's size: built without running its
    initialisers (on the meta device through accelerate where available; buffers stay real), then
    filled from a prime-length pool of normals at random offsets. The values are exact in float16,
    so the big models can travel as float16 files with float32 parity unaffected."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        from contextlib import nullcontext as init_empty_weights
    with init_empty_weights():
        net = cls.from_config(config)
    g = torch.Generator().manual_seed(seed)
    P = 1_000_003
    pool = torch.randn(P, generator=g)
    for name, module in net.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            start, n = int(torch.randint(P, (1,), generator=g)), p.numel()
            t = pool.repeat((start + n) // P + 1)[start:start + n].reshape(p.shape)
            if p.ndim >= 2:       # weights: unit-variance activations (PixArt's tables: D columns)
                t = t / (p[0].numel() ** 0.5)
            elif 'norm' in name and pname == 'weight':
                t = 1 + 0.1 * t
            else:
                t = 0.1 * t
            module._parameters[pname] = torch.nn.Parameter(t.half().float(), requires_grad=False)
    return net.eval()


def save_diffusers(folder, scheduler, **components):
    """A diffusers folder: scheduler/scheduler_config.json and each component (unet=..., vae=...)."""
    folder = Path(folder)
    for sub, net in components.items():
        net.save_pretrained(folder / sub)
    (folder / 'scheduler').mkdir(parents=True, exist_ok=True)
    (folder / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(scheduler))
    return folder


def run(*args):
    """convert.py in-process; returns its one error line, or None when it succeeded."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            convert.main([str(a) for a in args])
    except SystemExit as e:
        assert e.code != 0 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        return err.getvalue().strip()
    return None


def converted(*args):
    err = run(*args)
    assert err is None, err


def load_ours(folder, name='denoiser'):
    """Our network from a written checkpoint, strictly (without model.load_module's slow random init)."""
    path = Path(folder) / f'{name}.safetensors'
    return convert.load_strict(M.config_from_metadata(path), convert.read_tensors(path), path).float()


def unet_inputs(cfg, batch=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg['in_channels'] if 'in_channels' in cfg else 4, size, size, generator=g),
            torch.tensor([500, 20][:batch]), torch.randn(batch, 8, cfg['cross_attention_dim'], generator=g))


# -----------------------------------------------------------------------------
# Parity through diffusers folders: real architectures


@torch.no_grad()
def unet_parity(tmp_path, variants):
    """variants: (name, diffusers config, scheduler config, our preset, prediction type), all of one
    UNet architecture (SD2.1 base and 768 differ only in sample size and scheduler): one set of
    weights, one diffusers folder per variant, each converted and compared."""
    ref_net = randomized(diffusers.UNet2DConditionModel, variants[0][1], seed=1)
    x, t, ctx = unet_inputs(variants[0][1], size=8)
    ref = ref_net(x, t, encoder_hidden_states=ctx).sample
    ref_net.half().save_pretrained(tmp_path / 'src' / 'unet')
    del ref_net
    gc.collect()
    for name, config, scheduler, preset, prediction_type in variants:
        full = json.loads((tmp_path / 'src' / 'unet' / 'config.json').read_text())
        (tmp_path / 'src' / 'unet' / 'config.json').write_text(json.dumps(dict(full, **config)))
        src = save_diffusers(tmp_path / 'src', scheduler)
        assert convert.unet_config(dict(full, **config)) == M.PRESETS[preset]
        converted(src, tmp_path / 'ours', '--no-text', '--dtype', 'float16')
        assert json.loads((tmp_path / 'ours' / 'schedule.json').read_text())['prediction_type'] == prediction_type
        assert M.config_from_metadata(tmp_path / 'ours' / 'denoiser.safetensors') == M.PRESETS[preset]
        record(name, rel_err(load_ours(tmp_path / 'ours')(x, t, ctx), ref))
        gc.collect()


def test_sd15_unet_parity_and_round_trip(tmp_path):
    unet_parity(tmp_path, [('sd15 unet', SD15_UNET, SD_SCHED, 'sd15', 'epsilon')])
    # ours -> diffusers: the very same tensors, a config diffusers reads back to the same network
    converted(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers', '--no-text', '--dtype', 'float16')
    src = convert.read_tensors(tmp_path / 'src' / 'unet' / 'diffusion_pytorch_model.safetensors')
    back = convert.read_tensors(tmp_path / 'back' / 'unet' / 'diffusion_pytorch_model.safetensors')
    assert src.keys() == back.keys()
    assert all(torch.equal(src[k], back[k]) for k in src)
    config = diffusers.UNet2DConditionModel.load_config(tmp_path / 'back' / 'unet')
    with torch.device('meta'):
        empty = diffusers.UNet2DConditionModel.from_config(config)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in back.items()}
    assert convert.unet_config(config) == M.PRESETS['sd15']
    shutil.rmtree(tmp_path)


def test_sd21_base_and_768_v_prediction_unet_parity(tmp_path):
    unet_parity(tmp_path, [('sd21 unet', SD21_UNET, SD_SCHED, 'sd21', 'epsilon'),
                           ('sd21_768 unet (v)', SD21_768_UNET, V_SCHED, 'sd21_768', 'v_prediction')])
    shutil.rmtree(tmp_path)


def pixart_inputs(config, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 8, config['caption_channels'], generator=g)
    mask = torch.ones(batch, 8, dtype=torch.bool)
    mask[-1, 5:] = False  # the last caption is padded
    return x, torch.tensor([700, 30][:batch]), ctx, mask


def pixart_ref(net, x, t, ctx, mask, size_cond):
    B = x.shape[0]
    cond = dict(resolution=torch.tensor([[1024.0, 768.0]]).expand(B, 2),
                aspect_ratio=torch.tensor([[0.75]]).expand(B, 1))
    out = net(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask.float(),
              added_cond_kwargs=cond if size_cond else {'resolution': None, 'aspect_ratio': None}).sample
    return out, (cond if size_cond else {})


def pixart_pth_from_diffusers(sd, null_caption, pos_embed):
    """The original PixArt.py / PixArtMS.py state dict, written from its own modules: x_embedder
    (PatchEmbed), t_embedder.mlp (Linear, SiLU, Linear), t_block (SiLU, Linear), y_embedder.y_proj
    (timm Mlp fc1/fc2) with the y_embedding buffer, csize/ar_embedder.mlp, and per block attn.qkv
    (one Linear whose output reshapes to (3, heads, head_dim): q, k, v row blocks), attn.proj,
    cross_attn.q_linear, cross_attn.kv_linear ((2, heads, head_dim): k, v), cross_attn.proj,
    mlp.fc1/fc2, scale_shift_table; final_layer.linear and .scale_shift_table; pos_embed buffer."""
    out = {'pos_embed': pos_embed, 'y_embedder.y_embedding': null_caption}
    simple = {'pos_embed.proj': 'x_embedder.proj', 'adaln_single.linear': 't_block.1',
              'proj_out': 'final_layer.linear', 'caption_projection.linear_1': 'y_embedder.y_proj.fc1',
              'caption_projection.linear_2': 'y_embedder.y_proj.fc2'}
    for theirs, orig in [('timestep_embedder', 't_embedder'), ('resolution_embedder', 'csize_embedder'),
                         ('aspect_ratio_embedder', 'ar_embedder')]:
        simple[f'adaln_single.emb.{theirs}.linear_1'] = f'{orig}.mlp.0'
        simple[f'adaln_single.emb.{theirs}.linear_2'] = f'{orig}.mlp.2'
    out['final_layer.scale_shift_table'] = sd['scale_shift_table']
    for key in sd:
        module, _, leaf = key.rpartition('.')
        if module in simple:
            out[f'{simple[module]}.{leaf}'] = sd[key]
    n = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('transformer_blocks.'))
    for i in range(n):
        d, o = f'transformer_blocks.{i}.', f'blocks.{i}.'
        out[o + 'scale_shift_table'] = sd[d + 'scale_shift_table']
        for leaf in ('weight', 'bias'):
            out[f'{o}attn.qkv.{leaf}'] = torch.cat([sd[f'{d}attn1.to_{x}.{leaf}'] for x in 'qkv'])
            out[f'{o}cross_attn.kv_linear.{leaf}'] = torch.cat([sd[f'{d}attn2.to_{x}.{leaf}'] for x in 'kv'])
            for theirs, orig in [('attn1.to_out.0', 'attn.proj'), ('attn2.to_q', 'cross_attn.q_linear'),
                                 ('attn2.to_out.0', 'cross_attn.proj'), ('ff.net.0.proj', 'mlp.fc1'),
                                 ('ff.net.2', 'mlp.fc2')]:
                out[f'{o}{orig}.{leaf}'] = sd[f'{d}{theirs}.{leaf}']
    return out


@pytest.fixture(scope='module')
def tiny_vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tiny_vae')
    randomized(diffusers.AutoencoderKL, TINY_VAE, seed=5).save_pretrained(folder / 'vae')
    return folder


@torch.no_grad()
def pixart_parity(tmp_path, name, config, preset, vae_folder):
    ref_net = randomized(diffusers.PixArtTransformer2DModel, config, seed=2)
    assert convert.dit_config(ref_net.config) == M.PRESETS[preset]
    x, t, ctx, mask = pixart_inputs(config)
    size_cond = M.PRESETS[preset].size_conditioning
    ref, cond = pixart_ref(ref_net, x, t, ctx, mask, size_cond)
    src = save_diffusers(tmp_path / 'src', PIXART_SCHED, transformer=ref_net.half())
    # The same weights as an original .pth, with the pos_embed buffer the original saves.
    D, N = M.PRESETS[preset].dim, (config['sample_size'] // 2) ** 2
    null_caption = torch.randn(120, config['caption_channels']).half()
    pth = pixart_pth_from_diffusers(ref_net.state_dict(), null_caption, torch.zeros(1, N, D).half())
    torch.save({'state_dict': pth}, tmp_path / 'model.pth')
    want = {convert.to_ours(k): v for k, v in ref_net.state_dict().items()}
    del ref_net, pth
    gc.collect()
    converted(src, tmp_path / 'ours', '--no-text', '--dtype', 'float16')
    ours_net = load_ours(tmp_path / 'ours')
    record(name, rel_err(ours_net(x, t, ctx, mask, **cond), ref))
    assert json.loads((tmp_path / 'ours' / 'schedule.json').read_text()) == asdict(M.SCHEDULES['pixart'])
    del ours_net
    gc.collect()
    # The .pth path: architecture read off the shapes, the exact diffusers tensors recovered.
    converted(tmp_path / 'model.pth', tmp_path / 'from_pth', '--vae', vae_folder, '--no-text', '--dtype', 'float16')
    from_pth = convert.read_tensors(tmp_path / 'from_pth' / 'denoiser.safetensors')
    assert M.config_from_metadata(tmp_path / 'from_pth' / 'denoiser.safetensors') == M.PRESETS[preset]
    assert from_pth.keys() == want.keys()
    assert all(torch.equal(from_pth[k], want[k]) for k in want)
    null = convert.read_tensors(tmp_path / 'from_pth' / 'null_caption.safetensors')['null_caption']
    assert torch.equal(null, null_caption)
    shutil.rmtree(tmp_path)


def test_pixart_512_parity_and_pth(tmp_path, tiny_vae_folder):
    pixart_parity(tmp_path, 'pixart_alpha_512', PIXART_512, 'pixart_alpha_512', tiny_vae_folder)


def test_pixart_1024_parity_and_pth(tmp_path, tiny_vae_folder):
    pixart_parity(tmp_path, 'pixart_alpha_1024', PIXART_1024, 'pixart_alpha_1024', tiny_vae_folder)


@torch.no_grad()
def vae_parity(tmp_path, name, config, preset, size):
    ref_net = randomized(diffusers.AutoencoderKL, config, seed=3)
    assert convert.vae_config(ref_net.config) == M.PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 3, size, size, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    sf = ref_net.config.scaling_factor
    ref_enc = ref_net.encode(x).latent_dist.mean * sf
    ref_dec = ref_net.decode(z / sf).sample
    tiny_unet = randomized(diffusers.UNet2DConditionModel, TINY_UNET, 0)  # a folder needs a denoiser
    src = save_diffusers(tmp_path / 'src', SD_SCHED, unet=tiny_unet, vae=ref_net)
    converted(src, tmp_path / 'ours', '--no-text')
    vae = load_ours(tmp_path / 'ours', 'vae')
    record(f'{name} encode', rel_err(vae.encode(x, generator=False), ref_enc))
    record(f'{name} decode', rel_err(vae.decode(z), ref_dec))
    return src


def test_sd_vae_parity(tmp_path):
    vae_parity(tmp_path, 'sd_vae', SD_VAE, 'sd_vae', 32)
    shutil.rmtree(tmp_path)


# -----------------------------------------------------------------------------
# Tiny presets, through the whole path: text encoder, load_checkpoint, export, diffusers pipelines


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
    import shapes
    folder = tmp_path_factory.mktemp('clip')
    shapes.make_text_encoder(str(folder), seed=0, hidden_size=32)
    return folder


@torch.no_grad()
def test_tiny_unet_full_pipeline_and_round_trip(tmp_path, clip_folder):
    ref_net = randomized(diffusers.UNet2DConditionModel, TINY_UNET, seed=7)
    assert convert.unet_config(ref_net.config) == M.PRESETS['tiny_unet']
    x, t, ctx = unet_inputs(TINY_UNET, batch=2)
    ref = ref_net(x, t, encoder_hidden_states=ctx).sample
    src = save_diffusers(tmp_path / 'src', SD_SCHED, unet=ref_net)
    randomized(diffusers.AutoencoderKL, TINY_VAE, seed=8).save_pretrained(src / 'vae')
    for part in ('text_encoder', 'tokenizer'):
        shutil.copytree(clip_folder / part, src / part)
    converted(src, tmp_path / 'ours')
    pipe = M.load_checkpoint(tmp_path / 'ours')  # the project's own loader, text encoder included
    record('tiny_unet', rel_err(pipe.denoiser(x, t, ctx), ref))
    pipe.denoiser.conv_out.bias[0] += 0.01  # the measure is not blind: one changed number shows
    assert rel_err(pipe.denoiser(x, t, ctx), ref) > TOL
    emb, mask = pipe.text_encoder(['a red circle'])
    assert emb.shape == (1, 8, 32) and mask is None
    pipeline = convert.read_diffusers(src)  # the in-memory path sample.py uses
    assert rel_err(pipeline.denoiser(x, t, ctx), ref) <= TOL and pipeline.text_encoder is not None
    # Back to diffusers: identical tensors in every component, loadable by diffusers' pipeline.
    converted(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers')
    for sub in ('unet', 'vae'):
        a = convert.read_tensors(src / sub / 'diffusion_pytorch_model.safetensors')
        b = convert.read_tensors(tmp_path / 'back' / sub / 'diffusion_pytorch_model.safetensors')
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / 'back', safety_checker=None)
    assert isinstance(sd.scheduler, diffusers.DDIMScheduler)
    assert rel_err(sd.unet(x, t, encoder_hidden_states=ctx).sample, ref) == 0
    image = sd('a red circle', num_inference_steps=1, guidance_scale=1.0, output_type='pt').images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@torch.no_grad()
def test_tiny_dit_parity_mask_and_round_trip(tmp_path, tiny_vae_folder):
    ref_net = randomized(diffusers.PixArtTransformer2DModel, TINY_DIT, seed=9)
    assert convert.dit_config(ref_net.config) == M.PRESETS['tiny_dit']
    x, t, ctx, mask = pixart_inputs(TINY_DIT, batch=2)
    ref, _ = pixart_ref(ref_net, x, t, ctx, mask, False)
    ref_full, _ = pixart_ref(ref_net, x, t, ctx, torch.ones_like(mask), False)
    src = save_diffusers(tmp_path / 'src', PIXART_SCHED, transformer=ref_net)
    converted(src, tmp_path / 'ours', '--no-text', '--vae', tiny_vae_folder)
    dit = M.load_checkpoint(tmp_path / 'ours', text=False).denoiser
    out, out_full = dit(x, t, ctx, mask), dit(x, t, ctx, torch.ones_like(mask))
    record('tiny_dit (masked)', rel_err(out, ref))
    record('tiny_dit (unmasked)', rel_err(out_full, ref_full))
    assert rel_err(out[1], out_full[1]) > 1e-3   # the padding mask matters to the padded caption...
    assert torch.equal(out[0], out_full[0])      # ...and to nothing else
    # .pth with --preset (heads do not show in shapes), and the export back to diffusers
    pth = pixart_pth_from_diffusers(ref_net.state_dict(), torch.randn(120, 32), torch.zeros(1, 64, 32))
    torch.save({'state_dict': pth}, tmp_path / 'tiny.pth')
    converted(tmp_path / 'tiny.pth', tmp_path / 'from_pth', '--preset', 'tiny_dit', '--vae', tiny_vae_folder,
              '--no-text')
    assert rel_err(load_ours(tmp_path / 'from_pth')(x, t, ctx, mask), ref) <= TOL
    converted(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers', '--no-text')
    back = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / 'back' / 'transformer')
    assert rel_err(pixart_ref(back, x, t, ctx, mask, False)[0], ref) == 0
    assert diffusers.AutoencoderKL.from_pretrained(tmp_path / 'back' / 'vae') is not None
    index = json.loads((tmp_path / 'back' / 'model_index.json').read_text())
    assert index['_class_name'] == 'PixArtAlphaPipeline' and index['transformer'][1] == 'PixArtTransformer2DModel'


def test_tiny_vae_parity(tmp_path):
    vae_parity(tmp_path, 'tiny_vae', TINY_VAE, 'tiny_vae', 16)


@torch.no_grad()
@pytest.mark.parametrize('channels_last', [False, True])
def test_folded_upsample_is_nearest_upsample_then_conv(channels_last):
    """The VAE decoder's transposed-conv upsampler computes exactly nearest 2x + 3x3 conv, odd sizes
    and both memory formats included."""
    torch.manual_seed(0)
    up = M.FoldedUpsample(6)
    for h, w in ((1, 1), (5, 7), (8, 8)):
        x = torch.randn(2, 6, h, w)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        out = up(x)
        ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode='nearest'))
        assert out.shape == (2, 6, 2 * h, 2 * w)
        assert (out - ref).abs().max().item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize('layout', [dict(max_shard_size='200KB'), dict(safe_serialization=False)],
                         ids=['sharded safetensors', 'pytorch .bin'])
def test_other_diffusers_weight_files(tmp_path, layout):
    ref_net = randomized(diffusers.UNet2DConditionModel, TINY_UNET, seed=14)
    ref_net.save_pretrained(tmp_path / 'src' / 'unet', **layout)
    names = {p.name for p in (tmp_path / 'src' / 'unet').iterdir()}
    assert 'diffusion_pytorch_model.safetensors' not in names  # really the other layout
    save_diffusers(tmp_path / 'src', SD_SCHED)
    converted(tmp_path / 'src', tmp_path / 'ours', '--no-text')
    x, t, ctx = unet_inputs(TINY_UNET, batch=2)
    assert rel_err(load_ours(tmp_path / 'ours')(x, t, ctx), ref_net(x, t, encoder_hidden_states=ctx).sample) <= TOL


def test_pixel_space_export(tmp_path, clip_folder):
    """The shapes world has no VAE: the export carries the denoiser, scheduler and text parts."""
    net = M.build(M.PRESETS['shapes'])
    M.save_checkpoint(tmp_path / 'ours', net, M.PixelSpace(), M.NoiseSchedule(M.SCHEDULES['sd']), clip_folder)
    converted(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers')
    index = json.loads((tmp_path / 'back' / 'model_index.json').read_text())
    assert index['vae'] == [None, None] and not (tmp_path / 'back' / 'vae').exists()
    assert index['text_encoder'] == ['transformers', 'CLIPTextModel'] and index['tokenizer'][1] == 'CLIPTokenizer'
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / 'back' / 'unet')
    x, t, ctx = torch.randn(1, 3, 8, 8), torch.tensor([10]), torch.randn(1, 8, 64)
    with torch.no_grad():
        assert rel_err(net(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample) <= TOL


@pytest.mark.parametrize('name', ['sd', 'sd_v', 'pixart'])
def test_schedule_matches_diffusers(name):
    s = M.SCHEDULES[name]
    ref = diffusers.DDIMScheduler.from_config(convert.diffusers_scheduler_config(s))
    ours = M.NoiseSchedule(convert.schedule(dict(ref.config)))
    assert ours.config == s
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-6)
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    want = ref.get_velocity(x0, eps, t) if s.prediction_type == 'v_prediction' else eps
    assert torch.allclose(ours.target(x0, eps, t), want, atol=1e-6)


# -----------------------------------------------------------------------------
# Original SD single files: the key maps against diffusers' LDM converters


def ldm_unet_layout(c):
    """key -> shape of the original openaimodel.UNetModel with SpatialTransformers, written from its
    construction order: input_blocks (conv_in; per level, resnet + transformer pairs, then a
    downsampler 'op'), middle_block (resnet, transformer, resnet), output_blocks (per level from the
    bottom, L+1 resnet + transformer pairs, the last followed by an upsampler), out (norm, conv)."""
    S, C, L, emb = {}, c.channels, c.layers_per_block, 4 * c.channels[0]

    def param(name, *shape, bias=True):
        S[name + '.weight'] = shape
        if bias:
            S[name + '.bias'] = shape[:1]

    def res(name, cin, cout):
        param(f'{name}.in_layers.0', cin), param(f'{name}.in_layers.2', cout, cin, 3, 3)
        param(f'{name}.emb_layers.1', cout, emb)
        param(f'{name}.out_layers.0', cout), param(f'{name}.out_layers.3', cout, cout, 3, 3)
        if cin != cout:
            param(f'{name}.skip_connection', cout, cin, 1, 1)

    def transformer(name, ch, depth):
        param(f'{name}.norm', ch)
        for p in ('proj_in', 'proj_out'):
            param(f'{name}.{p}', *((ch, ch) if c.linear_proj else (ch, ch, 1, 1)))
        for d in range(depth):
            b = f'{name}.transformer_blocks.{d}'
            for attn, kv in (('attn1', ch), ('attn2', c.context_dim)):
                param(f'{b}.{attn}.to_q', ch, ch, bias=False)
                param(f'{b}.{attn}.to_k', ch, kv, bias=False), param(f'{b}.{attn}.to_v', ch, kv, bias=False)
                param(f'{b}.{attn}.to_out.0', ch, ch)
            param(f'{b}.ff.net.0.proj', 8 * ch, ch), param(f'{b}.ff.net.2', ch, 4 * ch)
            for i in (1, 2, 3):
                param(f'{b}.norm{i}', ch)

    param('time_embed.0', emb, C[0]), param('time_embed.2', emb, emb)
    if c.addition_embed:  # SDXL: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        param('label_emb.0.0', emb, c.pooled_dim + 6 * c.addition_time_dim), param('label_emb.0.2', emb, emb)
    param('input_blocks.0.0', C[0], c.in_channels, 3, 3)
    ch, skips, n = C[0], [C[0]], 1
    for level, cout in enumerate(C):
        for _ in range(L):
            res(f'input_blocks.{n}.0', ch, cout)
            ch = cout
            if c.attn_levels[level]:
                transformer(f'input_blocks.{n}.1', ch, c.depth(level))
            skips.append(ch)
            n += 1
        if level < len(C) - 1:
            param(f'input_blocks.{n}.0.op', ch, ch, 3, 3)
            skips.append(ch)
            n += 1
    res('middle_block.0', ch, ch), transformer('middle_block.1', ch, c.mid_depth), res('middle_block.2', ch, ch)
    n = 0
    for level in reversed(range(len(C))):
        for j in range(L + 1):
            res(f'output_blocks.{n}.0', ch + skips.pop(), C[level])
            ch, i = C[level], 1
            if c.attn_levels[level]:
                transformer(f'output_blocks.{n}.1', ch, c.depth(level))
                i = 2
            if level and j == L:
                param(f'output_blocks.{n}.{i}.conv', ch, ch, 3, 3)
            n += 1
    param('out.0', C[0]), param('out.2', c.out_channels, C[0], 3, 3)
    return S


def ldm_vae_layout(c):
    """key -> shape of the original AutoencoderKL (ldm/modules/diffusionmodules/model.py): the
    decoder's up.i is resolution level i, built from the bottom (up.{n-1} runs first); the mid
    attention's q, k, v, proj_out are 1x1 convolutions."""
    S, C, L, z = {}, c.channels, c.layers_per_block, c.latent_channels

    def param(name, *shape):
        S[name + '.weight'], S[name + '.bias'] = shape, shape[:1]

    def res(name, cin, cout):
        param(f'{name}.norm1', cin), param(f'{name}.conv1', cout, cin, 3, 3)
        param(f'{name}.norm2', cout), param(f'{name}.conv2', cout, cout, 3, 3)
        if cin != cout:
            param(f'{name}.nin_shortcut', cout, cin, 1, 1)

    def mid(part, ch):
        res(f'{part}.mid.block_1', ch, ch), res(f'{part}.mid.block_2', ch, ch), param(f'{part}.mid.attn_1.norm', ch)
        for p in ('q', 'k', 'v', 'proj_out'):
            param(f'{part}.mid.attn_1.{p}', ch, ch, 1, 1)

    param('encoder.conv_in', C[0], c.in_channels, 3, 3)
    ch = C[0]
    for i, cout in enumerate(C):
        for j in range(L):
            res(f'encoder.down.{i}.block.{j}', ch, cout)
            ch = cout
        if i < len(C) - 1:
            param(f'encoder.down.{i}.downsample.conv', ch, ch, 3, 3)
    mid('encoder', ch), param('encoder.norm_out', ch), param('encoder.conv_out', 2 * z, ch, 3, 3)
    param('decoder.conv_in', C[-1], z, 3, 3)
    mid('decoder', C[-1])
    for i in reversed(range(len(C))):
        for j in range(L + 1):
            res(f'decoder.up.{i}.block.{j}', ch, C[i])
            ch = C[i]
        if i > 0:
            param(f'decoder.up.{i}.upsample.conv', ch, ch, 3, 3)
    param('decoder.norm_out', C[0]), param('decoder.conv_out', c.in_channels, C[0], 3, 3)
    param('quant_conv', 2 * z, 2 * z, 1, 1), param('post_quant_conv', z, z, 1, 1)
    return S


def numbered(layout, prefix=''):
    """A state dict with each tensor filled with its own index: any misplaced key shows, and
    expanded scalars cost no memory at SD's size."""
    return {prefix + k: torch.tensor(float(i)).expand(shape) for i, (k, shape) in enumerate(sorted(layout.items()))}


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize('preset,config', [('tiny_unet', TINY_UNET), ('sd15', SD15_UNET), ('sd21', SD21_UNET)])
def test_ldm_unet_key_map_matches_diffusers(preset, config):
    cfg = M.PRESETS[preset]
    ldm = numbered(ldm_unet_layout(cfg))
    with torch.device('meta'):
        want = diffusers.UNet2DConditionModel.from_config(config).state_dict()
    ref = convert_ldm_unet_checkpoint({'model.diffusion_model.' + k: v for k, v in ldm.items()}, dict(config, **{
        'layers_per_block': cfg.layers_per_block}))
    assert shapes_of(ref) == shapes_of(want)  # the layout above is the original's, as diffusers reads it
    ours = convert.gather(ldm, convert.ldm_unet_names(cfg), 'test')
    ref = {convert.to_ours(k): v for k, v in ref.items()}
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    inferred = convert.infer_unet_config(ldm, 'test')  # heads do not show in shapes: SD's rule fails tiny_unet
    assert replace(inferred, heads=cfg.heads, sample_size=cfg.sample_size) == cfg
    assert inferred.heads == cfg.heads or preset == 'tiny_unet'


@pytest.mark.parametrize('preset,config', [('tiny_vae', TINY_VAE), ('sd_vae', SD_VAE)])
def test_ldm_vae_key_map_matches_diffusers(preset, config):
    cfg = M.PRESETS[preset]
    ldm = numbered(ldm_vae_layout(cfg))
    with torch.device('meta'):
        want = diffusers.AutoencoderKL.from_config(config).state_dict()
    ref = convert_ldm_vae_checkpoint({'first_stage_model.' + k: v for k, v in ldm.items()}, config)
    assert shapes_of(ref) == shapes_of(want)
    assert convert.infer_vae_config(ldm, 'test') == cfg
    ours = convert.gather(ldm, convert.ldm_vae_names(cfg), 'test')
    ours = {k: v[:, :, 0, 0] if '.attentions.' in k and v.ndim == 4 else v for k, v in ours.items()}
    ref = {convert.to_ours(k): v for k, v in ref.items()}
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def open_clip_layout(width, layers, vocab, positions):
    S = {'token_embedding.weight': (vocab, width), 'positional_embedding': (positions, width),
         'ln_final.weight': (width,), 'ln_final.bias': (width,), 'text_projection': (width, width)}
    for i in range(layers):
        b = f'transformer.resblocks.{i}.'
        S.update({b + 'attn.in_proj_weight': (3 * width, width), b + 'attn.in_proj_bias': (3 * width,),
                  b + 'attn.out_proj.weight': (width, width), b + 'attn.out_proj.bias': (width,),
                  b + 'mlp.c_fc.weight': (2 * width, width), b + 'mlp.c_fc.bias': (2 * width,),
                  b + 'mlp.c_proj.weight': (width, 2 * width), b + 'mlp.c_proj.bias': (width,)})
        for n in ('ln_1', 'ln_2'):
            S[f'{b}{n}.weight'] = S[f'{b}{n}.bias'] = (width,)
    return S


def test_open_clip_key_map_matches_diffusers():
    oc = {k: torch.randn(s) for k, s in open_clip_layout(32, 3, 50, 8).items()}
    ref = convert_open_clip_checkpoint(None, {'cond_stage_model.model.' + k: v for k, v in oc.items()})
    # SD2 runs the penultimate layer: the last block and the projection head are not used.
    ref = {k: v for k, v in ref.items() if 'layers.2.' not in k and k != 'text_projection.weight'}
    used = {k: v for k, v in oc.items() if 'resblocks.2.' not in k and k != 'text_projection'}
    ours = convert.gather(used, convert.open_clip_names(2), 'test')
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def ldm_from_diffusers(layout, state, converter, prefix):
    """A real single file's section from a diffusers model: each original key gets the tensor that
    diffusers' own converter maps it to (found through the numbered values)."""
    ldm = numbered(layout, prefix)
    where = {int(v.flatten()[0]): k for k, v in converter(ldm).items()}
    keys = sorted(layout)
    return {prefix + k: state[where[i]].reshape(layout[k]).contiguous() for i, k in enumerate(keys)}


@torch.no_grad()
@pytest.mark.parametrize('text', ['clip', 'clip_flat', 'open_clip'])
def test_sd_single_file_end_to_end(tmp_path, clip_folder, text):
    """tiny_unet + tiny_vae + a text encoder as an original single file (SD1's CLIP or SD2's
    OpenCLIP); the tokenizer and text config from a diffusers folder or one flat transformers folder."""
    unet = randomized(diffusers.UNet2DConditionModel, TINY_UNET, seed=11)
    vae = randomized(diffusers.AutoencoderKL, TINY_VAE, seed=12)
    cfg, vcfg = M.PRESETS['tiny_unet'], M.PRESETS['tiny_vae']
    sd = ldm_from_diffusers(ldm_unet_layout(cfg), unet.state_dict(),
                            lambda d: convert_ldm_unet_checkpoint(d, TINY_UNET), 'model.diffusion_model.')
    sd.update(ldm_from_diffusers(ldm_vae_layout(vcfg), vae.state_dict(),
                                 lambda d: convert_ldm_vae_checkpoint(d, TINY_VAE), 'first_stage_model.'))
    te = convert.read_tensors(clip_folder / 'text_encoder' / 'model.safetensors')
    te = {k if k.startswith('text_model.') else 'text_model.' + k: v for k, v in te.items()}  # either on-disk naming
    te = {k: torch.randn(v.shape) for k, v in te.items()}
    text_dir = clip_folder
    if text == 'clip_flat':  # a transformers folder: model and tokenizer files side by side
        text_dir = tmp_path / 'flat'
        shutil.copytree(clip_folder / 'text_encoder', text_dir)
        shutil.copytree(clip_folder / 'tokenizer', text_dir, dirs_exist_ok=True)
    if text != 'open_clip':  # SD1: transformers' CLIP inside the LDM wrapper
        sd.update({'cond_stage_model.transformer.' + k: v for k, v in te.items()})
    else:               # SD2: OpenCLIP, one block more than the penultimate-layer encoder uses
        vocab = te['text_model.embeddings.token_embedding.weight'].shape[0]
        oc = {k: torch.randn(s) for k, s in open_clip_layout(32, 3, vocab, 8).items()}
        sd.update({'cond_stage_model.model.' + k: v for k, v in oc.items()})
        te = convert.gather({k: v for k, v in oc.items() if 'resblocks.2.' not in k and k != 'text_projection'},
                            convert.open_clip_names(2), 'test')
    sd['alphas_cumprod'] = M.NoiseSchedule(M.SCHEDULES['sd']).alphas_cumprod.double()
    sd['model_ema.decay'] = torch.tensor(0.9999)
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / 'model.safetensors'))
    err = run(tmp_path / 'model.safetensors', tmp_path / 'ours', '--preset', 'tiny_unet')
    assert err.startswith('convert.py: error:') and 'tokenizer' in err and '--text-encoder' in err
    converted(tmp_path / 'model.safetensors', tmp_path / 'ours', '--preset', 'tiny_unet', '--text-encoder', text_dir)
    pipe = M.load_checkpoint(tmp_path / 'ours')
    x, t, ctx = unet_inputs(TINY_UNET, batch=2)
    ref = unet(x, t, encoder_hidden_states=ctx).sample
    record(f'tiny_unet single file ({text})', rel_err(pipe.denoiser(x, t, ctx), ref))
    z = torch.randn(1, 4, 4, 4)
    ref = vae.decode(z / vae.config.scaling_factor).sample
    record(f'tiny_vae single file ({text})', rel_err(pipe.vae.decode(z), ref))
    # the text encoder holds the file's weights, not --text-encoder's
    got = {k: v for k, v in pipe.text_encoder.model.state_dict().items()}
    got = {k if k.startswith('text_model.') else 'text_model.' + k: v for k, v in got.items()}
    assert all(torch.equal(got[k], te[k]) for k in te)


# -----------------------------------------------------------------------------
# Bad inputs: one clear line each, and nothing executed


def cli(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run([sys.executable, str(ROOT / 'convert.py'), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('convert.py: error:'), proc.stderr
    return lines[0]


@pytest.fixture(scope='module')
def tiny_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp('pth') / 'tiny.pth'
    net = randomized(diffusers.PixArtTransformer2DModel, TINY_DIT, seed=13)
    pth = pixart_pth_from_diffusers(net.state_dict(), torch.randn(120, 32), torch.zeros(1, 64, 32))
    torch.save({'state_dict': pth}, path)
    return path


def test_truncated_safetensors_cli(tmp_path):
    from safetensors.torch import save_file
    save_file({'model.diffusion_model.out.2.weight': torch.zeros(4, 32, 3, 3)}, str(tmp_path / 'x.safetensors'))
    data = (tmp_path / 'x.safetensors').read_bytes()
    (tmp_path / 'x.safetensors').write_bytes(data[:len(data) // 2])
    line = cli(tmp_path / 'x.safetensors', tmp_path / 'out')
    assert 'not a readable safetensors file' in line and not (tmp_path / 'out').exists()


def test_pixart_file_as_sd_single_file_cli(tmp_path, tiny_pth):
    line = cli(tiny_pth, tmp_path / 'out', '--from', 'sd-single-file')
    assert 'model.diffusion_model' in line and 'looks like an original PixArt-alpha checkpoint' in line


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'state_dict': {'model.diffusion_model.x': Malicious(marker)}}, tmp_path / 'evil.ckpt')
    err = run(tmp_path / 'evil.ckpt', tmp_path / 'out')
    assert err.startswith('convert.py: error:') and 'would run code' in err and 'system' in err
    assert '\n' not in err and not marker.exists()


def test_folder_errors(tmp_path):
    (tmp_path / 'empty').mkdir()
    err = run(tmp_path / 'empty', tmp_path / 'out')
    assert err.startswith('convert.py: error:') and 'no denoiser' in err
    (tmp_path / 'index_only').mkdir()
    (tmp_path / 'index_only' / 'model_index.json').write_text('{}')
    assert 'no unet/ or transformer/' in run(tmp_path / 'index_only', tmp_path / 'out')
    assert 'does not exist' in run(tmp_path / 'nothing', tmp_path / 'out')


@torch.no_grad()
def test_wrong_architecture_and_shapes_and_config(tmp_path, clip_folder):
    src = save_diffusers(tmp_path / 'src', SD_SCHED, unet=randomized(diffusers.UNet2DConditionModel, TINY_UNET, 0))
    # no text parts and no --no-text
    err = run(src, tmp_path / 'out')
    assert '--text-encoder' in err and '--no-text' in err
    # a config asking for something our UNet does not implement
    config = json.loads((src / 'unet' / 'config.json').read_text())
    (src / 'unet' / 'config.json').write_text(json.dumps(dict(config, time_cond_proj_dim=256)))
    assert 'time_cond_proj_dim=256 is not supported' in run(src, tmp_path / 'out', '--no-text')
    # a shape that disagrees with the config: the key and both shapes are named
    (src / 'unet' / 'config.json').write_text(json.dumps(dict(config, cross_attention_dim=48)))
    err = run(src, tmp_path / 'out', '--no-text')
    assert 'attn2.to_k.weight has shape (64, 32) but our UNet needs (64, 48)' in err
    # a VAE's weights where the UNet's should be
    (src / 'unet' / 'config.json').write_text(json.dumps(config))
    randomized(diffusers.AutoencoderKL, TINY_VAE, 0).save_pretrained(tmp_path / 'vae')
    shutil.copy(tmp_path / 'vae' / 'diffusion_pytorch_model.safetensors', src / 'unet')
    err = run(src, tmp_path / 'out', '--no-text')
    assert 'does not match our UNet' in err and 'keys missing (conv_in.weight' in err
    assert 'looks like a diffusers VAE' in err
    assert '\n' not in err and not (tmp_path / 'out').exists()


def test_pixart_pth_needs_vae_and_preset_kind(tmp_path, tiny_pth):
    assert 'holds no VAE' in run(tiny_pth, tmp_path / 'out', '--no-text')
    (tmp_path / 'vae').mkdir()  # OUT may not lie inside a folder it reads
    err = run(tiny_pth, tmp_path / 'out', '--no-text', '--vae', tmp_path / 'vae', '--preset', 'sd15')
    assert '--preset sd15 is a UNetConfig' in err


# -----------------------------------------------------------------------------
# One-step students to diffusers and back


def same_folder(a, b):
    """Two checkpoint folders with identical weights and schedule.json."""
    for name in ('denoiser.safetensors', 'vae.safetensors'):
        if (Path(a) / name).is_file() or (Path(b) / name).is_file():
            x, y = convert.read_tensors(Path(a) / name), convert.read_tensors(Path(b) / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((Path(a) / 'schedule.json').read_text()) == json.loads((Path(b) / 'schedule.json').read_text())


def test_shipped_student_to_diffusers_and_back(tmp_path):
    src = ROOT / 'checkpoints' / 'shapes_student'
    converted(src, tmp_path / 'diffusers', '--to', 'diffusers')
    converted(tmp_path / 'diffusers', tmp_path / 'back')
    same_folder(src, tmp_path / 'back')
    assert M.load_checkpoint(tmp_path / 'back', text=False).student_t == 999


@torch.no_grad()
@pytest.mark.parametrize('start_t', [999, 600])
def test_latent_student_in_diffusers_draws_what_sample_draws(tmp_path, clip_folder, start_t):
    """A tiny UNet + VAE student exported to diffusers: its own pipeline, one step from the student's
    start timestep (timesteps=[start_t] where that is not T-1), draws our image from the same noise."""
    import sample
    net, vae = seeded_build('tiny_unet', 21), seeded_build('tiny_vae', 22)
    M.save_checkpoint(tmp_path / 'student', net, vae, M.NoiseSchedule(M.SCHEDULES['sd']), text_folder=clip_folder,
                      student_t=start_t)
    converted(tmp_path / 'student', tmp_path / 'diffusers', '--to', 'diffusers')
    converted(tmp_path / 'diffusers', tmp_path / 'back')
    same_folder(tmp_path / 'student', tmp_path / 'back')

    prompts = ['a red circle', 'a blue square']
    ours = sample.generate(sample.load(tmp_path / 'student'), prompts, seed=5)
    # sample.py reads the export itself (in memory) the same way
    assert torch.equal(sample.generate(sample.load(tmp_path / 'diffusers'), prompts, seed=5), ours)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))  # sample.generate's draw
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / 'diffusers', safety_checker=None)
    steps = {} if start_t == 999 else {'timesteps': [start_t]}
    theirs = sd(prompts, num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type='pt', **steps).images
    err = (theirs * 2 - 1 - ours).abs().max().item()
    print(f"\nstudent start {start_t}: diffusers pipeline vs sample.py, max |diff| = {err:.2e}")
    assert err < 1e-4
    if start_t != 999:  # the start timestep matters: diffusers' default one step (t = 999) draws another image
        other = sd(prompts, num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type='pt').images
        assert (other * 2 - 1 - ours).abs().max() > 1e-2


def seeded_build(preset, seed):
    torch.manual_seed(seed)
    return M.build(M.PRESETS[preset])
