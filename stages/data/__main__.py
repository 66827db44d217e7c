"""`python -m stages.data CONFIG OUT_DIR [key=value ...]`: the data stage alone (the config's `data` section),
without Prefect or the rest of the pipeline."""

import sys
from pathlib import Path

from pydantic import ConfigDict

from stages.data import run
from stages.data.config import DataConfig, expand
from v3flow.config import Section, load


class DataOnly(Section):
    model_config = ConfigDict(extra="ignore")  # the other stages' sections are theirs to check
    data: DataConfig


cfg, root = load(DataOnly, sys.argv[1], sys.argv[3:], expand=expand)
print(run(cfg.data, Path(sys.argv[2]), resolve=lambda p: Path(p).expanduser() if Path(p).expanduser().is_absolute()
          else root / p).report_md)
