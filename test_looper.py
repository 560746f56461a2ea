"""Tests for Looper: real subprocesses, real files, bounded waits.

Run:  python3 -m pytest -q test_looper.py
The interpreter that runs looper.py (and so the shipped Python modules) is
LOOPER_PYTHON, default the one running pytest; .ci/run sets it to 3.6 and
3.13 as well.  Tests that need a real peer (rsyslog, net-snmp, logger)
skip where it is absent, except in CI (CI=true), where they fail.
"""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# LOOPER_SCRIPT runs the suite against another looper.py (e.g. an old one from
# git, to see that a test fails without the fix it comes with).
LOOPER = os.environ.get('LOOPER_SCRIPT', os.path.join(HERE, 'looper.py'))
MODULES = os.path.join(HERE, 'modules')
EXAMPLES = os.path.join(HERE, 'examples')
PY = os.environ.get('LOOPER_PYTHON', sys.executable)
IN_CI = os.environ.get('CI') == 'true'
DEADLINE = 30.0         # seconds: the longest any single wait in these tests may take

# Users' hosts do not set PYTHONUNBUFFERED; with it, a module that forgets to
# flush would still work here.  Every process the tests start inherits this.
os.environ.pop('PYTHONUNBUFFERED', None)


##############################################################################
# Helpers
##############################################################################

def wait_until(predicate, timeout=DEADLINE, what='condition'):
    """Poll an observable condition until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %g s waiting for %s' % (timeout, what))
        time.sleep(0.01)


def need(program):
    """Skip when a real peer is absent; in CI its absence is a failure."""
    path = shutil.which(program) or (os.path.exists('/usr/sbin/' + program) and '/usr/sbin/' + program)
    if not path:
        if IN_CI:
            pytest.fail('%s is required in CI (install it in .ci/run)' % program)
        pytest.skip('%s is not installed' % program)
    return path


def write(path, text, mode=0o644):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def sh_module(directory, name, body):
    """An executable /bin/sh module."""
    return write(os.path.join(directory, name), '#!/bin/sh\n' + body, 0o755)


def py_module(directory, name, body):
    """An executable Python module (Looper runs it under its own interpreter)."""
    return write(os.path.join(directory, name), '#!/usr/bin/env python3\n' + body, 0o755)


def read(path, default=''):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def run(args, input=None, cwd=None, timeout=DEADLINE, env=None):
    """Run looper.py to completion; returns CompletedProcess with text output."""
    return subprocess.run([PY, LOOPER] + args, input=input, cwd=cwd, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          universal_newlines=True)


def run_test_mode(conf, events):
    """--test: returns (deliveries as dicts, CompletedProcess)."""
    p = subprocess.run([PY, LOOPER, '--test', conf], input=events.encode('utf-8', 'surrogateescape')
                       if isinstance(events, str) else events, timeout=DEADLINE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = p.stdout.decode('utf-8', 'surrogateescape').splitlines()
    return [json.loads(line) for line in lines], p


class Looper(object):
    """looper.py running in the background, its log in a file."""

    def __init__(self, conf, args=(), env=None, stdin=subprocess.DEVNULL, stdout=None,
                 preexec_fn=None):
        self.log_path = conf + '.stderr'
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen([PY, LOOPER] + list(args) + [conf], stdin=stdin,
                                     stdout=stdout or subprocess.DEVNULL, stderr=self._log,
                                     env=env, preexec_fn=preexec_fn)

    def log(self):
        return read(self.log_path)

    def wait_log(self, pattern, timeout=DEADLINE, count=1):
        return wait_until(lambda: len(re.findall(pattern, self.log())) >= count and self.log(),
                          timeout, 'log line %r (x%d); log so far:\n%s' % (pattern, count, self.log()))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=DEADLINE):
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        self._log.close()


def counters(log):
    """The last counters line (SIGUSR1 or the final one) as a dict of ints."""
    lines = [line for line in log.splitlines() if re.search(r'(counters|finished): events_in=', line)]
    assert lines, 'no counters line in the log:\n' + log
    return dict((k, int(v)) for k, v in re.findall(r'(\S+)=(\d+)', lines[-1].split(': ', 2)[-1]))


def children_of(pid):
    """Pids of the direct children of pid (from /proc)."""
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/stat' % entry) as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def proc_status(pid):
    with open('/proc/%d/status' % pid) as f:
        return dict(line.split(':', 1) for line in f.read().splitlines() if ':' in line)


def proc_state(pid):
    """'R', 'S', 'Z'...; '' once the process is gone (it may go at any time)."""
    try:
        return proc_status(pid)['State'].strip()[:1]
    except OSError:
        return ''


def alive(pid):
    return proc_state(pid) not in ('', 'Z')


# A Python output module that records what it receives: every event as one
# JSON line in $LOOPER_NAME.jsonl (raw config in .config); confirm support
# driven by its config (confirm=yes).
RECORDER = r'''
import json, os, sys
name = os.environ.get('LOOPER_NAME', 'out')
stdin = sys.stdin.buffer
config, event = {}, {}
confirm = False
for raw in stdin:
    line = raw.rstrip(b'\n').decode('utf-8', 'surrogateescape')
    if line == 'configure':
        confirm = config.get('confirm') == 'yes'
        with open(name + '.config', 'w') as f:
            json.dump(config, f)
        if confirm:
            sys.stdout.write('ok\n'); sys.stdout.flush()
        break
    k, _, v = line.partition('=')
    config[k] = v
out = open(name + '.jsonl', 'ab')
for raw in stdin:
    line = raw.rstrip(b'\n').decode('utf-8', 'surrogateescape')
    if line == 'quit':
        break
    if line == 'go':
        out.write(json.dumps(event).encode() + b'\n'); out.flush()
        event = {}
        if confirm:
            sys.stdout.write('ok\n'); sys.stdout.flush()
        continue
    k, _, v = line.partition('=')
    event[k] = v
'''


def recorded(directory, name):
    """Events a RECORDER output received, in order.  A last line still being
    written (no newline yet) is not an event yet."""
    text = read(os.path.join(directory, name + '.jsonl'))
    return [json.loads(line) for line in text[:text.rfind('\n') + 1].splitlines()]


def numbers_in(directory, name, token='n'):
    return [int(e[token]) for e in recorded(directory, name)]


# An input module that emits N numbered events (n=0..N-1) then exits 0.
COUNTER_IN = r'''
import os, sys
config = dict(line.rstrip('\n').split('=', 1) for line in sys.stdin if '=' in line)
n = int(config.get('count', '10'))
start = int(config.get('first', '0'))
out = sys.stdout
for i in range(start, n):
    out.write('n=%d\nmsg=event %d\ngo\n' % (i, i))
out.flush()
'''


@pytest.fixture
def tmp(tmp_path):
    return str(tmp_path)


def _become_subreaper():
    """Orphans of the processes the tests start (modules of a Looper the test
    killed, a daemon's children) are re-parented to this process instead of
    init, so the teardown below finds and stops them.  Linux only."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0          # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


_SUBREAPER = _become_subreaper()


def descendants(pid):
    """Every process below pid, children first."""
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(autouse=True)
def _no_leftovers():
    """After every test, passed or failed: SIGKILL every process it left
    behind (Loopers, their modules, peers, orphans) and reap them."""
    yield
    me = os.getpid()
    for _ in range(5):
        pids = descendants(me)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except OSError:         # not our child (a grandchild), or reaped already
                pass


def config(directory, text, name='t.conf'):
    return write(os.path.join(directory, name), text)


##############################################################################
# Configuration
##############################################################################

class TestConfiguration(object):

    def test_examples_pass_check(self):
        for name in sorted(os.listdir(EXAMPLES)):
            if name.endswith('.conf'):
                p = run(['--check', os.path.join(EXAMPLES, name)])
                assert p.returncode == 0, (name, p.stderr)
                assert 'OK' in p.stdout

    def test_quoting_comments_and_one_line_blocks_reach_the_module(self, tmp):
        py_module(tmp, 'rec', RECORDER)
        py_module(tmp, 'src', COUNTER_IN)
        conf = config(tmp, '''
# a comment
inputmodulepath = "."           # double quotes, comment after
outputmodulepath = .
rulesfile = NORULES

input in { module = 'src'   # one-line block
           count = 2 }
output out {
    module = rec
    single = 'a # not a comment'
    double = "it's"
    bare   = plain value   # comment
    empty  = ''
}
''')
        p = run([conf])
        assert p.returncode == 0, p.stderr
        got = json.loads(read(os.path.join(tmp, 'out.config')))
        assert got == {'module': 'rec', 'single': 'a # not a comment', 'double': "it's",
                       'bare': 'plain value', 'empty': ''}
        assert numbers_in(tmp, 'out') == [0, 1]

    @pytest.mark.parametrize('text, line, message', [
        ("input a { module = 'x' }\ninput b { module = 'x' }\noutput o { module = 'x' }\n",
         2, "a second input block 'b'"),
        ("input a { module = 'x' }\n", 1, 'no output block'),
        ("output o { module = 'x' }\n", 1, 'no input block'),
        ("input a {\n  sleeptime = 2\n}\noutput o { module = 'x' }\n", 1, "has no 'module' key"),
        ("input a { module = 'x' }\noutput o { module = 'x' }\noutput o { module = 'x' }\n",
         3, "duplicate output name 'o'"),
        ("input a { module = 'x' }\noutput o { module = 'x' }\nfoo = 1\n", 3, "unknown key 'foo'"),
        ("input a { module = 'x' }\noutptu o {\n module = 'x'\n}\noutput p { module = 'x' }\n",
         2, "unknown section 'outptu'"),
        ("input a { module = 'x' }\noutput o { module = 'x\n}\n", 2, 'unterminated'),
        ("input a { module = 'x' }\noutput o {\n module = 'x'\n", 2, 'never closed'),
        ("input a { module = 'x' }\noutput o { module = 'x' overflow = 'sometimes' }\n",
         2, 'unexpected text'),
        ("input a { module = 'x' }\noutput o {\n module = 'x'\n overflow = sometimes\n}\n",
         4, "overflow must be 'block' or 'drop'"),
        ("input a { module = 'x' }\noutput o {\n module = 'x'\n queuesize = lots\n}\n",
         4, "queuesize must be a whole number from 1 to 10000000, not 'lots'"),
        ("rulestimeout = 0\ninput a { module = 'x' }\noutput o { module = 'x' }\n",
         1, "rulestimeout must be a number of seconds from 0.01 to 86400, not '0'"),
        ("input a { module = 'x' }\noutput o {\n module = 'x'\n module = 'y'\n}\n",
         4, "duplicate key 'module' (first set at line 5)"),
        ("input a { module = 'nosuch' }\noutput o { module = 'x' }\n", 1, "module 'nosuch' not found"),
        ("input a { module = 'noexec' }\noutput o { module = 'x' }\n", 1, 'not executable; fix: chmod +x'),
        ("rulesfile = 'missing.rules'\ninput a { module = 'x' }\noutput o { module = 'x' }\n",
         1, 'cannot read rules file'),
        ("this is not a line\ninput a { module = 'x' }\noutput o { module = 'x' }\n",
         1, 'cannot parse'),
    ])
    def test_bad_configs_are_refused_with_file_and_line(self, tmp, text, line, message):
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        write(os.path.join(tmp, 'noexec'), '#!/bin/sh\n', 0o644)
        conf = config(tmp, 'inputmodulepath = .\noutputmodulepath = .\n' + text)
        for args in (['--check', conf], [conf]):
            p = run(args)
            assert p.returncode == 78, p.stderr
            expected = '%s:%d: ' % (conf, line + 2 if line else line)
            if 'no input block' in message or 'no output block' in message:
                expected = '%s:1: ' % conf
            assert any(l.startswith(expected) and message in l for l in p.stderr.splitlines()), \
                (expected, message, p.stderr)

    def test_check_lists_every_problem(self, tmp):
        conf = config(tmp, "foo = 1\ninput a { module = 'nosuch' }\noutput o { }\n")
        p = run(['--check', conf])
        assert p.returncode == 78
        assert len(p.stderr.strip().splitlines()) == 3, p.stderr

    def test_rules_syntax_error_names_the_rules_file_and_line(self, tmp):
        write(os.path.join(tmp, 'r.rules'), "x = 1\nif x == 1\n    writeTo('o')\n")
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        conf = config(tmp, "outputmodulepath = .\ninputmodulepath = .\nrulesfile = r.rules\n"
                           "input a { module = x }\noutput o { module = x }\n")
        p = run(['--check', conf])
        assert p.returncode == 78
        assert re.search(r'r\.rules:2: SyntaxError', p.stderr), p.stderr

    def test_loose_permissions_are_refused_as_sshd_strictmodes_does(self, tmp):
        """Config, rules and modules: owned by root or the user running Looper,
        not writable by group or others, in directories that are not either
        (unless sticky, like /tmp).  Every case was accepted before."""
        os.mkdir(os.path.join(tmp, 'd'))
        d = os.path.join(tmp, 'd')
        sh_module(d, 'x', 'cat >/dev/null\n')
        rules = write(os.path.join(d, 'r.rules'), "writeTo('o')\n")
        conf = config(d, "outputmodulepath = .\ninputmodulepath = .\nrulesfile = r.rules\n"
                         "input a { module = x }\noutput o { module = x }\n")
        assert run(['--check', conf]).returncode == 0

        def refused(path, why):
            p = run(['--check', conf])
            assert p.returncode == 78, p.stderr
            assert ('refusing' in p.stderr and path in p.stderr and why in p.stderr
                    and 'fix: ' in p.stderr), p.stderr
            return p.stderr
        for path, mode, why in ((rules, 0o664, 'writable by its group'),
                                (rules, 0o666, 'writable by others'),
                                (conf, 0o646, 'writable by others'),
                                (os.path.join(d, 'x'), 0o757, 'writable by others'),
                                (d, 0o777, 'writable by others')):
            old = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(path, mode)
            assert 'chmod go-w %s' % path in refused(path, why)
            os.chmod(path, old)
        # A sticky world-writable directory (like /tmp) is fine.
        os.chmod(d, 0o1777)
        assert run(['--check', conf]).returncode == 0, run(['--check', conf]).stderr
        os.chmod(d, 0o755)
        if os.geteuid() == 0:
            os.chown(rules, 65534, -1)       # nobody
            assert 'owned by uid 65534' in refused(rules, 'not root or the user running Looper')
            os.chown(rules, 0, -1)
        # A real run refuses too, with the same FILE:LINE message.
        os.chmod(rules, 0o666)
        p = run([conf])
        assert p.returncode == 78 and 'r.rules:1: refusing the rules file' in p.stderr, p.stderr

    def test_module_paths_default_beside_looper_and_relative_to_the_file(self, tmp):
        os.mkdir(os.path.join(tmp, 'mods'))
        py_module(os.path.join(tmp, 'mods'), 'src', COUNTER_IN)
        conf = config(tmp, "inputmodulepath = 'mods'\ninput a { module = 'src' }\n"
                           "output o { module = 'logfile_out'\n filename = 'o.log' }\n")
        p = run(['--check', conf], cwd='/')
        assert p.returncode == 0, p.stderr
        assert os.path.join(tmp, 'mods', 'src') in p.stdout
        assert os.path.join(MODULES, 'logfile_out') in p.stdout

    def test_repeated_rulesfiles_run_in_order_and_norules_routes_everything(self, tmp):
        write(os.path.join(tmp, 'one.rules'), "outputTokens['seen'] = 'one'\n")
        write(os.path.join(tmp, 'two.rules'), "outputTokens['seen'] += ',two'\nwriteTo('a')\n")
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = one.rules\n"
                           "rulesfile = two.rules\ninput i { module = x }\n"
                           "output a { module = x }\noutput b { module = x }\n")
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert got == [{'output': 'a', 'tokens': {'k': 'v', 'seen': 'one,two'}}], p.stderr
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = 'NORULES'\n"
                           "input i { module = x }\noutput a { module = x }\n"
                           "output b { module = x }\n")
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert got == [{'output': 'a', 'tokens': {'k': 'v'}}, {'output': 'b', 'tokens': {'k': 'v'}}]


##############################################################################
# Framing: the line protocol, through --test and real runs
##############################################################################

def norules_conf(tmp, rules=None, outputs=('a',)):
    sh_module(tmp, 'x', 'cat >/dev/null\n')
    text = "inputmodulepath = .\noutputmodulepath = .\n"
    if rules is not None:
        write(os.path.join(tmp, 'r.rules'), rules)
        text += "rulesfile = r.rules\n"
    text += "input i { module = x }\n"
    for name in outputs:
        text += "output %s { module = x }\n" % name
    return config(tmp, text)


class TestFraming(object):

    def test_split_at_first_equals_crlf_and_verbatim_values(self, tmp):
        conf = norules_conf(tmp)
        got, p = run_test_mode(conf, 'a=b=c\r\nsp= lead and trail \r\nback=x\\ny\ngo\r\n')
        assert got[0]['tokens'] == {'a': 'b=c', 'sp': ' lead and trail ', 'back': 'x\\ny'}

    def test_malformed_lines_are_logged_and_skipped(self, tmp):
        conf = norules_conf(tmp)
        got, p = run_test_mode(conf, 'a=1\nnot a token line\n=novalue\n\nb=2\ngo\n')
        assert got[0]['tokens'] == {'a': '1', 'b': '2'}
        assert "skipped a line that is not token=value or go: 'not a token line'" in \
            p.stderr.decode()

    def test_parser_agrees_with_a_line_by_line_reading_however_the_bytes_arrive(self):
        """The parser's whole-chunk fast path and its careful path against the
        protocol read literally, line by line, on random input in random
        chunks: blank lines, lines without `=` or with an empty name, `go`
        twice, CRLF, `=` in values, non-UTF-8 bytes, incomplete last events."""
        import importlib.util
        spec = importlib.util.spec_from_file_location('looper_under_test', LOOPER)
        looper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(looper)
        looper._log.disabled = True

        def literally(data):
            events, event = [], {}
            for line in data.decode('utf-8', 'surrogateescape').split('\n')[:-1]:
                line = line[:-1] if line.endswith('\r') else line
                key, sep, value = line.partition('=')
                if line == 'go':
                    if event:
                        events.append(event)
                    event = {}
                elif sep and key:
                    event[key] = value
            return events
        atoms = ['a=1\n', 'b=x=y\n', 'go\n', 'go\n', '\n', '=v\n', 'bad\n', 'go=1\n',
                 'c=\r\n', 'go\r\n', 'k=' + 'x' * 50 + '\n', '\xfc=\xe9\n', 'z=\udcff\n']
        rng = __import__('random').Random(2026)
        for case in range(3000):
            data = ''.join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
            data = data.encode('utf-8', 'surrogateescape')
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 5))))
            parser = looper._EventParser('in', 65536)
            got, start = [], 0
            for end in cuts + [len(data)]:
                got.extend(parser.feed(data[start:end]))
                start = end
            got.extend(parser.eof()[0])
            assert got == literally(data), (data, cuts)

    def test_empty_events_are_skipped_and_incomplete_last_event_reported(self, tmp):
        conf = norules_conf(tmp)
        got, p = run_test_mode(conf, 'go\ngo\na=1\ngo\ngo\nb=2\n')
        assert [d['tokens'] for d in got] == [{'a': '1'}]
        assert 'incomplete event' in p.stderr.decode()

    def test_a_final_go_without_newline_completes_the_event(self, tmp):
        got, p = run_test_mode(norules_conf(tmp), 'a=1\ngo')
        assert [d['tokens'] for d in got] == [{'a': '1'}]

    def test_invalid_utf8_and_nul_pass_through_byte_exact(self, tmp):
        """Real run: an input emitting raw bytes, an output dumping raw bytes."""
        sh_module(tmp, 'src', "cat >/dev/null\nprintf 'raw=\\377\\376ok\\000nul\\nutf=caf\\303\\251\\ngo\\n'\n")
        sh_module(tmp, 'dump', 'cat > dump.bin\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = dump }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        with open(os.path.join(tmp, 'dump.bin'), 'rb') as f:
            data = f.read()
        assert b'raw=\xff\xfeok\x00nul\nutf=caf\xc3\xa9\ngo\nquit\n' in data

    def test_values_with_line_breaks_cannot_inject_protocol_lines(self, tmp):
        rules = ("outputTokens['evil'] = 'x\\ngo\\nadmin=yes\\r\\nquit'\nwriteTo('o')\n")
        sh_module(tmp, 'src', "cat >/dev/null\nprintf 'a=1\\ngo\\n'\n")
        sh_module(tmp, 'dump', 'cat > dump.bin\n')
        write(os.path.join(tmp, 'r.rules'), rules)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\n"
                           "input i { module = src }\noutput o { module = dump }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        data = read(os.path.join(tmp, 'dump.bin'))
        assert data.endswith('a=1\nevil=x\\ngo\\nadmin=yes\\r\\nquit\ngo\nquit\n'), data

    def test_token_names_with_equals_or_line_breaks_are_rules_errors(self, tmp):
        conf = norules_conf(tmp, "outputTokens['a=b'] = '1'\nwriteTo('a')\n")
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert got == [] and p.returncode == 1
        assert 'r.rules:2: ValueError' in p.stderr.decode()

    def test_oversized_lines_are_discarded_and_reported(self, tmp):
        conf = config(tmp, 'maxline = 1000\n' + read(norules_conf(tmp)), 'big.conf')
        events = 'a=1\nbig=%s\nb=2\ngo\nc=%s\ngo\nd=4\ngo\n' % ('x' * 5000, 'y' * 300000)
        got, p = run_test_mode(conf, events)
        assert [d['tokens'] for d in got] == [{'a': '1', 'b': '2'}, {'d': '4'}]
        assert 'over 1000 bytes' in p.stderr.decode()

    def test_split_and_coalesced_reads_parse_the_same(self, tmp):
        """One byte per write with pauses, versus everything in one write."""
        body = ''.join('n=%d\nv=caf\u00e9 %d\r\ngo\n' % (i, i) for i in range(40))
        write(os.path.join(tmp, 'events'), body)
        py_module(tmp, 'slow', r'''
import os, sys, time
sys.stdin.read()
data = open('events', 'rb').read()
for i in range(len(data)):
    os.write(1, data[i:i + 1])
    if i % 7 == 0:
        time.sleep(0.0005)
''')
        py_module(tmp, 'fast', "import os, sys\nsys.stdin.read()\nos.write(1, open('events', 'rb').read())\n")
        py_module(tmp, 'rec', RECORDER)
        results = []
        for src in ('slow', 'fast'):
            conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                               "input i { module = %s }\noutput %s { module = rec }\n" % (src, src))
            assert run([conf]).returncode == 0
            results.append(recorded(tmp, src))
        assert results[0] == results[1]
        assert results[0][39] == {'n': '39', 'v': 'caf\u00e9 39'}

    def test_memory_stays_bounded_under_a_100_mb_line(self, tmp):
        sh_module(tmp, 'src', "cat >/dev/null\nprintf 'a=1\\ngo\\nhuge='\n"
                              "head -c 100000000 /dev/zero | tr '\\000' x\n"
                              "printf '\\ngo\\nb=2\\ngo\\n'\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = rec }\n")
        looper = Looper(conf)
        peak = [0]

        def finished():
            try:
                rss = int(proc_status(looper.proc.pid)['VmRSS'].split()[0])
                peak[0] = max(peak[0], rss)
            except (OSError, KeyError):
                pass
            return looper.proc.poll() is not None
        wait_until(finished, 120, 'looper to finish the 100 MB line')
        assert looper.wait() == 0, looper.log()
        assert [e for e in recorded(tmp, 'o')] == [{'a': '1'}, {'b': '2'}]
        assert peak[0] < 60000, 'looper grew to %d kB' % peak[0]
        c = counters(looper.log())
        assert c['input.i.oversized'] == 1 and c['input.i.empty'] == 1


