"""Train a VDVAE the paper's way, on one CPU, several GPUs, a TPU or several machines.

    python train.py --hparams=imagenet32 [--strategy=auto] [--logdir=runs/imagenet32]

The run, top to bottom: build (data, run folder, training state, checkpoint), restore, the
loop, and what is due after each call (checkpoints, preview grids, evaluation), stopping
cleanly on a signal or a storm of bad steps. The update rule is update.py's, the compiled
steps steps.py's, the devices devices.py's, the logs runlog.py's.
"""
import dataclasses
import math
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags, logging
import keras
import tensorflow as tf

import checkpoints
import console
import data
import devices
import errors
import figures
import files
import hparams
import model as vdvae
import runlog
import sampling
import steps
import update

FLAGS = flags.FLAGS


def define_flags():
    """The command line; defined only when train.py is the program, so other scripts and
    tests can import this module."""
    hparams.define_flags(default='demo')
    flags.DEFINE_string('logdir', None, 'run folder: checkpoints, log.jsonl, TensorBoard, samples '
                        '(default runs/<preset>); restarting the same command resumes from it')
    flags.DEFINE_enum('strategy', 'auto', ['auto', 'default', 'mirrored', 'tpu', 'multiworker'],
                      'auto: TPU if reachable, else all GPUs, else one device')
    flags.DEFINE_string('tpu', 'local', 'TPU name or address (local: this TPU VM, as on Colab)')
    flags.DEFINE_string('data_dir', None, 'tfds data_dir (may be gs://), or the FFHQ folder / .npy')
    flags.DEFINE_enum('precision', 'float32', ['float32', 'mixed_bfloat16', 'mixed_float16'],
                      'compute precision; variables, likelihood and KL stay float32; float16 uses a '
                      'dynamic loss scale (overflowing steps are skipped and halve it)')
    flags.DEFINE_enum('conv_precision', 'highest', ['highest', 'default'],
                      'float32 convolutions on TPUs and recent GPUs. highest: full float32 (the '
                      'paper\'s V100s; the JAX port of VDVAE needed it to reach CIFAR-10\'s 2.87 '
                      'bits/dim, its ELBO moved by ~1% otherwise); default: the hardware\'s fast mode '
                      '(TPU: bfloat16 passes, Ampere+ GPU: TF32). No effect on CPUs or in bfloat16')
    flags.DEFINE_boolean('jit_compile', False, 'compile each train and eval step as one XLA program '
                         '(a TPU always does; on GPUs it may be faster; README: Colab and TPU)')
    flags.DEFINE_boolean('remat', False, 'rematerialise: each block keeps only its inputs for the backward '
                         'pass and computes the rest again there (less activation memory for more compute; '
                         'the same updates; docs/performance.md: Memory)')
    flags.DEFINE_integer('log_every', 10, 'steps between log lines')
    flags.DEFINE_integer('steps_per_call', 0, 'updates per host call (a TPU idles while the host '
                         'dispatches each call); a call also ends where a log line, checkpoint, sample '
                         'grid or evaluation is due. 0: --log_every on a TPU, else 1')
    flags.DEFINE_integer('save_every', 1000, 'steps between checkpoints')
    flags.DEFINE_integer('keep_checkpoints', 3, 'checkpoints kept')
    flags.DEFINE_integer('eval_every', 5000, 'steps between validation passes (EMA weights; 0: never)')
    flags.DEFINE_integer('samples_every', 1000, 'steps between sample grids (0: never)')
    flags.DEFINE_integer('max_skips_in_a_row', 50, 'stop when this many updates in a row are skipped')
    flags.DEFINE_boolean('test_eval', False, 'no training: evaluate --ckpt (or the logdir\'s latest '
                         'checkpoint) on the test split')
    flags.DEFINE_string('ckpt', None, 'checkpoint for --test_eval: a run folder or a ckpt-N prefix')
    flags.DEFINE_integer('iw_samples', 0, 'with --test_eval: also the importance-weighted bound on '
                         'log p(x) from this many posterior draws per image (0: ELBO only)')
    flags.DEFINE_integer('n_images', 0, 'with --test_eval: only the first N test images (0: all)')


