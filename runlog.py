"""What a training run writes for people to read: the log interval's means (as the official
code logs them), log.jsonl, TensorBoard scalars and images, curve.png and grad_norm.png."""
import json
import os

import tensorflow as tf

import figures
import files


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
        with files.writing(self.tb_dir, 'TensorBoard events', kept()):
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
            with files.writing(os.path.join(folder, name), what, self.kept()):
                figures.save_png(picture, os.path.join(folder, name))

    def write_image(self, step, name, image):
        with files.writing(self.tb_dir, 'TensorBoard events', self.kept()):
            with self.tb.as_default(step=int(step)):
                tf.summary.image(name, image[None])
            self.tb.flush()

    def write(self, step, kind, values):
        with files.writing(self.path, 'the log', self.kept()):
            self.file.write(json.dumps(dict(step=int(step), kind=kind, **values)) + '\n')
            self.file.flush()
        # The event writer reports a full disk only when flushed, so flush at every write.
        with files.writing(self.tb_dir, 'TensorBoard events', self.kept()):
            with self.tb.as_default(step=int(step)):
                for k, v in values.items():
                    tf.summary.scalar(f'{kind}/{k}', v)
            self.tb.flush()
