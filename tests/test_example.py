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


def test_face_training_example(tmp_path):
    """examples/train_face.py in a smoke size: trains, checkpoints, resumes, evaluates, writes its summary."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    base = [sys.executable, "examples/train_face.py", "--num-classes", "50", "--batch-size", "32",
            "--eval-identities", "20", "--eval-samples", "4", "--log-every", "4", "--warmup", "2",
            "--checkpoint", str(tmp_path / "ckpt.pt"), "--save-every", "4"]
    first = subprocess.run(base + ["--steps", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary_path = tmp_path / "summary.json"
    second = subprocess.run(base + ["--steps", "8", "--resume", "--json", str(summary_path),
                                    "--roc", str(tmp_path / "roc.png")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert "step     8  loss" in second.stdout
    import json
    summary = json.loads(summary_path.read_text())
    for key in ("verification_accuracy", "tar_at_far_1e-3", "samples_per_second", "final_loss"):
        assert isinstance(summary[key], float), (key, summary)
    assert 0.5 <= summary["verification_accuracy"] <= 1.0


def test_face_example_verification_protocol():
    """The 10-fold pair accuracy and TAR at FAR 1e-3 of perfectly separated and of random embeddings."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train_face
    finally:
        sys.path.pop(0)
    import torch
    labels = torch.arange(50).repeat_interleave(4)
    perfect = torch.nn.functional.one_hot(labels, 50).float()
    accuracy, tar = train_face.verification(perfect, labels)
    assert accuracy == 1.0 and tar == 1.0
    noise = torch.nn.functional.normalize(torch.randn(200, 64, generator=torch.Generator().manual_seed(0)))
    accuracy, tar = train_face.verification(noise, labels)
    assert 0.4 < accuracy < 0.6 and tar < 0.05
