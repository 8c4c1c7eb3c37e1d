// Streams one Generate call and prints one JSON line per chunk, then {"done": ...} or {"error": ...}.
// usage: node client.js HOST:PORT PROTO_ROOT '{"text": "...", "max_tokens": 8}'
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoRoot, requestJson] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(protoRoot, "nextserve/v1/generation.proto"), {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const { Generation } = grpc.loadPackageDefinition(definition).nextserve.v1;
const client = new Generation(address, grpc.credentials.createInsecure());

const call = client.Generate(JSON.parse(requestJson), { deadline: Date.now() + 60000 });
call.on("data", (chunk) => console.log(JSON.stringify({ token_ids: chunk.token_ids, text: chunk.text,
                                                           finish_reason: chunk.finish_reason })));
call.on("end", () => { console.log(JSON.stringify({ done: true })); client.close(); });
call.on("error", (err) => { console.log(JSON.stringify({ error: err.code, details: err.details })); process.exit(1); });
