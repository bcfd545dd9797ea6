// The Vercel AI SDK (`ai` + `@ai-sdk/openai` + `@ai-sdk/openai-compatible`), unmodified, against
// a live Iris. Env: IRIS_BASE_URL (…/v1), IRIS_API_KEY, IRIS_MODEL (default demo-vlm),
// IRIS_IMAGE_DATA (a data: URI), IRIS_IMAGE_HTTP (an http URL Iris can fetch), IRIS_IMAGE_S3
// (an s3:// URL). Runs every case, prints one JSON line of results (a field per case), and if
// any case broke, prints why on stderr (with the request body and Iris's answer, for API errors)
// and exits non-zero.
//
// How the SDK sends images (read in node_modules, versions pinned in package.json):
// - `openai(model)` is the Responses model (POST /responses): an image part becomes
//   {type: "input_image", image_url: <the URL, or a data: URI for bytes>}; its supportedUrls are
//   http(s) only, so http URLs go to Iris as URLs, and `ai` tries to download anything else
//   itself (s3:// is refused client-side: "URL scheme must be http, https, or data").
// - `openai.chat(model)`: {type: "image_url", image_url: {url}}, same supportedUrls; streaming
//   always sends stream_options.include_usage.
// - `createOpenAICompatible`: {type: "image_url", image_url: {url}}; supportedUrls is a *function*
//   returning {mediaType: RegExp[]} and defaults to {}, so without it `ai` downloads every URL
//   itself (and refuses loopback/private hosts); stream_options only with `includeUsage: true`.
import assert from "node:assert/strict";
import { generateText, streamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";

const baseURL = process.env.IRIS_BASE_URL;
const apiKey = process.env.IRIS_API_KEY;
const model = process.env.IRIS_MODEL || "demo-vlm";
const images = {
  data: process.env.IRIS_IMAGE_DATA,
  http: process.env.IRIS_IMAGE_HTTP,
  s3: process.env.IRIS_IMAGE_S3,
};
for (const [name, value] of Object.entries({ baseURL, apiKey, ...images })) {
  assert.ok(value, `missing setting ${name}`);
}
const MAX_OUTPUT_TOKENS = 6;
const MIN_INPUT_TOKENS = 30;
// The same prompt without its image, measured first: every case with the image must cost more
// (the text alone is ~32 tokens with the demo model's chat template, so "> 30" proves nothing).
let textOnlyTokens = null;

const openai = createOpenAI({ baseURL, apiKey });
const compat = createOpenAICompatible({
  name: "iris",
  baseURL,
  apiKey,
  includeUsage: true,
  supportedUrls: () => ({ "image/*": [/^s3:\/\//, /^https?:\/\//] }),
});
// The provider's defaults: no supportedUrls (the SDK downloads URLs itself), no include_usage.
const compatDefault = createOpenAICompatible({ name: "iris-default", baseURL, apiKey });

const messages = (image) => [{
  role: "user",
  content: [
    { type: "text", text: "Describe the image." },
    { type: "image", image },
  ],
}];
const common = { maxOutputTokens: MAX_OUTPUT_TOKENS, maxRetries: 0, timeout: 120_000 };

// The image part of the request body the SDK sent (the URL cut short), to show what went out.
function sentImage(body) {
  const parsed = typeof body === "string" ? JSON.parse(body) : body;
  const msgs = parsed?.input ?? parsed?.messages ?? [];
  for (const m of msgs) {
    for (const part of Array.isArray(m.content) ? m.content : []) {
      if (part.type === "input_image" || part.type === "image_url") {
        const url = typeof part.image_url === "string" ? part.image_url : part.image_url?.url;
        return { type: part.type, url: url?.startsWith("data:") ? url.slice(0, 32) : url };
      }
    }
  }
  return null;
}

function checkUsage(usage, expectUsage) {
  if (!expectUsage) return;
  assert.ok(usage.inputTokens > Math.max(MIN_INPUT_TOKENS, textOnlyTokens),
    `inputTokens ${usage.inputTokens}, without the image ${textOnlyTokens}: ` +
    "did the image reach the model?");
  assert.ok(usage.outputTokens >= 1 && usage.outputTokens <= MAX_OUTPUT_TOKENS,
    `outputTokens ${usage.outputTokens}`);
}

async function generate(lm, image) {
  const res = await generateText({ model: lm, messages: messages(image), ...common });
  assert.ok(res.finishReason && res.finishReason !== "error", `finishReason ${res.finishReason}`);
  assert.equal(typeof res.text, "string");
  checkUsage(res.usage, true);
  return {
    ok: true,
    input_tokens: res.usage.inputTokens,
    output_tokens: res.usage.outputTokens,
    finish_reason: res.finishReason,
    sent: sentImage(res.request.body),
  };
}

// The text one raw stream chunk carries: a chat completion chunk's delta or a Responses event's.
function rawText(raw) {
  if (raw?.type === "response.output_text.delta") return raw.delta ?? "";
  return (raw?.choices ?? []).map((c) => c?.delta?.content ?? "").join("");
}

async function stream(lm, image, { expectUsage = true } = {}) {
  // Errors come as "error" parts of fullStream (thrown below); without onError the SDK would also
  // log each one to the console.
  // Raw chunks show what Iris sent, so the test can tell "the model said nothing" (a random
  // model may end at once) from "Iris sent text the SDK did not take".
  const res = streamText({
    model: lm, messages: messages(image), ...common, includeRawChunks: true, onError: () => {},
  });
  let deltas = 0;
  let text = "";
  let sentText = "";
  let finish = null;
  for await (const part of res.fullStream) {
    if (part.type === "error") throw part.error;
    if (part.type === "raw") sentText += rawText(part.rawValue);
    if (part.type === "text-delta") { deltas += 1; text += part.text; }
    if (part.type === "finish") finish = part;
  }
  assert.ok(finish, "the stream ended without a finish part");
  assert.ok(finish.finishReason && finish.finishReason !== "error",
    `finishReason ${finish.finishReason}`);
  checkUsage(finish.totalUsage, expectUsage);
  const request = await res.request;
  return {
    ok: true,
    text_deltas: deltas,
    text,
    sent_text: sentText,
    input_tokens: finish.totalUsage.inputTokens ?? null,
    output_tokens: finish.totalUsage.outputTokens ?? null,
    finish_reason: finish.finishReason,
    sent: sentImage(request.body),
  };
}

// What the SDK does client-side, before any request: the error it raises.
async function refusedClientSide(lm, image) {
  try {
    await generateText({ model: lm, messages: messages(image), ...common });
  } catch (err) {
    assert.equal(err.statusCode, undefined, `Iris answered ${err.statusCode}: ${err.message}`);
    return { refused: true, error: `${err.name}: ${err.message}` };
  }
  return { refused: false };
}

async function textOnly() {
  const res = await generateText({
    model: openai.chat(model), messages: [{ role: "user", content: "Describe the image." }],
    ...common,
  });
  assert.ok(res.usage.inputTokens > 0);
  textOnlyTokens = res.usage.inputTokens;
  return { ok: true, input_tokens: textOnlyTokens };
}

const cases = {
  text_only: textOnly,
  responses_generate_data: () => generate(openai(model), images.data),
  responses_generate_http: () => generate(openai(model), images.http),
  responses_stream_data: () => stream(openai(model), images.data),
  responses_stream_http: () => stream(openai(model), images.http),
  chat_generate_data: () => generate(openai.chat(model), images.data),
  chat_generate_http: () => generate(openai.chat(model), images.http),
  chat_stream_data: () => stream(openai.chat(model), images.data),
  chat_stream_http: () => stream(openai.chat(model), images.http),
  compat_generate_s3: () => generate(compat(model), images.s3),
  compat_stream_s3: () => stream(compat(model), images.s3),
  compat_generate_http: () => generate(compat(model), images.http),
  compat_stream_data: () => stream(compat(model), images.data),
  // Without includeUsage the SDK sends no stream_options: Iris owes no usage, just a clean end.
  compat_default_stream_data: () => stream(compatDefault(model), images.data, { expectUsage: false }),
  // Facts about the SDK itself (no request reaches Iris):
  openai_s3_client_side: () => refusedClientSide(openai(model), images.s3),
  compat_default_http_client_side: () => refusedClientSide(compatDefault(model), images.http),
};

function describe(err) {
  const lines = [`${err?.name ?? "Error"}: ${err?.message ?? err}`];
  if (err?.url) lines.push(`url: ${err.url}`);
  if (err?.statusCode) lines.push(`status: ${err.statusCode}`);
  if (err?.requestBodyValues) {
    const body = JSON.stringify(err.requestBodyValues, (k, v) =>
      typeof v === "string" && v.startsWith("data:") ? `${v.slice(0, 40)}…` : v);
    lines.push(`request body: ${body}`);
  }
  if (err?.responseBody) lines.push(`response body: ${err.responseBody}`);
  if (err?.cause) lines.push(`cause: ${err.cause?.message ?? err.cause}`);
  return lines.join("\n");
}

const out = {};
const failures = [];
for (const [name, run] of Object.entries(cases)) {
  try {
    out[name] = await run();
  } catch (err) {
    out[name] = { ok: false, error: `${err?.name ?? "Error"}: ${err?.message ?? err}` };
    failures.push(`case ${name} failed:\n${describe(err)}`);
  }
}
console.log(JSON.stringify(out));
if (failures.length) {
  console.error(failures.join("\n\n"));
  process.exit(1);
}
