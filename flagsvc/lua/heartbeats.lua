-- Record the heartbeats one process gathered in the last second for one environment, within the
-- per-token cap on instances, and add up their evaluation counts (see flagsvc/clients.py).
--
-- KEYS[1] clients hash (instance -> record)     KEYS[2] clients by last report (sorted set)
-- KEYS[3] instances by applied version (zset)   KEYS[4] the minute's evaluation counts (hash)
-- KEYS[5] goodbyes: instance -> when (zset)     KEYS[6] app names (set)
-- KEYS[7] the summary housekeeping keeps (hash: live, current...)
-- KEYS[8..] the tokens' instance sets and the apps' instance sets, named by index below
-- ARGV[1] JSON: now, per_token (instances per token), live (seconds an instance stays live),
--   forget (seconds after which an instance is forgotten), counts_ttl (seconds counts are kept),
--   instances: list of {id, record JSON, applied version, seen (epoch s), token set index,
--   app set index, app name}, counts: list of {"flag|app", n}
--
-- A new instance of a token at its cap takes the place of the token's longest silent instance if
-- that one is no longer live; otherwise it is refused. An instance that said goodbye after its
-- report is not recorded again, nor one whose later report another process wrote first (two
-- reports in the same second on two workers): its counts still add up. Returns the live
-- instances housekeeping last counted, then the refused instances: a flat list of id, seconds
-- to wait.
local plan = cjson.decode(ARGV[1])
local now = plan.now
local refused = {}

local function admit(id, tokens)
  if redis.call('ZSCORE', tokens, id) then
    return true
  end
  redis.call('ZREMRANGEBYSCORE', tokens, '-inf', now - plan.forget)
  if redis.call('ZCARD', tokens) < plan.per_token then
    return true
  end
  local oldest = redis.call('ZRANGE', tokens, 0, 0, 'WITHSCORES')
  local silent_since = tonumber(oldest[2])
  if silent_since > now - plan.live then
    refused[#refused + 1] = id
    refused[#refused + 1] = tostring(math.ceil(silent_since + plan.live - now))
    return false
  end
  redis.call('ZREM', tokens, oldest[1])
  redis.call('HDEL', KEYS[1], oldest[1])
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('ZREM', KEYS[3], oldest[1])
  return true
end

-- Whether the instance said goodbye, or reported again, at or after ``seen``.
local function superseded(id, seen)
  local gone = redis.call('ZSCORE', KEYS[5], id)
  local written = redis.call('ZSCORE', KEYS[2], id)
  return (gone and tonumber(gone) >= seen) or (written and tonumber(written) >= seen)
end

local touched = {}
for _, hb in ipairs(plan.instances) do
  local id, seen = hb[1], hb[4]
  local tokens, app = KEYS[hb[5]], KEYS[hb[6]]
  if not superseded(id, seen) and admit(id, tokens) then
    redis.call('HSET', KEYS[1], id, hb[2])
    redis.call('ZADD', KEYS[2], seen, id)
    redis.call('ZADD', KEYS[3], hb[3], id)
    redis.call('ZADD', tokens, seen, id)
    redis.call('ZADD', app, seen, id)
    redis.call('SADD', KEYS[6], hb[7])
    touched[tokens] = true
    touched[app] = true
  end
end
for key in pairs(touched) do
  redis.call('EXPIRE', key, plan.forget)
end

if #plan.counts > 0 then
  for _, c in ipairs(plan.counts) do
    redis.call('HINCRBY', KEYS[4], c[1], c[2])
  end
  redis.call('EXPIRE', KEYS[4], plan.counts_ttl)
end
table.insert(refused, 1, tonumber(redis.call('HGET', KEYS[7], 'live') or '0'))
return refused
