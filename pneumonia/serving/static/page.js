// The review page's script: one card per dropped or picked file, answered by `POST explain`, and
// the model card from `GET model`. Vanilla ES2020, no build step, no external anything.
//
// Every string that comes from the API or from a file name goes into the page with textContent
// (or an attribute value), never as markup; styles change through the CSSOM only (the CSP bans
// inline style attributes).
'use strict';

(() => {
  // The API's routes are siblings of the page. The app may be mounted under a prefix (/ops/), and
  // a page reached as "/ops" (no trailing slash) would resolve "model" to "/model", so resolve
  // against the page's path with a trailing slash rather than against document.baseURI.
  const BASE = new URL(location.pathname.endsWith('/') ? location.pathname : `${location.pathname}/`, location.origin);
  const apiUrl = (path) => new URL(path, BASE).href;

  const IN_FLIGHT = 2;          // requests at once: answers stream in without crowding a small service
  const TIMEOUT_MS = 120000;    // an answer slower than this is reported, not waited for forever
  const MAX_RETRY_AFTER_S = 30; // a 503's Retry-After longer than this is capped (one retry only)
  const NOT_RECORDED = 'not recorded';
  // A service started with tokens answers 401 without one: the page asks for it once and keeps it
  // in sessionStorage (this tab only, gone when the tab closes), never in localStorage or a cookie.
  const TOKEN_KEY = 'pneumonia.token';
  const PREVIEWABLE = /\.(jpe?g|png)$/i;

  const input = document.getElementById('file-input');
  const dropZone = document.querySelector('[data-testid="drop-zone"]');
  const results = document.getElementById('results');
  const empty = document.getElementById('empty');
  const resultsBar = document.getElementById('results-bar');
  const clearButton = document.getElementById('clear-results');
  const announcer = document.getElementById('announcer');
  const modelBody = document.getElementById('model-body');
  const servedModel = document.getElementById('served-model');
  const modelWarning = document.getElementById('model-warning');

  let servedVersion = null; // the version the model card shows, to flag answers from another one
  let cardCount = 0;
  const cards = new Set(); // every card on the page, to free their pictures on "Clear answers"
  const queue = [];
  let running = 0;
  let tokenQuestion = null; // the one pending question for the token, shared by concurrent 401s
  let tokenDeclined = false; // the person cancelled the question: not asked again until a reload

  // ------------------------------------------------------------------ small helpers

  /** An element with attributes (values as given; never "style") and children (strings as text). */
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === false || value === null || value === undefined) continue;
      node.setAttribute(name, value === true ? '' : String(value));
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  const isNumber = (value) => typeof value === 'number' && Number.isFinite(value);
  const fixed = (value, digits = 2) => (isNumber(value) ? value.toFixed(digits) : NOT_RECORDED);

  /** Probability and threshold at 2 decimals, or more where 2 would make them look equal. */
  function probabilityDigits(probability, threshold) {
    let digits = 2;
    while (digits < 6 && probability !== threshold && probability.toFixed(digits) === threshold.toFixed(digits)) digits += 1;
    return digits;
  }

  function announce(text) {
    announcer.append(el('p', {}, text));
    while (announcer.childElementCount > 10) announcer.firstElementChild.remove();
  }

  // ------------------------------------------------------------------ files in

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    const batch = document.createDocumentFragment();
    for (const file of files) {
      const card = makeCard(file);
      batch.append(card.root);
      queue.push(card);
    }
    results.prepend(batch); // newest first, next to the picker
    empty.hidden = true;
    resultsBar.hidden = false;
    announce(`${files.length} file${files.length === 1 ? '' : 's'} sent for an answer`);
    pump();
  }

  // Clear: the cards go, with their pictures (object URLs freed); files not yet sent are not sent.
  // An answer still in flight lands in its removed card and is dropped with it.
  clearButton.addEventListener('click', () => {
    queue.length = 0;
    for (const card of cards) {
      if (card.preview) URL.revokeObjectURL(card.preview);
      card.preview = null;
      card.root.remove();
    }
    const count = cards.size;
    cards.clear();
    empty.hidden = false;
    resultsBar.hidden = true;
    announce(`${count} answer${count === 1 ? '' : 's'} cleared`);
    input.focus(); // the bar is gone: keep keyboard users on the picker
  });

  input.addEventListener('change', () => {
    addFiles(input.files);
    input.value = ''; // picking the same file again is a new request
  });

  // Drops land anywhere on the page (a near miss must not make the browser open the file instead).
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes('Files');
  let dragDepth = 0;
  window.addEventListener('dragenter', (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    dropZone.classList.add('is-dragover');
  });
  window.addEventListener('dragleave', (event) => {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropZone.classList.remove('is-dragover');
  });
  window.addEventListener('dragover', (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
  });
  window.addEventListener('drop', (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    dropZone.classList.remove('is-dragover');
    addFiles(event.dataTransfer.files);
  });

  // ------------------------------------------------------------------ one card per file

  function makeCard(file) {
    cardCount += 1;
    const id = `card-${cardCount}`;
    const title = el('h3', { class: 'card-title', id: `${id}-title` }, file.name || '(unnamed file)');
    const size = file.size >= 1024 * 1024 ? `${(file.size / 1024 / 1024).toFixed(1)} MB` : `${Math.max(1, Math.round(file.size / 1024))} kB`;
    const details = el('p', { class: 'card-meta' }, `${size}${file.type ? ` · ${file.type}` : ''}`);

    // The picture: the X-ray (a local preview until the answer's own) with the heatmap on top.
    const xray = el('img', { class: 'xray', 'data-testid': 'overlay-image', alt: `X-ray: ${file.name}`, hidden: true });
    const heatmap = el('img', { class: 'heatmap', 'data-testid': 'heatmap-image', alt: '', hidden: true });
    const placeholder = el('p', { class: 'placeholder' }, 'no preview');
    const figure = el('div', { class: 'figure', 'data-testid': 'figure' }, xray, heatmap, placeholder);
    let preview = null;
    if (PREVIEWABLE.test(file.name) || file.type === 'image/jpeg' || file.type === 'image/png') {
      preview = URL.createObjectURL(file);
      xray.addEventListener('error', () => {
        URL.revokeObjectURL(preview); // nothing shown: free the file's copy now
        xray.hidden = true; placeholder.hidden = false; placeholder.textContent = 'no preview: the browser cannot show this file';
      }, { once: true });
      xray.src = preview;
      xray.hidden = false;
      placeholder.hidden = true;
    } else if (/\.dcm$/i.test(file.name) || file.type === 'application/dicom') {
      placeholder.textContent = 'DICOM: the picture appears with the answer';
    }

    const status = el('p', { class: 'status', 'data-testid': 'status' }, 'waiting for an answer…');
    const root = el('article', {
      class: 'card', 'data-testid': 'result-card', 'data-file': file.name, 'data-state': 'pending',
      'aria-labelledby': title.id, 'aria-busy': 'true',
    }, title, details, figure, status);
    const card = { id, file, root, title, figure, xray, heatmap, placeholder, status, preview };
    cards.add(card);
    return card;
  }

  function finish(card, state) {
    card.root.dataset.state = state;
    card.root.removeAttribute('aria-busy');
  }

  function showPicture(card, source) {
    card.xray.src = `data:image/png;base64,${source}`;
    card.xray.hidden = false;
    card.placeholder.hidden = true;
    if (card.preview) {
      URL.revokeObjectURL(card.preview);
      card.preview = null;
    }
  }

  function modelLine(card, answer) {
    const parts = [];
    if (answer.model || answer.version) parts.push(`model ${answer.model || '?'} ${answer.version || ''}`.trim());
    const calibration = answer.calibration && typeof answer.calibration === 'object' ? answer.calibration : null;
    if (calibration) parts.push(calibration.site ? `threshold calibrated for ${calibration.site}` : 'shipped threshold (not calibrated for a site)');
    if (answer.layer) parts.push(`Grad-CAM of layer ${answer.layer}`);
    if (parts.length) card.root.append(el('p', { class: 'card-meta', 'data-testid': 'card-model' }, parts.join(' · ')));
    if (servedVersion && answer.version && answer.version !== servedVersion) {
      card.root.append(el('p', { class: 'card-warning' },
        `answered by version ${answer.version}, not ${servedVersion} of the model card: reload the page to see its card`));
    }
    if (answer.warning) card.root.append(el('p', { class: 'card-warning', 'data-testid': 'card-warning' }, `Warning: ${answer.warning}`));
  }

  /** A classified image: label, gauge, numbers, the layered picture and its opacity slider. */
  function showAnswer(card, answer) {
    const { probability, threshold } = answer;
    const label = String(answer.label);
    const kind = label === 'PNEUMONIA' ? 'label-pneumonia' : label === 'NORMAL' ? 'label-normal' : 'label-none';
    card.status.remove();
    card.root.append(el('p', { class: 'verdict' }, el('span', { class: `label ${kind}`, 'data-testid': 'label' }, label)));

    if (isNumber(probability) && isNumber(threshold)) {
      const digits = probabilityDigits(probability, threshold);
      const text = `probability ${probability.toFixed(digits)} · threshold ${threshold.toFixed(digits)}`;
      const above = el('div', { class: 'gauge-above' });
      const tick = el('div', { class: 'gauge-threshold' });
      const marker = el('div', { class: 'gauge-marker' });
      const clamp = (value) => `${Math.min(1, Math.max(0, value)) * 100}%`;
      above.style.left = clamp(threshold);
      tick.style.left = clamp(threshold);
      marker.style.left = clamp(probability);
      card.root.append(
        el('div', { class: 'gauge', 'data-testid': 'gauge', role: 'img',
                    'aria-label': `${text}; ${probability >= threshold ? 'at or above' : 'below'} the threshold` },
          el('div', { class: 'gauge-track' }, above, tick, marker),
          el('div', { class: 'gauge-scale', 'aria-hidden': 'true' }, el('span', {}, '0'),
            el('span', {}, el('span', { class: 'legend-tick' }), ' threshold ', el('span', { class: 'legend-dot' }), ' probability'),
            el('span', {}, '1'))),
        el('p', { class: 'probability', 'data-testid': 'probability' }, text));
    } else {
      card.root.append(el('p', { class: 'probability', 'data-testid': 'probability' }, 'probability not given'));
    }

    if (answer.image_png && answer.heatmap_png) {
      showPicture(card, answer.image_png);
      card.heatmap.src = `data:image/png;base64,${answer.heatmap_png}`;
      card.heatmap.alt = 'Grad-CAM heatmap: the regions that raised the PNEUMONIA score';
      card.heatmap.hidden = false;
      const alpha = isNumber(answer.overlay_alpha) ? answer.overlay_alpha : 0.45;
      const percent = Math.round(Math.min(1, Math.max(0, alpha)) * 100);
      const slider = el('input', { type: 'range', id: `${card.id}-opacity`, 'data-testid': 'opacity', min: 0, max: 100,
                                   step: 1, value: percent, 'aria-describedby': card.title.id });
      const output = el('output', { for: slider.id }, `${percent}%`);
      const setOpacity = () => {
        card.heatmap.style.opacity = String(Number(slider.value) / 100);
        output.textContent = `${slider.value}%`;
      };
      slider.addEventListener('input', setOpacity);
      setOpacity();
      card.root.append(el('div', { class: 'control' }, el('label', { for: slider.id }, 'Heatmap opacity'), slider, output));
    } else if (answer.overlay_png) { // a service without the separate layers: the blended overlay
      showPicture(card, answer.overlay_png);
    }
    modelLine(card, answer);
    finish(card, 'done');
    announce(`${card.file.name}: ${label}, ${card.root.querySelector('[data-testid="probability"]').textContent}`);
  }

  /** The service answered but did not classify the file (a refusal), or could not answer (error). */
  function showRefusal(card, message, state, answer = {}) {
    card.status.remove();
    // In words as well as the card's red edge: no label was given, and why.
    const verdict = state === 'error' ? 'no answer' : answer.out_of_distribution && !answer.error ? 'flagged' : 'refused';
    card.root.append(el('p', { class: 'verdict' }, el('span', { class: 'label label-none', 'data-testid': 'label' }, verdict)));
    card.root.append(el('p', { class: 'error', 'data-testid': 'error' }, message));
    if (isNumber(answer.ood_score) && isNumber(answer.ood_threshold)) {
      card.root.append(el('p', { class: 'card-meta' },
        `out-of-distribution score ${answer.ood_score.toFixed(1)} above the guard's threshold ${answer.ood_threshold.toFixed(1)}`));
    }
    modelLine(card, answer);
    finish(card, state);
    announce(`${card.file.name}: ${state === 'refused' ? 'not classified' : 'error'}: ${message}`);
  }

  // ------------------------------------------------------------------ talking to the service

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null; // storage disabled: the token lives as long as the question's answer
    }
  }

  function withToken(options) {
    const token = storedToken();
    if (!token) return options;
    return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token}` } };
  }

  /** Ask for the token (once for several 401s at once); true when a new one was given. */
  function askToken(rejected) {
    if (tokenDeclined) return Promise.resolve(false);
    if (!tokenQuestion) {
      tokenQuestion = Promise.resolve().then(() => {
        const answer = window.prompt(rejected
          ? 'The service did not accept that access token. Enter it again (kept in this tab only):'
          : 'This service needs an access token. Enter it (kept in this tab only, until it closes):');
        const token = (answer || '').trim();
        if (!token) {
          tokenDeclined = true;
          return false;
        }
        try {
          sessionStorage.setItem(TOKEN_KEY, token);
        } catch {
          return false;
        }
        return true;
      }).finally(() => { tokenQuestion = null; });
    }
    return tokenQuestion;
  }

  /** fetch with this tab's token; on a 401, ask for the token and try once more with it. */
  async function call(url, options = {}) {
    const sent = storedToken();
    const response = await fetch(url, withToken(options));
    if (response.status !== 401) return response;
    const current = storedToken();
    if (current && current !== sent) return fetch(url, withToken(options)); // another request got it meanwhile
    if (await askToken(Boolean(sent))) return fetch(url, withToken(options));
    return response;
  }

  /** Status, parsed JSON (null when the body is not JSON) and text of a response. */
  async function read(response) {
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      // Not JSON: e.g. Serve's own plain-text 503 or a proxy's HTML page; reported as text.
    }
    return { status: response.status, statusText: response.statusText, body, text, retryAfter: response.headers.get('Retry-After') };
  }

  /** The API's own message for a failed answer, or a readable one made from what came back. */
  function errorMessage(reply) {
    if (reply.body && typeof reply.body.error === 'string' && reply.body.error) return reply.body.error;
    const text = reply.text.replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' ').trim().slice(0, 300);
    return `the service answered ${reply.status}${reply.statusText ? ` ${reply.statusText}` : ''}${text ? `: ${text}` : ' with no message'}`;
  }

  async function post(file) {
    const form = new FormData();
    form.append('file', file, file.name);
    const options = { method: 'POST', body: form };
    if (typeof AbortSignal !== 'undefined' && AbortSignal.timeout) options.signal = AbortSignal.timeout(TIMEOUT_MS);
    return read(await call(apiUrl('explain?layers=true'), options));
  }

  const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

  async function explain(card) {
    try {
      let reply = await post(card.file);
      const busy = reply.status === 503;
      if (busy) { // overloaded: one retry after the time the service asks for
        const seconds = Math.min(MAX_RETRY_AFTER_S, Math.max(0, Number.parseFloat(reply.retryAfter) || 1));
        card.status.textContent = `the service is busy; retrying in ${seconds} s…`;
        await sleep(seconds * 1000);
        card.status.textContent = 'waiting for an answer…';
        reply = await post(card.file);
      }
      const answer = reply.body && typeof reply.body === 'object' ? reply.body : null;
      if (reply.status === 200 && answer && answer.out_of_distribution === true && !('label' in answer)) {
        showRefusal(card, 'not classified: does not look like a chest X-ray', 'refused', answer);
      } else if (reply.status === 200 && answer && typeof answer.label === 'string') {
        showAnswer(card, answer);
      } else if (reply.status === 200) {
        showRefusal(card, `the service answered 200 without a label: ${reply.text.slice(0, 200)}`, 'error');
      } else {
        // 4xx: the service read the request and refused this file; anything else is a failure.
        const again = busy && reply.status === 503 ? ' (tried twice)' : '';
        showRefusal(card, `${errorMessage(reply)}${again}`, reply.status >= 400 && reply.status < 500 ? 'refused' : 'error', answer || {});
      }
    } catch (error) {
      const timedOut = error && (error.name === 'TimeoutError' || error.name === 'AbortError');
      showRefusal(card, timedOut ? `no answer within ${TIMEOUT_MS / 1000} s; try again later`
        : `could not reach the service (${error && error.message ? error.message : 'network error'})`, 'error');
    }
  }

  /** Start queued requests while fewer than IN_FLIGHT are running. */
  function pump() {
    while (running < IN_FLIGHT && queue.length) {
      const card = queue.shift();
      running += 1;
      explain(card).finally(() => {
        running -= 1;
        pump();
      });
    }
  }

  // ------------------------------------------------------------------ the model card

  function row(list, term, value, attributes = {}) {
    const missing = value === null || value === undefined || value === '' || value === NOT_RECORDED;
    const dd = el('dd', missing ? { ...attributes, class: 'not-recorded' } : attributes, missing ? NOT_RECORDED : value);
    list.append(el('dt', {}, term), dd);
  }

  function section(title) {
    const list = el('dl');
    modelBody.append(el('h3', {}, title), list);
    return list;
  }

  /** "0.82 (95% CI 0.73–0.90)", the interval left out where it was not recorded (and never
      broken across lines). */
  function withInterval(value, interval, confidence) {
    if (!isNumber(value)) return null;
    if (!Array.isArray(interval) || !isNumber(interval[0]) || !isNumber(interval[1])) return value.toFixed(2);
    const level = isNumber(confidence) ? `${Math.round(confidence * 100)}% ` : '';
    const fragment = document.createDocumentFragment();
    fragment.append(`${value.toFixed(2)} `,
      el('span', { class: 'nowrap' }, `(${level}CI ${interval[0].toFixed(2)}–${interval[1].toFixed(2)})`));
    return fragment;
  }

  function showModel(card) {
    modelBody.replaceChildren();
    const object = (value) => (value && typeof value === 'object' && !Array.isArray(value) ? value : {});
    const metrics = object(card.validation_metrics);
    const point = object(metrics.operating_point);
    const input = object(card.input);
    const training = object(card.training_data);
    const guard = object(card.out_of_distribution); // the guard these replicas apply (null: none)

    servedVersion = typeof card.version === 'string' ? card.version : null;
    servedModel.textContent = `${card.name || 'unnamed model'} ${card.version || '(version not recorded)'}`;
    if (card.warning) {
      modelWarning.textContent = `Warning from the service about this model: ${card.warning}.`;
      modelWarning.hidden = false;
      modelBody.append(el('p', { class: 'card-warning', 'data-testid': 'model-card-warning' }, `Warning: ${card.warning}`));
    }

    const identity = section('Model');
    row(identity, 'name', card.name, { 'data-testid': 'model-name' });
    row(identity, 'version', card.version, { 'data-testid': 'model-version' });
    // ISO 8601 as exported ("2026-11-30T07:29:40+00:00"), shown as "2026-11-30 07:29:40 UTC".
    row(identity, 'created', typeof card.created === 'string' ? card.created.replace('T', ' ').replace(/(\+00:00|Z)$/, ' UTC') : null);
    row(identity, 'package', card.package_version);
    const members = object(card.ensemble).members;
    row(identity, 'ensemble', card.ensemble ? (isNumber(members) ? `${members} members (answers are their mean)` : 'yes') : 'single model');
    row(identity, 'input', isNumber(input.image_size)
      ? `${input.image_size}×${input.image_size} px, ${input.channels === 3 ? 'RGB' : 'grey'}${input.resize ? `, ${input.resize}` : ''}` : null);

    const decision = section('Decision threshold');
    const threshold = isNumber(card.threshold) ? card.threshold : point.threshold;
    row(decision, 'threshold', isNumber(threshold) ? `${threshold.toFixed(4)} (PNEUMONIA at or above)` : null, { 'data-testid': 'model-threshold' });
    row(decision, 'target recall', isNumber(card.target_recall) ? card.target_recall.toFixed(2) : null);
    row(decision, 'chosen by', point.description ? `${point.description}${point.rule ? ` (rule: ${point.rule})` : ''}` : point.rule);
    if (typeof point.met === 'boolean') {
      row(decision, 'target met', point.met ? 'yes' : 'NO: the threshold misses the target recall', point.met ? {} : { class: 'unmet' });
    } else {
      row(decision, 'target met', null);
    }

    const site = object(card.site);
    const siteCalibration = object(card.calibration);
    row(decision, 'calibrated for', siteCalibration.site
      ? `${siteCalibration.site}${isNumber(siteCalibration.images) ? ` on ${siteCalibration.images} images` : ''}`
      : 'no site: the shipped threshold, chosen on validation with a safety margin (pneumonia calibrate sets a site\'s)',
    { 'data-testid': 'model-site' });
    if (site.name) {
      const siteMetrics = object(object(site.metrics).site_threshold);
      const sitePoint = object(site.operating_point);
      const atSite = section(`Site ${site.name}`);
      row(atSite, 'calibrated', typeof site.calibrated === 'string' ? site.calibrated.replace('T', ' ').replace(/(\+00:00|Z)$/, ' UTC') : null);
      row(atSite, 'shipped threshold', isNumber(site.shipped_threshold) ? `${site.shipped_threshold.toFixed(4)} (${site.source_version || 'source version'})` : null);
      for (const name of ['precision', 'recall', 'specificity']) {
        row(atSite, name, withInterval(siteMetrics[name], siteMetrics[`${name}_ci`], sitePoint.confidence));
      }
      const ood = object(site.out_of_distribution);
      row(atSite, 'not classified', isNumber(ood.rate) ? `${(ood.rate * 100).toFixed(1)}% of the sample (out-of-distribution guard)` : null);
    }
    const drift = object(card.drift);
    if (drift.level) {
      const monitor = section('Drift');
      row(monitor, 'score drift', isNumber(drift.value)
        ? `PSI ${drift.value.toFixed(3)} over the last ${drift.images} images: ${drift.level}` : `${drift.level}`,
      { 'data-testid': 'model-drift' });
      row(monitor, 'reference', drift.reference);
      row(monitor, 're-calibrate at', isNumber(drift.recalibrate_at) ? `PSI ${drift.recalibrate_at}` : null);
    }

    const validation = section(`Validation${isNumber(metrics.n) ? ` (${metrics.n} images)` : ''}`);
    const confidence = point.confidence;
    for (const name of ['precision', 'recall', 'specificity']) {
      const value = isNumber(point[name]) ? point[name] : metrics[name];
      row(validation, name, withInterval(value, point[`${name}_ci`], confidence), { 'data-testid': `model-${name}` });
    }
    row(validation, 'ROC AUC', isNumber(metrics.roc_auc) ? fixed(metrics.roc_auc) : null);
    row(validation, 'PR AUC', isNumber(metrics.pr_auc) ? fixed(metrics.pr_auc) : null);
    row(validation, 'accuracy', isNumber(metrics.accuracy) ? fixed(metrics.accuracy) : null);
    row(validation, 'images (n)', isNumber(metrics.n) ? String(metrics.n) : null);

    const provenance = section('Provenance');
    const synthetic = training.synthetic === true ? 'synthetic images (not real X-rays)'
      : training.synthetic === false ? 'real X-rays' : null;
    row(provenance, 'training data', synthetic);
    row(provenance, 'data fingerprint', card.data_fingerprint, { class: 'hash' });
    row(provenance, 'git commit', card.git_commit, { class: 'hash' });
    const tracking = object(card.tracking);
    row(provenance, 'MLflow run', tracking.run_id ? `${tracking.run_id}${tracking.tracking_uri ? ` (${tracking.tracking_uri})` : ''}` : null, { class: 'hash' });

    const screening = section('Out-of-distribution guard');
    if (Object.keys(guard).length) {
      row(screening, 'policy', guard.policy === 'flag' ? 'flag (answered, not classified)'
        : guard.policy === 'reject' ? 'reject (refused with an error)' : guard.policy);
      row(screening, 'method', guard.method);
      row(screening, 'passes', isNumber(guard.pass_rate) ? `${(guard.pass_rate * 100).toFixed(0)}% of validation X-rays (by design)` : null);
    } else {
      row(screening, 'guard', 'none: every decodable image gets a label');
    }

    const raw = el('pre', {}, JSON.stringify(card, null, 2));
    modelBody.append(el('details', {}, el('summary', {}, 'All metadata (JSON)'), raw));
  }

  async function loadModel() {
    try {
      const reply = await read(await call(apiUrl('model'), { headers: { Accept: 'application/json' } }));
      if (reply.status !== 200 || !reply.body || typeof reply.body !== 'object') throw new Error(errorMessage(reply));
      showModel(reply.body);
    } catch (error) {
      modelBody.replaceChildren(el('p', { class: 'error', 'data-testid': 'model-error' },
        `The model card is unavailable: ${error && error.message ? error.message : 'no answer'}`));
      servedModel.textContent = 'unknown (the model card did not load)';
    }
  }

  loadModel();
})();
