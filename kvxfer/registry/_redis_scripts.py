"""Lua scripts of the Redis registry store: each operation is one atomic script.

Layer: registry (Redis backend). Every script first sweeps due leases and TTLs with the Redis
server's own clock, so expiry never depends on client clocks. Keys (prefix ``P``):

* ``P c:<name>``   hash instance, metadata, lease (ms); PEXPIRE as a backstop
* ``P leases``     zset name -> lease end (ms)
* ``P r:<id>``     hash mode, state, producer, consumer, blocks (msgpack), ttl (ms); PEXPIRE backstop;
  in pull mode also need (consumers to confirm), nclaim, ndone and ``k:<consumer>`` = 0
  (claimed) or 1 (confirmed) per claimant; ``consumer`` is the first claimant
* ``P ttls``       zset request id -> TTL end (ms)
* ``P cr:<name>``  set of request ids the connector is a party of
* ``P wp:<id>``, ``P we:<id>``  sets of connectors waiting for a publication / an expectation
* ``P e:<name>``   list of msgpack events for the connector (request events and wake-ups)

Every script returns ``{code, ...}``: ``"ok"`` or an ErrorCode value with a message.
"""

from __future__ import annotations

__all__ = ["SCRIPTS"]

_COMMON = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function push(name, packed)
  local k = P .. 'e:' .. name
  redis.call('RPUSH', k, packed)
  redis.call('PEXPIRE', k, 3600000)
end
local function event(name, rid, kind, role, reason)
  push(name, cmsgpack.pack({request_id = rid, kind = kind, role = role, reason = reason}))
end
local function wake(setkey, rid)
  local names = redis.call('SMEMBERS', setkey)
  redis.call('DEL', setkey)
  for _, n in ipairs(names) do push(n, cmsgpack.pack({wake = rid})) end
end
local function claimants(r)
  local out = {}
  local all = redis.call('HGETALL', r)
  for i = 1, #all, 2 do
    local k = all[i]
    if string.sub(k, 1, 2) == 'k:' and all[i + 1] == '0' then out[#out + 1] = string.sub(k, 3) end
  end
  return out
end
local function finish(rid, kind, reason)
  local r = P .. 'r:' .. rid
  local f = redis.call('HMGET', r, 'producer', 'consumer', 'mode')
  local others = {}
  if f[3] == 'pull' then others = claimants(r) elseif f[2] and f[2] ~= '' then others = {f[2]} end
  redis.call('DEL', r)
  local code = 'request_failed'
  if kind == 'consumed' then code = 'already_claimed' end
  redis.call('SET', P .. 't:' .. rid, cmsgpack.pack({code, "request '" .. rid .. "' already ended (" .. kind .. "): " .. reason}), 'PX', 60000)
  redis.call('ZREM', P .. 'ttls', rid)
  if f[1] and f[1] ~= '' then
    redis.call('SREM', P .. 'cr:' .. f[1], rid)
    event(f[1], rid, kind, 'producer', reason)
  end
  for _, c in ipairs(others) do
    redis.call('SREM', P .. 'cr:' .. c, rid)
    event(c, rid, kind, 'consumer', reason)
  end
end
-- the role of party in request hash r, or nil and an error reply
local function role_of(r, rid, party, f)
  if party == f.producer then return 'producer' end
  if f.mode == 'pull' then
    local k = redis.call('HGET', r, 'k:' .. party)
    if k == '0' then return 'consumer' end
    if k == '1' then
      return nil, {'not_a_party', "consumer '" .. party .. "' already confirmed request '" .. rid .. "'; it is no longer a party"}
    end
  elseif party == f.consumer then
    return 'consumer'
  end
  return nil, {'not_a_party', "'" .. party .. "' is not a party of request '" .. rid .. "'"}
end
local function drop(name, reason)
  redis.call('ZREM', P .. 'leases', name)
  redis.call('DEL', P .. 'c:' .. name)
  for _, rid in ipairs(redis.call('SMEMBERS', P .. 'cr:' .. name)) do finish(rid, 'failed', reason) end
  redis.call('DEL', P .. 'cr:' .. name)
end
local function sweep(now)
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 256)) do
    local lease = redis.call('HGET', P .. 'c:' .. name, 'lease') or '?'
    drop(name, "connector '" .. name .. "' lost: lease of " .. lease .. " ms expired")
  end
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'ttls', '-inf', now, 'LIMIT', 0, 256)) do
    local f = redis.call('HMGET', P .. 'r:' .. rid, 'state', 'ttl')
    finish(rid, 'expired', "request '" .. rid .. "' expired (" .. (f[1] or '?') .. ", ttl " .. (f[2] or '?') .. " ms)")
  end
end
local function live(name)
  return redis.call('EXISTS', P .. 'c:' .. name) == 1
