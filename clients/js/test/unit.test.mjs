// Unit tests of the parts of the client that need no server.
import { test } from "node:test";
import assert from "node:assert/strict";
import { jwtExpiry } from "../dist/index.js";

test("reads a JWT's exp, and nothing from what is not a JWT", () => {
  const claims = Buffer.from(JSON.stringify({ sub: "ann", exp: 1700000000 })).toString("base64url");
  assert.equal(jwtExpiry(`e30.${claims}.sig`), 1700000000 * 1000);
  assert.equal(jwtExpiry("opaque-token"), undefined);
  assert.equal(jwtExpiry("a.!!!.c"), undefined);
});
