"""Write model.onnx beside a model folder's safetensors weights and record it in its card (sha256, opset,
the check against PyTorch). Run once for a model saved before LiverSeg wrote ONNX files:

    python scripts/export_onnx.py Resources/Models/liverseg-v1.2.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LiverSegExtension.model.networks import LiverModel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model folder (card.json, model.safetensors)")
    args = parser.parse_args()
    LiverModel.load(args.model).add_onnx(args.model)
    print(json.dumps(json.loads((args.model / "card.json").read_text())["onnx"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
