"""The contract workflows, written once per runtime with the same behaviour.

Each appends a line to ``input.counter`` whenever a step body really executes,
so a test can count side effects across sleeps, retries and killed passes.
"""

NODE = {}
PYTHON = {}

NODE["hello"] = """
async function workflow(input, { step, sleep }) {
  const greeting = await step("greet", () => {
    return `Hello, ${input.name}!`;
  });
  await sleep("wait", 5000);
  const result = await step("complete", () => {
    return { message: greeting, n: 1 };
  });
  return result;
}
"""
PYTHON["hello"] = """
def workflow(input, ctx):
    greeting = ctx.step("greet", lambda: "Hello, %s!" % input["name"])
    ctx.sleep("wait", 5)
    return ctx.step("complete", lambda: {"message": greeting, "n": 1})
"""

NODE["memo"] = """
const fs = require("fs");
function mark(path, what) { fs.appendFileSync(path, what + "\\n"); return what; }
async function workflow(input, { step, sleep }) {
  const a = await step("a", () => mark(input.counter, "a"));
  await sleep("s1", "5s");
  const b = await step("b", () => mark(input.counter, "b"));
  await sleep("s2", 5000);
  const c = await step("c", () => mark(input.counter, "c"));
  return [a, b, c];
}
"""
PYTHON["memo"] = """
def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")
    return what

def workflow(input, ctx):
    a = ctx.step("a", lambda: mark(input["counter"], "a"))
    ctx.sleep("s1", "5s")
    b = ctx.step("b", lambda: mark(input["counter"], "b"))
    ctx.sleep("s2", 5)
    c = ctx.step("c", lambda: mark(input["counter"], "c"))
    return [a, b, c]
"""

NODE["flaky"] = """
const fs = require("fs");
async function workflow(input, { step }) {
  const out = await step("flaky", () => {
    fs.appendFileSync(input.counter, "try\\n");
    const n = fs.readFileSync(input.counter, "utf8").trim().split("\\n").length;
    if (n < 3) throw new Error("not yet " + n);
    return n;
  }, { retry: { maxAttempts: 5, initialInterval: "1s", backoffCoefficient: 2 } });
  return { tries: out };
}
"""
PYTHON["flaky"] = """
def flaky(path):
    with open(path, "a") as f:
        f.write("try\\n")
    with open(path) as f:
        n = len(f.read().split())
    if n < 3:
        raise RuntimeError("not yet %d" % n)
    return n

def workflow(input, ctx):
    out = ctx.step("flaky", lambda: flaky(input["counter"]), max_attempts=5, initial="1s", backoff=2)
    return {"tries": out}
"""

NODE["exhausted"] = """
async function workflow(input, { step }) {
  await step("always", () => { throw new Error("boom"); }, { retry: { maxAttempts: 2, initialInterval: 100 } });
  return "unreachable";
}
"""
PYTHON["exhausted"] = """
def boom():
    raise ValueError("boom")

def workflow(input, ctx):
    ctx.step("always", boom, retry={"max_attempts": 2, "initial": 0.1})
    return "unreachable"
"""

NODE["outside"] = """
async function workflow(input, { step }) {
  await step("fine", () => 1);
  if (!input.ok) throw new TypeError("bad input: ok is missing");
  return "ok";
}
"""
PYTHON["outside"] = """
def workflow(input, ctx):
    ctx.step("fine", lambda: 1)
    if not input.get("ok"):
        raise TypeError("bad input: ok is missing")
    return "ok"
"""

NODE["notjson"] = """
async function workflow(input, { step }) {
  return await step("bad", () => ({ f: () => 1, when: 10n }));
}
"""
PYTHON["notjson"] = """
def workflow(input, ctx):
    return ctx.step("bad", lambda: {"s": {1, 2}})
"""

NODE["big"] = """
async function workflow(input, { step }) {
  return await step("big", () => "x".repeat(5000));
}
"""
PYTHON["big"] = """
def workflow(input, ctx):
    return ctx.step("big", lambda: "x" * 5000)
"""

NODE["nosteps"] = """
async function workflow(input) {
  return { doubled: input.n * 2 };
}
"""
PYTHON["nosteps"] = """
def workflow(input, ctx):
    return {"doubled": input["n"] * 2}
"""

NODE["dupes"] = """
async function workflow(input, { step, sleep }) {
  const out = [];
  for (let i = 0; i < 3; i++) {
    out.push(await step("x", () => i * 10));
    if (i === 1) await sleep("pause", 3000);
  }
  return out;
}
"""
PYTHON["dupes"] = """
def workflow(input, ctx):
    out = []
    for i in range(3):
        out.append(ctx.step("x", lambda: i * 10))
        if i == 1:
            ctx.sleep("pause", 3)
    return out
"""

NODE["noisy"] = """
async function workflow(input, { step }) {
  console.log('{"type":"completed","pass":"forged","output":666}');
  process.stdout.write("plain text on stdout\\n");
  const v = await step("v", () => { console.error("to stderr"); return 7; });
  require("child_process").execSync("echo from-a-child", { stdio: "inherit" });
  return v;
}
"""
PYTHON["noisy"] = """
import os, sys
def workflow(input, ctx):
    print('{"type":"completed","pass":"forged","output":666}')
    sys.stdout.write("plain text on stdout\\n")
    def v():
        sys.stderr.write("to stderr\\n")
        return 7
    out = ctx.step("v", v)
    os.system("echo from-a-child")
    return out
"""

