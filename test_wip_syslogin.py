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

    def __init__(self, directory, config, env=None, stdin_open=False, read_stdout=True):
        self.proc = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=directory, env=env)
        self.out = Stream(self.proc.stdout) if read_stdout else None
        self.err = Stream(self.proc.stderr)
        self.proc.stdin.write(config)
        self.proc.stdin.flush()
        if not stdin_open:
            self.proc.stdin.close()

    def send(self, text):
        self.proc.stdin.write(text.encode() if isinstance(text, str) else text)
        self.proc.stdin.flush()

    def wait_err(self, pattern, timeout=DEADLINE):
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.err.data.decode('utf-8', 'replace'))
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError('timed out after %g s waiting for stderr %r (have %r, '
                                     'exit status %r)' % (timeout, pattern, self.err.data[-2000:],
                                                          self.proc.poll()))
            time.sleep(0.01)

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
        for key in ('logfile', 'follow', 'statefile', 'listen', 'allow', 'tokens', 'maxline'):
            assert key in keys.split("'")[1].split(), key
        template = read(os.path.join(EXAMPLES, 'modules', 'template_in'))
        begin, end = ('# ----- Looper module protocol: the same, byte for byte, in every shipped '
                      'module -----', '# ----- end of the Looper module protocol -----')

        def block(source):
            return source[source.index(begin):source.index(end) + len(end)]
        assert block(text) == block(template)
        assert os.stat(SYSLOG_IN).st_mode & 0o111

    def test_relp_block_is_the_shared_one(self):
        """The RELP codec is one marked block, the same in syslog_in and
        syslog_out (when that module is there)."""
        begin = '# ----- RELP codec: the same, byte for byte, in syslog_in and syslog_out -----'
        end = '# ----- end of the RELP codec -----'

        def block(source):
            return source[source.index(begin):source.index(end) + len(end)]
        mine = block(read(SYSLOG_IN))
        assert 'class RelpParser' in mine
        others = [path for path in (os.path.join(MODULES, 'syslog_out'),
                                    os.path.join(HERE, '..', '..', 'blocks', 'relp_block.py'))
                  if begin in read(path)]
        for path in others:
            assert block(read(path)) == mine, path

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
        # rsyslog's traditional forward format (BSD date): with a <PRI> the
        # first word is the program too; without one, BSD lines keep desc.
        assert dict(one_event(tmp, '<14>Dec  1 21:00:01 myhost other hello two')) == {
            'date': 'Dec  1 21:00:01', 'node': 'myhost', 'desc': 'other hello two',
            'program': 'other', 'message': 'hello two', 'facility': 'user', 'severity': 'info',
            'source': 'in.log'}
        assert 'program' not in dict(one_event(tmp, 'Dec  1 21:00:01 myhost other hello two'))
        # rsyslog's RFC 5424 format keeps the space after a BSD tag.
        assert dict(one_event(tmp, '<13>1 2026-12-01T21:00:00+00:00 myhost myapp 12 - -  hello'))[
            'message'] == 'hello'
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

    def test_dash_on_fd_0_in_ack_mode_is_refused(self, tmp):
        env = dict((k, v) for k, v in os.environ.items() if k != 'LOOPER_STDIN_FD')
        events, p = run_syslog_in(tmp, config=b'logfile=-\nack=yes\nconfigure\n', env=env)
        assert p.returncode == 78 and b'LOOPER_STDIN_FD' in p.stderr

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


##############################################################################
# Step 4: the network (UDP, TCP, Unix datagrams, RELP)
##############################################################################

def net_module(directory, listen, ack=False, env=None, **keys):
    """syslog_in listening (`:0` ports: the kernel picks one); returns the
    module and the listeners as it reports them, in order: a list of
    (kind, host, port) or ('unix', path, None)."""
    keys.setdefault('idletimeout', '60')
    if ack:
        m = Module(directory, si_config(listen=listen, ack='yes', **keys) + b'configure\n',
                   env=env, stdin_open=True)
    else:
        m = Module(directory, si_config(listen=listen, **keys), env=env)
    count = len(listen.split())
    m.wait_err(r'(listening on \S+\n(.*\n)*?.*){%d}' % count)
    found = []
    for line in m.err.data.decode().splitlines():
        hit = re.search(r'listening on (udp|tcp|relp):\[?([^\]]*?)\]?:(\d+)$', line)
        if hit:
            found.append((hit.group(1), hit.group(2), int(hit.group(3))))
        hit = re.search(r'listening on unix:(.*)$', line)
        if hit:
            found.append(('unix', hit.group(1), None))
    assert len(found) == count, m.err.data
    return m, found


def family_of(host):
    return socket.AF_INET6 if ':' in host else socket.AF_INET


def udp_send(host, port, *datagrams):
    s = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        for data in datagrams:
            s.sendto(data, (host, port))
        return s.getsockname()
    finally:
        s.close()


def tcp_connect(host, port):
    return socket.create_connection((host, port), timeout=DEADLINE)


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


class RelpClient(object):
    """A minimal RELP client (its own framing, not the module's codec):
    open, syslog frames, close; rsp frames read back as {txnr: text}."""

    def __init__(self, host, port):
        self.sock = tcp_connect(host, port)
        self.txnr = 0
        self.rsps = {}
        self.other = []             # frames that are not rsp (serverclose)
        self._buf = b''

    def frame(self, command, data=b''):
        self.txnr += 1
        if data:
            self.sock.sendall(b'%d %s %d %s\n' % (self.txnr, command.encode(), len(data), data))
        else:
            self.sock.sendall(b'%d %s 0\n' % (self.txnr, command.encode()))
        return self.txnr

    def open(self):
        txnr = self.frame('open', b'relp_version=0\nrelp_software=test,1\ncommands=syslog')
        return self.wait(txnr)

    def poll(self, timeout=0.05):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        if not data:
            return False
        self._buf += data
        while True:
            m = re.match(rb'(\d+) (\w+) (\d+)[ \n]', self._buf)
            if not m:
                break
            length = int(m.group(3))
            start = m.end() if self._buf[m.end() - 1:m.end()] == b' ' else m.end()
            if length and len(self._buf) < start + length + 1:
                break
            body = self._buf[start:start + length]
            end = start + length + (1 if length else 0)
            if length:
                assert self._buf[end - 1:end] == b'\n', self._buf[:80]
            self._buf = self._buf[end:]
            if m.group(2) == b'rsp':
                self.rsps[int(m.group(1))] = body
            else:
                self.other.append((int(m.group(1)), m.group(2), body))
        return True

    def wait(self, txnr, timeout=DEADLINE):
        wait_until(lambda: txnr in self.rsps or not self.poll(), timeout,
                   'rsp %d (have %r)' % (txnr, sorted(self.rsps)))
        return self.rsps.get(txnr)

    def close(self):
        self.sock.close()


