// The TypeScript client against real coordinator and comm server processes.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { create, toBinary } from "@bufbuild/protobuf";

import {
  Client,
  type ClientEvents,
  type Message,
  RelaymeshError,
  generateEd25519Identity,
  login,
  proto,
} from "../src/index.js";
import { Cluster, accounts } from "./cluster.js";

const WAIT_MS = 15_000;

/** The next `event` of `client` that `accept` takes (within WAIT_MS). */
function next<K extends keyof ClientEvents>(
  client: Client,
  event: K,
  accept: (e: ClientEvents[K]) => boolean = () => true,
): Promise<ClientEvents[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`no ${event} event within ${WAIT_MS} ms`));
    }, WAIT_MS);
    const stop = client.on(event, (e) => {
      if (!accept(e)) return;
      clearTimeout(timer);
      stop();
      resolve(e);
    });
  });
}

/** Collects the messages `client` receives on `topic` until `until` says it has enough. */
function messages(client: Client, topic: string, until: (got: Message[]) => boolean): Promise<Message[]> {
  const got: Message[] = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`${got.length} messages on ${topic} within ${WAIT_MS} ms: ${got.map((m) => m.text())}`));
    }, WAIT_MS);
    const stop = client.on("message", (m) => {
      if (m.topic !== topic) return;
      got.push(m);
      if (until(got)) {
        clearTimeout(timer);
        stop();
        resolve(got);
      }
    });
  });
}

/** The next `count` `event`s of `client` (within WAIT_MS). */
function collect<K extends keyof ClientEvents>(client: Client, event: K, count: number): Promise<Array<ClientEvents[K]>> {
  const got: Array<ClientEvents[K]> = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`${got.length} of ${count} ${event} events within ${WAIT_MS} ms`));
    }, WAIT_MS);
    const stop = client.on(event, (e) => {
      got.push(e);
      if (got.length === count) {
        clearTimeout(timer);
        stop();
        resolve(got);
      }
    });
  });
}

async function refusal(promise: Promise<unknown>): Promise<RelaymeshError> {
  try {
    await promise;
  } catch (e) {
    assert.ok(e instanceof RelaymeshError, `not a RelaymeshError: ${e}`);
    return e;
  }
  assert.fail("it was not refused");
}

