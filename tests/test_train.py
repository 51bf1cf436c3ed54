"""The update rule under tf.distribute: same result on one device and on two replicas,
skipped updates that leave everything untouched, EMA and warm-up arithmetic."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import cli
import console
import devices
import hparams
import steps
import update


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 16, 16, 3))
    return ((x - 127.5) / 64.).astype(np.float32), (x / 127.5 - 1.).astype(np.float32)


def _mirrored():
    return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])


def test_evaluation_draws_fresh_noise_per_batch_the_same_on_any_number_of_replicas():
    """Each evaluation batch its own posterior noise, the same in every evaluation and on one
    device or two replicas (each image gets its row of the global batch's draw)."""
    hp = hparams.load('tiny')
    keras.utils.set_random_seed(0)
    m = steps.create_state(hp, tf.distribute.get_strategy()).model
    x_in, target = _batch(n=8, seed=3)
    mask = np.ones(8, np.float32)
    one = steps.make_eval_step(m, hp, tf.distribute.get_strategy())
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    two = steps.make_eval_step(m, hp, strategy)
    split = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x_in, target, mask)).batch(8))))
    sums = {b: {k: float(v) for k, v in one(x_in, target, mask, batch=b).items()} for b in (0, 1, 2)}
    assert len({sums[b]['rate'] for b in sums}) == 3            # three batches, three draws
    assert {k: float(v) for k, v in one(x_in, target, mask, batch=1).items()} == sums[1]   # reproducible
    for b in (0, 1):
        for k, v in two(*split, batch=b).items():
            assert float(v) == pytest.approx(sums[b][k], rel=1e-5), (b, k)


def _run(strategy, hp, batches):
    keras.utils.set_random_seed(0)
    state = steps.create_state(hp, strategy)
    step = steps.make_train_step(state, hp, strategy)
    outs = []
    for x_in, target in batches:
        if strategy.num_replicas_in_sync > 1:
            ds = tf.data.Dataset.from_tensor_slices((x_in, target)).batch(len(x_in))
            x_in, target = next(iter(strategy.experimental_distribute_dataset(ds)))
        outs.append({k: float(v) for k, v in step(x_in, target).items()})
    return state, outs


def _snapshot(state):
    return dict(weights=[v.numpy() for v in state.model.weights], ema=[e.numpy() for e in state.ema],
                optimizer=[v.numpy() for v in state.optimizer.variables])


def test_two_replicas_match_one_device_for_the_same_global_batch():
    hp = hparams.load('tiny', warmup_iters=2)
    batches = [_batch(seed=i) for i in range(3)]
    one, outs_one = _run(tf.distribute.get_strategy(), hp, batches)
    two, outs_two = _run(_mirrored(), hp, batches)
    for a, b in zip(outs_one, outs_two):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    # Summing two half-batch gradients rounds differently from one batch, and Adam divides by
    # the root of tiny second moments, so an element can move by ~1e-6 (seen once under load);
    # 1e-5 is still 1% of one Adam step at lr 1e-3.
    for a, b in zip(_snapshot(one)['weights'], _snapshot(two)['weights']):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(two.step.numpy()) == 3 and int(two.optimizer.iterations.numpy()) == 3


