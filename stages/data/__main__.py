"""`python -m stages.data CONFIG OUT_DIR [key=value ...]`: the data stage alone, without Prefect."""

import sys
from pathlib import Path

from flows.config import load_config
from stages.data import run

cfg = load_config(sys.argv[1], sys.argv[3:])
print(run(cfg.data, Path(sys.argv[2]), resolve=cfg.resolve).report_md)
