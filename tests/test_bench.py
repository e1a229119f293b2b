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
    """The plan's fake-tensor peak for a PG-SB step on tiny_unet at batch 16 (activations are most of
    it), each lever that changes what the step holds on or off, against the high-water mark the CPU
    allocator reports (profiler memory events) for the same step on real tensors: within 10%. Both
    are the second step, with AdamW's moments held. In fp32: under bf16 autocast the CPU's bf16
    convolution makes im2col copies of its input (9 times its size) that a GPU's does not, and the
    plan does not count them."""
    cfg = bench.M.PRESETS['tiny_unet']
    default = dict(frozen_bf16=False)
    for change in ({}, dict(lora_checkpointing=False), dict(grad_checkpointing=False), dict(fused_adam=False),
                   {k: False for k in bench.Levers.NAMES}):
        levers = bench.Levers(**{**default, **change})
        planned = bench.trace_step(bench.plan_ours(cfg, levers, vae=False, bf16=False), cfg, 16)
        setup, _ = bench.plan_ours(cfg, levers, vae=False, bf16=False)()  # the same networks, real this time
        with torch.no_grad():
            for t in bench.tensors_of(setup, ()):
                t.normal_(0, 0.02)
        measured = bench.measured_peak(setup, bench.plan_inputs(cfg, 16))
        assert planned.peak > 2 * planned.static and planned.flops > 0
        assert 0.9 <= planned.peak / measured <= 1.1, (levers, planned.peak, measured)


def test_plan_table_counts_the_reference_and_the_levers():
    """On the tiny UNet, DiT and SDXL: the plan's rows (ours, the reference, the FSDP estimate; on the
    DiT each lever off, then all), what each implementation holds, the levers' before and after."""
    models = ('tiny_unet', 'tiny_dit', 'tiny_sdxl')
    rows, gen = bench.plan(4, models=models, lever_model='tiny_dit', log=lambda *a: None, vae=False)
    default = str(bench.Levers())
    labels = [default, f'{default} + FSDP over 4 GPUs (estimate)']
    off = [', '.join(v for k, v in bench.Levers.NAMES.items() if k != gone) for gone in bench.Levers.NAMES]
    assert [(r[0], r[1]) for r in rows] == ([('tiny_unet', x) for x in labels] + [('tiny_dit', x) for x in labels + off + ['none']]
                                            + [('tiny_sdxl', x) for x in labels])
    assert [g[0] for g in gen] == list(models) and all(0 < ours < ref for _, ours, ref in gen)
    for name in models:
        (_, _, ours, ref, _), (_, _, fsdp, _, shards) = [r for r in rows if r[0] == name][:2]
        P = ours.student_params
        assert P == ref.student_params > 0 and fsdp is ours and shards == 4
        # the reference holds a second bf16 teacher (peft's copy), all of it in bf16, and the student's fp32
        # gradients after the step; ours one teacher, its norms and embeddings in fp32, its gradients dropped
        # (the schedules' buffers aside)
        assert ref.static - ours.static == pytest.approx(4 * P + 2 * held_in_bf16(name), abs=2 ** 16), name
        assert ours.grads_freed and not ref.grads_freed and ref.peak > ref.static
        # FSDP: the student's weights and AdamW moments shared out, the gathered blocks added
        assert ours.peak_at(4, 4) == pytest.approx(ours.peak_at(4) - 12 * P * 3 / 4 + ours.fsdp_gathered())
        assert 0 < sum(ours.units) < P and ours.fsdp_gathered() == 4 * (P - sum(ours.units) + 3 * max(ours.units))
        assert ours.largest_batch(80) >= ours.largest_batch(40) >= ours.largest_batch(24)
    dit = {r[1]: r[2] for r in rows if r[0] == 'tiny_dit'}
    ours, P = dit[default], dit[default].student_params
    assert len(ours.units) == bench.M.PRESETS['tiny_dit'].depth  # a unit per transformer block
    ref = rows[[r[0] for r in rows].index('tiny_dit')][3]
    frozen32, no_ckpt, no_lora_ckpt, grads_held, unfused = (dit[x] for x in off)
    bf16 = held_in_bf16('tiny_dit')
    assert frozen32.static - ours.static == 2 * bf16                         # the teacher's base in fp32
    assert grads_held.static - ours.static == 4 * P                          # the student's gradients held
    assert no_ckpt.flops < ours.flops and no_lora_ckpt.flops < ours.flops    # the recomputed forwards
    assert no_ckpt.static == no_lora_ckpt.static == unfused.static == ours.static
    assert dit['none'].static - ours.static == 4 * P + 2 * bf16
    # (the peaks' order at real sizes is the plan's to show: at these sizes checkpointing's own tensors weigh as much)
    # without checkpointing's recomputation, ours is the reference's arithmetic: the same FLOPs
    assert dit['none'].flops == pytest.approx(ref.flops, rel=0.05), (dit['none'].flops, ref.flops)
    text = bench.plan_table(rows, gen)
    assert text.count('| tiny_dit |') == 9 and text.count('| tiny_sdxl |') == 3 and 'FSDP' in text


def held_in_bf16(name):
    """The parameters of a network that train.hold_bf16 holds in bf16 (its linear and convolution layers')."""
    with torch.device('meta'):
        net = bench.train.hold_bf16(bench.M.build(bench.M.PRESETS[name]).requires_grad_(False))
    return sum(p.numel() for p in net.parameters() if p.dtype == torch.bfloat16)
