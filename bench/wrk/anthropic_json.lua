-- Anthropic Messages, non-streaming: the upstream answers tests/fixtures/anthropic/message.json.
bench = {
   path = "/v1/messages",
   key_header = "x-api-key",
   headers = { ["anthropic-version"] = "2023-06-01" },
   body = '{"max_tokens":64,"messages":[{"role":"user","content":"Hello"}],"model":"claude-sonnet-4-6"}',
}
dofile((os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/common.lua")
