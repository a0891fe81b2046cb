#!/usr/bin/env node
// ty-openworkflow runtime shim for Node.js (pass protocol v1).
//
// Usage: node node_shim.js WORKFLOW_FILE < pass.json > events.ndjson
//
// Reads one pass document on stdin, runs the workflow function from the top,
// replays memoized steps from the history, runs the first new step(s), and
// writes newline-delimited JSON events on stdout. Anything the user's code
// prints goes to stderr (the run log), never to the event stream.
//
// The sections, their banners and their names follow runtimes/python_shim.py part
// for part (camelCase here for its snake_case): a change to one is mirrored in the other.
"use strict";

const fs = require("fs");
const path = require("path");
const vm = require("vm");
const { AsyncLocalStorage } = require("async_hooks");

// ---- engine: start (shared verbatim with the Cloudflare worker; no Node APIs) ----
// runPass(doc, workflow, sink, AsyncLocalStorage) runs one pass of `workflow` and
// hands each event object to `sink`; it returns when the pass's terminal event
// has been handed over.

// ---- constants ----

const PROTOCOL = 1;
const MAX_NAME = 200; // step and sleep names, in characters
const MAX_DEPTH = 100; // nesting of step outputs: deeper JSON is refused
const MAX_SLEEP_MS = 100 * 365 * 86400000; // a century
const UNITS_MS = { ms: 1, s: 1000, m: 60000, h: 3600000, d: 86400000 };

// ---- messages: the texts both shims print, line for line as in python_shim.py ----
// (names are quoted in double quotes here, by repr() there; tests hold each to its own)

// The error a run gets when it makes more durable calls than limits.max_steps.
function tooManySteps(maxSteps) {
  return { message: `the run reached ${maxSteps} steps and sleeps (limits.max_steps); stopped ` +
                    "as a runaway (raise the limit if it really needs more)",
           name: "TooManySteps", stack: null };
}

// The error a replay gets when its durable call #pos+1 is not the recorded `had`.
function nonDeterministic(pos, kind, key, had) {
  return { name: "NonDeterministicWorkflow", stack: null,
           message: `durable call #${pos + 1} is ${kind} "${key}", but when this run made that ` +
                    `call it was ${had[1]} "${had[0]}": ` +
                    "the workflow took another path on replay (it must not branch on the " +
                    "clock, random numbers or anything read outside a step); the run cannot " +
                    "go on" };
}

// The error a pass ends with when step `key` failed (the sidecar retries or fails it).
function stepFailed(key) {
  return { message: `step "${key}" failed`, name: "StepFailed", stack: null };
}

// Why step `key`'s output of `size` bytes is refused.
function outputTooLarge(key, size, limit) {
  return (`the output of step "${key}" is ${size} bytes, over the limit of ${limit} bytes ` +
          "(limits.max_output_bytes); store large data elsewhere and return a reference");
}

// Why a pass document of another protocol is refused.
function unsupportedProtocol(protocol) {
  return `protocol ${protocol} not supported (this shim speaks ${PROTOCOL})`;
}

// ---- errors ----

// The protocol's error document for `err`: message, name, stack.
function serializeError(err) {
  if (err instanceof Error) {
    return {
      message: String(err.message),
      name: String(err.name || "Error"),
      stack: err.stack ? userStack(String(err.stack)) : null,
    };
  }
  let message;
  try {
    message = typeof err === "string" ? err : JSON.stringify(err);
  } catch (e) {
    message = String(err);
  }
  return { message: String(message), name: "NonErrorThrown", stack: null };
}

// The shim's own file, where there is one (set outside the engine; the Worker has none).
let ownFile = null;

