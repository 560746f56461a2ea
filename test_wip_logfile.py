"""Tests for logfile_out and the module templates (Python and sh).

Run:  python3 -m pytest -q test_wip_logfile.py
(LOOPER_PYTHON chooses the interpreter that runs looper.py and the modules.)

The test_logfile_out_* tests of test_looper.py's TestModules that this file
replaces are named in each replacing test's docstring ("Replaces ...").
"""
import errno
import importlib.machinery
import importlib.util
import io
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_looper import (wait_until, need, write, config, read, run, counters, PY, HERE,
                         MODULES, EXAMPLES, DEADLINE, FAST, tmp, py_module, RECORDER, recorded,
                         proc_state)

LOGFILE_OUT = os.path.join(MODULES, 'logfile_out')
SYSLOG_IN = os.path.join(MODULES, 'syslog_in')
TEMPLATES = os.path.join(EXAMPLES, 'modules')
PREVIOUS = '199e3db'        # the commit of the logfile_out before the skeleton: same bytes out
TIME = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$')
BLOCK_START = '# ----- Looper module protocol: the same, byte for byte, in every shipped module -----\n'
BLOCK_END = '# ----- end of the Looper module protocol -----\n'


##############################################################################
# Helpers
##############################################################################

def lf_input(text, **keys):
    """Protocol bytes for an output module: the keys, configure, text."""
    head = ''.join('%s=%s\n' % item for item in sorted(keys.items())) + 'configure\n'
    return (head + text).encode('utf-8', 'surrogateescape')


def lf_run(directory, text, tail='quit\n', module=LOGFILE_OUT, argv=(), env=None,
           preexec_fn=None, interpreter=None, **keys):
    """Run an output module to completion on keys, configure, text, tail;
    returns the CompletedProcess (bytes)."""
    keys.setdefault('filename', 'out.log')
    command = [interpreter or PY, module] + list(argv)
    p = subprocess.run(command, input=lf_input(text + tail, **keys), cwd=directory, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE,
                       preexec_fn=preexec_fn)
    assert b'Traceback' not in p.stderr, p.stderr.decode('utf-8', 'replace')
    return p


def file_lines(path, growing=False):
    """The lines of a logfile_out logfmt file as (time, rest) pairs; while
    it may still grow, a last line without its newline is left out."""
    try:
        with open(path, 'rb') as f:
            lines = f.read().decode('utf-8', 'surrogateescape').split('\n')
    except OSError:
        return []
    last = lines.pop()
    assert growing or last == '', 'the last line has no newline: %r' % last[-200:]
    return [tuple(line.split(' ', 1)) if ' ' in line else (line, '') for line in lines]


_JSON_TIME = re.compile(r'^\{"time": "([^"]*)", ')


def without_times(data, form='logfmt'):
    """The lines of logfile_out output (bytes) with each line's time taken
    out (after checking that it is one), as a list of str."""
    lines = data.decode('utf-8', 'surrogateescape').split('\n')
    assert lines.pop() == ''
    out = []
    for line in lines:
        if form == 'json':
            m = _JSON_TIME.match(line)
            assert m and TIME.match(m.group(1)), line[:200]
            out.append('{' + line[m.end():])
        else:
            when, _, rest = line.partition(' ')
            assert TIME.match(when), line[:200]
            out.append(rest)
    return out