##############################################################################
# Rules
##############################################################################

class TestRules(object):

    def test_namespace_persists_and_output_tokens_start_as_a_copy(self, tmp):
        conf = norules_conf(tmp, "try:\n    n += 1\nexcept NameError:\n    n = 1\n"
                                 "outputTokens['count'] = n\ninputTokens['x'] = 'changed?'\n"
                                 "writeTo('a')\n")
        got, p = run_test_mode(conf, 'k=1\ngo\nk=2\ngo\n')
        assert [d['tokens'] for d in got] == [{'k': '1', 'count': '1'}, {'k': '2', 'count': '2'}]

    def test_write_to_snapshots_at_call_time_and_converts_values(self, tmp):
        conf = norules_conf(tmp, "outputTokens['n'] = 1\nwriteTo('a')\noutputTokens['n'] = 2.5\n"
                                 "outputTokens['gone'] = None\nwriteTo('b', 'a')\n",
                            outputs=('a', 'b'))
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert got == [{'output': 'a', 'tokens': {'k': 'v', 'n': '1'}},
                       {'output': 'b', 'tokens': {'k': 'v', 'n': '2.5'}},
                       {'output': 'a', 'tokens': {'k': 'v', 'n': '2.5'}}]

    def test_exit_skips_the_rest_of_the_event_and_later_files(self, tmp):
        write(os.path.join(tmp, 'first.rules'),
              "if inputTokens['k'] == 'stop':\n    exit()\noutputTokens['first'] = 'yes'\n")
        write(os.path.join(tmp, 'second.rules'), "writeTo('a')\n")
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = first.rules\n"
                           "rulesfile = second.rules\ninput i { module = x }\n"
                           "output a { module = x }\n")
        got, p = run_test_mode(conf, 'k=stop\ngo\nk=go on\ngo\n')
        assert got == [{'output': 'a', 'tokens': {'k': 'go on', 'first': 'yes'}}]

    def test_output_tokens_rebound_carries_to_the_next_file(self, tmp):
        write(os.path.join(tmp, 'first.rules'), "outputTokens = {'only': 'this'}\n")
        write(os.path.join(tmp, 'second.rules'), "writeTo('a')\n")
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = first.rules\n"
                           "rulesfile = second.rules\ninput i { module = x }\n"
                           "output a { module = x }\n")
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert got == [{'output': 'a', 'tokens': {'only': 'this'}}]

    def test_an_exception_skips_only_that_event_and_names_file_line_and_tokens(self, tmp):
        conf = norules_conf(tmp, "x = 1\nif inputTokens['k'] == 'bad':\n"
                                 "    x = inputTokens['missing']\nwriteTo('a')\n")
        got, p = run_test_mode(conf, 'k=good\ngo\nk=bad\ngo\nk=also good\ngo\n')
        assert [d['tokens']['k'] for d in got] == ['good', 'also good']
        err = p.stderr.decode()
        assert re.search(r"r\.rules:3: KeyError: 'missing'; event skipped: \{'k': 'bad'\}", err), err
        assert p.returncode == 1

    def test_rules_stuck_on_an_event_are_interrupted_and_only_that_event_skipped(self, tmp):
        # One event sleeps forever behind `except Exception` (which must not
        # swallow the interruption), one spins in pure Python, one is stuck in
        # a regex that backtracks (C code), one waits on a silent socket.
        conf = norules_conf(tmp, "import re, socket, time\n"
                                 "if inputTokens['k'] == 'sleep':\n"
                                 "    while True:\n"
                                 "        try:\n"
                                 "            time.sleep(0.05)\n"
                                 "        except Exception:\n"
                                 "            pass\n"
                                 "while inputTokens['k'] == 'spin':\n"
                                 "    pass\n"
                                 "if inputTokens['k'] == 'regex':\n"
                                 "    re.match(r'(a+)+$', 'a' * 40 + 'b')\n"
                                 "if inputTokens['k'] == 'socket':\n"
                                 "    a, b = socket.socketpair()\n"
                                 "    a.recv(1)\n"
                                 "writeTo('a')\n")
        with open(conf, 'a') as f:
            f.write('rulestimeout = 0.2\n')
        got, p = run_test_mode(conf, ''.join('k=%s\ngo\n' % k for k in (
            '1', 'sleep', '2', 'spin', '3', 'regex', '4', 'socket', '5')))
        assert [d['tokens']['k'] for d in got] == ['1', '2', '3', '4', '5']
        err = p.stderr.decode()
        assert re.search(r"r\.rules:5: still running after 0\.2 s \(rulestimeout\), interrupted; "
                         r"event skipped: \{'k': 'sleep'\}", err), err
        assert p.returncode == 1

    def test_a_stuck_rules_file_does_not_stop_a_real_run(self, tmp):
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'rec', RECORDER)
        write(os.path.join(tmp, 'r.rules'), "while inputTokens['n'] == '3':\n    pass\nwriteTo('a')\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\n"
                           "rulestimeout = 0.2\ninput i { module = src\n count = 6 }\n"
                           "output a { module = rec }\n")
        p = run([conf])
        # A rules error skipped an event: the run is not clean (exit 1).
        assert p.returncode == 1, p.stderr
        assert numbers_in(tmp, 'a') == [0, 1, 2, 4, 5]
        # Interrupted on the loop's line 1 or 2, wherever it was.
        assert re.search(r"r\.rules:[12]: still running after 0\.2 s \(rulestimeout\), "
                         r"interrupted; event skipped: \{'n': '3', 'msg': 'event 3'\}", p.stderr), p.stderr
        assert counters(p.stderr)['rules_errors'] == 1

    def test_unknown_output_is_an_error(self, tmp):
        conf = norules_conf(tmp, "writeTo('a')\nwriteTo('nosuch')\n")
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert [d['output'] for d in got] == ['a']      # sent before the error: stays sent
        assert "r.rules:2: LookupError: writeTo('nosuch'): no output named 'nosuch'" in p.stderr.decode()

    def test_the_original_email_example(self, tmp):
        shutil.copytree(EXAMPLES, os.path.join(tmp, 'ex'))
        events = ('date=Nov 22 07:00:01\nnode=prometheus\ndesc=kernel: EXT4-fs error\ngo\n'
                  'date=Nov 22 07:00:02\nnode=weed\ndesc=kernel: Out of memory\ngo\n'
                  'date=Nov 22 07:00:03\nnode=dope\ndesc=sshd[1]: Accepted password\ngo\n'
                  'date=Nov 22 07:00:04\nnode=gw1\ndesc=kernel: oops\ngo\n')
        got, p = run_test_mode(os.path.join(tmp, 'ex', 'email.conf'), events)
        assert got == [
            {'output': 'out', 'tokens': {'mailto': 'mohit@example.org',
                                         'mailsubject': 'Alert at Nov 22 07:00:01',
                                         'mailbody': 'kernel: EXT4-fs error'}},
            {'output': 'out', 'tokens': {'mailto': 'root', 'mailsubject': 'Alert at Nov 22 07:00:04',
                                         'mailbody': 'kernel: oops'}}]


##############################################################################
# Routing: real runs end to end
##############################################################################

class TestRouting(object):

    @pytest.mark.parametrize('selector', ['poll', 'select'])
    def test_batch_run_delivers_everything_to_every_output_and_exits_0(self, tmp, selector):
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 5000 }\n"
                           "output a { module = rec }\noutput b { module = rec }\n")
        env = dict(os.environ, LOOPER_SELECTOR=selector)
        p = run([conf, '-v'], env=env)
        assert ('<_Loop %sSelector' % selector.capitalize()) in p.stderr
        assert p.returncode == 0, p.stderr
        assert numbers_in(tmp, 'a') == list(range(5000))
        assert numbers_in(tmp, 'b') == list(range(5000))
        c = counters(p.stderr)
        assert c['events_in'] == 5000 and c['output.a.written'] == 5000

    def test_sh_modules_on_both_ends(self, tmp):
        sh_module(tmp, 'src', "while IFS= read -r line; do :; done\n"
                              "for i in 1 2 3; do printf 'n=%s\\ngo\\n' $i; done\n")
        sh_module(tmp, 'dst', "while IFS= read -r line; do\n"
                              "  case \"$line\" in quit) exit 0;; n=*) echo \"$line\" >> got;; esac\n"
                              "done\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = dst }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert read(os.path.join(tmp, 'got')) == 'n=1\nn=2\nn=3\n'

    def test_module_stderr_goes_to_the_log_tagged_with_its_name(self, tmp):
        sh_module(tmp, 'src', "cat >/dev/null\necho 'something odd happened' >&2\n")
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input myinput { module = src }\noutput o { module = x }\n")
        p = run([conf])
        assert re.search(r"input 'myinput' pid \d+: something odd happened", p.stderr), p.stderr

    def test_modules_run_without_a_shell_in_the_config_directory(self, tmp):
        py_module(tmp, 'src', r'''
import os, sys
config = sys.stdin.read()
with open('seen', 'w') as f:
    f.write(os.getcwd() + '\n' + config)
''')
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n evil = '$(touch pwned); `touch pwned2`' }\n"
                           "output o { module = x }\n")
        p = run([conf], cwd='/')
        assert p.returncode == 0, p.stderr
        seen = read(os.path.join(tmp, 'seen')).splitlines()
        assert seen[0] == os.path.realpath(tmp)
        assert "evil=$(touch pwned); `touch pwned2`" in seen
        assert not os.path.exists(os.path.join(tmp, 'pwned'))

    def test_a_stuck_output_does_not_hold_up_the_others(self, tmp):
        """'stuck' never reads; 'fast' still gets every event while stuck's
        queue has room; at the end stuck's events are counted as lost."""
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'rec', RECORDER)
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 3000 }\n"
                           "output fast { module = rec }\n"
                           "output stuck {\n module = stuck\n queuesize = 100000\n"
                           " draintimeout = 1\n}\n")
        looper = Looper(conf)
        wait_until(lambda: len(numbers_in(tmp, 'fast')) == 3000, what='fast to get all events')
        assert looper.wait() == 1
        c = counters(looper.log())
        assert c['output.fast.written'] == 3000
        # It never read a byte: every event is lost, none counted written.
        assert c['output.stuck.lost'] == 3000 and c['output.stuck.written'] == 0
        # Said in the log: what was queued at the drain deadline, and what it
        # had not read when it was stopped.
        said = re.findall(r"output 'stuck': could not deliver (\d+) event\(s\) within 1 s "
                          r"\(draintimeout\); they are lost|output 'stuck' \(pid \d+\) terminated "
                          r"by signal 15 \(SIGTERM\) after [\d.]+ s; (\d+) event\(s\) it never read "
                          r"are lost", looper.log())
        assert sum(int(a or b) for a, b in said) == 3000, looper.log()

    def test_shell_pipeline_with_dash_on_both_ends(self, tmp):
        lines = ''.join('Nov 22 07:00:%02d gw%d sshd[%d]: Failed password for root from 10.0.0.%d '
                        'port 22 ssh2\n' % (i, i % 2, i, i) for i in range(50))
        p = subprocess.run('gzip -c | gzip -dc | %s %s %s | grep node=gw1' % (
            PY, LOOPER, os.path.join(EXAMPLES, 'pipe.conf')), shell=True, input=lines,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            timeout=DEADLINE)
        assert p.returncode == 0, p.stderr
        out = p.stdout.splitlines()
        assert len(out) == 25
        assert all('program=sshd' in line and 'node=gw1' in line for line in out)

    def test_demo_runs_out_of_the_box(self):
        p = run([os.path.join(EXAMPLES, 'demo.conf')], cwd='/')
        assert p.returncode == 0, p.stderr
        alerts = p.stdout.splitlines()
        assert alerts and all('alert=' in line for line in alerts)
        assert any('alert=kernel' in line for line in alerts)
        assert any('alert=ssh-bruteforce' in line for line in alerts)
        assert p.stderr == ''

    def test_basic_example_copies_every_line(self, tmp):
        shutil.copytree(EXAMPLES, os.path.join(tmp, 'ex'))
        shutil.copytree(MODULES, os.path.join(tmp, 'modules'))
        conf = os.path.join(tmp, 'ex', 'basic.conf')
        write(conf, read(conf).replace('/tmp/easy.out', 'easy.out'))
        p = run([conf])
        assert p.returncode == 0, p.stderr
        sample = [l for l in read(os.path.join(EXAMPLES, 'sample.log')).splitlines() if l.strip()]
        out = read(os.path.join(tmp, 'ex', 'easy.out')).splitlines()
        assert len(out) == len(sample)
        assert 'desc=' in out[0]


##############################################################################
# Command line
##############################################################################

class TestCommandLine(object):

    def test_version_and_help(self):
        p = run(['--version'])
        assert p.returncode == 0 and re.match(r'looper \d+\.\d+\.\d+$', p.stdout.strip())
        p = run(['--help'])
        assert p.returncode == 0 and '--check' in p.stdout and '--test' in p.stdout

    def test_usage_errors_exit_2(self):
        assert run([]).returncode == 2
        assert run(['--bogus', 'x.conf']).returncode == 2
        assert run(['--check', '--test', 'x.conf']).returncode == 2

    def test_missing_config_exits_78(self, tmp):
        p = run([os.path.join(tmp, 'nope.conf')])
        assert p.returncode == 78 and 'cannot read the configuration' in p.stderr

    def test_sigterm_stops_gracefully_and_delivers_what_was_read(self, tmp):
        py_module(tmp, 'src', r'''
import sys, time
sys.stdin.read()
for i in range(100):
    sys.stdout.write('n=%d\ngo\n' % i)
sys.stdout.flush()
time.sleep(1000)
''')
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = rec }\n")
        looper = Looper(conf)
        wait_until(lambda: len(numbers_in(tmp, 'o')) == 100)
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0, looper.log()
        assert 'stopping: signal SIGTERM' in looper.log()
        assert numbers_in(tmp, 'o') == list(range(100))


##############################################################################
# Supervision: processes, restarts, stop sequence (RELIABILITY.md 1-9)
##############################################################################

FAST = " restartdelay = 0.05\n maxrestartdelay = 0.05\n closetimeout = 0.5\n"

# An input that reports its own state into files, then behaves as told by
# the file 'mode' in its directory: 'crash' exits 1, 'stay' keeps running.
PROBE_IN = r'''
import os, sys
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
fds = [str(fd) for fd in range(1024) if is_open(fd)]
sys.stdin.read()
pid = os.getpid()
with open('probe.%d' % pid, 'w') as f:
    f.write(' '.join(fds) + '\n')
    status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    f.write('%s %s %d\n' % (status['SigIgn'].strip(), status['SigBlk'].strip(), os.getpgid(0)))
mode = open('mode').read().strip() if os.path.exists('mode') else 'crash'
if mode == 'crash':
    sys.exit(3)
import time
sys.stdout.write('pid=%d\ngo\n' % pid)
sys.stdout.flush()
time.sleep(1000)
'''


def probes(directory):
    out = {}
    for name in os.listdir(directory):
        if name.startswith('probe.'):
            text = read(os.path.join(directory, name))
            lines = text.splitlines()
            if len(lines) == 2 and text.endswith('\n'):     # both lines written
                out[int(name[6:])] = (lines[0].split(), lines[1].split())
    return out


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def rss_kb(pid):
    return int(proc_status(pid)['VmRSS'].split()[0])


def zombies_of(pid):
    return [c for c in children_of(pid) if proc_state(c) == 'Z']


