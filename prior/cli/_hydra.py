"""Where the Hydra configs live, for every entry point."""

from pathlib import Path

#: The project's top-level ``conf/`` folder (the package is installed editable from the checkout).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
