"""Tests for socket_in and socket_out (Looper to Looper), to be merged into
test_looper.py.

First each module alone, driven as Looper drives it (config, `configure`,
events, `ok` acks on socket_in's stdin), against hand-driven peers and
against each other; then through looper.py: two edge Loopers into one
central Looper, whose Looper is SIGKILLed twice during a 20,000-event
stream; the same with TLS (certificates made with the openssl command in
the test's directory), and a client certificate from another CA refused.

Run:  python3 -m pytest -q test_wip_sockets.py
"""
import collections
import json
import os
import random
import re
import select
import signal
import socket
import ssl
import subprocess
import time

import pytest

from test_looper import (wait_until, need, write, config, read, Looper, counters,
                         py_module, RECORDER, recorded, children_of, alive, PY, HERE,
                         MODULES, EXAMPLES, FAST, DEADLINE, tmp)  # noqa: F401 (tmp: fixture)

SOCKET_IN = os.path.join(MODULES, 'socket_in')
SOCKET_OUT = os.path.join(MODULES, 'socket_out')


##############################################################################
# Helpers for the socket tests
##############################################################################

def free_tcp_port(host='127.0.0.1'):
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_events(data):
    """Protocol bytes -> list of dicts, complete events only (up to the last go)."""
    end = data.rfind(b'\ngo\n')
    if data.startswith(b'go\n') and end < 0:
        end = -1
    events, current = [], {}
    for line in data[:end + 4].decode('utf-8', 'surrogateescape').split('\n') if end >= -1 else []:
        if line == 'go':
            events.append(current)
            current = {}
        elif line:
            token, sep, value = line.partition('=')
            assert sep, 'not token=value: %r' % line
            current[token] = value
    return events


def protocol(pairs):
    return ''.join('%s=%s\n' % kv for kv in pairs) + 'go\n'


