// The comfyrelay web console: jobs, one job's timeline, the catalog's submit form, machines.
// Everything it shows comes from the public gRPC-Web API (see api.ts).
import { create } from "@bufbuild/protobuf";
import { timestampDate, type Duration } from "@bufbuild/protobuf/wkt";
import { apiKey, setApiKey, serverUrl, jobs, workflows, machines, describeError, ConnectError, Code } from "./api.js";
import { h, fill, text, formatBytes, formatSeconds, formatTime } from "./dom.js";
import {
  CancelStepKind,
  InputType,
  JobState,
  FailureReason,
  MachineKind,
  MachineState,
  ProvisioningPhase,
  ParameterValueSchema,
  SubmitJobRequestSchema,
  type Job,
  type JobEvent,
  type Machine,
  type Output,
  type ParameterValue,
  type Workflow,
  type WorkflowInput,
} from "./gen/comfyrelay/v1/comfyrelay_pb.js";

const JOBS_POLL_MS = 1500;
const MACHINES_POLL_MS = 2000;
const RECONNECT_MAX_MS = 5000;
/** Rows the events log keeps (the oldest go first); a long job sends thousands of progress events. */
const EVENT_ROWS = 1000;

// ---------------------------------------------------------------------------------------------------
// Shell: header, navigation, one view at a time (hash routes).

const main = h("main", { id: "view" });
const keyInput = h("input", {
  id: "api-key",
  type: "password",
  placeholder: "API key (optional)",
  autocomplete: "off",
  spellcheck: "false",
});
keyInput.value = apiKey();
const keyForm = h(
  "form",
  {
    class: "key",
    onsubmit: (ev: Event) => {
      ev.preventDefault();
      setApiKey(keyInput.value.trim());
      keyState.textContent = apiKey() ? "key set" : "no key";
      route();
    },
  },
  keyInput,
  h("button", { type: "submit" }, "Use key"),
);
const keyState = h("span", { class: "muted key-state" }, apiKey() ? "key set" : "no key");
const nav = h(
  "nav",
  {},
  h("a", { href: "#/jobs", "data-view": "jobs" }, "Jobs"),
  h("a", { href: "#/submit", "data-view": "submit" }, "Submit"),
  h("a", { href: "#/machines", "data-view": "machines" }, "Machines"),
);
document.body.append(
  h(
    "header",
    {},
    h("div", { class: "brand" }, h("strong", {}, "comfyrelay"), h("span", { class: "muted", id: "server" }, serverUrl())),
    nav,
    h("div", { class: "key-box" }, keyForm, keyState),
  ),
  main,
);

let viewAbort = new AbortController();

function route(): void {
  viewAbort.abort();
  viewAbort = new AbortController();
  const signal = viewAbort.signal;
  const [, view = "jobs", arg] = location.hash.split("/");
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.view === (view || "jobs"));
  if (view === "jobs" && arg) jobView(decodeURIComponent(arg), signal);
  else if (view === "submit") submitView(arg ? decodeURIComponent(arg) : undefined, signal);
  else if (view === "machines") machinesView(signal);
  else jobsView(signal);
}
window.addEventListener("hashchange", route);

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });
}

/** Calls `tick` now and every `ms` until `signal` aborts. */
async function poll(ms: number, signal: AbortSignal, tick: () => Promise<void>): Promise<void> {
  while (!signal.aborted) {
    await tick();
    await sleep(ms, signal);
  }
}

function statusLine(id: string): HTMLElement {
  return h("p", { class: "status-line", id, role: "status" });
}

function showError(line: HTMLElement, e: unknown): void {
  const { title, lines } = describeError(e);
  line.classList.add("error");
  fill(line, title, ...lines.map((l) => h("span", { class: "detail" }, l)));
}

function clearError(line: HTMLElement): void {
  line.classList.remove("error");
  if (line.childNodes.length) fill(line);
}

const STATE_NAMES: Record<JobState, string> = {
  [JobState.UNSPECIFIED]: "unknown",
  [JobState.QUEUED]: "queued",
  [JobState.PROVISIONING]: "provisioning",
  [JobState.RUNNING]: "running",
  [JobState.SUCCEEDED]: "succeeded",
  [JobState.FAILED]: "failed",
  [JobState.CANCELLED]: "cancelled",
};

function isTerminal(s: JobState): boolean {
  return s === JobState.SUCCEEDED || s === JobState.FAILED || s === JobState.CANCELLED;
}

