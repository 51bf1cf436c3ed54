"""Official PyTorch checkpoints <-> this project's run folders, without needing torch.

    python convert.py --preset=cifar10 --out=runs/cifar10-official    # the release, downloaded once
    python convert.py --torch_ckpt=imagenet32-model-ema.th --hparams=imagenet32 \
        [--torch_ckpt_model=imagenet32-model.th] --out=runs/imagenet32-official
    python convert.py --export --ckpt=runs/imagenet32 --out=imagenet32-ema.th [--weights=model]

The import writes a run folder that sample.py and train.py (--test_eval, or resuming to
fine-tune) load like their own: the released *-model-ema.th becomes the EMA weights, the
*-model.th (default: the same file) the weights training goes on from. The file format and
the release's addresses are official.py's.
"""
import dataclasses
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags, logging
import tensorflow as tf

import checkpoints
import console
import data
import errors
import files
import hparams
import model as vdvae
import official
import steps

FLAGS = flags.FLAGS


def define_flags():
    """The command line; defined only when convert.py is the program (tests import it)."""
    hparams.define_flags(default=None)
    flags.DEFINE_string('preset', None, 'import the official release of this preset: its EMA weights '
                        'are downloaded once into --cache_dir (instead of --torch_ckpt); field flags may '
                        'change the configuration the file must fit')
    flags.DEFINE_string('cache_dir', None, 'with --preset: where downloads are kept (default ~/.keras/vdvae)')
    flags.DEFINE_string('url', None, 'with --preset: download this official-format file instead of the '
                        'release\'s (a mirror, another cifar10 seed; file:// works too)')
    flags.DEFINE_string('torch_ckpt', None, 'import: the official state_dict to use as EMA weights '
                        '(the released *-model-ema.th, what sampling and evaluation use)')
    flags.DEFINE_string('torch_ckpt_model', None, 'import: the official non-EMA *-model.th, the '
                        'weights training goes on from (default: the --torch_ckpt ones)')
    flags.DEFINE_boolean('export', False, 'write --ckpt as an official state_dict instead')
    flags.DEFINE_string('ckpt', None, 'export: a run folder (its latest checkpoint) or a ckpt-N prefix')
    flags.DEFINE_enum('weights', 'ema', ['ema', 'model'], 'export: the EMA weights or the raw ones')
    flags.DEFINE_string('out', None, 'import: the run folder to create; export: the .th file to write')


# ---------------------------------------------------------------------------------------
# Run folders.


def check_out(out):
    """The checkpoint folder of the run folder `out`, which must not hold a checkpoint yet."""
    ckpt_dir = os.path.join(out, 'ckpt')
    if tf.io.gfile.exists(out) and not tf.io.gfile.isdir(out):
        raise errors.CheckpointError(f'{out} is a file; --out names the run folder to create')
    if tf.io.gfile.exists(ckpt_dir) and tf.io.gfile.listdir(ckpt_dir):
        raise errors.CheckpointError(f'{out} already holds a checkpoint ({ckpt_dir}); not overwriting it')
    return ckpt_dir


def import_run(hp, out, ema_path, model_path=None):
    """Make `out` a run folder like train.py's holding an official checkpoint at step 0: the
    EMA file's weights as our EMA (what sample.py and --test_eval use), the model file's (by
    default the same) as the weights training goes on from. Returns (checkpoint path,
    number of tensors, number of parameters)."""
    ckpt_dir = check_out(out)
    state = steps.create_state(hp, tf.distribute.get_strategy())
    tensors = len(official.load_file(state.model, ema_path))
    for v, e in zip(state.model.weights, state.ema):
        e.assign(v.value)
    if model_path:
        official.load_file(state.model, model_path)
    checkpoints.check_run_folder(out, hp)     # after loading: a checkpoint that does not fit leaves no folder
    manager = tf.train.CheckpointManager(state.checkpoint(), ckpt_dir, 1)
    with files.writing(ckpt_dir, 'the checkpoint'):
        return manager.save(checkpoint_number=0), tensors, vdvae.count_params(state.model)


