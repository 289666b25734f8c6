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


def test_setup_prints_one_line_per_step():
    """An up-to-date set-up says so in one line; each step of a real one is one line (pip's own
    output goes to a log shown only when a step fails)."""
    proc = subprocess.run(["bash", "scripts/setup.sh"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "STACK": "default" if "spark4" not in sys.prefix else "spark4",
                               "VENV": sys.prefix, "VENV_SPARK4": sys.prefix})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("setup: ") for ln in lines), proc.stdout
    assert "Requirement already satisfied" not in proc.stdout + proc.stderr
