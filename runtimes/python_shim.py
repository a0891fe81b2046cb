#!/usr/bin/env python3
"""ty-openworkflow runtime shim for Python (pass protocol v1).

Usage: python3 python_shim.py WORKFLOW_FILE < pass.json > events.ndjson

Reads one pass document on stdin, runs ``workflow(input, ctx)`` from the top,
replays memoized steps from the history, runs the first new step, and writes
newline-delimited JSON events on stdout. Anything the user's code prints (even
a child process writing to fd 1) goes to stderr, the run log.

The sections, their banners and their names follow runtimes/node_shim.js part for
part (snake_case here for its camelCase): a change to one is mirrored in the other.
"""
import json
import linecache
import os
import re
import sys
import threading
import time
import traceback


# ---- engine: start (the same parts, in the same order, as node_shim.js's engine) ----
# run_pass(doc, workflow_of, write, control) runs one pass of ``workflow_of()`` and hands
# each event line to ``write``; it returns when the pass's terminal event has been written.


# ---- constants ----

PROTOCOL = 1
MAX_NAME = 200  # step and sleep names, in characters
MAX_DEPTH = 100  # nesting of step outputs: deeper JSON is refused
MAX_SLEEP_MS = 100 * 365 * 86400000  # a century
UNITS_MS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


# ---- messages: the texts both shims print, line for line as in node_shim.js ----
# (names are quoted by repr() here, in double quotes there; tests hold each to its own)


def too_many_steps(max_steps):
    """The error a run gets when it makes more durable calls than limits.max_steps."""
    return {"message": "the run reached %d steps and sleeps (limits.max_steps); stopped as a "
                       "runaway (raise the limit if it really needs more)" % max_steps,
            "name": "TooManySteps", "stack": None}


def non_deterministic(pos, kind, key, had):
    """The error a replay gets when its durable call #pos+1 is not the recorded ``had``."""
    return {"name": "NonDeterministicWorkflow", "stack": None,
            "message": "durable call #%d is %s %r, but when this run made that call it was %s %r: "
                       "the workflow took another path on replay (it must not branch on the "
                       "clock, random numbers or anything read outside a step); the run cannot "
                       "go on" % (pos + 1, kind, key, had[1], had[0])}


def step_failed(key):
    """The error a pass ends with when step ``key`` failed (the sidecar retries or fails it)."""
    return {"message": "step %r failed" % key, "name": "StepFailed", "stack": None}


def output_too_large(key, size, limit):
    """Why step ``key``'s output of ``size`` bytes is refused."""
    return ("the output of step %r is %d bytes, over the limit of %d bytes "
            "(limits.max_output_bytes); store large data elsewhere and return a reference"
            % (key, size, limit))


def unsupported_protocol(protocol):
    """Why a pass document of another protocol is refused."""
    return "protocol %r not supported (this shim speaks %d)" % (protocol, PROTOCOL)


# ---- errors ----


class _PassEnd(BaseException):
    """Internal signal that ends the pass (a sleep not yet due, a failed step).

    It derives from BaseException so a user's ``except Exception`` cannot swallow
    it; even a bare ``except:`` cannot, because the shim trusts its own record of
    why the pass ended, not the workflow's return.
    """

class WaitError(Exception):
    """A wait that resolved as an error (a failed, canceled or timed-out child run)."""

    def __init__(self, error):
        super().__init__(error.get("message", "the wait failed"))
        self.name = error.get("name")
        self.run_id = error.get("run_id")

    @staticmethod
    def of(error):
        """The error raised for ``error``: ChildFailed, ChildCanceled, ChildTimeout, WaitError."""
        return {"ChildFailed": ChildFailed, "ChildCanceled": ChildCanceled,
                "ChildTimeout": ChildTimeout}.get(error.get("name"), WaitError)(error)


class ChildFailed(WaitError):
    """The child run failed."""


class ChildCanceled(WaitError):
    """The child run was canceled."""


class ChildTimeout(WaitError):
    """The child run did not finish within the wait's timeout (it is canceled)."""


