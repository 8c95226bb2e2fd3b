"""Where the Hydra configs live, for every entry point; registers the project's config resolvers."""

from pathlib import Path

import prior.config  # noqa: F401  (registers ${package_file:...} before any config is composed)

#: The package's ``conf/``: in a checkout a link to the top-level ``conf/`` folder, in an installed
#: wheel (``pip install .``) a copy of it, so every command finds its configs wherever it runs.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
