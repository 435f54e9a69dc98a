// The page talks to serve.py: POST /v1/generate-multipart with stream=true, read as SSE; each
// attached image is one `image` field, in the order shown.
"use strict";

const $ = (id) => document.getElementById(id);
const API = new URLSearchParams(location.search).get("api") ||
  `${location.protocol}//${location.hostname || "localhost"}:8000`;
const REASONS = { stop: "回答完毕", length: "达到最大生成长度", time_limit: "达到时间上限" };

let chosen = [];          // the attached images: {file, url}, in the order they are sent
let maxImages = 4;        // the server's limit per request (GET /health says it)
let controller = null;    // aborts the running request

$("api-base").textContent = API;

// ---------------------------------------------------------------- service status

async function checkHealth() {
  const badge = $("health");
  try {
    const r = await fetch(`${API}/health`, { headers: { "Accept-Language": "zh-CN" } });
    const body = await r.json();
    badge.textContent = r.ok ? `模型已就绪：${body.model}` : "模型加载中…";
    badge.className = r.ok ? "badge ok" : "badge";
    if (r.ok && body.limits && body.limits.max_images) maxImages = body.limits.max_images;
  } catch {
    badge.textContent = "无法连接服务";
    badge.className = "badge bad";
  }
}
checkHealth();
setInterval(checkHealth, 10000);

// ---------------------------------------------------------------- choosing images

function attach(files) {
  hideError();
  for (const f of files) {
    if (chosen.length >= maxImages) {
      showError(`一次最多只能提问 ${maxImages} 张图片，多出的没有加入。`);
      break;
    }
    chosen.push({ file: f, url: URL.createObjectURL(f) });
  }
  showThumbs();
}

function detach(item) {
  chosen = chosen.filter((c) => c !== item);         // its URL stays valid: the history may show it
  hideError();
  showThumbs();
}

function showThumbs() {
  const list = $("thumbs");
  list.replaceChildren(...chosen.map((item, i) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.alt = `第 ${i + 1} 张图片`;
    img.onerror = () => {
      li.prepend(`无法预览 ${item.file.name}（可能不是图片），仍可提交让服务检查。`);
      img.remove();
    };
    img.src = item.url;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.title = `移除第 ${i + 1} 张图片`;
    remove.setAttribute("aria-label", remove.title);
    remove.addEventListener("click", () => detach(item));
    li.append(img, remove);
    return li;
  }));
  $("drop-hint").textContent = chosen.length
    ? `已选 ${chosen.length} 张图片（最多 ${maxImages} 张）。点击或拖入可以再加。`
    : "点击选择图片（可以多选），或把图片拖到这里";
}

$("file").addEventListener("change", (e) => {
  attach(e.target.files);
  e.target.value = "";                 // choosing the same file again fires `change` again
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  attach(e.dataTransfer.files);
});

$("temperature").addEventListener("input", (e) => { $("temperature-value").textContent = e.target.value; });

// ---------------------------------------------------------------- asking

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function busy(on) {
  $("ask").disabled = on;
  $("stop").disabled = !on;
  $("answer").classList.toggle("streaming", on);
}

function addHistory(prompt, answer, imageUrls) {
  const li = document.createElement("li");
  const imgs = imageUrls.map((url) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "";
    return img;
  });
  const q = document.createElement("span");
  q.className = "q";
  q.textContent = prompt;
  const a = document.createElement("div");
  a.className = "a";
  a.textContent = answer || "（空回答）";
  li.append(...imgs, q, a);
  $("history").prepend(li);
}

// Yields each parsed `data:` payload of a server-sent event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask() {
  hideError();
  if (!chosen.length) {
    showError("请先选择一张图片。");
    return;
  }
  const prompt = $("prompt").value.trim() || "描述这张图片";
  const form = new FormData();
  for (const item of chosen) form.append("image", item.file);
  form.append("prompt", prompt);
  form.append("max_new_tokens", $("max-tokens").value);
  form.append("temperature", $("temperature").value);
  form.append("stream", "true");
  if ($("seed").value !== "") form.append("seed", $("seed").value);   // same seed + temperature > 0: same answer

  const answer = $("answer");
  const status = $("status");
  answer.textContent = "";
  status.textContent = "生成中…";
  busy(true);
  controller = new AbortController();
  const started = performance.now();
  const imageUrls = chosen.map((item) => item.url);
  let text = "";
  try {
    const r = await fetch(`${API}/v1/generate-multipart`, {
      method: "POST", body: form, signal: controller.signal, headers: { "Accept-Language": "zh-CN" },
    });
    if (!r.ok) {
      let message = `请求失败（HTTP ${r.status}）。`;
      try { message = (await r.json()).error.message; } catch { /* not JSON */ }
      showError(message);
      status.textContent = "";
      return;
    }
    for await (const event of events(r)) {
      if (event.error) {
        showError(event.error.message);
        break;
      }
      if (event.text) {
        text += event.text;
        answer.textContent = text;
      }
      if (event.finish_reason) {
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        status.textContent = `完成：${event.usage.completion_tokens} 个 token，用时 ${seconds} 秒（${REASONS[event.finish_reason] || event.finish_reason}）`;
        addHistory(prompt, text, imageUrls);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      status.textContent = "已停止。";
      if (text) addHistory(prompt, text + " …", imageUrls);
    } else {
      showError(`无法连接到服务 ${API}：请确认 serve.py 正在运行（make serve-dev）。`);
      status.textContent = "";
    }
  } finally {
    busy(false);
    controller = null;
  }
}

$("ask").addEventListener("click", ask);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask();
});
