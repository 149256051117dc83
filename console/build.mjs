// Bundles src/main.ts into ../src/console/assets/console.js, the file `cargo build` compiles into the
// binary (checked in, so building comfyrelay needs no node). `node build.mjs --check` fails instead of
// writing when the checked-in bundle differs from what the sources build to (run by .ci/run).
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";

const out = new URL("../src/console/assets/console.js", import.meta.url);
const result = await build({
  entryPoints: [new URL("src/main.ts", import.meta.url).pathname],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "eof",
  write: false,
  logLevel: "warning",
});
const js = result.outputFiles[0].text;
if (process.argv.includes("--check")) {
  let current = "";
  try {
    current = readFileSync(out, "utf8");
  } catch {}
  if (current !== js) {
    console.error("src/console/assets/console.js is not the build of console/src: run `npm --prefix console run build`");
    process.exit(1);
  }
} else {
  writeFileSync(out, js);
  console.log(`wrote ${out.pathname} (${js.length} bytes)`);
}
