-- Gemini generateContent: the upstream answers tests/fixtures/gemini/generate_content.json.
bench = {
   path = "/v1beta/models/gemini-2.5-flash:generateContent",
   key_header = "x-goog-api-key",
   headers = {},
   body = '{"contents": [{"parts": [{"text": "Hello"}], "role": "user"}]}',
}
dofile((os.getenv("BENCH_WRK_DIR") or "bench/wrk") .. "/common.lua")