function badge(state: string): HTMLElement {
  return h("span", { class: `badge state-${state}`, "data-state": state }, state);
}

function setBadge(el: HTMLElement, state: string): void {
  if (el.dataset.state === state) return;
  el.dataset.state = state;
  el.className = `badge state-${state}`;
  el.textContent = state;
}

function date(ts: { seconds: bigint; nanos: number } | undefined): Date | undefined {
  return ts ? timestampDate(ts as Parameters<typeof timestampDate>[0]) : undefined;
}

function seconds(d: Duration | undefined): number {
  return d ? Number(d.seconds) + d.nanos / 1e9 : NaN;
}

function enumName(e: Record<number, string>, v: number): string {
  return (e[v] ?? String(v)).toLowerCase().replace(/_/g, " ");
}

// ---------------------------------------------------------------------------------------------------
// Jobs: the list with filters, refreshed live.

function jobsView(signal: AbortSignal): void {
  const stateSelect = h(
    "select",
    { id: "filter-state" },
    h("option", { value: "" }, "all states"),
    ...[JobState.QUEUED, JobState.PROVISIONING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED].map(
      (s) => h("option", { value: String(s) }, STATE_NAMES[s]),
    ),
  );
  const workflowSelect = h("select", { id: "filter-workflow" }, h("option", { value: "" }, "all workflows"));
  const status = statusLine("jobs-status");
  const body = h("tbody", {});
  const table = h(
    "table",
    { class: "jobs", id: "jobs-table" },
    h(
      "colgroup",
      {},
      h("col", { class: "c-id" }),
      h("col", { class: "c-wf" }),
      h("col", { class: "c-state" }),
      h("col", { class: "c-wait" }),
      h("col", { class: "c-time" }),
      h("col", { class: "c-machine" }),
      h("col", { class: "c-dur" }),
    ),
    h(
      "thead",
      {},
      h("tr", {}, ...["job", "workflow", "state", "waiting", "created", "machine", "took"].map((c) => h("th", {}, c))),
    ),
    body,
  );
  const empty = h("p", { class: "muted empty", id: "jobs-empty" }, "No jobs yet.");
  const more = h("p", { class: "muted more", id: "jobs-more", hidden: true }, "Showing the newest 50; narrow the filters to see others.");
  fill(
    main,
    h(
      "section",
      { class: "card" },
      h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), h("div", { class: "filters" }, stateSelect, workflowSelect)),
      status,
      table,
      empty,
      more,
    ),
  );
  workflows.listWorkflows({}, { signal }).then(
    (r) => workflowSelect.append(...r.workflows.map((w) => h("option", { value: w.name }, w.name))),
    () => undefined,
  );
  const rows = new Map<string, ReturnType<typeof jobRow>>();
  const refresh = async (): Promise<void> => {
    try {
      const states = stateSelect.value ? [Number(stateSelect.value) as JobState] : [];
      const r = await jobs.listJobs({ pageSize: 50, states, workflow: workflowSelect.value }, { signal });
      clearError(status);
      const seen = new Set<string>();
      r.jobs.forEach((job, i) => {
        seen.add(job.id);
        let row = rows.get(job.id);
        if (!row) {
          row = jobRow(job.id);
          rows.set(job.id, row);
        }
        row.update(job);
        if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] ?? null);
      });
      for (const [id, row] of rows) {
        if (!seen.has(id)) {
          row.tr.remove();
          rows.delete(id);
        }
      }
      empty.hidden = r.jobs.length > 0;
      more.hidden = !r.nextPageToken;
    } catch (e) {
      if (!signal.aborted) showError(status, e);
    }
  };
  const now = (): void => void refresh();
  stateSelect.addEventListener("change", now);
  workflowSelect.addEventListener("change", now);
  void poll(JOBS_POLL_MS, signal, refresh);
}