def _memory_ceiling():
    """The address-space limit the sidecar set (limits.pass_memory), e.g. "200MiB", or None."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if soft >= size and soft % size == 0:
            return "%d%s" % (soft // size, unit)
    return "%d bytes" % soft


def serialize_error(exc):
    """The protocol's error document for ``exc``: message, name, stack."""
    message = str(exc)
    if isinstance(exc, MemoryError):
        ceiling = _memory_ceiling()
        message = "the pass ran out of memory%s%s" % (
            " (limits.pass_memory: %s)" % ceiling if ceiling else "",
            ": " + message if message else "")
    return {
        "message": message or type(exc).__name__,
        "name": type(exc).__name__,
        "stack": user_stack(exc),
    }


def user_stack(exc):
    """The traceback of ``exc`` without this shim's own frames once the workflow's are there
    (a failure of the shim itself keeps them all)."""
    top = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    todo, seen = [top], set()
    while todo:
        te = todo.pop()
        if te is None or id(te) in seen:
            continue
        seen.add(id(te))
        frames = [f for f in te.stack if f.filename != __file__]
        if frames and len(frames) < len(te.stack):
            te.stack = traceback.StackSummary.from_list(frames)
        todo += [te.__cause__, te.__context__]
    return "".join(top.format())


# ---- durations ----


def duration_ms(value, what, unit_ms):
    """Numbers are in ``unit_ms`` (1000 for seconds); strings like "5m" are parsed."""
    ms = _parse_duration_ms(value, unit_ms)
    if ms is None or ms != ms or ms < 0 or ms > MAX_SLEEP_MS:
        raise TypeError("%s: invalid duration %r; use seconds (up to a century) or a string like "
                        "'500ms', '30s', '5m', '1h30m'" % (what, value))
    return int(ms)


def _parse_duration_ms(value, unit_ms):
    if isinstance(value, bool):
        value = None
    if isinstance(value, (int, float)):
        return float(value) * unit_ms
    if isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", s):
            return float(s) * unit_ms
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            total += float(m.group(1)) * UNITS_MS[m.group(2)]
            pos = m.end()
        if s and pos == len(s):
            return total
    return None


# ---- retry policy ----


def retry_policy(opts):
    """Retry options as the protocol's policy: max_attempts, initial_ms, backoff, max_ms."""
    names = {
        "max_attempts": "max_attempts", "maxAttempts": "max_attempts",
        "initial": "initial_ms", "initial_interval": "initial_ms",
        "backoff": "backoff", "backoff_coefficient": "backoff",
        "max_interval": "max_ms", "maximum_interval": "max_ms",
    }
    policy = {}
    for k, v in opts.items():
        if k not in names:
            raise TypeError("unknown retry option %r; use max_attempts, initial, backoff, "
                            "max_interval" % k)
        target = names[k]
        if target in ("initial_ms", "max_ms"):
            policy[target] = duration_ms(v, "retry %s" % k, 1000)
        elif target == "max_attempts":
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10000:
                raise TypeError("retry max_attempts must be a whole number from 1 to 10000, "
                                "got %r" % (v,))
            policy[target] = v
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 100:
                raise TypeError("retry backoff must be a number from 1 to 100, got %r" % (v,))
            policy[target] = float(v)
    return policy


# ---- JSON ----


