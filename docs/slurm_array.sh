#!/usr/bin/env bash
# Segment a cohort on a SLURM cluster: one shard of the case list per array task, then one summary.
#
#   sbatch --array=1-8 docs/slurm_array.sh /data/cohort /data/cohort_liver
#   # when every task has ended (or as a dependent job: sbatch --dependency=afterany:JOBID ...):
#   liverseg summary merge /data/cohort_liver
#
# Each task segments cases I, I+N, I+2N... of the sorted case list (I = its array index, N = the array's
# size) and writes OUT/summary_shardIofN.csv, so tasks never write the same file. A task that is killed
# or requeued resumes where it stopped (--skip-existing keeps what is done). ONNX Runtime uses the CPUs
# the task was given.
#SBATCH --job-name=liverseg
#SBATCH --cpus-per-task=4
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --output=liverseg_%A_%a.log
set -euo pipefail
INPUT=${1:?usage: sbatch --array=1-N slurm_array.sh INPUT_FOLDER OUTPUT_FOLDER}
OUTPUT=${2:?usage: sbatch --array=1-N slurm_array.sh INPUT_FOLDER OUTPUT_FOLDER}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# SLURM numbers array tasks from the --array range; LiverSeg's shards are 1-based: --array=1-N maps one to one.
liverseg segment "$INPUT" --output-dir "$OUTPUT" --skip-existing --quiet \
  --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
