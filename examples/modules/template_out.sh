#!/bin/sh
# /// looper
# kind = 'output'
# keys = 'filename prefix'
# confirm = 'yes'
# confirmwindow = '1'
# ///
#
# template_out.sh: the skeleton of a Looper output module in POSIX sh, to
# copy.  The same module as template_out (Python): it appends each event to
# `filename` as one line, `prefix` then the token=value pairs.
#
# Looper starts the module with no arguments and writes on its stdin the
# configuration, one `key=value` line per key of the output block (plus
# `confirm=yes|no`, since the declaration above has `confirm`), then
# `configure`; then each event as `token=value` lines ended by `go`; at the
# end `quit` (or it closes stdin).  With confirm=yes the module answers
# `configure` with `ok` once it is ready, and every `go`, in order, with
# `ok` (delivered), `error TEXT` (not now: Looper sends it again later) or
# `reject TEXT` (never: Looper logs it and moves on).  This one answers
# each event before it reads the next (confirmwindow = 1 above).
#
# Flushing: in sh each printf or echo to a pipe is written at once, so an
# answer reaches Looper as soon as it is printed.  (A module that runs awk,
# sed or another program to write its answers must make that program flush:
# awk's fflush(), sed -u, stdbuf -oL.)
#
# Run it by hand the same way:
#
#     printf 'filename=/dev/stdout\nconfigure\nnode=gw1\ndesc=hello\ngo\nquit\n' | sh template_out.sh
#
# Configuration keys:
#
#   filename   the file to append to (required)
#   prefix     text written before each event (default: none)
#   confirm    yes (default) or no
#
# Exit status: 0 after `quit` or at the end of stdin, 78 when the
# configuration is wrong (a message on stderr; Looper does not restart it),
# 1 for any other failure.  Messages on stderr start with <N>, the level
# (3 error, 4 warning, 5 notice, 6 info, 7 debug), as in sd-daemon(3).
#
# The file is opened for each event (>>), so a rotated file is followed at
# once.  Values arrive as Looper sends them: a newline in a value is the two
# characters \n; `read -r` keeps backslashes as they are.

say() {     # say LEVEL TEXT: one line for Looper's log
    printf '<%s>template_out.sh: %s\n' "$1" "$2" >&2
}

answer() {  # answer TEXT: one line on stdout, written at once
    printf '%s\n' "$1"
}

case $# in
0) ;;
*)  case $1 in
    -h|--help) sed -n '/^# template_out.sh/,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    esac
    say 3 'takes no arguments (its configuration comes on stdin); try --help'
    exit 78 ;;
esac

# The configuration: key=value lines up to `configure`.
filename='' prefix='' confirm=yes configured=no
while IFS= read -r line; do
    case $line in
    configure) configured=yes; break ;;
    filename=*) filename=${line#*=} ;;
    prefix=*) prefix=${line#*=} ;;
    confirm=*) confirm=${line#*=} ;;
    esac
done
[ "$configured" = yes ] || exit 0     # stdin ended before `configure`: nothing to do
if [ -z "$filename" ]; then
    say 3 'no filename configured: set  filename = PATH'
    exit 78
fi
case $confirm in
yes|true|on|1) confirm=yes ;;
no|false|off|0) confirm=no ;;
*) say 3 "confirm must be yes or no, not '$confirm'"; exit 78 ;;
esac
if ! true 2>/dev/null >> "$filename"; then
    say 3 "cannot open '$filename'"
    exit 78
fi
[ "$confirm" = yes ] && answer ok    # ready

# The events: token=value lines, then `go`.
event=''
while IFS= read -r line; do
    case $line in
    go)
        if printf '%s%s\n' "$prefix" "$event" 2>/dev/null >> "$filename"; then
            [ "$confirm" = yes ] && answer ok
        elif [ "$confirm" = yes ]; then
            answer "error cannot write to $filename"
        else
            say 4 "cannot write to $filename; an event was lost"
        fi
        event='' ;;
    quit) exit 0 ;;
    *=*) event=${event:+$event }$line ;;
    esac
done
exit 0
