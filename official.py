"""The official release: where its files are, how to fetch them, their format, and how its
tensors map onto this project's model. No torch needed.

An official checkpoint is `torch.save(state_dict)`: a zip holding `<name>/data.pkl` (the
pickled dict, whose tensors point at storages by key) and `<name>/data/<key>` (raw
little-endian storages). Conv weights are (out, in, kh, kw); ours are (kh, kw, in, out) and
stacked per resolution stage, so one official tensor fills one slice of one variable.

    path = official.fetch('cifar10')                   # the released EMA file, downloaded once
    official.load_official(model, official.read_state_dict(path))
"""
import collections
import os
import pickle
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import numpy as np

import console
import errors
import files

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


# ---------------------------------------------------------------------------------------
# Reading torch.save files.


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
        return storage[offset].copy()
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * itemsize for s in stride]).copy()


class _Unpickler(pickle.Unpickler):
    """Allows only what a state_dict of tensors needs: no arbitrary code runs on load."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self.read_storage = read_storage

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) in (('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_tensor')):
            return _rebuild_tensor
        if (module, name) == ('torch._utils', '_rebuild_parameter'):
            return lambda data, requires_grad, hooks: data
        if module == 'torch' and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f'unexpected object {module}.{name} in the checkpoint')

    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid
        if kind != 'storage' or _STORAGE_DTYPES.get(storage_type) is None:
            raise pickle.UnpicklingError(f'unsupported storage {storage_type}')
        return self.read_storage(key, _STORAGE_DTYPES[storage_type], numel)


def read_state_dict(path):
    """{key: numpy array} from an official `.th` file; the `module.` prefix is dropped."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith('/data.pkl')]
            if len(pkl) != 1:
                raise errors.CheckpointError(f'{path}: not a torch.save zip archive (no data.pkl)')
            prefix = pkl[0][:-len('data.pkl')]
            cache = {}

            def read_storage(key, dtype, numel):
                if key not in cache:
                    raw = archive.read(f'{prefix}data/{key}')
                    cache[key] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder('<'))[:numel]
                return cache[key]

            with archive.open(pkl[0]) as f:
                state = _Unpickler(f, read_storage).load()
    except FileNotFoundError:
        raise errors.CheckpointError(f'{path}: no such file')
    except IsADirectoryError:
        raise errors.CheckpointError(f'{path}: a folder, not a .th file')
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
        if isinstance(e, errors.CheckpointError):
            raise
        raise errors.CheckpointError(f'{path}: corrupt or not an official checkpoint ({e})')
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise errors.CheckpointError(f'{path}: holds a {type(state).__name__}, not a state_dict of tensors')
    return {k[len('module.'):] if k.startswith('module.') else k: np.asarray(v) for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# Writing them: what torch 2.13's torch.load(weights_only=True) needs is a zip whose records
# all sit in one folder, `data.pkl` (protocol 2; tensors as persistent ids of storages),
# `data/<key>` and `version`; `byteorder` says the storages are little-endian. Written
# opcode by opcode, because pickle proper would import torch to name torch's functions.


def _p_str(s):
    b = s.encode('utf-8')
    return b'X' + struct.pack('<I', len(b)) + b


def _p_int(i):
    if 0 <= i < 256:
        return b'K' + bytes([i])
    if -2 ** 31 <= i < 2 ** 31:
        return b'J' + struct.pack('<i', i)
    b = i.to_bytes((i.bit_length() + 8) // 8, 'little', signed=True)
    return b'\x8a' + bytes([len(b)]) + b


def _p_tuple(items):
    return b'(' + b''.join(items) + b't'


def _p_global(module, name):
    return b'c' + f'{module}\n{name}\n'.encode()


_EMPTY_ORDERED_DICT = _p_global('collections', 'OrderedDict') + b')R'


def _pickle_state_dict(arrays):
    """data.pkl for {key: C-contiguous array}: tensor i reads storage '<i>' from offset 0."""
    storage_types = {t: name for name, t in _STORAGE_DTYPES.items() if t is not None}
    out = [b'\x80\x02', _EMPTY_ORDERED_DICT, b'(']
    for i, (key, a) in enumerate(arrays.items()):
        strides = [int(np.prod(a.shape[d + 1:])) for d in range(a.ndim)]    # C order, as torch's
        storage = _p_tuple([_p_str('storage'), _p_global('torch', storage_types[a.dtype.type]),
                            _p_str(str(i)), _p_str('cpu'), _p_int(a.size)])
        # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)
        out += [_p_str(key), _p_global('torch._utils', '_rebuild_tensor_v2'),
                _p_tuple([storage + b'Q', _p_int(0), _p_tuple(map(_p_int, a.shape)),
                          _p_tuple(map(_p_int, strides)), b'\x89', _EMPTY_ORDERED_DICT]), b'R']
    return b''.join(out + [b'u.'])


def write_state_dict(state_dict, path):
    """Save {key: array} in torch.save's format. Never replaces an existing file."""
    if os.path.exists(path):
        raise errors.CheckpointError(f'{path} exists; not overwriting it')
    arrays = {k: np.ascontiguousarray(v, np.dtype(v.dtype).newbyteorder('<')) for k, v in state_dict.items()}
    with files.replacing(path) as tmp, open(tmp, 'wb') as f, \
            zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as archive:
        def record(name, data):
            info = zipfile.ZipInfo(f'archive/{name}', date_time=(1980, 1, 1, 0, 0, 0))
            # Pad the local header so the record starts on 64 bytes, as torch does: a
            # torch.load(mmap=True) then hands out aligned tensors.
            pad = -(f.tell() + 30 + len(info.filename) + 4) % 64
            info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad
            archive.writestr(info, data)

        record('data.pkl', _pickle_state_dict(arrays))
        record('byteorder', b'little')
        for i, a in enumerate(arrays.values()):
            record(f'data/{i}', a.tobytes())
        record('version', b'3\n')


# ---------------------------------------------------------------------------------------
# The official key of every tensor and where it lives here, in the official order.

# Official layout -> ours, and back.
_LAYOUTS = {
    'same': (lambda a: a, lambda a: a),
    'conv': (lambda a: np.transpose(a, (2, 3, 1, 0)), lambda a: np.transpose(a, (3, 2, 0, 1))),
    'nchw': (lambda a: np.transpose(a, (0, 2, 3, 1)), lambda a: np.transpose(a, (0, 3, 1, 2))),
    'channels': (lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1, 1)),   # gain, bias
}


def official_layout(model):
    """(official key, variable or ParamStack, piece name or None, block index or None,
    layout name in _LAYOUTS), for every tensor of this configuration's state_dict."""
    variants = [f'{name}={getattr(model.hp, name)}' for name, paper in (('unpool', 'nearest'), ('top_down_block', 'res'))
                if getattr(model.hp, name) != paper]
    if variants:
        raise errors.CheckpointError(f'{", ".join(variants)} is a figure-5 variant the official code does not have; '
                                     'only the paper\'s model (unpool=nearest, top_down_block=res) converts')
    enc, dec = model.encoder, model.decoder
    rows = [('encoder.in_conv.weight', enc.in_kernel, None, None, 'conv'),
            ('encoder.in_conv.bias', enc.in_bias, None, None, 'same')]

    def blocks(prefix, layers):
        """Each block's convs, as the model's block_convs lists them, in the official order."""
        for i, b in enumerate(layers):
            for ours, theirs, _ in model.block_convs(b):
                rows.append((f'{prefix}.{i}.{theirs}weight', b.row.stack, f'{ours}kernel', b.row.j, 'conv'))
                rows.append((f'{prefix}.{i}.{theirs}bias', b.row.stack, f'{ours}bias', b.row.j, 'same'))

    blocks('encoder.enc_blocks', enc.blocks)
    rows += [('decoder.gain', dec.gain, None, None, 'channels'),
             ('decoder.bias', dec.bias, None, None, 'channels')]
    blocks('decoder.dec_blocks', dec.blocks)
    for k, res in enumerate(sorted(dec.bias_states)):
        rows.append((f'decoder.bias_xs.{k}', dec.bias_states[res], None, None, 'nchw'))
    rows += [('decoder.out_net.out_conv.weight', dec.out_kernel, None, None, 'conv'),
             ('decoder.out_net.out_conv.bias', dec.out_bias, None, None, 'same')]
    return rows


def _where(holder, piece):
    """(variable, shape here, flat column range in a stacked row or None)."""
    if piece is None:
        return holder, tuple(holder.shape), None
    i = holder.index[piece]
    start = sum(holder.sizes[:i])
    return holder.params, tuple(holder.pieces[i][1]), slice(start, start + holder.sizes[i])


def _list(keys):
    return ', '.join(keys[:5]) + (f' and {len(keys) - 5} more' if len(keys) > 5 else '')


def load_official(model, state_dict):
    """Fill every variable of `model` from an official state_dict; every key must be used."""
    layout = official_layout(model)
    expected = {row[0] for row in layout}
    unexpected = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    if missing or unexpected:
        problems = ([f'missing {_list(missing)}'] if missing else []) + \
                   ([f'unexpected {_list(unexpected)}'] if unexpected else [])
        raise errors.CheckpointError(f'does not match the model of --hparams and its overrides: {"; ".join(problems)}')
    values = {}      # variable -> the numpy array it will hold
    for key, holder, piece, j, layout_name in layout:
        to_ours, to_official = _LAYOUTS[layout_name]
        var, shape, columns = _where(holder, piece)
        official_shape = to_official(np.broadcast_to(np.float32(0), shape)).shape
        if state_dict[key].shape != official_shape:
            raise errors.CheckpointError(f'{key} has shape {state_dict[key].shape}; these hyperparameters '
                                         f'need {official_shape}')
        values.setdefault(var.path, (var, np.array(var.numpy())))
        array, tensor = values[var.path][1], to_ours(state_dict[key])
        if columns is None:
            array[...] = tensor
        else:
            array[j, columns] = tensor.ravel()
    for var, array in values.values():
        var.assign(array.astype(np.float32))


def export_official(model):
    """`model`'s weights as the official state_dict (official keys, order and shapes; float32):
    the inverse of load_official, bit for bit."""
    arrays = {}      # variable path -> its value, read once: a stage holds many tensors
    state_dict = collections.OrderedDict()
    for key, holder, piece, j, layout_name in official_layout(model):
        var, shape, columns = _where(holder, piece)
        if var.path not in arrays:
            arrays[var.path] = var.numpy()
        array = arrays[var.path] if columns is None else arrays[var.path][j, columns].reshape(shape)
        state_dict[key] = np.ascontiguousarray(_LAYOUTS[layout_name][1](array), np.float32)
    return state_dict


# ---------------------------------------------------------------------------------------
# Files.


def load_file(model, path):
    state_dict = read_state_dict(path)
    try:
        load_official(model, state_dict)
    except errors.CheckpointError as e:
        raise errors.CheckpointError(f'{path}: {e}') from None
    return state_dict



# ---------------------------------------------------------------------------------------
# The release: the EMA weights of each paper preset, as the official README lists them.

RELEASE = 'https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/'
EMA_FILES = {
    'cifar10': 'vdvae-assets-2/cifar10-seed0-iter-900000-model-ema.th',     # seeds 1-3: the README
    'imagenet32': 'vdvae-assets/imagenet32-iter-1700000-model-ema.th',
    'imagenet64': 'vdvae-assets-2/imagenet64-iter-1600000-model-ema.th',
    'ffhq256': 'vdvae-assets/ffhq256-iter-1700000-model-ema.th',
    'ffhq1024': 'vdvae-assets/ffhq1024-iter-1700000-model-ema.th',
}


def cache_dir(folder=None):
    """Where downloads are kept: `folder`, else $KERAS_HOME/vdvae (~/.keras/vdvae), as Keras
    keeps its own downloads."""
    return folder or os.path.join(os.environ.get('KERAS_HOME') or os.path.expanduser('~/.keras'), 'vdvae')


def fetch(preset, folder=None, url=None):
    """The local path of `preset`'s released EMA weights (or of `url`), downloaded into the
    cache folder the first time and found there afterwards."""
    if url is None:
        if preset not in EMA_FILES:
            raise errors.CheckpointError(f'no released weights for the preset {preset!r}; the release has '
                                         f'{", ".join(EMA_FILES)} (or give the file\'s URL)')
        url = RELEASE + EMA_FILES[preset]
    folder = cache_dir(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise errors.CheckpointError(f'{folder}: not a folder (the cache for downloaded checkpoints)')
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint.th')
    if os.path.exists(path):
        print(f'{path}: downloaded before', file=sys.stderr)
        return path
    return download(url, path)


def download(url, path):
    """url -> path: into path + '.part', resumed from the bytes an earlier, cut-off download
    left there (where the server takes a Range request), checked against the length the
    server announced, then renamed; a progress line while it runs. file:// URLs take the same
    path (the tests' stand-in for https)."""
    # Its own .part, not files.replacing: a download cut off is resumed from it, not removed.
    part = path + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        raise errors.CheckpointError(f'{url}: the server answered {e.code} {e.reason}') from None
    except (urllib.error.URLError, ValueError, OSError) as e:
        raise errors.CheckpointError(f'{url}: cannot download it ({getattr(e, "reason", e)})') from None
    with response:
        resumed = have and getattr(response, 'status', None) == 206     # else the server sent it whole
        done = have if resumed else 0
        length = response.headers.get('Content-Length')
        total = done + int(length) if length else None
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        print(f'downloading {url} to {path}' + (f', resuming at {done / 2 ** 20:.0f} MB' if resumed else ''),
              file=sys.stderr)
        t0, start = time.time(), done
        with open(part, 'ab' if resumed else 'wb') as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                console.progress('downloading, MB', (done - start) / 2 ** 20, ((total or done) - start) / 2 ** 20,
                                 t0, every=10.)
    if total is not None and done != total:
        raise errors.CheckpointError(f'{url}: the download ended at {done:,} of {total:,} bytes; run the same '
                                     f'command again to resume it ({part})')
    os.replace(part, path)
    return path
