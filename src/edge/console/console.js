// The pushgate console: one page over the admin API of the node that
// serves it. The admin key lives in this tab's session storage and goes out
// as an Authorization header; the page loads nothing from anywhere else.

const KEY_STORAGE = "pushgate.console.key";
const TABS = ["overview", "plugins", "connections", "audit", "keys"];
const HOOKS = ["authenticate", "on-publish", "on-deliver"];

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  who: null,
  tenant: null,
  tab: "overview",
  refresh: null,
};

// ---------------------------------------------------------------- helpers

/** An error the admin API answered with. */
class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

/** Calls the admin API; JSON in and out, or raw bytes in (an upload). */
async function api(method, path, body) {
  const headers = { authorization: `Bearer ${state.key}` };
  let payload;
  if (body instanceof Blob) {
    payload = body;
    headers["content-type"] = "application/wasm";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["content-type"] = "application/json";
  }
  const response = await fetch(path, {
    method,
    headers,
    body: payload,
    credentials: "omit",
    cache: "no-store",
  });
  const text = await response.text();
  let answer = null;
  try {
    answer = text ? JSON.parse(text) : null;
  } catch {
    answer = text;
  }
  if (!response.ok) {
    const message = answer?.error?.message ?? (typeof answer === "string" ? answer : response.statusText);
    throw new ApiError(response.status, message);
  }
  return answer;
}

const tenantPath = (rest = "") => `/admin/v1/tenants/${encodeURIComponent(state.tenant)}${rest}`;

/** Makes an element: h("p", {class: "x", onclick}, "text", child…). */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

let fieldIds = 0;
/** A labelled input: the label names it for screen readers and clicks. */
function field(label, input) {
  input.id ||= `field-${++fieldIds}`;
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
}

/** Says what happened, errors included, where the page announces it. */
function say(message, isError = false) {
  const status = document.getElementById("status");
  status.textContent = message;
  status.className = isError ? "status error" : "status ok";
}

/** Runs an action: its outcome is said, its errors too; true if it worked. */
async function act(what, action) {
  try {
    const message = await action();
    say(message ?? `${what}: done`);
    return true;
  } catch (error) {
    say(`${what} failed: ${error.message}`, true);
    if (error.status === 401) signOut();
    return false;
  }
}

const short = (version) => (version ?? "").slice(0, 12);
const time = (ms) => (ms ? new Date(ms).toLocaleString() : "—");
const number = (value, digits = 1) =>
  value === undefined || value === null ? "—" : Number(value).toFixed(Number.isInteger(value) ? 0 : digits);
const canManage = () => state.who && state.who.role !== "viewer";
const isOperator = () => state.who?.role === "operator";

// ---------------------------------------------------------------- charts

const SERIES_COLORS = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed"];

