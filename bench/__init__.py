"""pallas-dlm benchmarks (pytest-benchmark suites); see bench/README.md and `make bench`."""
