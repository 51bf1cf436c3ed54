"""train.py's steps: the training state a checkpoint holds, the update rule, and the train and
evaluation steps as tf.functions for any tf.distribute strategy (one CPU, GPUs, a TPU, several
machines). bench.py times these same steps.

The update rule (paper section 4, official release): AdamW with linear warm-up; the global
gradient norm from the all-reduced gradients; clip to `grad_clip`; skip the whole update
(weights, Adam moments and Adam's step counter) when that norm is >= `skip_threshold` (unless
it is -1) or the loss is not finite on any replica; an EMA of the weights updated only on
applied steps.
"""
import dataclasses
import math
import time

import keras
import tensorflow as tf

import data
import fastgraph
import hparams
import model as vdvae


# ---------------------------------------------------------------------------------------
# Training state: the model, AdamW, the EMA of the weights and the counters. Everything a
# checkpoint must hold to resume exactly.


@dataclasses.dataclass
class TrainState:
    model: vdvae.VDVAE
    optimizer: keras.optimizers.Optimizer
    ema: list                       # tf.Variables, one per model weight
    step: tf.Variable               # every step, applied or skipped (drives the warm-up)
    skipped: tf.Variable            # skipped updates so far
    skips_in_a_row: tf.Variable
    loss_scale: tf.Variable         # float16 training only; 1 otherwise
    applied_in_a_row: tf.Variable   # when the loss scale last grew

    def checkpoint(self, **extra):
        return tf.train.Checkpoint(
            weights={vdvae.checkpoint_key(v): v.value for v in self.model.weights},
            ema={vdvae.checkpoint_key(v): e for v, e in zip(self.model.weights, self.ema)},
            optimizer={vdvae.checkpoint_key(v): v.value for v in self.optimizer.variables},
            step=self.step, skipped=self.skipped, skips_in_a_row=self.skips_in_a_row,
            loss_scale=self.loss_scale, applied_in_a_row=self.applied_in_a_row, **extra)


class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with the official code's epsilon (apex's FusedAdam, as torch.optim.AdamW):
    added to the bias-corrected root sqrt(v / (1 - beta2^t)). Keras adds it to the uncorrected
    sqrt(v), an epsilon 1/sqrt(1 - beta2^t) times larger (3.2x at the first step with the
    paper's beta2 = 0.9), which moved weights with tiny gradients 0.58 of a step away from the
    official ones within 20 steps (tests/test_update.py). Weight decay is Keras' own,
    decoupled, as the official code's.

    The update is TensorFlow's fused Adam kernel: one pass over the weights, gradient and both
    moments where Keras' ops made ~10 (the update took ~7% of a train step's CPU time). It adds
    epsilon to the uncorrected sqrt(v) as Keras does; scaled by sqrt(1 - beta2^t), epsilon lands
    where the official code has it."""

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        t = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        beta_2_power = tf.pow(beta_2, t)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(m), v=_handle(v), beta1_power=tf.pow(beta_1, t),
            beta2_power=beta_2_power, lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=self.epsilon * tf.sqrt(1. - beta_2_power), grad=tf.cast(gradient, dtype))


def _handle(variable):
    """The resource handle of a Keras or TF variable (under a strategy: this device's copy)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """lr * min(1, step / warmup_iters), counting every step, skipped ones included (the
    official schedule), not Adam's step counter, which stops on skipped steps."""

    def __init__(self, lr, warmup_iters, step):
        self.lr, self.warmup_iters, self.step = lr, warmup_iters, step

    def __call__(self, _):
        progress = tf.cast(self.step, tf.float32) / max(self.warmup_iters, 1)
        return self.lr * tf.minimum(1., progress)


