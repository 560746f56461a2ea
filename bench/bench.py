#!/usr/bin/env python3
"""Looper benchmark: Looper against SEC, swatch and a bare Python loop.

    python3 bench/bench.py                   everything: 1,000,000 lines, 3 rounds
    python3 bench/bench.py --smoke           every section, tiny (about 20 s); the tests run it
    python3 bench/bench.py --throughput --norules --python /root/.pyenv/versions/3.6.15/bin/python3
    python3 bench/bench.py --cpus 0 --lines 300000      one CPU (or: taskset -c 0 python3 ...)
    python3 bench/bench.py --correlation --keys 200000
    python3 bench/bench.py --json results.json --strict

Sections (all of them when none is named): --throughput, --norules,
--startup, --latency, --memory, --correlation.  Progress goes to stderr; the
report (markdown) goes to stdout.  Exit status: 0 when Looper ran and every
tool found the same matches as the generator planted (and logfile_out wrote
every line in NORULES); 1 when Looper failed or the counts differ (with
--strict, also when a target is missed); 2 for a bad command line.  Stdlib
only, Python 3.6 to 3.13, Linux (/proc is read for memory and CPU figures).
bench/README.md explains the method and how to read the report, and keeps
the history of the figures.

What it does
------------
Input.  A deterministic syslog file (seed --seed, --lines lines, default
1,000,000) in BSD format, `Mmm dd hh:mm:ss host prog[pid]: msg`: sshd
(Failed/Accepted password, publickey, Invalid user, Disconnected, pam_unix),
CRON, kernel UFW firewall blocks, postfix smtpd/qmgr/cleanup, systemd, sudo,
dhclient.  About 10% are `sshd[PID]: Failed password for USER from IP port N
ssh2`.  The job's regex is REGEX below; it deliberately does NOT match the
near misses planted beside them (`Failed password for invalid user X from
...`, rsyslog's `message repeated 2 times: [ Failed password ...]`), so a
tool with a sloppier pattern would be caught by the count check.  The file
is cached in --workdir (default bench/work/, git-ignored) as
syslog-s<seed>-n<lines>.log with a .json sidecar holding the number of
planted matches and a SHA-1 of the matched lines; every tool must report
exactly that number of matches, and exactly those lines in that order (the
bench hashes each tool's output: Looper's `line` token, SEC's $0, swatch's
echoed lines, the bare loop's lines).  Otherwise it fails loudly (exit 1).

Throughput.  Each round runs every tool once on the same file, in an order
rotated per round (so no tool always runs first or after the same one):
  looper    `PYTHON looper.py bench.conf`: shipped syslog_in (from the top,
            exits at EOF) -> looper.rules (REGEX on `desc`; outputTokens =
            user, source, line = date node desc) -> shipped logfile_out.
            Matches = lines in logfile_out's file (its `line` values hashed).
  lean      the same with `tokens = date node desc` in syslog_in's block: only
            the tokens these rules read, as the original Looper's module sent.
  watchfor  the same rules with `watchfor = r'WATCHFOR'` on top: Looper runs
            them only for events whose text matches, and (every rules file
            having one) searches whole reads at once, making no dict for the
            other events.
  sec       `sec --conf=sec.conf --input=FILE --notail --debug=3 --log=/dev/null`
            with one type=Single ptype=RegExp rule, action=write OUT $0.
  swatch    `swatchdog --config-file=swatch.conf --examine=FILE --script-dir=DIR`
            with `watchfor /REGEX/` + `echo normal`.  Matches = stdout lines
            minus swatchdog's banner and blank lines.
  bare      `PYTHON bare.py FILE OUT`: for line in f: if rx.search(line):
            out.write(line) -- the floor for anything written in Python.
PYTHON is --python (default $LOOPER_PYTHON, else the interpreter running
this script), always the real binary, never the pyenv `python3` shim (which
adds about 0.1 s per start).  Looper runs python-shebang modules under its
own interpreter, so the modules use the same binary.
Reported per tool: median wall time (fork to reap), lines/s, CPU seconds
(user+sys of the tool and all its reaped descendants, from os.wait4), and
two peak RSS figures, sampled from /proc every --sample-interval s:
  RSS proc  peak of the tool's main process alone (VmHWM, the kernel's
            high-water mark): for Looper, looper.py without its modules.
  RSS tree  largest sum of VmRSS over the main process and all its
            descendants at one sample (Looper + syslog_in + logfile_out;
            swatchdog + its generated watcher script).
Ratio = Looper wall / peer wall within the same round, for each Looper
variant and each peer; the headline is the median of the per-round ratios.

NORULES.  Rounds as above of: Looper with NORULES, shipped syslog_in ->
shipped logfile_out, every event unchanged (the original Looper's first
example), with logfile_out as shipped (its declaration decides confirm)
and with the other confirm setting; and `printf 'logfile=FILE\n' | PYTHON
modules/syslog_in > /dev/null`, the input module alone.  logfile_out's file
must have exactly --lines lines.  Ratio = Looper / syslog_in alone.

Start-up.  Four commands alternated (order rotated), --startup-reps times
each: `PYTHON -c pass`, `PYTHON looper.py --version`, `cat sample.log >
FILE`, and a whole short batch run as examples/basic.conf does it
(syslog_in over the 50-line examples/sample.log -> logfile_out, NORULES,
checked for 50 lines out).  Medians and their ratios.

Latency.  One event at a time through a real Looper: a bench-written input
module (lat_in.py) emits an event every --latency-interval s carrying
t=time.monotonic() (CLOCK_MONOTONIC: comparable across processes on Linux),
the same rules (regex on desc, route user/source) pass it on, and a
bench-written output module (lat_out.py) records time.monotonic() - t when
it reads `go`.  The shipped modules are not in this path: it measures
Looper itself (pipes, framing, rules, queues, flushing).  Conditions: idle;
cpu = one busy-looping Python process per usable CPU; stream = a second
Looper running the throughput job on the big file at the same time.
p50/p99/max over --latency-events events (after --latency-warmup events
that are dropped).  Control rows (direct-idle, direct-cpu): the same input
module piped straight into the same output module, no Looper.

Memory.  Looper's own RSS (VmRSS of the looper.py process, sampled) at
25/50/75/100% of a run and its peak, and whether it is flat: the peak
reached by the end exceeds the peak of the first half by <= max(1 MiB, 5%)
(RSS may swing inside a bound as queues fill and drain; a leak keeps
raising the peak).  Three runs: (1) the throughput job (from its rounds
when they ran, else a dedicated run); (2) stalled: NORULES, syslog_in ->
`fast` = logfile_out (queuesize 1000) and `stalled` = a module that reads
its configuration and then never reads again (queuesize 1000, overflow
drop, draintimeout/closetimeout 1 s); (3) restarting: `fast` = logfile_out
with confirm = yes (queuesize 1000) at full speed beside `restarting` = a
module that exits 1 as soon as it is configured, restartdelay = 60 s
(queuesize 1000, overflow drop).  Queues of 1000: a default 10,000-event
queue that fills or not with the machine's load would make RSS swing by a
few MB and hide what is measured.  `fast` must receive every event; Looper
exits 1 in (2) and (3) by design (events for the troubled output were
dropped); the counters it logs at the end are reported.

Correlation.  Memory per key of the helpers (issue 14), beside SEC's
correlation operations: --keys events (default 1,000,000), each with a
distinct desc, all within the window.  Looper: a bench-written input module
(keys_in.py) writes the events and holds its pipe open a second at the end
(so the plateau is sampled), into rules `suppress(desc, 3600)`, or
`threshold(desc, 5, 3600)`, or (the baseline) only reading the desc.  SEC:
the same descs as syslog lines on a pipe held open the same way, into
`SingleWithSuppress` (window=3600) or `SingleWithThreshold` (thresh=5
window=3600) with desc=$1, or (the baseline) a `Single` rule with action
none.  Bytes per key = (peak RSS - the baseline run's peak RSS) / keys.

--cpus LIST pins this script, and so every process it starts, to those
CPUs (sched_setaffinity, as `taskset -c LIST` does).  Scratch files
(configs, rules, outputs, Looper logs) live in --workdir/run-PID/, removed
at the end unless --keep.

Targets (PASS/FAIL in the report; issue 13's table): Looper <= 0.5x SEC
and <= 1.0x swatch (rules without watchfor); with watchfor <= 0.3x SEC,
<= 0.6x swatch, <= 3x the bare loop; NORULES <= 1.5x syslog_in alone;
latency p99 < 5 ms idle; Looper RSS < 25 MB and flat (the throughput job,
and beside a stalled and a restarting output); start-up <= 1.5x `-c pass`.
Reported without a target: the short batch run against `cat`, and the
bytes per key.
"""
from __future__ import print_function

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The job: failed sshd passwords for a valid user name.  Same pattern for
# every tool (Python re and Perl agree on this subset).  No `/` in it, so it
# needs no escaping in swatch's /.../.
REGEX = r'sshd\[\d+\]: Failed password for (\S+) from (\S+) port \d+ ssh2'
# The watchfor of the same job: anchored on the desc token, as a user would
# write it.  It also lets through the `Failed password for invalid user`
# near misses (3% of the lines), which the rules' REGEX then rejects.
WATCHFOR = r'^desc=sshd\[\d+\]: Failed password for '
GEN_VERSION = 2              # bump when the generator changes: invalidates the cache

TARGETS = {                  # issue 13's table
    'looper': {'sec': 0.5, 'swatch': 1.0},     # Looper wall / peer wall, median of rounds
    'lean': {'sec': 0.5, 'swatch': 1.0},       # the same job, tokens = date node desc
    'watchfor': {'sec': 0.3, 'swatch': 0.6, 'bare': 3.0},
    'norules': 1.5,          # NORULES syslog_in -> logfile_out / syslog_in alone > /dev/null
    'latency_p99_ms': 5.0,   # idle
    'rss_mb': 25.0,          # Looper's own process
    'startup': 1.5,          # looper.py --version / -c pass
}


def log(msg, *args):
    sys.stderr.write('bench: ' + (msg % args if args else msg) + '\n')
    sys.stderr.flush()


class BenchError(Exception):
    pass


##############################################################################
# The syslog generator
##############################################################################

MONTHS = ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct',
          'Nov', 'Dec')
HOSTS = ('web01', 'web02', 'web03', 'db01', 'mail01', 'gw01', 'build03', 'bastion')
USERS = ('root', 'admin', 'ubuntu', 'test', 'oracle', 'postgres', 'user', 'git',
         'deploy', 'pi', 'ftpuser', 'guest', 'support', 'jenkins', 'hadoop')
BAD_USERS = ('admin1', 'tomcat', 'nagios', 'zabbix', 'ansible', 'mysql', 'minecraft',
             'teamspeak', 'es', 'steam', 'ts3', 'vagrant', 'odoo', 'sinusbot')
STAFF = ('alice', 'bob', 'carol', 'dave', 'erin')
CRON_CMDS = ('command -v debian-sa1 > /dev/null && debian-sa1 1 1',
             '[ -x /usr/lib/php/sessionclean ] && if [ ! -d /run/systemd/system ]; '
             'then /usr/lib/php/sessionclean; fi',
             'cd / && run-parts --report /etc/cron.hourly',
             '/usr/local/bin/backup.sh >/dev/null 2>&1',
             'test -x /usr/sbin/anacron || ( cd / && run-parts --report /etc/cron.daily )')
DOMAINS = ('example.com', 'example.org', 'mail.example.net', 'gmail.com', 'corp.example')


def _pick(rng, seq):
    # int(random() * n): stable across Python versions (choice() is too, but
    # this does not depend on _randbelow's details).
    return seq[int(rng.random() * len(seq))]


def _num(rng, lo, hi):
    return lo + int(rng.random() * (hi - lo + 1))


def _ext_ip(rng):
    return '%d.%d.%d.%d' % (_num(rng, 1, 223), _num(rng, 0, 255), _num(rng, 0, 255),
                            _num(rng, 1, 254))


