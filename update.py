"""The paper's update rule and the steps each replica runs, shared by train.py's loop
(steps.py compiles them) and by Keras' fit/evaluate (VDVAE.train_step/test_step).

The update rule (paper section 4, official release): AdamW with linear warm-up; the global
gradient norm from the all-reduced gradients; clip to `grad_clip`; skip the whole update
(weights, Adam moments and Adam's step counter) when that norm is >= `skip_threshold` (unless
it is -1) or the loss is not finite on any replica; an EMA of the weights updated only on
applied steps.

Nothing here imports the model: model.py imports this file for its train_step.
"""
import dataclasses

import keras
import tensorflow as tf

import fastgraph


# ---------------------------------------------------------------------------------------
# Training state: the model, the optimizer, the EMA of the weights and the counters.
# Everything a checkpoint must hold to resume exactly.


def checkpoint_key(variable):
    """A weight's name in this project's checkpoints (stable across Keras versions' paths)."""
    return variable.path.replace('/', '.')


@dataclasses.dataclass
class TrainState:
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    ema: list                       # tf.Variables, one per model weight
    step: tf.Variable               # every step, applied or skipped (drives the warm-up)
    skipped: tf.Variable            # skipped updates so far
    skips_in_a_row: tf.Variable
    loss_scale: tf.Variable         # float16 training only; 1 otherwise
    applied_in_a_row: tf.Variable   # when the loss scale last grew

    def checkpoint(self, **extra):
        return tf.train.Checkpoint(
            weights={checkpoint_key(v): v.value for v in self.model.weights},
            ema={checkpoint_key(v): e for v, e in zip(self.model.weights, self.ema)},
            optimizer={checkpoint_key(v): v.value for v in self.optimizer.variables},
            step=self.step, skipped=self.skipped, skips_in_a_row=self.skips_in_a_row,
            loss_scale=self.loss_scale, applied_in_a_row=self.applied_in_a_row, **extra)


