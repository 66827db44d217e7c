"""The report card of a pipeline run: one page, as markdown and as self-contained HTML (figures inlined), built
only from what MLflow holds for the run's parent and its children, so `v3flow report RUN_ID` rebuilds it for any
past run.

It shows the stages (ran or reused, key, time, headline metrics), the training curves of every training stage,
each stage's own blocks (its spec's `report`: the data funnel from documents read to packed tokens, expert load
balance, long-context loss by position and the passkey grid, held-out accuracy by model, every model side by side)
and the wall time per stage. What a stage shows comes from the caller (`StageView`, from the stage specs); a
block whose stage did not run is left out. A reused stage's figures come from the run that produced it.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from v3flow import tracking


class StageView(NamedTuple):
    """What the card shows of a stage: the metric histories on the training curves, its blocks (BLOCKS), and its
    input roles in order (an evaluator's arms)."""

    curves: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


@dataclass
class Context:
    """What a block reads: the MLflow server, the stages in order, their child runs and the runs that produced
    their outputs (a reused stage's own run holds no figures), and the views."""

    uri: str
    order: list[str]
    children: dict
    producer: dict[str, str]
    views: dict[str, StageView]
    tmp: Path


FUNNEL_DOCS = ("docs_read", "docs_after_filters", "docs_after_exact_dedup", "docs_after_near_dedup")


@dataclass
class Card:
    title: str
    blocks: list[tuple[str, str, object]] = field(default_factory=list)  # (kind, heading, payload)

    def text(self, heading: str, body: str) -> None:
        self.blocks.append(("text", heading, body))

    def table(self, heading: str, header: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", heading, (header, rows)))

    def figure(self, heading: str, png: bytes, name: str) -> None:
        self.blocks.append(("figure", heading, (png, name)))

    def markdown(self, figures: bool = True) -> str:
        """The card in markdown; its figures are files under report_card/ (left out with figures=False)."""
        out = [f"# {self.title}", ""]
        for kind, heading, payload in self.blocks:
            out += [f"## {heading}", ""]
            if kind == "text":
                out += [payload, ""]
            elif kind == "table":
                header, rows = payload
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows] + [""]
            elif figures:
                out += [f"![{heading}](report_card/{payload[1]})", ""]
            else:
                out.pop(), out.pop()
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, heading, payload in self.blocks:
            body.append(f"<h2>{html.escape(heading)}</h2>")
            if kind == "text":
                body.append(f"<p>{html.escape(payload)}</p>")
            elif kind == "table":
                header, rows = payload
                body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                                      for row in rows) + "</table>")
            else:
                data = base64.b64encode(payload[0]).decode()
                body.append(f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{data}">')
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:left}img{max-width:100%;border:1px solid #eee;margin:4px 0}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def build(uri: str, parent_run_id: str, views: dict[str, StageView]) -> Card:
    """The report card of pipeline run `parent_run_id`; `views` says what to show of each stage."""
    parent = tracking.get_run(uri, parent_run_id)
    children = {r.data.tags.get("v3flow.stage"): r for r in
                sorted(tracking.child_runs(uri, parent_run_id), key=lambda r: r.info.start_time)}
    order = [s for s in parent.data.tags.get("v3flow.stages", "").split(",") if s in children]
    pm, tags = parent.data.metrics, parent.data.tags
    card = Card(f"v3flow report card: {parent.info.run_name}")
    card.text("Run", f"Config {tags.get('v3flow.config')} at commit {tags.get('mlflow.source.git.commit', '?')[:12]}; "
              f"overrides: {tags.get('v3flow.overrides') or 'none'}; status {parent.info.status}; "
              f"champion: {tags.get('v3flow.champion', 'not decided')}.")
    reused = set(filter(None, tags.get("v3flow.reused", "").split(",")))
    card.table("Stages", ["stage", "", "key", "seconds (this run)", "headline metrics"], [
        [s, "reused" if s in reused else "ran", tags.get(f"v3flow.{s}.key", ""), pm.get(f"{s}.seconds"),
         ", ".join(f"{k.removeprefix(s + '.')} {_fmt(v)}" for k, v in sorted(pm.items())
                   if k.startswith(s + ".") and not k.endswith(".seconds"))] for s in order])
    producer = {s: r.data.tags.get("v3flow.source_run_id") or r.info.run_id for s, r in children.items()}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(uri, order, children, producer, views, Path(tmp))
        curves = [s for s in order if views.get(s, StageView()).curves]
        for stage in order:
            if curves and stage == curves[0]:
                _curves(card, ctx, curves)
            for block in views.get(stage, StageView()).blocks:
                BLOCKS[block](card, ctx, stage)
        _wall_time(card, pm, children, order)
    return card


def write(card: Card, out_dir: Path) -> tuple[Path, Path]:
    """report_card.md (+ its figures under report_card/) and the self-contained report_card.html."""
    figures = out_dir / "report_card"
    figures.mkdir(parents=True, exist_ok=True)
    for kind, _, payload in card.blocks:
        if kind == "figure":
            (figures / payload[1]).write_bytes(payload[0])
    md, page = out_dir / "report_card.md", out_dir / "report_card.html"
    md.write_text(card.markdown())
    page.write_text(card.html())
    return md, page


def publish(uri: str, parent_run_id: str, out_dir: Path, views: dict[str, StageView]) -> Card:
    """Build the card and log it to the parent run (report_card.html, report_card.md and its figures)."""
    card = build(uri, parent_run_id, views)
    md, page = write(card, out_dir)
    tracking.log_artifacts(uri, parent_run_id, [str(page), str(md), str(out_dir / "report_card")])
    return card


def _funnel(card: Card, ctx: Context, stage: str) -> None:
    """Documents read to documents kept (the data stage), then tokens, and what the first stage that packs them
    made of them."""
    m = ctx.children[stage].data.metrics
    steps = [(k.replace("_", " "), m[k]) for k in FUNNEL_DOCS if k in m]
    steps.append(("documents kept (train + val)", m.get("train_documents", 0) + m.get("val_documents", 0)))
    tokens = [("tokens (train + val)", m.get("tokens"))]
    packs = [s for s in ctx.order[ctx.order.index(stage) + 1:] if "packing_efficiency" in ctx.children[s].data.metrics]
    if packs:
        pack = ctx.children[packs[0]].data.metrics
        tokens += [("packed train tokens", pack.get("train_tokens")),
                   ("packing efficiency", pack.get("packing_efficiency"))]
    card.table("Data funnel", ["step", "count"],
               [[name, value] for name, value in steps + tokens if value is not None])
    if "docs_not_deduplicated" in m:
        card.text("Data funnel note", f"{int(m['docs_not_deduplicated'])} documents come from sources exempt from "
                  "dedup (task sources), so the kept count can exceed the deduplicated one.")
    fig, ax = _plt().subplots(figsize=(7, 2.6))
    ax.barh([s for s, _ in steps][::-1], [v for _, v in steps][::-1], color="#4c78a8")
    ax.set_xlabel("documents")
    card.figure("Data funnel (documents)", _png(fig), "data_funnel.png")


def _curves(card: Card, ctx: Context, stages: list[str]) -> None:
    uri, children = ctx.uri, ctx.children
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 2.8), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        for key in ctx.views[stage].curves:
            points = tracking.metric_history(uri, children[stage].info.run_id, key)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=key.split("/")[-2 if "/" in key else -1])
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    card.figure("Training curves", _png(fig), "training_curves.png")


