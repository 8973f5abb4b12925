"""The repository stands on its own: no file refers to documents or fixtures outside it, and the pointers
into docs/ and the links between its markdown files resolve."""

import os
import re
import subprocess

import pytest

from conftest import REPO_ROOT

# Spelled so that this file does not match itself.
OUTSIDE_REFERENCES = re.compile(r'\.\./shared|shared[\'"]?\s*[/\\]\s*[\'"]?reference|parent\s*/\s*[\'"]shared[\'"]|SPEC\.md|SPEC\s*§')
CHECKED_SUFFIXES = ('.py', '.sh', '.md', '.yml', '.yaml', '.txt', '.ini', '.cfg', '.toml')
CHECKED_NAMES = ('Dockerfile', '.ci/run')
DOC_POINTER = re.compile(r'\b(docs/[\w-]+\.md)#([\w-]+)')
MARKDOWN_LINK = re.compile(r'\]\(([^)\s]+)\)')


def repository_files():
    """Tracked files plus new ones that git does not ignore; every file outside .git without git."""
    try:
        listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO_ROOT,
                                capture_output=True, check=True).stdout.decode().split('\0')
        paths = [path for path in listed if path]
    except (OSError, subprocess.CalledProcessError):  # an exported tree without git metadata
        paths = [os.path.relpath(os.path.join(folder, name), REPO_ROOT).replace(os.sep, '/')
                 for folder, dirs, names in os.walk(REPO_ROOT) if '.git' not in folder.split(os.sep) for name in names]
    return sorted(path for path in paths if (REPO_ROOT / path).is_file())


def checked_files():
    return [path for path in repository_files() if path.endswith(CHECKED_SUFFIXES) or path in CHECKED_NAMES
            or os.path.basename(path) == 'Dockerfile']


def outside_references(text):
    """(line number, line) of every line that refers to a document or fixture outside the repository."""
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if OUTSIDE_REFERENCES.search(line)]


def markdown_anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r'^#+\s+(.+?)\s*$', (REPO_ROOT / path).read_text(encoding='utf-8'), flags=re.M)
    return {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-') for heading in headings}


def test_the_scanner_catches_each_kind_of_outside_reference():
    planted = [line.format(S='shared', P='SPEC') for line in (
        'see ../{S}/STYLE.md', "REPO_ROOT.parent / '{S}' / 'reference'", 'fixtures in {S}/reference',
        "ROOT.parent / '{S}' / 'notes.txt'", 'as in {P}.md', '({P} §5)', '{P}§1–§2')]
    text = '\n'.join(planted[:2] + ['clean line'] + planted[2:])
    assert [number for number, _ in outside_references(text)] == [1, 2, 4, 5, 6, 7, 8]
    assert outside_references('docs/design.md#seeds and tests/fixtures/networks-fdm.pt') == []


def test_the_checked_files_include_sources_tests_docs_and_ci():
    files = checked_files()
    for expected in ('train.py', 'training/networks.py', 'tests/conftest.py', 'README.md', 'docs/design.md',
                     'docs/compatibility.md', 'tests/fixtures/README.md', 'Dockerfile', '.ci/run', 'requirements.txt'):
        assert expected in files


def test_no_file_refers_to_a_path_outside_the_repository():
    found = [f'{path}:{number}: {line}' for path in checked_files()
             for number, line in outside_references((REPO_ROOT / path).read_text(encoding='utf-8', errors='replace'))]
    assert not found, 'references outside the repository:\n' + '\n'.join(found)


def test_reference_fixtures_are_inside_the_repository():
    for name in ('networks-fdm.pt', 'networks-edm.pt', 'samplers-fdm.pt', 'samplers-edm.pt'):
        assert (REPO_ROOT / 'tests' / 'fixtures' / name).is_file(), name


def test_pointers_into_docs_name_existing_sections():
    broken = []
    for path in checked_files():
        for document, anchor in DOC_POINTER.findall((REPO_ROOT / path).read_text(encoding='utf-8', errors='replace')):
            if not (REPO_ROOT / document).is_file() or anchor not in markdown_anchors(document):
                broken.append(f'{path}: {document}#{anchor}')
    assert not broken, 'pointers to missing docs sections:\n' + '\n'.join(broken)


@pytest.mark.parametrize('path', [path for path in checked_files() if path.endswith('.md')])
def test_markdown_links_stay_inside_the_repository_and_resolve(path):
    source = REPO_ROOT / path
    for target in MARKDOWN_LINK.findall(source.read_text(encoding='utf-8')):
        if re.match(r'[a-z]+:', target) or target.startswith('#'):
            continue
        file_part, _, anchor = target.partition('#')
        resolved = (source.parent / file_part).resolve()
        assert resolved.is_relative_to(REPO_ROOT), f'{path}: link {target} leaves the repository'
        assert resolved.exists(), f'{path}: link {target} points to nothing'
        if anchor and resolved.suffix == '.md':
            assert anchor in markdown_anchors(resolved.relative_to(REPO_ROOT)), f'{path}: no section #{anchor} in {file_part}'
