"""The coordinator's transport-free core: `Coordinator` is the façade the servicers call."""

from shoal.coordinator.engine.coordinator import SHUTTING_DOWN, Coordinator, Submitted

__all__ = ["SHUTTING_DOWN", "Coordinator", "Submitted"]
