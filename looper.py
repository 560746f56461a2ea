#!/usr/bin/env python3
"""Looper: route alerts from one input module through Python rules to output modules.

    python3 looper.py CONFIG              run until the input ends or a signal stops it
    python3 looper.py --check CONFIG      validate config, modules and rules; run nothing
    python3 looper.py --test CONFIG       dry-run the rules on events read from stdin
    python3 looper.py --version | --help

An input module (any program) writes events on its stdout as `token=value`
lines ended by `go`.  Rules files (plain Python) read `inputTokens`, fill
`outputTokens` and call `writeTo('name')`.  Output modules receive their
configuration, `configure`, events ending in `go`, and `quit`.  Looper starts
and supervises the modules, multiplexes their pipes with one `selectors` loop,
keeps a bounded queue per output, and never lets one slow or broken module
stop the others.  Standard library only; Python 3.6 to 3.13; POSIX.

The contract (command line, configuration, rules API, module protocol) is in
README.md.  This file reads top to bottom: constants, errors, compatibility,
logging, configuration, framing, event loop, child processes, rules, router,
signals and main loop, command line.
"""
from __future__ import print_function

__version__ = '1.0.0'

import sys

if sys.version_info < (3, 6):
    sys.stderr.write('looper: needs Python 3.6 or newer, this is %s; '
                     'run it with python3\n' % sys.version.split()[0])
    sys.exit(1)

import collections
import errno
import heapq
import itertools
import logging
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import time
import traceback
import types


##############################################################################
# Constants: every tunable in one place, with its unit.
##############################################################################

READ_CHUNK = 262144          # bytes per os.read of a module's stdout or stderr
WRITE_CHUNK = 262144         # bytes of queued events joined into one os.write
PIPE_WINDOW = 1048576        # bytes of written events kept to resend what a dead module never read
MAX_LINE = 65536             # bytes; a longer line from a module is discarded (config: maxline)
MAX_EVENT = 1048576          # bytes; a larger event (lines before `go`) is discarded
QUEUE_SIZE = 10000           # events per output queue (config: queuesize)
OVERFLOW = 'block'           # what a full queue does (config: overflow = block | drop)
CONFIRM_TIMEOUT = 30.0       # seconds to wait for `ok`/`error` (config: confirmtimeout)
WRITE_TIMEOUT = 60.0         # seconds an output may accept no bytes (config: writetimeout)
RETRY_DELAY = 1.0            # seconds before resending after `error`, doubling (config: retrydelay)
RESTART_DELAY = 1.0          # seconds before the first restart, doubling (config: restartdelay)
RESTART_DELAY_MAX = 60.0     # seconds: cap for restart and retry delays (config: maxrestartdelay)
HEALTHY_RUN = 60.0           # seconds of uptime after which the restart delay starts over
CLOSE_TIMEOUT = 5.0          # seconds a module gets to exit after `quit`/EOF before SIGTERM,
                             # and again after SIGTERM before SIGKILL (config: closetimeout)
DRAIN_TIMEOUT = 10.0         # seconds an output gets to deliver its queue at shutdown (config: draintimeout)
LOG_EVERY = 10.0             # seconds between repeated warnings of one kind (drops, bad lines)
EVENT_REPR_MAX = 2000        # characters of an event shown in a log line
RULES_TIMEOUT = 10.0         # seconds the rules may spend on one event before they are
                             # interrupted and the event skipped (config: rulestimeout)

EX_OK = 0
EX_SOFTWARE = 1              # anything else: a module failed, events were lost
EX_USAGE = 2                 # bad command line (argparse's own code)
EX_CONFIG = 78               # EX_CONFIG from sysexits.h: bad configuration or rules

_TOP_KEYS = ('inputmodulepath', 'outputmodulepath', 'rulesfile', 'logfile',
             'loglevel', 'maxline', 'rulestimeout')
_LOG_LEVELS = ('debug', 'info', 'warning', 'error')


##############################################################################
# Errors: configuration errors carry FILE:LINE; runtime errors are logged.
##############################################################################

class _ConfigError(Exception):
    """A problem in the configuration or a rules file, found before running."""

    def __init__(self, path, line, message):
        Exception.__init__(self, '%s:%s: %s' % (path, line, message))
        self.path, self.line, self.message = path, line, message


class _ConfigErrors(Exception):
    """Every problem found in one pass, so --check can list them all."""

    def __init__(self, errors):
        Exception.__init__(self, '\n'.join(str(e) for e in errors))
        self.errors = errors


class _EndEvent(BaseException):
    """Raised by exit() in a rules file: stop processing this event.

    A BaseException, so that a rules file's `except Exception:` cannot swallow it."""


class _RulesTimeout(BaseException):
    """Raised inside rules code by the watchdog (SIGALRM): the rules have run
    on one event for more than `rulestimeout` seconds.  A BaseException for
    the same reason as _EndEvent."""


##############################################################################
# Compatibility: every probe for a Python version or platform lives here.
##############################################################################

def _make_selector():
    """PollSelector where select.poll works, else SelectSelector.

    DefaultSelector would pick epoll, which is missing on some appliances,
    and on 3.8 it picks it without checking.  LOOPER_SELECTOR=select|poll
    forces one, so the tests can run both."""
    forced = os.environ.get('LOOPER_SELECTOR', '')
    if forced == 'select' or not hasattr(selectors, 'PollSelector'):
        return selectors.SelectSelector()
    return selectors.PollSelector()


def _set_wakeup_fd(fd):
    # Python 3.7 added warn_on_full_buffer; a full buffer only means the loop
    # is already awake, so the warning is noise.
    try:
        return signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    except TypeError:  # Python 3.6
        return signal.set_wakeup_fd(fd)


def _describe_status(status):
    """`exited with status 1` or `terminated by signal 9 (SIGKILL)`, and the
    exit code (negative signal number, as subprocess reports it).
    os.waitstatus_to_exitcode is Python 3.9+, so decode by hand."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = 'signal %d' % sig
        return -sig, 'terminated by signal %d (%s)' % (sig, name)
    code = os.WEXITSTATUS(status)
    return code, 'exited with status %d' % code


def _unread_bytes(fd):
    """How many bytes sit in a pipe, unread (FIONREAD on its read end).  If
    the platform cannot say, 0: an output without confirm then counts those
    bytes as delivered, as the contract allows."""
    try:
        import fcntl
        import termios
        return struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\0\0\0\0'))[0]
    except (ImportError, OSError, AttributeError):
        return 0


def _child_setup():
    """Runs in the forked module before exec: default signal dispositions and
    an empty signal mask (Looper may have inherited ignored signals, e.g.
    SIGINT under `cmd &`; exec only resets handled ones)."""
    signal.set_wakeup_fd(-1)  # first: a signal now must not wake Looper's loop
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass  # numbers the platform reserves (e.g. glibc's 32, 33)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


##############################################################################
# Logging: Looper's own log (stderr or `logfile`), reopened on SIGHUP.
##############################################################################

_log = logging.getLogger('looper')


class _Throttle(object):
    """Lets one warning of a kind through every LOG_EVERY seconds and says
    how many were held back, so a flood does not flood the log."""

    def __init__(self):
        self._next = 0.0
        self._held = 0

    def __call__(self, level, msg, *args):
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            msg += ' (and %d more like it in the last %g s)' % (self._held, LOG_EVERY)
        self._held = 0
        self._next = now + LOG_EVERY
        _log.log(level, msg, *args)


def _setup_logging(logfile=None, level='info'):
    """Send Looper's log to `logfile` (appending) or stderr.  Called again on
    SIGHUP, which reopens the file so that logrotate can move it away."""
    if logfile:
        handler = logging.FileHandler(logfile, encoding='utf-8', errors='backslashreplace') \
            if sys.version_info >= (3, 9) else logging.FileHandler(logfile, encoding='utf-8')
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        '%(asctime)s looper[%(process)d]: %(levelname)s %(message)s', '%Y-%m-%dT%H:%M:%S'))
    for old in list(_log.handlers):
        _log.removeHandler(old)
        old.close()
    _log.addHandler(handler)
    _log.setLevel(getattr(logging, level.upper()))
    _log.propagate = False


##############################################################################
# Configuration: the original Looper .conf syntax.
##############################################################################

_NAME = re.compile(r'[A-Za-z0-9_.-]+\Z')
_BLOCK_START = re.compile(r'(\S+)\s+(\S+)\s*\{(.*)\Z')
_KEY = re.compile(r'([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*')


class _Block(object):
    """One `input NAME { }` or `output NAME { }` block, checked and resolved."""

    def __init__(self, kind, name, line):
        self.kind, self.name, self.line = kind, name, line
        self.items = collections.OrderedDict()   # key -> value, sent to the module
        self.lines = {}                          # key -> line number
        self.module = None                       # resolved path of the executable
        self.argv = None                         # how to start it

    def get(self, key, default=None):
        return self.items.get(key, default)

    def signature(self):
        """What must match for a reload to keep this module running."""
        return (self.kind, self.module, tuple(self.items.items()))

    def __repr__(self):
        return '<%s %s module=%s>' % (self.kind, self.name, self.module)


class _Config(object):
    """A parsed, validated configuration file."""

    def __init__(self, path):
        self.path = path
        self.dir = os.path.dirname(path) or '.'
        self.top = {}
        self.top_lines = {}
        self.rulesfiles = []        # [(path, line)]; empty means NORULES
        self.input = None
        self.outputs = collections.OrderedDict()
        self.logfile = None
        self.loglevel = 'info'
        self.maxline = MAX_LINE
        self.rulestimeout = RULES_TIMEOUT

    def resolve(self, value):
        """A path from the file, relative to the file's own directory."""
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(self.dir, value))


