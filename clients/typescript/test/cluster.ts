// Real relaymesh processes for the tests: a coordinator and comm servers from the Cargo build
// (`target/debug`, or RELAYMESH_BIN_DIR), each on 127.0.0.1 port 0, found by their
// `listening on` log line; an account store made with `coordinator accounts`.

import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { type AddressInfo } from "node:net";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
/** `dist/test` → the repository root. */
const repo = resolve(here, "../../../..");
export const binDir = process.env.RELAYMESH_BIN_DIR ?? join(repo, "target", "debug");
const SECRET = "typescript-tests-cluster-secret";
/** Longest wait for a process or the cluster to get where a test needs it. */
const PATIENCE_MS = 20_000;

/** One started process, its stderr read line by line. */
export class Proc {
  readonly child: ChildProcess;
  readonly #lines: string[] = [];
  readonly #waiters: Array<() => void> = [];
  #exited = false;

  constructor(binary: string, args: string[], env: Record<string, string> = {}) {
    this.child = spawn(join(binDir, binary), args, {
      env: { PATH: process.env.PATH, RUST_LOG: "info", RELAYMESH_CLUSTER_SECRET: SECRET, ...env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.child.on("error", (e) => {
      this.#lines.push(`spawn failed: ${e.message} (build the binaries: cargo build -p coordinator -p commserver)`);
      this.#exited = true;
      this.#wake();
    });
    this.child.on("exit", () => {
      this.#exited = true;
      this.#wake();
    });
    const stderr = this.child.stderr;
    if (stderr) {
      createInterface({ input: stderr }).on("line", (line) => {
        this.#lines.push(line);
        this.#wake();
      });
    }
  }

  #wake(): void {
    for (const w of this.#waiters.splice(0)) w();
  }

  /** Waits for a stderr line containing `needle`. */
  async line(needle: string): Promise<string> {
    const deadline = Date.now() + PATIENCE_MS;
    for (;;) {
      const found = this.#lines.find((l) => l.includes(needle));
      if (found) return found;
      if (this.#exited) throw new Error(`exited before "${needle}":\n${this.#lines.join("\n")}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no "${needle}" within ${PATIENCE_MS} ms:\n${this.#lines.join("\n")}`);
      await new Promise<void>((wake) => {
        const timer = setTimeout(wake, left);
        this.#waiters.push(() => {
          clearTimeout(timer);
          wake();
        });
      });
    }
  }

  /** The address of its `listening on <addr>` line. */
  async address(): Promise<string> {
    const line = await this.line("listening on ");
    const match = /listening on (\S+)/.exec(line);
    if (!match) throw new Error(`no address in: ${line}`);
    return match[1];
  }

  /** Stops it (SIGKILL when `hard`, as a crash would) and waits for it to be gone. */
  async stop(hard = false): Promise<void> {
    if (this.#exited) return;
    const gone = new Promise<void>((done) => this.child.once("exit", () => done()));
    this.child.kill(hard ? "SIGKILL" : "SIGTERM");
    await gone;
  }
}

export interface Server {
  id: string;
  proc: Proc;
}

/** A coordinator and `servers` comm servers, linked to each other. */
export class Cluster {
  readonly dir: string;
  readonly coordinator: Proc;
  readonly url: string;
  readonly servers: Server[];

  private constructor(dir: string, coordinator: Proc, url: string, servers: Server[]) {
    this.dir = dir;
    this.coordinator = coordinator;
    this.url = url;
    this.servers = servers;
  }

  /** Starts the cluster. `accountsFile`: the coordinator uses that `file` store;
   * `accountsUrl`: that `sql` store (`sqlite://…`, which keeps node inboxes);
   * `adminToken`: it serves the web console (`--console`) behind that token; `corsOrigins`:
   * pages of those origins may log in from a browser. */
  static async start(
    servers: number,
    options: {
      accountsFile?: string;
      accountsUrl?: string;
      adminToken?: string;
      corsOrigins?: string[];
      commserverToml?: string;
    } = {},
  ): Promise<Cluster> {
    const { accountsFile, accountsUrl, adminToken, corsOrigins = [], commserverToml = "" } = options;
    const dir = mkdtempSync(join(tmpdir(), "relaymesh-ts-"));
    const config = join(dir, "coordinator.toml");
    writeFileSync(
      config,
      `cors_origins = ${JSON.stringify(corsOrigins)}\n` +
        (accountsFile
          ? `[accounts]\nstore = "file"\npath = ${JSON.stringify(accountsFile)}\nreload_ms = 50\n`
          : "") +
        (accountsUrl ? `[accounts]\nstore = "sql"\nurl = ${JSON.stringify(accountsUrl)}\n` : ""),
    );
    const coordinator = new Proc(
      "coordinator",
      ["--listen", "127.0.0.1:0", "--config", config, ...(adminToken ? ["--console"] : [])],
      adminToken ? { RELAYMESH_ADMIN_TOKEN: adminToken } : {},
    );
    const started: Server[] = [];
    try {
      const url = `http://${await coordinator.address()}`;
      for (let i = 0; i < servers; i++) {
        const serverConfig = join(dir, `commserver-${i}.toml`);
        writeFileSync(serverConfig, commserverToml);
        const proc = new Proc("commserver", [
          "--coordinator",
          url.replace("http://", "ws://"),
          "--listen",
          "127.0.0.1:0",
          "--config",
          serverConfig,
        ]);
        started.push({ id: await proc.address(), proc });
      }
      const cluster = new Cluster(dir, coordinator, url, started);
      await cluster.ready(servers);
      return cluster;
    } catch (e) {
      for (const s of started) await s.proc.stop(true);
      await coordinator.stop(true);
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  }

  /** Waits until `count` servers are registered and each is linked to all the others. */
  async ready(count: number): Promise<void> {
    const deadline = Date.now() + PATIENCE_MS;
    let missing = "";
    while (Date.now() < deadline) {
      try {
        missing = await this.#missing(count);
      } catch (e) {
        // A poll that failed (a kept-alive connection the server closed as it was reused, say)
        // is polled again, until the deadline.
        missing = `a poll failed: ${String(e)}`;
      }
      if (missing === "") return;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`the cluster was not ready: ${missing}`);
  }

  async #missing(count: number): Promise<string> {
    const stats = (await (await fetch(`${this.url}/v1/stats`)).json()) as {
      servers: Array<{ id: string; url: string }>;
    };
    if (stats.servers.length !== count) return `${stats.servers.length} of ${count} servers registered`;
    for (const s of stats.servers) {
      const own = (await (await fetch(`${s.url.replace("ws://", "http://")}/v1/stats`)).json()) as {
        peers: number;
      };
      if (own.peers + 1 < count) return `${s.id} linked to ${own.peers} peers`;
    }
    return "";
  }

  /** Stops everything it started and removes its files. */
  async stop(): Promise<void> {
    for (const s of this.servers) await s.proc.stop(true);
    await this.coordinator.stop(true);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Runs `coordinator accounts --file FILE ARGS...` and returns what it printed. */
export async function accounts(file: string, ...args: string[]): Promise<string> {
  // A database URL (`sqlite://…`) names a sql store, anything else a file store.
  const store = file.includes("://") ? "--url" : "--file";
  const { stdout } = await promisify(execFile)(join(binDir, "coordinator"), [
    "accounts",
    store,
    file,
    ...args,
  ]);
  return stdout.trim();
}

/** Serves the files of `root` (this package) on 127.0.0.1, port 0: the examples and the
 * browser bundle, from an origin other than the coordinator's. */
export async function serveFiles(root: string): Promise<{ origin: string; close: () => Promise<void> }> {
  const types: Record<string, string> = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".map": "application/json",
  };
  const server = createServer((request, response) => {
    const path = normalize(decodeURIComponent(new URL(request.url ?? "/", "http://x").pathname));
    const file = join(root, path);
    if (!file.startsWith(root + sep) || !existsSync(file) || !statSync(file).isFile()) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
    response.end(readFileSync(file));
  });
  await new Promise<void>((ready) => server.listen(0, "127.0.0.1", ready));
  const { port } = server.address() as AddressInfo;
  return {
    origin: `http://127.0.0.1:${port}`,
    close: () => new Promise<void>((done) => server.close(() => done())),
  };
}