/** A small line chart of `lines` ({name, values}) over `times`, as SVG. */
function chart(title, times, lines) {
  const width = 320;
  const height = 110;
  const pad = 4;
  const max = Math.max(1e-9, ...lines.flatMap((line) => line.values));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title}: ${lines.map((l) => `${l.name} ${number(l.values.at(-1) ?? 0)}`).join(", ")}`);
  lines.forEach((line, index) => {
    if (line.values.length === 0) return;
    const step = line.values.length > 1 ? (width - 2 * pad) / (line.values.length - 1) : 0;
    const points = line.values
      .map((value, i) => `${pad + i * step},${height - pad - (value / max) * (height - 2 * pad)}`)
      .join(" ");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    path.setAttribute("points", points);
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", SERIES_COLORS[index % SERIES_COLORS.length]);
    path.setAttribute("stroke-width", "2");
    svg.append(path);
  });
  const legend = h(
    "ul",
    { class: "legend" },
    lines.map((line, index) =>
      h(
        "li",
        {},
        h("span", { class: `swatch c${index % SERIES_COLORS.length}` }),
        `${line.name}: ${number(line.values.at(-1) ?? 0, 2)}`,
      ),
    ),
  );
  const seconds = times.length > 1 ? Math.round((times.at(-1) - times[0]) / 1000) : 0;
  const span = seconds === 0 ? "collecting…" : seconds < 120 ? `last ${seconds} s` : `last ${Math.round(seconds / 60)} min`;
  return h("figure", { class: "chart" }, h("figcaption", {}, title, h("small", {}, ` (${span}, peak ${number(max, 2)})`)), svg, legend);
}

// ---------------------------------------------------------------- pages

async function overview(page) {
  const figures = await api("GET", tenantPath("/figures"));
  const now = figures.now;
  const series = figures.series;
  const times = series.map((s) => s.at_ms);
  const pick = (f) => series.map(f);
  const byHook = (key) =>
    HOOKS.map((hook) => ({ name: hook, values: pick((s) => s[key][hook] ?? 0) }));
  const drops = Object.keys(series.at(-1)?.dropped_per_second ?? {}).map((reason) => ({
    name: reason,
    values: pick((s) => s.dropped_per_second[reason] ?? 0),
  }));
  page.replaceChildren(
    h("h1", {}, `${state.tenant}: overview`),
    h(
      "div",
      { class: "cards" },
      card("Connections", now.connections, `${now.connections_here} on this node`),
      card("Users online", now.users, "the whole cluster"),
      card("Pushes / s", number(now.pushed_per_second), "the whole cluster"),
      card("Deliveries / s", number(now.delivered_per_second), "the whole cluster"),
      card("Nodes", now.nodes, `this one: ${figures.node}`),
    ),
    h(
      "div",
      { class: "charts" },
      chart("Connections and users", times, [
        { name: "connections", values: pick((s) => s.connections) },
        { name: "users", values: pick((s) => s.users) },
      ]),
      chart("Pushes and deliveries per second", times, [
        { name: "pushed", values: pick((s) => s.pushed_per_second) },
        { name: "delivered", values: pick((s) => s.delivered_per_second) },
      ]),
      chart("Plugin calls per second (this node)", times, byHook("plugin_calls_per_second")),
      chart("Plugin failures per second (this node)", times, byHook("plugin_failures_per_second")),
      chart("Drops per second by reason (this node)", times, drops),
    ),
    h("p", { class: "hint" }, `Figures every ${figures.interval_ms / 1000} s, the last 15 minutes.`),
  );
  return figures.interval_ms;
}

function card(title, value, detail) {
  return h("div", { class: "card" }, h("div", { class: "card-title" }, title), h("div", { class: "card-value", "data-figure": title }, value), h("div", { class: "card-detail" }, detail));
}

async function plugins(page) {
  const [listing, figures, audit] = await Promise.all([
    api("GET", tenantPath("/plugins")),
    api("GET", tenantPath("/figures")),
    api("GET", `/admin/v1/audit?tenant=${encodeURIComponent(state.tenant)}&limit=1000`),
  ]);
  const shadow = listing.shadow ? await api("GET", tenantPath("/plugins/shadow")).catch(() => null) : null;
  const uploadedBy = new Map();
  for (const entry of audit.entries) {
    if (entry.change?.action === "plugin_installed" && entry.outcome === "applied" && !uploadedBy.has(entry.change.version)) {
      uploadedBy.set(entry.change.version, entry.key_name);
    }
  }
  const totals = new Map(figures.versions.map((v) => [v.version, v.hooks]));
  const sum = (version, what) =>
    Object.values(totals.get(version) ?? {}).reduce((total, hook) => total + hook[what], 0);
  const manage = canManage();

  const versionRow = (v) => {
    const status = [
      v.active && "active",
      v.canary_percent !== undefined && `canary ${v.canary_percent} %`,
      v.shadow && "shadow",
    ].filter(Boolean).join(", ") || "installed";
    return h(
      "tr",
      { "data-version": v.version },
      h("td", {}, h("code", { title: v.version }, short(v.version))),
      h("td", {}, status),
      h("td", {}, v.hooks.join(", ")),
      h("td", {}, `${(v.size / 1024).toFixed(1)} KiB`),
      h("td", {}, time(v.uploaded_at_ms), h("br"), h("small", {}, uploadedBy.get(v.version) ?? "")),
      h("td", { class: "num", "data-calls": sum(v.version, "calls") }, sum(v.version, "calls")),
      h("td", { class: "num", "data-failures": sum(v.version, "failures") }, sum(v.version, "failures")),
      h(
        "td",
        { class: "actions" },
        manage && !v.active && h("button", { type: "button", onclick: () => change(`Activate ${short(v.version)}`, "POST", tenantPath(`/plugins/${v.version}/activate`)) }, "Activate"),
        manage && !v.active && h("button", { type: "button", onclick: () => canaryPrompt(v.version) }, "Canary…"),
        manage && !v.active && !v.shadow && h("button", { type: "button", onclick: () => change(`Shadow ${short(v.version)}`, "POST", tenantPath(`/plugins/${v.version}/shadow`)) }, "Shadow"),
        h("button", { type: "button", onclick: () => showTry(v) }, "Try…"),
        manage && !v.active && h("button", { type: "button", class: "danger", onclick: () => confirm(`Remove ${short(v.version)}?`) && change(`Remove ${short(v.version)}`, "DELETE", tenantPath(`/plugins/${v.version}`)) }, "Remove"),
      ),
    );
  };

  const sections = [h("h1", {}, `${state.tenant}: plugins`)];
  if (manage) sections.push(uploadForm());
  sections.push(
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "versions" },
        h("caption", {}, "Versions on this node (calls and failures since this node loaded them)"),
        h("thead", {}, h("tr", {}, ["Version", "Status", "Hooks", "Size", "Uploaded", "Calls", "Failures", ""].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, listing.versions.length ? listing.versions.map(versionRow) : h("tr", {}, h("td", { colspan: 8 }, "No plugin yet."))),
      ),
    ),
  );
  if (manage && listing.rollback_to.length) {
    sections.push(h("p", {}, h("button", { type: "button", id: "rollback", onclick: () => change("Roll back", "POST", tenantPath("/plugins/rollback")) }, `Roll back to ${short(listing.rollback_to[0])}`)));
  }
  if (listing.last_canary_rollback) {
    const r = listing.last_canary_rollback;
    sections.push(h("p", { class: "warning" }, `Canary ${short(r.version)} was rolled back at ${time(r.at_ms)}: ${r.reason}`));
  }
  if (listing.canary) sections.push(canaryPanel(listing, sum, manage));
  if (shadow) sections.push(shadowPanel(shadow, manage));
  sections.push(h("div", { id: "try-panel" }));
  page.replaceChildren(...sections);
  return figures.interval_ms;
}

function uploadForm() {
  const input = h("input", { type: "file", accept: ".wasm,application/wasm" });
  const activate = h("input", { type: "checkbox", checked: true });
  activate.id = "upload-activate";
  const upload = async (file) => {
    if (!file) return say("Pick a .wasm file first", true);
    await change(`Upload ${file.name}`, "POST", tenantPath(`/plugins?activate=${activate.checked}`), file, (answer) => `Uploaded ${file.name}: version ${short(answer.version)}${answer.active ? ", active" : ""}`);
  };
  const zone = h(
    "form",
    {
      class: "drop",
      id: "upload",
      onsubmit: (event) => {
        event.preventDefault();
        upload(input.files[0]);
      },
      ondragover: (event) => {
        event.preventDefault();
        zone.classList.add("over");
      },
      ondragleave: () => zone.classList.remove("over"),
      ondrop: (event) => {
        event.preventDefault();
        zone.classList.remove("over");
        upload(event.dataTransfer.files[0]);
      },
    },
    h("h2", {}, "Upload a version"),
    h("p", {}, "Pick a component (.wasm) or drop it here."),
    field("Component", input),
    h("div", { class: "check" }, activate, h("label", { for: activate.id }, "Activate it now")),
    h("button", { type: "submit" }, "Upload"),
  );
  return zone;
}

function canaryPanel(listing, sum, manage) {
  const canary = listing.canary;
  const rate = (version) => {
    const calls = sum(version, "calls");
    return calls ? `${((100 * sum(version, "failures")) / calls).toFixed(1)} %` : "—";
  };
  const percent = h("input", { type: "number", min: 1, max: 99, value: canary.percent });
  const row = (label, version) =>
    h("tr", {}, h("th", { scope: "row" }, label), h("td", {}, h("code", {}, short(version))), h("td", { class: "num" }, sum(version, "calls")), h("td", { class: "num" }, sum(version, "failures")), h("td", { class: "num" }, rate(version)));
  return h(
    "section",
    { class: "panel", id: "canary" },
    h("h2", {}, `Canary: ${short(canary.version)} serves ${canary.percent} % of users`),
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, ["", "Version", "Calls", "Failures", "Failure rate"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, row("Canary", canary.version), listing.active && row("Active", listing.active)),
    ),
    manage &&
      h(
        "form",
        {
          class: "inline",
          onsubmit: (event) => {
            event.preventDefault();
            change(`Canary at ${percent.value} %`, "POST", tenantPath(`/plugins/${canary.version}/canary`), { percent: Number(percent.value) });
          },
        },
        field("Share of users (%)", percent),
        h("button", { type: "submit" }, "Set share"),
        h("button", { type: "button", onclick: () => change(`Promote ${short(canary.version)}`, "POST", tenantPath(`/plugins/${canary.version}/activate`)) }, "Promote"),
        h("button", { type: "button", class: "danger", onclick: () => change("End the canary", "DELETE", tenantPath("/plugins/canary")) }, "End canary"),
      ),
  );
}

function shadowPanel(shadow, manage) {
  const counts = Object.entries(shadow.calls).map(([hook, outcomes]) =>
    h("li", {}, `${hook}: ${Object.entries(outcomes).map(([k, v]) => `${k} ${v}`).join(", ")}`),
  );
  // A message's data is JSON text: shown as the JSON it holds.
  const unwrap = (value) => {
    if (value && typeof value.data === "string") {
      try {
        return { ...value, data: JSON.parse(value.data) };
      } catch {
        return value;
      }
    }
    return value;
  };
  const decision = (d) => h("pre", {}, JSON.stringify(unwrap(d), null, 2));
  return h(
    "section",
    { class: "panel", id: "shadow" },
    h("h2", {}, `Shadow: ${short(shadow.version)} (on node ${shadow.node})`),
    h("ul", {}, counts.length ? counts : h("li", {}, "No call compared yet.")),
    h("h3", {}, `Where it differs (${shadow.samples.length} latest)`),
    shadow.samples.length
      ? h(
          "div",
          { class: "samples" },
          shadow.samples
            .slice()
            .reverse()
            .map((sample) =>
              h(
                "article",
                { class: "sample" },
                h("header", {}, `${time(sample.at_ms)} · ${sample.hook} · ${sample.kind}`),
                h("div", { class: "side-by-side" }, h("div", {}, h("h4", {}, "Input"), decision(sample.input)), h("div", {}, h("h4", {}, "Active"), decision(sample.active)), h("div", {}, h("h4", {}, "Shadow"), decision(sample.shadow))),
              ),
            ),
        )
      : h("p", {}, "No difference yet."),
    manage && h("button", { type: "button", class: "danger", onclick: () => change("End the shadow", "DELETE", tenantPath("/plugins/shadow")) }, "End shadow"),
  );
}

function canaryPrompt(version) {
  const answer = prompt(`Share of users for ${short(version)} (1–99 %)`, "10");
  if (answer === null) return;
  change(`Canary ${short(version)} at ${answer} %`, "POST", tenantPath(`/plugins/${version}/canary`), { percent: Number(answer) });
}

function showTry(version) {
  const panel = document.getElementById("try-panel");
  const hooks = version.hooks;
  const hook = h("select", {}, hooks.map((name) => h("option", { value: name }, name)));
  const data = h("textarea", { rows: 4 }, '{"text": "hello"}');
  const target = h("input", { placeholder: "topic, or users a,b (empty: broadcast)" });
  const recipients = h("input", { value: "ann:lang=en" });
  const request = h("input", { value: `/ws/${state.tenant}?user=ann` });
  const headers = h("textarea", { rows: 2 }, "");
  const result = h("div", { id: "try-result" });
  const show = () => {
    for (const [element, hooksOf] of [[data, ["on-publish", "on-deliver"]], [target, ["on-publish"]], [recipients, ["on-deliver"]], [request, ["authenticate"]], [headers, ["authenticate"]]]) {
      element.closest(".field").hidden = !hooksOf.includes(hook.value);
    }
  };
  hook.addEventListener("change", show);
  const run = async (event) => {
    event.preventDefault();
    let body;
    try {
      if (hook.value === "authenticate") {
        const headerMap = Object.fromEntries(
          headers.value.split("\n").filter((line) => line.includes(":")).map((line) => [line.slice(0, line.indexOf(":")).trim(), line.slice(line.indexOf(":") + 1).trim()]),
        );
        body = { hook: "authenticate", request: request.value, headers: headerMap };
      } else if (hook.value === "on-deliver") {
        body = {
          hook: "on-deliver",
          data: JSON.parse(data.value),
          recipients: recipients.value.split(/\s+/).filter(Boolean).map((entry) => {
            const [user, meta = ""] = entry.split(":");
            return { user, metadata: Object.fromEntries(meta.split(",").filter(Boolean).map((pair) => pair.split("="))) };
          }),
        };
      } else {
        body = { hook: "on-publish", data: JSON.parse(data.value) };
        const aim = target.value.trim();
        if (aim.startsWith("users ")) body.users = aim.slice(6).split(",").map((u) => u.trim());
        else if (aim) body.topic = aim;
      }
    } catch (error) {
      say(`Try: the data is not JSON (${error.message})`, true);
      return;
    }
    await act(`Try ${short(version.version)}`, async () => {
      const report = await api("POST", tenantPath(`/plugins/${version.version}/try`), body);
      result.replaceChildren(
        h("dl", { class: "report" }, h("dt", {}, "Verdict"), h("dd", { id: "try-verdict" }, report.outcome.verdict ?? report.outcome.failure ?? (Array.isArray(report.outcome) ? "per recipient" : "—")), h("dt", {}, "First call"), h("dd", {}, `${number(report.first_call_ms, 2)} ms`), h("dt", {}, "Warm call"), h("dd", {}, `${number(report.warm_call_us, 0)} µs`), h("dt", {}, "Memory"), h("dd", {}, `${(report.memory_bytes / 1024).toFixed(0)} KiB`)),
        h("pre", { id: "try-output" }, JSON.stringify(report.outcome, null, 2)),
      );
      return `Tried ${short(version.version)} on ${body.hook}: ${report.outcome.verdict ?? report.outcome.failure ?? "done"}`;
    });
  };
  panel.replaceChildren(
    h(
      "section",
      { class: "panel" },
      h("h2", {}, `Try ${short(version.version)} in this node's sandbox`),
      h("form", { onsubmit: run }, field("Hook", hook), field("Message data (JSON)", data), field("Target", target), field("Recipients (user:key=value …)", recipients), field("Handshake path and query", request), field("Headers (name: value, one a line)", headers), h("button", { type: "submit" }, "Run")),
      result,
    ),
  );
  show();
  hook.focus();
}

