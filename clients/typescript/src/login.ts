// Logging in: `POST /v1/login` on a coordinator picks a comm server at random and reserves a
// single-use key there for the verified identity.

import { RelaymeshError } from "./errors.js";

/** Who the client is. */
export type Credentials =
  | { anonymous: true }
  | { accessCode: { account: string; code: string; role?: string; group?: string } }
  | { key: { account: string; identity: Ed25519Identity; role?: string; group?: string } }
  | { nodeToken: string };

/** An Ed25519 key pair held with WebCrypto; the account store knows its public key. */
export interface Ed25519Identity {
  /** The private key; it may be non-extractable. */
  privateKey: CryptoKey;
  /** The raw 32-byte public key, hex. */
  publicKeyHex: string;
}

/** What a login gives: where to connect, with which key. */
export interface Placement {
  /** The alias the coordinator gave this login. */
  alias: string;
  /** The node this login is (when it is one). */
  nodeId?: string;
  serverId: string;
  /** The comm server's client endpoint (`ws://…/v1/client`); the key goes in `?key=`. */
  url: string;
  key: string;
  /** How long the key stays good. */
  expiresInMs: number;
}

/** How to ask a coordinator for a server. */
export interface LoginRequest {
  credentials?: Credentials;
  /** The client's own unique id within its account: a later login with it replaces this one. */
  clientId?: string;
  /** A server to be placed on, when it is eligible. */
  preferredServer?: string;
  /** Servers not to be placed on (one that was just lost). */
  exclude?: string[];
  /** The client is moving off a drained server and keeps that session until it has read it
   * to the end: this login does not replace it (as a later login with `clientId` would). */
  moving?: boolean;
}

/** Makes a new Ed25519 key pair (WebCrypto: browsers and Node.js 20). */
export async function generateEd25519Identity(extractable = false): Promise<Ed25519Identity> {
  const pair = (await crypto.subtle.generateKey({ name: "Ed25519" }, extractable, [
    "sign",
    "verify",
  ])) as CryptoKeyPair;
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return { privateKey: pair.privateKey, publicKeyHex: toHex(raw) };
}

/** The bytes a key login signs: the challenge's nonce with the account, role and group, as
 * the coordinator checks them (`relaymesh_proto::login_challenge`). */
export function loginChallenge(
  nonce: Uint8Array,
  account: string,
  role: string,
  group: string,
): Uint8Array<ArrayBuffer> {
  const enc = new TextEncoder();
  const parts = [enc.encode("relaymesh-login-v1\0"), nonce];
  for (const part of [account, role, group]) {
    parts.push(Uint8Array.of(0), enc.encode(part));
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** `POST {coordinator}/v1/login`. A refusal is a {@link RelaymeshError} with the
 * coordinator's code (`BAD_CREDENTIALS`, `NO_SERVER_AVAILABLE`, `RATE_LIMITED`, ...). */
export async function login(
  coordinator: string,
  request: LoginRequest = {},
  fetchImpl: typeof fetch = fetch,
): Promise<Placement> {
  const base = httpBase(coordinator);
  const body: Record<string, unknown> = {};
  if (request.credentials) {
    body.credentials = await credentialsJson(base, request.credentials, fetchImpl);
  }
  if (request.clientId) body.client_id = request.clientId;
  if (request.preferredServer) body.preferred_server = request.preferredServer;
  if (request.exclude?.length) body.exclude = request.exclude;
  if (request.moving) body.moving = true;
  const answer = await postJson(fetchImpl, `${base}/v1/login`, body);
  const { alias, node_id, server_id, url, key, expires_in_ms } = answer as Record<string, unknown>;
  if (typeof server_id !== "string" || typeof url !== "string" || typeof key !== "string") {
    throw new RelaymeshError("BAD_ANSWER", `${base}/v1/login answered without a server and key`);
  }
  return {
    alias: typeof alias === "string" ? alias : "",
    nodeId: typeof node_id === "string" && node_id !== "" ? node_id : undefined,
    serverId: server_id,
    url,
    key,
    expiresInMs: typeof expires_in_ms === "number" ? expires_in_ms : 0,
  };
}

async function credentialsJson(
  base: string,
  credentials: Credentials,
  fetchImpl: typeof fetch,
): Promise<unknown> {
  if ("anonymous" in credentials) return { anonymous: {} };
  if ("accessCode" in credentials) {
    const { account, code, role = "", group = "" } = credentials.accessCode;
    return { access_code: { account, code, role, group } };
  }
  if ("nodeToken" in credentials) return { node_token: { token: credentials.nodeToken } };
  const { account, identity, role = "", group = "" } = credentials.key;
  const challenge = (await postJson(fetchImpl, `${base}/v1/login/challenge`, {})) as Record<
    string,
    unknown
  >;
  if (typeof challenge.challenge_id !== "string" || typeof challenge.nonce !== "string") {
    throw new RelaymeshError("BAD_ANSWER", `${base}/v1/login/challenge answered without a nonce`);
  }
  const signed = loginChallenge(fromHex(challenge.nonce), account, role, group);
  const signature = new Uint8Array(
    await crypto.subtle.sign({ name: "Ed25519" }, identity.privateKey, signed),
  );
  return {
    key: {
      account,
      public_key: identity.publicKeyHex,
      role,
      group,
      challenge_id: challenge.challenge_id,
      signature: toHex(signature),
    },
  };
}

async function postJson(fetchImpl: typeof fetch, url: string, body: unknown): Promise<unknown> {
  let response: Response;
  try {
    response = await fetchImpl(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (e) {
    throw new RelaymeshError("CONNECT_FAILED", `${url}: ${(e as Error).message}`);
  }
  let json: unknown;
  try {
    json = await response.json();
  } catch {
    throw new RelaymeshError("BAD_ANSWER", `${url} answered ${response.status}, not JSON`, response.status);
  }
  if (!response.ok) throw RelaymeshError.fromJson(json, response.status);
  return json;
}

/** `http(s)://host:port` from a coordinator address given as `ws://`, `wss://`, `http://`,
 * `https://` or a bare `host:port`. */
export function httpBase(address: string): string {
  let a = address.trim().replace(/\/+$/, "");
  if (a.startsWith("ws://")) a = `http://${a.slice(5)}`;
  else if (a.startsWith("wss://")) a = `https://${a.slice(6)}`;
  else if (!/^https?:\/\//.test(a)) a = `http://${a}`;
  return a;
}

export function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromHex(hex: string): Uint8Array {
  if (hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new RelaymeshError("BAD_ANSWER", "not hex");
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}
