"""A fake of Cloudflare's REST API v4 that runs uploaded Workers in miniflare (a real Workers runtime).

Only the REST API is faked (it cannot run here); the Worker itself is the real
module the sidecar uploads, served by miniflare. The fake checks what the real
API checks for the calls the adapter makes, and answers in its envelope:
  GET    /client/v4/accounts/{acct}/workers/subdomain
  PUT    /client/v4/accounts/{acct}/workers/scripts/{name}            multipart: metadata + modules
  POST   /client/v4/accounts/{acct}/workers/scripts/{name}/subdomain  {"enabled": true}
  DELETE /client/v4/accounts/{acct}/workers/scripts/{name}
  GET    /client/v4/accounts/{acct}/storage/kv/namespaces/{ns}/keys?prefix=
  GET    /client/v4/accounts/{acct}/storage/kv/namespaces/{ns}/values/{key}
and stands in for workers.dev at /__workers/{name}/ (a streaming proxy to miniflare).
"""
import email.parser
import email.policy
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import urllib.parse

from tests.util import ROOT

MINIFLARE_DIR = os.path.join(ROOT, ".ci", "node_modules")
LAUNCHER = os.path.join(ROOT, "tests", "cloudflare", "launcher.mjs")
SCRIPT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,61}[A-Za-z0-9]$")
MODULE_TYPES = ("application/javascript+module", "text/javascript+module")


def have_miniflare():
    return shutil.which("node") is not None and os.path.isdir(os.path.join(MINIFLARE_DIR, "miniflare"))


def envelope(result=None, errors=None, status=200):
    return status, {"success": not errors, "errors": errors or [], "messages": [], "result": result}


