"""train.py's compiled steps: the train step, the train loop of several updates per call,
and the evaluation steps, as tf.functions for any tf.distribute strategy (one CPU, GPUs, a
TPU, several machines), around the replica functions of update.py (the update rule, which
Keras' fit runs too); evaluation over a dataset. bench.py times these same steps.
"""
import math
import time

import tensorflow as tf

import console
import data
import model as vdvae
import update


def create_state(hp, strategy, loss_scale=1., remat=False, layout='stacked'):
    """A new model and its training state (update.new_state) in the strategy's scope: the
    paper's optimizer, the EMA, the counters. loss_scale > 1: float16 training with a dynamic
    loss scale starting there. remat: the model recomputes each block's activations in the
    backward pass; layout: VDVAE's."""
    with strategy.scope():
        model = vdvae.VDVAE(hp, remat=remat, layout=layout)
        model.compile(loss_scale=loss_scale)
    return model.train_state


def make_train_step(state, hp, strategy, jit_compile=False):
    """A tf.function (x_in, target) -> dict of global-batch means of one update."""
    replica_step = update.compiled(update.replica_train_step(state, hp, strategy), strategy, jit_compile)

    @tf.function(autograph=False)
    def train_step(x_in, target):
        out = strategy.run(replica_step, args=(x_in, target))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    return train_step


def make_train_loop(state, hp, strategy, jit_compile=False):
    """A tf.function (iterator, n) -> n updates in one call, so that a TPU does not wait for
    the host between steps. Returns the mean of each value over the call's steps whose loss
    and gradient norm are finite, the largest finite gradient norm (grad_norm_max), the
    number of skipped updates (skipped) and of finite steps (finite). jit_compile: each
    update is one XLA program, as on a TPU; the loop and the input stay on the host."""
    replica_step = update.compiled(update.replica_train_step(state, hp, strategy), strategy, jit_compile)
    keys = ('elbo', 'distortion', 'rate', 'grad_norm')

    @tf.function(autograph=False)
    def train_steps(iterator, n):
        def body(i, sums, finite, top, skipped):
            out = strategy.run(replica_step, args=next(iterator))
            out = {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}
            ok = tf.math.is_finite(out['elbo']) & tf.math.is_finite(out['grad_norm'])
            sums = {k: sums[k] + tf.where(ok, out[k], 0.) for k in keys}
            top = tf.where(ok, tf.maximum(top, out['grad_norm']), top)
            return i + 1, sums, finite + tf.cast(ok, tf.float32), top, skipped + out['skipped']

        zero = tf.zeros([])
        _, sums, finite, top, skipped = tf.while_loop(
            lambda i, *_: i < n, body, (tf.constant(0), {k: zero for k in keys}, zero, zero, zero))
        means = {k: tf.where(finite > 0, v / tf.maximum(finite, 1.), float('nan')) for k, v in sums.items()}
        return dict(means, grad_norm_max=top, skipped=skipped, finite=finite)

    train_steps.replica_step = replica_step      # what a TPU compiles (the tests read its HLO)
    return train_steps


# ---------------------------------------------------------------------------------------
# Evaluation steps: sums over a batch's real, finite images, for train.evaluate to add up.


def _eval_function(strategy, replica_fn, jit_compile=False):
    """(x_in, target, mask, batch=0) -> global sums; `batch` numbers the evaluation's batches
    (a fresh draw of posterior noise for each)."""
    replica_fn = update.compiled(replica_fn, strategy, jit_compile)

    @tf.function(autograph=False)
    def traced(x_in, target, mask, batch):
        out = strategy.run(replica_fn, args=(x_in, target, mask, batch))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    def step(x_in, target, mask, batch=0):
        return traced(x_in, target, mask, tf.constant(batch, tf.int32))
    step.replica_step = replica_fn
    return step


def make_eval_step(model, hp, strategy, jit_compile=False):
    """(x_in, target, mask, batch=0) -> global sums of elbo, distortion and rate, and image counts."""
    return _eval_function(strategy, update.replica_eval_step(model, hp), jit_compile)


def make_iw_eval_step(model, hp, strategy, samples, jit_compile=False):
    """(x_in, target, mask, batch=0) -> the sums make_eval_step gives, with `elbo` replaced by
    the importance-weighted bound -log mean_k p(x, z_k) / q(z_k | x) in nats/dim. A while loop
    over the draws, a few per pass (the batch tiled), keeps memory at a few batches."""
    per_pass = max(d for d in range(1, 5) if samples % d == 0)
    dims = float(hp.image_size ** 2 * hp.image_channels)

    def replica_iw(x_in, target, mask, batch):
        n = tf.shape(x_in)[0]
        x_rep, t_rep = tf.tile(x_in, [per_pass, 1, 1, 1]), tf.tile(target, [per_pass, 1, 1, 1])
        seed, (offset, total) = update.eval_noise(hp, batch, x_in)
        seeds = vdvae._split_seed(seed, samples // per_pass)        # one per pass

        def draw(i, log_sum):
            log_w = model.log_weights(x_rep, t_rep, seed=seeds[i], noise_rows=(offset, total, per_pass))
            both = tf.concat([log_sum[None], tf.reshape(log_w, [per_pass, n])], 0)
            return i + 1, tf.reduce_logsumexp(both, axis=0)      # stable running log-sum-exp

        _, log_sum = tf.while_loop(lambda i, _: i < samples // per_pass, draw,
                                   (tf.constant(0), tf.fill([n], -float('inf'))))
        return update.finite_sums(dict(elbo=-(log_sum - math.log(samples)) / dims), mask)

    return _eval_function(strategy, replica_iw, jit_compile)


# ---------------------------------------------------------------------------------------
# Evaluation over a dataset with the eval steps above, and the EMA weights copied into a model.


def evaluate(eval_step, dataset, total=None, label='eval', stop=None):
    """Average per-image nats/dim over one pass of `dataset`; bits/dim alongside. None if
    stop() turns true before the pass ends (a preempted run abandons its evaluation)."""
    sums, t0 = {}, time.time()
    with data.clear_errors():
        for i, batch in enumerate(dataset):
            if stop and stop():
                return None
            for k, v in eval_step(*batch, batch=i).items():
                sums[k] = sums.get(k, 0.) + float(v)
            if total:
                console.progress(label, sums['images'] + sums['nonfinite'], total, t0, every=30.)
    n = max(sums.get('images', 0.), 1.)
    out = {k: sums.get(k, 0.) / n for k in ('elbo', 'distortion', 'rate') if k in sums}
    out.update(bits_per_dim=out['elbo'] / math.log(2), images=int(sums.get('images', 0)),
               nonfinite=int(sums.get('nonfinite', 0)))
    return out


def copy_ema(state, eval_model):
    for e, v in zip(state.ema, eval_model.weights):
        v.assign(e)