def _split_value(text):
    """Parse the value after `key =`: quoted ('...' or "...") or bare.
    Returns (value, rest): rest is '' or a closing '}' of a one-line block.
    Raises ValueError(why) on a bad value."""
    if text[:1] in ('"', "'"):
        end = text.find(text[0], 1)
        if end < 0:
            raise ValueError('unterminated %s quote; close the value with %s' % (text[0], text[0]))
        rest = text[end + 1:].split('#', 1)[0].strip()
        if rest and rest != '}':
            raise ValueError('unexpected text %r after the quoted value; '
                             'put a comment after #' % rest)
        return text[1:end], rest
    value = text.split('#', 1)[0].strip()
    if value.endswith('}'):
        return value[:-1].rstrip(), '}'
    return value, ''


def _parse_config(path):
    """Read the file into a _Config; raise _ConfigErrors listing every problem."""
    errors = []
    config = _Config(path)

    def error(line, msg):
        errors.append(_ConfigError(path, line, msg))

    try:
        with open(path, 'rb') as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except OSError as e:
        raise _ConfigErrors([_ConfigError(path, 1, 'cannot read the configuration: %s' % e.strerror)])
    if st.st_mode & 0o002:
        error(1, 'refusing a configuration file that other users can write (mode %o); '
                 'fix: chmod o-w %s' % (st.st_mode & 0o777, path))
    text = raw.decode('utf-8', 'surrogateescape')

    state = {'block': None}

    def close_block(number):
        if state['block'] is None:
            error(number, "'}' without an open block; remove it")
        else:
            _finish_block(config, state['block'], error)
        state['block'] = None

    def statement(number, line):
        """One line, or the rest of a line after `NAME {`."""
        block = state['block']
        if not line or line.startswith('#'):
            return
        if line.startswith('}'):
            close_block(number)
            statement(number, line[1:].strip())
            return
        m = _KEY.match(line)
        if m:
            key = m.group(1)
            try:
                value, rest = _split_value(line[m.end():])
            except ValueError as e:
                error(number, str(e))
                return
            _set_key(config, block, key, value, number, error)
            if rest:
                close_block(number)
            return
        word = line.split(None, 1)[0]
        m = _BLOCK_START.match(line)
        if word in ('input', 'output'):
            if not m:
                error(number, "expected '%s NAME {' with the brace on the same line" % word)
                return
            if block is not None:
                error(number, "block '%s' starts inside block '%s' (line %d); close that one "
                              "with '}' first" % (m.group(2), block.name, block.line))
                _finish_block(config, block, error)
            name = m.group(2)
            if not _NAME.match(name):
                error(number, "bad %s name '%s'; use letters, digits, '_', '.', '-'" % (word, name))
            state['block'] = _Block(word, name, number)
            statement(number, m.group(3).strip())
            return
        if m or line.split('#', 1)[0].rstrip().endswith('{'):
            error(number, "unknown section '%s'; expected 'input NAME {' or 'output NAME {'" % word)
            # Read to its closing brace without more messages.
            state['block'] = _Block('ignored', word, number)
        else:
            error(number, "cannot parse %r; expected 'key = value', 'input NAME {', "
                          "'output NAME {' or '}'" % line)

    for number, line in enumerate(text.splitlines(), 1):
        statement(number, line.strip())
    if state['block'] is not None:
        block = state['block']
        error(block.line, "block '%s' is never closed; add '}'" % block.name)
        _finish_block(config, block, error)

    _finish_config(config, error)
    if errors:
        raise _ConfigErrors(errors)
    return config


def _set_key(config, block, key, value, number, error):
    if block is not None and block.kind == 'ignored':
        return
    if block is None and key not in _TOP_KEYS:
        error(number, "unknown key '%s' outside a block; known keys: %s "
                      "(module settings go inside an input or output block)"
              % (key, ', '.join(_TOP_KEYS)))
        return
    if block is None and key == 'rulesfile':
        config.rulesfiles.append((value, number))
        return
    target, lines = (block.items, block.lines) if block else (config.top, config.top_lines)
    if key in lines:
        error(number, "duplicate key '%s' (first set at line %d); keep one" % (key, lines[key]))
        return
    target[key] = value
    lines[key] = number


def _finish_block(config, block, error):
    """Attach a closed block to the config, checking what can be checked alone."""
    if block.kind == 'ignored':
        return
    if 'module' not in block.items:
        error(block.line, "%s '%s' has no 'module' key; add module = 'NAME'"
              % (block.kind, block.name))
    if block.kind == 'input':
        if config.input is not None:
            error(block.line, "a second input block '%s' (the first is '%s' at line %d); "
                              "Looper takes exactly one input"
                  % (block.name, config.input.name, config.input.line))
            return
        config.input = block
    else:
        if block.name in config.outputs:
            error(block.line, "duplicate output name '%s' (first at line %d); rename one"
                  % (block.name, config.outputs[block.name].line))
            return
        config.outputs[block.name] = block
    _check_block_values(block, error)


def _number(block, key, default, error, integer=False):
    value = block.get(key)
    if value is None:
        return default
    try:
        n = int(value) if integer else float(value)
        if n <= 0:
            raise ValueError
        return n
    except ValueError:
        error(block.lines[key], "%s must be a positive %s, not '%s'"
              % (key, 'whole number' if integer else 'number of seconds', value))
        return default


def _check_block_values(block, error):
    """Parse the keys Looper reads itself into attributes of the block."""
    block.restartdelay = _number(block, 'restartdelay', RESTART_DELAY, error)
    block.maxrestartdelay = max(block.restartdelay,
                                _number(block, 'maxrestartdelay', RESTART_DELAY_MAX, error))
    block.closetimeout = _number(block, 'closetimeout', CLOSE_TIMEOUT, error)
    if block.kind != 'output':
        return
    block.queuesize = _number(block, 'queuesize', QUEUE_SIZE, error, integer=True)
    block.overflow = block.get('overflow', OVERFLOW)
    if block.overflow not in ('block', 'drop'):
        error(block.lines['overflow'], "overflow must be 'block' or 'drop', not '%s'" % block.overflow)
    confirm = block.get('confirm', 'no').lower()
    if confirm not in ('yes', 'no', 'true', 'false', 'on', 'off', '1', '0'):
        error(block.lines['confirm'], "confirm must be 'yes' or 'no', not '%s'" % confirm)
    block.confirm = confirm in ('yes', 'true', 'on', '1')
    block.confirmtimeout = _number(block, 'confirmtimeout', CONFIRM_TIMEOUT, error)
    block.writetimeout = _number(block, 'writetimeout', WRITE_TIMEOUT, error)
    block.retrydelay = _number(block, 'retrydelay', RETRY_DELAY, error)
    block.draintimeout = _number(block, 'draintimeout', DRAIN_TIMEOUT, error)


def _finish_config(config, error):
    """Whole-file checks: the blocks, the module paths, the log settings."""
    path = config.path
    if config.input is None:
        error(1, "no input block; add one: input NAME { module = 'syslog_in' ... }")
    if not config.outputs:
        error(1, "no output block; add at least one: output NAME { module = 'logfile_out' ... }")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'modules')
    for kind in ('input', 'output'):
        key = kind + 'modulepath'
        directory = config.resolve(config.top[key]) if key in config.top else here
        blocks = [config.input] if kind == 'input' else list(config.outputs.values())
        for block in blocks:
            if block is None or 'module' not in block.items:
                continue
            _resolve_module(config, block, directory, key, error)
    if 'logfile' in config.top:
        config.logfile = config.resolve(config.top['logfile'])
    level = config.top.get('loglevel', 'info').lower()
    if level not in _LOG_LEVELS:
        error(config.top_lines['loglevel'], "loglevel must be one of %s, not '%s'"
              % (', '.join(_LOG_LEVELS), level))
        level = 'info'
    config.loglevel = level
    top = _Block('top', '', 0)      # the top-level keys, for _number
    top.items, top.lines = config.top, config.top_lines
    config.maxline = _number(top, 'maxline', MAX_LINE, error, integer=True)
    config.rulestimeout = _number(top, 'rulestimeout', RULES_TIMEOUT, error)
    if config.rulesfiles and [v for v, _ in config.rulesfiles] == ['NORULES']:
        config.rulesfiles = []
    elif any(v == 'NORULES' for v, _ in config.rulesfiles):
        line = [n for v, n in config.rulesfiles if v == 'NORULES'][0]
        error(line, "rulesfile = 'NORULES' cannot be combined with other rules files; remove one")
    config.rulesfiles = [(config.resolve(v), n) for v, n in config.rulesfiles]
    del path