def _counter(name):
    return tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def create_state(hp, strategy, loss_scale=1., remat=False, layout='stacked'):
    """loss_scale > 1: float16 training with a dynamic loss scale starting there. remat: the
    model recomputes each block's activations in the backward pass (VDVAE)."""
    with strategy.scope():
        model = vdvae.VDVAE(hp, remat=remat, layout=layout)
        step = _counter('step')
        optimizer = AdamW(
            WarmUp(hp.lr, hp.warmup_iters, step), beta_1=hp.adam_beta1, beta_2=hp.adam_beta2,
            epsilon=hp.adam_eps, weight_decay=hp.weight_decay)
        optimizer.build(model.trainable_variables)      # now, or the first step traces twice
        ema = [tf.Variable(v.value, trainable=False, name=f'ema_{vdvae.checkpoint_key(v)}',
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
               for v in model.weights]
        scale = tf.Variable(float(loss_scale), trainable=False, name='loss_scale',
                            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        return TrainState(model, optimizer, ema, step, _counter('skipped'), _counter('skips_in_a_row'),
                          scale, _counter('applied_in_a_row'))


# ---------------------------------------------------------------------------------------
# One update.


def _compiled(fn, strategy, jit_compile):
    """fn as one XLA program (what a TPU makes of everything strategy.run runs; there it is
    compiled anyway, so it is left as it is)."""
    if not jit_compile or isinstance(strategy, tf.distribute.TPUStrategy):
        return fn
    return tf.function(fn, jit_compile=True, autograph=False)


def update_rule(state, hp, strategy):
    """The update from gradients, as each replica runs it: (grads, loss_is_finite) ->
    (grad_norm, skip), where grads are the all-reduced global mean (the same on every
    replica). The global norm; skip if it or the loss is not finite, or the norm is >=
    skip_threshold (unless -1); clip to grad_clip; AdamW at the warmed-up learning rate; the
    EMA. A skipped update changes nothing but the step and skip counters."""
    model, variables = state.model, state.model.trainable_variables
    n_replicas = strategy.num_replicas_in_sync
    dynamic_scale = float(state.loss_scale.numpy()) != 1.

    def replica_apply(grads):
        # Keras all-reduces (sums) gradients again inside apply(); ours are already the
        # global mean on every replica, so hand it 1/n of them.
        state.optimizer.apply([g / n_replicas for g in grads], variables)
        for v, e in zip(model.weights, state.ema):
            e.assign(hp.ema_rate * e + (1. - hp.ema_rate) * v.value)

    def apply_update(strategy, grads, skip):
        # Cross-replica context: every replica computed the same `skip` from the same
        # all-reduced gradients, so one tf.cond decides for all of them. (A tf.cond around
        # optimizer.apply in replica context fails under MirroredStrategy.)
        skip = strategy.experimental_local_results(skip)[0]

        def update():
            strategy.extended.call_for_each_replica(replica_apply, args=(grads,))
            state.skips_in_a_row.assign(0)
            if dynamic_scale:     # float16: try a larger scale after 2,000 clean steps
                state.applied_in_a_row.assign_add(1)
                grow = state.applied_in_a_row >= 2000
                state.loss_scale.assign(tf.where(grow, state.loss_scale * 2., state.loss_scale))
                state.applied_in_a_row.assign(tf.where(grow, tf.constant(0, tf.int64), state.applied_in_a_row))
            return tf.constant(0, tf.int64)

        def skip_update():
            state.skipped.assign_add(1)
            state.skips_in_a_row.assign_add(1)
            if dynamic_scale:     # an overflow in float16 halves the scale
                state.applied_in_a_row.assign(0)
                state.loss_scale.assign(tf.maximum(state.loss_scale / 2., 1.))
            return tf.constant(1, tf.int64)

        tf.cond(skip, skip_update, update)
        state.step.assign_add(1)

    def update(grads, loss_is_finite):
        grad_norm = tf.linalg.global_norm(grads)
        skip = tf.logical_not(tf.math.is_finite(grad_norm) & loss_is_finite)
        if hp.skip_threshold != -1:       # -1: never on the norm (the official convention)
            skip = skip | (grad_norm >= hp.skip_threshold)
        clip = tf.minimum(1., hp.grad_clip / (grad_norm + 1e-6))
        grads = [g * clip for g in grads]
        tf.distribute.get_replica_context().merge_call(apply_update, args=(grads, skip))
        return grad_norm, skip

    return update


def _replica_step(state, hp, strategy):
    """The update of one step, as each replica runs it: (x_in, target) -> its global means."""
    model, variables = state.model, state.model.trainable_variables
    n_replicas = strategy.num_replicas_in_sync
    dynamic_scale = float(state.loss_scale.numpy()) != 1.
    update = update_rule(state, hp, strategy)

    def replica_step(x_in, target):
        ctx = tf.distribute.get_replica_context()
        # Posterior noise from (seed, step, image index in the global batch): a resumed run
        # repeats it, and any number of replicas draws what one device would.
        seed = tf.stack([tf.constant(hp.seed, tf.int32), tf.cast(state.step, tf.int32)])
        local_batch = tf.shape(x_in)[0]
        rows = (ctx.replica_id_in_sync_group * local_batch, local_batch * n_replicas)
        global_batch = tf.cast(local_batch * n_replicas, tf.float32)
        scale = tf.identity(state.loss_scale)
        with tf.GradientTape() as tape, fastgraph.keeping_slopes():
            stats = model.losses_per_image(x_in, target, seed=seed, noise_rows=rows)
            loss = tf.reduce_sum(stats['elbo']) / global_batch
            scaled_loss = loss * scale if dynamic_scale else loss
        grads = tape.gradient(scaled_loss, variables)
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if dynamic_scale:
            grads = [g / scale for g in grads]
        sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, {k: tf.reduce_sum(v) for k, v in stats.items()})
        means = {k: v / global_batch for k, v in sums.items()}
        grad_norm, skip = update(grads, tf.math.is_finite(means['elbo']))
        return dict(means, grad_norm=grad_norm, skipped=tf.cast(skip, tf.float32))

    return replica_step


def make_train_step(state, hp, strategy, jit_compile=False):
    """A tf.function (x_in, target) -> dict of global-batch means of one update."""
    replica_step = _compiled(_replica_step(state, hp, strategy), strategy, jit_compile)

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
    replica_step = _compiled(_replica_step(state, hp, strategy), strategy, jit_compile)
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


def _finite_sums(per_image, mask):
    """Global sums of (B,) per-image values over the real, finite images, and the counts of
    images and of non-finite ones (reported, never silently dropped); padding has mask 0."""
    finite = tf.math.is_finite(per_image['elbo'])
    ok = tf.where(finite, mask, 0.)
    sums = {k: tf.reduce_sum(tf.where(finite, v, 0.) * ok) for k, v in per_image.items()}
    sums.update(images=tf.reduce_sum(ok), nonfinite=tf.reduce_sum(tf.where(finite, 0., mask)))
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, sums)


