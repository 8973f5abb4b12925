"""dnnlib.util: classes by name, open_url (paths, file:// and a local http server with cache), atomic writes, log tee."""

import http.server
import sys
import threading

import pytest

from dnnlib import util


def test_construct_class_by_name_passes_args_and_kwargs():
    obj = util.construct_class_by_name([('a', 1)], class_name='collections.OrderedDict', b=2)
    assert type(obj).__name__ == 'OrderedDict'
    assert list(obj.items()) == [('a', 1), ('b', 2)]


def test_get_obj_by_name_resolves_nested_attributes():
    assert util.get_obj_by_name('os.path.join') is __import__('os').path.join
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is util.EasyDict


@pytest.mark.parametrize('name', ['no_such_module.Thing', 'dnnlib.util.NoSuchClass', ''])
def test_unknown_class_name_raises_value_error_naming_it(name):
    with pytest.raises(ValueError, match='cannot find|not a dotted'):
        util.construct_class_by_name(class_name=name)


def test_easydict_items_are_attributes():
    d = util.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    with pytest.raises(AttributeError):
        d.missing


def test_open_url_reads_local_path(tmp_path):
    path = tmp_path / 'data.bin'
    path.write_bytes(b'\x00\x01payload')
    with util.open_url(str(path)) as f:
        assert f.read() == b'\x00\x01payload'
    with util.open_url(path) as f:
        assert f.read() == b'\x00\x01payload'


def test_open_url_reads_file_url(tmp_path):
    path = tmp_path / 'with space.bin'
    path.write_bytes(b'file-url')
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'file-url'


def test_open_url_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.bin'):
        util.open_url(str(tmp_path / 'missing.bin'))


def test_open_url_rejects_unknown_scheme():
    with pytest.raises(ValueError, match='ftp'):
        util.open_url('ftp://example.com/x.bin')


@pytest.fixture
def http_server():
    """A local HTTP server serving /weights.bin and counting the requests it answers."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == '/weights.bin':
                body = b'weights' * 1000
                self.send_response(200)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}', requests
    server.shutdown()
    server.server_close()


def test_open_url_downloads_once_then_reads_from_cache(http_server, tmp_path):
    base_url, requests = http_server
    url = base_url + '/weights.bin'
    for _ in range(2):
        with util.open_url(url, cache_dir=tmp_path, verbose=False) as f:
            assert f.read() == b'weights' * 1000
    assert requests == ['/weights.bin']
    assert [p.name.endswith('_weights.bin') for p in tmp_path.iterdir()] == [True]


def test_open_url_default_cache_dir_comes_from_environment(http_server, tmp_path, monkeypatch):
    base_url, _ = http_server
    monkeypatch.setenv('FDM_CACHE_DIR', str(tmp_path / 'cache'))
    with util.open_url(base_url + '/weights.bin', verbose=False) as f:
        f.read()
    assert len(list((tmp_path / 'cache').iterdir())) == 1


def test_open_url_without_cache_writes_nothing(http_server, tmp_path):
    base_url, _ = http_server
    with util.open_url(base_url + '/weights.bin', cache_dir=tmp_path, cache=False) as f:
        assert f.read() == b'weights' * 1000
    assert list(tmp_path.iterdir()) == []


def test_failed_download_names_the_url_and_leaves_no_cache_file(http_server, tmp_path):
    base_url, _ = http_server
    url = base_url + '/missing.bin'
    with pytest.raises(util.DownloadError, match=f'{url}.*404'):
        util.open_url(url, cache_dir=tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    path = tmp_path / 'snapshot.pkl'
    path.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with util.atomic_write(path, 'wb') as f:
            f.write(b'half of the new')
            raise RuntimeError('interrupted')
    assert path.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['snapshot.pkl']


def test_atomic_write_replaces_file(tmp_path):
    path = tmp_path / 'stats.json'
    with util.atomic_write(path, 'w') as f:
        f.write('{}')
    assert path.read_text() == '{}'


def test_logger_tees_stdout_and_stderr_and_restores_them(tmp_path, capsys):
    log_path = tmp_path / 'log.txt'
    stdout, stderr = sys.stdout, sys.stderr
    with util.Logger(str(log_path), file_mode='w'):
        print('to stdout')
        print('to stderr', file=sys.stderr)
    assert sys.stdout is stdout and sys.stderr is stderr
    assert log_path.read_text() == 'to stdout\nto stderr\n'
    captured = capsys.readouterr()
    assert captured.out == 'to stdout\n' and captured.err == 'to stderr\n'


@pytest.mark.parametrize('seconds, text', [(5, '5s'), (185, '3m 05s'), (7385, '2h 03m 05s'), (93784, '1d 02h 03m')])
def test_format_time(seconds, text):
    assert util.format_time(seconds) == text
