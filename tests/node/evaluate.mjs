// Evaluates flags with the OpenFeature Node server SDK and its OFREP provider, as a Node app
// using flagsvc would, and prints one JSON line per evaluation.
// Usage: node evaluate.mjs BASE_URL TOKEN APP CASES.json
// CASES.json: [{"key", "method": "boolean"|"string"|"number"|"object", "default", "context"}]
import { readFileSync } from "node:fs";
import { OpenFeature } from "@openfeature/server-sdk";
import { OFREPProvider } from "@openfeature/ofrep-provider";

const [baseUrl, token, app, casesPath] = process.argv.slice(2);
const cases = JSON.parse(readFileSync(casesPath, "utf8"));

// A request timeout: without one, a hung service hangs every evaluation.
const fetchWithTimeout = (request) => fetch(request, { signal: AbortSignal.timeout(2000) });

await OpenFeature.setProviderAndWait(
  new OFREPProvider({
    baseUrl,
    headers: { "X-API-Key": token, "X-Flagsvc-App": app },
    fetchImplementation: fetchWithTimeout,
  }),
);
const client = OpenFeature.getClient();
const methods = {
  boolean: (k, d, c) => client.getBooleanDetails(k, d, c),
  string: (k, d, c) => client.getStringDetails(k, d, c),
  number: (k, d, c) => client.getNumberDetails(k, d, c),
  object: (k, d, c) => client.getObjectDetails(k, d, c),
};
for (const { key, method, default: fallback, context } of cases) {
  const details = await methods[method](key, fallback, context);
  const { value, variant, reason, errorCode } = details;
  console.log(JSON.stringify({ key, value, variant: variant ?? null, reason, errorCode: errorCode ?? null }));
}
await OpenFeature.close();
