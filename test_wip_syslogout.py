"""Tests for modules/syslog_out: its formats and the RELP codec as pure
functions, the module alone on its pipes against servers in this process,
and against a real rsyslogd (imudp, imtcp, imrelp, imuxsock, imptcp),
through looper.py too.

Run:  python3 -m pytest -q test_wip_syslogout.py
SYSLOG_OUT_BENCH_EVENTS=20000 python3 -m pytest -q -s test_wip_syslogout.py -k throughput
prints the messages per second sent through looper.py over TCP and RELP.
"""
import importlib.machinery
import importlib.util
import json
import os
import queue
import random
import re
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from test_looper import (wait_until, need, write, config, read, run, Looper, counters,
                         free_udp_port, py_module, PY, HERE, MODULES, EXAMPLES, DEADLINE, FAST,
                         COUNTER_IN, tmp)   # noqa: F401 (tmp is a fixture)

SYSLOG_OUT = os.path.join(MODULES, 'syslog_out')
TEMPLATE_OUT = os.path.join(HERE, 'examples', 'modules', 'template_out')
RFC3339 = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d'
BSD_TIME = r'(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 1-3]\d \d\d:\d\d:\d\d'


##############################################################################
# Helpers
##############################################################################

def syslog_out_code(_cache=[]):
    """modules/syslog_out loaded in this process, for its pure functions
    and classes (the file has no .py suffix).  Loading runs no main()."""
    if not _cache:
        loader = importlib.machinery.SourceFileLoader('syslog_out_under_test', SYSLOG_OUT)
        spec = importlib.util.spec_from_loader(loader.name, loader)
        code = importlib.util.module_from_spec(spec)
        loader.exec_module(code)
        _cache.append(code)
    return _cache[0]


def block(path, first, last):
    """The lines of a file from the line starting with `first` to the one
    starting with `last`, both included ('' when absent)."""
    text = '\n' + read(path)
    start = text.find('\n' + first)
    end = text.find('\n' + last, start + 1)
    if start < 0 or end < 0:
        return ''
    return text[start + 1:text.index('\n', end + 1) + 1]


def free_tcp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def event_lines(event):
    """An event (dict or pairs) as Looper writes it to an output module."""
    pairs = event.items() if isinstance(event, dict) else event
    return ''.join('%s=%s\n' % pair for pair in pairs) + 'go\n'


