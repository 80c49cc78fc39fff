-- Commit one audited change (one or more writes, one or more chained audit entries) atomically.
--
-- KEYS[1]  audit stream          KEYS[2]  audit head ("<seq>:<hash>")
-- KEYS[3]  idempotency key (or a placeholder when unused)
-- KEYS[4..] keys referenced by the operations, by index
-- ARGV[1]  JSON plan:
--   expect_head  head the change was computed against ("" for an empty log)
--   new_head     head after the last entry
--   ops          list of {cmd, key_index, args...}; cmd in SET, HSET, HDEL, SADD, DEL, ZADD, ZREM,
--                XTRIM (MINID = the given id: the audit retention, see flagsvc/retention.py),
--                SETHEAD (SET the key to new_head: where the version moved, see keys.version_mark),
--                FLAG {key_index, source_index, flag, record, fragment}: HSET the flag's record, and
--                its snapshot fragment ("" when archived) in the snapshot source hash,
--                SNAPSHOT {key_index, source_index, flags_index, prefix}: SET the serialized snapshot
--                (see keys.snapshot), built from the fragments after every other op of the commit
--   time_ms      the entries' time (their "time" field) in ms since the epoch, as a string
--   entries      list of audit entries, each a flat list of field/value strings, in chain order,
--                "seq" first
--   indexes      per entry, the KEYS indexes of the sorted sets that index it (by flag, actor...);
--                each gets the entry's stream id, scored by the entry's chain sequence number
--   idempotency  optional {value, ttl, index, cap, now}: remember the commit's result under KEYS[3]
--                for ttl seconds; KEYS[index] is the sorted set of the token's idempotency records
--                (score: when), kept to its newest cap records
--   channel, message  optional pub/sub notification
--
-- With no entries the commit writes no audit entry and leaves the head as it is: a decision that
-- changes nothing, made against expect_head, that only remembers its idempotency record.
--
-- Stream ids are "<time_ms>-<n>", so an entry's id and its time agree and a time window is an id
-- range. A time_ms before the newest id (the clock went back, e.g. after a failover) is refused with
-- {"clock", newest ms}: the caller retakes the time from there and commits again.
--
-- Returns {"ok", stream_id of the last entry or ""} | {"conflict", head} | {"replay", stored value}
-- | {"clock", ms}.
-- Nothing is written unless every check passes, and then everything is: the change, its
-- audit entry, the new head, the idempotency record and the notification.
local plan = cjson.decode(ARGV[1])

-- A retry of a request that was committed replays, even if other changes came after it.
if plan.idempotency then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    -- A write of its own, so that a WAIT after this replay waits for replicas to have the record.
    redis.call('EXPIRE', KEYS[3], plan.idempotency.ttl)
    return {'replay', prior}
  end
end

local head = redis.call('GET', KEYS[2]) or ''
if head ~= plan.expect_head then
  return {'conflict', head}
end

-- Type checks first: a script is not rolled back on a runtime error, so refuse before the
-- first write rather than fail half-way on a key someone overwrote by hand.
local expected_type = {
  SET = 'string', SETHEAD = 'string', FLAG = 'hash', SNAPSHOT = 'string', HSET = 'hash', HDEL = 'hash', SADD = 'set', DEL = 'any', ZADD = 'zset', ZREM = 'zset',
  XTRIM = 'stream',
}
for _, op in ipairs(plan.ops) do
  local want = expected_type[op[1]]
  if not want then
    return redis.error_reply('commit.lua: unknown op ' .. tostring(op[1]))
  end
  local have = redis.call('TYPE', KEYS[op[2]]).ok
  if want ~= 'any' and have ~= 'none' and have ~= want then
    return redis.error_reply('commit.lua: ' .. KEYS[op[2]] .. ' is a ' .. have .. ', not a ' .. want)
  end
  if op[1] == 'FLAG' or op[1] == 'SNAPSHOT' then
    local source = redis.call('TYPE', KEYS[op[3]]).ok
    if source ~= 'none' and source ~= 'hash' then
      return redis.error_reply('commit.lua: ' .. KEYS[op[3]] .. ' is a ' .. source .. ', not a hash')
    end
  end
end
local stream_type = redis.call('TYPE', KEYS[1]).ok
if stream_type ~= 'none' and stream_type ~= 'stream' then
  return redis.error_reply('commit.lua: ' .. KEYS[1] .. ' is not a stream')