function jobRow(id: string) {
  const state = badge("unknown");
  const cells = {
    workflow: h("td", {}),
    waiting: h("td", { class: "muted" }),
    created: h("td", { class: "num" }),
    machine: h("td", { class: "mono" }),
    took: h("td", { class: "num" }),
  };
  const tr = h(
    "tr",
    { "data-job": id, class: "clickable", onclick: () => (location.hash = `#/jobs/${encodeURIComponent(id)}`) },
    h("td", { class: "mono" }, h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id)),
    cells.workflow,
    h("td", {}, state),
    cells.waiting,
    cells.created,
    cells.machine,
    cells.took,
  );
  return {
    tr,
    update(job: Job): void {
      setBadge(state, STATE_NAMES[job.state]);
      text(cells.workflow, job.workflow);
      const waiting =
        job.state === JobState.QUEUED
          ? `#${job.queuePosition}${job.waitingReason ? ` · ${job.waitingReason}` : ""}`
          : job.cancelRequested && !isTerminal(job.state)
            ? "cancel requested"
            : "";
      text(cells.waiting, waiting);
      text(cells.created, formatTime(date(job.createTime)));
      text(cells.machine, job.machineId || "–");
      const start = date(job.createTime);
      const end = date(job.endTime);
      text(cells.took, start && end ? formatSeconds((end.getTime() - start.getTime()) / 1000) : "–");
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// One job: header, timeline, nodes with progress, previews, outputs, events; resumes after a cut.

function jobView(id: string, signal: AbortSignal): void {
  const state = badge("unknown");
  const streamState = h("span", { id: "stream-state", class: "muted", "data-reconnects": "0" }, "connecting…");
  const cancel = h("button", { id: "cancel-job", class: "danger", type: "button", disabled: true }, "Cancel");
  const status = statusLine("job-status");
  const meta = h("dl", { class: "meta", id: "job-meta" });

  const stage = (key: string, title: string) => {
    const detail = h("div", { class: "stage-detail" });
    const li = h("li", { class: "stage", "data-stage": key }, h("span", { class: "dot" }), h("h3", {}, title), detail);
    return { li, detail };
  };
  const queued = stage("queued", "Queued");
  const provisioning = stage("provisioning", "Provisioning");
  const running = stage("running", "Running");
  const finished = stage("finished", "Finished");
  const nodes = h("ol", { class: "nodes", id: "nodes" });
  running.detail.append(h("div", { class: "machine-line muted" }), nodes);
  const timeline = h("ol", { class: "timeline" }, queued.li, provisioning.li, running.li, finished.li);

  const previewImg = h("img", { id: "preview", alt: "latest preview" });
  const previewBox = h("div", { class: "image-box preview-box empty-box" }, previewImg, h("span", { class: "muted" }, "no preview yet"));
  const outputs = h("div", { class: "outputs", id: "outputs" });
  const events = h("tbody", { id: "events" });

  fill(
    main,
    h(
      "section",
      { class: "card job", "data-job": id },
      h(
        "div",
        { class: "toolbar" },
        h("h1", {}, "Job ", h("span", { class: "mono" }, id)),
        h("div", { class: "actions" }, state, streamState, cancel),
      ),
      status,
      meta,
      h(
        "div",
        { class: "job-grid" },
        h("div", {}, h("h2", {}, "Timeline"), timeline),
        h("div", {}, h("h2", {}, "Preview"), previewBox, h("h2", {}, "Outputs"), outputs),
      ),
      h("h2", {}, "Events"),
      h(
        "div",
        { class: "events-box" },
        h("table", { class: "events" }, h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "time"), h("th", {}, "event"), h("th", {}, "details"))), events),
      ),
    ),
  );

  let current: Job | undefined;
  let previewUrl: string | undefined;
  const nodeRows = new Map<string, { li: HTMLElement; bar: HTMLElement; label: HTMLElement }>();
  const outputCards = new Map<string, HTMLElement>();
  const phases: string[] = [];
  signal.addEventListener("abort", () => {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
  });

  const mark = (s: { li: HTMLElement }, how: "done" | "active" | "failed" | "skipped" | "") => {
    if (s.li.dataset.mark !== how) {
      s.li.dataset.mark = how;
      s.li.className = `stage ${how}`;
    }
  };

  const renderJob = (job: Job) => {
    current = job;
    setBadge(state, STATE_NAMES[job.state]);
    cancel.disabled = isTerminal(job.state) || job.cancelRequested;
    const created = date(job.createTime);
    const ended = date(job.endTime);
    const cost = job.cost ? `${job.cost.amount.toFixed(4)} ${job.cost.currency}` : "–";
    fill(
      meta,
      ...[
        ["workflow", `${job.workflow} ${job.workflowVersion}`],
        ["created", formatTime(created)],
        ["ended", formatTime(ended)],
        ["attempt", String(job.attempt)],
        ["machine", job.machineId || "–"],
        ["machine time", job.machineSeconds ? formatSeconds(job.machineSeconds) : "–"],
        ["cost", cost],
        ["inputs", Object.entries(job.inputs).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
      ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    );
    const s = job.state;
    mark(queued, s === JobState.QUEUED ? "active" : "done");
    if (s === JobState.QUEUED) {
      text(queued.detail, `position ${job.queuePosition}${job.waitingReason ? ` — ${job.waitingReason}` : ""}`);
    }
    if (provisioning.li.dataset.mark !== "skipped") {
      mark(provisioning, s === JobState.PROVISIONING ? "active" : job.provisionTime || s > JobState.PROVISIONING ? "done" : "");
    }
    mark(running, s === JobState.RUNNING ? "active" : job.startTime ? "done" : "");
    mark(finished, s === JobState.SUCCEEDED ? "done" : s === JobState.FAILED || s === JobState.CANCELLED ? "failed" : "");
    if (isTerminal(s)) renderTerminal(job);
    for (const o of job.outputs) addOutput(o);
  };

  const renderTerminal = (job: Job) => {
    const parts: (Node | string)[] = [h("strong", { id: "terminal-state" }, STATE_NAMES[job.state])];
    const t = job.timings;
    if (t) {
      parts.push(
        h(
          "div",
          { class: "muted" },
          `queue ${formatSeconds(seconds(t.queueWait))} · upload ${formatSeconds(seconds(t.upload))} · run ${formatSeconds(seconds(t.execution))} · download ${formatSeconds(seconds(t.download))}`,
        ),
      );
    }
    if (job.error) {
      parts.push(
        h(
          "div",
          { class: "job-error", id: "job-error" },
          h("strong", {}, enumName(FailureReason, job.error.reason)),
          " ",
          job.error.message,
          job.error.nodeErrors.length
            ? h(
                "ul",
                {},
                ...job.error.nodeErrors.map((n) =>
                  h("li", {}, h("span", { class: "mono" }, `${n.nodeId} ${n.classType}`), ` ${n.errorType}: ${n.message} ${n.details}`),
                ),
              )
            : null,
        ),
      );
    }
    fill(finished.detail, ...parts);
  };

  const nodeRow = (nodeId: string, classType: string) => {
    let row = nodeRows.get(nodeId);
    if (!row) {
      const bar = h("div", { class: "bar-fill" });
      const label = h("span", { class: "bar-label num" }, "");
      const li = h(
        "li",
        { class: "node", "data-node": nodeId },
        h("span", { class: "node-name" }, h("span", { class: "mono" }, `#${nodeId}`), ` ${classType}`),
        h("div", { class: "bar" }, bar),
        label,
      );
      nodes.append(li);
      row = { li, bar, label };
      nodeRows.set(nodeId, row);
    }
    return row;
  };

  const finishNodes = () => {
    for (const r of nodeRows.values()) {
      if (r.li.classList.contains("executed") || r.li.classList.contains("cached")) continue;
      r.li.classList.add("executed");
      r.bar.style.width = "100%";
      text(r.label, "done");
    }
  };

  const setProgress = (nodeId: string, value: number, max: number) => {
    const row = nodeRow(nodeId, "");
    const pct = max > 0 ? Math.min(100, (value / max) * 100) : 0;
    row.bar.style.width = `${pct}%`;
    text(row.label, `${value}/${max}`);
  };

  const addOutput = (o: Output) => {
    if (outputCards.has(o.filename)) return;
    const img = h("img", { alt: o.filename });
    const box = h("div", { class: "image-box output-box" }, img);
    const link = h("a", { class: "button", download: o.filename, href: "#", "data-output": o.filename }, "Download");
    const card = h(
      "figure",
      { class: "output", "data-output": o.filename },
      box,
      h("figcaption", {}, h("span", { class: "mono name" }, o.filename), h("span", { class: "muted" }, `${o.width}×${o.height} · ${formatBytes(Number(o.sizeBytes))}`), link),
    );
    outputCards.set(o.filename, card);
    outputs.append(card);
    const show = (blob: Blob) => {
      const url = URL.createObjectURL(blob);
      signal.addEventListener("abort", () => URL.revokeObjectURL(url));
      link.href = url;
      if (o.mimeType.startsWith("image/")) {
        img.src = url;
        box.classList.add("loaded");
      }
    };
    if (o.inlineData.length) show(new Blob([o.inlineData as BlobPart], { type: o.mimeType }));
    else if (o.mimeType.startsWith("image/")) void download(id, o, signal).then(show, (e) => showError(status, e));
    else {
      link.addEventListener(
        "click",
        (ev) => {
          if (link.getAttribute("href") !== "#") return;
          ev.preventDefault();
          void download(id, o, signal).then((b) => {
            show(b);
            link.click();
          });
        },
        { once: true },
      );
    }
  };

  const applyEvent = (ev: JobEvent) => {
    const k = ev.kind;
    let details = "";
    switch (k.case) {
      case "queued":
        details = `position ${k.value.position}${k.value.reason ? ` — ${k.value.reason}` : ""}`;
        text(queued.detail, details);
        break;
      case "provisioning": {
        const phase = enumName(ProvisioningPhase, k.value.phase);
        details = `${phase}${k.value.machineId ? ` · ${k.value.machineId}` : ""} · ${formatSeconds(seconds(k.value.elapsed))}`;
        phases.push(phase);
        fill(provisioning.detail, ...phases.map((p) => h("span", { class: "chip" }, p)));
        mark(provisioning, "active");
        mark(queued, "done");
        break;
      }
      case "started":
        details = `on ${k.value.machineId}`;
        text(running.detail.querySelector(".machine-line")!, `on ${k.value.machineId} · prompt ${k.value.comfyPromptId}`);
        mark(queued, "done");
        if (!phases.length) {
          text(provisioning.detail, "not needed: the machine was ready");
          mark(provisioning, "skipped");
        }
        mark(running, "active");
        setBadge(state, "running");
        break;
      case "promptSubmitted":
        details = `inputs uploaded in ${formatSeconds(seconds(k.value.upload))}`;
        break;
      case "nodeStarted":
        details = `#${k.value.nodeId} ${k.value.classType}`;
        // ComfyUI runs one node at a time: the next one starting means the others finished.
        finishNodes();
        nodeRow(k.value.nodeId, k.value.classType).li.classList.add("started");
        break;
      case "nodesCached":
        details = k.value.nodeIds.join(", ");
        for (const n of k.value.nodeIds) {
          const r = nodeRow(n, "(cached)");
          r.li.classList.add("cached");
          r.bar.style.width = "100%";
          text(r.label, "cached");
        }
        break;
      case "progress":
        details = `#${k.value.nodeId} ${k.value.value}/${k.value.max}`;
        setProgress(k.value.nodeId, k.value.value, k.value.max);
        break;
      case "preview": {
        details = `${k.value.mimeType} ${formatBytes(k.value.image.length)}`;
        const url = URL.createObjectURL(new Blob([k.value.image as BlobPart], { type: k.value.mimeType }));
        if (previewUrl) URL.revokeObjectURL(previewUrl);
        previewUrl = url;
        previewImg.src = url;
        previewBox.classList.remove("empty-box");
        break;
      }
      case "nodeExecuted":
        details = `#${k.value.nodeId}`;
        {
          const r = nodeRow(k.value.nodeId, "");
          r.li.classList.add("executed");
          r.bar.style.width = "100%";
          text(r.label, "done");
        }
        break;
      case "outputReady":
        details = k.value.output?.filename ?? "";
        if (k.value.output) addOutput(k.value.output);
        break;
      case "progressText":
        details = `#${k.value.nodeId} ${k.value.text}`;
        break;
      case "retrying":
        details = `attempt ${k.value.attempt}: ${k.value.reason}`;
        break;
      case "requeued":
        details = k.value.reason;
        break;
      case "warning":
        details = `${k.value.code}: ${k.value.message}`;
        break;
      case "cancelRequested":
        details = k.value.reason;
        cancel.disabled = true;
        break;
      case "succeeded":
        details = `${k.value.outputs.length} output(s)`;
        finishNodes();
        for (const o of k.value.outputs) addOutput(o);
        break;
      case "failed":
        details = k.value.error ? `${enumName(FailureReason, k.value.error.reason)}: ${k.value.error.message}` : "";
        break;
      case "cancelStep":
        details = `${enumName(CancelStepKind, k.value.step)} after ${formatSeconds(seconds(k.value.elapsed))}`;
        break;
      case "cancelled":
        details = k.value.reason;
        break;
      case "comfyMessage":
        details = k.value.type;
        break;
      default:
        break;
    }
    const kind = k.case ?? "unknown";
    events.prepend(
      h(
        "tr",
        { "data-sequence": String(ev.sequence), "data-kind": kind },
        h("td", { class: "num" }, String(ev.sequence)),
        h("td", { class: "num" }, formatTime(date(ev.time))),
        h("td", {}, kind),
        h("td", { class: "details" }, details),
      ),
    );
    while (events.rows.length > EVENT_ROWS) events.lastElementChild?.remove();
  };

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      renderJob(await jobs.cancelJob({ jobId: id, reason: "cancelled from the console" }, { signal }));
    } catch (e) {
      showError(status, e);
      cancel.disabled = false;
    }
  });

  const follow = async () => {
    try {
      renderJob(await jobs.getJob({ jobId: id }, { signal }));
    } catch (e) {
      if (!signal.aborted) showError(status, e);
      if (e instanceof ConnectError && e.code === Code.NotFound) return;
    }
    let after = 0n;
    let reconnects = 0;
    let failures = 0;
    while (!signal.aborted) {
      try {
        text(streamState, reconnects ? "live (resumed)" : "live");
        for await (const ev of jobs.streamJob({ jobId: id, afterSequence: after }, { signal })) {
          if (ev.sequence <= after) continue;
          after = ev.sequence;
          failures = 0;
          applyEvent(ev);
          const k = ev.kind.case;
          if (k === "succeeded" || k === "failed" || k === "cancelled") {
            text(streamState, "ended");
            renderJob(await jobs.getJob({ jobId: id }, { signal }));
            return;
          }
        }
        if (current && isTerminal(current.state)) return;
      } catch (e) {
        if (signal.aborted) return;
        if (e instanceof ConnectError && (e.code === Code.NotFound || e.code === Code.PermissionDenied || e.code === Code.Unauthenticated)) {
          showError(status, e);
          text(streamState, "stopped");
          return;
        }
      }
      // Cut off: resume after the last event received, so each is shown once.
      reconnects += 1;
      failures += 1;
      streamState.dataset.reconnects = String(reconnects);
      text(streamState, `reconnecting after #${after}…`);
      if (!events.querySelector(`tr.resumed[data-after="${after}"]`)) {
        events.prepend(
          h("tr", { class: "resumed", "data-after": String(after) }, h("td", {}), h("td", {}, formatTime(new Date())), h("td", {}, "connection lost"), h("td", { class: "details" }, `resumed after #${after}, without repeating an event`)),
        );
      }
      await sleep(Math.min(250 * 2 ** failures, RECONNECT_MAX_MS), signal);
      try {
        renderJob(await jobs.getJob({ jobId: id }, { signal }));
        clearError(status);
      } catch {
        // Still cut off; the stream's next attempt says so.
      }
    }
  };
  void follow();
}

