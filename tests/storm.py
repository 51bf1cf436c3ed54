"""A training run with a storm: runs train.py as a user would, on two replicas (the CPU split
into two logical devices, mirrored), with the loss of the steps in [FIRST, LAST] made
non-finite, or its gradients made huge, on both replicas or only on one.

    python tests/storm.py --storm=FIRST:LAST --kind=nan|huge [--replica=0|1] [TRAIN.PY FLAGS...]

Steps count from 0 (the update that brings the run to step N is step N-1). `huge` multiplies
the gradient by 1e9 and leaves the loss as it is; `nan` makes the loss NaN. The fault is
injected in the model's loss, inside the traced train step, so everything after it (the
all-reduce, the skip, the stall guard, the saves) is train.py's own."""
import os
import sys

from absl import flags
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import console  # noqa: E402
import model  # noqa: E402
import devices  # noqa: E402
import train  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """train.py's flags and the storm's."""
    train.define_flags()
    flags.DEFINE_string('storm', None, 'FIRST:LAST: the steps hit (from 0)', required=True)
    flags.DEFINE_enum('kind', None, ['nan', 'huge'], 'nan: the loss; huge: 1e9 times the gradient', required=True)
    flags.DEFINE_integer('replica', None, 'only this replica (default: both)')


def main(argv):
    first, last = (int(s) for s in FLAGS.storm.split(':'))
    kind, replica = FLAGS.kind, FLAGS.replica
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices('CPU')[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    losses_per_image = model.VDVAE.losses_per_image

    def stormy(self, x_in, target, seed=None, noise_rows=None):
        out = losses_per_image(self, x_in, target, seed=seed, noise_rows=noise_rows)
        if noise_rows is None:              # not a train or eval step
            return out
        step = tf.cast(seed[1], tf.int64)   # evaluation's seeds are negative: never in the storm
        hit = (step >= first) & (step <= last)
        if replica is not None:             # the replica's first row in the global batch
            hit &= tf.equal(noise_rows[0] // tf.shape(x_in)[0], replica)
        elbo = out['elbo']
        # Factors, not tf.where(hit, bad, elbo): the branch not taken would still send its NaN
        # into the gradient.
        if kind == 'nan':
            out['elbo'] = elbo * tf.where(hit, float('nan'), 1.)
        else:                               # the same value, 1e9 times the gradient
            out['elbo'] = elbo + tf.where(hit, 1e9 - 1., 0.) * (elbo - tf.stop_gradient(elbo))
        return out

    model.VDVAE.losses_per_image = stormy
    two = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    devices.make_strategy = lambda *a, **k: two
    train.main(argv)


if __name__ == '__main__':
    define_flags()
    console.run(main)