class Mod(object):
    """A module started as Looper starts it, its stdout and stderr gathered
    without threads (pump() takes what is there).  `configure` ends the
    configuration unless told otherwise; stdin stays open unless close."""

    def __init__(self, module, directory, keys, configure=True, close=False, env=None):
        self.proc = subprocess.Popen([PY, module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=directory, env=env)
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
        self.out = bytearray()
        self.err = bytearray()
        self.send(''.join('%s=%s\n' % kv for kv in keys.items()) +
                  ('configure\n' if configure else ''))
        if close:
            self.proc.stdin.close()

    def send(self, text):
        self.proc.stdin.write(text.encode('utf-8', 'surrogateescape') if isinstance(text, str)
                              else text)
        self.proc.stdin.flush()

    def pump(self):
        for name, f in (('out', self.proc.stdout), ('err', self.proc.stderr)):
            while not f.closed:
                try:
                    chunk = os.read(f.fileno(), 1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                getattr(self, name).extend(chunk)

    def log(self):
        self.pump()
        return self.err.decode('utf-8', 'replace')

    def wait_log(self, pattern, count=1, timeout=DEADLINE):
        return wait_until(lambda: len(re.findall(pattern, self.log())) >= count and self.log(),
                          timeout, 'log line %r (x%d); log so far:\n%s' % (pattern, count, self.log()))

    def events(self):
        self.pump()
        return parse_events(self.out)

    def wait_events(self, count, timeout=DEADLINE):
        return wait_until(lambda: len(self.events()) >= count and self.events(), timeout,
                          '%d events (have %d; log %s)' % (count, len(self.events()), self.log()))

    def replies(self):
        self.pump()
        return self.out.decode().splitlines()

    def wait_replies(self, count, timeout=DEADLINE):
        return wait_until(lambda: len(self.replies()) >= count and self.replies(), timeout,
                          '%d replies (have %r; log %s)' % (count, self.replies(), self.log()))

    def wait_exit(self, timeout=DEADLINE):
        code = self.proc.wait(timeout)
        self.pump()
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except (OSError, ValueError):
                pass


def start_socket_in(directory, stoppers, ack=True, **keys):
    """socket_in listening on a free port (unless listen is given):
    (the module, the port)."""
    port = None
    if 'listen' not in keys:
        port = free_tcp_port()
        keys['listen'] = '127.0.0.1:%d' % port
    keys['ack'] = 'yes' if ack else 'no'
    mod = Mod(SOCKET_IN, directory, keys, configure=ack, close=not ack)
    stoppers.append(mod)
    mod.wait_log('listening on')
    return mod, port


def start_socket_out(directory, stoppers, port, **keys):
    if 'server' not in keys:
        keys['server'] = '127.0.0.1:%d' % port
    keys.setdefault('confirm', 'yes')
    mod = Mod(SOCKET_OUT, directory, keys)
    stoppers.append(mod)
    if keys['confirm'] == 'yes':
        assert mod.wait_replies(1) == ['ok']
    return mod


class Wire(object):
    """One end of a connection driven by the test: lines and events."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(DEADLINE)
        self.buf = b''

    def send(self, text):
        self.sock.sendall(text.encode('utf-8', 'surrogateescape') if isinstance(text, str)
                          else text)

    def line(self, timeout=DEADLINE):
        """The next line, or None at the end of the connection."""
        self.sock.settimeout(timeout)
        while b'\n' not in self.buf:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b''
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b'\n')
        return line.decode('utf-8', 'surrogateescape')

    def event(self):
        tokens = {}
        while True:
            line = self.line()
            assert line is not None, 'the connection ended inside an event'
            if line == 'go':
                return tokens
            token, _, value = line.partition('=')
            tokens[token] = value

    def closed(self, timeout=DEADLINE):
        """True once the far end has closed (whatever it sent first is kept)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True
            if not data:
                return True
            self.buf += data
        return False

    def stop(self):
        try:
            self.sock.close()
        except OSError:
            pass


def sender(port, stoppers, hello=True, context=None, ack='yes'):
    """A hand-driven socket_out: connected, hello said and answered."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=DEADLINE)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname='localhost')
    wire = Wire(sock)
    stoppers.append(wire)
    if hello:
        wire.send('hello looper-socket 1\n')
        assert wire.line() == 'hello looper-socket 1 ack=%s' % ack
    return wire


class FakeServer(object):
    """A hand-driven socket_in: a listener whose connections the test accepts."""

    def __init__(self, stoppers):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        stoppers.append(self)

    def accept(self, hello='hello looper-socket 1 ack=yes', timeout=DEADLINE):
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        wire = Wire(conn)
        assert wire.line() == 'hello looper-socket 1'
        if hello:
            wire.send(hello + '\n')
        return wire

    def stop(self):
        self.sock.close()


@pytest.fixture
def stoppers():
    """Things with a stop() method, stopped at the end of the test even when it fails."""
    items = []
    yield items
    for item in reversed(items):
        item.stop()


def stopped_counts(log):
    """The counters of a module's last 'stopped:' line, as a dict of ints."""
    lines = [line for line in log.splitlines() if ': stopped: ' in line]
    assert lines, 'no stopped line in:\n' + log
    return dict((k, int(v)) for k, v in re.findall(r'(\w+)=(\d+)', lines[-1]))


def load(path):
    """A module's functions, for unit tests (the files have no .py suffix)."""
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader(os.path.basename(path) + '_mod', path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_certs(directory):
    """A CA, a server certificate (localhost, 127.0.0.1, ::1), a client
    certificate (CN=edge1), and a second CA with its own client (CN=intruder),
    made with the openssl command: EC P-256 keys, valid two days, with the
    extensions Python 3.13's strict verification wants (critical
    basicConstraints and keyUsage on the CAs, key identifiers on all)."""
    openssl = need('openssl')

    def run(*args):
        p = subprocess.run([openssl] + list(args), cwd=directory, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=DEADLINE)
        assert p.returncode == 0, p.stderr.decode()

    key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
    leaf = ('authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n'
            'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n')
    write(os.path.join(directory, 'server.ext'),
          leaf + 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n')
    write(os.path.join(directory, 'client.ext'), leaf + 'extendedKeyUsage=clientAuth\n')
    for ca in ('ca', 'otherca'):
        run('req', '-x509', *(key + ['-keyout', ca + '.key', '-out', ca + '.pem', '-days', '2',
                                     '-subj', '/CN=Looper test %s' % ca,
                                     '-addext', 'basicConstraints=critical,CA:TRUE',
                                     '-addext', 'keyUsage=critical,keyCertSign,cRLSign']))
    for name, cn, ca, ext in (('server', 'localhost', 'ca', 'server.ext'),
                              ('client', 'edge1', 'ca', 'client.ext'),
                              ('intruder', 'intruder', 'otherca', 'client.ext')):
        run('req', *(key + ['-keyout', name + '.key', '-out', name + '.csr', '-subj', '/CN=' + cn]))
        run('x509', '-req', '-in', name + '.csr', '-CA', ca + '.pem', '-CAkey', ca + '.key',
            '-CAcreateserial', '-out', name + '.pem', '-days', '2', '-extfile', ext)
    return dict((name, os.path.join(directory, name)) for name in (
        'ca.pem', 'otherca.pem', 'server.pem', 'server.key', 'client.pem', 'client.key',
        'intruder.pem', 'intruder.key'))


def client_context(certs, cert='client'):
    context = ssl.create_default_context(cafile=certs['ca.pem'])
    if cert:
        context.load_cert_chain(certs[cert + '.pem'], certs[cert + '.key'])
    return context


def assert_at_least_once_in_order(numbers, count, what='events'):
    """Every number 0..count-1 arrived, and each for the first time right
    after all smaller ones: resends after a break go back, never skip ahead."""
    top = -1
    for i, n in enumerate(numbers):
        assert n <= top + 1, '%s out of order at %d: %d after %d' % (what, i, n, top)
        top = max(top, n)
    assert top == count - 1 and len(set(numbers)) == count, \
        '%s: %d distinct of %d' % (what, len(set(numbers)), count)


##############################################################################
# socket_in on its own
##############################################################################

class TestSocketIn(object):

    def test_events_reach_looper_and_each_ok_is_relayed_to_its_sender(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers)
        a = sender(port, stoppers)
        b = sender(port, stoppers)
        a.send(protocol([('n', '1'), ('msg', 'a = b \\n c')]) + protocol([('n', '2')]))
        mod.wait_events(2)
        b.send(protocol([('n', 'b1')]))
        mod.wait_events(3)
        a.send(protocol([('n', '3')]))
        events = mod.wait_events(4)
        assert events == [{'n': '1', 'msg': 'a = b \\n c'}, {'n': '2'}, {'n': 'b1'}, {'n': '3'}]
        # Nothing is confirmed before Looper's ok.
        assert a.buf == b'' and b.buf == b''
        mod.send('ok\n')
        assert a.line() == 'ok 1'
        mod.send('ok\n')
        assert a.line() == 'ok 2'
        mod.send('ok\n')
        assert b.line() == 'ok 1'
        mod.send('ok\n')
        assert a.line() == 'ok 3'
        # Many oks at once: one cumulative answer (or several, in order).
        a.send(''.join(protocol([('n', str(i))]) for i in range(4, 104)))
        mod.wait_events(104)
        mod.send('ok\n' * 100)
        last = 0
        while last < 103:
            line = a.line()
            assert line.startswith('ok '), line
            assert int(line[3:]) > last
            last = int(line[3:])
        assert last == 103
        assert mod.proc.poll() is None

    def test_bytes_pass_through_unchanged(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers, ack=False)
        a = sender(port, stoppers, ack='no')
        data = (b'utf8=\xc3\xa9t\xc3\xa9\nlatin1=caf\xe9\nnul=a\x00b\nempty=\n'
                b'eq=a=b=c\nback=C:\\path\\n\ngo\n')
        a.send(data)
        assert a.line() == 'ok 1'
        wait_until(lambda: mod.pump() or mod.out == data, what='the event as sent')

    def test_without_ack_an_event_is_confirmed_once_in_the_pipe(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers, ack=False)
        a = sender(port, stoppers, ack='no')
        a.send(protocol([('n', '1')]) + protocol([('n', '2')]))
        got = [a.line()]
        if got != ['ok 2']:
            got.append(a.line())
        assert got[-1] == 'ok 2'
        assert mod.wait_events(2) == [{'n': '1'}, {'n': '2'}]

    def test_orphans_exit_and_free_the_port(self, tmp, stoppers):
        # With ack: the end of stdin means Looper is gone.
        mod, port = start_socket_in(tmp, stoppers)
        a = sender(port, stoppers)
        mod.proc.stdin.close()
        assert mod.wait_exit(5) == 0
        assert 'Looper is gone' in mod.log()
        assert a.closed()
        again, _ = start_socket_in(tmp, stoppers, listen='127.0.0.1:%d' % port)
        # Without ack: our stdout's reader gone (checked every second).
        r, w = os.pipe()
        p = subprocess.Popen([PY, SOCKET_IN], stdin=subprocess.PIPE, stdout=w,
                             stderr=subprocess.PIPE)
        os.close(w)
        try:
            port2 = free_tcp_port()
            p.stdin.write(b'listen=127.0.0.1:%d\nack=no\n' % port2)
            p.stdin.close()
            wait_until(lambda: socket.socket().connect_ex(('127.0.0.1', port2)) == 0,
                       what='socket_in listening')
            started = time.monotonic()
            os.close(r)
            assert p.wait(5) == 0
            assert time.monotonic() - started < 3
            assert b'our stdout has no reader' in p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()
        again.stop()

    def test_another_protocol_version_or_not_a_sender_is_refused_clearly(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers)
        a = sender(port, stoppers, hello=False)
        a.send('hello looper-socket 2\nn=1\ngo\n')
        assert a.line() == 'refused this socket_in speaks looper-socket version 1, not 2'
        assert a.closed()
        mod.wait_log(r'refused 127\.0\.0\.1:\d+: it speaks looper-socket version 2, '
                     r'this socket_in version 1')
        b = sender(port, stoppers, hello=False)
        b.send('GET / HTTP/1.0\r\n\r\n')
        assert b.line() == 'refused expected "hello looper-socket 1"'
        assert b.closed()
        mod.wait_log(r"not a socket_out \(its first line was b'GET / HTTP/1.0\\r'\)")
        c = sender(port, stoppers)
        c.send('n=1\ngo\nconfigure\nn=2\ngo\n')
        assert c.closed()
        mod.wait_log(r"a line that is neither token=value nor go: b'configure'")
        assert mod.wait_events(1) == [{'n': '1'}]
        mod.proc.send_signal(signal.SIGTERM)
        mod.wait_exit()
        assert stopped_counts(mod.log())['refused_protocol'] == 3

    def test_allow_refuses_other_networks(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers, allow='10.0.0.0/8, 192.168.0.0/16')
        a = sender(port, stoppers, hello=False)
        assert a.closed()
        mod.wait_log(r'refused a connection from 127\.0\.0\.1:\d+: not in allow \(1 refused so far\)')
        assert mod.events() == []
        ok, port2 = start_socket_in(tmp, stoppers, allow='10.0.0.0/8 127.0.0.1/32')
        b = sender(port2, stoppers)
        b.send(protocol([('n', '1')]))
        assert ok.wait_events(1) == [{'n': '1'}]

    def test_several_listeners_feed_one_looper(self, tmp, stoppers):
        ports = [free_tcp_port(), free_tcp_port()]
        mod, _ = start_socket_in(tmp, stoppers, listen='127.0.0.1:%d, 127.0.0.1:%d' % tuple(ports))
        mod.wait_log('listening on 127.0.0.1:%d' % ports[1])
        for i, port in enumerate(ports):
            sender(port, stoppers).send(protocol([('n', str(i))]))
            mod.wait_events(i + 1)
        assert mod.events() == [{'n': '0'}, {'n': '1'}]

    def test_allow_matches_networks_and_ipv4_mapped_addresses(self):
        m = load(SOCKET_IN)
        nets = m.parse_allow('10.0.0.0/8 ::1/128,192.168.1.7')
        assert m.allowed(nets, '10.1.2.3') and m.allowed(nets, '::1')
        assert m.allowed(nets, '::ffff:10.9.9.9') and m.allowed(nets, '192.168.1.7')
        assert not m.allowed(nets, '192.168.1.8') and not m.allowed(nets, '11.0.0.1')
        assert not m.allowed(nets, 'fe80::1%eth0') and not m.allowed(nets, 'junk')
        with pytest.raises(m.ConfigError):
            m.parse_allow('10.0.0.0/33')
        assert m.parse_address('[::1]:5170', 'listen') == ('::1', 5170)
        assert m.parse_address('gw.example.org:5170', 'listen') == ('gw.example.org', 5170)
        for bad in ('::1:5170', '127.0.0.1', ':5170', '127.0.0.1:99999', '[::1]5170'):
            with pytest.raises(m.ConfigError):
                m.parse_address(bad, 'listen')

    def test_ipv6_listener(self, tmp, stoppers):
        try:
            port = free_tcp_port('::1')
        except OSError:
            pytest.skip('no IPv6 loopback here')
        mod, _ = start_socket_in(tmp, stoppers, listen='[::1]:%d' % port)
        assert re.search(r'listening on \[::1\]:%d' % port, mod.log())
        out = start_socket_out(tmp, stoppers, None, server='[::1]:%d' % port)
        out.send(protocol([('n', '6')]))
        assert mod.wait_events(1) == [{'n': '6'}]
        mod.send('ok\n')
        assert out.wait_replies(2) == ['ok', 'ok']

    def test_maxconnections_refuses_one_more(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers, maxconnections='2')
        sender(port, stoppers)
        sender(port, stoppers)
        c = sender(port, stoppers, hello=False)
        assert c.closed()
        mod.wait_log(r'refused a connection from 127\.0\.0\.1:\d+: already 2 connections '
                     r'\(maxconnections; 1 refused so far\)')
        mod.proc.send_signal(signal.SIGTERM)
        mod.wait_exit()
        counts = stopped_counts(mod.log())
        assert counts['connections'] == 2 and counts['refused_limit'] == 1

    def test_a_staller_or_a_silent_sender_is_closed_and_never_stalls_the_others(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers, idletimeout='0.5', ack=False)
        half = sender(port, stoppers, ack='no')
        half.send('n=1\nmsg=half an ev')         # no newline, no go: then nothing
        silent = sender(port, stoppers, ack='no')
        good = sender(port, stoppers, ack='no')
        started = time.monotonic()
        for i in range(20):
            good.send(protocol([('n', str(i))]))
            line = good.line()
            assert line == 'ok %d' % (i + 1), line
        assert time.monotonic() - started < 5
        assert half.closed(5) and silent.closed(5)
        mod.wait_log(r'closed: no complete event for 0\.5 s \(idletimeout\)', count=2)
        assert [e['n'] for e in mod.events()] == [str(i) for i in range(20)]
        # A sender that never says hello gets HANDSHAKE_TIMEOUT, not idletimeout:
        # shown by its connection staying open past idletimeout.
        mute = sender(port, stoppers, hello=False)
        assert not mute.closed(1.0)
        mod.proc.send_signal(signal.SIGTERM)
        mod.wait_exit()
        assert stopped_counts(mod.log())['idle_closed'] >= 2

    def test_oversized_lines_and_events_are_rejected_and_memory_stays_bounded(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers, maxline='100', maxeventsize='300')
        a = sender(port, stoppers)
        a.send(protocol([('n', '1'), ('big', 'x' * 200)]))           # a line over maxline
        a.send(protocol([('n', '2')]))
        a.send(protocol([('n', '3')] + [('t%d' % i, 'y' * 50) for i in range(10)]))  # event > 300
        a.send('n=4\nhuge=' + 'z' * 100000)                           # over many reads ...
        a.send('z' * 100000 + '\ngo\n')                               # ... then its end
        a.send(protocol([('n', '5')]))
        assert a.line() == 'reject 1 a line over 100 bytes (maxline)'
        mod.wait_events(2)
        assert mod.events() == [{'n': '2'}, {'n': '5'}]
        mod.send('ok\n')
        assert a.line() == 'ok 2'
        assert a.line() == 'reject 3 an event over 300 bytes (maxeventsize)'
        assert a.line() == 'reject 4 a line over 100 bytes (maxline)'
        mod.send('ok\n')
        assert a.line() == 'ok 5'
        mod.wait_log(r'refused event 1 from 127\.0\.0\.1:\d+: a line over 100 bytes \(maxline\) '
                     r'\(1 refused so far\)')
        mod.proc.send_signal(signal.SIGTERM)
        mod.wait_exit()
        assert stopped_counts(mod.log())['refused_events'] == 3

    def test_a_slow_looper_pauses_reading_and_loses_nothing(self, tmp, stoppers):
        """The test does not read socket_in's stdout at first: the pipe fills,
        socket_in stops reading the sender (which blocks) with bounded memory,
        then catches up once the test reads."""
        mod, port = start_socket_in(tmp, stoppers, ack=False)
        a = sender(port, stoppers, ack='no')
        body = 'x' * 10000
        total = 2000            # 20 MB: more than the pipe, OUT_HIGH and the socket buffers
        data = ''.join(protocol([('n', str(i)), ('body', body)]) for i in range(total))
        a.sock.settimeout(0.5)
        sent = 0
        view = data.encode()
        try:
            while sent < len(view):
                sent += a.sock.send(view[sent:])
        except socket.timeout:
            pass
        assert sent < len(view), 'socket_in kept reading with no room in its pipe'
        rss = int(re.search(r'VmRSS:\s+(\d+)', read('/proc/%d/status' % mod.proc.pid)).group(1))
        assert rss < 40000, 'socket_in holds %d kB' % rss
        a.sock.setblocking(False)
        deadline = time.monotonic() + DEADLINE
        while len(mod.out) < len(view):
            assert time.monotonic() < deadline, 'timed out: %d bytes' % len(mod.out)
            select.select([mod.proc.stdout], [a.sock] if sent < len(view) else [], [], 0.1)
            if sent < len(view):
                try:
                    sent += a.sock.send(view[sent:])
                except BlockingIOError:
                    pass
            mod.pump()
        assert mod.out == view                    # every event, in order, unchanged

    def test_configuration_errors_exit_78(self, tmp, stoppers):
        cases = [
            ({}, 'no listen configured'),
            ({'listen': '127.0.0.1'}, "listen: '127.0.0.1' is not HOST:PORT"),
            ({'listen': '127.0.0.1:0', 'allow': 'lan'}, "allow: 'lan' is not a network"),
            ({'listen': '127.0.0.1:0', 'tls': 'yes'}, 'tls = yes needs certfile'),
            ({'listen': '127.0.0.1:0', 'tls': 'yes', 'certfile': 'nosuch.pem'},
             "cannot load certfile 'nosuch.pem'"),
            ({'listen': '127.0.0.1:0', 'cafile': 'ca.pem'}, 'cafile is set but tls is not'),
            ({'listen': '127.0.0.1:0', 'maxconnections': 'many'}, 'maxconnections must be'),
            ({'listen': '192.0.2.1:5170'}, 'cannot listen on 192.0.2.1:5170'),
        ]
        for keys, message in cases:
            keys.setdefault('ack', 'no')
            mod = Mod(SOCKET_IN, tmp, keys, configure=False, close=True)
            stoppers.append(mod)
            assert mod.wait_exit() == 78, (keys, mod.log())
            assert message in mod.log(), (keys, mod.log())
        # ack = yes under a looper.py that closes stdin without `configure`.
        mod = Mod(SOCKET_IN, tmp, {'listen': '127.0.0.1:0', 'ack': 'yes'}, configure=False,
                  close=True)
        stoppers.append(mod)
        assert mod.wait_exit() == 78
        assert "ack = yes, but stdin ended without 'configure'" in mod.log()

    def test_a_port_in_use_exits_1_so_looper_retries(self, tmp, stoppers):
        mod, port = start_socket_in(tmp, stoppers)
        other = Mod(SOCKET_IN, tmp, {'listen': '127.0.0.1:%d' % port, 'ack': 'yes'})
        stoppers.append(other)
        assert other.wait_exit() == 1
        assert 'cannot listen on 127.0.0.1:%d: the address is in use' % port in other.log()

    def test_help_prints_the_documentation_and_starts_nothing(self):
        for module in (SOCKET_IN, SOCKET_OUT):
            p = subprocess.run([PY, module, '--help'], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=DEADLINE, stdin=subprocess.DEVNULL)
            assert p.returncode == 0 and p.stderr == b''
            text = p.stdout.decode()
            for key in ('listen', 'allow', 'maxconnections', 'idletimeout', 'maxline',
                        'maxeventsize') if module == SOCKET_IN else (
                        'server', 'checkhostname', 'acktimeout', 'maxreconnectdelay'):
                assert '\n  %s ' % key in text, key

    def test_tls_with_client_certificates(self, tmp, stoppers):
        certs = make_certs(tmp)
        mod, port = start_socket_in(tmp, stoppers, tls='yes', certfile=certs['server.pem'],
                                    keyfile=certs['server.key'], cafile=certs['ca.pem'])
        assert re.search(r'listening on 127\.0\.0\.1:\d+ \(TLS\)', mod.log())
        a = sender(port, stoppers, context=client_context(certs))
        a.send(protocol([('n', '1')]))
        assert mod.wait_events(1) == [{'n': '1'}]
        mod.send('ok\n')
        assert a.line() == 'ok 1'
        mod.wait_log(r'connection from 127\.0\.0\.1:\d+ \(TLSv1\.[23], client certificate CN=edge1\)')
        # A certificate from another CA, none at all, or no TLS: refused, no event.
        for cert in ('intruder', None):
            try:
                bad = sender(port, stoppers, context=client_context(certs, cert), hello=False)
                bad.send('hello looper-socket 1\nn=bad\ngo\n')
                assert bad.line() is None
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                pass                                # refused during the handshake
        plain = sender(port, stoppers, hello=False)
        plain.send('hello looper-socket 1\nn=plain\ngo\n')
        assert plain.closed()
        mod.wait_log(r'refused a connection from 127\.0\.0\.1:\d+: TLS handshake failed: '
                     r'CERTIFICATE_VERIFY_FAILED')
        # (One line per 10 s for each kind of refusal: the others are counted.)
        mod.proc.send_signal(signal.SIGTERM)
        mod.wait_exit()
        assert mod.events() == [{'n': '1'}]
        assert stopped_counts(mod.log())['refused_tls'] == 3


##############################################################################
# The wire codec, in-process: round trips and fuzz
##############################################################################

class _Stub(object):
    """Stands in for a selector, a socket or a server in codec tests."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def codec_modules():
    """socket_in and socket_out loaded, their say() silenced."""
    mods = load(SOCKET_IN), load(SOCKET_OUT)
    for m in mods:
        m.say = lambda *args, **kwargs: None
    return mods


def stub_connection(socket_in, maxline=100, maxevent=1000):
    """A socket_in Connection past its hello, on stubs; emitted events and
    the bytes it answers are collected."""
    server = _Stub(maxline=maxline, maxevent=maxevent, now=0.0, ack=True, tls=None, paused=False,
                   dirty=set(), counts=collections.defaultdict(int), emitted=[], connections=set(),
                   selector=_Stub(), throttle=lambda *args, **kwargs: None)
    server.count = lambda name: server.counts.__setitem__(name, server.counts[name] + 1)
    server.emit = lambda conn, entry, data: server.emitted.append((entry, data))
    sent = []
    sock = _Stub(send=lambda data: sent.append(bytes(data)) or len(data), fileno=lambda: 99)
    conn = socket_in.Connection(server, sock, 'test:1', 'test')
    conn.feed(b'hello looper-socket 1\n')
    assert conn.state == 'ready'
    return conn, server, sent


def random_value(rng):
    alphabet = ['a', 'Z', '0', ' ', '=', '\\', '\\n', '\u00e9', '\udce9', '\t', '"', 'go']
    return ''.join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


class TestSocketCodec(object):

    def test_what_socket_out_sends_socket_in_writes_unchanged(self):
        socket_in, socket_out = codec_modules()
        rng = random.Random(7)
        sender_ = socket_out.Sender({'server': '127.0.0.1:1'}, True)
        sender_.state = 'ready'
        sender_.sock = _Stub(send=lambda data: 0, fileno=lambda: 98)
        events = [[('t%d' % j, random_value(rng)) for j in range(rng.randrange(1, 6))]
                  for _ in range(2000)]
        sender_.take(events)
        wire = sender_.out
        expected = b''.join((''.join('%s=%s\n' % p for p in e) + 'go\n').encode(
            'utf-8', 'surrogateescape') for e in events)
        assert wire == expected
        conn, server, _ = stub_connection(socket_in, maxline=1000, maxevent=10000)
        for k in range(0, len(wire), 777):          # split anywhere
            conn.feed(wire[k:k + 777])
        assert b''.join(data for _, data in server.emitted) == expected
        assert [entry[0] for entry, _ in server.emitted] == list(range(1, 2001))

    def test_socket_in_never_dies_on_random_and_mutated_input(self):
        socket_in, _ = codec_modules()
        rng = random.Random(11)
        good = b''.join(b'n=%d\nmsg=some text %d\ngo\n' % (i, i) for i in range(20))
        for trial in range(3000):
            conn, server, sent = stub_connection(socket_in)
            data = bytearray(good)
            for _ in range(rng.randrange(1, 8)):
                k = rng.randrange(len(data))
                op = rng.randrange(4)
                if op == 0:
                    data[k] = rng.randrange(256)
                elif op == 1:
                    del data[k:k + rng.randrange(1, 20)]
                elif op == 2:
                    data[k:k] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                else:
                    data[k:k] = b'x' * rng.randrange(50, 400)        # long lines
            if trial % 10 == 0:
                data = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 500)))
            pos = 0
            while pos < len(data) and not conn.closed:
                step = rng.randrange(1, 64)
                conn.feed(bytes(data[pos:pos + step]))
                pos += step
            for entry, event in server.emitted:       # what reached Looper is well formed
                lines = event.split(b'\n')
                assert lines[-2:] == [b'go', b''], event
                for line in lines[:-2]:
                    assert line.find(b'=') > 0 and len(line) <= 100, event
                assert len(event) <= 1000 + 3
            numbers = [entry[0] for entry in conn.awaiting]
            assert numbers == list(range(1, len(numbers) + 1))

    def test_socket_out_never_dies_on_random_answers(self):
        _, socket_out = codec_modules()
        rng = random.Random(5)
        answers = [b'ok 1\n', b'ok 3\n', b'reject 2 too big\n', b'ok 99\n', b'ok -1\n', b'ok\n',
                   b'error 1 x\n', b'\xff\xfe\n', b'ok 2', b'\n', b'reject x\n', b'ok 4\nok 5\n']
        for trial in range(2000):
            sender_ = socket_out.Sender({'server': '127.0.0.1:1', 'reconnectdelay': '1'}, True)
            sender_.state = 'ready'
            sender_.sock = _Stub(send=lambda data: len(data), fileno=lambda: 98)
            sender_.take([[('n', str(i))] for i in range(5)])
            data = b''.join(rng.choice(answers) for _ in range(rng.randrange(1, 6)))
            if trial % 10 == 0:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            for k in range(0, len(data), 7):
                if sender_.state != 'ready':
                    break
                sender_.feed(data[k:k + 7])
            replies = sender_.replies
            kinds = [r.split(' ', 1)[0] for r in replies]
            assert set(kinds) <= {'ok', 'reject', 'error'}, replies
            assert len(replies) + sender_.pending() == 5, (replies, sender_.pending())
            if 'error' in kinds:                     # a break answers every later event error
                assert all(k == 'error' for k in kinds[kinds.index('error'):]) and \
                    not sender_.pending()


##############################################################################
# socket_out on its own
##############################################################################

class TestSocketOut(object):

    def test_ok_only_when_the_far_looper_says_so_with_a_window(self, tmp, stoppers):
        central, port = start_socket_in(tmp, stoppers)
        out = start_socket_out(tmp, stoppers, port)
        out.wait_log(r'connected to 127\.0\.0\.1:%d' % port)
        data = b''.join(b'n=%d\nmsg=\xc3\xa9v\xe9nement \\n %d\ngo\n' % (i, i) for i in range(5))
        out.send(data)
        central.wait_events(5)
        assert central.out == data                  # every byte as Looper sent it
        assert out.replies() == ['ok']              # nothing confirmed yet
        central.send('ok\nok\n')
        out.wait_replies(3)
        central.send('ok\nok\nok\n')
        assert out.wait_replies(6) == ['ok'] * 6
        assert out.proc.poll() is None
        out.send('quit\n')
        assert out.wait_exit() == 0
        counts = stopped_counts(out.log())
        assert counts['sent'] == 5 and counts['acknowledged'] == 5 and counts['errors'] == 0

    def test_a_broken_connection_answers_error_for_every_event_in_flight(self, tmp, stoppers):
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port, reconnectdelay='0.05',
                               maxreconnectdelay='0.05')
        wire = server.accept()
        out.send(protocol([('n', '1')]) + protocol([('n', '2')]) + protocol([('n', '3')]))
        assert [wire.event() for _ in range(3)] == [{'n': '1'}, {'n': '2'}, {'n': '3'}]
        wire.send('ok 1\n')
        out.wait_replies(2)
        wire.stop()                                 # events 2 and 3 are in flight
        replies = out.wait_replies(4)
        assert replies[1] == 'ok'
        assert replies[2:] == ['error connection to 127.0.0.1:%d lost: 127.0.0.1:%d closed '
                               'the connection' % (server.port, server.port)] * 2
        out.wait_log(r'connection to 127\.0\.0\.1:\d+ lost: .*; 2 events in flight answered '
                     r'error \(Looper sends them again\); reconnecting in 0\.05 s')
        # Looper resends them; they wait for the next connection, numbered from 1.
        out.send(protocol([('n', '2')]) + protocol([('n', '3')]))
        wire = server.accept()
        assert [wire.event() for _ in range(2)] == [{'n': '2'}, {'n': '3'}]
        wire.send('ok 2\n')
        assert out.wait_replies(6)[4:] == ['ok', 'ok']

    def test_reject_from_the_far_end_is_answered_reject(self, tmp, stoppers):
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port)
        wire = server.accept()
        out.send(protocol([('n', '1')]) + protocol([('n', '2')]) + protocol([('n', '3')]))
        [wire.event() for _ in range(3)]
        wire.send('ok 1\nreject 2 an event over 300 bytes (maxeventsize)\nok 3\n')
        assert out.wait_replies(4) == [
            'ok', 'ok', 'reject 127.0.0.1:%d: an event over 300 bytes (maxeventsize)'
            % server.port, 'ok']

    def test_no_acknowledgement_within_acktimeout_reconnects(self, tmp, stoppers):
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port, acktimeout='0.5',
                               reconnectdelay='0.05')
        wire = server.accept()
        started = time.monotonic()
        out.send(protocol([('n', '1')]))
        wire.event()
        replies = out.wait_replies(2)
        assert 0.4 < time.monotonic() - started < 5
        assert replies[1] == ('error connection to 127.0.0.1:%d lost: no acknowledgement within '
                              '0.5 s (acktimeout)' % server.port)
        assert wire.closed()
        server.accept()                              # it came back

    def test_a_far_end_that_stops_reading_never_blocks_it(self, tmp, stoppers):
        """20 MB for a server that reads nothing: the socket fills, and
        socket_out still answers its Looper (error after acktimeout)."""
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port, acktimeout='1', reconnectdelay='5')
        wire = server.accept()
        started = time.monotonic()
        big = 'x' * 1000000
        out.send(''.join(protocol([('n', str(i)), ('body', big)]) for i in range(20)))
        replies = out.wait_replies(21)
        assert time.monotonic() - started < 10
        assert replies[1:] == ['error connection to 127.0.0.1:%d lost: no acknowledgement '
                               'within 1 s (acktimeout)' % server.port] * 20
        assert wire.closed()

    def test_events_wait_for_the_connection_then_error_after_acktimeout(self, tmp, stoppers):
        port = free_tcp_port()                       # nothing listens there
        out = start_socket_out(tmp, stoppers, port, acktimeout='0.5', reconnectdelay='0.05',
                               maxreconnectdelay='0.1')
        out.send(protocol([('n', '1')]) + protocol([('n', '2')]))
        replies = out.wait_replies(3)
        assert replies[1:] == ['error not connected to 127.0.0.1:%d' % port] * 2
        out.wait_log(r'cannot connect to 127\.0\.0\.1:%d: Connection refused; retrying in '
                     r'0\.05 s \(1 attempts failed in a row\)' % port)
        # A listener appears: the next events go through.
        central, _ = start_socket_in(tmp, stoppers, listen='127.0.0.1:%d' % port, ack=False)
        out.send(protocol([('n', '3')]))
        assert out.wait_replies(4)[3] == 'ok'
        assert central.events() == [{'n': '3'}]

    def test_reconnect_delay_grows_and_is_capped(self, tmp, stoppers):
        server = FakeServer(stoppers)
        start_socket_out(tmp, stoppers, server.port, reconnectdelay='0.05',
                         maxreconnectdelay='0.4')
        times = []
        for _ in range(7):
            server.sock.settimeout(DEADLINE)
            conn, _ = server.sock.accept()
            times.append(time.monotonic())
            conn.close()                             # closed before hello: a failed attempt
        gaps = [b - a for a, b in zip(times, times[1:])]
        # 0.05, 0.1, 0.2, 0.4, 0.4, 0.4 (plus scheduling noise)
        assert gaps[0] < 0.3 and gaps[2] > 0.15, gaps
        assert all(0.3 < g < 1.5 for g in gaps[3:]), gaps

    def test_the_far_end_speaking_another_version_is_a_clear_error(self, tmp, stoppers):
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port)
        server.accept(hello='hello looper-socket 2 ack=yes')
        out.wait_log(r'<3>socket_out: 127\.0\.0\.1:\d+ is not a socket_in speaking looper-socket '
                     r"version 1: it said 'hello looper-socket 2 ack=yes'; retrying in 30 s")
        server2 = FakeServer(stoppers)
        out2 = start_socket_out(tmp, stoppers, server2.port)
        server2.accept(hello='refused this socket_in speaks looper-socket version 2, not 1')
        out2.wait_log(r'<3>socket_out: 127\.0\.0\.1:\d+ refused us: this socket_in speaks '
                      r'looper-socket version 2, not 1')

    def test_without_confirm_nothing_is_answered_and_losses_are_logged(self, tmp, stoppers):
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port, confirm='no', reconnectdelay='0.05')
        wire = server.accept()
        out.send(protocol([('n', '1')]) + protocol([('n', '2')]))
        assert [wire.event() for _ in range(2)] == [{'n': '1'}, {'n': '2'}]
        wire.send('ok 1\n')
        wire.stop()
        out.wait_log(r'lost: .*; 1 events sent were not acknowledged and may be lost '
                     r'\(confirm = no\)')
        out.send(protocol([('n', '3')]))
        assert server.accept().event() == {'n': '3'}
        assert out.replies() == []

    def test_end_of_stdin_exits_at_once_and_quit_waits_for_the_answers(self, tmp, stoppers):
        server = FakeServer(stoppers)
        out = start_socket_out(tmp, stoppers, server.port)
        wire = server.accept()
        out.send(protocol([('n', '1')]) + 'quit\n')
        wire.event()
        assert out.proc.poll() is None               # waiting for the answer
        wire.send('ok 1\n')
        assert out.wait_exit() == 0
        assert out.replies() == ['ok', 'ok']
        out2 = start_socket_out(tmp, stoppers, server.port)
        server.accept()
        out2.send(protocol([('n', '1')]))
        out2.proc.stdin.close()
        assert out2.wait_exit(5) == 0

    def test_configuration_errors_exit_78(self, tmp, stoppers):
        cases = [
            ({}, 'no server configured'),
            ({'server': 'central'}, "server: 'central' is not HOST:PORT"),
            ({'server': '127.0.0.1:1', 'cafile': 'ca.pem'}, 'cafile is set but tls is not'),
            ({'server': '127.0.0.1:1', 'tls': 'yes', 'cafile': 'nosuch.pem'},
             "cannot load cafile 'nosuch.pem'"),
            ({'server': '127.0.0.1:1', 'tls': 'yes', 'keyfile': 'k.pem'},
             'keyfile is set but certfile is not'),
            ({'server': '127.0.0.1:1', 'acktimeout': '-1'}, 'acktimeout must be'),
            ({'server': '127.0.0.1:1', 'tls': 'maybe'}, 'tls must be yes or no'),
        ]
        for keys, message in cases:
            mod = Mod(SOCKET_OUT, tmp, keys, close=True)
            stoppers.append(mod)
            assert mod.wait_exit() == 78, (keys, mod.log())
            assert message in mod.log(), (keys, mod.log())

    def test_tls_verifies_the_server_and_its_name(self, tmp, stoppers):
        certs = make_certs(tmp)
        central, port = start_socket_in(tmp, stoppers, tls='yes', certfile=certs['server.pem'],
                                        keyfile=certs['server.key'], cafile=certs['ca.pem'])
        tls = dict(tls='yes', cafile=certs['ca.pem'], certfile=certs['client.pem'],
                   keyfile=certs['client.key'])
        out = start_socket_out(tmp, stoppers, port, **tls)
        out.wait_log(r'connected to 127\.0\.0\.1:%d \(TLSv1\.[23], server certificate '
                     r'CN=localhost\)' % port)
        out.send(protocol([('n', '1')]))
        central.wait_events(1)
        central.send('ok\n')
        assert out.wait_replies(2) == ['ok', 'ok']
        # The certificate does not name the host: refused, unless told not to check.
        wrong = start_socket_out(tmp, stoppers, port, servername='central.example.org', **tls)
        wrong.wait_log(r'TLS handshake with 127\.0\.0\.1:\d+ failed: TLS: '
                       r'CERTIFICATE_VERIFY_FAILED')
        unchecked = start_socket_out(tmp, stoppers, port, servername='central.example.org',
                                     checkhostname='no', **tls)
        unchecked.wait_log(r'connected to 127\.0\.0\.1:%d \(TLS' % port)
        # A server whose CA we do not trust.
        untrusted = start_socket_out(tmp, stoppers, port, tls='yes', cafile=certs['otherca.pem'],
                                     certfile=certs['client.pem'], keyfile=certs['client.key'])
        untrusted.wait_log('CERTIFICATE_VERIFY_FAILED')
        # Our certificate from another CA: the server refuses it.
        intruder = start_socket_out(tmp, stoppers, port, tls='yes', cafile=certs['ca.pem'],
                                    certfile=certs['intruder.pem'], keyfile=certs['intruder.key'],
                                    reconnectdelay='0.1')
        intruder.send(protocol([('n', 'intruder')]))
        intruder.wait_log(r'connection to 127\.0\.0\.1:\d+ failed after the TLS handshake: .* '
                          r'\(if the server refused our certificate, its log says so\)')
        central.wait_log(r'refused a connection from 127\.0\.0\.1:\d+: TLS handshake failed')
        central.proc.send_signal(signal.SIGTERM)
        central.wait_exit()
        assert central.events() == [{'n': '1'}]
        # The untrusted server and the intruder (and, from 3.7 on, the wrong
        # name: 3.6 checks it after the handshake, so the server sees a close).
        assert stopped_counts(central.log())['refused_tls'] >= 2


##############################################################################
# Through looper.py: the gateway
##############################################################################

# An edge's input: `count` numbered events from `edge`, at once, then it
# stays until Looper is gone (its stdout's reader), as a listener would.
EDGE_IN = r'''
import select, sys
config = dict(line.rstrip('\n').split('=', 1) for line in sys.stdin if '=' in line)
out = sys.stdout
for i in range(int(config['count'])):
    out.write('edge=%s\nn=%d\nmsg=event %d from %s\ngo\n' % (config['edge'], i, i, config['edge']))
out.flush()
poller = select.poll()
poller.register(1, 0)                       # POLLERR and POLLHUP are always reported
while not poller.poll(1000):
    pass
'''


class Gateway(object):
    """Edge Loopers (EDGE_IN -> socket_out) into one central Looper
    (socket_in -> a confirmed RECORDER), each in its own directory."""

    def __init__(self, tmp, stoppers, edges=('A', 'B'), count=10000, ack='yes',
                 central_keys='', edge_keys=None):
        self.tmp = tmp
        self.port = free_tcp_port()
        self.central_dir = os.path.join(tmp, 'central')
        os.mkdir(self.central_dir)
        py_module(self.central_dir, 'rec', RECORDER)
        self.central_conf = config(self.central_dir, (
            "outputmodulepath = .\n"
            "input in {\n module = socket_in\n listen = '127.0.0.1:%d'\n ack = %s\n%s%s}\n"
            "output out {\n module = rec\n confirm = yes\n confirmwindow = 1000\n}\n")
            % (self.port, ack, central_keys, FAST), 'central.conf')
        self.edges = {}
        self.central = None
        self.stoppers = stoppers
        for edge in edges:
            directory = os.path.join(tmp, 'edge' + edge)
            os.mkdir(directory)
            py_module(directory, 'edgein', EDGE_IN)
            keys = (edge_keys or {}).get(edge, '')
            conf = config(directory, (
                "inputmodulepath = .\n"
                "input in {\n module = edgein\n edge = %s\n count = %d\n}\n"
                "output central {\n module = socket_out\n server = '127.0.0.1:%d'\n"
                " confirm = yes\n retrydelay = 0.05\n reconnectdelay = 0.05\n"
                " maxreconnectdelay = 0.5\n%s%s}\n") % (edge, count, self.port, keys, FAST),
                'edge.conf')
            self.edges[edge] = conf

    def start_central(self):
        self.central = Looper(self.central_conf)
        self.stoppers.append(self.central)
        return self.central

    def start_edges(self):
        for edge, conf in sorted(self.edges.items()):
            looper = Looper(conf)
            self.stoppers.append(looper)
            self.edges[edge] = looper

    def numbers(self, edge):
        return [int(e['n']) for e in recorded(self.central_dir, 'out') if e['edge'] == edge]

    def count(self):
        """Events recorded so far (cheap: the test polls it)."""
        return read(os.path.join(self.central_dir, 'out.jsonl')).count('\n')

    def kill_central(self):
        """SIGKILL the central Looper; its orphaned modules must go by themselves."""
        pid = self.central.proc.pid
        orphans = children_of(pid)
        self.central.proc.kill()
        self.central.wait()
        wait_until(lambda: not any(alive(p) for p in orphans), 5,
                   'the orphaned modules of the killed Looper to exit')


class TestGateway(object):

    def test_two_edges_survive_two_sigkills_of_the_central_looper(self, tmp, stoppers):
        gw = Gateway(tmp, stoppers)
        gw.start_central()
        gw.start_edges()
        for threshold in (6000, 13000):
            wait_until(lambda: gw.count() >= threshold, 60, '%d events at the central' % threshold)
            gw.kill_central()
            gw.start_central()
        wait_until(lambda: all(len(set(gw.numbers(e))) == 10000 for e in 'AB'), 90,
                   'every event from both edges')
        for edge in 'AB':
            assert_at_least_once_in_order(gw.numbers(edge), 10000, 'edge ' + edge)
        for edge in 'AB':
            log = gw.edges[edge].log()
            assert re.search(r'socket_out: connection to 127\.0\.0\.1:\d+ lost', log), log
        for looper in [gw.central] + list(gw.edges.values()):
            looper.signal(signal.SIGTERM)
            assert looper.wait() == 0, looper.log()
        c = counters(gw.central.log())
        assert c.get('output.out.lost', 0) == 0

    def test_killed_modules_at_either_end_lose_nothing(self, tmp, stoppers):
        """SIGKILL the central socket_in (its Looper restarts it) and an
        edge's socket_out (its Looper resends what was not confirmed)."""
        gw = Gateway(tmp, stoppers)
        gw.start_central()
        gw.start_edges()

        def kill_module(looper, name):
            pids = [p for p in children_of(looper.proc.pid) if name in read('/proc/%d/cmdline' % p)]
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            looper.wait_log(r"'(in|central)' \(pid %d\) terminated by signal 9" % pids[0])

        wait_until(lambda: gw.count() >= 6000, 60, '6000 events at the central')
        kill_module(gw.central, 'socket_in')
        wait_until(lambda: gw.count() >= 13000, 60, '13000 events at the central')
        kill_module(gw.edges['A'], 'socket_out')
        wait_until(lambda: all(len(set(gw.numbers(e))) == 10000 for e in 'AB'), 90,
                   'every event from both edges')
        for edge in 'AB':
            assert_at_least_once_in_order(gw.numbers(edge), 10000, 'edge ' + edge)

    def test_the_same_over_tls_and_a_client_certificate_from_another_ca_is_refused(
            self, tmp, stoppers):
        certs = make_certs(tmp)
        tls = (" tls = yes\n cafile = '%s'\n certfile = '%s'\n keyfile = '%s'\n"
               % (certs['ca.pem'], certs['client.pem'], certs['client.key']))
        intruder = (" tls = yes\n cafile = '%s'\n certfile = '%s'\n keyfile = '%s'\n"
                    % (certs['ca.pem'], certs['intruder.pem'], certs['intruder.key']))
        gw = Gateway(tmp, stoppers, edges=('A', 'B', 'X'), edge_keys={
            'A': tls, 'B': tls, 'X': intruder},
            central_keys=" tls = yes\n certfile = '%s'\n keyfile = '%s'\n cafile = '%s'\n"
                         % (certs['server.pem'], certs['server.key'], certs['ca.pem']))
        gw.start_central()
        gw.start_edges()
        for threshold in (6000, 13000):
            wait_until(lambda: gw.count() >= threshold, 60, '%d events at the central' % threshold)
            gw.kill_central()
            gw.start_central()
        wait_until(lambda: all(len(set(gw.numbers(e))) == 10000 for e in 'AB'), 90,
                   'every event from both edges')
        for edge in 'AB':
            assert_at_least_once_in_order(gw.numbers(edge), 10000, 'edge ' + edge)
        assert gw.numbers('X') == []
        gw.central.wait_log(r"input 'in'.*refused a connection from 127\.0\.0\.1:\d+: TLS "
                            r"handshake failed: CERTIFICATE_VERIFY_FAILED")
        gw.edges['X'].wait_log(r'socket_out: connection to 127\.0\.0\.1:\d+ failed after the TLS '
                               r'handshake')

    def test_without_ack_events_flow_and_the_rate_is_measured(self, tmp, stoppers, capsys):
        """Nothing dies here, so ack = no (confirmed once in the central
        Looper's pipe) delivers everything too; this runs on a looper.py
        without acknowledged input, and measures the rate edge -> central."""
        gw = Gateway(tmp, stoppers, ack='no')
        gw.start_central()
        gw.central.wait_log('listening on')
        started = time.monotonic()
        gw.start_edges()
        wait_until(lambda: gw.count() >= 20000, 120, 'every event at the central')
        elapsed = time.monotonic() - started
        for edge in 'AB':
            assert gw.numbers(edge) == list(range(10000))
        with capsys.disabled():
            print('\ngateway (ack = no): 20000 events from two edges in %.2f s: %.0f events/s'
                  % (elapsed, 20000 / elapsed))

    def test_gateway_rate_with_ack(self, tmp, stoppers, capsys):
        gw = Gateway(tmp, stoppers)
        gw.start_central()
        gw.central.wait_log('listening on')
        started = time.monotonic()
        gw.start_edges()
        wait_until(lambda: gw.count() >= 20000, 120, 'every event at the central')
        elapsed = time.monotonic() - started
        for edge in 'AB':
            assert gw.numbers(edge) == list(range(10000))
        with capsys.disabled():
            print('\ngateway (ack = yes): 20000 events from two edges in %.2f s: %.0f events/s'
                  % (elapsed, 20000 / elapsed))


##############################################################################
# The example configurations
##############################################################################

class TestGatewayExamples(object):

    def test_edge_and_central_examples_pass_check(self):
        for name in ('edge.conf', 'central.conf'):
            p = subprocess.run([PY, os.path.join(HERE, 'looper.py'), '--check',
                                os.path.join(EXAMPLES, name)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True, timeout=DEADLINE)
            assert p.returncode == 0, (name, p.stderr)

    @staticmethod
    def deliveries(name, events):
        p = subprocess.run([PY, os.path.join(HERE, 'looper.py'), '--test',
                            os.path.join(EXAMPLES, name)], input=events, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=DEADLINE)
        assert p.returncode == 0, p.stderr
        return [json.loads(line) for line in p.stdout.splitlines()]

    def test_edge_rules_forward_what_the_centre_must_see(self):
        got = self.deliveries('edge.conf', protocol([('node', 'gw1'), ('severity', 'warning'),
                                                     ('desc', 'link down')]) +
                              protocol([('node', 'gw1'), ('severity', 'info'), ('desc', 'ok')]) +
                              protocol([('node', 'db1'), ('desc', 'sshd[7]: Failed password for '
                                                                  'root from 10.0.0.9')]))
        assert [(d['output'], d['tokens'].get('desc'), d['tokens'].get('site')) for d in got] == [
            ('local', 'link down', None), ('central', 'link down', 'site1'),
            ('local', 'ok', None),
            ('local', 'sshd[7]: Failed password for root from 10.0.0.9', None),
            ('central', 'sshd[7]: Failed password for root from 10.0.0.9', 'site1')]

    def test_central_rules_archive_everything_and_alert_once(self):
        failed = protocol([('site', 'site1'), ('node', 'db1'), ('message', 'Failed password for '
                                                                          'root'),
                           ('desc', 'sshd[7]: Failed password for root')])
        got = self.deliveries('central.conf', failed * 3 + protocol([('site', 'site2'),
                                                                     ('node', 'r1'),
                                                                     ('severity', 'crit'),
                                                                     ('desc', 'fan failed')]))
        assert [d['output'] for d in got] == ['archive', 'alerts', 'archive', 'archive',
                                              'archive', 'alerts']
        assert got[1]['tokens'] == {'alert': 'failed-login', 'site': 'site1', 'node': 'db1',
                                    'text': 'Failed password for root'}
        assert got[5]['tokens']['alert'] == 'critical'
