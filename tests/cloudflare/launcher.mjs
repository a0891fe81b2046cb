// Runs one uploaded Worker in miniflare (a real Workers runtime) for the tests.
//
// node launcher.mjs MINIFLARE_DIR METADATA_JSON MODULE_DIR PERSIST_DIR
// Prints one JSON line {"url": ...} once it serves. Then reads commands on stdin,
// one per line, answering one JSON line each: "get KEY", "list PREFIX".
// Stdin end-of-file disposes miniflare and exits.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { resolve, join } from "node:path";
import { createInterface } from "node:readline";

const [mfDir, metaPath, moduleDir, persistDir] = process.argv.slice(2);
const { Miniflare } = createRequire(join(resolve(mfDir), "noop.js"))("miniflare");
const meta = JSON.parse(readFileSync(metaPath, "utf8"));
const kvNamespaces = {};
const bindings = {};
for (const b of meta.bindings || []) {
  if (b.type === "kv_namespace") kvNamespaces[b.name] = b.namespace_id;
  else if (b.type === "secret_text" || b.type === "plain_text") bindings[b.name] = b.text;
}
const mainPath = resolve(moduleDir, meta.main_module);
const mf = new Miniflare({
  modulesRoot: resolve(moduleDir),
  modules: [{ type: "ESModule", path: mainPath, contents: readFileSync(mainPath, "utf8") }],
  compatibilityDate: meta.compatibility_date,
  compatibilityFlags: meta.compatibility_flags || [],
  host: "127.0.0.1",
  port: 0,
  kvNamespaces,
  bindings,
  kvPersist: persistDir,
});
const url = await mf.ready;
process.stdout.write(JSON.stringify({ url: url.href }) + "\n");

const kvName = Object.keys(kvNamespaces)[0];
const rl = createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  const [cmd, ...rest] = line.split(" ");
  const arg = rest.join(" ");
  try {
    const kv = await mf.getKVNamespace(kvName);
    if (cmd === "get") {
      process.stdout.write(JSON.stringify({ value: await kv.get(arg) }) + "\n");
    } else if (cmd === "list") {
      const res = await kv.list({ prefix: arg });
      process.stdout.write(JSON.stringify({ keys: res.keys.map((k) => k.name) }) + "\n");
    } else {
      process.stdout.write(JSON.stringify({ error: "unknown command" }) + "\n");
    }
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err) }) + "\n");
  }
});
rl.on("close", async () => {
  await mf.dispose();
  process.exit(0);
});
