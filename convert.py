"""
Weights in and out: converts a downloaded model into this project's checkpoint folder
(denoiser.safetensors, vae.safetensors, schedule.json, text_encoder/, tokenizer/; see
model.save_checkpoint), or exports one back to a diffusers folder.

Sources, told apart by their layout or named with --from:
  diffusers       a folder with unet/ or transformer/, vae/, scheduler/, text_encoder/, tokenizer/
  sd-single-file  an original Stable Diffusion .safetensors or .ckpt (model.diffusion_model.*, ...)
  pixart-pth      an original PixArt-alpha .pth (x_embedder, blocks.N.attn.qkv, ...)
  ours            a checkpoint folder written by this script or by train.py

  python convert.py stable-diffusion-v1-5 ckpt/sd15
  python convert.py v1-5-pruned-emaonly.safetensors ckpt/sd15 --text-encoder stable-diffusion-v1-5
  python convert.py PixArt-XL-2-512x512.pth ckpt/pixart --text-encoder PixArt-XL-2-512x512 --vae PixArt-XL-2-512x512
  python convert.py ckpt/student out/student-diffusers --to diffusers

Our module names are diffusers' but for RENAMES, so a diffusers folder converts key for key; the
original layouts get key maps generated in loops from the config. Every source tensor is used or
skipped by name, every shape is checked, and loading is strict.
"""
import argparse
import json
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import cli
import model

DIFFUSERS_VERSION = '0.42.1'  # written into exported configs: the version they were checked against

# -----------------------------------------------------------------------------
# Errors, tensor files and key bookkeeping


class ConversionError(cli.UserError):
    """A source we cannot convert. The message is one line that says why."""


def read_tensors(path):
    """Every tensor in a .safetensors file, a sharded *.index.json, or a .bin/.ckpt/.pth. Pickles are
    read with weights_only=True: one that would run code is refused, never executed."""
    path = Path(path)
    if path.name.endswith('.json'):  # a sharded checkpoint's index: {"weight_map": {key: shard}}
        shards = sorted(set(read_json(path).get('weight_map', {}).values()))
        return {k: v for shard in shards for k, v in read_tensors(path.parent / shard).items()}
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path))
        except Exception:
            raise ConversionError(f"{path} is not a readable safetensors file: it is {model.looks_like(path)}") from None
    try:
        with warnings.catch_warnings():  # e.g. about pickle protocols; our message says what matters
            warnings.simplefilter('ignore')
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        call = re.search(r'GLOBAL (\S+)', str(e))  # what the pickle would import and call, e.g. posix.system
        if call:
            raise ConversionError(f"{path} is a pickle that would run code when loaded ({call.group(1)}): "
                                  "refused, only plain tensors are read") from None
        why = re.search(r'WeightsUnpickler error:\s*(.+)', str(e))
        raise ConversionError(f"{path} is not a checkpoint torch.load(weights_only=True) can read"
                              f"{': ' + why.group(1) if why else ''}") from None
    except Exception as e:
        raise ConversionError(f"{path} is not a readable torch checkpoint (truncated?): "
                              f"{type(e).__name__}: {cli.one_line(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):  # .ckpt and .pth files wrap their weights
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path} is not a flat dict of tensors: {bad[0]!r} is a {type(obj[bad[0]]).__name__}")
    if obj and all(k.startswith('module.') for k in obj):  # saved from inside DistributedDataParallel
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    return obj


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {cli.one_line(e)}") from None


# What a file whose keys contain the fragment looks like, and the --from that reads it.
SIGNATURES = [
    ('model.diffusion_model.', 'an original Stable Diffusion single file', 'sd-single-file'),
    ('blocks.0.attn.qkv.', 'an original PixArt-alpha checkpoint', 'pixart-pth'),
    ('x_embedder.proj.', 'an original PixArt-alpha checkpoint', 'pixart-pth'),
    ('adaln_single.', 'a diffusers PixArt transformer', None),
    ('time_embedding.linear_1.', 'a diffusers UNet', None),
    ('input_blocks.', 'an original LDM UNet', None),
    ('encoder.down_blocks.', 'a diffusers VAE', None),
    ('encoder.down.', 'an original LDM VAE', None),
    ('text_model.', 'a CLIP text encoder', None),
    ('transformer.resblocks.', 'an OpenCLIP text encoder', None),
]


def looks_like(keys):
    """'; it looks like X (--from Y)' for the first signature found among keys, or ''."""
    for fragment, what, fmt in SIGNATURES:
        if any(fragment in k for k in keys):
            return f"; it looks like {what}" + (f" (--from {fmt})" if fmt else '')
    return ''


