"""The importance-weighted bound: log p(x) >= log mean_k p(x, z_k) / q(z_k | x), z_k ~ q."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import data
import hparams
import model as vdvae
import steps


@pytest.fixture(scope='module')
def trained():
    """A tiny model after 60 steps on the offline digits: its posteriors are no longer its
    priors, so the draws' weights differ and more draws must tighten the bound."""
    hp = hparams.load('tiny', batch_size=16, warmup_iters=10)
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    state = steps.create_state(hp, strategy)
    step, batches = steps.make_train_step(state, hp, strategy), iter(data.train_dataset(hp, strategy))
    for _ in range(60):
        out = step(*next(batches))
    assert out['skipped'] == 0
    x_in, target = data.preprocess(data.read_images(None, hp, 128), hp)
    return state.model, hp, x_in, target


def test_one_draw_equals_the_elbo_in_expectation(trained):
    m, hp, x_in, target = trained
    x_in, target = x_in[:16], target[:16]
    dims = hp.image_size ** 2 * 3
    both = tf.function(lambda s: (m.log_weights(x_in, target, seed=s),
                                  m.losses_per_image(x_in, target, seed=s)['elbo']), autograph=False)
    # Same draw, two estimates of the same expectation: the full log-densities and the
    # analytic KL. Their difference averages to zero; it is not zero draw by draw.
    diff = np.stack([log_w.numpy() / dims + elbo.numpy()
                     for log_w, elbo in (both(tf.constant([s, 0])) for s in range(48))])
    assert np.abs(diff).max() > 1e-4
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(diff.size)
    # The eval step with K = 1 is exactly one draw's -log weight, averaged.
    step = steps.make_iw_eval_step(m, hp, tf.distribute.get_strategy(), 1)
    out = step(x_in, target, tf.ones(16))
    seed = vdvae._split_seed(tf.constant([hp.seed, -1]), 1)[0]        # batch 0's one pass
    expected = -m.log_weights(x_in, target, seed=seed, noise_rows=(0, 16, 1)).numpy() / dims
    assert float(out['elbo']) / 16 == pytest.approx(expected.mean(), rel=1e-6)
    assert float(out['images']) == 16 and float(out['nonfinite']) == 0


def test_more_draws_tighten_the_bound(trained):
    m, hp, x_in, target = trained
    strategy = tf.distribute.get_strategy()
    bound = {}
    for k in (1, 4, 16):
        step = steps.make_iw_eval_step(m, hp, strategy, k)
        # Two batches of 64 images: independent draws for 128 images.
        bound[k] = np.mean([float(step(x_in[i:i + 64], target[i:i + 64], tf.ones(64))['elbo']) / 64
                            for i in (0, 64)])
    # nats/dim of -log p(x): lower is tighter.
    assert bound[1] > bound[4] > bound[16], bound
    elbo = float(tf.reduce_mean(m.losses_per_image(x_in, target, seed=[0, 0])['elbo']))
    assert bound[16] < elbo


def test_padding_and_broken_images_are_left_out(trained):
    m, hp, x_in, target = trained
    x = x_in[:4].numpy()
    x[1] = np.nan
    mask = tf.constant([1., 1., 1., 0.])
    out = steps.make_iw_eval_step(m, hp, tf.distribute.get_strategy(), 2)(x, target[:4], mask)
    assert float(out['images']) == 2 and float(out['nonfinite']) == 1 and np.isfinite(float(out['elbo']))


def test_the_bound_under_two_replicas_equals_one_devices(trained):
    m, hp, x_in, target = trained
    # Not collective all-reduce: TF caches a collective's shape by instance key for the whole
    # process, and the mirrored train steps of test_train.py would then meet this step's.
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    dataset = tf.data.Dataset.from_tensor_slices((x_in[:8], target[:8], tf.ones(8))).batch(8)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    one_device = steps.make_iw_eval_step(m, hp, tf.distribute.get_strategy(), 8)
    two = steps.make_iw_eval_step(m, hp, strategy, 8)
    for b in (0, 1):
        out = two(*batch, batch=b)
        one = one_device(x_in[:8], target[:8], tf.ones(8), batch=b)
        assert float(out['images']) == 8 and float(out['nonfinite']) == 0
        # Each image gets the noise it gets on one device (its row of the global batch, in
        # each of the 4 copies a pass tiles, over 2 passes): the same bound to rounding.
        assert float(out['elbo']) == pytest.approx(float(one['elbo']), rel=1e-5)
    # A fresh draw per batch: the same images as batch 0 and as batch 1 differ.
    assert float(one_device(x_in[:8], target[:8], tf.ones(8), batch=0)['elbo']) != float(one['elbo'])
