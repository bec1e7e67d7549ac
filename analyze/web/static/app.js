// saelake web UI: sortable tables, contexts, keyboard navigation, notes, live inference. No libraries, no network
// beyond this server.
(function () {
  function cellValue(td) {
    var v = td.getAttribute("data-sort");
    if (v === null) v = td.textContent.trim();
    var n = parseFloat(v.replace(/,/g, "").replace(/%$/, ""));
    return isNaN(n) || !/^[-+]?[\d.,]+(e[-+]?\d+)?%?$/i.test(v.replace(/\s/g, "")) ? v.toLowerCase() : n;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = !th.classList.contains("asc");
        table.querySelectorAll("thead th").forEach(function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(asc ? "asc" : "desc");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a.cells[col]), y = cellValue(b.cells[col]);
          if (typeof x !== typeof y) { x = String(x); y = String(y); }
          return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });

  // "…": a static page carries the hidden tokens; the server sends them when asked.
  document.addEventListener("click", function (e) {
    var more = e.target.closest && e.target.closest(".more");
    if (!more) return;
    var sample = more.closest(".sample"), f = document.getElementById("feature");
    if (sample.querySelector(".t.far") || !f || location.protocol === "file:") { sample.classList.add("open"); return; }
    if (sample.classList.contains("fetching")) return;
    sample.classList.add("fetching");
    var q = "?sae=" + encodeURIComponent(f.dataset.sae) + "&analysis=" + encodeURIComponent(f.dataset.analysis) +
      "&feature=" + f.dataset.feature + "&context=" + encodeURIComponent(more.dataset.context);
    fetch("/api/context" + q).then(function (r) { return r.json(); }).then(function (j) {
      sample.classList.remove("fetching");
      if (j.html) { sample.querySelector(".toks").innerHTML = j.html; sample.classList.add("open"); }
    }).catch(function () { sample.classList.remove("fetching"); });
  });

  var hide = document.getElementById("hide-flagged");
  if (hide) hide.addEventListener("change", function () { document.body.classList.toggle("hide-flagged", hide.checked); });

  var rnd = document.querySelector("button#random[data-features]");
  if (rnd) rnd.addEventListener("click", function () {
    var ids = rnd.getAttribute("data-features").split(",");
    location.href = "feature-" + ids[Math.floor(Math.random() * ids.length)] + ".html";
  });

  // Keyboard: ← → / k j between features on a feature page; ↑ ↓ / k j and Enter in the feature list.
  var list = document.getElementById("features");
  var sel = -1;
  function select(i) {
    var rows = list.tBodies[0].rows;
    if (!rows.length) return;
    sel = Math.max(0, Math.min(rows.length - 1, i));
    Array.prototype.forEach.call(rows, function (r, j) { r.classList.toggle("sel", j === sel); });
    rows[sel].scrollIntoView({block: "nearest"});
  }
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
    var t = e.target.tagName;
    if (t === "INPUT" || t === "TEXTAREA" || t === "SELECT" || e.target.isContentEditable) return;
    var k = e.key, go = null;
    if (document.getElementById("feature")) {
      if (k === "ArrowLeft" || k === "k") go = document.getElementById("prev");
      if (k === "ArrowRight" || k === "j") go = document.getElementById("next");
      if (go) { e.preventDefault(); location.href = go.href; }
    } else if (list) {
      if (k === "ArrowDown" || k === "j") { e.preventDefault(); select(sel + 1); }
      else if (k === "ArrowUp" || k === "k") { e.preventDefault(); select(sel - 1); }
      else if (k === "Enter" && sel >= 0) {
        var a = list.tBodies[0].rows[sel].querySelector("a");
        if (a) { e.preventDefault(); location.href = a.href; }
      }
    }
  });
})();

function gotoFeature(form) {
  var i = parseInt(form.i.value, 10), f = document.getElementById("feature");
  if (!isNaN(i) && f) location.href = "/sae/" + encodeURIComponent(f.dataset.sae) + "/feature/" + i +
    "?analysis=" + encodeURIComponent(f.dataset.analysis);
  return false;
}

