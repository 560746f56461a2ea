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
keeps a bounded queue and a delivery ledger per output, and never lets one
slow or broken module stop the others.  Standard library only; Python 3.6 to
3.13; POSIX.

The contract (command line, configuration, rules API, module protocol) is in
README.md.  This file reads top to bottom: constants, errors, compatibility,
logging, configuration, framing, event loop, delivery ledger, modules, rules,
router, main loop and command line.
"""
from __future__ import print_function

__version__ = '1.1.0'

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
import math
import os
import re
import selectors
import signal
import socket
import stat
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
PIPE_SIZE = 1048576          # bytes a module's stdin and stdout pipes hold, where Linux lets
                             # a user set it (fs.pipe-max-size is 1 MiB by default)
PIPE_WINDOW = PIPE_SIZE      # bytes of written events kept to resend what a dead module
                             # never read: at least what its stdin pipe holds
MAX_LINE = 65536             # bytes; a longer line from a module is discarded (config: maxline)
MAX_EVENT = 1048576          # bytes; a larger event (lines before `go`) is discarded
QUEUE_SIZE = 10000           # events per output queue (config: queuesize)
QUEUE_BYTES = 8388608        # bytes per output queue (config: queuebytes)
OVERFLOW = 'block'           # what a full queue does (config: overflow = block | drop)
FANOUT_LIMIT = 2             # a blocking queue refuses deliveries beyond this many times its
                             # bounds (one event's writeTo fan-out cannot be paused)
CONFIRM_TIMEOUT = 30.0       # seconds to wait for an answer (config: confirmtimeout)
CONFIRM_WINDOW = 1           # events in flight before the first answer (config: confirmwindow)
WRITE_TIMEOUT = 60.0         # seconds an output may accept no bytes (config: writetimeout)
RETRY_DELAY = 1.0            # seconds before resending after `error`, doubling (config: retrydelay)
RESTART_DELAY = 1.0          # seconds before the first restart, doubling (config: restartdelay)
RESTART_DELAY_MAX = 60.0     # seconds: cap for restart and retry delays (config: maxrestartdelay)
HEALTHY_RUN = 60.0           # seconds of uptime after which the restart delay starts over
CLOSE_TIMEOUT = 5.0          # seconds a module gets to exit after `quit`/EOF before SIGTERM,
                             # and again after SIGTERM before SIGKILL (config: closetimeout)
DRAIN_TIMEOUT = 10.0         # seconds the outputs get to deliver their queues at shutdown
                             # (config: draintimeout)
RULES_TIMEOUT = 10.0         # seconds the rules may spend on one event (config: rulestimeout)
LOG_EVERY = 10.0             # seconds between repeated reports of one kind
STDERR_BURST = 100           # lines of one module's stderr logged before the throttle holds
STDERR_RATE = 10.0           # lines a second of one module's stderr logged after a burst
EVENT_REPR_MAX = 2000        # characters of an event shown in a log line
DECLARATION_MAX = 65536      # bytes at the top of a module file searched for its declaration
PROGRESS_EVERY = 0.5         # seconds between updates of the progress line on a terminal

EX_OK = 0
EX_SOFTWARE = 1              # anything else: a module failed, events were not delivered
EX_USAGE = 2                 # bad command line (argparse's own code)
EX_CONFIG = 78               # EX_CONFIG from sysexits.h: bad configuration or rules

_LOG_LEVELS = ('debug', 'info', 'warning', 'error')
_NUMERIC_LEVELS = {'0': 'error', '1': 'warning', '2': 'info', '3': 'debug', '4': 'debug'}


##############################################################################
# Errors: configuration errors carry FILE:LINE; runtime errors are logged.
##############################################################################

class _ConfigError(Exception):
    """A problem in the configuration, a rules file or a module, found before
    running.  A warning does not stop a run; an error does."""

    def __init__(self, path, line, message, warning=False):
        Exception.__init__(self, '%s:%s: %s%s' % (path, line, 'warning: ' if warning else '',
                                                  message))
        self.path, self.line, self.message, self.warning = path, line, message, warning


class _ConfigErrors(Exception):
    """Every problem found in one pass, sorted by file and line, so --check can
    list them all."""

    def __init__(self, errors):
        errors = sorted(errors, key=lambda e: (e.path, e.line if isinstance(e.line, int) else 0))
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


def _exited_child():
    """The pid of a child that has exited, without reaping it (waitid with
    WNOWAIT), so that its process group can still be signalled safely: the
    pid cannot be reused while the zombie exists.  None when no child has
    exited; 0 where waitid is missing (macOS before Python 3.x builds with
    it), and the caller then reaps without that step."""
    if not hasattr(os, 'waitid'):
        return 0
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return info.si_pid if info is not None and info.si_pid else None


def _unread_bytes(fd):
    """How many bytes sit in a pipe, unread (FIONREAD on its read end).  If
    the platform cannot say, 0: an output without confirm then counts those
    bytes as written, as the contract allows."""
    try:
        import fcntl
        import termios
        return struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\0\0\0\0'))[0]
    except (ImportError, OSError, AttributeError):
        return 0


def _grow_pipe(fd):
    """Make a pipe hold PIPE_SIZE bytes (Linux F_SETPIPE_SZ; fcntl names it
    from Python 3.10): moving events through a 64 KiB pipe costs five times
    the system time of a 1 MiB one (measured: 360 MB in 1.9 s against
    0.36 s).  Elsewhere, or if the limit is lower, the pipe stays as it is."""
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, 'F_SETPIPE_SZ', 1031), PIPE_SIZE)
    except (ImportError, OSError, ValueError):
        pass


def _reader_gone(fd):
    """True when the read end of the pipe `fd` writes to was closed (poll
    reports POLLERR on the write end), e.g. `looper.py ... | head -1` after
    head exits.  False where it cannot be told."""
    try:
        import select
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
                   for _, mask in poller.poll(0))
    except (ImportError, AttributeError, OSError, ValueError):
        return False


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


def _standard_fds():
    """Open /dev/null on any of fds 0, 1, 2 that is closed, before Looper
    opens anything else: otherwise its own pipes or its signal socket would
    take those numbers and be handed to a module that asks for `-`.
    Returns the set of fds that were closed (so `-` gives /dev/null)."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            closed.add(fd)
    return closed


##############################################################################
# Logging: Looper's own log (stderr or `logfile`), reopened on SIGHUP.
##############################################################################

_log = logging.getLogger('looper')


class _Throttle(object):
    """Lets one report of a kind through every LOG_EVERY seconds and says how
    many were held back.  Reports are of one kind when they share a key (a
    rules file and line and exception type, say), so a flood of one never
    hides another."""

    def __init__(self, every=LOG_EVERY):
        self.every = every
        self._next = {}
        self._held = {}

    def __call__(self, level, key, msg, *args):
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        if held:
            msg += ' (and %d more like it in the last %g s)' % (held, self.every)
        if len(self._next) > 1000:      # bounded: forget kinds whose time has passed
            self._next = dict((k, t) for k, t in self._next.items() if t > now)
        self._next[key] = now + self.every
        _log.log(level, msg, *args)


class _ProgressHandler(logging.StreamHandler):
    """stderr, but a log line first clears the progress line (see _Progress)
    so the two never mix on a terminal."""

    progress = None

    def emit(self, record):
        if self.progress is not None:
            self.progress.clear()
        logging.StreamHandler.emit(self, record)


def _setup_logging(logfile=None, level='info'):
    """Send Looper's log to `logfile` (appending) or stderr.  Called again on
    SIGHUP, which reopens the file so that logrotate can move it away.
    Raises OSError when the file cannot be opened; the old handler is then
    kept."""
    if logfile:
        if sys.version_info >= (3, 9):
            handler = logging.FileHandler(logfile, encoding='utf-8', errors='backslashreplace')
        else:
            handler = logging.FileHandler(logfile, encoding='utf-8')
    else:
        handler = _ProgressHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        '%(asctime)s looper[%(process)d]: %(levelname)s %(message)s', '%Y-%m-%dT%H:%M:%S'))
    for old in list(_log.handlers):
        _log.removeHandler(old)
        old.close()
    _log.addHandler(handler)
    _log.setLevel(getattr(logging, level.upper()))
    _log.propagate = False


##############################################################################
# Configuration: the original Looper .conf syntax, one table of keys, the
# modules' declarations, and sshd's StrictModes for every file Looper runs.
##############################################################################

_NAME = re.compile(r'[A-Za-z0-9_.-]+\Z')
_BLOCK_START = re.compile(r'(\S+)\s+(\S+)\s*\{(.*)\Z')
_KEY = re.compile(r'([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*')

# Every key Looper reads: (name, where, default, kind, low, high, help).
# `where` is top, input, output or block (both).  Kinds: seconds, count and
# bytes are finite numbers within [low, high]; yesno; path; text; level;
# overflow.  The parser, --check, did-you-mean and a README test read it.
_KEYS = (
    ('inputmodulepath', 'top', None, 'path', None, None,
     "directory where a bare input `module` name is looked up (default: `modules/` beside looper.py)"),
    ('outputmodulepath', 'top', None, 'path', None, None, 'the same for outputs'),
    ('rulesfile', 'top', None, 'path', None, None,
     "a rules file; may be repeated, the files run in that order for every event. Absent or "
     "`'NORULES'`: every event goes to every output unchanged"),
    ('logfile', 'top', None, 'path', None, None,
     "Looper's own log (appended; reopened on SIGHUP); stderr if absent. The original's "
     "spelling `logifile` is accepted"),
    ('loglevel', 'top', 'info', 'level', None, None,
     '`debug`, `info`, `warning` or `error` (or the original\'s 0-4: error, warning, info, '
     'debug, debug; `debugmode` is accepted for it); `-v`, `-q`, `--log-level` override it'),
    ('maxline', 'top', MAX_LINE, 'bytes', 256, 16777216,
     'longest line (bytes) accepted from a module; longer lines are discarded and counted'),
    ('rulestimeout', 'top', RULES_TIMEOUT, 'seconds', 0.01, 86400,
     'seconds the rules may spend on one event before they are interrupted and the event '
     'skipped (see Rules)'),
    ('clock', 'top', 'arrival', 'text', None, None,
     "the time the rules' correlation helpers and timers use: `arrival` (when Looper read "
     "the event) or the name of a token holding the event's own time (epoch seconds, "
     "RFC 3339, or `Nov 22 07:39:24`), for replays that give the alerts a live run gave"),
    ('module', 'block', None, 'text', None, None,
     'required: a bare name is looked up in the module path; a name with a `/` is a path'),
    ('restartdelay', 'block', RESTART_DELAY, 'seconds', 0.001, 86400,
     'delay before restarting a module that died; doubles at each further death'),
    ('maxrestartdelay', 'block', RESTART_DELAY_MAX, 'seconds', 0.001, 86400,
     'cap of that delay (and of `retrydelay`); the delay starts over after 60 s of healthy run'),
    ('closetimeout', 'block', CLOSE_TIMEOUT, 'seconds', 0.001, 3600,
     'at a stop, how long a module gets to exit after `quit`/EOF before SIGTERM, and again '
     'after SIGTERM before SIGKILL'),
    ('stderrlevel', 'block', 'warning', 'level', None, None,
     'the level at which a line the module writes on stderr is logged when it has no `<N>` '
     'prefix'),
    ('ack', 'input', 'no', 'yesno', None, None,
     '`yes`: acknowledged input (the module must declare `ack`): Looper writes `ok` on its '
     'stdin for each event once it is settled, in order'),
    ('queuesize', 'output', QUEUE_SIZE, 'count', 1, 10000000,
     "events the output's queue holds (queued + being written + awaiting an answer)"),
    ('queuebytes', 'output', QUEUE_BYTES, 'bytes', 1024, 1 << 40,
     "bytes the output's queue holds; whichever bound is reached first applies"),
    ('overflow', 'output', OVERFLOW, 'overflow', None, None,
     'when the queue is full: `block` stops reading the input until there is room (nothing is '
     'lost; other outputs wait too once the input stops), `drop` drops the event and counts it'),
    ('writetimeout', 'output', WRITE_TIMEOUT, 'seconds', 0.01, 86400,
     'an output that accepts no bytes for this long while it has data waiting is declared '
     'hung: stopped, restarted, its queue kept'),
    ('confirm', 'output', 'no', 'yesno', None, None,
     "`yes`: confirmed delivery (`ok`/`error`/`reject` answers); the shipped modules default "
     "to `yes` (their declaration says so)"),
    ('confirmtimeout', 'output', CONFIRM_TIMEOUT, 'seconds', 0.01, 86400,
     'with confirm: no complete answer within this time (while one is due) means the module '
     'is hung: restarted, the events sent again'),
    ('confirmwindow', 'output', CONFIRM_WINDOW, 'count', 1, 100000,
     "with confirm: events sent before the first answer (a module's declaration may raise the "
     "default); with more than 1, an `error` resends that event and every later one in "
     "flight, so order is kept"),
    ('retrydelay', 'output', RETRY_DELAY, 'seconds', 0.001, 86400,
     'with confirm: pause before resending after `error`; doubles while errors go on, resets '
     'at the next `ok`'),
    ('draintimeout', 'output', DRAIN_TIMEOUT, 'seconds', 0.001, 86400,
     'at shutdown (or when a reload removes the output), how long it gets to deliver its '
     'queue; what is left is counted as lost'),
)
_KEY_TABLE = dict((k[0], k) for k in _KEYS)
_ALIASES = {'logifile': 'logfile', 'debugmode': 'loglevel'}   # the original Looper's spellings
_TOP_KEYS = tuple(k[0] for k in _KEYS if k[1] == 'top')
_BLOCK_KEYS = {'input': frozenset(k[0] for k in _KEYS if k[1] in ('block', 'input')),
               'output': frozenset(k[0] for k in _KEYS if k[1] in ('block', 'output'))}
# What a module may declare (see _read_declaration).
_DECLARED = {'kind', 'keys', 'confirm', 'confirmwindow', 'ack'}


class _Block(object):
    """One `input NAME { }` or `output NAME { }` block, checked and resolved.
    Looper's own settings are attributes (block.queuesize ...)."""

    def __init__(self, kind, name, line, path):
        self.kind, self.name, self.line, self.path = kind, name, line, path
        self.items = collections.OrderedDict()   # key -> value, sent to the module
        self.lines = {}                          # key -> line number
        self.module = None                       # resolved path of the executable
        self.argv = None                         # how to start it
        self.declaration = None                  # what the module file declares, or None

    def get(self, key, default=None):
        return self.items.get(key, default)

    def where(self, key=None):
        """FILE:LINE of a key (or of the block)."""
        return '%s:%s' % (self.path, self.lines.get(key, self.line) if key else self.line)

    def config_lines(self):
        """What the module gets on stdin: every key of the block, then the
        effective value of each protocol option it declares but the block
        does not set (so module and Looper agree on the default)."""
        items = list(self.items.items())
        for key in ('confirm', 'ack'):
            if self.declaration and key in self.declaration and key not in self.items:
                items.append((key, 'yes' if getattr(self, key) else 'no'))
        return ''.join('%s=%s\n' % (k, _escape(v)) for k, v in items)

    def signature(self):
        """What must match for a reload to keep this module running."""
        return (self.kind, self.module, tuple(self.items.items()))

    def __repr__(self):
        return '<%s %s module=%s>' % (self.kind, self.name, self.module)