class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with the official code's epsilon (apex's FusedAdam, as torch.optim.AdamW):
    added to the bias-corrected root sqrt(v / (1 - beta2^t)). Keras adds it to the uncorrected
    sqrt(v), an epsilon 1/sqrt(1 - beta2^t) times larger, which moves weights with tiny
    gradients visibly away from the official ones within a few steps (tests/test_update.py).
    Weight decay is Keras' own, decoupled, as the official code's.

    The update is TensorFlow's fused Adam kernel, one pass over the weights and both moments
    instead of Keras' separate ops. It adds epsilon to the uncorrected sqrt(v) as Keras does;
    scaled by sqrt(1 - beta2^t), epsilon lands where the official code has it."""

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


def new_state(model, optimizer=None, loss_scale=1.):
    """The training state of a built model, made in the current strategy's scope. optimizer:
    None for the paper's (AdamW with the official epsilon, warmed up over every step), or any
    Keras optimizer. loss_scale > 1: float16 training with a dynamic loss scale starting there."""
    hp, step = model.hp, _counter('step')
    if optimizer is None:
        optimizer = AdamW(WarmUp(hp.lr, hp.warmup_iters, step), beta_1=hp.adam_beta1,
                          beta_2=hp.adam_beta2, epsilon=hp.adam_eps, weight_decay=hp.weight_decay)
    optimizer.build(model.trainable_variables)      # now, or the first step traces twice
    ema = [tf.Variable(v.value, trainable=False, name=f'ema_{checkpoint_key(v)}',
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
           for v in model.weights]
    scale = tf.Variable(float(loss_scale), trainable=False, name='loss_scale',
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return TrainState(model, optimizer, ema, step, _counter('skipped'), _counter('skips_in_a_row'),
                      scale, _counter('applied_in_a_row'))


# ---------------------------------------------------------------------------------------
# One update.


def update_rule(state, hp, strategy):
    """The update from gradients, as each replica runs it: (grads, loss_is_finite) ->
    (grad_norm, skip), where grads are the all-reduced global mean (the same on every
    replica). The global norm; skip if it or the loss is not finite, or the norm is >=
    skip_threshold (unless -1); clip to grad_clip; AdamW at the warmed-up learning rate; the
    EMA. A skipped update changes nothing but the step and skip counters (and a float16 loss
    scale: adjust_loss_scale)."""
    model, variables = state.model, state.model.trainable_variables
    n_replicas = strategy.num_replicas_in_sync
    dynamic_scale = float(state.loss_scale.numpy()) != 1.

    def replica_apply(grads):
        # Keras all-reduces (sums) gradients again inside apply(); ours are already the
        # global mean on every replica, so hand it 1/n of them.
        state.optimizer.apply([g / n_replicas for g in grads], variables)
        for v, e in zip(model.weights, state.ema):
            e.assign(hp.ema_rate * e + (1. - hp.ema_rate) * v.value)

    def apply_or_skip(strategy, grads, skip):
        # Cross-replica context: every replica computed the same `skip` from the same
        # all-reduced gradients, so one tf.cond decides for all of them. (A tf.cond around
        # optimizer.apply in replica context fails under MirroredStrategy.)
        skip = strategy.experimental_local_results(skip)[0]

        def apply():
            strategy.extended.call_for_each_replica(replica_apply, args=(grads,))
            state.skips_in_a_row.assign(0)
            return tf.constant(0, tf.int64)

        def count_skip():
            state.skipped.assign_add(1)
            state.skips_in_a_row.assign_add(1)
            return tf.constant(1, tf.int64)

        tf.cond(skip, count_skip, apply)
        if dynamic_scale:
            adjust_loss_scale(state, skip)
        state.step.assign_add(1)

    def clip_and_apply(grads, loss_is_finite):
        grad_norm = tf.linalg.global_norm(grads)
        skip = tf.logical_not(tf.math.is_finite(grad_norm) & loss_is_finite)
        if hp.skip_threshold != -1:       # -1: never on the norm (the official convention)
            skip = skip | (grad_norm >= hp.skip_threshold)
        clip = tf.minimum(1., hp.grad_clip / (grad_norm + 1e-6))
        grads = [g * clip for g in grads]
        tf.distribute.get_replica_context().merge_call(apply_or_skip, args=(grads, skip))
        return grad_norm, skip

    return clip_and_apply


def adjust_loss_scale(state, skipped):
    """float16's dynamic loss scale: a skipped step (an overflow, or any other skip) halves it,
    down to 1; 2,000 applied steps in a row double it."""
    applied = tf.where(skipped, tf.constant(0, tf.int64), state.applied_in_a_row + 1)
    grow = applied >= 2000
    state.loss_scale.assign(tf.where(skipped, tf.maximum(state.loss_scale / 2., 1.),
                                     tf.where(grow, state.loss_scale * 2., state.loss_scale)))
    state.applied_in_a_row.assign(tf.where(grow, tf.constant(0, tf.int64), applied))


def compiled(fn, strategy, jit_compile):
    """fn as one XLA program (what a TPU makes of everything strategy.run runs; there it is
    compiled anyway, so it is left as it is)."""
    if not jit_compile or isinstance(strategy, tf.distribute.TPUStrategy):
        return fn
    return tf.function(fn, jit_compile=True, autograph=False)


def replica_train_step(state, hp, strategy):
    """One update as each replica runs it: (x_in, target) -> global-batch means of elbo,
    distortion and rate, with grad_norm and skipped (1. or 0.)."""
    model, variables = state.model, state.model.trainable_variables
    n_replicas = strategy.num_replicas_in_sync
    dynamic_scale = float(state.loss_scale.numpy()) != 1.
    apply_rule = update_rule(state, hp, strategy)

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
        grad_norm, skip = apply_rule(grads, tf.math.is_finite(means['elbo']))
        return dict(means, grad_norm=grad_norm, skipped=tf.cast(skip, tf.float32))

    return replica_step


# ---------------------------------------------------------------------------------------
# Evaluation, as each replica runs it: sums over a batch's real, finite images.


def finite_sums(per_image, mask):
    """Global sums of (B,) per-image values over the real, finite images, and the counts of
    images and of non-finite ones (reported, never silently dropped); padding has mask 0."""
    finite = tf.math.is_finite(per_image['elbo'])
    ok = tf.where(finite, mask, 0.)
    sums = {k: tf.reduce_sum(tf.where(finite, v, 0.) * ok) for k, v in per_image.items()}
    sums.update(images=tf.reduce_sum(ok), nonfinite=tf.reduce_sum(tf.where(finite, 0., mask)))
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, sums)


def eval_noise(hp, batch, x_in):
    """The posterior noise of evaluation batch `batch`: its own seed (training's seeds are
    [seed, step >= 0]), and this replica's rows of the global batch, so that one device and
    several replicas draw the same noise for the same global batches."""
    ctx = tf.distribute.get_replica_context()
    n = tf.shape(x_in)[0]
    seed = tf.stack([tf.constant(hp.seed, tf.int32), -1 - tf.cast(batch, tf.int32)])
    return seed, (ctx.replica_id_in_sync_group * n, n * ctx.num_replicas_in_sync)


def replica_eval_step(model, hp):
    """(x_in, target, mask, batch) -> global sums of elbo, distortion and rate over the real,
    finite images, and the counts (finite_sums)."""
    def replica_elbo(x_in, target, mask, batch):
        seed, rows = eval_noise(hp, batch, x_in)
        return finite_sums(model.losses_per_image(x_in, target, seed=seed, noise_rows=rows), mask)
    return replica_elbo


# ---------------------------------------------------------------------------------------
# The same steps as Keras' train_step and test_step: VDVAE inherits these.


class KerasSteps:
    """model.compile(), then model.fit(dataset) runs the update rule above and
    model.evaluate(dataset) the evaluation sums, each through the replica function train.py's
    loop compiles. Batches are (x_in, target) for fit and (x_in, target[, mask]) for evaluate,
    as data.train_dataset and data.eval_dataset make them. The logs: loss (the negative ELBO
    in nats/dim), distortion, rate, and in training grad_norm and skipped; loss, distortion,
    rate and grad_norm are means over the finite steps (of the epoch so far), skipped a count."""

    def compile(self, optimizer=None, loss_scale=1., steps_per_execution=1, jit_compile=False, **kwargs):
        """optimizer: None for the paper's (AdamW with the official epsilon, warm-up over
        every step), or a Keras optimizer; clipping, skipping and the EMA stay the paper's.
        loss_scale > 1: float16 training with a dynamic loss scale starting there."""
        if refused := sorted(set(kwargs) & {'loss', 'loss_weights', 'metrics', 'weighted_metrics'}):
            raise ValueError(f'compile({"=..., ".join(refused)}=...): a VDVAE trains on its own loss, '
                             'the negative ELBO, and logs its parts; give optimizer, loss_scale, '
                             'steps_per_execution or jit_compile')
        strategy = self.distribute_strategy
        with strategy.scope():
            if isinstance(optimizer, str):
                optimizer = keras.optimizers.get(optimizer)
            self.train_state = new_state(self, optimizer, loss_scale)
            self._logs = {name: keras.metrics.Mean(name=name) for name in ('loss', 'distortion', 'rate', 'grad_norm')}
            self._logs['skipped'] = keras.metrics.Sum(name='skipped')
            self._eval_batch = _counter('eval_batch')
        # jit_compile: each step's replica function is one XLA program, as in train.py.
        super().compile(optimizer=self.train_state.optimizer, steps_per_execution=steps_per_execution,
                        jit_compile=False, auto_scale_loss=False, **kwargs)
        self._replica_train = compiled(replica_train_step(self.train_state, self.hp, strategy), strategy, jit_compile)
        self._replica_eval = compiled(replica_eval_step(self, self.hp), strategy, jit_compile)

    @property
    def metrics(self):
        return list(getattr(self, '_logs', {}).values())

    def reset_metrics(self):
        super().reset_metrics()
        if hasattr(self, '_eval_batch'):
            self._eval_batch.assign(0)      # evaluate's batch b draws the noise steps.evaluate's does

    def train_step(self, data):
        out = self._replica_train(data[0], data[1])
        finite = tf.math.is_finite(out['elbo']) & tf.math.is_finite(out['grad_norm'])
        self._add_logs(out, finite, dict(loss='elbo', distortion='distortion', rate='rate', grad_norm='grad_norm'))
        self._logs['skipped'].update_state(out['skipped'] * _first_replica())
        return {name: m.result() for name, m in self._logs.items()}

    def test_step(self, data):
        mask = data[2] if len(data) > 2 else tf.ones([tf.shape(data[0])[0]])
        sums = self._replica_eval(data[0], data[1], mask, self._eval_batch.value())
        self._eval_batch.assign_add(1)
        images = tf.maximum(sums['images'], 1.)
        means = {k: sums[k] / images for k in ('elbo', 'distortion', 'rate')}
        self._add_logs(means, sums['images'], dict(loss='elbo', distortion='distortion', rate='rate'))
        return {name: self._logs[name].result() for name in ('loss', 'distortion', 'rate')}

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = self._steps_per_execution(self.train_step, tuple(self._logs))
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = self._steps_per_execution(self.test_step, ('loss', 'distortion', 'rate'))
        return self.test_function

    def _steps_per_execution(self, step, names):
        """iterator -> the logs after up to steps_per_execution steps, in one tf.function.
        Keras runs each step inside a tf.cond on the data's end, where MirroredStrategy's
        cross-replica calls fail (keras-team/keras#19246, any model with steps_per_execution
        > 1); here the while loop's condition checks the end, and no step sits in a tf.cond."""
        strategy, n = self.distribute_strategy, self.steps_per_execution

        @tf.function(autograph=False)
        def steps_on(iterator):
            def body(i, _, data):
                out = strategy.run(step, args=(data.get_value(),))
                out = {k: strategy.experimental_local_results(out[k])[0] for k in names}
                # The next batch only if this execution takes it (the next one would lose it).
                data = tf.cond(i + 1 < n, iterator.get_next_as_optional, lambda: data)
                return i + 1, out, data

            logs = {k: tf.zeros([]) for k in names}
            return tf.while_loop(lambda i, _, data: (i < n) & data.has_value(), body,
                                 (tf.constant(0), logs, iterator.get_next_as_optional()))[:2]

        def function(iterator):
            done, logs = steps_on(iterator)
            if int(done) == 0:
                raise StopIteration
            return {k: float(v) for k, v in logs.items()}     # numbers: Keras 3.10 hands evaluate tensors
        return function

    def _add_logs(self, values, weight, names):
        # Keras sums a metric over the replicas, and each replica holds the same global values:
        # only the first one adds them.
        weight = tf.cast(weight, tf.float32) * _first_replica()
        for name, key in names.items():
            self._logs[name].update_state(tf.where(weight > 0, values[key], 0.), sample_weight=weight)


def _first_replica():
    return tf.cast(tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0), tf.float32)
