"""
The cluster's commands, as Lua scripts that Redis runs atomically.

Every decision the in-memory registry (:mod:`signalling.core.registry`)
makes is made here, inside Redis, by one script per command: Redis runs one
script at a time, so competing commands from any number of nodes resolve as
"first one wins", as in one process. A script publishes the notifications
its command causes to the channels of the nodes they are for before it
returns, so that every node receives what concerns it in the one order in
which Redis decided it.

The keys (all under one prefix, :data:`PREFIX`):

- ``p:<uid>``: a hash per registered peer: ``n`` its node, ``c`` its
  connection on that node, ``d`` its dialect's code
  (:data:`signalling.cluster.channel.DIALECTS`), ``s`` its session partner,
  ``r`` its room; for the JSON dialect ``o`` its roles (comma-separated)
  and ``m`` its meta (canonical JSON).
- ``r:<room>``: a sorted set of the room's members, scored in join order;
  ``rooms``: how many rooms have members.
- ``o:<role>``: a sorted set of the JSON peers with that role, in the order
  they took it; ``js:<id>``: a JSON session (``p`` producer, ``c``
  consumer); ``jp:<uid>`` and ``jc:<uid>``: the sessions a JSON peer
  produces and consumes.
- ``seq``: a counter that orders joins and roles.
- ``nodes``: the live nodes; ``alive:<node>``: a node's heartbeat, which
  expires when the node stops refreshing it; ``nu:<node>``: the uids a node
  holds, released together when it is found dead.

A notification is one ``PUBLISH`` to ``n:<node>``, in the format of
:mod:`signalling.cluster.channel`. The scripts name its kinds, the dialects'
codes and the kinds of refusal as that module does: every script starts
with its :func:`~signalling.cluster.channel.lua_constants`.

A script answers ``ok``, a value, or ``{"err", kind, argument}`` for a
refusal (read by :func:`signalling.cluster.channel.answer`).
"""

from signalling.cluster import channel

#: The prefix of every key and channel the cluster uses.
PREFIX = "sig:"

_PRELUDE = r"""
local P = '%(prefix)s'

local function notify(node, conns, kind, body)
  redis.call('PUBLISH', P .. 'n:' .. node, kind .. conns .. '\0' .. body)
end

-- Tell several peers (a list of {node, conn}) the same thing: one message
-- per node, in the order the nodes first appear.
local function multicast(targets, kind, body)
  local by, order = {}, {}
  for _, t in ipairs(targets) do
    local list = by[t[1]]
    if not list then
      list = {}
      by[t[1]] = list
      order[#order + 1] = t[1]
    end
    list[#list + 1] = t[2]
  end
  for _, node in ipairs(order) do
    notify(node, table.concat(by[node], ','), kind, body)
  end
end

local function where(uid)
  return redis.call('HMGET', P .. 'p:' .. uid, 'n', 'c')
end

local function err(kind, arg)
  return {'err', kind, arg}
end

-- uid's record if it is held by this node's connection, else nil.
local function own(uid, node, conn)
  local rec = redis.call('HMGET', P .. 'p:' .. uid, 'n', 'c', 'd', 's', 'r')
  if rec[1] ~= node or rec[2] ~= conn then
    return nil
  end
  return rec
end

local function forget(uid, node)
  redis.call('DEL', P .. 'p:' .. uid)
  redis.call('SREM', P .. 'nu:' .. node, uid)
end

local function leave_room(uid, room)
  local key = P .. 'r:' .. room
  redis.call('ZREM', key, uid)
  local members = redis.call('ZRANGE', key, 0, -1)
  if #members == 0 then
    redis.call('DECR', P .. 'rooms')
    return
  end
  local targets = {}
  for i, member in ipairs(members) do
    targets[i] = where(member)
  end
  multicast(targets, ROOM_PEER_LEFT, room .. '\0' .. uid)
end

-- The JSON dialect.

-- The roles in a comma-separated list, as a set.
local function role_set(text)
  local set = {}
  for role in string.gmatch(text, '[^,]+') do
    set[role] = true
  end
  return set
end

local function json_end(session_id, ender, reason_kind)
  -- End a JSON session: the side that is not ``ender`` is told.
  local key = P .. 'js:' .. session_id
  local s = redis.call('HMGET', key, 'p', 'c')
  if not s[1] then
    return
  end
  redis.call('DEL', key)
  redis.call('SREM', P .. 'jp:' .. s[1], session_id)
  redis.call('SREM', P .. 'jc:' .. s[2], session_id)
  local other = s[2]
  if ender == s[2] then
    other = s[1]
  end
  local w = where(other)
  if w[1] then
    notify(w[1], w[2], JSON_SESSION_ENDED, session_id .. '\0' .. reason_kind)
  end
end

local function listeners_told(peer_id, roles, meta)
  local listeners = redis.call('ZRANGE', P .. 'o:listener', 0, -1)
  local targets = {}
  for _, listener in ipairs(listeners) do
    targets[#targets + 1] = where(listener)
  end
  multicast(targets, STATUS_CHANGED, peer_id .. '\0' .. roles .. '\0' .. meta)
end

local function remove_json(uid)
  local sessions = redis.call('SUNION', P .. 'jp:' .. uid, P .. 'jc:' .. uid)
  local meta = redis.call('HGET', P .. 'p:' .. uid, 'm') or 'null'
  for _, session_id in ipairs(sessions) do
    json_end(session_id, uid, '')
  end
  redis.call('DEL', P .. 'jp:' .. uid, P .. 'jc:' .. uid)
  for _, role in ipairs({'producer', 'consumer', 'listener'}) do
    redis.call('ZREM', P .. 'o:' .. role, uid)
  end
  return meta
end

-- Remove a peer whose record is rec ({node, conn, dialect, partner, room}):
-- its partner goes too and is told, its room is told.
local function remove_peer(uid, rec)
  if rec[3] == DIALECT_JSON then
    local meta = remove_json(uid)
    forget(uid, rec[1])
    listeners_told(uid, '', meta)
    return
  end
  forget(uid, rec[1])
  if rec[4] then
    local partner = rec[4]
    local w = where(partner)
    if w[1] then
      forget(partner, w[1])
      notify(w[1], w[2], SESSION_ENDED, uid)
    end
  end
  if rec[5] then
    leave_room(uid, rec[5])
  end
end

-- Release everything a dead node held; exactly once, whoever notices.
local function reap(node)
  for _, uid in ipairs(redis.call('SMEMBERS', P .. 'nu:' .. node)) do
    local rec = redis.call('HMGET', P .. 'p:' .. uid, 'n', 'c', 'd', 's', 'r')
    if rec[1] == node then
      remove_peer(uid, rec)
    end
  end
  redis.call('DEL', P .. 'nu:' .. node)
  redis.call('SREM', P .. 'nodes', node)
end
"""