def _eval_function(strategy, replica_fn, jit_compile=False):
    """(x_in, target, mask, batch=0) -> global sums; `batch` numbers the evaluation's batches
    (a fresh draw of posterior noise for each)."""
    replica_fn = _compiled(replica_fn, strategy, jit_compile)

    @tf.function(autograph=False)
    def traced(x_in, target, mask, batch):
        out = strategy.run(replica_fn, args=(x_in, target, mask, batch))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    def step(x_in, target, mask, batch=0):
        return traced(x_in, target, mask, tf.constant(batch, tf.int32))
    step.replica_step = replica_fn
    return step


def _eval_noise(hp, batch, x_in):
    """The posterior noise of evaluation batch `batch`: its own seed (training's seeds are
    [seed, step >= 0]), and this replica's rows of the global batch, so that one device and
    several replicas draw the same noise for the same global batches."""
    ctx = tf.distribute.get_replica_context()
    n = tf.shape(x_in)[0]
    seed = tf.stack([tf.constant(hp.seed, tf.int32), -1 - batch])
    return seed, (ctx.replica_id_in_sync_group * n, n * ctx.num_replicas_in_sync)


def make_eval_step(model, hp, strategy, jit_compile=False):
    """(x_in, target, mask, batch=0) -> global sums of elbo, distortion and rate, and image counts."""
    def replica_elbo(x_in, target, mask, batch):
        seed, rows = _eval_noise(hp, batch, x_in)
        return _finite_sums(model.losses_per_image(x_in, target, seed=seed, noise_rows=rows), mask)
    return _eval_function(strategy, replica_elbo, jit_compile)


def make_iw_eval_step(model, hp, strategy, samples, jit_compile=False):
    """(x_in, target, mask, batch=0) -> the sums make_eval_step gives, with `elbo` replaced by
    the importance-weighted bound -log mean_k p(x, z_k) / q(z_k | x) in nats/dim. A while loop
    over the draws, a few per pass (the batch tiled), keeps memory at a few batches."""
    per_pass = max(d for d in range(1, 5) if samples % d == 0)
    dims = float(hp.image_size ** 2 * hp.image_channels)

    def replica_iw(x_in, target, mask, batch):
        n = tf.shape(x_in)[0]
        x_rep, t_rep = tf.tile(x_in, [per_pass, 1, 1, 1]), tf.tile(target, [per_pass, 1, 1, 1])
        seed, (offset, total) = _eval_noise(hp, batch, x_in)
        seeds = vdvae._split_seed(seed, samples // per_pass)        # one per pass

        def draw(i, log_sum):
            log_w = model.log_weights(x_rep, t_rep, seed=seeds[i], noise_rows=(offset, total, per_pass))
            both = tf.concat([log_sum[None], tf.reshape(log_w, [per_pass, n])], 0)
            return i + 1, tf.reduce_logsumexp(both, axis=0)      # stable running log-sum-exp

        _, log_sum = tf.while_loop(lambda i, _: i < samples // per_pass, draw,
                                   (tf.constant(0), tf.fill([n], -float('inf'))))
        return _finite_sums(dict(elbo=-(log_sum - math.log(samples)) / dims), mask)

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
                hparams.progress(label, sums['images'] + sums['nonfinite'], total, t0, every=30.)
    n = max(sums.get('images', 0.), 1.)
    out = {k: sums.get(k, 0.) / n for k in ('elbo', 'distortion', 'rate') if k in sums}
    out.update(bits_per_dim=out['elbo'] / math.log(2), images=int(sums.get('images', 0)),
               nonfinite=int(sums.get('nonfinite', 0)))
    return out


def copy_ema(state, eval_model):
    for e, v in zip(state.ema, eval_model.weights):
        v.assign(e)
