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

  window.addEventListener('pagehide', function () {
    // Browsers only allow close codes 1000 and 3000-4999 from a page.
    if (ws) { try { ws.close(1000, 'page closed'); } catch (e) { /* ignore */ } }
    if (audit) { try { audit.close(1000, 'page closed'); } catch (e) { /* ignore */ } }
  });
}());