SCRIPTS = {}


def _script(name, body):
    SCRIPTS[name] = body


# ARGV: uid, node, conn, dialect
_script(
    "register",
    r"""
local uid, node, conn, dialect = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SISMEMBER', P .. 'nodes', node) == 0 then
  return err(UNAVAILABLE, uid)
end
local key = P .. 'p:' .. uid
if redis.call('EXISTS', key) == 1 then
  return err(UID_TAKEN, uid)
end
redis.call('HSET', key, 'n', node, 'c', conn, 'd', dialect)
redis.call('SADD', P .. 'nu:' .. node, uid)
return 'ok'
""",
)

# ARGV: uid, node, conn
_script(
    "remove",
    r"""
local uid = ARGV[1]
local rec = own(uid, ARGV[2], ARGV[3])
if rec then
  remove_peer(uid, rec)
end
return 'ok'
""",
)

# ARGV: caller, callee, node, conn
_script(
    "start_session",
    r"""
local caller, callee, node, conn = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local a = own(caller, node, conn)
if not a or a[3] ~= DIALECT_EXAMPLES then
  return err(PEER_NOT_FOUND, caller)
end
if a[4] or a[5] then
  return err(ALREADY_ENGAGED, caller)
end
if caller == callee then
  return err(SESSION_WITH_SELF, caller)
end
local b = redis.call('HMGET', P .. 'p:' .. callee, 'n', 'c', 'd', 's', 'r')
if not b[1] or b[3] ~= DIALECT_EXAMPLES then
  return err(PEER_NOT_FOUND, callee)
end
if b[4] or b[5] then
  return err(PEER_BUSY, callee)
end
redis.call('HSET', P .. 'p:' .. caller, 's', callee)
redis.call('HSET', P .. 'p:' .. callee, 's', caller)
notify(node, conn, SESSION_STARTED, callee .. '\0' .. b[1] .. '\0' .. b[2] .. '\0' .. '1')
notify(b[1], b[2], SESSION_STARTED, caller .. '\0' .. node .. '\0' .. conn .. '\0' .. '0')
return 'ok'
""",
)