class _Config(object):
    """A parsed, validated configuration file."""

    def __init__(self, path):
        self.path = path
        self.dir = os.path.dirname(os.path.abspath(path))
        self.top = {}
        self.top_lines = {}
        self.rulesfiles = []        # [(path, line)]; empty means NORULES
        self.input = None
        self.outputs = collections.OrderedDict()
        self.logfile = None
        self.loglevel = 'info'
        self.maxline = MAX_LINE
        self.rulestimeout = RULES_TIMEOUT
        self.clock = None           # None: arrival; else the event-time token
        self.warnings = []          # _ConfigError(warning=True), shown by --check and at start

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


def _strict_modes(path, what):
    """sshd's StrictModes for a file Looper reads or runs: it and every
    directory above it must be owned by root or the user running Looper and
    not writable by group or others (a directory may be, if it is sticky,
    like /tmp).  Returns None or the problem, with its fix."""
    uid = os.geteuid()
    current = os.path.abspath(path)
    first = True
    while True:
        try:
            st = os.stat(current)
        except OSError as e:
            return 'cannot check %s: %s' % (current, e.strerror)
        if st.st_uid not in (0, uid):
            return ('refusing %s %s: %s is owned by uid %d, not root or the user running Looper '
                    '(uid %d); fix: chown %d %s' % (what, path, current, st.st_uid, uid, uid,
                                                    current))
        loose = st.st_mode & 0o022
        if loose and (first or not st.st_mode & stat.S_ISVTX):
            return ('refusing %s %s: %s is writable by %s (mode %o); fix: chmod go-w %s'
                    % (what, path, current, 'others' if loose & 0o002 else 'its group',
                       st.st_mode & 0o7777, current))
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current, first = parent, False


def _parse_config(path):
    """Read the file into a _Config; raise _ConfigErrors listing every problem."""
    errors = []
    config = _Config(path)

    def error(line, msg, where=path):
        errors.append(_ConfigError(where, line, msg))

    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise _ConfigErrors([_ConfigError(path, 1, 'cannot read the configuration: %s' % e.strerror)])
    problem = _strict_modes(path, 'the configuration file')
    if problem:
        error(1, problem)
    text = raw.decode('utf-8', 'surrogateescape')
    if text.startswith('\ufeff'):       # a UTF-8 byte order mark, as some editors write
        text = text[1:]

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
            state['block'] = _Block(word, name, number, path)
            statement(number, m.group(3).strip())
            return
        if m or line.split('#', 1)[0].rstrip().endswith('{'):
            error(number, "unknown section '%s'; expected 'input NAME {' or 'output NAME {'" % word)
            # Read to its closing brace without more messages.
            state['block'] = _Block('ignored', word, number, path)
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
        raise _ConfigErrors(errors + config.warnings)
    return config


def _did_you_mean(key, candidates):
    import difflib
    close = difflib.get_close_matches(key, sorted(candidates), 1, 0.75)
    return "; did you mean '%s'?" % close[0] if close else ''


def _set_key(config, block, key, value, number, error):
    if block is not None and block.kind == 'ignored':
        return
    if block is None:
        key = _ALIASES.get(key, key)
        if key not in _TOP_KEYS:
            hint = _did_you_mean(key, _TOP_KEYS) or ('; known keys: %s' % ', '.join(_TOP_KEYS))
            error(number, "unknown key '%s' outside a block%s (module settings go inside an "
                          "input or output block)" % (key, hint))
            return
        if key == 'rulesfile':
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
    for key in _BLOCK_KEYS[block.kind]:
        setattr(block, key, _value(block.items, block.lines, key, error))
    block.maxrestartdelay = max(block.maxrestartdelay, block.restartdelay)


def _value(items, lines, key, error):
    """The value of one of Looper's keys, checked against the key table;
    an error names the allowed values or range."""
    name, _, default, kind, low, high, _ = _KEY_TABLE[key]
    text = items.get(key)
    if text is None:
        return default == 'yes' if kind == 'yesno' else default
    line = lines[key]
    if kind in ('seconds', 'count', 'bytes'):
        integer = kind != 'seconds'
        try:
            value = int(text) if integer else float(text)
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError
            return value
        except ValueError:
            error(line, "%s must be %s from %s to %s, not '%s'" % (
                key, 'a whole number' if integer else 'a number of seconds', low, high, text))
            return default
    if kind == 'yesno':
        value = text.strip().lower()
        if value in ('yes', 'true', 'on', '1'):
            return True
        if value in ('no', 'false', 'off', '0'):
            return False
        error(line, "%s must be 'yes' or 'no', not '%s'" % (key, text))
        return default in ('yes',)
    if kind == 'level':
        value = _NUMERIC_LEVELS.get(text.strip(), text.strip().lower())
        if value == 'warn':
            value = 'warning'
        if value not in _LOG_LEVELS:
            error(line, "%s must be one of %s (or 0-4), not '%s'" % (key, ', '.join(_LOG_LEVELS), text))
            return default
        return value
    if kind == 'overflow':
        if text not in ('block', 'drop'):
            error(line, "overflow must be 'block' or 'drop', not '%s'" % text)
            return default
        return text
    return text


def _finish_config(config, error):
    """Whole-file checks: the blocks, the module paths, the log settings."""
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
    config.loglevel = _value(config.top, config.top_lines, 'loglevel', error)
    config.maxline = _value(config.top, config.top_lines, 'maxline', error)
    config.rulestimeout = _value(config.top, config.top_lines, 'rulestimeout', error)
    clock = config.top.get('clock', 'arrival').strip()
    config.clock = None if clock == 'arrival' else clock
    if clock != 'arrival' and (not clock or '=' in clock or len(clock.split()) > 1):
        error(config.top_lines['clock'], "clock must be 'arrival' or the name of a token, not "
                                         "'%s'" % clock)
    if config.rulesfiles and [v for v, _ in config.rulesfiles] == ['NORULES']:
        config.rulesfiles = []
    elif any(v == 'NORULES' for v, _ in config.rulesfiles):
        line = [n for v, n in config.rulesfiles if v == 'NORULES'][0]
        error(line, "rulesfile = 'NORULES' cannot be combined with other rules files; remove one")
    config.rulesfiles = [(config.resolve(v), n) for v, n in config.rulesfiles]


_PY_SHEBANG = re.compile(br'#!\s*\S*/(?:env\s+)?python3(?:\.\d+)?(?:\s|$)')


def _resolve_module(config, block, directory, key, error):
    """Find the module's executable, read its declaration, check the block's
    keys against it, and decide how to start it."""
    name = block.items['module']
    line = block.lines['module']
    if not name.strip() or len(name.split()) > 1:
        error(line, "module '%s': a module takes no arguments; give its settings as keys in "
                    "the block (e.g. follow = 'yes')" % name)
        return
    path = os.path.abspath(config.resolve(name) if '/' in name else os.path.join(directory, name))
    if not os.path.isfile(path):
        where = ("the %s '%s'" % (key, directory)) if '/' not in name else 'that path'
        error(line, "module '%s' not found: no file %s in %s; fix the name or set %s"
              % (name, path, where, key))
        return
    if not os.access(path, os.X_OK):
        error(line, "module '%s' (%s) is not executable; fix: chmod +x %s" % (name, path, path))
        return
    problem = _strict_modes(path, 'the module')
    if problem:
        error(line, problem)
        return
    block.module = path
    try:
        with open(path, 'rb') as f:
            head = f.read(DECLARATION_MAX)
    except OSError as e:
        error(line, "module '%s' (%s) cannot be read: %s" % (name, path, e.strerror))
        return
    first = head.split(b'\n', 1)[0]
    # A module written in Python runs under Looper's own interpreter, so a
    # host where `python3` on PATH is a different (or no) Python still works,
    # and no shim or `env` lookup is paid on every start.
    if sys.executable and _PY_SHEBANG.match(first):
        block.argv = [sys.executable, path]
    else:
        block.argv = [path]
        if first.startswith(b'#!'):
            problem = _shebang_problem(first)
            if problem:
                error(line, "module '%s' (%s): %s" % (name, path, problem))
                return
    declaration = _read_declaration(head, path, error)
    block.declaration = declaration
    if declaration is not None:
        _check_against_declaration(config, block, declaration, error)
    elif block.kind == 'output':
        # Without a declaration the module's keys are unknown; a near miss
        # of one of Looper's own keys is still worth a word.
        for key in block.items:
            if key not in _BLOCK_KEYS['output']:
                hint = _did_you_mean(key, _BLOCK_KEYS['output'])
                if hint:
                    config.warnings.append(_ConfigError(
                        config.path, block.lines[key], "key '%s' is not one of Looper's%s (module "
                        "'%s' declares no keys, so it is passed on)" % (key, hint, name), True))


def _shebang_problem(first):
    """Why the `#!` line of a script would not run, or None."""
    if first.endswith(b'\r'):
        return ('its #! line ends in a carriage return (DOS line endings), so the kernel looks '
                'for an interpreter named with a CR; fix: dos2unix, or sed -i "s/\\r$//"')
    words = first[2:].decode('utf-8', 'replace').split()
    if not words:
        return 'its #! line names no interpreter'
    interpreter = words[0]
    if os.path.basename(interpreter) == 'env' and len(words) > 1:
        found = _which(words[1])
        if not found:
            return ("its #! line runs '%s' through env, and no '%s' is on PATH (%s); install it or "
                    "fix the #! line" % (words[1], words[1], os.environ.get('PATH', '')))
        return None
    if not os.path.isfile(interpreter) or not os.access(interpreter, os.X_OK):
        return "its #! interpreter '%s' is not an executable file; install it or fix the #! line" \
            % interpreter
    return None


def _which(program):
    for directory in os.environ.get('PATH', os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or '.', program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _read_declaration(head, path, error):
    """The block between `# /// looper` and `# ///` near the top of a module
    file, in the configuration syntax (each line a comment):

        # /// looper
        # kind = 'output'
        # keys = 'filename format'
        # confirm = 'yes'
        # ///

    Read without running the module.  Returns a dict, or None when the file
    has no declaration.  A malformed line is reported at its own FILE:LINE."""
    lines = head.decode('utf-8', 'replace').splitlines()
    starts = [i for i, text in enumerate(lines) if text.strip() == '# /// looper']
    if not starts:
        return None
    declaration = {}
    for number in range(starts[0] + 1, len(lines)):
        text = lines[number].strip()
        if text == '# ///':
            return declaration
        body = text[1:].strip() if text.startswith('#') else ''
        m = _KEY.match(body)
        try:
            if not m:
                raise ValueError("expected '# key = value', got %r" % text)
            value, _ = _split_value(body[m.end():])
        except ValueError as e:
            error(number + 1, 'in the module declaration: %s' % e, path)
            return declaration
        if m.group(1) in _DECLARED:
            declaration[m.group(1)] = value
    error(starts[0] + 1, "the module declaration '# /// looper' has no closing '# ///' line", path)
    return declaration


def _check_against_declaration(config, block, declaration, error):
    """What the module declares against how the block uses it: its kind,
    its keys (a typo is an error, with a suggestion), the protocol options
    it supports, and their defaults."""
    name = block.items['module']
    kind = declaration.get('kind')
    if kind and kind != block.kind:
        error(block.lines['module'], "module '%s' is an %s module (its declaration says so), "
                                     "used in an %s block" % (name, kind, block.kind))
    own = set(declaration.get('keys', '').replace(',', ' ').split())
    known = own | _BLOCK_KEYS[block.kind]
    for key in block.items:
        if key not in known:
            error(block.lines[key], "unknown key '%s' for module %s%s" % (
                key, name, _did_you_mean(key, known)))
    options = ('confirm', 'confirmwindow') if block.kind == 'output' else ('ack',)
    for option in options:
        if option in declaration and option not in block.items:
            value = _value({option: declaration[option]}, {option: block.lines['module']},
                           option, error)
            setattr(block, option, value)
    if block.kind == 'input' and block.ack and 'ack' not in declaration:
        error(block.lines.get('ack', block.line), "module '%s' does not support ack (its "
                                                   "declaration has no 'ack'); remove ack = "
                                                   "'yes'" % name)
    if block.kind == 'output' and block.confirm and 'confirm' not in declaration:
        error(block.lines.get('confirm', block.line), "module '%s' does not support confirm (its "
                                                       "declaration has no 'confirm'); remove "
                                                       "confirm = 'yes'" % name)


def _load_rules(config, check=False):
    """Read, check and compile every rules file: [(path, source, code,
    watchfor)]; raise _ConfigErrors.  With check (--check), also look at what
    can be seen without running events: writeTo() of an output name that
    does not exist, and top-level imports that cannot be found."""
    import ast
    errors = []
    rules = []
    for path, line in config.rulesfiles:
        try:
            with open(path, 'rb') as f:
                source = f.read()
        except OSError as e:
            errors.append(_ConfigError(config.path, line, "cannot read rules file %s: %s; "
                                       "fix the rulesfile path" % (path, e.strerror)))
            continue
        problem = _strict_modes(path, 'the rules file')
        if problem:
            errors.append(_ConfigError(path, 1, problem))
            continue
        try:
            # From the source, not from the syntax tree: compiling a tree too
            # deep for the compiler crashes Python 3.6 where the source
            # gives a RecursionError.
            code = compile(source, path, 'exec', dont_inherit=True)
            tree = compile(source, path, 'exec', ast.PyCF_ONLY_AST, dont_inherit=True)
        except SyntaxError as e:
            errors.append(_ConfigError(path, e.lineno or 1, '%s: %s' % (type(e).__name__, e.msg)))
            continue
        except (ValueError, RecursionError, MemoryError, OverflowError) as e:
            # A NUL byte in the source; nesting too deep for the compiler.
            errors.append(_ConfigError(path, 1, 'cannot compile: %s: %s; simplify the file'
                                       % (type(e).__name__, e)))
            continue
        watchfor = _watchfor(tree, path, errors)
        if check:
            _check_rules_tree(tree, path, config, errors)
        rules.append((path, source, code, watchfor))
    if errors:
        raise _ConfigErrors(errors)
    return rules


def _watchfor(tree, path, errors):
    """The compiled `watchfor = r'REGEX'` of a rules file, read from its
    syntax tree, or None.  Anything else bound to watchfor at the top level
    is an error."""
    import ast
    found = None
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, getattr(ast, 'AnnAssign', ast.AugAssign))):
            targets = [node.target]
        if not any(isinstance(t, ast.Name) and t.id == 'watchfor' for t in targets):
            continue
        value = node.value if not isinstance(node, ast.AugAssign) else None
        text = _string_literal(value)
        if text is None or found is not None or len(targets) != 1:
            errors.append(_ConfigError(path, node.lineno, "watchfor must be assigned once, at the "
                                       "top level, a string literal: watchfor = r'REGEX'"))
            continue
        try:
            found = re.compile(text, re.MULTILINE)
        except re.error as e:
            errors.append(_ConfigError(path, node.lineno, 'watchfor: bad regular expression: %s' % e))
    return found


def _string_literal(node):
    import ast
    if isinstance(node, ast.Str):           # Python 3.6, 3.7 (ast.Constant from 3.8)
        return node.s
    if getattr(ast, 'Constant', None) and isinstance(node, ast.Constant) and \
            isinstance(node.value, str):
        return node.value
    return None


def _check_rules_tree(tree, path, config, errors):
    """--check: writeTo('name') with a literal name that is no output, and a
    top-level `import x` / `from x import y` of a module that cannot be found."""
    import ast
    import importlib.util
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == 'writeTo'):
            for arg in node.args:
                name = _string_literal(arg)
                if name is not None and name not in config.outputs:
                    errors.append(_ConfigError(path, node.lineno, "writeTo(%r): no output named "
                                               "%r; outputs are: %s%s" % (
                                                   name, name, ', '.join(config.outputs),
                                                   _did_you_mean(name, config.outputs))))
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            try:
                found = importlib.util.find_spec(name.split('.')[0]) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                errors.append(_ConfigError(path, node.lineno, "cannot import '%s': no such "
                                           "module for %s" % (name, sys.executable)))


