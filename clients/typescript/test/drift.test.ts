// The checked-in protobuf code is what protoc-gen-es makes of proto/relaymesh/v1/mesh.proto
// today: generated again into a temporary directory, it must be the same.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const pkg = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const GENERATED = "src/gen/relaymesh/v1/mesh_pb.ts";

test("src/gen matches the .proto (run `npm run generate` after changing it)", async () => {
  const out = mkdtempSync(join(tmpdir(), "relaymesh-ts-gen-"));
  try {
    await promisify(execFile)(
      join(pkg, "node_modules", ".bin", "buf"),
      [
        "generate",
        "../../proto",
        "--template",
        "buf.gen.yaml",
        "--path",
        "../../proto/relaymesh/v1/mesh.proto",
        "--output",
        out,
      ],
      { cwd: pkg, env: { ...process.env, PATH: `${join(pkg, "node_modules", ".bin")}:${process.env.PATH}` } },
    );
    const fresh = readFileSync(join(out, GENERATED), "utf8");
    const committed = readFileSync(join(pkg, GENERATED), "utf8");
    assert.ok(fresh === committed, `${GENERATED} is out of date: run \`npm run generate\``);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("coordinator/console/console.js is console/console.ts as built today (run `npm run console` after changing it)", async () => {
  const out = mkdtempSync(join(tmpdir(), "relaymesh-ts-console-"));
  try {
    const bundle = join(out, "console.js");
    await promisify(execFile)(process.execPath, ["bundle.mjs", "console", bundle], { cwd: pkg });
    const fresh = readFileSync(bundle, "utf8");
    const committed = readFileSync(join(pkg, "../../coordinator/console/console.js"), "utf8");
    assert.ok(fresh === committed, "coordinator/console/console.js is out of date: run `npm run console`");
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
