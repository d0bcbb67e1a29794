// Where this client stands in the history of each topic that keeps one: the last offset it
// has of each stream (one comm server process's messages on the topic), what it holds while a
// recovery is being read, and what `history` requests are waiting for.

/** One topic's positions. */
export interface TopicPositions {
  /** Stream id → the last offset delivered. */
  streams: Map<bigint, bigint>;
  /** When the first subscription to the topic took effect (the server's clock): a recovery
   * asks for streams it has not heard from since then. */
  sinceMs: bigint;
}

/** A message with its place in a topic's history (all zero: none). */
export interface Positioned {
  topic: string;
  stream: bigint;
  offset: bigint;
}

export class Positions {
  readonly #topics = new Map<string, TopicPositions>();

  /** `topic` keeps history (an `Ack.history` named it), subscribed at `atMs`. */
  subscribed(topic: string, atMs: bigint): void {
    if (!this.#topics.has(topic)) this.#topics.set(topic, { streams: new Map(), sinceMs: atMs });
  }

  forget(topic: string): void {
    this.#topics.delete(topic);
  }

  /** Whether the message is new at its position (and records it); one without a position is. */
  arrive(m: Positioned): boolean {
    if (m.stream === 0n) return true;
    const t = this.#topics.get(m.topic);
    if (!t) return true;
    const last = t.streams.get(m.stream);
    if (last !== undefined && m.offset <= last) return false;
    t.streams.set(m.stream, m.offset);
    return true;
  }

  /** Streams no server holds any more: they will not be heard from again. */
  unknown(topic: string, streams: bigint[]): void {
    const t = this.#topics.get(topic);
    for (const s of streams) t?.streams.delete(s);
  }

  /** What to recover, for the topics among `topics` that keep history. */
  recover(topics: string[]): Array<{ topic: string; since: Array<{ stream: bigint; offset: bigint }>; sinceMs: bigint }> {
    const out = [];
    for (const topic of topics) {
      const t = this.#topics.get(topic);
      if (!t) continue;
      out.push({
        topic,
        since: [...t.streams].map(([stream, offset]) => ({ stream, offset })),
        sinceMs: t.sinceMs,
      });
    }
    return out;
  }
}