def _too_deep(value, limit):
    """True if ``value`` nests deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, d + 1) for x in v)
    return False


def to_json(value, what):
    """Return (text, plain value) or raise TypeError saying why value is not JSON."""
    try:
        if _too_deep(value, MAX_DEPTH):
            raise ValueError("nested more than %d levels deep" % MAX_DEPTH)
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TypeError("%s is not JSON: it holds a lone surrogate, which is not valid Unicode "
                        "text" % what)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError("%s is not JSON (%s); return dicts, lists, strings, numbers, booleans "
                        "or None" % (what, exc))
    return text, json.loads(text)


# ---- the pass: keys, steps, sleeps, waits ----


def now_ms():
    return int(time.time() * 1000)


class Context:
    """The ``ctx`` a workflow receives: ``step``, ``sleep``, ``sleep_until``, the waits, ids."""

    def __init__(self, doc, emit, control=None):
        # The sidecar's clock is the run's clock, but only one ahead of ours is
        # followed: one behind it by the time the pass took to start would make
        # sleeps end early.
        sidecar_now = doc.get("now")
        self._skew_ms = (max(0, int(sidecar_now) - now_ms())
                         if isinstance(sidecar_now, (int, float)) else 0)
        self._emit = emit
        history = doc.get("history") or {}
        self._done = history.get("steps") or {}  # key -> output
        self._sleeps = history.get("sleeps") or {}  # key -> wake_at (ms)
        # sleeps already over
        self._slept = {k for k in history.get("order") or () if k in self._sleeps}
        self._attempts = history.get("attempts") or {}  # key -> attempts started so far
        self._inline_ms = doc.get("inline_sleep_ms", 1000)
        self._max_output = doc.get("max_output_bytes") or 1048576
        self._max_steps = doc.get("max_steps") or float("inf")
        self._waits = history.get("waits") or {}  # key -> {value} | {error}: how a wait resolved
        # key -> timeout_at (ms) or None: waits recorded, not resolved yet
        self._parked = history.get("waiting") or {}
        # {"aborted": True}: a warm worker's cancel; no durable call may start anything after it
        self._control = control if control is not None else {}
        self._used = {}
        self._used_keys = set()
        self._calls = 0  # durable calls made so far in this pass, in call order
        self._recorded_calls = {c[0]: (c[1], c[2]) for c in history.get("calls") or ()}
        self.call_no = None
        self._in_step = None
        self.stop = None  # {"kind": "suspend", "wake_at"} | {"kind": "step_failed", ...}
        self.run_id = doc.get("run_id")
        self.workflow_id = doc.get("workflow_id")
        self.attempt = doc.get("attempt")
        self.step_key = None
        self.idempotency_key = None

    def now_ms(self):
        return now_ms() + self._skew_ms

    def _halt(self, reason):
        if self.stop is None:
            self.stop = reason
        raise _PassEnd()

    def _peek_key(self, name):
        """The n-th use of a name is ``name:n``, skipping keys the workflow already used."""
        n = self._used.get(name, 0)
        key = name if n == 0 else "%s:%d" % (name, n)
        while key in self._used_keys:
            n += 1
            key = "%s:%d" % (name, n)
        return key, n

    def _key_for(self, name, kind):
        if self._control.get("aborted"):
            raise _PassEnd()  # canceled in a warm worker: nothing more may start
        if not isinstance(name, str) or not name:
            raise TypeError("%s names must be non-empty strings, got %r" % (kind, name))
        if len(name) > MAX_NAME:
            raise TypeError("%s name %r... is %d characters; the limit is %d"
                            % (kind, name[:40], len(name), MAX_NAME))
        if self._in_step is not None:
            raise TypeError("%s %r was called inside step %r; steps and sleeps cannot be nested, "
                            "call them from the workflow function" % (kind, name, self._in_step))
        key, n = self._peek_key(name)
        self._used[name] = n + 1
        self._used_keys.add(key)
        if len(self._used_keys) > self._max_steps:
            self.stop = {"kind": "fatal", "error": too_many_steps(self._max_steps)}
            raise _PassEnd()
        # The determinism guard: the n-th durable call must be the n-th one recorded.
        self.call_no = pos = self._calls
        self._calls += 1
        had = self._recorded_calls.get(pos)
        if had and tuple(had) != (key, kind):
            self.stop = {"kind": "fatal", "error": non_deterministic(pos, kind, key, had)}
            raise _PassEnd()
        return key

    def step(self, name, fn, retry=None, **retry_kw):
        """Run ``fn()`` once per run and memoize its JSON result under ``name``."""
        key = self._key_for(name, "step")
        if key in self._done:
            return json.loads(json.dumps(self._done[key]))
        if self.stop is not None:
            raise _PassEnd()
        if not callable(fn):
            raise TypeError("step %r: the second argument must be a function" % key)
        retry = retry_policy(dict(retry or {}, **retry_kw))
        return self._run_step(key, fn, retry)

    def _run_step(self, key, fn, retry):
        attempt = self._attempts.get(key, 0) + 1
        self._emit("step_started", step=key, attempt=attempt, retry=retry, call=self.call_no)
        self.step_key, self.idempotency_key = key, "%s:%s" % (self.run_id, key)
        self._in_step = key
        try:
            value = fn()
        except _PassEnd:
            raise
        except BaseException as exc:
            # sys.exit() and KeyboardInterrupt inside a step are that step's failure
            # (retried by its policy), like any exception its function raises.
            self._emit("step_failed", step=key, attempt=attempt, retry=retry,
                       error=serialize_error(exc))
            self._halt({"kind": "step_failed", "step": key})
        finally:
            self._in_step = None
            self.step_key = self.idempotency_key = None
        try:
            text, out = to_json(value, "the output of step %r" % key)
            size = len(text.encode("utf-8"))
            if size > self._max_output:
                raise ValueError(output_too_large(key, size, self._max_output))
        except (TypeError, ValueError) as exc:
            self._emit("step_failed", step=key, attempt=attempt, retry=retry, retryable=False,
                       error=serialize_error(exc))
            self._halt({"kind": "step_failed", "step": key})
        self._emit("step_completed", step=key, attempt=attempt, output=out)
        self._done[key] = out
        return out

    def sleep_until(self, name, when):
        """Sleep durably until ``when`` (epoch seconds, or a datetime)."""
        key = self._key_for(name, "sleep")
        if key in self._slept:
            return None
        if key in self._sleeps:
            wake_at = self._sleeps[key]
        else:
            if self.stop is not None:
                raise _PassEnd()
            if hasattr(when, "timestamp"):
                wake_at = int(when.timestamp() * 1000)
            elif isinstance(when, (int, float)) and not isinstance(when, bool):
                wake_at = int(when * 1000)
            else:
                raise TypeError("sleep_until %r: invalid time %r" % (key, when))
            if abs(wake_at - self.now_ms()) > MAX_SLEEP_MS:
                raise TypeError("sleep_until %r: %r is more than a century away" % (key, when))
        return self._run_sleep(key, wake_at)

    def _run_sleep(self, key, wake_at):
        if key not in self._sleeps:
            self._emit("sleep", step=key, wake_at=wake_at, call=self.call_no)
            self._sleeps[key] = wake_at
        if wake_at - self.now_ms() > self._inline_ms:
            self._halt({"kind": "suspend", "wake_at": wake_at})
        while wake_at - self.now_ms() > 0:  # never end a sleep before its time
            time.sleep((wake_at - self.now_ms()) / 1000.0)
        self._emit("sleep_completed", step=key)
        self._slept.add(key)
        return None

    def sleep(self, name, duration):
        """Sleep durably for ``duration`` (seconds, or a string like "5m")."""
        ms = duration_ms(duration, "sleep %r" % name, 1000)
        key = self._peek_key(name)[0] if isinstance(name, str) else name
        if key in self._sleeps:
            return self.sleep_until(name, self._sleeps[key] / 1000.0)
        return self.sleep_until(name, (self.now_ms() + ms) / 1000.0)

    # A wait (a signal, a child run, a TaskYou task) parks the run like a sleep: it is
    # recorded with its timeout, the pass ends, and the sidecar resolves it (the thing
    # arrived, or the timeout passed) and starts the next pass, which replays it.
    def _durable_wait(self, base, spec, timeout):
        key = self._key_for(base, "wait")
        if key in self._waits:
            return self._unwrap_wait(self._waits[key])
        if self.stop is not None:
            raise _PassEnd()
        if key in self._parked:
            timeout_at = self._parked[key]
        else:
            timeout_at = (None if timeout is None else
                          self.now_ms() + duration_ms(timeout, "timeout of %s" % base, 1000))
            self._emit("wait", step=key, wait=spec, timeout_at=timeout_at, call=self.call_no)
            self._parked[key] = timeout_at
        self._halt({"kind": "suspend", "wake_at": timeout_at, "waiting": True})

    @staticmethod
    def _unwrap_wait(entry):
        """How a wait resolved: its value, or its error raised (a failed child run)."""
        entry = entry or {}
        if entry.get("error"):
            raise WaitError.of(entry["error"])
        value = entry.get("value")
        return None if value is None else json.loads(json.dumps(value))

    @staticmethod
    def _wait_name(what, name):
        if not isinstance(name, str) or not name:
            raise TypeError("%s needs a non-empty name, got %r" % (what, name))
        return name

    def wait_for_signal(self, name, timeout=None):
        """Wait durably for signal ``name``: {"data": ...} when it arrives, None on timeout
        (seconds or "5m")."""
        return self._durable_wait("signal:%s" % self._wait_name("wait_for_signal", name),
                                  {"kind": "signal", "name": name}, timeout)

    def run_workflow(self, workflow_id, input=None, name=None, timeout=None, priority=None,
                     key=None):
        """Start a child run of ``workflow_id`` (exactly once) and wait for its output; a failed or
        canceled child raises WaitError (catchable) with its message and run id. ``priority``
        and ``key`` place it among the runs its workflow's limits hold back (default: its
        parent's priority, no key)."""
        self._wait_name("run_workflow", workflow_id)
        spec = {"kind": "child", "workflow_id": workflow_id,
                "input": to_json(input, "the child's input")[1]}
        if priority is not None:
            if (not isinstance(priority, int) or isinstance(priority, bool)
                    or not -2**31 <= priority < 2**31):
                raise TypeError("run_workflow's priority must be an integer, got %r" % (priority,))
            spec["priority"] = priority
        if key is not None:
            if not isinstance(key, str) or not key.strip() or len(key) > 200:
                raise TypeError("run_workflow's key must be a non-empty string of at most 200 "
                                "characters")
            spec["key"] = key
        key = "child:%s" % self._wait_name("run_workflow", name or workflow_id)
        return self._durable_wait(key, spec, timeout)

    def wait_for_task(self, title, body=None, timeout=None):
        """Create a TaskYou task (exactly once) and wait until a person closes it:
        {"approved": True, "task"} for done, {"approved": False, "task"} for blocked or
        archived, None on timeout."""
        self._wait_name("wait_for_task", title)
        spec = {"kind": "task", "title": title, "body": None if body is None else str(body)}
        return self._durable_wait("task:%s" % str(title)[:150], spec, timeout)


