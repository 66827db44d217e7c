// A look at both UIs after pipeline runs, as a user would: Prefect's flow run page with its stage task runs,
// then MLflow's experiment with the parent run, its per-stage child runs and their metrics, and MLflow's compare
// view of the two newest pipeline runs (their stage metrics side by side). Fails when a stage named on the
// command line is missing from either UI. Screenshots go to $OUT_DIR.
//   node ui_check.mjs http://127.0.0.1:4200 http://127.0.0.1:5000 v3flow-tiny sft grpo task_eval
import { chromium } from "playwright-core";

const [prefect, mlflow, experiment, ...stages] = process.argv.slice(2);
const out = process.env.OUT_DIR || ".";
const post = (url, body) => fetch(url, { method: "POST", headers: { "content-type": "application/json" },
  body: JSON.stringify(body) }).then((r) => r.json());

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
try {
  const [run] = await post(`${prefect}/api/flow_runs/filter`, { sort: "START_TIME_DESC", limit: 1 });
  await page.goto(`${prefect}/runs/flow-run/${run.id}`);
  await page.getByText("Completed").first().waitFor({ timeout: 60000 });
  await page.screenshot({ path: `${out}/prefect-flow-run.png` });
  await page.getByText("Task Runs", { exact: true }).first().click();
  for (const stage of stages) await page.getByText(stage, { exact: false }).first().waitFor({ timeout: 60000 });
  await page.screenshot({ path: `${out}/prefect-task-runs.png`, fullPage: true });
  console.log(`prefect: flow run ${run.name} (${run.state_type}) shows ${stages.join(", ")}`);

  const { experiment: exp } = await fetch(
    `${mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=${experiment}`).then((r) => r.json());
  const { runs } = await post(`${mlflow}/api/2.0/mlflow/runs/search`,
    { experiment_ids: [exp.experiment_id], order_by: ["attributes.start_time DESC"], max_results: 50 });
  // the newest pipeline run and its per-stage child runs, each opened on its own page
  const parent = runs.find((r) => !(r.data.tags || []).some((t) => t.key === "mlflow.parentRunId"));
  const children = runs.filter((r) => (r.data.tags || []).some((t) => t.key === "mlflow.parentRunId" &&
    t.value === parent.info.run_id));
  for (const stage of stages) {
    const child = children.find((r) => r.info.run_name === stage);
    if (!child) throw new Error(`MLflow run ${parent.info.run_name} has no child run for stage ${stage}`);
    await page.goto(`${mlflow}/#/experiments/${exp.experiment_id}/runs/${child.info.run_id}`);
    await page.getByText(stage, { exact: true }).first().waitFor({ timeout: 60000 });
    await page.waitForTimeout(1500);
    await page.screenshot({ path: `${out}/mlflow-${stage}.png`, fullPage: true });
    console.log(`mlflow: ${parent.info.run_name} / ${stage}: ${(child.data.metrics || []).length} metrics, ` +
      `${(child.data.params || []).length} params`);
  }
  const parents = runs.filter((r) => !(r.data.tags || []).some((t) => t.key === "mlflow.parentRunId")).slice(0, 2);
  if (parents.length === 2) {
    const ids = JSON.stringify(parents.map((r) => r.info.run_id));
    await page.goto(`${mlflow}/#/compare-runs?runs=${ids}&experiments=${JSON.stringify([exp.experiment_id])}` +
      "&workflowType=machine_learning");
    for (const r of parents) await page.getByText(r.info.run_name).first().waitFor({ timeout: 60000 });
    await page.getByText("Show diff only").first().waitFor({ timeout: 60000 });
    for (const toggle of await page.getByRole("switch").all()) await toggle.click();  // params and metrics: diff only
    const metric = page.getByText(`${stages[stages.length - 1]}.`, { exact: false }).first();  // a stage's headline
    await metric.waitFor({ timeout: 60000 });
    const assistant = page.getByText("MLflow Assistant");  // MLflow 3.17 opens its chat panel beside the table
    if (await assistant.count()) {
      await assistant.locator("xpath=ancestor::*[.//button][1]").getByRole("button").last().click();
    }
    await page.getByText("Parameters", { exact: true }).last().scrollIntoViewIfNeeded();
    await page.waitForTimeout(1500);
    await page.screenshot({ path: `${out}/mlflow-compare.png` });
    console.log(`mlflow: compared ${parents.map((r) => r.info.run_name).join(" and ")}`);
  }
} catch (err) {
  await page.screenshot({ path: `${out}/ui-check-failure.png` }).catch(() => {});
  throw err;
} finally {
  await browser.close();
}