def _load(path, check=False):
    """Parse the configuration and compile its rules: (config, rules)."""
    config = _parse_config(path)
    return config, _load_rules(config, check)


##############################################################################
# Framing: bytes from modules into lines and events, events into bytes.
##############################################################################

def _escape(value):
    """A value never carries a raw line break: newline -> `\\n`, CR -> `\\r`."""
    return value.replace('\n', '\\n').replace('\r', '\\r')


def _encode_event(tokens):
    """token=value lines then `go`, as bytes (invalid UTF-8 passes through).
    Raises UnicodeEncodeError for text that is not encodable (a lone
    surrogate that did not come from undecodable input)."""
    parts = []
    for k, v in tokens.items():
        if '\n' in v or '\r' in v:
            v = _escape(v)
        parts.append(k + '=' + v)
    parts.append('go\n')
    return '\n'.join(parts).encode('utf-8', 'surrogateescape')


def _split_events(data, n):
    """(the first n events of data, the rest): data is whole events, each
    ending in `\\ngo\\n`, which a value can never hold (it is escaped)."""
    end = 0
    for _ in range(n):
        end = data.index(b'\ngo\n', end) + 4
    return data[:end], data[end:]


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


def _plain_events(text):
    """Dicts of whole events in text that _EventParser.split_raw found plain."""
    return [dict(map(str.split, piece.split('\n'), _EQUALS, _ONES))
            for piece in text.split('\ngo\n')[:-1]]


# The fast parser's other arguments to str.split: dict(map(str.split, lines,
# _EQUALS, _ONES)) is line.split('=', 1) for each line with no bytecode run
# and no list of pairs built per event (callgrind: 5% fewer instructions an
# event than a comprehension).
_EQUALS = itertools.repeat('=')
_ONES = itertools.repeat(1)


class _EventParser(object):
    """Turns an input module's stdout into events (dicts of str -> str).

    Defined handling of bad input, each counted: a line without `=`, with an
    empty token name, or with a CR in its token name is skipped
    (`malformed`); blank lines are ignored; a line over maxline bytes is
    skipped (`oversized`); an event over MAX_EVENT bytes is skipped up to its
    `go` (`oversized_events`); `go` with no tokens is skipped (`empty`); a
    trailing CR is dropped; a CR inside a value is kept (and escaped on the
    way out); NUL bytes and invalid UTF-8 pass through.  A repeated token
    keeps its last value."""

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
        self._long = None           # the raw path's test for a line over maxline

    @property
    def oversized(self):
        return self.lines.oversized

    def feed(self, data):
        """Return the list of complete events in data.

        The whole chunk is split at `go` lines with one str.split; each event
        then becomes a dict of its lines split at their first `=`.  Anything
        unusual (a line without `=`, a blank line, an over-long line, a CR
        left after the line ends are stripped) takes _parse_slowly."""
        text = self.lines.feed(data)
        if text is None:
            return []
        careful = False
        if '\r' in text:
            text = '\n'.join([line[:-1] if line[-1:] == '\r' else line
                              for line in text.split('\n')])
            careful = '\r' in text
        if '\r' in self._partial:          # a CR inside a line of the event begun before
            careful = True
        # _partial is '' or complete lines, each ending in '\n'.  One join:
        # each + would copy the whole chunk again.
        text = ''.join(('\n', self._partial, text, '\n'))
        pieces = text.split('\ngo\n')
        pieces[0] = pieces[0][1:]
        tail = pieces.pop()
        maxline = self.maxline
        events = None
        split, eqs, ones = str.split, _EQUALS, _ONES
        # The fast path, unless a skipped event is pending, a CR is left, or
        # a line may be over maxline.  Anything else unusual makes it fail as
        # a whole and take the careful path: a line without `=`, a blank line
        # or an empty event (a piece that is '' or starts with `go`) raises
        # ValueError in dict(); an empty token name leaves '' as a key.
        if not (careful or self._skip_event or
                len(text) > maxline and max(map(len, pieces or [''])) > maxline):
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
                self._warn(logging.WARNING, 'event', "input '%s': an event over %d bytes was "
                           "skipped", self.name, MAX_EVENT)
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
                self._warn(logging.WARNING, 'line', "input '%s': skipped a line that is not "
                           "token=value or go: %r", self.name, line[:200])
                continue
            if len(line) > self.maxline:
                self.lines.oversized += 1
                self._warn(logging.WARNING, 'long', "input '%s': skipped a line over %d bytes",
                           self.name, self.maxline)
                continue
            event[key] = value
        return event

    # A chunk of whole events takes the raw path only if nothing in it is
    # unusual: every line token=value with a name, or `go`; no empty event,
    # no blank line, no CR.  (maxline and MAX_EVENT are checked apart.)  It
    # is searched in b'\n' + chunk: a pattern that starts with a literal
    # newline is scanned for fast, where `^` under re.M is tried at every
    # byte (py-spy: 41% of Looper's time with NORULES, before).
    _RAW_BAD = re.compile(br'\n(?:=|(?!go\n)[^=\n]*\n)')

    def split_raw(self, data, check_lines=True):
        """The raw path: (the bytes of the whole events now complete, how
        many), when the parser holds nothing of an event and the chunk is
        plain (see _RAW_BAD); the bytes after the last `go` are kept for the
        next call.  None when anything is unusual: then feed() must take
        this data instead (nothing of it was consumed).  Without
        check_lines (watchfor), the lines are not checked one by one: the
        events that match are parsed with care, the others are dropped
        unread."""
        if self._skip_event or self.lines._skipping:
            return None
        if self._partial:
            # The careful path left the start of an event: its lines, whole.
            self.lines._tail = self._partial.encode('utf-8', 'surrogateescape') + self.lines._tail
            self._partial = ''
        buf = self.lines._tail + data if self.lines._tail else data
        end = buf.rfind(b'\ngo\n') + 4
        if end < 4:
            if len(buf) > self.maxline or b'\r' in buf:
                return None
            self.lines._tail = buf
            return b'', 0
        events = buf[:end]
        if (b'\r' in events or b'\n\n' in events or events[:3] == b'go\n'
                or b'\ngo\ngo\n' in events
                or check_lines and (self._RAW_BAD.search(b'\n' + events) is not None or
                                    len(events) > self.maxline and self._too_long(events))):
            return None
        tail = buf[end:]
        if len(tail) > self.maxline or b'\r' in tail:
            return None
        self.lines._tail = tail
        return events, events.count(b'\ngo\n')

    def _too_long(self, events):
        """A line over maxline bytes, or an event over MAX_EVENT, in raw events.
        The pattern starts with a newline, so it is tried at line starts only
        (linear; `[^\\n]{N}` alone is tried at every byte, N bytes each)."""
        if self._long is None:
            self._long = re.compile(b'\n[^\n]{%d}' % (self.maxline + 1))
        if self._long.search(b'\n' + events):
            return True
        return len(events) > MAX_EVENT and max(map(len, events.split(b'\ngo\n'))) > MAX_EVENT

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
# Event loop: one selector, resettable deadlines, non-blocking pipes.
##############################################################################

class _Deadline(object):
    """One resettable timer for one purpose (a confirm timeout, a restart).

    set() and clear() cost no heap growth when the time moves later: the one
    heap entry is re-pushed at the new time when it comes due.  So timers
    never pile up, however often they are reset (a confirm deadline is reset
    at every answer)."""

    __slots__ = ('loop', 'callback', 'when', '_queued')

    def __init__(self, loop, callback):
        self.loop, self.callback = loop, callback
        self.when = None            # monotonic time it fires, or None when off
        self._queued = None         # time of its live heap entry, or None

    def set(self, delay):
        when = time.monotonic() + delay
        self.when = when
        if self._queued is None or when < self._queued:
            self._queued = when
            heapq.heappush(self.loop._heap, (when, next(self.loop._seq), self))

    def clear(self):
        self.when = None

    @property
    def active(self):
        return self.when is not None

    def _due(self, queued, now):
        """The heap entry for `queued` came due: fire, wait longer, or drop."""
        if queued != self._queued:
            return                  # superseded by an earlier entry
        self._queued = None
        if self.when is None:
            return
        if self.when > now:
            self._queued = self.when
            heapq.heappush(self.loop._heap, (self.when, next(self.loop._seq), self))
            return
        self.when = None
        self.callback()

    def __repr__(self):
        return '<_Deadline %s in %s>' % (getattr(self.callback, '__name__', self.callback),
                                         'off' if self.when is None else
                                         '%.3f s' % (self.when - time.monotonic()))


class _Loop(object):
    """Owns the selector and the deadlines.  Registered objects are in
    key.data and have on_ready(mask); the loop body is one select and the
    deadlines that came due.  `dirty` holds outputs to flush before the
    next select, and `before_select` callables run then too (acknowledged
    input's `ok`s); `timers` are the rules' timers."""

    def __init__(self):
        self.sel = _make_selector()
        self._heap = []
        self._seq = itertools.count()
        self.dirty = set()          # outputs with events to hand to their pipe
        self.before_select = []     # callables run once per pass, before select
        self.timers = None          # the rules' timers (arrival clock), or None

    def deadline(self, callback):
        return _Deadline(self, callback)

    def run_once(self):
        # Flush before sleeping: no event waits in a buffer for more data.
        while self.dirty:
            for output in list(self.dirty):
                self.dirty.discard(output)
                output.flush()
        for callback in self.before_select:
            callback()
        heap = self._heap
        while heap and heap[0][2]._queued != heap[0][0]:
            heapq.heappop(heap)     # superseded entries
        timeout = None
        if heap:
            timeout = max(0.0, heap[0][0] - time.monotonic())
        if self.timers is not None:
            due = self.timers.next_due()
            if due is not None:
                timeout = due if timeout is None else min(timeout, due)
        for key, mask in self.sel.select(timeout):
            key.data.on_ready(mask)
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            queued, _, deadline = heapq.heappop(heap)
            deadline._due(queued, now)
        if self.timers is not None:
            self.timers.fire_due()

    def __repr__(self):
        return '<_Loop %s fds=%d deadlines=%d>' % (type(self.sel).__name__,
                                                  len(self.sel.get_map()), len(self._heap))


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

    def drain(self, limit):
        """After the module exited: read at most `limit` bytes of what is
        left in the pipe (what the module wrote before it died), then
        close.  Whatever a surviving grandchild writes is not waited for."""
        while self.fd is not None and limit > 0:
            try:
                data = os.read(self.fd, min(READ_CHUNK, limit))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b''
            if not data:
                break
            limit -= len(data)
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
    pipe since the module started (its configuration included), so the
    ledger knows which events are fully handed over."""

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

    def truncate(self):
        """Drop what is not written yet (given up: the module must not get
        the rest of an event it would then deliver)."""
        if self.backlog:
            self.loop.sel.unregister(self.fd)
            del self.backlog[:]
            self._maybe_close()

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
# Delivery ledger: what one output owes, and what became of every event.
##############################################################################

def _after(seq, n):
    """The sequence number n events after seq (None stays None)."""
    return None if seq is None else seq + n


class _Ledger(object):
    """The bookkeeping of one output's deliveries: pure, no descriptors.

    An entry is [data, count, seq]: the bytes of `count` whole events (each
    ending in `\\ngo\\n`) and the input sequence number of its first event
    (None for events no input event caused, such as a timer's).  Entries
    move, in order, from `queue` (not yet handed to the module) to `sent`
    (written or being written to the current module process, each with the
    offset in its stdin just after it) and then:

      confirmed  with confirm, answered `ok`
      rejected   with confirm, answered `reject`
      written    without confirm, accepted by the pipe; kept in `window`
                 (the last PIPE_WINDOW bytes) until the module is known to
                 have read them
      back       to the queue's front: answered `error` (that event and
                 every later one in flight, so order is kept), or in flight
                 or unread when the module died
      lost       given up (drain timeout, a dead output)
      dropped    refused at the door (overflow = drop, a stopped output)
      unconfirmed  written to a module that then exited non-zero: it may or
                 may not have delivered them

    Invariant (the property tests check it): every event added is, at any
    time, in exactly one of queue, sent, or one of the counters above, and
    `written` counts only what the module read."""

    def __init__(self, confirm):
        self.confirm = confirm
        self.queue = collections.deque()
        self.sent = collections.deque()     # [data, count, seq, end offset]
        self.window = collections.deque()   # written, unconfirmed: [data, count, seq, end]
        self.events = 0                     # events in queue + sent
        self.bytes = 0                      # bytes in queue + sent
        self.inflight = 0                   # events in sent
        self.answered = 0                   # events of sent[0] already answered (confirm)
        self.offset = 0                     # stdin offset of the next byte written
        self.accepted = 0                   # bytes the pipe has accepted
        self.instance_written = 0           # events `written` since the module started
        self.confirmed = self.written = self.rejected = self.retried = 0
        self.lost = self.dropped = self.unconfirmed = 0

    def __repr__(self):
        return '<_Ledger queue=%d sent=%d window=%d events=%d bytes=%d>' % (
            len(self.queue), len(self.sent), len(self.window), self.events, self.bytes)

    def add(self, data, count, seq):
        self.queue.append([data, count, seq])
        self.events += count
        self.bytes += len(data)

    def begin(self, offset):
        """A new module process, whose stdin has `offset` bytes (its
        configuration) before the first event."""
        assert not self.sent and not self.window, self
        self.offset = self.accepted = offset
        self.answered = 0
        self.instance_written = 0

    def take(self, max_bytes, max_events):
        """Move entries from the queue to `sent` (at least one, if any and
        max_events allows), up to the bounds; return their bytes joined."""
        queue, sent = self.queue, self.sent
        out = []
        size = 0
        room = max_events - self.inflight
        offset = self.offset
        while queue and room > 0 and (size < max_bytes or not out):
            entry = queue[0]
            if entry[1] > room:
                if out or not self.confirm:
                    break
                head, rest = _split_events(entry[0], room)     # a window smaller than a chunk
                queue[0] = [rest, entry[1] - room, _after(entry[2], room)]
                entry = [head, room, entry[2]]
            else:
                queue.popleft()
            size += len(entry[0])
            offset += len(entry[0])
            entry.append(offset)
            sent.append(entry)
            out.append(entry[0])
            room -= entry[1]
            self.inflight += entry[1]
        self.offset = offset
        return b''.join(out)

    def accept(self, total):
        """Without confirm: the pipe has accepted `total` bytes in all.
        Entries now wholly in it count as written; returns how many events."""
        self.accepted = total
        sent, window = self.sent, self.window
        n = 0
        while sent and sent[0][3] <= total:
            entry = sent.popleft()
            window.append(entry)
            n += entry[1]
            self.bytes -= len(entry[0])
        if sent and sent[0][1] > 1:
            # A chunk of events partly in the pipe: its whole events are.
            data, count, seq, end = sent[0]
            start = end - len(data)
            whole = data.count(b'\ngo\n', 0, total - start) if start < total else 0
            if whole:
                head, rest = _split_events(data, whole)
                window.append([head, whole, seq, start + len(head)])
                sent[0] = [rest, count - whole, _after(seq, whole), end]
                n += whole
                self.bytes -= len(head)
        if n:
            self.events -= n
            self.inflight -= n
            self.written += n
            self.instance_written += n
            oldest = total - PIPE_WINDOW
            while window[0][3] < oldest:
                window.popleft()
        return n

    def answer(self, n, outcome):
        """With confirm: `n` answers `ok` (outcome 'confirmed') or `reject`
        ('rejected') for the oldest events in flight.  For rejections,
        returns the tokens of each rejected event (for the log)."""
        rejected = []
        sent = self.sent
        while n and sent:
            entry = sent[0]
            take = min(n, entry[1] - self.answered)
            if outcome == 'rejected':
                rejected.append(self.event_text(entry, self.answered))
            self.answered += take
            n -= take
            setattr(self, outcome, getattr(self, outcome) + take)
            self.events -= take
            self.inflight -= take
            if self.answered == entry[1]:
                sent.popleft()
                self.bytes -= len(entry[0])
                self.answered = 0
        return rejected

    def back(self):
        """Everything in flight goes back to the queue's front, in order
        (an `error` answer, or the module died); the events of a partly
        answered entry that were answered stay answered.  Returns how many
        events went back."""
        sent = self.sent
        if self.answered:
            entry = sent[0]
            _, rest = _split_events(entry[0], self.answered)
            self.bytes -= len(entry[0]) - len(rest)
            sent[0] = [rest, entry[1] - self.answered, _after(entry[2], self.answered), entry[3]]
            self.answered = 0
        n = self.inflight
        while sent:
            self.queue.appendleft(sent.pop()[:3])
        self.inflight = 0
        return n

    def died(self, read_up_to, clean):
        """The module process is gone.  With confirm, everything in flight
        goes back.  Without, the stream it was written (the window, then
        what was still being written) is cut at `read_up_to`, the byte the
        module had read up to: whole events before it are written, whatever
        comes after goes back to the queue's front, exactly, an entry read
        only in part split at its last whole event.  If the module exited
        non-zero (not clean), what it did read since it started is
        `unconfirmed`.  Returns (events put back, events now unconfirmed)."""
        if self.confirm:
            return self.back(), 0
        back = []
        in_window = len(self.window)
        written = 0                 # change to `written`
        for i, entry in enumerate(itertools.chain(self.window, self.sent)):
            data, count, seq, end = entry
            start = end - len(data)
            counted = i < in_window
            if end <= read_up_to:
                written += 0 if counted else count
                continue
            read = data.count(b'\ngo\n', 0, read_up_to - start) if start < read_up_to else 0
            if read:
                data = _split_events(data, read)[1]
            written += (read - count) if counted else read
            back.append([data, count - read, _after(seq, read)])
        self.window.clear()
        self.sent.clear()
        self.inflight = 0
        self.written += written
        self.instance_written += written
        self.queue.extendleft(reversed(back))
        self.events = sum(entry[1] for entry in self.queue)
        self.bytes = sum(len(entry[0]) for entry in self.queue)
        unconfirmed = 0
        if not clean:
            unconfirmed = self.instance_written
            self.written -= unconfirmed
            self.unconfirmed += unconfirmed
        self.instance_written = 0
        return sum(entry[1] for entry in back), unconfirmed

    def lose(self):
        """Give up on everything not yet answered or written: counted lost."""
        self.back()
        n = self.events
        self.lost += n
        self.queue.clear()
        self.events = self.bytes = 0
        return n

    def oldest_seq(self):
        """The input sequence number of the oldest event not yet settled
        here, or None (acknowledged input waits for it)."""
        for entries in (self.sent, self.queue):
            for entry in entries:
                if entry[2] is not None:
                    return entry[2] + (self.answered if entries is self.sent and
                                       entry is self.sent[0] else 0)
        return None

    @staticmethod
    def event_text(entry, skip, limit=EVENT_REPR_MAX):
        """The tokens of an entry's event number `skip`, for a log line."""
        data = _split_events(entry[0], skip)[1] if skip else entry[0]
        first = data[:data.find(b'\ngo\n')].decode('utf-8', 'surrogateescape')
        text = repr(dict(line.split('=', 1) for line in first.split('\n') if '=' in line))
        return text if len(text) <= limit else text[:limit] + '...'