def _experts(card: Card, ctx: Context, stage: str) -> None:
    uri, run, producer = ctx.uri, ctx.children[stage], ctx.producer[stage]
    layers = sorted(k for k in run.data.metrics if k.startswith("maxvio_layer_"))
    if layers:
        fig, ax = _plt().subplots(figsize=(6, 2.8))
        for key in layers:
            points = tracking.metric_history(uri, run.info.run_id, key)
            ax.plot([s for s, _ in points], [v for _, v in points], label=key.removeprefix("maxvio_"))
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio (0 = balanced)")
        ax.legend(fontsize=7)
        card.figure("Expert load balance in pretraining (MaxVio per MoE layer)", _png(fig), "maxvio.png")
    loads = sorted(tracking.artifact_paths(uri, producer, "expert_loads"))
    if loads:
        png = tracking.download_artifact(uri, producer, loads[-1], ctx.tmp).read_bytes()
        card.figure(f"Expert loads at the end of pretraining ({Path(loads[-1]).stem})", png, "expert_loads.png")


def _long_context(card: Card, ctx: Context, stage: str) -> None:
    uri, run_id = ctx.uri, ctx.producer[stage]
    paths = set(tracking.artifact_paths(uri, run_id, stage))
    for name, heading in (("loss_by_position.png", "Long context: loss by position"),
                          ("passkey_rank_phase2.png", "Passkey retrieval after phase 2 (rank of the key)")):
        if f"{stage}/{name}" in paths:
            card.figure(heading, tracking.download_artifact(uri, run_id, f"{stage}/{name}", ctx.tmp).read_bytes(),
                        name)
    m = ctx.children[stage].data.metrics
    arms = sorted({k.split(".")[0] for k in m if k.endswith(".passkey_exact_match")})
    card.table("Long context by model", ["model", "passkey exact", "passkey top-1", "short-context val loss"],
               [[a, m.get(f"{a}.passkey_exact_match"), m.get(f"{a}.passkey_top1"), m.get(f"{a}.short_val_loss")]
                for a in arms])


