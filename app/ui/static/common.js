// Helpers both dashboard pages use. API data only ever reaches the page as textContent.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// An element with attributes and children (strings become text nodes, never markup).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// An API call: the JSON body, or an Error holding the problem+json detail.
async function api(path, options) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = body && typeof body === "object" ? body.detail || body.title : body;
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

function fmtPercent(fraction) {
  return typeof fraction === "number" ? `${(100 * fraction).toFixed(2)} %` : "–";
}

function fmtNumber(value, digits) {
  if (typeof value !== "number") return "–";
  return value.toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 2 : digits });
}

function fmtBytes(bytes) {
  if (typeof bytes !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function badge(status) {
  return el("span", { className: `badge ${status}` }, status);
}

function showError(node, error) {
  node.textContent = error instanceof Error ? error.message : String(error);
  node.hidden = false;
}
