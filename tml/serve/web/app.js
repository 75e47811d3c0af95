// Talk to a checkpoint: microphone -> server (one StreamingSession), model audio -> speakers, and a timeline.
// Protocol: tml/serve/server.py. `?autostart=1` starts without the button (headless tests).
'use strict';

const $ = (id) => document.getElementById(id);
const PX_PER_TURN = 6;         // timeline: one micro-turn is 6 px wide
const ACTIVE_DBFS = -45;       // a micro-turn louder than this is drawn as speech

// Everything the page measured, readable from the console or a test (window.tml).
const tml = window.tml = {
  state: 'idle', sampleRate: 0, samplesPerTurn: 0, microTurnS: 0.2,
  sentSamples: 0, turns: 0, audioSamples: 0, text: '', warnings: [], errors: [], roundTripMs: [],
  userLevel: [], modelTurns: [], lastLagMs: 0, behind: false, log: [],
};
let ctx = null, ws = null, mic = null, node = null, nextPlay = 0, pendingTurn = null;
const completedAt = new Map();   // micro-turn -> performance.now() when its last sample was sent
let userSq = 0, userN = 0;       // running sum of squares of the micro-turn being sent

function log(line) {
  tml.log.push(line);
  if (tml.log.length > 14) tml.log.shift();
  $('status').textContent = tml.log.join('\n');
  publish();
}

// The page's counters as data attributes of #status, refreshed every micro-turn (not only when a line is logged).
function publish() {
  Object.assign($('status').dataset, {state: tml.state, turns: tml.turns, audioSamples: tml.audioSamples,
                                      sentSamples: tml.sentSamples, textChars: tml.text.length});
}

function dbfs(sq, n) { return n ? 10 * Math.log10(sq / n + 1e-12) : -120; }

