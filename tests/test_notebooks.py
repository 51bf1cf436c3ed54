"""The Colab notebooks, run the way Colab runs them: each copied into an empty folder outside
any checkout, top to bottom, with `REPO` a local clone of this project (so the notebook clones
and installs as on Colab) and the parameters cell set to a budget: the tiny preset on mnist5k
for a few steps, and the official code's own test checkpoint (the tiny preset's shape) as the
"released" file, downloaded from a file:// URL. A cell that fails fails the test."""
import os
import re
import shutil
import subprocess

import pytest

# requirements-test.txt installs both; .ci/run's TF 2.20 venv, which runs other tests, does not.
nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, 'tests', 'data', 'official_case', 'official.th')


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
    """A local clone of this project: what the notebooks clone instead of GitHub."""
    path = tmp_path_factory.mktemp('repo') / 'vdvae-tf'
    subprocess.run(['git', 'clone', '-q', ROOT, str(path)], check=True)
    return str(path)


def _execute(name, folder, upto=None, **parameters):
    """Run notebooks/<name>, copied into `folder`, with `parameters` set after its parameters
    cell (as papermill does); returns each code cell's outputs and the text they printed.
    upto: run the cells down to the first whose source holds this text (a user re-running
    the notebook down to a cell)."""
    nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
    folder.mkdir(exist_ok=True)
    shutil.copy(os.path.join(ROOT, 'notebooks', name), folder / name)
    if upto is not None:
        (last, *_) = [i for i, c in enumerate(nb.cells) if upto in c.source]
        nb.cells = nb.cells[:last + 1]
    first = nb.cells[0]
    assert first.cell_type == 'markdown' and first.source.startswith('# ')   # says what it does
    (index,) = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
    assert index == 1, 'the parameters cell comes right after the opening markdown'
    names = {line.split('=')[0].strip() for line in nb.cells[index].source.splitlines() if '=' in line}
    assert set(parameters) <= names, set(parameters) - names      # only parameters it has
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        '\n'.join(f'{k} = {v!r}' for k, v in parameters.items())))
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': str(folder)}}).execute()
    cells = [c.outputs for c in nb.cells if c.cell_type == 'code']
    outputs = [o for c in cells for o in c]
    assert not [o for o in outputs if o.output_type == 'error']
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    return cells, text


def _images(outputs):
    return [o for o in outputs if 'image/png' in o.get('data', {})]


def test_the_training_notebook_clones_installs_and_shows_grids_while_it_trains(tmp_path, clone):
    logdir = str(tmp_path / 'run')
    params = dict(PRESET='tiny', DATASET='mnist5k', STEPS=4, LOGDIR=logdir, N_IMAGES=16,
                  TEMPERATURES='1.0,0.8', REPO=clone,
                  EXTRA_FLAGS='--log_every=1 --save_every=2 --samples_every=2 --eval_every=4')
    cells, text = _execute('train_colab.ipynb', tmp_path / 'colab', **params)
    assert f'cloning {clone}' in text and 'keeping this runtime\'s tensorflow' in text   # Colab's path
    assert 'strategy: one CPU device (no GPU visible to TensorFlow)' in text
    assert 'the paper trained tiny for (not a paper preset)' in text
    assert 'done: 4 steps' in text and 'test mnist5k:' in text and 'bits/dim over 16 images' in text
    # The training cell shows each grid as it is written (steps 2 and 4), each with the curve.
    (training,) = [c for c in cells if any('done: 4 steps' in o.get('text', '') for o in c)]
    assert len(_images(training)) == 4
    said = ''.join(o.get('text', '') for o in training if o.output_type == 'stream')
    assert said.index('step-00000002.png:') < said.index('done: 4 steps')     # while it trained
    assert len(_images([o for c in cells for o in c])) == 4 + 2                # and samples, two ways
    # The same notebook again with more steps, down to its training cell, resumes the run.
    _, text = _execute('train_colab.ipynb', tmp_path / 'colab', upto="run('train.py', *flags",
                       **dict(params, STEPS=6, INSTALL=False))
    assert 'cloning' not in text and 'resumed from' in text and 'at step 4' in text and 'done: 6 steps' in text


def test_the_pretrained_notebook_downloads_imports_and_shows_images(tmp_path, clone, monkeypatch):
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))      # the download cache
    cells, text = _execute('pretrained_colab.ipynb', tmp_path / 'colab', PRESET='tiny', DATASET='mnist5k',
                           CKPT=f'file://{CASE}', N_IMAGES=16, INSTALL=False, REPO=clone)
    assert f'downloading file://{CASE}' in text and (tmp_path / 'keras' / 'vdvae' / 'official.th').is_file()
    # Samples (sampled and most likely pixels), reconstructions and the per-layer rate plot.
    assert len(_images([o for c in cells for o in c])) == 4
    assert 'test mnist5k:' in text and 'bits/dim over 16 images (EMA weights, step 0)' in text
    assert os.path.isfile(tmp_path / 'colab' / 'vdvae-tf' / 'runs' / 'tiny-official' / 'figures' / 'stats.csv')


def test_without_test_images_the_pretrained_notebook_samples_and_skips_in_one_line_each(tmp_path, clone, monkeypatch):
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
    cells, text = _execute('pretrained_colab.ipynb', tmp_path / 'colab', PRESET='tiny',
                           DATASET=f'folder:{tmp_path}/no-such-images', CKPT=f'file://{CASE}', INSTALL=False,
                           REPO=clone)
    assert len(_images([o for c in cells for o in c])) == 2                    # the samples
    skipped = [l for l in text.splitlines() if l.startswith('skipped')]
    assert len(skipped) == 3 and all('no-such-images' in l for l in skipped), skipped


def test_the_badges_and_repo_name_one_github_path():
    """Each notebook's Open-in-Colab badge opens itself, and it, REPO's default, the README's
    badges and its clone line name the same repository (one placeholder to replace)."""
    paths = set()
    for name in ('train_colab.ipynb', 'pretrained_colab.ipynb'):
        nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
        (badge,) = re.findall(r'colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/([\w.-]+)',
                              nb.cells[0].source)
        assert badge[1] == name
        (repo,) = re.findall(r"^REPO = 'https://github\.com/([\w.-]+/[\w.-]+)\.git'", nb.cells[1].source, re.M)
        paths |= {badge[0], repo}
    readme = re.findall(r'colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/([\w.-]+)',
                        open(os.path.join(ROOT, 'README.md')).read())
    assert sorted(n for _, n in readme) == ['pretrained_colab.ipynb', 'train_colab.ipynb']
    clone = re.findall(r'^git clone https://github\.com/([\w.-]+/[\w.-]+)\.git ', open(os.path.join(ROOT, 'README.md')).read(), re.M)
    assert len(paths | {p for p, _ in readme} | set(clone)) == 1 and clone, (paths, clone)