describe("an open cluster of three comm servers", () => {
  let cluster: Cluster;
  before(async () => {
    cluster = await Cluster.start(3);
  });
  after(async () => {
    await cluster.stop();
  });

  test("a message published on one server reaches a subscriber on another, in order, once", async () => {
    const [a, b] = cluster.servers;
    const publisher = await Client.connect({ coordinator: cluster.url, preferredServer: a.id });
    const subscriber = await Client.connect({ coordinator: cluster.url, preferredServer: b.id });
    try {
      assert.equal(publisher.serverId, a.id);
      assert.equal(subscriber.serverId, b.id);
      await subscriber.subscribe("chat/lobby");
      const got = messages(subscriber, "chat/lobby", (m) => m.length === 50);
      for (let i = 1; i <= 50; i++) publisher.publish("chat/lobby", `hello ${i}`);
      const texts = (await got).map((m) => m.text());
      assert.deepEqual(
        texts,
        Array.from({ length: 50 }, (_, i) => `hello ${i + 1}`),
      );
      const first = (await got)[0];
      assert.equal(first.fromAlias, publisher.alias);
      assert.equal(first.seq, 1n);
    } finally {
      publisher.close();
      subscriber.close();
    }
  });

  test("a burst bigger than one publish batch arrives whole and in order, on the same server and another", async () => {
    const [a, b] = cluster.servers;
    const publisher = await Client.connect({ coordinator: cluster.url, preferredServer: a.id });
    const near = await Client.connect({ coordinator: cluster.url, preferredServer: a.id });
    const far = await Client.connect({ coordinator: cluster.url, preferredServer: b.id });
    try {
      await near.subscribe("burst/t");
      await far.subscribe("burst/t");
      const count = 600;
      // 600 publishes of up to 1 KiB in one turn of the event loop: several batches of at most
      // 64 KiB each, then delivered in batches.
      const sizes = Array.from({ length: count }, (_, i) => 1 + ((i * 37) % 1024));
      const want = sizes.map((n, i) => `${i}:`.padEnd(n, "x"));
      const gotNear = messages(near, "burst/t", (m) => m.length === count);
      const gotFar = messages(far, "burst/t", (m) => m.length === count);
      for (const text of want) publisher.publish("burst/t", text);
      assert.deepEqual((await gotNear).map((m) => m.text()), want);
      assert.deepEqual((await gotFar).map((m) => m.text()), want);
      assert.deepEqual((await gotFar).map((m) => m.seq), want.map((_, i) => BigInt(i + 1)));
    } finally {
      publisher.close();
      near.close();
      far.close();
    }
  });

  test("a topic that breaks the topic rules fails its subscribe; the server closes, the client comes back with the rest", async () => {
    const client = await Client.connect({ coordinator: cluster.url });
    try {
      await client.subscribe("still/up");
      // The server closes a link that sends an invalid topic (the error names the request).
      const back = next(client, "reconnected");
      const e = await refusal(client.subscribe("a//b"));
      assert.equal(e.code, "INVALID_TOPIC");
      await back;
      const got = messages(client, "still/up", (m) => m.length === 1);
      client.publish("still/up", "yes");
      assert.equal((await got)[0].text(), "yes");
    } finally {
      client.close();
    }
  });

  test("publishes beyond the outbound queue are refused with QUEUE_FULL", async () => {
    const client = await Client.connect({ coordinator: cluster.url, outboundQueue: 3 });
    try {
      client.publish("q/t", "1");
      client.publish("q/t", "2");
      client.publish("q/t", "3");
      // None can have been confirmed yet: the confirmations come from the socket.
      assert.throws(() => client.publish("q/t", "4"), (e: unknown) => e instanceof RelaymeshError && e.code === "QUEUE_FULL");
    } finally {
      client.close();
    }
    assert.throws(() => client.publish("q/t", "5"), (e: unknown) => e instanceof RelaymeshError && e.code === "CLOSED");
  });

  test("a resend claiming another publisher's name cannot hide that publisher's messages", async () => {
    const victim = await Client.connect({ coordinator: cluster.url });
    const subscriber = await Client.connect({ coordinator: cluster.url });
    // A client of its own making, with the frames written by hand.
    const placement = await login(cluster.url);
    const forger = new WebSocket(`${placement.url}?key=${placement.key}`);
    forger.binaryType = "arraybuffer";
    const sendFrame = (kind: Parameters<typeof create<typeof proto.ClientToServerSchema>>[1]) =>
      forger.send(toBinary(proto.ClientToServerSchema, create(proto.ClientToServerSchema, kind)));
    try {
      await new Promise<void>((ready, fail) => {
        forger.onopen = () => sendFrame({ kind: { case: "attach", value: { protocolVersion: 1 } } });
        forger.onmessage = () => ready();
        forger.onerror = () => fail(new Error("the forger's connection failed"));
      });
      await subscriber.subscribe("news/wire");
      const got = messages(subscriber, "news/wire", (m) => m.filter((x) => x.fromAlias === victim.alias).length === 2);
      victim.publish("news/wire", "first");
      sendFrame({
        kind: {
          case: "publish",
          value: { topic: "news/wire", payload: new TextEncoder().encode("forged"), seq: 2n ** 63n, resentFrom: victim.alias },
        },
      });
      victim.publish("news/wire", "second");
      const texts = (await got).filter((m) => m.fromAlias === victim.alias).map((m) => m.text());
      assert.deepEqual(texts, ["first", "second"]);
    } finally {
      forger.close();
      victim.close();
      subscriber.close();
    }
  });

  test("a login key serves once: a second connection with it is refused before it opens", async () => {
    // Hands the first login's answer to the second login too, as a replayed key would be.
    let first: Response | undefined;
    const replaying: typeof fetch = async (input, init) => {
      const url = String(input);
      if (!url.endsWith("/v1/login")) return fetch(input, init);
      if (!first) first = await fetch(input, init);
      return first.clone();
    };
    const client = await Client.connect({ coordinator: cluster.url, fetch: replaying });
    try {
      const e = await refusal(Client.connect({ coordinator: cluster.url, fetch: replaying }));
      assert.equal(e.code, "UPGRADE_REFUSED");
      assert.match(e.message, /KEY_INVALID/);
    } finally {
      client.close();
    }
  });

  test("nodes on different servers reach each other: direct messages, signals, presence, the directory", async () => {
    const [a, b] = cluster.servers;
    const keyLogin = async (server: string) =>
      Client.connect({
        coordinator: cluster.url,
        credentials: { key: { account: "fleet", identity: await generateEd25519Identity() } },
        preferredServer: server,
      });
    const station = await keyLogin(a.id);
    try {
      assert.match(station.nodeId, /^[0-9a-f]{32}$/);
      await station.subscribe("@presence");
      // (The station's own arrival may still be on its way to it: only another node counts.)
      const online = next(station, "presence", (e) => e.change === "online" && e.node.nodeId !== station.nodeId);
      const drone = await keyLogin(b.id);
      try {
        assert.notEqual(drone.serverId, station.serverId);
        assert.equal((await online).node.nodeId, drone.nodeId);

        const direct = next(station, "direct");
        drone.send(station.nodeId, "position 48.85,2.35");
        const d = await direct;
        assert.equal(d.text(), "position 48.85,2.35");
        assert.equal(d.fromNode, drone.nodeId);

        const offer = next(drone, "signal");
        station.signal(drone.nodeId, "OFFER", "v=0 sdp");
        const s = await offer;
        assert.equal(s.kind, "OFFER");
        assert.equal(s.fromNode, station.nodeId);
        assert.equal(new TextDecoder().decode(s.payload), "v=0 sdp");

        const { nodes, total } = await station.listNodes();
        assert.equal(total, 2);
        assert.deepEqual(nodes.map((n) => n.nodeId).sort(), [station.nodeId, drone.nodeId].sort());

        const nobody = "0".repeat(32);
        const undeliverable = next(station, "undeliverable", (u) => u.toNode === nobody);
        const seq = station.signal(nobody, "OFFER", "x");
        const u = await undeliverable;
        assert.equal(u.seq, seq);
        assert.match(u.reason, /NOT_CONNECTED|UNKNOWN_NODE/);

        const droneId = drone.nodeId;
        const offline = next(station, "presence", (e) => e.change === "offline");
        drone.close();
        assert.equal((await offline).node.nodeId, droneId);
      } finally {
        drone.close();
      }
    } finally {
      station.close();
    }
  });

  test("after its server is killed a subscriber reconnects elsewhere, resubscribed, and a publisher there loses nothing it had not had confirmed", async () => {
    const [victim, other] = cluster.servers;
    const subscriber = await Client.connect({
      coordinator: cluster.url,
      preferredServer: victim.id,
      reconnect: { initialMs: 50, maxMs: 500 },
    });
    const publisher = await Client.connect({
      coordinator: cluster.url,
      preferredServer: victim.id,
      reconnect: { initialMs: 50, maxMs: 500 },
    });
    const listener = await Client.connect({ coordinator: cluster.url, preferredServer: other.id });
    try {
      assert.equal(subscriber.serverId, victim.id);
      await subscriber.subscribe("fleet/state");
      await listener.subscribe("fleet/from-victim");

      const disconnected = next(subscriber, "disconnected");
      const reconnected = next(subscriber, "reconnected");
      const publisherBack = next(publisher, "reconnected");
      await victim.proc.stop(true);
      assert.equal((await disconnected).serverId, victim.id);
      const back = await reconnected;
      assert.notEqual(back.serverId, victim.id);
      assert.equal(subscriber.serverId, back.serverId);

      // Published while the publisher reconnects: they wait in its queue and go out after.
      for (let i = 1; i <= 20; i++) publisher.publish("fleet/from-victim", `after ${i}`);
      const got = messages(listener, "fleet/from-victim", (m) => m.length === 20);
      await publisherBack;
      assert.deepEqual(
        (await got).map((m) => m.text()),
        Array.from({ length: 20 }, (_, i) => `after ${i + 1}`),
      );

      // The restored subscription works from anywhere.
      const state = messages(subscriber, "fleet/state", (m) => m.length === 1);
      listener.publish("fleet/state", "landed");
      assert.equal((await state)[0].text(), "landed");
    } finally {
      subscriber.close();
      publisher.close();
      listener.close();
    }
  });
});

