// The web console the coordinator serves at /console (`coordinator --console`): the comm
// servers with their load and rates, the peer mesh, a topic tail (the TypeScript client, in
// the page), and the latest results file if one is configured. Bundled by `npm run console`
// (bundle.mjs) into coordinator/console/console.js, which the coordinator embeds.

import { Client } from "../src/index.js";

interface ServerStats {
  clients: number;
  topics: number;
  messages_in: number;
  messages_out: number;
  peers: number;
  peer_links: Array<{ id: string }>;
  cpu_seconds: number;
  rss_bytes: number;
}

interface ServerView {
  id: string;
  url: string;
  clients: number;
  capacity: number;
  topics: number;
  draining: boolean;
  eligible: boolean;
  unresponsive: boolean;
  stats?: ServerStats;
  error?: string;
}

interface ClusterView {
  at_ms: number;
  coordinator: { version: string; uptime_s: number; logins: number; nodes_online: number; results: boolean };
  servers: ServerView[];
}

const POLL_MS = 1000;
const TAIL_LINES = 200;
const TOKEN_KEY = "relaymesh-console-token";

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`no #${id}`);
  return el as T;
};

let previous: ClusterView | undefined;
let timer: ReturnType<typeof setTimeout> | undefined;

async function api(path: string): Promise<Response> {
  return fetch(path, { headers: { authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) ?? ""}` } });
}

async function poll(): Promise<void> {
  try {
    const response = await api("/console/api/cluster");
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("that token was refused");
      return;
    }
    const view = (await response.json()) as ClusterView;
    render(view);
    previous = view;
  } catch (e) {
    $("summary").textContent = `coordinator unreachable: ${(e as Error).message}`;
  }
  timer = setTimeout(() => void poll(), POLL_MS);
}

function rate(now: ClusterView, server: ServerView, key: "messages_in" | "messages_out"): string {
  const before = previous?.servers.find((s) => s.id === server.id)?.stats;
  const after = server.stats;
  if (!before || !after || !previous) return "";
  const seconds = (now.at_ms - previous.at_ms) / 1000;
  if (seconds <= 0) return "";
  return Math.max(0, (after[key] - before[key]) / seconds).toFixed(0);
}

function cpu(now: ClusterView, server: ServerView): string {
  const before = previous?.servers.find((s) => s.id === server.id)?.stats;
  if (!before || !server.stats || !previous) return "";
  const seconds = (now.at_ms - previous.at_ms) / 1000;
  if (seconds <= 0) return "";
  return ((100 * (server.stats.cpu_seconds - before.cpu_seconds)) / seconds).toFixed(1);
}

function state(s: ServerView): [string, string] {
  if (s.error) return ["unreachable", "bad"];
  if (s.unresponsive) return ["unresponsive", "bad"];
  if (s.draining) return ["draining", "warn"];
  return s.eligible ? ["up", "ok"] : ["not eligible", "warn"];
}

function cell(text: string, className = ""): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render(view: ClusterView): void {
  const c = view.coordinator;
  // A server's own count is live; the coordinator's is as of its last load report.
  const clientsOf = (s: ServerView) => s.stats?.clients ?? s.clients;
  const clients = view.servers.reduce((n, s) => n + clientsOf(s), 0);
  $("summary").textContent =
    `coordinator ${c.version}, up ${c.uptime_s} s · ${view.servers.length} servers · ` +
    `${clients} clients · ${c.logins} logins · ${c.nodes_online} nodes online`;
  const body = $("servers");
  body.replaceChildren(
    ...view.servers.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.server = s.id;
      const [label, cls] = state(s);
      tr.append(
        cell(s.id),
        cell(label, cls),
        cell(`${clientsOf(s)} / ${s.capacity}`, "n"),
        cell(String(s.stats?.topics ?? s.topics), "n"),
        cell(rate(view, s, "messages_in"), "n"),
        cell(rate(view, s, "messages_out"), "n"),
        cell(cpu(view, s), "n"),
        cell(s.stats ? (s.stats.rss_bytes / 1048576).toFixed(1) : "", "n"),
        cell(s.stats ? String(s.stats.peers) : "", "n"),
      );
      if (s.error) tr.title = s.error;
      return tr;
    }),
  );
  drawMesh(view.servers);
  if (c.results && $("results").hidden) void showResults();
}

const SVG = "http://www.w3.org/2000/svg";

function drawMesh(servers: ServerView[]): void {
  const svg = $("mesh") as unknown as SVGSVGElement;
  const [cx, cy, r] = [160, 120, 85];
  const at = new Map<string, [number, number]>();
  servers.forEach((s, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, servers.length) - Math.PI / 2;
    at.set(s.id, [cx + r * Math.cos(angle), cy + r * Math.sin(angle)]);
  });
  const shapes: SVGElement[] = [];
  const drawn = new Set<string>();
  for (const s of servers) {
    for (const link of s.stats?.peer_links ?? []) {
      const pair = [s.id, link.id].sort().join(" ");
      const a = at.get(s.id);
      const b = at.get(link.id);
      if (drawn.has(pair) || !a || !b) continue;
      drawn.add(pair);
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("x1", String(a[0]));
      line.setAttribute("y1", String(a[1]));
      line.setAttribute("x2", String(b[0]));
      line.setAttribute("y2", String(b[1]));
      line.setAttribute("stroke", "#8a94a6");
      line.setAttribute("stroke-width", "2");
      shapes.push(line);
    }
  }
  for (const s of servers) {
    const [x, y] = at.get(s.id) ?? [cx, cy];
    const [, cls] = state(s);
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", String(x));
    dot.setAttribute("cy", String(y));
    dot.setAttribute("r", "14");
    dot.setAttribute("fill", cls === "ok" ? "#22a559" : cls === "warn" ? "#d97706" : "#dc2626");
    dot.setAttribute("data-server", s.id);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", String(x));
    label.setAttribute("y", String(y + 30));
    label.setAttribute("text-anchor", "middle");
    label.setAttribute("font-size", "11");
    label.textContent = `${s.id} (${s.stats?.clients ?? s.clients})`;
    shapes.push(dot, label);
  }
  svg.replaceChildren(...shapes);
}

async function showResults(): Promise<void> {
  const response = await api("/console/api/results");
  if (!response.ok) return;
  const results = (await response.json()) as Record<string, unknown>;
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(results, null, 2);
  $("results-body").replaceChildren(pre);
  $("results").hidden = false;
}

// ---- topic tail ---------------------------------------------------------------------------

let tail: Client | undefined;
/** Which Watch is current: a connection that a later Watch or Stop superseded closes. */
let tailGeneration = 0;

async function startTail(event: SubmitEvent): Promise<void> {
  event.preventDefault();
  stopTail();
  const generation = tailGeneration;
  const account = ($("tail-account") as HTMLInputElement).value.trim();
  const code = ($("tail-code") as HTMLInputElement).value;
  const role = ($("tail-role") as HTMLInputElement).value.trim();
  const topic = ($("tail-topic") as HTMLInputElement).value.trim();
  const status = $("tail-status");
  status.textContent = "connecting…";
  try {
    const client = await Client.connect({
      coordinator: location.origin,
      credentials: account ? { accessCode: { account, code, role } } : { anonymous: true },
    });
    if (generation !== tailGeneration) {
      client.close();
      return;
    }
    tail = client;
    client.on("message", (m) => line(`${m.topic}  ${m.fromAlias}${m.fromRole ? ` (${m.fromRole})` : ""}  ${m.text()}`));
    client.on("disconnected", (e) => line(`-- lost ${e.serverId}: ${e.reason}`));
    client.on("reconnected", (e) => {
      line(`-- back on ${e.serverId}`);
      status.textContent = `watching ${topic} on ${e.serverId}`;
    });
    client.on("dropped", (e) => line(`-- ${e.count} messages dropped`));
    await client.subscribe(topic);
    if (generation !== tailGeneration) return;
    status.textContent = `watching ${topic} on ${client.serverId}`;
    ($("tail-stop") as HTMLButtonElement).disabled = false;
  } catch (e) {
    if (generation !== tailGeneration) return;
    status.textContent = (e as Error).message;
    stopTail();
  }
}

function stopTail(): void {
  tailGeneration++;
  tail?.close();
  tail = undefined;
  ($("tail-stop") as HTMLButtonElement).disabled = true;
}

function line(text: string): void {
  const log = $("tail-log");
  const div = document.createElement("div");
  div.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  log.append(div);
  while (log.childElementCount > TAIL_LINES) log.firstElementChild?.remove();
  log.scrollTop = log.scrollHeight;
}

// ---- start --------------------------------------------------------------------------------

function showLogin(error = ""): void {
  if (timer !== undefined) clearTimeout(timer);
  $("app").hidden = true;
  $("login").hidden = false;
  $("token-error").textContent = error;
}

function showApp(): void {
  $("login").hidden = true;
  $("app").hidden = false;
  void poll();
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, ($("token") as HTMLInputElement).value);
  showApp();
});
$("tail-form").addEventListener("submit", (e) => void startTail(e as SubmitEvent));
$("tail-stop").addEventListener("click", () => {
  stopTail();
  $("tail-status").textContent = "stopped";
});
if (sessionStorage.getItem(TOKEN_KEY)) showApp();
