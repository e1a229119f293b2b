"""The shapes world end to end: the teacher trains through shapes.py train-teacher and the student
preset through train.py, the evaluation commands score them and the shipped checkpoints, and
`python sample.py` with no arguments writes its NASA demo grid."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import sample
import shapes
from conftest import ROOT, run_script


DIVERSITY_KEYS = {"accuracy", "fd", "per_prompt_accuracy", "min_accuracy", "min_accuracy_prompt", "histograms",
                  "spread", "empty_share", "vs_real"}
COMPARISON_KEYS = {"tv", "max_tv_colour", "mean_tv_colour", "max_tv_shape", "mean_tv_shape", "spread_ratio"}


def assert_scores(row, teacher=True):
    """One generator's numbers, as evaluate and curve write them."""
    assert DIVERSITY_KEYS | ({"vs_teacher"} if teacher else set()) <= set(row), sorted(row)
    assert 0.0 <= row["min_accuracy"] <= row["accuracy"] <= 1.0 and row["fd"] >= 0.0
    assert set(row["per_prompt_accuracy"]) == set(shapes.all_prompts())
    assert set(row["histograms"]) == set(shapes.shape_prompts() + shapes.colour_prompts())
    assert 0.0 <= row["empty_share"] <= 1.0 and set(row["spread"]) == set(shapes.SPREAD_KEYS)
    for key in ("vs_real", "vs_teacher") if teacher else ("vs_real",):
        assert set(row[key]) == COMPARISON_KEYS