function staticSearch(form) {
  var q = form.q.value.trim().toLowerCase(), n = 0;
  document.querySelectorAll("#features tbody tr").forEach(function (r) {
    var hit = !q || (r.dataset.search || "").indexOf(q) >= 0;
    r.style.display = hit ? "" : "none";
    n += hit;
  });
  var c = document.getElementById("list-count");
  if (c) c.textContent = q ? n + " features match “" + form.q.value.trim() + "”" : "";
  return false;
}

function saveNote(form) {
  var f = document.getElementById("feature"), st = document.getElementById("note-status");
  st.textContent = "saving…";
  fetch("/api/note", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({
    sae: f.dataset.sae, analysis: f.dataset.analysis, feature: parseInt(f.dataset.feature, 10), note: form.note.value})})
    .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
    .then(function (res) { st.textContent = res[0] === 200 ? "saved" : (res[1].error || "HTTP " + res[0]); })
    .catch(function (e) { st.textContent = "not saved: " + e; });
  return false;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
  });
}
function shownTok(s) {
  if (s === "") return ["∅", " ws"];
  var c = s.replace(/\r/g, "").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  if (!s.trim()) return [c.replace(/ /g, "·").replace(/[^·↵⇥]/g, function (ch) {
    return "\\u" + ("000" + ch.charCodeAt(0).toString(16)).slice(-4); }), " ws"];
  if (/<0x[0-9A-F]{2}>/.test(s) || s.indexOf("\ufffd") >= 0) return [c, " byte"];
  return [c, ""];
}

