#!/bin/sh
# /// looper
# kind = 'input'
# keys = 'filename statefile'
# ack = 'no'
# ///
#
# template_in.sh: the skeleton of a Looper input module in POSIX sh, to
# copy.  The same module as template_in (Python): it sends one event per
# line of `filename` (tokens `number` and `line`) and exits 0 at its end.
#
# Looper starts the module with no arguments and writes on its stdin the
# configuration, one `key=value` line per key of the input block, then
# closes stdin.  The module writes events on stdout: `token=value` lines,
# then `go`.  In sh each printf or echo to a pipe is written at once, so
# every event reaches Looper as soon as its `go` is printed.  (A module that
# runs awk, sed or another program to write events must make that program
# flush: awk's fflush(), sed -u, stdbuf -oL.)  Exit 0 means "the input is
# finished" (Looper drains its outputs and exits); 78 means "my
# configuration is wrong"; any other exit is restarted after a delay.
#
# With `ack = 'yes'` in the block (the declaration above has `ack`, so
# Looper sends `ack=yes|no`), Looper ends the configuration with `configure`
# instead of closing stdin, and later writes one `ok` line on stdin per
# event, in order, once the event is settled.  This module then records in
# `statefile` how many lines were acknowledged, and starts there next time:
# a SIGKILL of Looper itself loses no line.
#
# Run it by hand the same way:
#
#     printf 'filename=/etc/hostname\n' | sh template_in.sh
#
# Configuration keys:
#
#   filename   the file to read (required)
#   statefile  with ack: where the count of acknowledged lines is kept
#
# Exit status: 0 at the end of the file (and, with ack, once every event is
# acknowledged or Looper has gone), 78 when the configuration is wrong, 1
# for other failures.  Messages on stderr start with <N>, the level (3
# error, 4 warning, 5 notice, 6 info, 7 debug), as in sd-daemon(3).
#
# Values must not hold a raw line break: `read` splits the file at
# newlines, and a line that ends in CR (a CRLF file) loses that CR in
# Looper, which drops a trailing CR from every line it reads.

say() {     # say LEVEL TEXT: one line for Looper's log
    printf '<%s>template_in.sh: %s\n' "$1" "$2" >&2
}

case $# in
0) ;;
*)  case $1 in
    -h|--help) sed -n '/^# template_in.sh/,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    esac
    say 3 'takes no arguments (its configuration comes on stdin); try --help'
    exit 78 ;;
esac

# The configuration: key=value lines up to the end of stdin, or up to
# `configure` with ack.
filename='' statefile='' ack=no
while IFS= read -r line; do
    case $line in
    configure) break ;;
    filename=*) filename=${line#*=} ;;
    statefile=*) statefile=${line#*=} ;;
    ack=*) ack=${line#*=} ;;
    esac
done
if [ -z "$filename" ]; then
    say 3 'no filename configured: set  filename = PATH'
    exit 78
fi
case $ack in
yes|true|on|1) ack=yes ;;
no|false|off|0) ack=no ;;
*) say 3 "ack must be yes or no, not '$ack'"; exit 78 ;;
esac
if [ "$ack" = yes ] && [ -z "$statefile" ]; then
    say 3 'ack = yes needs a statefile to record what was acknowledged'
    exit 78
fi
if [ ! -r "$filename" ]; then
    say 3 "cannot open '$filename'"
    exit 78
fi

done=0
if [ "$ack" = yes ] && [ -s "$statefile" ]; then
    read -r done < "$statefile"
    case $done in ''|*[!0-9]*) done=0 ;; esac
fi

# The events: one per line, from the first line not yet acknowledged.
# (The last line of the file counts even without its newline.)
number=0
while IFS= read -r line || [ -n "$line" ]; do
    if [ "$number" -ge "$done" ]; then
        printf 'number=%d\nline=%s\ngo\n' "$number" "$line"
    fi
    number=$((number + 1))
done < "$filename"

if [ "$ack" = yes ]; then
    # One `ok` per event sent, in order; the end of stdin means Looper is gone.
    acked=$done
    while [ "$acked" -lt "$number" ] && IFS= read -r reply; do
        [ "$reply" = ok ] || continue
        acked=$((acked + 1))
        printf '%d\n' "$acked" > "$statefile.tmp" && mv -f "$statefile.tmp" "$statefile"
    done
fi
exit 0