class TestSupervision(object):

    def probe_conf(self, tmp, extra_in='', outputs="output o { module = rec }\n"):
        py_module(tmp, 'probe', PROBE_IN)
        py_module(tmp, 'rec', RECORDER)
        return config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i {\n module = probe\n" + FAST + extra_in + "}\n" + outputs)

    def test_modules_get_exactly_fds_0_1_2_default_signals_and_own_group(self, tmp):
        conf = self.probe_conf(tmp)
        # Looper started with SIGINT and SIGQUIT ignored, as `cmd &` does.
        looper = Looper(conf, preexec_fn=lambda: [signal.signal(s, signal.SIG_IGN)
                                                  for s in (signal.SIGINT, signal.SIGQUIT)])
        wait_until(lambda: len(probes(tmp)) >= 4, what='four starts of the crashing module')
        looper.signal(signal.SIGTERM)
        looper.wait()
        for pid, (fds, (sigign, sigblk, pgid)) in probes(tmp).items():
            assert fds == ['0', '1', '2'], fds
            # The probe's own Python ignores SIGPIPE and SIGXFSZ at its start-up;
            # anything else ignored (SIGINT, SIGQUIT here) was inherited.
            own = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
            assert int(sigign, 16) & ~own == 0 and int(sigblk, 16) == 0, (sigign, sigblk)
            assert int(pgid) == pid

    def test_every_exit_is_reported_with_cause_and_restarts_are_paced(self, tmp):
        conf = self.probe_conf(tmp, " maxrestartdelay = 0.4\n".replace('0.4', '0.4'))
        write(conf, read(conf).replace(" maxrestartdelay = 0.05\n", ""))
        looper = Looper(conf)
        log = looper.wait_log(r'exited with status 3 after \d+\.\d s; restarting it in', count=5)
        looper.signal(signal.SIGTERM)
        looper.wait()
        delays = [float(d) for d in re.findall(r'restarting it in ([\d.]+) s', log)]
        assert delays[:5] == [0.05, 0.1, 0.2, 0.4, 0.4], delays

    def test_a_crash_loop_keeps_cpu_low(self, tmp):
        conf = self.probe_conf(tmp)
        write(conf, read(conf).replace(" maxrestartdelay = 0.05\n", " maxrestartdelay = 0.5\n"))
        looper = Looper(conf)
        looper.wait_log(r'restarting it in 0.5 s', count=2)
        with open('/proc/%d/stat' % looper.proc.pid) as f:
            before = sum(int(x) for x in f.read().rsplit(')', 1)[1].split()[11:13])
        t0 = time.monotonic()
        looper.wait_log(r'restarting it in 0.5 s', count=4)
        with open('/proc/%d/stat' % looper.proc.pid) as f:
            after = sum(int(x) for x in f.read().rsplit(')', 1)[1].split()[11:13])
        elapsed = time.monotonic() - t0
        looper.signal(signal.SIGTERM)
        looper.wait()
        ticks = os.sysconf('SC_CLK_TCK')
        assert (after - before) / ticks < 0.2 * elapsed, (after - before, elapsed)

    def test_killed_module_is_reported_by_signal_and_its_group_is_stopped(self, tmp):
        write(os.path.join(tmp, 'mode'), 'stay')
        sh_module(tmp, 'spawner', "cat >/dev/null\nsleep 1000 &\necho child=$! > child.pid\n"
                                  "printf 'a=1\\ngo\\n'\nwait\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i {\n module = spawner\n" + FAST + "}\n"
                           "output o { module = rec }\n")
        looper = Looper(conf)
        wait_until(lambda: re.match(r'child=\d+\n', read(os.path.join(tmp, 'child.pid'))))
        grandchild = int(read(os.path.join(tmp, 'child.pid')).split('=')[1])
        module = [c for c in children_of(looper.proc.pid)][0]
        os.kill(module, signal.SIGKILL)
        looper.wait_log(r'terminated by signal 9 \(SIGKILL\)')
        looper.signal(signal.SIGTERM)
        looper.wait()
        # SIGTERM went to the whole group of the restarted module; the first
        # group's grandchild was orphaned when its parent was killed with
        # SIGKILL from outside, which no supervisor can prevent.
        gc2 = int(read(os.path.join(tmp, 'child.pid')).split('=')[1])
        wait_until(lambda: not alive(gc2), what='grandchild to be gone')
        if os.path.exists('/proc/%d' % grandchild):
            os.kill(grandchild, signal.SIGKILL)

    def test_stop_sequence_quit_then_sigterm_then_sigkill(self, tmp):
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'rec', RECORDER)
        sh_module(tmp, 'stubborn', "trap '' TERM\nwhile :; do read -r line || sleep 0.05; done\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 3 }\n"
                           "output good { module = rec\n closetimeout = 0.5 }\n"
                           "output bad {\n module = stubborn\n closetimeout = 0.5\n}\n")
        t0 = time.monotonic()
        p = run([conf])
        took = time.monotonic() - t0
        assert took < 5, took
        log = p.stderr
        assert re.search(r"output 'bad' \(pid \d+\) did not exit within 0.5 s of quit/EOF; "
                         r"sending SIGTERM", log), log
        assert re.search(r"output 'bad' \(pid \d+\) did not exit within 0.5 s of SIGTERM; "
                         r"sending SIGKILL", log), log
        assert "output 'good'" not in log.replace("outputs 'good'", '') or \
            'SIGTERM' not in ''.join(l for l in log.splitlines() if "output 'good'" in l)
        assert numbers_in(tmp, 'good') == [0, 1, 2]

    def test_no_zombies_no_fd_or_memory_growth_after_100_restarts(self, tmp):
        write(os.path.join(tmp, 'mode'), 'stay')
        conf = self.probe_conf(tmp)
        looper = Looper(conf)
        wait_until(lambda: len(probes(tmp)) >= 1)

        def cycle(n):
            for _ in range(n):
                pids = set(probes(tmp))
                module = wait_until(lambda: [c for c in children_of(looper.proc.pid)
                                             if c in pids and alive(c)])
                os.kill(module[0], signal.SIGKILL)
                wait_until(lambda: len(probes(tmp)) > len(pids), what='the restart')
        cycle(5)
        fds, rss = fd_count(looper.proc.pid), rss_kb(looper.proc.pid)
        cycle(100)
        fds2, rss2 = fd_count(looper.proc.pid), rss_kb(looper.proc.pid)
        assert zombies_of(looper.proc.pid) == []
        looper.signal(signal.SIGUSR1)
        looper.wait_log(r'counters: ')
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0
        print('fds %d -> %d, rss %d kB -> %d kB after 100 restarts' % (fds, fds2, rss, rss2))
        assert fds2 == fds
        assert rss2 - rss < 1024, (rss, rss2)
        assert counters(looper.log())['input.i.restarts'] >= 105

    def test_a_module_that_cannot_be_started_gives_one_clear_error(self, tmp):
        py_module(tmp, 'vanish', "import os, sys\nsys.stdin.read()\nos.remove(sys.argv[0])\nsys.exit(1)\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i {\n module = vanish\n restartdelay = 0.05\n"
                           " maxrestartdelay = 30\n}\noutput o { module = rec }\n")
        looper = Looper(conf)
        looper.wait_log(r'cannot start .*vanish: the file is gone or not executable; .* retrying in 30 s')
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0
        assert len(re.findall('cannot start', looper.log())) == 1

    def test_output_that_exits_while_idle_or_closes_stdin_is_restarted(self, tmp):
        py_module(tmp, 'src', r'''
import sys, time
sys.stdin.read()
for i in range(20):
    sys.stdout.write('n=%d\ngo\n' % i)
    sys.stdout.flush()
    time.sleep(0.02)
''')
        py_module(tmp, 'rec', RECORDER)
        # First start: closes stdin and exits at once; later starts record.
        py_module(tmp, 'flaky', "import os, sys\n"
                  "if not os.path.exists('started'):\n"
                  "    open('started', 'w').close(); os.close(0); sys.exit(0)\n"
                  "exec(open('rec').read())\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\n"
                           "output flaky {\n module = flaky\n" + FAST + "}\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert numbers_in(tmp, 'flaky') == list(range(20))
        assert re.search(r"output 'flaky' \(pid \d+\) (exited with status 0|terminated by "
                         r"signal 15) after [\d.]+ s.*; restarting it in", p.stderr), p.stderr
        assert counters(p.stderr)['output.flaky.restarts'] == 1


##############################################################################
# Delivery: queues, write deadline, confirmed delivery (RELIABILITY.md 10-16)
##############################################################################

# A confirming output with faults on demand (config keys), each fault once
# per event number (marker files), logging every event it confirms to
# $LOOPER_NAME.jsonl:
#   error_every=K  answer 'error busy' the first time event n%K==0 arrives
#   hang_at=N      never answer event N the first time (confirm timeout)
#   die_at=N       exit 1 on event N the first time, before answering
#   extra_ok_at=N  answer event N with two 'ok' lines the first time (desync)
#   trickle_at=N   answer event N with 'o' and no newline the first time
CONFIRMER = r'''
import json, os, sys, time
name = os.environ['LOOPER_NAME']
config = {}
stdin = sys.stdin.buffer
for raw in stdin:
    line = raw.rstrip(b'\n').decode()
    if line == 'configure':
        break
    k, _, v = line.partition('=')
    config[k] = v
def once(kind, n):
    marker = '%s.%s.%s' % (name, kind, n)
    if os.path.exists(marker):
        return False
    open(marker, 'w').close()
    return True
def num(key):
    return int(config[key]) if key in config else None
out = open(name + '.jsonl', 'a')
if num('hang_configure') is not None and once('hangconf', 0):
    time.sleep(1000)
sys.stdout.write('ok\n'); sys.stdout.flush()
event = {}
for raw in stdin:
    line = raw.rstrip(b'\n').decode()
    if line == 'quit':
        break
    if line != 'go':
        k, _, v = line.partition('=')
        event[k] = v
        continue
    n = int(event.get('n', -1))
    reply = 'ok\n'
    if num('error_every') and n % num('error_every') == 0 and once('error', n):
        reply = 'error busy\n'
    elif n == num('hang_at') and once('hang', n):
        time.sleep(1000)
    elif n == num('die_at') and once('die', n):
        sys.exit(1)
    elif n == num('extra_ok_at') and once('extra', n):
        reply = 'ok\nok\n'
    elif n == num('trickle_at') and once('trickle', n):
        sys.stdout.write('o'); sys.stdout.flush()
        time.sleep(1000)
    if reply.startswith('ok'):
        out.write(json.dumps(event) + '\n'); out.flush()
    sys.stdout.write(reply); sys.stdout.flush()
    event = {}
'''


def delivery_conf(tmp, count, outputs, input_extra=''):
    py_module(tmp, 'src', COUNTER_IN)
    py_module(tmp, 'rec', RECORDER)
    py_module(tmp, 'confirmer', CONFIRMER)
    sh_module(tmp, 'stuck', 'exec sleep 1000\n')
    text = ("inputmodulepath = .\noutputmodulepath = .\n"
            "input i {\n module = src\n count = %d\n%s}\n" % (count, input_extra))
    for name, body in outputs:
        text += "output %s {\n%s}\n" % (name, body)
    return config(tmp, text)


class TestDelivery(object):

    def test_drop_policy_drops_and_counts_when_the_queue_is_full(self, tmp):
        conf = delivery_conf(tmp, 2000, [
            ('fast', " module = rec\n"),
            ('stuck', " module = stuck\n queuesize = 10\n overflow = drop\n draintimeout = 0.5\n"
                      " closetimeout = 0.5\n")])
        p = run([conf])
        assert p.returncode == 1, p.stderr
        c = counters(p.stderr)
        assert numbers_in(tmp, 'fast') == list(range(2000))
        assert c['output.stuck.dropped'] >= 1900
        assert c['output.stuck.dropped'] + c['output.stuck.lost'] == 2000
        assert c['output.stuck.written'] == 0
        assert re.search(r"output 'stuck': queue full \(10 events, \d+ bytes\), dropped an event",
                         p.stderr)

    def test_block_policy_loses_nothing_with_a_slow_output(self, tmp):
        py_module(tmp, 'slow', "import time\nexec(open('rec').read().replace("
                               "\"    if line == 'go':\", \"    if line == 'go':\\n        time.sleep(0.001)\"))\n")
        conf = delivery_conf(tmp, 1500, [
            ('slow', " module = slow\n queuesize = 5\n overflow = block\n"),
            ('fast', " module = rec\n")])
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert numbers_in(tmp, 'slow') == list(range(1500))
        assert numbers_in(tmp, 'fast') == list(range(1500))
        assert counters(p.stderr)['output.slow.dropped'] == 0

    def test_write_deadline_restarts_a_hung_output_and_keeps_its_queue(self, tmp):
        # First start never reads; later starts record.
        py_module(tmp, 'hangonce', "import os, time\n"
                  "if not os.path.exists('hung'):\n"
                  "    open('hung', 'w').close(); time.sleep(1000)\n"
                  "exec(open('rec').read())\n")
        conf = delivery_conf(tmp, 3000, [
            ('h', " module = hangonce\n writetimeout = 1\n" + FAST)])
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert re.search(r"output 'h' \(pid \d+\): accepted no data for \d+ s \(writetimeout\); "
                         r"stopping it with SIGTERM", p.stderr), p.stderr
        assert numbers_in(tmp, 'h') == list(range(3000))

    def test_confirm_ok_error_retry_and_redelivery(self, tmp):
        conf = delivery_conf(tmp, 60, [
            ('c', " module = confirmer\n confirm = yes\n error_every = 7\n die_at = 20\n"
                  " hang_at = 30\n confirmtimeout = 0.5\n retrydelay = 0.01\n" + FAST)])
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert numbers_in(tmp, 'c') == list(range(60))
        c = counters(p.stderr)
        assert c['output.c.confirmed'] == 60
        assert c['output.c.retried'] == 9           # 0, 7, 14, ... 56
        assert c['output.c.restarts'] == 2           # died at 20, hung at 30
        assert 'could not deliver an event (busy); resending it in 0.01 s' in p.stderr
        assert re.search(r"no answer for an event within 0.5 s \(confirmtimeout\)", p.stderr)

    def test_confirm_configure_timeout_desync_and_trickle(self, tmp):
        conf = delivery_conf(tmp, 30, [
            ('c', " module = confirmer\n confirm = yes\n hang_configure = 1\n extra_ok_at = 10\n"
                  " trickle_at = 20\n confirmtimeout = 0.5\n" + FAST)])
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert 'no answer for configure within 0.5 s' in p.stderr
        assert "protocol desync: got 'ok' when no answer was due" in p.stderr
        assert numbers_in(tmp, 'c')[-1] == 29
        # At least once and in order: a duplicate may follow a restart.
        got = numbers_in(tmp, 'c')
        assert sorted(set(got)) == list(range(30))
        assert all(b >= a or b == a - 1 for a, b in zip(got, got[1:])), got

    def test_confirmed_events_survive_a_looper_stop_with_a_dead_output(self, tmp):
        """Shutdown waits for the restarted output to confirm its queue."""
        conf = delivery_conf(tmp, 40, [
            ('c', " module = confirmer\n confirm = yes\n die_at = 39\n" + FAST)])
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert numbers_in(tmp, 'c') == list(range(40))


##############################################################################
# Operations: reload, log reopen, counters (RELIABILITY.md 20-22)
##############################################################################

# An input that emits one event per line appended to 'feed' (so tests pace
# it), and exits 0 when the line 'END' arrives.
FEED_IN = r'''
import os, sys, time
sys.stdin.read()
pos = 0
while True:
    try:
        with open('feed') as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        data = ''
    if data.endswith('\n'):
        pos += len(data)
        for line in data.splitlines():
            if line == 'END':
                sys.exit(0)
            sys.stdout.write('n=%s\ngo\n' % line)
        sys.stdout.flush()
    time.sleep(0.01)
'''


def feed(directory, *lines):
    with open(os.path.join(directory, 'feed'), 'a') as f:
        f.write(''.join('%s\n' % line for line in lines))


class TestOperations(object):

    def setup_conf(self, tmp, rules, outputs=('a', 'b'), extra=''):
        py_module(tmp, 'feedin', FEED_IN)
        py_module(tmp, 'rec', RECORDER)
        write(os.path.join(tmp, 'r.rules'), rules)
        text = ("inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\nlogfile = looper.log\n"
                + extra + "input i { module = feedin }\n")
        for name in outputs:
            text += "output %s { module = rec\n closetimeout = 1 }\n" % name
        return config(tmp, text)

    def test_reload_keeps_unchanged_modules_and_rules_state_and_refuses_bad_configs(self, tmp):
        rules = ("try:\n    seen += 1\nexcept NameError:\n    seen = 1\n"
                 "outputTokens['seen'] = seen\nwriteTo(*sorted(OUTS))\n")
        conf = self.setup_conf(tmp, "OUTS = ['a', 'b']\n" + rules)
        logfile = os.path.join(tmp, 'looper.log')
        looper = Looper(conf)
        feed(tmp, 1, 2)
        wait_until(lambda: len(recorded(tmp, 'b')) == 2)
        pids = dict((n, children_of(looper.proc.pid)) for n in ('before',))
        # A bad new configuration: logged, the old one keeps running.
        good = read(conf)
        write(conf, good + "output broken {\n")
        looper.signal(signal.SIGHUP)
        wait_until(lambda: 'reload refused' in read(logfile), what='reload refused')
        assert 'never closed' in read(logfile)
        feed(tmp, 3)
        wait_until(lambda: len(recorded(tmp, 'b')) == 3)
        # A good one: output b removed, c added, rules file unchanged -> state kept.
        write(conf, good.replace("output b { module = rec\n closetimeout = 1 }\n",
                                 "output c { module = rec\n closetimeout = 1 }\n"))
        write(os.path.join(tmp, 'r.rules'), "OUTS = ['a', 'c']\n" + rules)
        looper.signal(signal.SIGHUP)
        wait_until(lambda: 'reloaded:' in read(logfile))
        feed(tmp, 4)
        wait_until(lambda: len(recorded(tmp, 'c')) == 1)
        feed(tmp, 'END')
        assert looper.wait() == 0, read(logfile)
        a = recorded(tmp, 'a')
        assert [e['n'] for e in a] == ['1', '2', '3', '4']
        # The rules file changed, so its state started over.
        assert [e['seen'] for e in a] == ['1', '2', '3', '1']
        assert [e['n'] for e in recorded(tmp, 'b')] == ['1', '2', '3']
        log = read(logfile)
        assert "output 'b' was removed by the reload" in log
        # Unchanged modules kept running: one start each of i and a.
        assert log.count("starting") == 1
        assert len(re.findall(r"output 'a' \(pid", log)) <= 1

    def test_reload_keeps_rules_state_when_the_file_is_unchanged(self, tmp):
        conf = self.setup_conf(tmp, "try:\n    seen += 1\nexcept NameError:\n    seen = 1\n"
                                    "outputTokens['seen'] = seen\nwriteTo('a')\n", outputs=('a',))
        looper = Looper(conf)
        feed(tmp, 1)
        wait_until(lambda: len(recorded(tmp, 'a')) == 1)
        looper.signal(signal.SIGHUP)
        wait_until(lambda: 'reloaded:' in read(os.path.join(tmp, 'looper.log')))
        feed(tmp, 2, 'END')
        assert looper.wait() == 0
        assert [e['seen'] for e in recorded(tmp, 'a')] == ['1', '2']

    def test_sighup_reopens_the_log_file(self, tmp):
        conf = self.setup_conf(tmp, "writeTo('a')\n", outputs=('a',))
        logfile = os.path.join(tmp, 'looper.log')
        looper = Looper(conf)
        wait_until(lambda: 'starting' in read(logfile))
        os.rename(logfile, logfile + '.1')
        looper.signal(signal.SIGHUP)
        wait_until(lambda: 'reloaded:' in read(logfile), what='a new log file')
        feed(tmp, 'END')
        assert looper.wait() == 0
        assert 'finished:' in read(logfile) and 'finished:' not in read(logfile + '.1')

    def test_sigusr1_logs_counters_a_script_can_parse(self, tmp):
        conf = self.setup_conf(tmp, "if inputTokens['n'] == 'bad':\n    1 / 0\nwriteTo('a')\n",
                               outputs=('a',))
        looper = Looper(conf)
        feed(tmp, 1, 2, 'bad', 3)
        wait_until(lambda: len(recorded(tmp, 'a')) == 3)
        looper.signal(signal.SIGUSR1)
        wait_until(lambda: re.search(r'counters: .*\n', read(os.path.join(tmp, 'looper.log'))))
        c = counters(read(os.path.join(tmp, 'looper.log')))
        assert c['events_in'] == 4 and c['rules_errors'] == 1
        assert c['output.a.written'] == 3 and c['output.a.queued'] == 0
        assert c['input.i.restarts'] == 0
        feed(tmp, 'END')
        assert looper.wait() == 1      # the rules error

    def test_a_second_sigterm_stops_without_draining(self, tmp):
        py_module(tmp, 'src', COUNTER_IN)
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 50 }\n"
                           "output s { module = stuck\n draintimeout = 60\n closetimeout = 0.5 }\n")
        looper = Looper(conf)
        looper.wait_log('stopping: the input finished')
        looper.signal(signal.SIGTERM)
        looper.wait_log('second stop request')
        assert looper.wait(10) == 1
        assert counters(looper.log())['output.s.lost'] == 50


##############################################################################
# The shipped modules on their own (syslog_in, logfile_out)
##############################################################################


SYSLOG_IN = os.path.join(HERE, 'modules', 'syslog_in')
LOGFILE_OUT = os.path.join(HERE, 'modules', 'logfile_out')
_MOD_PY = PY
_MOD_DEADLINE = 20.0        # seconds: the longest any single wait here may take
_MOD_TIME = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$')


##############################################################################
# Helpers for the shipped modules' tests (prefixed _mod_)
##############################################################################

def _mod_wait(predicate, what, timeout=_MOD_DEADLINE):
    """Poll an observable condition until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %g s waiting for %s' % (timeout, what))
        time.sleep(0.01)


def _mod_config(**keys):
    return ''.join('%s=%s\n' % item for item in keys.items()).encode()


def _mod_events(data):
    """Protocol bytes -> list of events, each a list of (token, value) str pairs."""
    events, current = [], []
    for line in data.decode('utf-8', 'surrogateescape').split('\n'):
        if line == 'go':
            events.append(current)
            current = []
        elif line:
            token, sep, value = line.partition('=')
            assert sep, 'not token=value: %r' % line
            current.append((token, value))
    assert not current, 'an event without its go: %r' % current
    return events


def _mod_syslog_in(directory, text=None, config=None, env=None, **keys):
    """Run syslog_in in batch mode over `text` (bytes or str) written to
    directory/in.log; returns (events, CompletedProcess)."""
    if text is not None:
        with open(os.path.join(directory, 'in.log'), 'wb') as f:
            f.write(text if isinstance(text, bytes) else text.encode('utf-8', 'surrogateescape'))
        keys.setdefault('logfile', 'in.log')
    p = subprocess.run([_MOD_PY, SYSLOG_IN], input=config or _mod_config(**keys),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=directory,
                       env=env, timeout=_MOD_DEADLINE)
    assert b'Traceback' not in p.stderr, p.stderr.decode()
    return _mod_events(p.stdout), p


def _mod_one(directory, line):
    """The tokens (a dict, in order) of the single event for one line."""
    events, p = _mod_syslog_in(directory, line + '\n')
    assert p.returncode == 0, p.stderr
    assert len(events) == 1, events
    return events[0]


def _mod_follow(tmp_path, text, **keys):
    """syslog_in following tmp_path/f.log, which starts as `text`:
    (the file's path, the running module)."""
    path = tmp_path / 'f.log'
    path.write_text(text)
    keys.setdefault('sleeptime', '0.05')
    return path, _ModProcess(SYSLOG_IN, str(tmp_path),
                             _mod_config(logfile='f.log', follow='yes', **keys))


class _ModStream(object):
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

    def events(self):
        data = self.data
        return _mod_events(data[:data.rfind(b'go\n') + 3] if b'go\n' in data else b'')

    def wait_events(self, count, what='events'):
        return _mod_wait(lambda: len(self.events()) >= count and self.events(),
                         '%d %s (have %r)' % (count, what, self.data[-300:]))


class _ModProcess(object):
    """A module running in the background; stop() kills it if still there."""

    def __init__(self, module, directory, config=None, env=None, stdin_open=False):
        self.proc = subprocess.Popen([_MOD_PY, module], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=directory, env=env)
        self.out = _ModStream(self.proc.stdout)
        self.err = _ModStream(self.proc.stderr)
        if config is not None:
            self.proc.stdin.write(config)
            self.proc.stdin.flush()
        if not stdin_open:
            self.proc.stdin.close()

    def send(self, text):
        self.proc.stdin.write(text.encode('utf-8', 'surrogateescape') if isinstance(text, str) else text)
        self.proc.stdin.flush()

    def replies(self):
        return self.out.data.decode().splitlines()

    def wait_replies(self, count):
        return _mod_wait(lambda: len(self.replies()) >= count and self.replies(),
                         '%d replies (have %r, stderr %r)' % (count, self.out.data, self.err.data))

    def wait_exit(self):
        return self.proc.wait(timeout=_MOD_DEADLINE)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=_MOD_DEADLINE)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except (OSError, ValueError):
                pass


