// The page of `t2tvit serve`: plain JavaScript, no library and no CDN, so it works offline.
'use strict';

const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

async function describeModel() {
  const r = await fetch('/v1/model');
  const m = await r.json();
  $('model-line').textContent =
    `${m.model} (${m.weights}), ${m.num_classes} classes, ` +
    `input ${m.input_size[1]}x${m.input_size[2]}, ${m.precision} on ${m.device}`;
}

async function listSamples() {
  const r = await fetch('/v1/samples');
  for (const s of await r.json()) {
    const b = document.createElement('button');
    b.type = 'button';
    b.title = s.description;
    b.dataset.sample = s.name;
    const img = document.createElement('img');
    img.src = s.url;
    img.alt = s.description;
    b.appendChild(img);
    b.addEventListener('click', async () => {
      const blob = await (await fetch(s.url)).blob();
      classify(new File([blob], s.name + '.png', { type: 'image/png' }));
    });
    $('samples').appendChild(b);
  }
}

function showTopk(topk) {
  const list = $('topk');
  list.replaceChildren();
  const best = topk.length ? topk[0].prob : 1;
  for (const t of topk) {
    const li = document.createElement('li');
    li.className = 'bar-row';
    const label = document.createElement('span');
    label.className = 'bar-label';
    label.textContent = t.label;
    label.title = `${t.label} (class ${t.index})`;
    const bar = document.createElement('span');
    bar.className = 'bar';
    bar.style.width = `${Math.max(2, Math.round(220 * t.prob / Math.max(best, 1e-9)))}px`;
    const prob = document.createElement('span');
    prob.className = 'bar-prob';
    prob.textContent = `${(100 * t.prob).toFixed(1)}%`;
    li.append(label, bar, prob);
    list.appendChild(li);
  }
}

async function picture(file, view, img) {
  const form = new FormData();
  form.append('file', file);
  const r = await fetch(`/v1/explain?view=${view}`, { method: 'POST', body: form });
  if (!r.ok) {
    img.hidden = true;
    img.removeAttribute('src');
    img.alt = (await r.json()).error;
    return;
  }
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await r.blob());
  img.hidden = false;
}

async function classify(file) {
  const preview = $('preview');
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  setStatus(`classifying ${file.name}...`, false);
  $('topk').replaceChildren();
  const form = new FormData();
  form.append('file', file);
  const r = await fetch('/v1/predict?topk=5', { method: 'POST', body: form });
  const body = await r.json();
  if (!r.ok) {
    setStatus(`${r.status}: ${body.error}`, true);
    return;
  }
  showTopk(body.topk);
  setStatus(`${file.name}: ${body.ms.toFixed(1)} ms on the server`, false);
  await picture(file, 'rollout', $('overlay'));
  await picture(file, 'features', $('features'));
  document.body.dataset.done = file.name;
}

function wireDrop() {
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  $('file').addEventListener('change', (e) => {
    const file = e.target.files[0];
    e.target.value = '';  // choosing the same file again is a change too
    if (file) classify(file);
  });
}

wireDrop();
describeModel().catch((e) => setStatus(`cannot reach the server: ${e}`, true));
listSamples();
