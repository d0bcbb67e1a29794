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

test("a batch reads as the generated decoder reads it, in order", () => {
  const reader = new MessageReader();
  const messages = [
    { topic: "chat/lobby", fromAlias: "a1", payload: new Uint8Array([1]), seq: 1n },
    { topic: "chat/lobby", fromAlias: "a1", payload: new Uint8Array(300).fill(2), seq: 2n, stream: 9n, offset: 4n },
    { topic: "other", fromAlias: "b2", payload: new Uint8Array(0), fromNode: "f00d", signal: 1 },
  ];
  const bytes = frame({ kind: { case: "batch", value: { messages } } });
  const expected = fromBinary(ServerToClientSchema, bytes);
  assert.equal(expected.kind.case, "batch");
  const got = reader.readBatch(bytes);
  assert.ok(got);
  assert.equal(reader.read(bytes), undefined, "a batch is not one message");
  assert.equal(got.length, 3);
  const want = expected.kind.case === "batch" ? expected.kind.value.messages : [];
  for (const [i, m] of got.entries()) {
    assert.equal(m.topic, want[i].topic);
    assert.equal(m.fromAlias, want[i].fromAlias);
    assert.deepEqual([...m.payload], [...want[i].payload]);
    assert.equal(m.seq, want[i].seq);
    assert.equal(m.stream, want[i].stream);
    assert.equal(m.offset, want[i].offset);
    assert.equal(m.fromNode, want[i].fromNode);
    assert.equal(m.signal, want[i].signal);
  }
  // Each element is byte for byte a message frame (the last one ends the batch).
  const last = frame({ kind: { case: "message", value: messages[2] } });
  assert.deepEqual([...bytes.subarray(bytes.length - last.length)], [...last]);
  const one = frame({ kind: { case: "message", value: messages[0] } });
  // Other frames, and a message frame, are not batches.
  assert.equal(reader.readBatch(one), undefined);
  assert.equal(reader.readBatch(frame({ kind: { case: "pong", value: { nonce: 1n } } })), undefined);
});

test("a batch that does not decode is an error, not some of its messages", () => {
  const reader = new MessageReader();
  // A message whose length runs past the batch.
  assert.throws(() => reader.readBatch(Uint8Array.from([0x82, 0x01, 3, 0x12, 5, 0x0a])), WireError);
  // A bad message inside an otherwise whole batch.
  assert.throws(() => reader.readBatch(Uint8Array.from([0x82, 0x01, 4, 0x12, 2, 0x0f, 0])), WireError);
  // Cut short: not taken for a batch (the generated decoder then refuses it).
  const whole = frame({ kind: { case: "batch", value: { messages: [{ topic: "t", fromAlias: "a" }] } } });
  assert.equal(reader.readBatch(whole.subarray(0, whole.length - 1)), undefined);
});
