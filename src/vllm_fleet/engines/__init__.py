"""Engine processes and their supervisor (the only package here that starts processes)."""

from vllm_fleet.engines.process import EngineProcess, Outcome, SpawnError
from vllm_fleet.engines.supervisor import EngineEvent, EventCallback, Supervisor

__all__ = ["EngineEvent", "EngineProcess", "EventCallback", "Outcome", "SpawnError", "Supervisor"]
