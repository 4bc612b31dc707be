-- wrk script of bench/write-cost: POST /v1/applications, one unique valid application per
-- request, the same body for ticketd and the Node.js peer (adapted from the peer's
-- bench/post.lua: no ids file, up to 16 threads).
--
--   wrk -t1 -c64 -d8s --latency -s bench/write_cost.lua http://127.0.0.1:PORT/v1/applications -- EVENT_ID
--
-- Request k of thread t uses phone number n = k * 16 + t (010-XXXX-YYYY, 10^8 values), so
-- threads never collide; EVENT_ID makes runs on the same database distinct.
-- At the end it prints "key value" lines that bench/write_cost_lib.py parses.

local MAX_THREADS = 16
local threads = {}
local next_tid = 0

function setup(thread)
   if next_tid >= MAX_THREADS then
      error("write_cost.lua supports at most " .. MAX_THREADS .. " threads")
   end
   thread:set("tid", next_tid)
   next_tid = next_tid + 1
   table.insert(threads, thread)
end

function init(args)
   event_id = args[1] or "write-cost"
   seq = 0
   c201, c409, c400, cother = 0, 0, 0, 0
   headers = { ["Content-Type"] = "application/json" }
end

function request()
   local n = seq * MAX_THREADS + tid
   seq = seq + 1
   if n >= 100000000 then
      error("phone space exhausted")
   end
   local phone = string.format("010-%04d-%04d", math.floor(n / 10000), n % 10000)
   local body = '{"event_id":"' .. event_id .. '","phone":"' .. phone ..
      '","name":"Kim","email":"kim@example.com","seats":1}'
   return wrk.format("POST", nil, headers, body)
end

function response(status, hdrs, body)
   if status == 201 then
      c201 = c201 + 1
   elseif status == 409 then
      c409 = c409 + 1
   elseif status == 400 then
      c400 = c400 + 1
   else
      cother = cother + 1
   end
end

function done(summary, latency, requests)
   local s = { c201 = 0, c409 = 0, c400 = 0, cother = 0 }
   for _, t in ipairs(threads) do
      for k, _ in pairs(s) do
         s[k] = s[k] + t:get(k)
      end
   end
   local e = summary.errors
   io.write(string.format("status_201 %d\n", s.c201))
   io.write(string.format("status_409 %d\n", s.c409))
   io.write(string.format("status_400 %d\n", s.c400))
   io.write(string.format("status_other %d\n", s.cother))
   io.write(string.format("requests %d\n", summary.requests))
   io.write(string.format("duration_us %d\n", summary.duration))
   io.write(string.format("socket_errors %d\n", e.connect + e.read + e.write + e.timeout))
   io.write(string.format("timeouts %d\n", e.timeout))
   for _, p in ipairs({ 50, 90, 99, 99.9 }) do
      io.write(string.format("p%s_us %d\n", (tostring(p):gsub("%.", "")), latency:percentile(p)))
   end
   io.write(string.format("max_us %d\n", latency.max))
end
