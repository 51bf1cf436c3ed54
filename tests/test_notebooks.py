"""The Colab notebooks, executed top to bottom on the CPU as a user would run them, with the
parameters cell set to a budget: the tiny preset on mnist5k for a few steps, and the official
code's own test checkpoint (the tiny preset's shape). A cell that fails fails the test."""
import os

import pytest

# requirements-test.txt installs both; .ci/run's TF 2.20 venv, which runs other tests, does not.
nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, 'tests', 'data', 'official_case', 'official.th')


def _execute(name, upto=None, **parameters):
    """Run notebooks/<name> with `parameters` set after its parameters cell (as papermill
    does); returns every cell's outputs and the text they printed. upto: run the cells down to
    the first whose source holds this text (a user re-running the notebook down to a cell)."""
    nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
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
                            resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    return outputs, text


def _images(outputs):
    return [o for o in outputs if 'image/png' in o.get('data', {})]


def test_the_training_notebook_trains_resumes_evaluates_and_shows_images(tmp_path):
    logdir = str(tmp_path / 'run')
    params = dict(PRESET='tiny', DATASET='mnist5k', STEPS=4, LOGDIR=logdir, N_IMAGES=16, INSTALL=False,
                  TEMPERATURES='1.0,0.8', EXTRA_FLAGS='--log_every=2 --save_every=2 --samples_every=2 --eval_every=4')
    outputs, text = _execute('train_colab.ipynb', **params)
    assert 'strategy: one CPU device (no GPU visible to TensorFlow)' in text
    assert 'done: 4 steps' in text and 'test mnist5k:' in text and 'bits/dim over 16 images' in text
    # The training curve, the latest preview grid and the temperature samples.
    assert len(_images(outputs)) == 3
    assert os.path.isfile(os.path.join(logdir, 'curve.png'))
    # The same notebook again with more steps, down to its training cell, resumes the run in LOGDIR.
    _, text = _execute('train_colab.ipynb', upto="run('train.py'", **dict(params, STEPS=6))
    assert 'resumed from' in text and 'at step 4' in text and 'done: 6 steps' in text


def test_the_pretrained_notebook_imports_the_official_checkpoint_and_shows_images(tmp_path):
    logdir = str(tmp_path / 'official')
    outputs, text = _execute('pretrained_colab.ipynb', PRESET='tiny', CKPT=CASE, LOGDIR=logdir,
                             N_IMAGES=16, INSTALL=False)
    # Samples at three temperatures, reconstructions and the per-layer rate plot.
    assert len(_images(outputs)) == 3
    assert 'test mnist5k:' in text and 'bits/dim over 16 images (EMA weights, step 0)' in text
    assert os.path.isfile(os.path.join(logdir, 'figures', 'stats.csv'))