function runLive(form) {
  var box = form.closest(".live"), out = box.querySelector(".live-out"), f = document.getElementById("feature");
  var body = {sae: box.dataset.sae, text: form.text.value};
  if (box.dataset.feature !== undefined) body.feature = parseInt(box.dataset.feature, 10);
  if (form.top) body.top = parseInt(form.top.value, 10) || 5;
  var analysis = f ? f.dataset.analysis : box.dataset.analysis;
  if (analysis) body.analysis = analysis;
  var timer = null, button = form.querySelector("button");
  function done() { if (timer) clearInterval(timer); button.disabled = false; }
  button.disabled = true;
  out.innerHTML = '<p class="running sub">running…</p>';
  fetch("/api/live/status?sae=" + encodeURIComponent(box.dataset.sae))
    .then(function (r) { return r.json(); })
    .then(function (s) {
      if (s.model && !s.loaded) {  // the first call loads the model: say so, with a clock
        var t0 = Date.now();
        out.innerHTML = '<p class="loading" id="live-loading"><span class="spinner"></span> loading model <code>' +
          esc(s.model) + '</code> (first use; later runs are fast)… <span class="secs">0 s</span></p>';
        timer = setInterval(function () {
          var el = out.querySelector(".secs");
          if (el) el.textContent = Math.round((Date.now() - t0) / 1000) + " s";
        }, 500);
      }
    }, function () {})
    .then(function () {
      return fetch("/api/live", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    })
    .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
    .then(function (res) {
      done();
      var j = res[1], labels = j.labels || {};
      if (res[0] !== 200 || j.error) { out.innerHTML = '<p class="err">' + esc(j.error || ("HTTP " + res[0])) + "</p>"; return; }
      if (j.acts) {
        var fmax = parseFloat(box.dataset.max) || 0;
        var top = Math.max(fmax, Math.max.apply(null, j.acts.concat([0])));
        var html = j.tokens.map(function (t, i) {
          var a = j.acts[i], alpha = top > 0 ? Math.min(1, a / top) : 0, sh = shownTok(t);
          return '<span class="t' + sh[1] + (a > 0 ? " on" : "") + '" data-i="' + i + '" data-act="' + a + '"' +
            (a > 0 ? ' style="background-color:rgba(255,102,0,' + alpha.toFixed(3) + ')"' : "") +
            ' title="' + esc(JSON.stringify(t)) + " · id " + j.token_ids[i] + " · " + a.toPrecision(4) + '">' +
            esc(sh[0]) + "</span>";
        }).join("");
        var peak = Math.max.apply(null, j.acts.concat([0]));
        out.innerHTML = '<div class="live-tokens">' + html + '</div><p class="sub">max on this text: ' +
          peak.toPrecision(4) + " · feature max in the analysis: " + (fmax ? fmax.toPrecision(4) : "–") + "</p>";
      } else {
        var a = box.dataset.analysis, link = function (f) {
          var lb = labels[String(f)] ? ' <span class="lbl">' + esc(labels[String(f)]) + "</span>" : "";
          return (box.dataset.hasAnalysis === "1" ? '<a href="/sae/' + encodeURIComponent(box.dataset.sae) + "/feature/" + f +
            "?analysis=" + encodeURIComponent(a) + '">' + f + "</a>" : String(f)) + lb;
        };
        var rows = j.tokens.map(function (t, i) {
          var feats = j.top[i].map(function (p) { return '<span class="lf">' + link(p[0]) + " <small>" + p[1].toPrecision(3) + "</small></span>"; });
          return '<tr data-i="' + i + '"><td class="tokcell">' + esc(shownTok(t)[0]) + "</td><td>" + (feats.join(" ") || '<span class="empty">none</span>') + "</td></tr>";
        }).join("");
        out.innerHTML = '<table class="livetop"><thead><tr><th>token</th><th>top features (activation)</th></tr></thead><tbody>' + rows + "</tbody></table>";
      }
    })
    .catch(function (e) { done(); out.innerHTML = '<p class="err">request failed: ' + esc(e) + "</p>"; });
  return false;
}

// steering box (feature page): POST /api/steer -> both continuations side by side, promoted tokens' log-prob changes
function runSteer(form) {
  var box = form.closest(".steer"), out = box.querySelector(".steer-out"), button = form.querySelector("button");
  var body = {sae: box.dataset.sae, feature: parseInt(box.dataset.feature, 10), prompt: form.prompt.value,
              mode: form.mode.value, value: parseFloat(form.value.value), tokens: parseInt(form.tokens.value, 10) || 20};
  button.disabled = true;
  out.innerHTML = '<p class="running sub">generating… (the first run loads the model)</p>';
  fetch("/api/steer", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
    .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
    .then(function (res) {
      button.disabled = false;
      var j = res[1];
      if (res[0] !== 200 || j.error) { out.innerHTML = '<p class="err">' + esc(j.error || ("HTTP " + res[0])) + "</p>"; return; }
      var rows = (j.promoted || []).map(function (p) {
        return '<tr><td class="tokcell">' + esc(shownTok(p.token)[0]) + '</td><td class="n">' + p.logprob_baseline.toFixed(3) +
          '</td><td class="n">' + p.logprob_steered.toFixed(3) + '</td><td class="n ' + (p.change >= 0 ? "pos" : "neg") + '">' +
          (p.change >= 0 ? "+" : "") + p.change.toFixed(3) + "</td></tr>";
      }).join("");
      out.innerHTML = '<div class="steer-cols"><div><h3>baseline</h3><p class="cont" id="steer-baseline">' + esc(j.baseline.text) +
        '</p></div><div><h3>steered (' + esc(j.mode) + " " + j.value.toPrecision(3) + ')</h3><p class="cont" id="steer-steered">' +
        esc(j.steered.text) + "</p></div></div>" + (j.promoted ? '<table class="promoted" id="steer-promoted"><thead><tr>' +
        "<th>promoted token</th><th>log p before</th><th>after</th><th>change</th></tr></thead><tbody>" + rows +
        '</tbody></table><p class="sub">mean change ' + j.mean_logprob_change.toFixed(3) + "</p>" : '<p class="sub">' + esc(j.note) + "</p>");
    })
    .catch(function (e) { button.disabled = false; out.innerHTML = '<p class="err">request failed: ' + esc(e) + "</p>"; });
  return false;
}
