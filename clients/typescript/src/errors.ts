import { ErrorCode } from "./gen/relaymesh/v1/mesh_pb.js";

/** Why something failed: a relaymesh error code (the server's or the coordinator's), or one of
 * the client's own (`"QUEUE_FULL"`, `"CLOSED"`, `"TIMEOUT"`, `"CONNECT_FAILED"`,
 * `"UPGRADE_REFUSED"`, `"NOT_CONFIRMED"`, `"BAD_ANSWER"`). */
export type ErrorName = keyof typeof ErrorCode | ClientErrorName;

/** Failures the client reports without a server saying so. */
export type ClientErrorName =
  | "QUEUE_FULL"
  | "CLOSED"
  | "TIMEOUT"
  | "CONNECT_FAILED"
  | "UPGRADE_REFUSED"
  | "NOT_CONFIRMED"
  | "BAD_ANSWER";

/** An error with the code a program can act on and the message a person can read. */
export class RelaymeshError extends Error {
  /** `FORBIDDEN`, `KEY_INVALID`, `BAD_CREDENTIALS`, ... or a client-side name. */
  readonly code: ErrorName;
  /** The HTTP status of a refused request, when there was one. */
  readonly status?: number;

  constructor(code: ErrorName, message: string, status?: number) {
    super(message);
    this.name = "RelaymeshError";
    this.code = code;
    this.status = status;
  }

  /** From an `Error` the server sent (`Error.code` is a number on the wire). */
  static fromWire(code: ErrorCode, message: string): RelaymeshError {
    const name = (ErrorCode[code] as keyof typeof ErrorCode | undefined) ?? "ERROR_CODE_UNSPECIFIED";
    return new RelaymeshError(name, message);
  }

  /** From a `{code, message}` JSON body (the coordinator's and comm server's HTTP errors). */
  static fromJson(body: unknown, status: number): RelaymeshError {
    if (body !== null && typeof body === "object") {
      const { code, message } = body as { code?: unknown; message?: unknown };
      if (typeof code === "string" && code in ErrorCode) {
        return new RelaymeshError(
          code as keyof typeof ErrorCode,
          typeof message === "string" ? message : code,
          status,
        );
      }
    }
    return new RelaymeshError("BAD_ANSWER", `answered ${status} without an error code`, status);
  }
}
