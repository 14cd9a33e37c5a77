// loraflow's page: chat with the model in a chosen fusion mode and see which LoRA each token of
// the answer leaned on. Plain JavaScript, no build step, nothing fetched from outside the server.
//
// The API it uses (runtime/server.py): GET /v1/models (data[0].flow: adapters, n_layer, modes)
// and POST /v1/chat/completions with stream, flow_mode, flow_weights and flow_trace. Every
// answer is requested with flow_trace "layers": the colours are the per-layer weights averaged
// here, and the heatmap is drawn from the very numbers of the answer shown (asking again with
// "layers" would generate a second, possibly different answer and cost a second generation).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    modelId: $("model-id"), mode: $("mode"), weightsBox: $("weights-box"), weights: $("weights"),
    weightsHelp: $("weights-help"), temperature: $("temperature"), maxTokens: $("max-tokens"),
    newChat: $("new-chat"), legend: $("legend"), log: $("log"), error: $("error"),
    composer: $("composer"), input: $("input"), send: $("send"),
  };

  // k = 2: a diverging scale from adapter 0 (blue) through grey-white to adapter 1 (red);
  // k > 2: one colour per adapter (matplotlib's tab10), its intensity by the weight.
  const DIVERGING = [[103, 169, 207], [247, 247, 247], [239, 138, 98]];
  const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                   [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]];
  const WHITE = [255, 255, 255];

  const state = {
    model: null, adapters: [], nLayer: 0, modes: ["off"],
    messages: [],          // the conversation sent with every request
    busy: false, controller: null,
    chat: 0,               // bumped by "new chat": a stream of an older chat stops writing
  };

  // -- colours -------------------------------------------------------------------------------

  const clamp01 = (x) => Math.min(1, Math.max(0, x));
  const mix = (a, b, t) => a.map((v, i) => Math.round(v + (b[i] - v) * t));
  const css = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

  function adapterColour(i, k) {
    if (k === 2) return i === 0 ? DIVERGING[0] : DIVERGING[2];
    return PALETTE[i % PALETTE.length];
  }

  // The background of a token whose (layer-mean) weights are `w`; null: no colour.
  function tokenColour(w) {
    if (!Array.isArray(w) || w.length === 0) return null;
    if (w.length === 1) return mix(WHITE, PALETTE[0], 0.65 * clamp01(w[0]));
    if (w.length === 2) {
      const t = clamp01(w[1]);
      return t < 0.5 ? mix(DIVERGING[0], DIVERGING[1], t * 2) : mix(DIVERGING[1], DIVERGING[2], (t - 0.5) * 2);
    }
    let best = 0;
    for (let i = 1; i < w.length; i++) if (w[i] > w[best]) best = i;
    return mix(WHITE, adapterColour(best, w.length), 0.65 * clamp01(w[best]));
  }

  // The weights of one token as the server sent them: k numbers (per "mean"), a row of k per
  // layer (per "layers") or null (mode off). Returns {mean, layers}.
  function tokenWeights(w) {
    if (!Array.isArray(w) || w.length === 0) return { mean: null, layers: null };
    if (!Array.isArray(w[0])) return { mean: w.map(Number), layers: null };
    const k = w[0].length, mean = new Array(k).fill(0);
    for (const row of w) for (let i = 0; i < k; i++) mean[i] += Number(row[i]) / w.length;
    return { mean, layers: w };
  }

  function fmt(x) { return Number.isFinite(x) ? x.toFixed(3) : String(x); }

  function describeWeights(names, w) {
    if (!w) return "no fusion weights (mode off)";
    return w.map((x, i) => `${names[i] ?? "adapter " + i} ${fmt(x)}`).join(" · ");
  }

  function renderLegend() {
    const k = state.adapters.length;
    els.legend.replaceChildren();
    if (k === 0) {
      els.legend.textContent = "This model has no flow adapter: the answers are the base model's.";
      return;
    }
    if (k === 2) {
      const [a, b] = state.adapters;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.background = `linear-gradient(to right, ${css(DIVERGING[0])}, ${css(DIVERGING[1])}, ${css(DIVERGING[2])})`;
      bar.setAttribute("aria-hidden", "true");
      els.legend.append(swatchLabel(a), " ", bar, " ", swatchLabel(b));
      els.legend.append(note(`colour: the weight of ${b}, 0 to 1 (clamped); the mean over layers`));
    } else {
      state.adapters.forEach((name, i) => {
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.background = css(adapterColour(i, k));
        sw.setAttribute("aria-hidden", "true");
        els.legend.append(sw, swatchLabel(name), " ");
      });
      els.legend.append(note("colour: the adapter with the largest weight, deeper for a larger weight"));
    }
    els.legend.append(note("hover a token for its weights"));
  }

  function swatchLabel(text) {
    const s = document.createElement("span");
    s.className = "adapter-name";
    s.textContent = text;
    return s;
  }

  function note(text) {
    const s = document.createElement("span");
    s.className = "muted note";
    s.textContent = text;
    return s;
  }

  // -- settings ------------------------------------------------------------------------------

  const MODE_LABELS = { dynamic: "dynamic (the gate)", static: "static (fixed weights)",
                        average: "average", off: "off (the base model)" };

  async function loadModels() {
    try {
      const r = await fetch("/v1/models");
      if (!r.ok) throw new Error(`GET /v1/models: HTTP ${r.status}`);
      const model = (await r.json()).data[0];
      state.model = model.id;
      const flow = model.flow;
      if (flow) {
        state.adapters = flow.adapters || [];
        state.nLayer = flow.n_layer || 0;
        state.modes = flow.modes || ["dynamic", "static", "average",
                                     ...state.adapters.map((n) => "single:" + n), "off"];
      }
      els.modelId.textContent = state.model;
      els.mode.replaceChildren(...state.modes.map((m) => {
        const o = document.createElement("option");
        o.value = m;
        o.textContent = MODE_LABELS[m] || (m.startsWith("single:") ? `one LoRA: ${m.slice(7)}` : m);
        return o;
      }));
      const def = flow && flow.default_mode ? flow.default_mode.split(" ")[0] : state.modes[0];
      if (state.modes.includes(def)) els.mode.value = def;
      const k = state.adapters.length;
      if (k) {
        els.weights.value = Array(k).fill(+(1 / k).toFixed(3)).join(",");
        els.weightsHelp.textContent = `${k} numbers, for ${state.adapters.join(", ")} (or one row of ${k} per layer, rows split by ;)`;
      }
      renderLegend();
      showMode();
      document.body.dataset.ready = "1";
    } catch (e) {
      showError(`Could not read the model list: ${e.message}`);
    }
  }

  function showMode() { els.weightsBox.hidden = els.mode.value !== "static"; }

  // The weights field as the API takes them: k numbers, or rows of k split by ";". Text that is
  // not numbers goes as typed, and the server's 400 says what is wrong with it.
  function parseWeights(text) {
    text = text.trim();
    if (!text) return undefined;
    const rows = text.split(";").map((row) => row.split(",").map((s) => s.trim() === "" ? NaN : Number(s)));
    if (rows.some((row) => row.some((x) => !Number.isFinite(x)))) return text;
    return rows.length === 1 ? rows[0] : rows;
  }

  // -- the conversation ----------------------------------------------------------------------

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function addBubble(role) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "you" : "model";
    const body = document.createElement("div");
    body.className = "body";
    el.append(who, body);
    els.log.append(el);
    return { el, who, body };
  }

  function addUser(text) {
    const { body } = addBubble("user");
    body.textContent = text;
  }

  function newAnswer() {
    const bubble = addBubble("assistant");
    bubble.el.dataset.state = "streaming";
    const tail = document.createTextNode("");   // text the coloured tokens do not cover (yet)
    bubble.body.append(tail);
    return { ...bubble, tail, text: "", joined: "", tokens: [], traced: false, adapters: state.adapters,
             nLayer: state.nLayer, per: null, mode: null, heatmap: null };
  }

  function appendTokens(msg, trace) {
    if (trace.adapters) msg.adapters = trace.adapters;
    if (trace.n_layer) msg.nLayer = trace.n_layer;
    if (trace.per) msg.per = trace.per;
    for (const t of trace.tokens || []) {
      const { mean, layers } = tokenWeights(t.weights);
      const tok = { id: t.id, text: String(t.text ?? ""), mean, layers };
      msg.tokens.push(tok);
      msg.joined += tok.text;
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = tok.text;
      span.dataset.id = String(t.id);
      span.dataset.weights = JSON.stringify(mean);
      span.title = describeWeights(msg.adapters, mean);
      const c = tokenColour(mean);
      if (c) span.style.backgroundColor = css(c);
      else span.classList.add("plain");
      msg.body.insertBefore(span, msg.tail);
    }
  }

  // One streamed chunk (an OpenAI chat.completion.chunk with loraflow's flow_trace).
  function onChunk(msg, chunk) {
    if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
    if (chunk.flow_mode) msg.mode = chunk.flow_mode;
    const choice = (chunk.choices || [])[0];
    if (!choice) return;
    const content = (choice.delta && choice.delta.content) || choice.text || "";
    msg.text += content;
    const trace = choice.flow_trace;
    if (trace && typeof trace === "object") {
      msg.traced = true;
      appendTokens(msg, trace);
    }
    // The answer's text past its coloured tokens, uncoloured: all of it from a server without
    // flow_trace, else what a chunk's text runs ahead of its tokens (they may come a chunk later).
    msg.tail.textContent = msg.text.startsWith(msg.joined) ? msg.text.slice(msg.joined.length) : "";
  }

  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = buffer.split(/\r?\n/);
      buffer = done ? "" : lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        if (data) onData(JSON.parse(data));
      }
      if (done) return;
    }
  }

  async function errorOf(response) {
    const text = await response.text();
    try {
      const err = JSON.parse(text).error || {};
      const where = err.param ? ` (${err.param})` : "";
      return `The server answered ${response.status}: ${err.message || text}${where}`;
    } catch (_) {
      return `The server answered ${response.status}: ${text || response.statusText}`;
    }
  }

  function requestBody() {
    const body = { messages: state.messages, stream: true, flow_trace: "layers",
                   flow_mode: els.mode.value };
    if (els.mode.value === "static") {
      const w = parseWeights(els.weights.value);
      if (w !== undefined) body.flow_weights = w;
    }
    const temperature = parseFloat(els.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  function setBusy(busy) {
    state.busy = busy;
    els.send.textContent = busy ? "stop" : "send";
    els.send.setAttribute("aria-label", busy ? "stop the answer" : "send the message");
    document.body.dataset.busy = busy ? "1" : "";
  }

  async function send() {
    const text = els.input.value.trim();
    if (!text || state.busy) return;
    clearError();
    const chat = state.chat;
    state.messages.push({ role: "user", content: text });
    addUser(text);
    els.input.value = "";
    const msg = newAnswer();
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    let failed = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorOf(response));
      await readEvents(response, (chunk) => { if (chat === state.chat) onChunk(msg, chunk); });
    } catch (e) {
      failed = e;
    }
    if (chat !== state.chat) return;   // "new chat" was pressed meanwhile
    state.controller = null;
    setBusy(false);
    const aborted = failed && failed.name === "AbortError";
    if (failed && !aborted) {
      // the turn did not happen: take it back out of the conversation, the text back into the box
      state.messages.pop();
      msg.el.previousElementSibling.remove();
      msg.el.remove();
      if (!els.input.value) els.input.value = text;
      showError(failed.message);
      els.input.focus();
      return;
    }
    state.messages.push({ role: "assistant", content: msg.text });
    finishAnswer(msg, aborted);
    els.input.focus();
  }

  function finishAnswer(msg, aborted) {
    msg.el.dataset.state = "done";
    msg.el.dataset.content = msg.text;
    msg.el.dataset.traced = msg.traced ? "1" : "0";
    if (msg.traced && msg.joined !== msg.text) msg.el.dataset.traceMismatch = "1";
    const bar = document.createElement("div");
    bar.className = "tools";
    if (msg.mode) bar.append(note(msg.mode));
    if (aborted) bar.append(note("stopped"));
    const layers = document.createElement("button");
    layers.type = "button";
    layers.className = "layers";
    layers.textContent = "layers";
    layers.setAttribute("aria-expanded", "false");
    const perLayer = msg.tokens.length > 0 && msg.tokens.some((t) => t.layers);
    if (!perLayer) {
      layers.disabled = true;
      layers.title = msg.traced ? "no per-layer weights in this answer (mode off, or no tokens)"
                                : "the server sent no gate weights (flow_trace) with this answer";
    } else {
      layers.title = "the gate's weights at every layer of this answer, one heatmap per adapter";
    }
    layers.addEventListener("click", () => toggleHeatmap(msg, layers));
    bar.append(layers);
    msg.el.append(bar);
  }

  // -- the per-layer heatmap -----------------------------------------------------------------

  function toggleHeatmap(msg, button) {
    if (msg.heatmap) {
      msg.heatmap.hidden = !msg.heatmap.hidden;
      button.setAttribute("aria-expanded", String(!msg.heatmap.hidden));
      return;
    }
    msg.heatmap = drawHeatmaps(msg);
    msg.el.append(msg.heatmap);
    button.setAttribute("aria-expanded", "true");
  }

  function drawHeatmaps(msg) {
    const box = document.createElement("div");
    box.className = "heatmaps";
    const tokens = msg.tokens.filter((t) => t.layers);
    const nTok = tokens.length, nLayer = tokens[0].layers.length, k = tokens[0].layers[0].length;
    const width = Math.max(200, els.log.clientWidth - 60);
    const cw = Math.max(2, Math.min(14, Math.floor(width / nTok)));
    const ch = Math.max(3, Math.min(10, Math.floor(120 / nLayer)));
    const names = msg.adapters.length === k ? msg.adapters : Array.from({ length: k }, (_, i) => `adapter ${i}`);
    const caption = document.createElement("p");
    caption.className = "muted note";
    caption.textContent = `rows: layers 0 (top) to ${nLayer - 1}; columns: the answer's ${nTok} tokens; ` +
                          "white = 0, full colour = 1 or more (clamped)";
    box.append(caption);
    for (let a = 0; a < k; a++) {
      const figure = document.createElement("figure");
      const label = document.createElement("figcaption");
      label.textContent = names[a];
      const canvas = document.createElement("canvas");
      canvas.className = "heatmap";
      canvas.width = nTok * cw;
      canvas.height = nLayer * ch;
      canvas.dataset.adapter = names[a];
      canvas.dataset.layers = String(nLayer);
      canvas.dataset.tokens = String(nTok);
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `weights of ${names[a]}: ${nLayer} layers by ${nTok} tokens`);
      const ctx = canvas.getContext("2d");
      const colour = adapterColour(a, k);
      for (let t = 0; t < nTok; t++) {
        for (let l = 0; l < nLayer; l++) {
          ctx.fillStyle = css(mix(WHITE, colour, clamp01(Number(tokens[t].layers[l][a]))));
          ctx.fillRect(t * cw, l * ch, cw, ch);
        }
      }
      canvas.addEventListener("mousemove", (ev) => {
        const r = canvas.getBoundingClientRect();
        const t = Math.floor((ev.clientX - r.left) / (r.width / nTok));
        const l = Math.floor((ev.clientY - r.top) / (r.height / nLayer));
        if (t < 0 || t >= nTok || l < 0 || l >= nLayer) return;
        canvas.title = `${names[a]}, layer ${l}, token ${t} ${JSON.stringify(tokens[t].text)}: ` +
                       fmt(Number(tokens[t].layers[l][a]));
      });
      figure.append(label, canvas);
      box.append(figure);
    }
    return box;
  }

  // -- wiring --------------------------------------------------------------------------------

  function newChat() {
    state.chat += 1;
    if (state.controller) state.controller.abort();
    state.controller = null;
    setBusy(false);
    state.messages = [];
    els.log.replaceChildren();
    clearError();
    els.input.focus();
  }

  els.mode.addEventListener("change", showMode);
  els.newChat.addEventListener("click", newChat);
  els.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (state.busy) { if (state.controller) state.controller.abort(); } else send();
  });
  els.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      if (!state.busy) send();
    }
  });

  loadModels();
})();
