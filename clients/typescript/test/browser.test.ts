// The web console in a real Chromium (Debian's `chromium`, driven by playwright-core): it
// shows the cluster's three servers and their links, tails a topic with the TypeScript client
// inside the page, and follows a server being killed.
//
// Needs /usr/bin/chromium (or CHROMIUM); without it the test is skipped, unless
// RELAYMESH_REQUIRE_BROWSER=1 (as `.ci/run` sets), when it fails. RELAYMESH_SCREENSHOTS=DIR
// writes the screenshots there (`docs/` holds the README's).

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";

import { type Browser, chromium } from "playwright-core";

import { Client } from "../src/index.js";
import { Cluster, serveFiles } from "./cluster.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TOKEN = "browser-test-admin-token";
const WAIT_MS = 15_000;
const present = existsSync(CHROMIUM);
if (!present && process.env.RELAYMESH_REQUIRE_BROWSER === "1") {
  throw new Error(`${CHROMIUM} is missing (apt-get install chromium), and RELAYMESH_REQUIRE_BROWSER=1`);
}

/** This package: the examples and dist/browser are served from it. */
const pkg = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

describe("the web console and the examples in Chromium", { skip: present ? false : `no ${CHROMIUM}` }, () => {
  let cluster: Cluster;
  let browser: Browser;
  let files: Awaited<ReturnType<typeof serveFiles>>;
  before(async () => {
    files = await serveFiles(pkg);
    cluster = await Cluster.start(3, { adminToken: TOKEN, corsOrigins: [files.origin] });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      // As root (CI), and on a machine whose outside network is closed.
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
  });
  after(async () => {
    await browser?.close();
    await cluster?.stop();
    await files?.close();
  });

  test("two chat pages on different comm servers, served from another origin, talk", async () => {
    const [a, b] = cluster.servers;
    const open = async (server: string) => {
      const page = await browser.newPage({ viewport: { width: 760, height: 520 } });
      const errors: string[] = [];
      page.on("pageerror", (e) => errors.push(e.message));
      await page.goto(
        `${files.origin}/examples/chat.html?coordinator=${encodeURIComponent(cluster.url)}&server=${encodeURIComponent(server)}`,
      );
      await page.waitForFunction(() => document.querySelector("#status")?.textContent?.startsWith("in chat/lobby"), null, {
        timeout: WAIT_MS,
      });
      return { page, errors };
    };
    const alice = await open(a.id);
    const bob = await open(b.id);
    assert.match((await alice.page.textContent("#status")) ?? "", new RegExp(`on ${a.id.replace(/\./g, "\\.")}$`));
    assert.match((await bob.page.textContent("#status")) ?? "", new RegExp(`on ${b.id.replace(/\./g, "\\.")}$`));
    const say = async (who: typeof alice, name: string, text: string) => {
      await who.page.fill("#name", name);
      await who.page.fill("#text", text);
      await who.page.click("#say button");
    };
    const heard = (who: typeof alice, line: string) =>
      who.page.waitForFunction((l) => [...document.querySelectorAll("#log li")].some((li) => li.textContent === l), line, {
        timeout: WAIT_MS,
      });
    await say(alice, "alice", "hi bob, I am on server A");
    await heard(bob, "alice: hi bob, I am on server A");
    await say(bob, "bob", "hi alice, B here");
    await heard(alice, "bob: hi alice, B here");
    await say(alice, "alice", "<b>not bold</b>");
    await heard(bob, "alice: <b>not bold</b>");
    assert.equal(await bob.page.locator("#log b").count(), 0, "text stays text");
    const shots = process.env.RELAYMESH_SCREENSHOTS;
    if (shots) {
      mkdirSync(shots, { recursive: true });
      await bob.page.screenshot({ path: join(shots, "chat.png") });
    }
    assert.deepEqual([...alice.errors, ...bob.errors], []);
    await alice.page.close();
    await bob.page.close();
  });

  test("the ground station lists each drone publishing on the telemetry topic", async () => {
    const page = await browser.newPage({ viewport: { width: 900, height: 400 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(
      `${files.origin}/examples/ground-station.html?coordinator=${encodeURIComponent(cluster.url)}&topic=fleet/telemetry`,
    );
    await page.waitForFunction(() => document.querySelector("#status")?.textContent?.startsWith("fleet/telemetry on"), null, {
      timeout: WAIT_MS,
    });
    const drones = await Promise.all([0, 1, 2].map(() => Client.connect({ coordinator: cluster.url })));
    try {
      drones.forEach((d, i) => {
        for (let n = 0; n < 5; n++) d.publish("fleet/telemetry", `alt=${100 + i * 10 + n}`);
      });
      await page.waitForFunction(
        (aliases) => {
          const rows = [...document.querySelectorAll("#drones tr")];
          return aliases.every((a) => rows.some((r) => r.children[0]?.textContent === a && r.children[2]?.textContent === "5"));
        },
        drones.map((d) => d.alias),
        { timeout: WAIT_MS },
      );
      const shots = process.env.RELAYMESH_SCREENSHOTS;
      if (shots) {
        mkdirSync(shots, { recursive: true });
        await page.screenshot({ path: join(shots, "ground-station.png") });
      }
    } finally {
      for (const d of drones) d.close();
    }
    assert.deepEqual(errors, []);
    await page.close();
  });

  test("shows three linked servers, tails a topic, and follows a server's death", async () => {
    const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`${cluster.url}/console`);
    await page.fill("#token", "wrong-token");
    await page.click("#token-form button");
    await page.waitForFunction(() => document.querySelector("#token-error")?.textContent !== "", null, {
      timeout: WAIT_MS,
    });
    await page.fill("#token", TOKEN);
    await page.click("#token-form button");
    await page.waitForFunction(
      () =>
        [...document.querySelectorAll("#servers tr")].filter((r) => r.children[1]?.textContent === "up").length === 3 &&
        document.querySelectorAll("#mesh line").length === 3,
      null,
      { timeout: WAIT_MS },
    );

    // The topic tail: the TypeScript client inside the page, fed from Node.
    await page.fill("#tail-topic", "console/demo");
    await page.click("#tail-form button");
    await page.waitForFunction(() => document.querySelector("#tail-status")?.textContent?.startsWith("watching"), null, {
      timeout: WAIT_MS,
    });
    const publisher = await Client.connect({ coordinator: cluster.url });
    try {
      for (const text of ["drone-7 airborne", "drone-7 at 120 m", "drone-7 landing"]) {
        publisher.publish("console/demo", text);
      }
      await page.waitForFunction(() => document.querySelector("#tail-log")?.textContent?.includes("drone-7 landing"), null, {
        timeout: WAIT_MS,
      });
    } finally {
      publisher.close();
    }
    // The next polls count the page's own client (and the publisher, while it is there).
    await page.waitForFunction(() => /· [1-9]\d* clients/.test(document.querySelector("#summary")?.textContent ?? ""), null, {
      timeout: WAIT_MS,
    });
    const shots = process.env.RELAYMESH_SCREENSHOTS;
    if (shots) {
      mkdirSync(shots, { recursive: true });
      await page.screenshot({ path: join(shots, "console.png") });
    }

    // A server dies: the console follows.
    await cluster.servers[2].proc.stop(true);
    await page.waitForFunction(
      () =>
        [...document.querySelectorAll("#servers tr")].filter((r) => r.children[1]?.textContent === "up").length === 2,
      null,
      { timeout: WAIT_MS },
    );
    assert.deepEqual(errors, []);
    await page.close();
  });
});
