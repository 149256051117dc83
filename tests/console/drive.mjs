// Drives the console in a real headless Chromium (playwright-core with the system's chromium), for
// tests/console/main.rs, which starts `comfyrelay dev`, the pages' origins and a proxy it can cut.
//
// Input: the environment variable CONSOLE_TEST (JSON, see main.rs). Output: one JSON object per line
// on stdout: `{"cut": true}` asks the test to cut the proxy's connections (it answers with a line on
// stdin), `{"done": {...}}` ends with what the test checks through the API. Any failed expectation
// throws: the process exits non-zero with the message on stderr.
import { createInterface } from "node:readline";
import { writeFileSync } from "node:fs";
import assert from "node:assert/strict";

const cfg = JSON.parse(process.env.CONSOLE_TEST);
const { chromium } = await import(`${cfg.playwright}/index.mjs`);
const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const step = (name) => process.stderr.write(`drive: ${name}\n`);
const T = { timeout: 30_000 };

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });

/** A page whose CSP violations and script errors fail the test. */
async function open(url) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && /Content Security Policy|Refused to/.test(m.text())) problems.push(m.text());
  });
  await page.goto(url);
  return { page, problems };
}

/** `after_sequence` of a StreamJob request body (a gRPC-Web frame: 5 header bytes, then the message). */
function afterSequence(body) {
  let i = 5;
  let after = 0;
  while (i < body.length) {
    const tag = body[i++];
    if (tag === 0x0a) {
      i += 1 + body[i]; // job_id: a UUID, so its length fits one byte
    } else if (tag === 0x10) {
      let shift = 0;
      for (;;) {
        const b = body[i++];
        after += (b & 0x7f) * 2 ** shift;
        shift += 7;
        if (!(b & 0x80)) break;
      }
    } else {
      i += 1; // skip_previews (a bool)
    }
  }
  return after;
}

function gapFree(seqs) {
  const sorted = [...seqs].sort((a, b) => a - b);
  assert.deepEqual(sorted, Array.from({ length: sorted.length }, (_, i) => i + 1), `events shown once each, 1..n: ${seqs}`);
}

