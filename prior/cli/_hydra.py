"""Where the Hydra configs live, for every entry point; registers the project's config resolvers."""

from pathlib import Path

import prior.config  # noqa: F401  (registers ${package_file:...} before any config is composed)

#: The project's top-level ``conf/`` folder (the package is installed editable from the checkout).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
