"""Tests for modules/syslog_in: files, acknowledged input, the network
listeners, RELP, real peers (logger, rsyslogd) and the speed work.

Run:  python3 -m pytest -q test_wip_syslogin.py
LOOPER_PYTHON chooses the interpreter that runs the module (and looper.py).

These supersede the syslog_in tests of test_looper.py's TestModules (whose
exact token lists predate the `source` token and whose exit status 1 for a
configuration error is now 78); see TestSyslogInFiles's docstring.
"""
import errno
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_looper import (wait_until, need, write, config, read, Looper, PY, HERE, MODULES,
                         EXAMPLES, IN_CI, DEADLINE, tmp, RECORDER, recorded, py_module,
                         free_udp_port)

SYSLOG_IN = os.path.join(MODULES, 'syslog_in')
BASE = '199e3db'            # the commit before this work: the speed test's reference
# The tokens the module sent before `source` and `fromhost` existed: with
# them chosen, its output must be the original's byte for byte.
OLD_TOKENS = 'date node desc program pid message msgid sd facility severity'


##############################################################################
# Helpers
##############################################################################

def load_syslog_in():
    """The module's functions, loaded from its file (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader('syslog_in_under_test', SYSLOG_IN)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def si_config(**keys):
    return ''.join('%s=%s\n' % item for item in keys.items()).encode()


def si_events(data):
    """Protocol bytes -> list of events, each a list of (token, value) pairs."""
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


def levels(stderr):
    """stderr lines as (level, text) pairs; level None for a line with no
    <N> prefix (the progress lines)."""
    out = []
    for line in stderr.decode('utf-8', 'replace').splitlines():
        m = re.match(r'<(\d)>syslog_in: (.*)$', line)
        out.append((int(m.group(1)), m.group(2)) if m else (None, line))
    return out


def run_syslog_in(directory, text=None, config=None, env=None, **keys):
    """syslog_in in batch mode over `text` written to directory/in.log:
    (events, CompletedProcess)."""
    if text is not None:
        with open(os.path.join(directory, 'in.log'), 'wb') as f:
            f.write(text if isinstance(text, bytes) else text.encode('utf-8', 'surrogateescape'))
        keys.setdefault('logfile', 'in.log')
    p = subprocess.run([PY, SYSLOG_IN], input=config or si_config(**keys), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, cwd=directory, env=env, timeout=DEADLINE)
    assert b'Traceback' not in p.stderr, p.stderr.decode()
    return si_events(p.stdout), p


def one_event(directory, line, **keys):
    """The tokens (in order) of the single event for one line."""
    events, p = run_syslog_in(directory, line + '\n', **keys)
    assert p.returncode == 0, p.stderr
    assert len(events) == 1, events
    return events[0]


class Stream(object):
    """Collects what a process writes on one pipe, in a thread."""

    def __init__(self, stream):
        self.data = b''
        self._stream = stream
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True
        self._thread.start()

    def _run(self):
        while True:
            try:
                chunk = os.read(self._stream.fileno(), 65536)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            self.data += chunk

    def events(self):
        data = self.data
        return si_events(data[:data.rfind(b'\ngo\n') + 4] if b'\ngo\n' in data else b'')

    def wait_events(self, count, what='events', timeout=DEADLINE):
        return wait_until(lambda: len(self.events()) >= count and self.events(), timeout,
                          '%d %s (have %d: %r)' % (count, what, len(self.events()), self.data[-300:]))


class Module(object):
    """syslog_in running in the background, fed its configuration as Looper
    would: stdin closed after it, or kept open (ack mode, or `open_stdin`)
    for `ok` lines.  stop() kills it if it is still there."""

    def __init__(self, directory, config, env=None, stdin_open=False):
        self.proc = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=directory, env=env)
        self.out = Stream(self.proc.stdout)
        self.err = Stream(self.proc.stderr)
        self.proc.stdin.write(config)
        self.proc.stdin.flush()
        if not stdin_open:
            self.proc.stdin.close()

    def send(self, text):
        self.proc.stdin.write(text.encode() if isinstance(text, str) else text)
        self.proc.stdin.flush()

    def wait_err(self, pattern, timeout=DEADLINE):
        return wait_until(lambda: re.search(pattern, self.err.data.decode('utf-8', 'replace')),
                          timeout, 'stderr %r (have %r)' % (pattern, self.err.data[-2000:]))

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


def follow_module(directory, text, **keys):
    """syslog_in following directory/f.log (which starts as `text`)."""
    path = os.path.join(directory, 'f.log')
    write(path, text)
    keys.setdefault('sleeptime', '0.05')
    keys.setdefault('logfile', 'f.log')
    return path, Module(directory, si_config(follow='yes', **keys))


def state_of(path):
    """The state file's record per path: {path: {dev, inode, offset}}."""
    with open(path) as f:
        return json.load(f)['files']


##############################################################################
# Step 1: the module skeleton
##############################################################################

