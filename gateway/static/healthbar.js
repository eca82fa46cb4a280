// <gateway-healthbar>: a user's quota from polar-gateway, one bar per metered meter.
//
//   <script type="module" src="https://gateway.example.com/static/healthbar.js"></script>
//   <gateway-healthbar gateway="https://gateway.example.com" token="pgs_..." refresh="60"></gateway-healthbar>
//
// `token` is a status token (POST /admin/status-tokens): it reads the status and opens the billing
// portal, and can spend nothing. When it expires the widget says so and fires `healthbar-expired`;
// set a fresh `token` attribute to carry on. No dependencies; everything lives in a shadow root.

const STYLE = `
:host { display: block; font: 14px/1.4 system-ui, sans-serif; color: var(--healthbar-text, #1f2328);
  --ok: var(--healthbar-ok, #1a7f37); --warning: var(--healthbar-warning, #bf8700);
  --critical: var(--healthbar-critical, #d1242f); --exceeded: var(--healthbar-exceeded, #82071e); }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 12px 16px; background: var(--healthbar-bg, #fff); }
header { display: flex; align-items: center; justify-content: space-between; gap: 8px; margin-bottom: 8px; }
.badge { font-weight: 600; text-transform: uppercase; font-size: 12px; padding: 2px 8px; border-radius: 10px; color: #fff; }
.badge[data-status="ok"] { background: var(--ok); }
.badge[data-status="warning"] { background: var(--warning); }
.badge[data-status="critical"] { background: var(--critical); }
.badge[data-status="exceeded"] { background: var(--exceeded); }
.meter { margin: 8px 0; }
.label { display: flex; justify-content: space-between; font-size: 13px; }
.track { height: 8px; border-radius: 4px; background: #eaeef2; overflow: hidden; margin-top: 2px; }
.fill { height: 100%; border-radius: 4px; background: var(--ok); }
.fill[data-status="warning"] { background: var(--warning); }
.fill[data-status="critical"] { background: var(--critical); }
.fill[data-status="exceeded"] { background: var(--exceeded); }
.period, .empty { color: #57606a; font-size: 12px; }
.message { margin: 8px 0 0; color: var(--critical); }
.message:empty { display: none; }
button { margin-top: 8px; font: inherit; padding: 4px 12px; border-radius: 6px; border: 1px solid #d0d7de;
  background: #f6f8fa; cursor: pointer; }
button:disabled { cursor: default; opacity: 0.6; }
`;

const EXPIRED = "This usage link has expired. Reload the page to see your current usage.";
const UNAVAILABLE = "Usage is unavailable right now; retrying.";

