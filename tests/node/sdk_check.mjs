// The openai Node SDK against a running proxy. Each check's facts go out as one JSON object on
// stdout; tests/test_node_sdk.py judges them. The client reads OPENAI_BASE_URL and
// OPENAI_API_KEY as any Node user's would; EDIT_IMAGE names a PNG file to edit.
import { readFile } from "node:fs/promises";
import OpenAI, { APIError, toFile } from "openai";

const MODEL = "gpt-image-2-vip";
// No retries: each check sees the proxy's first answer.
const client = new OpenAI({ maxRetries: 0, timeout: 60_000 });

function imageFacts(result) {
  const b64 = result.data?.[0]?.b64_json ?? "";
  const png = Buffer.from(b64, "base64");
  return {
    created: result.created ?? null,
    images: result.data?.length ?? 0,
    data_prefix: b64.startsWith("data:"),
    magic: png.subarray(0, 8).toString("hex"),
    bytes: png.length,
  };
}

function errorFacts(error) {
  if (error instanceof APIError) {
    return {
      error: error.constructor.name,
      status: error.status ?? null,
      type: error.type ?? null,
      code: error.code ?? null,
      param: error.param ?? null,
      should_retry: error.headers?.get("x-should-retry") ?? null,
    };
  }
  return { error: error?.name ?? "Error", message: String(error?.message ?? error) };
}

// A check that throws is reported, never fatal: every check runs and is seen.
async function check(run) {
  try {
    return await run();
  } catch (error) {
    return errorFacts(error);
  }
}

const results = { node: process.version };

results.generate = await check(async () =>
  imageFacts(
    await client.images.generate({
      model: MODEL,
      prompt: "a lighthouse at dawn",
      size: "2048x1152",
    }),
  ),
);

results.n2 = await check(async () => ({
  unexpected: imageFacts(await client.images.generate({ model: MODEL, prompt: "two cats", n: 2 })),
}));

results.bad_key = await check(async () => {
  const stranger = new OpenAI({ apiKey: "sk-not-a-real-key", maxRetries: 0 });
  return { unexpected: imageFacts(await stranger.images.generate({ prompt: "a cat" })) };
});

results.edit = await check(async () => {
  const png = await readFile(process.env.EDIT_IMAGE);
  return imageFacts(
    await client.images.edit({
      model: MODEL,
      image: await toFile(png, "input.png", { type: "image/png" }),
      prompt: "make it blue",
      size: "1280x1280",
    }),
  );
});

results.models = await check(async () => {
  const ids = [];
  for await (const model of client.models.list()) {
    ids.push(model.id);
  }
  return { ids };
});

results.retrieve = await check(async () => {
  const model = await client.models.retrieve(MODEL);
  return { id: model.id, object: model.object };
});

results.retrieve_alias = await check(async () => {
  const model = await client.models.retrieve("dall-e-3");
  return { id: model.id, object: model.object, alias_of: model.alias_of };
});

results.retrieve_unknown = await check(async () => {
  const model = await client.models.retrieve("no-such-model");
  return { id: model.id };
});

console.log(JSON.stringify(results));