end
local function extend(rid, r, now)
  local ttl = tonumber(redis.call('HGET', r, 'ttl'))
  local cur = tonumber(redis.call('ZSCORE', P .. 'ttls', rid) or 0)
  if now + ttl > cur then redis.call('ZADD', P .. 'ttls', now + ttl, rid) end
  redis.call('PEXPIRE', r, 2 * ttl + 60000)
end
local function not_registered(name)
  return {'unknown_connector', "connector '" .. name .. "' is not registered (or its lease expired)"}
end
local now = now_ms()
sweep(now)
"""

_REGISTER = r"""
local name, instance, metadata, lease = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local c = P .. 'c:' .. name
local held = redis.call('HGET', c, 'instance')
if held and held ~= instance then
  return {'name_taken', "connector name '" .. name .. "' is held by another live instance"}
end
redis.call('HSET', c, 'instance', instance, 'metadata', metadata, 'lease', lease)
redis.call('PEXPIRE', c, 2 * lease + 1000)
redis.call('ZADD', P .. 'leases', now + lease, name)
return {'ok', tostring(lease)}
"""

_HEARTBEAT = r"""
local name, instance = ARGV[2], ARGV[3]
local c = P .. 'c:' .. name
local f = redis.call('HMGET', c, 'instance', 'lease')
if f[1] ~= instance then
  return {'unknown_connector', "connector '" .. name .. "' holds no lease (expired, or the registry restarted)"}
end
local lease = tonumber(f[2])
redis.call('PEXPIRE', c, 2 * lease + 1000)
redis.call('ZADD', P .. 'leases', now + lease, name)
return {'ok', tostring(lease)}
"""

_UNREGISTER = r"""
local name, instance = ARGV[2], ARGV[3]
if redis.call('HGET', P .. 'c:' .. name, 'instance') == instance then
  drop(name, "connector '" .. name .. "' unregistered")
end
return {'ok'}
"""

_LOOKUP = r"""
local meta = redis.call('HGET', P .. 'c:' .. ARGV[2], 'metadata')
if not meta then return not_registered(ARGV[2]) end
return {'ok', meta}
"""

# ARGV: P, rid, party, blocks, ttl_ms, mode, state, waiters-prefix, consumers
_CREATE = r"""
local rid, party, blocks, ttl, mode, state, wprefix = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local need = tonumber(ARGV[9] or '1')
if not live(party) then return not_registered(party) end
local r = P .. 'r:' .. rid
if redis.call('EXISTS', r) == 1 then
  return {'duplicate', "request '" .. rid .. "' is already in the registry"}
end
local producer, consumer = party, ''
if mode == 'push' then producer, consumer = '', party end
redis.call('DEL', P .. 't:' .. rid)
redis.call('HSET', r, 'mode', mode, 'state', state, 'producer', producer, 'consumer', consumer,
           'blocks', blocks, 'ttl', ttl, 'need', need, 'nclaim', 0, 'ndone', 0)
redis.call('PEXPIRE', r, 2 * ttl + 60000)
redis.call('ZADD', P .. 'ttls', now + ttl, rid)
redis.call('SADD', P .. 'cr:' .. party, rid)
wake(P .. wprefix .. rid, rid)
return {'ok'}
"""

# ARGV: P, rid, party, register_wait, mode wanted, state wanted, new state, party field, other field, wprefix
_TAKE = r"""
local rid, party, wait, mode, want, new, mine, other, wprefix =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
if not live(party) then return not_registered(party) end
local r = P .. 'r:' .. rid
if redis.call('EXISTS', r) == 0 then
  local tomb = redis.call('GET', P .. 't:' .. rid)
  if tomb then return cmsgpack.unpack(tomb) end
  if wait == '1' then
    redis.call('SADD', P .. wprefix .. rid, party)
    redis.call('PEXPIRE', P .. wprefix .. rid, 3600000)
  end
  return {'absent', "request '" .. rid .. "' is not in the registry"}
end
local f = redis.call('HMGET', r, 'mode', 'state', 'producer', 'consumer', 'blocks', other)
if f[1] ~= mode then
  return {'not_a_party', "request '" .. rid .. "' is in " .. f[1] .. " mode"}
end
local pull = mode == 'pull'
if pull and redis.call('HEXISTS', r, 'k:' .. party) == 1 then
  return {'already_claimed', "request '" .. rid .. "' was already claimed by '" .. party .. "' itself (each consumer claims a publication once)"}
end
if f[2] ~= want then
  local who = f[4]
  if mode == 'push' then who = f[3] end
  return {'already_claimed', "request '" .. rid .. "' was already taken by '" .. who .. "' (" .. f[1] .. " mode, " .. f[2] .. ")"}
