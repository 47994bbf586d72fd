"""The `muse` process's exit status and stderr: a user's mistake is one line and 2, a bug is a
traceback and 1."""

import subprocess
import sys
import textwrap


def muse(*argv, patch=""):
    script = textwrap.dedent(patch) + "\nimport sys\nfrom muse.cli import main\n" \
        "sys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          timeout=300)


def test_a_users_mistake_is_one_line_and_status_2(tmp_path):
    done = muse("eval", str(tmp_path / "none.pt"), "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr == f"muse eval: checkpoint '{tmp_path}/none.pt' does not exist; pass " \
        "a .pt file written by muse train (step-NNNNNN.pt, best.pt, final.pt, emergency.pt)\n"
    assert done.stdout == ""


def test_a_bug_keeps_its_traceback_and_status_1():
    done = muse("profile", "phase1:tiny", "--seq", "8", "--device", "cpu", patch="""
        import muse.measure.profile as profile
        def bug(*args, **kwargs):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        profile.profile_step = bug
    """)
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.endswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied\n")
