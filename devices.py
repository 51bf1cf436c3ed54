"""The devices a run trains on: the tf.distribute strategy (one device, GPUs, a TPU, several
machines), the line describing it, the warning for a GPU TensorFlow cannot see, float32
convolution precision, and the two questions multi-worker training asks (who writes, and
whether to stop)."""
import os
import sys

import tensorflow as tf

import console
import errors


def make_strategy(name='auto', tpu='local'):
    """auto: the TPU if this machine has one, else all GPUs (Mirrored), else the default
    strategy. A TPU that fails to start (no chips reachable, a TensorFlow wheel without TPU
    kernels, ...) is one line on stderr, then the fallback; --strategy=tpu makes it an error."""
    if name == 'tpu' or (name == 'auto' and console.tpu_present()):
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except Exception as e:  # noqa: BLE001 -- ValueError, NotFoundError, InvalidArgumentError...
            why = f'the TPU ({tpu or "TPU_NAME"}) did not start: {type(e).__name__}: {errors.first_line(e)}'
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
    driver = console.nvidia_driver()
    if not driver or tf.config.list_physical_devices('GPU'):
        return None
    return (f'warning: this machine has an NVIDIA driver ({driver}) but TensorFlow sees no GPU, so it '
            'trains on the CPU. TensorFlow finds GPUs through its CUDA libraries, installed with '
            'pip install -r requirements-gpu.txt (tensorflow[and-cuda]); or check CUDA_VISIBLE_DEVICES')


def set_conv_precision(precision):
    """'highest': float32 convolutions in full float32 wherever the hardware would round them
    (XLA then marks every convolution operand_precision=highest); 'default': the fast mode."""
    tf.config.experimental.enable_tensor_float_32_execution(precision == 'default')


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