class Script:
    def __init__(self, name, metadata, module_dir, persist_dir):
        self.name, self.metadata, self.enabled = name, metadata, False
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(["node", LAUNCHER, MINIFLARE_DIR, os.path.join(module_dir, "metadata.json"),
                                      module_dir, persist_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, TMPDIR=persist_dir))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("miniflare did not start for %s" % name)
        self.url = json.loads(line)["url"].rstrip("/")

    def kv(self, command):
        with self.lock:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class FakeCloudflare:
    def __init__(self, workdir, account_id="acct0123456789abcdef", subdomain="tyow-test"):
        self.workdir = workdir
        self.account_id = account_id
        self.subdomain = subdomain
        self.token = "cf-test-" + secrets.token_hex(12)
        self.namespace = secrets.token_hex(16)
        self.scripts = {}
        self.calls = []
        self.uploads = []
        self.cut_stream_after = None  # drop the next worker response after this many lines
        self.lock = threading.Lock()
        fake = self

        class Handler(_Handler):
            cf = fake

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def api_base(self):
        return "http://127.0.0.1:%d/client/v4" % self.port

    def config(self, token_cmd):
        """The `adapters:` block (indented for TempHome.adapter_config) pointing at this fake."""
        return ("  cloudflare:\n    enabled: true\n    account_id: %s\n    namespace: %s\n"
                "    api_token_cmd: \"%s\"\n    api_base: %s\n    workers_url: \"http://127.0.0.1:%d/__workers/{script}\"\n"
                % (self.account_id, self.namespace, token_cmd, self.api_base, self.port))

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        for s in list(self.scripts.values()):
            s.stop()

    # -- the API ------------------------------------------------------------------

    def handle_api(self, method, path, query, headers, body):
        if headers.get("Authorization") != "Bearer " + self.token:
            return envelope(errors=[{"code": 10000, "message": "Authentication error"}], status=403)
        acct = "/accounts/%s" % self.account_id
        if not path.startswith(acct + "/"):
            return envelope(errors=[{"code": 7003, "message": "Could not route to %s, perhaps your object "
                                     "identifier is invalid?" % path}], status=400)
        rest = path[len(acct):]
        if method == "GET" and rest == "/workers/subdomain":
            return envelope({"subdomain": self.subdomain})
        m = re.fullmatch(r"/workers/scripts/([^/]+)", rest)
        if m and method == "PUT":
            return self.upload(m.group(1), headers.get("Content-Type", ""), body)
        if m and method == "DELETE":
            script = self.scripts.pop(m.group(1), None)
            if script is None:
                return envelope(errors=[{"code": 10007, "message": "workers.api.error.script_not_found"}], status=404)
            script.stop()
            return envelope({"id": m.group(1)})
        m = re.fullmatch(r"/workers/scripts/([^/]+)/subdomain", rest)
        if m and method == "POST":
            script = self.scripts.get(m.group(1))
            if script is None:
                return envelope(errors=[{"code": 10007, "message": "workers.api.error.script_not_found"}], status=404)
            try:
                doc = json.loads(body)
            except ValueError:
                return envelope(errors=[{"code": 10026, "message": "could not parse body"}], status=400)
            if not isinstance(doc, dict) or not isinstance(doc.get("enabled"), bool):
                return envelope(errors=[{"code": 10026, "message": "enabled is required"}], status=400)
            script.enabled = doc["enabled"]
            return envelope({"enabled": script.enabled, "previews_enabled": False})
        m = re.fullmatch(r"/storage/kv/namespaces/([0-9a-f]{32})/(keys|values/(.+))", rest)
        if m and method == "GET":
            if m.group(1) != self.namespace:
                return envelope(errors=[{"code": 10013, "message": "namespace not found"}], status=404)
            if m.group(2) == "keys":
                prefix = query.get("prefix", [""])[0]
                names = sorted({k for s in self.live() for k in s.kv("list " + prefix).get("keys", [])})
                return envelope([{"name": n} for n in names])
            key = urllib.parse.unquote(m.group(3))
            for s in self.live():
                value = s.kv("get " + key).get("value")
                if value is not None:
                    return 200, value.encode("utf-8")
            return envelope(errors=[{"code": 10009, "message": "get: 'key not found'"}], status=404)
        return envelope(errors=[{"code": 7000, "message": "No route for that URI"}], status=404)

    def live(self):
        return [s for s in self.scripts.values() if s.proc.poll() is None]

    def upload(self, name, content_type, body):
        def bad(message):
            return envelope(errors=[{"code": 10021, "message": message}], status=400)

        if not SCRIPT_NAME_RE.match(name):
            return bad("invalid script name")
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
            if b.get("type") == "kv_namespace" and not re.fullmatch(r"[0-9a-f]{32}", b.get("namespace_id", "")):
                return bad("KV bindings must include a namespace_id")
            if b.get("type") == "secret_text" and not isinstance(b.get("text"), str):
                return bad("secret_text bindings must include a text property")
        module_dir = os.path.join(self.workdir, "scripts", name + "-" + secrets.token_hex(3))
        os.makedirs(module_dir)
        with open(os.path.join(module_dir, "metadata.json"), "w") as f:
            json.dump(metadata, f)
        with open(os.path.join(module_dir, main), "wb") as f:
            f.write(parts[main].get_payload(decode=True))
        persist = os.path.join(module_dir, "persist")
        os.makedirs(persist)
        try:
            script = Script(name, metadata, module_dir, persist)
        except (RuntimeError, ValueError) as exc:
            return bad("Uncaught error at startup: %s" % exc)
        old = self.scripts.get(name)
        if old is not None:
            script.enabled = old.enabled
            old.stop()
        self.scripts[name] = script
        self.uploads.append({"name": name, "metadata": metadata, "module": parts[main].get_payload(decode=True)})
        return envelope({"id": name, "etag": secrets.token_hex(8), "startup_time_ms": 1})


class _Handler(http.server.BaseHTTPRequestHandler):
    cf = None
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _route(self):
        parts = urllib.parse.urlsplit(self.path)
        body = self._body()
        if parts.path.startswith("/__workers/"):
            return self.proxy(parts, body)
        if parts.path.startswith("/client/v4/"):
            status, doc = self.cf.handle_api(self.command, parts.path[len("/client/v4"):],
                                             urllib.parse.parse_qs(parts.query), self.headers, body)
        else:
            status, doc = envelope(errors=[{"code": 7000, "message": "No route"}], status=404)
        with self.cf.lock:
            self.cf.calls.append((self.command, parts.path, status))
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(doc, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = _route

    def proxy(self, parts, body):
        """workers.dev: forward to the script's miniflare, streaming the response line by line."""
        name = parts.path[len("/__workers/"):].split("/", 1)[0]
        script = self.cf.scripts.get(name)
        if script is None or not script.enabled:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = urllib.parse.urlsplit(script.url)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        conn.request(self.command, "/", body=body, headers=headers)
        resp = conn.getresponse()
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.getheader("Content-Type", "text/plain"))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut, self.cf.cut_stream_after = self.cf.cut_stream_after, None
        try:
            self._stream(resp, cut)
        except OSError:
            pass  # the client went away (a canceled pass)
        finally:
            conn.close()

    def _stream(self, resp, cut):
        lines = 0
        while True:
            line = resp.readline()
            if not line:
                break
            if line.strip():
                lines += 1
                if cut is not None and lines > cut:
                    self.close_connection = True
                    self.connection.shutdown(2)  # the response is lost mid-way
                    return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