def load_module(path, name):
    """A module file's functions, without running its main()."""
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def previous_version(directory):
    """The logfile_out of commit PREVIOUS, written to directory; skips
    where git or that commit is not there (a copy without history)."""
    try:
        p = subprocess.run(['git', 'show', '%s:modules/logfile_out' % PREVIOUS], cwd=HERE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
    except OSError:
        p = None
    if p is None or p.returncode != 0:
        pytest.skip('commit %s (the previous logfile_out) is not available' % PREVIOUS)
    path = os.path.join(directory, 'logfile_out.previous')
    with open(path, 'wb') as f:
        f.write(p.stdout)
    os.chmod(path, 0o755)
    return path


def declaration(path):
    """The `# /// looper` block of a module file, as a dict."""
    with open(path) as f:
        text = f.read()
    m = re.search(r'^# /// looper\n((?:#.*\n)*?)# ///\n', text, re.M)
    assert m, 'no declaration in %s' % path
    out = {}
    for line in m.group(1).splitlines():
        m2 = re.match(r"^# (\w+) = '([^']*)'\s*(#.*)?$", line)
        assert m2, 'a declaration line that is not  # key = \'value\': %r' % line
        out[m2.group(1)] = m2.group(2)
    return out


def protocol_block(path):
    with open(path) as f:
        text = f.read()
    start = text.index(BLOCK_START)
    return text[start:text.index(BLOCK_END, start) + len(BLOCK_END)]


# Values and token names with every character that matters to logfmt,
# JSON or the framing: quoting, escapes, Unicode spaces, surrogates (bytes
# that are not UTF-8), words that are protocol commands.
ODD_VALUES = ['x', 'plain', '', ' ', 'a b', '"', 'say "hi"', '\\', 'C:\\dir', '=', 'a=b', 'go',
              'quit', 'configure', '\t', 'a\tb', '\x00', '\x01', '\x1f', '\x7f', '\x85', '\xa0',
              '\u1680', '\u2000', '\u200a', '\u200b', '\u2028', '\u2029', '\u202f', '\u205f',
              '\u3000', 'caf\u00e9', '\U0001f600', '\udcff', 'x\udcfe\udcff', 'line1\\nline2',
              '\\r', '{}', '[1, 2]', '"}, {"', '"}}', 'null', 'ok', 'error x', '-',
              'x' * 300, '\u00e9' * 50]
ODD_KEYS = ['k', 'node', 'go', 'quit', 'a b', 'q"k', 'b\\k', '\u00e9', 'time', 'tokens', '',
            '\t', 'k\udcff']


def odd_events(rng, count, odd_lines=True):
    """Protocol text of `count` events made of ODD_VALUES and ODD_KEYS, a
    repeated token now and then; with odd_lines, also lines that are not
    token=value (skipped and reported), blank lines and empty events."""
    out = []
    for i in range(count):
        if odd_lines and rng.random() < 0.02:
            out.append(rng.choice(['', 'nonsense', 'go', 'a\r', ' ']) + '\n')
        n = rng.randrange(0, 8) if odd_lines else rng.randrange(1, 8)
        for j in range(n):
            key = rng.choice(ODD_KEYS) if rng.random() < 0.3 else 'k%d' % j
            if odd_lines is False and key == '':
                key = 'k'
            value = rng.choice(ODD_VALUES)
            if rng.random() < 0.3:
                value = value + rng.choice(ODD_VALUES)
            out.append('%s=%s\n' % (key, value))
        out.append('go\n')
    return ''.join(out)


def sample_events(directory):
    """The bundled sample log's events, as syslog_in writes them."""
    p = subprocess.run([PY, SYSLOG_IN], input=('logfile=%s\n' % os.path.join(EXAMPLES, 'sample.log'))
                       .encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=directory,
                       timeout=DEADLINE)
    assert p.returncode == 0 and p.stdout.count(b'\ngo\n') > 10, p.stderr
    return p.stdout.decode('utf-8', 'surrogateescape')


class Stream(object):
    """Collects what a process writes on one pipe, in a thread."""

    def __init__(self, stream):
        self.data = b''
        self.closed = False
        self._stream = stream
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True
        self._thread.start()

    def _run(self):
        while True:
            chunk = os.read(self._stream.fileno(), 65536)
            if not chunk:
                self.closed = True
                return
            self.data += chunk


class Module(object):
    """A module running in the background, its stdin open; stop() kills it
    if it is still there."""

    def __init__(self, argv, directory, env=None, pass_fds=(), preexec_fn=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=directory, env=env,
                                     pass_fds=pass_fds, preexec_fn=preexec_fn)
        self.out = Stream(self.proc.stdout)
        self.err = Stream(self.proc.stderr)

    def send(self, text):
        self.proc.stdin.write(text.encode('utf-8', 'surrogateescape') if isinstance(text, str) else text)
        self.proc.stdin.flush()

    def answers(self):
        return self.out.data.decode('utf-8', 'replace').splitlines()

    def wait_answers(self, count):
        return wait_until(lambda: len(self.answers()) >= count and self.answers(),
                          what='%d answers (have %r, stderr %r)' % (count, self.out.data[-300:],
                                                                   self.err.data[-300:]))

    def wait_exit(self, timeout=DEADLINE):
        return self.proc.wait(timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except (OSError, ValueError):
                pass


def logfile_out(directory, env=None, pass_fds=(), preexec_fn=None):
    return Module([PY, LOGFILE_OUT], directory, env=env, pass_fds=pass_fds, preexec_fn=preexec_fn)


def limit_file_size(size):
    """A preexec_fn: writes past `size` bytes fail with EFBIG (Python
    ignores SIGXFSZ, so the write fails instead of killing the process)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


class FakeText(object):
    """Stands in for stdin in the writers of both versions: the chunks of
    text one read at a time (new: text(); previous: read())."""

    def __init__(self, chunks):
        self.chunks = list(chunks)

    def text(self):
        return self.chunks.pop(0) if self.chunks else None

    read = text


class FakeFile(object):
    path = 'fake'

    def __init__(self):
        self.data = b''

    def write(self, data):
        self.data += data

    def close(self):
        pass


def format_with(module, form, chunks, now='2026-11-22T07:39:24+00:00'):
    """What a version's writer makes of text arriving in these chunks
    (without confirm), with a fixed time: the bytes written, in order."""
    destination = FakeFile()
    writer = module._Writer(destination, form, False)
    writer.now = lambda: now
    stderr, sys.stderr = sys.stderr, io.StringIO()     # its reports of odd lines
    try:
        writer.run(chunks[0], FakeText(chunks[1:]))
    finally:
        sys.stderr = stderr
    return destination.data


def cut(rng, text, pieces):
    """text cut at random places into complete lines, as reads bring them."""
    lines = [line + '\n' for line in text.split('\n')[:-1]]     # (not splitlines: \u2028...)
    if not lines:
        return [text]
    marks = sorted(rng.sample(range(1, len(lines) + 1), min(pieces, len(lines))))
    out, start = [], 0
    for mark in marks + [len(lines)]:
        out.append(''.join(lines[start:mark]))
        start = mark
    return [piece for piece in out if piece] or ['']


##############################################################################
# logfile_out on its own
##############################################################################

class TestLogfileOut(object):

    # -- the skeleton -------------------------------------------------------

    def test_declaration(self):
        d = declaration(LOGFILE_OUT)
        assert d['kind'] == 'output'
        assert d['keys'].split() == ['filename', 'format']
        assert d['confirm'] == 'yes'
        assert int(d['confirmwindow']) >= 100       # confirming costs one answer per read
        assert os.stat(LOGFILE_OUT).st_mode & 0o777 == 0o755
        with open(LOGFILE_OUT) as f:
            first = f.readline()
        assert first == '#!/usr/bin/env python3\n'

    def test_protocol_block_is_the_templates(self):
        block = protocol_block(os.path.join(TEMPLATES, 'template_out'))
        assert protocol_block(LOGFILE_OUT) == block
        assert protocol_block(os.path.join(TEMPLATES, 'template_in')) == block

    def test_help_prints_the_docstring_and_starts_nothing(self, tmp):
        p = subprocess.run([PY, LOGFILE_OUT, '--help'], cwd=tmp, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 0 and p.stderr == b''
        text = p.stdout.decode()
        assert text.startswith('logfile_out: a Looper output module')
        for key in ('filename', 'format', 'confirm'):
            assert re.search(r'^  %s ' % key, text, re.M), key
        assert '78' in text and 'Exit status' in text
        assert os.listdir(tmp) == []

    def test_help_examples_work_when_copied(self, tmp):
        """The by-hand examples, as --help prints them, run by sh."""
        p = subprocess.run([PY, LOGFILE_OUT, '--help'], stdout=subprocess.PIPE, timeout=DEADLINE)
        examples = [line.strip() for line in p.stdout.decode().splitlines()
                    if line.strip().startswith('printf ')]
        assert len(examples) == 2
        os.mkdir(os.path.join(tmp, 'modules'))
        os.symlink(LOGFILE_OUT, os.path.join(tmp, 'modules', 'logfile_out'))
        results = [subprocess.run(['/bin/sh', '-c', line.replace('python3 ', PY + ' ')], cwd=tmp,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
                   for line in examples]
        assert [r.returncode for r in results] == [0, 0] and results[0].stderr == b''
        out = results[0].stdout.decode().splitlines()
        assert out[0] == 'ok' and out[2] == 'ok' and len(out) == 3
        assert TIME.match(out[1].split(' ')[0]) and out[1].endswith(' node=gw1 desc="hello world"')
        assert results[1].stdout == b''
        assert [rest for when, rest in file_lines(os.path.join(tmp, 'out.log'))] == ['node=gw1']

    def test_arguments_are_a_configuration_error(self, tmp):
        p = subprocess.run([PY, LOGFILE_OUT, 'out.log'], cwd=tmp, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 78 and p.stdout == b''
        assert p.stderr.startswith(b'<3>logfile_out: takes no arguments')

    def test_configuration_errors_exit_78(self, tmp):
        """Replaces test_logfile_out_configuration_errors (exit 1 then)."""
        os.mkdir(os.path.join(tmp, 'adir'))
        cases = [({}, "no filename configured"),
                 ({'filename': ''}, "no filename configured"),
                 ({'filename': 'x', 'format': 'xml'}, "format must be 'logfmt' or 'json', not 'xml'"),
                 ({'filename': 'x', 'confirm': 'perhaps'}, "confirm must be yes or no, not 'perhaps'"),
                 ({'filename': '/nonexistent/dir/x.out'}, "cannot open '/nonexistent/dir/x.out': No such file"),
                 ({'filename': 'no/such/dir/x.log'}, "cannot open 'no/such/dir/x.log'"),
                 ({'filename': 'adir'}, "cannot open 'adir': Is a directory"),
                 ({'filename': 'out.log/x'}, "cannot open 'out.log/x': Not a directory")]
        write(os.path.join(tmp, 'out.log'), '')
        for keys, message in cases:
            p = subprocess.run([PY, LOGFILE_OUT], input=lf_input('a=1\ngo\n', **keys), cwd=tmp,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
            assert p.returncode == 78, (keys, p.stderr)
            assert p.stdout == b'', keys                     # no `ok`: not ready
            err = p.stderr.decode()
            assert err.startswith('<3>logfile_out: ') and message in err, (keys, err)
            assert err.count('\n') == 1, err
        assert sorted(os.listdir(tmp)) == ['adir', 'out.log']

    def test_dash_with_a_bad_looper_stdout_fd_exits_78(self, tmp):
        for value in ('x', '99'):
            env = dict(os.environ, LOOPER_STDOUT_FD=value)
            p = subprocess.run([PY, LOGFILE_OUT], input=lf_input('a=1\ngo\n', filename='-'), env=env,
                               cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=DEADLINE)
            assert p.returncode == 78 and p.stdout == b''
            assert b'LOOPER_STDOUT_FD (%s) is not an open descriptor' % value.encode() in p.stderr

    # -- what it writes -----------------------------------------------------

    def test_logfmt_quoting(self, tmp):
        """Replaces test_logfile_out_logfmt_quoting (no `ok` then: the default
        was confirm = no)."""
        p = lf_run(tmp, 'plain=abc\nspace=a b\nempty=\nquote=say "hi"\n'
                        'back=C:\\dir\nequals=a=b\ntab=a\tb\nnl=line1\\nline2\ngo\n')
        assert p.returncode == 0 and p.stdout == b'ok\nok\n' and p.stderr == b''
        (when, rest), = file_lines(os.path.join(tmp, 'out.log'))
        assert TIME.match(when), when
        assert rest == ('plain=abc space="a b" empty="" quote="say \\"hi\\"" back="C:\\\\dir" '
                        'equals="a=b" tab="a\tb" nl="line1\\\\nline2"')

    def test_json(self, tmp):
        p = lf_run(tmp, 'a=1\nb=x y\ngo\nc=\xff\udcfe\ngo\nd=caf\u00e9\nd=again\ne="}, {"\ngo\n',
                   format='json', confirm='no')
        assert p.returncode == 0 and p.stdout == b''
        with open(os.path.join(tmp, 'out.log'), 'rb') as f:
            lines = f.read().decode('utf-8').splitlines()            # valid UTF-8
        objects = [json.loads(line) for line in lines]
        assert [o['tokens'] for o in objects] == [{'a': '1', 'b': 'x y'}, {'c': '\xff\udcfe'},
                                                  {'d': 'again', 'e': '"}, {"'}]
        assert all(TIME.match(o['time']) for o in objects)
        assert lines[1] == '{"time": "%s", "tokens": {"c": "\\u00ff\\udcfe"}}' % objects[1]['time']

    def test_same_bytes_as_the_previous_version(self, tmp):
        """The bundled sample log's events and generated events with every
        odd character (odd lines, empty events and CRLF included), through
        the previous logfile_out and this one, confirm on and off, logfmt
        and json: the same lines, the time apart.  Replaces
        test_logfile_out_bulk_and_one_by_one_agree."""
        previous = previous_version(tmp)
        rng = random.Random(11)
        texts = [sample_events(tmp), odd_events(rng, 3000), odd_events(rng, 3000, odd_lines=False),
                 odd_events(rng, 200).replace('\n', '\r\n')]
        for number, text in enumerate(texts):
            for form in ('logfmt', 'json'):
                outputs = []
                for module, confirm in ((previous, 'no'), (previous, 'yes'), (LOGFILE_OUT, 'no'),
                                        (LOGFILE_OUT, 'yes')):
                    name = 'out-%d-%s-%s-%s.log' % (number, form, os.path.basename(module), confirm)
                    p = lf_run(tmp, text, module=module, filename=name, format=form, confirm=confirm)
                    assert p.returncode == 0, p.stderr
                    with open(os.path.join(tmp, name), 'rb') as f:
                        outputs.append(without_times(f.read(), form))
                assert outputs[0] == outputs[1] == outputs[2] == outputs[3], (number, form)
                assert len(outputs[0]) == sum(1 for line in text.split('\n') if line.rstrip('\r') == 'go')

    def test_same_bytes_however_the_reads_fall(self, tmp):
        """The writers of both versions, in this process, with a fixed time,
        on texts cut into reads at random lines: the bulk and one-by-one
        paths give the bytes of the previous version, whatever the cuts."""
        old = load_module(previous_version(tmp), 'logfile_out_previous')
        new = load_module(LOGFILE_OUT, 'logfile_out_new')
        rng = random.Random(7)
        for i in range(400):
            text = odd_events(rng, rng.randrange(1, 40), odd_lines=rng.random() < 0.3)
            for form in ('logfmt', 'json'):
                whole = format_with(old, form, [text])
                chunks = cut(rng, text, rng.randrange(1, 6))
                assert format_with(new, form, chunks) == whole, (form, chunks)
                assert format_with(old, form, chunks) == whole, (form, chunks)

    def test_bulk_paths_take_plain_text_and_refuse_the_rest(self):
        new = load_module(LOGFILE_OUT, 'logfile_out_new')
        now = '2026-11-22T07:39:24+00:00'
        for bulk in (new._logfmt_bulk, new._json_bulk):
            out, count, rest = bulk(now, 'a=1\nb=x y\ngo\nc=2\ngo\nd=')
            assert count == 2 and rest == 'd=' and out.count('\n') == 2
            assert bulk(now, 'd=1\n') == ('', 0, 'd=1\n')
            for text in ('go\n', 'a=1\ngo\ngo\n', 'a=1\nodd\ngo\n', 'a=1\n\ngo\n', 'a=1\r\ngo\n',
                         'a=1\ngo\nquit\n', 'a=1\ngo\nb=2\nodd\n'):
                assert bulk(now, text) is None, text
        assert new._json_bulk(now, 'a=\udcff\ngo\n') is None      # one by one: ASCII escapes
        assert new._logfmt_bulk(now, 'a=\0\ngo\n')[0] == now + ' a="\0"\n'
        assert new._logfmt_bulk(now, 'k\0=1\ngo\n') is None       # NUL outside quotes: one by one
        out, count, rest = new._logfmt_bulk(now, 'a=1\nb=2\ngo\nc=3\ngo\n')   # nothing quoted
        assert out == '%s a=1 b=2\n%s c=3\n' % (now, now) and count == 2

    # -- confirm ------------------------------------------------------------

    def test_confirm_is_the_default_and_ok_means_written(self, tmp):
        """Replaces test_logfile_out_flushes_each_event_without_quit (which
        also checked that nothing came on stdout: with confirm, `ok`s come)."""
        m = logfile_out(tmp)
        try:
            m.send('filename=out.log\nconfigure\n')
            assert m.wait_answers(1) == ['ok']
            assert os.path.exists(os.path.join(tmp, 'out.log'))         # ready = file open
            for i in range(3):
                m.send('n=%d\n' % i)
                m.send('go\n')
                assert m.wait_answers(i + 2) == ['ok'] * (i + 2)
                # confirmed means written: the line is in the file now
                assert file_lines(os.path.join(tmp, 'out.log'))[-1][1] == 'n=%d' % i
            assert m.proc.poll() is None
            m.send('quit\n')
            assert m.wait_exit() == 0 and m.err.data == b''
        finally:
            m.stop()

    def test_a_window_of_events_is_written_and_answered_together(self, tmp):
        """1000 events sent before any answer is read (Looper's
        confirmwindow): 1000 `ok`s in order, every line in the file, and a
        few write(2) calls for them all (counted in /proc/PID/io, not one
        per event: a file write and an answer write per read of stdin)."""
        events = ''.join('n=%d\nmsg=event number %d\ngo\n' % (i, i) for i in range(1000))
        m = logfile_out(tmp)
        try:
            m.send('filename=out.log\nconfigure\n')
            m.wait_answers(1)
            m.send(events)
            answers = m.wait_answers(1001)
            assert answers == ['ok'] * 1001
            lines = file_lines(os.path.join(tmp, 'out.log'))
            assert [rest for when, rest in lines] == ['n=%d msg="event number %d"' % (i, i)
                                                      for i in range(1000)]
            io = read('/proc/%d/io' % m.proc.pid)
            if 'syscw' not in io:
                pytest.skip('no /proc/PID/io here (task I/O accounting)')
            writes = int(re.search(r'^syscw: (\d+)$', io, re.M).group(1))
            # 38 KB of events: one or a few reads; 2 writes per read, 1 for configure.
            assert 3 <= writes <= 15, io
            m.send('quit\n')
            assert m.wait_exit() == 0
        finally:
            m.stop()

    def test_dev_full_answers_error_for_every_event_in_order(self, tmp):
        """Replaces test_logfile_out_confirm_error_then_same_event_again."""
        if not os.path.exists('/dev/full'):
            pytest.skip('no /dev/full')
        m = logfile_out(tmp)
        try:
            m.send('filename=/dev/full\nconfigure\n')
            m.wait_answers(1)
            m.send('a=1\ngo\nb=2\ngo\nc=3\ngo\n')
            answers = m.wait_answers(4)[1:]
            assert len(answers) == 3
            assert all(a == 'error /dev/full: No space left on device' for a in answers), answers
            m.send('a=1\ngo\n')                                      # Looper resends it
            assert m.wait_answers(5)[4].startswith('error ')
            m.send('quit\n')
            assert m.wait_exit() == 0                                # nothing lost: Looper has them
        finally:
            m.stop()

    def test_a_write_that_fails_half_way_answers_ok_then_error(self, tmp):
        """A file size limit (RLIMIT_FSIZE: EFBIG) that cuts the third line:
        ok, ok, then error for the third and every later event of the read,
        in order; the next write starts on a new line."""
        line = 'n=%d\nmsg=ten bytes\ngo\n'
        size = len(b'2026-11-22T07:39:24+00:00 n=0 msg="ten bytes"\n')
        m = logfile_out(tmp, preexec_fn=limit_file_size(2 * size + 10))
        try:
            m.send('filename=out.log\nconfigure\n')
            m.wait_answers(1)
            m.send(''.join(line % i for i in range(5)))
            answers = m.wait_answers(6)[1:]
            assert answers[:2] == ['ok', 'ok']
            assert answers[2:] == ['error out.log: File too large'] * 3, answers
            with open(os.path.join(tmp, 'out.log'), 'rb') as f:
                data = f.read()
            assert len(data) == 2 * size + 10 and data.count(b'\n') == 2
            # Room again (copytruncate): the partial line is ended first.
            # (Once the module waits on stdin, it has seen it idle: the
            # events in flight with the failed one are all read.)
            wait_until(lambda: proc_state(m.proc.pid) == 'S', what='the module to wait on stdin')
            os.truncate(os.path.join(tmp, 'out.log'), 0)
            m.send('n=9\ngo\n')
            assert m.wait_answers(7)[6] == 'ok'
            with open(os.path.join(tmp, 'out.log'), 'rb') as f:
                data = f.read()
            assert data.startswith(b'\n') and data.endswith(b' n=9\n') and data.count(b'\n') == 2
            m.send('quit\n')
            assert m.wait_exit() == 0
        finally:
            m.stop()

    def test_after_an_error_the_events_in_flight_are_refused_unwritten(self):
        """Go-back-N: Looper sends again the failed event and every later
        one it had sent.  Those already in the pipe are answered `error`
        without being written (no line twice, none out of order); once
        stdin is idle, writing is tried again.  In this process, with a
        destination that fails once and a stdin that says what is waiting."""
        new = load_module(LOGFILE_OUT, 'logfile_out_new')

        class FailsOnce(FakeFile):
            failed = False

            def write(self, data):
                if not self.failed:
                    self.failed = True
                    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    e.written = 0
                    raise e
                FakeFile.write(self, data)

        class Stdin(FakeText):
            def ready(self):                 # the next chunk is already in the pipe
                return bool(self.chunks) and self.chunks[0].startswith('b=')

        destination = FailsOnce()
        writer = new._Writer(destination, 'logfmt', True)
        writer.now = lambda: 'NOW'
        r, w = os.pipe()
        saved = os.dup(1)
        os.dup2(w, 1)
        try:
            status = writer.run('a=1\ngo\n', Stdin(['b=2\ngo\nb=3\ngo\n', 'c=4\ngo\n', 'd=5\ngo\n']))
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(w)
        with os.fdopen(r, 'rb') as f:
            answers = f.read().decode().splitlines()
        assert status == 0
        assert answers == ['error fake: No space left on device'] * 3 + ['ok', 'ok']
        assert destination.data == b'NOW c=4\nNOW d=5\n'

    def test_empty_events_and_odd_lines_are_answered_in_order(self, tmp):
        """Replaces test_logfile_out_protocol_oddities: every `go` is
        answered, an empty event too (a line with the time alone)."""
        p = lf_run(tmp, 'a=1\r\nnonsense\n\nb=2\ngo\ngo\nc=3\n', tail='')
        assert p.returncode == 0 and p.stdout == b'ok\nok\nok\n'
        rests = [rest for when, rest in file_lines(os.path.join(tmp, 'out.log'))]
        assert rests == ['a=1 b=2', '']
        err = p.stderr.decode()
        assert "<4>logfile_out: ignored a line that is not token=value, go or quit (1 so far): 'nonsense'" in err
        assert '<4>logfile_out: stdin ended inside an event (1 tokens)' in err

    def test_quit_and_eof_exit_0(self, tmp):
        p = lf_run(tmp, 'a=1\ngo\n', tail='quit\nb=2\ngo\n', confirm='no')
        assert p.returncode == 0 and p.stderr == b'' and p.stdout == b''
        p = lf_run(tmp, 'c=3\ngo\n', tail='')                       # EOF, no quit
        assert p.returncode == 0 and p.stderr == b'' and p.stdout == b'ok\nok\n'
        assert [rest for when, rest in file_lines(os.path.join(tmp, 'out.log'))] == ['a=1', 'c=3']
        p = subprocess.run([PY, LOGFILE_OUT], input=b'filename=x.log\n', cwd=tmp,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 0 and p.stdout == b'' and not os.path.exists(os.path.join(tmp, 'x.log'))

    # -- without confirm ----------------------------------------------------

    def test_without_confirm_lost_events_exit_1(self, tmp):
        """Replaces test_logfile_out_write_errors_without_confirm_are_counted
        (exit 0 then): the exit status says that events were lost."""
        if not os.path.exists('/dev/full'):
            pytest.skip('no /dev/full')
        p = lf_run(tmp, 'a=1\ngo\n' * 5, filename='/dev/full', confirm='no')
        assert p.returncode == 1 and p.stdout == b''
        err = p.stderr.decode()
        assert '<3>logfile_out: cannot write (/dev/full: No space left on device); events are being lost' in err
        assert err.endswith('<3>logfile_out: 5 events could not be written\n'), err

    def test_without_confirm_a_partial_loss_is_counted_exactly(self, tmp):
        size = len(b'2026-11-22T07:39:24+00:00 n=0\n')
        p = lf_run(tmp, ''.join('n=%d\ngo\n' % i for i in range(10)), confirm='no',
                   preexec_fn=limit_file_size(3 * size + 5))
        assert p.returncode == 1
        assert p.stderr.decode().endswith('7 events could not be written\n'), p.stderr

    # -- Looper's stdout ----------------------------------------------------

    def test_dash_writes_looper_stdout_fd(self, tmp):
        r, w = os.pipe()
        env = dict(os.environ, LOOPER_STDOUT_FD=str(w))
        try:
            p = subprocess.Popen([PY, LOGFILE_OUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env, pass_fds=(w,), cwd=tmp)
            os.close(w)
            w = None
            out, err = p.communicate(lf_input('k=v w\ngo\nquit\n', filename='-'), timeout=DEADLINE)
            assert p.returncode == 0 and err == b''
            assert out == b'ok\nok\n'                        # answers on the protocol pipe
            line = os.read(r, 65536).decode()                # the event on "Looper's stdout"
            assert TIME.match(line.split(' ')[0]) and line.endswith(' k="v w"\n')
        finally:
            os.close(r)
            if w is not None:
                os.close(w)

    def test_dash_without_the_variable_is_fd_1(self, tmp):
        """Replaces test_logfile_out_dash_without_variable_is_fd_1 (the
        answers share fd 1 with the lines then)."""
        env = dict((k, v) for k, v in os.environ.items() if k != 'LOOPER_STDOUT_FD')
        p = lf_run(tmp, 'k=v\ngo\n', filename='-', env=env, confirm='no')
        assert p.returncode == 0 and p.stdout.decode().endswith(' k=v\n')

    def test_dash_reader_gone_while_writing_exits_1_quietly(self, tmp):
        r, w = os.pipe()
        os.close(r)                                          # `| head -1` has exited
        env = dict(os.environ, LOOPER_STDOUT_FD=str(w))
        try:
            for confirm in ('yes', 'no'):
                p = subprocess.run([PY, LOGFILE_OUT], input=lf_input('k=v\ngo\n' * 3, filename='-',
                                                                     confirm=confirm),
                                   env=env, pass_fds=(w,), cwd=tmp, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=DEADLINE)
                assert p.returncode == 1 and p.stderr == b'', (confirm, p.stderr)
                assert p.stdout == (b'ok\n' if confirm == 'yes' else b'')   # no answer for the lost
        finally:
            os.close(w)

    def test_dash_reader_gone_while_idle_exits_at_once(self, tmp):
        """No event comes, stdin stays open: the module still sees that the
        reader of Looper's stdout is gone and exits (1, quietly), at once."""
        r, w = os.pipe()
        env = dict(os.environ, LOOPER_STDOUT_FD=str(w))
        m = logfile_out(tmp, env=env, pass_fds=(w,))
        os.close(w)
        try:
            m.send('filename=-\nconfigure\nk=v\ngo\n')
            m.wait_answers(2)
            assert os.read(r, 65536).endswith(b' k=v\n')
            time.sleep(0.2)
            assert m.proc.poll() is None                     # waiting for events
            started = time.monotonic()
            os.close(r)
            r = None
            assert m.wait_exit(timeout=5) == 1
            assert time.monotonic() - started < 2
            time.sleep(0.1)
            assert m.err.data == b''
        finally:
            if r is not None:
                os.close(r)
            m.stop()

    def test_a_fifo_without_reader_exits_1_and_says_so(self, tmp):
        fifo = os.path.join(tmp, 'fifo')
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        m = logfile_out(tmp)
        try:
            m.send('filename=fifo\nconfigure\n')
            m.wait_answers(1)
            os.close(reader)
            reader = None
            m.send('k=v\ngo\n')
            assert m.wait_exit() == 1
            time.sleep(0.1)
            assert m.err.data.startswith(b"<3>logfile_out: 'fifo' has no reader any more (EPIPE)")
        finally:
            if reader is not None:
                os.close(reader)
            m.stop()

    # -- files --------------------------------------------------------------

    def test_reopens_a_rotated_file(self, tmp):
        m = logfile_out(tmp)
        try:
            m.send('filename=out.log\nconfigure\nn=0\ngo\n')
            m.wait_answers(2)
            os.rename(os.path.join(tmp, 'out.log'), os.path.join(tmp, 'out.log.1'))
            sent = [1]

            def new_file():
                # Keep sending until the module has noticed (within a second).
                m.send('n=%d\ngo\n' % sent[0])
                sent[0] += 1
                m.wait_answers(sent[0] + 1)
                return os.path.exists(os.path.join(tmp, 'out.log'))
            wait_until(new_file, what='a new out.log')
            m.send('quit\n')
            assert m.wait_exit() == 0
            assert m.answers() == ['ok'] * (sent[0] + 1)
            old = [rest for when, rest in file_lines(os.path.join(tmp, 'out.log.1'))]
            new = [rest for when, rest in file_lines(os.path.join(tmp, 'out.log'))]
            assert old + new == ['n=%d' % i for i in range(sent[0])]   # none lost, in order
            assert new
            assert b"<6>logfile_out: 'out.log' was moved or deleted (rotated?)" in m.err.data
        finally:
            m.stop()

    def test_creates_file_0644_and_appends(self, tmp):
        old = os.umask(0o022)
        try:
            lf_run(tmp, 'a=1\ngo\n')
        finally:
            os.umask(old)
        assert os.stat(os.path.join(tmp, 'out.log')).st_mode & 0o777 == 0o644
        lf_run(tmp, 'a=2\ngo\n', format='json')
        lines = read(os.path.join(tmp, 'out.log')).splitlines()
        assert lines[0].endswith(' a=1') and json.loads(lines[1])['tokens'] == {'a': '2'}

    # -- signals and pipes --------------------------------------------------

    def test_sigterm_is_prompt_and_quiet(self, tmp):
        m = logfile_out(tmp)
        try:
            m.send('filename=out.log\nconfigure\n')
            m.wait_answers(1)
            m.proc.send_signal(signal.SIGTERM)
            assert m.wait_exit() == -signal.SIGTERM
            time.sleep(0.1)
            assert m.err.data == b''
        finally:
            m.stop()

    def test_broken_pipe_on_the_answers_is_quiet(self, tmp):
        p = subprocess.Popen([PY, LOGFILE_OUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp)
        try:
            p.stdout.close()                                 # Looper's end is gone
            p.stdin.write(lf_input('a=1\ngo\n', filename='out.log'))
            p.stdin.close()
            assert p.wait(timeout=DEADLINE) == 1
            assert p.stderr.read() == b''
        finally:
            if p.poll() is None:
                p.kill()
            p.stderr.close()


##############################################################################
# logfile_out in Looper
##############################################################################

def sample_conf(directory, output, extra=''):
    return config(directory, "input i { module = syslog_in\n logfile = '%s' }\n"
                             "output o { module = logfile_out\n %s\n%s }\n"
                  % (os.path.join(EXAMPLES, 'sample.log'), output, extra))


class TestLogfileOutInLooper(object):

    def test_confirmed_delivery_of_the_sample_log(self, tmp):
        conf = sample_conf(tmp, "filename = out.log\n confirm = yes")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        events = sample_events(tmp).count('\ngo\n')
        assert len(file_lines(os.path.join(tmp, 'out.log'))) == events
        c = counters(p.stderr)
        assert c.get('output.o.confirmed', c.get('output.o.delivered')) == events
        assert 'WARNING' not in p.stderr and 'ERROR' not in p.stderr, p.stderr

    def test_default_is_confirmed_and_quiet(self, tmp):
        """No confirm key: Looper reads the declaration (confirm = 'yes') and
        sends confirm=yes; nothing is logged above INFO (needs main's
        looper.py with declarations)."""
        conf = sample_conf(tmp, "filename = out.log")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert 'WARNING' not in p.stderr and 'ERROR' not in p.stderr, p.stderr
        c = counters(p.stderr)
        events = sample_events(tmp).count('\ngo\n')
        assert c['output.o.confirmed'] == events, p.stderr

    def test_file_that_cannot_be_opened_ends_the_run_with_78(self, tmp):
        """Needs main's looper.py with exit 78 for modules."""
        conf = sample_conf(tmp, "filename = '/nonexistent/dir/x.out'")
        p = run([conf])
        assert p.returncode == 78, p.stderr
        assert re.search(r"t\.conf:\d+: .*cannot open '/nonexistent/dir/x\.out'", p.stderr), p.stderr

    def test_a_full_disk_is_not_a_success(self, tmp):
        """Needs main's looper.py (a failed output fails the run)."""
        if not os.path.exists('/dev/full'):
            pytest.skip('no /dev/full')
        for confirm in ('', 'confirm = no'):
            conf = sample_conf(tmp, "filename = /dev/full\n " + confirm, FAST + " draintimeout = 2\n")
            p = run([conf])
            assert p.returncode != 0, p.stderr
            c = counters(p.stderr)
            assert c.get('output.o.confirmed', 0) == 0, p.stderr

    def test_pipe_conf_into_a_reader_that_goes_away_stops_promptly(self, tmp):
        """looper.py examples/pipe.conf | head -1, with the input still open:
        Looper stops within seconds, without a traceback (needs main's
        looper.py: it stops when its stdout is gone)."""
        proc = subprocess.Popen([PY, os.path.join(HERE, 'looper.py'), os.path.join(EXAMPLES, 'pipe.conf')],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = 'Nov 22 07:39:24 gw1 kernel: [UFW BLOCK] IN=eth0 SRC=10.0.0.1\n'
            proc.stdin.write(line.encode() * 1000)
            proc.stdin.flush()
            first = proc.stdout.readline()
            assert b'node=gw1' in first
            proc.stdout.close()                              # head -1 exits
            started = time.monotonic()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail('Looper still running 10 s after its stdout closed')
            assert time.monotonic() - started < 5
            err = proc.stderr.read().decode()
            assert 'Traceback' not in err, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stderr):
                try:
                    f.close()
                except (OSError, ValueError):
                    pass


##############################################################################
# The templates (examples/modules), Python and sh
##############################################################################

TEMPLATE_OUTS = ['template_out', 'template_out.sh']
TEMPLATE_INS = ['template_in', 'template_in.sh']


def template(name):
    return os.path.join(TEMPLATES, name)


def run_template(directory, name, data, argv=()):
    """Run a template as Looper would: Python ones under PY, sh ones under /bin/sh."""
    interpreter = '/bin/sh' if name.endswith('.sh') else PY
    return subprocess.run([interpreter, template(name)] + list(argv), input=data, cwd=directory,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)


class TestTemplates(object):

    @pytest.mark.parametrize('name', TEMPLATE_OUTS + TEMPLATE_INS)
    def test_declaration_help_and_arguments(self, tmp, name):
        d = declaration(template(name))
        kind = 'output' if '_out' in name else 'input'
        assert d['kind'] == kind
        if kind == 'output':
            assert d['keys'].split() == ['filename', 'prefix'] and d['confirm'] == 'yes'
            assert int(d['confirmwindow']) >= 1
        else:
            assert d['keys'].split() == ['filename', 'statefile'] and d['ack'] == 'no'
        assert os.stat(template(name)).st_mode & 0o777 == 0o755
        p = run_template(tmp, name, b'', ['--help'])
        assert p.returncode == 0 and p.stderr == b''
        assert p.stdout.decode().startswith(name + ': the skeleton of a Looper')
        assert 'Exit status' in p.stdout.decode() and 'filename' in p.stdout.decode()
        p = run_template(tmp, name, b'', ['x'])
        assert p.returncode == 78 and p.stderr.startswith(b'<3>' + name.encode() + b': takes no arguments')
        assert os.listdir(tmp) == []

    def test_check_reads_the_declarations(self, tmp):
        """looper.py --check knows the keys of the templates (sh ones too:
        the declaration is a comment) and of logfile_out."""
        conf = config(tmp, "inputmodulepath = '%s'\noutputmodulepath = '%s'\n"
                           "input i { module = template_in.sh\n filename = in.log\n statfile = x }\n"
                           "output o { module = template_out.sh\n filname = out.txt }\n"
                           "output p { module = template_out\n filename = x\n prefx = y }\n"
                           "output q { module = '%s'\n filename = x\n formt = json }\n"
                      % (TEMPLATES, TEMPLATES, LOGFILE_OUT))
        p = run(['--check', conf])
        assert p.returncode != 0
        for line, key, module, good in ((5, 'statfile', 'template_in.sh', 'statefile'),
                                        (7, 'filname', 'template_out.sh', 'filename'),
                                        (10, 'prefx', 'template_out', 'prefix'),
                                        (13, 'formt', LOGFILE_OUT, 'format')):
            assert ("t.conf:%d: unknown key '%s' for module %s; did you mean '%s'?"
                    % (line, key, module, good)) in p.stderr, p.stderr

    @pytest.mark.parametrize('name', TEMPLATE_OUTS)
    def test_out_by_hand(self, tmp, name):
        events = 'node=gw1\ndesc=hello world\ngo\ngo\nb=back\\slash\ngo\nquit\nlate=1\ngo\n'
        p = run_template(tmp, name, lf_input(events, filename='out.log', prefix='> '))
        assert p.returncode == 0 and p.stderr == b''
        assert p.stdout == b'ok\n' * 4
        assert read(os.path.join(tmp, 'out.log')) == '> node=gw1 desc=hello world\n> \n> b=back\\slash\n'
        p = run_template(tmp, name, lf_input('a=1\ngo\n', filename='out.log', confirm='no'))
        assert p.returncode == 0 and p.stdout == b''
        assert read(os.path.join(tmp, 'out.log')).endswith('\na=1\n')

    @pytest.mark.parametrize('name', TEMPLATE_OUTS)
    def test_out_configuration_errors_and_write_errors(self, tmp, name):
        for keys, message in (({}, 'no filename configured'),
                              ({'filename': 'x', 'confirm': 'maybe'}, "confirm must be yes or no, not 'maybe'"),
                              ({'filename': '/nonexistent/dir/x'}, "cannot open '/nonexistent/dir/x'")):
            p = run_template(tmp, name, lf_input('a=1\ngo\n', **keys))
            assert p.returncode == 78 and p.stdout == b'', (keys, p.stderr)
            assert p.stderr.startswith(('<3>%s: ' % name).encode()) and message.encode() in p.stderr
        if os.path.exists('/dev/full'):
            p = run_template(tmp, name, lf_input('a=1\ngo\nb=2\ngo\n', filename='/dev/full'))
            assert p.returncode == 0
            answers = p.stdout.decode().splitlines()
            assert answers[0] == 'ok' and len(answers) == 3
            assert all(a.startswith('error ') for a in answers[1:]), answers

    def test_out_python_after_an_error_answers_the_rest_of_the_read_error_unwritten(self, tmp):
        """template_out answers a read at once; after a failed write (a file
        size limit cuts the third line), the later events of that read are
        answered error and not written: Looper sends them all again."""
        size = len(b'n=0\n')
        p = subprocess.run([PY, template(TEMPLATE_OUTS[0])],
                           input=lf_input(''.join('n=%d\ngo\n' % i for i in range(5)), filename='out.log'),
                           cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE,
                           preexec_fn=limit_file_size(2 * size + 2))
        assert p.returncode == 0, p.stderr
        assert p.stdout.decode().splitlines() == ['ok', 'ok', 'ok'] + ['error File too large'] * 3
        assert read(os.path.join(tmp, 'out.log')) == 'n=0\nn=1\nn='

    @pytest.mark.parametrize('name', TEMPLATE_OUTS)
    def test_out_answers_each_event_before_the_next_comes(self, tmp, name):
        """What PYTHONUNBUFFERED would hide: the answer comes while stdin
        stays open (the tests unset it)."""
        assert 'PYTHONUNBUFFERED' not in os.environ
        interpreter = '/bin/sh' if name.endswith('.sh') else PY
        m = Module([interpreter, template(name)], tmp)
        try:
            m.send('filename=out.log\nconfigure\n')
            assert m.wait_answers(1) == ['ok']
            m.send('n=1\ngo\n')
            assert m.wait_answers(2) == ['ok', 'ok']
            assert read(os.path.join(tmp, 'out.log')) == 'n=1\n'
        finally:
            m.stop()

    @pytest.mark.parametrize('name', TEMPLATE_INS)
    def test_in_by_hand(self, tmp, name):
        write(os.path.join(tmp, 'in.txt'), 'one\ntwo words\n\nlast without newline')
        p = run_template(tmp, name, b'filename=in.txt\n')
        assert p.returncode == 0 and p.stderr == b''
        assert p.stdout.decode() == ('number=0\nline=one\ngo\nnumber=1\nline=two words\ngo\n'
                                     'number=2\nline=\ngo\nnumber=3\nline=last without newline\ngo\n')
        for data, message in ((b'', b'no filename configured'),
                              (b'filename=nope\n', b"cannot open 'nope'"),
                              (b'filename=in.txt\nack=yes\n', b'needs a statefile')):
            p = run_template(tmp, name, data)
            assert p.returncode == 78 and p.stdout == b'' and message in p.stderr, p.stderr
            assert p.stderr.startswith(('<3>%s: ' % name).encode())

    @pytest.mark.parametrize('name', TEMPLATE_INS)
    def test_in_with_ack_by_hand(self, tmp, name):
        """Looper's side of ack written by hand: `configure`, then an `ok`
        per settled event; the state file counts them, and the next run
        starts after them."""
        write(os.path.join(tmp, 'in.txt'), 'a\nb\nc\n')
        keys = b'filename=in.txt\nack=yes\nstatefile=state\nconfigure\n'
        p = run_template(tmp, name, keys + b'ok\nok\n')             # then Looper goes away
        assert p.returncode == 0, p.stderr
        assert p.stdout.count(b'\ngo\n') == 3
        assert read(os.path.join(tmp, 'state')).strip() == '2'
        p = run_template(tmp, name, keys + b'ok\n')
        assert p.returncode == 0
        assert p.stdout == b'number=2\nline=c\ngo\n'
        assert read(os.path.join(tmp, 'state')).strip() == '3'

    @pytest.mark.parametrize('out', TEMPLATE_OUTS)
    @pytest.mark.parametrize('source', TEMPLATE_INS)
    def test_through_looper_confirmed(self, tmp, source, out):
        write(os.path.join(tmp, 'in.txt'), ''.join('line %d\n' % i for i in range(200)))
        conf = config(tmp, "inputmodulepath = '%s'\noutputmodulepath = '%s'\n"
                           "input i { module = %s\n filename = in.txt }\n"
                           "output o { module = %s\n filename = out.txt\n confirm = yes\n prefix = '> ' }\n"
                      % (TEMPLATES, TEMPLATES, source, out))
        p = run([conf])
        assert p.returncode == 0, p.stderr
        lines = read(os.path.join(tmp, 'out.txt')).splitlines()
        assert lines == ['> number=%d line=line %d' % (i, i) for i in range(200)]
        c = counters(p.stderr)
        assert c.get('output.o.confirmed', c.get('output.o.delivered')) == 200, p.stderr
        assert 'WARNING' not in p.stderr and 'ERROR' not in p.stderr, p.stderr

    @pytest.mark.parametrize('source', TEMPLATE_INS)
    def test_through_looper_with_ack(self, tmp, source):
        """Needs main's looper.py with ack: every line acknowledged in the
        state file at the end; a second run sends only the new lines."""
        write(os.path.join(tmp, 'in.txt'), ''.join('line %d\n' % i for i in range(50)))
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = '%s'\noutputmodulepath = .\n"
                           "input i { module = %s\n filename = in.txt\n statefile = in.state\n ack = yes }\n"
                           "output o { module = rec\n confirm = yes }\n" % (TEMPLATES, source))
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert read(os.path.join(tmp, 'in.state')).strip() == '50'
        with open(os.path.join(tmp, 'in.txt'), 'a') as f:
            f.write('line 50\nline 51\n')
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert [e['line'] for e in recorded(tmp, 'o')] == ['line %d' % i for i in range(52)]
        assert read(os.path.join(tmp, 'in.state')).strip() == '52'


##############################################################################
# Flushing in other languages (docs_wip/writing_modules.md)
##############################################################################

# Confirming output modules that write each event's tokens to out.txt, one
# per language, each with the flush line the module-writing guide gives.
PERL_OUT = r'''#!/usr/bin/perl
$| = 1;                                  # flush stdout after every print
my %config;
while (<STDIN>) {
    chomp;
    last if $_ eq 'configure';
    $config{$1} = $2 if /^([^=]+)=(.*)$/;
}
open(my $out, '>>', $config{filename}) or do { print STDERR "<3>perl_out: cannot open\n"; exit 78 };
select((select($out), $| = 1)[0]);
print "ok\n";
my @tokens;
while (<STDIN>) {
    chomp;
    last if $_ eq 'quit';
    if ($_ eq 'go') { print $out join(' ', @tokens), "\n"; @tokens = (); print "ok\n"; next }
    push @tokens, $_;
}
'''

AWK_OUT = r'''#!/bin/sh
# mawk (Debian's awk) reads its input in blocks unless -W interactive.
if awk -W version 2>/dev/null | grep -q mawk; then set -- -W interactive; fi
exec awk "$@" '
    !configured && $0 == "configure" { configured = 1; print "ok"; fflush(); next }
    !configured { split($0, kv, "="); config[kv[1]] = substr($0, length(kv[1]) + 2); next }
    $0 == "quit" { exit }
    $0 == "go" { print line >> config["filename"]; fflush(config["filename"]); line = ""
                 print "ok"; fflush(); next }
    { line = line (line == "" ? "" : " ") $0 }
'
'''

PYTHON_PRINT_OUT = r'''#!/usr/bin/env python3
import sys
config = {}
for line in sys.stdin:
    line = line.rstrip('\n')
    if line == 'configure':
        break
    key, _, value = line.partition('=')
    config[key] = value
out = open(config['filename'], 'a')
print('ok', flush=True)
tokens = []
for line in sys.stdin:
    line = line.rstrip('\n')
    if line == 'quit':
        break
    if line == 'go':
        print(' '.join(tokens), file=out, flush=True)
        tokens = []
        print('ok', flush=True)              # or sys.stdout.flush() after print('ok')
        continue
    tokens.append(line)
'''


class TestFlushLines(object):

    @pytest.mark.parametrize('language', ['perl', 'awk', 'python'])
    def test_a_confirming_module_with_the_flush_line(self, tmp, language):
        if language == 'perl':
            need('perl')
        if language == 'awk':
            need('awk')
        body = {'perl': PERL_OUT, 'awk': AWK_OUT, 'python': PYTHON_PRINT_OUT}[language]
        write(os.path.join(tmp, 'mod'), body, 0o755)
        write(os.path.join(tmp, 'in.txt'), ''.join('line %d\n' % i for i in range(20)))
        conf = config(tmp, "inputmodulepath = '%s'\noutputmodulepath = .\n"
                           "input i { module = template_in\n filename = in.txt }\n"
                           "output o { module = mod\n filename = out.txt\n confirm = yes\n"
                           " confirmtimeout = 5 }\n" % TEMPLATES)
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert read(os.path.join(tmp, 'out.txt')).splitlines() == [
            'number=%d line=line %d' % (i, i) for i in range(20)]
        assert 'WARNING' not in p.stderr, p.stderr