async function connections(page) {
  const user = h("input", { required: true, autocomplete: "off" });
  const result = h("div", { id: "presence" });
  const lookUp = async (event) => {
    event?.preventDefault();
    const name = user.value.trim();
    await act(`Look up ${name}`, async () => {
      const answer = await api("POST", tenantPath("/presence"), { users: [name] });
      const presence = answer.users[name];
      result.replaceChildren(
        h("h2", {}, `${name}: ${presence.count} connection${presence.count === 1 ? "" : "s"} (owner node ${presence.owner})`),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, ["Node", "Connection", "Opened", ""].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              presence.connections.map((c) =>
                h("tr", {}, h("td", {}, c.node), h("td", {}, c.id), h("td", {}, time(c.opened_at_ms)), h("td", {}, canManage() && h("button", { type: "button", class: "danger", onclick: () => disconnect(name, { node: c.node, id: c.id }).then(() => lookUp()) }, "Disconnect"))),
              ),
            ),
          ),
        ),
        canManage() && presence.count > 0 && h("button", { type: "button", class: "danger", onclick: () => disconnect(name).then(() => lookUp()) }, `Disconnect every connection of ${name}`),
      );
      return `${name}: ${presence.count} connection(s)`;
    });
  };
  page.replaceChildren(
    h("h1", {}, `${state.tenant}: connections`),
    h("form", { class: "inline", onsubmit: lookUp }, field("User id", user), h("button", { type: "submit" }, "Look up")),
    result,
  );
  return null;
}

