// ty-openworkflow Cloudflare Worker glue (pass protocol v1 over HTTP).
//
// The sidecar uploads one module per workflow version, assembled as:
//   the engine section of node_shim.js, wrapped as __tyow_engine
//   the workflow code, wrapped as __tyow_workflow
//   this file
// POST / with `Authorization: Bearer <TYOW_TOKEN>` and a pass document as the
// body; the response streams the pass's events as NDJSON, each with `seq`
// (1, 2, 3, ... with no gap), a heartbeat line when nothing else was sent for
// `heartbeat_ms` (so a dead connection shows), and a blank line after a second
// without any (a write is how the runtime learns that its caller went away).
// GET /healthz answers 200.
//
// Every event is also copied to the STATE KV namespace, so a response lost on the
// way can be reconciled: in chunks `ev:<pass_id>:<first seq, 6 digits>`, each the
// NDJSON of events first..last (its metadata {"last": n} and, when it fits, {"v":
// the same text}), written one after the other, each only once the one before it
// was stored, at most about one a second (KV bills every write). When its caller
// goes away (request.signal, or a failed write) the Worker says so in KV
// (`ev:<pass_id>:gone`, metadata {"seq": n}): the sidecar then knows the Worker
// lived on past the lost response, and was not ended there by the platform.
//
// Cloudflare's limits, kept to (developers.cloudflare.com kv/platform/limits):
// - 1,000 KV operations per invocation (the pass document's `kv_ops_max`): every
//   KV call goes through one counter; the copies slow down once half the budget is
//   spent, and past it they are held, what is left being copied as one chunk at the
//   pass's end from a small reserve. "Too many API requests by single Worker
//   invocation" (the platform counted more than we did) and the daily quota
//   ("limit exceeded") stop the copies: the stream is all there is.
// - One write per second to a key: a failed put is tried again under a key of its
//   own (`<key>.<try>`), never on the same key within the second.
// Each of these is said on the stream as a notice line ({"type": "notice", "kv":
// "held" or "stopped", "copied": the last seq copied, "error": what KV said}),
// which is not an event.
// A Worker goes on for at most 30 s after its caller is gone, so a pass whose
// response was lost and that needs longer than that ends without its terminal
// event in KV, and the sidecar retries it.
import { AsyncLocalStorage } from "node:async_hooks";

const KV_TTL_S = 86400;
const KV_FLUSH_MS = 1000; // events are grouped into one KV write at most this often (at first)
const KV_METADATA_MAX = 1024; // bytes of JSON metadata KV keeps with a key
const KV_PUT_TRIES = 3;
const KV_RETRY_MS = 200; // a failed write is tried again after this long, then twice that
const KV_OPS_MAX = 1000; // KV operations per invocation, unless the pass document says
const KV_OPS_RESERVE = 4; // kept for the pass's end: its last chunk, its retries, the gone mark
const KV_DRAIN_ROUNDS = 8;
const PROBE_MS = 1000; // a blank line after this long without a write (see the beat below)

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

// The KV copy of one pass's events: ordered, contiguous, one write in flight at a time, within
// the invocation's budget of KV operations.
class KvMirror {
  constructor(kv, passId, maxOps, notify) {
    this.kv = kv;
    this.passId = passId;
    this.maxOps = Number.isInteger(maxOps) && maxOps > 2 * KV_OPS_RESERVE ? maxOps : KV_OPS_MAX;
    this.ops = 0; // KV operations made in this invocation (every try counts)
    this.notify = notify; // (state, seq, error): said on the stream
    this.pending = []; // [seq, line] not yet stored
    this.fixed = 0; // how many of them make the chunk being written
    this.stored = 0; // the last seq stored
    this.writing = null;
    this.timer = null;
    this.lastWrite = 0;
    this.final = false; // the pass ended: what is left is written at once
    this.held = false; // the budget for copies during the pass is spent: the rest waits for its end
    this.goneAt = null; // the seq when the caller went away
    this.goneSaid = false;
  }

  add(seq, line) {
    if (!this.kv) return;
    this.pending.push([seq, line]);
    this.schedule();
  }

  gone(seq) {
    // The caller went away: say so in KV at once (the Worker lives on for a while).
    if (!this.kv || this.goneAt !== null) return;
    this.goneAt = seq;
    this.schedule(true);
  }

  due() {
    return (this.goneAt !== null && !this.goneSaid) || this.pending.length > 0;
  }

  pace() {
    // A copy a second until half the budget is spent (8 minutes of 1,000), then the pause
    // doubles with each eighth of it: 1,000 operations last a pass of over an hour.
    return KV_FLUSH_MS * 2 ** Math.max(0, Math.floor((8 * this.ops) / this.maxOps) - 4);
  }

