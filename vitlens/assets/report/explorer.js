// vitlens report page: the attention explorer and the interactive attention-distance plot. Written by vitlens,
// inlined into index.html; no library, no network. The data is JSON in <script type="application/json"> elements.
(function () {
  "use strict";

  function bytes(b64) {
    var s = atob(b64), a = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }

  function explorer() {
    var el = document.getElementById("explorer-data");
    if (!el) return;
    var D = JSON.parse(el.textContent);
    var gh = D.grid[0], gw = D.grid[1], HW = gh * gw, N = D.num_tokens, H = D.num_heads;
    var P = D.prefix.length, R = P + 1, L = D.layers.length;
    var root = document.querySelector("#explorer .ex");
    var stage = root.querySelector(".ex-stage"), photo = document.getElementById("ex-photo");
    var canvas = document.getElementById("ex-overlay"), marker = document.getElementById("ex-marker");
    var imageSel = document.getElementById("ex-image"), modeSel = document.getElementById("ex-mode");
    var layerIn = document.getElementById("ex-layer"), layerOut = document.getElementById("ex-layer-out");
    var headSel = document.getElementById("ex-head"), status = document.getElementById("ex-status");
    var cache = {};
    // query: the token index in sequence order (prefix tokens first, then patches row-major)
    var S = {image: 0, mode: "attention", layer: L - 1, head: -1, query: P + (gh >> 1) * gw + (gw >> 1)};
    var pinned = S.query;
    canvas.width = gw;
    canvas.height = gh;
    for (var h = 0; h < H; h++) {
      var o = document.createElement("option");
      o.value = String(h);
      o.textContent = String(h);
      headSel.appendChild(o);
    }
    root.hidden = false;

    function arrays(i) {
      if (!cache[i]) {
        var im = D.images[i];
        cache[i] = {mean: bytes(im.mean), heads: bytes(im.heads), rollout: bytes(im.rollout)};
      }
      return cache[i];
    }

    // The stored row for the current state, and what it is, in words.
    function row() {
      var a = arrays(S.image), q = S.query, li = S.layer, start;
      if (S.mode === "rollout") {
        var r = q < P ? q : R - 1;  // patch queries: rollout is stored for the patch mean only
        start = ((li * R) + r) * HW;
        return {data: a.rollout.subarray(start, start + HW),
                what: "rollout of " + (q < P ? D.prefix[q] : "the patch mean") + ", layers " + D.layers[0] +
                      "\u2013" + D.layers[li]};
      }
      if (S.head >= 0 && q < P) {
        start = ((li * H + S.head) * P + q) * HW;
        return {data: a.heads.subarray(start, start + HW), what: "head " + S.head + ", layer " + D.layers[li]};
      }
      start = (li * N + q) * HW;
      var note = S.head >= 0 ? " (per-head rows are kept for prefix queries only)" : "";
      return {data: a.mean.subarray(start, start + HW), what: "head mean, layer " + D.layers[li] + note};
    }

    function queryName(q) {
      if (q < P) return D.prefix[q];
      var k = q - P;
      return "patch (row " + Math.floor(k / gw) + ", col " + (k % gw) + ")";
    }

    function render() {
      var r = row(), ctx = canvas.getContext("2d"), img = ctx.createImageData(gw, gh), d = img.data;
      for (var k = 0; k < HW; k++) {
        var v = r.data[k];
        d[4 * k] = v;  // red is the stored 8-bit value itself: tests read it back
        d[4 * k + 1] = (v * v / 255) | 0;
        d[4 * k + 2] = 0;
        d[4 * k + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      if (S.query >= P) {
        var k2 = S.query - P;
        marker.style.display = "block";
        marker.style.left = (100 * (k2 % gw) / gw) + "%";
        marker.style.top = (100 * Math.floor(k2 / gw) / gh) + "%";
        marker.style.width = (100 / gw) + "%";
        marker.style.height = (100 / gh) + "%";
      } else {
        marker.style.display = "none";
      }
      layerOut.textContent = String(D.layers[S.layer]);
      var buttons = root.querySelectorAll(".ex-q");
      for (var b = 0; b < buttons.length; b++) {
        var bq = buttons[b].getAttribute("data-q");
        buttons[b].classList.toggle("on", bq === "patch" ? S.query >= P : Number(bq) === S.query);
      }
      stage.setAttribute("data-query", String(S.query));
      stage.setAttribute("data-layer", String(S.layer));
      stage.setAttribute("data-mode", S.mode);
      status.textContent = D.images[S.image].name + " \u00b7 query " + queryName(S.query) + " \u00b7 " + r.what;
    }

    function showImage() {
      photo.src = "data:image/png;base64," + D.images[S.image].photo;
    }

    function patchAt(ev) {
      var box = stage.getBoundingClientRect();
      var col = Math.min(gw - 1, Math.max(0, Math.floor((ev.clientX - box.left) / box.width * gw)));
      var rowi = Math.min(gh - 1, Math.max(0, Math.floor((ev.clientY - box.top) / box.height * gh)));
      return P + rowi * gw + col;
    }

    stage.addEventListener("click", function (ev) { pinned = S.query = patchAt(ev); stage.focus(); render(); });
    stage.addEventListener("mousemove", function (ev) { S.query = patchAt(ev); render(); });
    stage.addEventListener("mouseleave", function () { S.query = pinned; render(); });
    stage.addEventListener("keydown", function (ev) {
      var moves = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0]};
      var m = moves[ev.key];
      if (!m) return;
      ev.preventDefault();
      var k = S.query >= P ? S.query - P : (gh >> 1) * gw + (gw >> 1);
      var rr = Math.min(gh - 1, Math.max(0, Math.floor(k / gw) + m[0]));
      var cc = Math.min(gw - 1, Math.max(0, (k % gw) + m[1]));
      pinned = S.query = P + rr * gw + cc;
      render();
    });
    root.querySelector(".ex-queries").addEventListener("click", function (ev) {
      var q = ev.target.getAttribute && ev.target.getAttribute("data-q");
      if (q === null || q === undefined) return;
      pinned = S.query = q === "patch" ? (S.query >= P ? S.query : P + (gh >> 1) * gw + (gw >> 1)) : Number(q);
      render();
    });
    imageSel.addEventListener("change", function () { S.image = Number(imageSel.value); showImage(); render(); });
    modeSel.addEventListener("change", function () { S.mode = modeSel.value; render(); });
    layerIn.addEventListener("input", function () { S.layer = Number(layerIn.value); render(); });
    headSel.addEventListener("change", function () { S.head = Number(headSel.value); render(); });
    showImage();
    render();
  }

  // Attention distance: one dot per (layer, head), the dots of one head joined across layers; hover for numbers.
  function distancePlot() {
    var el = document.getElementById("ad-data");
    if (!el) return;
    var D = JSON.parse(el.textContent), dist = D.distance_px, spread = D.std_px;
    var L = dist.length, H = dist[0].length, W = 640, Ht = 300, m = {l: 48, r: 12, t: 10, b: 34};
    var ymax = 0;
    for (var l = 0; l < L; l++) for (var h = 0; h < H; h++) ymax = Math.max(ymax, dist[l][h]);
    ymax = ymax > 0 ? ymax * 1.08 : 1;
    function x(l) { return m.l + (L > 1 ? l / (L - 1) : 0.5) * (W - m.l - m.r); }
    function y(v) { return Ht - m.b - v / ymax * (Ht - m.t - m.b); }
    var NS = "http://www.w3.org/2000/svg";
    function node(tag, attrs, text) {
      var n = document.createElementNS(NS, tag);
      for (var k in attrs) n.setAttribute(k, attrs[k]);
      if (text !== undefined) n.textContent = text;
      return n;
    }
    var svg = node("svg", {viewBox: "0 0 " + W + " " + Ht, "class": "ad-plot", role: "img",
                           "aria-label": "mean attention distance per layer and head"});
    svg.appendChild(node("line", {x1: m.l, y1: Ht - m.b, x2: W - m.r, y2: Ht - m.b, stroke: "#888"}));
    svg.appendChild(node("line", {x1: m.l, y1: m.t, x2: m.l, y2: Ht - m.b, stroke: "#888"}));
    for (l = 0; l < L; l++) svg.appendChild(node("text", {x: x(l), y: Ht - m.b + 14, "text-anchor": "middle"}, l));
    svg.appendChild(node("text", {x: (W + m.l) / 2, y: Ht - 4, "text-anchor": "middle"}, "layer"));
    for (var t = 0; t <= 4; t++) {
      var v = ymax * t / 4;
      svg.appendChild(node("text", {x: m.l - 4, y: y(v) + 4, "text-anchor": "end"}, v.toFixed(0)));
    }
    svg.appendChild(node("text", {x: 12, y: m.t + 8}, "px"));
    var tip = document.getElementById("ad-tip"), lines = [];
    function colour(h) { return "hsl(" + Math.round(360 * h / H) + ",65%,42%)"; }
    function highlight(h, on) {
      lines[h].setAttribute("class", on ? "hl" : "");
      lines[h].setAttribute("stroke-opacity", on ? "1" : "0.35");
    }
    for (h = 0; h < H; h++) {
      var pts = [];
      for (l = 0; l < L; l++) pts.push(x(l) + "," + y(dist[l][h]));
      lines[h] = node("polyline", {points: pts.join(" "), fill: "none", stroke: colour(h), "stroke-opacity": "0.35",
                                   "data-head": h});
      svg.appendChild(lines[h]);
    }
    for (h = 0; h < H; h++) {
      for (l = 0; l < L; l++) {
        var c = node("circle", {cx: x(l), cy: y(dist[l][h]), r: 4, fill: colour(h), "data-layer": l, "data-head": h});
        c.addEventListener("mouseenter", (function (l, h) {
          return function () {
            highlight(h, true);
            tip.textContent = "layer " + l + ", head " + h + ": distance " + dist[l][h].toFixed(2) + " px, spread " +
              spread[l][h].toFixed(2) + " px";
          };
        })(l, h));
        c.addEventListener("mouseleave", (function (h) { return function () { highlight(h, false); }; })(h));
        svg.appendChild(c);
      }
    }
    document.getElementById("ad-live").appendChild(svg);
  }

  explorer();
  distancePlot();
})();