_PY_SHEBANG = re.compile(br'#!\s*\S*/(?:env\s+)?python3(?:\.\d+)?(?:\s|$)')


def _resolve_module(config, block, directory, key, error):
    """Find the module's executable; decide how to start it."""
    name = block.items['module']
    line = block.lines['module']
    path = config.resolve(name) if '/' in name else os.path.join(directory, name)
    if not os.path.isfile(path):
        where = ("the %s '%s'" % (key, directory)) if '/' not in name else 'that path'
        error(line, "module '%s' not found: no file %s in %s; fix the name or set %s"
              % (name, path, where, key))
        return
    if not os.access(path, os.X_OK):
        error(line, "module '%s' (%s) is not executable; fix: chmod +x %s" % (name, path, path))
        return
    block.module = path
    # A module written in Python runs under Looper's own interpreter, so a
    # host where `python3` on PATH is a different (or no) Python still works,
    # and no shim or `env` lookup is paid on every start.
    try:
        with open(path, 'rb') as f:
            first = f.readline(256)
    except OSError:
        first = b''
    # An absolute path: exec must not search PATH for a relative name.
    path = os.path.abspath(path)
    if sys.executable and _PY_SHEBANG.match(first):
        block.argv = [sys.executable, path]
    else:
        block.argv = [path]


def _load_rules(config):
    """Compile every rules file: [(path, source, code)]; raise _ConfigErrors."""
    errors = []
    rules = []
    for path, line in config.rulesfiles:
        try:
            with open(path, 'rb') as f:
                st = os.fstat(f.fileno())
                source = f.read()
        except OSError as e:
            errors.append(_ConfigError(config.path, line, "cannot read rules file %s: %s; "
                                       "fix the rulesfile path" % (path, e.strerror)))
            continue
        if st.st_mode & 0o002:
            errors.append(_ConfigError(path, 0, 'refusing a rules file that other users can '
                                       'write (mode %o); fix: chmod o-w %s'
                                       % (st.st_mode & 0o777, path)))
            continue
        try:
            code = compile(source, path, 'exec', dont_inherit=True)
        except SyntaxError as e:
            errors.append(_ConfigError(path, e.lineno or 0, '%s: %s' % (type(e).__name__, e.msg)))
            continue
        except ValueError as e:   # e.g. a NUL byte in the source
            errors.append(_ConfigError(path, 0, 'cannot compile: %s' % e))
            continue
        rules.append((path, source, code))
    if errors:
        raise _ConfigErrors(errors)
    return rules


def _load(path):
    """Parse the configuration and compile its rules: (config, rules)."""
    config = _parse_config(path)
    return config, _load_rules(config)


##############################################################################
# Framing: bytes from modules into lines and events, events into bytes.
##############################################################################

def _escape(value):
    """A value never carries a raw line break: newline -> `\\n`, CR -> `\\r`."""
    return value.replace('\n', '\\n').replace('\r', '\\r')


def _encode_event(tokens):
    """token=value lines then `go`, as bytes (invalid UTF-8 passes through)."""
    parts = []
    for k, v in tokens.items():
        if '\n' in v or '\r' in v:
            v = _escape(v)
        parts.append(k + '=' + v)
    parts.append('go\n')
    return '\n'.join(parts).encode('utf-8', 'surrogateescape')


class _LineReader(object):
    """Turns chunks of bytes into complete lines of text, memory bounded.

    feed() returns the text of every complete line in the data so far (lines
    joined by '\\n', no final newline), or None.  A line longer than maxline
    bytes is discarded up to its newline and counted in `oversized`; the
    partial last line kept between calls never exceeds maxline bytes."""

    def __init__(self, maxline):
        self.maxline = maxline
        self._tail = b''
        self._skipping = False      # inside an oversized line: drop to its newline
        self.oversized = 0

    def feed(self, data):
        if self._skipping:
            nl = data.find(b'\n')
            if nl < 0:
                return None
            self._skipping = False
            data = data[nl + 1:]
        buf = self._tail + data if self._tail else data
        end = buf.rfind(b'\n')
        if end < 0:
            self._keep(buf)
            return None
        self._keep(buf[end + 1:])
        return buf[:end].decode('utf-8', 'surrogateescape')

    def _keep(self, tail):
        if len(tail) > self.maxline:
            self.oversized += 1
            self._skipping = True
            tail = b''
        self._tail = tail

    def flush(self):
        """At EOF: the unterminated last line (or '')."""
        tail, self._tail, self._skipping = self._tail, b'', False
        return tail.decode('utf-8', 'surrogateescape')


# The fast parser's other arguments to str.split: dict(map(str.split, lines,
# _EQUALS, _ONES)) is line.split('=', 1) for each line with no bytecode run
# and no list of pairs built per event (callgrind: 5% fewer instructions an
# event than a comprehension).
_EQUALS = itertools.repeat('=')
_ONES = itertools.repeat(1)


class _EventParser(object):
    """Turns an input module's stdout into events (dicts of str -> str).

    Defined handling of bad input, each counted: a line without `=` (or with
    an empty token name) is skipped (`malformed`); blank lines are ignored; a
    line over maxline bytes is skipped (`oversized`); an event over MAX_EVENT
    bytes is skipped up to its `go` (`oversized_events`); `go` with no tokens
    is skipped (`empty`); a trailing CR is dropped; NUL bytes and invalid
    UTF-8 pass through.  A repeated token keeps its last value."""

    def __init__(self, name, maxline):
        self.name = name
        self.maxline = maxline
        self.lines = _LineReader(maxline)
        self._partial = ''          # lines of the event being read, each ending in '\n'
        self._skip_event = False    # the current event grew too big: drop it up to `go`
        self.malformed = 0
        self.empty = 0
        self.oversized_events = 0
        self._warn = _Throttle()

    @property
    def oversized(self):
        return self.lines.oversized

    def feed(self, data):
        """Return the list of complete events in data.

        The whole chunk is split at `go` lines with one str.split; each event
        then becomes a dict of its lines split at their first `=`.  Anything
        unusual (a line without `=`, a blank line, an over-long line) takes
        _parse_slowly."""
        text = self.lines.feed(data)
        if text is None:
            return []
        if '\r' in text:
            text = '\n'.join([line[:-1] if line[-1:] == '\r' else line
                              for line in text.split('\n')])
        # _partial is '' or complete lines, each ending in '\n'.  One join:
        # each + would copy the whole chunk again.
        text = ''.join(('\n', self._partial, text, '\n'))
        pieces = text.split('\ngo\n')
        pieces[0] = pieces[0][1:]
        tail = pieces.pop()
        maxline = self.maxline
        events = None
        split, eqs, ones = str.split, _EQUALS, _ONES
        # The fast path, unless a skipped event is pending or a line may be
        # over maxline.  Anything else unusual makes it fail as a whole and
        # take the careful path: a line without `=`, a blank line or an
        # empty event (a piece that is '' or starts with `go`) raises
        # ValueError in dict(); an empty token name leaves '' as a key.
        if not (self._skip_event or len(text) > maxline and max(map(len, pieces or [''])) > maxline):
            try:
                events = [dict(map(split, piece.split('\n'), eqs, ones)) for piece in pieces]
            except ValueError:
                events = None
            if events and any(map(dict.__contains__, events, itertools.repeat(''))):
                events = None
        if events is None:
            events = self._parse_pieces(pieces)
        while tail[:3] == 'go\n':
            self.empty += 1         # `go` right after `go`: an empty event
            tail = tail[3:]
        if len(tail) > MAX_EVENT:
            self._skip_event = True
            tail = ''
        self._partial = tail
        return events

    def _parse_pieces(self, pieces):
        """The careful path: event by event, line by line."""
        events = []
        for piece in pieces:
            while piece[:2] == 'go' and piece[2:3] in ('', '\n'):
                self.empty += 1     # two `go` lines in a row: an empty event
                piece = piece[3:]
            if self._skip_event:
                self._skip_event = False
                self.oversized_events += 1
                self._warn(logging.WARNING, "input '%s': an event over %d bytes was skipped",
                           self.name, MAX_EVENT)
                continue
            if not piece:
                self.empty += 1
                continue
            event = self._parse_slowly(piece.split('\n'))
            if event:
                events.append(event)
            else:
                self.empty += 1
        return events

    def _parse_slowly(self, lines):
        """The careful path for an event with a bad line in it."""
        event = {}
        for line in lines:
            if not line:
                continue
            key, sep, value = line.partition('=')
            if not sep or not key or '\r' in key:
                self.malformed += 1
                self._warn(logging.WARNING, "input '%s': skipped a line that is not "
                           "token=value or go: %r", self.name, line[:200])
                continue
            if len(line) > self.maxline:
                self.lines.oversized += 1
                self._warn(logging.WARNING, "input '%s': skipped a line over %d bytes",
                           self.name, self.maxline)
                continue
            event[key] = value
        return event

    def eof(self):
        """The module's output ended: (events, lost).  A last line without its
        newline still counts (so a final `go` completes its event); the lines
        of an event that never got its `go` are discarded, and `lost` says
        how many there were."""
        tail = self.lines.flush()
        events = self.feed(tail.encode('utf-8', 'surrogateescape') + b'\n') if tail else []
        lost = len([line for line in self._partial.split('\n') if line.strip()])
        self._partial = ''
        self._skip_event = False
        return events, lost


