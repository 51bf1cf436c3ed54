"""Presets, overrides and the start-up validation of hyperparameters."""
import dataclasses
import subprocess
import sys
import os

import pytest
from absl import flags

import console
import hparams
from errors import HParamsError


def test_every_preset_validates_and_keeps_the_papers_table():
    for name in hparams.PRESETS:
        hparams.load(name)
    c = hparams.load('cifar10')
    assert (c.width, c.lr, c.batch_size, c.ema_rate, c.grad_clip, c.skip_threshold) == (
        384, 2e-4, 16, 0.9999, 200, 400)
    i = hparams.load('imagenet32')
    assert (i.width, i.lr, i.batch_size, i.ema_rate, i.skip_threshold) == (512, 1.5e-4, 8, 0.999, 300)
    assert hparams.load('ffhq256').low_bit and not hparams.load('imagenet64').low_bit
    f = hparams.load('ffhq1024')
    assert f.num_mixtures == 2 and hparams.widths(f)[128] == 512 and hparams.widths(f)[1024] == 16


def test_parse_blocks():
    assert hparams.parse_blocks('32x2,32d2,16m8,4') == [(32, None), (32, None), (32, 2), (16, 8), (4, None)]
    dec = hparams.parse_blocks(hparams.load('imagenet32').dec_blocks)
    assert len(dec) == 2 + 1 + 4 + 1 + 9 + 1 + 19 + 1 + 40


@pytest.mark.parametrize('overrides, words', [
    (dict(dec_blocks='1x1,4m1,4y2'), ["cannot parse block '4y2'"]),
    (dict(dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8'), ['ends at resolution 16', 'image_size=32']),
    (dict(dec_blocks='1x1,8m4,16m8,32m16'), ['8m4', 'no earlier decoder block']),
    (dict(enc_blocks='32x2,16x2'), ['resolution 16 follows resolution 32']),
    (dict(dec_blocks='1x1,4m1,2m1,32m4'), ['resolution 2 has no encoder activation']),
    (dict(custom_width_str='32-128'), ["cannot parse '32-128'"]),
    (dict(width=0), ['width=0']),
    (dict(ema_rate=1.5), ['ema_rate']),
    (dict(skip_threshold=0.), ['skip_threshold=0.0 must be positive, or -1']),
    (dict(skip_threshold=-2.), ['skip_threshold=-2.0 must be positive, or -1']),
    (dict(unpool='bilinear'), ["unpool='bilinear'", "'nearest' or 'learned'"]),
    (dict(top_down_block='resnet'), ["top_down_block='resnet'", "'res' or 'ffn'"]),
])
def test_values_that_cannot_work_fail_with_one_clear_message(overrides, words):
    with pytest.raises(HParamsError) as e:
        hparams.load('cifar10', **overrides)
    for w in words:
        assert w in str(e.value)
    assert '\n' not in str(e.value)


def test_unknown_preset_and_field_name_the_valid_choices():
    with pytest.raises(HParamsError, match='unknown preset .cifar100.*cifar10, imagenet32'):
        hparams.load('cifar100')
    with pytest.raises(HParamsError, match='unknown hyperparameter.*widht.*valid: .*width'):
        hparams.load('cifar10', widht=3)


def test_every_field_is_a_flag_that_overrides_the_preset():
    fv = flags.FlagValues()
    hparams.define_flags(flag_values=fv)
    fv(['prog', '--hparams=imagenet32', '--width=64', '--dec_blocks=1x1,4m1,8m4,16m8,32m16',
        '--low_bit', '--lr=0.5'])
    hp = hparams.from_flags(fv)
    assert (hp.width, hp.low_bit, hp.lr, hp.zdim) == (64, True, 0.5, 16)
    assert hp.dec_blocks == '1x1,4m1,8m4,16m8,32m16'
    assert hp.enc_blocks == hparams.PRESETS['imagenet32'].enc_blocks


def test_a_script_reports_a_bad_preset_in_one_line():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, 'bench.py'), '--presets=cifar100'],
                       capture_output=True, text=True, cwd=root, timeout=120,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert errors == ["error: unknown preset 'cifar100'; choose one of: "
                      "cifar10, imagenet32, imagenet64, ffhq256, ffhq1024, tiny, demo"]
    assert 'Traceback' not in r.stderr


def test_progress_redraws_one_line_on_a_terminal_and_prints_whole_lines_elsewhere(monkeypatch, capsys):
    import time
    t0 = time.time()
    for done in (1, 2, 3):
        console.progress('eval', done, 3, t0)
    lines = capsys.readouterr().err
    assert '\r' not in lines and len(lines.splitlines()) == 3 and lines.splitlines()[-1].startswith('eval [')
    for done in (1, 2, 3):
        console.progress('eval', done, 3, t0, every=60.)          # at most one a minute, and the last
    assert len(capsys.readouterr().err.splitlines()) == 1
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
    console.progress('eval', 1, 3, t0)
    assert console.fresh_line() == '\n' and console.fresh_line() == ''
    console.progress('eval', 3, 3, t0)
    err = capsys.readouterr().err
    assert err.count('\r') == 2 and err.endswith('\n') and console.fresh_line() == ''


def test_help_lists_every_hyperparameter_with_its_meaning_and_the_presets_values():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, 'train.py'), '--help'], capture_output=True,
                         text=True, cwd=root).stdout
    text = ' '.join(out.split())                           # absl wraps the lines
    for field in hparams.MEANING:
        assert f'--{field}: {hparams.MEANING[field]}' in text or f'--[no]{field}: {hparams.MEANING[field]}' in text, field
    assert "Presets: cifar10 384, imagenet32 512, imagenet64 512, ffhq256 512, ffhq1024 16" in text
    assert "RmS = one block at R that upsamples resolution S" in text and 'override the preset' not in text
    assert set(hparams.MEANING) == {f.name for f in dataclasses.fields(hparams.HParams)}


def test_train_help_groups_its_flags_under_headings_each_flag_once():
    import re
    import cli
    out = cli.run('train.py', '--help').stdout
    headings = re.findall(r'^(\S[^\n]*):$', out, re.M)
    assert headings == ['flags (--helpfull: every flag, absl\'s too)', 'preset and data',
                        'architecture (the paper\'s figure 3 and table 4)', 'optimiser (the update rule)',
                        'training loop', 'devices, precision and memory', 'evaluation'], headings
    listed = re.findall(r'^  --(?:\[no\])?(\w+):', out, re.M)
    assert sorted(listed) == sorted(set(listed)) and set(listed) == set(cli.server('train.py').flags)
    sections = dict(zip(headings[1:], re.split(r'^\S[^\n]*:$', out, flags=re.M)[2:]))
    assert '--width:' in sections['architecture (the paper\'s figure 3 and table 4)']
    assert '--lr:' in sections['optimiser (the update rule)'] and '--strategy:' in sections['devices, precision and memory']
