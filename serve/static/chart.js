// The live loss chart: uPlot (vendor/, MIT) over the step events, drawn at most once a frame and sized to its box.

export function lossChart(box) {
  const data = [[], []];
  const size = () => ({ width: Math.max(200, box.clientWidth), height: 240 });
  const plot = new window.uPlot({
    ...size(),
    legend: { show: false },
    scales: { x: { time: false } },
    series: [{ label: "step" }, { label: "training loss", stroke: "#c2410c", width: 1.5, points: { show: false } }],
    axes: [{ label: "step" }, { label: "loss" }],
  }, data, box);
  let pending = false;
  const draw = () => {
    pending = false;
    plot.setData(data);
    box.dataset.points = String(data[0].length);
  };
  const resize = () => plot.setSize(size());
  window.addEventListener("resize", resize);
  return {
    add(step, loss) {
      let keep = data[0].length;
      while (keep > 0 && data[0][keep - 1] >= step) keep--; // a resumed run trains again from its saved state's step
      data[0].length = keep;
      data[1].length = keep;
      data[0].push(step);
      data[1].push(loss);
      if (!pending) {
        pending = true;
        requestAnimationFrame(draw);
      }
    },
    destroy() {
      window.removeEventListener("resize", resize);
      plot.destroy();
    },
  };
}
