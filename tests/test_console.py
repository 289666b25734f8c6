"""What a user sees in the terminal: no JVM banner or native-library notice, no warnings raised
by dl_pipeline's own code, one line per set-up step."""

import os
import re
import subprocess
import sys

import pytest

from conftest import AG_TEST, AG_TRAIN, ROOT


@pytest.mark.slow
def test_prepare_and_train_print_no_jvm_noise_and_no_warnings_of_our_own(tmp_path):
    common = ["--config", "conf/demo.yaml", "--set", f"data.train_path={AG_TRAIN}", "--set", f"data.test_path={AG_TEST}",
              "--set", f"prepare.output_path={tmp_path}/prepared", "--set", "shard.max_workers=2", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    cmds = [["prepare", *common],
            ["train", *common, "--set", f"train.data_path={tmp_path}/prepared", "--set", f"train.run_dir={tmp_path}/run",
             "--set", "train.launcher=local", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=5",
             "--set", "train.progress=false"]]
    for args in cmds:
        # -W default: every warning is shown once, so one raised by our code would be seen here
        proc = subprocess.run([sys.executable, "-W", "default", "-m", "dl_pipeline.cli", *args], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        err = proc.stderr
        assert "Setting default log level" not in err and "NativeCodeLoader" not in err, err[-3000:]
        ours = [ln for ln in err.splitlines() if re.search(r"dl_pipeline/[\w/]+\.py:\d+: \w*Warning", ln)]
        assert ours == [], ours


def test_setup_steps_print_one_line_and_show_the_log_only_on_failure(tmp_path):
    """scripts/setup.sh's ``step``: a step's own output goes to the log, the console gets one
    line; a failing step prints the log's tail and exits with the step's status."""
    text = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    step_fn = text[text.index("step() {"):text.index("\n}\n", text.index("step() {")) + 3]
    script = (f"set -euo pipefail\nLOG={tmp_path}/setup.log\n{step_fn}\n"
              "step 'quiet one' bash -c 'echo pip wall of text; echo more >&2'\n"
              "step 'broken one' bash -c 'echo the real error; exit 3'\n"
              "echo never reached\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert re.fullmatch(r"setup: quiet one \(\d+ s\)\n", proc.stdout), proc.stdout
    assert proc.stderr.startswith("setup: broken one FAILED (exit 3)") and "the real error" in proc.stderr
    assert "pip wall of text" in proc.stderr  # the log's tail, shown because a step failed