function disconnect(user, connection) {
  const body = connection ? { user, connection } : { user };
  return act(`Disconnect ${user}`, async () => {
    await api("POST", tenantPath("/disconnect"), body);
    return connection ? `Closed ${user}'s connection ${connection.id} on ${connection.node}` : `Closed every connection of ${user}`;
  });
}

async function audit(page) {
  const answer = await api("GET", `/admin/v1/audit?tenant=${encodeURIComponent(state.tenant)}&limit=200`);
  page.replaceChildren(
    h("h1", {}, `${state.tenant}: audit trail`),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "audit" },
        h("caption", {}, "Newest first"),
        h("thead", {}, h("tr", {}, ["When", "Key", "From", "Route", "Change", "Outcome"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          answer.entries.map((entry) =>
            h(
              "tr",
              {},
              h("td", {}, time(entry.at_ms)),
              h("td", { class: "key-name" }, entry.key_name),
              h("td", {}, entry.address),
              h("td", {}, h("code", {}, entry.route)),
              h("td", { class: "change" }, entry.change?.action ?? "", entry.change?.version ? ` ${short(entry.change.version)}` : ""),
              h("td", { class: `outcome ${entry.outcome}` }, entry.outcome, entry.error ? `: ${entry.error}` : ""),
            ),
          ),
        ),
      ),
    ),
  );
  return 10_000;
}

