// flagsvc console: live propagation (Server-Sent Events) and countdowns to temporary reverts.
"use strict";

function liveStrips() {
  document.querySelectorAll("[data-live]").forEach((strip) => {
    const text = strip.querySelector("[data-field=text]");
    const source = new EventSource(strip.dataset.live);
    source.onmessage = (event) => {
      const s = JSON.parse(event.data);
      if (s.error) {
        text.textContent = `live updates paused: ${s.error}`;
        return;
      }
      text.textContent = `version ${s.version}: ${s.applied_current} of ${s.live} live SDK instances current, ` +
        `${s.lagging} lagging, ${s.ofrep} OFREP consumers`;
    };
  });
}

function countdowns() {
  const clocks = document.querySelectorAll("time[data-countdown]");
  if (!clocks.length) return;
  const tick = () => clocks.forEach((clock) => {
    const left = Math.round((Date.parse(clock.dateTime) - Date.now()) / 1000);
    const at = clock.dateTime;
    if (left <= 0) { clock.textContent = `${at} (due now)`; return; }
    const h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
    clock.textContent = `${at} (in ${h ? h + " h " : ""}${m} min ${s} s)`;
  });
  tick();
  setInterval(tick, 1000);
}

document.addEventListener("DOMContentLoaded", () => { liveStrips(); countdowns(); });
