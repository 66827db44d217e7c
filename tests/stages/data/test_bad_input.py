"""Bad input is counted and quarantined with its reason and location; nothing is dropped silently."""

from __future__ import annotations

import json

from stages.data.readers import read_documents
from tests.stages.data.helpers import run_on_jsonl, write_jsonl

GOOD = "".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(20))  # passes every quality filter


def test_bad_records_are_quarantined_with_reasons(tmp_path):
    good = [{"id": f"g{i}", "text": GOOD.replace("f(", f"f{i}(")} for i in range(30)]
    bad = [
        b'{"id": "broken", "text": "no closing brace"\n',   # malformed_json, line 31
        b'{"id": "latin1", "text": "caf\xe9"}\n',           # invalid_utf8, line 32
        {"id": "notext", "body": GOOD},                      # missing_text, line 33
        {"id": "number", "text": 42},                        # not_text, line 34
        {"id": "blank", "text": "  \n\t "},                  # empty, line 35
        {"id": "huge", "text": "x" * 600_000},               # oversized (max_chars 500000), line 36
        b'[1, 2, 3]\n',                                      # a JSON value that is not a record, line 37
    ]
    short = {"id": "short", "text": "tiny"}                  # rejected by the quality filter (too_short)
    write_jsonl(tmp_path / "in" / "part.jsonl", good + bad + [short])

    result = run_on_jsonl(tmp_path / "in", tmp_path / "out", ["data.minhash.enabled=false",
                                                               "data.exact_dedup=false"])
    m = result.metrics
    quarantined = [json.loads(line) for f in sorted((tmp_path / "out" / "quarantine").glob("*.jsonl"))
                   for line in f.read_text().splitlines()]
    reasons = {q["where"].rsplit(":", 1)[1]: q["reason"] for q in quarantined}
    assert reasons == {"31": "malformed_json", "32": "invalid_utf8", "33": "missing_text", "34": "not_text",
                       "35": "empty", "36": "oversized", "37": "malformed_json"}
    latin1 = next(q for q in quarantined if q["reason"] == "invalid_utf8")
    assert "raw_base64" in latin1  # the raw bytes are kept, not lost
    assert m["quarantined"] == 7 and m["quarantined_malformed_json"] == 2 and m["quarantined_oversized"] == 1
    assert m["filtered"] == 1 and m["filtered_too_short"] == 1
    filtered = list(read_documents(tmp_path / "out" / "filtered"))
    assert [d.metadata["filter_reason"] for d in filtered] == ["too_short"]
    # every input line is accounted for: kept + quarantined + filtered
    assert m["docs_read"] == 31 and m["docs_after_filters"] + m["filtered"] == m["docs_read"]
    assert m["train_documents"] + m["val_documents"] == 30
