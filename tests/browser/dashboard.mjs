// Drives kiln's dashboard in headless Chromium, as a person would: sign in, find the running
// job, watch its loss curve grow without a reload, cancel it, look at a finished job's
// confusion matrix, the files and the models pages, and try models (classify text and
// images, chat). Takes screenshots and
// checks that they show something. tests/dashboard.rs starts kiln and the jobs, then runs
// this script with:
//
//   KILN_URL          the server, e.g. http://127.0.0.1:41234
//   KILN_KEY          an API key of the project
//   KILN_RUNNING_JOB  a job that is training now (long enough to watch, then cancelled here)
//   KILN_DONE_JOB     a job of the same project that succeeded (classifier, with evaluations)
//   KILN_BROKEN_FILE  a file that failed validation
//   KILN_IMAGE_MODEL  a base image classifier (a tiny ResNet with labels) in the models dir
//   SCREENSHOT_DIR    where the PNGs go
//   CHROMIUM          the browser (default /usr/bin/chromium)
//
// Exits 0 when every check passed; otherwise prints what failed and exits 1.

import { mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { deflateSync, inflateSync } from 'node:zlib';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === '') throw new Error(`${name} is not set`);
  return value;
};
const BASE = env('KILN_URL').replace(/\/$/, '');
const KEY = env('KILN_KEY');
const RUNNING = env('KILN_RUNNING_JOB');
const DONE = env('KILN_DONE_JOB');
const BROKEN_FILE = env('KILN_BROKEN_FILE');
const IMAGE_MODEL = env('KILN_IMAGE_MODEL');
const SHOTS = env('SCREENSHOT_DIR');
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const ORIGIN = new URL(BASE).origin;
const WIDTH = 1440;
const HEIGHT = 900;

