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
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPER = os.path.join(HERE, 'looper.py')
MODULES = os.path.join(HERE, 'modules')
EXAMPLES = os.path.join(HERE, 'examples')
PY = os.environ.get('LOOPER_PYTHON', sys.executable)
IN_CI = os.environ.get('CI') == 'true'
DEADLINE = 30.0         # seconds: the longest any single wait in these tests may take


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
    """Events a RECORDER output received, in order."""
    return [json.loads(line) for line in read(os.path.join(directory, name + '.jsonl')).splitlines()]


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
         4, 'queuesize must be a positive whole number'),
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

    def test_files_writable_by_others_are_refused(self, tmp):
        sh_module(tmp, 'x', 'cat >/dev/null\n')
        rules = write(os.path.join(tmp, 'r.rules'), "writeTo('o')\n")
        conf = config(tmp, "outputmodulepath = .\ninputmodulepath = .\nrulesfile = r.rules\n"
                           "input a { module = x }\noutput o { module = x }\n")
        assert run(['--check', conf]).returncode == 0
        os.chmod(rules, 0o666)
        p = run(['--check', conf])
        assert p.returncode == 78 and 'chmod o-w' in p.stderr and 'r.rules' in p.stderr
        os.chmod(rules, 0o644)
        os.chmod(conf, 0o646)
        p = run(['--check', conf])
        assert p.returncode == 78 and 'refusing a configuration file' in p.stderr

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
        assert c['events_in'] == 5000 and c['output.a.delivered'] == 5000

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
        assert c['output.fast.delivered'] == 3000
        assert c['output.stuck.lost'] + c['output.stuck.delivered'] == 3000
        assert 'events within 1 s (draintimeout); they are lost' in looper.log()

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
            lines = read(os.path.join(directory, name)).splitlines()
            if len(lines) == 2:
                out[int(name[6:])] = (lines[0].split(), lines[1].split())
    return out


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def rss_kb(pid):
    return int(proc_status(pid)['VmRSS'].split()[0])


def zombies_of(pid):
    return [c for c in children_of(pid) if proc_status(c)['State'].startswith('Z')]


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
        wait_until(lambda: read(os.path.join(tmp, 'child.pid')).startswith('child='))
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
        wait_until(lambda: not os.path.exists('/proc/%d' % gc2) or
                   proc_status(gc2)['State'].startswith('Z'), what='grandchild to be gone')
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
                                             if c in pids and proc_status(c)['State'][0] != 'Z'])
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
                         r"signal 15) after [\d.]+ s; \d+ event\(s\) kept in its queue", p.stderr), p.stderr
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
        assert c['output.stuck.dropped'] + c['output.stuck.lost'] + \
            c['output.stuck.delivered'] == 2000
        assert re.search(r"output 'stuck': queue full \(10 events\), dropped an event", p.stderr)

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
        assert c['output.c.delivered'] == 60
        assert c['output.c.retried'] == 9           # 0, 7, 14, ... 56
        assert c['output.c.restarts'] == 2           # died at 20, hung at 30
        assert 'could not deliver an event (busy); resending it in 0.01 s' in p.stderr
        assert re.search(r"no ok/error for an event within 0.5 s \(confirmtimeout\)", p.stderr)

    def test_confirm_configure_timeout_desync_and_trickle(self, tmp):
        conf = delivery_conf(tmp, 30, [
            ('c', " module = confirmer\n confirm = yes\n hang_configure = 1\n extra_ok_at = 10\n"
                  " trickle_at = 20\n confirmtimeout = 0.5\n" + FAST)])
        p = run([conf])
        assert p.returncode == 0, p.stderr
        assert 'no ok/error for configure within 0.5 s' in p.stderr
        assert "protocol desync: got 'ok' when no reply was due" in p.stderr
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
        assert "output 'b' was changed or removed by the reload" in log
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
        wait_until(lambda: 'counters: ' in read(os.path.join(tmp, 'looper.log')))
        c = counters(read(os.path.join(tmp, 'looper.log')))
        assert c['events_in'] == 4 and c['rules_errors'] == 1
        assert c['output.a.delivered'] == 3 and c['output.a.queued'] == 0
        assert c['input.i.restarts'] == 0
        feed(tmp, 'END')
        assert looper.wait() == 0

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
# Chaos: many events, random kills and errors (RELIABILITY.md 16)
##############################################################################

class TestChaos(object):

    def test_chaos(self, tmp):
        import random
        rng = random.Random(1234)
        total = 10000
        # A confirming output that answers 'error' at random (2%) and an
        # unconfirmed one; the test kills random modules while events flow.
        py_module(tmp, 'src', COUNTER_IN.replace("out.flush()", "out.flush()\nimport time\ntime.sleep(0.2)"))
        py_module(tmp, 'rec', RECORDER)
        py_module(tmp, 'flaky', CONFIRMER.replace(
            "    reply = 'ok\\n'\n",
            "    reply = 'ok\\n'\n    import random\n"
            "    if random.random() < 0.02:\n        reply = 'error random\\n'\n"))
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = .\n"
                           "input i { module = src\n count = %d }\n"
                           "output c1 {\n module = flaky\n confirm = yes\n retrydelay = 0.001\n"
                           " queuesize = 200\n confirmtimeout = 2\n%s}\n"
                           "output c2 {\n module = flaky\n confirm = yes\n retrydelay = 0.001\n"
                           " queuesize = 200\n confirmtimeout = 2\n%s}\n"
                           "output u {\n module = rec\n queuesize = 200\n%s}\n"
                           % (total, FAST, FAST, FAST))
        looper = Looper(conf)
        kills = 0
        deadline = time.monotonic() + 40
        while looper.proc.poll() is None and time.monotonic() < deadline:
            # Outputs only: the counting input replays from 0 when restarted
            # (input restarts are tested with syslog_in's state file).
            victims = [c for c in children_of(looper.proc.pid)
                       if not proc_status(c)['State'].startswith('Z')
                       and '/src' not in read('/proc/%d/cmdline' % c)]
            if victims and rng.random() < 0.5:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    kills += 1
                except OSError:
                    pass
            time.sleep(rng.uniform(0.01, 0.05))
        status = looper.wait(60)
        log = looper.log()
        c = counters(log)
        for name in ('c1', 'c2'):
            got = numbers_in(tmp, name)
            # Every event at least once, in order (a resend may repeat the
            # event just before it, never go back further).
            assert sorted(set(got)) == list(range(total)), name
            assert all(b >= a or b == a - 1 for a, b in zip(got, got[1:])), name
            assert c['output.%s.lost' % name] == 0
        u = numbers_in(tmp, 'u')
        unconfirmed_lost = total - len(set(u))
        # Without confirm, a loss is possible only where a module died with
        # events it had read but not written out; then it must be counted...
        # except those a killed module had read: Looper cannot see those.
        assert c['output.u.lost'] + c['output.u.dropped'] <= unconfirmed_lost
        print('chaos: %d events, %d kills, %d+%d error replies, restarts c1=%d c2=%d u=%d '
              'input=%d, unconfirmed missing=%d, status=%d' % (
                  total, kills, c['output.c1.retried'], c['output.c2.retried'],
                  c['output.c1.restarts'], c['output.c2.restarts'], c['output.u.restarts'],
                  c['input.i.restarts'], unconfirmed_lost, status))
        assert kills >= 10


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