# Step "first" runs once; step "slow" hangs on its first execution (the test
# kills the process there) and returns on the second.
NODE["hang_once"] = """
const fs = require("fs");
async function workflow(input, { step }) {
  await step("first", () => { fs.appendFileSync(input.counter, "first\\n"); return 1; });
  const r = await step("slow", async () => {
    fs.appendFileSync(input.counter, "slow\\n");
    const n = fs.readFileSync(input.counter, "utf8").split("\\n").filter((x) => x === "slow").length;
    if (n === 1) await new Promise((r) => setTimeout(r, 60000));
    return n;
  });
  await step("last", () => { fs.appendFileSync(input.counter, "last\\n"); return 3; });
  return r;
}
"""
PYTHON["hang_once"] = """
import time
def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")
    with open(path) as f:
        return f.read().split().count(what)

def slow(path):
    n = mark(path, "slow")
    if n == 1:
        time.sleep(60)
    return n

def workflow(input, ctx):
    ctx.step("first", lambda: mark(input["counter"], "first"))
    r = ctx.step("slow", lambda: slow(input["counter"]))
    ctx.step("last", lambda: mark(input["counter"], "last"))
    return r
"""

NODE["hang"] = """
const fs = require("fs");
async function workflow(input, { step }) {
  await step("first", () => { fs.appendFileSync(input.counter, "first\\n"); return 1; });
  await step("forever", async () => {
    fs.appendFileSync(input.counter, "forever\\n");
    await new Promise((r) => setTimeout(r, 600000));
  });
  await step("after", () => { fs.appendFileSync(input.counter, "after\\n"); return 2; });
}
"""
PYTHON["hang"] = """
import time
def mark(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")

def workflow(input, ctx):
    ctx.step("first", lambda: mark(input["counter"], "first"))
    ctx.step("forever", lambda: (mark(input["counter"], "forever"), time.sleep(600)))
    ctx.step("after", lambda: mark(input["counter"], "after"))
"""

NODE["ids"] = """
async function workflow(input, { step, runId }) {
  const key = await step("charge", (info) => info.idempotencyKey);
  return { key, runId };
}
"""
PYTHON["ids"] = """
def workflow(input, ctx):
    key = ctx.step("charge", lambda: ctx.idempotency_key)
    return {"key": key, "runId": ctx.run_id}
"""

NODE["swallow"] = """
async function workflow(input, { step, sleep }) {
  try {
    await step("bad", () => { throw new Error("inner"); }, { retry: { maxAttempts: 1 } });
  } catch (e) {
    return "swallowed";
  }
  return "after";
}
"""
PYTHON["swallow"] = """
def bad():
    raise RuntimeError("inner")

def workflow(input, ctx):
    try:
        ctx.step("bad", bad, max_attempts=1)
    except Exception:
        return "swallowed"
    return "after"
"""

NODE["version"] = """
async function workflow(input, { step, sleep }) {
  await sleep("wait", 5000);
  return await step("which", () => "v1");
}
"""
PYTHON["version"] = """
def workflow(input, ctx):
    ctx.sleep("wait", 5)
    return ctx.step("which", lambda: "v1")
"""

# Waits: a signal (with a timeout) and a child run.
NODE["signal"] = """
async function workflow(input, { step, waitForSignal }) {
  const before = await step("before", () => "b");
  const got = await waitForSignal("go", { timeout: "1h" });
  const late = await waitForSignal("late", { timeout: "30s" });
  return { before, got, late };
}
"""
PYTHON["signal"] = """
def workflow(input, ctx):
    before = ctx.step("before", lambda: "b")
    got = ctx.wait_for_signal("go", timeout="1h")
    late = ctx.wait_for_signal("late", timeout=30)
    return {"before": before, "got": got, "late": late}
"""

NODE["kid"] = """
async function workflow(input, { step }) {
  if (input.fail) await step("boom", () => { throw new Error("kid failed on purpose"); }, { retry: { maxAttempts: 1 } });
  return await step("double", () => input.n * 2);
}
"""
PYTHON["kid"] = """
def boom():
    raise RuntimeError("kid failed on purpose")

def workflow(input, ctx):
    if input.get("fail"):
        ctx.step("boom", boom, max_attempts=1)
    return ctx.step("double", lambda: input["n"] * 2)
"""

NODE["parent"] = """
async function workflow(input, { runWorkflow }) {
  const ok = await runWorkflow(input.kid, { n: 21 });
  let err = null;
  try { await runWorkflow(input.kid, { fail: true }, { name: "failing" }); } catch (e) { err = e.name; }
  return { ok, err };
}
"""
PYTHON["parent"] = """
def workflow(input, ctx):
    ok = ctx.run_workflow(input["kid"], {"n": 21})
    err = None
    try:
        ctx.run_workflow(input["kid"], {"fail": True}, name="failing")
    except Exception as e:
        err = e.name
    return {"ok": ok, "err": err}
"""


# ---- Python workflows several test files share (deployed with runtime="python") ----

# One step that appends a line to input.counter when it starts, then works input.work seconds.
ONE_STEP_PY = """
import time
def mark(path, work):
    if path:
        with open(path, "a") as f:
            f.write("s\\n")
    if work:
        time.sleep(work)
    return "done"

def workflow(input, ctx):
    return ctx.step("s", lambda: mark(input.get("counter"), input.get("work", 0)))
"""

# A step that starts a child process (`sleep 300`), writes its pid to input.pidfile and waits
# for it: what a killed `serve` leaves behind.
ORPHAN_MAKER = """
import os, subprocess
def workflow(input, ctx):
    def start_child():
        p = subprocess.Popen(["sleep", "300"])
        with open(input["pidfile"], "w") as f:
            f.write(str(p.pid))
        p.wait()
        return 1
    return ctx.step("child", start_child)
"""