def _accuracy(card: Card, ctx: Context, stage: str) -> None:
    m = ctx.children[stage].data.metrics
    arms = [a for a in ctx.views[stage].roles if f"{a}.accuracy" in m]
    ks = sorted({int(k.split("_at_")[1].split("_")[0]) for k in m if "pass_at_" in k and not k.endswith("stderr")})
    def gain(after: str, before: str) -> str:
        kinds = [f"{after}.{kind}_over_{before}" for kind in ("gain", "sampled_gain")]
        return " / ".join(f"{m[k]:+.3f} ± {m[f'{k}_stderr']:.3f}" for k in kinds if k in m)

    gains = {after: gain(after, before) for before, after in itertools.pairwise(arms)}
    # an arm also scored in the R1 form was scored first in its own (few-shot) format: that is its accuracy
    card.table("Held-out task accuracy (trained difficulties; gain over the model before, greedy / sampled pass@1, "
               "± paired s.e.)",
               ["model", "scored", "greedy accuracy", "± s.e.", *[f"pass@{k}" for k in ks], "harder", "R1 form",
                "gain"],
               [[a, "few-shot" if f"{a}.r1.accuracy" in m else "R1 form", m[f"{a}.accuracy"],
                 m.get(f"{a}.accuracy_stderr"), *[m.get(f"{a}.pass_at_{k}") for k in ks], m.get(f"{a}.accuracy_harder"),
                 m.get(f"{a}.r1.accuracy", m[f"{a}.accuracy"]), gains.get(a, "")] for a in arms])
    fig, ax = _plt().subplots(figsize=(5, 2.8))
    ax.bar(arms, [m[f"{a}.accuracy"] for a in arms], yerr=[m.get(f"{a}.accuracy_stderr", 0) for a in arms],
           color="#59a14f", capsize=4)
    ax.set_ylabel("greedy accuracy")
    card.figure("Accuracy by stage (held-out problems, ± 1 s.e.)", _png(fig), "accuracy.png")


MODEL_COLUMNS = (("val_loss", "val loss"), ("val_perplexity", "val ppl"), ("maxvio_mean", "MaxVio"),
                 ("mtp_acceptance_rate", "MTP accept"), ("long.passkey_exact_match", "passkey"),
                 ("accuracy", "task accuracy"), ("pass_at_1", "pass@1"), ("format_ok", "format ok"))


def _models(card: Card, ctx: Context, stage: str) -> None:
    m = ctx.children[stage].data.metrics
    models = list(dict.fromkeys(k.split(".")[0] for k in m if k.endswith(".val_loss")))
    columns = [(k, name) for k, name in MODEL_COLUMNS if any(f"{model}.{k}" in m for model in models)]
    card.table(f"Every model of the chain ({stage} stage)", ["model", *[name for _, name in columns]],
               [[model, *[m.get(f"{model}.{k}") for k, _ in columns]] for model in models])


def _wall_time(card: Card, pm: dict, children: dict, order: list[str]) -> None:
    produced = {s: children[s].data.metrics.get("wall_time_s") or children[s].data.metrics.get("time_total_s")
                for s in order}
    fig, ax = _plt().subplots(figsize=(7, 0.3 * len(order) + 1))
    ax.barh(order[::-1], [pm.get(f"{s}.seconds", 0) for s in order][::-1], color="#f28e2b")
    ax.set_xlabel("seconds")
    card.figure("Wall time per stage (this run; a reused stage costs only its cache lookup)", _png(fig),
                "wall_time.png")
    card.table("Wall time", ["stage", "this run (s)", "when produced (s)"],
               [[s, pm.get(f"{s}.seconds"), produced[s]] for s in order])


BLOCKS = {"funnel": _funnel, "experts": _experts, "long_context": _long_context, "accuracy": _accuracy,
          "models": _models}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
