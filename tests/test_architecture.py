"""The import structure (docs/architecture.md): layers point one way, scripts are not libraries, no import circles."""

import ast

from conftest import REPO_ROOT

SCRIPTS = ('train', 'generate', 'fid', 'dataset_tool', 'reconstruct_ema', 'plot_runs')
PACKAGES = ('training', 'torch_utils', 'dnnlib', 'benchmarks')


def module_name(path):
    parts = list(path.relative_to(REPO_ROOT).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def project_modules():
    """{module name: path} of the scripts and the packages' modules (tests excluded: they may run scripts)."""
    paths = [REPO_ROOT / f'{script}.py' for script in SCRIPTS]
    paths += [path for package in PACKAGES for path in sorted((REPO_ROOT / package).rglob('*.py'))]
    return {module_name(path): path for path in paths}


def imported_modules(name, path, modules):
    """Project modules that `name` imports anywhere in its file (also inside functions)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            candidates = [f'{base}.{alias.name}' for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition('.')[0]
            if candidate and candidate != name:
                found.add(candidate)
                break
    return found


def import_graph():
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_torch_utils_and_dnnlib_do_not_import_training():
    offenders = {name: sorted(m for m in imports if m.split('.')[0] == 'training')
                 for name, imports in import_graph().items() if name.split('.')[0] in ('torch_utils', 'dnnlib')}
    assert not {name: found for name, found in offenders.items() if found}


def test_no_module_imports_a_script():
    offenders = {name: sorted(set(imports) & set(SCRIPTS)) for name, imports in import_graph().items()}
    assert not {name: found for name, found in offenders.items() if found}


def test_no_import_cycle_among_project_modules():
    graph = import_graph()
    state = {}  # module → 'visiting' | 'done'
    cycles = []

    def visit(name, path):
        state[name] = 'visiting'
        for imported in sorted(graph[name]):
            if state.get(imported) == 'visiting':
                cycles.append(path[path.index(imported):] + [imported] if imported in path else [name, imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[name] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles


def test_the_checks_see_the_imports():
    graph = import_graph()
    assert 'training.networks' in graph['training.checkpoints']
    assert 'training.cli' in graph['generate'] and 'training.cli' in graph['fid']
    assert 'dnnlib.util' in graph['dnnlib']  # a relative import


def test_no_library_module_imports_the_command_line_module():
    # training/cli.py is the option layer of generate.py and fid.py; library code must not depend on it.
    offenders = {name: 'training.cli' for name, imports in import_graph().items()
                 if name.split('.')[0] in ('training', 'torch_utils', 'dnnlib') and name != 'training.cli'
                 and 'training.cli' in imports}
    assert not offenders


# The training side's library modules: their messages speak of values; training/launch.py names the options.
TRAINING_LIBRARY = ('training/training_loop.py', 'training/run_control.py', 'training/divergence.py', 'training/ema.py', 'training/ticks.py',
                    'training/run_dir.py', 'training/snapshot_metrics.py')


def string_literals(path):
    """Every string constant of a file that is not a docstring (f-strings included, by their constant parts)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_training_library_messages_name_no_command_line_option():
    import re
    offenders = {path: found for path in TRAINING_LIBRARY
                 if (found := [text for text in string_literals(REPO_ROOT / path) if re.search(r'--[a-z]', text)])}
    assert not offenders
