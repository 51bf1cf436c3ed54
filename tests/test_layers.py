"""The layers of the project, read from its import statements (function-level ones included):
commands sit on library modules and never import each other, and no module imports itself
back through others."""
import ast
import os

import cli

COMMANDS = {'train', 'sample', 'convert', 'compress', 'bench', 'bench_quality'}


def _imports():
    modules = {f[:-3] for f in os.listdir(cli.ROOT) if f.endswith('.py')}
    graph = {}
    for m in modules:
        found = set()
        for node in ast.walk(ast.parse(open(os.path.join(cli.ROOT, m + '.py')).read())):
            if isinstance(node, ast.Import):
                found |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split('.')[0])
        graph[m] = found & modules - {m}
    return graph


def _circle(graph):
    """One import circle as a list of modules, or None."""
    done, path = set(), []

    def visit(m):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        path.append(m)
        for d in sorted(graph[m]):
            if found := visit(d):
                return found
        path.pop()
        done.add(m)
        return None

    return next((c for m in sorted(graph) if (c := visit(m))), None)


def test_commands_import_only_library_modules():
    graph = _imports()
    assert COMMANDS <= set(graph)
    assert {m: graph[m] & COMMANDS for m in COMMANDS if graph[m] & COMMANDS} == {}


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert _circle(graph) is None, ' -> '.join(_circle(graph))
    # The check can see one: the model and the release's format once imported each other.
    assert _circle(dict(graph, official=graph['official'] | {'model'})) is not None


def test_configuration_and_errors_stand_below_everything():
    graph = _imports()
    assert graph['errors'] == set() and graph['hparams'] == {'errors'}
    assert graph['tfds_source'] == {'errors'}