class SyslogOut(object):
    """modules/syslog_out run alone, as Looper would run it: the
    configuration, `configure`, then events; its answers are read by a
    thread so that every wait has a deadline."""

    def __init__(self, directory, env=None, **keys):
        self.err_path = os.path.join(directory, 'syslog_out.%d.stderr' % id(self))
        self._err = open(self.err_path, 'wb')
        self.proc = subprocess.Popen([PY, SYSLOG_OUT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err,
                                     cwd=directory, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.write(''.join('%s=%s\n' % kv for kv in keys.items()) + 'configure\n')

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode('utf-8', 'replace').rstrip('\n'))
        self.lines.put(None)

    def write(self, text):
        self.proc.stdin.write(text.encode('utf-8', 'surrogateescape'))
        self.proc.stdin.flush()

    def send(self, *events):
        self.write(''.join(event_lines(e) for e in events))

    def answers(self, n, timeout=DEADLINE):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError('%d answers of %d within %g s: %r; stderr:\n%s'
                                     % (len(got), n, timeout, got, self.stderr()))
            if line is None:
                raise AssertionError('syslog_out ended after %r; stderr:\n%s' % (got, self.stderr()))
            got.append(line)
        return got

    def no_answer_for(self, seconds):
        try:
            line = self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError('unexpected answer %r' % line)

    def stderr(self):
        return read(self.err_path)

    def quit(self, timeout=DEADLINE):
        try:
            self.write('quit\n')
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        self._err.close()


def run_syslog_out(directory, stdin_text, timeout=DEADLINE, env=None):
    """The module to its end: (status, stdout, stderr)."""
    p = subprocess.run([PY, SYSLOG_OUT], input=stdin_text.encode('utf-8', 'surrogateescape'),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=directory,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


class FakeStreamServer(object):
    """A TCP (or Unix stream) syslog server in a thread: it splits what
    it gets into messages, by RFC 6587 octet counting or by LF, and can
    close every connection it has, as a restarted daemon would."""

    def __init__(self, family=socket.AF_INET, address=('127.0.0.1', 0), octets=True):
        self.octets = octets
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(16)
        self.address = self.listener.getsockname()
        self.messages = []
        self.connections = []
        self.accepted = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b''
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                conn.close()
                return
            buf += data
            while True:
                if self.octets:
                    length, sep, rest = buf.partition(b' ')
                    if not sep or len(rest) < int(length):
                        break
                    self.messages.append(rest[:int(length)])
                    buf = rest[int(length):]
                else:
                    line, sep, rest = buf.partition(b'\n')
                    if not sep:
                        break
                    self.messages.append(line)
                    buf = rest

    def close_connections(self):
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.connections = []

    def close(self):
        self._stop = True
        self.listener.close()
        self.close_connections()


class FakeRelpServer(object):
    """A RELP server in a thread, built on the module's own codec and
    driven by the test: it answers `open` (with `offers`), `close`, and
    puts every syslog frame it gets in `frames` as (session, txnr, data);
    it answers them itself when auto is set, else when the test calls
    rsp().  serverclose() and drop() end a session as rsyslog would."""

    def __init__(self, auto=False, offers=b'200 OK\nrelp_version=0\nrelp_software=fake\ncommands=syslog'):
        code = syslog_out_code()
        self.parser_class, self.frame = code.RelpParser, code.relp_frame
        self.auto = auto                # True, or a function: message -> answer text
        self.offers = offers
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.frames = queue.Queue()
        self.sessions = []              # sockets, by session number
        self.txnrs = []                 # every (session, txnr, command) received
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.sessions.append(conn)
                number = len(self.sessions) - 1
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _send(self, session, data):
        with self._lock:
            try:
                self.sessions[session].sendall(data)
            except OSError:
                pass

    def _serve(self, conn, session):
        parser = self.parser_class()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            for txnr, command, payload in parser.feed(data):
                self.txnrs.append((session, txnr, command))
                if command == 'open':
                    self._send(session, self.frame(txnr, 'rsp', self.offers))
                elif command == 'close':
                    self._send(session, self.frame(txnr, 'rsp'))
                elif command == 'syslog':
                    self.frames.put((session, txnr, payload))
                    if self.auto is True:
                        self.rsp(session, txnr)
                    elif self.auto:
                        self.rsp(session, txnr, self.auto(payload))

    def rsp(self, session, txnr, text=b'200 OK'):
        self._send(session, self.frame(txnr, 'rsp', text))

    def get(self, n, timeout=DEADLINE):
        return [self.frames.get(timeout=timeout) for _ in range(n)]

    def serverclose(self, session):
        self._send(session, self.frame(0, 'serverclose'))
        self.drop(session)

    def drop(self, session):
        with self._lock:
            conn = self.sessions[session]
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    def close(self):
        self.listener.close()
        for i in range(len(self.sessions)):
            self.drop(i)


# rsyslog properties, one JSON object per message received.  Each is
# escaped with the :::json option (the time is written as RFC 3339, which
# keeps the sender's offset); %inputname% says which listener got it.
RSYSLOG_FIELDS = ('pri syslogfacility-text syslogseverity-text protocol-version timereported '
                  'hostname app-name procid msgid structured-data syslogtag programname msg '
                  'rawmsg inputname').split()


class Rsyslogd(object):
    """A real rsyslogd, started by the test in the foreground with a
    private configuration and work directory under the test's directory,
    listening on 127.0.0.1 (unprivileged ports) and on Unix sockets in that
    directory, writing every message it receives into one file as a JSON
    object of its fields.

    Command line:
      -n           stay in the foreground: the test owns the process and
                   its pid, and stops it (SIGTERM, or SIGKILL) itself
      -f CONF      this configuration, not /etc/rsyslog.conf
      -i PIDFILE   a pid file of its own (an absolute path: rsyslogd
                   changes to / at start), so that it neither collides with
                   the system's rsyslogd (/run/rsyslogd.pid) nor needs root
    Configuration:
      global(workDirectory=...)     its state under the test's directory
      global(net.enableDNS="off")   no name lookups of the senders
      no imklog and no system log socket: imuxsock, when loaded, has
      SysSock.Use="off" and listens only on the test's own socket
      ruleset(queue.type="direct")  imrelp answers `rsp 200` once a
                   message is queued; with a direct queue that is once
                   the file action has written it, so an acknowledged
                   message survives a SIGKILL of rsyslogd
      omfile flushOnTXEnd="on"      the file is written after each
                   message (each is its own transaction with a direct
                   queue), asyncWriting="off": no writer thread holding data
      maxMessageSize is rsyslog's default (8096 bytes), which syslog_out's
      default maxlength matches."""

    def __init__(self, directory, unix_dgram=False, unix_stream=False):
        self.program = need('rsyslogd')
        self.dir = directory
        self.udp, self.tcp, self.relp = free_udp_port(), free_tcp_port(), free_tcp_port()
        self.out = os.path.join(directory, 'rsyslog.jsonl')
        self.pidfile = os.path.join(directory, 'rsyslogd.pid')
        self.conf = os.path.join(directory, 'rsyslog.conf')
        self.log = os.path.join(directory, 'rsyslogd.stderr')
        self.dgram = os.path.join(directory, 'dgram.sock') if unix_dgram else None
        self.stream = os.path.join(directory, 'stream.sock') if unix_stream else None
        os.makedirs(os.path.join(directory, 'rsyslog.work'), exist_ok=True)
        fields = ','.join('\\"%s\\":\\"%%%s:::%s%%\\"' % (
            name, name, 'date-rfc3339' if name == 'timereported' else 'json') for name in RSYSLOG_FIELDS)
        text = ('global(workDirectory="%s" net.enableDNS="off")\n'
                'module(load="imudp")\nmodule(load="imtcp")\nmodule(load="imrelp")\n'
                'template(name="fields" type="string" string="{%s}\\n")\n'
                'ruleset(name="test" queue.type="direct") {\n'
                '  action(type="omfile" file="%s" template="fields" flushOnTXEnd="on"'
                ' asyncWriting="off")\n}\n'
                'input(type="imudp" address="127.0.0.1" port="%d" ruleset="test")\n'
                'input(type="imtcp" address="127.0.0.1" port="%d" ruleset="test")\n'
                'input(type="imrelp" address="127.0.0.1" port="%d" ruleset="test")\n'
                % (os.path.join(directory, 'rsyslog.work'), fields, self.out,
                   self.udp, self.tcp, self.relp))
        if self.dgram:
            text += ('module(load="imuxsock" SysSock.Use="off")\n'
                     'input(type="imuxsock" Socket="%s" ruleset="test")\n' % self.dgram)
        if self.stream:
            text += ('module(load="imptcp")\n'
                     'input(type="imptcp" path="%s" unlink="on" ruleset="test")\n' % self.stream)
        write(self.conf, text)
        self.proc = None

    def start(self):
        self._err = open(self.log, 'ab')
        self.proc = subprocess.Popen([self.program, '-n', '-f', self.conf, '-i', self.pidfile],
                                     stdin=subprocess.DEVNULL, stdout=self._err, stderr=self._err)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError('rsyslogd exited with %s:\n%s' % (self.proc.returncode,
                                                                       read(self.log)))
            for port in (self.tcp, self.relp):
                try:
                    socket.create_connection(('127.0.0.1', port), 1).close()
                except OSError:
                    return False
            return all(os.path.exists(p) for p in (self.dgram, self.stream) if p)
        wait_until(ready, what='rsyslogd to listen')
        return self

    def kill(self):
        self.proc.kill()
        self.proc.wait(DEADLINE)
        self._err.close()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
            self._err.close()

    def records(self):
        """The messages written so far (a last line being written is not one yet)."""
        text = read(self.out)
        return [json.loads(line) for line in text[:text.rfind('\n') + 1].splitlines()]

    def count(self):
        """How many messages are in the file (cheaper than records())."""
        return read(self.out).count('\n')

    def wait_records(self, n, timeout=DEADLINE):
        wait_until(lambda: self.count() >= n, timeout,
                   '%d messages in rsyslogd\'s file; stderr:\n%s' % (n, read(self.log)))
        return self.records()


@pytest.fixture
def rsyslogd(tmp):
    daemons = []

    def start(**kw):
        daemons.append(Rsyslogd(tmp, **kw).start())
        return daemons[-1]
    yield start
    for d in daemons:
        d.stop()


def select_ready(fd, want_write, timeout=0.5):
    """([fd] if readable, [fd] if writable) within timeout."""
    if fd is None:
        time.sleep(0.01)            # nothing to wait on: the caller polls its timers
        return [], []
    r, w, _ = select.select([fd], [fd] if want_write else [], [], timeout)
    return r, w


def event_numbers(records):
    """The n of each COUNTER_IN event in rsyslog's records: it has no
    message token, so syslog_out sent all its tokens, `n=7 msg=event 7`."""
    return [int(re.match(r'n=(\d+) msg=event \1$', r['msg']).group(1)) for r in records]


class GoBackN(threading.Thread):
    """Drives a SyslogOut as Looper does with a confirmwindow: up to
    `window` events unanswered; after an `error`, once every event in
    flight is answered, it waits `retry` seconds and sends again from the
    first that was not `ok`.  Counts oks and errors."""

    def __init__(self, module, events, window=128, retry=0.05):
        threading.Thread.__init__(self, daemon=True)
        self.m, self.events, self.window, self.retry = module, events, window, retry
        self.oks = self.errors = 0
        self.failure = None

    def run(self):
        try:
            base = sent = 0                 # first event not ok; next to send
            while base < len(self.events):
                room = min(self.window - (sent - base), len(self.events) - sent)
                if room > 0:
                    self.m.send(*self.events[sent:sent + room])
                    sent += room
                answer, = self.m.answers(1, timeout=60)
                if answer == 'ok':
                    base += 1
                    self.oks += 1
                    continue
                assert answer.startswith('error '), answer
                self.errors += 1
                rest = self.m.answers(sent - base - 1, timeout=60)
                assert all(a.startswith('error ') for a in rest), rest   # go-back-N: in order
                self.errors += len(rest)
                time.sleep(self.retry)      # Looper's retrydelay
                sent = base
        except BaseException as e:
            self.failure = e


def looper_counters(looper, timeout=DEADLINE):
    """Looper's counters now: SIGUSR1, then its next counters line."""
    before = len(re.findall(r'(counters|finished): events_in=', looper.log()))
    looper.signal(signal.SIGUSR1)
    looper.wait_log(r'(counters|finished): events_in=', timeout, count=before + 1)
    return counters(looper.log())


def first_occurrences(numbers):
    seen, order = set(), []
    for n in numbers:
        if n not in seen:
            seen.add(n)
            order.append(n)
    return order


##############################################################################
# Formats: pure functions
##############################################################################

class FixedTime(object):
    """Stands for the time module inside the loaded syslog_out: now is
    `at` (UTC seconds), local time is UTC plus `offset` seconds."""

    def __init__(self, at, offset):
        self.at, self.offset = at, offset

    def time(self):
        return self.at

    def localtime(self, t):
        return time.struct_time(tuple(time.gmtime(t + self.offset))[:9] + ('TST', self.offset))

    def __getattr__(self, name):
        return getattr(time, name)


def formatter(monkeypatch, fmt='rfc5424', server='udp:127.0.0.1:514', at=1795673364.25,
              offset=3600, **keys):
    code = syslog_out_code()
    monkeypatch.setattr(code, 'time', FixedTime(at, offset))
    keys.setdefault('hostname', 'edge-7')
    if fmt:
        keys['format'] = fmt
    return code.formatter_from(keys, code.parse_server(server)[0])


class TestSyslogOutFormats(object):

    def test_rfc5424_header_defaults_and_per_event_tokens(self, monkeypatch):
        f = formatter(monkeypatch)
        # 1795673364.25 is 2026-11-26T06:09:24.25Z; local time is UTC+01:00.
        assert f.format([('desc', 'plain text')]) == \
            b'<13>1 2026-11-26T07:09:24.250000+01:00 edge-7 looper - - - plain text'
        assert f.format([('message', 'disk full'), ('desc', 'not this'), ('node', 'gw1.example.org'),
                         ('program', 'smartd'), ('pid', '4242'), ('msgid', 'DISK'),
                         ('severity', 'crit'), ('facility', 'local3'),
                         ('sd', '[disk@32473 dev="/dev/sda" state="fail\\]ed"]')]) == \
            (b'<154>1 2026-11-26T07:09:24.250000+01:00 gw1.example.org smartd 4242 DISK '
             b'[disk@32473 dev="/dev/sda" state="fail\\]ed"] disk full')
        assert f.bad == 0 and f.cut == 0

    def test_offsets_west_and_half_hours(self, monkeypatch):
        assert formatter(monkeypatch, offset=-(4 * 3600 + 30 * 60)).format(
            [('desc', 'x')]).split(b' ')[1] == b'2026-11-26T01:39:24.250000-04:30'
        assert formatter(monkeypatch, offset=0).format(
            [('desc', 'x')]).split(b' ')[1] == b'2026-11-26T06:09:24.250000+00:00'

    def test_names_numbers_and_aliases_of_facility_and_severity(self, monkeypatch):
        f = formatter(monkeypatch, facility='local7', severity='debug')
        pri = lambda **t: int(re.match(br'<(\d+)>', f.format(list(t.items()) + [('desc', 'x')])).group(1))
        assert pri() == 23 * 8 + 7
        assert pri(facility='kern', severity='emerg') == 0
        assert pri(facility='0', severity='0') == 0
        assert pri(facility='23', severity='7') == 191
        assert pri(facility='AUTHPRIV', severity='Warning') == 10 * 8 + 4
        assert pri(facility='security', severity='panic') == 4 * 8
        assert pri(severity='error') == 23 * 8 + 3 and pri(severity='warn') == 23 * 8 + 4
        assert pri(severity='informational') == 23 * 8 + 6 and pri(severity='critical') == 23 * 8 + 2
        assert f.bad == 0
        # A typo costs the event its severity, not the message.
        assert pri(severity='bogus', facility='24') == 23 * 8 + 7 and f.bad == 2

    def test_header_fields_are_printable_ascii_cut_to_their_rfc_lengths(self, monkeypatch):
        f = formatter(monkeypatch)
        data = f.format([('message', 'm'), ('node', 'h' * 300), ('program', 'a b' * 30),
                         ('pid', 'p' * 200), ('msgid', 'Grüße' * 10)])
        fields = data.split(b' ')
        assert fields[2] == b'h' * 255
        assert fields[3] == (b'a_b' * 16)[:48]
        assert fields[4] == b'p' * 128
        assert fields[5] == (b'Gr__e' * 7)[:32]
        assert fields[6:] == [b'-', b'm']

    def test_message_falls_back_to_desc_then_to_every_token(self, monkeypatch):
        f = formatter(monkeypatch)
        assert f.format([('desc', 'from desc')]).endswith(b' - - - from desc')
        assert f.format([('message', ''), ('desc', 'empty message')]).endswith(b' empty message')
        assert f.format([('n', '7'), ('what', 'no text')]).endswith(b' - - - n=7 what=no text')

    def test_no_raw_line_break_ever_and_the_protocol_escape_kept(self, monkeypatch):
        for fmt in ('rfc5424', 'rfc3164'):
            f = formatter(monkeypatch, fmt)
            data = f.format([('message', 'two\\nlines\\r and raw\nbreaks\r')])
            assert b'\n' not in data and b'\r' not in data
            assert data.endswith(b'two\\nlines\\r and raw breaks ')

    def test_sd_that_is_not_rfc5424_is_replaced(self, monkeypatch):
        f = formatter(monkeypatch)
        for bad in ('x', '[]', '[a b]', '[a b="c]', '[a@1 b="c"] ', '[a="b"]', '[%s]' % ('n' * 33),
                    '[a b="c"]x', '[a b="c""]'):
            assert f.format([('sd', bad), ('desc', 'm')]).endswith(b' - - - m'), bad
        assert f.bad == 9
        for good in ('[a]', '[a b="c"][d@1 e="" f="\\"q\\" \\\\ \\]"]', '[exampleSDID@32473 iut="3"]'):
            assert f.format([('sd', good), ('desc', 'm')]).endswith((' %s m' % good).encode()), good

    def test_maxlength_cuts_msg_at_a_character_boundary(self, monkeypatch):
        f = formatter(monkeypatch, maxlength='600')
        for text in ('e' * 1000, '\u00e9' * 1000, '\u6771' * 1000, '\U0001F600' * 1000):
            data = f.format([('message', text)])
            assert 596 < len(data) <= 600
            data.decode('utf-8')                    # a whole character at the end
            assert text.startswith(data.decode().split(' - - - ', 1)[1])
        assert f.cut == 4
        # An SD that does not fit goes first; the message is kept.
        data = f.format([('sd', '[a b="%s"]' % ('v' * 700)), ('message', 'kept')])
        assert data.endswith(b' - - - kept') and f.cut == 5
        # Bytes that are not UTF-8 stay as they were, cut near the limit.
        data = f.format([('message', b'\xff\xfe\x80'.decode('utf-8', 'surrogateescape') * 400)])
        head = data[:data.index(b' - - - ') + 7]
        assert 597 < len(data) <= 600 and (head + b'\xff\xfe\x80' * 400).startswith(data)

    def test_default_maxlength_is_8096_for_rfc5424_and_1024_for_rfc3164(self, monkeypatch):
        assert len(formatter(monkeypatch).format([('message', 'x' * 20000)])) == 8096
        assert len(formatter(monkeypatch, 'rfc3164').format([('message', 'x' * 20000)])) == 1024
        assert len(formatter(monkeypatch, 'rfc3164', 'tcp:h:1', maxlength='100000').format(
            [('message', 'x' * 200000)])) == 100000

    def test_rfc3164_network_and_local_forms(self, monkeypatch):
        # 1793683744 is 2026-11-03T05:29:04Z: the day is padded with a space.
        f = formatter(monkeypatch, 'rfc3164', at=1793683744, offset=0)
        assert f.format([('desc', 'hello')]) == b'<13>Nov  3 05:29:04 edge-7 looper: hello'
        assert f.format([('message', 'hi'), ('node', 'gw2'), ('program', 'postfix/smtpd'),
                         ('pid', '77'), ('severity', 'info'), ('facility', 'mail'),
                         ('msgid', 'ignored'), ('sd', '[ignored]')]) == \
            b'<22>Nov  3 05:29:04 gw2 postfix/smtpd[77]: hi'
        assert f.format([('program', 'a:b[c]' + 'x' * 40), ('desc', 'm')]) == \
            b'<13>Nov  3 05:29:04 edge-7 a_b_c_' + b'x' * 26 + b': m'
        local = formatter(monkeypatch, None, 'unix:/dev/log', at=1793683744, offset=0)
        assert local.format([('desc', 'to the local daemon'), ('node', 'not sent'), ('pid', '9')]) == \
            b'<13>Nov  3 05:29:04 looper[9]: to the local daemon'
        assert formatter(monkeypatch, 'rfc5424', 'unix:/dev/log').format([('desc', 'm')]).startswith(
            b'<13>1 2026-')

    def test_rfc3164_default_hostname_has_no_domain(self, monkeypatch):
        code = syslog_out_code()
        monkeypatch.setattr(code.socket, 'gethostname', lambda: 'web3.dc1.example.org')
        assert code.formatter_from({'format': 'rfc3164'}, 'udp').hostname == 'web3'
        assert code.formatter_from({}, 'udp').hostname == 'web3.dc1.example.org'
        assert code.short_host('192.0.2.7') == '192.0.2.7' and code.short_host('fe80::1') == 'fe80::1'

    def test_server_forms(self):
        parse = syslog_out_code().parse_server
        assert parse('udp:127.0.0.1:514') == ('udp', ('127.0.0.1', 514))
        assert parse(' TCP:logs.example.org:6514 ') == ('tcp', ('logs.example.org', 6514))
        assert parse('relp:[::1]:2514') == ('relp', ('::1', 2514))
        assert parse('unix:/dev/log') == ('unix', '/dev/log')
        assert parse('unix:rel/sock') == ('unix', 'rel/sock')
        for bad in ('udp:host', 'udp:host:0', 'udp:host:65536', 'udp::514', 'tcp:::1:514',
                    'sctp:h:1', 'relp:[::1]514', 'unix:', '/dev/log', 'udp:h:x', 'unix:/' + 'x' * 107):
            with pytest.raises(syslog_out_code().ConfigError):
                parse(bad)

    def test_reconnection_delay_doubles_to_its_cap_and_resets(self):
        backoff = syslog_out_code().Backoff(0.2, 0.7)
        assert backoff.due(0.0)
        delays = []
        now = 100.0
        for _ in range(5):
            backoff.failed(now)
            assert not backoff.due(now) and not backoff.due(backoff.next - 0.001)
            delays.append(round(backoff.next - now, 3))
            now = backoff.next
            assert backoff.due(now)
        assert delays == [0.2, 0.4, 0.7, 0.7, 0.7]
        backoff.succeeded()
        assert backoff.due(now)
        backoff.failed(now)
        assert round(backoff.next - now, 3) == 0.2

    def test_cut_utf8(self):
        cut = syslog_out_code().cut_utf8
        assert cut(b'abc', 5) == b'abc' and cut(b'abc', 2) == b'ab'
        assert cut('a\u00e9'.encode(), 2) == b'a'
        assert cut('\U0001F600\U0001F600'.encode(), 7) == '\U0001F600'.encode()
        assert cut(b'\x80' * 10, 4) == b'\x80' * 4
        assert cut(b'', 0) == b''

    def test_fuzz_formatter_never_fails_and_keeps_its_limits(self, monkeypatch):
        rnd = random.Random(5424)
        alphabet = ['a', ' ', '=', '"', ']', '[', '\\', ':', '\n', '\r', '\x00', '\t', '\u00e9',
                    '\u6771', '\U0001F600', '\udcff', '-', '@', '7', 'Z']
        tokens = ['message', 'desc', 'node', 'program', 'pid', 'msgid', 'sd', 'severity',
                  'facility', 'other']
        for fmt, server in (('rfc5424', 'udp:h:1'), ('rfc3164', 'tcp:h:1'), (None, 'unix:/x')):
            f = formatter(monkeypatch, fmt, server, maxlength=str(rnd.choice([480, 700, 8096])))
            for _ in range(3000):
                event = [(rnd.choice(tokens), ''.join(rnd.choice(alphabet)
                                                      for _ in range(rnd.choice([0, 1, 5, 40, 900]))))
                         for _ in range(rnd.randrange(6))]
                data = f.format(event)
                assert len(data) <= f.maxlength and b'\n' not in data and b'\r' not in data
                assert re.match(br'<\d{1,3}>(1 \S+ \S+ \S+ \S+ \S+ (-|\[)|[A-Z][a-z]{2} )', data) or (
                    len(data) >= f.maxlength - 3 and re.match(br'<\d{1,3}>(1 \d{4}-|[A-Z][a-z]{2} )',
                                                              data)), data


##############################################################################
# The RELP codec (the block shared with syslog_in)
##############################################################################

class TestRelpCodec(object):

    def test_round_trip_in_any_pieces(self):
        code = syslog_out_code()
        rnd = random.Random(2514)
        frames = [(1, 'open', b'relp_version=0\nrelp_software=x\ncommands=syslog'),
                  (2, 'syslog', b'<13>1 - - - - - - with\nnewline and spaces  '),
                  (3, 'syslog', bytes(range(256)) * 3), (4, 'rsp', b'200 OK'),
                  (5, 'close', b''), (0, 'serverclose', b''), (999999999, 'rsp', b''),
                  (6, 'syslog', b'\n'), (7, 'syslog', b' '), (8, 'syslog', b'x' * 1048576)]
        stream = b''.join(code.relp_frame(*f) for f in frames)
        assert code.relp_frame(5, 'close') == b'5 close 0\n'
        assert code.relp_frame(4, 'rsp', b'200 OK') == b'4 rsp 6 200 OK\n'
        for _ in range(200):
            parser, got, i = code.RelpParser(), [], 0
            while i < len(stream):
                step = rnd.choice([1, 2, 3, 7, 50, 4096, 100000])
                got += parser.feed(stream[i:i + step])
                i += step
            assert got == frames
        assert code.RelpParser().feed(stream) == frames

    def test_next_txnr_wraps_to_1(self):
        code = syslog_out_code()
        assert code.relp_next_txnr(1) == 2
        assert code.relp_next_txnr(999999998) == 999999999
        assert code.relp_next_txnr(999999999) == 1

    def test_malformed_frames_are_errors(self):
        code = syslog_out_code()
        for bad in (b'x rsp 0\n', b'1 r5p 0\n', b'1 rsp x\n', b'1  rsp 0\n', b'1 rsp 3 abcd\n',
                    b'1 rsp 3\nabc\n', b'1234567890 rsp 0\n', b'1 rsp 1234567890 x\n',
                    b'1 %s 0\n' % (b'a' * 33), b'1 rsp 2000000 ' + b'x' * 100,
                    b'1' * 60, b'1 ' + b'r' * 60, b'-1 rsp 0\n'):
            with pytest.raises(code.RelpError):
                code.RelpParser().feed(bad)

    def test_fuzz_parser_only_frames_or_relp_error_and_bounded(self):
        code = syslog_out_code()
        rnd = random.Random(20514)
        good = b''.join(code.relp_frame(i, c, d) for i, c, d in
                        [(1, 'open', b'relp_version=0'), (2, 'syslog', b'hello world'),
                         (3, 'rsp', b'200 OK'), (4, 'close', b''), (0, 'serverclose', b'')])
        pieces = [b' ', b'\n', b'0', b'9', b'rsp', b'syslog', b'\x00', b'\xff', b'12 ', b'5 x 3 ']
        for i in range(5000):
            if i % 2:
                data = bytearray(good)
                for _ in range(rnd.randrange(1, 6)):
                    pos = rnd.randrange(len(data))
                    kind = rnd.randrange(3)
                    if kind == 0:
                        data[pos] = rnd.randrange(256)
                    elif kind == 1:
                        del data[pos:pos + rnd.randrange(1, 8)]
                    else:
                        data[pos:pos] = rnd.choice(pieces)
                data = bytes(data)
            else:
                data = b''.join(rnd.choice(pieces + [bytes([rnd.randrange(256)])])
                                for _ in range(rnd.randrange(60)))
            parser = code.RelpParser(max_frame=4096)
            try:
                for j in range(0, len(data), 5):
                    for txnr, command, payload in parser.feed(data[j:j + 5]):
                        assert 0 <= txnr <= 999999999 and command.isalpha()
                        assert isinstance(payload, bytes) and len(payload) <= 4096
                    assert len(parser._buf) <= 4096 + 64
            except code.RelpError:
                pass

    def test_the_shared_blocks_are_byte_for_byte_the_same(self):
        protocol = ('# ----- Looper module protocol: the same, byte for byte',
                    '# ----- end of the Looper module protocol -----')
        mine = block(SYSLOG_OUT, *protocol)
        assert mine and mine == block(TEMPLATE_OUT, *protocol)
        relp = ('# ----- RELP codec: the same, byte for byte', '# ----- end of the RELP codec -----')
        mine = block(SYSLOG_OUT, *relp)
        assert mine
        # The other copies, where this checkout has them (syslog_in gets its
        # copy from another branch; the shared file is not in the repository).
        for other in (os.path.join(MODULES, 'syslog_in'), '/work/blocks/relp_block.py'):
            theirs = block(other, *relp)
            if theirs:
                assert mine == theirs, other


##############################################################################
# The module alone, on its pipes, against servers in this process
##############################################################################

class TestSyslogOutModule(object):

    def test_help_starts_nothing_and_bad_configuration_exits_78(self, tmp):
        p = subprocess.run([PY, SYSLOG_OUT, '--help'], stdout=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 0 and b'relp:HOST:PORT' in p.stdout and b'maxlength' in p.stdout
        for keys, message in (
                ('server=udp:localhost\n', 'server must be udp:HOST:PORT'),
                ('server=tcp:::1:514\n', 'put an IPv6 address in brackets'),
                ('format=rfc5425\n', "format must be 'rfc5424' or 'rfc3164'"),
                ('facility=locl0\n', 'facility must be a syslog facility'),
                ('severity=8\n', 'severity must be a syslog severity'),
                ('tag=my app\n', 'tag must be printable ASCII'),
                ('hostname=a b\n', 'hostname must be printable ASCII'),
                ('maxlength=100\n', 'maxlength must be a whole number greater than 479'),
                ('server=udp:h:1\nmaxlength=70000\n', 'at most 65507'),
                ('timeout=0\n', 'timeout must be a number greater than 0'),
                ('confirm=maybe\n', 'confirm must be yes or no')):
            status, out, err = run_syslog_out(tmp, keys + 'configure\n')
            assert status == 78 and out == '' and message in err, (keys, status, out, err)
        p = subprocess.run([PY, SYSLOG_OUT, 'extra'], stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 78 and b'takes no arguments' in p.stderr
        assert run_syslog_out(tmp, 'server=udp:h:1\n')[:2] == (0, '')   # no configure: nothing

    def test_udp_answers_ok_once_sent(self, tmp):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(('127.0.0.1', 0))
        receiver.settimeout(DEADLINE)
        port = receiver.getsockname()[1]
        status, out, err = run_syslog_out(
            tmp, 'server=udp:127.0.0.1:%d\nconfirm=yes\nhostname=h\nconfigure\n%s%squit\n'
            % (port, event_lines({'message': 'one'}), event_lines({'message': 'two', 'severity': 'err'})))
        assert (status, out) == (0, 'ok\nok\nok\n'), err
        assert re.match(br'<13>1 %s h looper - - - one$' % RFC3339.encode(), receiver.recv(9000))
        assert re.match(br'<11>1 \S+ h looper - - - two$', receiver.recv(9000))
        assert 'sent 2 messages to udp:127.0.0.1:%d' % port in err
        receiver.close()

    def test_udp_refused_by_icmp_is_reported_and_the_next_datagram_sent(self, tmp):
        port = free_udp_port()          # nothing listens there
        status, out, err = run_syslog_out(tmp, 'server=udp:127.0.0.1:%d\nconfigure\n%squit\n' % (
            port, ''.join(event_lines({'message': 'm%d' % i}) for i in range(5))))
        assert (status, out) == (0, 'ok\n' * 6), err
        assert 'udp:127.0.0.1:%d refused a datagram (does anything listen there?)' % port in err
        assert re.search(r'sent 5 messages .*, [1-4] refused', err), err

    def test_udp_and_tcp_over_ipv6(self, tmp):
        try:
            receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            receiver.bind(('::1', 0))
        except OSError:
            pytest.skip('no IPv6 loopback here')
        receiver.settimeout(DEADLINE)
        status, out, err = run_syslog_out(tmp, 'server=udp:[::1]:%d\nconfigure\n%squit\n' % (
            receiver.getsockname()[1], event_lines({'message': 'over v6'})))
        assert (status, out) == (0, 'ok\nok\n'), err
        assert receiver.recv(9000).endswith(b' over v6')
        receiver.close()
        server = FakeStreamServer(socket.AF_INET6, ('::1', 0))
        try:
            status, out, err = run_syslog_out(tmp, 'server=tcp:[::1]:%d\nconfigure\n%squit\n' % (
                server.address[1], event_lines({'message': 'tcp over v6'})))
            assert (status, out) == (0, 'ok\nok\n') and 'sending to tcp:[::1]:' in err, err
            wait_until(lambda: server.messages)
            assert server.messages[0].endswith(b' tcp over v6')
        finally:
            server.close()

    def test_the_running_module_survives_any_input(self, tmp):
        """Random protocol lines (no `=`, NUL, bytes that are not UTF-8,
        empty events, a 200 KB value, odd token values): every `go` is
        answered `ok` (an empty event too), and the module ends cleanly."""
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(('127.0.0.1', 0))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rnd = random.Random(3164)
        values = ['', 'x', '\x00', '[a b="c"]', 'local9', '99', '-', ' ', '=', 'é' * 300,
                  b'\xff\xfe'.decode('utf-8', 'surrogateescape'), 'y' * 200000, '\\n', '\t']
        names = ['message', 'desc', 'node', 'program', 'pid', 'msgid', 'sd', 'severity',
                 'facility', 'x', '']
        lines, events = [], 0
        for _ in range(400):
            kind = rnd.randrange(10)
            if kind == 0:
                lines.append(rnd.choice(['no equals sign', '\x00\x01', 'configure', 'ok', '']))
            elif kind == 1:
                lines.append('go')          # an empty event: answered like any other
                events += 1
            else:
                event = ['%s=%s' % (rnd.choice(names), rnd.choice(values))
                         for _ in range(rnd.randrange(1, 5))]
                events += 1
                lines.extend(event + ['go'])
        status, out, err = run_syslog_out(
            tmp, 'server=udp:127.0.0.1:%d\nconfigure\n%s\nquit\n' % (
                receiver.getsockname()[1], '\n'.join(lines)), timeout=60)
        receiver.close()
        assert status == 0, err
        assert out == 'ok\n' * (events + 1), (out.count('\n'), events, err[-2000:])
        assert 'Traceback' not in err

    def test_without_confirm_nothing_is_answered(self, tmp):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(('127.0.0.1', 0))
        receiver.settimeout(DEADLINE)
        status, out, err = run_syslog_out(tmp, 'server=udp:127.0.0.1:%d\nconfirm=no\nconfigure\n%s' % (
            receiver.getsockname()[1], event_lines({'message': 'quiet'})))
        assert (status, out) == (0, ''), err
        assert receiver.recv(9000).endswith(b' quiet')
        receiver.close()

    @pytest.mark.parametrize('kind', ['tcp', 'relp'])
    def test_without_confirm_an_orphan_stops_when_looper_is_gone(self, tmp, kind):
        """Waiting for a server that is down, the module notices that
        the reader of its stdout (Looper) went away, and exits."""
        err_path = os.path.join(tmp, 'err')
        with open(err_path, 'wb') as err:
            p = subprocess.Popen([PY, SYSLOG_OUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, cwd=tmp)
        try:
            p.stdin.write(('server=%s:127.0.0.1:%d\nconfirm=no\nreconnectdelay=0.1\nconfigure\n%s'
                           % (kind, free_tcp_port(), event_lines({'message': 'x'}))).encode())
            p.stdin.flush()
            wait_until(lambda: 'cannot ' in read(err_path), what='a failed connection')
            p.stdout.close()            # Looper is gone; stdin stays open
            assert p.wait(DEADLINE) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdin.close()
        assert 'Looper is gone; exiting: 1 messages not ' in read(err_path), read(err_path)

    def test_tcp_octet_counting_and_a_server_that_closes_the_connection(self, tmp):
        server = FakeStreamServer()
        m = SyslogOut(tmp, server='tcp:127.0.0.1:%d' % server.address[1], confirm='yes',
                      hostname='h', timeout='5')
        try:
            assert m.answers(1) == ['ok']
            m.send(*[{'message': 'first %d with\\nescape' % i} for i in range(3)])
            assert m.answers(3) == ['ok'] * 3
            wait_until(lambda: len(server.messages) == 3)
            assert all(re.match(br'<13>1 \S+ h looper - - - first \d with\\nescape$', msg)
                       for msg in server.messages), server.messages
            # The server closes (as a restarted rsyslogd does): the module
            # sees it before its next write and connects again.
            # (On loopback the FIN is queued at the module's socket before
            # shutdown() returns.)
            server.close_connections()
            m.send({'message': 'after the close'})
            assert m.answers(1) == ['ok']
            wait_until(lambda: len(server.messages) == 4)
            assert server.messages[3].endswith(b' after the close') and server.accepted == 2
        finally:
            assert m.quit() == 0
            server.close()
        assert 'closed the connection; connecting again' in m.stderr()

    def test_tcp_server_down_errors_then_backs_off_then_recovers(self, tmp):
        port = free_tcp_port()
        m = SyslogOut(tmp, server='tcp:127.0.0.1:%d' % port, confirm='yes',
                      reconnectdelay='2', maxreconnectdelay='2')
        try:
            assert m.answers(1) == ['ok']
            m.send({'message': 'a'}, {'message': 'b'})
            answers = m.answers(2)
            assert all(a.startswith('error cannot connect to tcp:127.0.0.1:%d: ' % port)
                       for a in answers), answers
            m.send({'message': 'c'})        # within the delay: no attempt
            assert re.match(r'error not connected to tcp:127\.0\.0\.1:\d+ \(next attempt in [12]\.\d\d s\)$',
                            m.answers(1)[0])
            server = FakeStreamServer(address=('127.0.0.1', port))
            try:
                def delivered():
                    m.send({'message': 'd'})
                    return m.answers(1) == ['ok']
                wait_until(delivered, what='a connection after the delay')
                wait_until(lambda: server.messages)
                assert server.messages[0].endswith(b' d')
            finally:
                server.close()
        finally:
            assert m.quit() == 0
        assert 'next attempt in 2 s' in m.stderr(), m.stderr()

    def test_relp_window_answers_in_order_reject_and_session_end(self, tmp):
        server = FakeRelpServer()
        m = SyslogOut(tmp, server='relp:127.0.0.1:%d' % server.port, confirm='yes', timeout='20',
                      reconnectdelay='0.1')
        try:
            assert m.answers(1) == ['ok']
            m.send(*[{'message': 'm%d' % i} for i in range(6)])
            # All six are on the wire before any answer: a window, not a
            # round trip per message.
            frames = server.get(6)
            assert [(s, t) for s, t, _ in frames] == [(0, t) for t in range(2, 8)]
            assert [d.rsplit(b' ', 1)[1] for _, _, d in frames] == [b'm%d' % i for i in range(6)]
            assert server.txnrs[0] == (0, 1, 'open')
            # Answers in another order: Looper still hears them in its order.
            server.rsp(0, 4)
            server.rsp(0, 3, b'500 message too long')
            m.no_answer_for(0.3)
            server.rsp(0, 2)
            assert m.answers(3) == ['ok', 'reject relp:127.0.0.1:%d answered 500 message too long'
                                    % server.port, 'ok']
            # An answer that is neither 200 nor 5xx ends the session: that
            # message and the two after it are errors, sent again later.
            server.rsp(0, 5, b'400 not now')
            assert m.answers(3) == ['error connection to relp:127.0.0.1:%d lost: the server '
                                    'answered 400 not now' % server.port] * 3
            m.send({'message': 'again'}, {'message': 'and again'})
            got = server.get(2)
            assert [(s, t) for s, t, _ in got] == [(1, 2), (1, 3)]
            assert got[0][2].endswith(b' again') and got[1][2].endswith(b' and again')
            server.rsp(1, 2)
            assert m.answers(1) == ['ok']
            # serverclose with one in flight, then a new session.
            server.serverclose(1)
            assert m.answers(1) == ['error connection to relp:127.0.0.1:%d lost: the server closed '
                                    'the session (serverclose)' % server.port]
            m.send({'message': 'once more'})
            (session, txnr, data), = server.get(1)
            assert (session, txnr) == (2, 2) and data.endswith(b' once more')
            server.rsp(2, 2)
            assert m.answers(1) == ['ok']
            # The connection breaks with one in flight.
            m.send({'message': 'lost'})
            server.get(1)
            server.drop(2)
            assert m.answers(1) == ['error connection to relp:127.0.0.1:%d lost: the server '
                                    'closed the connection' % server.port]
        finally:
            assert m.quit() == 0
            server.close()
        assert re.search(r'RELP session with relp:127.0.0.1:\d+ ended: the server answered 400 not '
                         r'now; 3 messages in flight answered error', m.stderr())

    def test_relp_no_answer_within_timeout_is_an_error(self, tmp):
        server = FakeRelpServer()
        m = SyslogOut(tmp, server='relp:127.0.0.1:%d' % server.port, confirm='yes', timeout='0.5')
        try:
            assert m.answers(1) == ['ok']
            m.send({'message': 'x'}, {'message': 'y'})
            server.get(2)
            assert m.answers(2) == ['error connection to relp:127.0.0.1:%d lost: no answer from the '
                                    'server for 0.5 s (timeout)' % server.port] * 2
        finally:
            assert m.quit() == 0
            server.close()

    def test_relp_refused_session_and_missing_syslog_command(self, tmp):
        for offers, reason in ((b'500 go away', 'the server refused the session: 500 go away'),
                               (b'200 OK\nrelp_version=0\ncommands=', 'the server does not offer '
                                                                       'the syslog command')):
            server = FakeRelpServer(offers=offers)
            status, out, err = run_syslog_out(tmp, 'server=relp:127.0.0.1:%d\nconfigure\n%squit\n' % (
                server.port, event_lines({'message': 'x'})))
            server.close()
            assert status == 0 and out.splitlines() == [
                'ok', 'error cannot open a RELP session with relp:127.0.0.1:%d: %s'
                % (server.port, reason)], (out, err)
        port = free_tcp_port()
        status, out, err = run_syslog_out(tmp, 'server=relp:127.0.0.1:%d\nconfigure\n%squit\n' % (
            port, event_lines({'message': 'x'})))
        assert out.splitlines()[1].startswith('error cannot open a RELP session with relp:127.0.0.1:%d: '
                                              % port)

    def test_relp_without_confirm_sends_again_what_a_broken_session_lost(self, tmp):
        server = FakeRelpServer()
        m = SyslogOut(tmp, server='relp:127.0.0.1:%d' % server.port, confirm='no',
                      reconnectdelay='0.05')
        try:
            m.send(*[{'message': 'n%d' % i} for i in range(10)])
            first = server.get(10)
            for _, txnr, _ in first[:4]:
                server.rsp(0, txnr)
            wait_until(lambda: len(server.txnrs) >= 11)
            server.drop(0)              # six unanswered
            again = server.get(6)
            assert [d.rsplit(b' ', 1)[1] for _, _, d in again] == [b'n%d' % i for i in range(4, 10)]
            assert {s for s, _, _ in again} == {1}
            for _, txnr, _ in again:
                server.rsp(1, txnr)
            m.send({'message': 'last'})
            (session, txnr, data), = server.get(1)
            server.rsp(session, txnr)
        finally:
            assert m.quit() == 0
            server.close()
        assert m.lines.get(timeout=DEADLINE) is None        # never an answer
        assert (1, 9, 'close') in server.txnrs               # closed politely at the end
        assert 'sent 11 messages' in m.stderr()

    def test_relp_session_reopened_before_txnr_runs_out(self, monkeypatch):
        code = syslog_out_code()
        monkeypatch.setattr(code, 'RELP_SESSION_TXNR_MAX', 5)
        server = FakeRelpServer(auto=True)
        link = code.Relp(('127.0.0.1', server.port), 5.0, code.Backoff(0.1, 1), True)
        slots = [code.Slot(b'<13>1 - - - - - - %d' % i) for i in range(11)]
        try:
            link.send(slots[:3])
            link.send(slots[3:])
            deadline = time.monotonic() + DEADLINE
            while any(s.status is None for s in slots) and time.monotonic() < deadline:
                fd = link.fileno()
                ready = select_ready(fd, link.wants_write())
                link.poll(fd in ready[0], fd in ready[1], time.monotonic())
            assert [s.status for s in slots] == ['ok'] * 11
            got = [server.frames.get(timeout=1) for _ in range(11)]
            assert [d.rsplit(b' ', 1)[1] for _, _, d in got] == [b'%d' % i for i in range(11)]
            assert [(s, t) for s, t, _ in got] == [(0, 2), (0, 3), (0, 4), (0, 5), (1, 2), (1, 3),
                                                   (1, 4), (1, 5), (2, 2), (2, 3), (2, 4)]
            wait_until(lambda: (1, 6, 'close') in server.txnrs and (0, 6, 'close') in server.txnrs)
        finally:
            link.close()
            server.close()

    def test_relp_5xx_is_a_reject_through_looper(self, tmp):
        """A RELP server that refuses some messages for good (500):
        Looper counts them rejected and the others confirmed."""
        server = FakeRelpServer(auto=lambda data: b'500 refused' if data.endswith(b'7')
                                else b'200 OK')
        py_module(tmp, 'src', COUNTER_IN)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = %s\n"
                           "input i {\n module = src\n count = 300\n}\n"
                           "output o {\n module = syslog_out\n server = relp:127.0.0.1:%d\n"
                           " confirm = yes\n}\n" % (MODULES, server.port))
        try:
            p = run([conf])
        finally:
            server.close()
        c = counters(p.stderr)
        assert c['output.o.rejected'] == 30 and c['output.o.confirmed'] == 270, p.stderr
        assert re.search(r'reject.*relp:127.0.0.1:\d+ answered 500 refused', p.stderr), p.stderr
        assert p.returncode == 1, p.stderr          # a run with rejected events says so

    def test_unix_datagram_local_form_and_daemon_restart(self, tmp):
        path = os.path.join(tmp, 'log.sock')

        def bind():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(path)
            s.settimeout(DEADLINE)
            return s
        receiver = bind()
        m = SyslogOut(tmp, server='unix:log.sock', confirm='yes')
        try:
            assert m.answers(1) == ['ok']
            m.send({'message': 'to the local daemon', 'program': 'app', 'pid': '12', 'node': 'nope'})
            assert m.answers(1) == ['ok']
            assert re.match(br'<13>%s app\[12\]: to the local daemon$' % BSD_TIME.encode(),
                            receiver.recv(9000))
            receiver.close()
            os.unlink(path)
            receiver = bind()           # the daemon restarted behind the path
            m.send({'message': 'after the restart'})
            assert m.answers(1) == ['ok']
            assert receiver.recv(9000).endswith(b'looper: after the restart')
        finally:
            assert m.quit() == 0
            receiver.close()

    def test_unix_stream_socket_gets_one_message_per_line(self, tmp):
        path = os.path.join(tmp, 'stream.sock')
        server = FakeStreamServer(socket.AF_UNIX, path, octets=False)
        try:
            status, out, err = run_syslog_out(tmp, 'server=unix:%s\nconfigure\n%s%squit\n' % (
                path, event_lines({'message': 'one\\ntwo'}), event_lines({'message': 'three'})))
            assert (status, out) == (0, 'ok\nok\nok\n'), err
            wait_until(lambda: len(server.messages) == 2)
            assert server.messages[0].endswith(b' looper: one\\ntwo')
            assert server.messages[1].endswith(b' looper: three')
            assert 'sending to unix:%s (a stream socket)' % path in err
        finally:
            server.close()

    def test_unix_socket_missing_is_an_error_not_a_crash(self, tmp):
        status, out, err = run_syslog_out(tmp, 'server=unix:nothing.sock\nconfigure\n%squit\n'
                                          % event_lines({'message': 'x'}))
        assert status == 0 and out.splitlines()[1].startswith(
            'error cannot connect to unix:nothing.sock: No such file or directory'), (out, err)


##############################################################################
# Against a real rsyslogd
##############################################################################

# Every kind of event the real-peer tests send, and what rsyslog must see.
EVENTS_5424 = [
    ({'desc': 'plain event'},
     {'pri': '13', 'syslogfacility-text': 'user', 'syslogseverity-text': 'notice',
      'hostname': 'edge-7', 'app-name': 'looper', 'procid': '-', 'msgid': '-',
      'structured-data': '-', 'msg': 'plain event'}),
    ({'message': 'disk full', 'node': 'gw1.example.org', 'program': 'smartd', 'pid': '4242',
      'msgid': 'DISK', 'severity': 'crit', 'facility': 'local3',
      'sd': '[disk@32473 dev="/dev/sda" state="fail\\]ed"]'},
     {'pri': '154', 'syslogfacility-text': 'local3', 'syslogseverity-text': 'crit',
      'hostname': 'gw1.example.org', 'app-name': 'smartd', 'procid': '4242', 'msgid': 'DISK',
      'structured-data': '[disk@32473 dev="/dev/sda" state="fail\\]ed"]', 'msg': 'disk full',
      'syslogtag': 'smartd[4242]', 'programname': 'smartd'}),
    ({'message': 'Grüße aus Köln \u2014 \u6771\u4eac \u2713', 'severity': '3', 'facility': '4'},
     {'pri': '35', 'msg': 'Grüße aus Köln \u2014 \u6771\u4eac \u2713'}),
    ({'message': 'two\\nlines as Looper sends them', 'severity': 'bogus'},
     {'pri': '13', 'msg': 'two\\nlines as Looper sends them'}),
]


def check_fields(record, expected):
    for key, value in expected.items():
        assert record[key] == value, (key, record)


class TestSyslogOutRsyslog(object):

    def send_all(self, tmp, server, events, **keys):
        status, out, err = run_syslog_out(
            tmp, 'server=%s\nhostname=edge-7\nconfirm=yes\n%sconfigure\n%squit\n' % (
                server, ''.join('%s=%s\n' % kv for kv in keys.items()),
                ''.join(event_lines(e) for e in events)),
            env=dict(os.environ, TZ='IST-5:30'))
        assert (status, out) == (0, 'ok\n' * (len(events) + 1)), err
        return err

    def test_rfc5424_over_udp_tcp_and_relp_field_by_field(self, tmp, rsyslogd):
        daemon = rsyslogd()
        long_text = 'long \u00e9' + '\u00e9' * 6000
        events = [e for e, _ in EVENTS_5424] + [{'message': long_text}]
        inputs = (('udp', daemon.udp, 'imudp'), ('tcp', daemon.tcp, 'imtcp'),
                  ('relp', daemon.relp, 'imrelp'))
        for kind, port, _ in inputs:
            self.send_all(tmp, '%s:127.0.0.1:%d' % (kind, port), events)
        records = daemon.wait_records(len(events) * 3)
        assert len(records) == len(events) * 3
        for kind, port, name in inputs:
            got = [r for r in records if r['inputname'] == name]
            assert len(got) == len(events), records
            for record, (_, expected) in zip(got, EVENTS_5424):
                check_fields(record, expected)
                assert record['protocol-version'] == '1'
                # The module's local time (TZ=IST-5:30) with its offset, as sent.
                assert re.match(RFC3339 + '$', record['timereported']) and \
                    record['timereported'].endswith('+05:30'), record
                assert record['rawmsg'].split(' ')[1] == record['timereported']
            # The long one: cut at a character boundary to 8096 bytes in all.
            raw, msg = got[-1]['rawmsg'], got[-1]['msg']
            assert 8094 <= len(raw.encode()) <= 8096 and long_text.startswith(msg), kind
            assert len(msg) > 4000

    def test_rfc3164_over_udp_tcp_and_relp_field_by_field(self, tmp, rsyslogd):
        daemon = rsyslogd()
        events = [{'desc': 'plain 3164'},
                  {'message': 'hello 3164 \u2713', 'node': 'gw2', 'program': 'cron', 'pid': '77',
                   'severity': 'info', 'facility': 'cron'},
                  {'message': 'x' * 3000}]
        for kind, port in (('udp', daemon.udp), ('tcp', daemon.tcp), ('relp', daemon.relp)):
            self.send_all(tmp, '%s:127.0.0.1:%d' % (kind, port), events, format='rfc3164')
        records = daemon.wait_records(9)
        for name in ('imudp', 'imtcp', 'imrelp'):
            plain, full, long_one = [r for r in records if r['inputname'] == name]
            check_fields(plain, {'pri': '13', 'hostname': 'edge-7', 'syslogtag': 'looper:',
                                 'programname': 'looper', 'protocol-version': '0'})
            assert plain['msg'].strip() == 'plain 3164'
            assert re.match(r'<13>%s edge-7 looper: plain 3164$' % BSD_TIME, plain['rawmsg'])
            check_fields(full, {'pri': '78', 'syslogfacility-text': 'cron',
                                'syslogseverity-text': 'info', 'hostname': 'gw2',
                                'syslogtag': 'cron[77]:', 'programname': 'cron'})
            assert full['msg'].strip() == 'hello 3164 \u2713'
            assert len(long_one['rawmsg'].encode()) == 1024

    def test_unix_datagram_and_stream_sockets(self, tmp, rsyslogd):
        daemon = rsyslogd(unix_dgram=True, unix_stream=True)
        event = {'message': 'local \u2713', 'program': 'myapp', 'pid': '31', 'severity': 'warning',
                 'facility': 'daemon', 'node': 'not-sent'}
        self.send_all(tmp, 'unix:' + daemon.dgram, [event])
        self.send_all(tmp, 'unix:' + daemon.stream, [event, {'message': 'second line'}])
        records = daemon.wait_records(3)
        assert [r['inputname'] for r in records] == ['imuxsock', 'imptcp', 'imptcp']
        for record in records[:2]:
            check_fields(record, {'pri': '28', 'syslogtag': 'myapp[31]:', 'programname': 'myapp'})
            assert record['msg'].strip() == 'local \u2713'
            assert record['hostname'] != 'not-sent'
        assert records[2]['msg'].strip() == 'second line'

    def test_relp_rsyslogd_killed_and_restarted_during_20000_events(self, tmp, rsyslogd):
        daemon = rsyslogd()
        count = 20000
        py_module(tmp, 'src', COUNTER_IN)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = %s\n"
                           "input i {\n module = src\n count = %d\n}\n"
                           "output o {\n module = syslog_out\n server = relp:127.0.0.1:%d\n"
                           " confirm = yes\n retrydelay = 0.05\n reconnectdelay = 0.05\n"
                           " maxreconnectdelay = 0.5\n timeout = 5\n draintimeout = 300\n%s}\n"
                           % (MODULES, count, daemon.relp, FAST))
        looper = Looper(conf)
        try:
            daemon.wait_records(count // 4, timeout=120)
            daemon.kill()
            killed_at = daemon.count()
            looper.wait_log(r'RELP session with relp:127.0.0.1:\d+ ended')
            # Stay down until Looper has resent its window of 128 three
            # times (SIGUSR1 writes its counters), so that the module's
            # reconnection delays and Looper's retries both run.
            wait_until(lambda: looper_counters(looper).get('output.o.retried', 0) >= 3 * 128,
                       what='three retries of the window while rsyslogd is down')
            daemon.start()
            assert looper.wait(timeout=300) == 0, looper.log()
        finally:
            looper.stop()
        numbers = event_numbers(daemon.records())
        assert first_occurrences(numbers) == list(range(count))
        # At least once and in order: a message is repeated only when its
        # answer was lost with the connection, and the repeats follow at once.
        assert len(numbers) - count <= 200, len(numbers) - count
        c = counters(looper.log())
        assert c.get('output.o.confirmed', c.get('output.o.delivered')) == count, c
        assert c['output.o.lost'] == 0 and c['output.o.dropped'] == 0, c
        assert c.get('output.o.rejected', 0) == 0 and c['output.o.retried'] >= 1, c
        assert c['output.o.restarts'] == 0, c
        print('\nrsyslogd killed after %d of %d messages; %d repeated; %s' % (
            killed_at, count, len(numbers) - count,
            ' '.join('%s=%s' % kv for kv in sorted(c.items()) if kv[0].startswith('output.'))))

    def test_the_forward_example_sends_the_sample_alerts(self, tmp, rsyslogd):
        daemon = rsyslogd()
        text = read(os.path.join(EXAMPLES, 'forward.conf'))
        text, n = re.subn(r"server  = 'udp:127.0.0.1:5514'", "server = 'relp:127.0.0.1:%d'"
                          % daemon.relp, text)
        assert n == 1, 'the example no longer has the server line this test changes'
        text = text.replace("'rules/forward.rules'", repr(os.path.join(EXAMPLES, 'rules', 'forward.rules')))
        text = text.replace("'sample.log'", repr(os.path.join(EXAMPLES, 'sample.log')))
        p = run([config(tmp, text)])
        assert p.returncode == 0, p.stderr
        records = daemon.records()
        kernel = [r for r in records if r['app-name'] == 'kernel']
        assert len(kernel) == len(re.findall(r' kernel: .*(error|[Oo]ut of memory)',
                                             read(os.path.join(EXAMPLES, 'sample.log'))))
        assert all(r['syslogfacility-text'] == 'kern' and r['syslogseverity-text'] == 'crit'
                   for r in kernel), kernel
        assert any(r['hostname'] == 'prometheus' and 'Out of memory: Killed process 31337' in r['msg']
                   for r in kernel), kernel
        brute, = [r for r in records if r['msgid'] == 'SSHBRUTE']
        check_fields(brute, {'hostname': 'gw1', 'app-name': 'sshd', 'procid': '9204',
                             'syslogfacility-text': 'authpriv', 'syslogseverity-text': 'warning',
                             'msg': 'ssh brute force from 198.51.100.77: 3 failed passwords, '
                                    'the last for root'})
        assert len(records) == len(kernel) + 1

    def test_relp_with_a_window_of_128_through_a_sigkill_of_rsyslogd(self, tmp, rsyslogd):
        """What Looper with a confirmwindow of 128 will see: the module
        alone, driven go-back-N, while rsyslogd is killed and restarted."""
        daemon = rsyslogd()
        count = 20000
        m = SyslogOut(tmp, server='relp:127.0.0.1:%d' % daemon.relp, confirm='yes',
                      reconnectdelay='0.05', maxreconnectdelay='0.5', timeout='5')
        try:
            assert m.answers(1) == ['ok']
            driver = GoBackN(m, [{'n': str(i), 'msg': 'event %d' % i} for i in range(count)])
            driver.start()
            daemon.wait_records(count // 4, timeout=120)
            daemon.kill()
            killed_at = daemon.count()
            wait_until(lambda: driver.errors >= 3 * 128 or driver.failure, timeout=60,
                       what='errors while rsyslogd is down')
            daemon.start()
            driver.join(120)
            assert not driver.is_alive() and driver.failure is None, driver.failure
        finally:
            assert m.quit() == 0
        numbers = event_numbers(daemon.records())
        assert first_occurrences(numbers) == list(range(count))
        assert len(numbers) - count <= 128, len(numbers) - count
        assert driver.oks == count
        print('\nwindow of 128: rsyslogd killed after %d of %d messages; %d repeated; %d errors'
              % (killed_at, count, len(numbers) - count, driver.errors))


# Throughput: how many messages per second go through looper.py to a real
# rsyslogd, and through the module alone with a window of answers (what
# Looper's confirmwindow gives).  3000 messages by default, a smoke run; set
# SYSLOG_OUT_BENCH_EVENTS=20000 and run with -s to read the figures.
BENCH_EVENTS = int(os.environ.get('SYSLOG_OUT_BENCH_EVENTS', '3000'))


class TestSyslogOutThroughput(object):

    @pytest.mark.parametrize('kind,confirm', [('tcp', 'yes'), ('tcp', 'no'),
                                              ('relp', 'yes'), ('relp', 'no')])
    def test_throughput_through_looper(self, tmp, rsyslogd, kind, confirm):
        daemon = rsyslogd()
        py_module(tmp, 'src', COUNTER_IN)
        conf = config(tmp, "inputmodulepath = .\noutputmodulepath = %s\n"
                           "input i {\n module = src\n count = %d\n}\n"
                           "output o {\n module = syslog_out\n server = %s:127.0.0.1:%d\n"
                           " confirm = %s\n draintimeout = 300\n}\n"
                           % (MODULES, BENCH_EVENTS, kind,
                              daemon.tcp if kind == 'tcp' else daemon.relp, confirm))
        start = time.monotonic()
        looper = Looper(conf)
        try:
            assert looper.wait(timeout=300) == 0, looper.log()
            daemon.wait_records(BENCH_EVENTS)
        finally:
            looper.stop()
        elapsed = time.monotonic() - start
        assert event_numbers(daemon.records()) == list(range(BENCH_EVENTS))
        print('\nlooper.py -> syslog_out %s confirm=%s -> rsyslogd: %d messages in %.2f s: '
              '%.0f messages/s' % (kind, confirm, BENCH_EVENTS, elapsed, BENCH_EVENTS / elapsed))

    @pytest.mark.parametrize('kind', ['tcp', 'relp'])
    def test_throughput_of_the_module_with_a_window_of_128(self, tmp, rsyslogd, kind):
        daemon = rsyslogd()
        m = SyslogOut(tmp, server='%s:127.0.0.1:%d' % (kind, daemon.tcp if kind == 'tcp'
                                                       else daemon.relp), confirm='yes')
        try:
            assert m.answers(1) == ['ok']
            start = time.monotonic()
            sent = answered = 0
            while answered < BENCH_EVENTS:
                room = min(128 - (sent - answered), BENCH_EVENTS - sent)
                if room:
                    m.send(*[{'n': str(i), 'msg': 'event %d' % i} for i in range(sent, sent + room)])
                    sent += room
                got = m.answers(1)
                while not m.lines.empty() and len(got) < sent - answered:
                    got.append(m.lines.get())
                assert got == ['ok'] * len(got), got
                answered += len(got)
            elapsed = time.monotonic() - start
            daemon.wait_records(BENCH_EVENTS)
        finally:
            assert m.quit() == 0
        assert event_numbers(daemon.records()) == list(range(BENCH_EVENTS))
        print('\nsyslog_out %s with 128 answers outstanding -> rsyslogd: %d messages in %.2f s: '
              '%.0f messages/s' % (kind, BENCH_EVENTS, elapsed, BENCH_EVENTS / elapsed))