async function keys(page) {
  const tenant = await api("GET", tenantPath());
  const sections = [h("h1", {}, `${state.tenant}: keys`)];
  const pushKeys = h("textarea", { rows: 3, placeholder: "one key a line", autocomplete: "off" });
  sections.push(
    h(
      "section",
      { class: "panel" },
      h("h2", {}, "Push keys"),
      h("p", {}, "What business services push with. Shown by fingerprint only:"),
      h("ul", { id: "push-keys" }, tenant.push_keys.map((fingerprint) => h("li", {}, h("code", {}, fingerprint)))),
      canManage() &&
        h(
          "form",
          {
            onsubmit: (event) => {
              event.preventDefault();
              const list = pushKeys.value.split("\n").map((k) => k.trim()).filter(Boolean);
              change("Replace the push keys", "PUT", tenantPath("/push-keys"), { push_keys: list }, () => `Push keys replaced: ${list.length} key(s)`).then(() => (pushKeys.value = ""));
            },
          },
          field("New push keys (they replace every current one)", pushKeys),
          h("button", { type: "submit" }, "Replace push keys"),
        ),
    ),
  );
  if (isOperator()) {
    const list = await api("GET", "/admin/v1/keys");
    const name = h("input", { required: true, autocomplete: "off" });
    const role = h("select", {}, ["tenant-admin", "viewer", "operator"].map((r) => h("option", { value: r }, r)));
    const made = h("div", { id: "made-key" });
    sections.push(
      h(
        "section",
        { class: "panel" },
        h("h2", {}, "Admin keys"),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { id: "admin-keys" },
            h("thead", {}, h("tr", {}, ["Name", "Role", "Tenant", "Made", "Last used", ""].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              list.keys.map((key) =>
                h("tr", {}, h("td", {}, key.name), h("td", {}, key.role), h("td", {}, key.tenant ?? "every"), h("td", {}, time(key.created_at_ms)), h("td", {}, time(key.last_used_ms)), h("td", {}, h("button", { type: "button", class: "danger", onclick: () => confirm(`Revoke ${key.name}?`) && change(`Revoke ${key.name}`, "DELETE", `/admin/v1/keys/${key.id}`) }, "Revoke"))),
              ),
            ),
          ),
        ),
        h(
          "form",
          {
            class: "inline",
            onsubmit: async (event) => {
              event.preventDefault();
              const body = { name: name.value, role: role.value };
              if (role.value !== "operator") body.tenant = state.tenant;
              await act(`Make key ${name.value}`, async () => {
                const key = await api("POST", "/admin/v1/keys", body);
                made.replaceChildren(h("p", { class: "warning" }, "Copy it now, it is not shown again: ", h("code", { id: "new-key" }, key.key)));
                return `Made ${key.role} key ${key.name}`;
              });
            },
          },
          field("Name", name),
          field(`Role (tenant-admin and viewer keys are ${state.tenant}'s)`, role),
          h("button", { type: "submit" }, "Make key"),
        ),
        made,
      ),
    );
  }
  page.replaceChildren(...sections);
  return null;
}

