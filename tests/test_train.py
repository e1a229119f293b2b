"""train.py end to end on tiny random teachers: PG-SB steps, the student it writes, two ranks under
torchrun (gloo), stop-and-resume, safe checkpoints, and clean errors on bad input."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model as M
import sample
import train
from conftest import PROMPTS, assert_clean_error, free_port, main_error, real_images, run_script, seeded

STEP_TIMEOUT = 240  # a CI machine can be slow; a few tiny steps take seconds


def train_args(teacher, prompts, out, steps, *extra):
    """PG-SB as the paper has it (the shapes_pgsb preset's settings) on a tiny teacher, unless extra
    names another preset."""
    return ['--preset', 'shapes_pgsb', '--teacher', teacher, '--prompts', prompts, '--out', out, '--steps', steps,
            '--batch-size', 2, '--log-every', 1, '--val-every', 0, *extra]


def run_train(*args, launcher=()):
    proc = run_script('train.py', *args, timeout=STEP_TIMEOUT, launcher=launcher)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def torchrun(*args):
    launcher = ['-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
                f'--master_port={free_port()}']
    return run_train(*args, launcher=launcher)


def read_log(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def check_log(records, steps, batch, kappa_range):
    steps_logged = [r for r in records if 'vsd' in r]
    assert [r['step'] for r in steps_logged] == list(range(1, steps + 1))
    for r in steps_logged:
        assert math.isfinite(r['vsd']) and r['vsd'] >= 0 and math.isfinite(r['lora']) and r['lora'] > 0
        assert len(r['kappa']) == batch
        assert all(kappa_range[0] <= k <= kappa_range[1] for k in r['kappa'])
        assert abs(r['kappa_mean'] - sum(r['kappa']) / batch) < 1e-3
        assert r['sec'] > 0
    assert len({tuple(r['kappa']) for r in steps_logged}) == steps  # fresh draws every step
    return steps_logged


def sample_from(student, tmp_path, *extra):
    out = tmp_path / 'student.png'
    sample.main(['--checkpoint', str(student), '--prompt', PROMPTS[0], '--negative-prompt', 'red',
                 '--nasa-scale', '0.5', '--n', '2', '--device', 'cpu', '--out', str(out), *map(str, extra)])
    from PIL import Image
    with Image.open(out) as im:
        im.load()
        return im


def differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def unet_run(tmp_path_factory, unet_teacher, prompt_file):
    """Four uninterrupted PG-SB steps on the tiny UNet with an EMA, a checkpoint every two."""
    out = tmp_path_factory.mktemp('unet_run')
    run_train(*train_args(unet_teacher, prompt_file, out, 4, '--save-every', 2, '--val-every', 2, '--ema', 0.9))
    return out


def test_pg_sb_steps_on_the_tiny_unet(unet_run, unet_teacher, tmp_path):
    check_log(read_log(unet_run), 4, 2, (0.5, 4.0))
    assert sorted(p.name for p in (unet_run / 'checkpoints').iterdir()) == ['step-0000002', 'step-0000004']
    state = load_file(str(unet_run / 'checkpoints' / 'step-0000004' / 'state.safetensors'))
    lora_up = [v for k, v in state.items() if k.startswith('teacher.') and 'lora_up' in k]
    assert lora_up and any(torch.count_nonzero(v) for v in lora_up)  # the LoRA teacher trained
    assert not any(k.startswith('teacher.') and 'lora_' not in k for k in state)  # base weights not duplicated
    assert (unet_run / 'val' / 'step-0000002.png').is_file()

    pipe = M.load_checkpoint(unet_run / 'student')
    assert isinstance(pipe.denoiser, M.UNet) and isinstance(pipe.vae, M.VAE)
    assert pipe.student_t == 999 and pipe.text_encoder is not None
    teacher = M.load_checkpoint(unet_teacher, text=False).denoiser
    assert differs(pipe.denoiser.state_dict(), teacher.state_dict())  # the student moved
    student = load_file(str(unet_run / 'student' / 'denoiser.safetensors'))
    # with --ema the saved student is the last EMA, not the last weights
    assert all(torch.equal(student[k], state['ema.' + k]) for k in student)
    assert differs(student, {k: state['student.' + k] for k in student})
    im = sample_from(unet_run / 'student', tmp_path)
    assert im.size == (2 * 32, 32) and im.mode == 'RGB'


def test_lora_on_the_resnet_convolutions_with_several_updates_per_step(unet_teacher, prompt_file, tmp_path):
    out = tmp_path / 'conv_run'
    run_train(*train_args(unet_teacher, prompt_file, out, 2, '--lora-targets', 'to_q,to_v,conv1,conv2',
                          '--lora-updates', 3))
    check_log(read_log(out), 2, 2, (0.5, 4.0))
    state = load_file(str(out / 'checkpoints' / 'step-0000002' / 'state.safetensors'))
    conv_up = {k: v for k, v in state.items() if k.startswith('teacher.') and 'conv1.lora_up' in k}
    assert conv_up and all(v.ndim == 4 and torch.count_nonzero(v) for v in conv_up.values())
    # three Adam steps per student step: the adapters' moments counted three steps each
    opt_steps = [v.item() for k, v in state.items() if k.startswith('opt.lora.') and k.endswith('.step')]
    assert opt_steps and set(opt_steps) == {6.0}
    pipe = M.load_checkpoint(out / 'student')  # the student checkpoint holds no adapters
    assert not any('lora_' in k for k in pipe.denoiser.state_dict())


def test_regression_term_fits_the_frozen_teachers_ddim_pairs(unet_teacher, prompt_file, tmp_path):
    """--regression-weight: the pairs are the frozen teacher's DDIM images from their own noise, drawn
    once and cached (a resume reads them back, no second draw), the term is logged each step, and
    --regression-decay switches it off."""
    out = tmp_path / 'regression_run'
    extra = ('--regression-weight', 0.5, '--regression-pairs', 3, '--regression-steps', 2, '--regression-cfg', 2.0,
             '--regression-pool', 2)
    train.main([str(a) for a in train_args(unet_teacher, prompt_file, out, 2, *extra)])
    records = check_log(read_log(out), 2, 2, (0.5, 4.0))
    assert all(math.isfinite(r['regression']) and r['regression'] > 0 for r in records)
    cache = [c for c in (out / 'prompt_cache').iterdir() if '-pairs-' in c.name]
    assert len(cache) == 1
    pairs = load_file(str(cache[0]))
    assert pairs['z'].shape[0] == pairs['x0'].shape[0] == pairs['context'].shape[0] == 3
    pipe = M.load_checkpoint(unet_teacher)
    u, um, _ = pipe.text_encoder.null()
    x0 = sample.ddim(pipe.denoiser, pipe.schedule, pairs['z'], (pairs['context'], None, None), (u, um, None), 2, 2.0)
    torch.testing.assert_close(x0, pairs['x0'], rtol=1e-4, atol=1e-5)
    stamp = cache[0].stat().st_mtime_ns
    # resumed with --regression-decay 2: the weight is 1 - step / 2, so the third step (step 2) has no term
    train.main([str(a) for a in train_args(unet_teacher, prompt_file, out, 3, *extra, '--resume',
                                           '--regression-decay', 2)])
    records = read_log(out)
    assert cache[0].stat().st_mtime_ns == stamp and len(records) == 3
    assert 'regression' not in records[2] and math.isfinite(records[2]['vsd'])


def test_gan_term_trains_its_head_and_resumes_to_the_same_run(unet_teacher, prompt_file, tmp_path):
    """--gan-weight on the shapes recipe: both of DMD2's GAN losses are logged each step, the classifier
    head is in the checkpoint and moves, and a run stopped after 2 steps and resumed to 4 ends where 4
    straight steps end, to the bit."""
    real = real_images(unet_teacher, tmp_path / 'real.safetensors')
    runs = {}
    for name, stops in (('straight', [4]), ('resumed', [2, 4])):
        out = runs[name] = tmp_path / name
        for i, steps in enumerate(stops):
            train.main([str(a) for a in train_args(
                unet_teacher, prompt_file, out, steps, '--preset', 'shapes', '--save-every', 2, '--regression-weight', 0,
                '--gan-weight', 0.1, '--real-images', real, *(['--resume'] if i else []))])
    straight, resumed = (read_log(o) for o in runs.values())
    assert all(0 < r['gan_g'] < 10 and 0 < r['gan_d'] < 10 for r in straight)
    keys = ('step', 'vsd', 'lora', 'kappa', 'gan_g', 'gan_d')
    assert [{k: r[k] for k in keys} for r in straight] == [{k: r[k] for k in keys} for r in resumed]
    a, b, first = (load_file(str(o / 'checkpoints' / step / 'state.safetensors'))
                   for o, step in ((runs['straight'], 'step-0000004'), (runs['resumed'], 'step-0000004'),
                                   (runs['straight'], 'step-0000002')))
    head = [k for k in a if k.startswith('gan.head.')]
    assert head and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], first[k]) for k in head)


def test_unknown_lora_target_is_a_clean_error(unet_teacher, prompt_file, tmp_path):
    proc = run_script('train.py', *train_args(unet_teacher, prompt_file, tmp_path / 'x', 1, '--lora-targets', 'to_qq'),
                      timeout=STEP_TIMEOUT)
    assert_clean_error(proc, 'train.py: error: no linear or convolution layer named')


def test_pg_sb_steps_on_the_tiny_dit(dit_teacher, prompt_file, tmp_path):
    out = tmp_path / 'dit_run'
    run_train(*train_args(dit_teacher, prompt_file, out, 3, '--student-t', 400, '--kappa-min', 1.0,
                          '--kappa-max', 3.0, '--save-every', 2))
    check_log(read_log(out), 3, 2, (1.0, 3.0))
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['step-0000002', 'step-0000003']
    pipe = M.load_checkpoint(out / 'student')
    assert isinstance(pipe.denoiser, M.DiT) and pipe.student_t == 400 and pipe.text_encoder.is_t5
    cache = next((out / 'prompt_cache').iterdir())
    assert load_file(str(cache))['mask'].shape == (len(PROMPTS), 120)  # T5 masks were cached
    im = sample_from(out / 'student', tmp_path, '--height', 24, '--width', 40)
    assert im.size == (2 * 40, 24)


def test_pg_sb_steps_on_a_tiny_sdxl(sdxl_teacher, prompt_file, tmp_path):
    """The sdxl preset on tiny_sdxl: the pooled text is cached with the prompts, the null prompt is
    SDXL's zeros, the size ids reach the UNet (which refuses to run without them), in train.py's main."""
    out = tmp_path / 'sdxl_run'
    train.main([str(a) for a in train_args(sdxl_teacher, prompt_file, out, 2, '--preset', 'sdxl',
                                           '--lora-rank', 4, '--val-every', 2)])
    check_log(read_log(out), 2, 2, (0.5, 4.0))  # the preset's kappa range
    assert (out / 'val' / 'step-0000002.png').is_file()
    cache = load_file(str(next((out / 'prompt_cache').iterdir())))
    assert cache['pooled'].shape == (len(PROMPTS), 32) and cache['context'].shape[-1] == 64
    assert not cache['null'].any() and not cache['null_pooled'].any()
    pipe = M.load_checkpoint(out / 'student')
    assert pipe.denoiser.cfg == M.PRESETS['tiny_sdxl'] and pipe.student_t == 999
    assert pipe.text_encoder.model_2 is not None
    teacher = M.load_checkpoint(sdxl_teacher, text=False).denoiser
    assert differs(pipe.denoiser.state_dict(), teacher.state_dict())
    im = sample_from(out / 'student', tmp_path)
    assert im.size == (2 * 32, 32) and im.mode == 'RGB'


def test_nasa_t_steps_cache_the_negatives_and_draw_alpha_each_step(unet_teacher, prompt_file, tmp_path):
    """--nasa-train: the negatives are cached beside the prompts (this rank's shard), the NASA scale is
    drawn in [0, nasa_alpha_max] each step and logged, and the student is written."""
    from safetensors import safe_open
    negatives = tmp_path / 'negatives.txt'
    negatives.write_text('red\nblue\n\n  green \n')
    out = tmp_path / 'nasa_t_run'
    train.main([str(a) for a in train_args(unet_teacher, prompt_file, out, 3, '--nasa-train', '--negative-prompts',
                                           negatives, '--nasa-alpha-max', 0.8)])
    records = check_log(read_log(out), 3, 2, (0.5, 4.0))
    alphas = [r['nasa_alpha'] for r in records]
    assert all(0 <= a <= 0.8 for a in alphas) and len(set(alphas)) == 3, alphas
    caches = sorted((out / 'prompt_cache').iterdir())
    neg_cache = [c for c in caches if '-negatives-0-of-1' in c.name]
    assert len(caches) == 2 and len(neg_cache) == 1
    with safe_open(str(neg_cache[0]), 'pt') as f:
        assert json.loads(f.metadata()['prompts']) == ['red', 'blue', 'green']
    assert load_file(str(neg_cache[0]))['context'].shape[:1] == (3,)
    assert (out / 'student' / 'denoiser.safetensors').is_file()


def test_two_ranks_under_torchrun_stay_identical(unet_teacher, prompt_file, tmp_path):
    out = tmp_path / 'ddp_run'
    torchrun(*train_args(unet_teacher, prompt_file, out, 3, '--lr-student', 1e-3))
    records = read_log(out)
    check_log(records, 3, 1, (0.5, 4.0))  # rank 0's share of the global batch of 2
    assert records[-1] == {'step': 3, 'ranks_identical': True}
    # each rank drew its own prompts, noise and kappa: two single-rank shards of the cache
    assert sorted(p.name.split('-', 1)[1] for p in (out / 'prompt_cache').iterdir()) == \
        ['0-of-2.safetensors', '1-of-2.safetensors']
    teacher = M.load_checkpoint(unet_teacher, text=False).denoiser
    assert differs(M.load_checkpoint(out / 'student', text=False).denoiser.state_dict(), teacher.state_dict())


def test_fsdp_under_torchrun_matches_ddp_and_resumes(unet_teacher, prompt_file, tmp_path):
    """--fsdp on two gloo ranks, stopped after 2 steps and resumed to 4, against 4 steps of DDP: the
    same losses, and checkpoints (weights, AdamW moments, every rank's random state) and student
    identical to the bit, the gradients clipped (a small --grad-clip) in both."""
    ddp, fsdp = tmp_path / 'ddp', tmp_path / 'fsdp'
    extra = ['--lr-student', 1e-3, '--grad-clip', 1e-3, '--save-every', 2]
    torchrun(*train_args(unet_teacher, prompt_file, ddp, 4, *extra))
    torchrun(*train_args(unet_teacher, prompt_file, fsdp, 2, *extra, '--fsdp'))
    torchrun(*train_args(unet_teacher, prompt_file, fsdp, 4, *extra, '--fsdp', '--resume'))
    a, b = read_log(ddp), read_log(fsdp)
    assert a[-1] == b[-1] == {'step': 4, 'ranks_identical': True}
    steps = lambda log: [{k: r[k] for k in ('step', 'vsd', 'lora', 'kappa')} for r in log if 'vsd' in r]
    assert [r['step'] for r in steps(b)] == [1, 2, 3, 4] and steps(a) == steps(b)
    for step in ('0000002', '0000004'):
        a, b = (load_file(str(o / 'checkpoints' / f'step-{step}' / 'state.safetensors')) for o in (ddp, fsdp))
        assert a.keys() == b.keys() and {'rng', 'rng.1'} <= a.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    a, b = (load_file(str(o / 'student' / 'denoiser.safetensors')) for o in (ddp, fsdp))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    teacher = M.load_checkpoint(unet_teacher, text=False).denoiser
    assert differs(M.load_checkpoint(fsdp / 'student', text=False).denoiser.state_dict(), teacher.state_dict())
    # each rank has its own prompts and random state: resuming on another number of ranks is refused
    line = main_error(train.main, *train_args(unet_teacher, prompt_file, fsdp, 6, '--resume'))
    assert 'was written by a training on 2 rank(s), this one runs on 1 (resume it on 2)' in line, line


def test_resume_gives_the_same_run(unet_run, unet_teacher, prompt_file, tmp_path):
    out = tmp_path / 'resumed'
    args = train_args(unet_teacher, prompt_file, out, 2, '--save-every', 2, '--ema', 0.9)
    run_train(*args)
    assert [r['step'] for r in read_log(out)] == [1, 2]
    args[args.index('--steps') + 1] = 4
    run_train(*args, '--resume')
    straight, resumed = read_log(unet_run), read_log(out)
    assert [r['step'] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in ('step', 'vsd', 'lora', 'kappa')} == {k: b[k] for k in ('step', 'vsd', 'lora', 'kappa')}
    # the weights, the LoRA adapters and the optimizer moments end bit-identical
    a = load_file(str(unet_run / 'checkpoints' / 'step-0000004' / 'state.safetensors'))
    b = load_file(str(out / 'checkpoints' / 'step-0000004' / 'state.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(o / 'student' / 'denoiser.safetensors')) for o in (unet_run, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_shapes_recipe_resumes_to_the_same_run(unet_teacher, prompt_file, tmp_path):
    """The shapes preset (train.py's default: unguided LoRA teacher on fresh samples, DMD's weighting,
    the regression term on cached teacher pairs, warm-up, EMA) stopped after 2 steps and resumed to 4
    ends where 4 straight steps end, to the bit; the pairs are drawn once and read back on resume."""
    runs = {}
    for name, stops in (('straight', [4]), ('resumed', [2, 4])):
        out = runs[name] = tmp_path / name
        for i, steps in enumerate(stops):
            run_train(*train_args(unet_teacher, prompt_file, out, steps, '--preset', 'shapes', '--save-every', 2,
                                  '--regression-pairs', 3, '--regression-steps', 2, *(['--resume'] if i else [])))
    straight, resumed = (read_log(o) for o in runs.values())
    assert [r['step'] for r in resumed] == [1, 2, 3, 4]
    assert all(math.isfinite(r['regression']) for r in straight)
    keys = ('step', 'vsd', 'lora', 'kappa', 'regression')
    assert [{k: r[k] for k in keys} for r in straight] == [{k: r[k] for k in keys} for r in resumed]
    cfg = train.parse_args([])
    assert (cfg.lora_kappa, cfg.vsd_weight, cfg.lora_fresh, cfg.ema) == (1.0, 'dmd', True, 0.99)
    a, b = (load_file(str(o / 'checkpoints' / 'step-0000004' / 'state.safetensors')) for o in runs.values())
    assert a.keys() == b.keys() and any(k.startswith('ema.') for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_run_saves_resumes_and_matches(unet_run, unet_teacher, prompt_file, tmp_path):
    """--channels-last changes only the convolutions' memory order: the same losses up to rounding,
    checkpoints that save and resume (optimizer moments are NHWC too), the same student update."""
    out = tmp_path / 'nhwc'
    args = train_args(unet_teacher, prompt_file, out, 2, '--save-every', 2, '--ema', 0.9, '--channels-last')
    run_train(*args)
    args[args.index('--steps') + 1] = 4
    run_train(*args, '--resume')
    straight, nhwc = read_log(unet_run), read_log(out)
    assert [r['step'] for r in nhwc] == [1, 2, 3, 4]
    for a, b in zip(straight, nhwc):
        assert a['kappa'] == b['kappa']
        assert b['vsd'] == pytest.approx(a['vsd'], rel=1e-3) and b['lora'] == pytest.approx(a['lora'], rel=1e-3)
    a, b = (load_file(str(o / 'student' / 'denoiser.safetensors')) for o in (unet_run, out))
    teacher = M.load_checkpoint(unet_teacher, text=False).denoiser.state_dict()
    assert a.keys() == b.keys()
    step_a, step_b = (torch.cat([(s[k] - teacher[k]).flatten() for k in a]) for s in (a, b))
    # Adam turns rounding into sign noise on near-zero gradients: compare the whole update, not each weight
    assert (step_a - step_b).norm() < 0.01 * step_a.norm()


# -----------------------------------------------------------------------------
# Checkpoints survive a failed save


def tiny_training_state():
    net = seeded(0, M.build, M.PRESETS['tiny_unet'])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32)
    net(x, torch.tensor([10]), c).square().mean().backward()
    opt.step()
    return net, opt


def failing_save_file(tensors, path, metadata=None):
    with open(path, 'wb') as f:  # half a file, then the disk fills up
        f.write(b'\x00' * 100)
    raise OSError(28, 'No space left on device')


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net, opt = tiny_training_state()
    gen = torch.Generator().manual_seed(3)
    train.save_training_state(tmp_path, 2, {'student': net}, {'student': opt}, gen, keep=1)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    monkeypatch.setattr(train, 'save_file', failing_save_file)
    with pytest.raises(OSError):
        train.save_training_state(tmp_path, 4, {'student': net}, {'student': opt}, gen, keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / 'checkpoints').glob('step-???????')) == ['step-0000002']

    fresh, _ = tiny_training_state()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    g2 = torch.Generator()
    assert train.load_training_state(tmp_path, {'student': fresh}, {'student': fresh_opt}, g2) == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(g2.get_state(), torch.Generator().manual_seed(3).get_state())
    assert fresh_opt.state_dict()['state'].keys() == opt.state_dict()['state'].keys()

    # the next save succeeds and replaces the stale partial one
    train.save_training_state(tmp_path, 4, {'student': net}, {'student': opt}, gen, keep=1)
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['step-0000004']


def test_failed_student_save_keeps_the_previous_student(tmp_path, monkeypatch, clip_text):
    net, vae = seeded(0, M.build, M.PRESETS['tiny_unet']), seeded(1, M.build, M.PRESETS['tiny_vae'])
    sched = M.NoiseSchedule(M.SCHEDULES['sd'])
    M.save_checkpoint(tmp_path / 'student', net, vae, sched, text_folder=clip_text, student_t=-1)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    monkeypatch.setattr(M, 'save_file', failing_save_file)
    with pytest.raises(OSError):
        M.save_checkpoint(tmp_path / 'student', net, vae, sched, text_folder=clip_text, student_t=-1)
    monkeypatch.undo()
    pipe = M.load_checkpoint(tmp_path / 'student', text=False)
    assert pipe.student_t == 999
    assert all(torch.equal(pipe.denoiser.state_dict()[k], v) for k, v in saved.items())


# -----------------------------------------------------------------------------
# Bad input: one line, no traceback


def test_missing_teacher_is_a_clean_error(prompt_file, tmp_path):
    proc = run_script('train.py', *train_args(tmp_path / 'no_such_teacher', prompt_file, tmp_path / 'out', 1),
                      timeout=STEP_TIMEOUT)
    assert 'no_such_teacher' in assert_clean_error(proc, 'train.py: error:')


def test_empty_prompt_file_is_a_clean_error(unet_teacher, tmp_path):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n  \n')
    proc = run_script('train.py', *train_args(unet_teacher, empty, tmp_path / 'out', 1), timeout=STEP_TIMEOUT)
    assert 'no prompts' in assert_clean_error(proc, 'train.py: error:')


def test_cosine_learning_rate_schedule():
    steps = 1000  # warm-up: the first 2%, 20 steps
    f = [train.lr_factor('cosine', s, steps) for s in range(steps)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0) and f[20] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[20:], f[21:]))  # then only down
    assert f[20 + 490] == pytest.approx(0.5, abs=0.01) and f[-1] < 1e-4
    assert all(train.lr_factor('constant', s, steps) == 1.0 for s in (0, 500, 999))


def test_warmup_then_constant_or_cosine():
    steps = 300  # --warmup 50: linear from 1/50 to 1 over the first 50 steps
    const = [train.lr_factor('constant', s, steps, 50) for s in range(steps)]
    assert const[0] == pytest.approx(1 / 50) and const[24] == pytest.approx(0.5) and const[49:] == [1.0] * 251
    cos = [train.lr_factor('cosine', s, steps, 50) for s in range(steps)]
    assert cos[:49] == const[:49] and cos[50] == pytest.approx(1.0) and cos[-1] < 1e-3


def test_unknown_lr_schedule_is_a_clean_error(unet_teacher, prompt_file, tmp_path):
    proc = run_script('train.py', *train_args(unet_teacher, prompt_file, tmp_path / 'out', 1, '--lr-schedule', 'step'),
                      timeout=STEP_TIMEOUT)
    assert '--lr-schedule' in assert_clean_error(proc, 'train.py: error:')


# -----------------------------------------------------------------------------
# A training killed while saving, and a resume past a damaged checkpoint


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so no cleanup runs after it."""


def kill_when(monkeypatch, obj, name, hit):
    real = getattr(obj, name)

    def killing(*args, **kwargs):
        if hit(*args):
            raise Killed
        return real(*args, **kwargs)
    monkeypatch.setattr(obj, name, killing)


@pytest.mark.parametrize('moment, survivor', [('writing', 'old'), ('between the renames', 'new'),
                                              ('deleting the old', 'new')])
def test_a_kill_during_the_student_save_is_completed_or_undone_at_the_next_start(
        moment, survivor, tmp_path, monkeypatch, clip_text):
    vae, sched = seeded(1, M.build, M.PRESETS['tiny_vae']), M.NoiseSchedule(M.SCHEDULES['sd'])
    nets = {'old': seeded(0, M.build, M.PRESETS['tiny_unet']), 'new': seeded(5, M.build, M.PRESETS['tiny_unet'])}
    student = tmp_path / 'student'
    M.save_checkpoint(student, nets['old'], vae, sched, text_folder=clip_text, student_t=-1)
    if moment == 'writing':  # the VAE file is the second one written
        kill_when(monkeypatch, M, 'save_module', lambda module, path: path.name == 'vae.safetensors')
    elif moment == 'between the renames':
        kill_when(monkeypatch, Path, 'rename', lambda src, dst: src.name == 'student.tmp')
    else:
        kill_when(monkeypatch, M.shutil, 'rmtree', lambda path, *a: Path(path).name == 'student.old')
    with pytest.raises(Killed):
        M.save_checkpoint(student, nets['new'], vae, sched, text_folder=clip_text, student_t=-1)
    monkeypatch.undo()
    leftovers = {p.name for p in tmp_path.iterdir()} - {'student'}
    assert leftovers  # the kill left something behind
    (tmp_path / 'checkpoints' / 'step-0000004.tmp').mkdir(parents=True)  # and a half-written training checkpoint
    train.tidy(tmp_path)  # what train.py does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoints', 'student']
    assert not any((tmp_path / 'checkpoints').iterdir())
    loaded = M.load_checkpoint(student, text=False).denoiser.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in nets[survivor].state_dict().items())


def test_resume_passes_over_a_truncated_checkpoint_and_says_so(unet_teacher, prompt_file, tmp_path, capsys):
    out = tmp_path / 'run'
    args = [str(a) for a in train_args(unet_teacher, prompt_file, out, 2, '--save-every', 1, '--keep', 5)]
    train.main(args)
    state = out / 'checkpoints' / 'step-0000002' / 'state.safetensors'
    straight = load_file(str(state))
    data = state.read_bytes()
    state.write_bytes(data[:len(data) // 3])  # a kill mid-write on a filesystem that does not rename atomically
    capsys.readouterr()
    train.main(args + ['--resume'])
    err = capsys.readouterr().err
    assert 'train.py: warning: passing over step-0000002' in err and 'a truncated safetensors file' in err
    assert f"resuming from {out / 'checkpoints' / 'step-0000001'}" in err
    assert [r['step'] for r in read_log(out)] == [1, 2, 2]  # step 2 done again
    redone = load_file(str(state))
    assert redone.keys() == straight.keys()  # written again, whole
    assert M.load_checkpoint(out / 'student', text=False).student_t == 999
    assert not (out / 'train.lock').exists()