describe("nodes of an account on a SQLite store, which keeps inboxes", () => {
  let dir: string;
  let db: string;
  let cluster: Cluster;
  const drone = generateEd25519Identity();
  const station = generateEd25519Identity();
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "relaymesh-ts-inbox-"));
    db = `sqlite://${join(dir, "accounts.db")}`;
    await accounts(db, "create", "acme");
    await accounts(db, "add-key", "acme", (await drone).publicKeyHex);
    await accounts(db, "add-key", "acme", (await station).publicKeyHex);
    cluster = await Cluster.start(2, { accountsUrl: db });
  });
  after(async () => {
    await cluster.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  /** The inbox sizes `coordinator accounts nodes` shows, by node id. */
  async function inboxes(): Promise<Map<string, number>> {
    const out = await accounts(db, "nodes", "acme");
    return new Map(
      out
        .split("\n")
        .map((line) => [line.split("\t")[0], Number(/\tinbox (\d+)/.exec(line)?.[1] ?? NaN)] as const),
    );
  }

  test("direct messages to an offline node wait in its inbox, arrive at its login, and once acknowledged do not come again", async () => {
    const [a, b] = cluster.servers;
    const login = async (identity: Promise<Awaited<typeof drone>>, server: string) =>
      Client.connect({
        coordinator: cluster.url,
        credentials: { key: { account: "acme", identity: await identity } },
        preferredServer: server,
      });
    const sender = await login(station, a.id);
    // The drone's sessions, each seen online by the station before it goes on, and offline
    // before the test goes on (a session closed before its server reported it is never
    // reported, and a direct message sent before the offline is heard may still go live).
    const online = async <T>(server: string, attach: (client: Client) => T) => {
      const seen = next(sender, "presence", (e) => e.change === "online" && e.node.nodeId !== sender.nodeId);
      const client = await login(drone, server);
      const attached = attach(client);
      try {
        await seen;
      } catch (e) {
        client.close();
        throw e;
      }
      return { client, attached };
    };
    const offline = async (client: Client) => {
      const nodeId = client.nodeId; // (a closed client has none)
      const gone = next(sender, "presence", (e) => e.change === "offline" && e.node.nodeId === nodeId);
      client.close();
      await gone;
    };
    try {
      await sender.subscribe("@presence");
      const { client: first } = await online(b.id, () => undefined);
      const droneId = first.nodeId;
      await offline(first);
      const texts = ["one", "two", "three"];
      const accepted = collect(sender, "accepted", texts.length);
      const seqs = texts.map((t) => sender.send(droneId, t));
      const stored = await accepted;
      assert.deepEqual(
        stored.map((e) => [e.seq, e.toNode]),
        seqs.map((seq) => [seq, droneId]),
      );
      assert.ok(stored.every((e) => e.inboxId > 0n));
      assert.equal((await inboxes()).get(droneId), 3);

      // At its login, in order, each with its inbox id; the client acknowledges them.
      // (The listener goes on as the client is made: the inbox comes at once.)
      const { client: back, attached: directs } = await online(b.id, (c) => collect(c, "direct", texts.length));
      try {
        const got = await directs;
        assert.deepEqual(got.map((d) => d.text()), texts);
        assert.deepEqual(got.map((d) => d.inboxId), stored.map((e) => e.inboxId));
        // Acknowledged: deleted from the store (looked at until it is, within WAIT_MS).
        const deadline = Date.now() + WAIT_MS;
        while ((await inboxes()).get(droneId) !== 0) {
          assert.ok(Date.now() < deadline, `the inbox still holds messages after ${WAIT_MS} ms`);
          await new Promise((r) => setTimeout(r, 20));
        }
      } finally {
        await offline(back);
      }
      // So the next login gets nothing from the inbox: the first direct is a new one.
      const { client: again, attached: direct } = await online(a.id, (c) => next(c, "direct"));
      try {
        sender.send(droneId, "four");
        const d = await direct;
        assert.equal(d.text(), "four");
        assert.equal(d.inboxId, 0n);
      } finally {
        again.close();
      }
    } finally {
      sender.close();
    }
  });
});

