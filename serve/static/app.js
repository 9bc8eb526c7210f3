// The page's router: #/ the runs, #/new the new run form, #/jobs/ID a run (or a grid job), #/jobs/ID/grid a grid's form.
import { showRuns } from "./runs.js";
import { showRun } from "./run.js";
import { showGridForm } from "./grid.js";
import { showForm } from "./form.js";
import { h } from "./dom.js";

let current = null; // the AbortController of the view on screen: leaving it stops its polls and streams

function route() {
  if (current) current.abort();
  current = new AbortController();
  const view = document.getElementById("view");
  view.replaceChildren();
  const path = location.hash.replace(/^#/, "") || "/";
  const signal = current.signal;
  let m;
  let shown;
  if (path === "/") shown = showRuns(view, signal);
  else if (path === "/new") shown = showForm(view, signal);
  else if ((m = path.match(/^\/jobs\/(\d+)$/))) shown = showRun(view, Number(m[1]), signal);
  else if ((m = path.match(/^\/jobs\/(\d+)\/grid$/))) shown = showGridForm(view, Number(m[1]), signal);
  else shown = Promise.resolve(view.append(h("p", { text: `Nothing at ${path}.` })));
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#${path}`);
  }
  shown.catch((e) => {
    if (!signal.aborted) view.append(h("p", { class: "error", role: "alert", text: e.message }));
  });
}

window.addEventListener("hashchange", route);
route();
