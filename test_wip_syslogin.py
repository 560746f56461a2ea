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
