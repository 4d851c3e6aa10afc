"""examples/train_sharded.py runs to the end under torchrun with 2 gloo ranks and writes its shards."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_training_example(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the example runs the fused CPU path, not the Triton kernels
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "examples/train_sharded.py", "--steps", "5", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step    5  loss" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["class_shard_0_of_2.pt", "class_shard_1_of_2.pt"]
