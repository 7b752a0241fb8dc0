// Builds every plugin in this directory (a folder with index.js and a
// plugin.json naming its world) into a WebAssembly component against the
// WIT package in ../../wit: target/<folder>.wasm.
//
//   npm ci && npm run build            # all of them
//   node build.mjs keyword-filter      # one
import { componentize } from "@bytecodealliance/componentize-js";
import { mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
const wit = join(here, "..", "..", "wit");
const asked = process.argv.slice(2);
const folders = (await readdir(here, { withFileTypes: true }))
  .filter((entry) => entry.isDirectory() && existsSync(join(here, entry.name, "plugin.json")))
  .map((entry) => entry.name)
  .filter((name) => asked.length === 0 || asked.includes(name));
await mkdir(join(here, "target"), { recursive: true });
for (const name of folders) {
  const { world } = JSON.parse(await readFile(join(here, name, "plugin.json"), "utf8"));
  const started = Date.now();
  const { component } = await componentize({
    sourcePath: join(here, name, "index.js"),
    witPath: wit,
    worldName: world,
    // A plugin gets no clock, randomness, printing or network: it has
    // pushgate:plugin/host (log, config, now-millis).
    disableFeatures: ["random", "stdio", "clocks", "http", "fetch-event"],
  });
  const out = join(here, "target", `${name}.wasm`);
  await writeFile(out, component);
  console.log(`${out}: ${component.length} bytes in ${Date.now() - started} ms`);
}
