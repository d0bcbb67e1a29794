// The web console in a real Chromium (Debian's `chromium`, driven by playwright-core): it
// shows the cluster's three servers and their links, tails a topic with the TypeScript client
// inside the page, and follows a server being killed.
//
// Needs /usr/bin/chromium (or CHROMIUM); without it the test is skipped, unless
// RELAYMESH_REQUIRE_BROWSER=1 (as `.ci/run` sets), when it fails. RELAYMESH_SCREENSHOTS=DIR
// writes the screenshots there (`docs/` holds the README's).

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { type Browser, chromium } from "playwright-core";

import { Client } from "../src/index.js";
import { Cluster } from "./cluster.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TOKEN = "browser-test-admin-token";
const WAIT_MS = 15_000;
const present = existsSync(CHROMIUM);
if (!present && process.env.RELAYMESH_REQUIRE_BROWSER === "1") {
  throw new Error(`${CHROMIUM} is missing (apt-get install chromium), and RELAYMESH_REQUIRE_BROWSER=1`);
}

describe("the web console in Chromium", { skip: present ? false : `no ${CHROMIUM}` }, () => {
  let cluster: Cluster;
  let browser: Browser;
  before(async () => {
    cluster = await Cluster.start(3, undefined, TOKEN);
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
