"""One worker of the two-process MultiWorkerMirroredStrategy test (run by test_train.py).

    TF_CONFIG=... python mwms_worker.py OUT.npz STEPS
trains the tiny preset on mnist5k for STEPS steps and saves its final weights and counters."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
import hparams  # noqa: E402
import devices  # noqa: E402
import steps  # noqa: E402


def main(out, n_steps):
    strategy = devices.make_strategy('multiworker')
    hp = hparams.load('tiny', batch_size=4)
    keras.utils.set_random_seed(hp.seed)
    state = steps.create_state(hp, strategy)
    step = steps.make_train_step(state, hp, strategy)
    batches = iter(data.train_dataset(hp, strategy))
    losses = [float(step(*next(batches))['elbo']) for _ in range(n_steps)]
    np.savez(out, *[v.numpy() for v in state.model.weights], *[e.numpy() for e in state.ema],
             losses=np.array(losses), step=state.step.numpy(), replicas=strategy.num_replicas_in_sync)


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]))