##############################################################################
# Modules: one child process, the state machine that supervises it, and the
# input and output protocols on top.
##############################################################################

class _Child(object):
    """One run of a module program: the process and the parent's ends of its
    three pipes (a _Writer on its stdin, _Readers on its stdout and stderr),
    which this object owns and closes in finish().  For outputs it also owns
    a duplicate of the read end of the module's stdin (`peek`), only to ask
    at its exit how many bytes it never read (FIONREAD): the price is that
    an output never gets EPIPE, so one that closes stdin and lives on is
    caught by the write deadline instead.  Raises OSError if it cannot start."""

    def __init__(self, loop, argv, cwd, env, pass_fds, label, peek, on_stdout, on_stderr,
                 on_stdin_error, on_progress):
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        _grow_pipe(in_w)
        _grow_pipe(out_w)
        self.peek = os.dup(in_r) if peek else None
        try:
            self.proc = subprocess.Popen(
                argv, stdin=in_r, stdout=out_w, stderr=err_w, cwd=cwd, env=env,
                pass_fds=pass_fds, close_fds=True, start_new_session=True,
                preexec_fn=_child_setup)
        except (OSError, subprocess.SubprocessError):
            for fd in (in_w, out_r, err_r) + ((self.peek,) if self.peek is not None else ()):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        self.pid = self.proc.pid
        self.label = '%s pid %d' % (label, self.pid)
        self.started_at = time.monotonic()
        self.stdin = _Writer(loop, in_w, self.label, on_progress, on_stdin_error)
        self.stdout = _Reader(loop, out_r, self.label, on_stdout, lambda: None)
        self.stderr = _Reader(loop, err_r, self.label, on_stderr, lambda: None)
        self.unread = 0
        self.reaped = False

    def signal_group(self, sig):
        """Signal the module's whole process group (so its children go too),
        never after it was reaped (its pid may belong to another process)."""
        if self.reaped:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:   # the module changed its credentials
            _log.error('%s: cannot signal process group %d: %s', self.label, self.pid, e)

    def finish(self):
        """The process was reaped: read (a bounded amount of) what is left in
        its pipes, learn how much of its stdin it never read, close all."""
        self.reaped = True
        self.stdout.drain(PIPE_WINDOW)
        self.stderr.drain(PIPE_WINDOW)
        if self.peek is not None:
            self.unread = _unread_bytes(self.peek)
            os.close(self.peek)
            self.peek = None
        self.stdin.close()

    def __repr__(self):
        return '<_Child pid=%d stdin=%r stdout=%r>' % (self.pid, self.stdin, self.stdout)


class _Stderr(object):
    """What a module writes on stderr, into Looper's log: a line a record,
    tagged with the module; a `<N>` prefix (sd-daemon(3): 0-3 error, 4
    warning, 5-6 info, 7 debug) chooses the level, else the block's
    `stderrlevel`.  A token bucket (STDERR_BURST lines, then STDERR_RATE a
    second) keeps a flood from flooding the log; what it holds back is
    counted and said.  An input's `progress DONE TOTAL` lines feed the
    progress display instead.  The last lines are kept for the report of
    a configuration error (exit 78)."""

    _PRIORITY = re.compile(r'<([0-7])>')
    _LEVELS = (logging.ERROR,) * 4 + (logging.WARNING, logging.INFO, logging.INFO, logging.DEBUG)

    def __init__(self, module):
        self.module = module
        self.default = getattr(logging, module.block.stderrlevel.upper())
        self._tokens = float(STDERR_BURST)
        self._refilled = time.monotonic()
        self.held = 0
        self.last = collections.deque(maxlen=3)
        self.lines = None

    def start(self):
        self.lines = _LineReader(MAX_LINE)

    def feed(self, data):
        text = self.lines.feed(data)
        if text is not None:
            for line in text.split('\n'):
                self._line(line.rstrip('\r'))

    def flush(self):
        if self.lines is not None:
            tail = self.lines.flush()
            if tail.strip():
                self._line(tail)
        self._say_held()

    def _line(self, line):
        if not line.strip():
            return
        level = self.default
        m = self._PRIORITY.match(line)
        if m:
            level = self._LEVELS[int(m.group(1))]
            line = line[m.end():]
        if line.startswith('progress ') and self.module.kind == 'input':
            self.module.router.input_progress(line)
            return
        self.last.append(line)
        now = time.monotonic()
        self._tokens = min(STDERR_BURST, self._tokens + (now - self._refilled) * STDERR_RATE)
        self._refilled = now
        if self._tokens < 1:
            self.held += 1
            return
        self._tokens -= 1
        self._say_held()
        _log.log(level, '%s: %s', self.module.child.label if self.module.child else
                 self.module.label, line)

    def _say_held(self):
        if self.held:
            _log.warning('%s: %d lines of its stderr were not logged (more than %d a second)',
                         self.module.label, self.held, STDERR_RATE)
            self.held = 0


class _Module(object):
    """Supervises one module program: starts it, restarts it with a growing
    delay, stops it in order.  The protocol on top is the owner's (_Input,
    _Output), which this calls: owner.started(child), owner.stdout(data),
    owner.progress(), owner.exited(code, how, uptime) -> (decision, detail)
    with decision 'restart', 'done' or 'fatal'.

    States, changed only by _set(), which logs each change at debug level
    and checks the state being left (supervisord's ProcessStates):

      stopped   never started
      running   a process is there and wanted
      stopping  asked to exit (quit/EOF, then SIGTERM, then SIGKILL)
      killing   misbehaved (hung, desynced): SIGTERM, then SIGKILL; restarted
      backoff   no process; a restart is due after a delay
      exited    no process, none to come (finished, stopped, retired)
      fatal     no process: its configuration is wrong (exit 78); not restarted

    Death is seen on every path: EPIPE on stdin, EOF on stdout, and the exit
    status from waitpid; the exit is handled once the pid is reaped, after
    reading what is left in its pipes.  The restart delay doubles up to
    maxrestartdelay and starts over after HEALTHY_RUN seconds of uptime."""

    _CHANGES = {
        'stopped': ('running', 'backoff', 'exited'),
        'running': ('stopping', 'killing', 'backoff', 'exited', 'fatal'),
        'stopping': ('killing', 'backoff', 'exited', 'fatal'),
        'killing': ('backoff', 'exited', 'fatal'),
        'backoff': ('running', 'backoff', 'exited'),
        'exited': (),
        'fatal': (),
    }

    def __init__(self, router, block, owner):
        self.router, self.loop, self.block, self.owner = router, router.loop, block, owner
        self.kind, self.name = block.kind, block.name
        self.label = '%s %r' % (self.kind, self.name)
        self.state = 'stopped'
        self.child = None
        self.starts = 0
        self.restarts = 0
        self.delay = block.restartdelay
        self.stderr = _Stderr(self)
        self._restart = self.loop.deadline(self.start)
        self._stop_step = self.loop.deadline(self._next_stop_step)
        self._stop_signal = None    # the next step of the stop sequence: SIGTERM, SIGKILL
        self._start_failed = False  # the last start failed: say so once

    def _set(self, state):
        if state not in self._CHANGES[self.state]:
            raise AssertionError('%s: state %s -> %s is not allowed' % (self.label, self.state, state))
        _log.debug('%s: %s -> %s', self.label, self.state, state)
        self.state = state

    @property
    def running(self):
        return self.state == 'running'

    @property
    def over(self):
        return self.state in ('exited', 'fatal')

    # -- starting -----------------------------------------------------------

    def start(self):
        if self.state not in ('stopped', 'backoff'):
            return
        env = dict(os.environ)
        env['LOOPER_NAME'] = self.name
        pass_fds = []
        if '-' in self.block.items.values():
            # The module asked for Looper's stdin (input) or stdout (output).
            var, fd = self.router.std_fd(self.kind)
            env[var] = str(fd)
            pass_fds.append(fd)
        if self.kind == 'input' and self.router.progress is not None:
            env['LOOPER_PROGRESS'] = '1'
        argv = self.block.argv
        if not os.access(self.block.module, os.X_OK):
            self._cannot_start('the file is gone or not executable; restore it (chmod +x)')
            return
        _log.debug('%s: starting %s', self.label, argv)
        try:
            self.child = _Child(self.loop, argv, self.router.config.dir, env, pass_fds,
                                self.label, self.kind == 'output', self.owner.stdout,
                                self.stderr.feed, self._stdin_error, self.owner.progress)
        except (OSError, subprocess.SubprocessError) as e:
            self._cannot_start('%s; check that it exists, is executable and that its #! '
                               'interpreter is installed' % (getattr(e, 'strerror', None) or e))
            return
        if self._start_failed:
            _log.info('%s: started again', self.label)
        self._start_failed = False
        self.starts += 1
        self.stderr.start()
        self._set('running')
        self.router.children[self.child.pid] = self
        _log.debug('%s: started as pid %d', self.label, self.child.pid)
        self.owner.started(self.child)

    def _cannot_start(self, why):
        """A start failure is fatal-like: one clear error, then the longest
        delay between tries (logged at debug after the first)."""
        self.child = None
        self.delay = self.block.maxrestartdelay
        _log.log(logging.DEBUG if self._start_failed else logging.ERROR,
                 '%s: cannot start %s: %s; retrying in %g s (and every %g s after that, '
                 'quietly)', self.label, self.block.module, why, self.delay, self.delay)
        self._start_failed = True
        self._backoff()

    def _backoff(self):
        self._set('backoff')
        self.restarts += 1
        self._restart.set(self.delay)
        delay = self.delay
        self.delay = min(self.delay * 2, self.block.maxrestartdelay)
        return delay

    def _stdin_error(self, reason):
        self.owner.stdin_error(reason)

    # -- stopping -----------------------------------------------------------

    def fail(self, reason):
        """The module misbehaved (hung, desynced): stop it now with SIGTERM,
        then SIGKILL; it is restarted after its exit."""
        if self.state not in ('running', 'stopping'):
            return
        _log.warning('%s (pid %d): %s; stopping it with SIGTERM', self.label, self.child.pid, reason)
        self._set('killing')
        self.child.stdin.close()
        self.child.signal_group(signal.SIGTERM)
        self._stop_signal = signal.SIGKILL
        self._stop_step.set(self.block.closetimeout)

    def stop(self, how):
        """Ask the module to exit, for good: `eof` closes its stdin (after
        what is queued for it, e.g. `quit`); `term` sends SIGTERM at once.
        Then closetimeout, SIGTERM, closetimeout, SIGKILL.  A module waiting
        for its restart just does not restart."""
        if self.state == 'backoff' or self.state == 'stopped':
            self._restart.clear()
            self._set('exited')
            self.router.module_done(self)
            return
        if self.state != 'running':
            if how == 'term' and self.state == 'stopping' and self._stop_signal == signal.SIGTERM:
                self._next_stop_step()      # a second stop request: no more waiting
            return
        self._set('stopping')
        if how == 'term':
            _log.info('%s (pid %d): stopping it with SIGTERM', self.label, self.child.pid)
            self.child.signal_group(signal.SIGTERM)
            self._stop_signal = signal.SIGKILL
        else:
            self.child.stdin.close_when_drained()
            self._stop_signal = signal.SIGTERM
        self._stop_step.set(self.block.closetimeout)

    def _next_stop_step(self):
        if self.child is None or self.child.reaped or self._stop_signal is None:
            return
        sig = self._stop_signal
        _log.warning('%s (pid %d) did not exit within %g s of %s; sending %s', self.label,
                     self.child.pid, self.block.closetimeout,
                     'quit/EOF' if sig == signal.SIGTERM else 'SIGTERM', sig.name)
        self.child.signal_group(sig)
        self._stop_signal = signal.SIGKILL if sig == signal.SIGTERM else None
        if self._stop_signal is not None:
            self._stop_step.set(self.block.closetimeout)

    # -- exit ---------------------------------------------------------------

    def on_exit(self, status):
        """waitpid reported the exit: read what is left in its pipes, close
        them, let the owner decide, report the cause, restart or not."""
        child = self.child
        code, how = _describe_status(status)
        self._stop_step.clear()
        self._stop_signal = None
        child.finish()
        self.stderr.flush()
        uptime = time.monotonic() - child.started_at
        if uptime >= HEALTHY_RUN:
            self.delay = self.block.restartdelay
        decision, detail = self.owner.exited(code, how, uptime)
        self.child = None
        what = '%s (pid %d) %s after %.1f s' % (self.label, child.pid, how, uptime)
        if decision == 'fatal':
            self._set('fatal')
            said = '; it said: %s' % ' | '.join(self.stderr.last) if self.stderr.last else ''
            _log.error('%s: %s: a configuration error (exit status %d); not restarting it%s; '
                       'fix the block and reload (SIGHUP)', self.block.where(), what, code, said)
            self.router.module_done(self)
        elif decision == 'done':
            was = self.state
            self._set('exited')
            expected = detail is None or code == 0 or (
                was == 'stopping' and code in (-signal.SIGTERM, -signal.SIGKILL))
            level = logging.INFO if expected and not (detail or '').startswith('; ') \
                else logging.WARNING
            _log.log(level, '%s%s', what, detail or '')
            self.router.module_done(self)
        else:
            delay = self._backoff()
            _log.warning('%s%s; restarting it in %g s', what, detail, delay)

    def __repr__(self):
        return '<_Module %s state=%s child=%r>' % (self.label, self.state, self.child)


