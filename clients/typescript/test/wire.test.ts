// The message-frame reader against the generated protobuf code: the same fields out of the
// same bytes, and a clear error (never a wrong message) for bytes that are not one.

import assert from "node:assert/strict";
import { test } from "node:test";

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";

import { ServerToClientSchema } from "../src/gen/relaymesh/v1/mesh_pb.js";
import { MessageReader, WireError } from "../src/wire.js";

function frame(message: Parameters<typeof create<typeof ServerToClientSchema>>[1]): Uint8Array {
  return toBinary(ServerToClientSchema, create(ServerToClientSchema, message));
}

test("a message frame reads as the generated decoder reads it", () => {
  const reader = new MessageReader();
  const cases = [
    { topic: "chat/lobby", fromAlias: "a1-2", payload: new Uint8Array([1, 2, 3]), seq: 7n },
    {
      topic: "télémétrie/drone-7",
      fromAlias: "b9",
      payload: new TextEncoder().encode("48.85,2.35"),
      fromRole: "agent",
      seq: 2n ** 63n + 5n,
      resentFrom: "a1-1",
      fromNode: "0123456789abcdef0123456789abcdef",
      signal: 3,
      inboxId: 99n,
      stream: 2n ** 64n - 1n,
      offset: 123_456n,
      publishedMs: 1_764_979_200_000n,
    },
    { topic: "t", fromAlias: "", payload: new Uint8Array(0) },
  ];
  for (const c of cases) {
    // Twice: the second time the strings come from the reader's caches.
    for (let round = 0; round < 2; round++) {
      const got = reader.read(frame({ kind: { case: "message", value: c } }));
      assert.ok(got, `read ${JSON.stringify(c, (_, v) => (typeof v === "bigint" ? String(v) : v))}`);
      assert.equal(got.topic, c.topic);
      assert.equal(got.fromAlias, c.fromAlias);
      assert.deepEqual([...got.payload], [...c.payload]);
      assert.equal(got.fromRole, c.fromRole ?? "");
      assert.equal(got.seq, c.seq ?? 0n);
      assert.equal(got.resentFrom, c.resentFrom ?? "");
      assert.equal(got.fromNode, c.fromNode ?? "");
      assert.equal(got.signal, c.signal ?? 0);
      assert.equal(got.inboxId, c.inboxId ?? 0n);
      assert.equal(got.stream, c.stream ?? 0n);
      assert.equal(got.offset, c.offset ?? 0n);
      assert.equal(got.publishedMs, c.publishedMs ?? 0n);
    }
  }
});

test("other frames are left to the generated decoder", () => {
  const reader = new MessageReader();
  assert.equal(reader.read(frame({ kind: { case: "pong", value: { nonce: 1n } } })), undefined);
  assert.equal(reader.read(new Uint8Array(0)), undefined);
});

test("a message frame that does not decode is an error, not a message", () => {
  const reader = new MessageReader();
  const good = frame({ kind: { case: "message", value: { topic: "abc", fromAlias: "x", seq: 300n } } });
  // Cut short, the length saying more than there is: not taken for a message (the generated
  // decoder then refuses it, and the client closes the link as BAD_FRAME).
  const cut = good.subarray(0, good.length - 1);
  assert.equal(reader.read(cut), undefined);
  assert.throws(() => fromBinary(ServerToClientSchema, cut));
  // A field whose length runs past the message.
  const bad = Uint8Array.from([0x12, 4, 0x0a, 9, 0x61, 0x62]);
  assert.throws(() => reader.read(bad), WireError);
  // A wire type protobuf does not have.
  assert.throws(() => reader.read(Uint8Array.from([0x12, 2, 0x0f, 0])), WireError);
  // A string that is not UTF-8.
  assert.throws(() => reader.read(Uint8Array.from([0x12, 3, 0x0a, 1, 0xff])));
});