# ARGV: uid, room, node, conn, max_members (0: none), max_rooms (0: none)
_script(
    "join_room",
    r"""
local uid, room, node, conn = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_members, max_rooms = tonumber(ARGV[5]), tonumber(ARGV[6])
local rec = own(uid, node, conn)
if not rec or rec[3] ~= DIALECT_EXAMPLES then
  return err(PEER_NOT_FOUND, uid)
end
if rec[4] or rec[5] then
  return err(ALREADY_ENGAGED, uid)
end
local key = P .. 'r:' .. room
local size = redis.call('ZCARD', key)
if size == 0 then
  if max_rooms > 0 and tonumber(redis.call('GET', P .. 'rooms') or '0') >= max_rooms then
    return err(TOO_MANY_ROOMS, room)
  end
  redis.call('INCR', P .. 'rooms')
elseif max_members > 0 and size >= max_members then
  return err(ROOM_FULL, room)
end
local others = redis.call('ZRANGE', key, 0, -1)
redis.call('ZADD', key, redis.call('INCR', P .. 'seq'), uid)
redis.call('HSET', P .. 'p:' .. uid, 'r', room)
notify(node, conn, ROOM_JOINED, room .. '\0' .. table.concat(others, '\0'))
local targets = {}
for i, member in ipairs(others) do
  targets[i] = where(member)
end
multicast(targets, ROOM_PEER_JOINED, room .. '\0' .. uid)
return 'ok'
""",
)

# ARGV: sender, target, payload, node, conn
_script(
    "room_message",
    r"""
local sender, target, payload = ARGV[1], ARGV[2], ARGV[3]
local rec = own(sender, ARGV[4], ARGV[5])
if not rec or not rec[5] then
  return err(NOT_IN_ROOM, sender)
end
if not redis.call('ZSCORE', P .. 'r:' .. rec[5], target) then
  local t = redis.call('HMGET', P .. 'p:' .. target, 'n', 'd')
  if t[1] and t[2] == DIALECT_EXAMPLES then
    return err(PEER_NOT_IN_ROOM, target)
  end
  return err(PEER_NOT_FOUND, target)
end
local w = where(target)
notify(w[1], w[2], ROOM_MESSAGE, sender .. '\0' .. payload)
return 'ok'
""",
)

# ARGV: uid, node, conn
_script(
    "room_members",
    r"""
local uid = ARGV[1]
local rec = own(uid, ARGV[2], ARGV[3])
if not rec or not rec[5] then
  return err(NOT_IN_ROOM, uid)
end
local members = redis.call('ZRANGE', P .. 'r:' .. rec[5], 0, -1)
local others = {}
for _, member in ipairs(members) do
  if member ~= uid then
    others[#others + 1] = member
  end
end
return {'ok', others}
""",
)

# The JSON dialect.

# ARGV: peer_id, roles (comma-separated), meta (canonical JSON), claimed ('' or
# the id), node, conn
_script(
    "set_peer_status",
    r"""
local peer_id, roles, meta, claimed = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. 'p:' .. peer_id
local rec = own(peer_id, ARGV[5], ARGV[6])
if not rec or rec[3] ~= DIALECT_JSON then
  return err(JSON_REFUSED, "Peer '" .. peer_id .. "' hasn't been welcomed")
end
local old = redis.call('HMGET', key, 'o', 'm')
local old_roles, old_meta = old[1] or '', old[2] or 'null'
if roles == old_roles and meta == old_meta and claimed == peer_id then
  return 'ok'
end
local has, had = role_set(roles), role_set(old_roles)
if has['producer'] and has['consumer'] then
  return err(JSON_REFUSED, 'Cannot register peer ' .. peer_id .. ' as both producer and passive consumer')
end
if had['producer'] and not has['producer'] then
  for _, session_id in ipairs(redis.call('SMEMBERS', P .. 'jp:' .. peer_id)) do
    json_end(session_id, peer_id, '')
  end
elseif had['consumer'] and not has['consumer'] then
  for _, session_id in ipairs(redis.call('SMEMBERS', P .. 'jc:' .. peer_id)) do
    json_end(session_id, peer_id, '')
  end
end
for _, role in ipairs({'producer', 'consumer', 'listener'}) do
  local rkey = P .. 'o:' .. role
  if has[role] then
    if not redis.call('ZSCORE', rkey, peer_id) then
      redis.call('ZADD', rkey, redis.call('INCR', P .. 'seq'), peer_id)
    end
  else
    redis.call('ZREM', rkey, peer_id)
  end
end
redis.call('HSET', key, 'o', roles, 'm', meta)
listeners_told(peer_id, roles, meta)
return 'ok'
""",
)

