// Personalises each message per recipient, at delivery: the JavaScript
// twin of plugins/personalize (same configuration, same verdicts).
//
// A message whose data carries `"i18n": {"en": "...", "fr": "..."}` is
// delivered with `"text"` set to the recipient's language (session metadata
// `lang`, else the configuration `default_lang`, else `en`), and without
// the `i18n` map. A message with `"visible_to": ["admin", …]` is delivered
// only to recipients whose session metadata `role` is listed. Anything else
// passes as it is.
import { config } from "pushgate:plugin/host@0.1.1";

/** The value for `key` in a session's metadata (a list of pairs). */
const metadata = (session, key) => session.find(([name]) => name === key)?.[1];

export const onDeliver = {
  onDeliver(message, profiles, recipients) {
    const pass = () => recipients.map(() => ({ tag: "pass" }));
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return pass();
    }
    if (data === null || typeof data !== "object" || Array.isArray(data)) return pass();
    const visibleTo = Array.isArray(data.visible_to)
      ? data.visible_to.filter((role) => typeof role === "string")
      : undefined;
    const i18n =
      data.i18n !== null && typeof data.i18n === "object" && !Array.isArray(data.i18n)
        ? data.i18n
        : undefined;
    if (visibleTo === undefined && i18n === undefined) return pass();
    const defaultLang = config("default_lang") ?? "en";
    const { i18n: _, visible_to: __, ...rest } = data;
    return recipients.map((recipient) => {
      const session = profiles[recipient.profile] ?? [];
      if (visibleTo !== undefined && !visibleTo.includes(metadata(session, "role") ?? "")) {
        return { tag: "drop" };
      }
      if (i18n === undefined) return { tag: "pass" };
      const lang = metadata(session, "lang") ?? defaultLang;
      const text = i18n[lang] ?? i18n[defaultLang] ?? null;
      return { tag: "replace", val: JSON.stringify({ ...rest, text }) };
    });
  },
};
