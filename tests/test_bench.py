"""bench.py: its conv count is the model's, and its speed run works end to end (no test
asserts a time)."""
import glob
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import bench
import cli
import fastgraph
import hparams
import model


@pytest.mark.parametrize('unpool', ['nearest', 'learned'])
def test_conv_flops_count_every_convolution_the_model_runs(unpool, monkeypatch):
    hp = hparams.load('tiny', unpool=unpool)
    keras.utils.set_random_seed(0)
    m = model.VDVAE(hp)
    counted = [0]

    def counting_conv(x, kernel, bias=None, _conv=fastgraph.conv):
        out = _conv(x, kernel, bias)
        counted[0] += 2 * int(np.prod(out.shape[:-1])) * int(np.prod(kernel.shape))
        return out
    monkeypatch.setattr(fastgraph, 'conv', counting_conv)
    monkeypatch.setattr(model, 'conv', counting_conv)
    x = tf.zeros((3, hp.image_size, hp.image_size, 3))
    tf.config.run_functions_eagerly(True)       # every call runs its Python, so every conv is counted
    try:
        m.losses_per_image(x, x, seed=[0, 0])
        posterior = counted[0]
        counted[0] = 0
        m.sample(3, seed=[0, 0])
        prior = counted[0]
    finally:
        tf.config.run_functions_eagerly(False)
    assert bench.conv_flops(m, 3, 'eval') == posterior
    assert bench.conv_flops(m, 3, 'sample') == prior < posterior
    assert bench.conv_flops(m, 3, 'train') == 3 * posterior


def test_bench_runs_train_eval_and_sampling_with_remat_and_says_so_in_one_json_line(tmp_path):
    r = cli.run('bench.py', '--presets=tiny', '--steps=1', '--batch=2', '--eval_batch=2', '--remat',
                '--ceiling=false', f'--profile={tmp_path}/prof', timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report['settings']['remat'] is True and report['settings']['precision'] == 'float32'
    assert [row['path'] for row in report['rows']] == ['train', 'eval', 'sample']
    for row in report['rows']:
        assert row['preset'] == 'tiny' and row['step'] > 0 and row['gflops'] > 0 and row['peak_gb'] > 0
        assert row['of_conv'] is None           # no ceiling measured, no fraction made up
    assert report['rows'][0]['peak_gb'] >= report['rows'][0]['resident_gb'] > 0
    assert set(report['machine']['bf16_units']) <= {'avx512_bf16', 'amx_bf16'}
    table = r.stdout.splitlines()
    assert sum(1 for line in table if line.startswith('tiny ')) == 3
    # --profile: one trace per path, and where its op time went (shares of the ops the trace holds)
    for row in report['rows']:
        assert glob.glob(f'{tmp_path}/prof/tiny-{row["path"]}/**/*.xplane.pb', recursive=True), row['path']
        assert set(row['profile']) <= {'convolutions and matrix products', 'XLA kernels', 'other ops'}
        assert row['profile']['convolutions and matrix products'] > 0 and row['profile']['XLA kernels'] > 0
        assert abs(sum(row['profile'].values()) - 1) < 1e-9
    assert sum(1 for line in table if 'op time: ' in line and '% convolutions and matrix products' in line) == 3


def test_bench_refuses_unknown_paths_and_a_file_for_profiles_in_one_line(tmp_path):
    assert '--paths=train,fly' in cli.error_line(cli.run('bench.py', '--presets=tiny', '--paths=train,fly'))
    (tmp_path / 'notes.txt').write_text('mine')
    r = cli.run('bench.py', '--presets=tiny', f'--profile={tmp_path}/notes.txt')
    assert 'give a folder for the profiles' in cli.error_line(r)
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
