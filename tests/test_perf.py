"""The benchmark harness's bookkeeping: alternation, once-per-task setup excluded, ratios."""
import time

from benchmark.perf.bench import Timing, alternate, photo_files, report


def test_alternate_times_each_variant_and_subtracts_reported_setup():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.02)
        return 0.015  # of which 15 ms were once-per-task setup

    def fast():
        calls.append("fast")
        time.sleep(0.005)

    timings = alternate({"slow": slow, "fast": fast}, repeats=3, device="cpu")
    assert calls == ["slow", "fast"] * 4  # one warm-up round, then alternated
    assert len(timings["slow"].seconds) == 3 and timings["slow"].excluded == [0.015] * 3
    assert 0.02 <= timings["slow"].median < 0.05
    assert abs(timings["slow"].median_without_setup - (timings["slow"].median - 0.015)) < 0.01
    lines = report("t", timings, "fast")
    assert lines[0] == "## t" and "x fast" in lines[1] and "x fast" not in lines[2]


def test_timing_without_setup_defaults_to_the_plain_median():
    t = Timing("x", [1.0, 3.0, 2.0], [0, 0, 0])
    assert t.median == t.median_without_setup == 2.0


def test_photo_files_are_real_jpegs_of_the_offline_photos(tmp_path):
    source = photo_files(tmp_path, copies=2)
    assert len(source) == 28 and sorted(set(source.labels.tolist())) == list(range(14))
    img = source.read(0)
    assert img.mode == "RGB" and min(img.size) >= 256 and open(source.paths[0], "rb").read(2) == b"\xff\xd8"
