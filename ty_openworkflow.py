#!/usr/bin/env python3
"""ty-openworkflow: durable workflows on ephemeral compute, a TaskYou sidecar.

One file, Python standard library only (>= 3.9). Quick start::

    python3 ty_openworkflow.py init
    python3 ty_openworkflow.py deploy my-workflow -f workflow.js
    python3 ty_openworkflow.py start my-workflow -i '{"name": "World"}'
    python3 ty_openworkflow.py status <run-id>
    python3 ty_openworkflow.py serve        # or `tick` from cron

The sidecar is the durable backend and the scheduler: it keeps workflows, runs
and step results in SQLite and advances each run in *passes*. A pass hands a
stateless runtime shim (a node/python process, a container, a Worker) the run's
input and step history; completed steps replay from the history, new steps run
and stream back as events, and a sleep that is not yet due ends the pass.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "Sidecar", "Config", "Store", "Scheduler", "Adapter", "ExecAdapter",
    "OpenWorkflowError", "ConfigError", "NotFound", "InputError", "AdapterError",
    "StoreError", "load_config", "parse_yaml", "parse_duration", "parse_event_line",
    "WebhookServer",
    "sign_callback", "verify_callback", "Bridge",
    "main",
]

import argparse
import collections
import contextlib
import heapq
import itertools
import json
import math
import os
import queue
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import weakref

# Imported where used, so the CLI's read-only commands start fast: ctypes, hashlib,
# hmac, http.client, http.server, logging, socket, tempfile, urllib.parse.

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

PROTOCOL_VERSION = 1
CONFIG_ENV = "TY_OPENWORKFLOW_CONFIG"
DATA_DIR_ENV = "TY_OPENWORKFLOW_DATA_DIR"
DB_FILE = "ty-openworkflow.db"
# PRAGMA application_id marks our databases, so a foreign SQLite file is refused.
DB_APPLICATION_ID = 0x74796F77  # "tyow"
SQLITE_BUSY_TIMEOUT_MS = 10000
# A scheduler's loop retries store errors with backoff up to this long between tries;
# `tick` (from cron, which runs it again) gives up after STORE_PATIENCE_S of them.
STORE_BACKOFF_MAX_S = 5.0
STORE_PATIENCE_S = 60.0
# Schedules: `catch_up: none` still runs a fire this late; `all` runs at most this many missed
# fires.
SCHEDULE_ON_TIME_MS = 60000
SCHEDULE_CATCH_UP_MAX = 1000
# `retention` prunes at most this often.
RETENTION_EVERY_MS = 3600 * 1000
# Earlier than any stored time: with it as prune's drop_before, every undelivered task update
# holds its run back.
_NEVER_BEFORE = -(1 << 62)
# prune --drop-undelivered: later than any stored time, so no undelivered update holds a run.
_ALWAYS_BEFORE = 1 << 62
# The same warning (`ty` not found, say) is logged at most this often across processes.
NOTICE_EVERY_MS = 24 * 3600 * 1000
# Idle SQLite connections a store keeps for reuse; more are closed when returned,
# so threads that come and go (passes, webhook requests) never pile up fds.
STORE_POOL_IDLE = 8
# store.synchronous: what a commit survives. full: a crash of the machine or a power
# cut (SQLite's WAL is synced at every commit); normal: a crash of the process only.
STORE_SYNC_MODES = ("full", "normal")
# A scheduler's own (quiet) commits are put on the disk together, this long after the first.
QUIET_SYNC_S = 0.05
# Step retry defaults follow OpenWorkflow: 10 attempts, 1 s, x2, capped at 100 s.
DEFAULT_RETRY = {"max_attempts": 10, "initial_ms": 1000, "backoff": 2.0, "max_ms": 100000}
# A pass that dies with no step in flight (shim crash, OOM) retries on this policy.
PASS_RETRY = {"max_attempts": 5, "initial_ms": 1000, "backoff": 2.0, "max_ms": 60000}
# A pass whose runtime its platform ended at the same point of the run this often fails the run
# (a Worker's CPU limit): the first end is given back uncounted (a runtime restart ends passes
# too), the others count as failed attempts.
PLATFORM_ENDS_MAX = 3
# Warm workers (adapters.exec.mode: warm): a worker is replaced after this many
# passes, exits after this long idle, and is killed if it does not answer a
# cancel this fast (a busy loop in user code).
WORKER_MAX_PASSES = 1000
PYTHON_WORKER_SLOTS = 4  # passes at once in one Python worker (more only contend for its GIL)
PASS_THREAD_IDLE_S = 30.0  # a scheduler's idle pass thread waits this long for the next pass
WORKER_IDLE_S = 60.0
WORKER_CANCEL_GRACE_S = 1.0
# Remaining sleeps up to this long are waited inside the pass instead of parking
# the run: a new pass would cost more than the wait itself.
INLINE_SLEEP_MS = 1000
MAX_STEP_NAME_LEN = 200
# TaskYou approvals: at most this many `ty show` calls per polling round, the waits looked at
# longest ago first, so every wait gets its turn however many there are.
APPROVAL_POLL_BATCH = 100
# The most open task waits a task event is matched against (steps.polled_at order).
APPROVAL_WATCH_MAX = 10000
# Child runs: how deep a tree of them may grow below its root, and how many one run may have
# unfinished at once (limits.max_child_depth, limits.max_children; Temporal's pending-children
# limit is 2,000). They stop runaway recursion; a cascade walks the tree in a loop, however big.
CHILD_DEPTH_DEFAULT = 100
CHILDREN_DEFAULT = 1000
MAX_DURATION_MS = 100 * 365 * 86400000  # a century: longer is a typo
MAX_EPOCH_MS = 1 << 53  # wake times beyond this are not times
MAX_PASS_LOG_BYTES = 256 * 1024
# Flow control: a run's concurrency key is at most this long, its priority an integer in
# [-PRIORITY_BOUND, PRIORITY_BOUND). A start counts against its rate window from its claim
# until a window after its first step began (so the gap holds where the steps run, however
# long a launch takes), and a twentieth of the window longer (at most RATE_SLACK_MAX_MS): the
# first step's own clock reads a moment before the sidecar hears of it.
MAX_CONCURRENCY_KEY_LEN = 200
PRIORITY_BOUND = 1 << 31
RATE_SLACK_MAX_MS = 1000
TERMINAL = ("completed", "failed", "canceled")
RUN_STATUSES = ("pending", "running", "sleeping", "waiting") + TERMINAL
WAIT_KINDS = ("signal", "child", "task")
WORKFLOW_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ADAPTER_NAMES = ("exec", "docker", "cloudflare")
RUNTIMES = {"node": {"shim": "node_shim.js", "ext": ".js"},
            "python": {"shim": "python_shim.py", "ext": ".py"}}
# Filled by `make dist` so the single-file build needs no runtimes/ folder.
_EMBEDDED_RUNTIMES = {}

class _Log:
    """The module's logger ("ty_openworkflow"), made when first used: importing logging is a good
    part of a quick command's start. Embedding apps configure it; serve and tick log to stderr."""

    _logger = None

    def __getattr__(self, name):
        if self._logger is None:
            import logging
            logger = logging.getLogger("ty_openworkflow")
            logger.addHandler(logging.NullHandler())
            self._logger = logger
        return getattr(self._logger, name)


log = _Log()


def _hostname():
    global _HOSTNAME
    if _HOSTNAME is None:
        import socket
        _HOSTNAME = socket.gethostname()
    return _HOSTNAME


_HOSTNAME = None

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class OpenWorkflowError(Exception):
    """Root of every error this module raises on purpose; str() says what to do."""

    exit_code = 1


class ConfigError(OpenWorkflowError):
    """The configuration file or a config value is wrong."""


class InputError(OpenWorkflowError):
    """A command got an argument or a file it cannot use."""

    exit_code = 2


class NotFound(OpenWorkflowError):
    """An unknown workflow or run id."""


class AdapterError(OpenWorkflowError):
    """A compute adapter cannot be used (missing binary, disabled, unreachable)."""


class StoreError(OpenWorkflowError):
    """The SQLite store cannot be opened or written; ``orig`` keeps the cause."""

    def __init__(self, message, orig=None):
        super().__init__(message)
        self.orig = orig


class Conflict(OpenWorkflowError):
    """The operation does not apply to the object's current state."""


class TaskYouError(OpenWorkflowError):
    """A `ty` call failed; the bridge retries it later."""


# ---------------------------------------------------------------------------
# Helpers: time, durations, JSON, ids
# ---------------------------------------------------------------------------


def now_ms():
    """Wall-clock time in integer milliseconds since the epoch."""
    return int(time.time() * 1000)


_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value, unit_ms=1000):
    """Parse ``30s``, ``5m``, ``1h30m``, ``500ms`` or a bare number (in ``unit_ms``) to ms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got %r" % value)
    if isinstance(value, (int, float)):
        if value < 0 or value != value:
            raise ValueError("a duration cannot be negative: %r" % value)
        if value * unit_ms > MAX_DURATION_MS:
            raise ValueError("duration %r is longer than a century" % value)
        return int(value * unit_ms)
    s = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return parse_duration(float(s), unit_ms)
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS_MS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(
            "invalid duration %r; use a number or a string like 500ms, 30s, 5m, 1h30m" % value)
    if total > MAX_DURATION_MS:
        raise ValueError("duration %r is longer than a century" % value)
    return int(total)


def format_duration(ms):
    """Render milliseconds as a short human duration (``4.2s``, ``3m05s``)."""
    ms = int(ms)
    if ms < 1000:
        return "%dms" % ms
    if ms < 60000:
        return "%.1fs" % (ms / 1000.0)
    s = ms // 1000
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, (s % 3600) // 60)
    return "%dd%02dh" % (s // 86400, (s % 86400) // 3600)


_RATE = re.compile(r"\s*(\d{1,9})\s*/\s*(\S+)\s*")


def parse_rate(value):
    """Parse a rate ``N/DURATION`` (``10/1m``, ``3/2s``, ``100/h``) to (N, window in ms)."""
    m = _RATE.fullmatch(str(value))
    window_ms = None
    if m:
        unit = m.group(2)  # a bare unit is one of it: 100/h
        with contextlib.suppress(ValueError):
            window_ms = parse_duration("1" + unit if unit in _DURATION_UNITS_MS else unit)
    if window_ms is None:
        raise ValueError("invalid rate %r; use N/DURATION, like 10/1m or 3/2s" % (value,))
    if int(m.group(1)) < 1 or window_ms < 1:
        raise ValueError("invalid rate %r; N and the DURATION must be at least 1 (1/1s, 10/1m)"
                         % (value,))
    return int(m.group(1)), window_ms


def format_rate(count, window_ms):
    """A rate as parse_rate reads it, in the largest whole unit: ``10/1m``, ``3/2s``."""
    for unit in ("d", "h", "m", "s"):
        if window_ms % _DURATION_UNITS_MS[unit] == 0:
            return "%d/%d%s" % (count, window_ms // _DURATION_UNITS_MS[unit], unit)
    return "%d/%dms" % (count, window_ms)


# Five-field cron: minute hour day-of-month month day-of-week (Vixie semantics).
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_CRON_NAMES = {
    3: {n: i + 1 for i, n in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    4: {n: i for i, n in enumerate("sun mon tue wed thu fri sat".split())}}
_CRON_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
                "@annually": "0 0 1 1 *"}
CRON_MACRO_NAMES = tuple(_CRON_MACROS)  # what `schedule add --cron` help and the README list


class Cron:
    """A parsed cron expression; ``next_after(ms, tz)`` is its next fire time (epoch ms)
    after ``ms``."""

    def __init__(self, expr):
        self.expr = expr
        text = _CRON_MACROS.get(str(expr).strip().lower(), str(expr).strip())
        parts = text.split()
        if len(parts) != 5:
            raise ValueError("a cron expression has five fields "
                             "(minute hour day-of-month month day-of-week) "
                             "or is one of %s; got %r" % (", ".join(sorted(_CRON_MACROS)), expr))
        self.sets = [self._field(i, part) for i, part in enumerate(parts)]
        self.sets[4] = {d % 7 for d in self.sets[4]}  # 7 is Sunday too
        # Vixie cron: with both day fields restricted, a day matching either one fires.
        self.dom_any, self.dow_any = parts[2].startswith("*"), parts[4].startswith("*")
        # Jobs with "*" in the minute or hour field also run in the hour a DST change repeats.
        self.every_hour = parts[0].startswith("*") or parts[1].startswith("*")

    @staticmethod
    def _field(i, part):
        name, low, high = _CRON_FIELDS[i]
        names = _CRON_NAMES.get(i, {})
        out = set()
        for item in part.lower().split(","):
            rng, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise ValueError("bad step %r in the %s field" % (step, name))

            def value(tok):
                if tok in names:
                    return names[tok]
                if not tok.isdigit():
                    raise ValueError("%r is not a number%s in the %s field" % (
                        tok, " or a name (%s)" % ", ".join(names) if names else "", name))
                v = int(tok)
                if not low <= v <= high:
                    raise ValueError(
                        "%d is out of range %d-%d in the %s field" % (v, low, high, name))
                return v
            if rng == "*":
                a, b = low, high
            elif "-" in rng:
                x, _, y = rng.partition("-")
                a, b = value(x), value(y)
                if a > b:
                    raise ValueError("range %s goes backwards in the %s field" % (rng, name))
            else:
                a = value(rng)
                b = high if step else a
            out.update(range(a, b + 1, int(step) if step else 1))
        if not out:
            raise ValueError("the %s field matches nothing" % name)
        return out

    def _day_matches(self, d):
        dom, dow = d.day in self.sets[2], (d.isoweekday() % 7) in self.sets[4]
        # A field written with "*" (its set full, or "*/n") must match as well; with both
        # day fields restricted, either one is enough (Vixie cron).
        return dom and dow if self.dom_any or self.dow_any else dom or dow

    def next_after(self, ms, tz=None):
        """The first fire time strictly after ``ms``, in ``tz`` (a zoneinfo name; local time
        if None)."""
        import datetime
        zone = _zone(tz)
        start = datetime.datetime.fromtimestamp(ms / 1000.0, zone).replace(
            second=0, microsecond=0, tzinfo=None)
        minutes, hours = sorted(self.sets[0]), sorted(self.sets[1])
        # The second copy of a repeated hour reads as up to an hour before ``start``.
        lookback = (datetime.timedelta(hours=1) if self.every_hour and zone is not None
                    else datetime.timedelta(0))
        day = (start - lookback).date()
        for _ in range(366 * 8):  # a Feb 29 on a Monday can take years to come
            if day.month in self.sets[3] and self._day_matches(day):
                # the earliest instant of the day after ms (a repeated hour comes twice)
                found = None
                for h in hours:
                    for m in minutes:
                        local = datetime.datetime(day.year, day.month, day.day, h, m)
                        if local < start - lookback:
                            continue
                        for fold in (0, 1) if self.every_hour else (0,):
                            at = _local_to_ms(local, zone, fold)
                            if at is not None and at > ms and (found is None or at < found):
                                found = at
                        if found is not None and not self.every_hour:
                            return found
                if found is not None:
                    return found
            day += datetime.timedelta(days=1)
        return None


def _missed_fires(cron, tz, first, now, catch_up):
    """The fire times from ``first`` to ``now`` that ``catch_up`` runs: the latest only, all (the
    oldest SCHEDULE_CATCH_UP_MAX), or none but one at most SCHEDULE_ON_TIME_MS late."""
    if catch_up == "all":
        fires, at = [], first
        while at is not None and at <= now and len(fires) < SCHEDULE_CATCH_UP_MAX:
            fires.append(at)
            at = cron.next_after(at, tz)
        return fires
    # The latest fire at or before now: look back a minute, then twice as far each time.
    back, latest = 60000, None
    while latest is None:
        frm = max(first - 1, now - back)
        at = cron.next_after(frm, tz)
        if at is not None and at <= now:
            latest = at
            while True:
                nxt = cron.next_after(latest, tz)
                if nxt is None or nxt > now:
                    break
                latest = nxt
        elif frm <= first - 1:
            return []  # nothing fell due after all
        back *= 2
    if catch_up == "none" and now - latest > SCHEDULE_ON_TIME_MS:
        return []
    return [latest]


def _zone(tz):
    if not tz:
        return None
    try:
        import zoneinfo
        return zoneinfo.ZoneInfo(tz)
    except Exception:
        raise ValueError("unknown time zone %r; use a name like Europe/Paris or UTC" % tz)


def _local_to_ms(local, zone, fold=0):
    """Epoch ms of a wall-clock time in ``zone`` (None: this machine's); None if the clock skips it
    (DST). ``fold=1``: the second of a time the clock repeats (else the same as fold 0)."""
    if zone is None:
        if fold:
            return None  # mktime cannot name the second of a repeated hour: give --tz for that
        at = time.mktime(local.timetuple())
        back = time.localtime(at)
        if (back.tm_hour, back.tm_min) != (local.hour, local.minute):
            return None
        return int(at * 1000)
    import datetime
    aware = local.replace(tzinfo=zone, fold=fold)
    round_trip = aware.astimezone(datetime.timezone.utc).astimezone(zone).replace(tzinfo=None)
    if round_trip != local:
        return None
    return int(aware.timestamp() * 1000)


def format_time(ms):
    """Local time of an epoch-ms value, for humans."""
    if ms is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000.0))
    except (ValueError, OverflowError, OSError):
        return "epoch+%dms" % ms


def dumps(value):
    """Compact JSON that keeps the key order it was given (replay must iterate objects as live
    did)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads_or_none(text):
    return None if text is None else json.loads(text)


def parse_json_arg(text, what):
    """Parse user-supplied JSON, saying where it is broken."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError("the JSON in %s is nested too deeply" % what)
    except ValueError as exc:
        where = ""
        if hasattr(exc, "lineno"):
            where = " at line %d column %d" % (exc.lineno, exc.colno)
        raise InputError("invalid JSON in %s%s: %s; pass a JSON value like '{\"name\": \"World\"}'"
                         % (what, where, getattr(exc, "msg", exc)))


def _digits(n, alphabet, width=0):
    """``n`` written in the base of ``alphabet``, zero-padded to ``width``."""
    out = ""
    while n:
        n, r = divmod(n, len(alphabet))
        out = alphabet[r] + out
    return out.rjust(width, alphabet[0])


def new_id(prefix):
    """Time-sortable unique id: prefix, base36 ms timestamp, 8 random hex chars."""
    return "%s_%s%s" % (prefix, _digits(now_ms(), "0123456789abcdefghijklmnopqrstuvwxyz"),
                        os.urandom(4).hex())


# A run id is "run_", 8 random characters, then its base36 ms time: its first RUN_SHORT_LEN
# characters are its short form, which no other run of its store starts with (checked when the
# run is made), however close in time runs start. (Ids made before were "run_<time><random>".)
RUN_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base32: no i, l, o, u
RUN_SHORT_LEN = len("run_") + 8


def new_run_id():
    """A run id whose random part comes first (see RUN_SHORT_LEN)."""
    random_part = _digits(int.from_bytes(os.urandom(5), "big"), RUN_ID_ALPHABET, 8)
    return "run_%s%s" % (random_part, _digits(now_ms(), "0123456789abcdefghijklmnopqrstuvwxyz"))


def sha256_hex(data):
    import hashlib
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def backoff_ms(policy, attempts):
    """Delay before the next attempt after ``attempts`` failures under ``policy``."""
    initial, factor, cap = (float(policy["initial_ms"]), float(policy["backoff"]),
                            float(policy["max_ms"]))
    n = max(0, attempts - 1)
    # Compare exponents rather than compute factor ** n: it overflows a float long before n is
    # large.
    if initial <= 0 or factor <= 1 or n * math.log(factor) < math.log(max(cap, 1.0) / initial):
        return int(min(initial * factor ** n if factor > 1 else initial, cap))
    return int(cap)


def lease_clock():
    """Seconds on a clock that never jumps and, on Linux, counts a suspend too (CLOCK_BOOTTIME).

    Lease time is kept on it: after a laptop wakes up, the leases that ran out
    while it slept are known to have run out."""
    return time.clock_gettime(_LEASE_CLOCK) if _LEASE_CLOCK is not None else time.monotonic()


_LEASE_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)


def pid_alive(pid):
    """True if a process with this pid exists on this machine."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_identity(pid):
    """(process start time in clock ticks since boot, boot id) on Linux, else (None, None).

    Together with the pid they name one process for good: a pid reused after
    the process died, or after a reboot, does not match.
    """
    try:
        with open("/proc/%d/stat" % pid) as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        with open("/proc/sys/kernel/random/boot_id") as f:
            return start, f.read().strip()
    except (OSError, IndexError):
        return None, None


def _my_boot_id():
    global _BOOT_ID
    if _BOOT_ID is None:
        _BOOT_ID = process_identity(os.getpid())[1] or ""
    return _BOOT_ID


_BOOT_ID = None


def pid_namespace():
    """What gives this process's pids their meaning: on Linux its PID namespace (the inode of
    /proc/self/ns/pid); elsewhere the platform (pids are machine-wide); None if unknowable."""
    global _PID_NS
    if _PID_NS is None:
        _PID_NS = _read_pid_namespace() or ""
    return _PID_NS or None


def _read_pid_namespace():
    if not sys.platform.startswith("linux"):
        return sys.platform
    try:
        # A /proc mounted for another namespace names other processes by our pids: trust no pid.
        if int(os.readlink("/proc/self")) != os.getpid():
            return None
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except (OSError, ValueError):
        return None


_PID_NS = None


def scheduler_alive(pid, start, boot, ns):
    """Whether a scheduler registered on this host still runs: True, False (proven gone), or None.

    None: its pid means nothing here (another PID namespace, or none recorded), so only
    its lease can tell."""
    if boot and _my_boot_id() and boot != _my_boot_id():
        return False  # registered before this boot
    if not ns or ns != pid_namespace():
        return None
    if not pid_alive(pid):
        return False
    if start:
        return process_identity(pid)[0] == start  # a reused pid is another process
    return True


def _clean_error(error):
    """Normalize an error document from a shim to {message, name, stack}."""
    if not isinstance(error, dict):
        return {"message": str(error) if error is not None else "unknown error", "name": "Error",
                "stack": None}
    return {"message": str(error.get("message", "unknown error"))[:4000],
            "name": str(error.get("name") or "Error"),
            "stack": None if error.get("stack") is None else str(error.get("stack"))[:16000]}


def _short(value, width=60):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------
# Config: a YAML subset reader and the settings with their defaults
# ---------------------------------------------------------------------------

DEFAULT_CONFIG_PATH = "~/.config/ty-openworkflow/config.yaml"

DEFAULT_CONFIG_TEXT = """\
data_dir: {data_dir}
default_adapter: exec

adapters:
  exec:
    enabled: true
    work_dir: {exec_dir}

  docker:
    enabled: false
    work_dir: {docker_dir}
    network: ""

  cloudflare:
    enabled: false
    account_id: ""
    api_token_cmd: "op read 'op://Private/Cloudflare/api_token'"
    namespace: ""

webhook:
  enabled: false
  port: 8765
  host: localhost
  path: /webhook
  external_url: ""

taskyou:
  cli: ty
  project: ""
  auto_create_tasks: true

poll_interval: 30s
"""

# Every key the config understands: dotted path -> (kind, default). Kinds:
# str, path, bool, int, duration (stored as ms), size (bytes), map.
CONFIG_SCHEMA = {
    "data_dir": ("path", "~/.config/ty-openworkflow"),
    "default_adapter": ("str", "exec"),
    "poll_interval": ("duration", "30s"),
    "retention": ("duration?", None),
    "concurrency": ("int", 16),
    "lease_ttl": ("duration", "30s"),
    "runner_linger": ("duration", "2m"),
    "shutdown_grace": ("duration", "10s"),
    "store.synchronous": ("str", "full"),
    "limits.max_output_bytes": ("size", 1048576),
    "limits.max_input_bytes": ("size", 1048576),
    "limits.max_step_attempts": ("int", 1000),
    "limits.max_steps": ("int", 10000),
    "limits.pass_memory": ("size", 1 << 30),
    "limits.max_child_depth": ("int", CHILD_DEPTH_DEFAULT),
    "limits.max_children": ("int", CHILDREN_DEFAULT),
    "retry.max_attempts": ("int", 10),
    "retry.initial_interval": ("duration", "1s"),
    "retry.backoff_coefficient": ("float", 2.0),
    "retry.max_interval": ("duration", "100s"),
    "adapters.exec.enabled": ("bool", True),
    "adapters.exec.work_dir": ("path", "{data_dir}/exec"),
    "adapters.exec.node": ("str", "node"),
    "adapters.exec.python": ("str", "python3"),
    "adapters.exec.timeout": ("duration", "15m"),
    "adapters.exec.mode": ("str", "warm"),
    "adapters.exec.env": ("map", {}),
    "adapters.docker.enabled": ("bool", False),
    "adapters.docker.work_dir": ("path", "{data_dir}/docker"),
    "adapters.docker.network": ("str", ""),
    "adapters.docker.docker": ("str", "docker"),
    "adapters.docker.node_image": ("str", "node:20-alpine"),
    "adapters.docker.python_image": ("str", "python:3.12-alpine"),
    "adapters.docker.pull": ("str", "never"),
    "adapters.docker.memory": ("str", "512m"),
    "adapters.docker.cpus": ("str", "1"),
    "adapters.docker.pids_limit": ("int", 256),
    "adapters.docker.user": ("str", "65534:65534"),
    "adapters.docker.read_only": ("bool", True),
    "adapters.docker.timeout": ("duration", "15m"),
    "adapters.docker.env": ("map", {}),
    "adapters.docker.volumes": ("map", {}),
    "adapters.cloudflare.enabled": ("bool", False),
    "adapters.cloudflare.account_id": ("str", ""),
    "adapters.cloudflare.api_token_cmd": ("str", ""),
    "adapters.cloudflare.namespace": ("str", ""),
    "adapters.cloudflare.api_base": ("str", "https://api.cloudflare.com/client/v4"),
    "adapters.cloudflare.workers_url": ("str", "https://{script}.{subdomain}.workers.dev"),
    "adapters.cloudflare.timeout": ("duration", "5m"),
    "adapters.cloudflare.cpu_ms": ("int", 0),
    "adapters.cloudflare.observability": ("bool", False),
    "adapters.cloudflare.recovery_window": ("duration", "120s"),
    "adapters.cloudflare.heartbeat": ("duration", "20s"),
    "adapters.cloudflare.ready_timeout": ("duration", "2m"),
    "adapters.cloudflare.api_budget": ("int", 1000),
    "webhook.enabled": ("bool", False),
    "webhook.port": ("int", 8765),
    "webhook.host": ("str", "localhost"),
    "webhook.path": ("str", "/webhook"),
    "webhook.external_url": ("str", ""),
    "webhook.max_body_bytes": ("size", 1048576),
    "webhook.tolerance": ("duration", "5m"),
    "webhook.read_timeout": ("duration", "10s"),
    "webhook.max_connections": ("int", 64),
    "dashboard.enabled": ("bool", False),
    "dashboard.host": ("str", "localhost"),
    "dashboard.port": ("int", 8766),
    "dashboard.allowed_hosts": ("str", ""),
    "dashboard.max_connections": ("int", 64),
    "taskyou.cli": ("str", "ty"),
    "taskyou.project": ("str", ""),
    "taskyou.auto_create_tasks": ("bool", True),
    "taskyou.timeout": ("duration", "30s"),
    "taskyou.outbox_expiry": ("duration?", "30d"),
}
# Whole-number settings and their sensible ranges, checked when the config is read.
CONFIG_RANGES = {
    "concurrency": (1, 1024),
    "webhook.port": (0, 65535), "webhook.max_connections": (1, 100000),  # port 0: any
    "dashboard.port": (0, 65535), "dashboard.max_connections": (1, 100000),
    "limits.max_step_attempts": (1, 10 ** 9), "limits.max_steps": (1, 10 ** 9),
    "retry.max_attempts": (1, 10000),
    "adapters.docker.pids_limit": (0, 10 ** 6),
    "limits.max_child_depth": (1, 100000), "limits.max_children": (1, 10 ** 6),
    "adapters.cloudflare.cpu_ms": (0, 300000), "adapters.cloudflare.api_budget": (10, 1200),
}
_CONFIG_SECTIONS = {"adapters", "adapters.exec", "adapters.docker", "adapters.cloudflare",
                    "webhook", "taskyou", "limits", "retry", "dashboard", "store"}


class _Line:
    __slots__ = ("no", "indent", "text")

    def __init__(self, no, indent, text):
        self.no, self.indent, self.text = no, indent, text


def _quoted_end(text, start):
    """Index just past the quoted string that starts at ``start``, or -1 if unterminated."""
    q, i = text[start], start + 1
    while i < len(text):
        if q == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == q:
            if q == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return -1


def _strip_comment(text):
    """Drop a trailing ``# comment``. Quotes count only where a value starts (YAML's rule)."""
    i = 0
    value_start = True
    while i < len(text):
        ch = text[i]
        if value_start and ch in "'\"":
            end = _quoted_end(text, i)
            if end < 0:
                return text.rstrip()  # the scalar parser reports it, with the line
            i = end
            value_start = False
            continue
        if ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        if ch == ":" and text[i + 1:i + 2] in (" ", ""):
            value_start = True
        elif ch not in " \t":
            value_start = False
        i += 1
    return text.rstrip()


def _yaml_scalar(raw, where):
    s = raw.strip()
    if s == "" or s in ("~", "null", "Null", "NULL"):
        return None
    if s[0] in "'\"":
        q = s[0]
        if len(s) < 2 or s[-1] != q:
            raise ConfigError("%s: unterminated %s-quoted string"
                              % (where, "double" if q == '"' else "single"))
        body = s[1:-1]
        if q == "'":
            if re.search(r"(?<!')'(?!')", body):
                raise ConfigError("%s: stray single quote inside a single-quoted string "
                                  "(write '' for ')" % where)
            return body.replace("''", "'")
        if _quoted_end(s, 0) != len(s):
            raise ConfigError("%s: text after the closing quote in %s" % (where, s))
        try:
            return json.loads('"%s"' % body.replace("\t", "\\t"))
        except ValueError:
            raise ConfigError("%s: bad escape in double-quoted string %s" % (where, s))
    if s in ("true", "True", "TRUE", "yes", "on"):
        return True
    if s in ("false", "False", "FALSE", "no", "off"):
        return False
    if s == "{}":
        return {}
    if s == "[]":
        return []
    if s[0] in "[{&*!|>%@`":
        raise ConfigError("%s: %r is YAML this reader does not support; "
                          "use plain nested mappings and scalars" % (where, s))
    if re.fullmatch(r"[-+]?\d+", s):
        return int(s)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", s):
        return float(s)
    return s


def parse_yaml(text, filename="<config>"):
    """Parse the YAML subset configs use: nested mappings of scalars, with comments.

    Returns ``(data, lines)`` where ``lines`` maps dotted key paths to line numbers.
    """
    lines = []
    for no, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ConfigError(
                "%s:%d: tab used for indentation; indent with spaces" % (filename, no))
        body = _strip_comment(raw)
        if not body.strip() or body.strip() in ("---", "..."):
            continue
        lines.append(_Line(no, len(body) - len(body.lstrip(" ")), body.strip()))
    key_lines = {}
    pos = 0

    def block(indent, prefix):
        nonlocal pos
        out = {}
        while pos < len(lines):
            ln = lines[pos]
            where = "%s:%d" % (filename, ln.no)
            if ln.indent < indent:
                break
            if ln.indent > indent:
                raise ConfigError("%s: unexpected indentation" % where)
            if ln.text.startswith("- ") or ln.text == "-":
                raise ConfigError("%s: lists are not used in this config; "
                                  "write a mapping (key: value)" % where)
            m = re.match(r"^(\"[^\"]*\"|'[^']*'|[^:]+?)\s*:(?:\s+(.*))?$", ln.text)
            if not m:
                m2 = re.match(r"^(\"[^\"]*\"|'[^']*'|[^:]+?)\s*:$", ln.text)
                if not m2:
                    raise ConfigError("%s: expected 'key: value', got %r" % (where, ln.text))
                m = m2
            key = m.group(1).strip()
            if key[:1] in "'\"":
                key = key[1:-1]
            value = m.group(2) if m.lastindex and m.lastindex >= 2 else None
            path = prefix + key
            if key in out:
                raise ConfigError("%s: duplicate key %r" % (where, path))
            key_lines[path] = ln.no
            pos += 1
            if value is None or value.strip() == "":
                if pos < len(lines) and lines[pos].indent > indent:
                    out[key] = block(lines[pos].indent, path + ".")
                else:
                    out[key] = None
            else:
                out[key] = _yaml_scalar(value, where)
        return out

    if lines and lines[0].indent != 0:
        raise ConfigError("%s:%d: the first key must not be indented" % (filename, lines[0].no))
    data = block(0, "")
    if pos < len(lines):
        raise ConfigError("%s:%d: unexpected indentation" % (filename, lines[pos].no))
    return data, key_lines


def _format_size(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return "%d%s" % (n // size, unit)
    return "%d bytes" % n


def _parse_size(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*", str(value), re.I)
    if not m:
        raise ValueError("invalid size %r; use bytes or a string like 512KiB, 1MiB" % value)
    mult = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20, "mb": 10 ** 6,
            "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30}[(m.group(2) or "").lower()]
    return int(m.group(1)) * mult


class Config:
    """Settings read from config.yaml, with every default filled in."""

    def __init__(self, values, path=None, exists=False):
        self.values = values
        self.path = path
        self.exists = exists

    def __getitem__(self, key):
        return self.values[key]

    def get(self, key, default=None):
        return self.values.get(key, default)

    @property
    def data_dir(self):
        return self.values["data_dir"]

    def retry_policy(self):
        return {"max_attempts": self["retry.max_attempts"],
                "initial_ms": self["retry.initial_interval"],
                "backoff": self["retry.backoff_coefficient"], "max_ms": self["retry.max_interval"]}


def default_config_path():
    return os.environ.get(CONFIG_ENV) or os.path.expanduser(DEFAULT_CONFIG_PATH)


def _coerce(kind, value, where, key):
    try:
        if kind == "str":
            if value is None:
                return ""
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return (value if isinstance(value, str)
                    else str(value).lower() if isinstance(value, bool) else str(value))
        if kind == "path":
            if not value or isinstance(value, (dict, list, bool)):
                raise ValueError("expected a path")
            return str(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("expected a whole number >= 0")
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
                raise ValueError("expected a number >= 1")
            return float(value)
        if kind == "duration":
            return parse_duration(value)
        if kind == "duration?":  # a duration, or ~ / empty for "off"
            return None if value in (None, "", "off") else parse_duration(value)
        if kind == "size":
            return _parse_size(value)
        if kind == "map":
            if value is None:
                return {}
            if not isinstance(value, dict) or any(isinstance(v, dict) for v in value.values()):
                raise ValueError("expected a mapping of names to values")
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
    except ValueError as exc:
        raise ConfigError("%s: %s: %s (got %r)" % (where, key, exc, value))
    raise AssertionError(kind)


def load_config(path=None, text=None, must_exist=False):
    """Read the config file (or ``text``) and return a Config with defaults filled in.

    A missing file is not an error (the defaults apply, as ``init`` would write them) unless
    ``must_exist``, or the path came from $TY_OPENWORKFLOW_CONFIG: someone gave it, as --config.
    """
    from_env = path is None and text is None and bool(os.environ.get(CONFIG_ENV))
    path = os.path.abspath(os.path.expanduser(path or default_config_path()))
    exists = False
    if text is None:
        if os.path.isdir(path):
            raise ConfigError("config %s is a directory; give the path of a file (e.g. %s)"
                              % (path, os.path.join(path, "config.yaml")))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            exists = True
        except FileNotFoundError:
            if from_env:
                raise ConfigError("config file %s (from $%s) not found; correct the variable, or "
                                  "create the file with `ty-openworkflow init`"
                                  % (path, CONFIG_ENV))
            if must_exist:
                raise ConfigError("config file %s not found; "
                                  "create it with `ty-openworkflow --config %s init`"
                                  % (path, path))
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("cannot read config %s: %s" % (path, exc))
    data, key_lines = parse_yaml(text, path)
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            dotted = prefix + k
            kind = CONFIG_SCHEMA.get(dotted, (None,))[0]
            where = "%s:%s" % (path, key_lines.get(dotted, "?"))
            if kind == "map":
                flat[dotted] = v
            elif dotted in _CONFIG_SECTIONS:
                if v is None:
                    continue
                if not isinstance(v, dict):
                    raise ConfigError("%s: %s must be a mapping of settings" % (where, dotted))
                walk(v, dotted + ".")
            elif kind is None:
                known = sorted(k2[len(prefix):].split(".")[0]
                               for k2 in CONFIG_SCHEMA if k2.startswith(prefix))
                raise ConfigError("%s: unknown key %r; known here: %s"
                                  % (where, dotted, ", ".join(sorted(set(known)))))
            else:
                flat[dotted] = v

    walk(data, "")
    values = {}
    for key, (kind, default) in CONFIG_SCHEMA.items():
        if key in flat and (flat[key] is not None or kind == "duration?"):  # `~` there is "off"
            where = "%s:%s" % (path, key_lines.get(key, "?"))
            values[key] = _coerce(kind, flat[key], where, key)
        else:
            values[key] = _coerce(kind, default, "default", key)
    if os.environ.get(DATA_DIR_ENV):
        values["data_dir"] = os.environ[DATA_DIR_ENV]
    base = os.path.dirname(path)

    def fix_path(p):
        p = p.replace("{data_dir}", values["data_dir"])
        p = os.path.expanduser(p)
        return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))

    values["data_dir"] = fix_path(values["data_dir"])
    for key, (kind, _) in CONFIG_SCHEMA.items():
        if kind == "path" and key != "data_dir":
            values[key] = fix_path(values[key])
    if values["default_adapter"] not in ADAPTER_NAMES:
        raise ConfigError("%s:%s: default_adapter %r is not one of %s"
                          % (path, key_lines.get("default_adapter", "?"), values["default_adapter"],
                             ", ".join(ADAPTER_NAMES)))
    for key, (low, high) in CONFIG_RANGES.items():
        if not low <= values[key] <= high:
            raise ConfigError("%s:%s: %s must be from %s to %s (got %s)"
                              % (path, key_lines.get(key, "?"), key, low, high, values[key]))
    if values["lease_ttl"] < 2000:
        raise ConfigError("%s: lease_ttl must be at least 2s" % path)
    if values["store.synchronous"] not in STORE_SYNC_MODES:
        raise ConfigError("%s:%s: store.synchronous must be full (a commit survives a power cut) "
                          "or normal (faster; survives a crash of the process only)"
                          % (path, key_lines.get("store.synchronous", "?")))
    if values["adapters.exec.mode"] not in ("warm", "process"):
        raise ConfigError("%s:%s: adapters.exec.mode must be warm (long-lived workers) "
                          "or process (a process per pass)"
                          % (path, key_lines.get("adapters.exec.mode", "?")))
    if values["adapters.docker.pull"] not in ("never", "missing", "always"):
        raise ConfigError("%s:%s: adapters.docker.pull must be never, missing or always"
                          % (path, key_lines.get("adapters.docker.pull", "?")))
    if values["poll_interval"] < 1000:
        raise ConfigError("%s: poll_interval must be at least 1s" % path)
    if values["adapters.cloudflare.heartbeat"] < 100:
        raise ConfigError("%s: adapters.cloudflare.heartbeat must be at least 100ms" % path)
    return Config(values, path, exists)


def write_default_config(path, data_dir=None, force=False):
    """Write the seed's default config; refuses to overwrite without ``force``."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ConfigError("config %s is a directory; give the path of a file (e.g. %s)"
                          % (path, os.path.join(path, "config.yaml")))
    if os.path.exists(path) and not force:
        raise Conflict("%s already exists; edit it, or run `init --force` "
                       "to overwrite it with the defaults" % path)
    data_dir = data_dir or "~/.config/ty-openworkflow"
    if "\n" in data_dir or "\0" in data_dir:
        raise InputError("--data-dir must be a single-line path")
    if len(data_dir) > 1:
        data_dir = data_dir.rstrip("/")

    def q(value):
        plain = (not re.search(r"[#:'\"\\{}\[\]&*!|>%@`,]", value)
                 and value == value.strip() and value[:1] != "-")
        return value if plain else json.dumps(value)

    text = DEFAULT_CONFIG_TEXT.format(data_dir=q(data_dir), exec_dir=q(data_dir + "/exec"),
                                      docker_dir=q(data_dir + "/docker"))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        import tempfile
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".config-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError("cannot write %s: %s" % (path, exc.strerror or exc))
    return path


# ---------------------------------------------------------------------------
# Store: SQLite (WAL), migrations by PRAGMA user_version
# ---------------------------------------------------------------------------

# Append-only: each entry is one schema version, applied in one transaction.
MIGRATIONS = [
    [  # 1: workflows, versions, runs, steps, events, logs, schedulers
        """CREATE TABLE workflows (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            latest_version INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL)""",
        """CREATE TABLE workflow_versions (
            workflow_id TEXT NOT NULL REFERENCES workflows(id),
            version INTEGER NOT NULL,
            label TEXT NOT NULL,
            runtime TEXT NOT NULL,
            adapter TEXT NOT NULL,
            code TEXT NOT NULL,
            code_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (workflow_id, version))""",
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            workflow_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            status TEXT NOT NULL,
            input TEXT NOT NULL,
            output TEXT,
            error TEXT,
            passes INTEGER NOT NULL DEFAULT 0,
            pass_failures INTEGER NOT NULL DEFAULT 0,
            step_attempts INTEGER NOT NULL DEFAULT 0,
            available_at INTEGER,
            wake_at INTEGER,
            deadline_at INTEGER,
            pass_id TEXT,
            lease_owner TEXT,
            lease_expires_at INTEGER,
            task_requested INTEGER NOT NULL DEFAULT 0,
            task_title TEXT,
            task_id INTEGER,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            started_at INTEGER,
            finished_at INTEGER,
            FOREIGN KEY (workflow_id, version)
                REFERENCES workflow_versions(workflow_id, version))""",
        "CREATE INDEX runs_due ON runs(status, available_at)",
        "CREATE INDEX runs_workflow ON runs(workflow_id, created_at)",
        """CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs(id),
            key TEXT NOT NULL,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            seq INTEGER NOT NULL,
            output TEXT,
            error TEXT,
            retry TEXT,
            retryable INTEGER NOT NULL DEFAULT 1,
            attempts INTEGER NOT NULL DEFAULT 0,
            wake_at INTEGER,
            started_at INTEGER,
            completed_at INTEGER,
            PRIMARY KEY (run_id, key))""",
        """CREATE TABLE run_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            pass_id TEXT,
            type TEXT NOT NULL,
            data TEXT,
            at INTEGER NOT NULL)""",
        "CREATE INDEX run_events_run ON run_events(run_id, id)",
        """CREATE TABLE run_logs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            pass_id TEXT NOT NULL,
            pass_no INTEGER NOT NULL,
            adapter TEXT NOT NULL,
            text TEXT NOT NULL,
            at INTEGER NOT NULL)""",
        "CREATE INDEX run_logs_run ON run_logs(run_id, id)",
        """CREATE TABLE schedulers (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            wake_port INTEGER,
            started_at INTEGER NOT NULL,
            heartbeat_at INTEGER NOT NULL)""",
    ],
    [  # 2: a default deadline per workflow version
        "ALTER TABLE workflow_versions ADD COLUMN deadline_ms INTEGER",
    ],
    [  # 3: the TaskYou bridge outbox and the webhook replay guard
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT,
            delivered_at INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at INTEGER NOT NULL,
            lease_until INTEGER,
            last_error TEXT,
            created_at INTEGER NOT NULL)""",
        "CREATE INDEX outbox_pending ON outbox(delivered_at, next_at)",
        "CREATE INDEX outbox_run ON outbox(run_id, id)",
        """CREATE TABLE webhook_seen (
            digest TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            at INTEGER NOT NULL)""",
    ],
    [  # 4: replay order, step counters, the last pass's end
        # The order in which steps and sleeps resolved live: replay hands them back in it.
        "ALTER TABLE steps ADD COLUMN done_seq INTEGER",
        "ALTER TABLE runs ADD COLUMN step_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN done_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN last_pass TEXT",
        "UPDATE runs SET step_count = (SELECT count(*) FROM steps WHERE steps.run_id = runs.id)",
        # What proves a scheduler dead on its own host: its process start time and the boot.
        "ALTER TABLE schedulers ADD COLUMN proc_start TEXT",
        "ALTER TABLE schedulers ADD COLUMN boot_id TEXT",
        # Warnings said recently (a `tick` from cron must not repeat one every minute).
        "CREATE TABLE notices (key TEXT PRIMARY KEY, at INTEGER NOT NULL)",
    ],
    [  # 5: each step's and sleep's place in the run's durable call order (the determinism guard)
        "ALTER TABLE steps ADD COLUMN call_seq INTEGER",
        # Idempotent starts: one run per (workflow, key).
        "ALTER TABLE runs ADD COLUMN idempotency_key TEXT",
        "CREATE UNIQUE INDEX runs_idempotency ON runs(workflow_id, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL",
        # retry and fork
        "ALTER TABLE runs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN forked_from TEXT",
    ],
    [  # 6: waits (signals, child runs, TaskYou approvals)
        "ALTER TABLE steps ADD COLUMN wait TEXT",
         # what a wait waits for (kind, name, child run, task id)
        "ALTER TABLE runs ADD COLUMN parent_run_id TEXT",
        "ALTER TABLE runs ADD COLUMN parent_wait_key TEXT",
        # A wait resolved while a pass ran: that pass did not see it, so the run must go again.
        "ALTER TABLE runs ADD COLUMN wake_pending INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX runs_parent ON runs(parent_run_id) WHERE parent_run_id IS NOT NULL",
        """CREATE TABLE signals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            name TEXT NOT NULL,
            data TEXT,
            idempotency_key TEXT,
            created_at INTEGER NOT NULL,
            consumed_by TEXT,
            consumed_at INTEGER)""",
        "CREATE INDEX signals_pending ON signals(run_id, name, id) WHERE consumed_by IS NULL",
        "CREATE UNIQUE INDEX signals_idempotency ON signals(run_id, idempotency_key) WHERE "
        "idempotency_key IS NOT NULL",
    ],
    [  # 7: cron schedules
        """CREATE TABLE schedules (
            name TEXT PRIMARY KEY,
            workflow_id TEXT NOT NULL,
            cron TEXT NOT NULL,
            tz TEXT,
            input TEXT NOT NULL,
            catch_up TEXT NOT NULL DEFAULT 'latest',
            paused INTEGER NOT NULL DEFAULT 0,
            next_fire_at INTEGER,
            last_fire_at INTEGER,
            last_run_id TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL)""",
        "CREATE INDEX schedules_due ON schedules(paused, next_fire_at)",
        "ALTER TABLE runs ADD COLUMN schedule_name TEXT",
    ],
    [  # 8: counters for /metrics (runs started and finished, by workflow): never down, prune or not
        "CREATE TABLE counters (name TEXT NOT NULL, workflow TEXT NOT NULL, value INTEGER NOT "
        "NULL, PRIMARY KEY (name, workflow))",
        "INSERT INTO counters SELECT 'started', workflow_id, count(*) FROM runs GROUP BY "
        "workflow_id",
        "INSERT INTO counters SELECT status, workflow_id, count(*) FROM runs WHERE status IN "
        "('completed', 'failed', 'canceled') GROUP BY status, workflow_id",
        # The dashboard pages through runs newest first, with or without a status filter.
        "CREATE INDEX runs_created ON runs(created_at)",
        "CREATE INDEX runs_status_created ON runs(status, created_at)",
    ],
    [  # 9: what the cloudflare adapter uploaded (so a cron tick never uploads again) and remembers
        "CREATE TABLE cf_scripts (name TEXT NOT NULL, account_id TEXT NOT NULL, workflow_id TEXT "
        "NOT NULL, uploaded_at INTEGER NOT NULL, ready_at INTEGER, last_used_at INTEGER, PRIMARY "
        "KEY (name, account_id))",
        "CREATE TABLE adapter_state (adapter TEXT NOT NULL, key TEXT NOT NULL, value TEXT, "
        "PRIMARY KEY (adapter, key))",
    ],
    [  # 10: when each open TaskYou approval wait was last looked at, so all are polled in turn
        "ALTER TABLE steps ADD COLUMN polled_at INTEGER",
        "UPDATE steps SET polled_at = 0 WHERE kind = 'wait' AND status = 'waiting' "
        "AND wait LIKE '%\"kind\":\"task\"%' AND wait LIKE '%\"task\\_id\":%' ESCAPE '\\' "
        "AND run_id IN (SELECT id FROM runs "
        "WHERE status NOT IN ('completed', 'failed', 'canceled'))",
        "CREATE INDEX steps_polls ON steps(polled_at) WHERE polled_at IS NOT NULL",
    ],
    [  # 11: what makes a scheduler's pid meaningful, and an id that names this store
        "ALTER TABLE schedulers ADD COLUMN pid_ns TEXT",  # its PID namespace (NULL: unknown)
        # Marks the processes and containers of this store's passes: no other store has it.
        # file: the db file's device:inode when the id was given (a copy is another file).
        "CREATE TABLE store_identity (id TEXT NOT NULL, file TEXT)",
        "INSERT INTO store_identity (id) VALUES (lower(hex(randomblob(16))))",
    ],
    [  # 12: a run whose shared worker died under it runs its passes alone from then on
        "ALTER TABLE runs ADD COLUMN isolated INTEGER NOT NULL DEFAULT 0",
    ],
    [  # 13: flow control: per-workflow limits, a run's key and priority, its place in the queue
        "CREATE TABLE flow_limits (workflow_id TEXT PRIMARY KEY, concurrency INTEGER, "
        "per_key INTEGER, rate_count INTEGER, rate_window_ms INTEGER, "
        "updated_at INTEGER NOT NULL)",
        "ALTER TABLE runs ADD COLUMN concurrency_key TEXT",
        "ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        # Held back by its workflow's limits since then (NULL: not held). A held run's
        # available_at is its deadline: it is due only to fail at it.
        "ALTER TABLE runs ADD COLUMN held_since INTEGER",
        # When its first pass since it was made (or retried) was claimed: from then until it
        # ends, it holds a slot of its workflow's concurrency.
        "ALTER TABLE runs ADD COLUMN admitted_at INTEGER",
        "UPDATE runs SET admitted_at = COALESCE(started_at, updated_at) "
        "WHERE passes > 0 AND finished_at IS NULL",
        "CREATE INDEX runs_held ON runs(workflow_id, priority DESC, held_since) "
        "WHERE held_since IS NOT NULL",
        "CREATE INDEX runs_active ON runs(workflow_id, concurrency_key) "
        "WHERE admitted_at IS NOT NULL AND finished_at IS NULL",
        # Starts of runs of workflows with a rate limit, kept as long as their window: at is
        # the claim until begun, then when the run's first step began.
        "CREATE TABLE flow_starts (workflow_id TEXT NOT NULL, run_id TEXT NOT NULL, "
        "at INTEGER NOT NULL, begun INTEGER NOT NULL DEFAULT 0)",
        "CREATE INDEX flow_starts_at ON flow_starts(workflow_id, at)",
        "CREATE INDEX flow_starts_unbegun ON flow_starts(run_id) WHERE begun = 0",
    ],
    [  # 14: a task's runs (the TaskYou plugin's actions) found by index; a start not begun
        "CREATE INDEX runs_task ON runs(task_id) WHERE task_id IS NOT NULL",
        # 1 while the run's rate-limited start waits for its first event (flow_starts.begun)
        "ALTER TABLE runs ADD COLUMN start_pending INTEGER NOT NULL DEFAULT 0",
        "UPDATE runs SET start_pending = 1 WHERE id IN (SELECT run_id FROM flow_starts "
        "WHERE begun = 0)",
    ],
]

_RUN_COLUMNS = ("id, workflow_id, version, status, input, output, error, passes, pass_failures, "
                "step_attempts, available_at, wake_at, deadline_at, pass_id, lease_owner, "
                "lease_expires_at, task_requested, task_title, task_id, created_at, updated_at, "
                "started_at, finished_at, step_count, last_pass, idempotency_key, retries, "
                "forked_from, parent_run_id, parent_wait_key, schedule_name, isolated, "
                "concurrency_key, priority, held_since, admitted_at")
SQL_DUE_RUNS = ("SELECT id, status, lease_owner, available_at FROM runs WHERE (status IN "
                "('pending', 'sleeping', 'waiting') AND available_at <= ?) OR (status = 'running' "
                "AND lease_expires_at < ?) ORDER BY available_at, created_at LIMIT ?")
SQL_CLAIM = ("UPDATE runs SET status = 'running', pass_id = ?, lease_owner = ?, "
             "lease_expires_at = ?, passes = passes + 1, started_at = COALESCE(started_at, ?), "
             "updated_at = ?, wake_pending = 0 WHERE id = ?")
SQL_CLAIM_FIRST = SQL_CLAIM.replace("wake_pending = 0",
                                    "wake_pending = 0, held_since = NULL, admitted_at = ?")
SQL_NEXT_DUE = ("SELECT MIN(t) FROM (SELECT MIN(available_at) AS t FROM runs WHERE status IN "
                "('pending', 'sleeping', 'waiting') UNION ALL SELECT MIN(next_fire_at) FROM "
                "schedules WHERE paused = 0 UNION ALL SELECT MIN(lease_expires_at) FROM runs WHERE "
                "status = 'running')")

SQL_VERSION = ("SELECT workflow_id, version, label, runtime, adapter, code, code_hash, created_at, "
               "deadline_ms FROM workflow_versions WHERE workflow_id = ? AND version = ?")
SQL_WORKFLOWS = ("SELECT w.id, w.name, w.description, w.latest_version, w.created_at, "
                 "w.updated_at, v.label, v.runtime, v.adapter, v.code_hash, v.deadline_ms, (SELECT "
                 "count(*) FROM runs r WHERE r.workflow_id = w.id) AS runs FROM workflows w JOIN "
                 "workflow_versions v ON v.workflow_id = w.id AND v.version = w.latest_version")
SQL_RUN = "SELECT %s FROM runs WHERE id = ?" % _RUN_COLUMNS
# Runs whose id starts with a prefix p, by the id's index: p <= id < p + "\x7f" (ids are ASCII).
SQL_RUN_ID_TAKEN = "SELECT 1 FROM runs WHERE id >= ? AND id < ? LIMIT 1"
SQL_RUNS_BY_PREFIX = ("SELECT %s FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 3"
                      % _RUN_COLUMNS)
# Each of some ids with the ids next to it in the index (the short form tells it from both).
SQL_ID_NEIGHBOURS = ("WITH ids(id) AS (VALUES %s) SELECT ids.id AS id, (SELECT r.id FROM runs r "
                     "WHERE r.id < ids.id ORDER BY r.id DESC LIMIT 1) AS before, (SELECT r.id "
                     "FROM runs r WHERE r.id > ids.id ORDER BY r.id LIMIT 1) AS after FROM ids")
# TaskYou approval waits to look at: steps.polled_at is set only on open waits with a task.
SQL_APPROVALS_DUE = ("SELECT s.run_id, s.key, s.wait FROM steps s JOIN runs r ON r.id = s.run_id "
                     "WHERE s.polled_at IS NOT NULL AND s.polled_at <= ? AND s.status = 'waiting' "
                     "AND r.status NOT IN ('completed', 'failed', 'canceled') "
                     "ORDER BY s.polled_at LIMIT ?")
# How many ancestors a run has (its depth below its root), counted up to the second parameter.
SQL_RUN_DEPTH = ("WITH RECURSIVE up(id, n) AS (SELECT ?, 0 UNION ALL "
                 "SELECT r.parent_run_id, up.n + 1 FROM runs r JOIN up ON r.id = up.id "
                 "WHERE r.parent_run_id IS NOT NULL AND up.n < ?) SELECT max(n) FROM up")
SQL_OPEN_CHILDREN = ("SELECT id, pass_id FROM runs WHERE parent_run_id = ? "
                     "AND status NOT IN ('completed', 'failed', 'canceled')")

SQL_POLL_AGAIN = ("UPDATE steps SET polled_at = 0 WHERE run_id = ? AND kind = 'wait' AND "
                  "status = 'waiting' AND wait LIKE '%\"kind\":\"task\"%' AND "
                  "wait LIKE '%\"task\\_id\":%' ESCAPE '\\'")

# Outcomes of applying one event.
APPLIED, IGNORED, ENDED = "applied", "ignored", "ended"


def _like_prefix(text):
    """A LIKE pattern (with ESCAPE '\\') for what starts with ``text``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _row_dict(cursor, row):
    return {d[0]: row[i] for i, d in enumerate(cursor.description)}


# The data, and the size if it grew, without the file's times (what SQLite's own sync uses).
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _sync_quiet_commits(store_ref, unsynced):
    """The store syncer: puts quiet commits on the disk, QUIET_SYNC_S after the first of them,
    until its store is closed or gone."""
    while True:
        if not unsynced.wait(1.0):
            if store_ref() is None:
                return
            continue
        time.sleep(QUIET_SYNC_S)  # the commits of the next moments share this sync
        store = store_ref()
        if store is None or store.closed:
            return
        unsynced.clear()
        try:
            store.sync()
        except OpenWorkflowError as exc:
            unsynced.set()
            log.warning("%s", exc)
            time.sleep(1.0)
        del store
# A file's modification time moves in coarse steps (a kernel tick): two writes this close
# may leave the same time stamp.
FILE_TIME_GRAIN_NS = 50 * 1000 * 1000


def _file_version(path):
    """What changes whenever a file is written: (inode, size, modification time in ns)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _is_outage(exc):
    """Whether ``exc`` is the store failing (locked, full, I/O, unreadable), not one run's data
    or a bug: an outage is waited out with backoff, the others are charged to the run."""
    if isinstance(exc, StoreError) and exc.orig is not None:
        exc = exc.orig
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)):
        return False
    return isinstance(exc, (sqlite3.Error, StoreError))


class Database:
    """SQLite connections: a small pool, transaction(), migrations, when commits reach the disk."""

    def __init__(self, data_dir, synchronous="full"):
        if synchronous not in STORE_SYNC_MODES:
            raise ConfigError("store.synchronous must be full (survives a power cut) or normal "
                              "(survives a crash of the process only), not %r" % (synchronous,))
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, DB_FILE)
        self.synchronous = synchronous
        self._idle = []  # a small pool: threads borrow a connection per call, never keep one
        self._lock = threading.Lock()
        # Writers of this process queue here, on a mutex, rather than in SQLite's busy
        # handler, which sleeps 1 ms and more per try; other processes still use it.
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._synced_from = 0  # monotonic_ns when the last good sync began
        self._synced_version = None  # the WAL's _file_version then, if trusted
        self._commits = self._synced_commits = 0  # this process's commits: made, and synced
        self._synced_inodes = {}
        self._local = threading.local()
        self._unsynced = threading.Event()  # quiet commits wait for the syncer
        self._syncer = None
        self._store_id = None
        self._closed = False
        self._prepare_dir()
        self._migrate()

    def _prepare_dir(self):
        if os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
            raise StoreError("data dir %s is not a directory; set data_dir in the config to a "
                             "folder" % self.data_dir)
        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError("cannot create data dir %s (%s); set data_dir in the config to a "
                             "writable folder"
                             % (self.data_dir, exc.strerror or exc), exc)
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise StoreError("data dir %s is not writable; fix its permissions or set data_dir "
                             "elsewhere"
                             % self.data_dir)

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000.0,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = %d" % SQLITE_BUSY_TIMEOUT_MS)
            conn.execute("PRAGMA foreign_keys = ON")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.debug("journal_mode is %s, not wal", mode)
            # full: transaction() syncs the WAL after each commit itself (see sync()); with
            # no WAL (a file system without shared memory), SQLite's own full mode does.
            wal = mode.lower() == "wal"
            conn.execute("PRAGMA synchronous = %s" % (
                "FULL" if self.synchronous == "full" and not wal else "NORMAL"))
        except sqlite3.DatabaseError as exc:
            raise self.wrap(exc)
        return conn

    def wrap(self, exc):
        """A sqlite3 error as a StoreError that says what to do."""
        msg = str(exc)
        if "not a database" in msg or "malformed" in msg or "encrypted" in msg:
            return StoreError("%s is not a ty-openworkflow database (%s); move it away or point "
                              "data_dir elsewhere"
                              % (self.path, msg), exc)
        if "full" in msg:
            return StoreError("cannot write %s: the disk (or the database's page limit) is full "
                              "(%s); free some space" % (self.path, msg), exc)
        if "readonly" in msg or "unable to open" in msg or "disk I/O" in msg:
            return StoreError("cannot write %s (%s); check that data_dir is writable and has free "
                              "space"
                              % (self.path, msg), exc)
        if "locked" in msg or "busy" in msg:
            return StoreError("the store %s stayed locked for %ds (%s); another process holds it, "
                              "try again"
                              % (self.path, SQLITE_BUSY_TIMEOUT_MS // 1000, msg), exc)
        return StoreError("store error on %s: %s" % (self.path, msg), exc)

    def _acquire(self):
        if self._closed:
            raise StoreError("the store is closed; open a new Sidecar")
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def fill_pool(self):
        """Open the connections the pool keeps idle now, not as load first peaks: a long-lived
        scheduler's open files are then flat from its start."""
        for conn in [self._acquire() for _ in range(STORE_POOL_IDLE)]:
            self._release(conn)

    def _release(self, conn):
        # A connection goes back to the pool only clean: no open transaction.
        with self._lock:
            if not self._closed and not conn.in_transaction and len(self._idle) < STORE_POOL_IDLE:
                self._idle.append(conn)
                return
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    @contextlib.contextmanager
    def connection(self):
        """Borrow a pooled connection for a few statements (reads; writes use transaction())."""
        conn = self._acquire()
        try:
            yield conn
        finally:
            self._release(conn)

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error; sqlite3 errors leave as StoreError.

        Under ``store.synchronous: full`` it returns only once the commit is on the
        disk, unless the thread is inside ``quiet_commits()``."""
        with self._write_lock:
            conn = self._acquire()
            try:
                self._begin(conn)
                try:
                    yield conn
                except BaseException as exc:
                    # SQLite may already have rolled back by itself (SQLITE_FULL, an I/O error):
                    # a second ROLLBACK would raise and hide the real cause.
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise self.wrap(exc)
                    raise
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise self.wrap(exc)
                self._commits += 1  # under the write lock
            finally:
                self._release(conn)
        if not self._quiet():
            self.sync()
        elif self.synchronous == "full":
            self._sync_soon()

    def _sync_soon(self):
        """A quiet commit reaches the disk within QUIET_SYNC_S, with those near it."""
        self._unsynced.set()
        if self._syncer is None:
            with self._lock:
                if self._syncer is None:
                    # It holds the store weakly: a store dropped unclosed is not kept alive.
                    self._syncer = threading.Thread(
                        target=_sync_quiet_commits, args=(weakref.ref(self), self._unsynced),
                        name="tyow-store-sync", daemon=True)
                    self._syncer.start()

    @property
    def closed(self):
        return self._closed

    # -- durability: what a commit survives (store.synchronous) ---------------------
    #
    # SQLite's own full mode syncs inside COMMIT, holding the database's write lock
    # through the fsync, so every writer of every process waits for every sync. Here
    # the commit is written under the lock and synced once it is let go (a group
    # commit: writers that queue for a sync share one). A scheduler's own writes
    # (claims, leases, a pass's events) tell nobody anything, so they are not waited
    # for (quiet_commits): a syncer puts them on the disk within QUIET_SYNC_S, together.
    # What anyone is told or shown is synced first: a command's write before it
    # returns, what status, list, logs and the dashboard show before they answer
    # (sync_shown), the TaskYou bridge before it calls `ty`. A power cut can so lose
    # only the last moment of work nobody has seen, which is then done again, as after
    # a crash a moment earlier.

    def _quiet(self):
        return self.synchronous != "full" or getattr(self._local, "quiet", False)

    @contextlib.contextmanager
    def quiet_commits(self):
        """Writes and reads of this thread don't wait for the disk (a scheduler's bookkeeping)."""
        was = getattr(self._local, "quiet", False)
        self._local.quiet = True
        try:
            yield
        finally:
            self._local.quiet = was

    def sync_shown(self):
        """Before what was just read is shown to anyone: sync() (a scheduler's own reads: not)."""
        if not self._quiet():
            self.sync()

    def sync(self):
        """Put everything committed so far, by any process, on the disk (a no-op if normal).

        One fdatasync of the WAL; callers that arrive while one runs share the next."""
        if self.synchronous != "full":
            return
        wanted = time.monotonic_ns()
        wal = self.path + "-wal"
        with self._sync_lock:
            if self._synced_from > wanted:
                return  # a sync that began after we asked covered it
            commits = self._commits
            try:
                seen, seen_at = _file_version(wal), time.time_ns()
            except OSError:
                seen = None
            if seen is not None and seen == self._synced_version and (
                    commits == self._synced_commits):
                return  # not written since it was last synced, by us or (its version says) others
            began = time.monotonic_ns()
            try:
                self._fsync(wal)
            except OSError as exc:
                raise StoreError("cannot sync %s to the disk (%s); check the disk and data_dir"
                                 % (self.path, exc.strerror or exc), exc)
            self._synced_from = began
            self._synced_commits = commits
            # Trusted later only if no write after our look can share its time stamp (they are
            # coarse): it was already that old when we looked, and the file system keeps times
            # finer than whole seconds (some keep seconds only: their stamps are never trusted).
            settled = (seen and seen_at - seen[2] > FILE_TIME_GRAIN_NS
                       and seen[2] % 1000000000 != 0)
            self._synced_version = seen if settled else None

    def _fsync(self, path):
        """fdatasync a file of the store, and its folder the first time we see that file (a new
        inode: its name must survive a power cut too, as SQLite's own full mode does)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: the last checkpoint moved every commit into the (synced) db file
        try:
            _fdatasync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if self._synced_inodes.get(path) != inode:
            folder = os.open(self.data_dir, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
            self._synced_inodes[path] = inode

    @staticmethod
    @contextlib.contextmanager
    def savepoint(c):
        """If the block raises, undo what it wrote and nothing else: the transaction goes on."""
        c.execute("SAVEPOINT one_run")
        try:
            yield
        except BaseException:
            if c.in_transaction:  # SQLite may have rolled it all back by itself (a full disk)
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK TO one_run")
                    c.execute("RELEASE one_run")
            raise
        c.execute("RELEASE one_run")

    def _begin(self, conn):
        """BEGIN IMMEDIATE, waiting for another process's write lock in steps of 0.1 ms and up
        rather than in SQLite's busy handler, which sleeps 1 ms and more per try; as long as the
        busy timeout."""
        delay, deadline = 0.0001, None
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise self.wrap(exc)
                    now = time.monotonic()
                    deadline = deadline or now + SQLITE_BUSY_TIMEOUT_MS / 1000.0
                    if now >= deadline:
                        raise self.wrap(exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 0.005)
                except sqlite3.DatabaseError as exc:
                    raise self.wrap(exc)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA busy_timeout = %d" % SQLITE_BUSY_TIMEOUT_MS)

    def query(self, sql, params=()):
        """Rows of one read as dicts."""
        try:
            with self.connection() as conn:
                cur = conn.execute(sql, params)
                return [_row_dict(cur, r) for r in cur.fetchall()]
        except sqlite3.Error as exc:
            raise self.wrap(exc)

    def query_one(self, sql, params=()):
        """The first row of one read as a dict, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def ping(self):
        """Raise unless the store answers a query (a health check)."""
        self.query_one("SELECT 1 AS ok")

    def close(self):
        """Put quiet commits on the disk, close the pooled connections; no more calls."""
        if self._unsynced.is_set():
            with contextlib.suppress(OpenWorkflowError):
                self.sync()
        with self._lock:
            self._closed = True
        self._unsynced.set()  # the syncer wakes, sees the store closed, and ends
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            with contextlib.suppress(Exception):
                c.close()

    def _migrate(self):
        # Look before touching: a plain connection sets no journal mode, so a
        # foreign or newer file is refused byte-for-byte unchanged.
        try:
            conn = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000.0,
                                   isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise self.wrap(exc)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = "
                                  "'table'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self.wrap(exc)
        if app_id not in (0, DB_APPLICATION_ID) or (app_id == 0 and tables):
            conn.close()
            raise StoreError("%s is not a ty-openworkflow database (it holds other data); move it "
                             "away or point data_dir elsewhere" % self.path)
        if version > len(MIGRATIONS):
            conn.close()
            raise StoreError("%s has schema version %d, newer than this ty-openworkflow %s "
                             "understands (%d); upgrade ty_openworkflow.py"
                             % (self.path, version, __version__, len(MIGRATIONS)))
        if version == len(MIGRATIONS):
            conn.close()
            return
        conn.close()
        conn = self._connect()
        try:
            for n in range(version, len(MIGRATIONS)):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Re-read under the write lock: another process may have migrated.
                    if conn.execute("PRAGMA user_version").fetchone()[0] > n:
                        conn.execute("ROLLBACK")
                        continue
                    for stmt in MIGRATIONS[n]:
                        conn.execute(stmt)
                    conn.execute("PRAGMA application_id = %d" % DB_APPLICATION_ID)
                    conn.execute("PRAGMA user_version = %d" % (n + 1))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as exc:
            raise self.wrap(exc)
        finally:
            conn.close()
        if self.synchronous == "full":  # a new or upgraded store: its files and their names
            for path in (self.path, self.path + "-wal"):
                with contextlib.suppress(OSError):
                    self._fsync(path)

    @staticmethod
    def one(c, sql, params):
        """One row as a dict (or None) inside a transaction."""
        cur = c.execute(sql, params)
        row = cur.fetchone()
        return _row_dict(cur, row) if row else None

    def vacuum(self):
        """Give the space of deleted rows back to the disk; returns the bytes freed."""
        before = self._db_bytes()
        with self._write_lock, self.connection() as conn:
            try:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise self.wrap(exc)
        return max(0, before - self._db_bytes())

    def _db_bytes(self):
        files = [self.path + ext for ext in ("", "-wal")]
        return sum(os.path.getsize(f) for f in files if os.path.exists(f))

    @property
    def store_id(self):
        """The random id this store was given when made (it marks its passes' processes).

        A copy of the store (a restored backup, a cloned data dir) is another file: it
        takes an id of its own the first time it is opened, so two copies never take
        each other's processes or containers for their own."""
        if self._store_id is None:
            st = os.stat(self.path)
            here = "%d:%d" % (st.st_dev, st.st_ino)
            row = self.query_one("SELECT id, file FROM store_identity")
            if row["file"] != here:
                with self.transaction() as c:  # looked at again: another process may be first
                    sid, file = c.execute("SELECT id, file FROM store_identity").fetchone()
                    if file != here:
                        if file is not None:  # a copy: an id of its own
                            sid = c.execute("SELECT lower(hex(randomblob(16)))").fetchone()[0]
                        c.execute("UPDATE store_identity SET id = ?, file = ?", (sid, here))
                row = {"id": sid}
            self._store_id = row["id"]
        return self._store_id


class _StorePart:
    """A part of the store: given the Store front, it reaches the other parts through it."""

    def __init__(self, store):
        self.store = store


class WorkflowBook(_StorePart):
    """The workflow catalogue: workflows and their versions."""

    def save_version(self, workflow_id, code, runtime, adapter, label, name, description, now,
                     deadline_ms=None):
        """Store code as a new version unless it equals the latest; returns (version, created)."""
        code_hash = sha256_hex("%s\0%s\0%s\0%s" % (runtime, adapter, deadline_ms, code))
        with self.store.transaction() as c:
            wf = c.execute("SELECT latest_version FROM workflows WHERE id = "
                           "?", (workflow_id,)).fetchone()
            if wf:
                latest = c.execute("SELECT code_hash, label FROM workflow_versions WHERE "
                                   "workflow_id = ? AND version = ?",
                                   (workflow_id, wf[0])).fetchone()
                if latest and latest[0] == code_hash and latest[1] == label:
                    if name is not None or description is not None:
                        c.execute("UPDATE workflows SET name = COALESCE(?, name), description = "
                                  "COALESCE(?, description), updated_at = ? WHERE id = ?",
                                  (name, description, now, workflow_id))
                    return self._version(c, workflow_id, wf[0]), False
                version = wf[0] + 1
                c.execute("UPDATE workflows SET latest_version = ?, name = COALESCE(?, name), "
                          "description = COALESCE(?, description), updated_at = ? WHERE id = ?",
                          (version, name, description, now, workflow_id))
            else:
                version = 1
                c.execute("INSERT INTO workflows (id, name, description, latest_version, "
                          "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                          (workflow_id, name or workflow_id, description or "", 1, now, now))
            c.execute("INSERT INTO workflow_versions (workflow_id, version, label, runtime, "
                      "adapter, code, code_hash, created_at, deadline_ms) VALUES (?, ?, ?, ?, ?, "
                      "?, ?, ?, ?)",
                      (workflow_id, version, label, runtime, adapter, code, code_hash, now,
                       deadline_ms))
            return self._version(c, workflow_id, version), True

    def _version(self, c, workflow_id, version):
        return self.store.one(c, SQL_VERSION, (workflow_id, version))

    def get_version(self, workflow_id, version):
        """One version of a workflow (None if there is none)."""
        return self.store.query_one(SQL_VERSION, (workflow_id, version))

    def get_workflow(self, workflow_id, counts=True):
        """A workflow with its latest version (and its run count unless not ``counts``)."""
        sql = SQL_WORKFLOWS if counts else SQL_WORKFLOWS.replace(
            "(SELECT count(*) FROM runs r WHERE r.workflow_id = w.id)", "NULL", 1)
        return self.store.query_one(sql + " WHERE w.id = ?", (workflow_id,))

    def list_workflows(self):
        """Every workflow with its latest version and run count."""
        return self.store.query(SQL_WORKFLOWS + " ORDER BY w.id")

    def versions(self, workflow_id):
        """A workflow's versions, newest first."""
        return self.store.query("SELECT version, label, runtime, adapter, code_hash, created_at, "
                                "deadline_ms FROM workflow_versions WHERE workflow_id = ? ORDER BY "
                                "version DESC", (workflow_id,))

    @staticmethod
    def latest(c, workflow_id):
        """(latest version, its default deadline in ms) of a workflow, or None, in transaction c."""
        return c.execute("SELECT w.latest_version, v.deadline_ms FROM workflows w JOIN "
                         "workflow_versions v ON v.workflow_id = w.id AND v.version = "
                         "w.latest_version WHERE w.id = ?",
                         (workflow_id,)).fetchone()


class RunLedger(_StorePart):
    """A run's life: created, ended (with its tree), canceled, retried, forked, failed."""

    def create_run(self, run_id, workflow_id, version, input_json, now, task_requested=False,
                   task_title=None, deadline_at=None, idempotency_key=None, key=None, priority=0,
                   task_id=None):
        """Store a new pending run (``run_id`` None: a fresh id); returns (its id, True), or with
        ``idempotency_key`` (the id of the run that key already started, False) and nothing is
        created."""
        with self.store.transaction() as c:
            return self.add_run(c, run_id, workflow_id, version, input_json, now, task_requested,
                                task_title, deadline_at, idempotency_key, key=key,
                                priority=priority, task_id=task_id)

    def runs_of_task(self, task_id):
        """The runs linked to TaskYou task ``task_id``, oldest first."""
        return self.store.query("SELECT id, workflow_id, version, status, created_at, updated_at, "
                                "finished_at, error FROM runs WHERE task_id = ? ORDER BY "
                                "created_at, id", (task_id,))

    def add_run(self, c, run_id, workflow_id, version, input_json, now, task_requested=False,
                task_title=None, deadline_at=None, idempotency_key=None, schedule_name=None,
                key=None, priority=0, task_id=None):
        """create_run inside transaction ``c`` (a schedule's fire names its schedule; ``task_id``
        links the run to a task that exists already)."""
        if idempotency_key is not None:
            row = c.execute("SELECT id FROM runs WHERE workflow_id = ? AND idempotency_key = ?",
                            (workflow_id, idempotency_key)).fetchone()
            if row:
                return row[0], False
        run_id = run_id or self.fresh_run_id(c)
        available_at, held_since = self.store.flow.entry(c, workflow_id, now, deadline_at)
        c.execute("INSERT INTO runs (id, workflow_id, version, status, input, available_at, "
                  "deadline_at, task_requested, task_title, created_at, updated_at, "
                  "idempotency_key, schedule_name, concurrency_key, priority, held_since, "
                  "task_id) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (run_id, workflow_id, version, input_json, available_at, deadline_at,
                   int(bool(task_requested)), task_title, now, now, idempotency_key,
                   schedule_name, key, priority, held_since, task_id))
        self.journal(c, run_id, None, "created", {"workflow": workflow_id, "version": version}, now)
        self.count(c, "started", workflow_id)
        if task_requested:
            self.store.outbox.enqueue(c, run_id, "create", None, now)
        return run_id, True

    @staticmethod
    def fresh_run_id(c):
        """A new run id whose short form no run of the store starts with (in transaction ``c``,
        so two processes cannot both take it)."""
        while True:
            run_id = new_run_id()
            short = run_id[:RUN_SHORT_LEN]
            if not c.execute(SQL_RUN_ID_TAKEN, (short, short + "\x7f")).fetchone():
                return run_id

    @staticmethod
    def count(c, name, workflow_id):
        """Count one more run ``name`` (started, completed, ...) of a workflow for /metrics."""
        if not c.execute("UPDATE counters SET value = value + 1 WHERE name = ? AND workflow = ?",
                         (name, workflow_id)).rowcount:
            c.execute("INSERT INTO counters (name, workflow, value) VALUES (?, ?, "
                      "1)", (name, workflow_id))

    def add_log(self, run_id, pass_id, pass_no, adapter, text, now):
        """Keep what a pass printed (nothing if it printed nothing)."""
        if not text:
            return
        with self.store.transaction() as c:
            c.execute("INSERT INTO run_logs (run_id, pass_id, pass_no, adapter, text, at) VALUES "
                      "(?, ?, ?, ?, ?, ?)",
                      (run_id, pass_id, pass_no, adapter, text, now))

    def journal(self, c, run_id, pass_id, type_, data, now):
        """Add an entry to the run's event journal."""
        c.execute("INSERT INTO run_events (run_id, pass_id, type, data, at) VALUES (?, ?, ?, ?, ?)",
                  (run_id, pass_id, type_, None if data is None else dumps(data), now))

    def finish(self, c, run_id, pass_id, status, now, output=None, error=None):
        """End a run, then cancel its unfinished descendants: a loop over the tree, never a
        recursion (a chain of child runs may be deeper than Python's stack)."""
        self._end_run(c, run_id, pass_id, status, now, output, error)
        ended = [(run_id, status)]
        while ended:
            parent, how = ended.pop()
            for child, child_pass in c.execute(SQL_OPEN_CHILDREN, (parent,)).fetchall():
                error = {"message": "its parent run %s was %s" % (parent, how), "name": "Canceled",
                         "stack": None}
                self._end_run(c, child, child_pass, "canceled", now, error=error)
                ended.append((child, "canceled"))

    def _end_run(self, c, run_id, pass_id, status, now, output=None, error=None):
        """End one run (not its children): its task update, its parent's wait, its approvals."""
        c.execute("UPDATE runs SET status = ?, output = ?, error = ?, pass_id = NULL, lease_owner "
                  "= NULL, lease_expires_at = NULL, available_at = NULL, wake_at = NULL, "
                  "held_since = NULL, finished_at = ?, updated_at = ? WHERE id = ?",
                  (status, None if output is None else dumps(output),
                   None if error is None else dumps(error), now, now, run_id))
        c.execute("UPDATE steps SET status = 'interrupted' WHERE run_id = ? AND status = "
                  "'running'", (run_id,))
        self.journal(c, run_id, pass_id, status,
                     {"output": output} if status == "completed" else {"error": error}, now)
        if pass_id is not None:  # the pass that ended it is the last pass
            passes = c.execute("SELECT passes FROM runs WHERE id = ?", (run_id,)).fetchone()
            self.note_last_pass(c, run_id, passes[0] if passes else None, status + (
                ": " + str((error or {}).get("message"))[:300] if error else ""), now)
        self.store.flow.begun(c, run_id, now)  # a start that never began a step
        wf = c.execute("SELECT workflow_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        if wf:
            self.count(c, status, wf[0])
        self._queue_task_update(c, run_id, status, now)
        self.store.waits.after_finish(c, run_id, status, now)

    def _queue_task_update(self, c, run_id, status, now):
        """A finished run queues its task update in the same transaction."""
        row = c.execute("SELECT task_requested, output, error FROM runs WHERE id = "
                        "?", (run_id,)).fetchone()
        if row and row[0]:
            self.store.outbox.enqueue(c, run_id, status,
                                      {"output": loads_or_none(row[1]),
                                       "error": loads_or_none(row[2])}, now)

    def cancel_run(self, run_id, now, reason="canceled by user"):
        """Cancel a run that is not terminal; returns the run as it was before."""
        with self.store.transaction() as c:
            run = self.store.one(c, SQL_RUN, (run_id,))
            if run is None:
                raise NotFound("no run %r; list runs with `ty-openworkflow list runs`" % run_id)
            if run["status"] in TERMINAL:
                raise Conflict("run %s is already %s; nothing to cancel" % (run_id, run["status"]))
            self.finish(c, run_id, run["pass_id"], "canceled", now,
                        error={"message": reason, "name": "Canceled", "stack": None})
            return run

    def retry_run(self, run_id, now, version=None):
        """Put a failed or canceled run back to pending: committed steps stay, others run again."""
        with self.store.transaction() as c:
            run = self.store.one(c, SQL_RUN, (run_id,))
            if run is None:
                raise NotFound("no run %r; list runs with `ty-openworkflow list runs`" % run_id)
            if run["status"] not in ("failed", "canceled"):
                raise Conflict("run %s is %s; only a failed or canceled run can be retried%s" % (
                    run_id, run["status"],
                    " (fork it to run it again)" if run["status"] == "completed" else ""))
            c.execute("DELETE FROM steps WHERE run_id = ? AND kind = 'step' AND status != "
                      "'completed'", (run_id,))
            for key, spec_json in c.execute("SELECT key, wait FROM steps WHERE run_id = ? AND kind "
                                            "= 'wait' AND status = "
                                            "'waiting'", (run_id,)).fetchall():
                spec = loads_or_none(spec_json) or {}
                # its child was stopped with the run: a new one is made
                if spec.get("kind") == "child":
                    c.execute("DELETE FROM steps WHERE run_id = ? AND key = ?", (run_id, key))
            c.execute("UPDATE steps SET status = 'sleeping' WHERE run_id = ? AND kind = 'sleep' "
                      "AND status != 'completed'", (run_id,))
            c.execute(SQL_POLL_AGAIN, (run_id,))  # its approvals are polled again, first in line
            # It starts again: its workflow's limits admit it anew.
            available_at, held_since = self.store.flow.entry(c, run["workflow_id"], now, None)
            c.execute("UPDATE runs SET status = 'pending', version = ?, output = NULL, error = "
                      "NULL, finished_at = NULL, available_at = ?, wake_at = NULL, deadline_at = "
                      "NULL, pass_failures = 0, step_attempts = 0, retries = retries + 1, "
                      "step_count = (SELECT count(*) FROM steps WHERE run_id = ?), updated_at = ?, "
                      "held_since = ?, admitted_at = NULL WHERE id = ?",
                      (version or run["version"], available_at, run_id, now, held_since, run_id))
            self.journal(c, run_id, None, "retried",
                         {"from": run["status"], "version": version or run["version"]},
                         now)
            if run["task_requested"]:
                self.store.outbox.enqueue(c, run_id, "processing", None, now)
            return run

    def fork_run(self, run_id, new_run_id, now, from_step=None, version=None, input_json=None,
                 task_requested=False):
        """A new pending run (``new_run_id`` None: a fresh id) with the source's input (or
        ``input_json``) and a copy of its committed history before ``from_step`` (everything
        committed by default); ``task_requested``: it gets a TaskYou task of its own."""
        with self.store.transaction() as c:
            run = self.store.one(c, SQL_RUN, (run_id,))
            if run is None:
                raise NotFound("no run %r; list runs with `ty-openworkflow list runs`" % run_id)
            new_run_id = new_run_id or self.fresh_run_id(c)
            cutoff = None
            if from_step is not None:
                row = c.execute("SELECT seq FROM steps WHERE run_id = ? AND key = ?",
                                (run_id, from_step)).fetchone()
                if row is None:
                    keys = [r[0] for r in c.execute("SELECT key FROM steps WHERE run_id = ? ORDER "
                                                    "BY seq LIMIT 12",
                                                    (run_id,))]
                    raise InputError("run %s has no step %r; its steps are: %s" % (
                        run_id, from_step, ", ".join(keys) or "none"))
                cutoff = row[0]
            available_at, held_since = self.store.flow.entry(c, run["workflow_id"], now, None)
            c.execute("INSERT INTO runs (id, workflow_id, version, status, input, available_at, "
                      "task_requested, task_title, created_at, updated_at, forked_from, "
                      "concurrency_key, priority, held_since) VALUES (?, ?, ?, 'pending', ?, ?, "
                      "?, ?, ?, ?, ?, ?, ?, ?)",
                      (new_run_id, run["workflow_id"], version or run["version"],
                       run["input"] if input_json is None else input_json, available_at,
                       int(bool(task_requested)), run["task_title"], now, now, run_id,
                       run["concurrency_key"], run["priority"], held_since))
            c.execute("INSERT INTO steps (run_id, key, kind, status, seq, output, retry, "
                      "retryable, attempts, wake_at, started_at, completed_at, done_seq, call_seq, "
                      "wait) SELECT ?, key, kind, status, seq, output, retry, retryable, attempts, "
                      "wake_at, started_at, completed_at, done_seq, call_seq, wait FROM steps "
                      "WHERE run_id = ? AND (? IS NULL OR seq < ?) AND (status = 'completed' OR "
                      "kind = 'sleep')",
                      (new_run_id, run_id, cutoff, cutoff))
            c.execute("UPDATE runs SET step_count = (SELECT count(*) FROM steps WHERE run_id = ?), "
                      "done_count = (SELECT COALESCE(MAX(done_seq), 0) FROM steps WHERE run_id = "
                      "?) WHERE id = ?",
                      (new_run_id, new_run_id, new_run_id))
            c.execute("UPDATE steps SET status = 'sleeping' WHERE run_id = ? AND kind = 'sleep' "
                      "AND status != 'completed'", (new_run_id,))
            self.journal(c, new_run_id, None, "created",
                         {"workflow": run["workflow_id"], "forked_from": run_id,
                          "from_step": from_step}, now)
            self.count(c, "started", run["workflow_id"])
            if task_requested:
                self.store.outbox.enqueue(c, new_run_id, "create", None, now)
            return new_run_id

    @staticmethod
    def note_last_pass(c, run_id, number, reason, now):
        """Remember how the run's latest pass ended (status shows it). The count of the
        platform's ends at one point of the run (LeaseLedger.platform_end) is kept across it: a
        pass given back in between (a 1015, a restart of serve) must not wipe it."""
        doc = {"pass": number, "ended_at": now, "reason": reason}
        row = c.execute("SELECT last_pass FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row and row[0] and '"point"' in row[0]:
            last = loads_or_none(row[0]) or {}
            doc.update((k, last[k]) for k in ("ends", "point") if k in last)
        c.execute("UPDATE runs SET last_pass = ? WHERE id = ?", (dumps(doc), run_id))

    @staticmethod
    def amend_last_pass(c, run_id, **fields):
        """Add facts to the record of how the run's latest pass ended."""
        row = c.execute("SELECT last_pass FROM runs WHERE id = ?", (run_id,)).fetchone()
        record = (loads_or_none(row[0]) if row else None) or {}
        record.update(fields)
        c.execute("UPDATE runs SET last_pass = ? WHERE id = ?", (dumps(record), run_id))

    def fail_run(self, run_id, pass_id, now, error):
        """Fail a running pass's run outright (deadline passed, runaway)."""
        with self.store.transaction() as c:
            row = c.execute("SELECT status, pass_id FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[0] in TERMINAL or (pass_id and row[1] != pass_id):
                return False
            self._fail_guarded(c, run_id, pass_id, now, error)
            return True

    def _fail_guarded(self, c, run_id, pass_id, now, error):
        """Fail the run with its tree; if even that raises (a bug, data it cannot read), fail
        the run alone, so that it at least ends."""
        try:
            with self.store.savepoint(c):
                self.finish(c, run_id, pass_id, "failed", now, error=error)
            return
        except Exception as exc:
            if _is_outage(exc):
                raise
            log.exception("run %s: ending it failed; it is failed on its own", run_id)
            error = dict(error, message="%s (ending its tree failed too, %s: %s; its children and "
                         "parent were not told)" % (error["message"],
                                                    type(exc).__name__, exc))
        c.execute("UPDATE runs SET status = 'failed', error = ?, pass_id = NULL, "
                  "lease_owner = NULL, lease_expires_at = NULL, available_at = NULL, "
                  "wake_at = NULL, held_since = NULL, finished_at = ?, updated_at = ? "
                  "WHERE id = ?",
                  (dumps(error), now, now, run_id))
        self._interrupt_steps(c, run_id)
        self.journal(c, run_id, pass_id, "failed", {"error": error}, now)
        self.store.flow.begun(c, run_id, now)
        wf = c.execute("SELECT workflow_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        self.count(c, "failed", wf[0])

    def set_aside(self, c, run_id, now, exc):
        """Handling the run raised unexpectedly (a bug, data the code cannot read): it is tried
        again after a backoff, and failed with the error after PASS_RETRY tries in a row. One run
        can neither stop a scheduler nor keep it busy."""
        log.error("run %s: the scheduler failed while handling it", run_id, exc_info=exc)
        row = c.execute("SELECT status, pass_id, pass_failures, passes FROM runs WHERE id = ?",
                        (run_id,)).fetchone()
        if row is None or row[0] in TERMINAL:
            return
        what = "%s: %s" % (type(exc).__name__, str(exc)[:500])
        failures = row[2] + 1
        if failures >= PASS_RETRY["max_attempts"]:
            self._fail_guarded(c, run_id, row[1], now, {
                "message": "the scheduler failed %d times in a row while handling this run (%s); "
                           "this is a bug in ty-openworkflow or data it cannot read: report it, "
                           "and `retry` the run once it is fixed" % (failures, what),
                "name": "SidecarError", "stack": None})
            return
        due = now + backoff_ms(PASS_RETRY, failures)
        c.execute("UPDATE runs SET status = CASE status WHEN 'running' THEN 'pending' ELSE "
                  "status END, pass_failures = ?, available_at = ?, pass_id = NULL, "
                  "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                  (failures, due, now, run_id))
        self._interrupt_steps(c, run_id)
        self.journal(c, run_id, row[1], "set_aside", {"error": what, "retry_at": due}, now)
        self.note_last_pass(c, run_id, row[3], "the scheduler failed while handling the run (%s); "
                            "tried again at %s" % (what, format_time(due)), now)

    @staticmethod
    def _interrupt_steps(c, run_id):
        c.execute("UPDATE steps SET status = 'interrupted' WHERE run_id = ? AND "
                  "status = 'running'", (run_id,))

    def cancel_tree(self, c, run_id, now, reason):
        """Cancel a run that is not finished, with its own unfinished children."""
        row = c.execute("SELECT status, pass_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row and row[0] not in TERMINAL:
            self.finish(c, run_id, row[1], "canceled",
                        now, error={"message": reason, "name": "Canceled",
                                    "stack": None})


class LeaseLedger(_StorePart):
    """Which scheduler runs what: claiming due runs, their leases, giving passes back."""

    def claim_due(self, owner, now, limit, lease_ms, exclude=()):
        """Atomically claim up to ``limit`` due runs for ``owner``; returns the claimed runs.

        Due: pending or sleeping runs whose time has come, and running runs whose
        scheduler is gone: proven dead on this host (at once), or silent past its
        lease where its pid proves nothing (another host, another PID namespace).
        A live scheduler of this host is never robbed, whatever the clocks say, and
        ``exclude`` (the runs the caller drives) is never claimed. Runs held back by
        their workflow's limits are admitted here, in the same transaction, as far as
        the limits let them (FlowLedger).
        """
        claimed = []
        with self.store.transaction() as c:
            holders = self.store.registry.holders(c)
            dead = [sid for sid, alive in holders.items() if alive is False]
            live = [sid for sid, alive in holders.items() if alive is True and sid != owner]
            due = c.execute(*self._due_query(now, dead, live, limit + len(exclude))).fetchall()
            limits = self.store.flow.limits_in(c)
            admissible = self.store.flow.admissible(c, now, limits, limit) if limits else ()
            for run_id, status, holder, admit in self.store.flow.in_turn(due, admissible):
                if run_id in exclude or len(claimed) >= limit:
                    continue
                if status == "running" and holder != owner and holders.get(holder) is True:
                    # alive on this host: its lease only looks expired (a stall, a clock jump)
                    continue
                try:
                    with self.store.savepoint(c):
                        run = self._claim_one(c, run_id, status, owner, now, lease_ms, admit,
                                              limits)
                except Exception as exc:
                    if _is_outage(exc):
                        raise
                    self.store.runs.set_aside(c, run_id, now, exc)
                    continue
                if run is not None:
                    claimed.append(run)
            for sid in dead:  # a dead scheduler's row goes once nothing it held is left
                if not c.execute("SELECT 1 FROM runs WHERE lease_owner = ? AND status = 'running' "
                                 "LIMIT 1",
                                 (sid,)).fetchone():
                    c.execute("DELETE FROM schedulers WHERE id = ?", (sid,))
        return claimed

    def _claim_one(self, c, run_id, status, owner, now, lease_ms, admit=False, limits=None):
        """Claim one due run (None: it ended instead: a deadline, a pass lost too often; or it
        is held back by its workflow's limits and ``admit`` is false). ``limits``: every
        workflow's, as this claim read them."""
        run = self.store.one(c, SQL_RUN, (run_id,))
        if run["held_since"] is not None and not admit:
            # Held back: due only to fail at its deadline (not yet: it waits on).
            if run["deadline_at"] is None or now < run["deadline_at"]:
                c.execute("UPDATE runs SET available_at = deadline_at WHERE id = ?", (run_id,))
                return None
        run["lost_pass_id"] = None
        run["was"] = status  # for the wake-lateness metric
        if status == "running":
            run["lost_pass_id"] = run["pass_id"]
            self.store.runs.journal(c, run_id, run["pass_id"], "lease_expired", {
                "owner": run["lease_owner"], "message": "its scheduler stopped; replaying"}, now)
            self.store.runs.note_last_pass(c, run_id, run["passes"], "lost: its scheduler stopped",
                                           now)
            # A pass that keeps taking its scheduler down must not be replayed forever.
            lost = run["pass_failures"] + 1
            c.execute("UPDATE runs SET pass_failures = ? WHERE id = ?", (lost, run_id))
            if lost >= PASS_RETRY["max_attempts"]:
                self.store.runs.finish(c, run_id, run["pass_id"], "failed", now, error={
                    "message": "the run's pass was lost %d times in a row (its scheduler stopped "
                               "each time)" % lost, "name": "PassLost", "stack": None})
                return None
        if run["deadline_at"] is not None and now >= run["deadline_at"]:
            self.store.runs.finish(c, run_id, run["pass_id"], "failed", now, error={
                "message": "the run passed its deadline (%s)" % format_time(run["deadline_at"]),
                "name": "DeadlineExceeded", "stack": None})
            return None
        if status == "waiting":
            self.store.waits.time_out_waits(c, run_id, now)
        pass_id = new_id("pass")
        # Its first pass (since made or retried) takes a slot of its workflow's concurrency.
        if run["admitted_at"] is None:
            c.execute(SQL_CLAIM_FIRST, (pass_id, owner, now + lease_ms, now, now, now, run_id))
        else:
            c.execute(SQL_CLAIM, (pass_id, owner, now + lease_ms, now, now, run_id))
        if admit:  # (an admitted run is of a workflow with limits)
            self.store.flow.started(c, limits[run["workflow_id"]], run_id, now)
        run.update(status="running", pass_id=pass_id, lease_owner=owner, passes=run["passes"] + 1)
        if run["passes"] == 1 and run["task_requested"]:
            self.store.outbox.enqueue(c, run_id, "processing", None, now)
        self.store.runs.journal(c, run_id, pass_id, "pass_started",
                                {"pass": run["passes"], "owner": owner},
                                now)
        return run

    @staticmethod
    def _due_query(now, dead, live, limit):
        """SQL and parameters of the due runs: a dead holder's due at once, a live one's never."""
        running = "lease_expires_at < ?"
        params = [now, now]
        if dead:
            running = "(%s OR lease_owner IN (%s))" % (running, ",".join("?" * len(dead)))
            params += dead
        if live:
            running += " AND lease_owner NOT IN (%s)" % ",".join("?" * len(live))
            params += live
        sql = SQL_DUE_RUNS.replace("lease_expires_at < ?", running, 1)
        return sql, params + [limit]

    def next_due_at(self, now=None):
        """When the next run is due (one held by a live scheduler of this host is not due);
        given ``now``, also when a run held back by its workflow's limits may start."""
        try:
            with self.store.connection() as c:
                holders = self.store.registry.holders(c)
                live = [sid for sid, alive in holders.items() if alive is True]
                sql = SQL_NEXT_DUE
                if live:
                    sql = sql.replace("WHERE status = 'running'",
                                      "WHERE status = 'running' AND lease_owner NOT IN "
                                      "(%s)" % ",".join("?" * len(live)), 1)
                row = c.execute(sql, live).fetchone()
                held = None if now is None else self.store.flow.next_admission(c, now)
        except sqlite3.Error as exc:
            raise self.store.wrap(exc)
        due = row[0] if row else None
        return min([t for t in (due, held) if t is not None], default=None)

    def renew_leases(self, owner, pass_ids, until):
        """Extend the leases of our passes; returns the pass ids we no longer hold."""
        lost = []
        with self.store.transaction() as c:
            for run_id, pass_id in pass_ids:
                n = c.execute("UPDATE runs SET lease_expires_at = ? WHERE id = ? AND pass_id = ? "
                              "AND lease_owner = ? AND status = 'running'",
                              (until, run_id, pass_id, owner)).rowcount
                if n == 0:
                    lost.append(pass_id)
        return lost

    def pass_is_current(self, run_id, pass_id, now=None):
        """True while ``pass_id`` is the run's pass in flight (and, given ``now``, its lease
        holds)."""
        row = self.store.query_one("SELECT lease_expires_at FROM runs WHERE id = ? AND pass_id = ? "
                                   "AND status = 'running'",
                                   (run_id, pass_id))
        if row is None:
            return False
        return now is None or row["lease_expires_at"] is None or row["lease_expires_at"] >= now

    def release(self, run_id, pass_id, now, reason="scheduler stopping", due=None):
        """Give back a pass we stopped (shutdown, a lost lease, a platform not ready yet): the run
        is due again at once (or at ``due``), no attempt lost."""
        with self.store.transaction() as c:
            return self._released(c, run_id, pass_id, now, reason, due)

    def _released(self, c, run_id, pass_id, now, reason, due=None):
        n = c.execute("UPDATE runs SET status = 'pending', pass_id = NULL, lease_owner = NULL, "
                      "lease_expires_at = NULL, available_at = ?, updated_at = ? "
                      "WHERE id = ? AND pass_id = ? AND status = 'running'",
                      (now if due is None else due, now, run_id, pass_id)).rowcount
        if n:
            c.execute("UPDATE steps SET status = 'interrupted' "
                      "WHERE run_id = ? AND status = 'running'", (run_id,))
            self.store.runs.journal(c, run_id, pass_id, "released", {"message": reason}, now)
            passes = c.execute("SELECT passes FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            self.store.runs.note_last_pass(c, run_id, passes, "released: %s" % reason, now)
        return bool(n)

    def spare(self, run_id, pass_id, now, policy, message, isolate=True):
        """The pass's shared worker died under it by another pass's doing: it is given back, due
        now, with no attempt counted. ``isolate`` (whose doing is not known): the run's passes
        run alone from then on, and a pass of a run already alone owns its death."""
        with self.store.transaction() as c:
            row = c.execute("SELECT status, pass_id, isolated FROM runs WHERE id = ?",
                            (run_id,)).fetchone()
            if row is None or row[0] != "running" or row[1] != pass_id:
                return False
            if isolate and row[2]:
                return self.store.passes.end_pass(c, run_id, pass_id, now, policy, message)
            self._uncount(c, run_id)
            c.execute("UPDATE runs SET isolated = max(isolated, ?) WHERE id = ?",
                      (1 if isolate else 0, run_id))
            why = ("the run's passes run alone from now on" if isolate
                   else "another pass in its shared warm worker caused it")
            return self._released(c, run_id, pass_id, now, "%s (not counted: %s)" % (message, why))

    @staticmethod
    def _uncount(c, run_id):
        """The steps the pass had started start again: that attempt is not counted."""
        cut = c.execute("UPDATE steps SET attempts = max(attempts - 1, 0) "
                        "WHERE run_id = ? AND status = 'running' AND kind = 'step'",
                        (run_id,)).rowcount
        c.execute("UPDATE runs SET step_attempts = max(step_attempts - ?, 0) WHERE id = ?",
                  (cut, run_id))

    def platform_end(self, run_id, pass_id, now, policy, message, verdict, certain=False):
        """The platform ended the runtime under the pass (a Worker's CPU limit, a runtime
        restart); ``verdict`` names the likely limit and its fix in one line.

        Ends at one point of the run (the same steps done, the same ones in flight) are
        counted in its last pass's record: the first is given back uncounted (a restart
        does it too), unless ``certain``; later ones are failed attempts; the
        PLATFORM_ENDS_MAX-th fails the run with the verdict."""
        with self.store.transaction() as c:
            row = c.execute("SELECT status, pass_id, done_count, last_pass FROM runs WHERE id = ?",
                            (run_id,)).fetchone()
            if row is None or row[0] != "running" or row[1] != pass_id:
                return False
            inflight = [r[0] for r in c.execute(
                "SELECT key FROM steps WHERE run_id = ? AND status = 'running' AND kind = 'step' "
                "ORDER BY key", (run_id,))]
            point = "%d:%s" % (row[2], json.dumps(inflight))
            last = loads_or_none(row[3]) or {}
            ends = (last.get("ends") or 0) + 1 if last.get("point") == point else 1
            if ends >= PLATFORM_ENDS_MAX:
                self.store.runs.finish(c, run_id, pass_id, "failed", now, error={
                    "message": "%s (the pass was ended %d times at the same point)"
                               % (verdict, ends), "name": "PlatformLimit", "stack": None})
                return True
            if ends == 1 and not certain:
                self._uncount(c, run_id)
                self._released(c, run_id, pass_id, now, "%s (not counted: a runtime restart of "
                               "the platform ends a pass so too; another end at the same point "
                               "counts)" % message)
            else:
                self.store.passes.end_pass(c, run_id, pass_id, now, policy,
                                           "%s; %s" % (message, verdict))
            self.store.runs.amend_last_pass(c, run_id, ends=ends, point=point)
            return True


FlowLimits = collections.namedtuple("FlowLimits",
                                    "workflow_id concurrency per_key rate_count rate_window_ms")

SQL_LIMITS = "SELECT workflow_id, concurrency, per_key, rate_count, rate_window_ms FROM flow_limits"
# A workflow's runs that hold a slot: started (a first pass claimed) and not finished.
SQL_ACTIVE = "workflow_id = ? AND admitted_at IS NOT NULL AND finished_at IS NULL"
SQL_KEY_COUNTS = ("SELECT concurrency_key, count(*) FROM runs WHERE " + SQL_ACTIVE +
                  " AND concurrency_key IS NOT NULL GROUP BY concurrency_key")
SQL_FULL_KEYS = ("SELECT concurrency_key FROM runs WHERE " + SQL_ACTIVE +
                 " AND concurrency_key IS NOT NULL GROUP BY concurrency_key HAVING count(*) >= ?")
# A workflow's held runs in the order they are admitted (%s: more conditions): higher priority
# first, then the longest held, then the first made (rowid: runs made in one ms keep their order).
SQL_HELD = ("SELECT id, concurrency_key, held_since FROM runs WHERE workflow_id = ? AND "
            "held_since IS NOT NULL %s ORDER BY priority DESC, held_since, rowid LIMIT ?")
SQL_HELD_AHEAD = ("SELECT count(*) FROM runs WHERE workflow_id = ? AND held_since IS NOT NULL "
                  "AND (priority > ? OR (priority = ? AND (held_since < ? OR (held_since = ? "
                  "AND rowid < (SELECT rowid FROM runs WHERE id = ?)))))")
# The starts a rate window counts: those in it, and those whose first step has not begun.
SQL_STARTS = ("SELECT count(*) FROM flow_starts WHERE workflow_id = ? AND (at > ? OR "
              "begun = 0)")
SQL_NTH_START = ("SELECT at FROM flow_starts WHERE workflow_id = ? AND at > ? AND begun = 1 "
                 "ORDER BY at LIMIT 1 OFFSET ?")
SQL_LIMITS_REPORT = (
    "SELECT l.workflow_id, l.concurrency, l.per_key, l.rate_count, l.rate_window_ms, "
    "l.updated_at, (SELECT count(*) FROM runs r WHERE r.workflow_id = l.workflow_id AND "
    "r.admitted_at IS NOT NULL AND r.finished_at IS NULL) AS active, (SELECT count(*) FROM "
    "runs r WHERE r.workflow_id = l.workflow_id AND r.held_since IS NOT NULL) AS queued "
    "FROM flow_limits l")


# A rate window held by a start whose first step has not begun: a scheduler looks again this
# often (a pass's first event marks it begun in another transaction, with no wake-up).
RATE_RECHECK_MS = 250


# A run's ancestors, its parent first (up to 1,000 levels: limits.max_child_depth is lower).
SQL_ANCESTORS = ("WITH RECURSIVE up(id, n) AS (SELECT parent_run_id, 1 FROM runs WHERE id = ? "
                 "UNION ALL SELECT r.parent_run_id, up.n + 1 FROM runs r JOIN up ON r.id = up.id "
                 "WHERE r.parent_run_id IS NOT NULL AND up.n < 1000) SELECT id FROM up "
                 "WHERE id IS NOT NULL")


def _rate_span(window_ms):
    """How long a start counts against its rate window: the window and a slack (constants)."""
    return window_ms + min(window_ms // 20, RATE_SLACK_MAX_MS)


def _some_ids(ids, total):
    return ", ".join(ids) + (", ..." if total > len(ids) else "")


class FlowLedger(_StorePart):
    """Flow control: each workflow's limits, the runs they hold back, and which of those a
    claim admits, in the claim's own transaction (so they hold across schedulers and crashes).

    A held run is pending with held_since set and due only at its deadline; a claim
    admits it (clears held_since, sets admitted_at) when its workflow's limits let it."""

    def set_limits(self, workflow_id, concurrency, per_key, rate, now):
        """Set a workflow's limits (all None: none; ``rate``: (count, window ms)); its runs not
        started yet are held back or let go to match. Returns how many are held or let go."""
        with self.store.transaction() as c:
            if not c.execute("SELECT 1 FROM workflows WHERE id = ?", (workflow_id,)).fetchone():
                raise NotFound("no workflow %r; deploy it first with `ty-openworkflow deploy %s "
                               "-f FILE`" % (workflow_id, workflow_id))
            before = self.limits_in(c).get(workflow_id)
            if concurrency is None and per_key is None and rate is None:
                c.execute("DELETE FROM flow_limits WHERE workflow_id = ?", (workflow_id,))
                c.execute("DELETE FROM flow_starts WHERE workflow_id = ?", (workflow_id,))
                # Let go: due at once, in the order they were held.
                return c.execute("UPDATE runs SET available_at = held_since, held_since = NULL "
                                 "WHERE workflow_id = ? AND held_since IS NOT NULL",
                                 (workflow_id,)).rowcount
            count, window_ms = rate or (None, None)
            c.execute("INSERT OR REPLACE INTO flow_limits (workflow_id, concurrency, per_key, "
                      "rate_count, rate_window_ms, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                      (workflow_id, concurrency, per_key, count, window_ms, now))
            if rate is None:
                c.execute("DELETE FROM flow_starts WHERE workflow_id = ?", (workflow_id,))
            elif before is None or before.rate_count is None:
                # The starts already in the window count from now on.
                c.execute("INSERT INTO flow_starts (workflow_id, run_id, at, begun) SELECT "
                          "workflow_id, id, admitted_at, 1 FROM runs WHERE workflow_id = ? AND "
                          "admitted_at > ?", (workflow_id, now - _rate_span(window_ms)))
            if before is None:
                # Its runs not started yet wait for a claim to admit them.
                c.execute("UPDATE runs SET held_since = COALESCE(available_at, ?), available_at "
                          "= deadline_at WHERE workflow_id = ? AND status = 'pending' AND "
                          "admitted_at IS NULL AND held_since IS NULL", (now, workflow_id))
            return c.execute("SELECT count(*) FROM runs WHERE workflow_id = ? AND held_since IS "
                             "NOT NULL", (workflow_id,)).fetchone()[0]

    def limits(self, workflow_id=None):
        """Every workflow's limits (or one's), with how many of its runs are active and held."""
        if workflow_id is None:
            return self.store.query(SQL_LIMITS_REPORT + " ORDER BY l.workflow_id")
        return self.store.query(SQL_LIMITS_REPORT + " WHERE l.workflow_id = ?", (workflow_id,))

    @staticmethod
    def limits_in(c):
        """Every workflow's limits, read through ``c``: {workflow id: FlowLimits} ({}: none)."""
        return {row[0]: FlowLimits(*row) for row in c.execute(SQL_LIMITS)}

    @staticmethod
    def entry(c, workflow_id, now, deadline_at):
        """(available_at, held_since) of a run that is to start now, in transaction ``c``: with
        limits on its workflow, held back (due only at its deadline) until a claim admits it."""
        if c.execute("SELECT 1 FROM flow_limits WHERE workflow_id = ?", (workflow_id,)).fetchone():
            return deadline_at, now
        return now, None

    # -- admission: in the claim's transaction ------------------------------------

    def admissible(self, c, now, limits, room):
        """Held runs that may start now, at most ``room`` a workflow: [(turn, run id)], each
        workflow's best first (higher priority, then held longest), turn the time it takes its
        turn at among the due runs. Any first few of one workflow's keep its limits."""
        out = []
        for lim in limits.values():
            free, keys = self._room(c, lim, now)
            take = min(free, room)
            if take <= 0:
                continue
            more, params = "", [lim.workflow_id]
            if lim.per_key:  # a full key's runs are not even looked at
                more = "AND (concurrency_key IS NULL OR concurrency_key NOT IN (%s))" % (
                    SQL_FULL_KEYS)
                params += [lim.workflow_id, lim.per_key]
            taken = []
            for run_id, key, held_since in c.execute(SQL_HELD % more, params + [
                    take * 4 if lim.per_key else take]).fetchall():
                if lim.per_key and key is not None:
                    if keys.get(key, 0) >= lim.per_key:
                        continue
                    keys[key] = keys.get(key, 0) + 1
                taken.append((run_id, held_since))
                if len(taken) == take:
                    break
            turns = sorted(held_since for _, held_since in taken)
            out += [(turn, run_id) for turn, (run_id, _) in zip(turns, taken)]
        return out

    def _room(self, c, lim, now):
        """(how many more runs of the workflow may start now, its active runs per key)."""
        free = PRIORITY_BOUND  # no bound of its own
        if lim.concurrency:
            free = lim.concurrency - c.execute("SELECT count(*) FROM runs WHERE " + SQL_ACTIVE,
                                               (lim.workflow_id,)).fetchone()[0]
        if lim.rate_count and free > 0:
            free = min(free, lim.rate_count - self._starts(c, lim, now)[0])
        keys = {}
        if lim.per_key and free > 0:
            keys = dict(c.execute(SQL_KEY_COUNTS, (lim.workflow_id,)).fetchall())
        return free, keys

    @staticmethod
    def _starts(c, lim, now):
        """(the workflow's starts its rate window counts now, when one more may start: None
        until a run's first step begins)."""
        since = now - _rate_span(lim.rate_window_ms)
        n = c.execute(SQL_STARTS, (lim.workflow_id, since)).fetchone()[0]
        if n < lim.rate_count:
            return n, now
        oldest = c.execute(SQL_NTH_START, (lim.workflow_id, since, n - lim.rate_count)).fetchone()
        if oldest is None:  # a start that has not begun its first step holds the window: when
            return n, now + RATE_RECHECK_MS  # it begins is not known yet, so look again soon
        return n, oldest[0] + _rate_span(lim.rate_window_ms)

    @staticmethod
    def in_turn(due, admissible):
        """The due rows (id, status, holder, available_at) and the admissible runs, merged by
        when each became due: (id, status, holder, admit) in the order to claim them."""
        if not admissible:
            return [(row[0], row[1], row[2], False) for row in due]
        due_ids = {row[0] for row in due}  # a held run due for its deadline is failed, not admitted
        admissible = [(turn, run_id) for turn, run_id in admissible if run_id not in due_ids]
        turns = [(_NEVER_BEFORE if row[3] is None else row[3], i, (row[0], row[1], row[2], False))
                 for i, row in enumerate(due)]
        turns += [(turn, len(due) + i, (run_id, "pending", None, True))
                  for i, (turn, run_id) in enumerate(admissible)]
        return [row for _, _, row in sorted(turns)]

    @staticmethod
    def started(c, lim, run_id, now):
        """A held run of the workflow with limits ``lim`` was admitted: one more start in its
        rate window."""
        if lim.rate_count is not None:
            c.execute("DELETE FROM flow_starts WHERE workflow_id = ? AND at <= ? AND begun = 1",
                      (lim.workflow_id, now - _rate_span(lim.rate_window_ms)))
            c.execute("INSERT INTO flow_starts (workflow_id, run_id, at) VALUES (?, ?, ?)",
                      (lim.workflow_id, run_id, now))
            c.execute("UPDATE runs SET start_pending = 1 WHERE id = ?", (run_id,))

    @staticmethod
    def begun(c, run_id, now):
        """The run's first step began (or it ended first): its start's window runs from now."""
        c.execute("UPDATE flow_starts SET at = max(at, ?), begun = 1 WHERE run_id = ? AND "
                  "begun = 0", (now, run_id))
        c.execute("UPDATE runs SET start_pending = 0 WHERE id = ? AND start_pending = 1",
                  (run_id,))

    def admission_due(self, now):
        """Whether a held run may start now (a scheduler that leaves hands it over)."""
        with self.store.connection() as c:
            return self.next_admission(c, now) == now

    def next_admission(self, c, now):
        """When a held run may start next: ``now``, the end of a rate window, or None (a run
        must end first: the scheduler that ends it goes again at once; `cancel` pokes all)."""
        limits = self.limits_in(c)
        if not limits:
            return None
        if self.admissible(c, now, limits, 1):
            return now
        later = [self._starts(c, lim, now)[1] for lim in limits.values() if lim.rate_count and (
            c.execute(SQL_HELD % "", (lim.workflow_id, 1)).fetchone())]
        later = [t for t in later if t is not None and t > now]
        return min(later, default=None)

    # -- why a run waits: status, list, the dashboard, /metrics ----------------------

    def why_held(self, run, now):
        """Why a held run waits (None if it is not held): reason (a sentence), limit, ahead."""
        if run["held_since"] is None or run["status"] != "pending":
            return None
        with self.store.connection() as c:
            lim = self.limits_in(c).get(run["workflow_id"])
            note = self._reason(c, lim, self._state(c, lim, now), run["concurrency_key"])
            if note["limit"] == "concurrency" and run["parent_run_id"]:
                note = self._own_ancestors(c, run, lim, note)
            note["ahead"] = c.execute(SQL_HELD_AHEAD, (
                run["workflow_id"], run["priority"], run["priority"], run["held_since"],
                run["held_since"], run["id"])).fetchone()[0]
        return dict(note, since=run["held_since"], priority=run["priority"],
                    key=run["concurrency_key"])

    @staticmethod
    def _own_ancestors(c, run, lim, note):
        """A child held only by its own ancestors, which wait for it, never starts: say so."""
        active = [r[0] for r in c.execute("SELECT id FROM runs WHERE " + SQL_ACTIVE + " LIMIT ?",
                                          (run["workflow_id"], lim.concurrency + 1))]
        ancestors = {r[0] for r in c.execute(SQL_ANCESTORS, (run["id"],))}
        if not active or not set(active) <= ancestors:
            return note
        return dict(note, deadlock=True, reason=note["reason"] + (
            "; all of them are this run's own parents, waiting for it: it cannot start until "
            "`limits %s --concurrency` is raised above %d" % (run["workflow_id"], len(active))))

    def queue_notes(self, runs, now):
        """{run id: why it waits} for the held runs among ``runs`` (rows of runs)."""
        held = [r for r in runs if r["held_since"] is not None and r["status"] == "pending"]
        if not held:
            return {}
        notes, states, seen = {}, {}, {}
        with self.store.connection() as c:
            limits = self.limits_in(c)
            for r in held:
                wf, key = r["workflow_id"], r["concurrency_key"]
                if wf not in states:
                    states[wf] = self._state(c, limits.get(wf), now)
                if (wf, key) not in seen:  # the same for every held run of a key
                    seen[(wf, key)] = self._reason(c, limits.get(wf), states[wf], key)
                notes[r["id"]] = seen[(wf, key)]
        return notes

    def queued_counts(self, now):
        """How many runs are held, by (workflow, the limit that holds them: "concurrency",
        "per_key", "rate", or "next_claim" when none does and a claim will admit them)."""
        out = collections.Counter()
        with self.store.connection() as c:
            limits = self.limits_in(c)
            groups = c.execute("SELECT workflow_id, concurrency_key, count(*) FROM runs WHERE "
                               "held_since IS NOT NULL GROUP BY workflow_id, "
                               "concurrency_key").fetchall()
            states = {}
            for wf, key, n in groups:
                if wf not in states:
                    states[wf] = self._state(c, limits.get(wf), now)
                note = self._reason(c, limits.get(wf), states[wf], key, ids=False)
                out[(wf, note["limit"] or "next_claim")] += n
        return out

    def _state(self, c, lim, now):
        """What holds a workflow's runs back now: its active runs, per key, its starts."""
        if lim is None:
            return None
        wf = lim.workflow_id
        active = c.execute("SELECT id FROM runs WHERE " + SQL_ACTIVE + " ORDER BY admitted_at "
                           "LIMIT 3", (wf,)).fetchall()
        state = {"active": c.execute("SELECT count(*) FROM runs WHERE " + SQL_ACTIVE,
                                     (wf,)).fetchone()[0],
                 "runs": [r[0] for r in active], "keys": {}, "starts": 0, "next_at": None}
        if lim.per_key:
            state["keys"] = dict(c.execute(SQL_KEY_COUNTS, (wf,)).fetchall())
        if lim.rate_count:
            state["starts"], state["next_at"] = self._starts(c, lim, now)
        return state

    @staticmethod
    def _reason(c, lim, state, key, ids=True):
        """Why a held run of key ``key`` waits, given its workflow's limits and ``state``."""
        if lim is None:
            return {"limit": None, "reason": "queued: admitted at the next claim",
                    "short": "queued: next claim"}
        wf, active = lim.workflow_id, state["active"]
        if lim.concurrency and active >= lim.concurrency:
            return {"limit": "concurrency", "active": active, "of": lim.concurrency,
                    "runs": state["runs"],
                    "reason": "queued: %d of %d active runs of %s (%s)" % (
                        active, lim.concurrency, wf, _some_ids(state["runs"], active)),
                    "short": "queued: %d/%d active" % (active, lim.concurrency)}
        per_key = state["keys"].get(key, 0) if key is not None else 0
        if lim.per_key and key is not None and per_key >= lim.per_key:
            runs = [r[0] for r in c.execute(
                "SELECT id FROM runs WHERE " + SQL_ACTIVE + " AND concurrency_key = ? ORDER BY "
                "admitted_at LIMIT 3", (wf, key))] if ids else []
            return {"limit": "per_key", "active": per_key, "of": lim.per_key, "runs": runs,
                    "reason": "queued: %d of %d active runs of %s with key %r (%s)" % (
                        per_key, lim.per_key, wf, key, _some_ids(runs, per_key)),
                    "short": "queued: key %d/%d active" % (per_key, lim.per_key)}
        if lim.rate_count and state["starts"] >= lim.rate_count:
            window = format_rate(lim.rate_count, lim.rate_window_ms).split("/", 1)[1]
            return {"limit": "rate", "active": state["starts"], "of": lim.rate_count,
                    "next_at": state["next_at"],
                    "reason": "queued: %d of %d starts of %s in %s; the next %s" % (
                        state["starts"], lim.rate_count, wf, window,
                        "at " + format_time(state["next_at"]) if state["next_at"]
                        else "a window after a started run's first step"),
                    "short": "queued: %d/%d starts in %s" % (state["starts"], lim.rate_count,
                                                              window)}
        return {"limit": None, "active": active, "of": lim.concurrency,
                "reason": "queued: admitted at the next claim (%d%s active runs of %s)" % (
                    active, " of %d" % lim.concurrency if lim.concurrency else "", wf),
                "short": "queued: next claim"}


class PassLedger(_StorePart):
    """What a pass tells: its history to replay, its events applied, its end and retries."""

    def history(self, run_id):
        """The history a pass replays: outputs, sleep wake times, attempts, resolution order."""
        steps, sleeps, attempts, order, calls, waits, waiting = {}, {}, {}, [], [], {}, {}
        for row in self.store.query("SELECT key, kind, status, output, wake_at, attempts, "
                                    "done_seq, call_seq FROM steps WHERE run_id = ? ORDER BY "
                                    "done_seq IS NULL, done_seq, seq", (run_id,)):
            if row["call_seq"] is not None:
                calls.append([row["call_seq"], row["key"], row["kind"]])
            key, kind, status = row["key"], row["kind"], row["status"]
            if kind == "sleep":
                sleeps[key] = row["wake_at"]
            elif kind == "wait":
                if status == "completed":
                    waits[key] = json.loads(row["output"])
                else:
                    waiting[key] = row["wake_at"]
            elif status == "completed":
                steps[key] = json.loads(row["output"])
            if row["attempts"]:
                attempts[key] = row["attempts"]
            if row["done_seq"] is not None:
                order.append(key)
        calls.sort()
        return {"steps": steps, "sleeps": sleeps, "attempts": attempts, "order": order,
                "calls": calls,
                "waits": waits, "waiting": waiting}

    def apply_event(self, run_id, pass_id, ev, now, policy):
        """Commit one pass event; returns APPLIED, IGNORED (stale pass) or ENDED (terminal)."""
        with self.store.transaction() as c:
            return self.apply_in(c, run_id, pass_id, ev, now, policy)

    def apply_events(self, run_id, pass_id, events, now, policy):
        """Commit events that arrived together in one transaction; returns (outcome, events used).

        Each is applied as apply_event would, in order, up to the first that ends
        the pass or is ignored: committing a batch at once is as durable as one by
        one, since none of them was acknowledged to anyone before its commit."""
        with self.store.transaction() as c:
            for i, ev in enumerate(events):
                outcome = self.apply_in(c, run_id, pass_id, ev, now, policy)
                if outcome != APPLIED:
                    return outcome, i + 1
            return APPLIED, len(events)

    # Events that record a step, a sleep or a wait: the first sight of one numbers it.
    RECORDING = frozenset(("step_started", "step_completed", "step_failed", "sleep", "wait"))

    def apply_in(self, c, run_id, pass_id, ev, now, policy):
        """Apply one event in transaction ``c`` with the handler of its kind (HANDLERS)."""
        row = c.execute("SELECT status, pass_id, step_attempts, deadline_at, step_count, passes, "
                        "start_pending FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None or row[0] != "running" or row[1] != pass_id:
            return IGNORED
        if row[6]:  # its first event since a rate limit admitted it: its start begins now
            self.store.flow.begun(c, run_id, now)
        cur = seq = None
        if ev["type"] in self.RECORDING:
            cur = c.execute("SELECT status FROM steps WHERE run_id = ? AND key = ?",
                            (run_id, ev.get("step"))).fetchone()
            if cur is None:
                if row[4] >= policy["max_steps"]:
                    self.store.runs.finish(c, run_id, pass_id, "failed", now, error={
                        "message": "the run reached %d steps and sleeps (limits.max_steps); "
                                   "stopped as a runaway (raise the limit if it really needs more)"
                                   % policy["max_steps"],
                        "name": "TooManySteps", "stack": None})
                    return ENDED
                seq = row[4] + 1
                c.execute("UPDATE runs SET step_count = ? WHERE id = ?", (seq, run_id))
        handler = self.HANDLERS.get(ev["type"])
        if handler is None:
            return APPLIED
        return handler(self, c, run_id, pass_id, ev, now, policy, row, cur, seq)

    # Each handler: (c, run_id, pass_id, ev, now, policy, the run's row, the step's status row
    # or None, the new step's seq or None) -> APPLIED or ENDED.

    def _on_step_started(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        if cur and cur[0] == "completed":
            return APPLIED
        key = ev.get("step")
        retry = ev.get("retry") if isinstance(ev.get("retry"), dict) else {}
        call = _call_position(ev)
        if cur:
            c.execute("UPDATE steps SET status = 'running', attempts = attempts + 1, retry = ?, "
                      "started_at = ?, error = NULL, call_seq = COALESCE(call_seq, ?) "
                      "WHERE run_id = ? AND key = ?", (dumps(retry), now, call, run_id, key))
        else:
            c.execute("INSERT INTO steps (run_id, key, kind, status, seq, retry, attempts, "
                      "started_at, call_seq) VALUES (?, ?, 'step', 'running', ?, ?, 1, ?, ?)",
                      (run_id, key, seq, dumps(retry), now, call))
        self.store.runs.journal(c, run_id, pass_id, "step_started",
                                {"step": key, "attempt": ev.get("attempt")}, now)
        if cur:  # a retry: these count towards the runaway cap, first attempts do not
            c.execute("UPDATE runs SET step_attempts = step_attempts + 1, updated_at = ? WHERE id "
                      "= ?", (now, run_id))
            if row[2] + 1 > policy["max_step_attempts"]:
                self.store.runs.finish(c, run_id, pass_id, "failed", now, error={
                    "message": "the run retried steps %d times, over limits.max_step_attempts "
                               "(%d); stopped as a runaway"
                               % (row[2] + 1, policy["max_step_attempts"]),
                    "name": "TooManyAttempts", "stack": None})
                return ENDED
        return APPLIED

    def _on_step_completed(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        if cur and cur[0] == "completed":
            return APPLIED  # memoized results are never overwritten
        key = ev.get("step")
        output = dumps(ev.get("output"))
        size = len(output.encode("utf-8"))
        if size > policy["max_output_bytes"]:
            failed = {"type": "step_failed", "step": key, "retryable": False, "oversized": True,
                      "error": {"message": "the output of step %r is %d bytes, over the limit of "
                                "%d bytes (limits.max_output_bytes)"
                                % (key, size, policy["max_output_bytes"]),
                                "name": "OutputTooLarge", "stack": None}}
            return self._on_step_failed(c, run_id, pass_id, failed, now, policy, row, cur, seq)
        done_seq = self._next_done(c, run_id)
        if cur:
            c.execute("UPDATE steps SET status = 'completed', output = ?, error = NULL, "
                      "completed_at = ?, done_seq = ? WHERE run_id = ? AND key = ?",
                      (output, now, done_seq, run_id, key))
        else:
            c.execute("INSERT INTO steps (run_id, key, kind, status, seq, output, attempts, "
                      "started_at, completed_at, done_seq) VALUES (?, ?, 'step', 'completed', ?, "
                      "?, 1, ?, ?, ?)",
                      (run_id, key, seq, output, now, now, done_seq))
        self.store.runs.journal(c, run_id, pass_id, "step_completed",
                                {"step": key, "output": ev.get("output")}, now)
        return APPLIED

    def _on_step_failed(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        key = ev.get("step")
        error = _clean_error(ev.get("error"))
        retryable = 0 if ev.get("retryable") is False else 1
        if cur is None:
            c.execute("INSERT INTO steps (run_id, key, kind, status, seq, attempts, started_at) "
                      "VALUES (?, ?, 'step', 'running', ?, 1, ?)", (run_id, key, seq, now))
        c.execute("UPDATE steps SET status = 'failed', error = ?, retryable = ? WHERE run_id = ? "
                  "AND key = ? AND status != 'completed'", (dumps(error), retryable, run_id, key))
        self.store.runs.journal(c, run_id, pass_id, "step_failed",
                                {"step": key, "error": error}, now)
        if ev.get("oversized"):
            # The shim believes the step succeeded: end the pass here, the run cannot go on.
            self._fail_pass(c, run_id, pass_id, now, policy, key, error, retryable=False,
                            workflow_error=False)
            return ENDED
        return APPLIED

    def _on_sleep(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        key, wake_at = ev.get("step"), ev.get("wake_at")
        if cur is None:
            c.execute("INSERT INTO steps (run_id, key, kind, status, seq, wake_at, started_at, "
                      "call_seq) VALUES (?, ?, 'sleep', 'sleeping', ?, ?, ?, ?)",
                      (run_id, key, seq, wake_at, now, _call_position(ev)))
            self.store.runs.journal(c, run_id, pass_id, "sleep", {"step": key, "wake_at": wake_at},
                                    now)
        return APPLIED

    def _on_wait(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        if cur is None:
            key, spec = ev.get("step"), dict(ev["wait"])
            c.execute("INSERT INTO steps (run_id, key, kind, status, seq, wake_at, started_at, "
                      "call_seq, wait) VALUES (?, ?, 'wait', 'waiting', ?, ?, ?, ?, ?)",
                      (run_id, key, seq, ev.get("timeout_at"), now, _call_position(ev),
                       dumps(spec)))
            self.store.runs.journal(c, run_id, pass_id, "wait", {
                "step": key, "wait": spec, "timeout_at": ev.get("timeout_at")}, now)
            self.store.waits.begin_wait(c, run_id, key, spec, now, policy)
        return APPLIED

    def _on_sleep_completed(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        key = ev.get("step")
        cur = c.execute("SELECT status FROM steps WHERE run_id = ? AND key = ? AND kind = 'sleep'",
                        (run_id, key)).fetchone()
        if cur and cur[0] != "completed":
            c.execute("UPDATE steps SET status = 'completed', completed_at = ?, done_seq = ? WHERE "
                      "run_id = ? AND key = ?", (now, self._next_done(c, run_id), run_id, key))
            self.store.runs.journal(c, run_id, pass_id, "sleep_completed", {"step": key}, now)
        return APPLIED

    def _on_completed(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        output = ev.get("output")
        size = len(dumps(output).encode("utf-8"))
        if size > policy["max_output_bytes"]:
            self.store.runs.finish(c, run_id, pass_id, "failed", now, error={
                "message": "the workflow's return value is %d bytes, over the limit of %d bytes "
                           "(limits.max_output_bytes)" % (size, policy["max_output_bytes"]),
                "name": "OutputTooLarge", "stack": None})
        else:
            self.store.runs.finish(c, run_id, pass_id, "completed", now, output=output)
        return ENDED

    def _on_suspended(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        waiting = bool(ev.get("waiting"))
        wake_at = None if ev.get("wake_at") is None and waiting else int(ev.get("wake_at") or now)
        due = min([t for t in (wake_at, row[3]) if t is not None], default=None)
        if c.execute("SELECT wake_pending FROM runs WHERE id = ?", (run_id,)).fetchone()[0]:
            due = now  # a wait resolved while this pass ran: go again at once
        if not waiting:
            reason = "suspended until %s" % format_time(wake_at)
        elif wake_at is None:
            reason = "waiting"
        else:
            reason = "waiting (at the latest until %s)" % format_time(wake_at)
        c.execute("UPDATE runs SET status = ?, wake_at = ?, available_at = ?, pass_id = NULL, "
                  "lease_owner = NULL, lease_expires_at = NULL, pass_failures = 0, updated_at = ?, "
                  "last_pass = ?, wake_pending = 0 WHERE id = ?",
                  ("waiting" if waiting else "sleeping", wake_at, due, now,
                   dumps({"pass": row[5], "ended_at": now, "reason": reason}), run_id))
        self.store.runs.journal(c, run_id, pass_id, "suspended",
                                {"wake_at": wake_at, "waiting": waiting}, now)
        return ENDED

    def _on_failed(self, c, run_id, pass_id, ev, now, policy, row, cur, seq):
        key = ev.get("step")
        self._fail_pass(c, run_id, pass_id, now, policy, key, _clean_error(ev.get("error")),
                        retryable=ev.get("retryable") is not False, workflow_error=not key)
        return ENDED

    HANDLERS = {"step_started": _on_step_started, "step_completed": _on_step_completed,
                "step_failed": _on_step_failed, "sleep": _on_sleep, "wait": _on_wait,
                "sleep_completed": _on_sleep_completed, "completed": _on_completed,
                "suspended": _on_suspended, "failed": _on_failed}

    @staticmethod
    def _next_done(c, run_id):
        """Take the next place in the run's resolution order (replay hands results back in it)."""
        n = c.execute("SELECT done_count FROM runs WHERE id = ?", (run_id,)).fetchone()[0] + 1
        # Progress was made: a pass that resolves something is not a lost pass.
        c.execute("UPDATE runs SET done_count = ?, pass_failures = 0 WHERE id = ?", (n, run_id))
        return n

    def end_pass_without_result(self, run_id, pass_id, now, policy, message):
        """The pass stopped with no terminal event (crash, kill, timeout): a failed attempt.

        Every step still in flight (several, with Promise.all) failed with it; the
        retry waits for the slowest of their backoffs, and a step whose attempts
        are spent fails the run.
        """
        with self.store.transaction() as c:
            return self.end_pass(c, run_id, pass_id, now, policy, message)

    def end_pass(self, c, run_id, pass_id, now, policy, message):
        """end_pass_without_result inside transaction ``c``."""
        row = c.execute("SELECT status, pass_id, passes FROM runs WHERE id = ?",
                        (run_id,)).fetchone()
        if row is None or row[0] != "running" or row[1] != pass_id:
            return False
        self.store.runs.note_last_pass(c, run_id, row[2], message, now)
        inflight = [r[0] for r in c.execute(
            "SELECT key FROM steps WHERE run_id = ? AND status = 'running' AND kind = 'step' "
            "ORDER BY started_at DESC, seq DESC", (run_id,))]
        error = {"message": message, "name": "PassLost", "stack": None}
        for key in inflight:
            step_error = dict(error, message="%s while step %r was running" % (message, key))
            c.execute("UPDATE steps SET status = 'failed', error = ? WHERE run_id = ? AND key = ?",
                      (dumps(step_error), run_id, key))
            self.store.runs.journal(c, run_id, pass_id, "step_failed",
                                    {"step": key, "error": step_error},
                                    now)
        if not inflight:
            self._fail_pass(c, run_id, pass_id, now, policy, None, error, retryable=True,
                            workflow_error=False)
            return True
        # The step whose retry is due last decides; a spent one fails the run at once.
        plans = [(self._retry_plan(c, run_id, key, policy, now), key) for key in inflight]
        spent = [key for plan, key in plans if plan is None]
        key = spent[0] if spent else max(plans)[1]
        error = dict(error, message="%s while step %r was running" % (message, key))
        self._fail_pass(c, run_id, pass_id, now, policy, key, error, retryable=True,
                        workflow_error=False)
        return True

    def _retry_plan(self, c, run_id, key, policy, now):
        """When step ``key`` may run again after a failure, or None if its attempts are spent."""
        srow = c.execute("SELECT attempts, retry, retryable FROM steps WHERE run_id = ? AND key = "
                         "?",
                         (run_id, key)).fetchone() or (1, None, 1)
        policy = self._policy(policy, srow[1])
        if not srow[2] or srow[0] >= policy["max_attempts"]:
            return None
        return now + backoff_ms(policy, srow[0])

    @staticmethod
    def _policy(policy, retry_json):
        policy = dict(policy["retry"])
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            policy.update({k: v for k, v in json.loads(retry_json or "{}").items() if k in policy})
        return policy

    def _fail_pass(self, c, run_id, pass_id, now, policy, step_key, error, retryable,
                   workflow_error):
        """Decide between a retry (back to pending with backoff) and failing the run."""
        if step_key:
            srow = c.execute("SELECT attempts, retry, retryable, error FROM steps WHERE run_id = ? "
                             "AND key = ?",
                             (run_id, step_key)).fetchone()
            if srow is None:
                srow = (1, None, 1, None)
            policy = self._policy(policy, srow[1])
            attempts, step_error = srow[0], json.loads(srow[3]) if srow[3] else error
            if retryable and srow[2] and attempts < policy["max_attempts"]:
                due = now + backoff_ms(policy, attempts)
                self._retry_later(c, run_id, pass_id, due, now,
                                  {"step": step_key, "attempt": attempts, "retry_at": due,
                                   "error": step_error})
                return
            step_error = dict(step_error)
            step_error["step"] = step_key
            step_error["attempts"] = attempts
            if srow[2] and retryable:
                step_error["message"] = "step %r failed after %d attempt%s: %s" % (
                    step_key, attempts, "" if attempts == 1 else "s", step_error.get("message"))
            else:
                step_error["message"] = "step %r failed: %s" % (step_key, step_error.get("message"))
            self.store.runs.finish(c, run_id, pass_id, "failed", now, error=step_error)
            return
        if workflow_error:
            self.store.runs.finish(c, run_id, pass_id, "failed", now, error=error)
            return
        failures = c.execute("SELECT pass_failures FROM runs WHERE id = "
                             "?", (run_id,)).fetchone()[0] + 1
        if failures < PASS_RETRY["max_attempts"]:
            due = now + backoff_ms(PASS_RETRY, failures)
            c.execute("UPDATE runs SET pass_failures = ? WHERE id = ?", (failures, run_id))
            self._retry_later(c, run_id, pass_id, due, now,
                              {"attempt": failures, "retry_at": due, "error": error})
            return
        error = dict(error)
        error["message"] = "the pass failed %d times in a row: %s" % (failures, error["message"])
        self.store.runs.finish(c, run_id, pass_id, "failed", now, error=error)

    def _retry_later(self, c, run_id, pass_id, due, now, data):
        deadline, passes, last = c.execute("SELECT deadline_at, passes, last_pass FROM runs WHERE "
                                           "id = ?",
                                           (run_id,)).fetchone()
        if deadline is not None:
            due = min(due, deadline)
        if data.get("step") and not (last and json.loads(last).get("pass") == passes):
            self.store.runs.note_last_pass(c, run_id, passes,
                                           "step %r failed (attempt %s); retry at %s"
                                           % (data["step"], data.get("attempt"), format_time(due)),
                                           now)
        c.execute("UPDATE runs SET status = 'pending', available_at = ?, pass_id = NULL, "
                  "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = "
                  "?", (due, now, run_id))
        self.store.runs.journal(c, run_id, pass_id, "retry_scheduled", data, now)


class WaitLedger(_StorePart):
    """Waits and what ends them: signals, child runs, TaskYou approvals, timeouts."""

    def begin_wait(self, c, run_id, key, spec, now, policy):
        """A new wait was recorded: a buffered signal resolves it at once; a child run starts."""
        if spec["kind"] == "child":
            refused = self._child_refused(c, run_id, spec, policy)
            if refused:
                error = {"message": refused, "name": "ChildLimitExceeded", "run_id": None}
                self.resolve(c, run_id, key, {"error": error}, now)
                return
        if spec["kind"] == "signal":
            sig = c.execute("SELECT id, data FROM signals WHERE run_id = ? AND name = ? AND "
                            "consumed_by IS NULL ORDER BY id LIMIT 1",
                            (run_id, spec["name"])).fetchone()
            if sig:
                c.execute("UPDATE signals SET consumed_by = ?, consumed_at = ? WHERE id = "
                          "?", (key, now, sig[0]))
                self.resolve(c, run_id, key, {"value": {"data": loads_or_none(sig[1])}}, now)
        elif spec["kind"] == "child":
            child = self._start_child(c, run_id, key, spec, now)
            if child is None:
                self.resolve(c, run_id, key, {"error": {
                    "message": "no workflow %r to run as a child; deploy it "
                               "first" % spec["workflow_id"],
                    "name": "NotFound", "run_id": None}}, now)
        elif spec["kind"] == "task":
            self.store.outbox.enqueue(c, run_id, "approval",
                                      {"key": key, "title": spec["title"],
                                       "body": spec.get("body")}, now)

    @staticmethod
    def _child_refused(c, run_id, spec, policy):
        """Why run ``run_id`` may not start another child, or None: limits.max_child_depth and
        limits.max_children bound what a cascade walks over, and stop a runaway recursion."""
        max_depth = policy.get("max_child_depth", CHILD_DEPTH_DEFAULT)
        depth = c.execute(SQL_RUN_DEPTH, (run_id, max_depth)).fetchone()[0] + 1
        if depth > max_depth:
            return ("cannot start a child run of %r: it would be %d levels below its root run, "
                    "over limits.max_child_depth (%d); a workflow that starts itself needs a case "
                    "that stops it (or raise the limit)" % (spec["workflow_id"], depth, max_depth))
        max_children = policy.get("max_children", CHILDREN_DEFAULT)
        open_children = c.execute("SELECT count(*) FROM (%s)" % SQL_OPEN_CHILDREN,
                                  (run_id,)).fetchone()[0]
        if open_children >= max_children:
            return ("cannot start a child run of %r: run %s already has %d unfinished child "
                    "runs, the limit (limits.max_children); wait for some to finish before "
                    "starting more (or raise the limit)"
                    % (spec["workflow_id"], run_id, open_children))
        return None

    def _start_child(self, c, run_id, key, spec, now):
        """Create the child run of wait ``key`` (once: the wait row is new) on its workflow's
        latest version."""
        wf = self.store.workflows.latest(c, spec["workflow_id"])
        if wf is None:
            return None
        child_id = self.store.runs.fresh_run_id(c)
        deadline_at = now + wf[1] if wf[1] else None
        available_at, held_since = self.store.flow.entry(c, spec["workflow_id"], now, deadline_at)
        key_, priority = spec.get("key"), spec.get("priority")
        if not (isinstance(key_, str) and 0 < len(key_) <= MAX_CONCURRENCY_KEY_LEN):
            key_ = None
        if not (isinstance(priority, int) and not isinstance(priority, bool)
                and -PRIORITY_BOUND <= priority < PRIORITY_BOUND):
            # not given (or not an integer): its parent's
            priority = c.execute("SELECT priority FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
        c.execute("INSERT INTO runs (id, workflow_id, version, status, input, available_at, "
                  "deadline_at, task_requested, created_at, updated_at, parent_run_id, "
                  "parent_wait_key, concurrency_key, priority, held_since) "
                  "VALUES (?, ?, ?, 'pending', ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)",
                  (child_id, spec["workflow_id"], wf[0], dumps(spec.get("input")), available_at,
                   deadline_at, now, now, run_id, key, key_, priority, held_since))
        self.store.runs.journal(c, child_id, None, "created",
                                {"workflow": spec["workflow_id"], "version": wf[0],
                                 "parent": run_id}, now)
        self.store.runs.count(c, "started", spec["workflow_id"])
        spec = dict(spec, run_id=child_id)
        c.execute("UPDATE steps SET wait = ? WHERE run_id = ? AND key = "
                  "?", (dumps(spec), run_id, key))
        return child_id

    def resolve(self, c, run_id, key, outcome, now):
        """Commit how a wait ended and wake its run; False if it had ended already."""
        n = c.execute("UPDATE steps SET status = 'completed', output = ?, completed_at = ?, "
                      "polled_at = NULL, done_seq = (SELECT done_count + 1 FROM runs WHERE id = ?) "
                      "WHERE run_id = ? AND key = ? AND kind = 'wait' AND status = 'waiting'",
                      (dumps(outcome), now, run_id, run_id, key)).rowcount
        if not n:
            return False
        c.execute("UPDATE runs SET done_count = done_count + 1 WHERE id = ?", (run_id,))
        self.store.runs.journal(c, run_id, None, "wait_resolved", dict(outcome, step=key), now)
        status = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
        if status == "running":
            c.execute("UPDATE runs SET wake_pending = 1 WHERE id = ?", (run_id,))
        elif status == "waiting":  # a pending run (a retry's backoff) sees it when its time comes
            c.execute("UPDATE runs SET available_at = ?, updated_at = ? WHERE id = "
                      "?", (now, now, run_id))
        return True

    def time_out_waits(self, c, run_id, now):
        """Resolve the run's waits whose timeout passed (a child's is canceled with it)."""
        for key, spec_json in c.execute("SELECT key, wait FROM steps WHERE run_id = ? AND kind = "
                                        "'wait' AND status = 'waiting' AND wake_at IS NOT NULL AND "
                                        "wake_at <= ?",
                                        (run_id, now)).fetchall():
            spec = loads_or_none(spec_json) or {}
            if spec.get("kind") == "child":
                self.resolve(c, run_id, key, {"error": {
                    "message": "child run %s of %s did not finish within its timeout" % (
                        spec.get("run_id"), spec.get("workflow_id")), "name": "ChildTimeout",
                    "run_id": spec.get("run_id")}}, now)
                if spec.get("run_id"):
                    self.store.runs.cancel_tree(c, spec["run_id"], now,
                                                "its parent stopped waiting for it (timeout)")
            else:
                self.resolve(c, run_id, key, {"value": None}, now)
                if spec.get("kind") == "task":
                    self.store.outbox.enqueue(c, run_id, "approval_end",
                                              {"key": key, "reason": "its timeout passed"}, now)

    def after_finish(self, c, run_id, status, now):
        """A finished run: its parent's wait resolves, its approvals end."""
        c.execute("UPDATE steps SET polled_at = NULL WHERE run_id = ? AND polled_at IS NOT NULL",
                  (run_id,))
        row = c.execute("SELECT r.parent_run_id, r.parent_wait_key, r.output, r.error, p.status "
                        "FROM runs r LEFT JOIN runs p ON p.id = r.parent_run_id "
                        "WHERE r.id = ?", (run_id,)).fetchone()
        # A finished parent keeps its wait open (a retry makes it anew).
        if row and row[0] and row[4] not in TERMINAL:
            if status == "completed":
                outcome = {"value": loads_or_none(row[2])}
            else:
                err = loads_or_none(row[3]) or {}
                outcome = {"error": {
                    "message": "child run %s %s: %s" % (run_id, status, err.get("message")),
                    "name": "ChildCanceled" if status == "canceled" else "ChildFailed",
                    "run_id": run_id}}
            self.resolve(c, row[0], row[1], outcome, now)
        for key, spec_json in c.execute("SELECT key, wait FROM steps WHERE run_id = ? AND kind = "
                                        "'wait' AND status = 'waiting'", (run_id,)).fetchall():
            if (loads_or_none(spec_json) or {}).get("kind") == "task":
                self.store.outbox.enqueue(c, run_id, "approval_end",
                                          {"key": key, "reason": "the run was %s" % status}, now)

    def signal(self, run_id, name, data_json, now, idempotency_key=None):
        """Deliver a signal: the oldest wait for ``name`` takes it, or it waits for one (FIFO).

        Returns (signal id, consumed by wait key or None, applied: False when the key was seen)."""
        with self.store.transaction() as c:
            return self.deliver(c, run_id, name, data_json, now, idempotency_key)

    def deliver(self, c, run_id, name, data_json, now, idempotency_key=None):
        """signal() inside transaction ``c``."""
        run = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if run is None:
            raise NotFound("no run %r; list runs with `ty-openworkflow list runs`" % run_id)
        if idempotency_key is not None:
            seen = c.execute("SELECT id, consumed_by FROM signals WHERE run_id = ? AND "
                             "idempotency_key = ?",
                             (run_id, idempotency_key)).fetchone()
            if seen:
                return seen[0], seen[1], False
        if run[0] in TERMINAL:
            raise Conflict("run %s is already %s; a signal to it would never be "
                           "read" % (run_id, run[0]))
        cur = c.execute("INSERT INTO signals (run_id, name, data, idempotency_key, created_at) "
                        "VALUES (?, ?, ?, ?, ?)", (run_id, name, data_json, idempotency_key, now))
        sig_id = cur.lastrowid
        self.store.runs.journal(c, run_id, None, "signal", {"name": name, "signal": sig_id}, now)
        wait = None
        for key, spec_json in c.execute("SELECT key, wait FROM steps WHERE run_id = ? AND kind = "
                                        "'wait' AND status = 'waiting' ORDER BY "
                                        "seq", (run_id,)).fetchall():
            spec = loads_or_none(spec_json) or {}
            if spec.get("kind") == "signal" and spec.get("name") == name:
                wait = key
                break
        if wait is not None:
            c.execute("UPDATE signals SET consumed_by = ?, consumed_at = ? WHERE id = "
                      "?", (wait, now, sig_id))
            self.resolve(c, run_id, wait, {"value": {"data": loads_or_none(data_json)}}, now)
        return sig_id, wait, True

    def set_wait_task(self, run_id, key, task_id, now):
        """Keep the TaskYou task a wait watches (and when it was last looked at: its turn to be
        polled comes again after every other open wait's)."""
        with self.store.transaction() as c:
            row = c.execute("SELECT s.wait, s.status = 'waiting' AND r.status NOT IN "
                            "('completed', 'failed', 'canceled') FROM steps s "
                            "JOIN runs r ON r.id = s.run_id "
                            "WHERE s.run_id = ? AND s.key = ? AND s.kind = 'wait'",
                            (run_id, key)).fetchone()
            if row:
                spec = dict(loads_or_none(row[0]) or {}, task_id=task_id, polled_at=now)
                c.execute("UPDATE steps SET wait = ?, polled_at = ? WHERE run_id = ? AND key = ?",
                          (dumps(spec), now if row[1] else None, run_id, key))

    def wait_open(self, run_id, key):
        """Whether the run still waits on ``key``."""
        return self.store.query_one("SELECT 1 AS x FROM steps s JOIN runs r ON r.id = s.run_id "
                                    "WHERE s.run_id = ? AND s.key = ? AND s.status = 'waiting' AND "
                                    "r.status NOT IN ('completed', 'failed', "
                                    "'canceled')", (run_id, key)) is not None

    def wait_task(self, run_id, key):
        """The TaskYou task id a wait watches, if it has one."""
        row = self.store.query_one("SELECT wait FROM steps WHERE run_id = ? AND key = "
                                   "?", (run_id, key))
        return (loads_or_none(row["wait"]) or {}).get("task_id") if row else None

    def approvals_due(self, now, every_ms, limit=APPROVAL_POLL_BATCH):
        """(run id, key, wait) of up to ``limit`` open task waits whose last look is older than
        ``every_ms``, the longest unlooked-at first: however many there are, each gets its turn."""
        out = []
        for r in self.store.query(SQL_APPROVALS_DUE, (now - every_ms, limit)):
            spec = loads_or_none(r["wait"]) or {}
            if spec.get("task_id") is not None:
                out.append((r["run_id"], r["key"], spec))
        return out

    def resolve_wait(self, run_id, key, outcome, now):
        """Commit how a wait ended and wake its run; False if it had ended already."""
        with self.store.transaction() as c:
            return self.resolve(c, run_id, key, outcome, now)

    def task_waits(self, task_id=None):
        """(run id, key, task id) of the open waits on TaskYou tasks (``task_id``: on that one)."""
        out = []
        for r in self.store.query(SQL_APPROVALS_DUE, (2 ** 62, APPROVAL_WATCH_MAX)):
            watched = (loads_or_none(r["wait"]) or {}).get("task_id")
            if watched is not None and (task_id is None or watched == task_id):
                out.append((r["run_id"], r["key"], watched))
        return out

    def poll_soon(self, run_id, key):
        """Have the next look at approvals include this wait (a change was heard of but the
        task did not show it yet)."""
        with self.store.transaction() as c:
            c.execute("UPDATE steps SET polled_at = 0 WHERE run_id = ? AND key = ? AND "
                      "polled_at IS NOT NULL", (run_id, key))

    def signals(self, run_id):
        """A run's signals, oldest first, with the waits that took them."""
        return self.store.query("SELECT id, name, data, created_at, consumed_by, consumed_at FROM "
                                "signals WHERE run_id = ? ORDER BY id", (run_id,))


class Outbox(_StorePart):
    """The TaskYou bridge outbox: updates queued with a run, delivered in order per run."""

    def enqueue(self, c, run_id, kind, payload, now):
        """Queue a TaskYou update of the run inside transaction ``c``."""
        c.execute("INSERT INTO outbox (run_id, kind, payload, next_at, created_at) VALUES (?, ?, "
                  "?, ?, ?)",
                  (run_id, kind, None if payload is None else dumps(payload), now, now))

    def claim_outbox(self, now, lease_ms, limit=20):
        """Claim the oldest undelivered item of each run whose turn it is (in order per run)."""
        with self.store.transaction() as c:
            cur = c.execute(
                "SELECT o.id, o.run_id, o.kind, o.payload, o.attempts, o.created_at FROM outbox o "
                "WHERE o.delivered_at IS NULL AND o.id = (SELECT MIN(id) FROM outbox WHERE run_id "
                "= o.run_id AND delivered_at IS NULL) AND o.next_at <= ? AND (o.lease_until IS "
                "NULL OR o.lease_until < ?) ORDER BY o.next_at, o.id LIMIT ?", (now, now, limit))
            items = [_row_dict(cur, r) for r in cur.fetchall()]
            for it in items:
                c.execute("UPDATE outbox SET lease_until = ?, attempts = attempts + 1 WHERE id = ?",
                          (now + lease_ms, it["id"]))
        return items

    def outbox_delivered(self, item_id, now, task_id=None, run_id=None):
        """An item reached TaskYou (a new task's id is linked to its run)."""
        with self.store.transaction() as c:
            c.execute("UPDATE outbox SET delivered_at = ?, lease_until = NULL, last_error = NULL "
                      "WHERE id = ?",
                      (now, item_id))
            if task_id is not None:
                c.execute("UPDATE runs SET task_id = ? WHERE id = ?", (task_id, run_id))
                self.store.runs.journal(c, run_id, None, "task_linked", {"task_id": task_id}, now)

    def outbox_failed(self, item_id, now, error, retry_at):
        """An item failed to reach TaskYou: it is tried again at ``retry_at``."""
        with self.store.transaction() as c:
            c.execute("UPDATE outbox SET lease_until = NULL, last_error = ?, next_at = ? WHERE id "
                      "= ?",
                      (error[:2000], retry_at, item_id))

    def next_outbox_at(self):
        """When the next undelivered item is due (None: nothing to deliver)."""
        row = self.store.query_one("SELECT MIN(next_at) AS t FROM outbox WHERE delivered_at IS "
                                   "NULL")
        return row["t"] if row else None

    def outbox_for_run(self, run_id):
        """A run's outbox items, oldest first."""
        return self.store.query("SELECT id, kind, delivered_at, attempts, next_at, last_error FROM "
                                "outbox WHERE run_id = ? ORDER BY id", (run_id,))


class NoticeBook(_StorePart):
    """Warnings said recently (a cron `tick` must not repeat one every minute)."""

    def notice_due(self, key, now, every_ms):
        """True (and noted) if warning ``key`` was not given within ``every_ms``."""
        with self.store.transaction() as c:
            row = c.execute("SELECT at FROM notices WHERE key = ?", (key,)).fetchone()
            if row and now - row[0] < every_ms:
                return False
            c.execute("INSERT OR REPLACE INTO notices (key, at) VALUES (?, ?)", (key, now))
            return True


# Replay-guard entries are kept this long; older callbacks fail the timestamp check anyway.
WEBHOOK_SEEN_KEEP_MS = 24 * 3600 * 1000


class CallbackBook(_StorePart):
    """Signed callbacks from remote compute: the replay guard, and applying one."""

    def seen(self, c, digest, now, keep_ms):
        """True if ``digest`` was recorded within ``keep_ms``."""
        return c.execute("SELECT 1 FROM webhook_seen WHERE digest = ? AND at >= ?",
                         (digest, now - keep_ms)).fetchone() is not None

    def mark_seen(self, c, digests, now, keep_ms):
        """Record applied callbacks (their signature and body digests); old entries expire."""
        c.execute("DELETE FROM webhook_seen WHERE at < ?", (now - keep_ms,))
        for digest, kind in digests:
            c.execute("INSERT OR REPLACE INTO webhook_seen (digest, kind, at) VALUES (?, ?, ?)",
                      (digest, kind, now))

    def apply_callback(self, kind, run_id, subject, payload, digests, now, policy,
                       max_input_bytes):
        """Apply one verified callback in one transaction; returns what it did (``applied``, and
        ``duplicate`` or ``ignored``). A replayed signature raises Conflict, an unknown run
        NotFound, unusable data InputError.

        ``subject`` is the signal's name, the completion's status, or the events' pass id;
        ``digests`` are the signature's and the body's, recorded once it is applied."""
        (sig_digest, _), (body_digest, _) = digests
        with self.store.transaction() as c:
            if self.seen(c, sig_digest, now, WEBHOOK_SEEN_KEEP_MS):
                raise Conflict("replayed: this signature was already used")
            row = c.execute("SELECT status, pass_id FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound("no run %r" % run_id)
            if self.seen(c, body_digest, now, WEBHOOK_SEEN_KEEP_MS):
                return {"duplicate": True, "applied": 0}
            if row[0] in TERMINAL:
                log.info("webhook: ignored a callback for run %s, which is %s", run_id, row[0])
                return {"ignored": "run is %s" % row[0], "applied": 0}
            if kind == "signal":
                self._signal(c, run_id, subject, payload, now, max_input_bytes)
                applied = 1
            elif kind == "completion":
                self._completion(c, run_id, row[1], subject, payload, now, policy)
                applied = 1
            else:
                applied, ignored = self._events(c, run_id, subject, payload, now, policy)
                if ignored and not applied:
                    log.info("webhook: ignored events for run %s: pass %s is not its current pass",
                             run_id, subject)
                    return {"ignored": "pass %s is not the run's current "
                            "pass" % subject, "applied": 0}
            self.mark_seen(c, digests, now, WEBHOOK_SEEN_KEEP_MS)
        return {"applied": applied}

    def _signal(self, c, run_id, name, payload, now, max_input_bytes):
        try:
            data_json = dumps(payload.get("data"))
        except (ValueError, TypeError):
            raise InputError("data is not JSON text")
        if len(data_json.encode("utf-8")) > max_input_bytes:
            raise InputError("data is over limits.max_input_bytes")
        self.store.waits.deliver(c, run_id, name, data_json, now, payload.get("idempotencyKey"))

    def _completion(self, c, run_id, pass_id, status, doc, now, policy):
        if status == "completed":
            try:
                size = len(dumps(doc.get("output")).encode("utf-8"))
            except (ValueError, TypeError, UnicodeError):
                raise InputError("output is not JSON text")
            if size > policy["max_output_bytes"]:
                raise InputError("output is %d bytes, over limits.max_output_bytes" % size)
            self.store.runs.finish(c, run_id, pass_id, "completed", now, output=doc.get("output"))
        else:
            err = doc.get("error")
            error = _clean_error(err if isinstance(err, dict) else {"message": str(err)})
            self.store.runs.finish(c, run_id, pass_id, "failed", now, error=error)

    def _events(self, c, run_id, pass_id, events, now, policy):
        """Apply a pass's events up to the first that ends it; returns (applied, ignored)."""
        applied = ignored = 0
        for ev in events:
            outcome = self.store.passes.apply_in(c, run_id, pass_id, ev, now, policy)
            if outcome == IGNORED:
                ignored += 1
            else:
                applied += 1
            if outcome == ENDED:
                break
        return applied, ignored


class ScheduleBook(_StorePart):
    """Cron schedules, and their fires (each starts its run once)."""

    def add_schedule(self, name, workflow_id, cron, tz, input_json, catch_up, now, next_fire_at):
        """A new schedule (Conflict if the name is taken)."""
        with self.store.transaction() as c:
            if c.execute("SELECT 1 FROM schedules WHERE name = ?", (name,)).fetchone():
                raise Conflict("a schedule named %r exists; give another --name, or `schedule rm "
                               "%s` first"
                               % (name, name))
            c.execute("INSERT INTO schedules (name, workflow_id, cron, tz, input, catch_up, "
                      "next_fire_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (name, workflow_id, cron, tz, input_json, catch_up, next_fire_at, now, now))

    def schedules(self, name=None):
        """Every schedule by name, or the one named ``name``."""
        sql = ("SELECT name, workflow_id, cron, tz, input, catch_up, paused, next_fire_at, "
               "last_fire_at, last_run_id, created_at, updated_at FROM schedules")
        return self.store.query(sql + (" WHERE name = ?" if name else " ORDER BY name"),
                                (name,) if name else ())

    def remove_schedule(self, name):
        """Delete a schedule; returns how many went (0 or 1)."""
        with self.store.transaction() as c:
            return c.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount

    def pause_schedule(self, name, paused, now, next_fire_at=None):
        """Pause or resume a schedule (resumed: from ``next_fire_at``)."""
        with self.store.transaction() as c:
            return c.execute("UPDATE schedules SET paused = ?, next_fire_at = COALESCE(?, "
                             "next_fire_at), updated_at = ? WHERE name = ?",
                             (int(paused), next_fire_at, now, name)).rowcount

    def fire_schedules(self, now, auto_task=False):
        """Start the runs of every fire that is due (with a TaskYou task if ``auto_task``);
        returns their ids.

        One transaction per schedule: the fire time is the run's idempotency key and the
        next fire time moves on in the same commit, so several schedulers on one
        database, or a crash mid-fire, still start each fire once. Which fires are due
        is worked out before the transaction: a long outage never holds the lock."""
        started = []
        for row in self.store.query("SELECT name, workflow_id, cron, tz, input, catch_up, "
                                    "next_fire_at FROM schedules "
                                    "WHERE paused = 0 AND next_fire_at <= ? LIMIT 100", (now,)):
            try:
                cron = Cron(row["cron"])
                fires = _missed_fires(cron, row["tz"], row["next_fire_at"], now, row["catch_up"])
                upcoming = cron.next_after(now, row["tz"])
            except ValueError as exc:
                log.warning("schedule %s: %s; paused", row["name"], exc)
                self.pause_schedule(row["name"], True, now)
                continue
            try:
                started += self._fire(row, fires, upcoming, now, auto_task)
            except Exception as exc:
                if _is_outage(exc):
                    raise
                # That schedule's problem: it is paused (and says why), the others fire on.
                log.error("schedule %s: firing it failed; paused (`schedule resume %s` once "
                          "fixed)", row["name"], row["name"], exc_info=exc)
                self.pause_schedule(row["name"], True, now)
        return started

    def _fire(self, row, fires, upcoming, now, auto_task):
        """Start one schedule's due fires and move it on, in one transaction; the new run ids."""
        started = []
        with self.store.transaction() as c:
            if not c.execute("SELECT 1 FROM schedules WHERE name = ? AND paused = 0 AND "
                             "next_fire_at = ?", (row["name"], row["next_fire_at"])).fetchone():
                return started  # another scheduler fired it, or it was paused or removed
            last = None
            for fire in fires:
                run_id = self._start_run(c, row, fire, now, auto_task)
                if run_id:
                    started.append(run_id)
                    last = run_id
            c.execute("UPDATE schedules SET next_fire_at = ?, last_fire_at = COALESCE(?, "
                      "last_fire_at), last_run_id = COALESCE(?, last_run_id), updated_at = ? "
                      "WHERE name = ?",
                      (upcoming, fires[-1] if fires else None, last, now, row["name"]))
        return started

    def _start_run(self, c, row, fire, now, auto_task):
        """The run of one fire on the workflow's latest version; None if none was made (no such
        workflow, or that fire's run exists already)."""
        wf = self.store.workflows.latest(c, row["workflow_id"])
        if wf is None:
            log.warning("schedule %s: no workflow %r; the fire at %s is skipped", row["name"],
                        row["workflow_id"], format_time(fire))
            return None
        run_id, created = self.store.runs.add_run(
            c, None, row["workflow_id"], wf[0], row["input"], now, task_requested=auto_task,
            task_title="Workflow: %s (schedule %s)" % (row["workflow_id"], row["name"]),
            deadline_at=now + wf[1] if wf[1] else None,
            idempotency_key="schedule:%s:%d" % (row["name"], fire), schedule_name=row["name"])
        return run_id if created else None


class SchedulerRegistry:
    """The schedulers at work on this store, and which of them are alive."""

    def __init__(self, store):
        self.store = store
        self._alive_cache = {}

    def holders(self, c):
        """Schedulers of this host: id -> True (alive), False (proven dead), None (lease decides).

        Other hosts' are not listed. A verdict is kept for a second: claims come often,
        schedulers die rarely."""
        host, now = _hostname(), time.monotonic()
        out, cache = {}, self._alive_cache
        sql = "SELECT id, pid, proc_start, boot_id, pid_ns FROM schedulers WHERE host = ?"
        for row in c.execute(sql, (host,)):
            seen = cache.get(row)
            if seen is None or now - seen[0] > 1.0:
                seen = cache[row] = (now, scheduler_alive(*row[1:]))
            out[row[0]] = seen[1]
        if len(cache) > 1000:
            cache.clear()
        return out

    def register_scheduler(self, sched_id, kind, pid, host, port, now):
        """A scheduler starts work on this store (with what proves it alive)."""
        start, boot = process_identity(pid)
        ns = pid_namespace() if pid == os.getpid() else None
        with self.store.transaction() as c:
            c.execute("INSERT OR REPLACE INTO schedulers (id, kind, pid, host, wake_port, "
                      "started_at, heartbeat_at, proc_start, boot_id, pid_ns) VALUES (?, ?, ?, ?, "
                      "?, ?, ?, ?, ?, ?)",
                      (sched_id, kind, pid, host, port, now, now, start, boot, ns))

    def heartbeat_scheduler(self, sched_id, now):
        """A scheduler is still at work."""
        with self.store.transaction() as c:
            c.execute("UPDATE schedulers SET heartbeat_at = ? WHERE id = ?", (now, sched_id))

    def unregister_scheduler(self, sched_id):
        """A scheduler leaves."""
        with self.store.transaction() as c:
            c.execute("DELETE FROM schedulers WHERE id = ?", (sched_id,))

    def live_schedulers(self, now, stale_ms):
        """Schedulers whose heartbeat is fresh (and, on this host, not proven dead)."""
        host = _hostname()
        live = []
        for s in self.store.query("SELECT id, kind, pid, host, wake_port, started_at, "
                                  "heartbeat_at, proc_start, boot_id, pid_ns FROM schedulers"):
            if s["heartbeat_at"] < now - stale_ms:
                continue
            if s["host"] == host and scheduler_alive(s["pid"], s["proc_start"], s["boot_id"],
                                                     s["pid_ns"]) is False:
                continue
            live.append(s)
        return live


class Retention(_StorePart):
    """Deleting finished runs with everything that is only theirs."""

    # An undelivered task update queued at or after the given time holds its run back.
    SQL_PRUNABLE = ("SELECT r.id FROM runs r WHERE r.status IN (%s) AND r.finished_at < ? AND NOT "
                    "EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = r.id AND o.delivered_at IS "
                    "NULL AND o.created_at >= ?) AND NOT EXISTS (SELECT 1 FROM runs p WHERE p.id = "
                    "r.parent_run_id AND p.status NOT IN ('completed', 'failed', 'canceled')) "
                    "ORDER BY r.finished_at LIMIT ?")

    PRUNED_TABLES = ("steps", "run_events", "run_logs", "outbox", "signals")

    SQL_UNDELIVERED = ("SELECT count(*) AS n FROM outbox WHERE run_id IN (%s) "
                       "AND delivered_at IS NULL")

    SQL_HELD_BACK = ("SELECT count(*) AS n FROM runs r WHERE r.status IN (%s) "
                     "AND r.finished_at < ? AND EXISTS (SELECT 1 FROM outbox o "
                     "WHERE o.run_id = r.id AND o.delivered_at IS NULL AND o.created_at >= ?)")

    def prune(self, cutoff, statuses, dry_run=False, batch=200, pause_s=0.0, drop_before=None):
        """Delete finished runs that ended before ``cutoff`` with all that is only theirs,
        ``batch`` runs per transaction (a pass never waits long for the write lock); returns
        counts per table.

        A run with an undelivered task update is kept, unless every such update was queued
        before ``drop_before``: then they go with it, counted in ``dropped_task_updates``."""
        counts = dict.fromkeys(("runs",) + self.PRUNED_TABLES + ("dropped_task_updates",), 0)
        sql = self.SQL_PRUNABLE % ",".join("?" * len(statuses))
        hold_from = _NEVER_BEFORE if drop_before is None else drop_before
        if dry_run:
            ids = [r["id"] for r in self.store.query(sql, (*statuses, cutoff, hold_from, 10 ** 9))]
            counts["runs"] = len(ids)
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                marks = ",".join("?" * len(part))
                for table in self.PRUNED_TABLES:
                    counts[table] += self.store.query_one("SELECT count(*) AS n FROM %s WHERE "
                                                          "run_id IN (%s)"
                                                          % (table, marks), part)["n"]
                dropped = self.store.query_one(self.SQL_UNDELIVERED % marks, part)["n"]
                counts["dropped_task_updates"] += dropped
            return counts
        while True:
            with self.store.transaction() as c:
                ids = [r[0] for r in c.execute(sql, (*statuses, cutoff, hold_from, batch))]
                if not ids:
                    return counts
                marks = ",".join("?" * len(ids))
                dropped = c.execute(self.SQL_UNDELIVERED % marks, ids).fetchone()[0]
                counts["dropped_task_updates"] += dropped
                for table in self.PRUNED_TABLES:
                    sql_delete = "DELETE FROM %s WHERE run_id IN (%s)" % (table, marks)
                    counts[table] += c.execute(sql_delete, ids).rowcount
                sql_delete = "DELETE FROM runs WHERE id IN (%s)" % marks
                counts["runs"] += c.execute(sql_delete, ids).rowcount
            if pause_s:
                time.sleep(pause_s)

    def held_back(self, cutoff, statuses, drop_before=None):
        """How many runs prune(cutoff, statuses, drop_before) keeps for undelivered updates."""
        hold_from = _NEVER_BEFORE if drop_before is None else drop_before
        return self.store.query_one(self.SQL_HELD_BACK % ",".join("?" * len(statuses)),
                                    (*statuses, cutoff, hold_from))["n"]


class ReadModel(_StorePart):
    """What status, list, the dashboard and /metrics read."""

    def run_document(self, run):
        """A run as `status` shows it: its version, steps, waits, family and pending signals."""
        version = self.store.get_version(run["workflow_id"], run["version"])
        rows = self.store.steps(run["id"])
        steps = [self._step_document(run, s) for s in rows]
        waits = [s for s in rows if s["kind"] == "wait"]
        status = run["status"]
        parent = run["parent_run_id"]
        return {
            "id": run["id"], "workflow_id": run["workflow_id"], "version": run["version"],
            "version_label": version["label"], "runtime": version["runtime"],
            "adapter": version["adapter"], "status": status, "input": json.loads(run["input"]),
            "output": loads_or_none(run["output"]), "error": loads_or_none(run["error"]),
            "passes": run["passes"], "created_at": run["created_at"],
            "started_at": run["started_at"], "finished_at": run["finished_at"],
            "updated_at": run["updated_at"],
            "wake_at": run["wake_at"] if status in ("sleeping", "waiting") else None,
            # (a run held back by its workflow's limits is due when a claim admits it: `queued`)
            "available_at": (run["available_at"] if status == "pending"
                             and run["held_since"] is None else None),
            "deadline_at": run["deadline_at"], "steps": steps,
            "last_pass": loads_or_none(run["last_pass"]),
            "idempotency_key": run["idempotency_key"], "retries": run["retries"],
            "forked_from": run["forked_from"], "schedule": run["schedule_name"],
            # How it got here: each earlier end and retry, and every failed attempt of a step.
            "history": self.history(run["id"]) if run["retries"] else [],
            "failed_attempts": self.store.query_one(
                "SELECT count(*) AS n FROM run_events WHERE run_id = ? AND type = "
                "'step_failed'", (run["id"],))["n"],
            "concurrency_key": run["concurrency_key"], "priority": run["priority"],
            # Its passes run alone (a shared worker died under it, nobody knows by whose doing).
            "isolated": bool(run["isolated"]),
            "waiting_for": [dict(loads_or_none(w["wait"]) or {}, step=w["key"],
                                 timeout_at=w["wake_at"])
                            for w in waits if w["status"] == "waiting"],
            "parent": {"run_id": parent, "wait": run["parent_wait_key"]} if parent else None,
            "children": [{"id": ch["id"], "workflow_id": ch["workflow_id"], "status": ch["status"]}
                         for ch in self.store.children(run["id"])],
            "signals_pending": [{"id": g["id"], "name": g["name"], "data": loads_or_none(g["data"]),
                                 "at": g["created_at"]}
                                for g in self.store.signals(run["id"]) if g["consumed_by"] is None],
        }

    def history(self, run_id):
        """A retried run's earlier ends and retries, oldest first: [{at, event, message}]."""
        out = []
        for e in self.store.query("SELECT type, data, at FROM run_events WHERE run_id = ? AND "
                                  "type IN ('failed', 'canceled', 'completed', 'retried') "
                                  "ORDER BY id", (run_id,)):
            data = loads_or_none(e["data"]) or {}
            message = ((data.get("error") or {}).get("message") if e["type"] != "retried"
                       else "from %s, version %s" % (data.get("from"), data.get("version")))
            out.append({"at": e["at"], "event": e["type"], "message": message})
        return out

    def driven_by(self, run, now, window_ms):
        """Whether a scheduler (heard from within ``window_ms``) is alive to drive an unfinished
        run, and what to do if none is."""
        live = self.store.live_schedulers(now, window_ms)
        doc = {"alive": bool(live), "kinds": sorted({s["kind"] for s in live})}
        lease_end = run["lease_expires_at"]
        if run["status"] == "running" and lease_end is not None and lease_end < now:
            doc["message"] = ("the scheduler running this pass stopped; the run is replayed "
                              "from its last committed step when a scheduler runs")
        if not live:
            doc["message"] = doc.get("message", "no scheduler is alive to drive this run") + (
                "; run `ty-openworkflow tick` (or put it in cron) or keep "
                "`ty-openworkflow serve` running")
        return doc

    @staticmethod
    def _step_document(run, s):
        """One step, sleep or wait of a run as `status` shows it."""
        item = {"name": s["key"], "kind": s["kind"], "status": s["status"],
                "attempts": s["attempts"], "started_at": s["started_at"],
                "completed_at": s["completed_at"]}
        if s["kind"] == "wait":
            item["wait"] = loads_or_none(s["wait"])
            item["timeout_at"] = s["wake_at"]
            if s["status"] == "waiting" and run["status"] in TERMINAL:
                item["status"] = "interrupted"
        elif s["kind"] == "sleep":
            item["wake_at"] = s["wake_at"]
            if s["status"] != "completed":  # over only once the run went past it
                item["status"] = ("completed" if run["status"] == "completed" else
                                  "interrupted" if run["status"] in TERMINAL else "sleeping")
        if s["output"] is not None:
            item["output"] = json.loads(s["output"])
        if s["error"]:
            item["error"] = json.loads(s["error"])
        return item

    def counters(self):
        """The /metrics counters: (name, workflow) -> value."""
        rows = self.store.query("SELECT name, workflow, value FROM counters")
        return {(r["name"], r["workflow"]): r["value"] for r in rows}

    def runs_page(self, workflow_id, status, id_prefix, before, limit):
        """Newest runs first, a page at a time (``before``: created_at of the last row seen)."""
        where, params = [], []
        if workflow_id:
            where.append("workflow_id = ?")
            params.append(workflow_id)
        if status:
            where.append("status = ?")
            params.append(status)
        if id_prefix:
            where.append("id LIKE ? ESCAPE '\\'")
            params.append(_like_prefix(id_prefix))
        if before:  # the cursor "created_at:id" of the last row seen (ids break ties of one ms)
            if not re.fullmatch(r"\d{1,15}:[A-Za-z0-9_]*", str(before)):
                raise ValueError("bad cursor %r; pass back the `next` of the previous "
                                 "page" % before)
            at, _, last_id = str(before).partition(":")
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [int(at), int(at), last_id]
        sql = "SELECT %s FROM runs %s ORDER BY created_at DESC, id DESC LIMIT ?" % (
            _RUN_COLUMNS, ("WHERE " + " AND ".join(where)) if where else "")
        return self.store.query(sql, params + [limit])

    def get_run(self, run_id):
        """A run by id or by a unique prefix of six characters or more (None if none)."""
        run = self.store.query_one(SQL_RUN, (run_id,))
        if run is None and run_id and len(run_id) >= 6:
            prefix = run_id.lower()  # ids are lower case
            matches = self.store.query(SQL_RUNS_BY_PREFIX, (prefix, prefix + "\x7f"))
            if len(matches) == 1:
                run = matches[0]
            elif matches:
                starts = ", ".join(m["id"] for m in matches[:2]) + (", ..." if len(matches) > 2
                                                                    else "")
                raise NotFound("run id %r is ambiguous: it starts %s; give more of it"
                               % (run_id, starts))
        return run

    def short_ids(self, run_ids):
        """{run id: its short form}: its first RUN_SHORT_LEN characters, or as many more as it
        takes to tell it from every other run's id (ids made before the random part came
        first)."""
        out = {}
        run_ids = list(dict.fromkeys(run_ids))
        for i in range(0, len(run_ids), 500):
            batch = run_ids[i:i + 500]
            sql = SQL_ID_NEIGHBOURS % ", ".join("(?)" for _ in batch)
            for row in self.store.query(sql, batch):
                run_id = row["id"]
                n = max([RUN_SHORT_LEN] + [len(os.path.commonprefix([run_id, other])) + 1
                                           for other in (row["before"], row["after"]) if other])
                out[run_id] = run_id[:n]
        return out

    def list_runs(self, workflow_id=None, status=None, limit=20):
        """Newest runs first, of a workflow or a status if given."""
        return self.runs_page(workflow_id, status, None, None, limit)

    def steps(self, run_id):
        """A run's steps, sleeps and waits in the order they were first seen."""
        return self.store.query("SELECT key, kind, status, seq, output, error, retry, retryable, "
                                "attempts, wake_at, started_at, completed_at, wait FROM steps "
                                "WHERE run_id = ? ORDER BY seq", (run_id,))

    def events(self, run_id, after_id=0):
        """A run's event journal after entry ``after_id``."""
        return self.store.query("SELECT id, pass_id, type, data, at FROM run_events WHERE run_id = "
                                "? AND id > ? ORDER BY id",
                                (run_id, after_id))

    def logs(self, run_id):
        """What a run's passes printed, in order."""
        return self.store.query("SELECT pass_id, pass_no, adapter, text, at FROM run_logs "
                                "WHERE run_id = ? ORDER BY id", (run_id,))

    def count_by_status(self):
        """How many runs the store holds in each status (statuses with none left out)."""
        return {r["status"]: r["n"] for r in self.store.query(
            "SELECT status, count(*) AS n FROM runs GROUP BY status")}

    def children(self, run_id):
        """The child runs a run started, oldest first: id, workflow_id, status."""
        return self.store.query("SELECT id, workflow_id, status FROM runs WHERE parent_run_id = ? "
                                "ORDER BY created_at", (run_id,))

    def outbox_backlog(self):
        """How many TaskYou updates are not delivered yet."""
        return self.store.query_one("SELECT count(*) AS n FROM outbox WHERE delivered_at IS "
                                    "NULL")["n"]

    def leases_held(self, now):
        """How many runs have a pass holding a live lease (any scheduler)."""
        return self.store.query_one("SELECT count(*) AS n FROM runs WHERE status = 'running' "
                                    "AND lease_expires_at >= ?", (now,))["n"]

    def next_run_due_at(self):
        """When the next pending, sleeping or waiting run is due (None: none is)."""
        return self.store.query_one("SELECT MIN(available_at) AS at FROM runs WHERE status IN "
                                    "('pending', 'sleeping', 'waiting')")["at"]

    def pending_due(self, now, limit):
        """Ids of up to ``limit`` pending runs due at ``now``."""
        return [r["id"] for r in self.store.query(
            "SELECT id FROM runs WHERE status = 'pending' AND available_at <= ? LIMIT ?",
            (now, limit))]


class AdapterBook(_StorePart):
    """What adapters remember in the store: cloudflare's uploaded scripts, and small facts."""

    def adapter_state(self, adapter, key):
        """A remembered fact of ``adapter`` (None if never told)."""
        row = self.store.query_one("SELECT value FROM adapter_state WHERE adapter = ? AND key = ?",
                                   (adapter, key))
        return row["value"] if row else None

    def set_adapter_state(self, adapter, key, value):
        """Remember a fact of ``adapter``."""
        with self.store.transaction() as c:
            self._put_state(c, adapter, key, value)

    @staticmethod
    def _put_state(c, adapter, key, value):
        c.execute("INSERT OR REPLACE INTO adapter_state (adapter, key, value) VALUES (?, ?, ?)",
                  (adapter, key, value))

    def script(self, name, account_id):
        """The record of an uploaded script (None if not uploaded)."""
        return self.store.query_one("SELECT name, uploaded_at, ready_at, last_used_at FROM "
                                    "cf_scripts WHERE name = ? AND account_id = "
                                    "?", (name, account_id))

    def remember_script(self, name, account_id, workflow_id, row, state=None):
        """Record an uploaded script (and ``state``, an (adapter, key, value) fact, with it)."""
        with self.store.transaction() as c:
            if state is not None:
                self._put_state(c, *state)
            c.execute("INSERT OR REPLACE INTO cf_scripts (name, account_id, workflow_id, "
                      "uploaded_at, ready_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)",
                      (name, account_id, workflow_id, row["uploaded_at"], row["ready_at"],
                       row["last_used_at"]))

    def forget_script(self, name, account_id):
        """Drop the record of an uploaded script."""
        with self.store.transaction() as c:
            c.execute("DELETE FROM cf_scripts WHERE name = ? AND account_id = "
                      "?", (name, account_id))

    def script_count(self, account_id):
        """How many scripts of the account are recorded."""
        return self.store.query_one("SELECT count(*) AS n FROM cf_scripts WHERE account_id = ?",
                                    (account_id,))["n"]

    def scripts(self, account_id):
        """The account's recorded scripts: name, uploaded_at, last_used_at."""
        return self.store.query("SELECT name, uploaded_at, last_used_at FROM cf_scripts "
                                "WHERE account_id = ?", (account_id,))

    def versions_needed(self, adapter):
        """(workflow_id, code) of the versions on ``adapter`` still needed: each workflow's newest,
        and every unfinished run's."""
        return self.store.query(
            "SELECT v.workflow_id, v.code FROM workflow_versions v "
            "JOIN workflows w ON w.id = v.workflow_id "
            "WHERE v.adapter = ? AND (v.version = w.latest_version OR EXISTS (SELECT 1 FROM runs r "
            "WHERE r.workflow_id = v.workflow_id AND r.version = v.version AND r.status NOT IN "
            "('completed', 'failed', 'canceled')))", (adapter,))


def _verb(part, method):
    """A verb of a front (the Store, the Sidecar) that does ``method`` of its part ``part``."""
    name = method.__name__

    def verb(self, *args, **kwargs):
        return getattr(getattr(self, part), name)(*args, **kwargs)
    verb.__name__ = verb.__qualname__ = name
    verb.__doc__ = method.__doc__
    return verb


class Store(Database):
    """The durable backend: a Database with its parts, one reason to change each.

    Every part is given this front and reaches the others only through it. The verbs
    below are the ones callers use; each says which part does it."""

    def __init__(self, data_dir, synchronous="full"):
        super().__init__(data_dir, synchronous)
        self.workflows = WorkflowBook(self)
        self.runs = RunLedger(self)
        self.leases = LeaseLedger(self)
        self.flow = FlowLedger(self)
        self.passes = PassLedger(self)
        self.waits = WaitLedger(self)
        self.outbox = Outbox(self)
        self.notices = NoticeBook(self)
        self.callbacks = CallbackBook(self)
        self.schedule_book = ScheduleBook(self)
        self.registry = SchedulerRegistry(self)
        self.retention = Retention(self)
        self.reads = ReadModel(self)
        self.adapter_book = AdapterBook(self)

    save_version = _verb("workflows", WorkflowBook.save_version)
    get_version = _verb("workflows", WorkflowBook.get_version)
    get_workflow = _verb("workflows", WorkflowBook.get_workflow)
    list_workflows = _verb("workflows", WorkflowBook.list_workflows)
    versions = _verb("workflows", WorkflowBook.versions)

    create_run = _verb("runs", RunLedger.create_run)
    runs_of_task = _verb("runs", RunLedger.runs_of_task)
    add_log = _verb("runs", RunLedger.add_log)
    cancel_run = _verb("runs", RunLedger.cancel_run)
    retry_run = _verb("runs", RunLedger.retry_run)
    fork_run = _verb("runs", RunLedger.fork_run)
    fail_run = _verb("runs", RunLedger.fail_run)

    claim_due = _verb("leases", LeaseLedger.claim_due)
    next_due_at = _verb("leases", LeaseLedger.next_due_at)
    renew_leases = _verb("leases", LeaseLedger.renew_leases)
    pass_is_current = _verb("leases", LeaseLedger.pass_is_current)
    release = _verb("leases", LeaseLedger.release)
    spare = _verb("leases", LeaseLedger.spare)
    platform_end = _verb("leases", LeaseLedger.platform_end)

    set_limits = _verb("flow", FlowLedger.set_limits)
    limits = _verb("flow", FlowLedger.limits)
    why_held = _verb("flow", FlowLedger.why_held)
    queue_notes = _verb("flow", FlowLedger.queue_notes)
    queued_counts = _verb("flow", FlowLedger.queued_counts)
    admission_due = _verb("flow", FlowLedger.admission_due)

    history = _verb("passes", PassLedger.history)
    apply_event = _verb("passes", PassLedger.apply_event)
    apply_events = _verb("passes", PassLedger.apply_events)
    end_pass_without_result = _verb("passes", PassLedger.end_pass_without_result)

    signal = _verb("waits", WaitLedger.signal)
    signals = _verb("waits", WaitLedger.signals)
    resolve_wait = _verb("waits", WaitLedger.resolve_wait)
    task_waits = _verb("waits", WaitLedger.task_waits)
    poll_soon = _verb("waits", WaitLedger.poll_soon)
    set_wait_task = _verb("waits", WaitLedger.set_wait_task)
    wait_open = _verb("waits", WaitLedger.wait_open)
    wait_task = _verb("waits", WaitLedger.wait_task)
    approvals_due = _verb("waits", WaitLedger.approvals_due)

    claim_outbox = _verb("outbox", Outbox.claim_outbox)
    outbox_delivered = _verb("outbox", Outbox.outbox_delivered)
    outbox_failed = _verb("outbox", Outbox.outbox_failed)
    next_outbox_at = _verb("outbox", Outbox.next_outbox_at)
    outbox_for_run = _verb("outbox", Outbox.outbox_for_run)

    notice_due = _verb("notices", NoticeBook.notice_due)
    apply_callback = _verb("callbacks", CallbackBook.apply_callback)

    add_schedule = _verb("schedule_book", ScheduleBook.add_schedule)
    schedules = _verb("schedule_book", ScheduleBook.schedules)
    remove_schedule = _verb("schedule_book", ScheduleBook.remove_schedule)
    pause_schedule = _verb("schedule_book", ScheduleBook.pause_schedule)
    fire_schedules = _verb("schedule_book", ScheduleBook.fire_schedules)

    register_scheduler = _verb("registry", SchedulerRegistry.register_scheduler)
    heartbeat_scheduler = _verb("registry", SchedulerRegistry.heartbeat_scheduler)
    unregister_scheduler = _verb("registry", SchedulerRegistry.unregister_scheduler)
    live_schedulers = _verb("registry", SchedulerRegistry.live_schedulers)

    prune = _verb("retention", Retention.prune)
    held_back = _verb("retention", Retention.held_back)

    get_run = _verb("reads", ReadModel.get_run)
    short_ids = _verb("reads", ReadModel.short_ids)
    list_runs = _verb("reads", ReadModel.list_runs)
    runs_page = _verb("reads", ReadModel.runs_page)
    steps = _verb("reads", ReadModel.steps)
    events = _verb("reads", ReadModel.events)
    logs = _verb("reads", ReadModel.logs)
    counters = _verb("reads", ReadModel.counters)
    run_document = _verb("reads", ReadModel.run_document)
    driven_by = _verb("reads", ReadModel.driven_by)
    count_by_status = _verb("reads", ReadModel.count_by_status)
    children = _verb("reads", ReadModel.children)
    outbox_backlog = _verb("reads", ReadModel.outbox_backlog)
    leases_held = _verb("reads", ReadModel.leases_held)
    pending_due = _verb("reads", ReadModel.pending_due)
    next_run_due_at = _verb("reads", ReadModel.next_run_due_at)


# ---------------------------------------------------------------------------
# Runtimes: the shims that run workflow code, and the event stream parser
# ---------------------------------------------------------------------------

EVENT_TYPES = {"step_started", "step_completed", "step_failed", "sleep", "sleep_completed", "wait",
               "completed", "failed", "suspended"}
TERMINAL_EVENTS = {"completed", "failed", "suspended"}


CLOUDFLARE_GLUE = "cloudflare_worker.js"
DASHBOARD_PAGE = "dashboard.html"  # the dashboard's page: no runtime, but shipped the same way
# The files of runtimes/, embedded in the single-file build by `make dist`.
RUNTIME_FILES = [spec["shim"] for spec in RUNTIMES.values()] + [CLOUDFLARE_GLUE, DASHBOARD_PAGE]


def runtime_source(runtime):
    """Source text of a runtime shim: embedded in a dist build, else runtimes/ beside this file."""
    return runtime_file(RUNTIMES[runtime]["shim"])


def runtime_file(name):
    """A file of runtimes/: embedded in a dist build, else read beside this file."""
    if name in _EMBEDDED_RUNTIMES:
        return _EMBEDDED_RUNTIMES[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtimes", name)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        raise AdapterError("runtimes/%s not found beside %s; copy the runtimes/ folder with it, "
                           "or use the single-file build (make dist)"
                           % (name, os.path.basename(__file__)))


def parse_event_line(line, pass_id):
    """Parse one stdout line of a pass: an event dict, or None if it is not one of ours."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        ev = json.loads(line, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
    if not isinstance(ev, dict) or ev.get("pass") != pass_id or ev.get("type") not in EVENT_TYPES:
        return None
    if ev["type"] in ("step_started", "step_completed", "step_failed", "sleep", "sleep_completed",
                      "wait"):
        key = ev.get("step")
        if not isinstance(key, str) or not key or len(key) > MAX_STEP_NAME_LEN:
            return None
    if ev["type"] == "suspended" and ev.get("wake_at") is None and ev.get("waiting"):
        return ev  # parked on waits with no timeout: woken by what it waits for
    if ev["type"] in ("sleep", "suspended"):
        wake_at = ev.get("wake_at")
        if not _is_epoch_ms(wake_at):
            return None
        ev["wake_at"] = int(wake_at)
    if ev["type"] == "wait":
        spec, timeout_at = ev.get("wait"), ev.get("timeout_at")
        if not isinstance(spec, dict) or spec.get("kind") not in WAIT_KINDS or not (
                timeout_at is None or _is_epoch_ms(timeout_at)):
            return None
        for field in {"signal": ("name",), "child": ("workflow_id",),
                      "task": ("title",)}[spec["kind"]]:
            if not isinstance(spec.get(field), str) or not spec[field]:
                return None
        ev["timeout_at"] = None if timeout_at is None else int(timeout_at)
    return ev


def _is_epoch_ms(value):
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and 0 <= value < MAX_EPOCH_MS)


def _call_position(ev):
    """The event's place in the run's durable call order, if the shim sent a sane one."""
    call = ev.get("call")
    return (call if isinstance(call, int) and not isinstance(call, bool) and 0 <= call < 10 ** 9
            else None)


def _no_constants(name):
    raise ValueError("%s is not JSON" % name)


def materialize(directory, filename, text):
    """Write ``text`` once under a content-addressed name; returns the path."""
    digest = sha256_hex(text)[:16]
    base, ext = os.path.splitext(filename)
    path = os.path.join(directory, "%s-%s%s" % (base, digest, ext))
    if not os.path.exists(path):
        try:
            os.makedirs(directory, exist_ok=True)
            import tempfile
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise AdapterError("cannot write %s (%s); check the adapter's work_dir and free space"
                               % (directory, exc.strerror or exc))
    return path


# ---------------------------------------------------------------------------
# Adapters: the interface, exec (local processes), docker (containers)
# ---------------------------------------------------------------------------


def _die_with_parent():
    """Linux: the kernel kills this child if the thread that started it dies."""
    _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


try:
    import resource
except ImportError:  # not on every platform; memory ceilings then go unenforced
    resource = None

_LIBC = False  # not looked up yet


def _libc():
    """libc for prctl (Linux), looked up when the first process is spawned; None elsewhere."""
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                lib = ctypes.CDLL(None, use_errno=True)
                _LIBC = lib if hasattr(lib, "prctl") else None
            except (ImportError, OSError):
                # restricted builds may lack ctypes: passes still stop on stdin EOF
                _LIBC = None
    return _LIBC


def spawn(argv, env=None, cwd=None, stdin=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          tied=False, pass_fds=(), address_space=None):
    """The one place that starts a child process: its own process group, pipes by default.

    ``tied``: the child dies with the calling thread (a pass must never outlive
    the scheduler that owns it, even one busy in a loop that never reads stdin).
    ``address_space``: a memory ceiling in bytes for the child (RLIMIT_AS).
    """
    tie = tied and _libc() is not None

    def before_exec():
        if tie:
            _die_with_parent()
        if address_space and resource is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                            start_new_session=True, close_fds=True, pass_fds=pass_fds,
                            preexec_fn=before_exec if tie or address_space else None)


def run_command(argv, timeout_s=30, env=None, input_bytes=None, on_start=None):
    """Run a short command to completion; returns (returncode, stdout, stderr) as text.

    ``on_start(proc)`` sees the process first (so a caller can kill it early)."""
    try:
        proc = spawn(argv, env=env)
    except OSError as exc:
        return 127, "", str(exc)
    if on_start is not None:
        on_start(proc)
    try:
        out, err = proc.communicate(input_bytes, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return 124, out.decode("utf-8", "replace"), "timed out after %ss" % timeout_s
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _kill_group(proc, sig=signal.SIGKILL):
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(ProcessLookupError, OSError):
        proc.kill()


# Every process a pass starts carries its store and scheduler in this variable, so the
# processes a killed scheduler's passes left behind (a step's children) can be found.
OWNER_ENV = "TYOW_OWNER"


def owner_mark(store_id):
    """``store:pid:start:pidns`` of this process, for the passes it starts for ``store_id``."""
    pid = os.getpid()
    start, ns = process_identity(pid)[0] or "", pid_namespace() or ""
    return "%s:%d:%s:%s" % (store_id or "", pid, start, ns)


def parse_owner_mark(mark):
    """(store id, pid, start, pid namespace) from an owner mark; None if it is not one."""
    parts = mark.split(":")
    if len(parts) != 4 or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2] or None, parts[3] or None


def reap_orphans(store_id):
    """Kill processes that this store's passes left behind when their scheduler died (Linux /proc).

    Only a mark naming this store and a scheduler proven dead counts: a process of another
    store, or whose scheduler's pid means nothing here (another PID namespace), is left alone."""
    killed = []
    if not store_id or not os.path.isdir("/proc"):
        return killed
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                env = f.read()
        except OSError:
            continue
        at = env.find(b"\0" + OWNER_ENV.encode() + b"=")
        if at < 0 and not env.startswith(OWNER_ENV.encode() + b"="):
            continue
        value = env[at + 1:] if at >= 0 else env
        mark = value.split(b"\0", 1)[0].split(b"=", 1)[1].decode("ascii", "replace")
        owner = parse_owner_mark(mark)
        if owner is None or owner[0] != store_id:
            continue  # another store's, or no mark at all
        if scheduler_alive(owner[1], owner[2], None, owner[3]) is not False:
            continue
        with contextlib.suppress(OSError):
            os.kill(int(name), signal.SIGKILL)
            killed.append(int(name))
    if killed:
        log.warning("stopped %d process(es) that passes of a scheduler no longer running "
                    "left behind: %s", len(killed), " ".join(map(str, killed)))
    return killed


class PassSpec:
    """What an adapter needs to run one pass: the document and the version's code."""

    def __init__(self, doc, version, isolated=False):
        self.doc = doc
        self.version = version
        self.pass_id = doc["pass_id"]
        self.run_id = doc["run_id"]
        self.runtime = version["runtime"]
        self.isolated = isolated  # the run's passes must not share a process with others
        # Called with the Execution before it may wait for room: it can be stopped while it waits.
        self.on_execution = None


class Execution:
    """A running pass: ``lines()`` yields stdout lines; ``cancel()``; ``finish()``."""

    def lines(self):
        raise NotImplementedError

    def batches(self):
        """Lists of the lines that are there at once (a pass's events commit together)."""
        for line in self.lines():
            yield [line]

    def cancel(self):
        raise NotImplementedError

    def finish(self):
        """Wait for the end; returns a one-line description of how it ended."""
        raise NotImplementedError

    def add_stray(self, line):
        """Keep output that was not an event, for the run log."""

    def pause(self):
        """Freeze the pass where it is (its lease is in doubt); ``resume()`` lets it go on."""

    def resume(self):
        """Undo ``pause()``."""

    log_text = ""
    # The process died under the pass for another pass's doing (a shared worker): the pass
    # is given back, not charged. ``suspect``: nobody knows whose doing, so the run's passes
    # run alone from then on, and a death there is its own.
    spared = False
    suspect = False
    # The platform ended the runtime under the pass (a Worker's CPU limit, a runtime restart):
    # one line naming the likely limit and its fix. The first such end at a point of the run is
    # given back uncounted (a restart ends passes too), unless ``platform_end_certain``.
    platform_end = None
    platform_end_certain = False


class ProcessExecution(Execution):
    """A pass running as a child process fed by stdin, reporting on stdout."""

    def __init__(self, argv, stdin_bytes, env=None, cwd=None, timeout_ms=None, on_stop=None,
                 event_pipe=False, address_space=None, on_pause=None, keep_stdin=False,
                 on_output=None, memory=None):
        """``on_stop``: run once when the pass is stopped or ends badly (e.g. remove its container).

        ``memory``: the pass's memory ceiling, to name when it runs out (node's is its heap size,
        not ``address_space``).

        ``event_pipe``: events come on a pipe of their own (its fd number in the
        child's TYOW_EVENT_FD) and the child's stdout joins stderr in the log, so
        nothing the workflow or its children print can reach the event stream.
        """
        self.argv = argv
        self.canceled = False
        self.timed_out = False
        self._on_stop = on_stop
        self._stopped = threading.Lock()
        self._log = bytearray()
        self._log_truncated = 0
        self._timeout_ms = timeout_ms
        self._memory = memory or address_space
        # (paused: bool) -> None, for what a signal to the group cannot freeze
        self._on_pause = on_pause
        self._on_output = on_output  # (chunk) -> True if it took the log output itself
        self._events = None
        try:
            if event_pipe:
                r, w = os.pipe()
                try:
                    self.proc = spawn(argv, env=dict(env or os.environ, TYOW_EVENT_FD=str(w)),
                                      cwd=cwd, tied=True, stderr=subprocess.STDOUT, pass_fds=(w,),
                                      address_space=address_space)
                except BaseException:
                    os.close(r)
                    raise
                finally:
                    os.close(w)
                self._events = os.fdopen(r, "rb")
            else:
                self.proc = spawn(argv, env=env, cwd=cwd, tied=True, address_space=address_space)
        except OSError as exc:
            raise AdapterError("cannot start %s: %s" % (argv[0], exc.strerror or exc))
        self._stdin_thread = threading.Thread(target=self._feed, args=(stdin_bytes,), daemon=True)
        if not keep_stdin:  # a worker's stdin is written by its owner
            self._stdin_thread.start()
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()
        self._timer = None
        if timeout_ms:
            self._timer = threading.Timer(timeout_ms / 1000.0, self._timeout)
            self._timer.daemon = True
            self._timer.start()

    def _feed(self, data):
        # stdin stays open until the pass ends: the shim stops at end-of-file,
        # which is also what it sees if this process dies.
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def close_stdin(self):
        """End the process's stdin (a warm worker exits once idle)."""
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.proc.stdin.close()

    @property
    def event_stream(self):
        """The pipe the process writes its events to (None: it writes them to stdout)."""
        return self._events

    def wait_stderr(self, timeout_s):
        """Wait up to ``timeout_s`` for the process's stderr to be read to its end."""
        self._err_thread.join(timeout_s)

    def _drain_stderr(self):
        out = self.proc.stdout if self._events is not None else self.proc.stderr
        for chunk in iter(lambda: out.read1(65536) if hasattr(out, "read1") else out.read(65536),
                          b""):
            if self._on_output is not None and self._on_output(chunk):
                continue
            room = MAX_PASS_LOG_BYTES - len(self._log)
            if room > 0:
                self._log += chunk[:room]
            self._log_truncated += max(0, len(chunk) - max(room, 0))

    def _timeout(self):
        self.timed_out = True
        self._stop()

    def _run_on_stop(self):
        if self._on_stop and self._stopped.acquire(blocking=False):
            with contextlib.suppress(Exception):
                self._on_stop()

    def _stop(self):
        self._run_on_stop()
        _kill_group(self.proc)

    def lines(self):
        stream = self._events if self._events is not None else self.proc.stdout
        for raw in iter(stream.readline, b""):
            yield raw.decode("utf-8", "replace")

    def add_stray(self, line):
        """Keep stdout text that was not an event in the log, marked as such."""
        if len(self._log) < MAX_PASS_LOG_BYTES:
            self._log += ("[stdout] " + line.rstrip("\n") + "\n").encode("utf-8", "replace")

    def cancel(self):
        self.canceled = True
        self._stop()
        self.send_signal(signal.SIGCONT)  # a frozen group must wake to die

    def send_signal(self, sig):
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            os.killpg(self.proc.pid, sig)

    def pause(self):
        self.send_signal(signal.SIGSTOP)
        if self._on_pause:
            with contextlib.suppress(Exception):
                self._on_pause(True)

    def resume(self):
        if self._on_pause:
            with contextlib.suppress(Exception):
                self._on_pause(False)
        self.send_signal(signal.SIGCONT)

    def finish(self, grace_s=5.0):
        if self._stdin_thread.is_alive():
            self._stdin_thread.join(grace_s)
        try:
            code = self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            code = self.proc.wait()
        else:
            # The shim exited; children it left in its group must not outlive the pass.
            _kill_group(self.proc)
        if self._timer:
            self._timer.cancel()
        self.close_stdin()
        if code != 0 or self.canceled or self.timed_out:
            self._run_on_stop()
        self._err_thread.join(2)
        for stream in (self.proc.stdout, self.proc.stderr, self._events):
            with contextlib.suppress(Exception):
                stream.close()
        if self.timed_out:
            return "the pass timed out after %s and was killed" % format_duration(self._timeout_ms)
        if self.canceled:
            return "the pass was stopped"
        if code != 0 and re.search(r"heap out of memory|MemoryError|Cannot allocate memory",
                                   self.log_text[-4000:]):
            return ("the pass ran out of memory (limits.pass_memory: %s)"
                    % _format_size(self._memory) if self._memory
                    else "the pass ran out of memory")
        if code < 0:
            return "the runtime was killed by signal %d" % -code
        tail = self.log_text.strip().splitlines()[-1:] if self.log_text.strip() else []
        return "the runtime exited with status %d without a result%s" % (
            code, (": " + tail[0][:300]) if tail else "")

    @property
    def log_text(self):
        text = self._log.decode("utf-8", "replace")
        if self._log_truncated:
            text += "\n[log truncated: %d more bytes]\n" % self._log_truncated
        return text


class _Timers:
    """One thread for every timeout of the process: a pass costs no timer thread of its own."""

    def __init__(self):
        self._heap = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread = None

    def after(self, delay_s, fn):
        with self._cond:
            self._seq += 1
            entry = [time.monotonic() + delay_s, self._seq, fn]
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tyow-timers", daemon=True)
                self._thread.start()
            self._cond.notify()
            return entry

    def cancel(self, entry):
        entry[2] = None  # dropped when it comes up

    def _run(self):
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, fn = heapq.heappop(self._heap)
            if fn is not None:
                try:
                    fn()
                except Exception:  # a timeout's action must never take the timers down
                    log.exception("a timer failed")


TIMERS = _Timers()


class WarmExecution(Execution):
    """A pass running inside a warm worker: its lines arrive demultiplexed by the worker's
    reader."""

    def __init__(self, pool, spec, timeout_ms):
        self.pool = pool
        self.worker = None  # set under the pool's lock once the pass has a worker
        self.pass_id = spec.pass_id
        self.canceled = False
        self.timed_out = False
        self.queued = False  # its document is queued for the worker (cancel goes through it)
        self.sent = False  # its document is in the worker's stdin
        self.ended_why = None  # set when the worker died under the pass
        self._timeout_ms = timeout_ms
        self._queue = queue.SimpleQueue()
        self._log = []
        self._log_bytes = 0
        self._log_truncated = 0
        self._done = threading.Event()
        self._lock = threading.Lock()  # guards worker and _paused (the pool, cancel, pause)
        self._paused = False
        self._timer = None

    @property
    def lock(self):
        """Guards the pass's worker and whether it is paused (the pool, cancel, pause take it)."""
        return self._lock

    @property
    def paused(self):
        """Whether the pass is frozen (a frozen pass waiting for a slot keeps waiting)."""
        return self._paused

    def is_done(self):
        """Whether the pass has ended."""
        return self._done.is_set()

    def started(self):
        """The pass is in its worker: its timeout counts from now, not from its wait for room."""
        if self._timeout_ms:
            self._timer = TIMERS.after(self._timeout_ms / 1000.0, self._timeout)

    # -- fed by the worker's reader thread --
    def feed(self, line):
        self._queue.put(line)

    def add_log(self, text):
        room = MAX_PASS_LOG_BYTES - self._log_bytes
        if room > 0:
            self._log.append(text[:room])
            self._log_bytes += len(text[:room])
        self._log_truncated += max(0, len(text) - max(room, 0))

    def end(self, why=None):
        """No more lines: the pass ended, was canceled, or its worker died (``why``)."""
        if not self._done.is_set():
            self.ended_why = self.ended_why or why
            self._done.set()
            self._queue.put(None)

    # -- the Execution interface --
    def lines(self):
        for batch in self.batches():
            yield from batch

    def batches(self):
        while True:
            line = self._queue.get()
            if line is None:
                return
            batch = [line]
            while len(batch) < 256:
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    yield batch
                    return
                batch.append(line)
            yield batch

    def add_stray(self, line):
        self.add_log("[stdout] " + line.rstrip("\n") + "\n")

    def _timeout(self):
        if not self._done.is_set():
            self.timed_out = True
            self.cancel()

    def cancel(self):
        with self._lock:
            if self._done.is_set():
                return
            self.canceled = True
            worker, queued = self.worker, self.queued
        if queued:
            worker.cancel(self)
        elif worker is None:
            self.end()  # still waiting for room: it never reaches a worker
            self.pool.wake()
        # else its worker is picked but the pass not queued yet: submit() drops it

    def pause(self):
        with self._lock:
            if self._paused or self._done.is_set():
                return
            self._paused = True
            worker = self.worker
        if worker is not None:
            worker.pause(True)

    def resume(self):
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            worker = self.worker
        if worker is not None:
            worker.pause(False)
        else:
            self.pool.wake()

    def finish(self, grace_s=5.0):
        self._done.wait(grace_s)
        worker = self.worker
        if not self._done.is_set() and worker is not None:
            worker.kill("a pass did not end when asked", culprit=self)
            self._done.wait(5)
        self.resume()
        if self._timer:
            TIMERS.cancel(self._timer)
        if worker is not None:
            worker.finished(self)
        if self.timed_out:
            return "the pass timed out after %s and was stopped" % format_duration(self._timeout_ms)
        if self.canceled:
            return "the pass was stopped"
        return self.ended_why or "the pass ended without a result"

    @property
    def log_text(self):
        text = "".join(self._log)
        if self._log_truncated:
            text += "\n[log truncated: %d more bytes]\n" % self._log_truncated
        return text


class WarmWorker:
    """A long-lived runtime process that runs many passes at once (`shim --worker`).

    A thread of its own writes its stdin and another reads its events, with no lock
    between them: a worker slow to take a large pass document never stops its events
    from being read, and a cancel or a timeout only queues a line or sends a signal.
    """

    def __init__(self, pool, argv, env, cwd, address_space):
        self.pool = pool
        self.passes = {}  # pass id -> WarmExecution
        self.reserved = 0  # picked by the pool for a pass not submitted yet
        self.served = 0
        self.draining = False
        self.dead = None  # why it died
        self.idle_since = time.monotonic()
        self._lock = threading.Lock()  # its state only: never held while writing or reading a pipe
        self._paused = 0
        self._culprit = None  # the pass it was killed for, if it was
        self._heard = False  # it said it is ready: the runtime started
        self._gone = False  # its death was handled: no pass may join it
        self._outbox = queue.SimpleQueue()  # (bytes, execution or None); None: close stdin
        self._stderr_tail = collections.deque(maxlen=20)
        self.proc_exec = ProcessExecution(argv, b"", env=env, cwd=cwd, event_pipe=True,
                                          address_space=address_space, keep_stdin=True,
                                          on_output=self._output)
        self.proc = self.proc_exec.proc
        pid = self.proc.pid
        threading.Thread(target=self._read, name="tyow-worker-%d" % pid, daemon=True).start()
        threading.Thread(target=self._write, name="tyow-worker-in-%d" % pid, daemon=True).start()

    @property
    def load(self):
        return len(self.passes) + self.reserved

    def _output(self, chunk):
        """The worker's own stdout/stderr (child processes with inherited stdio, crashes): it
        cannot be told which pass it came from, so it goes to the scheduler's log, never to a
        run's."""
        self._stderr_tail.append(chunk[-4000:])
        text = chunk.decode("utf-8", "replace").rstrip()
        if text:
            # It may print before its constructor has named its process.
            pid = getattr(getattr(self, "proc", None), "pid", "?")
            log.info("worker %s (%s) printed: %s", pid, self.pool.runtime, text[-2000:])
        return True

    def submit(self, execution, code_path, doc):
        line = (dumps({"op": "pass", "code": code_path, "doc": doc}) + "\n").encode("utf-8")
        with self._lock, execution.lock:
            self.reserved = max(0, self.reserved - 1)
            gone, dropped = self._gone, execution.canceled
            if not gone and not dropped:
                self.passes[execution.pass_id] = execution
                self.served += 1
                # Queued under the pass's lock: a cancel from now on follows it into the worker.
                execution.queued = True
                self._outbox.put((line, execution))
        if dropped:  # canceled after it got this worker, before it reached it: it never runs
            execution.end()
            self.pool.wake()
        elif gone:  # it died before the pass reached it: not the pass's doing, unless the
            # runtime never started at all (then each pass pays, as in _died)
            execution.spared = self._heard
            execution.end(self.dead)
        else:
            execution.started()

    def _write(self):
        """Feed the worker's stdin from the outbox, in order, until told to close it."""
        while True:
            item = self._outbox.get()
            if item is None:
                self.proc_exec.close_stdin()
                return
            data, execution = item
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                # It exited (or cannot take input): its reader sees the end and says why.
                _kill_group(self.proc)
                return
            if execution is not None:
                execution.sent = True

    def cancel(self, execution):
        """Ask the worker to drop the pass; a worker too busy to answer (a busy loop) is killed."""
        line = dumps({"op": "cancel", "pass": execution.pass_id}) + "\n"
        self._outbox.put((line.encode("utf-8"), None))
        TIMERS.after(WORKER_CANCEL_GRACE_S, lambda: execution.is_done() or self.kill(
            "it did not answer a cancel within %.1fs (busy in user code)" % WORKER_CANCEL_GRACE_S,
            culprit=execution))

    def pause(self, paused):
        with self._lock:
            self._paused += 1 if paused else -1
            sig = (signal.SIGSTOP if self._paused == 1 and paused
                   else signal.SIGCONT if self._paused == 0 else None)
        if sig is not None:
            self.proc_exec.send_signal(sig)

    def finished(self, execution):
        with self._lock:
            self.passes.pop(execution.pass_id, None)
            if not self.passes:
                self.idle_since = time.monotonic()
        self.pool.settle(self)
        self.pool.freed()

    def kill(self, why, culprit=None):
        """Stop the worker; ``culprit``: the pass it is stopped for (the others are spared)."""
        with self._lock:
            if self.dead is None:
                self.dead = "the worker was stopped: %s" % why
                self._culprit = culprit
        _kill_group(self.proc)
        self.proc_exec.send_signal(signal.SIGCONT)

    def close(self):
        """Let the worker exit once idle (stdin end-of-file, after what is queued for it)."""
        self.draining = True
        self._outbox.put(None)

    def _read(self):
        for raw in iter(self.proc_exec.event_stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if not line.strip():
                continue
            self._heard = True  # its first line is "ready" (see the shims' worker loop)
            pass_id, kind = _peek_pass(line)
            with self._lock:
                execution = self.passes.get(pass_id)
            if execution is None:
                # a pass that already ended still printed: the scheduler's log, no run's
                if kind == "log":
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        log.info("worker %d: pass %s (ended) printed: %s", self.proc.pid, pass_id,
                                 str(json.loads(line).get("text", "")).rstrip()[:2000])
                continue  # a pass already given up (canceled), or not an event
            if kind == "log":
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    execution.add_log(str(json.loads(line).get("text", "")))
                continue
            if kind == "canceled":
                busy = False
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    busy = bool(json.loads(line).get("busy"))
                execution.end()
                if busy:
                    # A step function of that pass is still running and nothing can stop it
                    # inside the worker: the worker goes, its other passes are given back.
                    self.kill("a step of a canceled pass was still running", culprit=execution)
                continue
            execution.feed(line)
            if kind in TERMINAL_EVENTS:
                execution.end()
        self._died(self.proc.wait())

    def _died(self, code):
        """Say why the worker died, and end the passes it held: the one that killed it, if known,
        is charged; the others are spared (given back; if the culprit is not known, those that
        were in the worker run alone from then on, where a death is their own)."""
        self.proc_exec.wait_stderr(2)
        said = b"".join(self._stderr_tail).decode("utf-8", "replace")[-4000:]
        tail = said.strip().splitlines()[-1:]
        limit = self.pool.adapter.config["limits.pass_memory"]
        with self._lock:
            if self.dead is None:
                if code != 0 and re.search(r"heap out of memory|MemoryError", said):
                    self.dead = "the pass ran out of memory%s" % (
                        " (limits.pass_memory: %s)" % _format_size(limit) if limit else "")
                elif code < 0:
                    self.dead = "the runtime was killed by signal %d" % -code
                else:
                    self.dead = "the worker exited with status %d%s" % (
                        code, (": " + tail[0][:300]) if tail else "")
            self._gone = True
            live = [e for e in self.passes.values() if not e.is_done()]
            culprit = self._culprit
        self._outbox.put(None)  # its writer stops
        charged = [culprit] if culprit is not None else []
        if not self._heard:
            # It never said it is ready: the runtime itself cannot start (a bad interpreter
            # or option, too little memory). Each pass pays, as a process per pass would.
            charged = live
        elif culprit is None and self.served == 1 and len(live) == 1:
            # Alone in a worker that never ran another pass (nothing an earlier pass left
            # running, a timer or a leak, can have done it): its own doing.
            charged = live
        for execution in live:
            execution.spared = execution not in charged and not execution.canceled
            execution.suspect = execution.spared and execution.sent and not charged
            execution.end(self.dead)
        self.proc_exec.finish(grace_s=0)
        self.pool.settle(self)
        self.pool.wake()


def _peek_pass(line):
    """(pass id, event type) of a worker's line, without a full parse when it is cheap."""
    m = _EVENT_HEAD.match(line.lstrip())
    if m:
        return m.group(2), m.group(1)
    try:
        ev = json.loads(line)
        return ev.get("pass"), ev.get("type")
    except (ValueError, AttributeError):
        return None, None


_EVENT_HEAD = re.compile(r'\{"type":\s*"([a-z_]+)",\s*"pass":\s*"([^"\\]+)"')


class WorkerPool:
    """Warm workers of one runtime for the exec adapter: bounded, recycled, idle ones exit."""

    def __init__(self, adapter, runtime):
        self.adapter = adapter
        self.runtime = runtime
        self.workers = []
        self._spawning = 0
        self._frozen = 0  # passes waiting for room that are frozen (a lease in doubt)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._requests = queue.SimpleQueue()
        # Workers are spawned from one long-lived thread: PR_SET_PDEATHSIG ties a
        # child to the thread that started it, and pass threads come and go.
        threading.Thread(target=self._spawner, name="tyow-pool-" + runtime, daemon=True).start()
        threading.Thread(target=self._janitor, name="tyow-janitor-" + runtime, daemon=True).start()

    @property
    def size(self):
        return max(1, min(self.adapter.config["concurrency"], os.cpu_count() or 1))

    @property
    def slots(self):
        """Passes at once per worker: Python threads share one lock, so a few; Node has no such
        limit."""
        return PYTHON_WORKER_SLOTS if self.runtime == "python" else None

    def run(self, spec, code_path, doc):
        execution = WarmExecution(self, spec, self.adapter.config["adapters.exec.timeout"])
        if spec.on_execution is not None:
            spec.on_execution(execution)
        worker = self._worker(execution)
        if worker is not None:  # else it was stopped while it waited: it has ended
            worker.submit(execution, code_path, doc)
        return execution

    def wake(self):
        """Tell all those waiting for room that something changed (a pass stopped, went on)."""
        with self._cond:
            self._cond.notify_all()

    def freed(self):
        """One slot is free: one waiter, not a herd of them (all if a frozen one might take it)."""
        with self._cond:
            if self._frozen:
                self._cond.notify_all()
            else:
                self._cond.notify()

    def _wait_for_room(self, execution):
        """Wait (under the pool's lock) until a slot frees or the pass may go on."""
        frozen = execution.paused
        self._frozen += frozen
        try:
            self._cond.wait(5.0)
        finally:
            self._frozen -= frozen

    @staticmethod
    def _take(worker, execution):
        """Give ``worker`` to the pass, unless the pass was stopped or frozen meanwhile."""
        with execution.lock:
            if execution.canceled or execution.paused:
                return False
            execution.worker = worker
            return True

    def _worker(self, execution):
        """An idle worker, else a new one while under size, else the least loaded; None if the pass
        was stopped while it waited (a frozen pass waits until it may go on)."""
        with self._cond:
            while True:
                if execution.canceled:
                    return None
                usable = [w for w in self.workers if w.dead is None and not w.draining]
                idle = [w for w in usable if w.load == 0]
                may_spawn = len(self.workers) + self._spawning < self.size
                best = idle[0] if idle else None
                if best is None and usable and not may_spawn:
                    best = min(usable, key=lambda w: w.load)
                    if self.slots is not None and best.load >= self.slots:
                        best = None
                if best is not None:
                    if self._take(best, execution):
                        best.reserved += 1
                        return best
                    if execution.canceled:
                        return None
                elif may_spawn and not execution.paused:
                    self._spawning += 1
                    reply = queue.SimpleQueue()
                    self._requests.put(reply)
                    break
                self._wait_for_room(execution)  # workers starting, or all full
        worker = reply.get()
        if isinstance(worker, BaseException):
            raise worker
        with self._cond:  # the spawner registered it with our reservation made
            while not self._take(worker, execution):
                if execution.canceled:
                    worker.reserved -= 1
                    self._cond.notify_all()
                    return None
                self._wait_for_room(execution)  # frozen: keep the worker until it may go on
        return worker

    def _spawner(self):
        while True:
            reply = self._requests.get()
            if reply is None:  # the pool closed
                return
            try:
                worker = WarmWorker(self, self.adapter.worker_argv(self.runtime),
                                    self.adapter.worker_env(), self.adapter.work_dir,
                                    self.adapter.address_space(self.runtime))
                with self._cond:
                    # Reserved for its requester before anyone sees it: never taken as idle.
                    worker.reserved += 1
                    self.workers.append(worker)
                    self._spawning -= 1
                    self._cond.notify_all()
                reply.put(worker)
            except BaseException as exc:
                with self._cond:
                    self._spawning -= 1
                    self._cond.notify_all()
                reply.put(exc)

    def settle(self, worker):
        """After a pass ends: recycle a worker that served its share or grew too big; forget dead
        ones."""
        with self._lock:
            if worker.dead is not None:
                if worker in self.workers:
                    self.workers.remove(worker)
                return
            if not worker.draining and (worker.served >= WORKER_MAX_PASSES
                                        or self._too_big(worker)):
                worker.draining = True
            if worker.draining and worker.load == 0:
                if worker in self.workers:
                    self.workers.remove(worker)
                worker.close()

    def _too_big(self, worker):
        limit = self.adapter.config["limits.pass_memory"]
        if not limit or worker.served % 50:
            return False
        try:
            with open("/proc/%d/status" % worker.proc.pid) as f:
                rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024
        except (OSError, AttributeError, ValueError):
            return False
        return rss > limit * 0.8

    def _janitor(self):
        while not self._closed.wait(1.0):
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self.workers
                        if w.load == 0 and now - w.idle_since > WORKER_IDLE_S]
                for w in idle:
                    self.workers.remove(w)
            for w in idle:
                w.close()

    def close(self):
        self._closed.set()
        self._requests.put(None)
        with self._lock:
            workers, self.workers = self.workers, []
        for w in workers:
            w.close()

    def alive(self, busy=False):
        with self._lock:
            return [w.proc.pid for w in self.workers if w.dead is None and (w.load or not busy)]


class Adapter:
    """A compute platform that runs passes. Picked by name from ADAPTERS."""

    name = "?"
    CHECK_CACHE_S = 60  # check() runs before every pass: a passing check is trusted this long

    def __init__(self, config):
        self.config = config
        self._checked = {}
        self.store_fn = None  # set by the Sidecar: the store, opened when first needed

    @property
    def enabled(self):
        return bool(self.config.get("adapters.%s.enabled" % self.name))

    def check(self, runtime=None):
        """Raise AdapterError saying what is missing and how to fix it."""
        if not self.enabled:
            raise AdapterError("adapter %r is disabled; set adapters.%s.enabled: true in %s"
                               % (self.name, self.name, self.config.path))
        key = runtime or "*"
        if time.time() - self._checked.get(key, 0) < self.CHECK_CACHE_S:
            return
        self._check(runtime)
        self._checked[key] = time.time()

    def _check(self, runtime):
        """The adapter's own checks (binaries, engine, API), behind check()'s cache."""

    def validate(self, runtime, code):
        """Reject code the runtime cannot load (syntax errors), before anything is stored."""
        validate_code(runtime, code, self.config)

    def deploy(self, workflow_id, code, runtime):
        """Make a new version runnable on the platform (remote upload); local adapters need
        nothing."""

    def launch(self, spec):
        """Start one pass; returns an Execution."""
        raise NotImplementedError

    def reap(self, run_id, pass_id):
        """Stop whatever may still run a pass whose scheduler died (before it is replayed)."""

    def cleanup(self, store=None):
        """Remove what the adapter left behind (orphan containers, old files)."""

    def close(self):
        """Let go of long-lived helpers (warm workers)."""


def _which(binary, env_path=None):
    return shutil.which(binary, path=env_path)


def validate_code(runtime, code, config):
    """Syntax-check workflow code with the runtime's own parser; raise InputError with the line."""
    if not code.strip():
        raise InputError("the workflow code is empty; pass a file with -f FILE or pipe it on stdin")
    try:
        code.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the workflow code is not valid UTF-8 text; save it as UTF-8")
    if "\0" in code:
        raise InputError("the workflow code contains a NUL byte; is it a binary file?")
    if runtime == "python":
        try:
            import ast
            tree = ast.parse(code, "<workflow>")
        except SyntaxError as exc:
            raise InputError("syntax error in the workflow code at line %s: %s"
                             % (exc.lineno, exc.msg))
        names = {n.name for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        names |= {t.id for n in tree.body if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name)}
        if "workflow" not in names:
            raise InputError("the workflow code defines no top-level function named `workflow`; "
                             "write `def workflow(input, ctx): ...`")
        return
    if re.search(r"^\s*def\s+workflow\s*\(", code, re.M):
        raise InputError("this looks like Python (def workflow); deploy it with --runtime python")
    if re.search(r"^\s*(import\s[\w{*\s,]+\sfrom\s|import\s+['\"]|export\s)", code, re.M):
        raise InputError("ES module syntax (import/export) is not supported in workflow code; "
                         "use require() (exec, docker) or inline what it needs")
    node = config["adapters.exec.node"]
    node_path = _which(node)
    if not node_path:
        raise AdapterError("%s not found on PATH, needed to check JavaScript workflows; "
                           "install Node >= 18 or set adapters.exec.node" % node)
    if not re.search(r"\bworkflow\b", code):
        raise InputError("the workflow code defines no function named `workflow`; write "
                         "`async function workflow(input, { step, sleep }) { ... }`")
    node_check(code, "workflow.js",
               lambda path: run_command([node_path, "--check", path], timeout_s=30))


def node_check(text, filename, run):
    """Syntax-check ``text`` saved as ``filename`` in a temp dir: ``run(path)`` runs
    `node --check`."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="tyow-check-") as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o755)  # a container user may need to read it
        os.chmod(path, 0o644)
        rc, _, err = run(path)
    if rc != 0:
        raise _syntax_error(err)


def _syntax_error(err):
    """InputError from `node --check` stderr: the line and the SyntaxError."""
    m = re.search(r"workflow\.m?js:(\d+)", err)
    detail = [ln for ln in err.splitlines() if re.match(r"^\w*Error", ln)]
    return InputError("syntax error in the workflow code%s: %s" % (
        " at line %s" % m.group(1) if m else "", detail[0] if detail else err.strip()[-300:]))


class ExecAdapter(Adapter):
    """Each pass is a local node/python process in its own process group."""

    name = "exec"
    SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")

    def binary(self, runtime):
        return self.config["adapters.exec.node" if runtime == "node" else "adapters.exec.python"]

    def _check(self, runtime):
        for rt in ([runtime] if runtime else list(RUNTIMES)):
            b = self.binary(rt)
            if not _which(b):
                raise AdapterError("%s not found on PATH (needed for %s workflows); %s, "
                                   "or set adapters.exec.%s to its full path"
                                   % (b, rt,
                                      "install Node >= 18" if rt == "node"
                                      else "install Python >= 3.9",
                                      "node" if rt == "node" else "python"))
            runtime_source(rt)

    def env(self, spec):
        env = {k: os.environ[k] for k in self.SAFE_ENV if k in os.environ}
        env.update(self.config["adapters.exec.env"])
        env["HOME"] = self.work_dir
        env[OWNER_ENV] = owner_mark(self.store_fn().store_id if self.store_fn else None)
        if spec is not None:  # a warm worker serves many runs: it has none
            env["TY_OPENWORKFLOW_RUN_ID"] = spec.run_id
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @property
    def work_dir(self):
        return self.config["adapters.exec.work_dir"]

    def __init__(self, config):
        super().__init__(config)
        self._pools = {}
        self._pool_lock = threading.Lock()
        self._code_paths = {}

    def _runtime_argv(self, runtime):
        memory = self.config["limits.pass_memory"] or None
        argv = [_which(self.binary(runtime))]
        if runtime == "node" and memory:
            # V8 reserves far more address space than it uses: bound its heap instead.
            argv.append("--max-old-space-size=%d" % max(16, memory >> 20))
        return argv + [self._shim(runtime)]

    def _shim(self, runtime):
        return materialize(os.path.join(self.work_dir, "runtimes"), RUNTIMES[runtime]["shim"],
                           runtime_source(runtime))

    def address_space(self, runtime):
        return (self.config["limits.pass_memory"] or None) if runtime == "python" else None

    def worker_argv(self, runtime):
        return self._runtime_argv(runtime) + ["--worker"]

    def worker_env(self):
        env = self.env(None)
        return env

    def _code(self, spec):
        # The version's code is written once and its path remembered (no hash per pass).
        key = (spec.version.get("workflow_id"), spec.version.get("version"),
               spec.version.get("code_hash"))
        path = self._code_paths.get(key) if key[2] else None
        if path is None or not os.path.exists(path):
            path = materialize(os.path.join(self.work_dir, "code"),
                               "workflow" + RUNTIMES[spec.runtime]["ext"], spec.version["code"])
            if key[2]:
                self._code_paths[key] = path
        return path

    @property
    def warm(self):
        return self.config["adapters.exec.mode"] == "warm"

    def pool(self, runtime):
        with self._pool_lock:
            if runtime not in self._pools:
                self._pools[runtime] = WorkerPool(self, runtime)
            return self._pools[runtime]

    def launch(self, spec):
        self.check(spec.runtime)
        code = self._code(spec)
        if self.warm and not spec.isolated:
            return self.pool(spec.runtime).run(spec, code, spec.doc)
        # Its own process: what it does to that process (a crash, its memory) is its own.
        return ProcessExecution(self._runtime_argv(spec.runtime) + [code],
                                (dumps(spec.doc) + "\n").encode("utf-8"),
                                env=self.env(spec), cwd=self.work_dir,
                                timeout_ms=self.config["adapters.exec.timeout"],
                                event_pipe=True, address_space=self.address_space(spec.runtime),
                                memory=self.config["limits.pass_memory"] or None)

    def workers(self, busy=False):
        """Pids of the warm workers alive (``busy``: running a pass now), per runtime."""
        with self._pool_lock:
            return {rt: pool.alive(busy) for rt, pool in self._pools.items()}

    def close(self):
        with self._pool_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def cleanup(self, store=None):
        """Stop what passes of a dead scheduler left running; drop cached code files older than a
        week."""
        if store is not None:
            reap_orphans(store.store_id)
        cutoff = time.time() - 7 * 86400
        folder = os.path.join(self.work_dir, "code")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            p = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if os.path.getmtime(p) < cutoff:
                    os.remove(p)


class DockerAdapter(Adapter):
    """Each pass is `docker run --rm -i` of the runtime image, shim and code mounted read-only."""

    name = "docker"
    LABEL = "ty-openworkflow"
    def cfg(self, key):
        return self.config["adapters.docker." + key]

    @property
    def work_dir(self):
        return self.cfg("work_dir")

    @property
    def install_id(self):
        """Labels containers with the store they belong to, so installs never touch each other's
        (not the data dir's path: two machines or containers may use one path for two stores)."""
        if self.store_fn is None:  # no store, no clean-up: the path will do
            return sha256_hex(self.config.data_dir)[:12]
        return self.store_fn().store_id

    def image(self, runtime):
        return self.cfg("node_image" if runtime == "node" else "python_image")

    def docker(self, args, timeout_s=30):
        """Run a short docker CLI command; returns (rc, stdout, stderr)."""
        binary = _which(self.cfg("docker"))
        if not binary:
            raise AdapterError("%s not found on PATH; install Docker (e.g. apt-get install "
                               "docker.io) or set adapters.docker.docker" % self.cfg("docker"))
        return run_command([binary] + list(args), timeout_s=timeout_s)

    def _check(self, runtime):
        rc, out, err = self.docker(["version", "--format", "{{.Server.Version}}"], timeout_s=15)
        if rc != 0 or not out.strip():
            detail = (err.strip().splitlines() or ["no answer"])[-1][:200]
            raise AdapterError("the docker engine is not reachable (%s); start it "
                               "(e.g. `systemctl start docker`) or point DOCKER_HOST at it"
                               % detail)
        if self.cfg("pull") == "never":
            for rt in ([runtime] if runtime else list(RUNTIMES)):
                image = self.image(rt)
                rc, _, _ = self.docker(["image", "inspect", "--format", "{{.Id}}", image],
                                       timeout_s=15)
                if rc != 0:
                    raise AdapterError("docker image %s (for %s workflows) is not present; "
                                       "run `docker pull %s`, set adapters.docker.%s_image, "
                                       "or set adapters.docker.pull: missing"
                                       % (image, rt, image, "node" if rt == "node" else "python"))
        for rt in ([runtime] if runtime else list(RUNTIMES)):
            runtime_source(rt)

    def validate(self, runtime, code):
        if runtime == "python":
            validate_code(runtime, code, self.config)
            return
        if _which(self.config["adapters.exec.node"]):
            validate_code(runtime, code, self.config)
            return
        # No node on this host: check the syntax inside the image instead.
        validate_code_in_docker(self, code)

    def _mount(self, sub, filename, text):
        path = materialize(os.path.join(self.work_dir, sub), filename, text)
        os.chmod(os.path.dirname(path), 0o755)  # the container user (not root) must read it
        return path

    def run_argv(self, spec, name):
        rt = spec.runtime
        shim = self._mount("runtimes", RUNTIMES[rt]["shim"], runtime_source(rt))
        code = self._mount("code", "workflow" + RUNTIMES[rt]["ext"], spec.version["code"])
        inside_shim = "/ow/" + RUNTIMES[rt]["shim"]
        inside_code = "/ow/workflow" + RUNTIMES[rt]["ext"]
        argv = [_which(self.cfg("docker")), "run", "--rm", "-i", "--name", name,
                "--label", "%s=1" % self.LABEL,
                "--label", "%s.install=%s" % (self.LABEL, self.install_id),
                "--label", "%s.run=%s" % (self.LABEL, spec.run_id),
                "--label", "%s.pass=%s" % (self.LABEL, spec.pass_id),
                "--pull", self.cfg("pull"),
                "--network", self.cfg("network") or "none",
                "--init",
                "-v", "%s:%s:ro" % (shim, inside_shim), "-v", "%s:%s:ro" % (code, inside_code),
                "-w", "/tmp", "-e", "HOME=/tmp", "-e", "TY_OPENWORKFLOW_RUN_ID=%s" % spec.run_id,
                "-e", "PYTHONDONTWRITEBYTECODE=1", "-e", "PYTHONUNBUFFERED=1"]
        for k, v in sorted(self.cfg("env").items()):
            argv += ["-e", "%s=%s" % (k, v)]
        for host, inside in sorted(self.cfg("volumes").items()):
            argv += ["-v", "%s:%s" % (os.path.expanduser(host), inside)]
        if self.cfg("memory"):
            argv += ["--memory", self.cfg("memory")]
        if self.cfg("cpus"):
            argv += ["--cpus", self.cfg("cpus")]
        if self.cfg("pids_limit"):
            argv += ["--pids-limit", str(self.cfg("pids_limit"))]
        if self.cfg("user"):
            argv += ["--user", self.cfg("user")]
        if self.cfg("read_only"):
            argv += ["--read-only", "--tmpfs", "/tmp:rw,size=64m"]
        binary = "node" if rt == "node" else "python3"
        # Inside, events go to fd 3 (docker's stdout) and fd 1 joins stderr in the
        # log, so nothing the workflow or its children print reaches the event stream.
        return argv + ["-e", "TYOW_EVENT_FD=3", self.image(rt), "/bin/sh", "-c",
                       'exec 3>&1 1>&2 && exec "$0" "$@"', binary, inside_shim, inside_code]

    @staticmethod
    def container_name(pass_id):
        return "tyow-%s" % pass_id.replace("_", "-")

    def launch(self, spec):
        self.check(spec.runtime)
        name = self.container_name(spec.pass_id)
        argv = self.run_argv(spec, name)

        def kill_container():
            # Killing the client is not enough: the container would run on without it.
            self.docker(["rm", "-f", name], timeout_s=20)

        def freeze(paused):  # the container runs apart from its client: freeze it too
            self.docker(["pause" if paused else "unpause", name], timeout_s=20)

        return ProcessExecution(argv, (dumps(spec.doc) + "\n").encode("utf-8"), cwd=None,
                                timeout_ms=self.cfg("timeout"), on_stop=kill_container,
                                on_pause=freeze)

    def containers(self):
        """Our containers: (name, run id, pass id) for each, running or not."""
        rc, out, err = self.docker(["ps", "-a", "--filter",
                                    "label=%s.install=%s" % (self.LABEL, self.install_id),
                                    "--format",
                                    '{{.Names}}\t{{.Label "%s.run"}}\t{{.Label "%s.pass"}}'
                                    % (self.LABEL, self.LABEL)], timeout_s=30)
        if rc != 0:
            raise AdapterError("docker ps failed: %s" % (err.strip().splitlines() or ["?"])[-1])
        return [tuple(line.split("\t")) for line in out.splitlines() if line.count("\t") == 2]

    def reap(self, run_id, pass_id):
        """A replay must not run beside the lost pass's container: remove it first."""
        rc, _, err = self.docker(["rm", "-f", self.container_name(pass_id)], timeout_s=30)
        if rc == 0:
            log.info("docker: removed the container of lost pass %s of run %s", pass_id, run_id)

    def cleanup(self, store=None):
        """Remove our containers whose pass is no longer running (a killed client leaves them
        behind)."""
        removed = []
        if store is None:
            return removed
        now = now_ms()
        for name, run_id, pass_id in self.containers():
            if not store.pass_is_current(run_id, pass_id, now):
                self.docker(["rm", "-f", name], timeout_s=20)
                removed.append(name)
        if removed:
            log.info("docker: removed %d orphaned container(s): %s",
                     len(removed), ", ".join(removed))
        return removed


def validate_code_in_docker(adapter, code):
    """`node --check` inside the node image, for hosts without node."""
    node_check(code, "workflow.js", lambda path: adapter.docker(
        ["run", "--rm", "--network", "none", "--pull", adapter.cfg("pull"),
         "-v", "%s:/ow/workflow.js:ro" % path,
         adapter.image("node"), "node", "--check", "/ow/workflow.js"], timeout_s=60))


# ---------------------------------------------------------------------------
# Cloudflare: passes run in Workers (an API client, the Worker scripts, the adapter)
# ---------------------------------------------------------------------------

# The one point of contact for HTTP as a client (Cloudflare's API and Workers, TaskYou's API).
USER_AGENT = "ty-openworkflow/%s (python %d.%d)" % ((__version__,) + tuple(sys.version_info[:2]))


def http_connection(url, timeout_s):
    """An (unconnected) HTTP(S) connection for ``url``, the request target, and the URL's parts."""
    import http.client
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdapterError("bad URL %r" % url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return cls(parts.hostname, parts.port, timeout=timeout_s), target, parts


def http_request(method, url, headers=None, body=None, timeout_s=30, stream=False,
                 on_connection=None):
    """The one place that makes HTTP requests. Returns (status, headers, body), or
    (connection, response) with ``stream``; raises AdapterError when unreachable.
    Every request says who it is (User-Agent). ``on_connection(conn)`` sees the connection
    before the request is sent (so another thread can shut a long stream down)."""
    import http.client
    conn, target, parts = http_connection(url, timeout_s)
    headers = dict(headers or {})
    headers.setdefault("User-Agent", USER_AGENT)
    if on_connection is not None:
        on_connection(conn)
    try:
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        if stream:
            return conn, resp
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise AdapterError("cannot reach %s://%s (%s)" % (parts.scheme, parts.netloc, exc))
    finally:
        if not stream:
            conn.close()


def _http_exception():
    import http.client
    return http.client.HTTPException


def multipart(parts):
    """Encode ``(name, filename, content_type, bytes)`` parts as multipart/form-data."""
    boundary = "tyow-" + os.urandom(16).hex()
    out = []
    for name, filename, ctype, data in parts:
        disp = 'form-data; name="%s"' % name + ('; filename="%s"' % filename if filename else "")
        head = "--%s\r\nContent-Disposition: %s\r\nContent-Type: %s\r\n\r\n" % (
            boundary, disp, ctype)
        out.append(head.encode("utf-8") + data + b"\r\n")
    out.append(("--%s--\r\n" % boundary).encode("utf-8"))
    return b"".join(out), "multipart/form-data; boundary=%s" % boundary


def _retry_after_s(value, default):
    """Seconds from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return default


class NotReady(AdapterError):
    """The platform cannot take the pass yet (a new route still propagating): try again in
    ``retry_ms``, without counting an attempt."""

    def __init__(self, message, retry_ms):
        super().__init__(message)
        self.retry_ms = retry_ms


class CloudflareError(AdapterError):
    """A Cloudflare API call that failed: its HTTP status and the error codes of its body."""

    def __init__(self, message, status=None, codes=(), detail=None):
        super().__init__(message)
        # detail: "HTTP 404: 10007 ..."
        self.status, self.codes, self.detail = status, tuple(codes), detail


# Cloudflare's API allows 1,200 calls per 5 minutes per user (shared with the dashboard and
# wrangler), then blocks every call for 5 minutes with HTTP 429.
CF_RATE_WINDOW_S = 300.0
CF_TOKEN_CODES = {6003, 6100, 6101, 6102, 6103, 6111, 9106, 9109, 10000, 10001, 10023}
CF_BAD_TOKEN_CODES = {6003, 6100, 6101, 6102, 6103, 6111}  # the token text itself is malformed
CF_QUOTA_CODES = {10048}  # KV's daily free-plan quotas
CF_NOT_FOUND = 10007
CF_TOO_MANY_SCRIPTS = 10037
CF_NO_CPU_LIMIT = 100328
# Errors of the workers.dev edge, shown as "error code: N" in its answer.
CF_EDGE_ERRORS = {
    "1101": "the Worker threw an exception or was stopped before it answered",
    "1102": "the Worker exceeded its resource limits, CPU time or memory",
    "1015": "Cloudflare is rate-limiting requests to this account's Workers (the Workers Free "
            "plan allows 1,000 a minute)",
    "1027": "the account's Workers requests for the day are used up (the Workers Free plan allows "
            "100,000 a day, reset at 00:00 UTC; Workers Paid has no daily limit)",
    "523": "the workers.dev route is not reachable yet",
}
# Edge errors that say the Worker ran, or was refused for the account's use: never a route that
# is still spreading.
CF_WORKER_FAULTS = {"1101", "1102", "1015", "1027"}
# Cloudflare's limits per invocation of a Worker (developers.cloudflare.com workers/platform/limits
# and kv/platform/limits): KV operations (any plan) and subrequests (fetch: Free, Paid).
CF_KV_OPS_PER_INVOCATION = 1000
CF_SUBREQUESTS = (50, 10000)


def cpu_limit_hint(cpu_ms):
    """Cloudflare's CPU time limit as it applies to these Workers, and what to do about it."""
    split = ("split the work into smaller steps, with a sleep between heavy ones so each pass (one "
             "request) does less")
    if cpu_ms:
        return ("the CPU time limit set by adapters.cloudflare.cpu_ms (%d ms, Workers Paid): raise "
                "it (up to 300000) or %s" % (cpu_ms, split))
    return ("Cloudflare's CPU time limit per request (Workers Free: 10 ms, fixed; Workers Paid: "
            "30 s by default): on Paid set adapters.cloudflare.cpu_ms (up to 300000); on Free %s"
            % split)


def name_worker_limits(message):
    """A Worker's error message with the Cloudflare limit it comes from named, if it is one."""
    if not isinstance(message, str) or "Too many subrequests" not in message:
        return message
    return ("%s (Cloudflare allows %d subrequests, fetch() calls, per invocation on the Workers "
            "Free plan and %d on Paid; a pass is one invocation: fewer fetch calls per step, or a "
            "sleep between steps that fetch)" % ((message,) + CF_SUBREQUESTS))


def next_utc_midnight_ms(now):
    """Milliseconds from ``now`` (epoch ms) to the next 00:00 UTC."""
    return 86400000 - now % 86400000


def edge_error_code(text):
    """The workers.dev edge's error code in an answer's body ("error code: 1102"), or None."""
    m = re.search(r"error code:?\s*(\d{3,4})", text or "")
    return m.group(1) if m else None


def free_plan_refusal(code):
    """The NotReady for the Workers Free plan's request limits (edge errors 1015, 1027): the
    Worker did not run, and will once the minute or the day is over. Else None."""
    if code == "1015":
        return NotReady("Cloudflare error 1015: %s; the pass is given back for a minute"
                        % CF_EDGE_ERRORS[code], 60000)
    if code == "1027":
        return NotReady("Cloudflare error 1027: %s; the pass is given back until then"
                        % CF_EDGE_ERRORS[code], next_utc_midnight_ms(now_ms()) + 60000)
    return None


class _ApiBudget:
    """One process's share of the account's API calls: a sliding 5-minute window and the block
    after a 429.

    Shared by every thread of the process for one API base and token holder, so a
    busy serve slows down before Cloudflare blocks it, and waits out a block instead
    of hammering it."""

    _all = {}
    _all_lock = threading.Lock()

    @classmethod
    def of(cls, key, limit):
        with cls._all_lock:
            budget = cls._all.get(key)
            if budget is None:
                budget = cls._all[key] = cls()
            budget.limit = limit
            return budget

    def __init__(self):
        self.limit = 1000
        self.times = collections.deque()
        self.blocked_until = 0.0
        self.lock = threading.Lock()

    def _wait_s(self, now):
        """Seconds until a call may be made (0: now); the caller holds the lock."""
        while self.times and self.times[0] <= now - CF_RATE_WINDOW_S:
            self.times.popleft()
        wait = self.blocked_until - now
        if len(self.times) >= self.limit:
            wait = max(wait, self.times[0] + CF_RATE_WINDOW_S - now)
        return max(0.0, wait)

    def take(self, deadline, stop):
        """Take a call slot, waiting up to the monotonic ``deadline`` or ``stop()``; returns 0,
        or the seconds still to wait."""
        while True:
            # Looked at and taken at once: threads cannot all see the same free slot.
            with self.lock:
                now = time.monotonic()
                wait = self._wait_s(now)
                if wait <= 0:
                    self.times.append(now)
                    return 0.0
            if time.monotonic() + wait > deadline or stop():
                return wait
            time.sleep(min(wait, 1.0))

    def block(self, seconds):
        with self.lock:
            self.blocked_until = max(self.blocked_until, time.monotonic() + seconds)


class CloudflareApi:
    """The Cloudflare API v4 as one verb, ``call``: the token, the process's budget, retries
    that honour Retry-After, and answers mapped to CloudflareErrors that say what to do."""

    PATIENCE_S = 60.0  # how long one call may wait out 429s, 5xx and a busy budget

    def __init__(self, config, scripts_held=lambda: 0):
        self.config = config
        self.scripts_held = scripts_held  # how many Workers this install holds (for a full account)
        self._token = None

    def cfg(self, key):
        return self.config["adapters.cloudflare." + key]

    def token(self):
        """The API token, from ``api_token_cmd``: kept in memory only, never logged or stored."""
        if self._token:
            return self._token
        cmd = self.cfg("api_token_cmd")
        if not cmd.strip():
            raise AdapterError("adapters.cloudflare.api_token_cmd is empty; set it to a command "
                               "that prints the API token (e.g. op read "
                               "'op://Private/Cloudflare/api_token')")
        rc, out, err = run_command(["/bin/sh", "-c", cmd], timeout_s=60)
        if rc != 0:
            raise AdapterError("adapters.cloudflare.api_token_cmd failed (exit %d): %s" % (
                rc, (err.strip().splitlines() or ["no message"])[-1][:200]))
        token = out.strip()
        if not token or any(ch.isspace() for ch in token):
            raise AdapterError("adapters.cloudflare.api_token_cmd printed no token "
                               "(expected one line)")
        self._token = token
        return token

    def budget(self):
        """This process's share of the account's calls (one per API base and account)."""
        key = (self.cfg("api_base"), self.cfg("account_id"))
        return _ApiBudget.of(key, self.cfg("api_budget"))

    def call(self, method, path, body=None, content_type="application/json", raw=False,
             patience_s=None, stop=None, whole=False):
        """One call; returns ``result`` (the raw body with ``raw``, the whole envelope with
        ``whole``), raises CloudflareError.

        429 and 5xx answers and unreachable moments are retried with backoff (a 429's
        Retry-After blocks every call of the process that long), within ``patience_s``
        or until ``stop()``; a 401/403 reads the token again once (it may have been rotated)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        patience = self.PATIENCE_S if patience_s is None else patience_s
        deadline = time.monotonic() + patience
        stopped = stop or (lambda: False)
        budget = self.budget()
        url = self.cfg("api_base").rstrip("/") + path
        backoff, fresh = 1.0, False
        while True:
            wait = budget.take(deadline, stopped)
            if wait:
                raise self._rate_limited(wait)
            headers = {"Authorization": "Bearer " + self.token()}
            if body is not None:
                headers["Content-Type"] = content_type
            try:
                status, rheaders, data = http_request(method, url, headers, body)
            except AdapterError:
                if time.monotonic() + backoff > deadline or stopped():
                    raise
                time.sleep(backoff)
                backoff = min(backoff * 2, 15.0)
                continue
            if raw and 200 <= status < 300:
                return data
            envelope = self._envelope(status, data)
            codes = self._codes(envelope)
            retry_after = rheaders.get("retry-after")
            if status == 429 and not (codes & CF_QUOTA_CODES):
                # Never sooner than the backoff, even told "Retry-After: 0": a tight loop would
                # only be blocked.
                budget.block(max(backoff, _retry_after_s(retry_after, CF_RATE_WINDOW_S)))
                backoff = min(backoff * 2, 15.0)
                continue
            if status >= 500 and time.monotonic() + backoff <= deadline and not stopped():
                pause = max(backoff, min(_retry_after_s(retry_after, 0), 30.0))
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                backoff = min(backoff * 2, 15.0)
                continue
            if status in (401, 403) and not fresh and (codes & CF_TOKEN_CODES or not codes):
                # The token may have been rotated: read it again once.
                fresh, self._token = True, None
                continue
            break
        if 200 <= status < 300 and isinstance(envelope, dict) and envelope.get("success", True):
            return envelope if whole else envelope.get("result")
        raise self._error(method, path, status, envelope, data, codes)

    @staticmethod
    def _rate_limited(wait_s):
        return CloudflareError(
            "the Cloudflare API is rate-limiting this account (at most 1,200 calls per 5 minutes "
            "per user, shared with the dashboard and wrangler; adapters.cloudflare.api_budget is "
            "this process's share); calls resume in %s" % format_duration(int(wait_s * 1000)),
            429, (971,))

    @staticmethod
    def _envelope(status, data):
        try:
            if not data.strip():
                return {"success": 200 <= status < 300}
            return json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

    @staticmethod
    def _errors(envelope):
        errors = envelope.get("errors") if isinstance(envelope, dict) else None
        return [e for e in errors or [] if isinstance(e, dict)]

    @staticmethod
    def _chain(error):
        return [c for c in error.get("error_chain") or [] if isinstance(c, dict)]

    def _codes(self, envelope):
        codes = set()
        for e in self._errors(envelope):
            for item in [e] + self._chain(e):
                with contextlib.suppress(TypeError, ValueError):
                    codes.add(int(item.get("code")))
        return codes

    def _error(self, method, path, status, envelope, data, codes):
        """A CloudflareError naming what went wrong, by the codes of the answer."""
        parts = []
        for e in self._errors(envelope):
            text = ("%s %s" % (e.get("code", ""), e.get("message", ""))).strip()
            chain = ["%s %s" % (c.get("code", ""), c.get("message", "")) for c in self._chain(e)]
            parts.append(text + (" [%s]" % "; ".join(chain) if chain else ""))
        detail = "; ".join(parts) or (data[:200].decode("utf-8", "replace").strip() or "no body")
        what = "HTTP %d: %s" % (status, detail)
        if CF_TOO_MANY_SCRIPTS in codes:
            message = ("the account holds as many Workers as its plan allows (%s); this "
                       "install holds %d of them (`ty-openworkflow adapters`); delete Workers you "
                       "no longer use in the dashboard (Free: 100, Paid: 500)"
                       % (what, self.scripts_held()))
        elif CF_NO_CPU_LIMIT in codes:
            message = ("the account's plan does not take a CPU limit (%s); set "
                       "adapters.cloudflare.cpu_ms: 0 (Free allows 10 ms a request, fixed)" % what)
        elif codes & CF_TOKEN_CODES or status in (401, 403):
            if codes & CF_BAD_TOKEN_CODES:
                hint = ("check that adapters.cloudflare.api_token_cmd prints the token itself, one "
                        "line, nothing else")
            else:
                hint = ("check adapters.cloudflare.api_token_cmd and that the token may edit "
                        "Workers Scripts and read Workers KV Storage of account %s"
                        % self.cfg("account_id"))
            message = "the Cloudflare API refused the token (%s); %s" % (what, hint)
        elif status == 429 and codes & CF_QUOTA_CODES:
            message = ("Workers KV's daily quota is used up (%s); the Free plan allows 100,000 "
                       "reads and 1,000 writes and lists a day, reset at 00:00 UTC" % what)
        else:
            message = "Cloudflare API %s %s failed (%s)" % (method, path.split("?")[0], what)
        return CloudflareError(message, status, codes, what)


class WorkerScripts:
    """The Worker scripts of this install: built from a workflow version, uploaded once and
    remembered in the store, waited for until their route answers, deleted when no run
    needs them."""

    COMPATIBILITY_DATE = "2024-09-23"
    SECRET_FILE = "cloudflare.secret"
    COLLECT_EVERY_S = 600.0

    def __init__(self, config, api, store_fn):
        self.config, self.api = config, api
        self.store_fn = store_fn  # store_fn(create=True): the store, or None outside a Sidecar
        self._secret = None
        self._subdomain = None
        self._names = {}  # (workflow_id, code) -> script name
        self._known = {}  # script name -> its row in cf_scripts (or {} without a store)
        self._lock = threading.RLock()
        self._upload_lock = threading.Lock()
        self._collected_at = 0.0

    def cfg(self, key):
        return self.config["adapters.cloudflare." + key]

    def _path(self, name, tail=""):
        return "/accounts/%s/workers/scripts/%s%s" % (self.cfg("account_id"), name, tail)

    def invocation_secret(self):
        """The install's secret the Worker checks on every pass (read once: it never changes)."""
        if self._secret is None:
            self._secret = install_secret(self.config.data_dir, self.SECRET_FILE, create=True)
        return self._secret

    # -- the account's workers.dev subdomain, remembered as adapter state ------------

    def _state(self, key, value=None):
        """A remembered fact of this adapter (the subdomain), in the store."""
        store = self.store_fn(create=False)
        if store is None:
            return None
        if value is None:
            return store.adapter_book.adapter_state("cloudflare", key)
        store.adapter_book.set_adapter_state("cloudflare", key, value)
        return value

    def subdomain(self):
        if self._subdomain is None:
            key = "subdomain:" + self.cfg("account_id")
            known = self._state(key)
            if known:
                self._subdomain = known
                return known
            none = ("this Cloudflare account has no workers.dev subdomain%s; create one in the "
                    "dashboard (Workers & Pages > your subdomain) and try again")
            try:
                result = self.api.call("GET", "/accounts/%s/workers/subdomain"
                                       % self.cfg("account_id"))
            except CloudflareError as exc:
                if CF_NOT_FOUND in exc.codes:
                    raise CloudflareError(none % (" (%s)" % exc.detail), exc.status, exc.codes,
                                          exc.detail)
                raise
            if not isinstance(result, dict) or not result.get("subdomain"):
                raise AdapterError(none % "")
            self._subdomain = self._state(key, result["subdomain"]) or result["subdomain"]
        return self._subdomain

    def worker_url(self, name):
        return self.cfg("workers_url").format(script=name, subdomain=self.subdomain())

    # -- building: the module, its metadata, its name ----------------------------------

    def module_text(self, code):
        """The uploaded ES module: the shared engine, the workflow code, the Worker glue (told
        which lines hold the code, so its stacks can name the workflow instead)."""
        src = runtime_source("node")
        start, end = src.index("// ---- engine: start"), src.index("// ---- engine: end ----")
        head = ("// Generated by ty-openworkflow %s: engine, workflow, glue.\n"
                "const __tyow_engine = (() => {\n%s\nreturn { runPass, serializeError };\n})();\n"
                "const __tyow_workflow = (() => {\n" % (__version__, src[start:end]))
        first = head.count("\n") + 1
        return ("%s%s\n;return typeof workflow === \"function\" ? workflow : undefined;\n})();\n"
                "const __tyow_code_lines = [%d, %d];\n%s"
                % (head, code, first, first + code.count("\n"), runtime_file(CLOUDFLARE_GLUE)))

    def metadata(self):
        """The upload's metadata: module, bindings, CPU limit and logs as configured."""
        secret = self.invocation_secret().decode("ascii")
        meta = {"main_module": "worker.mjs", "compatibility_date": self.COMPATIBILITY_DATE,
                # request.signal aborts when the caller goes away: the Worker says so in KV.
                "compatibility_flags": ["nodejs_compat", "enable_request_signal"],
                "bindings": [{"type": "kv_namespace", "name": "STATE",
                              "namespace_id": self.cfg("namespace")},
                             {"type": "secret_text", "name": "TYOW_TOKEN", "text": secret}]}
        if self.cfg("cpu_ms"):
            meta["limits"] = {"cpu_ms": self.cfg("cpu_ms")}
        if self.cfg("observability"):
            meta["observability"] = {"enabled": True, "head_sampling_rate": 1}
        return meta

    def script_name(self, workflow_id, module):
        """``tyow-<workflow>-<hash>``: the hash covers the module, the settings in the upload
        and this install's secret, so two installs on one account never overwrite each
        other's Workers."""
        slug = re.sub(r"[^a-z0-9]+", "-", workflow_id.lower()).strip("-")[:36] or "wf"
        settings = "%s\0%s\0%s" % (self.cfg("cpu_ms"), self.cfg("observability"),
                                   self.cfg("namespace"))
        return "tyow-%s-%s" % (slug, sha256_hex("%s\0%s\0%s" % (
            self.invocation_secret().decode("ascii"), settings, module))[:12])

    def name_for(self, workflow_id, code):
        """The script name of a workflow version (built once per process)."""
        key = (workflow_id, code)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = self.script_name(workflow_id, self.module_text(code))
        return name

    # -- records: what was uploaded, in the store's AdapterBook ------------------------

    def row(self, name):
        """What is remembered of an upload (a dict), or None if it is not known."""
        with self._lock:
            if name in self._known:
                return self._known[name]
        store = self.store_fn(create=False)
        row = store.adapter_book.script(name, self.cfg("account_id")) if store else None
        if row is not None:
            with self._lock:
                self._known[name] = dict(row)
        return dict(row) if row else None

    def remember(self, name, workflow_id, **fields):
        """Record an upload, or update its record (``ready_at``, ``last_used_at``)."""
        now = now_ms()
        store = self.store_fn()
        with self._lock:  # held through the write: rows land in the order they were made
            row = dict(self._known.get(name) or {"name": name, "uploaded_at": now,
                                                 "ready_at": None, "last_used_at": now})
            row.update(fields)
            self._known[name] = row
            self._write_row(store, name, workflow_id, row)

    def _write_row(self, store, name, workflow_id, row):
        if store is not None:
            state = None
            if self._subdomain:  # first known before the store existed (a first deploy): kept now
                state = ("cloudflare", "subdomain:" + self.cfg("account_id"), self._subdomain)
            store.adapter_book.remember_script(name, self.cfg("account_id"), workflow_id, row,
                                               state)

    def forget(self, version):
        """The platform lost this version's script (deleted, route gone): upload it again."""
        self.drop(self.name_for(version["workflow_id"], version["code"]))

    def drop(self, name, store=None):
        """Let go of a remembered upload."""
        with self._lock:
            self._known.pop(name, None)
        store = store or self.store_fn(create=False)
        if store is not None:
            with contextlib.suppress(StoreError):
                store.adapter_book.forget_script(name, self.cfg("account_id"))

    def script_count(self):
        """How many Workers this install holds on the account."""
        store = self.store_fn(create=False)
        if store is None:
            return len(self._known)
        with contextlib.suppress(StoreError):
            return store.adapter_book.script_count(self.cfg("account_id"))
        return 0

    # -- uploading and collecting -------------------------------------------------------

    def upload(self, workflow_id, code):
        """Upload a version's Worker unless this install already has; returns its name."""
        name = self.name_for(workflow_id, code)
        if self.row(name) is not None:
            return name  # uploaded before, by this or another process of the install
        with self._upload_lock:  # two passes of one new version upload it once
            if self.row(name) is not None:
                return name
            return self._upload(name, workflow_id, code)

    def _upload(self, name, workflow_id, code):
        module = self.module_text(code)
        metadata = json.dumps(self.metadata()).encode("utf-8")
        body, ctype = multipart([
            ("metadata", None, "application/json", metadata),
            ("worker.mjs", "worker.mjs", "application/javascript+module", module.encode("utf-8"))])
        try:
            self.api.call("PUT", self._path(name), body, ctype)
        except CloudflareError as exc:
            if CF_TOO_MANY_SCRIPTS not in exc.codes or not self.collect(force=True):
                raise
            self.api.call("PUT", self._path(name), body, ctype)  # room was made
        self.api.call("POST", self._path(name, "/subdomain"), {"enabled": True})
        self.remember(name, workflow_id, uploaded_at=now_ms(), ready_at=None,
                      last_used_at=now_ms())
        log.info("cloudflare: uploaded worker %s", name)
        return name

    def needed_scripts(self, store):
        """Scripts still needed: each cloudflare workflow's newest, and every unfinished run's."""
        rows = store.adapter_book.versions_needed("cloudflare")
        return {self.name_for(r["workflow_id"], r["code"]) for r in rows}

    def collect(self, force=False, store=None):
        """Delete this install's Workers that no version needs any more; returns how many went.

        A script used by a pass in the last pass timeout (by any process) is kept, so
        nothing in flight loses its Worker."""
        store = store or self.store_fn()
        if store is None or (not force and time.time() - self._collected_at < self.COLLECT_EVERY_S):
            return 0
        self._collected_at = time.time()
        needed = self.needed_scripts(store)
        # The longest a pass lives, and the minute last_used_at may lag behind.
        recent = now_ms() - self.cfg("timeout") - self.cfg("recovery_window") - 60000
        rows = store.adapter_book.scripts(self.cfg("account_id"))
        gone = 0
        for row in rows:
            used = max(row["uploaded_at"] or 0, row["last_used_at"] or 0)
            if row["name"] in needed or used > recent:
                continue
            # Housekeeping: a short patience, and the first trouble ends the round (the loop
            # waits on it).
            try:
                self.api.call("DELETE", self._path(row["name"]), patience_s=5)
            except AdapterError as exc:
                if not isinstance(exc, CloudflareError) or (
                        CF_NOT_FOUND not in exc.codes and exc.status != 404):
                    log.warning("cloudflare: cannot delete worker %s now: %s", row["name"], exc)
                    break
            self.drop(row["name"], store)
            gone += 1
            log.info("cloudflare: deleted worker %s (no run needs it)", row["name"])
        return gone

    # -- readiness --------------------------------------------------------------------

    def ensure_ready(self, name, workflow_id, try_s):
        """A new script's route answers its /healthz before the first pass goes to it.

        Waits here up to ``try_s``; past that the pass is given back (NotReady, no attempt
        counted) until ``ready_timeout`` after the upload, then it is an error."""
        row = self.row(name) or {}
        if row.get("ready_at"):
            return
        url = self.worker_url(name).rstrip("/") + "/healthz"
        until = time.monotonic() + try_s
        pause, last = 0.25, "no answer"
        while True:
            try:
                status, _, body = http_request("GET", url, timeout_s=10)
                if status == 200:
                    self.remember(name, workflow_id, ready_at=now_ms())
                    return
                last = "HTTP %d" % status
                refused = free_plan_refusal(edge_error_code(body.decode("utf-8", "replace")))
                if refused is not None:
                    raise refused
            except NotReady:
                raise
            except AdapterError as exc:
                last = str(exc)
            if time.monotonic() + pause > until:
                break
            time.sleep(pause)
            pause = min(pause * 2, 4.0)
        since = now_ms() - (row.get("uploaded_at") or now_ms())
        if since < self.cfg("ready_timeout"):
            raise NotReady("the new Worker %s is not reachable yet (%s); its workers.dev route may "
                           "take a minute to work after it is enabled" % (name, last), 3000)
        self.drop(name)
        raise AdapterError("the Worker %s did not answer at %s within %s of its upload (%s); it is "
                           "uploaded again on the next pass (check adapters.cloudflare.workers_url)"
                           % (name, url, format_duration(self.cfg("ready_timeout")), last))


def kv_copies_note(state, copied, error):
    """What the Worker said of its copies of events in KV, for the run's log."""
    lost = "a response lost after that cannot be recovered"
    if state == "held":
        return ("the Worker holds its copies of events in KV after seq %d until the pass's end: "
                "it keeps within Cloudflare's %d KV operations per invocation"
                % (copied, CF_KV_OPS_PER_INVOCATION))
    text = str(error or "KV refused the write")[:200]
    if re.search(r"too many api requests", text, re.I):
        why = ("KV refused more operations in this invocation (%s; Cloudflare allows %d per "
               "invocation)" % (text, CF_KV_OPS_PER_INVOCATION))
    elif re.search(r"limit exceeded", text, re.I):
        why = ("Workers KV's daily quota is used up (%s; the Free plan allows 1,000 writes a day, "
               "reset at 00:00 UTC)" % text)
    else:
        why = text
    return "the Worker's copies of events in KV stop after seq %d: %s; %s" % (copied, why, lost)


class KvCopy(collections.namedtuple("KvCopy", "lines top gone held gap")):
    """What KV shows of a pass's copies: the next event lines in seq order (nothing past a gap),
    the highest seq a listed chunk holds, whether the Worker said its caller was gone, whether
    its copies are held for the pass's end, and whether a chunk past a missing one is listed."""

    def merged(self, later):
        """A later look, with what earlier looks proved (a marker, the highest seq) kept."""
        return KvCopy(later.lines, max(self.top, later.top), self.gone or later.gone, later.held,
                      later.gap)


class HttpExecution(Execution):
    """A pass running in a Worker: the pass document POSTed, events read from the streamed response.

    Every event carries ``seq`` (1, 2, ... without gaps). A response lost before its
    terminal event (cut, a dead connection that stopped sending even heartbeats, an
    error after the request was sent) is reconciled from the copies the Worker keeps in
    KV: events are taken in seq order only, so nothing past a gap counts, and a key KV
    does not show yet is "not yet" until the recovery window after the loss ends (longer
    while KV shows more on the way). The Worker goes on for at most 30 s once its caller
    is gone, and KV may take a minute or more to show a write elsewhere:
    ``adapters.cloudflare.recovery_window`` covers both. What KV shows then names the cause:
    a Worker that lived on after the loss marks it in KV; one that left no copy past where
    its stream broke, nor that mark, was ended there by the platform (its CPU limit, a
    runtime restart), which ``platform_end`` says.
    """

    def __init__(self, adapter, url, spec, timeout_ms):
        self.adapter, self.spec = adapter, spec
        self.canceled = self.timed_out = False
        self.status = None
        self.error = None
        self.sent = False  # the pass document reached the wire: the Worker may be running it
        self.last_seq = 0
        self.saw_terminal = False
        self.recovered = 0
        self.kv_note = None  # what the Worker said of its copies in KV: (state, seq, text)
        self._last_event = None  # the last event taken, as "step_completed 'a'"
        self._answer = None
        self._log = []
        self._log_seen = set()
        self._conn = self._resp = None
        self._timeout_ms = timeout_ms
        self._deadline = time.time() + timeout_ms / 1000.0
        self._stop = threading.Event()
        self._timer = threading.Timer(timeout_ms / 1000.0, self._timeout)
        self._timer.daemon = True
        beat_ms = adapter.cfg("heartbeat")
        # Silent this long: the connection is dead.
        self._idle_s = max(3 * beat_ms, beat_ms + 5000) / 1000.0
        doc = dict(spec.doc, heartbeat_ms=beat_ms, kv_ops_max=adapter.KV_OPS_PER_INVOCATION)
        self._timer.start()  # the pass timeout covers connecting and sending too
        self._post(url, (dumps(doc) + "\n").encode("utf-8"))

    def _post(self, url, body):
        """Send the pass: connect, then send, so an error after sending is known to be one."""
        import http.client
        headers = {"Authorization": "Bearer " + self.adapter.invocation_secret().decode("ascii"),
                   "Content-Type": "application/json", "User-Agent": USER_AGENT}
        try:
            self._conn, target, parts = http_connection(url, min(30.0, self._timeout_ms / 1000.0))
            self._conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            self.error = "cannot reach %s (%s)" % (url, exc)
            return
        except AdapterError as exc:
            self.error = str(exc)
            return
        try:
            self._conn.request("POST", target, body=body, headers=headers)
            self.sent = True
            self._conn.sock.settimeout(self._idle_s)
            self._resp = self._conn.getresponse()
            self.status = self._resp.status
        except (OSError, http.client.HTTPException) as exc:
            self.error = "the connection to the worker was lost before it answered (%s)" % (
                exc or type(exc).__name__)

    def _timeout(self):
        self.timed_out = True
        self._stop.set()
        self._close()

    def _close(self):
        import socket
        with contextlib.suppress(Exception):
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._conn.close()

    def _event(self, text):
        """The event a line holds (a dict with ``seq``), None for anything else."""
        text = text.strip()
        if not text.startswith("{"):
            return None
        with contextlib.suppress(ValueError, RecursionError):
            ev = json.loads(text)
            if isinstance(ev, dict):
                return ev
        return None

    # -- an answer other than a stream of events ----------------------------------------

    def answer(self):
        """The body of an answer other than 200 (read once, its first 4000 bytes)."""
        if self._answer is None:
            self._answer = ""
            if self._resp is not None and self.status != 200:
                with contextlib.suppress(OSError, _http_exception(), ValueError):
                    self._answer = self._resp.read(4000).decode("utf-8", "replace").strip()
        return self._answer

    def edge_code(self):
        """The workers.dev edge's error code in an answer other than 200 ("1102"), or None."""
        return None if self.status in (None, 200) else edge_error_code(self.answer())

    def _edge_error(self):
        code = self.edge_code()
        if code in CF_EDGE_ERRORS:
            return "Cloudflare error %s: %s" % (code, CF_EDGE_ERRORS[code])
        return None

    def not_ready(self, name, since_ready_ms, spread_ms):
        """The NotReady to give the pass back with (no attempt counted) when the Worker did not
        run it and later will: a route still spreading after it answered once (404, a 5xx that
        is not the Worker's own error, unreachable before the pass was sent: wrangler's own
        end-to-end tests wait these out), or the Free plan's request limits. Else None."""
        code = self.edge_code()
        refused = free_plan_refusal(code)
        if refused is not None or since_ready_ms >= spread_ms:
            return refused
        if self.status == 404 or (self.status and self.status >= 500
                                  and code not in CF_WORKER_FAULTS):
            what = "answered HTTP %d" % self.status
        elif self.status is None and not self.sent and self.error:
            what = "could not be reached (%s)" % self.error
        else:
            return None
        return NotReady("the new Worker %s %s after it was ready once (its route is still "
                        "spreading)" % (name, what), 3000)

    # -- the stream, then KV ------------------------------------------------------------

    def _lost(self, exc):
        """Why the stream of events broke off."""
        if "timed out" in str(exc):
            return "no word from the worker for %s (not even a heartbeat)" % format_duration(
                int(self._idle_s * 1000))
        return "the connection to the worker was lost (%s)" % (exc or type(exc).__name__)

    def _accept(self, ev):
        """Take the event if it is the next in seq order (never one past a gap)."""
        if ev is None or ev.get("seq") != self.last_seq + 1:
            return False
        self.last_seq = ev["seq"]
        kind = ev.get("type")
        self.saw_terminal = kind in TERMINAL_EVENTS
        self._last_event = "%s %r" % (kind, ev["step"]) if isinstance(ev.get("step"), str) else kind
        return True

    @staticmethod
    def _named(text, ev):
        """The event line, with a Cloudflare limit its error comes from named."""
        error = ev.get("error") if isinstance(ev, dict) else None
        if not isinstance(error, dict):
            return text
        message = name_worker_limits(error.get("message"))
        if message == error.get("message"):
            return text
        return dumps(dict(ev, error=dict(error, message=message))) + "\n"

    def _noted(self, ev):
        """A notice of the Worker's about its copies in KV: kept, and said in the run's log."""
        state, copied = ev.get("kv"), ev.get("copied")
        if state in ("held", "stopped") and isinstance(copied, int):
            self.kv_note = (state, copied, kv_copies_note(state, copied, ev.get("error")))
            self._log.append(self.kv_note[2])

    def lines(self):
        if self._resp is not None and self.status != 200:
            self.error = "the worker answered HTTP %d: %s" % (
                self.status, self._edge_error() or self.answer()[:300])
            if self.edge_code() == "1102":  # the platform ended it: no restart does that
                self.platform_end = ("Cloudflare ended the Worker before it answered (error "
                                     "1102): most likely %s"
                                     % cpu_limit_hint(self.adapter.cfg("cpu_ms")))
                self.platform_end_certain = True
            if self.status == 404:  # the script or its route is gone: upload again next pass
                self.adapter.forget(self.spec.version)
            return  # the Worker refused the pass: it is not running
        if self._resp is not None:
            yield from self._stream()
        if self.saw_terminal or self.canceled or self.timed_out or not self.sent:
            return  # it ended, was stopped, or nothing reached the Worker: nothing to follow in KV
        yield from self._reconcile()

    def _stream(self):
        """The event lines of the response, in seq order, until it ends or breaks off."""
        while True:
            try:
                raw = self._resp.readline()
            except (OSError, _http_exception(), ValueError) as exc:
                if not self.canceled and not self.timed_out:
                    self.error = self._lost(exc)
                return
            if not raw:
                return
            text = raw.decode("utf-8", "replace")
            if not text.endswith("\n"):
                return  # a line cut in the middle: it is taken from KV
            if not text.strip():
                continue  # the Worker's probe (it learns so whether its caller is still there)
            ev = self._event(text)
            kind = ev.get("type") if ev is not None else None
            if kind == "heartbeat":
                continue
            if kind == "notice":
                self._noted(ev)
                continue
            if ev is not None and isinstance(ev.get("seq"), int) and not self._accept(ev):
                continue  # never past a gap (not on one stream; the copy in KV decides)
            yield self._named(text, ev)

    def _reconcile(self):
        """Follow the pass's events in KV, in seq order, until its end or the window closes; then
        say what most likely ended the pass."""
        lost = self.error or "it ended before the pass did"
        cut_seq = self.last_seq
        window_s = self.adapter.cfg("recovery_window") / 1000.0
        window_end = min(self._deadline, time.time() + window_s)
        # KV showing more on the way (new events, a key past a missing one) keeps the window
        # open, up to three times its length: a write may take "60 seconds or more" to show.
        longest = min(self._deadline, time.time() + 3 * window_s)
        pause = min(2.0, max(0.2, window_s / 8))
        seen = None  # what KV showed (a KvCopy), None while it could not be read
        kv_error = "no answer"
        # Copies that stopped before the stream broke can show nothing more.
        stopped = self.kv_note is not None and self.kv_note[0] == "stopped"
        while not (self.saw_terminal or self.canceled or self.timed_out or stopped):
            try:
                copy = self.adapter.kv_copy(self.spec.pass_id, self.last_seq,
                                            stop=self._stop.is_set)
            # Unreachable or blocked: look again, slower (the window waits for an answer).
            except AdapterError as exc:
                copy, kv_error = None, str(exc)
                self._log_once("reconcile: %s" % exc)
                if self._kv_refuses(exc):
                    break
            looked_at = time.time()
            if copy is not None:
                seen = copy if seen is None else seen.merged(copy)
                if copy.lines or copy.gap:
                    window_end = max(window_end, min(longest, looked_at + window_s / 2))
                yield from self._recovered(copy.lines, lost)
            if self.saw_terminal or looked_at >= window_end or looked_at >= self._deadline:
                break
            left_s = window_end - time.time()
            self._stop.wait(max(0.05, min(pause, left_s) if left_s > 0 else pause))
            pause = min(pause * 2, 15.0)
        if not self.saw_terminal and not self.canceled and not self.timed_out:
            self.error = self._why_lost(lost, cut_seq, seen, kv_error)

    def _recovered(self, lines, lost):
        for text in lines:
            ev = self._event(text)
            if not self._accept(ev):
                return
            # Said now: the pass may be over (and this generator left) at its end.
            if not self.recovered:
                self._log.append("the response was lost (%s); its events from seq %d on were "
                                 "recovered from KV" % (lost, self.last_seq))
            self.recovered += 1
            yield self._named(text, ev)
            if self.saw_terminal:
                return

    @staticmethod
    def _kv_refuses(exc):
        """No answer will come from KV: a bad request, a token without KV access, no such
        namespace, no quota left. (A 5xx or a busy API past its patience: look again.)"""
        return isinstance(exc, CloudflareError) and (
            exc.status in (400, 401, 403, 404) or bool(set(exc.codes) & CF_QUOTA_CODES))

    def _log_once(self, line):
        if line not in self._log_seen:
            self._log_seen.add(line)
            self._log.append(line)

    def _why_lost(self, lost, cut_seq, seen, kv_error):
        """How a pass whose end never came ended, as far as the stream and KV tell."""
        window = format_duration(self.adapter.cfg("recovery_window"))
        retried = "committed steps stay, the pass is retried"
        if self.kv_note is not None and self.kv_note[0] == "stopped":
            return "the response was lost (%s) after %s; %s" % (lost, self.kv_note[2], retried)
        if seen is None:
            return ("the response was lost (%s) and KV, where the Worker copies its events, could "
                    "not be read (%s); %s" % (lost, kv_error, retried))
        if seen.held or (self.kv_note is not None and self.kv_note[0] == "held"):
            return ("the response was lost (%s) while the Worker held its copies in KV for the "
                    "pass's end (it keeps within Cloudflare's %d KV operations per invocation), "
                    "and that end did not show within %s; %s"
                    % (lost, self.adapter.KV_OPS_PER_INVOCATION, window, retried))
        if seen.gone or seen.top > cut_seq or self.recovered:
            return ("the response was lost (%s) and the pass's end did not show in KV within %s: "
                    "the Worker went on without its caller, and a Worker runs at most 30 s once "
                    "its caller is gone (longer steps cannot finish past a lost response), and KV "
                    "may take a minute or more to show a write; %s" % (lost, window, retried))
        where = ("after its event %d (%s)" % (cut_seq, self._last_event) if cut_seq
                 else "before its first event")
        self.platform_end = ("the Worker was ended %s, with no word after its stream broke: most "
                             "likely %s (a runtime restart of Cloudflare's ends a pass so too)"
                             % (where, cpu_limit_hint(self.adapter.cfg("cpu_ms"))))
        return ("the Worker was ended %s: its stream broke (%s) and it copied nothing past seq %d "
                "to KV, nor marked there that its caller was gone, as it does when only the "
                "connection is lost" % (where, lost, cut_seq))

    def add_stray(self, line):
        self._log.append(line.rstrip("\n"))

    def cancel(self):
        self.canceled = True
        self._stop.set()
        self._close()

    def finish(self, grace_s=5.0):
        self._timer.cancel()
        self._close()
        if self.timed_out:
            return "the pass timed out after %s and its request was aborted" % format_duration(
                self._timeout_ms)
        if self.canceled:
            return "the pass was stopped"
        return self.error or "the worker's response ended without a result"

    @property
    def log_text(self):
        return "\n".join(self._log) + ("\n" if self._log else "")


class CloudflareAdapter(Adapter):
    """Each workflow version is a module Worker; each pass is one HTTPS request to it.

    The API client (``api_client``) and the install's scripts (``scripts``) do the work:
    uploads are remembered in the store (a cron `tick` does not upload again), a new
    route is waited for before its first pass, scripts no unfinished run needs are
    deleted, and every API call goes through one budget per process with retries that
    honour Retry-After.
    """

    name = "cloudflare"
    READY_TRY_S = 15.0  # per pass: how long to wait for a new route before giving the pass back
    KV_OPS_PER_INVOCATION = CF_KV_OPS_PER_INVOCATION  # what the Worker may spend on its copies

    def __init__(self, config):
        super().__init__(config)
        self.api_client = CloudflareApi(config, scripts_held=lambda: self.scripts.script_count())
        self.scripts = WorkerScripts(config, self.api_client, store_fn=self.open_store)

    def cfg(self, key):
        return self.config["adapters.cloudflare." + key]

    def open_store(self, create=True):
        """The store (None outside a Sidecar); with ``create=False`` only if it exists already,
        so a failed first command leaves no store behind."""
        db_path = os.path.join(self.config.data_dir, DB_FILE)
        if not self.store_fn or (not create and not os.path.exists(db_path)):
            return None
        return self.store_fn()

    # The verbs other parts use, kept on the adapter.

    def api(self, *args, **kwargs):
        """One Cloudflare API call (CloudflareApi.call)."""
        return self.api_client.call(*args, **kwargs)

    def invocation_secret(self):
        return self.scripts.invocation_secret()

    def subdomain(self):
        return self.scripts.subdomain()

    def upload(self, workflow_id, code):
        return self.scripts.upload(workflow_id, code)

    def forget(self, version):
        self.scripts.forget(version)

    def script_count(self):
        return self.scripts.script_count()

    def collect(self, force=False, store=None):
        return self.scripts.collect(force, store)

    # -- the Adapter interface ----------------------------------------------------------

    def _check(self, runtime):
        if runtime == "python":
            raise AdapterError("the cloudflare adapter runs JavaScript workflows only; deploy with "
                               "--runtime node, or use exec or docker for Python")
        for key in ("account_id", "namespace"):
            if not self.cfg(key).strip():
                raise AdapterError("adapters.cloudflare.%s is empty; set it (namespace is the KV "
                                   "namespace id)" % key)
        self.scripts.subdomain()
        runtime_source("node")
        runtime_file(CLOUDFLARE_GLUE)

    def validate(self, runtime, code):
        if runtime != "node":
            raise InputError("the cloudflare adapter runs JavaScript workflows only; use "
                             "--runtime node")
        validate_code(runtime, code, self.config)
        if re.search(r"\brequire\s*\(|^\s*import\s", code, re.M):
            raise InputError("Workers have no require() or import for workflow code; inline what "
                             "it needs (fetch is available)")
        node = _which(self.config["adapters.exec.node"])
        node_check(self.scripts.module_text(code), "workflow.mjs",
                   lambda path: run_command([node, "--check", path], timeout_s=30))

    def deploy(self, workflow_id, code, runtime):
        """Upload now, so `deploy` reports API problems and nothing is stored on failure."""
        self.scripts.upload(workflow_id, code)

    def launch(self, spec):
        self.check(spec.runtime)
        wf = spec.version["workflow_id"]
        name = self.scripts.upload(wf, spec.version["code"])
        self.scripts.ensure_ready(name, wf, self.READY_TRY_S)
        row = self.scripts.row(name) or {}
        # At most once a minute: guards it from collect().
        if now_ms() - (row.get("last_used_at") or 0) > 60000:
            self.scripts.remember(name, wf, last_used_at=now_ms())
        execution = HttpExecution(self, self.scripts.worker_url(name), spec, self.cfg("timeout"))
        # workers.dev answers from many places and they learn a new route one by one; and the
        # Free plan caps requests: the Worker did not run, so the pass goes back uncounted.
        refused = execution.not_ready(name, now_ms() - (row.get("ready_at") or 0),
                                      self.cfg("ready_timeout"))
        if refused is not None:
            execution.finish()
            raise refused
        return execution

    def cleanup(self, store=None):
        if self.enabled and self.cfg("account_id").strip():
            self.scripts.collect(store=store)

    def kv_events(self, pass_id, after_seq=0, stop=None):
        """The event lines the Worker copied to KV for a pass after ``after_seq``, in seq order,
        up to the first one KV does not show yet (nothing past a gap)."""
        return self.kv_copy(pass_id, after_seq, stop).lines

    def kv_copy(self, pass_id, after_seq=0, stop=None):
        """What KV shows of the Worker's copies of a pass after ``after_seq`` (a KvCopy)."""
        from urllib.parse import quote
        base = "/accounts/%s/storage/kv/namespaces/%s" % (self.cfg("account_id"),
                                                          self.cfg("namespace"))
        prefix = "ev:%s:" % pass_id
        chunks, cursor, gone = {}, "", False  # by key: a key listed twice across pages counts once
        while True:  # every page, following the cursor (a page may be empty while more remain)
            path = "%s/keys?prefix=%s&limit=1000%s" % (
                base, quote(prefix, safe=""), "&cursor=" + quote(cursor, safe="") if cursor else "")
            # A body that is no envelope: raised.
            doc = self.api_client.call("GET", path, patience_s=20, stop=stop, whole=True)
            for k in doc.get("result") or []:
                name = k.get("name") if isinstance(k, dict) else None
                if not isinstance(name, str) or not name.startswith(prefix):
                    continue
                gone = gone or name[len(prefix):] == "gone"  # the Worker outlived its caller
                # <first seq>, or <first seq>.<try>: a retried write's key (the same lines)
                first = re.fullmatch(r"(\d+)(?:\.\d+)?", name[len(prefix):])
                if first:
                    meta = k.get("metadata") if isinstance(k.get("metadata"), dict) else {}
                    chunks[name] = (int(first.group(1)), meta.get("last"), meta.get("v"),
                                    name, bool(meta.get("held")))
            cursor = (doc.get("result_info") or {}).get("cursor") or ""
            if not cursor:
                break
        top = max([c[1] for c in chunks.values() if isinstance(c[1], int)], default=0)
        out, expect, held, gap = [], after_seq + 1, False, False
        for first, last, text, name, holds in sorted(chunks.values(), key=lambda c: c[0]):
            if isinstance(last, int) and last < expect:
                held = holds
                continue  # already had
            if first > expect:
                gap = True
                break  # a gap: the chunk before is not visible yet
            if not isinstance(text, str):
                try:
                    text = self.api_client.call(
                        "GET", "%s/values/%s" % (base, quote(name, safe="")), raw=True,
                        patience_s=20, stop=stop).decode("utf-8", "replace")
                except CloudflareError as exc:
                    if exc.status == 404:
                        gap = True
                        break  # listed but not readable here yet: not yet
                    raise
            for line in text.splitlines():
                try:
                    seq = json.loads(line).get("seq")
                except (ValueError, AttributeError, RecursionError):
                    continue
                if seq == expect:
                    out.append(line + "\n")
                    expect += 1
            held = holds
            if isinstance(last, int) and expect <= last:
                break  # an older copy of the chunk: the rest comes later
        return KvCopy(out, top, gone, held, gap)


# Adapters by name; the config and the CLI pick one from here.
ADAPTERS = {"exec": ExecAdapter, "docker": DockerAdapter, "cloudflare": CloudflareAdapter}


# ---------------------------------------------------------------------------
# Scheduler: claims due runs with leases and drives their passes
# ---------------------------------------------------------------------------


class _ActivePass:
    __slots__ = ("run_id", "pass_id", "passes", "deadline_at", "execution", "thread", "release",
                 "lease_until", "lease_lost", "paused", "check_failed")

    def __init__(self, run, lease_until):
        self.run_id, self.pass_id, self.deadline_at = run["id"], run["pass_id"], run["deadline_at"]
        self.passes = run["passes"]
        self.execution = None
        self.thread = None
        self.release = False
        self.lease_until = lease_until  # lease_clock() by which our lease must have been renewed
        self.lease_lost = False  # another scheduler holds the run now
        self.paused = False  # frozen while the lease is in doubt
        self.check_failed = False  # _check_active raised on it: stopped, and not checked again


class _Round(collections.namedtuple("_Round", "kind wake_at now")):
    """What a scheduler's round came to: "claimed" (go again at once), "exit", or "idle" (wait
    until ``wake_at``, None: nothing due, as of ``now``)."""

    __slots__ = ()


_Round.__new__.__defaults__ = (None, None)


class PassThreads:
    """The threads that drive passes, reused: a pass starts no thread while one is idle."""

    def __init__(self, context):
        self._context = context  # () -> a context each thread holds for its life (quiet commits)
        self._lock = threading.Lock()
        self._work = queue.Queue()
        self._idle = 0
        self._numbers = itertools.count(1)

    def run(self, fn, *args):
        """Run ``fn(*args)`` on an idle thread, or a new one (RuntimeError: none to be had)."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._work.put((fn, args))
                return
        thread = threading.Thread(target=self._serve, args=(fn, args), daemon=True,
                                  name="tyow-pass-%d" % next(self._numbers))
        thread.start()

    def _serve(self, fn, args):
        with self._context():
            while True:
                fn(*args)
                with self._lock:
                    self._idle += 1
                try:
                    fn, args = self._work.get(timeout=PASS_THREAD_IDLE_S)
                except queue.Empty:
                    with self._lock:
                        # A task may have been handed to us as we timed out: take it.
                        try:
                            fn, args = self._work.get_nowait()
                        except queue.Empty:
                            self._idle -= 1
                            return


class LeaseKeeper:
    """Keeps the leases of the passes a scheduler drives: renews them with its heartbeat, and
    freezes a pass whose lease is in doubt before another scheduler may claim its run.

    Lease time is kept on lease_clock(): a wall-clock jump neither makes a scheduler
    give up a lease it holds nor claim back its own pass."""

    def __init__(self, store, owner, active, lock, lease_ms, clock, on_lost):
        self.store = store
        self.owner = owner  # the scheduler's id
        self.active = active  # run id -> _ActivePass, shared with the scheduler under ``lock``
        self.lock = lock
        self.lease_ms = lease_ms
        self.clock = clock
        self.on_lost = on_lost  # () -> None: a lease went to another scheduler
        self.ended = threading.Event()

    @property
    def margin_s(self):
        """A pass is stopped this long before its lease runs out, if no renewal came."""
        return max(0.2, self.lease_ms / 10000.0)

    def start(self):
        """Renew and guard until end() (after the shutdown grace: leases of passes still
        finishing must not expire under them)."""
        for target, name in ((self._heartbeat, "tyow-heartbeat"),
                             (self._guard, "tyow-lease-guard")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def end(self):
        self.ended.set()

    def _heartbeat(self):
        # Runs until the loop has fully ended: leases of passes finishing in the
        # shutdown grace must not expire under them.
        interval = max(0.2, self.lease_ms / 4000.0)
        with self.store.quiet_commits():
            self._beat(interval)

    def _beat(self, interval):
        while not self.ended.wait(interval):
            try:
                started = lease_clock()
                now = self.clock()
                self.store.heartbeat_scheduler(self.owner, now)
                with self.lock:
                    held = [ap for ap in self.active.values() if not ap.lease_lost]
                if held:
                    lost = set(self.store.renew_leases(
                        self.owner, [(ap.run_id, ap.pass_id) for ap in held], now + self.lease_ms))
                    for ap in held:
                        if ap.pass_id in lost:
                            ap.lease_lost = True
                            if ap.execution:
                                ap.execution.cancel()
                            continue
                        ap.lease_until = max(ap.lease_until, started + self.lease_ms / 1000.0)
                        if ap.paused:
                            ap.paused = False
                            log.warning("run %s: lease renewed; its pass goes on", ap.run_id)
                            if ap.execution:
                                ap.execution.resume()
                    if lost:
                        self.on_lost()
            except OpenWorkflowError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _guard(self):
        """Freeze a pass whose lease was not renewed in time, before anyone else may claim the run.

        It never touches the store, so a stalled store cannot stall it. The
        heartbeat thaws the pass when a renewal gets through (the run is still
        ours: its steps run once), or kills it when another scheduler has it."""
        while not self.ended.wait(0.05):
            now = lease_clock()
            with self.lock:
                late = [ap for ap in self.active.values() if not ap.lease_lost and not ap.paused
                        and ap.execution is not None and now > ap.lease_until - self.margin_s]
                for ap in late:  # under the lock: a pass that ended meanwhile is not frozen
                    ap.paused = True
                    ap.execution.pause()
            for ap in late:
                log.warning("run %s: its lease could not be renewed in time; its pass is frozen "
                            "until the store answers, so no two schedulers run it at once",
                            ap.run_id)


class PassDriver:
    """Drives one pass of a run: its document, its launch on the run's adapter, its events into
    the store as they arrive, and how it ended (committed, retried, given back or spared)."""

    def __init__(self, store, adapter, policy, config, clock, lease_margin_s, stopping):
        self.store = store
        self.adapter = adapter  # name -> Adapter
        self.policy = policy  # () -> the run policy (retries, limits) for the store
        self.config = config
        self.clock = clock
        self.lease_margin_s = lease_margin_s  # a pass is not started this close to its lease's end
        self.stopping = stopping  # set when the scheduler stops claiming
        self._versions = {}

    def drive(self, run, ap):
        """Drive one pass to its end; whatever happens, the run is left in a state a scheduler
        can pick up (a store failure retries the pass, a bug fails the run, never the loop)."""
        try:
            self._drive(run, ap)
        except StoreError as exc:
            # Not the run's fault: the pass is retried (here once the store answers,
            # or by any scheduler once its lease runs out).
            log.error("run %s: the store failed during its pass (%s); the pass will be retried",
                      ap.run_id, exc)
            if ap.execution:
                ap.execution.cancel()
                ap.execution.finish()
            message = "the store failed: %s" % exc
            self._retrying(lambda: self.store.end_pass_without_result(
                ap.run_id, ap.pass_id, self.clock(), self.policy(), message), ap)
        except Exception as exc:
            log.exception("pass %s of run %s crashed in the scheduler", ap.pass_id, ap.run_id)
            if ap.execution:
                ap.execution.cancel()
            # Fail the run rather than leave it to be replayed into the same crash forever.
            with contextlib.suppress(Exception):
                self.store.fail_run(ap.run_id, ap.pass_id, self.clock(), {
                    "message": "the sidecar could not record this run's pass (%s: %s); this is a "
                               "bug in ty-openworkflow or an event it cannot store"
                               % (type(exc).__name__, exc),
                    "name": "SidecarError", "stack": None})

    def _pass_doc(self, run, version):
        """The pass document the runtime shim reads (pass protocol v1)."""
        return {
            "protocol": PROTOCOL_VERSION, "pass_id": run["pass_id"], "run_id": run["id"],
            "workflow_id": run["workflow_id"], "version": run["version"],
            "version_label": version["label"], "attempt": run["passes"],
            "input": json.loads(run["input"]), "now": self.clock(),
            "history": self.store.history(run["id"]), "inline_sleep_ms": INLINE_SLEEP_MS,
            "max_output_bytes": self.config["limits.max_output_bytes"],
            "max_steps": self.config["limits.max_steps"],
            # Where remote compute may send signed callbacks (webhook.external_url), if set.
            "callback_url": self.config["webhook.external_url"] or None,
        }

    def _drive(self, run, ap):
        policy = self.policy()
        key = (run["workflow_id"], run["version"])
        version = self._versions.get(key)  # versions never change once stored
        if version is None:
            version = self._versions[key] = self.store.get_version(*key)
        execution, launched = self._launch(run, ap, version, policy)
        if execution is None:
            return
        if (self.stopping.is_set() and ap.release) or ap.lease_lost:
            execution.cancel()
        ended = self._commit_events(ap, execution, policy)
        how = execution.finish()
        METRICS.observe("pass_duration_seconds", time.monotonic() - launched, PASS_BUCKETS_S)
        log.info("run %s: pass %d ended: %s", ap.run_id, run["passes"],
                 "recorded" if ended else how)
        with contextlib.suppress(OpenWorkflowError):
            self.store.add_log(ap.run_id, ap.pass_id, run["passes"], version["adapter"],
                               execution.log_text, self.clock())
        if not ended:
            self._record_end(ap, execution, how, policy)

    def _launch(self, run, ap, version, policy):
        """(the pass's Execution, when it started), or (None, None): given back, or not started."""
        adapter_name = version["adapter"]
        try:
            adapter = self.adapter(adapter_name)
            if run.get("lost_pass_id"):
                adapter.reap(run["id"], run["lost_pass_id"])
            spec = PassSpec(self._pass_doc(run, version), version,
                            isolated=bool(run.get("isolated")))
            spec.on_execution = lambda ex: setattr(ap, "execution", ex)  # stoppable while it waits
            late = lease_clock() > ap.lease_until - self.lease_margin_s
            if ap.release or ap.lease_lost or late:
                self._give_back(ap)  # not ours to start any more (or shutting down)
                return None, None
            if not self.store.pass_is_current(ap.run_id, ap.pass_id):
                return None, None
            launched = time.monotonic()
            ap.execution = adapter.launch(spec)
            return ap.execution, launched
        except NotReady as exc:  # the platform cannot take it yet: later, and no attempt counted
            log.info("run %s: %s; the pass is given back for %s", ap.run_id, exc,
                     format_duration(exc.retry_ms))
            self.store.release(ap.run_id, ap.pass_id, self.clock(), reason=str(exc),
                               due=self.clock() + exc.retry_ms)
        except (OpenWorkflowError, RuntimeError) as exc:
            if isinstance(exc, StoreError):
                raise
            log.warning("run %s: cannot launch a pass: %s", ap.run_id, exc)
            self.store.end_pass_without_result(
                ap.run_id, ap.pass_id, self.clock(), policy,
                "the %s adapter could not start the pass: %s" % (adapter_name, exc))
        return None, None

    def _commit_events(self, ap, execution, policy):
        """Commit the pass's events as they arrive; True once one ended the pass (recorded)."""
        try:
            for batch in execution.batches():
                events = []
                for line in batch:
                    ev = parse_event_line(line, ap.pass_id)
                    if ev is not None:
                        events.append(ev)
                    elif line.strip():
                        execution.add_stray(line)
                if not events:
                    continue
                if ap.lease_lost:
                    return False
                outcome, used = self._apply(ap, execution, events, policy)
                if outcome == "bad":
                    return False
                kinds = [e["type"] for e in events[:used]]
                METRICS.inc("step_attempts", by=kinds.count("step_started"))
                METRICS.inc("step_failures", by=kinds.count("step_failed"))
                if outcome == IGNORED:
                    log.info("run %s: pass %s is no longer current (canceled or reclaimed); "
                             "stopping it", ap.run_id, ap.pass_id)
                    execution.cancel()
                    return False
                if outcome == ENDED:
                    if events[used - 1]["type"] not in TERMINAL_EVENTS:
                        execution.cancel()  # the sidecar ended the run (a limit): the shim stops
                    return True
        except StoreError as exc:
            log.error("run %s: cannot record an event (%s); the pass is stopped and will be "
                      "retried", ap.run_id, exc)
            execution.cancel()
        return False

    def _apply(self, ap, execution, events, policy):
        """Commit events that arrived together: (outcome, events used); "bad" fails the run."""
        try:
            return self.store.apply_events(ap.run_id, ap.pass_id, events, self.clock(), policy)
        except (ValueError, TypeError, OverflowError, RecursionError, UnicodeError) as exc:
            if len(events) > 1:  # find the one event that cannot be stored; keep the others
                outcome, used = self._apply_one_by_one(ap, events, policy)
            else:
                outcome, used = "bad", 0
            if outcome == "bad":
                execution.cancel()
                self.store.fail_run(ap.run_id, ap.pass_id, self.clock(), {
                    "message": "the runtime sent a %s event the sidecar cannot store (%s: %s)"
                               % (events[used].get("type"), type(exc).__name__, exc),
                    "name": "BadEvent", "stack": None})
            return outcome, used

    def _record_end(self, ap, execution, how, policy):
        """A pass that ended without a recorded end: given back, spared, or a failed attempt."""
        if ap.release or ap.lease_lost:
            self._give_back(ap)
            return
        if execution.platform_end:
            self._retrying(lambda: self.store.platform_end(
                ap.run_id, ap.pass_id, self.clock(), policy, how, execution.platform_end,
                certain=execution.platform_end_certain), ap)
            return
        if execution.spared:
            self._retrying(lambda: self.store.spare(ap.run_id, ap.pass_id, self.clock(), policy,
                                                    how, isolate=execution.suspect), ap)
            return
        self._retrying(lambda: self.store.end_pass_without_result(
            ap.run_id, ap.pass_id, self.clock(), policy, how), ap)

    def _apply_one_by_one(self, ap, events, policy):
        """After a batch failed to store: apply its events singly; ("bad", i) names the culprit."""
        for i, ev in enumerate(events):
            try:
                outcome = self.store.apply_event(ap.run_id, ap.pass_id, ev, self.clock(), policy)
            except (ValueError, TypeError, OverflowError, RecursionError, UnicodeError):
                return "bad", i
            if outcome != APPLIED:
                return outcome, i + 1
        return APPLIED, len(events)

    def _give_back(self, ap):
        """Release a pass we stopped ourselves (shutdown, a lease we could not renew in time)."""
        reason = "scheduler stopping" if ap.release else "its lease could not be renewed in time"
        self._retrying(lambda: self.store.release(ap.run_id, ap.pass_id, self.clock(),
                                                  reason=reason), ap)

    def _retrying(self, write, ap):
        """Record a pass's end, trying again a few times while the store is unavailable.

        If it still fails the run keeps its lease until that runs out, and is then
        replayed like any lost pass: nothing is lost, only delayed.
        """
        for delay_s in (0.2, 0.5, 1.0, 2.0, None):
            try:
                return write()
            except StoreError as exc:
                if delay_s is None or lease_clock() + delay_s > ap.lease_until:
                    log.error("run %s: cannot record the end of its pass (%s); it is replayed "
                              "once its lease runs out", ap.run_id, exc)
                    return None
                time.sleep(delay_s)


class Scheduler:
    """Drives due runs: ``loop()`` for serve/runner, ``tick()`` for cron.

    kind: "serve" (until stopped), "runner" (the background runner `start` spawns:
    lingers while a run is due within ``runner_linger``), "tick" (what is due now).

    Lease time is kept on lease_clock(): a wall-clock jump neither makes a
    scheduler give up a lease it holds nor claim back its own pass. A pass whose
    lease could not be renewed in time (a stalled disk, a lock held elsewhere)
    is frozen before another scheduler may claim the run; the next renewal lets
    it go on if the run is still ours, or kills it if another scheduler has it.
    """

    def __init__(self, sidecar, kind="serve", concurrency=None, clock=None, hand_over=False):
        self.sidecar = sidecar
        # tick: runs due within runner_linger when it is done go to the background runner
        self.hand_over = hand_over
        self.store = sidecar.store
        self.config = sidecar.config
        self.kind = kind
        self.clock = clock or sidecar.clock
        self.concurrency = concurrency or self.config["concurrency"]
        self.lease_ms = self.config["lease_ttl"]
        self.id = new_id("sched")
        self.active = {}  # run id -> _ActivePass, under ``lock``
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.hurry = threading.Event()
        self.stats = {"passes": 0}
        self._maintained_at = 0
        self.leases = LeaseKeeper(self.store, self.id, self.active, self.lock, self.lease_ms,
                                  self.clock, self.wake)
        self.ended = self.leases.ended
        self.threads = PassThreads(self.store.quiet_commits)
        self.driver = PassDriver(self.store, sidecar.adapter, sidecar.run_policy, self.config,
                                 self.clock, self.leases.margin_s, self.stopping)
        self.sock = None
        import socket
        with contextlib.suppress(OSError):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
            self.sock.setblocking(False)

    @property
    def wait_cap_s(self):
        # The wake socket makes this a safety net only; without one, poll briskly.
        return min(self.config["poll_interval"] / 1000.0, 5.0) if self.sock else 0.5

    @property
    def lease_margin_s(self):
        """A pass is stopped this long before its lease runs out, if no renewal came."""
        return self.leases.margin_s

    def wake(self):
        if self.sock:
            with contextlib.suppress(OSError):
                self.sock.sendto(b"w", self.sock.getsockname())

    def stop(self, hurry=False):
        """Stop claiming and end the loop; passes in flight get ``shutdown_grace`` unless
        ``hurry``."""
        if hurry:
            self.hurry.set()
        self.stopping.set()
        self.wake()

    def _wait(self, timeout_s):
        timeout_s = max(0.0, min(timeout_s, self.wait_cap_s))
        if not self.sock:
            self.stopping.wait(timeout_s)
            return
        with contextlib.suppress(InterruptedError, OSError, ValueError):
            r, _, _ = select.select([self.sock], [], [], timeout_s)
            if r:
                with contextlib.suppress(OSError):
                    while self.sock.recv(64):
                        pass

    def _register(self):
        port = self.sock.getsockname()[1] if self.sock else None
        self.store.register_scheduler(self.id, self.kind, os.getpid(), _hostname(), port,
                                      self.clock())

    def loop(self):
        """Run until stopped (serve), idle past the linger time (runner), or nothing is due (tick).

        A store error (a lock held elsewhere past the busy timeout, a full disk), or
        any other error of a round, never ends the loop: it is logged and the loop
        tries again with backoff (``tick`` gives up after STORE_PATIENCE_S and raises).
        """
        # The scheduler's own writes (claims, leases, events) wait for no disk: see Store.sync.
        with self.store.quiet_commits():
            try:
                return self._loop()
            finally:
                with contextlib.suppress(OpenWorkflowError):
                    self.store.sync()

    def _loop(self):
        self.bridge_wake = threading.Event()
        threads = []
        if self.kind != "tick":
            threads.append(threading.Thread(target=self._bridge_loop, name="tyow-bridge",
                                            daemon=True))
        registered = False
        self.sidecar.bridge.resume()
        failing_since, backoff_s, idle_s = None, 0.0, 0.0
        try:
            if self.kind == "serve":
                with contextlib.suppress(OpenWorkflowError):  # only an optimisation
                    self.store.fill_pool()
            self.leases.start()
            for t in threads:
                t.start()
            while not self.stopping.is_set():
                try:
                    if not registered:
                        self._register()
                        registered = True
                    outcome = self._round()
                    failing_since, backoff_s = None, 0.0
                except Exception as exc:
                    now_s = time.monotonic()
                    failing_since = failing_since or now_s
                    if self.kind == "tick" and now_s - failing_since > STORE_PATIENCE_S:
                        raise
                    backoff_s = min(STORE_BACKOFF_MAX_S, max(0.1, backoff_s * 2))
                    if isinstance(exc, StoreError):
                        log.warning("the store is not available (%s); trying again in %.1fs", exc,
                                    backoff_s)
                    else:  # a bug: said in full, and the loop goes on (a run's own is set aside)
                        log.exception("a scheduler round failed; trying again in %.1fs", backoff_s)
                    self._wait(backoff_s)
                    continue
                if outcome.kind == "exit":
                    break
                if outcome.kind == "claimed":
                    idle_s = 0.0
                    continue
                wake_at, now = outcome.wake_at, outcome.now
                delay = self.wait_cap_s if wake_at is None else (wake_at - now) / 1000.0
                if delay <= 0:
                    # Due but nothing could be claimed (held by a live scheduler of this host,
                    # or just taken): back off instead of spinning.
                    idle_s = min(1.0, max(0.005, idle_s * 2))
                    delay = idle_s
                else:
                    idle_s = 0.0
                self._wait(delay)
        finally:
            self._shutdown(registered)
            if self.kind in ("tick", "runner"):
                # Deliver what is due now before exiting (cron has no later).
                self._deliver_updates()
        return self.stats

    def _round(self):
        """One round of the loop: what it came to (a _Round)."""
        self._check_active()
        self._maintain()
        if self.sidecar.fire_schedules():
            return _Round("claimed")
        now = self.clock()
        free = self.concurrency - len(self.active)
        if free > 0:
            with self.lock:
                held = set(self.active)
            mono = lease_clock()
            claimed = self.store.claim_due(self.id, now, free, self.lease_ms, exclude=held)
            started = [self._start_pass(run, mono + self.lease_ms / 1000.0) for run in claimed]
            if any(started):
                return _Round("claimed")
            if claimed:  # given back (no thread to be had): try again in a moment
                return _Round("idle", now + 1000, now)
        now = self.clock()
        next_due = self.store.next_due_at(now)
        self.bridge_wake.set()
        if not self.active and self.kind in ("tick", "runner"):
            horizon = 0 if self.kind == "tick" else self.config["runner_linger"]
            if self._idle_beyond(next_due, now, horizon):
                # Leave the table first, then look again: a `start` that saw us alive
                # committed its run before we look, so we cannot miss it.
                self.store.unregister_scheduler(self.id)
                now = self.clock()
                if self._idle_beyond(self.store.next_due_at(now), now, horizon):
                    return _Round("exit")
                self._register()
                return _Round("claimed")
        with self.lock:
            deadlines = [ap.deadline_at for ap in self.active.values()
                         if ap.deadline_at is not None]
        if free <= 0:
            next_due = None
        wake_at = min([t for t in [next_due] + deadlines if t is not None], default=None)
        return _Round("idle", wake_at, now)

    def _idle_beyond(self, next_due, now, linger):
        """True if neither a run nor (for the runner) a task update is due within ``linger``."""
        nxt = [next_due] if next_due is not None else []
        if self.kind == "runner" and shutil.which(self.config["taskyou.cli"]):
            nxt.append(self.store.next_outbox_at())
        nxt = [t for t in nxt if t is not None]
        return not nxt or min(nxt) - now > linger

    def _deliver_updates(self):
        """Task updates out, approvals in (the tasks runs wait on), off the scheduling path."""
        for work in (self.sidecar.bridge.deliver_due, self.sidecar.bridge.poll_approvals):
            try:
                work()
            except OpenWorkflowError as exc:
                log.warning("taskyou bridge: %s", exc)
            except Exception:  # the bridge must never take the scheduler down
                log.exception("taskyou bridge failed")

    def _bridge_loop(self):
        """Deliver task updates off the scheduling path: a slow `ty` never delays a pass."""
        with self.store.quiet_commits():  # it syncs before each `ty` call itself
            self._bridge_rounds()

    def _bridge_rounds(self):
        while not self.stopping.is_set():
            self._deliver_updates()
            try:
                nxt = self.store.next_outbox_at()
            except OpenWorkflowError as exc:
                log.warning("taskyou bridge: %s", exc)
                nxt = None
            wait_s = self.wait_cap_s if nxt is None else max(
                0.01, min(self.wait_cap_s, (nxt - self.clock()) / 1000.0))
            self.bridge_wake.wait(wait_s)
            self.bridge_wake.clear()

    def _maintain(self):
        """Housekeeping (adapters' clean-up): when a scheduler starts, then every poll_interval."""
        if time.time() - self._maintained_at < self.config["poll_interval"] / 1000.0:
            return
        self._maintained_at = time.time()
        try:
            self.sidecar.prune_by_retention()
        except OpenWorkflowError as exc:  # housekeeping must never stop the scheduler
            log.warning("retention: %s", exc)
        for name in ADAPTER_NAMES:
            impl = self.sidecar.adapter(name)
            if impl.enabled:
                try:
                    impl.cleanup(self.store)
                except Exception as exc:  # housekeeping must never stop the scheduler
                    log.warning("%s clean-up failed: %s", name, exc)

    def _start_pass(self, run, lease_until):
        ap = _ActivePass(run, lease_until)
        with self.lock:
            if run["id"] in self.active:  # never two passes of one run here (claim_due excludes it)
                return False
            self.active[run["id"]] = ap
        try:
            self.threads.run(self._drive, run, ap)
        except RuntimeError as exc:  # no thread to be had (a pids limit): the run goes back
            with self.lock:
                self.active.pop(run["id"], None)
            log.warning("run %s: cannot start a thread for its pass (%s); it is given back and "
                        "retried", run["id"], exc)
            self.store.release(run["id"], run["pass_id"], self.clock(),
                               reason="no thread for the pass (%s)" % exc)
            return False
        self.stats["passes"] += 1
        METRICS.inc("passes", run["workflow_id"])
        if run.get("was") in ("sleeping", "waiting") and run.get("available_at"):
            late_s = max(0, self.clock() - run["available_at"]) / 1000.0
            METRICS.observe("wake_lateness_seconds", late_s, LATENESS_BUCKETS_S)
        log.debug("run %s: pass %d started (%s)", run["id"], run["passes"], run["workflow_id"])
        return True

    def _drive(self, run, ap):
        try:
            self.driver.drive(run, ap)
        finally:
            with self.lock:
                self.active.pop(ap.run_id, None)
            self.wake()

    def _check_active(self):
        """Stop passes whose run was canceled or reclaimed, or whose deadline passed."""
        with self.lock:
            active = list(self.active.values())
        now = self.clock()
        for ap in active:
            if ap.execution is None or ap.check_failed:
                continue
            try:
                if ap.deadline_at is not None and now >= ap.deadline_at:
                    self.store.fail_run(ap.run_id, ap.pass_id, now, {
                        "message": "the run passed its deadline (%s)"
                                   % format_time(ap.deadline_at),
                        "name": "DeadlineExceeded", "stack": None})
                if not self.store.pass_is_current(ap.run_id, ap.pass_id):
                    ap.execution.cancel()
            except Exception as exc:
                if _is_outage(exc):
                    raise
                # That run's problem, not the scheduler's: its pass stops and ends as a failed
                # attempt (claiming it again sets it aside if it keeps failing).
                log.exception("run %s: checking its pass failed; the pass is stopped", ap.run_id)
                ap.check_failed = True
                with contextlib.suppress(Exception):
                    ap.execution.cancel()

    def _shutdown(self, registered=True):
        self.stopping.set()
        # Leave the table first: a `start` from now on must drive its run itself.
        if registered:
            with contextlib.suppress(OpenWorkflowError):
                self.store.unregister_scheduler(self.id)
            if self.kind == "serve":
                self._hand_over()
            elif self.hand_over:
                self._hand_over(self.config["runner_linger"])
        if self.kind != "tick":
            self.sidecar.bridge.abort()
        grace_s = self.config["shutdown_grace"] / 1000.0
        deadline = time.time() + grace_s
        while True:
            with self.lock:
                active = list(self.active.values())
            if not active:
                break
            if time.time() >= deadline or self.hurry.is_set():
                for ap in active:
                    ap.release = True
                    if ap.execution:
                        ap.execution.cancel()
                end = time.time() + 10
                while time.time() < end:
                    with self.lock:
                        if not self.active:
                            break
                    time.sleep(0.02)
                break
            self._wait(0.1)
        self.ended.set()
        if self.sock:
            self.sock.close()
            self.sock = None

    def _hand_over(self, horizon_ms=None):
        """After leaving the table: a run a `start` made while we left (serve), or one due
        within ``horizon_ms`` (tick: a schedule's new run at a short sleep, a retry's backoff),
        must not be stranded: a live scheduler is woken, or the background runner started."""
        try:
            now = self.clock()
            with self.lock:
                held = set(self.active)
            if horizon_ms is None:
                due = [run_id for run_id in self.store.pending_due(now, len(held) + 1)
                       if run_id not in held] or self.store.admission_due(now)
            else:  # (a held run's next admission counts as its due time)
                next_due = self.store.next_due_at(now)
                due = next_due is not None and next_due - now <= horizon_ms
            if due:
                pid = self.sidecar.ensure_driven()
                self.stats["handed_over"] = "runner" if pid else "scheduler"
        except OpenWorkflowError as exc:
            log.warning("could not hand due runs over: %s", exc)


# ---------------------------------------------------------------------------
# Webhook: signed callbacks from remote compute (off by default, localhost)
# ---------------------------------------------------------------------------

SIGNATURE_HEADER = "X-Openworkflow-Signature"
TIMESTAMP_HEADER = "X-Openworkflow-Timestamp"
WEBHOOK_SECRET_FILE = "webhook.secret"


class WebhookReject(Exception):
    """A callback refused with an HTTP status and a message for the caller."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def webhook_secret(data_dir, create=False):
    """The per-install signing secret (file mode 0600); created on demand when ``create``."""
    return install_secret(data_dir, WEBHOOK_SECRET_FILE, create)


def install_secret(data_dir, filename, create=False):
    """A random per-install secret kept in ``data_dir/filename`` (mode 0600)."""
    path = os.path.join(data_dir, filename)
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError("cannot read the secret %s: %s; fix its permissions"
                          % (path, exc.strerror or exc))
    if not create:
        raise ConfigError("no secret at %s; run `ty-openworkflow init` (it creates one)" % path)
    secret = os.urandom(32).hex().encode("ascii")
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return install_secret(data_dir, filename, create=False)
    except OSError as exc:
        raise ConfigError("cannot create the secret %s: %s; check that data_dir is writable"
                          % (path, exc.strerror or exc))
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret


def sign_callback(secret, body, timestamp=None):
    """Headers that sign ``body``: HMAC-SHA256 over ``"<timestamp>." + body``."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if isinstance(body, str):
        body = body.encode("utf-8")
    ts = int(time.time() if timestamp is None else timestamp)
    import hashlib
    import hmac
    mac = hmac.new(secret, b"%d." % ts + body, hashlib.sha256).hexdigest()
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: "v1=" + mac}


def verify_callback(secret, headers, body, now_s, tolerance_s):
    """Check a callback's signature and freshness; returns the signature, raises WebhookReject."""
    ts_text, sig = headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)
    if not ts_text or not sig:
        raise WebhookReject(401, "unsigned: send %s and %s (see `ty-openworkflow sign`)"
                            % (TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not re.fullmatch(r"\d{1,12}", ts_text.strip()):
        raise WebhookReject(401, "bad %s: expected unix seconds" % TIMESTAMP_HEADER)
    ts = int(ts_text.strip())
    if abs(now_s - ts) > tolerance_s:
        raise WebhookReject(401, "stale timestamp: %d s away from this server's clock, "
                                 "over the %d s tolerance" % (abs(ts - now_s), tolerance_s))
    expected = sign_callback(secret, body, ts)[SIGNATURE_HEADER]
    import hmac
    if not hmac.compare_digest(expected.encode("ascii"), sig.strip().encode("ascii", "replace")):
        raise WebhookReject(401, "bad signature")
    return sig.strip()


def parse_callback(body):
    """Validate a callback body; returns ("events", run, pass, events),
    ("signal", run, name, doc) or ("completion", run, status, doc)."""
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise WebhookReject(400, "the body is not JSON (NaN and Infinity are not JSON either)")
    if not isinstance(doc, dict):
        raise WebhookReject(422, "the body must be a JSON object")
    run_id = doc.get("runId")
    if not isinstance(run_id, str) or not run_id or len(run_id) > 100:
        raise WebhookReject(422, "runId must be a run id string")
    if "events" in doc:
        pass_id, events = doc.get("passId"), doc.get("events")
        if not isinstance(pass_id, str) or not pass_id:
            raise WebhookReject(422, "passId must be a string")
        if not isinstance(events, list) or not events or len(events) > 1000:
            raise WebhookReject(422, "events must be a list of 1 to 1000 pass events")
        checked = []
        for i, ev in enumerate(events):
            if not isinstance(ev, dict):
                raise WebhookReject(422, "events[%d] is not an object" % i)
            ev = dict(ev, **{"pass": pass_id})
            try:
                ok = parse_event_line(json.dumps(ev), pass_id)
            except (TypeError, ValueError):
                ok = None
            if ok is None:
                raise WebhookReject(422, "events[%d] is not a pass event (type one of %s, "
                                         "with step / wake_at as its type needs)"
                                    % (i, ", ".join(sorted(EVENT_TYPES))))
            checked.append(ok)
        return "events", run_id, pass_id, checked
    if "signal" in doc:
        name = doc.get("signal")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_STEP_NAME_LEN - 10:
            raise WebhookReject(422, "signal must be a signal name string")
        key = doc.get("idempotencyKey")
        if key is not None and (not isinstance(key, str) or not key or len(key) > 200):
            raise WebhookReject(422, "idempotencyKey must be a string of at most 200 characters")
        return "signal", run_id, name, doc
    status = doc.get("status")
    if status not in ("completed", "failed"):
        raise WebhookReject(422, "status must be completed or failed (or send passId and events)")
    if status == "failed" and doc.get("error") is None:
        raise WebhookReject(422, "a failed callback needs an error")
    return "completion", run_id, status, doc


class _HttpService:
    """What the webhook and the dashboard share: listen on host:port, serve on a thread, stop;
    at most ``slots`` connections at once, a thread each."""

    host, port, httpd, thread, slots = None, None, None, None, None

    def _server_class(self, what, queue_size=5):
        """A threading HTTP server holding at most ``self.slots`` connections: one more is
        answered 503 and closed at once, without a thread of its own."""
        import http.server
        import socket
        service = self

        class HTTPServer(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = queue_size
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

            def process_request(self, request, client_address):
                if not service.slots.acquire(blocking=False):
                    with contextlib.suppress(OSError):
                        request.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                                        b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address):
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    service.slots.release()

            def handle_error(self, request, client_address):
                # A caller that hung up mid-reply is routine; nothing to print.
                log.debug("%s: connection from %s ended badly", what, client_address,
                          exc_info=True)

        return HTTPServer

    def _listen(self, server_cls, handler, what):
        try:
            self.httpd = server_cls((self.host, self.port), handler)
        except OSError as exc:
            raise ConfigError("cannot listen on %s:%s for the %s (%s); change %s.host / %s.port"
                              % (self.host, self.port, what, exc.strerror or exc, what, what))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tyow-" + what,
                                       daemon=True)
        self.thread.start()

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def health(self):
        """(HTTP status, document) of GET /healthz: one shape for the webhook and the dashboard."""
        try:
            self.sidecar.store.ping()
        except Exception:
            return 503, {"ok": False, "store": "unreachable", "version": __version__}
        return 200, {"ok": True, "store": "ok", "version": __version__}


class WebhookServer(_HttpService):
    """Serves POST <webhook.path> (signed callbacks) and GET /healthz, on its own threads."""

    def __init__(self, sidecar, host=None, port=None):
        self.sidecar = sidecar
        cfg = sidecar.config
        self.host = host if host is not None else cfg["webhook.host"]
        self.port = cfg["webhook.port"] if port is None else port
        self.path = cfg["webhook.path"]
        self.secret = webhook_secret(cfg.data_dir, create=True)
        self.max_body = cfg["webhook.max_body_bytes"]
        self.tolerance_s = cfg["webhook.tolerance"] // 1000
        self.slots = threading.BoundedSemaphore(cfg["webhook.max_connections"])
        self.httpd = None
        self.thread = None

    def start(self):
        server = self

        import http.server

        class Handler(_WebhookHandler, http.server.BaseHTTPRequestHandler):
            webhook = server
            timeout = self.sidecar.config["webhook.read_timeout"] / 1000.0

        self._listen(self._server_class("webhook"), Handler, "webhook")
        log.info("webhook listening on http://%s:%d%s", self.host, self.port, self.path)
        return self

    def apply(self, headers, body):
        """Verify and apply one callback; returns the JSON reply, raises WebhookReject."""
        sc = self.sidecar
        now = sc.clock()
        signature = verify_callback(self.secret, headers, body, now // 1000, self.tolerance_s)
        kind, run_id, subject, payload = parse_callback(body)
        digests = [("sig:" + sha256_hex(signature), "signature"),
                   ("body:" + sha256_hex(body), "body")]
        try:
            done = sc.store.apply_callback(kind, run_id, subject, payload, digests, now,
                                           sc.run_policy(), sc.config["limits.max_input_bytes"])
        except Conflict as exc:
            raise WebhookReject(409, str(exc))
        except NotFound as exc:
            raise WebhookReject(404, str(exc))
        except InputError as exc:
            raise WebhookReject(422, str(exc))
        if "duplicate" in done or "ignored" in done:
            return dict({"ok": True}, **done)
        sc.poke_schedulers()
        return {"ok": True, "applied": done["applied"]}


def read_body(rfile, length, deadline=None):
    """Up to ``length`` bytes of a request's body (fewer if the client stops or goes, or once
    the monotonic ``deadline`` passes): one reader for the webhook and the dashboard."""
    chunks, got = [], 0
    while got < length and (deadline is None or time.monotonic() < deadline):
        try:
            chunk = rfile.read1(min(65536, length - got))
        except OSError:  # socket.timeout is one
            chunk = b""
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _WebhookHandler:
    """The webhook's request handling, mixed with http.server's BaseHTTPRequestHandler at start."""

    webhook = None
    server_version = "ty-openworkflow/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        log.debug("webhook %s %s", self.address_string(), fmt % args)

    # A whole request (headers and body) must arrive within read_timeout: the
    # socket timeout alone bounds each read, so a sender trickling one byte at a
    # time could hold a connection forever.
    def setup(self):
        super().setup()
        self._phase = "headers"
        self._watchdog = threading.Timer(self.timeout, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def finish(self):
        self._watchdog.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def _expire(self):
        import socket
        if self._phase == "headers":
            self._phase = "expired"
            with contextlib.suppress(OSError):
                self.connection.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                        b"Connection: close\r\n\r\n")
                self.connection.shutdown(socket.SHUT_RDWR)
        elif self._phase == "body":
            self._phase = "expired"
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RD)  # the body read ends; do_POST answers 408

    def _read_body(self, length):
        return read_body(self.rfile, length)

    def _reply(self, status, doc):
        body = (json.dumps(doc) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        # One request per connection: each gets the whole read_timeout, no more.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _reject(self, status, message):
        self._reply(status, {"ok": False, "error": message})

    def do_GET(self):
        self._phase = "handling"
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            return self._reply(*self.webhook.health())
        if path == self.webhook.path:
            return self._reject(405, "use POST for callbacks")
        return self._reject(404, "no such path; callbacks go to %s" % self.webhook.path)

    def do_POST(self):
        self._phase = "body"
        try:
            if self.path.split("?", 1)[0] != self.webhook.path:
                return self._reject(404, "no such path; callbacks go to %s" % self.webhook.path)
            length = self.headers.get("Content-Length")
            if length is None:
                return self._reject(411, "Content-Length is required")
            if not re.fullmatch(r"\d{1,12}", length.strip()):
                return self._reject(400, "bad Content-Length")
            length = int(length)
            if length > self.webhook.max_body:
                return self._reject(413, "body over %d bytes" % self.webhook.max_body)
            body = self._read_body(length)
            self._phase = "handling"
            if len(body) != length:  # timed out, or the sender stopped short
                return self._reject(408, "the body did not arrive within %s"
                                    % format_duration(self.timeout * 1000))
            reply = self.webhook.apply(self.headers, body)
            return self._reply(200, reply)
        except WebhookReject as exc:
            return self._reject(exc.status, exc.message)
        except Exception:
            log.exception("webhook: unexpected error")
            return self._reject(500, "internal error")

    def _not_allowed(self):
        self._phase = "handling"
        self._reject(405, "use POST %s or GET /healthz" % self.webhook.path)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


# ---------------------------------------------------------------------------
# Bridge: TaskYou tasks kept in step with runs, through `ty` and a durable outbox
# ---------------------------------------------------------------------------

TASK_MARKER = "ty-openworkflow-run: %s"
# A wait on a task ends when the task reaches one of these: done approves, the others refuse.
APPROVAL_ENDS = ("done", "blocked", "archived")
WAIT_MARKER = "ty-openworkflow-wait: %s %s"  # run id, wait key: the task a waitForTask created
# Task updates retry until delivered: 1 s, x2, at most 5 minutes apart.
OUTBOX_RETRY = {"initial_ms": 1000, "backoff": 2.0, "max_ms": 300000}


def find_ty(config):
    """Full path of the `ty` binary, or raise TaskYouError saying how to fix it."""
    binary = config["taskyou.cli"]
    path = shutil.which(binary)
    if not path:
        raise TaskYouError("%s not found on PATH; install TaskYou or set taskyou.cli "
                           "(task updates are queued and delivered once it is there)" % binary)
    return path


def run_ty(config, args, on_start=None, timeout_s=None):
    """The one place that calls `ty`; returns its stdout, raises TaskYouError on failure.
    ``timeout_s``: at most this long (default taskyou.timeout)."""
    argv = [find_ty(config)] + list(args)
    limit_s = config["taskyou.timeout"] / 1000.0
    timeout_s = limit_s if timeout_s is None else max(0.1, min(limit_s, timeout_s))
    rc, out, err = run_command(argv, timeout_s=timeout_s, on_start=on_start)
    if rc == 124 and err.startswith("timed out"):
        raise TaskYouError("`ty %s` did not answer within %s"
                           % (args[0], format_duration(int(timeout_s * 1000))))
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()] or ["exit status %d" % rc]
        raise TaskYouError("`ty %s` failed: %s" % (args[0], lines[0][:300]))
    return out


def parse_ty_json(text, what):
    """Parse `ty ... --json` output (the last JSON value printed)."""
    text = text.strip()
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    raise TaskYouError("`ty %s --json` printed something that is not JSON: %r" % (what, text[:200]))


# TaskYou's daemon gives its plugin services its HTTP API's address in this variable.
TY_API_ENV = "TY_API_URL"
# A task from TaskYou's API (internal/web/handlers.go, taskJSON) under the names `ty show --json`
# prints (cmd/task/main.go), so a workflow sees one shape whichever way the task was read.
SHOW_FROM_API = (("id", "id"), ("title", "title"), ("body", "body"), ("status", "status"),
                 ("type", "type"), ("project", "project"), ("executor", "executor"),
                 ("worktree", "worktree_path"), ("branch", "branch_name"),
                 ("claude_pane_id", "claude_pane_id"), ("shell_pane_id", "shell_pane_id"),
                 ("summary", "summary"), ("created_at", "created_at"),
                 ("updated_at", "updated_at"))
SHOW_IF_SET = ("started_at", "completed_at")


class TaskYouUnreachable(TaskYouError):
    """TaskYou's API did not answer (the `ty` CLI may still)."""


class TaskYouApi:
    """TaskYou's daemon HTTP API, as it gives it to plugin services (TY_API_URL): tasks read,
    its event feed followed (internal/web/server.go, handlers.go, sse.go)."""

    def __init__(self, url, timeout_s=10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    @classmethod
    def from_env(cls, environ=None):
        """The API TaskYou named in TY_API_URL, or None (none, or not an http URL)."""
        import urllib.parse
        url = (environ if environ is not None else os.environ).get(TY_API_ENV, "").strip()
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # raises ValueError for a port that is not a number
        except ValueError:
            return None
        return cls(url) if parts.scheme in ("http", "https") and parts.hostname else None

    def _get(self, path, timeout_s=None):
        """(status, JSON document) of GET ``path``; TaskYouUnreachable if there is no answer
        in JSON (another program on the port answers too)."""
        try:
            status, _, body = http_request("GET", self.url + path,
                                           headers={"Accept": "application/json"},
                                           timeout_s=timeout_s or self.timeout_s)
            return status, json.loads(body.decode("utf-8", "replace"))
        except (AdapterError, ValueError) as exc:
            raise TaskYouUnreachable("GET %s: %s" % (path, exc))

    def task(self, task_id, timeout_s=None):
        """Task ``task_id`` (GET /api/tasks/{id}) in `ty show --json`'s shape: its names, its
        times in local time (internal/db LocalTime), as `ty show` prints them."""
        status, doc = self._get("/api/tasks/%d" % int(task_id), timeout_s)
        if status == 404 and doc == {"error": "task not found"}:
            raise TaskYouError("task #%d not found (TaskYou's API)" % int(task_id))
        task = doc.get("task") if isinstance(doc, dict) else None
        if status != 200 or not isinstance(task, dict):
            raise TaskYouUnreachable("GET /api/tasks/%d answered %d" % (int(task_id), status))
        out = {show: task.get(api, "") for show, api in SHOW_FROM_API}
        out.update((k, task[k]) for k in SHOW_IF_SET if task.get(k))
        for key in ("created_at", "updated_at") + SHOW_IF_SET:
            if isinstance(out.get(key), str):
                out[key] = _local_rfc3339(out[key])
        return out

    def events(self, limit):
        """TaskYou's latest ``limit`` events (GET /api/events), newest first."""
        status, doc = self._get("/api/events?limit=%d" % limit)
        if status != 200 or not isinstance(doc, list):
            raise TaskYouUnreachable("GET /api/events answered %d" % status)
        return [e for e in doc if isinstance(e, dict) and isinstance(e.get("id"), int)]

    def board_stream(self, timeout_s, on_connection):
        """The response of the board's event stream (GET /api/board/stream); its connection is
        given to ``on_connection`` before the request is sent, so it can be shut down."""
        try:
            _, resp = http_request("GET", self.url + "/api/board/stream",
                                   headers={"Accept": "text/event-stream"}, timeout_s=timeout_s,
                                   stream=True, on_connection=on_connection)
        except AdapterError as exc:
            raise TaskYouUnreachable(str(exc))
        if resp.status != 200:
            raise TaskYouUnreachable("GET /api/board/stream answered %d" % resp.status)
        return resp


def _local_rfc3339(stamp):
    """An RFC 3339 time in this machine's zone, as Go prints it (Z when the offset is 0)."""
    import datetime
    try:
        when = datetime.datetime.fromisoformat(stamp[:-1] + "+00:00" if stamp.endswith("Z")
                                               else stamp)
    except ValueError:
        return stamp
    text = when.astimezone().replace(microsecond=0).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def sse_events(lines):
    """(event, data) of each Server-Sent Event in an iterable of byte lines."""
    event, data = "message", []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


class Bridge:
    """Delivers queued task updates to TaskYou, in order per run, until each lands."""

    def __init__(self, sidecar):
        self.sidecar = sidecar
        self.config = sidecar.config
        self.store = sidecar.store
        self._warned = set()
        self._stop = threading.Event()
        self._procs = set()
        self._lock = threading.Lock()

    def resume(self):
        self._stop.clear()

    def said(self, exc):
        """Record that a problem was already reported, so delivery does not log it again."""
        self._warned.add(str(exc).split(";")[0])

    def first_time(self, exc):
        """Whether to report ``exc``: once per process, and across processes once a day."""
        key = str(exc).split(";")[0]
        if key in self._warned:
            return False
        self._warned.add(key)
        try:
            return self.store.notice_due("taskyou:" + key[:200], self.sidecar.clock(),
                                         NOTICE_EVERY_MS)
        except OpenWorkflowError:
            return True

    def abort(self):
        """Stop delivering (scheduler shutdown): kill `ty` calls in flight; they retry later."""
        self._stop.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            _kill_group(proc)

    def _ty(self, args, timeout_s=None):
        def track(proc):
            with self._lock:
                self._procs.add(proc)
        try:
            return run_ty(self.config, args, on_start=track, timeout_s=timeout_s)
        finally:
            with self._lock:
                self._procs = {p for p in self._procs if p.poll() is None}

    def deliver_due(self):
        """Deliver every update that is due; returns how many landed."""
        delivered = 0
        while not self._stop.is_set():
            now = self.sidecar.clock()
            # An item takes at most three `ty` calls; its lease outlasts them.
            items = self.store.claim_outbox(now, self.config["taskyou.timeout"] * 3 + 10000)
            if not items:
                return delivered
            self.store.sync()  # TaskYou hears only of what a power cut cannot take back
            for item in items:
                if self._stop.is_set():
                    self.store.outbox_failed(item["id"], self.sidecar.clock(),
                                             "interrupted by shutdown", self.sidecar.clock())
                    continue
                try:
                    task_id = self._deliver(item)
                except TaskYouError as exc:
                    retry_at = self.sidecar.clock() + backoff_ms(OUTBOX_RETRY, item["attempts"] + 1)
                    self.store.outbox_failed(item["id"], self.sidecar.clock(), str(exc), retry_at)
                    if self.first_time(exc):
                        log.warning("taskyou: %s; will retry", exc)
                    continue
                self.store.outbox_delivered(item["id"], self.sidecar.clock(), task_id,
                                            item["run_id"])
                delivered += 1
        return delivered

    def _project_args(self):
        return (["--project", self.config["taskyou.project"]] if self.config["taskyou.project"]
                else [])

    def _deliver(self, item):
        run = self.store.get_run(item["run_id"])
        if run is None:
            return None
        if item["kind"] == "create":
            return self._create(run, item)
        if item["kind"] == "approval":
            return self._create_approval(run, item)
        if item["kind"] == "approval_end":
            payload = json.loads(item["payload"])
            task_id = self.store.wait_task(run["id"], payload["key"])
            if task_id is not None:  # nobody waits on the task any more: say so and put it away
                self._append(str(task_id), run, "approval-end",
                             "no longer waited for: %s" % payload.get("reason", "the wait ended"))
                self._ty(["status", str(task_id), "archived"])
            return None
        task_id = run["task_id"]
        if task_id is None:
            raise TaskYouError("the task for run %s is not created yet" % run["id"])
        payload = json.loads(item["payload"]) if item["payload"] else {}
        tid = str(task_id)
        if item["kind"] == "processing":
            self._ty(["status", tid, "processing"])
        elif item["kind"] == "completed":
            self._append(tid, run, "completed", "output: %s" % _short(payload.get("output"), 2000))
            self._ty(["close", tid])
        elif item["kind"] == "failed":
            err = payload.get("error") or {}
            self._append(tid, run, "failed", "error: %s" % (err.get("message") or "unknown error"))
            self._ty(["status", tid, "blocked"])
        elif item["kind"] == "canceled":
            self._append(tid, run, "canceled", "the run was canceled")
            self._ty(["status", tid, "blocked"])
        return None

    def _create_approval(self, run, item):
        """The task a `waitForTask` waits on: created once (a marker in its body), its id kept in
        the wait."""
        payload = json.loads(item["payload"])
        if not self.store.wait_open(run["id"], payload["key"]):
            return None  # the wait ended (timeout, the run finished) before the task could be made
        marker = WAIT_MARKER % (run["id"], payload["key"])
        task_id = self._find_task(payload["title"], marker) if item["attempts"] > 0 else None
        if task_id is None:
            body = ("%s\n\nAsked by ty-openworkflow run %s (workflow %s): "
                    "move this task to done to approve, "
                    "to blocked or archived to refuse.\n\n%s"
                    % ((payload.get("body") or "").rstrip(), run["id"], run["workflow_id"],
                       marker))
            out = self._ty(["create", "--body", body.lstrip(), "--json"] + self._project_args()
                           + ["--", payload["title"]])
            doc = parse_ty_json(out, "create")
            if not isinstance(doc, dict) or not isinstance(doc.get("id"), int):
                raise TaskYouError("`ty create --json` printed no task id: %r" % out[:200])
            task_id = doc["id"]
        self.store.set_wait_task(run["id"], payload["key"], task_id, self.sidecar.clock())
        return None

    def poll_approvals(self):
        """Look at the tasks runs wait on (read_task, at most every poll_interval each): done
        resolves the wait as approved, blocked or archived as refused. TaskYou failing only
        delays it."""
        now = self.sidecar.clock()
        resolved = 0
        for run_id, key, spec in self.store.approvals_due(now, self.config["poll_interval"]):
            if self._stop.is_set():
                break
            try:
                task = self.read_task(spec["task_id"])
            except TaskYouError as exc:
                if self.first_time(exc):
                    log.warning("taskyou: %s; will look again", exc)
                task = None
            if self.judge(run_id, key, task) is None:
                self.store.set_wait_task(run_id, key, spec["task_id"], self.sidecar.clock())
            else:
                resolved += 1
        if resolved:
            self.sidecar.poke_schedulers()
        return resolved

    def judge(self, run_id, key, task):
        """Resolve a wait by its task's status (done: approved; blocked, archived: refused).
        True if this resolved it, False if it had ended already, None if the task is open."""
        status = task.get("status") if isinstance(task, dict) else None
        if status not in APPROVAL_ENDS:
            return None
        return self.store.resolve_wait(run_id, key, {"value": {"approved": status == "done",
                                                               "task": task}},
                                       self.sidecar.clock())

    def task_changed(self, task_id, hint=None, patience_s=0.0, budget_s=None, waits=None):
        """TaskYou says task ``task_id`` changed: resolve the waits on it by its status now.
        ``hint``: what told us (a hook's event; None: the feed, whose errors are raised); the
        task is read again for up to ``patience_s`` until it shows an end. Whatever cannot be
        settled now (the task shows no end yet, TaskYou does not answer within ``budget_s``) is
        left to the next poll, made due at once. Returns how many waits were resolved; 0 at
        once for a task no run waits on. ``waits``: the open task waits, if the caller has
        them."""
        waits = [w for w in (self.store.task_waits() if waits is None else waits)
                 if w[2] == task_id]
        if not waits:
            return 0
        began = time.monotonic()
        task = None
        try:
            while True:
                left = None if budget_s is None else budget_s - (time.monotonic() - began)
                if left is not None and left <= 0.1:
                    break
                task = self.read_task(task_id, timeout_s=left)
                status = task.get("status") if isinstance(task, dict) else None
                if status in APPROVAL_ENDS or time.monotonic() - began >= patience_s:
                    break
                time.sleep(0.25)
        except TaskYouError:
            if hint is None:
                raise
        resolved = 0
        for run_id, key, _ in waits:
            if self.judge(run_id, key, task) is None:
                if hint is not None:  # heard of but not seen: the next poll looks at once
                    self.store.poll_soon(run_id, key)
            else:
                resolved += 1
        return resolved

    def read_task(self, task_id, timeout_s=None):
        """Task ``task_id`` as `ty show --json` prints it: from TaskYou's HTTP API when its
        daemon gave us one (TY_API_URL), else (or if the API does not answer) from `ty show`."""
        api = TaskYouApi.from_env()
        if api is not None:
            try:
                return api.task(task_id, timeout_s=timeout_s and min(timeout_s, api.timeout_s))
            except TaskYouUnreachable as exc:
                if self.first_time(TaskYouError("TaskYou's API at %s: %s" % (api.url, exc))):
                    log.info("taskyou: the API at %s did not answer (%s); using `ty show`",
                             api.url, exc)
        return parse_ty_json(self._ty(["show", str(task_id), "--json"], timeout_s), "show")

    def _create(self, run, item):
        marker = TASK_MARKER % run["id"]
        if item["attempts"] > 0:
            # An earlier attempt may have created the task and died before we stored its id.
            found = self._find_task(run["task_title"], marker)
            if found is not None:
                return found
        body = ("Workflow run started by ty-openworkflow.\n\n"
                "workflow: %s (version %d)\nrun: %s\ninput: %s\n\n%s"
                % (run["workflow_id"], run["version"], run["id"],
                   _short(json.loads(run["input"]), 1000), marker))
        # `--` first: a title like "-1 day: renew" must not be read as flags.
        out = self._ty(["create", "--body", body, "--json"] + self._project_args()
                       + ["--", run["task_title"]])
        doc = parse_ty_json(out, "create")
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), int):
            raise TaskYouError("`ty create --json` printed no task id: %r" % out[:200])
        return doc["id"]

    def _find_task(self, title, marker):
        out = self._ty(["list", "--json", "-n", "500"] + self._project_args())
        rows = parse_ty_json(out, "list") or []
        for row in sorted(rows, key=lambda r: -int(r.get("id", 0))):
            if row.get("title") != title:
                continue
            task = parse_ty_json(self._ty(["show", str(row["id"]), "--json"]), "show")
            if marker in (task.get("body") or ""):
                return int(row["id"])
        return None

    def _append(self, task_id, run, kind, text):
        """Append a section to the task body once (the tag makes a retry a no-op)."""
        tag = "[ty-openworkflow: run %s %s%s]" % (
            run["id"], kind, " after retry %d" % run["retries"] if run.get("retries") else "")
        task = parse_ty_json(self._ty(["show", task_id, "--json"]), "show")
        body = task.get("body") or ""
        if tag in body:
            return
        new = "%s\n\n%s %s\n%s" % (body.rstrip(), tag, format_time(self.sidecar.clock()), text)
        self._ty(["update", task_id, "--body", new])

    def task_state(self, run):
        """How the run's task link stands, for `status`."""
        items = self.store.outbox_for_run(run["id"])
        pending = [i for i in items if i["delivered_at"] is None]
        state = {"requested": bool(run["task_requested"]), "title": run["task_title"],
                 "id": run["task_id"], "pending_updates": len(pending), "delivered": not pending}
        if pending:
            state["last_error"] = pending[0]["last_error"]
            state["next_attempt_at"] = pending[0]["next_at"]
        return state


# ---------------------------------------------------------------------------
# TaskYou plugin: `serve` supervised by TaskYou, woken by its hooks and its event feed
# ---------------------------------------------------------------------------
# TaskYou loads plugins from `ty plugins dir` (bborn/taskyou docs/plugins.md,
# internal/hooks/plugins.go): a directory with a plugin.yaml naming hook scripts per task
# event, action scripts (run with no arguments, up to 60 s, output shown to the user) and
# services (`sh -c` from the plugin dir, stopped with SIGTERM then SIGKILL 5 s later).

PLUGIN_NAME = "openworkflow"
PLUGIN_EVENTS = ("task.done", "task.blocked", "task.failed")
PLUGIN_ACTIONS = (("runs", "Workflow runs of this task"),
                  ("cancel", "Cancel this task's workflow runs"),
                  ("retry", "Retry this task's failed workflow run"))
PLUGINS_DIR_ENV = "TY_PLUGINS_DIR"
PLUGIN_RECORD = "taskyou-plugins.json"  # in the data dir: where `plugin install` wrote
# TaskYou kills a service 5 s after SIGTERM (internal/hooks/services.go): leave passes in
# flight less than that before they are given back.
PLUGIN_SERVE = "exec ./ty-openworkflow serve --shutdown-grace 2s"
# A hook's task may not show its new status yet (TaskYou passes the task as it was): read it
# again for this long before leaving it to the next poll. TaskYou kills hooks at 30 s.
HOOK_PATIENCE_S = 5.0
FEED_READ_TIMEOUT_S = 45.0  # TaskYou's stream sends a heartbeat every 15 s
FEED_BACKOFF_MAX_S = 30.0
FEED_READ_BUDGET_S = 5.0  # one task read from the feed: stop() must not wait on more
FEED_EVENTS_LOOK = 200  # TaskYou events looked at per board change (GET /api/events?limit=)
PLUGIN_RUNS_SHOWN = 50  # the `runs` action's lines at most
HOOK_BUDGET_S = 10.0  # all a hook may spend on TaskYou; TaskYou kills it at 30 s
BOARD_OPEN = ("backlog", "processing")  # board columns of tasks that cannot end a wait


def plugins_dir(config):
    """Where TaskYou looks for plugins: $TY_PLUGINS_DIR, else what `ty plugins dir` prints,
    else ~/.config/task/plugins (Go's os.UserConfigDir honours $XDG_CONFIG_HOME)."""
    if os.environ.get(PLUGINS_DIR_ENV):
        return os.environ[PLUGINS_DIR_ENV]
    with contextlib.suppress(TaskYouError):
        printed = run_ty(config, ["plugins", "dir"]).strip().splitlines()
        if printed and os.path.isabs(printed[-1].strip()):
            return printed[-1].strip()
    if sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Application Support")
    else:
        base = os.environ.get("XDG_CONFIG_HOME", "")
        base = base if os.path.isabs(base) else os.path.expanduser("~/.config")
    return os.path.join(base, "task", "plugins")


def plugin_label(text):
    """A label TaskYou's YAML reader takes and its one-line picker shows: no control
    characters (yaml.v3 refuses the whole manifest for one), no line breaks, at most 60."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:59].rstrip() + "\u2026"


def plugin_files(launcher, workflows=(), marker=""):
    """The plugin's files, {relative path: text}: its manifest, the launcher every script
    runs, one hook script for the events that can end a wait, one script per action."""
    def q(text):
        return json.dumps(text, ensure_ascii=False)

    def script(what, args):
        return ("#!/bin/sh\n# %s\nexec \"$(dirname \"$0\")/../ty-openworkflow\" %s\n"
                % (what, args))

    actions = list(PLUGIN_ACTIONS) + [
        ("start-" + wf["id"], plugin_label(wf.get("name") or "") or wf["id"]) for wf in workflows]
    lines = ["# The ty-openworkflow TaskYou plugin. Written by `ty-openworkflow plugin install`,",
             "# which rewrites it (and `deploy` its start- actions): edits here do not last.",
             "name: %s" % PLUGIN_NAME, "version: %s" % q(__version__),
             "description: %s" % q("Durable workflows for TaskYou: runs `ty-openworkflow "
                                   "serve`, resumes runs waiting on a task when it changes, "
                                   "and starts, lists, cancels and retries a task's runs."),
             "hooks:"]
    lines += ["  %s: hooks/task-event" % event for event in PLUGIN_EVENTS]
    lines.append("actions:")
    for aid, label in actions:
        lines += ["  - id: %s" % q(aid), "    label: %s" % q(label),
                  "    command: %s" % q("actions/" + aid)]
    lines += ["services:", "  - name: serve", "    command: %s" % q(PLUGIN_SERVE)]
    if marker:
        lines.append("# %s" % marker)
    files = {"plugin.yaml": "\n".join(lines) + "\n", "ty-openworkflow": launcher,
             "hooks/task-event": script("TaskYou runs this on %s: a run waiting on the task "
                                        "resumes." % ", ".join(PLUGIN_EVENTS), "plugin hook")}
    for aid, label in actions:
        files["actions/" + aid] = script("%s (`ty plugins run %s %s TASK_ID`)."
                                         % (label, PLUGIN_NAME, aid), "plugin action " + aid)
    return files


def installed_launcher(config_path=None, data_dir=None):
    """The plugin's launcher for this install: the interpreter and module running now."""
    import shlex
    env = "%s=%s " % (DATA_DIR_ENV, shlex.quote(data_dir)) if data_dir else ""
    conf = " --config %s" % shlex.quote(config_path) if config_path else ""
    return ("#!/bin/sh\n# The ty-openworkflow this plugin runs: the install that wrote it.\n"
            "%sexec %s %s%s \"$@\"\n" % (env, shlex.quote(sys.executable),
                                        shlex.quote(os.path.abspath(__file__)), conf))


# The plugin a clone of the repository carries (runtimes/openworkflow: `ty plugins add` of the
# repository finds it); it runs the module two levels up with the python3 on PATH.
CLONE_LAUNCHER = ("#!/bin/sh\n# The ty-openworkflow this plugin runs: the clone it is part of.\n"
                  "here=$(cd \"$(dirname \"$0\")\" && pwd)\n"
                  "exec python3 \"$here/../../ty_openworkflow.py\" \"$@\"\n")


def write_plugin(directory, files):
    """Write the plugin's files into ``directory`` (each atomically, scripts executable) and
    remove its action scripts that are no longer declared."""
    import tempfile
    for rel, text in sorted(files.items()):
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644 if rel.endswith(".yaml") else 0o755)
        os.replace(tmp, path)
    actions_dir = os.path.join(directory, "actions")
    for name in os.listdir(actions_dir):
        if "actions/" + name not in files and not name.startswith("."):
            os.unlink(os.path.join(actions_dir, name))


def plugin_named(name, parent, exclude, depth=0):
    """The first other plugin named ``name`` under ``parent``, found as TaskYou's loader finds
    plugins (internal/hooks/plugins.go: a dir with a plugin.yaml, else 4 levels deep)."""
    if depth > 4:
        return None
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return None
    pattern = re.compile(r"^name:\s*[\"']?%s[\"']?\s*$" % re.escape(name), re.M)
    for entry in entries:
        if not entry.is_dir() or entry.path == exclude:
            continue
        manifest = os.path.join(entry.path, "plugin.yaml")
        if os.path.isfile(manifest):
            with contextlib.suppress(OSError), open(manifest, encoding="utf-8",
                                                    errors="replace") as f:
                if pattern.search(f.read()):
                    return entry.path
            continue
        found = plugin_named(name, entry.path, exclude, depth + 1)
        if found:
            return found
    return None


class TaskYouPlugin:
    """Installs the plugin into TaskYou's plugins dir, keeps its start- actions in step with
    the deployed workflows, and does what its hooks and actions ask."""

    def __init__(self, sidecar):
        self.sidecar = sidecar
        self.config = sidecar.config
        self.record_path = os.path.join(self.config.data_dir, PLUGIN_RECORD)

    # -- install and keep in step ----------------------------------------------------------

    def install(self, parent=None):
        """Write the plugin into ``parent`` (default: TaskYou's plugins dir); returns its dir."""
        parent = os.path.abspath(os.path.expanduser(parent or plugins_dir(self.config)))
        directory = os.path.join(parent, PLUGIN_NAME)
        self._check_ours(directory)
        twin = plugin_named(PLUGIN_NAME, parent, directory)
        if twin:
            raise Conflict("another plugin named %s is installed at %s (TaskYou would run both, "
                           "and its actions hide ours); remove it first (`ty plugins remove %s`, "
                           "or delete that directory)" % (PLUGIN_NAME, twin, PLUGIN_NAME))
        with self._locked():
            try:
                write_plugin(directory, self._files())
            except OSError as exc:
                raise InputError("cannot write the plugin into %s: %s; choose another place with "
                                 "--dir" % (directory, exc.strerror or exc))
            self._record(directory, add=True)
        return directory

    @contextlib.contextmanager
    def _locked(self):
        """One install or deploy at a time rewrites the plugin and its record."""
        import fcntl
        os.makedirs(self.config.data_dir, exist_ok=True)
        with open(self.record_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_ours(self, directory):
        manifest = os.path.join(directory, "plugin.yaml")
        if os.path.isdir(os.path.join(directory, ".git")):
            raise Conflict("%s is a git checkout (`ty plugins add`); delete that directory, or "
                           "install elsewhere with --dir" % directory)
        if os.path.exists(directory) and not os.path.isfile(manifest) and os.listdir(directory):
            raise Conflict("%s exists and is not a TaskYou plugin; move it away or install "
                           "elsewhere with --dir" % directory)
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if not re.search(r"^name:\s*%s\s*$" % PLUGIN_NAME, text, re.M):
                raise Conflict("%s holds another plugin; move it away or install elsewhere "
                               "with --dir" % directory)

    def _marker(self):
        return "store %s" % self.sidecar.store.store_id

    def _files(self):
        path = self.config.path if self.config.exists else None
        launcher = installed_launcher(path and os.path.abspath(path),
                                      os.environ.get(DATA_DIR_ENV) and self.config.data_dir)
        workflows = [{"id": wf["id"], "name": wf.get("name")}
                     for wf in self.sidecar.store.list_workflows()]
        return plugin_files(launcher, workflows, self._marker())

    def _installed(self):
        try:
            with open(self.record_path, encoding="utf-8") as f:
                dirs = json.load(f)
        except (OSError, ValueError):
            return []
        return [d for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []

    def _record(self, directory, add):
        import tempfile
        dirs = [d for d in self._installed() if d != directory] + ([directory] if add else [])
        fd, tmp = tempfile.mkstemp(dir=self.config.data_dir, prefix=".plugins-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dirs, f)
        os.replace(tmp, self.record_path)

    def sync(self):
        """After a deploy: rewrite each installed plugin's manifest and action scripts, so its
        start- actions match the workflows (its launcher stays the install's). A plugin removed
        since (or taken by another store) is forgotten."""
        if not self._installed():
            return
        with self._locked():
            files = self._files()
            files.pop("ty-openworkflow")
            for directory in self._installed():
                try:
                    with open(os.path.join(directory, "plugin.yaml"), encoding="utf-8") as f:
                        ours = ("# %s\n" % self._marker()) in f.read()
                except OSError:
                    ours = False
                if not ours:
                    self._record(directory, add=False)
                    continue
                try:
                    write_plugin(directory, files)
                except OSError as exc:
                    log.warning("could not update the TaskYou plugin in %s: %s", directory,
                                exc.strerror or exc)

    # -- hooks and actions -------------------------------------------------------------------

    @staticmethod
    def task_in(environ):
        """The task id TaskYou gave a hook or action (TASK_ID), or None."""
        value = (environ.get("TASK_ID") or "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    def hook(self, environ):
        """A task event: resolve the waits on that task (a task no run waits on: nothing)."""
        task_id = self.task_in(environ)
        if task_id is None:
            return 0
        event = environ.get("TASK_EVENT")
        final = event in PLUGIN_EVENTS  # TaskYou's task may not show it yet: read it again
        resolved = self.sidecar.bridge.task_changed(
            task_id, hint=event or "a hook", patience_s=HOOK_PATIENCE_S if final else 0.0,
            budget_s=HOOK_BUDGET_S)
        if resolved:
            self.sidecar.ensure_driven()
        return resolved

    def action(self, name, environ):
        """Do action ``name`` for the task in ``environ``; returns (exit status, lines)."""
        task_id = self.task_in(environ)
        if task_id is None:
            return 2, ["this action needs a task, and TaskYou passed none: run it on an existing "
                       "task (`ty plugins run %s %s TASK_ID`, or A on a task in the TUI)"
                       % (PLUGIN_NAME, name)]
        if name.startswith("start-"):
            return self._start(name[len("start-"):], task_id, environ)
        handler = {"runs": self._runs, "cancel": self._cancel, "retry": self._retry}.get(name)
        if handler is None:
            return 2, ["no action %r; the plugin has runs, cancel, retry and start-WORKFLOW"
                       % name]
        return handler(task_id)

    def _runs(self, task_id):
        runs = self.sidecar.store.runs_of_task(task_id)
        waiting = sorted({w[0] for w in self.sidecar.store.task_waits(task_id)})
        if not runs and not waiting:
            return 0, ["task #%d has no workflow runs" % task_id]
        counts = collections.Counter(r["status"] for r in runs)
        head = "task #%d: %d workflow run%s" % (task_id, len(runs), "" if len(runs) == 1 else "s")
        if runs:
            head += " (%s)" % ", ".join("%d %s" % (counts[s], s) for s in RUN_STATUSES
                                        if counts[s])
        if waiting:
            head += "; %d waiting on it" % len(waiting)
        lines = ["%s  %s  %s  since %s" % (r["id"], r["workflow_id"], r["status"],
                                           format_time(r["updated_at"]))
                 for r in runs[-PLUGIN_RUNS_SHOWN:]]
        if len(runs) > PLUGIN_RUNS_SHOWN:
            lines.insert(0, "(the latest %d; `ty-openworkflow list runs` has them all)"
                         % PLUGIN_RUNS_SHOWN)
        lines += ["%s  waits on this task" % run_id for run_id in waiting[:PLUGIN_RUNS_SHOWN]]
        return 0, [head] + lines

    def _cancel(self, task_id):
        open_runs = [r["id"] for r in self.sidecar.store.runs_of_task(task_id)
                     if r["status"] not in TERMINAL]
        if not open_runs:
            return 0, ["task #%d has no unfinished workflow runs" % task_id]
        for run_id in open_runs:
            self.sidecar.cancel(run_id)
        return 0, ["canceled %d workflow run%s of task #%d: %s"
                   % (len(open_runs), "" if len(open_runs) == 1 else "s", task_id,
                      ", ".join(open_runs))]

    def _retry(self, task_id):
        failed = [r for r in self.sidecar.store.runs_of_task(task_id) if r["status"] == "failed"]
        if not failed:
            return 1, ["task #%d has no failed workflow run to retry" % task_id]
        run = self.sidecar.retry(failed[-1]["id"])
        return 0, ["retrying run %s of %s (task #%d): %s"
                   % (run["id"], run["workflow_id"], task_id, run["status"])]

    def _start(self, workflow_id, task_id, environ):
        try:
            task = self.sidecar.bridge.read_task(task_id)
        except TaskYouError:  # what TaskYou gave the action is the task as far as we know
            task = {"id": task_id, "title": environ.get("TASK_TITLE", ""),
                    "status": environ.get("TASK_STATUS", ""),
                    "project": environ.get("TASK_PROJECT", ""),
                    "type": environ.get("TASK_TYPE", ""),
                    "worktree": environ.get("WORKTREE_PATH", "")}
        run = self.sidecar.start(workflow_id, {"task": task}, task_id=task_id)
        return 0, ["started %s (run %s) for task #%d: %s"
                   % (workflow_id, run["id"], task_id, run["status"])]


class TaskFeed:
    """Follows TaskYou's event feed (its daemon's board stream at TY_API_URL), so a run waiting
    on a task resumes about a second after the task changes however it was changed; the
    bridge's polling stays the fallback. Reconnects with backoff; idle, it waits on a socket.

    Each board event means something changed: the tasks TaskYou's latest events name (GET
    /api/events) are read again if runs wait on them; after a (re)connect, or when more changed
    than one look at the events shows, every waited-on task the board does not show open is."""

    def __init__(self, bridge, api, on_resolved):
        self.bridge = bridge
        self.api = api
        self.on_resolved = on_resolved
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conn = None
        self._last_event = None  # the newest TaskYou event looked at, this connection
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run, name="tyow-taskfeed", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Stop following (a daemon thread: it is not waited for past a moment)."""
        import socket
        self._stop.set()
        with self._lock:
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self.thread is not None:
            self.thread.join(0.5)

    def _run(self):
        backoff_s = 0.0
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._follow()
            except (TaskYouError, OSError, ValueError, _http_exception()) as exc:
                if not self._stop.is_set() and self.bridge.first_time(
                        TaskYouError("TaskYou's event feed at %s: %s" % (self.api.url, exc))):
                    log.info("taskyou: the event feed at %s stopped (%s); polling goes on, "
                             "reconnecting", self.api.url, exc)
            except Exception:  # the feed must never take serve down
                log.exception("taskyou: the event feed failed")
            if time.monotonic() - began > 10:  # it was up a while: a new drop starts afresh
                backoff_s = 0.0
            backoff_s = min(FEED_BACKOFF_MAX_S, max(1.0, backoff_s * 2))
            self._stop.wait(backoff_s)

    def _connected(self, conn):
        with self._lock:
            self._conn = conn
        if self._stop.is_set():
            raise TaskYouError("stopping")

    def _follow(self):
        self._last_event = None
        try:
            resp = self.api.board_stream(FEED_READ_TIMEOUT_S, self._connected)
            for event, data in sse_events(iter(resp.readline, b"")):
                if self._stop.is_set():
                    return
                if event == "board":
                    self._board(loads_or_none(data))
        finally:
            with self._lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _board(self, snapshot):
        """Something changed on the board: look at the waited-on tasks that may have ended."""
        waits = self.bridge.store.task_waits()
        if not waits:
            self._last_event = None  # when a run waits again, every waited-on task is looked at
            return
        changed = self._changed_tasks()
        shown = {}
        columns = snapshot.get("columns") if isinstance(snapshot, dict) else None
        for col in columns or []:
            for task in (col.get("tasks") or []) if isinstance(col, dict) else []:
                if isinstance(task, dict):
                    shown[task.get("id")] = col.get("status")
        resolved = 0
        for task_id in sorted({w[2] for w in waits}):
            if self._stop.is_set():
                return
            if shown.get(task_id) in BOARD_OPEN or (changed is not None
                                                    and task_id not in changed):
                continue
            try:
                resolved += self.bridge.task_changed(task_id, budget_s=FEED_READ_BUDGET_S,
                                                     waits=waits)
            except TaskYouError as exc:
                if self.bridge.first_time(exc):
                    log.warning("taskyou: %s; will look again", exc)
        if resolved:
            self.on_resolved()

    def _changed_tasks(self):
        """Ids of the tasks TaskYou's events since the last look name, or None when that cannot
        be told (the first look on this connection, more events than one look shows, no
        answer): then every waited-on task is a candidate."""
        last = self._last_event
        try:
            events = self.api.events(FEED_EVENTS_LOOK)
        except TaskYouError:
            return None
        if events:
            self._last_event = max(e["id"] for e in events)
        if last is None or len(events) >= FEED_EVENTS_LOOK:
            return None
        return {e.get("task_id") for e in events if e["id"] > last}


# ---------------------------------------------------------------------------
# Dashboard and metrics: one HTTP surface for people (a page, its JSON API) and
# Prometheus (/metrics), off by default, localhost by default
# ---------------------------------------------------------------------------

DASHBOARD_TOKEN_FILE = "dashboard.token"
DASHBOARD_CACHE_S = 1.0  # an answer is reused this long (the page polls every 2 s)
DASHBOARD_MAX_BODY_BYTES = 1 << 20  # an action's body
# An idle connection is closed after this long, and a body must arrive within it.
DASHBOARD_READ_TIMEOUT_S = 10
# Pass durations and wake lateness, in seconds: the histograms' bucket bounds.
PASS_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LATENESS_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class _Metrics:
    """What this process's schedulers did (passes, steps, wake-ups); the store knows the rest."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = collections.Counter()  # (name, label value) -> count
        self.hists = {}  # name -> [bucket counts..., +Inf count, sum]

    def inc(self, name, label=None, by=1):
        with self._lock:
            self.counters[(name, label)] += by

    def observe(self, name, value, buckets):
        with self._lock:
            h = self.hists.setdefault(name, [0] * (len(buckets) + 1) + [0.0])
            for i, bound in enumerate(buckets):
                if value <= bound:
                    h[i] += 1
            h[len(buckets)] += 1
            h[-1] += value

    def snapshot(self):
        with self._lock:
            return dict(self.counters), {k: list(v) for k, v in self.hists.items()}


METRICS = _Metrics()


def _prom_escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(sidecar):
    """The Prometheus text exposition of the store's state and this process's counters."""
    store, now = sidecar.store, sidecar.clock()
    lines = []

    def family(name, kind, help_, samples):
        lines.append("# HELP %s %s" % (name, help_))
        lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            label = ",".join('%s="%s"' % (k, _prom_escape(v)) for k, v in labels)
            lines.append("%s%s %s" % (name, "{%s}" % label if label else "", _prom_num(value)))

    by_status = store.count_by_status()
    family("tyow_runs", "gauge", "Runs in the store by status.",
           [((("status", st),), by_status.get(st, 0)) for st in RUN_STATUSES])
    counts = store.counters()
    for kind in ("started", "completed", "failed", "canceled"):
        family("tyow_runs_%s_total" % kind, "counter", "Runs %s, by workflow." % kind,
               [((("workflow", wf),), n) for (name, wf), n in sorted(counts.items())
                if name == kind])
    family("tyow_runs_queued", "gauge", "Pending runs held back by their workflow's limits, by "
           "workflow and the limit that holds them (next_claim: none; the next claim admits them).",
           [((("workflow", wf), ("reason", why)), n)
            for (wf, why), n in sorted(store.queued_counts(now).items())])
    family("tyow_runs_active", "gauge", "Runs started and not finished, of workflows with limits.",
           [((("workflow", r["workflow_id"]),), r["active"]) for r in store.limits()])
    mine, hists = METRICS.snapshot()
    family("tyow_passes_total", "counter", "Passes this process started, by workflow.",
           [((("workflow", wf),), n) for (name, wf), n in sorted(mine.items(), key=str)
            if name == "passes"])
    for name, help_ in (("step_attempts", "Step attempts this process recorded."),
                        ("step_failures", "Step attempts that failed, recorded by this process.")):
        family("tyow_%s_total" % name, "counter", help_, [((), mine.get((name, None), 0))])
    for name, buckets, help_ in (("pass_duration_seconds", PASS_BUCKETS_S,
                                  "How long passes took, launch to end."),
                                 ("wake_lateness_seconds", LATENESS_BUCKETS_S,
                                  "How late a due sleeping or waiting run was claimed.")):
        h = hists.get(name, [0] * (len(buckets) + 1) + [0.0])
        lines.append("# HELP tyow_%s %s" % (name, help_))
        lines.append("# TYPE tyow_%s histogram" % name)
        for i, bound in enumerate(buckets):
            lines.append('tyow_%s_bucket{le="%s"} %d' % (name, _prom_num(bound), h[i]))
        lines.append('tyow_%s_bucket{le="+Inf"} %d' % (name, h[len(buckets)]))
        lines.append("tyow_%s_sum %s" % (name, _prom_num(h[-1])))
        lines.append("tyow_%s_count %d" % (name, h[len(buckets)]))
    backlog = store.outbox_backlog()
    family("tyow_taskyou_outbox_backlog", "gauge", "TaskYou updates not delivered yet.",
           [((), backlog)])
    workers = sidecar.adapter("exec").workers() if sidecar.adapter_made("exec") else {}
    family("tyow_warm_workers", "gauge", "Warm workers alive in this process, by runtime.",
           [((("runtime", rt),), len(workers.get(rt, []))) for rt in sorted(RUNTIMES)])
    leases = store.leases_held(now)
    family("tyow_leases_held", "gauge", "Runs whose pass holds a live lease (all schedulers).",
           [((), leases)])
    family("tyow_schedulers_alive", "gauge", "Schedulers with a fresh heartbeat.",
           [((), len(store.live_schedulers(now, 2 * sidecar.config["lease_ttl"])))])
    return "\n".join(lines) + "\n"


def _prom_num(v):
    """A sample value: whole floats without the ``.0`` (``1`` rather than ``1.0``)."""
    if isinstance(v, float):
        return "%d" % v if abs(v) < 1e15 and v == int(v) else repr(v)
    return str(v)


class DashboardServer(_HttpService):
    """`/` (the page), `/api/...` (its JSON), `/metrics`, `/healthz` on dashboard.host:port.

    GET never changes anything. POST /api/runs/<id>/cancel|retry|signal needs the
    per-install token (<data_dir>/dashboard.token) in an `Authorization: Bearer`
    header, which a cross-site page cannot send (no CORS is ever allowed)."""

    def __init__(self, sidecar, host=None, port=None):
        cfg = sidecar.config
        self.page = runtime_file(DASHBOARD_PAGE)  # read first: a missing file stops the start
        self.sidecar = sidecar
        self.host = cfg["dashboard.host"] if host is None else host
        self.port = cfg["dashboard.port"] if port is None else port
        self.token = install_secret(cfg.data_dir, DASHBOARD_TOKEN_FILE,
                                    create=True).decode("ascii").strip()
        self.allowed_hosts = {"localhost", "127.0.0.1", "::1", self.host.lower()} | {
            h.strip().lower() for h in cfg["dashboard.allowed_hosts"].split(",") if h.strip()}
        self.slots = threading.BoundedSemaphore(cfg["dashboard.max_connections"])
        self.httpd = None
        # What was answered in the last DASHBOARD_CACHE_S is answered again as it was: many open
        # pages and scrapers cost the scheduler it shares a process with next to nothing.
        self._cache = {}
        self._cache_lock = threading.Lock()
        self._compute_lock = threading.Lock()

    def cached(self, key, make):
        """The answer for ``key``, made by ``make()`` at most once per DASHBOARD_CACHE_S."""
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < DASHBOARD_CACHE_S:
                return hit[1]
        # One request at a time does the work; the others wait and reuse it.
        with self._compute_lock:
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit and time.monotonic() - hit[0] < DASHBOARD_CACHE_S:
                    return hit[1]
            value = make()
            self.sidecar.store.sync_shown()
            with self._cache_lock:
                if len(self._cache) > 500:
                    self._cache.clear()
                self._cache[key] = (time.monotonic(), value)
            return value

    def start(self, announce=True):
        """Listen; ``announce``: log the address (`dashboard` prints it itself instead)."""
        import http.server
        server = self

        class Handler(_DashboardHandler, http.server.BaseHTTPRequestHandler):
            dashboard = server
            timeout = DASHBOARD_READ_TIMEOUT_S

        # Many pages opening at once must not wait out a dropped SYN (1 s): a long queue.
        self._listen(self._server_class("dashboard", queue_size=128), Handler, "dashboard")
        if announce:
            log.info("dashboard on http://%s:%d/", self.host, self.port)
        return self

    # -- the JSON API (the page's, and anyone's) --------------------------------------

    def api_get(self, path, query):
        sc = self.sidecar
        if path == "/api/runs":
            limit = min(200, max(1, int(query.get("limit", "50"))))
            status = query.get("status") or None
            if status and status not in RUN_STATUSES:
                raise WebhookReject(400, "status must be one of %s" % ", ".join(RUN_STATUSES))
            rows = sc.store.runs_page(query.get("workflow") or None, status, query.get("q") or None,
                                      query.get("before") or None, limit)
            notes = sc.store.queue_notes(rows, sc.clock())
            short = sc.store.short_ids([r["id"] for r in rows])
            return {"runs": [dict(_run_row(r, notes.get(r["id"])), short_id=short[r["id"]])
                             for r in rows],
                    "next": ("%d:%s" % (rows[-1]["created_at"], rows[-1]["id"])
                             if len(rows) == limit else None)}
        if path.startswith("/api/runs/"):
            run_id = path[len("/api/runs/"):]
            try:
                st = sc.status(run_id)
            except NotFound as exc:
                raise WebhookReject(404, str(exc))
            st["events"] = [dict(e, data=loads_or_none(e["data"]))
                            for e in sc.store.events(st["id"])[-2000:]]
            st["logs"] = sc.logs(st["id"])
            return st
        if path == "/api/workflows":
            return {"workflows": [dict(w, versions=sc.store.versions(w["id"]))
                                  for w in sc.list_workflows()]}
        if path == "/api/schedules":
            return {"schedules": sc.schedules()}
        if path == "/api/summary":
            return {"runs": sc.store.count_by_status(), "now": sc.clock()}
        raise WebhookReject(404, "no such page: %s" % path)

    def check_token(self, headers):
        """Raise 401 unless ``headers`` carry the dashboard token."""
        given = headers.get("Authorization", "")
        import hmac
        if not hmac.compare_digest(given.encode("utf-8", "replace"),
                                   ("Bearer " + self.token).encode("ascii")):
            raise WebhookReject(401, "this needs the dashboard token (%s/%s) as "
                                     "`Authorization: Bearer TOKEN`"
                                % (self.sidecar.config.data_dir, DASHBOARD_TOKEN_FILE))

    def api_post(self, path, headers, body):
        self.check_token(headers)
        m = re.fullmatch(r"/api/runs/([A-Za-z0-9_]+)/(cancel|retry|signal)", path)
        if not m:
            raise WebhookReject(404, "no such action: %s" % path)
        try:
            doc = json.loads(body.decode("utf-8") or "{}") if body else {}
        except (ValueError, UnicodeDecodeError):
            raise WebhookReject(400, "the body is not JSON")
        run_id, action = m.groups()
        sc = self.sidecar
        try:
            return self._act(sc, run_id, action, doc)
        finally:  # a page polled while the action ran must not be reused
            with self._cache_lock:
                self._cache.clear()

    @staticmethod
    def _act(sc, run_id, action, doc):
        try:
            if action == "cancel":
                return sc.cancel(run_id)
            if action == "retry":
                return sc.retry(run_id)
            return sc.signal(run_id, doc.get("name"), doc.get("data"), doc.get("idempotencyKey"))
        except NotFound as exc:
            raise WebhookReject(404, str(exc))
        except (Conflict, InputError) as exc:
            raise WebhookReject(409 if isinstance(exc, Conflict) else 400, str(exc))


def _run_row(r, queued=None):
    return {"id": r["id"], "workflow_id": r["workflow_id"], "version": r["version"],
            "status": r["status"], "created_at": r["created_at"], "finished_at": r["finished_at"],
            "task_id": r["task_id"], "schedule": r["schedule_name"],
            "parent_run_id": r["parent_run_id"], "queued": queued}


class _DashboardHandler:
    """Request handling of DashboardServer, mixed with BaseHTTPRequestHandler at start."""

    dashboard = None
    server_version = "ty-openworkflow/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        log.debug("dashboard %s %s", self.address_string(), fmt % args)

    def _send(self, status, body, ctype):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; frame-ancestors 'none'")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not getattr(self, "_head_only", False):
            self.wfile.write(data)

    def _json(self, status, doc):
        self._send(status, json.dumps(doc, ensure_ascii=False) + "\n", "application/json")

    def _host_ok(self, value):
        """A Host (or an Origin's host) this dashboard answers to: its own name, loopback, or one
        of dashboard.allowed_hosts (what a reverse proxy forwards); anything else could be DNS
        rebinding."""
        if not value:
            return False
        name = value.split("://", 1)[-1].split("/", 1)[0]
        name = name[1:].split("]", 1)[0] if name.startswith("[") else name.rsplit(":", 1)[0] if \
            name.count(":") == 1 else name
        return name.lower() in self.dashboard.allowed_hosts

    def do_HEAD(self):
        self._head_only = True
        try:
            self.do_GET()
        finally:
            self._head_only = False

    def do_GET(self):
        import urllib.parse
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if not self._host_ok(self.headers.get("Host")):
            return self._json(421, {"ok": False,
                                    "error": "this dashboard does not answer to that host name; "
                                             "add it to dashboard.allowed_hosts"})
        try:
            if parts.path in ("/", "/index.html"):
                return self._send(200, self.dashboard.page, "text/html; charset=utf-8")
            if parts.path == "/healthz":
                return self._json(*self.dashboard.health())
            board = self.dashboard
            if parts.path == "/metrics":
                text = board.cached("metrics", lambda: render_metrics(board.sidecar))
                return self._send(200, text, "text/plain; version=0.0.4")
            body = board.cached(self.path, lambda: json.dumps(board.api_get(parts.path, query),
                                                              ensure_ascii=False) + "\n")
            return self._send(200, body, "application/json")
        except WebhookReject as exc:
            return self._json(exc.status, {"ok": False, "error": exc.message})
        except (ValueError, OverflowError, OpenWorkflowError) as exc:
            return self._json(400, {"ok": False, "error": str(exc)})
        except Exception:
            log.exception("dashboard: GET %s failed", parts.path)
            return self._json(500, {"ok": False, "error": "internal error"})

    def _body_length(self):
        """The length of the body from its one Content-Length (none: no body); reads nothing."""
        if self.headers.get("Transfer-Encoding"):
            raise WebhookReject(411, "send the body with a Content-Length (chunked bodies are not "
                                     "taken)")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return 0  # a request with neither header has no body (RFC 9112, 6.3)
        if len(lengths) > 1 or not re.fullmatch(r"\d{1,12}", lengths[0].strip()):
            raise WebhookReject(400, "bad Content-Length")
        length = int(lengths[0])
        if length > DASHBOARD_MAX_BODY_BYTES:
            raise WebhookReject(413, "the body is over %d bytes" % DASHBOARD_MAX_BODY_BYTES)
        return length

    def _read_body(self, length):
        """Up to ``length`` bytes, all within DASHBOARD_READ_TIMEOUT_S (a trickle is cut off)."""
        return read_body(self.rfile, length, time.monotonic() + DASHBOARD_READ_TIMEOUT_S)

    def do_POST(self):
        # Everything that can refuse the request does so before its body is read; a body left
        # unread ends the connection with the answer.
        keep_open, self.close_connection = not self.close_connection, True
        try:
            length = self._body_length()
            origin = self.headers.get("Origin")
            if (not self._host_ok(self.headers.get("Host"))
                    or (origin and not self._host_ok(origin))):
                raise WebhookReject(403, "cross-site requests are refused")
            self.dashboard.check_token(self.headers)
            body = self._read_body(length)
            if len(body) != length:
                raise WebhookReject(408, "the body did not arrive within %ds"
                                    % DASHBOARD_READ_TIMEOUT_S)
            self.close_connection = not keep_open
            return self._json(200, self.dashboard.api_post(self.path.split("?", 1)[0],
                                                           self.headers, body))
        except WebhookReject as exc:
            return self._json(exc.status, {"ok": False, "error": exc.message})
        except (ValueError, OpenWorkflowError) as exc:
            return self._json(400, {"ok": False, "error": str(exc)})
        except Exception:
            log.exception("dashboard: POST %s failed", self.path)
            return self._json(500, {"ok": False, "error": "internal error"})

    def do_PUT(self):
        self._json(405, {"ok": False, "error": "GET to read, POST to act"})

    do_DELETE = do_PATCH = do_PUT


# ---------------------------------------------------------------------------
# Public API: the Sidecar object the CLI is a thin layer over
# ---------------------------------------------------------------------------



_NO_INPUT = object()  # fork(): keep the source run's input


def _undelivered_way_out(expiry_ms):
    """What to do about runs kept for undelivered task updates (prune's and retention's word)."""
    if expiry_ms:
        later = ("on their own they expire %s after they were queued (taskyou.outbox_expiry)"
                 % format_duration(expiry_ms))
    else:
        later = "or set taskyou.outbox_expiry (e.g. 30d) to let them expire"
    return ("`prune --older-than AGE --drop-undelivered` drops those updates and prunes the runs; "
            + later)


def runtime_by_name(filename):
    """The runtime a code file's name says (.py: python, .js/.cjs: node), else None."""
    ext = os.path.splitext(filename or "")[1].lower()
    return {".py": "python", ".js": "node", ".cjs": "node"}.get(ext)


def next_label(label, taken):
    """The label after ``label`` that no version has yet: its last number one up (0.2.0 ->
    0.2.1, v7 -> v8), else ``label.1``."""
    while True:
        m = re.match(r"^(.*?)(\d+)(\D*)$", label)
        label = ("%s%s%s" % (m.group(1), str(int(m.group(2)) + 1).zfill(len(m.group(2))),
                             m.group(3)) if m else label + ".1")
        if label not in taken:
            return label


class Deployer:
    """`deploy`: workflow code checked, planned against the workflow's latest version (what
    carries over, what changes, what must be asked for) and stored as its newest version."""

    def __init__(self, sidecar):
        self.sidecar = sidecar

    def deploy(self, workflow_id, code, adapter=None, runtime=None, version=None, name=None,
               description=None, deadline=None, filename=None):
        """Sidecar.deploy: the new version's document, with ``created`` and ``changes``."""
        if not WORKFLOW_ID_RE.match(workflow_id or ""):
            raise InputError("invalid workflow id %r; use letters, digits, '.', '_' or '-' "
                             "(max 64)" % workflow_id)
        if runtime is not None and runtime not in RUNTIMES:
            raise InputError("unknown runtime %r; choose node or python" % runtime)
        if version is not None and not str(version).strip():
            raise InputError("--version must not be empty")
        deadline_ms = None
        if deadline is not None:
            try:
                deadline_ms = parse_duration(deadline)
            except ValueError as exc:
                raise InputError("--deadline: %s" % exc)
        sc = self.sidecar
        # A store not made yet holds no workflow: none is made before the code is checked.
        made = os.path.exists(os.path.join(sc.config.data_dir, DB_FILE))
        runtime, adapter, label, changes = self.plan(
            sc.store if made else None, workflow_id, code, runtime, adapter,
            None if version is None else str(version), filename, deadline_ms)
        impl = sc.adapter(adapter)
        impl.check(runtime)
        try:
            impl.validate(runtime, code)
        except InputError as exc:
            if not changes or filename or any(c["what"] == "runtime" for c in changes):
                raise
            other = "python" if runtime == "node" else "node"  # code from stdin keeps its runtime
            raise InputError("%s (%s runs on %s; --runtime %s switches it)"
                             % (exc, workflow_id, runtime, other))
        impl.deploy(workflow_id, code, runtime)
        row, created = sc.store.save_version(workflow_id, code, runtime, adapter, label, name,
                                             description, sc.clock(), deadline_ms)
        try:  # the TaskYou plugin's start- actions follow the workflows
            sc.plugin.sync()
        except (OSError, OpenWorkflowError) as exc:
            log.warning("could not update the TaskYou plugin's actions: %s", exc)
        return {"workflow_id": workflow_id, "version": row["version"], "label": row["label"],
                "runtime": runtime, "adapter": adapter, "code_hash": row["code_hash"],
                "created": created, "changes": changes if created else []}

    def plan(self, store, workflow_id, code, runtime, adapter, label, filename, deadline_ms):
        """(runtime, adapter, label, changes) of deploying ``code`` over the workflow's latest
        version in ``store`` (None: no store yet). The runtime, adapter and label carry over
        unless given; new code gets the next label; a runtime switch must be asked for, and a
        label names one code. ``changes``: what differs from the latest version."""
        guess = runtime_by_name(filename)
        current = store.get_workflow(workflow_id, counts=False) if store is not None else None
        if current is None:
            return (runtime or guess or "node",
                    adapter or self.sidecar.config["default_adapter"], label or "1.0.0", [])
        latest = store.get_version(workflow_id, current["latest_version"])
        if runtime is None and guess not in (None, latest["runtime"]):
            raise InputError("%s runs on %s and %s is %s by its name; deploy it with --runtime "
                             "%s to switch the workflow's runtime (runs in flight keep theirs); "
                             "nothing was deployed"
                             % (workflow_id, latest["runtime"], filename, guess, guess))
        runtime, adapter = runtime or latest["runtime"], adapter or latest["adapter"]
        code_changed = code != latest["code"]
        versions = store.versions(workflow_id)
        taken = {v["label"] for v in versions}
        # New code gets the next label. A label given (--version, as the seed's scripts do) that
        # already names other code is kept, and said: two versions then read the same.
        check = label is not None and (code_changed or label != latest["label"])
        if label is None:
            label = next_label(latest["label"], taken) if code_changed else latest["label"]
        reused = [v["version"] for v in versions if check and v["label"] == label
                  and store.get_version(workflow_id, v["version"])["code"] != code]
        changes = [{"what": "label_reused", "from": reused[0], "to": label,
                    "next": next_label(latest["label"], taken)}] if reused else []
        changes += [{"what": what, "from": old, "to": new} for what, old, new in (
            ("code", None, None), ("runtime", latest["runtime"], runtime),
            ("adapter", latest["adapter"], adapter), ("label", latest["label"], label),
            ("deadline", latest["deadline_ms"], deadline_ms))
            if old != new or (what == "code" and code_changed)]
        return runtime, adapter, label, changes


def _check_idempotency_key(key):
    if key is not None and (not isinstance(key, str) or not key.strip() or len(key) > 200):
        raise InputError("--idempotency-key must be a non-empty string of at most 200 characters")


def _check_flow_args(key, priority):
    """A run's concurrency key and priority as start takes them (InputError if bad)."""
    if key is not None and (not isinstance(key, str) or not key.strip()
                            or len(key) > MAX_CONCURRENCY_KEY_LEN):
        raise InputError("--concurrency-key must be a non-empty string of at most %d characters"
                         % MAX_CONCURRENCY_KEY_LEN)
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not -PRIORITY_BOUND <= priority < PRIORITY_BOUND):
        raise InputError("--priority must be an integer from %d to %d, not %r"
                         % (-PRIORITY_BOUND, PRIORITY_BOUND - 1, priority))


def _limit_args(concurrency, per_key, rate):
    """A workflow's limits as set_limits takes them: (concurrency, per_key, (count, window ms)
    or None); InputError if one is bad."""
    for flag, n in (("--concurrency", concurrency), ("--per-key", per_key)):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool)
                              or not 1 <= n < PRIORITY_BOUND):
            raise InputError("%s must be a whole number of at least 1, not %r (no limit: leave "
                             "it out, or `limits WORKFLOW --clear`)" % (flag, n))
    if isinstance(rate, (tuple, list)):
        count, window = (tuple(rate) + (None, None))[:2]
        if any(not isinstance(v, int) or isinstance(v, bool) for v in (count, window)) or not (
                1 <= count < PRIORITY_BOUND and 1 <= window <= MAX_DURATION_MS) or len(rate) != 2:
            raise InputError("rate must be (N, window in ms) with N >= 1 and a window from 1 ms "
                             "to %s, or a text like 10/1m; not %r"
                             % (format_duration(MAX_DURATION_MS), rate))
        rate = (count, window)
    elif rate is not None:
        try:
            rate = parse_rate(rate)
        except ValueError as exc:
            raise InputError("--rate: %s" % exc)
    return concurrency, per_key, rate


def _limits_doc(row, workflow_id=None):
    """A workflow's limits as `limits --json` shows them (``row`` None: it has none)."""
    row = row or {"workflow_id": workflow_id, "concurrency": None, "per_key": None,
                  "rate_count": None, "rate_window_ms": None, "active": None, "queued": 0,
                  "updated_at": None}
    rate = (format_rate(row["rate_count"], row["rate_window_ms"]) if row["rate_count"]
            else None)
    return {"workflow_id": row["workflow_id"], "concurrency": row["concurrency"],
            "per_key": row["per_key"], "rate": rate, "rate_count": row["rate_count"],
            "rate_window_ms": row["rate_window_ms"], "active": row["active"],
            "queued": row["queued"], "updated_at": row["updated_at"]}


class Pruner:
    """Deletes finished runs: `prune` when asked, `retention` from the schedulers, hourly."""

    def __init__(self, store, config, clock):
        self.store = store
        self.config = config
        self.clock = clock

    def now(self, older_than, statuses=TERMINAL, dry_run=False, vacuum=False,
              drop_undelivered=False):
        """Delete finished runs that ended more than ``older_than`` ago (a duration), with their
        steps, events, logs, delivered task updates and signals; never a run not finished, a
        child whose parent is still going, or one whose task updates are not delivered yet,
        unless they are older than taskyou.outbox_expiry or ``drop_undelivered`` (then they go
        too, counted)."""
        try:
            age = parse_duration(older_than)
        except ValueError as exc:
            raise InputError("--older-than: %s" % exc)
        statuses = tuple(statuses)
        bad = [x for x in statuses if x not in TERMINAL]
        if bad or not statuses:
            raise InputError("--status takes finished statuses only (%s), not %s"
                             % (", ".join(TERMINAL), ", ".join(bad) or "nothing"))
        now = self.clock()
        cutoff = now - age
        drop_before = _ALWAYS_BEFORE if drop_undelivered else self._expired_before(now)
        counts = self.store.prune(cutoff, statuses, dry_run=dry_run, drop_before=drop_before)
        kept = self.store.held_back(cutoff, statuses, drop_before)
        out = {"dry_run": dry_run, "older_than_ms": age, "statuses": list(statuses),
               "removed": counts,
               "dropped_task_updates": counts["dropped_task_updates"], "kept_undelivered": kept,
               "outbox_expiry_ms": self.config["taskyou.outbox_expiry"]}
        if vacuum and not dry_run:
            out["vacuum_bytes"] = self.store.vacuum()
        return out

    def by_retention(self):
        """`retention` in the config: prune at most once an hour (serve and tick call this)."""
        age = self.config["retention"]
        now = self.clock()
        if not age or not self.store.notice_due("retention-prune", now, RETENTION_EVERY_MS):
            return None
        drop_before = self._expired_before(now)
        counts = self.store.prune(now - age, TERMINAL, pause_s=0.01, drop_before=drop_before)
        if counts["runs"]:
            log.info("retention: pruned %d finished runs older than %s",
                     counts["runs"], format_duration(age))
        if counts["dropped_task_updates"]:
            log.warning("retention: dropped %d task updates that never reached TaskYou (older "
                        "than taskyou.outbox_expiry, %s) with their runs",
                        counts["dropped_task_updates"],
                        format_duration(self.config["taskyou.outbox_expiry"]))
        kept = self.store.held_back(now - age, TERMINAL, drop_before)
        if kept and self.store.notice_due("retention-kept", now, NOTICE_EVERY_MS):
            log.warning("retention: kept %d finished runs whose TaskYou updates are not "
                        "delivered yet; %s", kept,
                        _undelivered_way_out(self.config["taskyou.outbox_expiry"]))
        return counts

    def _expired_before(self, now):
        """Undelivered task updates queued before this have expired (taskyou.outbox_expiry)."""
        expiry = self.config["taskyou.outbox_expiry"]
        return None if expiry is None else now - expiry


class Runners:
    """Sees that a scheduler drives the store's runs: wakes the live ones of this host, or
    starts the background runner (`runner`) when none is alive."""

    def __init__(self, store, config, clock):
        self.store = store
        self.config = config
        self.clock = clock
        self.warning = None  # why the last runner could not be started

    def poke(self):
        """Wake live schedulers on this host so they look at the store now."""
        live = self.store.live_schedulers(self.clock(), 2 * self.config["lease_ttl"])
        import socket
        host = _hostname()
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
            for sch in live:
                if sch["wake_port"] and sch["host"] == host:
                    with contextlib.suppress(OSError):
                        s.sendto(b"w", ("127.0.0.1", sch["wake_port"]))
        return live

    def ensure(self):
        """Poke a live scheduler, or spawn the background runner when none is alive."""
        live = self.poke()
        if live:
            return None
        try:
            return self.spawn()
        except OSError as exc:
            # The run is stored and safe; it only waits for a scheduler (status says so).
            self.warning = ("could not start the background runner (%s); "
                                 "run `ty-openworkflow tick` or `serve` to drive the run"
                                 % (exc.strerror or exc))
            log.warning("%s", self.warning)
            return None

    def spawn(self):
        """Start a detached `runner` process that drives due runs, then exits when idle."""
        # The runner reads this same path; it alone may find no file there (defaults only).
        argv = [sys.executable, os.path.abspath(__file__), "--config", self.config.path, "runner"]
        log_path = os.path.join(self.config.data_dir, "runner.log")
        with open(log_path, "ab") as log_file:
            proc = spawn(argv, stdin=False, stdout=subprocess.DEVNULL, stderr=log_file)
        # Reap it in the background so a long-lived caller collects no zombies.
        threading.Thread(target=proc.wait, daemon=True).start()
        return proc.pid


class ScheduleControl:
    """Schedules as the API and the CLI add, show, pause and remove them (ScheduleBook keeps
    them; serve and tick fire them)."""

    def __init__(self, store, config, clock, wake, workflow, input_json):
        self.store = store
        self.config = config
        self.clock = clock
        self.poke_schedulers = wake  # () -> None: wake the live schedulers of this host
        self.workflow = workflow  # (id, counts) -> the workflow, or NotFound
        self._input_json = input_json  # value -> JSON text, or InputError

    def schedule_add(self, workflow_id, cron, input=None, name=None, tz=None, catch_up="latest"):
        """Start a run of ``workflow_id`` on every fire of the cron expression (served by serve /
        tick)."""
        self.workflow(workflow_id, counts=False)
        try:
            parsed = Cron(cron)
            _zone(tz)
        except ValueError as exc:
            raise InputError("--cron %r: %s" % (cron, exc) if "zone" not in str(exc)
                             else "--tz: %s" % exc)
        if catch_up not in ("latest", "all", "none"):
            raise InputError("--catch-up must be latest, all or none")
        name = name or workflow_id
        if not WORKFLOW_ID_RE.match(name):
            raise InputError("invalid schedule name %r; use letters, digits, '.', '_' or '-' "
                             "(max 64)" % name)
        now = self.clock()
        nxt = parsed.next_after(now, tz)
        if nxt is None:
            raise InputError("--cron %r never fires" % cron)
        self.store.add_schedule(name, workflow_id, cron, tz, self._input_json(input), catch_up,
                                now, nxt)
        self.poke_schedulers()
        return self.schedule(name)

    def schedule(self, name):
        rows = self.store.schedules(name)
        if not rows:
            raise NotFound("no schedule %r; list them with `ty-openworkflow schedule list`" % name)
        return self._schedule_doc(rows[0])

    @staticmethod
    def _schedule_doc(row):
        return {"name": row["name"], "workflow_id": row["workflow_id"], "cron": row["cron"],
                "tz": row["tz"], "input": loads_or_none(row["input"]),
                "catch_up": row["catch_up"], "paused": bool(row["paused"]),
                "next_fire_at": None if row["paused"] else row["next_fire_at"],
                "last_fire_at": row["last_fire_at"],
                "last_run_id": row["last_run_id"], "created_at": row["created_at"]}

    def schedules(self):
        docs = [self._schedule_doc(r) for r in self.store.schedules()]
        self.store.sync_shown()
        return docs

    def schedule_rm(self, name):
        doc = self.schedule(name)
        self.store.remove_schedule(name)
        return doc

    def schedule_pause(self, name, paused=True):
        doc = self.schedule(name)
        if doc["paused"] == paused:
            return doc  # already so: a due fire stays due
        now = self.clock()  # missed fires are not run
        nxt = None if paused else Cron(doc["cron"]).next_after(now, doc["tz"])
        self.store.pause_schedule(name, paused, now, nxt)
        self.poke_schedulers()
        return self.schedule(name)

    def fire_schedules(self):
        """Start the runs of the schedules' due fires (serve and tick call this); returns their
        ids."""
        return self.store.fire_schedules(self.clock(), self.config["taskyou.auto_create_tasks"])


class FlowControl:
    """Workflows' limits as the API and the CLI set and show them (the store enforces them)."""

    def __init__(self, store, clock, wake, drive, workflow):
        self.store = store
        self.clock = clock
        self.wake = wake  # () -> None: wake the live schedulers of this host
        self.drive = drive  # () -> None: that, or start the background runner if none is alive
        self.workflow = workflow  # (id, counts) -> the workflow, or NotFound

    def set_limits(self, workflow_id, concurrency=None, per_key=None, rate=None, drive=True):
        """Set a workflow's limits (across its versions): at most ``concurrency`` runs active at
        once, ``per_key`` per concurrency key, ``rate`` starts per window ("10/1m"); all None
        clears them. Takes effect at the next claim; returns the limits as limits() shows."""
        concurrency, per_key, rate = _limit_args(concurrency, per_key, rate)
        if self.store.set_limits(workflow_id, concurrency, per_key, rate, self.clock()) and drive:
            self.drive()  # runs held or let go may start now: a scheduler looks at once
        else:
            self.wake()
        return self.limits(workflow_id)

    def limits(self, workflow_id=None):
        """Every workflow's limits (a list), or one's (a dict; all None when it has none)."""
        if workflow_id is None:
            return [_limits_doc(r) for r in self.store.limits()]
        self.workflow(workflow_id, counts=False)
        rows = self.store.limits(workflow_id)
        return _limits_doc(rows[0] if rows else None, workflow_id)


class Sidecar:
    """deploy / start / status / list / cancel / retry / fork / logs / tick / serve over one
    store."""

    def __init__(self, config=None, config_path=None, clock=None, must_exist=None):
        """``config_path`` must name an existing file (as with the CLI's --config); without one the
        default path is read if it exists, else the defaults apply."""
        if must_exist is None:
            must_exist = config_path is not None
        self.config = (config if config is not None
                       else load_config(config_path, must_exist=must_exist))
        self.clock = clock or now_ms
        self._store = None
        self._bridge = None
        self._adapters = {}
        self._lock = threading.Lock()
        self._runners = None
        self.last_warning = None

    @property
    def store(self):
        if self._store is None:
            self._store = Store(self.config.data_dir, self.config["store.synchronous"])
        return self._store

    @property
    def pruner(self):
        return Pruner(self.store, self.config, self.clock)

    @property
    def runners(self):
        if self._runners is None:
            self._runners = Runners(self.store, self.config, self.clock)
        return self._runners

    @property
    def bridge(self):
        if self._bridge is None:
            self._bridge = Bridge(self)
        return self._bridge

    @property
    def plugin(self):
        """The TaskYou plugin: install it, and what its hooks and actions do."""
        return TaskYouPlugin(self)

    def close(self):
        for impl in list(self._adapters.values()):
            with contextlib.suppress(Exception):
                impl.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def adapter(self, name):
        if name not in ADAPTERS:
            raise InputError("unknown adapter %r; choose one of %s"
                             % (name, ", ".join(ADAPTER_NAMES)))
        with self._lock:
            if name not in self._adapters:
                impl = self._adapters[name] = ADAPTERS[name](self.config)
                impl.store_fn = lambda: self.store
            return self._adapters[name]

    def adapter_made(self, name):
        """Whether adapter ``name`` was made already (adapter() makes it on first use)."""
        return name in self._adapters

    def run_policy(self):
        """What the store applies to a run's events: retries, output size and step limits."""
        return {"retry": self.config.retry_policy(),
                "max_output_bytes": self.config["limits.max_output_bytes"],
                "max_step_attempts": self.config["limits.max_step_attempts"],
                "max_steps": self.config["limits.max_steps"],
                "max_child_depth": self.config["limits.max_child_depth"],
                "max_children": self.config["limits.max_children"]}

    defaults = run_policy  # its older name

    # -- workflows ------------------------------------------------------------

    def deploy(self, workflow_id, code, adapter=None, runtime=None, version=None, name=None,
               description=None, deadline=None, filename=None):
        """Store ``code`` as the workflow's newest version (a no-op if unchanged); ``changes``
        in the result says what differs from its latest version (see Deployer)."""
        return Deployer(self).deploy(workflow_id, code, adapter, runtime, version, name,
                                     description, deadline, filename)

    def workflow(self, workflow_id, counts=True):
        """The workflow with its latest version (``counts``: and how many runs it has, which
        costs a scan)."""
        wf = self.store.get_workflow(workflow_id, counts)
        if wf is None:
            raise NotFound("no workflow %r; deploy it first with "
                           "`ty-openworkflow deploy %s -f FILE`" % (workflow_id, workflow_id))
        return wf

    def list_workflows(self):
        workflows = self.store.list_workflows()
        self.store.sync_shown()
        return workflows

    # -- runs -----------------------------------------------------------------

    def start(self, workflow_id, input=None, task_title=None, create_task=False, deadline=None,
              drive=True, idempotency_key=None, key=None, priority=None, task_id=None):
        """Create a run on the workflow's latest version and make sure a scheduler drives it.

        ``task_id`` links the run to a TaskYou task that exists (no task is created for it,
        and its status is left to its owner).

        With ``idempotency_key``, a second start of the same workflow with the same key
        returns the first run (whatever its status) and creates nothing; the result then
        has ``"existing": True``. ``key`` and ``priority`` place it among held runs (set_limits)."""
        _check_idempotency_key(idempotency_key)
        _check_flow_args(key, priority)
        wf = self.workflow(workflow_id, counts=False)
        input_json = self._input_json(input)
        self.adapter(wf["adapter"]).check(wf["runtime"])
        now = self.clock()
        deadline_at = now + wf["deadline_ms"] if wf["deadline_ms"] else None
        if deadline is not None:
            try:
                deadline_at = now + parse_duration(deadline)
            except ValueError as exc:
                raise InputError("--deadline: %s" % exc)
        task_requested = task_id is None and bool(
            create_task or task_title or self.config["taskyou.auto_create_tasks"])
        run_id, created = self.store.create_run(
            None, workflow_id, wf["latest_version"], input_json, now,
            task_requested=task_requested, task_title=task_title or ("Workflow: %s" % workflow_id),
            deadline_at=deadline_at, idempotency_key=idempotency_key, key=key,
            priority=priority or 0, task_id=task_id)
        if not created:
            return dict(self.status(run_id), existing=True)
        if drive:
            self.ensure_driven()
        out = self._status(run_id)
        if out["status"] != "pending" or out["steps"]:  # more than our own (synced) commit
            self.store.sync_shown()
        return dict(out, existing=False) if idempotency_key is not None else out

    def _input_json(self, value):
        try:
            input_json = dumps(value)
            input_json.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("the input holds a lone surrogate, which is not valid Unicode text")
        except (TypeError, ValueError, RecursionError) as exc:
            raise InputError("the input is not JSON: %s" % exc)
        if len(input_json.encode("utf-8")) > self.config["limits.max_input_bytes"]:
            raise InputError("the input is %d bytes, over limits.max_input_bytes (%d)"
                             % (len(input_json.encode("utf-8")),
                                self.config["limits.max_input_bytes"]))
        return input_json

    def run(self, run_id):
        run = self.store.get_run(run_id)
        if run is None and run_id and len(run_id) < 6:
            raise NotFound(
                "no run %r; give the whole run id or at least 6 characters of it" % run_id)
        if run is None:
            raise NotFound("no run %r; list runs with `ty-openworkflow list runs`" % run_id)
        return run

    def status(self, run_id):
        """The run with its steps, task link and who drives it, as a JSON-ready dict."""
        out = self._status(run_id)
        self.store.sync_shown()
        return out

    def _status(self, run_id):
        run = self.run(run_id)
        out = self.store.run_document(run)
        out["short_id"] = self.store.short_ids([run["id"]])[run["id"]]
        out["task"] = self.bridge.task_state(run)
        out["queued"] = self.store.why_held(run, self.clock())
        if self.config["dashboard.enabled"]:  # the run's page, for `status` to point at
            host = self.config["dashboard.host"]
            host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # all: this machine's
            out["url"] = "http://%s:%d/#/runs/%s" % ("[%s]" % host if ":" in host else host,
                                                     self.config["dashboard.port"], run["id"])
        if run["status"] not in TERMINAL:
            out["scheduler"] = self.store.driven_by(run, self.clock(), 2 * self.config["lease_ttl"])
        return out

    def list_runs(self, workflow_id=None, status=None, limit=20):
        if status and status not in RUN_STATUSES:
            raise InputError("unknown status %r; choose one of %s"
                             % (status, ", ".join(RUN_STATUSES)))
        if limit is not None and not 1 <= limit <= 100000:
            raise InputError("--limit must be between 1 and 100000")
        if workflow_id:
            self.workflow(workflow_id, counts=False)  # an unknown one is said, not "no runs"
        runs = self.store.list_runs(workflow_id, status, limit)
        notes = self.store.queue_notes(runs, self.clock())  # why a held run waits
        short = self.store.short_ids([r["id"] for r in runs])
        self.store.sync_shown()
        return [dict(r, queued=notes.get(r["id"]), short_id=short[r["id"]]) for r in runs]

    def cancel(self, run_id):
        """Cancel a run; a pass in flight is stopped by the scheduler that runs it."""
        run = self.run(run_id)
        self.store.cancel_run(run["id"], self.clock())
        if self.store.admission_due(self.clock()):  # it made room for a held run
            self.ensure_driven()
        else:
            self.poke_schedulers()
        return self.status(run["id"])

    def signal(self, run_id, name, data=None, idempotency_key=None):
        """Send signal ``name`` (with JSON ``data``) to a run: the run's oldest wait for it
        resolves, or the signal is kept until the run waits for it. The same ``idempotency_key``
        again is applied once."""
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_STEP_NAME_LEN - 10:
            raise InputError("the signal name must be a non-empty string of at most %d characters"
                             % (MAX_STEP_NAME_LEN - 10))
        _check_idempotency_key(idempotency_key)
        run = self.run(run_id)
        data_json = self._input_json(data)
        sig_id, consumed_by, applied = self.store.signal(run["id"], name, data_json, self.clock(),
                                                         idempotency_key)
        if applied and consumed_by is not None:
            self.ensure_driven()
        return {"run_id": run["id"], "signal": name, "id": sig_id, "applied": applied,
                "consumed_by": consumed_by, "buffered": consumed_by is None}

    # -- flow control: see FlowControl ---------------------------------------------

    @property
    def flow_control(self):
        return FlowControl(self.store, self.clock, self.poke_schedulers, self.ensure_driven,
                           self.workflow)

    set_limits = _verb("flow_control", FlowControl.set_limits)
    limits = _verb("flow_control", FlowControl.limits)

    # -- retention ----------------------------------------------------------------

    def prune(self, older_than, statuses=TERMINAL, dry_run=False, vacuum=False,
              drop_undelivered=False):
        """Delete finished runs that ended more than ``older_than`` ago: see Pruner.now."""
        return self.pruner.now(older_than, statuses, dry_run, vacuum, drop_undelivered)

    def prune_by_retention(self):
        """`retention` in the config: prune at most once an hour (serve and tick call this)."""
        return self.pruner.by_retention()

    # -- schedules ----------------------------------------------------------------

    @property
    def schedule_control(self):
        return ScheduleControl(self.store, self.config, self.clock, self.poke_schedulers,
                               self.workflow, self._input_json)

    schedule_add = _verb("schedule_control", ScheduleControl.schedule_add)
    schedule = _verb("schedule_control", ScheduleControl.schedule)
    schedules = _verb("schedule_control", ScheduleControl.schedules)
    schedule_rm = _verb("schedule_control", ScheduleControl.schedule_rm)
    schedule_pause = _verb("schedule_control", ScheduleControl.schedule_pause)
    fire_schedules = _verb("schedule_control", ScheduleControl.fire_schedules)

    def retry(self, run_id, latest=False, drive=True):
        """A failed or canceled run resumes from its failed step (committed steps are kept), on the
        version it was pinned to, or the workflow's latest with ``latest``."""
        run = self.run(run_id)
        version = (self.workflow(run["workflow_id"], counts=False)["latest_version"] if latest
                   else None)
        self.store.retry_run(run["id"], self.clock(), version)
        if drive:
            self.ensure_driven()
        return self.status(run["id"])

    def fork(self, run_id, from_step=None, latest=False, input=_NO_INPUT, drive=True):
        """A new run with the same input (or ``input``) that replays the source's committed history
        before ``from_step`` (everything committed by default), then runs on."""
        run = self.run(run_id)
        version = (self.workflow(run["workflow_id"], counts=False)["latest_version"] if latest
                   else None)
        input_json = None if input is _NO_INPUT else self._input_json(input)
        # A fork is a run of its own: it gets a task as `start` would give it one.
        task_requested = bool(run["task_requested"] or self.config["taskyou.auto_create_tasks"])
        new_run_id = self.store.fork_run(run["id"], None, self.clock(), from_step, version,
                                         input_json, task_requested=task_requested)
        if drive:
            self.ensure_driven()
        return self.status(new_run_id)

    def logs(self, run_id):
        run = self.run(run_id)
        logs = self.store.logs(run["id"])
        self.store.sync_shown()
        return logs

    def events(self, run_id, after_id=0):
        events = self.store.events(self.run(run_id)["id"], after_id)
        self.store.sync_shown()
        return events

    def adapters_report(self):
        rows = []
        for name in ADAPTER_NAMES:
            impl = self.adapter(name)
            try:
                impl.check()
                available, reason = True, ""
            except OpenWorkflowError as exc:
                available, reason = False, str(exc)
            row = {"name": name, "enabled": impl.enabled, "available": available, "reason": reason,
                   "default": name == self.config["default_adapter"]}
            if name == "cloudflare" and impl.enabled:
                row["scripts"] = impl.script_count()  # Workers this install holds on the account
                if available:
                    row["reason"] = "%d Worker%s uploaded by this install" % (
                        row["scripts"], "" if row["scripts"] == 1 else "s")
            rows.append(row)
        return rows

    # -- driving runs -----------------------------------------------------------

    def poke_schedulers(self):
        """Wake live schedulers on this host so they look at the store now."""
        return self.runners.poke()

    def ensure_driven(self):
        """Poke a live scheduler, or spawn the background runner when none is alive."""
        runners = self.runners
        pid = runners.ensure()
        self.last_warning = runners.warning or self.last_warning
        return pid

    def spawn_runner(self):
        """Start a detached `runner` process that drives due runs, then exits when idle."""
        return self.runners.spawn()

    def scheduler(self, kind="serve", concurrency=None, hand_over=False):
        return Scheduler(self, kind=kind, concurrency=concurrency, hand_over=hand_over)

    def tick(self, concurrency=None, hand_over=False):
        """Run every pass that is due now, then return; ``hand_over`` (the `tick` command): runs
        due within runner_linger are then left to a live scheduler or the background runner."""
        return self.scheduler("tick", concurrency, hand_over).loop()

    def serve(self, stop_event=None, concurrency=None, scheduler=None):
        """Drive runs (and the webhook, if enabled) until ``stop_event`` is set or
        ``scheduler.stop()``."""
        sched = scheduler or self.scheduler("serve", concurrency)
        if stop_event is not None:
            threading.Thread(target=lambda: (stop_event.wait(), sched.stop()), daemon=True).start()
        hook = WebhookServer(self).start() if self.config["webhook.enabled"] else None
        try:
            board = DashboardServer(self).start() if self.config["dashboard.enabled"] else None
        except OpenWorkflowError:
            if hook is not None:
                hook.stop()
            raise
        try:
            if self.config["taskyou.auto_create_tasks"]:  # else it matters only if asked for
                find_ty(self.config)
        except TaskYouError as exc:
            if self.bridge.first_time(exc):  # once is enough; the bridge will not repeat it
                log.warning("taskyou: %s", exc)
        api = TaskYouApi.from_env()
        feed = TaskFeed(self.bridge, api, self.poke_schedulers).start() if api else None
        try:
            return sched.loop()
        finally:
            for srv in (hook, board, feed):
                if srv is not None:
                    srv.stop()

    def webhook(self, host=None, port=None):
        """A WebhookServer for this sidecar (call .start() / .stop())."""
        return WebhookServer(self, host, port)

    def dashboard(self, host=None, port=None):
        """A DashboardServer for this sidecar (call .start() / .stop())."""
        return DashboardServer(self, host, port)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

EPILOG = """\
examples:
  ty-openworkflow init
  ty-openworkflow deploy my-workflow -f workflow.js
  ty-openworkflow start my-workflow -i '{"name": "World"}' --wait
  ty-openworkflow status <run-id>
  ty-openworkflow list runs -s failed
  ty-openworkflow serve            # long-running scheduler
  */1 * * * * ty-openworkflow tick # or drive runs from cron

environment:
  TY_OPENWORKFLOW_CONFIG    config file (default ~/.config/ty-openworkflow/config.yaml)
  TY_OPENWORKFLOW_DATA_DIR  overrides data_dir from the config
  NO_COLOR                  no colour in human output
"""


def _color(text, code, stream=None):
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or not hasattr(stream, "isatty") or not stream.isatty():
        return text
    return "\033[%sm%s\033[0m" % (code, text)


_STATUS_COLORS = {"completed": "32", "failed": "31", "canceled": "33", "running": "36",
                  "sleeping": "35", "waiting": "35", "pending": "37"}


def _print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))





def _count(n, noun, plural=None):
    """``n`` and the noun in its number: 1 signal, 2 signals, 0 log entries."""
    return "%d %s" % (n, noun if n == 1 else plural or noun + "s")


def _table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\n".join(lines))


def _read_code(args):
    if args.file and args.file != "-":
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise InputError("workflow file %s not found" % args.file)
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError("cannot read workflow file %s: %s" % (args.file, exc))
    if args.file != "-" and sys.stdin.isatty():
        raise InputError("no workflow code: pass -f FILE, or pipe the code on stdin (-f -)")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise InputError("the workflow code on stdin is not UTF-8 text: %s" % exc)


def cmd_init(api, args):
    path = write_default_config(args.config or default_config_path(), data_dir=args.data_dir,
                                force=args.force)
    cfg = load_config(path)
    sc = Sidecar(cfg)
    try:
        sc.store  # creates the data dir and the database
        for key in ("adapters.exec.work_dir",):
            os.makedirs(cfg[key], exist_ok=True)
        webhook_secret(cfg.data_dir, create=True)
    finally:
        sc.close()
    print("wrote %s" % path)
    print("data dir %s" % cfg.data_dir)
    if shutil.which(cfg["taskyou.cli"]):
        print("TaskYou found: `ty-openworkflow plugin install` has its daemon run serve, resume "
              "runs waiting on tasks at once, and offer run actions on tasks")
    return 0


def cmd_deploy(api, args):
    code = _read_code(args)
    res = api.deploy(args.workflow_id, code, adapter=args.adapter, runtime=args.runtime,
                     version=args.version, name=args.name, description=args.description,
                     deadline=args.deadline, filename=args.file if args.file != "-" else None)
    if args.json:
        _print_json(res)
    elif res["created"]:
        print("deployed %s version %d (%s, %s, %s)"
              % (res["workflow_id"], res["version"], res["label"], res["runtime"], res["adapter"]))
        for change in res["changes"]:
            print("  " + _describe_change(change, args.version is None))
    else:
        print("%s is unchanged (version %d, %s)"
              % (res["workflow_id"], res["version"], res["label"]))
    return 0


def _describe_change(change, label_chosen_for_you):
    """One line of what a deploy changed against the workflow's latest version."""
    what, old, new = change["what"], change["from"], change["to"]
    if what == "code":
        return "code      changed"
    if what == "label_reused":
        return ("label     %s already names version %d, with other code: both read %s now "
                "(--version %s, or none, tells them apart)" % (new, old, new, change["next"]))
    if what == "deadline":
        old, new = (format_duration(v) if v else "none" for v in (old, new))
    note = {"runtime": " (runs in flight keep %s)" % old,
            "label": " (new code, next label; --version LABEL picks one)"
            if label_chosen_for_you else ""}.get(what, "")
    return "%-9s %s -> %s%s" % (what, old, new, note)


def _read_input(args, default=None):
    """The input JSON from -i/--input or --input-file; ``default`` when neither is given."""
    if args.input is not None and args.input_file:
        raise InputError("give the input with -i/--input or --input-file, not both")
    if args.input is not None:
        return parse_json_arg(args.input, "--input")
    if args.input_file:
        return _read_json_file(args.input_file, "input")
    return default


def _read_json_file(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError("%s file %s not found" % (what, path))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("cannot read %s file %s: %s" % (what, path, exc))
    return parse_json_arg(text, path)


def cmd_start(api, args):
    value = _read_input(args)
    st = api.start(args.workflow_id, value, task_title=args.task, create_task=args.create_task,
                   deadline=args.deadline, idempotency_key=args.idempotency_key,
                   key=args.concurrency_key, priority=args.priority)
    if api.last_warning:
        print("ty-openworkflow: warning: %s" % api.last_warning, file=sys.stderr)
    if st.get("existing") and not args.json:
        print("ty-openworkflow: run %s already started with idempotency key %r (%s); "
              "nothing new was started" % (st["id"], args.idempotency_key, st["status"]),
              file=sys.stderr)
    if not args.wait:
        if args.json:
            _print_json(st)
        else:
            print(st["id"])
        return 0
    if args.json:
        print(json.dumps({"type": "started", "run_id": st["id"], "workflow_id": st["workflow_id"],
                          "at": st["created_at"], "existing": bool(st.get("existing"))}),
              flush=True)
    else:
        print("started %s" % st["id"], file=sys.stderr)
    return _follow(api, st["id"], args.json)


def _follow(api, run_id, as_json):
    """Print one line per step as the run advances; exit 0 if it completes, 1 otherwise."""
    last, last_ensure = 0, time.time()
    try:
        while True:
            for ev in api.events(run_id, last):
                last = ev["id"]
                data = json.loads(ev["data"]) if ev["data"] else {}
                if as_json:
                    print(json.dumps(dict(data, type=ev["type"], at=ev["at"]), ensure_ascii=False),
                          flush=True)
                    continue
                t = ev["type"]
                if t == "step_completed":
                    print("step %s completed: %s" % (data["step"], _short(data.get("output"))),
                          flush=True)
                elif t == "step_failed":
                    print("step %s failed: %s" % (data["step"], data["error"]["message"]),
                          flush=True)
                elif t == "sleep":
                    print("sleep %s until %s" % (data["step"], format_time(data["wake_at"])),
                          flush=True)
                elif t == "retry_scheduled":
                    print("retry at %s" % format_time(data["retry_at"]), flush=True)
                elif t == "lease_expired":
                    print("scheduler lost; replaying", flush=True)
            st = api.status(run_id)
            if st["status"] in TERMINAL:
                if not as_json:
                    _print_status(st)
                return 0 if st["status"] == "completed" else 1
            if not st["scheduler"]["alive"] and time.time() - last_ensure > 2:
                # Whoever drove the run went away (or lingers no more): --wait takes over.
                last_ensure = time.time()
                api.ensure_driven()
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("stopped following %s; it keeps running" % run_id, file=sys.stderr)
        return 130


def _print_status(st):
    status = st["status"]
    line = _color(status, _STATUS_COLORS.get(status, "0"))
    if status == "sleeping" and st.get("wake_at"):
        left = st["wake_at"] - now_ms()
        line += " until %s (%s)" % (format_time(st["wake_at"]),
                                    "in %s" % format_duration(left) if left > 0
                                    else "due now; waiting for a scheduler")
    elif status == "pending" and st.get("queued"):
        line += ", " + st["queued"]["reason"]
    elif status == "pending" and st.get("available_at") and st["available_at"] > now_ms():
        line += " (retry at %s)" % format_time(st["available_at"])
    elif status == "waiting":
        line += (" for " + "; ".join(_describe_wait(w) for w in st.get("waiting_for") or [])
                 if st.get("waiting_for") else "")
    rows = [("run", st["id"]),
            ("workflow", "%s  version %d (%s, %s, %s)" % (st["workflow_id"], st["version"],
                                                         st["version_label"], st["runtime"],
                                                         st["adapter"])),
            ("status", line),
            ("created", format_time(st["created_at"])),
            ("passes", str(st["passes"]))]
    if st["finished_at"]:
        rows.append(("finished", format_time(st["finished_at"])))
    if st["deadline_at"]:
        rows.append(("deadline", format_time(st["deadline_at"])))
    if st.get("last_pass"):
        rows.append(("last pass", "%s ended %s: %s" % (st["last_pass"].get("pass"),
                                                      format_time(st["last_pass"].get("ended_at")),
                                                      st["last_pass"].get("reason"))))
    if st.get("forked_from"):
        rows.append(("forked", "from run %s" % st["forked_from"]))
    for i, h in enumerate(st.get("history") or []):
        rows.append(("history" if i == 0 else "", "%s %s%s" % (
            format_time(h["at"]), h["event"], ": %s" % h["message"] if h.get("message") else "")))
    if st.get("failed_attempts"):
        rows.append(("attempts", "%d failed step attempt%s (the steps below say which)"
                     % (st["failed_attempts"], "" if st["failed_attempts"] == 1 else "s")))
    if st.get("schedule"):
        rows.append(("schedule", st["schedule"]))
    if st.get("concurrency_key") is not None or st.get("priority"):
        rows.append(("flow", "key %s, priority %d" % (
            "-" if st.get("concurrency_key") is None else repr(st["concurrency_key"]),
            st.get("priority") or 0)))
    if st.get("parent"):
        rows.append(("parent", "%s (wait %s)" % (st["parent"]["run_id"], st["parent"]["wait"])))
    for child in st.get("children") or []:
        rows.append(("child", "%s  %s  %s" % (child["id"], child["workflow_id"], child["status"])))
    for sig in st.get("signals_pending") or []:
        rows.append(("signal", "%s not consumed yet (sent %s): %s"
                     % (sig["name"], format_time(sig["at"]), _short(sig["data"]))))
    task = st["task"]
    if task.get("requested"):
        label = "#%s %s" % (task["id"], task["title"]) if task.get("id") else task["title"]
        if task.get("delivered"):
            note = "updates delivered"
        elif task.get("last_error"):
            note = "%d update%s waiting: %s" % (task["pending_updates"],
                                               "" if task["pending_updates"] == 1 else "s",
                                               task["last_error"].split(";")[0])
        else:
            note = "%d update%s queued" % (task["pending_updates"],
                                           "" if task["pending_updates"] == 1 else "s")
        rows.append(("task", "%s (%s)" % (label, note)))
    for k, v in rows:
        print("%-9s %s" % (k, v))
    if st["steps"]:
        print("steps")
        width = max(len(s["name"]) for s in st["steps"])
        for s in st["steps"]:
            if s["kind"] == "wait":
                done = s["status"] == "completed"
                detail = _describe_wait(dict(s.get("wait") or {},
                                             timeout_at=None if done else s.get("timeout_at")))
                if done:
                    got = s.get("output") or {}
                    detail += ": " + ("error: %s" % got["error"].get("message")
                                      if got.get("error") else _short(got.get("value")))
            elif s["kind"] == "sleep":
                detail = "until %s" % format_time(s["wake_at"])
            elif s["status"] == "completed":
                detail = _short(s.get("output"))
            elif s.get("error"):
                detail = s["error"].get("message", "")
            else:
                detail = ""
            attempts = " (%d attempts)" % s["attempts"] if s["attempts"] > 1 else ""
            print("  %s  %-9s %s%s" % (s["name"].ljust(width), s["status"], detail, attempts))
    if st["output"] is not None:
        print("output    %s" % json.dumps(st["output"], ensure_ascii=False))
    if st["error"]:
        name = st["error"].get("name")
        print("error     %s%s" % (st["error"].get("message"),
                                  " (%s)" % name if name and name not in ("Error", "StepFailed")
                                  else ""))
        if st["error"].get("stack"):
            for ln in st["error"]["stack"].rstrip().splitlines()[:12]:
                print("          %s" % ln)
    if st.get("url"):
        print("dashboard %s" % st["url"])
    sch = st.get("scheduler")
    if sch and sch.get("message"):
        print("note      %s" % sch["message"])


def _describe_wait(w):
    what = {"signal": lambda: "signal %r" % w.get("name"),
            "child": lambda: "child run %s (%s)" % (w.get("run_id") or "?", w.get("workflow_id")),
            "task": lambda: "TaskYou task %s%r" % ("#%s " % w["task_id"] if w.get("task_id")
                                                   else "", w.get("title"))
            }.get(w.get("kind"), lambda: w.get("step", "?"))()
    return what + (" until %s" % format_time(w["timeout_at"]) if w.get("timeout_at") else "")


def cmd_status(api, args):
    st = api.status(args.run_id)
    if args.json:
        _print_json(st)
    else:
        _print_status(st)
    return 0


def cmd_list(api, args):
    if args.what == "workflows":
        rows = api.list_workflows()
        if args.json:
            _print_json(rows)
        elif not rows:
            print("no workflows; deploy one with `ty-openworkflow deploy ID -f FILE`")
        else:
            _table([(w["id"], w["latest_version"], w["label"], w["runtime"], w["adapter"],
                     w["runs"], format_time(w["updated_at"])) for w in rows],
                   ("id", "version", "label", "runtime", "adapter", "runs", "updated"))
        return 0
    rows = api.list_runs(args.workflow, args.status, args.limit)
    if args.json:
        _print_json([{"id": r["id"], "short_id": r["short_id"], "workflow_id": r["workflow_id"],
                      "version": r["version"],
                      "status": r["status"], "created_at": r["created_at"],
                      "finished_at": r["finished_at"], "task_id": r["task_id"],
                      "schedule": r["schedule_name"],
                      "queued": r["queued"]["reason"] if r["queued"] else None} for r in rows])
    elif not rows:
        print("no runs")
    else:
        _table([(r["short_id"], r["workflow_id"], r["version"],
                 "%s (%s)" % (r["status"], r["queued"]["short"]) if r["queued"] else r["status"],
                 format_time(r["created_at"]),
                 "#%s" % r["task_id"] if r["task_id"] else
                 "queued" if r["task_requested"] else "-", r["schedule_name"] or "-")
                for r in rows],
               ("id", "workflow", "version", "status", "created", "task", "schedule"))
    return 0


def cmd_prune(api, args):
    if not args.older_than:
        raise InputError("prune needs --older-than DURATION (e.g. 30d); nothing was removed")
    statuses = ([x.strip() for x in args.status.split(",") if x.strip()] if args.status
                else list(TERMINAL))
    res = api.prune(args.older_than, statuses, dry_run=args.dry_run, vacuum=args.vacuum,
                    drop_undelivered=args.drop_undelivered)
    if args.json:
        _print_json(res)
        return 0
    c = res["removed"]
    if not c["runs"]:
        print("nothing to prune: no %s run ended more than %s ago (with its task updates delivered)"
              % ("/".join(res["statuses"]), format_duration(res["older_than_ms"])))
    else:
        print("%s %s (%s)" % (
            "would remove" if res["dry_run"] else "removed", _count(c["runs"], "run"),
            ", ".join((_count(c["steps"], "step"), _count(c["run_events"], "event"),
                       _count(c["run_logs"], "log entry", "log entries"),
                       _count(c["outbox"], "task update"), _count(c["signals"], "signal")))))
    if res["dropped_task_updates"]:
        why = "--drop-undelivered" if args.drop_undelivered else \
            "older than taskyou.outbox_expiry, %s" % format_duration(res["outbox_expiry_ms"])
        print("%s %s that never reached TaskYou (%s)" % (
            "would drop" if res["dry_run"] else "dropped",
            _count(res["dropped_task_updates"], "task update"), why))
    if res["kept_undelivered"]:
        print("kept %s whose TaskYou updates are not delivered yet (see `status`); %s"
              % (_count(res["kept_undelivered"], "old run"),
                 _undelivered_way_out(res["outbox_expiry_ms"])))
    if "vacuum_bytes" in res:
        print("vacuum gave back %s" % _count(res["vacuum_bytes"], "byte"))
    return 0


def cmd_schedule(api, args):
    if args.action == "list":
        rows = api.schedules()
        if args.json:
            _print_json(rows)
        elif not rows:
            print("no schedules; add one with "
                  "`ty-openworkflow schedule add WORKFLOW --cron \"0 * * * *\"`")
        else:
            _table([(r["name"], r["workflow_id"], r["cron"], r["tz"] or "local",
                     "paused" if r["paused"] else format_time(r["next_fire_at"]),
                     format_time(r["last_fire_at"]), r["last_run_id"] or "-") for r in rows],
                   ("name", "workflow", "cron", "tz", "next fire (local)", "last fire (local)",
                    "last run"))
        return 0
    if args.action == "add":
        if not args.cron:
            raise InputError("schedule add needs --cron \"EXPR\" "
                             "(five fields, or @hourly, @daily, ...)")
        doc = api.schedule_add(args.target, args.cron, _read_input(args), name=args.name,
                               tz=args.tz, catch_up=args.catch_up)
    elif args.action == "rm":
        doc = api.schedule_rm(args.target)
    else:
        doc = api.schedule_pause(args.target, paused=args.action == "pause")
    if args.json:
        _print_json(doc)
    elif args.action == "rm":
        print("removed schedule %s" % doc["name"])
    elif doc["paused"]:
        print("schedule %s is paused" % doc["name"])
    else:
        print("schedule %s: %s %s, next fire %s" % (doc["name"], doc["workflow_id"], doc["cron"],
                                                    format_time(doc["next_fire_at"])))
    return 0


def _describe_limits(doc):
    parts = ["%s %s" % (name, doc[key]) for name, key in (
        ("concurrency", "concurrency"), ("per-key", "per_key"), ("rate", "rate")) if doc[key]]
    if not parts:
        return "%s: no limits" % doc["workflow_id"]
    return "%s: %s (%d active, %d queued)" % (doc["workflow_id"], ", ".join(parts),
                                             doc["active"], doc["queued"])


def cmd_limits(api, args):
    given = {"concurrency": args.concurrency, "per_key": args.per_key, "rate": args.rate}
    change = args.clear or any(v is not None for v in given.values())
    if args.workflow_id is None:
        if change:
            raise InputError("give the workflow: `ty-openworkflow limits WORKFLOW --concurrency N`")
        rows = api.limits()
        if args.json:
            _print_json(rows)
        elif not rows:
            print("no limits; set some with `ty-openworkflow limits WORKFLOW --concurrency N`")
        else:
            _table([(r["workflow_id"], r["concurrency"] or "-", r["per_key"] or "-",
                     r["rate"] or "-", r["active"], r["queued"]) for r in rows],
                   ("workflow", "concurrency", "per-key", "rate", "active", "queued"))
        return 0
    if change:  # the limits not given stay as they are (none, with --clear)
        now = {} if args.clear else api.limits(args.workflow_id)
        doc = api.set_limits(args.workflow_id,
                             **{k: now.get(k) if v is None else v for k, v in given.items()})
    else:
        doc = api.limits(args.workflow_id)
    if args.json:
        _print_json(doc)
    else:
        print(_describe_limits(doc))
    return 0


def cmd_cancel(api, args):
    st = api.cancel(args.run_id)
    if args.json:
        _print_json(st)
    else:
        print("canceled %s" % st["id"])
    return 0


def cmd_signal(api, args):
    if args.data is not None and args.data_file:
        raise InputError("give the data with -d/--data or --data-file, not both")
    data = None
    if args.data is not None:
        data = parse_json_arg(args.data, "--data")
    elif args.data_file:
        data = _read_json_file(args.data_file, "data")
    res = api.signal(args.run_id, args.name, data, idempotency_key=args.idempotency_key)
    if args.json:
        _print_json(res)
    elif not res["applied"]:
        print("signal %s to %s was already sent with that idempotency key; not applied again"
              % (args.name, res["run_id"]))
    elif res["consumed_by"]:
        print("signal %s delivered to %s (wait %s)"
              % (args.name, res["run_id"], res["consumed_by"]))
    else:
        print("signal %s kept for %s until it waits for it" % (args.name, res["run_id"]))
    return 0


def cmd_retry(api, args):
    st = api.retry(args.run_id, latest=args.latest)
    if args.json:
        _print_json(st)
    else:
        print("retrying %s (version %d)" % (st["id"], st["version"]))
    return 0


def cmd_fork(api, args):
    st = api.fork(args.run_id, from_step=args.from_step, latest=args.latest,
                  input=_read_input(args, _NO_INPUT))
    if args.json:
        _print_json(st)
    else:
        print(st["id"])
    return 0


def cmd_logs(api, args):
    rows = api.logs(args.run_id)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no output logged for this run", file=sys.stderr)
    for r in rows:
        print("--- pass %d (%s) %s ---" % (r["pass_no"], r["adapter"], format_time(r["at"])))
        sys.stdout.write(r["text"] if r["text"].endswith("\n") else r["text"] + "\n")
    return 0


def cmd_adapters(api, args):
    rows = api.adapters_report()
    if args.json:
        _print_json(rows)
        return 0
    _table([(r["name"] + (" (default)" if r["default"] else ""), "yes" if r["enabled"] else "no",
             "yes" if r["available"] else "no", r["reason"]) for r in rows],
           ("adapter", "enabled", "available", "reason"))
    return 0


def _setup_logging(verbose, quiet=False):
    import logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def cmd_tick(api, args):
    _setup_logging(args.verbose, quiet=True)
    stats = api.tick(concurrency=args.concurrency, hand_over=True)
    if args.json:
        _print_json(stats)
    else:
        print("tick: %s%s" % (_count(stats["passes"], "pass", "passes"), {
            "runner": "; runs due within %s are left to the background runner it started"
                      % format_duration(api.config["runner_linger"]),
            "scheduler": "; runs due soon are left to the scheduler that is running"}.get(
                stats.get("handed_over"), "")))
    return 0


def cmd_runner(api, args):
    _setup_logging(args.verbose)
    api.scheduler("runner").loop()
    return 0


def cmd_serve(api, args):
    _setup_logging(args.verbose)
    if args.shutdown_grace is not None:
        try:
            api.config.values["shutdown_grace"] = parse_duration(args.shutdown_grace)
        except ValueError as exc:
            raise InputError("--shutdown-grace: %s" % exc)
    sched = api.scheduler("serve", args.concurrency)

    def on_signal(signum, frame):
        if sched.stopping.is_set():
            log.info("received %s again; stopping passes in flight now",
                     signal.Signals(signum).name)
            sched.stop(hurry=True)
            return
        log.info("received %s; no new passes, waiting up to %s for those in flight",
                 signal.Signals(signum).name, format_duration(api.config["shutdown_grace"]))
        sched.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving %s (scheduler %s, concurrency %d)", api.config.data_dir, sched.id,
             sched.concurrency)
    api.serve(scheduler=sched)
    log.info("stopped")
    return 0


def cmd_plugin(api, args):
    plugin = api.plugin
    if args.plugin_command == "install":
        directory = plugin.install(args.dir)
        print("installed the TaskYou plugin %s in %s" % (PLUGIN_NAME, directory))
        print("restart TaskYou's daemon (`ty daemon restart`) so it loads the plugin; it will then")
        print("  run `ty-openworkflow serve` as the plugin's service, while the daemon runs")
        print("  resume runs waiting on a task when it is done, blocked or failed (hooks), and")
        print("  at once on any change when its API is on (the service follows its event feed)")
        print("  offer the actions runs, cancel, retry and start-WORKFLOW on each task "
              "(`ty plugins run %s ACTION TASK_ID`)" % PLUGIN_NAME)
        print("remove it with `ty plugins remove %s`" % PLUGIN_NAME)
        return 0
    if args.plugin_command == "hook":
        plugin.hook(os.environ)
        return 0
    code, lines = plugin.action(args.action, os.environ)
    for line in lines:
        print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def cmd_dashboard(api, args):
    """Serve the dashboard, its API and /metrics alone (no scheduler) until SIGTERM/SIGINT."""
    _setup_logging(args.verbose)
    board = api.dashboard(port=args.port).start(announce=False)  # said once, below
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    print("dashboard on http://%s:%d/ (token in %s)"
          % (board.host, board.port, os.path.join(api.config.data_dir, DASHBOARD_TOKEN_FILE)),
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        board.stop()
    return 0


def cmd_sign(api, args):
    """Print the headers that sign a callback body (for curl, tests, remote workers)."""
    if args.file and args.file != "-":
        try:
            with open(args.file, "rb") as f:
                body = f.read()
        except OSError as exc:
            raise InputError("cannot read %s: %s" % (args.file, exc.strerror or exc))
    else:
        body = (sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer")
                else sys.stdin.read().encode("utf-8"))
    headers = sign_callback(webhook_secret(api.config.data_dir), body, args.timestamp)
    if args.json:
        _print_json(headers)
    else:
        for k, v in headers.items():
            print("%s: %s" % (k, v))
    return 0


def cmd_dist(api, args):
    """Write a single-file build with the files of runtimes/ (shims, dashboard page) embedded."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        source = f.read()
    shims = {name: runtime_file(name) for name in RUNTIME_FILES}
    marker = "_EMBEDDED_RUNTIMES = {}\n"
    if marker not in source:
        raise InputError("this file is already a single-file build")
    source = source.replace(marker, "_EMBEDDED_RUNTIMES = %r\n" % (shims,), 1)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(source)
    os.chmod(args.out, 0o755)
    print("wrote %s" % args.out)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look (the subcommand's own
    --help), and an unknown command is told the public commands only."""

    def error(self, message):
        bad = re.match(r"argument COMMAND: invalid choice: '?([^' ]*)'?", message)
        if bad:
            import difflib
            near = difflib.get_close_matches(bad.group(1), PUBLIC_COMMANDS, 1, 0.7)
            message = "unknown command %r%s; the commands are %s" % (
                bad.group(1), " (did you mean %s?)" % near[0] if near else "",
                ", ".join(PUBLIC_COMMANDS))
        self.exit(2, "%s: %s; see `%s --help`\n" % (self.prog, message, self.prog))


COMMANDS = ("init", "deploy", "start", "status", "list", "limits", "cancel", "signal", "retry",
            "fork", "logs", "adapters", "tick", "serve", "sign", "schedule", "prune", "dashboard",
            "runner", "dist", "plugin")
INTERNAL_COMMANDS = ("runner", "dist")  # the background runner, the single-file build
PUBLIC_COMMANDS = tuple(c for c in COMMANDS if c not in INTERNAL_COMMANDS)


class _Unbuilt:
    """A subcommand's parser left out: only the command being run is built (argparse is slow
    to build)."""

    def add_argument(self, *args, **kwargs):
        return None


def _command_in(argv):
    """The subcommand ``argv`` names, if it can be told without parsing (else None)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            i += 2
            continue
        if a.startswith("--config="):
            i += 1
            continue
        return None if a.startswith("-") else a
    return None


def _plugin_commands(sp):
    """`plugin install`, and what the plugin's scripts run (`plugin hook`, `plugin action`)."""
    psub = sp.add_subparsers(dest="plugin_command", metavar="install")
    psub.required = True
    ip = psub.add_parser("install", help="write the plugin into TaskYou's plugins dir (again: "
                         "update it)", description="write the plugin openworkflow into TaskYou's "
                         "plugins dir (again: update it)")
    ip.add_argument("--dir", help="the plugins dir (default: $TY_PLUGINS_DIR, else what `ty "
                    "plugins dir` prints, else ~/.config/task/plugins)")
    ip.set_defaults(usage_parser=ip)
    # What the plugin's scripts run (TaskYou gives them the task in TASK_* variables).
    psub.add_parser("hook")
    ap = psub.add_parser("action")
    ap.add_argument("action")


def _schedule_commands(sp):
    """`schedule add|list|rm|pause|resume`: each action takes only its own options."""
    ssub = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ssub.required = True

    def action(name, help_):
        ap = ssub.add_parser(name, help=help_, description=help_)
        ap.set_defaults(usage_parser=ap)
        return ap

    ap = action("add", "start a run of WORKFLOW on every fire of a cron expression")
    ap.add_argument("target", metavar="WORKFLOW", help="the workflow id")
    ap.add_argument("--cron", metavar="EXPR",
                    help='five fields ("*/5 * * * *": minute hour day-of-month month '
                         'day-of-week) or one of %s' % ", ".join(CRON_MACRO_NAMES))
    ap.add_argument("-i", "--input", help="input JSON for each run (default: null)")
    ap.add_argument("--input-file", help="input JSON file for each run")
    ap.add_argument("--name", help="the schedule's name (default: the workflow id)")
    ap.add_argument("--tz", metavar="ZONE",
                    help="time zone of the cron fields, like Europe/Paris (default: local)")
    ap.add_argument("--catch-up", default="latest", choices=("latest", "all", "none"),
                    help="after downtime: run the latest missed fire (default), all of them, "
                         "or none")
    ap.add_argument("--json", action="store_true", help="output as JSON")
    ap = action("list", "list the schedules with their next fire")
    ap.add_argument("--json", action="store_true", help="output as JSON")
    for name, help_ in (("rm", "remove a schedule (its runs stay)"),
                        ("pause", "pause a schedule: it fires no more until resumed"),
                        ("resume", "resume a paused schedule (missed fires are not run)")):
        ap = action(name, help_)
        ap.add_argument("target", metavar="NAME", help="the schedule's name")
        ap.add_argument("--json", action="store_true", help="output as JSON")


def build_parser(only=None):
    """The CLI's parser; with ``only``, just that subcommand's (the rest are not built)."""
    p = _Parser(prog="ty-openworkflow",
                description="Durable workflows on ephemeral compute, for TaskYou.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config",
                   help="config file (default: $%s or %s)" % (CONFIG_ENV, DEFAULT_CONFIG_PATH))
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name, func, help_, **kw):
        if only is not None and name != only:
            return _Unbuilt()
        sp = sub.add_parser(name, help=help_, description=help_,
                            formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        sp.set_defaults(func=func, usage_parser=sp)
        sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    sp = cmd("init", cmd_init, "write the default config and create the data dir")
    sp.add_argument("--force", action="store_true", help="overwrite an existing config file")
    sp.add_argument("--data-dir",
                    help="data dir to write into the config (default ~/.config/ty-openworkflow)")

    sp = cmd("deploy", cmd_deploy, "deploy workflow code (a new version if it changed)")
    sp.add_argument("workflow_id")
    sp.add_argument("-f", "--file",
                    help="workflow code file, or - for stdin (default: stdin when piped)")
    sp.add_argument("-a", "--adapter", choices=ADAPTER_NAMES,
                    help="compute adapter (default: the workflow's current one; default_adapter "
                         "for a new workflow)")
    sp.add_argument("--name", help="workflow name")
    sp.add_argument("--description", help="workflow description")
    sp.add_argument("--version", help="workflow version label (default: the current one, "
                                      "the next one when the code changed, 1.0.0 for a new "
                                      "workflow); one label names one code")
    sp.add_argument("--runtime", choices=sorted(RUNTIMES),
                    help="runtime (default: the workflow's current one; for a new workflow "
                         "python for a .py file, else node); give it to switch runtimes")
    sp.add_argument("--deadline",
                    help="default deadline for its runs (e.g. 1h); `start --deadline` overrides")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("start", cmd_start, "start a workflow run")
    sp.add_argument("workflow_id")
    sp.add_argument("-i", "--input", help="input JSON (default: null)")
    sp.add_argument("--input-file", help="input JSON file (default: none, the input is null)")
    sp.add_argument("-t", "--task", help="task title (creates a linked task)")
    sp.add_argument("--create-task", action="store_true", help="create a linked task")
    sp.add_argument("--deadline",
                    help="fail the run if it has not finished within this long (e.g. 1h)")
    sp.add_argument("--idempotency-key", metavar="KEY",
                    help="start at most one run of this workflow per KEY; again, it returns "
                         "the first run")
    sp.add_argument("--concurrency-key", metavar="KEY",
                    help="the run's key for the workflow's --per-key limit (see `limits`)")
    sp.add_argument("--priority", type=int, metavar="N",
                    help="among runs held back by the workflow's limits, higher goes first "
                         "(default 0)")
    sp.add_argument("--wait", action="store_true",
                    help="follow the run; exit 0 if it completes, 1 if not")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("status", cmd_status, "show a run")
    sp.add_argument("run_id")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("list", cmd_list, "list workflows or runs")
    sp.add_argument("what", choices=("workflows", "runs"))
    sp.add_argument("-w", "--workflow", help="filter runs by workflow id")
    sp.add_argument("-s", "--status", help="filter runs by status (%s)" % ", ".join(RUN_STATUSES))
    sp.add_argument("-n", "--limit", type=int, default=20, help="max results (default 20)")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("limits", cmd_limits,
             "set or show a workflow's flow control: concurrency, per-key, rate",
             epilog="examples:\n  ty-openworkflow limits deploy-site --concurrency 1\n"
                    "  ty-openworkflow limits agent --concurrency 2 --per-key 1\n"
                    "  ty-openworkflow limits call-api --rate 10/1m\n"
                    "  ty-openworkflow limits deploy-site --clear\n"
                    "  ty-openworkflow limits --json")
    sp.add_argument("workflow_id", nargs="?", help="the workflow (none: list every limit)")
    sp.add_argument("--concurrency", type=int, metavar="N",
                    help="at most N runs active at once (a sleeping or waiting run counts)")
    sp.add_argument("--per-key", type=int, metavar="N",
                    help="at most N active runs per `start --concurrency-key`")
    sp.add_argument("--rate", metavar="N/DURATION",
                    help="at most N runs start in any window this long (10/1m, 3/2s)")
    sp.add_argument("--clear", action="store_true",
                    help="remove the workflow's limits (with others: set only those)")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("cancel", cmd_cancel, "cancel a run (stops a pass in flight)")
    sp.add_argument("run_id")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("prune", cmd_prune,
             "delete finished runs older than a duration, with what is only theirs")
    sp.add_argument("--older-than", metavar="DURATION", help="e.g. 30d, 12h")
    sp.add_argument("--status", metavar="S,...",
                    help="only these finished statuses (default: completed,failed,canceled)")
    sp.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    sp.add_argument("--vacuum", action="store_true", help="give the freed space back to the disk")
    sp.add_argument("--drop-undelivered", action="store_true",
                    help="also prune runs whose TaskYou updates never got out; drop those updates")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("schedule", cmd_schedule,
             "start runs on a cron schedule: add, list, rm, pause, resume")
    if only in (None, "schedule"):
        _schedule_commands(sp)

    sp = cmd("signal", cmd_signal,
             "send a signal (with JSON data) to a run; kept until the run waits for it")
    sp.add_argument("run_id")
    sp.add_argument("name")
    sp.add_argument("-d", "--data", help="JSON data for the signal")
    sp.add_argument("--data-file", help="a file of JSON data")
    sp.add_argument("--idempotency-key", metavar="KEY", help="the same key again is applied once")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("retry", cmd_retry,
             "resume a failed or canceled run from its failed step (committed steps kept)")
    sp.add_argument("run_id")
    sp.add_argument("--latest", action="store_true",
                    help="on the workflow's latest version, not the run's own")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("fork", cmd_fork,
             "start a new run that replays a run's committed history (up to a step)")
    sp.add_argument("run_id")
    sp.add_argument("--from-step", metavar="KEY",
                    help="copy the history before this step only (default: all)")
    sp.add_argument("--latest", action="store_true", help="on the workflow's latest version")
    sp.add_argument("-i", "--input", help="a new input JSON (default: the run's own)")
    sp.add_argument("--input-file", help="a new input JSON file")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("logs", cmd_logs, "show what a run's code printed, per pass")
    sp.add_argument("run_id")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("adapters", cmd_adapters, "show each adapter: enabled, available, and why not")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("tick", cmd_tick, "run every pass that is due now, then exit (for cron)")
    sp.add_argument("--concurrency", type=int, help="max passes at once (default: concurrency)")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    sp = cmd("serve", cmd_serve, "run the scheduler until SIGTERM/SIGINT")
    sp.add_argument("--concurrency", type=int, help="max passes at once (default: concurrency)")
    sp.add_argument("--shutdown-grace", metavar="DURATION",
                    help="on SIGTERM, how long passes in flight may finish before they are "
                         "given back (default: shutdown_grace)")
    sp.add_argument("-v", "--verbose", action="store_true")

    sp = cmd("plugin", cmd_plugin, "the TaskYou plugin: install it (TaskYou then runs serve, "
             "wakes waiting runs, offers actions on tasks)")
    if only in (None, "plugin"):
        _plugin_commands(sp)

    sp = cmd("dashboard", cmd_dashboard,
             "serve the dashboard, its JSON API and /metrics alone (no scheduler)")
    sp.add_argument("--port", type=int, help="port (default: dashboard.port)")
    sp.add_argument("-v", "--verbose", action="store_true")

    sp = cmd("sign", cmd_sign, "print the headers that sign a webhook callback body")
    sp.add_argument("-f", "--file", help="body file, or - for stdin (default stdin)")
    sp.add_argument("--timestamp", type=int, help="unix seconds to sign with (default now)")
    sp.add_argument("--json", action="store_true", help="output as JSON")

    # Internal commands (the background runner, the single-file build): added without a help
    # text, argparse leaves them out of --help.
    if only in (None, "runner"):
        sp = sub.add_parser("runner")
        sp.set_defaults(func=cmd_runner)
        sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("-v", "--verbose", action="store_true")
    if only in (None, "dist"):
        sp = sub.add_parser("dist")
        sp.set_defaults(func=cmd_dist)
        sp.add_argument("out")
    return p


def main(argv=None):
    """CLI entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    only = _command_in(argv)
    parser = build_parser(only if only in COMMANDS else None)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the (sub)command they were given to, with its own --help
            getattr(args, "usage_parser", parser).error(
                "unrecognized arguments: %s" % " ".join(unknown))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "concurrency", None) is not None and args.concurrency < 1:
        print("ty-openworkflow: --concurrency must be at least 1", file=sys.stderr)
        return 2
    api = None
    try:
        if args.func is not cmd_init and args.func is not cmd_dist:
            must_exist = args.config is not None and args.func is not cmd_runner
            api = Sidecar(config_path=args.config, must_exist=must_exist)
        return args.func(api, args)
    except OpenWorkflowError as exc:
        print("ty-openworkflow: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`status X | head`): that is the end of the output, not an error.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if api is not None:
            api.close()


if __name__ == "__main__":
    sys.exit(main())
