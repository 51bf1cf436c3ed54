"""tfds's real preparation path, offline and without tfds.testing.mock_data: what a fresh
install does the first time it is asked for cifar10 or ImageNet 32/64.

The network is cut at the HTTP layer (tests/offline.py), so everything before it runs for
real: the builder lookup, its code and checksum files (where a missing module once stopped
every fresh install), the download manager and its folders. Then tiny archives in each
dataset's own file format, put where tfds looks for manually downloaded files, take the rest
of the path: tfds checks, extracts and prepares them, and data.py reads what tfds wrote.

The held-out splits data.py makes of tfds's datasets (the official cifar10 split by example id,
ImageNet's shapes and split) are checked under tfds.testing.mock_data, in the middle part."""
import io
import os
import re
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import cli
import data
import errors
from offline import cut_network
from test_data import images_of, one_line_error
import tfds_source

SIZE = {'cifar10': 32, 'imagenet32': 32, 'imagenet64': 64}


@pytest.fixture
def offline():
    """The URLs tfds tried to fetch; every one was refused."""
    import requests
    import time
    attempted = []
    original = cut_network(attempted)
    yield attempted
    # tfds fetches a dataset's files on parallel threads: once one failed, the others may
    # still ask. Keep refusing until they have been quiet a while, so that no late request
    # reaches the network or the next test's list.
    seen, quiet_since, t0 = len(attempted), time.time(), time.time()
    while time.time() - quiet_since < 0.5 and time.time() - t0 < 5:
        time.sleep(0.05)
        if len(attempted) != seen:
            seen, quiet_since = len(attempted), time.time()
    requests.adapters.HTTPAdapter.send = original


@pytest.mark.parametrize('dataset', sorted(tfds_source.TFDS))
def test_a_fresh_install_gets_as_far_as_the_download_and_says_no_network(dataset, offline, tmp_path):
    name = tfds_source.TFDS[dataset][0]
    message = one_line_error(data.split_size, dataset, 'train', SIZE[dataset], str(tmp_path))
    # It reached the download of one of the dataset's own source files, and only that failed.
    assert message.startswith(f'{name}: not prepared in {tmp_path}, and tfds cannot download it: no network')
    refused = re.search(r'tests/offline.py refused (\S+)\)', message).group(1)
    assert refused in offline and refused.rsplit('/', 1)[1] in tfds_source.TFDS_SOURCE_FILES[name]
    assert 'DIR/downloads/manual/' in message and '--data_dir=DIR' in message
    for f in tfds_source.TFDS_SOURCE_FILES[name]:
        assert f in message


def test_a_missing_module_is_named_with_its_pip_line(tmp_path):
    # The first command of the project's design, in a process where importlib_resources (what
    # tfds 4.9.10 needs to prepare a dataset) cannot be imported.
    r = cli.run('tests/offline.py', '--missing=importlib_resources', 'train.py', '--hparams=imagenet32',
                f'--data_dir={tmp_path}', f'--logdir={tmp_path / "run"}')
    line = cli.error_line(r)
    assert "needs the Python module 'importlib_resources'" in line
    pin = next(l.strip() for l in open(os.path.join(cli.ROOT, 'requirements.txt'))
               if l.startswith('importlib_resources=='))
    assert line.endswith(f'pip install {pin}') and 'network' not in line
    assert not os.path.exists(tmp_path / 'run' / 'ckpt')


# ---------------------------------------------------------------------------------------
# tfds sources under tfds.testing.mock_data.
# The official code's CIFAR-10 split, as scikit-learn 1.9.1 draws it, run once outside the
# project (pip install scikit-learn; then, for (n, k) = (50000, 5000) and (10, 5)):
#     from sklearn.model_selection import train_test_split
#     train, valid = train_test_split(np.arange(n), test_size=k, random_state=11172018)
#     hashlib.sha256(valid.astype('<i8').tobytes()).hexdigest(), the same for train
SKLEARN_CIFAR10 = dict(
    valid_first=[38899, 48321, 12222, 16844, 47067, 26668, 26014, 11553],
    train_first=[28062, 8836, 24693, 36105, 26494, 7812, 43533, 19615],
    valid_sha256='a62a2f02ab39756edc27567a7feea80a736cbcf461d6106567afc30e66b154b0',
    train_sha256='41bfb7d6515495aa7dccb33e7508d8ef7b23d9d8c44d3073385d8198657c5a66')
SKLEARN_10_5 = ([0, 3, 8, 7, 1], [6, 2, 9, 4, 5])     # (valid, train) of 10 images, 5 held out


def test_the_cifar10_held_out_positions_are_scikit_learns():
    import hashlib
    valid, train = tfds_source.cifar10_held_out(50000, data.HELD_OUT['cifar10'])
    assert list(valid[:8]) == SKLEARN_CIFAR10['valid_first'] and list(train[:8]) == SKLEARN_CIFAR10['train_first']
    assert hashlib.sha256(valid.astype('<i8').tobytes()).hexdigest() == SKLEARN_CIFAR10['valid_sha256']
    assert hashlib.sha256(train.astype('<i8').tobytes()).hexdigest() == SKLEARN_CIFAR10['train_sha256']
    assert [list(part) for part in tfds_source.cifar10_held_out(10, 5)] == [list(part) for part in SKLEARN_10_5]


