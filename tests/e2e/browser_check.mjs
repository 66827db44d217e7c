// make e2e: the product used from both UIs in headless Chromium (Debian's), as a user would.
//   1. Prefect: open stage/pretrain, Run -> Custom run, pick the micro config in the form, submit
//   2. watch the flow run until the UI shows it Completed; its completion triggers extend/yarn-two-phases
//   3. open its report card artifact and follow its link to the MLflow parent run
//   4. MLflow: find the registered model's pretrain version by its alias
//   5. Prefect: switch on the nightly data refresh and see its next run in the Upcoming tab
//   6. Prefect: cancel a running pretraining run from its page; no trainer process and no RUNNING MLflow run stay
// Screenshots go to $OUT_DIR (default: the current folder); any failure leaves failure.png.
//   node browser_check.mjs http://127.0.0.1:4210 http://127.0.0.1:5010
import { execSync } from "node:child_process";
import { chromium } from "playwright-core";

const [prefect, mlflow] = process.argv.slice(2);
const out = process.env.OUT_DIR || ".";
const api = (path, body) => fetch(`${prefect}/api${path}`, body === undefined ? {} : {
  method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })
  .then((r) => (r.ok ? r.json() : null));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const step = (text) => console.log(`e2e: ${text}`);

async function deployment(flow, name) {
  for (let i = 0; i < 180; i++) {
    const found = await api(`/deployments/name/${flow}/${name}`);
    if (found) return found;
    await sleep(1000);
  }
  throw new Error(`deployment ${flow}/${name} never appeared`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
let shot = 0;
const screenshot = (name) => page.screenshot({ path: `${out}/${String(++shot).padStart(2, "0")}-${name}.png` });
try {
  // 1. trigger a stage from its form
  const pretrain = await deployment("stage", "pretrain");
  await page.goto(`${prefect}/deployments/deployment/${pretrain.id}`);
  await page.getByRole("button", { name: "Run", exact: true }).click();
  await page.getByText("Custom run").click();
  // the config field is a dropdown of the shipped configs (Prefect's select opens from the keyboard here)
  const configs = page.locator('button.p-select-button__control:has-text("configs/tiny.yaml")');
  await configs.click();
  await page.keyboard.press("ArrowDown");
  await page.getByRole("option", { name: "configs/micro.yaml", exact: true }).click();
  await screenshot("custom-run-form");
  await page.getByRole("button", { name: "Submit" }).click();
  let run = null;
  for (let i = 0; i < 60 && !run; i++) {
    [run] = await api("/flow_runs/filter", { deployments: { id: { any_: [pretrain.id] } },
      sort: "EXPECTED_START_TIME_DESC", limit: 1 });
    if (!run) await sleep(1000);
  }
  if (!run) throw new Error("submitting the form created no flow run");
  if (run.parameters.request.config !== "configs/micro.yaml") {
    throw new Error(`the run got config ${run.parameters.request.config}, not the one picked in the form`);
  }
  step(`flow run ${run.name} of stage/pretrain created from the form (config ${run.parameters.request.config})`);

  // 2. watch it complete
  await page.goto(`${prefect}/runs/flow-run/${run.id}`);
  const deadline = Date.now() + 900000;
  for (;;) {
    const state = (await api(`/flow_runs/${run.id}`)).state.type;
    if (["FAILED", "CRASHED", "CANCELLED"].includes(state)) throw new Error(`flow run ended ${state}`);
    if (state === "COMPLETED") break;
    if (Date.now() > deadline) throw new Error("flow run did not finish in 15 minutes");
    await sleep(3000);
  }
  await page.reload();
  await page.getByText("Completed").first().waitFor({ timeout: 30000 });
  await screenshot("flow-run-completed");
  step("the UI shows it Completed");

  // the shipped trigger: pretraining completed, so context extension starts with the same config
  const extend = await deployment("extend", "yarn-two-phases");
  let chained = null;
  for (let i = 0; i < 120 && !chained; i++) {
    [chained] = await api("/flow_runs/filter", { deployments: { id: { any_: [extend.id] } },
      sort: "EXPECTED_START_TIME_DESC", limit: 1 });
    if (!chained) await sleep(1000);
  }
  if (!chained) throw new Error("pretraining completed but the trigger started no extension run in 2 minutes");
  const request = chained.parameters.request;
  if (request.config !== "configs/micro.yaml" || request.overrides.length || request.force) {
    throw new Error(`the triggered extension run got ${JSON.stringify(request)}`);
  }
  for (let i = 0; ; i++) {
    const state = (await api(`/flow_runs/${chained.id}`)).state.type;
    if (["FAILED", "CRASHED", "CANCELLED"].includes(state)) throw new Error(`the triggered extension run ended ${state}`);
    if (state === "COMPLETED") break;
    if (i === 300) throw new Error("the triggered extension run did not finish in 10 minutes");
    await sleep(2000);
  }
  await page.goto(`${prefect}/runs/flow-run/${chained.id}`);
  await page.getByText("Completed").first().waitFor({ timeout: 30000 });
  await screenshot("triggered-extension-completed");
  step(`the trigger started extension run ${chained.name} with the same config; it completed`);
  await page.goto(`${prefect}/runs/flow-run/${run.id}`);

  // 3. its report card artifact, and the link to MLflow
  await page.getByText("Artifacts", { exact: true }).first().click();
  await page.getByText("report-card").first().click();
  const link = page.getByRole("link", { name: "MLflow parent run" }).first();
  await link.waitFor({ timeout: 30000 });
  await screenshot("report-card-artifact");
  const href = await link.getAttribute("href");
  if (!href.startsWith(mlflow) || !href.includes("workflowType=machine_learning")) {
    throw new Error(`the report card links to ${href}`);
  }
  await page.goto(href);
  await page.getByText("Parameters").first().waitFor({ timeout: 60000 });
  await page.getByText("micro ").first().waitFor({ timeout: 30000 });  // the parent run, named config + flow run
  await sleep(1500);
  await screenshot("mlflow-parent-run");
  step("its report card links to the MLflow parent run, which opens in the classic view");

  // 4. the registered model version by its alias
  const experiment = (await fetch(`${mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=v3flow-micro`)
    .then((r) => r.json())).experiment.experiment_id;
  await page.goto(`${mlflow}/#/models/v3flow-micro`);
  await page.getByText("@ pretrain").or(page.getByText("pretrain", { exact: true })).first()
    .waitFor({ timeout: 60000 });
  await sleep(1000);
  await screenshot("mlflow-registered-model");
  step("MLflow's registry shows v3flow-micro with its pretrain alias");

  // 5. switch on a schedule in the UI, see its next run in Upcoming
  const data = await deployment("stage", "data");
  await page.goto(`${prefect}/deployments/deployment/${data.id}`);
  const nightly = page.getByText("nightly-data-refresh", { exact: true }).first();
  await nightly.waitFor({ timeout: 30000 });
  await screenshot("schedule-paused");
  await nightly.locator("xpath=..").getByRole("switch").click();
  for (let i = 0; i < 60; i++) {
    const runs = await api("/flow_runs/filter", { deployments: { id: { any_: [data.id] } },
      flow_runs: { state: { type: { any_: ["SCHEDULED"] } } }, limit: 1 });
    if (runs && runs.length) break;
    if (i === 59) throw new Error("switching the schedule on made no scheduled run in 60 s");
    await sleep(1000);
  }
  await page.reload();
  await page.getByText("Upcoming", { exact: true }).first().click();
  await page.getByText("Scheduled").first().waitFor({ timeout: 30000 });
  await screenshot("upcoming-scheduled-run");
  step("the nightly data refresh, switched on in the UI, shows its next run in Upcoming");

  // 6. cancel a running pretraining from the UI
  const trainers = () => execSync("pgrep -f 'v3flow[.]training[.]loop' || true").toString().trim();
  const params = { request: { stage: "pretrain", config: "configs/micro.yaml", overrides: [], force: true } };
  const doomed = await api(`/deployments/${pretrain.id}/create_flow_run`, { parameters: params });
  for (let i = 0; !trainers(); i++) {
    if (i === 300) throw new Error("the forced pretraining run started no trainer in 5 minutes");
    await sleep(1000);
  }
  await page.goto(`${prefect}/runs/flow-run/${doomed.id}`);
  await page.getByRole("button", { name: "Cancel", exact: true }).first().click();
  await screenshot("cancel-confirm");
  await page.getByRole("dialog").getByRole("button", { name: /Cancel|Confirm/ }).last().click();
  for (let i = 0; ; i++) {
    const state = (await api(`/flow_runs/${doomed.id}`)).state.type;
    if (state === "CANCELLED") break;
    if (i === 120) throw new Error(`the cancelled run is still ${state} after 2 minutes`);
    await sleep(1000);
  }
  for (let i = 0; trainers(); i++) {
    if (i === 30) throw new Error(`trainer processes left after the cancel: ${trainers()}`);
    await sleep(1000);
  }
  await page.reload();
  await page.getByText("Cancelled").first().waitFor({ timeout: 30000 });
  await screenshot("run-cancelled");
  const search = (filter) => fetch(`${mlflow}/api/2.0/mlflow/runs/search`, { method: "POST",
    headers: { "content-type": "application/json" }, body: JSON.stringify({ experiment_ids: [experiment], filter })
  }).then((r) => r.json()).then((r) => r.runs || []);
  const [killed] = await search(`tags.\`prefect.flow_run_id\` = '${doomed.id}'`);
  const stages = await search(`tags.\`mlflow.parentRunId\` = '${killed.info.run_id}'`);
  const statuses = [killed, ...stages].map((r) => r.info.status);
  if (killed.info.status !== "KILLED" || statuses.includes("RUNNING")) {
    throw new Error(`MLflow runs of the cancelled flow run: ${statuses.join(", ")}`);
  }
  step(`cancelled from the UI: no trainer left, MLflow runs ${statuses.join(", ")}`);
} catch (err) {
  await page.screenshot({ path: `${out}/failure.png` }).catch(() => {});
  throw err;
} finally {
  await browser.close();
}
