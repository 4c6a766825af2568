"""Test helpers shipped with the package: a fake `vllm serve` (`fake_vllm`)."""
