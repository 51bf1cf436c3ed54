"""Train a VDVAE the paper's way, on one CPU, several GPUs, a TPU or several machines.

    python train.py --hparams=imagenet32 [--strategy=auto] [--logdir=runs/imagenet32]

The loop: data, the run folder and its checkpoints, evaluation, logs, preview grids, and
stopping cleanly on a signal or a storm of bad steps. The update rule and the compiled steps
it calls are steps.py's.
"""
import dataclasses
import json
import math
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags, logging
import keras
import tensorflow as tf

import checkpoints
import data
import figures
import hparams
import model as vdvae
import sampling
import steps

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
                         'the same updates; README: Performance)')
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
# Distribution strategy.


def make_strategy(name='auto', tpu='local'):
    """auto: the TPU if this machine has one, else all GPUs (Mirrored), else the default
    strategy. A TPU that fails to start (no chips reachable, a TensorFlow wheel without TPU
    kernels, ...) is one line on stderr, then the fallback; --strategy=tpu makes it an error."""
    if name == 'tpu' or (name == 'auto' and hparams.tpu_present()):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except Exception as e:  # noqa: BLE001 -- ValueError, NotFoundError, InvalidArgumentError...
            why = f'the TPU ({tpu or "TPU_NAME"}) did not start: {type(e).__name__}: {data._first_line(e)}'
            if name == 'tpu':
                raise RuntimeError(f'{why}. A TPU VM needs the tensorflow-tpu wheel (with its libtpu) '
                                   'instead of tensorflow; or use --strategy=auto') from None
            print(f'strategy: {why}; falling back to GPUs or the CPU', file=sys.stderr)
    if name == 'multiworker':
        if 'TF_CONFIG' not in os.environ:
            raise RuntimeError('--strategy=multiworker needs TF_CONFIG (cluster and task) in the environment')
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == 'mirrored' or (name == 'auto' and len(tf.config.list_logical_devices('GPU')) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def describe(strategy):
    """What the run trains on, for its start line: the strategy and its devices."""
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return f'TPUStrategy, {replicas} replicas (TPU cores)'
    if isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        devices = [d.split('device:')[-1] for d in strategy.extended.worker_devices]
        workers = ''
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            spec = strategy.cluster_resolver.cluster_spec().as_dict()
            tasks = sum(len(spec.get(kind, ())) for kind in ('chief', 'worker')) or 1
            workers = f' on {tasks} machines; this one has'
        return f'{strategy.__class__.__name__}, {replicas} replica{"s" * (replicas > 1)}{workers} ({", ".join(devices)})'
    gpus = tf.config.list_logical_devices('GPU')
    if gpus:
        return f'one GPU device ({gpus[0].name.split("device:")[-1]})'
    return 'one CPU device (no GPU visible to TensorFlow)'


def gpu_warning():
    """A machine with an NVIDIA driver where TensorFlow sees no GPU: on Linux that is nearly
    always TensorFlow without its CUDA libraries, and the run would train on the CPU unasked."""
    driver = hparams.nvidia_driver()
    if not driver or tf.config.list_physical_devices('GPU'):
        return None
    return (f'warning: this machine has an NVIDIA driver ({driver}) but TensorFlow sees no GPU, so it '
            'trains on the CPU. TensorFlow finds GPUs through its CUDA libraries, installed with '
            'pip install -r requirements-gpu.txt (tensorflow[and-cuda]); or check CUDA_VISIBLE_DEVICES')


def set_conv_precision(precision):
    """'highest': float32 convolutions in full float32 wherever the hardware would round them
    (XLA then marks every convolution operand_precision=highest); 'default': the fast mode."""
    tf.config.experimental.enable_tensor_float_32_execution(precision == 'default')


# ---------------------------------------------------------------------------------------
# The preview grids' images.


def preview_images(hp, data_dir=None):
    """(x_in, target) of the preview grids: eight validation images spread over the split
    (splits may be sorted, e.g. by label)."""
    n_valid = data.split_size(hp.dataset, 'valid', hp.image_size, data_dir)
    images = data.load_split(hp.dataset, 'valid', hp.image_size, data_dir)
    return data.preprocess(next(iter(images.shard(max(n_valid // 8, 1), 0).batch(8))), hp)


# ---------------------------------------------------------------------------------------
# What people look at: log.jsonl, TensorBoard, figures (progress lines: hparams.py; grids:
# sampling.py; drawing: figures.py).


def interval_add(interval, out):
    """Adds one call of the training loop to the sums of a logging interval (a dict, empty at
    its start): the official code logs per interval the means over its finite steps, the
    largest gradient norm and the skips, not the last step's values."""
    finite = float(out['finite'])
    for k in ('elbo', 'distortion', 'rate', 'grad_norm'):
        interval[k] = interval.get(k, 0.) + (float(out[k]) * finite if finite else 0.)
    interval['finite'] = interval.get('finite', 0.) + finite
    interval['grad_norm_max'] = max(interval.get('grad_norm_max', 0.), float(out['grad_norm_max']))
    interval['skipped'] = interval.get('skipped', 0.) + float(out['skipped'])
    return interval


def interval_means(interval, steps):
    """What a log line reports of an interval of `steps` updates: elbo, distortion, rate and
    grad_norm averaged over its finite steps (NaN if none was), grad_norm_max, the skipped
    updates and the non-finite steps in it."""
    finite = interval['finite']
    out = {k: interval[k] / finite if finite else float('nan') for k in ('elbo', 'distortion', 'rate', 'grad_norm')}
    return dict(out, grad_norm_max=interval['grad_norm_max'], skipped=int(interval['skipped']),
                nonfinite=int(steps - finite))


class Log:
    """One JSON object per line in log.jsonl, the same scalars in TensorBoard (and the preview
    grids as images), curve.png and grad_norm.png. A write that fails stops the run in one
    line; `kept()` says which checkpoint is left."""

    def __init__(self, logdir, kept, skip_threshold):
        self.path, self.kept, self.skip_threshold = os.path.join(logdir, 'log.jsonl'), kept, skip_threshold
        self.tb_dir = os.path.join(logdir, 'tb')
        with checkpoints.writing(self.tb_dir, 'TensorBoard events', kept()):
            self.file = tf.io.gfile.GFile(self.path, 'a')
            self.tb = tf.summary.create_file_writer(self.tb_dir)

    def write_curve(self):
        """<logdir>/curve.png (bits/dim of training and validation so far) and grad_norm.png
        (figure 6: the largest gradient norm per log interval and the skip threshold)."""
        with tf.io.gfile.GFile(self.path) as f:
            lines = f.readlines()
        folder = os.path.dirname(self.path)
        for name, what, picture in (('curve.png', 'the training curve', figures.training_curve(lines)),
                                    ('grad_norm.png', 'the gradient norm figure',
                                     figures.grad_norm_figure(lines, self.skip_threshold))):
            with checkpoints.writing(os.path.join(folder, name), what, self.kept()):
                figures.save_png(picture, os.path.join(folder, name))

    def write_image(self, step, name, image):
        with checkpoints.writing(self.tb_dir, 'TensorBoard events', self.kept()):
            with self.tb.as_default(step=int(step)):
                tf.summary.image(name, image[None])
            self.tb.flush()

    def write(self, step, kind, values):
        with checkpoints.writing(self.path, 'the log', self.kept()):
            self.file.write(json.dumps(dict(step=int(step), kind=kind, **values)) + '\n')
            self.file.flush()
        # The event writer reports a full disk only when flushed, so flush at every write.
        with checkpoints.writing(self.tb_dir, 'TensorBoard events', self.kept()):
            with self.tb.as_default(step=int(step)):
                for k, v in values.items():
                    tf.summary.scalar(f'{kind}/{k}', v)
            self.tb.flush()


# ---------------------------------------------------------------------------------------


def test_eval(strategy):
    model, hp, _, _, step = checkpoints.load(FLAGS.ckpt or FLAGS.logdir or f'runs/{FLAGS.hparams}', strategy)
    # The checkpoint knows its own hyperparameters: --hparams may only confirm them, and of the
    # field flags only the batch size (memory) means anything here.
    if FLAGS['hparams'].present:
        checkpoints.check_preset(hp, FLAGS.hparams)
    overrides = [f.name for f in dataclasses.fields(hparams.HParams)
                 if FLAGS[f.name].value is not None and f.name != 'batch_size']
    if overrides:
        hparams.fail(f'--test_eval takes the hyperparameters from the checkpoint; drop --{overrides[0]}')
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


def stop_requested(strategy, preemption):
    """Whether to save and stop now. Under multi-worker training a signal to any worker stops
    them all at the same step (one all-reduce per call)."""
    local = preemption.requested is not None
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return local
    flag = strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.constant(float(local))))
    return float(strategy.experimental_local_results(flag)[0]) > 0


def is_chief(strategy):
    """The worker that writes logs, samples and the kept checkpoints (task 0 / 'chief')."""
    resolver = getattr(strategy, 'cluster_resolver', None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    return resolver.task_type == 'chief' or (
        resolver.task_type == 'worker' and resolver.task_id == 0
        and 'chief' not in resolver.cluster_spec().as_dict())


def main(argv):
    try:
        run(argv)
    except data.DataError as e:          # missing or malformed data: one line, no traceback
        hparams.fail(e)


def check_flags():
    """The flags of this script that hparams does not check: each bad value is one line."""
    hparams.at_least(log_every=1, save_every=1, keep_checkpoints=1, eval_every=0, samples_every=0,
                     max_skips_in_a_row=0)
    if FLAGS.ckpt and not FLAGS.test_eval:
        hparams.fail('--ckpt names the checkpoint for --test_eval; training resumes from --logdir')
    if FLAGS.iw_samples < 0 or (FLAGS.iw_samples and not FLAGS.test_eval):
        hparams.fail(f'--iw_samples={FLAGS.iw_samples}: give a positive number of draws, with --test_eval')
    if FLAGS.steps_per_call < 0:
        hparams.fail(f'--steps_per_call={FLAGS.steps_per_call}: give a positive number, or 0 for the default')
    if FLAGS.n_images < 0 or (FLAGS.n_images and not FLAGS.test_eval):
        hparams.fail(f'--n_images={FLAGS.n_images}: give a positive number of test images, with --test_eval')


def run(_):
    tf.get_logger().setLevel('ERROR')    # TF's checkpoint and retracing chatter; ours is printed
    logging.set_verbosity(logging.WARNING)     # the checkpoint saver's INFO lines, through absl
    hp = hparams.exit_on_error(hparams.from_flags)
    check_flags()
    if FLAGS.precision != 'float32':
        keras.config.set_dtype_policy(FLAGS.precision)
    set_conv_precision(FLAGS.conv_precision)
    try:
        strategy = make_strategy(FLAGS.strategy, FLAGS.tpu)
    except RuntimeError as e:
        hparams.fail(e)
    if not isinstance(strategy, tf.distribute.TPUStrategy) and (warning := gpu_warning()):
        print(warning, file=sys.stderr)
    if FLAGS.test_eval:
        test_eval(strategy)
        return
    logdir = FLAGS.logdir or os.path.join('runs', FLAGS.hparams)
    keras.utils.set_random_seed(hp.seed)      # the same initial weights (and input order) in every run
    # The data first: a wrong path or an unprepared dataset ends here, before the model is built
    # and before the run folder is made.
    train_data = data.train_dataset(hp, strategy, FLAGS.data_dir)
    chief = is_chief(strategy)
    if chief:
        checkpoints.check_run_folder(logdir, hp)
    replicas = strategy.num_replicas_in_sync
    print(f'{FLAGS.hparams}: {hp.batch_size} images per replica x {replicas} replicas = '
          f'{hp.batch_size * replicas} per step, logdir {logdir}')
    print(f'strategy: {describe(strategy)}')

    state = steps.create_state(hp, strategy, loss_scale=2. ** 15 if FLAGS.precision == 'mixed_float16' else 1.,
                         remat=FLAGS.remat)
    # The EMA weights, for evaluation and the preview grids (what sample.py and --test_eval use).
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
    # The newest checkpoint that reads back whole and finite; damaged newer ones are moved
    # aside (by the chief) with a warning line.
    try:
        with checkpoints.writing(os.path.join(logdir, 'ckpt', 'corrupt'), 'a damaged checkpoint aside'):
            latest = checkpoints.newest_good(os.path.join(logdir, 'ckpt'), move=chief)
    except checkpoints.CheckpointError as e:
        hparams.fail(f'{e}; nothing was moved: mend or move these files, or use another --logdir')
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, FLAGS.keep_checkpoints if chief else 1)
    if latest:
        try:
            ckpt.restore(latest)       # an imported official checkpoint has no optimizer or input state
        except checkpoints.READ_ERRORS as e:
            hparams.fail(f'{latest}: cannot be restored into this run ({data._first_line(e)[:300]})')
        print(f'resumed from {latest} at step {int(state.step.numpy())}')
        if not saved_iter:
            train_iter = iter(data.train_dataset(hp, strategy, FLAGS.data_dir,
                                                 start_step=int(state.step.numpy())))
    print(f'{vdvae.count_params(state.model):,} parameters, {state.model.num_layers} stochastic layers')
    train_steps = steps.make_train_loop(state, hp, strategy, FLAGS.jit_compile)
    per_call = FLAGS.steps_per_call or (FLAGS.log_every if isinstance(strategy, tf.distribute.TPUStrategy) else 1)
    events = [e for e in (FLAGS.log_every, FLAGS.save_every, FLAGS.samples_every, FLAGS.eval_every) if e > 0]
    kept = lambda: f'; the last complete checkpoint ({manager.latest_checkpoint or "none yet"}) is as it was'
    log = Log(logdir, kept, hp.skip_threshold) if chief else None
    preview = preview_images(hp, FLAGS.data_dir)

    saved = {}                  # the last save: {step: path}

    def save():
        try:
            with checkpoints.writing(ckpt_dir, f'checkpoint {step}', kept()):
                path = checkpoints.save(manager, state, step)
        except checkpoints.CheckpointError as e:
            hparams.fail(e)
        saved.clear()
        saved[step] = path
        return path

    # SIGTERM / SIGINT: the call under way ends, then a checkpoint and the end (an evaluation
    # under way is abandoned, except under multi-worker training, where all workers must
    # finish it together).
    preemption = checkpoints.Preemption()
    multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    stopping = lambda: preemption.requested is not None and not multiworker
    step, t0, t_log = int(state.step.numpy()), time.time(), time.time()
    start = logged = step
    interval = {}               # sums since the last log line (interval_add)
    while step < hp.steps:
        if stop_requested(strategy, preemption):
            path = saved.get(step) or save()
            who = preemption.requested or 'a signal to another worker'
            print(f'{hparams.fresh_line()}{who}: stopped at step {step} with a checkpoint ({path}); '
                  'the same command resumes')
            return
        n = min([per_call, hp.steps - step] + [e - step % e for e in events])
        with data.clear_errors():
            interval_add(interval, train_steps(train_iter, tf.constant(n)))
        step += n
        if step % FLAGS.log_every == 0 or step == hp.steps:
            values = interval_means(interval, step - logged)
            values.update(bits_per_dim=values['elbo'] / math.log(2), lr=float(state.optimizer.learning_rate),
                          skipped_total=int(state.skipped.numpy()),
                          images_per_s=(step - logged) * hp.batch_size * replicas / (time.time() - t_log))
            if log:
                log.write(step, 'train', values)
            t_log, logged, interval = time.time(), step, {}
            hparams.progress(f'step {step} elbo {values["elbo"]:.4f} ({values["bits_per_dim"]:.3f} bpd) '
                             f'|g| {values["grad_norm"]:.1f} max {values["grad_norm_max"]:.1f} '
                             f'skipped {values["skipped"]} ({values["skipped_total"]} in all)',
                             step - start, hp.steps - start, t0)
        if int(state.skips_in_a_row.numpy()) > FLAGS.max_skips_in_a_row:
            path = save()       # skipped updates changed nothing: this is the last good state
            hparams.fail(f'{int(state.skips_in_a_row.numpy())} updates in a row were skipped (gradient '
                         f'norm >= skip_threshold={hp.skip_threshold} or non-finite loss): training '
                         f'has stalled; the last good state is saved ({path}). To resume, run the same '
                         'command with a higher --skip_threshold or a lower --lr')
        if step % FLAGS.save_every == 0 or step == hp.steps:
            save()
        if chief and FLAGS.samples_every and (step % FLAGS.samples_every == 0 or step == hp.steps):
            steps.copy_ema(state, ema_model)
            grid = sampling.sample_grid(ema_model, *preview, seed=step, title=f'step {step}, EMA weights')
            path = os.path.join(logdir, 'samples', f'step-{step:08d}.png')
            with checkpoints.writing(path, 'the sample grid', kept()):
                figures.save_png(grid, path)
            log.write_image(step, 'preview (EMA weights)', grid)
        if FLAGS.eval_every and (step % FLAGS.eval_every == 0 or step == hp.steps):
            steps.copy_ema(state, ema_model)
            result = steps.evaluate(eval_step, data.eval_dataset(hp, 'valid', strategy, FLAGS.data_dir), stop=stopping)
            if result is None:
                continue         # preempted: the top of the loop saves and stops
            if log:
                log.write(step, 'valid', result)
            print(f'{hparams.fresh_line()}valid at step {step}: {result["elbo"]:.4f} nats/dim, '
                  f'{result["bits_per_dim"]:.4f} bits/dim ({result["images"]} images, '
                  f'{result["nonfinite"]} non-finite)')
        if log and (step == hp.steps or any(e and step % e == 0 for e in (FLAGS.samples_every, FLAGS.eval_every))):
            log.write_curve()
    print(f'done: {step} steps, checkpoints in {os.path.join(logdir, "ckpt")}')


if __name__ == '__main__':
    define_flags()
    hparams.run(main)
