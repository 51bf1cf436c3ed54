"""Checkpoints a week-long run can trust: every resume verifies what it loads, and a damaged
newest checkpoint costs the steps since the one before it, not the run.

- `newest_good(ckpt_dir)`: the newest checkpoint whose every tensor reads back with its checksum
  (TF's bundle stores a CRC32C per tensor) and whose floating-point tensors are finite. A bad
  one (truncated, zeroed, half deleted, non-finite) is named in one warning line and moved
  aside to ckpt_dir/corrupt/ for inspection, never deleted; the one before it is tried next.
- `save(manager, state, step)`: refuses to write non-finite weights, EMA or optimizer state.
- `load(ckpt)`: a model holding a run folder's (or one ckpt-N's) EMA or raw weights, built from
  the folder's hparams.json; what sample.py, compress.py, convert.py --export and --test_eval
  read; a missing or damaged one is one error line.
- `Preemption`: SIGTERM / SIGINT (TPU VMs, Colab, SLURM, Ctrl-C) ask the training loop to save
  and stop once the call under way ends.
"""
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys

import numpy as np
import tensorflow as tf

import console
import errors
import files
import hparams
import model as vdvae
import update

# What TF raises on a damaged bundle: DataLossError (checksum), NotFoundError (missing file),
# IndexError (a truncated data file), OpError in general.
READ_ERRORS = (tf.errors.OpError, IndexError, ValueError)


def _number(prefix):
    m = re.search(r'ckpt-(\d+)$', prefix)
    return int(m.group(1)) if m else -1


def prefixes(ckpt_dir):
    """ckpt-N prefixes in ckpt_dir that have any file (index or data), newest first."""
    found = set()
    for path in tf.io.gfile.glob(os.path.join(ckpt_dir, 'ckpt-*')):
        m = re.match(r'(.*ckpt-\d+)\.(index|data-\d+-of-\d+)$', path)
        if m:
            found.add(m.group(1))
    return sorted(found, key=_number, reverse=True)


def verify(prefix):
    """Read every tensor of the checkpoint back (checksums checked) and check that every
    floating-point one is finite; raise CheckpointError naming the first fault."""
    nonfinite_tensor = None
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name, dtype in sorted(reader.get_variable_to_dtype_map().items()):
            if dtype == tf.variant:       # the input iterator's state: checked when restored
                continue
            value = reader.get_tensor(name)
            if dtype.is_floating and not np.all(np.isfinite(value)):
                nonfinite_tensor = name
                break
    except READ_ERRORS as e:
        raise errors.CheckpointError(f'{prefix}: cannot be read ({type(e).__name__}: {errors.reason(e)[:200]})') from None
    # Raised here, not in the loop: a CheckpointError is a ValueError, which READ_ERRORS takes.
    if nonfinite_tensor is not None:
        raise errors.CheckpointError(f'{prefix}: {nonfinite_tensor} holds non-finite values')


def move_aside(prefix):
    """Move every file of a bad checkpoint to <ckpt_dir>/corrupt/, so that its number is free
    again and nothing is lost."""
    folder = os.path.join(os.path.dirname(prefix), 'corrupt')
    tf.io.gfile.makedirs(folder)
    for path in tf.io.gfile.glob(prefix + '.*'):
        tf.io.gfile.rename(path, os.path.join(folder, os.path.basename(path)), overwrite=True)
    return folder


def newest_good(ckpt_dir, move=True):
    """The newest checkpoint in ckpt_dir that verifies (None in a folder without any). Each bad
    newer one costs one warning line on stderr and is moved aside (move=False: left in place,
    for readers and for the workers that only read the chief's folder). If none verifies,
    CheckpointError, and nothing is moved."""
    bad = []
    for prefix in prefixes(ckpt_dir):
        try:
            verify(prefix)
        except errors.CheckpointError as e:
            bad.append((prefix, e))
            continue
        for prefix_bad, e in bad:
            where = f'moved to {move_aside(prefix_bad)}/' if move else 'left in place'
            print(f'warning: {e}; {where}; using {os.path.basename(prefix)}', file=sys.stderr, flush=True)
        return prefix
    if bad:
        raise errors.CheckpointError(f'no checkpoint in {ckpt_dir} reads back whole: {bad[0][1]}' +
                                     (f' (and {len(bad) - 1} older ones)' if len(bad) > 1 else ''))
    return None


def nonfinite(state):
    """Names of the weights, EMA or optimizer variables that hold a NaN or an infinity."""
    groups = (('weights', state.model.weights), ('ema', state.ema), ('optimizer', state.optimizer.variables))
    def finite(v):
        t = tf.convert_to_tensor(v)
        return not t.dtype.is_floating or bool(tf.reduce_all(tf.math.is_finite(t)))
    return [f'{group}/{getattr(v, "path", v.name)}' for group, variables in groups for v in variables
            if not finite(v)]