describe("a comm server drained (SIGTERM) under its clients", () => {
  let cluster: Cluster;
  before(async () => {
    cluster = await Cluster.start(3);
  });
  after(async () => {
    await cluster.stop();
  });

  test("its clients move make-before-break: no disconnection, nothing lost, nothing twice, the publishes made meanwhile delivered", async () => {
    const [drained, , far] = cluster.servers;
    const watcher = await Client.connect({ coordinator: cluster.url, preferredServer: far.id });
    const movers: Client[] = [];
    try {
      await watcher.subscribe("drain/moving");
      for (let i = 0; i < 3; i++) {
        // A client id: the move's login must not replace the session it moves from.
        const mover = await Client.connect({
          coordinator: cluster.url,
          preferredServer: drained.id,
          clientId: `mover-${i}`,
        });
        assert.equal(mover.serverId, drained.id);
        await mover.subscribe(["drain/elsewhere", "drain/gone"]);
        movers.push(mover);
      }
      const disconnections: string[] = [];
      for (const m of movers) m.on("disconnected", (e) => disconnections.push(e.reason));
      const moved = movers.map((m) => next(m, "moved"));
      // 400 messages to the movers and 400 from one of them, then one more to mark the end.
      const count = 400;
      const want = Array.from({ length: count }, (_, i) => `m${i}`);
      const received = movers.map((m) => messages(m, "drain/elsewhere", (got) => got.length === count + 1));
      const fromMover = messages(watcher, "drain/moving", (got) => got.length === count);
      const publishing = (async () => {
        for (let i = 0; i < count; i += 20) {
          for (let j = i; j < i + 20; j++) {
            watcher.publish("drain/elsewhere", want[j]);
            movers[0].publish("drain/moving", want[j]);
          }
          await new Promise((r) => setTimeout(r, 2));
        }
      })();
      const stopped = drained.proc.stop(); // SIGTERM: the server drains before it stops
      // Subscription changes made while they move end up made on the new server.
      const late = movers[1].subscribe("drain/late");
      const unsubscribed = movers[2].unsubscribe("drain/gone");
      const gone: string[] = [];
      movers[2].on("message", (m) => {
        if (m.topic === "drain/gone") gone.push(m.text());
      });
      for (const e of await Promise.all(moved)) {
        assert.equal(e.fromServer, drained.id);
        assert.notEqual(e.serverId, drained.id);
      }
      await publishing;
      await late;
      await unsubscribed;
      // In this order from one publisher: a message on the topic left, one on the topic
      // joined, then the end mark on the standing one.
      const lateGot = messages(movers[1], "drain/late", (got) => got.length === 1);
      watcher.publish("drain/gone", "gone");
      watcher.publish("drain/late", "late");
      watcher.publish("drain/elsewhere", "end");
      for (const [i, got] of (await Promise.all(received)).entries()) {
        assert.deepEqual(got.map((m) => m.text()), [...want, "end"], `mover ${i}`);
        assert.notEqual(movers[i].serverId, drained.id);
      }
      assert.deepEqual((await fromMover).map((m) => m.text()), want);
      assert.deepEqual((await lateGot).map((m) => m.text()), ["late"]);
      assert.deepEqual(gone, [], "the topic left during the move is not delivered");
      assert.deepEqual(disconnections, []);
      await stopped;
    } finally {
      watcher.close();
      for (const m of movers) m.close();
    }
  });
});