class TestSyslogInSkeleton(object):

    def test_declaration_and_protocol_block_match_the_template(self):
        text = read(SYSLOG_IN)
        lines = text.split('\n')
        assert lines[0] == '#!/usr/bin/env python3' and lines[1] == '# /// looper'
        declaration = lines[1:lines.index('# ///') + 1]
        assert "# kind = 'input'" in declaration and "# ack = 'no'" in declaration
        keys = [line for line in declaration if line.startswith('# keys = ')][0]
        for key in ('logfile', 'follow', 'statefile', 'tokens', 'maxline'):
            assert key in keys.split("'")[1].split(), key
        template = read(os.path.join(EXAMPLES, 'modules', 'template_in'))
        begin, end = ('# ----- Looper module protocol: the same, byte for byte, in every shipped '
                      'module -----', '# ----- end of the Looper module protocol -----')

        def block(source):
            return source[source.index(begin):source.index(end) + len(end)]
        assert block(text) == block(template)
        assert os.stat(SYSLOG_IN).st_mode & 0o111

    def test_help_prints_the_docstring_and_starts_nothing(self, tmp):
        p = subprocess.run([PY, SYSLOG_IN, '--help'], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=tmp, timeout=DEADLINE, input=b'')
        assert p.returncode == 0 and p.stderr == b''
        assert p.stdout.decode().startswith('syslog_in: ')
        assert 'Exit status' in p.stdout.decode()
        assert os.listdir(tmp) == []

    def test_help_example_works_when_copied(self, tmp):
        # The by-hand example in --help, with the file replaced by one here.
        text = subprocess.run([PY, SYSLOG_IN, '--help'], stdout=subprocess.PIPE,
                              timeout=DEADLINE).stdout.decode()
        command = [line.strip() for line in text.splitlines()
                   if line.strip().startswith("printf 'logfile=")][0]
        write(os.path.join(tmp, 'syslog'), 'Nov 22 07:39:24 gw1 sshd[1]: hello\n')
        command = re.sub(r"logfile=\S+?\\n", "logfile=syslog\\\\n", command)
        command = command.replace('modules/syslog_in', SYSLOG_IN).replace('python3', PY)
        p = subprocess.run(command, shell=True, cwd=tmp, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 0, (command, p.stderr)
        assert dict(si_events(p.stdout)[0])['message'] == 'hello'

    def test_arguments_are_refused(self, tmp):
        p = subprocess.run([PY, SYSLOG_IN, '--follow'], input=b'', stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 78 and b'takes no arguments' in p.stderr

    @pytest.mark.parametrize('config, message', [
        (b'module=syslog_in\n', b'no logfile'),
        (b'logfile=missing.log\n', b"cannot open logfile 'missing.log'"),
        (b'logfile=.\n', b'not a regular file'),
        (b'logfile=-\nfollow=maybe\n', b'follow must be yes or no'),
        (b'logfile=-\nstart=middle\n', b'start must be'),
        (b'logfile=-\nsleeptime=soon\n', b'sleeptime must be'),
        (b'logfile=-\nsleeptime=0\n', b'sleeptime must be'),
        (b'logfile=-\nmaxline=-5\n', b'maxline must be'),
        (b'logfile=-\ntokens=date nonsense\n', b"unknown token 'nonsense'"),
    ])
    def test_configuration_errors_exit_78_with_one_error_line(self, tmp, config, message):
        events, p = run_syslog_in(tmp, config=config)
        assert p.returncode == 78, (config, p.stderr)
        assert levels(p.stderr) and levels(p.stderr)[0][0] == 3
        assert message in p.stderr and p.stderr.count(b'\n') == 1, p.stderr
        assert events == []

    def test_batch_is_quiet_on_stderr(self, tmp):
        events, p = run_syslog_in(tmp, 'Nov 22 07:39:24 a b: c\n', statefile='st')
        assert p.returncode == 0 and p.stderr == b'' and len(events) == 1

    def test_follow_without_statefile_warns_once_at_start(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n')
        try:
            m.out.wait_events(1)
            m.wait_err('without a statefile')
            warned = [line for line in levels(m.err.data) if 'statefile' in line[1]]
            assert len(warned) == 1 and warned[0][0] == 4, m.err.data
        finally:
            m.stop()
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n', statefile='st')
        try:
            m.out.wait_events(1)
            wait_until(lambda: os.path.exists(os.path.join(tmp, 'st')), what='the state file')
            assert b'statefile' not in m.err.data
        finally:
            m.stop()

    def test_follow_waits_for_a_missing_file_like_tail_F(self, tmp):
        m = Module(tmp, si_config(logfile='later.log', follow='yes', sleeptime='0.05',
                                  statefile='st'))
        try:
            m.wait_err('does not exist')
            time.sleep(0.3)                             # polls, says it once
            assert m.proc.poll() is None
            assert len([l for l in levels(m.err.data) if 'does not exist' in l[1]]) == 1
            write(os.path.join(tmp, 'later.log'), 'Nov 22 07:39:24 a b: here\n')
            events = m.out.wait_events(1)
            assert dict(events[0])['message'] == 'here'
            m.wait_err('appeared')
            assert [l[0] for l in levels(m.err.data) if 'appeared' in l[1]] == [6]
        finally:
            m.stop()

    def test_routine_notes_are_info(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n', statefile='st')
        try:
            m.out.wait_events(1)
            os.rename(path, path + '.1')
            write(path, 'Nov 22 07:39:25 a b: two\n')
            m.out.wait_events(2)
            m.wait_err('rotated')
            assert [l[0] for l in levels(m.err.data) if 'rotated' in l[1]] == [6]
        finally:
            m.stop()

    def test_sigterm_is_prompt_and_quiet(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n', sleeptime='30', statefile='st')
        try:
            m.out.wait_events(1)
            wait_until(lambda: os.path.exists(os.path.join(tmp, 'st')), what='the state file')
            m.proc.send_signal(signal.SIGTERM)
            assert m.wait_exit() == -signal.SIGTERM         # well before the 30 s poll
            assert b'Traceback' not in m.err.data
        finally:
            m.stop()

    def test_orphan_exits_when_looper_is_gone(self, tmp):
        """Following a quiet file, the module notices within about a second
        that the reader of its stdout (Looper) is gone, and exits."""
        write(os.path.join(tmp, 'f.log'), 'Nov 22 07:39:24 a b: one\n')
        p = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=tmp)
        try:
            p.stdin.write(si_config(logfile='f.log', follow='yes', statefile='st',
                                    sleeptime='0.05'))
            p.stdin.close()
            assert p.stdout.read(10) == b'date=Nov 2'
            p.stdout.close()                                # Looper's end of the pipe
            assert p.wait(timeout=10) in (0, 1)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


##############################################################################
# Step 2: files (formats, several files, one state file, progress)
##############################################################################

LINES_OF_EVERY_KIND = [
    'Nov 22 07:39:24 prometheus kernel: Out of memory: Killed process 123',
    'Nov  2 07:39:24 dope sshd[412]: Failed password for root from 10.0.0.1 port 22 ssh2',
    '<38>Nov 22 07:39:24 dope sshd[412]: Accepted password for weed',
    '2026-11-22T07:39:24.123456+00:00 weed CRON[99]: (root) CMD (true)',
    '<34>1 2026-11-22T07:39:24Z gw1 su 77 ID47 - su root failed',
    '<34>1 2026-11-22T07:39:24Z gw1 su - ID47 - no procid',
    'Nov 22 07:39:24 gw1 -- MARK --',
    'this is not syslog',
    '<999>Nov 22 07:39:24 gw1 x: y',
    'Nov 22 07:39:24 gw1 a[]: b',
    '2026-11-22T08:29:01.762283+00:00 vm myapp[4242] rsyslog writes RFC 5424 so',
    '2026-11-22T08:29:01.762283+00:00 vm myapp and without a PROCID so',
    'Nov 22 07:39:24 gw1 foo bar',
]


def src(path='in.log'):
    return ('source', path)


class TestSyslogInFiles(object):
    """syslog_in reading files.  These replace the syslog_in tests of
    test_looper.py's TestModules (test_syslog_in_*: same cases, with the
    `source` token every event now has, exit 78 for configuration errors,
    and the state file's record per path); TestModules' logfile_out tests
    are not concerned."""

    # -- formats --------------------------------------------------------------

    def test_tokens_key_chooses_tokens_and_never_drops_a_line(self, tmp):
        text = ('<34>Nov 22 07:39:24 gw1 sshd[412]: Failed password for root\n'
                'Nov 22 07:39:25 gw1 cron: no pid here\n'
                '<165>1 2026-11-22T07:39:26.1Z gw2 app 99 ID7 - rfc 5424\n'
                'not syslog at all\n')
        events, p = run_syslog_in(tmp, text, tokens='date, node pid facility')
        assert p.returncode == 0, p.stderr
        assert [dict(e) for e in events] == [
            {'date': 'Nov 22 07:39:24', 'node': 'gw1', 'pid': '412', 'facility': 'auth'},
            {'date': 'Nov 22 07:39:25', 'node': 'gw1'},
            {'date': '2026-11-22T07:39:26.1Z', 'node': 'gw2', 'pid': '99', 'facility': 'local4'},
            {'desc': 'not syslog at all'}]                     # never dropped
        events, p = run_syslog_in(tmp, text, tokens='pid')
        assert [dict(e) for e in events] == [
            {'pid': '412'}, {'desc': 'cron: no pid here'}, {'pid': '99'},
            {'desc': 'not syslog at all'}]
        # `source` does not count as content: a line without any chosen
        # token still gets its desc.
        events, p = run_syslog_in(tmp, text, tokens='pid source')
        assert [dict(e) for e in events] == [
            {'pid': '412', 'source': 'in.log'}, {'desc': 'cron: no pid here', 'source': 'in.log'},
            {'pid': '99', 'source': 'in.log'}, {'desc': 'not syslog at all', 'source': 'in.log'}]

    def test_fast_and_careful_paths_agree_for_any_tokens(self):
        """The whole-chunk fast path against the line-by-line one, for every
        shape of line and several choices of tokens, with and without a
        tail (source)."""
        module = load_syslog_in()
        lines = read(os.path.join(EXAMPLES, 'sample.log')).splitlines() + LINES_OF_EVERY_KIND + [
            '<13>Nov 22 07:39:24 h p[1]: m', '<999>Nov 22 07:39:24 h p: m', 'Nov 22 07:39:24 h p[1] m',
            '<165>1 2026-11-22T07:39:26Z h app - - - x', 'x', 'Nov 22 07:39:24 host', '']
        text = '\n'.join(lines) + '\n'
        for chosen in (module.TOKENS, ('date', 'node', 'desc'), ('message',), ('pid', 'message'),
                       ('severity', 'desc'), ('program', 'pid'), ('source',), ('date', 'source')):
            for tail in ('', '\nsource=x.log'):
                tail = tail if 'source' in chosen else ''
                fast = module._Parser(65536, chosen, tail).events(text)
                careful = ''.join(module._event_slowly(line, frozenset(chosen), tail)
                                  for line in lines if line)
                assert fast == careful, (chosen, tail)

    def test_bsd_line(self, tmp):
        event = one_event(tmp, 'Nov 22 07:39:24 dope sshd[412]: Failed password '
                               'for root from 10.0.0.1 port 22 ssh2')
        assert event == [('date', 'Nov 22 07:39:24'), ('node', 'dope'),
                         ('desc', 'sshd[412]: Failed password for root from 10.0.0.1 port 22 ssh2'),
                         ('program', 'sshd'), ('pid', '412'),
                         ('message', 'Failed password for root from 10.0.0.1 port 22 ssh2'), src()]

    def test_bsd_space_padded_day_and_no_pid(self, tmp):
        event = one_event(tmp, 'Nov  2 07:39:24 prometheus kernel: Out of memory: Killed process 123')
        assert event == [('date', 'Nov  2 07:39:24'), ('node', 'prometheus'),
                         ('desc', 'kernel: Out of memory: Killed process 123'),
                         ('program', 'kernel'), ('message', 'Out of memory: Killed process 123'),
                         src()]

    @pytest.mark.parametrize('date', ['2026-11-22T07:39:24.123456+00:00', '2026-11-22T07:39:24Z',
                                      '2026-11-22T07:39:24-05:00'])
    def test_rfc3339_line(self, tmp, date):
        event = one_event(tmp, date + ' weed CRON[99]: (root) CMD (true)')
        assert event == [('date', date), ('node', 'weed'), ('desc', 'CRON[99]: (root) CMD (true)'),
                         ('program', 'CRON'), ('pid', '99'), ('message', '(root) CMD (true)'), src()]

    def test_tag_with_pid_but_no_colon(self, tmp):
        # rsyslog's file format for a message it received as RFC 5424.
        event = one_event(tmp, '2026-11-22T08:29:01.762283+00:00 vm myapp[4242] Failed password for x')
        assert event == [('date', '2026-11-22T08:29:01.762283+00:00'), ('node', 'vm'),
                         ('desc', 'myapp[4242] Failed password for x'), ('program', 'myapp'),
                         ('pid', '4242'), ('message', 'Failed password for x'), src()]
        assert one_event(tmp, 'Nov 22 07:39:24 gw1 no tag here') == [
            ('date', 'Nov 22 07:39:24'), ('node', 'gw1'), ('desc', 'no tag here'), src()]

    def test_rfc5424_without_procid_keeps_program(self, tmp):
        """rsyslog writes an RFC 5424 message without PROCID as `DATE HOST
        APP MSG` (no colon): with an RFC 3339 date the first word is the
        program, as rsyslog has it; the raw RFC 5424 form keeps it too."""
        event = one_event(tmp, '2026-12-01T21:23:30.675859+00:00 vm myapp hello world')
        assert event == [('date', '2026-12-01T21:23:30.675859+00:00'), ('node', 'vm'),
                         ('desc', 'myapp hello world'), ('program', 'myapp'),
                         ('message', 'hello world'), src()]
        assert dict(one_event(tmp, '2026-12-01T21:23:30Z vm myapp')) == {
            'date': '2026-12-01T21:23:30Z', 'node': 'vm', 'desc': 'myapp', 'program': 'myapp',
            'source': 'in.log'}
        assert 'program' not in dict(one_event(tmp, '2026-12-01T21:23:30Z vm -- MARK --'))
        event = one_event(tmp, '<13>1 2026-12-01T21:23:30.675859+00:00 vm myapp - - '
                               '[timeQuality tzKnown="1" isSynced="0"] hello world')
        assert event == [('date', '2026-12-01T21:23:30.675859+00:00'), ('node', 'vm'),
                         ('desc', 'myapp: hello world'), ('program', 'myapp'),
                         ('message', 'hello world'), ('sd', '[timeQuality tzKnown="1" isSynced="0"]'),
                         ('facility', 'user'), ('severity', 'notice'), src()]

    def test_pri_prefix(self, tmp):
        event = dict(one_event(tmp, '<38>Nov 22 07:39:24 dope sshd[1]: Accepted'))
        assert event['facility'] == 'auth' and event['severity'] == 'info'    # 38 = 4*8 + 6
        assert event['date'] == 'Nov 22 07:39:24' and event['program'] == 'sshd'
        event = dict(one_event(tmp, '<3>2026-11-22T07:39:24Z gw1 kernel: oops'))
        assert (event['facility'], event['severity']) == ('kern', 'err')
        assert 'facility' not in dict(one_event(tmp, 'Nov 22 07:39:24 dope x: y'))

    def test_rfc5424(self, tmp):
        event = one_event(tmp, '<34>1 2026-11-22T07:39:24.003Z gw1 su 77 ID47 '
                               '[origin ip="192.0.2.1"] \ufeffsu root failed on /dev/pts/8')
        assert event == [('date', '2026-11-22T07:39:24.003Z'), ('node', 'gw1'),
                         ('desc', 'su[77]: su root failed on /dev/pts/8'), ('program', 'su'),
                         ('pid', '77'), ('message', 'su root failed on /dev/pts/8'),
                         ('msgid', 'ID47'), ('sd', '[origin ip="192.0.2.1"]'),
                         ('facility', 'auth'), ('severity', 'crit'), src()]
        nil = dict(one_event(tmp, '<13>1 - myhost - - - - hello'))
        assert nil == {'node': 'myhost', 'desc': 'hello', 'message': 'hello',
                       'facility': 'user', 'severity': 'notice', 'source': 'in.log'}

    @pytest.mark.parametrize('line', ['this is not syslog at all', 'Nov 22 7:39:24 x y: z',
                                      '<999>Nov 22 07:39:24 gw1 x: y',
                                      '<34>2 2026-11-22T07:39:24Z h a - - - m',
                                      '   indented', 'key=value = like'])
    def test_unparseable_line_is_desc_only(self, tmp, line):
        assert one_event(tmp, line) == [('desc', line), src()]

    def test_leaves_missing_fields_out(self, tmp):
        events, p = run_syslog_in(tmp, 'Nov 22 07:39:24 gw1 -- MARK --\n'
                                       'Nov 22 07:39:24 gw1\n'
                                       'Nov 22 07:39:24 gw1 last message repeated 3 times\n'
                                       'Nov 22 07:39:24 gw1 prog[]:\n'
                                       'Nov 22 07:39:24 gw1 prog: \n')
        d, n = ('date', 'Nov 22 07:39:24'), ('node', 'gw1')
        assert events == [
            [d, n, ('desc', '-- MARK --'), src()],
            [d, n, src()],
            [d, n, ('desc', 'last message repeated 3 times'), src()],
            [d, n, ('desc', 'prog[]:'), ('program', 'prog'), src()],
            [d, n, ('desc', 'prog: '), ('program', 'prog'), src()]]
        for event in events:
            assert all(value for token, value in event)

    def test_skips_only_empty_lines(self, tmp):
        events, p = run_syslog_in(tmp, '\n\nNov 22 07:39:24 a b: c\n\n \n\n')
        assert [dict(e).get('desc') for e in events] == ['b: c', ' ']

    def test_crlf_and_inner_cr(self, tmp):
        events, p = run_syslog_in(tmp, b'Nov 22 07:39:24 a b: c\r\n'
                                       b'Nov 22 07:39:24 a b: one\rtwo\r\nplain\rtext\r\n')
        assert p.returncode == 0
        assert dict(events[0])['message'] == 'c'
        assert dict(events[1])['message'] == 'one\\rtwo'          # the two characters \ r
        assert events[2] == [('desc', 'plain\\rtext'), src()]
        assert b'\r' not in p.stdout

    def test_invalid_utf8_and_nul_pass_through_byte_exact(self, tmp):
        raw = b'Nov 22 07:39:24 h\xe9 prog: caf\xc3\xa9 \xff\xfe\x00 end\n\xc3(\n'
        events, p = run_syslog_in(tmp, raw)
        assert b'node=h\xe9\n' in p.stdout
        assert b'message=caf\xc3\xa9 \xff\xfe\x00 end\n' in p.stdout
        assert b'desc=\xc3(\nsource=in.log\ngo\n' in p.stdout
        assert len(events) == 2

    def test_fast_and_careful_paths_agree(self, tmp):
        # The chunk-wide parser takes the common shapes; with a small maxline
        # it is off and every line goes through the line-by-line one.
        text = '\n'.join(LINES_OF_EVERY_KIND * 50 + ['Nov 22 07:39:24 h p[%d]: m %d' % (i, i)
                                                     for i in range(100)]) + '\n'
        fast, p = run_syslog_in(tmp, text)
        careful, p = run_syslog_in(tmp, text, maxline='2000')
        assert p.returncode == 0 and p.stderr == b''
        assert len(fast) == len(LINES_OF_EVERY_KIND) * 50 + 100
        assert fast == careful

    def test_last_line_without_newline_in_batch_mode(self, tmp):
        events, p = run_syslog_in(tmp, 'Nov 22 07:39:24 a b: one\nNov 22 07:39:24 a b: two')
        assert p.returncode == 0
        assert [dict(e)['message'] for e in events] == ['one', 'two']

    def test_many_lines_split_across_reads(self, tmp):
        lines = ['Nov 22 07:39:24 host%d prog[%d]: message %d %s' % (i % 7, i, i, 'x' * (i % 300))
                 for i in range(20000)]
        events, p = run_syslog_in(tmp, '\n'.join(lines) + '\n')
        assert p.returncode == 0
        assert len(events) == 20000
        assert [dict(e)['pid'] for e in events] == [str(i) for i in range(20000)]
        assert dict(events[12345])['message'] == 'message 12345 ' + 'x' * (12345 % 300)

    def test_cuts_overlong_lines_and_reports_with_a_count(self, tmp):
        events, p = run_syslog_in(tmp, ('Nov 22 07:39:24 a b: ' + 'x' * 5000 + '\nnext\n') * 3,
                                  maxline='1000')
        assert p.returncode == 0
        assert len(events) == 6 and events[1] == [('desc', 'next'), src()]
        assert len(dict(events[0])['desc']) == 1000 - len('Nov 22 07:39:24 a ')
        said = levels(p.stderr)
        assert said[0][0] == 4 and 'cut to maxline=1000' in said[0][1] and '1 so far' in said[0][1]
        assert len([line for line in said if 'cut' in line[1]]) == 1      # throttled

    def test_example_sample_log(self, tmp):
        sample = os.path.join(EXAMPLES, 'sample.log')
        events, p = run_syslog_in(tmp, logfile=sample)
        assert p.returncode == 0
        with open(sample) as f:
            assert len(events) == len([line for line in f if line.strip()])
        kernel = [dict(e)['node'] for e in events if dict(e).get('desc', '').startswith('kernel')]
        assert {'prometheus', 'dope', 'weed'} <= set(kernel)
        assert set(dict(e)['source'] for e in events) == {sample}

    def test_original_tokens_give_the_original_output_for_the_sample(self, tmp):
        """With the tokens the module had before `source`, its output for
        examples/sample.log is the original module's, byte for byte (the
        copy in examples/golden/ was made by the module before this work)."""
        sample = os.path.join(EXAMPLES, 'sample.log')
        events, p = run_syslog_in(tmp, logfile=sample, tokens=OLD_TOKENS)
        with open(os.path.join(EXAMPLES, 'golden', 'syslog_in.sample.out'), 'rb') as f:
            assert p.stdout == f.read()

    # -- configuration and sources --------------------------------------------

    def test_filename_alias_and_unknown_keys(self, tmp):
        events, p = run_syslog_in(tmp, 'Nov 22 07:39:24 a b: c\n',
                                  config=b'module=syslog_in\nfilename=in.log\nwhatever=1\n\n')
        assert p.returncode == 0 and len(events) == 1

    def test_dash_reads_looper_stdin_fd(self, tmp):
        r, w = os.pipe()
        os.write(w, b'Nov 22 07:39:24 a b[1]: from the pipe\nnot syslog\n')
        os.close(w)
        env = dict(os.environ, LOOPER_STDIN_FD=str(r))
        p = subprocess.run([PY, SYSLOG_IN], input=b'logfile=-\n', stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, pass_fds=(r,), timeout=DEADLINE)
        os.close(r)
        assert p.returncode == 0, p.stderr
        assert [dict(e) for e in si_events(p.stdout)] == [
            {'date': 'Nov 22 07:39:24', 'node': 'a', 'desc': 'b[1]: from the pipe', 'program': 'b',
             'pid': '1', 'message': 'from the pipe', 'source': '-'},
            {'desc': 'not syslog', 'source': '-'}]

    def test_dash_without_variable_reads_fd_0(self, tmp):
        # By hand: the configuration, then (after its EOF) the data on fd 0.
        events, p = run_syslog_in(tmp, config=b'logfile=-\n', env=dict(
            (k, v) for k, v in os.environ.items() if k != 'LOOPER_STDIN_FD'))
        assert p.returncode == 0 and events == []

    def test_start_end_in_batch_mode(self, tmp):
        events, p = run_syslog_in(tmp, 'Nov 22 07:39:24 a b: c\n', start='end')
        assert p.returncode == 0 and events == []

    def test_several_files_in_order_each_its_source(self, tmp):
        write(os.path.join(tmp, 'a.log'), 'Nov 22 07:39:24 a p: 1\nNov 22 07:39:24 a p: 2\n')
        write(os.path.join(tmp, 'b.log'), 'Nov 22 07:39:24 b p: 3\n')
        os.mkdir(os.path.join(tmp, 'sub'))
        write(os.path.join(tmp, 'sub', 'c.log'), 'Nov 22 07:39:24 c p: 4')
        events, p = run_syslog_in(tmp, logfile='a.log  b.log sub/c.log', statefile='st')
        assert p.returncode == 0 and p.stderr == b''
        assert [(dict(e)['message'], dict(e)['source']) for e in events] == [
            ('1', 'a.log'), ('2', 'a.log'), ('3', 'b.log'), ('4', 'sub/c.log')]
        state = state_of(os.path.join(tmp, 'st'))
        assert sorted(state) == ['a.log', 'b.log', 'sub/c.log']
        for name, size in (('a.log', 46), ('b.log', 23), ('sub/c.log', 22)):
            assert state[name]['offset'] == size
            assert state[name]['inode'] == os.stat(os.path.join(tmp, name)).st_ino
        with open(os.path.join(tmp, 'b.log'), 'a') as f:
            f.write('Nov 22 07:39:24 b p: 5\n')
        events, p = run_syslog_in(tmp, logfile='a.log b.log sub/c.log', statefile='st')
        assert [dict(e)['message'] for e in events] == ['5']

    def test_several_files_errors(self, tmp):
        write(os.path.join(tmp, 'a.log'), 'x\n')
        for logfile, message in (('a.log a.log', b"names 'a.log' twice"), ('- -', b"'-' twice"),
                                 ('a.log missing.log', b"cannot open logfile 'missing.log'")):
            events, p = run_syslog_in(tmp, logfile=logfile)
            assert p.returncode == 78 and message in p.stderr and events == [], p.stderr

    def test_follow_several_files_one_missing(self, tmp):
        write(os.path.join(tmp, 'a.log'), 'Nov 22 07:39:24 a p: 1\n')
        m = Module(tmp, si_config(logfile='a.log b.log', follow='yes', sleeptime='0.05',
                                  statefile='st'))
        try:
            m.out.wait_events(1)
            m.wait_err("'b.log' does not exist")
            write(os.path.join(tmp, 'b.log'), 'Nov 22 07:39:24 b p: 2\n')
            with open(os.path.join(tmp, 'a.log'), 'a') as f:
                f.write('Nov 22 07:39:24 a p: 3\n')
            events = m.out.wait_events(3)
            got = [(dict(e)['message'], dict(e)['source']) for e in events]
            assert sorted(got) == [('1', 'a.log'), ('2', 'b.log'), ('3', 'a.log')]
            wait_until(lambda: sorted(state_of(os.path.join(tmp, 'st'))) == ['a.log', 'b.log'],
                       what='both files in the state file')
        finally:
            m.stop()

    # -- follow mode ----------------------------------------------------------

    def test_follow_picks_up_appended_lines(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n')
        try:
            m.out.wait_events(1)
            with open(path, 'a') as f:
                f.write('Nov 22 07:39:25 a b: two\nNov 22 07:39:26 a b: thr')
            m.out.wait_events(2)
            with open(path, 'a') as f:                      # the partial line waited
                f.write('ee\n')
            events = m.out.wait_events(3)
            assert [dict(e)['message'] for e in events] == ['one', 'two', 'three']
            assert m.proc.poll() is None                    # still following
        finally:
            m.stop()

    def test_follow_start_end(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: old\n' * 100, start='end', statefile='st')
        try:
            # The state file appears once the module sits at the end of the
            # file; what is appended after that is all it may send.
            wait_until(lambda: os.path.exists(os.path.join(tmp, 'st')), what='the state file')
            assert state_of(os.path.join(tmp, 'st'))['f.log']['offset'] == os.path.getsize(path)
            with open(path, 'a') as f:
                f.write('Nov 22 07:39:25 a b: new\n')
            m.out.wait_events(1)
            time.sleep(0.2)                                 # nothing else may come
            assert [dict(e)['message'] for e in m.out.events()] == ['new']
        finally:
            m.stop()

    def test_follow_rotation(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n')
        try:
            m.out.wait_events(1)
            with open(path, 'a') as f:
                f.write('Nov 22 07:39:25 a b: two')          # no newline yet
            os.rename(path, path + '.1')
            with open(path + '.1', 'a') as f:                # written after the rename
                f.write('\nNov 22 07:39:26 a b: three\n')
            write(path, 'Nov 22 07:39:27 a b: four\n')
            events = m.out.wait_events(4)
            assert [dict(e)['message'] for e in events] == ['one', 'two', 'three', 'four']
            with open(path, 'a') as f:
                f.write('Nov 22 07:39:28 a b: five\n')
            events = m.out.wait_events(5)
            assert dict(events[4])['message'] == 'five'
            m.wait_err('rotated')
        finally:
            m.stop()

    def test_follow_truncation(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\nNov 22 07:39:24 a b: two\n')
        try:
            m.out.wait_events(2)
            with open(path, 'w') as f:                       # copytruncate, then a new line
                f.write('Nov 22 07:39:25 a b: 3\n')
            events = m.out.wait_events(3)
            assert [dict(e)['message'] for e in events] == ['one', 'two', '3']
            m.wait_err('truncated')
        finally:
            m.stop()

    def test_sigterm_records_the_state(self, tmp):
        path, m = follow_module(tmp, 'Nov 22 07:39:24 a b: one\n', sleeptime='30', statefile='st')
        try:
            m.out.wait_events(1)
            wait_until(lambda: os.path.exists(os.path.join(tmp, 'st')), what='the state file')
            m.proc.send_signal(signal.SIGTERM)
            assert m.wait_exit() == -signal.SIGTERM         # well before the 30 s poll
            assert b'Traceback' not in m.err.data
            assert state_of(os.path.join(tmp, 'st'))['f.log']['offset'] == 25
        finally:
            m.stop()

    def test_broken_pipe_is_quiet(self, tmp):
        with open(os.path.join(tmp, 'big.log'), 'w') as f:
            f.write('Nov 22 07:39:24 a b[1]: some message here\n' * 200000)
        p = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp)
        try:
            p.stdin.write(b'logfile=big.log\n')
            p.stdin.close()
            p.stdout.read(1000)
            p.stdout.close()                                # the reader goes away
            assert p.wait(timeout=DEADLINE) == 1
            assert p.stderr.read() == b''
        finally:
            if p.poll() is None:
                p.kill()
            p.stderr.close()

    # -- state file -----------------------------------------------------------

    def test_statefile_resume_no_dup_no_skip(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, ''.join('Nov 22 07:39:24 a b: %d\n' % i for i in range(3)))
        again = lambda: run_syslog_in(tmp, logfile='f.log', statefile='f.state')
        events, p = again()
        assert [dict(e)['message'] for e in events] == ['0', '1', '2']
        state = state_of(os.path.join(tmp, 'f.state'))['f.log']
        assert state['offset'] == os.path.getsize(path) and state['inode'] == os.stat(path).st_ino
        events, p = again()
        assert events == [] and p.returncode == 0               # nothing new
        with open(path, 'a') as f:
            f.write(''.join('Nov 22 07:39:24 a b: %d\n' % i for i in range(3, 5)))
        events, p = again()
        assert [dict(e)['message'] for e in events] == ['3', '4']
        assert p.stderr == b''

    def test_statefile_new_inode_or_shorter_file_reads_from_top(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, 'Nov 22 07:39:24 a b: old1\nNov 22 07:39:24 a b: old2\n')
        again = lambda: run_syslog_in(tmp, logfile='f.log', statefile='f.state')
        assert len(again()[0]) == 2
        os.rename(path, path + '.1')
        write(path, 'Nov 22 07:39:24 a b: new\n')                # a new inode
        events, p = again()
        assert [dict(e)['message'] for e in events] == ['new']
        assert b'new file' in p.stderr and levels(p.stderr)[0][0] == 6
        with open(path, 'w') as f:                               # same inode, truncated
            f.write('Nov 22 07:39:24 a b: x\n')
        events, p = again()
        assert [dict(e)['message'] for e in events] == ['x']
        assert b'shorter' in p.stderr

    def test_statefile_of_the_original_module_is_read(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, 'Nov 22 07:39:24 a b: 1\nNov 22 07:39:24 a b: 2\n')
        st = os.stat(path)
        write(os.path.join(tmp, 'st'), '{"path": "f.log", "dev": %d, "inode": %d, "offset": 23}'
              '                    \n' % (st.st_dev, st.st_ino))
        events, p = run_syslog_in(tmp, logfile='f.log', statefile='st')
        assert [dict(e)['message'] for e in events] == ['2'] and p.stderr == b''
        assert state_of(os.path.join(tmp, 'st'))['f.log']['offset'] == 46

    def test_statefile_damaged_is_reported_and_read_from_start(self, tmp):
        write(os.path.join(tmp, 'in.log'), 'Nov 22 07:39:24 a b: 1\n')
        write(os.path.join(tmp, 'st'), '{"files": {"in.log": {"inode": "x"')
        events, p = run_syslog_in(tmp, logfile='in.log', statefile='st')
        assert len(events) == 1 and levels(p.stderr)[0][0] == 4 and b'damaged' in p.stderr
        assert state_of(os.path.join(tmp, 'st'))['in.log']['offset'] == 23

    def test_statefile_updated_in_place_then_replaced_when_it_outgrows_its_room(self, tmp):
        """Offsets are written in place (same inode), a record too long for
        its room (or a page) by an atomic replace (a new inode)."""
        module = load_syslog_in()
        state = module._State(os.path.join(tmp, 'st'))
        state.save({'a': (1, 2, 3)})
        first = os.stat(os.path.join(tmp, 'st')).st_ino
        for offset in (10, 1000, 123456):
            state.save({'a': (1, 2, offset)})
            assert os.stat(os.path.join(tmp, 'st')).st_ino == first
            assert state_of(os.path.join(tmp, 'st')) == {'a': {'dev': 1, 'inode': 2, 'offset': offset}}
        state.save({'a': (1, 2, 10 ** 40)})                     # over the slack: replaced
        assert os.stat(os.path.join(tmp, 'st')).st_ino != first
        big = dict(('file%03d.log' % i, (1, i, i)) for i in range(100))
        state.save(big)
        assert os.path.getsize(os.path.join(tmp, 'st')) > 4096
        second = os.stat(os.path.join(tmp, 'st')).st_ino
        big['file001.log'] = (1, 1, 2)
        state.save(big)                                         # over a page: replaced
        assert os.stat(os.path.join(tmp, 'st')).st_ino != second
        assert state_of(os.path.join(tmp, 'st'))['file001.log']['offset'] == 2
        state.close()

    def test_statefile_follow_then_restart(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, 'Nov 22 07:39:24 a b: 1\n')
        conf = si_config(logfile='f.log', follow='yes', sleeptime='0.05', statefile='st')
        m = Module(tmp, conf)
        try:
            m.out.wait_events(1)
            with open(path, 'a') as f:
                f.write('Nov 22 07:39:24 a b: 2\n')
            m.out.wait_events(2)
            size = os.path.getsize(path)
            wait_until(lambda: os.path.exists(os.path.join(tmp, 'st')) and
                       state_of(os.path.join(tmp, 'st'))['f.log']['offset'] == size,
                       what='the state file to reach the end')
        finally:
            m.stop()                                             # SIGKILL: no goodbye
        with open(path, 'a') as f:
            f.write('Nov 22 07:39:24 a b: 3\n')
        m = Module(tmp, conf)
        try:
            m.out.wait_events(1)
            time.sleep(0.2)
            assert [dict(e)['message'] for e in m.out.events()] == ['3']
        finally:
            m.stop()

    # -- progress -------------------------------------------------------------

    def test_progress_lines_only_with_looper_progress(self, tmp):
        write(os.path.join(tmp, 'a.log'), 'Nov 22 07:39:24 a p: 1\n' * 1000)
        write(os.path.join(tmp, 'b.log'), 'Nov 22 07:39:24 b p: 2\n' * 1000)
        events, p = run_syslog_in(tmp, logfile='a.log b.log')
        assert len(events) == 2000 and p.stderr == b''
        env = dict(os.environ, LOOPER_PROGRESS='1')
        events, p = run_syslog_in(tmp, logfile='a.log b.log', env=env)
        assert len(events) == 2000
        lines = p.stderr.decode().splitlines()
        assert lines and all(re.match(r'progress \d+ \d+$', line) for line in lines), lines
        assert lines[-1] == 'progress 46000 46000'
        assert len(lines) <= 3                     # at most every 0.5 s, and the last one
        # Looper's stdin, a pipe: the total is unknown (0).
        r, w = os.pipe()
        os.write(w, b'Nov 22 07:39:24 a b[1]: x\n')
        os.close(w)
        p = subprocess.run([PY, SYSLOG_IN], input=b'logfile=-\n', stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, pass_fds=(r,), timeout=DEADLINE,
                           env=dict(env, LOOPER_STDIN_FD=str(r)))
        os.close(r)
        assert p.stderr.decode().splitlines()[-1] == 'progress 26 0'

    def test_progress_in_a_long_batch_run_comes_twice_a_second(self, tmp):
        """A slow reader of the events (a pipe read bit by bit) makes the run
        last: the progress lines come about every 0.5 s, DONE growing."""
        write(os.path.join(tmp, 'a.log'), 'Nov 22 07:39:24 a p[1]: %s\n' % ('x' * 100) * 20000)
        p = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp, env=dict(os.environ, LOOPER_PROGRESS='1'))
        err = Stream(p.stderr)
        try:
            p.stdin.write(b'logfile=a.log\n')
            p.stdin.close()
            started = time.monotonic()
            while p.poll() is None and time.monotonic() - started < 1.6:
                p.stdout.read(20000)
                time.sleep(0.02)
            p.stdout.read()
            assert p.wait(DEADLINE) == 0
            lines = err.data.decode().splitlines()
            done = [int(line.split()[1]) for line in lines]
            assert len(set(done)) >= 3 and done == sorted(done), lines
            assert lines[-1] == 'progress %d %d' % (125 * 20000, 125 * 20000)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()


##############################################################################
# Step 3: acknowledged input (ack = yes)
##############################################################################

def ack_module(directory, **keys):
    """syslog_in in ack mode, as Looper starts it: the configuration, then
    `configure`, stdin kept open for the `ok` lines."""
    keys.setdefault('ack', 'yes')
    return Module(directory, si_config(**keys) + b'configure\n', stdin_open=True)


def offset_in(directory, name='st', path='f.log'):
    try:
        return state_of(os.path.join(directory, name))[path]['offset']
    except (OSError, ValueError, KeyError):
        return None


class TestSyslogInAck(object):

    def test_state_advances_only_past_acknowledged_lines(self, tmp):
        path = os.path.join(tmp, 'f.log')
        with open(path, 'wb') as f:
            f.write(b'Nov 22 07:39:24 a b: one\n\nNov 22 07:39:24 a b: two\r\n\r\n'
                    b'Nov 22 07:39:24 a b: three\n')
        m = ack_module(tmp, logfile='f.log', statefile='st')
        try:
            events = m.out.wait_events(3)
            assert [dict(e)['message'] for e in events] == ['one', 'two', 'three']
            wait_until(lambda: offset_in(tmp) == 0, what='the state file at 0')
            time.sleep(0.2)
            assert offset_in(tmp) == 0 and m.proc.poll() is None    # waits for the oks
            m.send('ok\n')
            wait_until(lambda: offset_in(tmp) == 25, what='offset after line one')
            m.send('ok\n')
            wait_until(lambda: offset_in(tmp) == 52, what='offset after line two (CRLF)')
            m.send('ok\n')                                  # the last: a batch run ends
            assert m.wait_exit() == 0
            assert offset_in(tmp) == os.path.getsize(path)
            assert b'Traceback' not in m.err.data
        finally:
            m.stop()

    def test_kill_then_restart_resumes_at_the_first_unacknowledged_line(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, ''.join('Nov 22 07:39:24 a b: %d\n' % i for i in range(1000)))
        m = ack_module(tmp, logfile='f.log', statefile='st', follow='yes', sleeptime='0.05')
        try:
            m.out.wait_events(1000)
            m.send('ok\n' * 400)
            wait_until(lambda: offset_in(tmp) == 400 * 22 + sum(len(str(i)) for i in range(400)),
                       what='the offset of 400 lines')
        finally:
            m.stop()                                        # SIGKILL
        m = ack_module(tmp, logfile='f.log', statefile='st', follow='yes', sleeptime='0.05')
        try:
            events = m.out.wait_events(600)
            assert [int(dict(e)['message']) for e in events] == list(range(400, 1000))
        finally:
            m.stop()

    def test_eof_on_stdin_saves_and_exits(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, 'Nov 22 07:39:24 a b: 1\nNov 22 07:39:24 a b: 2\n')
        m = ack_module(tmp, logfile='f.log', statefile='st', follow='yes', sleeptime='30')
        try:
            m.out.wait_events(2)
            m.send('ok\n')
            m.proc.stdin.close()                            # Looper is gone
            assert m.wait_exit(5) == 0
            assert offset_in(tmp) == 23
        finally:
            m.stop()

    def test_ack_without_configure_runs_without_ack(self, tmp):
        write(os.path.join(tmp, 'f.log'), 'Nov 22 07:39:24 a b: 1\n')
        events, p = run_syslog_in(tmp, logfile='f.log', ack='yes', statefile='st')
        assert p.returncode == 0 and len(events) == 1
        assert b'without `configure`' in p.stderr and levels(p.stderr)[0][0] == 4
        assert offset_in(tmp) == 23

    def test_window_stops_reading_until_acks_come(self, tmp):
        module = load_syslog_in()
        window = module.ACK_WINDOW
        total = window + 5000
        write(os.path.join(tmp, 'f.log'), ''.join('Nov 22 07:39:24 a b: %d\n' % i
                                                  for i in range(total)))
        m = ack_module(tmp, logfile='f.log', statefile='st')
        try:
            m.out.wait_events(window)
            time.sleep(0.5)
            sent = len(m.out.events())
            assert window <= sent < window + 2000, sent        # a chunk past it at most
            m.send('ok\n' * sent)
            m.out.wait_events(total)
            m.send('ok\n' * (total - sent))
            assert m.wait_exit() == 0
            assert [int(dict(e)['message']) for e in m.out.events()] == list(range(total))
        finally:
            m.stop()

    def test_rotation_keeps_the_old_file_in_the_state_until_acknowledged(self, tmp):
        path = os.path.join(tmp, 'f.log')
        write(path, 'Nov 22 07:39:24 a b: old\n')
        old_inode = os.stat(path).st_ino
        m = ack_module(tmp, logfile='f.log', statefile='st', follow='yes', sleeptime='0.05')
        try:
            m.out.wait_events(1)
            os.rename(path, path + '.1')
            write(path, 'Nov 22 07:39:24 a b: new\n')
            m.out.wait_events(2)
            time.sleep(0.2)
            entry = state_of(os.path.join(tmp, 'st'))['f.log']
            assert (entry['inode'], entry['offset']) == (old_inode, 0)
            m.send('ok\n')
            wait_until(lambda: state_of(os.path.join(tmp, 'st'))['f.log']['inode'] != old_inode,
                       what='the new file in the state file')
            assert state_of(os.path.join(tmp, 'st'))['f.log']['offset'] == 0
            m.send('ok\n')
            wait_until(lambda: offset_in(tmp) == 25, what='the new file acknowledged')
        finally:
            m.stop()

    def test_several_files_interleaved_acks(self, tmp):
        write(os.path.join(tmp, 'a.log'), 'Nov 22 07:39:24 a p: a1\nNov 22 07:39:24 a p: a2\n')
        write(os.path.join(tmp, 'b.log'), 'Nov 22 07:39:24 b p: b1\n')
        m = ack_module(tmp, logfile='a.log b.log', statefile='st', follow='yes', sleeptime='0.05')
        try:
            m.out.wait_events(3)
            order = [dict(e)['message'] for e in m.out.events()]
            acked = {'a.log': 0, 'b.log': 0}
            for i, message in enumerate(order):
                m.send('ok\n')
                name = message[0] + '.log'
                acked[name] += 24
                wait_until(lambda: all(offset_in(tmp, path=n) == acked[n] for n in acked),
                           what='offsets %r after %d oks' % (acked, i + 1))
        finally:
            m.stop()

    def test_extra_ok_and_odd_lines_are_reported_not_fatal(self, tmp):
        write(os.path.join(tmp, 'f.log'), 'Nov 22 07:39:24 a b: 1\n')
        m = ack_module(tmp, logfile='f.log', statefile='st', follow='yes', sleeptime='0.05')
        try:
            m.out.wait_events(1)
            m.send('ok\nok\nhello\n')
            m.wait_err('for no event')
            m.wait_err("not `ok`: 'hello'")
            with open(os.path.join(tmp, 'f.log'), 'a') as f:
                f.write('Nov 22 07:39:24 a b: 2\n')
            m.out.wait_events(2)
            m.send('ok\n')
            wait_until(lambda: offset_in(tmp) == 46, what='the second line acknowledged')
        finally:
            m.stop()

    def test_dash_in_ack_mode(self, tmp):
        r, w = os.pipe()
        p = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, pass_fds=(r,),
                             env=dict(os.environ, LOOPER_STDIN_FD=str(r)))
        os.close(r)
        out = Stream(p.stdout)
        try:
            p.stdin.write(b'logfile=-\nack=yes\nconfigure\n')
            p.stdin.flush()
            os.write(w, b'Nov 22 07:39:24 a b[1]: x\n')
            out.wait_events(1)
            os.write(w, b'Nov 22 07:39:24 a b[1]: y\n')
            os.close(w)
            out.wait_events(2)
            p.stdin.write(b'ok\nok\n')
            p.stdin.flush()
            assert p.wait(DEADLINE) == 0
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