async function start() {
  $('start').disabled = true;
  if (ctx) ctx.close();  // a new session: fresh counters, clock and timeline
  Object.assign(tml, {sentSamples: 0, turns: 0, audioSamples: 0, text: '', roundTripMs: [], userLevel: [],
                      modelTurns: [], behind: false});
  completedAt.clear(); userSq = 0; userN = 0; nextPlay = 0; pendingTurn = null;
  try {
    const status = await (await fetch('/status')).json();
    tml.sampleRate = status.sample_rate; tml.samplesPerTurn = status.samples_per_turn;
    tml.microTurnS = status.micro_turn_ms / 1000;
    try { ctx = new AudioContext({sampleRate: tml.sampleRate}); }  // the browser resamples mic and playback
    catch (e) { ctx = new AudioContext(); }                          // worklet resamples instead
    await ctx.resume();
    await ctx.audioWorklet.addModule('/capture.js');
    mic = await navigator.mediaDevices.getUserMedia({audio: {
      channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
    const source = ctx.createMediaStreamSource(mic);
    node = new AudioWorkletNode(ctx, 'capture', {processorOptions: {outRate: tml.sampleRate},
                                                 outputChannelCount: [1]});
    source.connect(node);
    node.connect(ctx.destination);  // silent output; keeps the worklet pulled
    connect();
  } catch (e) {
    fail(`could not start: ${e.name || ''} ${e.message || e}`);
  }
}

function connect() {
  ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => ws.send(JSON.stringify({type: 'start', format: 'f32le', sample_rate: tml.sampleRate}));
  ws.onmessage = (ev) => (typeof ev.data === 'string' ? onJson(JSON.parse(ev.data)) : onAudio(ev.data));
  ws.onclose = (ev) => {
    if (tml.state === 'running') log(`connection closed (${ev.code} ${ev.reason || ''})`);
    stop(false);
  };
}

function onJson(msg) {
  if (msg.type === 'ready') {
    tml.state = 'running';
    tml.session = msg.session;
    $('stop').disabled = false;
    $('checkpoint').textContent = `${msg.checkpoint} · session ${msg.session} · ${msg.sample_rate} Hz · ` +
      `${msg.micro_turn_ms} ms micro-turns · browser audio at ${ctx.sampleRate} Hz`;
    log(`ready: session ${msg.session}, ${msg.sessions} of ${msg.max_sessions} sessions in use`);
    node.port.onmessage = (e) => sendAudio(e.data);
  } else if (msg.type === 'turn') {
    pendingTurn = msg;  // its audio follows in the next binary message
  } else if (msg.type === 'warning') {
    tml.warnings.push(msg.message);
    log(`warning: ${msg.message}`);
  } else if (msg.type === 'error') {
    fail(`server: ${msg.message}`);
  }
}

function sendAudio(block) {
  if (!ws || ws.readyState !== WebSocket.OPEN || tml.state !== 'running') return;
  ws.send(block.buffer);
  const n = tml.samplesPerTurn, before = tml.sentSamples;
  tml.sentSamples += block.length;
  for (let i = 0; i < block.length; i++) {
    userSq += block[i] * block[i]; userN++;
    if ((before + i + 1) % n === 0) {   // this sample completes a micro-turn
      const t = (before + i + 1) / n - 1;
      completedAt.set(t, performance.now());
      tml.userLevel.push(dbfs(userSq, userN)); userSq = 0; userN = 0;
    }
  }
}

function onAudio(buffer) {
  const msg = pendingTurn, samples = new Float32Array(buffer);
  pendingTurn = null;
  if (!msg) return;
  const rtt = performance.now() - (completedAt.get(msg.turn) ?? performance.now());
  completedAt.delete(msg.turn);
  tml.roundTripMs.push(rtt);
  tml.turns += 1; tml.audioSamples += samples.length; tml.text += msg.text;
  tml.lastLagMs = msg.lag_ms; tml.behind = msg.behind;
  let sq = 0;
  for (const x of samples) sq += x * x;
  tml.modelTurns.push({turn: msg.turn, at: msg.plays_at_s, level: dbfs(sq, samples.length), text: msg.text,
                       behind: msg.behind});
  // Play it: right after the previous micro-turn, or now if playback ran dry.
  const audio = ctx.createBuffer(1, samples.length, tml.sampleRate);
  audio.copyToChannel(samples, 0);
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(ctx.destination);
  nextPlay = Math.max(nextPlay, ctx.currentTime + 0.02);
  src.start(nextPlay);
  nextPlay += samples.length / tml.sampleRate;
  if (msg.text.trim()) $('said').textContent = tml.text;
  $('said').scrollTop = $('said').scrollHeight;
  metrics(msg, rtt);
  publish();
  if (msg.turn % 5 === 0 || msg.text.trim())
    log(`micro-turn ${msg.turn}: compute ${msg.compute_ms.toFixed(0)} ms, round trip ${rtt.toFixed(0)} ms` +
        (msg.text.trim() ? `, wrote ${JSON.stringify(msg.text)}` : ''));
}

function metrics(msg, rtt) {
  const sorted = [...tml.roundTripMs].sort((a, b) => a - b);
  $('m-turns').textContent = `micro-turns: ${tml.turns}`;
  $('m-rtt').textContent = `round trip: ${rtt.toFixed(0)} ms (median ${sorted[sorted.length >> 1].toFixed(0)})`;
  $('m-compute').textContent = `compute: ${msg.compute_ms.toFixed(0)} ms (RTF ${msg.rtf.toFixed(2)})`;
  $('m-lag').textContent = `lag: ${msg.lag_ms.toFixed(0)} ms`;
  const w = $('warning');
  w.className = msg.behind ? 'on' : '';
  w.textContent = msg.behind ? `Behind real time: the model's output now plays ${msg.lag_ms.toFixed(0)} ms after ` +
    `your input (a real-time model: under ${(tml.microTurnS * 1000).toFixed(0)} ms). This micro-turn took ` +
    `${msg.compute_ms.toFixed(0)} ms of compute for ${(tml.microTurnS * 1000).toFixed(0)} ms of audio.` : '';
}

function draw() {
  const c = $('timeline'), g = c.getContext('2d');
  c.width = c.clientWidth || 1200;
  const W = c.width, T = tml.microTurnS, GUTTER = 46;  // speaker names left of the time axis
  const span = (W - GUTTER) / PX_PER_TURN;               // micro-turns shown
  const now = Math.max(tml.userLevel.length, ...tml.modelTurns.slice(-1).map((m) => m.at / T + 1), span);
  const x0 = now - span;  // leftmost micro-turn shown
  const X = (turn) => GUTTER + (turn - x0) * PX_PER_TURN;
  g.clearRect(0, 0, W, c.height);
  g.font = '11px system-ui, sans-serif';
  g.fillStyle = '#888';
  for (let s = Math.ceil(x0 * T); s <= now * T; s++) {   // a tick every second
    g.fillRect(X(s / T), 0, 1, 6);
    if (s % 5 === 0) g.fillText(`${s} s`, X(s / T) + 2, 10);
  }
  const bar = (x, y, level, color) => {
    const h = Math.max(1, Math.min(40, (level + 80) * 0.6));
    g.fillStyle = level > ACTIVE_DBFS ? color : '#ddd';
    g.fillRect(x, y + 40 - h, PX_PER_TURN - 1, h);
  };
  g.fillStyle = '#1f6fb5'; g.fillText('you', 2, 30);
  g.fillStyle = '#c2571a'; g.fillText('model', 2, 90);
  tml.userLevel.forEach((level, t) => { if (X(t) >= GUTTER) bar(X(t), 15, level, '#1f6fb5'); });
  let textEnd = -Infinity;
  for (const m of tml.modelTurns) {
    const x = X(m.at / T);
    if (x < GUTTER) continue;
    bar(x, 75, m.level, '#c2571a');
    if (m.behind) { g.fillStyle = '#d00'; g.fillRect(x, 118, PX_PER_TURN - 1, 4); }
    const words = m.text.trim();
    if (words && x > textEnd) {
      g.fillStyle = '#c2571a';
      g.fillText(words, x, 140 + 14 * (m.turn % 3));
      textEnd = x + g.measureText(words).width + 4;
    }
  }
  requestAnimationFrame(draw);
}

function fail(message) {
  tml.errors.push(message);
  tml.state = 'error';
  log(message);
  const w = $('warning');
  w.className = 'on';
  w.textContent = message;
  stop(true);
}

function stop(closeSocket = true) {
  if (tml.state === 'running') tml.state = 'stopped';
  if (closeSocket && ws && ws.readyState === WebSocket.OPEN) ws.close(1000, 'stopped');
  if (node) node.port.onmessage = null;
  if (mic) mic.getTracks().forEach((t) => t.stop());
  $('stop').disabled = true;
  $('start').disabled = false;
}

$('start').onclick = start;
$('stop').onclick = () => { stop(true); log('stopped'); };
fetch('/status').then((r) => r.json()).then((s) => {
  $('checkpoint').textContent = `${s.checkpoint} · ${s.sessions} of ${s.max_sessions} sessions in use`;
});
requestAnimationFrame(draw);
if (new URLSearchParams(location.search).get('autostart')) start();
