"""`v3flow`: the one entry point.

    v3flow run CONFIG [--stages data,pretrain] [--set key=value ...] [--force]
    v3flow validate CONFIG [--set key=value ...]
    v3flow params CONFIG    parameter counts (total, activated, MTP) and KV-cache bytes per token
    v3flow report RUN_ID    rebuild the report card of a pipeline run (its MLflow parent run)
    v3flow serve            serve the deployments (start runs from the Prefect UI)
    v3flow up | down | status   the local Prefect and MLflow servers

`run` validates the config before anything starts, then uses PREFECT_API_URL / MLFLOW_TRACKING_URI when
set, the local servers when they are up, and starts them otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from v3flow.errors import V3flowError


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v3flow", description="The DeepSeek-V3 recipe as a Prefect + MLflow pipeline.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (or chosen stages) as a Prefect flow run")
    validate = sub.add_parser("validate", help="only validate a config")
    for sp in (run, validate):
        sp.add_argument("config", help="pipeline config YAML, e.g. configs/tiny.yaml")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set data.minhash.bands=20")
    run.add_argument("--stages", type=_csv, default=[], help="comma-separated stages (default: all)")
    run.add_argument("--force", action="store_true",
                     help="rerun the chosen stages (all, without --stages) even when cached; the stages they need "
                          "are reused when unchanged")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--dry-run", action="store_true",
                     help="run nothing: print each stage's key, whether it is cached, and for a miss what changed")
    params = sub.add_parser("params", help="parameter counts and KV-cache size of a config's model (no weights)")
    params.add_argument("config")
    params.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    report = sub.add_parser("report", help="rebuild the report card of a pipeline run from MLflow (and log it there)")
    report.add_argument("run_id", help="the MLflow parent run of the pipeline run")
    report.add_argument("--out", default=".", help="folder for report_card.html / .md (default: here)")
    sub.add_parser("serve", help="serve the deployments to the Prefect server")
    sub.add_parser("up", help="start the local Prefect and MLflow servers")
    sub.add_parser("down", help="stop the local servers")
    sub.add_parser("status", help="show the local servers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except V3flowError as err:
        print(f"v3flow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_validate(args) -> int:
    from flows.config import load_config
    from v3flow.section import section_hash

    cfg = load_config(args.config, args.overrides)
    print(f"{args.config}: valid (config '{cfg.name}', hash {section_hash(cfg)}, data hash {section_hash(cfg.data)})")
    return 0


def cmd_run(args) -> int:
    from flows.config import load_config
    from v3flow import servers

    cfg = load_config(args.config, args.overrides)  # reject a bad config before starting anything
    if args.dry_run:
        return _dry_run(cfg, args)
    urls = servers.ensure_for_run(cfg.tracking.tracking_uri)
    os.environ.setdefault("V3FLOW_PROJECT", cfg.project_root or str(Path.cwd()))
    from flows.pipeline import RunRequest, pipeline
    from flows.recipe import plan, wiring

    plan(args.stages, wiring(cfg))  # unknown stages or inputs are an error before the flow run starts
    request = RunRequest(config=str(Path(args.config).resolve()), overrides=args.overrides,
                         stages=args.stages, force=args.force)
    result = pipeline(request)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, r in result.items():
        how = "reused (cached)" if r["cached"] else "ran"
        print(f"  {name:14s} {how:16s} key {r['key']}  -> {r['out_dir']}")
    from v3flow import tracking

    print(f"Prefect UI: {urls['prefect']}\nMLflow UI:  {tracking.experiment_url(urls['mlflow'], cfg.tracking.experiment)}"
          f"  (experiment '{cfg.tracking.experiment}')")
    return 0


def _dry_run(cfg, args) -> int:
    from flows.executor import dry_run
    from flows.recipe import plan, wiring

    wires = wiring(cfg)
    rows = dry_run(plan(args.stages, wires), wires, cfg)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        forced = args.force and (r["stage"] in args.stages or not args.stages)
        what = "forced" if forced else "cached" if r["cached"] else "would run"
        print(f"  {r['stage']:14s} {what:10s} key {r['key']}  -> {r['out_dir']}")
        if not r["cached"] and not forced:
            if r["last_run"] is None:
                print("                 never ran with this workdir")
            for change in r["changes"] or (["(only an upstream stage changed)"] if r["last_run"] else []):
                print(f"                 {change}  [since {Path(r['last_run']).name}]")
    return 0


def cmd_params(args) -> int:
    from flows.config import load_config
    from v3flow.model.params import report

    cfg = load_config(args.config, args.overrides, require_set=False)  # reads the model only
    print(f"{cfg.name}:\n{report(cfg.model)}")
    return 0


def cmd_report(args) -> int:
    from flows.bookkeeping import card_layout
    from flows.recipe import wiring
    from v3flow import report_card, servers, tracking

    uri = servers.ensure_for_run()["mlflow"]
    out = Path(args.out)
    card = report_card.publish(uri, args.run_id, out, card_layout(wiring()))
    print(f"{card.title}\n  {out / 'report_card.html'}\n  {out / 'report_card.md'}\n  on {tracking.run_url(uri, args.run_id)}")
    return 0


def cmd_serve(args) -> int:
    from v3flow import servers

    servers.ensure_for_run()
    os.environ.setdefault("V3FLOW_PROJECT", str(Path.cwd()))
    from flows.serve import serve_deployments

    serve_deployments()
    return 0


def cmd_up(args) -> int:
    from v3flow import servers

    urls = servers.up()
    print(f"Prefect UI: {urls['prefect']}\nMLflow UI:  {urls['mlflow']}\nstate: {servers.home()}")
    return 0


def cmd_down(args) -> int:
    from v3flow import servers

    stopped = servers.down()
    print(f"stopped: {', '.join(stopped) or 'nothing (no servers started from ' + str(servers.home()) + ')'}")
    return 0


def cmd_status(args) -> int:
    from v3flow import servers

    for s in (servers.PREFECT, servers.MLFLOW):
        state = ("up" if servers.ours(s) else f"up, but not started from {servers.home()}") if s.healthy() else "down"
        print(f"{s.name:8s} {s.url:28s} {state}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "params": cmd_params, "report": cmd_report, "serve": cmd_serve,
            "up": cmd_up, "down": cmd_down, "status": cmd_status}

if __name__ == "__main__":
    sys.exit(main())
