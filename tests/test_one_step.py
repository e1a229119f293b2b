"""The one-step presets of SD and PixArt models against diffusers, the independent reference: a
small random model of each architecture as a diffusers folder, converted with `--preset NAME`, then
sample.py's one step against diffusers' pipeline run as the model card says (float32, to 1e-4).
SDXL's presets are in test_sdxl.py.

Run with -s to see the measured errors.
"""
import shutil

import pytest
import torch

import convert
import model as M
import sample
from conftest import make_clip_text, make_t5_text

diffusers = pytest.importorskip('diffusers')
from test_convert import (PIXART_SCHED, SD_SCHED, TINY_DIT, TINY_UNET, TINY_VAE,  # noqa: E402
                          randomized, rel_err, run)

TOL = 1e-4
PROMPT = 'a red circle'


def latents(size):
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))


def ours(src, out, preset, size):
    """Our one-step image in [0, 1] from the folder converted with --preset, from sample.py's
    generate with seed 0 (the same noise as `latents`)."""
    assert run(src, out, '--preset', preset) is None
    pipe = M.load_checkpoint(out)
    assert pipe.student_t == convert.ONE_STEP[preset].start_t
    return (sample.generate(pipe, [PROMPT], seed=0, height=size, width=size) + 1) / 2


@pytest.fixture(scope='module')
def sd_src(tmp_path_factory):
    """A diffusers StableDiffusionPipeline folder: tiny UNet, tiny VAE (2x), 32-wide CLIP."""
    from transformers import AutoTokenizer, CLIPTextModel
    folder, text = tmp_path_factory.mktemp('sd'), make_clip_text(tmp_path_factory.mktemp('sd_text'))
    pipe = diffusers.StableDiffusionPipeline(
        unet=randomized(diffusers.UNet2DConditionModel, TINY_UNET, seed=31),
        vae=randomized(diffusers.AutoencoderKL, TINY_VAE, seed=32),
        text_encoder=CLIPTextModel.from_pretrained(text / 'text_encoder'),
        tokenizer=AutoTokenizer.from_pretrained(text / 'tokenizer'),
        scheduler=diffusers.PNDMScheduler(**{k: v for k, v in SD_SCHED.items() if k != '_class_name'}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sd_ref(src, scheduler=None):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
    if scheduler is not None:
        ref.scheduler = scheduler(ref.scheduler.config)
    return ref


# preset -> the scheduler and call of its model card or code (guidance 0, one step)
SD_CARDS = {
    # stabilityai/sd-turbo ships EulerDiscreteScheduler with timestep_spacing "trailing"; its card's
    # pipeline runs num_inference_steps=1, guidance_scale=0.0. Euler-ancestral (SDXL-Turbo's) takes the
    # same single step: both go from sigma_max to 0 with no noise added.
    'sd_turbo': (lambda c: diffusers.EulerDiscreteScheduler.from_config(c, timestep_spacing='trailing'), {}),
    'sd_turbo (euler ancestral)': (lambda c: diffusers.EulerAncestralDiscreteScheduler.from_config(
        c, timestep_spacing='trailing'), {}),
    # tianweiy/DMD2's SD1.5 generator maps noise at t = 999 (../shared/PAPER.md): LCMScheduler with
    # timesteps=[999] is that map in diffusers (its boundary terms are 1 - 1e-8 and 1e-8 there).
    'dmd2_sd15': (lambda c: diffusers.LCMScheduler.from_config(c), {'timesteps': [999]}),
}


@torch.no_grad()
@pytest.mark.parametrize('card', sorted(SD_CARDS))
def test_one_step_sd_presets_match_the_model_cards(card, sd_src, tmp_path):
    image = ours(sd_src, tmp_path / 'ours', card.split()[0], 32)
    scheduler, kwargs = SD_CARDS[card]
    want = sd_ref(sd_src, scheduler)(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=latents(16),
                                     height=32, width=32, output_type='pt', **kwargs).images
    err = rel_err(image, want)
    print(f"\none-step {card} image vs diffusers: {err:.2e}")
    assert err <= TOL


@torch.no_grad()
def test_instaflow_is_one_euler_step_of_the_rectified_flow_pipeline(sd_src, tmp_path):
    """diffusers has no InstaFlow pipeline in its package; its community pipeline
    (examples/community/instaflow_one_step.py) and InstaFlow's own code/pipeline_rf.py run, for N
    steps, t_i = (1 - i / N) * 1000 and latents += v(latents, t_i) / N, starting from the unscaled
    noise. Computed here by hand with diffusers' own UNet, text encoding and VAE, for N = 1."""
    image = ours(sd_src, tmp_path / 'ours', 'instaflow', 32)
    ref = sd_ref(sd_src)
    emb, _ = ref.encode_prompt(PROMPT, 'cpu', 1, False)
    z = latents(16)
    v = ref.unet(z, torch.ones(1) * 1000.0, encoder_hidden_states=emb).sample
    x = z + 1.0 * v  # dt = 1 / N
    want = (ref.vae.decode(x / ref.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    err = rel_err(image, want)
    print(f"\none-step instaflow image vs the rectified-flow pipeline's step: {err:.2e}")
    assert err <= TOL
    # the sign matters: z - v gives another image
    assert rel_err(image, (ref.vae.decode((z - v) / ref.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)) > 1e-2


@torch.no_grad()
def test_pixart_alpha_dmd_matches_its_demo(tmp_path, tmp_path_factory):
    """PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512 as PixArt-sigma's app/app_pixart_dmd.py runs it:
    DDPMScheduler from the checkpoint's scheduler folder, timesteps=[400], num_inference_steps=1,
    guidance_scale=1. The DDPM step from t = 400 to the end returns the predicted x0 (plus 1e-10 of
    noise); clip_sample off, as a clamp of latents to [-1, 1] would be (the checkpoint's own
    scheduler_config.json was not at hand)."""
    from transformers import AutoTokenizer, T5EncoderModel
    text = make_t5_text(tmp_path_factory.mktemp('t5'), make_clip_text(tmp_path_factory.mktemp('clip')))
    src = tmp_path / 'src'
    sched = {k: v for k, v in PIXART_SCHED.items() if k != '_class_name'}
    diffusers.PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(text / 'tokenizer'),
        text_encoder=T5EncoderModel.from_pretrained(text / 'text_encoder'),
        vae=randomized(diffusers.AutoencoderKL, TINY_VAE, seed=33),
        transformer=randomized(diffusers.PixArtTransformer2DModel, TINY_DIT, seed=34),
        scheduler=diffusers.DDPMScheduler(**sched, clip_sample=False)).save_pretrained(src)
    image = ours(src, tmp_path / 'ours', 'pixart_alpha_dmd', 32)
    ref = diffusers.PixArtAlphaPipeline.from_pretrained(src)
    assert isinstance(ref.scheduler, diffusers.DDPMScheduler)
    want = ref(PROMPT, timesteps=[400], num_inference_steps=1, guidance_scale=1.0, latents=latents(16), height=32,
               width=32, output_type='pt', use_resolution_binning=False, clean_caption=False,
               max_sequence_length=120, generator=torch.Generator().manual_seed(1)).images
    err = rel_err(image, want)
    print(f"\none-step pixart_alpha_dmd image vs diffusers: {err:.2e}")
    assert err <= TOL
    shutil.rmtree(tmp_path)