def cifar10_mock(ids):
    """as_dataset_fn: the train split in the given id order, each image filled with the
    position its id names; the test split three images of 255."""
    def as_dataset(self, *args, **kwargs):
        split = str(kwargs.get('split', args[0] if args else ''))
        rows = [('test_0', 255)] * 3 if 'test' in split else [(i, int('0' + i[6:])) for i in ids]
        return tf.data.Dataset.from_generator(
            lambda: ({'id': i, 'image': np.full((32, 32, 3), v, np.uint8)} for i, v in rows),
            output_signature={'id': tf.TensorSpec((), tf.string),
                              'image': tf.TensorSpec((None, None, 3), tf.uint8)}).apply(
            tf.data.experimental.assert_cardinality(len(rows)))
    return as_dataset


def test_cifar10_holds_out_the_official_train_images(monkeypatch):
    """tfds hands the examples out shuffled; the split follows their ids, not their order."""
    import tensorflow_datasets as tfds
    monkeypatch.setitem(data.HELD_OUT, 'cifar10', 5)
    ids = [f'train_{p:05d}' for p in np.random.default_rng(0).permutation(10)]
    with tfds.testing.mock_data(as_dataset_fn=cifar10_mock(ids)):
        split = {s: images_of(data.load_split('cifar10', s, 32))[:, 0, 0, 0] for s in data.SPLITS}
        assert data.split_size('cifar10', 'valid', 32) == 5 and data.split_size('cifar10', 'train', 32) == 5
    order = [int(i[6:]) for i in ids]
    assert list(split['valid']) == [p for p in order if p in SKLEARN_10_5[0]]     # tfds's order
    assert list(split['train']) == [p for p in order if p in SKLEARN_10_5[1]]
    assert list(split['test']) == [255] * 3
    with tfds.testing.mock_data(as_dataset_fn=cifar10_mock(['train_00001', 'img7'] + ids[2:])):
        with pytest.raises(errors.DataError, match='an example id is not train_N'):
            with data.clear_errors():
                images_of(data.load_split('cifar10', 'train', 32))


def imagenet_mock(shapes):
    """as_dataset_fn: split 'train' images hold 1, 'validation' 2, with the given shapes."""
    def as_dataset(self, *args, **kwargs):
        split = str(kwargs.get('split', args[0] if args else ''))
        fill = 2 if 'validation' in split else 1
        return tf.data.Dataset.from_generator(
            lambda: ({'image': np.full(s, fill, np.uint8)} for s in shapes),
            output_signature={'image': tf.TensorSpec((None, None, 3), tf.uint8)})
    return as_dataset


def test_downsampled_imagenet_shapes_are_checked():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=3):    # the automatic mock: odd shapes like 43x33
        message = one_line_error(data.load_split, 'imagenet32', 'test', 32)
    assert 'downsampled_imagenet/32x32' in message and 'expected 32x32x3' in message
    with tfds.testing.mock_data(as_dataset_fn=imagenet_mock([(64, 64, 3)] * 7)):
        test = images_of(data.load_split('imagenet64', 'test', 64))
        assert test.shape == (7, 64, 64, 3) and (test == 2).all()    # test = validation split
        one_line_error(data.load_split, 'imagenet64', 'train', 64, match='has no images')
    # An odd shape after the first image is caught while reading.
    with tfds.testing.mock_data(as_dataset_fn=imagenet_mock([(32, 32, 3), (32, 31, 3)])):
        ds = data.load_split('imagenet32', 'test', 32)
        with pytest.raises(errors.DataError, match='another shape than 32x32x3'):
            with data.clear_errors():
                images_of(ds)


def test_imagenet_held_out_split(monkeypatch):
    import tensorflow_datasets as tfds
    assert data.HELD_OUT['imagenet32'] == data.HELD_OUT['imagenet64'] == 5000
    monkeypatch.setitem(data.HELD_OUT, 'imagenet32', 2)
    with tfds.testing.mock_data(as_dataset_fn=imagenet_mock([(32, 32, 3)] * 5)):
        assert len(images_of(data.load_split('imagenet32', 'train', 32))) == 3
        assert len(images_of(data.load_split('imagenet32', 'valid', 32))) == 2


# ---------------------------------------------------------------------------------------
# Tiny archives in the datasets' own formats, where tfds looks for files downloaded by hand.
def cifar10_archive(rng, n_train=10, n_test=3):
    """cifar-10-binary.tar.gz: records of one label byte and 3,072 bytes of channel-major
    pixels, in data_batch_1..5.bin and test_batch.bin."""
    train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)

    def records(images):
        return b''.join(bytes([i % 10]) + x.transpose(2, 0, 1).tobytes() for i, x in enumerate(images))
    files = {f'data_batch_{b + 1}.bin': records(part) for b, part in enumerate(np.array_split(train, 5))}
    files['test_batch.bin'] = records(test)
    files['batches.meta.txt'] = '\n'.join(f'class{i}' for i in range(10)).encode() + b'\n'
    return {'cifar-10-binary.tar.gz': tar({f'cifar-10-batches-bin/{k}': v for k, v in files.items()},
                                          'w:gz')}, train, test