def _mod_file_events(path, growing=False):
    """The events of a logfile_out logfmt file as (time, rest) pairs.  While
    the module may still be writing (growing), a last line without its
    newline is not complete yet and is left out; otherwise it is an error."""
    try:
        with open(path, 'rb') as f:
            lines = f.read().decode('utf-8', 'surrogateescape').split('\n')
    except OSError:
        return []
    last = lines.pop()
    assert growing or last == '', 'the last line has no newline'
    return [tuple(line.split(' ', 1)) if ' ' in line else (line, '') for line in lines]


def _mod_logfile_out(directory, events_text, stdin_tail='quit\n', env=None, **keys):
    """Run logfile_out with the given configuration and protocol text;
    returns the CompletedProcess."""
    keys.setdefault('filename', 'out.log')
    data = _mod_config(**keys) + b'configure\n' + events_text.encode('utf-8', 'surrogateescape') \
        + stdin_tail.encode()
    p = subprocess.run([_MOD_PY, LOGFILE_OUT], input=data, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, cwd=directory, env=env, timeout=_MOD_DEADLINE)
    assert b'Traceback' not in p.stderr, p.stderr.decode()
    return p


LINES_OF_EVERY_KIND = [
    'Nov 22 07:39:24 prometheus kernel: Out of memory: Killed process 123',
    'Nov  2 07:39:24 dope sshd[412]: Failed password for root from 10.0.0.1 port 22 ssh2',
    '<38>Nov 22 07:39:24 dope sshd[412]: Accepted password for weed',
    '2026-11-22T07:39:24.123456+00:00 weed CRON[99]: (root) CMD (true)',
    '<34>1 2026-11-22T07:39:24Z gw1 su 77 ID47 - su root failed',
    'Nov 22 07:39:24 gw1 -- MARK --',
    'this is not syslog',
    '<999>Nov 22 07:39:24 gw1 x: y',
    'Nov 22 07:39:24 gw1 a[]: b',
    '2026-11-22T08:29:01.762283+00:00 vm myapp[4242] rsyslog writes RFC 5424 so',
    'Nov 22 07:39:24 gw1 foo bar',
]


##############################################################################
# Tests
##############################################################################

