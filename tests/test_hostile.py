"""Hostile input, property-based (hypothesis, fixed seed, bounded examples): every flag of
train.py, sample.py and convert.py given values it must refuse — wrong types, negatives,
zero, empty strings, malformed block, width and temperature strings, unknown presets and
modes, missing paths, files that are not checkpoints, outputs that exist — and the data
loaders given corrupt PNG, JPEG and .npy bytes.

A refusal is judged as a user sees it: exit status 2, the last line of stderr one `error:`
line that names the flag (or the value or file given), no traceback anywhere, and not one
file in the working folder written or changed. The invalid values come from this file's own
strategies and from absl's parsers, never from the project's validation code."""
import functools
import hashlib
import io
import os
import shutil

from absl import flags as absl_flags
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
import numpy as np
from PIL import Image
import pytest

import cli
import data
import errors
import hparams

# No shrinking: a value that is wrongly accepted may train until the timeout, and shrinking
# would try dozens of them; the first falsifying value is shown as drawn.
SETTINGS = settings(max_examples=6, derandomize=True, deadline=None, database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
OFFICIAL = os.path.join(cli.ROOT, 'tests', 'data', 'official_case', 'official.th')


# ---------------------------------------------------------------------------------------
# Invalid values.
def _absl_accepts(parser, text):
    try:
        parser.parse(text)
        return True
    except (ValueError, TypeError):
        return False


_text = st.text(st.characters(codec='utf-8', exclude_categories=['Cs', 'Cc']), max_size=8)
NOT_INT = _text.filter(lambda s: not _absl_accepts(absl_flags.IntegerParser(), s)) | st.sampled_from(['1.5', '1e3', ''])
NOT_FLOAT = _text.filter(lambda s: not _absl_accepts(absl_flags.FloatParser(), s)) | st.sampled_from(
    ['nan', 'inf', '-inf', 'NaN', '1e999'])
NOT_BOOL = _text.filter(lambda s: not _absl_accepts(absl_flags.BooleanParser(), s))


def below(lowest, of=NOT_INT):
    """An int under `lowest`, or no int at all."""
    return st.integers(-10 ** 12, lowest - 1).map(str) | of


def float_outside(lo, hi=None):
    """Non-finite, non-numeric, or outside [lo, hi)."""
    out = st.floats(max_value=lo, exclude_max=True, allow_nan=False, allow_infinity=False)
    if hi is not None:
        out |= st.floats(min_value=hi, allow_nan=False, allow_infinity=False)
    return out.map(repr) | NOT_FLOAT


def not_in(choices):
    return _text.filter(lambda s: s not in choices)


def malformed(valid):
    """A valid block or width string broken in a way no grammar of them allows."""
    bad = st.sampled_from('abcyz-.;/!')      # not '+' or '_': int('+1_6') is 16
    insert = st.tuples(st.integers(0, len(valid)), bad).map(lambda t: valid[:t[0]] + t[1] + valid[t[0]:])
    return insert | st.sampled_from(['', ',', valid + ',', ',' + valid, valid.replace(',', ',,', 1),
                                     valid.replace('x2', 'x0', 1), valid.replace('x2', 'x', 1),
                                     valid.replace('16', '-16', 1)])


TINY_ENC, TINY_DEC = hparams.PRESETS['tiny'].enc_blocks, hparams.PRESETS['tiny'].dec_blocks
MISSING = st.sampled_from(['', 'nowhere', 'nowhere/ckpt-2', 'junk.bin', 'notes.txt', 'run/ckpt-7'])

# The preset's fields, flags of train.py and of a convert.py import.
FIELDS = dict(
    dataset=not_in(['mnist5k']) | st.sampled_from(['folder:nowhere', 'npy:nowhere.npy', 'npy:junk.bin']),
    image_size=below(1), image_channels=st.integers(-10 ** 6, 10 ** 6).filter(lambda n: n != 3).map(str),
    low_bit=NOT_BOOL, width=below(1), zdim=below(1), num_mixtures=below(1), no_bias_above=below(0),
    custom_width_str=st.tuples(st.integers(0, 5), st.sampled_from('abcyz-.;/!')).map(
        lambda t: '16:32'[:t[0]] + t[1] + '16:32'[t[0]:]) | st.sampled_from(['7:32', '8:0', '16', ':32', '8:-4', '16:32:1']),
    enc_blocks=malformed(TINY_ENC), dec_blocks=malformed(TINY_DEC),
    bottleneck_multiple=float_outside(0.) | st.just('0'), lr=float_outside(0.), adam_beta1=float_outside(0., 1.),
    adam_beta2=float_outside(0., 1.), adam_eps=float_outside(0.), weight_decay=float_outside(0.),
    warmup_iters=below(0), ema_rate=float_outside(0., 1.), grad_clip=float_outside(0.),
    skip_threshold=float_outside(0.).filter(lambda s: s not in ('-1.0', '-1')), batch_size=below(1),
    steps=below(1), seed=NOT_INT, unpool=not_in(['nearest', 'learned']), top_down_block=not_in(['res', 'ffn']))

TRAIN = dict(FIELDS, hparams=not_in(hparams.PRESETS), logdir=st.sampled_from(['', 'junk.bin', 'junk.bin/run']),
             strategy=not_in(['auto', 'default', 'mirrored', 'tpu', 'multiworker']),
             data_dir=st.sampled_from(['', 'nowhere', 'junk.bin']),
             precision=not_in(['float32', 'mixed_bfloat16', 'mixed_float16']),
             conv_precision=not_in(['highest', 'default']), jit_compile=NOT_BOOL, remat=NOT_BOOL, test_eval=NOT_BOOL,
             log_every=below(1), steps_per_call=below(0), save_every=below(1), keep_checkpoints=below(1),
             eval_every=below(0), samples_every=below(0), max_skips_in_a_row=below(0))
TRAIN_EVAL = dict(ckpt=MISSING, iw_samples=below(0), n_images=below(0))     # flags of --test_eval

SAMPLE = dict(ckpt=MISSING, mode=not_in(['sample', 'reconstruct', 'stats', 'export']),
              pixels=not_in(['sample', 'mode']),
              temp=st.sampled_from(['', 'abc', '-1', '0', 'nan', 'inf', '1,,2', ';', 'ramp:', 'ramp:0.5',
                                    'res:4=x', 'res:3=0.5', 'layers:0.9', '0.5:1']) | NOT_FLOAT,
              n=below(1), nrow=below(1), seed=NOT_INT, batch=below(1), hparams=not_in(hparams.PRESETS) | st.just('demo'),
              out=st.sampled_from(['', 'existing.png', 'junk.bin/x.png', 'run']), overwrite=NOT_BOOL,
              data_dir=st.sampled_from(['', 'nowhere']))
SAMPLE_RECONSTRUCT = dict(keep=st.sampled_from(['', 'a', '0', '-1', '1,,2', '11', '1.5', '2,x']),
                          images=st.sampled_from(['', 'nowhere', 'junk.bin', 'notes.txt', 'run']))

SAMPLE_EXPORT = dict(out=st.sampled_from(['existing.png', 'run', 'junk.bin/x.npz', 'junk.bin/pngs']),
                     overwrite=st.just('true'))

CONVERT_IMPORT = dict(FIELDS, dataset=not_in(['mnist5k']).filter(lambda s: not s.startswith(('folder:', 'npy:'))),
                      hparams=not_in(hparams.PRESETS) | st.just('demo'),
                      torch_ckpt=MISSING | st.just('existing.png'), torch_ckpt_model=MISSING,
                      out=st.sampled_from(['', 'junk.bin', 'run']))
CONVERT_PRESET = dict(preset=not_in(hparams.PRESETS), cache_dir=st.sampled_from(['', 'junk.bin', 'existing.png']),
                      url=st.sampled_from(['', 'nowhere', 'file:///no/such.th', 'http://']))
CONVERT_EXPORT = dict(export=NOT_BOOL, ckpt=MISSING, weights=not_in(['ema', 'model']),
                      out=st.sampled_from(['', 'existing.png', 'junk.bin/x.th']))

# Each flag's invalid value goes into a command that is valid without it.
COMMANDS = {
    'train': ('train.py', ['--hparams=tiny', '--logdir=new', '--steps=2', '--eval_every=0', '--samples_every=0',
                           '--save_every=1', '--log_every=1'], TRAIN),
    # No TPU here: with --strategy=tpu any --tpu fails to start, in one line.
    'train --strategy=tpu': ('train.py', ['--hparams=tiny', '--logdir=new', '--steps=2', '--strategy=tpu'],
                             dict(tpu=_text | st.just('local'))),
    'train --test_eval': ('train.py', ['--test_eval', '--ckpt=run', '--n_images=8'], TRAIN_EVAL),
    'sample': ('sample.py', ['--ckpt=run', '--n=2', '--out=new.png'], SAMPLE),
    'sample --mode=reconstruct': ('sample.py', ['--ckpt=run', '--mode=reconstruct', '--n=2', '--out=new.png'],
                                  SAMPLE_RECONSTRUCT),
    'sample --mode=export': ('sample.py', ['--ckpt=run', '--mode=export', '--n=2', '--out=new.npz'], SAMPLE_EXPORT),
    'convert': ('convert.py', [f'--torch_ckpt={OFFICIAL}', '--hparams=tiny', '--out=new'], CONVERT_IMPORT),
    'convert --preset': ('convert.py', ['--preset=tiny', f'--url=file://{OFFICIAL}', '--cache_dir=cache', '--out=new'],
                         CONVERT_PRESET),
    'convert --export': ('convert.py', ['--export', '--ckpt=run', '--out=new.th'], CONVERT_EXPORT),
}
CASES = [(command, flag) for command, (_, _, table) in COMMANDS.items() for flag in table]


# ---------------------------------------------------------------------------------------
# The working folder every command runs in, and what a refusal must leave of it.
@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """run/ (a tiny run at step 2), existing.png, junk.bin (random bytes), notes.txt."""
    work = tmp_path_factory.mktemp('hostile') / 'work'
    work.mkdir()
    r = cli.run('train.py', '--hparams=tiny', f'--logdir={work}/run', '--steps=2', '--eval_every=0',
                '--samples_every=0', '--save_every=2')
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(work / 'run' / 'tb')       # event files are named by time: not part of the check
    Image.new('RGB', (16, 16)).save(work / 'existing.png')
    (work / 'junk.bin').write_bytes(np.random.default_rng(0).bytes(3000))
    (work / 'notes.txt').write_text('not a checkpoint\n')
    return str(work)


def _snapshot(folder):
    found = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(d, name)
            found[os.path.relpath(path, folder)] = (
                hashlib.sha1(open(path, 'rb').read()).hexdigest() if os.path.isfile(path) else 'dir')
    return found


def _refused(server, folder, args, flag, value):
    before = _snapshot(folder)
    code, out, err = server.run(args, folder, timeout=10)
    lines = err.strip().splitlines()
    shown = f'{args}: exit {code}\n{err[-3000:]}'
    after = _snapshot(folder)
    assert after == before, f'{shown}\n{args} changed the working folder: {set(after.items()) ^ set(before.items())}'
    assert code == 2 and 'Traceback' not in err and 'Traceback' not in out, shown
    assert lines and lines[-1].startswith('error: ') and sum(l.startswith('error:') for l in lines) == 1, shown
    given = [value, value.split(':', 1)[-1], repr(value)[1:-1]]   # folder:PATH names PATH; repr escapes
    named = flag.lower() in lines[-1].lower() or any(len(v) >= 3 and v in lines[-1] for v in given)
    assert named, f'the error does not name --{flag} or {value!r}: {lines[-1]}'


@pytest.mark.parametrize('command,flag', CASES, ids=[f'{c} --{f}' for c, f in CASES])
def test_an_invalid_flag_is_one_error_line_and_writes_nothing(folder, command, flag):
    script, base, table = COMMANDS[command]

    @SETTINGS
    @given(table[flag])
    def check(value):
        args = [a for a in base if not a.startswith(f'--{flag}=')] + [f'--{flag}={value}']
        _refused(cli.server(script), folder, args, flag, value)
    try:
        check()
    finally:        # what a wrongly accepted value wrote would fail every later case
        for name in ('new', 'new.png', 'new.csv', 'new.th', 'new.npz', 'cache'):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))


