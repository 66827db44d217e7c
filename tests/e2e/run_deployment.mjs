// Drives the Prefect UI like a user: open a deployment, Run -> Quick run, then watch the flow run page
// until it shows "Completed". Screenshots go to $OUT_DIR (default: the current folder).
//   node run_deployment.mjs http://127.0.0.1:4210 data v3flow
import { chromium } from "playwright-core";

const [base, flow, name] = process.argv.slice(2);
const out = process.env.OUT_DIR || ".";
const api = (path) => fetch(`${base}/api${path}`).then((r) => (r.ok ? r.json() : null));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let deployment = null;
for (let i = 0; i < 120 && !deployment; i++) {
  deployment = await api(`/deployments/name/${flow}/${name}`);
  if (!deployment) await sleep(1000);
}
if (!deployment) throw new Error(`deployment ${flow}/${name} never appeared`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
try {
  await page.goto(`${base}/deployments/deployment/${deployment.id}`);
  await page.getByRole("button", { name: "Run", exact: true }).click();
  await page.getByText("Quick run").click();
  await page.screenshot({ path: `${out}/1-deployment-run-clicked.png` });

  // the UI creates the run (its toast can lag the click): find it through the API and open its page
  let runs = [];
  for (let i = 0; i < 30 && !runs.length; i++) {
    runs = await fetch(`${base}/api/flow_runs/filter`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ deployments: { id: { any_: [deployment.id] } }, sort: "EXPECTED_START_TIME_DESC", limit: 1 }),
    }).then((r) => r.json());
    if (!runs.length) await sleep(1000);
  }
  if (!runs.length) throw new Error("clicking Quick run created no flow run in 30 s");
  await page.goto(`${base}/runs/flow-run/${runs[0].id}`);
  const deadline = Date.now() + 600000;
  for (;;) {
    const state = (await api(`/flow_runs/${runs[0].id}`)).state.type;
    if (["FAILED", "CRASHED", "CANCELLED"].includes(state)) throw new Error(`flow run ended ${state}`);
    if (state === "COMPLETED") break;
    if (Date.now() > deadline) throw new Error("flow run did not finish in 10 minutes");
    await sleep(2000);
  }
  await page.reload();
  await page.getByText("Completed").first().waitFor({ timeout: 30000 });
  await page.screenshot({ path: `${out}/2-flow-run-completed.png` });
  console.log(`e2e: flow run ${runs[0].name} of ${flow}/${name} started from the UI and shown Completed`);
} catch (err) {
  await page.screenshot({ path: `${out}/failure.png` }).catch(() => {});
  throw err;
} finally {
  await browser.close();
}
