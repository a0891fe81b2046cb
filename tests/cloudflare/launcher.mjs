// Runs one uploaded Worker in miniflare (a real Workers runtime) for the tests.
//
// node launcher.mjs MINIFLARE_DIR METADATA_JSON MODULE_DIR KV_BACKEND LIMITS_JSON
// Prints one JSON line {"url": ...} once it serves; stdin end-of-file disposes
// miniflare and exits.
//
// KV is not miniflare's: each kv_namespace binding is a wrapped binding whose
// get/put/list/delete call the test fake's KV service at KV_BACKEND
// ("127.0.0.1:PORT", path /__kv/<namespace>/<op>), so every Worker bound to a
// namespace shares one store (as on Cloudflare), and the fake decides what REST
// reads see and when.
//
// The uploaded module runs behind a main module of the fake's (what workerd does
// not do itself): per invocation, it counts the Worker's KV operations and its
// subrequests (fetch) against the platform's caps in LIMITS_JSON ({"kv_ops": n,
// "subrequests": n}, null: no cap), and past them fails the call with the
// platform's own error ("Too many API requests by single Worker invocation." /
// "Too many subrequests.").
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { resolve, join } from "node:path";

const [mfDir, metaPath, moduleDir, kvBackend, limitsPath] = process.argv.slice(2);
const { Miniflare } = createRequire(join(resolve(mfDir), "noop.js"))("miniflare");
const meta = JSON.parse(readFileSync(metaPath, "utf8"));
const limits = JSON.parse(readFileSync(limitsPath, "utf8"));

const KV_WRAPPER = `
export default function (env) {
  async function call(op, body) {
    const res = await env.BACKEND.fetch("http://kv/__kv/" + env.NS + "/" + op, {
      method: "POST", body: JSON.stringify(body), headers: { "content-type": "application/json" } });
    const doc = await res.json();
    if (doc.error) throw new Error(doc.error);
    return doc.result;
  }
  function text(value) {
    if (typeof value === "string") return value;
    throw new TypeError("this test KV stores strings only");
  }
  return {
    async get(key, options) {
      const type = typeof options === "string" ? options : (options && options.type) || "text";
      const got = await call("get", { key });
      if (got === null) return null;
      return type === "json" ? JSON.parse(got.value) : got.value;
    },
    async getWithMetadata(key, options) {
      const type = typeof options === "string" ? options : (options && options.type) || "text";
      const got = await call("get", { key });
      if (got === null) return { value: null, metadata: null };
      return { value: type === "json" ? JSON.parse(got.value) : got.value, metadata: got.metadata };
    },
    async put(key, value, options = {}) {
      await call("put", { key, value: text(value), expirationTtl: options.expirationTtl ?? null,
                          expiration: options.expiration ?? null, metadata: options.metadata ?? null });
    },
    async delete(key) {
      await call("delete", { key });
    },
    async list(options = {}) {
      return await call("list", { prefix: options.prefix ?? "", limit: options.limit ?? 1000,
                                  cursor: options.cursor ?? null });
    },
  };
}
`;

// The invocation's counts, kept across everything the request starts (waitUntil included).
const INVOCATION = `
import worker from "./${meta.main_module}";
import { AsyncLocalStorage } from "node:async_hooks";
const LIMITS = ${JSON.stringify(limits)};
const KV_NAMES = ${JSON.stringify((meta.bindings || []).filter((b) => b.type === "kv_namespace")
                                  .map((b) => b.name))};
const invocation = new AsyncLocalStorage();
const realFetch = globalThis.fetch;
globalThis.fetch = function (...args) {
  const counts = invocation.getStore();
  if (counts && LIMITS.subrequests !== null && ++counts.subrequests > LIMITS.subrequests) {
    return Promise.reject(new Error("Too many subrequests."));
  }
  return realFetch.apply(this, args);
};
function counted(kv, counts) {
  const op = (name) => (...args) => {
    if (LIMITS.kv_ops !== null && ++counts.kv > LIMITS.kv_ops) {
      return Promise.reject(new Error("Too many API requests by single Worker invocation."));
    }
    return kv[name](...args);
  };
  return { get: op("get"), getWithMetadata: op("getWithMetadata"), put: op("put"),
           delete: op("delete"), list: op("list") };
}
export default {
  fetch(request, env, ctx) {
    const counts = { subrequests: 0, kv: 0 };
    const scoped = Object.assign({}, env);
    for (const name of KV_NAMES) if (env[name]) scoped[name] = counted(env[name], counts);
    return invocation.run(counts, () => worker.fetch(request, scoped, ctx));
  },
};
`;

const wrapped = {};
const bindings = {};
const workers = [];
for (const b of meta.bindings || []) {
  if (b.type === "kv_namespace") {
    const name = "kv-" + b.namespace_id;
    wrapped[b.name] = { scriptName: name, bindings: { NS: b.namespace_id } };
    if (!workers.some((w) => w.name === name)) {
      workers.push({ name, modules: true, script: KV_WRAPPER,
                     serviceBindings: { BACKEND: { external: { address: kvBackend, http: {} } } } });
    }
  } else if (b.type === "secret_text" || b.type === "plain_text") bindings[b.name] = b.text;
}
const mainPath = resolve(moduleDir, meta.main_module);
const mf = new Miniflare({
  host: "127.0.0.1",
  port: 0,
  workers: [
    {
      name: "main",
      modulesRoot: resolve(moduleDir),
      modules: [
        { type: "ESModule", path: resolve(moduleDir, "__invocation.mjs"), contents: INVOCATION },
        { type: "ESModule", path: mainPath, contents: readFileSync(mainPath, "utf8") },
      ],
      compatibilityDate: meta.compatibility_date,
      compatibilityFlags: meta.compatibility_flags || [],
      bindings,
      wrappedBindings: wrapped,
      // Served straight from workerd, not through miniflare's entry worker (which calls the
      // Worker with a request of its own): a caller that goes away aborts request.signal, as
      // on Cloudflare.
      unsafeDirectSockets: [{ host: "127.0.0.1", port: 0 }],
    },
    ...workers,
  ],
});
await mf.ready;
const url = await mf.unsafeGetDirectURL("main");
process.stdout.write(JSON.stringify({ url: url.href }) + "\n");
process.stdin.resume();
process.stdin.on("end", async () => {
  await mf.dispose();
  process.exit(0);
});
