-- revoke.lua: record one revocation in its subject's hash slot (issue 21), where the
-- acquire script's revocation block reads it in the same call as the lease.
--
-- KEYS[1] the subject's revoked ZSET: "j:<jti>" / "s:<sid>" -> expiry ms
-- KEYS[2] the subject's revoked-before STRING: tokens issued before this (ms) are revoked
-- ARGV[1] 'j' (jti), 's' (sid) or 'b' (issued before)
-- ARGV[2] the jti or sid; for 'b' the instant in ms
-- ARGV[3] how long the entry lasts, in ms: from now for 'j' and 's', from the instant for 'b'
--
-- Revoking again never shortens an entry, nor moves an instant back.
-- Returns {expiry ms, instant ms (0 for 'j' and 's')}; an expiry not after now recorded nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[1] == 'b' then
  local before = tonumber(ARGV[2])
  local expires = before + ttl
  local old = redis.call('GET', KEYS[2])
  if old then
    before = math.max(before, tonumber(old))
    local pttl = redis.call('PTTL', KEYS[2])
    if pttl > 0 then expires = math.max(expires, now + pttl) end
  end
  if expires > now then
    redis.call('SET', KEYS[2], string.format('%d', before), 'PX', expires - now)
  end
  return {expires, before}
end
local member = ARGV[1] .. ':' .. ARGV[2]
local expires = now + ttl
local old = redis.call('ZSCORE', KEYS[1], member)
if old then expires = math.max(expires, tonumber(old)) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], expires, member)
if redis.call('PTTL', KEYS[1]) < expires - now then
  redis.call('PEXPIRE', KEYS[1], expires - now)
end
return {expires, 0}