def test_teacher_then_student_train_a_few_steps(tmp_path, monkeypatch):
    proc = run_script('shapes.py', 'train-teacher', '--steps', '2', '--batch-size', '4',
                      '--out', tmp_path / 'teacher_run', '--save-every', '1', '--log-every', '1', timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [json.loads(l)['loss'] for l in (tmp_path / 'teacher_run' / 'log.jsonl').read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    teacher = M.load_checkpoint(tmp_path / 'teacher_run' / 'teacher')
    assert teacher.student_t is None and isinstance(teacher.vae, M.PixelSpace)
    assert teacher.schedule.config.prediction_type == 'v_prediction'

    proc = run_script('train.py', '--preset', 'shapes', '--teacher', tmp_path / 'teacher_run' / 'teacher',
                      '--steps', '2', '--batch-size', '4', '--out', tmp_path / 'student_run', '--val-every', '2',
                      '--save-every', '1', '--regression-pairs', '3', '--regression-steps', '2', timeout=300)
    assert proc.returncode == 0, proc.stderr
    student = M.load_checkpoint(tmp_path / 'student_run' / 'student')
    assert student.student_t == student.schedule.T - 1
    assert (tmp_path / 'student_run' / 'val' / 'step-0000002.png').is_file()

    # Every checkpoint of a run, a final student, and --last; the teacher is sampled once.
    proc = run_script('shapes.py', 'curve', tmp_path / 'student_run', tmp_path / 'student_run' / 'student',
                      '--teacher', tmp_path / 'teacher_run' / 'teacher', '--teacher-steps', '2',
                      '--n', '18', '--json', tmp_path / 'curve.json', timeout=300)
    assert proc.returncode == 0, proc.stderr
    curves = json.loads((tmp_path / 'curve.json').read_text())
    assert (curves['n'], curves['teacher_steps'], curves['teacher_cfg']) == (18, 2, 3.0)
    assert_scores(curves['teacher'], teacher=False)
    run, final = (curves['runs'][str(tmp_path / name)] for name in ('student_run', 'student_run/student'))
    assert [p['step'] for p in run] == [1, 2] and [p['step'] for p in final] == [None]
    for point in run + final:
        assert_scores(point)
    # The final student is the run's last checkpoint (its EMA): the same images, the same numbers.
    assert final[0]['per_prompt_accuracy'] == run[-1]['per_prompt_accuracy']
    assert final[0]['histograms'] == run[-1]['histograms']
    assert 'Teacher (2 DDIM steps, CFG 3.0, n=18)' in proc.stdout
    assert '| student_run (1 run) | 1 | ' in proc.stdout and '| student (1 run) | final | ' in proc.stdout

    proc = run_script('shapes.py', 'curve', tmp_path / 'student_run', '--last', '--teacher',
                      tmp_path / 'teacher_run' / 'teacher', '--teacher-steps', '2', '--n', '18',
                      '--json', tmp_path / 'last.json', timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = json.loads((tmp_path / 'last.json').read_text())
    [point] = last['runs'][str(tmp_path / 'student_run')]
    assert point['step'] == 2

    # --teacher-from: the first curve's teacher numbers, the teacher not sampled again; the same student numbers.
    monkeypatch.setattr(shapes, 'sampler', lambda *args, **kwargs: pytest.fail('the teacher was sampled again'))
    shapes.main(['curve', str(tmp_path / 'student_run'), '--last', '--teacher', str(tmp_path / 'teacher_run' / 'teacher'),
                 '--teacher-steps', '2', '--n', '18', '--teacher-from', str(tmp_path / 'curve.json'),
                 '--json', str(tmp_path / 'again.json')])
    again = json.loads((tmp_path / 'again.json').read_text())
    assert again['teacher'] == curves['teacher'] and again['runs'] == last['runs']

    proc = run_script('shapes.py', 'curve', tmp_path / 'teacher_run' / 'prompt_cache', timeout=120)
    assert proc.returncode != 0 and 'no checkpoints/step-N, no student/' in proc.stderr


def test_the_dit_teacher_trains_samples_and_distills_with_nasa_t(tmp_path):
    """shapes.py train-teacher --arch shapes_dit (2 steps): a pixel-space DiT teacher that samples with
    DDIM, and one-step with NASA and NAG; then 2 NASA-T steps of train.py on it, with the shipped
    negatives."""
    import nasa
    import train
    shapes.main(['train-teacher', '--arch', 'shapes_dit', '--steps', '2', '--batch-size', '4', '--out',
                 str(tmp_path / 'dit'), '--save-every', '1', '--log-every', '1'])
    pipe = M.load_checkpoint(tmp_path / 'dit' / 'teacher')
    assert isinstance(pipe.denoiser, M.DiT) and pipe.denoiser.cfg == M.PRESETS['shapes_dit']
    assert isinstance(pipe.vae, M.PixelSpace) and pipe.schedule.config.prediction_type == 'v_prediction'
    ddim = sample.generate(pipe, ['a red circle'], n=2, steps=2, cfg=3.0)
    plain = sample.generate(pipe, ['a red shape'], n=2)
    with_nasa = sample.generate(pipe, ['a red shape'], 'circle', nasa.default_alpha(pipe.denoiser), n=2)
    with_nag = sample.generate(pipe, ['a red shape'], 'circle', n=2, nag=nasa.NAG(*nasa.default_nag(pipe.denoiser)))
    for images in (ddim, plain, with_nasa, with_nag):
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert not torch.equal(with_nasa, plain) and not torch.equal(with_nag, plain)

    out = tmp_path / 'dit_student'
    train.main(['--preset', 'shapes', '--teacher', str(tmp_path / 'dit' / 'teacher'), '--lora-targets', 'to_q,to_v',
                '--steps', '2', '--batch-size', '2', '--out', str(out), '--val-every', '0', '--log-every', '1',
                '--regression-pairs', '3', '--regression-steps', '2', '--nasa-train', '--negative-prompts',
                str(ROOT / 'checkpoints' / 'shapes_negatives.txt')])
    records = [json.loads(l) for l in (out / 'log.jsonl').read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r['vsd']) and 0 <= r['nasa_alpha'] <= 1 for r in records)
    assert isinstance(M.load_checkpoint(out / 'student').denoiser, M.DiT)


def test_the_shipped_negatives_are_the_worlds_attribute_words(tmp_path):
    shapes.main(['negatives', str(tmp_path / 'negatives.txt')])
    words = (tmp_path / 'negatives.txt').read_text().split('\n')[:-1]
    assert words == list(shapes.COLOURS) + list(shapes.SHAPES)
    assert (ROOT / 'checkpoints' / 'shapes_negatives.txt').read_text() == (tmp_path / 'negatives.txt').read_text()
    assert {neg for _, neg in shapes.NEGATIVE_PAIRS} <= set(words)  # the pairs' negatives are among them


def test_train_teacher_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file
    common = dict(steps=3, batch_size=2, save_every=1, text_encoder=ROOT / 'checkpoints' / 'shapes_text')
    shapes.train_teacher(tmp_path / 'straight', **common)
    step = Path('checkpoints') / 'step-0000002'  # as if the run had stopped after step 2
    shutil.copytree(tmp_path / 'straight' / step, tmp_path / 'resumed' / step)
    shapes.train_teacher(tmp_path / 'resumed', resume=True, **common)
    a, b = (load_file(tmp_path / run / 'teacher' / 'denoiser.safetensors') for run in ('straight', 'resumed'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_on_shipped_checkpoints(tmp_path):
    out = tmp_path / 'eval.json'
    proc = run_script('shapes.py', 'evaluate', '--n', '36', '--teacher-steps', '2', '--json', out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '| teacher |' in proc.stdout and '| student |' in proc.stdout
    assert 'Prompt accuracy per prompt:' in proc.stdout and '| a circle | student |' in proc.stdout
    res = json.loads(out.read_text())
    assert (res['images_per_full_prompt'], res['images_per_underspecified_prompt']) == (2, 4)
    assert_scores(res['teacher'], teacher=False)
    assert_scores(res['student'])
    assert set(res['real']) == {'empty_share', 'spread', 'histograms'}
    assert len(res['negative']) == 4
    for row in res['negative']:
        for key in ('success_without', 'success_with'):
            assert math.isnan(row[key]) or 0.0 <= row[key] <= 1.0
        assert 0.0 <= row['accuracy_with'] <= 1.0


def test_sample_with_no_arguments_writes_the_demo_grid(tmp_path):
    proc = run_script('sample.py', '--checkpoint', ROOT / 'checkpoints' / 'shapes_student', '--out',
                      tmp_path / 'samples.png', timeout=120)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / 'samples.png'))
    assert grid.shape == (8 * 32, 8 * 32, 3)  # 4 pairs x (without, with NASA) rows of 8


def test_evaluate_sampler_restricts_nasa_to_the_named_layers():
    student = str(ROOT / 'checkpoints' / 'shapes_student')
    args = (['a square'] * 4, ['blue'] * 4, 0.3, 5)
    every, mid = shapes.sampler(student)(*args), shapes.sampler(student, layers=['mid_block'])(*args)
    direct = sample.to_uint8(sample.generate(sample.load(student), args[0], 'blue', 0.3, seed=5, layers=['mid_block']))
    assert np.array_equal(mid, direct) and not np.array_equal(mid, every)
    with pytest.raises(sample.SampleError, match='no cross-attention layer matches'):
        shapes.sampler(student, layers=['no_such_block'])(*args)


def test_losses_show_where_the_shipped_teacher_denoises_and_what_its_prompt_buys(capsys):
    """shapes.py losses: the same images and noise for every checkpoint; on the shipped teacher the
    error grows with the noise level past t=300 and the caption lowers it where layout is decided."""
    teacher = str(ROOT / 'checkpoints' / 'shapes_teacher')
    losses = shapes.denoising_losses([teacher], n=32, seed=5)[teacher]
    assert list(losses) == list(shapes.LOSS_TIMESTEPS)
    assert all(0 < v < 1 for pair in losses.values() for v in pair)
    assert losses[300][0] < losses[700][0] < losses[900][0]
    assert losses[900][0] < 0.9 * losses[900][1]  # the prompt helps at high noise
    shapes.main(['losses', teacher, '--n', '32', '--seed', '5'])
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith(f'| {teacher} | {losses[100][0]:.4f} / {losses[100][1]:.4f} |')
