// The client: logs in through a coordinator, keeps one WebSocket to the comm server it was
// given, and keeps it: when the server is lost it logs in again (another server, with backoff
// and jitter), resubscribes, and sends again what the lost server had not confirmed.

import { type MessageInitShape, create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  ClientToServerSchema,
  ErrorCode,
  type NodeInfo as ProtoNodeInfo,
  PresenceChange,
  PresenceEventSchema,
  type ServerToClient,
  ServerToClientSchema,
  SignalKind,
} from "./gen/relaymesh/v1/mesh_pb.js";
import { RelaymeshError } from "./errors.js";
import { MessageReader, type WireMessage } from "./wire.js";
import { Positions } from "./history.js";
import { type Credentials, type Placement, httpBase, login } from "./login.js";

/** The protocol version this client speaks (`Attach.protocol_version`). */
export const PROTOCOL_VERSION = 1;

/** A WebSocket constructor: the browser's, Node.js's (22, or 20 with
 * `--experimental-websocket`), or any with the same interface. */
export type WebSocketConstructor = new (url: string) => WebSocket;

export interface ClientOptions {
  /** The coordinator: `http://host:port` (or `ws://`, `https://`, `wss://`, `host:port`). */
  coordinator: string;
  /** Who the client is; anonymous when left out. */
  credentials?: Credentials;
  /** The client's own unique id within its account (a later login with it replaces this one). */
  clientId?: string;
  /** A comm server to be placed on when it is eligible. */
  preferredServer?: string;
  /** Log in again and resubscribe when the server is lost (default true). */
  autoReconnect?: boolean;
  /** Publishes not yet confirmed by a server (sent or waiting to be sent) the client keeps;
   * `publish` beyond it throws `QUEUE_FULL` (default 1024). */
  outboundQueue?: number;
  /** Backoff between reconnect attempts: a random wait up to `initialMs` doubled at each
   * failed attempt, at most `maxMs` (defaults 100 and 5000 ms); `giveUpAfterMs` (default 0:
   * never) ends the client when no server was reached for that long. */
  reconnect?: { initialMs?: number; maxMs?: number; giveUpAfterMs?: number };
  /** Longest wait for a comm server's `Ready` (default 10 000 ms). */
  connectTimeoutMs?: number;
  /** Longest wait for a subscription's cluster-wide `Ack` (default 10 000 ms). */
  subscribeTimeoutMs?: number;
  /** Publishers whose latest number the client remembers to drop copies (default 10 000). */
  maxPublishers?: number;
  WebSocket?: WebSocketConstructor;
  fetch?: typeof fetch;
}

/** A delivered message. */
export interface Message {
  topic: string;
  /** The publisher's alias, stamped by its server (the alias of its connection). */
  fromAlias: string;
  /** The publisher's role ("" for none), stamped by its server. */
  fromRole: string;
  /** The publisher's node ("" when it is not one). */
  fromNode: string;
  payload: Uint8Array;
  /** The publisher's number for it (0 for none). */
  seq: bigint;
  /** On a topic that keeps history: its stream, offset and acceptance time (stream 0n: none). */
  position: { stream: bigint; offset: bigint; publishedMs: bigint };
  /** The payload as UTF-8 text. */
  text(): string;
}

/** What the client reports, by event name. */
export interface ClientEvents {
  message: Message;
  /** Messages meant for this client were dropped: `upstream` of them between servers, the
   * rest in its own queue on its server (it read too slowly). */
  dropped: { count: number; upstream: number };
  /** A publish was refused: the role may not publish to that topic. The connection stays up. */
  forbidden: { message: string };
  /** The connection to `serverId` ended. With auto-reconnect a `reconnected` follows, unless
   * a `closed` does. */
  disconnected: { serverId: string; reason: string };
  /** Connected again, to `serverId`, every subscription restored on it (but those a
   * `subscriptionsRefused` named). */
  reconnected: { serverId: string; alias: string };
  /** Moved off `fromServer`, which is being drained, to `serverId`, make-before-break: the new
   * connection was subscribed before the old one was read to its end, so nothing was missed
   * and nothing comes twice. (A move that cannot finish cleanly is a `disconnected` and a
   * `reconnected` instead.) */
  moved: { fromServer: string; serverId: string; alias: string; reason: string };
  /** The client stopped for good: closed by the application, replaced by a newer login of
   * its client id, kicked, refused at login, or out of reconnect time. */
  closed: { reason: string; code?: string };
  /** A direct message to this client's node (`send`), or one kept for it in its inbox while it
   * was offline (`inboxId` set; the client acknowledges it once the listeners have run). */
  direct: DirectMessage;
  /** A signal to this client's node (`signal`). */
  signal: { fromNode: string; fromAlias: string; kind: SignalName; payload: Uint8Array; seq: bigint };
  /** A node of this client's scope came online, went offline, or changed (after
   * `subscribe("@presence")`). */
  presence: { change: "online" | "offline" | "updated"; node: NodeInfo };
  /** A reconnect's recovery of `topic` is done: `count` messages missed while away were
   * delivered (as `message` events, before any live one that came meanwhile). */
  recovered: { topic: string; count: number };
  /** The topic's history no longer reached back far enough: at least `missedAtLeast`
   * messages (0: unknown how many) are gone. Comes before that topic's `recovered`. */
  recoveryGap: { topic: string; missedAtLeast: number };
  /** While reconnecting, the new server refused to restore these subscriptions (its limits
   * are lower than the old server's): they are dropped, and the client goes on without them. */
  subscriptionsRefused: { topics: string[]; reason: string };
  /** A direct message (by its number) to a node that is offline was written to the node's
   * inbox (where the coordinator keeps inboxes): it is delivered when the node logs in. */
  accepted: { seq: bigint; toNode: string; inboxId: bigint };
  /** A direct message this client's node sent waited in its recipient's inbox past the age
   * limit and was deleted unread (`seq` numbered by `publisher`, the alias that sent it). */
  expired: { toNode: string; inboxId: bigint; seq: bigint; publisher: string; storedMs: bigint };
  /** A direct message or signal (by its number) reached no one: `UNKNOWN_NODE`,
   * `NOT_CONNECTED`, `RATE_LIMITED`, `INBOX_FULL`, ... */
  undeliverable: { seq: bigint; toNode: string; reason: string; message: string };
}

/** A direct message. */
export interface DirectMessage {
  /** The sender's node ("" when the sender is not a node). */
  fromNode: string;
  fromAlias: string;
  fromRole: string;
  payload: Uint8Array;
  seq: bigint;
  /** Its id in this node's inbox, when it was kept there (0n: delivered live). */
  inboxId: bigint;
  text(): string;
}

/** What a `history` request read. */
export interface HistoryPage {
  messages: Message[];
  /** Some of what was asked for is gone (aged out, evicted, or held by a server that died). */
  gap: boolean;
  missedAtLeast: number;
}

/** A node as the directory knows it. */
export interface NodeInfo {
  nodeId: string;
  name: string;
  location: string;
  /** A JSON object, as the node registered it ("" for none). */
  info: string;
  sinceMs: number;
  /** The comm servers its sessions are on. */
  servers: string[];
}

/** What a signal carries (`SignalKind` without its prefix). */
export type SignalName = "INIT" | "OFFER" | "ANSWER" | "ICE_CANDIDATE" | "CUSTOM";

type Listener<T> = (event: T) => void;