##############################################################################
# Event loop: one selector, a heap of timers, signals through a socketpair.
##############################################################################

class _Loop(object):
    """Owns the selector and the timers.  Registered objects are in key.data
    and have on_ready(mask); timers are [deadline, seq, callback] lists in a
    heap, cancelled by setting the callback to None."""

    def __init__(self):
        self.sel = _make_selector()
        self._timers = []
        self._seq = itertools.count()
        self.dirty = set()          # outputs with events to hand to their pipe

    def call_later(self, delay, callback):
        timer = [time.monotonic() + delay, next(self._seq), callback]
        heapq.heappush(self._timers, timer)
        return timer

    @staticmethod
    def cancel(timer):
        if timer is not None:
            timer[2] = None

    def run_once(self):
        # Flush before sleeping: no event waits in a buffer for more data.
        while self.dirty:
            for output in list(self.dirty):
                self.dirty.discard(output)
                output.flush()
        timeout = None
        while self._timers and self._timers[0][2] is None:
            heapq.heappop(self._timers)
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, mask in self.sel.select(timeout):
            key.data.on_ready(mask)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            callback = heapq.heappop(self._timers)[2]
            if callback is not None:
                callback()

    def __repr__(self):
        return '<_Loop %s fds=%d timers=%d>' % (type(self.sel).__name__,
                                                len(self.sel.get_map()), len(self._timers))


class _Reader(object):
    """The parent's end of a module's stdout or stderr: a raw non-blocking fd.

    Owns the fd and closes it at EOF or close().  One bounded os.read per
    readiness event, so one chatty module cannot starve the others.  EAGAIN:
    nothing to do until the next readiness.  EOF (or a read error): close,
    then on_eof()."""

    def __init__(self, loop, fd, label, on_data, on_eof):
        self.loop, self.fd, self.label = loop, fd, label
        self.on_data, self.on_eof = on_data, on_eof
        self.paused = False
        os.set_blocking(fd, False)
        loop.sel.register(fd, selectors.EVENT_READ, self)

    def on_ready(self, mask):
        if self.fd is None or self.paused:
            return      # closed or paused earlier in this same pass of the loop
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            _log.warning('%s: read error: %s', self.label, e.strerror)
            data = b''
        if data:
            self.on_data(data)
        else:
            self.close()
            self.on_eof()

    def pause(self):
        if not self.paused and self.fd is not None:
            self.loop.sel.unregister(self.fd)
        self.paused = True

    def resume(self):
        if self.paused and self.fd is not None:
            self.loop.sel.register(self.fd, selectors.EVENT_READ, self)
        self.paused = False

    def drain(self):
        """After the module exited: read what is left in the pipe, then close.
        Whatever a surviving grandchild writes later is not waited for."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b''
            if not data:
                break
            self.on_data(data)
        self.close()

    def close(self):
        if self.fd is None:
            return
        if not self.paused:
            self.loop.sel.unregister(self.fd)
        os.close(self.fd)
        self.fd = None

    def __repr__(self):
        return '<_Reader %s fd=%s %s>' % (self.label, self.fd, 'paused' if self.paused else 'READ')


class _Writer(object):
    """The parent's end of a module's stdin: a raw non-blocking fd.

    Owns the fd and closes it on close() or after close_when_drained().  The
    asyncio write path: write at once when nothing is queued; keep the
    unwritten tail in `backlog`; EVENT_WRITE only while there is a backlog.
    EAGAIN: keep the tail.  EPIPE or any other error: close and on_error(),
    which treats the module as dead.  `written` counts bytes accepted by the
    pipe, so the owner knows which events are fully handed over."""

    def __init__(self, loop, fd, label, on_progress, on_error):
        self.loop, self.fd, self.label = loop, fd, label
        self.on_progress, self.on_error = on_progress, on_error
        self.backlog = bytearray()
        self.written = 0
        self.last_progress = time.monotonic()
        self._close_when_drained = False
        os.set_blocking(fd, False)

    def write(self, data):
        if self.fd is None:
            return
        if not self.backlog:
            try:
                n = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._fail(e)
                return
            self.written += n
            if n == len(data):
                self.last_progress = time.monotonic()
                self._maybe_close()
                return
            self.loop.sel.register(self.fd, selectors.EVENT_WRITE, self)
            data = data[n:]
            if n:
                self.last_progress = time.monotonic()
        self.backlog += data

    def on_ready(self, mask):
        if self.fd is None or not self.backlog:
            return      # closed earlier in this same pass of the loop
        try:
            n = os.write(self.fd, self.backlog)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(e)
            return
        del self.backlog[:n]
        self.written += n
        self.last_progress = time.monotonic()
        if not self.backlog:
            self.loop.sel.unregister(self.fd)
            self._maybe_close()
        self.on_progress()

    def close_when_drained(self):
        self._close_when_drained = True
        self._maybe_close()

    def _maybe_close(self):
        if self._close_when_drained and not self.backlog:
            self.close()

    def _fail(self, e):
        reason = 'closed its stdin' if e.errno == errno.EPIPE else 'stdin: %s' % e.strerror
        self.close()
        self.on_error(reason)

    def close(self):
        if self.fd is None:
            return
        if self.backlog:
            self.loop.sel.unregister(self.fd)
            del self.backlog[:]
        os.close(self.fd)
        self.fd = None

    def __repr__(self):
        return '<_Writer %s fd=%s %s backlog=%d>' % (
            self.label, self.fd, 'WRITE' if self.backlog else '-', len(self.backlog))


##############################################################################
# Child processes: start, supervise, stop and restart one module.
##############################################################################

class _Module(object):
    """One module process and its three pipes.

    States: 'idle' (not started, or waiting for a restart), 'running',
    'stopping' (asked to exit: quit/EOF, then SIGTERM, then SIGKILL),
    'done' (exited and not to be restarted).  Death is seen on every path:
    EPIPE on stdin, EOF on stdout, and the exit status from waitpid; the
    exit is handled once the pid is reaped, after reading what is left in
    its pipes.  Restarts wait a delay that doubles up to RESTART_DELAY_MAX
    and starts over after HEALTHY_RUN seconds of uptime."""

    kind = 'module'

    def __init__(self, router, block):
        self.router, self.loop, self.block, self.name = router, router.loop, block, block.name
        self.label = '%s %r' % (self.kind, self.name)
        self.proc = None
        self.state = 'idle'
        self.stdin = self.stdout = self.stderr = None
        self.started_at = 0.0
        self.starts = 0
        self.restarts = 0
        self.delay = block.restartdelay
        self.retiring = False       # removed or replaced by a reload: never restart
        self._restart_timer = None
        self._kill_timer = None
        self._err = None            # _LineReader for stderr
        self._peek = None           # outputs: our duplicate of the read end of their stdin
        self.unread = 0             # bytes the module left unread in its stdin at exit
        self._stop_reason = None

    # -- starting -----------------------------------------------------------

    def start(self):
        self._restart_timer = None
        if self.state == 'done':
            return
        env = dict(os.environ)
        env['LOOPER_NAME'] = self.name
        pass_fds = []
        if '-' in self.block.items.values():
            # The module asked for Looper's stdin (input) or stdout (output).
            var, fd = self.router.std_fd(self.kind)
            env[var] = str(fd)
            pass_fds.append(fd)
        argv = self.block.argv
        if not os.access(self.block.module, os.X_OK):
            # Classified as fatal: one clear error, then the longest delay.
            _log.error("%s: cannot start %s: the file is gone or not executable; "
                       "restore it (chmod +x); retrying in %g s",
                       self.label, self.block.module, self.block.maxrestartdelay)
            self.delay = self.block.maxrestartdelay
            self._schedule_restart()
            return
        _log.debug('%s: starting %s', self.label, argv)
        # Our own pipes rather than Popen's file objects: the parent's ends are
        # raw fds owned by _Reader/_Writer; the child's ends are closed here.
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if self.kind == 'output':
            # A read end of our own on the module's stdin, only to ask at its
            # exit how much it never read (so those events are sent again).
            # The price: no EPIPE for outputs; a module that closes stdin and
            # lives on is caught by the write deadline instead.
            self._peek = os.dup(in_r)
        try:
            self.proc = subprocess.Popen(
                argv, stdin=in_r, stdout=out_w, stderr=err_w,
                cwd=self.router.config.dir, env=env, pass_fds=pass_fds, close_fds=True,
                start_new_session=True, preexec_fn=_child_setup)
        except OSError as e:
            for fd in (in_w, out_r, err_r) + ((self._peek,) if self._peek is not None else ()):
                os.close(fd)
            self._peek = None
            # Classified as fatal: one clear error, then the longest delay.
            _log.error("%s: cannot start %s: %s; check that it exists, is executable "
                       "and that its #! interpreter is installed; retrying in %g s",
                       self.label, argv[-1], e.strerror or e, self.block.maxrestartdelay)
            self.delay = self.block.maxrestartdelay
            self._schedule_restart()
            return
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        self.starts += 1
        self.started_at = time.monotonic()
        self.state = 'running'

        self.router.children[self.proc.pid] = self
        label = '%s pid %d' % (self.label, self.proc.pid)
        self.stdin = _Writer(self.loop, in_w, label, self._on_progress, self._on_stdin_error)
        self.stdout = _Reader(self.loop, out_r, label, self._on_stdout, self._on_stdout_eof)
        self._err = _LineReader(MAX_LINE)
        self.stderr = _Reader(self.loop, err_r, label, self._on_stderr, lambda: None)
        _log.debug('%s: started as pid %d', self.label, self.proc.pid)
        self._on_started()

    def _send_config(self):
        lines = ['%s=%s\n' % (k, _escape(v)) for k, v in self.block.items.items()]
        self.stdin.write(''.join(lines).encode('utf-8', 'surrogateescape'))

    # -- what the module says -----------------------------------------------

    def _on_stderr(self, data):
        text = self._err.feed(data)
        if text is not None:
            for line in text.split('\n'):
                if line.strip():
                    _log.warning('%s pid %d: %s', self.label, self.proc.pid, line)

    def _on_stdout_eof(self):
        """The module closed its stdout; it is expected to exit.  The exit
        itself is handled when waitpid reports it."""

    def _on_stdin_error(self, reason):
        if self.state == 'running':
            self.fail(reason)

    # -- stopping -----------------------------------------------------------

    def fail(self, reason):
        """The module misbehaved (hung, desynced, closed a pipe): stop it now
        with SIGTERM, then SIGKILL; the restart follows its exit."""
        if self.state != 'running':
            return
        _log.warning('%s (pid %d): %s; stopping it with SIGTERM', self.label, self.proc.pid, reason)
        self._stop_reason = reason
        self.state = 'stopping'
        if self.stdin:
            self.stdin.close()
        self._signal(signal.SIGTERM)
        self._kill_timer = self.loop.call_later(self.block.closetimeout, self._kill)

    def _close_then_term(self):
        """The polite stop: stdin is closed (after `quit` for outputs); give it
        CLOSE_TIMEOUT to exit, then SIGTERM, then SIGKILL."""
        self.state = 'stopping'
        if self.stdin:
            self.stdin.close_when_drained()
        self._kill_timer = self.loop.call_later(self.block.closetimeout, self._term)

    def _term(self):
        if self.proc and self.proc.returncode is None:
            _log.warning('%s (pid %d) did not exit within %g s of quit/EOF; sending SIGTERM',
                         self.label, self.proc.pid, self.block.closetimeout)
            self._signal(signal.SIGTERM)
            self._kill_timer = self.loop.call_later(self.block.closetimeout, self._kill)

    def _kill(self):
        if self.proc and self.proc.returncode is None:
            _log.warning('%s (pid %d) did not exit within %g s of SIGTERM; sending SIGKILL',
                         self.label, self.proc.pid, self.block.closetimeout)
            self._signal(signal.SIGKILL)

    def _signal(self, sig):
        """Signal the module's whole process group (so its children go too),
        never a pid that was already reaped."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:   # the module changed its credentials
            _log.error('%s: cannot signal process group %d: %s', self.label, self.proc.pid, e)

    def on_exit(self, status):
        """waitpid reported the module's exit: read what is left in its pipes,
        close them, report the cause, then let the subclass decide."""
        code, how = _describe_status(status)
        self.proc.returncode = code
        self.loop.cancel(self._kill_timer)
        self._kill_timer = None
        for reader in (self.stdout, self.stderr):
            if reader:
                reader.drain()
        if self.stdin:
            self.stdin.close()
        if self._peek is not None:
            self.unread = _unread_bytes(self._peek)
            os.close(self._peek)
            self._peek = None
        tail = self._err.flush()
        if tail.strip():
            _log.warning('%s pid %d: %s', self.label, self.proc.pid, tail)
        uptime = time.monotonic() - self.started_at
        if uptime >= HEALTHY_RUN:
            self.delay = self.block.restartdelay
        was = self.state
        self.state = 'idle'
        self._exited(code, how, uptime, was)

    def _schedule_restart(self):
        if self.retiring or self.router.stopping and self.kind == 'input':
            self.state = 'done'
            self.router.module_done(self)
            return
        delay = self.delay
        self.delay = min(self.delay * 2, self.block.maxrestartdelay)
        self.restarts += 1
        self._restart_timer = self.loop.call_later(delay, self.start)
        return delay

    def describe_exit(self, how, uptime):
        return '%s (pid %d) %s after %.1f s' % (self.label, self.proc.pid, how, uptime)

    def __repr__(self):
        return '<%s %s state=%s pid=%s stdin=%r stdout=%r>' % (
            type(self).__name__, self.name, self.state, self.proc and self.proc.pid,
            self.stdin, self.stdout)


