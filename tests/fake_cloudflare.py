"""A fake of Cloudflare's REST API v4 and workers.dev, as hard as the platform, around real Workers in miniflare.

Only what cannot run here is faked: the REST API, the workers.dev edge and KV's
global store. The Worker is the real module the sidecar uploads, run by
miniflare (workerd); its KV binding is a wrapped binding that calls this fake,
so every script bound to a namespace shares one store and the fake decides
what REST reads see and when. API calls answer in Cloudflare's envelope
(``success``, ``errors`` with ``code``/``message``/``error_chain``, ``result``,
``result_info``):

  GET    /client/v4/accounts/{acct}/workers/subdomain
  GET    /client/v4/accounts/{acct}/workers/scripts
  PUT    /client/v4/accounts/{acct}/workers/scripts/{name}            multipart: metadata + modules
  DELETE /client/v4/accounts/{acct}/workers/scripts/{name}
  GET    /client/v4/accounts/{acct}/workers/scripts/{name}/subdomain
  POST   /client/v4/accounts/{acct}/workers/scripts/{name}/subdomain  {"enabled": true}
  GET    /client/v4/accounts/{acct}/storage/kv/namespaces/{ns}/keys?prefix=&limit=&cursor=
  GET    /client/v4/accounts/{acct}/storage/kv/namespaces/{ns}/values/{key}

workers.dev is served at /__workers/{name}/ (a streaming proxy to the script's
miniflare), the Worker-side KV at /__kv/{ns}/{op}.

`Platform()` is the platform as documented; each knob can be scaled down for a
test (`Platform.scaled()`), or turned off (`Platform.kind()`, the fake as it was).
Where each behaviour is documented:

- Work after a disconnect: "When the client disconnects, all tasks associated
  with that client request are canceled. Use event.waitUntil() to delay
  cancellation for another 30 seconds":
  https://developers.cloudflare.com/workers/platform/limits/#duration (and
  https://developers.cloudflare.com/workers/runtime-apis/context/#waituntil ).
  Here: once a stream is cut, or its caller goes away, the script's workerd is
  killed ``waituntil_s`` later (harder than the platform: every request then in
  flight on that script dies with it), and restarted.
- KV is eventually consistent: "changes are usually immediately visible in the
  location at which they are made, but may take up to 60 seconds or more to be
  visible in other global network locations"; negative lookups are cached too
  (``cacheTtl``, 60 s by default), and list results are eventually consistent.
  https://developers.cloudflare.com/kv/concepts/how-kv-works/ and
  https://developers.cloudflare.com/kv/api/read-key-value-pairs/#cachettl-parameter .
  Here: a write reaches the Worker side at once, REST reads and lists after a
  per-write delay drawn from [0, ``kv_delay_s``] (so keys can appear out of
  order), and "or more": a share ``kv_late_share`` of writes (5 %) takes from
  ``kv_delay_s`` to ``kv_late_factor`` times it (up to 120 s), and
  ``kv_late_keys`` holds the delay of a write to a given key for a test; a REST read
  that found nothing keeps answering "not found" for ``kv_negative_ttl_s``.
- KV lists page at 1000 keys (``limit`` 10..1000) with ``result_info.cursor``,
  and "it is possible to have an empty page of results, even if there are
  more": https://developers.cloudflare.com/kv/api/list-keys/ and
  https://developers.cloudflare.com/api/resources/kv/subresources/namespaces/subresources/keys/methods/list/ .
  Here, with ``short_pages``, a page holds a random number of keys (often 0).
- KV key 512 bytes, value 25 MiB, metadata 1024 bytes (measured as the
  runtime serialises it, ``JSON.stringify``: compact, UTF-8, not Python's
  spaced ASCII), ``expirationTtl`` at
  least 60 s: https://developers.cloudflare.com/kv/platform/limits/ ; free-plan
  daily quotas, 100,000 reads and 1,000 writes, deletes and lists, reset at
  00:00 UTC: same page and https://developers.cloudflare.com/kv/platform/pricing/ ;
  over them the Worker's call throws ("KV put() limit exceeded for the day.")
  and REST answers 429 with code 10048 (the code as wrangler users report it).
- API rate limit: 1,200 requests per five minutes per user (dashboard, API key
  and token alike); over it, HTTP 429 and every call blocked for the next five
  minutes: https://developers.cloudflare.com/fundamentals/api/reference/limits/ .
  Here: a sliding window per token, ``Retry-After`` on every 429, whose body
  is code 971 "Please wait and consider throttling your request speed" (as
  reported in cloudflare/workers-sdk#10025).
- Scripts per account: 100 (Free), 500 (Paid); creating one more is HTTP 403
  code 10037 ("You have exceeded the limit of 100 Workers on your account."),
  re-uploading an existing one still works:
  https://developers.cloudflare.com/workers/platform/limits/#number-of-workers and
  https://developers.cloudflare.com/workers/platform/error-codes/10037/ .
- A new workers.dev route is not reachable at once: wrangler's own end-to-end
  tests wait for it (workers-sdk, packages/wrangler/e2e/helpers/
  wait-for-workers-dev.ts: 404 and any 5xx mean "not propagated yet", for up
  to 60 s); https://developers.cloudflare.com/workers/configuration/routing/workers-dev/ .
  Here: 404 or 523, at random, for ``route_delay_s`` after the first enable,
  and (``route_flaps``) a 404 or a 5xx now and then after it answered once
  (``route_flap_statuses``: 404, 502, 503, 530).
- CPU time: 10 ms on Free, 30 s default on Paid, up to 300,000 ms with
  ``limits.cpu_ms`` in the upload metadata:
  https://developers.cloudflare.com/workers/platform/limits/#cpu-time ; an
  out-of-range value is refused at upload, and on the Free plan any value is
  (HTTP 400 code 100328 "CPU limits are not supported for the Free plan",
  cloudflare/workers-sdk#8756). Enforced at run time by the fake's CPU meter
  (below).
- ``observability`` in the upload metadata, ``{"enabled": bool,
  "head_sampling_rate": 0..1}``:
  https://developers.cloudflare.com/workers/observability/logs/workers-logs/ .
- Errors as the API sends them
  (https://developers.cloudflare.com/workers/platform/error-codes/ ): a
  malformed Authorization header is HTTP 400, code 6003 "Invalid request
  headers" with ``error_chain`` [6111 "Invalid format for Authorization
  header"] (wrangler's changelog, "display chained errors"); a token that is
  not valid is 403 code 10000 "Authentication error"; a valid token without
  the permission, 403/10000 or 401 code 10023 "Unauthorized" (``scoped``);
  an account with no workers.dev subdomain answers the subdomain GET with 404
  code 10007; a missing script is 404/10007
  "workers.api.error.script_not_found".
- KV operations per Worker invocation: 1,000 ("Operations/Worker invocation
  1000", same page: "Within a single invocation, a Worker can make up to 1,000
  operations to external services"); past it the binding's call fails with
  "Too many API requests by single Worker invocation." (as Worker authors
  report it, e.g. edelauna/github-semantic-search-mcp#20). Here: counted per
  request by a main module of the fake's around the uploaded one
  (tests/cloudflare/launcher.mjs), ``kv_ops_per_invocation``.
- One write per second to a key: "Writes made to the same key within 1 second
  will cause rate limiting (429) errors to be thrown", the Worker seeing
  "KV PUT failed: 429 Too Many Requests":
  https://developers.cloudflare.com/kv/api/write-key-value-pairs/ (Limits to
  KV writes to the same key). Here: every put that reaches KV starts its key's
  second (``kv_key_write_gap_s``); a put within it is refused, not stored.
- CPU time per request: 10 ms on Workers Free, 30 s by default on Paid, up to
  5 min with ``limits.cpu_ms``: "CPU time is the time spent executing code
  ... Time spent on network requests ... does not count"
  (https://developers.cloudflare.com/workers/platform/limits/#cpu-time and
  https://developers.cloudflare.com/support/troubleshooting/http-status-codes/
  cloudflare-1xxx-errors/error-1102/ ).
  Past it the invocation is ended, "a fatal error and there is no way to
  catch it": a Worker that had not answered yet gets error 1102 (HTTP 503),
  one whose response was streaming is cut off mid-way, its client getting
  "only part of" the body (community.cloudflare.com, "Streaming response catch
  'Worker exceeded CPU time limit.' error"); the invocation log says
  ``exceededCpu``. Here: a CPU meter per pass request reads the real CPU time
  of the script's workerd (``/proc``, every thread) and, past the plan's limit
  (``cpu_ms``; a Paid upload's ``limits.cpu_ms``), ends it (workerd killed
  and started again: every request on it dies, as all requests on an isolate
  do) and cuts the stream, recording what the platform shows in ``outcomes``.
  Two passes at once on one script are metered together (harder than the
  platform).
- Workers runtime updates: "Processes running the previous version stop
  accepting these requests and drain existing work ... When it ends,
  unfinished requests and open connections on that process are terminated";
  the grace was "up to 30 seconds" (and is "up to 20 minutes" since
  https://developers.cloudflare.com/changelog/post/2026-10-12-longer-runtime-update-grace-period/ ;
  "up to": the fake keeps the shorter). Here: ``restart_runtime()`` starts a
  fresh workerd for every script at once (new requests go there) and ends the
  old one ``restart_grace_s`` later, with whatever still runs on it.
- Workers Free: 100,000 requests a day (past it, error 1027) and a burst rate
  of 1,000 requests a minute (error 1015), counted per account with
  workers.dev: https://developers.cloudflare.com/workers/platform/limits/#daily-requests
  (the burst section left that page later, cloudflare-docs#26127; 1015 is
  still what a rate-limited Worker answers). Subrequests (``fetch``): 50 per
  invocation on Free, 10,000 on Paid (#subrequests there); past them ``fetch``
  fails with "Too many subrequests." Here: ``requests_per_minute``,
  ``requests_per_day`` (Free only) answer HTTP 429 with the error code, and
  ``subrequests`` is counted by the fake's main module, as KV operations are.
- One KV store per namespace, shared by every script bound to it; a re-upload
  (or a delete) does not kill requests in flight on the old version, which
  finish on it: https://developers.cloudflare.com/workers/configuration/versions-and-deployments/ .

Requests without a User-Agent are answered as usual but recorded in
``no_user_agent``, so a test can require one on every call.
"""
import collections
import contextlib
import email.parser
import email.policy
import http.client
import http.server
import json
import math
import os
import random
import re
import secrets
import select
import shutil
import socket
import signal
import subprocess
import threading
import time
import urllib.parse

