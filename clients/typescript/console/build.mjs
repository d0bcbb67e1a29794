// Bundles the console (console/console.ts and the client it uses) into one ES module:
// coordinator/console/console.js, which the coordinator embeds, or the file given.
//   node console/build.mjs [OUTFILE]
import { build } from "esbuild";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = resolve(dirname(fileURLToPath(import.meta.url)), "..");
await build({
  absWorkingDir: pkg,
  entryPoints: ["console/console.ts"],
  bundle: true,
  format: "esm",
  target: "es2022",
  charset: "utf8",
  legalComments: "none",
  logLevel: "warning",
  outfile: process.argv[2] ?? resolve(pkg, "../../coordinator/console/console.js"),
});