@pytest.mark.smoke
@pytest.mark.parametrize('fault', ['nan_on_one_replica', 'gradient_spike'])
def test_a_bad_step_is_skipped_by_every_replica_and_touches_nothing(fault):
    hp = hparams.load('tiny', warmup_iters=1)
    strategy = _mirrored()
    keras.utils.set_random_seed(0)
    state = steps.create_state(hp, strategy)
    step = steps.make_train_step(state, hp, strategy)
    good = _batch(seed=1)
    dist = lambda x, t: next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, t)).batch(len(x)))))
    for i in range(2):
        out = step(*dist(*good))
    assert out['skipped'] == 0
    before = _snapshot(state)
    x_in, target = _batch(seed=2)
    if fault == 'nan_on_one_replica':
        x_in[5] = np.nan                     # image 5 lives on the second replica
    else:
        state_hp = hp.replace(skip_threshold=1e-9)
        step = steps.make_train_step(state, state_hp, strategy)
    out = step(*dist(x_in, target))
    assert out['skipped'] == 1
    after = _snapshot(state)
    for kind in before:
        for a, b in zip(before[kind], after[kind]):
            np.testing.assert_array_equal(a, b, err_msg=kind)
    assert int(state.skipped.numpy()) == 1 and int(state.skips_in_a_row.numpy()) == 1
    assert int(state.step.numpy()) == 3 and int(state.optimizer.iterations.numpy()) == 2
    # Every replica holds the same, untouched weights.
    for v in state.model.weights:
        copies = strategy.experimental_local_results(v.value)
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())


def test_skip_threshold_minus_one_never_skips_on_the_norm_but_still_skips_non_finite_steps():
    hp = hparams.load('tiny', warmup_iters=1, skip_threshold=-1)
    keras.utils.set_random_seed(0)
    state = steps.create_state(hp, tf.distribute.get_strategy())
    step = steps.make_train_step(state, hp, tf.distribute.get_strategy())
    assert float(step(*_batch(seed=1))['skipped']) == 0            # a norm >= -1 is not a skip
    before = _snapshot(state)['weights']
    x_in, target = _batch(seed=2)
    x_in[0] = np.nan
    assert float(step(x_in, target)['skipped']) == 1
    for a, b in zip(before, _snapshot(state)['weights']):
        np.testing.assert_array_equal(a, b)


def test_ema_follows_the_applied_weights():
    hp = hparams.load('tiny', warmup_iters=1, ema_rate=0.9)
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    state = steps.create_state(hp, strategy)
    step = steps.make_train_step(state, hp, strategy)
    ema = [v.numpy() for v in state.model.weights]       # EMA starts at the initial weights
    for i in range(3):
        step(*_batch(seed=i))
        ema = [0.9 * e + 0.1 * v.numpy() for e, v in zip(ema, state.model.weights)]
    for e, ours in zip(ema, state.ema):
        np.testing.assert_allclose(ours.numpy(), e, rtol=1e-5, atol=1e-7)


def test_warm_up_is_linear_in_all_steps_then_constant():
    step = tf.Variable(0, dtype=tf.int64)
    schedule = update.WarmUp(1e-3, 100, step)
    values = []
    for s in (0, 1, 50, 99, 100, 1000):
        step.assign(s)
        values.append(float(schedule(None)))
    np.testing.assert_allclose(values, [0., 1e-5, 5e-4, 9.9e-4, 1e-3, 1e-3], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# The command line, end to end on the tiny preset and the offline mnist5k digits.
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args):
    return cli.run('train.py', '--hparams=tiny', '--eval_every=0', '--samples_every=0', '--log_every=1',
                   *args, timeout=600)


def _weights(ckpt_prefix):
    reader = tf.train.load_checkpoint(ckpt_prefix)
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if n.startswith(('weights/', 'ema/', 'optimizer/')))
    return {n: reader.get_tensor(n) for n in names}


def assert_same_state(prefix_a, prefix_b):
    """Two checkpoints hold the same weights, EMA and optimizer state, bit for bit."""
    a, b = _weights(prefix_a), _weights(prefix_b)
    assert a.keys() == b.keys() and len(a) > 40
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.smoke
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    # The straight run makes several updates per call (cut where a log line or save is due).
    r = _train(f'--logdir={straight}', '--steps=6', '--save_every=3', '--steps_per_call=4', '--log_every=2')
    assert r.returncode == 0, r.stderr[-2000:]
    first = _train(f'--logdir={resumed}', '--steps=3', '--save_every=3')
    assert first.returncode == 0, first.stderr[-2000:]
    second = _train(f'--logdir={resumed}', '--steps=6', '--save_every=3')
    assert second.returncode == 0, second.stderr[-2000:]
    assert 'resumed from' in second.stdout
    assert_same_state(f'{straight}/ckpt/ckpt-6', f'{resumed}/ckpt/ckpt-6')
    # The log says what happened at each step, both runs alike.
    steps = [json.loads(line)['step'] for line in open(f'{resumed}/log.jsonl')]
    assert steps == list(range(1, 7))
    assert [json.loads(line)['step'] for line in open(f'{straight}/log.jsonl')] == [2, 4, 6]


