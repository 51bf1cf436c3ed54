"""Train a VDVAE the paper's way, on one CPU, several GPUs, a TPU or several machines.

    python train.py --hparams=imagenet32 [--strategy=auto] [--logdir=runs/imagenet32]

The update rule (paper section 4, official release): AdamW with linear warm-up; the global
gradient norm from the all-reduced gradients; clip to `grad_clip`; skip the whole update
(weights, Adam moments and Adam's step counter) when that norm is >= `skip_threshold` or the
loss is not finite on any replica; an EMA of the weights updated only on applied steps.
"""
import dataclasses
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras
import tensorflow as tf

import model as vdvae

# ---------------------------------------------------------------------------------------
# Distribution strategy.


def make_strategy(name='auto', tpu=''):
    """auto: a TPU if one is reachable, else all GPUs (Mirrored), else the default strategy."""
    if name in ('tpu', 'auto'):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, tf.errors.NotFoundError, tf.errors.UnavailableError) as e:
            if name == 'tpu':
                raise RuntimeError(f'no TPU reachable ({e}); use --strategy=auto or default') from None
    if name == 'multiworker':
        if 'TF_CONFIG' not in os.environ:
            raise RuntimeError('--strategy=multiworker needs TF_CONFIG (cluster and task) in the environment')
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == 'mirrored' or (name == 'auto' and len(tf.config.list_logical_devices('GPU')) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


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

    def checkpoint(self, **extra):
        return tf.train.Checkpoint(
            weights={_key(v): v.value for v in self.model.weights},
            ema={_key(v): e for v, e in zip(self.model.weights, self.ema)},
            optimizer={_key(v): v.value for v in self.optimizer.variables},
            step=self.step, skipped=self.skipped, skips_in_a_row=self.skips_in_a_row, **extra)


def _key(variable):
    return variable.path.replace('/', '.')


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


def create_state(hp, strategy):
    with strategy.scope():
        model = vdvae.VDVAE(hp)
        step = _counter('step')
        optimizer = keras.optimizers.AdamW(
            WarmUp(hp.lr, hp.warmup_iters, step), beta_1=hp.adam_beta1, beta_2=hp.adam_beta2,
            epsilon=hp.adam_eps, weight_decay=hp.weight_decay)
        optimizer.build(model.trainable_variables)      # now, or the first step traces twice
        ema = [tf.Variable(v.value, trainable=False, name=f'ema_{_key(v)}',
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
               for v in model.weights]
        return TrainState(model, optimizer, ema, step, _counter('skipped'), _counter('skips_in_a_row'))


# ---------------------------------------------------------------------------------------
# One update.


def make_train_step(state, hp, strategy):
    """A tf.function (x_in, target) -> dict of global-batch means, run under `strategy`."""
    model, variables = state.model, state.model.trainable_variables
    n_replicas = strategy.num_replicas_in_sync

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
            return tf.constant(0, tf.int64)

        def skip_update():
            state.skipped.assign_add(1)
            state.skips_in_a_row.assign_add(1)
            return tf.constant(1, tf.int64)

        tf.cond(skip, skip_update, update)
        state.step.assign_add(1)

    def replica_step(x_in, target):
        ctx = tf.distribute.get_replica_context()
        # Posterior noise from (seed, step, image index in the global batch): a resumed run
        # repeats it, and any number of replicas draws what one device would.
        seed = tf.stack([tf.constant(hp.seed, tf.int32), tf.cast(state.step, tf.int32)])
        local_batch = tf.shape(x_in)[0]
        rows = (ctx.replica_id_in_sync_group * local_batch, local_batch * n_replicas)
        global_batch = tf.cast(local_batch * n_replicas, tf.float32)
        with tf.GradientTape() as tape:
            stats = model.losses_per_image(x_in, target, seed=seed, noise_rows=rows)
            loss = tf.reduce_sum(stats['elbo']) / global_batch
        grads = tape.gradient(loss, variables)
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, {k: tf.reduce_sum(v) for k, v in stats.items()})
        means = {k: v / global_batch for k, v in sums.items()}
        grad_norm = tf.linalg.global_norm(grads)
        skip = tf.logical_or(tf.logical_not(tf.math.is_finite(grad_norm) & tf.math.is_finite(means['elbo'])),
                             grad_norm >= hp.skip_threshold)
        clip = tf.minimum(1., hp.grad_clip / (grad_norm + 1e-6))
        grads = [g * clip for g in grads]
        ctx.merge_call(apply_update, args=(grads, skip))
        return dict(means, grad_norm=grad_norm, skipped=tf.cast(skip, tf.float32))

    @tf.function(autograph=False)
    def train_step(x_in, target):
        out = strategy.run(replica_step, args=(x_in, target))
        return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

    return train_step