async function submitInvert(page, image, workflow = "invert") {
  await page.waitForSelector(`#workflow option[value="${workflow}"]`, { state: "attached", ...T });
  await page.selectOption("#workflow", workflow);
  await page.setInputFiles("#input-image", image);
  await page.click("#submit-button");
  await page.waitForFunction(() => /^#\/jobs\/[0-9a-f-]{36}$/.test(location.hash), null, T);
  const id = decodeURIComponent(new URL(page.url()).hash.split("/")[2]);
  await page.waitForSelector(`section.job[data-job="${id}"]`, T);
  return id;
}

// 1. Served by comfyrelay itself (same origin, under its CSP): the catalog and the machines view.
step("same-origin console");
const own = await open(`${cfg.server}/console/#/machines`);
await own.page.waitForSelector('tr[data-machine="emulator"] .badge[data-state="ready"]', T);
const sameOriginRows = await own.page.locator("#machines-table tbody tr").count();
assert.equal(sameOriginRows, 1, "one machine, the emulated ComfyUI");

// 2. From another origin on the allowlist, through the proxy the test can cut, with an API key pasted.
step("allowed origin: submit invert through the form");
const { page, problems } = await open(`${cfg.allowed}/console/?server=${encodeURIComponent(cfg.proxy)}#/submit`);
const streamCalls = [];
page.on("request", (r) => {
  if (r.url().endsWith("/comfyrelay.v1.JobService/StreamJob")) streamCalls.push(afterSequence(r.postDataBuffer()));
});
await page.fill("#api-key", "console-test-key");
await page.click(".key button");
await page.waitForSelector('#workflow option[value="invert"]', { state: "attached", ...T });
// The form follows the workflow's typed inputs: scale-blur has ranged numbers and enums as selects.
await page.selectOption("#workflow", "scale-blur");
assert.equal(await page.getAttribute("#input-blur_radius", "min"), "1");
assert.equal(await page.getAttribute("#input-blur_radius", "max"), "31");
assert.equal(await page.locator("#input-upscale_method").evaluate((e) => e.tagName), "SELECT");
assert.ok((await page.locator("#input-upscale_method option").allTextContents()).includes("lanczos"));
assert.equal(await page.getAttribute("#input-image", "type"), "file");
await page.screenshot({ path: `${cfg.out}/submit.png` });

// An error's google.rpc details reach the page (grpc-status-details-bin is exposed to it): the server
// refuses a workflow whose nodes the backend lacks, naming each in a field violation.
await page.selectOption("#workflow", "sd15-local");
await page.setInputFiles("#input-image", cfg.images[0]);
await page.fill("#input-prompt", "a cat");
await page.click("#submit-button");
await page.waitForSelector("#submit-status.error .detail", T);
const refusal = await page.textContent("#submit-status");
await page.screenshot({ path: `${cfg.out}/submit-refused.png` });
assert.match(refusal, /^InvalidArgument \(INVALID_ARGUMENT\)workflow: /, refusal);
assert.ok((await page.locator("#submit-status .detail").allTextContents()).some((d) => d.startsWith("workflow: ") && d.includes("CheckpointLoaderSimple")), refusal);

const invert = await submitInvert(page, cfg.images[0]);
step(`job ${invert}: progress, then the connection is cut`);
await page.waitForSelector("#events tr[data-kind=progress]", T);
await page.waitForSelector(".node .bar-fill", T);
const boxBefore = await page.locator(".preview-box").boundingBox();
const outputsBefore = await page.locator("#outputs").boundingBox();
say({ cut: true });
await stdin.next();
await page.waitForFunction(() => Number(document.querySelector("#stream-state")?.dataset.reconnects) >= 1, null, T);
step("resumed; waiting for the end");
await page.waitForSelector("#terminal-state", T);
assert.equal(await page.textContent("#terminal-state"), "succeeded");
await page.waitForFunction(() => {
  const img = document.querySelector(".output .output-box img");
  return img && img.complete && img.naturalWidth > 0;
}, null, T);
gapFree(await page.locator("#events tr[data-sequence]").evaluateAll((rows) => rows.map((r) => Number(r.dataset.sequence))));
assert.equal(await page.locator("#events tr.resumed").count(), 1, "the cut is shown once in the log");
// The stream was asked again from where it was cut, not from the beginning.
const resumedAfter = Number(await page.getAttribute("#events tr.resumed", "data-after"));
assert.ok(resumedAfter > 0, "events arrived before the cut");
assert.deepEqual(streamCalls.slice(0, 2), [0, resumedAfter], `StreamJob after_sequence per call: ${streamCalls}`);
const kinds = await page.locator("#events tr[data-sequence]").evaluateAll((rows) => rows.map((r) => r.dataset.kind));
for (const k of ["queued", "started", "nodeStarted", "progress", "outputReady", "succeeded"]) {
  assert.ok(kinds.includes(k), `a ${k} event is shown (${kinds})`);
}
// Nothing moved while events streamed: the reserved boxes are where they were.
assert.deepEqual(await page.locator(".preview-box").boundingBox(), boxBefore, "the preview box does not move");
assert.deepEqual(await page.locator("#outputs").boundingBox(), outputsBefore, "the outputs area does not move");
const output = await page.locator(".output a[download]").evaluate(async (a) => {
  const bytes = new Uint8Array(await (await fetch(a.href)).arrayBuffer());
  return { name: a.getAttribute("download"), base64: btoa(String.fromCharCode(...bytes)) };
});
writeFileSync(`${cfg.out}/output.png`, Buffer.from(output.base64, "base64"));
await page.screenshot({ path: `${cfg.out}/job.png`, fullPage: true });

step("a second job, cancelled from its view");
await page.goto(`${cfg.allowed}/console/?server=${encodeURIComponent(cfg.proxy)}#/submit`);
const cancelled = await submitInvert(page, cfg.images[1]);
await page.click("#cancel-job");
await page.waitForSelector("#terminal-state", T);
assert.equal(await page.textContent("#terminal-state"), "cancelled");

step("a job on a RunComfy machine: provisioning phases");
await page.goto(`${cfg.allowed}/console/?server=${encodeURIComponent(cfg.proxy)}#/submit`);
const cloud = await submitInvert(page, cfg.images[2], "invert-cloud");
await page.waitForSelector('[data-stage="provisioning"] .chip', T);
await page.waitForSelector("#terminal-state", { timeout: 90_000 });
assert.equal(await page.textContent("#terminal-state"), "succeeded");
const phases = await page.locator('[data-stage="provisioning"] .chip').allTextContents();
assert.ok(phases.includes("launch requested") && phases.includes("comfyui reachable"), `phases: ${phases}`);
await page.screenshot({ path: `${cfg.out}/job-runcomfy.png`, fullPage: true });

// (The emulated ComfyUI sends no preview that is not an output: SaveImageWebsocket's frames are outputs.)
step("websocket outputs, numbers typed into the form");
await page.goto(`${cfg.allowed}/console/?server=${encodeURIComponent(cfg.proxy)}#/submit`);
await page.waitForSelector('#workflow option[value="progress-websocket"]', { state: "attached", ...T });
await page.selectOption("#workflow", "progress-websocket");
await page.fill("#input-batch_size", "99");
assert.equal(await page.locator("#input-batch_size").evaluate((e) => e.checkValidity()), false, "over max: the form refuses");
await page.fill("#input-width", "48");
await page.fill("#input-height", "32");
await page.fill("#input-batch_size", "3");
await page.click("#submit-button");
await page.waitForFunction(() => /^#\/jobs\/[0-9a-f-]{36}$/.test(location.hash), null, T);
await page.waitForSelector("#terminal-state", T);
assert.equal(await page.textContent("#terminal-state"), "succeeded");
await page.waitForFunction(
  () => [...document.querySelectorAll(".output .output-box img")].filter((i) => i.complete && i.naturalWidth === 48).length === 3,
  null,
  T,
);

step("the job list, filtered");
await page.goto(`${cfg.allowed}/console/?server=${encodeURIComponent(cfg.proxy)}#/jobs`);
await page.waitForSelector(`tr[data-job="${invert}"]`, T);
await page.selectOption("#filter-state", { label: "cancelled" });
await page.waitForSelector(`tr[data-job="${invert}"]`, { state: "detached", ...T });
await page.waitForSelector(`tr[data-job="${cancelled}"] .badge[data-state="cancelled"]`, T);
await page.screenshot({ path: `${cfg.out}/jobs.png` });
assert.deepEqual(problems, [], "no CSP violation or script error on the allowed page");

step("machines: the RunComfy machine bills; Drain");
await own.page.bringToFront();
await own.page.reload();
await own.page.waitForSelector('tr[data-machine="emulator"] .badge[data-state="ready"]', T);
await own.page.waitForFunction(() => /\/ [1-9]\d*$/.test(document.querySelector('tr[data-machine="emulator"] td:nth-child(4)')?.textContent ?? ""), null, T);
const runcomfy = own.page.locator("#machines-table tbody tr", { hasText: "runcomfy" });
await runcomfy.first().waitFor(T);
await own.page.waitForFunction(() => [...document.querySelectorAll("#machines-table tbody tr")].some((r) => r.textContent.includes("USD")), null, T);
await own.page.screenshot({ path: `${cfg.out}/machines.png` });
await own.page.click('button.drain[data-machine="emulator"]');
await own.page.waitForSelector('tr[data-machine="emulator"] .badge[data-state="draining"]', T);
assert.equal(await own.page.textContent('button.drain[data-machine="emulator"]'), "Undrain");

step("queued behind a drained machine, with the reason; Undrain lets it run");
await page.goto(`${cfg.allowed}/console/?server=${encodeURIComponent(cfg.proxy)}#/submit`);
const waiting = await submitInvert(page, cfg.images[3]);
await page.waitForFunction(() => /position 1 — .*drained/.test(document.querySelector('[data-stage="queued"] .stage-detail')?.textContent ?? ""), null, T);
assert.equal(await page.getAttribute('[data-stage="queued"]', "data-mark"), "active");
await own.page.bringToFront();
await own.page.click('button.drain[data-machine="emulator"]');
await own.page.waitForSelector('tr[data-machine="emulator"] .badge[data-state="ready"]', T);
await page.bringToFront();
await page.waitForSelector("#terminal-state", T);
assert.equal(await page.textContent("#terminal-state"), "succeeded");
assert.deepEqual(own.problems, [], "no CSP violation or script error on the console served by comfyrelay");

// 3. From an origin off the allowlist: the browser refuses the calls (no CORS headers), so no job shows.
step("refused origin");
const refused = await context.newPage();
const failed = [];
refused.on("requestfailed", (r) => failed.push(r.url()));
await refused.goto(`${cfg.refused}/console/?server=${encodeURIComponent(cfg.server)}#/jobs`);
await refused.waitForSelector("#jobs-status.error", T);
assert.equal(await refused.locator("#jobs-table tbody tr").count(), 0, "no job listed to a refused origin");
assert.ok(failed.some((u) => u.includes("/comfyrelay.v1.JobService/ListJobs")), `the call failed in the browser: ${failed}`);
const refusedMessage = await refused.textContent("#jobs-status");

await browser.close();
say({ done: { invert, cancelled, cloud, waiting, output: output.name, refused: refusedMessage } });
process.exit(0);
