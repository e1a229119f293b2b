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
import contextlib
import io
import json
from dataclasses import replace
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
from conftest import make_sdxl_text  # noqa: E402
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


# -----------------------------------------------------------------------------
# A tiny SDXL-shaped pipeline through files, and each one-step preset against diffusers' pipeline

TINY_VAE = dict(block_out_channels=[32, 64], down_block_types=['DownEncoderBlock2D'] * 2,
                up_block_types=['UpDecoderBlock2D'] * 2, layers_per_block=1, latent_channels=4, scaling_factor=0.13025)
SDXL_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', num_train_timesteps=1000,
                  prediction_type='epsilon', steps_offset=1, timestep_spacing='leading')


@pytest.fixture(scope='module')
def sdxl_src(tmp_path_factory):
    """A diffusers StableDiffusionXLPipeline folder with seeded random weights."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
    folder = tmp_path_factory.mktemp('sdxl')
    text = make_sdxl_text(tmp_path_factory.mktemp('sdxl_text'))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=pooled_views(diffusers.AutoencoderKL, TINY_VAE, seed=3),
        text_encoder=CLIPTextModel.from_pretrained(text / 'text_encoder'),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(text / 'text_encoder_2'),
        tokenizer=AutoTokenizer.from_pretrained(text / 'tokenizer'),
        tokenizer_2=AutoTokenizer.from_pretrained(text / 'tokenizer_2'),
        unet=pooled_views(diffusers.UNet2DConditionModel, TINY_SDXL_UNET, seed=2),
        scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHED), add_watermarker=False)
    for net in (pipe.vae, pipe.unet):  # pooled views share memory: saved as separate tensors
        for m in net.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    m._parameters[k] = torch.nn.Parameter(p.clone(), requires_grad=False)
    pipe.save_pretrained(folder)
    return folder


def run_main(main, *args):
    """None when main(args) succeeds, else the line it wrote to stderr as it exited non-zero."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as e:
        assert e.code != 0
        return err.getvalue().rstrip('\n')
    return None


def run_convert(*args):
    return run_main(convert.main, *args)


@torch.no_grad()
def test_tiny_sdxl_through_files_and_back(sdxl_src, tmp_path):
    assert run_convert(sdxl_src, tmp_path / 'ours') is None
    pipe = M.load_checkpoint(tmp_path / 'ours')
    assert pipe.denoiser.cfg == M.PRESETS['tiny_sdxl'] and pipe.vae.cfg.scaling_factor == 0.13025
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_src)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 7, 64, generator=g)
    pooled, ids = added_inputs(3, 32)
    t = torch.tensor([999, 500, 20])
    want = ref.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={'text_embeds': pooled, 'time_ids': ids}).sample
    err = rel_err(pipe.denoiser(x, t, ctx, added=torch.cat([pooled, ids], 1)), want)
    print(f"\nparity tiny sdxl unet (files): {err:.2e}")
    assert err <= TOL
    # the dual text encoder against diffusers' own SDXL prompt encoding
    prompts = ['a red circle', 'a blue square on a green triangle']
    emb, neg, pooled_ref, _ = ref.encode_prompt(prompts, device='cpu', do_classifier_free_guidance=False)
    c, mask, pooled_ours = pipe.text_encoder.encode(prompts)
    print(f"parity dual text encoder: sequence {rel_err(c, emb):.2e}, pooled {rel_err(pooled_ours, pooled_ref):.2e}")
    assert mask is None and c.shape == (2, pipe.text_encoder.max_length, 64) and rel_err(c, emb) <= TOL and rel_err(pooled_ours, pooled_ref) <= TOL
    # ours -> diffusers: the same tensors, a folder diffusers loads
    assert run_convert(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers') is None
    for sub in ('unet', 'vae'):
        src = convert.read_tensors(sdxl_src / sub / 'diffusion_pytorch_model.safetensors')
        back = convert.read_tensors(tmp_path / 'back' / sub / 'diffusion_pytorch_model.safetensors')
        assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / 'back')
    assert convert.unet_config(again.unet.config) == M.PRESETS['tiny_sdxl']
    assert again.vae.config.scaling_factor == 0.13025 and again.text_encoder_2 is not None


# preset -> the scheduler and call its model card gives
CARDS = {
    'sdxl_turbo': (lambda c: diffusers.EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing='trailing'), {}),
    'dmd2_sdxl': (lambda c: diffusers.LCMScheduler.from_config(c), {'timesteps': [399]}),
    'sdxl_lightning_1step': (lambda c: diffusers.EulerDiscreteScheduler.from_config(
        c, timestep_spacing='trailing', prediction_type='sample'), {}),
    'hyper_sdxl_1step': (lambda c: diffusers.LCMScheduler.from_config(c), {'timesteps': [800]}),
}


