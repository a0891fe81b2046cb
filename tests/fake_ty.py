#!/usr/bin/env python3
"""A faithful fake of TaskYou's ``ty`` CLI for the ty-openworkflow tests.

It speaks the subset of the real grammar the bridge may use (create, show,
status, close/done, update, list, execute/queue; see ../shared/ty-cli.md), the
plugin commands and the daemon, parses flags the way cobra/pflag do, and rejects
everything else the way the real binary does: message on stderr, exit status 1.
State is one JSON file; every invocation is appended to its ``calls`` list so a
test can assert the exact argv the bridge ran, rejected calls included.

Quick start (in a test)::

    from tests import fake_ty
    fake_ty.install(bin_dir, state_path)          # writes an executable bin_dir/ty
    env = dict(os.environ, PATH=bin_dir)          # only the fake is reachable
    subprocess.run(["ty", "create", "T", "--json"], env=env)
    fake_ty.calls(state_path)[-1]["argv"]         # ["create", "T", "--json"]
    fake_ty.write_control(state_path, {"fail_next": 1})   # next call fails

Plugins and the daemon (PATH must then also reach sh and git)::

    env = dict(os.environ, PATH=bin_dir + ":/usr/bin:/bin", TY_PLUGINS_DIR=plugins)
    daemon = subprocess.Popen(["ty", "daemon"], env=env)     # foreground
    url = fake_ty.api_url(state_path)             # waits for <state>.api
    subprocess.run(["ty", "execute", "1"], env=env)         # picked up in ~0.2 s
    fake_ty.finish(state_path, 1, "done")         # how the agent's run ends
    fake_ty.wait_plugin_runs(state_path, 1, kind="hook", event="task.done")
    daemon.send_signal(signal.SIGTERM); daemon.wait()       # exit 0

Where each behaviour comes from (TaskYou: github.com/bborn/taskyou):

- task commands, event_log writes: cmd/task/main.go (create, show, status,
  close, update, execute) and internal/db/tasks.go + internal/db/events.go.
  CreateTask logs task.created (message: title); UpdateTaskStatus, when the
  status really changes, logs task.updated (title) then task.blocked ("status
  change") or task.completed (title); UpdateTask logs task.updated only when
  title, body, status, type or project changed.  Metadata is always ''.  CLI
  commands never run plugin hooks (only the daemon's executor does).
- `ty execute|queue ID [--dangerous] [--permission-mode M]`: cmd/task/main.go
  executeCmd ("Queued task #N: T (auto mode)": a task's permission mode is
  CreateTask's fallback, GlobalDefaultPermissionMode() = auto).
- plugin discovery and validation: internal/hooks/plugins.go.  Plugins dir:
  $TY_PLUGINS_DIR, else os.UserConfigDir()/task/plugins ($XDG_CONFIG_HOME if
  absolute, else $HOME/.config).  A subdir with plugin.yaml is a plugin (not
  descended into); any other real subdir, hidden ones like .git included, is
  searched down to listing depth 4 (plugins at most five levels below the
  dir); symlinked dirs are skipped.  Malformed manifests, a missing name, or
  nothing usable skip the plugin; hooks/actions whose script is missing and
  services without name or command are dropped; each case is one warning in
  plugins.go's words.  Plugins are sorted by name.
- plugin.yaml: gopkg.in/yaml.v3 into hooks.Plugin.  parse_manifest() handles
  block mappings and sequences, one-line flow sequences of scalars (`["A=b"]`),
  plain/'single'/"double" (with YAML escapes) one-line scalars, comments, and
  yaml.v3's decode errors ("yaml: unmarshal errors: line N: cannot unmarshal
  !!seq into string", duplicate keys).  It rejects what it does not model
  (anchors, aliases, tags, block scalars, multi-line scalars, flow mappings,
  complex keys, several documents) as an invalid manifest whose message starts
  "fake ty cannot parse line N" (real ty may accept those: the fake is meant
  to be stricter than yaml.v3, not looser).
- `ty plugins [list|dir|add|remove|rm|uninstall|run]`: cmd/task/plugins.go,
  outputs and errors verbatim ("Error: X" twice on stderr, exit 1; `add` and
  `remove` and `run` have SilenceUsage).  `add` runs the real git: `git clone
  --depth 1 SRC DIR` (local paths and file:// URLs work), `git pull --ff-only`
  in an existing checkout, refuses a non-checkout dir, and rolls back a fresh
  clone holding no usable plugin.
- actions: internal/hooks/actions.go RunAction: the script itself (no shell,
  no arguments), cwd the plugin dir, env = the caller's + TASK_ID, TASK_TITLE,
  TASK_STATUS, TASK_PROJECT, TASK_TYPE, WORKTREE_PATH (only with a task; an
  unknown id or 0 means none) + TASK_PLUGIN_NAME, TASK_PLUGIN_DIR, 60 s timeout
  (SIGKILL to the script), combined stdout+stderr printed (a newline added if
  missing), "action P/A failed: exit status N" on failure.
- `ty daemon`: cmd/task/main.go runDaemon.  flock on <state>.daemon.lock (a
  second daemon: "Error: daemon already running (could not acquire lock)",
  exit 1), pid file <state>.daemon.pid (+ .mode), plugin hooks loaded ONCE at
  start (internal/executor/executor.go NewWithLogging -> hooks.New), executor
  start, HTTP API, services, then SIGINT/SIGTERM -> services.Stop(), API
  shutdown (waits up to 5 s for busy connections: an open stream stays until
  the process exits), exit 0.  `ty daemon stop|status` as in main.go.
- executor: internal/executor/executor.go.  Queued tasks (oldest first) are
  started: started_at, status processing, log "Starting task #N: T", then
  task.started.  The hooks get the executor's copy of the task taken then, so
  TASK_STATUS is "processing" and TASK_TITLE the title at start for every
  later hook (task.done, task.blocked...) of that run.  While running, a status
  set by anyone else is noticed as pollTmuxSession does: backlog -> interrupted
  (no hook), done -> "Task completed" and task.done, queued -> re-queued and
  started again; blocked keeps it running.  finish() decides the rest, with
  executeTask's order of checks (see finish()).  At start (and every 60 s for
  tasks started > 90 s ago), 'processing' tasks nobody runs become blocked with
  reconcileOrphanedTasks' message and task.blocked.
- hooks: internal/hooks/hooks.go Runner.Run / OnStatusChange: one process per
  plugin handling the event, launched in plugin-name order, in the background,
  cwd the plugin dir, env = the daemon's + TASK_ID, TASK_TITLE, TASK_STATUS,
  TASK_PROJECT, TASK_TYPE, TASK_MESSAGE, TASK_EVENT, WORKTREE_PATH,
  TASK_PLUGIN_NAME, TASK_PLUGIN_DIR, killed (SIGKILL, the script only) after
  30 s.  blocked with "fail" or "error" in the message fires task.failed.
- services: internal/hooks/services.go: `sh -c COMMAND` from the plugin dir
  (or its cwd), own process group, env = daemon env + TY_DB_PATH=<state file>
  + TY_API_URL=http://127.0.0.1:PORT + the service's env; Stop: SIGTERM to
  every group, wait up to 5 s for all, then SIGKILL.  Service output goes to
  <state>.services/<plugin>.<service>.log (the real daemon discards it).
- HTTP API on 127.0.0.1 (internal/web): GET /api/board/stream (sse.go:
  initial `event: board` snapshot, event_log MAX(id) checked each second and a
  new snapshot sent when it grew, `event: heartbeat` `data: {}` every 15 s;
  web/server.go's 60 s WriteTimeout ends a stream at its first write after
  60 s), GET /api/board (board.go BuildBoardSnapshot: backlog/processing/
  blocked/done columns, queued folded into backlog, archived left out, at most
  50 tasks per column, "tasks": null when empty), GET /api/tasks/{id}
  (handlers.go: {"logs": [...], "task": taskJSON}, 404 {"error":"task not
  found"}, 400 {"error":"invalid task id"}, times UTC RFC3339), GET
  /api/events (?limit=50 &type &task_id, newest first), OPTIONS (cors()).
  Every other route answers 501 {"error": "fake ty: ... is not modelled"}.

Public helpers: install, calls, tasks, get_task, load_state, locked_state,
write_control, read_control, run; plugin_runs (every hook, action and service
process with argv, cwd, TASK_*/TY_*/WORKTREE_* env, pid, exit/signal/error,
output, start/end times, stop timing), wait_plugin_runs, event_log, task_logs,
api_url, daemon_info, finish, plugins_dir, load_plugins, parse_manifest,
board_snapshot.

Environment: FAKE_TY_STATE (required) is the state file's path; the wrapper
written by install() sets it.  Test-speed overrides (defaults are TaskYou's):
FAKE_TY_API_PORT (0 = any free port, the default; the real one is 8080),
FAKE_TY_API_DISABLED=1 (setting http_api_disabled), FAKE_TY_HOOK_TIMEOUT (30),
FAKE_TY_ACTION_TIMEOUT (60), FAKE_TY_HEARTBEAT_S (15), FAKE_TY_WRITE_TIMEOUT_S
(60; 0 = none), FAKE_TY_POLL_S (executor poll, 0.2; the real worker ticks every
2 s).  Optional control file ``<state>.control`` (JSON) injects failures:
fail, fail_commands, fail_next, fail_message, hang, hang_seconds,
hang_commands, crash_after_create, crash_after, and api_drop (true: the API
resets every new connection and drops open streams with a reset, until
cleared).

Not modelled: the legacy single-script hooks dir and internal/events' scripts
(~/.config/task/hooks), worktrees, tmux sessions and agents (finish() stands in
for them), task dependencies, `ty execute` starting a daemon, the API's other
routes and the embedded web UI, workflows/routines beyond being listed, IPv6 /
all-interface binding (the fake listens on 127.0.0.1 only), and hook processes
still running when the daemon exits are not recorded as finished.
"""

__version__ = "1"
__all__ = [
    "STATE_ENV", "install", "new_state", "load_state", "locked_state", "calls",
    "tasks", "get_task", "write_control", "read_control", "run", "main",
    "plugin_runs", "wait_plugin_runs", "event_log", "task_logs", "api_url", "daemon_info",
    "finish", "plugins_dir", "load_plugins", "parse_manifest", "board_snapshot",
    "FakeTyError", "FINISH_OUTCOMES", "CONTROL_KEYS",
]

import contextlib
import copy
import datetime as _dt
import fcntl
import importlib
import json
import os
import re
import shlex
import stat
import sys
import tempfile
import time


class _LazyModule:
    """A module imported on first use: most `ty` calls never need these, and each
    call is a fresh interpreter."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


select = _LazyModule("select")
shutil = _LazyModule("shutil")
signal = _LazyModule("signal")
socket = _LazyModule("socket")
struct = _LazyModule("struct")
subprocess = _LazyModule("subprocess")
threading = _LazyModule("threading")
_urlparse = _LazyModule("urllib.parse")

# ---------------------------------------------------------------- constants --

STATE_ENV = "FAKE_TY_STATE"
STATE_FORMAT = 1
CONTROL_SUFFIX = ".control"
LOCK_SUFFIX = ".lock"
FAKE_VERSION = "0.0.0-fake"      # what `ty --version` prints
HANG_FOREVER_S = 3600            # "hang": true sleeps this long; tests kill it first
# Exit status for misuse of the fake itself (bad env, corrupt state, bad control
# keys): distinct from ty's own 1 so a broken test setup is never mistaken for a
# rejected call.
FAKE_ERROR_EXIT = 2

DEFAULT_PROJECT = "personal"     # real CreateTask falls back to 'personal'
DEFAULT_EXECUTOR = "claude"      # real CreateTask falls back to 'claude'
TASK_TYPES = ("code", "writing", "thinking")          # built-ins, in sort order
STATUSES = ("backlog", "queued", "processing", "blocked", "done", "archived")
CLOSED_STATUSES = ("done", "archived")                # hidden by `list` by default
LIST_DEFAULT_LIMIT = 50          # -n default
LIST_DB_LIMIT = 100              # what ListTasks uses when limit <= 0
TITLE_FROM_BODY_MAX_BYTES = 50   # fallback title: first body line, cut at 50 bytes

CONTROL_KEYS = frozenset({
    "fail", "fail_commands", "fail_next", "fail_message",
    "hang", "hang_seconds", "hang_commands",
    "crash_after_create", "crash_after",
    "api_drop",
})
DEFAULT_FAIL_MESSAGE = "Error: fake ty: injected failure"

# ------------------------------------------------------------------- errors --


class FakeTyError(Exception):
    """Misuse of the fake itself (not of the ty grammar): exit 2."""


class TyExit(Exception):
    """A ty outcome other than plain success: exit code plus output."""

    def __init__(self, code, stdout="", stderr=""):
        super().__init__(stderr or stdout)
        self.code, self.stdout, self.stderr = code, stdout, stderr


class _FlagError(Exception):
    """pflag parse failure; cobra reports it with the command's usage."""


class _ShowHelp(Exception):
    """-h/--help was given."""

# ------------------------------------------------------------------ helpers --


def _now():
    """Local time to the second, like TaskYou's LocalTime."""
    return _dt.datetime.now().astimezone().replace(microsecond=0)


def _rfc3339(t):
    """Go's time.RFC3339 layout ('Z' for UTC)."""
    s = t.isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def _parse_rfc3339(s):
    return _dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith("Z") else s)


def _human_time(s):
    """Go layout '2006-01-02 15:04:05' of a stored RFC3339 stamp."""
    try:
        return _parse_rfc3339(s).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return str(s)


def _go_json(obj, indent=None):
    """encoding/json output: sorted map keys, UTF-8, HTML-safe escapes."""
    seps = (",", ": ") if indent else (",", ":")
    s = json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent, separators=seps)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _go_quote(s):
    """Approximation of Go's %q for a string."""
    return json.dumps(s, ensure_ascii=False)


def _unescape_newlines(s):
    """TaskYou turns a literal backslash-n in --body into a newline."""
    return s.replace("\\n", "\n")


def _scan_task_id(arg):
    """fmt.Sscanf(arg, "%d"): leading digits are enough ('12abc' is 12)."""
    m = re.match(r"[ \t\r]*([+-]?[0-9]+)(.?)", arg)
    if not m or m.group(2) == "_":
        return None
    n = int(m.group(1))
    return n if -(2 ** 63) <= n < 2 ** 63 else None


def _go_parse_bool(s):
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError("strconv.ParseBool: parsing %s: invalid syntax" % _go_quote(s))


def _go_parse_int(s):
    """strconv.ParseInt(s, 0, 64), as pflag's int flags use."""
    body = s[1:] if s[:1] in "+-" else s
    try:
        if body != body.strip() or not body:
            raise ValueError
        if re.fullmatch(r"0[0-7_]+", body):          # Go base 0: leading 0 is octal
            n = int(body.replace("_", ""), 8)
        else:
            n = int(body, 0)
    except ValueError:
        raise ValueError("strconv.ParseInt: parsing %s: invalid syntax" % _go_quote(s)) from None
    n = -n if s.startswith("-") else n
    if not -(2 ** 63) <= n < 2 ** 63:
        raise ValueError("strconv.ParseInt: parsing %s: value out of range" % _go_quote(s))
    return n

# -------------------------------------------------------------------- store --


def new_state(projects=(DEFAULT_PROJECT,)):
    """An empty state document."""
    return {"format": STATE_FORMAT, "next_id": 1, "call_seq": 0,
            "projects": list(projects), "tasks": [], "calls": [],
            "event_log": [], "next_event_id": 1, "task_logs": [], "next_log_id": 1,
            "plugin_runs": [], "next_run_seq": 1, "executor_requests": [],
            "next_request_seq": 1}