interface Outgoing {
  seq: bigint;
  /** A publish on `topic`, or a direct message to node `toNode`. */
  toNode?: string;
  topic: string;
  payload: Uint8Array;
  /** The alias it was first sent under ("" until sent). */
  firstAlias: string;
}

interface PendingSubscribe {
  topics: string[];
  resolve: () => void;
  reject: (e: RelaymeshError) => void;
  timer: ReturnType<typeof setTimeout>;
  /** A first Ack named servers that had not confirmed yet: the second one settles it. */
  acked?: boolean;
}

/** Close codes after which the client does not reconnect: 1008 (not allowed), 4015
 * (`REPLACED`: a newer login of the same client id), 4027 (`KICKED` by an operator). */
const FINAL_CLOSE_CODES = new Set([1008, 4000 + ErrorCode.REPLACED, 4000 + ErrorCode.KICKED]);

/** Login refusals that another attempt would meet again. */
const FINAL_LOGIN_ERRORS = new Set([
  "UNKNOWN_ACCOUNT",
  "BAD_CREDENTIALS",
  "ACCOUNT_DISABLED",
  "ROLE_NOT_PERMITTED",
  "BAD_FRAME",
]);

/** One connection to a comm server. */
interface Link {
  ws: WebSocket;
  serverId: string;
  alias: string;
  /** The node this session is ("" for none). */
  nodeId: string;
  /** Ping every `interval` ms; give up after `timeout` ms without a frame (from `Ready`). */
  interval: number;
  timeout: number;
  heartbeat: ReturnType<typeof setInterval> | undefined;
  lastHeard: number;
  /** Subscriptions are being restored and unconfirmed publishes not yet sent again: new
   * publishes wait, to keep their order behind those. */
  restoring: boolean;
  /** The request restoring the subscriptions, while it is waited for. */
  restoreRequest?: bigint;
  /** The error the server sent before closing, if any. */
  lastError?: RelaymeshError;
  /** The largest WebSocket message the server takes (`Ready.max_frame_bytes`; 0: it takes no
   * publish batches). */
  maxFrameBytes: number;
  /** The most publishes the server takes in one `PublishBatch` (`Ready.max_batch_publishes`). */
  maxBatchPublishes: number;
  /** Publishes made in this turn of the event loop, sent as one `PublishBatch` at its end (or
   * before anything else the client sends, to keep the order). */
  batch?: { publishes: PublishInit[]; bytes: number };
  /** On a link being moved to: messages that arrived before the move was over, delivered
   * after everything the server moved from still had (copies dropped then). */
  held?: Array<WireMessage | ProtoMessage>;
  /** On a link being moved to: the subscriptions restored on it. */
  restored?: string[];
  /** An inbox message came on this link while no `direct` listener was attached: nothing
   * more is acknowledged on it (acknowledgements cover every earlier id), so it comes again
   * at the next login. */
  inboxUnheard?: boolean;
  /** On a link being moved from, once `Leave` is sent: where to, why, and the timer that
   * gives up waiting for `Left`. */
  leaving?: { to: Link; reason: string; timer: ReturnType<typeof setTimeout> };
  /** The server asked the client to move while its subscriptions were still being restored:
   * the move starts once they are. */
  drainReason?: string;
}

/** Messages held on the link being moved to before the move gives up on it. */
const HOLD_LIMIT = 10_000;

type PublishInit = { topic: string; payload: Uint8Array; seq: bigint; resentFrom: string };

/** The most a publish batch holds (and never more than the server's `max_frame_bytes` less
 * room for the envelope): a burst goes out in pieces of about this size. */
const BATCH_BYTES = 64 * 1024;
/** The most publishes in one batch (and never more than the server's `max_batch_publishes`). */
const MAX_BATCH_PUBLISHES = 256;

export class Client {
  readonly #options: Required<
    Pick<
      ClientOptions,
      "autoReconnect" | "outboundQueue" | "connectTimeoutMs" | "subscribeTimeoutMs" | "maxPublishers"
    >
  > &
    ClientOptions;
  readonly #ws: WebSocketConstructor;
  readonly #fetch: typeof fetch;
  readonly #listeners = new Map<keyof ClientEvents, Set<Listener<never>>>();
  #link: Link | undefined;
  /** The link being moved to, while a move off a drained server is under way. */
  #moving: Link | undefined;
  /** Topics subscribed to (confirmed, or sent and restored at every reconnect). */
  readonly #subscriptions = new Set<string>();
  readonly #pendingSubscribes = new Map<bigint, PendingSubscribe>();
  readonly #pendingUnsubscribes = new Map<bigint, () => void>();
  readonly #pendingLists = new Map<bigint, Waiting<{ nodes: NodeInfo[]; total: number }>>();
  #nextRequest = 1n;
  #nextSeq = 1n;
  /** Publishes not yet confirmed, in order. */
  readonly #outbox: Outgoing[] = [];
  /** The latest number delivered per publisher: as originals (by `fromAlias`) and as resends
   * (by `resentFrom`), to drop copies. */
  readonly #originals = new Map<string, bigint>();
  readonly #resends = new Map<string, bigint>();
  /** Positions in the topics that keep history. */
  readonly #positions = new Positions();
  /** Topics being recovered: live messages held until the recovery is done, and how many
   * the recovery delivered. */
  readonly #recovering = new Map<string, { held: Array<WireMessage | ProtoMessage>; count: number }>();
  /** `history` requests, with the messages their batches brought so far. */
  readonly #pendingHistory = new Map<bigint, Waiting<HistoryPage> & { messages: Message[] }>();
  /** Reads message frames without the generic decoder. */
  readonly #reader = new MessageReader();
  #closed = false;
  #reconnecting = false;