@torch.no_grad()
@pytest.mark.parametrize('preset', sorted(CARDS))
def test_one_step_sdxl_presets_match_the_model_cards(preset, sdxl_src, tmp_path):
    import sample
    assert run_convert(sdxl_src, tmp_path / 'ours', '--preset', preset) is None
    pipe = M.load_checkpoint(tmp_path / 'ours')
    assert pipe.student_t == convert.ONE_STEP[preset].start_t
    ours = (sample.generate(pipe, ['a red circle'], seed=0, height=64, width=64) + 1) / 2
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_src)
    scheduler, kwargs = CARDS[preset]
    ref.scheduler = scheduler(ref.scheduler.config)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # the tiny VAE halves: 64 px
    want = ref('a red circle', num_inference_steps=1, guidance_scale=0.0, latents=z, height=64, width=64,
               output_type='pt', **kwargs).images
    err = rel_err(ours, want)
    print(f"\none-step {preset} image vs diffusers: {err:.2e}")
    assert err <= TOL


@torch.no_grad()
def test_sdxl_guidance_without_negative_prompt_uses_zeros_like_sdxl_base(sdxl_src, tmp_path):
    """No negative prompt: the unconditional input is zeros (sequence and pooled), as SDXL base's
    pipeline (force_zeros_for_empty_prompt=True) does, and our export says so. One guided step at
    t = 999 against diffusers' pipeline on the exported folder (LCM with timesteps=[999] returns the
    guided x0, our DDIM's single step)."""
    import sample
    assert run_convert(sdxl_src, tmp_path / 'ours') is None
    assert run_convert(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers') is None
    pipe = M.load_checkpoint(tmp_path / 'ours')
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / 'back')
    assert ref.config.force_zeros_for_empty_prompt is True
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    want = ref('a red circle', num_inference_steps=1, guidance_scale=3.0, latents=z, height=64, width=64,
               timesteps=[999], output_type='pt').images
    u, um, upooled = pipe.text_encoder.null()
    assert not u.any() and not upooled.any() and u.shape == (1, pipe.text_encoder.max_length, 64) and upooled.shape == (1, 32)
    c, cm, pooled = pipe.text_encoder.encode(['a red circle'])
    x0 = sample.ddim(pipe.denoiser, pipe.schedule, z, (c, cm, M.sdxl_added(pooled, 64, 64)),
                     (u, um, M.sdxl_added(upooled, 64, 64)), 1, 3.0)
    err = rel_err((pipe.vae.decode(x0).clamp(-1, 1) + 1) / 2, want)
    print(f"\nsdxl CFG 3 without negative prompt (zeros) vs diffusers: {err:.2e}")
    assert err <= TOL
    # sample.py's DDIM takes that null input: not the encoded empty prompt, which gives another image
    gen = lambda neg: sample.generate(pipe, ['a red circle'], neg, steps=2, cfg=3.0, height=64, width=64)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    two = sample.ddim(pipe.denoiser, pipe.schedule, x, (c, cm, M.sdxl_added(pooled, 64, 64)),
                      (u, um, M.sdxl_added(upooled, 64, 64)), 2, 3.0)
    assert torch.equal(gen(None), pipe.vae.decode(two).float().clamp(-1, 1))
    assert (gen('') - gen(None)).abs().max() > 1e-3


@torch.no_grad()
def test_nasa_on_sdxl(sdxl_src, tmp_path):
    """Both encoders' negative states go through the pair, the pooled text stays the positive's:
    NASA at 0 is the plain image bit for bit, and a negative prompt changes it."""
    import sample
    assert run_convert(sdxl_src, tmp_path / 'ours', '--preset', 'dmd2_sdxl') is None
    pipe = M.load_checkpoint(tmp_path / 'ours')
    gen = lambda neg, scale: sample.generate(pipe, ['a red circle'], neg, scale, seed=0, height=64, width=64)
    plain = gen(None, 0.0)
    assert torch.equal(gen('a blue square', 0.0), plain)
    assert (gen('a blue square', 0.5) - plain).abs().max() > 1e-3


