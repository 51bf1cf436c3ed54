import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The tests compile XLA programs to check what they compute (a TPU's stand-in), not how fast
# the CPU runs them: without LLVM's optimisation of the generated CPU code they compile much
# sooner (docs/performance.md, "The test suite's run time"). The scripts the tests start inherit it.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
# pytest -n N runs N test processes on the machine's cores (and each runs scripts as forks):
# TensorFlow's op pool in each is then its share of the cores, not all of them, which the
# processes' threads would otherwise fight over. At the README's -n 3 on 2 cores each keeps one.
_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
os.environ.setdefault('TF_NUM_INTRAOP_THREADS', str(max(1, (os.cpu_count() or 1) // _workers)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs, so MirroredStrategy tests can run here; must precede any TF op.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0], [tf.config.LogicalDeviceConfiguration()] * 2)

# Numbers made by the official code (tests/data/README.md): part of the project, never skipped.
OFFICIAL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


@pytest.fixture(scope='session')
def official_data():
    assert os.path.isfile(os.path.join(OFFICIAL_DATA, 'official_case', 'official.th')), OFFICIAL_DATA
    return OFFICIAL_DATA


@pytest.fixture(scope='session')
def tiny_model():
    import keras
    import hparams
    import model
    keras.utils.set_random_seed(1)
    return model.VDVAE(hparams.load('tiny'))


def fit(m, x_in, target, steps, lr=2e-3):
    """`steps` Adam updates of model m on one fixed batch; the ELBO of each step."""
    import keras
    opt = keras.optimizers.Adam(lr)
    opt.build(m.trainable_variables)

    @tf.function(autograph=False)
    def step(i):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(m.losses_per_image(x_in, target, seed=tf.stack([i, 0]))['elbo'])
        opt.apply(tape.gradient(loss, m.trainable_variables), m.trainable_variables)
        return loss

    return [float(step(tf.constant(i))) for i in range(steps)]
