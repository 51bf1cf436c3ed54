"""Official PyTorch checkpoints <-> this project's variables, without needing torch.

An official checkpoint is `torch.save(state_dict)`: a zip holding `<name>/data.pkl` (the
pickled dict, whose tensors point at storages by key) and `<name>/data/<key>` (raw
little-endian storages). Conv weights are (out, in, kh, kw); ours are (kh, kw, in, out) and
stacked per resolution stage, so one official tensor fills one slice of one variable.
"""
import collections
import pickle
import zipfile

import numpy as np

from hparams import parse_blocks

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names it."""


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
                raise CheckpointError(f'{path}: not a torch.save zip archive (no data.pkl)')
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
        raise CheckpointError(f'{path}: no such file')
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f'{path}: corrupt or not an official checkpoint ({e})')
    return {k[len('module.'):] if k.startswith('module.') else k: np.asarray(v) for k, v in state.items()}


# ---------------------------------------------------------------------------------------
def _conv_kernel(w):
    return np.transpose(w, (2, 3, 1, 0))     # (out, in, kh, kw) -> (kh, kw, in, out)


def _nchw(w):
    return np.transpose(w, (0, 2, 3, 1))


def official_layout(model):
    """(official key, variable or ParamStack, piece name or None, block index or None,
    official -> ours array transform), for every tensor of this configuration's state_dict."""
    enc, dec = model.encoder, model.decoder
    rows = [('encoder.in_conv.weight', enc.in_kernel, None, None, _conv_kernel),
            ('encoder.in_conv.bias', enc.in_bias, None, None, None)]

    def block(prefix, stack, role, j):
        for k in range(1, 5):
            rows.append((f'{prefix}.c{k}.weight', stack, f'{role}c{k}_kernel', j, _conv_kernel))
            rows.append((f'{prefix}.c{k}.bias', stack, f'{role}c{k}_bias', j, None))

    seen = collections.Counter()
    for i, (res, _) in enumerate(parse_blocks(model.hp.enc_blocks)):
        block(f'encoder.enc_blocks.{i}', enc.stages[res], '', seen[res])
        seen[res] += 1
    seen = collections.Counter()
    for i, (res, _) in enumerate(parse_blocks(model.hp.dec_blocks)):
        stage, j, p = dec.stages[res], seen[res], f'decoder.dec_blocks.{i}'
        block(f'{p}.enc', stage, 'posterior/', j)
        block(f'{p}.prior', stage, 'prior/', j)
        block(f'{p}.resnet', stage, 'resnet/', j)
        rows.append((f'{p}.z_proj.weight', stage, 'z_proj/kernel', j, _conv_kernel))
        rows.append((f'{p}.z_proj.bias', stage, 'z_proj/bias', j, None))
        seen[res] += 1
    for k, res in enumerate(sorted(dec.bias_states)):
        rows.append((f'decoder.bias_xs.{k}', dec.bias_states[res], None, None, _nchw))
    rows += [('decoder.gain', dec.gain, None, None, np.ravel),
             ('decoder.bias', dec.bias, None, None, np.ravel),
             ('decoder.out_net.out_conv.weight', dec.out_kernel, None, None, _conv_kernel),
             ('decoder.out_net.out_conv.bias', dec.out_bias, None, None, None)]
    return rows


def load_official(model, state_dict):
    """Fill every variable of `model` from an official state_dict; every key must be used."""
    layout = official_layout(model)
    expected = {row[0] for row in layout}
    unexpected = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    if missing or unexpected:
        raise CheckpointError(f'checkpoint does not match the hyperparameters: missing '
                              f'{missing[:5]}{"..." if len(missing) > 5 else ""}, unexpected '
                              f'{unexpected[:5]}{"..." if len(unexpected) > 5 else ""}')
    values = {}      # variable -> the numpy array it will hold
    for key, holder, piece, j, transform in layout:
        tensor = state_dict[key] if transform is None else transform(state_dict[key])
        var = holder if piece is None else holder.params
        values.setdefault(var.path, (var, np.array(var.numpy())))
        array = values[var.path][1]
        shape = tuple(var.shape) if piece is None else tuple(holder.pieces[holder.index[piece]][1])
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f'{key}: shape {tuple(state_dict[key].shape)} does not fit '
                                  f'{var.path}{"/" + piece if piece else ""} {shape}')
        if piece is None:
            array[...] = tensor
        else:
            start = sum(holder.sizes[:holder.index[piece]])
            array[j, start:start + tensor.size] = tensor.ravel()
    for var, array in values.values():
        var.assign(array.astype(np.float32))
