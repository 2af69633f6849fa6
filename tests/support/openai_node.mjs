// Drives the proxy with openai-node and prints, as one JSON object, what its helpers made of the
// answers: node openai_node.mjs MODULE BASE_URL MODEL (MODULE: openai-node's index.mjs).
import { pathToFileURL } from "node:url";

const [modulePath, baseURL, model] = process.argv.slice(2);
const { default: OpenAI } = await import(pathToFileURL(modulePath).href);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 30000 });
const messages = [{ role: "user", content: "Hello" }];

const final = await client.chat.completions
  .stream({ model, messages, max_tokens: 5 })
  .finalChatCompletion();
const reply = await client.chat.completions.create({ model, messages, max_tokens: 5 });
const completionModels = [];
const stream = await client.completions.create({ model, prompt: "Once", max_tokens: 3, stream: true });
for await (const chunk of stream) completionModels.push(chunk.model);
let error = null;
try {
  await client.chat.completions.create({ model: "nope", messages });
} catch (e) {
  error = { status: e.status, type: e.type, code: e.code, param: e.param };
}
console.log(JSON.stringify({
  final: { role: final.choices[0].message.role, model: final.model, content: final.choices[0].message.content },
  reply: { model: reply.model, usage: reply.usage },
  completionModels,
  error,
}));