def _mac(rng):
    return ':'.join('%02x' % _num(rng, 0, 255) for _ in range(14))


def _qid(rng):
    return '%010X' % int(rng.random() * 0xFFFFFFFFFF)


def generate(path, lines, seed):
    """Write `lines` syslog lines to path; return the number that REGEX matches
    (counted by construction, then checked against REGEX itself)."""
    rng = random.Random(seed)
    attackers = [_ext_ip(rng) for _ in range(1500)]
    clients = ['10.0.%d.%d' % (_num(rng, 0, 9), _num(rng, 2, 250)) for _ in range(40)]
    boot = 3600.0 * 24 * 7
    t = 0.0
    # 2024-03-03 00:00:00 UTC, as a struct we step by hand (no locale, no tz).
    base = 1709424000
    sec_cached = -1
    stamp = ''
    planted = 0
    rx = re.compile(REGEX)
    checked = 0
    digest = hashlib.sha1()
    out = []
    tmp = '%s.tmp%d' % (path, os.getpid())
    f = open(tmp, 'w', encoding='utf-8')
    try:
        for i in range(lines):
            t += rng.random() * 0.1
            s = int(t)
            if s != sec_cached:
                sec_cached = s
                tm = time.gmtime(base + s)
                stamp = '%s %2d %02d:%02d:%02d' % (MONTHS[tm.tm_mon - 1], tm.tm_mday,
                                                  tm.tm_hour, tm.tm_min, tm.tm_sec)
            host = _pick(rng, HOSTS)
            r = rng.random()
            pid = _num(rng, 1000, 65000)
            if r < 0.10:
                msg = 'sshd[%d]: Failed password for %s from %s port %d ssh2' % (
                    pid, _pick(rng, USERS), _pick(rng, attackers), _num(rng, 1024, 65535))
                planted += 1
            elif r < 0.13:
                msg = 'sshd[%d]: Failed password for invalid user %s from %s port %d ssh2' % (
                    pid, _pick(rng, BAD_USERS), _pick(rng, attackers), _num(rng, 1024, 65535))
            elif r < 0.135:
                msg = ('sshd[%d]: message repeated %d times: [ Failed password for %s from %s '
                       'port %d ssh2]' % (pid, _num(rng, 2, 5), _pick(rng, USERS),
                                          _pick(rng, attackers), _num(rng, 1024, 65535)))
            elif r < 0.16:
                msg = 'sshd[%d]: Invalid user %s from %s port %d' % (
                    pid, _pick(rng, BAD_USERS), _pick(rng, attackers), _num(rng, 1024, 65535))
            elif r < 0.19:
                if rng.random() < 0.7:
                    msg = ('sshd[%d]: Accepted publickey for %s from %s port %d ssh2: '
                           'ED25519 SHA256:%s' % (pid, _pick(rng, STAFF), _pick(rng, clients),
                                                  _num(rng, 1024, 65535), '%016x' % int(
                                                      rng.random() * 2 ** 62)))
                else:
                    msg = 'sshd[%d]: Accepted password for %s from %s port %d ssh2' % (
                        pid, _pick(rng, STAFF), _pick(rng, clients), _num(rng, 1024, 65535))
            elif r < 0.24:
                k = rng.random()
                if k < 0.3:
                    msg = ('sshd[%d]: Disconnected from authenticating user %s %s port %d '
                           '[preauth]' % (pid, _pick(rng, USERS), _pick(rng, attackers),
                                          _num(rng, 1024, 65535)))
                elif k < 0.5:
                    msg = 'sshd[%d]: Connection closed by %s port %d [preauth]' % (
                        pid, _pick(rng, attackers), _num(rng, 1024, 65535))
                elif k < 0.7:
                    msg = ('sshd[%d]: Received disconnect from %s port %d:11: Bye Bye '
                           '[preauth]' % (pid, _pick(rng, attackers), _num(rng, 1024, 65535)))
                elif k < 0.85:
                    msg = ('sshd[%d]: pam_unix(sshd:session): session opened for user %s'
                           '(uid=%d) by (uid=0)' % (pid, _pick(rng, STAFF), _num(rng, 1000, 1010)))
                else:
                    msg = 'sshd[%d]: pam_unix(sshd:session): session closed for user %s' % (
                        pid, _pick(rng, STAFF))
            elif r < 0.38:
                k = rng.random()
                if k < 0.4:
                    msg = 'CRON[%d]: (root) CMD (%s)' % (pid, _pick(rng, CRON_CMDS))
                elif k < 0.7:
                    msg = ('CRON[%d]: pam_unix(cron:session): session opened for user root'
                           '(uid=0) by (uid=0)' % pid)
                else:
                    msg = 'CRON[%d]: pam_unix(cron:session): session closed for user root' % pid
            elif r < 0.68:
                up = boot + t
                proto = 'TCP' if rng.random() < 0.8 else 'UDP'
                msg = ('kernel: [%12.6f] [UFW BLOCK] IN=eth0 OUT= MAC=%s SRC=%s DST=10.0.0.%d '
                       'LEN=%d TOS=0x00 PREC=0x00 TTL=%d ID=%d %sPROTO=%s SPT=%d DPT=%d %s' % (
                           up, _mac(rng), _pick(rng, attackers), _num(rng, 2, 40),
                           _num(rng, 40, 1500), _num(rng, 30, 250), _num(rng, 0, 65535),
                           'DF ' if rng.random() < 0.5 else '', proto, _num(rng, 1024, 65535),
                           _pick(rng, (22, 23, 80, 443, 445, 3389, 5900, 8080, 3306, 6379)),
                           'WINDOW=%d RES=0x00 SYN URGP=0' % _num(rng, 1024, 65535)
                           if proto == 'TCP' else 'LEN=%d' % _num(rng, 8, 512)))
            elif r < 0.93:
                k = rng.random()
                qid = _qid(rng)
                if k < 0.25:
                    msg = 'postfix/smtpd[%d]: connect from unknown[%s]' % (pid, _pick(rng, attackers))
                elif k < 0.45:
                    msg = ('postfix/smtpd[%d]: disconnect from unknown[%s] ehlo=1 auth=0/1 '
                           'quit=1 commands=2/3' % (pid, _pick(rng, attackers)))
                elif k < 0.55:
                    msg = ('postfix/smtpd[%d]: NOQUEUE: reject: RCPT from unknown[%s]: 554 5.7.1 '
                           '<spam@%s>: Relay access denied; from=<x@%s> to=<spam@%s> '
                           'proto=ESMTP helo=<%s>' % (pid, _pick(rng, attackers),
                                                      _pick(rng, DOMAINS), _pick(rng, DOMAINS),
                                                      _pick(rng, DOMAINS), _pick(rng, DOMAINS)))
                elif k < 0.75:
                    msg = 'postfix/qmgr[%d]: %s: from=<%s@%s>, size=%d, nrcpt=1 (queue active)' % (
                        pid, qid, _pick(rng, STAFF), _pick(rng, DOMAINS), _num(rng, 500, 90000))
                elif k < 0.85:
                    msg = 'postfix/qmgr[%d]: %s: removed' % (pid, qid)
                else:
                    msg = 'postfix/cleanup[%d]: %s: message-id=<%s.%d@%s>' % (
                        pid, qid, qid.lower(), _num(rng, 1, 99999), _pick(rng, DOMAINS))
            else:
                k = rng.random()
                if k < 0.4:
                    msg = 'systemd[1]: Started Session %d of User %s.' % (
                        _num(rng, 1, 99999), _pick(rng, STAFF))
                elif k < 0.6:
                    msg = 'systemd[1]: Starting Daily apt upgrade and clean activities...'
                elif k < 0.8:
                    u = _pick(rng, STAFF)
                    msg = ('sudo:    %s : TTY=pts/%d ; PWD=/home/%s ; USER=root ; '
                           'COMMAND=/usr/bin/apt update' % (u, _num(rng, 0, 5), u))
                else:
                    msg = 'dhclient[%d]: DHCPREQUEST for 10.0.0.%d on eth0 to 10.0.0.1 port 67' % (
                        pid, _num(rng, 2, 250))
            line = '%s %s %s\n' % (stamp, host, msg)
            out.append(line)
            if len(out) >= 4096:
                for x in out:
                    if rx.search(x):
                        checked += 1
                        digest.update(x.encode('utf-8'))
                f.write(''.join(out))
                del out[:]
        for x in out:
            if rx.search(x):
                checked += 1
                digest.update(x.encode('utf-8'))
        f.write(''.join(out))
        f.close()
        if checked != planted:
            raise BenchError('generator bug: planted %d matches, REGEX finds %d'
                             % (planted, checked))
        os.replace(tmp, path)
    finally:
        if not f.closed:
            f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return planted, digest.hexdigest()


def syslog_file(workdir, lines, seed):
    """(path, meta) of the cached input file, generating it when needed."""
    base = os.path.join(workdir, 'syslog-s%d-n%d.log' % (seed, lines))
    meta_path = base + '.json'
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if (meta.get('gen') == GEN_VERSION and meta.get('lines') == lines
                and os.path.getsize(base) == meta.get('bytes')):
            return base, meta
    except (OSError, ValueError):
        pass
    log('generating %s (%d lines, seed %d)...', base, lines, seed)
    t0 = time.perf_counter()
    matches, digest = generate(base, lines, seed)
    meta = {'gen': GEN_VERSION, 'lines': lines, 'seed': seed, 'matches': matches,
            'digest': digest,
            'bytes': os.path.getsize(base), 'regex': REGEX}
    tmp = '%s.tmp%d' % (meta_path, os.getpid())
    with open(tmp, 'w') as f:
        json.dump(meta, f)
    os.replace(tmp, meta_path)
    log('generated in %.1f s: %d bytes, %d matches', time.perf_counter() - t0,
        meta['bytes'], matches)
    return base, meta


##############################################################################
# Measuring a child: wall time, CPU, RSS from /proc
##############################################################################

def _status(pid):
    """(VmRSS kB, VmHWM kB) of a live process, or None (gone or a zombie)."""
    try:
        with open('/proc/%d/status' % pid, 'rb') as f:
            data = f.read()
    except OSError:
        return None
    rss = hwm = None
    for line in data.split(b'\n'):
        if line.startswith(b'VmRSS:'):
            rss = int(line.split()[1])
        elif line.startswith(b'VmHWM:'):
            hwm = int(line.split()[1])
    if rss is None:
        return None
    return rss, hwm or rss