def test_every_flag_of_every_script_is_covered():
    """The tables above name every flag the scripts define (absl's own flags aside)."""
    for script in ('train.py', 'sample.py', 'convert.py'):
        covered = {f for _, (s, _, table) in COMMANDS.items() if s == script for f in table}
        assert set(cli.server(script).flags) == covered, (script, set(cli.server(script).flags) ^ covered)


# ---------------------------------------------------------------------------------------
# Corrupt image bytes: a dataset either loads, every image of the right shape, or fails in
# one DataError that names the bad file.
def _encoded(fmt, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    if fmt == 'npy':
        out = io.BytesIO()
        np.save(out, np.stack([pixels] * 12))
        return out.getvalue()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _damaged(fmt):
    """Random bytes, or a valid file truncated, with bytes overwritten, or with bytes added."""
    valid = st.integers(0, 3).map(lambda seed: _encoded(fmt, seed))
    truncated = st.tuples(valid, st.floats(0, 1, exclude_max=True)).map(lambda t: t[0][:int(len(t[0]) * t[1])])
    overwritten = st.tuples(valid, st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                            min_size=1, max_size=4)).map(
        lambda t: functools.reduce(lambda b, f: b[:int(len(b) * f[0])] + bytes([f[1]]) + b[int(len(b) * f[0]) + 1:],
                                   t[1], t[0]))
    extended = st.tuples(valid, st.binary(min_size=1, max_size=64)).map(lambda t: t[0] + t[1])
    return st.binary(max_size=2000) | truncated | overwritten | extended


