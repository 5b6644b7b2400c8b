// The clipsearch page: plain modern JavaScript, no build step, no third-party code.
// All state lives here (the server keeps none): the query, the page, the chosen collections.

const $ = (selector) => document.querySelector(selector);

const state = {
  query: null, // {kind: "text", text} | {kind: "image", file} | {kind: "like", id, label}
  page: 1,
  view: "grid", // "grid" | "compare"
  collections: [], // [{server, name, count, model_id, searchable, model}]
  models: {}, // server index -> model name
  image: null, // the File dropped or chosen, until cleared
};

const key = (c) => `${c.server}/${c.name}`;
const byKey = (k) => state.collections.find((c) => key(c) === k);

function setBusy(busy) {
  document.body.dataset.state = busy ? "loading" : "ready";
  if (!busy) document.body.dataset.seq = String(Number(document.body.dataset.seq) + 1);
}

function showError(message) {
  $("#status").textContent = message || "";
}

async function call(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    throw new Error(`${error.code || response.status}: ${error.message || response.statusText}`);
  }
  return body;
}

const ms = (us) => (us / 1000).toFixed(1);

function timingText(result) {
  const t = result.timing;
  return (
    `server ${ms(t.total_us)} ms — queue ${ms(t.queue_us)}, preprocess ${ms(t.preprocess_us)}, ` +
    `inference ${ms(t.inference_us)}, search ${ms(t.search_us)} ms; batch ${t.batch_size}; ` +
    `round trip ${result.round_trip_ms.toFixed(1)} ms`
  );
}

// --- loading the servers and collections ---------------------------------------------------

async function loadInfo() {
  const info = await call("/api/info");
  const parts = [];
  for (const server of info.servers) {
    state.models[server.index] = server.model_name || server.address;
    parts.push(server.error
      ? `${server.address}: ${server.error}`
      : `${server.model_name} (dim ${server.dim}) on ${server.address}`);
  }
  $("#model").textContent = parts.join(" · ");
  const listed = await call("/api/collections");
  state.collections = listed.collections
    .filter((c) => c.searchable)
    .map((c) => ({ ...c, model: state.models[c.server] }));
  const multiServer = info.servers.length > 1;
  const label = (c) => (multiServer ? `${c.name} · ${c.model}` : c.name) + ` (${c.count})`;
  const select = $("#collection");
  select.replaceChildren(...state.collections.map((c) => new Option(label(c), key(c))));
  const options = $("#compare-options");
  options.replaceChildren(...state.collections.map((c, i) => {
    const box = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = key(c);
    input.checked = i < 3;
    input.addEventListener("change", () => run());
    box.append(input, ` ${label(c)}`);
    return box;
  }));
  if (!state.collections.length) showError("no collection built with the served model yet");
}

// --- searching -----------------------------------------------------------------------------

function searchOptions() {
  const topK = Math.max(1, Math.min(200, Number($("#topk").value) || 12));
  return {
    target: $("#target").value,
    top_k: topK,
    offset: (state.page - 1) * topK,
    filter: $("#filter").value.trim(),
  };
}

