// fedssl dashboard: renders one snapshot (fedssl/dashboard/snapshot.py) and, when live, each new one
// pushed by the server over server-sent events. Every value from the run is set as text, never as HTML.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("dashboard-config").textContent);
  const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#1b7c83", "#e16f24", "#57606a"];
  const charts = {};
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }
  const fmt = (x, digits) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "n/a";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function renderOverview(s) {
    $("run-name").textContent = s.run_name;
    $("state").textContent = s.state;
    const r = s.rounds;
    $("rounds-done").textContent = r.done + " / " + (r.planned === null ? "?" : r.planned);
    $("rounds-done").dataset.done = r.done;
    $("rounds-bar").style.width = (r.planned ? Math.min(100, 100 * r.done / r.planned) : 0) + "%";
    $("eta").textContent = s.state === "finished" ? "done" : duration(r.eta_seconds) +
      (r.mean_seconds ? " (" + duration(r.mean_seconds) + "/round)" : "");
    const ok = s.audit.ok;
    const audit = $("audit-status");
    audit.textContent = s.audit.pending ? "verifying…" : ok === null ? "no ledgers" : ok ? "all verified" : "verification FAILED";
    audit.className = "value " + (ok === null ? "" : ok ? "ok" : "bad");
    const errors = $("errors");
    errors.hidden = !s.errors.length;
    errors.replaceChildren(...s.errors.map((e) => el("div", { text: e })));
  }

  function budgetBar(site) {
    if (site.epsilon === null || !site.target_epsilon) return el("span", { text: "n/a" });
    const used = 100 * site.epsilon / site.target_epsilon;
    const bar = el("div", { class: "bar budget" + (used >= 99.5 ? " full" : used >= 80 ? " high" : "") },
      [el("div", { style: "width:" + Math.min(100, used) + "%" })]);
    return el("div", {}, [el("span", { text: used.toFixed(1) + "%" }), bar]);
  }

  function projectionText(site) {
    const p = site.projection;
    if (!p) return "n/a";
    if (p.refuses_round === null) return "not by round " + p.horizon_round;
    return "round " + p.refuses_round + " (ε " + fmt(p.epsilon_then, 3) + ")";
  }

  function ledgerCell(site) {
    const led = site.ledger;
    const cls = led.ok === null ? "ledger" : led.ok ? "ledger ok" : "ledger bad";
    const cell = el("td", { class: cls }, [el("span", { text: led.ok === null ? led.status : led.ok ? "✔ verified" : "✘ " + led.status })]);
    if (led.findings.length) cell.appendChild(el("ul", { class: "findings" }, led.findings.map((f) => el("li", { text: f }))));
    if (led.trust) cell.title = "key: " + led.trust;
    return cell;
  }

  function renderSites(s) {
    const rows = s.sites.map((site) => {
      const c = site.counts;
      const status = el("td", { class: "st-" + site.status }, [el("div", { text: site.status })]);
      if (site.reason) status.appendChild(el("div", { class: "reason", text: site.reason }));
      return el("tr", { "data-site": site.name }, [
        el("td", { text: site.name }), status,
        el("td", { class: "num", text: c.trained + " / " + c.refused + " / " + c.failed }),
        el("td", { class: "num eps", text: fmt(site.epsilon, 3) }),
        el("td", { class: "num target", text: fmt(site.target_epsilon, 3) }),
        el("td", {}, [budgetBar(site)]),
        el("td", { class: "num", text: fmt(site.epsilon_independent, 3) }),
        el("td", { class: "projection", text: projectionText(site) }),
        ledgerCell(site),
      ]);
    });
    $("sites").tBodies[0].replaceChildren(...rows);
    $("projection-rule").textContent = "Budget runs out: " + s.projection_rule + ".";
    $("unattributed").replaceChildren(...s.unattributed_failures.map((f) =>
      el("div", { class: "bad", text: "round " + f.round + ": a reply from node " + f.node_id + " failed and could not be attributed: " + f.reason })));
    const server = s.audit.server;
    $("server-ledger").replaceChildren(server === null ? el("span") : el("div", { class: server.ok ? "ok" : "bad",
      text: "server ledger: " + (server.ok ? "verified" : server.findings.join("; ")) }));
  }

  function renderParticipation(s) {
    const rounds = [...new Set(s.sites.flatMap((site) => site.rounds.map((c) => c.round)))].sort((a, b) => a - b);
    $("participation").tHead.replaceChildren(el("tr", {}, [el("th", { text: "site" }), ...rounds.map((r) => el("th", { text: "r" + r }))]));
    $("participation").tBodies[0].replaceChildren(...s.sites.map((site) => {
      const byRound = Object.fromEntries(site.rounds.map((c) => [c.round, c]));
      return el("tr", { "data-site": site.name }, [el("td", { text: site.name }), ...rounds.map((r) => {
        const c = byRound[r];
        if (!c) return el("td", { class: "cell", text: "–" });
        const td = el("td", { class: "cell st-" + c.status, text: c.status });
        if (c.reason) td.title = c.reason;
        return td;
      })]);
    }));
  }

  function lineChart(id, title, xs, series, yLabel) {
    if (charts[id]) { charts[id].destroy(); delete charts[id]; }
    const target = $(id);
    if (!xs.length || typeof uPlot === "undefined") { target.replaceChildren(el("p", { class: "note", text: "no data yet" })); return; }
    target.replaceChildren();
    const opts = {
      width: Math.max(300, target.clientWidth || 560), height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "round" }, { label: yLabel }],
      series: [{ label: "round" }, ...series.map((s, i) => ({
        label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: s.dash ? 1 : 2,
        dash: s.dash ? [6, 4] : undefined, points: { show: !s.dash }, spanGaps: true }))],
    };
    charts[id] = new uPlot(opts, [xs, ...series.map((s) => s.values)], target);
  }

  function renderCharts(s) {
    const rounds = [...new Set(s.sites.flatMap((site) => site.epsilon_series.map((p) => p.round)))].sort((a, b) => a - b);
    const eps = [];
    s.sites.forEach((site, i) => {
      const at = Object.fromEntries(site.epsilon_series.map((p) => [p.round, p.epsilon]));
      const color = COLORS[i % COLORS.length];
      eps.push({ label: site.name + " ε", color: color, values: rounds.map((r) => (r in at ? at[r] : null)) });
      if (site.target_epsilon) eps.push({ label: site.name + " budget", color: color, dash: true, values: rounds.map(() => site.target_epsilon) });
    });
    lineChart("chart-epsilon", "ε", rounds, eps, "ε");
    const lossRounds = s.rounds.records.map((r) => r.round);
    const loss = s.sites.map((site, i) => {
      const at = Object.fromEntries(site.rounds.map((c) => [c.round, c.pretext_loss]));
      return { label: site.name, color: COLORS[i % COLORS.length], values: lossRounds.map((r) => (at[r] === undefined ? null : at[r])) };
    });
    loss.push({ label: "mean", color: "#24292f", values: s.rounds.records.map((r) => r.mean_pretext_loss) });
    const anyLoss = loss.some((l) => l.values.some((v) => v !== null));
    lineChart("chart-loss", "loss", anyLoss ? lossRounds : [], loss, "loss");
    $("loss-note").textContent = anyLoss || !lossRounds.length ? "" :
      "No site released a pretext loss: under DP a site keeps it (an exact average over its records, computed without noise).";
  }

  function renderEvaluation(s) {
    const ev = s.evaluation;
    $("evaluation-section").hidden = !ev;
    if (ev) {
      const scored = ev.scored_on === "validation" ? "Validation" : "Test";
      $("evaluation-labels").textContent = scored + " accuracy, mean ± std over seeds. " + ev.labels + ".";
      $("evaluation").tHead.replaceChildren(el("tr", {}, ev.header.map((h) => el("th", { text: h }))));
      $("evaluation").tBodies[0].replaceChildren(...ev.rows.map((row) => el("tr", {}, row.map((v) => el("td", { text: v })))));
      $("evaluation-notes").replaceChildren(...ev.notes.map((n) => el("li", { text: n })));
      const xs = ev.fractions.map((f) => 100 * f);
      lineChart("chart-label-efficiency", "accuracy", xs.length > 1 ? xs : [],
        Object.entries(ev.series).map(([row, values]) => ({ label: row, values: values })), "accuracy (x: % labels)");
    }
    const plots = Object.entries(s.plots);
    $("plots-section").hidden = !plots.length;
    $("plots").replaceChildren(...plots.map(([name, uri]) => el("img", { src: uri, alt: name, title: name })));
  }

  // The statement is markdown with **bold** only: alternate text and <strong> nodes, never HTML.
  function renderStatement(text) {
    $("statement").replaceChildren(...text.split("**").map((part, i) => (i % 2 ? el("strong", { text: part }) : document.createTextNode(part))));
  }

  function render(s) {
    renderOverview(s);
    renderSites(s);
    renderParticipation(s);
    renderCharts(s);
    renderEvaluation(s);
    // A quick snapshot (audit pending) carries no statement: keep the last audited one on screen.
    if (!s.audit.pending) renderStatement(s.statement || "No ledgers yet: the statement appears once sites have recorded DP training.");
    $("footer").textContent = s.path + " · snapshot of " + new Date(s.generated_at * 1000).toISOString() +
      (config.live ? "" : " · exported, static");
    document.body.dataset.generatedAt = s.generated_at;
    document.body.dataset.audited = String(!s.audit.pending);
  }

  function setLive(state, text) {
    $("live-dot").className = state;
    $("live-text").textContent = text;
  }

  if (config.snapshot) render(config.snapshot);
  if (config.live) {
    const token = new URLSearchParams(window.location.search).get("token");
    const source = new EventSource("events" + (token ? "?token=" + encodeURIComponent(token) : ""));
    source.addEventListener("snapshot", (event) => {
      render(JSON.parse(event.data));
      setLive("on", "live · updated " + new Date().toLocaleTimeString());
    });
    source.onerror = () => setLive("off", "disconnected, retrying");
  } else {
    setLive("", "exported report");
  }
})();
