"""The README tells the truth: its quick start runs as pasted, and CI runs its test command."""
import os
import re
import subprocess

from conftest import REPO

README = (REPO / "README.md").read_text()


def block_after(marker):
    m = re.search(re.escape(marker) + r"\s*```sh\n(.*?)```", README, re.S)
    assert m, "no ```sh block after %r in README.md" % marker
    return m.group(1)


def test_quickstart_runs_as_pasted(tmp_path):
    script = block_after("<!-- test: quickstart -->")
    # Same commands; only the demo directory moves into this test's temp dir.
    script = script.replace("/tmp/sk-demo", str(tmp_path / "sk-demo"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRATCH_KEEPALIVE")}
    env.update(HOME=str(tmp_path), TMPDIR=str(tmp_path))
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=str(REPO), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out = p.stdout.decode()
    assert p.returncode == 0, (out, p.stderr.decode())
    assert "results: touched 0 of 4 entries (4 accessed recently, skipped); complete" in out
    assert "results: ok (touch mode)" in out


def test_ci_runs_the_readme_test_command():
    cmd = block_after("<!-- ci: test command -->").strip()
    assert cmd == "python3 -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "<!-- ci: test command -->" in ci