async function download(jobId: string, o: Output, signal: AbortSignal): Promise<Blob> {
  const parts: BlobPart[] = [];
  for await (const chunk of jobs.downloadOutput({ jobId, filename: o.filename }, { signal })) {
    parts.push(chunk.data as BlobPart);
  }
  return new Blob(parts, { type: o.mimeType || "application/octet-stream" });
}

// ---------------------------------------------------------------------------------------------------
// Submit: a form generated from the workflow's typed inputs.

function submitView(selected: string | undefined, signal: AbortSignal): void {
  const select = h("select", { id: "workflow", name: "workflow" });
  const description = h("p", { class: "muted", id: "workflow-description" });
  const fields = h("div", { class: "fields", id: "fields" });
  const status = statusLine("submit-status");
  const submit = h("button", { id: "submit-button", type: "submit", class: "primary" }, "Submit job");
  let catalog: Workflow[] = [];
  const form = h(
    "form",
    { id: "submit-form", class: "submit-form", novalidate: false },
    h("label", { class: "field" }, h("span", {}, "Workflow"), select),
    description,
    fields,
    h("div", { class: "actions" }, submit),
    status,
  );
  fill(main, h("section", { class: "card" }, h("h1", {}, "Submit a job"), form));

  const render = () => {
    const wf = catalog.find((w) => w.name === select.value);
    text(description, wf?.description ?? "");
    fill(fields, ...(wf?.inputs ?? []).map(inputField));
  };
  select.addEventListener("change", render);
  workflows.listWorkflows({}, { signal }).then(
    (r) => {
      catalog = r.workflows;
      fill(select, ...catalog.map((w) => h("option", { value: w.name }, w.name)));
      if (selected && catalog.some((w) => w.name === selected)) select.value = selected;
      render();
    },
    (e) => showError(status, e),
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const wf = catalog.find((w) => w.name === select.value);
    if (!wf || !form.reportValidity()) return;
    submit.disabled = true;
    clearError(status);
    try {
      const req = create(SubmitJobRequestSchema, { source: { case: "workflow", value: wf.name }, requestId: crypto.randomUUID() });
      for (const input of wf.inputs) {
        const el = form.querySelector<HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement>(`[name="in-${CSS.escape(input.name)}"]`);
        if (!el) continue;
        const value = await readValue(input, el);
        if (value === undefined) continue;
        if (input.name === "image" && value.kind.case === "imageValue") req.image = value.kind.value;
        else if (input.name === "prompt" && value.kind.case === "stringValue") req.prompt = value.kind.value;
        else req.parameters[input.name] = value;
      }
      const job = await jobs.submitJob(req, { signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      if (!signal.aborted) showError(status, e);
    } finally {
      submit.disabled = false;
    }
  });
}

function inputField(input: WorkflowInput): HTMLElement {
  const name = `in-${input.name}`;
  const id = `input-${input.name}`;
  const d = input.defaultValue?.kind;
  let control: HTMLElement;
  let hint = "";
  switch (input.type) {
    case InputType.IMAGE: {
      const file = h("input", { id, name, type: "file", accept: "image/png,image/jpeg,image/webp", required: input.required || input.name === "image" });
      const thumb = h("img", { alt: "" });
      const box = h("div", { class: "image-box input-box" }, thumb);
      file.addEventListener("change", () => {
        const f = file.files?.[0];
        if (thumb.src) URL.revokeObjectURL(thumb.src);
        thumb.src = f ? URL.createObjectURL(f) : "";
        box.classList.toggle("loaded", !!f);
      });
      control = h("div", { class: "image-input" }, file, box);
      break;
    }
    case InputType.INT:
    case InputType.SEED:
    case InputType.FLOAT: {
      const isFloat = input.type === InputType.FLOAT;
      const el = h("input", {
        id,
        name,
        type: "number",
        step: isFloat ? "any" : "1",
        min: input.min,
        max: input.max,
        required: input.required,
        placeholder: input.type === InputType.SEED ? "random" : "",
      });
      if (d?.case === "intValue") el.value = String(d.value);
      if (d?.case === "floatValue") el.value = String(d.value);
      // A seed's range is the whole of int64, too long to be worth showing.
      const bound = (v: number | undefined) => (v === undefined || Math.abs(v) >= 2 ** 53 ? "…" : String(v));
      if (input.min !== undefined || input.max !== undefined) hint = `${bound(input.min)} to ${bound(input.max)}`;
      control = el;
      break;
    }
    case InputType.BOOL: {
      const el = h("input", { id, name, type: "checkbox" });
      el.checked = d?.case === "boolValue" && d.value;
      control = el;
      break;
    }
    case InputType.CHOICE: {
      const el = h("select", { id, name, required: input.required }, ...(input.required ? [] : [h("option", { value: "" }, "(default)")]), ...input.choices.map((c) => h("option", { value: c }, c)));
      if (d?.case === "stringValue") el.value = d.value;
      control = el;
      break;
    }
    default: {
      const el = input.name === "prompt" ? h("textarea", { id, name, rows: 3, required: input.required }) : h("input", { id, name, type: "text", required: input.required });
      if (d?.case === "stringValue") el.value = d.value;
      control = el;
    }
  }
  const wide = input.type === InputType.IMAGE || input.name === "prompt";
  return h(
    "label",
    { class: wide ? "field wide" : "field", for: id },
    h("span", {}, input.name, input.required ? h("span", { class: "required" }, " *") : null),
    control,
    h("small", { class: "muted" }, [input.description, hint].filter(Boolean).join(" · ")),
  );
}

async function readValue(input: WorkflowInput, el: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement): Promise<ParameterValue | undefined> {
  const v = (kind: ParameterValue["kind"]) => create(ParameterValueSchema, { kind });
  switch (input.type) {
    case InputType.IMAGE: {
      const f = (el as HTMLInputElement).files?.[0];
      if (!f) return undefined;
      const data = new Uint8Array(await f.arrayBuffer());
      return v({ case: "imageValue", value: { $typeName: "comfyrelay.v1.InputImage", data, filename: f.name, contentType: f.type } });
    }
    case InputType.INT:
    case InputType.SEED:
      return el.value === "" ? undefined : v({ case: "intValue", value: BigInt(Math.trunc(Number(el.value))) });
    case InputType.FLOAT:
      return el.value === "" ? undefined : v({ case: "floatValue", value: Number(el.value) });
    case InputType.BOOL:
      return v({ case: "boolValue", value: (el as HTMLInputElement).checked });
    default:
      return el.value === "" ? undefined : v({ case: "stringValue", value: el.value });
  }
}

// ---------------------------------------------------------------------------------------------------
// Machines: state, lease, billed time and cost, and Drain.

function machinesView(signal: AbortSignal): void {
  const status = statusLine("machines-status");
  const stopped = h("input", { type: "checkbox", id: "include-stopped" });
  const body = h("tbody", {});
  const empty = h("p", { class: "muted empty" }, "No machines.");
  fill(
    main,
    h(
      "section",
      { class: "card" },
      h("div", { class: "toolbar" }, h("h1", {}, "Machines"), h("label", { class: "inline" }, stopped, " include stopped")),
      status,
      h(
        "table",
        { class: "machines", id: "machines-table" },
        h("thead", {}, h("tr", {}, ...["machine", "kind", "state", "jobs run/queue/done", "lease ends", "billed", "cost", "last workflow", ""].map((c) => h("th", {}, c)))),
        body,
      ),
      empty,
    ),
  );
  const rows = new Map<string, ReturnType<typeof machineRow>>();
  const refresh = async () => {
    try {
      const r = await machines.listMachines({ includeStopped: stopped.checked }, { signal });
      clearError(status);
      const seen = new Set<string>();
      r.machines.forEach((m, i) => {
        seen.add(m.id);
        let row = rows.get(m.id);
        if (!row) {
          row = machineRow(m.id, status, signal, () => void refresh());
          rows.set(m.id, row);
        }
        row.update(m);
        if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] ?? null);
      });
      for (const [id, row] of rows) {
        if (!seen.has(id)) {
          row.tr.remove();
          rows.delete(id);
        }
      }
      empty.hidden = r.machines.length > 0;
    } catch (e) {
      if (!signal.aborted) showError(status, e);
    }
  };
  stopped.addEventListener("change", () => void refresh());
  void poll(MACHINES_POLL_MS, signal, refresh);
}