# ---------------------------------------------------------------------------------------
# The command line.


def import_main():
    if FLAGS.preset:
        if FLAGS.torch_ckpt:
            console.fail('--preset downloads the release\'s file; give --torch_ckpt or --preset, not both')
        if FLAGS.hparams and FLAGS.hparams != FLAGS.preset:
            console.fail(f'--hparams={FLAGS.hparams} and --preset={FLAGS.preset} differ; --preset is enough')
        if FLAGS.preset not in hparams.PRESETS:
            console.fail(f'--preset: unknown preset {FLAGS.preset!r}; choose one of: {", ".join(official.EMA_FILES)}')
        FLAGS.hparams = FLAGS.preset
    elif FLAGS.cache_dir or FLAGS.url:
        console.fail(f'--{"cache_dir" if FLAGS.cache_dir else "url"} is for --preset (a download)')
    if not (FLAGS.torch_ckpt or FLAGS.preset) or not FLAGS.hparams:
        console.fail('import needs --preset=PRESET (the release, downloaded), or --torch_ckpt=FILE.th and '
                     '--hparams=PRESET (the configuration the checkpoint was trained with); or pass --export')
    if FLAGS.ckpt:
        console.fail('--ckpt is for --export; an import reads --torch_ckpt')
    hp = console.exit_on_error(hparams.from_flags)
    try:        # the import reads no data, but a name train.py would refuse later is refused now
        data.check_name(hp.dataset)
    except errors.DataError as e:
        console.fail(f'--dataset: {e}')
    check_out(FLAGS.out)         # before a download, not after it
    ema = FLAGS.torch_ckpt or official.fetch(FLAGS.preset, FLAGS.cache_dir, FLAGS.url)
    print(f'reading {ema}' + (f' and {FLAGS.torch_ckpt_model}' if FLAGS.torch_ckpt_model else ''))
    path, tensors, params = import_run(hp, FLAGS.out, ema, FLAGS.torch_ckpt_model)
    print(f'{tensors} tensors, {params:,} parameters; EMA weights from {ema}, weights '
          f'to train on from {FLAGS.torch_ckpt_model or "the same file"}\n'
          f'wrote {path} (step 0) and {os.path.join(FLAGS.out, "hparams.json")}; '
          f'try: python sample.py --ckpt={FLAGS.out}')


def export_main():
    if not FLAGS.ckpt:
        console.fail('--export needs --ckpt: a run folder or a ckpt-N prefix')
    if FLAGS.torch_ckpt or FLAGS.torch_ckpt_model:
        console.fail('--torch_ckpt and --torch_ckpt_model are for an import; drop --export')
    if os.path.exists(FLAGS.out):
        console.fail(f'{FLAGS.out} exists; not overwriting it (pass another --out)')
    overrides = [f.name for f in dataclasses.fields(hparams.HParams) if FLAGS[f.name].value is not None]
    if overrides:
        console.fail(f'--export takes the hyperparameters from the run folder; drop --{overrides[0]}')
    model, hp, _, path, step = checkpoints.load(FLAGS.ckpt, which='ema' if FLAGS.weights == 'ema' else 'weights')
    if FLAGS.hparams:
        checkpoints.check_preset(hp, FLAGS.hparams)
    state_dict = official.export_official(model)
    with files.writing(FLAGS.out, 'the checkpoint', '; nothing was written'):
        official.write_state_dict(state_dict, FLAGS.out)
    print(f'{path} ({FLAGS.weights} weights, step {step}): {len(state_dict)} tensors, '
          f'{vdvae.count_params(model):,} parameters\nwrote {FLAGS.out} (torch.load reads it)')


def main(_):
    tf.get_logger().setLevel('ERROR')
    logging.set_verbosity(logging.WARNING)      # TF's checkpoint saver logs at INFO
    if not FLAGS.out:
        console.fail('--out is required: the run folder to create, or with --export the .th file')
    try:
        if FLAGS.export:
            export_main()
        else:
            import_main()
    except errors.CheckpointError as e:
        console.fail(e)


if __name__ == '__main__':
    define_flags()
    console.run(main)
