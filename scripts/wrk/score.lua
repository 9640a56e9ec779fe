-- POST /v1/score with a valid transaction of user-N, N uniform in [0, USERS).
local users = tonumber(os.getenv("USERS") or "10000")
math.randomseed(11)
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  local now = os.time() * 1000
  local body = string.format(
    '{"txn_id":"wrk-%d","user_id":"user-%d","merchant_id":"merchant-%d","amount":%d.5,' ..
    '"currency":"EUR","country":"FR","device_id":"dev-%d","event_time":%d}',
    n, math.random(0, users - 1), math.random(0, 1999), math.random(1, 500), n % 97, now)
  return wrk.format("POST", "/v1/score", nil, body)
end