class _Input(_Module):
    """The input module: gets its configuration and EOF on stdin, then
    writes events on stdout.  Exit 0 ends the run; any other exit restarts
    it.  Parsed events wait in `pending` while a blocking output is full;
    reading stops meanwhile, so memory stays bounded."""

    kind = 'input'

    def __init__(self, router, block):
        _Module.__init__(self, router, block)
        self.parser = _EventParser(block.name, router.config.maxline)
        self.pending = collections.deque()
        self.truncated = 0

    def _on_started(self):
        self._send_config()
        self.stdin.close_when_drained()

    def _on_progress(self):
        pass

    def _on_stdin_error(self, reason):
        """An input may exit without reading its configuration: not an error."""
        _log.debug('%s: %s', self.label, reason)

    def _on_stdout(self, data):
        events = self.parser.feed(data)
        if events:
            self.router.take(events)

    def stop(self):
        """Looper is stopping: ask the input to stop with SIGTERM (it has no
        `quit`); what it already wrote is still read and routed."""
        if self._restart_timer is not None:
            self.loop.cancel(self._restart_timer)
            self._restart_timer = None
            self.state = 'done'
            self.router.module_done(self)
        elif self.state == 'running':
            _log.info('%s (pid %d): stopping it with SIGTERM', self.label, self.proc.pid)
            self.state = 'stopping'
            self._signal(signal.SIGTERM)
            self._kill_timer = self.loop.call_later(self.block.closetimeout, self._kill)
        elif self.state == 'idle':
            self.state = 'done'
            self.router.module_done(self)

    def _exited(self, code, how, uptime, was):
        events, lost = self.parser.eof()
        if events:
            self.router.take(events)
        if lost:
            self.truncated += 1
            _log.warning("%s: discarded an incomplete event (%d lines without 'go') "
                         "at the end of its output", self.label, lost)
        if self.retiring or was == 'stopping' or self.router.stopping:
            _log.info('%s', self.describe_exit(how, uptime))
            self.state = 'done'
            self.router.module_done(self)
        elif code == 0:
            _log.info('%s; the input is finished', self.describe_exit(how, uptime))
            self.state = 'done'
            self.router.input_finished(self)
        else:
            delay = self._schedule_restart()
            _log.warning('%s; restarting it in %g s', self.describe_exit(how, uptime), delay)


