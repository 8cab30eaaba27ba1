// The feature page's steer panel (needs the live server, sae-platform serve: POST api/steer).
// A prompt and a strength (activation units; default the feature's max activation) give the
// model's greedy continuation without and with the feature added at the SAE's hook point, side by
// side, streamed token by token (JSON lines). app.js calls window.saeSteerPanel(feature, limits)
// only when the live server answered its probe (limits: GET api/limits).
(function () {
  'use strict';

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined) continue;
      if (k === 'class') node.className = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else if (k in node && k !== 'list') node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const show = (s) => s.replace(/\n/g, '\u21b5');

  // "12:4.5, 40:-2" -> [[12, 4.5], [40, -2]]; a bad entry throws naming it
  function moreFeatures(text) {
    return text.split(',').map((s) => s.trim()).filter(Boolean).map((entry) => {
      const m = /^(\d+)\s*:\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)$/i.exec(entry);
      if (!m) throw new Error(`"${entry}" is not feature:strength (e.g. 12:4.5)`);
      return [Number(m[1]), Number(m[2])];
    });
  }

  async function* jsonLines(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let cut;
      while ((cut = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 1);
        if (line.trim()) yield JSON.parse(line);
      }
      if (done) return;
    }
  }

  function panel(f, limits) {
    const cap = limits.max_new_tokens;
    const prompt = el('textarea', { id: 'steer-prompt', rows: 2, maxLength: limits.max_chars,
      placeholder: 'A prompt; the model continues it greedily, without and with this feature.' });
    const strength = el('input', { id: 'steer-strength', type: 'number', step: 'any', value: String(f.max ?? 1),
      title: 'Strength in activation units (default: the feature\u2019s max activation)' });
    const method = el('select', { id: 'steer-method', title: 'Neuronpedia\u2019s steering methods' },
      limits.steer_methods.map((m) => el('option', { value: m }, m)));
    const tokens = el('input', { id: 'steer-tokens', type: 'number', min: 1, max: cap, step: 1,
      value: String(Math.min(24, cap)), title: `Tokens generated (at most ${cap})` });
    const more = el('input', { id: 'steer-more', type: 'text', placeholder: 'more features: id:strength, \u2026' });
    const condFeature = el('input', { id: 'steer-cond-feature', type: 'number', min: 0, step: 1,
      placeholder: 'only where feature #', title: 'Conditional steering: steer only where this feature fires' });
    const condThreshold = el('input', { id: 'steer-cond-threshold', type: 'number', step: 'any', value: '0',
      title: 'Steer where the condition feature\u2019s activation is above this' });
    const status = el('p', { id: 'steer-status', class: 'muted small' },
      `Greedy; at most ${cap} tokens, one request at a time. Checkpoint ${limits.checkpoint_version || '\u2013'}.`);
    const columns = { baseline: el('div', { id: 'steer-baseline', class: 'ctx' }),
      steered: el('div', { id: 'steer-steered', class: 'ctx' }) };
    const go = el('button', { type: 'button', id: 'steer-go' }, 'Steer');

    async function run() {
      let features;
      try {
        features = [[f.feature, Number(strength.value)], ...moreFeatures(more.value)];
      } catch (err) {
        status.className = 'status error';
        status.textContent = err.message;
        return;
      }
      const body = { prompt: prompt.value, features, method: method.value, max_new_tokens: Number(tokens.value) };
      if (condFeature.value !== '') body.condition = { feature: Number(condFeature.value), threshold: Number(condThreshold.value) };
      Object.values(columns).forEach((c) => { c.textContent = ''; });
      status.className = 'status';
      status.textContent = 'Generating\u2026';
      go.disabled = true;
      try {
        const res = await fetch('api/steer', { method: 'POST', headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify(body) });
        if (!res.ok) throw new Error((await res.json()).error || `HTTP ${res.status}`);
        for await (const line of jsonLines(res)) {
          if (line.error) throw new Error(line.error);
          if (line.done) {
            status.className = 'muted small';
            status.textContent = `Done: ${line.method || method.value} at strength ${strength.value}` +
              (body.condition ? `, only where feature #${body.condition.feature} > ${body.condition.threshold}` : '') + '.';
            continue;
          }
          for (const side of ['baseline', 'steered']) {
            if (typeof line[side] === 'string') columns[side].append(el('span', { class: 'tok' }, show(line[side])));
          }
        }
      } catch (err) {
        status.className = 'status error';
        status.textContent = `No steering: ${err.message}`;
      } finally {
        go.disabled = false;
      }
    }
    go.addEventListener('click', run);
    return el('section', { class: 'card', id: 'steer' },
      el('h2', null, 'Steer'),
      prompt,
      el('div', null, go, ' strength ', strength, ' ', method, ' tokens ', tokens, ' ', more),
      el('div', null, 'conditional: ', condFeature, ' > ', condThreshold),
      status,
      el('div', { class: 'grid' },
        el('div', null, el('h3', null, 'Without'), columns.baseline),
        el('div', null, el('h3', null, 'Steered'), columns.steered)));
  }

  window.saeSteerPanel = panel;
})();