def imagenet_archives(rng, size, n_train=7, n_test=3):
    """train_SxS.tar and valid_SxS.tar: folders of PNG files."""
    train = rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8)

    def pngs(prefix, images):
        out = {}
        for i, x in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(x).save(buffer, format='PNG')
            out[f'{prefix}/{i:07d}.png'] = buffer.getvalue()
        return out
    s = f'{size}x{size}'
    return {f'train_{s}.tar': tar(pngs(f'train_{s}', train)),
            f'valid_{s}.tar': tar(pngs(f'valid_{s}', test))}, train, test


def tar(files, mode='w'):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as t:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def archives(dataset, rng):
    return cifar10_archive(rng) if dataset == 'cifar10' else imagenet_archives(rng, SIZE[dataset])


def put_manual(tmp_path, files):
    manual = tmp_path / 'downloads' / 'manual'
    manual.mkdir(parents=True)
    for f, content in files.items():
        (manual / f).write_bytes(content)
    return manual


def sorted_images(images):
    images = np.asarray(images)
    return images[np.lexsort(images.reshape(len(images), -1).T[::-1])]


def test_a_file_in_the_manual_folder_is_checked_against_tfds_checksums(offline, tmp_path):
    files, _, _ = cifar10_archive(np.random.default_rng(0))
    put_manual(tmp_path, files)
    message = one_line_error(data.split_size, 'cifar10', 'test', 32, str(tmp_path))
    # tfds took the file, not the network (a late request of an earlier test's ImageNet
    # download threads may still land in the list).
    assert not [url for url in offline if 'cifar-10' in url], offline
    assert 'has wrong checksum' in message and 'cifar-10-binary.tar.gz' in message
    assert 'no network' not in message


@pytest.mark.parametrize('dataset', sorted(tfds_source.TFDS))
def test_tfds_prepares_the_source_files_and_data_reads_every_image_exactly(
        dataset, offline, tmp_path, monkeypatch):
    """With tfds's checksums set to those of the tiny archives, the rest of the path is the
    real one: extraction, tfds's own parsing of the format, TFRecords, and data.py's reading."""
    from tensorflow_datasets.core.download import checksums
    import tensorflow_datasets as tfds
    name = tfds_source.TFDS[dataset][0]
    files, train, test = archives(dataset, np.random.default_rng(1))
    manual = put_manual(tmp_path, files)
    builder_class = type(tfds.builder(name, data_dir=str(tmp_path)))
    urls = {url: checksums.compute_url_info(manual / info.filename)
            for url, info in builder_class.url_infos.items() if info.filename in files}
    assert len(urls) == len(files)
    monkeypatch.setattr(builder_class, 'url_infos', urls)
    held_out = 5 if dataset == 'cifar10' else 2       # the paper's 5,000 of a few images
    monkeypatch.setitem(data.HELD_OUT, dataset, held_out)

    size = SIZE[dataset]
    got = {split: np.stack(list(data.load_split(dataset, split, size, str(tmp_path)).as_numpy_iterator()))
           for split in data.SPLITS}
    assert not offline
    np.testing.assert_array_equal(sorted_images(got['test']), sorted_images(test))
    assert len(got['valid']) == held_out and len(got['train']) == len(train) - held_out
    np.testing.assert_array_equal(sorted_images(np.concatenate([got['train'], got['valid']])),
                                  sorted_images(train))       # lossless: PNG and raw bytes
    assert data.split_size(dataset, 'train', size, str(tmp_path)) == len(train) - held_out
    if dataset == 'cifar10':      # the official code's split (scikit-learn's: SKLEARN_10_5 above)
        for split, positions in zip(('valid', 'train'), SKLEARN_10_5):
            np.testing.assert_array_equal(sorted_images(got[split]), sorted_images(train[positions]))


def test_an_unreachable_bucket_is_reported_as_such():
    # TensorFlow's GCS client (libcurl) says so in its message; there is no exception type.
    import tensorflow as tf
    e = tf.errors.FailedPreconditionError(None, None, "Error executing an HTTP request: libcurl code 6 "
                                          "meaning 'Could not resolve hostname'")
    message = tfds_source.failure('cifar10', 'train', 'gs://bucket/tfds', 'gs://bucket/tfds', e)
    assert message.startswith('cifar10: cannot reach gs://bucket/tfds: no network')
    other = tfds_source.failure('cifar10', 'train', '/x', '/x', ValueError('Unknown split "tr"'))
    assert other == "cifar10: cannot load split 'train' from /x: Unknown split \"tr\""