class TestModules(object):

    # -- syslog_in: formats ---------------------------------------------------

    def test_syslog_in_fast_and_careful_paths_agree_for_any_tokens(self, tmp_path):
        """The whole-chunk fast path against the line-by-line one, for every
        shape of line and several choices of tokens."""
        import importlib.machinery
        import importlib.util
        loader = importlib.machinery.SourceFileLoader('syslog_in_under_test', SYSLOG_IN)
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
        loader.exec_module(module)
        lines = read(os.path.join(HERE, 'examples', 'sample.log')).splitlines() + [
            '<13>Nov 22 07:39:24 h p[1]: m', '<999>Nov 22 07:39:24 h p: m', 'Nov 22 07:39:24 h p[1] m',
            '<165>1 2026-11-22T07:39:26Z h app - - - x', 'x', 'Nov 22 07:39:24 host', '']
        text = '\n'.join(lines) + '\n'
        for chosen in (module.TOKENS, ('date', 'node', 'desc'), ('message',), ('pid', 'message'),
                       ('severity', 'desc'), ('program', 'pid')):
            fast = module._Parser(65536, chosen).events(text)
            careful = ''.join(module._event_slowly(line, frozenset(chosen)) for line in lines if line)
            assert fast == careful, chosen

    def test_syslog_in_pri_prefix(self, tmp_path):
        event = dict(_mod_one(str(tmp_path), '<38>Nov 22 07:39:24 dope sshd[1]: Accepted'))
        assert event['facility'] == 'auth' and event['severity'] == 'info'    # 38 = 4*8 + 6
        assert event['date'] == 'Nov 22 07:39:24' and event['program'] == 'sshd'
        event = dict(_mod_one(str(tmp_path), '<3>2026-11-22T07:39:24Z gw1 kernel: oops'))
        assert (event['facility'], event['severity']) == ('kern', 'err')
        assert 'facility' not in dict(_mod_one(str(tmp_path), 'Nov 22 07:39:24 dope x: y'))

    def test_syslog_in_skips_only_empty_lines(self, tmp_path):
        events, p = _mod_syslog_in(str(tmp_path), '\n\nNov 22 07:39:24 a b: c\n\n \n\n')
        assert [dict(e).get('desc') for e in events] == ['b: c', ' ']

    def test_syslog_in_fast_and_careful_paths_agree(self, tmp_path):
        # The chunk-wide parser takes the common shapes; with a small maxline
        # it is off and every line goes through the line-by-line one.  The
        # events must be the same either way.
        text = '\n'.join(LINES_OF_EVERY_KIND * 50 + ['Nov 22 07:39:24 h p[%d]: m %d' % (i, i)
                                                     for i in range(100)]) + '\n'
        fast, p = _mod_syslog_in(str(tmp_path), text)
        careful, p = _mod_syslog_in(str(tmp_path), text, maxline='2000')
        assert p.returncode == 0 and p.stderr == b''
        assert len(fast) == len(LINES_OF_EVERY_KIND) * 50 + 100
        assert fast == careful

    def test_syslog_in_last_line_without_newline_in_batch_mode(self, tmp_path):
        events, p = _mod_syslog_in(str(tmp_path), 'Nov 22 07:39:24 a b: one\nNov 22 07:39:24 a b: two')
        assert p.returncode == 0
        assert [dict(e)['message'] for e in events] == ['one', 'two']

    def test_syslog_in_many_lines_split_across_reads(self, tmp_path):
        lines = ['Nov 22 07:39:24 host%d prog[%d]: message %d %s' % (i % 7, i, i, 'x' * (i % 300))
                 for i in range(20000)]
        events, p = _mod_syslog_in(str(tmp_path), '\n'.join(lines) + '\n')
        assert p.returncode == 0
        assert len(events) == 20000
        assert [dict(e)['pid'] for e in events] == [str(i) for i in range(20000)]
        assert dict(events[12345])['message'] == 'message 12345 ' + 'x' * (12345 % 300)

    def test_syslog_in_example_sample_log(self, tmp_path):
        sample = os.path.join(HERE, 'examples', 'sample.log')
        events, p = _mod_syslog_in(str(tmp_path), logfile=sample)
        assert p.returncode == 0
        with open(sample) as f:
            assert len(events) == len([line for line in f if line.strip()])
        kernel = [dict(e)['node'] for e in events if dict(e).get('desc', '').startswith('kernel')]
        assert {'prometheus', 'dope', 'weed'} <= set(kernel)

    # -- syslog_in: configuration and sources --------------------------------

    def test_syslog_in_filename_alias_and_unknown_keys(self, tmp_path):
        events, p = _mod_syslog_in(str(tmp_path), 'Nov 22 07:39:24 a b: c\n',
                                   config=b'module=syslog_in\nfilename=in.log\nwhatever=1\n\n')
        assert p.returncode == 0 and len(events) == 1

    def test_syslog_in_dash_reads_looper_stdin_fd(self, tmp_path):
        r, w = os.pipe()
        os.write(w, b'Nov 22 07:39:24 a b[1]: from the pipe\nnot syslog\n')
        os.close(w)
        env = dict(os.environ, LOOPER_STDIN_FD=str(r))
        p = subprocess.run([_MOD_PY, SYSLOG_IN], input=b'logfile=-\n', stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, pass_fds=(r,), timeout=_MOD_DEADLINE)
        os.close(r)
        assert p.returncode == 0, p.stderr
        events = _mod_events(p.stdout)
        assert [dict(e)['desc'] for e in events] == ['b[1]: from the pipe', 'not syslog']

    def test_syslog_in_dash_without_variable_reads_fd_0(self, tmp_path):
        # By hand: the configuration, then (after its EOF) the data on fd 0.
        # Here fd 0 is a file, so after the configuration's EOF nothing is left.
        events, p = _mod_syslog_in(str(tmp_path), config=b'logfile=-\n',
                                   env=dict((k, v) for k, v in os.environ.items()
                                            if k != 'LOOPER_STDIN_FD'))
        assert p.returncode == 0 and events == []

    def test_syslog_in_start_end_in_batch_mode(self, tmp_path):
        events, p = _mod_syslog_in(str(tmp_path), 'Nov 22 07:39:24 a b: c\n', start='end')
        assert p.returncode == 0 and events == []

    # -- syslog_in: follow mode ----------------------------------------------

    def test_syslog_in_follow_picks_up_appended_lines(self, tmp_path):
        path, m = _mod_follow(tmp_path, 'Nov 22 07:39:24 a b: one\n')
        try:
            m.out.wait_events(1)
            with open(str(path), 'a') as f:
                f.write('Nov 22 07:39:25 a b: two\nNov 22 07:39:26 a b: thr')
            m.out.wait_events(2)
            with open(str(path), 'a') as f:                 # the partial line waited
                f.write('ee\n')
            events = m.out.wait_events(3)
            assert [dict(e)['message'] for e in events] == ['one', 'two', 'three']
            assert m.proc.poll() is None                    # still following
        finally:
            m.stop()

    def test_syslog_in_follow_rotation(self, tmp_path):
        path, m = _mod_follow(tmp_path, 'Nov 22 07:39:24 a b: one\n')
        try:
            m.out.wait_events(1)
            with open(str(path), 'a') as f:
                f.write('Nov 22 07:39:25 a b: two')          # no newline yet
            os.rename(str(path), str(tmp_path / 'f.log.1'))
            with open(str(tmp_path / 'f.log.1'), 'a') as f:  # written after the rename
                f.write('\nNov 22 07:39:26 a b: three\n')
            path.write_text('Nov 22 07:39:27 a b: four\n')
            events = m.out.wait_events(4)
            assert [dict(e)['message'] for e in events] == ['one', 'two', 'three', 'four']
            with open(str(path), 'a') as f:
                f.write('Nov 22 07:39:28 a b: five\n')
            events = m.out.wait_events(5)
            assert dict(events[4])['message'] == 'five'
            _mod_wait(lambda: b'rotated' in m.err.data, 'a note on stderr')
        finally:
            m.stop()

    def test_syslog_in_follow_truncation(self, tmp_path):
        path, m = _mod_follow(tmp_path, 'Nov 22 07:39:24 a b: one\nNov 22 07:39:24 a b: two\n')
        try:
            m.out.wait_events(2)
            with open(str(path), 'w') as f:                  # copytruncate, then a new line
                f.write('Nov 22 07:39:25 a b: 3\n')
            events = m.out.wait_events(3)
            assert [dict(e)['message'] for e in events] == ['one', 'two', '3']
            _mod_wait(lambda: b'truncated' in m.err.data, 'a note on stderr')
        finally:
            m.stop()

    def test_syslog_in_broken_pipe_is_quiet(self, tmp_path):
        with open(str(tmp_path / 'big.log'), 'w') as f:
            f.write('Nov 22 07:39:24 a b[1]: some message here\n' * 200000)
        p = subprocess.Popen([_MOD_PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=str(tmp_path))
        try:
            p.stdin.write(b'logfile=big.log\n')
            p.stdin.close()
            p.stdout.read(1000)
            p.stdout.close()                                # the reader goes away
            assert p.wait(timeout=_MOD_DEADLINE) == 1
            assert p.stderr.read() == b''
        finally:
            if p.poll() is None:
                p.kill()
            p.stderr.close()

    # -- syslog_in: state file -----------------------------------------------

    def test_syslog_in_statefile_new_inode_or_shorter_file_reads_from_top(self, tmp_path):
        path = tmp_path / 'f.log'
        path.write_text('Nov 22 07:39:24 a b: old1\nNov 22 07:39:24 a b: old2\n')
        run = lambda: _mod_syslog_in(str(tmp_path), logfile='f.log', statefile='f.state')
        assert len(run()[0]) == 2
        os.rename(str(path), str(tmp_path / 'f.log.1'))
        path.write_text('Nov 22 07:39:24 a b: new\n')            # a new inode
        events, p = run()
        assert [dict(e)['message'] for e in events] == ['new']
        assert b'new file' in p.stderr
        path.write_text('')                                      # same inode, truncated
        with open(str(path), 'w') as f:
            f.write('Nov 22 07:39:24 a b: x\n')
        events, p = run()
        assert [dict(e)['message'] for e in events] == ['x']
        assert b'truncated' in p.stderr or b'shorter' in p.stderr

    def test_logfile_out_json(self, tmp_path):
        p = _mod_logfile_out(str(tmp_path), 'a=1\nb=x y\ngo\nc=\xff\udcfe\ngo\nd=caf\u00e9\ngo\n',
                             format='json')
        assert p.returncode == 0
        with open(str(tmp_path / 'out.log'), 'rb') as f:
            lines = f.read().decode('utf-8').splitlines()            # valid UTF-8
        objects = [json.loads(line) for line in lines]
        assert [o['tokens'] for o in objects] == [{'a': '1', 'b': 'x y'},
                                                  {'c': '\xff\udcfe'}, {'d': 'caf\u00e9'}]
        assert all(_MOD_TIME.match(o['time']) for o in objects)

    def test_logfile_out_confirm_ok_after_configure_and_each_go(self, tmp_path):
        m = _ModProcess(LOGFILE_OUT, str(tmp_path), _mod_config(
            module='logfile_out', filename='out.log', confirm='yes', queuesize='10'),
            stdin_open=True)
        try:
            m.send('configure\n')
            assert m.wait_replies(1) == ['ok']
            assert (tmp_path / 'out.log').exists()                   # ready = file open
            for i in range(3):
                m.send('n=%d\n' % i)
                time.sleep(0.05)
                assert len(m.replies()) == i + 1                     # no reply before go
                m.send('go\n')
                assert m.wait_replies(i + 2) == ['ok'] * (i + 2)
                # confirmed means written: the line is in the file now
                assert _mod_file_events(str(tmp_path / 'out.log'))[-1][1] == 'n=%d' % i
            m.send('quit\n')
            assert m.wait_exit() == 0
        finally:
            m.stop()

    def test_logfile_out_dash_writes_looper_stdout_fd(self, tmp_path):
        r, w = os.pipe()
        env = dict(os.environ, LOOPER_STDOUT_FD=str(w))
        p = subprocess.Popen([_MOD_PY, LOGFILE_OUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, pass_fds=(w,), cwd=str(tmp_path))
        os.close(w)
        try:
            out, err = p.communicate(b'filename=-\nconfirm=yes\nconfigure\nk=v w\ngo\nquit\n',
                                     timeout=_MOD_DEADLINE)
            assert p.returncode == 0 and err == b''
            assert out == b'ok\nok\n'                        # replies on the protocol pipe
            line = os.read(r, 65536).decode()                # the event on "Looper's stdout"
            assert _MOD_TIME.match(line.split(' ')[0]) and line.endswith(' k="v w"\n')
        finally:
            os.close(r)

    def test_logfile_out_reopens_a_rotated_file(self, tmp_path):
        m = _ModProcess(LOGFILE_OUT, str(tmp_path), b'filename=out.log\nconfigure\n', stdin_open=True)
        try:
            m.send('n=0\ngo\n')
            _mod_wait(lambda: _mod_file_events(str(tmp_path / 'out.log'), growing=True), 'the first event')
            os.rename(str(tmp_path / 'out.log'), str(tmp_path / 'out.log.1'))
            sent = [1]

            def new_file():
                # Keep sending until the module has noticed (within a second).
                m.send('n=%d\ngo\n' % sent[0])
                sent[0] += 1
                time.sleep(0.05)
                return (tmp_path / 'out.log').exists()
            _mod_wait(new_file, 'a new out.log')
            m.send('quit\n')
            assert m.wait_exit() == 0
            old = [rest for when, rest in _mod_file_events(str(tmp_path / 'out.log.1'))]
            new = [rest for when, rest in _mod_file_events(str(tmp_path / 'out.log'))]
            assert old + new == ['n=%d' % i for i in range(sent[0])]   # none lost, in order
            assert new
        finally:
            m.stop()

    def test_logfile_out_creates_file_0644_and_appends(self, tmp_path):
        old = os.umask(0o022)
        try:
            _mod_logfile_out(str(tmp_path), 'a=1\ngo\n')
        finally:
            os.umask(old)
        assert (tmp_path / 'out.log').stat().st_mode & 0o777 == 0o644
        _mod_logfile_out(str(tmp_path), 'a=2\ngo\n')
        assert [rest for when, rest in _mod_file_events(str(tmp_path / 'out.log'))] == ['a=1', 'a=2']

    def test_logfile_out_quit_and_eof_exit_0(self, tmp_path):
        p = _mod_logfile_out(str(tmp_path), 'a=1\ngo\n', stdin_tail='quit\nb=2\ngo\n')
        assert p.returncode == 0 and p.stderr == b''
        p = _mod_logfile_out(str(tmp_path), 'c=3\ngo\n', stdin_tail='')     # EOF, no quit
        assert p.returncode == 0 and p.stderr == b''
        assert [rest for when, rest in _mod_file_events(str(tmp_path / 'out.log'))] == ['a=1', 'c=3']
        p = subprocess.run([_MOD_PY, LOGFILE_OUT], input=b'filename=x.log\n', cwd=str(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=_MOD_DEADLINE)
        assert p.returncode == 0 and not (tmp_path / 'x.log').exists()   # EOF before configure

    def test_logfile_out_broken_pipe_is_quiet(self, tmp_path):
        p = subprocess.Popen([_MOD_PY, LOGFILE_OUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=str(tmp_path))
        try:
            p.stdout.close()                                 # Looper's end is gone
            p.stdin.write(b'filename=out.log\nconfirm=yes\nconfigure\na=1\ngo\n')
            p.stdin.close()
            assert p.wait(timeout=_MOD_DEADLINE) == 1
            assert p.stderr.read() == b''
        finally:
            if p.poll() is None:
                p.kill()
            p.stderr.close()

    def test_logfile_out_sigterm_is_prompt_and_quiet(self, tmp_path):
        m = _ModProcess(LOGFILE_OUT, str(tmp_path), b'filename=out.log\nconfirm=yes\nconfigure\n',
                        stdin_open=True)
        try:
            m.wait_replies(1)
            m.proc.send_signal(signal.SIGTERM)
            assert m.wait_exit() == -signal.SIGTERM
            assert b'Traceback' not in m.err.data
        finally:
            m.stop()

    def test_modules_pipeline_end_to_end(self, tmp_path):
        # syslog_in's events, fed to logfile_out as Looper would.
        sample = os.path.join(HERE, 'examples', 'sample.log')
        events, p = _mod_syslog_in(str(tmp_path), logfile=sample)
        text = ''.join('\n'.join('%s=%s' % kv for kv in e) + '\ngo\n' for e in events)
        out = _mod_logfile_out(str(tmp_path), text)
        assert out.returncode == 0
        lines = _mod_file_events(str(tmp_path / 'out.log'))
        assert len(lines) == len(events)
        assert any('node=weed' in rest and 'program=kernel' in rest for when, rest in lines)


##############################################################################
# Chaos: many events, random kills and errors (RELIABILITY.md 16)
##############################################################################

# An unconfirmed output that records every byte it reads from stdin, before
# it does anything else, in NAME.raw.PID (one file per run).  It reads in
# small pieces, so runs end in the middle of events.  SIGTERM makes it exit
# with status 143 between two reads, never after a read that it has not
# recorded, so the test knows exactly what each run read.  If NAME.stall
# exists when it starts, it reads only its configuration (byte by byte, up to
# `configure`), removes the marker and then reads nothing more.
BYTE_RECORDER = r"""
import os, select, signal, sys
name = os.environ['LOOPER_NAME']
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
out = os.open('%s.raw.%d' % (name, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
if os.path.exists(name + '.stall'):
    seen = b''
    while not seen.endswith(b'configure\n'):
        byte = os.read(0, 1)
        os.write(out, byte)
        seen += byte
    os.remove(name + '.stall')
    while True:
        select.select([], [], [], 1000)
while not stop:
    ready, _, _ = select.select([0], [], [], 0.05)
    if not ready:
        continue
    data = os.read(0, 1000)
    if not data:
        break
    os.write(out, data)
os._exit(143 if stop else 0)
"""


def raw_reads(directory, name, token='n'):
    """What each run of a BYTE_RECORDER read: {pid: [token values of the
    events it read completely]}, and the bytes of each run."""
    runs = {}
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(name + '.raw.'):
            with open(os.path.join(directory, entry), 'rb') as f:
                data = f.read()
            body = data.split(b'configure\n', 1)[1] if b'configure\n' in data else b''
            events = []
            for piece in body.split(b'\ngo\n')[:-1]:
                tokens = dict(line.split(b'=', 1) for line in piece.split(b'\n') if b'=' in line)
                events.append(int(tokens[token.encode()]))
            runs[int(entry.rsplit('.', 1)[1])] = events
    return runs


def in_order_at_least_once(got, total):
    """Every event at least once, and in order once each event's last
    delivery is taken (a resend repeats events; it never leaves one out
    nor delivers an older one after a newer one for good)."""
    last = {}
    for i, n in enumerate(got):
        last[n] = i
    return sorted(last) == list(range(total)) and \
        sorted(last, key=last.get) == list(range(total))


class TestChaos(object):

    def test_chaos_every_event_confirmed_or_resent_exactly(self, tmp):
        """20,000 events, three outputs, random faults while they flow:
        c1 (confirm, window 1) and c2 (confirm, window 16, so `error`
        resends what followed it) answer `error` at random and are
        SIGKILLed at random; u (no confirm) records every byte it reads and
        is stopped at random.  c1 and c2 must hold every event at least once
        and in order, confirmed exactly once each; u must have read every
        event exactly once across its runs (what a dead run never read is
        resent, nothing it read is), and the counters must say so."""
        import random
        rng = random.Random(1234)
        total = 20000
        py_module(tmp, 'src', COUNTER_IN.replace("out.flush()",
                                                 "out.flush()\nimport time\ntime.sleep(0.2)"))
        py_module(tmp, 'bytes', BYTE_RECORDER)
        py_module(tmp, 'flaky', CONFIRMER.replace(
            "    reply = 'ok\\n'\n",
            "    reply = 'ok\\n'\n    import random\n"
            "    if random.random() < 0.02:\n        reply = 'error random\\n'\n"))
        common = " queuesize = 300\n draintimeout = 120\n" + FAST
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = %d }\n"
                           "output c1 {\n module = flaky\n confirm = yes\n retrydelay = 0.001\n"
                           " confirmtimeout = 5\n%s}\n"
                           "output c2 {\n module = flaky\n confirm = yes\n retrydelay = 0.001\n"
                           " confirmwindow = 16\n confirmtimeout = 5\n%s}\n"
                           "output u {\n module = bytes\n%s}\n" % (total, common, common, common))
        looper = Looper(conf)
        kills = {'SIGKILL': 0, 'SIGTERM': 0}
        deadline = time.monotonic() + 25
        while looper.proc.poll() is None and time.monotonic() < deadline:
            # Outputs only: the counting input replays from 0 when restarted
            # (input restarts are tested with syslog_in's state file).
            victims = [c for c in children_of(looper.proc.pid)
                       if alive(c) and '/src' not in read('/proc/%d/cmdline' % c)]
            if victims and rng.random() < 0.5:
                victim = rng.choice(victims)
                sig = signal.SIGTERM if '/bytes' in read('/proc/%d/cmdline' % victim) \
                    else signal.SIGKILL
                try:
                    os.kill(victim, sig)
                    kills[sig.name] += 1
                except OSError:
                    pass
            time.sleep(rng.uniform(0.02, 0.08))
        status = looper.wait(150)
        log = looper.log()
        c = counters(log)
        for name in ('c1', 'c2'):
            got = numbers_in(tmp, name)
            assert in_order_at_least_once(got, total), name
            assert c['output.%s.confirmed' % name] == total, (name, log[-3000:])
            assert c['output.%s.lost' % name] == 0
        runs = raw_reads(tmp, 'u')
        read_events = [n for events in runs.values() for n in events]
        duplicated = len(read_events) - len(set(read_events))
        never_read = total - len(set(read_events))
        # Exactly: every event read once, by one run or another.
        assert duplicated == 0 and never_read == 0, (duplicated, never_read)
        assert c['output.u.written'] + c['output.u.unconfirmed'] == total
        assert c['output.u.lost'] == c['output.u.dropped'] == 0
        # Runs stopped with events read are honest about it: unconfirmed,
        # so the run is not clean.
        assert (status == 1) == (c['output.u.unconfirmed'] > 0), status
        print('chaos: %d events, kills %s, %d+%d error replies, restarts c1=%d c2=%d u=%d; '
              'c1 duplicates %d, c2 duplicates %d; u: %d runs, duplicated %d, never read %d, '
              'unconfirmed %d; status %d' % (
                  total, kills, c['output.c1.retried'], c['output.c2.retried'],
                  c['output.c1.restarts'], c['output.c2.restarts'], c['output.u.restarts'],
                  len(numbers_in(tmp, 'c1')) - total, len(numbers_in(tmp, 'c2')) - total,
                  len(runs), duplicated, never_read, c['output.u.unconfirmed'], status))
        assert kills['SIGKILL'] >= 10 and kills['SIGTERM'] >= 5, kills


##############################################################################
# Reliability: the defects fault injection found (issue 12), one test each
##############################################################################

def load_looper():
    """looper.py as a module, for unit tests of its pure parts."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('looper_under_test', LOOPER)
    looper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(looper)
    looper._log.disabled = True
    return looper


def peak_rss_while(proc, timeout):
    """Wait for proc to exit (bounded), sampling its RSS; the peak in kB."""
    peak = [0]

    def finished():
        try:
            peak[0] = max(peak[0], rss_kb(proc.pid))
        except (OSError, KeyError):
            pass
        return proc.poll() is not None
    wait_until(finished, timeout, 'looper to finish')
    return peak[0]


def send_counters(looper, count):
    """SIGUSR1 (once Looper handles it), then the counters line number
    `count` of the log."""
    looper.wait_log('starting')
    looper.signal(signal.SIGUSR1)
    looper.wait_log(r'counters: .*\n', count=count)
    return counters(looper.log())


class TestReliability(object):

    @pytest.mark.parametrize('padding', [0, 300])
    def test_what_a_dead_output_never_read_is_resent_exactly(self, tmp, padding):
        """Issue 12.1: an output stops reading with 40 events in its pipe and
        is killed.  Every one of them is sent again to the next run, exactly
        once, whatever the size of its configuration (54 or 354 bytes)."""
        py_module(tmp, 'src', COUNTER_IN.replace("out.flush()",
                                                 "out.flush()\nimport time\ntime.sleep(1000)"))
        py_module(tmp, 'bytes', BYTE_RECORDER)
        write(os.path.join(tmp, 'o.stall'), '')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 40 }\n"
                           "output o {\n module = bytes\n pad = '%s'\n%s}\n" % ('p' * padding, FAST))
        looper = Looper(conf)
        wait_until(lambda: not os.path.exists(os.path.join(tmp, 'o.stall')), what='the stall')
        # All 40 handed to the pipe, none read.
        wait_until(lambda: send_counters(looper, 1 + len(re.findall('counters:', looper.log())))
                   ['output.o.written'] == 40, what='40 events in the pipe')
        stalled = [pid for pid in children_of(looper.proc.pid)
                   if '/bytes' in read('/proc/%d/cmdline' % pid)]
        os.kill(stalled[0], signal.SIGKILL)
        wait_until(lambda: sum(len(v) for v in raw_reads(tmp, 'o').values()) >= 40,
                   what='the resend; log:\n' + looper.log())
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0, looper.log()
        runs = raw_reads(tmp, 'o')
        assert runs[stalled[0]] == []
        assert [n for pid, got in sorted(runs.items()) for n in got] == list(range(40))
        c = counters(looper.log())
        assert c['output.o.written'] == 40 and c['output.o.lost'] == 0
        assert re.search(r"output 'o' \(pid %d\) terminated by signal 9 \(SIGKILL\) after [\d.]+ s; "
                         r"40 event\(s\) it had not read kept in its queue" % stalled[0], looper.log())

    def test_counters_survive_a_reload_that_replaces_or_removes_an_output(self, tmp):
        """Issue 12.2: the final line keeps what replaced and removed
        outputs counted, and a removed output's lost events fail the run."""
        py_module(tmp, 'feedin', FEED_IN)
        py_module(tmp, 'rec', RECORDER)
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        write(os.path.join(tmp, 'r.rules'), "writeTo('a')\nif 's' in OUTPUTS:\n    writeTo('s')\n")
        head = "inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\n" \
               "logfile = looper.log\ninput i { module = feedin }\n"
        stuck = "output s {\n module = stuck\n draintimeout = 0.5\n closetimeout = 0.5\n}\n"
        conf = config(tmp, head + "output a { module = rec }\n" + stuck)
        write(os.path.join(tmp, 'r.rules'), "OUTPUTS = ['a', 's']\n" + read(os.path.join(tmp, 'r.rules')))
        logfile = os.path.join(tmp, 'looper.log')
        looper = Looper(conf)
        feed(tmp, *range(100))
        wait_until(lambda: len(recorded(tmp, 'a')) == 100)
        # a changes (a new key), s is removed: its 100 events can never go.
        write(conf, head + "output a { module = rec\n note = changed }\n")
        write(os.path.join(tmp, 'r.rules'), "writeTo('a')\n")
        looper.signal(signal.SIGHUP)
        wait_until(lambda: 'reloaded:' in read(logfile))
        feed(tmp, *range(100, 150))
        feed(tmp, 'END')
        assert looper.wait() == 1, read(logfile)
        c = counters(read(logfile))
        assert [int(e['n']) for e in recorded(tmp, 'a')] == list(range(150))
        assert c['output.a.written'] == 150, read(logfile)
        assert c['output.s.lost'] == 100 and c['output.s.written'] == 0
        assert 'not every event was delivered: 100 lost' in read(logfile)

    def test_events_still_pending_when_the_outputs_give_up_are_counted(self, tmp):
        """Issue 12.2: events read but never routed are in the counters and
        the exit status, not only in a separate line."""
        py_module(tmp, 'src', COUNTER_IN)
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 3000 }\n"
                           "output s {\n module = stuck\n queuesize = 10\n draintimeout = 0.5\n"
                           " closetimeout = 0.5\n}\n")
        p = run([conf])
        assert p.returncode == 1
        c = counters(p.stderr)
        assert c['events_in'] == 3000
        assert c['output.s.lost'] == 3000 and c['input.i.pending'] == 0, p.stderr
        assert 'not every event was delivered: 3000 lost' in p.stderr

    def test_an_output_that_dies_after_quit_with_unread_events_is_restarted(self, tmp):
        """Issue 12.2: an output that exits non-zero after `quit` with events
        it never read is restarted within draintimeout and gets them."""
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'bytes', BYTE_RECORDER)
        # First run: read the configuration, then exit 1 once told to,
        # reading nothing else.
        py_module(tmp, 'quitter', "import os, sys, time\n"
                  "if not os.path.exists('ran'):\n"
                  "    open('ran', 'w').close()\n"
                  "    data = b''\n"
                  "    while not data.endswith(b'configure\\n'):\n"
                  "        data += os.read(0, 1)\n"
                  "    while not os.path.exists('go_away'):\n"
                  "        time.sleep(0.01)\n"
                  "    sys.exit(1)\n"
                  "exec(open('bytes').read())\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 479 }\n"
                           "output o {\n module = quitter\n draintimeout = 30\n" + FAST + "}\n")
        looper = Looper(conf)
        looper.wait_log('stopping: the input finished')
        write(os.path.join(tmp, 'go_away'), '')
        assert looper.wait() == 0, looper.log()
        got = [n for pid, events in sorted(raw_reads(tmp, 'o').items()) for n in events]
        assert got == list(range(479))
        assert re.search(r"WARNING output 'o' \(pid \d+\) exited with status 1 after [\d.]+ s; "
                         r"479 event\(s\) it had not read kept in its queue; restarting it",
                         looper.log()), looper.log()

    def test_the_queue_is_bounded_in_bytes(self, tmp):
        """Issue 12.3: 60 kB events and a stalled output: memory stays
        bounded by queuebytes (596 MB of RSS before)."""
        py_module(tmp, 'src', "import sys\nsys.stdin.read()\nbig = 'x' * 60000\n"
                              "for i in range(2000):\n"
                              "    sys.stdout.write('n=%d\\nbig=%s\\ngo\\n' % (i, big))\n"
                              "sys.stdout.flush()\n")
        py_module(tmp, 'rec', RECORDER)
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput fast { module = rec }\n"
                           "output stuck {\n module = stuck\n overflow = drop\n draintimeout = 0.5\n"
                           " closetimeout = 0.5\n}\n")
        looper = Looper(conf)
        peak = peak_rss_while(looper.proc, 120)
        assert looper.wait() == 1
        c = counters(looper.log())
        assert len(recorded(tmp, 'fast')) == 2000
        assert c['output.stuck.dropped'] >= 1800 and \
            c['output.stuck.dropped'] + c['output.stuck.lost'] == 2000
        assert peak < 80000, 'RSS peaked at %d kB' % peak

    def test_one_event_writing_to_one_output_many_times_respects_the_bound(self, tmp):
        """Issue 12.3: a rule that writes one event 50,000 times to an
        output with queuesize 1000 queues at most twice that; the rest is
        dropped and counted (45,832 were queued before)."""
        py_module(tmp, 'src', COUNTER_IN.replace("out.flush()",
                                                 "out.flush()\nimport time\ntime.sleep(1000)"))
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        write(os.path.join(tmp, 'r.rules'), "for i in range(50000):\n    writeTo('s')\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\n"
                           "input i { module = src\n count = 1 }\n"
                           "output s {\n module = stuck\n queuesize = 1000\n closetimeout = 0.5\n"
                           " draintimeout = 0.5\n}\n")
        looper = Looper(conf)
        c = wait_until(lambda: send_counters(looper, 1 + len(re.findall('counters:', looper.log())))
                       if 'starting' in looper.log() else None, what='counters')
        c = wait_until(lambda: (lambda c: c if c['deliveries'] == 50000 else None)(
            send_counters(looper, 1 + len(re.findall('counters:', looper.log())))),
            what='the event to be routed')
        assert c['output.s.queued'] + c['output.s.written'] <= 2000, c
        assert c['output.s.dropped'] >= 48000, c
        assert 'more than 2 times its queue bounds allow; dropped' in looper.log()
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 1

    def test_a_reload_that_replaces_a_stuck_output_resumes_routing(self, tmp):
        """Issue 12.4: fixing a stuck output by a reload, under
        back-pressure, gets every event through (0 in 8 s before)."""
        py_module(tmp, 'src', COUNTER_IN.replace("out.flush()",
                                                 "out.flush()\nimport time\ntime.sleep(1000)"))
        py_module(tmp, 'rec', RECORDER)
        sh_module(tmp, 'stuck', 'exec sleep 1000\n')
        head = "inputmodulepath = .\noutputmodulepath = .\n" \
               "input i { module = src\n count = 5000 }\n"
        conf = config(tmp, head + "output o {\n module = stuck\n queuesize = 100\n closetimeout = 0.5\n"
                                  " draintimeout = 1\n}\n")
        looper = Looper(conf)
        wait_until(lambda: (lambda c: c['input.i.pending'] > 0)(
            send_counters(looper, 1 + len(re.findall('counters:', looper.log())))),
            what='back-pressure')
        write(conf, head + "output o {\n module = rec\n queuesize = 100\n}\n")
        looper.signal(signal.SIGHUP)
        wait_until(lambda: len(recorded(tmp, 'o')) == 5000, 60, 'every event after the reload')
        looper.signal(signal.SIGTERM)
        looper.wait()
        assert numbers_in(tmp, 'o') == list(range(5000))

    def test_an_input_whose_child_keeps_writing_after_it_exits(self, tmp):
        """Issue 12.5: the input exits 0 while a background child floods its
        stdout: Looper still ends, promptly, with bounded memory (1.48 GB
        and a hang before)."""
        py_module(tmp, 'src', "import os, sys\nsys.stdin.read()\n"
                              "if os.fork() == 0:\n"
                              "    data = b'a=1\\ngo\\n' * 10000\n"
                              "    while True:\n"
                              "        os.write(1, data)\n"
                              "sys.exit(0)\n")
        sh_module(tmp, 'null', 'cat >/dev/null\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = null }\n")
        looper = Looper(conf)
        peak = peak_rss_while(looper.proc, 20)
        assert looper.wait() == 0, looper.log()
        assert peak < 60000, peak
        assert [p for p in descendants(os.getpid()) if 'src' in read('/proc/%d/cmdline' % p)] == []

    @pytest.mark.parametrize('line, message', [
        ('rulestimeout = 1e-7', "rulestimeout must be a number of seconds from 0.01 to 86400"),
        ('rulestimeout = inf', "rulestimeout must be a number of seconds from 0.01 to 86400"),
        ('rulestimeout = nan', "rulestimeout must be a number of seconds from 0.01 to 86400"),
        ('output o {\n module = x\n confirmtimeout = inf\n}',
         'confirmtimeout must be a number of seconds from 0.01 to 86400'),
        ('output o {\n module = x\n retrydelay = 1e309\n}',
         'retrydelay must be a number of seconds from 0.001 to 86400'),
        ('output o {\n module = x\n queuesize = 0\n}', 'queuesize must be a whole number from 1'),
    ])
    def test_values_the_run_cannot_use_are_refused(self, tmp, line, message):
        """Issue 12.7: values --check accepted and the run could not use
        (a hang at 100% CPU, an OverflowError, a retry that never comes)."""
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        text = "inputmodulepath = .\noutputmodulepath = .\ninput i { module = x }\n" + line + "\n"
        if 'output o' not in line:
            text += "output o { module = x }\n"
        conf = config(tmp, text)
        number = [i for i, l in enumerate(text.splitlines(), 1)
                  if l.strip().startswith(line.splitlines()[-2].strip() if '\n' in line else line)][0]
        for args in (['--check', conf], [conf]):
            p = run(args)
            assert p.returncode == 78, p.stderr
            assert '%s:%d: %s' % (conf, number, message) in p.stderr, p.stderr

    def test_nothing_a_rules_file_raises_or_returns_kills_looper(self, tmp):
        """Issue 12.8: a lone surrogate, `del outputTokens`, KeyboardInterrupt,
        BaseException, GeneratorExit: each is that event's error; the other
        events are delivered and the counters are written."""
        rules = ("import json\n"
                 "k = inputTokens['k']\n"
                 "if k == 'surrogate':\n"
                 "    outputTokens['v'] = json.loads('\"\\\\ud83d\"')\n"
                 "elif k == 'del':\n"
                 "    del outputTokens\n"
                 "elif k == 'interrupt':\n"
                 "    raise KeyboardInterrupt()\n"
                 "elif k == 'base':\n"
                 "    raise BaseException('base')\n"
                 "elif k == 'genexit':\n"
                 "    raise GeneratorExit()\n"
                 "writeTo('o')\n")
        kinds = ['ok1', 'surrogate', 'ok2', 'del', 'ok3', 'interrupt', 'ok4', 'base', 'ok5',
                 'genexit', 'ok6']
        conf = norules_conf(tmp, rules, outputs=('o',))
        got, p = run_test_mode(conf, ''.join('k=%s\ngo\n' % k for k in kinds))
        assert [d['tokens']['k'] for d in got] == ['ok%d' % i for i in range(1, 7)], p.stderr
        err = p.stderr.decode()
        for what in ('UnicodeEncodeError', 'NameError: outputTokens was deleted',
                     'KeyboardInterrupt', 'BaseException: base', 'GeneratorExit'):
            assert re.search(r'r\.rules:\d+: %s.*; event skipped' % what, err), (what, err)
        assert p.returncode == 1
        # The same in a real run.
        py_module(tmp, 'src', "import sys\nsys.stdin.read()\n"
                              "sys.stdout.write(%r)\n" % ''.join('k=%s\ngo\n' % k for k in kinds))
        py_module(tmp, 'rec', RECORDER)
        write(conf, read(conf).replace('input i { module = x }', 'input i { module = src }')
              .replace('output o { module = x }', 'output o { module = rec }'))
        p = run([conf])
        assert p.returncode == 1, p.stderr
        assert [e['k'] for e in recorded(tmp, 'o')] == ['ok%d' % i for i in range(1, 7)]
        c = counters(p.stderr)
        assert c['rules_errors'] == 5 and c['output.o.written'] == 6

    def test_a_reload_that_fails_in_any_way_keeps_the_old_configuration(self, tmp):
        """Issue 12.9: a log file whose directory is gone, a log path that
        cannot be opened, rules compile() rejects with RecursionError: each
        reload is refused, in one log line, and the old configuration runs
        on.  The same rules file is a FILE:LINE error (78) at start."""
        py_module(tmp, 'feedin', FEED_IN)
        py_module(tmp, 'rec', RECORDER)
        write(os.path.join(tmp, 'r.rules'), "writeTo('o')\n")
        good = ("inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\n"
                "logfile = looper.log\ninput i { module = feedin }\noutput o { module = rec }\n")
        conf = config(tmp, good)
        logfile = os.path.join(tmp, 'looper.log')
        looper = Looper(conf)
        wait_until(lambda: 'starting' in read(logfile))
        deep = os.path.join(tmp, 'deep.rules')
        write(deep, 'x = ' + '+'.join(['1'] * 100000) + '\n')     # RecursionError in compile()
        bad = [good.replace('logfile = looper.log', 'logfile = gone/looper.log'),
               good.replace('logfile = looper.log', 'logfile = %s' % tmp),
               good.replace('rulesfile = r.rules', 'rulesfile = deep.rules')]
        for n, text in enumerate(bad, 1):
            write(conf, text)
            looper.signal(signal.SIGHUP)
            wait_until(lambda: len(re.findall('reload refused', read(logfile))) == n,
                       what='reload %d refused; log:\n%s' % (n, read(logfile)))
            feed(tmp, n)
            wait_until(lambda: len(recorded(tmp, 'o')) == n, what='the old config running')
        assert looper.proc.poll() is None
        refusals = [l for l in read(logfile).splitlines() if 'reload refused' in l]
        assert 'deep.rules:1: cannot compile: RecursionError' in refusals[2], refusals
        feed(tmp, 'END')
        assert looper.wait() == 0, read(logfile)
        write(conf, bad[2])
        for args in (['--check', conf], [conf]):
            p = run(args)
            assert p.returncode == 78 and 'deep.rules:1: cannot compile: RecursionError' in p.stderr \
                and 'Traceback' not in p.stderr, p.stderr

    def test_a_sighup_while_a_batch_run_exits_does_not_kill_it(self, tmp):
        """Issue 12.10: SIGHUPs arriving as a batch run exits (exit -1 in 5
        of 5 runs before)."""
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 200 }\noutput o { module = rec }\n")
        for attempt in range(5):
            looper = Looper(conf)
            looper.wait_log('finished:')
            while looper.proc.poll() is None:
                try:
                    looper.signal(signal.SIGHUP)
                except OSError:
                    break
                time.sleep(0.0005)
            assert looper.wait() == 0, (attempt, looper.proc.returncode, looper.log())

    def test_a_module_flooding_stderr_does_not_flood_the_log(self, tmp):
        """Issue 12.11: 103 MB of log in 8 s before."""
        py_module(tmp, 'src', COUNTER_IN)
        sh_module(tmp, 'noisy', "yes 'something to say' | head -n 300000 >&2\ncat >/dev/null\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 10 }\noutput o { module = noisy }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr[-2000:]
        assert len(p.stderr) < 100000, len(p.stderr)
        held = sum(int(n) for n in re.findall(r"output 'o': (\d+) lines of its stderr were not "
                                              r"logged", p.stderr))
        logged = p.stderr.count('something to say')
        assert held + logged == 300000, (held, logged)

    def test_grandchildren_do_not_outlive_a_module_that_exits_on_its_own(self, tmp):
        """Issue 12.12: 13 processes left after 6 restarts before."""
        sh_module(tmp, 'spawner', "cat >/dev/null\nsleep 1000 &\necho $! >> children\nexit 3\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i {\n module = spawner\n" + FAST + "}\noutput o { module = rec }\n")
        looper = Looper(conf)
        wait_until(lambda: len(read(os.path.join(tmp, 'children')).split()) >= 6, what='6 runs')
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0
        pids = [int(x) for x in read(os.path.join(tmp, 'children')).split()]
        wait_until(lambda: not any(alive(pid) for pid in pids), 10,
                   'the sleeps to be gone: %s' % [pid for pid in pids if alive(pid)])

    def test_a_cr_in_a_token_name_is_malformed_wherever_the_reads_end(self, tmp):
        """Issue 12.13: the fast and careful parsers agree; no raw CR ever
        reaches an output, even with NORULES; writeTo refuses an empty name."""
        lib = load_looper()
        data = b'a\rb=1\nc=2\ngo\nd=3\r\ngo\n'
        for cut in range(len(data) + 1):
            parser = lib._EventParser('in', 65536)
            events = parser.feed(data[:cut]) + parser.feed(data[cut:]) + parser.eof()[0]
            assert events == [{'c': '2'}, {'d': '3'}], (cut, events)
            assert parser.malformed == 1
        sh_module(tmp, 'src', "cat >/dev/null\nprintf 'a\\rb=1\\nc=x\\ry\\ngo\\n'\n")
        sh_module(tmp, 'dump', 'cat > dump.bin\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = dump }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        with open(os.path.join(tmp, 'dump.bin'), 'rb') as f:
            assert f.read().endswith(b'configure\nc=x\\ry\ngo\nquit\n')
        got, p = run_test_mode(norules_conf(tmp, "outputTokens[''] = 'x'\nwriteTo('a')\n"), 'k=v\ngo\n')
        assert got == [] and 'token name \'\' is empty' in p.stderr.decode(), p.stderr

    def test_closed_stdin_and_stdout_never_hand_a_module_looper_s_own_descriptors(self, tmp):
        """Issue 12.14: with fds 0 and 1 closed at start, a module asking
        for `-` got a copy of Looper's signal socket."""
        py_module(tmp, 'probe', "import os, stat, sys\nsys.stdin.read()\n"
                                "fd = int(os.environ['LOOPER_STDIN_FD'])\n"
                                "mode = os.fstat(fd).st_mode\n"
                                "open('kind', 'w').write('socket' if stat.S_ISSOCK(mode) else "
                                "'chr' if stat.S_ISCHR(mode) else 'other')\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = probe\n logfile = '-' }\noutput o { module = rec }\n")

        def close_0_and_1():
            os.close(0)
            os.close(1)
        p = subprocess.Popen([PY, LOOPER, conf], stderr=subprocess.PIPE, preexec_fn=close_0_and_1)
        err = p.communicate(timeout=DEADLINE)[1]
        assert p.returncode == 0, err
        assert read(os.path.join(tmp, 'kind')) == 'chr'         # /dev/null

    def test_the_ledger_accounts_for_every_event_exactly_once(self):
        """The delivery ledger against random writes, partial reads, deaths,
        answers: every event added is queued, in flight, or counted in
        exactly one outcome; what the module read is exactly what counts
        as written (property test, 3000 random histories)."""
        import random
        lib = load_looper()
        rng = random.Random(12)

        def event(n):
            return ('n=%d\npad=%s\ngo\n' % (n, 'x' * rng.randint(0, 30))).encode()
        for history in range(3000):
            confirm = rng.random() < 0.5
            ledger = lib._Ledger(confirm)
            added = written_bytes = 0
            stream = b''            # what the current process was written
            read_upto = 0           # how far it read
            ledger.begin(0)
            outcomes = []
            for step in range(rng.randint(1, 40)):
                op = rng.random()
                if op < 0.4:
                    k = rng.randint(1, 3)
                    ledger.add(b''.join(event(added + i) for i in range(k)), k, added)
                    added += k
                elif op < 0.6:
                    data = ledger.take(rng.randint(1, 200), rng.randint(1, 5) if confirm else
                                       float('inf'))
                    stream += data
                elif op < 0.7 and not confirm:
                    accepted = rng.randint(ledger.accepted, len(stream))
                    ledger.accept(accepted)
                    read_upto = rng.randint(read_upto, accepted)
                elif op < 0.8 and confirm and ledger.inflight:
                    kind = rng.choice(['confirmed', 'rejected', 'error'])
                    if kind == 'error':
                        ledger.back()
                    else:
                        ledger.answer(rng.randint(1, ledger.inflight), kind)
                elif op < 0.9:
                    if not confirm:
                        accepted = rng.randint(ledger.accepted, len(stream))
                        ledger.accept(accepted)
                        read_upto = rng.randint(read_upto, accepted)
                        # What the dead process read completely: written.
                        outcomes.append(stream[:read_upto].count(b'\ngo\n'))
                    ledger.died(read_upto, rng.random() < 0.7)
                    stream, read_upto = b'', 0
                    ledger.begin(0)
                else:
                    # Given up (a drain timeout): what the pipe holds whole
                    # is written, the rest is never written; then the
                    # module is stopped, having read some of the pipe.
                    if not confirm:
                        accepted = rng.randint(ledger.accepted, len(stream))
                        ledger.accept(accepted)
                        read_upto = rng.randint(read_upto, accepted)
                        outcomes.append(stream[:read_upto].count(b'\ngo\n'))
                    ledger.lose()
                    ledger.died(read_upto, rng.random() < 0.7)
                    stream, read_upto = b'', 0
                    ledger.begin(0)
                queued = sum(e[1] for e in ledger.queue)
                inflight = sum(e[1] for e in ledger.sent) - ledger.answered
                assert queued + inflight == ledger.events, (history, step)
                assert ledger.inflight == inflight
                assert ledger.bytes == sum(len(e[0]) for e in ledger.queue) + \
                    sum(len(e[0]) for e in ledger.sent)
                settled = (ledger.confirmed + ledger.rejected + ledger.written + ledger.lost +
                           ledger.unconfirmed)
                pending_written = sum(e[1] for e in ledger.window) if not confirm else 0
                assert ledger.events + settled == added, (history, step, confirm)
                if not confirm:
                    assert ledger.written + ledger.unconfirmed == sum(outcomes) + \
                        ledger.instance_written, (history, step)
                    assert pending_written >= 0

    def test_deadlines_do_not_pile_up(self):
        """Issue 12 (structure): a deadline reset at every answer leaves one
        entry in the heap, not one per reset (225,004 entries, 3 live,
        before)."""
        lib = load_looper()
        loop = lib._Loop()
        fired = []
        confirm = loop.deadline(lambda: fired.append('confirm'))
        restart = loop.deadline(lambda: fired.append('restart'))
        restart.set(60)
        for i in range(100000):
            confirm.set(30)
            if i % 3 == 0:
                confirm.clear()
        assert len(loop._heap) <= 3, len(loop._heap)
        confirm.set(0)
        loop.run_once()
        assert fired == ['confirm'] and len(loop._heap) <= 2

    def test_verbose_logs_every_state_change(self, tmp):
        """Issue 12 (structure): -v promised every state change and logged none."""
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 3 }\noutput o { module = rec }\n")
        p = run(['-v', conf])
        assert p.returncode == 0
        for change in ("output 'o': stopped -> running", "input 'i': stopped -> running",
                       "input 'i': running -> exited", "output 'o': running -> stopping",
                       "output 'o': stopping -> exited"):
            assert 'DEBUG %s' % change in p.stderr, (change, p.stderr)


##############################################################################
# Operator: truthful exit status, checks that catch typos, a good Unix citizen
# (issue 11)
##############################################################################

# A module with a declaration, as the shipped ones have.
DECLARED_OUT = '''# /// looper
# kind = 'output'
# keys = 'filename format'
# confirm = 'yes'
# ///
'''


def key_rows(lib):
    """The README's key table rows, made from looper.py's one table of keys."""
    rows = {}
    for name, where, default, kind, low, high, help in lib._KEYS:
        if default is None:
            shown = 'none'
        elif kind == 'bytes' and default >= 1048576:
            shown = '`%d` (%d MiB)' % (default, default // 1048576)
        elif isinstance(default, float):
            shown = '`%g`' % default
        else:
            shown = '`%s`' % default
        bounds = ' (%s to %s)' % (low, high) if kind in ('seconds', 'count', 'bytes') else ''
        rows.setdefault(where, []).append('| `%s` | %s | %s%s |' % (name, shown, help, bounds))
    return rows


class TestOperator(object):

    def test_the_readme_documents_every_key_as_the_table_in_looper_py_says(self):
        readme = read(os.path.join(HERE, 'README.md'))
        for where, rows in key_rows(load_looper()).items():
            table = '\n'.join(rows)
            assert table in readme, 'README.md lacks this table (%s keys):\n%s' % (where, table)

    def test_an_output_that_cannot_write_makes_the_run_fail(self, tmp):
        """Issue 11.1: an output whose file cannot be opened, or is full:
        Looper said delivered=50 lost=0 and exited 0."""
        py_module(tmp, 'src', COUNTER_IN)
        # A module without confirm that cannot deliver: it says so and exits 1.
        py_module(tmp, 'failing', "import sys\nfor line in sys.stdin:\n    pass\n"
                                  "sys.stderr.write('50 events could not be written\\n')\n"
                                  "sys.exit(1)\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 50 }\noutput o { module = failing }\n")
        p = run([conf])
        assert p.returncode == 1, p.stderr
        c = counters(p.stderr)
        assert c['output.o.unconfirmed'] == 50 and c['output.o.written'] == 0, p.stderr
        assert re.search(r"output 'o' \(pid \d+\) exited with status 1 after [\d.]+ s; 50 event\(s\) "
                         r"written to it since it started are unconfirmed", p.stderr), p.stderr
        assert 'not every event was delivered: 50 unconfirmed' in p.stderr

    def test_rules_errors_fail_a_batch_run_and_are_throttled_per_error(self, tmp):
        """Issue 11.1: an ImportError on every event gave exit 0; a second,
        different error was hidden for 10 s, even in --test."""
        rules = ("if inputTokens['k'] == 'a':\n    import no_such_module_here\n"
                 "if inputTokens['k'] == 'b':\n    1 / 0\nwriteTo('o')\n")
        conf = norules_conf(tmp, rules, outputs=('o',))
        got, p = run_test_mode(conf, 'k=a\ngo\n' * 5 + 'k=b\ngo\n' * 5 + 'k=c\ngo\n')
        err = p.stderr.decode()
        assert [d['tokens']['k'] for d in got] == ['c'] and p.returncode == 1
        assert len(re.findall(r'r\.rules:2: (ModuleNotFoundError|ImportError)', err)) == 1, err
        assert len(re.findall(r'r\.rules:4: ZeroDivisionError', err)) == 1, err
        py_module(tmp, 'src', "import sys\nsys.stdin.read()\nsys.stdout.write('k=a\\ngo\\n' * 50)\n")
        py_module(tmp, 'rec', RECORDER)
        write(conf, read(conf).replace('input i { module = x }', 'input i { module = src }')
              .replace('output o { module = x }', 'output o { module = rec }'))
        p = run([conf])
        assert p.returncode == 1, p.stderr
        assert 'not every event was delivered: 50 skipped by rules errors' in p.stderr

    @pytest.mark.parametrize('key, suggestion', [('filname', 'filename'), ('confrim', 'confirm'),
                                                 ('queusize', 'queuesize')])
    def test_check_catches_typos_in_a_declared_module_s_keys(self, tmp, key, suggestion):
        """Issue 11.2: typos passed --check and became a restart loop, or
        silently unconfirmed delivery."""
        py_module(tmp, 'x', DECLARED_OUT + 'import sys\nsys.stdin.read()\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = x }\noutput o {\n module = x\n %s = 1\n}\n" % key)
        write(os.path.join(tmp, 'in'), "#!/bin/sh\n# /// looper\n# kind = 'input'\n# ///\n"
                                       "cat >/dev/null\n", 0o755)
        write(conf, read(conf).replace('input i { module = x }', 'input i { module = in }'))
        for args in (['--check', conf], [conf]):
            p = run(args)
            assert p.returncode == 78, p.stderr
            assert "%s:6: unknown key '%s' for module x; did you mean '%s'?" % (
                conf, key, suggestion) in p.stderr, p.stderr

    def test_check_knows_what_the_shipped_modules_declare(self, tmp):
        conf = config(tmp, "input i {\n module = syslog_in\n logfil = x.log\n}\n"
                           "output o {\n module = logfile_out\n filname = x.out\n}\n")
        p = run(['--check', conf])
        assert p.returncode == 78
        assert "t.conf:3: unknown key 'logfil' for module syslog_in; did you mean 'logfile'?" \
            in p.stderr, p.stderr
        assert "t.conf:6: unknown key 'filname' for module logfile_out; did you mean 'filename'?" \
            in p.stderr, p.stderr

    def test_a_module_s_configuration_error_is_not_restarted_and_ends_the_run_with_78(self, tmp):
        """Issue 11.2: exit status 78 from a module: logged with the block's
        FILE:LINE, not restarted; a batch run ends with 78."""
        py_module(tmp, 'src', COUNTER_IN)
        py_module(tmp, 'picky', "import sys\nsys.stdin.readline()\n"
                                "sys.stderr.write('<3>picky: no filename configured\\n')\n"
                                "sys.exit(78)\n")
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = 5 }\n"
                           "output o {\n module = picky\n restartdelay = 0.01\n}\n")
        p = run([conf])
        assert p.returncode == 78, p.stderr
        assert re.search(r"ERROR %s:5: output 'o' \(pid \d+\) exited with status 78 after [\d.]+ s: "
                         r"a configuration error \(exit status 78\); not restarting it; it said: "
                         r"picky: no filename configured" % re.escape(conf), p.stderr), p.stderr
        assert p.stderr.count('exited with status 78') == 1
        c = counters(p.stderr)
        assert c['output.o.restarts'] == 0 and c['output.o.lost'] == 5

    def test_check_reads_the_rules_for_unknown_outputs_and_missing_imports(self, tmp):
        conf = norules_conf(tmp, "import os\nimport no_such_module_here\n"
                                 "if inputTokens.get('x'):\n    writeTo('ouput')\nwriteTo('a')\n")
        p = run(['--check', conf])
        assert p.returncode == 78
        assert "r.rules:2: cannot import 'no_such_module_here'" in p.stderr, p.stderr
        assert "r.rules:4: writeTo('ouput'): no output named 'ouput'; outputs are: a" in p.stderr

    def test_small_mistakes_are_named(self, tmp):
        """Issue 11.2: a BOM, a module with arguments, a #! naming a missing
        interpreter or ending in CR, the original's spellings."""
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        write(os.path.join(tmp, 'dos'), '#!/bin/sh\r\ncat >/dev/null\r\n', 0o755)
        write(os.path.join(tmp, 'nointerp'), '#!/usr/bin/no-such-shell\n', 0o755)
        write(os.path.join(tmp, 'envinterp'), '#!/usr/bin/env no-such-thing-here\n', 0o755)
        conf = config(tmp, '\ufeffinputmodulepath = .\noutputmodulepath = .\n'
                           'logifile = looper.log\ndebugmode = 3\n'
                           'input i { module = x }\noutput o { module = x }\n')
        p = run(['--check', conf])
        assert p.returncode == 0, p.stderr
        for block, message in (
                ("output o { module = 'syslog_in --follow' }",
                 "a module takes no arguments; give its settings as keys in the block"),
                ('output o { module = dos }', 'its #! line ends in a carriage return'),
                ('output o { module = nointerp }',
                 "its #! interpreter '/usr/bin/no-such-shell' is not an executable file"),
                ('output o { module = envinterp }',
                 "its #! line runs 'no-such-thing-here' through env, and no 'no-such-thing-here' "
                 "is on PATH")):
            write(conf, 'inputmodulepath = .\noutputmodulepath = .\ninput i { module = x }\n'
                  + block + '\n')
            p = run(['--check', conf])
            assert p.returncode == 78 and ('t.conf:4: ' in p.stderr and message in p.stderr), \
                (block, p.stderr)
        # Messages come sorted by line; a module path is shown resolved.
        write(conf, "zzz = 1\ninput i { module = nosuch }\noutput o { }\naaa = 2\n")
        lines = run(['--check', conf], cwd=tmp).stderr.splitlines()
        assert [int(l.split(':')[1]) for l in lines] == sorted(int(l.split(':')[1]) for l in lines)
        assert os.path.join(MODULES, 'nosuch') in '\n'.join(lines)

    def test_test_mode_into_head_is_quiet_and_says_what_raw_syslog_is(self, tmp):
        """Issue 11.3: `--test ... | head` printed a BrokenPipeError
        traceback; raw syslog fed to --test got no explanation."""
        conf = norules_conf(tmp, outputs=('o',))
        p = subprocess.run('yes "k=v\ngo" | head -c 3000000 | %s %s --test %s | head -1'
                           % (PY, LOOPER, conf), shell=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.stdout.decode().count('\n') == 1
        assert b'Traceback' not in p.stderr and b'BrokenPipe' not in p.stderr, p.stderr
        got, p = run_test_mode(conf, read(os.path.join(EXAMPLES, 'sample.log')))
        assert got == [] and p.returncode == 1
        assert 'stdin holds no events in the module protocol' in p.stderr.decode()
        assert "pipe it through syslog_in first" in p.stderr.decode()

    def test_module_stderr_levels_and_looper_s_own_routine_lines(self, tmp):
        """Issue 11.3: everything from a module was a WARNING; the SIGUSR1
        counters line was a WARNING."""
        py_module(tmp, 'src', "import sys, time\nsys.stdin.read()\n"
                              "sys.stderr.write('<6>src: listening\\n<4>src: odd line\\n"
                              "<3>src: broken\\n<7>src: details\\nplain text\\n')\n"
                              "sys.stderr.flush()\ntime.sleep(0.3)\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = rec }\n")
        p = run([conf])
        assert p.returncode == 0
        for level, text in (('INFO', 'src: listening'), ('WARNING', 'src: odd line'),
                            ('ERROR', 'src: broken'), ('WARNING', 'plain text')):
            assert re.search(r"%s input 'i' pid \d+: %s$" % (level, text), p.stderr, re.M), p.stderr
        assert 'details' not in p.stderr
        assert 'details' in run(['-v', conf]).stderr
        looper = Looper(conf.replace('t.conf', 't.conf'))
        looper.wait_log('starting')
        looper.signal(signal.SIGUSR1)
        looper.wait()
        assert re.search(r'INFO counters: events_in=', looper.log()), looper.log()

    def test_a_pipeline_into_head_ends_promptly_and_quietly(self, tmp):
        """Issue 11.3 (and 12.6): `looper.py examples/pipe.conf < big.log |
        head -2` took 10 s, restarted the output against the closed pipe and
        reported 4214 events lost (or never ended)."""
        big = os.path.join(tmp, 'big.log')
        write(big, ''.join('Nov 22 07:00:%02d gw%d sshd[%d]: Failed password for root from '
                           '10.0.0.%d port 22 ssh2\n' % (i % 60, i % 2, i, i % 250)
                           for i in range(200000)))
        t0 = time.monotonic()
        p = subprocess.run('set -o pipefail; %s %s %s < %s | head -2' % (
            PY, LOOPER, os.path.join(EXAMPLES, 'pipe.conf'), big), shell=True,
            executable='/bin/bash', stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=DEADLINE)
        took = time.monotonic() - t0
        assert len(p.stdout.splitlines()) == 2
        assert took < 5, took
        assert p.stderr == '', p.stderr          # pipe.conf logs warnings only: none
        assert p.returncode == 1                 # not everything was delivered

    def test_progress_on_a_terminal_and_nothing_of_it_elsewhere(self, tmp):
        """Issue 11.3: a large replay was silent for minutes."""
        import pty
        py_module(tmp, 'src', "import sys, time, os\nsys.stdin.read()\n"
                              "for i in range(40):\n"
                              "    sys.stdout.write('n=%d\\ngo\\n' % i); sys.stdout.flush()\n"
                              "    if os.environ.get('LOOPER_PROGRESS'):\n"
                              "        sys.stderr.write('progress %d 40\\n' % (i + 1))\n"
                              "        sys.stderr.flush()\n"
                              "    time.sleep(0.05)\n")
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput o { module = rec }\n")
        master, slave = pty.openpty()
        proc = subprocess.Popen([PY, LOOPER, conf], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        screen = b''
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:             # EIO: the other end is closed
                break
            if not data:
                break
            screen += data
        assert proc.wait(DEADLINE) == 0
        os.close(master)
        text = screen.decode('utf-8', 'replace')
        assert re.search(r'\r\d+ events read, \d+ deliveries, \d+/s, \d+% of the input\x1b\[K', text), text
        assert text.rstrip('\r\n').endswith('\n' + text.rstrip('\r\n').split('\n')[-1])
        assert '\r\x1b[K' in text               # cleared at the end
        p = run([conf])                         # stderr a pipe: no progress line
        assert '\r' not in p.stderr and 'events read' not in p.stderr
        p = run(['-q', conf])
        assert p.stderr == ''


##############################################################################
# Deployment: systemd, logrotate, and the two rsyslog recipes of the README
##############################################################################

class Rsyslogd(object):
    """A real rsyslogd in the foreground (-n), its configuration, pid file
    and work directory in a temp dir; no imuxsock/imklog (so it needs no
    privilege and reads nothing of the host's), an imudp listener on
    127.0.0.1 and the given actions.  stop() is SIGTERM then a bounded wait."""

    def __init__(self, directory, body, name='rsyslog'):
        self.rsyslogd = need('rsyslogd')
        self.port = free_udp_port()
        self.conf = os.path.join(directory, name + '.conf')
        write(self.conf, 'global(workDirectory="%s")\nmodule(load="imudp")\n'
                         'input(type="imudp" address="127.0.0.1" port="%d")\n%s'
              % (directory, self.port, body))
        self.pidfile = os.path.join(directory, name + '.pid')
        self.proc = subprocess.Popen([self.rsyslogd, '-n', '-f', self.conf, '-i', self.pidfile],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def send(self, *messages):
        """logger over UDP, RFC 3164, tag myapp."""
        for text in messages:
            subprocess.run([need('logger'), '-n', '127.0.0.1', '-P', str(self.port), '-d',
                            '--rfc3164', '-t', 'myapp', text], check=True, timeout=DEADLINE)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
        return self.proc.stderr.read().decode('utf-8', 'replace')


def json_tokens(path):
    text = read(path)
    return [json.loads(line)['tokens'] for line in text[:text.rfind('\n') + 1].splitlines()]


class TestDeployment(object):

    def test_the_systemd_unit_verifies(self, tmp):
        """examples/looper.service passes `systemd-analyze verify` with no
        warning (it exits 0 on warnings, so its output is the test)."""
        analyze = need('systemd-analyze')
        unit = os.path.join(tmp, 'looper.service')
        shutil.copy(os.path.join(EXAMPLES, 'looper.service'), unit)
        p = subprocess.run([analyze, 'verify', unit], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60, universal_newlines=True)
        mine = [line for line in p.stdout.splitlines() if 'looper.service' in line]
        assert p.returncode == 0 and mine == [], p.stdout
        text = read(unit)
        for line in ('KillMode=mixed', 'ExecReload=/bin/kill -HUP $MAINPID',
                     'RestartPreventExitStatus=78', 'Type=exec'):
            assert line in text.splitlines(), line

    def test_logrotate_rotates_looper_s_log_and_looper_reopens_it(self, tmp):
        """The logrotate snippet, run by a real logrotate on a running
        Looper: the old log is rotated away and Looper writes a new one."""
        logrotate = need('logrotate')
        conf = TestOperations().setup_conf(tmp, "writeTo('a')\n", outputs=('a',))
        logfile = os.path.join(tmp, 'looper.log')
        looper = Looper(conf)
        wait_until(lambda: 'starting' in read(logfile))
        snippet = read(os.path.join(EXAMPLES, 'looper.logrotate'))
        snippet = snippet.replace('/var/log/looper/looper.log', logfile)
        snippet = re.sub(r'systemctl reload .*', 'kill -HUP %d' % looper.proc.pid, snippet)
        rotate_conf = write(os.path.join(tmp, 'logrotate.conf'), snippet)
        p = subprocess.run([logrotate, '-f', '-s', os.path.join(tmp, 'logrotate.state'),
                            rotate_conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60, universal_newlines=True)
        assert p.returncode == 0, p.stdout
        assert os.path.exists(logfile + '.1'), os.listdir(tmp)
        wait_until(lambda: 'reloaded:' in read(logfile), what='a new log after the rotation')
        feed(tmp, 'END')
        assert looper.wait() == 0
        assert 'finished:' in read(logfile) and 'starting' in read(logfile + '.1')

    def test_rsyslog_omprog_runs_looper_on_its_stdin(self, tmp):
        """Recipe 1: rsyslog's omprog starts Looper (examples/omprog.conf's
        shape) and writes each message on its stdin; stopping rsyslog ends
        Looper cleanly."""
        out = os.path.join(tmp, 'alerts.json')
        write(os.path.join(tmp, 'r.rules'), "if inputTokens.get('program') == 'myapp':\n"
                                            "    writeTo('alerts')\n")
        conf = config(tmp, "rulesfile = 'r.rules'\nlogfile = 'looper.log'\n"
                           "input rsyslog { module = syslog_in\n logfile = '-' }\n"
                           "output alerts { module = logfile_out\n filename = '%s'\n"
                           " format = json }\n" % out)
        daemon = Rsyslogd(tmp, 'module(load="omprog")\n'
                               'action(type="omprog" binary="%s %s %s" template="RSYSLOG_FileFormat")\n'
                               % (PY, LOOPER, conf))
        try:
            def sent():
                daemon.send('Failed password for root from 10.0.0.9 port 22 ssh2')
                return len(json_tokens(out)) >= 1
            wait_until(sent, what='the message through rsyslog and Looper; log:\n' +
                       read(os.path.join(tmp, 'looper.log')))
        finally:
            err = daemon.stop()
        wait_until(lambda: 'finished:' in read(os.path.join(tmp, 'looper.log')),
                   what='Looper to finish when rsyslog closes its stdin')
        e = json_tokens(out)[0]
        assert e['program'] == 'myapp' and e['message'].startswith('Failed password for root'), e
        log = read(os.path.join(tmp, 'looper.log'))
        assert 'WARNING' not in log and 'ERROR' not in log, log

    def test_rsyslog_omfile_and_syslog_in_following_with_a_state_file(self, tmp):
        """Recipe 2: rsyslog writes a file (omfile); syslog_in follows it
        with a statefile; a restart of Looper neither repeats nor skips."""
        messages = os.path.join(tmp, 'messages')
        out = os.path.join(tmp, 'alerts.json')
        daemon = Rsyslogd(tmp, 'action(type="omfile" file="%s" template="RSYSLOG_FileFormat")\n'
                               % messages)
        conf = config(tmp, "input i {\n module = syslog_in\n logfile = '%s'\n follow = yes\n"
                           " sleeptime = 0.1\n statefile = 'messages.state'\n}\n"
                           "output alerts { module = logfile_out\n filename = '%s'\n"
                           " format = json }\n" % (messages, out))
        try:
            looper = Looper(conf)

            def arrived(text, count):
                daemon.send(text)
                return sum(1 for e in json_tokens(out) if e.get('message') == text) >= 1 and \
                    len(json_tokens(out)) >= count
            wait_until(lambda: arrived('first', 1), what='the first message')
            looper.signal(signal.SIGTERM)
            assert looper.wait() == 0, looper.log()
            daemon.send('while Looper was down')
            wait_until(lambda: 'while Looper was down' in read(messages))
            looper = Looper(conf)
            wait_until(lambda: arrived('second', 3), what='the messages after a restart')
        finally:
            daemon.stop()

        def texts():
            return [e['message'] for e in json_tokens(out) if e.get('program') == 'myapp']
        # Every line of the file read once (the test resends until a message
        # arrives, so 'first' and 'second' may be there several times).
        lines = [l for l in read(messages).splitlines() if 'myapp' in l]
        wait_until(lambda: len(texts()) >= len(lines), what='Looper to read the whole file')
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0, looper.log()
        assert len(texts()) == len(lines), (texts(), lines)
        assert texts().count('while Looper was down') == 1


##############################################################################
# Correlation: the rules helpers, one clock live and in replay (issue 14)
##############################################################################

# The same scenario for SEC and for Looper: events with a few tenths of a
# second or whole seconds between them, so SEC's one-second clock and
# Looper's agree on every decision.
CORRELATION_SCENARIO = [
    (0.0, 'disk full on /var'), (0.2, 'login failed for alice'), (0.4, 'login failed for alice'),
    (0.6, 'login failed for alice'), (0.8, 'disk full on /var'), (1.0, 'login failed for alice'),
    (1.5, 'backup started job1'), (1.7, 'backup started job2'), (2.0, 'backup finished job2'),
    (3.0, 'login failed for bob'), (6.5, 'disk full on /var'), (7.0, 'login failed for bob'),
    (7.2, 'login failed for bob'), (7.4, 'login failed for bob')]
CORRELATION_ACTIONS = ['disk /var', 'brute alice', 'ok job2', 'missing job1', 'disk /var',
                       'brute bob']

SEC_RULES = r'''type=SingleWithThreshold
ptype=RegExp
pattern=login failed for (\S+)
desc=brute $1
action=write %(out)s brute $1
window=3
thresh=3

type=SingleWithSuppress
ptype=RegExp
pattern=disk full on (\S+)
desc=disk $1
action=write %(out)s disk $1
window=4

type=PairWithWindow
ptype=RegExp
pattern=backup started (\S+)
desc=backup $1
action=write %(out)s missing $1
ptype2=RegExp
pattern2=backup finished ($1)
desc2=backup $1 done
action2=write %(out)s ok $1
window=2
'''

LOOPER_CORRELATION_RULES = r'''import re
try:
    pending
except NameError:
    pending = {}

def act(kind, name):
    outputTokens.clear()
    outputTokens['action'] = '%s %s' % (kind, name)
    outputTokens['at'] = '%.3f' % now()
    writeTo('actions')

def missing(job):
    del pending[job]
    act('missing', job)

text = inputTokens.get('message', '')
m = re.search(r'login failed for (\S+)', text)
if m and threshold(m.group(1), 3, 3):
    act('brute', m.group(1))
m = re.search(r'disk full on (\S+)', text)
if m and suppress(m.group(1), 4):
    act('disk', m.group(1))
m = re.search(r'backup started (\S+)', text)
if m:
    pending[m.group(1)] = after(2, missing, m.group(1))
m = re.search(r'backup finished (\S+)', text)
if m and m.group(1) in pending:
    pending.pop(m.group(1)).cancel()
    act('ok', m.group(1))
'''


def correlation_conf(tmp, name, logfile, extra_top='', extra_in=''):
    write(os.path.join(tmp, 'corr.rules'), LOOPER_CORRELATION_RULES)
    return config(tmp, "rulesfile = corr.rules\n%s"
                       "input i {\n module = syslog_in\n logfile = '%s'\n%s}\n"
                       "output actions {\n module = logfile_out\n filename = '%s.json'\n"
                       " format = json\n}\n" % (extra_top, logfile, extra_in, name), name + '.conf')


class TestCorrelation(object):

    def test_the_helpers_against_sec_live_and_the_same_in_a_replay(self, tmp):
        """SEC 2.9 as the oracle: the scenario fed in real time to SEC
        (SingleWithThreshold, SingleWithSuppress, PairWithWindow) and to
        Looper (threshold, suppress, after on the arrival clock) gives the
        same actions in the same order; the file then replayed in a batch
        run with the event clock gives them again, with the live run's
        times, in under a second."""
        sec = need('sec')
        log = os.path.join(tmp, 'events.log')
        write(log, '')
        sec_out = os.path.join(tmp, 'sec.out')
        write(os.path.join(tmp, 'rules.sec'), SEC_RULES % {'out': sec_out})
        sec_proc = subprocess.Popen([sec, '--conf=' + os.path.join(tmp, 'rules.sec'),
                                     '--input=' + log, '--log=' + os.path.join(tmp, 'sec.log'),
                                     '--nodetach', '--poll-timeout=0.05'],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        live = Looper(correlation_conf(tmp, 'live', log, extra_in=' follow = yes\n'
                                                                  ' sleeptime = 0.02\n'))
        try:
            wait_until(lambda: 'Opening input file' in read(os.path.join(tmp, 'sec.log')))
            live.wait_log('starting')
            start = time.time()
            for offset, text in CORRELATION_SCENARIO:
                delay = start + offset - time.time()
                if delay > 0:
                    time.sleep(delay)   # the scenario's own pace, not a synchronization
                stamp = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime()) + \
                    ('%.6f' % (time.time() % 1))[1:] + '+00:00'
                with open(log, 'a') as f:
                    f.write('%s host app[1]: %s\n' % (stamp, text))

            def actions(name):
                return [e['action'] for e in json_tokens(os.path.join(tmp, name + '.json'))]
            wait_until(lambda: len(read(sec_out).splitlines()) >= 6, what='SEC: ' + read(sec_out))
            wait_until(lambda: len(actions('live')) >= 6, what='Looper: %r' % actions('live'))
        finally:
            sec_proc.terminate()
            sec_proc.wait(DEADLINE)
            live.signal(signal.SIGTERM)
            live.wait()
        assert read(sec_out).splitlines() == CORRELATION_ACTIONS
        assert actions('live') == CORRELATION_ACTIONS
        t0 = time.monotonic()
        p = run([correlation_conf(tmp, 'replay', log, "clock = date\n")])
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        assert actions('replay') == CORRELATION_ACTIONS
        assert took < 1.5, took         # a second of work, plus Python's start-ups
        # The replay's times are the events' own: the missing job is exactly
        # 2 s after its start, the live run's arrival times within a jitter.
        replay = json_tokens(os.path.join(tmp, 'replay.json'))
        stamps = [_event_time_of(line) for line in read(log).splitlines()]
        assert abs(float(replay[3]['at']) - (stamps[6] + 2)) < 1e-3, (replay, stamps)
        assert abs(float(replay[1]['at']) - stamps[3]) < 1e-3

    @pytest.mark.parametrize('rules, events, expected', [
        # threshold: exactly `seconds` after the window's start is inside it
        ("if threshold('k', 3, 10):\n    writeTo('o')\n", [0, 5, 10], [10]),
        # ... a little after is not: the window slides to the next call
        ("if threshold('k', 3, 10):\n    writeTo('o')\n", [0, 5, 10.5, 12], [12]),
        # after firing, calls are ignored until the window ends, then it starts over
        ("if threshold('k', 2, 10):\n    writeTo('o')\n", [0, 1, 2, 9, 11, 12], [1, 12]),
        # suppress: a suppressed call does not extend the suppression
        ("if suppress('k', 10):\n    writeTo('o')\n", [0, 5, 9, 10, 10.5, 15, 21], [0, 10.5, 21]),
        # a timer due at or before an event's time fires before that event's rules
        ("if inputTokens['n'] == '0':\n    after(5, lambda: writeTo('o'))\n"
         "outputTokens['seen'] = now()\nif inputTokens['n'] == '1':\n    writeTo('o')\n",
         [0, 5], ['timer', 5]),
    ])
    def test_edges_the_same_live_and_in_replay(self, tmp, rules, events, expected):
        """The edges of the helpers, on the event clock in --test (so rules
        with windows are testable from a file of events)."""
        conf = norules_conf(tmp, rules, outputs=('o',))
        write(conf, 'clock = t\n' + read(conf))
        got, p = run_test_mode(conf, ''.join('n=%d\nt=%s\ngo\n' % (i, t) for i, t in
                                             enumerate(events)))
        assert p.returncode == 0, p.stderr
        seen = [float(d['tokens']['t']) if 't' in d['tokens'] else 'timer' for d in got]
        assert seen == expected, (seen, p.stderr)

    def test_digest_groups_and_the_end_of_a_batch_fires_what_is_pending(self, tmp):
        conf = norules_conf(tmp, "digest(inputTokens['node'], 60, 'o', inputTokens)\n",
                            outputs=('o',))
        write(conf, 'clock = t\n' + read(conf))
        events = [('gw1', 0, 'a'), ('gw1', 10, 'b'), ('gw2', 20, 'c'), ('gw1', 30, 'c'),
                  ('gw1', 70, 'd'), ('gw2', 75, 'e')]
        got, p = run_test_mode(conf, ''.join('node=%s\nt=%d\nx=%s\ngo\n' % e for e in events))
        assert p.returncode == 0, p.stderr
        digests = [d['tokens'] for d in got]
        assert [(d['node'], d['count']) for d in digests] == [('gw1', '3'), ('gw2', '2'),
                                                               ('gw1', '1')], digests
        first = digests[0]
        assert json.loads(first['first']) == {'node': 'gw1', 't': '0', 'x': 'a'}
        assert json.loads(first['last']) == {'node': 'gw1', 't': '30', 'x': 'c'}
        assert 'x' not in first and 't' not in first        # not common to all of them

    def test_event_times_in_every_form(self):
        lib = load_looper()
        import calendar
        assert lib._event_time('1764626400.5') == 1764626400.5
        assert lib._event_time('2026-11-22T07:39:24Z') == calendar.timegm((2026, 11, 22, 7, 39, 24))
        assert lib._event_time('2026-11-22T08:39:24.250+01:00') == \
            calendar.timegm((2026, 11, 22, 7, 39, 24)) + 0.25
        wall = calendar.timegm((2026, 1, 5, 12, 0, 0))
        # The latest year that is not in the future: December is last year's.
        dec = lib._event_time('Dec 31 23:00:00', wall)
        assert time.localtime(dec).tm_year == 2025
        jan = lib._event_time('Jan  5 11:00:00', wall)
        assert time.localtime(jan).tm_year == 2026
        assert lib._event_time('not a time') is None and lib._event_time('nan') is None

    def test_state_is_dropped_when_its_window_ends_and_timers_do_not_pile_up(self):
        lib = load_looper()
        timers = lib._Timers('t')
        rules = lib._Rules([], [], lambda *a: None, timers=timers)
        helpers = lib._Correlate(rules, 'x.rules', {})
        for i in range(10000):
            timers.event({'t': str(i)})
            helpers.suppress(('key', i), 5)
            helpers.threshold(('other', i), 2, 5)
            handle = helpers.after(100, lambda: None)
            handle.cancel()
        assert len(helpers.suppressed) <= 7 and len(helpers.thresholds) <= 7
        assert len(timers.heap) < 200, len(timers.heap)

    def test_rules_state_and_timers_across_a_reload(self, tmp):
        """State and timers survive a SIGHUP when the rules file is
        unchanged; a changed file's timers are cancelled and logged."""
        py_module(tmp, 'feedin', FEED_IN)
        py_module(tmp, 'rec', RECORDER)
        rules = ("if inputTokens['n'] == 'arm':\n    after(1.5, lambda: writeTo('a'))\n"
                 "if inputTokens['n'] == 'armlong':\n    after(3600, lambda: writeTo('a'))\n"
                 "if suppress('x', 3600):\n    writeTo('a')\n")
        write(os.path.join(tmp, 'r.rules'), rules)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\nrulesfile = r.rules\n"
                           "logfile = looper.log\ninput i { module = feedin }\n"
                           "output a { module = rec }\n")
        logfile = os.path.join(tmp, 'looper.log')
        looper = Looper(conf)

        def events_in(n):
            def counted():
                looper.signal(signal.SIGUSR1)
                time.sleep(0.05)        # pacing the signals, not synchronizing: the log is
                return re.search(r'counters: events_in=%d ' % n, read(logfile))
            return wait_until(counted, what='%d events in' % n)
        wait_until(lambda: 'starting' in read(logfile))
        feed(tmp, 'first', 'arm')
        wait_until(lambda: len(recorded(tmp, 'a')) == 1)
        looper.signal(signal.SIGHUP)                    # unchanged: the timer and the suppression stay
        wait_until(lambda: 'reloaded:' in read(logfile))
        feed(tmp, 'second')
        wait_until(lambda: len(recorded(tmp, 'a')) == 2, what='the timer after the reload')
        assert recorded(tmp, 'a')[1] == {}              # the timer's fresh outputTokens
        feed(tmp, 'armlong')
        events_in(4)
        write(os.path.join(tmp, 'r.rules'), rules + '# changed\n')
        looper.signal(signal.SIGHUP)                    # changed: its timer is cancelled
        wait_until(lambda: 'its 1 pending timer(s) are cancelled' in read(logfile),
                   what='the cancel; log:\n' + read(logfile))
        feed(tmp, 'third', 'END')
        assert looper.wait() == 0, read(logfile)
        # The changed file's state started over: 'third' is not suppressed;
        # the cancelled timer never fired, not even at the end of the input.
        assert [e.get('n') for e in recorded(tmp, 'a')] == ['first', None, 'third']

    def test_a_timer_s_error_is_a_rules_error_with_its_file_and_line(self, tmp):
        conf = norules_conf(tmp, "def boom():\n    1 / 0\nafter(1, boom)\n", outputs=('o',))
        got, p = run_test_mode(conf, 'k=v\ngo\n')
        assert p.returncode == 1
        assert re.search(r'r\.rules:2: in a timer \(boom\): ZeroDivisionError', p.stderr.decode()), \
            p.stderr

    def test_the_correlation_example_on_the_sample_log(self):
        p = run([os.path.join(EXAMPLES, 'correlate.conf')], cwd='/')
        assert p.returncode == 0, p.stderr
        alerts = [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in
                  p.stdout.splitlines()]
        kinds = [a['alert'] for a in alerts]
        assert kinds == ['filesystem', 'ssh-bruteforce', 'filesystem', 'filesystem',
                         'firewall-digest', 'backup-missing', 'firewall-digest'], p.stdout
        assert alerts[1]['source'] == '198.51.100.77'
        assert alerts[5]['date'] == '"Nov 22 07:47:00"'      # 30 minutes after 07:17:00
        assert alerts[4]['count'] == '2'


def _event_time_of(line):
    """The RFC 3339 time at the start of a log line, in epoch seconds."""
    return load_looper()._event_time(line.split()[0])


##############################################################################
# Watchfor and the raw path (issue 13): the same deliveries, fewer dicts
##############################################################################

class TestWatchfor(object):

    def test_chunk_matching_agrees_with_searching_each_event(self):
        """Property test: the events matching() finds in a chunk are exactly
        those whose own text the pattern matches, for patterns that anchor,
        span lines, match `go` lines, reach across events, look behind."""
        import random
        lib = load_looper()
        rng = random.Random(13)
        values = ['Failed password', 'ok', 'go', 'x=y', '', 'a b', 'Failedgo', 'node=gw1',
                  '\xe9', 'desc=z']
        names = ['desc', 'node', 'a', 'go', 'msg']
        patterns = [r'Failed', r'^desc=.*Failed', r'^node=gw1$', r'go', r'\ngo', r'ok$',
                    r'a=\nb=', r'desc=[\s\S]*node', r'\Anode', r'ok\Z', r'(?<=desc=)ok',
                    r'^$', r'=$', r'x=y\nmsg', r'e']
        for case in range(2000):
            events = []
            for _ in range(rng.randint(1, 8)):
                lines = ['%s=%s' % (rng.choice(names), rng.choice(values))
                         for _ in range(rng.randint(1, 4))]
                events.append('\n'.join(lines))
            text = ''.join(e + '\ngo\n' for e in events)
            chosen = rng.sample(patterns, rng.randint(1, 3))
            files = [('f%d' % i, b'', compile('pass', 'f', 'exec'), re.compile(p, re.M))
                     for i, p in enumerate(chosen)]
            rules = lib._Rules(files, ['o'], lambda *a: None)
            got = [i for i, _, _ in rules.matching(text)]
            expected = [i for i, e in enumerate(events)
                        if any(re.search(p, e, re.M) for p in chosen)]
            assert got == expected, (chosen, events, got, expected)
            for i, start, end in rules.matching(text):
                assert text[start:end] == events[i]

    def test_a_rules_file_delivers_the_same_with_and_without_its_watchfor(self, tmp):
        """Property test over generated events, through real runs: the raw
        path with watchfor gives byte for byte what the rules give on every
        event without it."""
        import random
        rng = random.Random(7)
        lines = []
        for i in range(6000):
            kind = rng.choice(['Failed password for root from 10.0.0.%d' % rng.randint(1, 9),
                               'Accepted password for bob', 'session opened', 'Failed once',
                               'CRON job', 'x=Failed password in a value'])
            lines.append('n=%d\nnode=gw%d\ndesc=%s\ngo\n' % (i, rng.randint(1, 3), kind))
            if rng.random() < 0.01:
                lines.append('not a token line\n')          # the careful path, now and then
        write(os.path.join(tmp, 'events'), ''.join(lines))
        py_module(tmp, 'src', "import os, sys\nsys.stdin.read()\n"
                              "data = open('events', 'rb').read()\n"
                              "for i in range(0, len(data), 7001):\n"
                              "    os.write(1, data[i:i + 7001])\n")
        body = ("import re\n"
                "m = re.search(r'Failed password for (\\S+) from (\\S+)', inputTokens['desc'])\n"
                "if m:\n"
                "    outputTokens['user'], outputTokens['source'] = m.groups()\n"
                "    writeTo('o')\n")
        outputs = {}
        for name, rules in (('with', "watchfor = r'^desc=.*Failed password'\n" + body),
                            ('without', body)):
            write(os.path.join(tmp, name + '.rules'), rules)
            conf = config(tmp, "inputmodulepath = .\nrulesfile = %s.rules\n"
                               "input i { module = src }\n"
                               "output o { module = logfile_out\n filename = %s.out\n"
                               " format = json }\n" % (name, name), name + '.conf')
            p = run([conf])
            assert p.returncode == 0, p.stderr
            outputs[name] = [json.loads(l)['tokens'] for l in read(os.path.join(tmp, name + '.out'))
                             .splitlines()]
            assert counters(p.stderr)['events_in'] == 6000
        assert outputs['with'] == outputs['without']
        assert len(outputs['with']) > 500

    def test_watchfor_must_be_one_string_literal(self, tmp):
        for rules, message in (("watchfor = 'a' + 'b'\n", 'watchfor must be assigned once'),
                               ("watchfor = r'('\n", 'watchfor: bad regular expression'),
                               ("watchfor = 'a'\nwatchfor = 'b'\n", 'watchfor must be assigned once')):
            conf = norules_conf(tmp, rules, outputs=('o',))
            p = run(['--check', conf])
            assert p.returncode == 78 and 'r.rules:' in p.stderr and message in p.stderr, p.stderr

    def test_norules_passes_the_bytes_through_unchanged(self, tmp):
        """NORULES: events reach the outputs byte for byte as the input wrote
        them (no parse, no re-encoding), in order, also when a queue is
        too small for a whole read (then event by event)."""
        data = ''.join('n=%d\nv=caf\u00e9 \\n %d\ngo\n' % (i, i) for i in range(3000))
        write(os.path.join(tmp, 'events'), data)
        py_module(tmp, 'src', "import os, sys\nsys.stdin.read()\nos.write(1, open('events', 'rb').read())\n")
        sh_module(tmp, 'dump', 'cat > $LOOPER_NAME.bin\n')
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src }\noutput big { module = dump }\n"
                           "output small { module = dump\n queuesize = 7 }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        for name in ('big', 'small'):
            got = read(os.path.join(tmp, name + '.bin'))
            assert got.split('configure\n', 1)[1] == data + 'quit\n', name


##############################################################################
# The module skeleton: one protocol block, byte for byte, in every module
##############################################################################

PROTOCOL_BEGIN = '# ----- Looper module protocol: the same, byte for byte, in every shipped module -----'
PROTOCOL_END = '# ----- end of the Looper module protocol -----'
SHARED_BLOCKS = [
    ('# ----- RELP codec: the same, byte for byte, in syslog_in and syslog_out -----',
     '# ----- end of the RELP codec -----', ('syslog_in', 'syslog_out')),
    ('# ----- SNMP BER codec: the same, byte for byte, in snmptrap_in and snmptrap_out -----',
     '# ----- end of the SNMP BER codec -----', ('snmptrap_in', 'snmptrap_out')),
]


def python_modules():
    """Every Python module shipped or given as an example: {name: path}."""
    found = {}
    for directory in (MODULES, os.path.join(EXAMPLES, 'modules')):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and read(path).startswith('#!/usr/bin/env python3'):
                found[name] = path
    return found


def block_of(path, begin, end):
    text = read(path)
    assert text.count(begin) == 1 and text.count(end) == 1, (path, begin)
    return text[text.index(begin):text.index(end) + len(end)]


class TestModuleSkeleton(object):

    def test_the_protocol_block_is_the_same_in_every_module(self):
        canonical = block_of(os.path.join(EXAMPLES, 'modules', 'template_out'),
                             PROTOCOL_BEGIN, PROTOCOL_END)
        modules = python_modules()
        assert set(modules) >= {'syslog_in', 'logfile_out', 'snmptrap_in', 'snmptrap_out',
                                'syslog_out', 'socket_in', 'socket_out', 'email_out',
                                'alertmanager_out', 'template_in', 'template_out'}, modules
        for name, path in modules.items():
            assert block_of(path, PROTOCOL_BEGIN, PROTOCOL_END) == canonical, name

    def test_shared_codecs_are_the_same_in_the_modules_that_carry_them(self):
        for begin, end, names in SHARED_BLOCKS:
            blocks = [block_of(os.path.join(MODULES, name), begin, end) for name in names]
            assert blocks[0] == blocks[1], names

    @pytest.mark.parametrize('name', sorted(python_modules()))
    def test_every_module_documents_itself_and_declares_what_check_needs(self, name, tmp):
        path = python_modules()[name]
        source = read(path)
        assert os.access(path, os.X_OK)
        p = subprocess.run([PY, path, '--help'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=DEADLINE, cwd=tmp)
        assert p.returncode == 0 and p.stdout.startswith(name + ':'), (name, p.stdout[:200])
        assert os.listdir(tmp) == []                # --help starts nothing, writes nothing
        # A raw docstring: a by-hand example reads the same in the file and in --help.
        assert re.search(r'^r"""%s:' % re.escape(name), source, re.M), name
        lib = load_looper()
        errors = []
        declaration = lib._read_declaration(source.encode(), path,
                                            lambda *a: errors.append(a))
        assert errors == [] and declaration and declaration.get('kind') in ('input', 'output'), \
            (name, declaration, errors)
        for key in declaration.get('keys', '').split():
            assert re.search(r'\b%s\b' % re.escape(key), p.stdout), \
                '%s declares %r but its --help does not document it' % (name, key)
        p = subprocess.run([PY, path, '--bogus'], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 78 and b'takes no arguments' in p.stderr, (name, p.stderr)


##############################################################################
# Shipped modules inside Looper
##############################################################################

class TestModulesInLooper(object):

    def test_input_restart_with_statefile_neither_skips_nor_repeats(self, tmp):
        log = os.path.join(tmp, 'app.log')
        write(log, ''.join('Nov 22 07:00:00 host app[1]: line %d\n' % i for i in range(3000)))
        py_module(tmp, 'rec', RECORDER)
        conf = config(tmp, "outputmodulepath = .\n"
                           "input i {\n module = syslog_in\n logfile = app.log\n statefile = app.state\n"
                           " follow = yes\n sleeptime = 0.05\n" + FAST + "}\n"
                           "output o { module = rec }\n")

        def lines():
            return [int(e['message'].split()[1]) for e in recorded(tmp, 'o')]
        looper = Looper(conf)
        wait_until(lambda: len(lines()) >= 1)
        victim = [c for c in children_of(looper.proc.pid) if 'syslog_in' in read('/proc/%d/cmdline' % c)]
        os.kill(victim[0], signal.SIGKILL)
        looper.wait_log(r"input 'i' \(pid \d+\) terminated by signal 9")
        wait_until(lambda: lines()[-1:] == [2999], what='all lines after the restart')
        got = lines()
        assert sorted(set(got)) == list(range(3000)), 'a line was skipped'
        # A kill can fall between writing events and saving the offset, so
        # the restart may repeat the lines of that last write, never more.
        assert len(got) - 3000 < 1000, len(got)
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0, looper.log()
        # A clean stop saved the offset: a new run sends exactly the new lines.
        with open(log, 'a') as f:
            f.write(''.join('Nov 22 07:00:00 host app[1]: line %d\n' % i for i in range(3000, 3010)))
        before = len(got)
        looper = Looper(conf)
        wait_until(lambda: lines()[-1:] == [3009])
        looper.signal(signal.SIGTERM)
        assert looper.wait() == 0
        assert lines()[before:] == list(range(3000, 3010))

    def test_syslog_in_to_logfile_out_end_to_end(self, tmp):
        write(os.path.join(tmp, 'in.log'),
              'Nov 22 07:39:24 gw1 kernel: [UFW BLOCK] IN=eth0 SRC=10.0.0.1\n'
              '2026-11-22T07:39:25.123456+00:00 gw2 sshd[412]: Failed password for root from '
              '10.0.0.2 port 22 ssh2\n'
              'garbage that is not syslog\n')
        conf = config(tmp, "input i { module = syslog_in\n logfile = in.log }\n"
                           "output o { module = logfile_out\n filename = out.log }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        out = read(os.path.join(tmp, 'out.log')).splitlines()
        assert len(out) == 3
        assert 'node=gw1' in out[0] and 'program=kernel' in out[0]
        assert 'node=gw2' in out[1] and 'pid=412' in out[1] and 'program=sshd' in out[1]
        assert 'desc="garbage that is not syslog"' in out[2] and 'node=' not in out[2]


##############################################################################
# Interoperability with real programs (rsyslog, logger, net-snmp)
##############################################################################

def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class TestInterop(object):

    def test_rsyslog_file_format_from_logger_is_routed(self, tmp):
        """logger -> rsyslogd (UDP on loopback, RSYSLOG_FileFormat, RFC 3339
        timestamps) -> a file -> syslog_in -> rules -> logfile_out (json)."""
        rsyslogd = need('rsyslogd')
        logger = need('logger')
        port = free_udp_port()
        messages = os.path.join(tmp, 'messages')
        write(os.path.join(tmp, 'rsyslog.conf'),
              'global(workDirectory="%s")\n'
              'module(load="imudp")\n'
              'input(type="imudp" address="127.0.0.1" port="%d")\n'
              '*.* action(type="omfile" file="%s" template="RSYSLOG_FileFormat")\n'
              % (tmp, port, messages))
        daemon = subprocess.Popen([rsyslogd, '-n', '-f', os.path.join(tmp, 'rsyslog.conf'),
                                   '-i', os.path.join(tmp, 'rsyslog.pid')],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def sent():
                # UDP may be sent before rsyslog listens: resend until both land.
                # logger's default on the network is RFC 5424, which rsyslog
                # writes as `myapp[4242] msg` (no colon after the tag).
                for fmt, text in (('--rfc3164', 'classic'), ('--rfc5424', 'modern')):
                    subprocess.run([logger, '-n', '127.0.0.1', '-P', str(port), '-d', fmt,
                                    '-t', 'myapp', '--id=4242',
                                    'Failed password for %s from 10.9.8.7 port 22 ssh2' % text],
                                   check=True, timeout=DEADLINE)
                return 'for classic' in read(messages) and 'for modern' in read(messages)
            wait_until(sent, what='rsyslogd to write the messages')
        finally:
            daemon.terminate()
            daemon.wait(DEADLINE)
        write(os.path.join(tmp, 'r.rules'),
              "if inputTokens.get('program') == 'myapp':\n    writeTo('o')\n    exit()\n")
        conf = config(tmp, "rulesfile = r.rules\n"
                           "input i { module = syslog_in\n logfile = messages }\n"
                           "output o { module = logfile_out\n filename = out.json\n format = json }\n")
        p = run([conf])
        assert p.returncode == 0, p.stderr
        events = [json.loads(line)['tokens'] for line in read(os.path.join(tmp, 'out.json')).splitlines()]
        kinds = set()
        for e in events:
            assert re.match(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$', e['date']), e
            assert e['program'] == 'myapp' and e['pid'] == '4242', (e, read(messages))
            m = re.match(r'Failed password for (classic|modern) from 10.9.8.7 port 22 ssh2$', e['message'])
            assert m, e
            kinds.add(m.group(1))
            assert e['node'] and e['desc'].startswith('myapp[4242]')
        assert kinds == {'classic', 'modern'}, read(messages)


##############################################################################
# The benchmark: a smoke run so that bench/bench.py does not rot
##############################################################################

class TestBench(object):

    def test_bench_smoke_run_agrees_on_matches_and_reports_every_section(self, tmp):
        """bench/bench.py --smoke: 2000 lines through every installed tool
        (rules with and without watchfor), NORULES against syslog_in alone,
        start-up, latency, memory (stalled and restarting outputs) and the
        correlation helpers' bytes per key; the tools must agree on the
        matches and logfile_out must write every line."""
        p = subprocess.run([sys.executable, os.path.join(HERE, 'bench', 'bench.py'), '--smoke',
                            '--python', PY, '--workdir', tmp],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout
        for section in ('### Throughput', '### NORULES', '### Start-up', '### Latency',
                        '### Memory', '### Correlation', '### Targets'):
            assert section in out, out
        for row in ('Looper', 'Looper, watchfor', 'syslog_in alone > /dev/null'):
            assert re.search(r'^\| %s \| [\d.]+ s \|' % re.escape(row), out, re.M), out
        for passed in (r'identical match counts and hashes \| expected \d+',
                       r'NORULES: logfile_out wrote every line \| 2,000 lines',
                       r'logfile_out unaffected by a stalled output \| 2000/2000 delivered',
                       r'logfile_out unaffected by a confirmed output beside one restarting '
                       r'after 60 s \| 2000/2000 delivered'):
            assert re.search(r'^\| %s \| PASS \|' % passed, out, re.M), out
        assert re.search(r'^\| Looper NORULES, logfile_out as shipped .*\| 2000 \| \*\*[\d.]+x',
                         out, re.M), out
        assert re.search(r'^\| `python looper.py basic.conf`.*\| [\d.]+ ms \| [\d.]+x `cat`',
                         out, re.M), out
        for case in ('suppress', 'threshold'):
            assert re.search(r'^\| memory per key, %s .*\| -?\d+ B/key' % case, out, re.M), out
        if IN_CI:
            for peer in ('SEC', 'swatch'):
                assert re.search(r'^\| %s \| [\d.]+ s \|' % peer, out, re.M), out
            assert re.search(r'\(SEC: -?\d+ B/op\)', out), out