const PAGES = { overview, plugins, connections, audit, keys };

/** Makes a change through the admin API, shows the page again, then says
 * how it went (so that what it says is on the page). */
async function change(what, method, path, body, describe) {
  let message;
  try {
    const answer = await api(method, path, body);
    message = describe ? describe(answer) : `${what}: done`;
  } catch (error) {
    say(`${what} failed: ${error.message}`, true);
    if (error.status === 401) signOut();
    return false;
  }
  await show({ keepStatus: true });
  say(message);
  return true;
}

// ---------------------------------------------------------------- frame

async function show({ keepStatus = false } = {}) {
  clearTimeout(state.refresh);
  const page = document.getElementById("page");
  for (const link of document.querySelectorAll("#tabs a")) {
    if (link.dataset.tab === state.tab) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    const every = await PAGES[state.tab](page);
    if (!keepStatus && document.getElementById("status").classList.contains("error")) say("");
    // Pages with figures follow them; a form being filled is left alone.
    if (every && !page.contains(document.activeElement) && !document.getElementById("try-result")?.childElementCount) {
      state.refresh = setTimeout(() => show({ keepStatus: true }), Math.max(every, 2000));
    }
  } catch (error) {
    page.replaceChildren(h("h1", {}, state.tenant), h("p", { class: "error" }, `This page could not be shown: ${error.message}`));
    say(error.message, true);
    if (error.status === 401) signOut();
  }
}