def _children(pid):
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        pass
    # Kernels without CONFIG_PROC_CHILDREN: scan /proc for the parent pid.
    kids = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name, 'rb') as f:
                stat = f.read()
            if int(stat[stat.rindex(b')') + 2:].split()[1]) == pid:
                kids.append(int(name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


_TICK = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def _cpu_seconds(pid):
    """utime+stime of a live process, seconds, or None."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            stat = f.read()
        fields = stat[stat.rindex(b')') + 2:].split()
        return (int(fields[11]) + int(fields[12])) / float(_TICK)
    except (OSError, ValueError, IndexError):
        return None


def _proc_name(pid):
    """looper.py, syslog_in, perl...: the script for an interpreter, else argv[0]."""
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = f.read().split(b'\0')
    except OSError:
        return '?'
    argv = [a.decode('utf-8', 'replace') for a in argv if a]
    if not argv:
        return '?'
    name = os.path.basename(argv[0])
    if re.match(r'(python|perl)[0-9.]*$', name):
        for a in argv[1:]:
            if not a.startswith('-'):
                return os.path.basename(a)
    return name


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


class Sampler(threading.Thread):
    """Samples the RSS of a process and of its whole tree every `interval` s."""

    def __init__(self, pid, interval):
        threading.Thread.__init__(self)
        self.daemon = True
        self.pid = pid
        self.interval = interval
        self.done = threading.Event()
        self.samples = []          # (seconds since start, own VmRSS kB, tree VmRSS kB)
        self.hwm = 0               # own VmHWM, kB
        self.tree_peak = 0
        self.cpu = {}              # pid -> [name, CPU seconds at its last sample]
        self.t0 = time.perf_counter()

    def run(self):
        while True:
            st = _status(self.pid)
            if st is not None:
                rss, hwm = st
                tree = rss
                kids = _descendants(self.pid)
                for kid in kids:
                    kst = _status(kid)
                    if kst:
                        tree += kst[0]
                for pid in [self.pid] + kids:
                    cpu = _cpu_seconds(pid)
                    if cpu is not None:
                        if pid not in self.cpu or self.cpu[pid][0] == '?':
                            # '?': its cmdline could not be read (yet): try again.
                            self.cpu[pid] = [_proc_name(pid), cpu]
                        self.cpu[pid][1] = cpu
                self.hwm = max(self.hwm, hwm)
                self.tree_peak = max(self.tree_peak, tree)
                self.samples.append((time.perf_counter() - self.t0, rss, tree))
            if self.done.wait(self.interval):
                return

    def stop(self):
        self.done.set()
        self.join()


def run_measured(argv, stdout=None, stderr=None, cwd=None, env=None, interval=0.05,
                 timeout=None, stdin=None):
    """Run argv to its end; return a dict of measurements.  stdin, stdout,
    stderr: paths (stdin read from, the others truncated), or None for
    /dev/null."""
    out = open(stdout, 'wb') if stdout else subprocess.DEVNULL
    err = open(stderr, 'wb') if stderr else subprocess.DEVNULL
    inp = open(stdin, 'rb') if stdin else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err,
                             cwd=cwd, env=env)
        sampler = Sampler(p.pid, interval)
        sampler.t0 = t0
        sampler.start()
        killer = None
        if timeout:
            killer = threading.Timer(timeout, _kill_group, (p.pid,))
            killer.daemon = True
            killer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if killer:
            killer.cancel()
        sampler.stop()
    finally:
        for f in (out, err, inp):
            if f is not subprocess.DEVNULL:
                f.close()
    if os.WIFSIGNALED(status):
        rc = -os.WTERMSIG(status)
    else:
        rc = os.WEXITSTATUS(status)
    p.returncode = rc
    return {
        'rc': rc, 'wall': wall, 'cpu': ru.ru_utime + ru.ru_stime,
        'wait4_maxrss_kb': ru.ru_maxrss,
        'rss_own_kb': sampler.hwm or ru.ru_maxrss, 'rss_tree_kb': sampler.tree_peak or ru.ru_maxrss,
        'samples': sampler.samples,
        'cpu_by_process': _cpu_by_name(sampler.cpu),
    }


def _cpu_by_name(cpu):
    """{name: CPU seconds} summed over processes of the same name (as last
    sampled: up to one sampling interval short)."""
    out = {}
    for name, secs in cpu.values():
        out[name] = out.get(name, 0.0) + secs
    return out


def _kill_group(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def count_lines(path):
    n = 0
    try:
        with open(path, 'rb') as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                n += block.count(b'\n')
    except OSError:
        return 0
    return n


def digest_lines(path, pick=None):
    """(number of lines, sha1 of the lines) of a tool's output; pick(line)
    returns the matched syslog line (without newline) or None to skip it."""
    n = 0
    h = hashlib.sha1()
    try:
        with open(path, 'rb') as f:
            for line in f:
                line = line.rstrip(b'\n') if pick is None else pick(line)
                if line is None:
                    continue
                n += 1
                h.update(line + b'\n')
    except OSError:
        return 0, None
    return n, h.hexdigest()


_LOGFMT_LINE = re.compile(br'(?:^| )line=(?:"((?:[^"\\]|\\.)*)"|(\S*))')
_UNESCAPE = re.compile(br'\\(.)')


def _looper_line(line):
    """The `line` token of a logfile_out (logfmt) line."""
    m = _LOGFMT_LINE.search(line)
    if m is None:
        return b'?'
    if m.group(1) is not None:
        return _UNESCAPE.sub(br'\1', m.group(1))
    return m.group(2)


def _swatch_line(line):
    if not line.strip() or line.startswith(b'*** swatchdog'):
        return None
    return line.rstrip(b'\n')


def tail(path, n=15):
    try:
        with open(path, 'rb') as f:
            lines = f.read().decode('utf-8', 'replace').splitlines()
    except OSError:
        return '(no %s)' % path
    return '\n'.join(lines[-n:]) or '(empty %s)' % path


def rm(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def median(xs):
    return statistics.median(xs) if xs else float('nan')


def percentile(xs, p):
    """Nearest-rank percentile of a sorted list."""
    if not xs:
        return float('nan')
    k = max(0, min(len(xs) - 1, int(math.ceil(p / 100.0 * len(xs))) - 1))
    return xs[k]


##############################################################################
# The tools
##############################################################################

def write_file(path, text, mode=0o644):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def q(value):
    """A quoted Looper config value."""
    if "'" not in value:
        return "'%s'" % value
    if '"' not in value:
        return '"%s"' % value
    raise BenchError('cannot quote %r for a Looper config' % value)


# Both rules files compile the regex once: the namespace persists between events.
_RULES_SETUP = '''\
try:
    FAILED
except NameError:
    import re
    FAILED = re.compile(%(regex)r)
m = FAILED.search(inputTokens.get('desc', ''))
'''

RULES = '''\
# Bench rules: failed sshd passwords -> output 'out' with user, source, line.
''' + _RULES_SETUP + '''\
if m is not None:
    outputTokens.clear()
    outputTokens['user'] = m.group(1)
    outputTokens['source'] = m.group(2)
    outputTokens['line'] = '%%s %%s %%s' %% (inputTokens.get('date', ''),
                                          inputTokens.get('node', ''), inputTokens['desc'])
    writeTo('out')
'''

# The same rules, declaring which events they are for: Looper then runs
# them only for events whose text matches, and (every rules file having a
# watchfor) searches whole reads at once, making no dict for the others.
WATCHFOR_RULES = '''\
watchfor = r'%(watchfor)s'
''' + RULES

LAT_RULES = '''\
# Latency rules: the same regex; keep t and seq, add user and source.
''' + _RULES_SETUP + '''\
if m is not None:
    outputTokens['user'] = m.group(1)
    outputTokens['source'] = m.group(2)
    writeTo('out')
'''

BARE = '''\
import re, sys
rx = re.compile(%(regex)r)
search = rx.search
with open(sys.argv[1], encoding='utf-8', errors='surrogateescape') as f, \\
        open(sys.argv[2], 'w', encoding='utf-8', errors='surrogateescape') as out:
    for line in f:
        if search(line):
            out.write(line)
'''

LAT_IN = '''\
#!/usr/bin/env python3
# Latency input module: after its configuration (stdin, closed by Looper),
# emits warmup+count events, one every `interval` s, each stamped with
# t=time.monotonic() just before it is written (unbuffered, one write each).
import os, sys, time
cfg = {}
for line in sys.stdin:
    k, _, v = line.rstrip('\\n').partition('=')
    cfg[k] = v
count = int(cfg.get('count', '1000')) + int(cfg.get('warmup', '0'))
interval = float(cfg.get('interval', '0.005'))
time.sleep(float(cfg.get('delay', '0.3')))
start = time.monotonic()
for i in range(count):
    delay = start + i * interval - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    os.write(1, ('seq=%%d\\ndesc=sshd[4242]: Failed password for root from 203.0.113.%%d '
                 'port 4242 ssh2\\nt=%%.9f\\ngo\\n' %% (i, i %% 250 + 1, time.monotonic())).encode())
'''

LAT_OUT = '''\
#!/usr/bin/env python3
# Latency output module: reads its configuration up to `configure`, then for
# each event records `seq latency_seconds` (time.monotonic() at `go` - t)
# into `filename`, written when `quit` or EOF arrives.
import sys, time
inp = sys.stdin.buffer
cfg = {}
while True:
    line = inp.readline()
    if not line:
        sys.exit(0)
    line = line.rstrip(b'\\r\\n')
    if line == b'configure':
        break
    k, _, v = line.partition(b'=')
    cfg[k.decode()] = v.decode()
res = []
tok = {}
while True:
    line = inp.readline()
    now = time.monotonic()
    if not line or line == b'quit\\n':
        break
    if line == b'go\\n':
        res.append('%%s %%.9f %%s\\n' %% (tok.get(b'seq', b'?').decode(),
                                         now - float(tok.get(b't', b'nan')),
                                         tok.get(b'user', b'-').decode()))
        tok = {}
    else:
        k, _, v = line.rstrip(b'\\r\\n').partition(b'=')
        tok[k] = v
with open(cfg['filename'], 'w') as f:
    f.write(''.join(res))
'''

STALL = '''\
#!/bin/sh
# A stalled output: reads its configuration up to `configure`, then never
# reads its stdin again.
while read -r line; do
    [ "$line" = configure ] && break
done
PATH=/bin:/usr/bin:$PATH exec sleep 100000
'''


# The correlation job: one distinct key per event, the desc of a failed
# login (about 70 bytes), the same string for Looper and for SEC.
KEY_DESC = 'sshd[4242]: Failed password for u%07d from 10.%d.%d.%d port 22 ssh2'


def key_desc(i):
    return KEY_DESC % (i, i >> 16 & 255, i >> 8 & 255, i & 255)


KEYS_IN = '''\
#!/usr/bin/env python3
# Correlation input module: after its configuration (stdin, closed by
# Looper), writes `count` events with distinct desc values (node, desc),
# a thousand a write, then holds `hold` s so that Looper's RSS is sampled
# at its plateau, and exits 0.
import sys, time
cfg = {}
for line in sys.stdin:
    k, _, v = line.rstrip('\\n').partition('=')
    cfg[k] = v
count = int(cfg['count'])
out = sys.stdout.buffer
buf = []
for i in range(count):
    buf.append('node=web01\\ndesc=%(desc)s\\ngo\\n' %% (i, i >> 16 & 255, i >> 8 & 255, i & 255))
    if len(buf) == 1000:
        out.write(''.join(buf).encode())
        out.flush()
        del buf[:]
out.write(''.join(buf).encode())
out.flush()
time.sleep(float(cfg.get('hold', '1')))
'''

# Rules for the correlation job: the key is the event's desc.  `base`
# reads it and calls nothing: what every event costs without the helper.
KEY_RULES = {
    'base': "key = inputTokens['desc']\n",
    'suppress': "key = inputTokens['desc']\nif suppress(key, 3600):\n    pass\n",
    'threshold': "key = inputTokens['desc']\nif threshold(key, 5, 3600):\n    pass\n",
}

# SEC: the same desc as $1; `base` is a Single rule with no action (one
# match, nothing kept), the others create one correlation operation per
# distinct desc.
_SEC_PATTERN = r'^\S+\s+\d+ \S+ \S+ (.+)$'
SEC_KEY_RULES = {
    'base': 'type=Single\nptype=RegExp\npattern=%s\ndesc=$1\naction=none\n' % _SEC_PATTERN,
    'suppress': ('type=SingleWithSuppress\nptype=RegExp\npattern=%s\ndesc=$1\naction=none\n'
                 'window=3600\n' % _SEC_PATTERN),
    'threshold': ('type=SingleWithThreshold\nptype=RegExp\npattern=%s\ndesc=$1\naction=none\n'
                  'thresh=5\nwindow=3600\n' % _SEC_PATTERN),
}


DIE = '''\
#!/bin/sh
# An output that dies: reads its configuration up to `configure`, then
# exits 1 (Looper restarts it after restartdelay).
while read -r line; do
    [ "$line" = configure ] && break
done
exit 1
'''


class Ctx(object):
    """Paths and options shared by every section."""

    def __init__(self, args):
        self.args = args
        self.python = args.python
        self.looper = os.path.abspath(args.looper)
        self.workdir = os.path.abspath(args.workdir)
        self.rundir = os.path.join(self.workdir, 'run-%d' % os.getpid())
        # Scratch directories of earlier runs that were killed.
        for name in os.listdir(self.workdir):
            if name.startswith('run-') and name[4:].isdigit() and \
                    not os.path.exists('/proc/%s' % name[4:]):
                shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)
        os.makedirs(self.rundir)
        self.modules = os.path.join(os.path.dirname(self.looper), 'modules')
        self.input = None
        self.meta = None
        self.looper_version = '?'
        if os.path.exists(self.looper):
            r = subprocess.run([self.python, self.looper, '--version'], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True)
            self.looper_version = (r.stdout.strip().splitlines() or ['?'])[-1]

    def path(self, name):
        return os.path.join(self.rundir, name)


def looper_conf(ctx, name, rules, input_block, outputs, extra=''):
    """Write a Looper config; outputs = [(name, {key: value})]."""
    text = ['# generated by bench/bench.py', 'rulesfile = %s' % q(rules),
            'logfile = %s' % q(ctx.path(name + '.log'))]
    if extra:
        text.append(extra)
    text.append('input in {')
    text.extend('    %s = %s' % (k, q(v)) for k, v in input_block.items())
    text.append('}')
    for oname, block in outputs:
        text.append('output %s {' % oname)
        text.extend('    %s = %s' % (k, q(v)) for k, v in block.items())
        text.append('}')
    return write_file(ctx.path(name + '.conf'), '\n'.join(text) + '\n')


class Tool(object):
    name = label = ''
    version = ''
    skip = None          # reason it is not run

    def prepare(self, ctx):
        pass

    def argv(self, ctx):
        raise NotImplementedError

    stdout = None        # path for the tool's stdout
    stdin = None         # path of a file for the tool's stdin

    def before(self, ctx):
        pass

    def count(self, ctx):
        """(matches, sha1 of the matched lines in order)"""
        raise NotImplementedError

    def diagnose(self, ctx):
        return ''


def looper_missing(ctx):
    """Why Looper cannot run here, or None."""
    if not os.path.exists(ctx.looper):
        return 'looper.py not found at %s' % ctx.looper
    for m in ('syslog_in', 'logfile_out'):
        if not os.access(os.path.join(ctx.modules, m), os.X_OK):
            return 'module %s not found (or not executable) in %s' % (m, ctx.modules)
    return None


def looper_check(ctx, conf):
    """None when `looper.py --check conf` passes, else why not."""
    cmd = [ctx.python, ctx.looper, '--check', conf]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if r.returncode != 0:
        return 'FAILED: `%s` exited %d:\n%s' % (' '.join(cmd), r.returncode, r.stdout)
    return None


def declared_confirm(ctx):
    """'yes' or 'no': whether the shipped logfile_out's declaration
    (`# /// looper` ... `# ///`) makes confirm its default."""
    try:
        with open(os.path.join(ctx.modules, 'logfile_out'), 'rb') as f:
            head = f.read(8192).decode('utf-8', 'replace')
    except OSError:
        return 'no'
    m = re.search(r'^# /// looper\n(.*?)^# ///$', head, re.M | re.S)
    if m:
        c = re.search(r"^#\s*confirm\s*=\s*['\"]?(\w+)", m.group(1), re.M)
        if c and c.group(1).lower() in ('yes', 'true', 'on', '1'):
            return 'yes'
    return 'no'


class Looper(Tool):
    name, label = 'looper', 'Looper'
    input_keys = {}      # extra keys for syslog_in's block
    rules_text = RULES

    def prepare(self, ctx):
        self.skip = looper_missing(ctx)
        if self.skip:
            return
        self.version = ctx.looper_version
        rules = write_file(ctx.path(self.name + '.rules'),
                           self.rules_text % {'regex': REGEX, 'watchfor': WATCHFOR})
        self.out = ctx.path(self.name + '.out')
        self.conf = looper_conf(ctx, 'bench-' + self.name, rules,
                                dict({'module': 'syslog_in', 'logfile': ctx.input}, **self.input_keys),
                                [('out', {'module': 'logfile_out', 'filename': self.out})])
        self.skip = looper_check(ctx, self.conf)

    def argv(self, ctx):
        return [ctx.python, ctx.looper, self.conf]

    def before(self, ctx):
        rm(self.out)

    def count(self, ctx):
        return digest_lines(self.out, _looper_line)

    def diagnose(self, ctx):
        log = ctx.path('bench-%s.log' % self.name)
        return 'looper log (%s):\n%s' % (log, tail(log))


class LooperLean(Looper):
    name, label = 'lean', 'Looper, tokens = date node desc'
    input_keys = {'tokens': 'date node desc'}


class LooperWatchfor(Looper):
    name, label = 'watchfor', 'Looper, watchfor'
    rules_text = WATCHFOR_RULES


class NoRules(Looper):
    """NORULES: shipped syslog_in -> shipped logfile_out, every event
    unchanged (the original Looper's first example).  confirm None: as
    shipped (logfile_out's declaration decides); else 'yes' or 'no' set in
    the output block."""
    name, label = 'norules', 'Looper NORULES'
    confirm = None

    def prepare(self, ctx):
        self.skip = looper_missing(ctx)
        if self.skip:
            return
        self.version = ctx.looper_version
        shipped = declared_confirm(ctx)
        block = {'module': 'logfile_out', 'filename': ctx.path(self.name + '.out')}
        if self.confirm is None:
            self.label = 'Looper NORULES, logfile_out as shipped (confirm = %s)' % shipped
        else:
            block['confirm'] = self.confirm
            self.label = 'Looper NORULES, logfile_out with confirm = %s' % self.confirm
        self.out = block['filename']
        self.conf = looper_conf(ctx, 'bench-' + self.name, 'NORULES',
                                {'module': 'syslog_in', 'logfile': ctx.input}, [('out', block)])
        self.skip = looper_check(ctx, self.conf)

    def count(self, ctx):
        return count_lines(self.out), None

    def diagnose(self, ctx):
        log = ctx.path('bench-%s.log' % self.name)
        return 'looper log (%s):\n%s' % (log, tail(log))


class NoRulesOther(NoRules):
    """The other confirm setting than the shipped one."""
    name = 'norules-alt'

    def prepare(self, ctx):
        self.confirm = 'no' if declared_confirm(ctx) == 'yes' else 'yes'
        NoRules.prepare(self, ctx)


class SyslogAlone(Tool):
    """`printf 'logfile=FILE\\n' | PYTHON modules/syslog_in > /dev/null`: the
    input module by hand, the floor of every Looper run on a file."""
    name, label = 'syslog_in', 'syslog_in alone > /dev/null'

    def prepare(self, ctx):
        self.skip = looper_missing(ctx)
        if self.skip:
            return
        self.version = 'Python ' + python_version(ctx.python)
        self.stdin = write_file(ctx.path('syslog_in.config'), 'logfile=%s\n' % ctx.input)

    def argv(self, ctx):
        return [ctx.python, os.path.join(ctx.modules, 'syslog_in')]

    def count(self, ctx):
        return None, None       # its output went to /dev/null


class Sec(Tool):
    name, label = 'sec', 'SEC'

    def prepare(self, ctx):
        self.exe = shutil.which('sec')
        if not self.exe:
            self.skip = 'sec is not installed (Debian/Ubuntu: apt-get install sec)'
            return
        r = subprocess.run([self.exe, '--version'], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        self.version = (r.stdout.strip().splitlines() or ['?'])[0]
        self.out = ctx.path('sec.out')
        self.conf = write_file(ctx.path('sec.conf'), (
            'type=Single\nptype=RegExp\npattern=%s\ndesc=failed password\n'
            'action=write %s $0\n' % (REGEX, self.out)))

    def argv(self, ctx):
        return [self.exe, '--conf=' + self.conf, '--input=' + ctx.input, '--notail',
                '--debug=3', '--log=/dev/null']

    def before(self, ctx):
        rm(self.out)

    def count(self, ctx):
        return digest_lines(self.out)


class Swatch(Tool):
    name, label = 'swatch', 'swatch'

    def prepare(self, ctx):
        self.exe = shutil.which('swatchdog')
        if not self.exe:
            self.skip = 'swatchdog is not installed (Debian/Ubuntu: apt-get install swatch)'
            return
        r = subprocess.run([self.exe, '--version'], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        m = re.search(r'version (\S+)', r.stdout)
        self.version = 'swatchdog ' + (m.group(1) if m else '?')
        self.conf = write_file(ctx.path('swatch.conf'),
                               'watchfor /%s/\n    echo normal\n' % REGEX)
        self.scripts = ctx.path('swatch-scripts')
        os.mkdir(self.scripts)
        self.stdout = ctx.path('swatch.out')

    def argv(self, ctx):
        return [self.exe, '--config-file=' + self.conf, '--examine=' + ctx.input,
                '--script-dir=' + self.scripts]

    def before(self, ctx):
        rm(self.stdout)

    def count(self, ctx):
        return digest_lines(self.stdout, _swatch_line)


class Bare(Tool):
    name, label = 'bare', 'bare Python loop'

    def prepare(self, ctx):
        self.script = write_file(ctx.path('bare.py'), BARE % {'regex': REGEX})
        self.out = ctx.path('bare.out')
        self.version = 'Python ' + python_version(ctx.python)

    def argv(self, ctx):
        return [ctx.python, self.script, ctx.input, self.out]

    def before(self, ctx):
        rm(self.out)

    def count(self, ctx):
        return digest_lines(self.out)


def python_version(python):
    r = subprocess.run([python, '-c', 'import sys; print(sys.version.split()[0])'],
                       stdout=subprocess.PIPE, universal_newlines=True)
    return r.stdout.strip()


##############################################################################
# Sections
##############################################################################

def run_tool(ctx, tool, timeout):
    tool.before(ctx)
    err = ctx.path('%s.stderr' % tool.name)
    res = run_measured(tool.argv(ctx), stdout=tool.stdout, stderr=err, cwd=ctx.rundir,
                       interval=ctx.args.sample_interval, timeout=timeout, stdin=tool.stdin)
    res['matches'], res['digest'] = tool.count(ctx)
    if res['rc'] != 0:
        raise BenchError('%s failed: `%s` exited %d\nstderr:\n%s\n%s' % (
            tool.label, ' '.join(tool.argv(ctx)), res['rc'], tail(err), tool.diagnose(ctx)))
    return res


def warm(path):
    """Read a file once so the first tool does not pay for the disk."""
    with open(path, 'rb') as f:
        while f.read(1 << 22):
            pass


def run_rounds(ctx, active, rounds, timeout, what):
    """Run every tool once per round, in an order rotated per round (so no
    tool always runs first or after the same one).  Returns ({name: [run
    results]}, {name: why it failed})."""
    runs = {t.name: [] for t in active}
    failed = {}
    for rnd in range(rounds):
        k = rnd % len(active) if active else 0
        order = active[k:] + active[:k]
        for tool in order:
            if tool.name in failed:
                continue
            log('%s round %d/%d: %s...', what, rnd + 1, rounds, tool.label)
            try:
                res = run_tool(ctx, tool, timeout)
            except BenchError as e:
                failed[tool.name] = str(e)
                log('%s', e)
                continue
            res['round'] = rnd
            log('  %.3f s, %s lines out, RSS %.1f MB (tree %.1f MB)', res['wall'],
                '-' if res['matches'] is None else res['matches'],
                res['rss_own_kb'] / 1024.0, res['rss_tree_kb'] / 1024.0)
            runs[tool.name].append(res)
    return runs, failed


def summarize(ctx, active, runs, lines):
    """Per tool: medians over its rounds, peaks, the match counts and hashes."""
    summary = {}
    for tool in active:
        rs = runs[tool.name]
        if not rs:
            continue
        wall = median([r['wall'] for r in rs])
        summary[tool.name] = {
            'label': tool.label, 'version': tool.version, 'argv': tool.argv(ctx),
            'wall_median': wall, 'lines_per_s': lines / wall if wall else 0,
            'cpu_median': median([r['cpu'] for r in rs]),
            'rss_own_mb': max(r['rss_own_kb'] for r in rs) / 1024.0,
            'rss_tree_mb': max(r['rss_tree_kb'] for r in rs) / 1024.0,
            'matches': sorted(set(r['matches'] for r in rs if r['matches'] is not None)),
            'digests': sorted(set(str(r['digest']) for r in rs)),
            'walls': [r['wall'] for r in rs],
            'cpu_by_process': {k: median([r['cpu_by_process'].get(k, 0.0) for r in rs])
                               for k in rs[0]['cpu_by_process']},
        }
    return summary


def pair_ratios(runs, mine, peers):
    """{peer: {'per_round': [mine / peer wall in the same round], 'median'}}."""
    table = {}
    lr = {r['round']: r['wall'] for r in runs.get(mine, [])}
    for peer in peers:
        per = [lr[r['round']] / r['wall'] for r in runs.get(peer, []) if r['round'] in lr]
        if per:
            table[peer] = {'per_round': per, 'median': median(per)}
    return table


LOOPERS = ('looper', 'lean', 'watchfor')     # the Looper variants of the throughput job
PEERS = ('sec', 'swatch', 'bare')


def section_throughput(ctx, tools, results):
    args = ctx.args
    lines = ctx.meta['lines']
    expected = ctx.meta['matches']
    active = [t for t in tools if not t.skip]
    warm(ctx.input)
    runs, failed = run_rounds(ctx, active, args.rounds, max(120.0, lines / 2000.0), 'throughput')
    summary = summarize(ctx, active, runs, lines)
    ratios = {}         # Looper variant -> peer -> Looper / peer
    for mine in LOOPERS:
        if runs.get(mine):
            ratios[mine] = pair_ratios(runs, mine, PEERS)
    mismatches = []
    for name, s in summary.items():
        if s['matches'] != [expected]:
            mismatches.append('%s found %s matches, expected %d' % (
                s['label'], '/'.join(map(str, s['matches'])), expected))
        elif s['digests'] != [ctx.meta['digest']]:
            mismatches.append('%s found %d matches, but not the same lines as planted '
                              '(sha1 %s, expected %s)' % (s['label'], expected,
                                                          '/'.join(s['digests']), ctx.meta['digest']))
    results['throughput'] = {
        'lines': lines, 'expected_matches': expected, 'rounds': args.rounds,
        'tools': summary, 'ratios': ratios,
        'failed': failed, 'mismatches': mismatches,
        'runs': {n: [{k: v for k, v in r.items() if k != 'samples'} for r in rs]
                 for n, rs in runs.items()},
        'skipped': {t.name: t.skip for t in tools if t.skip},
    }
    # Keep Looper's RSS series for the memory section.
    if runs.get('looper'):
        ctx.looper_runs = runs['looper']


def section_norules(ctx, results):
    """NORULES syslog_in -> logfile_out (as shipped, and with the other
    confirm setting) against syslog_in alone writing to /dev/null."""
    args = ctx.args
    lines = ctx.meta['lines']
    tools = [NoRules(), NoRulesOther(), SyslogAlone()]
    for t in tools:
        t.prepare(ctx)
        if t.skip:
            log('skipping %s: %s', t.label, t.skip)
    active = [t for t in tools if not t.skip]
    warm(ctx.input)
    runs, failed = run_rounds(ctx, active, args.rounds, max(120.0, lines / 2000.0), 'NORULES')
    summary = summarize(ctx, active, runs, lines)
    ratios = {}
    for mine in ('norules', 'norules-alt'):
        if runs.get(mine):
            ratios[mine] = pair_ratios(runs, mine, ('syslog_in',))
    mismatches = []
    for name in ('norules', 'norules-alt'):
        s = summary.get(name)
        if s and s['matches'] != [lines]:
            mismatches.append('%s: logfile_out wrote %s lines, expected %d' % (
                s['label'], '/'.join(map(str, s['matches'])), lines))
    results['norules'] = {
        'lines': lines, 'rounds': args.rounds, 'order': [t.name for t in tools],
        'tools': summary, 'ratios': ratios, 'failed': failed, 'mismatches': mismatches,
        'skipped': {t.name: t.skip for t in tools if t.skip},
        'runs': {n: [{k: v for k, v in r.items() if k != 'samples'} for r in rs]
                 for n, rs in runs.items()},
    }


def section_startup(ctx, results):
    """`--version` against `-c pass`, and a whole short batch run (the
    examples/basic.conf job: syslog_in over the 50-line sample log into
    logfile_out, NORULES) against `cat` of the same file into a file; the
    four commands alternated, in an order rotated per repetition."""
    reps = ctx.args.startup_reps
    sample = os.path.join(os.path.dirname(ctx.looper), 'examples', 'sample.log')
    if not os.path.exists(sample):
        sample = os.path.join(ROOT, 'examples', 'sample.log')
    sample_lines = count_lines(sample)
    batch_out = ctx.path('basic.out')
    cat_out = ctx.path('cat.out')
    conf = looper_conf(ctx, 'basic', 'NORULES', {'module': 'syslog_in', 'logfile': sample},
                       [('out', {'module': 'logfile_out', 'filename': batch_out})])
    why = looper_check(ctx, conf)
    if why:
        raise BenchError(why)
    cmds = [('python -c pass', [ctx.python, '-c', 'pass'], None),
            ('looper.py --version', [ctx.python, ctx.looper, '--version'], None),
            ('cat', ['cat', sample], cat_out),
            ('batch', [ctx.python, ctx.looper, conf], batch_out)]
    times = {name: [] for name, _, _ in cmds}
    log('start-up: %d repetitions each...', reps)
    for i in range(reps):
        k = i % len(cmds)
        for name, argv, out in cmds[k:] + cmds[:k]:
            if out:
                rm(out)
            stdout = open(out, 'wb') if name == 'cat' else subprocess.DEVNULL
            try:
                t0 = time.perf_counter()
                rc = subprocess.call(argv, stdout=stdout, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, cwd=ctx.rundir)
                times[name].append(time.perf_counter() - t0)
            finally:
                if stdout is not subprocess.DEVNULL:
                    stdout.close()
            if rc != 0:
                raise BenchError('`%s` exited %d%s' % (' '.join(argv), rc, (
                    '\nlooper log:\n' + tail(ctx.path('basic.log'))) if name == 'batch' else ''))
            if out and count_lines(out) != sample_lines:
                raise BenchError('`%s` wrote %d lines, expected %d' % (
                    ' '.join(argv), count_lines(out), sample_lines))
    base = median(times['python -c pass'])
    loop = median(times['looper.py --version'])
    cat = median(times['cat'])
    batch = median(times['batch'])
    results['startup'] = {'reps': reps, 'python_c_pass_ms': base * 1000,
                          'looper_version_ms': loop * 1000, 'ratio': loop / base,
                          'cat_ms': cat * 1000, 'batch_ms': batch * 1000,
                          'batch_ratio_cat': batch / cat, 'batch_ratio_pass': batch / base,
                          'sample_lines': sample_lines, 'confirm': declared_confirm(ctx),
                          'times': times}


class Background(object):
    """Load processes, restarted whenever one ends, until stop()."""

    def __init__(self, argvs, cwd, before=None):
        self.argvs = argvs
        self.cwd = cwd
        self.before = before
        self.procs = [None] * len(argvs)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True

    def _spawn(self, i):
        if self.before:
            self.before()
        self.procs[i] = subprocess.Popen(self.argvs[i], cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)

    def start(self):
        for i in range(len(self.argvs)):
            self._spawn(i)
        self.thread.start()

    def _run(self):
        while not self.done.wait(0.05):
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    self._spawn(i)

    def stop(self):
        self.done.set()
        self.thread.join()
        # SIGTERM first: a Looper stops its modules (each in its own group).
        for p in self.procs:
            try:
                p.terminate()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()


def _direct(ctx, lat_in, lat_out, res_path, in_config, timeout):
    """The control: lat_in piped straight into lat_out, no Looper between."""
    r, w = os.pipe()
    try:
        out = subprocess.Popen([ctx.python, lat_out], stdin=r, cwd=ctx.rundir)
    finally:
        os.close(r)
    try:
        os.write(w, ('filename=%s\nconfigure\n' % res_path).encode())
        inp = subprocess.Popen([ctx.python, lat_in], stdin=subprocess.PIPE, stdout=w,
                               cwd=ctx.rundir)
    finally:
        os.close(w)
    inp.communicate(in_config.encode(), timeout=timeout)
    out.wait(timeout)
    if inp.returncode or out.returncode:
        raise BenchError('direct latency run failed: lat_in %s, lat_out %s'
                         % (inp.returncode, out.returncode))


def section_latency(ctx, tools, results):
    args = ctx.args
    lat_in = write_file(ctx.path('lat_in.py'), LAT_IN % {}, 0o755)
    lat_out = write_file(ctx.path('lat_out.py'), LAT_OUT % {}, 0o755)
    rules = write_file(ctx.path('lat.rules'), LAT_RULES % {'regex': REGEX})
    res_path = ctx.path('lat.results')
    in_block = {'module': lat_in, 'count': str(args.latency_events),
                'warmup': str(args.latency_warmup), 'interval': str(args.latency_interval)}
    conf = looper_conf(ctx, 'lat', rules, in_block,
                       [('out', {'module': lat_out, 'filename': res_path})])
    looper_tool = [t for t in tools if t.name == 'looper'][0]
    burn = [[ctx.python, '-c', 'while True: pass']] * len(cpus_allowed())
    stream = [looper_tool.argv(ctx)]
    # (name, through Looper?, background load)
    conditions = [('idle', True, None), ('cpu', True, burn), ('stream', True, stream),
                  ('direct-idle', False, None), ('direct-cpu', False, burn)]
    out = {'events': args.latency_events, 'interval_s': args.latency_interval,
           'method': 'bench-written input/output modules, t=time.monotonic()',
           'conditions': {}}
    expected_run = (args.latency_warmup + args.latency_events) * args.latency_interval + 0.3
    timeout = expected_run * 5 + 30
    for name, through_looper, argvs in conditions:
        log('latency: %s, %d events every %g ms...', name, args.latency_events,
            args.latency_interval * 1000)
        bg = None
        if argvs:
            bg = Background(argvs, ctx.rundir, before=lambda: rm(looper_tool.out))
            bg.start()
            time.sleep(0.5)
        rm(res_path)
        try:
            if through_looper:
                res = run_measured([ctx.python, ctx.looper, conf], stderr=ctx.path('lat.stderr'),
                                   cwd=ctx.rundir, interval=ctx.args.sample_interval,
                                   timeout=timeout)
                if res['rc'] != 0:
                    raise BenchError(
                        'latency run (%s) failed: `%s %s %s` exited %d\n%s\nlooper log:\n%s'
                        % (name, ctx.python, ctx.looper, conf, res['rc'],
                           tail(ctx.path('lat.stderr')), tail(ctx.path('lat.log'))))
            else:
                _direct(ctx, lat_in, lat_out, res_path,
                        ''.join('%s=%s\n' % kv for kv in in_block.items()), timeout)
        finally:
            if bg:
                bg.stop()
        lat = []
        try:
            with open(res_path) as f:
                for line in f:
                    seq, value, user = line.split()
                    if through_looper and user != 'root':
                        raise BenchError('latency event %s arrived without the user token '
                                         'the rules set' % seq)
                    if int(seq) >= args.latency_warmup:
                        lat.append(float(value) * 1000.0)
        except OSError as e:
            raise BenchError('latency run (%s): no results: %s' % (name, e))
        if len(lat) != args.latency_events:
            raise BenchError('latency run (%s): %d of %d events arrived' % (
                name, len(lat), args.latency_events))
        lat.sort()
        out['conditions'][name] = {
            'p50_ms': percentile(lat, 50), 'p99_ms': percentile(lat, 99), 'max_ms': lat[-1],
            'mean_ms': sum(lat) / len(lat), 'n': len(lat), 'looper': through_looper,
            'load': ' '.join(argvs[0]) + (' x%d' % len(argvs) if len(argvs) > 1 else '')
            if argvs else '',
        }
        c = out['conditions'][name]
        log('  p50 %.3f ms, p99 %.3f ms, max %.3f ms', c['p50_ms'], c['p99_ms'], c['max_ms'])
    results['latency'] = out


def rss_profile(samples):
    """Own RSS at 25/50/75/100% of a run, peak, and flatness: whether the
    running peak still rises in the second half of the run.  (RSS may swing
    inside a bound as queues fill and drain, so two instants can differ
    without a leak; a leak keeps pushing the peak up.)"""
    samples = [s for s in samples if s[1]]
    # Too short a run cannot say anything about a trend: the first quarter
    # is still start-up (imports, module spawns).
    if len(samples) < 20 or samples[-1][0] < 1.0:
        return None
    end = samples[-1][0]

    def at(frac):
        return min(samples, key=lambda s: abs(s[0] - frac * end))[1]

    half = max(s[1] for s in samples if s[0] <= 0.5 * end)
    growth = max(s[1] for s in samples) - half
    return {'samples': len(samples), 'rss25_mb': at(0.25) / 1024.0, 'rss50_mb': at(0.5) / 1024.0,
            'rss75_mb': at(0.75) / 1024.0, 'rss100_mb': samples[-1][1] / 1024.0,
            'peak_mb': max(s[1] for s in samples) / 1024.0, 'peak_first_half_mb': half / 1024.0,
            'growth_2nd_half_mb': growth / 1024.0, 'flat': growth <= max(1024, 0.05 * half)}


def section_memory(ctx, tools, results):
    out = {}
    looper_tool = [t for t in tools if t.name == 'looper'][0]
    runs = getattr(ctx, 'looper_runs', None)
    if not runs:
        log('memory: Looper on %d lines...', ctx.meta['lines'])
        runs = [run_tool(ctx, looper_tool, max(120.0, ctx.meta['lines'] / 2000.0))]
        if runs[0]['matches'] != ctx.meta['matches']:
            raise BenchError('Looper found %d matches, expected %d' % (
                runs[0]['matches'], ctx.meta['matches']))
    run = max(runs, key=lambda r: r['rss_own_kb'])
    prof = rss_profile(run['samples']) or {}
    prof['hwm_mb'] = run['rss_own_kb'] / 1024.0
    prof['tree_peak_mb'] = run['rss_tree_kb'] / 1024.0
    prof['wall'] = run['wall']
    out['run'] = prof

    # Stalled output: a module that never reads.
    stall = write_file(ctx.path('stall.sh'), STALL, 0o755)
    out['stalled'] = side_run(ctx, 'stalled', {'module': 'logfile_out', 'queuesize': '1000'},
                              {'module': stall, 'queuesize': '1000', 'overflow': 'drop',
                               'draintimeout': '1', 'closetimeout': '1'})
    # A confirmed output at full speed beside a module that dies as soon
    # as it is configured and waits restartdelay = 60 s to be restarted
    # (a pending 60 s timer under a confirm deadline reset at every answer:
    # this once piled cancelled timers up to 54 MB).
    die = write_file(ctx.path('die.sh'), DIE, 0o755)
    out['restarting'] = side_run(ctx, 'restarting',
                                 {'module': 'logfile_out', 'queuesize': '1000', 'confirm': 'yes'},
                                 {'module': die, 'queuesize': '1000', 'overflow': 'drop',
                                  'restartdelay': '60', 'draintimeout': '1', 'closetimeout': '1'})
    results['memory'] = out


def side_run(ctx, name, fast, other):
    """NORULES over the input file to two outputs: `fast` (a logfile_out
    block, its filename added here) and `other` (the troubled one, which
    drops).  Looper's RSS profile, its exit status (1 by design: events for
    the other output were dropped), the counters it logged at the end, and
    how many events the fast output wrote."""
    args = ctx.args
    fast_out = ctx.path(name + '-fast.out')
    rm(fast_out)
    conf = looper_conf(ctx, name, 'NORULES', {'module': 'syslog_in', 'logfile': ctx.input},
                       [('fast', dict(fast, filename=fast_out)), (name, other)])
    log('memory: %s output beside a fast one, %d events...', name, ctx.meta['lines'])
    res = run_measured([ctx.python, ctx.looper, conf], stderr=ctx.path(name + '.stderr'),
                       cwd=ctx.rundir, interval=args.sample_interval,
                       timeout=max(120.0, ctx.meta['lines'] / 2000.0))
    delivered = count_lines(fast_out)
    rm(fast_out)
    prof = rss_profile(res['samples']) or {}
    prof.update({'rc': res['rc'], 'wall': res['wall'], 'hwm_mb': res['rss_own_kb'] / 1024.0,
                 'fast_delivered': delivered, 'events': ctx.meta['lines'],
                 'fast': fast, 'other': other})
    try:
        with open(ctx.path(name + '.log'), 'rb') as f:
            text = f.read().decode('utf-8', 'replace')
    except OSError:
        text = ''
    counters = {}
    for k, v in re.findall(r'\b(output\.[\w-]+\.\w+)=(\d+)', text):
        counters[k] = int(v)           # the last value logged wins
    prof['counters'] = counters
    prof['dropped'] = counters.get('output.%s.dropped' % name)
    prof['restarts'] = counters.get('output.%s.restarts' % name)
    log('  %s: rc %d, %.2f s, fast got %d/%d, RSS peak %.1f MB, %s', name, res['rc'], res['wall'],
        delivered, ctx.meta['lines'], prof['hwm_mb'],
        'flat' if prof.get('flat') else 'NOT flat' if 'flat' in prof else 'too short to tell')
    if res['rc'] < 0:
        raise BenchError('%s-output run died: `%s %s %s` %d\n%s' % (
            name, ctx.python, ctx.looper, conf, res['rc'], tail(ctx.path(name + '.log'))))
    return prof


def _feed_fifo(fifo, path, hold):
    """Write the file into the FIFO, hold it open `hold` s, close it."""
    with open(fifo, 'wb') as out, open(path, 'rb') as f:
        try:
            shutil.copyfileobj(f, out, 1 << 16)
            out.flush()
            time.sleep(hold)
        except BrokenPipeError:
            pass


def section_correlation(ctx, tools, results):
    """Memory per key of the correlation helpers, beside SEC's: one run per
    case with --keys distinct keys (all within the window), the RSS growth
    over the same run without the helper call, divided by the keys."""
    args = ctx.args
    n = args.keys
    hold = 0.2 if args.smoke else 1.0
    keys_in = write_file(ctx.path('keys_in.py'), KEYS_IN % {'desc': KEY_DESC}, 0o755)
    timeout = max(120.0, n / 2000.0)
    out = {'keys': n, 'hold': hold, 'looper': {}, 'sec': {}}
    for case in ('base', 'suppress', 'threshold'):
        rules = write_file(ctx.path('keys-%s.rules' % case), KEY_RULES[case])
        conf = looper_conf(ctx, 'keys-' + case, rules,
                           {'module': keys_in, 'count': str(n), 'hold': str(hold)},
                           [('out', {'module': 'logfile_out', 'filename': ctx.path('keys.out')})])
        log('correlation: Looper, %s, %d keys...', case, n)
        res = run_measured([ctx.python, ctx.looper, conf], stderr=ctx.path('keys.stderr'),
                           cwd=ctx.rundir, interval=args.sample_interval, timeout=timeout)
        if res['rc'] != 0:
            raise BenchError('correlation run (%s) failed: `%s %s %s` exited %d\n%s' % (
                case, ctx.python, ctx.looper, conf, res['rc'], tail(ctx.path('keys-%s.log' % case))))
        out['looper'][case] = {'hwm_kb': res['rss_own_kb'], 'wall': res['wall'] - hold}
        log('  %.2f s, RSS peak %.1f MB', res['wall'], res['rss_own_kb'] / 1024.0)
    sec = [t for t in tools if t.name == 'sec' and getattr(t, 'exe', None)]
    if sec:
        path = ctx.path('keys.log')
        with open(path, 'w') as f:
            for start in range(0, n, 4096):
                f.write(''.join('Mar  3 00:00:00 web01 %s\n' % key_desc(i)
                                for i in range(start, min(n, start + 4096))))
        warm(path)
        fifo = ctx.path('keys.fifo')
        for case in ('base', 'suppress', 'threshold'):
            conf = write_file(ctx.path('keys-sec-%s.conf' % case), SEC_KEY_RULES[case])
            log('correlation: SEC, %s, %d keys...', case, n)
            argv = [sec[0].exe, '--conf=' + conf, '--input=-', '--notail', '--debug=3',
                    '--log=/dev/null']
            # SEC reads the file from a pipe that stays open `hold` s after
            # the last line, so its plateau is sampled too.  (wait4's
            # ru_maxrss cannot be used: on Linux it counts the forked copy of
            # this script before the exec.)
            rm(fifo)
            os.mkfifo(fifo)
            feeder = threading.Thread(target=_feed_fifo, args=(fifo, path, hold))
            feeder.daemon = True
            feeder.start()
            res = run_measured(argv, stderr=ctx.path('keys-sec.stderr'), cwd=ctx.rundir,
                               interval=args.sample_interval, timeout=timeout * 10, stdin=fifo)
            feeder.join()
            rm(fifo)
            if res['rc'] != 0:
                raise BenchError('`%s` exited %d\n%s' % (' '.join(argv), res['rc'],
                                                         tail(ctx.path('keys-sec.stderr'))))
            out['sec'][case] = {'hwm_kb': res['rss_own_kb'], 'wall': res['wall'] - hold}
            log('  %.2f s, RSS peak %.1f MB', res['wall'], out['sec'][case]['hwm_kb'] / 1024.0)
        rm(path)
    for tool in ('looper', 'sec'):
        r = out[tool]
        for case in ('suppress', 'threshold'):
            if case in r and 'base' in r:
                r[case]['growth_mb'] = (r[case]['hwm_kb'] - r['base']['hwm_kb']) / 1024.0
                r[case]['bytes_per_key'] = (r[case]['hwm_kb'] - r['base']['hwm_kb']) * 1024.0 / n
    results['correlation'] = out


##############################################################################
# Report
##############################################################################

def cpus_allowed():
    """The CPUs this process (and so every tool it starts) may run on."""
    if hasattr(os, 'sched_getaffinity'):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def loadavg():
    try:
        with open('/proc/loadavg') as f:
            return ' '.join(f.read().split()[:3])
    except OSError:
        return '?'


def machine_info(ctx, tools):
    cpu = '?'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = {'cpu': cpu, 'nproc': os.cpu_count(), 'cpus_allowed': cpus_allowed(),
            'kernel': platform.system() + ' ' + platform.release(),
            'python': python_version(ctx.python), 'python_path': ctx.python,
            'date': time.strftime('%Y-%m-%d %H:%M'), 'loadavg_start': loadavg(),
            'logfile_out_confirm': declared_confirm(ctx)}
    for t in tools:
        info[t.name] = t.version if not t.skip else '%s not run' % t.label
    return info


def fmt_ratio(x):
    return '%.2fx' % x


def fmt_ratios(r):
    """**median** (each round)"""
    if not r:
        return 'n/a'
    return '**%s** (%s)' % (fmt_ratio(r['median']), ', '.join(fmt_ratio(x) for x in r['per_round']))


VARIANTS = (('looper', 'rules without watchfor (as shipped: all tokens)'),
            ('lean', 'rules without watchfor, `tokens = date node desc`'),
            ('watchfor', 'the same rules with `watchfor`'))


def _tool_rows(p, summary, order, last=None):
    """Rows of the per-tool table; last(name) gives the last column."""
    for name in order:
        s = summary.get(name)
        if not s:
            continue
        p.append('| %s | %.3f s | %s | %.2f s | %.1f MB | %.1f MB | %s |%s' % (
            s['label'], s['wall_median'], '{:,.0f}'.format(s['lines_per_s']),
            s['cpu_median'], s['rss_own_mb'], s['rss_tree_mb'],
            '/'.join(map(str, s['matches'])) or '-',
            ' %s |' % last(name) if last else ''))


def _cpu_lines(p, summary, names):
    for name in names:
        s = summary.get(name)
        if s and s['cpu_by_process']:
            p.append('- %s: %s.' % (s['label'], ', '.join(
                '%s %.2f s' % kv for kv in sorted(s['cpu_by_process'].items(),
                                                  key=lambda kv: -kv[1]))))


def _notes(p, section):
    notes = ['- skipped %s: %s' % (name, why) for name, why in sorted(section['skipped'].items())]
    notes += ['- **FAILED %s**: %s' % (name, why.replace('\n', '\n  '))
              for name, why in sorted(section['failed'].items())]
    if notes:
        p.append('')
        p.extend(notes)
    if section['mismatches']:
        p.append('')
        p.append('**MATCH COUNT MISMATCH**: ' + '; '.join(section['mismatches']))


def report(ctx, tools, results):
    p = []
    m = results['machine']
    p.append('## Looper benchmark (%s)' % m['date'])
    p.append('')
    allowed = m['cpus_allowed']
    p.append('Machine: %s, %s CPUs%s, %s; load average %s at the start, %s at the end. '
             'Python %s (`%s`); %s; %s; %s; logfile_out declares confirm = %s.' % (
                 m['cpu'], m['nproc'],
                 ' (this run pinned to CPU %s)' % ','.join(map(str, allowed))
                 if len(allowed) < (m['nproc'] or 1) else '',
                 m['kernel'], m['loadavg_start'], m.get('loadavg_end', '?'),
                 m['python'], m['python_path'],
                 m.get('sec', 'sec not run'), m.get('swatch', 'swatch not run'),
                 m.get('looper', '?') if m.get('looper', '').lower().startswith('looper')
                 else 'Looper ' + m.get('looper', '?'), m['logfile_out_confirm']))
    meta = ctx.meta
    p.append('Input: %s lines (%.1f MB), seed %d, %d matches (%.1f%%) of `%s`.' % (
        '{:,}'.format(meta['lines']), meta['bytes'] / 1e6, meta['seed'], meta['matches'],
        100.0 * meta['matches'] / max(1, meta['lines']), REGEX))
    p.append('Command: `%s`.' % ' '.join(ctx.argv))
    if ctx.args.smoke:
        p.append('')
        p.append('**Smoke run**: the input is tiny, so times are start-up dominated and the '
                 'targets below say nothing about performance.')
    header = ('| tool | median wall | lines/s | CPU (user+sys) | peak RSS proc | '
              'peak RSS tree | lines out |')
    rule = '|---|---:|---:|---:|---:|---:|---:|'
    tp = results.get('throughput')
    if tp:
        p.append('')
        p.append('### Throughput (%d round%s, tools alternated)' % (
            tp['rounds'], '' if tp['rounds'] == 1 else 's'))
        p.append('')
        p.append(header.replace('lines out', 'matches'))
        p.append(rule)
        _tool_rows(p, tp['tools'], [t.name for t in tools])
        p.append('')
        p.append('Looper wall / peer wall in the same round: **median of the rounds** '
                 '(each round).')
        p.append('')
        p.append('| Looper | / SEC | / swatch | / bare Python loop |')
        p.append('|---|---:|---:|---:|')
        for name, what in VARIANTS:
            r = tp['ratios'].get(name)
            if r is None:
                continue
            lim = TARGETS[name]
            p.append('| %s (target %s) | %s | %s | %s |' % (
                what, ', '.join('%s <= %gx' % (peer, lim[peer]) for peer in PEERS if peer in lim),
                fmt_ratios(r.get('sec')), fmt_ratios(r.get('swatch')), fmt_ratios(r.get('bare'))))
        p.append('')
        p.append('Wall = fork to reap; CPU = user+sys of the tool and its reaped children '
                 '(os.wait4); RSS proc = peak (VmHWM) of the main process (Looper: looper.py '
                 'alone); RSS tree = peak sum of VmRSS over the process and its descendants '
                 '(Looper + syslog_in + logfile_out), sampled every %g s. CPU by process '
                 '(median, from /proc at the last sample):' % ctx.args.sample_interval)
        p.append('')
        _cpu_lines(p, tp['tools'], [n for n, _ in VARIANTS])
        _notes(p, tp)
    nr = results.get('norules')
    if nr:
        p.append('')
        p.append('### NORULES: syslog_in -> logfile_out, every event unchanged (%d round%s, '
                 'alternated)' % (nr['rounds'], '' if nr['rounds'] == 1 else 's'))
        p.append('')
        p.append(header + ' / syslog_in alone |')
        p.append(rule + '---:|')
        _tool_rows(p, nr['tools'], nr['order'],
                   lambda name: fmt_ratios(nr['ratios'].get(name, {}).get('syslog_in'))
                   if name in nr['ratios'] else '-')
        p.append('')
        p.append('syslog_in alone: `printf \'logfile=FILE\\n\' | PYTHON modules/syslog_in > '
                 '/dev/null`. Lines out: lines in logfile_out\'s file (must be %s). CPU by process:'
                 % '{:,}'.format(nr['lines']))
        p.append('')
        _cpu_lines(p, nr['tools'], ('norules', 'norules-alt'))
        _notes(p, nr)
    su = results.get('startup')
    if su:
        p.append('')
        p.append('### Start-up (median of %d, the four commands alternated)' % su['reps'])
        p.append('')
        p.append('| command | median | ratio |')
        p.append('|---|---:|---:|')
        p.append('| `python -c pass` | %.1f ms | |' % su['python_c_pass_ms'])
        p.append('| `python looper.py --version` | %.1f ms | %s `-c pass` (%+.1f ms) |' % (
            su['looper_version_ms'], fmt_ratio(su['ratio']),
            su['looper_version_ms'] - su['python_c_pass_ms']))
        p.append('| `cat sample.log > FILE` (%d lines) | %.1f ms | |' % (su['sample_lines'],
                                                                      su['cat_ms']))
        p.append('| `python looper.py basic.conf`: syslog_in -> logfile_out (confirm = %s), '
                 'NORULES, the same %d lines | %.1f ms | %s `cat`, %s `-c pass` |' % (
                     su['confirm'], su['sample_lines'], su['batch_ms'],
                     fmt_ratio(su['batch_ratio_cat']), fmt_ratio(su['batch_ratio_pass'])))
    la = results.get('latency')
    if la:
        p.append('')
        p.append('### Latency (one event every %g ms, %d events; input module -> rules -> '
                 'output module)' % (la['interval_s'] * 1000, la['events']))
        p.append('')
        p.append('| condition | p50 | p99 | max |')
        p.append('|---|---:|---:|---:|')
        for name, c in la['conditions'].items():
            busy = 'CPU load (%d busy processes)' % len(cpus_allowed())
            what = {'idle': 'Looper, idle', 'cpu': 'Looper, ' + busy,
                    'stream': 'Looper, a second Looper streaming the throughput job',
                    'direct-idle': 'control: no Looper (input piped into output), idle',
                    'direct-cpu': 'control: no Looper, ' + busy}.get(name, name)
            p.append('| %s | %.3f ms | %.3f ms | %.3f ms |' % (
                what, c['p50_ms'], c['p99_ms'], c['max_ms']))
        p.append('')
        p.append('Measured by bench-written modules: the input stamps t=time.monotonic() as it '
                 'writes the event, the output takes time.monotonic() - t when it reads `go`. '
                 'The control rows pipe the same input module straight into the same output '
                 'module: what the machine costs without Looper (one hop instead of two).')
    me = results.get('memory')
    if me:
        p.append('')
        p.append('### Memory (Looper process alone, VmRSS sampled every %g s)' %
                 ctx.args.sample_interval)
        p.append('')
        p.append('| run | peak | at 25% | at 50% | at 75% | at end | flat (peak growth in 2nd half) |')
        p.append('|---|---:|---:|---:|---:|---:|---|')
        for name, what in (('run', 'throughput job, %s lines' % '{:,}'.format(meta['lines'])),
                           ('stalled', 'NORULES; an output that never reads (queuesize 1000, '
                                       'drop) beside logfile_out (queuesize 1000)'),
                           ('restarting', 'NORULES; an output that dies at once, restartdelay '
                                          '60 s (queuesize 1000, drop) beside logfile_out with '
                                          'confirm = yes (queuesize 1000)')):
            r = me.get(name)
            if r is None:
                continue
            if 'rss25_mb' in r:
                p.append('| %s | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %s (%+.1f MB) |' % (
                    what, r['hwm_mb'], r['rss25_mb'], r['rss50_mb'], r['rss75_mb'],
                    r['rss100_mb'], 'yes' if r['flat'] else 'NO', r['growth_2nd_half_mb']))
            else:
                p.append('| %s | %.1f MB | - | - | - | - | too short to tell |' % (
                    what, r.get('hwm_mb', 0)))
        for name in ('stalled', 'restarting'):
            st = me.get(name)
            if not st:
                continue
            p.append('')
            p.append('%s run: exit status %d in %.2f s (1 is expected: events for the %s output '
                     'were dropped); logfile_out wrote %d of %d events; Looper counted %s dropped '
                     'and %s restarts for the %s output.' % (
                         name.capitalize(), st['rc'], st['wall'], name, st['fast_delivered'],
                         st['events'], '?' if st['dropped'] is None else st['dropped'],
                         '?' if st['restarts'] is None else st['restarts'], name))
    co = results.get('correlation')
    if co:
        p.append('')
        p.append('### Correlation state per key (%s distinct keys, all within the window)'
                 % '{:,}'.format(co['keys']))
        p.append('')
        p.append('| case | Looper peak RSS | Looper growth | **Looper bytes/key** | SEC peak RSS | '
                 'SEC growth | **SEC bytes/op** | Looper / SEC |')
        p.append('|---|---:|---:|---:|---:|---:|---:|---:|')
        lo, se = co['looper'], co['sec']
        for case, what in (('base', 'baseline: the key read, no helper / SEC `Single`, no action'),
                           ('suppress', '`suppress(key, 3600)` / SEC `SingleWithSuppress`, '
                                        'window=3600'),
                           ('threshold', '`threshold(key, 5, 3600)` / SEC `SingleWithThreshold`, '
                                         'thresh=5 window=3600')):
            a, b = lo.get(case), se.get(case)
            if a is None:
                continue

            def cells(r):
                if r is None:
                    return ['n/a'] * 3
                if 'bytes_per_key' not in r:
                    return ['%.1f MB (%.1f s)' % (r['hwm_kb'] / 1024.0, r['wall']), '', '']
                return ['%.1f MB (%.1f s)' % (r['hwm_kb'] / 1024.0, r['wall']),
                        '%+.1f MB' % r['growth_mb'], '**%.0f**' % r['bytes_per_key']]
            ratio = ''
            if b and 'bytes_per_key' in a and 'bytes_per_key' in b and b['bytes_per_key'] > 0:
                ratio = fmt_ratio(a['bytes_per_key'] / b['bytes_per_key'])
            p.append('| %s | %s | %s |' % (what, ' | '.join(cells(a) + cells(b)), ratio))
        p.append('')
        p.append('Growth = peak RSS of the run minus the baseline run\'s (same events, no helper '
                 'call); per key = growth / keys. Looper: looper.py\'s own VmHWM, events from a '
                 'bench-written input module that holds its pipe open %g s at the end, so the '
                 'plateau is sampled; SEC: its VmHWM, reading the same descs as syslog lines '
                 'from a pipe held open the same way (`--input=- --notail`). Times are wall '
                 'minus that hold. The key is the event\'s desc, %d bytes: `%s`.' % (
                     co['hold'], len(key_desc(0)), key_desc(0)))
    tg = results.get('targets')
    if tg:
        p.append('')
        p.append('### Targets')
        p.append('')
        p.append('| target | measured | result |')
        p.append('|---|---:|---|')
        for t in tg:
            p.append('| %s | %s | %s |' % (t['target'], t['measured'], t['result']))
    return '\n'.join(p) + '\n'


def targets(ctx, results):
    out = []

    def add(target, measured, ok, perf=True):
        result = 'reported (no target)' if ok is None else 'PASS' if ok else 'FAIL'
        if perf and ok is not None and ctx.args.smoke:
            result = '(%s: smoke run, not meaningful)' % result
        out.append({'target': target, 'measured': measured, 'result': result})

    names = {'sec': 'SEC', 'swatch': 'swatch', 'bare': 'the bare Python loop'}
    tp = results.get('throughput')
    if tp:
        for variant, what in VARIANTS:
            r = tp['ratios'].get(variant)
            if r is None:
                continue
            for peer in PEERS:
                limit = TARGETS[variant].get(peer)
                if limit is None:
                    continue
                target = 'Looper, %s: <= %gx %s' % (what, limit, names[peer])
                if peer in r:
                    add(target, fmt_ratio(r[peer]['median']), r[peer]['median'] <= limit)
                else:
                    add(target, 'not run', None)
        add('identical match counts and hashes', 'expected %d' % tp['expected_matches'],
            not tp['mismatches'] and 'looper' in tp['tools'], perf=False)
    nr = results.get('norules')
    if nr:
        for name in ('norules', 'norules-alt'):
            r = nr['ratios'].get(name, {}).get('syslog_in')
            s = nr['tools'].get(name)
            if s is None:
                continue
            target = '%s <= %gx syslog_in alone' % (s['label'], TARGETS['norules'])
            if r:
                add(target, fmt_ratio(r['median']), r['median'] <= TARGETS['norules'])
            else:
                add(target, 'not run', None)
        add('NORULES: logfile_out wrote every line', '%s lines' % '{:,}'.format(nr['lines']),
            not nr['mismatches'] and not nr['failed'] and 'norules' in nr['tools'], perf=False)
    la = results.get('latency')
    if la and 'idle' in la['conditions']:
        p99 = la['conditions']['idle']['p99_ms']
        add('latency p99 < %g ms idle' % TARGETS['latency_p99_ms'], '%.3f ms' % p99,
            p99 < TARGETS['latency_p99_ms'])
    me = results.get('memory')
    if me:
        r = me['run']
        add('Looper RSS < %g MB (throughput job)' % TARGETS['rss_mb'], '%.1f MB' % r['hwm_mb'],
            r['hwm_mb'] < TARGETS['rss_mb'])
        if 'flat' in r:
            add('Looper RSS flat over the run', '%+.1f MB peak growth in 2nd half'
                % r['growth_2nd_half_mb'], r['flat'])
        for name, what in (('stalled', 'a stalled output'),
                           ('restarting', 'a confirmed output beside one restarting after 60 s')):
            st = me.get(name)
            if not st:
                continue
            add('Looper RSS < %g MB with %s' % (TARGETS['rss_mb'], what),
                '%.1f MB (%+.1f MB over the throughput run)' % (st['hwm_mb'],
                                                                st['hwm_mb'] - r['hwm_mb']),
                st['hwm_mb'] < TARGETS['rss_mb'])
            if 'flat' in st:
                add('Looper RSS flat with %s' % what, '%+.1f MB peak growth in 2nd half'
                    % st['growth_2nd_half_mb'], st['flat'])
            else:
                add('Looper RSS flat with %s' % what, 'too short to tell', None)
            add('logfile_out unaffected by %s' % what, '%d/%d delivered' % (
                st['fast_delivered'], st['events']), st['fast_delivered'] == st['events'],
                perf=False)
    su = results.get('startup')
    if su:
        add('start-up: `--version` <= %gx `python -c pass`' % TARGETS['startup'],
            fmt_ratio(su['ratio']), su['ratio'] <= TARGETS['startup'])
        add('start-up: a whole %d-line batch run (basic.conf) against `cat`' % su['sample_lines'],
            '%.1f ms, %s `cat`, %s `-c pass`' % (su['batch_ms'], fmt_ratio(su['batch_ratio_cat']),
                                                 fmt_ratio(su['batch_ratio_pass'])), None)
    co = results.get('correlation')
    if co:
        for case in ('suppress', 'threshold'):
            a, b = co['looper'].get(case, {}), co['sec'].get(case, {})
            if 'bytes_per_key' in a:
                add('memory per key, %s (issue 14: documented, beside SEC)' % case,
                    '%.0f B/key (SEC: %s)' % (a['bytes_per_key'], '%.0f B/op' % b['bytes_per_key']
                                             if 'bytes_per_key' in b else 'not run'), None)
    return out


##############################################################################
# Main
##############################################################################

SECTIONS = ('throughput', 'norules', 'startup', 'latency', 'memory', 'correlation')


def parse_cpus(text):
    """'0', '0,1', '0-3' -> a set of CPU numbers."""
    cpus = set()
    for part in text.split(','):
        part = part.strip()
        if '-' in part:
            lo, hi = part.split('-', 1)
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    if not cpus:
        raise ValueError('no CPU named')
    return cpus


def parse_args(argv):
    ap = argparse.ArgumentParser(description='Benchmark Looper against SEC, swatch and a '
                                 'bare Python loop (see the docstring at the top of this file, '
                                 'and bench/README.md).')
    ap.add_argument('--lines', type=int, help='syslog lines (default 1000000; 2000 with --smoke)')
    ap.add_argument('--seed', type=int, default=1, help='generator seed (default 1)')
    ap.add_argument('--rounds', type=int, default=3,
                    help='rounds of the throughput and NORULES sections (default 3)')
    ap.add_argument('--python', default=os.environ.get('LOOPER_PYTHON') or sys.executable,
                    help='interpreter for Looper, its modules and the bare loop (default '
                    '$LOOPER_PYTHON or this one: %(default)s)')
    ap.add_argument('--looper', default=os.path.join(ROOT, 'looper.py'),
                    help='looper.py to measure (its modules/ beside it)')
    ap.add_argument('--tools', default='looper,lean,watchfor,sec,swatch,bare',
                    help='throughput: comma-separated subset of looper,lean,watchfor,sec,swatch,bare')
    ap.add_argument('--cpus', metavar='LIST',
                    help="run everything on these CPUs only, as `taskset -c LIST` would: "
                    "'0' for one CPU (small hosts have one)")
    ap.add_argument('--workdir', default=os.path.join(HERE, 'work'),
                    help='cache and scratch directory (default bench/work)')
    for name, what in (('throughput', 'the job against SEC, swatch and the bare loop'),
                       ('norules', 'NORULES syslog_in -> logfile_out against syslog_in alone'),
                       ('startup', '--version against -c pass, a short batch run against cat'),
                       ('latency', 'one event at a time'),
                       ('memory', "Looper's RSS over the run, with a stalled and with a "
                                  "restarting output"),
                       ('correlation', 'memory per key of suppress and threshold, beside SEC')):
        ap.add_argument('--' + name, action='store_true', help='run the %s section: %s'
                        % (name, what))
    ap.add_argument('--keys', type=int,
                    help='distinct keys of the correlation section (default 1000000; 2000 with '
                    '--smoke)')
    ap.add_argument('--startup-reps', type=int, default=40)
    ap.add_argument('--latency-events', type=int, default=1000)
    ap.add_argument('--latency-warmup', type=int, default=50)
    ap.add_argument('--latency-interval', type=float, default=0.005, help='seconds (default 0.005)')
    ap.add_argument('--sample-interval', type=float, default=0.05,
                    help='RSS sampling period, seconds (default 0.05)')
    ap.add_argument('--smoke', action='store_true',
                    help='tiny and fast: 2000 lines and keys, 1 round, few repetitions, every '
                    'section')
    ap.add_argument('--strict', action='store_true', help='exit 1 when a target is missed')
    ap.add_argument('--json', metavar='FILE', help='write raw results as JSON to FILE')
    ap.add_argument('--keep', action='store_true', help='keep the scratch directory')
    args = ap.parse_args(argv)
    if args.smoke:
        args.lines = args.lines or 2000
        args.keys = args.keys or 2000
        args.rounds = 1
        args.startup_reps = 4            # one full rotation of the four commands
        args.latency_events = 100
        args.latency_warmup = 10
        args.latency_interval = 0.002
        args.sample_interval = 0.01
    args.lines = args.lines or 1000000
    args.keys = args.keys or 1000000
    if not any(getattr(args, name) for name in SECTIONS):
        for name in SECTIONS:
            setattr(args, name, True)
    if args.lines < 1 or args.rounds < 1 or args.keys < 1:
        ap.error('--lines, --rounds and --keys must be positive')
    args.tools = [t.strip() for t in args.tools.split(',') if t.strip()]
    for t in args.tools:
        if t not in ('looper', 'lean', 'watchfor', 'sec', 'swatch', 'bare'):
            ap.error('unknown tool %r' % t)
    if args.cpus is not None:
        if not hasattr(os, 'sched_setaffinity'):
            ap.error('--cpus needs sched_setaffinity (Linux); use taskset or cpuset instead')
        try:
            args.cpus = parse_cpus(args.cpus)
        except ValueError as e:
            ap.error('--cpus %s: %s' % (args.cpus, e))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.cpus is not None:
        # Inherited by every process started from here on.
        os.sched_setaffinity(0, args.cpus)
    if not sys.platform.startswith('linux'):
        log('note: RSS figures need /proc (Linux); they will be missing here')
    os.makedirs(args.workdir, exist_ok=True)
    ctx = Ctx(args)
    ctx.argv = ['bench/bench.py'] + list(argv)
    results = {'args': {k: (sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(args).items()}}
    problems = []
    try:
        ctx.input, ctx.meta = syslog_file(args.workdir, args.lines, args.seed)
        results['input'] = dict(ctx.meta, path=ctx.input)
        classes = {'looper': Looper, 'lean': LooperLean, 'watchfor': LooperWatchfor, 'sec': Sec,
                   'swatch': Swatch, 'bare': Bare}
        order = ('looper', 'lean', 'watchfor', 'sec', 'swatch', 'bare')
        # Looper and SEC are always prepared: the other sections use them.
        tools = [classes[n]() for n in order if n in args.tools or n in ('looper', 'sec')]
        for t in tools:
            t.prepare(ctx)
            if t.name not in args.tools:
                t.skip = t.skip or 'not selected (--tools)'
            if t.skip:
                log('skipping %s: %s', t.label, t.skip)
        looper = [t for t in tools if t.name == 'looper'][0]
        looper_ok = not looper_missing(ctx) and not (looper.skip and
                                                     looper.skip.startswith('FAILED'))
        if not looper_ok:
            problems.append('Looper could not run: ' + (looper.skip or looper_missing(ctx)))
        results['machine'] = machine_info(ctx, tools)
        sections = []
        if args.throughput:
            sections.append(('throughput', lambda: section_throughput(ctx, tools, results)))
        if looper_ok and args.norules:
            sections.append(('norules', lambda: section_norules(ctx, results)))
        if looper_ok and args.startup:
            sections.append(('startup', lambda: section_startup(ctx, results)))
        if looper_ok and args.latency:
            sections.append(('latency', lambda: section_latency(ctx, tools, results)))
        if looper_ok and args.memory:
            sections.append(('memory', lambda: section_memory(ctx, tools, results)))
        if looper_ok and args.correlation:
            sections.append(('correlation', lambda: section_correlation(ctx, tools, results)))
        for name, fn in sections:
            try:
                fn()
            except BenchError as e:
                log('%s section failed: %s', name, e)
                problems.append('%s: %s' % (name, e))
                results.setdefault('errors', {})[name] = str(e)
        for name in ('throughput', 'norules'):
            sec = results.get(name)
            if sec:
                problems.extend(sec['mismatches'])
                problems.extend('%s: %s' % (n, e) for n, e in sec['failed'].items())
        results['machine']['loadavg_end'] = loadavg()
        results['targets'] = targets(ctx, results)
        sys.stdout.write(report(ctx, tools, results))
        if problems:
            sys.stdout.write('\n### Problems\n\n' + ''.join(
                '- %s\n' % p.replace('\n', '\n  ') for p in problems))
        sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(ctx.rundir, ignore_errors=True)
        else:
            log('scratch files kept in %s', ctx.rundir)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1, sort_keys=True, default=str)
    if problems:
        return 1
    if args.strict and any(t['result'] == 'FAIL' for t in results['targets']):
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
