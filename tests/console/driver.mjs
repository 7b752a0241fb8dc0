// Drives the console (/console/ on the internal listener) in headless
// Chromium (Debian's, through the playwright-core the JavaScript client's
// tests install) for tests/browser.rs, which owns the node.
//
//   node driver.mjs <internal base> <ws base> <tenant-admin key>
//        <operator key> <first plugin> <second plugin> <screenshot folder>
//
// A tenant admin signs in, uploads a plugin, tries it, runs a canary and a
// shadow of a second one under real pushes, promotes it and rolls back,
// reads the audit trail, disconnects a user and replaces the push keys; an
// operator makes a viewer key; the viewer only reads. Exits 0 after
// printing "ok", or 1 with the reason.
import { createRequire } from "node:module";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";

const require = createRequire(new URL("../../clients/js/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const [base, wsBase, adminKey, operatorKey, firstPlugin, secondPlugin, shots] = process.argv.slice(2);
const PATIENCE = 30_000;

await mkdir(shots, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();

// Nothing from another origin; no script error, no CSP refusal.
const foreign = [];
const problems = [];
page.on("request", (request) => {
  if (!request.url().startsWith(base)) foreign.push(request.url());
});
page.on("console", (message) => {
  if (message.type() === "error" && !/status of 40[13]/.test(message.text())) problems.push(message.text());
});
page.on("pageerror", (error) => problems.push(error.message));
let dialogAnswer = "";
page.on("dialog", (dialog) => dialog.accept(dialogAnswer));

function check(condition, what) {
  if (!condition) throw new Error(what);
}

async function shot(name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

/** Waits until the status line says something matching `pattern`. */
async function status(pattern) {
  await page.waitForFunction(
    (source) => new RegExp(source).test(document.getElementById("status").textContent),
    pattern.source,
    { timeout: PATIENCE },
  ).catch(async () => {
    throw new Error(`the status never matched ${pattern}: "${await page.textContent("#status")}"`);
  });
}

async function tab(name) {
  await page.getByRole("link", { name, exact: true }).click();
  await page.waitForSelector("#page h1", { timeout: PATIENCE });
}

async function signIn(key) {
  await page.getByLabel("Admin key").fill(key);
  // By keyboard: Enter submits.
  await page.getByLabel("Admin key").press("Enter");
  await status(/Signed in as/);
}

async function push(key, body) {
  const response = await fetch(`${base}/v1/push`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.status;
}

/** The row of the version whose short form the cell shows, by position. */
const row = (index) => page.locator("#versions tbody tr").nth(index);

/** Reloads the plugins page until `condition` holds in it. */
async function plugins(condition, what) {
  const deadline = Date.now() + PATIENCE;
  for (;;) {
    await tab("Plugins");
    if (await page.evaluate(condition)) return;
    if (Date.now() > deadline) throw new Error(`the plugins page never showed ${what}`);
    await page.waitForTimeout(500);
  }
}

try {
  await page.goto(`${base}/console`);
  await signIn(adminKey);
  check((await page.textContent("#who")).includes("shop-lead · tenant-admin of shop"), "who is signed in");
  await page.waitForSelector("[data-figure=Connections]");
  await shot("1-overview");

  // Upload the first version (active), try it.
  await tab("Plugins");
  await page.getByLabel("Component").setInputFiles(firstPlugin);
  await page.getByRole("button", { name: "Upload" }).click();
  await status(/Uploaded .*: version [0-9a-f]{12}, active/);
  await page.waitForSelector("#versions tbody tr[data-version]", { timeout: PATIENCE });
  const first = await row(0).getAttribute("data-version");
  await row(0).getByRole("button", { name: "Try…" }).click();
  await page.getByLabel("Message data (JSON)").fill('{"text": "a bad word"}');
  await page.getByRole("button", { name: "Run" }).click();
  await status(/Tried .* on on-publish: replace/);
  const output = await page.textContent("#try-output");
  check(output.includes("a *** word"), `the try's output: ${output}`);
  await shot("2-try");

  // Upload the second without activating it; a 10 % canary of it.
  await page.getByLabel("Activate it now").uncheck();
  await page.getByLabel("Component").setInputFiles(secondPlugin);
  await page.getByRole("button", { name: "Upload" }).click();
  await status(/Uploaded .*: version [0-9a-f]{12}$/);
  await page.waitForFunction(() => document.querySelectorAll("#versions tbody tr[data-version]").length === 2, null, { timeout: PATIENCE });
  const second = await page.evaluate(
    (first) => [...document.querySelectorAll("#versions tbody tr")].map((r) => r.dataset.version).find((v) => v !== first),
    first,
  );
  dialogAnswer = "10";
  await page.locator(`#versions tr[data-version="${second}"]`).getByRole("button", { name: "Canary…" }).click();
  await status(/Canary .* at 10 %: done/);
  await page.waitForSelector("#canary");

  // Real pushes: the canary's calls move on the page.
  for (let i = 0; i < 200; i++) check((await push("shop-key", { users: [`user-${i}`], data: { text: "hello" } })) === 202, "a push is taken");
  await plugins(
    () => [...document.querySelectorAll("#versions td[data-calls]")].reduce((n, cell) => n + Number(cell.dataset.calls), 0) >= 200,
    "the pushes' calls",
  );
  const canaryCalls = await page.locator(`#versions tr[data-version="${second}"] td[data-calls]`).getAttribute("data-calls");
  check(Number(canaryCalls) > 0 && Number(canaryCalls) < 100, `the canary served about 10 % of 200 users: ${canaryCalls}`);
  check((await page.textContent("#canary")).includes("Failure rate"), "the canary's figures beside the active version's");
  await shot("3-canary");
  await page.getByRole("button", { name: "End canary" }).click();
  await status(/End the canary: done/);

  // A shadow of it: where its verdicts differ, side by side.
  await page.locator(`#versions tr[data-version="${second}"]`).getByRole("button", { name: "Shadow" }).click();
  await status(/Shadow .*: done/);
  for (let i = 0; i < 5; i++) await push("shop-key", { users: ["ann"], data: { text: `a bad word ${i}` } });
  await plugins(() => document.querySelectorAll("#shadow .sample").length > 0, "a differing sample");
  const sample = await page.textContent("#shadow .sample");
  check(sample.includes("***") && sample.includes("Shadow"), `a sample side by side: ${sample}`);
  await shot("4-shadow");

  // Promote it, then roll back to the first.
  await page.locator(`#versions tr[data-version="${second}"]`).getByRole("button", { name: "Activate" }).click();
  await status(/Activate .*: done/);
  await page.getByRole("button", { name: /Roll back to/ }).click();
  await status(/Roll back: done/);
  check((await page.locator(`#versions tr[data-version="${first}"] td`).nth(1).textContent()).includes("active"), "the first version is active again");

  // The audit trail: every step, with the key's name.
  await tab("Audit");
  const entries = await page.$$eval("#audit tbody tr", (rows) =>
    rows.map((r) => ({ key: r.querySelector(".key-name").textContent, change: r.querySelector(".change").textContent })),
  );
  for (const action of ["plugin_installed", "plugin_canary", "plugin_canary_ended", "plugin_shadow", "plugin_activated", "plugin_rolled_back"]) {
    check(entries.some((e) => e.change.startsWith(action) && e.key === "shop-lead"), `the audit lists ${action} by shop-lead: ${JSON.stringify(entries)}`);
  }
  check(entries[0].change.startsWith("plugin_rolled_back"), "newest first");
  await shot("5-audit");

  // Another tenant: not offered, and its pages answer 403.
  check(!(await page.$$eval("#tenant option", (o) => o.map((x) => x.value))).includes("other"), "only its own tenant");
  const foreignTenant = await page.evaluate(async () => {
    const key = sessionStorage.getItem("pushgate.console.key");
    const answers = [];
    for (const path of ["/figures", "/plugins", ""]) {
      answers.push((await fetch(`/admin/v1/tenants/other${path}`, { headers: { authorization: `Bearer ${key}` } })).status);
    }
    return answers;
  });
  check(foreignTenant.every((s) => s === 403), `another tenant's pages: ${foreignTenant}`);

  // A user's connections: looked up, then disconnected.
  // ann's client: a WebSocket in another tab.
  const clientTab = await context.newPage();
  await clientTab.evaluate(
    (url) =>
      new Promise((resolve, reject) => {
        const socket = new WebSocket(url);
        window.closedWith = new Promise((closed) => socket.addEventListener("close", (event) => closed(event.code)));
        socket.addEventListener("open", resolve);
        socket.addEventListener("error", () => reject(new Error("ann cannot connect")));
      }),
    `${wsBase}/ws/shop?user=ann`,
  );
  await tab("Connections");
  await page.getByLabel("User id").fill("ann");
  await page.getByRole("button", { name: "Look up" }).click();
  await status(/ann: 1 connection/);
  await shot("6-connections");
  await page.getByRole("button", { name: "Disconnect every connection of ann" }).click();
  await status(/Closed every connection of ann|ann: 0 connection/);
  const code = await clientTab.evaluate(() => window.closedWith);
  check(code === 4008, `the client is closed with 4008, not ${code}`);
  await clientTab.close();

  // Replace the push keys: the new one pushes, the old one no longer.
  await tab("Keys");
  await page.getByLabel(/New push keys/).fill("fresh-shop-key");
  await page.getByRole("button", { name: "Replace push keys" }).click();
  await status(/Push keys replaced: 1 key/);
  check((await push("fresh-shop-key", { broadcast: true, data: 1 })) === 202, "the new push key works");
  check((await push("shop-key", { broadcast: true, data: 1 })) === 401, "the old push key is refused");

  // A narrow window: nothing wider than it.
  await page.setViewportSize({ width: 360, height: 800 });
  await tab("Overview");
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `the overview fits a narrow window (${overflow} px too wide)`);
  await shot("7-narrow");
  await page.setViewportSize({ width: 1280, height: 900 });

  // An operator sees every tenant and makes a viewer key for shop.
  await page.getByRole("button", { name: "Sign out" }).click();
  await status(/Signed out/);
  await signIn(operatorKey);
  const tenants = await page.$$eval("#tenant option", (o) => o.map((x) => x.value));
  check(tenants.includes("shop") && tenants.includes("other"), `an operator sees every tenant: ${tenants}`);
  await tab("Keys");
  await page.getByLabel("Name").fill("auditor");
  await page.getByLabel(/^Role/).selectOption("viewer");
  await page.getByRole("button", { name: "Make key" }).click();
  await status(/Made viewer key auditor/);
  const viewerKey = await page.textContent("#new-key");
  await shot("8-operator-keys");

  // The viewer reads, and is offered no change.
  await page.getByRole("button", { name: "Sign out" }).click();
  await signIn(viewerKey);
  await tab("Plugins");
  check((await page.locator("#upload").count()) === 0, "no upload for a viewer");
  check((await page.getByRole("button", { name: "Activate" }).count()) === 0, "no activation for a viewer");
  const refused = await page.evaluate(async () => {
    const key = sessionStorage.getItem("pushgate.console.key");
    return (await fetch("/admin/v1/tenants/shop/plugins/rollback", { method: "POST", headers: { authorization: `Bearer ${key}` } })).status;
  });
  check(refused === 403, `a viewer's change is refused: ${refused}`);
  await shot("9-viewer");

  check(foreign.length === 0, `requests to another origin: ${foreign}`);
  check(problems.length === 0, `errors in the page: ${problems}`);
  console.log("ok");
  await browser.close();
  process.exit(0);
} catch (error) {
  await shot("failed").catch(() => {});
  console.error(error);
  await browser.close();
  process.exit(1);
}
