/* wsi-view page: the slide (Deep Zoom tiles), its heatmap drawn on the same Deep Zoom grid, the tumour
 * regions as outlines, the slide list and the region list; for a wsi-infer --tta run also the uncertainty
 * map (the views' standard deviation, uncertainty.tif) as a third layer on the same grid, off by default.
 *
 * Data comes as script files calling wsiViewData(key, payload) (data/slides.js, data/<id>/info.js), so the
 * same page works from the wsi-view server, any static web server and a folder opened from disk.
 *
 * Frames: level-0 px of the slide (x right, y down). Deep Zoom level z of n shows level 0 shrunk by
 * d = 2^(n-1-z); its pixel (zx, zy) covers level-0 [zx*d, (zx+1)*d) x [zy*d, (zy+1)*d). A heatmap tile
 * has the slide tile's geometry: pixel centre (zx + 0.5) * d in level-0 px falls in heatmap cell
 * floor(centre / cell_l0) (the rule overlay.png uses), so both layers line up at every zoom.
 */
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const state = {
    slides: [], lut: null, index: -1, info: null, viewer: null, slideItem: null, heatItem: null,
    heat: null, threshold: 0, opacity: 0.5, heatOn: true, regionsOn: true, region: -1, hover: -1,
    unc: null, uncItem: null, uncOn: false, uncLut: null, uncMax: 0.5,
    tileLog: [], tileErrors: 0, messages: [], levels: null, loadSeq: 0, pending: 0, loading: false,
  };

  // -- data loading through script tags -------------------------------------------------------------------
  const waiting = new Map();
  window.wsiViewData = function (key, payload) {
    const w = waiting.get(key);
    if (w) { waiting.delete(key); w(payload); }
  };
  function loadData(key, url) {
    return new Promise((resolve, reject) => {
      waiting.set(key, resolve);
      const s = document.createElement('script');
      s.src = url;
      s.onload = () => {
        s.remove();
        if (waiting.has(key)) { waiting.delete(key); reject(new Error(url + ' did not deliver its data')); }
      };
      s.onerror = () => { s.remove(); waiting.delete(key); reject(new Error('cannot load ' + url)); };
      document.head.appendChild(s);
    });
  }
  const dataUrl = (id, name) => 'data/' + encodeURIComponent(id) + '/' + name;

  // -- messages ---------------------------------------------------------------------------------------------
  function setMessages(list) {
    state.messages = list.filter(Boolean);
    const box = $('messages');
    box.replaceChildren(...state.messages.map((m) => {
      const div = document.createElement('div');
      div.className = 'message';
      div.textContent = m;
      return div;
    }));
  }
  function addMessage(m) { if (!state.messages.includes(m)) setMessages(state.messages.concat([m])); }

  const fmt = (v, digits) => (v === null || v === undefined || !isFinite(v)) ? '–' : Number(v).toFixed(digits);

  // -- Deep Zoom geometry (as wsi_toolkit.view.tiles.DeepZoomGeometry) ---------------------------------------
  function levelDims(w, h) {
    const sizes = [[w, h]];
    while (w > 1 || h > 1) { w = Math.max(1, Math.ceil(w / 2)); h = Math.max(1, Math.ceil(h / 2)); sizes.push([w, h]); }
    return sizes.reverse();
  }
  function tileBox(level, col, row) {
    const s = state.info.slide, ts = s.tile_size, ov = s.overlap;
    const [zw, zh] = state.levels[level];
    const cols = Math.ceil(zw / ts), rows = Math.ceil(zh / ts);
    const bx = ov * (col !== 0), ax = ov * (col !== cols - 1), by = ov * (row !== 0), ay = ov * (row !== rows - 1);
    return [ts * col - bx, ts * row - by, Math.min(ts, zw - ts * col) + bx + ax, Math.min(ts, zh - ts * row) + by + ay];
  }

  // -- heatmap ------------------------------------------------------------------------------------------------
  function decodeHeatmap(hm) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const [rows, cols] = hm.shape_rc;
        const c = document.createElement('canvas');
        c.width = cols; c.height = rows;
        const ctx = c.getContext('2d', { willReadFrequently: true });
        ctx.drawImage(img, 0, 0);
        const px = ctx.getImageData(0, 0, cols, rows).data;
        const value = new Uint8Array(rows * cols), predicted = new Uint8Array(rows * cols);
        for (let k = 0; k < rows * cols; k++) { value[k] = px[4 * k]; predicted[k] = px[4 * k + 3] > 0 ? 1 : 0; }
        resolve({ rows, cols, cell: hm.cell_l0, value, predicted });
      };
      img.onerror = () => reject(new Error('the heatmap picture cannot be decoded'));
      img.src = hm.png;
    });
  }

  /** One heatmap tile as a canvas context: the LUT colour of each pixel's cell, transparent where the cell
   * was not predicted or is below the threshold. */
  function renderHeatTile(level, col, row) {
    return renderCells(state.heat, (v) => state.lut[v], Math.round(state.threshold * 255), level, col, row);
  }
  /** One uncertainty tile: each predicted cell's standard deviation (x 255) in the viridis LUT over
   * 0..uncMax (as overlay.png's uncertainty panel); no threshold. */
  function renderUncTile(level, col, row) {
    return renderCells(state.unc, (v) => state.uncLut[Math.min(255, Math.round(v / state.uncMax))], 0,
      level, col, row);
  }
  function renderCells(hm, colour, thr, level, col, row) {
    const [zx, zy, zw, zh] = tileBox(level, col, row);
    const d = Math.pow(2, state.levels.length - 1 - level);
    const canvas = document.createElement('canvas');
    canvas.width = zw; canvas.height = zh;
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    const img = ctx.createImageData(zw, zh), out = img.data;
    const colCell = new Int32Array(zw);
    for (let i = 0; i < zw; i++) {
      const c = Math.floor((zx + i + 0.5) * d / hm.cell);
      colCell[i] = c < hm.cols ? c : -1;
    }
    for (let j = 0; j < zh; j++) {
      const r = Math.floor((zy + j + 0.5) * d / hm.cell);
      if (r >= hm.rows) continue;
      const base = r * hm.cols;
      for (let i = 0; i < zw; i++) {
        const c = colCell[i];
        if (c < 0) continue;
        const k = base + c;
        const v = hm.value[k];
        if (!hm.predicted[k] || v < thr) continue;
        const o = 4 * (j * zw + i), rgb = colour(v);
        out[o] = rgb[0]; out[o + 1] = rgb[1]; out[o + 2] = rgb[2]; out[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    return ctx;
  }

  function heatmapTileSource(info, layer = 'heatmap', render = renderHeatTile) {
    const s = info.slide;
    const src = new OpenSeadragon.TileSource({
      width: s.width, height: s.height, tileSize: s.tile_size, tileOverlap: s.overlap,
      minLevel: 0, maxLevel: state.levels.length - 1,
    });
    const key = layer + ':' + info.id + ':';
    src.getTileUrl = (level, x, y) => key + level + '/' + x + '_' + y;
    src.getTileHashKey = (level, x, y) => key + level + '/' + x + '_' + y;
    src.hasTransparency = () => true;
    src.downloadTileStart = (job) => {
      const t = job.tile;
      try {
        const ctx = render(t.level, t.x, t.y);
        state.tileLog.push({ layer, level: t.level, x: t.x, y: t.y, w: ctx.canvas.width, h: ctx.canvas.height });
        job.finish(ctx, null, 'context2d');
      } catch (err) {
        job.fail(layer + ' tile: ' + err.message, null);
      }
    };
    src.downloadTileAbort = () => {};
    return src;
  }

  // -- legend ---------------------------------------------------------------------------------------------------
  function drawLegend() {
    const c = $('legend-bar'), ctx = c.getContext('2d');
    const img = ctx.createImageData(256, c.height);
    for (let y = 0; y < c.height; y++) {
      for (let x = 0; x < 256; x++) {
        const o = 4 * (y * 256 + x), rgb = state.lut[x], below = x < Math.round(state.threshold * 255);
        img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = below ? 70 : 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    const t = state.info && state.info.threshold;
    if (t !== null && t !== undefined) {  // the threshold the regions were made with, as overlay.png marks it
      const x = Math.min(255, Math.round(t * 256)) + 0.5;
      ctx.strokeStyle = '#00ffff'; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, c.height); ctx.stroke();
    }
    $('legend-bar').title = 'colour of each probability (overlay.png\'s map); cells below the threshold slider are ' +
      'not drawn' + (t !== null && t !== undefined ? '; cyan mark: the regions\' threshold ' + t : '');
  }

  // -- outlines, hover, region list ---------------------------------------------------------------------------
  function regionPath(region) {
    return region.polygons.map((poly) => poly.map((ring) =>
      'M' + ring.map((p) => p[0] + ' ' + p[1]).join('L') + 'Z').join('')).join('');
  }
  function pointInRegion(region, x, y) {
    const b = region.bbox_l0;
    if (x < b[0] || x > b[2] || y < b[1] || y > b[3]) return false;
    let inside = false;
    for (const poly of region.polygons) {
      for (const ring of poly) {
        for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
          const [xi, yi] = ring[i], [xj, yj] = ring[j];
          if ((yi > y) !== (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) inside = !inside;
        }
      }
    }
    return inside;
  }
  function regionText(r) {
    return fmt(r.area_mm2, 3) + ' mm² · longest ' + fmt(r.longest_diameter_um, 0) + ' µm · max p ' +
      fmt(r.max_prob, 3) + ' · mean p ' + fmt(r.mean_prob, 3);
  }
  function buildOutlines() {
    const g = $('outline-group');
    g.replaceChildren();
    for (const [i, r] of (state.info.regions || []).entries()) {
      const p = document.createElementNS('http://www.w3.org/2000/svg', 'path');
      p.setAttribute('d', regionPath(r));
      p.dataset.index = String(i);
      g.appendChild(p);
    }
    g.style.display = state.regionsOn ? '' : 'none';
  }
  function updateOutlineTransform() {
    const item = state.slideItem;
    if (!item) return;
    const P = OpenSeadragon.Point;
    const o = item.imageToViewerElementCoordinates(new P(0, 0));
    const ex = item.imageToViewerElementCoordinates(new P(1e4, 0));
    const ey = item.imageToViewerElementCoordinates(new P(0, 1e4));
    const m = [(ex.x - o.x) / 1e4, (ex.y - o.y) / 1e4, (ey.x - o.x) / 1e4, (ey.y - o.y) / 1e4, o.x, o.y];
    for (const g of ['outline-group', 'review-group', 'draft-group']) $(g).setAttribute('transform', 'matrix(' + m.join(' ') + ')');
  }
  function markRegions() {
    const paths = $('outline-group').children;
    for (const p of paths) {
      const i = Number(p.dataset.index);
      p.classList.toggle('selected', i === state.region);
      p.classList.toggle('hover', i === state.hover);
    }
    for (const li of $('regions').children) li.classList.toggle('current', Number(li.dataset.index) === state.region);
  }
  function buildRegionList() {
    const ol = $('regions');
    ol.replaceChildren();
    const regions = state.info.regions || [];
    regions.forEach((r, i) => {
      const li = document.createElement('li');
      li.dataset.index = String(i);
      li.textContent = 'max p ' + fmt(r.max_prob, 3);
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = fmt(r.area_mm2, 3) + ' mm² · ' + fmt(r.longest_diameter_um, 0) + ' µm · mean ' + fmt(r.mean_prob, 2);
      li.appendChild(meta);
      li.addEventListener('click', () => selectRegion(i, true));
      ol.appendChild(li);
    });
    if (!regions.length) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = state.info.regions_error ? 'regions not available' : 'no tumour regions';
      ol.appendChild(li);
    }
    $('region-detail').textContent = '';
  }
  function selectRegion(i, zoom) {
    const regions = (state.info && state.info.regions) || [];
    if (!regions.length) return;
    state.region = ((i % regions.length) + regions.length) % regions.length;
    const r = regions[state.region];
    $('region-detail').textContent = r.name + ': ' + regionText(r);
    markRegions();
    if (zoom && state.slideItem) {
      const b = r.bbox_l0, w = b[2] - b[0], h = b[3] - b[1], m = Math.max(w, h) * 0.35 + 64;
      const rect = state.slideItem.imageToViewportRectangle(b[0] - m, b[1] - m, w + 2 * m, h + 2 * m);
      state.viewer.viewport.fitBounds(rect);
    }
  }
  function regionAt(clientX, clientY) {
    if (!state.slideItem || !state.regionsOn) return -1;
    const rect = state.viewer.element.getBoundingClientRect();
    const p = state.slideItem.viewerElementToImageCoordinates(new OpenSeadragon.Point(clientX - rect.left, clientY - rect.top));
    const regions = state.info.regions || [];
    for (let i = 0; i < regions.length; i++) if (pointInRegion(regions[i], p.x, p.y)) return i;
    return -1;
  }

  // -- review mode: outlines drawn, labelled and saved (review.geojson); the review queue -------------------------
  // Outlines are GeoJSON features in level-0 px, drawn in the SVG group that shares the region outlines'
  // level-0 -> screen transform. A server started with --review lets the page edit and save them (PUT with the
  // per-start token from the URL fragment, kept in sessionStorage); elsewhere they are shown read-only.
  const SVG = 'http://www.w3.org/2000/svg';
  const TOKEN_KEY = 'wsi-view-token';
  const review = {
    mode: false, token: '', classes: [], features: [], version: 0, dirty: new Set(), deleted: new Set(),
    selected: null, draft: null, cls: 'Tumor', status: '', saving: false, pressAt: null,
  };
  const queue = { items: [], index: -1, rule: null };

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (v) => v.toString(16).padStart(2, '0')).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }
  const featurePolygons = (f) => f.geometry.type === 'Polygon' ? [f.geometry.coordinates] : f.geometry.coordinates;
  const featureClass = (f) => ((f.properties || {}).classification || {}).name || '';
  function featureRegion(f) {
    const polygons = featurePolygons(f), xs = [], ys = [];
    for (const poly of polygons) for (const ring of poly) for (const p of ring) { xs.push(p[0]); ys.push(p[1]); }
    return { polygons, bbox_l0: [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)] };
  }
  function ringArea(ring) {
    let a = 0;
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) a += (ring[j][0] + ring[i][0]) * (ring[j][1] - ring[i][1]);
    return Math.abs(a) / 2;
  }
  function featureAreaMm2(f) {
    const mpp = state.info && state.info.slide.mpp;
    if (!mpp) return null;
    let px2 = 0;
    for (const poly of featurePolygons(f)) poly.forEach((ring, k) => { px2 += (k === 0 ? 1 : -1) * ringArea(ring); });
    return px2 * mpp * mpp / 1e6;
  }
  const unsaved = () => review.dirty.size > 0 || review.deleted.size > 0;

  function setReviewStatus(text) {
    review.status = text;
    $('review-status').textContent = text;
    $('review-status').title = text;
  }
  function drawReview() {
    const g = $('review-group');
    g.replaceChildren(...review.features.map((f) => {
      const p = document.createElementNS(SVG, 'path');
      p.setAttribute('d', regionPath(featureRegion(f)));
      p.setAttribute('class', 'review cls-' + featureClass(f) + (f.id === review.selected ? ' selected' : ''));
      p.dataset.id = f.id;
      return p;
    }));
    const d = $('draft-group');
    d.replaceChildren();
    if (review.draft && review.draft.length) {
      const p = document.createElementNS(SVG, 'path');
      p.setAttribute('d', 'M' + review.draft.map((q) => q[0] + ' ' + q[1]).join('L'));
      p.setAttribute('class', 'draft cls-' + review.cls);
      d.appendChild(p);
    }
    document.body.dataset.reviewCount = String(review.features.length);
    document.body.dataset.reviewVersion = String(review.version);
    buildReviewList();
  }
  function buildReviewList() {
    const ol = $('review-list');
    ol.replaceChildren(...review.features.map((f) => {
      const li = document.createElement('li');
      li.dataset.id = f.id;
      li.textContent = featureClass(f);
      li.classList.toggle('current', f.id === review.selected);
      const meta = document.createElement('span');
      meta.className = 'meta';
      const props = f.properties || {};
      meta.textContent = fmt(featureAreaMm2(f), 4) + ' mm²' + (props.author ? ' · ' + props.author : '') +
        (review.dirty.has(f.id) ? ' · unsaved' : '');
      li.appendChild(meta);
      li.addEventListener('click', () => selectFeature(f.id, true));
      return li;
    }));
    $('review-empty').hidden = review.features.length > 0;
  }
  function selectFeature(id, zoom) {
    review.selected = id;
    const f = review.features.find((x) => x.id === id);
    if (f && review.mode) setClass(featureClass(f), false);
    drawReview();
    if (f && zoom) fitBox(featureRegion(f).bbox_l0);
  }
  function fitBox(b) {
    if (!state.slideItem) return;
    const w = b[2] - b[0], h = b[3] - b[1], m = Math.max(w, h) * 0.35 + 64;
    state.viewer.viewport.fitBounds(state.slideItem.imageToViewportRectangle(b[0] - m, b[1] - m, w + 2 * m, h + 2 * m));
  }
  function featureAt(x, y) {
    for (let i = review.features.length - 1; i >= 0; i--) {
      if (pointInRegion(featureRegion(review.features[i]), x, y)) return review.features[i].id;
    }
    return null;
  }

  function setClass(name, apply) {
    review.cls = name;
    for (const b of document.querySelectorAll('#review-classes button')) {
      b.setAttribute('aria-pressed', String(b.dataset.cls === name));
    }
    if (apply && review.selected) {
      const f = review.features.find((x) => x.id === review.selected);
      if (f && featureClass(f) !== name) {
        f.properties = { ...(f.properties || {}), classification: { name } };
        review.dirty.add(f.id);
        setReviewStatus('unsaved changes');
      }
    }
    drawReview();
  }
  function startDraft() {
    if (!review.mode || !state.slideItem) return;
    review.draft = [];
    review.selected = null;
    $('stage').classList.add('drawing');
    $('review-draw').setAttribute('aria-pressed', 'true');
    setReviewStatus('drawing: click the corners; double-click or Enter closes, Escape cancels');
    drawReview();
  }
  function endDraft() {
    review.draft = null;
    $('stage').classList.remove('drawing');
    $('review-draw').setAttribute('aria-pressed', 'false');
    drawReview();
  }
  function addVertex(pos) {
    const p = state.slideItem.viewerElementToImageCoordinates(pos);
    const s = state.info.slide;
    const q = [Math.min(s.width, Math.max(0, Math.round(p.x))), Math.min(s.height, Math.max(0, Math.round(p.y)))];
    const last = review.draft[review.draft.length - 1];
    if (last) {  // a double-click's two clicks are one corner
      const a = state.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(last[0], last[1]));
      if (Math.hypot(a.x - pos.x, a.y - pos.y) < 4) return;
    }
    review.draft.push(q);
    drawReview();
  }
  function closeDraft() {
    const pts = review.draft || [];
    if (pts.length < 3) { setReviewStatus('an outline needs at least 3 corners'); endDraft(); return; }
    const f = {
      type: 'Feature', id: newId(),
      geometry: { type: 'Polygon', coordinates: [pts.concat([pts[0]])] },
      properties: { objectType: 'annotation', classification: { name: review.cls } },
    };
    review.features.push(f);
    review.dirty.add(f.id);
    review.selected = f.id;
    endDraft();
    setReviewStatus('unsaved changes');
  }
  function deleteSelected() {
    if (!review.mode || !review.selected) return;
    const id = review.selected;
    review.features = review.features.filter((f) => f.id !== id);
    review.dirty.delete(id);
    review.deleted.add(id);
    review.selected = null;
    setReviewStatus('unsaved changes');
    drawReview();
  }

  async function loadReview(id) {
    let payload;
    try {
      payload = await loadData('review:' + id, dataUrl(id, 'review.js') + '?t=' + Date.now());
    } catch (err) {
      payload = null;  // an export written before review mode has none
    }
    review.features = (payload && payload.features) || [];
    review.version = (payload && payload.wsi_toolkit && payload.wsi_toolkit.version) || 0;
    review.dirty.clear(); review.deleted.clear(); review.selected = null; review.draft = null;
    if (payload && payload.error) addMessage('review: ' + payload.error);
    drawReview();
  }
  async function saveReview() {
    if (!review.mode || review.saving || !state.info) return;
    if (!review.token) { setReviewStatus('cannot save: open the URL wsi-view printed, with its #token=...'); return; }
    const id = state.info.id;
    review.saving = true;
    setReviewStatus('saving...');
    let resp, detail;
    try {
      resp = await fetch(dataUrl(id, 'review'), {
        method: 'PUT', headers: { 'Content-Type': 'application/json', 'X-WSI-Token': review.token },
        body: JSON.stringify({ type: 'FeatureCollection', features: review.features, base_version: review.version }),
      });
      detail = await resp.json().catch(() => ({}));
    } catch (err) {
      review.saving = false;
      setReviewStatus('not saved: ' + err.message);
      return;
    }
    review.saving = false;
    if (resp.ok) {
      await loadReview(id);
      setReviewStatus('saved version ' + detail.version);
    } else if (resp.status === 409) {
      await mergeWithSaved(id);
      setReviewStatus('not saved: version ' + review.version + ' was saved elsewhere first; your changes are merged ' +
        'onto it: check and save again');
    } else {
      setReviewStatus('not saved (' + resp.status + '): ' + (detail.detail || resp.statusText));
    }
  }
  /** After a conflict: the saved review, with this page's new, changed and deleted outlines applied on top. */
  async function mergeWithSaved(id) {
    const mine = new Map(review.features.filter((f) => review.dirty.has(f.id)).map((f) => [f.id, f]));
    const dirty = new Set(review.dirty), deleted = new Set(review.deleted);
    await loadReview(id);
    const merged = review.features.filter((f) => !deleted.has(f.id)).map((f) => mine.get(f.id) || f);
    for (const [fid, f] of mine) if (!merged.some((g) => g.id === fid)) merged.push(f);
    review.features = merged;
    review.dirty = dirty; review.deleted = deleted;
    drawReview();
  }

  async function loadQueue(id) {
    let payload;
    try { payload = await loadData('queue:' + id, dataUrl(id, 'queue.js')); } catch (err) { payload = null; }
    queue.items = (payload && payload.items) || [];
    queue.rule = payload && payload.rule;
    queue.index = -1;
    const ol = $('queue');
    ol.replaceChildren(...queue.items.map((it, i) => {
      const li = document.createElement('li');
      li.dataset.index = String(i);
      li.textContent = 'score ' + fmt(it.score, 2);
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = it.reason;
      li.appendChild(meta);
      li.addEventListener('click', () => gotoQueue(i));
      return li;
    }));
    $('queue-detail').textContent = queue.items.length ? '' :
      (payload && payload.error ? 'no queue: ' + payload.error : 'nothing uncertain to review');
  }
  function gotoQueue(i) {
    if (!queue.items.length) return;
    queue.index = ((i % queue.items.length) + queue.items.length) % queue.items.length;
    const it = queue.items[queue.index];
    for (const li of $('queue').children) li.classList.toggle('current', Number(li.dataset.index) === queue.index);
    $('queue-detail').textContent = (queue.index + 1) + ' of ' + queue.items.length + ': ' + it.reason + ' · ' +
      fmt(it.area_mm2, 4) + ' mm² · mean p ' + fmt(it.mean_prob, 3) +
      (it.mean_std !== null && it.mean_std !== undefined ? ' · mean std ' + fmt(it.mean_std, 3) : '');
    fitBox(it.bbox_l0);
  }

  function initReview(data) {
    review.mode = Boolean(data.review_mode);
    review.classes = (data.review_classes || []).map((c) => c.name);
    const m = location.hash.match(/token=([^&]*)/);
    if (m) {
      try { sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1])); } catch (err) { /* storage off */ }
      review.token = decodeURIComponent(m[1]);
      history.replaceState(null, '', location.pathname + location.search);  // the token leaves the address bar
    } else {
      try { review.token = sessionStorage.getItem(TOKEN_KEY) || ''; } catch (err) { review.token = ''; }
    }
    $('review-tools').hidden = !review.mode;
    if (!review.mode) return;
    const box = $('review-classes');
    box.replaceChildren(...review.classes.map((name) => {
      const b = document.createElement('button');
      b.type = 'button'; b.dataset.cls = name; b.textContent = name; b.className = 'cls-' + name;
      b.addEventListener('click', () => setClass(name, true));
      return b;
    }));
    setClass(review.classes[0] || 'Tumor', false);
    $('review-draw').addEventListener('click', () => (review.draft ? closeDraft() : startDraft()));
    $('review-delete').addEventListener('click', deleteSelected);
    $('review-save').addEventListener('click', saveReview);
    window.addEventListener('beforeunload', (e) => { if (unsaved()) { e.preventDefault(); e.returnValue = ''; } });
    setReviewStatus(review.token ? 'review mode' : 'read-only: open the URL wsi-view printed, with its #token=..., to save');
  }

  // -- scale bar ---------------------------------------------------------------------------------------------
  function updateScaleBar() {
    const item = state.slideItem;
    if (!item || !state.info.slide.mpp) return;
    const P = OpenSeadragon.Point;
    const a = item.imageToViewerElementCoordinates(new P(0, 0)), b = item.imageToViewerElementCoordinates(new P(1e4, 0));
    const pxPerL0 = Math.hypot(b.x - a.x, b.y - a.y) / 1e4;
    const umPerPx = state.info.slide.mpp / pxPerL0;
    const maxUm = 140 * umPerPx, p10 = Math.pow(10, Math.floor(Math.log10(maxUm)));
    const um = [5, 2, 1].map((k) => k * p10).find((v) => v <= maxUm) || p10;
    $('scalebar-line').style.width = (um / umPerPx).toFixed(1) + 'px';
    $('scalebar-label').textContent = um >= 1000 ? (um / 1000) + ' mm' : (um >= 1 ? um : um.toPrecision(1)) + ' µm';
  }

  // -- slide list and loading -----------------------------------------------------------------------------------
  function buildSlideList() {
    const ol = $('slides');
    ol.replaceChildren();
    state.slides.forEach((s, i) => {
      const li = document.createElement('li');
      li.dataset.index = String(i);
      li.textContent = s.name;
      if (s.synthetic) {
        const b = document.createElement('span');
        b.className = 'badge'; b.textContent = 'SYNTHETIC';
        li.appendChild(b);
      }
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = s.error ? s.error : 'score ' + fmt(s.slide_score, 3) + ' · tumour ' + fmt(s.tumor_area_mm2, 3) + ' mm²';
      li.appendChild(meta);
      if (s.error) li.classList.add('failed');
      li.addEventListener('click', () => loadSlide(i));
      ol.appendChild(li);
    });
  }

  async function loadSlide(i) {
    if (!state.slides.length) return;
    i = ((i % state.slides.length) + state.slides.length) % state.slides.length;
    if (review.mode && unsaved() && !window.confirm('This slide\'s review has unsaved changes. Leave it?')) return;
    const seq = ++state.loadSeq;
    state.index = i;
    state.loading = true;
    for (const li of $('slides').children) li.classList.toggle('current', Number(li.dataset.index) === i);
    const entry = state.slides[i];
    history.replaceState(null, '', '#slide=' + encodeURIComponent(entry.id));
    $('title').textContent = entry.name;
    let info;
    try {
      info = await loadData('info:' + entry.id, dataUrl(entry.id, 'info.js'));
    } catch (err) {
      if (seq === state.loadSeq) { setMessages([entry.name + ': ' + (entry.error || err.message)]); state.loading = false; }
      return;
    }
    if (seq !== state.loadSeq) return;
    state.info = info;
    state.region = -1; state.hover = -1; state.tileErrors = 0; state.heat = null; state.unc = null;
    setMessages([info.error, info.heatmap_error && 'heatmap: ' + info.heatmap_error,
      info.regions_error && 'regions: ' + info.regions_error,
      info.uncertainty_error && 'uncertainty: ' + info.uncertainty_error]);
    $('uncertainty-control').hidden = !info.uncertainty;
    $('synthetic').hidden = !info.synthetic;
    $('synthetic').title = info.synthetic ? 'SYNTHETIC ' + info.synthetic_parts.join(' and ') +
      ': not patient data / not a trained classifier' : '';
    drawLegend();
    buildRegionList();
    buildOutlines();
    await Promise.all([loadReview(entry.id), loadQueue(entry.id)]);
    if (seq !== state.loadSeq) return;
    if (!info.slide.width) {
      state.viewer.close();
      state.slideItem = state.heatItem = state.uncItem = null;
      state.loading = false;
      return;
    }
    state.levels = levelDims(info.slide.width, info.slide.height);
    if (info.heatmap) {
      try { state.heat = await decodeHeatmap(info.heatmap); } catch (err) { addMessage('heatmap: ' + err.message); }
      if (seq !== state.loadSeq) return;
    }
    if (state.heat && info.uncertainty) {
      try { state.unc = await decodeHeatmap(info.uncertainty); } catch (err) { addMessage('uncertainty: ' + err.message); }
      if (seq !== state.loadSeq) return;
    }
    const s = info.slide;
    const sources = [{
      tileSource: {
        Image: { xmlns: 'http://schemas.microsoft.com/deepzoom/2008', Url: dataUrl(info.id, 'slide_files/'),
          Format: s.format, Overlap: String(s.overlap), TileSize: String(s.tile_size),
          Size: { Width: String(s.width), Height: String(s.height) } },
        queryParams: s.version ? '?v=' + s.version : '',
      },
      x: 0, y: 0, width: 1,
    }];
    if (state.heat) sources.push({ tileSource: heatmapTileSource(info), x: 0, y: 0, width: 1, opacity: state.heatOn ? state.opacity : 0 });
    if (state.unc) {
      // preload: its tiles are drawn while it is hidden (off by default), so switching it on is instant
      sources.push({ tileSource: heatmapTileSource(info, 'uncertainty', renderUncTile), x: 0, y: 0, width: 1,
        opacity: state.uncOn ? state.opacity : 0, preload: true });
    }
    state.slideItem = state.heatItem = state.uncItem = null;
    state.viewer.open(sources);
  }

  // -- controls -------------------------------------------------------------------------------------------------
  function setThreshold(v, redraw) {
    state.threshold = Math.min(1, Math.max(0, Number(v)));
    $('threshold').value = String(state.threshold);
    $('threshold-value').textContent = state.threshold.toFixed(2);
    drawLegend();
    if (redraw && state.heatItem) {
      state.pending += 1;
      state.viewer.requestInvalidate(true).finally(() => { state.pending -= 1; });
    }
  }
  function setOpacity(v) {
    state.opacity = Math.min(1, Math.max(0, Number(v)));
    $('opacity').value = String(state.opacity);
    $('opacity-value').textContent = state.opacity.toFixed(2);
    if (state.heatItem) state.heatItem.setOpacity(state.heatOn ? state.opacity : 0);
    if (state.uncItem) state.uncItem.setOpacity(state.uncOn ? state.opacity : 0);
  }
  function setUncertaintyOn(on) {
    state.uncOn = on;
    $('uncertainty-on').checked = on;
    setOpacity(state.opacity);
  }
  function setHeatOn(on) {
    state.heatOn = on;
    $('heatmap-on').checked = on;
    setOpacity(state.opacity);
  }
  function setRegionsOn(on) {
    state.regionsOn = on;
    $('regions-on').checked = on;
    $('outline-group').style.display = on ? '' : 'none';
    if (!on) { state.hover = -1; $('tooltip').hidden = true; }
  }

  function onKey(e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = (e.target && e.target.tagName) || '';
    if (tag === 'TEXTAREA' || (tag === 'INPUT' && e.target.type === 'text')) return;
    const actions = {
      n: () => loadSlide(state.index + 1), p: () => loadSlide(state.index - 1),
      ']': () => selectRegion(state.region + 1, true), '[': () => selectRegion(state.region - 1, true),
      h: () => setHeatOn(!state.heatOn), o: () => setRegionsOn(!state.regionsOn),
      u: () => setUncertaintyOn(!state.uncOn),
      j: () => gotoQueue(queue.index + 1), k: () => gotoQueue(queue.index - 1),
      0: () => state.viewer.viewport.goHome(), Home: () => state.viewer.viewport.goHome(),
      '?': () => { $('help').hidden = !$('help').hidden; },
    };
    if (review.mode) {
      Object.assign(actions, {
        Enter: () => { if (review.draft) closeDraft(); },
        Escape: () => { if (review.draft) { endDraft(); setReviewStatus('outline cancelled'); } },
        Delete: deleteSelected, Backspace: deleteSelected,
      });
    }
    const act = actions[e.key];
    if (act) { e.preventDefault(); e.stopPropagation(); act(); }
  }

  function createViewer() {
    const viewer = OpenSeadragon({
      element: $('osd'), drawer: 'canvas', showNavigationControl: false, showNavigator: true,
      navigatorPosition: 'BOTTOM_RIGHT', navigatorDrawer: 'canvas', crossOriginPolicy: false,
      maxZoomPixelRatio: 4, visibilityRatio: 0.5, minZoomImageRatio: 0.5, preserveImageSizeOnResize: true,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true }, imageLoaderLimit: 6,
      timeout: 60000, placeholderFillStyle: '#f4f4f4',
    });
    viewer.addHandler('open', () => {
      state.slideItem = viewer.world.getItemAt(0);
      state.heatItem = viewer.world.getItemCount() > 1 ? viewer.world.getItemAt(1) : null;
      state.uncItem = viewer.world.getItemCount() > 2 ? viewer.world.getItemAt(2) : null;
      state.loading = false;
      updateOutlineTransform(); updateScaleBar();
    });
    viewer.addHandler('open-failed', (e) => {
      state.loading = false;
      addMessage('the slide cannot be shown: ' + (e.message || 'open failed'));
    });
    viewer.addHandler('tile-load-failed', (e) => {
      state.tileErrors += 1;
      addMessage(state.tileErrors + ' tile(s) could not be loaded (' + (e.message || 'error') + ')');
    });
    viewer.addHandler('tile-loaded', (e) => {
      if (e.tiledImage === state.slideItem || (!state.slideItem && e.tiledImage === viewer.world.getItemAt(0))) {
        state.tileLog.push({ layer: 'slide', level: e.tile.level, x: e.tile.x, y: e.tile.y });
      }
    });
    viewer.addHandler('tile-invalidated', async (e) => {
      if (state.uncItem && e.tiledImage === state.uncItem && state.unc) {
        await e.setData(renderUncTile(e.tile.level, e.tile.x, e.tile.y), 'context2d');
        return;
      }
      if (!state.heatItem || e.tiledImage !== state.heatItem || !state.heat) return;
      await e.setData(renderHeatTile(e.tile.level, e.tile.x, e.tile.y), 'context2d');
    });
    viewer.addHandler('canvas-double-click', (e) => {
      if (review.draft) { e.preventDefaultAction = true; closeDraft(); }
    });
    viewer.addHandler('update-viewport', () => { updateOutlineTransform(); updateScaleBar(); });
    viewer.addHandler('canvas-press', (e) => { review.pressAt = e.position; });
    viewer.addHandler('canvas-click', (e) => {
      if (review.draft && state.slideItem) {
        // a corner where the button went down and up in one place (a drag pans); not OpenSeadragon's
        // 'quick', which also needs the release within 300 ms and misses clicks on a busy machine
        e.preventDefaultAction = true;
        const a = review.pressAt || e.position;
        if (Math.hypot(a.x - e.position.x, a.y - e.position.y) < 5) addVertex(e.position);
        return;
      }
      if (!e.quick) return;
      if (state.slideItem && review.features.length) {
        const q = state.slideItem.viewerElementToImageCoordinates(e.position);
        const id = featureAt(q.x, q.y);
        if (id !== null || review.selected !== null) {
          if (id !== null) e.preventDefaultAction = true;
          selectFeature(id, false);
          if (id !== null) return;
        }
      }
      const rect = viewer.element.getBoundingClientRect();
      const i = regionAt(e.position.x + rect.left, e.position.y + rect.top);
      if (i >= 0) { e.preventDefaultAction = true; selectRegion(i, false); }
    });
    viewer.element.addEventListener('mousemove', (e) => {
      const i = regionAt(e.clientX, e.clientY), tip = $('tooltip');
      if (i !== state.hover) { state.hover = i; markRegions(); }
      if (i < 0) { tip.hidden = true; return; }
      const r = state.info.regions[i], rect = $('stage').getBoundingClientRect();
      tip.textContent = r.name + ': ' + regionText(r);
      tip.style.left = (e.clientX - rect.left + 14) + 'px';
      tip.style.top = (e.clientY - rect.top + 14) + 'px';
      tip.hidden = false;
    });
    viewer.element.addEventListener('mouseleave', () => { state.hover = -1; markRegions(); $('tooltip').hidden = true; });
    return viewer;
  }

  /** True when the page has drawn everything it was asked to: data loaded, no animation, all tiles. */
  function isIdle() {
    const v = state.viewer;
    if (state.loading || state.pending > 0 || waiting.size > 0) return false;
    if (state.info && !state.info.slide.width) return true;  // nothing to draw: a failed slide's message
    if (!v || !v.isOpen() || v.world.getItemCount() === 0) return false;
    const vp = v.viewport, a = vp.getCenter(true), b = vp.getCenter(false);
    if (vp.getZoom(true) !== vp.getZoom(false) || a.x !== b.x || a.y !== b.y) return false;
    for (let i = 0; i < v.world.getItemCount(); i++) if (!v.world.getItemAt(i).getFullyLoaded()) return false;
    return !v.world.needsDraw();
  }

  async function main() {
    state.viewer = createViewer();
    window.addEventListener('keydown', onKey, true);
    $('opacity').addEventListener('input', (e) => setOpacity(e.target.value));
    $('threshold').addEventListener('input', (e) => setThreshold(e.target.value, true));
    $('heatmap-on').addEventListener('change', (e) => setHeatOn(e.target.checked));
    $('regions-on').addEventListener('change', (e) => setRegionsOn(e.target.checked));
    $('uncertainty-on').addEventListener('change', (e) => setUncertaintyOn(e.target.checked));
    $('help-button').addEventListener('click', () => { $('help').hidden = !$('help').hidden; });
    $('queue-next').addEventListener('click', () => gotoQueue(queue.index + 1));
    $('queue-prev').addEventListener('click', () => gotoQueue(queue.index - 1));
    let data;
    try {
      data = await loadData('slides', 'data/slides.js');
    } catch (err) {
      setMessages(['the slide list cannot be loaded: ' + err.message]);
      return;
    }
    state.slides = data.slides;
    state.lut = data.colormap.lut;
    initReview(data);
    if (data.uncertainty_colormap) {
      state.uncLut = data.uncertainty_colormap.lut; state.uncMax = data.uncertainty_colormap.max;
    }
    drawLegend();
    buildSlideList();
    const want = decodeURIComponent((location.hash.match(/slide=([^&]*)/) || [])[1] || '');
    const start = Math.max(0, state.slides.findIndex((s) => s.id === want));
    await loadSlide(start);
  }

  window.wsiView = {
    state, loadSlide, selectRegion, setThreshold, setOpacity, setHeatOn, setRegionsOn, setUncertaintyOn, isIdle, tileBox,
    review, queue, saveReview, gotoQueue, selectFeature,
  };
  main();
})();