def _load_all(dataset):
    """Every image of the dataset (train and valid), decoded as training would decode them."""
    with data.clear_errors():
        return [image.shape for split in ('train', 'valid') for image in data.load_split(dataset, split, 8)]


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'npy'])
def test_corrupt_image_bytes_load_or_fail_naming_the_file(tmp_path, fmt):
    examples = iter(range(10 ** 6))

    @settings(SETTINGS, max_examples=25)
    @given(_damaged(fmt))
    def check(blob):
        folder = tmp_path / str(next(examples))      # a new path: folders are scanned once per path
        folder.mkdir()
        if fmt == 'npy':
            bad = folder / 'images.npy'
            dataset = f'npy:{bad}'
        else:
            for i in range(9):      # the valid company the damaged file keeps
                (folder / f'good{i}.{fmt.lower()}').write_bytes(_encoded(fmt, i))
            bad = folder / f'bad.{fmt.lower()}'
            dataset = f'folder:{folder}'
        bad.write_bytes(blob)
        try:
            shapes = _load_all(dataset)
        except errors.DataError as e:
            assert str(bad) in str(e) and '\n' not in str(e), str(e)
            return
        assert shapes and all(s == (8, 8, 3) for s in shapes), shapes
        assert len(shapes) == (12 if fmt == 'npy' else 10), len(shapes)
    check()