  schedule(now = false) {
    if (!this.kv || this.writing || this.timer || !this.due()) return;
    if (!this.final && !(this.goneAt !== null && !this.goneSaid) && this.spent()) return;
    const wait = now ? 0 : Math.max(0, this.lastWrite + this.pace() - Date.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.writing = this.write().finally(() => {
        this.writing = null;
        this.schedule(this.final);
      });
    }, wait);
  }

  spent() {
    // Copies during the pass stop short of the reserve; said once.
    if (this.ops < this.maxOps - KV_OPS_RESERVE) return false;
    if (!this.held) {
      this.held = true;
      this.notify("held", this.stored, null);
    }
    return true;
  }

  async put(key, value, metadata, tries = KV_PUT_TRIES) {
    // One KV write; false if it did not land. KV takes one write a second to a key, so a
    // retry goes to a key of its own (`<key>.<try>`: the same lines, the sidecar reads either).
    for (let attempt = 1; attempt <= tries && this.kv; attempt++) {
      if (this.ops >= this.maxOps) {
        this.stop("the Worker's budget of " + this.maxOps + " KV operations is spent");
        return false;
      }
      this.ops += 1; // every KV call of the Worker is counted here
      try {
        const where = attempt === 1 ? key : `${key}.${attempt}`;
        await this.kv.put(where, value, { expirationTtl: KV_TTL_S, metadata });
        return true;
      } catch (err) {
        const message = String((err && err.message) || err);
        if (/limit exceeded|too many api requests/i.test(message)) {
          this.stop(message); // no later write in this invocation (or today) can succeed
          return false;
        }
        if (attempt < tries) await pause(KV_RETRY_MS * attempt);
      }
    }
    return false;
  }

  stop(error) {
    // KV takes no more writes: the stream is all there is.
    this.kv = null;
    this.pending = [];
    this.fixed = 0;
    this.notify("stopped", this.stored, error);
  }

  async write() {
    if (this.goneAt !== null && !this.goneSaid) {
      this.goneSaid = true; // tried once: it only helps the sidecar name the cause
      await this.put(`ev:${this.passId}:gone`, "", { seq: this.goneAt }, 1);
      return true;
    }
    // A chunk once tried keeps exactly its lines until stored: a failed put may still land
    // later, and a late copy must never be shorter than the one that replaced it (the next
    // chunk starts after it).
    const n = this.fixed || this.pending.length;
    this.fixed = n;
    const chunk = this.pending.slice(0, n);
    const text = chunk.map(([, line]) => line).join("\n") + "\n";
    const key = `ev:${this.passId}:${String(chunk[0][0]).padStart(6, "0")}`;
    const last = chunk[chunk.length - 1][0];
    // The last copy before the budget runs out says so: the rest comes at the pass's end.
    const holds = !this.final && this.ops + 1 >= this.maxOps - KV_OPS_RESERVE;
    let metadata = holds ? { last, held: 1, v: text } : { last, v: text };
    const metadataBytes = new TextEncoder().encode(JSON.stringify(metadata)).length;
    if (metadataBytes > KV_METADATA_MAX) metadata = holds ? { last, held: 1 } : { last };
    const stored = await this.put(key, text, metadata);
    if (stored) {
      // Stored: these leave the queue; anything added meanwhile starts the next chunk.
      this.pending.splice(0, n);
      this.fixed = 0;
      this.stored = last;
    }
    // A failed write keeps its events queued, as the same chunk (same key, same lines).
    this.lastWrite = Date.now();
    return stored;
  }

  async drain() {
    // At the pass's end: write what is left now, in order, and wait for it.
    this.final = true;
    for (let rounds = 0; rounds < KV_DRAIN_ROUNDS && this.kv && this.due(); rounds++) {
      if (this.timer) {
        clearTimeout(this.timer);
        this.timer = null;
      }
      if (this.writing) await this.writing;
      else if (!(await this.write())) await pause(KV_FLUSH_MS);
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
    let seq = 0;
    let clientGone = false;
    let lastSent = Date.now(); // a line that says something (an event, a notice, a heartbeat)
    let lastWrite = lastSent; // anything, a probe included
    const write = (text) => {
      if (clientGone) return;
      lastWrite = Date.now();
      writer.write(encoder.encode(text)).catch(callerGone);
    };
    const send = (text) => {
      lastSent = Date.now();
      write(text);
    };
    const notify = (kv, stored, error) => {
      send(JSON.stringify({ type: "notice", kv, copied: stored, error }) + "\n");
    };
    const mirror = new KvMirror(env.STATE, doc.pass_id, doc.kv_ops_max, notify);
    function callerGone() {
      if (clientGone) return;
      clientGone = true; // keep running: the results still land in KV, and KV hears of it
      mirror.gone(seq);
    }
    // The caller going away aborts the request's signal (compatibility flag enable_request_signal)
    // and makes writes to its response fail.
    if (request.signal) request.signal.addEventListener("abort", callerGone);
    writer.closed.catch(callerGone);
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
      const now = Date.now();
      if (now - lastSent >= beatMs - 50) {
        send(JSON.stringify({ type: "heartbeat", at: now }) + "\n");
      } else if (now - lastWrite >= PROBE_MS) {
        write("\n"); // a write is how the runtime hears that its caller left
      }
    }, Math.max(50, Math.min(PROBE_MS / 2, Math.floor(beatMs / 4))));
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
