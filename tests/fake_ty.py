#!/usr/bin/env python3
"""A faithful fake of TaskYou's ``ty`` CLI for the ty-openworkflow tests.

It speaks the subset of the real grammar the bridge may use (create, show,
status, close/done, update, list; see ../shared/ty-cli.md), parses flags the
way cobra/pflag do, and rejects everything else the way the real binary does:
message on stderr, exit status 1.  State is one JSON file; every invocation is
appended to its ``calls`` list so a test can assert the exact argv the bridge
ran, rejected calls included.

Quick start (in a test)::

    from tests import fake_ty
    fake_ty.install(bin_dir, state_path)          # writes an executable bin_dir/ty
    env = dict(os.environ, PATH=bin_dir)          # only the fake is reachable
    subprocess.run(["ty", "create", "T", "--json"], env=env)
    fake_ty.calls(state_path)[-1]["argv"]         # ["create", "T", "--json"]
    fake_ty.write_control(state_path, {"fail_next": 1})   # next call fails

Environment: FAKE_TY_STATE (required) is the state file's path; the wrapper
written by install() sets it.  Optional control file ``<state>.control``
(JSON) injects failures: fail, fail_commands, fail_next, fail_message, hang,
hang_seconds, hang_commands, crash_after_create, crash_after.
"""

__version__ = "1"
__all__ = [
    "STATE_ENV", "install", "new_state", "load_state", "locked_state", "calls",
    "tasks", "get_task", "write_control", "read_control", "run", "main",
]

import contextlib
import copy
import datetime as _dt
import fcntl
import json
import os
import re
import shlex
import sys
import tempfile
import time

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
            "projects": list(projects), "tasks": [], "calls": []}


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
        self.name, self.short, self.kind, self.default, self.usage = name, short, kind, default, usage

    def label(self):
        return "-%s, --%s" % (self.short, self.name) if self.short else "--%s" % self.name

    def convert(self, value):
        if self.kind == "bool":
            return _go_parse_bool(value)
        if self.kind == "int":
            return _go_parse_int(value)
        return value


class Command:
    """One cobra command: names, Use line, arg rule, flags, handler."""

    def __init__(self, name, use, short, args_rule, flags, handler, aliases=()):
        self.name, self.use, self.short = name, use, short
        self.args_rule, self.handler, self.aliases = args_rule, handler, tuple(aliases)
        self.flags = list(flags) + [Flag("help", "h", "bool", False, "help for " + name)]


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


def _set_status(task, status, now):
    """db.UpdateTaskStatus: stamps started_at / completed_at like TaskYou."""
    had_started = bool(task.get("started_at"))
    task["status"] = status
    task["updated_at"] = now
    if status == "processing":
        task["started_at"] = now
    elif status in CLOSED_STATUSES or (status == "blocked" and had_started):
        task["completed_at"] = now


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
    _set_status(_require(state, task_id), status, now)
    return "Task #%d moved to %s\n" % (task_id, status)


def cmd_close(state, opts, changed, args, now):
    """ty close ID (alias done)."""
    task_id = _task_id(args[0])
    task = _require(state, task_id)
    if task.get("status") == "done":
        return "Task #%d is already done\n" % task_id
    _set_status(task, "done", now)
    return "Closed task #%d: %s\n" % (task_id, task.get("title", ""))


def cmd_update(state, opts, changed, args, now):
    """ty update ID [--title] [--body] [-t] [-p] [--tags]: replaces the given fields."""
    task_id = _task_id(args[0])
    if opts["type"]:
        _check_type(opts["type"])
    task = _require(state, task_id)
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
    return "Updated task #%d\n" % task_id


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
        out.append("#%-4d %-10s %s%s" % (t["id"], t.get("status", ""), project_tag, t.get("title", "")))
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
        return cmd.short + "\n\n" + _usage(cmd)
    cmd = _lookup(token) if token is not None else None
    if cmd is None:
        if token is not None:        # cobra legacyArgs on a root with subcommands
            msg = "unknown command %s for \"ty\"" % _go_quote(token)
            raise TyExit(1, "", "Error: %s\nRun 'ty --help' for usage.\nError: %s\n" % (msg, msg))
        return _run_root(argv)
    rest = argv[:idx[0]] + argv[idx[0] + 1:]
    try:
        opts, changed, args = _parse_flags(cmd.flags, rest)
    except _ShowHelp:
        return cmd.short + "\n\n" + _usage(cmd)
    except _FlagError as e:
        _cobra_error(str(e), _usage(cmd))
    problem = cmd.args_rule(args)
    if problem:
        _cobra_error(problem, _usage(cmd))
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
        'exec %s -I -S %s "$@"' % (shlex.quote(python or sys.executable),
                             shlex.quote(os.path.abspath(__file__))),
        "",
    ])
    with open(wrapper, "w", encoding="utf-8") as f:
        f.write(script)
    os.chmod(wrapper, 0o755)
    return wrapper

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
            raise FakeTyError("bad value in control file %s: %s" % (_control_path(state_path), e)) from e
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

    with _lock(state_path):
        state = _load(state_path)
        if plan["fail"]:
            message = control.get("fail_message") or DEFAULT_FAIL_MESSAGE
            code, out, err, injected = 1, "", message + "\n", "fail"
        else:
            before = copy.deepcopy({k: state[k] for k in ("tasks", "next_id", "projects")})
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