# ARGV: role
_script(
    "json_peers",
    r"""
local ids = redis.call('ZRANGE', P .. 'o:' .. ARGV[1], 0, -1)
local out = {}
for _, peer_id in ipairs(ids) do
  out[#out + 1] = peer_id
  out[#out + 1] = redis.call('HGET', P .. 'p:' .. peer_id, 'm') or 'null'
end
return {'ok', out}
""",
)

# ARGV: peer_id, other_id, offer ('' for none, else '1' .. the offer),
# session_id, node, conn, names ('' for any, else a JSON list the other's
# meta.name must be in), the refusal's text for a name not in it
_script(
    "start_json_session",
    r"""
local peer_id, other_id, offer, session_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec = own(peer_id, ARGV[5], ARGV[6])
if not rec or rec[3] ~= DIALECT_JSON then
  return err(JSON_REFUSED, "Peer with ID '" .. peer_id .. "' not found")
end
local other = redis.call('HMGET', P .. 'p:' .. other_id, 'n', 'c', 'd', 'o', 'm')
if not other[1] or other[3] ~= DIALECT_JSON then
  return err(JSON_REFUSED, "Peer with ID '" .. other_id .. "' not found")
end
if ARGV[7] ~= '' then
  local meta = cjson.decode(other[5] or 'null')
  local name = type(meta) == 'table' and meta['name'] or nil
  local allowed = false
  for _, n in ipairs(cjson.decode(ARGV[7])) do
    if n == name then
      allowed = true
    end
  end
  if not allowed then
    return err(JSON_REFUSED, ARGV[8])
  end
end
local producer, consumer
if redis.call('ZSCORE', P .. 'o:producer', other_id) then
  producer, consumer = other_id, peer_id
elseif redis.call('ZSCORE', P .. 'o:consumer', other_id) then
  producer, consumer = peer_id, other_id
else
  local mine = redis.call('HGET', P .. 'p:' .. peer_id, 'o') or ''
  return {'err', JSON_MISSING_ROLES, peer_id, mine, other_id, other[4] or ''}
end
redis.call('HSET', P .. 'js:' .. session_id, 'p', producer, 'c', consumer)
redis.call('SADD', P .. 'jp:' .. producer, session_id)
redis.call('SADD', P .. 'jc:' .. consumer, session_id)
local wc, wp = where(consumer), where(producer)
notify(wc[1], wc[2], CONSUMER_SESSION_STARTED, producer .. '\0' .. session_id)
notify(wp[1], wp[2], PRODUCER_SESSION_ASKED, consumer .. '\0' .. session_id .. '\0' .. offer)
return {'ok', session_id}
""",
)

# ARGV: peer_id, session_id, is_offer ('1' or ''), forwarded text, node, conn
_script(
    "json_message",
    r"""
local peer_id, session_id, is_offer, text = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local s = redis.call('HMGET', P .. 'js:' .. session_id, 'p', 'c')
if not s[1] then
  return 'ok'
end
if is_offer == '1' and peer_id == s[2] then
  return err(JSON_REFUSED, 'cannot forward offer from "' .. peer_id .. '" to "' .. s[1] ..
    '" as "' .. peer_id .. '" is not the producer')
end
local other
if peer_id == s[1] then
  other = s[2]
elseif peer_id == s[2] then
  other = s[1]
else
  return err(JSON_REFUSED, 'Peer ' .. peer_id .. ' is not part of ' .. session_id)
end
local w = where(other)
notify(w[1], w[2], JSON_MESSAGE, text)
return 'ok'
""",
)

# ARGV: peer_id, session_id, error ('' for none, else '1' .. the error)
_script(
    "end_json_session",
    r"""
local peer_id, session_id, reason = ARGV[1], ARGV[2], ARGV[3]
local s = redis.call('HMGET', P .. 'js:' .. session_id, 'p', 'c')
if not s[1] then
  return 'ok'
end
if peer_id ~= s[1] and peer_id ~= s[2] then
  return err(JSON_REFUSED, 'Peer ' .. peer_id .. ' is not part of ' .. session_id)
end
json_end(session_id, peer_id, reason)
return 'ok'
""",
)

# Reclaiming a uid whose holder is on another node.

# ARGV: uid[, dialect code: the examples' by default]. Where its holder of
# that dialect is: {node, conn}, or nothing.
_script(
    "locate",
    r"""
local w = redis.call('HMGET', P .. 'p:' .. ARGV[1], 'n', 'c', 'd')
if not w[1] or w[3] ~= (ARGV[2] or DIALECT_EXAMPLES) then
  return {'ok', {}}
end
return {'ok', {w[1], w[2]}}
""",
)

