"""Extract one version's openAPIV3Schema from an upstream CRD file (a maintenance tool).

    python tests/deploy/vendor_crd.py CRD.yaml VERSION OUT.json

Only the schema data is kept (see tests/deploy/crds/README.md for the sources).
"""

from __future__ import annotations

import json
import sys

import yaml


def main(src: str, version: str, out: str) -> None:
    with open(src) as f:
        crd = next(
            d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"
        )
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    with open(out, "w") as f:
        json.dump(served["schema"]["openAPIV3Schema"], f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