def test_test_eval_reports_bits_per_dim_of_a_checkpoint(tmp_path):
    run = str(tmp_path / 'run')
    assert _train(f'--logdir={run}', '--steps=2', '--save_every=2').returncode == 0
    r = _train('--test_eval', f'--ckpt={run}', '--iw_samples=2')
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith('test mnist5k')]
    assert len(line) == 2 and 'bits/dim over 500 images' in line[0], r.stdout
    nats, bits = float(line[0].split()[2]), float(line[0].split()[5])
    assert bits == pytest.approx(nats / np.log(2), rel=1e-3)
    assert 'importance-weighted bound, K=2:' in line[1] and 'bits/dim over 500 images' in line[1]
    iw_nats, iw_bits = float(line[1].split()[5]), float(line[1].split()[8])
    assert iw_bits == pytest.approx(iw_nats / np.log(2), rel=1e-3) and abs(iw_nats - nats) < 0.05 * nats
    r = _train(f'--logdir={run}', '--iw_samples=4')
    assert r.returncode == 2 and 'with --test_eval' in r.stderr and 'Traceback' not in r.stderr


def test_a_run_folder_refuses_other_hyperparameters_and_a_missing_checkpoint(tmp_path):
    run = str(tmp_path / 'run')
    assert _train(f'--logdir={run}', '--steps=1').returncode == 0
    r = _train(f'--logdir={run}', '--steps=1', '--width=16')
    assert r.returncode == 2 and 'other hyperparameters (width)' in r.stderr
    r = _train('--test_eval', f'--ckpt={tmp_path}/nothing')
    assert r.returncode == 2 and 'error:' in r.stderr and 'Traceback' not in r.stderr
    r = _train(f'--logdir={tmp_path}/other', f'--dataset=folder:{tmp_path}/no-such-folder')
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert f'{tmp_path}/no-such-folder' in [l for l in r.stderr.splitlines() if l.startswith('error:')][0]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_multi_worker_run_ends_with_identical_weights(tmp_path):
    workers = [f'127.0.0.1:{_free_port()}', f'127.0.0.1:{_free_port()}']
    procs = []
    for i in range(2):
        tf_config = json.dumps({'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': i}})
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'tests', 'mwms_worker.py'), str(tmp_path / f'w{i}.npz'), '3'],
            env=dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL='3'),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    w0, w1 = np.load(tmp_path / 'w0.npz'), np.load(tmp_path / 'w1.npz')
    assert int(w0['replicas']) == 2 and int(w0['step']) == int(w1['step']) == 3
    np.testing.assert_array_equal(w0['losses'], w1['losses'])      # all-reduced means
    names = [k for k in w0.files if k.startswith('arr_')]
    assert len(names) > 20
    for k in names:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    initial = model_initial_weights()
    assert any(not np.array_equal(w0[k], v) for k, v in zip(names, initial))   # it trained


def model_initial_weights():
    import model
    keras.utils.set_random_seed(0)
    return [v.numpy() for v in model.VDVAE(hparams.load('tiny', batch_size=4)).weights]


