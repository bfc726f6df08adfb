// pgws example client: plain JS, no build step, nothing fetched from elsewhere.
// All data is put into the page with textContent (never innerHTML).
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
  var AUDIT_RETRY_MIN_MS = 1000;
  var AUDIT_RETRY_MAX_MS = 30000;

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

  // Reads a frame as text (text frames arrive as strings, binary ones as ArrayBuffer).
  function frameText(data) {
    if (typeof data === 'string') return data;
    try { return new TextDecoder().decode(data); } catch (e) { return String(data); }
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

  // ---------------------------------------------------------------- chat socket

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

  var ws = null;          // current chat socket
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

  function updateButton() {
    var active = ws && (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN);
    connectBtn.textContent = active ? 'Disconnect' : 'Connect';
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

    var sock;
    try {
      sock = new WebSocket(wsUrl(channel, token));
    } catch (e) {
      setStatus(statusEl, 'closed', 'not connected: ' + e.message);
      return;
    }
    sock.binaryType = 'arraybuffer';
    ws = sock;
    wsMode = asText(claims.mode);
    var wasOpen = false;
    setStatus(statusEl, 'connecting', 'connecting…');
    updateButton();

    sock.onopen = function () {
      if (ws !== sock) return;
      wasOpen = true;
      setStatus(statusEl, 'open', 'open: channel "' + target + '"' + note +
        (wsMode ? ', mode ' + wsMode : ''));
      updateButton();
    };
    sock.onmessage = function (ev) {
      if (ws !== sock) return;
      append(messagesEl, entryFor(frameText(ev.data)));
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      ws = null;
      setStatus(statusEl, 'closed', closeText(ev, wasOpen, sock.closedByUser));
      updateButton();
    };
    // onerror is always followed by onclose, which carries the code; nothing to do here.
    sock.onerror = function () {};
  }

  function disconnect(silent) {
    if (!ws) return;
    var sock = ws;
    sock.closedByUser = true;
    if (silent) ws = null;    // ignore the old socket's events
    try { sock.close(1000, 'client disconnected'); } catch (e) { /* ignore */ }
    if (silent) updateButton();
  }

  connectBtn.addEventListener('click', function () {
    if (ws && (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN)) {
      disconnect(false);
    } else {
      connect();
    }
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

  sendForm.addEventListener('submit', function (ev) {
    ev.preventDefault();
    var text = messageInput.value;
    if (!text) return;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      sendNote.textContent = 'Not connected: press Connect first.';
      return;
    }
    ws.send(text);
    messageInput.value = '';
    var hint = '';
    if (wsMode === 'r') hint = ' This token is read-only, so the server will not relay it.';
    else if (wsMode === 'w') hint = ' This token is write-only, so it is not echoed here. Check the audit pane.';
    sendNote.textContent = 'Sent ' + text.length + ' characters at ' + clock(new Date()) + '.' + hint;
  });

  $('clear-messages').addEventListener('click', function () { messagesEl.textContent = ''; });

  // ---------------------------------------------------------------- audit socket

  var auditChannelInput = $('audit-channel');
  var auditBtn = $('audit-connect');
  var auditStatus = $('audit-status');
  var auditList = $('audit-messages');

  var audit = null;
  var auditWanted = true;   // false after the user presses Disconnect
  var auditRetryMs = AUDIT_RETRY_MIN_MS;
  var auditTimer = null;

  function auditUpdateButton() {
    auditBtn.textContent = auditWanted ? 'Disconnect' : 'Connect';
  }

  function auditConnect() {
    clearTimeout(auditTimer);
    auditTimer = null;
    if (audit) { var old = audit; audit = null; try { old.close(1000); } catch (e) { /* ignore */ } }
    var channel = auditChannelInput.value.trim() || 'audit';
    var sock;
    try {
      sock = new WebSocket(wsUrl(channel, TOKENS.r));
    } catch (e) {
      setStatus(auditStatus, 'closed', 'not connected: ' + e.message);
      return;
    }
    sock.binaryType = 'arraybuffer';
    audit = sock;
    var wasOpen = false;
    setStatus(auditStatus, 'connecting', 'connecting…');

    sock.onopen = function () {
      if (audit !== sock) return;
      wasOpen = true;
      auditRetryMs = AUDIT_RETRY_MIN_MS;
      setStatus(auditStatus, 'open', 'open: channel "' + channel + '", mode r');
    };
    sock.onmessage = function (ev) {
      if (audit !== sock) return;
      append(auditList, entryFor(frameText(ev.data)));
    };
    sock.onclose = function (ev) {
      if (audit !== sock) return;
      audit = null;
      var text = closeText(ev, wasOpen, !auditWanted);
      if (auditWanted) {
        var secs = Math.round(auditRetryMs / 1000);
        text += '. Retrying in ' + secs + ' s';
        auditTimer = setTimeout(auditConnect, auditRetryMs);
        auditRetryMs = Math.min(auditRetryMs * 2, AUDIT_RETRY_MAX_MS);
      }
      setStatus(auditStatus, 'closed', text);
    };
    sock.onerror = function () {};
  }

  auditBtn.addEventListener('click', function () {
    if (auditWanted) {
      auditWanted = false;
      clearTimeout(auditTimer);
      auditTimer = null;
      if (audit) {
        try { audit.close(1000, 'client disconnected'); } catch (e) { /* ignore */ }
      } else {
        setStatus(auditStatus, 'closed', 'not connected');
      }
    } else {
      auditWanted = true;
      auditRetryMs = AUDIT_RETRY_MIN_MS;
      auditConnect();
    }
    auditUpdateButton();
  });

  auditChannelInput.addEventListener('keydown', function (ev) {
    if (ev.key === 'Enter' && !ev.isComposing) {
      ev.preventDefault();
      auditWanted = true;
      auditRetryMs = AUDIT_RETRY_MIN_MS;
      auditUpdateButton();
      auditConnect();
    }
  });

  $('clear-audit').addEventListener('click', function () { auditList.textContent = ''; });

  // ---------------------------------------------------------------- journal socket

  // With "journal = true" pgws keeps messages in PostgreSQL. A socket that offers the "pgws"
  // subprotocol gets pgws's own messages as binary frames (UTF-8 JSON):
  //   at open, per journaled channel: {"event":"stream","channel":c,"epoch":e,"seq":n}
  //     (with "recovered": true/false when it asked to resume);
  //   before each journaled message: {"channel":c,"seq":n}, then the message's text frame.
  // It resumes by opening /<channel>/<jwt>?resume=<JSON {"<channel>":[seq,"<epoch>"]}>.
  var JOURNAL_SUBPROTOCOL = 'pgws';
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

  var journal = null;     // current journal socket
  var positions = loadPositions();   // channel -> {seq, epoch}: the last message shown

  function loadPositions() {
    try {
      var obj = JSON.parse(localStorage.getItem(POSITIONS_KEY) || '{}');
      return (obj && typeof obj === 'object' && !Array.isArray(obj)) ? obj : {};
    } catch (e) {
      return {};   // no storage (file://, privacy mode): positions last as long as the page
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

  function jActive() {
    return journal && (journal.readyState === WebSocket.CONNECTING ||
      journal.readyState === WebSocket.OPEN);
  }

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
    var url = wsUrl(channel, TOKENS.rw);
    if (from) {
      var resume = {};
      resume[channel] = [from.seq, from.epoch];
      url += '?resume=' + encodeURIComponent(JSON.stringify(resume));
    }
    var sock;
    try {
      sock = new WebSocket(url, [JOURNAL_SUBPROTOCOL]);
    } catch (e) {
      setStatus(jStatus, 'closed', 'not connected: ' + e.message);
      return;
    }
    sock.binaryType = 'arraybuffer';
    sock.channel = channel;
    sock.resumedFrom = from;  // the position it asked to resume after, or null
    sock.awayUpTo = 0;        // messages up to this seq were sent while it was away
    sock.pending = null;      // the {"channel","seq"} frame announcing the next text frame
    sock.epoch = '';          // the stream's epoch, from its stream frame
    journal = sock;
    var wasOpen = false;
    setStatus(jStatus, 'connecting', from ? 'connecting, resuming after seq ' + from.seq + '…'
      : 'connecting…');
    jStreamEl.textContent = 'No stream frame yet.';
    jUpdate();

    sock.onopen = function () {
      if (journal !== sock) return;
      wasOpen = true;
      var proto = sock.protocol ? ', subprotocol ' + sock.protocol : ', no subprotocol';
      setStatus(jStatus, 'open', 'open: channel "' + channel + '", mode rw' + proto);
      jStreamEl.textContent = 'Waiting for the stream frame (none comes if the server runs ' +
        'without journal = true or the channel is not in journal-channels).';
      jUpdate();
    };
    sock.onmessage = function (ev) {
      if (journal !== sock) return;
      if (typeof ev.data === 'string') {
        var announced = sock.pending;
        sock.pending = null;
        journalEntry(sock, ev.data, announced);
      } else {
        journalControl(sock, ev.data);
      }
    };
    sock.onclose = function (ev) {
      if (journal !== sock) return;
      journal = null;
      setStatus(jStatus, 'closed', closeText(ev, wasOpen, sock.closedByUser));
      jUpdate();
    };
    sock.onerror = function () {};
  }

  function journalDisconnect(silent) {
    if (!journal) return;
    var sock = journal;
    sock.closedByUser = true;
    if (silent) journal = null;
    try { sock.close(1000, 'client disconnected'); } catch (e) { /* ignore */ }
    if (silent) jUpdate();
  }

  // A binary frame: pgws's own message, JSON in UTF-8.
  function journalControl(sock, data) {
    var obj = null;
    try { obj = JSON.parse(new TextDecoder().decode(data)); } catch (e) { /* not JSON */ }
    if (!obj || typeof obj !== 'object') return;
    if (obj.event === 'stream') {
      streamFrame(sock, obj);
    } else if (obj.event === 'gap') {
      var li = entryFor('notifications sent while pgws\'s LISTEN session was down were lost ' +
        '(journaled messages are not affected)');
      li.querySelector('.meta').insertBefore(span('tag problem', 'gap'), li.querySelector('.meta').firstChild);
      append(jList, li);
    } else if (typeof obj.seq === 'number' && typeof obj.channel === 'string') {
      sock.pending = obj;
    }
  }

  function streamFrame(sock, obj) {
    var channel = String(obj.channel);
    var epoch = String(obj.epoch);
    var seq = Number(obj.seq);
    var from = sock.resumedFrom;
    sock.epoch = epoch;
    jStreamEl.dataset.recovered = obj.recovered === undefined ? '' : String(obj.recovered);
    var epochSpan = span('', shortEpoch(epoch));
    epochSpan.title = 'epoch ' + epoch;
    var parts;
    if (obj.recovered === true && from) {
      var away = seq - from.seq;
      sock.awayUpTo = seq;
      setPosition(channel, from.seq, epoch);
      parts = ['Resumed after seq ' + from.seq + ': ', span('recovered ok', 'recovered: true'),
        away === 0 ? '. Nothing was sent while away; live messages follow seq ' + seq
          : '. ' + away + (away === 1 ? ' message was' : ' messages were') + ' sent while ' +
            'away: they come first, then live ones after seq ' + seq];
    } else if (obj.recovered === false) {
      setPosition(channel, seq, epoch);
      parts = ['Asked to resume after seq ' + (from ? from.seq : '?') +
        (from && from.epoch !== epoch ? ' of another epoch' : '') + ': ',
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

  // A text frame: a message, announced by a {"channel","seq"} frame if it is journaled.
  function journalEntry(sock, text, announced) {
    var li = entryFor(text);
    var meta = li.querySelector('.meta');
    var tags = [];
    if (announced) {
      var channel = announced.channel;
      var seq = announced.seq;
      var pos = storedPosition(channel);
      li.dataset.seq = String(seq);
      tags.push(span('tag seq', 'seq ' + seq));
      if (seq <= sock.awayUpTo) tags.push(span('tag away', 'sent while away'));
      if (pos && seq !== pos.seq + 1) {
        tags.push(span('tag problem', seq <= pos.seq ? 'repeated' : 'skipped ' + (pos.seq + 1) +
          (seq - 1 > pos.seq + 1 ? '–' + (seq - 1) : '')));
      }
      setPosition(channel, seq, sock.epoch || (pos ? pos.epoch : ''));
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
    if (!journal || journal.readyState !== WebSocket.OPEN) {
      jSendNote.textContent = 'Not connected: while away, send from the chat pane (channel "' +
        (jChannelInput.value.trim() || 'journal') + '") or with SQL pgws.send(…).';
      return;
    }
    journal.send(text);
    jMessageInput.value = '';
    jSendNote.textContent = 'Sent ' + text.length + ' characters at ' + clock(new Date()) +
      '; pgws journals it and it comes back with its seq.';
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
    if (ws) { try { ws.close(1000, 'page closed'); } catch (e) { /* ignore */ } }
    if (audit) { try { audit.close(1000, 'page closed'); } catch (e) { /* ignore */ } }
    if (journal) { try { journal.close(1000, 'page closed'); } catch (e) { /* ignore */ } }
  });
}());