class _Input(object):
    """The input module's protocol: it gets its configuration (and
    `configure`, then `ok` acknowledgements, with ack) on stdin and writes
    events on stdout, which the router takes.  Exit 0 ends the run; 78 is a
    configuration error (the run ends); any other exit restarts it.  Parsed
    events wait in the router's `pending` while a blocking output is full;
    reading stops meanwhile, so memory stays bounded."""

    kind = 'input'

    def __init__(self, router, block):
        self.router, self.block, self.name = router, block, block.name
        self.parser = _EventParser(block.name, router.config.maxline)
        self.module = _Module(router, block, self)
        self.truncated = 0
        self.ack = block.ack
        self.base = 0               # sequence number of this process's first event
        self.acked = 0              # `ok`s written to this process
        self.finished = False       # exited with status 0: the run is over

    @property
    def label(self):
        return self.module.label

    def started(self, child):
        child.stdin.write(self.block.config_lines().encode('utf-8', 'surrogateescape'))
        self.base = self.router.events_in
        self.acked = 0
        if self.ack:
            child.stdin.write(b'configure\n')
        else:
            child.stdin.close_when_drained()

    def stdout(self, data):
        self.router.chunk(self.parser, data)

    def progress(self):
        pass

    def stdin_error(self, reason):
        """An input may exit without reading its configuration, or close its
        stdin: not an error (with ack it means no more `ok`s are wanted)."""
        _log.debug('%s: %s', self.label, reason)

    def pause(self):
        if self.module.child:
            self.module.child.stdout.pause()

    def resume(self):
        if self.module.child:
            self.module.child.stdout.resume()

    def acknowledge(self, settled):
        """Every event before sequence number `settled` is settled: write
        the `ok`s this process is owed for them, in one write."""
        child = self.module.child
        if child is None or not self.module.running:
            return
        n = min(settled, self.router.events_in) - self.base - self.acked
        if n > 0:
            self.acked += n
            child.stdin.write(b'ok\n' * n)

    def exited(self, code, how, uptime):
        events, lost = self.parser.eof()
        if events:
            self.router.take(events)
        if lost:
            self.truncated += 1
            # Expected when Looper itself stopped the module in mid-write.
            _log.log(logging.INFO if self.module.state == 'stopping' else logging.WARNING,
                     "%s: discarded an incomplete event (%d lines without 'go') at the end "
                     "of its output", self.label, lost)
        if code == EX_CONFIG:
            return 'fatal', ''
        if self.module.state == 'stopping' or self.router.stopping:
            return 'done', ''
        if code == 0:
            self.finished = True
            return 'done', ': the input is finished'
        return 'restart', ''

    def __repr__(self):
        return '<_Input %s %r>' % (self.name, self.module)


class _Output(object):
    """An output module's protocol, its bounded queue and its delivery ledger.

    Events (encoded bytes) are added to the ledger.  Without confirm,
    flush() writes them in chunks of up to WRITE_CHUNK bytes; an event counts
    as written once its last byte is in the pipe, and what a dead module
    never read is sent again.  With confirm, up to confirmwindow events are
    in flight; `ok` confirms, `reject` gives up on one, `error` puts that
    event and every later one in flight back (resent after a growing pause,
    in order); no answer within confirmtimeout, or a desync, restarts the
    module and the events are sent again.  A full queue (queuesize events
    or queuebytes bytes) blocks the input (overflow=block) or drops and
    counts (overflow=drop)."""

    kind = 'output'

    def __init__(self, router, block):
        self.router, self.loop, self.block, self.name = router, router.loop, block, block.name
        self.module = _Module(router, block, self)
        self.ledger = _Ledger(block.confirm)
        self.confirm = block.confirm
        self.window = block.confirmwindow if block.confirm else float('inf')
        self.blocking = block.overflow == 'block'
        self.ready = False          # configured (and, with confirm, `ok` seen)
        self.stale = 0              # answers still due for events an `error` put back
        self.draining = False       # stopping: deliver the queue, then quit
        self.closed = None          # why it takes no more events (gave up, fatal), or None
        self.successor = None       # a reload replaced it: what comes back goes there
        self.retired = False        # a reload replaced or removed it: nothing new comes
        self.cut = False            # its pipe ends inside an event (handed over): EOF, no quit
        self.predecessor = None     # the instance this one replaced, until it is gone
        self.quiet = False          # its destination (Looper's stdout) is gone: say little
        self.failures = 0           # non-zero exits after quit
        self.retry_delay = block.retrydelay
        self._replies = None
        self._confirm = self.loop.deadline(self._confirm_timeout)
        self._retry = self.loop.deadline(self._retry_now)
        self._write = self.loop.deadline(self._write_timeout)
        self._drain = self.loop.deadline(self.give_up)
        self._waiting_for = 'configure'
        self._drop_warn = _Throttle()

    @property
    def label(self):
        return self.module.label

    def __repr__(self):
        return '<_Output %s %r %r>' % (self.name, self.module, self.ledger)

    # -- the queue ----------------------------------------------------------

    def full(self):
        ledger = self.ledger
        return ledger.events >= self.block.queuesize or ledger.bytes >= self.block.queuebytes

    def enqueue_read(self, data, count, seq):
        """A read's worth of whole events (NORULES), as one entry.  A
        blocking output takes it whole, so its bounds are exceeded by at
        most one read (READ_CHUNK bytes) and the input pauses after it; a
        dropping output takes the events that fit and drops the rest,
        counted.  True when that made a blocking output full."""
        ledger = self.ledger
        if self.blocking and not self.closed:
            ledger.add(data, count, seq)
            self.loop.dirty.add(self)
            return self.full()
        if self.closed or (ledger.events + count <= self.block.queuesize and
                           ledger.bytes + len(data) <= self.block.queuebytes):
            return self.enqueue(data, count, seq)
        pieces = data.split(b'\ngo\n')          # dropping, and it does not all fit
        pieces.pop()
        for i, piece in enumerate(pieces):
            self.enqueue(piece + b'\ngo\n', 1, seq + i)
        return False

    def enqueue(self, data, count, seq):
        """Queue `count` events (their bytes), or drop and count them; True
        when that made a blocking output full."""
        ledger = self.ledger
        if self.closed:
            ledger.lost += count
            self._drop_warn(logging.INFO if self.quiet else logging.ERROR, 'closed',
                            '%s takes no more events (%s): %d lost; %d lost so far',
                            self.label, self.closed, count, ledger.lost)
            return False
        if self.full():
            block = self.block
            if not self.blocking:
                ledger.dropped += count
                self._drop_warn(logging.WARNING, 'full', '%s: queue full (%d events, %d bytes), '
                                'dropped an event; %d dropped so far', self.label,
                                ledger.events, ledger.bytes, ledger.dropped)
                return False
            if (ledger.events >= FANOUT_LIMIT * block.queuesize or
                    ledger.bytes >= FANOUT_LIMIT * block.queuebytes):
                ledger.dropped += count
                self._drop_warn(logging.ERROR, 'fanout', '%s: one event wrote to it more than %d '
                                'times its queue bounds allow; dropped; %d dropped so far',
                                self.label, FANOUT_LIMIT, ledger.dropped)
                return False
        ledger.add(data, count, seq)
        self.loop.dirty.add(self)
        return self.blocking and self.full()

    # -- the module's life --------------------------------------------------

    def start(self):
        self.module.start()

    def started(self, child):
        self.ready = False
        self.stale = 0
        self._replies = _LineReader(MAX_LINE)
        config = (self.block.config_lines() + 'configure\n').encode('utf-8', 'surrogateescape')
        self.ledger.begin(len(config))
        child.stdin.write(config)
        if self.confirm:
            self._waiting_for = 'configure'
            self._confirm.set(self.block.confirmtimeout)
        else:
            self.ready = True
            self.loop.dirty.add(self)

    def flush(self):
        """Hand queued events to the pipe, without blocking."""
        module = self.module
        if self.predecessor is not None:
            return                  # its events come first: wait until it is gone
        if self.ready and module.running and not self._retry.active and not self.stale:
            # After an `error`, nothing is resent until the module has
            # answered every event it had behind the failed one, so all of
            # those come before the first resent one.
            stdin = module.child.stdin
            ledger = self.ledger
            if self.confirm:
                while (ledger.queue and ledger.inflight < self.window and not stdin.backlog
                       and stdin.fd is not None):
                    if not ledger.inflight and not self.stale:
                        self._waiting_for = 'an event'
                        self._confirm.set(self.block.confirmtimeout)
                    stdin.write(ledger.take(WRITE_CHUNK, self.window))
            else:
                while ledger.queue and not stdin.backlog and stdin.fd is not None:
                    stdin.write(ledger.take(WRITE_CHUNK, self.window))
                    self._account()
            if stdin.backlog and not self._write.active:
                self._write.set(self.block.writetimeout)
        self._maybe_quit()

    def _account(self):
        """Without confirm: count what the pipe accepted as written."""
        child = self.module.child
        if child is not None and self.ledger.accept(child.stdin.written):
            self.router.output_progress(self)

    def progress(self):
        """The pipe accepted more of the backlog."""
        if not self.confirm:
            self._account()
        self.loop.dirty.add(self)

    def stdin_error(self, reason):
        if self.module.running:
            self.module.fail(reason)

    def _write_timeout(self):
        """The write deadline: an output that accepts no bytes for
        writetimeout seconds while it has a backlog is hung."""
        child = self.module.child
        if not self.module.running or child is None or not child.stdin.backlog:
            return
        idle = time.monotonic() - child.stdin.last_progress
        if idle >= self.block.writetimeout:
            self.module.fail('accepted no data for %.0f s (writetimeout)' % idle)
        else:
            self._write.set(self.block.writetimeout - idle)

    def _confirm_timeout(self):
        self.module.fail('no answer for %s within %g s (confirmtimeout)'
                         % (self._waiting_for, self.block.confirmtimeout))

    def _retry_now(self):
        self.loop.dirty.add(self)

    # -- answers --------------------------------------------------------------

    _ALL_OK = re.compile(r'ok(?:\nok)*\Z')

    def stdout(self, data):
        text = self._replies.feed(data)
        if text is None or not self.module.running:
            return
        if not self.confirm:
            self._drop_warn(logging.WARNING, 'stdout', '%s wrote on its stdout (ignored; it is '
                            'not configured with confirm): %r', self.label, text[:200])
            return
        if '\r' in text:
            text = text.replace('\r', '')
        if self._ALL_OK.match(text):
            self._answers('ok', text.count('\n') + 1, '')
            return
        for line in text.split('\n'):
            if not self.module.running:
                return
            word, _, reason = line.partition(' ')
            self._answers(word, 1, reason.strip() or 'no reason given')

    def _answers(self, word, n, reason):
        """`n` answers `word` (ok, error, reject) in a row."""
        if word not in ('ok', 'error', 'reject') or (not self.ready and word != 'ok'):
            self.module.fail('protocol desync: got %r when %s' % (
                ('%s %s' % (word, reason))[:200],
                "waiting for 'ok' to configure" if not self.ready else 'an answer was due'
                if self.ledger.inflight or self.stale else 'no answer was due'))
            return
        ledger = self.ledger
        if not self.ready:
            self.ready = True
            n -= 1
            _log.debug('%s: confirmed its configuration', self.label)
            self.loop.dirty.add(self)
        if n and self.stale:
            k = min(n, self.stale)      # answers for events already put back: ignored
            self.stale -= k
            n -= k
            if not self.stale:
                self.loop.dirty.add(self)   # the resend may go (flush)
        extra = max(0, n - ledger.inflight)
        n -= extra
        if n:
            if word == 'ok':
                ledger.answer(n, 'confirmed')
                self.retry_delay = self.block.retrydelay
            elif word == 'reject':
                for text in ledger.answer(n, 'rejected'):
                    _log.error('%s rejected an event (%s), not retried: %s', self.label, reason, text)
            else:
                back = ledger.back()
                ledger.retried += back
                self.stale = back - 1
                delay = self.retry_delay
                self.retry_delay = min(self.retry_delay * 2, self.block.maxrestartdelay)
                self._drop_warn(logging.WARNING, 'error', '%s: could not deliver an event (%s); '
                                'resending it%s in %g s', self.label, reason,
                                ' and the %d after it' % (back - 1) if back > 1 else '', delay)
                self._retry.set(delay)
            self.router.output_progress(self)
            self.loop.dirty.add(self)
        if extra:
            self.module.fail('protocol desync: got %r when no answer was due' % word)
        elif ledger.inflight or self.stale:
            self._confirm.set(self.block.confirmtimeout)
        elif self.ready:
            self._confirm.clear()

    # -- exit -----------------------------------------------------------------

    def exited(self, code, how, uptime):
        """The module is gone: what it never got goes back to the queue
        (exactly what it never read, without confirm); then restart it,
        or not."""
        for deadline in (self._confirm, self._retry, self._write):
            deadline.clear()
        child = self.module.child
        self.ready = False
        self.stale = 0
        ledger = self.ledger
        read_up_to = child.stdin.written - child.unread
        back, unconfirmed = ledger.died(read_up_to, code == 0)
        detail = ''
        if unconfirmed:
            detail += ('; %d event(s) written to it since it started are unconfirmed (it may not '
                       'have delivered them; confirm = yes would tell)' % unconfirmed)
        if self.successor is not None and ledger.queue:
            self.successor.take_over(self)
        stopping = self.module.state == 'stopping'
        decision = 'restart'
        if code != 0 and '-' in self.block.items.values() and _reader_gone(1):
            # It wrote to Looper's stdout and its reader went away (`| head`):
            # nothing will ever be delivered there again; stop, quietly.
            self.quiet = True
            self.close("Looper's stdout was closed by its reader")
            self.router.stdout_closed()
            ledger.lose()
            return 'done', None
        if code == EX_CONFIG:
            self.close('its configuration is wrong (%s)' % self.block.where())
            decision = 'fatal'
        elif self.closed or (stopping and not ledger.events):
            if code != 0:
                self.failures += 1
            decision = 'done'
        if decision != 'restart':
            lost = ledger.lose()
            if lost:
                detail += '; %d event(s) it never %s are lost' % (
                    lost, 'confirmed' if self.confirm else 'read')
        elif back:
            detail += '; %d event(s) it had not %s kept in its queue' % (
                back, 'confirmed' if self.confirm else 'read')
        return decision, detail

    # -- shutdown -------------------------------------------------------------

    def drain(self):
        """Looper is stopping (or a reload removed this output): deliver the
        queue, then `quit`; give up after draintimeout and count the rest."""
        if self.draining:
            return
        self.draining = True
        self._drain.set(self.block.draintimeout)
        if self.module.state == 'backoff' and not self.ledger.events and self._idle():
            self.module.stop('eof')
        self._maybe_quit()
        self.loop.dirty.add(self)

    def _idle(self):
        """Nothing more will come: retired, or the input is done and nothing
        is pending."""
        return self.retired or self.router.input_done()

    def _maybe_quit(self):
        if (self.draining and self.module.running and self.ready and not self.ledger.events
                and not self.stale and self._idle()):
            _log.debug('%s: queue delivered; sending quit', self.label)
            if not self.cut:
                self.module.child.stdin.write(b'quit\n')
            self.module.stop('eof')

    def _lose_all(self):
        """Give up on what is queued and in flight: what the pipe holds whole
        was written; the rest of the backlog is dropped, so that the module
        cannot complete an event counted lost; answers still due for the
        lost events in flight are not a desync."""
        child = self.module.child
        if child is not None:
            if not self.confirm:
                self._account()
            child.stdin.truncate()
        self.stale += self.ledger.inflight
        return self.ledger.lose()

    def give_up(self):
        """The drain deadline: what is left is lost (or, for an output a
        reload replaced, handed to the new instance)."""
        self._drain.clear()
        if self.successor is not None:
            self._hand_over(in_flight=True)
            self.close('a reload replaced it')
            self.module.stop('eof')
            return
        n = self._lose_all()
        if n:
            _log.error('%s: could not deliver %d event(s) within %g s (draintimeout); they are '
                       'lost', self.label, n, self.block.draintimeout)
        self.close('it gave up at shutdown')
        self.module.stop('eof')

    def abort(self):
        """A second stop signal: no more draining."""
        self._drain.clear()
        n = self._lose_all()
        if n:
            _log.error('%s: stopping without draining (second stop request): %d event(s) not '
                       'delivered, counted as lost', self.label, n)
        self.close('Looper is stopping')
        self.module.stop('term')

    def close(self, why):
        """Take no more events (what comes is counted lost), and let the
        router route what was waiting for room here."""
        self.closed = self.closed or why
        for deadline in (self._confirm, self._retry, self._write, self._drain):
            deadline.clear()
        self.router.output_progress(self)

    def retire(self, successor):
        """A reload replaced (successor) or removed (None) this output: the
        successor takes the queue; this one delivers what is in flight,
        then gets `quit`."""
        self.successor = successor
        self.retired = True
        if successor is not None:
            successor.predecessor = self
            self._hand_over(in_flight=False)
        self.drain()

    def _hand_over(self, in_flight):
        """Give the successor what this output has not handed to its module:
        the queue, and (without confirm) what is still in our backlog, which
        is dropped; with in_flight (the old one gave up), also the events
        awaiting an answer.  What the old module's pipe holds comes back at
        its exit (exited() hands it over too)."""
        child = self.module.child
        ledger = self.ledger
        if child is not None and not self.confirm:
            self._account()
            if ledger.sent and ledger.sent[0][3] - len(ledger.sent[0][0]) < ledger.accepted:
                self.cut = True     # the pipe ends inside an event: no `quit` after it
            child.stdin.truncate()
            ledger.back()
        elif in_flight:
            self.stale += ledger.inflight
            ledger.back()
        self.successor.take_over(self)

    def take_over(self, old):
        """Take the queued events of an output this one replaces, in front
        of anything queued here already."""
        queue = old.ledger.queue
        while queue:
            entry = queue.pop()
            old.ledger.events -= entry[1]
            old.ledger.bytes -= len(entry[0])
            self.ledger.queue.appendleft(entry)
            self.ledger.events += entry[1]
            self.ledger.bytes += len(entry[0])
        self.loop.dirty.add(self)


