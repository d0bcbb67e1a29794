// @relaymesh/client: the relaymesh client for browsers and Node.js.

export { Client, PROTOCOL_VERSION } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  DirectMessage,
  HistoryPage,
  Message,
  NodeInfo,
  SignalName,
  WebSocketConstructor,
} from "./client.js";
export { RelaymeshError } from "./errors.js";
export type { ClientErrorName, ErrorName } from "./errors.js";
export { generateEd25519Identity, login, loginChallenge } from "./login.js";
export type { Credentials, Ed25519Identity, LoginRequest, Placement } from "./login.js";
export * as proto from "./gen/relaymesh/v1/mesh_pb.js";