function meterLabel(name) {
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

class GatewayHealthbar extends HTMLElement {
  static get observedAttributes() {
    return ["gateway", "token", "refresh"];
  }

  constructor() {
    super();
    this._root = this.attachShadow({ mode: "open" });
    this._timer = null;
    this._expired = false;
    this._loads = 0; // refreshes begun: an answer to an older one (an earlier token) is dropped
    this._root.append(el("style", {}, STYLE));
    const card = el("div", { class: "card", part: "card" });
    this._header = el("header");
    this._badge = el("span", { class: "badge", part: "status", "data-status": "ok" }, "…");
    this._period = el("span", { class: "period", part: "period" });
    this._header.append(this._badge, this._period);
    this._meters = el("div", { class: "meters", part: "meters" });
    this._message = el("p", { class: "message", part: "message", role: "status" });
    this._button = el("button", { type: "button", part: "portal" }, "Manage billing");
    this._button.addEventListener("click", () => this.openPortal());
    card.append(this._header, this._meters, this._message, this._button);
    this._root.append(card);
  }

  connectedCallback() {
    this.refresh();
  }

  disconnectedCallback() {
    this._stop();
  }

  attributeChangedCallback(name, oldValue, newValue) {
    if (oldValue === newValue || !this.isConnected) return;
    if (name === "token") this._expired = false;
    this.refresh();
  }

  get _base() {
    return (this.getAttribute("gateway") || "").replace(/\/+$/, "");
  }

  get _interval() {
    const seconds = Number(this.getAttribute("refresh") || 60);
    return Math.max(1, Number.isFinite(seconds) ? seconds : 60) * 1000;
  }

  _stop() {
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
  }

  /** The JSON of `path`; null on a 401 (the widget expires) or once a newer refresh than `load` began. */
  async _get(path, load) {
    const response = await fetch(this._base + path, {
      headers: { authorization: "Bearer " + (this.getAttribute("token") || "") },
      credentials: "omit",
      cache: "no-store",
    });
    if (load !== undefined && load !== this._loads) return null;
    if (response.status === 401) {
      this._expire();
      return null;
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const reason = body && body.error && body.error.message;
      throw new Error(reason || "HTTP " + response.status);
    }
    return body;
  }

  _expire() {
    this._stop();
    this._expired = true;
    this._message.textContent = EXPIRED;
    this._button.disabled = true;
    this.dispatchEvent(new CustomEvent("healthbar-expired", { bubbles: true, composed: true }));
  }

  /** Load the status now, then again every `refresh` seconds (until the token expires). */
  async refresh() {
    this._stop();
    const load = ++this._loads;
    if (this._expired) return;
    try {
      const status = await this._get("/api/billing/status", load);
      if (status === null || load !== this._loads) return;
      this._render(status);
      this._message.textContent = "";
      this._button.disabled = false;
    } catch (error) {
      if (load !== this._loads) return; // a newer refresh owns the message and the timer
      this._message.textContent = UNAVAILABLE;
    }
    if (!this._expired && this.isConnected) this._timer = setTimeout(() => this.refresh(), this._interval);
  }

  _render(status) {
    this._badge.dataset.status = status.status;
    this._badge.textContent = status.status;
    const end = status.period && status.period.end ? new Date(status.period.end) : null;
    this._period.textContent = end ? "Resets " + end.toLocaleString() : "";
    const metered = (status.meters || []).filter((m) => m.credited !== null);
    const rows = metered.map((m) => {
      const pct = Math.max(0, Math.min(100, m.percentUsed || 0));
      const row = el("div", { class: "meter", part: "meter", "data-meter": m.name, "data-status": m.status });
      const label = el("div", { class: "label" });
      label.append(
        el("span", {}, meterLabel(m.name)),
        el("span", { class: "amount" }, `${m.consumed.toLocaleString()} / ${m.credited.toLocaleString()} (${m.percentUsed}%)`),
      );
      const track = el("div", { class: "track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100" });
      track.setAttribute("aria-valuenow", String(pct));
      track.setAttribute("aria-label", meterLabel(m.name));
      const fill = el("div", { class: "fill", part: "bar", "data-status": m.status });
      fill.style.width = pct + "%";
      track.append(fill);
      row.append(label, track);
      return row;
    });
    if (rows.length === 0) rows.push(el("p", { class: "empty" }, "No metered usage on this plan."));
    this._meters.replaceChildren(...rows);
  }

  /** Open the billing portal (Polar) for this user in a new tab, or here when popups are blocked. */
  async openPortal() {
    this._button.disabled = true;
    try {
      const here = window.location.href;
      const query = /^https?:/.test(here) ? "?return_url=" + encodeURIComponent(here) : "";
      const portal = await this._get("/api/billing/portal" + query);
      if (portal === null) return;
      const opened = window.open(portal.url, "_blank");
      if (opened) opened.opener = null;
      else window.location.assign(portal.url);
    } catch (error) {
      this._message.textContent = "Billing is unavailable right now: " + error.message;
    } finally {
      if (!this._expired) this._button.disabled = false;
    }
  }
}

if (!customElements.get("gateway-healthbar")) customElements.define("gateway-healthbar", GatewayHealthbar);
