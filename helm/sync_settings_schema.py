"""Write warm-serve's settings into the chart's values.schema.json (`settings` properties).

The chart maps `settings.<name>` to WARM_<NAME>; generating that part of the schema from
`service.settings.Settings` keeps names, types, bounds and enums identical to what the
service accepts. tests/helm/test_helm.py fails when the file is out of date: run
`.venv/bin/python helm/sync_settings_schema.py` after changing the settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.settings import Settings

SCHEMA = Path(__file__).parent / "warm-rm" / "values.schema.json"
# Set by the chart from service.port, model, auth and shutdown: not user settings.
CHART_OWNED = frozenset({"host", "port", "model", "api_keys", "graceful_shutdown_s"})
# JSON-schema keys that say nothing about what a WARM_* value may be.
DROPPED = frozenset({"title", "default", "format", "writeOnly"})


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _clean(v) for k, v in node.items() if k not in DROPPED}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def settings_properties() -> dict[str, Any]:
    """The JSON schema of every user-settable service setting, keyed by setting name."""
    properties = Settings.model_json_schema()["properties"]
    return {name: _clean(prop) for name, prop in properties.items() if name not in CHART_OWNED}


def main() -> None:
    """Rewrite the `settings` section of the chart's schema in place."""
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["settings"]["properties"] = settings_properties()
    tmp = SCHEMA.with_suffix(".tmp")
    tmp.write_text(json.dumps(schema, indent=2) + "\n")
    tmp.replace(SCHEMA)


if __name__ == "__main__":
    main()
