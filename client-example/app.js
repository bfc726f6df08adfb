// pgws example client: plain JS, no build step, nothing fetched from elsewhere. An ES module
// that uses pgws.js, the client pgws serves itself at /pgws.js.
// All data is put into the page with textContent (never innerHTML).
import { connect as pgwsConnect } from '/pgws.js';

(function () {
  'use strict';

  // HS256 tokens signed with the sample secret "reallyreallyreallyreallyverysafe".
  // No "exp" claim, so they keep working. No "channel" claim, so the channel comes
  // from the URL.
  var TOKENS = {
    // {"mode":"rw"}
    rw: 'eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJtb2RlIjoicncifQ.auy9z4-pqoVEAay9oMi1FuG7ux_C_9RQCH8-wZgej18',
    // {"mode":"r"}
    r: 'eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJtb2RlIjoiciJ9.jL5SsRFegNUlbBm8_okhHSujqLcKKZdDglfdqNl1_rY',
    // {"mode":"w"}
    w: 'eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJtb2RlIjoidyJ9.dZD64YKPX34dyr2uT3SKlObZFrzSdDceihUoXcHkUMw'
  };

  var MAX_ENTRIES = 200;

  var CLOSE_CODES = {
    1000: 'normal closure',
    1001: 'server going away',
    1006: 'abnormal closure',
    1008: 'policy violation',
    1009: 'message too big',
    1011: 'database error'
  };

  function $(id) { return document.getElementById(id); }

  // ---------------------------------------------------------------- URLs

  // The WebSocket endpoint sits on the same host and port as this page.
  function wsBase() {
    var proto = location.protocol;
    if (proto === 'https:') return 'wss://' + location.host;
    if (proto === 'http:') return 'ws://' + location.host;
    // Page opened from file:// or similar: assume the default pgws address.
    return 'ws://localhost:3000';
  }

  // /<channel>/<jwt>, or /<jwt> if the channel is empty (the token's claims choose it).
  function wsUrl(channel, token) {
    var path = channel ? '/' + encodeURIComponent(channel) : '';
    return wsBase() + path + '/' + encodeURIComponent(token);
  }

  // ---------------------------------------------------------------- JWT display only

  // Decodes the claims for display. The signature is not checked: only the server can.
  function decodeClaims(token) {
    var parts = token.split('.');
    if (parts.length !== 3) return null;
    try {
      var b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) b64 += '=';
      var bin = atob(b64);
      var bytes = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      var claims = JSON.parse(new TextDecoder().decode(bytes));
      return (claims && typeof claims === 'object' && !Array.isArray(claims)) ? claims : null;
    } catch (e) {
      return null;
    }
  }

  // ---------------------------------------------------------------- formatting

  function pad(n, w) { n = String(n); while (n.length < (w || 2)) n = '0' + n; return n; }

  function clock(date) {
    return pad(date.getHours()) + ':' + pad(date.getMinutes()) + ':' +
      pad(date.getSeconds()) + '.' + pad(date.getMilliseconds(), 3);
  }

  // Status texts must not contain the word "open" unless the socket is open
  // (automated tests rely on it), so channel names are kept out of them.
  function closeText(ev, wasOpen, byUser) {
    var code = ev.code;
    var detail = ev.reason;
    if (!detail && byUser) detail = 'you disconnected';
    if (!detail && code === 1006 && !wasOpen) {
      detail = 'the handshake was refused (invalid token, wrong mode or channel not ' +
        'allowed, see the server log) or the server is unreachable';
    }
    if (!detail && code === 1006) detail = 'connection lost';
    if (!detail) detail = CLOSE_CODES[code] || '';
    return 'closed (code ' + code + ')' + (detail ? ': ' + detail : '');
  }

  function setStatus(el, state, text) {
    el.className = 'status state-' + state;
    el.textContent = text;
  }

  // Returns the envelope object if the text is a pgws message envelope, else null.
  function parseEnvelope(text) {
    var obj;
    try { obj = JSON.parse(text); } catch (e) { return null; }
    if (obj && typeof obj === 'object' && obj.event === 'WebsocketMessage') return obj;
    return null;
  }

  function span(cls, text) {
    var s = document.createElement('span');
    s.className = cls;
    s.textContent = text;
    return s;
  }

  function asText(v) {
    if (typeof v === 'string') return v;
    if (v === undefined) return '';
    try { return JSON.stringify(v); } catch (e) { return String(v); }
  }

  // Builds one <li> for a received frame. Its text always contains the payload.
  function entryFor(text) {
    var li = document.createElement('li');
    var env = parseEnvelope(text);
    var meta = document.createElement('div');
    meta.className = 'meta';
    if (env) {
      var claims = (env.claims && typeof env.claims === 'object') ? env.claims : {};
      li.className = 'envelope';
      meta.appendChild(span('tag channel', '#' + asText(env.channel)));
      if (claims.mode !== undefined) meta.appendChild(span('tag mode', 'mode ' + asText(claims.mode)));
      var t = Number(claims.message_delivered_at);
      if (claims.message_delivered_at !== undefined && isFinite(t)) {
        var d = new Date(t * 1000);
        var time = span('time', clock(d));
        time.title = 'message_delivered_at ' + asText(claims.message_delivered_at) +
          ' (' + d.toISOString() + ')';
        meta.appendChild(time);
      }
      li.appendChild(meta);
      li.appendChild(span('payload', asText(env.payload)));
      li.title = text;
    } else {
      li.className = 'raw';
      meta.appendChild(span('tag rawtag', 'raw'));
      var rt = span('time', clock(new Date()));
      rt.title = 'time received by this page';
      meta.appendChild(rt);
      li.appendChild(meta);
      li.appendChild(span('payload', text));
    }
    return li;
  }

  function append(list, li) {
    var nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(li);
    while (list.children.length > MAX_ENTRIES) list.removeChild(list.firstElementChild);
    if (nearBottom) list.scrollTop = list.scrollHeight;
  }

  // ---------------------------------------------------------------- connections (pgws.js)

  // Each pane is a pgws.js connection: the token travels in the "pgws.bearer.<jwt>"
  // subprotocol (never in the URL), and pgws.js reconnects by itself with back-off.
  function seconds(ms) { return (ms / 1000).toFixed(1) + ' s'; }

  // ---------------------------------------------------------------- chat connection

  var channelInput = $('channel');
  var choice = $('token-choice');
  var customRow = $('custom-token-row');
  var customInput = $('custom-token');
  var claimsOut = $('token-claims');
  var connectBtn = $('connect');
  var statusEl = $('status');
  var sendForm = $('send-form');
  var messageInput = $('message');
  var sendNote = $('send-note');
  var messagesEl = $('messages');

  var conn = null;        // current chat connection
  var wsMode = '';        // mode claim of the token it was opened with

  function currentToken() {
    if (choice.value === 'custom') return customInput.value.trim().replace(/^Bearer\s+/i, '');
    return TOKENS[choice.value] || '';
  }

  function showClaims() {
    customRow.hidden = choice.value !== 'custom';
    var token = currentToken();
    if (!token) { claimsOut.textContent = '(paste a token)'; return; }
    var claims = decodeClaims(token);
    claimsOut.textContent = claims ? JSON.stringify(claims) : '(not a readable JWT; the server will refuse it)';
  }

  function active(c) { return c !== null && c.state !== 'closed'; }

  function updateButton() {
    connectBtn.textContent = active(conn) ? 'Disconnect' : 'Connect';
  }

  function connect() {
    disconnect(true);
    var channel = channelInput.value.trim();
    var token = currentToken();
    if (!token) {
      setStatus(statusEl, 'closed', 'not connected: paste a token into the custom token field first');
      customInput.focus();
      return;
    }
    var claims = decodeClaims(token) || {};
    if (!channel && typeof claims.channel !== 'string' && !Array.isArray(claims.channels)) {
      setStatus(statusEl, 'closed',
        'not connected: enter a channel (this token has no channel or channels claim)');
      channelInput.focus();
      return;
    }
    var target = typeof claims.channel === 'string' ? claims.channel
      : (channel || (Array.isArray(claims.channels) ? claims.channels.join(', ') : ''));
    var note = (typeof claims.channel === 'string' && channel && claims.channel !== channel)
      ? ' (the token\'s channel claim overrides "' + channel + '")' : '';

    var c;
    try {
      c = pgwsConnect({ url: wsBase(), channel: channel || null, token: token });
    } catch (e) {
      setStatus(statusEl, 'closed', 'not connected: ' + e.message);
      return;
    }
    conn = c;
    wsMode = asText(claims.mode);
    var wasOpen = false;
    setStatus(statusEl, 'connecting', 'connecting…');
    updateButton();

    c.on('open', function () {
      if (conn !== c) return;
      wasOpen = true;
      setStatus(statusEl, 'open', 'open: channel "' + target + '"' + note +
        (wsMode ? ', mode ' + wsMode : ''));
      updateButton();
    });
    c.on('message', function (text) {
      if (conn !== c) return;
      append(messagesEl, entryFor(text));
    });
    c.on('error', function (err) {
      if (conn !== c) return;
      sendNote.textContent = err.message;
    });
    c.on('close', function (ev) {
      if (conn !== c) return;
      var text = closeText(ev, wasOpen, c.closedByUser);
      wasOpen = false;
      if (ev.reconnect) {
        text += '. Reconnecting in ' + seconds(ev.delay);
      } else {
        conn = null;
        if (ev.unsent && ev.unsent.length) text += '. ' + ev.unsent.length + ' queued messages were not sent';
      }
      setStatus(statusEl, 'closed', text);
      updateButton();
    });
  }

  function disconnect(silent) {
    if (!conn) return;
    var c = conn;
    c.closedByUser = true;
    if (silent) conn = null;    // ignore the old connection's events
    c.close(1000, 'client disconnected');
    if (silent) updateButton();
  }

  connectBtn.addEventListener('click', function () {
    if (active(conn)) disconnect(false);
    else connect();
  });

  // Enter in the channel or custom token field (re)connects.
  [channelInput, customInput].forEach(function (input) {
    input.addEventListener('keydown', function (ev) {
      if (ev.key === 'Enter' && !ev.isComposing) { ev.preventDefault(); connect(); }
    });
  });

  choice.addEventListener('change', function () {
    showClaims();
    if (choice.value === 'custom') customInput.focus();
  });
  customInput.addEventListener('input', showClaims);

  // While pgws.js reconnects, send() queues the text (bounded); it throws when the queue is full.
  function sendOn(c, text, note) {
    try {
      return c.send(text) ? 'Sent ' + text.length + ' characters at ' + clock(new Date()) + '.'
        : 'Queued ' + text.length + ' characters: not connected right now, they go out when ' +
          'the socket is back.';
    } catch (e) {
      note.textContent = e.message;
      return null;
    }
  }

  sendForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    var text = messageInput.value;
    if (!text) return;
    if (!active(conn)) {
      sendNote.textContent = 'Not connected: press Connect first.';
      return;
    }
    var said = sendOn(conn, text, sendNote);
    if (said === null) return;
    messageInput.value = '';
    var hint = '';
    if (wsMode === 'r') hint = ' This token is read-only, so the server will not relay it.';
    else if (wsMode === 'w') hint = ' This token is write-only, so it is not echoed here. Check the audit pane.';
    sendNote.textContent = said + hint;
  });

  $('clear-messages').addEventListener('click', function () { messagesEl.textContent = ''; });

  // ---------------------------------------------------------------- audit connection

  var auditChannelInput = $('audit-channel');
  var auditBtn = $('audit-connect');
  var auditStatus = $('audit-status');
  var auditList = $('audit-messages');

  var audit = null;
  var auditWanted = true;   // false after the user presses Disconnect

  function auditUpdateButton() {
    auditBtn.textContent = auditWanted ? 'Disconnect' : 'Connect';
  }

  function auditConnect() {
    if (audit) { var old = audit; audit = null; old.close(1000, 'client disconnected'); }
    var channel = auditChannelInput.value.trim() || 'audit';
    var c;
    try {
      // It keeps trying as long as the pane is wanted.
      c = pgwsConnect({ url: wsBase(), channel: channel, token: TOKENS.r, minDelay: 1000,
        maxFailedOpens: Infinity });
    } catch (e) {
      setStatus(auditStatus, 'closed', 'not connected: ' + e.message);
      return;
    }
    audit = c;
    var wasOpen = false;
    setStatus(auditStatus, 'connecting', 'connecting…');

    c.on('open', function () {
      if (audit !== c) return;
      wasOpen = true;
      setStatus(auditStatus, 'open', 'open: channel "' + channel + '", mode r');
    });
    c.on('message', function (text) {
      if (audit !== c) return;
      append(auditList, entryFor(text));
    });
    c.on('close', function (ev) {
      if (audit !== c) return;
      var text = closeText(ev, wasOpen, !auditWanted);
      wasOpen = false;
      if (ev.reconnect) text += '. Retrying in ' + seconds(ev.delay);
      else audit = null;
      setStatus(auditStatus, 'closed', text);
    });
  }

  auditBtn.addEventListener('click', function () {
    if (auditWanted) {
      auditWanted = false;
      if (audit) audit.close(1000, 'client disconnected');
      else setStatus(auditStatus, 'closed', 'not connected');
    } else {
      auditWanted = true;
      auditConnect();
    }
    auditUpdateButton();
  });

  auditChannelInput.addEventListener('keydown', function (ev) {
    if (ev.key === 'Enter' && !ev.isComposing) {
      ev.preventDefault();
      auditWanted = true;
      auditUpdateButton();
      auditConnect();
    }
  });

  $('clear-audit').addEventListener('click', function () { auditList.textContent = ''; });

  // ---------------------------------------------------------------- journal connection

  // With "journal = true" pgws keeps messages in PostgreSQL. pgws.js offers the "pgws"
  // subprotocol, so pgws tells it each journaled channel's epoch at open and each journaled
  // message's seq; pgws.js hands them to this page ("stream", "recovered", and the message's
  // info), keeps the last position, and resumes from it when it reconnects by itself. The page
  // also keeps the position in localStorage, for its own Reconnect button and across reloads.
  var POSITIONS_KEY = 'pgws-example-journal-positions';

  var jChannelInput = $('journal-channel');
  var jConnectBtn = $('journal-connect');
  var jForgetBtn = $('journal-forget');
  var jStatus = $('journal-status');
  var jPositionEl = $('journal-position');
  var jStreamEl = $('journal-stream');
  var jSendForm = $('journal-send-form');
  var jMessageInput = $('journal-message');
  var jSendNote = $('journal-send-note');
  var jList = $('journal-messages');

  var journal = null;     // current journal connection
  var positions = loadPositions();   // channel -> {seq, epoch}: the last message shown

  function loadPositions() {
    try {
      var obj = JSON.parse(localStorage.getItem(POSITIONS_KEY) || '{}');
      return (obj && typeof obj === 'object' && !Array.isArray(obj)) ? obj : {};
    } catch (e) {
      return {};   // no storage (privacy mode): positions last as long as the page
    }
  }

  function savePositions() {
    try { localStorage.setItem(POSITIONS_KEY, JSON.stringify(positions)); } catch (e) { /* ignore */ }
  }

  function storedPosition(channel) {
    var p = Object.prototype.hasOwnProperty.call(positions, channel) ? positions[channel] : null;
    return (p && typeof p.seq === 'number' && typeof p.epoch === 'string') ? p : null;
  }

  function shortEpoch(epoch) { return epoch.length > 12 ? epoch.slice(0, 8) + '…' : epoch; }

  function jActive() { return active(journal); }

  function jUpdate() {
    var pos = storedPosition(jChannelInput.value.trim());
    jConnectBtn.textContent = jActive() ? 'Disconnect' : (pos ? 'Reconnect' : 'Connect');
    jForgetBtn.disabled = !pos;
    if (pos) {
      var e = span('', shortEpoch(pos.epoch));
      e.title = 'epoch ' + pos.epoch;
      jPositionEl.textContent = 'Position: seq ' + pos.seq + ' of epoch ';
      jPositionEl.appendChild(e);
      jPositionEl.appendChild(document.createTextNode(
        jActive() ? '' : ' (the next connect resumes after it)'));
    } else {
      jPositionEl.textContent = 'No stored position: the next connect starts with live messages.';
    }
  }

  function setPosition(channel, seq, epoch) {
    positions[channel] = { seq: seq, epoch: epoch };
    savePositions();
    if (channel === jChannelInput.value.trim()) jUpdate();
  }

  function journalConnect() {
    journalDisconnect(true);
    var channel = jChannelInput.value.trim();
    if (!channel) {
      setStatus(jStatus, 'closed', 'not connected: enter a channel');
      jChannelInput.focus();
      return;
    }
    var from = storedPosition(channel);
    var start = {};
    if (from) start[channel] = [from.seq, from.epoch];
    var c;
    try {
      c = pgwsConnect({ url: wsBase(), channel: channel, token: TOKENS.rw, positions: start });
    } catch (e) {
      setStatus(jStatus, 'closed', 'not connected: ' + e.message);
      return;
    }
    c.resumedFrom = from;  // the position it asks to resume after, or null
    c.awayUpTo = 0;        // messages up to this seq were sent while it was away
    journal = c;
    var wasOpen = false;
    setStatus(jStatus, 'connecting', from ? 'connecting, resuming after seq ' + from.seq + '…'
      : 'connecting…');
    jStreamEl.textContent = 'No stream frame yet.';
    jUpdate();

    c.on('open', function (info) {
      if (journal !== c) return;
      wasOpen = true;
      var proto = info.protocol ? ', subprotocol ' + info.protocol : ', no subprotocol';
      setStatus(jStatus, 'open', 'open: channel "' + channel + '", mode rw' + proto);
      jStreamEl.textContent = 'Waiting for the stream frame (none comes if the server runs ' +
        'without journal = true or the channel is not in journal-channels).';
      jUpdate();
    });
    c.on('stream', function (info) { if (journal === c) streamFrame(c, info); });
    c.on('recovered', function (info) { if (journal === c) streamFrame(c, info); });
    c.on('message', function (text, info) {
      if (journal === c) journalEntry(c, text, info.journaled ? info : null);
    });
    c.on('gap', function (gap) {
      if (journal !== c || gap.source !== 'listen') return;  // "journal": see streamFrame
      var li = entryFor('notifications sent while pgws\'s LISTEN session was down were lost ' +
        '(journaled messages are not affected)');
      li.querySelector('.meta').insertBefore(span('tag problem', 'gap'), li.querySelector('.meta').firstChild);
      append(jList, li);
    });
    c.on('close', function (ev) {
      if (journal !== c) return;
      var text = closeText(ev, wasOpen, c.closedByUser);
      wasOpen = false;
      if (ev.reconnect) {
        text += '. Reconnecting in ' + seconds(ev.delay) + ', to resume from the last position';
        c.resumedFrom = storedPosition(channel);
      } else {
        journal = null;
      }
      setStatus(jStatus, 'closed', text);
      jUpdate();
    });
  }

  function journalDisconnect(silent) {
    if (!journal) return;
    var c = journal;
    c.closedByUser = true;
    if (silent) journal = null;
    c.close(1000, 'client disconnected');
    if (silent) jUpdate();
  }

  // pgws's stream frame, as pgws.js reports it: "stream" (a fresh start) or "recovered".
  function streamFrame(c, obj) {
    var channel = String(obj.channel);
    var epoch = String(obj.epoch);
    var seq = Number(obj.seq);
    var from = c.resumedFrom;
    jStreamEl.dataset.recovered = obj.recovered === undefined ? '' : String(obj.recovered);
    var epochSpan = span('', shortEpoch(epoch));
    epochSpan.title = 'epoch ' + epoch;
    var parts;
    if (obj.recovered === true) {
      var after = typeof obj.from === 'number' ? obj.from : (from ? from.seq : 0);
      var away = seq - after;
      c.awayUpTo = seq;
      setPosition(channel, after, epoch);
      parts = ['Resumed after seq ' + after + ': ', span('recovered ok', 'recovered: true'),
        away === 0 ? '. Nothing was sent while away; live messages follow seq ' + seq
          : '. ' + away + (away === 1 ? ' message was' : ' messages were') + ' sent while ' +
            'away: they come first, then live ones after seq ' + seq];
    } else if (obj.recovered === false) {
      setPosition(channel, seq, epoch);
      parts = ['Asked to resume after seq ' + (obj.from !== null ? obj.from : '?') +
        (obj.fromEpoch && obj.fromEpoch !== epoch ? ' of another epoch' : '') + ': ',
        span('recovered bad', 'recovered: false'),
        '. pgws no longer has what was sent meanwhile (the journal was recreated, or retention ' +
        'pruned it), so nothing is replayed; live messages follow seq ' + seq];
    } else {
      setPosition(channel, seq, epoch);
      parts = ['Fresh start (no resume asked): live messages follow seq ' + seq];
    }
    parts.push(' (epoch ', epochSpan, ').');
    jStreamEl.textContent = '';
    parts.forEach(function (part) {
      jStreamEl.appendChild(typeof part === 'string' ? document.createTextNode(part) : part);
    });
  }

  // A message, with its position if it is journaled (pgws.js never delivers one twice).
  function journalEntry(c, text, announced) {
    var li = entryFor(text);
    var meta = li.querySelector('.meta');
    var tags = [];
    if (announced) {
      var channel = announced.channel;
      var seq = announced.seq;
      var pos = storedPosition(channel);
      li.dataset.seq = String(seq);
      tags.push(span('tag seq', 'seq ' + seq));
      if (seq <= c.awayUpTo) tags.push(span('tag away', 'sent while away'));
      if (pos && seq !== pos.seq + 1) {
        tags.push(span('tag problem', seq <= pos.seq ? 'repeated' : 'skipped ' + (pos.seq + 1) +
          (seq - 1 > pos.seq + 1 ? '–' + (seq - 1) : '')));
      }
      setPosition(channel, seq, announced.epoch || (pos ? pos.epoch : ''));
    } else {
      tags.push(span('tag', 'not journaled'));
    }
    for (var i = tags.length - 1; i >= 0; i--) meta.insertBefore(tags[i], meta.firstChild);
    append(jList, li);
  }

  jConnectBtn.addEventListener('click', function () {
    if (jActive()) journalDisconnect(false);
    else journalConnect();
  });

  jChannelInput.addEventListener('input', function () { if (!jActive()) jUpdate(); });
  jChannelInput.addEventListener('keydown', function (ev) {
    if (ev.key === 'Enter' && !ev.isComposing) { ev.preventDefault(); journalConnect(); }
  });

  jForgetBtn.addEventListener('click', function () {
    delete positions[jChannelInput.value.trim()];
    savePositions();
    jUpdate();
  });

  jSendForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    var text = jMessageInput.value;
    if (!text) return;
    if (!jActive()) {
      jSendNote.textContent = 'Not connected: while away, send from the chat pane (channel "' +
        (jChannelInput.value.trim() || 'journal') + '") or with SQL pgws.send(…).';
      return;
    }
    var said = sendOn(journal, text, jSendNote);
    if (said === null) return;
    jMessageInput.value = '';
    jSendNote.textContent = said + ' pgws journals it and it comes back with its seq.';
  });

  $('clear-journal').addEventListener('click', function () { jList.textContent = ''; });

  // ---------------------------------------------------------------- start

  // ?channel=... presets the chat channel.
  try {
    var preset = new URLSearchParams(location.search).get('channel');
    if (preset !== null) channelInput.value = preset;
  } catch (e) { /* ignore */ }

  Array.prototype.forEach.call(document.querySelectorAll('[data-token]'), function (el) {
    el.textContent = TOKENS[el.getAttribute('data-token')] || '';
  });
  $('example-url').textContent = wsUrl('chat', TOKENS.rw);

  showClaims();
  updateButton();
  auditUpdateButton();
  auditConnect();
  jUpdate();

  window.addEventListener('pagehide', function () {
    // Browsers only allow close codes 1000 and 3000-4999 from a page.
    [conn, audit, journal].forEach(function (c) { if (c) c.close(1000, 'page closed'); });
  });
}());
