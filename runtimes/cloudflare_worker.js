// ty-openworkflow Cloudflare Worker glue (pass protocol v1 over HTTP).
//
// The sidecar uploads one module per workflow version, assembled as:
//   the engine section of node_shim.js, wrapped as __tyow_engine
//   the workflow code, wrapped as __tyow_workflow
//   this file
// POST / with `Authorization: Bearer <TYOW_TOKEN>` and a pass document as the
// body; the response streams the pass's events as NDJSON, each with `seq`
// (1, 2, 3, ... with no gap), and a heartbeat line when nothing else was sent
// for `heartbeat_ms` (so a dead connection shows). GET /healthz answers 200.
//
// Every event is also copied to the STATE KV namespace, so a response lost on
// the way can be reconciled: in chunks `ev:<pass_id>:<first seq, 6 digits>`,
// each the NDJSON of events first..last (its metadata {"last": n} and, when it
// fits, {"v": the same text}), written one after the other, each only once the
// one before it was stored, at most about one a second (KV bills every write).
// A Worker goes on for at most 30 s after its caller is gone, so a pass whose
// response was lost and that needs longer than that ends without its terminal
// event in KV, and the sidecar retries it.
import { AsyncLocalStorage } from "node:async_hooks";

const KV_TTL_S = 86400;
const KV_FLUSH_MS = 1000; // events are grouped into one KV write at most this often
const KV_METADATA_MAX = 1024; // bytes of JSON metadata KV keeps with a key
const KV_PUT_TRIES = 3;

function sameSecret(given, expected) {
  // Constant-time comparison of two strings.
  if (typeof given !== "string" || typeof expected !== "string") return false;
  let diff = given.length ^ expected.length;
  for (let i = 0; i < Math.max(given.length, expected.length); i++) {
    diff |= (given.charCodeAt(i) || 0) ^ (expected.charCodeAt(i) || 0);
  }
  return diff === 0;
}

