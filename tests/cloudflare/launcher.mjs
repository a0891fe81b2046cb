// Runs one uploaded Worker in miniflare (a real Workers runtime) for the tests.
//
// node launcher.mjs MINIFLARE_DIR METADATA_JSON MODULE_DIR KV_BACKEND
// Prints one JSON line {"url": ...} once it serves; stdin end-of-file disposes
// miniflare and exits.
//
// KV is not miniflare's: each kv_namespace binding is a wrapped binding whose
// get/put/list/delete call the test fake's KV service at KV_BACKEND
// ("127.0.0.1:PORT", path /__kv/<namespace>/<op>), so every Worker bound to a
// namespace shares one store (as on Cloudflare), and the fake decides what REST
// reads see and when.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { resolve, join } from "node:path";

const [mfDir, metaPath, moduleDir, kvBackend] = process.argv.slice(2);
const { Miniflare } = createRequire(join(resolve(mfDir), "noop.js"))("miniflare");
const meta = JSON.parse(readFileSync(metaPath, "utf8"));

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
      modules: [{ type: "ESModule", path: mainPath, contents: readFileSync(mainPath, "utf8") }],
      compatibilityDate: meta.compatibility_date,
      compatibilityFlags: meta.compatibility_flags || [],
      bindings,
      wrappedBindings: wrapped,
    },
    ...workers,
  ],
});
const url = await mf.ready;
process.stdout.write(JSON.stringify({ url: url.href }) + "\n");
process.stdin.resume();
process.stdin.on("end", async () => {
  await mf.dispose();
  process.exit(0);
});
