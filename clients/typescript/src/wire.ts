// The frames a receiving client sees most, `ServerToClient { message: Message }` and
// `ServerToClient { batch: MessageBatch }` (several messages in one WebSocket message), read
// without the generic protobuf decoder: fields straight out of the bytes, the topic's and
// sender's strings reused while they repeat (as they do on a busy subscription). Any other
// frame goes to the generated code. The result is the same as the generated decoder's (a test
// compares the two on encoded messages).

/** `ServerToClient.message` (field 2, length-delimited). */
const MESSAGE_TAG = 0x12;
/** `ServerToClient.batch` (field 16, length-delimited): the key's two bytes. */
const BATCH_KEY = [0x82, 0x01] as const;

/** A decoded `Message` (the fields a client uses). */
export interface WireMessage {
  topic: string;
  fromAlias: string;
  payload: Uint8Array;
  fromRole: string;
  seq: bigint;
  resentFrom: string;
  fromNode: string;
  signal: number;
  inboxId: bigint;
  stream: bigint;
  offset: bigint;
  publishedMs: bigint;
}

/** Why a frame could not be read. */
export class WireError extends Error {}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** The last string decoded at one place, kept with its bytes. */
class StringCache {
  #bytes = new Uint8Array(0);
  #text = "";

  get(buf: Uint8Array, start: number, end: number): string {
    const len = end - start;
    if (len === 0) return "";
    const cached = this.#bytes;
    if (cached.length === len) {
      let same = true;
      for (let i = 0; i < len; i++) {
        if (cached[i] !== buf[start + i]) {
          same = false;
          break;
        }
      }
      if (same) return this.#text;
    }
    const text = utf8.decode(buf.subarray(start, end));
    this.#bytes = buf.slice(start, end);
    this.#text = text;
    return text;
  }
}

/** A reader of one client's frames, with its own string caches. */
export class MessageReader {
  readonly #topic = new StringCache();
  readonly #alias = new StringCache();
  readonly #role = new StringCache();
  readonly #other = new StringCache();

  /** The message in `buf`, `undefined` when `buf` is another kind of frame; throws
   * {@link WireError} when it is a message frame that does not decode. */
  read(buf: Uint8Array): WireMessage | undefined {
    if (buf.length === 0 || buf[0] !== MESSAGE_TAG) return undefined;
    const at = { i: 1 };
    const len = varintNumber(buf, at);
    const end = at.i + len;
    if (end !== buf.length) {
      // A message frame carries nothing else; anything else is for the generic decoder.
      return undefined;
    }
    return this.#message(buf, at, end);
  }

  /** The messages of the batch in `buf`, in order; `undefined` when `buf` is another kind of
   * frame (or a batch with more than messages in it, left to the generic decoder); throws
   * {@link WireError} when it is a batch that does not decode, before handing any on. */
  readBatch(buf: Uint8Array): WireMessage[] | undefined {
    if (buf.length < 3 || buf[0] !== BATCH_KEY[0] || buf[1] !== BATCH_KEY[1]) return undefined;
    const at = { i: 2 };
    const len = varintNumber(buf, at);
    const end = at.i + len;
    if (end !== buf.length) return undefined;
    const messages: WireMessage[] = [];
    while (at.i < end) {
      if (buf[at.i] !== MESSAGE_TAG) return undefined;
      at.i++;
      const n = varintNumber(buf, at);
      const stop = at.i + n;
      if (stop > end) throw new WireError("a message runs past the batch");
      messages.push(this.#message(buf, at, stop));
      at.i = stop;
    }
    return messages;
  }

  /** The `Message` in `buf` from `at.i` to `end`. */
  #message(buf: Uint8Array, at: { i: number }, end: number): WireMessage {
    const m: WireMessage = {
      topic: "",
      fromAlias: "",
      payload: EMPTY,
      fromRole: "",
      seq: 0n,
      resentFrom: "",
      fromNode: "",
      signal: 0,
      inboxId: 0n,
      stream: 0n,
      offset: 0n,
      publishedMs: 0n,
    };
    while (at.i < end) {
      const key = varintNumber(buf, at);
      const field = key >>> 3;
      const wire = key & 7;
      if (wire === 2) {
        const n = varintNumber(buf, at);
        const start = at.i;
        const stop = start + n;
        if (stop > end) throw new WireError("a field runs past the message");
        at.i = stop;
        switch (field) {
          case 1:
            m.topic = this.#topic.get(buf, start, stop);
            break;
          case 2:
            m.fromAlias = this.#alias.get(buf, start, stop);
            break;
          case 3:
            m.payload = buf.subarray(start, stop);
            break;
          case 4:
            m.fromRole = this.#role.get(buf, start, stop);
            break;
          case 6:
            m.resentFrom = this.#other.get(buf, start, stop);
            break;
          case 7:
            m.fromNode = this.#other.get(buf, start, stop);
            break;
          default:
            break; // a field this client does not know
        }
      } else if (wire === 0) {
        const v = varintBig(buf, at);
        switch (field) {
          case 5:
            m.seq = v;
            break;
          case 8:
            m.signal = Number(BigInt.asIntN(32, v));
            break;
          case 9:
            m.inboxId = v;
            break;
          case 10:
            m.stream = v;
            break;
          case 11:
            m.offset = v;
            break;
          case 12:
            m.publishedMs = v;
            break;
          default:
            break;
        }
      } else if (wire === 1) {
        at.i += 8;
      } else if (wire === 5) {
        at.i += 4;
      } else {
        throw new WireError(`wire type ${wire} in a message`);
      }
      if (at.i > end) throw new WireError("a field runs past the message");
    }
    return m;
  }
}

const EMPTY = new Uint8Array(0);

/** A varint that fits a JavaScript number exactly (lengths, keys: below 2^53). */
function varintNumber(buf: Uint8Array, at: { i: number }): number {
  let value = 0;
  let scale = 1;
  for (let n = 0; n < 8; n++) {
    if (at.i >= buf.length) throw new WireError("a varint runs past the frame");
    const b = buf[at.i++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return value;
    scale *= 128;
  }
  throw new WireError("a length or key too large");
}

/** A 64-bit varint. */
function varintBig(buf: Uint8Array, at: { i: number }): bigint {
  // Up to 7 bytes (49 bits) as a number, the rest as a bigint.
  let value = 0;
  let scale = 1;
  for (let n = 0; n < 7; n++) {
    if (at.i >= buf.length) throw new WireError("a varint runs past the frame");
    const b = buf[at.i++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return BigInt(value);
    scale *= 128;
  }
  let big = BigInt(value);
  let shift = 49n;
  for (let n = 7; n < 10; n++) {
    if (at.i >= buf.length) throw new WireError("a varint runs past the frame");
    const b = buf[at.i++];
    big |= BigInt(b & 0x7f) << shift;
    if (b < 0x80) return BigInt.asUintN(64, big);
    shift += 7n;
  }
  throw new WireError("a varint longer than 10 bytes");
}
