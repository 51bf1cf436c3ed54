"""A script's command line run many times, fast: one process imports the script (and
TensorFlow) once, then forks a child per command line, which runs `main` as `python script
args...` would, with its own stdout, stderr, exit status and working directory. The property
tests of the command lines make hundreds of runs, and tests/cli.py runs the scripts this way;
a fresh interpreter per run would cost seconds each.

    python tests/forked.py [--offline] train.py   # one JSON request per line in, one answer out

--offline cuts the network as tests/offline.py does, before the first fork.
"""
import importlib
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Script:
    """The client: `Script('train.py').run(args, cwd)` -> (exit status, stdout, stderr)."""

    def __init__(self, script, offline=False):
        self.script = script
        self.streams = tempfile.mkdtemp(prefix='forked-')           # a run's stdout and stderr
        with open(os.path.join(self.streams, 'server'), 'w') as log:     # the server's own stderr
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *['--offline'] * offline, script],
                                         cwd=ROOT, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
        first = self.proc.stdout.readline()
        if not first:               # e.g. the script does not import: say why, as `python script` would
            said = open(os.path.join(self.streams, 'server')).read()[-3000:]
            shutil.rmtree(self.streams, ignore_errors=True)
            raise RuntimeError(f'{script} did not start:\n{said}')
        self.flags = json.loads(first)      # the flags the script defines

    def run(self, args, cwd, timeout=30):
        out, err = os.path.join(self.streams, 'stdout'), os.path.join(self.streams, 'stderr')
        self.proc.stdin.write(json.dumps(dict(args=list(args), cwd=cwd, out=out, err=err, timeout=timeout)) + '\n')
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f'the fork server of {self.script} died')
        with open(out) as f, open(err) as g:
            return json.loads(answer)['code'], f.read(), g.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.streams, ignore_errors=True)


def _child(module, script, request):
    os.chdir(request['cwd'])
    for fd, path in ((1, request['out']), (2, request['err'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [os.path.join(ROOT, script)] + request['args']
    # What `python script` makes of the script for absl's --help: the main module, whose flags
    # absl files under sys.argv[0] (imported, they are under the module's name).
    sys.modules['__main__'] = module
    from absl import flags
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    import hparams
    try:
        hparams.run(module.main)
        code = 0
    except SystemExit as e:         # as the interpreter would report it
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 -- what an uncaught exception does to `python script`
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(script, offline=False):
    if offline:
        from offline import cut_network
        cut_network()
    sys.path.insert(0, ROOT)
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])     # tests/ is on the path
    module.define_flags()
    from absl import flags
    ours = {module.__name__, 'hparams'}
    print(json.dumps(sorted(f.name for name, defined in flags.FLAGS.flags_by_module_dict().items()
                            if os.path.splitext(os.path.basename(name))[0] in ours for f in defined)), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(module, script, request)
        deadline, code = time.time() + request['timeout'], None
        while code is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = 'timeout'
            else:
                time.sleep(0.01)
        print(json.dumps(dict(code=code)), flush=True)


if __name__ == '__main__':
    serve(sys.argv[-1], offline='--offline' in sys.argv[1:-1])
