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