class _Output(_Module):
    """An output module and its bounded queue.

    Events (encoded bytes) wait in `queue`.  Without confirm, flush() joins
    them into writes of up to WRITE_CHUNK bytes; an event counts as delivered
    once its last byte is in the pipe (`sending` holds those not yet fully
    written, which go back to the queue if the module dies).  With confirm,
    one event is in flight at a time until `ok` (delivered) or `error`
    (resent after a growing pause); no answer within confirmtimeout, or a
    desync, restarts the module and the event is sent again.  A full queue
    blocks the input (overflow=block) or drops and counts (overflow=drop)."""

    kind = 'output'

    def __init__(self, router, block):
        _Module.__init__(self, router, block)
        self.queue = collections.deque()
        self.sending = collections.deque()  # (end offset in stdin.written, data), not all written
        self.written = collections.deque()  # the same, fully written, last PIPE_WINDOW bytes
        self.inflight = None
        self.ready = False                  # configured (and, with confirm, `ok` seen)
        self.queuesize = block.queuesize
        self.blocking = block.overflow == 'block'
        self.confirm = block.confirm
        self.retry_delay = block.retrydelay
        self.delivered = self.dropped = self.retried = self.lost = 0
        self.draining = False
        self._sent_end = 0
        self._reply = None
        self._confirm_timer = None
        self._retry_timer = None
        self._write_timer = None
        self._drop_warn = _Throttle()
        self._out_warn = _Throttle()

    def depth(self):
        return len(self.queue) + len(self.sending) + (self.inflight is not None)

    def full(self):
        return self.depth() >= self.queuesize

    def idle_at_shutdown(self):
        """Nothing left for this output: its queue is empty and no event
        is waiting to be routed."""
        return not self.depth() and not self.router.input.pending

    def enqueue(self, data):
        """Queue an event, or drop and count it; True when that made a
        blocking output full."""
        if self.state == 'done':
            self.dropped += 1
            self._drop_warn(logging.ERROR, '%s has stopped; dropped an event; %d dropped so far',
                            self.label, self.dropped)
            return False
        depth = self.depth()
        if depth >= self.queuesize and not self.blocking:
            self.dropped += 1
            self._drop_warn(logging.WARNING, "%s: queue full (%d events), dropped an event; "
                            "%d dropped so far", self.label, self.queuesize, self.dropped)
            return False
        self.queue.append(data)
        self.loop.dirty.add(self)
        return self.blocking and depth + 1 >= self.queuesize

    # -- the module's life --------------------------------------------------

    def _on_started(self):
        self.ready = False
        self._sent_end = 0
        self._reply = _LineReader(MAX_LINE)
        self._send_config()
        self.stdin.write(b'configure\n')
        if self.confirm:
            self._arm_confirm('configure')
        else:
            self.ready = True
            self.loop.dirty.add(self)

    def flush(self):
        """Hand queued events to the pipe, without blocking."""
        if not self.ready or self.state != 'running':
            return
        if self.confirm:
            if self.inflight is None and self.queue and self._retry_timer is None:
                self.inflight = self.queue.popleft()
                self.stdin.write(self.inflight)
                self._arm_confirm('an event')
        else:
            queue, sending = self.queue, self.sending
            while queue and not self.stdin.backlog and self.stdin.fd is not None:
                start = end = self._sent_end
                batch = []
                while queue and end - start < WRITE_CHUNK:
                    data = queue.popleft()
                    end += len(data)
                    sending.append((end, data))
                    batch.append(data)
                self._sent_end = end
                self.stdin.write(b''.join(batch))
                self._account()
        if self.stdin and self.stdin.backlog and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.block.writetimeout, self._check_write)
        self._maybe_quit()

    def _account(self):
        """Count events whose last byte the pipe accepted as delivered."""
        if self.stdin is None:
            return
        written = self.stdin.written
        sending = self.sending
        history = self.written
        n = 0
        while sending and sending[0][0] <= written:
            history.append(sending.popleft())
            n += 1
        if n:
            oldest = written - PIPE_WINDOW
            while history[0][0] < oldest:
                history.popleft()
            self.delivered += n
            self.router.output_progress(self)

    def _on_progress(self):
        if not self.confirm:
            self._account()
            self.loop.dirty.add(self)

    def _check_write(self):
        """The write deadline: an output that accepts no bytes for
        writetimeout seconds while it has a backlog is hung."""
        self._write_timer = None
        if self.state != 'running' or not self.stdin or not self.stdin.backlog:
            return
        idle = time.monotonic() - self.stdin.last_progress
        if idle >= self.block.writetimeout:
            self.fail('accepted no data for %.0f s (writetimeout)' % idle)
        else:
            self._write_timer = self.loop.call_later(self.block.writetimeout - idle,
                                                     self._check_write)

    def _arm_confirm(self, what):
        self.loop.cancel(self._confirm_timer)
        self._confirm_timer = self.loop.call_later(
            self.block.confirmtimeout,
            lambda: self.fail('no ok/error for %s within %g s (confirmtimeout)'
                              % (what, self.block.confirmtimeout)))

    def _on_stdout(self, data):
        text = self._reply.feed(data)
        if text is None:
            return
        for line in text.split('\n'):
            if line.endswith('\r'):
                line = line[:-1]
            if self.state != 'running':
                return
            if not self.confirm:
                self._out_warn(logging.WARNING, '%s wrote on its stdout (ignored; '
                               'it is not configured with confirm): %r', self.label, line[:200])
            else:
                self._on_reply(line)

    def _on_reply(self, line):
        if line == 'ok' and not self.ready:
            self.loop.cancel(self._confirm_timer)
            self.ready = True
            _log.debug('%s: confirmed its configuration', self.label)
            self.loop.dirty.add(self)
        elif line == 'ok' and self.inflight is not None:
            self.loop.cancel(self._confirm_timer)
            self.inflight = None
            self.delivered += 1
            self.retry_delay = self.block.retrydelay
            self.router.output_progress(self)
            self.loop.dirty.add(self)
        elif (line == 'error' or line.startswith('error ')) and self.inflight is not None:
            self.loop.cancel(self._confirm_timer)
            self.retried += 1
            delay = self.retry_delay
            self.retry_delay = min(self.retry_delay * 2, self.block.maxrestartdelay)
            _log.warning('%s: could not deliver an event (%s); resending it in %g s',
                         self.label, line[6:].strip() or 'no reason given', delay)
            self.queue.appendleft(self.inflight)
            self.inflight = None
            self._retry_timer = self.loop.call_later(delay, self._retry)
        else:
            self.fail('protocol desync: got %r when %s' % (
                line[:200], 'no reply was due' if self.ready and self.inflight is None
                else "waiting for 'ok' or 'error'"))

    def _retry(self):
        self._retry_timer = None
        self.loop.dirty.add(self)

    def _exited(self, code, how, uptime, was):
        for timer in (self._confirm_timer, self._retry_timer, self._write_timer):
            self.loop.cancel(timer)
        self._confirm_timer = self._retry_timer = self._write_timer = None
        self.ready = False
        # What the dead module did not get goes back to the queue's front: the
        # event in flight, what was not fully written, and what it never read.
        read_up_to = self.stdin.written - self.unread
        unread = [data for end, data in self.written if end > read_up_to]
        self.delivered -= len(unread)
        back = unread + [data for _, data in self.sending]
        if self.inflight is not None:
            back.insert(0, self.inflight)
        self.sending.clear()
        self.written.clear()
        self.inflight = None
        self.queue.extendleft(reversed(back))
        if was == 'stopping' and self._stop_reason is None or self.retiring:
            _log.debug('%s', self.describe_exit(how, uptime))
            self._finish()
            return
        self._stop_reason = None
        if self.router.stopping and self.draining and self.idle_at_shutdown():
            _log.info('%s', self.describe_exit(how, uptime))
            self._finish()
            return
        delay = self._schedule_restart()
        _log.warning('%s; %d event(s) kept in its queue; restarting it in %g s',
                     self.describe_exit(how, uptime), len(self.queue), delay)

    # -- shutdown -----------------------------------------------------------

    def drain_and_quit(self):
        """Looper is stopping (or a reload removed this output): deliver the
        queue, then `quit`; give up after draintimeout and count the rest."""
        self.draining = True
        self._drain_deadline = self.loop.call_later(self.block.draintimeout, self._give_up)
        if self._restart_timer is not None and self.state == 'idle' and self.idle_at_shutdown():
            self.loop.cancel(self._restart_timer)
            self._restart_timer = None
            self._finish()
            return
        self._maybe_quit()

    def _maybe_quit(self):
        if (self.draining and self.state == 'running' and self.ready
                and self._stop_reason is None and self.idle_at_shutdown()):
            _log.debug('%s: queue delivered; sending quit', self.label)
            self.stdin.write(b'quit\n')
            self._close_then_term()

    def _give_up(self):
        if self.state == 'done':
            return
        n = self.depth()
        if n:
            self.lost += n
            _log.error('%s: could not deliver %d events within %g s (draintimeout); '
                       'they are lost', self.label, n, self.block.draintimeout)
            self.queue.clear()
            self.sending.clear()
            self.inflight = None
        if self._restart_timer is not None:
            self.loop.cancel(self._restart_timer)
            self._restart_timer = None
            self._finish()
        elif self.state == 'running':
            self._stop_reason = None
            self.draining = True
            # EOF instead of `quit`: a half-written event may sit in the pipe.
            if self.stdin:
                self.stdin.close()
            self._close_then_term()

    def abort(self):
        """A second stop signal: no more draining."""
        self.loop.cancel(getattr(self, '_drain_deadline', None))
        self.block.draintimeout = 0.0
        self._give_up()

    def _finish(self):
        self.loop.cancel(getattr(self, '_drain_deadline', None))
        if self.queue:
            self.lost += len(self.queue)
            _log.error('%s: %d events were not delivered', self.label, len(self.queue))
            self.queue.clear()
        self.state = 'done'
        self.router.module_done(self)


##############################################################################
# Rules: plain Python, compiled once, run per event in a persistent namespace.
##############################################################################