def test_float16_uses_a_dynamic_loss_scale_that_halves_on_overflow():
    keras.config.set_dtype_policy('mixed_float16')
    try:
        hp = hparams.load('tiny', warmup_iters=1)
        keras.utils.set_random_seed(0)
        strategy = tf.distribute.get_strategy()
        state = steps.create_state(hp, strategy, loss_scale=2. ** 100)    # overflows float16
        assert state.model.decoder.compute_dtype == 'float16'
        step = steps.make_train_step(state, hp, strategy)
        before = _snapshot(state)
        out = step(*_batch(seed=0))
        assert out['skipped'] == 1 and np.isfinite(out['elbo'])
        assert float(state.loss_scale.numpy()) == 2. ** 99
        for a, b in zip(before['weights'], _snapshot(state)['weights']):
            np.testing.assert_array_equal(a, b)
        state.loss_scale.assign(2. ** 10)
        out = step(*_batch(seed=1))
        assert out['skipped'] == 0 and np.isfinite(out['grad_norm'])
        assert any(not np.array_equal(a, b) for a, b in zip(before['weights'], _snapshot(state)['weights']))
        assert all(v.dtype == 'float32' for v in state.model.weights)
    finally:
        keras.config.set_dtype_policy('float32')


def test_evaluation_averages_per_image_counts_non_finite_images_and_ignores_padding():
    hp = hparams.load('tiny')
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    m = steps.create_state(hp, strategy).model
    x_in, target = _batch(n=8, seed=3)
    x_in[2] = np.nan                               # a broken image: counted, not averaged
    mask = np.ones(8, np.float32)
    mask[6:] = 0.                                  # padding
    batches = [(x_in[:4], target[:4], mask[:4]), (x_in[4:], target[4:], mask[4:])]
    result = steps.evaluate(steps.make_eval_step(m, hp, strategy), batches)
    assert result['images'] == 5 and result['nonfinite'] == 1
    # Batch i draws its noise from seed [seed, -1 - i] (fresh per batch).
    per_image = np.concatenate([m.losses_per_image(x, t, seed=tf.constant([hp.seed, -1 - i]))['elbo'].numpy()
                                for i, (x, t, _) in enumerate(batches)])
    expected = per_image[[0, 1, 3, 4, 5]].mean()
    assert result['elbo'] == pytest.approx(expected, rel=1e-5)
    assert result['bits_per_dim'] == pytest.approx(expected / np.log(2), rel=1e-5)


def test_a_tpu_that_does_not_start_is_one_line_and_auto_falls_back(tmp_path):
    # TPU_NAME says a TPU is there; here none can start (no chips, a wheel without TPU kernels).
    tpu = {'TPU_NAME': 'local'}
    line = cli.error_line(cli.run('train.py', '--hparams=tiny', '--strategy=tpu', f'--logdir={tmp_path / "a"}',
                                  env=tpu))
    assert 'the TPU (local) did not start' in line and 'tensorflow-tpu' in line
    r = cli.run('train.py', '--hparams=tiny', '--steps=1', '--eval_every=0', '--samples_every=0',
                f'--logdir={tmp_path / "b"}', env=tpu)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [l for l in r.stderr.splitlines() if l.startswith('strategy:')]
    assert len(said) == 1 and 'the TPU (local) did not start' in said[0] and 'falling back' in said[0], said
    assert 'strategy: one CPU device (no GPU visible to TensorFlow)' in r.stdout and 'done: 1 steps' in r.stdout



def _stub_nvidia_smi(folder):
    folder.mkdir(exist_ok=True)
    stub = folder / 'nvidia-smi'
    stub.write_text('#!/bin/sh\necho "NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: 12.4"\n')
    stub.chmod(0o755)
    return str(folder)