# --help's headings: the hyperparameters' (hparams.FIELD_GROUPS), with this script's flags.
HELP_GROUPS = dict(hparams.FIELD_GROUPS)
HELP_GROUPS['preset and data'] = HELP_GROUPS['preset and data'] + ['data_dir']
HELP_GROUPS['training loop'] = HELP_GROUPS['training loop'] + [
    'logdir', 'log_every', 'steps_per_call', 'save_every', 'keep_checkpoints', 'samples_every',
    'max_skips_in_a_row']
HELP_GROUPS['devices, precision and memory'] = ['strategy', 'tpu', 'precision', 'conv_precision',
                                                'jit_compile', 'remat']
HELP_GROUPS['evaluation'] = ['eval_every', 'test_eval', 'ckpt', 'iw_samples', 'n_images']


# ---------------------------------------------------------------------------------------
# The preview grids' images.


def preview_images(hp, data_dir=None):
    """(x_in, target) of the preview grids: eight validation images spread over the split
    (splits may be sorted, e.g. by label)."""
    n_valid = data.split_size(hp.dataset, 'valid', hp.image_size, data_dir)
    images = data.load_split(hp.dataset, 'valid', hp.image_size, data_dir)
    return data.preprocess(next(iter(images.shard(max(n_valid // 8, 1), 0).batch(8))), hp)


# ---------------------------------------------------------------------------------------
# --test_eval: a checkpoint's bits/dim on the test split.


def test_eval(strategy):
    model, hp, _, _, step = checkpoints.load(FLAGS.ckpt or FLAGS.logdir or f'runs/{FLAGS.hparams}', strategy)
    # The checkpoint knows its own hyperparameters: --hparams may only confirm them, and of the
    # field flags only the batch size (memory) means anything here.
    if FLAGS['hparams'].present:
        checkpoints.check_preset(hp, FLAGS.hparams)
    overrides = [f.name for f in dataclasses.fields(hparams.HParams)
                 if FLAGS[f.name].value is not None and f.name != 'batch_size']
    if overrides:
        console.fail(f'--test_eval takes the hyperparameters from the checkpoint; drop --{overrides[0]}')
    hp = hp.replace(batch_size=FLAGS.batch_size or hp.batch_size)
    total = data.split_size(hp.dataset, 'test', hp.image_size, FLAGS.data_dir)
    n = min(FLAGS.n_images, total) if FLAGS.n_images else total
    result = steps.evaluate(steps.make_eval_step(model, hp, strategy, FLAGS.jit_compile),
                            data.eval_dataset(hp, 'test', strategy, FLAGS.data_dir, n), n, 'test')
    excluded = f', {result["nonfinite"]} non-finite excluded' if result['nonfinite'] else ''
    print(f'test {hp.dataset}: {result["elbo"]:.4f} nats/dim = {result["bits_per_dim"]:.4f} '
          f'bits/dim over {result["images"]} images (EMA weights, step {step}'
          f'{excluded})')
    if FLAGS.iw_samples:
        iw = steps.evaluate(steps.make_iw_eval_step(model, hp, strategy, FLAGS.iw_samples, FLAGS.jit_compile),
                            data.eval_dataset(hp, 'test', strategy, FLAGS.data_dir, n), n, f'IW K={FLAGS.iw_samples}')
        excluded = f', {iw["nonfinite"]} non-finite excluded' if iw['nonfinite'] else ''
        print(f'test {hp.dataset}: importance-weighted bound, K={FLAGS.iw_samples}: {iw["elbo"]:.4f} nats/dim = '
              f'{iw["bits_per_dim"]:.4f} bits/dim over {iw["images"]} images (ELBO - bound = '
              f'{result["bits_per_dim"] - iw["bits_per_dim"]:.4f} bits/dim{excluded})')
        result['iw'] = iw
    return result


def main(argv):
    try:
        run(argv)
    except errors.DataError as e:          # missing or malformed data: one line, no traceback
        console.fail(e)


def check_flags():
    """The flags of this script that hparams does not check: each bad value is one line."""
    console.at_least(log_every=1, save_every=1, keep_checkpoints=1, eval_every=0, samples_every=0,
                     max_skips_in_a_row=0)
    if FLAGS.ckpt and not FLAGS.test_eval:
        console.fail('--ckpt names the checkpoint for --test_eval; training resumes from --logdir')
    if FLAGS.iw_samples < 0 or (FLAGS.iw_samples and not FLAGS.test_eval):
        console.fail(f'--iw_samples={FLAGS.iw_samples}: give a positive number of draws, with --test_eval')
    if FLAGS.steps_per_call < 0:
        console.fail(f'--steps_per_call={FLAGS.steps_per_call}: give a positive number, or 0 for the default')
    if FLAGS.n_images < 0 or (FLAGS.n_images and not FLAGS.test_eval):
        console.fail(f'--n_images={FLAGS.n_images}: give a positive number of test images, with --test_eval')


def run(_):
    tf.get_logger().setLevel('ERROR')    # TF's checkpoint and retracing chatter; ours is printed
    logging.set_verbosity(logging.WARNING)     # the checkpoint saver's INFO lines, through absl
    hp = console.exit_on_error(hparams.from_flags)
    check_flags()
    if FLAGS.precision != 'float32':
        keras.config.set_dtype_policy(FLAGS.precision)
    devices.set_conv_precision(FLAGS.conv_precision)
    try:
        strategy = devices.make_strategy(FLAGS.strategy, FLAGS.tpu)
    except RuntimeError as e:
        console.fail(e)
    if not isinstance(strategy, tf.distribute.TPUStrategy) and (warning := devices.gpu_warning()):
        print(warning, file=sys.stderr)
    if FLAGS.test_eval:
        test_eval(strategy)
        return
    training = build(hp, strategy, FLAGS.logdir or os.path.join('runs', FLAGS.hparams))
    restore(training)
    train_loop(training)


@dataclasses.dataclass
class Training:
    """A run under way: what build() makes and restore() fills in, for the loop."""
    hp: hparams.HParams
    strategy: tf.distribute.Strategy
    logdir: str
    chief: bool                 # writes logs, grids and the kept checkpoints
    state: update.TrainState
    ckpt: tf.train.Checkpoint
    ckpt_dir: str
    manager: tf.train.CheckpointManager
    train_iter: object
    saved_iter: bool            # the input position is in the checkpoint
    ema_model: object           # the EMA weights, for grids and evaluation (or None)
    eval_step: object
    log: object = None          # these three: made as the loop starts
    preview: tuple = ()
    preemption: object = None
    saved: tuple = ()           # (step, path) of the last save

    def kept(self):
        return f'; the last complete checkpoint ({self.manager.latest_checkpoint or "none yet"}) is as it was'

    def save(self, step):
        """The checkpoint of `step` (once: a stop at the step just saved writes no second copy)."""
        if self.saved and self.saved[0] == step:
            return self.saved[1]
        try:
            with files.writing(self.ckpt_dir, f'checkpoint {step}', self.kept()):
                path = checkpoints.save(self.manager, self.state, step)
        except errors.CheckpointError as e:
            console.fail(e)
        self.saved = (step, path)
        return path

    def stopping(self):
        """A signal came: an evaluation under way is abandoned (except under multi-worker
        training, where all workers must finish it together)."""
        multiworker = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        return self.preemption.requested is not None and not multiworker


def build(hp, strategy, logdir):
    """The data, the run folder, the model and its training state, the EMA model, the
    checkpoint and its manager, the log: everything before the first step."""
    keras.utils.set_random_seed(hp.seed)      # the same initial weights (and input order) in every run
    # The data first: a wrong path or an unprepared dataset ends here, before the model is built
    # and before the run folder is made.
    train_data = data.train_dataset(hp, strategy, FLAGS.data_dir)
    chief = devices.is_chief(strategy)
    if chief:
        checkpoints.check_run_folder(logdir, hp)
    replicas = strategy.num_replicas_in_sync
    print(f'{FLAGS.hparams}: {hp.batch_size} images per replica x {replicas} replicas = '
          f'{hp.batch_size * replicas} per step, logdir {logdir}')
    print(f'strategy: {devices.describe(strategy)}')
    state = steps.create_state(hp, strategy, loss_scale=2. ** 15 if FLAGS.precision == 'mixed_float16' else 1.,
                               remat=FLAGS.remat)
    ema_model = eval_step = None        # the EMA weights, for the grids and evaluation
    if FLAGS.eval_every or FLAGS.samples_every:
        with strategy.scope():
            ema_model = vdvae.VDVAE(hp)
    if FLAGS.eval_every:
        eval_step = steps.make_eval_step(ema_model, hp, strategy, FLAGS.jit_compile)
    # The input iterator (position and shuffle state) is saved with the model where the
    # strategy allows it; elsewhere (multi-worker) the input restarts at the saved step.
    train_iter = iter(train_data)
    saved_iter = isinstance(train_iter, tf.__internal__.tracking.Trackable)
    ckpt = state.checkpoint(data=train_iter) if saved_iter else state.checkpoint()
    # Every worker saves (collectives need all of them); others keep one copy in .worker-N.
    ckpt_dir = os.path.join(logdir, 'ckpt' if chief else f'.worker-{strategy.cluster_resolver.task_id}')
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, FLAGS.keep_checkpoints if chief else 1)
    training = Training(hp, strategy, logdir, chief, state, ckpt, ckpt_dir, manager, train_iter, saved_iter,
                        ema_model, eval_step)
    return training


def restore(training):
    """The newest checkpoint that reads back whole and finite, if any; damaged newer ones are
    moved aside (by the chief) with a warning line."""
    t = training
    try:
        with files.writing(os.path.join(t.logdir, 'ckpt', 'corrupt'), 'a damaged checkpoint aside'):
            latest = checkpoints.newest_good(os.path.join(t.logdir, 'ckpt'), move=t.chief)
    except errors.CheckpointError as e:
        console.fail(f'{e}; nothing was moved: mend or move these files, or use another --logdir')
    if latest:
        try:
            t.ckpt.restore(latest)       # an imported official checkpoint has no optimizer or input state
        except checkpoints.READ_ERRORS as e:
            console.fail(f'{latest}: cannot be restored into this run ({errors.first_line(e)[:300]})')
        print(f'resumed from {latest} at step {int(t.state.step.numpy())}')
        if not t.saved_iter:
            t.train_iter = iter(data.train_dataset(t.hp, t.strategy, FLAGS.data_dir,
                                                   start_step=int(t.state.step.numpy())))
    print(f'{vdvae.count_params(t.state.model):,} parameters, {t.state.model.num_layers} stochastic layers')


def train_loop(t):
    """Calls of several updates, each ending where a log line, checkpoint, grid or evaluation
    is due (after_call), until hp.steps or a signal."""
    hp, strategy = t.hp, t.strategy
    train_steps = steps.make_train_loop(t.state, hp, strategy, FLAGS.jit_compile)
    per_call = FLAGS.steps_per_call or (FLAGS.log_every if isinstance(strategy, tf.distribute.TPUStrategy) else 1)
    events = [e for e in (FLAGS.log_every, FLAGS.save_every, FLAGS.samples_every, FLAGS.eval_every) if e > 0]
    t.log = runlog.Log(t.logdir, t.kept, hp.skip_threshold) if t.chief else None
    t.preview = preview_images(hp, FLAGS.data_dir)
    # SIGTERM / SIGINT: the call under way ends, then a checkpoint and the end.
    t.preemption = checkpoints.Preemption()
    step, t0, t_log = int(t.state.step.numpy()), time.time(), time.time()
    start = logged = step
    interval = {}               # sums since the last log line (interval_add)
    while step < hp.steps:
        if devices.stop_requested(strategy, t.preemption):
            path = t.save(step)
            who = t.preemption.requested or 'a signal to another worker'
            print(f'{console.fresh_line()}{who}: stopped at step {step} with a checkpoint ({path}); '
                  'the same command resumes')
            return
        n = min([per_call, hp.steps - step] + [e - step % e for e in events])
        with data.clear_errors():
            runlog.interval_add(interval, train_steps(t.train_iter, tf.constant(n)))
        step += n
        if step % FLAGS.log_every == 0 or step == hp.steps:
            values = runlog.interval_means(interval, step - logged)
            values.update(bits_per_dim=values['elbo'] / math.log(2), lr=float(t.state.optimizer.learning_rate),
                          skipped_total=int(t.state.skipped.numpy()),
                          images_per_s=(step - logged) * hp.batch_size * strategy.num_replicas_in_sync / (time.time() - t_log))
            if t.log:
                t.log.write(step, 'train', values)
            t_log, logged, interval = time.time(), step, {}
            console.progress(f'step {step} elbo {values["elbo"]:.4f} ({values["bits_per_dim"]:.3f} bpd) '
                             f'|g| {values["grad_norm"]:.1f} max {values["grad_norm_max"]:.1f} '
                             f'skipped {values["skipped"]} ({values["skipped_total"]} in all)',
                             step - start, hp.steps - start, t0)
        after_call(t, step)
    print(f'done: {step} steps, checkpoints in {os.path.join(t.logdir, "ckpt")}')


def after_call(t, step):
    """What is due at `step`: the stall check, a checkpoint, a preview grid, an evaluation, the
    curves."""
    hp = t.hp
    if int(t.state.skips_in_a_row.numpy()) > FLAGS.max_skips_in_a_row:
        path = t.save(step)       # skipped updates changed nothing: this is the last good state
        console.fail(f'{int(t.state.skips_in_a_row.numpy())} updates in a row were skipped (gradient '
                     f'norm >= skip_threshold={hp.skip_threshold} or non-finite loss): training '
                     f'has stalled; the last good state is saved ({path}). To resume, run the same '
                     'command with a higher --skip_threshold or a lower --lr')
    if _due(FLAGS.save_every, step, hp.steps):
        t.save(step)
    if t.chief and _due(FLAGS.samples_every, step, hp.steps):
        steps.copy_ema(t.state, t.ema_model)
        grid = sampling.sample_grid(t.ema_model, *t.preview, seed=step, title=f'step {step}, EMA weights')
        path = os.path.join(t.logdir, 'samples', f'step-{step:08d}.png')
        with files.writing(path, 'the sample grid', t.kept()):
            figures.save_png(grid, path)
        t.log.write_image(step, 'preview (EMA weights)', grid)
    if _due(FLAGS.eval_every, step, hp.steps):
        steps.copy_ema(t.state, t.ema_model)
        result = steps.evaluate(t.eval_step, data.eval_dataset(hp, 'valid', t.strategy, FLAGS.data_dir),
                                stop=t.stopping)
        if result is None:
            return               # preempted: the top of the loop saves and stops
        if t.log:
            t.log.write(step, 'valid', result)
        print(f'{console.fresh_line()}valid at step {step}: {result["elbo"]:.4f} nats/dim, '
              f'{result["bits_per_dim"]:.4f} bits/dim ({result["images"]} images, '
              f'{result["nonfinite"]} non-finite)')
    if t.log and (_due(FLAGS.samples_every, step, hp.steps) or _due(FLAGS.eval_every, step, hp.steps)
                  or step == hp.steps):
        t.log.write_curve()


def _due(every, step, last):
    """Whether a task done every `every` steps (0: never) is due at `step`; all are at the last."""
    return bool(every) and (step % every == 0 or step == last)


if __name__ == '__main__':
    define_flags()
    console.run(main)