function machineRow(id: string, status: HTMLElement, signal: AbortSignal, refresh: () => void) {
  const state = badge("unknown");
  const c = {
    kind: h("td", {}),
    jobs: h("td", { class: "num" }),
    lease: h("td", { class: "num" }),
    billed: h("td", { class: "num" }),
    cost: h("td", { class: "num" }),
    last: h("td", {}),
  };
  const drain = h("button", { type: "button", class: "drain", "data-machine": id }, "Drain");
  let draining = false;
  drain.addEventListener("click", async () => {
    drain.disabled = true;
    try {
      if (draining) await machines.undrainMachine({ machineId: id }, { signal });
      else await machines.drainMachine({ machineId: id }, { signal });
      refresh();
    } catch (e) {
      showError(status, e);
    } finally {
      drain.disabled = false;
    }
  });
  const tr = h(
    "tr",
    { "data-machine": id },
    h("td", {}, h("div", { class: "mono" }, id), h("small", { class: "muted url" }, "")),
    c.kind,
    h("td", {}, state),
    c.jobs,
    c.lease,
    c.billed,
    c.cost,
    c.last,
    h("td", {}, drain),
  );
  return {
    tr,
    update(m: Machine): void {
      setBadge(state, enumName(MachineState, m.state));
      text(tr.querySelector(".url")!, m.comfyUrl);
      text(c.kind, `${enumName(MachineKind, m.kind)}${m.serverType ? ` · ${m.serverType}` : ""}`);
      text(c.jobs, `${m.runningJobs} / ${m.queuedJobs} / ${m.jobsCompleted}`);
      const lease = date(m.leaseExpireTime);
      text(c.lease, lease ? `in ${formatSeconds((lease.getTime() - Date.now()) / 1000)}` : "–");
      c.lease.title = lease ? lease.toLocaleString() : "";
      text(c.billed, formatSeconds(m.billedSeconds));
      text(c.cost, m.cost ? `${m.cost.amount.toFixed(4)} ${m.cost.currency}` : "–");
      text(c.last, m.lastWorkflow || "–");
      draining = m.draining;
      text(drain, m.draining ? "Undrain" : "Drain");
      const gone = m.state === MachineState.STOPPED || m.state === MachineState.STOPPING || m.state === MachineState.UNMANAGED;
      drain.disabled = gone;
    },
  };
}

route();
