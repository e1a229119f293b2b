"""The shapes world end to end: the teacher and student presets train through train.py, the
evaluation command scores the shipped checkpoints, and `python sample.py` with no arguments writes
its NASA demo grid."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import model as M
import sample
import shapes
from conftest import ROOT, run_script


def test_teacher_then_student_train_a_few_steps(tmp_path):
    proc = run_script('train.py', '--preset', 'shapes_teacher', '--steps', '2', '--batch-size', '4',
                      '--out', tmp_path / 'teacher_run', '--save-every', '1', '--log-every', '1', timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [json.loads(l)['loss'] for l in (tmp_path / 'teacher_run' / 'log.jsonl').read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    teacher = M.load_checkpoint(tmp_path / 'teacher_run' / 'teacher')
    assert teacher.student_t is None and isinstance(teacher.vae, M.PixelSpace)

    proc = run_script('train.py', '--preset', 'shapes', '--teacher', tmp_path / 'teacher_run' / 'teacher',
                      '--steps', '2', '--batch-size', '4', '--out', tmp_path / 'student_run', '--val-every', '2',
                      timeout=300)
    assert proc.returncode == 0, proc.stderr
    student = M.load_checkpoint(tmp_path / 'student_run' / 'student')
    assert student.student_t == student.schedule.T - 1
    assert (tmp_path / 'student_run' / 'val' / 'step-0000002.png').is_file()

    proc = run_script('shapes.py', 'curve', tmp_path / 'student_run', '--teacher', tmp_path / 'teacher_run' / 'teacher',
                      '--n', '18', '--json', tmp_path / 'curve.json', timeout=300)
    assert proc.returncode == 0, proc.stderr
    [(step, fd, accuracy)] = json.loads((tmp_path / 'curve.json').read_text())[str(tmp_path / 'student_run')]
    assert step == 2 and fd >= 0.0 and 0.0 <= accuracy <= 1.0
    assert '| 2 | ' in proc.stdout and 'prompt accuracy:' in proc.stdout


def test_evaluate_on_shipped_checkpoints(tmp_path):
    out = tmp_path / 'eval.json'
    proc = run_script('shapes.py', 'evaluate', '--n', '36', '--teacher-steps', '2', '--json', out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '| teacher |' in proc.stdout and '| student |' in proc.stdout
    res = json.loads(out.read_text())
    for name in ('teacher', 'student'):
        assert 0.0 <= res[name]['accuracy'] <= 1.0 and res[name]['fd'] >= 0.0
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