def test_a_driver_without_a_gpu_in_tensorflow_is_one_warning_with_the_install_line(tmp_path, monkeypatch):
    """An NVIDIA driver (nvidia-smi on PATH) but no GPU in TensorFlow (here: none at all) means
    TensorFlow without its CUDA libraries; the run says so once, and trains on the CPU."""
    if console.nvidia_driver() or tf.config.list_physical_devices('GPU'):
        pytest.skip('this machine has an NVIDIA driver or a GPU of its own')
    assert devices.gpu_warning() is None
    plain = os.environ['PATH']
    path = _stub_nvidia_smi(tmp_path / 'bin') + os.pathsep + plain
    monkeypatch.setenv('PATH', path)
    assert 'requirements-gpu.txt' in devices.gpu_warning() and 'nvidia-smi' in devices.gpu_warning()
    run = ['--hparams=tiny', '--steps=1', '--eval_every=0', '--samples_every=0']
    r = cli.run('train.py', *run, f'--logdir={tmp_path / "a"}', env={'PATH': path})
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [l for l in r.stderr.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 1 and 'NVIDIA driver' in warnings[0] and 'pip install -r requirements-gpu.txt' in warnings[0]
    assert 'strategy: one CPU device (no GPU visible to TensorFlow)' in r.stdout
    # PATH given: a fork server started under the stubbed PATH above would pass it on.
    r = cli.run('train.py', *run, f'--logdir={tmp_path / "b"}', env={'PATH': plain})
    assert r.returncode == 0 and 'warning:' not in r.stderr and 'strategy: one CPU device' in r.stdout, r.stderr[-2000:]


def test_the_start_line_names_the_strategy_and_its_devices():
    assert devices.describe(tf.distribute.get_strategy()) == 'one CPU device (no GPU visible to TensorFlow)'
    two = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    assert devices.describe(two) == 'MirroredStrategy, 2 replicas (CPU:0, CPU:1)'


def test_auto_tries_no_tpu_without_a_sign_of_one(monkeypatch, capsys):
    monkeypatch.delenv('TPU_NAME', raising=False)
    monkeypatch.setattr(console.glob, 'glob', lambda pattern: [])
    monkeypatch.setattr(tf.distribute.cluster_resolver, 'TPUClusterResolver', None)   # would fail if called
    assert not console.tpu_present()
    assert devices.make_strategy('auto') is tf.distribute.get_strategy()
    assert 'strategy:' not in capsys.readouterr().err


@pytest.mark.smoke
def test_n_updates_in_one_call_equal_n_calls_of_one():
    """make_train_loop (several updates per host call, for TPUs): however a run is cut into
    calls, the same updates to the bit; one image NaN makes its step skipped inside a call."""
    hp = hparams.load('tiny', warmup_iters=2)
    batches = [_batch(seed=i) for i in range(4)]
    batches[2][0][3] = np.nan
    x, t = (np.concatenate(parts) for parts in zip(*batches))
    results = {}
    for calls in ((1, 1, 1, 1), (4,)):
        keras.utils.set_random_seed(0)
        state = steps.create_state(hp, tf.distribute.get_strategy())
        loop = steps.make_train_loop(state, hp, tf.distribute.get_strategy())
        it = iter(tf.data.Dataset.from_tensor_slices((x, t)).batch(8))
        outs = [{k: float(v) for k, v in loop(it, tf.constant(n)).items()} for n in calls]
        results[calls] = _snapshot(state), outs
        assert int(state.step.numpy()) == 4 and int(state.skipped.numpy()) == 1
        assert int(state.optimizer.iterations.numpy()) == 3
    for kind in results[(4,)][0]:
        for a, b in zip(results[(1, 1, 1, 1)][0][kind], results[(4,)][0][kind]):
            np.testing.assert_array_equal(a, b, err_msg=kind)
    one, four = results[(1, 1, 1, 1)][1], results[(4,)][1][0]
    assert four['skipped'] == 1 and [o['skipped'] for o in one] == [0, 0, 1, 0]
    # The call's means leave out the NaN step; its largest gradient norm is the finite ones'.
    finite = [o for o in one if np.isfinite(o['elbo'])]
    assert len(finite) == 3 and four['grad_norm_max'] == max(o['grad_norm'] for o in finite)
    for k in ('elbo', 'distortion', 'rate', 'grad_norm'):
        assert four[k] == pytest.approx(np.mean([o[k] for o in finite]), rel=1e-6), k
