#!/bin/bash
#SBATCH --job-name=scratch-keepalive
#SBATCH --partition=general
#SBATCH --account=r00000
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=2:00:00
#SBATCH --output=/N/u/alice/BigRed200/.local/state/scratch-keepalive/logs/slurm-%j.out
#SBATCH --no-requeue
#SBATCH --signal=B:TERM@120
# Managed by `scratch-keepalive install-cron`; `scratch-keepalive uninstall-cron`
# removes it. Each run first submits its successor (one pending job at most, and
# only while this file exists), then refreshes the datasets that are due.
cd /N/u/alice/BigRed200/.local/state/scratch-keepalive && unset SCRATCH_KEEPALIVE_NOW SCRATCH_KEEPALIVE_HOME && SCRATCH_KEEPALIVE_SCRATCH_ROOT=/N/scratch/alice exec /usr/bin/python3 -c 'import importlib.util as u, sys; sys.argv = sys.argv[1:]; s = u.spec_from_file_location("__main__", sys.argv[0]); m = u.module_from_spec(s); m._SCRATCH_KEEPALIVE_RECOMPILED = True; sys.modules["__main__"] = m; s.loader.exec_module(m)' /opt/sk/scratch_keepalive.py --state-dir /N/u/alice/BigRed200/.local/state/scratch-keepalive refresh --due --scheduled sbatch --max-seconds 6900