from tests.util import ROOT

# The node_modules folder holding miniflare: `make test` names it (.ci/ or its cache outside
# the checkout), else `make cf-tools`'s.
MINIFLARE_DIR = os.environ.get("TYOW_MINIFLARE_DIR") or os.path.join(ROOT, ".ci", "node_modules")
LAUNCHER = os.path.join(ROOT, "tests", "cloudflare", "launcher.mjs")
SCRIPT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,61}[a-z0-9]$")
MODULE_TYPES = ("application/javascript+module", "text/javascript+module")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,}$")


def have_miniflare():
    return shutil.which("node") is not None and os.path.isdir(os.path.join(MINIFLARE_DIR, "miniflare"))


def envelope(result=None, errors=None, status=200, result_info=None):
    doc = {"success": not errors, "errors": errors or [], "messages": [], "result": result}
    if result_info is not None:
        doc["result_info"] = result_info
    return status, doc


def error(status, code, message, chain=None):
    err = {"code": code, "message": message}
    if chain:
        err["error_chain"] = [{"code": c, "message": m} for c, m in chain]
    return envelope(errors=[err], status=status)


def js_json_bytes(value):
    """How many bytes ``JSON.stringify(value)`` makes in UTF-8 (what KV measures metadata by):
    compact, non-ASCII as itself, a lone surrogate as its escape."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    text = re.sub("[\ud800-\udfff]", lambda m: "\\u%04x" % ord(m.group()), text)
    return len(text.encode("utf-8"))


class Platform:
    """The platform's limits and delays, as documented (see the module docstring)."""

    def __init__(self, **overrides):
        self.waituntil_s = 30.0
        self.kv_delay_s = 60.0
        self.kv_negative_ttl_s = 60.0
        self.short_pages = True
        self.rate_limit = 1200
        self.rate_window_s = 300.0
        self.rate_block_s = 300.0
        self.kv_daily = {"read": 100000, "write": 1000, "list": 1000, "delete": 1000}
        self.script_cap = 100
        self.route_delay_s = 60.0
        self.kv_late_share = 0.05  # "60 seconds or more": this share of writes is later still
        self.kv_late_factor = 2.0  # ... by up to this many times kv_delay_s
        self.kv_ops_per_invocation = 1000
        self.kv_key_write_gap_s = 1.0
        self.cpu_meter = True
        self.cpu_ms = {"free": 10, "paid": 30000}  # a Paid upload's limits.cpu_ms comes first
        self.restart_grace_s = 30.0
        self.subrequests = {"free": 50, "paid": 10000}
        self.requests_per_minute = 1000  # Workers Free only, as the two below
        self.requests_per_day = 100000
        self.route_flap_statuses = (404, 502, 503, 530)
        self.seed = 1
        self.plan = "paid"  # "free": no limits.cpu_ms in uploads, 10 ms of CPU, request limits
        for key, value in overrides.items():
            if not hasattr(self, key):
                raise TypeError("no platform knob %r" % key)
            setattr(self, key, value)

    @classmethod
    def scaled(cls, **overrides):
        """The same behaviours on a test's time scale: delays of a second or two, not a minute.
        Writes later than the rest (kv_late_share) come only where a test asks for them."""
        base = dict(waituntil_s=2.0, kv_delay_s=1.5, kv_negative_ttl_s=1.0, route_delay_s=0.2,
                    restart_grace_s=1.0, kv_late_share=0.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def kind(cls, **overrides):
        """Nothing late, nothing limited: the fake as it was before it learnt the platform."""
        base = dict(waituntil_s=None, kv_delay_s=0.0, kv_negative_ttl_s=0.0, short_pages=False, rate_limit=None,
                    kv_daily={}, script_cap=None, route_delay_s=0.0, kv_late_share=0.0,
                    kv_ops_per_invocation=None, kv_key_write_gap_s=0.0, cpu_meter=False,
                    subrequests={}, requests_per_minute=None, requests_per_day=None)
        base.update(overrides)
        return cls(**base)


class KvNamespace:
    """One namespace's keys: every write, with when the Worker side and the REST side may see it."""

    def __init__(self, fake):
        self.fake = fake
        self.versions = {}  # key -> [(visible_at, value, metadata, expiration)], newest last
        self.not_found_until = {}  # key -> REST "not found" cached until
        self.lock = threading.Lock()

    def _alive(self, version, now):
        return version[3] is None or version[3] > now

    def write(self, key, value, metadata, expiration):
        now = time.time()
        delay = self.fake.kv_delay(key)
        with self.lock:
            self.versions.setdefault(key, []).append((now + delay, value, metadata, expiration))

    def delete(self, key):
        with self.lock:
            self.versions.pop(key, None)

    def worker_get(self, key):
        """The Worker's own location: its writes are visible to it at once."""
        now = time.time()
        with self.lock:
            vs = self.versions.get(key)
            if vs and self._alive(vs[-1], now):
                return {"value": vs[-1][1], "metadata": vs[-1][2]}
            return None

    def _rest_version(self, key, now):
        visible = [v for v in self.versions.get(key, []) if v[0] <= now]
        return visible[-1] if visible and self._alive(visible[-1], now) else None

    def rest_get(self, key):
        now = time.time()
        with self.lock:
            if self.not_found_until.get(key, 0) > now:
                return None
            v = self._rest_version(key, now)
            if v is None and self.fake.platform.kv_negative_ttl_s:
                self.not_found_until[key] = now + self.fake.platform.kv_negative_ttl_s
            return v

    def list_keys(self, prefix, rest):
        now = time.time()
        with self.lock:
            out = []
            for key in sorted(self.versions, key=lambda k: k.encode("utf-8")):
                if not key.startswith(prefix):
                    continue
                v = self._rest_version(key, now) if rest else (self.versions[key][-1] if self._alive(
                    self.versions[key][-1], now) else None)
                if v is not None:
                    item = {"name": key}
                    if v[3] is not None:
                        item["expiration"] = int(v[3])
                    if v[2] is not None:
                        item["metadata"] = v[2]
                    out.append(item)
            return out


class Script:
    """One uploaded Worker: a miniflare process (started again when the platform ends its work)."""

    def __init__(self, fake, name, metadata, module_dir):
        self.fake, self.name, self.metadata, self.module_dir = fake, name, metadata, module_dir
        self.enabled = False
        self.enabled_at = None
        self.created_on = self.modified_on = time.time()
        self.inflight = 0
        self.retired = False
        self.lock = threading.Lock()
        self.proc = None
        self.url = None
        self.workerd = ()  # pids of the current process's workerd (its CPU is the meter's)
        self.generation = 0
        self.draining = []  # processes of a runtime restart, ending after their grace
        with open(os.path.join(module_dir, "limits.json"), "w") as f:
            plan = fake.platform.plan
            json.dump({"kv_ops": fake.platform.kv_ops_per_invocation,
                       "subrequests": fake.platform.subrequests.get(plan)}, f)
        self._start()

    def _start(self):
        argv = ["node", LAUNCHER, MINIFLARE_DIR, os.path.join(self.module_dir, "metadata.json"),
                self.module_dir, "127.0.0.1:%d" % self.fake.port,
                os.path.join(self.module_dir, "limits.json")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, TMPDIR=self.module_dir),
                                     start_new_session=True)  # its group holds workerd too: killed together
        self.fake.groups.add(self.proc.pid)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("miniflare did not start for %s" % self.name)
        self.url = json.loads(line)["url"].rstrip("/")
        self.workerd = tuple(pid for pid, comm in group_processes(self.proc.pid)
                             if comm == "workerd")
        self.generation += 1

    def cpu_limit_ms(self):
        """The CPU time a request may use: the plan's, or a Paid upload's ``limits.cpu_ms``."""
        p = self.fake.platform
        if not p.cpu_meter:
            return None
        limits = self.metadata.get("limits") or {}
        return limits.get("cpu_ms") or p.cpu_ms.get(p.plan)

    def kill_work(self, generation, why="the platform ended its work after its caller went away"):
        """The platform ends the script's work: its workerd dies (then serves again)."""
        with self.lock:
            if self.generation != generation or self.proc is None:
                return
            self.fake.kills.append((self.name, time.time(), why))
            self._stop(self.proc, hard=True)
            self.proc = None
            if not self.retired:
                self._start()

    def restart(self, grace_s):
        """A runtime update: a fresh process takes new requests, the old one ends ``grace_s``
        later."""
        with self.lock:
            if self.proc is None or self.retired:
                return
            old = self.proc
            self.draining.append(old)
            self._start()
        t = threading.Timer(grace_s, self._end_drained, (old,))
        t.daemon = True
        t.start()

    def _end_drained(self, proc):
        with self.lock:
            if proc not in self.draining:
                return
            self.draining.remove(proc)
            self.fake.kills.append((self.name, time.time(), "a runtime restart ended it"))
            self._stop(proc, hard=True)

    @staticmethod
    def _stop(proc, hard=False):
        try:
            if not hard and proc.poll() is None:
                proc.stdin.close()  # miniflare disposes of its workerd and exits
                proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (workerd after a kill)
        with contextlib.suppress(OSError, ValueError):
            proc.stdout.close()
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        proc.wait()

    def stop(self):
        with self.lock:
            for proc in [self.proc] + self.draining:
                if proc is not None:
                    self._stop(proc, hard=True)  # at once: nothing of it needs keeping
            self.proc, self.draining = None, []

    def retire(self):
        """Replaced or deleted: requests in flight finish on it, then it stops."""
        with self.lock:
            self.retired = True
            idle = self.inflight == 0
        if idle:
            self.stop()

    def enter(self):
        with self.lock:
            self.inflight += 1
            return self.url, self.generation, self.workerd

    def leave(self):
        with self.lock:
            self.inflight -= 1
            done = self.retired and self.inflight == 0
        if done:
            self.stop()