// `stack` without the shim's own frames once the workflow's are there (a failure of the
// shim itself keeps them all).
function userStack(stack) {
  if (!ownFile) return stack;
  const lines = stack.split("\n");
  const frame = (ln) => /^\s+at /.test(ln);
  const own = (ln) => frame(ln) && ln.includes(ownFile);
  if (!lines.some((ln) => frame(ln) && !own(ln) && !/[( ]node:/.test(ln))) return stack;
  return lines.filter((ln) => !own(ln)).join("\n");
}

// ---- durations ----

// Parses 5000, "5000", "500ms", "30s", "5m", "1h30m", "2d" into milliseconds.
function durationMs(value, what) {
  const ms = parseDurationMs(value);
  if (ms === null || !Number.isFinite(ms) || ms < 0 || ms > MAX_SLEEP_MS) {
    throw new TypeError(
      `${what}: invalid duration ${JSON.stringify(value)}; use milliseconds (up to a century) ` +
        'or a string like "500ms", "30s", "5m", "1h30m"'
    );
  }
  return ms;
}

function parseDurationMs(value) {
  if (typeof value === "number") return value;
  if (typeof value === "string") {
    const s = value.trim();
    if (/^\d+(\.\d+)?$/.test(s)) return Number(s);
    const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/gy;
    let total = 0;
    let matched = 0;
    let m;
    while ((m = re.exec(s)) !== null) {
      total += Number(m[1]) * UNITS_MS[m[2]];
      matched = re.lastIndex;
    }
    if (matched === s.length && s.length > 0) return total;
  }
  return null;
}

// ---- retry policy ----

// Retry options as the protocol's policy: max_attempts, initial_ms, backoff, max_ms.
function retryPolicy(opts) {
  const r = (opts && opts.retry) || {};
  const policy = {};
  const max = r.maxAttempts !== undefined ? r.maxAttempts : r.max_attempts;
  if (max !== undefined) {
    if (!Number.isInteger(max) || max < 1 || max > 10000) {
      throw new TypeError(
        `retry.maxAttempts must be a whole number from 1 to 10000, got ${JSON.stringify(max)}`);
    }
    policy.max_attempts = max;
  }
  const initial = r.initialInterval !== undefined ? r.initialInterval : r.initial;
  if (initial !== undefined) policy.initial_ms = durationMs(initial, "retry.initialInterval");
  const coeff = r.backoffCoefficient !== undefined ? r.backoffCoefficient : r.backoff;
  if (coeff !== undefined) {
    if (typeof coeff !== "number" || !Number.isFinite(coeff) || coeff < 1 || coeff > 100) {
      throw new TypeError(
        `retry.backoffCoefficient must be a number from 1 to 100, got ${JSON.stringify(coeff)}`);
    }
    policy.backoff = coeff;
  }
  const maxi = r.maximumInterval !== undefined ? r.maximumInterval : r.max_interval;
  if (maxi !== undefined) policy.max_ms = durationMs(maxi, "retry.maximumInterval");
  return policy;
}

// ---- JSON ----

// Returns [jsonText, value] or throws a TypeError saying why the value is not JSON.
function toJson(value, what) {
  if (value === undefined) return ["null", null];
  const seen = new Set();
  const loneSurrogate = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
  function check(v, where, depth) {
    const t = typeof v;
    if (depth > MAX_DEPTH) {
      throw new TypeError(`${what} is nested more than ${MAX_DEPTH} levels deep`);
    }
    if (t === "string") {
      if (loneSurrogate.test(v)) {
        throw new TypeError(`${what} is not JSON: ${where} holds a lone UTF-16 surrogate`);
      }
      return;
    }
    if (v === null || t === "boolean") return;
    if (t === "number") {
      if (!Number.isFinite(v)) throw new TypeError(`${what} is not JSON: ${where} is ${v}`);
      return;
    }
    if (t === "bigint" || t === "function" || t === "symbol" || t === "undefined") {
      throw new TypeError(`${what} is not JSON: ${where} is a ${t}`);
    }
    if (typeof v.toJSON === "function") return;
    if (seen.has(v)) throw new TypeError(`${what} is not JSON: ${where} is a circular reference`);
    seen.add(v);
    if (Array.isArray(v)) {
      v.forEach((x, i) => check(x, `${where}[${i}]`, depth + 1));
    } else {
      const proto = Object.getPrototypeOf(v);
      if (proto !== Object.prototype && proto !== null) {
        const kind = (v.constructor && v.constructor.name) || "object";
        throw new TypeError(`${what} is not JSON: ${where} is a ${kind}; return plain objects, ` +
                            "arrays, strings, numbers, booleans or null");
      }
      for (const k of Object.keys(v)) {
        if (loneSurrogate.test(k)) {
          throw new TypeError(
            `${what} is not JSON: a key of ${where} holds a lone UTF-16 surrogate`);
        }
        if (v[k] !== undefined) check(v[k], `${where}.${k}`, depth + 1);
      }
    }
    seen.delete(v);
  }
  check(value, "the value", 0);
  const text = JSON.stringify(value);
  return [text, JSON.parse(text)];
}

// ---- the pass: keys, steps, sleeps, waits ----

const defer = typeof setImmediate === "function"
  ? (f) => setImmediate(f)
  : (f) => setTimeout(f, 0);
const idle = () => new Promise((r) => defer(r));
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const hasOwn = (o, k) => Object.prototype.hasOwnProperty.call(o, k);

// One AsyncLocalStorage for every pass of the process: each instance slows down
// every later async operation until disabled, and a warm worker runs thousands.
let sharedStepStore = null;
function stepStore(AsyncLocalStorageClass) {
  if (!sharedStepStore) sharedStepStore = new AsyncLocalStorageClass();
  return sharedStepStore;
}

async function runPass(doc, workflow, sink, AsyncLocalStorageClass, control) {
  // control.aborted (a warm worker's cancel): no durable call may start anything after it.
  const aborted = () => Boolean(control && control.aborted);
  // The sidecar's clock is the run's clock: due times are judged against it, so a
  // worker whose clock drifts (or a test's simulated clock) agrees with the store.
  // Only a sidecar clock ahead of ours is followed: one behind it by the time the
  // pass took to start (the usual case) would make sleeps end early.
  const rawSkew = typeof doc.now === "number" ? doc.now - Date.now() : 0;
  const skewMs = rawSkew > 0 ? rawSkew : 0;
  const now = () => Date.now() + skewMs;
  const emit = (type, data) =>
    sink(Object.assign({ type, pass: doc.pass_id, at: now() }, data || {}));
  const currentStep = stepStore(AsyncLocalStorageClass);
  const history = doc.history || {};
  const done = history.steps || {}; // key -> output
  const sleeps = history.sleeps || {}; // key -> wake_at (ms)
  const attempts = history.attempts || {}; // key -> attempts started so far
  const inlineMs = doc.inline_sleep_ms !== undefined ? doc.inline_sleep_ms : 1000;
  const maxOutput = doc.max_output_bytes || 1048576;
  const maxSteps = doc.max_steps || Infinity;

  // Replay hands memoized results back in the order they resolved live
  // (history.order), one at a time, letting the workflow run until it is idle
  // in between; new work starts only after the last of them. Concurrent
  // branches then call their next steps in the same order as live, and so get
  // the same auto-indexed keys and the same memoized values.
  const waits = history.waits || {}; // key -> {value} | {error}: how a wait resolved
  // key -> timeout_at (ms) or null: waits recorded, not resolved yet
  const parked = history.waiting || {};
  const resolvedKeys = new Set(history.order || []);
  const replayQueue = (history.order || []).filter(
    (k) => hasOwn(done, k) || hasOwn(sleeps, k) || hasOwn(waits, k));
  let replaying = replayQueue.length > 0;
  const waiting = new Map(); // key -> hands the memoized result to the awaiting call
  let nudge = null; // wakes the replay driver: a call asked for a result, or the workflow ended
  const kick = () => {
    const n = nudge;
    nudge = null;
    if (n) n();
  };
  const deferred = []; // new work asked for during replay, in call order

  const used = new Map();
  const usedKeys = new Set();
  let calls = 0; // durable calls made so far in this pass, in call order
  const recordedCalls = new Map(
    (history.calls || []).map(([pos, key, kind]) => [pos, [key, kind]]));
  const inflight = new Set();
  let stop = null; // {kind: "suspend", wake_at} | {kind: "step_failed", ...}
  let stopResolve;
  const stopped = new Promise((r) => (stopResolve = r));
  const never = new Promise(() => {});

  function halt(reason) {
    if (!stop) {
      stop = reason;
      stopResolve();
      kick();
    } else if (reason.kind === "fatal"
               || (reason.kind === "step_failed" && stop.kind === "suspend")) {
      stop = reason; // a failure outranks a sleep
    } else if (reason.kind === "suspend" && stop.kind === "suspend") {
      stop.wake_at = Math.min(stop.wake_at, reason.wake_at); // wake for the earliest
      stop.waiting = stop.waiting || reason.waiting;
    }
  }

  // The n-th use of a name is `name:n`; a key the workflow already used (say it
  // named a step "a:1" itself) is skipped, so two calls never share a key.
  function peekKey(name) {
    let n = used.get(name) || 0;
    let key = n === 0 ? name : `${name}:${n}`;
    while (usedKeys.has(key)) {
      n += 1;
      key = `${name}:${n}`;
    }
    return [key, n];
  }

  function keyFor(name, kind) {
    if (typeof name !== "string" || name === "") {
      throw new TypeError(`${kind} names must be non-empty strings, got ${JSON.stringify(name)}`);
    }
    if (name.length > MAX_NAME) {
      throw new TypeError(`${kind} name "${name.slice(0, 40)}..." is ${name.length} characters; ` +
                          `the limit is ${MAX_NAME}`);
    }
    if (aborted()) return [null, -1];
    const outer = currentStep.getStore();
    if (outer) {
      throw new TypeError(`${kind} "${name}" was called inside step "${outer}"; steps and ` +
                          "sleeps cannot be nested, call them from the workflow function");
    }
    const [key, n] = peekKey(name);
    used.set(name, n + 1);
    usedKeys.add(key);
    if (usedKeys.size > maxSteps) {
      halt({ kind: "fatal", error: tooManySteps(maxSteps) });
    }
    // The determinism guard: the n-th durable call must be the n-th one recorded.
    const pos = calls++;
    const had = recordedCalls.get(pos);
    if (had && (had[0] !== key || had[1] !== kind)) {
      halt({ kind: "fatal", error: nonDeterministic(pos, kind, key, had) });
      return [null, pos];
    }
    return [key, pos];
  }

  // A memoized result: at once after replay, else when its turn in history.order comes.
  function memoized(key, value) {
    const settle = (resolve, reject) => {
      try {
        resolve(value());
      } catch (err) {
        reject(err); // a wait that resolved as an error (a failed child) throws where awaited
      }
    };
    if (!replaying || !resolvedKeys.has(key)) return new Promise(settle);
    return new Promise((resolve, reject) => {
      waiting.set(key, () => settle(resolve, reject));
      kick();
    });
  }

  // New work: now, or (during replay) once every recorded result has been handed back.
  function later(work) {
    if (!replaying) return work();
    return new Promise((resolve, reject) => deferred.push(() => work().then(resolve, reject)));
  }

  async function replay() {
    await idle();
    let pos = 0;
    while (pos < replayQueue.length && !settled && !stop) {
      const fire = waiting.get(replayQueue[pos]);
      if (!fire) {
        // Not asked for again yet: the workflow is busy with something that is not
        // a durable call. Wait (without a timer) until it asks for more, or ends.
        await new Promise((r) => (nudge = r));
        await idle();
        continue;
      }
      waiting.delete(replayQueue[pos]);
      pos += 1;
      fire();
      await idle();
    }
    replaying = false;
    for (const fire of [...waiting.values()]) fire();
    waiting.clear();
    for (const work of deferred.splice(0)) work();
  }

  async function step(name, fn, opts) {
    const [key, pos] = keyFor(name, "step");
    if (key === null) return never;
    if (hasOwn(done, key)) {
      return memoized(key,
                      () => (done[key] === null ? null : JSON.parse(JSON.stringify(done[key]))));
    }
    if (typeof fn !== "function") {
      throw new TypeError(`step "${key}": the second argument must be a function`);
    }
    const retry = retryPolicy(opts);
    return later(() => runStep(key, fn, retry, pos));
  }

  async function runStep(key, fn, retry, pos) {
    if (stop || aborted()) return never;
    const attempt = (attempts[key] || 0) + 1;
    emit("step_started", { step: key, attempt, retry, call: pos });
    const info = { runId: doc.run_id, stepKey: key, attempt,
                   idempotencyKey: `${doc.run_id}:${key}` };
    const work = (async () => {
      let value;
      try {
        value = await currentStep.run(key, () => fn(info));
      } catch (err) {
        emit("step_failed", { step: key, attempt, retry, error: serializeError(err) });
        halt({ kind: "step_failed", step: key });
        return { failed: true };
      }
      let text, out;
      try {
        [text, out] = toJson(value, `the output of step "${key}"`);
      } catch (err) {
        emit("step_failed", { step: key, attempt, retry, retryable: false,
                              error: serializeError(err) });
        halt({ kind: "step_failed", step: key });
        return { failed: true };
      }
      const size = new TextEncoder().encode(text).length;
      if (size > maxOutput) {
        const err = new RangeError(outputTooLarge(key, size, maxOutput));
        emit("step_failed", { step: key, attempt, retry, retryable: false,
                              error: serializeError(err) });
        halt({ kind: "step_failed", step: key });
        return { failed: true };
      }
      emit("step_completed", { step: key, attempt, output: out });
      return { failed: false, out };
    })();
    inflight.add(work);
    const result = await work;
    inflight.delete(work);
    if (result.failed || stop) return never;
    return result.out;
  }

  async function sleepUntil(name, when) {
    const [key, pos] = keyFor(name, "sleep");
    if (key === null) return never;
    if (hasOwn(sleeps, key) && resolvedKeys.has(key)) return memoized(key, () => undefined);
    let wakeAt;
    if (hasOwn(sleeps, key)) {
      wakeAt = sleeps[key];
    } else {
      wakeAt = when instanceof Date ? when.getTime() : Number(when);
      if (!Number.isFinite(wakeAt) || Math.abs(wakeAt - now()) > MAX_SLEEP_MS) {
        throw new TypeError(`sleepUntil "${key}": invalid time ${String(when)}; give a Date or ` +
                            "epoch milliseconds within a century");
      }
      wakeAt = Math.round(wakeAt);
    }
    return later(() => runSleep(key, wakeAt, pos));
  }

  // A sleep or wait reached while the pass is already parking (another sleep or wait
  // in the same turn, as in Promise.all) is still recorded, and the pass wakes for
  // the earliest of them; only a failure stops them from being recorded.
  const parking = () => aborted() || (stop && stop.kind !== "suspend");

  async function runSleep(key, wakeAt, pos) {
    if (parking()) return never;
    if (!hasOwn(sleeps, key)) {
      emit("sleep", { step: key, wake_at: wakeAt, call: pos });
      sleeps[key] = wakeAt;
    }
    const remaining = wakeAt - now();
    if (stop || remaining > inlineMs) {
      halt({ kind: "suspend", wake_at: wakeAt });
      return never;
    }
    // Timers may fire a little early; a sleep never ends before its time.
    while (wakeAt - now() > 0) await pause(wakeAt - now());
    if (stop || aborted()) return never;
    emit("sleep_completed", { step: key });
    return undefined;
  }

  async function sleep(name, duration) {
    const ms = durationMs(duration, `sleep "${name}"`);
    const key = typeof name === "string" ? peekKey(name)[0] : name;
    const when = hasOwn(sleeps, key) ? sleeps[key] : now() + ms;
    return sleepUntil(name, when);
  }

  // A wait (a signal, a child run, a TaskYou task) parks the run like a sleep: it is
  // recorded with its timeout, the pass ends, and the sidecar resolves it (the thing
  // arrived, or the timeout passed) and starts the next pass, which replays it.
  async function durableWait(base, spec, timeout) {
    const [key, pos] = keyFor(base, "wait");
    if (key === null) return never;
    if (hasOwn(waits, key)) return memoized(key, () => unwrapWait(waits[key]));
    let timeoutAt = null;
    if (hasOwn(parked, key)) timeoutAt = parked[key];
    else if (timeout !== undefined && timeout !== null) {
      timeoutAt = now() + durationMs(timeout, `timeout of ${base}`);
    }
    return later(async () => {
      if (parking()) return never;
      if (!hasOwn(parked, key)) {
        emit("wait", { step: key, wait: spec, timeout_at: timeoutAt, call: pos });
        parked[key] = timeoutAt;
      }
      halt({ kind: "suspend", wake_at: timeoutAt === null ? Infinity : timeoutAt, waiting: true });
      return never;
    });
  }

  function unwrapWait(entry) {
    if (entry && entry.error) {
      const err = new Error(String(entry.error.message));
      err.name = String(entry.error.name || "Error");
      if (entry.error.run_id) err.runId = entry.error.run_id;
      throw err;
    }
    const value = entry ? entry.value : null;
    return value === undefined || value === null ? null : JSON.parse(JSON.stringify(value));
  }

  function waitName(what, name) {
    if (typeof name !== "string" || name === "") {
      throw new TypeError(`${what} needs a non-empty name, got ${JSON.stringify(name)}`);
    }
    return name;
  }

  const waitForSignal = (name, opts) =>
    durableWait(`signal:${waitName("waitForSignal", name)}`, { kind: "signal", name },
                opts && opts.timeout);
  // opts.priority / opts.key: the child's place among runs its workflow's limits hold back
  // (by default its parent's priority, and no key).
  function childFlow(opts) {
    const flow = {};
    if (opts && opts.priority !== undefined && opts.priority !== null) {
      const p = opts.priority;
      if (!Number.isInteger(p) || p < -(2 ** 31) || p >= 2 ** 31) {
        throw new TypeError(`runWorkflow's priority must be an integer, got ${opts.priority}`);
      }
      flow.priority = opts.priority;
    }
    if (opts && opts.key !== undefined && opts.key !== null) {
      if (typeof opts.key !== "string" || !opts.key.trim() || opts.key.length > 200) {
        throw new TypeError("runWorkflow's key must be a non-empty string of at most 200 " +
                            "characters");
      }
      flow.key = opts.key;
    }
    return flow;
  }
  const runWorkflow = (workflowId, input, opts) =>
    durableWait(`child:${waitName("runWorkflow", (opts && opts.name) || workflowId)}`,
                { kind: "child", workflow_id: waitName("runWorkflow", workflowId),
                  input: toJson(input, "the child's input")[1], ...childFlow(opts) },
                opts && opts.timeout);
  const waitForTask = (title, opts) => {
    const name = (opts && opts.name) || String(title).slice(0, 150);
    return durableWait(`task:${waitName("waitForTask", name)}`,
                       { kind: "task", title: waitName("waitForTask", title),
                         body: opts && opts.body !== undefined ? String(opts.body) : null },
                       opts && opts.timeout);
  };

  const ctx = { step, sleep, sleepUntil, waitForSignal, runWorkflow, waitForTask,
                runId: doc.run_id, workflowId: doc.workflow_id, attempt: doc.attempt };

  let settled = false;
  const running = Promise.resolve()
    .then(() => workflow(doc.input, ctx))
    .then(
      (value) => ({ ok: true, value }),
      (error) => ({ ok: false, error })
    )
    .finally(() => {
      settled = true;
      kick();
    });
  if (replaying) replay();
  const outcome = await Promise.race([running, stopped.then(() => null)]);

  if (outcome === null || stop) {
    // Let steps already in flight settle and report, then end the pass.
    while (inflight.size) await Promise.allSettled([...inflight]);
    if (stop.kind === "suspend") {
      emit("suspended", { wake_at: stop.wake_at === Infinity ? null : stop.wake_at,
                          waiting: Boolean(stop.waiting) });
    } else if (stop.kind === "fatal") {
      emit("failed", { retryable: false, error: stop.error });
    } else {
      emit("failed", { step: stop.step, error: stepFailed(stop.step) });
    }
    return;
  }
  if (!outcome.ok) {
    emit("failed", { error: serializeError(outcome.error) });
    return;
  }
  let out;
  try {
    out = toJson(outcome.value, "the workflow's return value")[1];
  } catch (err) {
    emit("failed", { retryable: false, error: serializeError(err) });
    return;
  }
  emit("completed", { output: out });
}
// ---- engine: end ----

// ---- loading a workflow ----

// Tracebacks name the workflow and its version ("workflow hello v2", line numbers as in the
// code deployed), not the file the sidecar wrote the code to.

ownFile = __filename;

// What a traceback calls the pass's workflow code, or null if the document does not say.
function workflowLabel(doc) {
  if (doc.workflow_id && doc.version !== undefined && doc.version !== null) {
    return `workflow ${doc.workflow_id} v${doc.version}`;
  }
  return null;
}

function loadWorkflow(file, label) {
  const code = fs.readFileSync(file, "utf8");
  const mod = { exports: {} };
  const fn = vm.compileFunction(
    code + "\n;return (typeof workflow === 'function') ? workflow : (module.exports && " +
      "(module.exports.workflow || module.exports.default || module.exports));",
    ["require", "module", "exports", "__filename", "__dirname"],
    { filename: label || file }
  );
  const wf = fn(require, mod, mod.exports, file, path.dirname(file));
  if (typeof wf !== "function") {
    throw new TypeError("the workflow code defines no function named `workflow` " +
                        "(and module.exports is not a function)");
  }
  return wf;
}

// ---- one pass: the event channel and main ----

// The event channel. With TYOW_EVENT_FD (exec and docker) it is a pipe of its
// own and fd 1 already goes to the log, so nothing the workflow or a child
// process it starts prints can ever land in it. The fd is reopened close-on-exec
// and the inherited one closed, so child processes do not get it either.
// Without it (a plain `node node_shim.js` by hand) events go to stdout.
let eventWrite;
const stdoutWrite = process.stdout.write.bind(process.stdout);
const eventFd = Number(process.env.TYOW_EVENT_FD);
delete process.env.TYOW_EVENT_FD;
if (Number.isInteger(eventFd) && eventFd > 2) {
  let fd = eventFd;
  try {
    fd = fs.openSync(`/proc/self/fd/${eventFd}`, "w");
    fs.closeSync(eventFd);
  } catch (err) {
    fd = eventFd; // no /proc: keep the inherited fd
  }
  eventWrite = (text) => {
    const buf = Buffer.from(text, "utf8");
    let off = 0;
    while (off < buf.length) {
      try {
        off += fs.writeSync(fd, buf, off, buf.length - off);
      } catch (err) {
        if (err.code !== "EAGAIN") throw err;
      }
    }
  };
} else {
  eventWrite = (text) => stdoutWrite(text);
  process.stdout.write = function (chunk, encoding, cb) {
    return process.stderr.write(chunk, encoding, cb);
  };
}
for (const level of ["log", "info", "debug"]) {
  console[level] = (...args) => console.error(...args);
}

let eventsOpen = true;

function writeEvent(ev) {
  if (!eventsOpen) return;
  // The leading newline ends any partial line on a shared stdout, so an event
  // always starts a line of its own.
  eventWrite("\n" + JSON.stringify(ev) + "\n");
}

function main() {
  const workflowFile = process.argv[2];
  const chunks = [];
  let started = false;
  // The pass document is the first line on stdin. The sidecar keeps stdin open
  // for the whole pass: end-of-file means it is gone, and so must this pass be,
  // so an orphaned pass can never run more steps than the one in flight.
  process.stdin.on("data", (c) => {
    if (started) return;
    chunks.push(c);
    const text = Buffer.concat(chunks).toString("utf8");
    const nl = text.indexOf("\n");
    if (nl >= 0) {
      started = true;
      begin(text.slice(0, nl));
    }
  });
  process.stdin.on("end", () => {
    if (!started) {
      started = true;
      begin(Buffer.concat(chunks).toString("utf8"));
    } else {
      process.stderr.write("ty-openworkflow shim: the sidecar closed the pass; stopping\n");
      process.exit(3);
    }
  });

  async function begin(text) {
    let doc;
    try {
      doc = JSON.parse(text);
    } catch (err) {
      process.stderr.write(`ty-openworkflow shim: bad pass document: ${err.message}\n`);
      process.exit(2);
    }
    if (doc.protocol !== PROTOCOL) {
      process.stderr.write(`ty-openworkflow shim: ${unsupportedProtocol(doc.protocol)}\n`);
      process.exit(2);
    }
    try {
      await runPass(doc, loadWorkflow(workflowFile, workflowLabel(doc)), writeEvent,
                    AsyncLocalStorage);
    } catch (err) {
      writeEvent({ type: "failed", pass: doc.pass_id, at: Date.now(),
                   error: serializeError(err) });
    }
    eventsOpen = false;
    // Exit even if user code left timers or sockets open: the pass is over.
    stdoutWrite("", () => process.exit(0));
  }
}

// ---- warm worker ----

// Warm worker: `node node_shim.js --worker` serves many passes, at once, over
// the same protocol. Each line on stdin is {"op": "pass", "code": FILE, "doc":
// PASS} or {"op": "cancel", "pass": ID}; events go out as in a single pass,
// each carrying its pass id, plus {"type": "log", pass, text} for what a pass
// printed and {"type": "canceled", pass, busy} once a cancel took effect (busy:
// a step function was still running, and keeps running in the background).
// Each workflow file is loaded once and reused: module-level state of the
// workflow code is shared by the passes this worker runs.
function workerMain() {
  const util = require("util");
  const passCtx = new AsyncLocalStorage();
  const live = new Map(); // pass id -> { canceled, inflight }
  const loaded = new Map(); // workflow file and label -> workflow function
  const errWrite = process.stderr.write.bind(process.stderr);

  // What a pass prints goes to its own log; anything else to the worker's stderr.
  // A pass that already ended still says so: the sidecar logs it with the
  // scheduler, never with another run.
  const toPass = (text) => {
    const id = passCtx.getStore();
    if (id === undefined) return false;
    writeEvent({ type: "log", pass: id, text });
    return true;
  };
  const routed = (write) =>
    function (chunk, encoding, cb) {
      const text = typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("utf8");
      if (!toPass(text)) return write(chunk, encoding, cb);
      const done = typeof encoding === "function" ? encoding : cb;
      if (done) process.nextTick(done);
      return true;
    };
  process.stdout.write = routed(errWrite);
  process.stderr.write = routed(errWrite);
  for (const level of ["log", "info", "debug", "warn", "error"]) {
    console[level] = (...args) => process.stderr.write(util.format(...args) + "\n");
  }

  function endPass(id, ev) {
    const state = live.get(id);
    if (!state) return;
    if (ev) writeEvent(ev);
    live.delete(id);
  }
  // An error thrown where no one can catch it (a timer, a stray promise) ends
  // the pass it came from; the worker goes on.
  const stray = (err) => {
    const id = passCtx.getStore();
    if (id !== undefined && live.has(id)) {
      const state = live.get(id);
      state.canceled = true;
      state.control.aborted = true;
      endPass(id, { type: "failed", pass: id, at: Date.now(), error: serializeError(err) });
    } else {
      errWrite(`ty-openworkflow worker: ${err && err.stack ? err.stack : err}\n`);
    }
  };
  process.on("uncaughtException", stray);
  process.on("unhandledRejection", stray);

  async function runOne(msg) {
    const doc = msg.doc || {};
    const id = doc.pass_id;
    const state = { canceled: false, inflight: 0, control: { aborted: false } };
    live.set(id, state);
    const sink = (ev) => {
      if (state.canceled) return;
      if (ev.type === "step_started") state.inflight += 1;
      else if (ev.type === "step_completed" || ev.type === "step_failed") state.inflight -= 1;
      writeEvent(ev);
    };
    try {
      if (doc.protocol !== PROTOCOL) {
        throw new Error(unsupportedProtocol(doc.protocol));
      }
      const label = workflowLabel(doc);
      let wf = loaded.get(`${msg.code}\0${label}`);
      if (!wf) {
        wf = loadWorkflow(msg.code, label);
        loaded.set(`${msg.code}\0${label}`, wf);
      }
      await passCtx.run(id, () => runPass(doc, wf, sink, AsyncLocalStorage, state.control));
    } catch (err) {
      sink({ type: "failed", pass: id, at: Date.now(), error: serializeError(err) });
    }
    live.delete(id);
  }

  function handle(line) {
    if (!line.trim()) return;
    let msg;
    try {
      msg = JSON.parse(line);
    } catch (err) {
      errWrite(`ty-openworkflow worker: bad message: ${err.message}\n`);
      return;
    }
    if (msg.op === "pass") {
      runOne(msg);
    } else if (msg.op === "cancel") {
      const state = live.get(msg.pass);
      if (state) {
        state.canceled = true;
        // it starts nothing more; a step function still running is reported busy
        state.control.aborted = true;
      }
      live.delete(msg.pass);
      writeEvent({ type: "canceled", pass: msg.pass, busy: Boolean(state && state.inflight > 0) });
    }
  }

  let buffered = "";
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk) => {
    buffered += chunk;
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      handle(line);
    }
  });
  // The sidecar is gone: so are its passes.
  process.stdin.on("end", () => process.exit(3));
  // The runtime started: a worker that dies before this line could not run any pass.
  writeEvent({ type: "ready" });
}

// ---- entry point ----

if (process.argv[2] === "--worker") workerMain();
else main();
