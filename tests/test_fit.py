"""Keras' way: model.compile/fit/evaluate run the same update rule and evaluation as train.py's
loop (update.KerasSteps), on one device and on two replicas."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import hparams
import model as vdvae
import steps


def _images(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 16, 16, 3))
    return ((x - 127.5) / 64.).astype(np.float32), (x / 127.5 - 1.).astype(np.float32)


def _train_data(steps_, batch, nan_step):
    """`steps_` global batches of (x_in, target); batch `nan_step` has a NaN pixel in an image
    of the second half (the second replica's)."""
    x_in, target = _images(steps_ * batch, seed=1)
    x_in[nan_step * batch + batch - 1, 3, 3, 0] = np.nan
    return tf.data.Dataset.from_tensor_slices((x_in, target)).batch(batch)


def _mirrored():
    # Not collective all-reduce: TF caches a collective's shape by instance key for the whole
    # process, and another test's mirrored steps would meet these.
    return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())


def _state_arrays(state):
    return dict(weights=[v.numpy() for v in state.model.weights], ema=[e.numpy() for e in state.ema],
                optimizer=[v.numpy() for v in state.optimizer.variables])


class _Logs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append({k: float(v) for k, v in logs.items()})


@pytest.mark.smoke
def test_fit_makes_the_same_updates_as_the_training_loop_on_two_replicas(tmp_path):
    hp = hparams.load('tiny', warmup_iters=3)
    strategy, batch, nan_step = _mirrored(), 8, 2
    keras.utils.set_random_seed(0)
    loop_state = steps.create_state(hp, strategy)
    loop = steps.make_train_loop(loop_state, hp, strategy)
    it = iter(strategy.experimental_distribute_dataset(_train_data(6, batch, nan_step)))
    for n in (2, 4):                      # train.py's calls end where a log line is due
        loop(it, tf.constant(n))

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = vdvae.VDVAE(hp)
        model.compile(steps_per_execution=2)
    logs = _Logs()
    history = model.fit(_train_data(6, batch, nan_step), epochs=1, verbose=0,
                        callbacks=[logs, keras.callbacks.TensorBoard(str(tmp_path / 'tb'))])
    fit_state = model.train_state

    assert int(fit_state.step.numpy()) == int(loop_state.step.numpy()) == 6
    assert int(fit_state.skipped.numpy()) == int(loop_state.skipped.numpy()) == 1
    assert int(fit_state.optimizer.iterations.numpy()) == 5           # the NaN step was not applied
    ours, theirs = _state_arrays(fit_state), _state_arrays(loop_state)
    for kind in ours:
        assert len(ours[kind]) == len(theirs[kind]) > 0
        for a, b in zip(ours[kind], theirs[kind]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=kind)
    for v in model.weights:               # both replicas skipped: their copies are the same
        copies = strategy.experimental_local_results(v.value)
        np.testing.assert_array_equal(copies[0].numpy(), copies[1].numpy())

    # Logs: one per execution of 2 steps, with the names Keras users read; the NaN step is
    # counted as skipped and left out of the means.
    assert len(logs.batches) == 3
    assert set(history.history) == {'loss', 'distortion', 'rate', 'grad_norm', 'skipped'}
    assert [b['skipped'] for b in logs.batches] == [0., 1., 1.]     # steps 0-1, 2-3 (the NaN), 4-5
    final = {k: v[-1] for k, v in history.history.items()}
    assert np.isfinite([final['loss'], final['distortion'], final['rate'], final['grad_norm']]).all()
    assert final['loss'] == pytest.approx(final['distortion'] + final['rate'], rel=1e-5)
    assert os.listdir(tmp_path / 'tb' / 'train')                     # TensorBoard wrote its events


def _eval_data(n, batch):
    """(x_in, target, mask) batches of `batch`, the last one padded with mask-0 images."""
    x_in, target = _images(n, seed=5)
    pad = -n % batch
    mask = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
    x_in, target = (np.concatenate([a, np.zeros((pad,) + a.shape[1:], np.float32)]) for a in (x_in, target))
    return tf.data.Dataset.from_tensor_slices((x_in, target, mask)).batch(batch)


@pytest.mark.parametrize('replicas', [1, 2])
def test_evaluate_gives_the_elbo_test_eval_reports(replicas):
    """model.evaluate's loss is --test_eval's ELBO (steps.evaluate over make_eval_step) on the
    same images and batches: the same posterior noise per batch, padding left out."""
    hp = hparams.load('tiny')
    strategy = _mirrored() if replicas == 2 else tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = vdvae.VDVAE(hp)
        model.compile()
    data = _eval_data(10, 4)
    expected = steps.evaluate(steps.make_eval_step(model, hp, strategy),
                              strategy.experimental_distribute_dataset(data))
    assert expected['images'] == 10
    for _ in range(2):                    # a second evaluate starts from batch 0 again
        got = model.evaluate(data, verbose=0, return_dict=True)
        for k in ('elbo', 'distortion', 'rate'):
            assert got['loss' if k == 'elbo' else k] == pytest.approx(expected[k], rel=1e-5), k


def test_fit_on_one_device_learns_and_keeps_a_custom_optimizer():
    hp = hparams.load('tiny')
    keras.utils.set_random_seed(0)
    model = vdvae.VDVAE(hp)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x_in, target = _images(8, seed=2)
    data = tf.data.Dataset.from_tensors((x_in, target)).repeat(8)
    before = model.evaluate(data.take(1), verbose=0, return_dict=True)['loss']
    history = model.fit(data, epochs=1, verbose=0)
    assert isinstance(model.train_state.optimizer, keras.optimizers.Adam)
    assert model.train_state.optimizer.iterations.numpy() == 8
    assert history.history['skipped'] == [0.]
    assert model.evaluate(data.take(1), verbose=0, return_dict=True)['loss'] < before


def test_compile_refuses_a_loss_or_metrics():
    model = vdvae.VDVAE(hparams.load('tiny'))
    with pytest.raises(ValueError, match='negative ELBO'):
        model.compile(loss='mse')
