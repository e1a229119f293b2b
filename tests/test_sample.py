"""sample.py: PNGs from tiny random checkpoints (UNet + CLIP, DiT + T5, a diffusers folder), DDIM
with guidance against a hand-written loop, and one-line errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import sample
from conftest import ROOT, assert_clean_error, make_clip_text, run_script, seeded


def png(path):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        im.load()
        return im.convert('RGB') if im.mode != 'RGB' else im


@pytest.fixture(scope='module')
def dit_student(tmp_path_factory, t5_text):
    """A one-step DiT 'student' starting at t = 400, with a T5 text encoder."""
    folder = tmp_path_factory.mktemp('ckpt') / 'dit_student'
    M.save_checkpoint(folder, seeded(0, M.build, M.PRESETS['tiny_dit']), seeded(1, M.build, M.PRESETS['tiny_vae']),
                      M.NoiseSchedule(M.SCHEDULES['pixart']), text_folder=t5_text, student_t=400)
    return folder


@pytest.fixture(scope='module')
def unet_pipe(unet_teacher):
    return sample.load(unet_teacher)


def test_cli_writes_a_grid_of_the_generated_images(unet_teacher, unet_pipe, tmp_path):
    out = tmp_path / 'grid.png'
    proc = run_script('sample.py', '--checkpoint', unet_teacher, '--prompt', 'a red circle', '--prompt', 'a blue square',
                      '--negative-prompt', 'red', '--nasa-scale', 0.5, '--n', 3, '--seed', 7, '--device', 'cpu',
                      '--out', out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f'wrote 6 images to {out}' in proc.stdout
    grid = np.asarray(png(out))
    assert grid.shape == (2 * 32, 3 * 32, 3)  # one row per prompt, --n columns; tiny_vae: 16 * 2 pixels
    images = sample.to_uint8(sample.generate(unet_pipe, ['a red circle', 'a blue square'], 'red', 0.5, n=3, seed=7))
    for i, im in enumerate(images):  # prompt-major
        r, c = divmod(i, 3)
        tile = grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
        assert np.abs(tile.astype(int) - im.astype(int)).max() <= 1
    assert grid.std() > 0


def test_folder_output_writes_numbered_pngs_of_the_asked_size(unet_teacher, tmp_path):
    out = tmp_path / 'images'
    sample.main(['--checkpoint', str(unet_teacher), '--prompt', 'a red circle', '--prompt', 'a cyan triangle',
                 '--n', '2', '--height', '64', '--width', '48', '--device', 'cpu', '--out', f'{out}/'])
    names = sorted(p.name for p in out.iterdir())
    assert names == ['00000.png', '00001.png', '00002.png', '00003.png']
    sizes = {png(out / n).size for n in names}
    assert sizes == {(48, 64)}
    assert not np.array_equal(np.asarray(png(out / names[0])), np.asarray(png(out / names[1])))  # fresh noise each


def test_dit_student_with_t5_masks_and_nasa(dit_student, tmp_path):
    pipe = sample.load(dit_student)
    assert pipe.student_t == 400 and pipe.text_encoder.is_t5
    plain = sample.generate(pipe, ['a red circle'], n=2, seed=1)
    steered = sample.generate(pipe, ['a red circle'], 'red', 0.8, n=2, seed=1)
    assert plain.shape == steered.shape == (2, 3, 32, 32)
    assert torch.isfinite(steered).all() and steered.abs().max() <= 1
    assert not torch.equal(plain, steered)
    # the one step starts at the checkpoint's student_t
    seen = []
    hook = pipe.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    sample.generate(pipe, ['a red circle'], n=2, seed=1)
    hook.remove()
    assert len(seen) == 1 and seen[0].tolist() == [400, 400]
    out = tmp_path / 'dit'
    sample.main(['--checkpoint', str(dit_student), '--prompt', 'a red circle', '--negative-prompt', 'red',
                 '--n', '3', '--height', '24', '--width', '40', '--device', 'cpu', '--out', f'{out}/'])
    assert sorted(p.name for p in out.iterdir()) == ['00000.png', '00001.png', '00002.png']
    assert png(out / '00002.png').size == (40, 24)


def test_latent_size_follows_the_vae_and_the_network(unet_pipe):
    assert sample.latent_size(unet_pipe, None, None) == (16, 16)  # the network's own size
    assert sample.latent_size(unet_pipe, 64, 48) == (32, 24)
    with pytest.raises(sample.SampleError, match='multiples of 4'):
        sample.latent_size(unet_pipe, 18, 32)
    pixels = M.Pipeline(seeded(0, M.build, M.PRESETS['shapes']), M.PixelSpace(), unet_pipe.schedule)
    assert sample.latent_size(pixels, None, None) == (32, 32)
    with pytest.raises(sample.SampleError, match='multiples of 4'):  # two halvings, no VAE
        sample.latent_size(pixels, 30, 32)


# -----------------------------------------------------------------------------
# DDIM with classifier-free guidance


def reference_ddim(pipe, prompts, negative, steps, cfg, seed):
    """DDIM (eta 0) with guidance, from the schedule and plain network calls."""
    net, s = pipe.denoiser, pipe.schedule
    c, _ = pipe.text_encoder(prompts)
    u, _ = pipe.text_encoder([negative])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 4, 16, 16, generator=g)
    ts = [round(999 * (1 - i / (steps - 1))) for i in range(steps)]
    ac = s.alphas_cumprod.double()
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((len(prompts),), t)
            eps_c, eps_u = net(x, tt, c), net(x, tt, u.expand_as(c))
            eps = (eps_u + cfg * (eps_c - eps_u)).double()
            x0 = (x.double() - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
            if i + 1 < steps:
                x = (ac[ts[i + 1]].sqrt() * x0 + (1 - ac[ts[i + 1]]).sqrt() * eps).float()
        return pipe.vae.decode(x0.float()).clamp(-1, 1), ts


def test_ddim_multi_step_with_guidance(unet_teacher, unet_pipe, tmp_path):
    seen = []
    hook = unet_pipe.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        images = sample.generate(unet_pipe, ['a red circle', 'a blue square'], 'green', steps=3, cfg=2.0, seed=5)
    finally:
        hook.remove()
    expected, ts = reference_ddim(unet_pipe, ['a red circle', 'a blue square'], 'green', 3, 2.0, 5)
    assert ts == [999, 500, 0]
    assert [t.tolist() for t in seen] == [[t] * 4 for t in ts]  # one batched (cond + uncond) forward per step
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)
    one_step = sample.generate(unet_pipe, ['a red circle', 'a blue square'], steps=1, seed=5)
    no_cfg = sample.generate(unet_pipe, ['a red circle', 'a blue square'], 'green', steps=3, cfg=1.0, seed=5)
    assert not torch.allclose(images, one_step, atol=1e-3) and not torch.allclose(images, no_cfg, atol=1e-3)

    out = tmp_path / 'ddim.png'
    sample.main(['--checkpoint', str(unet_teacher), '--prompt', 'a red circle', '--negative-prompt', 'green',
                 '--steps', '3', '--cfg', '2', '--n', '2', '--device', 'cpu', '--out', str(out)])
    assert png(out).size == (2 * 32, 32)


# -----------------------------------------------------------------------------
# Bad input: one line, no traceback


def bad_inputs(tmp_path, unet_teacher):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n\n')
    ok = ['--checkpoint', unet_teacher, '--prompt', 'a red circle']
    return {
        'size': ([*ok, '--height', 18], 'cannot be generated'),
        'missing checkpoint': (['--checkpoint', tmp_path / 'nowhere', '--prompt', 'a red circle'], 'not found'),
        'empty prompt file': (['--checkpoint', unet_teacher, '--prompt-file', empty], 'holds no prompts'),
        'missing prompt file': (['--checkpoint', unet_teacher, '--prompt-file', tmp_path / 'none.txt'], 'not found'),
        'negative nasa scale': ([*ok, '--negative-prompt', 'red', '--nasa-scale', -0.5], '--nasa-scale must be at least 0'),
        'unknown nasa layer': ([*ok, '--negative-prompt', 'red', '--nasa-layers', 'no_such_block'],
                               'no cross-attention layer'),
        'zero steps': ([*ok, '--steps', 0], '--steps must be at least 1'),
    }


@pytest.mark.parametrize('case', ['size', 'missing checkpoint', 'empty prompt file', 'missing prompt file',
                                  'negative nasa scale', 'unknown nasa layer', 'zero steps'])
def test_bad_input_is_a_one_line_error(case, tmp_path, unet_teacher):
    args, message = bad_inputs(tmp_path, unet_teacher)[case]
    proc = run_script('sample.py', *args, '--device', 'cpu', '--out', tmp_path / 'x.png', cwd=tmp_path)
    line = assert_clean_error(proc, 'sample.py: error:')
    assert message in line
    assert not (tmp_path / 'x.png').exists()


# -----------------------------------------------------------------------------
# A diffusers-format folder (convert.py reads it in memory)


def has_read_diffusers():
    path = ROOT / 'convert.py'
    return path.is_file() and 'def read_diffusers' in path.read_text()


@pytest.fixture(scope='module')
def diffusers_folder(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved by diffusers itself (the oracle), with the tiny CLIP."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    root = tmp_path_factory.mktemp('diffusers')
    text = make_clip_text(root / 'text', hidden_size=32)
    unet = seeded(0, lambda: UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32))
    vae = seeded(1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
        norm_num_groups=32, sample_size=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(text / 'text_encoder'),
                                   tokenizer=CLIPTokenizer.from_pretrained(text / 'tokenizer'), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / 'sd')
    return root / 'sd', unet.eval(), vae.eval()


@pytest.mark.skipif(not has_read_diffusers(), reason='convert.py with read_diffusers() is not in this checkout yet')
def test_samples_from_a_diffusers_folder(diffusers_folder, tmp_path):
    folder, unet, vae = diffusers_folder
    assert (folder / 'model_index.json').is_file()
    pipe = sample.load(folder)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        torch.testing.assert_close(pipe.denoiser(x, t, c), unet(x, t, encoder_hidden_states=c).sample,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pipe.vae.decode(x), vae.decode(x / vae.config.scaling_factor).sample,
                                   atol=1e-4, rtol=1e-4)
    out = tmp_path / 'images'
    sample.main(['--checkpoint', str(folder), '--prompt', 'a red circle', '--negative-prompt', 'red',
                 '--nasa-scale', '0.3', '--n', '2', '--device', 'cpu', '--out', f'{out}/'])
    assert sorted(p.name for p in out.iterdir()) == ['00000.png', '00001.png']
    assert png(out / '00000.png').size == (32, 32)


@pytest.mark.skipif(not has_read_diffusers(), reason='convert.py with read_diffusers() is not in this checkout yet')
def test_a_diffusers_folder_without_a_denoiser_is_a_clean_error(tmp_path):
    (tmp_path / 'model_index.json').write_text('{}')
    with pytest.raises(sample.SampleError, match='unet'):
        sample.load(tmp_path)