# ARGV: uid, node, conn. The holder (that connection, if it still holds the
# uid) is removed as for any close, and its node told to close it (1008).
_script(
    "replace",
    r"""
local uid, node, conn = ARGV[1], ARGV[2], ARGV[3]
local rec = own(uid, node, conn)
if rec then
  remove_peer(uid, rec)
  notify(node, conn, REPLACED, uid)
end
return 'ok'
""",
)

# ARGV: uid. Whoever holds the uid (of the examples' dialect) is removed as
# for any close, and its node told to close it (1008): a token for the uid
# takes it over at once.
_script(
    "evict",
    r"""
local uid = ARGV[1]
local rec = redis.call('HMGET', P .. 'p:' .. uid, 'n', 'c', 'd', 's', 'r')
if rec[1] and rec[3] == DIALECT_EXAMPLES then
  remove_peer(uid, rec)
  notify(rec[1], rec[2], REPLACED, uid)
end
return 'ok'
""",
)

# The nodes.

# ARGV: node, ttl (ms). Refresh the node's heartbeat and release the nodes
# whose heartbeat expired. Answers 'reaped' when this node was itself
# released (it must resynchronise), else how many nodes it released.
_script(
    "heartbeat",
    r"""
local node, ttl = ARGV[1], ARGV[2]
if redis.call('SISMEMBER', P .. 'nodes', node) == 0 then
  return 'reaped'
end
redis.call('SET', P .. 'alive:' .. node, '1', 'PX', ttl)
local released = 0
for _, other in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if redis.call('EXISTS', P .. 'alive:' .. other) == 0 then
    reap(other)
    released = released + 1
  end
end
return released
""",
)

# ARGV: node, ttl (ms), then for each live peer of the node: uid, conn,
# dialect, partner ('' for none). Makes Redis agree with what the node
# holds, after start-up or an outage: records of the node's peers that are
# gone are removed (their partners and rooms told), its peers' uids are
# claimed again where Redis lost them, sessions and rooms Redis holds for
# them that the node does not know of are ended (the other sides told), and
# its sessions between two of its own peers are recorded. Answers the uids
# another node took meanwhile.
_script(
    "resync",
    r"""
local node, ttl = ARGV[1], ARGV[2]
redis.call('SADD', P .. 'nodes', node)
redis.call('SET', P .. 'alive:' .. node, '1', 'PX', ttl)
local mine = {}
for i = 3, #ARGV, 4 do
  mine[ARGV[i]] = ARGV[i + 1]
end
for _, uid in ipairs(redis.call('SMEMBERS', P .. 'nu:' .. node)) do
  local rec = redis.call('HMGET', P .. 'p:' .. uid, 'n', 'c', 'd', 's', 'r')
  if rec[1] == node and mine[uid] ~= rec[2] then
    remove_peer(uid, rec)
  elseif rec[1] ~= node then
    redis.call('SREM', P .. 'nu:' .. node, uid)
  end
end
local lost = {}
for i = 3, #ARGV, 4 do
  local uid, conn, dialect, partner = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = P .. 'p:' .. uid
  local rec = redis.call('HMGET', key, 'n', 'c', 'd', 's', 'r')
  if rec[1] and (rec[1] ~= node or rec[2] ~= conn) then
    lost[#lost + 1] = uid
  else
    if not rec[1] then
      redis.call('HSET', key, 'n', node, 'c', conn, 'd', dialect)
      redis.call('SADD', P .. 'nu:' .. node, uid)
    end
    if rec[5] then
      leave_room(uid, rec[5])
      redis.call('HDEL', key, 'r')
    end
    if dialect == DIALECT_JSON then
      -- its roles and sessions are not kept over an outage
      local meta = remove_json(uid)
      redis.call('HDEL', key, 'o', 'm')
    end
    if rec[4] and rec[4] ~= partner then
      -- a session it does not know of: the other side goes, and is told
      local w = where(rec[4])
      if w[1] and w[1] ~= node then
        forget(rec[4], w[1])
        notify(w[1], w[2], SESSION_ENDED, uid)
      end
      redis.call('HDEL', key, 's')
    end
    if partner ~= '' then
      redis.call('HSET', key, 's', partner)
    end
  end
end
return lost
""",
)

# ARGV: node. A node that stops cleanly leaves: whatever it still holds is
# released now rather than when its heartbeat expires.
_script(
    "leave",
    r"""
redis.call('DEL', P .. 'alive:' .. ARGV[1])
reap(ARGV[1])
return 'ok'
""",
)

_CONSTANTS = channel.lua_constants()


def source(name, prefix=PREFIX):
    """:returns: the Lua source of script ``name``, prelude included."""
    return _CONSTANTS + (_PRELUDE % {"prefix": prefix}) + SCRIPTS[name]