class TestSyslogInNetwork(object):

    # -- configuration --------------------------------------------------------

    @pytest.mark.parametrize('listen, message', [
        ('udp:127.0.0.1', b'needs a port'),
        ('smtp:127.0.0.1:25', b'is not udp:HOST:PORT'),
        ('udp:::1:514', b'IPv6 address in brackets'),
        ('udp::5514', b'needs a host'),
        ('tcp:127.0.0.1:70000', b'needs a port from 0 to 65535'),
        ('udp:no.such.host.invalid:5514', b"cannot use host 'no.such.host.invalid'"),
        ('tcp:127.0.0.1:5514 tcp:127.0.0.1:5514', b'twice'),
        ('unix:', b'is not udp'),
        ('udp:192.0.2.1:5514', b'Cannot assign requested address'),     # not an address here
    ])
    def test_bad_listen_exits_78(self, tmp, listen, message):
        events, p = run_syslog_in(tmp, config=si_config(listen=listen))
        assert p.returncode == 78 and message in p.stderr, p.stderr
        assert levels(p.stderr)[-1][0] == 3

    @pytest.mark.parametrize('keys, message', [
        ({'allow': '10.0.0.0/33'}, b"allow: '10.0.0.0/33' is not a network"),
        ({'maxconnections': '0'}, b'maxconnections must be'),
        ({'idletimeout': 'soon'}, b'idletimeout must be'),
        ({'maxunacked': '0'}, b'maxunacked must be'),
    ])
    def test_bad_limits_exit_78(self, tmp, keys, message):
        events, p = run_syslog_in(tmp, config=si_config(listen='udp:127.0.0.1:0', **keys))
        assert p.returncode == 78 and message in p.stderr, p.stderr

    def test_privileged_port_without_permission_exits_78_with_a_hint(self, tmp):
        setpriv = need('setpriv')
        if os.geteuid() != 0:
            pytest.skip('needs root, to drop CAP_NET_BIND_SERVICE')
        if int(read('/proc/sys/net/ipv4/ip_unprivileged_port_start', '1024') or 1024) <= 514:
            pytest.skip('every port is unprivileged here')
        # As root without CAP_NET_BIND_SERVICE in the bounding set (so the
        # exec'd interpreter does not get it): what an unprivileged user sees.
        p = subprocess.run([setpriv, '--bounding-set=-net_bind_service', PY, SYSLOG_IN],
                           input=si_config(listen='udp:127.0.0.1:514'), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 78, p.stderr
        assert b'Permission denied' in p.stderr and b'above 1023' in p.stderr
        assert b'CAP_NET_BIND_SERVICE' in p.stderr and p.stderr.count(b'\n') == 1

    def test_address_in_use_exits_1_to_be_restarted(self, tmp):
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(('127.0.0.1', 0))
        try:
            events, p = run_syslog_in(tmp, config=si_config(
                listen='udp:127.0.0.1:%d' % busy.getsockname()[1]))
            assert p.returncode == 1 and b'already in use' in p.stderr
        finally:
            busy.close()

    # -- UDP ------------------------------------------------------------------

    def test_udp_every_token(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'udp:127.0.0.1:0')
        try:
            sender = udp_send(host, port, b'<38>Nov 22 07:39:24 dope sshd[412]: Accepted password',
                              b'<165>1 2026-11-22T07:39:26.1Z gw2 app - ID7 [x@1 a="b"] rfc 5424\n',
                              b'no syslog at all')
            events = m.out.wait_events(3)
            source = 'udp:127.0.0.1:%d' % port
            assert events == [
                [('date', 'Nov 22 07:39:24'), ('node', 'dope'), ('desc', 'sshd[412]: Accepted password'),
                 ('program', 'sshd'), ('pid', '412'), ('message', 'Accepted password'),
                 ('facility', 'auth'), ('severity', 'info'), ('fromhost', '127.0.0.1'),
                 ('source', source)],
                [('date', '2026-11-22T07:39:26.1Z'), ('node', 'gw2'), ('desc', 'app: rfc 5424'),
                 ('program', 'app'), ('message', 'rfc 5424'), ('msgid', 'ID7'),
                 ('sd', '[x@1 a="b"]'), ('facility', 'local4'), ('severity', 'notice'),
                 ('fromhost', '127.0.0.1'), ('source', source)],
                [('desc', 'no syslog at all'), ('fromhost', '127.0.0.1'), ('source', source)]]
        finally:
            m.stop()

    def test_udp_ipv6(self, tmp):
        if not socket.has_ipv6:
            pytest.skip('no IPv6')
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            probe.bind(('::1', 0))
            probe.close()
        except OSError:
            pytest.skip('no ::1 here')
        m, ((kind, host, port),) = net_module(tmp, 'udp:[::1]:0', tokens='message fromhost source')
        try:
            udp_send('::1', port, b'<13>Nov 22 07:39:24 h p: over six')
            assert m.out.wait_events(1) == [[('message', 'over six'), ('fromhost', '::1'),
                                             ('source', 'udp:[::1]:%d' % port)]]
        finally:
            m.stop()

    def test_udp_hygiene_cut_nul_utf8_newlines_empty(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'udp:127.0.0.1:0', maxline='100',
                                              tokens='message desc')
        try:
            udp_send(host, port, b'<13>Nov 22 07:39:24 h p: ' + b'x' * 500,
                     b'<13>Nov 22 07:39:24 h p: a\x00b \xff\xfe caf\xc3\xa9\x00\x00',
                     b'<13>Nov 22 07:39:24 h p: line1\nline2\r\n',
                     b'\n\x00', b'<13>Nov 22 07:39:24 h p: last')
            events = m.out.wait_events(4)
            assert len(dict(events[0])['desc']) == 100 - len('<13>Nov 22 07:39:24 h ')
            assert dict(events[1])['message'] == 'a\x00b \udcff\udcfe caf\xe9'
            assert b'message=a\x00b \xff\xfe caf\xc3\xa9\n' in m.out.data      # byte exact
            assert dict(events[2])['message'] == 'line1\\nline2'
            assert dict(events[3])['message'] == 'last'                   # the empty one skipped
            m.wait_err(r'message of 525 bytes from 127.0.0.1 was cut to maxline=100')
            m.proc.send_signal(signal.SIGUSR1)
            counts = m.wait_err(r'counts: (.*)').group(1)
            for kind in ('cut=1', 'empty=1', 'invalid_utf8=1', 'nul=1', 'messages=4'):
                assert kind in counts.split(), counts
        finally:
            m.stop()

    def test_allow_refuses_others_udp_and_tcp(self, tmp):
        m, found = net_module(tmp, 'udp:127.0.0.1:0 tcp:127.0.0.1:0', allow='10.0.0.0/8 ::1')
        try:
            (u, uhost, uport), (t, thost, tport) = found
            udp_send(uhost, uport, b'<13>Nov 22 07:39:24 h p: refused')
            m.wait_err(r'refused a datagram from 127.0.0.1 on udp:')
            c = tcp_connect(thost, tport)
            c.settimeout(DEADLINE)
            assert c.recv(10) == b''                                # closed at once
            c.close()
            m.wait_err(r'refused a connection from 127.0.0.1 on tcp:')
            assert m.out.data == b''
        finally:
            m.stop()
        m, ((kind, host, port),) = net_module(tmp, 'udp:127.0.0.1:0', allow='127.0.0.0/8')
        try:
            udp_send(host, port, b'<13>Nov 22 07:39:24 h p: welcome')
            assert dict(m.out.wait_events(1)[0])['message'] == 'welcome'
        finally:
            m.stop()

    # -- TCP ------------------------------------------------------------------

    def test_tcp_both_framings_in_one_stream_split_anyhow(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'tcp:127.0.0.1:0', tokens='message desc')
        try:
            a = b'<13>Nov 22 07:39:24 h p: one'
            stream = (b'%d %s' % (len(a), a) + b'<13>Nov 22 07:39:24 h p: two\n' +
                      b'2026-11-22T07:39:24Z h p: three starts with a digit\n' +
                      b'0 zero is no octet count\n' + b'12 <13>h p: cr\r\n' +
                      b'<13>Nov 22 07:39:24 h p: last, unended')
            c = tcp_connect(host, port)
            for i in range(0, len(stream), 7):                      # seven bytes at a time
                c.sendall(stream[i:i + 7])
                time.sleep(0.001)
            c.close()
            events = m.out.wait_events(6)
            assert [dict(e).get('message', dict(e)['desc']) for e in events] == [
                'one', 'two', 'three starts with a digit', '0 zero is no octet count',
                '<13>h p: cr', 'last, unended']
        finally:
            m.stop()

    def test_framer_round_trip_and_any_split(self):
        module = load_syslog_in()
        rng = random.Random(5)
        for round_ in range(300):
            messages, stream = [], b''
            for _ in range(rng.randint(1, 20)):
                body = bytes(rng.choice(b'<>13 abc:[]\x00\xff\r') for _ in range(rng.randint(1, 40)))
                if rng.random() < 0.5:
                    stream += b'%d %s' % (len(body), body)
                    messages.append(body)
                else:
                    body = b'<' + body.replace(b'\n', b'')
                    stream += body + b'\n'
                    messages.append(body)
            framer = module._Framer(1000)
            got, i = [], 0
            while i < len(stream):
                step = rng.randint(1, 30)
                got.extend(framer.feed(stream[i:i + step]))
                i += step
            assert got == messages and framer.end() == (None, 0)

    def test_framer_bounded_and_never_dies(self):
        module = load_syslog_in()
        framer = module._Framer(100)
        assert framer.feed(b'5000 ' + b'y' * 150) == [b'y' * 150]     # cut by event() later
        assert framer.feed(b'y' * 4850 + b'<1>next\n') == [b'<1>next']
        assert framer.feed(b'z' * 150) == [b'z' * 150] and framer.feed(b'zzz\nok\n') == [b'ok']
        assert framer.feed(b'12345678901234567890 digits\n') == [b'12345678901234567890 digits']
        assert framer.feed(b'30 partial') == [] and framer.end() == (None, 7)
        rng = random.Random(9)
        for _ in range(2000):
            framer = module._Framer(rng.choice((10, 100, 1000)))
            for _ in range(10):
                data = bytes(rng.choice(b'0123456789 \n<>x') for _ in range(rng.randint(0, 200)))
                for message in framer.feed(data):
                    assert isinstance(message, bytes)
                assert len(framer.buf) <= framer.maxline + 11
            framer.end()

    def test_tcp_limits_cut_maxconnections_idle_and_a_staller(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'tcp:127.0.0.1:0', maxline='200',
                                              maxconnections='3', idletimeout='1.5',
                                              tokens='message desc')
        try:
            staller = tcp_connect(host, port)
            staller.sendall(b'100 <13>Nov 22 07:39:24 h p: half a frame')   # and nothing more
            idle = tcp_connect(host, port)
            third = tcp_connect(host, port)
            wait_until(lambda: fd_count(m.proc.pid) >= 7, what='three connections accepted')
            fourth = tcp_connect(host, port)
            fourth.settimeout(DEADLINE)
            assert fourth.recv(10) == b''                              # over maxconnections
            fourth.close()
            m.wait_err('already 3 connections')
            # The staller holds nothing up: the third client goes through.
            third.sendall(b'<13>Nov 22 07:39:24 h p: ' + b'q' * 400 + b'\n<13>Nov 22 07:39:24 h p: ok\n')
            events = m.out.wait_events(2, timeout=1.2)
            assert len(dict(events[0])['desc']) == 200 - len('<13>Nov 22 07:39:24 h ')
            assert dict(events[1])['message'] == 'ok'
            m.wait_err('was cut to maxline=200')
            # Then the idle timeout: the staller's half frame is dropped and said.
            m.wait_err(r'idle for 1.5 s with a partial message of 37 bytes \(dropped\)')
            m.wait_err(r'closed a connection from 127.0.0.1 idle for 1.5 s \(')
            for c in (staller, idle):
                c.settimeout(DEADLINE)
                assert c.recv(10) == b''
                c.close()
            third.close()
        finally:
            m.stop()

    def test_tcp_connection_loop_leaks_nothing(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'tcp:127.0.0.1:0')
        try:
            before = fd_count(m.proc.pid)
            for i in range(1500):
                c = socket.socket()
                c.connect((host, port))
                if i % 3 == 0:
                    c.sendall(b'<13>Nov 22 07:39:24 h p: %d\n' % i)
                c.close()
            events = m.out.wait_events(500)
            assert sorted(int(dict(e)['message']) for e in events) == list(range(0, 1500, 3))
            wait_until(lambda: fd_count(m.proc.pid) <= before, what='every connection closed')
            c = tcp_connect(host, port)
            c.sendall(b'<13>Nov 22 07:39:24 h p: still here\n')
            assert dict(m.out.wait_events(501)[-1])['message'] == 'still here'
            c.close()
        finally:
            m.stop()

    def test_tcp_ack_holds_a_connection_with_too_many_unacknowledged(self, tmp):
        """With ack, a connection with maxunacked messages in flight is not
        read (one read past it at most): the rest waits in the sockets and
        the sender; every message comes once acknowledged, in order."""
        m, ((kind, host, port),) = net_module(tmp, 'tcp:127.0.0.1:0', ack=True, maxunacked='10',
                                              tokens='message')
        total = 20000
        c = tcp_connect(host, port)
        sender = threading.Thread(target=c.sendall, args=(b''.join(
            b'<13>Nov 22 07:39:24 h p: %d\n' % i for i in range(total)),))
        sender.daemon = True
        sender.start()
        try:
            m.out.wait_events(10)
            time.sleep(0.3)
            held = len(m.out.events())
            assert held <= 10 + 65536 // 25, held          # maxunacked and one read
            acked = 0
            deadline = time.monotonic() + DEADLINE
            while acked < total and time.monotonic() < deadline:
                have = len(m.out.events())
                if have > acked:
                    m.send('ok\n' * (have - acked))
                    acked = have
                time.sleep(0.005)
            assert [int(dict(e)['message']) for e in m.out.events()] == list(range(total))
        finally:
            c.close()
            m.stop()

    # -- Unix datagrams -------------------------------------------------------

    def test_unix_socket_local_format_stale_socket_and_cleanup(self, tmp):
        path = os.path.join(tmp, 'log.sock')
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stale.bind(path)
        stale.close()                                  # a socket file nobody receives on
        m, found = net_module(tmp, 'unix:' + path)
        try:
            m.wait_err('removed the stale socket')
            assert os.stat(path).st_mode & 0o777 == 0o666
            c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            c.sendto(b'<13>Nov 22 07:39:24 myapp[7]: from glibc', path)   # no host: as syslog(3)
            c.sendto(b'<13>Nov 22 07:39:24 otherhost myapp: with a host', path)
            c.close()
            events = m.out.wait_events(2)
            first, second = dict(events[0]), dict(events[1])
            assert first['node'] == socket.gethostname().split('.')[0]
            assert (first['program'], first['pid'], first['message']) == ('myapp', '7', 'from glibc')
            assert first['source'] == 'unix:' + path and 'fromhost' not in first
            assert (second['node'], second['program']) == ('otherhost', 'myapp')
            m.proc.send_signal(signal.SIGTERM)
            m.wait_exit()
            assert not os.path.exists(path)                         # removed at the end
        finally:
            m.stop()

    def test_unix_socket_refuses_a_file_and_a_live_socket(self, tmp):
        path = write(os.path.join(tmp, 'not-a-socket'), 'precious\n')
        events, p = run_syslog_in(tmp, config=si_config(listen='unix:' + path))
        assert p.returncode == 78 and b'not a socket' in p.stderr and read(path) == 'precious\n'
        live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        live.bind(os.path.join(tmp, 'live.sock'))
        try:
            events, p = run_syslog_in(tmp, config=si_config(listen='unix:' + os.path.join(tmp, 'live.sock')))
            assert p.returncode == 1 and b'another process receives on it' in p.stderr
        finally:
            live.close()

    # -- RELP -----------------------------------------------------------------

    def test_relp_codec_round_trip_and_fuzz(self):
        module = load_syslog_in()
        rng = random.Random(7)
        frames = [(rng.randint(1, module.RELP_TXNR_MAX), rng.choice(('syslog', 'rsp', 'open', 'x')),
                   bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 5, 300)))))
                  for _ in range(500)]
        stream = b''.join(module.relp_frame(*f) for f in frames)
        parser = module.RelpParser()
        got, i = [], 0
        while i < len(stream):
            step = rng.randint(1, 50)
            got.extend(parser.feed(stream[i:i + step]))
            i += step
        assert got == frames
        assert module.relp_next_txnr(module.RELP_TXNR_MAX) == 1 and module.relp_next_txnr(5) == 6
        for _ in range(3000):
            parser = module.RelpParser(max_frame=1000)
            data = bytearray(stream[rng.randrange(len(stream)):][:rng.randint(0, 200)])
            for _ in range(rng.randint(0, 5)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                for txnr, command, body in parser.feed(bytes(data)):
                    assert isinstance(body, bytes) and command.isalpha()
            except module.RelpError:
                pass

    def test_relp_without_ack_answers_at_once(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'relp:127.0.0.1:0', tokens='message fromhost source')
        client = RelpClient(host, port)
        try:
            answer = client.open()
            assert answer.startswith(b'200 OK\n') and b'commands=syslog' in answer
            assert b'relp_version=0' in answer
            txnrs = [client.frame('syslog', b'<13>Nov 22 07:39:24 h p: %d' % i) for i in range(5)]
            for txnr in txnrs:
                assert client.wait(txnr) == b'200 OK'
            events = m.out.wait_events(5)
            assert [dict(e)['message'] for e in events] == [str(i) for i in range(5)]
            assert dict(events[0])['source'] == 'relp:127.0.0.1:%d' % port
            assert client.wait(client.frame('close')) == b''
            client.sock.settimeout(DEADLINE)
            assert client.sock.recv(10) == b''                      # closed after close
        finally:
            client.close()
            m.stop()

    def test_relp_with_ack_answers_on_ok_and_serverclose_at_the_end(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'relp:127.0.0.1:0', ack=True, tokens='message')
        client = RelpClient(host, port)
        try:
            client.open()
            txnrs = [client.frame('syslog', b'<13>Nov 22 07:39:24 h p: %d' % i) for i in range(3)]
            m.out.wait_events(3)
            client.poll(0.3)
            assert not [t for t in txnrs if t in client.rsps]        # nothing before Looper's ok
            m.send('ok\n')
            assert client.wait(txnrs[0]) == b'200 OK'
            client.poll(0.2)
            assert txnrs[1] not in client.rsps
            m.send('ok\nok\n')
            assert client.wait(txnrs[2]) == b'200 OK'
            close = client.frame('syslog', b'<13>Nov 22 07:39:24 h p: 3')
            m.out.wait_events(4)
            m.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: client.other or not client.poll(), what='serverclose')
            assert client.other[0][:2] == (0, b'serverclose')
            assert close not in client.rsps                         # never acknowledged
            assert m.wait_exit() == -signal.SIGTERM
        finally:
            client.close()
            m.stop()

    def test_relp_close_waits_for_the_answers_before_it(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'relp:127.0.0.1:0', ack=True, tokens='message')
        client = RelpClient(host, port)
        try:
            client.open()
            first = client.frame('syslog', b'<13>Nov 22 07:39:24 h p: x')
            m.out.wait_events(1)
            close = client.frame('close')
            client.poll(0.3)
            assert close not in client.rsps
            m.send('ok\n')
            assert client.wait(first) == b'200 OK' and client.wait(close) == b''
        finally:
            client.close()
            m.stop()

    def test_relp_protocol_errors_close_only_that_session(self, tmp):
        m, ((kind, host, port),) = net_module(tmp, 'relp:127.0.0.1:0', tokens='message')
        good = RelpClient(host, port)
        try:
            good.open()
            early = RelpClient(host, port)
            txnr = early.frame('syslog', b'<13>Nov 22 07:39:24 h p: before open')
            assert early.wait(txnr).startswith(b'500')
            early.close()
            junk = tcp_connect(host, port)
            junk.sendall(b'this is not RELP at all, and longer than a header could be\n')
            junk.settimeout(DEADLINE)
            assert junk.recv(100) == b''
            junk.close()
            nocmd = RelpClient(host, port)
            txnr = nocmd.frame('open', b'relp_version=0\ncommands=')
            assert nocmd.wait(txnr).startswith(b'500 required command')
            nocmd.close()
            assert good.wait(good.frame('syslog', b'<13>Nov 22 07:39:24 h p: fine')) == b'200 OK'
            assert [dict(e)['message'] for e in m.out.wait_events(1)] == ['fine']
        finally:
            good.close()
            m.stop()

    # -- the process ----------------------------------------------------------

    def test_orphan_exits_promptly_and_frees_the_port(self, tmp):
        p = subprocess.Popen([PY, SYSLOG_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp)
        try:
            p.stdin.write(si_config(listen='tcp:127.0.0.1:0 udp:127.0.0.1:0'))
            p.stdin.close()
            line = p.stderr.readline().decode()
            port = int(re.search(r':(\d+)$', line.strip()).group(1))
            p.stdout.close()                                # Looper is gone
            started = time.monotonic()
            assert p.wait(timeout=10) == 0
            assert time.monotonic() - started < 3
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(('127.0.0.1', port))                      # the port is free
            s.close()
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()

    def test_listen_and_logfile_together(self, tmp):
        write(os.path.join(tmp, 'f.log'), 'Nov 22 07:39:24 a b: from the file\n')
        m, ((kind, host, port),) = net_module(tmp, 'udp:127.0.0.1:0', logfile='f.log',
                                              statefile='st', tokens='message source')
        try:
            m.out.wait_events(1)
            udp_send(host, port, b'<13>Nov 22 07:39:24 h p: from the net')
            events = m.out.wait_events(2)
            assert events == [[('message', 'from the file'), ('source', 'f.log')],
                              [('message', 'from the net'), ('source', 'udp:127.0.0.1:%d' % port)]]
            assert m.proc.poll() is None            # the file's end is not the module's
        finally:
            m.stop()


##############################################################################
# Real peers: logger and rsyslogd
##############################################################################

def free_tcp_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Rsyslogd(object):
    """A real rsyslogd for one test, started as

        rsyslogd -n -f CONF -i PIDFILE

    -n          no fork: rsyslogd stays the test's child, so the test stops
                it by pid (in a finally) and it never outlives the test
    -f CONF     the test's configuration, not /etc/rsyslog.conf (which loads
                imuxsock on /dev/log and imklog, which need root and clash
                with the host's own syslog daemon)
    -i PIDFILE  its pid file in the test's temp dir, not /run/rsyslogd.pid
                (held by a host's rsyslogd; not writable unprivileged)

    CONF starts with global(workDirectory=TMP) (queue and state files in the
    temp dir, not /var/spool/rsyslog) and loads only imtcp (the test feeds
    rsyslogd through it on `port`), bound to its own ruleset `fwd` holding
    the test's actions, so rsyslogd's own messages (its start banner) go
    nowhere.  Nothing in it needs root: ports are above 1023, files are in
    the temp dir."""

    def __init__(self, directory, actions, modules=()):
        self.directory = directory
        self.port = free_tcp_port()
        self.conf = os.path.join(directory, 'rsyslog.conf')
        self.pidfile = os.path.join(directory, 'rsyslog.pid')
        write(self.conf, 'global(workDirectory="%s")\n' % directory +
              ''.join('module(load="%s")\n' % m for m in ('imtcp',) + tuple(modules)) +
              'input(type="imtcp" address="127.0.0.1" port="%d" ruleset="fwd")\n' % self.port +
              'ruleset(name="fwd") {\n%s\n}\n' % actions)
        self.log = open(os.path.join(directory, 'rsyslogd.out'), 'wb')
        self.proc = subprocess.Popen([need('rsyslogd'), '-n', '-f', self.conf, '-i', self.pidfile],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.sock = None

        def connected():
            assert self.proc.poll() is None, read(os.path.join(directory, 'rsyslogd.out'))
            try:
                self.sock = socket.create_connection(('127.0.0.1', self.port), timeout=1)
                return True
            except OSError:
                return False
        wait_until(connected, what='rsyslogd to listen on %d' % self.port)

    def send(self, *lines):
        """Messages into rsyslogd's imtcp, LF-terminated."""
        self.sock.sendall(b''.join(line + b'\n' for line in lines))

    def stop(self):
        if self.sock is not None:
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Acker(object):
    """Looper's part for syslog_in in ack mode, in the test: reads the
    module's events (a thread), records them, and answers each with `ok`
    once recorded, as Looper does once an event is settled."""

    def __init__(self, directory, listen, **keys):
        self.events = []
        self.m = Module(directory, si_config(listen=listen, ack='yes', idletimeout='0', **keys)
                        + b'configure\n', stdin_open=True, read_stdout=False)
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True
        self._thread.start()
        self.m.wait_err('listening on')

    def _run(self):
        event, tail = [], b''
        while True:
            try:
                data = os.read(self.m.proc.stdout.fileno(), 65536)
            except OSError:
                return
            if not data:
                return
            lines = (tail + data).split(b'\n')
            tail = lines.pop()
            oks = 0
            for line in lines:
                if line == b'go':
                    self.events.append(dict(event))
                    event = []
                    oks += 1
                else:
                    k, _, v = line.decode('utf-8', 'surrogateescape').partition('=')
                    event.append((k, v))
            if oks:
                try:
                    self.m.send('ok\n' * oks)
                except OSError:
                    return

    def kill(self):
        self.m.proc.kill()
        self.m.proc.wait()
        self._thread.join(DEADLINE)


def hostname_ok(node):
    name = socket.gethostname()
    return node in (name, name.split('.')[0])


class TestSyslogInInterop(object):

    @pytest.mark.parametrize('transport', ['--udp', '--tcp'])
    @pytest.mark.parametrize('fmt', ['--rfc3164', '--rfc5424'])
    def test_logger_into_syslog_in_every_token(self, tmp, transport, fmt):
        logger = need('logger')
        kind = transport[2:]
        m, ((k, host, port),) = net_module(tmp, '%s:127.0.0.1:0' % kind)
        try:
            for extra, text in ((['--id=4242'], 'with a pid'), ([], 'without one')):
                subprocess.run([logger, '--server', '127.0.0.1', '--port', str(port), transport, fmt,
                                '-t', 'myapp', '-p', 'local3.warning'] + extra +
                               ['Failed password for %s' % text], check=True, timeout=DEADLINE)
            events = [dict(e) for e in m.out.wait_events(2)]
        finally:
            m.stop()
        source = '%s:127.0.0.1:%d' % (kind, port)
        for e, pid, text in zip(events, ('4242', None), ('with a pid', 'without one')):
            message = 'Failed password for ' + text
            assert hostname_ok(e.pop('node')), e
            date = e.pop('date')
            if fmt == '--rfc3164':
                assert re.match(r'(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d '
                                r'\d\d:\d\d:\d\d$', date), date
                extra = {}
            else:
                assert re.match(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+[+-]\d\d:\d\d$', date), date
                extra = {'sd': '[timeQuality tzKnown="1" isSynced="%s"]' % e.get('sd', '')[-3:-2]}
                assert e['sd'].startswith('[timeQuality tzKnown="1" isSynced=')
            expected = dict(extra, desc='myapp%s: %s' % ('[%s]' % pid if pid else '', message),
                            program='myapp', message=message, facility='local3',
                            severity='warning', fromhost='127.0.0.1', source=source)
            if pid:
                expected['pid'] = pid
            assert e == expected

    def test_rsyslogd_omfwd_udp_and_tcp_octet_counted(self, tmp):
        """rsyslogd forwards over UDP (its traditional forward format: BSD
        date) and TCP with octet counting (its RFC 5424 format)."""
        m, found = net_module(tmp, 'udp:127.0.0.1:0 tcp:127.0.0.1:0')
        (u, uhost, uport), (t, thost, tport) = found
        daemon = Rsyslogd(tmp, (
            'action(type="omfwd" target="127.0.0.1" port="%d" protocol="udp")\n'
            'action(type="omfwd" target="127.0.0.1" port="%d" protocol="tcp" '
            'TCP_Framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format")'
            % (uport, tport)))
        try:
            daemon.send(b'<38>Dec  1 21:00:00 gw1 sshd[412]: Failed password for root',
                        b'<165>1 2026-12-01T21:00:01.5Z gw2 app - ID7 [x@1 a="b"] no procid')
            events = [dict(e) for e in m.out.wait_events(4)]
        finally:
            daemon.stop()
            m.stop()
        by = dict(((e['source'].split(':')[0], e['message']), e) for e in events)
        udp, tcp = 'udp:127.0.0.1:%d' % uport, 'tcp:127.0.0.1:%d' % tport
        common = dict(fromhost='127.0.0.1')
        assert by['udp', 'Failed password for root'] == dict(
            common, date='Dec  1 21:00:00', node='gw1', desc='sshd[412]: Failed password for root',
            program='sshd', pid='412', message='Failed password for root', facility='auth',
            severity='info', source=udp)
        assert by['udp', 'no procid'] == dict(
            common, date='Dec  1 21:00:01', node='gw2', desc='app no procid', program='app',
            message='no procid', facility='local4', severity='notice', source=udp)
        e = by['tcp', 'Failed password for root']
        assert re.match(r'\d{4}-12-01T21:00:00', e.pop('date'))        # rsyslog adds the year
        assert e == dict(common, node='gw1', desc='sshd[412]: Failed password for root',
                         program='sshd', pid='412', message='Failed password for root',
                         facility='auth', severity='info', source=tcp)
        assert by['tcp', 'no procid'] == dict(
            common, date='2026-12-01T21:00:01.5Z', node='gw2', desc='app: no procid',
            program='app', message='no procid', msgid='ID7', sd='[x@1 a="b"]',
            facility='local4', severity='notice', source=tcp)

    def test_rsyslogd_omrelp_with_ack_loses_nothing_when_the_receiver_is_killed(self, tmp):
        """rsyslogd's omrelp into syslog_in with ack; the receiver (syslog_in
        and its "Looper", which records an event before its `ok`) is killed
        twice during a stream of 6,000 messages (rsyslogd's omrelp sends
        about 1,100 a second here, to syslog_in as to rsyslogd's own imrelp)
        and started again on the same port: every message arrives at least
        once, in order."""
        need('rsyslogd')
        if not os.path.exists('/usr/lib/x86_64-linux-gnu/rsyslog/omrelp.so') and not any(
                os.path.exists(os.path.join(d, 'omrelp.so')) for d in
                ('/usr/lib/rsyslog', '/usr/lib64/rsyslog', '/usr/lib/aarch64-linux-gnu/rsyslog')):
            if IN_CI:
                pytest.fail('omrelp is required in CI (Debian package rsyslog-relp)')
            pytest.skip('omrelp (rsyslog-relp) is not installed')
        port = free_tcp_port()
        listen = 'relp:127.0.0.1:%d' % port
        total = 6000
        receivers = [Acker(tmp, listen, tokens='message')]
        # omrelp: retry for ever, once a second, so the receiver's restarts
        # only delay; librelp resends what was not answered `rsp 200`.
        daemon = Rsyslogd(tmp, 'action(type="omrelp" target="127.0.0.1" port="%d" '
                               'action.resumeRetryCount="-1" action.resumeInterval="1")' % port,
                          modules=('omrelp',))
        try:
            sender = threading.Thread(target=daemon.send, args=tuple(
                b'<13>Dec  1 21:00:00 h p: %d' % i for i in range(total)))
            sender.daemon = True
            sender.start()

            def got():
                return [int(e['message']) for r in receivers for e in list(r.events)]
            for kill_at in (1500, 3500):
                wait_until(lambda: len(got()) >= kill_at, what='%d messages' % kill_at)
                receivers[-1].kill()
                receivers.append(Acker(tmp, listen, tokens='message'))
            wait_until(lambda: set(got()) >= set(range(total)), timeout=60,
                       what='every message (have %d)' % len(set(got())))
            seq = got()
            first = []
            seen = set()
            for n in seq:
                if n not in seen:
                    seen.add(n)
                    first.append(n)
            assert first == list(range(total))                      # in order
            print('relp: %d messages, %d received (%d again after the kills)'
                  % (total, len(seq), len(seq) - total))
        finally:
            daemon.stop()
            for r in receivers:
                r.kill()
                r.m.stop()


##############################################################################
# Step 5: the examples
##############################################################################

def looper_blocks(path):
    """The blocks of a Looper config: [(kind, name, {key: value})]."""
    blocks, current = [], None
    for line in read(path).splitlines():
        line = line.split('#', 1)[0].strip()
        m = re.match(r'(input|output)\s+(\S+)\s*\{', line)
        if m:
            current = (m.group(1), m.group(2), {})
            blocks.append(current)
            line = line[m.end():].strip()
        if current is not None and '=' in line:
            key, _, value = line.partition('=')
            current[2][key.strip()] = value.strip().strip('\'"')
        if '}' in line:
            current = None
    return blocks


class TestSyslogInExamples(object):

    def test_every_example_that_follows_a_file_has_a_statefile(self):
        confs = [os.path.join(EXAMPLES, name) for name in sorted(os.listdir(EXAMPLES))
                 if name.endswith('.conf')]
        assert os.path.join(EXAMPLES, 'syslogd.conf') in confs
        following = 0
        for conf in confs:
            for kind, name, keys in looper_blocks(conf):
                if keys.get('module') == 'syslog_in' and keys.get('follow') == 'yes':
                    following += 1
                    assert keys.get('statefile'), '%s: input %s follows without a statefile' % (
                        conf, name)
        assert following >= 1
        assert 'statefile' in read(os.path.join(EXAMPLES, 'basic.conf'))   # its follow hint

    def test_syslogd_example_checks_and_runs(self, tmp):
        """examples/syslogd.conf, with its ports and /tmp files moved into
        the test's own, through Looper: logger's messages and the sample's
        lines become the alerts the rules promise."""
        logger = need('logger')
        p = subprocess.run([PY, os.path.join(HERE, 'looper.py'), '--check',
                            os.path.join(EXAMPLES, 'syslogd.conf')],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 0, p.stderr
        udp, tcp = free_udp_port(), free_tcp_port()
        text = read(os.path.join(EXAMPLES, 'syslogd.conf'))
        text = text.replace('udp:127.0.0.1:5514', 'udp:127.0.0.1:%d' % udp)
        text = text.replace('tcp:127.0.0.1:5514', 'tcp:127.0.0.1:%d' % tcp)
        text = text.replace('/tmp/looper-syslogd', os.path.join(tmp, 'looper-syslogd'))
        text = text.replace("'sample.log'", repr(os.path.join(EXAMPLES, 'sample.log')))
        text = text.replace("'rules/syslogd.rules'",
                            repr(os.path.join(EXAMPLES, 'rules', 'syslogd.rules')))
        conf = config(tmp, text, 'syslogd.conf')
        looper = Looper(conf)
        alerts = os.path.join(tmp, 'looper-syslogd.alerts')
        try:
            looper.wait_log(r'listening on tcp:127\.0\.0\.1:%d' % tcp)
            wait_until(lambda: read(alerts).count('alert=kernel') == 8, what='the sample read')
            for i in range(3):
                subprocess.run([logger, '-n', '127.0.0.1', '-P', str(udp), '-d', '-t', 'sshd',
                                'Failed password for root from 203.0.113.9 port 22 ssh2'],
                               check=True, timeout=DEADLINE)
            subprocess.run([logger, '-n', '127.0.0.1', '-P', str(tcp), '-T', '-p', 'daemon.err',
                            '-t', 'app', 'disk full'], check=True, timeout=DEADLINE)
            wait_until(lambda: 'disk full' in read(alerts) and 'attacker=203.0.113.9' in read(alerts),
                       what='the network alerts (have %s)' % read(alerts)[-500:])
        finally:
            looper.signal(signal.SIGTERM)
            status = looper.wait()
        assert status == 0, looper.log()
        lines = read(alerts).splitlines()
        assert len([l for l in lines if 'alert=ssh-bruteforce' in l]) == 2    # sample + logger
        assert [l for l in lines if 'alert=severity-err' in l and 'fromhost=127.0.0.1' in l
                and 'source=tcp:127.0.0.1:%d' % tcp in l]
        archive = [json.loads(l)['tokens'] for l in read(os.path.join(tmp, 'looper-syslogd.log')).splitlines()]
        assert len(archive) == 50 + 4
        state = state_of(os.path.join(tmp, 'looper-syslogd.state'))
        sample = os.path.join(EXAMPLES, 'sample.log')
        assert state[sample]['offset'] == os.path.getsize(sample)


##############################################################################
# Step 6: speed without changing a byte
##############################################################################

def tricky_lines(rng, count):
    """Random syslog-ish lines, many shapes near the fast path's edges."""
    dates = ['Nov 22 07:39:24', 'Nov  2 07:39:24', 'Nov 22 07:39:24.5', 'Nov 22 7:39:24',
             'Nov 22 07:39:2\u0664', '2026-11-22T07:39:24Z', '2026-11-22T07:39:24.123+01:00',
             '2026-11-22t07:39:24', '2026-11-22T07:39:24+0100', 'Noc 22 07:39:24']
    hosts = ['h', 'web-01', 'h\u00e9', 'x' * 256, '\udcff\udcfe', '']
    tags = ['sshd[412]:', 'kernel:', 'CRON[1]', 'a[]:', 'p[1:2]:', 'p[' + '9' * 70 + ']:',
            'postfix/smtpd[9]:', 'no', 'x:y:', '[1]:', 'pro\u00e7[1]:', 'p:']
    messages = ['m', 'Failed password for root', '', ' lead', 'caf\u00e9 \udcff', 'a\rb',
                'x' * 300, '\u0663\u0664', 'tab\there']
    pris = ['', '<13>', '<191>', '<192>', '<0>', '<034>', '<1']
    lines = []
    for _ in range(count):
        line = '%s%s %s %s %s' % (rng.choice(pris), rng.choice(dates), rng.choice(hosts),
                                  rng.choice(tags), rng.choice(messages))
        if rng.random() < 0.1:
            line = line.replace(' ', '  ', 1)
        if rng.random() < 0.05:
            line = line[:rng.randrange(len(line) + 1)]
        lines.append(line)
    return lines


def git_show(commit, path):
    """A file as it was in a commit of this repository; None without git
    or without that commit (in CI its absence is a failure)."""
    if not shutil.which('git'):
        return None
    p = subprocess.run(['git', '-C', HERE, 'show', '%s:%s' % (commit, path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
    if p.returncode != 0:
        if IN_CI:
            pytest.fail('commit %s is not in this clone: %s' % (commit, p.stderr.decode()))
        return None
    return p.stdout


class TestSyslogInSpeed(object):

    def test_bytes_fast_path_agrees_with_the_careful_path_on_random_lines(self):
        """The fast path works on bytes, the careful one on text: for any
        mix of lines, in any choice of tokens, the same events."""
        module = load_syslog_in()
        rng = random.Random(13)
        for round_ in range(40):
            lines = tricky_lines(rng, 200)
            text = '\n'.join(lines) + '\n'
            chosen = rng.choice((module.TOKENS, module.TOKENS[:10], ('date', 'pid'),
                                 ('node', 'message', 'severity'), ('desc', 'source')))
            tail = '\nsource=f\u00e9.log' if 'source' in chosen else ''
            maxline = rng.choice((32768, 2900, 4000))
            parser = module._Parser(maxline, chosen, tail)
            fast = parser.events(text)
            careful = parser._slowly(text.replace('\r\n', '\n').replace('\r', '\\r'))
            assert fast == careful, (round_, chosen, maxline)

    def test_output_is_the_original_on_a_generated_bench_file(self, tmp):
        """A 200,000-line file from bench/bench.py: with the original ten
        tokens, this module writes what the module before this work (BASE,
        from git) wrote, byte for byte; and it is quicker (reported)."""
        original = git_show(BASE, 'modules/syslog_in')
        if original is None:
            pytest.skip('no git, or commit %s is not in this clone' % BASE)
        old = write(os.path.join(tmp, 'syslog_in.base'), original.decode('utf-8'), 0o755)
        loader = importlib.machinery.SourceFileLoader('bench_for_test', os.path.join(HERE, 'bench', 'bench.py'))
        bench = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
        loader.exec_module(bench)
        path = os.path.join(tmp, 'bench.log')
        bench.generate(path, 200000, 1)
        outputs = {}
        for name, module, extra in (('base', old, {}), ('now', SYSLOG_IN, {'tokens': OLD_TOKENS})):
            p = subprocess.run([PY, module], input=si_config(logfile=path, **extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE * 2)
            assert p.returncode == 0 and p.stderr == b'', p.stderr
            outputs[name] = p.stdout
        assert outputs['now'].count(b'\ngo\n') == 200000
        assert hashlib.sha1(outputs['now']).hexdigest() == hashlib.sha1(outputs['base']).hexdigest()
        assert outputs['now'] == outputs['base']


##############################################################################
# Through Looper (looper.py): network in, Looper killed, throughput
##############################################################################

QUICK = " restartdelay = 0.1\n maxrestartdelay = 0.2\n closetimeout = 1\n"
# Message counts for the throughput tests; SYSLOG_IN_MEASURE=1 for the
# figures in docs_wip/syslog_in.md (more messages, printed with -s).
MEASURE = os.environ.get('SYSLOG_IN_MEASURE') == '1'


def looper_has_ack():
    """main's looper.py knows acknowledged input (the `ack` key of input
    blocks); an older one closes stdin without `configure`."""
    return bool(re.search(r"\('ack', 'input'", read(os.path.join(HERE, 'looper.py'))))


def need_ack():
    if not looper_has_ack():
        pytest.skip("this looper.py has no acknowledged input (ack = 'yes') yet")


def json_events(path):
    """The events of a logfile_out json file; a last line still being
    written is not one yet."""
    text = read(path)
    return [json.loads(line)['tokens'] for line in text[:text.rfind('\n') + 1].splitlines()]


def first_seen(numbers):
    out, seen = [], set()
    for n in numbers:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def net_looper(tmp, listen, extra='', output='logfile_out', outkeys=" format = 'json'\n"):
    """Looper with syslog_in listening (fixed ports) into logfile_out."""
    conf = config(tmp, "rulesfile = 'NORULES'\n"
                       "input net {\n module = syslog_in\n listen = '%s'\n idletimeout = 0\n%s%s}\n"
                       "output out {\n module = %s\n filename = out.json\n%s%s}\n"
                  % (listen, extra, QUICK, output, outkeys, QUICK))
    looper = Looper(conf)
    looper.wait_log(r'(listening on .*[\s\S]*){%d}' % len(listen.split()))
    return looper


class TestSyslogInThroughLooper(object):

    def test_udp_tcp_relp_into_looper(self, tmp):
        udp, tcp, relp = free_udp_port(), free_tcp_port(), free_tcp_port()
        looper = net_looper(tmp, 'udp:127.0.0.1:%d tcp:127.0.0.1:%d relp:127.0.0.1:%d'
                            % (udp, tcp, relp))
        try:
            udp_send('127.0.0.1', udp, b'<13>Nov 22 07:39:24 h p[1]: by udp')
            c = tcp_connect('127.0.0.1', tcp)
            c.sendall(b'15 <13>h p: by tcp' + b'<13>Nov 22 07:39:24 h p: lf\n')
            client = RelpClient('127.0.0.1', relp)
            client.open()
            assert client.wait(client.frame('syslog', b'<13>Nov 22 07:39:24 h p: by relp')) == b'200 OK'
            out = os.path.join(tmp, 'out.json')
            wait_until(lambda: len(json_events(out)) == 4, what='four events')
            events = dict((e['desc'], e) for e in json_events(out))
            assert events['p[1]: by udp']['source'] == 'udp:127.0.0.1:%d' % udp
            assert events['<13>h p: by tcp']['source'] == 'tcp:127.0.0.1:%d' % tcp
            assert events['p: lf']['fromhost'] == '127.0.0.1'
            assert events['p: by relp']['source'] == 'relp:127.0.0.1:%d' % relp
            c.close()
            client.close()
        finally:
            looper.signal(signal.SIGTERM)
            assert looper.wait() == 0, looper.log()
        assert re.search(r'syslog_in: stopped \(SIGTERM\); counts: .*messages=4', looper.log())

    def test_orphan_frees_the_port_when_looper_is_killed(self, tmp):
        """SIGKILL Looper: its syslog_in (without ack) sees within a second
        that Looper is gone and exits, so a new Looper can listen at once."""
        tcp = free_tcp_port()
        looper = net_looper(tmp, 'tcp:127.0.0.1:%d' % tcp)
        module = [c for c in children_of_pid(looper.proc.pid) if 'syslog_in' in cmdline(c)]
        assert module
        looper.proc.kill()
        looper.wait()
        wait_until(lambda: not os.path.exists('/proc/%d' % module[0]) or
                   ' Z ' in read('/proc/%d/stat' % module[0]), timeout=5, what='the orphan to exit')
        looper = net_looper(tmp, 'tcp:127.0.0.1:%d' % tcp)     # the port is free again
        try:
            c = tcp_connect('127.0.0.1', tcp)
            c.sendall(b'<13>Nov 22 07:39:24 h p: again\n')
            c.close()
            wait_until(lambda: json_events(os.path.join(tmp, 'out.json')), what='the event')
        finally:
            looper.signal(signal.SIGTERM)
            looper.wait()

    def test_looper_killed_three_times_while_a_followed_file_grows(self, tmp):
        """syslog_in following a file with a statefile and ack = 'yes', a
        confirmed logfile_out; Looper itself is SIGKILLed three times while
        20,000 lines are appended, and started again each time: every line
        is in the output at least once, in order."""
        need_ack()
        total = 20000
        log = os.path.join(tmp, 'app.log')
        write(log, '')
        conf = config(tmp, "rulesfile = 'NORULES'\n"
                           "input i {\n module = syslog_in\n logfile = app.log\n follow = yes\n"
                           " sleeptime = 0.05\n statefile = app.state\n ack = yes\n"
                           " tokens = message\n%s}\n"
                           "output o {\n module = logfile_out\n filename = out.json\n format = json\n"
                           " confirm = yes\n%s}\n" % (QUICK, QUICK))
        done = threading.Event()

        def append():
            with open(log, 'a') as f:
                for i in range(total):
                    f.write('Nov 22 07:00:00 host app[1]: %d\n' % i)
                    if i % 100 == 99:
                        f.flush()
                        time.sleep(0.02)
            done.set()
        writer = threading.Thread(target=append)
        writer.daemon = True
        looper = Looper(conf)
        writer.start()

        def got():
            return [int(e['message']) for e in json_events(os.path.join(tmp, 'out.json'))]
        try:
            for fraction in (0.25, 0.5, 0.75):
                wait_until(lambda: len(got()) >= total * fraction, timeout=60,
                           what='%d%% of the lines' % (fraction * 100))
                looper.proc.kill()
                looper.wait()
                looper = Looper(conf)
            done.wait(60)
            wait_until(lambda: set(got()) >= set(range(total)), timeout=60,
                       what='every line (have %d)' % len(set(got())))
        finally:
            looper.signal(signal.SIGTERM)
            looper.wait()
        numbers = got()
        assert first_seen(numbers) == list(range(total))
        print('looper killed 3 times: %d lines, %d in the output (%d again)'
              % (total, len(numbers), len(numbers) - total))

    def test_relp_with_ack_when_looper_is_killed(self, tmp):
        """rsyslogd's omrelp into Looper (syslog_in with ack, a confirmed
        logfile_out); Looper is SIGKILLed twice during the stream and
        started again: every message arrives at least once, in order."""
        need_ack()
        need('rsyslogd')
        port = free_tcp_port()
        total = 4000
        conf = config(tmp, "rulesfile = 'NORULES'\n"
                           "input i {\n module = syslog_in\n listen = 'relp:127.0.0.1:%d'\n ack = yes\n"
                           " tokens = message\n%s}\n"
                           "output o {\n module = logfile_out\n filename = out.json\n format = json\n"
                           " confirm = yes\n%s}\n" % (port, QUICK, QUICK))
        looper = Looper(conf)
        looper.wait_log('listening on relp')
        daemon = Rsyslogd(tmp, 'action(type="omrelp" target="127.0.0.1" port="%d" '
                               'action.resumeRetryCount="-1" action.resumeInterval="1")' % port,
                          modules=('omrelp',))

        def got():
            return [int(e['message']) for e in json_events(os.path.join(tmp, 'out.json'))]
        try:
            sender = threading.Thread(target=daemon.send, args=tuple(
                b'<13>Dec  1 21:00:00 h p: %d' % i for i in range(total)))
            sender.daemon = True
            sender.start()
            for kill_at in (1000, 2500):
                wait_until(lambda: len(got()) >= kill_at, timeout=60, what='%d messages' % kill_at)
                looper.proc.kill()
                looper.wait()
                looper = Looper(conf)
            wait_until(lambda: set(got()) >= set(range(total)), timeout=90,
                       what='every message (have %d)' % len(set(got())))
        finally:
            daemon.stop()
            looper.signal(signal.SIGTERM)
            looper.wait()
        assert first_seen(got()) == list(range(total))

    @pytest.mark.parametrize('kind', ['udp', 'tcp', 'relp'])
    def test_throughput_through_looper(self, tmp, kind):
        """Messages/second received through Looper (NORULES, logfile_out):
        printed (run with -s; SYSLOG_IN_MEASURE=1 for more messages); every
        TCP and RELP message arrives, UDP's are counted."""
        total = (200000 if kind != 'relp' else 50000) if MEASURE else 5000
        port = free_udp_port() if kind == 'udp' else free_tcp_port()
        looper = net_looper(tmp, '%s:127.0.0.1:%d' % (kind, port), ' tokens = message\n')
        out = os.path.join(tmp, 'out.json')

        def arrived():
            with open(out, 'rb') as f:
                return f.read().count(b'\n')
        messages = [b'<13>Nov 22 07:39:24 host app[1]: message number %d' % i for i in range(total)]
        try:
            wait_until(lambda: os.path.exists(out) or True)
            started = time.monotonic()
            if kind == 'udp':
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for i, m in enumerate(messages):
                    s.sendto(m, ('127.0.0.1', port))
                    if i % 500 == 499:          # stay within the socket buffer
                        wait_until(lambda: os.path.exists(out) and arrived() >= i - 3000,
                                   what='UDP to drain')
                s.close()
            elif kind == 'tcp':
                c = tcp_connect('127.0.0.1', port)
                c.sendall(b''.join(m + b'\n' for m in messages))
                c.close()
            else:
                client = RelpClient('127.0.0.1', port)
                client.open()
                sent = 0
                while sent < total:             # a window of 128, as librelp's
                    while sent < total and sent - (len(client.rsps) - 1) < 128:
                        client.frame('syslog', messages[sent])
                        sent += 1
                    client.poll(0.001)
                client.close()
            wait_until(lambda: os.path.exists(out) and arrived() >= total * (0.9 if kind == 'udp' else 1),
                       timeout=120, what='the messages')
            elapsed = time.monotonic() - started
        finally:
            looper.signal(signal.SIGTERM)
            looper.wait()
        got = arrived()
        print('%s through Looper: %d of %d messages in %.2f s: %.0f messages/s'
              % (kind, got, total, elapsed, got / elapsed))
        if kind != 'udp':
            assert got == total


def children_of_pid(pid):
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


def cmdline(pid):
    return read('/proc/%d/cmdline' % pid).replace('\0', ' ')