def group_processes(pgid):
    """(pid, command name) of the live processes in a process group."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append((int(pid), head.split("(", 1)[1]))
    return found


def cpu_time_ms(pids):
    """The CPU time the processes have used, every thread of them, in ms (Linux /proc)."""
    total_ns = 0
    for pid in pids:
        try:
            tasks = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
                    total_ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total_ns / 1e6


class CpuMeter:
    """The CPU time of one request to a script, from its workerd: past ``limit_ms``, the platform
    ends the invocation (``on_exceeded(used_ms)``, once)."""

    def __init__(self, pids, limit_ms, on_exceeded):
        self.pids, self.limit_ms, self.on_exceeded = pids, limit_ms, on_exceeded
        self.used_ms = None  # set once the limit was passed
        self.done = threading.Event()
        self.base = cpu_time_ms(pids)
        self.interval_s = min(0.25, max(0.002, limit_ms / 5000.0))
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self.done.wait(self.interval_s):
            used = cpu_time_ms(self.pids) - self.base
            if used > self.limit_ms:
                self.used_ms = used
                self.on_exceeded(used)
                return

    def stop(self):
        self.done.set()


class FakeCloudflare:
    def __init__(self, workdir, account_id="acct0123456789abcdef", subdomain="tyow-test", platform=None):
        self.workdir = workdir
        self.account_id = account_id
        self.subdomain = subdomain  # None: the account has no workers.dev subdomain
        self.platform = platform or Platform.scaled()
        self.rng = random.Random(self.platform.seed)
        self.token = "cf-test-" + secrets.token_hex(12)
        self.scoped = True  # else (status, code, message): the token is valid but may not edit Workers
        self.namespace = secrets.token_hex(16)
        self.kv = {self.namespace: KvNamespace(self)}
        self.scripts = {}
        self.calls = []  # (method, path, status) of every API call
        self.uploads = []
        self.deletes = []
        self.kills = []
        self.groups = set()  # process groups of the scripts' miniflare (node and its workerd)
        self.no_user_agent = []
        self.worker_requests = []  # (name, method, path, status) at workers.dev
        self.kv_usage = collections.Counter()
        self.cut_stream_after = None  # drop the next worker response after this many event lines
        self.stall_stream_after = None  # stop forwarding the next response (connection kept) after this many
        self.kv_put_errors = 0  # the next N Worker-side puts fail (a 500 from KV), stored or not (``kv_put_lands``)
        self.kv_put_lands = False
        self.kv_put_error_match = None  # only puts whose value holds this count for kv_put_errors
        self.kv_late_keys = {}  # key suffix -> REST delay (s) of the next Worker write to one
        self.kv_key_writes = {}  # (namespace, key) -> when a put last reached it (one a second)
        self.kv_rate_limited = 0  # puts refused for coming within a second of the last on their key
        self.outcomes = []  # what the platform shows of invocations it ended (Workers Logs)
        self.route_flaps = 0  # the next N pass requests meet an edge that does not know the route
        self.worker_minute = collections.deque()  # Workers Free: requests of the last minute
        self.worker_day = collections.Counter()  # Workers Free: requests per UTC day
        self.fail_next = collections.deque()  # (method regex, path regex, status, Retry-After or None) injections
        self.rate_times = collections.deque()
        self.blocked_until = 0.0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        fake = self

        class Handler(_Handler):
            cf = fake

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        # Polled often: stop() (the end of every test) waits for a poll to notice.
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def kv_delay(self, key=""):
        """How long a Worker-side write takes to reach REST reads and lists."""
        p = self.platform
        with self.lock:
            for suffix in list(self.kv_late_keys):
                if key.endswith(suffix):
                    return self.kv_late_keys.pop(suffix)
        delay = self.rng.uniform(0, p.kv_delay_s) if p.kv_delay_s else 0.0
        if p.kv_delay_s and p.kv_late_share and self.rng.random() < p.kv_late_share:
            delay = self.rng.uniform(p.kv_delay_s, p.kv_late_factor * p.kv_delay_s)
        return delay

    def restart_runtime(self, grace_s=None):
        """A Workers runtime update: every script moves to a fresh process at once, and what runs
        on the old one ends ``grace_s`` (``restart_grace_s``) later."""
        grace = self.platform.restart_grace_s if grace_s is None else grace_s
        for script in list(self.scripts.values()):
            script.restart(grace)

    def worker_limited(self):
        """The Free plan's request limits, per account: (status, error code) past one, else None."""
        p = self.platform
        if p.plan != "free":
            return None
        now = time.time()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        with self.lock:
            while self.worker_minute and self.worker_minute[0] <= now - 60:
                self.worker_minute.popleft()
            if p.requests_per_day is not None and self.worker_day[day] >= p.requests_per_day:
                return 429, 1027
            minute = len(self.worker_minute)
            if p.requests_per_minute is not None and minute >= p.requests_per_minute:
                return 429, 1015
            self.worker_minute.append(now)
            self.worker_day[day] += 1
        return None

    @property
    def api_base(self):
        return "http://127.0.0.1:%d/client/v4" % self.port

    def config(self, token_cmd, extra="", margin_s=3.0):
        """The `adapters:` block (indented for TempHome.adapter_config) pointing at this fake."""
        p = self.platform
        # The sidecar's recovery window follows the platform: the Worker's 30 s plus KV's delay,
        # and a margin.
        window = "%dms" % int(1000 * ((p.waituntil_s or 0) + p.kv_delay_s + margin_s))
        return ("  cloudflare:\n    enabled: true\n    account_id: %s\n    namespace: %s\n"
                "    api_token_cmd: \"%s\"\n    api_base: %s\n    workers_url: \"http://127.0.0.1:%d/__workers/{script}\"\n"
                "    recovery_window: %s\n    ready_timeout: 30s\n%s"
                % (self.account_id, self.namespace, token_cmd, self.api_base, self.port, window, extra))

    def stop(self):
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for s in list(self.scripts.values()):
            s.retired = True
            s.stop()

    def leftovers(self):
        """Processes of the scripts' groups still alive (after stop(): none)."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) in self.groups:
                found.append(int(pid))
        return found

    # -- the API ------------------------------------------------------------------

    def _rate_limited(self, token):
        """The sliding window of 1,200 calls per 5 minutes, and the 5-minute block past it."""
        p = self.platform
        if not p.rate_limit:
            return None
        now = time.time()
        with self.lock:
            if now < self.blocked_until:
                return self.blocked_until - now
            while self.rate_times and self.rate_times[0] <= now - p.rate_window_s:
                self.rate_times.popleft()
            if len(self.rate_times) >= p.rate_limit:
                self.blocked_until = now + p.rate_block_s
                self.rate_times.clear()  # a fresh window once the block is over
                return p.rate_block_s
            self.rate_times.append(now)
        return None

    def _injected(self, method, path):
        with self.lock:
            for i, (m, pth, status, retry_after) in enumerate(self.fail_next):
                if re.fullmatch(m, method) and re.search(pth, path):
                    del self.fail_next[i]
                    return status, retry_after
        return None

    def _auth(self, headers):
        value = headers.get("Authorization") or ""
        if not value.startswith("Bearer ") or not TOKEN_RE.match(value[len("Bearer "):]):
            return error(400, 6003, "Invalid request headers", [(6111, "Invalid format for Authorization header")])
        if value != "Bearer " + self.token:
            return error(403, 10000, "Authentication error")
        if self.scoped is not True:
            return error(*self.scoped)
        return None

    def handle_api(self, method, path, query, headers, body):
        refused = self._auth(headers)
        if refused:
            return refused + ({},)
        wait = self._rate_limited(headers.get("Authorization"))
        if wait is not None:
            return error(429, 971, "Please wait and consider throttling your request speed") + (
                {"Retry-After": str(int(math.ceil(wait)))},)
        injected = self._injected(method, path)
        if injected:
            status, retry_after = injected
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            if status == 429:
                return error(429, 971, "Please wait and consider throttling your request speed") + (extra,)
            return error(status, 10013, "An unknown error has occurred") + (extra,)
        return self._route(method, path, query, headers, body) + ({},)

    def _route(self, method, path, query, headers, body):
        acct = "/accounts/%s" % self.account_id
        if not path.startswith(acct + "/"):
            return error(400, 7003, "Could not route to %s, perhaps your object identifier is invalid?" % path)
        rest = path[len(acct):]
        if method == "GET" and rest == "/workers/subdomain":
            if self.subdomain is None:
                return error(404, 10007, "This subdomain does not exist.")
            return envelope({"subdomain": self.subdomain})
        if method == "GET" and rest == "/workers/scripts":
            return envelope([{"id": s.name, "created_on": _iso(s.created_on), "modified_on": _iso(s.modified_on)}
                             for s in self.scripts.values()])
        m = re.fullmatch(r"/workers/scripts/([^/]+)", rest)
        if m and method == "PUT":
            return self.upload(m.group(1), headers.get("Content-Type", ""), body)
        if m and method == "DELETE":
            with self.lock:
                script = self.scripts.pop(m.group(1), None)
            if script is None:
                return error(404, 10007, "workers.api.error.script_not_found")
            self.deletes.append(m.group(1))
            script.retire()
            return envelope(None)
        m = re.fullmatch(r"/workers/scripts/([^/]+)/subdomain", rest)
        if m and method in ("GET", "POST"):
            script = self.scripts.get(m.group(1))
            if script is None:
                return error(404, 10007, "workers.api.error.script_not_found")
            if method == "GET":
                return envelope({"enabled": script.enabled, "previews_enabled": False})
            try:
                doc = json.loads(body)
            except ValueError:
                return error(400, 10026, "could not parse body")
            if not isinstance(doc, dict) or not isinstance(doc.get("enabled"), bool):
                return error(400, 10026, "enabled is required")
            if doc["enabled"] and script.enabled_at is None:
                script.enabled_at = time.time()
            script.enabled = doc["enabled"]
            return envelope({"enabled": script.enabled, "previews_enabled": False})
        m = re.fullmatch(r"/storage/kv/namespaces/([^/]+)/(keys|values/(.+))", rest)
        if m and method == "GET":
            ns = self.kv.get(m.group(1))
            if ns is None:
                return error(404, 10013, "list keys: 'namespace not found'")
            if m.group(2) == "keys":
                if not self._quota("list"):
                    return error(429, 10048, "KV list() limit exceeded for the day.")
                return self._list(ns, query)
            if not self._quota("read"):
                return error(429, 10048, "KV get() limit exceeded for the day.")
            got = ns.rest_get(urllib.parse.unquote(m.group(3)))
            if got is None:
                return error(404, 10009, "get: 'key not found'")
            return 200, got[1].encode("utf-8")
        return error(404, 7000, "No route for that URI")

    def _list(self, ns, query):
        prefix = query.get("prefix", [""])[0]
        try:
            limit = int(query.get("limit", ["1000"])[0])
        except ValueError:
            return error(400, 10026, "limit must be a number")
        if not 10 <= limit <= 1000:
            return error(400, 10026, "limit must be between 10 and 1000")
        cursor = query.get("cursor", [""])[0]
        after = urllib.parse.unquote(cursor) if cursor else None
        keys = [k for k in ns.list_keys(prefix, rest=True) if after is None or k["name"].encode() > after.encode()]
        size = limit
        if self.platform.short_pages and keys:
            size = min(limit, self.rng.choice([0, 0, 1, 2, limit]))
        page, more = keys[:size], len(keys) > size
        last = page[-1]["name"] if page else after
        next_cursor = urllib.parse.quote(last or "\x00", safe="") if more else ""
        return envelope(page, result_info={"count": len(page), "cursor": next_cursor})

    def _quota(self, kind):
        limit = self.platform.kv_daily.get(kind)
        with self.lock:
            self.kv_usage[kind] += 1
            return limit is None or self.kv_usage[kind] <= limit

    def upload(self, name, content_type, body):
        def bad(message, code=10021):
            return error(400, code, message)

        if not SCRIPT_NAME_RE.match(name):
            return bad("invalid script name", 10016)
        if not content_type.startswith("multipart/form-data"):
            return bad("expected multipart/form-data")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        parts = {}
        for part in msg.iter_parts():
            parts[part.get_param("name", header="content-disposition")] = part
        if "metadata" not in parts:
            return bad("missing metadata part")
        try:
            metadata = json.loads(parts["metadata"].get_payload(decode=True))
        except ValueError:
            return bad("metadata is not JSON")
        main = metadata.get("main_module")
        if not main or main not in parts:
            return bad("main_module must name an uploaded module part")
        if parts[main].get_content_type() not in MODULE_TYPES:
            return bad("the main module must be application/javascript+module")
        for b in metadata.get("bindings", []):
            if b.get("type") == "kv_namespace" and b.get("namespace_id") not in self.kv:
                return bad("KV namespace '%s' is not valid." % b.get("namespace_id"), 10041)
            if b.get("type") == "secret_text" and not isinstance(b.get("text"), str):
                return bad("secret_text bindings must include a text property")
        limits = metadata.get("limits")
        if limits is not None:
            cpu = limits.get("cpu_ms") if isinstance(limits, dict) else None
            if self.platform.plan == "free":
                return bad("CPU limits are not supported for the Free plan. Switch to a paid plan to set CPU "
                           "limits.", 100328)
            if not isinstance(cpu, int) or isinstance(cpu, bool) or not 1 <= cpu <= 300000:
                return bad("limits.cpu_ms must be a whole number of milliseconds from 1 to 300000", 10021)
        obs = metadata.get("observability")
        if obs is not None:
            rate = obs.get("head_sampling_rate", 1) if isinstance(obs, dict) else None
            if not isinstance(obs, dict) or not isinstance(obs.get("enabled"), bool) or not (
                    isinstance(rate, (int, float)) and 0 <= rate <= 1):
                return bad("observability must be {enabled: bool, head_sampling_rate: 0..1}")
        with self.lock:
            if (self.platform.script_cap and name not in self.scripts
                    and len(self.scripts) >= self.platform.script_cap):
                return error(403, 10037, "You have exceeded the limit of %d Workers on your account."
                             % self.platform.script_cap)
        module_dir = os.path.join(self.workdir, "scripts", name + "-" + secrets.token_hex(3))
        os.makedirs(module_dir)
        with open(os.path.join(module_dir, "metadata.json"), "w") as f:
            json.dump(metadata, f)
        with open(os.path.join(module_dir, main), "wb") as f:
            f.write(parts[main].get_payload(decode=True))
        try:
            script = Script(self, name, metadata, module_dir)
        except (RuntimeError, ValueError) as exc:
            return bad("Uncaught error at startup: %s" % exc, 10021)
        with self.lock:
            old = self.scripts.get(name)
            if old is not None:
                script.enabled, script.enabled_at, script.created_on = old.enabled, old.enabled_at, old.created_on
            self.scripts[name] = script
        if old is not None:
            old.retire()  # its requests in flight finish on the old version
        self.uploads.append({"name": name, "metadata": metadata, "module": parts[main].get_payload(decode=True)})
        return envelope({"id": name, "etag": secrets.token_hex(8), "startup_time_ms": 1})

    # -- the Worker side of KV -----------------------------------------------------

    def handle_kv(self, ns_id, op, doc):
        ns = self.kv.get(ns_id)
        if ns is None:
            return {"error": "KV namespace not found"}
        key = doc.get("key")
        if op in ("get", "put", "delete") and (not isinstance(key, str) or not key or len(key.encode()) > 512):
            return {"error": "KV %s failed: 414 UTF-8 encoded length of %d exceeds key length limit of 512."
                    % (op, len(str(key).encode()))}
        if op == "get":
            if not self._quota("read"):
                return {"error": "KV get() limit exceeded for the day."}
            return {"result": ns.worker_get(key)}
        if op == "put":
            if not self._quota("write"):
                return {"error": "KV put() limit exceeded for the day."}
            ttl, expiration, metadata = doc.get("expirationTtl"), doc.get("expiration"), doc.get("metadata")
            if ttl is not None and ttl < 60:
                return {"error": "KV PUT failed: 400 Invalid expiration_ttl of %s. Expiration TTL must be at "
                                 "least 60." % ttl}
            if metadata is not None and js_json_bytes(metadata) > 1024:
                return {"error": "KV PUT failed: 413 Metadata length of %d exceeds limit of 1024."
                                 % js_json_bytes(metadata)}
            if len(doc.get("value", "").encode()) > 25 * 1024 * 1024:
                return {"error": "KV PUT failed: 413 Value length exceeds limit of 26214400."}
            at = time.time() + ttl if ttl is not None else expiration
            now, gap = time.time(), self.platform.kv_key_write_gap_s
            with self.lock:
                last = self.kv_key_writes.get((ns_id, key))
                if gap and last is not None and now - last < gap:
                    self.kv_rate_limited += 1
                    return {"error": "KV PUT failed: 429 Too Many Requests"}
                self.kv_key_writes[(ns_id, key)] = now
                match = self.kv_put_error_match
                fail = self.kv_put_errors > 0 and (match is None or match in doc.get("value", ""))
                self.kv_put_errors -= fail
            if fail and not self.kv_put_lands:
                return {"error": "KV PUT failed: 500 Internal Server Error"}
            ns.write(key, doc.get("value", ""), metadata, at)
            if fail:  # it was stored, yet the Worker is told it failed
                return {"error": "KV PUT failed: 500 Internal Server Error"}
            return {"result": None}
        if op == "delete":
            if not self._quota("delete"):
                return {"error": "KV delete() limit exceeded for the day."}
            ns.delete(key)
            return {"result": None}
        if op == "list":
            if not self._quota("list"):
                return {"error": "KV list() limit exceeded for the day."}
            prefix, cursor = doc.get("prefix") or "", doc.get("cursor")
            keys = [k for k in ns.list_keys(prefix, rest=False) if not cursor or k["name"] > cursor]
            limit = int(doc.get("limit") or 1000)
            page = keys[:limit]
            more = len(keys) > limit
            return {"result": {"keys": page, "list_complete": not more,
                               **({"cursor": page[-1]["name"]} if more else {})}}
        return {"error": "unknown KV operation %r" % op}


def _iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(t))


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a caller that went away is no error of the fake's


class _Handler(http.server.BaseHTTPRequestHandler):
    cf = None
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status, data, ctype, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _route(self):
        parts = urllib.parse.urlsplit(self.path)
        body = self._body()
        if parts.path.startswith("/__kv/"):
            _, _, ns_id, op = parts.path.split("/", 3)
            try:
                doc = json.loads(body or b"{}")
            except ValueError:
                doc = {}
            out = self.cf.handle_kv(ns_id, op, doc)
            return self._send(200, json.dumps(out).encode(), "application/json")
        if parts.path == "/__echo":  # somewhere for a Worker's fetch() to go
            return self._send(200, b"ok\n", "text/plain")
        if not self.headers.get("User-Agent"):
            with self.cf.lock:
                self.cf.no_user_agent.append((self.command, parts.path))
        if parts.path.startswith("/__workers/"):
            return self.proxy(parts, body)
        extra = {}
        if parts.path.startswith("/client/v4/"):
            status, doc, extra = self.cf.handle_api(self.command, parts.path[len("/client/v4"):],
                                                    urllib.parse.parse_qs(parts.query), self.headers, body)
        else:
            status, doc = error(404, 7000, "No route for that URI")
        with self.cf.lock:
            self.cf.calls.append((self.command, parts.path, status))
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self._send(status, data, "application/octet-stream" if isinstance(doc, bytes) else "application/json", extra)

    do_GET = do_PUT = do_POST = do_DELETE = _route

    def _edge_error(self, name, status, text):
        with self.cf.lock:
            self.cf.worker_requests.append((name, self.command, self.path, status))
        self.close_connection = True
        self._send(status, text.encode(), "text/html", {"Connection": "close"})

    def proxy(self, parts, body):
        """workers.dev: forward to the script's miniflare, streaming the response line by line."""
        name = parts.path[len("/__workers/"):].split("/", 1)[0]
        path = "/" + parts.path[len("/__workers/"):].split("/", 1)[1] if "/" in parts.path[len("/__workers/"):] \
            else "/"
        script = self.cf.scripts.get(name)
        if script is None or not script.enabled:
            return self._edge_error(name, 404, "There is nothing here yet")
        delay = self.cf.platform.route_delay_s
        if delay and script.enabled_at and time.time() < script.enabled_at + delay:
            # The route is still propagating: 404 and 523 (origin unreachable) alternate.
            status = self.cf.rng.choice([404, 523])
            return self._edge_error(name, status, "There is nothing here yet" if status == 404 else "error code: 523")
        limited = self.cf.worker_limited()
        if limited:  # the Free plan's requests a minute or a day are spent: the Worker does not run
            return self._edge_error(name, limited[0], "error code: %d" % limited[1])
        if self.command == "POST":
            with self.cf.lock:
                flap = self.cf.route_flaps > 0
                self.cf.route_flaps -= flap
                status = self.cf.rng.choice(self.cf.platform.route_flap_statuses) if flap else None
            if flap:  # one more place that has not learnt the route: the Worker does not run
                return self._edge_error(name, status, "There is nothing here yet" if status == 404
                                        else "error code: %d" % status)
        url, generation, workerd = script.enter()
        try:
            self._forward(script, name, path, (url, generation, workerd), body)
        finally:
            script.leave()

    def _meter(self, script, name, generation, workerd):
        """The CPU meter of a pass request: past the limit, the platform ends the invocation."""
        limit = script.cpu_limit_ms()
        if self.command != "POST" or not limit or not workerd:
            return None

        def exceeded(used_ms):
            with self.cf.lock:
                self.cf.outcomes.append({"script": name, "outcome": "exceededCpu",
                                         "cpu_ms": round(used_ms, 1), "limit_ms": limit})
            script.kill_work(generation, "it exceeded its CPU time (%.1f ms of %s)"
                             % (used_ms, limit))

        return CpuMeter(workerd, limit, exceeded)

    def _forward(self, script, name, path, target, body):
        url, generation, workerd = target
        upstream = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=600)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        meter = self._meter(script, name, generation, workerd)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            if meter is not None:
                meter.stop()
                if meter.used_ms is not None:  # ended before it answered: the platform's error page
                    return self._edge_error(name, 503, "error code: 1102")
            return self._edge_error(name, 502, "error code: 1101")  # the Worker threw or was killed
        with self.cf.lock:
            self.cf.worker_requests.append((name, self.command, path, resp.status))
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.getheader("Content-Type", "text/plain"))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut = stall = None
        if self.command == "POST" and resp.status == 200:  # injections are for passes, not health checks
            with self.cf.lock:
                cut, self.cf.cut_stream_after = self.cf.cut_stream_after, None
                stall, self.cf.stall_stream_after = self.cf.stall_stream_after, None
        gone = False
        relayed = threading.Event()
        if self.command == "POST":
            threading.Thread(target=self._watch_caller, args=(conn, relayed), daemon=True).start()
        try:
            gone = self._stream(resp, cut, stall, meter)
        except OSError:
            gone = True  # the caller went away (a canceled pass, a lost connection)
        finally:
            relayed.set()
            if meter is not None:
                meter.stop()
            if gone and self.cf.platform.waituntil_s is not None:
                # ctx.waitUntil lets the Worker go on for 30 s after its caller is gone, no longer.
                t = threading.Timer(self.cf.platform.waituntil_s, script.kill_work, (generation,))
                t.daemon = True
                t.start()
            resp.close()  # the upstream connection ends here (the response held it open)
            conn.close()

    def _watch_caller(self, upstream, relayed):
        """The edge tells the Worker at once when its caller goes away (the Worker's response is
        canceled), not only at its next write: a caller's end of file closes the upstream."""
        while not relayed.is_set():
            try:
                ready, _, _ = select.select([self.connection], [], [], 0.1)
                if not ready:
                    continue
                data = self.connection.recv(1, socket.MSG_PEEK)
            except (OSError, ValueError):
                data = b""
            if not data:
                with contextlib.suppress(OSError, AttributeError):
                    upstream.sock.shutdown(socket.SHUT_RDWR)
            return  # gone, or it sent something more (not this watcher's business)

    def _stream(self, resp, cut, stall, meter=None):
        """Relay the response; True if it did not reach its end (cut, stalled, the caller gone, or
        the invocation ended by the platform: then the caller's stream is cut off, never ended)."""
        lines = 0
        while True:
            try:
                line = resp.readline()
            except (OSError, http.client.HTTPException):
                line = None
            if not line and (line is None or (meter is not None and meter.used_ms is not None)):
                self.close_connection = True
                self.connection.shutdown(2)
                return True
            if not line:
                break
            if line.strip() and b'"heartbeat"' not in line and b'"type":"notice"' not in line:
                lines += 1
                if cut is not None and lines > cut:
                    self.close_connection = True
                    self.connection.shutdown(2)  # the response is lost mid-way
                    return True
                if stall is not None and lines > stall:
                    self.cf.stopped.wait(600)  # the connection stays open and says nothing
                    return True
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        return False
