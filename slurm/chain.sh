#!/bin/bash
# chain.sh: submit a chain of N dependent jobs that continue one training run, for clusters that forbid
# requeueing (where slurm/requeue.sbatch cannot `scontrol requeue`).
#
#   slurm/chain.sh N [sbatch options ...] -- JOB.toml [section.key=value ...]
#   slurm/chain.sh 5 --time=04:00:00 --nodes=2 -- jobs/big.toml run.steps=200000 run.out_dir=runs/big
#
# Job k+1 waits for job k with --dependency=afterany (it starts however job k ended: done, timed out,
# preempted or failed). Each job runs slurm/train.sbatch with HPCOPT_RESUME=auto, so it continues from the
# newest checkpoint that verifies; a job that finds the step budget already reached exits 0 in seconds.
# Each job gets --signal=B:USR1@<grace>: before its time limit hpcopt checkpoints and exits 75.
# All jobs must share one run directory: give run.out_dir=...; without it chain.sh picks
# runs/chain-<date>-<time> and says so.
#
# Runs on the login node, from the repository root. Variables read:
#   HPCOPT_GRACE    seconds before the time limit for the checkpoint signal (default 120; see
#                   docs/slurm.md, Timing)
#   HPCOPT_SCRIPT   the batch script of each job (default: train.sbatch next to this file)
#   and everything slurm/train.sbatch reads (HPCOPT_LAUNCHER, HPCOPT_CMD, ...), passed on to the jobs
#   through sbatch's default --export=ALL.
# The site's `module load` lines go into train.sbatch, not here.
# Prints one job id per line; cancel the chain with `scancel ID ...`.
set -euo pipefail

usage() { echo "usage: $0 N [sbatch options ...] -- JOB.toml [section.key=value ...]" >&2; exit 2; }
[[ $# -ge 3 && $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1
shift
sbatch_opts=()
while [[ $# -gt 0 && $1 != -- ]]; do
    sbatch_opts+=("$1")
    shift
done
[[ $# -ge 2 ]] || usage
shift   # the --
job_args=("$@")

have_out_dir=0
for a in "${job_args[@]}"; do
    [[ $a == run.out_dir=* ]] && have_out_dir=1
done
if (( ! have_out_dir )); then
    out_dir=runs/chain-$(date +%Y%m%d-%H%M%S)
    job_args+=("run.out_dir=$out_dir")
    echo "chain.sh: run directory $out_dir" >&2
fi

script=${HPCOPT_SCRIPT:-$(dirname "$(readlink -f "$0")")/train.sbatch}
grace=${HPCOPT_GRACE:-120}
export HPCOPT_RESUME=auto
prev=""
for (( k = 1; k <= n; k++ )); do
    dep=()
    [[ -n $prev ]] && dep=(--dependency="afterany:$prev")
    id=$(sbatch --parsable --signal="B:USR1@$grace" "${dep[@]}" "${sbatch_opts[@]}" "$script" "${job_args[@]}")
    prev=${id%%;*}
    echo "$prev"
done
