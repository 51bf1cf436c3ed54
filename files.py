"""Writing files a reader can trust: a file or a folder is written under a temporary name beside
its path and renamed when whole (`replacing`, `write_whole`), so that a reader (a resumed run,
a metric, a person) never sees half of one and a failed write leaves nothing behind; and a
write that fails ends a command in one line naming the path (`writing`). gs:// paths too.

    with files.writing(path, 'the table', '; nothing was written'):
        files.write_whole(path, text)
"""
import contextlib
import os

import console
import errors


def _tf():
    # Imported when a file is written, not with this module: official.py, which writes its
    # .th files here, loads without TensorFlow.
    import tensorflow as tf
    return tf


@contextlib.contextmanager
def replacing(path, suffix='.tmp'):
    """Yields a temporary path beside `path` (path + suffix) for the block to write a file or a
    folder at; renamed to `path` when the block ends, removed if it raises. A temporary one
    left by a write that was cut off is removed first."""
    gfile = _tf().io.gfile
    target = path.rstrip('/') or path
    tmp = target + suffix
    _remove(gfile, tmp)
    gfile.makedirs(os.path.dirname(target) or '.')
    try:
        yield tmp
        gfile.rename(tmp, target, overwrite=True)
    except BaseException:         # a full disk, Ctrl-C: nothing half-written stays
        _remove(gfile, tmp)
        raise


def _remove(gfile, path):
    if gfile.isdir(path):
        gfile.rmtree(path)
    elif gfile.exists(path):
        gfile.remove(path)


def write_whole(path, data, suffix='.tmp'):
    """`data` (bytes or str) to `path`, through `replacing`."""
    with replacing(path, suffix) as tmp, _tf().io.gfile.GFile(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
        f.write(data)


@contextlib.contextmanager
def writing(path, what, then=''):
    """Writes of `what` to `path` inside: if one fails (no space left, a read-only file
    system, no permission), stop in one line naming the path and why, followed by `then` (what
    is left as it was)."""
    tf = _tf()
    try:
        yield
    except (tf.errors.OpError, OSError) as e:
        console.fail(f'{path}: cannot write {what} ({errors.reason(e)}){then}')
