// The saga explorer in a real browser: Debian's chromium, driven by
// playwright-core. Run by tests/e2e/explorer.rs, which starts the system,
// makes the orders named in the environment, and answers on stdin when this
// script asks for an order that is still running.
//
// EXPLORER_URL, BUSINESS_KEY, ADMIN_KEY, COMPENSATED_ORDER, ATTENTION_ORDER, BULK_ORDER,
// SCREENSHOTS (a directory), CHROMIUM (default /usr/bin/chromium).
//
// Exits 0 when every check holds; otherwise prints what failed and exits 1.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import assert from "node:assert/strict";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env("EXPLORER_URL");
const shots = env("SCREENSHOTS");
mkdirSync(shots, { recursive: true });
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

// Asks the test for a fresh order that is still running, and waits for its ID.
async function askForRunningOrder() {
  console.log("NEED_RUNNING_ORDER");
  const { value, done } = await lines.next();
  if (done) throw new Error("the test closed stdin before sending an order");
  return value.trim();
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // This machine has no network beyond loopback: keep chromium from calling home.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const problems = [];
page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
page.on("console", (message) => {
  if (message.type() === "error" && !/401|403/.test(message.text())) {
    problems.push(`console: ${message.text()} (${message.location().url})`);
  }
});

async function signIn(key) {
  if (await page.locator("#sign-out").isVisible()) await page.click("#sign-out");
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#login-key", key);
  await page.click("#login-form button[type=submit]");
}

const step = async (name, body) => {
  process.stderr.write(`- ${name}\n`);
  await body();
};

try {
  await step("without a key, the page asks for one and the API refuses", async () => {
    await page.goto(url);
    await page.waitForSelector("#login:not([hidden])");
    assert.ok(await page.locator("#list").isHidden(), "the order list shows without a key");
    const status = await page.evaluate(async () => (await fetch("/api/orders")).status);
    assert.equal(status, 401, "GET /api/orders without a key");
    await page.screenshot({ path: `${shots}/login.png` });
  });

  await step("a wrong key is refused, with the reason", async () => {
    await signIn("not-a-key-of-this-system");
    await page.waitForSelector("#login-error:has-text('does not match')");
    assert.ok(await page.locator("#list").isHidden());
  });

  await step("with the business key: counts, then from the list to the compensated order", async () => {
    await signIn(env("BUSINESS_KEY"));
    await page.waitForSelector("#list:not([hidden])");
    await page.waitForSelector("#counts button[data-status=COMPENSATED]");
    assert.equal(await page.textContent("#scope"), "read only");
    await page.click("#counts button[data-status=COMPENSATED]");
    // The unfiltered page shows the order too: wait for the filtered one.
    await page.waitForSelector("#orders-body[data-shown-status=COMPENSATED]");
    const link = page.locator(`#orders-body tr[data-order="${env("COMPENSATED_ORDER")}"] a`);
    await link.waitFor();
    await page.screenshot({ path: `${shots}/list.png` });
    for (const row of await page.locator("#orders-body tr").all()) {
      assert.equal(await row.getAttribute("data-status"), "COMPENSATED", "the status filter let another status through");
    }
    await link.click();
    await page.waitForSelector("#saga:not([hidden]) #timeline .step-row");
    assert.equal(await page.textContent("#saga-status"), "COMPENSATED");
  });

  await step("the timeline shows the compensations in reverse order, after the forward steps", async () => {
    const rows = await page.$$eval("#timeline .step-row", (rows) => rows.map((r) => ({
      step: r.dataset.step,
      phase: r.dataset.phase,
      status: r.dataset.status,
      left: parseFloat(r.querySelector(".bar")?.style.left ?? "NaN"),
    })));
    const forward = rows.filter((r) => r.phase === "forward");
    const undo = rows.filter((r) => r.phase === "compensation");
    assert.deepEqual(forward.map((r) => r.step), ["reserve_stock", "prepare_shipment", "charge_payment"]);
    assert.equal(forward[2].status, "failed", "the charge is the failed step");
    assert.deepEqual(undo.map((r) => r.step), ["prepare_shipment", "reserve_stock"], "compensations, in the order they ran");
    assert.ok(rows.indexOf(undo[0]) > rows.indexOf(forward[2]), "compensations come after the forward steps");
    assert.ok(undo[0].left >= forward[2].left && undo[1].left >= undo[0].left,
      `compensation bars do not start in order on the time axis: ${JSON.stringify(rows)}`);
    assert.ok(await page.locator("#timeline .pivot-pill").count() === 1, "the pivot is marked once");
    assert.ok(await page.locator("#timeline .marker.event").count() >= 2, "the saga's events are on the timeline");
    assert.match(await page.textContent("#history-body"), /order\.compensated/);
    await page.screenshot({ path: `${shots}/compensated.png`, fullPage: true });
  });

  await step("a running order updates without a reload", async () => {
    const orderId = await askForRunningOrder();
    await page.goto(`${url}#/orders/${orderId}`);
    await page.waitForSelector(`#saga:not([hidden]) #saga-id:has-text("${orderId}")`);
    await page.evaluate(() => { window.notReloaded = true; });
    const first = await page.textContent("#saga-status");
    assert.equal(first, "RUNNING", "the order was no longer running when the page opened");
    await page.waitForSelector("#saga-live.on");
    await page.screenshot({ path: `${shots}/running.png`, fullPage: true });
    await page.waitForSelector("#saga-status:has-text('COMPLETED')", { timeout: 30_000 });
    assert.equal(await page.evaluate(() => window.notReloaded), true, "the page reloaded");
    const done = await page.$$eval("#timeline .step-row", (rows) => rows.map((r) => `${r.dataset.step}:${r.dataset.status}`));
    assert.deepEqual(done, ["reserve_stock:succeeded", "prepare_shipment:succeeded", "charge_payment:succeeded"]);
  });

  await step("the business key sees the attention view but cannot act", async () => {
    await page.goto(`${url}#/attention`);
    const row = page.locator(`#attention-body tr[data-order="${env("ATTENTION_ORDER")}"]`);
    await row.waitFor();
    assert.match(await row.textContent(), /undo reserve_stock/);
    assert.ok(await row.locator("button[data-action=resolve]").isDisabled(), "resolve is open to the business key");
    assert.ok(await page.locator("#retry-all").isDisabled(), "retry all is open to the business key");
    const status = await page.evaluate(async (id) => (await fetch(`/api/orders/${id}/retry`, {
      method: "POST",
      headers: { "x-api-key": sessionStorage.getItem("saga-explorer-key"), "content-type": "application/json" },
      body: JSON.stringify({ request_id: "browser-business-retry" }),
    })).status, env("ATTENTION_ORDER"));
    assert.equal(status, 403, "an action with the business key");
    await page.screenshot({ path: `${shots}/attention.png`, fullPage: true });
  });

  await step("with the admin key, a stuck saga is resolved by hand and ends COMPENSATED", async () => {
    await signIn(env("ADMIN_KEY"));
    await page.waitForSelector("#scope:has-text('admin')");
    await page.goto(`${url}#/orders/${env("ATTENTION_ORDER")}`);
    await page.waitForSelector(`#saga:not([hidden]) #saga-id:has-text("${env("ATTENTION_ORDER")}")`);
    assert.equal(await page.textContent("#saga-status"), "NEEDS_ATTENTION");
    // The release failed again and again: each attempt is a bar of its own.
    const release = page.locator("#timeline .step-row[data-step=reserve_stock][data-phase=compensation]");
    const failed = await release.locator(".attempt.failed").count();
    assert.ok(failed >= 2, `the stuck release shows ${failed} failed attempt bars`);
    await page.screenshot({ path: `${shots}/attempts.png`, fullPage: true });
    await page.click("#actions button[data-action=resolve]");
    await page.fill("#resolve-operator", "ops@example.com");
    await page.fill("#resolve-reason", "released the units by hand in the warehouse system");
    await page.click("#resolve-submit");
    await page.waitForSelector("#saga-status:has-text('COMPENSATED')", { timeout: 30_000 });
    assert.match(await page.textContent("#history-body"), /resolved by hand by ops@example\.com/);
    await page.screenshot({ path: `${shots}/resolved.png`, fullPage: true });
  });

  await step("retry all: the other stuck saga is retried in bulk, with progress", async () => {
    page.once("dialog", (dialog) => {
      assert.match(dialog.message(), /1 saga/);
      dialog.accept();
    });
    await page.goto(`${url}#/attention`);
    // Only the other one is left: the first was resolved.
    await page.waitForSelector("#attention:not([hidden]) #retry-all:has-text('Retry all (1)')");
    await page.waitForSelector(`#attention-body tr[data-order="${env("BULK_ORDER")}"]`);
    await page.click("#retry-all");
    await page.waitForSelector("#bulk-progress:has-text('1 of 1: 1 retried, 0 skipped, 0 failed')");
    await page.waitForSelector("#attention-body:has-text('Nothing needs a person.')", { timeout: 30_000 });
    await page.screenshot({ path: `${shots}/bulk.png`, fullPage: true });
  });

  assert.deepEqual(problems, [], "the page logged errors");
  console.log("EXPLORER_OK");
} catch (error) {
  await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  console.log(`EXPLORER_FAILED ${error.stack || error}`);
  if (problems.length) console.log(problems.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
  process.stdin.destroy();
}
