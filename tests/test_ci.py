""".ci/run starts the Slurm test bed only as root and only where its script is.
"""
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO


# --------------------------------------------------------------------------- .ci/run


def ci_testbed_condition():
    """The condition of .ci/run's `if ...; then` that starts the Slurm test bed."""
    text = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    found = [m.group(1) for m in re.finditer(r"^if (.*); then$", text, re.M)
             if "slurm-testbed.sh" in m.group(1)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("uid, has_script, starts", [("0", True, True), ("1000", True, False),
                                                     ("0", False, False),
                                                     ("1000", False, False)])
def test_ci_starts_the_testbed_only_as_root_where_the_script_is(tmp_path, uid, has_script,
                                                               starts):
    """`[ "$(id -u)" = 0 ] && [ -x S ] || [ -f S ]` started the test bed whenever the
    script existed, root or not. The condition is run by bash as .ci/run runs it, with an
    `id` that reports the uid under test."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && echo %s\n' % uid)
    (fakebin / "id").chmod(0o755)
    work = tmp_path / "checkout"
    (work / "tools").mkdir(parents=True)
    if has_script:
        shutil.copy2(str(REPO / "tools" / "slurm-testbed.sh"), str(work / "tools"))
    script = "if %s; then echo start; else echo skip; fi" % ci_testbed_condition()
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(work),
                       env=dict(os.environ, PATH="%s:%s" % (fakebin, os.environ["PATH"])),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 0, p
    assert p.stdout.strip() == ("start" if starts else "skip"), p