end

local last_ms, last_n = 0, -1
if stream_type == 'stream' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local ms, n = string.match(info[i + 1], '^(%d+)-(%d+)$')
      last_ms, last_n = tonumber(ms), tonumber(n)
    end
  end
end
local time_ms = tonumber(plan.time_ms)
if #plan.entries > 0 and time_ms < last_ms then
  return {'clock', tostring(last_ms)}
end
local next_n = 0
if time_ms == last_ms then
  next_n = last_n + 1
end

-- The snapshot of the environment: its fragments (one per flag, "<kind rank>|<JSON member>", ""
-- for an archived flag) in rank then key order, after the prefix and this commit's history. When the
-- fragments do not cover every flag (data written before they existed) there is no snapshot: readers
-- build it from the flags and store it (flagsvc/flags.py).
local function write_snapshot(key, source, flags, prefix)
  if redis.call('HLEN', source) ~= redis.call('HLEN', flags) then
    redis.call('DEL', key)
    return
  end
  local all = redis.call('HGETALL', source)
  local members = {}
  for i = 1, #all, 2 do
    if all[i + 1] ~= '' then
      members[#members + 1] = {all[i + 1]:sub(1, 1) .. all[i], all[i + 1]:sub(3)}
    end
  end
  table.sort(members, function(a, b) return a[1] < b[1] end)
  local parts = {}
  for i, member in ipairs(members) do
    parts[i] = member[2]
  end
  local history = string.sub(string.match(plan.new_head, ':(.*)$') or '', 1, 12)
  redis.call('SET', key, prefix .. history .. '","flags":{' .. table.concat(parts, ',') .. '}}')
end

local snapshot_op = nil
for _, op in ipairs(plan.ops) do
  local cmd = op[1]
  local key = KEYS[op[2]]
  if cmd == 'SET' then
    redis.call('SET', key, op[3])
  elseif cmd == 'SETHEAD' then
    redis.call('SET', key, plan.new_head)
  elseif cmd == 'FLAG' then
    redis.call('HSET', key, op[4], op[5])
    redis.call('HSET', KEYS[op[3]], op[4], op[6])
  elseif cmd == 'SNAPSHOT' then
    snapshot_op = op
  elseif cmd == 'HSET' then
    redis.call('HSET', key, op[3], op[4])
  elseif cmd == 'HDEL' then
    redis.call('HDEL', key, op[3])
  elseif cmd == 'SADD' then
    redis.call('SADD', key, op[3])
  elseif cmd == 'DEL' then
    redis.call('DEL', key)
  elseif cmd == 'ZADD' then
    redis.call('ZADD', key, op[3], op[4])
  elseif cmd == 'ZREM' then
    redis.call('ZREM', key, op[3])
  elseif cmd == 'XTRIM' then
    redis.call('XTRIM', key, 'MINID', '=', op[3])
  end
end
if snapshot_op then
  write_snapshot(KEYS[snapshot_op[2]], KEYS[snapshot_op[3]], KEYS[snapshot_op[4]], snapshot_op[5])
end

local id = ''
for i, entry in ipairs(plan.entries) do
  id = redis.call('XADD', KEYS[1], plan.time_ms .. '-' .. string.format('%d', next_n), unpack(entry))
  next_n = next_n + 1
  for _, ki in ipairs(plan.indexes[i]) do
    redis.call('ZADD', KEYS[ki], entry[2], id)
  end
end
if #plan.entries > 0 then
  redis.call('SET', KEYS[2], plan.new_head)
end

local idem = plan.idempotency
if idem then
  redis.call('SET', KEYS[3], idem.value, 'EX', idem.ttl)
  local index = KEYS[idem.index]
  redis.call('ZADD', index, idem.now, KEYS[3])
  redis.call('ZREMRANGEBYSCORE', index, '-inf', idem.now - idem.ttl)
  local excess = redis.call('ZCARD', index) - idem.cap
  if excess > 0 then
    local oldest = redis.call('ZRANGE', index, 0, excess - 1)
    redis.call('ZREMRANGEBYRANK', index, 0, excess - 1)
    redis.call('DEL', unpack(oldest))
  end
  redis.call('EXPIRE', index, idem.ttl)
end
if plan.channel then
  redis.call('PUBLISH', plan.channel, plan.message)
end
return {'ok', id}
