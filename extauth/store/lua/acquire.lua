-- acquire.lua: check, then record, one lease attempt atomically.
--
-- Every key of one call lives in one hash slot on Redis Cluster; on a standalone
-- Redis one call carries both the IP's and the user's keys (one round trip).
--
-- KEYS: [ban_key] when ARGV[4] == '1',
--       then the revocation block's keys when ARGV[5] == '2' (see below),
--       then the quota override block's key when ARGV[9] ~= '' (see below),
--       then for each subject, in check order:
--       rate_key (ZSET attempt-log: member = lease id, score = attempt ms),
--       leases_key (ZSET: member = lease id, score = expiry ms)
-- ARGV[1] attempt id: the attempt-log member (the lease id; unique per attempt)
-- ARGV[2] lease TTL in ms
-- ARGV[3] '1' = record when admitted, '0' = check only (records nothing)
-- ARGV[4] '1' = KEYS[1] is the IP's ban key, '0' = no ban key
-- ARGV[5..8] the revocation block (issue 21): ARGV[5] '2' = its two keys follow the ban
--            key: the user's revoked ZSET ("j:<jti>" / "s:<sid>" -> expiry ms) and
--            revoked-before STRING (ms: tokens issued before it are revoked), both in the
--            user's hash slot; '0' = no revocation check (then ARGV[6..8] are '').
--            ARGV[6] the token's jti, ARGV[7] its sid ('' = none), ARGV[8] its iat in ms
--            ('' = none: revoked by any revoked-before)
-- ARGV[9] the quota override block (issue 24): the index i of the subject (the user) whose
--         limits a per-user override may replace; its HASH key follows the revocation keys,
--         in that subject's hash slot, fields 'c' (concurrent leases) and 'r' (attempts per
--         minute), each replacing ARGV's limit when present. '' = no override key.
-- ARGV[10 + 3*(i-1)] subject i attempts-per-minute limit ('' = unlimited, not logged)
-- ARGV[11 + 3*(i-1)] subject i concurrent-lease limit ('' = unlimited, lease still recorded)
-- ARGV[12 + 3*(i-1)] subject i lease member ("<lease id>|<the other subject>", so a
--                    listing by user can name each lease's IP and vice versa)
--
-- Order: ban, revoked, then each subject's attempt rate in order, then each subject's
-- lease quota in reverse order; with subjects {ip, user} this is
-- ban -> revoked -> rate_ip -> rate_user -> quota_user -> quota_ip.
-- A denial records nothing (it only drops entries that had already expired).
-- Idempotent: a recording call that finds its own live lease (a retry after a lost
-- reply: redis-py's Cluster client retries once on a connection error) is admitted
-- again without counting against itself, instead of denied with its slot held.
--
-- Returns {code, subject_index, ms}:
--   {0, 0, expires_at_ms}  admitted (and recorded when ARGV[3] == '1')
--   {1, 0, ban_pttl_ms}    banned
--   {4, 0, 0}              the token is revoked
--   {2, i, retry_ms}       subject i over its attempt rate; exact wait for the oldest attempt to leave
--   {3, i, retry_ms}       subject i over its lease quota; hint = earliest live lease expiry - now
-- Time is the Redis server clock (TIME), so replicas never disagree about expiry.
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local ttl = tonumber(ARGV[2])
local first = 1
if ARGV[4] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return {1, 0, redis.call('PTTL', KEYS[1])}
  end
  first = 2
end

-- Revocation block (issue 21): an entry counts until its expiry, also before Redis evicts it.
if ARGV[5] == '2' then
  local revoked, revoked_before = KEYS[first], KEYS[first + 1]
  for _, member in ipairs({ARGV[6] ~= '' and ('j:' .. ARGV[6]) or false,
                           ARGV[7] ~= '' and ('s:' .. ARGV[7]) or false}) do
    if member then
      local until_ms = redis.call('ZSCORE', revoked, member)
      if until_ms and tonumber(until_ms) > now then
        return {4, 0, 0}
      end
    end
  end
  local before = redis.call('GET', revoked_before)
  if before and (ARGV[8] == '' or tonumber(ARGV[8]) < tonumber(before)) then
    return {4, 0, 0}
  end
  first = first + 2
end

-- Quota override block (issue 24): read in the same call, so every replica applies it.
local override_key, override_subject = nil, nil
if ARGV[9] ~= '' then
  override_key, override_subject = KEYS[first], tonumber(ARGV[9])
  first = first + 1
end

local n = (#KEYS - first + 1) / 2
local function arg(i, j) return ARGV[9 + 3 * (i - 1) + j] end
local rate_limit, lease_limit = {}, {}
for i = 1, n do
  rate_limit[i], lease_limit[i] = arg(i, 1), arg(i, 2)
end
if override_key then
  local o = redis.call('HMGET', override_key, 'c', 'r')
  if o[1] then lease_limit[override_subject] = o[1] end
  if o[2] then rate_limit[override_subject] = o[2] end
end
-- End of the quota override block: below, limits are rate_limit[i] and lease_limit[i].

if ARGV[3] == '1' then
  local mine = redis.call('ZSCORE', KEYS[first + 1], arg(1, 3))
  if mine and tonumber(mine) > now then
    return {0, 0, tonumber(mine)}
  end
end

for i = 1, n do
  local limit = rate_limit[i]
  if limit ~= '' then
    local key = KEYS[first + 2 * (i - 1)]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - WINDOW)
    if redis.call('ZCARD', key) >= tonumber(limit) then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      local wait = WINDOW
      if oldest[2] then wait = tonumber(oldest[2]) + WINDOW - now end
      return {2, i, wait}
    end
  end
end

for i = n, 1, -1 do
  local key = KEYS[first + 2 * (i - 1) + 1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local limit = lease_limit[i]
  if limit ~= '' and redis.call('ZCARD', key) >= tonumber(limit) then
    local earliest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local wait = ttl
    if earliest[2] then wait = tonumber(earliest[2]) - now end
    return {3, i, wait}
  end
end

local expires = now + ttl
if ARGV[3] == '1' then
  for i = 1, n do
    local rate_key = KEYS[first + 2 * (i - 1)]
    local leases_key = KEYS[first + 2 * (i - 1) + 1]
    if rate_limit[i] ~= '' then
      redis.call('ZADD', rate_key, now, id)
      redis.call('PEXPIRE', rate_key, WINDOW)
    end
    redis.call('ZADD', leases_key, expires, arg(i, 3))
    -- The key outlives its longest lease and no more: idle keys vanish.
    if redis.call('PTTL', leases_key) < ttl then
      redis.call('PEXPIRE', leases_key, ttl)
    end
  end
end
return {0, 0, expires}
