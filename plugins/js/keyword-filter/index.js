// Drops or masks messages that contain words from the tenant's plugin
// configuration, once per message at publish: the JavaScript twin of
// plugins/keyword-filter (same configuration, same verdicts).
//
// Configuration: `words` (comma-separated, matched ASCII-case-insensitively
// in every string of the message data), `mode` = `drop` (default) or
// `mask` (each matched word becomes `*`s).
import { config } from "pushgate:plugin/host@0.1.1";

/** ASCII lower case, as the Rust plugin does (lengths never change). */
const lower = (text) => text.replace(/[A-Z]/g, (c) => c.toLowerCase());

/** The configured words, lower-cased; empty entries dropped. */
function words() {
  return (config("words") ?? "")
    .split(",")
    .map((word) => lower(word.trim()))
    .filter((word) => word.length > 0);
}

/** `text` with every occurrence of `word` masked, and whether any was. */
function mask(text, word) {
  const haystack = lower(text);
  let out = "";
  let rest = 0;
  let found = false;
  for (let at = haystack.indexOf(word, rest); at !== -1; at = haystack.indexOf(word, rest)) {
    out += text.slice(rest, at) + "*".repeat([...word].length);
    rest = at + word.length;
    found = true;
  }
  return [out + text.slice(rest), found];
}

/** Masks `list` in every string of `value` (not in keys); whether any was found. */
function maskValue(value, list) {
  if (typeof value === "string") {
    let text = value;
    let found = false;
    for (const word of list) {
      const [masked, hit] = mask(text, word);
      text = masked;
      found ||= hit;
    }
    return [text, found];
  }
  if (Array.isArray(value)) {
    let found = false;
    const items = value.map((item) => {
      const [masked, hit] = maskValue(item, list);
      found ||= hit;
      return masked;
    });
    return [items, found];
  }
  if (value !== null && typeof value === "object") {
    let found = false;
    const fields = {};
    for (const [key, item] of Object.entries(value)) {
      const [masked, hit] = maskValue(item, list);
      found ||= hit;
      fields[key] = masked;
    }
    return [fields, found];
  }
  return [value, false];
}

export const onPublish = {
  onPublish(message) {
    const list = words();
    if (list.length === 0) return { tag: "pass" };
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return { tag: "pass" };
    }
    const [masked, found] = maskValue(data, list);
    if (!found) return { tag: "pass" };
    if (config("mode") === "mask") return { tag: "replace", val: JSON.stringify(masked) };
    return { tag: "drop", val: "message contains a blocked word" };
  },
};
