// The job API as the page uses it: JSON requests with the server's token when it has one, the events of a job read
// as server-sent events over fetch (so the token travels in a header and Last-Event-ID resumes after a drop), and
// the job's files as image sources and downloads.

const TOKEN_KEY = "gesso-token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.key = body.key ?? null;
  }
}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function askToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(TOKEN_KEY, input.value);
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

async function request(path, options = {}) {
  for (;;) {
    const r = await fetch(path, { ...options, headers: headers(options.headers) });
    if (r.status !== 401) return r;
    await askToken();
  }
}

// A JSON request; ApiError (the server's one line and the key it names) for a 4xx or 5xx answer.
export async function api(path, body = undefined, method = body === undefined ? "GET" : "POST") {
  const options = { method };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  const r = await request(path, options);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Call onEvent(event) for each of the job's events, from its first, until `signal` aborts; a dropped connection is
// taken up again after the last event seen.
export async function follow(job, onEvent, signal) {
  let last = 0;
  while (!signal.aborted) {
    let reader;
    try {
      const r = await request(`/jobs/${job}/events`, { headers: { "Last-Event-ID": String(last) }, signal });
      if (r.status === 204) { // ended, every event read: a resumed job goes on, so look again now and then
        await sleep(2000);
        continue;
      }
      if (!r.ok) return;
      reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let id = null, data = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) id = Number(line.slice(4));
            else if (line.startsWith("data: ")) data = line.slice(6);
          }
          if (data !== null) {
            last = id;
            onEvent(JSON.parse(data));
          }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      await sleep(1000);
    }
  }
}

// A job's file as an image's source: its URL, or with a token (which an <img> cannot send) a blob of it.
export async function showFile(img, url) {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    img.src = url;
    return;
  }
  const r = await request(url);
  img.src = URL.createObjectURL(await r.blob());
}

// With a token, a download link fetches its file with it and saves the blob under the file's name.
export function downloadLink(url, name) {
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.className = "button";
  a.textContent = "Download";
  a.setAttribute("aria-label", `Download ${name}`);
  a.addEventListener("click", async (e) => {
    if (!sessionStorage.getItem(TOKEN_KEY)) return;
    e.preventDefault();
    const blob = await (await request(url)).blob();
    const save = document.createElement("a");
    save.href = URL.createObjectURL(blob);
    save.download = name;
    save.click();
    URL.revokeObjectURL(save.href);
  });
  return a;
}

// The path of a job's file relative to its folder, as GET /jobs/{id}/files/{path} takes it.
export function fileUrl(job, absolutePath) {
  const rel = absolutePath.startsWith(job.output_dir + "/") ? absolutePath.slice(job.output_dir.length + 1) : absolutePath;
  return `/jobs/${job.id}/files/${rel.split("/").map(encodeURIComponent).join("/")}`;
}
