"""NaN storms and gradient spikes: skipped updates change nothing and are counted, the stall
guard stays silent below its threshold and past it saves the last good state, non-finite state
is never saved, and training goes on afterwards. The CLI tests inject the fault inside
train.py's own traced step (tests/storm.py) and judge the checkpoints the run leaves."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import cli
import errors
import hparams
import steps
import train
from test_train import _weights, assert_same_state

RUN = ('--hparams=tiny', '--eval_every=0', '--samples_every=0', '--log_every=1', '--keep_checkpoints=10')


def _storm(logdir, storm, kind, *args, replica=None):
    where = [f'--replica={replica}'] if replica is not None else []      # else both
    return cli.run('tests/storm.py', f'--storm={storm}', f'--kind={kind}', *where, *RUN, f'--logdir={logdir}',
                   *args, timeout=600)


def _log(logdir):
    return [json.loads(line) for line in open(f'{logdir}/log.jsonl')]


BELOW_GUARD = ('3:8', 'huge', '--steps=12', '--save_every=3', '--max_skips_in_a_row=6')


@pytest.fixture(scope='module')
def below_guard(tmp_path_factory):
    """Updates 3 to 8 see 1e9 times the gradient on the second of two replicas; a log line
    per step."""
    logdir = str(tmp_path_factory.mktemp('storm') / 'run')
    r = _storm(logdir, *BELOW_GUARD, replica=1)
    assert r.returncode == 0 and 'done: 12 steps' in r.stdout, r.stderr[-2000:]
    return logdir, r


def test_a_spike_storm_on_one_replica_below_the_guard_is_skipped_and_training_goes_on(below_guard):
    """All six updates of the storm are skipped (the all-reduced norm is huge on both
    replicas), counted, and change nothing; the guard (6 in a row allowed) stays silent; the
    updates after the storm train again."""
    logdir, r = below_guard
    assert 'error:' not in r.stderr and 'stalled' not in r.stderr
    log = _log(logdir)
    assert [s['skipped'] for s in log] == [0] * 3 + [1] * 6 + [0] * 3
    assert [s['skipped_total'] for s in log] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 6, 6]
    assert all(s['grad_norm'] > 1e6 for s in log[3:9]) and all(s['grad_norm'] < 1e3 for s in log[:3] + log[9:])
    assert all(np.isfinite(s['elbo']) for s in log)
    # Nothing moved during the storm (weights, EMA, Adam's moments and step counter) ...
    assert_same_state(f'{logdir}/ckpt/ckpt-3', f'{logdir}/ckpt/ckpt-9')
    # ... and every variable moved after it, to finite values.
    before, after = _weights(f'{logdir}/ckpt/ckpt-9'), _weights(f'{logdir}/ckpt/ckpt-12')
    assert all(not np.array_equal(before[n], after[n]) for n in before if np.any(before[n])), \
        [n for n in before if np.array_equal(before[n], after[n])]
    checkpoints.verify(f'{logdir}/ckpt/ckpt-12')


def test_a_log_line_reports_its_interval_and_figure_6_is_drawn(below_guard, tmp_path):
    """The same run logged every 4 steps: each line holds the means over its interval's steps
    (those of the per-step log), the largest gradient norm and the skips in it; whole lines
    when stderr is not a terminal; grad_norm.png beside the grids, the EMA preview grid in
    TensorBoard too."""
    per_step = _log(below_guard[0])
    logdir = str(tmp_path / 'run')
    r = _storm(logdir, *BELOW_GUARD, '--log_every=4', '--samples_every=12', replica=1)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = _log(logdir)
    assert [l['step'] for l in lines] == [4, 8, 12]
    for line, interval in zip(lines, (per_step[0:4], per_step[4:8], per_step[8:12])):
        for k in ('elbo', 'distortion', 'rate', 'grad_norm'):
            assert line[k] == pytest.approx(np.mean([s[k] for s in interval]), rel=1e-6), (line['step'], k)
        assert line['grad_norm_max'] == pytest.approx(max(s['grad_norm'] for s in interval), rel=1e-6)
        assert line['skipped'] == sum(s['skipped'] for s in interval) and line['nonfinite'] == 0
    assert [l['skipped'] for l in lines] == [1, 4, 1] and lines[-1]['skipped_total'] == 6
    assert '\r' not in r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith('step ')][0].startswith('step 4 elbo')
    assert os.path.isfile(f'{logdir}/grad_norm.png') and os.path.isfile(f'{logdir}/samples/step-00000012.png')
    # The preview is the grid of the EMA weights (sampling.py's), not of the raw ones.
    import sampling
    from PIL import Image
    ema, hp, *_ = checkpoints.load(f'{logdir}/ckpt/ckpt-12')
    expected = sampling.sample_grid(ema, *train.preview_images(hp), seed=12, title='step 12, EMA weights')
    np.testing.assert_array_equal(np.asarray(Image.open(f'{logdir}/samples/step-00000012.png')), expected)
    events = tf.io.gfile.glob(f'{logdir}/tb/events.*')
    tags = {v.tag for e in events for event in tf.compat.v1.train.summary_iterator(e) for v in event.summary.value}
    assert 'preview (EMA weights)' in tags and 'train/grad_norm_max' in tags, tags


@pytest.mark.parametrize('kind', ['huge', 'nan'])
def test_past_its_threshold_the_guard_saves_the_last_good_state_and_stops(tmp_path, kind):
    """From update 3 on, every gradient is huge on both replicas (or the loss NaN on one): the
    fifth skip in a row is past --max_skips_in_a_row=4, so the run saves at step 8 and stops in
    one line pointing to --skip_threshold and --lr. The checkpoint holds the state of step 3,
    finite. For the spikes, the remedy works: the same command with --skip_threshold raised
    above them (and --lr lowered) resumes at step 8 and trains, clipped, to the end."""
    logdir = str(tmp_path / 'run')
    args = ('--steps=12', '--save_every=3', '--max_skips_in_a_row=4')
    line = cli.error_line(_storm(logdir, '3:1000', kind, *args, replica=None if kind == 'huge' else 1))
    assert '5 updates in a row were skipped' in line and '--skip_threshold' in line and '--lr' in line, line
    assert [s['skipped'] for s in _log(logdir)] == [0] * 3 + [1] * 5
    assert checkpoints.prefixes(f'{logdir}/ckpt')[0].endswith('ckpt-8')
    checkpoints.verify(f'{logdir}/ckpt/ckpt-8')
    assert_same_state(f'{logdir}/ckpt/ckpt-3', f'{logdir}/ckpt/ckpt-8')
    reader = tf.train.load_checkpoint(f'{logdir}/ckpt/ckpt-8')
    assert reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE') == 8
    if kind == 'nan':
        return
    r = _storm(logdir, '3:1000', kind, *args, '--skip_threshold=1e12', '--lr=5e-4')
    assert r.returncode == 0 and 'resumed from' in r.stdout and 'at step 8' in r.stdout, r.stderr[-2000:]
    assert 'resuming with lr=0.0005 (the run had 0.001)' in r.stdout
    assert 'resuming with skip_threshold=1000000000000.0 (the run had 1000' in r.stdout
    after = _log(logdir)[8:]
    assert [s['step'] for s in after] == [9, 10, 11, 12] and all(s['skipped'] == 0 for s in after)
    assert all(s['grad_norm'] > 1e6 for s in after)          # applied, clipped to grad_clip
    assert [s['lr'] for s in after] == pytest.approx([5e-4 * n / 100 for n in (9, 10, 11, 12)])
    checkpoints.verify(f'{logdir}/ckpt/ckpt-12')
    before, end = _weights(f'{logdir}/ckpt/ckpt-8'), _weights(f'{logdir}/ckpt/ckpt-12')
    assert sum(not np.array_equal(before[n], end[n]) for n in before) > len(before) // 2


def test_a_resumed_run_may_change_only_its_length_and_the_remedies(tmp_path, capsys):
    hp = hparams.load('tiny')
    checkpoints.check_run_folder(str(tmp_path), hp)
    checkpoints.check_run_folder(str(tmp_path), hp.replace(steps=400, lr=1e-4, skip_threshold=2000., grad_clip=100.))
    out = capsys.readouterr().out
    assert 'resuming with lr=0.0001 (the run had 0.001)' in out and 'grad_clip=100.0' in out
    with pytest.raises(SystemExit) as e:
        checkpoints.check_run_folder(str(tmp_path), hp.replace(width=16, lr=1e-4))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'other hyperparameters (width)' in err and 'only steps, lr, grad_clip, skip_threshold' in err
    # What the folder records is the run as it goes on now.
    assert json.load(open(tmp_path / 'hparams.json'))['skip_threshold'] == 2000.


def test_non_finite_state_is_never_saved(tmp_path):
    hp = hparams.load('tiny')
    strategy = tf.distribute.get_strategy()
    state = steps.create_state(hp, strategy)
    manager = tf.train.CheckpointManager(state.checkpoint(), str(tmp_path), 3)
    assert checkpoints.save(manager, state, 1).endswith('ckpt-1')
    weights = state.model.weights[3]
    weights.assign(tf.tensor_scatter_nd_update(weights, [[0, 0]], [np.inf]))
    with pytest.raises(errors.CheckpointError, match=r'not saving step 2: 1 variables .*'
                       + weights.path.split('/')[0] + r'.*last good checkpoint is .*ckpt-1'):
        checkpoints.save(manager, state, 2)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index']
    checkpoints.verify(str(tmp_path / 'ckpt-1'))          # the good one is still good


@pytest.mark.parametrize('storm', ['nan_on_one_replica', 'inf_on_all'])
def test_a_storm_of_non_finite_steps_is_skipped_and_training_recovers(storm):
    """Two replicas, 12 updates in calls of 3; updates 4 to 9 see a NaN image on the second
    replica only, or infinite images on both. All six are skipped and counted (the stall
    guard's count comes back to 0 after them), the rest apply, and the weights end finite and
    trained on."""
    import keras
    from test_train import _batch, _mirrored
    hp = hparams.load('tiny', warmup_iters=1)
    strategy = _mirrored()
    keras.utils.set_random_seed(0)
    state = steps.create_state(hp, strategy)
    loop = steps.make_train_loop(state, hp, strategy)
    batches = [_batch(seed=i) for i in range(12)]
    for x_in, _ in batches[3:9]:
        if storm == 'nan_on_one_replica':
            x_in[5] = np.nan                       # image 5 lives on the second replica
        else:
            x_in[:] = np.inf
    x, t = (np.concatenate(parts) for parts in zip(*batches))
    it = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, t)).batch(8)))
    initial = [v.numpy() for v in state.model.weights]
    skipped, in_a_row = [], []
    for _ in range(4):
        skipped.append(float(loop(it, tf.constant(3))['skipped']))
        in_a_row.append(int(state.skips_in_a_row.numpy()))
    assert skipped == [0, 3, 3, 0] and in_a_row == [0, 3, 6, 0]
    assert int(state.skipped.numpy()) == 6 and int(state.optimizer.iterations.numpy()) == 6
    assert checkpoints.nonfinite(state) == []
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(initial, state.model.weights)
               if np.any(a))                      # every non-zero weight kept training


def test_figure_6_marks_skipped_intervals_and_draws_the_threshold_where_it_is():
    import figures

    def lines(skips):
        return [json.dumps(dict(step=10 * i, kind='train', grad_norm_max=g, skipped=s))
                for i, (g, s) in enumerate(zip([50., 80., 2e4, 60.], skips), 1)]
    red = lambda image: np.all(image == figures.SKIPPED_COLOUR, axis=-1).sum()
    calm, stormy = figures.grad_norm_figure(lines([0] * 4), 400.), figures.grad_norm_figure(lines([0, 0, 3, 0]), 400.)
    assert red(calm) == 0 and red(stormy) > 20
    higher = figures.grad_norm_figure(lines([0] * 4), 4000.)
    assert calm.shape == higher.shape and (calm != higher).any()
    never = figures.grad_norm_figure(lines([0] * 4), -1)
    assert (never != calm).any()
    assert figures.grad_norm_figure([], 400.).shape == calm.shape      # before the first log line