class _Rules(object):
    """Runs the rules files on each event.

    Each file has its own namespace, kept from event to event (so rules can
    count and remember) and rebuilt on reload unless the file is unchanged.
    outputTokens starts as a copy of inputTokens and is shared by the files
    of one event.  writeTo() snapshots it at call time; values become str,
    None values are left out."""

    def __init__(self, files, outputs, timeout=RULES_TIMEOUT, old=None):
        self.outputs = frozenset(outputs)
        self.timeout = timeout
        self.paths = frozenset(path for path, _, _ in files)
        self.errors = 0
        self._deliveries = None     # the event's writeTo list: new for every event
        self._seen = None           # the list the watchdog saw last time
        self._ns = None
        self._warn = _Throttle()
        kept = dict((path, (source, ns)) for path, source, ns in (old.files if old else []))
        self.files = []
        for path, source, code in files:
            if path in kept and kept[path][0] == source:
                ns = kept[path][1]
                ns['writeTo'], ns['exit'] = self._write_to, self._exit
            else:
                ns = {'__name__': '__looper_rules__', '__file__': path,
                      '__builtins__': __builtins__, 'writeTo': self._write_to,
                      'exit': self._exit}
            self.files.append((path, source, ns))
        # A module's code object made into a function runs with ns as both its
        # globals and locals, exactly as exec(code, ns) does, without exec's
        # per-call setup (about 0.2 us an event, 3.6 to 3.13 alike).
        self._run = [(path, types.FunctionType(code, ns), ns)
                     for (path, _, code), (_, _, ns) in zip(files, self.files)]

    def _exit(self, *ignored):
        raise _EndEvent()

    def watchdog(self, frame):
        """SIGALRM, every `timeout` seconds (see _watch_rules): when the rules
        are still on the event they had at the last tick, they have run on
        it for `timeout` to twice that: interrupt them where they are, if
        that is in a rules file (frame is the innermost running frame)."""
        current = self._deliveries
        if current is not None and current is self._seen:
            while frame is not None:
                if frame.f_code.co_filename in self.paths:
                    self._seen = None
                    raise _RulesTimeout()
                frame = frame.f_back
        self._seen = current

    def _write_to(self, *names):
        if not names or not self.outputs.issuperset(names):
            unknown = [n for n in names if n not in self.outputs]
            raise LookupError('writeTo(%s): no output named %s; outputs are: %s' % (
                ', '.join(repr(n) for n in names), ', '.join(repr(n) for n in unknown) or '()',
                ', '.join(sorted(self.outputs))))
        snapshot = {}
        for key, value in self._ns['outputTokens'].items():
            if value.__class__ is not str:
                if value is None:
                    continue
                value = str(value)
            if key.__class__ is not str:
                key = str(key)
            snapshot[key] = value
        keys = '\0'.join(snapshot)
        if '=' in keys or '\n' in keys or '\r' in keys:
            bad = [k for k in snapshot if '=' in k or '\n' in k or '\r' in k][0]
            raise ValueError('writeTo: token name %r contains "=" or a line break' % bad)
        self._deliveries.append((names, snapshot))

    def run(self, tokens):
        """Return [(names, tokens)] for one event, in writeTo order."""
        deliveries = self._deliveries = []
        out = dict(tokens)
        for path, rules, ns in self._run:
            ns['inputTokens'] = tokens
            ns['outputTokens'] = out
            self._ns = ns
            try:
                rules()
            except (_EndEvent, SystemExit):
                break
            except Exception as e:
                self._error(path, '%s: %s' % (type(e).__name__, e), tokens)
                break
            except _RulesTimeout:
                self._error(path, 'still running after %g s (rulestimeout), interrupted'
                            % self.timeout, tokens)
                break
            out = ns['outputTokens']
        return deliveries

    def _error(self, path, what, tokens):
        """Log the exception being handled at its line in the rules file."""
        self.errors += 1
        line = '?'
        for frame in traceback.extract_tb(sys.exc_info()[2]):
            if frame[0] == path:
                line = frame[1]
        event = repr(tokens)
        if len(event) > EVENT_REPR_MAX:
            event = event[:EVENT_REPR_MAX] + '...'
        self._warn(logging.ERROR, '%s:%s: %s; event skipped: %s', path, line, what, event)


##############################################################################
# Router: the input, the rules and the outputs, and the run's life cycle.
##############################################################################

