"""Shared fixtures: tiny random teachers (UNet + CLIP, DiT + T5) written as project checkpoint
folders, a prompt file, and a helper that runs a project script as a user would."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402

# The networks here are tiny: one thread is fastest, and several spin-wait against each other on a
# busy machine (the subprocesses below get OMP_NUM_THREADS=1 for the same reason).
torch.set_num_threads(1)

PROMPTS = ['a red circle', 'a blue square', 'a green triangle', 'a yellow circle']


def run_script(script, *args, timeout=120, cwd=None, launcher=()):
    """`python [launcher...] ROOT/script args...` in a clean, single-threaded environment; returns
    the CompletedProcess (never raises on a non-zero exit)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'TOKENIZERS_PARALLELISM': 'false'}
    env.pop('RANK', None)  # a stray RANK would turn `python train.py` into a DDP worker
    cmd = [sys.executable, *launcher, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc, prefix):
    """A user error: non-zero exit, the last stderr line starts with `prefix`, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith(prefix), proc.stderr
    return lines[-1]


def main_error(main, *args):
    """Run a script's main(args) in-process on bad input: it must exit non-zero after writing exactly one
    line, `SCRIPT: error: ...`, to stderr, and no traceback. Returns that line."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert exit_.value.code not in (0, None), err.getvalue()
    assert 'Traceback' not in err.getvalue(), err.getvalue()
    assert len(lines) == 1 and ': error: ' in lines[0], err.getvalue()
    return lines[0]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def seeded(seed, fn, *args):
    """fn(*args) under a fixed torch seed, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def make_clip_text(folder, hidden_size=32):
    import shapes
    shapes.make_text_encoder(str(folder), seed=0, hidden_size=hidden_size)
    return folder


def make_sdxl_text(folder):
    """SDXL's pair: text_encoder/ (CLIP, 32 wide) and text_encoder_2/ (CLIP with a 32-wide
    projection, the pooled vector), and a tokenizer for each."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    make_clip_text(folder)
    cfg = CLIPTextConfig.from_pretrained(Path(folder) / 'text_encoder').to_dict()
    cfg2 = CLIPTextConfig(**{**cfg, 'projection_dim': 32, 'architectures': None})
    seeded(1, CLIPTextModelWithProjection, cfg2).save_pretrained(Path(folder) / 'text_encoder_2')
    shutil.copytree(Path(folder) / 'tokenizer', Path(folder) / 'tokenizer_2')
    return folder


def make_t5_text(folder, clip_folder):
    """A tiny T5 encoder (d_model 32) beside a copy of the shapes tokenizer: model.TextEncoder
    recognises T5 by the config and then uses 120 tokens and an attention mask."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel
    shutil.copytree(Path(clip_folder) / 'tokenizer', Path(folder) / 'tokenizer')
    vocab = len(AutoTokenizer.from_pretrained(Path(folder) / 'tokenizer'))
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    seeded(0, T5EncoderModel, cfg).save_pretrained(Path(folder) / 'text_encoder')
    return folder


@pytest.fixture(scope='session')
def clip_text(tmp_path_factory):
    return make_clip_text(tmp_path_factory.mktemp('clip_text'))


@pytest.fixture(scope='session')
def t5_text(tmp_path_factory, clip_text):
    return make_t5_text(tmp_path_factory.mktemp('t5_text'), clip_text)


def make_teacher(folder, preset, schedule, text_folder, seed=0):
    net = seeded(seed, M.build, M.PRESETS[preset])
    vae = seeded(seed + 1, M.build, M.PRESETS['tiny_vae'])
    M.save_checkpoint(folder, net, vae, M.NoiseSchedule(M.SCHEDULES[schedule]), text_folder=text_folder)
    return folder


@pytest.fixture(scope='session')
def unet_teacher(tmp_path_factory, clip_text):
    """tiny_unet (context 32) + tiny_vae + SD schedule + a 32-wide CLIP text encoder."""
    return make_teacher(tmp_path_factory.mktemp('ckpt') / 'unet_teacher', 'tiny_unet', 'sd', clip_text)


@pytest.fixture(scope='session')
def dit_teacher(tmp_path_factory, t5_text):
    """tiny_dit (captions 32) + tiny_vae + PixArt schedule + a tiny T5 text encoder."""
    return make_teacher(tmp_path_factory.mktemp('ckpt') / 'dit_teacher', 'tiny_dit', 'pixart', t5_text)


@pytest.fixture(scope='session')
def sdxl_teacher(tmp_path_factory):
    """tiny_sdxl (context 64 = 32 + 32, pooled 32) + tiny_vae + SD schedule + the dual text encoder."""
    text = make_sdxl_text(tmp_path_factory.mktemp('sdxl_text'))
    return make_teacher(tmp_path_factory.mktemp('ckpt') / 'sdxl_teacher', 'tiny_sdxl', 'sd', text)


@pytest.fixture(scope='session')
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('prompts') / 'prompts.txt'
    path.write_text('\n'.join(PROMPTS) + '\n')
    return path


def real_images(teacher, path, n=6, seed=0):
    """n random uint8 images at the size a teacher's student draws, as --real-images reads them."""
    pipe = M.load_checkpoint(teacher, text=False)
    size = pipe.denoiser.cfg.sample_size * 2 ** (len(pipe.vae.cfg.channels) - 1)
    g = torch.Generator().manual_seed(seed)
    save_file({'images': torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)}, str(path))
    return path