describe("an account with roles, an access code and an Ed25519 key", () => {
  let dir: string;
  let cluster: Cluster;
  let code: string;
  const identity = generateEd25519Identity();
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "relaymesh-ts-accounts-"));
    const file = join(dir, "accounts.json");
    await accounts(file, "create", "acme");
    await accounts(file, "set-role", "acme", "agent", "--publish", "telemetry/#", "--subscribe", "command/+");
    await accounts(file, "set-role", "acme", "gcs", "--publish", "command/+", "--subscribe", "telemetry/#");
    code = await accounts(file, "add-code", "acme", "--id", "fleet");
    await accounts(file, "add-key", "acme", (await identity).publicKeyHex, "--id", "gcs-1");
    cluster = await Cluster.start(2, { accountsFile: file });
  });
  after(async () => {
    await cluster.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test("an agent's telemetry reaches a ground station logged in with its Ed25519 key", async () => {
    const gcs = await Client.connect({
      coordinator: cluster.url,
      credentials: { key: { account: "acme", identity: await identity, role: "gcs" } },
      preferredServer: cluster.servers[0].id,
    });
    const agent = await Client.connect({
      coordinator: cluster.url,
      credentials: { accessCode: { account: "acme", code, role: "agent" } },
      preferredServer: cluster.servers[1].id,
    });
    try {
      await gcs.subscribe("telemetry/pos");
      const got = messages(gcs, "telemetry/pos", (m) => m.length === 1);
      agent.publish("telemetry/pos", "48.85,2.35");
      const m = (await got)[0];
      assert.equal(m.text(), "48.85,2.35");
      assert.equal(m.fromRole, "agent");
    } finally {
      gcs.close();
      agent.close();
    }
  });

  test("outside its role a publish is reported as forbidden and a subscription refused, the connection up", async () => {
    const agent = await Client.connect({
      coordinator: cluster.url,
      credentials: { accessCode: { account: "acme", code, role: "agent" } },
    });
    try {
      const forbidden = next(agent, "forbidden");
      agent.publish("command/drone-7", "land");
      assert.match((await forbidden).message, /command\/drone-7/);
      const e = await refusal(agent.subscribe("telemetry/pos"));
      assert.equal(e.code, "FORBIDDEN");
      await agent.subscribe("command/drone-7");
    } finally {
      agent.close();
    }
  });

  test("bad credentials are refused at login with the coordinator's code", async () => {
    const wrongCode = await refusal(
      Client.connect({
        coordinator: cluster.url,
        credentials: { accessCode: { account: "acme", code: "not-the-code", role: "agent" } },
      }),
    );
    assert.equal(wrongCode.code, "BAD_CREDENTIALS");
    assert.equal(wrongCode.status, 401);
    const stranger = await generateEd25519Identity();
    const unknownKey = await refusal(
      Client.connect({
        coordinator: cluster.url,
        credentials: { key: { account: "acme", identity: stranger, role: "gcs" } },
      }),
    );
    assert.equal(unknownKey.code, "BAD_CREDENTIALS");
    const noSuchRole = await refusal(
      Client.connect({
        coordinator: cluster.url,
        credentials: { accessCode: { account: "acme", code, role: "admiral" } },
      }),
    );
    assert.equal(noSuchRole.code, "ROLE_NOT_PERMITTED");
  });

  test("a subscribe made while reconnecting fails alone when refused; the standing ones come back", async () => {
    const [first, second] = cluster.servers;
    const agent = await Client.connect({
      coordinator: cluster.url,
      credentials: { accessCode: { account: "acme", code, role: "agent" } },
      preferredServer: first.id,
      reconnect: { initialMs: 50, maxMs: 500 },
    });
    const gcs = await Client.connect({
      coordinator: cluster.url,
      credentials: { key: { account: "acme", identity: await identity, role: "gcs" } },
      preferredServer: second.id,
    });
    try {
      await agent.subscribe("command/drone-7");
      const disconnected = next(agent, "disconnected");
      const reconnected = next(agent, "reconnected");
      await first.proc.stop(true);
      await disconnected;
      // Outside the agent's role: asked for while away, refused on the next server.
      const forbidden = refusal(agent.subscribe("telemetry/pos"));
      await reconnected;
      assert.equal((await forbidden).code, "FORBIDDEN");
      const got = messages(agent, "command/drone-7", (m) => m.length === 1);
      gcs.publish("command/drone-7", "land");
      assert.equal((await got)[0].text(), "land");
    } finally {
      agent.close();
      gcs.close();
    }
  });
});