async function searchOne(collection, query, options) {
  const where = { collection: collection.name, server: collection.server };
  if (query.kind === "image") {
    const form = new FormData();
    form.append("file", query.file);
    for (const [name, value] of Object.entries({ ...options, ...where })) {
      form.append(name, String(value));
    }
    return call("/api/search/upload", { method: "POST", body: form });
  }
  const body = { ...options, ...where };
  if (query.kind === "like") body.like = query.id;
  else body.text = query.text;
  return call("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function hitCard(hit, collection) {
  const card = $("#hit-template").content.firstElementChild.cloneNode(true);
  card.dataset.id = hit.id;
  const thumb = card.querySelector(".thumb");
  if (hit.thumbnail) {
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.caption;
    img.loading = "lazy";
    thumb.append(img);
  } else {
    thumb.textContent = "no preview";
  }
  card.querySelector(".caption").textContent = hit.caption || "(no caption)";
  card.querySelector(".score").textContent = hit.score.toFixed(3);
  const id = card.querySelector(".hit-id");
  id.textContent = hit.id;
  id.title = hit.uri;
  card.querySelector(".similar").addEventListener("click", () => {
    $("#collection").value = key(collection);
    state.query = { kind: "like", id: hit.id, label: hit.caption || hit.id };
    state.page = 1;
    setView("grid");
  });
  return card;
}

function describe(query) {
  if (!query) return "";
  if (query.kind === "like") return `more like ${query.id} (${query.label})`;
  if (query.kind === "image") return `image: ${query.file.name}`;
  return `“${query.text}”`;
}

async function run() {
  showError("");
  if (!state.query) {
    setBusy(false);
    return;
  }
  setBusy(true);
  $("#query-label").textContent = describe(state.query);
  const options = searchOptions();
  try {
    if (state.view === "grid") {
      const collection = byKey($("#collection").value);
      if (!collection) throw new Error("choose a collection");
      const result = await searchOne(collection, state.query, options);
      $("#timing").textContent = timingText(result);
      $("#results").replaceChildren(...result.hits.map((hit) => hitCard(hit, collection)));
      $("#pager").hidden = false;
      $("#page").textContent = `page ${state.page}`;
      $("#prev").disabled = state.page <= 1;
      $("#next").disabled = result.hits.length < options.top_k;
    } else {
      const chosen = [...document.querySelectorAll("#compare-options input:checked")]
        .map((input) => byKey(input.value))
        .filter(Boolean);
      if (chosen.length === 0) throw new Error("choose collections to compare");
      $("#timing").textContent = "";
      const results = await Promise.allSettled(
        chosen.map((c) => searchOne(c, state.query, options)),
      );
      $("#compare").replaceChildren(...chosen.map((c, i) => column(c, results[i])));
    }
  } catch (error) {
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

function column(collection, outcome) {
  const section = document.createElement("section");
  section.className = "column";
  section.dataset.collection = key(collection);
  const title = document.createElement("h2");
  title.textContent = `${collection.name} · ${collection.model}`;
  const timing = document.createElement("div");
  timing.className = "timing";
  const grid = document.createElement("div");
  grid.className = "grid";
  if (outcome.status === "fulfilled") {
    timing.textContent = timingText(outcome.value);
    grid.append(...outcome.value.hits.map((hit) => hitCard(hit, collection)));
  } else {
    timing.textContent = outcome.reason.message;
    timing.classList.add("status");
  }
  section.append(title, timing, grid);
  return section;
}

function setView(view) {
  state.view = view;
  $("#view-grid").classList.toggle("active", view === "grid");
  $("#view-compare").classList.toggle("active", view === "compare");
  $("#results").hidden = view !== "grid";
  $("#compare").hidden = view !== "compare";
  $("#compare-pick").hidden = view !== "compare";
  $("#collection-label").hidden = view !== "grid";
  $("#pager").hidden = view !== "grid" || !state.query;
  if (view === "compare") state.page = 1;
  run();
}

// --- the image query -----------------------------------------------------------------------

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("that is not an image file");
    return;
  }
  state.image = file;
  const preview = $("#query-image");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("#clear-image").hidden = false;
  $("#q").value = "";
  state.query = { kind: "image", file };
  state.page = 1;
  run();
}

function clearImage() {
  state.image = null;
  const preview = $("#query-image");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  $("#clear-image").hidden = true;
  $("#file").value = "";
}

// --- wiring --------------------------------------------------------------------------------

function bind() {
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#q").value.trim();
    if (text) {
      clearImage();
      state.query = { kind: "text", text };
    } else if (state.image) {
      state.query = { kind: "image", file: state.image };
    } else {
      return;
    }
    state.page = 1;
    run();
  });
  for (const id of ["#target", "#collection"]) {
    $(id).addEventListener("change", () => { state.page = 1; run(); });
  }
  $("#file").addEventListener("change", (event) => useImage(event.target.files[0]));
  $("#clear-image").addEventListener("click", clearImage);
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useImage(event.dataTransfer.files[0]);
  });
  $("#prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); run(); });
  $("#next").addEventListener("click", () => { state.page += 1; run(); });
  $("#view-grid").addEventListener("click", () => setView("grid"));
  $("#view-compare").addEventListener("click", () => setView("compare"));
}

bind();
loadInfo()
  .catch((error) => showError(error.message))
  .finally(() => setBusy(false));
