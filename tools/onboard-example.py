#!/usr/bin/env python3
"""Onboard a new lab member: register the lab's datasets on scratch and schedule their refresh.

What a lab's onboarding script does with scratch-keepalive's Python API. Copy it
and adapt the defaults. Run it as the new member, on a login node:

    python3 tools/onboard-example.py --account r00000 --keep-until 2027-06-30 \\
        /N/scratch/$USER/genomes /N/scratch/$USER/simulations

Each directory becomes a dataset named after it. --approval records the site's
exemption for refreshing access times (without one, on BR200, datasets are
only checked). --schedule-dry-run shows the Slurm schedule without installing it.
Exits with the tool's exit codes: 0 done, 1 failed, 2 invalid input.
"""
import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # a checkout: the module is one level up
import scratch_keepalive as sk  # noqa: E402


def dataset_name(path):
    name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.normpath(path)))
    return name.lstrip("._-")[:64] or "dataset"


def onboard(paths, keep_until, account, approval=None, schedule_dry_run=False, state_dir=None):
    """Register every path (once) and install the schedule. Returns a summary dict."""
    sk.init(state_dir=state_dir)
    registered = {d["path"]: d["name"] for d in sk.list_datasets(state_dir=state_dir)}
    added, kept = [], []
    for path in paths:
        real = os.path.realpath(path)
        if real in registered:
            kept.append(registered[real])
            continue
        entry = sk.add_dataset(dataset_name(path), path, keep_until, approval=approval,
                               state_dir=state_dir)
        added.append(entry["name"])
    schedule = sk.install_cron(account=account, dry_run=schedule_dry_run, state_dir=state_dir)
    return {"added": added, "already_registered": kept,
            "schedule": schedule["schedule"]["method"], "schedule_text": schedule["text"],
            "datasets": sk.status(state_dir=state_dir)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="DIR", help="dataset directories on scratch")
    p.add_argument("--keep-until", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--account", help="Slurm account (required on BR200)")
    p.add_argument("--approval", help="the site's approval to refresh access times")
    p.add_argument("--schedule-dry-run", action="store_true", help="show the schedule only")
    p.add_argument("--state-dir", help="state directory (default: the tool's)")
    args = p.parse_args(argv)
    try:
        out = onboard(args.paths, args.keep_until, args.account, args.approval,
                      args.schedule_dry_run, args.state_dir)
    except sk.Failure as e:
        sys.stderr.write("onboard: error: %s\n" % e)
        return e.exit_code
    for name in out["added"]:
        print("registered %s" % name)
    for name in out["already_registered"]:
        print("already registered: %s" % name)
    for d in out["datasets"]:
        print("%-24s %-8s %-6s keep until %s  %s" % (d["name"], d["state"], d["mode"],
                                                     d["keep_until"], d["path"]))
    print("schedule (%s)%s:" % (out["schedule"], ", not installed" if args.schedule_dry_run
                                else ""))
    sys.stdout.write(out["schedule_text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