function reply(status, message) {
  return new Response(JSON.stringify({ ok: status < 400, error: message }) + "\n", {
    status,
    headers: { "content-type": "application/json" },
  });
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// `stack` as the user knows the code: frames in the workflow's lines of this module
// (__tyow_code_lines, set by the sidecar above this glue) named "workflow ID vN:LINE:COL" with
// lines as deployed, and, once there are some, the engine's and this glue's frames left out.
function userStack(stack, doc) {
  if (typeof __tyow_code_lines === "undefined" || !stack) return stack;
  const [first, last] = __tyow_code_lines;
  const label = `workflow ${doc.workflow_id} v${doc.version}`;
  const where = /([^\s()]*worker\.mjs):(\d+):(\d+)/;
  let theirs = false;
  const frames = stack.split("\n").map((text) => {
    const m = /^\s+at /.test(text) && text.match(where);
    if (!m) return { text, own: false };
    const line = Number(m[2]);
    if (line < first || line > last) return { text, own: true };
    theirs = true;
    return { text: text.replace(where, `${label}:${line - first + 1}:${m[3]}`), own: false };
  });
  return frames.filter((f) => !(theirs && f.own)).map((f) => f.text).join("\n");
}

// The KV copy of one pass's events: ordered, contiguous, one write in flight at a time.
class KvMirror {
  constructor(kv, passId) {
    this.kv = kv;
    this.passId = passId;
    this.pending = []; // [seq, line] not yet stored
    this.fixed = 0; // how many of them make the chunk being written
    this.writing = null;
    this.timer = null;
    this.lastWrite = 0;
    this.final = false; // the pass ended: what is left is written at once
  }

  add(seq, line) {
    if (!this.kv) return;
    this.pending.push([seq, line]);
    this.schedule();
  }

  schedule(now = false) {
    if (this.writing || this.timer || !this.pending.length) return;
    const wait = now ? 0 : Math.max(0, this.lastWrite + KV_FLUSH_MS - Date.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.writing = this.write().finally(() => {
        this.writing = null;
        this.schedule(this.final);
      });
    }, wait);
  }

  async write() {
    // A chunk once tried keeps exactly its lines until stored: a failed put may still land
    // later, and a late copy must never be shorter than the one that replaced it (the next
    // chunk starts after it).
    const n = this.fixed || this.pending.length;
    this.fixed = n;
    const chunk = this.pending.slice(0, n);
    const text = chunk.map(([, line]) => line).join("\n") + "\n";
    const key = `ev:${this.passId}:${String(chunk[0][0]).padStart(6, "0")}`;
    const last = chunk[chunk.length - 1][0];
    let metadata = { last, v: text };
    const metadataBytes = new TextEncoder().encode(JSON.stringify(metadata)).length;
    if (metadataBytes > KV_METADATA_MAX) metadata = { last };
    for (let attempt = 1; attempt <= KV_PUT_TRIES; attempt++) {
      try {
        await this.kv.put(key, text, { expirationTtl: KV_TTL_S, metadata });
        // Stored: these leave the queue; anything added meanwhile starts the next chunk.
        this.pending.splice(0, n);
        this.fixed = 0;
        break;
      } catch (err) {
        // A failed write keeps its events queued, as the same chunk (same key, same lines).
        if (/limit exceeded/i.test(String(err && err.message))) {
          this.kv = null; // the day's KV quota is spent: the stream is all there is
          this.pending = [];
          this.fixed = 0;
          break;
        }
        if (attempt < KV_PUT_TRIES) await pause(200 * attempt);
      }
    }
    this.lastWrite = Date.now();
  }

  async drain() {
    // At the pass's end: write what is left now, in order, and wait for it.
    this.final = true;
    const busy = () => this.pending.length || this.writing || this.timer;
    for (let rounds = 0; rounds < 50 && busy(); rounds++) {
      if (this.timer) {
        clearTimeout(this.timer);
        this.timer = null;
      }
      if (this.writing) await this.writing;
      else if (this.pending.length) {
        const before = this.pending.length;
        await this.write();
        if (this.pending.length === before) break; // KV refuses writes: the stream is all there is
      }
    }
  }
}

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (request.method === "GET" && url.pathname === "/healthz") return reply(200, null);
    if (request.method !== "POST") return reply(405, "POST a pass document");
    const auth = request.headers.get("Authorization") || "";
    if (!env.TYOW_TOKEN || !sameSecret(auth, "Bearer " + env.TYOW_TOKEN)) {
      return reply(401, "bad or missing invocation token");
    }
    let doc;
    try {
      doc = await request.json();
    } catch (err) {
      return reply(400, "the body is not a JSON pass document");
    }
    if (!doc || doc.protocol !== 1 || typeof doc.pass_id !== "string") {
      return reply(422, "not a protocol 1 pass document");
    }
    const { readable, writable } = new TransformStream();
    const writer = writable.getWriter();
    const encoder = new TextEncoder();
    const mirror = new KvMirror(env.STATE, doc.pass_id);
    let seq = 0;
    let clientGone = false;
    let lastSent = Date.now();
    const send = (text) => {
      if (clientGone) return;
      lastSent = Date.now();
      writer.write(encoder.encode(text)).catch(() => {
        clientGone = true; // keep running: the results still land in KV
      });
    };
    const sink = (ev) => {
      seq += 1;
      ev.seq = seq;
      if (ev.error && ev.error.stack) ev.error.stack = userStack(ev.error.stack, doc);
      const line = JSON.stringify(ev);
      send("\n" + line + "\n");
      mirror.add(seq, line);
    };
    const beatMs =
      Number.isInteger(doc.heartbeat_ms) && doc.heartbeat_ms >= 100 ? doc.heartbeat_ms : 20000;
    const beat = setInterval(() => {
      if (Date.now() - lastSent < beatMs - 50) return;
      send(JSON.stringify({ type: "heartbeat", at: Date.now() }) + "\n");
    }, Math.max(50, Math.floor(beatMs / 4)));
    const pass = (async () => {
      try {
        if (typeof __tyow_workflow !== "function") {
          throw new TypeError("the workflow code defines no function named `workflow`");
        }
        await __tyow_engine.runPass(doc, __tyow_workflow, sink, AsyncLocalStorage);
      } catch (err) {
        const error = __tyow_engine.serializeError(err);
        sink({ type: "failed", pass: doc.pass_id, at: Date.now(), error });
      }
      clearInterval(beat);
      await mirror.drain();
      await writer.close().catch(() => {});
    })();
    // The pass runs on if the caller disconnects (for at most 30 s on Cloudflare), its events
    // into KV.
    ctx.waitUntil(pass);
    return new Response(readable, { headers: { "content-type": "application/x-ndjson" } });
  },
};
