// SAE feature browser. Static single-page app: #/ lists features, #/feature/<id> shows one,
// #/overview summarises the SAE (density histogram, dead/dense counts, evaluation figures),
// #/live asks the live server (sae-platform serve) which features fire on a typed text.
// Corpus text is untrusted: every string from the data goes into the page as a text node
// (the el() helper below takes children as text; nothing here assigns innerHTML).
'use strict';
(function () {
  // Index rows per page. A sorted or searched page's rows are scattered over the list, each in its own
  // 64-row chunk, so the page fetches a file per row: 50 keeps a search at 2^20 features well under
  // a second (benchmarks/browser_scale.py; 200 took twice as long).
  const PAGE = 50;
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const KIND_TITLES = { top: 'Top activations', interval: 'Activation intervals', random: 'Random activating tokens' };
  const LINEAGE_LABELS = {
    sae: 'SAE run', checkpoint: 'Checkpoint', run_id: 'Dagster run', shuffle: 'Shuffle',
    activation_partitions: 'Activation partitions', model: 'Model', hook_name: 'Hook',
  };

  const S = {
    site: null, base: '', index: null, n: 0,
    shards: [],                   // index.json's feature shards, each with its first row position
    order: null,                  // Int32Array of row positions, the current filtered + sorted list
    sort: { key: 'feature', desc: false }, query: '', page: 0, matchRank: null, filtered: null,
    chunks: new Map(), rowChunks: new Map(), files: new Map(), view: null, histLog: false,
    filter: 'all', live: null, renders: 0, routes: 0, tokensLower: null,
    listHash: '#/',               // the list's address with its state (search, sort, filter, page)
  };
  const DENSE = 0.1;              // a latent firing on more than 10% of tokens is "dense"
  const FILTERS = {
    all: ['All features', () => true],
    alive: ['Alive', (d) => d > 0],
    dead: ['Dead (never fired)', (d) => d === 0 || d === null],
    dense: [`Dense (> ${DENSE * 100}% of tokens)`, (d) => d > DENSE],
  };

  // ---------- DOM helpers (text only) ----------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === 'class') node.className = v;
        else if (k === 'dataset') Object.assign(node.dataset, v);
        else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
        else if (k === 'href') node.setAttribute('href', safeHref(v));
        else node[k] = v;   // title, type, value, placeholder, ... (DOM properties: text, not markup)
      }
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
    }
    return node;
  }
  // only our own routes, and the one report page the server serves beside the site
  function safeHref(v) { return /^#\/[\w/?=&%.*+-]*$/.test(v) || (S.index && v === S.index.comparison_url && /^reports\/[\w.-]+\.html$/.test(v)) ? v : '#/'; }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  const app = () => document.getElementById('app');

  // ---------- formatting ----------
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return '–';
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 0.01) return String(Number(v.toPrecision(3)));
    return v.toExponential(2);
  }
  function fmtDensity(d) {
    if (d === null || d === undefined) return '–';
    if (d === 0) return '0';
    const p = d * 100;
    return (p >= 1e-4 ? String(Number(p.toPrecision(3))) : p.toExponential(2)) + '%';
  }
  function fmtEdge(v, upper) { return v === null || v === undefined ? (upper ? '\u221e' : '\u2212\u221e') : fmt(v); }
  // A token's background by its activation a relative to the largest fmax (orange; strong above 60%).
  function heat(span, a, fmax) {
    const x = Math.min(1, a / fmax);
    span.style.backgroundColor = `rgba(255, 128, 0, ${(0.08 + 0.82 * x).toFixed(3)})`;
    span.classList.add('active');
    if (x > 0.6) span.classList.add('strong');
  }
  function fmtInt(n) { return n === null || n === undefined ? '–' : Number(n).toLocaleString('en-US'); }
  // Whitespace made visible; the string stays text.
  function showToken(s) {
    if (s === null || s === undefined) return '';
    return s.replace(/\r\n|\r|\n/g, '\u21b5').replace(/\t/g, '\u2192');
  }

  // ---------- data ----------
  // A million features: nothing is fetched per feature up front. index.json holds the shard
  // ranges (a row position is a feature's place in the list by id), the token table and where
  // the search postings are; the list's rows come in chunks of row_chunk features, the sort
  // orders, the density column and the postings are fetched when first needed (index_files.py).
  async function getJSON(url, opts) {
    const res = await fetch(url, opts);
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.json();
  }
  async function getBinary(url) {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.arrayBuffer();
  }
  function once(key, load) {     // one fetch per file, shared by every caller; forgotten on failure
    if (!S.files.has(key)) {
      const p = load();
      S.files.set(key, p);
      p.catch(() => S.files.delete(key));
    }
    return S.files.get(key);
  }
  async function loadIndex() {
    S.site = await getJSON('site.json', { cache: 'no-cache' });
    if (typeof S.site.data !== 'string' || !/^data\/[\w.-]+$/.test(S.site.data)) throw new Error('bad site.json');
    S.base = S.site.data + '/';
    S.index = await getJSON(S.base + 'index.json');
    let offset = 0;
    S.shards = S.index.shards.map((s) => {
      if (!/^shards\/[\w.-]+$/.test(s.path)) throw new Error('bad index.json');
      const shard = { start: s.start, stop: s.stop, path: s.path, offset };
      offset += s.stop - s.start;
      return shard;
    });
    S.n = offset;
    S.tokensLower = S.index.token_table.map((t) => t.trim().toLowerCase());
    const hook = S.index.hook_point ? ` · ${S.index.hook_point}` : '';
    document.title = `${S.index.run}${hook} · SAE feature browser`;
    const run = document.getElementById('run');
    clear(run).appendChild(document.createTextNode(`${S.index.run}${hook} · ${fmtInt(S.n)} features`));
  }
  function shardOfRow(r) {
    let lo = 0, hi = S.shards.length - 1;
    while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (S.shards[mid].offset <= r) lo = mid; else hi = mid - 1; }
    return S.shards[lo];
  }
  function idOf(r) { const s = shardOfRow(r); return s.start + (r - s.offset); }
  function rowOf(id) {           // undefined: no such feature
    let lo = 0, hi = S.shards.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1, s = S.shards[mid];
      if (id < s.start) hi = mid - 1; else if (id >= s.stop) lo = mid + 1; else return s.offset + (id - s.start);
    }
    return undefined;
  }
  function rowChunkUrl(r) {
    const s = shardOfRow(r);
    return `${s.path}/rows/${Math.floor((r - s.offset) / S.index.row_chunk)}.json`;
  }
  // The rows r (row positions) fetched: their chunks, at most 6 at a time (the browser's limit).
  async function ensureRows(rs) {
    const urls = [...new Set(Array.from(rs, rowChunkUrl))].filter((u) => !S.rowChunks.has(u));
    await Promise.all(urls.map((u) => once(u, () => getJSON(u)).then((c) => S.rowChunks.set(u, c))));
  }
  // One row of the list (after ensureRows): feature, density, max, tokens, explanation, n2g_f1, n2g_support.
  function row(r) {
    const c = S.rowChunks.get(rowChunkUrl(r));
    const s = shardOfRow(r);
    const i = (r - s.offset) % S.index.row_chunk;
    return { feature: c.feature[i], density: c.density[i], max: c.max[i], tokens: c.tokens[i] || [],
      explanation: c.explanation ? c.explanation[i] : undefined, n2g_f1: c.n2g_f1 ? c.n2g_f1[i] : undefined,
      n2g_support: c.n2g_support ? c.n2g_support[i] : undefined };
  }
  function loadDensity() {
    return once('density', async () => {
      return new Float64Array(await getBinary(S.base + 'columns/density.f64'));   // NaN: none measured
    });
  }
  function loadOrder(key, desc) {
    return once(`order/${key}.${desc ? 'desc' : 'asc'}`,
      async () => new Int32Array(await getBinary(`${S.base}order/${key}.${desc ? 'desc' : 'asc'}.i32`)));
  }
  async function loadFeature(id) {
    const r = rowOf(id);
    if (r === undefined) return undefined;
    const url = `${shardOfRow(r).path}/features/${Math.floor(id / S.index.chunk_features)}.json`;
    if (!S.chunks.has(url)) {
      const p = getJSON(url).then((rows) => {
        const byId = new Map();
        for (const f of rows) byId.set(f.feature, f);
        return byId;
      });
      S.chunks.set(url, p);
      p.catch(() => S.chunks.delete(url));
    }
    return (await S.chunks.get(url)).get(id);
  }

  // ---------- index: search and sort ----------
  // Token search: the token table is matched in memory (exact 0, contains 0.5), then only the
  // postings files of the matching tokens are fetched; a feature ranks by the first of its
  // strongest tokens that matches (rank + 0.5 for a partial match).
  async function tokenMatches(ql, rank) {
    const codes = [];
    S.tokensLower.forEach((t, i) => { if (t === ql) codes.push([i, 0]); else if (t.includes(ql)) codes.push([i, 0.5]); });
    const lists = await postingsOf(`${S.base}search/tokens`, S.index.token_files, codes.map(([c]) => c));
    codes.forEach(([, s], k) => {
      const list = lists[k];
      for (let j = 0; j < list.length; j++) {
        const r = list[j] >> 3, score = (list[j] & 7) + s;
        const prev = rank.get(r);
        if (prev === undefined || score < prev) rank.set(r, score);
      }
    });
  }
  // The postings of each code (a token's or word's place in its table) in the files below
  // ``folder`` that begin at ``firsts`` (index_files.postings_files): each file fetched once, and
  // only those holding a wanted code. Int32Array views, in the order of ``codes``.
  async function postingsOf(folder, firsts, codes) {
    const fileOf = (c) => { let lo = 0, hi = firsts.length - 1; while (lo < hi) { const m = (lo + hi + 1) >> 1; if (firsts[m] <= c) lo = m; else hi = m - 1; } return lo; };
    const files = new Map(await Promise.all([...new Set(codes.map(fileOf))].map((n) =>
      once(`${folder}/${n}`, async () => [n, new Int32Array(await getBinary(`${folder}/${n}.i32`))]))));
    return codes.map((c) => {
      const n = fileOf(c), body = files.get(n), i = c - firsts[n], data = 2 + body[0];
      return body.subarray(data + body[1 + i], data + body[2 + i]);
    });
  }
  // Explanation search: every word of the query (2 characters or more) must begin a word of the
  // explanation; a feature ranks after the token matches, by where the first word stands.
  const WORD = /[\p{L}\p{N}_]+/gu;
  function hex(s) { return Array.from(new TextEncoder().encode(s), (b) => b.toString(16).padStart(2, '0')).join(''); }
  // Every query word's postings are fetched at once (a word list, then the files of its words).
  async function explanationMatches(ql) {
    const words = (ql.match(WORD) || []).filter((w) => Array.from(w).length >= S.index.word_prefix);
    const found = await Promise.all(words.map(wordMatches));
    const first = found.length ? found[0] : new Map();
    return new Map([...first].filter(([r]) => found.every((at) => at.has(r))));   // row -> where the first word stands
  }
  // The rows whose explanation has a word that begins with ``w``: row -> the first such word's offset.
  async function wordMatches(w) {
    const name = hex(Array.from(w).slice(0, S.index.word_prefix).join(''));
    const at = new Map();
    if (!S.index.word_files.includes(name)) return at;
    const folder = `${S.base}search/words/${name}`;
    const listing = await once(`${folder}.json`, () => getJSON(`${folder}.json`));
    const codes = [];
    listing.words.forEach((word, c) => { if (word.startsWith(w)) codes.push(c); });
    for (const list of await postingsOf(folder, listing.files, codes)) {
      for (let k = 0; k < list.length; k += 2) if (!at.has(list[k]) || list[k + 1] < at.get(list[k])) at.set(list[k], list[k + 1]);
    }
    return at;
  }
  async function applyQuery() {
    const q = S.query.trim();
    const keep = FILTERS[S.filter] ? FILTERS[S.filter][1] : FILTERS.all[1];
    let rows = null;              // null: every feature
    let matchRank = null;
    if (q) {
      const rank = new Map();       // row -> relevance (lower is better)
      const idq = q.replace(/^#/, '');
      if (/^\d+$/.test(idq) && rowOf(Number(idq)) !== undefined) rank.set(rowOf(Number(idq)), -1);
      const ql = q.toLowerCase();
      const [, explained] = await Promise.all([tokenMatches(ql, rank),   // both postings fetched at once
        S.index.explained && ql.length >= 2 ? explanationMatches(ql) : new Map()]);
      for (const [r, at] of explained) if (!rank.has(r)) rank.set(r, 100 + at / 1000);   // after the token matches
      rows = Int32Array.from(rank.keys());
      matchRank = rank;
    }
    if (S.filter !== 'all') {
      const density = await loadDensity();
      const dens = (r) => (Number.isNaN(density[r]) ? null : density[r]);
      rows = (rows || everyRow()).filter((r) => keep(dens(r)));
    }
    S.matchRank = matchRank;
    S.filtered = rows;
    await sortRows();
    S.page = 0;
  }
  // The list in the chosen order: the precomputed order of the column (order/<key>.<dir>.i32), kept
  // to the filtered rows; by id, the rows themselves; by match, the search's ranks.
  // Every row position in order: a plain loop (Int32Array.from with a callback took 0.1-0.5 s at 2^20).
  function everyRow() {
    const rows = new Int32Array(S.n);
    for (let i = 0; i < S.n; i++) rows[i] = i;
    return rows;
  }
  // A match rank is a multiple of 1/2000 (-1 an id; a token's rank, + 0.5 for a partial match; 100 + a
  // character offset / 1000), so round(rank * 2000) * 2^26 + row is an exact integer of a double (below
  // 2^53) for rows below 2^26 (67M features) and offsets below 67M characters: sorting it sorts by
  // (rank, row).
  const RANK_STEPS = 2000, ROW_SPAN = 2 ** 26;
  async function sortRows() {
    const { key, desc } = S.sort;
    const rows = S.filtered;
    if (key === 'match' && S.matchRank) {
      // one number per row, (rank, row) in its bits, sorted natively (no comparator: 10x faster at 10^5)
      const keys = new Float64Array(rows.length);
      for (let i = 0; i < rows.length; i++) keys[i] = Math.round(S.matchRank.get(rows[i]) * RANK_STEPS) * ROW_SPAN + rows[i];
      keys.sort();
      S.order = new Int32Array(keys.length);
      for (let i = 0; i < keys.length; i++) S.order[i] = ((keys[i] % ROW_SPAN) + ROW_SPAN) % ROW_SPAN;
      return;
    }
    if (key === 'feature' || key === 'match') {
      const order = rows ? Int32Array.from(rows).sort() : everyRow();
      S.order = desc ? order.reverse() : order;
      return;
    }
    const order = await loadOrder(key, desc);
    if (!rows) {
      S.order = order;
      return;
    }
    const wanted = new Uint8Array(S.n);
    for (const r of rows) wanted[r] = 1;
    S.order = order.filter((r) => wanted[r] === 1);
  }

  // ---------- the list's state in the URL: #/?q=…&sort=…&desc=1&filter=…&page=… ----------
  // Only what differs from the defaults is written; page is 1-based. The address is updated in
  // place (history.replaceState) as the list changes, so a reload, a shared link or Back from a
  // feature page restores the same list.
  const SORT_KEYS = ['feature', 'density', 'max', 'n2g_f1', 'match'];
  function defaultSortKey() { return S.query.trim() ? 'match' : 'feature'; }
  function listHash() {
    const p = new URLSearchParams();
    if (S.query) p.set('q', S.query);
    if (S.sort.key !== defaultSortKey() || S.sort.desc) {
      p.set('sort', S.sort.key);
      if (S.sort.desc) p.set('desc', '1');
    }
    if (S.filter !== 'all') p.set('filter', S.filter);
    if (S.page > 0) p.set('page', String(S.page + 1));
    const qs = p.toString();
    return qs ? `#/?${qs}` : '#/';
  }
  function syncHash() {
    S.listHash = listHash();
    const now = location.hash || '#/';
    if (now !== S.listHash && isListHash(now)) history.replaceState(null, '', S.listHash);
  }
  function isListHash(h) { return h === '' || h === '#' || h === '#/' || h.startsWith('#/?'); }
  async function readListHash(hash) {
    const at = hash.indexOf('?');
    const p = new URLSearchParams(at >= 0 ? hash.slice(at + 1) : '');
    S.query = p.get('q') || '';
    S.filter = Object.prototype.hasOwnProperty.call(FILTERS, p.get('filter')) ? p.get('filter') : 'all';
    const key = p.get('sort');
    S.sort = SORT_KEYS.includes(key) && (S.index.sort_keys.includes(key) || key === 'feature' || key === 'match')
      ? { key, desc: p.get('desc') === '1' } : { key: defaultSortKey(), desc: false };
    await applyQuery();   // resets the page
    const page = parseInt(p.get('page') || '1', 10);
    S.page = Number.isFinite(page) && page > 1 ? page - 1 : 0;   // renderList clamps it to the last page
  }

  // ---------- index view ----------
  function renderIndex() {
    const root = clear(app());
    S.view = 'index';
    const search = el('input', {
      id: 'search', type: 'search', value: S.query, autocomplete: 'off', spellcheck: false,
      placeholder: 'Search: feature id, a token (e.g. " Paris") or explanation text',
      oninput: debounce(async (e) => {
        if (S.view !== 'index') return;   // a feature was opened meanwhile: the list is gone
        const had = S.query.trim() !== '';
        S.query = e.target.value;
        const has = S.query.trim() !== '';
        if (has && !had && S.sort.key === 'feature' && !S.sort.desc) S.sort = { key: 'match', desc: false };
        if (!has && S.sort.key === 'match') S.sort = { key: 'feature', desc: false };
        await update(applyQuery);
      }, 120),
      onkeydown: (e) => {
        if (e.key === 'Enter' && S.order.length > 0) {
          location.hash = `#/feature/${idOf(S.order[0])}`;
        }
      },
    });
    const filter = el('select', { id: 'filter', title: 'Show only some features',
      onchange: (e) => { S.filter = e.target.value; update(applyQuery); } },
      Object.entries(FILTERS).map(([k, [label]]) => el('option', { value: k, selected: S.filter === k }, label)));
    root.appendChild(el('section', { class: 'controls' },
      search, filter,
      el('a', { href: '#/overview', id: 'overview-link' }, 'SAE overview'),
      S.live ? el('a', { href: '#/live', id: 'live-link' }, 'Text \u2192 features') : null,
      el('span', { id: 'count', class: 'muted' })));
    root.appendChild(el('div', { id: 'list' }));
    renderList();
    search.focus();
  }

  function headerCell(label, key, cls) {
    const active = S.sort.key === key;
    const arrow = active ? (S.sort.desc ? ' \u25bc' : ' \u25b2') : '';
    return el('th', { class: cls },
      el('button', {
        type: 'button', class: 'sort' + (active ? ' active' : ''), dataset: { sort: key },
        title: `Sort by ${label.toLowerCase()}`,
        onclick: () => {
          if (S.sort.key === key) S.sort.desc = !S.sort.desc;
          else S.sort = { key, desc: key !== 'feature' && key !== 'match' };
          update(async () => { await sortRows(); S.page = 0; });
        },
      }, label + arrow));
  }

  // Change the list's state (``change``, async: it may fetch an order or postings), then draw it;
  // a change begun later wins (an earlier one that finishes after it draws nothing).
  // While a change is under way the list carries data-busy (tests and scripts wait for it to go).
  async function update(change) {
    const mine = ++S.renders;
    const list = document.getElementById('list');
    if (list) list.dataset.busy = '1';
    await change();
    if (mine === S.renders) await renderList();
  }

  async function renderList() {
    if (S.view !== 'index' || !document.getElementById('list')) return;   // the index is not on screen
    const mine = ++S.renders;
    const total = S.order.length;
    const pages = Math.max(1, Math.ceil(total / PAGE));
    S.page = Math.min(S.page, pages - 1);
    const lo = S.page * PAGE, hi = Math.min(total, lo + PAGE);
    await ensureRows(S.order.subarray(lo, hi));
    const listEl = document.getElementById('list');
    if (mine !== S.renders || S.view !== 'index' || !listEl) return;   // superseded, or a feature was opened
    const list = clear(listEl);
    delete listEl.dataset.busy;
    const explained = S.index.explained;
    syncHash();
    const count = document.getElementById('count');
    clear(count).appendChild(document.createTextNode(
      S.query.trim() || S.filter !== 'all' ? `${fmtInt(total)} matching of ${fmtInt(S.n)} features` : `${fmtInt(S.n)} features`));
    if (total === 0) {
      list.appendChild(el('p', { class: 'status' }, 'No feature matches this search.'));
      return;
    }
    const head = el('tr', null,
      headerCell('Feature', 'feature', 'num'),
      headerCell('Density', 'density', 'num'),
      el('th', { class: 'bar' }),
      headerCell('Max act', 'max', 'num'),
      el('th', null, 'Top activating tokens'),
      explained ? el('th', null, 'Explanation') : null,
      explained ? headerCell('N2G F1', 'n2g_f1', 'num') : null,
      S.matchRank ? headerCell('Match', 'match', 'num') : null);
    const body = el('tbody');
    for (let i = lo; i < hi; i++) {
      const f = row(S.order[i]);
      const id = f.feature;
      const d = f.density;
      const bar = el('span', { class: 'dbar' });
      // log10 density from 1e-7 (empty) to 1 (full)
      const w = d > 0 ? Math.max(2, Math.min(100, (Math.log10(d) + 7) / 7 * 100)) : 0;
      bar.style.width = w + '%';
      const toks = el('td', { class: 'toks' });
      const ql = S.query.trim().toLowerCase();
      const own = f.tokens;
      const hits = ql ? own.filter((t) => t.trim().toLowerCase().includes(ql)) : [];
      const shown = [...hits, ...own.filter((t) => !hits.includes(t))].slice(0, Math.max(4, hits.length));
      for (const t of shown) {
        toks.appendChild(el('span', { class: hits.includes(t) ? 'chip hit' : 'chip' }, showToken(t)));
      }
      body.appendChild(el('tr', { class: d === 0 || d === null ? 'dead' : null, dataset: { feature: id } },
        el('td', { class: 'num' }, el('a', { href: `#/feature/${id}` }, String(id))),
        el('td', { class: 'num density' }, fmtDensity(d)),
        el('td', { class: 'bar' }, el('span', { class: 'dtrack' }, bar)),
        el('td', { class: 'num max' }, fmt(f.max)),
        toks,
        explained ? el('td', { class: 'expl' }, f.explanation || '') : null,
        explained ? el('td', { class: 'num f1' }, fmt(f.n2g_f1),
          f.n2g_f1 === null ? null : el('span', {
            class: (f.n2g_support ?? 0) < S.index.n2g_min_support ? 'support low' : 'support muted small' },
          ` n=${fmtInt(f.n2g_support ?? 0)}`)) : null,
        S.matchRank ? el('td', { class: 'num muted' }, S.matchRank.get(S.order[i]) < 0 ? 'id' : S.matchRank.get(S.order[i]) >= 100 ? 'explanation' : 'token') : null));
    }
    list.appendChild(el('table', { class: 'features' }, el('thead', null, head), body));
    if (explained) {
      list.appendChild(el('p', { class: 'muted small', id: 'n2g-legend' },
        `N2G F1: how well the explanation's patterns predict the feature's firings on held-out text; n = the firings it was measured on. `
        + `Sorting by it ranks features with fewer than ${fmtInt(S.index.n2g_min_support)} firings after the others (too little evidence). `
        + '\u2013 = not measured (no explanation, or the feature never fired on the held-out text, or its patterns never matched there); '
        + '0 = measured, and none of its patterns\' matches was a firing.'));
    }
    if (pages > 1) {
      list.appendChild(el('nav', { class: 'pager' },
        el('button', { type: 'button', id: 'prev-page', disabled: S.page === 0,
          onclick: () => { S.page--; update(() => {}); window.scrollTo(0, 0); } }, '\u2039 Prev'),
        el('span', { class: 'muted' }, `${fmtInt(lo + 1)}\u2013${fmtInt(hi)} of ${fmtInt(total)}`),
        el('button', { type: 'button', id: 'next-page', disabled: S.page >= pages - 1,
          onclick: () => { S.page++; update(() => {}); window.scrollTo(0, 0); } }, 'Next \u203a')));
    }
  }

  function debounce(fn, ms) {
    let t = null;
    return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
  }

  // ---------- feature view ----------
  async function renderFeature(id) {
    S.view = 'feature';
    const root = clear(app());
    const r = rowOf(id);
    const nav = el('nav', { class: 'fnav' },
      el('a', { href: S.listHash }, '\u2190 All features'),
      r > 0 ? el('a', { href: `#/feature/${idOf(r - 1)}`, id: 'prev-feature' }, `\u2039 ${idOf(r - 1)}`) : null,
      r !== undefined && r < S.n - 1 ? el('a', { href: `#/feature/${idOf(r + 1)}`, id: 'next-feature' }, `${idOf(r + 1)} \u203a`) : null);
    root.appendChild(nav);
    if (r === undefined) {
      root.appendChild(el('p', { class: 'status error' }, `There is no feature ${id} in this SAE (ids ${idOf(0)}\u2013${idOf(S.n - 1)}).`));
      return;
    }
    const status = el('p', { class: 'status' }, 'Loading feature\u2026');
    root.appendChild(status);
    let f;
    try {
      f = await loadFeature(id);
      if (f && f.explanation !== undefined) {   // the listed explanations of its similar and co-occurring features
        await ensureRows([...(f.neighbors || []), ...(f.cooccurring || [])].map(rowOf).filter((x) => x !== undefined));
      }
    } catch (err) {
      status.className = 'status error';
      clear(status).appendChild(document.createTextNode(`Could not load feature ${id}: ${err.message}. If the site was rebuilt, reload the page.`));
      return;
    }
    if (S.view !== 'feature' || location.hash !== `#/feature/${id}`) return;   // navigated away meanwhile
    root.removeChild(status);
    if (!f) {
      root.appendChild(el('p', { class: 'status error' }, `No data for feature ${id}.`));
      return;
    }
    root.appendChild(featureHeader(f));
    const grid = el('div', { class: 'grid' });
    grid.appendChild(el('section', { class: 'card' }, el('h2', null, 'Activation histogram'), histogram(f)));
    grid.appendChild(el('section', { class: 'card' }, el('h2', null, 'Logit effects'), logits(f)));
    root.appendChild(grid);
    if (f.explanation !== undefined) root.appendChild(explanationCard(f));
    root.appendChild(examples(f));
    if (S.live && S.live.max_new_tokens && window.saeSteerPanel) root.appendChild(window.saeSteerPanel(f, S.live));   // steer.js
    root.appendChild(lineage(id));
  }

  function featureHeader(f) {
    const dead = !f.count;
    return el('section', { class: 'fhead' },
      el('h1', null, `Feature ${f.feature}`, dead ? el('span', { class: 'badge' }, 'dead') : null),
      el('dl', { class: 'stats' },
        stat('Density', f.density === null || f.density === undefined ? '–' : fmtDensity(f.density),
          f.count !== null && f.count !== undefined ? `${fmtInt(f.count)} of ${fmtInt(f.n_tokens_total)} tokens` : null, 'stat-density'),
        stat('Max activation', fmt(f.max), null, 'stat-max'),
        stat('Mean activation', fmt(f.mean), null, 'stat-mean')));
  }
  function explanationCard(f) {
    const related = (title, id, ids, scores, what) => el('div', { id },
      el('h3', null, title),
      ids && ids.length
        ? el('ul', { class: 'related' }, ids.map((n, i) => el('li', null,
          el('a', { href: `#/feature/${n}` }, `#${n}`), el('span', { class: 'muted small' }, ` ${what} ${fmt(scores[i])}`),
          explanationOf(n))))
        : el('p', { class: 'muted' }, 'none'));
    return el('section', { class: 'card', id: 'explanation' },
      el('h2', null, 'Explanation (N2G)'),
      el('p', { class: 'expltext' }, f.explanation || 'No pattern explains this feature.'),
      el('dl', { class: 'stats' },
        stat('Precision', fmt(f.n2g_precision), `${fmtInt(f.n2g_matches)} matches on held-out text`, 'stat-precision'),
        stat('Recall', fmt(f.n2g_recall), `${fmtInt(f.n2g_firings)} firings on held-out text`, 'stat-recall')),
      el('p', { class: 'muted small' }, 'Pattern: the activating token in [brackets] after the tokens that must precede it (* any token); scored on held-out text: precision = firings among matches, recall = matches among firings.'),
      el('div', { class: 'grid' },
        related('Similar features (decoder cosine)', 'similar', f.neighbors, f.neighbor_cosines, 'cos'),
        related('Co-occurring features (held-out text)', 'cooccurring', f.cooccurring, f.cooccurring_shares, 'shares')));
  }

  // ---------- overview ----------
  async function renderOverview() {
    S.view = 'overview';
    const root = clear(app());
    root.appendChild(el('p', { class: 'status' }, 'Loading the densities\u2026'));
    const density = await loadDensity();
    if (S.view !== 'overview') return;   // navigated away meanwhile
    clear(root);
    root.appendChild(el('nav', { class: 'fnav' }, el('a', { href: S.listHash }, '\u2190 All features')));
    root.appendChild(el('h1', null, `SAE overview \u00b7 ${S.index.run}`));
    let dead = 0, dense = 0;
    const bins = new Array(29).fill(0);   // log10 density from -7 to 0, 0.25 wide
    for (let r = 0; r < S.n; r++) {
      const d = density[r];
      if (d === 0 || Number.isNaN(d)) { dead++; continue; }
      if (d > DENSE) dense++;
      const b = Math.max(0, Math.min(bins.length - 1, Math.floor((Math.log10(d) + 7) * 4)));
      bins[b]++;
    }
    const counts = el('dl', { class: 'stats' },
      stat('Features', fmtInt(S.n), null, 'ov-features'),
      stat('Dead', fmtInt(dead), 'never fired on any cached token', 'ov-dead'),
      stat('Dense', fmtInt(dense), `fire on > ${DENSE * 100}% of tokens`, 'ov-dense'));
    const show = (k) => el('a', { href: `#/?filter=${k}`, class: 'filterlink', dataset: { filter: k } }, FILTERS[k][0]);
    root.appendChild(el('section', { class: 'card' }, el('h2', null, 'Features'), counts,
      el('p', null, 'List: ', show('dead'), ' \u00b7 ', show('dense'), ' \u00b7 ', show('alive'),
        ' \u00b7 sort the list by density, max activation', S.index.explained ? ' or N2G F1' : '', ' with its column headers.')));
    const W = 600, H = 180, PADB = 24, PADL = 44;
    const top = Math.max(1, ...bins);
    const bw = (W - PADL) / bins.length;
    const s = svg('svg', { id: 'density-histogram', viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'histsvg' });
    bins.forEach((c, i) => {
      const h = (c / top) * (H - PADB - 6);
      const rect = svg('rect', { x: (PADL + i * bw + 0.5).toFixed(2), y: (H - PADB - h).toFixed(2),
        width: Math.max(0.5, bw - 1).toFixed(2), height: h.toFixed(2), class: 'histbar' });
      const t = svg('title');
      t.textContent = `log10 density [${(-7 + i / 4).toFixed(2)}, ${(-7 + (i + 1) / 4).toFixed(2)}): ${fmtInt(c)} features`;
      rect.appendChild(t);
      s.appendChild(rect);
    });
    s.appendChild(svg('line', { x1: PADL, y1: H - PADB + 0.5, x2: W, y2: H - PADB + 0.5, class: 'axis' }));
    yAxis(s, top, PADL, H - PADB, H - PADB - 6, (v) => v);
    for (const x of [-7, -6, -5, -4, -3, -2, -1, 0]) xTick(s, Math.min(W - 1, PADL + (x + 7) * 4 * bw), H - PADB, String(x));
    root.appendChild(el('section', { class: 'card' }, el('h2', null, 'Feature density (log10, alive features)'), s,
      el('p', { class: 'muted small' }, `x: log10 of the fraction of tokens a feature fires on; y: features. ${fmtInt(dead)} dead features are not drawn.`)));
    const ev = S.index.evaluation;
    const evBox = el('section', { class: 'card', id: 'evaluation' }, el('h2', null, 'Evaluation (sae_eval)'));
    if (!ev) {
      evBox.appendChild(el('p', { class: 'muted' }, 'No evaluation report was found when the site was built.'));
    } else {
      evBox.appendChild(saebenchCard(ev, S.index.absorption));
      evaluationTables(evBox, ev);
    }
    if (S.index.comparison_url) {
      evBox.appendChild(el('p', null, el('a', { href: S.index.comparison_url, id: 'comparison-link' },
        'Every SAE of the sweep side by side →'), el('span', { class: 'muted small' }, ' (sae_comparison; served by sae-platform browse)')));
    }
    root.appendChild(evBox);
  }

  // SAEBench's figures at a glance: the core ones (explained variance about the mean beside the legacy
  // about-zero figure, KL and CE-loss scores, meta-SAE FVE), sparse probing's accuracy per k against
  // the same probe on the hook point's channels, and absorption: its means over letters, or the
  // refusal's text, with the per-letter chart (index.json's absorption; the chart a file of the build).
  function saebenchCard(ev, absorption) {
    const box = el('div', { id: 'saebench' }, el('h3', null, 'SAEBench'));
    const core = [['explained variance (about the mean)', 'explained_variance'],
      ['explained variance (about zero, legacy)', 'explained_variance_about_zero'], ['KL score', 'kl_div_score'],
      ['CE-loss score (loss recovered)', 'loss_recovered'], ['meta-SAE variance explained', 'meta_sae_fve']];
    box.appendChild(el('dl', { class: 'stats', id: 'saebench-core' },
      core.filter(([, k]) => ev[k] !== undefined).map(([label, k]) => stat(label, fmt(ev[k]), null, `saebench-${k}`))));
    const ks = ['top_1', 'top_2', 'top_5', 'all'].filter((k) => ev[`sparse_probing_sae_${k}`] !== undefined);
    if (ks.length) {
      box.appendChild(el('table', { class: 'evaltable', id: 'saebench-sparse-probing' },
        el('thead', null, el('tr', null, ['sparse probing: latents', 'SAE', 'residual'].map((h) => el('th', null, h)))),
        el('tbody', null, ks.map((k) => el('tr', { dataset: { k } }, el('td', null, k.replace('top_', 'top ')),
          el('td', { class: 'num' }, fmt(ev[`sparse_probing_sae_${k}`])),
          el('td', { class: 'num' }, fmt(ev[`sparse_probing_llm_${k}`])))))));
    } else {
      box.appendChild(el('p', { class: 'muted' }, 'Sparse probing: not measured (sae_sparse_probing).'));
    }
    const ab = el('div', { id: 'saebench-absorption' });
    if (!absorption) {
      ab.appendChild(el('p', { class: 'muted' }, 'Feature absorption: not measured (sae_absorption).'));
    } else if (absorption.scored) {
      const m = absorption.metrics;
      ab.appendChild(el('dl', { class: 'stats' },
        stat('absorption fraction', fmt(m.mean_absorption_fraction_score), `sd ${fmt(m.std_dev_absorption_fraction_score)} over ${absorption.letters_counted} letters`),
        stat('full absorption', fmt(m.mean_full_absorption_score), `sd ${fmt(m.std_dev_full_absorption_score)}`),
        stat('split features', fmt(m.mean_num_split_features), `sd ${fmt(m.std_dev_num_split_features)}`)));
    } else {
      ab.appendChild(el('p', { class: 'refusal' }, 'Feature absorption not scored: ', absorption.refusal));
    }
    if (absorption && absorption.chart) {
      ab.appendChild(el('img', { src: S.base + absorption.chart, alt: 'feature absorption per letter', class: 'chart' }));
    }
    box.appendChild(ab);
    return box;
  }

  // Evaluation figures by group (reconstruction, sparsity, downstream, feature quality, ...), each
  // with its unit, which way is better and a one-line definition: index.json's metric_info, the
  // same table sae_eval's Dagster metadata and the comparison page read (sae_platform.metric_info).
  function evaluationTables(box, ev) {
    const info = S.index.metric_info || [];
    const known = new Set(info.map((m) => m.key));
    const groups = [...new Set(info.map((m) => m.group))];
    for (const group of groups) {
      const rows = info.filter((m) => m.group === group && ev[m.key] !== undefined && ev[m.key] !== null);
      if (!rows.length) continue;
      const tbl = el('table', { class: 'evaltable', dataset: { group } },
        el('thead', null, el('tr', null, ['figure', 'value', 'unit', 'better', 'definition'].map((h) => el('th', null, h)))),
        el('tbody', null, rows.map((m) => el('tr', { dataset: { key: m.key } },
          el('td', { title: m.key }, m.label), el('td', { class: 'num' }, fmt(ev[m.key])), el('td', { class: 'muted small' }, m.unit),
          el('td', { title: m.better ? `${m.better} is better` : 'no direction' }, m.arrow),
          el('td', { class: 'small' }, m.definition, m.source ? el('span', { class: 'muted' }, ` (${m.source})`) : null)))));
      box.appendChild(el('h3', null, group));
      box.appendChild(tbl);
    }
    const other = Object.keys(ev).filter((k) => !known.has(k));
    if (other.length) {
      box.appendChild(el('details', null, el('summary', null, `${other.length} more figures of the report`),
        el('table', { class: 'evaltable', id: 'evaluation-other' }, other.map((k) => el('tr', null, el('td', null, k), el('td', { class: 'num' }, fmt(ev[k])))))));
    }
  }

  // ---------- live: text in, features out (needs sae-platform serve) ----------
  // The live server answers GET api/limits (its bounds and checkpoint); the plain server answers 204
  // and other static hosts 404: then the index offers no live page.
  async function probeLive() {
    try {
      const res = await fetch('api/limits', { cache: 'no-store' });
      const limits = res.status === 200 ? await res.json() : null;
      S.live = limits && Number.isInteger(limits.max_chars) ? limits : null;
    } catch (err) {
      S.live = null;
    }
  }
  function renderLive() {
    S.view = 'live';
    const root = clear(app());
    root.appendChild(el('nav', { class: 'fnav' }, el('a', { href: S.listHash }, '\u2190 All features')));
    root.appendChild(el('h1', null, 'Text \u2192 features'));
    const out = el('div', { id: 'live-out' });
    const box = el('textarea', { id: 'live-text', rows: 4, maxLength: S.live ? S.live.max_chars : undefined,
      placeholder: 'Type a text; the base model and the SAE find the features most active on it, live.' });
    const pick = el('input', { id: 'live-feature', type: 'number', min: 0, step: 1, placeholder: 'feature #',
      title: 'Show the heat map of this feature (empty: the most active on the text)' });
    const run = async () => {
      clear(out).appendChild(el('p', { class: 'status' }, 'Running the model\u2026'));
      const body = { text: box.value };
      if (pick.value !== '') body.feature = Number(pick.value);
      try {
        const res = await fetch('api/features', { method: 'POST', headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify(body) });
        const data = await res.json();
        if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
        clear(out).appendChild(liveView(data, (id) => { pick.value = String(id); run(); }));
      } catch (err) {
        clear(out).appendChild(el('p', { class: 'status error' }, `No live answer: ${err.message}. Live text needs the live server (sae-platform serve).`));
      }
    };
    const go = el('button', { type: 'button', id: 'live-go', onclick: run }, 'Find features');
    const limit = S.live ? `at most ${fmtInt(S.live.max_chars)} characters, ${fmtInt(S.live.max_tokens)} tokens; checkpoint ${S.live.checkpoint_version || '–'}`
      : 'Live text needs the live server (sae-platform serve); this server does not answer it.';
    root.appendChild(el('section', { class: 'card' }, box,
      el('div', null, go, ' ', pick, ' ', el('span', { id: 'live-limits', class: 'muted small' }, limit))));
    root.appendChild(out);
  }
  function liveView(data, showFeature) {
    const wrap = el('div');
    const shown = S.site && S.site.checkpoint;
    wrap.appendChild(el('p', { id: 'live-version', class: 'muted small' }, `Encoded by checkpoint ${data.checkpoint_version || '–'}` +
      (data.truncated ? ` \u00b7 input cut to ${fmtInt(data.max_tokens)} tokens / ${fmtInt(data.max_chars)} characters` : '')));
    if (shown && data.checkpoint_version && shown !== data.checkpoint_version) {
      wrap.appendChild(el('p', { class: 'status error', id: 'live-stale' },
        `This page shows checkpoint ${shown}; the server now answers with ${data.checkpoint_version} (the browser was rebuilt): reload the page.`));
    }
    wrap.appendChild(liveHeat(data));
    wrap.appendChild(liveTop(data, showFeature));
    return wrap;
  }
  // The text with the chosen feature's activation on each token as its background; a click lists the token's features.
  function liveHeat(data) {
    const card = el('section', { class: 'card' });
    const f = data.feature;
    const acts = data.feature_acts || [];
    const fmax = Math.max(0, ...acts) || 1;
    const detail = el('div', { id: 'live-detail', class: 'muted' }, 'Click a token to list its features.');
    const text = el('div', { class: 'ctx', id: 'live-heat' });
    data.tokens.forEach((t, j) => {
      const feats = data.features[j] || [];
      const n = data.n_active ? data.n_active[j] : feats.length;
      const span = el('span', { class: 'tok', dataset: { index: j } }, showToken(t));
      if (acts[j] > 0) heat(span, acts[j], fmax);
      span.title = (f === null || f === undefined ? '' : `#${f} act ${fmt(acts[j] || 0)} \u00b7 `) + `${n} active features`;
      span.addEventListener('click', () => {
        clear(detail).appendChild(el('ul', { class: 'related' }, feats.map(([id, a]) => el('li', null,
          el('a', { href: `#/feature/${id}` }, `#${id}`), el('span', { class: 'muted small' }, ` act ${fmt(a)}`),
          explanationOf(id)))));
        if (n > feats.length) detail.appendChild(el('p', { class: 'muted small' }, `Showing the strongest ${feats.length} of ${n} active features.`));
      });
      text.appendChild(span);
    });
    const title = f === null || f === undefined ? `${data.tokens.length} tokens` : `Feature #${f} over the text`;
    card.appendChild(el('h2', null, title, f === null || f === undefined ? null : el('a', { href: `#/feature/${f}`, class: 'small' }, ' open feature page')));
    card.appendChild(text);
    card.appendChild(detail);
    return card;
  }
  // The features most active on the whole text, largest summed activation first; a click shows one's heat map.
  function liveTop(data, showFeature) {
    const card = el('section', { class: 'card' }, el('h2', null, 'Features most active on the whole text'));
    const top = data.top_features || [];
    const list = el('ol', { id: 'live-top', class: 'related' }, top.map(([id, total, max, count]) => el('li', { class: id === data.feature ? 'chosen' : null },
      el('a', { href: `#/feature/${id}` }, `#${id}`),
      el('span', { class: 'muted small' }, ` sum ${fmt(total)} \u00b7 max ${fmt(max)} \u00b7 ${count} tokens `),
      el('button', { type: 'button', class: 'live-show', onclick: () => showFeature(id) }, 'heat map'),
      explanationOf(id))));
    card.appendChild(list);
    const n = data.n_active_features || 0;
    card.appendChild(el('p', { id: 'live-top-note', class: 'muted small' }, data.top_features_truncated
      ? `Showing ${top.length} of ${fmtInt(n)} active features.` : `All ${fmtInt(n)} active features.`));
    return card;
  }
  // A feature's listed explanation, as a span filled once its row is fetched (null: none listed).
  function explanationOf(id) {
    const r = rowOf(id);
    if (!S.index.explained || r === undefined) return null;
    const span = el('span', { class: 'small' });
    const fill = () => { span.textContent = ` ${row(r).explanation || ''}`; };
    if (S.rowChunks.has(rowChunkUrl(r))) fill(); else ensureRows([r]).then(fill, () => {});
    return span;
  }

  // A y axis with 3 ticks (0, half, top) labelled in counts: ``unscale`` turns a drawn height
  // back into a count (identity, or the inverse of a log scale).
  function yAxis(s, top, x0, y0, height, unscale) {
    s.appendChild(svg('line', { x1: x0 + 0.5, y1: y0 - height, x2: x0 + 0.5, y2: y0, class: 'axis' }));
    for (const f of [0, 0.5, 1]) {
      const y = (y0 - f * height).toFixed(1);
      s.appendChild(svg('line', { x1: x0 - 4, y1: y, x2: x0, y2: y, class: 'axis tick' }));
      const t = svg('text', { x: x0 - 6, y: Number(y) + 4, 'text-anchor': 'end', class: 'histlabel ytick' });
      t.textContent = fmtInt(Math.round(unscale(f * top)));
      s.appendChild(t);
    }
  }
  function xTick(s, x, y0, text, anchor) {
    s.appendChild(svg('line', { x1: x, y1: y0, x2: x, y2: y0 + 4, class: 'axis tick' }));
    const t = svg('text', { x, y: y0 + 16, 'text-anchor': anchor || 'middle', class: 'histlabel xtick' });
    t.textContent = text;
    s.appendChild(t);
  }

  function stat(label, value, sub, id) {
    return el('div', { class: 'stat', id },
      el('dt', null, label), el('dd', null, value, sub ? el('small', null, sub) : null));
  }

  function histogram(f) {
    const counts = f.histogram || [];
    const edges = S.index.hist_bin_edges;
    const box = el('div', { class: 'hist' });
    let lo = counts.findIndex((c) => c > 0);
    let hi = counts.length - 1 - [...counts].reverse().findIndex((c) => c > 0);
    if (lo < 0) {
      box.appendChild(el('p', { class: 'muted' }, 'No activations recorded.'));
      return box;
    }
    lo = Math.max(0, lo - 1); hi = Math.min(counts.length - 1, hi + 1);
    const shown = counts.slice(lo, hi + 1);
    const W = 460, H = 150, PADB = 22, PADL = 44;
    const scale = (c) => (S.histLog ? Math.log10(1 + c) : c);
    const unscale = (v) => (S.histLog ? 10 ** v - 1 : v);
    const top = Math.max(...shown.map(scale)) || 1;
    const bw = (W - PADL) / shown.length;
    const s = svg('svg', { id: 'histogram', viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'histsvg' });
    s.appendChild(svg('line', { x1: PADL, y1: H - PADB + 0.5, x2: W, y2: H - PADB + 0.5, class: 'axis' }));
    shown.forEach((c, i) => {
      const h = (scale(c) / top) * (H - PADB - 6);
      const rect = svg('rect', {
        x: (PADL + i * bw + 0.5).toFixed(2), y: (H - PADB - h).toFixed(2),
        width: Math.max(0.5, bw - 1).toFixed(2), height: Math.max(0, h).toFixed(2), class: 'histbar',
      });
      const t = svg('title');
      t.textContent = `[${fmtEdge(edges[lo + i], false)}, ${fmtEdge(edges[lo + i + 1], true)}): ${fmtInt(c)} tokens`;
      rect.appendChild(t);
      s.appendChild(rect);
    });
    yAxis(s, top, PADL, H - PADB, H - PADB - 6, unscale);
    const mid = Math.floor(shown.length / 2);
    xTick(s, PADL + 0.5, H - PADB, fmtEdge(edges[lo], false), 'start');
    xTick(s, PADL + mid * bw, H - PADB, fmtEdge(edges[lo + mid], false));
    xTick(s, W - 0.5, H - PADB, fmtEdge(edges[hi + 1], true), 'end');
    box.appendChild(s);
    const toggle = el('label', { class: 'muted small' },
      el('input', { type: 'checkbox', checked: S.histLog, onchange: (e) => {
        S.histLog = e.target.checked;
        box.replaceWith(histogram(f));
      } }), ' log scale');
    box.appendChild(el('div', { class: 'histfoot' },
      el('span', { class: 'muted small' }, `x: activation (bins with data), y: number of tokens${S.histLog ? ' (log scale)' : ''}; hover a bar for its range`), toggle));
    return box;
  }

  function logits(f) {
    const wrap = el('div', { class: 'logits' });
    const col = (title, strs, scores, ids, cls) => {
      const tbl = el('table', { class: 'logit ' + cls });
      (strs || []).forEach((s, i) => {
        tbl.appendChild(el('tr', null,
          el('td', null, el('span', { class: 'chip', title: ids ? `token id ${ids[i]}` : null }, showToken(s))),
          el('td', { class: 'num' }, fmt(scores[i]))));
      });
      return el('div', null, el('h3', null, title), tbl);
    };
    if (!f.top_token_strs && !f.bottom_token_strs) {
      wrap.appendChild(el('p', { class: 'muted' }, 'No logit effects computed.'));
      return wrap;
    }
    wrap.appendChild(col('Promoted', f.top_token_strs, f.top_scores, f.top_token_ids, 'pos'));
    wrap.appendChild(col('Suppressed', f.bottom_token_strs, f.bottom_scores, f.bottom_token_ids, 'neg'));
    const where = S.index.hook_point ? ` written at ${S.index.hook_point}` : '';
    return el('figure', { class: 'logitfig' }, wrap, el('figcaption', { class: 'muted small', id: 'logit-caption' },
      `Score: the feature's decoder direction${where} times the unembedding (W_dec \u00b7 W_U, the final norm folded in): `
      + 'the change in each token\'s logit per unit of activation along the direct path, bypassing the later layers. '
      + 'Promoted: the largest scores; suppressed: the smallest.'));
  }

  function examples(f) {
    const out = el('div', { class: 'examples' });
    const ex = f.examples;
    if (!ex || !ex.kind || ex.kind.length === 0) {
      out.appendChild(el('section', { class: 'card' }, el('p', { class: 'muted' }, 'No examples: this feature never activated on the sampled tokens.')));
      return out;
    }
    const fmax = f.max || Math.max(0, ...ex.activation.filter((a) => a !== null)) || 1;
    const byKind = new Map();
    ex.kind.forEach((k, i) => { if (!byKind.has(k)) byKind.set(k, []); byKind.get(k).push(i); });
    const order = [...(S.index.kind_order || []), ...[...byKind.keys()].filter((k) => !(S.index.kind_order || []).includes(k)).sort()];
    for (const kind of order) {
      const idx = byKind.get(kind);
      if (!idx) continue;
      const folded = ex.twins ? idx.reduce((n, i) => n + ((ex.twins[i] || 1) - 1), 0) : 0;
      const sec = el('section', { class: 'card kind', id: `examples-${kind.replace(/\W/g, '_')}` },
        el('h2', null, KIND_TITLES[kind] || kind, el('span', { class: 'muted small' },
          ` ${idx.length} examples` + (folded ? ` (${folded} identical window${folded === 1 ? '' : 's'} shown once)` : ''))));
      if (kind === 'interval') {
        const groups = new Map();
        for (const i of idx) { const g = ex.interval[i]; if (!groups.has(g)) groups.set(g, []); groups.get(g).push(i); }
        const gs = [...groups.entries()].map(([g, rows]) => {
          const acts = rows.map((i) => ex.activation[i]).filter((a) => a !== null);
          return { g, rows, lo: Math.min(...acts), hi: Math.max(...acts) };
        }).sort((a, b) => b.hi - a.hi);
        for (const { g, rows, lo, hi } of gs) {
          const n = S.index.n_intervals;
          const range = n && g !== null && f.max
            ? ` [${fmt((g * f.max) / n)}, ${fmt(((g + 1) * f.max) / n)}${g === n - 1 ? ']' : ')'} \u00b7 shown ${fmt(lo)}\u2013${fmt(hi)}`
            : ` activations ${fmt(lo)}\u2013${fmt(hi)}`;
          const grp = el('div', { class: 'interval', dataset: { interval: g === null ? '' : g } },
            el('h3', null, `Interval ${g === null ? '?' : g}`, el('span', { class: 'muted small' }, range)));
          for (const i of rows) grp.appendChild(exampleRow(ex, i, fmax));
          sec.appendChild(grp);
        }
      } else {
        for (const i of idx) sec.appendChild(exampleRow(ex, i, fmax));
      }
      out.appendChild(sec);
    }
    return out;
  }

  function exampleRow(ex, i, fmax) {
    const where = `partition ${ex.partition[i]} \u00b7 row ${ex.row[i]}` + (ex.doc_id && ex.doc_id[i] !== null && ex.doc_id[i] !== undefined ? ` \u00b7 doc ${ex.doc_id[i]}` : '');
    const text = el('div', { class: 'ctx' });
    const toks = ex.tokens[i];
    const twins = ex.twins ? ex.twins[i] || 1 : 1;
    if (!toks) {
      text.appendChild(el('span', { class: 'muted' }, '(no context window)'));
    } else {
      const acts = ex.acts[i] || [];
      const noact = new Set(ex.noact[i] || []);
      const ntok = ex.ntok ? ex.ntok[i] : null;   // tokens per span: a character made of byte tokens
      toks.forEach((t, j) => {
        const a = acts[j];
        const n = ntok ? ntok[j] : 1;
        const span = el('span', { class: 'tok' }, showToken(t));
        const bytes = n > 1 ? ` \u00b7 one character from ${n} byte tokens (max of their activations)` : '';
        if (n > 1) span.classList.add('chars');
        if (noact.has(j)) {
          span.classList.add('noact');
          span.title = 'no stored activation' + bytes;
        } else {
          span.title = `act ${a === null || a === undefined ? '–' : a}` + bytes;
          if (a > 0) {
            heat(span, a, fmax);
          } else if (a < 0) {
            span.style.backgroundColor = `rgba(40, 110, 255, ${(0.08 + 0.6 * Math.min(1, -a / fmax)).toFixed(3)})`;
            span.classList.add('active');
          }
        }
        if (j === ex.center[i]) span.classList.add('center');
        text.appendChild(span);
      });
    }
    return el('div', { class: 'ex' },
      el('span', { class: 'exact num', title: where }, fmt(ex.activation[i])),
      twins > 1 ? el('span', { class: 'twins', title: `the same window occurs ${twins} times among this feature's examples; shown once (first: ${where})` }, `\u00d7${twins}`) : null,
      text);
  }

  // ---------- lineage ----------
  function dagsterLink(path, text) {
    const base = S.index.dagster_url;
    if (typeof base !== 'string' || !/^https?:\/\/[^\s"'<>]+$/.test(base)) return el('code', null, text);
    const a = el('a', { class: 'ext', target: '_blank', rel: 'noopener noreferrer' }, text);
    a.setAttribute('href', base + path);   // only below the configured Dagster UI
    return a;
  }
  const enc = encodeURIComponent;
  function runLink(id) {
    return id ? dagsterLink(`/runs/${enc(id)}`, `run ${String(id).slice(0, 8)}`) : el('span', { class: 'muted' }, 'not recorded');
  }
  function assetLink(key, partition) {
    return dagsterLink(`/assets/${enc(key)}` + (partition ? `?view=partitions&partition=${enc(partition)}` : ''),
      partition ? `${key}[${partition}]` : key);
  }
  function shardLineage(id) {
    for (const s of S.index.shard_lineage || []) if (id >= s.start && id < s.stop) return s.lineage;
    return null;
  }
  function lineageRow(dl, label, ...value) {
    dl.appendChild(el('dt', null, label));
    dl.appendChild(el('dd', null, ...value));
  }
  function shardLineageRows(dl, lin) {
    const t = lin.feature_table || {}, c = lin.sae_checkpoint || {}, s = lin.shuffle || {};
    const m = lin.base_model || {}, parts = lin.activation_partitions || [];
    const shard = t.shard !== undefined && t.shard !== null ? `f${t.shard}` : null;
    const range = Array.isArray(t.features) ? `features [${t.features[0]}, ${t.features[1]})` : '';
    lineageRow(dl, 'Feature table', el('code', null, `${t.sae || ''} ${shard || ''} \u00b7 ${range} \u00b7 version ${t.version || '?'}`),
      ' ', assetLink('feature_topk', shard), ' \u00b7 built by ', runLink(t.dagster_run_id));
    lineageRow(dl, 'SAE checkpoint', el('code', null, `${c.name || '?'} (${c.variant || '?'}) \u00b7 version ${c.version || '?'} \u00b7 step ${fmtInt(c.step)} \u00b7 ${fmtInt(c.tokens)} tokens`),
      ' ', assetLink('sae_checkpoint', c.name));
    const stale = s.current_plan_id && s.plan_id !== s.current_plan_id ? ` (re-shuffled since: plan ${s.current_plan_id})` : '';
    lineageRow(dl, 'Shuffled activations', el('code', null, `${s.name || '?'} \u00b7 plan ${s.plan_id || '?'} \u00b7 ${fmtInt(s.n_rows)} rows${stale}`),
      ' ', assetLink('shuffled_activations'));
    lineageRow(dl, 'Activation partitions',
      el('details', null, el('summary', null, `${parts.length} partition${parts.length === 1 ? '' : 's'}`),
        el('ul', { class: 'parts' }, parts.map((p) => el('li', null,
          el('code', null, `${p.key} \u00b7 version ${p.version} \u00b7 ${fmtInt(p.n_rows)} rows`), ' ', assetLink('activations', p.key))))));
    const hookName = m.hook_name_in ? `${m.hook_name_in} -> ${m.hook_name}` : (m.hook_name || '?');
    lineageRow(dl, 'Base model', el('code', null, `${m.model || '?'} \u00b7 ${hookName} \u00b7 d_model ${m.d_model || '?'}`),
      ' ', assetLink('base_model'));
  }

  function lineage(id) {
    const lin = S.index.lineage || {};
    const dl = el('dl', { class: 'lineage' });
    const own = shardLineage(id);
    if (own) {
      shardLineageRows(dl, own);
      lineageRow(dl, 'Browser', 'built by ', runLink(lin.browser_dagster_run_id), ' ', assetLink('feature_browser'),
        el('code', null, ` \u00b7 ${S.index.generated} (${S.index.version})`));
      return el('section', { class: 'card', id: 'lineage' }, el('h2', null, 'Lineage'), dl);
    }
    const keys = [...Object.keys(LINEAGE_LABELS).filter((k) => k in lin), ...Object.keys(lin).filter((k) => !(k in LINEAGE_LABELS))];
    for (const k of keys) {
      const v = lin[k];
      let value;
      if (Array.isArray(v)) {
        value = el('details', null, el('summary', null, `${v.length} item${v.length === 1 ? '' : 's'}`),
          el('code', { class: 'list' }, v.map((x) => (typeof x === 'string' ? x : JSON.stringify(x))).join(', ')));
      } else {
        value = el('code', null, typeof v === 'string' ? v : JSON.stringify(v));
      }
      dl.appendChild(el('dt', null, LINEAGE_LABELS[k] || k));
      dl.appendChild(el('dd', null, value));
    }
    dl.appendChild(el('dt', null, 'Site built'));
    dl.appendChild(el('dd', null, el('code', null, `${S.index.generated} (${S.index.version})`)));
    return el('section', { class: 'card', id: 'lineage' }, el('h2', null, 'Lineage'), dl);
  }

  // ---------- routing ----------
  async function route() {
    const m = /^#\/feature\/(\d+)$/.exec(location.hash);
    const mine = ++S.routes;
    if (m) {
      renderFeature(Number(m[1]));
      window.scrollTo(0, 0);
    } else if (location.hash === '#/overview') {
      renderOverview();
    } else if (location.hash === '#/live') {
      renderLive();
    } else if (isListHash(location.hash)) {
      await readListHash(location.hash);
      if (mine === S.routes) renderIndex();
    } else if (S.view !== 'index') {
      renderIndex();
    }
  }
  document.addEventListener('keydown', (e) => {
    if (S.view !== 'feature' || e.target.tagName === 'INPUT' || e.altKey || e.ctrlKey || e.metaKey) return;
    const link = document.getElementById(e.key === 'ArrowLeft' ? 'prev-feature' : e.key === 'ArrowRight' ? 'next-feature' : '');
    if (link) location.hash = link.getAttribute('href');
  });

  async function boot() {
    try {
      await Promise.all([loadIndex(), probeLive()]);
    } catch (err) {
      clear(app()).appendChild(el('p', { class: 'status error' }, `Could not load the feature index: ${err.message}. Serve this directory over HTTP (python -m sae_platform.browser serve DIR).`));
      return;
    }
    await applyQuery();             // the whole list by id: nothing fetched
    window.addEventListener('hashchange', route);
    route();
  }
  document.addEventListener('DOMContentLoaded', boot);
})();