##############################################################################
# Rules: plain Python, compiled once, run per event in a persistent namespace.
##############################################################################

# What a rules file finds in its namespace, besides Python's builtins.
_RULES_API = ('inputTokens', 'outputTokens', 'writeTo', 'exit', 'after', 'threshold',
              'suppress', 'digest', 'now')

_MONTHS = dict((m, i) for i, m in enumerate(
    ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'), 1))
_RFC3339 = re.compile(r'(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?'
                      r'([Zz]|[+-]\d\d:?\d\d)?\Z')
_BSD_DATE = re.compile(r'([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d)(\.\d+)?\Z')


def _event_time(text, wall=None):
    """Epoch seconds from a token holding an event's own time: epoch
    seconds, RFC 3339 (`2026-11-22T07:39:24.5+01:00`; local time without an
    offset), or the BSD syslog form (`Nov 22 07:39:24`, local time, in the
    latest year that does not put it in the future).  None if it is none."""
    import calendar
    text = text.strip()
    try:
        value = float(text)
        return value if math.isfinite(value) else None
    except ValueError:
        pass
    m = _RFC3339.match(text)
    if m:
        year, month, day, hour, minute, second = (int(x) for x in m.groups()[:6])
        fraction = float(m.group(7) or 0)
        zone = m.group(8)
        try:
            fields = (year, month, day, hour, minute, second, 0, 0, -1)
            if zone is None:
                return time.mktime(fields) + fraction
            seconds = calendar.timegm(fields) + fraction
        except (OverflowError, ValueError):
            return None
        if zone not in ('Z', 'z'):
            sign = -1 if zone[0] == '+' else 1
            digits = zone[1:].replace(':', '')
            seconds += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        return seconds
    m = _BSD_DATE.match(text)
    if m and m.group(1) in _MONTHS:
        wall = time.time() if wall is None else wall
        year = time.localtime(wall).tm_year
        fields = [year, _MONTHS[m.group(1)], int(m.group(2)), int(m.group(3)), int(m.group(4)),
                  int(m.group(5)), 0, 0, -1]
        try:
            seconds = time.mktime(tuple(fields))
            if seconds > wall + 86400:      # in the future: it was last year
                fields[0] -= 1
                seconds = time.mktime(tuple(fields))
        except (OverflowError, ValueError):
            return None
        return seconds + float(m.group(6) or 0)
    return None


class _Timer(list):
    """A handle of after(): [when, seq, callback]; cancel() stops it.
    Ordered as its list (when, seq) in the heap; hashed and compared by
    identity elsewhere."""

    __slots__ = ('timers',)

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    def cancel(self):
        if self[2] is not None:
            self[2] = None
            self.timers.cancelled += 1

    @property
    def cancelled(self):
        return self[2] is None


class _Timers(object):
    """The rules' timers on Looper's one clock: `arrival` (monotonic time when
    Looper read the event; due timers fire from the event loop) or an event
    clock (the latest event time seen; timers fire when an event's time
    passes their deadline, and all at the end of a batch run).  A heap of
    _Timer entries; cancelled ones are skipped, and the heap is rebuilt when
    most of it is cancelled (as asyncio does), so cancels never pile up."""

    def __init__(self, token=None):
        self.token = token          # the event-time token, or None (arrival)
        self.now = time.monotonic() if token is None else 0.0
        self.started = token is None
        self.heap = []
        self.cancelled = 0
        self._seq = itertools.count()
        self.unparsed = 0           # events whose time token could not be read
        self._warn = _Throttle()

    def __len__(self):
        return len(self.heap) - self.cancelled

    def at(self, when, callback):
        timer = _Timer((when, next(self._seq), callback))
        timer.timers = self
        heapq.heappush(self.heap, timer)
        return timer

    def event(self, tokens):
        """An event arrives: fire what is due by its time (each timer seeing
        its own deadline as the time), then move the clock to it, before
        its rules run."""
        if self.token is None:
            self.now = time.monotonic()
            self.fire(self.now)
            return
        text = tokens.get(self.token)
        when = _event_time(text) if text is not None else None
        if when is None:
            self.unparsed += 1
            self._warn(logging.WARNING, 'clock', "clock: an event has no time in its %r token "
                       "(%r); it takes the time of the event before", self.token, text)
        elif not self.started:
            self.now, self.started = when, True
        elif when > self.now:
            self.fire(when)

    def next_due(self):
        """Seconds until the next timer is due (arrival clock), or None."""
        if self.token is not None or not self.heap:
            return None
        return max(0.0, self.heap[0][0] - time.monotonic())

    def fire_due(self):
        """The event loop's turn (arrival clock)."""
        if self.token is None and self.heap and self.heap[0][0] <= time.monotonic():
            self.now = time.monotonic()
            self.fire(self.now)

    def fire(self, until):
        """Fire every timer due at or before `until`, in deadline order; the
        clock shows each one's deadline while it runs (so a replay sees the
        times the live run saw)."""
        heap = self.heap
        while heap and heap[0][0] <= until:
            timer = heapq.heappop(heap)
            if timer[2] is None:
                self.cancelled -= 1
                continue
            callback, timer[2] = timer[2], None
            if self.token is not None:
                self.now = max(self.now, timer[0])
            try:
                callback()
            except Exception as e:     # run_timer logs the rules' own errors; this is a bug
                _log.error('a rules timer failed: %s: %s', type(e).__name__, e)
        if self.token is not None:
            self.now = max(self.now, until)
        if self.cancelled > 64 and self.cancelled * 2 > len(heap):
            self.heap = [t for t in heap if t[2] is not None]
            heapq.heapify(self.heap)
            self.cancelled = 0

    def fire_all(self):
        """The end of a batch run: every remaining timer fires, in order."""
        while len(self):
            self.fire(max(self.heap[0][0], self.now))


class _Correlate(object):
    """The correlation helpers of one rules file: after, threshold, suppress,
    digest, now.  Their state lives here, per key, and is dropped when the
    key's window ends (checked at each call and at each timer); it survives
    a reload with the file's namespace when the file is unchanged."""

    def __init__(self, rules, path, ns):
        self.rules, self.path, self.ns = rules, path, ns
        self.timers = rules.timers
        self.thresholds = {}        # key -> [times deque, end of the fired window or None]
        self.suppressed = {}        # key -> end of the suppression
        self.digests = {}           # key -> [count, first, last, common]
        self._expiry = []           # heap of (time the state of a key may go, seq, table, key)
        self._seq = itertools.count()
        self.mine = set()           # this file's pending timers (cancelled on reload)

    def install(self, ns):
        self.ns = ns
        ns['after'], ns['threshold'], ns['suppress'] = self.after, self.threshold, self.suppress
        ns['digest'], ns['now'] = self.digest, self.now

    def now(self):
        """The current time on Looper's clock, in seconds."""
        return self.timers.now

    def after(self, seconds, function, *args):
        """Call function(*args) once, `seconds` from now, in this file's
        namespace (writeTo works; outputTokens is a fresh dict).  Returns a
        handle with .cancel()."""
        seconds = float(seconds)
        if not math.isfinite(seconds):
            raise ValueError('after: seconds must be a finite number, not %r' % seconds)
        holder = []

        def run():
            self.mine.discard(holder[0])
            self.rules.run_timer(self, function, args)
        timer = self.timers.at(self.timers.now + seconds, run)
        holder.append(timer)
        self.mine.add(timer)
        return timer

    def _expire(self, now):
        """Drop the state of keys whose window has ended (one heap entry a
        key: an entry that comes due early is put back at the key's end)."""
        expiry = self._expiry
        while expiry and expiry[0][0] < now:
            _, _, table, key = heapq.heappop(expiry)
            states = getattr(self, table)
            state = states.get(key)
            if state is None:
                continue
            end = self._ends(table, state)
            if end < now:
                del states[key]
            else:
                heapq.heappush(expiry, (end, next(self._seq), table, key))

    def _track(self, table, key, end):
        heapq.heappush(self._expiry, (end, next(self._seq), table, key))

    @staticmethod
    def _ends(table, state):
        if table == 'suppressed':
            return state
        times, fired_end, seconds = state
        return fired_end if fired_end is not None else (times[-1] + seconds if times else -1)

    def threshold(self, key, count, seconds):
        """True exactly once when `count` calls with `key` fall within
        `seconds` (SEC's SingleWithThreshold: the window starts at the first
        call and slides to the next one when it expires; after firing,
        calls are ignored until the window ends).  A call exactly `seconds`
        after the window's start is inside it."""
        now = self.timers.now
        self._expire(now)
        state = self.thresholds.get(key)
        if state is None or (state[1] is not None and now > state[1]):
            if state is None:
                self._track('thresholds', key, now + seconds)
            state = self.thresholds[key] = [collections.deque(), None, seconds]
        times, fired_end, _ = state
        if fired_end is not None:
            return False
        while times and now > times[0] + seconds:
            times.popleft()
        times.append(now)
        if len(times) >= count:
            state[1] = times[0] + seconds
            times.clear()
            return True
        return False

    def suppress(self, key, seconds):
        """True for the first call with `key`, then False until `seconds`
        have passed (SEC's SingleWithSuppress, Alertmanager's
        repeat_interval); a suppressed call does not extend it."""
        now = self.timers.now
        self._expire(now)
        end = self.suppressed.get(key)
        if end is not None and now <= end:
            return False
        if end is None:
            self._track('suppressed', key, now + seconds)
        self.suppressed[key] = now + seconds
        return True

    def digest(self, key, seconds, output, tokens):
        """Collect `tokens` (a dict) per `key`; `seconds` after the first of
        a group (Alertmanager's group_wait), write one event to `output`:
        the tokens common to all of them, `count`, and `first` and `last`
        (the first and last collected events' tokens, as JSON).  Then a new
        group starts."""
        import json
        if output not in self.rules.outputs:
            raise LookupError('digest(..., %r, ...): no output named %r; outputs are: %s' % (
                output, output, ', '.join(sorted(self.rules.outputs))))
        tokens = dict((str(k), v if v.__class__ is str else str(v))
                      for k, v in tokens.items() if v is not None)
        group = self.digests.get(key)
        if group is None:
            group = self.digests[key] = [0, tokens, tokens, dict(tokens)]

            def flush():
                del self.digests[key]
                count, first, last, common = group
                event = dict(common)
                event['count'] = str(count)
                event['first'] = json.dumps(first, sort_keys=True)
                event['last'] = json.dumps(last, sort_keys=True)
                self.rules.deliver((output,), _encode_event(event), event)
            self.after(seconds, flush)
        else:
            common = group[3]
            for k in [k for k, v in common.items() if tokens.get(k) != v]:
                del common[k]
        group[0] += 1
        group[2] = tokens
        return group[0]

    def cancel_all(self):
        n = 0
        for timer in list(self.mine):
            if not timer.cancelled:
                timer.cancel()
                n += 1
        self.mine.clear()
        return n


class _Rules(object):
    """Runs the rules files on each event.

    Each file has its own namespace, kept from event to event (so rules can
    count and remember) and rebuilt on reload unless the file is unchanged.
    outputTokens starts as a copy of inputTokens and is shared by the files
    of one event.  writeTo() snapshots it at call time (values become str,
    None values are left out), encodes it, and hands it to `deliver(names,
    data, tokens)` at once, so a value that cannot be sent is that event's
    error.  A file with a watchfor runs only for events whose text matches."""

    def __init__(self, files, outputs, deliver, timeout=RULES_TIMEOUT, old=None, timers=None):
        self.outputs = frozenset(outputs)
        self.deliver = deliver
        self.timeout = timeout
        self.timers = timers if timers is not None else _Timers()
        self.paths = frozenset(f[0] for f in files)
        self.errors = 0
        self.events = 0             # events run so far (the watchdog tells them apart)
        self._seen = None           # self.events at the watchdog's last tick
        self._busy = False          # inside run()
        self._ns = None
        self._warn = _Throttle()
        kept = dict((f[0], f) for f in (old.files if old else []))
        self.files = []
        for path, source, code, watchfor in files:
            if path in kept and kept[path][1] == source and kept[path][3].timers is self.timers:
                ns, helpers = kept.pop(path)[2:4]
            else:
                ns = {'__name__': '__looper_rules__', '__file__': path,
                      '__builtins__': __builtins__}
                helpers = _Correlate(self, path, ns)
            ns['writeTo'], ns['exit'] = self._write_to, self._exit
            helpers.rules = self
            helpers.install(ns)
            self.files.append((path, source, ns, helpers, watchfor))
        for path, _, _, helpers, _ in kept.values():
            cancelled = helpers.cancel_all()
            if cancelled:
                _log.warning('%s changed or is gone: its %d pending timer(s) are cancelled',
                             path, cancelled)
        # A module's code object made into a function runs with ns as both its
        # globals and locals, exactly as exec(code, ns) does, without exec's
        # per-call setup (about 0.2 us an event, 3.6 to 3.13 alike).
        self._run = [(path, types.FunctionType(code, ns), ns, watchfor)
                     for (path, _, code, watchfor), (_, _, ns, _, _) in zip(files, self.files)]
        self.watching = bool(files) and all(f[3] is not None for f in files)
        # The distinct patterns, and whether the chunk can be searched as a
        # whole for each (see matching()).
        patterns = []
        for f in files:
            if f[3] is not None and f[3] not in [p[0] for p in patterns]:
                source = f[3].pattern
                whole = not any(x in source for x in ('\\A', '\\Z', '(?<'))
                scan = None
                if source.startswith('^') and not source.startswith('^*'):
                    try:
                        scan = re.compile('\n' + source[1:], f[3].flags)
                    except re.error:
                        scan = None
                patterns.append((f[3], whole, scan))
        self._patterns = patterns

    def _exit(self, *ignored):
        raise _EndEvent()

    def matching(self, text, indexed=True):
        """For a chunk of whole events (text, each ending in `\\ngo\\n`):
        [(index, start, end, patterns)] of the events whose text
        (text[start:end], without its `go` line) one of the files' watchfor
        patterns matches, in order, with the patterns that matched it.
        Each pattern is searched in the chunk as a whole, and only the
        events it hits are located (no list of every event is made); a
        match is checked against its event alone (a chunk can match where
        an event cannot: across events, or on a `go` line).  A pattern that
        the chunk could hide from an event (\\A, \\Z, a lookbehind, a
        match across events) is searched event by event instead.  Without
        indexed, the index of a hit found in the whole chunk is 0."""
        found = {}                  # event start -> (index, start, end, patterns)
        for pattern, whole, scan in self._patterns:
            if whole and self._scan(text, pattern, scan, found, indexed):
                continue
            index, start = 0, 0
            while start < len(text):
                end = text.index('\ngo\n', start)
                if pattern.search(text[start:end]) is not None:     # \A and \Z see the event
                    hit = found.get(start)
                    if hit is None:
                        found[start] = (index, start, end, [pattern])
                    elif pattern not in hit[3]:
                        hit[3].append(pattern)
                index, start = index + 1, end + 4
        return [found[i] for i in sorted(found)]

    @staticmethod
    def _scan(text, pattern, scan, found, indexed):
        """One pattern over the whole chunk; False if a match reaches across
        events (then it must be searched event by event).  With indexed
        (acknowledged input), each hit carries its event's number in the
        chunk; else 0 (nothing needs it)."""
        find, rfind, count = text.find, text.rfind, text.count
        matches = []
        if scan is None:
            shift, it = 0, pattern.finditer(text)
        else:
            # `^X` is `\nX` (a fast scan for the newline: re tries `^` at
            # every byte), and the chunk's own first line.
            shift, it = 1, scan.finditer(text)
            m = pattern.match(text)
            if m is not None:
                matches.append(m)
        index = counted = 0
        last = -1                   # the end of the last event searched
        for m in itertools.chain(matches, it):
            first = m.start() + (shift if m.re is scan else 0)
            end = find('\ngo\n', first - 3 if first > 3 else 0)     # the event of `first`
            if m.end() > end + 3:
                return False
            if end == last:
                continue
            last = end
            start = rfind('\ngo\n', 0, end) + 4
            if start < 4:
                start = 0
            if indexed:
                index += count('\ngo\n', counted, start)
                counted = start
            if pattern.search(text, start, end) is not None:
                hit = found.get(start)
                if hit is None:
                    found[start] = (index, start, end, [pattern])
                else:
                    hit[3].append(pattern)
        return True

    def watchdog(self, frame):
        """SIGALRM, every `timeout` seconds (see _watch_rules): when the rules
        are still on the event they had at the last tick, they have run on
        it for `timeout` to twice that: interrupt them where they are, if
        that is in a rules file (frame is the innermost running frame)."""
        current = self.events if self._busy else None
        if current is not None and current == self._seen:
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
        if '=' in keys or '\n' in keys or '\r' in keys or '' in snapshot:
            bad = [k for k in snapshot if not k or '=' in k or '\n' in k or '\r' in k][0]
            raise ValueError('writeTo: token name %r is empty or contains "=" or a line break'
                             % bad)
        self.deliver(names, _encode_event(snapshot), snapshot)

    def run(self, tokens, text=None, matched=()):
        """Run the rules on one event; deliveries go out through `deliver`
        as writeTo is called.  `text` is the event as the input wrote it
        (for watchfor), or None to build it from the tokens; `matched`, the
        watchfor patterns known to match it already."""
        self.events += 1
        self._busy = True
        out = dict(tokens)
        try:
            for path, rules, ns, watchfor in self._run:
                if watchfor is not None and watchfor not in matched:
                    if text is None:
                        text = '\n'.join(map('='.join, tokens.items()))
                    if watchfor.search(text) is None:
                        continue
                ns['inputTokens'] = tokens
                ns['outputTokens'] = out
                self._ns = ns
                try:
                    rules()
                    out = ns['outputTokens']
                except (_EndEvent, SystemExit):
                    break
                except _RulesTimeout:
                    self._error(path, 'still running after %g s (rulestimeout), interrupted'
                                % self.timeout, tokens)
                    break
                except BaseException as e:
                    if isinstance(e, KeyError) and 'outputTokens' not in ns:
                        e = NameError('outputTokens was deleted')
                    self._error(path, '%s: %s' % (type(e).__name__, e), tokens)
                    break
        finally:
            self._busy = False

    def run_timer(self, helpers, function, args):
        """A timer of after() (or a digest) is due: call it in its file's
        namespace, with a fresh outputTokens; a failure is logged as a rules
        error of that file."""
        ns = helpers.ns
        self.events += 1
        self._busy = True
        ns['inputTokens'] = {}
        ns['outputTokens'] = {}
        self._ns = ns
        try:
            function(*args)
        except (_EndEvent, SystemExit):
            pass
        except _RulesTimeout:
            self._error(helpers.path, 'a timer still running after %g s (rulestimeout), '
                        'interrupted' % self.timeout, {'timer': repr(function)})
        except BaseException as e:
            self._error(helpers.path, 'in a timer (%s): %s: %s' % (
                getattr(function, '__name__', 'function'), type(e).__name__, e), {})
        finally:
            self._busy = False

    def _error(self, path, what, tokens):
        """Log the exception being handled at its line in the rules file,
        throttled per (file, line, exception type)."""
        self.errors += 1
        line = '?'
        for frame in traceback.extract_tb(sys.exc_info()[2]):
            if frame[0] == path:
                line = frame[1]
        try:
            event = repr(tokens)
        except Exception:
            event = '(tokens that cannot be shown)'
        if len(event) > EVENT_REPR_MAX:
            event = event[:EVENT_REPR_MAX] + '...'
        self._warn(logging.ERROR, (path, line, what.split(':', 1)[0]),
                   '%s:%s: %s; event skipped: %s', path, line, what, event)


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


##############################################################################
# Router: the input, the rules and the outputs, and the run's life cycle.
##############################################################################

_COUNTERS = ('queued', 'confirmed', 'written', 'rejected', 'retried', 'dropped', 'lost',
             'unconfirmed', 'restarts')


class _Router(object):
    """Owns the modules, routes events, acknowledges input, and decides when
    the run is over and how it went."""

    def __init__(self, loop, config, rules, progress=None):
        self.loop = loop
        self.config = config
        self.progress = progress
        self.children = {}          # pid -> _Module, until reaped
        self.stopping = False
        self.aborting = False
        self.finished = False
        self.fatal = []             # FILE:LINE of modules that exited 78
        self.stdout_gone = False
        self.events_in = 0          # also the next event's sequence number
        self.deliveries = 0
        self.blocked = False
        self.pending = collections.deque()     # events read, waiting for room
        self.pending_seq = 0        # sequence number of pending[0]
        self.unrouted = 0
        self._seq = None            # sequence number of the event being routed
        self._std = {}
        self.folded = {}            # counters of outputs that are gone, by name
        self.retired = []           # outputs and inputs a reload replaced, until they exit
        self.timers = _Timers(config.clock)
        loop.timers = self.timers
        self.rules = self._make_rules(rules, config, None)
        self.input = _Input(self, config.input)
        self.outputs = collections.OrderedDict(
            (name, _Output(self, block)) for name, block in config.outputs.items())
        self._all = tuple(self.outputs)
        loop.before_select.append(self._acknowledge)

    def _make_rules(self, rules, config, old):
        if config.clock != self.timers.token:
            dropped = len(self.timers)
            if dropped:
                _log.warning('the clock changed: %d pending rules timer(s) are dropped', dropped)
            self.timers = self.loop.timers = _Timers(config.clock)
        return _Rules(rules, config.outputs, self._deliver, config.rulestimeout, old,
                      self.timers) if rules else None

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
        self.input.module.start()

    def all_outputs(self):
        """The current outputs and the retired ones still delivering."""
        return itertools.chain(self.outputs.values(),
                               [o for o in self.retired if isinstance(o, _Output)])

    # -- events -------------------------------------------------------------

    def chunk(self, parser, data):
        """A read of the input's stdout.  Where no rules run (NORULES), or
        every rules file has a watchfor, a plain chunk of whole events is
        routed without a dict per event (the raw path); anything else, and
        everything while the outputs push back, goes through the parser's
        dicts and take()."""
        rules = self.rules
        if not (self.blocked or self.pending) and (rules is None or rules.watching):
            got = parser.split_raw(data, rules is None)
            if got is not None:
                events, count = got
                if count:
                    if rules is None:
                        self._pass_through(events, count)
                    else:
                        self._watch(parser, events, count)
                return
        events = parser.feed(data)
        if events:
            self.take(events)

    def _pass_through(self, data, count):
        """NORULES: the input's bytes go to every output as they came, one
        queue entry for the read (see _Output.enqueue_read)."""
        first = self.events_in
        self.events_in += count
        self.deliveries += count * len(self._all)
        for output in self.outputs.values():
            if output.enqueue_read(data, count, first):
                self.blocked = True
        if self.blocked:
            self.input.pause()

    def _watch(self, parser, data, count):
        """Every rules file has a watchfor: search the chunk as a whole
        for each pattern, and make dicts (and run the rules) only for the
        events where one matched.  The others cost nothing more.  If an
        output pushes back, the rest of the chunk waits in `pending`."""
        first = self.events_in
        self.events_in += count
        text = data.decode('utf-8', 'surrogateescape')
        rules = self.rules
        hits = rules.matching(text, self.input.ack)
        if not hits:
            return
        clocked = self.timers.token is not None
        if not clocked:
            self.timers.event(None)
        split, eqs, ones = str.split, _EQUALS, _ONES
        for index, start, end, matched in hits:
            body = text[start:end]
            lines = body.split('\n')
            try:
                event = dict(map(split, lines, eqs, ones))
                if '' in event or len(body) > parser.maxline and \
                        max(map(len, lines)) > parser.maxline:
                    raise ValueError
            except ValueError:      # a line without `=`, or with no name, or too long
                event = parser._parse_slowly(lines)
            if clocked:
                self.timers.event(event)
            self._seq = first + index
            rules.run(event, body, matched)
            self._seq = None
            if self.blocked:
                self.pending_seq = first + index + 1
                self.pending.extend(_plain_events(text[text.index('\ngo\n', end) + 4:]))
                if self.pending:
                    self.input.pause()
                return

    def take(self, events):
        """Events from the input: route them now, or keep them pending while a
        blocking output is full (and stop reading the input meanwhile)."""
        first = self.events_in
        self.events_in += len(events)
        pending = self.pending
        if self.blocked or pending:
            if not pending:
                self.pending_seq = first
            pending.extend(events)
        else:
            rules = self.rules
            deliver, everywhere = self._deliver, self._all
            clocked = self.timers.token is not None and rules is not None
            if rules is not None and not clocked:
                self.timers.event(None)             # arrival: one time for the chunk
            for i, event in enumerate(events):
                if clocked:
                    self.timers.event(event)        # due timers fire first
                self._seq = first + i
                if rules is not None:
                    rules.run(event)
                else:
                    deliver(everywhere, _encode_event(event), event)
                self._seq = None
                if self.blocked:
                    self.pending_seq = first + i + 1
                    pending.extend(events[i + 1:])
                    break
        if pending:
            self.input.pause()

    def _deliver(self, names, data, tokens):
        """One writeTo (or, with NORULES, one event): queue its bytes on each
        named output; a blocking output that fills up sets `blocked`."""
        outputs = self.outputs
        self.deliveries += len(names)
        for name in names:
            if outputs[name].enqueue(data, 1, self._seq):
                self.blocked = True

    def output_progress(self, output):
        """An output delivered something: route pending events if there is room."""
        if self.blocked:
            self._unblock()

    def _unblock(self):
        self.blocked = any(o.blocking and o.full() for o in self.outputs.values())
        pending = self.pending
        rules = self.rules
        while pending and not self.blocked:
            event = pending.popleft()
            if rules is not None:
                self.timers.event(event)
            self._seq = self.pending_seq
            self.pending_seq += 1
            if rules is not None:
                rules.run(event)
            else:
                self._deliver(self._all, _encode_event(event), event)
            self._seq = None
        if not pending and not self.blocked:
            self.input.resume()
            if self.stopping:
                for output in self.all_outputs():    # they may be waiting to quit
                    self.loop.dirty.add(output)

    def input_progress(self, line):
        if self.progress is not None:
            self.progress.input_said(line)

    def _acknowledge(self):
        """Acknowledged input: every event older than the oldest one not yet
        settled anywhere (an output's ledger, the pending events) is settled;
        tell the input."""
        if not self.input.ack:
            return
        settled = self.pending_seq if self.pending else self.events_in
        for output in self.all_outputs():
            seq = output.ledger.oldest_seq()
            if seq is not None and seq < settled:
                settled = seq
        self.input.acknowledge(settled)

    # -- life cycle ---------------------------------------------------------

    def reap(self):
        """Collect every exited child (SIGCHLD woke us).  Each module's group
        gets SIGTERM first, before its leader is reaped: grandchildren do not
        outlive the module, and the pid cannot be reused yet."""
        while True:
            pid = _exited_child()
            if pid is None:
                return
            if pid:
                if pid in self.children:
                    try:
                        os.killpg(pid, signal.SIGTERM)
                    except OSError:
                        pass
                try:
                    pid, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    return
            else:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
            if pid == 0:
                return
            module = self.children.pop(pid, None)
            if module is not None:
                module.on_exit(status)

    def input_done(self):
        """No event will come from the input any more, none is pending."""
        return self.input.module.over and not self.pending

    def stop(self, why):
        if self.stopping:
            if why.startswith('signal'):
                self.abort()
            return
        _log.info('stopping: %s', why)
        self.stopping = True
        self.input.module.stop('term')
        for output in list(self.all_outputs()):
            output.drain()
        self._check_finished()

    def abort(self):
        if self.aborting:
            return
        _log.warning('second stop request: stopping now without draining')
        self.aborting = True
        for output in list(self.all_outputs()):
            output.abort()
        for module in list(self.children.values()):
            if module.kind == 'input':
                module.stop('term')

    def module_done(self, module):
        """A module will not run again (exited, fatal, retired)."""
        owner = module.owner
        if module.state == 'fatal':
            self.fatal.append(module.block.where())
        if owner is self.input:
            if owner.finished and not self.stopping:
                if len(self.timers):
                    _log.info('the input finished: firing the %d pending rules timer(s)',
                              len(self.timers))
                    self.timers.fire_all()
                self.stop('the input finished')
            elif module.state == 'fatal' and not self.stopping:
                self.stop('the input cannot run with its configuration')
            elif not self.stopping:
                self.stop('the input stopped')
            if self.pending and self.blocked:
                self._unblock()
            for output in self.all_outputs():
                self.loop.dirty.add(output)     # they may be waiting to quit
        elif owner in self.retired:
            self.retired.remove(owner)
            if isinstance(owner, _Output):
                self._fold(owner)
                if owner.successor is not None:
                    owner.successor.predecessor = None
                    self.loop.dirty.add(owner.successor)
        self._check_finished()

    def stdout_closed(self):
        """An output writing to Looper's stdout found its reader gone: stop
        promptly and quietly, as grep does (exit 1)."""
        if not self.stdout_gone:
            self.stdout_gone = True
            self.stop("Looper's stdout was closed by its reader")

    def _check_finished(self):
        if not self.input.module.over or self.retired or \
                any(not o.module.over for o in self.outputs.values()):
            return
        if self.pending:
            self.unrouted += len(self.pending)
            _log.error('%d event(s) read from the input were never routed: every blocking '
                       'output was full until it gave up', len(self.pending))
            self.pending.clear()
        self.finished = True

    def reconfigure(self, config, rules):
        """Apply a validated new configuration (SIGHUP).  Unchanged modules
        keep running; a changed output is replaced by a new instance, which
        takes over its queue while the old one delivers what it has in
        flight and gets `quit`; a removed output delivers its queue and gets
        `quit`; a changed input is stopped and the new one started.  Rules
        keep their state where the file did not change."""
        if self.stopping:
            _log.warning('reload ignored: Looper is stopping')
            return
        self.rules = self._make_rules(rules, config, self.rules)
        outputs = collections.OrderedDict()
        for name, block in config.outputs.items():
            old = self.outputs.pop(name, None)
            if old is not None and old.block.signature() == block.signature():
                outputs[name] = old
                continue
            new = outputs[name] = _Output(self, block)
            if old is not None:
                _log.info('%s was changed by the reload: a new instance takes over its queue; '
                          'the old one delivers what it has in flight, then quit', old.label)
                self.retired.append(old)
                old.retire(new)
            new.start()
        for old in self.outputs.values():
            _log.info('%s was removed by the reload: delivering its queue, then quit', old.label)
            self.retired.append(old)
            old.retire(None)
        self.outputs = outputs
        self._all = tuple(outputs)
        old = self.input
        if old.block.signature() != config.input.signature():
            _log.info('%s was changed by the reload: stopping it, starting the new one', old.label)
            self.input = _Input(self, config.input)
            self.retired.append(old)
            old.module.stop('term')
            self.input.module.start()
        self.config = config
        self._unblock()
        _log.info('reloaded: input %r, outputs %s, %s', self.input.name,
                  ', '.join(repr(n) for n in self.outputs),
                  '%d rules file(s)' % len(rules) if rules else 'no rules')

    def _fold(self, output):
        totals = self.folded.setdefault(output.name, dict.fromkeys(_COUNTERS, 0))
        for field in _COUNTERS:
            totals[field] += self._counter(output, field)

    @staticmethod
    def _counter(output, field):
        if field == 'queued':
            return output.ledger.events
        if field == 'restarts':
            return output.module.restarts
        return getattr(output.ledger, field)

    def totals(self):
        """Counters by output name, every instance of it summed (a reload
        that replaces an output keeps what the old one counted)."""
        totals = collections.OrderedDict()
        for output in self.all_outputs():
            t = totals.setdefault(output.name, dict.fromkeys(_COUNTERS, 0))
            for field in _COUNTERS:
                t[field] += self._counter(output, field)
        for name, folded in self.folded.items():
            t = totals.setdefault(name, dict.fromkeys(_COUNTERS, 0))
            for field in _COUNTERS:
                t[field] += folded[field]
        return totals

    def counters(self):
        """One line of name=value pairs: readable, and parseable by a script."""
        inp = self.input
        p = inp.parser
        fields = [('events_in', self.events_in), ('deliveries', self.deliveries),
                  ('rules_errors', self.rules.errors if self.rules else 0)]
        for field, value in (('restarts', inp.module.restarts), ('malformed', p.malformed),
                             ('oversized', p.oversized + p.oversized_events), ('empty', p.empty),
                             ('truncated', inp.truncated), ('pending', len(self.pending)),
                             ('unrouted', self.unrouted)):
            fields.append(('input.%s.%s' % (inp.name, field), value))
        for name, t in self.totals().items():
            for field in _COUNTERS:
                fields.append(('output.%s.%s' % (name, field), t[field]))
        return ' '.join('%s=%s' % kv for kv in fields)

    def exit_status(self):
        """Log the final counters; 78 if a module's configuration was wrong,
        1 if any event was not delivered (lost, dropped, rejected,
        unconfirmed, unrouted, skipped by a rules error), an output exited
        non-zero at the end, or the input failed; else 0."""
        totals = self.totals()
        problems = []
        for field in ('lost', 'dropped', 'rejected', 'unconfirmed'):
            n = sum(t[field] for t in totals.values())
            if n:
                problems.append('%d %s' % (n, field))
        if self.unrouted:
            problems.append('%d never routed' % self.unrouted)
        if self.rules and self.rules.errors:
            problems.append('%d skipped by rules errors' % self.rules.errors)
        failures = [o.label for o in self.outputs.values() if o.failures]
        if failures:
            problems.append('%s exited non-zero at the end' % ', '.join(failures))
        if self.fatal:
            problems.append('configuration errors at %s' % ', '.join(self.fatal))
        if self.stdout_gone:
            _log.info('finished: %s', self.counters())
            return EX_SOFTWARE
        _log.log(logging.WARNING if problems else logging.INFO, 'finished: %s', self.counters())
        if problems:
            _log.warning('not every event was delivered: %s', ', '.join(problems))
        if self.fatal:
            return EX_CONFIG
        return EX_SOFTWARE if problems else EX_OK


##############################################################################
# Main loop, signals, progress, and the command line.
##############################################################################

class _Signals(object):
    """Signals are flags: the handlers do nothing, and the C-level handler
    writes the signal number into a socketpair (signal.set_wakeup_fd) that
    the loop reads like any other descriptor.  ACTIONS maps each to what it
    does."""

    ACTIONS = {signal.SIGTERM: 'stop', signal.SIGINT: 'stop', signal.SIGHUP: 'reload',
               signal.SIGUSR1: 'counters', signal.SIGCHLD: 'reap'}

    def __init__(self, loop, router, reload):
        self.router, self.reload = router, reload
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        for sig in self.ACTIONS:
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
            action = self.ACTIONS.get(signum)
            if action == 'stop':
                self.router.stop('signal %s' % signal.Signals(signum).name)
            elif action == 'reload':
                self.reload()
            elif action == 'counters':
                _log.info('counters: %s', self.router.counters())
            elif action == 'reap':
                self.router.reap()

    def ignore(self):
        """The run is over: a stop or reload signal arriving while Python
        shuts down must not kill it (finalization would restore the default
        action, which is to die; an ignored signal stays ignored)."""
        for sig in self.ACTIONS:
            if sig != signal.SIGCHLD:
                signal.signal(sig, signal.SIG_IGN)
        _set_wakeup_fd(-1)

    def __repr__(self):
        return '<_Signals fd=%d READ>' % self._r.fileno()


class _Progress(object):
    """One self-rewriting line on the terminal (stderr) during a run: events
    read, deliveries, events a second, and how far through its input the
    input module is when it says (`progress DONE TOTAL` on its stderr).
    Only when stderr is a terminal and not with -q; cleared at the end, and
    before every log line (_ProgressHandler)."""

    def __init__(self, loop, stream):
        self.stream = stream
        self.router = None
        self.shown = False
        self.started = time.monotonic()
        self.done = self.total = 0
        self._tick = loop.deadline(self.show)

    def begin(self, router):
        self.router = router
        self._tick.set(PROGRESS_EVERY)

    def input_said(self, line):
        parts = line.split()
        try:
            self.done, self.total = int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            pass

    def show(self):
        router = self.router
        elapsed = max(time.monotonic() - self.started, 1e-9)
        text = '%d events read, %d deliveries, %d/s' % (router.events_in, router.deliveries,
                                                       router.events_in / elapsed)
        if self.total:
            text += ', %d%% of the input' % min(100, 100 * self.done // self.total)
        try:
            self.stream.write('\r' + text + '\x1b[K')
            self.stream.flush()
            self.shown = True
        except (OSError, ValueError):
            pass
        self._tick.set(PROGRESS_EVERY)

    def clear(self):
        if self.shown:
            self.shown = False
            try:
                self.stream.write('\r\x1b[K')
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def end(self):
        self._tick.clear()
        self.clear()


def _reload(router, config_path, options):
    """SIGHUP: validate the new configuration and rules first; if they are
    bad, log why (one line, with FILE:LINE) and keep running the old ones.
    Reopen the log.  Any failure of a reload keeps the old configuration."""
    try:
        config, rules = _load(config_path)
        _setup_logging(config.logfile, options.loglevel or config.loglevel)
    except _ConfigErrors as e:
        _log.error('reload refused, the running configuration stays: %s',
                   ' | '.join(str(x) for x in e.errors))
        return
    except OSError as e:
        _log.error('reload refused, the running configuration stays: %s: cannot open the log '
                   'file: %s', config_path, e)
        return
    except Exception as e:      # anything at all: the old configuration keeps running
        _log.error('reload refused, the running configuration stays: %s: %s: %s',
                   config_path, type(e).__name__, e)
        return
    for warning in config.warnings:
        _log.warning('%s', warning)
    router.reconfigure(config, rules)
    _watch_rules(router.rules)


def _run(config_path, options):
    closed = _standard_fds()
    try:
        config, rules = _load(config_path)
        _setup_logging(config.logfile, options.loglevel or config.loglevel)
    except _ConfigErrors as e:
        print(str(e), file=sys.stderr)
        return EX_CONFIG
    except OSError as e:
        print('%s: cannot open the log file: %s' % (config_path, e), file=sys.stderr)
        return EX_CONFIG
    for warning in config.warnings:
        _log.warning('%s', warning)
    loop = _Loop()
    _log.debug('event loop: %r', loop)
    progress = None
    level = options.loglevel or config.loglevel
    if not options.quiet and level in ('debug', 'info') and 2 not in closed and \
            sys.stderr.isatty():
        progress = _Progress(loop, sys.stderr)
        for handler in _log.handlers:
            if isinstance(handler, _ProgressHandler):
                handler.progress = progress
    router = _Router(loop, config, rules, progress)
    signals = _Signals(loop, router, lambda: _reload(router, config_path, options))
    _watch_rules(router.rules)
    router.start()
    if progress is not None:
        progress.begin(router)
    try:
        while not router.finished:
            loop.run_once()
    finally:
        signals.ignore()
        signal.setitimer(signal.ITIMER_REAL, 0)
        if progress is not None:
            progress.end()
    return router.exit_status()


def _check(config_path):
    try:
        config, rules = _load(config_path, check=True)
    except _ConfigErrors as e:
        print(str(e), file=sys.stderr)
        return EX_CONFIG
    for warning in config.warnings:
        print(str(warning), file=sys.stderr)
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
    out = sys.stdout.buffer if hasattr(sys.stdout, 'buffer') else sys.stdout
    names = tuple(config.outputs)

    def deliver(targets, data, tokens):
        for name in targets:
            line = json.dumps({'output': name, 'tokens': tokens}, ensure_ascii=False)
            out.write(line.encode('utf-8', 'surrogateescape') + b'\n')

    timers = _Timers(config.clock)
    rules = _Rules(rules, config.outputs, deliver, config.rulestimeout, timers=timers) \
        if rules else None
    _watch_rules(rules)
    parser = _EventParser('stdin', config.maxline)
    stdin = sys.stdin.buffer if hasattr(sys.stdin, 'buffer') else sys.stdin
    events_seen = 0
    first_bad = None
    try:
        while True:
            data = os.read(stdin.fileno(), READ_CHUNK)
            if not data:
                events, lost = parser.eof()
            else:
                events, lost = parser.feed(data), 0
                if first_bad is None and not events_seen:
                    first_bad = next((line for line in data.split(b'\n')[:100] if line.strip()
                                      and b'=' not in line and line.strip() != b'go'), None)
            events_seen += len(events)
            for event in events:
                if rules is not None:
                    timers.event(event)
                    rules.run(event)
                else:
                    deliver(names, None, event)
            if not data:
                timers.fire_all()       # the end of the input, as in a batch run
            out.flush()
            if not data:
                break
    except BrokenPipeError:
        # The reader of our stdout went away (`--test ... | head`): quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EX_SOFTWARE
    if lost:
        print("looper: discarded an incomplete event (no 'go') at the end of stdin",
              file=sys.stderr)
    if not events_seen and first_bad is not None:
        print("looper: stdin holds no events in the module protocol: %d line(s) are not "
              "token=value or go (the first: %r).\n--test reads what an input module writes; "
              "for a syslog file, pipe it through syslog_in first:\n"
              "    printf 'logfile=-\\n' | python3 modules/syslog_in < FILE | "
              "python3 looper.py --test %s" % (parser.malformed,
                                               first_bad[:120].decode('utf-8', 'replace'),
                                               config_path), file=sys.stderr)
        return EX_SOFTWARE
    return EX_SOFTWARE if rules and rules.errors else EX_OK


def _parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog='looper.py',
        description='Route events from an input module through Python rules to output modules.',
        epilog='Exit status: 0 clean run (every event delivered), 1 events not delivered or '
               'another failure, 2 usage error, 78 bad configuration (of Looper or of a '
               'module). Signals: TERM/INT stop gracefully (twice: at once), HUP reloads '
               'config and rules and reopens the log, USR1 logs counters. See README.md for '
               'the configuration keys and the module protocol.')
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
                       help='log debug messages (every module start, argv and state change)')
    level.add_argument('-q', '--quiet', dest='loglevel', action='store_const', const='warning',
                       help='log only warnings and errors; no progress line')
    level.add_argument('--log-level', dest='loglevel', choices=_LOG_LEVELS,
                       help="log level (default: the config's loglevel, else info)")
    options = parser.parse_args(argv)
    options.quiet = options.loglevel in ('warning', 'error')
    return options


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
