// ty-openworkflow Cloudflare Worker glue (pass protocol v1 over HTTP).
//
// The sidecar uploads one module per workflow version, assembled as:
//   the engine section of node_shim.js, wrapped as __tyow_engine
//   the workflow code, wrapped as __tyow_workflow
//   this file
// POST / with `Authorization: Bearer <TYOW_TOKEN>` and a pass document as the
// body; the response streams the pass's events as NDJSON. Every event but
// step_started is also written to the STATE KV namespace under
// `ev:<pass_id>:<seq>`, so a response lost on the way can be reconciled.
import { AsyncLocalStorage } from "node:async_hooks";

const KV_TTL_S = 86400;

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

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (request.method === "GET" && url.pathname === "/healthz") return reply(200, null);
    if (request.method !== "POST") return reply(405, "POST a pass document");
    if (!env.TYOW_TOKEN || !sameSecret(request.headers.get("Authorization") || "", "Bearer " + env.TYOW_TOKEN)) {
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
    const puts = [];
    let seq = 0;
    let clientGone = false;
    const sink = (ev) => {
      seq += 1;
      ev.seq = seq;
      const line = JSON.stringify(ev);
      if (!clientGone) {
        writer.write(encoder.encode("\n" + line + "\n")).catch(() => {
          clientGone = true; // keep running: the results still land in KV
        });
      }
      if (env.STATE && ev.type !== "step_started") {
        const key = `ev:${doc.pass_id}:${String(seq).padStart(6, "0")}`;
        puts.push(env.STATE.put(key, line, { expirationTtl: KV_TTL_S }));
      }
    };
    const pass = (async () => {
      try {
        if (typeof __tyow_workflow !== "function") {
          throw new TypeError("the workflow code defines no function named `workflow`");
        }
        await __tyow_engine.runPass(doc, __tyow_workflow, sink, AsyncLocalStorage);
      } catch (err) {
        sink({ type: "failed", pass: doc.pass_id, at: Date.now(), error: __tyow_engine.serializeError(err) });
      }
      await Promise.allSettled(puts);
      await writer.close().catch(() => {});
    })();
    // The pass runs to its end even if the caller disconnects.
    ctx.waitUntil(pass);
    return new Response(readable, { headers: { "content-type": "application/x-ndjson" } });
  },
};
