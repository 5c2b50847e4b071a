"""Parse OpenMetrics text with prometheus_client's parser; print its families as JSON.

  openmetrics_parse.py FILE

Exit 0: FILE is valid OpenMetrics; stdout is
        [{"name": FAMILY, "type": TYPE, "samples": [{"name": N, "labels": [[K, V], ...], "value": "V"}]}]
        (labels in the order of the text; values as Python float reprs: "1.0", "inf").
Exit 1: it is not; the parser's error is on stderr.
Exit 3: prometheus_client is missing: run scripts/setup-test-deps.sh.
"""

import json
import sys

try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError as e:
    print(f"cannot import prometheus_client's OpenMetrics parser ({e})", file=sys.stderr)
    sys.exit(3)

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
try:
    # A generator: errors come while it is consumed, so consume it here.
    families = [
        {
            "name": fam.name,
            "type": fam.type,
            "samples": [
                {"name": s.name, "labels": [[k, v] for k, v in s.labels.items()], "value": repr(float(s.value))}
                for s in fam.samples
            ],
        }
        for fam in text_string_to_metric_families(text)
    ]
except Exception as e:  # ValueError mostly, but malformed input can raise others
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
json.dump(families, sys.stdout)
