// Bundles with esbuild, into one ES module each:
//   node bundle.mjs console [OUTFILE]  the web console (console/console.ts and the client it
//                                      uses) into coordinator/console/console.js, which the
//                                      coordinator embeds
//   node bundle.mjs browser [OUTFILE]  the client for a page without a bundler of its own
//                                      (the examples) into dist/browser/relaymesh.js
import { build } from "esbuild";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = dirname(fileURLToPath(import.meta.url));
const targets = {
  console: ["console/console.ts", "../../coordinator/console/console.js"],
  browser: ["src/index.ts", "dist/browser/relaymesh.js"],
};
const [what, out] = process.argv.slice(2);
const target = targets[what];
if (!target) {
  console.error(`usage: node bundle.mjs ${Object.keys(targets).join("|")} [OUTFILE]`);
  process.exit(2);
}
await build({
  absWorkingDir: pkg,
  entryPoints: [target[0]],
  bundle: true,
  format: "esm",
  target: "es2022",
  charset: "utf8",
  legalComments: "none",
  logLevel: "warning",
  outfile: out ?? resolve(pkg, target[1]),
});
