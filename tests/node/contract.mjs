// The openai npm client against a live Iris: IRIS_BASE_URL, IRIS_API_KEY, IRIS_IMAGE_URL.
// Prints one JSON line of results; exits non-zero on the first broken expectation.
import OpenAI from "openai";
import assert from "node:assert/strict";

const baseURL = process.env.IRIS_BASE_URL;
const apiKey = process.env.IRIS_API_KEY;
const image = process.env.IRIS_IMAGE_URL;
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
const messages = [{ role: "user", content: [
  { type: "image_url", image_url: { url: image } },
  { type: "text", text: "Describe the image." },
] }];
const model = "demo-vlm";
const out = {};

const resp = await client.chat.completions.create({ model, messages, max_tokens: 3 });
assert.equal(resp.object, "chat.completion");
assert.ok(resp.usage.prompt_tokens > 0);
out.non_stream_tokens = resp.usage.completion_tokens;

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 3, stream: true, stream_options: { include_usage: true },
});
let chunks = 0;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
}
assert.ok(chunks >= 2);
assert.ok(usage.completion_tokens >= 1 && usage.completion_tokens <= 3);
out.stream_chunks = chunks;

const models = await client.models.list();
out.models = models.data.map((m) => m.id);  // checked by the test, which knows the app's config

async function expectError(promise, cls, status) {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${err.constructor.name}`);
    assert.equal(err.status, status);
    return err;
  }
  assert.fail(`expected ${cls.name}`);
}

const bad = await expectError(client.chat.completions.create({ model, messages: [
  { role: "user", content: [{ type: "image_url", image_url: { url: "file:///etc/passwd" } }] },
] }), OpenAI.BadRequestError, 400);
assert.equal(bad.param, "messages[0].content[0].image_url.url");
await expectError(client.chat.completions.create({ model: "nope", messages }),
  OpenAI.NotFoundError, 404);
const anon = new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 });
await expectError(anon.models.list(), OpenAI.AuthenticationError, 401);
out.errors = "ok";
console.log(JSON.stringify(out));