end
local peer = f[6]
local meta = redis.call('HGET', P .. 'c:' .. peer, 'metadata')
if not meta then
  finish(rid, 'failed', "connector '" .. peer .. "' lost before request '" .. rid .. "' was taken")
  return {'request_failed', "connector '" .. peer .. "' of request '" .. rid .. "' is gone"}
end
if pull then
  local n = redis.call('HINCRBY', r, 'nclaim', 1)
  redis.call('HSET', r, 'k:' .. party, '0')
  if f[4] == '' then redis.call('HSET', r, 'consumer', party) end
  if n >= tonumber(redis.call('HGET', r, 'need') or '1') then redis.call('HSET', r, 'state', new) end
else
  redis.call('HSET', r, 'state', new, mine, party)
end
redis.call('SADD', P .. 'cr:' .. party, rid)
extend(rid, r, now)
return {'ok', peer, f[5], meta}
"""

# ARGV: P, rid, party, ok, reason
_COMPLETE = r"""
local rid, party, ok, reason = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local r = P .. 'r:' .. rid
local f = redis.call('HMGET', r, 'mode', 'state', 'producer', 'consumer')
if not f[1] then
  return {'unknown_request', "request '" .. rid .. "' is not in the registry (never published, finished, expired or cancelled)"}
end
local role, err = role_of(r, rid, party, {mode = f[1], producer = f[3], consumer = f[4]})
if not role then return err end
if ok ~= '1' then
  if reason == '' then reason = 'no reason given' end
  finish(rid, 'failed', role .. " '" .. party .. "' failed request '" .. rid .. "': " .. reason)
  return {'ok'}
end
local state = f[2]
if role == 'consumer' and f[1] == 'pull' then
  local need = tonumber(redis.call('HGET', r, 'need') or '1')
  local done = tonumber(redis.call('HGET', r, 'ndone') or '0') + 1
  if done >= need then
    local tail = ''
    if need > 1 then tail = ' (the last of ' .. need .. ' consumers)' end
    finish(rid, 'consumed', "consumer '" .. party .. "' has request '" .. rid .. "'" .. tail)
  else
    redis.call('HSET', r, 'k:' .. party, '1', 'ndone', done)
    redis.call('SREM', P .. 'cr:' .. party, rid)
    event(party, rid, 'consumed', 'consumer', "consumer '" .. party .. "' has request '" .. rid .. "' (" .. done .. " of " .. need .. " consumers)")
  end
elseif role == 'consumer' and (state == 'pushing' or state == 'delivered') then
  finish(rid, 'consumed', "consumer '" .. party .. "' has request '" .. rid .. "'")
elseif role == 'producer' and state == 'pushing' then
  redis.call('HSET', r, 'state', 'delivered')
  extend(rid, r, now)
  event(f[4], rid, 'delivered', 'consumer', "producer '" .. party .. "' wrote every layer")
else
  return {'not_a_party', role .. " '" .. party .. "' cannot complete request '" .. rid .. "' (" .. f[1] .. " mode, " .. state .. ")"}
end
return {'ok'}
"""

_CANCEL = r"""
local rid, party, reason = ARGV[2], ARGV[3], ARGV[4]
local r = P .. 'r:' .. rid
local f = redis.call('HMGET', r, 'producer', 'consumer', 'mode')
if not f[1] then
  return {'unknown_request', "request '" .. rid .. "' is not in the registry (never published, finished, expired or cancelled)"}
end
local role, err = role_of(r, rid, party, {mode = f[3], producer = f[1], consumer = f[2]})
if not role then return err end
if reason == '' then reason = 'no reason given' end
finish(rid, 'cancelled', role .. " '" .. party .. "' cancelled request '" .. rid .. "': " .. reason)
return {'ok'}
"""

_QUERY = r"""
local f = redis.call('HMGET', P .. 'r:' .. ARGV[2], 'mode', 'state', 'producer', 'consumer', 'need', 'nclaim', 'ndone')
if not f[1] then
  return {'unknown_request', "request '" .. ARGV[2] .. "' is not in the registry (never published, finished, expired or cancelled)"}
end
return {'ok', f[1], f[2], f[3], f[4], f[5] or '1', f[6] or '0', f[7] or '0'}
"""

_UNWAIT = r"""
redis.call('SREM', P .. ARGV[2] .. ARGV[3], ARGV[4])
return {'ok'}
"""

_SWEEP = r"""
return {'ok'}
"""

SCRIPTS: dict[str, str] = {
    name: _COMMON + body
    for name, body in {
        "register": _REGISTER, "heartbeat": _HEARTBEAT, "unregister": _UNREGISTER, "lookup": _LOOKUP,
        "create": _CREATE, "take": _TAKE, "complete": _COMPLETE, "cancel": _CANCEL, "query": _QUERY,
        "unwait": _UNWAIT, "sweep": _SWEEP,
    }.items()
}
