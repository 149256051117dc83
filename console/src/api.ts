// The console's only way to the service: the public gRPC-Web API (comfyrelay.v1), through connect-web.
import { createClient, ConnectError, Code, type Interceptor, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { JobService, MachineService, WorkflowService } from "./gen/comfyrelay/v1/comfyrelay_pb.js";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

const KEY_STORAGE = "comfyrelay.apiKey";

/** The server the console talks to: `?server=` when given, else the page's own origin. */
export function serverUrl(): string {
  const asked = new URLSearchParams(location.search).get("server");
  return (asked ?? location.origin).replace(/\/+$/, "");
}

/** The API key the user pasted (kept for this tab only). */
export function apiKey(): string {
  return sessionStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key: string): void {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** `authorization: Bearer <key>` on every call while a key is set; no header without one. */
const auth: Interceptor = (next) => (req) => {
  const key = apiKey();
  if (key) req.header.set("authorization", `Bearer ${key}`);
  return next(req);
};

const transport = createGrpcWebTransport({ baseUrl: serverUrl(), interceptors: [auth] });

export const jobs: Client<typeof JobService> = createClient(JobService, transport);
export const workflows: Client<typeof WorkflowService> = createClient(WorkflowService, transport);
export const machines: Client<typeof MachineService> = createClient(MachineService, transport);

/** An error for people: the code, the message, and the `google.rpc` details the server attached. */
export function describeError(e: unknown): { title: string; lines: string[] } {
  const err = ConnectError.from(e);
  const lines: string[] = [];
  for (const bad of err.findDetails(BadRequestSchema)) {
    for (const v of bad.fieldViolations) lines.push(`${v.field}: ${v.description}`);
  }
  for (const retry of err.findDetails(RetryInfoSchema)) {
    const d = retry.retryDelay;
    if (d) lines.push(`retry in ${Number(d.seconds) + d.nanos / 1e9} s`);
  }
  const reason = err.findDetails(ErrorInfoSchema)[0]?.reason;
  // With field violations the message only repeats them: each is listed once, under the code.
  const head = `${Code[err.code] ?? err.code}${reason ? ` (${reason})` : ""}`;
  const title = lines.length && err.findDetails(BadRequestSchema).length ? head : `${head}: ${err.rawMessage}`;
  return { title, lines };
}

export { ConnectError, Code };
