"""The load test at a small size (the full size is documented in RELIABILITY.md)."""

import json

import load_test


def test_load_mix_fails_no_good_request_and_leaks_nothing(tmp_path):
    report = load_test.run(clients=8, seconds=8, rss_bound_mib=1536, data_dir=tmp_path)
    print(json.dumps(report, indent=2))
    assert report["server_alive"]
    assert report["failed"] == 0, report["failures"]
    assert report["good"] > 50 and report["garbage"] > 5, report
    assert report["rss_mib_peak"] < 1536, report
    assert report["fds_after"] <= report["fds_before"] + 4, report
