// What receiving costs a client process under Node.js: `subscribers` clients in this process
// on one topic, a publisher in another process sending `rate` messages of 100 bytes per second;
// this process's CPU (user + system, `process.cpuUsage`) over the measured window against the
// messages its clients received in it. The same for relaymesh (the TypeScript client) and NATS
// (nats.js, `@nats-io/transport-node`).
//
//   node --experimental-websocket dist/bench/fanout.js --system relaymesh --url http://127.0.0.1:7400 \
//     [--subscribers 10] [--rate 2000] [--warmup 2] [--seconds 10]
//   node dist/bench/fanout.js --system nats --url nats://127.0.0.1:4222 ...
//   node --experimental-websocket dist/bench/fanout.js --system relaymesh-rust \
//     --bench-bin ../../target/release/bench --url http://127.0.0.1:7400 ...
//
// `relaymesh-rust` measures relaymesh's Rust client the same way: `bench --client-fanout`
// holds the subscribers in its own process (and prints its line), this one only publishes.
//
// Prints one JSON line: system, subscribers, rate, seconds, expected, delivered, cpu_s,
// user_s, system_s, delivered_per_cpu_s, cpu_percent. (`--role publisher` is the publisher process it starts.)

import { fork, spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { connect as natsConnect } from "@nats-io/transport-node";

import { Client } from "../src/index.js";

const { values } = parseArgs({
  options: {
    system: { type: "string", default: "relaymesh" },
    url: { type: "string" },
    subscribers: { type: "string", default: "10" },
    rate: { type: "string", default: "2000" },
    warmup: { type: "string", default: "2" },
    seconds: { type: "string", default: "10" },
    role: { type: "string", default: "subscribers" },
    topic: { type: "string", default: "bench.fanout" },
    "bench-bin": { type: "string", default: "../../target/release/bench" },
  },
});
const system = values.system as "relaymesh" | "nats" | "relaymesh-rust";
if (!["relaymesh", "nats", "relaymesh-rust"].includes(system)) {
  throw new Error("--system relaymesh|nats|relaymesh-rust");
}
const url = values.url ?? (system === "nats" ? "nats://127.0.0.1:4222" : "http://127.0.0.1:7400");
const subscribers = Number(values.subscribers);
const rate = Number(values.rate);
const warmup = Number(values.warmup);
const seconds = Number(values.seconds);
const topic = values.topic as string;
const PAYLOAD = new Uint8Array(100).fill(42);

/** Sends `rate` messages per second for `total` seconds, in ticks of 10 ms, then exits. */
async function publish(total: number): Promise<void> {
  let send: (payload: Uint8Array) => void;
  let close: () => Promise<void>;
  if (system !== "nats") {
    const client = await Client.connect({ coordinator: url, outboundQueue: 1_000_000 });
    send = (p) => void client.publish(topic, p);
    close = async () => client.close();
  } else {
    const nc = await natsConnect({ servers: url });
    send = (p) => nc.publish(topic, p);
    close = () => nc.drain();
  }
  process.send?.("ready");
  await new Promise<void>((go) => process.once("message", () => go()));
  const start = performance.now();
  let sent = 0;
  for (;;) {
    const elapsed = (performance.now() - start) / 1000;
    if (elapsed >= total) break;
    const due = Math.min(Math.floor(elapsed * rate), Math.floor(total * rate));
    while (sent < due) {
      send(PAYLOAD);
      sent++;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  // Let the last messages leave before closing.
  await new Promise((r) => setTimeout(r, 500));
  await close();
  process.exit(0);
}

async function receive(): Promise<void> {
  let counting = false;
  let delivered = 0;
  const closers: Array<() => Promise<void> | void> = [];
  for (let i = 0; i < subscribers; i++) {
    if (system === "relaymesh") {
      const client = await Client.connect({ coordinator: url });
      client.on("message", () => {
        if (counting) delivered++;
      });
      await client.subscribe(topic);
      closers.push(() => client.close());
    } else {
      const nc = await natsConnect({ servers: url });
      nc.subscribe(topic, {
        callback: () => {
          if (counting) delivered++;
        },
      });
      await nc.flush();
      closers.push(() => nc.close());
    }
  }
  const publisher = fork(fileURLToPath(import.meta.url), [...process.argv.slice(2), "--role", "publisher"], {
    execArgv: process.execArgv,
  });
  await new Promise<void>((ready) => publisher.once("message", () => ready()));
  publisher.send("go");
  await new Promise((r) => setTimeout(r, warmup * 1000));
  counting = true;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const cpu = process.cpuUsage(cpu0);
  const wall = (performance.now() - t0) / 1000;
  counting = false;
  const cpuS = (cpu.user + cpu.system) / 1e6;
  await new Promise<void>((done) => publisher.once("exit", () => done()));
  for (const close of closers) await close();
  console.log(
    JSON.stringify({
      system,
      client: system === "relaymesh" ? "@relaymesh/client" : "nats.js (@nats-io/transport-node)",
      subscribers,
      rate,
      seconds: Number(wall.toFixed(3)),
      expected: Math.round(rate * subscribers * wall),
      delivered,
      cpu_s: Number(cpuS.toFixed(3)),
      user_s: Number((cpu.user / 1e6).toFixed(3)),
      system_s: Number((cpu.system / 1e6).toFixed(3)),
      delivered_per_cpu_s: Math.round(delivered / cpuS),
      cpu_percent: Number(((100 * cpuS) / wall).toFixed(1)),
    }),
  );
  process.exit(0);
}

/** The Rust client's run: `bench --client-fanout` subscribes, this process publishes. */
async function receiveInRust(): Promise<void> {
  const bench = spawn(
    values["bench-bin"] as string,
    [
      "--client-fanout",
      url,
      "--fanout-subscribers",
      String(subscribers),
      "--fanout-topic",
      topic,
      "--warmup",
      String(warmup),
      "--measure",
      String(seconds),
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: bench.stdout });
  const output: string[] = [];
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  lines.on("line", (line) => (line === "ready" ? ready() : output.push(line)));
  await isReady;
  const publisher = fork(fileURLToPath(import.meta.url), [...process.argv.slice(2), "--role", "publisher"], {
    execArgv: process.execArgv,
  });
  await new Promise<void>((r) => publisher.once("message", () => r()));
  publisher.send("go");
  const code = await new Promise<number | null>((done) => bench.once("exit", (c) => done(c)));
  if (code !== 0) throw new Error(`bench --client-fanout exited with ${code}`);
  await new Promise<void>((done) => publisher.once("exit", () => done()));
  const result = JSON.parse(output.join("")) as { seconds: number };
  console.log(JSON.stringify({ ...result, rate, expected: Math.round(rate * subscribers * result.seconds) }));
}

if (values.role === "publisher") await publish(warmup + seconds + 1);
else if (system === "relaymesh-rust") await receiveInRust();
else await receive();
