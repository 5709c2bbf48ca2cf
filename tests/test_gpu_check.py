"""`make gpu-check` at toy sizes on the CPU: every part of the GPU check runs, so it cannot rot."""
import json

from benchmark.perf.gpu_check import PARTS, main


def test_the_gpu_check_runs_every_part_tiny_on_the_cpu_and_writes_its_report(tmp_path, capsys):
    assert main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0, capsys.readouterr().out[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(report["parts"]) == list(PARTS) and report["tiny"] is True
    parts = {name: part["result"] for name, part in report["parts"].items()}
    assert set(parts["training"]) == {"ldifs/ft", "ldifs/ldifs", "zscl-mtil/zscl"}
    assert all(r["images_per_s"] > 0 and r["batch"] == 4 and r["peak_gib"] > 0 for r in parts["training"].values())
    assert parts["compact_reads"]["images_per_s"] > 0
    probe = parts["official_probe"]
    # 6,000 full-batch steps (five lrs and the refit, 1,000 each), from the rounded per-step time
    assert probe["features"] == 2000 and abs(probe["projected_probe_s"] - probe["seconds_per_step"] * 6000) <= 0.35
    assert probe["peak_gib"] >= round(2000 * (16 + 10) * 4 / 2 ** 30, 4)  # the features' copy and the logits
    assert parts["one_rank_group"]["backend"] == "gloo"
    assert parts["projection"]["header"]["protocol"] == "ldifs"
    assert parts["projection"]["header"]["model"] == "cfbench-gpu-check-tiny"  # the protocol's ViT-B/32: 25 s more
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert markdown.startswith("# cfbench gpu-check (--tiny)") and markdown.count("ok)") == len(PARTS)