# What a child run's wait may raise, to catch by name: ``except ctx.ChildFailed``.
Context.WaitError, Context.ChildFailed, Context.ChildCanceled, Context.ChildTimeout = (
    WaitError, ChildFailed, ChildCanceled, ChildTimeout)


def run_pass(doc, workflow_of, write, control=None):
    """Run one pass of ``workflow_of()`` (which loads the code) and hand each event line to
    ``write``."""
    pass_id = doc.get("pass_id")
    ctx = None

    def emit(type_, **data):
        ev = {"type": type_, "pass": pass_id, "at": ctx.now_ms() if ctx else now_ms()}
        ev.update(data)
        # A leading newline ends any partial line written to the same pipe.
        write("\n" + json.dumps(ev, ensure_ascii=False) + "\n")

    if doc.get("protocol") != PROTOCOL:
        emit("failed", error={"message": unsupported_protocol(doc.get("protocol")),
                              "name": "ProtocolError", "stack": None})
        return
    ctx = Context(doc, emit, control)
    try:
        value = workflow_of()(doc.get("input"), ctx)
    except _PassEnd:
        value = None
    except BaseException as exc:  # the workflow failed outside any step
        if ctx.stop is None:
            emit("failed", error=serialize_error(exc))
            return
    if ctx.stop is not None:
        if ctx.stop["kind"] == "suspend":
            emit("suspended", wake_at=ctx.stop["wake_at"], waiting=bool(ctx.stop.get("waiting")))
        elif ctx.stop["kind"] == "fatal":
            emit("failed", retryable=False, error=ctx.stop["error"])
        else:
            emit("failed", step=ctx.stop["step"], error=step_failed(ctx.stop["step"]))
        return
    try:
        out = to_json(value, "the workflow's return value")[1]
    except TypeError as exc:
        emit("failed", retryable=False, error=serialize_error(exc))
        return
    emit("completed", output=out)