  private constructor(options: ClientOptions) {
    this.#options = {
      autoReconnect: true,
      outboundQueue: 1024,
      connectTimeoutMs: 10_000,
      subscribeTimeoutMs: 10_000,
      maxPublishers: 10_000,
      ...options,
    };
    const ws = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!ws) {
      throw new RelaymeshError(
        "CONNECT_FAILED",
        "no WebSocket here: pass options.WebSocket (Node.js 20 needs --experimental-websocket)",
      );
    }
    this.#ws = ws;
    this.#fetch = options.fetch ?? fetch;
  }

  /** Logs in through the coordinator and connects to the comm server it offers. Fails with
   * the coordinator's or the server's refusal (`BAD_CREDENTIALS`, `KEY_INVALID`, ...). */
  static async connect(options: ClientOptions): Promise<Client> {
    const client = new Client(options);
    await client.#connect(options.preferredServer, []);
    return client;
  }

  /** The comm server this client is connected to ("" while reconnecting). */
  get serverId(): string {
    return this.#link?.serverId ?? "";
  }

  /** This connection's alias ("" while reconnecting). */
  get alias(): string {
    return this.#link?.alias ?? "";
  }

  /** Publishes waiting to be confirmed. */
  get unconfirmed(): number {
    return this.#outbox.length;
  }

  /** The node this client is ("" when it is none, or while reconnecting): direct messages and
   * signals to this id reach it. */
  get nodeId(): string {
    return this.#link?.nodeId ?? "";
  }

  /** Sends `payload` to node `toNode` of this account, wherever in the cluster it is
   * connected, and returns its number. Numbered and queued like a publish: `undeliverable`
   * says when it reached no one (or, where the coordinator keeps inboxes, it waits in the
   * node's inbox). Throws `QUEUE_FULL` or `CLOSED` as `publish` does. */
  send(toNode: string, payload: Uint8Array | string): bigint {
    return this.#queue({ toNode, topic: "", payload });
  }

  /** Sends a signal (WebRTC-style set-up: `OFFER`, `ANSWER`, `ICE_CANDIDATE`, ...) to node
   * `toNode`. Never queued: throws `NOT_CONNECTED` while the client has no server, and an
   * offline node gets `undeliverable` back. Returns its number. */
  signal(toNode: string, kind: SignalName, payload: Uint8Array | string): bigint {
    if (this.#closed) throw closedError();
    const link = this.#link;
    if (!link || link.restoring) {
      throw new RelaymeshError("NOT_CONNECTED", "a signal is never queued: the client is reconnecting");
    }
    const seq = this.#nextSeq++;
    this.#send(link, {
      case: "signal",
      value: { toNode, kind: SignalKind[kind], payload: bytesOf(payload), seq },
    });
    return seq;
  }

  /** Online nodes of this client's scope whose name or location contains `filter` (all when
   * empty): at most `limit` (0: the server's cap) chosen at random, and how many match. */
  listNodes(options: { filter?: string; limit?: number } = {}): Promise<{ nodes: NodeInfo[]; total: number }> {
    if (this.#closed) return Promise.reject(closedError());
    const link = this.#link;
    if (!link) return Promise.reject(new RelaymeshError("NOT_CONNECTED", "the client is reconnecting"));
    const requestId = this.#nextRequest++;
    const answer = this.#request(this.#pendingLists, requestId, {}, "no NodeList");
    this.#send(link, {
      case: "listNodes",
      value: { requestId, limit: options.limit ?? 0, filter: options.filter ?? "" },
    });
    return answer;
  }

  /** Reads a topic's history (a topic the comm servers keep history for; it need not be
   * subscribed): the newest `last` messages, or what followed the positions of the messages
   * in `after`, oldest first. `gap` says that some asked for are gone. Refused with
   * `FORBIDDEN` outside the role's subscribe rules, `NOT_FOUND` on a topic without history,
   * `RATE_LIMITED`. */
  history(topic: string, query: { last: number } | { after: Message[]; sinceMs?: number }): Promise<HistoryPage> {
    if (this.#closed) return Promise.reject(closedError());
    const link = this.#link;
    if (!link) return Promise.reject(new RelaymeshError("NOT_CONNECTED", "the client is reconnecting"));
    const requestId = this.#nextRequest++;
    const since: Array<{ stream: bigint; offset: bigint }> = [];
    if ("after" in query) {
      const last = new Map<bigint, bigint>();
      for (const { position: p } of query.after) {
        if (p.stream !== 0n && (last.get(p.stream) ?? 0n) < p.offset) last.set(p.stream, p.offset);
      }
      for (const [stream, offset] of last) since.push({ stream, offset });
    }
    const page = this.#request(this.#pendingHistory, requestId, { messages: [] as Message[] }, `no history of ${topic}`);
    this.#send(link, {
      case: "history",
      value: {
        requestId,
        topic,
        last: "last" in query ? query.last : 0,
        since,
        sinceMs: "after" in query ? BigInt(query.sinceMs ?? 0) : 0n,
      },
    });
    return page;
  }

  /** Waits for the answer to request `requestId`, kept in `pending` with `extra` until it
   * comes (see {@link take}) or `subscribeTimeoutMs` passes (`TIMEOUT: what`). */
  #request<T, E extends object>(
    pending: Map<bigint, Waiting<T> & E>,
    requestId: bigint,
    extra: E,
    what: string,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        pending.delete(requestId);
        reject(new RelaymeshError("TIMEOUT", what));
      }, this.#options.subscribeTimeoutMs);
      pending.set(requestId, { ...extra, resolve, reject, timer });
    });
  }

  /** Calls `listener` for each `event`; returns a function that stops it. */
  on<K extends keyof ClientEvents>(event: K, listener: Listener<ClientEvents[K]>): () => void {
    let set = this.#listeners.get(event);
    if (!set) {
      set = new Set();
      this.#listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  /** Subscribes to `topics` (exact names: wildcards belong to role rules). Resolves once
   * every server of the cluster has the subscription: a message published anywhere from then
   * on reaches this client. Rejects with the server's refusal (`FORBIDDEN`,
   * `INVALID_TOPIC`, `LIMIT_EXCEEDED`), `NOT_CONFIRMED` when some server never confirmed (the
   * subscription stands), or `TIMEOUT`. While reconnecting it waits for the next server. */
  subscribe(topics: string | string[]): Promise<void> {
    const list = typeof topics === "string" ? [topics] : [...topics];
    if (this.#closed) return Promise.reject(closedError());
    if (list.length === 0) return Promise.resolve();
    const requestId = this.#nextRequest++;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pendingSubscribes.delete(requestId);
        reject(new RelaymeshError("TIMEOUT", `no Ack for the subscription to ${list.join(", ")}`));
      }, this.#options.subscribeTimeoutMs);
      this.#pendingSubscribes.set(requestId, { topics: list, resolve, reject, timer });
      // While reconnecting (or restoring) it goes out once the standing ones are back.
      if (this.#link && !this.#link.restoring) {
        this.#send(this.#link, {
          case: "subscribe",
          value: { requestId, topics: list, recover: [] },
        });
      }
    });
  }

  /** Ends the subscriptions to `topics`; resolves when this server no longer delivers them. */
  unsubscribe(topics: string | string[]): Promise<void> {
    const list = typeof topics === "string" ? [topics] : [...topics];
    for (const t of list) {
      this.#subscriptions.delete(t);
      this.#positions.forget(t);
    }
    // A subscribe not yet answered (or not yet sent) no longer brings these back: its Ack
    // adds only what it still names, and one left empty is not sent.
    for (const p of this.#pendingSubscribes.values()) p.topics = p.topics.filter((t) => !list.includes(t));
    if (!this.#link || list.length === 0) return Promise.resolve();
    const requestId = this.#nextRequest++;
    return new Promise<void>((resolve) => {
      this.#pendingUnsubscribes.set(requestId, resolve);
      if (this.#link) {
        this.#send(this.#link, { case: "unsubscribe", value: { requestId, topics: list } });
      }
    });
  }

  /** Publishes `payload` (bytes, or text as UTF-8) on `topic` and returns its number. It is
   * sent now, or when the client is connected again; a publish the server did not confirm
   * before it was lost is sent again through the next one, and receivers drop the copy.
   * Throws `QUEUE_FULL` when `outboundQueue` publishes wait for confirmation, `CLOSED` after
   * `close`. */
  publish(topic: string, payload: Uint8Array | string): bigint {
    return this.#queue({ topic, payload });
  }

  #queue(what: { topic: string; toNode?: string; payload: Uint8Array | string }): bigint {
    if (this.#closed) throw closedError();
    if (this.#outbox.length >= this.#options.outboundQueue) {
      throw new RelaymeshError(
        "QUEUE_FULL",
        `${this.#outbox.length} publishes wait for their server's confirmation (outboundQueue)`,
      );
    }
    const out: Outgoing = {
      seq: this.#nextSeq++,
      topic: what.topic,
      toNode: what.toNode,
      payload: bytesOf(what.payload),
      firstAlias: "",
    };
    this.#outbox.push(out);
    if (this.#link && !this.#link.restoring) this.#sendPublish(this.#link, out);
    return out.seq;
  }

  /** Closes the connection; the client does not reconnect. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#abandonMove();
    const link = this.#link;
    this.#link = undefined;
    if (link) {
      stopHeartbeat(link);
      link.ws.close(1000);
    }
    this.#failPending(closedError());
    this.#emit("closed", { reason: "closed by the application" });
  }

  // ---- connecting -----------------------------------------------------------------------

  async #connect(preferred: string | undefined, exclude: string[]): Promise<void> {
    const placement = await login(
      this.#options.coordinator,
      {
        credentials: this.#options.credentials,
        clientId: this.#options.clientId,
        preferredServer: preferred,
        exclude,
      },
      this.#fetch,
    );
    const link = await this.#open(placement);
    if (this.#closed) {
      link.ws.close(1000);
      throw closedError();
    }
    this.#link = link;
    // What came right behind `Ready` (a node's direct messages) was held until now.
    const held = link.held ?? [];
    link.held = undefined;
    this.#onBatch(link, held);
    this.#startHeartbeat(link);
    // The standing subscriptions in one request; a refusal (this server's limits are lower)
    // drops them and says so, and the client goes on without them.
    const standing = [...this.#subscriptions];
    if (standing.length > 0) {
      // What was missed on the topics that keep history comes after the Ack; live messages
      // of those topics wait until it has.
      const recover = this.#positions.recover(standing);
      for (const r of recover) this.#recovering.set(r.topic, { held: [], count: 0 });
      const requestId = this.#nextRequest;
      try {
        await this.#restore(link, standing, recover);
      } catch (e) {
        const error = e as RelaymeshError;
        this.#pendingSubscribes.delete(requestId);
        if (this.#closed) throw error;
        if (error.code === "TIMEOUT" || error.code === "CONNECT_FAILED") {
          // This server was lost too, or does not answer: the next one restores them.
          if (this.#link === link) {
            this.#link = undefined;
            stopHeartbeat(link);
            link.ws.close(1000);
          }
          throw error;
        }
        if (error.code !== "NOT_CONFIRMED") {
          for (const t of standing) {
            this.#subscriptions.delete(t);
            this.#positions.forget(t);
            this.#recovering.delete(t);
          }
          this.#emit("subscriptionsRefused", { topics: standing, reason: error.message });
        }
        // NOT_CONFIRMED: in force here, the pending servers get it when their links resume.
      } finally {
        link.restoreRequest = undefined;
      }
    }
    this.#restored(link);
  }

  /** Subscribes `link` to the standing `topics` in one request and waits for its Ack. */
  #restore(link: Link, topics: string[], recover: ReturnType<Positions["recover"]>): Promise<void> {
    const requestId = this.#nextRequest++;
    const restored = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new RelaymeshError("TIMEOUT", "no Ack for the restored subscriptions")),
        this.#options.subscribeTimeoutMs,
      );
      this.#pendingSubscribes.set(requestId, {
        topics,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
        timer,
      });
    });
    link.restoreRequest = requestId;
    this.#send(link, { case: "subscribe", value: { requestId, topics, recover } });
    return restored.finally(() => {
      link.restoreRequest = undefined;
      this.#pendingSubscribes.delete(requestId);
    });
  }

  /** `link`'s standing subscriptions are back: what waited for it goes out. */
  #restored(link: Link): void {
    // Subscriptions the application is still waiting for, each as its own request: one that
    // is refused fails only its own `subscribe`. One whose topics were all unsubscribed since
    // is done.
    for (const [requestId, p] of this.#pendingSubscribes) {
      if (p.topics.length === 0) {
        this.#pendingSubscribes.delete(requestId);
        clearTimeout(p.timer);
        p.resolve();
        continue;
      }
      this.#send(link, { case: "subscribe", value: { requestId, topics: p.topics, recover: [] } });
    }
    // What no server confirmed, in order (what waited last), then new publishes go out.
    link.restoring = false;
    for (const out of this.#outbox) this.#sendPublish(link, out);
    const drained = link.drainReason;
    link.drainReason = undefined;
    if (drained !== undefined && this.#link === link) void this.#move(link, drained);
  }

  // ---- moving off a drained server ------------------------------------------------------

  /** The server behind `old` is being drained: move make-before-break. Nothing new goes to
   * it; another server is found through the coordinator and subscribed while `old` is still
   * read; then `old` is sent `Leave` and read up to its `Left`, so everything queued for the
   * client there arrives; then the new link takes over. A move that cannot be made ends `old`
   * as a lost server would. */
  async #move(old: Link, reason: string): Promise<void> {
    old.restoring = true; // publishes and subscriptions wait for the next server
    this.#flushPublishes(old);
    let next: Link | undefined;
    try {
      const placement = await login(
        this.#options.coordinator,
        {
          credentials: this.#options.credentials,
          clientId: this.#options.clientId,
          exclude: [old.serverId],
          moving: true,
        },
        this.#fetch,
      );
      if (this.#closed || this.#link !== old) return; // lost meanwhile: reconnecting already
      next = await this.#open(placement);
      if (this.#closed || this.#link !== old) {
        next.ws.close(1000);
        return;
      }
      this.#moving = next;
      this.#startHeartbeat(next);
      next.restored = [...this.#subscriptions];
      if (next.restored.length > 0) {
        try {
          await this.#restore(next, [...next.restored], []);
        } catch (e) {
          // In force here; the servers that did not confirm get it when their links resume.
          if ((e as RelaymeshError).code !== "NOT_CONFIRMED") throw e;
        }
      }
    } catch (e) {
      if (next && this.#moving === next) this.#abandonMove();
      if (this.#link === old && !this.#closed) {
        // As a lost server: reconnect elsewhere.
        old.lastError = new RelaymeshError(
          "SHUTTING_DOWN",
          `${reason}; moving failed: ${(e as Error).message}`,
        );
        old.ws.close(1000);
      }
      return;
    }
    // Given up meanwhile (the old link was lost, the client closed): nothing more to do.
    if (this.#link !== old || this.#moving !== next) return;
    // The old server confirms what it took, then sends `Left` behind everything it queued.
    const timer = setTimeout(() => {
      if (!this.#moved(old, false)) old.ws.close(1000);
    }, this.#options.subscribeTimeoutMs);
    old.leaving = { to: next, reason, timer };
    this.#write(old, { case: "leave", value: {} });
  }

  /** Gives up the move under way, if any: the link being moved to is closed and forgotten
   * (its restore, if waited for, fails), and the link moved from stops waiting for `Left`. */
  #abandonMove(): void {
    const next = this.#moving;
    if (!next) return;
    this.#moving = undefined;
    stopHeartbeat(next);
    next.held = undefined;
    const restore =
      next.restoreRequest !== undefined ? this.#pendingSubscribes.get(next.restoreRequest) : undefined;
    restore?.reject(new RelaymeshError("CONNECT_FAILED", `the move to ${next.serverId} was given up`));
    next.ws.close(1000);
    const old = this.#link;
    if (old?.leaving) {
      clearTimeout(old.leaving.timer);
      old.leaving = undefined;
    }
  }

  /** Ends the move from `old` (sent `Leave`): `clean` when `old` was read to its end
   * (`Left`). False when the server moved to was lost meanwhile: `old` is then left as a lost
   * server. */
  #moved(old: Link, clean: boolean): boolean {
    const leaving = old.leaving;
    if (!leaving) return false;
    clearTimeout(leaving.timer);
    old.leaving = undefined;
    const next = leaving.to;
    if (this.#link !== old || this.#moving !== next) return false;
    const reason = leaving.reason;
    this.#moving = undefined;
    stopHeartbeat(old);
    this.#link = next;
    old.ws.close(1000);
    // Requests the old server did not answer: its unsubscribes are moot, reads are asked again.
    for (const resolve of this.#pendingUnsubscribes.values()) resolve();
    this.#pendingUnsubscribes.clear();
    const lost = new RelaymeshError("CONNECT_FAILED", `${old.serverId} was left`);
    rejectAll(this.#pendingLists, lost);
    rejectAll(this.#pendingHistory, lost);
    // A recovery the old server had not finished: what it held goes out now.
    this.#cutRecoveries();
    // What arrived here meanwhile, on topics still subscribed: copies of what the old server
    // delivered are dropped by their numbers and positions. (A listener may close the client.)
    const held = next.held ?? [];
    next.held = undefined;
    for (const m of held) {
      if (this.#link !== next) return true;
      if (m.topic.startsWith("@") || this.#subscriptions.has(m.topic)) this.#onMessage(m);
    }
    // Subscription changes made during the move, made here too: what is wanted and was not
    // restored here, and what was restored here and is no longer wanted. (Subscribes still
    // waiting for an answer go out again below.)
    const restored = new Set(next.restored ?? []);
    next.restored = undefined;
    const waiting = new Set([...this.#pendingSubscribes.values()].flatMap((p) => p.topics));
    const gone = [...restored].filter((t) => !this.#subscriptions.has(t) && !waiting.has(t));
    if (gone.length > 0) {
      this.#send(next, { case: "unsubscribe", value: { requestId: this.#nextRequest++, topics: gone } });
    }
    const added = [...this.#subscriptions].filter((t) => !restored.has(t) && !waiting.has(t));
    if (added.length > 0) {
      this.#restore(next, added, []).catch((e: RelaymeshError) => {
        if (e.code === "NOT_CONFIRMED" || e.code === "CONNECT_FAILED" || e.code === "CLOSED") return;
        for (const t of added) {
          this.#subscriptions.delete(t);
          this.#positions.forget(t);
        }
        this.#emit("subscriptionsRefused", { topics: added, reason: e.message });
      });
    }
    this.#restored(next);
    if (clean) {
      this.#emit("moved", { fromServer: old.serverId, serverId: next.serverId, alias: next.alias, reason });
    } else {
      // What the old server still held for the client may be missing, as after any loss.
      this.#emit("disconnected", {
        serverId: old.serverId,
        reason: `moving (${reason}): the server ended before sending everything queued here`,
      });
      this.#emit("reconnected", { serverId: next.serverId, alias: next.alias });
    }
    return true;
  }

  /** Ends the recoveries under way: what each held goes out now (positions drop what a later
   * recovery brings again). */
  #cutRecoveries(): void {
    for (const [topic, r] of this.#recovering) {
      this.#recovering.delete(topic);
      for (const m of r.held) if (this.#positions.arrive(m)) this.#deliver(m);
    }
  }

  /** Opens the WebSocket with the placement's key, attaches, and waits for `Ready`. */
  #open(placement: Placement): Promise<Link> {
    // `batch=1`: a burst of deliveries comes as one WebSocket message (`ServerToClient.batch`).
    const url = `${placement.url}?key=${encodeURIComponent(placement.key)}&batch=1`;
    return new Promise<Link>((resolve, reject) => {
      let ws: WebSocket;
      try {
        ws = new this.#ws(url);
      } catch (e) {
        reject(new RelaymeshError("CONNECT_FAILED", `${placement.url}: ${(e as Error).message}`));
        return;
      }
      ws.binaryType = "arraybuffer";
      let settled = false;
      const fail = (e: RelaymeshError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        try {
          ws.close();
        } catch {
          // already closing
        }
        reject(e);
      };
      const timer = setTimeout(
        () => fail(new RelaymeshError("TIMEOUT", `${placement.serverId} sent no Ready`)),
        this.#options.connectTimeoutMs,
      );
      ws.onopen = () => {
        ws.send(
          toBinary(
            ClientToServerSchema,
            create(ClientToServerSchema, {
              kind: { case: "attach", value: { protocolVersion: PROTOCOL_VERSION } },
            }),
          ),
        );
      };
      // A refusal before the upgrade (a spent or unknown key gets 401) is an error event in
      // a browser (then a close) and only an error event in Node.js 20's WebSocket; a close
      // before Ready is the server's word. Either way the first one settles it.
      ws.onerror = () => {
        if (!settled) void this.#refused(placement).then(fail);
      };
      ws.onclose = (ev: CloseEvent) => {
        if (!settled) void this.#refused(placement, ev).then(fail);
      };
      ws.onmessage = (ev: MessageEvent) => {
        if (settled) return;
        const frame = decode(ev.data);
        if (!frame) {
          fail(new RelaymeshError("BAD_FRAME", `${placement.serverId} sent a frame that is not a ServerToClient`));
          return;
        }
        if (frame.kind.case === "error") {
          fail(RelaymeshError.fromWire(frame.kind.value.code, frame.kind.value.message));
          return;
        }
        if (frame.kind.case !== "ready") {
          fail(new RelaymeshError("UNEXPECTED_MESSAGE", `${placement.serverId} sent ${frame.kind.case} before Ready`));
          return;
        }
        settled = true;
        clearTimeout(timer);
        const ready = frame.kind.value;
        const link: Link = {
          ws,
          serverId: ready.serverId || placement.serverId,
          alias: ready.alias || placement.alias,
          nodeId: ready.nodeId || (placement.nodeId ?? ""),
          interval: ready.heartbeatIntervalMs || 5000,
          timeout: ready.heartbeatTimeoutMs || 15000,
          heartbeat: undefined,
          lastHeard: Date.now(),
          restoring: true,
          maxFrameBytes: ready.maxFrameBytes,
          maxBatchPublishes: ready.maxBatchPublishes,
          held: [],
        };
        ws.onmessage = (e: MessageEvent) => this.#onFrame(link, e.data);
        ws.onclose = (e: CloseEvent) => this.#onClose(link, e);
        resolve(link);
      };
    });
  }

  /** Why `placement`'s server refused the connection or closed it before `Ready`: a close
   * code says; otherwise the server either answers HTTP (it refused the upgrade, whose status
   * a WebSocket cannot see) or cannot be reached. */
  async #refused(placement: Placement, ev?: CloseEvent): Promise<RelaymeshError> {
    if (ev && ev.code >= 4000 && ev.code < 5000 && ErrorCode[ev.code - 4000] !== undefined) {
      return new RelaymeshError(
        ErrorCode[ev.code - 4000] as keyof typeof ErrorCode,
        ev.reason || `${placement.serverId} closed the connection`,
      );
    }
    let answers = false;
    try {
      // `no-cors`: in a browser only a network failure rejects (the comm server sends no CORS
      // headers, and the answer is not read).
      await this.#fetch(httpBase(placement.url), { mode: "no-cors" });
      answers = true;
    } catch {
      // not reachable
    }
    if (answers) {
      return new RelaymeshError(
        "UPGRADE_REFUSED",
        `${placement.serverId} refused the WebSocket before it opened: the key was spent, expired ` +
          "or unknown (KEY_INVALID), or the server is full or draining, or this address has too " +
          "many connections; log in again for another key",
      );
    }
    return new RelaymeshError(
      "CONNECT_FAILED",
      `${placement.serverId} (${placement.url}) cannot be reached`,
    );
  }

  // ---- a connected link -----------------------------------------------------------------

  #onFrame(link: Link, data: unknown): void {
    // The current link, the one being moved to, or one just opened (holding its messages).
    if (this.#link !== link && this.#moving !== link && link.held === undefined) return;
    link.lastHeard = Date.now();
    if (!(data instanceof ArrayBuffer)) {
      this.#badFrame(link, "the server sent a text frame");
      return;
    }
    const bytes = new Uint8Array(data);
    let message: WireMessage | undefined;
    let batch: WireMessage[] | undefined;
    try {
      message = this.#reader.read(bytes);
      if (!message) batch = this.#reader.readBatch(bytes);
    } catch (e) {
      this.#badFrame(link, `the server sent a message that does not decode: ${(e as Error).message}`);
      return;
    }
    if (message) {
      this.#arrived(link, message);
      return;
    }
    if (batch) {
      this.#onBatch(link, batch);
      return;
    }
    const frame = decode(data);
    if (!frame) {
      this.#badFrame(link, "the server sent a frame that is not a ServerToClient");
      return;
    }
    const kind = frame.kind;
    switch (kind.case) {
      case "message":
        // A message frame with more than the message in it (the reader takes the rest).
        this.#arrived(link, kind.value);
        return;
      case "batch":
        // A batch with more than messages in it (the reader takes the rest).
        this.#onBatch(link, kind.value.messages);
        return;
      case "ack": {
        const ack = kind.value;
        const sub = this.#pendingSubscribes.get(ack.requestId);
        if (sub) {
          for (const t of sub.topics) this.#subscriptions.add(t);
          for (const t of ack.history) this.#positions.subscribed(t, ack.atMs);
          // A topic this server keeps no history for cannot be recovered here.
          for (const t of sub.topics) {
            if (this.#recovering.has(t) && !ack.history.includes(t)) this.#endRecovery(t, true, 0);
          }
          if (ack.pending.length === 0) {
            this.#pendingSubscribes.delete(ack.requestId);
            clearTimeout(sub.timer);
            sub.resolve();
          } else if (sub.acked) {
            // The second Ack: those servers never confirmed.
            this.#pendingSubscribes.delete(ack.requestId);
            clearTimeout(sub.timer);
            sub.reject(
              new RelaymeshError(
                "NOT_CONFIRMED",
                `servers ${ack.pending.join(", ")} did not confirm the subscription (it stands)`,
              ),
            );
          } else {
            sub.acked = true;
          }
          return;
        }
        const unsub = this.#pendingUnsubscribes.get(ack.requestId);
        if (unsub) {
          this.#pendingUnsubscribes.delete(ack.requestId);
          unsub();
        }
        return;
      }
      case "published": {
        const upTo = kind.value.upTo;
        while (this.#outbox.length > 0 && this.#outbox[0].seq <= upTo) this.#outbox.shift();
        return;
      }
      case "dropped":
        this.#emit("dropped", {
          count: Number(kind.value.count),
          upstream: Number(kind.value.upstream),
        });
        return;
      case "error": {
        const e = kind.value;
        const error = RelaymeshError.fromWire(e.code, e.message);
        const refused = take(this.#pendingHistory, e.requestId) ?? take(this.#pendingLists, e.requestId);
        if (refused) {
          refused.reject(error);
          return;
        }
        const unsub = e.requestId !== 0n ? this.#pendingUnsubscribes.get(e.requestId) : undefined;
        if (unsub) {
          // Refused (an invalid topic, too many changes at once): it was not subscribed.
          this.#pendingUnsubscribes.delete(e.requestId);
          unsub();
          return;
        }
        const sub = e.requestId !== 0n ? this.#pendingSubscribes.get(e.requestId) : undefined;
        if (sub) {
          this.#pendingSubscribes.delete(e.requestId);
          clearTimeout(sub.timer);
          sub.reject(error);
          return;
        }
        if (e.code === ErrorCode.FORBIDDEN) {
          this.#emit("forbidden", { message: e.message });
          return;
        }
        // A link error: the server closes next.
        link.lastError = error;
        return;
      }
      case "history": {
        const batch = kind.value;
        if (batch.recovery) {
          const r = this.#recovering.get(batch.topic);
          if (!r) return;
          this.#positions.unknown(batch.topic, batch.unknownStreams);
          for (const m of batch.messages) {
            if (this.#positions.arrive(m)) {
              r.count++;
              this.#deliver(m);
            }
          }
          if (batch.done) this.#endRecovery(batch.topic, batch.gap, Number(batch.missedAtLeast));
          return;
        }
        const page = this.#pendingHistory.get(batch.requestId);
        if (!page) return;
        for (const m of batch.messages) page.messages.push(new Delivered(m));
        if (batch.done && take(this.#pendingHistory, batch.requestId)) {
          page.resolve({ messages: page.messages, gap: batch.gap, missedAtLeast: Number(batch.missedAtLeast) });
        }
        return;
      }
      case "undeliverable": {
        const u = kind.value;
        this.#emit("undeliverable", {
          seq: u.seq,
          toNode: u.toNode,
          reason: ErrorCode[u.reason] ?? String(u.reason),
          message: u.message,
        });
        return;
      }
      case "nodeList": {
        take(this.#pendingLists, kind.value.requestId)?.resolve({
          nodes: kind.value.nodes.map(nodeInfo),
          total: Number(kind.value.total),
        });
        return;
      }
      case "reconnect": {
        // The server is being drained: move to another one.
        const reason = kind.value.reason || "drained";
        if (link === this.#link && this.#options.autoReconnect) {
          if (this.#moving || link.leaving) return; // moving already
          if (link.restoring) {
            link.drainReason = reason; // once its subscriptions are back
            return;
          }
          void this.#move(link, reason);
          return;
        }
        // Without auto-reconnect, or the server being moved to is drained too (that move
        // fails): as a lost server.
        link.lastError = new RelaymeshError("SHUTTING_DOWN", reason);
        link.ws.close(1000);
        return;
      }
      case "accepted": {
        const { seq, toNode, inboxId } = kind.value;
        this.#emit("accepted", { seq, toNode, inboxId });
        return;
      }
      case "expired": {
        const { toNode, inboxId, seq, publisher, storedMs } = kind.value;
        this.#emit("expired", { toNode, inboxId, seq, publisher, storedMs });
        return;
      }
      case "left":
        // Everything the server moved from had queued for the client has arrived.
        if (!this.#moved(link, true)) link.ws.close(1000);
        return;
      default:
        // Pong (any frame keeps the link alive), and what this client does not use yet.
        return;
    }
  }

  /** Whether message `seq` of `fromAlias` (a resend of `resentFrom`'s when set) is new. An
   * original raises its publisher's number; a resend is new only while above both the
   * original's number and the resends seen, and raises only the latter, so a resend can never
   * hide another publisher's originals (`resent_from` is the sender's word). */
  #fresh(fromAlias: string, resentFrom: string, seq: bigint): boolean {
    if (resentFrom === "") return raise(this.#originals, fromAlias, seq, this.#options.maxPublishers);
    const original = this.#originals.get(resentFrom);
    if (original !== undefined && seq <= original) return false;
    return raise(this.#resends, resentFrom, seq, this.#options.maxPublishers);
  }

  /** The recovery of `topic` is over: a gap is reported first, then the live messages that
   * waited are delivered (those the recovery brought are dropped), then `recovered`. */
  #endRecovery(topic: string, gap: boolean, missedAtLeast: number): void {
    const r = this.#recovering.get(topic);
    if (!r) return;
    this.#recovering.delete(topic);
    if (gap) this.#emit("recoveryGap", { topic, missedAtLeast });
    for (const m of r.held) if (this.#positions.arrive(m)) this.#deliver(m);
    this.#emit("recovered", { topic, count: r.count });
  }

  #badFrame(link: Link, message: string): void {
    link.lastError = new RelaymeshError("BAD_FRAME", message);
    // A WebSocket closes only with 1000 or 3000-4999: the protocol's codes are 4000 + code.
    link.ws.close(4000 + ErrorCode.BAD_FRAME);
  }

  /** A batch's messages in order, as if each had come alone (what follows a handler that
   * closed the client is not handed on, as later frames would not be). */
  #onBatch(link: Link, messages: ReadonlyArray<WireMessage | ProtoMessage>): void {
    for (const m of messages) if (!this.#arrived(link, m)) return;
  }

  /** A message from `link`: held while `link` is being moved to (until the old server has
   * been read to its end), delivered otherwise. False once `link` is no longer the client's. */
  #arrived(link: Link, m: WireMessage | ProtoMessage): boolean {
    const held = link.held;
    if (held) {
      held.push(m);
      if (held.length > HOLD_LIMIT) {
        link.lastError = new RelaymeshError("LIMIT_EXCEEDED", `${HOLD_LIMIT} messages arrived while moving`);
        link.ws.close(1000);
      }
      return true;
    }
    if (this.#link !== link) return false;
    this.#onMessage(m);
    return true;
  }

  #onMessage(m: WireMessage | ProtoMessage): void {
    if (m.stream !== 0n) {
      const recovering = this.#recovering.get(m.topic);
      if (recovering) {
        recovering.held.push(m); // after what the recovery brings
        return;
      }
      if (!this.#positions.arrive(m)) return; // had it already
    }
    this.#deliver(m);
  }

  /** Hands a new message to the application (a copy by its publisher's number is dropped). */
  #deliver(m: WireMessage | ProtoMessage): void {
    const seq = m.seq;
    if (seq > 0n && !this.#fresh(m.fromAlias, m.resentFrom, seq)) return; // a copy
    if (m.signal !== 0) {
      this.#emit("signal", {
        fromNode: m.fromNode,
        fromAlias: m.fromAlias,
        kind: (SignalKind[m.signal] ?? "CUSTOM") as SignalName,
        payload: m.payload,
        seq,
      });
      return;
    }
    if (m.topic.startsWith("@node/")) {
      const payload = m.payload;
      // Asked before the listeners run (one may detach itself as it takes the message).
      const heard = (this.#listeners.get("direct")?.size ?? 0) > 0;
      this.#emit("direct", {
        fromNode: m.fromNode,
        fromAlias: m.fromAlias,
        fromRole: m.fromRole,
        payload,
        seq,
        inboxId: m.inboxId,
        text: () => textDecoder.decode(payload),
      });
      // Handed to the application: the inbox may forget it (and every earlier one). Not when
      // no listener took it (the application had not attached one yet), nor anything after
      // that on this link: they come again at the next login.
      const link = this.#link;
      if (m.inboxId > 0n && link) {
        if (!heard) link.inboxUnheard = true;
        if (!link.inboxUnheard) this.#send(link, { case: "inboxAck", value: { upTo: m.inboxId } });
      }
      return;
    }
    if (m.topic === "@presence") {
      let event;
      try {
        event = fromBinary(PresenceEventSchema, m.payload);
      } catch {
        return; // not a presence event: the server sends only those here
      }
      const change = PresenceChange[event.change]?.toLowerCase();
      if ((change === "online" || change === "offline" || change === "updated") && event.node) {
        this.#emit("presence", { change, node: nodeInfo(event.node) });
      }
      return;
    }
    this.#emit("message", new Delivered(m));
  }

  #onClose(link: Link, ev: CloseEvent): void {
    stopHeartbeat(link);
    const reason = link.lastError?.message ?? (ev.reason || `the connection closed (${ev.code})`);
    const final = FINAL_CLOSE_CODES.has(ev.code);
    if (link === this.#moving) {
      this.#abandonMove();
      const old = this.#link;
      if (final && old && !this.#closed) {
        // The session moved to was replaced by a newer login of this client id, or kicked:
        // the client ends.
        this.#link = undefined;
        stopHeartbeat(old);
        old.ws.close(1000);
        this.#emit("disconnected", { serverId: old.serverId, reason });
        this.#finish(reason, link.lastError?.code ?? ErrorCode[ev.code - 4000]);
      }
      // Otherwise the move fails (its restore is refused), or, once `Leave` went out, the old
      // server is read to its end and then left as a lost one.
      return;
    }
    if (this.#link !== link) return;
    // Closed before `Left`: the move ends without all of it (unless this session is over).
    if (!final && this.#moved(link, false)) return;
    // Lost while a move was being prepared: the reconnect below takes over.
    this.#abandonMove();
    this.#link = undefined;
    if (this.#closed) return;
    // The next server will not have what this one was asked to forget; a directory read
    // is asked again by the application.
    for (const resolve of this.#pendingUnsubscribes.values()) resolve();
    this.#pendingUnsubscribes.clear();
    const lost = new RelaymeshError("CONNECT_FAILED", `${link.serverId} was lost`);
    rejectAll(this.#pendingLists, lost);
    rejectAll(this.#pendingHistory, lost);
    // A recovery cut short: the next connection recovers from there.
    this.#cutRecoveries();
    const restore =
      link.restoreRequest !== undefined ? this.#pendingSubscribes.get(link.restoreRequest) : undefined;
    if (final) {
      if (!restore) this.#emit("disconnected", { serverId: link.serverId, reason });
      this.#finish(reason, link.lastError?.code ?? ErrorCode[ev.code - 4000]);
      return;
    }
    if (restore) {
      // Lost while reconnecting: the reconnect loop that is waiting for it goes on.
      restore.reject(new RelaymeshError("CONNECT_FAILED", `${link.serverId} was lost while restoring`));
      return;
    }
    this.#emit("disconnected", { serverId: link.serverId, reason });
    if (!this.#options.autoReconnect) {
      this.#finish(reason, link.lastError?.code);
      return;
    }
    void this.#reconnect(link.serverId);
  }

  async #reconnect(lost: string): Promise<void> {
    if (this.#reconnecting) return;
    this.#reconnecting = true;
    const { initialMs = 100, maxMs = 5000, giveUpAfterMs = 0 } = this.#options.reconnect ?? {};
    const started = Date.now();
    let ceiling = initialMs;
    let exclude = [lost];
    try {
      while (!this.#closed) {
        // Full jitter: clients that lost one server do not all come back at once.
        await sleep(Math.random() * ceiling);
        if (this.#closed) return;
        try {
          await this.#connect(undefined, exclude);
          const link = this.#link;
          if (link) {
            this.#emit("reconnected", { serverId: link.serverId, alias: link.alias });
            return;
          }
          // Lost again before it was ready: go on.
          exclude = [lost];
          ceiling = Math.min(maxMs, ceiling * 2);
          continue;
        } catch (e) {
          const error = e as RelaymeshError;
          if (FINAL_LOGIN_ERRORS.has(error.code) || error.code === "CLOSED") {
            this.#finish(error.message, error.code);
            return;
          }
          // With the lost server left out there may be none: the next attempt may take it.
          if (error.code === "NO_SERVER_AVAILABLE") exclude = [];
          if (giveUpAfterMs > 0 && Date.now() - started > giveUpAfterMs) {
            this.#finish(`no server reached for ${giveUpAfterMs} ms: ${error.message}`, error.code);
            return;
          }
          ceiling = Math.min(maxMs, ceiling * 2);
        }
      }
    } finally {
      this.#reconnecting = false;
    }
  }

  #finish(reason: string, code?: string): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#abandonMove();
    this.#failPending(new RelaymeshError("CLOSED", reason));
    this.#emit("closed", { reason, code });
  }

  #failPending(error: RelaymeshError): void {
    for (const p of this.#pendingSubscribes.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this.#pendingSubscribes.clear();
    for (const resolve of this.#pendingUnsubscribes.values()) resolve();
    this.#pendingUnsubscribes.clear();
    rejectAll(this.#pendingLists, error);
    rejectAll(this.#pendingHistory, error);
  }

  #startHeartbeat(link: Link): void {
    const { interval, timeout } = link;
    let nonce = 0n;
    link.heartbeat = setInterval(() => {
      if (Date.now() - link.lastHeard > timeout) {
        link.lastError = new RelaymeshError("HEARTBEAT_TIMEOUT", `nothing heard for ${timeout} ms`);
        stopHeartbeat(link);
        link.ws.close(4000 + ErrorCode.HEARTBEAT_TIMEOUT);
        // A dead peer may never complete the closing handshake: go on now.
        this.#onClose(link, { code: 4000 + ErrorCode.HEARTBEAT_TIMEOUT, reason: "" } as CloseEvent);
        return;
      }
      this.#send(link, { case: "ping", value: { nonce: ++nonce } });
    }, interval);
    // In Node.js a heartbeat alone does not keep the process alive.
    (link.heartbeat as { unref?: () => void }).unref?.();
  }

  #sendPublish(link: Link, out: Outgoing): void {
    const resentFrom = out.firstAlias !== "" && out.firstAlias !== link.alias ? out.firstAlias : "";
    if (out.firstAlias === "") out.firstAlias = link.alias;
    if (out.toNode !== undefined) {
      this.#send(link, {
        case: "send",
        value: { toNode: out.toNode, payload: out.payload, seq: out.seq, resentFrom },
      });
      return;
    }
    const publish = { topic: out.topic, payload: out.payload, seq: out.seq, resentFrom };
    if (link.maxFrameBytes === 0 || link.maxBatchPublishes === 0) {
      this.#send(link, { case: "publish", value: publish });
      return;
    }
    // An upper bound of the publish's encoded size (UTF-8 takes at most 3 bytes per UTF-16 unit).
    const size = out.payload.length + 3 * (out.topic.length + resentFrom.length) + 32;
    const limit = Math.min(BATCH_BYTES, link.maxFrameBytes - 1024);
    const batch = link.batch;
    const most = Math.min(MAX_BATCH_PUBLISHES, link.maxBatchPublishes);
    if (batch && (batch.bytes + size > limit || batch.publishes.length >= most)) this.#flushPublishes(link);
    if (!link.batch) {
      link.batch = { publishes: [], bytes: 16 };
      queueMicrotask(() => this.#flushPublishes(link));
    }
    link.batch.publishes.push(publish);
    link.batch.bytes += size;
  }

  /** Sends the publishes waiting in `link.batch`: one alone, several as a `PublishBatch`. */
  #flushPublishes(link: Link): void {
    const batch = link.batch;
    if (!batch) return;
    link.batch = undefined;
    const [first, ...more] = batch.publishes;
    this.#write(
      link,
      more.length === 0
        ? { case: "publish", value: first }
        : { case: "batch", value: { publishes: batch.publishes } },
    );
  }

  #send(link: Link, kind: MessageInitShape<typeof ClientToServerSchema>["kind"]): void {
    this.#flushPublishes(link); // publishes made before this go before it
    this.#write(link, kind);
  }

  #write(link: Link, kind: MessageInitShape<typeof ClientToServerSchema>["kind"]): void {
    if (link.ws.readyState !== 1 /* OPEN */) return; // its close is on the way
    link.ws.send(toBinary(ClientToServerSchema, create(ClientToServerSchema, { kind })));
  }

  #emit<K extends keyof ClientEvents>(event: K, value: ClientEvents[K]): void {
    for (const listener of this.#listeners.get(event) ?? []) {
      try {
        (listener as Listener<ClientEvents[K]>)(value);
      } catch (e) {
        // An application's listener that throws does not stop the client.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/** A delivered message as the application gets it. */
class Delivered implements Message {
  readonly topic: string;
  readonly fromAlias: string;
  readonly fromRole: string;
  readonly fromNode: string;
  readonly payload: Uint8Array;
  readonly seq: bigint;
  /** Its place in the topic's history (stream 0: none). */
  readonly position: { stream: bigint; offset: bigint; publishedMs: bigint };

  constructor(m: WireMessage | ProtoMessage) {
    this.position = { stream: m.stream, offset: m.offset, publishedMs: m.publishedMs };
    this.topic = m.topic;
    this.fromAlias = m.fromAlias;
    this.fromRole = m.fromRole;
    this.fromNode = m.fromNode;
    this.payload = m.payload;
    this.seq = m.seq;
  }

  text(): string {
    return textDecoder.decode(this.payload);
  }
}

const textDecoder = new TextDecoder();

/** A `Message` as the generated decoder gives it (a frame the fast reader left alone). */
type ProtoMessage = Extract<ServerToClient["kind"], { case: "message" }>["value"];

/** A request waiting for its answer. */
interface Waiting<T> {
  resolve: (value: T) => void;
  reject: (e: RelaymeshError) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** Request `requestId` of `pending`, no longer waiting (its timer stopped), if it was. */
function take<W extends Waiting<never>>(pending: Map<bigint, W>, requestId: bigint): W | undefined {
  const w = pending.get(requestId);
  if (w) {
    pending.delete(requestId);
    clearTimeout(w.timer);
  }
  return w;
}

/** Fails every request of `pending` with `error`. */
function rejectAll(pending: Map<bigint, Waiting<never>>, error: RelaymeshError): void {
  for (const w of pending.values()) {
    clearTimeout(w.timer);
    w.reject(error);
  }
  pending.clear();
}

/** Raises `publisher`'s number in `seen` to `seq` if it is higher; whether it was. At
 * `max` publishers the one heard from first is forgotten. */
function raise(seen: Map<string, bigint>, publisher: string, seq: bigint, max: number): boolean {
  const last = seen.get(publisher);
  if (last !== undefined && seq <= last) return false;
  seen.set(publisher, seq);
  if (last === undefined && seen.size > max) {
    const oldest = seen.keys().next().value;
    if (oldest !== undefined) seen.delete(oldest);
  }
  return true;
}

function bytesOf(payload: Uint8Array | string): Uint8Array {
  return typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
}

function nodeInfo(n: ProtoNodeInfo): NodeInfo {
  return {
    nodeId: n.nodeId,
    name: n.name,
    location: n.location,
    info: n.info,
    sinceMs: Number(n.sinceMs),
    servers: [...n.servers],
  };
}

function decode(data: unknown): ServerToClient | undefined {
  if (!(data instanceof ArrayBuffer)) return undefined;
  try {
    return fromBinary(ServerToClientSchema, new Uint8Array(data));
  } catch {
    return undefined;
  }
}

function stopHeartbeat(link: Link): void {
  if (link.heartbeat !== undefined) clearInterval(link.heartbeat);
  link.heartbeat = undefined;
}

function closedError(): RelaymeshError {
  return new RelaymeshError("CLOSED", "the client is closed");
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
