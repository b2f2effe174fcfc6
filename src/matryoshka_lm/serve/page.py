"""The page at `/`: try the sizes in a browser. A prompt, one or two sizes (every size and cell from /v1/models,
`auto`, or any Mix'n'Match spec typed in), streamed output side by side with tokens/s and the size that served it.

Plain HTML and JavaScript served from this server (no CDN), the script as its own file so the page can forbid
inline script (Content-Security-Policy: default-src 'self'). Text from the model is inserted as text, never HTML.
The page calls the same API as any client: JSON POSTs to /v1/completions with stream: true (an API key, when the
server has one, is typed into the page and kept in memory only).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'"

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>matryoshka-lm</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; } .sub { color: #666; margin: 0 0 1rem; font-size: .9rem; }
  textarea { width: 100%; height: 5rem; font: inherit; box-sizing: border-box; }
  .row { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: .6rem 0; }
  .panes { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
  .pane { border: 1px solid #ccc; border-radius: 6px; padding: .7rem; min-height: 8rem; }
  .pane h2 { font-size: 1rem; margin: 0 0 .4rem; } .out { white-space: pre-wrap; font-family: ui-monospace, monospace; }
  .stat { color: #555; font-size: .85rem; margin-top: .5rem; } .err { color: #b00; }
  input[type=number] { width: 5rem; } input.spec { width: 11rem; } button { font: inherit; padding: .3rem 1.2rem; }
</style>
</head>
<body>
<h1>matryoshka-lm</h1>
<p class="sub" id="model-line">one model, every size: pick one or two and compare them on the same prompt</p>
<textarea id="prompt" placeholder="Type a prompt">To be, or not to be</textarea>
<div class="row">
  <label>size A <select id="size-a"></select></label>
  <label>or spec <input class="spec" id="spec-a" placeholder="e.g. S,M,L,XL or M@int4"></label>
  <label>size B <select id="size-b"></select></label>
  <label>or spec <input class="spec" id="spec-b" placeholder="empty: A only"></label>
</div>
<div class="row">
  <label>max tokens <input type="number" id="max-tokens" value="64" min="1"></label>
  <label>temperature <input type="number" id="temperature" value="0.8" min="0" max="2" step="0.1"></label>
  <label>API key <input type="password" id="api-key" placeholder="if the server needs one"></label>
  <button id="run">Generate</button>
</div>
<div class="panes">
  <div class="pane" id="pane-a"><h2 id="title-a">A</h2>
    <div class="out" id="out-a"></div><div class="stat" id="stat-a"></div></div>
  <div class="pane" id="pane-b"><h2 id="title-b">B</h2>
    <div class="out" id="out-b"></div><div class="stat" id="stat-b"></div></div>
</div>
<script src="/page.js"></script>
</body>
</html>
"""

JS = r"""'use strict';
const $ = (id) => document.getElementById(id);

function headers() {
  const h = {'Content-Type': 'application/json'};
  const key = $('api-key').value.trim();
  if (key) h['Authorization'] = 'Bearer ' + key;
  return h;
}

async function loadModels() {
  const r = await fetch('/v1/models', {headers: headers()});
  if (!r.ok) { $('model-line').textContent = 'could not list models: HTTP ' + r.status; return; }
  const ids = (await r.json()).data.map((m) => m.id);
  $('model-line').textContent = 'model ' + ids[0].split(':')[0] + ': ' + ids.length + ' sizes and cells';
  for (const [sel, first] of [[$('size-a'), 0], [$('size-b'), 1]]) {
    sel.replaceChildren();
    if (sel.id === 'size-b') sel.append(new Option('(none)', ''));
    for (const id of ids) sel.append(new Option(id.split(':').slice(1).join(':'), id));
    sel.selectedIndex = Math.min(first, sel.options.length - 1);
  }
  $('size-a').dataset.ready = '1';
}

function chosen(which) {
  const spec = $('spec-' + which).value.trim();
  if (spec) return spec.includes(':') ? spec : $('size-a').value.split(':')[0] + ':' + spec;
  return $('size-' + which).value;
}

async function stream(which, model) {
  const out = $('out-' + which), stat = $('stat-' + which);
  out.textContent = ''; stat.textContent = 'waiting...'; stat.className = 'stat';
  $('title-' + which).textContent = model;
  const body = {model: model, prompt: $('prompt').value, max_tokens: Number($('max-tokens').value),
                temperature: Number($('temperature').value), stream: true, stream_options: {include_usage: true}};
  const t0 = performance.now();
  let first = null, tokens = 0, served = model;
  try {
    const r = await fetch('/v1/completions', {method: 'POST', headers: headers(), body: JSON.stringify(body)});
    if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message : 'HTTP ' + r.status); }
    served = r.headers.get('X-Matryoshka-Size') || model;
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
        if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        if (ev.usage) tokens = ev.usage.completion_tokens;
        for (const c of ev.choices || []) {
          if (c.text) { if (first === null) first = performance.now(); out.append(document.createTextNode(c.text)); }
        }
        const s = (performance.now() - t0) / 1000;
        stat.textContent = 'streaming... ' + s.toFixed(1) + ' s';
      }
    }
    const s = (performance.now() - t0) / 1000;
    // decode speed: the tokens after the first over the time since the first arrived
    const rate = first === null || tokens < 2 ? ''
      : ', ' + ((tokens - 1) / ((performance.now() - first) / 1000)).toFixed(1) + ' tokens/s';
    stat.textContent = 'done: ' + tokens + ' tokens in ' + s.toFixed(2) + ' s' + rate + ', served by ' + served;
    stat.dataset.done = '1';
  } catch (e) {
    stat.textContent = 'error: ' + e.message; stat.className = 'stat err'; stat.dataset.done = '1';
  }
}

$('run').addEventListener('click', () => {
  for (const w of ['a', 'b']) {
    delete $('stat-' + w).dataset.done; $('out-' + w).textContent = ''; $('stat-' + w).textContent = '';
  }
  const a = chosen('a'), b = chosen('b');
  stream('a', a);
  if (b) stream('b', b); else $('stat-b').dataset.done = '1';
});
$('api-key').addEventListener('change', loadModels);
loadModels();
"""


def add_page_routes(app: FastAPI) -> None:
    """GET / (the page) and GET /page.js: no API key needed, they hold nothing but the page."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse(HTML, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/page.js", include_in_schema=False)
    async def page_js() -> Response:
        return Response(JS, media_type="text/javascript", headers={"X-Content-Type-Options": "nosniff"})
