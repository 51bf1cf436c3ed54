"""Fault tolerance: damaged checkpoints, preemption by a signal, kill -9, full disks (NaN storms
and gradient spikes: test_storms.py). Every fault is made for real (bytes truncated or zeroed,
files deleted, a signal sent to the process) and the run is judged by what it leaves: which
checkpoint it resumed from, what it moved aside, and the weights it ends with."""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import tensorflow as tf

import checkpoints
import cli
from test_train import assert_same_state

RUN = ('--hparams=tiny', '--eval_every=0', '--samples_every=0', '--log_every=1')


def _train(logdir, *args, timeout=600):
    return cli.run('train.py', *RUN, f'--logdir={logdir}', *args, timeout=timeout)


def _uninterrupted(tmp_path_factory, *args):
    """The run folder of an uninterrupted run: what a faulted run with these flags must end as."""
    logdir = str(tmp_path_factory.mktemp('uninterrupted') / 'run')
    r = _train(logdir, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return logdir


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """6 steps, checkpoints every 2."""
    return _uninterrupted(tmp_path_factory, '--steps=6', '--save_every=2', '--keep_checkpoints=5')


def _damage(prefix, how):
    data = tf.io.gfile.glob(prefix + '.data-*')[0]
    if how == 'truncated':
        with open(data, 'r+b') as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == 'zeroed':
        size = os.path.getsize(data)
        with open(data, 'wb') as f:
            f.write(bytes(size))
    elif how == 'index deleted':
        os.remove(prefix + '.index')
    elif how == 'data deleted':
        os.remove(data)


def _newest_damaged(straight, tmp_path, how):
    """A copy of the uninterrupted run folder as if it had stopped at step 4, its ckpt-4
    damaged `how`; and the damaged files' bytes."""
    logdir = str(tmp_path / 'run')
    shutil.copytree(straight, logdir)
    for f in tf.io.gfile.glob(f'{logdir}/ckpt/ckpt-6.*'):
        os.remove(f)
    _damage(f'{logdir}/ckpt/ckpt-4', how)
    return logdir, {f: open(f, 'rb').read() for f in tf.io.gfile.glob(f'{logdir}/ckpt/ckpt-4.*')}


def _assert_kept_in_corrupt(logdir, damaged):
    """The bad checkpoint is kept, byte for byte, in ckpt/corrupt/."""
    for f, content in damaged.items():
        assert open(os.path.join(logdir, 'ckpt', 'corrupt', os.path.basename(f)), 'rb').read() == content


@pytest.mark.parametrize('how', ['truncated', 'zeroed', 'index deleted', 'data deleted'])
def test_each_kind_of_damage_is_found_named_once_and_moved_aside_byte_for_byte(straight, tmp_path, capsys, how):
    """What train.py calls at start-up to pick the checkpoint to resume from (its resume is
    checked end to end below, once)."""
    logdir, damaged = _newest_damaged(straight, tmp_path, how)
    assert checkpoints.newest_good(f'{logdir}/ckpt') == f'{logdir}/ckpt/ckpt-2'
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 1 and 'ckpt-4' in warnings[0] and 'using ckpt-2' in warnings[0], warnings
    assert damaged and not tf.io.gfile.glob(f'{logdir}/ckpt/ckpt-4.*')
    _assert_kept_in_corrupt(logdir, damaged)
    checkpoints.verify(f'{logdir}/ckpt/ckpt-2')


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(straight, tmp_path):
    logdir, damaged = _newest_damaged(straight, tmp_path, 'truncated')    # a preemption in mid-write
    r = _train(logdir, '--steps=6', '--save_every=2', '--keep_checkpoints=5')
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [l for l in r.stderr.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 1 and 'ckpt-4' in warnings[0], r.stderr[-2000:]
    assert 'resumed from' in r.stdout and 'ckpt-2 at step 2' in r.stdout
    _assert_kept_in_corrupt(logdir, damaged)
    # Resume is exact: the same weights, EMA and optimizer state as the uninterrupted run.
    assert_same_state(f'{straight}/ckpt/ckpt-6', f'{logdir}/ckpt/ckpt-6')


def test_a_folder_whose_every_checkpoint_is_damaged_is_an_error_and_nothing_moves(straight, tmp_path):
    logdir = str(tmp_path / 'run')
    shutil.copytree(straight, logdir)
    for n in (2, 4, 6):
        _damage(f'{logdir}/ckpt/ckpt-{n}', 'zeroed')
    before = sorted(os.listdir(f'{logdir}/ckpt'))
    line = cli.error_line(_train(logdir, '--steps=8'))
    assert 'no checkpoint in' in line and 'ckpt-6' in line and '2 older ones' in line, line
    assert sorted(os.listdir(f'{logdir}/ckpt')) == before       # no fresh start over them either


def test_an_explicit_corrupt_checkpoint_is_one_error_line_for_every_script(straight, tmp_path):
    logdir = str(tmp_path / 'run')
    shutil.copytree(straight, logdir)
    _damage(f'{logdir}/ckpt/ckpt-6', 'truncated')
    bad = f'{logdir}/ckpt/ckpt-6'
    before = {f: open(f, 'rb').read() for f in tf.io.gfile.glob(f'{logdir}/ckpt/*')}
    for script, args in (('train.py', ['--test_eval', f'--ckpt={bad}']), ('sample.py', [f'--ckpt={bad}']),
                         ('convert.py', ['--export', f'--ckpt={bad}', f'--out={tmp_path / "x.th"}'])):
        line = cli.error_line(cli.run(script, *args))
        assert 'ckpt-6' in line and 'cannot be read' in line, (script, line)
    assert not os.path.exists(tmp_path / 'x.th')
    # Not a checkpoint at all, and a checkpoint of another preset.
    for script, args in (('train.py', ['--test_eval']), ('sample.py', []),
                         ('convert.py', ['--export', f'--out={tmp_path / "x.th"}'])):
        line = cli.error_line(cli.run(script, *args, f'--ckpt={tmp_path / "nothing"}'))
        assert f'{tmp_path / "nothing"}' in line, (script, line)
        line = cli.error_line(cli.run(script, *args, f'--ckpt={logdir}', '--hparams=demo'))
        assert 'not a demo model' in line and 'width' in line, (script, line)
    assert not os.path.exists(tmp_path / 'x.th')
    # A run folder reads its newest good checkpoint, says so, and changes nothing.
    r = cli.run('sample.py', f'--ckpt={logdir}', '--n=2', f'--out={tmp_path / "s.png"}')
    assert r.returncode == 0 and 'ckpt-6' in r.stderr and 'ckpt-4' in r.stdout, r.stderr[-2000:]
    assert {f: open(f, 'rb').read() for f in tf.io.gfile.glob(f'{logdir}/ckpt/*')} == before


@pytest.fixture(scope='module')
def straight30(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, '--steps=30', '--save_every=100', '--log_every=10')


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_stops_and_the_same_command_resumes_exactly(straight30, tmp_path, sig):
    """The signal comes during training (after the first log line); the run finishes its call,
    saves, says so in one line and exits 0; the same command resumes to the weights of an
    uninterrupted run."""
    logdir = str(tmp_path / 'run')
    args = [*RUN, f'--logdir={logdir}', '--steps=30', '--save_every=100', '--log_every=1']
    proc = cli.start('train.py', *args)
    # Wait for the first log line (training is under way), then signal.
    t0 = time.time()
    while not os.path.exists(f'{logdir}/log.jsonl') or not open(f'{logdir}/log.jsonl').read():
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = [l for l in out.splitlines() if 'stopped at step' in l]
    assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], out
    step = int(stopped[0].split('stopped at step ')[1].split()[0])
    assert 1 <= step < 30 and os.path.isfile(f'{logdir}/ckpt/ckpt-{step}.index')
    r = cli.run('train.py', *args, timeout=600)
    assert r.returncode == 0 and f'at step {step}' in r.stdout, r.stderr[-2000:]
    assert_same_state(f'{straight30}/ckpt/ckpt-30', f'{logdir}/ckpt/ckpt-30')


def test_under_multi_worker_training_a_signal_to_one_worker_stops_both_at_one_step(tmp_path):
    """Two workers on localhost; SIGTERM to the second only. Both save and stop at the same
    step (the stop request is all-reduced each call), and the same commands resume both."""
    import json
    from test_train import _free_port
    workers = [f'127.0.0.1:{_free_port()}', f'127.0.0.1:{_free_port()}']
    logdir = str(tmp_path / 'run')
    args = [*RUN, '--batch_size=4', '--strategy=multiworker', f'--logdir={logdir}', '--steps=20', '--save_every=100']

    def start():
        return [cli.start('train.py', *args, env=dict(TF_CONFIG=json.dumps(
            {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': i}}))) for i in range(2)]

    procs, t0 = start(), time.time()
    while not os.path.exists(f'{logdir}/log.jsonl') or not open(f'{logdir}/log.jsonl').read():
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 300, procs[0].communicate()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    stops = [[l for l in out.splitlines() if 'stopped at step' in l] for out, _ in outs]
    assert 'a signal to another worker' in stops[0][0] and 'SIGTERM' in stops[1][0], stops
    steps = {int(s[0].split('stopped at step ')[1].split()[0]) for s in stops}
    assert len(steps) == 1 and 1 <= min(steps) < 20, stops
    step = steps.pop()
    assert os.path.isfile(f'{logdir}/ckpt/ckpt-{step}.index')
    procs = start()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    for out, _ in outs:
        assert f'at step {step}' in out and 'done: 20 steps' in out, out[-2000:]


KILL_RUN = ('--steps=30', '--save_every=3', '--eval_every=10', '--keep_checkpoints=3')


def _newest_complete(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return 0
    return checkpoints._number(checkpoints.newest_good(ckpt_dir, move=False) or 'ckpt-0')


def _wait_for_step(path, proc, wanted):
    """Until the process's output (unbuffered, in `path`) shows a step line with wanted(N)."""
    import re
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if any(wanted(int(n)) for n in re.findall(r'step (\d+) elbo', open(path).read())):
            return True
        time.sleep(0.005)
    return False


def test_kill_9_at_random_moments_loses_no_save_and_ends_bit_identical(straight30, tmp_path):
    """SIGKILL at 6 seeded random moments, the same command restarted after each: once during
    the start-up (restore, trace), twice during updates (once a save of that start has ended:
    a step's log line comes after the save before it, so every later start resumes, whatever
    the load), twice aimed at a save (0 to 0.2 s after the log line of a step that saves) and
    once during an evaluation. Each restart resumes from the newest complete checkpoint, no
    kill undoes a finished save, and the run ends with the weights, EMA and optimizer state of
    the uninterrupted run (which neither saved nor evaluated on the way), bit for bit."""
    import random
    import re
    rng = random.Random(20261203)
    moments = ['start-up'] + ['update'] * 2 + ['save'] * 2 + ['evaluation']
    rng.shuffle(moments)
    logdir = str(tmp_path / 'run')
    killed, last_saved, resumed = [], 0, []
    for attempt in range(len(moments) + 1):
        out_path = str(tmp_path / f'out{attempt}.txt')
        proc = cli.start('train.py', *RUN, f'--logdir={logdir}', *KILL_RUN, env=dict(PYTHONUNBUFFERED='1'),
                         output=out_path)
        moment = moments[attempt] if attempt < len(moments) else None
        if moment == 'start-up':
            time.sleep(rng.uniform(.5, 3.))         # before the first step: start-up takes longer
        elif moment == 'update':      # past a save of this start's: the next start resumes
            _wait_for_step(out_path, proc, lambda n: n > 3 * (last_saved // 3 + 1))
            time.sleep(rng.uniform(0., 1.))
        elif moment == 'save':
            _wait_for_step(out_path, proc, lambda n: n % 3 == 0 and n % 10)
            time.sleep(rng.uniform(0., 0.2))       # about as long as a save of the tiny model
        elif moment == 'evaluation':
            _wait_for_step(out_path, proc, lambda n: n % 10 == 0)
            time.sleep(rng.uniform(0.3, 2.))
        if moment and proc.poll() is None:
            proc.kill()                                      # SIGKILL
            killed.append(moment)
        proc.wait(timeout=600)
        text = open(out_path).read()
        m = re.search(r'resumed from \S*ckpt-(\d+) at step (\d+)', text)
        if m:
            resumed.append(int(m[2]))
            assert int(m[1]) == int(m[2]) >= last_saved, (m[0], last_saved)
        now = _newest_complete(os.path.join(logdir, 'ckpt'))
        assert now >= last_saved, (now, last_saved)     # a finished save survives the kill
        last_saved = now
        if moment:
            assert proc.returncode == -signal.SIGKILL, (moment, text[-2000:])
    assert proc.returncode == 0 and 'done: 30 steps' in text, text[-2000:]
    assert killed == moments and len(resumed) >= 4 and resumed == sorted(resumed), (killed, resumed)
    assert_same_state(f'{straight30}/ckpt/ckpt-30', f'{logdir}/ckpt/ckpt-30')


@contextlib.contextmanager
def _mounted(folder, *options):
    """A file system the test makes at `folder` (a tmpfs, or a read-only bind of the folder
    onto itself); skipped where mounting is not allowed (it needs root)."""
    os.makedirs(folder, exist_ok=True)
    for command in options:
        r = subprocess.run(['mount', *command, str(folder)], capture_output=True)
        if r.returncode:
            subprocess.run(['umount', str(folder)], capture_output=True)
            pytest.skip(f'cannot mount here: {r.stderr.decode().strip()}')
    try:
        yield folder
    finally:
        subprocess.run(['umount', str(folder)])


def _tmpfs(size):
    return ['-t', 'tmpfs', '-o', f'size={size}', 'tmpfs']


def _contents(folder):
    return {p: open(os.path.join(d, p), 'rb').read() for d, _, files in os.walk(folder) for p in files}


def test_a_full_disk_stops_in_one_line_and_leaves_the_last_checkpoint_loadable(tmp_path):
    """The run folder on a 3 MB tmpfs: each tiny checkpoint is 1.3 MB, so the third save finds
    the disk full."""
    with _mounted(tmp_path / 'disk', _tmpfs('3m')) as folder:
        logdir = str(folder / 'run')
        line = cli.error_line(_train(logdir, '--steps=10', '--save_every=1'))
        assert 'ckpt: cannot write checkpoint 3' in line and 'No space left on device' in line, line
        assert 'the last complete checkpoint' in line and 'ckpt-2' in line, line
        checkpoints.verify(f'{logdir}/ckpt/ckpt-2')
        assert not [p for p in _contents(logdir) if '.tmp' in p]


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
    """A run folder at step 2 (checkpoints 1 and 2)."""
    return _uninterrupted(tmp_path_factory, '--steps=2', '--save_every=1')


@pytest.mark.parametrize('full', ['tb', 'samples'])
def test_a_full_log_or_sample_folder_stops_in_one_line_naming_it(two_steps, tmp_path, full):
    """A tmpfs of 16 pages mounted on one subfolder of a run at step 2, then resumed. `tb`: 15
    pages filled first, so TensorBoard's event file fills up some steps into the run (it
    reports that only when flushed). `samples`: filled, so the first sample grid fails."""
    logdir = tmp_path / 'run'
    shutil.copytree(two_steps, logdir)
    shutil.rmtree(logdir / full, ignore_errors=True)
    with _mounted(logdir / full, _tmpfs('64k')) as folder:
        try:
            with open(folder / 'filler', 'wb') as f:
                f.write(bytes(60 << 10 if full == 'tb' else 1 << 20))
        except OSError:
            pass
        assert os.statvfs(folder).f_bavail == (1 if full == 'tb' else 0)
        line = cli.error_line(_train(logdir, '--steps=30', '--save_every=1', '--samples_every=1'))
        what = 'TensorBoard events' if full == 'tb' else 'the sample grid'
        assert f'{folder}' in line and f'cannot write {what}' in line and 'No space left on device' in line, line
        last = re.search(r'the last complete checkpoint \((.*ckpt-(\d+))\) is as it was$', line)
        assert last and last.group(1) == f'{logdir}/ckpt/ckpt-{last.group(2)}', line
        assert int(last.group(2)) >= 3 and (full == 'tb' or last.group(2) == '3'), line
        checkpoints.verify(last.group(1))
        assert not [p for p in _contents(folder) if '.tmp' in p]


def test_a_read_only_run_folder_is_refused_before_training_and_left_as_it_was(two_steps, tmp_path):
    """The folder bound read-only onto itself (root ignores file modes): train.py stops before
    its first step, sample.py and convert.py --export before their first write."""
    logdir = tmp_path / 'run'
    shutil.copytree(two_steps, logdir)
    before = _contents(logdir)
    with _mounted(logdir, ['--bind', str(logdir)], ['-o', 'remount,ro,bind']):
        line = cli.error_line(_train(logdir, '--steps=4', '--save_every=1'))
        assert f'{logdir}: cannot write the run folder' in line and 'Read-only file system' in line, line
        line = cli.error_line(cli.run('sample.py', f'--ckpt={logdir}', '--n=2'))
        assert f'{logdir}/figures' in line and 'cannot write the picture' in line and 'Read-only' in line, line
        line = cli.error_line(cli.run('convert.py', '--export', f'--ckpt={logdir}', f'--out={logdir}/x.th'))
        assert f'{logdir}/x.th: cannot write the checkpoint' in line and 'Read-only' in line, line
        assert _contents(logdir) == before
    checkpoints.verify(f'{logdir}/ckpt/ckpt-2')
