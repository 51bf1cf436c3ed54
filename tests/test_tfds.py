"""tfds's real preparation path, offline and without tfds.testing.mock_data: what a fresh
install does the first time it is asked for cifar10 or ImageNet 32/64.

The network is cut at the HTTP layer (tests/offline.py), so everything before it runs for
real: the builder lookup, its code and checksum files (where a missing module once stopped
every fresh install), the download manager and its folders. Then tiny archives in each
dataset's own file format, put where tfds looks for manually downloaded files, take the rest
of the path: tfds checks, extracts and prepares them, and data.py reads what tfds wrote."""
import io
import os
import re
import tarfile

import numpy as np
from PIL import Image
import pytest

import cli
import data
from offline import cut_network
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


def one_line_error(fn, *args):
    with pytest.raises(data.DataError) as e:
        fn(*args)
    message = str(e.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('dataset', sorted(data.TFDS))
def test_a_fresh_install_gets_as_far_as_the_download_and_says_no_network(dataset, offline, tmp_path):
    name = data.TFDS[dataset][0]
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


@pytest.mark.parametrize('dataset', sorted(data.TFDS))
def test_tfds_prepares_the_source_files_and_data_reads_every_image_exactly(
        dataset, offline, tmp_path, monkeypatch):
    """With tfds's checksums set to those of the tiny archives, the rest of the path is the
    real one: extraction, tfds's own parsing of the format, TFRecords, and data.py's reading."""
    from tensorflow_datasets.core.download import checksums
    import tensorflow_datasets as tfds
    name = data.TFDS[dataset][0]
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
    if dataset == 'cifar10':      # the official code's split (test_data.py: scikit-learn's)
        from test_data import SKLEARN_10_5
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
