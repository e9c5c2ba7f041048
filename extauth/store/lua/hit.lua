-- hit.lua: sliding-window rate limit; only admitted hits are logged, so the wait is exact.
--
-- KEYS[1] log_key (ZSET: member = unique hit id, score = hit ms)
-- ARGV[1] limit (hits allowed per window)
-- ARGV[2] window in ms
-- ARGV[3] unique member for this hit
--
-- Returns -1 when admitted (and logged), else the ms until the oldest logged
-- hit leaves the window. Time is the Redis server clock (TIME).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] then
    return tonumber(oldest[2]) + window - now
  end
  return window
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return -1
