"""The official release from Python and the command line: official.fetch downloads a file once
into the cache (a .part file renamed when whole, resumed where the server takes a Range, its
length checked), VDVAE.from_preset returns a model holding it, `convert.py --preset` writes
the run folder. The official test case's checkpoint stands in for a released file, served
over file:// and over a local HTTP server that can resume and can cut a download short."""
import http.server
import json
import os
import threading

import numpy as np
import pytest

import cli
import errors
import hparams
import model as vdvae
import official

CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'official_case')
OFFICIAL = os.path.join(CASE, 'official.th')
ARCHITECTURE = ('width', 'zdim', 'bottleneck_multiple', 'num_mixtures', 'no_bias_above',
                'enc_blocks', 'dec_blocks', 'custom_width_str', 'image_size', 'low_bit')


def case_overrides():
    cfg = json.load(open(os.path.join(CASE, 'hparams.json')))
    return {k: cfg[k] for k in ARCHITECTURE}


class _Server(http.server.BaseHTTPRequestHandler):
    """GET of one file with Range support; `cut`: send only the first `cut` bytes of the body
    while announcing all of them (a connection that dropped)."""
    body, cut, seen = b'', None, []

    def do_GET(self):  # noqa: N802 -- http.server's name
        start = int(self.headers['Range'][len('bytes='):-1]) if self.headers['Range'] else 0
        type(self).seen.append(self.headers['Range'])
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(self.body) - start))
        self.end_headers()
        self.wfile.write(self.body[start:self.cut if self.cut and self.cut > start else None])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Server)
    _Server.body, _Server.cut, _Server.seen = open(OFFICIAL, 'rb').read(), None, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/vdvae-assets/case-model-ema.th'
    httpd.shutdown()


def test_a_download_is_checked_kept_whole_resumed_and_done_once(server, tmp_path, capfd):
    whole = open(OFFICIAL, 'rb').read()
    _Server.cut = len(whole) // 3                  # the connection drops after a third
    with pytest.raises(errors.CheckpointError, match=f'ended at {len(whole) // 3:,} of {len(whole):,} bytes'):
        official.fetch('tiny', tmp_path, server)
    path = tmp_path / 'case-model-ema.th'
    assert not path.exists() and (tmp_path / 'case-model-ema.th.part').stat().st_size == len(whole) // 3
    _Server.cut = None                              # the same call again resumes from there
    assert official.fetch('tiny', tmp_path, server) == str(path)
    assert _Server.seen == [None, f'bytes={len(whole) // 3}-'] and path.read_bytes() == whole
    assert not (tmp_path / 'case-model-ema.th.part').exists()
    assert 'resuming at' in capfd.readouterr().err
    official.fetch('tiny', tmp_path, server)       # there already: not asked for again
    assert len(_Server.seen) == 2 and 'downloaded before' in capfd.readouterr().err


def test_file_urls_take_the_same_path_and_a_part_without_range_starts_again(tmp_path):
    (tmp_path / 'official.th.part').write_bytes(b'left over from a cut download')
    path = official.fetch('tiny', tmp_path, f'file://{OFFICIAL}')
    assert open(path, 'rb').read() == open(OFFICIAL, 'rb').read()
    with pytest.raises(errors.CheckpointError, match='no released weights for the preset .tiny.'):
        official.fetch('tiny', tmp_path)
    with pytest.raises(errors.CheckpointError, match='cannot download it'):
        official.fetch('tiny', tmp_path / 'other', f'file://{tmp_path}/nothing.th')
    assert not (tmp_path / 'other').exists()
    assert official.cache_dir() == os.path.join(os.path.expanduser('~'), '.keras', 'vdvae') or 'KERAS_HOME' in os.environ
    assert set(official.EMA_FILES) == {'cifar10', 'imagenet32', 'imagenet64', 'ffhq256', 'ffhq1024'}


def test_from_preset_gives_a_model_holding_the_file(tmp_path):
    m = vdvae.VDVAE.from_preset('tiny', cache_dir=tmp_path, url=f'file://{OFFICIAL}', **case_overrides())
    expected = vdvae.VDVAE(hparams.load('tiny', **case_overrides()))
    official.load_official(expected, official.read_state_dict(OFFICIAL))
    assert m.hp == expected.hp and (tmp_path / 'official.th').is_file()
    for a, b in zip(m.weights, expected.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert not all(np.array_equal(a.numpy(), b.numpy())            # not a fresh model's weights
                   for a, b in zip(m.weights, vdvae.VDVAE(m.hp).weights))


def test_convert_preset_downloads_once_and_imports(tmp_path):
    flags = [f'--{k}={str(v).lower() if isinstance(v, bool) else v}' for k, v in case_overrides().items()]
    args = ['--preset=tiny', f'--url=file://{OFFICIAL}', f'--cache_dir={tmp_path / "cache"}', *flags]
    r = cli.run('convert.py', *args, f'--out={tmp_path / "a"}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'downloading file://' in r.stderr and (tmp_path / 'a' / 'hparams.json').is_file()
    r = cli.run('convert.py', *args, f'--out={tmp_path / "b"}')
    assert r.returncode == 0 and 'downloaded before' in r.stderr, r.stderr[-2000:]
    assert 'no released weights' in cli.error_line(cli.run('convert.py', '--preset=tiny', f'--out={tmp_path / "c"}'))
    assert 'differ' in cli.error_line(cli.run('convert.py', '--preset=cifar10', '--hparams=imagenet32',
                                              f'--out={tmp_path / "c"}'))
    assert 'already holds a checkpoint' in cli.error_line(cli.run('convert.py', *args, f'--out={tmp_path / "a"}'))
    assert not (tmp_path / 'c').exists()
