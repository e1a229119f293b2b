"""bench.py's figures on the tiny presets, one repeat each: both implementations agree and the
table is well-formed (the full benchmark is `python bench.py`)."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import bench  # noqa: E402

OPT = bench.Options(torch.device('cpu'), torch.float32, repeats=1, warmup=0)


def check(rows):
    for r in rows:
        assert r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0, r
        assert r.err is None or r.agrees, f'{r.what}: ours and the reference differ by {r.err:.1e}'
    return rows


@pytest.fixture(scope='module')
def rows():
    out = [bench.bench_forward(p, 16, OPT) for p in ('tiny_unet', 'tiny_dit', 'tiny_vae')]
    out += bench.bench_generation('tiny_unet', 'tiny_vae', 16, (1, 2), OPT)
    out += bench.bench_pgsb('tiny_unet', 16, 2, OPT)
    out.append(bench.bench_nasa('tiny_unet', 'tiny_vae', 16, 1, OPT))
    return out


def test_implementations_agree_and_ratios_are_positive(rows):
    measured = [r for r in rows if not r.note]
    check(measured)
    assert all(r.err is not None and r.err <= 1e-4 for r in measured if r.figure in (1, 2))
    pgsb = [r for r in measured if r.figure == 3]
    assert len(pgsb) == 1 and pgsb[0].unit == 'img/s' and pgsb[0].err <= 1e-4  # same losses, same draws


def test_channels_last_agrees_with_the_reference():
    opt = bench.Options(torch.device('cpu'), torch.float32, repeats=1, warmup=0, channels_last=True)
    rows = [bench.bench_forward(p, 16, opt) for p in ('tiny_unet', 'tiny_vae')] + bench.bench_pgsb('tiny_unet', 16, 2, opt)
    rows = check([r for r in rows if not r.note])
    assert all(r.err is not None and r.err <= 1e-4 for r in rows)


def test_table_is_well_formed(rows):
    rows = rows + [bench.Row(2, 'sd21 + sd_vae, 512x512 px, batch 1, bfloat16', goal='<= 0.6',
                             note=bench.NOT_MEASURED)]
    text = bench.table(rows)
    tables = [t for t in text.split('### ') if t.strip()]
    assert [t.splitlines()[0].split(':')[0] for t in tables] == ['Figure 1', 'Figure 2', 'Figure 3', 'Figure 4']
    for t in tables:
        lines = [line for line in t.splitlines() if line.startswith('|')]
        assert lines[0] == '| what | ours | reference | ratio ours/ref | goal | met? | rel err |'
        assert all(line.count('|') == 8 for line in lines), t
        for line in lines[2:]:
            ratio = line.split('|')[4].strip()
            assert ratio == '—' or float(ratio) > 0
    assert bench.NOT_MEASURED in text and 'DISAGREE' not in text
    json.dumps([r.asdict() for r in rows])  # what --json writes


def test_goals():
    row = bench.Row(1, 'x', 0.7, 1.0, goal='<= 0.8')
    assert row.met and not bench.Row(1, 'x', 0.9, 1.0, goal='<= 0.8').met
    assert bench.Row(3, 'x', 3.0, 1.0, unit='img/s', goal='>= 1.5').met
    assert bench.Row(1, 'x', 0.7, 1.0).met is None


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ('--device', '--quick', '--compile', '--dtype', '--repeats', '--json'):
        assert flag in out


def test_plan_memory_agrees_with_the_measured_peak():
    """The plan's fake-tensor peak for one PG-SB step on tiny_unet, with the default levers (frozen
    bf16, gradient checkpointing, bf16 autocast) and without, against the high-water mark the CPU
    allocator reports (profiler memory events) for the same step on real tensors: within 10%."""
    cfg = bench.M.PRESETS['tiny_unet']
    for levers in (bench.Levers(), bench.Levers(frozen_bf16=False, grad_checkpointing=False)):
        planned = bench.trace_step(bench.plan_ours(cfg, levers, vae=False), cfg, 8)
        setup, _ = bench.plan_ours(cfg, levers, vae=False)()  # the same networks, real this time
        with torch.no_grad():
            for t in bench.tensors_of(setup, ()):
                t.normal_(0, 0.02)
        measured = bench.measured_peak(setup, bench.plan_inputs(cfg, 8))
        assert planned.static < planned.peak and planned.flops > 0
        assert abs(planned.peak / measured - 1) <= 0.10, (levers, planned.peak, measured)


def test_plan_table_counts_the_reference_and_the_levers():
    """On tiny_unet: the plan's rows (ours, reference, FSDP estimate, levers off) and its table."""
    rows, gen = bench.plan(4, models=('tiny_unet',), lever_model='tiny_unet', log=lambda *a: None)
    assert [r[1] for r in rows] == [str(bench.Levers()), f'{bench.Levers()} + FSDP over 4 GPUs (estimate)',
                                    'frozen bf16', 'none']
    ours, ref = rows[0][2], rows[0][3]
    assert ours.student_params == ref.student_params and ours.peak > 0 and ref.peak > 0
    # FSDP shares out the student's 16 bytes a parameter; checkpointing trades FLOPs for memory
    assert ours.peak_at(4, 4) == pytest.approx(ours.peak_at(4) - 12 * ours.student_params)
    # the same arithmetic as the reference without checkpointing's recomputation: the same FLOPs
    assert rows[3][2].flops == pytest.approx(ref.flops, rel=0.05), (rows[3][2].flops, ref.flops)
    assert rows[2][2].flops < ours.flops
    assert ours.largest_batch(80) >= ours.largest_batch(40) >= ours.largest_batch(24)
    text = bench.plan_table(rows, gen)
    assert text.count('| tiny_unet |') == 5 and 'FSDP' in text
