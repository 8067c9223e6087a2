"""What every benchmark result records about the machine it ran on (protege.machine.environment)."""
from protege.machine import environment

__all__ = ["environment"]