def save(manager, state, step):
    """manager.save(step) unless some state is non-finite: then CheckpointError, and the
    checkpoints already written stay as they are."""
    bad = nonfinite(state)
    if bad:
        latest = manager.latest_checkpoint or 'none yet'
        raise errors.CheckpointError(f'not saving step {step}: {len(bad)} variables hold non-finite values '
                                     f'({", ".join(bad[:3])}); the last good checkpoint is {latest}')
    return manager.save(checkpoint_number=step)


class Preemption:
    """After SIGTERM or SIGINT, `requested` is the signal's name: the loop saves and stops at the
    end of its current call. A second signal stops at once, as without this handler."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = None
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name
        print(f'{console.fresh_line()}{self.requested}: saving a checkpoint at the end of this call, then stopping '
              '(send it again to stop at once)', file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------
# Run folders: hparams.json says what the checkpoints in ckpt/ hold.


def load_run_hparams(ckpt):
    """The hparams of a run folder or of a checkpoint prefix inside one."""
    folder = ckpt if tf.io.gfile.isdir(ckpt) else os.path.dirname(os.path.dirname(ckpt))
    path = os.path.join(folder, 'hparams.json')
    if not tf.io.gfile.exists(path):
        console.fail(f'{ckpt}: no hparams.json beside it; not a checkpoint of this project')
    try:
        fields = json.loads(tf.io.gfile.GFile(path).read())
        return hparams.validate(hparams.HParams(**fields)), folder
    except (TypeError, ValueError, errors.HParamsError) as e:
        console.fail(f'{path}: {e}')


def checkpoint_path(ckpt, folder):
    """A run folder: its newest checkpoint that reads back whole (a damaged newer one is
    named in a warning, and left as it is); a ckpt-N prefix: that one, verified."""
    if tf.io.gfile.isdir(ckpt):
        try:
            latest = newest_good(os.path.join(folder, 'ckpt'), move=False)
        except errors.CheckpointError as e:
            console.fail(e)
        if latest is None:
            console.fail(f'{ckpt}: no readable checkpoint in {os.path.join(folder, "ckpt")}')
        return latest
    if not tf.io.gfile.exists(ckpt + '.index'):
        console.fail(f'{ckpt}: no such checkpoint ({ckpt}.index is missing)')
    try:
        verify(ckpt)
    except errors.CheckpointError as e:
        console.fail(e)
    return ckpt


def load(ckpt, strategy=None, which='ema'):
    """A model holding the EMA weights of `ckpt` (which='weights': the raw ones training goes
    on from) -> (model, hp, run folder, checkpoint path, step)."""
    hp, folder = load_run_hparams(ckpt)
    path = checkpoint_path(ckpt, folder)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = vdvae.VDVAE(hp)
        step = tf.Variable(0, dtype=tf.int64)
    reader = tf.train.Checkpoint(step=step, **{which: {update.checkpoint_key(v): v.value for v in model.weights}})
    try:
        reader.read(path).assert_existing_objects_matched().expect_partial()
    except (*READ_ERRORS, AssertionError) as e:
        console.fail(f'{path}: cannot be restored into a {hp.dataset} model of this project '
                     f'({str(e).splitlines()[0][:300]})')
    return model, hp, folder, path, int(step.numpy())


def check_preset(hp, preset):
    """--hparams is optional; if given, the checkpoint's architecture must be that preset's."""
    expected = console.exit_on_error(hparams.load, preset)
    training_only = {'lr', 'adam_beta1', 'adam_beta2', 'adam_eps', 'weight_decay', 'warmup_iters',
                     'ema_rate', 'grad_clip', 'skip_threshold', 'batch_size', 'steps', 'seed'}
    diff = [f.name for f in dataclasses.fields(hp)
            if f.name not in training_only and getattr(hp, f.name) != getattr(expected, f.name)]
    if diff:
        console.fail(f'the checkpoint is not a {preset} model: {", ".join(diff)} differ; '
                     'drop --hparams (the checkpoint knows its own)')


# ---------------------------------------------------------------------------------------
# Run folders: hparams.json fixes what a folder holds, so resuming cannot mix configurations.

# What a resumed run may change: how long it goes on, and the remedies for a stalled or
# diverging run. Anything else would make it another run.
RESUMABLE_WITH = ('steps', 'lr', 'grad_clip', 'skip_threshold')


def check_run_folder(logdir, hp):
    path = os.path.join(logdir, 'hparams.json')
    mine = dataclasses.asdict(hp)
    if tf.io.gfile.exists(path):
        theirs = json.loads(tf.io.gfile.GFile(path).read())
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if set(diff) - set(RESUMABLE_WITH):
            console.fail(f'{logdir} holds a run with other hyperparameters '
                         f'({", ".join(k for k in diff if k not in RESUMABLE_WITH)}); pass the same flags '
                         f'to resume (only {", ".join(RESUMABLE_WITH)} may change), or another folder')
        for k in diff:
            print(f'resuming with {k}={mine[k]} (the run had {theirs[k]})')
    # Written on every start, even unchanged: a folder we cannot write is found before training.
    with files.writing(logdir, 'the run folder', '; nothing in it was changed'):
        files.write_whole(path, json.dumps(mine, indent=1))