def key_report(missing, unexpected):
    few = lambda keys: ', '.join(keys[:3]) + (', ...' if len(keys) > 3 else '')
    parts = ([f"{len(missing)} keys missing ({few(missing)})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else [])
    return ', '.join(parts) + looks_like(unexpected)


def gather(src, names, source):
    """Our state dict from `src`. names: our key -> source key, or (source key, i, n) for the i-th
    of n row blocks of a fused tensor. Every source key must be used."""
    names = {k: v if isinstance(v, tuple) else (v, 0, 1) for k, v in names.items()}
    needed = {key for key, _, _ in names.values()}
    missing, unexpected = sorted(needed - src.keys()), sorted(src.keys() - needed)
    if missing or unexpected:
        raise ConversionError(f"{source} does not match the expected layout: {key_report(missing, unexpected)}")
    return {ours: src[key] if n == 1 else src[key].chunk(n)[i].clone() for ours, (key, i, n) in names.items()}


def empty(cfg):
    """Our network for cfg with no memory behind its tensors: all of them will come from a file
    (initialising SD's 860M parameters first would take longer than the conversion)."""
    with torch.device('meta'):
        return model.build(cfg)


def load_strict(cfg, state, source):
    """Our network for cfg holding exactly `state` (the tensors themselves, in the file's dtype until
    written out), after naming any missing or unexpected key and any shape that differs."""
    net = empty(cfg)
    want, arch = net.state_dict(), type(net).__name__
    missing, unexpected = [k for k in want if k not in state], [k for k in state if k not in want]
    if missing or unexpected:
        raise ConversionError(f"{source} does not match our {arch}: {key_report(missing, unexpected)}")
    for k, t in state.items():
        if t.shape != want[k].shape:
            raise ConversionError(f"{source}: {k} has shape {tuple(t.shape)} but our {arch} needs "
                                  f"{tuple(want[k].shape)}")
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


# -----------------------------------------------------------------------------
# diffusers <-> ours: the renames, and the config files in both directions

# Our names are diffusers' but for these (diffusers -> ours), applied both ways: diffusers wraps
# layers in Sequentials (to_out.0, ff.net.0.proj) and PixArt's embedders in an extra `emb`.
RENAMES = [('.to_out.0.', '.to_out.'), ('.ff.net.0.proj.', '.ff.proj_in.'), ('.ff.net.2.', '.ff.proj_out.')] + \
          [(f'adaln_single.emb.{e}.', f'adaln_single.{e}.')
           for e in ('timestep_embedder', 'resolution_embedder', 'aspect_ratio_embedder')]


def to_ours(key):
    for theirs, ours in RENAMES:
        key = key.replace(theirs, ours)
    return key


def to_diffusers(key):
    for theirs, ours in RENAMES:
        key = key.replace(ours, theirs)
    return key


# Config fields fixed by what our networks implement: checked when reading, written when exporting.
UNET_FIXED = dict(
    center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, mid_block_type='UNetMidBlock2DCrossAttn',
    only_cross_attention=False, downsample_padding=1, mid_block_scale_factor=1, act_fn='silu', norm_eps=1e-5,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None,
    encoder_hid_dim_type=None, dual_cross_attention=False, class_embed_type=None,
    num_class_embeds=None, resnet_time_scale_shift='default', resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type='positional', time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    attention_type='default', class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None)
DIT_FIXED = dict(norm_type='ada_norm_single', activation_fn='gelu-approximate', attention_bias=True,
                 norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000, attention_type='default')
VAE_FIXED = dict(down_block_types='DownEncoderBlock2D', up_block_types='UpDecoderBlock2D', act_fn='silu',
                 shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                 use_post_quant_conv=True, mid_block_add_attention=True)
SCHEDULE_FIXED = dict(trained_betas=None, rescale_betas_zero_snr=False)


def check_config(d, fixed, what, classes=None):
    if classes and d.get('_class_name', classes[0]) not in classes:
        raise ConversionError(f"{what} is a {d['_class_name']}: only {' or '.join(classes)} can be converted")
    for k, want in fixed.items():
        got = d.get(k, want)
        if not (got == want or isinstance(got, list) and all(g == want for g in got)):
            raise ConversionError(f"{what}: {k}={got!r} is not supported (our network implements {k}={want!r})")


def unet_config(d, what='unet/config.json'):
    check_config(d, UNET_FIXED, what, ('UNet2DConditionModel',))
    downs, ups = list(d['down_block_types']), list(d['up_block_types'])
    for t in downs:
        if t not in ('CrossAttnDownBlock2D', 'DownBlock2D'):
            raise ConversionError(f"{what}: down_block_types has {t}; expected CrossAttnDownBlock2D or DownBlock2D")
    attn = tuple(t == 'CrossAttnDownBlock2D' for t in downs)
    if ups != up_block_types(attn):
        raise ConversionError(f"{what}: up_block_types {ups} do not mirror down_block_types {downs}")
    # diffusers' `attention_head_dim` is, for historical reasons, the number of heads per level.
    heads = d.get('num_attention_heads') or d.get('attention_head_dim', 8)
    depth = d.get('transformer_layers_per_block', 1)  # one for all levels, or per level (SDXL: 1, 2, 10)
    added = d.get('addition_embed_type')
    if added not in (None, 'text_time'):
        raise ConversionError(f"{what}: addition_embed_type={added!r} is not supported (None, or SDXL's 'text_time')")
    time_dim = d.get('addition_time_embed_dim') or 256
    extra = {}
    if added == 'text_time':  # its MLP reads the pooled text and 6 ids, each through a time_dim sinusoid
        extra = dict(addition_embed=added, addition_time_dim=time_dim,
                     pooled_dim=d['projection_class_embeddings_input_dim'] - 6 * time_dim)
    elif d.get('projection_class_embeddings_input_dim') is not None:
        raise ConversionError(f"{what}: projection_class_embeddings_input_dim is set without addition_embed_type")
    return model.UNetConfig(
        transformer_depth=tuple(depth) if isinstance(depth, (list, tuple)) else depth,
        mid_depth=depth[-1] if isinstance(depth, (list, tuple)) else depth, **extra,
        in_channels=d.get('in_channels', 4), out_channels=d.get('out_channels', 4),
        channels=tuple(d['block_out_channels']), attn_levels=attn,
        heads=tuple(heads) if isinstance(heads, list) else (heads,) * len(downs),
        layers_per_block=d.get('layers_per_block', 2), context_dim=d['cross_attention_dim'],
        linear_proj=d.get('use_linear_projection', False), norm_groups=d.get('norm_num_groups', 32),
        sample_size=d.get('sample_size') or 64)


def up_block_types(attn_levels):
    return ['CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn_levels)]


def diffusers_unet_config(c):
    last = c.depth(len(c.channels) - 1)
    if c.mid_depth != last:  # UNet2DConditionModel builds its mid block with transformer_layers_per_block[-1]
        raise ConversionError(f"this UNet's mid block has {c.mid_depth} transformer blocks and its last level {last}: "
                              "diffusers' UNet2DConditionModel cannot express that (it gives the mid block the last "
                              "level's depth); keep it as our checkpoint (--to ours)")
    return dict(UNET_FIXED, _class_name='UNet2DConditionModel', sample_size=c.sample_size,
                in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=list(c.channels),
                down_block_types=['CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in c.attn_levels],
                up_block_types=up_block_types(c.attn_levels), layers_per_block=c.layers_per_block,
                cross_attention_dim=c.context_dim, attention_head_dim=list(c.heads),
                use_linear_projection=c.linear_proj, norm_num_groups=c.norm_groups,
                transformer_layers_per_block=list(c.transformer_depth) if isinstance(c.transformer_depth, tuple)
                else c.transformer_depth, **({} if c.addition_embed is None else dict(
                    addition_embed_type=c.addition_embed, addition_time_embed_dim=c.addition_time_dim,
                    projection_class_embeddings_input_dim=c.pooled_dim + 6 * c.addition_time_dim)))


def dit_config(d, what='transformer/config.json'):
    check_config(d, DIT_FIXED, what, ('PixArtTransformer2DModel', 'Transformer2DModel'))
    heads, head_dim, size = d['num_attention_heads'], d['attention_head_dim'], d['sample_size']
    if d.get('caption_channels') is None:
        raise ConversionError(f"{what}: caption_channels is null, but our DiT always projects T5 captions")
    if d.get('cross_attention_dim') != heads * head_dim:
        raise ConversionError(f"{what}: cross_attention_dim={d.get('cross_attention_dim')} must equal "
                              f"num_attention_heads * attention_head_dim = {heads * head_dim}")
    cond = d.get('use_additional_conditions')  # diffusers' defaults: size conditioning iff 1024 px
    return model.DiTConfig(
        in_channels=d.get('in_channels', 4), out_channels=d.get('out_channels') or d.get('in_channels', 4),
        depth=d['num_layers'], heads=heads, head_dim=head_dim, patch_size=d.get('patch_size', 2),
        caption_channels=d['caption_channels'], sample_size=size,
        interpolation_scale=float(d.get('interpolation_scale') or max(size // 64, 1)),
        size_conditioning=bool(size == 128 if cond is None else cond))


def diffusers_dit_config(c):
    return dict(DIT_FIXED, _class_name='PixArtTransformer2DModel', num_attention_heads=c.heads,
                attention_head_dim=c.head_dim, in_channels=c.in_channels, out_channels=c.out_channels,
                num_layers=c.depth, patch_size=c.patch_size, sample_size=c.sample_size,
                caption_channels=c.caption_channels, cross_attention_dim=c.dim,
                interpolation_scale=c.interpolation_scale, use_additional_conditions=c.size_conditioning)


def vae_config(d, what='vae/config.json'):
    check_config(d, VAE_FIXED, what, ('AutoencoderKL',))
    if d.get('out_channels', 3) != d.get('in_channels', 3):
        raise ConversionError(f"{what}: out_channels={d.get('out_channels')} differs from "
                              f"in_channels={d.get('in_channels')}")
    return model.VAEConfig(in_channels=d.get('in_channels', 3), latent_channels=d.get('latent_channels', 4),
                           channels=tuple(d['block_out_channels']), layers_per_block=d.get('layers_per_block', 1),
                           norm_groups=d.get('norm_num_groups', 32), scaling_factor=d.get('scaling_factor', 0.18215))


def diffusers_vae_config(c):
    n = len(c.channels)
    return dict(VAE_FIXED, _class_name='AutoencoderKL', in_channels=c.in_channels, out_channels=c.in_channels,
                down_block_types=['DownEncoderBlock2D'] * n, up_block_types=['UpDecoderBlock2D'] * n,
                block_out_channels=list(c.channels), layers_per_block=c.layers_per_block,
                latent_channels=c.latent_channels, norm_num_groups=c.norm_groups, scaling_factor=c.scaling_factor)


def schedule(d, what='scheduler/scheduler_config.json'):
    """Any diffusers scheduler's config -> our Schedule; the sampler settings are not ours to keep."""
    check_config(d, SCHEDULE_FIXED, what)
    s = model.Schedule(num_train_timesteps=d.get('num_train_timesteps', 1000), beta_start=d.get('beta_start', 1e-4),
                       beta_end=d.get('beta_end', 0.02), beta_schedule=d.get('beta_schedule', 'linear'),
                       prediction_type=d.get('prediction_type', 'epsilon'))
    for field, allowed in [('beta_schedule', ('linear', 'scaled_linear')),
                           ('prediction_type', ('epsilon', 'v_prediction', 'sample'))]:
        if getattr(s, field) not in allowed:
            raise ConversionError(f"{what}: {field}={getattr(s, field)!r} is not supported ({' or '.join(allowed)})")
    return s


def diffusers_scheduler_config(s, student_t=None):
    """A teacher gets DDIM with "trailing" spacing. A one-step student gets DDPM, whose last step
    returns the network's x0 exactly: one step starts at T-1, or at the student's start timestep
    when the pipeline is called with timesteps=[student_t]; diffusers ignores the _student_t we keep."""
    if student_t is None:
        return dict(SCHEDULE_FIXED, **asdict(s), _class_name='DDIMScheduler', clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, timestep_spacing='trailing')
    return dict(SCHEDULE_FIXED, **asdict(s), _class_name='DDPMScheduler', clip_sample=False, thresholding=False,
                variance_type='fixed_small', steps_offset=1, timestep_spacing='trailing', _student_t=student_t)


def student_t(d, T, what='scheduler/scheduler_config.json'):
    """The start timestep an exported one-step student carries, or None."""
    t = d.get('_student_t')
    if t is not None and not (isinstance(t, int) and 0 <= t < T):
        raise ConversionError(f"{what}: _student_t={t!r} is not a timestep of the schedule (0 to {T - 1})")
    return t


# -----------------------------------------------------------------------------
# Reading diffusers folders and our own checkpoint folders


@dataclass
class Parts:
    """What a converter reads from any source, before it is written out."""
    denoiser: nn.Module
    vae: nn.Module                     # model.VAE, or model.PixelSpace() for pixel-space models
    schedule: model.NoiseSchedule
    text_folder: Path = None           # a folder with text_encoder/ and tokenizer/
    null_caption: torch.Tensor = None  # PixArt's learned unconditional caption (120, 4096), if kept
    student_t: int = None              # a one-step model's start timestep (ONE_STEP)
    student_noise: str = 'unit'        # ... and how its noise is scaled there


WEIGHT_FILES = [f'diffusion_pytorch_model{name}' for name in (
    '.safetensors', '.safetensors.index.json', '.fp16.safetensors', '.safetensors.index.fp16.json',
    '.bin', '.bin.index.json', '.fp16.bin')]  # in order of preference


def read_component(folder, config_fn):
    """A diffusers model folder (config.json + weights): (our network, PixArt's null caption or None)."""
    folder = Path(folder)
    try:
        cfg = config_fn(read_json(folder / 'config.json'), f"{folder / 'config.json'}")
    except KeyError as e:
        raise ConversionError(f"{folder / 'config.json'} has no field {e}") from None
    file = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if file is None:
        raise ConversionError(f"{folder} holds no weights (expected {WEIGHT_FILES[0]})")
    state = {to_ours(k): v for k, v in read_tensors(file).items()}
    # PixArt's null caption embedding: diffusers ignores it where a folder still has it; we keep it.
    null_caption = state.pop('caption_projection.y_embedding', None)
    return load_strict(cfg, state, file), null_caption


def read_vae(folder):
    """A diffusers AutoencoderKL folder, or a pipeline folder with vae/."""
    folder = Path(folder)
    return read_component(folder / 'vae' if (folder / 'vae').is_dir() else folder, vae_config)[0]


def has_text(folder):
    return (Path(folder) / 'text_encoder').is_dir() and (Path(folder) / 'tokenizer').is_dir()


def has_text_2(folder):  # SDXL's second text encoder
    return (Path(folder) / 'text_encoder_2').is_dir() and (Path(folder) / 'tokenizer_2').is_dir()


def diffusers_parts(folder):
    folder = Path(folder)
    sub = next((s for s in ('unet', 'transformer') if (folder / s).is_dir()), None)
    if sub is None:
        raise ConversionError(f"{folder} has no unet/ or transformer/ folder: there is no denoiser to convert")
    denoiser, null_caption = read_component(folder / sub, unet_config if sub == 'unet' else dit_config)
    vae = read_vae(folder) if (folder / 'vae').is_dir() else model.PixelSpace()
    d = read_json(folder / 'scheduler' / 'scheduler_config.json')
    sched = schedule(d)
    return Parts(denoiser, vae, model.NoiseSchedule(sched), folder if has_text(folder) else None, null_caption,
                 student_t(d, sched.num_train_timesteps))


def read_diffusers(folder, device='cpu', dtype=torch.float32, text=True):
    """A diffusers folder as a model.Pipeline, converted in memory: sample.py can run a downloaded
    model without writing a checkpoint first."""
    p = diffusers_parts(folder)
    return model.Pipeline(p.denoiser.to(device, dtype), p.vae.to(device, dtype), p.schedule.to(device),
                          model.TextEncoder(folder).to(device) if text else None, p.student_t)


def ours_parts(folder):
    folder = Path(folder)
    if not (folder / 'denoiser.safetensors').is_file():
        raise ConversionError(f"{folder} is not one of our checkpoints: it has no denoiser.safetensors")

    def read(file):
        try:
            cfg = model.config_from_metadata(folder / file)
        except Exception as e:  # not a safetensors file, or one with no config in its metadata
            raise ConversionError(cli.one_line(e)) from None
        return load_strict(cfg, read_tensors(folder / file), folder / file)
    vae = read('vae.safetensors') if (folder / 'vae.safetensors').is_file() else model.PixelSpace()
    sched, start_t, noise = model.read_schedule(folder)
    null = folder / 'null_caption.safetensors'
    return Parts(read('denoiser.safetensors'), vae, model.NoiseSchedule(sched), folder if has_text(folder) else None,
                 read_tensors(null)['null_caption'] if null.is_file() else None, start_t, noise)


# -----------------------------------------------------------------------------
# Original Stable Diffusion single files (ldm/modules/diffusionmodules/openaimodel.py, model.py)


def translate(key, prefixes, inner):
    """Our key (as its diffusers name) with its longest matching module prefix replaced, then the
    first matching `inner` rename applied to what follows it."""
    key = to_diffusers(key)  # inside the UNet's transformers the LDM names are diffusers' own
    prefix = max((p for p in prefixes if key.startswith(p)), key=len)
    rest = key[len(prefix):]
    rest = next((new + rest[len(old):] for old, new in inner if rest.startswith(old)), rest)
    return prefixes[prefix] + rest


LDM_RESNET = [('norm1.', 'in_layers.0.'), ('conv1.', 'in_layers.2.'), ('time_emb_proj.', 'emb_layers.1.'),
              ('norm2.', 'out_layers.0.'), ('conv2.', 'out_layers.3.'), ('conv_shortcut.', 'skip_connection.')]
LDM_VAE_INNER = [('conv_shortcut.', 'nin_shortcut.'), ('group_norm.', 'norm.'), ('to_q.', 'q.'), ('to_k.', 'k.'),
                 ('to_v.', 'v.'), ('to_out.0.', 'proj_out.')]


def ldm_unet_names(cfg):
    """Our UNet keys -> the original's. It numbers input_blocks and output_blocks in the order it
    runs them: input_blocks.0 is conv_in, then each level's (resnet, transformer) pairs and its
    downsampler; output_blocks take L+1 pairs per level, the upsampler after the last."""
    p = {'conv_in.': 'input_blocks.0.0.', 'time_embedding.linear_1.': 'time_embed.0.',
         'time_embedding.linear_2.': 'time_embed.2.', 'conv_norm_out.': 'out.0.', 'conv_out.': 'out.2.',
         'mid_block.resnets.0.': 'middle_block.0.', 'mid_block.attentions.0.': 'middle_block.1.',
         'mid_block.resnets.1.': 'middle_block.2.',
         'add_embedding.linear_1.': 'label_emb.0.0.', 'add_embedding.linear_2.': 'label_emb.0.2.'}  # SDXL
    levels, L, n = len(cfg.channels), cfg.layers_per_block, 1
    for i in range(levels):
        for j in range(L):
            p[f'down_blocks.{i}.resnets.{j}.'] = f'input_blocks.{n}.0.'
            p[f'down_blocks.{i}.attentions.{j}.'] = f'input_blocks.{n}.1.'  # on levels with attention
            n += 1
        if i < levels - 1:
            p[f'down_blocks.{i}.downsamplers.0.conv.'] = f'input_blocks.{n}.0.op.'
            n += 1
    n = 0
    for i in range(levels):
        for j in range(L + 1):
            p[f'up_blocks.{i}.resnets.{j}.'] = f'output_blocks.{n}.0.'
            p[f'up_blocks.{i}.attentions.{j}.'] = f'output_blocks.{n}.1.'
            n += 1
        after = 2 if cfg.attn_levels[levels - 1 - i] else 1  # the upsampler follows the last pair
        p[f'up_blocks.{i}.upsamplers.0.conv.'] = f'output_blocks.{n - 1}.{after}.conv.'
    return {k: translate(k, p, LDM_RESNET) for k in empty(cfg).state_dict()}


def ldm_vae_names(cfg):
    """Our VAE keys -> the original's. Its decoder numbers levels by resolution (up.0 is the last
    to run), where ours numbers them in running order."""
    p = {'quant_conv.': 'quant_conv.', 'post_quant_conv.': 'post_quant_conv.'}
    for part in ('encoder', 'decoder'):
        p.update({f'{part}.{a}.': f'{part}.{b}.' for a, b in [
            ('conv_in', 'conv_in'), ('conv_out', 'conv_out'), ('conv_norm_out', 'norm_out'), ('mid_block.resnets.0',
            'mid.block_1'), ('mid_block.resnets.1', 'mid.block_2'), ('mid_block.attentions.0', 'mid.attn_1')]})
    levels = len(cfg.channels)
    for i in range(levels):
        for j in range(cfg.layers_per_block + 1):
            p[f'encoder.down_blocks.{i}.resnets.{j}.'] = f'encoder.down.{i}.block.{j}.'
            p[f'decoder.up_blocks.{i}.resnets.{j}.'] = f'decoder.up.{levels - 1 - i}.block.{j}.'
        p[f'encoder.down_blocks.{i}.downsamplers.0.conv.'] = f'encoder.down.{i}.downsample.conv.'
        p[f'decoder.up_blocks.{i}.upsamplers.0.conv.'] = f'decoder.up.{levels - 1 - i}.upsample.conv.'
    return {k: translate(k, p, LDM_VAE_INNER) for k in empty(cfg).state_dict()}


def infer_unet_config(sd, source, pooled_dim=None):
    """A UNetConfig read off the original UNet's shapes (single files carry no config). Heads do not
    show in shapes: SD1 (context 768) has 8 per level, SD2 (context 1024) 64 channels per head.
    SDXL's added-embedding input is pooled_dim + 6 sinusoids: pooled_dim (the bigG projection's
    width, where the file holds it) splits it; without it the ids are taken as SDXL's 256 wide."""
    try:
        ins = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('input_blocks.'))
        levels = 1 + sum(k.endswith('.0.op.weight') for k in sd)
        L = (ins - 1 - (levels - 1)) // levels
        first = [1 + i * (L + 1) for i in range(levels)]  # each level's first input block
        channels = tuple(sd[f'input_blocks.{b}.0.out_layers.3.weight'].shape[0] for b in first)
        proj_in = next(v for k, v in sd.items() if k.endswith('.proj_in.weight'))
        context = next(v for k, v in sd.items() if k.endswith('attn2.to_k.weight')).shape[1]
        blocks = lambda prefix: 1 + max(int(k[len(prefix):].split('.')[0]) for k in sd if k.startswith(prefix))
        depth = tuple(blocks(f'input_blocks.{b}.1.transformer_blocks.') if f'input_blocks.{b}.1.proj_in.weight' in sd
                      else 1 for b in first)
        extra = {}
        if 'label_emb.0.0.weight' in sd:  # SDXL's text_time MLP: pooled text + 6 ids (SDXL: 1280 + 6 x 256)
            width = sd['label_emb.0.0.weight'].shape[1]
            time_dim = 256 if pooled_dim is None else (width - pooled_dim) // 6
            if time_dim <= 0 or width - 6 * time_dim <= 0 or pooled_dim is not None and (width - pooled_dim) % 6:
                raise ValueError(f"label_emb takes {width} inputs, not a pooled text embedding and 6 size ids")
            extra = dict(addition_embed='text_time', pooled_dim=width - 6 * time_dim, addition_time_dim=time_dim,
                         sample_size=128)
        return model.UNetConfig(
            transformer_depth=depth if len(set(depth)) > 1 else depth[0],
            mid_depth=blocks('middle_block.1.transformer_blocks.'), **extra,
            in_channels=sd['input_blocks.0.0.weight'].shape[1], out_channels=sd['out.2.weight'].shape[0],
            channels=channels, attn_levels=tuple(f'input_blocks.{b}.1.proj_in.weight' in sd for b in first),
            heads=(8,) * levels if context == 768 else tuple(max(c // 64, 1) for c in channels),
            layers_per_block=L, context_dim=context, linear_proj=proj_in.ndim == 2)
    except (KeyError, StopIteration, ValueError) as e:
        raise ConversionError(f"{source}: cannot read the UNet's architecture off its shapes ({cli.one_line(e)}): "
                              "pass --preset") from None


def infer_vae_config(sd, source):
    try:
        levels = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.down.'))
        return model.VAEConfig(
            in_channels=sd['encoder.conv_in.weight'].shape[1],
            latent_channels=sd['encoder.conv_out.weight'].shape[0] // 2,  # mean and log-variance
            channels=tuple(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] for i in range(levels)),
            layers_per_block=1 + max(int(k.split('.')[4]) for k in sd if k.startswith('encoder.down.0.block.')))
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{source}: cannot read the VAE's architecture off its shapes ({cli.one_line(e)})") \
            from None


def open_clip_names(layers, projection=False):
    """transformers' CLIP text keys (as saved on disk) -> OpenCLIP's (SD2's text encoder), which
    fuses q, k, v into in_proj. Only the first `layers` blocks: SD2 uses the penultimate layer.
    projection: SDXL's bigG keeps all its blocks and its text projection, for the pooled vector
    (OpenCLIP's (width, proj) matrix is applied as x @ P, transformers' Linear weight is P.T)."""
    names = {'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
             'text_model.embeddings.position_embedding.weight': 'positional_embedding',
             'text_model.final_layer_norm.weight': 'ln_final.weight',
             'text_model.final_layer_norm.bias': 'ln_final.bias'}
    if projection:
        names['text_projection.weight'] = 'text_projection'  # transposed by the caller
    for i in range(layers):
        hf, oc = f'text_model.encoder.layers.{i}.', f'transformer.resblocks.{i}.'
        for leaf in ('weight', 'bias'):
            for j, x in enumerate('qkv'):
                names[f'{hf}self_attn.{x}_proj.{leaf}'] = (f'{oc}attn.in_proj_{leaf}', j, 3)
            for a, b in [('self_attn.out_proj', 'attn.out_proj'), ('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'),
                         ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')]:
                names[f'{hf}{a}.{leaf}'] = f'{oc}{b}.{leaf}'
    return names


PASS_TEXT = ("pass --text-encoder DIR (a diffusers folder with text_encoder/ and tokenizer/, or a transformers "
             "folder), or --no-text")


def text_model_class(encoder_dir):
    import transformers
    t5 = read_json(Path(encoder_dir) / 'config.json').get('model_type', '').startswith('t5')
    return transformers.T5EncoderModel if t5 else transformers.CLIPTextModel


def text_folder(text_dir, stage, weights=None, source=None, suffix=''):
    """A folder with text_encoder/ and tokenizer/ for save_checkpoint. text_dir: a diffusers (or our)
    folder holding both, or a transformers folder. weights: the source file's own text encoder, in
    transformers' on-disk names, to be written in text_dir's architecture. suffix '_2': SDXL's
    second encoder (text_encoder_2/, tokenizer_2/, with its text projection)."""
    text_dir = Path(text_dir)
    enc, tok = ((text_dir / f'text_encoder{suffix}', text_dir / f'tokenizer{suffix}') if has_text(text_dir)
                else (text_dir, text_dir))
    if not (enc / 'config.json').is_file():
        raise ConversionError(f"--text-encoder {text_dir} holds neither text_encoder/ + tokenizer/ nor a "
                              "transformers model")
    if weights is None and has_text(text_dir):
        return text_dir
    import transformers
    transformers.logging.set_verbosity_error()  # our errors name the keys; its load report would repeat them
    transformers.logging.disable_progress_bar()
    cls = transformers.CLIPTextModelWithProjection if suffix else text_model_class(enc)
    dest = stage / f'text_encoder{suffix}'
    dest.mkdir(parents=True)
    if weights is None:
        cls.from_pretrained(enc).save_pretrained(dest)
    else:  # written in the on-disk layout, then loaded once by transformers to check every key and shape
        save_file({k: v.contiguous() for k, v in weights.items()}, str(dest / 'model.safetensors'),
                  metadata={'format': 'pt'})
        cls.config_class.from_pretrained(enc).save_pretrained(dest)
        try:
            _, info = cls.from_pretrained(dest, output_loading_info=True)
        except RuntimeError as e:  # shape mismatches
            raise ConversionError(f"{source}: its text encoder does not fit {enc}: {cli.one_line(e)}") from None
        if info['missing_keys'] or info['unexpected_keys']:
            raise ConversionError(f"{source}: its text encoder does not fit {enc}: "
                                  f"{key_report(sorted(info['missing_keys']), sorted(info['unexpected_keys']))}")
    transformers.AutoTokenizer.from_pretrained(tok).save_pretrained(stage / f'tokenizer{suffix}')
    return stage


@dataclass
class OneStep:
    """How a public one-step checkpoint samples its step: its architecture (a model.PRESETS name),
    what its network predicts, and the timestep its pure noise is read at."""
    arch: str
    prediction_type: str
    start_t: int
    noise: str = 'unit'  # 'sigma': Euler with trailing spacing starts from sigma_T z (vsd.student_generate)


# Each as its model card or code runs it, guidance off (0, or 1 where the pipeline's CFG is off at 1).
ONE_STEP = {
    # stabilityai/sd-turbo, stabilityai/sdxl-turbo: num_inference_steps=1, guidance_scale=0.0; the pipeline's
    # Euler-ancestral scheduler with trailing spacing takes its one step from t = 999.
    'sd_turbo': OneStep('sd_turbo', 'epsilon', 999, 'sigma'),
    'sdxl_turbo': OneStep('sdxl_turbo', 'epsilon', 999, 'sigma'),
    # tianweiy/DMD2: the SD1.5 generator maps noise at t = 999; the SDXL one-step UNet (dmd2_sdxl_1step_unet)
    # runs with LCMScheduler, num_inference_steps=1, guidance_scale=0, timesteps=[399].
    'dmd2_sd15': OneStep('sd15', 'epsilon', 999),
    'dmd2_sdxl': OneStep('sdxl', 'epsilon', 399),
    # ByteDance/SDXL-Lightning, sdxl_lightning_1step_unet_x0: EulerDiscreteScheduler(timestep_spacing="trailing",
    # prediction_type="sample"), one step: the network's output at t = 999 is the image latent.
    'sdxl_lightning_1step': OneStep('sdxl', 'sample', 999, 'sigma'),
    # ByteDance/Hyper-SD, Hyper-SDXL-1step-Unet: LCMScheduler, num_inference_steps=1, guidance_scale=0,
    # timesteps=[800] ("set start timesteps to 800 in the one-step inference").
    'hyper_sdxl_1step': OneStep('sdxl', 'epsilon', 800),
    # PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512: num_inference_steps=1, guidance_scale=1, timesteps=[400].
    'pixart_alpha_dmd': OneStep('pixart_alpha_512', 'epsilon', 400),
    # gnobitab/InstaFlow code/pipeline_rf.py (RectifiedFlowPipeline; diffusers' examples/community/
    # instaflow_one_step.py, no pipeline in the package): t_i = 1000 (1 - i / steps), latents += dt * v with
    # dt = 1 / steps, from the unscaled noise: t = 1000 is noise, v points to the data; in one step
    # x0 = z + v(z, 1000) (model.NoiseSchedule.x0_eps, 'flow'; tests/test_one_step.py).
    'instaflow': OneStep('sd15', 'flow', 1000),
}


def preset(args, cls):
    name = ONE_STEP[args.preset].arch if args.preset in ONE_STEP else args.preset
    cfg = model.PRESETS[name] if name else None
    if cfg is not None and not isinstance(cfg, cls):
        raise ConversionError(f"--preset {args.preset} is a {type(cfg).__name__}, but this file holds a "
                              f"{cls.__name__[:-len('Config')]}")
    return cfg


# Training-time buffers of the original LatentDiffusion, recomputed by model.NoiseSchedule.
LDM_SCHEDULE_BUFFERS = {'betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod',
                        'sqrt_one_minus_alphas_cumprod', 'log_one_minus_alphas_cumprod', 'sqrt_recip_alphas_cumprod',
                        'sqrt_recipm1_alphas_cumprod', 'posterior_variance', 'posterior_log_variance_clipped',
                        'posterior_mean_coef1', 'posterior_mean_coef2', 'logvar'}


def sd_single_file_parts(sd, path, args, stage):
    split = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    prefixes = ('model.diffusion_model.', 'first_stage_model.', 'cond_stage_model.', 'conditioner.')
    unet_sd, vae_sd, text_sd, sdxl_text_sd = map(split, prefixes)
    text_sd = text_sd or sdxl_text_sd  # SD1/2: cond_stage_model; SDXL (sgm): conditioner.embedders.0/1
    if not unet_sd:
        raise ConversionError(f"{path} has no model.diffusion_model.* keys, so it is not an SD single file"
                              f"{looks_like(sd)}")
    # Skipped by name: the EMA copy (model_ema.*: the file's own weights are the ones used) and LDM's schedule.
    other = sorted(k for k in sd if not k.startswith((*prefixes, 'model_ema.')) and k not in LDM_SCHEDULE_BUFFERS)
    if other:
        raise ConversionError(f"{path}: keys outside the UNet, VAE and text encoder: {key_report([], other)}")
    projection = sd.get('conditioner.embedders.1.model.text_projection')  # SDXL's bigG: (width, pooled)
    cfg = preset(args, model.UNetConfig) or infer_unet_config(unet_sd, path, None if projection is None
                                                              else projection.shape[1])
    if ('label_emb.0.0.weight' in unet_sd) != (cfg.addition_embed is not None):
        what = 'an SDXL file (label_emb)' if 'label_emb.0.0.weight' in unet_sd else 'not an SDXL file (no label_emb)'
        raise ConversionError(f"{path} is {what} but --preset {args.preset} is "
                              f"{'an SDXL' if cfg.addition_embed else 'not an SDXL'} UNet: pass the matching --preset "
                              "(sdxl for SDXL) or leave --preset out")
    unet = load_strict(cfg, gather(unet_sd, ldm_unet_names(cfg), f"{path} (UNet)"), f"{path} (UNet)")
    if args.vae:
        vae = read_vae(args.vae)
    elif vae_sd:
        vcfg = infer_vae_config(vae_sd, path)
        if cfg.addition_embed is not None:  # SDXL's VAE: SD's layout, its own latent scale
            vcfg = replace(vcfg, scaling_factor=model.PRESETS['sdxl_vae'].scaling_factor)
        state = gather(vae_sd, ldm_vae_names(vcfg), f"{path} (VAE)")
        # the original VAE's attention projections are 1x1 convolutions, ours are linear layers
        state = {k: v[:, :, 0, 0] if '.attentions.' in k and v.ndim == 4 else v for k, v in state.items()}
        vae = load_strict(vcfg, state, f"{path} (VAE)")
    else:
        raise ConversionError(f"{path} holds no VAE (first_stage_model.*): pass --vae DIR")
    v = args.prediction_type or ('v_prediction' if args.preset == 'sd21_768' else 'epsilon')
    sched = model.NoiseSchedule(model.Schedule(prediction_type=v))
    if 'alphas_cumprod' in sd and not torch.allclose(sd['alphas_cumprod'].float(), sched.alphas_cumprod, atol=1e-5):
        raise ConversionError(f"{path}: its alphas_cumprod are not SD's scaled-linear schedule (0.00085 to 0.012)")
    return Parts(unet, vae, sched, None if args.no_text else sd_text(text_sd, path, args, stage))


def sd_text(text_sd, path, args, stage):
    """text_encoder/ and tokenizer/ for a single file: its own text weights (SD1: transformers' CLIP
    under cond_stage_model.transformer; SD2: OpenCLIP under cond_stage_model.model), the text
    encoder's config and the tokenizer, which single files lack, from --text-encoder."""
    if args.text_encoder is None:
        kind = 'CLIP' if any(k.startswith('transformer.') for k in text_sd) else 'OpenCLIP'
        has = f"{kind} text encoder weights but no tokenizer" if text_sd else "no text encoder or tokenizer"
        raise ConversionError(f"{path} holds {has}: {PASS_TEXT}")
    if not text_sd:
        return text_folder(args.text_encoder, stage)
    if any(k.startswith('embedders.') for k in text_sd):
        return sdxl_text(text_sd, path, args, stage)
    if all(k.startswith('transformer.') for k in text_sd):
        weights = {k[len('transformer.'):]: v for k, v in text_sd.items()
                   if k != 'transformer.text_model.embeddings.position_ids'}  # an index buffer transformers rebuilds
    elif all(k.startswith('model.') for k in text_sd):
        enc = Path(args.text_encoder) / ('text_encoder' if has_text(args.text_encoder) else '')
        layers = read_json(enc / 'config.json').get('num_hidden_layers')
        if layers is None:
            raise ConversionError(f"--text-encoder {args.text_encoder}: its config has no num_hidden_layers")
        # unused: CLIP's contrastive head (text_projection, logit_scale) and the blocks past the penultimate
        unused = lambda k: k in ('model.text_projection', 'model.logit_scale') or \
            k.startswith('model.transformer.resblocks.') and int(k.split('.')[3]) >= layers
        oc = {k[len('model.'):]: v for k, v in text_sd.items() if not unused(k)}
        weights = gather(oc, open_clip_names(layers), f"{path} (OpenCLIP text encoder)")
    else:
        raise ConversionError(f"{path}: unrecognised text encoder keys ({', '.join(sorted(text_sd)[:3])}, ...)")
    return text_folder(args.text_encoder, stage, weights, path)


def sdxl_text(text_sd, path, args, stage):
    """SDXL's two text encoders from its single file (sgm's conditioner): CLIP ViT-L in transformers'
    layout under embedders.0.transformer, OpenCLIP bigG under embedders.1.model, all its blocks
    and its text projection (the pooled vector); configs and tokenizers from an SDXL --text-encoder."""
    if not has_text(args.text_encoder) or not has_text_2(args.text_encoder):
        raise ConversionError(f"{path} is an SDXL file: --text-encoder {args.text_encoder} must be an SDXL diffusers "
                              "folder (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)")
    clip = 'embedders.0.transformer.'
    weights = {k[len(clip):]: v for k, v in text_sd.items() if k.startswith(clip)
               and not k.endswith('position_ids')}  # an index buffer transformers rebuilds
    oc_prefix = 'embedders.1.model.'
    oc = {k[len(oc_prefix):]: v for k, v in text_sd.items() if k.startswith(oc_prefix) and k != oc_prefix + 'logit_scale'}
    other = sorted(k for k in text_sd if not k.startswith((clip, oc_prefix)))
    if other:
        raise ConversionError(f"{path}: conditioner keys outside its two text encoders: {key_report([], other)}")
    layers = read_json(Path(args.text_encoder) / 'text_encoder_2' / 'config.json').get('num_hidden_layers')
    weights_2 = gather(oc, open_clip_names(layers, projection=True), f"{path} (OpenCLIP bigG text encoder)")
    weights_2['text_projection.weight'] = weights_2['text_projection.weight'].T
    text_folder(args.text_encoder, stage, weights, path)
    return text_folder(args.text_encoder, stage, weights_2, path, suffix='_2')


# -----------------------------------------------------------------------------
# Original PixArt-alpha .pth files (diffusion/model/nets/PixArt.py and PixArtMS.py)


def pixart_names(cfg):
    """Our DiT keys -> the original's. It fuses self-attention's q, k, v into attn.qkv and
    cross-attention's k, v into cross_attn.kv_linear (row blocks, in that order)."""
    m = {'pos_embed.proj': 'x_embedder.proj', 'adaln_single.linear': 't_block.1', 'proj_out': 'final_layer.linear',
         '': 'final_layer',  # our top-level scale_shift_table
         'caption_projection.linear_1': 'y_embedder.y_proj.fc1',
         'caption_projection.linear_2': 'y_embedder.y_proj.fc2'}
    for ours, orig in [('timestep_embedder', 't_embedder'), ('resolution_embedder', 'csize_embedder'),
                       ('aspect_ratio_embedder', 'ar_embedder')]:
        m[f'adaln_single.{ours}.linear_1'], m[f'adaln_single.{ours}.linear_2'] = f'{orig}.mlp.0', f'{orig}.mlp.2'
    for n in range(cfg.depth):
        o, b = f'transformer_blocks.{n}', f'blocks.{n}'
        m.update({o: b, f'{o}.attn1.to_out': f'{b}.attn.proj', f'{o}.attn2.to_q': f'{b}.cross_attn.q_linear',
                  f'{o}.attn2.to_out': f'{b}.cross_attn.proj', f'{o}.ff.proj_in': f'{b}.mlp.fc1',
                  f'{o}.ff.proj_out': f'{b}.mlp.fc2'})
        m.update({f'{o}.attn1.to_{x}': (f'{b}.attn.qkv', i, 3) for i, x in enumerate('qkv')})
        m.update({f'{o}.attn2.to_{x}': (f'{b}.cross_attn.kv_linear', i, 2) for i, x in enumerate('kv')})
    names = {}
    for key in empty(cfg).state_dict():
        module, _, leaf = key.rpartition('.')
        orig = m[module]
        names[key] = (f'{orig[0]}.{leaf}', *orig[1:]) if isinstance(orig, tuple) else f'{orig}.{leaf}'
    return names


def infer_dit_config(sd, source):
    """A DiTConfig read off the original's shapes. Heads do not show in shapes: PixArt's are 72 wide."""
    try:
        w = sd['x_embedder.proj.weight']  # (D, in, p, p)
        D, p = w.shape[0], w.shape[2]
        size_cond = 'csize_embedder.mlp.0.weight' in sd
        size = int(sd['pos_embed'].shape[1] ** 0.5) * p if 'pos_embed' in sd else 128 if size_cond else 64
        return model.DiTConfig(
            in_channels=w.shape[1], out_channels=sd['final_layer.linear.weight'].shape[0] // p ** 2,
            depth=1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.')), heads=D // 72, head_dim=72,
            patch_size=p, caption_channels=sd['y_embedder.y_proj.fc1.weight'].shape[1], sample_size=size,
            interpolation_scale=float(max(size // 64, 1)), size_conditioning=size_cond)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{source}: cannot read the DiT's architecture off its shapes ({cli.one_line(e)}): "
                              "pass --preset") from None


def pixart_pth_parts(sd, path, args, stage):
    if 'x_embedder.proj.weight' not in sd:
        raise ConversionError(f"{path} has no x_embedder.proj.weight, so it is not an original PixArt checkpoint"
                              f"{looks_like(sd)}")
    if not args.vae:
        raise ConversionError(f"{path}: a PixArt .pth holds no VAE: pass --vae DIR (PixArt uses SD's VAE: a "
                              "diffusers folder with vae/, or an AutoencoderKL folder)")
    cfg = preset(args, model.DiTConfig) or infer_dit_config(sd, path)
    # Skipped by name: pos_embed (the fixed sin-cos table, recomputed) and y_embedding (kept as the null caption).
    rest = {k: v for k, v in sd.items() if k not in ('pos_embed', 'y_embedder.y_embedding')}
    dit = load_strict(cfg, gather(rest, pixart_names(cfg), path), path)
    sched = model.SCHEDULES['pixart']
    sched = model.NoiseSchedule(replace(sched, prediction_type=args.prediction_type or sched.prediction_type))
    text = None if args.no_text or not args.text_encoder else text_folder(args.text_encoder, stage)
    return Parts(dit, read_vae(args.vae), sched, text, sd.get('y_embedder.y_embedding'))


# -----------------------------------------------------------------------------
# Writing: our checkpoint folder, or a diffusers folder


def check_one_step(cfg, name, src):
    """The source's network must be of the one-step model's family (SD UNet, SDXL UNet or DiT)."""
    want = model.PRESETS[ONE_STEP[name].arch]
    kind = lambda c: ('an SDXL UNet' if c.addition_embed else 'an SD UNet') if isinstance(c, model.UNetConfig) \
        else 'a DiT'
    if kind(cfg) != kind(want):
        raise ConversionError(f"{src} holds {kind(cfg)}, but --preset {name} is {kind(want)} "
                              f"({ONE_STEP[name].arch}): pass the preset of the model this file is")


def write_ours(out, parts, dtype):
    model.save_checkpoint(out, parts.denoiser.to(dtype), parts.vae.to(dtype), parts.schedule, parts.text_folder,
                          parts.student_t, parts.student_noise)
    if parts.null_caption is not None:
        null = {'null_caption': parts.null_caption.to(dtype).contiguous()}  # (120, caption_channels)
        save_file(null, str(Path(out) / 'null_caption.safetensors'))


def write_component(folder, config, net, dtype):
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps({**config, '_diffusers_version': DIFFUSERS_VERSION}, indent=2))
    state = {to_diffusers(k): v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / 'diffusion_pytorch_model.safetensors'), metadata={'format': 'pt'})


def write_diffusers(out, parts, dtype):
    """A diffusers pipeline folder: StableDiffusionPipeline for a UNet, PixArtAlphaPipeline for a DiT.
    Pixel-space models have no vae/. (PixArt's null caption has no place in diffusers' format.)"""
    out = Path(out)
    model.finish_interrupted_save(out)
    tmp = out.with_name(out.name + '.tmp')
    unet = isinstance(parts.denoiser, model.UNet)
    sub = 'unet' if unet else 'transformer'
    config = (diffusers_unet_config if unet else diffusers_dit_config)(parts.denoiser.cfg)
    write_component(tmp / sub, config, parts.denoiser, dtype)
    sdxl = unet and parts.denoiser.cfg.addition_embed is not None
    index = {'_class_name': ('StableDiffusionXLPipeline' if sdxl else 'StableDiffusionPipeline') if unet
             else 'PixArtAlphaPipeline',
             '_diffusers_version': DIFFUSERS_VERSION, sub: ['diffusers', config['_class_name']],
             'vae': [None, None], 'scheduler': ['diffusers', 'DDIMScheduler' if parts.student_t is None else 'DDPMScheduler'],
             'text_encoder': [None, None], 'tokenizer': [None, None]}
    if sdxl:  # the pooled text and second encoder; no negative prompt: zeros, as SDXL base (TextEncoder.null)
        index.update(text_encoder_2=[None, None], tokenizer_2=[None, None], image_encoder=[None, None],
                     feature_extractor=[None, None], force_zeros_for_empty_prompt=True)
    elif unet:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    if isinstance(parts.vae, model.VAE):
        write_component(tmp / 'vae', diffusers_vae_config(parts.vae.cfg), parts.vae, dtype)
        index['vae'] = ['diffusers', 'AutoencoderKL']
    (tmp / 'scheduler').mkdir()
    scheduler = {**diffusers_scheduler_config(parts.schedule.config, parts.student_t),
                 '_diffusers_version': DIFFUSERS_VERSION}
    (tmp / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(scheduler, indent=2))
    if parts.text_folder is not None:
        for part in ('text_encoder', 'tokenizer'):
            shutil.copytree(Path(parts.text_folder) / part, tmp / part)
        enc, tok = tmp / 'text_encoder' / 'config.json', tmp / 'tokenizer' / 'tokenizer_config.json'
        t5 = text_model_class(enc.parent).__name__ == 'T5EncoderModel'
        arch = read_json(enc).get('architectures') or ['T5EncoderModel' if t5 else 'CLIPTextModel']
        index['text_encoder'] = ['transformers', arch[0]]
        index['tokenizer'] = ['transformers', (read_json(tok) if tok.is_file() else {}).get('tokenizer_class')
                              or ('T5Tokenizer' if t5 else 'CLIPTokenizer')]
        if has_text_2(parts.text_folder):
            for part in ('text_encoder_2', 'tokenizer_2'):
                shutil.copytree(Path(parts.text_folder) / part, tmp / part)
            index['text_encoder_2'] = ['transformers', 'CLIPTextModelWithProjection']
            index['tokenizer_2'] = ['transformers', 'CLIPTokenizer']
    (tmp / 'model_index.json').write_text(json.dumps(index, indent=2))
    model.swap_into_place(tmp, out)


# -----------------------------------------------------------------------------
# Command line


def read_source(src, args, stage):
    """Parts from any source, its format detected from its layout unless --from names it."""
    fmt = args.from_
    if src.is_dir():
        if fmt is None:
            if (src / 'denoiser.safetensors').is_file():
                fmt = 'ours'
            elif (src / 'model_index.json').is_file() or (src / 'unet').is_dir() or (src / 'transformer').is_dir():
                fmt = 'diffusers'
            else:
                raise ConversionError(f"{src} is a folder with no denoiser: neither a diffusers folder (unet/ or "
                                      "transformer/) nor one of our checkpoints (denoiser.safetensors)")
        if fmt not in ('diffusers', 'ours'):
            raise ConversionError(f"{src} is a folder, but --from {fmt} reads a file")
        parts = diffusers_parts(src) if fmt == 'diffusers' else ours_parts(src)
        if args.vae:
            parts.vae = read_vae(args.vae)
        if args.text_encoder and not args.no_text:
            parts.text_folder = text_folder(args.text_encoder, stage)
        return parts
    if fmt in ('diffusers', 'ours'):
        raise ConversionError(f"{src} is a file, but --from {fmt} reads a folder")
    sd = read_tensors(src)
    if fmt is None:
        if any(k.startswith('model.diffusion_model.') for k in sd):
            fmt = 'sd-single-file'
        elif 'x_embedder.proj.weight' in sd:
            fmt = 'pixart-pth'
        else:
            raise ConversionError(f"{src} is neither an SD single file (model.diffusion_model.*) nor a PixArt .pth "
                                  f"(x_embedder.*, blocks.N.*){looks_like(sd) or '; name its format with --from'}")
    return (sd_single_file_parts if fmt == 'sd-single-file' else pixart_pth_parts)(sd, src, args, stage)


def convert(args):
    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    cli.not_an_input('OUT', out, [('SRC', src), ('--vae', args.vae), ('--text-encoder', args.text_encoder)])
    cli.replaceable_folder('OUT', out)  # before the slow reads
    with tempfile.TemporaryDirectory() as stage:
        parts = read_source(src, args, Path(stage))
        one_step = ONE_STEP.get(args.preset)
        if one_step:
            check_one_step(parts.denoiser.cfg, args.preset, src)
            parts.schedule = model.NoiseSchedule(replace(parts.schedule.config, prediction_type=one_step.prediction_type))
            parts.student_t, parts.student_noise = one_step.start_t, one_step.noise
        if args.prediction_type:
            parts.schedule = model.NoiseSchedule(replace(parts.schedule.config, prediction_type=args.prediction_type))
        if args.no_text:
            parts.text_folder = None
        elif parts.text_folder is None:
            raise ConversionError(f"{src} comes without a text encoder and tokenizer: {PASS_TEXT}")
        elif getattr(parts.denoiser.cfg, 'addition_embed', None) and not has_text_2(parts.text_folder):
            raise ConversionError(f"{src} is an SDXL UNet but {parts.text_folder} has no second text encoder "
                                  "(text_encoder_2/ and tokenizer_2/): pass --text-encoder DIR of an SDXL diffusers "
                                  "folder, or --no-text")
        (write_ours if args.to == 'ours' else write_diffusers)(out, parts, getattr(torch, args.dtype))
    count = lambda net: f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters"
    s = parts.schedule.config
    print(f"{src} -> {out} ({args.to}): {type(parts.denoiser).__name__} {count(parts.denoiser)}, "
          f"{'VAE ' + count(parts.vae) if isinstance(parts.vae, model.VAE) else 'pixel space'}, "
          f"{s.beta_schedule}/{s.prediction_type} schedule, {'no ' if parts.text_folder is None else ''}text encoder"
          f"{', null caption' if parts.null_caption is not None else ''}")


def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    p = cli.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument('src', help="what to convert: a diffusers folder, an SD single file, a PixArt .pth, or our "
                               "checkpoint folder")
    p.add_argument('out', help="the folder to write; an existing one is replaced only if this project wrote it "
                               "(a checkpoint or diffusers folder) or it is empty")
    p.add_argument('--from', dest='from_', choices=['diffusers', 'sd-single-file', 'pixart-pth', 'ours'],
                   default=None, help="the source's format; None: detected from its layout")
    p.add_argument('--to', choices=['ours', 'diffusers'], default='ours',
                   help="write our checkpoint folder, or a diffusers pipeline folder")
    p.add_argument('--preset', default=None, choices=list(dict.fromkeys(
                       [k for k, c in model.PRESETS.items() if not isinstance(c, model.VAEConfig)] + list(ONE_STEP))),
                   help="the denoiser's architecture, for single files and .pth files, which carry no config (None: "
                        f"read off the tensor shapes); or a public one-step model ({', '.join(ONE_STEP)}), whose "
                        "architecture, parameterisation and start timestep are then stored with the checkpoint, so "
                        "sample.py needs no flags")
    p.add_argument('--prediction-type', choices=list(model.PREDICTION_TYPES), default=None,
                   help="what the denoiser predicts; None: the source's scheduler config (single files: epsilon, "
                        "or v_prediction with --preset sd21_768)")
    p.add_argument('--text-encoder', metavar='DIR', default=None,
                   help="take text_encoder/ and tokenizer/ from DIR (a diffusers folder, or a transformers folder); "
                        "needed for single files and .pth files, which carry no tokenizer")
    p.add_argument('--vae', metavar='DIR', default=None,
                   help="take the VAE from DIR (a diffusers folder with vae/, or an AutoencoderKL folder); needed "
                        "for PixArt .pth files, which hold none")
    p.add_argument('--no-text', action='store_true', help="write no text_encoder/ or tokenizer/ (networks only)")
    p.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'], default='float32',
                   help="precision of the written weights")
    return p.parse_args(argv)


@cli.script('convert.py')
def main(argv=None):
    convert(parse_args(argv))


if __name__ == '__main__':
    main()
