"""A fresh install with no network: runs one of the project's scripts with every HTTP request
refused at once (and chosen modules missing), so tests can follow tfds's real download path
as far as it goes without a network, and no further.

    python tests/offline.py [--missing=MODULE]... SCRIPT [ARGS...]

tfds downloads with `requests`; each request is refused in `HTTPAdapter.send`, before any
connection and without urllib3's retries (which wait about 3 minutes when the network is
really down), and its URL is printed to stderr as `offline: GET URL`, so a test can check
which file the run was about to download."""
import os
import runpy
import sys


def cut_network(attempted=None):
    """Refuse every `requests` HTTP request from now on; their URLs go to `attempted` (a list)
    and to stderr. Returns the original `send`, to put back."""
    import requests
    original = requests.adapters.HTTPAdapter.send

    def send(self, request, **kwargs):
        if attempted is not None:
            attempted.append(request.url)
        # one write for the whole line: print() writes the text and its newline separately, and
        # tfds downloads in threads, so the main thread's error line could land between them
        sys.stderr.write(f'offline: {request.method} {request.url}\n')
        sys.stderr.flush()
        raise requests.exceptions.ConnectionError(f'tests/offline.py refused {request.url}')
    requests.adapters.HTTPAdapter.send = send
    return original


def main():
    args = sys.argv[1:]
    while args and args[0].startswith('--missing='):
        sys.modules[args.pop(0).split('=', 1)[1]] = None     # `import` of it now fails
    cut_network()
    sys.argv = args
    sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
    runpy.run_path(args[0], run_name='__main__')


if __name__ == '__main__':
    main()
