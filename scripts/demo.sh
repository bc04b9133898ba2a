#!/usr/bin/env bash
# Install LiverSeg and segment the sample CT: the CHAOS DICOM series in ../shared/data when present,
# otherwise a synthetic CT made on the spot (so the command works in any fresh clone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
SAMPLE=${1:-../shared/data/dicom/chaos_ct3}
if [ ! -e "$SAMPLE" ]; then
  echo "sample $SAMPLE not found: segmenting a synthetic CT instead" >&2
  SAMPLE=out/sample_ct.nrrd
  mkdir -p out
  .venv/bin/python -c "
import sys; sys.path.insert(0, 'Testing')
import SimpleITK as sitk
from synthetic import phantom_image
image, _ = phantom_image(shape_kji=(60, 110, 120), spacing=(3.0, 3.0, 5.0))
sitk.WriteImage(image, '$SAMPLE')"
fi
.venv/bin/liverseg segment "$SAMPLE" --output-dir out --format seg.nrrd --overwrite
cat out/summary.csv
