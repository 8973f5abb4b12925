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
    assert 'training.networks' in graph['training.safe_pickle']
    assert 'training.cli' in graph['generate'] and 'training.cli' in graph['fid']
    assert 'dnnlib.util' in graph['dnnlib']  # a relative import


# The model reads like the paper: device- and autograd-specific kernels live in torch_utils/ops.py.

MODEL_MODULES = ('training/networks.py', 'training/layers.py', 'training/unets.py')
AUTOGRAD_MODES = {'is_grad_enabled', 'is_inference_mode_enabled', 'is_inference', 'no_grad', 'enable_grad',
                  'inference_mode', 'set_grad_enabled'}
DEVICE_TESTS = {'is_cuda', 'is_cpu', 'is_mps', 'cuda', 'backends'}
DEVICE_NAMES = {'cpu', 'cuda', 'mps', 'xpu'}


def device_and_autograd_branches(source):
    """(line, what) for each place where `source` asks for the device or the autograd mode, names a device, or,
    inside a forward method, writes into a tensor (`inplace=`, `out=`, `x.add_(...)`)."""
    found = []
    tree = ast.parse(source)
    forwards = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == 'forward']
    in_forward = {id(inner) for node in forwards for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == 'type' and isinstance(node.value, ast.Attribute) and node.value.attr == 'device':
                found.append((node.lineno, '.device.type'))
            elif node.attr in AUTOGRAD_MODES or node.attr in DEVICE_TESTS:
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in DEVICE_NAMES:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Call) and id(node) in in_forward:
            if any(keyword.arg in ('inplace', 'out') for keyword in node.keywords):
                found.append((node.lineno, 'in-place keyword'))
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr.endswith('_') and not func.attr.startswith('_'):
                found.append((node.lineno, f'.{func.attr}()'))
    return found


def test_model_modules_have_no_device_or_autograd_mode_branches():
    offenders = {path: device_and_autograd_branches((REPO_ROOT / path).read_text()) for path in MODEL_MODULES}
    assert not {path: found for path, found in offenders.items() if found}


def test_the_branch_check_finds_each_kind_of_branch():
    source = '''
class Block:
    def forward(self, x):
        inplace = not torch.is_grad_enabled()
        x = F.silu(x, inplace=inplace)
        if x.device.type == 'cuda' and x.is_cuda:
            x = torch.addcmul(x, x, x, out=x)
        return x.add_(1)
'''
    kinds = {what for _, what in device_and_autograd_branches(source)}
    assert kinds == {'is_grad_enabled', 'in-place keyword', '.device.type', "'cuda'", 'is_cuda', '.add_()'}


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