function route() {
  const [tenant, tab] = location.hash.slice(1).split("/");
  if (state.who) {
    state.tenant = state.who.tenants.includes(decodeURIComponent(tenant ?? "")) ? decodeURIComponent(tenant) : state.tenant ?? state.who.tenants[0];
    state.tab = TABS.includes(tab) ? tab : TABS.includes(tenant) ? tenant : state.tab;
    document.getElementById("tenant").value = state.tenant;
    for (const link of document.querySelectorAll("#tabs a")) {
      link.href = `#${encodeURIComponent(state.tenant)}/${link.dataset.tab}`;
    }
    if (!state.tenant) {
      document.getElementById("page").replaceChildren(h("p", {}, "No tenant to show."));
      return;
    }
    show();
  }
}

async function signIn(key) {
  state.key = key;
  try {
    state.who = await api("GET", "/admin/v1/whoami");
  } catch (error) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    say(`Sign-in failed: ${error.message}`, true);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  document.getElementById("sign-in").hidden = true;
  for (const id of ["tabs", "tenant-pick", "sign-out"]) document.getElementById(id).hidden = false;
  document.getElementById("who").textContent = `${state.who.key_name} · ${state.who.role}${state.who.tenant ? ` of ${state.who.tenant}` : ""}`;
  const select = document.getElementById("tenant");
  select.replaceChildren(...state.who.tenants.map((name) => h("option", { value: name }, name)));
  say(`Signed in as ${state.who.key_name}`);
  route();
}

function signOut() {
  clearTimeout(state.refresh);
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  state.who = null;
  document.getElementById("sign-in").hidden = false;
  for (const id of ["tabs", "tenant-pick", "sign-out"]) document.getElementById(id).hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("page").replaceChildren();
  document.getElementById("key").focus();
}

document.getElementById("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("key");
  signIn(input.value.trim());
  input.value = "";
});
document.getElementById("sign-out").addEventListener("click", () => {
  signOut();
  say("Signed out");
});
document.getElementById("tenant").addEventListener("change", (event) => {
  location.hash = `#${encodeURIComponent(event.target.value)}/${state.tab}`;
});
window.addEventListener("hashchange", route);
if (state.key) signIn(state.key);
