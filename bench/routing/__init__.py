"""`make bench-routing`: where a request goes between two replicas, measured (issue 16).

One deployment with two replicas of the CPU demo's SmolLM2 (real vLLM, prefix caching on
as vLLM defaults) under multi-turn conversations, each with its own long system prompt,
and a control workload with no shared prefixes. In one run, in front of the same two
engines: nginx round robin (the vhost `fleet nginx` renders), the fleet with
`least_outstanding`, the fleet with `prefix` (switched by a reload, engines untouched),
and vllm-router's `cache_aware` policy. The engines' prefix caches are emptied before
each setup (vLLM's dev route `/reset_prefix_cache`), and their hit rate is read from
their own `/metrics`. `--quick` runs the same on fake engines (a prefix cache and a
per-token prefill cost of their own: `vllm_fleet.testing.fake_prefix`) in seconds.
"""
