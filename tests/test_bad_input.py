"""Bad input to every script, run through its main() in-process: a non-zero exit, exactly one line
on stderr (`SCRIPT: error: ...`) that names the problem, no traceback, and nothing written or changed.
One table per script; the README's "Bad input" section lists the same classes."""
import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import bench
import cli
import convert
import model as M
import sample
import shapes
import train
from conftest import main_error, real_images


def digest(folder):
    """A hash of every file under a folder (or of one file): what a command must leave untouched."""
    paths = sorted(p for p in Path(folder).rglob('*') if p.is_file()) if Path(folder).is_dir() else [Path(folder)]
    return hashlib.sha1(b''.join(p.name.encode() + p.read_bytes() for p in paths)).hexdigest()


@pytest.fixture(scope='module')
def broken(tmp_path_factory, unet_teacher):
    """Copies of the tiny UNet teacher, each damaged in one way."""
    root = tmp_path_factory.mktemp('broken')

    def copy(name, damage):
        folder = root / name
        shutil.copytree(unet_teacher, folder)
        damage(folder)
        return folder
    den = lambda f: f / 'denoiser.safetensors'
    data = den(unet_teacher).read_bytes()

    def other_net(cfg):
        return lambda f: M.save_module(M.build(cfg), den(f))

    def nan_weights(f):
        t, meta = M.read_safetensors(den(f))
        t['conv_in.weight'][0, 0, 0, 0] = float('nan')
        save_file(t, str(den(f)), metadata=meta)
    from dataclasses import replace
    return {
        'truncated': copy('truncated', lambda f: den(f).write_bytes(data[:len(data) // 2])),
        'not safetensors': copy('text', lambda f: den(f).write_text('<html>not found</html>')),
        'empty': copy('empty', lambda f: den(f).write_bytes(b'')),
        'other channels': copy('channels', other_net(M.PRESETS['shapes'])),
        'other text width': copy('width', other_net(replace(M.PRESETS['tiny_unet'], context_dim=64))),
        'nan': copy('nan', nan_weights),
        'bad schedule': copy('schedule', lambda f: (f / 'schedule.json').write_text('{"beta_schedule": "cosine"}')),
    }


# -----------------------------------------------------------------------------
# sample.py


def sample_cases(tmp, teacher, broken):
    ok = ['--checkpoint', teacher, '--prompt', 'a red circle', '--device', 'cpu']
    (tmp / 'empty.txt').write_text('\n \n')
    (tmp / 'file').write_text('x')
    with_ckpt = lambda name: ['--checkpoint', broken[name], '--prompt', 'a red circle', '--device', 'cpu']
    return [
        ('truncated weights', with_ckpt('truncated'), 'a truncated safetensors file'),
        ('not safetensors', with_ckpt('not safetensors'), "bytes of text starting b'<html>"),
        ('empty weights', with_ckpt('empty'), 'an empty file'),
        ('wrong architecture', with_ckpt('other channels'), 'takes 3 channels but vae.safetensors has 4'),
        ('wrong text width', with_ckpt('other text width'), 'reads 64-wide text embeddings but text_encoder/ gives 32'),
        ('non-finite weights', with_ckpt('nan'), 'hold NaN or infinity (conv_in.weight)'),
        ('bad schedule.json', with_ckpt('bad schedule'), "unknown beta_schedule 'cosine'"),
        ('missing checkpoint', ['--checkpoint', tmp / 'nowhere', '--prompt', 'x'], 'not found'),
        ('no cuda', [*ok, '--device', 'cuda:99'], '--device cuda:99'),
        ('not a device', [*ok, '--device', 'gpu'], "'gpu' is not a device"),
        ('out under a file', [*ok, '--out', tmp / 'file' / 'x.png'], 'is a file, not a folder'),
        ('out not an image', [*ok, '--out', tmp / 'x.txt'], 'not an image format'),
        ('out over the checkpoint', [*ok, '--out', f'{teacher}/'], 'would write over the checkpoint'),
        ('cfg with one step', [*ok, '--cfg', 7.5], '--cfg 7.5 applies to DDIM with --steps > 1'),
        ('nasa layers, no negative', [*ok, '--nasa-layers', 'mid'], '--nasa-layers needs a negative prompt'),
        ('nasa scale, no negative', [*ok, '--nasa-scale', 0.5], '--nasa-scale needs a negative prompt'),
        ('negative nasa scale', [*ok, '--negative-prompt', 'red', '--nasa-scale', -0.5], '--nasa-scale must be at least 0'),
        ('nan nasa scale', [*ok, '--negative-prompt', 'red', '--nasa-scale', 'nan'], '--nasa-scale must be at least 0, got nan'),
        ('unknown nasa layer', [*ok, '--negative-prompt', 'red', '--nasa-layers', 'nope'], 'no cross-attention layer'),
        ('unknown guidance', [*ok, '--negative-prompt', 'red', '--guidance', 'cfg'], "--guidance must be one of nasa, nag, got 'cfg'"),
        ('nag tau zero', [*ok, '--negative-prompt', 'red', '--guidance', 'nag', '--nag-tau', 0], '--nag-tau must be above 0, got 0.0'),
        ('nag tau negative', [*ok, '--negative-prompt', 'red', '--guidance', 'nag', '--nag-tau', -1], '--nag-tau must be above 0'),
        ('nag scale under 1', [*ok, '--negative-prompt', 'red', '--guidance', 'nag', '--nag-scale', 0.5], '--nag-scale must be at least 1'),
        ('nag flag with nasa', [*ok, '--negative-prompt', 'red', '--nag-tau', 2], '--nag-tau applies to --guidance nag'),
        ('zero images', [*ok, '--n', 0], '--n must be at least 1, got 0'),
        ('zero steps', [*ok, '--steps', 0], '--steps must be at least 1, got 0'),
        ('negative seed', [*ok, '--seed', -1], '--seed must be at least 0'),
        ('size', [*ok, '--height', 18], 'cannot be generated'),
        ('empty prompt file', ['--checkpoint', teacher, '--prompt-file', tmp / 'empty.txt'], 'holds no prompts'),
        ('missing prompt file', ['--checkpoint', teacher, '--prompt-file', tmp / 'none.txt'], 'not found'),
    ]


SAMPLE_CASES = [
    'truncated weights', 'not safetensors', 'empty weights', 'wrong architecture', 'wrong text width',
    'non-finite weights', 'bad schedule.json', 'missing checkpoint', 'no cuda', 'not a device', 'out under a file',
    'out not an image', 'out over the checkpoint', 'cfg with one step', 'nasa layers, no negative',
    'nasa scale, no negative', 'negative nasa scale', 'nan nasa scale', 'unknown nasa layer', 'unknown guidance',
    'nag tau zero', 'nag tau negative', 'nag scale under 1', 'nag flag with nasa', 'zero images',
    'zero steps', 'negative seed', 'size', 'empty prompt file', 'missing prompt file']


@pytest.mark.parametrize('case', SAMPLE_CASES)
def test_sample_bad_input(case, tmp_path, unet_teacher, broken):
    _, args, expected = next(c for c in sample_cases(tmp_path, unet_teacher, broken) if c[0] == case)
    before = digest(unet_teacher)
    line = main_error(sample.main, *args, *([] if '--out' in args else ['--out', tmp_path / 'x.png']))
    assert line.startswith('sample.py: error: ') and expected in line, line
    assert not (tmp_path / 'x.png').exists() and digest(unet_teacher) == before


def test_a_long_prompt_is_cut_with_a_warning(unet_teacher, tmp_path, capsys):
    sample.main(['--checkpoint', str(unet_teacher), '--prompt', 'a red circle ' * 5, '--n', '1', '--device', 'cpu',
                 '--out', str(tmp_path / 'x.png')])
    err = capsys.readouterr().err
    assert 'sample.py: warning:' in err and 'reads only the first 8' in err


# -----------------------------------------------------------------------------
# train.py


def train_cases(tmp, teacher, prompts, broken):
    gan = ['--regression-weight', 0, '--gan-weight', 0.1, '--real-images']  # no teacher pairs to draw first

    def args(out='out', *extra):
        return ['--teacher', teacher, '--prompts', prompts, '--out', tmp / out, '--steps', 2, '--batch-size', 2,
                '--val-every', 0, *extra]
    (tmp / 'a_file').write_text('x')
    (tmp / 'empty.txt').write_text('\n')
    (tmp / 'used' / 'checkpoints' / 'step-0000002').mkdir(parents=True)
    save_file({'images': torch.zeros(2, 8, 8, 3)}, str(tmp / 'float.safetensors'))
    save_file({'images': torch.zeros(2, 5, 5, 3, dtype=torch.uint8)}, str(tmp / 'small.safetensors'))
    real_images(teacher, tmp / 'real.safetensors')
    return [
        ('batch size 0', [*args(), '--batch-size', 0], '--batch-size must be at least 1, got 0'),
        ('steps 0', [*args(), '--steps', 0], '--steps must be at least 1, got 0'),
        ('negative steps', [*args(), '--steps', -3], '--steps must be at least 1, got -3'),
        ('nan learning rate', [*args(), '--lr-student', 'nan'], '--lr-student must be above 0, got nan'),
        ('inf lora alpha', [*args(), '--lora-alpha', 'inf'], '--lora-alpha must be above 0, got inf'),
        ('ema of 1', [*args(), '--ema', 1], '--ema must be at least 0 and below 1, got 1.0'),
        ('kappa range upside down', [*args(), '--kappa-max', 0.1], '--kappa-max must be at least 0.5'),
        ('t_max beyond the schedule', [*args(), '--t-max', 5000], '--t-max must be at least 20 and at most 999'),
        ('student_t beyond the schedule', [*args(), '--student-t', 1000], '--student-t must be at least -1000 and at most 999'),
        ('unknown lr schedule', [*args(), '--lr-schedule', 'step'], '--lr-schedule must be one of constant, cosine'),
        ('no cuda', [*args(), '--device', 'cuda:99'], '--device cuda:99'),
        ('out is a file', args('a_file'), 'is a file, not a folder'),
        ('out under a file', args('a_file/run'), 'cannot create the folder'),
        ('out is the teacher', [*args(), '--out', teacher], 'would write over the teacher'),
        ('resume with nothing', [*args(), '--resume'], 'holds no checkpoint to resume from'),
        ('checkpoints without resume', args('used'), 'already holds the checkpoints of a training'),
        ('missing teacher', [*args(), '--teacher', tmp / 'nowhere'], 'not found'),
        ('truncated teacher', [*args(), '--teacher', broken['truncated']], 'a truncated safetensors file'),
        ('empty prompt file', [*args(), '--prompts', tmp / 'empty.txt'], 'holds no prompts'),
        ('missing negative prompt file', [*args(), '--nasa-train', '--negative-prompts', tmp / 'none.txt'],
         f"negative prompt file {tmp / 'none.txt'} not found (pass --negative-prompts FILE"),
        ('empty negative prompt file', [*args(), '--nasa-train', '--negative-prompts', tmp / 'empty.txt'],
         'holds no negative prompts (one per line)'),
        ('nasa-train without negatives', [*args(), '--nasa-train'], '--nasa-train needs --negative-prompts FILE'),
        ('negatives without nasa-train', [*args(), '--negative-prompts', tmp / 'empty.txt'],
         '--negative-prompts applies to --nasa-train'),
        ('negative nasa alpha max', [*args(), '--nasa-alpha-max', -1], '--nasa-alpha-max must be at least 0'),
        ('fsdp with ema', [*args(), '--fsdp', '--ema', 0.9], '--fsdp with --ema is not supported'),
        ('regression pool above the image', [*args(), '--regression-weight', 1, '--regression-pool', 999],
         '--regression-pool 999 is larger than the student'),
        ('gan without real images', [*args(), '--gan-weight', 0.1], '--gan-weight needs --real-images FILE'),
        ('real images without gan', [*args(), '--real-images', tmp / 'real.safetensors'],
         '--real-images applies to the GAN term'),
        ('missing real images', [*args(), *gan, tmp / 'none.safetensors'],
         f"--real-images {tmp / 'none.safetensors'} not found"),
        ('truncated real images', [*args(), *gan, broken['truncated'] / 'denoiser.safetensors'],
         'a truncated safetensors file'),
        ('real images as floats', [*args(), *gan, tmp / 'float.safetensors'],
         "holds images torch.float32 (2, 8, 8, 3): it needs 'images', uint8 (N, H, W, 3)"),
        ('real images of another size', [*args(), *gan, tmp / 'small.safetensors'],
         'its 5x5 images make'),
        ('unknown gan layer', [*args(), *gan, tmp / 'real.safetensors', '--gan-layer', 'mid_block.nothing'],
         '--gan-layer mid_block.nothing'),
        ('gan timesteps beyond vsd', [*args(), *gan, tmp / 'real.safetensors', '--gan-t-max', 990],
         '--gan-t-max must be at least 20 and at most 980, got 990 (the GAN term draws t from [t_min, gan_t_max])'),
    ]


TRAIN_CASES = [
    'batch size 0', 'steps 0', 'negative steps', 'nan learning rate', 'inf lora alpha', 'ema of 1',
    'kappa range upside down', 't_max beyond the schedule', 'student_t beyond the schedule', 'unknown lr schedule',
    'no cuda', 'out is a file', 'out under a file', 'out is the teacher', 'resume with nothing',
    'checkpoints without resume', 'missing teacher', 'truncated teacher', 'empty prompt file',
    'missing negative prompt file', 'empty negative prompt file', 'nasa-train without negatives',
    'negatives without nasa-train', 'negative nasa alpha max', 'fsdp with ema', 'regression pool above the image',
    'gan without real images', 'real images without gan', 'missing real images', 'truncated real images',
    'real images as floats', 'real images of another size', 'unknown gan layer', 'gan timesteps beyond vsd']


@pytest.mark.parametrize('case', TRAIN_CASES)
def test_train_bad_input(case, tmp_path, unet_teacher, prompt_file, broken):
    _, args, expected = next(c for c in train_cases(tmp_path, unet_teacher, prompt_file, broken) if c[0] == case)
    before = digest(unet_teacher)
    line = main_error(train.main, *args)
    assert line.startswith('train.py: error: ') and expected in line, line
    assert not (tmp_path / 'out' / 'student').exists() and not (tmp_path / 'out' / 'train.lock').exists()
    assert digest(unet_teacher) == before


def test_two_trainings_cannot_share_an_out(tmp_path, unet_teacher, prompt_file):
    (tmp_path / 'out').mkdir()
    other = subprocess.Popen(['sleep', '60'])  # a live process that holds the lock
    try:
        (tmp_path / 'out' / 'train.lock').write_text(f"{socket.gethostname()} {other.pid}")
        line = main_error(train.main, '--teacher', unet_teacher, '--prompts', prompt_file, '--out', tmp_path / 'out',
                          '--steps', 1, '--batch-size', 2)
    finally:
        other.kill()
        other.wait()
    assert f'is in use by another training (process {socket.gethostname()} {other.pid}' in line
    assert (tmp_path / 'out' / 'train.lock').read_text() == f"{socket.gethostname()} {other.pid}"  # left alone
    assert not (tmp_path / 'out' / 'student').exists()


# -----------------------------------------------------------------------------
# convert.py


def test_convert_bad_input(tmp_path, unet_teacher, broken):
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    cases = [
        ('OUT == SRC', [unet_teacher, unet_teacher], 'would write over SRC'),
        ('OUT == SRC, to diffusers', [unet_teacher, unet_teacher, '--to', 'diffusers'], 'would write over SRC'),
        ('OUT inside SRC', [unet_teacher, unet_teacher / 'diffusers', '--to', 'diffusers'], 'would write over SRC'),
        ('OUT is --vae', [unet_teacher, tmp_path / 'v', '--vae', tmp_path / 'v'], 'would write over --vae'),
        ('OUT an existing file', [unet_teacher, tmp_path / 'a_file', '--to', 'diffusers'], 'is an existing file'),
        ("OUT a folder we did not write", [unet_teacher, tmp_path / 'mine'], 'a folder this project did not write'),
        ('SRC missing', [tmp_path / 'nowhere', tmp_path / 'out'], 'does not exist'),
        ('SRC truncated', [broken['truncated'], tmp_path / 'out'], 'a truncated safetensors file'),
        ('SRC bad schedule', [broken['bad schedule'], tmp_path / 'out'], "unknown beta_schedule 'cosine'"),
    ]
    before = digest(unet_teacher)
    for name, args, expected in cases:
        line = main_error(convert.main, *args)
        assert line.startswith('convert.py: error: ') and expected in line, (name, line)
    assert digest(unet_teacher) == before and (tmp_path / 'a_file').read_text() == 'x'
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me' and not (tmp_path / 'out').exists()


def test_convert_replaces_a_folder_it_wrote(tmp_path, unet_teacher):
    for to in ('ours', 'diffusers', 'ours'):  # each replaces the one before it
        convert.main([str(unet_teacher), str(tmp_path / 'out'), '--to', to])
    assert (tmp_path / 'out' / 'denoiser.safetensors').is_file() and not (tmp_path / 'out' / 'unet').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no .tmp or .old left


# -----------------------------------------------------------------------------
# shapes.py and bench.py


def test_shapes_bad_input(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'empty_run' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'n256.json').write_text(json.dumps({  # an earlier curve's teacher, scored at n=256
        'teacher_path': str(Path('checkpoints/shapes_teacher').resolve()), 'n': 256, 'seed': 0, 'teacher_steps': 25,
        'teacher_cfg': 3.0, 'teacher': {}}))
    cases = [
        (['evaluate', '--student', tmp_path / 'nowhere'], 'the student', 'not found'),
        (['evaluate', '--n', -4], '--n', 'must be at least 18, got -4'),
        (['evaluate', '--teacher-steps', 0], '--teacher-steps', 'must be at least 1'),
        (['evaluate', '--json', tmp_path / 'a_file' / 'r.json'], '--json', 'is a file, not a folder'),
        (['curve', tmp_path / 'empty_run'], 'empty_run', 'holds no checkpoints/step-N'),
        (['curve', tmp_path / 'nowhere'], 'a run', 'not found'),
        (['curve', 'checkpoints/shapes_student', '--teacher-from', tmp_path / 'a_file'], '--teacher-from',
         'not a curve JSON'),
        (['curve', 'checkpoints/shapes_student', '--teacher-from', tmp_path / 'n256.json', '--n', 900],
         '--teacher-from', 'scored the teacher with n 256, this curve asks for 900'),
        (['train-teacher', '--steps', 0, '--out', tmp_path / 't'], '--steps', 'must be at least 1'),
        (['train-teacher', '--arch', 'tiny_dit', '--out', tmp_path / 't'], '--arch', 'must be one of shapes, shapes_dit'),
        (['negatives', tmp_path / 'a_file' / 'n.txt'], 'OUT', 'is a file, not a folder'),
        (['train-teacher', '--lr', 'nan', '--out', tmp_path / 't'], '--lr', 'must be above 0, got nan'),
        (['train-teacher', '--out', tmp_path / 'a_file'], '--out', 'is a file'),
        (['train-teacher', '--resume', '--out', tmp_path / 't'], '--resume', 'holds no checkpoint'),
        (['train-teacher', '--text-encoder', tmp_path / 'nowhere', '--out', tmp_path / 't'], '--text-encoder',
         'has no text_encoder/ folder'),
        (['make-text-encoder', tmp_path / 'te', '--hidden-size', 6], '--hidden-size', 'multiple of'),
        (['show', tmp_path / 'grid'], 'OUT', 'does not end in an image format'),
        (['prompts', tmp_path / 'a_file' / 'p.txt'], 'OUT', 'is a file, not a folder'),
        (['real-images', tmp_path / 'r.safetensors', '--n', 0], '--n', 'must be at least 1'),
        (['real-images', tmp_path / 'a_file' / 'r.safetensors'], 'OUT', 'is a file, not a folder'),
        (['sweep', tmp_path / 'nowhere'], 'the student', 'not found'),
        (['losses', 'checkpoints/shapes_teacher', tmp_path / 'nowhere'], 'nowhere', 'not found'),
        (['losses', 'checkpoints/shapes_teacher', '--n', 0], '--n', 'must be at least 1'),
        (['sweep', 'checkpoints/shapes_student', '--scales', '0,x'], '--scales', 'comma-separated numbers'),
        (['sweep', 'checkpoints/shapes_student', '--guidance', 'nag', '--scales', '0.5'], '--scales',
         "must be at least 1, got 0.5 (NAG's scale is 1 when off)"),
        (['sweep', 'checkpoints/shapes_student', '--guidance', 'nag', '--nag-tau', 0], '--nag-tau', 'must be above 0'),
        (['sweep', 'checkpoints/shapes_teacher', '--guidance', 'cfg', '--steps', 1], '--steps',
         'CFG needs a multi-step teacher'),
        (['sweep', 'checkpoints/shapes_teacher', '--guidance', 'cfg', '--scales', '0.5'], '--scales',
         'at CFG 1 the negative prompt has no weight'),
        (['sweep', 'checkpoints/shapes_teacher', '--guidance', 'cfg', '--nasa-layers', 'mid_block'], '--nasa-layers',
         'drop it with --guidance cfg'),
        (['sweep', 'checkpoints/shapes_student', '--nasa-layers', 'attn9', '--scales', '0.3'], 'attn9',
         'no cross-attention layer matches'),
    ]
    for args, names, expected in cases:
        line = main_error(shapes.main, *args)
        assert line.startswith('shapes.py: error: ') and names in line and expected in line, (args, line)
    assert not (tmp_path / 't' / 'teacher').exists() and not (tmp_path / 'te' / 'text_encoder').exists()


def test_bench_bad_input(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    for args, expected in [(['--repeats', 0], '--repeats must be at least 1'),
                           (['--threads', 0], '--threads must be at least 1'),
                           (['--figures', '1,5'], '--figures 1,5'),
                           (['--device', 'cuda:99'], '--device cuda:99'),
                           (['--json', tmp_path / 'a_file' / 'b.json'], 'is a file, not a folder')]:
        line = main_error(bench.main, *args)
        assert line.startswith('bench.py: error: ') and expected in line, line


# -----------------------------------------------------------------------------
# The one helper behind every script's line


def test_the_wrapper_keeps_a_traceback_for_debugging_and_names_our_own_faults(monkeypatch):
    @cli.script('x.py')
    def faulty(argv=None):
        raise KeyError('oops')
    line = main_error(faulty)
    assert line.startswith("x.py: error: unexpected KeyError: 'oops'") and 'SNOOPI_DEBUG=1' in line
    monkeypatch.setenv('SNOOPI_DEBUG', '1')
    with pytest.raises(KeyError):
        faulty()
    with pytest.raises(cli.UserError, match='--steps must be at least 1'):
        train.main(['--steps', '0'])


@pytest.mark.parametrize('main, args, what', [
    (train.main, ['--steps', 'abc'], "argument --steps: invalid int value: 'abc'"),
    (sample.main, ['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (convert.main, [], 'the following arguments are required: src, out'),
    (shapes.main, ['evaluate', '--n', 'many'], "argument --n: invalid int value: 'many'"),
    (bench.main, ['--repeats', '1.5'], "argument --repeats: invalid int value: '1.5'"),
])
def test_argparse_errors_are_one_line_too(main, args, what):
    """argparse's own errors (an unknown flag, a word where a number goes): the same one line, no usage block."""
    line = main_error(main, *args)
    assert what in line and line.endswith('--help)'), line
