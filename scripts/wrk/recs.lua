-- GET /v1/recommendations/user-N for N uniformly in [0, USERS) (env USERS).
local users = tonumber(os.getenv("USERS") or "10000")
math.randomseed(7)
request = function()
  return wrk.format("GET", "/v1/recommendations/user-" .. math.random(0, users - 1) .. "?k=20")
end
