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
    $('outline-group').setAttribute('transform', 'matrix(' + m.join(' ') + ')');
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
      0: () => state.viewer.viewport.goHome(), Home: () => state.viewer.viewport.goHome(),
      '?': () => { $('help').hidden = !$('help').hidden; },
    };
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
    viewer.addHandler('update-viewport', () => { updateOutlineTransform(); updateScaleBar(); });
    viewer.addHandler('canvas-click', (e) => {
      if (!e.quick) return;
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
    let data;
    try {
      data = await loadData('slides', 'data/slides.js');
    } catch (err) {
      setMessages(['the slide list cannot be loaded: ' + err.message]);
      return;
    }
    state.slides = data.slides;
    state.lut = data.colormap.lut;
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
  };
  main();
})();
