/*
 * OneGen playground: streams POST /generate and shows, as they arrive, the answer token by token,
 * a marker at each retrieval (at its output_text_offset) that opens the retrieved passages, the
 * span an "annotate" retrieval linked, and the request's numbers. A second tab searches with
 * POST /retrieve; the header shows GET /info.
 *
 * Plain ES2020, no framework, nothing loaded from elsewhere. Server data (passages, titles, the
 * answer, error messages) is untrusted: it only ever reaches the page through textContent.
 * The API key stays in this browser (sessionStorage, or localStorage when remembered) and is sent
 * as "Authorization: Bearer" on every API call.
 */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_NAME = "onegen.playground.apiKey";
  const authRequired = document.querySelector('meta[name="onegen-api-key"]')?.content === "required";

  // ------------------------------------------------------------------ small helpers
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function sentence(text) {
    const t = String(text ?? "").trim();
    if (!t) return "";
    return /[.!?]$/.test(t) ? t : `${t}.`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return "–";
    return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
  }

  function fmtMs(ms) {
    if (!Number.isFinite(ms)) return "–";
    return ms < 10 ? `${ms.toFixed(2)} ms` : `${ms.toFixed(1)} ms`;
  }

  function fmtInt(n) {
    return Number.isFinite(n) ? n.toLocaleString("en-US") : "–";
  }

  // The server counts characters as Unicode code points (Python); JavaScript strings index UTF-16 units.
  function utf16Index(text, codePoints) {
    let i = 0;
    for (let n = 0; n < codePoints && i < text.length; n++) {
      const c = text.charCodeAt(i);
      i += c >= 0xd800 && c <= 0xdbff && i + 1 < text.length ? 2 : 1;
    }
    return i;
  }

  // ------------------------------------------------------------------ the API key
  function storage(kind) {
    try {
      return kind === "local" ? window.localStorage : window.sessionStorage;
    } catch (e) {
      return null; // storage disabled: the key lives in this page only
    }
  }

  function readStoredKey() {
    for (const kind of ["session", "local"]) {
      const value = storage(kind)?.getItem(KEY_NAME);
      if (value) return { key: value, remembered: kind === "local" };
    }
    return { key: "", remembered: false };
  }

  const stored = readStoredKey();
  let apiKey = stored.key;

  // accept: what the answer is; a body, when sent, is always JSON
  function apiHeaders(accept, withBody) {
    const headers = { Accept: accept };
    if (withBody) headers["Content-Type"] = "application/json";
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    return headers;
  }

  function saveKey(event) {
    event.preventDefault();
    apiKey = $("api-key").value.trim();
    const remember = $("key-remember").checked;
    storage("session")?.removeItem(KEY_NAME);
    storage("local")?.removeItem(KEY_NAME);
    if (apiKey) storage(remember ? "local" : "session")?.setItem(KEY_NAME, apiKey);
    $("key-status").textContent = apiKey
      ? `Key set: kept in this ${remember ? "browser" : "tab"} only.`
      : "No key set: requests go without one.";
    loadInfo();
  }

  function forgetKey() {
    apiKey = "";
    $("api-key").value = "";
    $("key-remember").checked = false;
    storage("session")?.removeItem(KEY_NAME);
    storage("local")?.removeItem(KEY_NAME);
    $("key-status").textContent = "Key forgotten.";
    loadInfo();
  }

  function askForKey(text) {
    $("key-status").textContent = text;
    $("api-key").focus();
  }

  // ------------------------------------------------------------------ errors in plain words
  async function readError(response) {
    const raw = await response.text().catch(() => "");
    try {
      const body = JSON.parse(raw);
      if (body && typeof body.error === "object" && body.error) return body.error;
      if (body && body.detail) return { message: typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail) };
    } catch (e) {
      // not JSON: a proxy's page or plain text; shown as it is, shortened
    }
    return { message: raw.slice(0, 300) || response.statusText || "no details" };
  }

  function explainHttp(status, error, retryAfter) {
    const msg = error.message || "";
    switch (status) {
      case 401:
        return apiKey
          ? `The server refused the API key (${msg}). Enter the key the server was started with (--api-key) above and choose "Use key".`
          : `This server needs an API key: enter it above and choose "Use key".`;
      case 413:
        return `The request is larger than this server accepts: ${sentence(msg)}`;
      case 422:
        if (error.type === "context_length_exceeded") return `The question is too long for the model: ${sentence(msg)}`;
        if (error.type === "no_index") return `This server has no index, so it cannot search: ${sentence(msg)}`;
        return error.param
          ? `The server refused the setting "${error.param}": ${sentence(msg)}`
          : `The server refused the request: ${sentence(msg)}`;
      case 429:
        return `The server is busy: too many requests are already waiting. Try again ${retryAfter ? `in ${retryAfter} s` : "in a moment"}.`;
      case 503:
        return `The server cannot answer right now (it is loading, shutting down or stalled): ${sentence(msg)}`;
      case 500:
        if (error.type === "server_shutdown") return `The server stopped before this answer was finished: ${sentence(msg)}`;
        return `The server failed on this request: ${sentence(msg)}`;
      default:
        return `The server answered HTTP ${status}: ${sentence(msg)}`;
    }
  }

  function showError(box, text) {
    box.textContent = text;
    box.hidden = false;
  }

  function clearError(box, form) {
    box.textContent = "";
    box.hidden = true;
    for (const input of form.querySelectorAll("[aria-invalid]")) {
      input.removeAttribute("aria-invalid");
      input.removeAttribute("aria-describedby");
    }
  }

  // error.param (e.g. "retrieval.k", "stop[3]", "messages[0].content") -> the input it is about
  function markField(fields, param, box) {
    if (!param) return;
    const root = String(param).replace(/\[\d+\].*$/, "");
    const id = fields[root];
    const input = id && $(id);
    if (!input) return;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", box.id);
    input.focus();
  }

  async function failWithResponse(response, box, fields) {
    const error = await readError(response);
    showError(box, explainHttp(response.status, error, response.headers.get("Retry-After")));
    if (response.status === 401) askForKey("Enter the server's API key.");
    else markField(fields, error.param, box);
  }

  // ------------------------------------------------------------------ /info
  let infoTimer = null;

  async function loadInfo() {
    clearTimeout(infoTimer);
    const box = $("server-info");
    if (authRequired && !apiKey) {
      box.textContent = "This server needs an API key: enter it above to see the model and its index.";
      askForKey("This server needs an API key.");
      return;
    }
    let response;
    try {
      response = await fetch("info", { headers: apiHeaders("application/json", false), cache: "no-store" });
    } catch (e) {
      box.textContent = `Could not reach the server (${e.message}). Is it running?`;
      return;
    }
    if (!response.ok) {
      const error = await readError(response);
      box.textContent = explainHttp(response.status, error, response.headers.get("Retry-After"));
      if (response.status === 401) askForKey(apiKey ? "The server refused this key." : "This server needs an API key.");
      return;
    }
    const info = await response.json();
    renderInfo(info);
    if (info.state === "loading") infoTimer = setTimeout(loadInfo, 2000);
  }

  function renderInfo(info) {
    const parts = [];
    parts.push(el("strong", "model", info.model));
    if (info.demo) {
      parts.push(el("span", "badge demo", "DEMO: random weights, its text is gibberish"));
    }
    if (info.dtype) parts.push(el("span", "fact", `${info.dtype} on ${info.device}`));
    if (info.index) {
      parts.push(el("span", "fact",
        `index: ${fmtInt(info.index.size)} passages (${info.index.type}, ${info.index.dimension}-d)`));
    } else if (info.state === "ready") {
      parts.push(el("span", "fact warn", "no index: the model cannot retrieve"));
    }
    if (info.state !== "ready") parts.push(el("span", "fact warn", `server ${info.state}`));
    $("server-info").replaceChildren(...parts);

    const limits = info.limits || {};
    const maxTokens = $("max-tokens");
    if (limits.max_tokens) {
      maxTokens.max = String(limits.max_tokens);
      if (Number(maxTokens.value) > limits.max_tokens) maxTokens.value = String(limits.max_tokens);
    }
    if (limits.max_retrieve_k) {
      $("k").max = String(Math.min(1000, limits.max_retrieve_k));
      $("search-k").max = String(limits.max_retrieve_k);
      if (Number($("search-k").value) > limits.max_retrieve_k) $("search-k").value = String(limits.max_retrieve_k);
    }
    const defaults = info.retrieval_defaults;
    if (defaults) {
      $("k").placeholder = `model default: ${defaults.k}`;
      $("max-retrievals").placeholder = `model default: ${defaults.max_retrievals}`;
    }
  }

  // ------------------------------------------------------------------ /generate, streamed
  const GENERATE_FIELDS = {
    max_tokens: "max-tokens", temperature: "temperature", top_p: "top-p", "retrieval.k": "k",
    "retrieval.max_retrievals": "max-retrievals", stop: "stop", prompt: "question", messages: "question",
  };
  let run = null; // the request in flight (or the last one): its text, retrievals and numbers

  function optionalInt(id) {
    const value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  }

  function buildRequest() {
    const question = $("question").value;
    const mode = document.querySelector('input[name="mode"]:checked').value;
    const body = mode === "chat" ? { messages: [{ role: "user", content: question }] } : { prompt: question };
    body.max_tokens = Number($("max-tokens").value);
    body.temperature = Number($("temperature").value);
    body.top_p = Number($("top-p").value);
    const stops = $("stop").value.split("\n").map((s) => s.replace(/\r$/, "")).filter((s) => s !== "");
    if (stops.length) body.stop = stops;
    body.retrieval = { enabled: $("retrieval-enabled").checked, return_passages: true };
    const k = optionalInt("k");
    const maxRetrievals = optionalInt("max-retrievals");
    if (k !== undefined) body.retrieval.k = k;
    if (maxRetrievals !== undefined) body.retrieval.max_retrievals = maxRetrievals;
    body.stream = true;
    return body;
  }

  function newRun() {
    return {
      controller: new AbortController(), text: "", retrievals: [], markers: [], tokens: 0, inserted: 0,
      tSend: performance.now(), tFirst: null, tLast: null, final: null, error: null, sawDone: false, streaming: true,
      open: null, renderQueued: false,
    };
  }

  function resetNumbers() {
    for (const id of ["n-ttft", "n-rate", "n-prompt", "n-generated", "n-inserted", "n-total", "n-e2e", "n-finish"]) {
      $(id).textContent = "–";
    }
    $("n-retrievals").replaceChildren(el("li", "none", "none yet"));
  }

  function setBusy(busy) {
    $("generate-button").disabled = busy;
    $("stop-button").disabled = !busy;
    $("output").setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function generate(event) {
    event.preventDefault();
    if (run && run.streaming) return;
    const form = $("generate-form");
    const box = $("generate-error");
    clearError(box, form);
    closePassage(false);
    const body = buildRequest();
    run = newRun();
    const current = run;
    resetNumbers();
    renderOutput(current);
    setBusy(true);
    $("generate-status").textContent = "Sending…";
    try {
      let response;
      try {
        response = await fetch("generate", {
          method: "POST", headers: apiHeaders("text/event-stream", true), body: JSON.stringify(body), signal: current.controller.signal,
          cache: "no-store",
        });
      } catch (e) {
        if (current.controller.signal.aborted) return stopped(current);
        showError(box, `Could not reach the server (${e.message}). Is it still running?`);
        return;
      }
      if (!response.ok) {
        await failWithResponse(response, box, GENERATE_FIELDS);
        $("generate-status").textContent = "";
        return;
      }
      if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream") || !response.body) {
        showError(box, `The server answered with ${response.headers.get("Content-Type") || "no content type"} instead of an event stream.`);
        return;
      }
      $("generate-status").textContent = "Waiting for the first token…";
      try {
        await readEvents(response.body, (data) => onEvent(current, data));
      } catch (e) {
        if (current.controller.signal.aborted) return stopped(current);
        return dropped(current, e.message);
      }
      if (!current.sawDone) dropped(current, "the stream ended before its closing [DONE]");
    } finally {
      current.streaming = false;
      setBusy(false);
      renderOutput(current);
    }
  }

  function stopped(current) {
    $("generate-status").textContent = `Stopped after ${fmtInt(current.tokens)} tokens.`;
  }

  function dropped(current, reason) {
    if (current.final || current.error) return; // the answer (or its error) was complete
    showError($("generate-error"), `The connection dropped before the answer was finished (${reason}). The text above is what arrived.`);
    $("generate-status").textContent = "Incomplete.";
  }

  // Server-sent events: blocks separated by a blank line, "data:" lines inside.
  async function readEvents(stream, onData) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
        if (data.length) onData(data.join("\n"));
      }
    }
  }

  function onEvent(current, data) {
    if (data === "[DONE]") {
      current.sawDone = true;
      return;
    }
    let ev;
    try {
      ev = JSON.parse(data);
    } catch (e) {
      throw new Error("the server sent an event that is not JSON");
    }
    const now = performance.now();
    if (ev.type === "token") {
      if (current.tFirst === null) {
        current.tFirst = now;
        $("n-ttft").textContent = fmtSeconds((now - current.tSend) / 1000);
      }
      current.tLast = now;
      current.tokens += (ev.token_ids || []).length;
      current.text += ev.text || "";
      $("n-generated").textContent = fmtInt(current.tokens);
      if (current.tokens > 1 && now > current.tFirst) {
        $("n-rate").textContent = ((current.tokens - 1) / ((now - current.tFirst) / 1000)).toFixed(1);
      }
      $("generate-status").textContent = `Generating… ${fmtInt(current.tokens)} tokens`;
      queueRender(current);
    } else if (ev.type === "retrieval") {
      addRetrieval(current, ev);
      queueRender(current);
    } else if (ev.type === "final") {
      finish(current, ev);
    } else if (ev.type === "error") {
      const error = ev.error || {};
      current.error = error;
      const words = error.type === "server_shutdown" || error.code === 503
        ? "The server ended this answer early because it is shutting down"
        : "The server failed while writing this answer";
      showError($("generate-error"), `${words}: ${sentence(error.message)} The text above is what arrived.`);
      $("generate-status").textContent = "Ended with an error.";
    }
  }

  function addRetrieval(current, r) {
    const index = current.retrievals.length;
    current.retrievals.push(r);
    current.inserted += r.inserted_tokens || 0;
    $("n-inserted").textContent = fmtInt(current.inserted);
    const list = $("n-retrievals");
    if (index === 0) list.replaceChildren();
    const top = (r.hits || [])[0];
    const what = r.action === "annotate" ? "linked" : `${fmtInt(r.inserted_tokens)} tokens inserted`;
    const item = el("li", null, `${r.query_token}: search ${fmtMs(r.search_ms)}, ${what}`);
    if (top) item.append(el("span", "hit-line", `${top.title || top.doc_id} (${top.score.toFixed(3)})`));
    list.append(item);
  }

  function finish(current, final) {
    current.final = final;
    if (typeof final.text === "string") current.text = final.text; // the server's text is the reference
    if (Array.isArray(final.retrievals) && final.retrievals.length !== current.retrievals.length) {
      current.retrievals = [];
      current.inserted = 0;
      $("n-retrievals").replaceChildren(el("li", "none", "none"));
      for (const r of final.retrievals) addRetrieval(current, r);
    }
    const u = final.usage || {};
    const t = final.timings || {};
    $("n-prompt").textContent = fmtInt(u.prompt_tokens);
    $("n-generated").textContent = fmtInt(u.completion_tokens);
    $("n-inserted").textContent = fmtInt(u.retrieved_tokens);
    $("n-total").textContent = fmtInt(u.total_tokens);
    $("n-e2e").textContent = fmtSeconds(t.e2e_s);
    $("n-finish").textContent = final.finish_reason;
    if (t.time_to_first_token_s !== null && t.time_to_first_token_s !== undefined) {
      const ttft = $("n-ttft");
      const here = ttft.textContent;
      ttft.replaceChildren(document.createTextNode(fmtSeconds(t.time_to_first_token_s)),
        el("span", "sub", here === "–" ? "server" : `server; ${here} in this browser`));
    }
    if (t.inter_token_s) $("n-rate").textContent = (1 / t.inter_token_s).toFixed(1);
    // No [RQ]: the model answered from itself (retrieval on or off); the list and the status say so plainly.
    if (!current.retrievals.length) {
      $("n-retrievals").replaceChildren(el("li", "none", "none: the model answered without retrieving"));
    }
    const n = current.retrievals.length;
    $("generate-status").textContent = `Done (${final.finish_reason}): ${fmtInt(u.completion_tokens)} tokens, ` +
      (n ? `${n} ${n === 1 ? "retrieval" : "retrievals"}.` : "answered without retrieval.");
    queueRender(current);
  }

  // ------------------------------------------------------------------ the answer with its markers
  function queueRender(current) {
    if (current.renderQueued) return;
    current.renderQueued = true;
    requestAnimationFrame(() => {
      current.renderQueued = false;
      if (current === run) renderOutput(current);
    });
  }

  // The mention an "annotate" token linked: the text right before it. A tagged mention
  // ("<e>New York</e>[LK]") is taken whole; otherwise the last word with the capitalised
  // words just before it ("in New York[LK]" -> "New York").
  function mentionSpan(text, floor, end) {
    let e = end;
    while (e > floor && /\s/.test(text[e - 1])) e--;
    const before = text.slice(floor, e);
    const tagged = /<([A-Za-z][\w-]*)[^<>]*>[^<]*<\/\1>$/.exec(before);
    if (tagged) return { start: floor + tagged.index, end: e };
    const word = /(?:\p{Lu}[\p{L}\p{N}'’.-]*\s+)*[\p{L}\p{N}][\p{L}\p{N}'’.-]*$/u.exec(before);
    return word ? { start: floor + word.index, end: e } : null;
  }

  function markerFor(current, index) {
    if (current.markers[index]) return current.markers[index];
    const r = current.retrievals[index];
    const top = (r.hits || [])[0];
    const button = el("button", r.action === "annotate" ? "marker annotate" : "marker");
    button.type = "button";
    button.dataset.index = String(index);
    button.append(el("span", "token", r.query_token), el("span", "num", index + 1));
    const found = top ? (top.title || top.doc_id) : "nothing found";
    button.title = found;
    button.setAttribute("aria-label", `Retrieval ${index + 1}: ${found}. Show the passage.`);
    button.setAttribute("aria-expanded", "false");
    button.setAttribute("aria-controls", "passage-view");
    button.addEventListener("click", () => {
      if (current.open === index) closePassage(true);
      else openPassage(current, index);
    });
    current.markers[index] = button;
    return button;
  }

  function renderOutput(current) {
    const out = $("output");
    const text = current.text;
    const nodes = [];
    const pushText = (a, b) => {
      if (b > a) nodes.push(document.createTextNode(text.slice(a, b)));
    };
    const order = current.retrievals
      .map((r, i) => ({ i, r, at: Math.min(text.length, utf16Index(text, r.output_text_offset)) }))
      .sort((a, b) => a.at - b.at || a.i - b.i);
    let pos = 0;
    for (const m of order) {
      if (m.r.action === "annotate") {
        const span = mentionSpan(text, pos, m.at);
        if (span) {
          pushText(pos, span.start);
          const linked = el("span", "linked", text.slice(span.start, span.end));
          const top = (m.r.hits || [])[0];
          if (top) linked.title = `linked to ${top.title || top.doc_id}`;
          nodes.push(linked);
          pos = span.end;
        }
      }
      pushText(pos, m.at);
      nodes.push(markerFor(current, m.i));
      pos = m.at;
    }
    pushText(pos, text.length);
    if (current.streaming) nodes.push(el("span", "caret"));
    if (!nodes.length) {
      nodes.push(el("span", "placeholder", current.final ? "(the model wrote nothing)" : ""));
    }
    const focused = document.activeElement;
    out.replaceChildren(...nodes);
    if (focused && focused.classList && focused.classList.contains("marker") && out.contains(focused)) {
      focused.focus({ preventScroll: true }); // moved, not replaced: keep the keyboard where it was
    }
  }

  function openPassage(current, index) {
    const r = current.retrievals[index];
    const view = $("passage-view");
    current.open = index;
    for (const m of current.markers) m?.setAttribute("aria-expanded", String(m === current.markers[index]));
    const what = r.action === "annotate"
      ? "linked the text before it"
      : `inserted ${fmtInt(r.inserted_tokens)} passage tokens`;
    $("passage-heading").textContent = `Retrieval ${index + 1}: ${r.query_token} ${what}`;
    $("passage-meta").textContent =
      `At character ${fmtInt(r.output_text_offset)} of the answer (generated token ${fmtInt(r.output_token_index + 1)}); search took ${fmtMs(r.search_ms)}.`;
    const hits = (r.hits || []).map((h, i) => hitItem(h, i));
    $("passage-hits").replaceChildren(...(hits.length ? hits : [el("li", "none", "The search found nothing.")]));
    view.hidden = false;
    $("passage-heading").focus();
  }

  function closePassage(returnFocus) {
    const view = $("passage-view");
    const wasOpen = !view.hidden;
    view.hidden = true;
    if (!run) return;
    const index = run.open;
    run.open = null;
    for (const m of run.markers) m?.setAttribute("aria-expanded", "false");
    if (returnFocus && wasOpen && index !== null && run.markers[index]) run.markers[index].focus();
  }

  function hitItem(h, i) {
    const item = el("li", "hit");
    item.append(el("h4", "hit-title", `${i + 1}. ${h.title || h.doc_id}`));
    const score = Number.isFinite(h.score) ? h.score.toFixed(3) : String(h.score);
    item.append(el("p", "meta", `doc ${h.doc_id} · score ${score}`));
    item.append(el("p", "passage-text", h.text ?? "(the server did not send the passage text)"));
    return item;
  }

  // ------------------------------------------------------------------ /retrieve ("search only")
  const SEARCH_FIELDS = { queries: "search-query", k: "search-k" };

  async function search(event) {
    event.preventDefault();
    const form = $("search-form");
    const box = $("search-error");
    clearError(box, form);
    const body = { queries: $("search-query").value, k: Number($("search-k").value), return_text: true };
    $("search-button").disabled = true;
    $("search-status").textContent = "Searching…";
    $("search-results").replaceChildren();
    try {
      let response;
      try {
        response = await fetch("retrieve", {
          method: "POST", headers: apiHeaders("application/json", true), body: JSON.stringify(body), cache: "no-store",
        });
      } catch (e) {
        showError(box, `Could not reach the server (${e.message}). Is it still running?`);
        $("search-status").textContent = "";
        return;
      }
      if (!response.ok) {
        await failWithResponse(response, box, SEARCH_FIELDS);
        $("search-status").textContent = "";
        return;
      }
      const out = await response.json();
      const hits = (out.results && out.results[0] && out.results[0].hits) || [];
      $("search-status").textContent =
        `${hits.length} ${hits.length === 1 ? "passage" : "passages"}; the server took ${fmtMs(out.search_ms)} (encoding the query included).`;
      $("search-results").replaceChildren(...hits.map((h, i) => hitItem(h, i)));
    } finally {
      $("search-button").disabled = false;
    }
  }

  // ------------------------------------------------------------------ tabs (arrow keys move between them)
  function selectTab(tab, focus) {
    for (const t of document.querySelectorAll('[role="tab"]')) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
  }

  function onTabKey(event) {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const i = tabs.indexOf(document.activeElement);
    if (i < 0) return;
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length], true);
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    $("api-key").value = apiKey;
    $("key-remember").checked = stored.remembered;
    $("key-form").addEventListener("submit", saveKey);
    $("key-forget").addEventListener("click", forgetKey);
    $("generate-form").addEventListener("submit", generate);
    $("stop-button").addEventListener("click", () => run?.controller.abort());
    $("search-form").addEventListener("submit", search);
    $("passage-close").addEventListener("click", () => closePassage(true));
    $("passage-view").addEventListener("keydown", (e) => {
      if (e.key === "Escape") closePassage(true);
    });
    $("question").addEventListener("keydown", (e) => {
      // plain Enter sends; Ctrl/Cmd+Enter is left to the form's own handler below (one submit, not two)
      if (e.key === "Enter" && !e.shiftKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
        e.preventDefault();
        $("generate-form").requestSubmit();
      }
    });
    $("generate-form").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        $("generate-form").requestSubmit();
      }
    });
    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener("click", () => selectTab(tab, false));
    }
    document.querySelector('[role="tablist"]').addEventListener("keydown", onTabKey);
    if (authRequired && !apiKey) $("key-status").textContent = "This server needs an API key.";
    loadInfo();
  }

  init();
})();
