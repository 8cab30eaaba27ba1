"""Where the feature browser is served by default: ``sae-platform browse``/``serve`` and
``python -m sae_platform.browser serve`` bind ``DEFAULT_HOST:DEFAULT_PORT``, and the Dagster
metadata links to ``BROWSER_URL``. Imports nothing, so ``--help`` can show the defaults at once."""

DEFAULT_HOST = "127.0.0.1"  # this machine only
DEFAULT_PORT = 8000
BROWSER_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/"