# ---- engine: end ----


# ---- loading a workflow ----

# Tracebacks name the workflow and its version ("workflow hello v2", line numbers as in the
# code deployed), not the file the sidecar wrote the code to.


def workflow_label(doc):
    """What a traceback calls the pass's workflow code, or None if the document does not say."""
    if doc.get("workflow_id") and doc.get("version") is not None:
        return "workflow %s v%s" % (doc["workflow_id"], doc["version"])
    return None


def load_workflow(path, label=None):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if label:  # the traceback shows the source lines under the name it gives them
        linecache.cache[label] = (len(source), None, source.splitlines(True), label)
    namespace = {"__name__": "__workflow__", "__file__": path}
    exec(compile(source, label or path, "exec"), namespace)
    fn = namespace.get("workflow")
    if not callable(fn):
        raise TypeError("the workflow code defines no function named `workflow`")
    return fn


# ---- one pass: the event channel and main ----


def _event_channel():
    """The fd events go to; user prints, and children writing fd 1, land in the log.

    With TYOW_EVENT_FD (exec, docker) the channel is a pipe of its own; without
    it (run by hand) it is a private copy of stdout. Either way it is not
    inherited by child processes, and fd 1 becomes a copy of stderr.
    """
    fd = os.environ.pop("TYOW_EVENT_FD", "")
    if fd.isdigit() and int(fd) > 2:
        events_fd = int(fd)
        os.set_inheritable(events_fd, False)
    else:
        events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def _read_first_line():
    """The pass document: the first line on fd 0, read raw (no buffered reader to lock)."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8")


def _exit_on_eof():
    try:
        while os.read(0, 4096):
            pass
        # Best effort only: if the sidecar died, nobody reads stderr either.
        sys.stderr.write("ty-openworkflow shim: the sidecar closed the pass; stopping\n")
        sys.stderr.flush()
    finally:
        os._exit(3)


def main(argv):
    events = _event_channel()
    try:
        doc = json.loads(_read_first_line())
    except ValueError as exc:
        sys.stderr.write("ty-openworkflow shim: bad pass document: %s\n" % exc)
        return 2
    if doc.get("protocol") != PROTOCOL:
        sys.stderr.write("ty-openworkflow shim: %s\n" % unsupported_protocol(doc.get("protocol")))
        return 2

    def write(line):
        events.write(line)
        events.flush()

    # The sidecar keeps stdin open for the whole pass: end-of-file means it is
    # gone, so an orphaned pass stops instead of running further steps.
    threading.Thread(target=_exit_on_eof, daemon=True).start()
    run_pass(doc, lambda: load_workflow(argv[1], workflow_label(doc)), write)
    return 0


# ---- warm worker ----


class _PassOutput:
    """sys.stdout / sys.stderr of a warm worker: a pass's prints go to its own log.

    Text goes out a line at a time per thread (as a buffered stream would have it), so two
    threads of a pass printing at once never split each other's lines (print() writes the
    text and its newline apart). A partial line goes out on flush(), before the pass's next
    event, at MAX_PARTIAL characters, and when the pass ends.
    """

    MAX_PARTIAL = 65536

    def __init__(self, worker, fallback):
        self._worker, self._fallback = worker, fallback
        self._partial = {}  # (pass id, thread id) -> what that thread wrote since its last newline
        self._lock = threading.Lock()

    def write(self, text):
        pass_id = self._worker.current_pass()
        if pass_id is None:
            return self._fallback.write(text)
        key = (pass_id, threading.get_ident())
        with self._lock:
            text_so_far = self._partial.pop(key, "") + text
            cut = text_so_far.rfind("\n") + 1
            if len(text_so_far) - cut >= self.MAX_PARTIAL:
                cut = len(text_so_far)
            if cut < len(text_so_far):
                self._partial[key] = text_so_far[cut:]
        if cut:
            self._worker.send({"type": "log", "pass": pass_id, "text": text_so_far[:cut]})
        return len(text)

    def flush(self):
        pass_id = self._worker.current_pass()
        if pass_id is not None:
            with self._lock:
                text = self._partial.pop((pass_id, threading.get_ident()), "")
            if text:
                self._worker.send({"type": "log", "pass": pass_id, "text": text})
        self._fallback.flush()

    def flush_pass(self, pass_id):
        """Send what the threads of ``pass_id`` wrote without a newline yet."""
        with self._lock:
            keys = [k for k in self._partial if k[0] == pass_id]
            texts = [self._partial.pop(k) for k in keys]
        for text in texts:
            self._worker.send({"type": "log", "pass": pass_id, "text": text})

    def __getattr__(self, name):
        return getattr(self._fallback, name)


def _follow_passes(worker):
    """Threads a pass's code starts, and work it hands to a thread pool, print to that pass.

    A thread takes the pass of the thread that starts it. A pool's threads outlive the
    pass that made them and serve others, so each piece of work a pass submits prints to
    the pass that submitted it (asyncio's run_in_executor and to_thread submit too).
    """
    import concurrent.futures

    start = threading.Thread.start
    submit = concurrent.futures.ThreadPoolExecutor.submit

    def start_in_pass(thread):
        thread._tyow_pass = worker.current_pass()
        return start(thread)

    def submit_in_pass(executor, fn, /, *args, **kwargs):
        pass_id = worker.current_pass()
        if pass_id is None:
            return submit(executor, fn, *args, **kwargs)

        def in_pass(*a, **kw):
            before = getattr(worker.local, "pass_id", None)
            worker.local.pass_id = pass_id
            try:
                return fn(*a, **kw)
            finally:
                worker.local.pass_id = before
        return submit(executor, in_pass, *args, **kwargs)

    threading.Thread.start = start_in_pass
    concurrent.futures.ThreadPoolExecutor.submit = submit_in_pass


class Worker:
    """`python3 python_shim.py --worker`: many passes at once (a thread each), the same protocol.

    Stdin lines are {"op": "pass", "code": FILE, "doc": PASS} or {"op": "cancel",
    "pass": ID}; events go out as in a single pass, plus {"type": "log"} for
    what a pass printed and {"type": "canceled", "busy"} once a cancel took
    effect. Each workflow file is loaded once: its module-level state is shared
    by the passes this worker runs.
    """

    def __init__(self, events):
        self.events = events
        self.lock = threading.Lock()
        self.local = threading.local()
        self.live = {}  # pass id -> {"canceled", "inflight"}
        self.loaded = {}  # (workflow file, label) -> workflow function

    def send(self, ev):
        self.write("\n" + json.dumps(ev, ensure_ascii=False) + "\n")

    def current_pass(self):
        """The pass whose log the calling thread prints to: the one it runs, or the one whose code
        started the thread (see _follow_passes); None for the worker's own threads."""
        pass_id = getattr(self.local, "pass_id", None)
        if pass_id is None:
            pass_id = getattr(threading.current_thread(), "_tyow_pass", None)
        return pass_id

    def write(self, line):
        with self.lock:
            self.events.write(line)
            self.events.flush()

    def out_of_memory(self):
        """The pass that met the ceiling may not be the one that used the memory: the worker
        goes, and the sidecar runs each pass it held alone, so the one that did fails alone."""
        with self.lock:
            os.write(2, b"ty-openworkflow worker: MemoryError (a pass ran out of memory)\n")
            os._exit(1)

    def workflow(self, path, label):
        with self.lock:
            fn = self.loaded.get((path, label))
        if fn is None:
            fn = load_workflow(path, label)
            with self.lock:
                self.loaded[(path, label)] = fn
        return fn

    def run_one(self, msg):
        doc = msg.get("doc") or {}
        pass_id = doc.get("pass_id")
        state = self.live[pass_id]
        self.local.pass_id = pass_id

        def write(line):
            self.flush_output(pass_id)  # what it printed comes before what it does next
            if state["canceled"]:
                return
            kind = line[10:40]
            if '"step_started"' in kind:
                state["inflight"] += 1
            elif '"step_completed"' in kind or '"step_failed"' in kind:
                state["inflight"] -= 1
            if ('"step_failed"' in kind or '"failed"' in kind) and '"MemoryError"' in line:
                self.out_of_memory()
            self.write(line)

        try:
            run_pass(doc, lambda: self.workflow(msg.get("code"), workflow_label(doc)), write,
                     state)
        finally:
            self.flush_output(pass_id)
            self.local.pass_id = None
            self.live.pop(pass_id, None)

    def flush_output(self, pass_id):
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _PassOutput):
                stream.flush_pass(pass_id)

    def serve(self):
        sys.stdout = _PassOutput(self, sys.__stderr__)
        sys.stderr = _PassOutput(self, sys.__stderr__)
        _follow_passes(self)
        # The runtime started: a worker that dies before this line could not run any pass.
        self.send({"type": "ready"})
        buffered = b""
        while True:
            chunk = os.read(0, 65536)
            if not chunk:
                os._exit(3)  # the sidecar is gone: so are its passes
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if line.strip():
                    self.handle(line)

    def handle(self, line):
        try:
            msg = json.loads(line)
        except ValueError as exc:
            sys.__stderr__.write("ty-openworkflow worker: bad message: %s\n" % exc)
            return
        if msg.get("op") == "pass":
            pass_id = (msg.get("doc") or {}).get("pass_id")
            self.live[pass_id] = {"canceled": False, "inflight": 0, "aborted": False}
            threading.Thread(target=self.run_one, args=(msg,), daemon=True).start()
        elif msg.get("op") == "cancel":
            state = self.live.pop(msg.get("pass"), None)
            if state:
                state["canceled"] = state["aborted"] = True
            busy = bool(state and state["inflight"] > 0)
            self.send({"type": "canceled", "pass": msg.get("pass"), "busy": busy})


# ---- entry point ----

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        Worker(_event_channel()).serve()
    code = main(sys.argv)
    sys.stderr.flush()
    # Skip interpreter teardown: the stdin watcher thread is still blocked in a
    # read, and whatever user code left running must not delay the pass's end.
    os._exit(code)