class _Router(object):
    """Owns the modules, routes events, and decides when the run is over."""

    def __init__(self, loop, config, rules):
        self.loop = loop
        self.config = config
        self.children = {}          # pid -> module, until reaped
        self.stopping = False
        self.aborting = False
        self.finished = False
        self.input_status = None    # 0 once the input ended cleanly
        self.events_in = 0
        self.deliveries = 0
        self.blocked = False
        self._std = {}
        self.rules = _Rules(rules, config.outputs, config.rulestimeout) if rules else None
        self.input = _Input(self, config.input)
        self.outputs = collections.OrderedDict(
            (name, _Output(self, block)) for name, block in config.outputs.items())
        self._retired = []          # modules a reload replaced, until they exit
        self._all = tuple(self.outputs)
        self.unrouted = 0

    def std_fd(self, kind):
        """Looper's own stdin (for the input) or stdout (for outputs), as an
        inheritable duplicate whose number a module finds in LOOPER_STDIN_FD
        or LOOPER_STDOUT_FD.  Only modules with a '-' value get it."""
        var, fd = ('LOOPER_STDIN_FD', 0) if kind == 'input' else ('LOOPER_STDOUT_FD', 1)
        if var not in self._std:
            self._std[var] = os.dup(fd)
        return var, self._std[var]

    def start(self):
        _log.info('looper %s starting: input %r, outputs %s, %s', __version__,
                  self.input.name, ', '.join(repr(n) for n in self.outputs),
                  'rules: ' + ', '.join(p for p, _ in self.config.rulesfiles)
                  if self.config.rulesfiles else 'no rules')
        for output in self.outputs.values():
            output.start()
        self.input.start()

    # -- events -------------------------------------------------------------

    def take(self, events):
        """Events from the input: route them now, or keep them pending while a
        blocking output is full (and stop reading the input meanwhile)."""
        self.events_in += len(events)
        pending = self.input.pending
        if self.blocked or pending:
            pending.extend(events)
        else:
            # _route, unrolled: most events in a busy stream go nowhere.
            run = self.rules.run if self.rules else None
            deliver, everywhere = self._deliver, self._all
            for i, event in enumerate(events):
                deliveries = run(event) if run else ((everywhere, event),)
                if deliveries:
                    deliver(deliveries)
                    if self.blocked:
                        pending.extend(events[i + 1:])
                        break
        if pending and self.input.stdout:
            self.input.stdout.pause()

    def _route(self, tokens):
        self._deliver(self.rules.run(tokens) if self.rules else ((self._all, tokens),))

    def _deliver(self, deliveries):
        """Queue [(names, tokens)] on the outputs; a blocking output that
        fills up sets `blocked`."""
        outputs = self.outputs
        for names, snapshot in deliveries:
            data = _encode_event(snapshot)
            self.deliveries += len(names)
            for name in names:
                if outputs[name].enqueue(data):
                    self.blocked = True

    def output_progress(self, output):
        """An output delivered something: route pending events if there is room."""
        if not self.blocked:
            return
        self.blocked = any(o.blocking and o.full() for o in self.outputs.values())
        pending = self.input.pending
        while pending and not self.blocked:
            self._route(pending.popleft())
        if not pending:
            if self.input.stdout:
                self.input.stdout.resume()
            if self.stopping:
                for o in self.outputs.values():     # they may be waiting to quit
                    self.loop.dirty.add(o)

    # -- life cycle ---------------------------------------------------------

    def reap(self):
        """Collect every exited child (SIGCHLD woke us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            module = self.children.pop(pid, None)
            if module is not None:
                module.on_exit(status)

    def input_finished(self, module):
        """The input exited with status 0: route what is left, drain, quit."""
        self.input_status = 0
        self.stop('the input finished')

    def stop(self, why):
        if self.stopping:
            if why.startswith('signal'):
                _log.warning('second stop request (%s): stopping now without draining', why)
                self.aborting = True
                for output in self.outputs.values():
                    output.abort()
                self.input.stop()
            return
        _log.info('stopping: %s', why)
        self.stopping = True
        if self.input.state in ('done',):
            self.module_done(self.input)
        else:
            self.input.stop()

    def module_done(self, module):
        if module is self.input:
            self._drain_outputs()
        elif module in self._retired:
            self._retired.remove(module)
        self._check_finished()

    def _drain_outputs(self):
        """The input is done: every output delivers its queue (and the events
        still pending for it), then gets `quit`, within its draintimeout."""
        for output in self.outputs.values():
            if not output.draining and output.state != 'done':
                output.drain_and_quit()

    def _check_finished(self):
        if self.input.state != 'done' or self._retired or \
                any(o.state != 'done' for o in self.outputs.values()):
            return
        if self.input.pending:
            self.unrouted = len(self.input.pending)
            _log.error('%d events read from the input were never routed: every blocking '
                       'output was full until it gave up', self.unrouted)
            self.input.pending.clear()
        self.finished = True

    def reconfigure(self, config, rules):
        """Apply a validated new configuration (SIGHUP).  Unchanged modules
        keep running; a changed or removed output delivers its queue and gets
        `quit` (a new one starts with the new settings); a changed input is
        stopped and the new one started.  Rules keep their state where the
        file did not change."""
        if self.stopping:
            _log.warning('reload ignored: Looper is stopping')
            return
        self.rules = (_Rules(rules, config.outputs, config.rulestimeout, old=self.rules)
                      if rules else None)
        outputs = collections.OrderedDict()
        for name, block in config.outputs.items():
            old = self.outputs.pop(name, None)
            if old is not None and old.block.signature() == block.signature():
                old.block = block
                outputs[name] = old
                continue
            if old is not None:
                self._retire(old)
            outputs[name] = _Output(self, block)
            outputs[name].start()
        for old in self.outputs.values():
            self._retire(old)
        self.outputs = outputs
        self._all = tuple(outputs)
        self.blocked = any(o.blocking and o.full() for o in outputs.values())
        old = self.input
        if old.block.signature() != config.input.signature():
            self.input = _Input(self, config.input)
            self.input.pending = old.pending
            old.pending = collections.deque()
            self._retired.append(old)
            old.retiring = True
            old.stop()
            self.input.start()
        self.config = config
        _log.info('reloaded: input %r, outputs %s, %s', self.input.name,
                  ', '.join(repr(n) for n in self.outputs),
                  '%d rules file(s)' % len(rules) if rules else 'no rules')

    def _retire(self, output):
        _log.info('%s was changed or removed by the reload: delivering its queue, then quit',
                  output.label)
        output.retiring = True
        self._retired.append(output)
        output.drain_and_quit()

    def exit_status(self):
        lost = sum(o.lost for o in self.outputs.values())
        dropped = sum(o.dropped for o in self.outputs.values())
        level = logging.WARNING if lost or dropped else logging.INFO
        _log.log(level, 'finished: %s', self.counters())
        if lost or self.unrouted or self.input_status not in (0, None):
            return EX_SOFTWARE
        return EX_OK

    def counters(self):
        """One line of name=value pairs: readable, and parseable by a script."""
        p = self.input.parser
        fields = [('events_in', self.events_in), ('deliveries', self.deliveries),
                  ('rules_errors', self.rules.errors if self.rules else 0),
                  ('input.%s.restarts' % self.input.name, self.input.restarts),
                  ('input.%s.malformed' % self.input.name, p.malformed),
                  ('input.%s.oversized' % self.input.name, p.oversized + p.oversized_events),
                  ('input.%s.empty' % self.input.name, p.empty),
                  ('input.%s.truncated' % self.input.name, self.input.truncated),
                  ('input.%s.pending' % self.input.name, len(self.input.pending))]
        for o in self.outputs.values():
            for field in ('delivered', 'retried', 'dropped', 'lost', 'restarts'):
                fields.append(('output.%s.%s' % (o.name, field), getattr(o, field)))
            fields.append(('output.%s.queued' % o.name, o.depth()))
        return ' '.join('%s=%s' % kv for kv in fields)


##############################################################################
# Signals and main loop.
##############################################################################

class _Signals(object):
    """Signals are flags: the handlers do nothing, and the C-level handler
    writes the signal number into a socketpair (signal.set_wakeup_fd) that
    the loop reads like any other descriptor."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)

    def __init__(self, loop, router, reload):
        self.router, self.reload = router, reload
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        for sig in self.HANDLED:
            signal.signal(sig, self._noop)
        _set_wakeup_fd(self._w.fileno())
        loop.sel.register(self._r.fileno(), selectors.EVENT_READ, self)

    @staticmethod
    def _noop(signum, frame):
        pass

    def on_ready(self, mask):
        try:
            data = self._r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in bytearray(data):
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.router.stop('signal %s' % signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGUSR1:
                _log.warning('counters: %s', self.router.counters())
            elif signum == signal.SIGCHLD:
                self.router.reap()

    def __repr__(self):
        return '<_Signals fd=%d READ>' % self._r.fileno()


def _watch_rules(rules):
    """The rules watchdog, the one signal handler that acts: SIGALRM every
    rulestimeout seconds runs rules.watchdog() in whatever Python code was
    running, which interrupts rules stuck on one event (a loop that never
    ends, a call that never returns).  No rules, no timer.  Children do not
    inherit the timer (fork) nor the handler (exec)."""
    if rules is None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.signal(signal.SIGALRM, lambda signum, frame: rules.watchdog(frame))
    signal.setitimer(signal.ITIMER_REAL, rules.timeout, rules.timeout)


def _reload(router, config_path, options):
    """SIGHUP: validate the new configuration and rules first; if they are
    bad, log why and keep running the old ones.  Reopen the log."""
    try:
        config, rules = _load(config_path)
    except _ConfigErrors as e:
        _log.error('reload refused, the running configuration stays:\n%s', e)
        return
    _setup_logging(config.logfile, options.loglevel or config.loglevel)
    router.reconfigure(config, rules)
    _watch_rules(router.rules)


def _run(config_path, options):
    try:
        config, rules = _load(config_path)
        _setup_logging(config.logfile, options.loglevel or config.loglevel)
    except _ConfigErrors as e:
        print(str(e), file=sys.stderr)
        return EX_CONFIG
    except OSError as e:
        print('%s: cannot open the log file: %s' % (config_path, e), file=sys.stderr)
        return EX_CONFIG
    loop = _Loop()
    _log.debug('event loop: %r', loop)
    router = _Router(loop, config, rules)
    _Signals(loop, router, lambda: _reload(router, config_path, options))
    _watch_rules(router.rules)
    router.start()
    while not router.finished:
        loop.run_once()
    return router.exit_status()


##############################################################################
# Command line.
##############################################################################

def _check(config_path):
    try:
        config, rules = _load(config_path)
    except _ConfigErrors as e:
        print(str(e), file=sys.stderr)
        return EX_CONFIG
    print('%s: OK: input %r (%s), outputs %s, %s' % (
        config_path, config.input.name, config.input.module,
        ', '.join('%r (%s)' % (b.name, b.module) for b in config.outputs.values()),
        '%d rules file(s)' % len(rules) if rules else 'no rules'))
    return EX_OK


def _test(config_path):
    """Dry run: events from stdin, deliveries as JSON lines on stdout."""
    import json
    try:
        config, rules = _load(config_path)
    except _ConfigErrors as e:
        print(str(e), file=sys.stderr)
        return EX_CONFIG
    _setup_logging(None, 'warning')
    router_rules = _Rules(rules, config.outputs, config.rulestimeout) if rules else None
    _watch_rules(router_rules)
    parser = _EventParser('stdin', config.maxline)
    out = sys.stdout.buffer if hasattr(sys.stdout, 'buffer') else sys.stdout
    names = tuple(config.outputs)
    stdin = sys.stdin.buffer if hasattr(sys.stdin, 'buffer') else sys.stdin

    def emit(events):
        for event in events:
            deliveries = router_rules.run(event) if router_rules else ((names, event),)
            for targets, tokens in deliveries:
                for name in targets:
                    line = json.dumps({'output': name, 'tokens': tokens}, ensure_ascii=False)
                    out.write(line.encode('utf-8', 'surrogateescape') + b'\n')
        out.flush()

    while True:
        data = os.read(stdin.fileno(), READ_CHUNK)
        if not data:
            break
        emit(parser.feed(data))
    events, lost = parser.eof()
    emit(events)
    if lost:
        print("looper: discarded an incomplete event (no 'go') at the end of stdin",
              file=sys.stderr)
    return EX_SOFTWARE if router_rules and router_rules.errors else EX_OK


def _parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog='looper.py',
        description='Route events from an input module through Python rules to output modules.',
        epilog='Exit status: 0 clean run, 1 failure or lost events, 2 usage error, '
               '78 bad configuration. Signals: TERM/INT stop gracefully (twice: at once), '
               'HUP reloads config and rules and reopens the log, USR1 logs counters. '
               'See README.md for the configuration keys and the module protocol.')
    parser.add_argument('config', metavar='CONFIG', help='the configuration file')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--check', action='store_true',
                      help='validate the configuration, modules and rules; run nothing')
    mode.add_argument('--test', action='store_true',
                      help='dry-run the rules on events read from stdin; print one JSON '
                           'object per delivery')
    parser.add_argument('--version', action='version', version='looper %s' % __version__)
    level = parser.add_mutually_exclusive_group()
    level.add_argument('-v', '--verbose', dest='loglevel', action='store_const', const='debug',
                       help='log debug messages (every module start and state change)')
    level.add_argument('-q', '--quiet', dest='loglevel', action='store_const', const='warning',
                       help='log only warnings and errors')
    level.add_argument('--log-level', dest='loglevel', choices=_LOG_LEVELS,
                       help='log level (default: the config\'s loglevel, else info)')
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ['--version']:   # fast path: no argparse import
        print('looper %s' % __version__)
        return EX_OK
    options = _parse_args(argv)
    if options.check:
        return _check(options.config)
    if options.test:
        return _test(options.config)
    try:
        return _run(options.config, options)
    except KeyboardInterrupt:
        return EX_SOFTWARE


if __name__ == '__main__':
    sys.exit(main())
