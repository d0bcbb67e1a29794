// Topic history with the TypeScript client: a subscriber whose server died recovers what was
// published while it was away, once each and in order, before live messages; a late joiner
// reads the backlog.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, type ClientEvents, type Message } from "../src/index.js";
import { Cluster } from "./cluster.js";

const WAIT_MS = 15_000;

function next<K extends keyof ClientEvents>(client: Client, event: K): Promise<ClientEvents[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${WAIT_MS} ms`)), WAIT_MS);
    const stop = client.on(event, (e) => {
      clearTimeout(timer);
      stop();
      resolve(e);
    });
  });
}

describe("three comm servers keeping history of every topic", () => {
  let cluster: Cluster;
  before(async () => {
    cluster = await Cluster.start(3, { commserverToml: '[history]\ntopics = ["#"]\n' });
  });
  after(async () => {
    await cluster.stop();
  });

  test("a late joiner reads the newest messages of a topic, oldest first", async () => {
    const publisher = await Client.connect({ coordinator: cluster.url, preferredServer: cluster.servers[1].id });
    const reader = await Client.connect({ coordinator: cluster.url, preferredServer: cluster.servers[2].id });
    try {
      // Published and heard by a subscriber, so they are surely kept.
      const witness = await Client.connect({ coordinator: cluster.url });
      await witness.subscribe("chat/backlog");
      let heard = 0;
      const all = new Promise<void>((done) => witness.on("message", () => ++heard === 12 && done()));
      for (let i = 1; i <= 12; i++) publisher.publish("chat/backlog", `line ${i}`);
      await all;
      witness.close();
      const page = await reader.history("chat/backlog", { last: 5 });
      assert.deepEqual(
        page.messages.map((m) => m.text()),
        ["line 8", "line 9", "line 10", "line 11", "line 12"],
      );
      assert.equal(page.gap, false);
      assert.ok(page.messages.every((m) => m.position.stream !== 0n));
    } finally {
      publisher.close();
      reader.close();
    }
  });

  test("a subscriber whose server died recovers what it missed, once, in order, before live ones", async () => {
    const [victim, other] = cluster.servers;
    // The subscriber's logins wait at this gate: it comes back only once the test lets it.
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    let logins = 0;
    const gated: typeof fetch = async (input, init) => {
      if (String(input).endsWith("/v1/login") && logins++ > 0) await gate;
      return fetch(input, init);
    };
    const subscriber = await Client.connect({
      coordinator: cluster.url,
      preferredServer: victim.id,
      fetch: gated,
      reconnect: { initialMs: 20, maxMs: 200 },
    });
    const publisher = await Client.connect({ coordinator: cluster.url, preferredServer: other.id });
    try {
      await subscriber.subscribe("drones/7/state");
      const got: Message[] = [];
      subscriber.on("message", (m) => m.topic === "drones/7/state" && got.push(m));
      const first = new Promise<void>((done) => subscriber.on("message", () => got.length === 3 && done()));
      for (let i = 1; i <= 3; i++) publisher.publish("drones/7/state", `state ${i}`);
      await first;

      const disconnected = next(subscriber, "disconnected");
      await victim.proc.stop(true);
      await disconnected;
      // Published while the subscriber is away (and cannot log in).
      for (let i = 4; i <= 23; i++) publisher.publish("drones/7/state", `state ${i}`);
      // Until the other server has taken them all (its history keeps them).
      while (publisher.unconfirmed > 0) await new Promise((r) => setTimeout(r, 10));

      const recovered = next(subscriber, "recovered");
      const gap = new Promise((_, fail) => subscriber.on("recoveryGap", (e) => fail(new Error(`gap ${JSON.stringify(e)}`))));
      open();
      const r = await Promise.race([recovered, gap]);
      assert.deepEqual(r, { topic: "drones/7/state", count: 20 });
      publisher.publish("drones/7/state", "live");
      const live = new Promise<void>((done) => subscriber.on("message", (m) => m.text() === "live" && done()));
      await live;
      assert.deepEqual(
        got.map((m) => m.text()),
        [...Array.from({ length: 23 }, (_, i) => `state ${i + 1}`), "live"],
      );
    } finally {
      subscriber.close();
      publisher.close();
    }
  });
});
