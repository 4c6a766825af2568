"""`make chaos`: the gateway and `fleet up` under faults, measured (README: Reliability)."""