def test_sdxl_bad_inputs_are_one_line(sdxl_src, tmp_path):
    err = run_convert(sdxl_src, tmp_path / 'a', '--preset', 'dmd2_sd15')
    assert err.startswith('convert.py: error:') and 'an SDXL UNet' in err and '--preset dmd2_sd15' in err
    one = tmp_path / 'one_text'  # an SDXL folder that lost its second text encoder
    shutil.copytree(sdxl_src, one, ignore=shutil.ignore_patterns('text_encoder_2', 'tokenizer_2'))
    err = run_convert(one, tmp_path / 'b')
    assert err.startswith('convert.py: error:') and 'text_encoder_2' in err and '\n' not in err
    import sample
    assert run_convert(sdxl_src, tmp_path / 'c') is None
    for argv, what in [(['--height', '62'], 'multiples of 4'), ([], None)]:
        err = run_main(sample.main, '--checkpoint', tmp_path / 'c', '--prompt', 'x', '--n', '1', '--out',
                       tmp_path / 'x.png', '--height', '64', '--width', '64', *argv)
        assert err is None if what is None else (err.startswith('sample.py: error:') and what in err), err


def open_clip_from_transformers(state, layers):
    """bigG in OpenCLIP's layout (the original SDXL file's conditioner.embedders.1.model), written
    from a transformers CLIPTextModelWithProjection's state: q, k, v fused row-wise into in_proj,
    the projection as the (width, proj) matrix applied as x @ P."""
    sd = {'token_embedding.weight': state['text_model.embeddings.token_embedding.weight'],
          'positional_embedding': state['text_model.embeddings.position_embedding.weight'],
          'ln_final.weight': state['text_model.final_layer_norm.weight'],
          'ln_final.bias': state['text_model.final_layer_norm.bias'],
          'text_projection': state['text_projection.weight'].T.contiguous(), 'logit_scale': torch.tensor(4.6)}
    for i in range(layers):
        hf, oc = f'text_model.encoder.layers.{i}.', f'transformer.resblocks.{i}.'
        for leaf in ('weight', 'bias'):
            sd[f'{oc}attn.in_proj_{leaf}'] = torch.cat([state[f'{hf}self_attn.{x}_proj.{leaf}'] for x in 'qkv'])
            for a, b in [('self_attn.out_proj', 'attn.out_proj'), ('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'),
                         ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')]:
                sd[f'{oc}{b}.{leaf}'] = state[f'{hf}{a}.{leaf}']
    return sd


@torch.no_grad()
def test_tiny_sdxl_single_file_end_to_end(sdxl_src, tmp_path):
    """A whole tiny SDXL file in the original layout (UNet with label_emb, VAE, CLIP-L under
    conditioner.embedders.0.transformer, bigG under conditioner.embedders.1.model), written from the
    diffusers folder through diffusers' own LDM converters; `python convert.py FILE OUT` gives the
    same networks as converting the folder, text encodings equal to diffusers' own, and sample.py
    runs on it."""
    from conftest import run_script
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    from test_convert import ldm_from_diffusers, ldm_unet_layout, ldm_vae_layout
    unet = diffusers.UNet2DConditionModel.from_pretrained(sdxl_src / 'unet').state_dict()
    vae = diffusers.AutoencoderKL.from_pretrained(sdxl_src / 'vae').state_dict()
    sd = ldm_from_diffusers(ldm_unet_layout(M.PRESETS['tiny_sdxl']), unet,
                            lambda d: convert_ldm_unet_checkpoint(d, TINY_SDXL_UNET), 'model.diffusion_model.')
    sd.update(ldm_from_diffusers(ldm_vae_layout(M.PRESETS['tiny_vae']), vae,
                                 lambda d: convert_ldm_vae_checkpoint(d, TINY_VAE), 'first_stage_model.'))
    clip = convert.read_tensors(sdxl_src / 'text_encoder' / 'model.safetensors')
    sd.update({'conditioner.embedders.0.transformer.' + k: v for k, v in clip.items()})
    sd['conditioner.embedders.0.transformer.text_model.embeddings.position_ids'] = torch.arange(8)[None]
    big = convert.read_tensors(sdxl_src / 'text_encoder_2' / 'model.safetensors')
    layers = json.loads((sdxl_src / 'text_encoder_2' / 'config.json').read_text())['num_hidden_layers']
    sd.update({'conditioner.embedders.1.model.' + k: v for k, v in open_clip_from_transformers(big, layers).items()})
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(tmp_path / 'tiny_sdxl.safetensors'))
    # heads do not show in shapes (SD's rule gives 64 channels per head): the tiny one needs --preset
    proc = run_script('convert.py', tmp_path / 'tiny_sdxl.safetensors', tmp_path / 'ours', '--text-encoder', sdxl_src,
                      '--preset', 'tiny_sdxl')
    assert proc.returncode == 0, proc.stderr
    inferred = convert.infer_unet_config({k[len('model.diffusion_model.'):]: v for k, v in sd.items()
                                          if k.startswith('model.diffusion_model.')}, 'test', pooled_dim=32)
    assert inferred == replace(M.PRESETS['tiny_sdxl'], heads=(1, 1), sample_size=128)  # the split off bigG's width
    assert run_convert(sdxl_src, tmp_path / 'from_folder') is None
    for name in ('denoiser', 'vae'):
        a, b = (convert.read_tensors(tmp_path / f / f'{name}.safetensors') for f in ('ours', 'from_folder'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    pipe = M.load_checkpoint(tmp_path / 'ours')
    assert pipe.denoiser.cfg == M.PRESETS['tiny_sdxl'] and pipe.vae.cfg.scaling_factor == 0.13025
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_src)
    emb, _, pooled, _ = ref.encode_prompt(['a red circle'], device='cpu', do_classifier_free_guidance=False)
    c, _, p = pipe.text_encoder.encode(['a red circle'])
    print(f"\nsdxl single file: text sequence {rel_err(c, emb):.2e}, pooled {rel_err(p, pooled):.2e}")
    assert rel_err(c, emb) <= TOL and rel_err(p, pooled) <= TOL
    import sample
    sample.main(['--checkpoint', str(tmp_path / 'ours'), '--prompt', 'a red circle', '--negative-prompt', 'blue',
                 '--n', '1', '--height', '64', '--width', '64', '--device', 'cpu', '--out', str(tmp_path / 'x.png')])
    from PIL import Image
    with Image.open(tmp_path / 'x.png') as im:
        assert im.size == (64, 64)


def test_export_refuses_a_mid_depth_diffusers_cannot_express(tmp_path):
    cfg = replace(M.PRESETS['tiny_sdxl'], mid_depth=3)  # the last level has 2
    M.save_checkpoint(tmp_path / 'ours', M.build(cfg), M.PixelSpace(), M.NoiseSchedule(M.SCHEDULES['sd']))
    err = run_convert(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers', '--no-text')
    assert err.startswith('convert.py: error:') and 'mid block has 3' in err and '--to ours' in err and '\n' not in err
    assert not (tmp_path / 'back').exists()
    M.save_checkpoint(tmp_path / 'ours', M.build(M.PRESETS['tiny_sdxl']), M.PixelSpace(),
                      M.NoiseSchedule(M.SCHEDULES['sd']))  # the same UNet with the last level's depth exports
    assert run_convert(tmp_path / 'ours', tmp_path / 'back', '--to', 'diffusers', '--no-text') is None


def test_sdxl_single_file_key_map_matches_diffusers():
    """The real SDXL config: our map of the original UNet (label_emb, 1/2/10 transformer blocks) lands
    each tensor where diffusers' converter puts it; the architecture reads back off the shapes; bigG's
    fused in_proj and projection as diffusers' OpenCLIP converter splits them."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from test_convert import ldm_unet_layout, numbered, open_clip_layout, shapes_of
    cfg = M.PRESETS['sdxl']
    ldm = numbered(ldm_unet_layout(cfg))
    with torch.device('meta'):
        want = diffusers.UNet2DConditionModel.from_config(SDXL_UNET).state_dict()
    ref = convert_ldm_unet_checkpoint({'model.diffusion_model.' + k: v for k, v in ldm.items()}, SDXL_UNET)
    assert shapes_of(ref) == shapes_of(want)
    ours = convert.gather(ldm, convert.ldm_unet_names(cfg), 'test')
    ref = {convert.to_ours(k): v for k, v in ref.items()}
    # each numbered tensor is one value broadcast (its index): the value and the shape identify it,
    # without reading 2.6e9 elements
    ident = lambda v: (v.flatten()[0].item(), tuple(v.shape))
    assert ours.keys() == ref.keys() and all(ident(ours[k]) == ident(ref[k]) for k in ref)
    assert all(not v.stride() or max(v.stride()) == 0 for v in ldm.values())
    assert convert.infer_unet_config(ldm, 'test') == cfg
    prefix = 'conditioner.embedders.1.model.'
    oc = {k: torch.randn(s) for k, s in open_clip_layout(32, 3, 50, 8).items()}
    ref = convert_open_clip_checkpoint(None, {prefix + k: v for k, v in oc.items()}, prefix=prefix)
    ours = convert.gather(oc, convert.open_clip_names(3, projection=True), 'test')
    ours['text_projection.weight'] = ours['text_projection.weight'].T
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
