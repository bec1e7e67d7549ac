// saelake web UI: sortable tables, expandable contexts, live inference. No libraries, no network.
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
  document.addEventListener("click", function (e) {
    if (e.target.classList && e.target.classList.contains("more")) {
      e.target.closest(".sample").classList.add("open");
    }
  });
  var rnd = document.querySelector("button#random[data-features]");
  if (rnd) rnd.addEventListener("click", function () {
    var ids = rnd.getAttribute("data-features").split(",");
    location.href = "feature-" + ids[Math.floor(Math.random() * ids.length)] + ".html";
  });
})();

function gotoFeature(form) {
  var i = parseInt(form.i.value, 10), f = document.getElementById("feature");
  if (!isNaN(i) && f) location.href = "/sae/" + encodeURIComponent(f.dataset.sae) + "/feature/" + i +
    "?analysis=" + encodeURIComponent(f.dataset.analysis);
  return false;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
  });
}
function cleanTok(s) { s = s.replace(/\r/g, "").replace(/\n/g, "↵").replace(/\t/g, "⇥"); return s || "∅"; }

function runLive(form) {
  var box = form.closest(".live"), out = box.querySelector(".live-out");
  var body = {sae: box.dataset.sae, text: form.text.value};
  if (box.dataset.feature !== undefined) body.feature = parseInt(box.dataset.feature, 10);
  if (form.top) body.top = parseInt(form.top.value, 10) || 5;
  out.innerHTML = '<span class="sub">running…</span>';
  fetch("/api/live", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
    .then(function (r) { return r.json().then(function (j) { return [r.status, j]; }); })
    .then(function (res) {
      var j = res[1];
      if (res[0] !== 200 || j.error) { out.innerHTML = '<p class="err">' + esc(j.error || ("HTTP " + res[0])) + "</p>"; return; }
      if (j.acts) {
        var fmax = parseFloat(box.dataset.max) || 0;
        var top = Math.max(fmax, Math.max.apply(null, j.acts.concat([0])));
        var html = j.tokens.map(function (t, i) {
          var a = j.acts[i], alpha = top > 0 ? Math.min(1, a / top) : 0;
          return '<span class="t' + (a > 0 ? " on" : "") + '" data-i="' + i + '" data-act="' + a + '"' +
            (a > 0 ? ' style="background-color:rgba(255,102,0,' + alpha.toFixed(3) + ')"' : "") +
            ' title="' + esc(JSON.stringify(t)) + " · " + a.toPrecision(4) + '">' + esc(cleanTok(t)) + "</span>";
        }).join("");
        var peak = Math.max.apply(null, j.acts.concat([0]));
        out.innerHTML = '<div class="live-tokens">' + html + '</div><p class="sub">max on this text: ' +
          peak.toPrecision(4) + " · feature max in the analysis: " + (fmax ? fmax.toPrecision(4) : "–") + "</p>";
      } else {
        var a = box.dataset.analysis, link = function (f) {
          return box.dataset.hasAnalysis === "1" ? '<a href="/sae/' + encodeURIComponent(box.dataset.sae) + "/feature/" + f +
            "?analysis=" + encodeURIComponent(a) + '">' + f + "</a>" : String(f);
        };
        var rows = j.tokens.map(function (t, i) {
          var feats = j.top[i].map(function (p) { return link(p[0]) + " <small>" + p[1].toPrecision(3) + "</small>"; });
          return '<tr data-i="' + i + '"><td class="tokcell">' + esc(cleanTok(t)) + "</td><td>" + (feats.join(", ") || '<span class="empty">none</span>') + "</td></tr>";
        }).join("");
        out.innerHTML = '<table class="livetop"><thead><tr><th>token</th><th>top features (activation)</th></tr></thead><tbody>' + rows + "</tbody></table>";
      }
    })
    .catch(function (e) { out.innerHTML = '<p class="err">request failed: ' + esc(e) + "</p>"; });
  return false;
}