@contextlib.contextmanager
def _lock(state_path):
    """Exclusive flock on <state>.lock: serializes every fake process and helper."""
    fd = os.open(str(state_path) + LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing drops the flock


def _atomic_write_json(path, obj):
    path = str(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load(state_path):
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return new_state()
    except (OSError, ValueError) as e:
        raise FakeTyError("cannot read state file %s: %s" % (state_path, e)) from e
    if not isinstance(state, dict):
        raise FakeTyError("state file %s is not a JSON object" % state_path)
    fresh = new_state()
    for key, value in fresh.items():
        state.setdefault(key, value)
    return state


def _save(state_path, state):
    _atomic_write_json(state_path, state)


def load_state(state_path):
    """The whole state document (a snapshot; takes the lock)."""
    with _lock(state_path):
        return _load(state_path)


@contextlib.contextmanager
def locked_state(state_path):
    """Edit the state under the lock; saved on normal exit (seed tasks, projects...)."""
    with _lock(state_path):
        state = _load(state_path)
        yield state
        _save(state_path, state)


def calls(state_path):
    """Every recorded invocation, oldest first: dicts with argv, exit, stdout, stderr..."""
    return load_state(state_path)["calls"]


def tasks(state_path):
    """All tasks, by id."""
    return sorted(load_state(state_path)["tasks"], key=lambda t: t["id"])


def get_task(state_path, task_id):
    """One task dict, or None."""
    return next((t for t in tasks(state_path) if t["id"] == task_id), None)

# ------------------------------------------------------------------ control --


def _control_path(state_path):
    return str(state_path) + CONTROL_SUFFIX


def _read_control_unlocked(state_path):
    try:
        with open(_control_path(state_path), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    if not text.strip():
        return {}
    try:
        control = json.loads(text)
    except ValueError as e:
        raise FakeTyError("control file %s is not JSON: %s" % (_control_path(state_path), e)) from e
    if not isinstance(control, dict):
        raise FakeTyError("control file %s is not a JSON object" % _control_path(state_path))
    unknown = sorted(set(control) - CONTROL_KEYS)
    if unknown:
        raise FakeTyError("unknown control key(s) %s; known: %s"
                          % (", ".join(unknown), ", ".join(sorted(CONTROL_KEYS))))
    return control


def _write_control_unlocked(state_path, control):
    if control:
        _atomic_write_json(_control_path(state_path), control)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_control_path(state_path))


def read_control(state_path):
    """The current control dict ({} when absent)."""
    with _lock(state_path):
        return _read_control_unlocked(state_path)


def write_control(state_path, control):
    """Replace the control file atomically; None or {} removes it."""
    unknown = sorted(set(control or {}) - CONTROL_KEYS)
    if unknown:
        raise ValueError("unknown control key(s): " + ", ".join(unknown))
    with _lock(state_path):
        _write_control_unlocked(state_path, control)


def _matches(command, names):
    """Does a control command filter name this invocation (alias-aware)?"""
    if not names:
        return False
    wanted = {names} if isinstance(names, str) else set(names)
    canonical = _ALIASES.get(command, command)
    return command in wanted or canonical in wanted


def _plan(control, command):
    """Decide what this call's injected behaviour is; may consume fail_next."""
    plan = {"hang_s": 0.0, "fail": False, "crash": False, "control_changed": False}
    hang_filter = control.get("hang_commands")
    if hang_filter is None or _matches(command, hang_filter):
        if control.get("hang_seconds") is not None:
            plan["hang_s"] = float(control["hang_seconds"])
        elif control.get("hang"):
            plan["hang_s"] = float(HANG_FOREVER_S)
    if control.get("fail") or _matches(command, control.get("fail_commands")):
        plan["fail"] = True
    elif int(control.get("fail_next") or 0) > 0:
        plan["fail"] = True
        control["fail_next"] = int(control["fail_next"]) - 1
        plan["control_changed"] = True
    crash_on = set(control.get("crash_after") or ())
    if control.get("crash_after_create"):
        crash_on.add("create")
    plan["crash"] = bool(crash_on) and _matches(command, crash_on)
    return plan

# ------------------------------------------------------------------ grammar --


class Flag:
    """One pflag flag: long name, optional shorthand, kind str|bool|int."""

    def __init__(self, name, short, kind, default, usage):
        self.name, self.short, self.kind = name, short, kind
        self.default, self.usage = default, usage

    def label(self):
        return "-%s, --%s" % (self.short, self.name) if self.short else "--%s" % self.name

    def convert(self, value):
        if self.kind == "bool":
            return _go_parse_bool(value)
        if self.kind == "int":
            return _go_parse_int(value)
        return value


class Command:
    """One cobra command: names, Use line, arg rule, flags, handler, subcommands."""

    def __init__(self, name, use, short, args_rule, flags, handler, aliases=(),
                 subcommands=(), silence_usage=False):
        self.name, self.use, self.short = name, use, short
        self.args_rule, self.handler, self.aliases = args_rule, handler, tuple(aliases)
        self.flags = list(flags) + [Flag("help", "h", "bool", False, "help for " + name)]
        self.subcommands = list(subcommands)
        self.silence_usage = silence_usage      # cobra SilenceUsage: errors without usage

    def find(self, word):
        """The subcommand named (or aliased) ``word``, if any."""
        return next((c for c in self.subcommands if word == c.name or word in c.aliases), None)


def _exact_args(n):
    def rule(args):
        if len(args) != n:
            return "accepts %d arg(s), received %d" % (n, len(args))
        return None
    return rule


def _max_args(n):
    def rule(args):
        if len(args) > n:
            return "accepts at most %d arg(s), received %d" % (n, len(args))
        return None
    return rule


def _arbitrary_args(args):
    return None


_ROOT_FLAGS = [Flag("help", "h", "bool", False, "help for ty"),
               Flag("version", "v", "bool", False, "version for ty")]


def _parse_flags(flags, argv):
    """pflag interspersed parsing -> (values, changed names, positionals)."""
    by_long = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    values = {f.name: f.default for f in flags}
    changed = set()
    positionals = []
    args = list(argv)

    def set_value(flag, value):
        try:
            values[flag.name] = flag.convert(value)
        except ValueError as e:
            raise _FlagError("invalid argument %s for %s flag: %s"
                             % (_go_quote(value), _go_quote(flag.label()), e)) from None
        changed.add(flag.name)

    while args:
        s = args.pop(0)
        if len(s) < 2 or s[0] != "-":
            positionals.append(s)
            continue
        if s[1] == "-":
            if len(s) == 2:                      # "--" ends flag parsing
                positionals.extend(args)
                break
            name = s[2:]
            if name[0] in "-=":
                raise _FlagError("bad flag syntax: %s" % s)
            name, eq, value = name.partition("=")
            flag = by_long.get(name)
            if flag is None:
                raise _FlagError("unknown flag: --%s" % name)
            if not eq:
                if flag.kind == "bool":
                    value = "true"
                elif args:
                    value = args.pop(0)
                else:
                    raise _FlagError("flag needs an argument: %s" % s)
            set_value(flag, value)
            continue
        shorts = s[1:]
        while shorts:
            c = shorts[0]
            flag = by_short.get(c)
            if flag is None:
                raise _FlagError("unknown shorthand flag: '%s' in -%s" % (c, shorts))
            rest = shorts[1:]
            if len(shorts) > 2 and shorts[1] == "=":
                value, rest = shorts[2:], ""
            elif flag.kind == "bool":
                value = "true"
            elif len(shorts) > 1:
                value, rest = shorts[1:], ""
            elif args:
                value = args.pop(0)
            else:
                raise _FlagError("flag needs an argument: '%s' in -%s" % (c, shorts))
            set_value(flag, value)
            shorts = rest
    if values.get("help"):
        raise _ShowHelp()          # cobra checks --help only after a clean parse
    return values, changed, positionals


def _takes_value(token, flags):
    """cobra's stripFlags rule: does this flag token swallow the next arg?"""
    if "=" in token:
        return False
    by_long = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    if token.startswith("--"):
        flag = by_long.get(token[2:])
        return not (flag and flag.kind == "bool")
    if token.startswith("-") and len(token) == 2:
        flag = by_short.get(token[1:])
        return not (flag and flag.kind == "bool")
    return False


def _positional_indexes(argv, flags):
    """Indexes of non-flag args, as cobra's stripFlags/argsMinusFirstX see them."""
    out = []
    i = 0
    while i < len(argv):
        s = argv[i]
        if s == "--":
            break
        if s.startswith("-"):
            if _takes_value(s, flags):
                i += 1
        elif s:
            out.append(i)
        i += 1
    return out


def _command_token(argv):
    """The subcommand word cobra would look up ('' for the root)."""
    idx = _positional_indexes(argv, _ROOT_FLAGS)
    return argv[idx[0]] if idx else ""


def _usage(cmd):
    """A cobra-like usage block for a command."""
    lines = ["Usage:", "  ty " + cmd.use + " [flags]", ""]
    if cmd.aliases:
        lines += ["Aliases:", "  " + ", ".join((cmd.name,) + cmd.aliases), ""]
    if cmd.subcommands:
        lines += ["Available Commands:"] + ["  %-11s %s" % (c.name, c.short)
                                            for c in cmd.subcommands] + [""]
    lines.append("Flags:")
    for f in cmd.flags:
        left = ("-%s, " % f.short if f.short else "    ") + "--" + f.name
        left += {"str": " string", "int": " int", "bool": ""}[f.kind]
        lines.append("  %-24s %s" % (left, f.usage))
    return "\n".join(lines) + "\n"


def _root_help():
    lines = ["Task queue manager (fake ty for the ty-openworkflow tests)", "",
             "Usage:", "  ty [flags]", "  ty [command]", "", "Available Commands:"]
    for name in sorted(_COMMANDS):
        lines.append("  %-11s %s" % (name, _COMMANDS[name].short))
    lines.append("  %-11s %s" % ("help", "Help about any command"))
    lines += ["", "Flags:", "  -h, --help      help for ty", "  -v, --version   version for ty", "",
              'Use "ty [command] --help" for more information about a command.']
    return "\n".join(lines) + "\n"


def _cobra_error(msg, usage):
    """What cobra + TaskYou's main print for a command error: exit 1."""
    # cobra prints "Error: ..." and the usage; TaskYou's main prints the error again.
    if usage is None:                       # a SilenceUsage command
        raise TyExit(1, "", "Error: %s\nError: %s\n" % (msg, msg))
    raise TyExit(1, "", "Error: %s\n%s\nError: %s\n" % (msg, usage, msg))

# ----------------------------------------------------------------- commands --


def _fail(message):
    """A TaskYou-side rejection: the message on stderr, exit 1."""
    raise TyExit(1, "", message + "\n")


def _task_id(arg):
    task_id = _scan_task_id(arg)
    if task_id is None:
        _fail("Invalid task ID: " + arg)
    return task_id


def _find(state, task_id):
    return next((t for t in state["tasks"] if t.get("id") == task_id), None)


def _require(state, task_id):
    task = _find(state, task_id)
    if task is None:
        _fail("Task #%d not found" % task_id)
    return task


def _check_type(task_type):
    if task_type not in TASK_TYPES:
        _fail("Invalid type. Must be one of: " + ", ".join(TASK_TYPES))


def _record_event(state, event_type, task_id, message):
    """db.recordEvent (internal/db/events.go): one event_log row, metadata ''."""
    event_id = int(state.get("next_event_id") or 1)
    state["next_event_id"] = event_id + 1
    state.setdefault("event_log", []).append({
        "id": event_id, "event_type": event_type, "task_id": task_id, "message": message,
        "metadata": "", "created_at": _rfc3339(_dt.datetime.now(_dt.timezone.utc)
                                               .replace(microsecond=0)),
    })


def _append_task_log(state, task_id, line_type, content, now=None):
    """db.AppendTaskLog: one task_logs row (what GET /api/tasks/{id} lists)."""
    log_id = int(state.get("next_log_id") or 1)
    state["next_log_id"] = log_id + 1
    state.setdefault("task_logs", []).append({
        "id": log_id, "task_id": task_id, "line_type": line_type, "content": content,
        "created_at": now or _rfc3339(_now())})


def _set_status(task, status, now, state=None):
    """db.UpdateTaskStatus: stamps started_at / completed_at like TaskYou.

    With ``state`` it also writes event_log as internal/db/tasks.go does when the
    status really changed: task.updated (message: the title), then task.blocked
    ("status change") or task.completed (the title).
    """
    old = task.get("status", "")
    had_started = bool(task.get("started_at"))
    task["status"] = status
    task["updated_at"] = now
    if status == "processing":
        task["started_at"] = now
    elif status in CLOSED_STATUSES or (status == "blocked" and had_started):
        task["completed_at"] = now
    if state is not None and old and old != status:
        _record_event(state, "task.updated", task["id"], task.get("title", ""))
        if status == "blocked":
            _record_event(state, "task.blocked", task["id"], "status change")
        elif status == "done":
            _record_event(state, "task.completed", task["id"], task.get("title", ""))


def cmd_create(state, opts, changed, args, now):
    """ty create [TITLE] --body -t -p --json."""
    title = args[0] if args else ""
    body = _unescape_newlines(opts["body"])
    if not title.strip() and not body.strip():
        _fail("Error: either title or --body must be provided")
    task_type = opts["type"] or "code"
    _check_type(task_type)
    project = opts["project"] or DEFAULT_PROJECT   # cwd auto-detection is not modelled
    if not title.strip():
        first = body.strip().split("\n")[0]
        raw = first.encode("utf-8", "surrogateescape")
        if len(raw) > TITLE_FROM_BODY_MAX_BYTES:
            first = raw[:TITLE_FROM_BODY_MAX_BYTES].decode("utf-8", "replace") + "..."
        title = first
    if project not in state["projects"]:
        _fail("Error: project not found: " + project)
    task = {
        "id": int(state["next_id"]), "title": title, "body": body, "status": "backlog",
        "type": task_type, "project": project, "executor": DEFAULT_EXECUTOR,
        "worktree": "", "branch": "", "summary": "", "tags": "",
        "created_at": now, "updated_at": now, "started_at": None, "completed_at": None,
    }
    state["next_id"] = task["id"] + 1
    state["tasks"].append(task)
    _record_event(state, "task.created", task["id"], title)      # db.emitTaskCreated
    if opts["json"]:
        keys = ("id", "title", "status", "type", "project", "executor")
        return _go_json({k: task[k] for k in keys}) + "\n"
    return "Created task #%d: %s\n" % (task["id"], title)


def _show_json(task):
    out = {
        "id": task["id"], "title": task.get("title", ""), "body": task.get("body", ""),
        "status": task.get("status", ""), "type": task.get("type", ""),
        "project": task.get("project", ""), "executor": task.get("executor") or DEFAULT_EXECUTOR,
        "worktree": task.get("worktree", ""), "branch": task.get("branch", ""),
        "claude_pane_id": "", "shell_pane_id": "", "summary": task.get("summary", ""),
        "created_at": task.get("created_at", ""), "updated_at": task.get("updated_at", ""),
    }
    for key in ("started_at", "completed_at"):
        if task.get(key):
            out[key] = task[key]
    return _go_json(out, indent=2) + "\n"


def _show_human(task):
    lines = ["Task #%d: %s" % (task["id"], task.get("title", "")), "\u2500" * 50,
             "Status:   " + task.get("status", ""), "Type:     " + task.get("type", "")]
    if task.get("project"):
        lines.append("Project:  " + task["project"])
    lines.append("Created:  " + _human_time(task.get("created_at")))
    if task.get("started_at"):
        lines.append("Started:  " + _human_time(task["started_at"]))
    if task.get("completed_at"):
        lines.append("Completed: " + _human_time(task["completed_at"]))
    if task.get("worktree"):
        lines.append("Worktree: " + task["worktree"])
    if task.get("branch"):
        lines.append("Branch:   " + task["branch"])
    if task.get("body"):
        lines += ["", "Description:", task["body"]]
    if task.get("summary"):
        lines += ["", "Summary:", task["summary"]]
    return "\n".join(lines) + "\n"


def cmd_show(state, opts, changed, args, now):
    """ty show ID [--json]."""
    task = _require(state, _task_id(args[0]))
    return _show_json(task) if opts["json"] else _show_human(task)


def cmd_status(state, opts, changed, args, now):
    """ty status ID STATUS."""
    task_id = _task_id(args[0])
    status = args[1].strip().lower()
    if status not in STATUSES:
        _fail("Invalid status. Must be one of: " + ", ".join(STATUSES))
    _set_status(_require(state, task_id), status, now, state)
    return "Task #%d moved to %s\n" % (task_id, status)


def cmd_close(state, opts, changed, args, now):
    """ty close ID (alias done)."""
    task_id = _task_id(args[0])
    task = _require(state, task_id)
    if task.get("status") == "done":
        return "Task #%d is already done\n" % task_id
    _set_status(task, "done", now, state)
    return "Closed task #%d: %s\n" % (task_id, task.get("title", ""))


def cmd_update(state, opts, changed, args, now):
    """ty update ID [--title] [--body] [-t] [-p] [--tags]: replaces the given fields."""
    task_id = _task_id(args[0])
    if opts["type"]:
        _check_type(opts["type"])
    task = _require(state, task_id)
    before = {k: task.get(k) for k in _UPDATE_EVENT_FIELDS}
    if opts["title"]:
        task["title"] = opts["title"]
    if "body" in changed:
        task["body"] = _unescape_newlines(opts["body"])
    if opts["type"]:
        task["type"] = opts["type"]
    if "project" in changed:
        task["project"] = opts["project"]      # real update does not validate projects
    if "tags" in changed:
        task["tags"] = opts["tags"]
    task["updated_at"] = now
    if any(task.get(k) != before[k] for k in _UPDATE_EVENT_FIELDS):
        _record_event(state, "task.updated", task_id, task.get("title", ""))   # db.UpdateTask
    return "Updated task #%d\n" % task_id


# db.UpdateTask logs task.updated only when one of these changed (not for tags alone).
_UPDATE_EVENT_FIELDS = ("title", "body", "status", "type", "project")


def _permission_mode(task):
    """Task.EffectivePermissionMode; a task the fake created without an explicit mode
    has CreateTask's fallback, GlobalDefaultPermissionMode() == "auto"."""
    return _normalize_permission_mode(task.get("permission_mode") or "auto") or "default"


def _normalize_permission_mode(mode):
    """db.NormalizePermissionMode."""
    mode = mode.strip().lower()
    if mode in ("accept-edits", "accept_edits", "acceptedits"):
        return "accept-edits"
    if mode in ("auto", "dangerous"):
        return mode
    if mode in ("default", "prompt"):
        return "default"
    return ""


_PERMISSION_SUFFIX = {"dangerous": " (dangerous mode)", "auto": " (auto mode)",
                      "accept-edits": " (accept-edits mode)"}


def cmd_execute(state, opts, changed, args, now):
    """ty execute|queue ID [--dangerous] [--permission-mode M] (cmd/task/main.go executeCmd).

    The real command then calls ensureDaemonForQueuedWork() to start a daemon; the
    fake does not: a test starts `ty daemon` itself.
    """
    task_id = _task_id(args[0])
    mode = _normalize_permission_mode(opts["permission-mode"])
    if not mode and opts["dangerous"]:
        mode = "dangerous"
    task = _require(state, task_id)
    if task.get("status") == "queued":
        return "Task #%d is already queued\n" % task_id
    if task.get("status") == "processing":
        return "Task #%d is already processing\n" % task_id
    if mode:
        task["permission_mode"] = mode
        task["updated_at"] = now
    _set_status(task, "queued", now, state)
    suffix = _PERMISSION_SUFFIX.get(_permission_mode(task), "")
    return "Queued task #%d: %s%s\n" % (task_id, task.get("title", ""), suffix)


def _recency_key(task):
    """ListTasks order: done/blocked by completed_at, others by created_at; newest first."""
    closed = task.get("status") in ("done", "blocked")
    ref = task.get("completed_at") if closed else task.get("created_at")
    return (ref or "", task.get("id", 0))


def cmd_list(state, opts, changed, args, now):
    """ty list [--json] [-s STATUS] [-p PROJECT] [-n LIMIT]."""
    status, project, limit = opts["status"], opts["project"], opts["limit"]
    rows = [t for t in state["tasks"]
            if (not status or t.get("status") == status)
            and (not project or t.get("project") == project)
            and (status or t.get("status") not in CLOSED_STATUSES)]
    rows.sort(key=_recency_key, reverse=True)
    rows = rows[:limit if limit > 0 else LIST_DB_LIMIT]
    if opts["json"]:
        if not rows:
            return "null\n"          # Go marshals the nil slice as null
        keys = ("id", "title", "status", "type", "project", "created_at")
        return _go_json([{k: t.get(k, "") for k in keys} for t in rows]) + "\n"
    if not rows:
        return "No tasks found\n"
    out = []
    for t in rows:
        project_tag = "[%s] " % t["project"] if t.get("project") else ""
        out.append("#%-4d %-10s %s%s"
                   % (t["id"], t.get("status", ""), project_tag, t.get("title", "")))
    return "\n".join(out) + "\n"


_S, _B, _I = "str", "bool", "int"
_COMMANDS = {
    "create": Command("create", "create [title]", "Create a new task", _max_args(1), [
        Flag("body", None, _S, "", "Task body/description"),
        Flag("type", "t", _S, "", "Task type: code, writing, thinking (default: code)"),
        Flag("project", "p", _S, "", "Project name"),
        Flag("json", None, _B, False, "Output in JSON format"),
    ], cmd_create),
    "show": Command("show", "show <task-id>", "Show task details", _exact_args(1), [
        Flag("json", None, _B, False, "Output in JSON format"),
    ], cmd_show),
    "status": Command("status", "status <task-id> <status>", "Set a task's status",
                      _exact_args(2), [], cmd_status),
    "close": Command("close", "close <task-id>", "Mark a task as done", _exact_args(1), [],
                     cmd_close, aliases=("done",)),
    "update": Command("update", "update <task-id>", "Update a task", _exact_args(1), [
        Flag("title", None, _S, "", "Update task title"),
        Flag("body", None, _S, "", "Update task body/description"),
        Flag("type", "t", _S, "", "Update task type: code, writing, thinking"),
        Flag("project", "p", _S, "", "Update project name"),
        Flag("tags", None, _S, "", "Update task tags (comma-separated)"),
    ], cmd_update),
    "execute": Command("execute", "execute <task-id>", "Queue a task for execution",
                       _exact_args(1), [
        Flag("dangerous", None, _B, False,
             "Execute in dangerous mode (alias for --permission-mode dangerous)"),
        Flag("permission-mode", None, _S, "", "Override permission mode: default (prompt), "
             "accept-edits (auto-accept file edits), auto (Claude Code auto mode), "
             "dangerous (skip all)"),
    ], cmd_execute, aliases=("queue",)),
    "list": Command("list", "list", "List tasks", _arbitrary_args, [
        Flag("status", "s", _S, "", "Filter by status"),
        Flag("project", "p", _S, "", "Filter by project"),
        Flag("limit", "n", _I, LIST_DEFAULT_LIMIT, "Maximum number of tasks to return"),
        Flag("json", None, _B, False, "Output in JSON format"),
    ], cmd_list),
}
_ALIASES = {alias: cmd.name for cmd in _COMMANDS.values() for alias in cmd.aliases}


def _lookup(name):
    return _COMMANDS.get(_ALIASES.get(name, name))


def run(argv, state, now=None):
    """Run one ty invocation against a state dict -> (exit, stdout, stderr).

    Pure apart from mutating ``state``; on a non-zero exit the caller discards
    the mutation.  Injection and call logging live in the CLI layer.
    """
    now = now or _rfc3339(_now())
    try:
        return 0, _dispatch(list(argv), state, now), ""
    except TyExit as e:
        return e.code, e.stdout, e.stderr


def _dispatch(argv, state, now):
    idx = _positional_indexes(argv, _ROOT_FLAGS)
    token = argv[idx[0]] if idx else None
    if token == "help":
        rest = [argv[i] for i in idx[1:]]
        if not rest:
            return _root_help()
        cmd = _lookup(rest[0])
        if cmd is None:
            return "Unknown help topic %s\n%s" % (_go_quote(rest[0]), _root_help())
        for word in rest[1:]:
            cmd = cmd.find(word) or cmd
        return cmd.short + "\n\n" + _usage(cmd)
    cmd = _lookup(token) if token is not None else None
    if cmd is None:
        if token is not None:        # cobra legacyArgs on a root with subcommands
            msg = "unknown command %s for \"ty\"" % _go_quote(token)
            raise TyExit(1, "", "Error: %s\nRun 'ty --help' for usage.\nError: %s\n" % (msg, msg))
        return _run_root(argv)
    rest = argv[:idx[0]] + argv[idx[0] + 1:]
    while cmd.subcommands:                   # cobra Find: the next non-flag word
        sub_idx = _positional_indexes(rest, cmd.flags)
        sub = cmd.find(rest[sub_idx[0]]) if sub_idx else None
        if sub is None:
            break
        rest = rest[:sub_idx[0]] + rest[sub_idx[0] + 1:]
        cmd = sub
    usage = None if cmd.silence_usage else _usage(cmd)
    try:
        opts, changed, args = _parse_flags(cmd.flags, rest)
    except _ShowHelp:
        return cmd.short + "\n\n" + _usage(cmd)
    except _FlagError as e:
        _cobra_error(str(e), usage)
    problem = cmd.args_rule(args)
    if problem:
        _cobra_error(problem, usage)
    return cmd.handler(state, opts, changed, args, now)


def _run_root(argv):
    root_usage = "Usage:\n  ty [flags]\n  ty [command]\n"
    try:
        opts, _, _ = _parse_flags(_ROOT_FLAGS, argv)
    except _ShowHelp:
        return _root_help()
    except _FlagError as e:
        _cobra_error(str(e), root_usage)
    if opts["version"]:
        return FAKE_VERSION + "\n"
    _fail("Error: fake ty: the interactive TUI (ty with no command) is not available")

# ------------------------------------------------------------ manifest YAML --
#
# plugin.yaml is decoded by gopkg.in/yaml.v3 into hooks.Plugin.  The fake parses
# only the subset manifests use and rejects everything else (as an invalid
# manifest: warning, plugin skipped) instead of guessing what yaml.v3 would do.


class _YamlError(Exception):
    """The manifest does not decode; the message follows yaml.v3's where known."""


def _yaml_unsupported(line, what):
    raise _YamlError("fake ty cannot parse line %d: %s (the fake rejects YAML it "
                     "does not model instead of guessing)" % (line, what))


class _YNode:
    """A YAML node: kind scalar|map|seq; style plain|single|double|flow|block."""

    def __init__(self, kind, line, value="", style="plain"):
        self.kind, self.line, self.value, self.style = kind, line, value, style
        self.items = []          # seq: nodes; map: (key, value) pairs


class _YLine:
    def __init__(self, no, indent, text):
        self.no, self.indent, self.text = no, indent, text


_YAML_NULLS = ("", "~", "null", "Null", "NULL")
_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n",
                 "v": "\v", "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"',
                 "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0", "L": "\u2028",
                 "P": "\u2029"}
_YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _is_seq_entry(text):
    return text == "-" or text.startswith("- ")


def _comment_or_blank(text):
    stripped = text.lstrip(" \t")
    return not stripped or stripped.startswith("#")


class _YamlParser:
    """Block mappings and sequences, one-line flow sequences of scalars, and
    one-line plain / 'single' / "double" scalars, with comments."""

    def __init__(self, text):
        self.lines = []
        started = False
        for no, raw in enumerate(text.split("\n"), 1):
            raw = raw[:-1] if raw.endswith("\r") else raw
            body = raw.lstrip(" ")
            if _comment_or_blank(raw):
                continue
            indent = len(raw) - len(body)
            if body.startswith("\t"):
                raise _YamlError("yaml: line %d: found character that cannot start any token"
                                 % no)
            if not started and body.rstrip() == "---" and indent == 0:
                started = True
                continue
            started = True
            if indent == 0 and (body.startswith("---") or body.startswith("...")):
                _yaml_unsupported(no, "a second document or document marker")
            if indent == 0 and body.startswith("%"):
                _yaml_unsupported(no, "a directive")
            self.lines.append(_YLine(no, indent, body))
        self.i = 0

    # -- structure --

    def parse(self):
        if not self.lines:
            return None
        root = self.block(self.lines[0].indent, None)
        if self.i < len(self.lines):
            raise _YamlError("yaml: line %d: did not find expected key" % self.lines[self.i].no)
        return root

    def block(self, indent, parent_indent):
        line = self.lines[self.i]
        if _is_seq_entry(line.text):
            return self.sequence(indent)
        if self.split_key(line) is not None:
            return self.mapping(indent)
        self.i += 1
        node = self.inline(line.text, line.no)
        self.no_continuation(indent, node)
        return node

    def mapping(self, indent):
        node = _YNode("map", self.lines[self.i].no)
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.indent < indent:
                break
            if line.indent > indent:
                raise _YamlError("yaml: line %d: did not find expected key" % line.no)
            if _is_seq_entry(line.text):
                raise _YamlError("yaml: line %d: did not find expected key" % line.no)
            kv = self.split_key(line)
            if kv is None:
                raise _YamlError("yaml: line %d: could not find expected ':'" % line.no)
            key, rest = kv
            self.i += 1
            node.items.append((key, self.value_after(rest, indent, line.no, True)))
        return node

    def sequence(self, indent):
        node = _YNode("seq", self.lines[self.i].no)
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.indent < indent or not _is_seq_entry(line.text):
                if line.indent > indent:
                    raise _YamlError("yaml: line %d: did not find expected '-' indicator"
                                     % line.no)
                break
            if line.indent > indent:
                raise _YamlError("yaml: line %d: did not find expected '-' indicator" % line.no)
            rest = line.text[1:]
            content = rest.lstrip(" ")
            if "\t" in rest[:len(rest) - len(content) + 1] and content.startswith("\t"):
                _yaml_unsupported(line.no, "a tab after '-'")
            if _comment_or_blank(content):
                self.i += 1
                node.items.append(self.value_after("", indent, line.no, False))
                continue
            # The item's content becomes a virtual line at its own column, so an
            # inline "- key: v" continues as a mapping on the following lines.
            column = indent + len(rest) - len(content) + 1
            self.lines[self.i] = _YLine(line.no, column, content)
            node.items.append(self.block(column, indent))
        return node

    def value_after(self, rest, indent, line_no, same_indent_seq):
        """The value of `key:` / `-` whose inline remainder is ``rest``."""
        text = rest.lstrip(" ")
        if not _comment_or_blank(text):
            if text.startswith("\t"):
                _yaml_unsupported(line_no, "a tab before a value")
            node = self.inline(text, line_no)
            self.no_continuation(indent, node)
            return node
        if self.i < len(self.lines):
            nxt = self.lines[self.i]
            if nxt.indent > indent:
                return self.block(nxt.indent, indent)
            if same_indent_seq and nxt.indent == indent and _is_seq_entry(nxt.text):
                return self.sequence(indent)
        return _YNode("scalar", line_no, "", "plain")          # empty value: null

    def no_continuation(self, indent, node):
        """A more-indented line after a one-line value would continue it."""
        if self.i < len(self.lines) and self.lines[self.i].indent > indent:
            nxt = self.lines[self.i]
            if self.split_key(nxt) is not None:
                raise _YamlError("yaml: line %d: mapping values are not allowed in this "
                                 "context" % nxt.no)
            _yaml_unsupported(nxt.no, "a value continued on the next line")

    # -- one line --

    def split_key(self, line):
        """(key node, remainder after ':') when the line is `key: ...`, else None."""
        text = line.text
        if text[0] in "'\"":
            key, end = self.quoted(text, 0, line.no)
            after = text[end:]
            stripped = after.lstrip(" ")
            if stripped.startswith(":") and (len(stripped) == 1 or stripped[1] in " \t"):
                return key, stripped[1:]
            return None
        if text.startswith("? ") or text == "?":
            _yaml_unsupported(line.no, "a complex mapping key")
        if text[0] in "[{":
            return None
        j = 0
        while True:
            j = text.find(":", j)
            if j < 0:
                return None
            hash_at = text.find(" #")
            if 0 <= hash_at < j:
                return None
            if j + 1 == len(text) or text[j + 1] in " \t":
                break
            j += 1
        raw_key = text[:j].rstrip(" ")
        if not raw_key:
            _yaml_unsupported(line.no, "an empty mapping key")
        if "\t" in raw_key:
            _yaml_unsupported(line.no, "a tab in a mapping key")
        key = self.plain(raw_key, line.no, flow=False)
        return key, text[j + 1:]

    def inline(self, text, line_no):
        """A one-line value: quoted or plain scalar, or a flow sequence of scalars."""
        first = text[0]
        if first in "'\"":
            node, end = self.quoted(text, 0, line_no)
            self.only_comment(text[end:], line_no)
            return node
        if first == "[":
            return self.flow_seq(text, line_no)
        if first == "{":
            stripped = text.split(" #", 1)[0].strip()
            if stripped.replace(" ", "") == "{}":
                return _YNode("map", line_no, style="flow")
            _yaml_unsupported(line_no, "a flow mapping")
        if first in "|>":
            _yaml_unsupported(line_no, "a block scalar ('%s')" % first)
        if first in "&*!":
            _yaml_unsupported(line_no, {"&": "an anchor", "*": "an alias", "!": "a tag"}[first])
        value = text.split(" #", 1)[0].rstrip(" \t")
        return self.plain(value, line_no, flow=False)

    def plain(self, value, line_no, flow):
        first = value[0]
        if first in "@`%":
            raise _YamlError("yaml: line %d: found character that cannot start any token"
                             % line_no)
        if first in "&*!|>":
            _yaml_unsupported(line_no, "an anchor, alias, tag or block scalar")
        if first in "]},#" or (first in "-?:" and (len(value) == 1 or value[1] in " \t")):
            if first == "-":
                raise _YamlError("yaml: line %d: block sequence entries are not allowed in "
                                 "this context" % line_no)
            _yaml_unsupported(line_no, "an indicator (%r) starting a plain scalar" % first)
        if ": " in value or value.endswith(":") or ":\t" in value:
            raise _YamlError("yaml: line %d: mapping values are not allowed in this context"
                             % line_no)
        if flow and any(c in value for c in "[]{},"):
            _yaml_unsupported(line_no, "a flow indicator inside a flow scalar")
        return _YNode("scalar", line_no, value, "plain")

    def quoted(self, text, start, line_no):
        """A quoted scalar starting at text[start] -> (node, index after it)."""
        quote = text[start]
        out = []
        i = start + 1
        while i < len(text):
            c = text[i]
            if quote == "'" and c == "'":
                if text[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return _YNode("scalar", line_no, "".join(out), "single"), i + 1
            if quote == '"' and c == '"':
                return _YNode("scalar", line_no, "".join(out), "double"), i + 1
            if quote == '"' and c == "\\":
                esc = text[i + 1:i + 2]
                if esc in _YAML_ESCAPES:
                    out.append(_YAML_ESCAPES[esc])
                    i += 2
                    continue
                if esc in _YAML_HEX_ESCAPES:
                    width = _YAML_HEX_ESCAPES[esc]
                    digits = text[i + 2:i + 2 + width]
                    if len(digits) != width or not all(
                            d in "0123456789abcdefABCDEF" for d in digits):
                        raise _YamlError("yaml: line %d: did not find expected hexdecimal "
                                         "number" % line_no)
                    code = int(digits, 16)
                    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                        raise _YamlError("yaml: line %d: found invalid Unicode character "
                                         "escape code" % line_no)
                    out.append(chr(code))
                    i += 2 + width
                    continue
                if esc == "":
                    _yaml_unsupported(line_no, "a double-quoted scalar continued on the "
                                      "next line")
                raise _YamlError("yaml: line %d: found unknown escape character while "
                                 "parsing a quoted scalar" % line_no)
            out.append(c)
            i += 1
        _yaml_unsupported(line_no, "a quoted scalar continued on the next line")

    def only_comment(self, rest, line_no):
        stripped = rest.lstrip(" \t")
        if not stripped:
            return
        if stripped.startswith("#") and rest[:1] in (" ", "\t"):
            return
        if stripped.startswith(":"):
            raise _YamlError("yaml: line %d: mapping values are not allowed in this context"
                             % line_no)
        raise _YamlError("yaml: line %d: did not find expected key" % line_no)

    def flow_seq(self, text, line_no):
        node = _YNode("seq", line_no, style="flow")
        i = 1
        expect_item = True
        while True:
            while i < len(text) and text[i] == " ":
                i += 1
            if i >= len(text):
                _yaml_unsupported(line_no, "a flow sequence continued on the next line")
            c = text[i]
            if c == "]":
                self.only_comment(text[i + 1:], line_no)
                return node
            if c == ",":
                if expect_item:
                    raise _YamlError("yaml: line %d: did not find expected node content"
                                     % line_no)
                expect_item = True
                i += 1
                continue
            if not expect_item:
                raise _YamlError("yaml: line %d: did not find expected ',' or ']'" % line_no)
            if c in "[{":
                _yaml_unsupported(line_no, "a nested flow collection")
            if c in "'\"":
                item, i = self.quoted(text, i, line_no)
            else:
                j = i
                while j < len(text) and text[j] not in ",]" and text[j:j + 2] != " #":
                    j += 1
                raw = text[i:j].rstrip(" ")
                if j >= len(text) or text[j:j + 2] == " #":
                    _yaml_unsupported(line_no, "a flow sequence continued on the next line")
                item = self.plain(raw, line_no, flow=True)
                i = j
            node.items.append(item)
            expect_item = False


def _yaml_tag(node):
    """The short tag yaml.v3 resolves a node to (for its error messages)."""
    if node.kind != "scalar":
        return "!!" + node.kind
    if node.style != "plain":
        return "!!str"
    v = node.value
    if v in _YAML_NULLS:
        return "!!null"
    if v in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return "!!bool"
    if re.fullmatch(r"[-+]?(0|[1-9][0-9_]*|0b[01_]+|0o?[0-7_]+|0x[0-9a-fA-F_]+)", v):
        return "!!int"
    if re.fullmatch(r"[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?", v) \
            or v in (".inf", "-.inf", "+.inf", ".Inf", ".INF", ".nan", ".NaN", ".NAN"):
        return "!!float"
    return "!!str"


def _is_null(node):
    return node is None or (node.kind == "scalar" and node.style == "plain"
                            and node.value in _YAML_NULLS)


class _ManifestDecoder:
    """yaml.v3's decoder for hooks.Plugin: scalars into strings keep their text,
    type mismatches and duplicate keys become 'unmarshal errors'."""

    def __init__(self):
        self.errors = []

    def terror(self, node, into):
        value = ""
        if node.kind == "scalar":
            value = node.value
            value = " `%s`" % (value[:7] + "..." if len(value) > 10 else value)
        self.errors.append("line %d: cannot unmarshal %s%s into %s"
                           % (node.line, _yaml_tag(node), value, into))

    def string(self, node):
        if _is_null(node):
            return ""
        if node.kind != "scalar":
            self.terror(node, "string")
            return ""
        return node.value

    def struct(self, node, type_name, fields):
        """Decode a mapping into a struct: {field: decoder}; unknown keys ignored."""
        out = {name: None for name in fields}
        if _is_null(node):
            return out
        if node.kind != "map":
            self.terror(node, type_name)
            return None
        done = set()
        for key, value in node.items:
            name = key.value if key.kind == "scalar" else None
            if name not in fields:
                continue
            if name in done:
                self.errors.append("line %d: field %s already set in type %s"
                                   % (key.line, name, type_name))
                continue
            done.add(name)
            out[name] = fields[name](value)
        return out

    def string_map(self, node):
        if _is_null(node):
            return None
        if node.kind != "map":
            self.terror(node, "map[string]string")
            return None
        for i, (ki, _) in enumerate(node.items):
            for kj, _ in node.items[i + 1:]:
                if ki.kind == kj.kind and ki.value == kj.value:
                    self.errors.append("line %d: mapping key %s already defined at line %d"
                                       % (kj.line, _go_quote(kj.value), ki.line))
        out = {}
        for key, value in node.items:
            out[self.string(key)] = self.string(value)
        return out

    def slice_of(self, node, type_name, item):
        if _is_null(node):
            return None
        if node.kind != "seq":
            self.terror(node, "[]" + type_name)
            return None
        out = []
        for child in node.items:
            decoded = item(child)
            if decoded is not None:
                out.append(decoded)
        return out

    def action(self, node):
        return self.struct(node, "hooks.Action", {
            "id": self.string, "label": self.string, "command": self.string})

    def service(self, node):
        return self.struct(node, "hooks.Service", {
            "name": self.string, "command": self.string, "cwd": self.string,
            "env": lambda n: self.slice_of(n, "string", self.string)})

    def plugin(self, root):
        return self.struct(root, "hooks.Plugin", {
            "name": self.string, "version": self.string, "description": self.string,
            "hooks": self.string_map,
            "actions": lambda n: self.slice_of(n, "hooks.Action", self.action),
            "services": lambda n: self.slice_of(n, "hooks.Service", self.service),
        })


def parse_manifest(text):
    """plugin.yaml text -> dict like hooks.Plugin (name, version, description,
    hooks, actions, services); raises ValueError with yaml.v3's kind of message."""
    try:
        root = _YamlParser(text).parse()
    except _YamlError as e:
        raise ValueError(str(e)) from None
    decoder = _ManifestDecoder()
    plugin = decoder.plugin(root)
    if decoder.errors:
        raise ValueError("yaml: unmarshal errors:\n  " + "\n  ".join(decoder.errors))
    for key in ("name", "version", "description"):
        plugin[key] = plugin[key] or ""
    for key in ("actions", "services"):
        plugin[key] = [{k: (v if v is not None else ("" if k != "env" else None))
                        for k, v in item.items()} for item in plugin[key] or []]
    return plugin

# ------------------------------------------------------------------ plugins --

PLUGINS_DIR_ENV = "TY_PLUGINS_DIR"
MANIFEST_NAME = "plugin.yaml"
MAX_PLUGIN_DEPTH = 4             # internal/hooks/plugins.go maxPluginDepth
ACTION_TIMEOUT_S = 60.0          # internal/hooks/actions.go ActionTimeout
HOOK_TIMEOUT_S = 30.0            # internal/hooks/hooks.go runScript
SERVICE_STOP_WAIT_S = 5.0        # internal/hooks/services.go Stop
ACTION_TIMEOUT_ENV = "FAKE_TY_ACTION_TIMEOUT"
HOOK_TIMEOUT_ENV = "FAKE_TY_HOOK_TIMEOUT"
# What a plugin_runs record keeps of a child's environment.
RECORDED_ENV_PREFIXES = ("TASK_", "TY_", "WORKTREE_")


def _go_clean(path):
    """filepath.Clean."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    out = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    cleaned = ("/" if rooted else "") + "/".join(out)
    return cleaned or ("/" if rooted else ".")


def _go_join(*elems):
    """filepath.Join: empty elements ignored, result cleaned, '' if all empty."""
    parts = [e for e in elems if e != ""]
    return _go_clean("/".join(parts)) if parts else ""


def _go_base(path):
    """filepath.Base."""
    if path == "":
        return "."
    path = path.rstrip("/")
    if path == "":
        return "/"
    return path.rsplit("/", 1)[-1]


def _env_float(name, default):
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise FakeTyError("%s must be a number of seconds, not %r" % (name, value)) from None


def _user_config_dir(environ):
    """os.UserConfigDir on Linux -> (dir, error)."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg:
        if not xdg.startswith("/"):
            return "", "path in $XDG_CONFIG_HOME is relative"
        return xdg, None
    home = environ.get("HOME", "")
    if not home:
        return "", "neither $XDG_CONFIG_HOME nor $HOME are defined"
    return home + "/.config", None


def plugins_dir(environ=None):
    """hooks.DefaultPluginsDir: $TY_PLUGINS_DIR, else <UserConfigDir>/task/plugins."""
    environ = os.environ if environ is None else environ
    if environ.get(PLUGINS_DIR_ENV):
        return environ[PLUGINS_DIR_ENV]
    config, err = _user_config_dir(environ)
    return "" if err else _go_join(config, "task", "plugins")


def _go_errno(e):
    """A Go syscall.Errno string (lower-case strerror)."""
    text = os.strerror(e.errno) if e.errno else str(e)
    return text[:1].lower() + text[1:]


def _is_regular_target(path):
    """plugins.go isExecutableFile: exists (following links) and is not a dir."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _dir_exists(path):
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def load_plugins(root):
    """hooks.LoadPlugins -> (plugins sorted by name, warnings)."""
    if root == "":
        return [], []
    plugins, warnings = _discover_plugins(root, 0)
    plugins.sort(key=lambda p: p["name"])
    return plugins, warnings


def _discover_plugins(directory, depth):
    """discoverPluginsIn: a subdir holding plugin.yaml is a plugin (not descended
    into); any other subdir (hidden ones such as .git included) is a collection,
    searched while depth <= 4.  Entries are read in name order; only real
    directories count (a symlink to a directory is skipped, as DirEntry.IsDir)."""
    if depth > MAX_PLUGIN_DEPTH:
        return [], []
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except FileNotFoundError:
        return [], []
    except NotADirectoryError:
        return [], ["read plugins dir %s: readdirent %s: not a directory" % (directory, directory)]
    except OSError as e:
        return [], ["read plugins dir %s: open %s: %s" % (directory, directory, _go_errno(e))]
    plugins, warnings = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if not is_dir:
            continue
        sub = _go_join(directory, entry.name)
        try:
            os.stat(os.path.join(sub, MANIFEST_NAME))
            has_manifest = True
        except OSError:
            has_manifest = False
        if has_manifest:
            plugin, warning = _load_plugin(sub)
            if warning:
                warnings.append(warning)
            if plugin is not None:
                plugins.append(plugin)
            continue
        nested, nested_warnings = _discover_plugins(sub, depth + 1)
        plugins += nested
        warnings += nested_warnings
    return plugins, warnings


def _discover_named(directory, want_dir_with=None, exts=None):
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError:
        return []
    names = []
    for e in entries:
        try:
            is_dir = e.is_dir(follow_symlinks=False)          # DirEntry.IsDir
        except OSError:
            continue
        if exts is not None and not is_dir:
            stem, ext = os.path.splitext(e.name)
            if ext in exts:
                names.append(stem)
        elif want_dir_with is not None and is_dir:
            if os.path.exists(os.path.join(directory, e.name, want_dir_with)):
                names.append(e.name)
    return sorted(names)


def _load_plugin(directory):
    """loadPlugin -> (plugin dict or None, warning or '')."""
    base = _go_base(directory)
    manifest = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(manifest, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, ""
    except IsADirectoryError:
        return None, "plugin %s: read manifest: read %s: is a directory" % (base, manifest)
    except OSError as e:
        return None, "plugin %s: read manifest: open %s: %s" % (base, manifest, _go_errno(e))
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            text = text[1:]
        plugin = parse_manifest(text)
    except UnicodeDecodeError:
        return None, "plugin %s: invalid %s: yaml: invalid UTF-8" % (base, MANIFEST_NAME)
    except ValueError as e:
        return None, "plugin %s: invalid %s: %s" % (base, MANIFEST_NAME, e)
    plugin["dir"] = directory
    if plugin["name"] == "":
        return None, "plugin %s: manifest is missing a name" % base
    plugin["workflows"] = _discover_named(os.path.join(directory, "workflows"),
                                          exts=(".yaml", ".yml"))
    plugin["routines"] = _discover_named(os.path.join(directory, "routines"),
                                         want_dir_with="prompt.md")
    hooks = plugin["hooks"] or {}
    quoted = _go_quote(plugin["name"])

    def usable():
        return hooks or plugin["actions"] or plugin["workflows"] or plugin["services"] \
            or plugin["routines"]

    if not usable():
        return None, ("plugin %s: manifest declares no hooks, actions, workflows, services, "
                      "or routines; skipping" % quoted)
    dropped = []
    for event, rel in list(hooks.items()):
        if not _is_regular_target(_go_join(directory, rel)):
            del hooks[event]
            dropped.append("hook:" + event)
    kept = []
    for action in plugin["actions"]:
        if not action["id"] or not action["command"]:
            dropped.append("action:<malformed>")
        elif not _is_regular_target(_go_join(directory, action["command"])):
            dropped.append("action:" + action["id"])
        else:
            kept.append(action)
    plugin["actions"] = kept
    kept = []
    for service in plugin["services"]:
        if not service["name"] or not service["command"]:
            dropped.append("service:<malformed>")
        else:
            kept.append(service)
    plugin["services"] = kept
    plugin["hooks"] = hooks
    if not usable():
        return None, ("plugin %s: no usable hook, action, workflow, service, or routine found; "
                      "skipping" % quoted)
    if dropped:
        return plugin, ("plugin %s: ignored entries with missing/invalid scripts: [%s]"
                        % (quoted, " ".join(sorted(dropped))))
    return plugin, ""

# ------------------------------------------------------ processes (os/exec) --


def _go_exit_error(returncode):
    """What exec's ExitError says: 'exit status N' or 'signal: killed'."""
    if returncode is None or returncode == 0:
        return None
    if returncode < 0:
        try:
            name = signal.strsignal(-returncode) or "signal %d" % -returncode
        except ValueError:
            name = "signal %d" % -returncode
        return "signal: " + name[:1].lower() + name[1:]
    return "exit status %d" % returncode


def _go_start_error(path, cwd, err, checked_dir=True):
    """exec.Cmd.Start's error for a process that could not start."""
    if checked_dir and cwd and not os.path.isdir(cwd):
        return "chdir %s: no such file or directory" % cwd
    return "fork/exec %s: %s" % (path, _go_errno(err))


def _recorded_env(env):
    return {k: v for k, v in sorted(env.items()) if k.startswith(RECORDED_ENV_PREFIXES)}


def _stamp():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class _GoCommand:
    """exec.CommandContext(ctx, script) + CombinedOutput with a timeout: no shell,
    no arguments, stdin /dev/null, stdout and stderr one pipe; on timeout only the
    process itself gets SIGKILL and output is read until EOF (so a grandchild
    holding the pipe keeps the call waiting, as Go's Wait does)."""

    def __init__(self, argv, cwd, env, timeout_s):
        self.argv, self.cwd, self.env, self.timeout_s = argv, cwd, env, timeout_s
        self.proc = None
        self.timed_out = False
        self.start_error = None
        self.started_at = self.ended_at = None
        self._t0 = None

    def start(self):
        self.started_at = _stamp()
        self._t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd or None, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, close_fds=True)
        except OSError as e:
            self.start_error = _go_start_error(self.argv[0], self.cwd, e)
            self.ended_at = self.started_at
        return self

    def _kill(self):
        self.timed_out = True
        with contextlib.suppress(OSError):
            self.proc.kill()

    def wait(self):
        """-> the fields a plugin_runs record gets when the process is over."""
        output = b""
        returncode = None
        if self.proc is not None:
            timer = threading.Timer(self.timeout_s, self._kill)
            timer.daemon = True
            timer.start()
            try:
                output = self.proc.stdout.read()
                returncode = self.proc.wait()
            finally:
                timer.cancel()
                self.proc.stdout.close()
            self.ended_at = _stamp()
        error = self.start_error or _go_exit_error(returncode)
        return {
            "pid": self.proc.pid if self.proc else None,
            "exit": returncode if returncode is None or returncode >= 0 else None,
            "signal": -returncode if returncode is not None and returncode < 0 else None,
            "error": error, "timed_out": self.timed_out,
            "output": output.decode("utf-8", "replace"),
            "started_at": self.started_at, "ended_at": self.ended_at,
            "duration_s": round(time.monotonic() - self._t0, 3),
            "state": "exited" if self.proc is not None else "failed_to_start",
        }


def _task_env(task):
    """The TASK_* block hooks.taskEnv / hooks.ActionEnv build from a db.Task."""
    return [("TASK_ID", "%d" % task["id"]), ("TASK_TITLE", task.get("title", "")),
            ("TASK_STATUS", task.get("status", "")), ("TASK_PROJECT", task.get("project", "")),
            ("TASK_TYPE", task.get("type", ""))]


def _action_env(plugin, task):
    """hooks.ActionEnv: os.Environ() + TASK_* (only with a task) + TASK_PLUGIN_*."""
    env = dict(os.environ)
    if task is not None:
        env.update(_task_env(task))
        env["WORKTREE_PATH"] = task.get("worktree", "")
    env["TASK_PLUGIN_NAME"] = plugin["name"]
    env["TASK_PLUGIN_DIR"] = plugin["dir"]
    return env


def _new_run(state, record):
    """Append a plugin_runs record (assigning its seq) and return the seq."""
    seq = int(state.get("next_run_seq") or 1)
    state["next_run_seq"] = seq + 1
    record = dict(record, seq=seq)
    state.setdefault("plugin_runs", []).append(record)
    return seq


def _update_run(state, seq, fields):
    for run_ in reversed(state.get("plugin_runs", [])):
        if run_.get("seq") == seq:
            run_.update(fields)
            return


# The CLI layer runs `plugins` and `daemon` without holding the state lock (an
# action may itself call `ty`); their state writes go through _store().
_ACTIVE = {"state_path": None}


def _store(state, fn):
    """Apply fn(state) to the live state file (locked) or, in-process, to ``state``."""
    path = _ACTIVE["state_path"]
    if path is None:
        return fn(state)
    with _lock(path):
        fresh = _load(path)
        result = fn(fresh)
        _save(path, fresh)
    return result

# -------------------------------------------------------- `ty plugins` group --


def _rune_error(message, stdout="", stderr=""):
    """A cobra RunE error on a SilenceUsage command: cobra prints 'Error: ...' and
    TaskYou's main prints it again; exit 1."""
    raise TyExit(1, stdout, stderr + "Error: %s\nError: %s\n" % (message, message))


def _warnings_text(warnings):
    return "".join("warning: %s\n" % w for w in warnings)


def cmd_plugins_list(state, opts, changed, args, now):
    """ty plugins / plugins list (cmd/task/plugins.go listPlugins)."""
    directory = plugins_dir()
    plugins, warnings = load_plugins(directory)
    err = _warnings_text(warnings)
    if not plugins:
        out = ("No plugins installed in %s\nAdd one by creating <name>/plugin.yaml there. "
               "See docs/plugins.md.\n" % directory)
        raise TyExit(0, out, err)
    lines = ["Plugins in %s:" % directory, ""]
    for p in plugins:
        lines.append("  %s (%s)" % (p["name"], p["version"] or "\u2014"))
        if p["description"]:
            lines.append("    " + p["description"])
        for event in sorted(p["hooks"]):
            lines.append("    hook   %-18s \u2192 %s" % (event, p["hooks"][event]))
        for a in p["actions"]:
            lines.append("    action %-18s \u2192 %s  (ty plugins run %s %s)"
                         % (a["label"] or a["id"], a["command"], p["name"], a["id"]))
        for w in p["workflows"]:
            lines.append('    workflow %-16s (ty pipeline -d %s "<goal>")' % (w, w))
        for s in p["services"]:
            lines.append("    service  %-16s \u2192 %s  (supervised while the daemon runs)"
                         % (s["name"], s["command"]))
        for r in p["routines"]:
            lines.append("    routine  %-16s (ty run %s)" % (r, r))
        lines.append("")
    raise TyExit(0, "\n".join(lines) + "\n", err)


def cmd_plugins_dir(state, opts, changed, args, now):
    """ty plugins dir."""
    return plugins_dir() + "\n"


def _run_git(cwd, *args):
    """runGit: git with combined output -> (error or None, output)."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd or None, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        return 'exec: "git": executable file not found in $PATH', ""
    except OSError as e:
        return "fork/exec git: " + _go_errno(e), ""
    return _go_exit_error(proc.returncode), proc.stdout.decode("utf-8", "replace")


def _derive_plugin_name(source):
    """derivePluginName."""
    s = source.rstrip("/")
    if s.endswith(".git"):
        s = s[:-4]
    return _go_base(s)


def cmd_plugins_add(state, opts, changed, args, now):
    """ty plugins add <git-url|path> [--name N] (addPlugin)."""
    source = args[0]
    name = opts["name"] or _derive_plugin_name(source)
    directory = plugins_dir()
    if directory == "":
        _rune_error("create plugins dir: mkdir : no such file or directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        _rune_error("create plugins dir: mkdir %s: %s" % (e.filename or directory, _go_errno(e)))
    target = _go_join(directory, name)
    updated = False
    if _dir_exists(os.path.join(target, ".git")):
        err, out = _run_git(target, "pull", "--ff-only")
        if err:
            _rune_error("update %s: %s\n%s" % (name, err, out))
        updated = True
    elif _dir_exists(target):
        _rune_error("%s already exists and is not a git checkout; remove it or use --name"
                    % target)
    else:
        err, out = _run_git("", "clone", "--depth", "1", source, target)
        if err:
            _rune_error("clone %s: %s\n%s" % (source, err, out))
    plugins, _ = load_plugins(directory)
    installed = sorted(p["name"] for p in plugins
                       if p["dir"] == target or p["dir"].startswith(target + "/"))
    if not installed:
        if not updated:
            shutil.rmtree(target, ignore_errors=True)
        _rune_error("%s contains no usable plugins (need a plugin.yaml with a hook, action, "
                    "or workflow)" % source)
    return ("%s %d plugin(s): %s. Run `ty plugins list` to see what they provide.\n"
            % ("Updated" if updated else "Installed", len(installed), ", ".join(installed)))


def cmd_plugins_remove(state, opts, changed, args, now):
    """ty plugins remove|rm|uninstall <name> (removePlugin)."""
    name = args[0]
    directory = plugins_dir()
    if directory == "":
        _rune_error("no plugins directory configured")
    plugins, _ = load_plugins(directory)
    match = next((p for p in plugins if p["name"] == name or _go_base(p["dir"]) == name), None)
    if match is None:
        _rune_error("no plugin named %s installed in %s; run `ty plugins list` to see what's "
                    "installed" % (_go_quote(name), directory))
    target = match["dir"]
    rel = os.path.relpath(target, directory)
    if rel in (".", "..") or rel.startswith("../"):
        _rune_error("refusing to remove %s: not inside plugins dir %s" % (target, directory))
    in_checkout = False
    if not _dir_exists(os.path.join(target, ".git")):
        parent = os.path.dirname(target)
        while len(parent) > len(directory):
            if _dir_exists(os.path.join(parent, ".git")):
                in_checkout = True
                break
            parent = os.path.dirname(parent)
    try:
        shutil.rmtree(target)
    except OSError as e:
        _rune_error("remove %s: %s" % (target, e))
    out = "Removed plugin %s (%s).\n" % (_go_quote(name), target)
    if in_checkout:
        out += ("Note: it was part of a shared git checkout; its sibling plugins remain, "
                "and re-adding that source may restore it.\n")
    return out


def _parse_int10(s):
    """strconv.ParseInt(s, 10, 64)."""
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise ValueError("strconv.ParseInt: parsing %s: invalid syntax" % _go_quote(s))
    n = int(s)
    if not -(2 ** 63) <= n < 2 ** 63:
        raise ValueError("strconv.ParseInt: parsing %s: value out of range" % _go_quote(s))
    return n


def cmd_plugins_run(state, opts, changed, args, now):
    """ty plugins run <plugin> <action> [task-id] (runPluginAction + hooks.RunAction)."""
    plugin_name, action_id = args[0], args[1]
    task_id = 0
    if len(args) == 3:
        try:
            task_id = _parse_int10(args[2])
        except ValueError as e:
            _rune_error("invalid task id %s: %s" % (_go_quote(args[2]), e))
    plugins, warnings = load_plugins(plugins_dir())
    err = _warnings_text(warnings)
    plugin = next((p for p in plugins if p["name"] == plugin_name), None)
    if plugin is None:
        _rune_error("no plugin named %s" % _go_quote(plugin_name), stderr=err)
    action = next((a for a in plugin["actions"] if a["id"] == action_id), None)
    if action is None:
        _rune_error("plugin %s has no action %s" % (_go_quote(plugin_name), _go_quote(action_id)),
                    stderr=err)
    # db.GetTask of a missing id is (nil, nil): the action then runs without a task.
    task = copy.deepcopy(_find(state, task_id)) if task_id != 0 else None
    script = _go_join(plugin["dir"], action["command"])
    if not _is_regular_target(script):
        _rune_error("action %s/%s failed: action %s: script %s not found"
                    % (plugin_name, action_id, _go_quote(action_id), action["command"]),
                    stderr=err)
    env = _action_env(plugin, task)
    command = _GoCommand([script], plugin["dir"], env,
                         _env_float(ACTION_TIMEOUT_ENV, ACTION_TIMEOUT_S))
    record = {"kind": "action", "plugin": plugin["name"], "action": action_id,
              "task_id": task["id"] if task else None, "argv": [script], "cwd": plugin["dir"],
              "env": _recorded_env(env), "pid": None, "state": "running"}
    command.start()
    record["pid"] = command.proc.pid if command.proc else None
    record["started_at"] = command.started_at
    seq = _store(state, lambda s: _new_run(s, record))
    result = command.wait()
    _store(state, lambda s: _update_run(s, seq, result))
    out = result["output"]
    if out and not out.endswith("\n"):
        out += "\n"
    if result["error"]:
        _rune_error("action %s/%s failed: %s" % (plugin_name, action_id, result["error"]),
                    stdout=out, stderr=err)
    raise TyExit(0, out, err)

# ------------------------------------------------------------------- daemon --

DAEMON_LOCK_SUFFIX = ".daemon.lock"      # runDaemon: flock on <pidfile>.lock
DAEMON_PID_SUFFIX = ".daemon.pid"
API_URL_SUFFIX = ".api"                  # fake-only: the API's URL, for tests
SERVICE_LOG_SUFFIX = ".services"         # fake-only: dir of service output files
API_PORT_ENV = "FAKE_TY_API_PORT"        # real: setting http_api_port, default 8080
API_DISABLED_ENV = "FAKE_TY_API_DISABLED"  # real: setting http_api_disabled=true
HEARTBEAT_ENV = "FAKE_TY_HEARTBEAT_S"
WRITE_TIMEOUT_ENV = "FAKE_TY_WRITE_TIMEOUT_S"
POLL_ENV = "FAKE_TY_POLL_S"
EXECUTOR_POLL_S = 0.2            # real worker: 2 s ticker (plus an in-process wakeup)
SSE_CHECK_S = 1.0                # sse.go: event_log MAX(id) checked every second
HEARTBEAT_S = 15.0               # sse.go heartbeat ticker
WRITE_TIMEOUT_S = 60.0           # web/server.go http.Server WriteTimeout
SHUTDOWN_WAIT_S = 5.0            # runDaemon: httpSrv.Shutdown with a 5 s context
ORPHAN_CHECK_S = 60.0            # worker: reconcileOrphanedTasks every 30 ticks of 2 s
ORPHAN_GRACE_S = 90.0            # executor.go orphanSpawnGrace
TASK_LOG_LIMIT = 100             # handleTaskDetail: GetTaskLogs(id, 100)
BOARD_LIST_LIMIT = 500           # ListTasks(IncludeClosed, Limit: 500)
BOARD_COLUMN_LIMIT = 50
FINISH_OUTCOMES = ("done", "needs_input", "failed", "success", "interrupted")
_BOARD_SECTIONS = (("backlog", "Backlog"), ("processing", "In Progress"),
                   ("blocked", "Blocked"), ("done", "Done"))
_ORPHAN_STARTUP_MSG = ("Executor terminated (daemon restart) - task was 'processing' with no "
                       "live executor. Moved to blocked; retry to resume.")
_ORPHAN_PERIODIC_MSG = ("Executor died - task was 'processing' with no live executor. Moved "
                        "to blocked; retry to resume.")


def _go_encode(obj):
    """encoding/json of an already-ordered value (structs keep field order; the
    caller sorts map keys), with Go's HTML-safe escapes."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _api_time(stamp):
    """apiTime: UTC, RFC3339, to the second."""
    t = _parse_rfc3339(stamp)
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp(stamp):
    try:
        return _parse_rfc3339(stamp).timestamp() if stamp else None
    except (TypeError, ValueError):
        return None


def _task_json(task):
    """web/handlers.go toTaskJSON, fields in struct order, omitempty honoured."""
    out = {"id": task["id"], "title": task.get("title", ""), "body": task.get("body", ""),
           "status": task.get("status", ""), "type": task.get("type", ""),
           "project": task.get("project", ""),
           "executor": task.get("executor") or DEFAULT_EXECUTOR,
           "pinned": bool(task.get("pinned")), "tags": task.get("tags", ""),
           "permission_mode": _permission_mode(task), "branch_name": task.get("branch", "")}
    if task.get("worktree"):
        out["worktree_path"] = task["worktree"]
    out["has_executor"] = False
    out["pr_url"] = ""
    if task.get("summary"):
        out["summary"] = task["summary"]
    out["created_at"] = _api_time(task["created_at"])
    out["updated_at"] = _api_time(task["updated_at"])
    if task.get("started_at"):
        out["started_at"] = _api_time(task["started_at"])
    if task.get("completed_at"):
        out["completed_at"] = _api_time(task["completed_at"])
    return out


def _list_tasks_order(tasks):
    """ListTasks: ORDER BY pinned DESC, CASE done/blocked completed_at ELSE created_at
    END DESC, id DESC."""
    return sorted(tasks, key=lambda t: (bool(t.get("pinned")), _recency_key(t)), reverse=True)


def _board_reference(task):
    """board.go boardReferenceTime (as a POSIX timestamp; None for a zero time)."""
    status = task.get("status")
    if status == "processing" and task.get("started_at"):
        return _timestamp(task["started_at"])
    if status == "done" and task.get("completed_at"):
        return _timestamp(task["completed_at"])
    if status == "backlog":
        return _timestamp(task.get("created_at"))
    return _timestamp(task.get("updated_at"))


def _short_duration(seconds):
    """board.go formatShortDuration: two largest units, joined without a space."""
    seconds = int(seconds)
    if seconds < 1:
        return "0s"
    parts = []
    for size, label in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if seconds >= size:
            parts.append("%d%s" % (seconds // size, label))
            seconds %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def _go_bytes_text(raw):
    """A Go string of raw bytes as encoding/json writes it: each invalid byte U+FFFD."""
    text = raw.decode("utf-8", "surrogateescape")
    return "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)


def _truncate_title(title, max_len=80):
    s = title.replace("\n", " ").replace("\r", "")
    raw = s.encode("utf-8", "surrogateescape")
    if len(raw) <= max_len:
        return s
    return _go_bytes_text(raw[:max_len - 3]) + "..."


def board_snapshot(state, limit=BOARD_COLUMN_LIMIT, project=None, now=None):
    """web/board.go BuildBoardSnapshot over ListTasks(IncludeClosed, Limit 500)."""
    now = time.time() if now is None else now
    rows = [t for t in state.get("tasks", []) if not project or t.get("project") == project]
    rows = _list_tasks_order(rows)[:BOARD_LIST_LIMIT]
    grouped = {}
    for task in rows:
        status = task.get("status")
        if status == "archived":
            continue
        grouped.setdefault("backlog" if status == "queued" else status, []).append(task)
    columns = []
    for status, label in _BOARD_SECTIONS:
        members = grouped.get(status, [])
        if not members:
            columns.append({"status": status, "label": label, "count": 0, "tasks": None})
            continue
        members = sorted(members, key=lambda t: (not t.get("pinned"),
                                                 -(_board_reference(t) or 0)))
        entries = []
        for task in members[:limit]:
            ref = _board_reference(task)
            hint = ""
            if ref is not None:
                delta = _short_duration(abs(now - ref))
                hint = {"processing": "running %s ago", "blocked": "blocked %s",
                        "queued": "queued %s", "backlog": "created %s",
                        "done": "done %s"}.get(task.get("status"), "%s") % delta
            entries.append({"id": task["id"], "title": _truncate_title(task.get("title", "")),
                            "project": task.get("project", ""), "type": task.get("type", ""),
                            "pinned": bool(task.get("pinned")), "age_hint": hint})
        columns.append({"status": status, "label": label, "count": len(members),
                        "tasks": entries})
    return {"columns": columns}


def _max_event_id(state):
    return max((e["id"] for e in state.get("event_log", [])), default=0)


def _events_query(state, query):
    """handleListEvents: ?limit (default 50), ?type, ?task_id; newest first."""
    limit = 50
    with contextlib.suppress(ValueError):
        n = _parse_int10(query.get("limit", [""])[0])
        if n > 0:
            limit = n
    rows = state.get("event_log", [])
    event_type = query.get("type", [""])[0]
    if event_type:
        rows = [e for e in rows if e["event_type"] == event_type]
    task_filter = query.get("task_id", [""])[0]
    if task_filter:
        with contextlib.suppress(ValueError):
            wanted = _parse_int10(task_filter)
            rows = [e for e in rows if e["task_id"] == wanted]
    # ORDER BY created_at DESC (second resolution); ties newest id first.
    rows = sorted(rows, key=lambda e: (e["created_at"], e["id"]), reverse=True)[:limit]
    return [{"created_at": e["created_at"], "event_type": e["event_type"], "id": e["id"],
             "message": e["message"], "metadata": e["metadata"],
             "task_id": e["task_id"] or 0} for e in rows]


class _StateReader:
    """Lock-free reads of the state (every write is an atomic rename), re-parsed
    only when the file changed."""

    def __init__(self, path):
        self.path, self.key, self.state = path, None, None

    def get(self):
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self.key or self.state is None:
            self.state = _load(self.path)
            self.key = key
        return self.state


def _control_flag(state_path, key):
    try:
        return bool(_read_control_unlocked(state_path).get(key))
    except FakeTyError:
        return False


_API_SERVER_CLASS = []


def _api_server_class():
    """The HTTP API server class, built on first use (http.server imports slowly)."""
    if _API_SERVER_CLASS:
        return _API_SERVER_CLASS[0]
    import http.server
    import socketserver

    class _ApiServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        block_on_close = False
        allow_reuse_address = True

        def __init__(self, address, daemon):
            self.fake_daemon = daemon
            self.active = set()
            self.active_lock = threading.Lock()
            self.streams = set()
            super().__init__(address, _ApiHandler)

        def verify_request(self, request, client_address):
            """api_drop: every new connection is reset before a byte is read."""
            if _control_flag(self.fake_daemon.state_path, "api_drop"):
                _reset_socket(request)
                return False
            return True


    def _reset_socket(sock):
        """Drop a connection with a TCP reset.  The descriptor is closed directly:
        socket.close() waits for the handler's makefile() objects."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            os.close(sock.detach())


    class _StreamGone(Exception):
        pass


    class _ApiHandler(http.server.BaseHTTPRequestHandler):
        """The modelled subset of web/server.go's routes, behind its cors() wrapper."""

        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def send_response(self, code, message=None):
            # Go's net/http sends no Server header.
            self.send_response_only(code, message)
            self.send_header("Date", self.date_time_string())

        def _cors(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Content-Type")

        def _json(self, code, obj):
            body = (_go_encode(obj) + "\n").encode("utf-8")
            self.send_response(code)
            self._cors()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _tracked(fn):
            def wrapper(self):
                server = self.server
                if _control_flag(server.fake_daemon.state_path, "api_drop"):
                    self.close_connection = True      # a kept-alive connection, too
                    _reset_socket(self.connection)
                    return
                with server.active_lock:
                    server.active.add(self)
                try:
                    fn(self)
                finally:
                    with server.active_lock:
                        server.active.discard(self)
            return wrapper

        @_tracked
        def do_OPTIONS(self):
            self.send_response(204)
            self._cors()
            self.end_headers()

        def _not_modelled(self):
            self._json(501, {"error": "fake ty: %s %s is not modelled"
                             % (self.command, _urlparse.urlsplit(self.path).path)})

        do_POST = do_PATCH = do_DELETE = do_PUT = _tracked(_not_modelled)

        @_tracked
        def do_GET(self):
            parts = _urlparse.urlsplit(self.path)
            query = _urlparse.parse_qs(parts.query, keep_blank_values=True)
            path = parts.path
            reader = self.server.fake_daemon.reader
            if path == "/api/board":
                limit = BOARD_COLUMN_LIMIT
                with contextlib.suppress(ValueError):
                    n = _parse_int10(query.get("limit", [""])[0])
                    limit = n if n > 0 else limit
                project = query.get("project", [""])[0] or None
                self._json(200, board_snapshot(reader.get(), limit, project))
            elif path == "/api/board/stream":
                self._board_stream()
            elif path == "/api/events":
                self._json(200, _events_query(reader.get(), query))
            elif re.fullmatch(r"/api/tasks/[^/]+", path) and path != "/api/tasks/latest-logs":
                self._task_detail(path.rsplit("/", 1)[1])
            else:
                self._not_modelled()

        def _task_detail(self, raw_id):
            try:
                task_id = _parse_int10(raw_id)
            except ValueError:
                return self._json(400, {"error": "invalid task id"})
            state = self.server.fake_daemon.reader.get()
            task = _find(state, task_id)
            if task is None:
                return self._json(404, {"error": "task not found"})
            logs = sorted((l for l in state.get("task_logs", []) if l["task_id"] == task_id),
                          key=lambda l: l["id"])[-TASK_LOG_LIMIT:]
            self._json(200, {"logs": [{"id": l["id"], "line_type": l["line_type"],
                                       "content": l["content"],
                                       "created_at": _api_time(l["created_at"])} for l in logs],
                             "task": _task_json(task)})

        # -- SSE (web/sse.go handleBoardStream) --

        def _board_stream(self):
            daemon = self.server.fake_daemon
            t0 = time.monotonic()
            write_deadline = t0 + daemon.write_timeout_s if daemon.write_timeout_s > 0 else None
            self.close_connection = True
            self.send_response(200)
            self._cors()
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "keep-alive")
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            with self.server.active_lock:
                self.server.streams.add(self)
            try:
                self._stream_loop(daemon, t0, write_deadline)
            except (_StreamGone, OSError):
                pass
            finally:
                with self.server.active_lock:
                    self.server.streams.discard(self)

        def _send_event(self, deadline, text):
            if deadline is not None and time.monotonic() >= deadline:
                # Past WriteTimeout the write fails, the request context is cancelled
                # and the handler returns: the connection closes, chunked body unended.
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                raise _StreamGone()
            data = text.encode("utf-8")
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _client_gone(self):
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True
            return False

        def _stream_loop(self, daemon, t0, deadline):
            state = daemon.reader.get()
            self._send_event(deadline, "event: board\ndata: %s\n\n"
                             % _go_encode(board_snapshot(state)))
            last = _max_event_id(daemon.reader.get())
            next_check = t0 + SSE_CHECK_S
            next_beat = t0 + daemon.heartbeat_s
            while True:
                if _control_flag(daemon.state_path, "api_drop") or daemon.api_killed.is_set():
                    _reset_socket(self.connection)
                    raise _StreamGone()
                if self._client_gone():
                    raise _StreamGone()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat += daemon.heartbeat_s
                    self._send_event(deadline, "event: heartbeat\ndata: {}\n\n")
                if now >= next_check:
                    next_check += SSE_CHECK_S
                    state = daemon.reader.get()
                    current = _max_event_id(state)
                    if current > last:
                        last = current
                        self._send_event(deadline, "event: board\ndata: %s\n\n"
                                         % _go_encode(board_snapshot(state)))
                time.sleep(max(0.0, min(0.1, next_beat - now, next_check - now)))

    _API_SERVER_CLASS.append(_ApiServer)
    return _ApiServer


def _logfmt(value):
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class _Daemon:
    """`ty daemon` in the foreground: runDaemon (cmd/task/main.go) with the
    executor (internal/executor), hook runner and services (internal/hooks) and
    the HTTP API subset (internal/web)."""

    def __init__(self, state_path):
        self.state_path = state_path
        self.reader = _StateReader(state_path)
        self.running = {}            # task id -> the task as the executor holds it
        self.hook_plugins = []
        self.services = []
        self.server = None
        self.api_url = None
        self.signal_name = None
        self.stop = threading.Event()
        self.executor_stop = threading.Event()
        self.api_killed = threading.Event()
        self.log_lock = threading.Lock()
        self.poll_s = _env_float(POLL_ENV, EXECUTOR_POLL_S)
        self.hook_timeout_s = _env_float(HOOK_TIMEOUT_ENV, HOOK_TIMEOUT_S)
        self.heartbeat_s = _env_float(HEARTBEAT_ENV, HEARTBEAT_S)
        self.write_timeout_s = _env_float(WRITE_TIMEOUT_ENV, WRITE_TIMEOUT_S)

    # -- plumbing --

    def log(self, level, prefix, message, **fields):
        line = "%s %s %s: %s" % (time.strftime("%Y/%m/%d %H:%M:%S"), level, prefix, message)
        line += "".join(" %s=%s" % (k, _logfmt(v)) for k, v in fields.items())
        with self.log_lock:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

    def locked(self, fn):
        with _lock(self.state_path):
            state = _load(self.state_path)
            result = fn(state)
            _save(self.state_path, state)
        return result

    # -- lifecycle --

    def run(self):
        lock_fd = os.open(self.state_path + DAEMON_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise TyExit(1, "", "Error: daemon already running (could not acquire lock)\n")
        pid_file = self.state_path + DAEMON_PID_SUFFIX
        try:
            with open(pid_file, "w") as f:
                f.write("%d" % os.getpid())
            mode = "dangerous" if os.environ.get("WORKTREE_DANGEROUS_MODE") == "1" else "safe"
            with open(pid_file + ".mode", "w") as f:
                f.write(mode)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path + API_URL_SUFFIX)
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
            return self._serve()
        finally:
            for path in (pid_file, pid_file + ".mode", self.state_path + API_URL_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(lock_fd)

    def _on_signal(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self.stop.set()

    def _serve(self):
        self.log("INFO", "task-daemon", "Database opened", path=self.state_path)
        # executor.NewWithLogging -> hooks.New: plugins loaded once, warnings logged.
        plugins, warnings = load_plugins(plugins_dir())
        for w in warnings:
            self.log("WARN", "hooks", "plugin load", detail=w)
        self.hook_plugins = plugins
        started = _rfc3339(_now())
        self.locked(lambda s: s.__setitem__("daemon", {
            "pid": os.getpid(), "started_at": started, "api_url": None,
            "plugins_dir": plugins_dir(), "hook_plugins": [p["name"] for p in plugins]}))
        # exec.Start: reconcile orphaned 'processing' tasks, then the worker loop.
        self.reconcile_orphans(startup=True)
        worker = threading.Thread(target=self.worker, name="executor", daemon=True)
        worker.start()
        self.log("INFO", "task-daemon", "Executor started, waiting for tasks...")
        self.start_api()
        inject = {"TY_DB_PATH": self.state_path}
        if self.api_url:
            inject["TY_API_URL"] = self.api_url
        self.start_services(inject)
        monitor = threading.Thread(target=self.monitor_services, name="services", daemon=True)
        monitor.start()
        while not self.stop.wait(0.2):
            pass
        self.log("INFO", "task-daemon", "Received signal, shutting down",
                 signal=self.signal_name)
        self.stop_services()
        self.shutdown_api()
        self.executor_stop.set()
        worker.join(5)
        stopped = _rfc3339(_now())
        self.locked(lambda s: s.setdefault("daemon", {}).update(stopped_at=stopped))
        return ""

    # -- HTTP API --

    def start_api(self):
        if os.environ.get(API_DISABLED_ENV, "") not in ("", "0"):
            self.log("INFO", "task-daemon", "HTTP API disabled via setting",
                     key="http_api_disabled")
            return
        port = int(_env_float(API_PORT_ENV, 0))
        try:
            self.server = _api_server_class()(("127.0.0.1", port), self)
            port = self.server.server_address[1]
            threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                             name="http-api", daemon=True).start()
        except OSError as e:
            # startDaemonHTTPAPI: a bind failure is logged; the daemon (and the
            # TY_API_URL it hands services) carries on.
            self.server = None
            self.log("WARN", "task-daemon", "HTTP API not started",
                     error="listen :%d: %s" % (port, e))
        self.api_url = "http://127.0.0.1:%d" % port
        self.log("INFO", "task-daemon", "HTTP API listening", port=port)
        _atomic_write_text(self.state_path + API_URL_SUFFIX, self.api_url + "\n")
        url = self.api_url
        self.locked(lambda s: s.setdefault("daemon", {}).update(api_url=url))

    def shutdown_api(self):
        """httpSrv.Shutdown(5 s): stop listening, wait for busy connections (an open
        SSE stream never gets idle), then the process exit closes the rest."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while time.monotonic() < deadline:
            with self.server.active_lock:
                if not self.server.active:
                    break
            time.sleep(0.05)
        self.api_killed.set()
        with self.server.active_lock:
            streams = list(self.server.streams)
        for handler in streams:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)

    # -- executor --

    def worker(self):
        last_orphan_check = time.monotonic()
        while not self.executor_stop.is_set():
            try:
                self.tick()
                if time.monotonic() - last_orphan_check >= ORPHAN_CHECK_S:
                    last_orphan_check = time.monotonic()
                    self.reconcile_orphans(startup=False)
            except Exception as e:      # the executor never dies of one bad tick
                self.log("ERROR", "executor", "tick failed", error=repr(e))
            self.executor_stop.wait(self.poll_s)

    def _has_work(self, state):
        if any(r.get("status") == "pending" for r in state.get("executor_requests", [])):
            return True
        for task in state.get("tasks", []):
            if task.get("status") == "queued" and task["id"] not in self.running:
                return True
            if task["id"] in self.running and task.get("status") in (
                    "backlog", "done", "queued"):
                return True
        return any(_find(state, tid) is None for tid in self.running)

    def tick(self):
        if not self._has_work(self.reader.get()):
            return
        fire = self.locked(self._tick_locked)
        for new_status, task, message in fire:
            self.on_status_change(task, new_status, message)

    def _tick_locked(self, state):
        fire = []
        now = _rfc3339(_now())
        # pollTmuxSession: a running task's status changed under it.
        for task_id in list(self.running):
            task = _find(state, task_id)
            if task is None:
                del self.running[task_id]
                continue
            result = {"backlog": {"interrupted": True}, "done": {"success": True},
                      "queued": {"requeued": True}}.get(task.get("status"))
            if result:
                fire += self.finalize(state, task_id, result, now)
        # fake-only: finish() decides how a running task's session ends.
        for req in state.get("executor_requests", []):
            if req.get("status") != "pending":
                continue
            task_id = req["task_id"]
            if task_id not in self.running:
                task = _find(state, task_id)
                if task is not None and task.get("status") == "queued":
                    continue                  # starts below; the request waits for it
                req.update(status="rejected", decided_at=now,
                           reason="task #%s is not being executed by this daemon" % task_id)
                continue
            outcome, message = req["outcome"], req.get("message")
            if outcome == "done":
                _set_status(_find(state, task_id), "done", now, state)
                result = {"success": True}
            else:
                result = {"needs_input": {"needs_input": True},
                          "failed": {"failed": True},
                          "success": {"success": True},
                          "interrupted": {"interrupted": True}}[outcome]
            fire += self.finalize(state, task_id, dict(result, message=message), now)
            req.update(status="applied", decided_at=now)
        # processNextTask: every queued task (oldest first) is started.
        queued = sorted((t for t in state.get("tasks", [])
                         if t.get("status") == "queued" and t["id"] not in self.running),
                        key=lambda t: (t.get("created_at") or "", t["id"]))
        for task in queued:
            self.log("INFO", "executor", "Processing task", id=task["id"], title=task["title"])
            if not task.get("started_at"):          # MarkTaskStarted
                task["started_at"] = now
            _set_status(task, "processing", now, state)
            held = copy.deepcopy(task)               # executeTask's task.Status = processing
            self.running[task["id"]] = held
            message = "Starting task #%d: %s" % (task["id"], task.get("title", ""))
            _append_task_log(state, task["id"], "system", message, now)
            fire.append(("processing", held, message))
        return fire

    def finalize(self, state, task_id, result, now):
        """The tail of executor.go executeTask, in its order of checks."""
        held = self.running.pop(task_id)
        task = _find(state, task_id)
        current = task.get("status") if task else ""

        def log(line_type, content):
            _append_task_log(state, task_id, line_type, content, now)

        if result.get("requeued"):
            log("system", "Re-queued by user \u2014 starting a fresh run")
            return []
        if result.get("interrupted"):
            _set_status(task, "backlog", now, state)
            return [("backlog", held, "Task interrupted by user")]
        if current == "blocked":
            log("system", "Task waiting for input")
            return [("blocked", held, "Task waiting for input")]
        if current == "done":
            log("system", "Task completed")
            return [("done", held, "Task completed")]
        if result.get("success"):
            _set_status(task, "backlog", now, state)
            message = "Agent finished - awaiting human review to close"
            log("system", message)
            return [("backlog", held, message)]
        message = result.get("message") or ""
        _set_status(task, "blocked", now, state)
        if result.get("needs_input"):
            log("question", message)
            log("system", "Task needs input - use 'r' to retry with your answer")
            return [("blocked", held, message)]
        message = "Task failed: %s" % message
        log("error", message)
        return [("blocked", held, message)]

    def reconcile_orphans(self, startup):
        """reconcileOrphanedTasks: 'processing' tasks nobody runs become blocked."""
        def work(state):
            fire = []
            now_ts = time.time()
            now = _rfc3339(_now())
            rows = [t for t in _list_tasks_order(state.get("tasks", []))
                    if t.get("status") == "processing"][:1000]
            for task in rows:
                if task["id"] in self.running:
                    continue
                started = _timestamp(task.get("started_at"))
                if not startup and started is not None and now_ts - started < ORPHAN_GRACE_S:
                    continue
                held = copy.deepcopy(task)
                message = _ORPHAN_STARTUP_MSG if startup else _ORPHAN_PERIODIC_MSG
                _set_status(task, "blocked", now, state)
                _append_task_log(state, task["id"], "error", message, now)
                fire.append(("blocked", held, message))
            return fire
        state = self.reader.get()
        if not any(t.get("status") == "processing" and t["id"] not in self.running
                   for t in state.get("tasks", [])):
            return
        for new_status, task, message in self.locked(work):
            self.on_status_change(task, new_status, message)

    # -- hooks (internal/hooks/hooks.go) --

    def on_status_change(self, task, new_status, message):
        """Runner.OnStatusChange."""
        if new_status in ("queued", "processing"):
            event = "task.started"
        elif new_status == "done":
            event = "task.done"
        elif new_status == "blocked":
            lowered = message.lower()
            event = "task.failed" if "fail" in lowered or "error" in lowered else "task.blocked"
        else:
            return
        self.run_hooks(event, task, message)

    def run_hooks(self, event, task, message):
        """Runner.Run: every plugin handling the event, by plugin name, each in the
        background with its own 30 s timeout.  (The legacy single-script hooks dir
        is not modelled.)"""
        base = dict(os.environ)
        base.update(_task_env(task))
        base.update(TASK_MESSAGE=message, TASK_EVENT=event,
                    WORKTREE_PATH=task.get("worktree", ""))
        launched = []
        for plugin in self.hook_plugins:
            rel = plugin["hooks"].get(event)
            if not rel:
                continue
            script = _go_join(plugin["dir"], rel)
            env = dict(base, TASK_PLUGIN_NAME=plugin["name"], TASK_PLUGIN_DIR=plugin["dir"])
            command = _GoCommand([script], plugin["dir"], env, self.hook_timeout_s).start()
            launched.append((command, {
                "kind": "hook", "plugin": plugin["name"], "event": event,
                "task_id": task["id"], "message": message, "argv": [script],
                "cwd": plugin["dir"], "env": _recorded_env(env),
                "pid": command.proc.pid if command.proc else None,
                "started_at": command.started_at, "state": "running"}))
        if not launched:
            return
        seqs = self.locked(lambda s: [_new_run(s, rec) for _, rec in launched])
        for (command, record), seq in zip(launched, seqs):
            threading.Thread(target=self._finish_hook, args=(command, record, seq),
                             name="hook-%d" % seq, daemon=True).start()

    def _finish_hook(self, command, record, seq):
        result = command.wait()
        self.locked(lambda s: _update_run(s, seq, result))
        if result["error"]:
            self.log("ERROR", "hooks", "Hook failed", event=record["event"],
                     plugin=record["plugin"], error=result["error"],
                     output=result["output"].strip())

    # -- services (internal/hooks/services.go) --

    def start_services(self, inject):
        """StartServices: `sh -c <command>` per service, from the plugin dir (or cwd
        under it), in its own process group, env = daemon env + inject + env."""
        plugins, _ = load_plugins(plugins_dir())
        log_dir = self.state_path + SERVICE_LOG_SUFFIX
        sh = shutil.which("sh", path=os.environ.get("PATH", os.defpath))
        records = []
        for plugin in plugins:
            for service in plugin["services"]:
                cwd = plugin["dir"] if not service["cwd"] else _go_join(plugin["dir"],
                                                                        service["cwd"])
                env = dict(os.environ)
                env.update(inject)
                for entry in service["env"] or ():
                    key, eq, value = entry.partition("=")
                    if eq:
                        env[key] = value
                argv = ["sh", "-c", service["command"]]
                record = {"kind": "service", "plugin": plugin["name"],
                          "service": service["name"], "argv": argv, "cwd": cwd,
                          "env": _recorded_env(env), "pid": None, "pgid": None,
                          "started_at": _stamp(), "state": "running"}
                proc, error = None, None
                if sh is None:
                    error = 'exec: "sh": executable file not found in $PATH'
                else:
                    os.makedirs(log_dir, exist_ok=True)
                    log_path = os.path.join(log_dir, "%s.%s.log" % (
                        re.sub(r"[^A-Za-z0-9_.-]", "_", plugin["name"]),
                        re.sub(r"[^A-Za-z0-9_.-]", "_", service["name"])))
                    record["log"] = log_path
                    with open(log_path, "ab") as out:
                        try:
                            proc = subprocess.Popen(argv, executable=sh, cwd=cwd, env=env,
                                                    stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT,
                                                    process_group=0, close_fds=True)
                        except OSError as e:
                            error = _go_start_error(sh, cwd, e, checked_dir=False)
                if error:
                    record.update(state="failed_to_start", error=error)
                    self.log("ERROR", "task-daemon", "plugin service failed to start",
                             plugin=plugin["name"], service=service["name"], error=error)
                else:
                    record.update(pid=proc.pid, pgid=proc.pid)
                    self.log("INFO", "task-daemon", "plugin service started",
                             plugin=plugin["name"], service=service["name"], pid=proc.pid)
                records.append((proc, record))
        if not records:
            return
        seqs = self.locked(lambda s: [_new_run(s, rec) for _, rec in records])
        for (proc, record), seq in zip(records, seqs):
            if proc is not None:
                self.services.append({"proc": proc, "seq": seq, "record": record,
                                      "exited": None, "t_exit": None})
        self.log("INFO", "task-daemon", "Started plugin services", count=len(self.services))

    @staticmethod
    def _peek_exit(svc):
        """Has the service's process exited?  Looked at without reaping it (Go only
        reaps in Stop), so its pid stays taken as with the real daemon."""
        if svc["exited"] is not None:
            return True
        try:
            info = os.waitid(os.P_PID, svc["proc"].pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
            svc["exited"] = {"code": svc["proc"].returncode}
            svc["t_exit"] = time.monotonic()
            return True
        if info is None or info.si_pid == 0:
            return False
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        svc["exited"] = {"code": code}
        svc["t_exit"] = time.monotonic()
        return True

    def monitor_services(self):
        """Notes when a service exits on its own (the real daemon does nothing then)."""
        while not self.stop.is_set():
            for svc in self.services:
                if svc["exited"] is None and self._peek_exit(svc):
                    ended = _stamp()
                    code = svc["exited"]["code"]
                    self.locked(lambda s, seq=svc["seq"], c=code, e=ended: _update_run(
                        s, seq, {"state": "exited", "ended_at": e, "exited_on_its_own": True,
                                 "exit": c if c >= 0 else None,
                                 "signal": -c if c < 0 else None,
                                 "error": _go_exit_error(c)}))
            self.stop.wait(0.1)

    def stop_services(self):
        """ServiceSet.Stop: SIGTERM to every service's process group, wait up to 5 s
        for all, then SIGKILL the groups."""
        if not self.services:
            return
        t0 = time.monotonic()
        for svc in self.services:
            with contextlib.suppress(OSError):
                os.kill(-svc["proc"].pid, signal.SIGTERM)
            svc["sigterm_at"] = _stamp()
            self.log("INFO", "task-daemon", "plugin service stopping",
                     plugin=svc["record"]["plugin"], service=svc["record"]["service"])
        deadline = t0 + SERVICE_STOP_WAIT_S
        while time.monotonic() < deadline and not all(map(self._peek_exit, self.services)):
            time.sleep(0.02)
        killed = [svc for svc in self.services if not self._peek_exit(svc)]
        for svc in killed:
            with contextlib.suppress(OSError):
                os.kill(-svc["proc"].pid, signal.SIGKILL)
            svc["sigkill_at"] = _stamp()
        # Fake-only: wait a little for the killed ones too, to record their status.
        grace = time.monotonic() + 2.0
        while time.monotonic() < grace and not all(map(self._peek_exit, self.services)):
            time.sleep(0.02)
        updates = []
        for svc in self.services:
            returncode = svc["proc"].poll() if svc["exited"] is not None else None
            if returncode is None and svc["exited"] is not None:
                returncode = svc["exited"]["code"]
            updates.append((svc["seq"], {
                "state": "stopped" if svc["exited"] is not None else "unreaped",
                "exit": returncode if returncode is not None and returncode >= 0 else None,
                "signal": -returncode if returncode is not None and returncode < 0 else None,
                "error": _go_exit_error(returncode),
                "sigterm_at": svc["sigterm_at"], "sigkill_at": svc.get("sigkill_at"),
                "sigkilled": svc in killed,
                "stop_duration_s": (round(svc["t_exit"] - t0, 3)
                                    if svc["t_exit"] is not None and svc["t_exit"] >= t0
                                    else 0.0),
                "exited_on_its_own": bool(svc["t_exit"] is not None and svc["t_exit"] < t0),
                "ended_at": svc["record"].get("ended_at") or _stamp()}))
        self.locked(lambda s: [_update_run(s, seq, fields) for seq, fields in updates])
        self.services = []


def _atomic_write_text(path, text):
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_daemon(state, opts, changed, args, now):
    """ty daemon: runs in the foreground until SIGINT/SIGTERM."""
    path = _ACTIVE["state_path"]
    if path is None:
        raise FakeTyError("ty daemon runs only through the CLI wrapper install() writes")
    return _Daemon(path).run()


def _daemon_pid_file():
    path = _ACTIVE["state_path"]
    if path is None:
        raise FakeTyError("ty daemon runs only through the CLI wrapper install() writes")
    return path + DAEMON_PID_SUFFIX


def _read_pid(pid_file):
    try:
        with open(pid_file) as f:
            return int(re.match(r"\s*(\d+)", f.read()).group(1))
    except (OSError, AttributeError, ValueError):
        return None


def _process_exists(pid):
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def cmd_daemon_stop(state, opts, changed, args, now):
    """ty daemon stop: SIGTERM to the pid in the pid file."""
    pid_file = _daemon_pid_file()
    pid = _read_pid(pid_file)
    if pid is None:
        _fail("Error: daemon not running (no pid file)")
    if not _process_exists(pid):
        for path in (pid_file, pid_file + ".mode"):
            with contextlib.suppress(OSError):
                os.unlink(path)
        _fail("Error: daemon not running (stale pid file)")
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as e:
        _fail("Error: send signal: " + _go_errno(e))
    for path in (pid_file, pid_file + ".mode"):
        with contextlib.suppress(OSError):
            os.unlink(path)
    return "Daemon stopped\n"


def cmd_daemon_status(state, opts, changed, args, now):
    """ty daemon status."""
    pid_file = _daemon_pid_file()
    pid = _read_pid(pid_file)
    if pid is not None and _process_exists(pid):
        try:
            with open(pid_file + ".mode") as f:
                mode = f.read()
        except OSError:
            mode = "safe"
        return "Daemon running (pid %d, %s mode)\n" % (pid, mode)
    return "Daemon not running\n"


def _range_args(lo, hi):
    def rule(args):
        if not lo <= len(args) <= hi:
            return "accepts between %d and %d arg(s), received %d" % (lo, hi, len(args))
        return None
    return rule


_COMMANDS["plugins"] = Command(
    "plugins", "plugins", "List and inspect installed task plugins", _arbitrary_args, [],
    cmd_plugins_list, subcommands=[
        Command("list", "plugins list", "List installed plugins and the events they handle",
                _arbitrary_args, [], cmd_plugins_list),
        Command("dir", "plugins dir", "Print the plugins directory path", _arbitrary_args, [],
                cmd_plugins_dir),
        Command("add", "plugins add <git-url|path> [--name N]",
                "Install a plugin from a git repo (or update it if already installed)",
                _exact_args(1), [Flag("name", None, _S, "", "Install under this directory "
                                      "name (default: derived from the source)")],
                cmd_plugins_add, silence_usage=True),
        Command("remove", "plugins remove <name>", "Uninstall a plugin by deleting its "
                "directory", _exact_args(1), [], cmd_plugins_remove,
                aliases=("rm", "uninstall"), silence_usage=True),
        Command("run", "plugins run <plugin> <action> [task-id]",
                "Run a plugin action, optionally in the context of a task", _range_args(2, 3),
                [], cmd_plugins_run, silence_usage=True),
    ])
_COMMANDS["daemon"] = Command(
    "daemon", "daemon", "Run the task executor daemon", _arbitrary_args, [], cmd_daemon,
    subcommands=[
        Command("stop", "daemon stop", "Stop the daemon", _arbitrary_args, [],
                cmd_daemon_stop),
        Command("status", "daemon status", "Check daemon status", _arbitrary_args, [],
                cmd_daemon_status),
    ])
# `plugins` and `daemon` run outside the state lock: an action or hook may call
# `ty` itself, and the daemon lives until it is signalled.
_UNLOCKED_COMMANDS = ("plugins", "daemon")

# --------------------------------------------------------------- public API --


def install(bin_dir, state_path, projects=(DEFAULT_PROJECT,), name="ty", python=None):
    """Write an executable ``bin_dir/<name>`` running this fake on ``state_path``.

    The wrapper bakes in FAKE_TY_STATE and the absolute interpreter path, so it
    works with PATH=bin_dir alone.  Creates the state (with ``projects``, which
    `create -p` must name) if it does not exist yet.  Returns the wrapper path.
    """
    bin_dir = os.path.abspath(str(bin_dir))
    state_path = os.path.abspath(str(state_path))
    os.makedirs(bin_dir, exist_ok=True)
    with _lock(state_path):
        if not os.path.exists(state_path):
            _save(state_path, new_state(projects))
    wrapper = os.path.join(bin_dir, name)
    script = "\n".join([
        "#!/bin/sh",
        "# Fake TaskYou `ty` for tests, written by tests/fake_ty.py install().",
        "%s=%s" % (STATE_ENV, shlex.quote(state_path)),
        "export " + STATE_ENV,
        # -I -S: stdlib only, immune to the caller's PYTHON* variables, faster start.
        # Imported (not run as a script) so its compiled bytecode is cached.
        "exec %s -I -S -c %s %s \"$@\"" % (
            shlex.quote(python or sys.executable),
            shlex.quote("import sys; sys.path.append(sys.argv.pop(1)); import fake_ty; "
                        "sys.exit(fake_ty.main())"),
            shlex.quote(os.path.dirname(os.path.abspath(__file__)))),
        "",
    ])
    with open(wrapper, "w", encoding="utf-8") as f:
        f.write(script)
    os.chmod(wrapper, 0o755)
    return wrapper

# ------------------------------------------------- daemon/plugin test helpers --


def plugin_runs(state_path, kind=None, **filters):
    """Recorded plugin processes, oldest first: kind 'hook' | 'action' | 'service'.

    Each record has seq, kind, plugin, argv, cwd, env (its TASK_*/TY_*/WORKTREE_*
    variables), pid, state ('running', 'exited', 'stopped', 'failed_to_start'),
    exit, signal, error (Go's words: 'exit status 3', 'signal: killed'), started_at,
    ended_at; hooks add event, task_id, message, output, timed_out, duration_s;
    actions add action, task_id, output, timed_out; services add service, pgid,
    log, sigterm_at, sigkill_at, sigkilled, stop_duration_s, exited_on_its_own.
    ``filters`` match record fields exactly (event='task.done', plugin='p').
    """
    runs = load_state(state_path).get("plugin_runs", [])
    return [r for r in runs if (kind is None or r.get("kind") == kind)
            and all(r.get(k) == v for k, v in filters.items())]


def wait_plugin_runs(state_path, count=1, timeout=10.0, finished=True, kind=None, **filters):
    """Wait until ``count`` matching runs exist (finished ones only, by default)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = plugin_runs(state_path, kind, **filters)
        if finished:
            runs = [r for r in runs if r.get("state") != "running"]
        if len(runs) >= count:
            return runs
        if time.monotonic() >= deadline:
            raise TimeoutError("waited %.1fs for %d %s run(s) matching %r; have: %r"
                               % (timeout, count, kind or "plugin", filters,
                                  plugin_runs(state_path)))
        time.sleep(0.05)


def event_log(state_path):
    """The event_log rows (id, event_type, task_id, message, metadata, created_at)."""
    return load_state(state_path).get("event_log", [])


def task_logs(state_path, task_id=None):
    """task_logs rows (id, task_id, line_type, content, created_at), oldest first."""
    rows = load_state(state_path).get("task_logs", [])
    return [r for r in rows if task_id is None or r["task_id"] == task_id]


def api_url(state_path, timeout=10.0):
    """The running daemon's API URL (from <state>.api), waiting for it to appear."""
    path = str(state_path) + API_URL_SUFFIX
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            with open(path, encoding="utf-8") as f:
                url = f.read().strip()
            if url:
                return url
        if time.monotonic() >= deadline:
            raise TimeoutError("no %s after %.1fs: is `ty daemon` running?" % (path, timeout))
        time.sleep(0.05)


def daemon_info(state_path):
    """What the last daemon wrote about itself: pid, started_at, api_url, plugins_dir,
    hook_plugins (names loaded at start), stopped_at; {} if none ran."""
    return load_state(state_path).get("daemon", {})


def finish(state_path, task_id, outcome, message=None, timeout=10.0):
    """Decide how a task the fake daemon is executing ends (fake-only control).

    Outcomes mirror executor.go executeTask's endings:
      done        the task is marked done, then "Task completed": task.done
      needs_input blocked, logs the question ``message``: task.blocked (task.failed
                  if the message contains 'fail' or 'error', as OnStatusChange does)
      failed      blocked, "Task failed: <message>": task.failed
      success     backlog, "Agent finished - awaiting human review to close": no hook
      interrupted backlog, "Task interrupted by user": no hook
    (If the task's status was already set to blocked or done meanwhile, the
    executor's "Task waiting for input" / "Task completed" branches win, as there.)
    A request for a task still queued waits until the daemon has started it.
    Waits until the daemon applied it and returns the request; raises FakeTyError
    if the daemon is not executing that task, TimeoutError if no daemon answered
    (the request then expires).
    ``timeout=None`` returns at once without waiting.
    """
    if outcome not in FINISH_OUTCOMES:
        raise ValueError("outcome must be one of %s" % ", ".join(FINISH_OUTCOMES))

    def add(state):
        seq = int(state.get("next_request_seq") or 1)
        state["next_request_seq"] = seq + 1
        state.setdefault("executor_requests", []).append({
            "seq": seq, "task_id": int(task_id), "outcome": outcome, "message": message,
            "status": "pending", "requested_at": _rfc3339(_now())})
        return seq

    with locked_state(state_path) as state:
        seq = add(state)
    if timeout is None:
        return None
    deadline = time.monotonic() + timeout
    while True:
        req = next(r for r in load_state(state_path)["executor_requests"] if r["seq"] == seq)
        if req["status"] == "applied":
            return req
        if req["status"] == "rejected":
            raise FakeTyError("finish(%s, %r): %s" % (task_id, outcome, req.get("reason")))
        if time.monotonic() >= deadline:
            with locked_state(state_path) as state:      # no later daemon may apply it
                for r in state["executor_requests"]:
                    if r["seq"] == seq and r["status"] == "pending":
                        r["status"] = "expired"
            raise TimeoutError("no fake ty daemon applied finish(%s, %r) within %.1fs"
                               % (task_id, outcome, timeout))
        time.sleep(0.05)

# ---------------------------------------------------------------------- CLI --


def _emit(stdout, stderr):
    for stream, text in ((sys.stdout, stdout), (sys.stderr, stderr)):
        if text:
            stream.flush()
            stream.buffer.write(text.encode("utf-8", "surrogateescape"))
            stream.buffer.flush()


def _finish_call(state, seq, **fields):
    for call in reversed(state["calls"]):
        if call.get("seq") == seq:
            call.update(fields)
            return


def _invoke(state_path, argv):
    command = _command_token(argv)
    with _lock(state_path):
        state = _load(state_path)
        control = _read_control_unlocked(state_path)
        try:
            plan = _plan(control, command)
        except (TypeError, ValueError) as e:
            raise FakeTyError("bad value in control file %s: %s"
                              % (_control_path(state_path), e)) from e
        if plan["control_changed"]:
            _write_control_unlocked(state_path, control)
        seq = int(state.get("call_seq", 0)) + 1
        state["call_seq"] = seq
        state["calls"].append({
            "seq": seq, "argv": argv, "exit": None, "stdout": "", "stderr": "",
            "injected": None, "pid": os.getpid(), "cwd": os.getcwd(),
            "time": _rfc3339(_now()),
        })
        _save(state_path, state)

    if plan["hang_s"] > 0:
        time.sleep(plan["hang_s"])

    if command in _UNLOCKED_COMMANDS and not plan["fail"]:
        return _invoke_unlocked(state_path, argv, seq, plan)

    with _lock(state_path):
        state = _load(state_path)
        if plan["fail"]:
            message = control.get("fail_message") or DEFAULT_FAIL_MESSAGE
            code, out, err, injected = 1, "", message + "\n", "fail"
        else:
            before = copy.deepcopy({k: state[k] for k in _ROLLBACK_KEYS})
            code, out, err = run(argv, state)
            injected = None
            if code != 0:
                state.update(before)      # a rejected call leaves the tasks untouched
            elif plan["crash"]:
                # The side effect is saved, then the process dies without output.
                code, out, err, injected = 1, "", "", "crash"
        _finish_call(state, seq, exit=code, stdout=out, stderr=err, injected=injected)
        _save(state_path, state)
    _emit(out, err)
    return code


_ROLLBACK_KEYS = ("tasks", "next_id", "projects", "event_log", "next_event_id")


def _invoke_unlocked(state_path, argv, seq, plan):
    """`plugins` / `daemon`: run on a snapshot without holding the lock (their state
    writes lock for themselves, see _store); the call record is finished after."""
    with _lock(state_path):
        snapshot = _load(state_path)
    _ACTIVE["state_path"] = state_path
    try:
        code, out, err = run(argv, snapshot)
    finally:
        _ACTIVE["state_path"] = None
    injected = None
    if code == 0 and plan["crash"]:
        code, out, err, injected = 1, "", "", "crash"
    with _lock(state_path):
        state = _load(state_path)
        _finish_call(state, seq, exit=code, stdout=out, stderr=err, injected=injected)
        _save(state_path, state)
    _emit(out, err)
    return code


def main(argv=None):
    """Entry point: ``ty ARGS...`` with FAKE_TY_STATE set -> exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    state_path = os.environ.get(STATE_ENV)
    if not state_path:
        sys.stderr.write("fake ty: %s is not set (path of the fake's JSON state file; "
                         "use tests/fake_ty.py install())\n" % STATE_ENV)
        return FAKE_ERROR_EXIT
    try:
        return _invoke(state_path, argv)
    except FakeTyError as e:
        sys.stderr.write("fake ty: %s\n" % e)
        return FAKE_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
