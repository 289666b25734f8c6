"""Real Horovod with Gloo: two ranks allreduce and agree, via Spark and via horovodrun."""

import os
import subprocess
import sys
import textwrap

from conftest import requires_horovod

pytestmark = requires_horovod


def test_horovod_spark_run_two_ranks_agree(spark):
    import horovod.spark

    from dl_pipeline.train.smoke import allreduce_check

    results = horovod.spark.run(allreduce_check, num_proc=2, use_gloo=True, nics={"lo"}, verbose=0,
                                env=dict(os.environ))
    assert sorted(results) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_horovodrun_gloo_two_ranks_agree(tmp_path):
    script = tmp_path / "smoke.py"
    script.write_text(textwrap.dedent("""
        import horovod.torch as hvd, torch
        hvd.init()
        v = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum, name="smoke")
        print(f"rank={hvd.rank()} size={hvd.size()} sum={float(v[0])}", flush=True)
    """))
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    proc = subprocess.run([horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", "--network-interface", "lo",
                           sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(ln.split(">:", 1)[-1].strip() for ln in proc.stdout.splitlines() if "sum=" in ln)
    assert lines == ["rank=0 size=2 sum=3.0", "rank=1 size=2 sum=3.0"]
