"""A script's command line run many times, fast: one process imports the script (and
TensorFlow) once, then forks a child per command line, which runs `main` as `python script
args...` would, with its own stdout, stderr, exit status, working directory and environment.
The property tests of the command lines make hundreds of runs, and tests/cli.py runs the
scripts this way; a fresh interpreter per run would cost seconds each.

    python tests/forked.py [--offline] train.py   # one JSON request per line in, one answer out

Requests: `start` (fork a child: answers its pid, which the client may signal) and `wait` (its
exit status, or null if it still runs after `timeout` seconds). --offline cuts the network as
tests/offline.py does, before the first fork.
"""
import importlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Script:
    """The client: `Script('train.py').run(args, cwd)` -> (exit status, stdout, stderr), or
    `.start(args, cwd)` -> a Child, which is to a fork what subprocess.Popen is to a process."""

    def __init__(self, script, offline=False):
        self.script = script
        self.streams = tempfile.mkdtemp(prefix='forked-')           # the runs' stdout and stderr
        self.names = itertools.count()
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

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + '\n')
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f'the fork server of {self.script} died')
        return json.loads(answer)

    def start(self, args, cwd, env=None, output=None):
        """A child running `script args` in `cwd` with `env` added to the environment; its stdout
        and stderr both go to the file `output` if given, else to files of their own."""
        n = next(self.names)
        if output:
            open(output, 'w').close()       # there to read from the moment start returns
        out, err = (output, output) if output else (os.path.join(self.streams, f'{n}.{s}') for s in ('out', 'err'))
        pid = self.ask(op='start', args=list(args), cwd=str(cwd), out=out, err=err, env=env or {})['pid']
        return Child(self, pid, out, err, keep=bool(output))

    def run(self, args, cwd, timeout=30, env=None):
        child = self.start(args, cwd, env)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            child.returncode = 'timeout'
        return (child.returncode, *child.communicate())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.streams, ignore_errors=True)


class Child:
    """A forked run, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, script, pid, out, err, keep):
        self.script, self.pid, self.out, self.err, self.keep = script, pid, out, err, keep
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.script.ask(op='wait', pid=self.pid, timeout=0)['code']
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = self.script.ask(op='wait', pid=self.pid, timeout=timeout)['code']
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.script.script, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """(stdout, stderr) once the child has exited; its stream files are then removed."""
        self.wait(timeout)
        with open(self.out) as f, open(self.err) as g:
            out, err = f.read(), g.read()
        if not self.keep:
            for path in {self.out, self.err}:
                os.remove(path)
        return out, err


def _child(module, script, request):
    os.chdir(request['cwd'])
    os.environ.update(request['env'])
    streams = {path: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for path in {request['out'], request['err']}}
    for fd, path in ((1, request['out']), (2, request['err'])):
        os.dup2(streams[path], fd)
    if os.environ.get('PYTHONUNBUFFERED'):      # read at start-up by `python`; here, now
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)
    sys.argv = [os.path.join(ROOT, script)] + request['args']
    # What `python script` makes of the script for absl's --help: the main module, whose flags
    # absl files under sys.argv[0] (imported, they are under the module's name).
    sys.modules['__main__'] = module
    from absl import flags
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    import console
    try:
        console.run(module.main)
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


def _wait(pid, timeout, exited):
    """The child's exit status as Popen reports it (-N: killed by signal N); None while it runs
    past `timeout` seconds (None: as long as it takes)."""
    deadline = None if timeout is None else time.time() + timeout
    while pid not in exited:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exited[pid] = os.waitstatus_to_exitcode(status)
        elif deadline is not None and time.time() >= deadline:
            return None
        else:
            time.sleep(0.01)
    return exited[pid]


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
    exited = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request['op'] == 'start':
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(module, script, request)
            answer = dict(pid=pid)
        else:
            answer = dict(code=_wait(request['pid'], request['timeout'], exited))
        print(json.dumps(answer), flush=True)


if __name__ == '__main__':
    serve(sys.argv[-1], offline='--offline' in sys.argv[1:-1])