mkdirSync(SHOTS, { recursive: true });
const started = Date.now();
const log = (msg) => console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${msg}`);
function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

// ---- PNG: enough of a decoder to look at the pixels of Chromium's screenshots.

function decodePng(path) {
  const buf = readFileSync(path);
  check(buf.subarray(0, 8).equals(Buffer.from([137, 80, 78, 71, 13, 10, 26, 10])), `${path} is a PNG`);
  let pos = 8;
  let width = 0; let height = 0; let depth = 0; let colorType = 0; let interlace = 0;
  const idat = [];
  while (pos < buf.length) {
    const len = buf.readUInt32BE(pos);
    const type = buf.toString('ascii', pos + 4, pos + 8);
    const data = buf.subarray(pos + 8, pos + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0); height = data.readUInt32BE(4);
      depth = data[8]; colorType = data[9]; interlace = data[12];
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
    pos += 12 + len;
  }
  const channels = { 2: 3, 6: 4, 0: 1, 4: 2 }[colorType];
  check(depth === 8 && channels && interlace === 0, `${path}: 8-bit, non-interlaced (depth ${depth}, colour type ${colorType})`);
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const pixels = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const out = pixels.subarray(y * stride, (y + 1) * stride);
    const prev = y ? pixels.subarray((y - 1) * stride, y * stride) : Buffer.alloc(stride);
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? out[i - channels] : 0;
      const b = prev[i];
      const c = i >= channels ? prev[i - channels] : 0;
      let v = line[i];
      if (filter === 1) v += a;
      else if (filter === 2) v += b;
      else if (filter === 3) v += (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c; const pa = Math.abs(p - a); const pb = Math.abs(p - b); const pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      out[i] = v & 255;
    }
  }
  return { width, height, channels, pixels, bytes: buf.length };
}

// ...and of an encoder, for the images the page is given to classify: 8-bit RGB, one colour
// with a lighter square in the middle.
function crc32(buf) {
  let c = ~0;
  for (const byte of buf) {
    c ^= byte;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return ~c >>> 0;
}

function encodePng(width, height, [r, g, b]) {
  const raw = Buffer.alloc((width * 3 + 1) * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const inner = Math.abs(x - width / 2) < width / 4 && Math.abs(y - height / 2) < height / 4;
      const at = y * (width * 3 + 1) + 1 + x * 3;
      raw[at] = inner ? (r + 255) >> 1 : r;
      raw[at + 1] = inner ? (g + 255) >> 1 : g;
      raw[at + 2] = inner ? (b + 255) >> 1 : b;
    }
  }
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0); ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; ihdr[9] = 2; // 8-bit RGB
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

// A screenshot worth keeping: the expected width, a real size on disk, many colours, and no
// single colour covering nearly everything (a blank or error page fails this).
function checkScreenshot(path, expectWidth) {
  const png = decodePng(path);
  check(png.width === expectWidth, `${path}: ${png.width} px wide, expected ${expectWidth}`);
  check(png.height >= 500, `${path}: ${png.height} px high`);
  check(png.bytes > 12_000, `${path}: only ${png.bytes} bytes`);
  const counts = new Map();
  const { pixels, channels } = png;
  for (let i = 0; i < pixels.length; i += channels * 7) {
    const rgb = (pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2];
    counts.set(rgb, (counts.get(rgb) || 0) + 1);
  }
  const total = [...counts.values()].reduce((a, b) => a + b, 0);
  const dominant = Math.max(...counts.values()) / total;
  check(counts.size > 40, `${path}: only ${counts.size} colours`);
  check(dominant < 0.9, `${path}: one colour covers ${(dominant * 100).toFixed(1)}% of it`);
  log(`  ${path}: ${png.width}x${png.height}, ${(png.bytes / 1024).toFixed(0)} KB, ${counts.size} colours, largest share ${(dominant * 100).toFixed(0)}%`);
  return png;
}

function differ(a, b) {
  if (a.width !== b.width || a.height !== b.height) return true;
  let changed = 0;
  for (let i = 0; i < a.pixels.length; i += 4) if (a.pixels[i] !== b.pixels[i]) changed += 1;
  return changed > 50;
}

// ---- the session

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : [],
});
const context = await browser.newContext({ viewport: { width: WIDTH, height: HEIGHT }, deviceScaleFactor: 1, colorScheme: 'light' });
const page = await context.newPage();
page.setDefaultTimeout(30_000);

const requests = [];
const consoleErrors = [];
const pageErrors = [];
let loads = 0;
page.on('request', (r) => requests.push(r.url()));
page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
page.on('pageerror', (e) => pageErrors.push(String(e)));
page.on('load', () => { loads += 1; });

async function shot(name, opts = {}) {
  const path = join(SHOTS, name);
  await page.screenshot({ path, fullPage: opts.fullPage ?? true });
  return checkScreenshot(path, opts.width ?? WIDTH);
}

async function lossPoints() {
  return page.evaluate(() => {
    const el = document.querySelector('#loss-chart [data-series="train_loss"]');
    return el ? Number(el.dataset.points) : 0;
  });
}

let failed = false;
try {
  log(`loading ${BASE}/`);
  const response = await page.goto(`${BASE}/`);
  check(response.status() === 200, `GET / answered ${response.status()}`);
  check((response.headers()['content-security-policy'] || '').includes("default-src 'none'"), 'the page has a strict CSP');
  await page.waitForSelector('#api-key');
  await page.waitForTimeout(300);
  await shot('01-sign-in.png', { fullPage: false });

  log('a wrong key is refused with the server\'s message');
  await page.fill('#api-key', 'sk-kiln-not-a-real-key');
  await page.click('button[type=submit]');
  await page.waitForSelector('.signin .error:not(:empty)');
  const refused = await page.textContent('.signin .error');
  check(/incorrect api key/i.test(refused), `sign-in error shows the server's message: ${refused}`);

  log('signing in');
  await page.fill('#api-key', KEY);
  await page.click('button[type=submit]');
  await page.waitForSelector(`#jobs-table tr[data-job="${RUNNING}"]`);
  await page.waitForSelector(`#jobs-table tr[data-job="${DONE}"] .badge[data-status="succeeded"]`);
  check(await page.evaluate(() => sessionStorage.getItem('kiln.apiKey')) === KEY, 'the key is kept in sessionStorage');
  check(await page.evaluate(() => localStorage.length) === 0, 'nothing goes to localStorage');
  // The running job's row fills its progress bar as it trains.
  await page.waitForFunction((id) => {
    const row = document.querySelector(`#jobs-table tr[data-job="${id}"]`);
    return row && row.querySelector('.badge[data-status="running"]') && /\d+ \/ \d+/.test(row.textContent);
  }, RUNNING, { timeout: 60_000 });
  await shot('02-jobs.png');
  await page.setViewportSize({ width: 1366, height: 768 });
  await page.waitForTimeout(200);
  await shot('02-jobs-1366x768.png', { fullPage: false, width: 1366 });
  await page.setViewportSize({ width: WIDTH, height: HEIGHT });

  log('filtering by status');
  await page.click('.chip[data-filter="succeeded"]');
  check(await page.isVisible(`#jobs-table tr[data-job="${DONE}"]`), 'the succeeded job is listed under succeeded');
  check(!(await page.isVisible(`#jobs-table tr[data-job="${RUNNING}"]`)), 'the running job is filtered out');
  check(page.url().endsWith('#/jobs?status=succeeded'), `the filter is in the URL: ${page.url()}`);
  await page.click('.chip[data-filter="all"]');

  log('opening the running job');
  await page.click(`#jobs-table tr[data-job="${RUNNING}"] a`);
  await page.waitForSelector('#loss-chart');
  check(page.url().endsWith(`#/jobs/${RUNNING}`), `hash route: ${page.url()}`);
  // A value only this document has: gone if the page were reloaded.
  await page.evaluate(() => { window.__kilnTestMarker = 'same document'; });
  const loadsBefore = loads;
  await page.waitForFunction(() => {
    const el = document.querySelector('#loss-chart [data-series="train_loss"]');
    return el && Number(el.dataset.points) >= 20;
  }, null, { timeout: 60_000 });
  const first = await lossPoints();
  log(`  the loss curve has ${first} points`);
  await page.waitForSelector('#events-log .event');
  await page.waitForSelector('#stat-progress .bar');
  const shotA = await shot('03-job-running-early.png');
  await page.waitForFunction((n) => {
    const el = document.querySelector('#loss-chart [data-series="train_loss"]');
    return el && Number(el.dataset.points) >= n + 60;
  }, first, { timeout: 90_000 });
  const later = await lossPoints();
  log(`  ... and grows to ${later} points without a reload`);
  check(await page.evaluate(() => window.__kilnTestMarker) === 'same document', 'no reload or navigation happened');
  check(loads === loadsBefore, `no load event while watching (${loads - loadsBefore})`);
  // Validation curves and the confusion matrix come with the evaluations.
  await page.waitForSelector('#metrics-chart [data-series="valid_accuracy"]', { state: 'attached', timeout: 90_000 });
  await page.waitForSelector('#confusion-matrix td.cell');
  await page.waitForSelector('#checkpoints-table tbody tr', { timeout: 60_000 });
  const shotB = await shot('04-job-running.png');
  check(differ(shotA, shotB), 'the job page changed while the job trained');

  log('cancelling it');
  await page.click('#cancel-job');
  await page.waitForSelector('.dialog');
  await shot('05-cancel-dialog.png', { fullPage: false });
  await page.click('.dialog .btn.danger');
  await page.waitForSelector('.toast');
  await page.waitForSelector('#job-status .badge[data-status="cancelled"]', { timeout: 30_000 });
  check(!(await page.isVisible('#cancel-job')), 'no cancel button on a cancelled job');
  check(await page.evaluate(() => window.__kilnTestMarker) === 'same document', 'still no reload');
  for (const close of await page.$$('.toast button')) await close.click();
  await page.waitForTimeout(300);
  await shot('06-job-cancelled.png');

  log('a finished classifier: curves, checkpoints, confusion matrix');
  await page.click('.crumbs a');
  await page.click(`#jobs-table tr[data-job="${DONE}"] a`);
  await page.waitForSelector('#confusion-matrix td.cell');
  await page.waitForSelector('#metrics-chart [data-series="valid_accuracy"]', { state: 'attached' });
  await page.waitForSelector('#checkpoints-table tbody tr');
  const labels = await page.$$eval('#confusion-matrix thead tr:last-child th', (ths) => ths.slice(1).map((t) => t.textContent));
  check(labels.length === 2 && labels.includes('positive') && labels.includes('negative'), `matrix labels: ${labels}`);
  const cells = await page.$$eval('#confusion-matrix td.cell', (tds) => tds.map((t) => parseInt(t.textContent, 10)));
  check(cells.length === 4 && cells.reduce((a, b) => a + b, 0) > 0, `matrix counts: ${cells}`);
  await page.waitForTimeout(300);
  await shot('07-job-succeeded.png');

  log('files: validation results with line numbers');
  await page.click('.nav a[href="#/files"]');
  await page.waitForSelector(`#files-table tr[data-file="${BROKEN_FILE}"] .badge[data-status="error"]`);
  const problems = await page.textContent('#files-table .problems');
  check(/line \d+/.test(problems), `problems name their lines: ${problems}`);
  await shot('08-files.png');

  log('new job: a dry run shows the plan and queues nothing');
  const jobsBefore = await page.evaluate(async (key) => {
    const r = await fetch('/v1/fine_tuning/jobs?limit=100', { headers: { Authorization: `Bearer ${key}` } });
    return (await r.json()).data.length;
  }, KEY);
  await page.click('.nav a[href="#/jobs"]');
  await page.click('#new-job');
  await page.waitForSelector('#nj-model option', { state: 'attached' });
  await page.waitForSelector('#nj-train option', { state: 'attached' });
  await page.fill('#nj-epochs', '2');
  await page.selectOption('#nj-strategy', 'head_only');
  await page.click('#nj-estimate');
  await page.waitForSelector('#nj-estimate-result', { timeout: 60_000 });
  const planText = await page.textContent('#nj-plan');
  check(/training/.test(planText) && /Steps/.test(planText) && /n epochs\s*2/.test(planText), `the plan: ${planText}`);
  check(/strategy\s*head_only/.test(planText), `the plan keeps the strategy: ${planText}`);
  await shot('10-new-job-estimate.png');
  const jobsAfter = await page.evaluate(async (key) => {
    const r = await fetch('/v1/fine_tuning/jobs?limit=100', { headers: { Authorization: `Bearer ${key}` } });
    return (await r.json()).data.length;
  }, KEY);
  check(jobsAfter === jobsBefore, `a dry run queued nothing (${jobsBefore} -> ${jobsAfter})`);

  log('models: try the fine-tuned classifier');
  await page.click('.nav a[href="#/models"]');
  await page.waitForSelector('#models-table');
  const doneJob = await page.evaluate(async ([id, key]) => {
    const r = await fetch(`/v1/fine_tuning/jobs/${id}`, { headers: { Authorization: `Bearer ${key}` } });
    return r.json();
  }, [DONE, KEY]);
  await page.click(`#models-table tr[data-model="${doneJob.fine_tuned_model}"]`);
  await page.waitForSelector('#try-run');
  await page.click('#try-run');
  await page.waitForSelector('#try-results .result .scores', { timeout: 60_000 });
  const top = await page.$$eval('#try-results .result .best > span:first-child', (s) => s.map((e) => e.textContent));
  check(top.length === 2 && top.every((l) => ['positive', 'negative'].includes(l)), `classification labels: ${top}`);
  await shot('09-models.png');

  log('models: chat with a decoder');
  await page.click('#models-table tr[data-model="kiln-test/tiny-qwen2"]');
  await page.waitForSelector('#try-chat', { state: 'attached' });
  await page.fill('#try-input', 'Hello there');
  await page.click('#try-run');
  await page.waitForSelector('#try-chat .chat-assistant', { timeout: 60_000 });
  const turns = await page.$$eval('#try-chat .result', (rs) => rs.map((r) => r.className));
  check(turns.length === 2 && turns[0].includes('chat-user') && turns[1].includes('chat-assistant'), `chat turns: ${turns}`);
  const usage = await page.$eval('#try-chat .chat-assistant .muted.small:last-child', (e) => e.textContent);
  check(/\d+ tokens · (stop|length)/.test(usage), `chat usage line: ${usage}`);

  log('models: classify images with an image classifier');
  const imageModel = await page.evaluate(async ([id, key]) => {
    const r = await fetch(`/v1/models/${id}`, { headers: { Authorization: `Bearer ${key}` } });
    return r.json();
  }, [IMAGE_MODEL, KEY]);
  check(imageModel.task === 'image_classification' && imageModel.labels.length >= 2, `the image model: ${JSON.stringify(imageModel)}`);
  await page.click(`#models-table tr[data-model="${IMAGE_MODEL}"]`);
  await page.waitForSelector('#try-drop');
  check(await page.isDisabled('#try-run'), 'Classify waits for an image');
  const accept = await page.getAttribute('#try-files', 'accept');
  check(accept === 'image/png,image/jpeg,image/webp' && await page.getAttribute('#try-files', 'multiple') !== null, `the file input: accept=${accept}`);
  // One image through the file picker...
  await page.setInputFiles('#try-files', { name: 'orange-square.png', mimeType: 'image/png', buffer: encodePng(48, 48, [234, 88, 12]) });
  await page.waitForSelector('#try-thumbs .thumb');
  // ...and two dropped on the box: an image, and a text file it refuses with a toast.
  const blue = encodePng(64, 40, [37, 99, 235]).toString('base64');
  await page.evaluate((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], 'blue-landscape.png', { type: 'image/png' }));
    dt.items.add(new File(['not an image'], 'notes.txt', { type: 'text/plain' }));
    const zone = document.getElementById('try-drop');
    for (const type of ['dragenter', 'dragover', 'drop']) zone.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
  }, blue);
  await page.waitForSelector('.toast.error');
  check(/PNG, JPEG and WebP/.test(await page.textContent('.toast.error')), 'a dropped text file is refused with a toast');
  await page.waitForFunction(() => document.querySelectorAll('#try-thumbs .thumb').length === 2);
  const names = await page.$$eval('#try-thumbs figcaption', (fs) => fs.map((f) => f.textContent));
  check(names.join() === 'orange-square.png,blue-landscape.png', `thumbnails: ${names}`);
  // The previews are drawn (canvases: the CSP allows no data: or blob: images).
  const centre = await page.$$eval('#try-thumbs canvas', (cs) => cs.map((c) => [...c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data.slice(0, 3)]));
  check(centre.length === 2 && centre[0][0] > 200 && centre[1][2] > 200, `thumbnail pixels: ${JSON.stringify(centre)}`);
  await page.click('#try-run');
  await page.waitForSelector('#try-results .image-result .scores', { timeout: 60_000 });
  const imageResults = await page.$$eval('#try-results .image-result', (rs) => rs.map((r) => ({
    name: r.querySelector('.image-meta .text').textContent,
    top: r.querySelector('.top-label .top').textContent,
    best: r.querySelector('.scores .best > span:first-child').textContent,
    bars: r.querySelectorAll('.scores .bar').length,
  })));
  check(imageResults.length === 2, `one result per image: ${JSON.stringify(imageResults)}`);
  for (const [i, r] of imageResults.entries()) {
    check(r.name === names[i], `result ${i} names its file: ${r.name}`);
    check(imageModel.labels.includes(r.top) && r.best === r.top, `result ${i} has a label of the model: ${JSON.stringify(r)}`);
    check(r.bars === imageModel.labels.length, `result ${i} has a bar per label: ${r.bars}`);
  }
  log(`  ${imageResults.map((r) => `${r.name}: ${r.top}`).join(', ')}`);
  for (const close of await page.$$('.toast button')) await close.click();
  await page.waitForTimeout(300);
  await shot('11-models-image.png');
  await page.setViewportSize({ width: 1366, height: 768 });
  await page.waitForTimeout(200);
  await shot('11-models-image-1366x768.png', { fullPage: false, width: 1366 });
  await page.setViewportSize({ width: WIDTH, height: HEIGHT });

  log('a rejected key sends the user back to sign in');
  await page.evaluate(() => sessionStorage.setItem('kiln.apiKey', 'sk-kiln-revoked'));
  await page.click('.nav a[href="#/jobs"]');
  await page.reload();
  await page.waitForSelector('#api-key');
  check(/rejected/i.test(await page.textContent('.signin .error')), 'the sign-in screen says why');

  const foreign = requests.filter((u) => new URL(u).origin !== ORIGIN);
  check(foreign.length === 0, `requests to other origins: ${foreign.join(', ')}`);
  log(`  ${requests.length} requests, all to ${ORIGIN}`);
  check(pageErrors.length === 0, `uncaught errors in the page: ${pageErrors.join(' | ')}`);
  // The deliberately wrong keys above produce 401 responses, which Chromium logs.
  const unexpected = consoleErrors.filter((m) => !/status of 401/.test(m));
  check(unexpected.length === 0, `console errors: ${unexpected.join(' | ')}`);
  for (const name of ['01-sign-in.png', '04-job-running.png', '07-job-succeeded.png', '09-models.png', '11-models-image.png']) {
    check(statSync(join(SHOTS, name)).size > 0, `${name} written`);
  }
  log('all dashboard checks passed');
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e && e.stack ? e.stack : e}`);
  try {
    await page.screenshot({ path: join(SHOTS, 'failure.png'), fullPage: true });
    console.error(`page at ${page.url()}; screenshot: ${join(SHOTS, 'failure.png')}`);
    console.error(`page errors: ${pageErrors.join(' | ') || 'none'}; console errors: ${consoleErrors.join(' | ') || 'none'}`);
  } catch (_) { /* the browser may be gone */ }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
